//! What the gate tests share: requests and reading local answers.

use paystile_filter::gate::{RequestAction, RequestHead};
use paystile_protocol::ErrorBody;

pub fn head<'a>(path: &'a str, authorization: Option<&'a str>) -> RequestHead<'a> {
    RequestHead {
        method: b"GET",
        path: path.as_bytes(),
        authorization: authorization.map(str::as_bytes),
        idempotency_key: None,
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
