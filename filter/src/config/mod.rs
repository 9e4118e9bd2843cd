//! The filter's configuration: JSON, as the gateway hands it over (Envoy's `configuration`,
//! Kong's filter `config`, Istio's `pluginConfig`). Anything wrong is refused with the path
//! of the field at fault, and the gateway then refuses the configuration.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use paystile_protocol::credential::Verifier;
use paystile_protocol::ledger_api::{ChallengeRequest, MAX_HOLDS_PER_RESERVE};
use paystile_protocol::pay_token::{self, IdProblem, MAX_ID_LEN};
use paystile_protocol::x402::{Offer, Resource};
use paystile_protocol::{UnitPrice, Usdc};
use serde::Deserialize;

use crate::ledger::LedgerTarget;
use crate::routes::{self, Metered, PathMatch, Route, X402Terms};

mod credentials;

pub use credentials::TopUp;
use credentials::{
    RawL402, RawPayToken, RawX402, check_offer_opens_every_route, is_caveat_safe, validate_l402,
    validate_pay_token, validate_x402,
};

/// What the gateway's JSON says, before validation.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename = "the filter configuration")]
struct Raw {
    service_id: String,
    routes: Vec<RawRoute>,
    ledger: RawLedger,
    #[serde(default)]
    pay_token: Option<RawPayToken>,
    #[serde(default)]
    l402: Option<RawL402>,
    #[serde(default)]
    x402: Option<RawX402>,
    #[serde(default)]
    billable_statuses: Option<Vec<String>>,
    #[serde(default)]
    failure_mode: FailureMode,
    #[serde(default)]
    metrics: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename = "a route")]
struct RawRoute {
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    path_prefix: Option<String>,
    #[serde(default)]
    methods: Option<Vec<String>>,
    #[serde(default)]
    price_usdc: Option<Usdc>,
    #[serde(default)]
    metered: Option<RawMetered>,
    #[serde(default)]
    capability: Option<String>,
    #[serde(default)]
    settle: Option<Settle>,
}

/// When an x402 payment is settled on chain: after the upstream answered (the default:
/// the call is served at once, and the seller carries the risk that the payer's balance is
/// gone by then), or before the upstream is called.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Settle {
    #[default]
    After,
    Before,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename = "the metered pricing")]
struct RawMetered {
    max_usdc: Usdc,
    unit_price_usdc: UnitPrice,
    units_header: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename = "the ledger settings")]
struct RawLedger {
    upstream: String,
    #[serde(default)]
    authority: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    gateway_key: String,
    #[serde(default)]
    settle_interval_ms: Option<u64>,
    #[serde(default)]
    prefetch_holds: Option<u16>,
    #[serde(default)]
    prefetch_max_age_ms: Option<u64>,
}

/// What happens to a priced request when the ledger cannot be asked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    /// Refuse with 503 `ledger_unavailable` (the default: no unpaid call reaches the upstream).
    #[default]
    Closed,
    /// Let the request through unpaid.
    Open,
}

/// The statuses of upstream answers that are charged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Billable {
    classes: Vec<u16>,
    exact: Vec<u16>,
}

impl Billable {
    pub fn contains(&self, status: u16) -> bool {
        self.exact.contains(&status) || self.classes.contains(&(status / 100))
    }
}

/// What a 402 offers for L402, and how its challenges are minted ahead.
#[derive(Clone, Debug)]
pub struct L402Offer {
    pub offer: ChallengeRequest,
    /// `offer` as the ledger's challenge endpoint takes it, serialized once.
    pub challenge_body: Vec<u8>,
    /// The most challenges minted ahead per VM; 0: each 402 mints its own.
    pub pool_capacity: usize,
    /// Seconds a challenge minted ahead stays in the pool.
    pub pool_max_age: u64,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub service_id: String,
    pub routes: Vec<Route>,
    pub ledger: LedgerTarget,
    /// How credentials are verified: the schemes taken, with their keys and rules.
    pub verifier: Verifier,
    /// What a 402 offers for L402, when L402 is on.
    pub l402: Option<L402Offer>,
    /// The path that sells a prepaid balance and a Pay Token for x402, if any.
    pub top_up: Option<TopUp>,
    pub billable: Billable,
    pub failure_mode: FailureMode,
    /// Whether to report the filter's metrics through the host's metrics calls (see
    /// `metrics`). Off for Kong 3.4 to 3.7, whose ngx_wasm_module traps on them.
    pub metrics: bool,
}

/// A configuration the filter refuses, with the path of the field at fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() || self.field == "." {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError { field: field.into(), message: message.into() }
}

