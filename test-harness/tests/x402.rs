//! x402 end to end: a real Envoy with the release filter, the ledger binary settling on a
//! real EVM node (anvil) with the sandbox USDC, and the x402 Python package paying as an
//! agent does.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use paystile_harness::chain::{self, PAYEE, PAYER, PAYER_FUNDS, PAYER_KEY, X402Sandbox};
use paystile_harness::e2e::{TestStack, unix_now};
use paystile_harness::paths;
use paystile_protocol::ledger_api::{ChargeQuery, ChargeView, ReserveRequest};
use paystile_protocol::x402::{self, B256, Offer, SigningKey, Terms, U256, Version};
use serde_json::{Value, json};

/// How long a settlement may take on anvil (it mines each transaction at once; the ledger
/// looks for due settlements every 250 ms).
const SETTLE_DEADLINE: Duration = Duration::from_secs(20);

async fn stack(sandbox: &X402Sandbox) -> TestStack {
    stack_settling(sandbox, sandbox.ledger_args()).await
}

async fn stack_settling(sandbox: &X402Sandbox, args: Vec<String>) -> TestStack {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    TestStack::start_with(json!({"x402": sandbox.filter_config()}), &args).await.unwrap()
}

fn offer(sandbox: &X402Sandbox) -> Offer {
    sandbox.offer().unwrap()
}

/// A payment of `amount` micro-USDC by `key`, valid for a minute, under a random nonce.
fn sign(sandbox: &X402Sandbox, key: &SigningKey, amount: u64) -> String {
    let offer = offer(sandbox);
    let nonce = B256::from(rand::random::<[u8; 32]>());
    let terms = Terms { offer: &offer, amount, window: (0, unix_now() + 60), nonce };
    x402::sign(key, &terms, Version::V2)
}

fn payer_key() -> SigningKey {
    chain::payer_key().unwrap()
}

