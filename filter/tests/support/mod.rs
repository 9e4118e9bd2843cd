//! What the gate tests share: Pay Token claims, requests and reading local answers.

use paystile_filter::gate::{RequestAction, RequestHead};
use paystile_protocol::ErrorBody;
use paystile_protocol::pay_token::{PayTokenClaims, Scope};

/// A Pay Token of `agent-1` for the `weather` service, issued at `now`, valid ten minutes.
pub fn claims(jti: &str, limit_usdc: &str, now: u64) -> PayTokenClaims {
    PayTokenClaims {
        sub: "agent-1".into(),
        jti: jti.into(),
        service_id: Some("weather".into()),
        limit_usdc: limit_usdc.parse().unwrap(),
        scope: Scope::Single,
        buyer_tag: None,
        exp: now + 600,
        iat: Some(now),
        nbf: None,
        iss: Some("paystile".into()),
        aud: None,
        sandbox: false,
    }
}

pub fn head<'a>(path: &'a str, authorization: Option<&'a str>) -> RequestHead<'a> {
    RequestHead {
        method: b"GET",
        path: path.as_bytes(),
        authorization: authorization.map(str::as_bytes),
        ..RequestHead::default()
    }
}

/// The local answer `action` sends: status, the parsed body and the headers.
pub fn answered(action: &RequestAction) -> (u16, ErrorBody, Vec<(&'static str, String)>) {
    let RequestAction::Respond(response) = action else {
        panic!("expected a local response, got {action:?}")
    };
    let body: ErrorBody = serde_json::from_slice(&response.body).unwrap();
    assert_eq!(body.status(), response.status);
    assert!(response.headers.contains(&("content-type", "application/json".into())));
    (response.status, body, response.headers.clone())
}
