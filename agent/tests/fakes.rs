//! The agent against fakes on loopback, no stack: a seller that offers only an L402
//! challenge (as aperture does), an LND node that pays invoices as LND's REST API documents
//! it (`POST /v1/channels/transactions`, macaroon as hex in `Grpc-Metadata-macaroon`, bytes as
//! base64), and hostile 402s. Also the CLI binary, end to end.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use paystile_agent::{
    Agent, AgentError, Config, Lightning, Limits, Refusal, Request, Scheme, Wallet,
};
use paystile_protocol::Usdc;
use paystile_protocol::l402::{self, Identifier, Offer};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const LND_MACAROON: &[u8] = b"admin macaroon bytes";
const PREIMAGE: [u8; 32] = [7; 32];
const INVOICE: &str = "lnbcrt20n1pfakeinvoice";

#[derive(Clone, Default)]
struct Counters {
    seller: Arc<AtomicUsize>,
    lnd: Arc<AtomicUsize>,
}

fn macaroon(payment_hash: [u8; 32], budget: &str) -> String {
    let id = Identifier { payment_hash, token_id: [3; 32] };
    let offer = Offer {
        service_id: "weather".into(),
        valid_until: 4_000_000_000,
        budget: budget.parse().unwrap(),
        capabilities: vec![],
        sandbox: false,
    };
    l402::encode_macaroon(&l402::mint(b"seller secret", &id, &offer))
}

fn challenge(macaroon: &str, invoice: &str) -> Response {
    let mut response = (
        StatusCode::PAYMENT_REQUIRED,
        Json(json!({"error": "Payment required", "price": "0.001000", "serviceId": "weather"})),
    )
        .into_response();
    let value = HeaderValue::from_str(&l402::challenge(macaroon, invoice)).unwrap();
    response.headers_mut().insert("www-authenticate", value);
    response
}

/// `/paid`: an L402 seller whose macaroon matches the fake LND's preimage. `/huge`: a 402 with
/// 80 KB of headers. `/malformed`: a challenge that is not one. `/thin`: a budget below the
/// price. `/foreign`: a macaroon bound to another payment hash.
async fn seller(counters: Counters) -> String {
    let hash: [u8; 32] = Sha256::digest(PREIMAGE).into();
    let good = macaroon(hash, "0.002");
    let credential = format!("L402 {good}:{}", hex::encode(PREIMAGE));
    let paid = {
        let counters = counters.clone();
        move |headers: HeaderMap| {
            counters.seller.fetch_add(1, Ordering::SeqCst);
            let (good, credential) = (good.clone(), credential.clone());
            async move {
                if headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(&credential) {
                    ([("x-charge-id", "ch_fake")], "forecast: sunny").into_response()
                } else {
                    challenge(&good, INVOICE)
                }
            }
        }
    };
    let huge = || async {
        let mut response = challenge(&macaroon([1; 32], "0.002"), INVOICE);
        for i in 0..8 {
            let name = HeaderName::from_bytes(format!("x-pad-{i}").as_bytes()).unwrap();
            response
                .headers_mut()
                .insert(name, HeaderValue::from_str(&"a".repeat(10_000)).unwrap());
        }
        response
    };
    let malformed = || async {
        let mut response = challenge("x", INVOICE);
        let bad =
            HeaderValue::from_static("L402 macaroon=\"not-a-macaroon\", invoice=\"lnbcrt20n1p\"");
        response.headers_mut().insert("www-authenticate", bad);
        response
    };
    let thin = || async { challenge(&macaroon([1; 32], "0.0005"), INVOICE) };
    let foreign = || async { challenge(&macaroon([9; 32], "0.002"), INVOICE) };
    // Another service's route: a credential for `weather` is refused, none is needed.
    let other = |headers: HeaderMap| async move {
        match headers.get("authorization") {
            Some(_) => (StatusCode::FORBIDDEN, "wrong_service"),
            None => (StatusCode::OK, "free"),
        }
    };
    let app = axum::Router::new()
        .route("/paid", get(paid))
        .route("/other", get(other))
        .route("/huge", get(huge))
        .route("/malformed", get(malformed))
        .route("/thin", get(thin))
        .route("/foreign", get(foreign));
    serve(app).await
}

