//! The ledger's HTTP API (see `paystile_protocol::ledger_api`).
//!
//! Admin endpoints take `Authorization: Bearer <admin key>`, gateway endpoints the gateway
//! key; `/healthz` is open. Every error is an `ErrorBody` with the status of its code.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use paystile_protocol::ledger_api::{
    ChallengeRequest, ChildTokenRequest, DepositRequest, IssueTokenRequest, ReserveRequest,
    SandboxPaymentRequest, SetTierRequest, SettleRequest, path,
};
use paystile_protocol::{ErrorBody, ErrorCode};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::challenge::{ChallengeError, ChallengeMinter};
use crate::ledger::{Ledger, LedgerError, now_millis};
use crate::store::ReserveOutcome;

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
        .route(&format!("{}/{{token_id}}/children", path::TOKENS), post(mint_child))
        .route(&format!("{}/{{buyer_id}}", path::BUYERS), get(buyer))
        .route(&format!("{}/{{buyer_id}}/deposits", path::BUYERS), post(deposit))
        .route(&format!("{}/{{buyer_id}}/tier", path::BUYERS), put(set_tier))
        .route(&format!("{}/{{buyer_id}}/revoke", path::BUYERS), post(revoke_buyer))
        .route(&format!("{}/{{charge_id}}", path::CHARGES), get(charge))
        .route_layer(middleware::from_fn_with_state(admin_key, require_key));
    let gateway = Router::new()
        .route(path::HOLDS, post(reserve))
        .route(path::SETTLEMENTS, post(settle))
        .route_layer(middleware::from_fn_with_state(gateway_key, require_key));
    Router::new()
        .route(path::HEALTHZ, get(healthz))
        .merge(admin)
        .merge(gateway)
        .fallback(not_found)
        .with_state(ledger)
        .merge(l402)
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

async fn mint_child(
    State(ledger): State<Arc<Ledger>>,
    Path(parent_id): Path<String>,
    ApiJson(request): ApiJson<ChildTokenRequest>,
) -> Result<impl IntoResponse, ApiError> {
    Ok((StatusCode::CREATED, Json(ledger.mint_child(parent_id, request).await?)))
}

async fn buyer(
    State(ledger): State<Arc<Ledger>>,
    Path(buyer_id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ledger.buyer(buyer_id).await?))
}

/// 201 for a new deposit; 200 when the reference named an earlier one.
async fn deposit(
    State(ledger): State<Arc<Ledger>>,
    Path(buyer_id): Path<String>,
    ApiJson(request): ApiJson<DepositRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let deposit = ledger.deposit(buyer_id, request).await?;
    let status = if deposit.replayed { StatusCode::OK } else { StatusCode::CREATED };
    Ok((status, Json(deposit)))
}

async fn set_tier(
    State(ledger): State<Arc<Ledger>>,
    Path(buyer_id): Path<String>,
    ApiJson(request): ApiJson<SetTierRequest>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ledger.set_tier(buyer_id, request).await?))
}

async fn revoke_buyer(
    State(ledger): State<Arc<Ledger>>,
    Path(buyer_id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ledger.revoke_buyer(buyer_id).await?))
}

async fn charge(
    State(ledger): State<Arc<Ledger>>,
    Path(charge_id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ledger.charge(charge_id).await?))
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
            LedgerError::Refused(body) => return ApiError(body.clone()),
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
