//! The credential sections of the configuration: `pay_token` (the keys Pay Tokens are
//! verified with, and their claims' rules) and `l402` (the secret macaroons are checked
//! with, and the offer a 402 makes). What a gateway holds here decides what it can verify
//! and what it could mint (see the README's "Security").

use std::time::Duration;

use paystile_protocol::Usdc;
use paystile_protocol::credential::{L402Rules, PayTokenRules, X402Rules};
use paystile_protocol::jwk::Jwk;
use paystile_protocol::jws::Key;
use paystile_protocol::ledger_api::ChallengeRequest;
use paystile_protocol::pay_token::{MAX_ID_LEN, Validation};
use paystile_protocol::x402::{Offer, OfferSettings, Signature};
use serde::Deserialize;

use super::{
    ConfigError, DEFAULT_CHALLENGE_POOL, DEFAULT_L402_VALID_SECONDS, DEFAULT_LEEWAY_SECONDS,
    L402Offer, MAX_CHALLENGE_POOL, MAX_POOL_AGE_SECONDS, MIN_HS256_SECRET_LEN, MIN_L402_SECRET_LEN,
    invalid,
};
use crate::routes::Route;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename = "the Pay Token settings")]
pub(super) struct RawPayToken {
    keys: Vec<RawKey>,
    #[serde(default)]
    issuer: Option<String>,
    #[serde(default)]
    audience: Option<String>,
    #[serde(default)]
    leeway_seconds: Option<u64>,
    #[serde(default)]
    accept_sandbox: bool,
}

/// A Pay Token key: an HS256 secret (`alg`, `secret`), or an Ed25519 public key as a JWK
/// (`kty`, `crv`, `x`, and optionally `alg`, `use`), as the ledger's key set publishes it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename = "a key")]
struct RawKey {
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    /// HS256: the key's bytes, as UTF-8 text.
    #[serde(default)]
    secret: Option<String>,
    #[serde(default)]
    kty: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default, rename = "use")]
    use_: Option<String>,
    /// A private JWK's `d`: refused, never read (a gateway must not be able to sign).
    #[serde(default)]
    d: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename = "the L402 settings")]
pub(super) struct RawL402 {
    /// The secret macaroon root keys derive from, as UTF-8 text; the ledger has the same.
    secret: String,
    /// What one payment buys.
    budget_usdc: Usdc,
    /// The exchange rate the invoice's amount is computed at.
    sats_per_usdc: u64,
    #[serde(default)]
    valid_seconds: Option<u64>,
    #[serde(default)]
    capabilities: Option<Vec<String>>,
    #[serde(default)]
    accept_sandbox: bool,
    #[serde(default)]
    challenge_pool: Option<usize>,
}

/// What x402 payments are taken for: one offer (a chain, a token and its EIP-712 domain, a
/// payee), as the ledger's settings state it too.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename = "the x402 settings")]
pub(super) struct RawX402 {
    network: String,
    pay_to: String,
    #[serde(default)]
    asset: Option<String>,
    #[serde(default)]
    asset_name: Option<String>,
    #[serde(default)]
    asset_version: Option<String>,
    #[serde(default)]
    max_timeout_seconds: Option<u64>,
    /// Verify each payment's signature here as well as in the ledger: a forged payment is
    /// then refused without a ledger call, at the price of an ECDSA recovery in the wasm.
    #[serde(default)]
    verify_signatures: bool,
    /// How long a reserve on a `settle: before` route (or a top-up) may wait for the
    /// transfer's receipt.
    #[serde(default)]
    settle_timeout_ms: Option<u64>,
    #[serde(default)]
    top_up: Option<RawTopUp>,
}

/// A path on the gateway that sells a prepaid balance and a Pay Token for x402.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename = "the x402 top-up settings")]
struct RawTopUp {
    path: String,
    #[serde(default)]
    min_usdc: Option<Usdc>,
    #[serde(default)]
    max_usdc: Option<Usdc>,
}

/// The top-up path: `POST <path>?amount_usdc=<amount>`, paid with x402, answers the ledger's
/// top-up (the Pay Token bought) with the transaction in `PAYMENT-RESPONSE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopUp {
    pub path: String,
    pub min: Usdc,
    pub max: Usdc,
}

/// A top-up buys at least this much unless configured otherwise.
pub const DEFAULT_TOP_UP_MIN_USDC: Usdc = match Usdc::from_micros(100_000) {
    Some(amount) => amount,
    None => Usdc::ZERO,
};
/// And at most this much.
pub const DEFAULT_TOP_UP_MAX_USDC: Usdc = match Usdc::from_micros(100_000_000) {
    Some(amount) => amount,
    None => Usdc::ZERO,
};

