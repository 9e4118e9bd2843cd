//! x402 in the gate: the offer every 402 makes, a payment checked inline and reserved as a
//! one-call token, and the answer's `PAYMENT-RESPONSE`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

// Some of its helpers are the other test binaries'.
#[allow(dead_code)]
mod support;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use paystile_filter::answer::HeaderEdit;
use paystile_filter::config::Config;
use paystile_filter::gate::{Exchange, Gate, RequestAction, RequestHead};
use paystile_filter::ledger::LedgerReply;
use paystile_protocol::ErrorCode;
use paystile_protocol::jws;
use paystile_protocol::ledger_api::{Outcome, ReserveRequest};
use paystile_protocol::pay_token;
use paystile_protocol::x402::{self, B256, Offer, SigningKey, Terms, Version};
use proptest::prelude::*;
use serde_json::{Value, json};
use support::{answered, head};

const SECRET: &str = "gate-test-secret-0123456789abcdef";
const NOW: u64 = 1_900_000_000;
const NOW_MS: u64 = NOW * 1000;
const ASSET: &str = "0x5FbDB2315678afecb367f032d93F642f64180aa3";
const PAY_TO: &str = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC";

fn config_json() -> Value {
    json!({
        "service_id": "weather",
        "routes": [
            {"path_prefix": "/v1/metered", "metered": {"max_usdc": "0.01", "unit_price_usdc": "0.0001", "units_header": "x-units"}},
            {"path_prefix": "/v1/forecast", "price_usdc": "0.001"}
        ],
        "ledger": {"upstream": "paystile_ledger", "gateway_key": "gateway-key-0123456789"},
        "pay_token": {"keys": [{"alg": "HS256", "secret": SECRET}]},
        "x402": {"network": "eip155:31337", "asset": ASSET, "asset_name": "USD Coin", "asset_version": "2", "pay_to": PAY_TO}
    })
}

fn gate_with(change: impl FnOnce(&mut Value)) -> Gate {
    let mut json = config_json();
    change(&mut json);
    Gate::new(Config::from_json(json.to_string().as_bytes()).unwrap())
}

fn offer() -> Offer {
    Offer {
        chain_id: 31337,
        asset: ASSET.parse().unwrap(),
        name: "USD Coin".into(),
        version: "2".into(),
        pay_to: PAY_TO.parse().unwrap(),
        max_timeout_seconds: 60,
    }
}

fn payer() -> SigningKey {
    SigningKey::from_slice(&[0x11; 32]).unwrap()
}

/// A payment of `amount` units, valid for a minute from [`NOW`].
fn payment(amount: u64, version: Version) -> String {
    let terms =
        Terms { offer: &offer(), amount, window: (0, NOW + 60), nonce: B256::repeat_byte(4) };
    x402::sign(&payer(), &terms, version)
}

fn paying<'a>(path: &'a str, payment: &'a str, version: Version) -> RequestHead<'a> {
    RequestHead {
        payment: Some((payment.as_bytes(), version)),
        scheme: Some(b"http"),
        authority: Some(b"api.example"),
        ..head(path, None)
    }
}

fn decoded(value: &str) -> Value {
    serde_json::from_slice(&STANDARD.decode(value).unwrap()).unwrap()
}

