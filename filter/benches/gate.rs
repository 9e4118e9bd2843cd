//! What the gate's inline work costs per request, natively: route match, credential
//! verification and the ledger call's body, or the 402 with a challenge from the pool (and,
//! apart, what the pool's refill costs per challenge). `cargo bench -p paystile-filter --bench
//! gate` prints nanoseconds per request for each path (the median of 15 runs of 20,000
//! requests). In the gateway the same code runs as wasm, in V8, at a few times these figures.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;
use std::time::Instant;

use paystile_filter::config::Config;
use paystile_filter::gate::{Exchange, Gate, RequestAction, RequestHead};
use paystile_filter::ledger::LedgerReply;
use paystile_filter::pool::{MAX_BATCH, RefillOutcome};
use paystile_protocol::jwk::Jwk;
use paystile_protocol::jws::SigningKey;
use paystile_protocol::l402::{self, Identifier, Offer};
use paystile_protocol::pay_token::{self, PayTokenClaims, Scope};
use sha2::{Digest, Sha256};

const NOW: u64 = 1_900_000_000;
const NOW_MS: u64 = NOW * 1000;
const TOKEN_SECRET: &str = "bench-token-secret-0123456789abcdef";
const L402_SECRET: &str = "bench-l402-secret-of-32-characters";

/// The seed of the bench's Ed25519 Pay Token key.
const ED25519_SEED: [u8; 32] = [5; 32];

const CONFIG: &str = r#"{
    "service_id": "weather",
    "routes": [{"path_prefix": "/v1/forecast", "price_usdc": "0.001"}],
    "ledger": {"upstream": "paystile_ledger", "gateway_key": "gateway-key-0123456789"},
    "pay_token": {"keys": [{"alg": "HS256", "secret": "bench-token-secret-0123456789abcdef"}]},
    "l402": {"secret": "bench-l402-secret-of-32-characters", "budget_usdc": "1", "sats_per_usdc": 1000}
}"#;

fn gate() -> Gate {
    let mut config: serde_json::Value = serde_json::from_str(CONFIG).unwrap();
    let public = Jwk::public(&SigningKey::ed25519(&ED25519_SEED).verifying_key()).unwrap();
    config["pay_token"]["keys"].as_array_mut().unwrap().push(serde_json::to_value(public).unwrap());
    Gate::new(Config::from_json(config.to_string().as_bytes()).unwrap())
}

fn pay_token() -> String {
    signed(&SigningKey::hs256(TOKEN_SECRET))
}

fn eddsa_pay_token() -> String {
    signed(&SigningKey::ed25519(&ED25519_SEED))
}

fn signed(key: &SigningKey) -> String {
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
    format!("Bearer {}", pay_token::sign(&claims, key))
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

const REQUESTS: u32 = 20_000;

fn request(authorization: Option<&str>) -> RequestHead<'_> {
    RequestHead {
        method: b"GET",
        path: b"/v1/forecast/oslo?days=3",
        authorization: authorization.map(str::as_bytes),
        idempotency_key: Some(b"order-42"),
        ..RequestHead::default()
    }
}

fn median(mut runs: Vec<u128>) -> u128 {
    runs.sort_unstable();
    runs[runs.len() / 2]
}

/// Median nanoseconds per request of `authorization` through the gate, checking that every
/// request took the expected path.
fn measure(gate: &Gate, authorization: Option<&str>, expect_ledger_call: bool) -> u128 {
    let request = request(authorization);
    median(
        (0..15)
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
            .collect(),
    )
}

