#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The `lnd` invoice backend against a fake LND on loopback.
//!
//! The fake follows LND's REST API as Lightning Labs documents AddInvoice
//! (`POST /v1/invoices`; macaroon as hex in `Grpc-Metadata-macaroon`; int64 fields as JSON
//! strings and bytes as standard base64, as grpc-gateway writes them; errors as
//! `{"code": <gRPC code>, "message": …, "details": []}` with the status grpc-gateway maps the
//! code to). Like LND it serves HTTPS with a self-signed ECDSA P-256 certificate that is also
//! a CA (`IsCA: true, // so can sign self.` in LND's cert package), made here at test time,
//! and answers with real signed regtest BOLT11 invoices.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bitcoin::hashes::{Hash, sha256};
use bitcoin::secp256k1::{Secp256k1, SecretKey};
use lightning_invoice::{Bolt11Invoice, Currency, InvoiceBuilder, PaymentSecret};
use paystile_ledger::child::LedgerProcess;
use paystile_ledger::invoice::lnd::{LndClient, LndSetupError};
use paystile_ledger::invoice::{InvoiceBackend, InvoiceError, InvoiceRequest};
use paystile_ledger::settings::{InvoiceBackendSettings, LndSettings};
use paystile_protocol::l402;
use paystile_protocol::ledger_api::L402Challenge;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// A binary macaroon, as LND writes `invoice.macaroon` (not UTF-8, so hex is the only way).
const MACAROON: &[u8] = b"\x02\x01\x03lnd\x02\xf8\x01\x03\n\x10\x00\xff invoices write";

/// What the fake answers to AddInvoice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// As LND does.
    Invoice,
    /// 500 with an LND error body.
    Error,
    /// An `r_hash` other than the invoice's payment hash.
    WrongHash,
    /// An `r_hash` of 16 bytes.
    ShortHash,
    /// An invoice for 1 sat more than asked.
    WrongAmount,
    /// A `payment_request` that is not BOLT11.
    NotAnInvoice,
    /// 200 with a body that is not JSON.
    Garbage,
    /// Never answers.
    Silent,
}

/// One AddInvoice call as the fake saw it.
#[derive(Clone, Debug)]
struct Seen {
    macaroon: Option<String>,
    content_type: Option<String>,
    body: Value,
}

/// An invoice the fake issued.
#[derive(Clone, Debug)]
struct Issued {
    /// What paying the invoice would reveal.
    preimage: [u8; 32],
    payment_hash: [u8; 32],
    bolt11: String,
}

struct FakeState {
    mode: Mode,
    seen: Vec<Seen>,
    issued: Vec<Issued>,
    /// TLS handshakes that failed: the client refused the certificate (or the reverse).
    failed_handshakes: usize,
}

struct Shared {
    macaroon: Vec<u8>,
    node_key: SecretKey,
    state: Mutex<FakeState>,
}

struct FakeLnd {
    address: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeLnd {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A self-signed certificate shaped like LND's `tls.cert`, and its PKCS#8 key.
struct TlsIdentity {
    pem: String,
    der: CertificateDer<'static>,
    key: Vec<u8>,
}

impl TlsIdentity {
    fn lnd_like() -> TlsIdentity {
        let key = KeyPair::generate().unwrap(); // ECDSA P-256, LND's default `tlskeytype`
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::KeyCertSign,
        ];
        let cert = params.self_signed(&key).unwrap();
        TlsIdentity { pem: cert.pem(), der: cert.der().clone(), key: key.serialize_der() }
    }

    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, &self.pem).unwrap();
        path
    }
}

/// TLS in front of a TCP listener, for `axum::serve`. Handshakes are done one at a time,
/// which is plenty for tests and keeps the fake small.
struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, address)) = self.tcp.accept().await else { continue };
            match tokio::time::timeout(Duration::from_secs(5), self.acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => return (tls, address),
                _ => self.shared.state.lock().unwrap().failed_handshakes += 1,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

impl FakeLnd {
    async fn start(identity: &TlsIdentity) -> FakeLnd {
        let shared = Arc::new(Shared {
            macaroon: MACAROON.to_vec(),
            node_key: SecretKey::from_slice(&rand::random::<[u8; 32]>()).unwrap(),
            state: Mutex::new(FakeState {
                mode: Mode::Invoice,
                seen: Vec::new(),
                issued: Vec::new(),
                failed_handshakes: 0,
            }),
        });
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![identity.der.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.key.clone())),
            )
            .unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = tcp.local_addr().unwrap();
        let listener =
            TlsListener { tcp, acceptor: TlsAcceptor::from(Arc::new(tls)), shared: shared.clone() };
        let app = Router::new()
            .route("/v1/invoices", post(add_invoice))
            .fallback(|| async { lnd_error(StatusCode::NOT_FOUND, 5, "Not Found") })
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        FakeLnd { address, shared, task }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.address.port())
    }

    fn set_mode(&self, mode: Mode) {
        self.shared.state.lock().unwrap().mode = mode;
    }

    fn seen(&self) -> Vec<Seen> {
        self.shared.state.lock().unwrap().seen.clone()
    }

    fn issued(&self) -> Vec<Issued> {
        self.shared.state.lock().unwrap().issued.clone()
    }

    fn failed_handshakes(&self) -> usize {
        self.shared.state.lock().unwrap().failed_handshakes
    }
}

