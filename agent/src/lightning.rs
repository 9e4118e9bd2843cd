//! Paying an L402 invoice: through the paystile ledger's sandbox, or an LND node's REST API.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use paystile_protocol::ledger_api::{SandboxPayment, SandboxPaymentRequest, path};
use serde::Deserialize;

/// Where L402 invoices are paid.
#[derive(Clone)]
pub enum Lightning {
    /// The ledger's sandbox (`POST /v1/sandbox/payments` with its admin key): nothing real is
    /// paid, and only sandbox invoices can be.
    Sandbox { ledger_url: String, admin_key: String },
    /// An LND node: `POST /v1/channels/transactions` with the macaroon (hex) in
    /// `Grpc-Metadata-macaroon`, as LND's REST API documents it.
    Lnd { url: String, macaroon_hex: String },
}

impl std::fmt::Debug for Lightning {
    // Keys stay out of logs and error messages.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lightning::Sandbox { ledger_url, .. } => write!(f, "Sandbox({ledger_url})"),
            Lightning::Lnd { url, .. } => write!(f, "Lnd({url})"),
        }
    }
}

#[derive(Deserialize)]
struct LndSendResponse {
    #[serde(default)]
    payment_error: String,
    #[serde(default)]
    payment_preimage: String,
}

/// The most of a wallet's answer read.
const MAX_ANSWER: usize = 64 * 1024;

/// Why an invoice has no preimage.
#[derive(Debug)]
pub enum PayError {
    /// The wallet says it did not pay (or was never reached).
    NotPaid(String),
    /// The wallet may have paid: it timed out, dropped the connection after the request was
    /// sent, failed on its side, or answered what cannot be read.
    Unknown(String),
}

/// grpc-gateway's error body.
#[derive(Deserialize)]
struct GrpcError {
    code: i32,
}

/// gRPC's DEADLINE_EXCEEDED: LND may still be paying.
const GRPC_DEADLINE_EXCEEDED: i32 = 4;

impl Lightning {
    /// Pays `invoice` with routing fees of at most `fee_limit_msat`: its preimage, 32 bytes.
    pub async fn pay(
        &self,
        http: &reqwest::Client,
        invoice: &str,
        fee_limit_msat: u64,
    ) -> Result<[u8; 32], PayError> {
        match self {
            Lightning::Sandbox { ledger_url, admin_key } => {
                let url = format!("{}{}", ledger_url.trim_end_matches('/'), path::SANDBOX_PAYMENTS);
                let request = SandboxPaymentRequest { invoice: invoice.to_owned() };
                let sent = http.post(url).bearer_auth(admin_key).json(&request).send().await;
                let (status, body) = read("the sandbox", sent).await?;
                if !(200..300).contains(&status) {
                    let message = format!("the sandbox refused ({status}): {}", lossy(&body));
                    // The sandbox checks before it pays; a 5xx may have come after.
                    return Err(if status < 500 {
                        PayError::NotPaid(message)
                    } else {
                        PayError::Unknown(message)
                    });
                }
                let paid: SandboxPayment = serde_json::from_slice(&body).map_err(|e| {
                    PayError::Unknown(format!("the sandbox's answer does not read: {e}"))
                })?;
                let mut preimage = [0u8; 32];
                hex::decode_to_slice(&paid.preimage, &mut preimage).map_err(|_| {
                    PayError::Unknown("the sandbox's preimage is not 32 bytes of hex".into())
                })?;
                Ok(preimage)
            }
            Lightning::Lnd { url, macaroon_hex } => {
                let url = format!("{}/v1/channels/transactions", url.trim_end_matches('/'));
                // int64 fields are strings in grpc-gateway's JSON.
                let request = serde_json::json!({
                    "payment_request": invoice,
                    "fee_limit": {"fixed_msat": fee_limit_msat.to_string()},
                });
                let sent = http
                    .post(url)
                    .header("Grpc-Metadata-macaroon", macaroon_hex)
                    .json(&request)
                    .send()
                    .await;
                let (status, body) = read("LND", sent).await?;
                if !(200..300).contains(&status) {
                    let message = format!("LND refused ({status}): {}", lossy(&body));
                    // A gRPC error is LND's own answer: the payment failed, unless its
                    // deadline passed while it was paying. Anything else (a proxy's 502 or
                    // 504, say) leaves the outcome unknown.
                    return Err(match serde_json::from_slice::<GrpcError>(&body) {
                        Ok(e) if e.code != GRPC_DEADLINE_EXCEEDED => PayError::NotPaid(message),
                        _ if status < 500 => PayError::NotPaid(message),
                        _ => PayError::Unknown(message),
                    });
                }
                let sent: LndSendResponse = serde_json::from_slice(&body)
                    .map_err(|e| PayError::Unknown(format!("LND's answer does not read: {e}")))?;
                if !sent.payment_error.is_empty() {
                    return Err(PayError::NotPaid(format!(
                        "LND could not pay: {}",
                        sent.payment_error
                    )));
                }
                // grpc-gateway writes bytes fields as standard base64.
                let bytes = STANDARD
                    .decode(&sent.payment_preimage)
                    .or_else(|_| URL_SAFE.decode(&sent.payment_preimage))
                    .map_err(|_| {
                        PayError::Unknown("LND's payment_preimage is not base64".into())
                    })?;
                bytes
                    .try_into()
                    .map_err(|_| PayError::Unknown("LND's payment_preimage is not 32 bytes".into()))
            }
        }
    }
}

/// Reads a wallet's answer. A request that never reached the wallet paid nothing; one that
/// failed later (a timeout, a dropped connection) may have.
async fn read(
    wallet: &str,
    sent: reqwest::Result<reqwest::Response>,
) -> Result<(u16, Vec<u8>), PayError> {
    let mut response = sent.map_err(|e| {
        let not_sent = e.is_connect() || e.is_builder();
        let message = format!("{wallet} cannot be reached: {}", e.without_url());
        if not_sent { PayError::NotPaid(message) } else { PayError::Unknown(message) }
    })?;
    let status = response.status().as_u16();
    let mut body = Vec::new();
    loop {
        let chunk = response.chunk().await.map_err(|e| {
            PayError::Unknown(format!("{wallet}'s answer broke off: {}", e.without_url()))
        })?;
        let Some(chunk) = chunk else { break };
        if body.len() + chunk.len() > MAX_ANSWER {
            return Err(PayError::Unknown(format!("{wallet}'s answer is over {MAX_ANSWER} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((status, body))
}

fn lossy(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(500)]).into_owned()
}
