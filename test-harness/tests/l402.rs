//! L402 through a real Envoy 1.40 running the release filter, the real ledger binary on its
//! sandbox invoice backend, and the demo upstream: a client's whole journey, and the L402
//! rows of the status table.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use paystile_harness::e2e::{TestStack, unix_now};
use paystile_protocol::l402::{self, Identifier, Offer};
use paystile_protocol::ledger_api::ChargeStatus;
use paystile_protocol::{Usdc, macaroon::Macaroon};
use serde_json::json;

fn usdc(amount: &str) -> Usdc {
    amount.parse().unwrap()
}

/// A stack whose L402 payment buys `budget` of the 0.001 USDC calls on `/v1/forecast…`.
async fn stack(budget: &str) -> TestStack {
    let filter = json!({
        "routes": [{"path_prefix": "/v1/forecast", "price_usdc": "0.001"}],
        "l402": {"budget_usdc": budget},
    });
    TestStack::start_with(filter, &[]).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_buys_a_budget_spends_it_and_is_offered_more() {
    let stack = stack("0.003").await;

    // 1. No credential: both challenges, L402's first and last, with a checksummed regtest
    // invoice. A client that keeps the first field (Go's `Header.Get`), the last (a dict of
    // the headers) or the joined value finds the same L402 challenge, and Bearer is offered.
    let challenged = stack.get("/v1/forecast/oslo", None, &[]).await.unwrap();
    assert_eq!((challenged.status, challenged.code().as_deref()), (402, Some("payment_required")));
    let fields = &challenged.challenges;
    assert_eq!(fields.len(), 3, "{fields:?}");
    assert!(fields[0].starts_with("L402 macaroon=\""));
    assert!(fields[1].starts_with("Bearer realm=\"paystile\""));
    let joined = fields.join(", ");
    let first = l402::parse_challenge(&fields[0]).unwrap();
    assert_eq!(l402::parse_challenge(&fields[2]), Some(first));
    assert_eq!(l402::parse_challenge(&joined), Some(first));
    assert!(joined.contains("Bearer realm=\"paystile\""));
    assert_eq!(challenged.json()["schemes"], json!(["L402", "Bearer"]));
    assert_eq!(challenged.json()["sandbox"], true);
    let (macaroon, invoice) = challenged.l402_challenge().unwrap();
    // 0.003 USDC at 1000 sat/USDC: 3 sat.
    assert!(invoice.starts_with("lnbcrt30n1"), "{invoice}");
    assert!(stack.stack.upstream.seen().is_empty());

    // 2. Pay through the sandbox; 3. call again with the credential.
    let credential = stack.buy_l402(&challenged).await.unwrap();
    assert!(credential.starts_with(&format!("L402 {macaroon}:")));
    let answer = stack.get("/v1/forecast/oslo", Some(&credential), &[]).await.unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    let charge_id = answer.header("x-charge-id").unwrap().to_owned();
    assert_eq!(answer.header("x-amount-usdc"), Some("0.001000"));
    assert_eq!(answer.header("x-remaining-usdc"), Some("0.002000"));
    let seen = stack.stack.upstream.seen();
    assert_eq!(seen.len(), 1);
    assert!(!seen[0].headers.contains_key("authorization"), "the credential reached upstream");
    assert_eq!(seen[0].headers.get("x-charge-id"), Some(&charge_id));

    // Spend the rest; the next call gets a fresh challenge for a new token.
    for remaining in ["0.001000", "0.000000"] {
        let answer = stack.get("/v1/forecast/oslo", Some(&credential), &[]).await.unwrap();
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.header("x-remaining-usdc"), Some(remaining));
    }
    let spent = stack.get("/v1/forecast/oslo", Some(&credential), &[]).await.unwrap();
    assert_eq!((spent.status, spent.code().as_deref()), (402, Some("token_limit_exceeded")));
    assert_eq!(spent.json()["limit"], "0.003000");
    let (fresh, _) = spent.l402_challenge().expect("a fresh challenge");
    assert_ne!(fresh, macaroon);
    assert_eq!(stack.stack.upstream.seen().len(), 3, "the refused call stayed at the gateway");

    let charge = stack.stack.admin.charge(&charge_id).await.unwrap();
    let token_id = charge.token_id;
    assert!(token_id.starts_with("l402_"), "{token_id}");
    let token = stack.settled(&token_id).await.unwrap();
    assert_eq!((token.used_usdc, token.limit_usdc), (usdc("0.003"), usdc("0.003")));
    let charge = stack.stack.admin.charge(&charge_id).await.unwrap();
    assert_eq!((charge.status, charge.amount_usdc), (ChargeStatus::Committed, usdc("0.001")));

    // The new budget works.
    let more = stack.buy_l402(&spent).await.unwrap();
    let answer = stack.get("/v1/forecast/oslo", Some(&more), &[]).await.unwrap();
    assert_eq!((answer.status, answer.header("x-remaining-usdc")), (200, Some("0.002000")));

    // The credential appears in no log of the gateway, the one place that sees it.
    let preimage = credential.rsplit(':').next().unwrap();
    let envoy_log = stack.stack.envoy.log_text();
    assert!(!envoy_log.is_empty());
    assert!(!envoy_log.contains(preimage) && !envoy_log.contains(&macaroon));
}

