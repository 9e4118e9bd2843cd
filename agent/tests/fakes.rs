//! The agent against fakes on loopback, no stack: sellers that offer only an L402 challenge
//! (as aperture does), only x402, or only a Bearer challenge; an LND node that pays invoices
//! as LND's REST API documents it (`POST /v1/channels/transactions`, macaroon as hex in
//! `Grpc-Metadata-macaroon`, `fee_limit.fixed_msat`, bytes as base64, errors as
//! grpc-gateway's `{code, message}`), or fails the ways a wallet can; and hostile 402s.
//! Invoices are real signed BOLT11s made by the ledger's sandbox node, which also "pays"
//! them for the fake LND. Also the CLI binary, end to end.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use paystile_agent::{
    Agent, AgentError, Config, Fetched, Lightning, Limits, PayToken, Refusal, Request, Scheme,
    Wallet,
};
use paystile_ledger::invoice::InvoiceRequest;
use paystile_ledger::invoice::sandbox::SandboxNode;
use paystile_protocol::Usdc;
use paystile_protocol::l402::{self, Identifier, Offer};
use paystile_protocol::macaroon::Macaroon;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const LND_MACAROON: &[u8] = b"admin macaroon bytes";
const NODE_SECRET: &[u8] = b"the fake lightning network's secret";
/// What the tests' agents pay at most per USDC bought: the seller's 1000, with room for fees.
const RATE: u64 = 1100;

fn usdc(amount: &str) -> Usdc {
    amount.parse().unwrap()
}

fn node() -> SandboxNode {
    SandboxNode::new(NODE_SECRET).unwrap()
}

/// A signed invoice of `msat` and its payment hash.
fn invoice(msat: u64) -> (String, [u8; 32]) {
    let request =
        InvoiceRequest { amount_msat: msat, memo: "fake".into(), expiry: Duration::from_secs(600) };
    let invoice = node().create(&request).unwrap();
    (invoice.bolt11, invoice.payment_hash)
}

/// paystile's macaroon for `payment_hash`, buying `budget` USDC of service `weather`.
fn macaroon(payment_hash: [u8; 32], budget: &str) -> String {
    let id = Identifier { payment_hash, token_id: rand::random() };
    let offer = Offer {
        service_id: "weather".into(),
        valid_until: 4_000_000_000,
        budget: budget.parse().unwrap(),
        capabilities: vec![],
        sandbox: false,
    };
    l402::encode_macaroon(&l402::mint(b"seller secret", &id, &offer))
}

/// An L402 402: `WWW-Authenticate` with the macaroon and invoice, and paystile's body when
/// `price` is given.
fn challenge(macaroon: &str, invoice: &str, price: Option<&str>) -> Response {
    let body = match price {
        Some(price) => json!({"error": "Payment required", "price": price, "serviceId": "weather"}),
        None => json!({"error": "Payment required"}),
    };
    let mut response = (StatusCode::PAYMENT_REQUIRED, Json(body)).into_response();
    let value = HeaderValue::from_str(&l402::challenge(macaroon, invoice)).unwrap();
    response.headers_mut().insert("www-authenticate", value);
    response
}

/// Whether `headers` carry an L402 credential whose preimage opens its macaroon's payment
/// hash (what a seller checks, besides the macaroon's signature).
fn paid_l402(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get("authorization").and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some((macaroon, preimage)) =
        value.strip_prefix("L402 ").and_then(|credential| credential.split_once(':'))
    else {
        return false;
    };
    let (Ok(bytes), Ok(preimage)) = (STANDARD.decode(macaroon), hex::decode(preimage)) else {
        return false;
    };
    let Some(id) =
        Macaroon::from_binary(&bytes).ok().and_then(|m| Identifier::decode(m.identifier()))
    else {
        return false;
    };
    Sha256::digest(preimage).as_slice() == id.payment_hash
}

/// What the fake seller saw.
#[derive(Clone, Default)]
struct Seen {
    calls: Arc<AtomicUsize>,
    /// The `Authorization` of every call to `/other`.
    other_authorizations: Arc<Mutex<Vec<Option<String>>>>,
}