/// A `settle: before` reserve waits this long unless configured: a few blocks of a chain
/// like Base (2 s each), and the ledger's retries of a node that does not answer at once.
pub const DEFAULT_SETTLE_TIMEOUT_MS: u64 = 15_000;

/// The x402 rules, how long a `settle: before` reserve may take, and the top-up path.
pub(super) fn validate_x402(
    x402: RawX402,
) -> Result<(X402Rules, Duration, Option<TopUp>), ConfigError> {
    let settings = OfferSettings {
        network: &x402.network,
        pay_to: &x402.pay_to,
        asset: x402.asset.as_deref(),
        asset_name: x402.asset_name.as_deref(),
        asset_version: x402.asset_version.as_deref(),
        max_timeout_seconds: x402.max_timeout_seconds,
    };
    let offer = Offer::from_settings(&settings)
        .map_err(|error| invalid(format!("x402.{}", error.field), error.message))?;
    let signature = if x402.verify_signatures { Signature::Verify } else { Signature::TermsOnly };
    let timeout = match x402.settle_timeout_ms.unwrap_or(DEFAULT_SETTLE_TIMEOUT_MS) {
        ms @ 1_000..=120_000 => Duration::from_millis(ms),
        _ => return Err(invalid("x402.settle_timeout_ms", "must be between 1000 and 120000")),
    };
    let top_up = match x402.top_up {
        None => None,
        Some(raw) => {
            if !raw.path.starts_with('/') || raw.path.contains(['?', '#']) {
                return Err(invalid("x402.top_up.path", "must be a path: /…, without ? or #"));
            }
            let min = raw.min_usdc.unwrap_or(DEFAULT_TOP_UP_MIN_USDC);
            let max = raw.max_usdc.unwrap_or(DEFAULT_TOP_UP_MAX_USDC);
            if min.is_zero() || max < min {
                return Err(invalid(
                    "x402.top_up.max_usdc",
                    "min_usdc must be greater than 0, and max_usdc at least min_usdc",
                ));
            }
            Some(TopUp { path: raw.path, min, max })
        }
    };
    Ok((X402Rules { offer, signature }, timeout, top_up))
}

pub(super) fn validate_pay_token(pay_token: RawPayToken) -> Result<PayTokenRules, ConfigError> {
    if pay_token.keys.is_empty() {
        return Err(invalid("pay_token.keys", "list at least one key"));
    }
    let mut keys: Vec<Key> = Vec::with_capacity(pay_token.keys.len());
    for (i, raw) in pay_token.keys.into_iter().enumerate() {
        let field = format!("pay_token.keys[{i}]");
        let duplicate_kid = keys.iter().any(|k| k.kid() == raw.kid.as_deref());
        if raw.kid.is_some() && duplicate_kid {
            return Err(invalid(format!("{field}.kid"), "is used by another key"));
        }
        let key = validate_key(&field, raw)?;
        keys.push(key);
    }
    Ok(PayTokenRules {
        keys,
        validation: Validation {
            issuer: pay_token.issuer,
            audience: pay_token.audience,
            leeway_seconds: pay_token.leeway_seconds.unwrap_or(DEFAULT_LEEWAY_SECONDS),
        },
        accept_sandbox: pay_token.accept_sandbox,
    })
}

/// An HS256 secret or an Ed25519 public JWK, with its `kid`.
fn validate_key(field: &str, raw: RawKey) -> Result<Key, ConfigError> {
    if raw.d.is_some() {
        return Err(invalid(
            format!("{field}.d"),
            "a private key: give the gateway the public JWK only (the ledger's /.well-known/jwks.json)",
        ));
    }
    let key = match (raw.secret, raw.kty) {
        (Some(secret), None) => {
            if raw.alg.as_deref() != Some("HS256") {
                return Err(invalid(
                    format!("{field}.alg"),
                    "must be HS256 for a secret (EdDSA keys are JWKs: kty, crv, x)",
                ));
            }
            if raw.crv.is_some() || raw.x.is_some() || raw.use_.is_some() {
                return Err(invalid(field, "give a secret or a JWK, not parts of both"));
            }
            // RFC 7518 §3.2: an HS256 key has at least 256 bits.
            if secret.chars().count() < MIN_HS256_SECRET_LEN {
                return Err(invalid(
                    format!("{field}.secret"),
                    format!(
                        "must be at least {MIN_HS256_SECRET_LEN} characters (RFC 7518: 256 bits)"
                    ),
                ));
            }
            Key::hs256(secret.into_bytes())
        }
        (None, Some(kty)) => {
            let jwk = Jwk {
                kty,
                crv: raw.crv.unwrap_or_default(),
                x: raw.x.unwrap_or_default(),
                d: None,
                kid: None,
                alg: raw.alg,
                use_: raw.use_,
            };
            jwk.verifying_key().map_err(|e| invalid(format!("{field}.{}", e.field), e.problem))?
        }
        (Some(_), Some(_)) => {
            return Err(invalid(field, "give a secret or a JWK, not parts of both"));
        }
        (None, None) if raw.alg.as_deref().is_some_and(|alg| alg != "HS256" && alg != "EdDSA") => {
            return Err(invalid(format!("{field}.alg"), "only HS256 and EdDSA are supported"));
        }
        (None, None) => {
            return Err(invalid(
                field,
                "give an HS256 secret (alg, secret) or an Ed25519 public JWK (kty, crv, x)",
            ));
        }
    };
    Ok(match raw.kid {
        Some(kid) => key.with_kid(kid),
        None => key,
    })
}

