//! Prefetched holds through a real Envoy: a hot token's calls go on without a reserve each,
//! the money stays exact, and a revocation reaches the workers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::time::Duration;

use paystile_harness::e2e::TestStack;
use paystile_protocol::Usdc;
use serde_json::json;

const CALLS: u64 = 40;

async fn prefetching_stack() -> TestStack {
    let filter = json!({"ledger": {"prefetch_holds": 8, "prefetch_max_age_ms": 2000}});
    TestStack::start_with(filter, &[]).await.unwrap()
}

/// A counter of the ledger's metrics.
async fn counter(stack: &TestStack, name: &str) -> u64 {
    let text = stack
        .http
        .get(format!("{}/metrics", stack.stack.ledger.url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = text.lines().find(|l| l.split(' ').next() == Some(name));
    let value = line.and_then(|l| l.split(' ').nth(1)).unwrap_or_else(|| panic!("no {name}"));
    value.parse::<f64>().unwrap() as u64
}

/// Reserves the ledger answered with a hold, and the holds they placed.
async fn reserves_and_holds(stack: &TestStack) -> (u64, u64) {
    let holds = counter(stack, "paystile_ledger_holds_total").await;
    let extra = counter(stack, "paystile_ledger_prefetched_holds_total").await;
    (holds - extra, holds)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hot_tokens_calls_go_on_without_a_reserve_each_and_are_charged_exactly() {
    let stack = prefetching_stack().await;
    let token = stack.issue("1").await.unwrap();
    let mut charges = HashSet::new();
    let mut billed = Usdc::ZERO;
    for i in 0..CALLS {
        let answer = stack.paid(&format!("/v1/forecast/c{i}"), &token.jwt).await.unwrap();
        assert_eq!(answer.status, 200, "{answer:?}");
        let charge_id = answer.header("x-charge-id").unwrap().to_owned();
        assert!(charges.insert(charge_id), "a charge id served two calls");
        billed =
            billed.checked_add(answer.header("x-amount-usdc").unwrap().parse().unwrap()).unwrap();
    }
    let (reserves, holds) = reserves_and_holds(&stack).await;
    // One keep-alive connection: one worker, whose pool serves 7 calls of every 8 once hot.
    assert!(reserves <= CALLS / 3, "{reserves} reserves for {CALLS} calls");
    assert!(holds >= CALLS, "{holds} holds for {CALLS} calls");
    // The upstream saw each call once, with its own charge id and no credential.
    let seen = stack.stack.upstream.seen();
    assert_eq!(seen.len() as u64, CALLS);
    // Unused prefetched holds are released at their age; what is charged is what was billed.
    let settled = stack.settled(&token.token_id).await.unwrap();
    assert_eq!(settled.used_usdc, billed);
    assert_eq!(billed, stack.forecast_price().checked_mul(CALLS).unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revocation_reaches_a_prefetching_worker_and_nothing_after_it_is_charged() {
    let stack = prefetching_stack().await;
    let token = stack.issue("1").await.unwrap();
    for i in 0..10 {
        let answer = stack.paid(&format!("/v1/forecast/w{i}"), &token.jwt).await.unwrap();
        assert_eq!(answer.status, 200);
    }
    let revoked = stack.stack.admin.revoke_token(&token.token_id).await.unwrap();
    assert!(revoked.revoked);
    // Calls may still go on from the holds this worker prefetched until a settlement tells
    // it of the revocation (or they age out): then every call is refused.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut served_after = 0;
    loop {
        let answer = stack.paid("/v1/forecast/after", &token.jwt).await.unwrap();
        match answer.status {
            200 => served_after += 1,
            422 => {
                assert_eq!(answer.code().as_deref(), Some("token_revoked"));
                break;
            }
            other => panic!("unexpected {other}: {answer:?}"),
        }
        assert!(tokio::time::Instant::now() < deadline, "still served {served_after} calls");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..5 {
        let answer = stack.paid("/v1/forecast/later", &token.jwt).await.unwrap();
        assert_eq!(answer.status, 422, "a call went on after the refusal: {answer:?}");
    }
    let settled = stack.settled(&token.token_id).await.unwrap();
    assert!(
        settled.used_usdc <= revoked.used_usdc.checked_add(revoked.reserved_usdc).unwrap(),
        "charged after the revocation: {settled:?}, at it {revoked:?}"
    );
    // Holds in flight at the revocation are voided too: none of these calls is charged.
    assert_eq!(settled.used_usdc, revoked.used_usdc, "{served_after} calls served after");
}
