//! `facilitator` settlement: each payment goes to an x402 facilitator's `POST /settle`
//! (`{x402Version, paymentPayload, paymentRequirements}`, answered with the
//! `PAYMENT-RESPONSE` shape), so that a seller can use a hosted one.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use paystile_protocol::x402::{Offer, Payment, Resource, SettleResponse, Version};
use serde_json::{Value, json};

use super::Trouble;

/// How long a facilitator may take to settle: it waits for the transaction's receipt.
const TIMEOUT: Duration = Duration::from_secs(30);

pub struct Facilitator {
    http: reqwest::Client,
    settle_url: String,
    offer: Offer,
}

/// A facilitator's answer that is not a failure.
pub enum Settled {
    /// Mined: the transaction.
    Confirmed(String),
    /// Sent, not yet confirmed (`settlement_pending`): the transaction.
    Pending(String),
}

impl Facilitator {
    pub fn new(url: &str, offer: &Offer) -> anyhow::Result<Facilitator> {
        let http = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Facilitator { http, settle_url: format!("{url}/settle"), offer: offer.clone() })
    }

    /// Asks the facilitator to settle `payment`, whose header's value is `header`.
    pub async fn settle(&self, header: &[u8], payment: &Payment) -> Result<Settled, Trouble> {
        let payload: Value = STANDARD
            .decode(header)
            .or_else(|_| STANDARD_NO_PAD.decode(header))
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok())
            .ok_or_else(|| Trouble::Final("the payment is not base64 JSON".into()))?;
        let amount = u64::try_from(payment.authorization.value)
            .map_err(|_| Trouble::Final("the payment's value is out of range".into()))?;
        let (version, requirements) = match payment.version {
            Version::V2 => (2, json!(self.offer.requirements(amount))),
            Version::V1 => {
                let resource = Resource { url: String::new(), description: None, mime_type: None };
                (1, json!(self.offer.requirements_v1(amount, &resource)))
            }
        };
        let body = json!({
            "x402Version": version,
            "paymentPayload": payload,
            "paymentRequirements": requirements,
        });
        let response = self.http.post(&self.settle_url).json(&body).send().await.map_err(|e| {
            // Its URL may hold an API key: kept out of the reason.
            Trouble::Retry(format!("the facilitator did not answer: {}", e.without_url()))
        })?;
        let status = response.status();
        if status.is_server_error() {
            return Err(Trouble::Retry(format!("the facilitator answered {status}")));
        }
        let answer: SettleResponse = response.json().await.map_err(|_| {
            Trouble::Retry(format!("the facilitator's answer ({status}) is not a settle response"))
        })?;
        match answer {
            SettleResponse { success: true, transaction, .. } if !transaction.is_empty() => {
                Ok(Settled::Confirmed(transaction))
            }
            SettleResponse { error_reason: Some(reason), transaction, .. }
                if reason == "settlement_pending" && !transaction.is_empty() =>
            {
                Ok(Settled::Pending(transaction))
            }
            SettleResponse { error_reason, .. } => Err(Trouble::Final(format!(
                "the facilitator refused: {}",
                error_reason.as_deref().unwrap_or("no reason given")
            ))),
        }
    }
}