fn header<'a>(headers: &'a [(&'static str, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
}

#[test]
fn a_402_offers_x402_in_the_v2_header_and_the_v1_body_beside_the_other_schemes() {
    let gate = gate_with(|_| {});
    let request = RequestHead {
        scheme: Some(b"https"),
        authority: Some(b"api.example"),
        ..head("/v1/forecast/oslo?days=3", None)
    };
    let (status, body, headers) =
        answered(&Exchange::default().on_request_headers(&gate, &request, NOW_MS));
    assert_eq!((status, body.code), (402, ErrorCode::PaymentRequired));
    assert_eq!(body.schemes, ["Bearer", "x402"]);
    let required = decoded(header(&headers, "payment-required").unwrap());
    assert_eq!(required["x402Version"], 2);
    assert_eq!(required["error"], body.error);
    assert_eq!(required["resource"]["url"], "https://api.example/v1/forecast/oslo?days=3");
    assert_eq!(
        required["accepts"],
        json!([{
            "scheme": "exact", "network": "eip155:31337", "amount": "1000", "asset": ASSET,
            "payTo": PAY_TO, "maxTimeoutSeconds": 60, "extra": {"name": "USD Coin", "version": "2"}
        }])
    );
    assert_eq!(header(&headers, "cache-control"), Some("no-store"));
    assert!(header(&headers, "www-authenticate").unwrap().starts_with("Bearer"));
    // v1 clients read the body: its version, and the offer with v1's names.
    assert_eq!(body.x402_version, Some(1));
    let v1 = &body.accepts[0];
    assert_eq!((v1.max_amount_required.as_str(), v1.network.as_str()), ("1000", "eip155:31337"));
    assert_eq!(v1.resource, "https://api.example/v1/forecast/oslo?days=3");

    // A metered call's price is known only once served: x402 is not offered there.
    let (status, body, headers) = answered(&Exchange::default().on_request_headers(
        &gate,
        &head("/v1/metered", None),
        NOW_MS,
    ));
    assert_eq!((status, body.schemes.as_slice()), (402, ["Bearer".to_owned()].as_slice()));
    assert_eq!(header(&headers, "payment-required"), None);
    assert!(body.accepts.is_empty() && body.x402_version.is_none());
}

#[test]
fn a_payment_is_reserved_as_a_one_call_token_and_its_answer_reports_it() {
    // Prefetching is on by default: a payment pays one call, so it never prefetches.
    let gate = gate_with(|_| {});
    for version in [Version::V2, Version::V1] {
        let payment = payment(1000, version);
        let mut exchange = Exchange::default();
        let RequestAction::CallLedger(call) =
            exchange.on_request_headers(&gate, &paying("/v1/forecast", &payment, version), NOW_MS)
        else {
            panic!("a payment for the price goes to the ledger")
        };
        let reserve: ReserveRequest = serde_json::from_slice(&call.body).unwrap();
        let scheme = if version == Version::V2 { "x402v2" } else { "x402v1" };
        let presented = String::from_utf8(reserve.credential.as_bytes().to_vec()).unwrap();
        assert_eq!(presented, format!("{scheme} {payment}"));
        assert_eq!((reserve.count, reserve.price_usdc.micros()), (1, 1000));
        let hold = json!({"chargeId": "ch_1", "amountUsdc": "0.001", "remainingUsdc": "0", "replayed": false});
        let action = exchange.on_ledger_reply(
            &gate,
            LedgerReply { status: Some(200), body: hold.to_string().into_bytes() },
        );
        assert_eq!(
            action,
            RequestAction::Forward(vec![
                HeaderEdit::Remove("authorization"),
                HeaderEdit::Remove("payment-signature"),
                HeaderEdit::Remove("x-payment"),
                HeaderEdit::Set("x-charge-id", "ch_1".into()),
            ])
        );
        let step = exchange.on_response_headers(&gate, Some(200), None);
        assert_eq!(step.settlement.unwrap().outcome, Outcome::Commit);
        let name = if version == Version::V2 { "payment-response" } else { "x-payment-response" };
        let receipt = step
            .edits
            .iter()
            .find_map(|edit| match edit {
                HeaderEdit::Set(n, value) if *n == name => Some(decoded(value)),
                _ => None,
            })
            .unwrap();
        let payer = x402::address_of(payer().verifying_key()).to_checksum(None);
        assert_eq!(receipt["success"], true);
        assert_eq!(receipt["payer"], payer);
        assert_eq!(receipt["amount"], "1000");
        assert_eq!(receipt["errorReason"], "settlement_pending");
        // v1 names chains it knows (base, base-sepolia); a local chain keeps CAIP-2.
        assert_eq!(receipt["network"], "eip155:31337");
    }
}

#[test]
fn an_unbilled_answer_releases_the_payment_and_reports_none() {
    let gate = gate_with(|_| {});
    let payment = payment(1000, Version::V2);
    let mut exchange = Exchange::default();
    exchange.on_request_headers(&gate, &paying("/v1/forecast", &payment, Version::V2), NOW_MS);
    let hold =
        json!({"chargeId": "ch_2", "amountUsdc": "0.001", "remainingUsdc": "0", "replayed": false});
    exchange.on_ledger_reply(
        &gate,
        LedgerReply { status: Some(200), body: hold.to_string().into_bytes() },
    );
    let step = exchange.on_response_headers(&gate, Some(503), None);
    assert_eq!(step.settlement.unwrap().outcome, Outcome::Release);
    assert!(
        !step.edits.iter().any(|e| matches!(e, HeaderEdit::Set(n, _) if n.contains("payment"))),
        "{:?}",
        step.edits
    );
}

#[test]
fn a_payment_off_the_offer_is_refused_inline_with_the_offer_again() {
    let gate = gate_with(|_| {});
    let refused = |payment: &str, version| {
        let action = Exchange::default().on_request_headers(
            &gate,
            &paying("/v1/forecast", payment, version),
            NOW_MS,
        );
        let (status, body, headers) = answered(&action);
        assert_eq!(status, 402, "{body:?}");
        let required = decoded(header(&headers, "payment-required").unwrap());
        assert_eq!(required["error"], body.error);
        (body.code, body.error)
    };
    let (code, message) = refused(&payment(999, Version::V2), Version::V2);
    assert_eq!(code, ErrorCode::InvalidPayment);
    assert!(message.contains("value_mismatch"), "{message}");
    let (code, message) = refused(&payment(1001, Version::V1), Version::V1);
    assert_eq!(code, ErrorCode::InvalidPayment);
    assert!(message.contains("value_mismatch"), "{message}");
    for garbage in ["", "not base64!", "e30=", &STANDARD.encode("[1,2]")] {
        assert_eq!(refused(garbage, Version::V2).0, ErrorCode::InvalidPayment, "{garbage:?}");
    }
    // Expired: signed long ago.
    let terms = Terms { offer: &offer(), amount: 1000, window: (0, NOW - 1), nonce: B256::ZERO };
    let (code, message) = refused(&x402::sign(&payer(), &terms, Version::V2), Version::V2);
    assert!(code == ErrorCode::InvalidPayment && message.contains("valid_before"), "{message}");
    // To someone else.
    let elsewhere =
        Offer { pay_to: "0x70997970C51812dc3A010C7d01b50e0d17dc79C8".parse().unwrap(), ..offer() };
    let terms = Terms { offer: &elsewhere, amount: 1000, window: (0, NOW + 60), nonce: B256::ZERO };
    assert_eq!(
        refused(&x402::sign(&payer(), &terms, Version::V1), Version::V1).0,
        ErrorCode::InvalidPayment
    );
}

#[test]
fn a_forged_signature_goes_to_the_ledger_unless_the_gateway_verifies_signatures() {
    let stranger = SigningKey::from_slice(&[0x22; 32]).unwrap();
    let terms = Terms { offer: &offer(), amount: 1000, window: (0, NOW + 60), nonce: B256::ZERO };
    let mut json = decoded(&x402::sign(&stranger, &terms, Version::V2));
    json["payload"]["authorization"]["from"] =
        json!(x402::address_of(payer().verifying_key()).to_checksum(None));
    let forged = STANDARD.encode(json.to_string());
    let request = paying("/v1/forecast", &forged, Version::V2);
    let lenient = gate_with(|_| {});
    assert!(matches!(
        Exchange::default().on_request_headers(&lenient, &request, NOW_MS),
        RequestAction::CallLedger(_)
    ));
    let strict = gate_with(|c| c["x402"]["verify_signatures"] = json!(true));
    let (status, body, _) =
        answered(&Exchange::default().on_request_headers(&strict, &request, NOW_MS));
    assert_eq!((status, body.code), (402, ErrorCode::InvalidPayment));
    assert!(body.error.contains("signature"), "{}", body.error);
}

#[test]
fn a_payment_the_ledger_has_seen_is_answered_with_a_fresh_offer() {
    let gate = gate_with(|_| {});
    let payment = payment(1000, Version::V2);
    let mut exchange = Exchange::default();
    exchange.on_request_headers(&gate, &paying("/v1/forecast", &payment, Version::V2), NOW_MS);
    let used = json!({"error": "This payment was already used: sign a new one for this call", "code": "payment_already_used"});
    let action = exchange.on_ledger_reply(
        &gate,
        LedgerReply { status: Some(402), body: used.to_string().into_bytes() },
    );
    let (status, body, headers) = answered(&action);
    assert_eq!((status, body.code), (402, ErrorCode::PaymentAlreadyUsed));
    assert_eq!(
        decoded(header(&headers, "payment-required").unwrap())["accepts"][0]["amount"],
        "1000"
    );
}

#[test]
fn x402_settings_are_checked_field_by_field() {
    let refused = |change: fn(&mut Value)| {
        let mut json = config_json();
        change(&mut json);
        Config::from_json(json.to_string().as_bytes()).unwrap_err().to_string()
    };
    assert!(refused(|c| c["x402"]["network"] = json!("mainnet")).starts_with("x402.network:"));
    assert!(refused(|c| c["x402"]["pay_to"] = json!("0x12")).starts_with("x402.pay_to:"));
    assert!(refused(|c| c["x402"]["asset_name"] = json!(null)).starts_with("x402.asset_name:"));
    assert!(
        refused(|c| c["x402"]["max_timeout_seconds"] = json!(1))
            .starts_with("x402.max_timeout_seconds:")
    );
    assert!(refused(|c| c["x402"]["price"] = json!(1)).contains("unknown field"));
    // USDC on Base needs no token settings; x402 alone is a complete configuration.
    let mut json = config_json();
    json["x402"] = json!({"network": "base", "pay_to": PAY_TO});
    json.as_object_mut().unwrap().remove("pay_token");
    let config = Config::from_json(json.to_string().as_bytes()).unwrap();
    let offer = &config.verifier.x402.as_ref().unwrap().offer;
    assert_eq!((offer.chain_id, offer.name.as_str()), (8453, "USD Coin"));
}

proptest! {
    /// Any bytes in either payment header: a ledger call or a 402, never a panic.
    #[test]
    fn any_payment_header_gets_an_answer(
        value in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..600),
            "[A-Za-z0-9+/=]{0,600}".prop_map(String::into_bytes),
            (0..2000usize, any::<u8>()).prop_map(|(at, byte)| {
                let mut bytes = payment(1000, Version::V2).into_bytes();
                if let Some(b) = bytes.get_mut(at) { *b = byte; }
                bytes
            }),
        ],
        v1 in any::<bool>(),
    ) {
        let gate = gate_with(|_| {});
        let version = if v1 { Version::V1 } else { Version::V2 };
        let request = RequestHead { payment: Some((&value, version)), ..head("/v1/forecast", None) };
        match Exchange::default().on_request_headers(&gate, &request, NOW_MS) {
            RequestAction::CallLedger(call) => {
                let reserve: ReserveRequest = serde_json::from_slice(&call.body).unwrap();
                prop_assert_eq!(reserve.count, 1);
            }
            RequestAction::Respond(response) => prop_assert_eq!(response.status, 402),
            other => prop_assert!(false, "{:?}", other),
        }
    }
}

