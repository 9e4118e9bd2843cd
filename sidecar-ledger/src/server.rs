//! `paystile-ledger serve`: the HTTP API over the store, and the hold sweeper.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::serve::ListenerExt;
use paystile_protocol::credential::{L402Rules, PayTokenRules, Verifier, X402Rules};
use paystile_protocol::pay_token::Validation;
use paystile_protocol::x402::Signature;
use tokio::net::TcpListener;

use crate::challenge::ChallengeMinter;
use crate::http::{self, ApiKey};
use crate::invoice::InvoiceBackend;
use crate::ledger::{Credentials, Ledger, Limits, TokenIssuer};
use crate::settings::Settings;
use crate::settlement::Settlements;
use crate::store::Store;

pub async fn serve(settings: Settings) -> anyhow::Result<()> {
    let store = Store::open(&settings.database)
        .await
        .with_context(|| format!("cannot open the ledger database {}", settings.database))?;
    let token = &settings.token;
    let issuer = token.signing_key().map(|key| TokenIssuer {
        key,
        issuer: token.issuer.clone(),
        audience: token.audience.clone(),
        default_ttl: token.ttl,
    });
    let credentials = credentials(&settings);
    let minter = match &settings.l402 {
        Some(l402) => {
            let backend = InvoiceBackend::new(&l402.backend, l402.secret.expose().as_bytes())
                .context("cannot set up the invoice backend")?;
            if backend.sandbox().is_some() {
                tracing::warn!(
                    "L402 invoice backend: SANDBOX. Invoices are regtest and paid on request; no real money moves"
                );
            }
            Some(Arc::new(ChallengeMinter::new(l402.secret.clone(), backend)))
        }
        None => None,
    };
    let limits = Limits {
        hold_ttl: settings.hold_ttl,
        max_replays: settings.max_replays,
        idempotency_retention: settings.idempotency_retention,
        daily_limits: Arc::new(settings.daily_limits.clone()),
        clock_offset_millis: settings.clock_offset_seconds.saturating_mul(1000),
    };
    if settings.clock_offset_seconds != 0 {
        tracing::warn!(
            seconds = settings.clock_offset_seconds,
            "the ledger's clock is offset (tests only)"
        );
    }
    let mut ledger =
        Ledger::new(store.clone(), issuer, credentials, limits).selling(settings.services.clone());
    if let Some(x402) = &settings.x402 {
        let settlements =
            Settlements::new(store, x402).await.context("cannot set up x402 settlement")?;
        let settlements = Arc::new(settlements);
        tokio::spawn(settlements.clone().run(SETTLEMENT_INTERVAL));
        ledger = ledger.settling_with(settlements);
    }
    let ledger = Arc::new(ledger);
    let reopened = ledger.reopen_holds().await.context("cannot reopen the open holds")?;
    if reopened > 0 {
        tracing::info!(reopened, "open holds given a new TTL for their gateways to settle");
    }

    let listener = TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?
        // Small JSON exchanges on kept-alive connections: never wait for Nagle.
        .tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
    let address = axum::serve::Listener::local_addr(&listener)
        .context("cannot read the listening address")?;
    if !address.ip().is_loopback() {
        tracing::warn!(%address, "listening beyond loopback: keep the ledger's port private");
    }
    tokio::spawn(sweep_expired_holds(ledger.clone(), settings.sweep_interval));
    tracing::info!(%address, database = %settings.database, "ledger ready");
    // The one line on stdout: scripts (and the test harness) wait for it.
    println!("paystile-ledger listening on http://{address}");

    let app = http::router(
        ledger,
        minter,
        ApiKey::new(settings.admin_key.expose()),
        ApiKey::new(settings.gateway_key.expose()),
    );
    axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await?;
    tracing::info!("ledger stopped");
    Ok(())
}

/// How often due x402 settlements are looked for.
const SETTLEMENT_INTERVAL: Duration = Duration::from_millis(250);

/// Clock skew allowed on a Pay Token's `exp` and `nbf`, as the filter allows by default.
const LEEWAY_SECONDS: u64 = 60;

/// What the ledger verifies credentials with: every Pay Token key it has (its Ed25519 keys,
/// the HS256 secret), the L402 secret and the x402 offer. Sandbox credentials are taken: they are metered in
/// the sandbox book, and each gateway says whether it serves them. Issuer, audience and
/// route capabilities are the gateways' to check; the ledger checks who pays, and how much.
fn credentials(settings: &Settings) -> Credentials {
    let keys = settings.token.verifying_keys();
    let pay_token = (!keys.is_empty()).then(|| PayTokenRules {
        keys,
        validation: Validation { leeway_seconds: LEEWAY_SECONDS, ..Validation::default() },
        accept_sandbox: true,
    });
    let l402 = settings.l402.as_ref().map(|l402| L402Rules {
        secret: l402.secret.expose().as_bytes().to_vec(),
        accept_sandbox: true,
    });
    // The ledger always checks an x402 payment's signature: it is what it settles.
    let x402 = settings
        .x402
        .as_ref()
        .map(|x402| X402Rules { offer: x402.offer.clone(), signature: Signature::Verify });
    Credentials {
        verifier: Verifier { pay_token, l402, x402 },
        published: settings.token.keys.public(),
    }
}

/// Releases expired holds, then forgets Idempotency-Keys past their retention and old
/// revocation feed entries.
async fn sweep_expired_holds(ledger: Arc<Ledger>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match ledger.expire_holds().await {
            Ok(0) => {}
            Ok(released) => tracing::info!(released, "released expired holds"),
            Err(e) => tracing::error!(error = %e, "cannot release expired holds"),
        }
        match ledger.purge_idempotency_keys().await {
            Ok(0) => {}
            Ok(purged) => tracing::debug!(purged, "forgot Idempotency-Keys past their retention"),
            Err(e) => tracing::error!(error = %e, "cannot purge old Idempotency-Keys"),
        }
        match ledger.prune_revocations().await {
            Ok(0) => {}
            Ok(pruned) => tracing::debug!(pruned, "forgot old revocation feed entries"),
            Err(e) => tracing::error!(error = %e, "cannot prune the revocation feed"),
        }
    }
}

async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
}