pub const DEFAULT_LEDGER_AUTHORITY: &str = "paystile-ledger";
pub const DEFAULT_LEDGER_TIMEOUT_MS: u64 = 1000;
pub const DEFAULT_SETTLE_INTERVAL_MS: u64 = 50;
pub const DEFAULT_PREFETCH_MAX_AGE_MS: u64 = 1000;
/// Holds a hot token's reserve asks for by default: its next calls then go on without a
/// ledger round trip, one call in sixteen waiting for the next batch (the pool is refilled
/// at half, early enough that 16 connections on one token rarely find it empty: with 16 a
/// batch, the calls that did reserved alone and the row ran 30 % slower). The revocation
/// watch keeps the kill switch instant (see `watch`).
pub const DEFAULT_PREFETCH_HOLDS: u16 = 32;
/// Prefetched holds must be used or released well within the ledger's hold TTL (a minute
/// by default), and live long enough to serve a hot token's next calls.
pub const PREFETCH_MAX_AGE_RANGE_MS: std::ops::RangeInclusive<u64> = 100..=10_000;
pub const DEFAULT_LEEWAY_SECONDS: u64 = 60;
/// Gateway keys shorter than this are refused, as the ledger refuses them.
pub const MIN_GATEWAY_KEY_LEN: usize = 16;
/// HS256 keys shorter than this are refused (RFC 7518 §3.2), as the ledger refuses them.
pub const MIN_HS256_SECRET_LEN: usize = 32;
/// L402 secrets shorter than this are refused, as the ledger refuses them.
pub const MIN_L402_SECRET_LEN: usize = 32;
/// A paid L402 credential stays valid for a day unless configured otherwise.
pub const DEFAULT_L402_VALID_SECONDS: u64 = 86_400;
/// L402 challenges minted ahead per VM, at most, unless configured otherwise.
pub const DEFAULT_CHALLENGE_POOL: usize = 1024;
pub const MAX_CHALLENGE_POOL: usize = 4096;
/// A challenge minted ahead is handed out within a minute, or a tenth of the credential's
/// validity if shorter: the validity (and the invoice's, at most an hour) counts from minting.
pub const MAX_POOL_AGE_SECONDS: u64 = 60;

impl Config {
    pub fn from_json(json: &[u8]) -> Result<Config, ConfigError> {
        // Derived `Deserialize` also reads a JSON array as a struct, field by field; a
        // configuration is objects, as the Kong schema says, so arrays there are refused.
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(json) {
            objects_where_expected(&value)?;
        }
        let deserializer = &mut serde_json::Deserializer::from_slice(json);
        let raw: Raw = serde_path_to_error::deserialize(deserializer).map_err(parse_error)?;
        Config::validate(raw)
    }

    fn validate(raw: Raw) -> Result<Config, ConfigError> {
        check_id("service_id", &raw.service_id)?;
        if raw.routes.is_empty() {
            return Err(invalid("routes", "list at least one route"));
        }
        let mut routes = raw
            .routes
            .into_iter()
            .enumerate()
            .map(|(i, route)| validate_route(&format!("routes[{i}]"), route))
            .collect::<Result<Vec<_>, _>>()?;

        let ledger = raw.ledger;
        if ledger.upstream.is_empty() {
            return Err(invalid(
                "ledger.upstream",
                "must name the ledger's cluster (Envoy) or host:port (Kong)",
            ));
        }
        let authority = ledger.authority.unwrap_or_else(|| DEFAULT_LEDGER_AUTHORITY.into());
        // It becomes a Host header; Kong writes it into the request line by line.
        if authority.is_empty() || !authority.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid("ledger.authority", "must be visible ASCII characters, no spaces"));
        }
        if ledger.gateway_key.chars().count() < MIN_GATEWAY_KEY_LEN
            || !ledger.gateway_key.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(invalid(
                "ledger.gateway_key",
                format!("must be at least {MIN_GATEWAY_KEY_LEN} printable ASCII characters"),
            ));
        }
        let timeout =
            milliseconds("ledger.timeout_ms", ledger.timeout_ms, DEFAULT_LEDGER_TIMEOUT_MS)?;
        let settle_interval = milliseconds(
            "ledger.settle_interval_ms",
            ledger.settle_interval_ms,
            DEFAULT_SETTLE_INTERVAL_MS,
        )?;
        let prefetch_holds = match ledger.prefetch_holds.unwrap_or(DEFAULT_PREFETCH_HOLDS) {
            holds @ 0..=MAX_HOLDS_PER_RESERVE => holds,
            _ => {
                return Err(invalid(
                    "ledger.prefetch_holds",
                    format!("must be between 0 (off) and {MAX_HOLDS_PER_RESERVE}"),
                ));
            }
        };
        let prefetch_max_age_ms = ledger.prefetch_max_age_ms.unwrap_or(DEFAULT_PREFETCH_MAX_AGE_MS);
        if !PREFETCH_MAX_AGE_RANGE_MS.contains(&prefetch_max_age_ms) {
            return Err(invalid(
                "ledger.prefetch_max_age_ms",
                format!(
                    "must be between {} and {}",
                    PREFETCH_MAX_AGE_RANGE_MS.start(),
                    PREFETCH_MAX_AGE_RANGE_MS.end()
                ),
            ));
        }

        if raw.pay_token.is_none() && raw.l402.is_none() && raw.x402.is_none() {
            return Err(invalid("pay_token", "configure pay_token, l402, x402, or several"));
        }
        let (x402, settle_first_timeout, top_up) = match raw.x402 {
            Some(raw) => {
                let (rules, timeout, top_up) = validate_x402(raw)?;
                offer_x402(&mut routes, &rules.offer);
                (Some(rules), timeout, top_up)
            }
            None => {
                if let Some(i) = routes.iter().position(|route| route.settle_before) {
                    return Err(invalid(
                        format!("routes[{i}].settle"),
                        "before settles x402 payments: configure x402",
                    ));
                }
                (None, Duration::ZERO, None)
            }
        };
        let pay_token = raw.pay_token.map(validate_pay_token).transpose()?;
        let l402 = raw.l402.map(|l402| validate_l402(&raw.service_id, l402)).transpose()?;
        if let Some((_, l402)) = &l402 {
            check_offer_opens_every_route(&l402.offer, &routes)?;
        }
        let (l402_rules, l402) = l402.unzip();

        let statuses = raw.billable_statuses.unwrap_or_else(|| vec!["2xx".into()]);
        let billable = parse_billable(&statuses)?;

        Ok(Config {
            service_id: raw.service_id,
            routes,
            ledger: LedgerTarget {
                upstream: ledger.upstream,
                authority,
                timeout,
                authorization: format!("Bearer {}", ledger.gateway_key),
                settle_interval,
                prefetch_holds,
                prefetch_max_age_ms,
                settle_first_timeout,
            },
            verifier: Verifier { pay_token, l402: l402_rules, x402 },
            l402,
            top_up,
            billable,
            failure_mode: raw.failure_mode,
            metrics: raw.metrics.unwrap_or(true),
        })
    }

    /// The route that prices this request, if any; `path` may carry a query.
    pub fn route(&self, method: &[u8], path: &[u8]) -> Option<&Route> {
        routes::find(&self.routes, method, path)
    }
}

