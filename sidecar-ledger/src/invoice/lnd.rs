//! The `lnd` invoice backend: invoices from an LND node through its REST API.
//!
//! `POST /v1/invoices` (Lightning Labs' AddInvoice), authenticated by the hex of a macaroon
//! file in `Grpc-Metadata-macaroon`. The answer is checked before anyone is asked to pay it:
//! the BOLT11 must be signed, carry the payment hash LND reported and the amount asked for.
//!
//! TLS: LND serves a self-signed certificate that is also a CA, which WebPKI (and so rustls)
//! refuses as a server's certificate (lnd#5450). When `--lnd-tls-cert` is given, that
//! certificate is therefore pinned: the server must present exactly it and prove it holds its
//! key. Without it, the system's roots verify the server as for any HTTPS site.

use std::error::Error as StdError;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bitcoin::hashes::Hash;
use lightning_invoice::Bolt11Invoice;
use reqwest::header::HeaderValue;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};
use serde::{Deserialize, Serialize};

use super::{Invoice, InvoiceError, InvoiceRequest};
use crate::settings::LndSettings;

/// How long one AddInvoice may take, connection included: a challenge waits for it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// An AddInvoice answer is a few hundred bytes; anything far larger is not one.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
const MACAROON_HEADER: &str = "Grpc-Metadata-macaroon";

/// Why an LND client could not be set up; each names the setting or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum LndSetupError {
    #[error("lnd_macaroon: cannot read {path}: {source}")]
    Macaroon { path: PathBuf, source: std::io::Error },
    #[error("lnd_macaroon: {path} is empty")]
    EmptyMacaroon { path: PathBuf },
    #[error("lnd_tls_cert: cannot read {path}: {source}")]
    TlsCert { path: PathBuf, source: std::io::Error },
    #[error("lnd_tls_cert: {path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("lnd_url: {0}")]
    Url(String),
    #[error("cannot build the HTTPS client: {0}")]
    Client(String),
}

/// Creates invoices on one LND node.
pub struct LndClient {
    http: reqwest::Client,
    invoices_url: reqwest::Url,
    /// The hex macaroon, marked sensitive so that no header dump shows it.
    macaroon: HeaderValue,
}

impl fmt::Debug for LndClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LndClient")
            .field("url", &self.invoices_url.as_str())
            .finish_non_exhaustive()
    }
}

impl LndClient {
    /// Reads the macaroon (and the certificate, if any) now, so that a wrong path stops the
    /// ledger at start-up rather than at the first challenge.
    pub fn new(settings: &LndSettings) -> Result<LndClient, LndSetupError> {
        LndClient::with_timeout(settings, REQUEST_TIMEOUT)
    }

    /// As [`LndClient::new`], with another limit on each AddInvoice call.
    pub fn with_timeout(
        settings: &LndSettings,
        timeout: Duration,
    ) -> Result<LndClient, LndSetupError> {
        let macaroon = read_macaroon(&settings.macaroon)?;
        let invoices_url = invoices_url(&settings.url)?;
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(CONNECT_TIMEOUT.min(timeout))
            .redirect(reqwest::redirect::Policy::none());
        if let Some(path) = &settings.tls_cert {
            builder = builder.tls_backend_preconfigured(pinned_tls(&read_certificates(path)?)?);
        }
        if invoices_url.scheme() == "http" {
            tracing::warn!(url = %settings.url, "LND over plain HTTP: the macaroon travels unencrypted");
        }
        let http = builder.build().map_err(|e| LndSetupError::Client(chain(&e)))?;
        Ok(LndClient { http, invoices_url, macaroon })
    }

    /// AddInvoice, checked: the invoice LND made for `request`.
    pub async fn create(&self, request: &InvoiceRequest) -> Result<Invoice, InvoiceError> {
        let body = AddInvoiceRequest {
            value_msat: request.amount_msat.to_string(),
            memo: &request.memo,
            expiry: request.expiry.as_secs().to_string(),
        };
        let response = self
            .http
            .post(self.invoices_url.clone())
            .header(MACAROON_HEADER, self.macaroon.clone())
            .json(&body)
            .send()
            .await
            .map_err(|e| InvoiceError::Unavailable(format!("LND: {}", chain(&e))))?;
        let status = response.status();
        let answer = read_limited(response).await?;
        if !status.is_success() {
            // Every refusal counts as unavailable: LND reports a bad macaroon as a 500, so the
            // status does not tell configuration mistakes from outages.
            return Err(InvoiceError::Unavailable(format!(
                "LND answered {status}: {}",
                lnd_error_message(&answer)
            )));
        }
        check_answer(&answer, request)
    }
}

