//! Fuzz target for the filter's configuration parser: arbitrary bytes, and structure-aware
//! mutations of a configuration that uses every setting. The answer is a `ConfigError` that
//! names a field and never repeats a secret (the gateway logs it), or a configuration the
//! gate runs requests through.
//!
//! CI runs `CI_CASES` cases of each; `PROPTEST_CASES=1000000 cargo test --release -p
//! paystile-filter --test fuzz` runs a long pass (see README, "Fuzzing").
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use paystile_filter::config::Config;
use paystile_filter::gate::{Exchange, Gate, RequestHead};
use paystile_protocol::jws::SigningKey;
use paystile_protocol::pay_token::{self, PayTokenClaims, Scope};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use serde_json::{Value, json};

/// Cases per target when `PROPTEST_CASES` is not set: a few seconds in all, for CI.
const CI_CASES: u32 = 1_000;
const TOKEN_SECRET: &str = "fuzz-token-secret-0123456789abcdef";
const NOW: u64 = 1_900_000_000;

fn proptest_config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok());
    ProptestConfig { cases: cases.unwrap_or(CI_CASES), ..ProptestConfig::default() }
}

/// Every setting the filter has, valid.
fn full_config() -> Value {
    json!({
        "service_id": "weather",
        "routes": [
            {"path": "/v1/forecast/free", "price_usdc": "0"},
            {"path_prefix": "/v1/forecast", "methods": ["GET", "POST"], "price_usdc": "0.001", "capability": "forecast"},
            {"path_prefix": "/v1/llm", "capability": "llm", "metered": {"max_usdc": "0.5", "unit_price_usdc": "0.000002", "units_header": "x-units"}}
        ],
        "ledger": {
            "upstream": "paystile_ledger",
            "authority": "ledger.internal",
            "timeout_ms": 800,
            "gateway_key": "fuzz-gateway-key-0123456789",
            "settle_interval_ms": 50
        },
        "pay_token": {
            "keys": [
                {"kid": "k1", "alg": "HS256", "secret": TOKEN_SECRET},
                {"alg": "HS256", "secret": "fuzz-older-token-secret-0123456789"}
            ],
            "issuer": "paystile",
            "audience": "weather-api",
            "leeway_seconds": 30,
            "accept_sandbox": true
        },
        "l402": {
            "secret": "fuzz-l402-secret-0123456789abcdef",
            "budget_usdc": "1",
            "sats_per_usdc": 1000,
            "valid_seconds": 3600,
            "capabilities": ["forecast", "llm"],
            "accept_sandbox": false
        },
        "billable_statuses": ["2xx", "304"],
        "failure_mode": "closed"
    })
}

/// The JSON pointers of the secrets in a configuration.
const SECRETS: &[&str] = &[
    "/ledger/gateway_key",
    "/pay_token/keys/0/secret",
    "/pay_token/keys/1/secret",
    "/l402/secret",
];

const FIELD_NAMES: &[&str] = &[
    "service_id",
    "routes",
    "ledger",
    "pay_token",
    "l402",
    "billable_statuses",
    "failure_mode",
    "path",
    "path_prefix",
    "methods",
    "price_usdc",
    "metered",
    "capability",
    "max_usdc",
    "unit_price_usdc",
    "units_header",
    "upstream",
    "authority",
    "timeout_ms",
    "gateway_key",
    "settle_interval_ms",
    "keys",
    "kid",
    "alg",
    "secret",
    "issuer",
    "audience",
    "leeway_seconds",
    "accept_sandbox",
    "budget_usdc",
    "sats_per_usdc",
    "valid_seconds",
    "capabilities",
];

/// Any JSON value, with the strings and numbers a configuration is made of.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        prop::sample::select(vec![
            "",
            "0",
            "0.001",
            "1",
            "-1",
            "1e3",
            "0.0000001",
            "0.000000000001",
            "18446744073709.551615",
            "18446744073709.551616",
            "2xx",
            "5xx",
            "200",
            "999",
            "1xx",
            "HS256",
            "none",
            "open",
            "closed",
            "GET",
            "get",
            "/",
            "/v1",
            "/v1/forecast",
            "x-units",
            "forecast",
            "a,b",
            "key=value",
            "weather",
            "ledger",
            "   ",
        ])
        .prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
        "[ -~]{30,40}".prop_map(Value::from),
        "x{250,260}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(
                prop_oneof![prop::sample::select(FIELD_NAMES).prop_map(str::to_owned), ".{0,8}"],
                inner,
                0..4
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A change at some node of the configuration's tree (picked by index, modulo their count).
#[derive(Clone, Debug)]
enum Edit {
    Replace(usize, Value),
    Remove(usize),
    /// Adds a field to an object, or an element to an array.
    Add(usize, String, Value),
    /// Repeats an array's first element.
    Repeat(usize),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let name = prop_oneof![prop::sample::select(FIELD_NAMES).prop_map(str::to_owned), ".{0,8}"];
    let edit = prop_oneof![
        3 => (any::<usize>(), json_value()).prop_map(|(at, v)| Edit::Replace(at, v)),
        2 => any::<usize>().prop_map(Edit::Remove),
        2 => (any::<usize>(), name, json_value()).prop_map(|(at, n, v)| Edit::Add(at, n, v)),
        1 => any::<usize>().prop_map(Edit::Repeat),
    ];
    prop::collection::vec(edit, 1..5)
}