/// Gives every fixed-price route its x402 terms: a metered call's price is known only once it
/// is served, and an x402 payment is of an exact amount.
fn offer_x402(routes: &mut [Route], offer: &Offer) {
    let no_resource = Resource { url: String::new(), description: None, mime_type: None };
    for route in routes.iter_mut().filter(|r| r.metered.is_none() && !r.price.is_zero()) {
        let amount = route.price.micros();
        route.x402 = Some(Arc::new(X402Terms {
            v2: offer.requirements(amount),
            v1: offer.requirements_v1(amount, &no_resource),
        }));
    }
}

/// Where the JSON could not be read, as `serde_path_to_error` shows it, except that a key that
/// could be a secret shows as `…`: JSON broken around a secret can turn the secret into a
/// key, and the gateway logs this error.
fn parse_error(error: serde_path_to_error::Error<serde_json::Error>) -> ConfigError {
    use fmt::Write;
    use serde_path_to_error::Segment;
    let mut message = error.inner().to_string();
    let mut field = String::new();
    for segment in error.path().iter() {
        let name = match segment {
            Segment::Seq { index } => {
                let _ = write!(field, "[{index}]");
                continue;
            }
            Segment::Map { key } | Segment::Enum { variant: key } => key.as_str(),
            Segment::Unknown => "?",
        };
        let shown = if name == "?" || is_field_name(name) {
            name
        } else {
            message = message.replace(&format!("`{name}`"), "`…`");
            "…"
        };
        if !field.is_empty() {
            field.push('.');
        }
        field.push_str(shown);
    }
    if field.is_empty() {
        field.push('.');
    }
    invalid(field, message)
}

/// A key that cannot be a whole secret (shorter than the shortest, the gateway key), or one
/// made of lowercase letters and `_`, as every long field name is (and its likely typos).
fn is_field_name(key: &str) -> bool {
    key.len() < MIN_GATEWAY_KEY_LEN || key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
}

/// The configuration's sections (and each route and key) are JSON objects.
fn objects_where_expected(config: &serde_json::Value) -> Result<(), ConfigError> {
    let must_be_object = |value: Option<&serde_json::Value>, field: &str| match value {
        Some(serde_json::Value::Array(_)) => {
            Err(invalid(field, "expected an object, not an array"))
        }
        _ => Ok(()),
    };
    must_be_object(Some(config), "")?;
    for section in ["ledger", "pay_token", "l402"] {
        must_be_object(config.get(section), section)?;
    }
    let items = |list: &str| config.pointer(list).and_then(|v| v.as_array()).cloned();
    for (i, route) in items("/routes").unwrap_or_default().iter().enumerate() {
        must_be_object(Some(route), &format!("routes[{i}]"))?;
        must_be_object(route.get("metered"), &format!("routes[{i}].metered"))?;
    }
    for (i, key) in items("/pay_token/keys").unwrap_or_default().iter().enumerate() {
        must_be_object(Some(key), &format!("pay_token.keys[{i}]"))?;
    }
    Ok(())
}

fn check_id(field: &str, id: &str) -> Result<(), ConfigError> {
    pay_token::check_id(id).map_err(|problem| match problem {
        IdProblem::Empty | IdProblem::TooLong => {
            invalid(field, format!("must be 1 to {MAX_ID_LEN} bytes"))
        }
        other => invalid(field, other.to_string()),
    })
}

