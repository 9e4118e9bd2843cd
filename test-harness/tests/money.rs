//! The money guarantees, through a real Envoy: no call charged twice, no token spent past its
//! cap under concurrency, and no answered charge lost when the ledger is killed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use paystile_harness::e2e::{TestStack, unix_now};
use paystile_protocol::Usdc;
use paystile_protocol::jws::SigningKey;
use paystile_protocol::ledger_api::{self, ChargeQuery, ChargeStatus, ChargeView, ReserveRequest};
use paystile_protocol::pay_token::{self, PayTokenClaims, Scope};
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

/// Every charge of `token_id` in the journal.
async fn journal(stack: &TestStack, token_id: &str) -> Vec<ChargeView> {
    let mut query =
        ChargeQuery { token_id: Some(token_id.into()), limit: Some(1000), ..Default::default() };
    let mut charges = Vec::new();
    loop {
        let page = stack.stack.admin.charges(&query).await.unwrap();
        charges.extend(page.charges);
        match page.next_cursor {
            Some(cursor) => query.cursor = Some(cursor),
            None => return charges,
        }
    }
}

/// The ledger stalled past the filter's timeout (the reserves it then answers late may become
/// holds that no gateway will settle; a gateway's reserve just before the kill, never settled,
/// surely does) and killed with -9 under load, restarted, and loaded
/// until the cap is spent: every answered charge is committed, the orphaned holds expire,
/// and the token is spent exactly to its cap, never past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answered_charges_survive_kill_9_of_the_ledger_under_load() {
    const CLIENTS: usize = 8;
    const CAP_CALLS: usize = 150;
    // Orphaned holds expire quickly here.
    let ledger_args = ["--hold-ttl-seconds", "3"];
    // Every call reserves: this is about the ledger's crash, and a stalled ledger's late
    // batch reserves (prefetched holds orphaned until their TTL) would hold the rest of the
    // cap that the dying gateway's reserve below needs.
    let filter = json!({"ledger": {"timeout_ms": 500, "prefetch_holds": 0}});
    let mut stack = TestStack::start_with(filter, &ledger_args).await.unwrap();
    let price = stack.forecast_price();
    let cap = price.checked_mul(CAP_CALLS as u64).unwrap();
    let token = stack.issue(&cap.to_string()).await.unwrap();
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
                    // The upstream's delay keeps calls in flight when the ledger dies.
                    let url = format!("{gateway}/v1/forecast/k{client}-{call}?delay_ms=20");
                    let response = http.get(url).bearer_auth(&jwt).send().await.unwrap();
                    let status = response.status().as_u16();
                    let header = |name| response.headers()[name].to_str().unwrap().to_owned();
                    match status {
                        200 => {
                            charged.push((header("x-charge-id"), header("x-amount-usdc")));
                            paid.fetch_add(1, Ordering::SeqCst);
                        }
                        503 => unavailable += 1,
                        // Spent, or held by holds that have yet to expire.
                        402 => tokio::time::sleep(Duration::from_millis(50)).await,
                        other => panic!("unexpected status {other}"),
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (charged, unavailable)
            })
        })
        .collect();

    reach(&paid, 30).await;
    stack.stack.ledger.signal("STOP").unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    stack.stack.ledger.signal("CONT").unwrap();
    reach(&paid, paid.load(Ordering::SeqCst) + 30).await;
    // Whether the stall's late reserves become holds depends on how Envoy closed their
    // connections: a gateway that dies between its reserve and its settle always leaves one.
    let reserve = ReserveRequest {
        credential: format!("Bearer {}", token.jwt).into(),
        service_id: stack.service_id(),
        price_usdc: price,
        idempotency: None,
        count: 1,
        extras_until_ms: None,
        settle_until_ms: None,
    };
    let orphan = stack
        .http
        .post(format!("{}{}", stack.stack.ledger.url(), ledger_api::path::HOLDS))
        .bearer_auth(&stack.stack.secrets.gateway_key)
        .json(&reserve)
        .send()
        .await
        .unwrap();
    assert_eq!(orphan.status(), 200, "the dying gateway's reserve");
    stack.stack.ledger.kill().unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    stack.stack.restart_ledger().unwrap();
    // The whole cap: only once the orphaned holds have expired.
    reach(&paid, CAP_CALLS).await;
    stop.store(true, Ordering::SeqCst);

    let (mut charged, mut unavailable) = (HashMap::new(), 0);
    for client in clients {
        let (answers, down) = client.await.unwrap();
        for (charge_id, amount) in answers {
            assert_eq!(amount, "0.001000");
            assert!(charged.insert(charge_id, amount).is_none(), "a charge id was reused");
        }
        unavailable += down;
    }
    assert!(unavailable > 0, "no call saw the ledger down: the test proved nothing");
    assert_eq!(charged.len(), CAP_CALLS, "more calls were paid than the cap allows");

    // Every response that carried an X-Charge-Id is a committed charge; every other hold
    // (reserved, never answered) expired and charged nothing.
    let spent = stack.settled(&token.token_id).await.unwrap();
    assert_eq!((spent.used_usdc, spent.reserved_usdc), (cap, Usdc::ZERO));
    let charges = journal(&stack, &token.token_id).await;
    let mut orphans = 0;
    for charge in &charges {
        if charged.contains_key(&charge.charge_id) {
            assert_eq!((charge.status, charge.amount_usdc), (ChargeStatus::Committed, price));
        } else {
            assert_eq!((charge.status, charge.amount_usdc), (ChargeStatus::Released, Usdc::ZERO));
            orphans += 1;
        }
    }
    assert_eq!(charges.len() - orphans, CAP_CALLS, "an answered charge is not in the journal");
    assert!(orphans > 0, "the stall left no hold to expire: the test proved nothing");
    let answer = stack.paid("/v1/forecast/after", &token.jwt).await.unwrap();
    assert_eq!(answer.code().as_deref(), Some("token_limit_exceeded"), "{answer:?}");
}