pub(super) fn validate_l402(
    service_id: &str,
    l402: RawL402,
) -> Result<(L402Rules, L402Offer), ConfigError> {
    if l402.secret.chars().count() < MIN_L402_SECRET_LEN {
        return Err(invalid(
            "l402.secret",
            format!("must be at least {MIN_L402_SECRET_LEN} characters"),
        ));
    }
    if !is_caveat_safe(service_id) {
        return Err(invalid(
            "service_id",
            "with l402, must be visible ASCII without , = : (it goes into macaroon caveats)",
        ));
    }
    if l402.budget_usdc.is_zero() {
        return Err(invalid("l402.budget_usdc", "must be greater than 0"));
    }
    // budget (micro-USDC) × sats per USDC = msat × 1000: round up to a whole msat.
    let amount_msat = u128::from(l402.budget_usdc.micros())
        .checked_mul(u128::from(l402.sats_per_usdc))
        .map(|micro_msat| micro_msat.div_ceil(1000))
        .and_then(|msat| u64::try_from(msat).ok())
        .filter(|msat| *msat > 0)
        .ok_or_else(|| {
            invalid("l402.sats_per_usdc", "must be greater than 0, and the invoice within range")
        })?;
    let valid_seconds = match l402.valid_seconds.unwrap_or(DEFAULT_L402_VALID_SECONDS) {
        seconds @ 1..=315_360_000 => seconds,
        _ => return Err(invalid("l402.valid_seconds", "must be between 1 and 315360000")),
    };
    let capabilities = l402.capabilities.unwrap_or_default();
    if let Some(bad) = capabilities.iter().position(|c| !is_caveat_safe(c)) {
        return Err(invalid(
            format!("l402.capabilities[{bad}]"),
            "must be 1 to 255 visible ASCII characters without , = :",
        ));
    }
    let offer = ChallengeRequest {
        service_id: service_id.to_owned(),
        budget_usdc: l402.budget_usdc,
        amount_msat,
        valid_seconds,
        capabilities,
        count: None,
    };
    let pool_capacity = match l402.challenge_pool.unwrap_or(DEFAULT_CHALLENGE_POOL) {
        capacity @ 0..=MAX_CHALLENGE_POOL => capacity,
        _ => {
            return Err(invalid(
                "l402.challenge_pool",
                format!("must be between 0 (off) and {MAX_CHALLENGE_POOL}"),
            ));
        }
    };
    let pool_max_age = MAX_POOL_AGE_SECONDS.min(valid_seconds / 10);
    // Strings, integers and amounts always serialize.
    let challenge_body = serde_json::to_vec(&offer).unwrap_or_default();
    let rules = L402Rules { secret: l402.secret.into_bytes(), accept_sandbox: l402.accept_sandbox };
    Ok((rules, L402Offer { offer, challenge_body, pool_capacity, pool_max_age }))
}

/// Every priced route answers a missing credential with the same L402 offer, so a buyer who
/// pays it must be able to call the route: the budget covers at least one call, and a
/// capability-restricted offer grants the route's capability.
pub(super) fn check_offer_opens_every_route(
    offer: &ChallengeRequest,
    routes: &[Route],
) -> Result<(), ConfigError> {
    for (i, route) in routes.iter().enumerate().filter(|(_, r)| !r.price.is_zero()) {
        if route.price > offer.budget_usdc {
            return Err(invalid(
                "l402.budget_usdc",
                format!(
                    "must cover one call of every priced route; routes[{i}] costs {}",
                    route.price
                ),
            ));
        }
        let granted = |c: &String| offer.capabilities.contains(c);
        if !offer.capabilities.is_empty() && !route.capability.as_ref().is_some_and(granted) {
            return Err(invalid(
                format!("routes[{i}].capability"),
                "must be one of l402.capabilities: a paid L402 credential could not call this route",
            ));
        }
    }
    Ok(())
}

/// Text that fits in a `condition=value[,value]` caveat.
pub(super) fn is_caveat_safe(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_ID_LEN
        && value.bytes().all(|b| b.is_ascii_graphic() && !b",=:".contains(&b))
}