/// Every node's JSON pointer, the root first.
fn pointers(value: &Value, at: String, out: &mut Vec<String>) {
    out.push(at.clone());
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                pointers(child, format!("{at}/{}", key.replace('~', "~0").replace('/', "~1")), out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                pointers(child, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

fn apply(config: &mut Value, edits: &[Edit]) {
    for edit in edits {
        let mut all = Vec::new();
        pointers(config, String::new(), &mut all);
        let pick = |at: usize| all[at % all.len()].clone();
        match edit {
            Edit::Replace(at, value) => {
                if let Some(node) = config.pointer_mut(&pick(*at)) {
                    *node = value.clone();
                }
            }
            Edit::Remove(at) => {
                let pointer = pick(*at);
                let Some((parent, last)) = pointer.rsplit_once('/') else { continue };
                let last = last.replace("~1", "/").replace("~0", "~");
                match config.pointer_mut(parent) {
                    Some(Value::Object(map)) => {
                        map.remove(&last);
                    }
                    Some(Value::Array(items)) => {
                        if let Ok(i) = last.parse::<usize>() {
                            items.remove(i);
                        }
                    }
                    _ => {}
                }
            }
            Edit::Add(at, name, value) => match config.pointer_mut(&pick(*at)) {
                Some(Value::Object(map)) => {
                    map.insert(name.clone(), value.clone());
                }
                Some(Value::Array(items)) => items.push(value.clone()),
                _ => {}
            },
            Edit::Repeat(at) => {
                if let Some(Value::Array(items)) = config.pointer_mut(&pick(*at))
                    && let Some(first) = items.first().cloned()
                {
                    items.push(first);
                }
            }
        }
    }
}

/// A byte-level change to the serialized configuration.
#[derive(Clone, Debug)]
enum Mutation {
    Flip(usize, u8),
    Delete(usize),
    Insert(usize, u8),
    Truncate(usize),
}

fn mutate(mut input: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for mutation in mutations {
        let len = input.len();
        match *mutation {
            Mutation::Flip(at, x) if len > 0 => input[at % len] ^= x,
            Mutation::Delete(at) if len > 0 => {
                input.remove(at % len);
            }
            Mutation::Insert(at, byte) => input.insert(at % (len + 1), byte),
            Mutation::Truncate(at) => input.truncate(at % (len + 1)),
            _ => {}
        }
    }
    input
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    let mutation = prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(at, x)| Mutation::Flip(at, x)),
        any::<usize>().prop_map(Mutation::Delete),
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Mutation::Insert(at, b)),
        any::<usize>().prop_map(Mutation::Truncate),
    ];
    prop::collection::vec(mutation, 1..6)
}

fn bearer() -> String {
    let claims = PayTokenClaims {
        sub: "agent-1".into(),
        jti: "tok_fuzz".into(),
        service_id: Some("weather".into()),
        limit_usdc: "1".parse().unwrap(),
        scope: Scope::Single,
        buyer_tag: None,
        exp: NOW + 600,
        iat: Some(NOW),
        nbf: None,
        iss: Some("paystile".into()),
        aud: None,
        sandbox: false,
    };
    format!("Bearer {}", pay_token::sign(&claims, &SigningKey::hs256(TOKEN_SECRET).with_kid("k1")))
}

/// The parser's answer to `json`, checked: a refusal that names what is wrong without
/// repeating a secret of `config` (when it is JSON), or a configuration the gate runs.
fn check(json: &[u8], config: Option<&Value>) -> Result<(), TestCaseError> {
    match Config::from_json(json) {
        Ok(parsed) => {
            prop_assert!(!parsed.routes.is_empty());
            let gate = Gate::new(parsed);
            let bearer = bearer();
            for (method, path) in [
                (&b"GET"[..], &b"/v1/forecast/oslo?x=1"[..]),
                (b"POST", b"/v1/llm/chat"),
                (b"DELETE", b"//v1/%2e%2e/forecast"),
                (b"\xff", b"\x00\xff"),
            ] {
                for authorization in
                    [None, Some(bearer.as_bytes()), Some(b"L402 AgE:00".as_slice())]
                {
                    let request = RequestHead {
                        method,
                        path,
                        authorization,
                        idempotency_key: Some(b"k-1"),
                        ..RequestHead::default()
                    };
                    let _ = Exchange::default().on_request_headers(&gate, &request, NOW * 1000);
                }
            }
        }
        Err(error) => {
            let message = error.to_string();
            prop_assert!(!error.message.is_empty());
            let secrets = SECRETS.iter().filter_map(|p| config?.pointer(p)?.as_str());
            for secret in secrets.filter(|s| s.len() >= 8) {
                prop_assert!(!message.contains(secret), "a secret in {message:?}");
            }
        }
    }
    Ok(())
}

#[test]
fn the_full_configuration_is_valid() {
    Config::from_json(full_config().to_string().as_bytes()).unwrap();
}

proptest! {
    #![proptest_config(proptest_config())]

    /// Any bytes: refused with a typed error, or a configuration the gate runs.
    #[test]
    fn any_bytes_get_an_answer(json in prop::collection::vec(any::<u8>(), 0..400)) {
        check(&json, None)?;
    }

    /// Any JSON document.
    #[test]
    fn any_json_gets_an_answer(value in json_value()) {
        check(value.to_string().as_bytes(), Some(&value))?;
    }

    /// The full configuration with fields replaced, removed, added or repeated anywhere.
    #[test]
    fn edited_configurations_get_an_answer(edits in edits()) {
        let mut config = full_config();
        apply(&mut config, &edits);
        check(config.to_string().as_bytes(), Some(&config))?;
    }

    /// The full configuration's text with bytes changed.
    #[test]
    fn mangled_configuration_text_gets_an_answer(mutations in mutations(), pretty in any::<bool>()) {
        let config = full_config();
        let text = if pretty { serde_json::to_vec_pretty(&config) } else { serde_json::to_vec(&config) };
        check(&mutate(text.unwrap(), &mutations), Some(&config))?;
    }
}