/// A token of the 1,000: `forecasts` calls at 0.001 USDC, plus one premium report at 0.25
/// for every fifth token (`mixed`), which alternates its calls between the two routes.
struct Spender {
    token_id: String,
    jwt: String,
    limit: Usdc,
    forecasts: usize,
    mixed: bool,
}

impl Spender {
    /// Token `i`: even ones issued by the ledger, odd ones minted with the shared secret
    /// (the ledger first sees them at their first reserve).
    async fn new(stack: &TestStack, key: &SigningKey, i: usize) -> Spender {
        let forecasts = 1 + i % 4;
        let mixed = i.is_multiple_of(5);
        let mut limit = stack.forecast_price().checked_mul(forecasts as u64).unwrap();
        if mixed {
            limit = limit.checked_add("0.25".parse().unwrap()).unwrap();
        }
        let (token_id, jwt) = if i.is_multiple_of(2) {
            let issued = stack.issue(&limit.to_string()).await.unwrap();
            (issued.token_id, issued.jwt)
        } else {
            let claims = PayTokenClaims {
                sub: format!("agent-{i}"),
                jti: format!("tok_minted_{i}"),
                service_id: Some(stack.service_id()),
                limit_usdc: limit,
                scope: Scope::Single,
                buyer_tag: None,
                exp: unix_now() + 3600,
                iat: Some(unix_now()),
                nbf: None,
                iss: None,
                aud: None,
                sandbox: false,
            };
            (claims.jti.clone(), pay_token::sign(&claims, key))
        };
        Spender { token_id, jwt, limit, forecasts, mixed }
    }
}