/// An L402 seller, each 402 with a new invoice:
/// - `/paid`: 2 sat for a 0.002 USDC budget, calls at 0.001; `/other`: another service, free;
/// - `/aperture`: as aperture sends it, no body and no budget caveat: 1 sat;
/// - `/dear`: 5000 sat for 0.002 USDC; `/thin`: a budget below the price;
/// - `/foreign`: a macaroon for another payment hash than the invoice's;
/// - `/always`: 402 whatever is presented;
/// - `/huge`: 80 KB of headers; `/huge-body`: a 70 KB body; `/malformed`: not a challenge.
async fn seller(seen: Seen) -> String {
    let paid = {
        let seen = seen.clone();
        move |headers: HeaderMap| {
            seen.calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if paid_l402(&headers) {
                    return ([("x-charge-id", "ch_fake")], "forecast: sunny").into_response();
                }
                let (bolt11, hash) = invoice(2_000);
                challenge(&macaroon(hash, "0.002"), &bolt11, Some("0.001000"))
            }
        }
    };
    let other = {
        let seen = seen.clone();
        move |headers: HeaderMap| {
            let authorization =
                headers.get("authorization").map(|v| v.to_str().unwrap().to_owned());
            seen.other_authorizations.lock().unwrap().push(authorization);
            async { "free" }
        }
    };
    let aperture = |headers: HeaderMap| async move {
        if paid_l402(&headers) {
            return "aperture content".into_response();
        }
        let (bolt11, payment_hash) = invoice(1_000);
        let id = Identifier { payment_hash, token_id: rand::random() };
        let mut minted = Macaroon::mint(b"aperture root key", &id.encode(), b"aperture");
        minted.add_first_party_caveat(b"services=aperture-weather:0");
        challenge(&l402::encode_macaroon(&minted), &bolt11, None)
    };
    let dear = || async {
        let (bolt11, hash) = invoice(5_000_000);
        challenge(&macaroon(hash, "0.002"), &bolt11, Some("0.001000"))
    };
    let thin = || async {
        let (bolt11, hash) = invoice(500);
        challenge(&macaroon(hash, "0.0005"), &bolt11, Some("0.001000"))
    };
    let foreign = || async {
        let (bolt11, _) = invoice(2_000);
        challenge(&macaroon([9; 32], "0.002"), &bolt11, Some("0.001000"))
    };
    let always = || async {
        let (bolt11, hash) = invoice(2_000);
        challenge(&macaroon(hash, "0.002"), &bolt11, Some("0.001000"))
    };
    let huge = || async {
        let (bolt11, hash) = invoice(2_000);
        let mut response = challenge(&macaroon(hash, "0.002"), &bolt11, Some("0.001000"));
        for i in 0..8 {
            let name = HeaderName::from_bytes(format!("x-pad-{i}").as_bytes()).unwrap();
            response
                .headers_mut()
                .insert(name, HeaderValue::from_str(&"a".repeat(10_000)).unwrap());
        }
        response
    };
    let huge_body = || async {
        let (bolt11, hash) = invoice(2_000);
        let mut response = challenge(&macaroon(hash, "0.002"), &bolt11, None);
        let padding =
            json!({"price": "0.001000", "serviceId": "weather", "pad": "a".repeat(70_000)});
        *response.body_mut() = axum::body::Body::from(padding.to_string());
        response
    };
    let malformed = || async {
        let mut response = (StatusCode::PAYMENT_REQUIRED, "pay").into_response();
        let bad =
            HeaderValue::from_static("L402 macaroon=\"not-a-macaroon\", invoice=\"lnbcrt20n1p\"");
        response.headers_mut().insert("www-authenticate", bad);
        response
    };
    // Each credential is good for three calls.
    let metered = {
        let uses: Arc<Mutex<std::collections::HashMap<String, usize>>> = Arc::default();
        move |headers: HeaderMap| {
            let uses = uses.clone();
            async move {
                if paid_l402(&headers) {
                    let credential = headers["authorization"].to_str().unwrap().to_owned();
                    let mut uses = uses.lock().unwrap();
                    let used = uses.entry(credential).or_default();
                    if *used < 3 {
                        *used += 1;
                        return "metered content".into_response();
                    }
                }
                let (bolt11, hash) = invoice(2_000);
                challenge(&macaroon(hash, "0.002"), &bolt11, Some("0.000600"))
            }
        }
    };
    // The first paid call takes longer than the agent waits; later ones answer at once.
    let slow_once = {
        let slow = Arc::new(std::sync::atomic::AtomicBool::new(true));
        move |headers: HeaderMap| {
            let slow = slow.clone();
            async move {
                if !paid_l402(&headers) {
                    let (bolt11, hash) = invoice(2_000);
                    return challenge(&macaroon(hash, "0.002"), &bolt11, Some("0.001000"));
                }
                if slow.swap(false, Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
                "late content".into_response()
            }
        }
    };
    let app = axum::Router::new()
        .route("/paid", get(paid))
        .route("/slow-once", get(slow_once))
        .route("/metered", get(metered))
        .route("/other", get(other))
        .route("/aperture", get(aperture))
        .route("/dear", get(dear))
        .route("/thin", get(thin))
        .route("/foreign", get(foreign))
        .route("/always", get(always))
        .route("/huge", get(huge))
        .route("/huge-body", get(huge_body))
        .route("/malformed", get(malformed));
    serve(app).await
}

/// How the fake LND node answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lnd {
    Pays,
    /// Answers after the agent gave up.
    Hangs,
    /// A proxy's 502 without LND's error body.
    BadGateway,
    /// grpc-gateway's error: LND did not pay.
    GrpcError,
    /// A preimage that is not the invoice's.
    WrongPreimage,
}

#[derive(Clone)]
struct LndState {
    mode: Lnd,
    /// Payments the node was asked for.
    asked: Arc<AtomicUsize>,
    /// The `fee_limit` of each request.
    fee_limits: Arc<Mutex<Vec<Value>>>,
}

/// An LND node's `SendPaymentSync` over REST.
async fn lnd(mode: Lnd) -> (String, LndState) {
    let state = LndState { mode, asked: Arc::default(), fee_limits: Arc::default() };
    let send = |State(state): State<LndState>, headers: HeaderMap, Json(body): Json<Value>| async move {
        let macaroon = headers.get("grpc-metadata-macaroon").and_then(|v| v.to_str().ok());
        if macaroon != Some(&hex::encode(LND_MACAROON)) {
            return (
                StatusCode::FORBIDDEN,
                Json(json!({"code": 2, "message": "verification failed"})),
            );
        }
        state.asked.fetch_add(1, Ordering::SeqCst);
        state.fee_limits.lock().unwrap().push(body["fee_limit"].clone());
        let preimage = match node().pay(body["payment_request"].as_str().unwrap_or_default()) {
            Ok(preimage) => preimage,
            Err(e) => return (StatusCode::OK, Json(json!({"payment_error": e.to_string()}))),
        };
        match state.mode {
            Lnd::Pays | Lnd::WrongPreimage => {
                let preimage = if state.mode == Lnd::Pays { preimage } else { [0; 32] };
                let hash: [u8; 32] = Sha256::digest(preimage).into();
                (
                    StatusCode::OK,
                    Json(json!({
                        "payment_error": "",
                        "payment_preimage": STANDARD.encode(preimage),
                        "payment_hash": STANDARD.encode(hash),
                        "payment_route": {"total_amt": "2", "total_fees": "0"},
                    })),
                )
            }
            Lnd::Hangs => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                (StatusCode::OK, Json(json!({})))
            }
            Lnd::BadGateway => (StatusCode::BAD_GATEWAY, Json(json!("upstream timed out"))),
            Lnd::GrpcError => (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({"code": 2, "message": "insufficient local balance", "details": []})),
            ),
        }
    };
    let app = axum::Router::new()
        .route("/v1/channels/transactions", post(send))
        .with_state(state.clone());
    (serve(app).await, state)
}

async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

fn limits(origin: &str) -> Limits {
    Limits {
        budget: Some(usdc("0.01")),
        max_price: Some(usdc("0.001")),
        allow_origins: vec![origin.into()],
        l402_max_sats_per_usdc: Some(RATE),
        // A paystile L402 buys a budget of many calls.
        l402_max_purchase: Some(usdc("0.005")),
        ..Limits::default()
    }
}

fn l402_agent(seller: &str, lnd: &str, log: &Path) -> Agent {
    lnd_agent(lnd, limits(seller), |config| config.log = Some(log.to_path_buf()))
}

/// An agent paying through the fake LND at `lnd`, with `limits` and `config` applied.
fn lnd_agent(lnd: &str, limits: Limits, config: impl FnOnce(&mut Config)) -> Agent {
    let lightning = Lightning::Lnd { url: lnd.into(), macaroon_hex: hex::encode(LND_MACAROON) };
    let wallet = Wallet { lightning: Some(lightning), ..Wallet::default() };
    let mut built = Config::new(wallet, limits, None);
    config(&mut built);
    Agent::new(built).unwrap()
}

