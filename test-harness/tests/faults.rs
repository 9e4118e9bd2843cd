//! What happens when the ledger or the upstream fails, through a real Envoy.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use paystile_harness::e2e::TestStack;
use paystile_protocol::Usdc;
use paystile_protocol::ledger_api::ChargeStatus;
use serde_json::json;

const LEDGER_TIMEOUT_MS: u64 = 400;

fn assert_unavailable(answer: &paystile_harness::e2e::Answer) {
    assert_eq!(
        (answer.status, answer.code().as_deref()),
        (503, Some("ledger_unavailable")),
        "{answer:?}"
    );
    assert_eq!(answer.header("retry-after"), Some("1"));
    assert_eq!(answer.header("content-type"), Some("application/json"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_ledger_fails_closed_within_the_timeout_and_recovers() {
    let stack = TestStack::start_with(json!({"ledger": {"timeout_ms": LEDGER_TIMEOUT_MS}}), &[])
        .await
        .unwrap();
    let token = stack.issue("1").await.unwrap();
    assert_eq!(stack.paid("/v1/forecast/a", &token.jwt).await.unwrap().status, 200);

    stack.stack.ledger.signal("STOP").unwrap();
    let started = Instant::now();
    let answer = stack.paid("/v1/forecast/b", &token.jwt).await.unwrap();
    let waited = started.elapsed();
    stack.stack.ledger.signal("CONT").unwrap();

    assert_unavailable(&answer);
    // It waited for the configured timeout (a refused connection fails in about a
    // millisecond; timers are not exact, hence 3/4), and not for the ledger: a stalled
    // ledger would otherwise hold the request until the client's 20 s timeout.
    assert!(
        waited >= Duration::from_millis(LEDGER_TIMEOUT_MS * 3 / 4),
        "did not wait for the timeout: {waited:?}"
    );
    assert!(waited < Duration::from_secs(10), "the timeout did not apply: {waited:?}");
    assert_eq!(stack.stack.upstream.seen().len(), 1, "an unpaid request reached the upstream");

    let after = stack.issue("1").await.unwrap();
    assert_eq!(
        stack.paid("/v1/forecast/c", &after.jwt).await.unwrap().status,
        200,
        "no recovery after SIGCONT"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_ledger_fails_closed_and_a_restarted_one_serves_again() {
    let mut stack =
        TestStack::start_with(json!({"ledger": {"timeout_ms": LEDGER_TIMEOUT_MS}}), &[])
            .await
            .unwrap();
    let token = stack.issue("1").await.unwrap();

    stack.stack.ledger.kill().unwrap();
    for _ in 0..3 {
        assert_unavailable(&stack.paid("/v1/forecast/a", &token.jwt).await.unwrap());
    }
    assert!(stack.stack.upstream.seen().is_empty(), "an unpaid request reached the upstream");

    stack.stack.restart_ledger().unwrap();
    let answer = stack.paid("/v1/forecast/a", &token.jwt).await.unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(
        stack.settled(&token.token_id).await.unwrap().used_usdc,
        "0.001".parse::<Usdc>().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_errors_are_not_charged() {
    let stack = TestStack::start().await.unwrap();
    let token = stack.issue("1").await.unwrap();

    for status in [503, 500, 404] {
        let answer =
            stack.paid(&format!("/v1/forecast/status/{status}"), &token.jwt).await.unwrap();
        assert_eq!(answer.status, status);
        assert_eq!(answer.header("x-amount-usdc"), Some("0.000000"));
        assert_eq!((answer.header("x-charge-id"), answer.header("x-remaining-usdc")), (None, None));
    }
    let settled = stack.settled(&token.token_id).await.unwrap();
    assert_eq!((settled.used_usdc, settled.reserved_usdc), (Usdc::ZERO, Usdc::ZERO));

    // Each call held a charge that the upstream saw, and each was released.
    let seen = stack.stack.upstream.seen();
    assert_eq!(seen.len(), 3);
    for (request, status) in seen.iter().zip([503, 500, 404]) {
        let charge = stack.stack.admin.charge(&request.headers["x-charge-id"]).await.unwrap();
        assert_eq!((charge.status, charge.upstream_status), (ChargeStatus::Released, Some(status)));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_open_lets_calls_through_unpaid_and_says_so() {
    let filter = json!({"failure_mode": "open", "ledger": {"timeout_ms": LEDGER_TIMEOUT_MS}});
    let mut stack = TestStack::start_with(filter, &[]).await.unwrap();
    let token = stack.issue("1").await.unwrap();
    stack.stack.ledger.kill().unwrap();

    let answer = stack.paid("/v1/forecast/open", &token.jwt).await.unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(
        (answer.header("x-amount-usdc"), answer.header("x-charge-id")),
        (Some("0.000000"), None)
    );
    let seen = &stack.stack.upstream.seen()[0];
    assert!(
        !seen.headers.contains_key("authorization") && !seen.headers.contains_key("x-charge-id")
    );
    // Verification still runs inline: a bad token is refused even with the ledger down.
    let answer = stack.get("/v1/forecast/open", Some("Bearer forged"), &[]).await.unwrap();
    assert_eq!(answer.status, 401);
}