fn validate_route(field: &str, route: RawRoute) -> Result<Route, ConfigError> {
    let (path, name) = match (route.path, route.path_prefix) {
        (Some(path), None) => (path, "path"),
        (None, Some(prefix)) => (prefix, "path_prefix"),
        _ => return Err(invalid(field, "give exactly one of path and path_prefix")),
    };
    if !path.starts_with('/') {
        return Err(invalid(format!("{field}.{name}"), "must start with /"));
    }
    let path = match name {
        "path" => PathMatch::Exact(path),
        _ => PathMatch::prefix(&path),
    };
    let methods = match route.methods {
        Some(methods) if methods.is_empty() => {
            return Err(invalid(
                format!("{field}.methods"),
                "list at least one method, or leave it out",
            ));
        }
        Some(methods) => {
            let token = |m: &String| !m.is_empty() && m.bytes().all(|b| b.is_ascii_alphabetic());
            if let Some(bad) = methods.iter().position(|m| !token(m)) {
                return Err(invalid(format!("{field}.methods[{bad}]"), "is not an HTTP method"));
            }
            Some(methods.into_iter().map(|m| m.to_ascii_uppercase()).collect())
        }
        None => None,
    };
    if route.capability.as_deref().is_some_and(|c| !is_caveat_safe(c)) {
        return Err(invalid(
            format!("{field}.capability"),
            "must be 1 to 255 visible ASCII characters without , = :",
        ));
    }
    let (price, metered) = match (route.price_usdc, route.metered) {
        (Some(price), None) => (price, None),
        (None, Some(metered)) => {
            let (max, metered) = validate_metered(&format!("{field}.metered"), metered)?;
            (max, Some(metered))
        }
        _ => return Err(invalid(field, "give exactly one of price_usdc and metered")),
    };
    let settle_before = route.settle.unwrap_or_default() == Settle::Before;
    if settle_before && metered.is_some() {
        return Err(invalid(
            format!("{field}.settle"),
            "before needs a fixed price: a metered call's price is known once it is served",
        ));
    }
    Ok(Route {
        path,
        methods,
        price,
        metered,
        capability: route.capability,
        x402: None,
        settle_before,
    })
}

/// The most a metered call holds, and how it is metered.
fn validate_metered(field: &str, metered: RawMetered) -> Result<(Usdc, Metered), ConfigError> {
    if metered.max_usdc.is_zero() {
        return Err(invalid(format!("{field}.max_usdc"), "must be greater than 0"));
    }
    if metered.unit_price_usdc.is_zero() {
        return Err(invalid(format!("{field}.unit_price_usdc"), "must be greater than 0"));
    }
    let header = &metered.units_header;
    // An RFC 9110 field name (a token); hosts give pseudo-headers (:status) a colon, which
    // a token cannot have.
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if header.is_empty() || header.len() > 255 || !header.bytes().all(tchar) {
        return Err(invalid(
            format!("{field}.units_header"),
            "must be an HTTP header name: 1 to 255 letters, digits or !#$%&'*+-.^_`|~",
        ));
    }
    Ok((
        metered.max_usdc,
        Metered { unit_price: metered.unit_price_usdc, units_header: header.to_ascii_lowercase() },
    ))
}

fn milliseconds(field: &str, value: Option<u64>, default: u64) -> Result<Duration, ConfigError> {
    match value.unwrap_or(default) {
        ms @ 1..=60_000 => Ok(Duration::from_millis(ms)),
        _ => Err(invalid(field, "must be between 1 and 60000")),
    }
}