/// An LND node's `SendPaymentSync` over REST.
async fn lnd(counters: Counters) -> String {
    let send = move |State(counters): State<Counters>,
                     headers: HeaderMap,
                     Json(body): Json<Value>| async move {
        let macaroon = headers.get("grpc-metadata-macaroon").and_then(|v| v.to_str().ok());
        if macaroon != Some(&hex::encode(LND_MACAROON)) {
            return (
                StatusCode::FORBIDDEN,
                Json(json!({"code": 2, "message": "verification failed"})),
            );
        }
        if body["payment_request"] != INVOICE {
            return (StatusCode::OK, Json(json!({"payment_error": "invoice not found"})));
        }
        counters.lnd.fetch_add(1, Ordering::SeqCst);
        let hash: [u8; 32] = Sha256::digest(PREIMAGE).into();
        (
            StatusCode::OK,
            Json(json!({
                "payment_error": "",
                "payment_preimage": STANDARD.encode(PREIMAGE),
                "payment_hash": STANDARD.encode(hash),
                "payment_route": {"total_amt": "2", "total_fees": "0"},
            })),
        )
    };
    let app =
        axum::Router::new().route("/v1/channels/transactions", post(send)).with_state(counters);
    serve(app).await
}

async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

fn usdc(amount: &str) -> Usdc {
    amount.parse().unwrap()
}

fn agent(seller: &str, lnd: &str, log: &Path) -> Agent {
    let wallet = Wallet {
        lightning: Some(Lightning::Lnd {
            url: lnd.into(),
            macaroon_hex: hex::encode(LND_MACAROON),
        }),
        ..Wallet::default()
    };
    let limits = Limits {
        budget: Some(usdc("0.01")),
        max_price: Some(usdc("0.001")),
        allow_origins: vec![seller.into()],
    };
    Agent::new(Config::new(wallet, limits, Some(log.to_path_buf()))).unwrap()
}