/// AddInvoice's body; int64 fields are JSON strings, as LND's grpc-gateway writes them.
#[derive(Serialize)]
struct AddInvoiceRequest<'a> {
    value_msat: String,
    memo: &'a str,
    expiry: String,
}

/// The parts of AddInvoice's answer the ledger uses (`add_index` and `payment_addr` are not).
#[derive(Deserialize)]
struct AddInvoiceResponse {
    /// Standard base64 of the 32-byte payment hash.
    r_hash: String,
    payment_request: String,
}

/// grpc-gateway's error body.
#[derive(Deserialize)]
struct LndErrorBody {
    #[serde(default)]
    code: Option<i64>,
    message: String,
}

fn check_answer(answer: &[u8], request: &InvoiceRequest) -> Result<Invoice, InvoiceError> {
    let bad = |message: String| InvoiceError::BadAnswer(format!("LND: {message}"));
    let response: AddInvoiceResponse = serde_json::from_slice(answer)
        .map_err(|e| bad(format!("not an AddInvoice answer ({e}): {}", excerpt(answer))))?;
    let r_hash = STANDARD
        .decode(response.r_hash.trim())
        .map_err(|e| bad(format!("r_hash is not base64: {e}")))?;
    let payment_hash: [u8; 32] = r_hash
        .as_slice()
        .try_into()
        .map_err(|_| bad(format!("r_hash is {} bytes, not 32", r_hash.len())))?;
    let bolt11 = response.payment_request.trim();
    // Parsing checks the checksum and the signature against the payee the invoice names.
    let invoice = Bolt11Invoice::from_str(bolt11)
        .map_err(|e| bad(format!("payment_request is not a BOLT11 invoice: {e}")))?;
    if invoice.payment_hash().as_byte_array() != &payment_hash {
        return Err(bad(format!(
            "payment_request pays hash {}, not r_hash {}",
            invoice.payment_hash(),
            hex::encode(payment_hash)
        )));
    }
    // LND makes an amountless invoice for 0 msat.
    let expected = (request.amount_msat != 0).then_some(request.amount_msat);
    if invoice.amount_milli_satoshis() != expected {
        let asked = match invoice.amount_milli_satoshis() {
            Some(amount) => format!("{amount} msat"),
            None => "no amount".to_owned(),
        };
        return Err(bad(format!(
            "payment_request asks {asked}, not the {} msat requested",
            request.amount_msat
        )));
    }
    Ok(Invoice { payment_hash, bolt11: bolt11.to_owned() })
}

/// LND's own words when it has some (`code` is a gRPC status code), else the start of the body.
fn lnd_error_message(answer: &[u8]) -> String {
    match serde_json::from_slice::<LndErrorBody>(answer) {
        Ok(LndErrorBody { code: Some(code), message }) => format!("{message} (code {code})"),
        Ok(LndErrorBody { code: None, message }) => message,
        Err(_) => excerpt(answer),
    }
}

async fn read_limited(mut response: reqwest::Response) -> Result<Vec<u8>, InvoiceError> {
    let mut answer = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| InvoiceError::Unavailable(format!("LND: {}", chain(&e))))?
    {
        if answer.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(InvoiceError::BadAnswer(format!(
                "LND: answer longer than {MAX_ANSWER_BYTES} bytes"
            )));
        }
        answer.extend_from_slice(&chunk);
    }
    Ok(answer)
}

fn excerpt(answer: &[u8]) -> String {
    let text = String::from_utf8_lossy(answer);
    match text.char_indices().nth(200) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None if text.trim().is_empty() => "(empty body)".to_owned(),
        None => text.into_owned(),
    }
}

/// An error with its causes: reqwest's own message hides the TLS or socket error behind it.
fn chain(error: &dyn StdError) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

fn read_macaroon(path: &Path) -> Result<HeaderValue, LndSetupError> {
    let bytes = std::fs::read(path)
        .map_err(|source| LndSetupError::Macaroon { path: path.to_owned(), source })?;
    if bytes.is_empty() {
        return Err(LndSetupError::EmptyMacaroon { path: path.to_owned() });
    }
    let mut value = HeaderValue::from_str(&hex::encode(bytes))
        .map_err(|e| LndSetupError::Client(format!("macaroon header: {e}")))?;
    value.set_sensitive(true);
    Ok(value)
}