/// `n` fetches of `url` at once.
async fn fetch_at_once(
    agent: &Arc<Agent>,
    url: &str,
    n: usize,
) -> Vec<Result<Fetched, AgentError>> {
    let fetches: Vec<_> = (0..n)
        .map(|_| {
            let (agent, url) = (agent.clone(), url.to_owned());
            tokio::spawn(async move { agent.fetch(Request::get(&url).unwrap()).await })
        })
        .collect();
    let mut answers = Vec::new();
    for fetch in fetches {
        answers.push(fetch.await.unwrap());
    }
    answers
}

fn log_lines(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_l402_only_seller_is_paid_through_lnd_once_and_the_credential_reused() {
    let seen = Seen::default();
    let seller = seller(seen.clone()).await;
    let (lnd, wallet) = lnd(Lnd::Pays).await;
    let dir = tempfile::TempDir::new().unwrap();
    let log = dir.path().join("spend.jsonl");
    let agent = l402_agent(&seller, &lnd, &log);

    let url = format!("{seller}/paid?api_key=s3cret");
    let answer = agent.fetch(Request::get(&url).unwrap()).await.unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, b"forecast: sunny");
    let paid = answer.payment.unwrap();
    assert_eq!((paid.scheme, paid.amount_usdc), (Scheme::L402, usdc("0.002")));
    assert_eq!(paid.charge_id.as_deref(), Some("ch_fake"));
    assert_eq!(agent.last_offers()[0].l402.as_ref().unwrap().invoice_msat, Some(2_000));
    // 0.002 USDC at 1100 sat/USDC is 2.2 sat: the invoice's 2 leave 200 msat for fees.
    assert_eq!(*wallet.fee_limits.lock().unwrap(), [json!({"fixed_msat": "200"})]);

    let again = agent.fetch(Request::get(&url).unwrap()).await.unwrap();
    assert_eq!((again.status, again.payment), (200, None));
    assert_eq!(wallet.asked.load(Ordering::SeqCst), 1, "paid once");
    assert_eq!(seen.calls.load(Ordering::SeqCst), 3, "402, retry, cached call");
    assert_eq!(agent.spent(), usdc("0.002"));
    // The log and the offers keep no query (it may carry a key).
    let lines = log_lines(&log);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["url"], format!("{seller}/paid"));
    assert_eq!(
        (lines[0]["origin"].as_str(), lines[0]["outcome"].as_str()),
        (Some(&*seller), Some("paid"))
    );
    assert_eq!(agent.last_offers()[0].url, format!("{seller}/paid"));

    // A path no 402 has named gets no credential: its service and price are not known.
    let other = agent.fetch(Request::get(&format!("{seller}/other")).unwrap()).await.unwrap();
    assert_eq!((other.status, other.body.as_slice(), other.payment), (200, &b"free"[..], None));
    assert_eq!(*seen.other_authorizations.lock().unwrap(), [None]);

    // A seller as aperture answers (no USDC stated anywhere): the invoice's 1 sat is worth
    // 0.000910 USDC at 1100 sat/USDC, counted as the call's price and spent.
    let aperture = agent.fetch(Request::get(&format!("{seller}/aperture")).unwrap()).await.unwrap();
    assert_eq!(aperture.body, b"aperture content");
    assert_eq!(aperture.payment.unwrap().amount_usdc, usdc("0.000910"));
    assert_eq!(agent.spent(), usdc("0.002910"));
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_fetches_buy_one_l402_and_share_it() {
    let seen = Seen::default();
    let seller = seller(seen.clone()).await;
    let (lnd, wallet) = lnd(Lnd::Pays).await;
    let dir = tempfile::TempDir::new().unwrap();
    let agent = Arc::new(l402_agent(&seller, &lnd, &dir.path().join("spend.jsonl")));
    let mut paid = 0;
    for answer in fetch_at_once(&agent, &format!("{seller}/paid"), 8).await {
        let answer = answer.unwrap();
        assert_eq!(answer.status, 200);
        paid += usize::from(answer.payment.is_some());
    }
    assert_eq!((paid, wallet.asked.load(Ordering::SeqCst)), (1, 1));
    assert_eq!(agent.spent(), usdc("0.002"));
}

