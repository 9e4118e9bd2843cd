//! What the gate's inline work costs per request, natively: route match, credential
//! verification and the ledger call's body. `cargo bench -p paystile-filter --bench gate`
//! prints nanoseconds per request for each path (the median of 15 runs of 20,000 requests).
//! In the gateway the same code runs as wasm, in V8, at a few times these figures.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;
use std::time::Instant;

use paystile_filter::config::Config;
use paystile_filter::gate::{Exchange, Gate, RequestAction, RequestHead};
use paystile_protocol::jws::Key;
use paystile_protocol::l402::{self, Identifier, Offer};
use paystile_protocol::pay_token::{self, PayTokenClaims, Scope};
use sha2::{Digest, Sha256};

const NOW: u64 = 1_900_000_000;
const NOW_MS: u64 = NOW * 1000;
const TOKEN_SECRET: &str = "bench-token-secret-0123456789abcdef";
const L402_SECRET: &str = "bench-l402-secret-of-32-characters";

fn gate() -> Gate {
    let config = serde_json::json!({
        "service_id": "weather",
        "routes": [{"path_prefix": "/v1/forecast", "price_usdc": "0.001"}],
        "ledger": {"upstream": "paystile_ledger", "gateway_key": "gateway-key-0123456789"},
        "pay_token": {"keys": [{"alg": "HS256", "secret": TOKEN_SECRET}]},
        "l402": {"secret": L402_SECRET, "budget_usdc": "1", "sats_per_usdc": 1000}
    });
    Gate::new(Config::from_json(config.to_string().as_bytes()).unwrap())
}

fn pay_token() -> String {
    let claims = PayTokenClaims {
        sub: "agent-1".into(),
        jti: "tok_0123456789abcdef0123456789abcdef".into(),
        service_id: Some("weather".into()),
        limit_usdc: "5".parse().unwrap(),
        scope: Scope::Single,
        buyer_tag: None,
        exp: NOW + 3600,
        iat: Some(NOW),
        nbf: None,
        iss: Some("paystile".into()),
        aud: None,
        sandbox: false,
    };
    format!("Bearer {}", pay_token::sign(&claims, &Key::hs256(TOKEN_SECRET)))
}

fn l402_credential() -> String {
    let preimage = [7u8; 32];
    let identifier =
        Identifier { payment_hash: Sha256::digest(preimage).into(), token_id: [9; 32] };
    let offer = Offer {
        service_id: "weather".into(),
        valid_until: NOW + 3600,
        budget: "1".parse().unwrap(),
        capabilities: vec![],
        sandbox: false,
    };
    let macaroon = l402::mint(L402_SECRET.as_bytes(), &identifier, &offer);
    format!("L402 {}:{}", l402::encode_macaroon(&macaroon), hex::encode(preimage))
}

/// Median nanoseconds per request of `authorization` through the gate, checking that every
/// request took the expected path.
fn measure(gate: &Gate, authorization: Option<&str>, expect_ledger_call: bool) -> u128 {
    const REQUESTS: u32 = 20_000;
    let request = RequestHead {
        method: b"GET",
        path: b"/v1/forecast/oslo?days=3",
        authorization: authorization.map(str::as_bytes),
        idempotency_key: Some(b"order-42"),
    };
    let mut runs: Vec<u128> = (0..15)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..REQUESTS {
                let action =
                    Exchange::default().on_request_headers(gate, black_box(&request), NOW_MS);
                assert_eq!(matches!(action, RequestAction::CallLedger(_)), expect_ledger_call);
                black_box(action);
            }
            start.elapsed().as_nanos() / u128::from(REQUESTS)
        })
        .collect();
    runs.sort_unstable();
    runs[runs.len() / 2]
}

fn main() {
    let gate = gate();
    let pay_token = pay_token();
    let l402 = l402_credential();
    let mut bad = pay_token.clone();
    bad.pop();
    bad.push('A');
    println!("{:<44} {:>8}", "path (inline work in the gate)", "ns/req");
    for (name, authorization, calls_ledger) in [
        ("no credential (L402 challenge to mint)", None, true),
        ("Pay Token: verify, reserve body", Some(pay_token.as_str()), true),
        ("L402: verify, reserve body", Some(l402.as_str()), true),
        ("Pay Token with a bad signature: 401", Some(bad.as_str()), false),
    ] {
        println!("{name:<44} {:>8}", measure(&gate, authorization, calls_ledger));
    }
}