fn invoices_url(base: &str) -> Result<reqwest::Url, LndSetupError> {
    let invalid = |problem: &str| LndSetupError::Url(format!("{base}: {problem}"));
    let mut url = reqwest::Url::parse(base).map_err(|e| invalid(&e.to_string()))?;
    if !matches!(url.scheme(), "https" | "http") || url.host().is_none() {
        return Err(invalid("expected https://host:port"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid("expected no query or fragment"));
    }
    // A path prefix (LND behind a proxy) is kept.
    let path = format!("{}/v1/invoices", url.path().trim_end_matches('/'));
    url.set_path(&path);
    Ok(url)
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, LndSetupError> {
    let pem = std::fs::read(path)
        .map_err(|source| LndSetupError::TlsCert { path: path.to_owned(), source })?;
    // Unparseable blocks are skipped rather than fatal: only a file with no certificate at
    // all is a mistake the operator must hear about.
    let certificates: Vec<_> =
        CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok).collect();
    if certificates.is_empty() {
        return Err(LndSetupError::NoCertificate { path: path.to_owned() });
    }
    Ok(certificates)
}

fn pinned_tls(
    certificates: &[CertificateDer<'static>],
) -> Result<rustls::ClientConfig, LndSetupError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = PinnedCertificate {
        certificates: certificates.to_vec(),
        algorithms: provider.signature_verification_algorithms,
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| LndSetupError::Client(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(config)
}

/// Accepts exactly the configured certificate(s). The handshake signature checks below make
/// the server prove it holds the pinned certificate's key, so a copy of the certificate alone
/// is not enough. Names and dates are not checked: the operator chose this very certificate,
/// and LND's carries its own host names, which may not include the one in `--lnd-url`.
#[derive(Debug)]
struct PinnedCertificate {
    certificates: Vec<CertificateDer<'static>>,
    algorithms: WebPkiSupportedAlgorithms,
}

/// The server showed a certificate other than the pinned one.
#[derive(thiserror::Error)]
#[error("the server's certificate is not the one in --lnd-tls-cert")]
struct NotPinned;

// rustls shows `CertificateError::Other` with Debug, so Debug carries the message.
impl fmt::Debug for NotPinned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.certificates.iter().any(|pinned| pinned.as_ref() == end_entity.as_ref()) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
                NotPinned,
            )))))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(amount_msat: u64) -> InvoiceRequest {
        InvoiceRequest { amount_msat, memo: "m".into(), expiry: Duration::from_secs(60) }
    }

    #[test]
    fn the_body_encodes_int64_fields_as_strings() {
        let body = AddInvoiceRequest {
            value_msat: 1_500_000u64.to_string(),
            memo: "a memo",
            expiry: 600u64.to_string(),
        };
        assert_eq!(
            serde_json::to_value(&body).unwrap_or_default(),
            serde_json::json!({"value_msat": "1500000", "memo": "a memo", "expiry": "600"})
        );
    }

    #[test]
    fn lnd_error_bodies_are_quoted() {
        let body =
            br#"{"code":2,"message":"verification failed: signature mismatch","details":[]}"#;
        assert_eq!(lnd_error_message(body), "verification failed: signature mismatch (code 2)");
        assert_eq!(lnd_error_message(b"<html>bad gateway</html>"), "<html>bad gateway</html>");
        assert_eq!(lnd_error_message(b""), "(empty body)");
    }

    #[test]
    fn answers_that_are_not_invoices_are_bad() {
        for answer in [
            &b"not json"[..],
            br#"{"r_hash":"AAAA","payment_request":"lnbcrt1"}"#,
            br#"{"r_hash":"!!","payment_request":"lnbcrt1"}"#,
            br#"{"payment_request":"lnbcrt1"}"#,
        ] {
            let result = check_answer(answer, &request(1000));
            assert!(matches!(result, Err(InvoiceError::BadAnswer(_))), "{result:?}");
        }
    }

    #[test]
    fn urls_are_joined_and_checked() {
        let url = invoices_url("https://127.0.0.1:8080/").map(|u| u.to_string());
        assert_eq!(url.ok().as_deref(), Some("https://127.0.0.1:8080/v1/invoices"));
        let url = invoices_url("https://lnd.example:8080/node-1").map(|u| u.to_string());
        assert_eq!(url.ok().as_deref(), Some("https://lnd.example:8080/node-1/v1/invoices"));
        for bad in ["ftp://x", "https://", "127.0.0.1:8080", "https://x/?q=1"] {
            assert!(invoices_url(bad).is_err(), "{bad}");
        }
    }
}
