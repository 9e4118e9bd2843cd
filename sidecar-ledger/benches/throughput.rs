//! Hot-token throughput of the ledger's stores: reserve + commit pairs per second against
//! one token, at 1, 8 and 64 concurrent clients, each pair's commit sent on its own
//! ("single", one settlement per call) or gathered as the filter sends them ("batched",
//! up to 64 settlements per call). Every operation is durable before it is answered:
//! SQLite in WAL mode with `synchronous = FULL` and group commit; PostgreSQL with its
//! default `synchronous_commit = on`, in a fresh database on `PAYSTILE_BENCH_POSTGRES_URL`
//! (default `postgres://127.0.0.1:5432/test`, whose user may create databases).
//!
//! `cargo bench -p paystile-ledger --bench throughput` prints one table. It checks the
//! books at the end of each run: the token's spend equals the pairs counted, nothing held.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use paystile_ledger::ledger::now_millis;
use paystile_ledger::settings::{Database, PostgresUrl};
use paystile_ledger::store::{ReserveCommand, ReserveOutcome, Store};
use paystile_protocol::Usdc;
use paystile_protocol::ledger_api::{Outcome, SettleStatus, Settlement, TokenGrant};
use paystile_protocol::pay_token::Scope;

const RUN: Duration = Duration::from_secs(3);
const BATCH: usize = 64;
const TOKEN: &str = "tok_bench";
/// Charge ids are unique across runs.
static NEXT_CHARGE: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Single,
    Batched,
}

fn grant() -> TokenGrant {
    TokenGrant {
        token_id: TOKEN.into(),
        buyer_id: "bench".into(),
        buyer_tag: None,
        service_id: Some("bench".into()),
        scope: Scope::Single,
        limit_usdc: Usdc::MAX,
        expires_at: 4_000_000_000,
        sandbox: false,
    }
}

fn price() -> Usdc {
    Usdc::from_micros(1_000).unwrap_or(Usdc::ZERO)
}

async fn reserve(store: &Store, n: u64) -> anyhow::Result<String> {
    let now = now_millis();
    let charge_id = format!("ch_bench_{n}");
    let outcome = store
        .reserve(ReserveCommand {
            charge_id: charge_id.clone(),
            extra_charge_ids: Vec::new(),
            token: grant(),
            service_id: "bench".into(),
            price: price(),
            idempotency: None,
            cap: None,
            now,
            hold_expires_at: now + 120_000,
            max_replays: 5,
            daily_limits: Default::default(),
        })
        .await?;
    ensure!(matches!(outcome, ReserveOutcome::Held(_)), "refused: {outcome:?}");
    Ok(charge_id)
}

async fn commit(store: &Store, charge_ids: Vec<String>) -> anyhow::Result<()> {
    let settlements = charge_ids
        .into_iter()
        .map(|charge_id| Settlement {
            charge_id,
            outcome: Outcome::Commit,
            upstream_status: Some(200),
            amount_usdc: None,
        })
        .collect();
    let results = store.settle(settlements, now_millis()).await?;
    ensure!(results.iter().all(|r| r.status == SettleStatus::Committed), "{results:?}");
    Ok(())
}

/// Pairs committed by `clients` concurrent clients in [`RUN`], and their rate per second.
async fn run(store: &Store, clients: usize, mode: Mode) -> anyhow::Result<(u64, f64)> {
    let pairs = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + RUN;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (store, pairs) = (store.clone(), pairs.clone());
        tasks.push(tokio::spawn(async move {
            let mut held = Vec::new();
            while Instant::now() < deadline {
                held.push(reserve(&store, NEXT_CHARGE.fetch_add(1, Ordering::Relaxed)).await?);
                if mode == Mode::Single || held.len() == BATCH {
                    let count = held.len() as u64;
                    commit(&store, std::mem::take(&mut held)).await?;
                    pairs.fetch_add(count, Ordering::Relaxed);
                }
            }
            if !held.is_empty() {
                let count = held.len() as u64;
                commit(&store, held).await?;
                pairs.fetch_add(count, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let pairs = pairs.load(Ordering::Relaxed);
    Ok((pairs, pairs as f64 / elapsed))
}

/// The token's books must hold exactly the pairs counted so far, and nothing on hold.
async fn check_books(store: &Store, pairs: u64) -> anyhow::Result<()> {
    let token = store.token(TOKEN.into(), now_millis()).await?.context("the token is gone")?;
    ensure!(token.reserved.is_zero(), "holds left open: {token:?}");
    ensure!(
        token.used.micros() == pairs * price().micros(),
        "spent {} for {pairs} pairs",
        token.used
    );
    Ok(())
}

/// A fresh database on the PostgreSQL server, dropped by [`drop_database`].
async fn create_database(
    admin_url: &str,
) -> anyhow::Result<(tokio_postgres::Client, String, String)> {
    let (admin, connection) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls)
        .await
        .context("PostgreSQL is not reachable (PAYSTILE_BENCH_POSTGRES_URL)")?;
    tokio::spawn(connection);
    let name = format!("paystile_bench_{}", std::process::id());
    // One statement per call: DROP and CREATE DATABASE cannot share a transaction.
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name}")).await?;
    admin.batch_execute(&format!("CREATE DATABASE {name}")).await?;
    let (server, _) = admin_url.rsplit_once('/').context("expected postgres://host/dbname")?;
    Ok((admin, format!("{server}/{name}"), name))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::TempDir::new()?;
    let admin_url = std::env::var("PAYSTILE_BENCH_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://127.0.0.1:5432/test".into());
    let (admin, postgres_url, postgres_db) = create_database(&admin_url).await?;
    let postgres = PostgresUrl::parse(&postgres_url).map_err(anyhow::Error::msg)?;
    let stores = [
        ("SQLite (WAL, synchronous=FULL)", Database::Sqlite(dir.path().join("bench.db"))),
        ("PostgreSQL (synchronous_commit=on)", Database::Postgres(postgres)),
    ];
    println!("| store | mode | clients | pairs/s |");
    println!("|---|---|--:|--:|");
    for (name, database) in stores {
        let store = Store::open(&database).await?;
        let mut counted = 0;
        for mode in [Mode::Single, Mode::Batched] {
            for clients in [1, 8, 64] {
                let (pairs, rate) = run(&store, clients, mode).await?;
                counted += pairs;
                check_books(&store, counted).await?;
                println!("| {name} | {mode:?} | {clients} | {rate:.0} |");
            }
        }
        drop(store);
    }
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {postgres_db} WITH (FORCE)")).await?;
    Ok(())
}
