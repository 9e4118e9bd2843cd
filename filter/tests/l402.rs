//! The gate's L402 paths: challenges minted by the ledger, credentials verified inline,
//! budgets metered like Pay Tokens, and a fresh challenge when a budget is spent.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use paystile_filter::answer::HeaderEdit;
use paystile_filter::config::Config;
use paystile_filter::gate::{Exchange, Gate, RequestAction, RequestHead};
use paystile_filter::ledger::LedgerReply;
use paystile_filter::pool::RefillOutcome;
use paystile_protocol::ErrorCode;
use paystile_protocol::l402::{self, Identifier, Offer};
use paystile_protocol::ledger_api::{ChallengeRequest, ReserveRequest};
use paystile_protocol::macaroon::Macaroon;
use proptest::prelude::*;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::{answered, head};

const L402_SECRET: &str = "an-l402-secret-of-32-characters!";
const NOW: u64 = 1_900_000_000;
const NOW_MS: u64 = NOW * 1000;
const PREIMAGE: [u8; 32] = [5; 32];

fn config_json() -> Value {
    json!({
        "service_id": "weather",
        "routes": [
            {"path": "/v1/report", "price_usdc": "0.01", "capability": "reports"},
            {"path_prefix": "/v1/forecast", "price_usdc": "0.001"}
        ],
        "ledger": {"upstream": "paystile_ledger", "gateway_key": "gateway-key-0123456789"},
        "pay_token": {"keys": [{"alg": "HS256", "secret": "pay-token-secret-0123456789abcdef"}]},
        "l402": {"secret": L402_SECRET, "budget_usdc": "0.05", "sats_per_usdc": 1000}
    })
}

fn gate_with(change: impl FnOnce(&mut Value)) -> Gate {
    let mut json = config_json();
    change(&mut json);
    Gate::new(Config::from_json(json.to_string().as_bytes()).unwrap())
}

fn gate() -> Gate {
    gate_with(|_| {})
}

fn identifier() -> Identifier {
    Identifier { payment_hash: Sha256::digest(PREIMAGE).into(), token_id: [3; 32] }
}

fn offer() -> Offer {
    Offer {
        service_id: "weather".into(),
        valid_until: NOW + 3_600,
        budget: "0.05".parse().unwrap(),
        capabilities: vec![],
        sandbox: false,
    }
}

fn macaroon(offer: &Offer) -> Macaroon {
    l402::mint(L402_SECRET.as_bytes(), &identifier(), offer)
}

fn credential(macaroon: &Macaroon, preimage: &[u8; 32]) -> String {
    format!("L402 {}:{}", l402::encode_macaroon(macaroon), hex::encode(preimage))
}

fn paid() -> String {
    credential(&macaroon(&offer()), &PREIMAGE)
}

