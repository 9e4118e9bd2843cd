//! Every path through the gate, natively: the decisions the wasm filter makes in a gateway.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use paystile_filter::answer::HeaderEdit;
use paystile_filter::config::Config;
use paystile_filter::gate::{Exchange, Gate, RequestAction, RequestHead};
use paystile_filter::ledger::LedgerReply;
use paystile_protocol::jws::SigningKey;
use paystile_protocol::ledger_api::{Outcome, ReserveRequest};
use paystile_protocol::pay_token::{self, PayTokenClaims, Scope};
use paystile_protocol::{ErrorBody, ErrorCode, Usdc};
use proptest::prelude::*;
use serde_json::{Value, json};
use support::{answered, head};

const SECRET: &str = "gate-test-secret-0123456789abcdef";
const NOW: u64 = 1_900_000_000;
const NOW_MS: u64 = NOW * 1000;

fn config_json() -> Value {
    json!({
        "service_id": "weather",
        "routes": [
            {"path": "/v1/forecast/free", "price_usdc": "0"},
            {"path_prefix": "/v1/forecast", "price_usdc": "0.001"}
        ],
        "ledger": {"upstream": "paystile_ledger", "gateway_key": "gateway-key-0123456789"},
        "pay_token": {"keys": [{"alg": "HS256", "secret": SECRET}]}
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

fn claims() -> PayTokenClaims {
    support::claims("tok_1", "0.01", NOW)
}

fn bearer(claims: &PayTokenClaims) -> String {
    format!("Bearer {}", pay_token::sign(claims, &SigningKey::hs256(SECRET)))
}

fn refusal(gate: &Gate, authorization: &str) -> (u16, ErrorCode) {
    let action = Exchange::default().on_request_headers(
        gate,
        &head("/v1/forecast", Some(authorization)),
        NOW_MS,
    );
    let (status, body, _) = answered(&action);
    (status, body.code)
}

fn reserve(gate: &Gate, exchange: &mut Exchange, request: &RequestHead<'_>) -> ReserveRequest {
    match exchange.on_request_headers(gate, request, NOW_MS) {
        RequestAction::CallLedger(call) => {
            assert_eq!(call.path, "/v1/holds");
            serde_json::from_slice(&call.body).unwrap()
        }
        other => panic!("expected a ledger call, got {other:?}"),
    }
}

fn hold_reply(charge_id: &str, replayed: bool) -> LedgerReply {
    let body = json!({"chargeId": charge_id, "amountUsdc": "0.001", "remainingUsdc": "0.009", "replayed": replayed});
    LedgerReply { status: Some(200), body: body.to_string().into_bytes() }
}

/// An exchange that reached the upstream with a hold on `charge_id`.
fn admitted(gate: &Gate, charge_id: &str) -> Exchange {
    let mut exchange = Exchange::default();
    let token = bearer(&claims());
    reserve(gate, &mut exchange, &head("/v1/forecast", Some(&token)));
    let action = exchange.on_ledger_reply(gate, hold_reply(charge_id, false));
    assert_eq!(
        action,
        RequestAction::Forward(vec![
            HeaderEdit::Remove("authorization"),
            HeaderEdit::Set("x-charge-id", charge_id.into())
        ])
    );
    exchange
}

#[test]
fn unpriced_and_free_routes_pass_with_only_a_spoofed_charge_id_removed() {
    let gate = gate();
    for path in ["/healthz", "/v1/forecast/free", "/v1/forecast/free?x=1"] {
        let mut exchange = Exchange::default();
        let action =
            exchange.on_request_headers(&gate, &head(path, Some("Bearer whatever")), NOW_MS);
        assert_eq!(
            action,
            RequestAction::Forward(vec![HeaderEdit::Remove("x-charge-id")]),
            "{path}"
        );
        let step = exchange.on_response_headers(&gate, Some(200), None);
        assert!(step.edits.is_empty() && step.settlement.is_none());
        assert_eq!(exchange.on_end(), None);
    }
}

#[test]
fn no_credential_gets_a_402_challenge_with_the_price() {
    let gate = gate();
    for authorization in [None, Some("Basic dXNlcjpwYXNz"), Some("Digest x")] {
        let action = Exchange::default().on_request_headers(
            &gate,
            &head("/v1/forecast/today", authorization),
            NOW_MS,
        );
        let (status, body, headers) = answered(&action);
        assert_eq!((status, body.code), (402, ErrorCode::PaymentRequired));
        assert_eq!(body.price, Some("0.001".parse().unwrap()));
        assert_eq!(
            (body.service_id.as_deref(), body.schemes.as_slice()),
            (Some("weather"), &["Bearer".to_owned()][..])
        );
        assert!(headers.contains(&(
            "www-authenticate",
            r#"Bearer realm="paystile", error="payment_required""#.into()
        )));
    }
}

#[test]
fn bad_credentials_get_401_without_a_ledger_call() {
    let gate = gate();
    let good = bearer(&claims());
    let (header_and_payload, signature) = good.rsplit_once('.').unwrap();
    let tampered_payload = {
        let (head, rest) = header_and_payload.split_once('.').unwrap();
        format!("{head}.{}x.{signature}", &rest[..rest.len() - 1])
    };
    let cases = [
        "Bearer".to_owned(),
        "Bearer ".to_owned(),
        "Bearer garbage".to_owned(),
        "Bearer a.b.c".to_owned(),
        format!("{header_and_payload}.{}", signature.replace(|c: char| c.is_ascii_digit(), "A")),
        tampered_payload,
        format!(
            "Bearer {}",
            pay_token::sign(&claims(), &SigningKey::hs256("another-secret-0123456789abcdefgh"))
        ),
        // alg none: the payload, unsigned.
        format!("Bearer eyJhbGciOiJub25lIn0.{}.", header_and_payload.split_once('.').unwrap().1),
        "Bearer é".to_owned(),
    ];
    for authorization in &cases {
        assert_eq!(
            refusal(&gate, authorization),
            (401, ErrorCode::InvalidCredential),
            "{authorization}"
        );
    }
    let action = Exchange::default().on_request_headers(
        &gate,
        &head("/v1/forecast", Some("Bearer x")),
        NOW_MS,
    );
    let (_, _, headers) = answered(&action);
    assert!(headers.contains(&(
        "www-authenticate",
        r#"Bearer realm="paystile", error="invalid_token""#.into()
    )));
    // Raw bytes that are not UTF-8 at all.
    let request =
        RequestHead { authorization: Some(b"Bearer \xff\xfe"), ..head("/v1/forecast", None) };
    let (status, body, _) =
        answered(&Exchange::default().on_request_headers(&gate, &request, NOW_MS));
    assert_eq!((status, body.code), (401, ErrorCode::InvalidCredential));
}

#[test]
fn expired_and_foreign_tokens_are_refused() {
    let gate = gate();
    let expired = PayTokenClaims { exp: NOW - 61, ..claims() };
    assert_eq!(refusal(&gate, &bearer(&expired)), (401, ErrorCode::TokenExpired));
    let within_leeway = PayTokenClaims { exp: NOW - 59, ..claims() };
    assert!(matches!(
        Exchange::default().on_request_headers(
            &gate,
            &head("/v1/forecast", Some(&bearer(&within_leeway))),
            NOW_MS
        ),
        RequestAction::CallLedger(_)
    ));
    let early = PayTokenClaims { nbf: Some(NOW + 3600), ..claims() };
    assert_eq!(refusal(&gate, &bearer(&early)), (401, ErrorCode::TokenExpired));
    let elsewhere = PayTokenClaims { service_id: Some("maps".into()), ..claims() };
    assert_eq!(refusal(&gate, &bearer(&elsewhere)), (403, ErrorCode::WrongService));
    let anywhere =
        PayTokenClaims { service_id: Some("maps".into()), scope: Scope::All, ..claims() };
    let token = bearer(&anywhere);
    let request = reserve(&gate, &mut Exchange::default(), &head("/v1/forecast", Some(&token)));
    assert_eq!(request.credential.as_bytes(), token.as_bytes());
    let strict = gate_with(|c| c["pay_token"]["issuer"] = json!("kyapay"));
    assert_eq!(refusal(&strict, &bearer(&claims())), (401, ErrorCode::InvalidCredential));
}

#[test]
fn a_valid_token_reserves_the_route_price() {
    let gate = gate();
    let token = bearer(&claims());
    let request = reserve(
        &gate,
        &mut Exchange::default(),
        &head("/v1/forecast/today?units=metric", Some(&token)),
    );
    assert_eq!(request.service_id, "weather");
    assert_eq!(request.price_usdc, "0.001".parse::<Usdc>().unwrap());
    // The ledger is given the credential itself, to verify before it spends.
    assert_eq!(request.credential.as_bytes(), token.as_bytes());
    assert_eq!(request.idempotency, None);
}

#[test]
fn idempotency_keys_carry_a_fingerprint_of_the_request() {
    let gate = gate();
    let token = bearer(&claims());
    let keyed = |path: &'static str, method: &'static [u8], key: &'static [u8]| {
        let request =
            RequestHead { method, idempotency_key: Some(key), ..head(path, Some(&token)) };
        reserve(&gate, &mut Exchange::default(), &request).idempotency.unwrap()
    };
    let first = keyed("/v1/forecast/a", b"GET", b"order-1");
    assert_eq!(first.key, "order-1");
    assert_eq!(first.fingerprint.len(), 64);
    assert_eq!(keyed("/v1/forecast/a", b"GET", b"order-1"), first);
    assert_ne!(keyed("/v1/forecast/b", b"GET", b"order-1").fingerprint, first.fingerprint);
    assert_ne!(keyed("/v1/forecast/a", b"POST", b"order-1").fingerprint, first.fingerprint);

    for bad in [&b""[..], &[b'k'; 256][..], b"tab\tkey", b"\xff"] {
        let request =
            RequestHead { idempotency_key: Some(bad), ..head("/v1/forecast", Some(&token)) };
        let (status, body, _) =
            answered(&Exchange::default().on_request_headers(&gate, &request, NOW_MS));
        assert_eq!((status, body.code), (400, ErrorCode::InvalidIdempotencyKey));
    }
}

#[test]
fn billable_answers_commit_and_carry_the_charge_headers() {
    let gate = gate();
    let mut exchange = admitted(&gate, "ch_1");
    let step = exchange.on_response_headers(&gate, Some(200), None);
    assert_eq!(
        step.edits,
        [
            HeaderEdit::Set("x-charge-id", "ch_1".into()),
            HeaderEdit::Set("x-amount-usdc", "0.001000".into()),
            HeaderEdit::Set("x-remaining-usdc", "0.009000".into()),
        ]
    );
    let settlement = step.settlement.unwrap();
    assert_eq!(
        (settlement.charge_id.as_str(), settlement.outcome, settlement.upstream_status),
        ("ch_1", Outcome::Commit, Some(200))
    );
    assert_eq!(exchange.on_end(), None, "settled twice");
}

#[test]
fn unbilled_answers_release_and_say_zero() {
    let gate = gate_with(|c| c["billable_statuses"] = json!(["2xx", "304"]));
    for (status, outcome) in [
        (Some(503), Outcome::Release),
        (Some(404), Outcome::Release),
        (None, Outcome::Release),
        (Some(304), Outcome::Commit),
    ] {
        let mut exchange = admitted(&gate, "ch_2");
        let step = exchange.on_response_headers(&gate, status, None);
        assert_eq!(step.settlement.unwrap().outcome, outcome, "{status:?}");
        if outcome == Outcome::Release {
            assert_eq!(
                step.edits,
                [
                    HeaderEdit::Set("x-amount-usdc", "0.000000".into()),
                    HeaderEdit::Remove("x-charge-id"),
                    HeaderEdit::Remove("x-remaining-usdc"),
                ]
            );
        }
    }
}

#[test]
fn a_stream_that_ends_before_its_response_releases_its_hold() {
    let gate = gate();
    let mut exchange = admitted(&gate, "ch_3");
    let settlement = exchange.on_end().unwrap();
    assert_eq!((settlement.outcome, settlement.upstream_status), (Outcome::Release, None));
    assert_eq!(exchange.on_end(), None);
}

#[test]
fn a_replay_reports_the_original_charge_and_settles_nothing() {
    let gate = gate();
    let mut exchange = Exchange::default();
    reserve(&gate, &mut exchange, &head("/v1/forecast", Some(&bearer(&claims()))));
    assert!(matches!(
        exchange.on_ledger_reply(&gate, hold_reply("ch_first", true)),
        RequestAction::Forward(_)
    ));
    let step = exchange.on_response_headers(&gate, Some(500), None);
    assert!(step.edits.contains(&HeaderEdit::Set("x-charge-id", "ch_first".into())));
    assert_eq!(step.settlement, None);
    assert_eq!(exchange.on_end(), None);
}

#[test]
fn ledger_refusals_pass_through_with_their_status() {
    let gate = gate();
    let refusals = [
        ErrorBody::token_limit_exceeded(
            "0.009".parse().unwrap(),
            Usdc::ZERO,
            "0.01".parse().unwrap(),
            "0.001".parse().unwrap(),
        ),
        ErrorBody::new(ErrorCode::TokenRevoked),
        ErrorBody::new(ErrorCode::WrongService),
        ErrorBody::new(ErrorCode::IdempotencyKeyInUse),
        ErrorBody::new(ErrorCode::IdempotencyKeyMismatch),
        ErrorBody::new(ErrorCode::IdempotencyKeyExhausted),
    ];
    for refusal in refusals {
        let mut exchange = Exchange::default();
        reserve(&gate, &mut exchange, &head("/v1/forecast", Some(&bearer(&claims()))));
        let reply = LedgerReply { status: Some(refusal.status()), body: refusal.to_json() };
        let (status, body, _) = answered(&exchange.on_ledger_reply(&gate, reply));
        assert_eq!((status, &body), (refusal.status(), &refusal));
        assert!(
            exchange.on_response_headers(&gate, Some(status), None).edits.is_empty(),
            "our own reply got charge headers"
        );
    }
}

#[test]
fn an_unreachable_or_confused_ledger_fails_closed() {
    let gate = gate();
    let limit =
        ErrorBody::token_limit_exceeded(Usdc::ZERO, Usdc::ZERO, Usdc::ZERO, Usdc::ZERO).to_json();
    let replies = [
        LedgerReply::default(),
        LedgerReply { status: Some(503), body: b"upstream connect error".to_vec() },
        LedgerReply { status: Some(504), body: b"upstream request timeout".to_vec() },
        LedgerReply { status: Some(401), body: ErrorBody::new(ErrorCode::Unauthorized).to_json() },
        LedgerReply { status: Some(200), body: b"{\"not\":\"a hold\"}".to_vec() },
        hold_reply("ch_1\r\nx-injected: 1", false),
        hold_reply("", false),
        hold_reply(&"c".repeat(65), false),
        LedgerReply { status: Some(422), body: limit },
        LedgerReply { status: Some(402), body: b"\xff".to_vec() },
    ];
    for reply in replies {
        let mut exchange = Exchange::default();
        reserve(&gate, &mut exchange, &head("/v1/forecast", Some(&bearer(&claims()))));
        let (status, body, headers) = answered(&exchange.on_ledger_reply(&gate, reply.clone()));
        assert_eq!((status, body.code), (503, ErrorCode::LedgerUnavailable), "{reply:?}");
        assert!(headers.contains(&("retry-after", "1".into())));
        assert_eq!(exchange.on_end(), None);
    }
}

#[test]
fn failing_open_lets_the_call_through_unpaid_and_says_so() {
    let gate = gate_with(|c| c["failure_mode"] = json!("open"));
    for unreachable in [None, Some(503), Some(504), Some(500)] {
        let mut exchange = Exchange::default();
        reserve(&gate, &mut exchange, &head("/v1/forecast", Some(&bearer(&claims()))));
        let action =
            exchange.on_ledger_reply(&gate, LedgerReply { status: unreachable, body: Vec::new() });
        assert_eq!(
            action,
            RequestAction::Forward(vec![
                HeaderEdit::Remove("authorization"),
                HeaderEdit::Remove("x-charge-id")
            ]),
            "{unreachable:?}"
        );
        let step = exchange.on_response_headers(&gate, Some(200), None);
        assert!(step.edits.contains(&HeaderEdit::Set("x-amount-usdc", "0.000000".into())));
        assert_eq!(step.settlement, None);
    }
}

#[test]
fn a_misconfigured_ledger_fails_closed_even_when_failing_open() {
    let gate = gate_with(|c| c["failure_mode"] = json!("open"));
    let confused = [
        LedgerReply { status: Some(401), body: ErrorBody::new(ErrorCode::Unauthorized).to_json() },
        LedgerReply { status: Some(404), body: b"no route".to_vec() },
        LedgerReply { status: Some(200), body: b"<html>".to_vec() },
    ];
    for reply in confused {
        let mut exchange = Exchange::default();
        reserve(&gate, &mut exchange, &head("/v1/forecast", Some(&bearer(&claims()))));
        let (status, body, _) = answered(&exchange.on_ledger_reply(&gate, reply.clone()));
        assert_eq!((status, body.code), (503, ErrorCode::LedgerUnavailable), "{reply:?}");
    }
}

#[test]
fn only_charged_or_failed_open_exchanges_await_their_response() {
    let gate = gate();
    let mut unpriced = Exchange::default();
    unpriced.on_request_headers(&gate, &head("/healthz", None), NOW_MS);
    assert!(!unpriced.awaits_response());
    let mut refused = Exchange::default();
    refused.on_request_headers(&gate, &head("/v1/forecast", None), NOW_MS);
    assert!(!refused.awaits_response());
    let mut held = admitted(&gate, "ch_4");
    assert!(held.awaits_response());
    held.on_response_headers(&gate, Some(200), None);
    assert!(!held.awaits_response(), "a settled exchange still awaits its response");
    let open = gate_with(|c| c["failure_mode"] = json!("open"));
    let mut failed_open = Exchange::default();
    reserve(&open, &mut failed_open, &head("/v1/forecast", Some(&bearer(&claims()))));
    failed_open.on_ledger_reply(&open, LedgerReply::default());
    assert!(failed_open.awaits_response());
}

#[test]
fn callbacks_out_of_turn_do_nothing() {
    let gate = gate();
    let mut exchange = Exchange::default();
    assert_eq!(exchange.on_ledger_reply(&gate, hold_reply("ch_x", false)), RequestAction::Nothing);
    let mut refused = Exchange::default();
    refused.on_request_headers(&gate, &head("/v1/forecast", None), NOW_MS);
    assert_eq!(refused.on_ledger_reply(&gate, hold_reply("ch_x", false)), RequestAction::Nothing);
    assert_eq!(refused.on_response_headers(&gate, Some(402), None).edits, []);
}

/// Paths that are mostly priced, with arbitrary bytes after a priced prefix.
fn paths() -> impl Strategy<Value = Vec<u8>> {
    let prefix = prop_oneof![
        Just(b"/v1/forecast".to_vec()),
        Just(b"/v1/forecast/free".to_vec()),
        Just(b"/V1/Forecast;x".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..16),
    ];
    (prefix, proptest::collection::vec(any::<u8>(), 0..48)).prop_map(|(mut p, tail)| {
        p.extend(tail);
        p
    })
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

proptest! {
    /// Whatever bytes a client sends, the gate answers without panicking, and a priced
    /// request is never forwarded before the ledger has been asked.
    #[test]
    fn no_priced_request_passes_unasked(
        method in prop_oneof![Just(b"GET".to_vec()), bytes(12)],
        path in paths(),
        authorization in proptest::option::of(prop_oneof![Just(Vec::new()), bytes(300)]),
        with_valid_token in any::<bool>(),
        key in proptest::option::of(bytes(300)),
    ) {
        let gate = gate();
        let token = bearer(&claims()).into_bytes();
        let authorization = if with_valid_token { Some(token) } else { authorization };
        let request = RequestHead {
            method: &method,
            path: &path,
            authorization: authorization.as_deref(),
            idempotency_key: key.as_deref(),
            ..RequestHead::default()
        };
        let priced = gate.config().route(&method, &path).is_some_and(|r| !r.price.is_zero());
        let action = Exchange::default().on_request_headers(&gate, &request, NOW_MS);
        if priced {
            prop_assert!(matches!(action, RequestAction::CallLedger(_) | RequestAction::Respond(_)), "{action:?}");
        } else {
            prop_assert_eq!(action, RequestAction::Forward(vec![HeaderEdit::Remove("x-charge-id")]));
        }
    }

    /// Whatever the ledger answers, the gate decides without panicking, and forwards only
    /// with a hold whose charge id is safe to put in a header.
    #[test]
    fn any_ledger_reply_gets_a_safe_decision(
        status in proptest::option::of(prop_oneof![Just(200u16), 0u16..1000]),
        charge_id in "[ -~]{0,70}",
        replayed in any::<bool>(),
        noise in bytes(200),
        as_hold in any::<bool>(),
    ) {
        let gate = gate();
        let mut exchange = Exchange::default();
        reserve(&gate, &mut exchange, &head("/v1/forecast", Some(&bearer(&claims()))));
        let body = if as_hold {
            json!({"chargeId": charge_id, "amountUsdc": "0.001", "remainingUsdc": "1", "replayed": replayed}).to_string().into_bytes()
        } else {
            noise
        };
        match exchange.on_ledger_reply(&gate, LedgerReply { status, body }) {
            RequestAction::Forward(edits) => {
                prop_assert_eq!(status, Some(200));
                let Some(HeaderEdit::Set("x-charge-id", id)) = edits.get(1) else { panic!("{edits:?}") };
                prop_assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
            }
            RequestAction::Respond(_) => {}
            other => prop_assert!(false, "{other:?}"),
        }
    }
}

/// A gate whose `/v1/chat` route is metered: at most 0.5 USDC, 0.000002 a token.
fn metered_gate() -> Gate {
    gate_with(|c| {
        c["routes"] = json!([{"path": "/v1/chat", "metered": {
            "max_usdc": "0.5", "unit_price_usdc": "0.000002", "units_header": "X-Usage-Tokens"
        }}]);
    })
}

/// A metered call held at its maximum, 0.5, leaving the token 0.25.
fn metered_call(gate: &Gate, replayed: bool, amount: &str) -> Exchange {
    let mut exchange = Exchange::default();
    let token = bearer(&claims());
    let reserve = reserve(gate, &mut exchange, &head("/v1/chat", Some(&token)));
    assert_eq!(reserve.price_usdc, "0.5".parse().unwrap(), "a metered call holds its maximum");
    assert_eq!(exchange.units_header(), None, "asked for usage before the hold");
    let body = json!({"chargeId": "ch_m", "amountUsdc": amount, "remainingUsdc": "0.25", "replayed": replayed});
    exchange.on_ledger_reply(
        gate,
        LedgerReply { status: Some(200), body: body.to_string().into_bytes() },
    );
    exchange
}

fn charged(amount: &str, remaining: &str) -> Vec<HeaderEdit> {
    vec![
        HeaderEdit::Set("x-charge-id", "ch_m".into()),
        HeaderEdit::Set("x-amount-usdc", amount.into()),
        HeaderEdit::Set("x-remaining-usdc", remaining.into()),
    ]
}

#[test]
fn metered_calls_commit_the_units_used_capped_at_the_hold() {
    let gate = metered_gate();
    for (units, amount, remaining) in [
        (&b"1234"[..], "0.002468", "0.747532"),
        (b" 0001234\t", "0.002468", "0.747532"),
        (b"250000", "0.500000", "0.250000"),
        (b"250001", "0.500000", "0.250000"),
        (b"99999999999999999999999999", "0.500000", "0.250000"),
    ] {
        let mut exchange = metered_call(&gate, false, "0.5");
        assert_eq!(exchange.units_header(), Some("x-usage-tokens"));
        let step = exchange.on_response_headers(&gate, Some(200), Some(units));
        assert_eq!(step.edits, charged(amount, remaining), "{units:?}");
        let settlement = step.settlement.unwrap();
        assert_eq!(settlement.outcome, Outcome::Commit);
        assert_eq!(settlement.amount_usdc, Some(amount.parse().unwrap()), "{units:?}");
        assert_eq!(exchange.on_end(), None, "settled twice");
    }
}

#[test]
fn metered_calls_without_usable_units_or_unbilled_are_released() {
    let gate = metered_gate();
    let unbilled = [
        HeaderEdit::Set("x-amount-usdc", "0.000000".into()),
        HeaderEdit::Remove("x-charge-id"),
        HeaderEdit::Remove("x-remaining-usdc"),
    ];
    let cases: [(Option<u16>, Option<&[u8]>); 10] = [
        (Some(200), None),
        (Some(200), Some(b"")),
        (Some(200), Some(b"0")),
        (Some(200), Some(b"-5")),
        (Some(200), Some(b"1.5")),
        (Some(200), Some(b"12 tokens")),
        (Some(200), Some(b"1,2")),
        (Some(200), Some(b"\xff\xfe1")),
        (Some(200), Some("١٢".as_bytes())),
        (Some(500), Some(b"1234")),
    ];
    for (status, units) in cases {
        let mut exchange = metered_call(&gate, false, "0.5");
        let step = exchange.on_response_headers(&gate, status, units);
        assert_eq!(step.edits, unbilled, "{status:?} {units:?}");
        let settlement = step.settlement.unwrap();
        assert_eq!((settlement.outcome, settlement.amount_usdc), (Outcome::Release, None));
    }
}

#[test]
fn a_replayed_metered_call_reports_what_it_committed() {
    let gate = metered_gate();
    let mut exchange = metered_call(&gate, true, "0.002468");
    assert_eq!(exchange.units_header(), None, "a replay settles nothing, so reads no usage");
    let step = exchange.on_response_headers(&gate, Some(200), Some(b"9999"));
    assert_eq!(step.edits, charged("0.002468", "0.250000"));
    assert_eq!(step.settlement, None);
}

proptest! {
    /// Whatever the upstream puts in the units header, the gate neither panics nor commits
    /// more than it held, and commits only what it reports.
    #[test]
    fn metered_commits_stay_within_the_hold(units in proptest::option::of(bytes(40))) {
        let gate = metered_gate();
        let mut exchange = metered_call(&gate, false, "0.5");
        let step = exchange.on_response_headers(&gate, Some(200), units.as_deref());
        let settlement = step.settlement.unwrap();
        let reported = step.edits.iter().find_map(|edit| match edit {
            HeaderEdit::Set("x-amount-usdc", amount) => Some(amount.parse::<Usdc>().unwrap()),
            _ => None,
        });
        match settlement.outcome {
            Outcome::Commit => {
                let amount = settlement.amount_usdc.unwrap();
                prop_assert!(!amount.is_zero() && amount <= "0.5".parse().unwrap());
                prop_assert_eq!(reported, Some(amount));
            }
            Outcome::Release => prop_assert_eq!(reported, Some(Usdc::ZERO)),
        }
    }
}

#[test]
fn sandbox_pay_tokens_pass_only_where_accepted() {
    let sandbox = PayTokenClaims { sandbox: true, ..claims() };
    assert_eq!(refusal(&gate(), &bearer(&sandbox)), (401, ErrorCode::InvalidCredential));
    let demo = gate_with(|c| c["pay_token"]["accept_sandbox"] = json!(true));
    let token = bearer(&sandbox);
    let request = reserve(&demo, &mut Exchange::default(), &head("/v1/forecast", Some(&token)));
    assert_eq!(request.credential.as_bytes(), token.as_bytes());
}

#[test]
fn a_verified_token_is_kept_for_its_next_calls_only_while_it_is_valid() {
    // Without prefetching, so that the second call's reserve is the first's again.
    let gate = gate_with(|c| c["ledger"]["prefetch_holds"] = json!(0));
    let token = bearer(&PayTokenClaims { exp: NOW + 100, ..claims() });
    let first = reserve(&gate, &mut Exchange::default(), &head("/v1/forecast", Some(&token)));
    assert_eq!(gate.verified_credentials(), 1);
    let again = reserve(&gate, &mut Exchange::default(), &head("/v1/forecast", Some(&token)));
    assert_eq!(again, first, "a kept credential reserves exactly as a fresh one");
    assert_eq!(gate.verified_credentials(), 1);
    // Past exp plus the leeway (60 s), the kept verdict no longer serves.
    let late = NOW_MS + 159_999;
    let action =
        Exchange::default().on_request_headers(&gate, &head("/v1/forecast", Some(&token)), late);
    assert!(matches!(action, RequestAction::CallLedger(_)), "within the leeway: {action:?}");
    let action = Exchange::default().on_request_headers(
        &gate,
        &head("/v1/forecast", Some(&token)),
        late + 1,
    );
    assert_eq!(answered(&action).1.code, ErrorCode::TokenExpired);
    // Refusals are never kept; a token one byte off is verified on its own, and refused.
    let mut forged = token.clone().into_bytes();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    let forged = String::from_utf8(forged).unwrap();
    assert_eq!(refusal(&gate, &forged), (401, ErrorCode::InvalidCredential));
    assert_eq!(refusal(&gate, &format!("{token}x")), (401, ErrorCode::InvalidCredential));
    let early = bearer(&PayTokenClaims { nbf: Some(NOW + 3600), ..claims() });
    assert_eq!(refusal(&gate, &early), (401, ErrorCode::TokenExpired));
    assert_eq!(gate.verified_credentials(), 1);
    // A gate with other keys (a new configuration) trusts none of them.
    let rotated = gate_with(|c| {
        c["pay_token"]["keys"][0]["secret"] = json!("another-secret-0123456789abcdefgh")
    });
    assert_eq!(refusal(&rotated, &token), (401, ErrorCode::InvalidCredential));
}