/// 1,000 tokens spent by 20 agents at once through Envoy, each token's calls taken by several
/// agents concurrently. Every token's used amount is exactly
/// the sum of its billed answers, and none is spent past its cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_tokens_spent_by_twenty_agents_are_each_exact() {
    const TOKENS: usize = 1000;
    const AGENTS: usize = 20;
    const ATTEMPTS: usize = 5;
    let stack = Arc::new(TestStack::start().await.unwrap());
    let key = SigningKey::hs256(stack.stack.secrets.token_secret.as_bytes());
    let mut spenders = Vec::with_capacity(TOKENS);
    for chunk in (0..TOKENS).collect::<Vec<_>>().chunks(AGENTS) {
        let made: Vec<_> = chunk
            .iter()
            .map(|&i| {
                let (stack, key) = (stack.clone(), key.clone());
                tokio::spawn(async move { Spender::new(&stack, &key, i).await })
            })
            .collect();
        for spender in made {
            spenders.push(spender.await.unwrap());
        }
    }
    let spenders = Arc::new(spenders);

    // The work: each token's attempts one after another, so that the agents take them at
    // the same time.
    let next = Arc::new(AtomicUsize::new(0));
    let agents: Vec<_> = (0..AGENTS)
        .map(|_| {
            let (stack, spenders, next) = (stack.clone(), spenders.clone(), next.clone());
            tokio::spawn(async move {
                let mut billed = Vec::new();
                loop {
                    let item = next.fetch_add(1, Ordering::SeqCst);
                    let Some(spender) = spenders.get(item / ATTEMPTS) else { break };
                    let attempt = item % ATTEMPTS;
                    let path = if spender.mixed && attempt.is_multiple_of(2) {
                        "/v1/premium/report".to_owned()
                    } else {
                        format!("/v1/forecast/{item}")
                    };
                    let answer = stack.paid(&path, &spender.jwt).await.unwrap();
                    match answer.status {
                        200 => {
                            let amount: Usdc =
                                answer.header("x-amount-usdc").unwrap().parse().unwrap();
                            billed.push((item / ATTEMPTS, amount));
                        }
                        402 => assert_eq!(
                            answer.code().as_deref(),
                            Some("token_limit_exceeded"),
                            "{answer:?}"
                        ),
                        other => panic!("unexpected {other}: {answer:?}"),
                    }
                }
                billed
            })
        })
        .collect();
    let mut billed = vec![(Usdc::ZERO, 0usize); TOKENS];
    for agent in agents {
        for (token, amount) in agent.await.unwrap() {
            let (sum, calls) = &mut billed[token];
            *sum = sum.checked_add(amount).unwrap();
            *calls += 1;
        }
    }

    // Every token as the ledger has it, read by 20 tasks.
    let checks: Vec<_> = (0..AGENTS)
        .map(|agent| {
            let (stack, spenders) = (stack.clone(), spenders.clone());
            let billed: Vec<_> = billed.iter().copied().skip(agent).step_by(AGENTS).collect();
            tokio::spawn(async move {
                let tokens = spenders.iter().skip(agent).step_by(AGENTS);
                for (spender, (sum, calls)) in tokens.zip(billed) {
                    let token = stack.settled(&spender.token_id).await.unwrap();
                    assert_eq!(
                        token.used_usdc, sum,
                        "{}: used is not what was billed",
                        spender.token_id
                    );
                    assert!(token.used_usdc <= spender.limit, "{} overspent", spender.token_id);
                    if !spender.mixed {
                        // One price: exactly as many calls as the cap allows went through.
                        assert_eq!(calls, spender.forecasts.min(ATTEMPTS), "{}", spender.token_id);
                    }
                }
            })
        })
        .collect();
    for check in checks {
        check.await.unwrap();
    }
    let calls: usize = billed.iter().map(|(_, calls)| calls).sum();
    assert_eq!(stack.stack.upstream.seen().len(), calls, "only billed calls reach the upstream");
}

/// Envoy stopped under load the way the README says (`scripts/drain-gateway`: listeners
/// drained, the filter's queued settlements delivered; then SIGTERM): every response that
/// carried an `X-Charge-Id` is committed, and no hold is left open. (A bare SIGTERM under
/// the same load, measured by hand for issue 15, left 1 to 13 of about 340 answered charges
/// uncommitted.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_stopped_under_load_commits_every_charge_it_answered() {
    const CLIENTS: usize = 12;
    let mut stack = TestStack::start().await.unwrap();
    let token = stack.issue("100").await.unwrap();
    let bearer = format!("Bearer {}", token.jwt);
    let url = stack.stack.gateway_url("/v1/forecast/stop");
    let paid = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (http, url, bearer, paid) =
                (stack.http.clone(), url.clone(), bearer.clone(), paid.clone());
            tokio::spawn(async move {
                let mut charged = Vec::new();
                // Until the gateway stops answering.
                while let Ok(response) =
                    http.get(&url).header("authorization", &bearer).send().await
                {
                    if let Some(charge_id) = response.headers().get("x-charge-id") {
                        charged.push(charge_id.to_str().unwrap().to_owned());
                        paid.fetch_add(1, Ordering::SeqCst);
                    }
                    assert!(matches!(response.status().as_u16(), 200 | 503), "{response:?}");
                }
                charged
            })
        })
        .collect();
    reach(&paid, 300).await;
    let drained = stack.stack.envoy.stop_gracefully(Duration::from_secs(20)).await.unwrap();
    assert!(drained, "scripts/drain-gateway did not finish");

    let mut charged = HashSet::new();
    for client in clients {
        for charge_id in client.await.unwrap() {
            assert!(charged.insert(charge_id), "a charge id was reused");
        }
    }
    assert!(charged.len() >= 300);
    let journal = journal(&stack, &token.token_id).await;
    let committed: HashSet<&str> = journal
        .iter()
        .filter(|c| c.status == ChargeStatus::Committed)
        .map(|c| c.charge_id.as_str())
        .collect();
    let lost: Vec<_> = charged.iter().filter(|id| !committed.contains(id.as_str())).collect();
    assert!(lost.is_empty(), "{} of {} answered charges not committed", lost.len(), charged.len());
    let view = stack.stack.admin.token(&token.token_id).await.unwrap();
    assert_eq!(view.reserved_usdc, Usdc::ZERO, "a hold was left open");
    assert_eq!(view.used_usdc, stack.forecast_price().checked_mul(committed.len() as u64).unwrap());
}