/// An error as grpc-gateway writes one.
fn lnd_error(status: StatusCode, code: u32, message: &str) -> Response {
    (status, axum::Json(json!({"code": code, "message": message, "details": []}))).into_response()
}

/// grpc-gateway reads an int64 from a JSON string or number.
fn int64(value: Option<&Value>) -> Option<i64> {
    match value? {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

async fn add_invoice(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let text = |name: header::HeaderName| -> Option<String> {
        headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
    };
    let macaroon = text(header::HeaderName::from_static("grpc-metadata-macaroon"));
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mode = {
        let mut state = shared.state.lock().unwrap();
        state.seen.push(Seen {
            macaroon: macaroon.clone(),
            content_type: text(header::CONTENT_TYPE),
            body: body.clone(),
        });
        state.mode
    };

    // LND's macaroon interceptor: codes.Unknown, which grpc-gateway answers with a 500.
    let Some(macaroon) = macaroon else {
        return lnd_error(StatusCode::INTERNAL_SERVER_ERROR, 2, "expected 1 macaroon, got 0");
    };
    if hex::decode(macaroon.trim()).ok().as_deref() != Some(&shared.macaroon[..]) {
        return lnd_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            2,
            "verification failed: signature mismatch after caveat verification",
        );
    }
    if body.is_null() {
        return lnd_error(StatusCode::BAD_REQUEST, 3, "unexpected end of JSON input");
    }

    match mode {
        Mode::Error => {
            return lnd_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                2,
                "unable to add invoice: database is locked",
            );
        }
        Mode::Garbage => return (StatusCode::OK, "<html>502 Bad Gateway</html>").into_response(),
        Mode::Silent => {
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        _ => {}
    }

    let Some(value_msat) = int64(body.get("value_msat")).filter(|v| *v > 0) else {
        return lnd_error(StatusCode::BAD_REQUEST, 3, "this fake LND needs value_msat > 0");
    };
    let expiry = int64(body.get("expiry")).filter(|e| *e > 0).unwrap_or(86_400);
    let memo = body.get("memo").and_then(Value::as_str).unwrap_or_default().to_owned();
    let amount = if mode == Mode::WrongAmount { value_msat + 1000 } else { value_msat };

    let preimage: [u8; 32] = rand::random();
    let payment_secret: [u8; 32] = rand::random();
    let payment_hash: [u8; 32] = Sha256::digest(preimage).into();
    let invoice = InvoiceBuilder::new(Currency::Regtest)
        .description(memo)
        .payment_hash(sha256::Hash::from_byte_array(payment_hash))
        .payment_secret(PaymentSecret(payment_secret))
        .timestamp(SystemTime::now())
        .min_final_cltv_expiry_delta(80)
        .amount_milli_satoshis(u64::try_from(amount).unwrap())
        .expiry_time(Duration::from_secs(u64::try_from(expiry).unwrap()))
        .build_signed(|message| {
            Secp256k1::signing_only().sign_ecdsa_recoverable(message, &shared.node_key)
        })
        .unwrap()
        .to_string();
    let add_index = {
        let mut state = shared.state.lock().unwrap();
        state.issued.push(Issued { preimage, payment_hash, bolt11: invoice.clone() });
        state.issued.len()
    };

    let r_hash = match mode {
        Mode::WrongHash => STANDARD.encode(rand::random::<[u8; 32]>()),
        Mode::ShortHash => STANDARD.encode(&payment_hash[..16]),
        _ => STANDARD.encode(payment_hash),
    };
    let payment_request =
        if mode == Mode::NotAnInvoice { "lnbcrt1notaninvoice".into() } else { invoice };
    axum::Json(json!({
        "r_hash": r_hash,
        "payment_request": payment_request,
        "add_index": add_index.to_string(),
        "payment_addr": STANDARD.encode(payment_secret),
    }))
    .into_response()
}

/// A macaroon and the fake's certificate in a temporary directory.
struct Files {
    dir: TempDir,
    macaroon: PathBuf,
    cert: PathBuf,
}

impl Files {
    fn new(identity: &TlsIdentity) -> Files {
        let dir = TempDir::new().unwrap();
        let macaroon = dir.path().join("invoice.macaroon");
        std::fs::write(&macaroon, MACAROON).unwrap();
        let cert = identity.write(dir.path(), "tls.cert");
        Files { dir, macaroon, cert }
    }

    fn settings(&self, url: &str) -> LndSettings {
        LndSettings {
            url: url.to_owned(),
            macaroon: self.macaroon.clone(),
            tls_cert: Some(self.cert.clone()),
        }
    }
}

fn request() -> InvoiceRequest {
    InvoiceRequest {
        amount_msat: 1_500_000,
        memo: "paystile: GET /v1/forecast".into(),
        expiry: Duration::from_secs(600),
    }
}

async fn fake() -> (FakeLnd, Files) {
    let identity = TlsIdentity::lnd_like();
    (FakeLnd::start(&identity).await, Files::new(&identity))
}

fn unavailable(result: Result<impl std::fmt::Debug, InvoiceError>) -> String {
    match result {
        Err(InvoiceError::Unavailable(message)) => message,
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

fn bad_answer(result: Result<impl std::fmt::Debug, InvoiceError>) -> String {
    match result {
        Err(InvoiceError::BadAnswer(message)) => message,
        other => panic!("expected BadAnswer, got {other:?}"),
    }
}

#[tokio::test]
async fn creates_an_invoice_through_lnds_rest_api() {
    let (lnd, files) = fake().await;
    let client = LndClient::new(&files.settings(&lnd.url())).unwrap();

    let invoice = client.create(&request()).await.unwrap();

    let issued = lnd.issued();
    assert_eq!(issued.len(), 1);
    assert_eq!(invoice.bolt11, issued[0].bolt11);
    assert_eq!(invoice.payment_hash, issued[0].payment_hash);
    let parsed = Bolt11Invoice::from_str(&invoice.bolt11).unwrap();
    assert_eq!(parsed.amount_milli_satoshis(), Some(1_500_000));
    assert_eq!(parsed.payment_hash().as_byte_array(), &invoice.payment_hash);
    assert_eq!(parsed.expiry_time(), Duration::from_secs(600));

    let seen = lnd.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].content_type.as_deref(), Some("application/json"));
    // int64 fields as strings, exactly as grpc-gateway documents them.
    assert_eq!(
        seen[0].body,
        json!({"value_msat": "1500000", "memo": "paystile: GET /v1/forecast", "expiry": "600"})
    );
}

#[tokio::test]
async fn the_macaroon_header_is_the_hex_of_the_file() {
    let (lnd, files) = fake().await;
    let client = LndClient::new(&files.settings(&lnd.url())).unwrap();
    client.create(&request()).await.unwrap();
    assert_eq!(lnd.seen()[0].macaroon.as_deref(), Some(hex::encode(MACAROON).as_str()));
    // Never shown by Debug (the client may end up in a log line).
    let debug = format!("{client:?}");
    assert!(!debug.contains(&hex::encode(MACAROON)), "{debug}");
}

#[tokio::test]
async fn a_wrong_macaroon_is_refused_with_lnds_message() {
    let (lnd, files) = fake().await;
    std::fs::write(&files.macaroon, b"\x02\x01\x03lnd another macaroon").unwrap();
    let client = LndClient::new(&files.settings(&lnd.url())).unwrap();
    let message = unavailable(client.create(&request()).await);
    assert!(message.contains("500"), "{message}");
    assert!(message.contains("verification failed: signature mismatch"), "{message}");
    assert!(lnd.issued().is_empty());
}

#[tokio::test]
async fn lnd_errors_are_reported() {
    let (lnd, files) = fake().await;
    lnd.set_mode(Mode::Error);
    let client = LndClient::new(&files.settings(&lnd.url())).unwrap();
    let message = unavailable(client.create(&request()).await);
    assert!(message.contains("unable to add invoice: database is locked (code 2)"), "{message}");
}

#[tokio::test]
async fn a_certificate_other_than_the_configured_one_is_refused() {
    let (lnd, files) = fake().await;
    // Same names, same shape, another key: only the configured certificate will do.
    let impostor = TlsIdentity::lnd_like();
    let settings = LndSettings {
        tls_cert: Some(impostor.write(files.dir.path(), "other.cert")),
        ..files.settings(&lnd.url())
    };
    let client = LndClient::new(&settings).unwrap();

    let message = unavailable(client.create(&request()).await);
    assert!(message.contains("not the one in --lnd-tls-cert"), "{message}");
    assert!(lnd.seen().is_empty(), "the request (and the macaroon) must not be sent");
    // The fake counts the handshake once it has read the client's alert.
    let deadline = Instant::now() + Duration::from_secs(5);
    while lnd.failed_handshakes() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(lnd.failed_handshakes(), 1, "the client refused the certificate in the handshake");
}

#[tokio::test]
async fn without_a_configured_certificate_the_self_signed_one_is_refused() {
    let (lnd, files) = fake().await;
    let settings = LndSettings { tls_cert: None, ..files.settings(&lnd.url()) };
    let client = LndClient::new(&settings).unwrap();
    let message = unavailable(client.create(&request()).await);
    assert!(message.contains("certificate"), "{message}");
    assert!(lnd.seen().is_empty());
}

#[tokio::test]
async fn an_unreachable_port_is_unavailable() {
    let (_, files) = fake().await;
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let client = LndClient::new(&files.settings(&format!("https://127.0.0.1:{port}"))).unwrap();
    let message = unavailable(client.create(&request()).await);
    assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
}

#[tokio::test]
async fn a_silent_lnd_times_out() {
    let (lnd, files) = fake().await;
    lnd.set_mode(Mode::Silent);
    let client =
        LndClient::with_timeout(&files.settings(&lnd.url()), Duration::from_millis(500)).unwrap();
    let started = Instant::now();
    let message = unavailable(client.create(&request()).await);
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert!(message.contains("timed out"), "{message}");
}

#[tokio::test]
async fn an_r_hash_that_is_not_the_invoices_is_a_bad_answer() {
    let (lnd, files) = fake().await;
    lnd.set_mode(Mode::WrongHash);
    let client = LndClient::new(&files.settings(&lnd.url())).unwrap();
    let message = bad_answer(client.create(&request()).await);
    assert!(message.contains("not r_hash"), "{message}");

    lnd.set_mode(Mode::ShortHash);
    let message = bad_answer(client.create(&request()).await);
    assert!(message.contains("r_hash is 16 bytes, not 32"), "{message}");
}

#[tokio::test]
async fn an_invoice_for_another_amount_is_a_bad_answer() {
    let (lnd, files) = fake().await;
    lnd.set_mode(Mode::WrongAmount);
    let client = LndClient::new(&files.settings(&lnd.url())).unwrap();
    let message = bad_answer(client.create(&request()).await);
    assert!(message.contains("asks 1501000 msat, not the 1500000 msat requested"), "{message}");
}

#[tokio::test]
async fn garbage_is_a_bad_answer() {
    let (lnd, files) = fake().await;
    let client = LndClient::new(&files.settings(&lnd.url())).unwrap();
    lnd.set_mode(Mode::Garbage);
    let message = bad_answer(client.create(&request()).await);
    assert!(message.contains("not an AddInvoice answer"), "{message}");
    assert!(message.contains("502 Bad Gateway"), "{message}");

    lnd.set_mode(Mode::NotAnInvoice);
    let message = bad_answer(client.create(&request()).await);
    assert!(message.contains("payment_request is not a BOLT11 invoice"), "{message}");
}

#[tokio::test]
async fn the_invoice_backend_builds_an_lnd_client() {
    let (lnd, files) = fake().await;
    let settings = InvoiceBackendSettings::Lnd(files.settings(&format!("{}/", lnd.url())));
    let backend = InvoiceBackend::new(&settings, b"an l402 secret of 32 characters!").unwrap();
    assert!(backend.sandbox().is_none());
    let invoice = backend.create(&request()).await.unwrap();
    assert_eq!(invoice.bolt11, lnd.issued()[0].bolt11);
}

#[test]
fn unreadable_files_are_named_at_construction() {
    let identity = TlsIdentity::lnd_like();
    let files = Files::new(&identity);
    let missing = files.dir.path().join("missing.macaroon");
    let settings =
        LndSettings { macaroon: missing.clone(), ..files.settings("https://127.0.0.1:1") };
    let error = LndClient::new(&settings).unwrap_err();
    assert!(matches!(error, LndSetupError::Macaroon { .. }), "{error:?}");
    assert!(error.to_string().contains(&missing.display().to_string()), "{error}");
    // The backend reports the same at start-up.
    match InvoiceBackend::new(&InvoiceBackendSettings::Lnd(settings), b"secret") {
        Err(InvoiceError::Unavailable(message)) => {
            assert!(message.contains("missing.macaroon"), "{message}")
        }
        Err(other) => panic!("{other:?}"),
        Ok(_) => panic!("built with a missing macaroon"),
    }

    let not_a_cert = files.dir.path().join("not-a-cert.pem");
    std::fs::write(&not_a_cert, "hello").unwrap();
    let settings =
        LndSettings { tls_cert: Some(not_a_cert), ..files.settings("https://127.0.0.1:1") };
    let error = LndClient::new(&settings).unwrap_err();
    assert!(matches!(error, LndSetupError::NoCertificate { .. }), "{error:?}");
    assert!(error.to_string().contains("not-a-cert.pem"), "{error}");
}

const GATEWAY_KEY: &str = "test-gateway-key-0123456789";
const L402_SECRET: &str = "test-l402-secret-of-32-characters";

/// The real `paystile-ledger serve` with `--invoice-backend lnd` pointed at the fake: a
/// challenge carries the fake's invoice, and its preimage unlocks the challenge's macaroon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_binary_mints_challenges_with_lnds_invoices() {
    let (lnd, files) = fake().await;
    let log_path = files.dir.path().join("ledger.log");
    let args: Vec<String> = [
        "--database-url",
        &format!("sqlite://{}", files.dir.path().join("ledger.db").display()),
        "--listen",
        "127.0.0.1:0",
        "--l402-secret",
        L402_SECRET,
        "--invoice-backend",
        "lnd",
        "--lnd-url",
        &lnd.url(),
        "--lnd-macaroon",
        &files.macaroon.display().to_string(),
        "--lnd-tls-cert",
        &files.cert.display().to_string(),
    ]
    .map(str::to_owned)
    .to_vec();
    let envs = [
        ("PAYSTILE_ADMIN_KEY", "test-admin-key-0123456789"),
        ("PAYSTILE_GATEWAY_KEY", GATEWAY_KEY),
        // Everything the ledger and its HTTP stack log, to check the macaroon is not there.
        ("RUST_LOG", "trace"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    let binary = Path::new(env!("CARGO_BIN_EXE_paystile-ledger"));
    let log = std::fs::File::create(&log_path).unwrap();
    let ledger =
        tokio::task::spawn_blocking(move || LedgerProcess::start(binary, &args, &envs, log.into()))
            .await
            .unwrap()
            .unwrap();

    let http = reqwest::Client::new();
    let post = async |body: &Value| {
        let response = http
            .post(format!("{}/v1/l402/challenges", ledger.url()))
            .bearer_auth(GATEWAY_KEY)
            .json(body)
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.json::<Value>().await.unwrap())
    };
    let body = json!({"serviceId": "weather", "budgetUsdc": "0.05", "amountMsat": 50_000, "validSeconds": 600});
    let (status, answer) = post(&body).await;
    assert_eq!(status, 200, "{answer}");
    let challenge: L402Challenge = serde_json::from_value(answer).unwrap();
    let issued = lnd.issued();
    assert_eq!(issued.len(), 1);
    assert_eq!(challenge.invoice, issued[0].bolt11);
    assert_eq!(challenge.payment_hash, hex::encode(issued[0].payment_hash));
    assert_eq!(challenge.amount_msat, 50_000);
    assert!(!challenge.sandbox);
    let seen = &lnd.seen()[0];
    assert_eq!(seen.macaroon.as_deref(), Some(hex::encode(MACAROON).as_str()));
    assert_eq!((&seen.body["value_msat"], &seen.body["expiry"]), (&json!("50000"), &json!("600")));

    // Paying the fake's invoice reveals the preimage that makes the credential valid.
    let target = l402::Target {
        service_id: "weather",
        capability: paystile_protocol::l402::Capability::Route(None),
        now: challenge.valid_until - 1,
        accept_sandbox: false,
    };
    let grant = l402::verify(
        &challenge.macaroon,
        &hex::encode(issued[0].preimage),
        L402_SECRET.as_bytes(),
        &target,
    )
    .unwrap();
    assert_eq!(grant.identifier.ledger_token_id(), challenge.token_id);

    // LND failing: the gateway hears "unavailable, retry", not a challenge.
    lnd.set_mode(Mode::Error);
    let (status, answer) = post(&body).await;
    assert_eq!((status, answer["code"].as_str()), (503, Some("ledger_unavailable")), "{answer}");

    drop(ledger);
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(!log.contains(&hex::encode(MACAROON)), "the macaroon reached the log");
    assert!(log.contains("database is locked"), "LND's reason is logged: {log}");
}
