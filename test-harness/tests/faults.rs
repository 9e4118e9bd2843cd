//! What happens when the ledger, the upstream or Envoy fails, through a real Envoy.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use paystile_harness::e2e::TestStack;
use paystile_protocol::Usdc;
use paystile_protocol::ledger_api::{ChargeQuery, ChargeStatus};
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

/// A client's call: its Idempotency-Key, the charge its 200 carried, and whether it was sent
/// after Envoy's restart.
struct Answered {
    key: String,
    charge_id: String,
    after_restart: bool,
}

/// Envoy killed with -9 and restarted on its port under load, while every client retries each
/// failed call with the same Idempotency-Key until it is answered: no key is charged twice, the
/// dead gateway's unsettled holds expire, and the token's used amount is exactly its
/// committed charges. (The commits the dead gateway still had queued die with it: those calls
/// go unpaid, which the seller loses and the buyer never pays for.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn envoy_restarted_under_load_never_charges_a_retried_key_twice() {
    const CLIENTS: usize = 8;
    const CALLS_EACH: usize = 15;
    let mut stack = TestStack::start_with(json!({}), &["--hold-ttl-seconds", "2"]).await.unwrap();
    let token = stack.issue("1").await.unwrap();
    let price = stack.forecast_price();
    let answered = Arc::new(AtomicUsize::new(0));
    let restarted = Arc::new(AtomicBool::new(false));
    let retried = Arc::new(AtomicUsize::new(0));

    let gateway = stack.stack.gateway_url("");
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (http, jwt, gateway) = (stack.http.clone(), token.jwt.clone(), gateway.clone());
            let (answered, restarted, retried) =
                (answered.clone(), restarted.clone(), retried.clone());
            tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(30);
                let mut calls = Vec::new();
                for call in 0..CALLS_EACH {
                    let key = format!("order-{client}-{call}");
                    // The upstream's delay keeps calls in flight when Envoy dies.
                    let url = format!("{gateway}/v1/forecast/{key}?delay_ms=30");
                    loop {
                        assert!(Instant::now() < deadline, "{key} never answered");
                        let after_restart = restarted.load(Ordering::SeqCst);
                        let sent = http
                            .get(&url)
                            .bearer_auth(&jwt)
                            .header("idempotency-key", &key)
                            .send()
                            .await;
                        let retry_in = match sent.map(|r| (r.status().as_u16(), r)) {
                            Ok((200, response)) => {
                                let charge_id = response.headers()["x-charge-id"].to_str();
                                let charge_id = charge_id.unwrap().to_owned();
                                calls.push(Answered { key, charge_id, after_restart });
                                answered.fetch_add(1, Ordering::SeqCst);
                                break;
                            }
                            // The gateway is down or restarting.
                            Err(_) => 100,
                            // The dead gateway's hold on this key, until it expires.
                            Ok((409, _)) => 200,
                            Ok((status, response)) => {
                                panic!("{key}: {status} {:?}", response.text().await)
                            }
                        };
                        retried.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(retry_in)).await;
                    }
                }
                calls
            })
        })
        .collect();

    let deadline = Instant::now() + Duration::from_secs(30);
    while answered.load(Ordering::SeqCst) < CLIENTS * CALLS_EACH / 4 {
        assert!(Instant::now() < deadline, "no load before the restart");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stack.stack.restart_envoy().await.unwrap();
    restarted.store(true, Ordering::SeqCst);
    let mut calls = Vec::new();
    for client in clients {
        calls.extend(client.await.unwrap());
    }
    assert_eq!(calls.len(), CLIENTS * CALLS_EACH);
    assert!(retried.load(Ordering::SeqCst) > 0, "no call failed: the test proved nothing");

    let settled = stack.settled(&token.token_id).await.unwrap();
    let mut committed: HashMap<String, String> = HashMap::new();
    let mut query = ChargeQuery {
        token_id: Some(token.token_id.clone()),
        limit: Some(1000),
        ..Default::default()
    };
    loop {
        let page = stack.stack.admin.charges(&query).await.unwrap();
        for charge in page.charges.into_iter().filter(|c| c.status == ChargeStatus::Committed) {
            assert_eq!(charge.amount_usdc, price);
            let key = charge.idempotency_key.unwrap();
            let twice = committed.insert(key.clone(), charge.charge_id);
            assert!(twice.is_none(), "{key} was charged twice");
        }
        match page.next_cursor {
            Some(cursor) => query.cursor = Some(cursor),
            None => break,
        }
    }
    assert_eq!(settled.used_usdc, price.checked_mul(committed.len() as u64).unwrap());
    // What the new gateway answered was committed: only the dead one's queue was lost.
    for call in calls.iter().filter(|c| c.after_restart) {
        assert_eq!(committed.get(&call.key), Some(&call.charge_id), "{}", call.key);
    }
    assert!(calls.iter().any(|c| c.after_restart), "nothing was sent after the restart");
    assert!(committed.keys().all(|key| calls.iter().any(|c| &c.key == key)));
}