fn lines(log: &Path) -> usize {
    std::fs::read_to_string(log).unwrap_or_default().lines().count()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_l402_only_seller_is_paid_through_lnd_once_and_the_credential_reused() {
    let counters = Counters::default();
    let (seller, lnd) = (seller(counters.clone()).await, lnd(counters.clone()).await);
    let dir = tempfile::TempDir::new().unwrap();
    let log = dir.path().join("spend.jsonl");
    let agent = agent(&seller, &lnd, &log);

    let answer = agent.fetch(Request::get(&format!("{seller}/paid")).unwrap()).await.unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, b"forecast: sunny");
    let paid = answer.payment.unwrap();
    assert_eq!((paid.scheme, paid.amount_usdc), (Scheme::L402, usdc("0.002")));
    assert_eq!(paid.charge_id.as_deref(), Some("ch_fake"));
    assert_eq!(agent.last_offers()[0].l402.as_ref().unwrap().invoice_msat, Some(2_000));

    let again = agent.fetch(Request::get(&format!("{seller}/paid")).unwrap()).await.unwrap();
    assert_eq!((again.status, again.payment), (200, None));
    assert_eq!(counters.lnd.load(Ordering::SeqCst), 1, "paid once");
    assert_eq!(counters.seller.load(Ordering::SeqCst), 3, "402, retry, cached call");
    assert_eq!((agent.spent(), lines(&log)), (usdc("0.002"), 1));

    // On a path no 402 has named, the origin's credential is tried; refused there, the
    // call goes without it.
    let other = agent.fetch(Request::get(&format!("{seller}/other")).unwrap()).await.unwrap();
    assert_eq!((other.status, other.body.as_slice(), other.payment), (200, &b"free"[..], None));
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_402s_are_clear_errors_and_nothing_is_paid() {
    let counters = Counters::default();
    let (seller, lnd) = (seller(counters.clone()).await, lnd(counters.clone()).await);
    let dir = tempfile::TempDir::new().unwrap();
    let log = dir.path().join("spend.jsonl");
    let agent = agent(&seller, &lnd, &log);
    let fetch = |path: &str| agent.fetch(Request::get(&format!("{seller}{path}")).unwrap());

    let huge = fetch("/huge").await.unwrap_err();
    assert!(matches!(huge, AgentError::TooLarge { .. }), "{huge}");
    let malformed = fetch("/malformed").await.unwrap_err();
    assert!(matches!(malformed, AgentError::MalformedChallenge { .. }), "{malformed}");
    assert!(malformed.to_string().contains("L402 challenge"), "{malformed}");
    let thin = fetch("/thin").await.unwrap_err();
    assert!(thin.to_string().contains("less than one call's price"), "{thin}");
    assert_eq!(counters.lnd.load(Ordering::SeqCst), 0);
    assert_eq!((agent.spent(), lines(&log)), (Usdc::ZERO, 0));

    // The wallet paid, but the preimage does not open this macaroon: said, and counted.
    let foreign = fetch("/foreign").await.unwrap_err();
    assert!(
        foreign.to_string().contains("does not match the macaroon's payment hash"),
        "{foreign}"
    );
    assert_eq!(counters.lnd.load(Ordering::SeqCst), 1);
    assert_eq!((agent.spent(), lines(&log)), (usdc("0.002"), 1));

    // No wallet for what is offered.
    let bare = Agent::new(Config::new(Wallet::default(), agent.limits().clone(), None)).unwrap();
    let none = bare.fetch(Request::get(&format!("{seller}/paid")).unwrap()).await.unwrap_err();
    assert!(matches!(none, AgentError::NoPayableScheme { .. }), "{none}");
    assert!(none.to_string().contains("offering L402"), "{none}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_prints_the_answer_and_what_it_paid_or_why_it_refused() {
    let counters = Counters::default();
    let (seller, lnd) = (seller(counters.clone()).await, lnd(counters.clone()).await);
    let dir = tempfile::TempDir::new().unwrap();
    let macaroon_file = dir.path().join("admin.macaroon");
    std::fs::write(&macaroon_file, LND_MACAROON).unwrap();
    let log = dir.path().join("spend.jsonl");
    let run = |max: &'static str| {
        let (seller, lnd, macaroon_file, log) =
            (seller.clone(), lnd.clone(), macaroon_file.clone(), log.clone());
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_paystile-agent"))
                .args(["fetch", "-i", "-H", "Accept: text/plain", &format!("{seller}/paid")])
                .args(["--lnd-url", &lnd, "--lnd-macaroon"])
                .arg(&macaroon_file)
                .args(["--log"])
                .arg(&log)
                .env("PAYSTILE_AGENT_BUDGET_USDC", "0.01")
                .env("PAYSTILE_AGENT_MAX_PRICE_USDC", max)
                .env("PAYSTILE_AGENT_ALLOW_ORIGINS", format!("http://example.com,{seller}"))
                .output()
                .unwrap()
        })
    };
    let refused = run("0.0005").await.unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("per-call maximum of 0.000500 USDC"), "{stderr}");
    assert_eq!(counters.lnd.load(Ordering::SeqCst), 0);

    let output = run("0.001").await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.starts_with("HTTP/1.1 200\n"), "{stdout}");
    assert!(
        stdout.contains("x-charge-id: ch_fake") && stdout.ends_with("forecast: sunny"),
        "{stdout}"
    );
    let report: Value = serde_json::from_str(stderr.trim()).unwrap();
    assert_eq!(report["paid"]["scheme"], "l402");
    assert_eq!(report["paid"]["amountUsdc"], "0.002000");
    assert_eq!(report["remainingUsdc"], "0.008000");
    let logged: Value =
        serde_json::from_str(std::fs::read_to_string(&log).unwrap().trim()).unwrap();
    assert_eq!(logged["chargeId"], "ch_fake");
    assert_eq!(logged["origin"], seller);
}