/// A spent credential met by several fetches at once: one of them buys the next, and the
/// others use it rather than each buying their own.
#[tokio::test(flavor = "multi_thread")]
async fn fetches_that_meet_a_spent_credential_together_buy_one_more() {
    let seller = seller(Seen::default()).await;
    let (lnd, wallet) = lnd(Lnd::Pays).await;
    let dir = tempfile::TempDir::new().unwrap();
    let agent = Arc::new(l402_agent(&seller, &lnd, &dir.path().join("spend.jsonl")));
    let url = format!("{seller}/metered");
    // The first credential's three calls.
    for _ in 0..3 {
        assert_eq!(agent.fetch(Request::get(&url).unwrap()).await.unwrap().status, 200);
    }
    assert_eq!(wallet.asked.load(Ordering::SeqCst), 1);
    // Four at once meet its 402: three calls of the next credential serve three of them, and
    // the fourth buys one more.
    for answer in fetch_at_once(&agent, &url, 4).await {
        assert_eq!(answer.unwrap().status, 200);
    }
    assert_eq!(wallet.asked.load(Ordering::SeqCst), 3);
    assert_eq!(agent.spent(), usdc("0.006"));
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_402s_are_clear_errors_and_nothing_is_paid() {
    let seen = Seen::default();
    let seller = seller(seen.clone()).await;
    let (lnd, wallet) = lnd(Lnd::Pays).await;
    let dir = tempfile::TempDir::new().unwrap();
    let log = dir.path().join("spend.jsonl");
    let agent = l402_agent(&seller, &lnd, &log);
    let fetch = |path: &str| agent.fetch(Request::get(&format!("{seller}{path}")).unwrap());

    let huge = fetch("/huge").await.unwrap_err();
    assert!(matches!(huge, AgentError::TooLarge { what: "the 402's headers", .. }), "{huge}");
    let huge_body = fetch("/huge-body").await.unwrap_err();
    assert!(
        matches!(huge_body, AgentError::TooLarge { what: "the 402's body", .. }),
        "{huge_body}"
    );
    let malformed = fetch("/malformed").await.unwrap_err();
    assert!(matches!(malformed, AgentError::MalformedChallenge { .. }), "{malformed}");
    assert!(malformed.to_string().contains("L402 challenge"), "{malformed}");
    let thin = fetch("/thin").await.unwrap_err();
    assert!(thin.to_string().contains("less than one call's price"), "{thin}");
    // An invoice for another payment than the macaroon's is not paid (it would buy nothing).
    let foreign = fetch("/foreign").await.unwrap_err();
    assert!(foreign.to_string().contains("payment hashes differ"), "{foreign}");
    // An invoice whose amount is far above what the body's price and budget are worth.
    let dear = fetch("/dear").await.unwrap_err();
    assert!(
        matches!(&dear, AgentError::Refused(Refusal::InvoiceOverRate { rate: RATE, .. })),
        "{dear}"
    );
    assert!(dear.to_string().contains("asks 5000 sat for 0.002000 USDC"), "{dear}");
    // Without a rate, no invoice is paid at all.
    let no_rate = Limits { l402_max_sats_per_usdc: None, ..agent.limits().clone() };
    let rateless = lnd_agent(&lnd, no_rate, |_| {});
    let refused = rateless.fetch(Request::get(&format!("{seller}/paid")).unwrap()).await;
    assert!(matches!(refused, Err(AgentError::Refused(Refusal::NoSatsRate))), "{refused:?}");
    // A cheap price in the body does not make a big purchase pass: one purchase buys at most
    // the per-call maximum unless told more.
    let one_call = Limits { l402_max_purchase: None, ..agent.limits().clone() };
    let capped = lnd_agent(&lnd, one_call, |_| {});
    let refused = capped.fetch(Request::get(&format!("{seller}/paid")).unwrap()).await;
    assert!(
        matches!(&refused, Err(AgentError::Refused(Refusal::OverMaxPurchase { .. }))),
        "{refused:?}"
    );
    assert_eq!(wallet.asked.load(Ordering::SeqCst), 0);
    assert_eq!((agent.spent(), log_lines(&log).len()), (Usdc::ZERO, 0));

    // Paid, then 402 again: an error naming the payment, and the seller is not paid again
    // this session.
    let always = fetch("/always").await.unwrap_err();
    assert!(matches!(always, AgentError::PaidButRefused { scheme: Scheme::L402, .. }), "{always}");
    let blocked = fetch("/always").await.unwrap_err();
    assert!(matches!(blocked, AgentError::Refused(Refusal::Blocked { .. })), "{blocked}");
    assert!(blocked.to_string().contains("answered 402 after a L402 payment"), "{blocked}");
    assert_eq!(wallet.asked.load(Ordering::SeqCst), 1);
    assert_eq!((agent.spent(), log_lines(&log).len()), (usdc("0.002"), 1));

    // No wallet for what is offered.
    let bare = Agent::new(Config::new(Wallet::default(), agent.limits().clone(), None)).unwrap();
    let none = bare.fetch(Request::get(&format!("{seller}/paid")).unwrap()).await.unwrap_err();
    assert!(matches!(none, AgentError::NoPayableScheme { .. }), "{none}");
    assert!(none.to_string().contains("offering L402"), "{none}");
}

/// A wallet that may have paid counts the payment, logs it as unknown and pays that seller
/// no more this session; one that says it did not pay leaves the budget whole.
#[tokio::test(flavor = "multi_thread")]
async fn a_payment_whose_outcome_is_unknown_is_counted_and_not_repeated() {
    let seller = seller(Seen::default()).await;
    for mode in [Lnd::Hangs, Lnd::BadGateway, Lnd::WrongPreimage, Lnd::GrpcError] {
        let (lnd, wallet) = lnd(mode).await;
        let dir = tempfile::TempDir::new().unwrap();
        let log = dir.path().join("spend.jsonl");
        let agent = lnd_agent(&lnd, limits(&seller), |config| {
            config.log = Some(log.clone());
            config.timeout = Duration::from_secs(2);
        });
        let first = agent.fetch(Request::get(&format!("{seller}/paid")).unwrap()).await;
        let second = agent.fetch(Request::get(&format!("{seller}/paid")).unwrap()).await;
        if mode == Lnd::GrpcError {
            assert!(matches!(first, Err(AgentError::Lightning(_))), "{first:?}");
            assert!(first.unwrap_err().to_string().contains("insufficient local balance"));
            assert!(matches!(second, Err(AgentError::Lightning(_))), "{second:?}");
            assert_eq!(wallet.asked.load(Ordering::SeqCst), 2, "not paid: tried again");
            assert_eq!((agent.spent(), log_lines(&log).len()), (Usdc::ZERO, 0));
            continue;
        }
        let first = first.unwrap_err();
        assert!(
            matches!(first, AgentError::OutcomeUnknown { scheme: Scheme::L402, .. }),
            "{first}"
        );
        assert!(first.to_string().contains("0.002000 USDC is counted as spent"), "{first}");
        assert!(matches!(second, Err(AgentError::Refused(Refusal::Blocked { .. }))), "{second:?}");
        assert_eq!(wallet.asked.load(Ordering::SeqCst), 1);
        let lines = log_lines(&log);
        assert_eq!((agent.spent(), lines.len()), (usdc("0.002"), 1));
        assert_eq!(lines[0]["outcome"], "unknown");
    }
}

/// The invoice is paid but the retry's answer never comes: the credential was kept when it
/// was bought, so the next call uses it instead of buying again.
#[tokio::test(flavor = "multi_thread")]
async fn a_credential_bought_before_a_failed_retry_is_not_bought_again() {
    let seller = seller(Seen::default()).await;
    let (lnd, wallet) = lnd(Lnd::Pays).await;
    let dir = tempfile::TempDir::new().unwrap();
    let log = dir.path().join("spend.jsonl");
    let agent = lnd_agent(&lnd, limits(&seller), |config| {
        config.log = Some(log.clone());
        config.timeout = Duration::from_secs(1);
    });
    let url = format!("{seller}/slow-once");
    let failed = agent.fetch(Request::get(&url).unwrap()).await.unwrap_err();
    assert!(matches!(failed, AgentError::PaidButFailed(_)), "{failed}");
    let answer = agent.fetch(Request::get(&url).unwrap()).await.unwrap();
    assert_eq!((answer.status, answer.body.as_slice()), (200, &b"late content"[..]));
    assert!(answer.payment.is_none());
    assert_eq!((wallet.asked.load(Ordering::SeqCst), agent.spent()), (1, usdc("0.002")));
    let lines = log_lines(&log);
    assert_eq!((lines.len(), lines[0]["outcome"].as_str()), (1, Some("paid")));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_prints_the_answer_and_what_it_paid_or_why_it_refused() {
    let seller = seller(Seen::default()).await;
    let (lnd, wallet) = lnd(Lnd::Pays).await;
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
                .env("PAYSTILE_AGENT_L402_MAX_SATS_PER_USDC", "1000")
                .env("PAYSTILE_AGENT_L402_MAX_PURCHASE_USDC", "0.002")
                .env("PAYSTILE_AGENT_ALLOW_ORIGINS", format!("http://example.com,{seller}"))
                .output()
                .unwrap()
        })
    };
    let refused = run("0.0005").await.unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("per-call maximum of 0.000500 USDC (--max-price-usdc"), "{stderr}");
    assert_eq!(wallet.asked.load(Ordering::SeqCst), 0);

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
    let logged = log_lines(&log);
    assert_eq!(logged[0]["chargeId"], "ch_fake");
    assert_eq!(logged[0]["origin"], seller);

    // Flags that would pay without a bound are refused at start.
    let bad = |args: &'static [&'static str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_paystile-agent"))
            .args(["fetch", "http://127.0.0.1:9/"])
            .args(args)
            .env_remove("PAYSTILE_PAY_TOKEN")
            .output()
            .unwrap();
        assert!(!output.status.success(), "{args:?}");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    assert!(bad(&["--pay-token", "eyJ"]).contains("--pay-token needs --pay-token-origin"));
    let star = bad(&["--pay-token", "eyJ", "--pay-token-origin", "*"]);
    assert!(star.contains("`*` is refused"), "{star}");
    assert!(bad(&["--l402-max-sats-per-usdc", "0"]).contains("must be above 0"));
    assert!(bad(&["--x402-asset", "eip155:1/erc20:0x12"]).contains("CAIP-19"));

    // `mcp` whose client leaves before initializing (stdin closed) ends cleanly, after saying
    // what it would pay.
    let mcp = Command::new(env!("CARGO_BIN_EXE_paystile-agent"))
        .args(["mcp", "--log"])
        .arg(&log)
        .env_remove("PAYSTILE_PAY_TOKEN")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&mcp.stderr);
    assert!(mcp.status.success(), "{stderr}");
    assert!(stderr.contains("budget none: pays nothing"), "{stderr}");
    assert!(stderr.contains("L402 invoices: none paid, no rate"), "{stderr}");
}

