//! The answers the gateway makes itself: JSON error bodies, and the 402 with a challenge for
//! each scheme that is on. One place for every scheme's challenge, so that a new credential
//! adds its own here.

use paystile_protocol::headers::{self, APPLICATION_JSON};
use std::sync::Arc;

use paystile_protocol::x402::{PaymentRequired, RequirementsV1, Resource};
use paystile_protocol::{ErrorBody, ErrorCode};

use crate::config::Config;
use crate::gate::RequestHead;
use crate::routes::{Route, X402Terms};

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
    ///
    /// With `x402`, the x402 offer goes in the v2 `PAYMENT-REQUIRED` header and, for v1
    /// clients, in the body (`x402Version`, `accepts`), beside the body's `error` and `code`.
    pub fn payment_required(
        config: &Config,
        body: &ErrorBody,
        l402: Option<String>,
        x402: Option<&X402Ask>,
    ) -> LocalResponse {
        let Some(ask) = x402 else {
            return LocalResponse::challenges(config, body, l402);
        };
        let resource = Resource { url: ask.resource.clone(), description: None, mime_type: None };
        let v1 = RequirementsV1 { resource: ask.resource.clone(), ..ask.terms.v1.clone() };
        let body = ErrorBody { x402_version: Some(1), accepts: vec![v1], ..body.clone() };
        let required = PaymentRequired {
            x402_version: 2,
            error: Some(body.error.clone()),
            resource,
            accepts: vec![ask.terms.v2.clone()],
        };
        let mut response = LocalResponse::challenges(config, &body, l402);
        response.headers.push((headers::PAYMENT_REQUIRED, required.header_value()));
        // As the reference servers: an offer is never cached (its price and terms may change).
        response.headers.push((headers::CACHE_CONTROL, NO_STORE.to_owned()));
        response
    }

    /// [`LocalResponse::payment_required`]'s `WWW-Authenticate` challenges.
    fn challenges(config: &Config, body: &ErrorBody, l402: Option<String>) -> LocalResponse {
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

const NO_STORE: &str = "no-store";

/// What an x402 payment for a call must pay, and for which resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct X402Ask {
    pub terms: Arc<X402Terms>,
    /// The request's URL (`scheme://authority/path`, or its path alone when the host
    /// does not say).
    pub resource: String,
}

/// What x402 asks of a call to `route`, if x402 is offered there (see `Route::x402`).
pub fn x402_ask(route: &Route, request: &RequestHead<'_>) -> Option<Box<X402Ask>> {
    let terms = route.x402.clone()?;
    Some(Box::new(X402Ask { terms, resource: resource(request) }))
}

/// The request's URL (`scheme://authority/path`, or its path alone when the host does not
/// say), as an x402 offer names its resource.
pub fn resource(request: &RequestHead<'_>) -> String {
    let path = String::from_utf8_lossy(request.path);
    match (request.scheme, request.authority) {
        (Some(scheme), Some(authority)) => format!(
            "{}://{}{path}",
            String::from_utf8_lossy(scheme),
            String::from_utf8_lossy(authority)
        ),
        _ => path.into_owned(),
    }
}

/// The 402 body for a priced route called without a credential it takes.
pub fn payment_required(config: &Config, route: &Route) -> ErrorBody {
    ErrorBody::payment_required(&config.service_id, route.price, &schemes(config, route))
}

/// The schemes a 402 lists in its body, in the order of its challenges.
fn schemes(config: &Config, route: &Route) -> Vec<&'static str> {
    let mut schemes = Vec::with_capacity(3);
    if config.l402.is_some() {
        schemes.push("L402");
    }
    if config.verifier.pay_token.is_some() {
        schemes.push("Bearer");
    }
    if route.x402.is_some() {
        schemes.push("x402");
    }
    schemes
}