/// How many `POST /v1/l402/challenges` the ledger has answered, from its metrics.
async fn challenge_calls(stack: &TestStack) -> u64 {
    let url = format!("{}/metrics", stack.stack.ledger.url());
    let metrics = stack.http.get(url).send().await.unwrap().text().await.unwrap();
    metrics
        .lines()
        .filter(|line| {
            line.starts_with("paystile_ledger_http_request_duration_seconds_count{")
                && line.contains(r#"endpoint="/v1/l402/challenges""#)
        })
        .map(|line| line.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn anonymous_402s_take_challenges_minted_ahead_each_its_own_and_payable() {
    let stack = stack("0.003").await;
    const CALLS: usize = 40;
    let mut invoices = BTreeSet::new();
    let mut last = None;
    for _ in 0..CALLS {
        let challenged = stack.get("/v1/forecast/oslo", None, &[]).await.unwrap();
        assert_eq!(
            (challenged.status, challenged.code().as_deref()),
            (402, Some("payment_required"))
        );
        assert_eq!(challenged.challenges.len(), 3, "{:?}", challenged.challenges);
        let (_, invoice) = challenged.l402_challenge().unwrap();
        assert!(invoices.insert(invoice.clone()), "{invoice} was handed out twice");
        last = Some(challenged);
        // A 402 every few ticks: the pool's refills keep up with them.
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    // The first 402 of each worker has the ledger mint its own; refills then mint ahead,
    // more at a time as the 402s go on.
    let ledger_calls = challenge_calls(&stack).await;
    assert!(
        ledger_calls <= CALLS as u64 / 2,
        "{ledger_calls} challenge calls for {CALLS} 402s: not served from the pool"
    );

    // A challenge handed out from the pool is payable, and buys calls.
    let credential = stack.buy_l402(&last.unwrap()).await.unwrap();
    let answer = stack.get("/v1/forecast/oslo", Some(&credential), &[]).await.unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.header("x-remaining-usdc"), Some("0.002000"));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_l402_credentials_get_the_statuses_of_the_contract() {
    let stack = stack("0.01").await;
    let challenged = stack.get("/v1/forecast", None, &[]).await.unwrap();
    let credential = stack.buy_l402(&challenged).await.unwrap();
    let (macaroon, preimage) = credential["L402 ".len()..].rsplit_once(':').unwrap();
    let binary = STANDARD.decode(macaroon).unwrap();
    let secret = stack.stack.secrets.l402_secret.clone();
    let identifier =
        Identifier::decode(Macaroon::from_binary(&binary).unwrap().identifier()).unwrap();
    let minted = |offer: Offer| {
        let m = l402::mint(secret.as_bytes(), &identifier, &offer);
        format!("L402 {}:{preimage}", l402::encode_macaroon(&m))
    };
    let offer = Offer {
        service_id: stack.service_id(),
        valid_until: unix_now() + 600,
        budget: usdc("0.01"),
        capabilities: vec![],
        sandbox: true,
    };
    let mut tampered = binary.clone();
    let at = tampered.len() - 5;
    tampered[at] ^= 0x20;

    let cases = [
        (format!("L402 {macaroon}:{}", "00".repeat(32)), 401, "invalid_preimage"),
        (format!("L402 {}:{preimage}", STANDARD.encode(&tampered)), 401, "invalid_credential"),
        (format!("L402 {macaroon}"), 401, "invalid_credential"),
        ("L402 ".to_owned(), 401, "invalid_credential"),
        (format!("L402 {macaroon}:{preimage}:{preimage}"), 401, "invalid_credential"),
        (minted(Offer { service_id: "maps".into(), ..offer.clone() }), 403, "wrong_service"),
        (minted(Offer { valid_until: unix_now() - 1, ..offer.clone() }), 401, "token_expired"),
    ];
    for (authorization, status, code) in cases {
        let answer = stack.get("/v1/forecast", Some(&authorization), &[]).await.unwrap();
        assert_eq!(
            (answer.status, answer.code().as_deref()),
            (status, Some(code)),
            "{authorization}"
        );
    }
    // Non-UTF-8 bytes in the header: a 401, and the VM lives on.
    let mut raw = b"L402 ".to_vec();
    raw.extend_from_slice(&[0xff, 0xfe, b':', 0x80]);
    let answer = stack
        .http
        .get(stack.stack.gateway_url("/v1/forecast"))
        .header("authorization", reqwest::header::HeaderValue::from_bytes(&raw).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 401);
    assert!(stack.stack.upstream.seen().is_empty(), "no refused call reached the upstream");

    // The older scheme name and URL-safe base64 are the same credential.
    let lsat = format!("LSAT {}:{preimage}", URL_SAFE_NO_PAD.encode(&binary));
    let answer = stack.get("/v1/forecast", Some(&lsat), &[]).await.unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn l402_tokens_revoke_and_replay_like_pay_tokens() {
    let stack = stack("0.01").await;
    let challenged = stack.get("/v1/forecast", None, &[]).await.unwrap();
    let credential = stack.buy_l402(&challenged).await.unwrap();
    let key = [("idempotency-key", "order-1")];

    let first = stack.get("/v1/forecast", Some(&credential), &key).await.unwrap();
    assert_eq!(first.status, 200, "{first:?}");
    let charge_id = first.header("x-charge-id").unwrap().to_owned();
    let token_id = stack.stack.admin.charge(&charge_id).await.unwrap().token_id;
    stack.settled(&token_id).await.unwrap();
    let retry = stack.get("/v1/forecast", Some(&credential), &key).await.unwrap();
    assert_eq!((retry.status, retry.header("x-charge-id")), (200, Some(charge_id.as_str())));
    assert_eq!(stack.settled(&token_id).await.unwrap().used_usdc, usdc("0.001"), "charged once");

    assert!(stack.stack.admin.revoke_token(&token_id).await.unwrap().revoked);
    let revoked = stack.get("/v1/forecast", Some(&credential), &[]).await.unwrap();
    assert_eq!((revoked.status, revoked.code().as_deref()), (422, Some("token_revoked")));

    // A credential revoked before its first call (the ledger has never seen it) is refused.
    let challenged = stack.get("/v1/forecast", None, &[]).await.unwrap();
    let unused = stack.buy_l402(&challenged).await.unwrap();
    let (macaroon, _) = challenged.l402_challenge().unwrap();
    let binary = STANDARD.decode(macaroon).unwrap();
    let identifier =
        Identifier::decode(Macaroon::from_binary(&binary).unwrap().identifier()).unwrap();
    let unused_id = identifier.ledger_token_id();
    let tombstone = stack.stack.admin.revoke_token(&unused_id).await.unwrap();
    assert!(tombstone.revoked && tombstone.limit_usdc.is_zero());
    let refused = stack.get("/v1/forecast", Some(&unused), &[]).await.unwrap();
    assert_eq!((refused.status, refused.code().as_deref()), (422, Some("token_revoked")));
    assert_eq!(
        stack.stack.upstream.seen().len(),
        2,
        "only the paid call and its replay got through"
    );
}