/// How the x402 fake seller behaves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum X402Seller {
    /// Checks the payment as a gateway does and answers with a settlement receipt.
    Honest,
    /// Names a new `payTo` in every 402, and answers 402 to every payment.
    MovingPayTo,
    /// Takes the payment and answers after the agent gave up.
    Hangs,
}

const ANVIL_USDC: &str = "0x5FbDB2315678afecb367f032d93F642f64180aa3";

fn anvil_asset() -> paystile_agent::X402Asset {
    format!("eip155:31337/erc20:{ANVIL_USDC}").parse().unwrap()
}

/// An x402 seller speaking one version only, in a token on anvil's chain.
async fn x402_seller(version: u32, mode: X402Seller, paid: Arc<AtomicUsize>) -> String {
    use paystile_protocol::x402::{self, OfferSettings, PaymentRequired, Resource, SettleResponse};
    let served = Arc::new(AtomicUsize::new(0));
    let offer = move |n: usize| {
        // Every address but zero is one; a moving seller names another one each time.
        let pay_to = format!(
            "0x{:040x}",
            0x3c44_usize + if mode == X402Seller::MovingPayTo { n } else { 0 }
        );
        let settings = OfferSettings {
            network: "eip155:31337",
            pay_to: &pay_to,
            asset: Some(ANVIL_USDC),
            asset_name: Some("USD Coin"),
            asset_version: Some("2"),
            max_timeout_seconds: None,
        };
        x402::Offer::from_settings(&settings).unwrap()
    };
    let handler = move |headers: HeaderMap| {
        let (paid, served) = (paid.clone(), served.clone());
        async move {
            let n = served.fetch_add(1, Ordering::SeqCst);
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
                paid.fetch_add(1, Ordering::SeqCst);
                if mode == X402Seller::Hangs {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
                if mode == X402Seller::Honest {
                    payment.check(&[offer(0)], 1000, now).unwrap();
                    let receipt = SettleResponse {
                        success: true,
                        error_reason: None,
                        payer: None,
                        transaction: "0xabc".into(),
                        network: "eip155:31337".into(),
                        amount: Some("1000".into()),
                    };
                    let header =
                        if version == 1 { "x-payment-response" } else { "payment-response" };
                    return ([(header, receipt.header_value())], "paid content").into_response();
                }
            }
            if version == 1 {
                let body = json!({"x402Version": 1, "error": "pay",
                    "accepts": [offer(n).requirements_v1(1000, &resource)]});
                return (StatusCode::PAYMENT_REQUIRED, Json(body)).into_response();
            }
            let required = PaymentRequired {
                x402_version: 2,
                error: None,
                resource,
                accepts: vec![offer(n).requirements(1000)],
            };
            // A new service name each time: the session block is by origin, which the
            // server cannot rename.
            let body = json!({"serviceId": format!("svc{n}")}).to_string();
            (StatusCode::PAYMENT_REQUIRED, [("payment-required", required.header_value())], body)
                .into_response()
        }
    };
    serve(axum::Router::new().route("/x", get(handler))).await
}

fn x402_agent(seller: &str, budget: &str, assets: Vec<paystile_agent::X402Asset>) -> Agent {
    x402_agent_with(seller, budget, assets, |_| {})
}

fn x402_agent_with(
    seller: &str,
    budget: &str,
    assets: Vec<paystile_agent::X402Asset>,
    config: impl FnOnce(&mut Config),
) -> Agent {
    let wallet = Wallet { x402_key: Some(x402_key()), ..Wallet::default() };
    let limits = Limits { budget: Some(usdc(budget)), x402_assets: assets, ..limits(seller) };
    let mut built = Config::new(wallet, limits, None);
    config(&mut built);
    Agent::new(built).unwrap()
}

/// anvil's second development key.
fn x402_key() -> paystile_protocol::x402::SigningKey {
    let key =
        hex::decode("59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d").unwrap();
    paystile_protocol::x402::SigningKey::from_slice(&key).unwrap()
}

