//! Paid calls with Pay Tokens through a real Envoy 1.40 running the release filter, the real
//! ledger binary and the demo upstream: the paid path, and every row of the status table
//! that concerns Pay Tokens.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, Write};
use std::net::TcpStream;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use paystile_harness::e2e::{TestStack, pyjwt, unix_now};
use paystile_harness::stack::{merge_patch, new_token_key};
use paystile_protocol::Usdc;
use paystile_protocol::ledger_api::ChargeStatus;
use serde_json::{Value, json};

fn usdc(amount: &str) -> Usdc {
    amount.parse().unwrap()
}

/// Claims for a token minted outside the ledger with the shared secret.
fn foreign_claims(stack: &TestStack, limit: &str) -> Value {
    json!({
        "sub": "py-agent",
        "jti": format!("tok_py_{}", rand_suffix()),
        "serviceId": stack.service_id(),
        "limitUsdc": limit,
        "scope": "SINGLE",
        "iat": unix_now(),
        "exp": unix_now() + 600,
    })
}

fn rand_suffix() -> String {
    paystile_harness::stack::random_key("x")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paid_call_reaches_the_upstream_charged_and_without_the_credential() {
    let stack = TestStack::start().await.unwrap();
    let token = stack.issue("0.01").await.unwrap();

    let answer = stack
        .get(
            "/v1/forecast/oslo",
            Some(&format!("Bearer {}", token.jwt)),
            &[("x-charge-id", "ch_forged")],
        )
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    let charge_id = answer.header("x-charge-id").unwrap().to_owned();
    assert!(charge_id.starts_with("ch_") && charge_id != "ch_forged");
    assert_eq!(answer.header("x-amount-usdc"), Some("0.001000"));
    assert_eq!(answer.header("x-remaining-usdc"), Some("0.009000"));

    // What the upstream received: the charge id (only ours) and no credential.
    let seen = stack.stack.upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/v1/forecast/oslo");
    assert_eq!(seen[0].headers.get("x-charge-id"), Some(&charge_id));
    assert!(!seen[0].headers.contains_key("authorization"), "{:?}", seen[0].headers);
    assert_eq!(
        answer.json()["headers"]["x-charge-id"],
        charge_id.as_str(),
        "the upstream's own answer passes through"
    );

    let settled = stack.settled(&token.token_id).await.unwrap();
    assert_eq!((settled.used_usdc, settled.remaining_usdc), (usdc("0.001"), usdc("0.009")));
    let charge = stack.stack.admin.charge(&charge_id).await.unwrap();
    assert_eq!(
        (charge.status, charge.amount_usdc, charge.upstream_status),
        (ChargeStatus::Committed, usdc("0.001"), Some(200))
    );
    assert_eq!(charge.service_id, stack.service_id());

    // Envoy's /stats shows the filter's counters (summed over its workers' VMs), and the
    // filter logged its version at start.
    let stats_url =
        format!("http://{}/stats?format=json&filter=paystile", stack.stack.envoy.admin());
    let stats: Value = stack.http.get(stats_url).send().await.unwrap().json().await.unwrap();
    let stat = |name: &str| {
        let stats = stats["stats"].as_array().unwrap();
        stats.iter().find(|s| s["name"] == name).map(|s| s["value"].clone())
    };
    assert_eq!(stat("wasmcustom.paystile_paid"), Some(json!(1)), "{stats}");
    assert_eq!(stat("wasmcustom.paystile_settle_queued"), Some(json!(1)));
    assert_eq!(stat("wasmcustom.paystile_settle_answered"), Some(json!(1)));
    assert_eq!(stat("wasmcustom.paystile_refused_payment_required"), Some(json!(0)));
    assert!(stat("wasmcustom.paystile_settle_queue").is_some(), "{stats}");
    let started = format!("paystile filter {} starting", env!("CARGO_PKG_VERSION"));
    assert!(stack.stack.envoy.log_text().contains(&started));

    // The credential appears in no log.
    let envoy_log = stack.stack.envoy.log_text();
    let ledger_log = stack.stack.ledger_log();
    for log in [&envoy_log, &ledger_log] {
        assert!(!log.contains(&token.jwt), "a Pay Token was logged");
        assert!(!log.contains(&stack.stack.secrets.gateway_key), "the gateway key was logged");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unpriced_route_passes_untouched() {
    let stack = TestStack::start().await.unwrap();
    let answer = stack
        .get(
            "/healthz?probe=1",
            Some("Basic dXNlcjpwYXNz"),
            &[("x-charge-id", "ch_forged"), ("x-custom", "kept")],
        )
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!((answer.header("x-charge-id"), answer.header("x-amount-usdc")), (None, None));
    let seen = &stack.stack.upstream.seen()[0];
    assert_eq!(seen.path, "/healthz?probe=1");
    assert_eq!(seen.headers.get("authorization").map(String::as_str), Some("Basic dXNlcjpwYXNz"));
    assert_eq!(seen.headers.get("x-custom").map(String::as_str), Some("kept"));
    // The one header paystile removes everywhere: a client cannot claim to have paid.
    assert!(!seen.headers.contains_key("x-charge-id"));
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_minted_with_pyjwt_and_the_shared_key_are_accepted_and_metered() {
    let stack = TestStack::start().await.unwrap();
    let claims = foreign_claims(&stack, "0.002");
    let jwt = pyjwt(&claims, &stack.stack.secrets.token_secret, "HS256").unwrap();

    for remaining in ["0.001000", "0.000000"] {
        let answer = stack.paid("/v1/forecast/lima", &jwt).await.unwrap();
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.header("x-remaining-usdc"), Some(remaining));
    }
    let token_id = claims["jti"].as_str().unwrap();
    let token = stack.settled(token_id).await.unwrap();
    assert_eq!(
        (token.buyer_id.as_str(), token.limit_usdc, token.used_usdc),
        ("py-agent", usdc("0.002"), usdc("0.002"))
    );
    let refused = stack.paid("/v1/forecast/lima", &jwt).await.unwrap();
    assert_eq!((refused.status, refused.code().as_deref()), (402, Some("token_limit_exceeded")));
}

/// EdDSA Pay Tokens: the ledger signs them with its private key and publishes the public
/// one, which is all the gateway holds; tokens minted by PyJWT with the ledger's key pay too.
/// A token signed by any other key (even one claiming the ledger's kid) gets 401, at the
/// gateway and at the ledger.
#[tokio::test(flavor = "multi_thread")]
async fn eddsa_tokens_verify_with_the_published_key_and_a_stranger_s_get_401() {
    let stack = TestStack::start().await.unwrap();
    let secrets = &stack.stack.secrets;
    let kid = secrets.token_key.kid.clone().unwrap();

    let issued = stack.issue("0.01").await.unwrap();
    let header = issued.jwt.split('.').next().unwrap();
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    assert_eq!((header["alg"].as_str(), header["kid"].as_str()), (Some("EdDSA"), Some(&*kid)));

    let jwks_url = format!("{}/.well-known/jwks.json", stack.stack.ledger.url());
    let jwks: Value = stack.http.get(jwks_url).send().await.unwrap().json().await.unwrap();
    let public = serde_json::to_value(secrets.token_public_key().unwrap()).unwrap();
    assert_eq!(jwks, json!({"keys": [public]}), "the published set is the public key alone");
    assert_eq!(stack.stack.filter_config["pay_token"]["keys"][0], public);

    let private = serde_json::to_string(&secrets.token_key).unwrap();
    let claims = foreign_claims(&stack, "0.002");
    let minted = pyjwt(&claims, &private, "EdDSA").unwrap();
    for jwt in [&issued.jwt, &minted] {
        let answer = stack.paid("/v1/forecast/quito", jwt).await.unwrap();
        assert_eq!(answer.status, 200, "{answer:?}");
        assert!(answer.header("x-charge-id").is_some());
    }
    stack.settled(claims["jti"].as_str().unwrap()).await.unwrap();

    let stranger = serde_json::to_string(&new_token_key(&kid)).unwrap();
    let forged = pyjwt(&foreign_claims(&stack, "0.002"), &stranger, "EdDSA").unwrap();
    let refused = stack.paid("/v1/forecast/quito", &forged).await.unwrap();
    assert_eq!((refused.status, refused.code().as_deref()), (401, Some("invalid_credential")));
    // The gateway key does not make the ledger believe it either.
    let reserve = json!({"credential": format!("Bearer {forged}"), "serviceId": stack.service_id(),
        "priceUsdc": "0.001"});
    let at_ledger = stack
        .http
        .post(format!("{}/v1/holds", stack.stack.ledger.url()))
        .bearer_auth(&secrets.gateway_key)
        .json(&reserve)
        .send()
        .await
        .unwrap();
    assert_eq!(at_ledger.status(), 401);
    assert_eq!(stack.stack.upstream.seen().len(), 2, "the forged token reached the upstream");
}

#[tokio::test(flavor = "multi_thread")]
async fn no_credential_gets_the_402_challenge() {
    // Pay Tokens alone (L402's challenge is tested in l402.rs): answered without the ledger.
    let stack = TestStack::start_with(json!({"l402": null}), &[]).await.unwrap();
    for authorization in [None, Some("Basic dXNlcjpwYXNz")] {
        let answer = stack.get("/v1/forecast/oslo", authorization, &[]).await.unwrap();
        assert_eq!(answer.status, 402);
        assert_eq!(answer.header("content-type"), Some("application/json"));
        assert_eq!(answer.challenges, [r#"Bearer realm="paystile", error="payment_required""#]);
        let body = answer.json();
        assert_eq!(
            (body["code"].as_str(), body["error"].as_str()),
            (Some("payment_required"), Some("Payment required"))
        );
        assert_eq!(
            (body["price"].as_str(), body["schemes"].clone()),
            (Some("0.001000"), json!(["Bearer"]))
        );
    }
    assert!(stack.stack.upstream.seen().is_empty(), "an unpaid request reached the upstream");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_credentials_are_refused_with_401_and_never_echoed() {
    let stack = TestStack::start().await.unwrap();
    let secret = stack.stack.secrets.token_secret.clone();
    let claims = foreign_claims(&stack, "1");
    let good = pyjwt(&claims, &secret, "HS256").unwrap();
    let (header, rest) = good.split_once('.').unwrap();
    let (_, signature) = rest.split_once('.').unwrap();

    let richer = pyjwt(
        &patched(&claims, json!({"limitUsdc": "1000000"})),
        "some-other-key-0123456789abcdef",
        "HS256",
    )
    .unwrap();
    let richer_payload = richer.split('.').nth(1).unwrap();
    let unsigned_header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let cases = [
        ("garbage", "Bearer not-a-jwt".to_owned()),
        ("tampered payload", format!("Bearer {header}.{richer_payload}.{signature}")),
        ("alg none", format!("Bearer {unsigned_header}.{}.", rest.split_once('.').unwrap().0)),
        (
            "alg mismatch (HS512 under the same key)",
            format!("Bearer {}", pyjwt(&claims, &secret, "HS512").unwrap()),
        ),
        ("another key", format!("Bearer {richer}")),
        ("empty", "Bearer ".to_owned()),
    ];
    for (case, authorization) in &cases {
        let answer = stack.get("/v1/forecast/oslo", Some(authorization), &[]).await.unwrap();
        assert_eq!(
            (answer.status, answer.code().as_deref()),
            (401, Some("invalid_credential")),
            "{case}: {answer:?}"
        );
        assert_eq!(answer.header("content-type"), Some("application/json"), "{case}");
        let token_part = authorization.trim_start_matches("Bearer ");
        assert!(
            token_part.len() < 8 || !answer.text.contains(token_part),
            "{case}: the credential was echoed"
        );
    }

    // Bytes that are not UTF-8 give a 401 too, and the VM survives them.
    let answer = paystile_harness::e2e::read(
        stack
            .http
            .get(stack.stack.gateway_url("/v1/forecast/oslo"))
            .header(
                "authorization",
                reqwest::header::HeaderValue::from_bytes(b"Bearer \xff\xfe\xfd").unwrap(),
            )
            .send()
            .await
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!((answer.status, answer.code().as_deref()), (401, Some("invalid_credential")));
    assert_eq!(
        stack.paid("/v1/forecast/oslo", &good).await.unwrap().status,
        200,
        "the filter died"
    );
    assert_eq!(stack.stack.upstream.seen().len(), 1, "a refused request reached the upstream");
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_foreign_revoked_and_exhausted_tokens_get_their_statuses() {
    let stack = TestStack::start().await.unwrap();
    let secret = stack.stack.secrets.token_secret.clone();

    let expired = patched(
        &foreign_claims(&stack, "1"),
        json!({"exp": unix_now() - 3600, "iat": unix_now() - 7200}),
    );
    let answer =
        stack.paid("/v1/forecast/oslo", &pyjwt(&expired, &secret, "HS256").unwrap()).await.unwrap();
    assert_eq!((answer.status, answer.code().as_deref()), (401, Some("token_expired")));
    assert_eq!(answer.json()["error"], "Token expired");

    let elsewhere = patched(&foreign_claims(&stack, "1"), json!({"serviceId": "another-service"}));
    let answer = stack
        .paid("/v1/forecast/oslo", &pyjwt(&elsewhere, &secret, "HS256").unwrap())
        .await
        .unwrap();
    assert_eq!((answer.status, answer.code().as_deref()), (403, Some("wrong_service")));

    // Kill switch: a token that just paid is refused at once after revocation.
    let revocable = stack.issue("1").await.unwrap();
    assert_eq!(stack.paid("/v1/forecast/oslo", &revocable.jwt).await.unwrap().status, 200);
    stack.stack.admin.revoke_token(&revocable.token_id).await.unwrap();
    let answer = stack.paid("/v1/forecast/oslo", &revocable.jwt).await.unwrap();
    assert_eq!((answer.status, answer.code().as_deref()), (422, Some("token_revoked")));
    assert_eq!(answer.json()["error"], "Token has been revoked");

    // Cap reached: 402 with what was used and the limit.
    let small = stack.issue("0.002").await.unwrap();
    for _ in 0..2 {
        assert_eq!(stack.paid("/v1/forecast/oslo", &small.jwt).await.unwrap().status, 200);
    }
    stack.settled(&small.token_id).await.unwrap();
    let answer = stack.paid("/v1/forecast/oslo", &small.jwt).await.unwrap();
    assert_eq!((answer.status, answer.code().as_deref()), (402, Some("token_limit_exceeded")));
    let body = answer.json();
    assert_eq!(
        (body["used"].as_str(), body["limit"].as_str(), body["price"].as_str()),
        (Some("0.002000"), Some("0.002000"), Some("0.001000"))
    );
    assert_eq!(
        answer.header("www-authenticate"),
        Some(r#"Bearer realm="paystile", error="payment_required""#)
    );

    assert_eq!(
        stack.stack.upstream.seen().len(),
        3,
        "only the three paid calls reach the upstream"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn path_tricks_do_not_dodge_a_price() {
    // A free prefix listed first, and a price on everything else: the free prefix ends at a
    // path segment, so /docsecret is not under /docs.
    let routes = json!({"routes": [
        {"path_prefix": "/docs", "price_usdc": "0"},
        {"path_prefix": "/v1/forecast", "price_usdc": "0.001"},
        {"path": "/v1/premium/report", "methods": ["GET", "POST"], "price_usdc": "0.25"},
        {"path_prefix": "/", "price_usdc": "0.002"}
    ]});
    let stack = TestStack::start_with(routes, &[]).await.unwrap();
    let gateway = stack.stack.envoy.gateway();
    for path in ["/docs", "/docs/", "/docs/guide", "/docs?page=2"] {
        let status =
            tokio::task::spawn_blocking(move || raw_request(gateway, "GET", path)).await.unwrap();
        assert_eq!(status, 200, "{path} is free");
    }
    let free_calls = stack.stack.upstream.seen().len();
    let priced = [
        ("GET", "/docsecret/x"),
        ("GET", "/docs-private"),
        ("GET", "/docs/../docsecret/x"),
        ("GET", "/docs/..%2Fdocsecret"),
        ("GET", "/docs%2F..%2Fdocsecret"),
        ("GET", "/docs;/../docsecret"),
        ("GET", "/docsecret%2Fx"),
        ("GET", "/v1/forecast/x"),
        ("GET", "//v1/forecast/x"),
        ("GET", "/v1//forecast/x"),
        ("GET", "/v1/./forecast/x"),
        ("GET", "/v1/../v1/forecast/x"),
        ("GET", "/v1%2Fforecast/x"),
        ("GET", "/v1%2fforecast/x"),
        ("GET", "/v1/%66orecast/x"),
        ("GET", "/V1/FORECAST/x"),
        ("GET", "/v1;a=b/forecast/x"),
        ("HEAD", "/v1/forecast/x"),
        // The exact route GET|POST /v1/premium/report.
        ("GET", "/v1/premium/report"),
        ("GET", "/v1/premium/report/"),
        ("GET", "/v1/premium/report;x"),
        ("GET", "/v1/premium/report%2F"),
        ("HEAD", "/v1/premium/report"),
        ("POST", "/v1/Premium/Report"),
    ];
    for (method, path) in priced {
        let status =
            tokio::task::spawn_blocking(move || raw_request(gateway, method, path)).await.unwrap();
        assert_eq!(status, 402, "{method} {path} was not priced");
    }
    assert_eq!(stack.stack.upstream.seen().len(), free_calls, "a priced call got through");
}

/// The status of `<method> <path>` sent byte for byte (an HTTP client would normalize it).
fn raw_request(gateway: std::net::SocketAddr, method: &str, path: &str) -> u16 {
    let mut stream = TcpStream::connect(gateway).unwrap();
    let body = if method == "POST" { "content-length: 0\r\n" } else { "" };
    write!(stream, "{method} {path} HTTP/1.1\r\nhost: demo\r\n{body}connection: close\r\n\r\n")
        .unwrap();
    // Only the status line: waiting for the close would wait out Envoy's delayed close.
    let mut status_line = String::new();
    std::io::BufReader::new(stream).read_line(&mut status_line).unwrap();
    status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn patched(claims: &Value, patch: Value) -> Value {
    let mut claims = claims.clone();
    merge_patch(&mut claims, &patch);
    claims
}