fn challenges(headers: &[(&'static str, String)]) -> Vec<String> {
    headers.iter().filter(|(name, _)| *name == "www-authenticate").map(|(_, v)| v.clone()).collect()
}

fn challenge_reply() -> LedgerReply {
    let body = json!({
        "tokenId": format!("l402_{}", "07".repeat(32)),
        "macaroon": "AgEIcGF5c3RpbGU+/w==",
        "invoice": "lnbcrt500n1pjexample",
        "paymentHash": "ab".repeat(32),
        "budgetUsdc": "0.05",
        "amountMsat": 50000,
        "validUntil": NOW + 86_400,
        "sandbox": true
    });
    LedgerReply { status: Some(200), body: body.to_string().into_bytes() }
}

/// The ledger call `action` makes, checked to go to `path`.
fn ledger_call(action: &RequestAction, path: &str) -> Vec<u8> {
    match action {
        RequestAction::CallLedger(call) => {
            assert_eq!(call.path, path);
            call.body.clone()
        }
        other => panic!("expected a call to {path}, got {other:?}"),
    }
}

fn reserve(gate: &Gate, exchange: &mut Exchange, authorization: &str) -> ReserveRequest {
    let action =
        exchange.on_request_headers(gate, &head("/v1/forecast", Some(authorization)), NOW_MS);
    serde_json::from_slice(&ledger_call(&action, "/v1/holds")).unwrap()
}

fn refusal(gate: &Gate, path: &str, authorization: &str) -> (u16, ErrorCode) {
    let action =
        Exchange::default().on_request_headers(gate, &head(path, Some(authorization)), NOW_MS);
    let (status, body, _) = answered(&action);
    (status, body.code)
}

#[test]
fn no_credential_gets_a_minted_l402_challenge_first_and_last_around_the_bearer_one() {
    let gate = gate();
    let mut exchange = Exchange::default();
    let action = exchange.on_request_headers(&gate, &head("/v1/forecast", None), NOW_MS);
    let offer: ChallengeRequest =
        serde_json::from_slice(&ledger_call(&action, "/v1/l402/challenges")).unwrap();
    assert_eq!(offer.service_id, "weather");
    assert_eq!(offer.budget_usdc, "0.05".parse().unwrap());
    assert_eq!(offer.amount_msat, 50_000);

    let (status, body, headers) = answered(&exchange.on_ledger_reply(&gate, challenge_reply()));
    assert_eq!((status, body.code), (402, ErrorCode::PaymentRequired));
    assert_eq!(body.schemes, ["L402", "Bearer"]);
    assert_eq!(body.price, Some("0.001".parse().unwrap()));
    assert!(body.sandbox, "a sandbox invoice says so");
    let l402 = r#"L402 macaroon="AgEIcGF5c3RpbGU+/w==", invoice="lnbcrt500n1pjexample""#;
    let bearer = r#"Bearer realm="paystile", error="payment_required""#;
    assert_eq!(challenges(&headers), [l402, bearer, l402]);
    // Whichever way a client reads the fields, it finds the L402 challenge, and Bearer too.
    let fields = challenges(&headers);
    let joined = fields.join(", ");
    let readings = [fields[0].clone(), fields[fields.len() - 1].clone(), joined.clone()];
    for reading in readings {
        let (macaroon, invoice) = l402::parse_challenge(&reading).unwrap();
        assert_eq!((macaroon, invoice), ("AgEIcGF5c3RpbGU+/w==", "lnbcrt500n1pjexample"));
    }
    assert!(joined.contains("Bearer realm=\"paystile\""));
    assert_eq!(exchange.on_ledger_reply(&gate, challenge_reply()), RequestAction::Nothing);
}

#[test]
fn without_a_minted_challenge_pay_tokens_are_still_offered() {
    let both = gate();
    let l402_only = gate_with(|c| c["pay_token"] = json!(null));
    let mut unsafe_invoice: Value = serde_json::from_slice(&challenge_reply().body).unwrap();
    unsafe_invoice["invoice"] = json!("lnbc\r\nx-injected: 1");
    for reply in [
        LedgerReply { status: None, body: vec![] },
        LedgerReply { status: Some(504), body: vec![] },
        LedgerReply {
            status: Some(404),
            body: br#"{"error":"L402 is off","code":"not_found"}"#.to_vec(),
        },
        LedgerReply { status: Some(200), body: b"{}".to_vec() },
        LedgerReply { status: Some(200), body: unsafe_invoice.to_string().into_bytes() },
    ] {
        let mut exchange = Exchange::default();
        exchange.on_request_headers(&both, &head("/v1/forecast", None), NOW_MS);
        let (status, body, headers) = answered(&exchange.on_ledger_reply(&both, reply.clone()));
        assert_eq!((status, body.code), (402, ErrorCode::PaymentRequired));
        assert_eq!(body.schemes, ["Bearer"]);
        assert_eq!(challenges(&headers), [r#"Bearer realm="paystile", error="payment_required""#]);

        let mut exchange = Exchange::default();
        exchange.on_request_headers(&l402_only, &head("/v1/forecast", None), NOW_MS);
        let (status, body, headers) = answered(&exchange.on_ledger_reply(&l402_only, reply));
        assert_eq!((status, body.code), (503, ErrorCode::LedgerUnavailable), "nothing to pay with");
        assert!(headers.contains(&("retry-after", "1".into())));
    }
}

#[test]
fn sandbox_credentials_pass_only_where_accepted() {
    let sandboxed = macaroon(&Offer { sandbox: true, ..offer() });
    let authorization = credential(&sandboxed, &PREIMAGE);
    assert_eq!(
        refusal(&gate(), "/v1/forecast", &authorization),
        (401, ErrorCode::InvalidCredential)
    );
    let demo = gate_with(|c| c["l402"]["accept_sandbox"] = json!(true));
    let sandbox = reserve(&demo, &mut Exchange::default(), &authorization);
    // The ledger verifies it again, and meters it in its sandbox book.
    assert_eq!(sandbox.credential.as_bytes(), authorization.as_bytes());
    let real = reserve(&demo, &mut Exchange::default(), &paid());
    assert_eq!(real.credential.as_bytes(), paid().as_bytes());
}

#[test]
fn a_paid_l402_reserves_its_budget_and_loses_its_credential_upstream() {
    let gate = gate();
    let mut exchange = Exchange::default();
    let reserve = reserve(&gate, &mut exchange, &paid());
    // The credential itself goes to the ledger, which verifies it before it spends.
    assert_eq!(reserve.credential.as_bytes(), paid().as_bytes());
    assert_eq!(reserve.service_id, "weather");
    assert_eq!(reserve.price_usdc, "0.001".parse().unwrap());
    let hold = json!({"chargeId": "ch_1", "amountUsdc": "0.001", "remainingUsdc": "0.049", "replayed": false});
    let action = exchange.on_ledger_reply(
        &gate,
        LedgerReply { status: Some(200), body: hold.to_string().into_bytes() },
    );
    assert_eq!(
        action,
        RequestAction::Forward(vec![
            HeaderEdit::Remove("authorization"),
            HeaderEdit::Set("x-charge-id", "ch_1".into())
        ])
    );
    let step = exchange.on_response_headers(&gate, Some(200), None);
    assert!(step.edits.contains(&HeaderEdit::Set("x-amount-usdc", "0.001000".into())));
    assert!(step.settlement.is_some());
}

#[test]
fn every_spelling_of_the_credential_is_read() {
    let gate = gate();
    let binary = macaroon(&offer()).to_binary();
    let url_safe = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&binary);
    let preimage = hex::encode(PREIMAGE);
    for authorization in [
        format!("L402 {}:{preimage}", STANDARD.encode(&binary)),
        format!("LSAT {}:{preimage}", STANDARD.encode(&binary)),
        format!("l402   {url_safe}:{}  ", preimage.to_uppercase()),
    ] {
        let reserve = reserve(&gate, &mut Exchange::default(), &authorization);
        assert_eq!(reserve.credential.as_bytes(), authorization.as_bytes(), "{authorization}");
    }
}

#[test]
fn refusals_have_the_statuses_of_the_contract() {
    let gate = gate();
    let m = macaroon(&offer());
    assert_eq!(
        refusal(&gate, "/v1/forecast", &credential(&m, &[6; 32])),
        (401, ErrorCode::InvalidPreimage)
    );
    let mut tampered = m.to_binary();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let tampered = format!("L402 {}:{}", STANDARD.encode(&tampered), hex::encode(PREIMAGE));
    assert_eq!(refusal(&gate, "/v1/forecast", &tampered), (401, ErrorCode::InvalidCredential));
    let foreign = l402::mint(b"another secret of 32 characters!", &identifier(), &offer());
    assert_eq!(
        refusal(&gate, "/v1/forecast", &credential(&foreign, &PREIMAGE)),
        (401, ErrorCode::InvalidCredential)
    );
    let maps = macaroon(&Offer { service_id: "maps".into(), ..offer() });
    assert_eq!(
        refusal(&gate, "/v1/forecast", &credential(&maps, &PREIMAGE)),
        (403, ErrorCode::WrongService)
    );
    let expired = macaroon(&Offer { valid_until: NOW - 1, ..offer() });
    assert_eq!(
        refusal(&gate, "/v1/forecast", &credential(&expired, &PREIMAGE)),
        (401, ErrorCode::TokenExpired)
    );
    // A macaroon limited to capabilities opens only the routes that name one of them.
    let readonly = macaroon(&Offer { capabilities: vec!["forecasts".into()], ..offer() });
    assert_eq!(
        refusal(&gate, "/v1/report", &credential(&readonly, &PREIMAGE)),
        (403, ErrorCode::WrongService)
    );
    let reports = macaroon(&Offer { capabilities: vec!["reports".into()], ..offer() });
    let action = Exchange::default().on_request_headers(
        &gate,
        &head("/v1/report", Some(&credential(&reports, &PREIMAGE))),
        NOW_MS,
    );
    ledger_call(&action, "/v1/holds");
}

#[test]
fn a_spent_l402_budget_is_answered_with_a_fresh_challenge() {
    let gate = gate();
    let mut exchange = Exchange::default();
    reserve(&gate, &mut exchange, &paid());
    let spent = json!({"error": "Token limit exceeded", "code": "token_limit_exceeded", "used": "0.05", "reserved": "0", "limit": "0.05", "price": "0.001"});
    let action = exchange.on_ledger_reply(
        &gate,
        LedgerReply { status: Some(402), body: spent.to_string().into_bytes() },
    );
    ledger_call(&action, "/v1/l402/challenges");
    let (status, body, headers) = answered(&exchange.on_ledger_reply(&gate, challenge_reply()));
    assert_eq!((status, body.code), (402, ErrorCode::TokenLimitExceeded));
    assert_eq!(body.used, Some("0.05".parse().unwrap()));
    assert!(challenges(&headers)[0].starts_with("L402 macaroon="));

    // A Pay Token at its cap gets its 402 at once: buying L402 budget would not raise it.
    let mut exchange = Exchange::default();
    let token = pay_token();
    exchange.on_request_headers(&gate, &head("/v1/forecast", Some(&token)), NOW_MS);
    let action = exchange.on_ledger_reply(
        &gate,
        LedgerReply { status: Some(402), body: spent.to_string().into_bytes() },
    );
    let (status, _, headers) = answered(&action);
    assert_eq!(status, 402);
    assert_eq!(challenges(&headers), [r#"Bearer realm="paystile", error="payment_required""#]);
}

/// `count` distinct challenges, `lnbcrt<i>`, as the ledger answers a refill.
fn batch_reply(count: usize) -> LedgerReply {
    let challenges: Vec<Value> = (0..count)
        .map(|i| {
            json!({
                "tokenId": format!("l402_{i:064x}"), "macaroon": format!("AgE{i}="),
                "invoice": format!("lnbcrt{i}"), "paymentHash": "ab".repeat(32),
                "budgetUsdc": "0.05", "amountMsat": 50000, "validUntil": NOW + 86_400,
                "sandbox": false
            })
        })
        .collect();
    let body = json!({ "challenges": challenges }).to_string().into_bytes();
    LedgerReply { status: Some(200), body }
}

/// One 402 minted by the ledger for its own request (the pool is empty), then the refill
/// that 402 calls for, answered with `count` challenges.
fn fill(gate: &Gate, count: usize) {
    let mut exchange = Exchange::default();
    let action = exchange.on_request_headers(gate, &head("/v1/forecast", None), NOW_MS);
    ledger_call(&action, "/v1/l402/challenges");
    exchange.on_ledger_reply(gate, challenge_reply());
    let refill = gate.next_refill(NOW_MS).expect("a refill after a 402");
    let asked: ChallengeRequest = serde_json::from_slice(&refill.call.body).unwrap();
    assert_eq!(asked.count, Some(1), "one 402 seen: one challenge");
    assert_eq!(
        ChallengeRequest { count: None, ..asked },
        gate.config().l402.as_ref().unwrap().offer
    );
    let outcome = gate.on_refill_reply(refill.id, &batch_reply(count), NOW_MS);
    assert_eq!(outcome, RefillOutcome::Filled { added: count });
}

#[test]
fn a_pooled_challenge_answers_the_402_without_the_ledger_and_only_once() {
    let gate = gate();
    fill(&gate, 1);
    let action = Exchange::default().on_request_headers(&gate, &head("/v1/forecast", None), NOW_MS);
    let (status, body, headers) = answered(&action);
    assert_eq!((status, body.code), (402, ErrorCode::PaymentRequired));
    assert_eq!(body.schemes, ["L402", "Bearer"]);
    assert!(!body.sandbox);
    let l402 = r#"L402 macaroon="AgE0=", invoice="lnbcrt0""#;
    assert_eq!(
        challenges(&headers),
        [l402, r#"Bearer realm="paystile", error="payment_required""#, l402]
    );
    // Taken: the next 402 has the ledger mint its own, as with no pool.
    let mut exchange = Exchange::default();
    let action = exchange.on_request_headers(&gate, &head("/v1/forecast", None), NOW_MS);
    ledger_call(&action, "/v1/l402/challenges");
    let (_, _, headers) = answered(&exchange.on_ledger_reply(&gate, challenge_reply()));
    assert!(challenges(&headers)[0].contains("lnbcrt500n1pjexample"));
}

#[test]
fn a_spent_l402_budget_takes_its_fresh_challenge_from_the_pool() {
    let gate = gate();
    fill(&gate, 1);
    let mut exchange = Exchange::default();
    reserve(&gate, &mut exchange, &paid());
    let spent = json!({"error": "Token limit exceeded", "code": "token_limit_exceeded", "used": "0.05", "reserved": "0", "limit": "0.05", "price": "0.001"});
    let action = exchange.on_ledger_reply(
        &gate,
        LedgerReply { status: Some(402), body: spent.to_string().into_bytes() },
    );
    let (status, body, headers) = answered(&action);
    assert_eq!((status, body.code), (402, ErrorCode::TokenLimitExceeded));
    assert_eq!(challenges(&headers)[0], r#"L402 macaroon="AgE0=", invoice="lnbcrt0""#);
}

#[test]
fn a_pool_turned_off_or_without_l402_never_refills() {
    let off = gate_with(|c| c["l402"]["challenge_pool"] = json!(0));
    let bearer_only = gate_with(|c| c["l402"] = json!(null));
    for gate in [off, bearer_only] {
        for _ in 0..20 {
            Exchange::default().on_request_headers(&gate, &head("/v1/forecast", None), NOW_MS);
        }
        assert_eq!(gate.next_refill(NOW_MS), None);
    }
}

fn pay_token() -> String {
    use paystile_protocol::jws::SigningKey;
    use paystile_protocol::pay_token::{self, PayTokenClaims};
    let claims = PayTokenClaims {
        sub: "agent".into(),
        exp: NOW + 60,
        iat: None,
        iss: None,
        ..support::claims("tok_1", "0.05", NOW)
    };
    format!(
        "Bearer {}",
        pay_token::sign(&claims, &SigningKey::hs256("pay-token-secret-0123456789abcdef"))
    )
}

#[test]
fn each_scheme_is_offered_and_accepted_only_when_configured() {
    let l402_only = gate_with(|c| c["pay_token"] = json!(null));
    let mut exchange = Exchange::default();
    exchange.on_request_headers(&l402_only, &head("/v1/forecast", Some(&pay_token())), NOW_MS);
    let (_, body, headers) = answered(&exchange.on_ledger_reply(&l402_only, challenge_reply()));
    assert_eq!(body.schemes, ["L402"]);
    assert_eq!(challenges(&headers).len(), 1);

    let bearer_only = gate_with(|c| c["l402"] = json!(null));
    let action = Exchange::default().on_request_headers(
        &bearer_only,
        &head("/v1/forecast", Some(&paid())),
        NOW_MS,
    );
    let (status, body, headers) = answered(&action);
    assert_eq!((status, body.code), (402, ErrorCode::PaymentRequired));
    assert_eq!(body.schemes, ["Bearer"]);
    assert_eq!(challenges(&headers), [r#"Bearer realm="paystile", error="payment_required""#]);
}

/// Valid macaroon bytes, broken in the ways a hostile client might: cut short, bytes
/// changed, huge varints and lengths spliced in, garbage appended.
fn mangled_macaroon() -> impl Strategy<Value = Vec<u8>> {
    let good = macaroon(&offer()).to_binary();
    let len = good.len();
    prop_oneof![
        (0..len).prop_map({
            let good = good.clone();
            move |cut| good[..cut].to_vec()
        }),
        (0..len, 1..=255u8).prop_map({
            let good = good.clone();
            move |(at, flip)| {
                let mut bytes = good.clone();
                bytes[at] ^= flip;
                bytes
            }
        }),
        (0..len, prop::collection::vec(0x80..=0xffu8, 1..12)).prop_map({
            let good = good.clone();
            move |(at, varint)| {
                let mut bytes = good.clone();
                bytes.splice(at..at, varint);
                bytes
            }
        }),
        prop::collection::vec(any::<u8>(), 0..64)
            .prop_map(move |tail| [good.clone(), tail].concat()),
        prop::collection::vec(any::<u8>(), 0..600),
    ]
}

proptest! {
    #[test]
    fn mangled_macaroons_are_always_401(bytes in mangled_macaroon(), url_safe in any::<bool>()) {
        // The location is not signed: a macaroon changed only there is still the credential.
        let parts = |m: Macaroon| (m.identifier().to_vec(), m.caveats().to_vec(), *m.signature());
        let good = parts(macaroon(&offer()));
        prop_assume!(Macaroon::from_binary(&bytes).map(parts).ok() != Some(good));
        let encoded = if url_safe {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&bytes)
        } else {
            STANDARD.encode(&bytes)
        };
        let authorization = format!("L402 {encoded}:{}", hex::encode(PREIMAGE));
        let (status, code) = refusal(&gate(), "/v1/forecast", &authorization);
        prop_assert_eq!(status, 401, "{:?}", code);
    }

    #[test]
    fn any_bytes_after_the_scheme_are_401(
        scheme in prop::sample::select(vec!["L402", "LSAT", "l402"]),
        rest in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let authorization = [scheme.as_bytes(), b" ", &rest].concat();
        let request = RequestHead { authorization: Some(&authorization), ..head("/v1/forecast", None) };
        let action = Exchange::default().on_request_headers(&gate(), &request, NOW_MS);
        let (status, _, _) = answered(&action);
        prop_assert_eq!(status, 401);
    }
}

#[test]
fn a_verified_l402_is_kept_only_for_the_capability_it_was_checked_for() {
    let gate = gate();
    let reports = credential(
        &macaroon(&Offer { capabilities: vec!["reports".into()], ..offer() }),
        &PREIMAGE,
    );
    for _ in 0..2 {
        let action = Exchange::default().on_request_headers(
            &gate,
            &head("/v1/report", Some(&reports)),
            NOW_MS,
        );
        ledger_call(&action, "/v1/holds");
    }
    assert_eq!(gate.verified_credentials(), 1);
    assert_eq!(refusal(&gate, "/v1/forecast", &reports), (403, ErrorCode::WrongService));
    // Kept through its last valid second, not after.
    let end_ms = (NOW + 3_600) * 1000;
    let action = Exchange::default().on_request_headers(
        &gate,
        &head("/v1/report", Some(&reports)),
        end_ms + 999,
    );
    ledger_call(&action, "/v1/holds");
    let action = Exchange::default().on_request_headers(
        &gate,
        &head("/v1/report", Some(&reports)),
        end_ms + 1000,
    );
    assert_eq!(answered(&action).1.code, ErrorCode::TokenExpired);
}