/// A refill's answer: `MAX_BATCH` challenges of a real macaroon's size and a sandbox
/// invoice's length.
fn batch_reply() -> LedgerReply {
    let challenges: Vec<_> = (0..MAX_BATCH)
        .map(|i| {
            let identifier = Identifier { payment_hash: [1; 32], token_id: [i as u8; 32] };
            let offer = Offer {
                service_id: "weather".into(),
                valid_until: NOW + 86_400,
                budget: "1".parse().unwrap(),
                capabilities: vec![],
                sandbox: true,
            };
            let macaroon = l402::mint(L402_SECRET.as_bytes(), &identifier, &offer);
            serde_json::json!({
                "tokenId": format!("l402_{}", hex::encode([i as u8; 32])),
                "macaroon": l402::encode_macaroon(&macaroon),
                "invoice": format!("lnbcrt1m1{}", "q".repeat(380)),
                "paymentHash": "01".repeat(32), "budgetUsdc": "1", "amountMsat": 100_000_000,
                "validUntil": NOW + 86_400, "sandbox": true
            })
        })
        .collect();
    let body = serde_json::json!({ "challenges": challenges }).to_string().into_bytes();
    LedgerReply { status: Some(200), body }
}

/// Median nanoseconds per 402 answered from the pool, and per challenge refilled: the
/// pool is refilled with `MAX_BATCH` between timed stretches of as many 402s.
fn measure_pooled(gate: &Gate) -> (u128, u128) {
    let request = request(None);
    let reply = batch_reply();
    // 402s the pool had nothing for: the demand its refills follow.
    for _ in 0..4 * MAX_BATCH {
        Exchange::default().on_request_headers(gate, &request, NOW_MS);
    }
    let (mut answering, mut refilling) = (Vec::new(), Vec::new());
    for _ in 0..15 {
        let (mut answered, mut refilled) = (0, 0);
        for _ in 0..REQUESTS as usize / MAX_BATCH {
            let refill = gate.next_refill(NOW_MS).unwrap();
            assert_eq!(refill.count, MAX_BATCH);
            let start = Instant::now();
            let outcome = gate.on_refill_reply(refill.id, black_box(&reply), NOW_MS);
            refilled += start.elapsed().as_nanos();
            assert_eq!(outcome, RefillOutcome::Filled { added: MAX_BATCH });
            let start = Instant::now();
            for _ in 0..MAX_BATCH {
                let action =
                    Exchange::default().on_request_headers(gate, black_box(&request), NOW_MS);
                assert!(matches!(action, RequestAction::Respond(_)));
                black_box(action);
            }
            answered += start.elapsed().as_nanos();
        }
        let count = (REQUESTS as usize / MAX_BATCH * MAX_BATCH) as u128;
        answering.push(answered / count);
        refilling.push(refilled / count);
    }
    (median(answering), median(refilling))
}

fn main() {
    let gate = gate();
    let pay_token = pay_token();
    let eddsa = eddsa_pay_token();
    let l402 = l402_credential();
    // A character of the signature changed: a bad signature, never cached, so verified in
    // full each time.
    let forged = |token: &str| {
        let mut bytes = token.as_bytes().to_vec();
        let at = bytes.len() - 10;
        bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
        String::from_utf8(bytes).unwrap()
    };
    let (bad, bad_eddsa) = (forged(&pay_token), forged(&eddsa));
    println!("{:<44} {:>8}", "path (inline work in the gate)", "ns/req");
    let (pooled, refill) = measure_pooled(&gate);
    println!("{:<44} {pooled:>8}", "no credential: 402 with a pooled challenge");
    println!("{:<44} {refill:>8}", "  its refill (per challenge, apart)");
    let unpooled = {
        let mut config: serde_json::Value = serde_json::from_str(CONFIG).unwrap();
        config["l402"]["challenge_pool"] = serde_json::json!(0);
        Gate::new(Config::from_json(config.to_string().as_bytes()).unwrap())
    };
    println!(
        "{:<44} {:>8}",
        "no credential, pool off (challenge to mint)",
        measure(&unpooled, None, true)
    );
    for (name, authorization, calls_ledger) in [
        ("Pay Token: verify, reserve body", Some(pay_token.as_str()), true),
        ("EdDSA Pay Token: verify, reserve body", Some(eddsa.as_str()), true),
        ("L402: verify, reserve body", Some(l402.as_str()), true),
        ("Pay Token with a bad signature: 401", Some(bad.as_str()), false),
        ("EdDSA Pay Token, bad signature: 401", Some(bad_eddsa.as_str()), false),
    ] {
        println!("{name:<44} {:>8}", measure(&gate, authorization, calls_ledger));
    }
}