/// An offer of the anvil token, paid to anvil's third account.
fn anvil_offer() -> paystile_protocol::x402::Offer {
    let settings = paystile_protocol::x402::OfferSettings {
        network: "eip155:31337",
        pay_to: "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC",
        asset: Some(ANVIL_USDC),
        asset_name: Some("USD Coin"),
        asset_version: Some("2"),
        max_timeout_seconds: None,
    };
    paystile_protocol::x402::Offer::from_settings(&settings).unwrap()
}

/// A v2 `PAYMENT-REQUIRED` asking 1000 units of the anvil token.
fn anvil_payment_required() -> String {
    use paystile_protocol::x402::{PaymentRequired, Resource};
    let required = PaymentRequired {
        x402_version: 2,
        error: None,
        resource: Resource { url: "http://seller/x".into(), description: None, mime_type: None },
        accepts: vec![anvil_offer().requirements(1000)],
    };
    required.header_value()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_x402_only_seller_is_paid_in_its_version_and_each_call_pays() {
    for version in [1, 2] {
        let paid = Arc::new(AtomicUsize::new(0));
        let seller = x402_seller(version, X402Seller::Honest, paid.clone()).await;
        let agent = x402_agent(&seller, "0.0015", vec![anvil_asset()]);
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

        // A token that is not USDC where the agent knows it, and not listed: not signed for.
        let unlisted = x402_agent(&seller, "1", vec![]);
        let refused = unlisted.fetch(Request::get(&format!("{seller}/x")).unwrap()).await;
        let Err(AgentError::Refused(refusal @ Refusal::AssetNotAllowed { .. })) = refused else {
            panic!("{refused:?}")
        };
        assert!(refusal.to_string().contains(ANVIL_USDC), "{refusal}");
        assert_eq!(paid.load(Ordering::SeqCst), 1);
    }
}

/// Parallel calls share the budget: exactly as many are paid as it covers.
#[tokio::test(flavor = "multi_thread")]
async fn parallel_x402_calls_never_spend_past_the_budget() {
    let paid = Arc::new(AtomicUsize::new(0));
    let seller = x402_seller(2, X402Seller::Honest, paid.clone()).await;
    let agent = Arc::new(x402_agent(&seller, "0.0035", vec![anvil_asset()]));
    let (mut answered, mut over_budget) = (0, 0);
    for answer in fetch_at_once(&agent, &format!("{seller}/x"), 10).await {
        match answer {
            Ok(answer) => answered += usize::from(answer.status == 200),
            Err(AgentError::Refused(Refusal::OverBudget { .. })) => over_budget += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!((answered, over_budget, paid.load(Ordering::SeqCst)), (3, 7, 3));
    assert_eq!((agent.spent(), agent.remaining()), (usdc("0.003"), usdc("0.0005")));
}

/// A seller whose `payTo` moves between the 402 and the retry (and that answers 402 to the
/// payment): one signature, an error, and no second payment in this session.
#[tokio::test(flavor = "multi_thread")]
async fn a_pay_to_that_moves_after_payment_is_paid_once() {
    let paid = Arc::new(AtomicUsize::new(0));
    let seller = x402_seller(2, X402Seller::MovingPayTo, paid.clone()).await;
    let agent = x402_agent(&seller, "1", vec![anvil_asset()]);
    let first = agent.fetch(Request::get(&format!("{seller}/x")).unwrap()).await.unwrap_err();
    assert!(matches!(first, AgentError::PaidButRefused { scheme: Scheme::X402, .. }), "{first}");
    let second = agent.fetch(Request::get(&format!("{seller}/x")).unwrap()).await.unwrap_err();
    assert!(matches!(second, AgentError::Refused(Refusal::Blocked { .. })), "{second}");
    assert_eq!(paid.load(Ordering::SeqCst), 1);
    let services: Vec<_> = agent.last_offers().iter().map(|o| o.service()).collect();
    assert_eq!(services, ["svc0", "svc2"], "the second 402 named another service");
    assert_eq!(agent.spent(), usdc("0.001"));
    // Both 402s were read, with their different payTo.
    let offers = agent.last_offers();
    assert_ne!(offers[0].x402[0].pay_to, offers[1].x402[0].pay_to);
}

/// An x402 retry that gets no answer may have been settled: counted, logged as unknown, and
/// the origin not paid again. One that never left (nothing listens any more) counts nothing.
#[tokio::test(flavor = "multi_thread")]
async fn an_x402_retry_without_an_answer_is_counted_unless_it_never_left() {
    let paid = Arc::new(AtomicUsize::new(0));
    let seller = x402_seller(2, X402Seller::Hangs, paid.clone()).await;
    let agent = x402_agent_with(&seller, "1", vec![anvil_asset()], |config| {
        config.timeout = Duration::from_secs(1);
    });
    let lost = agent.fetch(Request::get(&format!("{seller}/x")).unwrap()).await.unwrap_err();
    assert!(matches!(lost, AgentError::OutcomeUnknown { scheme: Scheme::X402, .. }), "{lost}");
    assert_eq!((agent.spent(), paid.load(Ordering::SeqCst)), (usdc("0.001"), 1));
    let blocked = agent.fetch(Request::get(&format!("{seller}/x")).unwrap()).await.unwrap_err();
    assert!(matches!(blocked, AgentError::Refused(Refusal::Blocked { .. })), "{blocked}");
    assert_eq!(agent.payments()[0].outcome, paystile_agent::Outcome::Unknown);

    // A server that answers one 402 and stops listening: the signed retry cannot connect.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gone = format!("http://{}", listener.local_addr().unwrap());
    let required = anvil_payment_required();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (mut socket, _) = listener.accept().await.unwrap();
        drop(listener);
        let mut request = [0u8; 4096];
        let _ = socket.read(&mut request).await.unwrap();
        let answer = format!(
            "HTTP/1.1 402 Payment Required\r\npayment-required: {}\r\ncontent-length: 0\r\n\
             connection: close\r\n\r\n",
            required
        );
        socket.write_all(answer.as_bytes()).await.unwrap();
    });
    let agent = x402_agent(&gone, "1", vec![anvil_asset()]);
    let error = agent.fetch(Request::get(&format!("{gone}/x")).unwrap()).await.unwrap_err();
    assert!(matches!(error, AgentError::Http { reached: false, .. }), "{error}");
    assert_eq!((agent.spent(), agent.payments().len()), (Usdc::ZERO, 0));
}

/// Offer lists a server may send: many offers, junk in them, amounts past any limit, other
/// chains and schemes. The agent reads them without panicking and pays only an offer within
/// its limits.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_x402_offer_lists_are_read_and_only_an_allowed_offer_is_paid() {
    let listed = serde_json::to_value(anvil_offer().requirements(1000)).unwrap();
    let mut accepts = Vec::new();
    for (i, (field, value)) in [
        ("amount", json!("99999999999999999999999")),
        ("amount", json!("-1")),
        ("amount", json!("1e3")),
        ("amount", json!("2000")), // above the per-call maximum
        ("network", json!("eip155:")),
        ("network", json!("solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp")),
        ("scheme", json!("upto")),
        ("payTo", json!("0x0000000000000000000000000000000000000000")),
        ("asset", json!("0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913")), // not on this chain
        ("maxTimeoutSeconds", json!(u64::MAX)),
        ("extra", json!({"name": "", "version": "2"})),
    ]
    .into_iter()
    .enumerate()
    {
        let mut offer = listed.clone();
        offer[field] = value;
        offer["junk"] = json!("x".repeat(i * 100));
        accepts.push(offer);
    }
    let paid = Arc::new(AtomicUsize::new(0));
    let header = |accepts: Vec<Value>| {
        let required =
            json!({"x402Version": 2, "resource": {"url": "http://seller/x"}, "accepts": accepts});
        STANDARD.encode(required.to_string())
    };
    let without_listed = header(accepts.clone());
    accepts.push(listed);
    let with_listed = header(accepts);
    let handler = {
        let paid = paid.clone();
        move |headers: HeaderMap| {
            let (paid, without, with) = (paid.clone(), without_listed.clone(), with_listed.clone());
            async move {
                if headers.contains_key("payment-signature") {
                    paid.fetch_add(1, Ordering::SeqCst);
                    return "paid content".into_response();
                }
                let mode = headers.get("x-mode").map(|v| v.to_str().unwrap().to_owned());
                let value = if mode.as_deref() == Some("with") { with } else { without };
                (StatusCode::PAYMENT_REQUIRED, [("payment-required", value)], "").into_response()
            }
        }
    };
    let seller = serve(axum::Router::new().route("/x", get(handler))).await;
    let agent = x402_agent(&seller, "1", vec![anvil_asset()]);
    let call = |mode: &str| {
        let mut request = Request::get(&format!("{seller}/x")).unwrap();
        request.headers.push(("x-mode".into(), mode.into()));
        agent.fetch(request)
    };
    let refused = call("without").await.unwrap_err();
    // The one offer that reads and is in a listed token is over the per-call maximum.
    assert!(matches!(&refused, AgentError::Refused(Refusal::OverMaxPrice { .. })), "{refused}");
    assert_eq!(paid.load(Ordering::SeqCst), 0);
    let answer = call("with").await.unwrap();
    assert_eq!(answer.payment.unwrap().amount_usdc, usdc("0.001"));
    assert_eq!(paid.load(Ordering::SeqCst), 1);
}

