//! What must never leak, through a real Envoy with the filter and the ledger logging
//! everything they log: no credential reaches the upstream, and no credential, key or secret
//! reaches a log, on the paid, refused, malformed and failing paths alike.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use paystile_harness::e2e::{TestStack, unix_now};
use paystile_protocol::jws::SigningKey;
use paystile_protocol::pay_token::{self, PayTokenClaims, Scope};
use reqwest::header::HeaderValue;
use serde_json::json;

/// A Pay Token for `service` signed with `secret`, valid until `exp`.
fn minted(secret: &str, service: &str, exp: u64) -> String {
    let claims = PayTokenClaims {
        sub: "leak-test".into(),
        jti: paystile_harness::stack::random_key("tok_leak"),
        service_id: Some(service.into()),
        limit_usdc: "1".parse().unwrap(),
        scope: Scope::Single,
        buyer_tag: None,
        exp,
        iat: Some(unix_now()),
        nbf: None,
        iss: None,
        aud: None,
        sandbox: false,
    };
    pay_token::sign(&claims, &SigningKey::hs256(secret))
}

/// A Pay Token, and its payload and signature alone (the header is the same in every token).
fn forbid_jwt(forbidden: &mut Vec<(String, String)>, jwt: &str, what: &str) {
    forbidden.push((what.into(), jwt.to_owned()));
    for (i, segment) in jwt.split('.').enumerate().skip(1) {
        if segment.len() >= 16 {
            forbidden.push((format!("{what}, segment {i}"), segment.to_owned()));
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn no_credential_key_or_secret_reaches_the_upstream_or_a_log() {
    let filter = json!({
        "routes": [{"path_prefix": "/v1/forecast", "price_usdc": "0.001"}],
        "ledger": {"timeout_ms": 400},
        "l402": {"budget_usdc": "0.002"},
    });
    let mut stack = TestStack::start_verbose(filter, &[]).await.unwrap();
    let secrets = stack.stack.secrets.clone();
    let service = stack.service_id();
    // What a log must not show, with what it is.
    let mut forbidden: Vec<(String, String)> = vec![
        ("admin key".into(), secrets.admin_key.clone()),
        ("gateway key".into(), secrets.gateway_key.clone()),
        ("token secret".into(), secrets.token_secret.clone()),
        ("L402 secret".into(), secrets.l402_secret.clone()),
    ];

    // Paid, with an Idempotency-Key, then replayed; a billable and an erroring upstream.
    let paid = stack.issue("0.003").await.unwrap();
    forbid_jwt(&mut forbidden, &paid.jwt, "a paid Pay Token");
    let bearer = format!("Bearer {}", paid.jwt);
    let key = paystile_harness::stack::random_key("idem");
    let idempotent = [("idempotency-key", key.as_str())];
    for (path, extra, status) in [
        ("/v1/forecast/a", &idempotent[..], 200),
        ("/v1/forecast/a", &idempotent[..], 200),
        ("/v1/forecast/status/500", &[][..], 500),
    ] {
        let answer = stack.get(path, Some(&bearer), extra).await.unwrap();
        assert_eq!(answer.status, status, "{path}: {answer:?}");
        // The replay needs the first call settled.
        stack.settled(&paid.token_id).await.unwrap();
    }
    // Spent: 402.
    for _ in 0..3 {
        stack.paid("/v1/forecast/b", &paid.jwt).await.unwrap();
    }
    stack.settled(&paid.token_id).await.unwrap();
    let answer = stack.paid("/v1/forecast/b", &paid.jwt).await.unwrap();
    assert_eq!(answer.code().as_deref(), Some("token_limit_exceeded"), "{answer:?}");

    // Refused: revoked, another service, expired, another key, unsigned, garbage.
    let revoked = stack.issue("1").await.unwrap();
    forbid_jwt(&mut forbidden, &revoked.jwt, "a revoked Pay Token");
    stack.stack.admin.revoke_token(&revoked.token_id).await.unwrap();
    let elsewhere = minted(&secrets.token_secret, "another-service", unix_now() + 600);
    let expired = minted(&secrets.token_secret, &service, unix_now() - 600);
    let forged = minted("not-the-secret-0123456789abcdef-0123", &service, unix_now() + 600);
    let (header, rest) = forged.split_once('.').unwrap();
    let unsigned = format!("{header}.{}.", rest.split_once('.').unwrap().0);
    let refusals = [
        (revoked.jwt.clone(), 422, "revoked"),
        (elsewhere, 403, "another service"),
        (expired, 401, "expired"),
        (forged, 401, "forged"),
        (unsigned, 401, "unsigned"),
        ("not.a.jwt-but-long-enough-to-find".into(), 401, "garbage"),
    ];
    for (jwt, status, what) in refusals {
        let answer = stack.paid("/v1/forecast/c", &jwt).await.unwrap();
        assert_eq!(answer.status, status, "{what}: {answer:?}");
        forbid_jwt(&mut forbidden, &jwt, what);
    }
    let raw = HeaderValue::from_bytes(b"Bearer \xff\xfeleak-marker-0123456789").unwrap();
    let answer = stack
        .http
        .get(stack.stack.gateway_url("/v1/forecast/d"))
        .header("authorization", raw)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 401);
    forbidden.push(("non-UTF-8 credential".into(), "leak-marker-0123456789".into()));

    // L402: a challenge, a paid call, a spent credential, a wrong preimage, a tampered macaroon.
    let challenged = stack.get("/v1/forecast/e", None, &[]).await.unwrap();
    let credential = stack.buy_l402(&challenged).await.unwrap();
    let (macaroon, preimage) = credential["L402 ".len()..].rsplit_once(':').unwrap();
    forbidden.push(("an L402 macaroon".into(), macaroon.to_owned()));
    forbidden.push(("an L402 preimage".into(), preimage.to_owned()));
    for status in [200, 200, 402] {
        let answer = stack.get("/v1/forecast/e", Some(&credential), &[]).await.unwrap();
        assert_eq!(answer.status, status, "{answer:?}");
    }
    let wrong_preimage = format!("L402 {macaroon}:{}", "ab".repeat(32));
    let mut tampered = STANDARD.decode(macaroon).unwrap();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let tampered = format!("L402 {}:{preimage}", STANDARD.encode(&tampered));
    for authorization in [&wrong_preimage, &tampered] {
        let answer = stack.get("/v1/forecast/f", Some(authorization), &[]).await.unwrap();
        assert_eq!(answer.status, 401, "{answer:?}");
    }

    // The ledger down: 503 for both schemes.
    let fresh = stack.issue("1").await.unwrap();
    forbid_jwt(&mut forbidden, &fresh.jwt, "a Pay Token sent while the ledger is down");
    let challenged = stack.get("/v1/forecast/g", None, &[]).await.unwrap();
    let fresh_l402 = stack.buy_l402(&challenged).await.unwrap();
    forbidden.push(("an L402 credential sent while the ledger is down".into(), fresh_l402.clone()));
    stack.stack.ledger.kill().unwrap();
    for authorization in [format!("Bearer {}", fresh.jwt), fresh_l402] {
        let answer = stack.get("/v1/forecast/g", Some(&authorization), &[]).await.unwrap();
        assert_eq!(answer.code().as_deref(), Some("ledger_unavailable"), "{answer:?}");
    }

    // The upstream saw the paid calls, and never a credential.
    let seen = stack.stack.upstream.seen();
    assert_eq!(seen.len(), 7, "{seen:?}");
    for request in &seen {
        assert!(!request.headers.contains_key("authorization"), "{request:?}");
        for (what, value) in &forbidden {
            let leaked = request.headers.values().any(|v| v.contains(value.as_str()));
            assert!(!leaked, "{what} reached the upstream: {request:?}");
        }
    }

    let envoy_log = stack.stack.envoy.log_text();
    let ledger_log = stack.stack.ledger_log();
    // The logs are the verbose ones: the filter's warnings, the ledger's events.
    assert!(envoy_log.contains("paystile: ledger unavailable"), "{envoy_log}");
    assert!(
        ledger_log.contains(&paid.token_id) && ledger_log.contains("event=\"hold\""),
        "{ledger_log}"
    );
    // The upstream gets the Idempotency-Key; the logs do not.
    forbidden.push(("an Idempotency-Key".into(), key));
    for (name, log) in [("Envoy", &envoy_log), ("ledger", &ledger_log)] {
        for (what, value) in &forbidden {
            assert!(!log.contains(value.as_str()), "{what} is in the {name} log:\n{log}");
        }
    }
}
