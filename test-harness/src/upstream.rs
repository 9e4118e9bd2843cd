//! The demo API behind the gateway, also the tests' and the benchmark's upstream.
//!
//! As the demo's and the tests' upstream ([`UpstreamMode::Echo`]) it answers every request with
//! what reached it (so a caller sees the `x-charge-id` it got, and that `authorization` did
//! not arrive), and records each request for tests. `/status/<code>` anywhere in a path
//! answers with that status; `?delay_ms=<n>` waits first.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A request as the upstream saw it.
#[derive(Clone, Debug, Serialize)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    /// Lower-case names; repeated headers joined with ", ".
    pub headers: BTreeMap<String, String>,
}

type Seen = Arc<Mutex<Vec<SeenRequest>>>;

/// How the upstream answers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum UpstreamMode {
    /// Each request echoed as JSON, and recorded (the demo, the tests).
    Echo,
    /// 200 with [`FIXED_BODY`], nothing recorded: the benchmark's upstream, as cheap as an API
    /// can be, so that what a row measures is the gateway in front of it.
    Fixed,
}

/// The body of every [`UpstreamMode::Fixed`] answer.
pub const FIXED_BODY: &str = r#"{"city":"oslo","forecast":"rain","celsius":"7.5"}"#;

/// The running upstream; stops when dropped.
pub struct Upstream {
    address: SocketAddr,
    seen: Seen,
    task: JoinHandle<()>,
}

impl Upstream {
    pub async fn start(listen: SocketAddr, mode: UpstreamMode) -> anyhow::Result<Upstream> {
        let listener = TcpListener::bind(listen).await?;
        let address = listener.local_addr()?;
        let seen = Seen::default();
        let app = match mode {
            UpstreamMode::Echo => Router::new().fallback(echo).with_state(seen.clone()),
            UpstreamMode::Fixed => Router::new().fallback(fixed),
        };
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Upstream { address, seen, task })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Every request received so far, in order.
    pub fn seen(&self) -> Vec<SeenRequest> {
        self.seen.lock().map(|seen| seen.clone()).unwrap_or_default()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn fixed() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], FIXED_BODY).into_response()
}

async fn echo(State(seen): State<Seen>, request: Request) -> Response {
    let mut headers = BTreeMap::new();
    for (name, value) in request.headers() {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        headers
            .entry(name.as_str().to_owned())
            .and_modify(|joined: &mut String| {
                joined.push_str(", ");
                joined.push_str(&value);
            })
            .or_insert(value);
    }
    let uri = request.uri();
    let seen_request = SeenRequest {
        method: request.method().to_string(),
        path: uri.path_and_query().map_or_else(|| uri.path().to_owned(), ToString::to_string),
        headers,
    };
    if let Ok(mut seen) = seen.lock() {
        seen.push(seen_request.clone());
    }

    let delay = uri
        .query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("delay_ms="));
    if let Some(ms) = delay.and_then(|ms| ms.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let segments: Vec<&str> = uri.path().split('/').collect();
    let status = segments
        .windows(2)
        .find(|pair| pair[0] == "status")
        .and_then(|pair| pair[1].parse().ok())
        .and_then(|code| StatusCode::from_u16(code).ok())
        .unwrap_or(StatusCode::OK);
    (status, Json(seen_request)).into_response()
}
