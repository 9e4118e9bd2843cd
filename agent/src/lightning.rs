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

impl Lightning {
    /// Pays `invoice`: its preimage, 32 bytes.
    pub async fn pay(&self, http: &reqwest::Client, invoice: &str) -> Result<[u8; 32], String> {
        match self {
            Lightning::Sandbox { ledger_url, admin_key } => {
                let url = format!("{}{}", ledger_url.trim_end_matches('/'), path::SANDBOX_PAYMENTS);
                let request = SandboxPaymentRequest { invoice: invoice.to_owned() };
                let response = http
                    .post(url)
                    .bearer_auth(admin_key)
                    .json(&request)
                    .send()
                    .await
                    .map_err(|e| format!("the sandbox cannot be reached: {e}"))?;
                let (status, body) = read(response).await?;
                if !(200..300).contains(&status) {
                    return Err(format!("the sandbox refused ({status}): {}", lossy(&body)));
                }
                let paid: SandboxPayment = serde_json::from_slice(&body)
                    .map_err(|e| format!("the sandbox's answer does not read: {e}"))?;
                let mut preimage = [0u8; 32];
                hex::decode_to_slice(&paid.preimage, &mut preimage)
                    .map_err(|_| "the sandbox's preimage is not 32 bytes of hex".to_owned())?;
                Ok(preimage)
            }
            Lightning::Lnd { url, macaroon_hex } => {
                let url = format!("{}/v1/channels/transactions", url.trim_end_matches('/'));
                let response = http
                    .post(url)
                    .header("Grpc-Metadata-macaroon", macaroon_hex)
                    .json(&serde_json::json!({"payment_request": invoice}))
                    .send()
                    .await
                    .map_err(|e| format!("LND cannot be reached: {e}"))?;
                let (status, body) = read(response).await?;
                if !(200..300).contains(&status) {
                    return Err(format!("LND refused ({status}): {}", lossy(&body)));
                }
                let sent: LndSendResponse = serde_json::from_slice(&body)
                    .map_err(|e| format!("LND's answer does not read: {e}"))?;
                if !sent.payment_error.is_empty() {
                    return Err(format!("LND could not pay: {}", sent.payment_error));
                }
                // grpc-gateway writes bytes fields as standard base64.
                let bytes = STANDARD
                    .decode(&sent.payment_preimage)
                    .or_else(|_| URL_SAFE.decode(&sent.payment_preimage))
                    .map_err(|_| "LND's payment_preimage is not base64".to_owned())?;
                bytes.try_into().map_err(|_| "LND's payment_preimage is not 32 bytes".to_owned())
            }
        }
    }
}

async fn read(mut response: reqwest::Response) -> Result<(u16, Vec<u8>), String> {
    let status = response.status().as_u16();
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > MAX_ANSWER {
            return Err(format!("the wallet's answer is over {MAX_ANSWER} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((status, body))
}

fn lossy(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(500)]).into_owned()
}