/// How a route of the Bearer seller answers the token.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Bearer {
    /// Charges the price.
    Charges(&'static str),
    /// 402 whatever is presented.
    Always,
    /// Charges, then sends a body larger than the agent reads.
    Big,
    /// Charges, and answers the first call of each Idempotency-Key after the agent gave up
    /// (a replay of the key is answered at once, with the first charge).
    SlowFirst,
}

/// A Bearer-only seller (paystile's Pay Token challenge), recording every `Authorization` it
/// sees: `/pt` (GET 0.001, POST 0.005: routes are priced per method), `/always`, `/big`,
/// `/slow`.
async fn bearer_seller(seen: Arc<Mutex<Vec<Option<String>>>>) -> String {
    let keys: Arc<Mutex<Vec<String>>> = Arc::default();
    let route = move |mode: Bearer| {
        let (seen, keys) = (seen.clone(), keys.clone());
        move |headers: HeaderMap| {
            let (seen, keys) = (seen.clone(), keys.clone());
            async move {
                let authorization =
                    headers.get("authorization").map(|v| v.to_str().unwrap().to_owned());
                let calls = {
                    let mut seen = seen.lock().unwrap();
                    seen.push(authorization.clone());
                    seen.len()
                };
                let price = match mode {
                    Bearer::Charges(price) => price,
                    _ => "0.001000",
                };
                if authorization.as_deref() == Some("Bearer the-token") && mode != Bearer::Always {
                    let charge_id = format!("ch_pt{calls}");
                    let charged = [("x-charge-id", charge_id), ("x-amount-usdc", price.into())];
                    match mode {
                        Bearer::Big => return (charged, "x".repeat(4096)).into_response(),
                        Bearer::SlowFirst => {
                            let key = headers["idempotency-key"].to_str().unwrap().to_owned();
                            let first = {
                                let mut keys = keys.lock().unwrap();
                                let first = !keys.contains(&key);
                                keys.push(key);
                                first
                            };
                            if first {
                                tokio::time::sleep(Duration::from_secs(5)).await;
                            }
                            let replayed = [("x-charge-id", "ch_slow".to_owned())];
                            return (replayed, "slow content").into_response();
                        }
                        _ => return (charged, "pt").into_response(),
                    }
                }
                let body =
                    json!({"error": "Payment required", "price": price, "serviceId": "weather"});
                let mut response = (StatusCode::PAYMENT_REQUIRED, Json(body)).into_response();
                response.headers_mut().insert(
                    "www-authenticate",
                    HeaderValue::from_static("Bearer realm=\"paystile\""),
                );
                response
            }
        }
    };
    let app = axum::Router::new()
        .route(
            "/pt",
            get(route(Bearer::Charges("0.001000"))).post(route(Bearer::Charges("0.005000"))),
        )
        .route("/always", get(route(Bearer::Always)))
        .route("/big", get(route(Bearer::Big)))
        .route("/slow", get(route(Bearer::SlowFirst)))
        .route("/x402-always", get(x402_always));
    serve(app).await
}

/// 402 with an x402 offer in the anvil token, whatever is presented.
async fn x402_always() -> Response {
    (StatusCode::PAYMENT_REQUIRED, [("payment-required", anvil_payment_required())], "")
        .into_response()
}

