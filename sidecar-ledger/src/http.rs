//! The ledger's HTTP API (see `paystile_protocol::ledger_api`).
//!
//! Admin endpoints take `Authorization: Bearer <admin key>`, gateway endpoints the gateway
//! key; `/healthz` and `/metrics` are open. Every error is an `ErrorBody` with the status of its code.

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use paystile_protocol::ledger_api::{
    ChallengeRequest, ChargePage, ChargeQuery, IssueTokenRequest, ReserveRequest,
    SandboxPaymentRequest, SettleRequest, SummaryQuery, path,
};
use paystile_protocol::{ErrorBody, ErrorCode};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::challenge::{ChallengeError, ChallengeMinter};
use crate::ledger::{Ledger, LedgerError, now_millis};
use crate::store::ReserveOutcome;
use crate::{journal, telemetry};

/// An API key, kept as its SHA-256 so that comparing takes the same time whatever the
/// presented key's length or content.
#[derive(Clone)]
pub struct ApiKey([u8; 32]);

impl ApiKey {
    pub fn new(key: &str) -> ApiKey {
        ApiKey(Sha256::digest(key.as_bytes()).into())
    }

    fn admits(&self, presented: &[u8]) -> bool {
        let presented: [u8; 32] = Sha256::digest(presented).into();
        bool::from(self.0.ct_eq(&presented))
    }
}

/// L402 is on when the ledger has a minter (an L402 secret and an invoice backend).
type Minter = Option<Arc<ChallengeMinter>>;

pub fn router(
    ledger: Arc<Ledger>,
    minter: Minter,
    admin_key: ApiKey,
    gateway_key: ApiKey,
) -> Router {
    let l402 = Router::new()
        .route(path::L402_CHALLENGES, post(mint_challenge))
        .route_layer(middleware::from_fn_with_state(gateway_key.clone(), require_key))
        .merge(
            Router::new()
                .route(path::SANDBOX_PAYMENTS, post(pay_sandbox_invoice))
                .route_layer(middleware::from_fn_with_state(admin_key.clone(), require_key)),
        )
        .with_state(minter);
    let admin = Router::new()
        .route(path::TOKENS, post(issue_token))
        .route(&format!("{}/{{token_id}}", path::TOKENS), get(token))
        .route(&format!("{}/{{token_id}}/revoke", path::TOKENS), post(revoke_token))
        .route(&format!("{}/{{charge_id}}", path::CHARGES), get(charge))
        .route(path::CHARGES, get(charges))
        .route(path::CHARGES_CSV, get(charges_csv))
        .route(&format!("{}/{{service_id}}/summary", path::SERVICES), get(service_summary))
        .route_layer(middleware::from_fn_with_state(admin_key, require_key));
    let gateway = Router::new()
        .route(path::HOLDS, post(reserve))
        .route(path::SETTLEMENTS, post(settle))
        .route_layer(middleware::from_fn_with_state(gateway_key, require_key));
    let timed = ledger.clone();
    Router::new()
        .route(path::HEALTHZ, get(healthz))
        .route(path::METRICS, get(metrics))
        .merge(admin)
        .merge(gateway)
        .fallback(not_found)
        .with_state(ledger)
        .merge(l402)
        .layer(middleware::from_fn_with_state(timed, telemetry::time_requests))
}

async fn require_key(State(key): State<ApiKey>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "));
    match presented {
        Some(presented) if key.admits(presented) => next.run(request).await,
        _ => ApiError(ErrorBody::new(ErrorCode::Unauthorized)).into_response(),
    }
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn metrics(State(ledger): State<Arc<Ledger>>) -> Result<Response, ApiError> {
    let text =
        ledger.metrics().render().map_err(|_| ApiError(ErrorBody::new(ErrorCode::Internal)))?;
    Ok(([(header::CONTENT_TYPE, telemetry::CONTENT_TYPE)], text).into_response())
}

async fn not_found() -> ApiError {
    ApiError(ErrorBody::with_message(ErrorCode::NotFound, "no such endpoint"))
}

async fn issue_token(
    State(ledger): State<Arc<Ledger>>,
    ApiJson(request): ApiJson<IssueTokenRequest>,
) -> Result<impl IntoResponse, ApiError> {
    Ok((StatusCode::CREATED, Json(ledger.issue_token(request).await?)))
}

async fn token(
    State(ledger): State<Arc<Ledger>>,
    Path(token_id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ledger.token(token_id).await?))
}

async fn revoke_token(
    State(ledger): State<Arc<Ledger>>,
    Path(token_id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ledger.revoke_token(token_id).await?))
}

async fn charge(
    State(ledger): State<Arc<Ledger>>,
    Path(charge_id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ledger.charge(charge_id).await?))
}

