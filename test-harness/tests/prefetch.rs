//! Prefetched holds through a real Envoy: a hot token's calls go on without a reserve each,
//! the money stays exact, and a revoke answers only once no worker serves the token.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use paystile_harness::e2e::TestStack;
use paystile_protocol::Usdc;
use paystile_protocol::ledger_api::{ChargeQuery, ChargeStatus};
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

/// The kill switch under load, with prefetched holds on every worker: 8 clients call with
/// one token on their own connections (spread over Envoy's two workers) while it is
/// revoked. The revoke answers once every worker's VM has dropped the token's holds, and
/// from then on no call of the token reaches the upstream, nor is any charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoke_under_load_answers_once_no_worker_serves_the_token_any_more() {
    const CLIENTS: usize = 8;
    let stack = prefetching_stack().await;
    let token = stack.issue("5").await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let url = stack.stack.gateway_url("/v1/forecast/kill");
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (stop, url, jwt) = (stop.clone(), url.clone(), token.jwt.clone());
            tokio::spawn(async move {
                // A client of its own: its own connection, to whichever worker takes it.
                let http = reqwest::Client::new();
                let mut statuses = Vec::new();
                for i in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let answer = http.get(format!("{url}-{c}-{i}")).bearer_auth(&jwt).send().await;
                    statuses.push(answer.unwrap().status().as_u16());
                }
                statuses
            })
        })
        .collect();
    // Long enough for every client's token to be hot and its worker's pool in use.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let revoked = stack.stack.admin.revoke_token(&token.token_id).await.unwrap();
    let seen_at_answer = stack.stack.upstream.seen().len();
    assert!(revoked.revoked);
    // The load goes on a while, longer than a prefetched hold's age.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut statuses = Vec::new();
    for client in clients {
        statuses.extend(client.await.unwrap());
    }
    let seen = stack.stack.upstream.seen();
    let late: Vec<&str> = seen[seen_at_answer..]
        .iter()
        .map(|request| request.path.as_str())
        .filter(|path| path.starts_with("/v1/forecast/kill"))
        .collect();
    assert!(
        late.is_empty(),
        "{} calls reached the upstream after the revoke: {late:?}",
        late.len()
    );
    let gateways = revoked.gateways.clone().unwrap();
    assert!(gateways.unconfirmed.is_empty(), "{gateways:?}");
    assert!(gateways.confirmed.len() >= 2, "fewer VMs than workers confirmed: {gateways:?}");
    let served = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 422).count();
    assert_eq!(served + refused, statuses.len(), "unexpected answers: {statuses:?}");
    assert!(served > 10 && refused > 10, "{served} served, {refused} refused");
    // Nothing is charged past what was held when the revoke was made.
    let settled = stack.settled(&token.token_id).await.unwrap();
    assert!(
        settled.used_usdc <= revoked.used_usdc.checked_add(revoked.reserved_usdc).unwrap(),
        "charged after the revocation: {settled:?}, at it {revoked:?}"
    );
    assert_eq!(settled.used_usdc, revoked.used_usdc, "a hold in flight at the revoke was charged");
}

/// Near the cap, with the default configuration (holds prefetched) and calls spread over
/// Envoy's two workers: the token spends its cap exactly, no more and nothing left over,
/// and a hold prefetched on one worker never sits unused for much longer than its maximum
/// age while the other worker's calls are refused for want of budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn near_the_cap_workers_spend_it_exactly_and_idle_holds_go_back_at_their_age() {
    const CLIENTS: usize = 8;
    const CALLS: u64 = 60;
    let stack = TestStack::start().await.unwrap();
    let price = stack.forecast_price();
    let token = stack.issue(&price.checked_mul(CALLS).unwrap().to_string()).await.unwrap();
    let served = Arc::new(AtomicU64::new(0));
    let url = stack.stack.gateway_url("/v1/forecast/cap");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (served, url, jwt) = (served.clone(), url.clone(), token.jwt.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut refused = 0;
                for i in 0.. {
                    if served.load(Ordering::SeqCst) >= CALLS
                        || tokio::time::Instant::now() > deadline
                    {
                        break;
                    }
                    let answer = http.get(format!("{url}-{c}-{i}")).bearer_auth(&jwt).send().await;
                    match answer.unwrap().status().as_u16() {
                        200 => {
                            served.fetch_add(1, Ordering::SeqCst);
                        }
                        402 => {
                            refused += 1;
                            // Budget held elsewhere: try again shortly.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        other => panic!("unexpected {other}"),
                    }
                }
                refused
            })
        })
        .collect();
    let mut refused = 0;
    for client in clients {
        refused += client.await.unwrap();
    }
    assert_eq!(served.load(Ordering::SeqCst), CALLS, "{refused} refused; the cap was not spent");
    let settled = stack.settled(&token.token_id).await.unwrap();
    assert_eq!(settled.used_usdc, settled.limit_usdc, "{settled:?}");
    let paid: Vec<_> = stack
        .stack
        .upstream
        .seen()
        .into_iter()
        .filter(|request| request.path.starts_with("/v1/forecast/cap"))
        .collect();
    assert_eq!(paid.len() as u64, CALLS, "the upstream saw more calls than the cap pays");
    let (reserves, holds) = reserves_and_holds(&stack).await;
    assert!(holds > reserves, "no hold was prefetched ({reserves} reserves, {holds} holds)");
    // Every hold released unused went back within its age, a tick and a settle round trip.
    let query = ChargeQuery {
        token_id: Some(token.token_id.clone()),
        status: Some(ChargeStatus::Released),
        limit: Some(1000),
        ..ChargeQuery::default()
    };
    let page = stack.stack.admin.charges(&query).await.unwrap();
    for charge in page.charges.iter().filter(|c| c.upstream_status.is_none()) {
        let created = at(&charge.created_at);
        let released = at(charge.settled_at.as_deref().unwrap());
        let idle = (released - created).whole_milliseconds();
        assert!(idle < 1000 + 1000, "{} sat unused for {idle} ms", charge.charge_id);
    }
}

fn at(rfc3339: &str) -> time::OffsetDateTime {
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339).unwrap()
}