fn pay_token_agent(seller: &str, origins: Vec<String>, config: impl FnOnce(&mut Config)) -> Agent {
    let wallet = Wallet {
        pay_token: Some(PayToken { token: "the-token".into(), origins }),
        ..Wallet::default()
    };
    let limits = Limits { allow_origins: vec!["*".into()], ..limits(seller) };
    let mut built = Config::new(wallet, limits, None);
    config(&mut built);
    Agent::new(built).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pay_token_goes_only_to_its_origins_and_a_402_to_it_is_not_paid_again() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seller = bearer_seller(seen.clone()).await;
    let elsewhere = "http://127.0.0.1:9".to_owned();
    let agent_for = |origins: Vec<String>| pay_token_agent(&seller, origins, |_| {});
    // Allowed to pay anyone, but the token is for another gateway: never sent here.
    let other = agent_for(vec![elsewhere.clone()]);
    let refused = other.fetch(Request::get(&format!("{seller}/pt")).unwrap()).await.unwrap_err();
    assert!(matches!(refused, AgentError::Refused(Refusal::PayTokenOrigin { .. })), "{refused}");
    assert!(refused.to_string().contains("sent only to http://127.0.0.1:9"), "{refused}");
    assert_eq!(*seen.lock().unwrap(), [None]);

    let agent = agent_for(vec![seller.clone()]);
    let answer = agent.fetch(Request::get(&format!("{seller}/pt")).unwrap()).await.unwrap();
    assert_eq!(answer.payment.unwrap().amount_usdc, usdc("0.001"));
    // Known path: the token goes at once.
    agent.fetch(Request::get(&format!("{seller}/pt")).unwrap()).await.unwrap();
    // A 402 to the token (on a path of the same service): an error, nothing counted, and
    // the token forgotten for the service.
    let always = agent.fetch(Request::get(&format!("{seller}/always")).unwrap()).await.unwrap_err();
    assert!(
        matches!(always, AgentError::CredentialRefused { scheme: Scheme::PayToken, .. }),
        "{always}"
    );
    assert!(always.to_string().contains("Payment required"), "{always}");
    assert_eq!(agent.spent(), usdc("0.002"));
    let token = Some("Bearer the-token".to_owned());
    assert_eq!(
        *seen.lock().unwrap(),
        [None, None, token.clone(), token.clone(), None, token],
        "refused, 402, paid retry, cached call, /always's 402, its refused retry"
    );
}

/// A route priced per method: a POST to a path whose GET is known meets its own 402 (and
/// its price) before the token goes with it.
#[tokio::test(flavor = "multi_thread")]
async fn a_pay_token_call_is_checked_at_its_own_method_s_price() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seller = bearer_seller(seen.clone()).await;
    let agent = pay_token_agent(&seller, vec![seller.clone()], |_| {});
    let url = format!("{seller}/pt");
    assert_eq!(agent.fetch(Request::get(&url).unwrap()).await.unwrap().status, 200);
    let refused = agent.fetch(Request::new("POST", &url).unwrap()).await.unwrap_err();
    assert!(
        matches!(&refused, AgentError::Refused(Refusal::OverMaxPrice { price, .. }) if *price == usdc("0.005")),
        "{refused}"
    );
    let token = Some("Bearer the-token".to_owned());
    assert_eq!(*seen.lock().unwrap(), [None, token, None], "the POST went without the token");
    assert_eq!(agent.spent(), usdc("0.001"));
}

/// Charged, but the answer cannot be read (too large, or too late): counted and logged as
/// unknown, with what to do; a retry with the same Idempotency-Key is not counted again.
#[tokio::test(flavor = "multi_thread")]
async fn a_pay_token_call_whose_answer_is_lost_is_counted_once() {
    let seller = bearer_seller(Arc::default()).await;
    let dir = tempfile::TempDir::new().unwrap();
    let log = dir.path().join("spend.jsonl");
    let agent = pay_token_agent(&seller, vec![seller.clone()], |config| {
        config.max_body_bytes = 1024;
        config.timeout = Duration::from_secs(1);
        config.log = Some(log.clone());
    });
    let big = || {
        let mut request = Request::get(&format!("{seller}/big")).unwrap();
        request.headers.push(("Idempotency-Key".into(), "big-1".into()));
        agent.fetch(request)
    };
    let lost = big().await.unwrap_err();
    assert!(matches!(lost, AgentError::OutcomeUnknown { scheme: Scheme::PayToken, .. }), "{lost}");
    assert!(lost.to_string().contains("over 1024 bytes"), "{lost}");
    assert_eq!(agent.spent(), usdc("0.001"));
    // Lost again with the same key: the gateway charges a key once, so it is not counted
    // again.
    let again = big().await.unwrap_err();
    assert!(matches!(again, AgentError::TooLarge { .. }), "{again}");
    assert_eq!(agent.spent(), usdc("0.001"));

    let keyed = || {
        let mut request = Request::get(&format!("{seller}/slow")).unwrap();
        request.headers.push(("Idempotency-Key".into(), "call-1".into()));
        request
    };
    let lost = agent.fetch(keyed()).await.unwrap_err();
    assert!(lost.to_string().contains("retry with the same Idempotency-Key"), "{lost}");
    assert_eq!(agent.spent(), usdc("0.002"));
    let replay = agent.fetch(keyed()).await.unwrap();
    assert_eq!((replay.status, replay.body.as_slice()), (200, &b"slow content"[..]));
    assert_eq!(agent.spent(), usdc("0.002"), "the replay is not counted again");
    // Once more with the key: the gateway's replay names the same charge; nothing counted.
    assert_eq!(agent.fetch(keyed()).await.unwrap().payment, None);
    assert_eq!(agent.spent(), usdc("0.002"));
    let lines = log_lines(&log);
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().all(|l| l["outcome"] == "unknown"));
    assert_eq!(lines[1]["idempotencyKey"], "call-1");
}

/// An origin blocked after an x402 payment it answered with 402 is not paid with a cached
/// Pay Token either.
#[tokio::test(flavor = "multi_thread")]
async fn a_blocked_origin_is_not_paid_with_a_cached_pay_token() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seller = bearer_seller(seen.clone()).await;
    let agent = pay_token_agent(&seller, vec![seller.clone()], |config| {
        config.wallet.x402_key = Some(x402_key());
        config.limits.x402_assets = vec![anvil_asset()];
    });
    let pt = format!("{seller}/pt");
    assert_eq!(agent.fetch(Request::get(&pt).unwrap()).await.unwrap().status, 200);
    let refused = agent.fetch(Request::get(&format!("{seller}/x402-always")).unwrap()).await;
    assert!(matches!(refused, Err(AgentError::PaidButRefused { .. })), "{refused:?}");
    let blocked = agent.fetch(Request::get(&pt).unwrap()).await.unwrap_err();
    assert!(matches!(blocked, AgentError::Refused(Refusal::Blocked { .. })), "{blocked}");
    assert_eq!(seen.lock().unwrap().len(), 2, "the token was not sent again");
    assert_eq!(agent.spent(), usdc("0.002"));
}