#[test]
fn a_route_that_settles_before_waits_for_the_transfer_and_reports_it_whatever_the_upstream_says() {
    let gate = gate_with(|c| {
        c["routes"][1]["settle"] = json!("before");
        c["x402"]["settle_timeout_ms"] = json!(20_000);
    });
    let payment = payment(1000, Version::V2);
    let mut exchange = Exchange::default();
    let RequestAction::CallLedger(call) =
        exchange.on_request_headers(&gate, &paying("/v1/forecast", &payment, Version::V2), NOW_MS)
    else {
        panic!("a payment goes to the ledger")
    };
    let reserve: ReserveRequest = serde_json::from_slice(&call.body).unwrap();
    assert_eq!(reserve.settle_until_ms, Some(NOW_MS + 20_000));
    assert_eq!(call.timeout, Some(std::time::Duration::from_secs(20)));
    let tx = format!("0x{}", "ab".repeat(32));
    let hold = json!({"chargeId": "ch_3", "amountUsdc": "0.001", "remainingUsdc": "0", "replayed": false, "transaction": tx});
    exchange.on_ledger_reply(
        &gate,
        LedgerReply { status: Some(200), body: hold.to_string().into_bytes() },
    );
    // Settled and committed by the ledger: charged even for an upstream error, and nothing
    // left to settle.
    let step = exchange.on_response_headers(&gate, Some(502), None);
    assert_eq!(step.settlement, None);
    let receipt = step
        .edits
        .iter()
        .find_map(|edit| match edit {
            HeaderEdit::Set("payment-response", value) => Some(decoded(value)),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        (receipt["transaction"].as_str(), receipt.get("errorReason")),
        (Some(tx.as_str()), None)
    );
    assert!(step.edits.contains(&HeaderEdit::Set("x-amount-usdc", "0.001000".into())));
    // A Pay Token call on the same route reserves as ever: settling first is x402's.
    let claims = support::claims("tok_1", "0.01", NOW);
    let token = format!("Bearer {}", pay_token::sign(&claims, &jws::SigningKey::hs256(SECRET)));
    let pay_token_call =
        Exchange::default().on_request_headers(&gate, &head("/v1/forecast", Some(&token)), NOW_MS);
    let RequestAction::CallLedger(call) = pay_token_call else {
        panic!("a Pay Token call reserves: {pay_token_call:?}")
    };
    let reserve: ReserveRequest = serde_json::from_slice(&call.body).unwrap();
    assert_eq!((reserve.settle_until_ms, call.timeout), (None, None));
}

#[test]
fn settling_before_needs_a_fixed_price_and_x402() {
    let refused = |change: fn(&mut Value)| {
        let mut json = config_json();
        change(&mut json);
        Config::from_json(json.to_string().as_bytes()).unwrap_err().to_string()
    };
    let metered = refused(|c| c["routes"][0]["settle"] = json!("before"));
    assert!(metered.starts_with("routes[0].settle: before needs a fixed price"), "{metered}");
    let without = refused(|c| {
        c["routes"][1]["settle"] = json!("before");
        c.as_object_mut().unwrap().remove("x402");
    });
    assert!(without.starts_with("routes[1].settle: before settles x402 payments"), "{without}");
    assert!(refused(|c| c["routes"][1]["settle"] = json!("later")).contains("unknown variant"));
    assert!(
        refused(|c| c["x402"]["settle_timeout_ms"] = json!(10))
            .starts_with("x402.settle_timeout_ms")
    );
}

#[test]
fn a_top_up_asks_for_the_amount_and_answers_what_the_ledger_sold() {
    let gate = gate_with(|c| c["x402"]["top_up"] = json!({"path": "/top-up", "max_usdc": "10"}));
    assert!(gate.is_top_up(b"/top-up?amount_usdc=2") && !gate.is_top_up(b"/top-up/x"));
    let at = |path| RequestHead { method: b"POST", ..head(path, None) };
    let (status, body, headers) =
        answered(&Exchange::default().on_top_up(&gate, &at("/top-up?amount_usdc=2"), NOW_MS));
    assert_eq!((status, body.schemes.as_slice()), (402, ["x402".to_owned()].as_slice()));
    assert_eq!(
        decoded(header(&headers, "payment-required").unwrap())["accepts"][0]["amount"],
        "2000000"
    );
    for bad in
        ["/top-up", "/top-up?amount_usdc=11", "/top-up?amount_usdc=0.01", "/top-up?amount_usdc=x"]
    {
        let (status, body, _) = answered(&Exchange::default().on_top_up(&gate, &at(bad), NOW_MS));
        assert_eq!((status, body.code), (400, ErrorCode::BadRequest), "{bad}");
    }
    // Paid: the ledger settles, credits and issues; its answer is the sale.
    let paid = payment(2_000_000, Version::V2);
    let mut exchange = Exchange::default();
    let request =
        RequestHead { method: b"POST", ..paying("/top-up?amount_usdc=2", &paid, Version::V2) };
    let RequestAction::CallLedger(call) = exchange.on_top_up(&gate, &request, NOW_MS) else {
        panic!("a paid top-up goes to the ledger")
    };
    assert_eq!(call.path, "/v1/x402/top-ups");
    let sent: Value = serde_json::from_slice(&call.body).unwrap();
    assert_eq!(sent["amountUsdc"], "2.000000");
    let sold = json!({"buyerId": "0xabc", "amountUsdc": "2", "transaction": "0x01", "balanceUsdc": "2", "token": {"tokenId": "tok_1", "jwt": "a.b.c", "limitUsdc": "2", "expiresAt": "2030-01-01T00:00:00Z"}});
    let action = exchange.on_ledger_reply(
        &gate,
        LedgerReply { status: Some(200), body: sold.to_string().into_bytes() },
    );
    let RequestAction::Sell(response) = action else { panic!("{action:?}") };
    assert_eq!(response.status, 200);
    assert_eq!(serde_json::from_slice::<Value>(&response.body).unwrap(), sold);
    assert_eq!(
        decoded(header(&response.headers, "payment-response").unwrap())["transaction"],
        "0x01"
    );
    // A payment of another amount is refused inline.
    let short = payment(1_000_000, Version::V2);
    let request = paying("/top-up?amount_usdc=2", &short, Version::V2);
    let (status, body, _) = answered(&Exchange::default().on_top_up(&gate, &request, NOW_MS));
    assert_eq!((status, body.code), (402, ErrorCode::InvalidPayment));
    // Bad settings are refused with the field named.
    let mut json = config_json();
    json["x402"]["top_up"] = json!({"path": "top-up"});
    let error = Config::from_json(json.to_string().as_bytes()).unwrap_err().to_string();
    assert!(error.starts_with("x402.top_up.path"), "{error}");
}

#[test]
fn a_payment_is_taken_from_its_headers_only_and_a_settle_first_call_never_goes_unpaid() {
    // `x402v2 …` is how the gateway presents a payment to the ledger: in a client's
    // Authorization (here on a metered route, where x402 is not offered) it is no credential.
    let gate = gate_with(|c| c["failure_mode"] = json!("open"));
    let smuggled = format!("x402v2 {}", payment(1000, Version::V2));
    let (status, body, _) = answered(&Exchange::default().on_request_headers(
        &gate,
        &head("/v1/metered", Some(&smuggled)),
        NOW_MS,
    ));
    assert_eq!((status, body.code), (402, ErrorCode::PaymentRequired));
    // Failing open lets a reserved call through unpaid; a call to settle first, never.
    let gate = gate_with(|c| {
        c["failure_mode"] = json!("open");
        c["routes"][1]["settle"] = json!("before");
    });
    let paid = payment(1000, Version::V2);
    let mut exchange = Exchange::default();
    exchange.on_request_headers(&gate, &paying("/v1/forecast", &paid, Version::V2), NOW_MS);
    let (status, body, _) = answered(&exchange.on_ledger_reply(&gate, LedgerReply::default()));
    assert_eq!((status, body.code), (503, ErrorCode::LedgerUnavailable));
}