/// A page of the journal: JSON, or CSV when the client accepts `text/csv`.
async fn charges(
    State(ledger): State<Arc<Ledger>>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<ChargeQuery>,
) -> Result<Response, ApiError> {
    let page = ledger.charges(query).await?;
    let wants_csv = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|accept| accept.contains("text/csv"));
    Ok(if wants_csv { csv_response(page) } else { Json(page).into_response() })
}

async fn charges_csv(
    State(ledger): State<Arc<Ledger>>,
    ApiQuery(query): ApiQuery<ChargeQuery>,
) -> Result<Response, ApiError> {
    Ok(csv_response(ledger.charges(query).await?))
}

/// The page as CSV; the next page's cursor goes in `X-Next-Cursor`.
fn csv_response(page: ChargePage) -> Response {
    let body = journal::csv(&page.charges, true);
    let mut response = ([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], body).into_response();
    if let Some(cursor) = page.next_cursor.and_then(|c| c.parse().ok()) {
        response.headers_mut().insert(journal::NEXT_CURSOR_HEADER, cursor);
    }
    response
}

async fn service_summary(
    State(ledger): State<Arc<Ledger>>,
    Path(service_id): Path<String>,
    ApiQuery(query): ApiQuery<SummaryQuery>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ledger.service_summary(service_id, query).await?))
}

async fn reserve(
    State(ledger): State<Arc<Ledger>>,
    ApiJson(request): ApiJson<ReserveRequest>,
) -> Result<Response, ApiError> {
    Ok(match ledger.reserve(request).await? {
        ReserveOutcome::Held(hold) => Json(hold).into_response(),
        ReserveOutcome::Refused(refusal) => ApiError(refusal).into_response(),
    })
}

async fn settle(
    State(ledger): State<Arc<Ledger>>,
    ApiJson(request): ApiJson<SettleRequest>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ledger.settle(request).await?))
}

async fn mint_challenge(
    State(minter): State<Minter>,
    ApiJson(request): ApiJson<ChallengeRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let minter = minter.ok_or_else(l402_off)?;
    let now = u64::try_from(now_millis() / 1000).unwrap_or(0);
    Ok(Json(minter.mint(request, now).await?))
}

async fn pay_sandbox_invoice(
    State(minter): State<Minter>,
    ApiJson(request): ApiJson<SandboxPaymentRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let minter = minter.ok_or_else(l402_off)?;
    Ok(Json(minter.pay_sandbox(&request)?))
}

fn l402_off() -> ApiError {
    ApiError(ErrorBody::with_message(
        ErrorCode::NotFound,
        "L402 is off: the ledger has no l402_secret and invoice_backend",
    ))
}

/// An error answer: the body's code decides the status.
pub struct ApiError(pub ErrorBody);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.0)).into_response()
    }
}

impl From<LedgerError> for ApiError {
    fn from(error: LedgerError) -> ApiError {
        let code = match &error {
            LedgerError::Invalid(_) | LedgerError::IssuingDisabled => ErrorCode::BadRequest,
            LedgerError::NotFound(_) => ErrorCode::NotFound,
            LedgerError::Store(store) => {
                tracing::error!(error = %store, "store failure");
                return ApiError(ErrorBody::new(ErrorCode::Internal));
            }
        };
        ApiError(ErrorBody::with_message(code, error.to_string()))
    }
}

impl From<ChallengeError> for ApiError {
    fn from(error: ChallengeError) -> ApiError {
        let code = match &error {
            ChallengeError::Invalid(_) | ChallengeError::SandboxRefused(_) => ErrorCode::BadRequest,
            ChallengeError::SandboxOff => ErrorCode::NotFound,
            ChallengeError::Invoice(invoice) => {
                tracing::warn!(error = %invoice, "cannot mint an L402 challenge");
                ErrorCode::LedgerUnavailable
            }
        };
        ApiError(ErrorBody::with_message(code, error.to_string()))
    }
}

/// `Json`, but a body that does not parse is a 400 `ErrorBody` naming what is wrong.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => {
                Err(ApiError(ErrorBody::with_message(ErrorCode::BadRequest, rejection.body_text())))
            }
        }
    }
}

/// `Query`, but a query string that does not parse (an unknown parameter, a bad number or
/// status) is a 400 `ErrorBody` naming what is wrong.
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    S: Send + Sync,
    Query<T>: FromRequestParts<S, Rejection = QueryRejection>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(ApiQuery(value)),
            Err(rejection) => {
                Err(ApiError(ErrorBody::with_message(ErrorCode::BadRequest, rejection.body_text())))
            }
        }
    }
}