/// The x402 Python package's client pays `url`: its answer (`x402_fetch.py`).
fn x402_client_pays(sandbox: &X402Sandbox, url: &str) -> Value {
    let allow = format!("{}:{}", sandbox.network(), sandbox.token.to_checksum(None));
    let output = Command::new(paths::python())
        .arg(paths::interop_dir().join("x402_fetch.py"))
        .args(["--key", PAYER_KEY, "--allow", &allow, url])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

/// The charge once its settlement is final (settled or failed).
async fn settled(stack: &TestStack, charge_id: &str) -> ChargeView {
    let deadline = tokio::time::Instant::now() + SETTLE_DEADLINE;
    loop {
        let charge = stack.stack.admin.charge(charge_id).await.unwrap();
        let status = charge.settlement.as_ref().map(|s| s.status.clone());
        if matches!(status.as_deref(), Some("settled" | "failed")) {
            return charge;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not settled in time: {charge:?}\n{}",
            stack.stack.ledger_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn decoded(value: &str) -> Value {
    serde_json::from_slice(&STANDARD.decode(value).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_x402_client_pays_through_envoy_and_the_ledger_settles_it_on_chain_once() {
    let sandbox = X402Sandbox::start().await.unwrap();
    let stack = stack(&sandbox).await;
    let price = stack.forecast_price().micros();

    // The 402 offers x402 beside the Pay Token.
    let challenged = stack.get("/v1/forecast/oslo", None, &[]).await.unwrap();
    assert_eq!(challenged.status, 402);
    let required = decoded(challenged.header("payment-required").unwrap());
    assert_eq!(required["accepts"][0]["amount"], price.to_string());
    assert_eq!(required["accepts"][0]["payTo"], PAYEE);
    assert_eq!(challenged.json()["x402Version"], 1);

    // The x402 package pays it, through Envoy.
    let url = stack.stack.gateway_url("/v1/forecast/oslo");
    let answer = x402_client_pays(&sandbox, &url);
    assert_eq!(answer["status"], 200, "{answer}");
    assert_eq!(answer["amountUsdc"], stack.forecast_price().to_string());
    let receipt = &answer["payment-response"];
    assert_eq!((receipt["success"].clone(), receipt["payer"].clone()), (json!(true), json!(PAYER)));
    // The upstream saw neither the payment nor the 402's retry header.
    let upstream: Value = serde_json::from_str(answer["body"].as_str().unwrap()).unwrap();
    assert!(upstream["headers"].get("payment-signature").is_none(), "{upstream}");
    assert!(upstream["headers"]["x-charge-id"].is_string());

    // Committed, then settled on chain: the payee has the price, the payer paid it once.
    let charge_id = answer["chargeId"].as_str().unwrap();
    let charge = settled(&stack, charge_id).await;
    let settlement = charge.settlement.unwrap();
    assert_eq!(settlement.status, "settled", "{settlement:?}");
    assert!(settlement.transaction.unwrap().starts_with("0x"));
    assert_eq!(charge.buyer_id, format!("x402_{}", PAYER.to_lowercase()));
    assert_eq!(sandbox.balance(PAYEE).await.unwrap(), U256::from(price));
    assert_eq!(sandbox.balance(PAYER).await.unwrap(), U256::from(PAYER_FUNDS - price));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_authorization_pays_one_call_on_one_route_of_one_gateway() {
    let sandbox = X402Sandbox::start().await.unwrap();
    let stack = stack(&sandbox).await;
    let price = stack.forecast_price().micros();
    let payment = sign(&sandbox, &payer_key(), price);
    let pay = |path: &'static str| {
        let payment = payment.clone();
        let stack = &stack;
        async move { stack.get(path, None, &[("payment-signature", &payment)]).await.unwrap() }
    };
    let first = pay("/v1/forecast/oslo").await;
    assert_eq!(first.status, 200, "{}", first.text);
    let receipt = decoded(first.header("payment-response").unwrap());
    assert_eq!(receipt["amount"], price.to_string());
    // Again: on the same route, another route of the same price, and as another gateway
    // sharing the ledger would present it.
    for path in ["/v1/forecast/oslo", "/v1/forecast/bergen"] {
        let again = pay(path).await;
        assert_eq!((again.status, again.code().as_deref()), (402, Some("payment_already_used")));
        assert!(again.header("payment-required").is_some());
    }
    let reserve = ReserveRequest {
        credential: format!("x402v2 {payment}").into(),
        service_id: stack.service_id(),
        price_usdc: stack.forecast_price(),
        idempotency: None,
        count: 1,
        extras_until_ms: None,
        settle_until_ms: None,
    };
    let other_gateway = stack
        .http
        .post(format!("{}/v1/holds", stack.stack.ledger.url()))
        .bearer_auth(&stack.stack.secrets.gateway_key)
        .json(&reserve)
        .send()
        .await
        .unwrap();
    assert_eq!(other_gateway.status(), 402);
    let refusal: Value = other_gateway.json().await.unwrap();
    assert_eq!(refusal["code"], "payment_already_used");

    let charge = settled(&stack, first.header("x-charge-id").unwrap()).await;
    assert_eq!(charge.settlement.unwrap().status, "settled");
    assert_eq!(sandbox.balance(PAYEE).await.unwrap(), U256::from(price));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_the_upstream_fails_is_never_settled_and_a_payer_without_funds_is_marked_unpaid() {
    let sandbox = X402Sandbox::start().await.unwrap();
    let stack = stack(&sandbox).await;
    let price = stack.forecast_price().micros();

    // The upstream fails: released, nothing moves, and the payment may pay another call.
    let payment = sign(&sandbox, &payer_key(), price);
    let header = [("payment-signature", payment.as_str())];
    let failed = stack.get("/v1/forecast/status/503", None, &header).await.unwrap();
    assert_eq!(failed.status, 503);
    assert!(failed.header("payment-response").is_none());
    assert_eq!(failed.header("x-amount-usdc"), Some("0.000000"));
    // The release reaches the ledger from the filter's next tick.
    let checked = x402::Payment::decode(payment.as_bytes(), Version::V2)
        .unwrap()
        .check(&[offer(&sandbox)], price, unix_now())
        .unwrap();
    stack.settled(&x402::token_id(&checked.payment_id)).await.unwrap();
    let served = stack.get("/v1/forecast/oslo", None, &header).await.unwrap();
    assert_eq!(served.status, 200, "{}", served.text);
    let charge = settled(&stack, served.header("x-charge-id").unwrap()).await;
    assert_eq!(charge.settlement.unwrap().status, "settled");
    assert_eq!(sandbox.balance(PAYEE).await.unwrap(), U256::from(price));

    // A payer with nothing: served (settled after), then marked unpaid with the chain's
    // reason, in the journal.
    let broke = SigningKey::from_slice(&rand::random::<[u8; 32]>()).unwrap();
    let payment = sign(&sandbox, &broke, price);
    let served = stack.get("/v1/forecast/oslo", None, &[("payment-signature", &payment)]).await;
    let served = served.unwrap();
    assert_eq!(served.status, 200, "{}", served.text);
    let charge = settled(&stack, served.header("x-charge-id").unwrap()).await;
    let settlement = charge.settlement.unwrap();
    assert_eq!(settlement.status, "failed");
    assert!(settlement.reason.unwrap().contains("exceeds balance"));
    assert_eq!(sandbox.balance(PAYEE).await.unwrap(), U256::from(price));
    // The seller finds exactly the served calls that went unpaid in the journal.
    let query = ChargeQuery { settlement: Some("failed".into()), ..ChargeQuery::default() };
    let unpaid = stack.stack.admin.charges(&query).await.unwrap();
    let ids: Vec<&str> = unpaid.charges.iter().map(|c| c.charge_id.as_str()).collect();
    assert_eq!(ids, [charge.charge_id.as_str()]);
    // Presented again, a payment that failed pays for nothing: it would fail again.
    let again = stack.get("/v1/forecast/oslo", None, &[("payment-signature", &payment)]).await;
    let again = again.unwrap();
    assert_eq!((again.status, again.code().as_deref()), (402, Some("invalid_payment")));
    assert!(again.json()["error"].as_str().unwrap().contains("exceeds balance"), "{}", again.text);
}

#[tokio::test(flavor = "multi_thread")]
async fn payments_off_the_offer_are_refused_with_402_and_never_reach_the_upstream() {
    let sandbox = X402Sandbox::start().await.unwrap();
    let stack = stack(&sandbox).await;
    let price = stack.forecast_price().micros();
    let forged = {
        // Signed by another key under the payer's name: only the ledger checks signatures
        // by default, and refuses it.
        let mut json = decoded(&sign(&sandbox, &SigningKey::from_slice(&[9; 32]).unwrap(), price));
        json["payload"]["authorization"]["from"] = json!(PAYER);
        STANDARD.encode(json.to_string())
    };
    let cases = [
        (sign(&sandbox, &payer_key(), price - 1), "invalid_payment"),
        (sign(&sandbox, &payer_key(), price + 1), "invalid_payment"),
        ("bm90IGpzb24=".to_owned(), "invalid_payment"),
        (forged, "invalid_payment"),
    ];
    for (payment, code) in cases {
        let answer =
            stack.get("/v1/forecast/oslo", None, &[("payment-signature", &payment)]).await.unwrap();
        assert_eq!((answer.status, answer.code().as_deref()), (402, Some(code)), "{}", answer.text);
        assert!(answer.header("payment-required").is_some());
    }
    assert!(stack.stack.upstream.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_facilitator_settles_for_a_ledger_without_a_key_and_its_refusals_are_kept() {
    let sandbox = X402Sandbox::start().await.unwrap();
    let facilitator = sandbox.start_facilitator().unwrap();
    let stack =
        stack_settling(&sandbox, sandbox.ledger_args_with_facilitator(&facilitator.url)).await;
    let price = stack.forecast_price().micros();
    let payment = sign(&sandbox, &payer_key(), price);
    let served =
        stack.get("/v1/forecast/oslo", None, &[("payment-signature", &payment)]).await.unwrap();
    assert_eq!(served.status, 200, "{}", served.text);
    let charge = settled(&stack, served.header("x-charge-id").unwrap()).await;
    let settlement = charge.settlement.unwrap();
    assert_eq!(settlement.status, "settled", "{settlement:?}");
    assert!(settlement.transaction.unwrap().starts_with("0x"));
    assert_eq!(sandbox.balance(PAYEE).await.unwrap(), U256::from(price));

    // A payer with nothing: the facilitator refuses, and the charge says why.
    let broke = SigningKey::from_slice(&rand::random::<[u8; 32]>()).unwrap();
    let payment = sign(&sandbox, &broke, price);
    let served =
        stack.get("/v1/forecast/oslo", None, &[("payment-signature", &payment)]).await.unwrap();
    assert_eq!(served.status, 200, "{}", served.text);
    let charge = settled(&stack, served.header("x-charge-id").unwrap()).await;
    let settlement = charge.settlement.unwrap();
    assert_eq!(settlement.status, "failed", "{settlement:?}");
    assert!(settlement.reason.unwrap().contains("the facilitator refused"));
    assert_eq!(sandbox.balance(PAYEE).await.unwrap(), U256::from(price));
}

/// A stack whose `/v1/before…` route settles x402 payments before the upstream is called.
async fn settling_first(sandbox: &X402Sandbox) -> TestStack {
    let args = sandbox.ledger_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let routes = json!([
        {"path_prefix": "/v1/forecast", "price_usdc": "0.001"},
        {"path_prefix": "/v1/before", "price_usdc": "0.002", "settle": "before"}
    ]);
    TestStack::start_with(json!({"x402": sandbox.filter_config(), "routes": routes}), &args)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_route_that_settles_before_serves_only_once_the_transfer_is_on_chain() {
    let sandbox = X402Sandbox::start().await.unwrap();
    let stack = settling_first(&sandbox).await;
    let payment = sign(&sandbox, &payer_key(), 2000);
    let served =
        stack.get("/v1/before/report", None, &[("payment-signature", &payment)]).await.unwrap();
    assert_eq!(served.status, 200, "{}", served.text);
    // Already on chain when the answer arrives: no waiting for a settlement job.
    assert_eq!(sandbox.balance(PAYEE).await.unwrap(), U256::from(2000u64));
    let receipt = decoded(served.header("payment-response").unwrap());
    assert!(receipt.get("errorReason").is_none(), "{receipt}");
    let charge = stack.stack.admin.charge(served.header("x-charge-id").unwrap()).await.unwrap();
    let settlement = charge.settlement.unwrap();
    assert_eq!(settlement.status, "settled");
    assert_eq!(receipt["transaction"].as_str(), settlement.transaction.as_deref());
    assert_eq!(charge.status, paystile_protocol::ledger_api::ChargeStatus::Committed);

    // The money moved before the upstream answered: an upstream error is charged all the same.
    let payment = sign(&sandbox, &payer_key(), 2000);
    let failed = stack.get("/v1/before/status/502", None, &[("payment-signature", &payment)]).await;
    let failed = failed.unwrap();
    assert_eq!((failed.status, failed.header("x-amount-usdc")), (502, Some("0.002000")));
    assert_eq!(sandbox.balance(PAYEE).await.unwrap(), U256::from(4000u64));

    // A payment that cannot settle is refused before the upstream sees the call.
    let seen = stack.stack.upstream.seen().len();
    let broke = SigningKey::from_slice(&rand::random::<[u8; 32]>()).unwrap();
    let payment = sign(&sandbox, &broke, 2000);
    let refused =
        stack.get("/v1/before/report", None, &[("payment-signature", &payment)]).await.unwrap();
    assert_eq!((refused.status, refused.code().as_deref()), (402, Some("invalid_payment")));
    assert!(
        refused.json()["error"].as_str().unwrap().contains("exceeds balance"),
        "{}",
        refused.text
    );
    assert_eq!(stack.stack.upstream.seen().len(), seen);
    assert_eq!(sandbox.balance(PAYEE).await.unwrap(), U256::from(4000u64));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_top_up_buys_a_pay_token_and_a_balance_with_one_settled_payment() {
    let sandbox = X402Sandbox::start().await.unwrap();
    let args = sandbox.ledger_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut x402 = sandbox.filter_config();
    x402["top_up"] = json!({"path": "/paystile/top-up", "min_usdc": "1", "max_usdc": "50"});
    let stack = TestStack::start_with(json!({"x402": x402}), &args).await.unwrap();

    // The offer is for the amount asked; an amount out of bounds is a 400.
    let offered = stack.get("/paystile/top-up?amount_usdc=5", None, &[]).await.unwrap();
    assert_eq!((offered.status, offered.code().as_deref()), (402, Some("payment_required")));
    let required = decoded(offered.header("payment-required").unwrap());
    assert_eq!(required["accepts"][0]["amount"], "5000000");
    let small = stack.get("/paystile/top-up?amount_usdc=0.5", None, &[]).await.unwrap();
    assert_eq!((small.status, small.code().as_deref()), (400, Some("bad_request")));

    // Paid: settled before anything is credited, then the token is the answer.
    let payment = sign(&sandbox, &payer_key(), 5_000_000);
    let header = [("payment-signature", payment.as_str())];
    let bought = stack.get("/paystile/top-up?amount_usdc=5", None, &header).await.unwrap();
    assert_eq!(bought.status, 200, "{}", bought.text);
    assert_eq!(sandbox.balance(PAYEE).await.unwrap(), U256::from(5_000_000u64));
    let top_up = bought.json();
    assert_eq!(top_up["buyerId"], PAYER);
    assert_eq!(top_up["balanceUsdc"], "5.000000");
    let receipt = decoded(bought.header("payment-response").unwrap());
    assert_eq!(receipt["transaction"], top_up["transaction"]);
    assert!(stack.stack.upstream.seen().is_empty(), "a top-up never reaches the upstream");

    // The token pays calls as any Pay Token, against the token and the payer's balance.
    let jwt = top_up["token"]["jwt"].as_str().unwrap();
    let paid = stack.paid("/v1/forecast/oslo", jwt).await.unwrap();
    assert_eq!((paid.status, paid.header("x-amount-usdc")), (200, Some("0.001000")));
    stack.settled(top_up["token"]["tokenId"].as_str().unwrap()).await.unwrap();
    let account = stack.stack.admin.buyer(PAYER).await.unwrap().account.unwrap();
    assert_eq!(account.balance_usdc.to_string(), "4.999000");

    // The same payment again, for a top-up or a call: used.
    let again = stack.get("/paystile/top-up?amount_usdc=5", None, &header).await.unwrap();
    assert_eq!((again.status, again.code().as_deref()), (402, Some("payment_already_used")));
    assert_eq!(sandbox.balance(PAYEE).await.unwrap(), U256::from(5_000_000u64));
}
