//! The answers the gateway makes itself: JSON error bodies, and the 402 with a challenge for
//! each scheme that is on. One place for every scheme's challenge, so that a new credential
//! adds its own here.

use paystile_protocol::headers::{self, APPLICATION_JSON};
use paystile_protocol::{ErrorBody, ErrorCode, Usdc};

use crate::config::Config;

/// The Pay Token challenge, beside L402's when both are on.
const BEARER_CHALLENGE: &str = r#"Bearer realm="paystile", error="payment_required""#;
const BEARER_INVALID: &str = r#"Bearer realm="paystile", error="invalid_token""#;
/// Seconds a client should wait before retrying when the ledger is unavailable.
const RETRY_AFTER_SECONDS: &str = "1";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderEdit {
    Set(&'static str, String),
    Remove(&'static str),
}

/// A response the gateway sends itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalResponse {
    /// What the answer says, for the metrics.
    pub code: ErrorCode,
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl LocalResponse {
    /// The JSON error answer for `body`, with the headers its code calls for (a 402's
    /// challenges come from [`LocalResponse::payment_required`]).
    pub fn error(body: &ErrorBody) -> LocalResponse {
        let mut headers = vec![(headers::CONTENT_TYPE, APPLICATION_JSON.to_owned())];
        match body.code.status() {
            401 => headers.push((headers::WWW_AUTHENTICATE, BEARER_INVALID.to_owned())),
            503 => headers.push((headers::RETRY_AFTER, RETRY_AFTER_SECONDS.to_owned())),
            _ => {}
        }
        LocalResponse { code: body.code, status: body.status(), headers, body: body.to_json() }
    }

    /// A 402 with a challenge for each scheme that is on: `l402` is the header value of a
    /// challenge the ledger minted, if there is one.
    ///
    /// Clients read several `WWW-Authenticate` fields differently: Go's `Header.Get` and
    /// Python's `http.client` take the first, a dict of the headers keeps the last, fetch and
    /// requests join them with `, `. So the L402 challenge goes first and again last, with
    /// the Bearer challenge between: every reading finds a usable L402 challenge first, and
    /// Bearer is still offered (aperture sends its challenge twice for the same reason).
    pub fn payment_required(
        config: &Config,
        body: &ErrorBody,
        l402: Option<String>,
    ) -> LocalResponse {
        let mut response = LocalResponse::error(body);
        let bearer = config.verifier.pay_token.is_some();
        match l402 {
            Some(l402) if bearer => {
                response.headers.push((headers::WWW_AUTHENTICATE, l402.clone()));
                response.headers.push((headers::WWW_AUTHENTICATE, BEARER_CHALLENGE.to_owned()));
                response.headers.push((headers::WWW_AUTHENTICATE, l402));
            }
            Some(l402) => response.headers.push((headers::WWW_AUTHENTICATE, l402)),
            None if bearer => {
                response.headers.push((headers::WWW_AUTHENTICATE, BEARER_CHALLENGE.to_owned()));
            }
            None => {}
        }
        response
    }
}

/// The 402 body for a priced route called without a credential it takes.
pub fn payment_required(config: &Config, price: Usdc) -> ErrorBody {
    ErrorBody::payment_required(&config.service_id, price, &schemes(config))
}

/// The schemes a 402 lists in its body, in the order of its challenges.
fn schemes(config: &Config) -> Vec<&'static str> {
    let mut schemes = Vec::with_capacity(2);
    if config.l402.is_some() {
        schemes.push("L402");
    }
    if config.verifier.pay_token.is_some() {
        schemes.push("Bearer");
    }
    schemes
}