fn parse_billable(statuses: &[String]) -> Result<Billable, ConfigError> {
    if statuses.is_empty() {
        return Err(invalid("billable_statuses", "list at least one status, or leave it out"));
    }
    let mut billable = Billable { classes: Vec::new(), exact: Vec::new() };
    for (i, status) in statuses.iter().enumerate() {
        let parsed = match status.strip_suffix("xx") {
            Some(class) if class.len() == 1 => class.parse().ok().filter(|c| (1..=5).contains(c)),
            Some(_) => None,
            None if status.len() == 3 => status.parse().ok().filter(|s| (100..=599).contains(s)),
            None => None,
        };
        match (parsed, status.ends_with("xx")) {
            (Some(class), true) => billable.classes.push(class),
            (Some(code), false) => billable.exact.push(code),
            (None, _) => {
                return Err(invalid(
                    format!("billable_statuses[{i}]"),
                    "expected a status (200) or a class (2xx)",
                ));
            }
        }
    }
    Ok(billable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn example() -> Value {
        json!({
            "service_id": "weather",
            "routes": [
                {"path_prefix": "/v1/forecast/free", "price_usdc": "0"},
                {"path_prefix": "/v1/forecast", "price_usdc": "0.001"},
                {"path": "/v1/report", "methods": ["post"], "price_usdc": "0.25"}
            ],
            "ledger": {"upstream": "paystile_ledger", "gateway_key": "gateway-key-0123456789"},
            "pay_token": {"keys": [{"alg": "HS256", "secret": "a-pay-token-secret-of-32-chars!!"}]}
        })
    }

    fn parse(json: &Value) -> Result<Config, ConfigError> {
        Config::from_json(json.to_string().as_bytes())
    }

    #[test]
    fn applies_defaults() {
        let config = parse(&example()).unwrap();
        assert_eq!(config.ledger.authority, "paystile-ledger");
        assert_eq!(config.ledger.timeout, Duration::from_millis(1000));
        assert_eq!(config.ledger.authorization, "Bearer gateway-key-0123456789");
        assert_eq!((config.ledger.prefetch_holds, config.ledger.prefetch_max_age_ms), (32, 1000));
        assert_eq!(config.verifier.pay_token.unwrap().validation.leeway_seconds, 60);
        assert!(config.l402.is_none());
        assert_eq!(config.failure_mode, FailureMode::Closed);
        assert!(config.billable.contains(200) && config.billable.contains(299));
        assert!(!config.billable.contains(304) && !config.billable.contains(500));
    }

    #[test]
    fn prefetching_takes_its_bounds() {
        let config = parse(&with(|c| {
            c["ledger"]["prefetch_holds"] = json!(64);
            c["ledger"]["prefetch_max_age_ms"] = json!(100);
        }))
        .unwrap();
        assert_eq!((config.ledger.prefetch_holds, config.ledger.prefetch_max_age_ms), (64, 100));
        let config = parse(&with(|c| c["ledger"]["prefetch_max_age_ms"] = json!(10_000))).unwrap();
        assert_eq!(config.ledger.prefetch_max_age_ms, 10_000);
    }

    #[test]
    fn the_first_matching_route_prices_the_request() {
        let config = parse(&example()).unwrap();
        let price = |method: &str, path: &str| {
            config.route(method.as_bytes(), path.as_bytes()).map(|r| r.price.to_string())
        };
        assert_eq!(price("GET", "/v1/forecast?city=Oslo").as_deref(), Some("0.001000"));
        assert_eq!(price("GET", "/v1/forecast/free/today").as_deref(), Some("0.000000"));
        assert_eq!(price("POST", "/v1/report").as_deref(), Some("0.250000"));
        assert_eq!(price("GET", "/v1/report"), None);
        assert_eq!(price("POST", "/v1/report/x"), None);
        assert_eq!(price("GET", "/healthz"), None);
        assert_eq!(
            config.route(b"GET", b"/v1/forecast/\xff").map(|r| r.price.micros()),
            Some(1000)
        );
        // A prefix ends at a path segment: a free prefix covers nothing beside it.
        assert_eq!(price("GET", "/v1/forecast/freedom").as_deref(), Some("0.001000"));
        assert_eq!(price("GET", "/v1/forecast/free").as_deref(), Some("0.000000"));
        assert_eq!(price("GET", "/v1/forecasts"), None);
        assert_eq!(config.route(b"GET", b"/v1/forecast\xff"), None);
    }

    #[test]
    fn matching_errs_towards_charging() {
        let config = parse(&example()).unwrap();
        let price = |method: &str, path: &str| {
            config.route(method.as_bytes(), path.as_bytes()).map(|r| r.price.to_string())
        };
        let report = Some("0.250000".to_owned());
        for path in [
            "/v1/report/",
            "/v1/report//",
            "/v1/report;jsessionid=1",
            "/V1/Report",
            "/v1;x/report;y/?q",
        ] {
            assert_eq!(price("POST", path), report, "{path}");
        }
        assert_eq!(price("post", "/v1/report"), report);
        assert_eq!(price("GET", "/v1/report/more"), None, "an exact route priced a longer path");
        assert_eq!(price("GET", "/V1/FORECAST/oslo;x=1").as_deref(), Some("0.001000"));
        assert_eq!(price("GET", "/v1/fore;x/cast"), None);
    }

    #[test]
    fn metered_routes_hold_their_maximum() {
        let mut json = example();
        json["routes"] = json!([{"path": "/v1/chat", "metered": {
            "max_usdc": "0.50", "unit_price_usdc": "0.00000015", "units_header": "X-Usage-Tokens"
        }}]);
        let config = parse(&json).unwrap();
        let route = config.route(b"POST", b"/v1/chat").unwrap();
        assert_eq!(route.price, "0.5".parse().unwrap());
        let metered = route.metered.as_ref().unwrap();
        assert_eq!(
            (metered.unit_price.picos(), metered.units_header.as_str()),
            (150_000, "x-usage-tokens")
        );
        assert_eq!(parse(&example()).unwrap().routes[1].metered, None);
    }

    #[test]
    fn get_routes_price_head_too() {
        let mut json = example();
        json["routes"] = json!([{"path": "/v1/report", "methods": ["GET"], "price_usdc": "1"}]);
        let config = parse(&json).unwrap();
        assert!(config.route(b"HEAD", b"/v1/report").is_some());
        assert!(config.route(b"OPTIONS", b"/v1/report").is_none());
        assert!(config.route(b"POST", b"/v1/report").is_none());
    }

    #[test]
    fn billable_statuses_take_codes_and_classes() {
        let mut json = example();
        json["billable_statuses"] = json!(["2xx", "304"]);
        let config = parse(&json).unwrap();
        assert!(config.billable.contains(201) && config.billable.contains(304));
        assert!(!config.billable.contains(302) && !config.billable.contains(404));
    }

    #[test]
    fn refusals_name_the_field() {
        let cases: Vec<(Value, &str)> = vec![
            (json!({"service_id": "x"}), "missing field `routes`"),
            (json!(null), "invalid type"),
            (json!(["weather", []]), "expected an object, not an array"),
            (
                with(|c| c["routes"][1] = json!([null, "/v1/forecast", null, "0.001"])),
                "routes[1]: expected an object",
            ),
            (with(|c| c["ledger"] = json!(["x"])), "ledger: expected an object"),
            (
                with(|c| c["pay_token"]["keys"][0] = json!(["k", "HS256", "x"])),
                "pay_token.keys[0]: expected an object",
            ),
            (with(|c| c["colour"] = json!(1)), "colour: unknown field `colour`"),
            // A key that may be a secret (broken JSON around one) is not repeated.
            (
                with(|c| c["ledger"]["gateway-key-0123456789"] = json!(1)),
                "ledger.…: unknown field `…`, expected one of",
            ),
            (with(|c| c["service_id"] = json!("")), "service_id: must be 1 to 255 bytes"),
            (with(|c| c["service_id"] = json!("..")), "service_id: must not be `.` or `..`"),
            (with(|c| c["routes"] = json!([])), "routes: list at least one route"),
            (
                with(|c| c["routes"][1]["price_usdc"] = json!("0.0000001")),
                "routes[1].price_usdc: amount has more than 6 decimals",
            ),
            (
                with(|c| c["routes"][1]["price_usdc"] = json!("-1")),
                "routes[1].price_usdc: amount is negative",
            ),
            (with(|c| c["routes"][2]["path"] = json!("v1")), "routes[2].path: must start with /"),
            (
                with(|c| c["routes"][2]["metered"] = metered(json!({}))),
                "routes[2]: give exactly one of price_usdc and metered",
            ),
            (
                with(|c| c["routes"][2]["price_usdc"] = json!(null)),
                "routes[2]: give exactly one of price_usdc and metered",
            ),
            (
                with(|c| {
                    c["routes"][2] = json!({"path": "/m", "metered": ["0.5", "0.1", "x-units"]})
                }),
                "routes[2].metered: expected an object",
            ),
            (
                with(|c| {
                    c["routes"][2] =
                        json!({"path": "/m", "metered": metered(json!({"max_usdc": "0"}))})
                }),
                "routes[2].metered.max_usdc: must be greater than 0",
            ),
            (
                with(|c| {
                    c["routes"][2] =
                        json!({"path": "/m", "metered": metered(json!({"max_usdc": "0.0000001"}))})
                }),
                "routes[2].metered.max_usdc: amount has more than 6 decimals",
            ),
            (
                with(|c| {
                    c["routes"][2] =
                        json!({"path": "/m", "metered": metered(json!({"unit_price_usdc": "-1"}))})
                }),
                "routes[2].metered.unit_price_usdc: amount is negative",
            ),
            (
                with(
                    |c| c["routes"][2] = json!({"path": "/m", "metered": metered(json!({"unit_price_usdc": "0.0000000000001"}))}),
                ),
                "routes[2].metered.unit_price_usdc: unit price has more than 12 decimals",
            ),
            (
                with(|c| {
                    c["routes"][2] =
                        json!({"path": "/m", "metered": metered(json!({"unit_price_usdc": "0"}))})
                }),
                "routes[2].metered.unit_price_usdc: must be greater than 0",
            ),
            (
                with(|c| {
                    c["routes"][2] = json!({"path": "/m", "metered": metered(json!({"units_header": ":status"}))})
                }),
                "routes[2].metered.units_header: must be an HTTP header name",
            ),
            (
                with(|c| {
                    c["routes"][2] =
                        json!({"path": "/m", "metered": metered(json!({"per": "token"}))})
                }),
                "routes[2].metered.per: unknown field `per`",
            ),
            (
                with(|c| c["routes"][2]["path_prefix"] = json!("/v1")),
                "routes[2]: give exactly one of path and path_prefix",
            ),
            (
                with(|c| c["routes"][2]["methods"] = json!(["GE T"])),
                "routes[2].methods[0]: is not an HTTP method",
            ),
            (
                with(|c| c["ledger"]["timeout_ms"] = json!(0)),
                "ledger.timeout_ms: must be between 1 and 60000",
            ),
            (
                with(|c| c["ledger"]["timeout_ms"] = json!("fast")),
                "ledger.timeout_ms: invalid type",
            ),
            (
                with(|c| c["ledger"]["prefetch_holds"] = json!(65)),
                "ledger.prefetch_holds: must be between 0 (off) and 64",
            ),
            (with(|c| c["ledger"]["prefetch_holds"] = json!(-1)), "ledger.prefetch_holds: invalid"),
            (
                with(|c| c["ledger"]["prefetch_max_age_ms"] = json!(99)),
                "ledger.prefetch_max_age_ms: must be between 100 and 10000",
            ),
            (
                with(|c| c["ledger"]["prefetch_max_age_ms"] = json!(10_001)),
                "ledger.prefetch_max_age_ms: must be between 100 and 10000",
            ),
            (
                with(|c| c["ledger"]["gateway_key"] = json!("short")),
                "ledger.gateway_key: must be at least 16",
            ),
            (with(|c| c["ledger"]["upstream"] = json!("")), "ledger.upstream: must name"),
            (
                with(|c| c["ledger"]["authority"] = json!("ledger\r\nx-injected: 1")),
                "ledger.authority: must be visible ASCII",
            ),
            (with(|c| c["pay_token"]["keys"] = json!([])), "pay_token.keys: list at least one key"),
            (
                with(|c| c["pay_token"] = json!(null)),
                "pay_token: configure pay_token, l402, x402, or several",
            ),
            (
                with(|c| c["l402"] = l402(json!({"secret": "short"}))),
                "l402.secret: must be at least 32",
            ),
            (
                with(|c| c["l402"] = l402(json!({"budget_usdc": "0"}))),
                "l402.budget_usdc: must be greater than 0",
            ),
            (
                with(|c| c["l402"] = l402(json!({"sats_per_usdc": 0}))),
                "l402.sats_per_usdc: must be greater than 0",
            ),
            (
                with(|c| {
                    c["l402"] =
                        l402(json!({"sats_per_usdc": u64::MAX, "budget_usdc": "9000000000000"}))
                }),
                "l402.sats_per_usdc: must be greater than 0, and the invoice within range",
            ),
            (
                with(|c| c["l402"] = l402(json!({"capabilities": ["read", "a,b"]}))),
                "l402.capabilities[1]: must be 1 to 255",
            ),
            (
                with(|c| c["l402"] = l402(json!({"valid_seconds": 0}))),
                "l402.valid_seconds: must be between",
            ),
            (
                with(|c| c["l402"] = l402(json!({"challenge_pool": 4097}))),
                "l402.challenge_pool: must be between 0 (off) and 4096",
            ),
            (with(|c| c["l402"] = l402(json!({"challenge_pool": -1}))), "l402.challenge_pool"),
            (
                with(|c| {
                    c["l402"] = l402(json!({}));
                    c["service_id"] = json!("a:b");
                }),
                "service_id: with l402, must be visible ASCII",
            ),
            (
                with(|c| c["routes"][0]["capability"] = json!("")),
                "routes[0].capability: must be 1 to 255",
            ),
            (
                with(|c| c["l402"] = l402(json!({"budget_usdc": "0.1"}))),
                "l402.budget_usdc: must cover one call of every priced route; routes[2] costs 0.250000",
            ),
            (
                with(|c| {
                    c["l402"] = l402(json!({"budget_usdc": "1", "capabilities": ["forecasts"]}))
                }),
                "routes[1].capability: must be one of l402.capabilities",
            ),
            (
                with(|c| c["pay_token"]["keys"][0]["alg"] = json!("none")),
                "pay_token.keys[0].alg: must be HS256 for a secret",
            ),
            (
                with(|c| c["pay_token"]["keys"][0] = json!({"alg": "RS256"})),
                "pay_token.keys[0].alg: only HS256 and EdDSA are supported",
            ),
            (
                with(|c| c["pay_token"]["keys"][0] = json!({"kid": "a"})),
                "pay_token.keys[0]: give an HS256 secret (alg, secret) or an Ed25519 public JWK",
            ),
            (
                with(|c| c["pay_token"]["keys"][0] = ed25519(json!({"d": "secret-seed"}))),
                "pay_token.keys[0].d: a private key",
            ),
            (
                with(|c| c["pay_token"]["keys"][0] = ed25519(json!({"kty": "RSA"}))),
                "pay_token.keys[0].kty: must be \"OKP\"",
            ),
            (
                with(|c| c["pay_token"]["keys"][0] = ed25519(json!({"crv": "Ed448"}))),
                "pay_token.keys[0].crv: must be \"Ed25519\"",
            ),
            (
                with(|c| c["pay_token"]["keys"][0] = ed25519(json!({"alg": "HS256"}))),
                "pay_token.keys[0].alg: must be \"EdDSA\"",
            ),
            (
                with(|c| c["pay_token"]["keys"][0] = ed25519(json!({"x": "AAAA"}))),
                "pay_token.keys[0].x: must be 32 bytes",
            ),
            (
                with(|c| c["pay_token"]["keys"][0] = ed25519(json!({"secret": "s".repeat(40)}))),
                "pay_token.keys[0]: give a secret or a JWK, not parts of both",
            ),
            (
                with(|c| c["pay_token"]["keys"][0]["secret"] = json!("s".repeat(31))),
                "pay_token.keys[0].secret: must be at least 32 characters",
            ),
            (
                with(|c| c["billable_statuses"] = json!(["2xx", "600"])),
                "billable_statuses[1]: expected a status",
            ),
            (
                with(|c| c["failure_mode"] = json!("sideways")),
                "failure_mode: unknown variant `sideways`",
            ),
        ];
        for (json, expected) in cases {
            let error = parse(&json).unwrap_err().to_string();
            assert!(error.starts_with(expected), "{json}: got {error:?}, expected {expected:?}");
        }
        let keys = json!([
            {"kid": "a", "alg": "HS256", "secret": "a-pay-token-secret-of-32-chars!1"},
            {"kid": "a", "alg": "HS256", "secret": "a-pay-token-secret-of-32-chars!2"}
        ]);
        let error =
            parse(&with(|c| c["pay_token"]["keys"] = keys.clone())).unwrap_err().to_string();
        assert_eq!(error, "pay_token.keys[1].kid: is used by another key");
        assert!(Config::from_json(b"\xff\xfe").is_err());
    }

    /// An Ed25519 public JWK (RFC 8037 A.2) with `changes` applied.
    fn ed25519(changes: Value) -> Value {
        let mut jwk = json!({"kty": "OKP", "crv": "Ed25519", "kid": "2026-12",
            "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "alg": "EdDSA", "use": "sig"});
        for (key, value) in changes.as_object().unwrap() {
            jwk[key] = value.clone();
        }
        jwk
    }

    #[test]
    fn pay_token_keys_are_hs256_secrets_or_ed25519_public_jwks() {
        let json = with(|c| {
            c["pay_token"]["keys"] = json!([
                ed25519(json!({})),
                {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
                {"kid": "hs", "alg": "HS256", "secret": "a-pay-token-secret-of-32-chars!!"}
            ]);
        });
        let keys = parse(&json).unwrap().verifier.pay_token.unwrap().keys;
        assert_eq!(keys.len(), 3);
        assert_eq!(keys[0].kid(), Some("2026-12"));
        assert!(keys[0].ed25519_public().is_some() && keys[1].ed25519_public().is_some());
        assert!(keys[2].ed25519_public().is_none());
        // A private JWK's `d` is refused without being repeated.
        let private =
            with(|c| c["pay_token"]["keys"][0] = ed25519(json!({"d": "c2VjcmV0LXNlZWQ"})));
        assert!(!parse(&private).unwrap_err().to_string().contains("c2VjcmV0"));
    }

    /// A valid `metered` section with `changes` applied.
    fn metered(changes: Value) -> Value {
        let mut metered =
            json!({"max_usdc": "0.5", "unit_price_usdc": "0.000002", "units_header": "x-units"});
        for (key, value) in changes.as_object().unwrap() {
            metered[key] = value.clone();
        }
        metered
    }

    /// A valid `l402` section with `changes` applied.
    fn l402(changes: Value) -> Value {
        let mut l402 = json!({
            "secret": "an-l402-secret-of-32-characters!",
            "budget_usdc": "0.05",
            "sats_per_usdc": 1000
        });
        for (key, value) in changes.as_object().unwrap() {
            l402[key] = value.clone();
        }
        l402
    }

    #[test]
    fn l402_offers_the_configured_budget_at_the_configured_rate() {
        let json = with(|c| {
            c["routes"] = json!([{"path": "/a", "price_usdc": "0.000001"}]);
            c["l402"] = l402(json!({"budget_usdc": "0.000001", "sats_per_usdc": 1500}));
        });
        let offer = parse(&json).unwrap().l402.unwrap().offer;
        // 1 micro-USDC at 1500 sat/USDC is 1.5 msat: rounded up, never given away.
        assert_eq!(offer.amount_msat, 2);
        assert_eq!(offer.valid_seconds, DEFAULT_L402_VALID_SECONDS);
        let pool = |json: &Value| {
            let l402 = parse(json).unwrap().l402.unwrap();
            (l402.pool_capacity, l402.pool_max_age)
        };
        assert_eq!(pool(&json), (DEFAULT_CHALLENGE_POOL, MAX_POOL_AGE_SECONDS));
        let mut off = json.clone();
        off["l402"]["challenge_pool"] = json!(0);
        assert_eq!(pool(&off), (0, MAX_POOL_AGE_SECONDS));
        // Under ten seconds of validity, a pooled challenge would go out too close to it.
        let mut brief = json.clone();
        brief["l402"]["challenge_pool"] = json!(8);
        brief["l402"]["valid_seconds"] = json!(9);
        assert_eq!(pool(&brief), (8, 0));
        let json = with(|c| {
            c["pay_token"] = json!(null);
            c["routes"] = json!([
                {"path": "/free", "price_usdc": "0"},
                {"path": "/a", "price_usdc": "0.01", "capability": "read"}
            ]);
            c["l402"] = l402(json!({"capabilities": ["read"], "valid_seconds": 60}));
        });
        let config = parse(&json).unwrap();
        assert!(config.verifier.pay_token.is_none());
        assert!(
            !config.verifier.l402.unwrap().accept_sandbox,
            "sandbox credentials are refused unless asked for"
        );
        let l402 = config.l402.unwrap();
        assert_eq!((l402.offer.amount_msat, l402.offer.valid_seconds), (50_000, 60));
        assert_eq!(l402.offer.capabilities, ["read"]);
        let body: Value = serde_json::from_slice(&l402.challenge_body).unwrap();
        assert_eq!(body["budgetUsdc"], "0.050000");
        assert_eq!(body.get("count"), None, "a 402 of its own asks for one challenge");
        // A minute-long credential: pooled challenges go within a tenth of it.
        assert_eq!((l402.pool_capacity, l402.pool_max_age), (DEFAULT_CHALLENGE_POOL, 6));
        assert!(!format!("{l402:?}").contains("32-characters"), "the secret leaks into Debug");
    }

    fn with(change: impl FnOnce(&mut Value)) -> Value {
        let mut json = example();
        change(&mut json);
        json
    }
}