/// An x402 seller speaking one version only, that checks the payment as a gateway does
/// (`x402::Payment::check`: terms and signature) and answers with a settlement receipt.
async fn x402_seller(version: u32, paid: Arc<AtomicUsize>) -> String {
    use paystile_protocol::x402::{self, OfferSettings, PaymentRequired, Resource, SettleResponse};
    let settings = OfferSettings {
        network: "eip155:31337",
        pay_to: "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC",
        asset: Some("0x5FbDB2315678afecb367f032d93F642f64180aa3"),
        asset_name: Some("USD Coin"),
        asset_version: Some("2"),
        max_timeout_seconds: None,
    };
    let offer = x402::Offer::from_settings(&settings).unwrap();
    let handler = move |headers: HeaderMap| {
        let (offer, paid) = (offer.clone(), paid.clone());
        async move {
            let resource =
                Resource { url: "http://seller/x".into(), description: None, mime_type: None };
            let (name, version_of) = match version {
                1 => ("x-payment", x402::Version::V1),
                _ => ("payment-signature", x402::Version::V2),
            };
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            if let Some(value) = headers.get(name) {
                let payment = x402::Payment::decode(value.as_bytes(), version_of).unwrap();
                payment.check(std::slice::from_ref(&offer), 1000, now).unwrap();
                paid.fetch_add(1, Ordering::SeqCst);
                let receipt = SettleResponse {
                    success: true,
                    error_reason: None,
                    payer: None,
                    transaction: "0xabc".into(),
                    network: "eip155:31337".into(),
                    amount: Some("1000".into()),
                };
                let header = if version == 1 { "x-payment-response" } else { "payment-response" };
                return ([(header, receipt.header_value())], "paid content").into_response();
            }
            if version == 1 {
                let body = json!({"x402Version": 1, "error": "pay",
                    "accepts": [offer.requirements_v1(1000, &resource)]});
                return (StatusCode::PAYMENT_REQUIRED, Json(body)).into_response();
            }
            let required = PaymentRequired {
                x402_version: 2,
                error: None,
                resource,
                accepts: vec![offer.requirements(1000)],
            };
            (StatusCode::PAYMENT_REQUIRED, [("payment-required", required.header_value())], "")
                .into_response()
        }
    };
    serve(axum::Router::new().route("/x", get(handler))).await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_x402_only_seller_is_paid_in_its_version_and_each_call_pays() {
    // anvil's second development key.
    let key =
        hex::decode("59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d").unwrap();
    for version in [1, 2] {
        let paid = Arc::new(AtomicUsize::new(0));
        let seller = x402_seller(version, paid.clone()).await;
        let wallet = Wallet {
            x402_key: Some(paystile_protocol::x402::SigningKey::from_slice(&key).unwrap()),
            ..Wallet::default()
        };
        let limits = Limits {
            budget: Some(usdc("0.0015")),
            max_price: Some(usdc("0.001")),
            allow_origins: vec![seller.clone()],
        };
        let agent = Agent::new(Config::new(wallet, limits, None)).unwrap();
        let answer = agent.fetch(Request::get(&format!("{seller}/x")).unwrap()).await.unwrap();
        assert_eq!((answer.status, answer.body.as_slice()), (200, &b"paid content"[..]));
        let payment = answer.payment.unwrap();
        assert_eq!((payment.scheme, payment.amount_usdc), (Scheme::X402, usdc("0.001")));
        assert_eq!(payment.transaction.as_deref(), Some("0xabc"), "v{version}");
        assert_eq!(agent.last_offers()[0].x402[0].x402_version, version);
        // Not cached: the next call meets the 402 again, and 0.0005 left does not pay it.
        let refused = agent.fetch(Request::get(&format!("{seller}/x")).unwrap()).await;
        assert!(
            matches!(refused, Err(AgentError::Refused(Refusal::OverBudget { .. }))),
            "{refused:?}"
        );
        assert_eq!(paid.load(Ordering::SeqCst), 1);
    }
}
