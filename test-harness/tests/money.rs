//! The money guarantees, through a real Envoy: no call charged twice, no token spent past its
//! cap under concurrency, and no answered charge lost when the ledger is killed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use paystile_harness::e2e::TestStack;
use paystile_protocol::Usdc;
use paystile_protocol::ledger_api::ChargeStatus;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn an_idempotent_retry_reaches_the_upstream_but_is_charged_once() {
    let stack = TestStack::start().await.unwrap();
    let token = stack.issue("1").await.unwrap();
    let bearer = format!("Bearer {}", token.jwt);
    let call = |path: &'static str, key: &'static str| {
        let (stack, bearer) = (&stack, bearer.clone());
        async move { stack.get(path, Some(&bearer), &[("idempotency-key", key)]).await.unwrap() }
    };

    let first = call("/v1/forecast/rome", "order-17").await;
    assert_eq!(first.status, 200);
    let charge_id = first.header("x-charge-id").unwrap().to_owned();
    stack.settled(&token.token_id).await.unwrap();

    let retry = call("/v1/forecast/rome", "order-17").await;
    assert_eq!(retry.status, 200);
    assert_eq!(
        retry.header("x-charge-id"),
        Some(charge_id.as_str()),
        "the retry got another charge"
    );
    assert_eq!(retry.header("x-amount-usdc"), Some("0.001000"));
    assert_eq!(stack.stack.upstream.seen().len(), 2, "the retry did not reach the upstream");
    assert_eq!(
        stack.settled(&token.token_id).await.unwrap().used_usdc,
        "0.001".parse::<Usdc>().unwrap()
    );

    let other = call("/v1/forecast/paris", "order-17").await;
    assert_eq!((other.status, other.code().as_deref()), (422, Some("idempotency_key_mismatch")));

    // The same key while the first request is still in flight.
    let slow = tokio::spawn({
        let (http, url, bearer) = (
            stack.http.clone(),
            stack.stack.gateway_url("/v1/forecast/slow?delay_ms=1500"),
            bearer.clone(),
        );
        async move {
            http.get(url)
                .header("authorization", bearer)
                .header("idempotency-key", "order-18")
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    let busy = call("/v1/forecast/slow?delay_ms=1500", "order-18").await;
    assert_eq!((busy.status, busy.code().as_deref()), (409, Some("idempotency_key_in_use")));
    assert_eq!(slow.await.unwrap(), 200);

    assert_eq!(
        stack.settled(&token.token_id).await.unwrap().used_usdc,
        "0.002".parse::<Usdc>().unwrap()
    );
    assert_eq!(
        stack.stack.admin.charge(&charge_id).await.unwrap().idempotency_key.as_deref(),
        Some("order-17")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_clients_spend_exactly_the_cap() {
    const CLIENTS: usize = 50;
    const CALLS_EACH: usize = 3;
    const ALLOWED: u64 = 37;
    let stack = Arc::new(TestStack::start().await.unwrap());
    let price = stack.forecast_price();
    let cap = price.checked_mul(ALLOWED).unwrap();
    let token = stack.issue(&cap.to_string()).await.unwrap();

    let clients = (0..CLIENTS).map(|client| {
        let (stack, jwt) = (stack.clone(), token.jwt.clone());
        tokio::spawn(async move {
            let mut answers = Vec::new();
            for call in 0..CALLS_EACH {
                answers.push(
                    stack.paid(&format!("/v1/forecast/c{client}-{call}"), &jwt).await.unwrap(),
                );
            }
            answers
        })
    });
    let mut charges = HashSet::new();
    let mut refused = 0;
    for client in clients {
        for answer in client.await.unwrap() {
            match answer.status {
                200 => assert!(
                    charges.insert(answer.header("x-charge-id").unwrap().to_owned()),
                    "a charge id was reused"
                ),
                402 => {
                    assert_eq!(answer.code().as_deref(), Some("token_limit_exceeded"));
                    refused += 1;
                }
                other => panic!("unexpected {other}: {answer:?}"),
            }
        }
    }
    assert_eq!(charges.len() as u64, ALLOWED);
    assert_eq!(refused, CLIENTS * CALLS_EACH - ALLOWED as usize);
    assert_eq!(
        stack.stack.upstream.seen().len() as u64,
        ALLOWED,
        "only paid calls reach the upstream"
    );
    let token = stack.settled(&token.token_id).await.unwrap();
    assert_eq!((token.used_usdc, token.remaining_usdc), (cap, Usdc::ZERO));
}

/// Waits until `count` reaches `target`, for at most 30 s.
async fn reach(count: &AtomicUsize, target: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while count.load(Ordering::SeqCst) < target {
        assert!(
            tokio::time::Instant::now() < deadline,
            "stuck at {} of {target} paid calls",
            count.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answered_charges_survive_kill_9_of_the_ledger_under_load() {
    const CLIENTS: usize = 8;
    // Holds orphaned by the crash (reserved, never answered) expire quickly here.
    let ledger_args = ["--hold-ttl-seconds", "5"];
    let mut stack =
        TestStack::start_with(json!({"ledger": {"timeout_ms": 500}}), &ledger_args).await.unwrap();
    let token = stack.issue("5").await.unwrap();
    let paid = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));

    let gateway = stack.stack.gateway_url("");
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (http, jwt, gateway) = (stack.http.clone(), token.jwt.clone(), gateway.clone());
            let (paid, stop) = (paid.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut charged, mut unavailable) = (Vec::new(), 0);
                for call in 0.. {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let url = format!("{gateway}/v1/forecast/k{client}-{call}");
                    let response = http.get(url).bearer_auth(&jwt).send().await.unwrap();
                    match response.status().as_u16() {
                        200 => {
                            charged.push(
                                response.headers()["x-charge-id"].to_str().unwrap().to_owned(),
                            );
                            paid.fetch_add(1, Ordering::SeqCst);
                        }
                        503 => unavailable += 1,
                        other => panic!("unexpected status {other}"),
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (charged, unavailable)
            })
        })
        .collect();

    // Load, kill -9 in the middle of it, restart, and load again.
    reach(&paid, 40).await;
    stack.stack.ledger.kill().unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    stack.stack.restart_ledger().unwrap();
    let before_restart = paid.load(Ordering::SeqCst);
    reach(&paid, before_restart + 40).await;
    stop.store(true, Ordering::SeqCst);

    let (mut charged, mut unavailable) = (Vec::new(), 0);
    for client in clients {
        let (ids, down) = client.await.unwrap();
        charged.extend(ids);
        unavailable += down;
    }
    assert!(unavailable > 0, "no call saw the ledger down: the test proved nothing");

    // Every response that carried an X-Charge-Id is a committed charge, and nothing else is.
    let token = stack.settled(&token.token_id).await.unwrap();
    for charge_id in &charged {
        let charge = stack.stack.admin.charge(charge_id).await.unwrap();
        assert_eq!(
            (charge.status, charge.amount_usdc),
            (ChargeStatus::Committed, stack.forecast_price()),
            "{charge_id}"
        );
    }
    let expected = stack.forecast_price().checked_mul(charged.len() as u64).unwrap();
    assert_eq!(
        token.used_usdc, expected,
        "charges without a response, or responses without a charge"
    );
    assert!(token.used_usdc <= token.limit_usdc);
}
