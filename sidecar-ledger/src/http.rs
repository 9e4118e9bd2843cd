//! The ledger's HTTP API (see `paystile_protocol::ledger_api`).
//!
//! Admin endpoints take `Authorization: Bearer <admin key>`, gateway endpoints the gateway
//! key; `/healthz`, `/metrics`, `/openapi.json` and `/.well-known/jwks.json` are open. Every error is an `ErrorBody` with the status of its code.

use std::any::Any;
use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Extension, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::handler::Handler;
use axum::http::HeaderMap;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, on};
use axum::{Json, Router};
use paystile_protocol::ledger_api::{
    BuyerKeyRequest, BuyerTokenRequest, ChallengeRequest, ChargePage, ChargeQuery,
    ChildTokenRequest, DepositRequest, IssueTokenRequest, L402Challenges, ReserveRequest, Role,
    SandboxPaymentRequest, SeriesQuery, SetTierRequest, SettleRequest, SummaryQuery,
    TopSpendersQuery, TopUpRequest, WatchQuery, Whoami, path,
};
use paystile_protocol::{ErrorBody, ErrorCode};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tower_http::catch_panic::CatchPanicLayer;

use crate::buyer_access::BuyerKey;
use crate::challenge::{BATCH_TIME_BUDGET, ChallengeError, ChallengeMinter};
use crate::ledger::{Ledger, LedgerError, TopUpOutcome, now_millis};
use crate::store::ReserveOutcome;
use crate::{console, journal, telemetry};

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
    survive_panics(routes(ledger, minter, admin_key, gateway_key).router)
}

/// A handler that panics answers its own request with a 500 `internal` error, logged; the
/// connection, the other requests and the process go on. The panic's message stays in the
/// log: it may hold what a client sent.
fn survive_panics(router: Router) -> Router {
    router.layer(CatchPanicLayer::custom(|panic: Box<dyn Any + Send>| {
        let message = panic
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(not a string)");
        tracing::error!(panic = message, "a request handler panicked");
        ApiError(ErrorBody::with_message(ErrorCode::Internal, "the ledger failed on this request"))
            .into_response()
    }))
}

/// The API, and the list of its routes (the console's page is not part of the API).
fn routes(ledger: Arc<Ledger>, minter: Minter, admin_key: ApiKey, gateway_key: ApiKey) -> Routes {
    let access = Access { admin_key, ledger: ledger.clone() };
    let l402 = Routes::new()
        .post(path::L402_CHALLENGES, mint_challenge)
        .map(|r| r.route_layer(middleware::from_fn_with_state(gateway_key.clone(), require_key)))
        .merge(
            Routes::new().post(path::SANDBOX_PAYMENTS, pay_sandbox_invoice).map(|r| {
                r.route_layer(middleware::from_fn_with_state(access.clone(), require_admin))
            }),
        )
        .with_state(minter);
    let buyer_keys = format!("{}/{{buyer_id}}/keys", path::BUYERS);
    let admin = Routes::new()
        .post(path::TOKENS, issue_token)
        .get(&format!("{}/{{token_id}}", path::TOKENS), token)
        .post(&format!("{}/{{token_id}}/revoke", path::TOKENS), revoke_token)
        .post(&format!("{}/{{token_id}}/children", path::TOKENS), mint_child)
        .get(&format!("{}/{{buyer_id}}", path::BUYERS), buyer)
        .post(&format!("{}/{{buyer_id}}/deposits", path::BUYERS), deposit)
        .put(&format!("{}/{{buyer_id}}/tier", path::BUYERS), set_tier)
        .post(&format!("{}/{{buyer_id}}/revoke", path::BUYERS), revoke_buyer)
        .post(&buyer_keys, create_buyer_key)
        .get(&buyer_keys, list_buyer_keys)
        .post(&format!("{buyer_keys}/{{key_id}}/revoke"), revoke_buyer_key)
        .get(&format!("{}/{{charge_id}}", path::CHARGES), charge)
        .get(path::CHARGES, charges)
        .get(path::CHARGES_CSV, charges_csv)
        .get(path::SERVICES, services)
        .get(&format!("{}/{{service_id}}/summary", path::SERVICES), service_summary)
        .get(&format!("{}/{{service_id}}/series", path::SERVICES), service_series)
        .get(path::TOP_SPENDERS, top_spenders)
        .map(|r| r.route_layer(middleware::from_fn_with_state(access.clone(), require_admin)));
    let me = path::ME;
    let buyer = Routes::new()
        .get(me, own_buyer)
        .post(&format!("{me}/tokens"), issue_own_token)
        .get(&format!("{me}/tokens/{{token_id}}"), own_token)
        .post(&format!("{me}/tokens/{{token_id}}/revoke"), revoke_own_token)
        .post(&format!("{me}/tokens/{{token_id}}/children"), mint_own_child)
        .post(&format!("{me}/revoke"), revoke_own_tokens)
        .get(&format!("{me}/charges"), own_charges)
        .get(&format!("{me}/charges.csv"), own_charges_csv)
        .get(&format!("{me}/charges/{{charge_id}}"), own_charge)
        .map(|r| r.route_layer(middleware::from_fn_with_state(access.clone(), require_buyer)));
    let anyone_with_a_key = Routes::new()
        .get(path::WHOAMI, whoami)
        .map(|r| r.route_layer(middleware::from_fn_with_state(access, identify)));
    let gateway = Routes::new()
        .post(path::HOLDS, reserve)
        .post(path::SETTLEMENTS, settle)
        .post(path::X402_TOP_UPS, top_up)
        .get(path::REVOCATIONS, watch_revocations)
        .map(|r| r.route_layer(middleware::from_fn_with_state(gateway_key, require_key)));
    let timed = ledger.clone();
    Routes::new()
        .get(path::HEALTHZ, healthz)
        .get(path::JWKS, jwks)
        .get(path::METRICS, metrics)
        .get(path::OPENAPI, openapi)
        .merge(admin)
        .merge(buyer)
        .merge(anyone_with_a_key)
        .merge(gateway)
        .map(|r| r.merge(console::router()).fallback(not_found))
        .with_state(ledger)
        .merge(l402)
        // Last, so that it reaches every route (it is set per route, with its `Allow`).
        .map(|r| r.method_not_allowed_fallback(method_not_allowed))
        .map(|r| r.layer(middleware::from_fn_with_state(timed, telemetry::time_requests)))
}

/// A router that lists its routes (method, path template) as they are added, so that a test
/// can hold them against the OpenAPI document.
struct Routes<S = ()> {
    router: Router<S>,
    listed: Vec<(&'static str, String)>,
}

impl<S: Clone + Send + Sync + 'static> Routes<S> {
    fn new() -> Routes<S> {
        Routes { router: Router::new(), listed: Vec::new() }
    }

    fn get<H: Handler<T, S>, T: 'static>(self, path: &str, handler: H) -> Routes<S> {
        self.on("GET", MethodFilter::GET, path, handler)
    }

    fn post<H: Handler<T, S>, T: 'static>(self, path: &str, handler: H) -> Routes<S> {
        self.on("POST", MethodFilter::POST, path, handler)
    }

    fn put<H: Handler<T, S>, T: 'static>(self, path: &str, handler: H) -> Routes<S> {
        self.on("PUT", MethodFilter::PUT, path, handler)
    }

    fn on<H: Handler<T, S>, T: 'static>(
        mut self,
        method: &'static str,
        filter: MethodFilter,
        path: &str,
        handler: H,
    ) -> Routes<S> {
        self.router = self.router.route(path, on(filter, handler));
        self.listed.push((method, path.to_owned()));
        self
    }

    /// Layers and fallbacks: what adds no route.
    fn map(mut self, change: impl FnOnce(Router<S>) -> Router<S>) -> Routes<S> {
        self.router = change(self.router);
        self
    }

    fn merge(mut self, other: Routes<S>) -> Routes<S> {
        self.router = self.router.merge(other.router);
        self.listed.extend(other.listed);
        self
    }

    fn with_state<S2>(self, state: S) -> Routes<S2> {
        Routes { router: self.router.with_state(state), listed: self.listed }
    }
}

/// The OpenAPI 3 document of this API (a test holds it against the router and the protocol
/// types).
const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn require_key(State(key): State<ApiKey>, request: Request, next: Next) -> Response {
    match bearer(&request) {
        Some(presented) if key.admits(presented) => next.run(request).await,
        _ => ApiError(ErrorBody::new(ErrorCode::Unauthorized)).into_response(),
    }
}

/// What the admin and buyer endpoints need to tell who calls.
#[derive(Clone)]
struct Access {
    admin_key: ApiKey,
    ledger: Arc<Ledger>,
}

/// Who a request's key is.
#[derive(Clone)]
enum Caller {
    Admin,
    Buyer(BuyerKey),
}

impl Access {
    /// The caller, or 401: a wrong key, a revoked one and one that never existed answer
    /// alike.
    async fn caller(&self, presented: Option<Vec<u8>>) -> Result<Caller, ApiError> {
        let unauthorized = || ApiError(ErrorBody::new(ErrorCode::Unauthorized));
        let presented = presented.ok_or_else(unauthorized)?;
        if self.admin_key.admits(&presented) {
            return Ok(Caller::Admin);
        }
        match self.ledger.buyer_key(&presented).await? {
            Some(key) => Ok(Caller::Buyer(key)),
            None => Err(unauthorized()),
        }
    }
}

fn bearer(request: &Request) -> Option<&[u8]> {
    request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "))
}

fn forbidden(message: &str) -> Response {
    ApiError(ErrorBody::with_message(ErrorCode::Forbidden, message)).into_response()
}

async fn require_admin(State(access): State<Access>, request: Request, next: Next) -> Response {
    // Owned: a request is not `Sync`, so the lookup's future must not borrow it.
    let caller = access.caller(bearer(&request).map(<[u8]>::to_vec)).await;
    match caller {
        Ok(Caller::Admin) => next.run(request).await,
        Ok(Caller::Buyer(_)) => forbidden("a buyer key reaches the buyer's own API only (/v1/me)"),
        Err(error) => error.into_response(),
    }
}

/// Lets buyer keys in, each as its buyer (a [`BuyerKey`] extension).
async fn require_buyer(State(access): State<Access>, mut request: Request, next: Next) -> Response {
    // Owned: a request is not `Sync`, so the lookup's future must not borrow it.
    let caller = access.caller(bearer(&request).map(<[u8]>::to_vec)).await;
    match caller {
        Ok(Caller::Buyer(key)) => {
            request.extensions_mut().insert(key);
            next.run(request).await
        }
        Ok(Caller::Admin) => {
            forbidden("the admin key has no buyer of its own: use /v1/buyers/{buyerId}")
        }
        Err(error) => error.into_response(),
    }
}

/// Lets any key in, as its [`Caller`].
async fn identify(State(access): State<Access>, mut request: Request, next: Next) -> Response {
    // Owned: a request is not `Sync`, so the lookup's future must not borrow it.
    let caller = access.caller(bearer(&request).map(<[u8]>::to_vec)).await;
    match caller {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(error) => error.into_response(),
    }
}

async fn whoami(
    State(ledger): State<Arc<Ledger>>,
    Extension(caller): Extension<Caller>,
) -> Json<Whoami> {
    let services = ledger.services().to_vec();
    Json(match caller {
        Caller::Admin => Whoami { role: Role::Admin, key: None, services },
        Caller::Buyer(key) => Whoami { role: Role::Buyer, key: Some(key.view()), services },
    })
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// The public keys of the Pay Tokens the ledger signs: what gateways verify with.
async fn jwks(State(ledger): State<Arc<Ledger>>) -> Response {
    Json(ledger.published_keys().clone()).into_response()
}

async fn metrics(State(ledger): State<Arc<Ledger>>) -> Result<Response, ApiError> {
    let text =
        ledger.metrics().render().map_err(|_| ApiError(ErrorBody::new(ErrorCode::Internal)))?;
    Ok(([(header::CONTENT_TYPE, telemetry::CONTENT_TYPE)], text).into_response())
}

async fn not_found() -> ApiError {
    ApiError(ErrorBody::with_message(ErrorCode::NotFound, "no such endpoint"))
}

async fn method_not_allowed() -> ApiError {
    ApiError(ErrorBody::with_message(
        ErrorCode::MethodNotAllowed,
        "this endpoint does not take that method (see Allow)",
    ))
}

async fn issue_token(
    State(ledger): State<Arc<Ledger>>,
    ApiJson(request): ApiJson<IssueTokenRequest>,
) -> Result<impl IntoResponse, ApiError> {
    Ok((StatusCode::CREATED, Json(ledger.issue_token(request).await?)))
}

async fn token(
    State(ledger): State<Arc<Ledger>>,
    ApiPath(token_id): ApiPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ledger.token(token_id).await?))
}

async fn revoke_token(
    State(ledger): State<Arc<Ledger>>,
    ApiPath(token_id): ApiPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ledger.revoke_token(token_id).await?))
}

async fn watch_revocations(
    State(ledger): State<Arc<Ledger>>,
    ApiQuery(query): ApiQuery<WatchQuery>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ledger.watch_revocations(query.watcher, query.after).await?))
}

async fn mint_child(
    State(ledger): State<Arc<Ledger>>,
    ApiPath(parent_id): ApiPath<String>,
    ApiJson(request): ApiJson<ChildTokenRequest>,
) -> Result<impl IntoResponse, ApiError> {
    Ok((StatusCode::CREATED, Json(ledger.mint_child(parent_id, request).await?)))
}

async fn buyer(
    State(ledger): State<Arc<Ledger>>,
    ApiPath(buyer_id): ApiPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ledger.buyer(buyer_id).await?))
}

/// 201 for a new deposit; 200 when the reference named an earlier one.
async fn deposit(
    State(ledger): State<Arc<Ledger>>,
    ApiPath(buyer_id): ApiPath<String>,
    ApiJson(request): ApiJson<DepositRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let deposit = ledger.deposit(buyer_id, request).await?;
    let status = if deposit.replayed { StatusCode::OK } else { StatusCode::CREATED };
    Ok((status, Json(deposit)))
}

async fn set_tier(
    State(ledger): State<Arc<Ledger>>,
    ApiPath(buyer_id): ApiPath<String>,
    ApiJson(request): ApiJson<SetTierRequest>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ledger.set_tier(buyer_id, request).await?))
}

async fn revoke_buyer(
    State(ledger): State<Arc<Ledger>>,
    ApiPath(buyer_id): ApiPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ledger.revoke_buyer(buyer_id).await?))
}

async fn charge(
    State(ledger): State<Arc<Ledger>>,
    ApiPath(charge_id): ApiPath<String>,
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
    Ok(if prefers_csv(&headers) { csv_response(page) } else { Json(page).into_response() })
}

/// Whether `Accept` ranks `text/csv` above JSON (RFC 9110 §12.5.1): CSV must be acceptable
/// (q > 0) and strictly preferred; a tie, or no `Accept`, answers JSON.
fn prefers_csv(headers: &HeaderMap) -> bool {
    let (mut csv, mut json) = (0, 0);
    let ranges = headers.get_all(header::ACCEPT).into_iter().filter_map(|v| v.to_str().ok());
    for range in ranges.flat_map(|value| value.split(',')) {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
        let Some(q) = parts.find_map(|p| p.trim().strip_prefix("q=")).map_or(Some(1000), quality)
        else {
            continue;
        };
        match media.as_str() {
            "text/csv" | "text/*" => csv = csv.max(q),
            "application/json" | "application/*" => json = json.max(q),
            "*/*" => (csv, json) = (csv.max(q), json.max(q)),
            _ => {}
        }
    }
    csv > 0 && csv > json
}

/// A q-value in thousandths (`0.5` is 500); `None` if it is not one.
fn quality(q: &str) -> Option<u16> {
    let (whole, fraction) = q.split_once('.').unwrap_or((q, ""));
    if fraction.len() > 3 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let thousandths = format!("{fraction:0<3}").parse::<u16>().ok()?;
    match whole {
        "0" => Some(thousandths),
        "1" if thousandths == 0 => Some(1000),
        _ => None,
    }
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
    ApiPath(service_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<SummaryQuery>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ledger.service_summary(service_id, query).await?))
}

async fn services(State(ledger): State<Arc<Ledger>>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ledger.service_list().await?))
}

async fn service_series(
    State(ledger): State<Arc<Ledger>>,
    ApiPath(service_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<SeriesQuery>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ledger.service_series(service_id, query).await?))
}

async fn top_spenders(
    State(ledger): State<Arc<Ledger>>,
    ApiQuery(query): ApiQuery<TopSpendersQuery>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ledger.top_spenders(query).await?))
}

async fn create_buyer_key(
    State(ledger): State<Arc<Ledger>>,
    ApiPath(buyer_id): ApiPath<String>,
    ApiJson(request): ApiJson<BuyerKeyRequest>,
) -> Result<impl IntoResponse, ApiError> {
    Ok((StatusCode::CREATED, Json(ledger.create_buyer_key(buyer_id, request).await?)))
}

async fn list_buyer_keys(
    State(ledger): State<Arc<Ledger>>,
    ApiPath(buyer_id): ApiPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ledger.buyer_keys(buyer_id).await?))
}

async fn revoke_buyer_key(
    State(ledger): State<Arc<Ledger>>,
    ApiPath((buyer_id, key_id)): ApiPath<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ledger.revoke_buyer_key(buyer_id, key_id).await?))
}

async fn own_buyer(
    State(ledger): State<Arc<Ledger>>,
    Extension(key): Extension<BuyerKey>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ledger.own_buyer(&key).await?))
}

async fn issue_own_token(
    State(ledger): State<Arc<Ledger>>,
    Extension(key): Extension<BuyerKey>,
    ApiJson(request): ApiJson<BuyerTokenRequest>,
) -> Result<impl IntoResponse, ApiError> {
    Ok((StatusCode::CREATED, Json(ledger.issue_own_token(&key, request).await?)))
}

async fn own_token(
    State(ledger): State<Arc<Ledger>>,
    Extension(key): Extension<BuyerKey>,
    ApiPath(token_id): ApiPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ledger.own_token(&key, token_id).await?))
}

async fn revoke_own_token(
    State(ledger): State<Arc<Ledger>>,
    Extension(key): Extension<BuyerKey>,
    ApiPath(token_id): ApiPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ledger.revoke_own_token(&key, token_id).await?))
}

async fn mint_own_child(
    State(ledger): State<Arc<Ledger>>,
    Extension(key): Extension<BuyerKey>,
    ApiPath(parent_id): ApiPath<String>,
    ApiJson(request): ApiJson<ChildTokenRequest>,
) -> Result<impl IntoResponse, ApiError> {
    Ok((StatusCode::CREATED, Json(ledger.mint_own_child(&key, parent_id, request).await?)))
}

async fn revoke_own_tokens(
    State(ledger): State<Arc<Ledger>>,
    Extension(key): Extension<BuyerKey>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ledger.revoke_own_tokens(&key).await?))
}

async fn own_charge(
    State(ledger): State<Arc<Ledger>>,
    Extension(key): Extension<BuyerKey>,
    ApiPath(charge_id): ApiPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ledger.own_charge(&key, charge_id).await?))
}

/// The buyer's own journal: JSON, or CSV when the client prefers it.
async fn own_charges(
    State(ledger): State<Arc<Ledger>>,
    Extension(key): Extension<BuyerKey>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<ChargeQuery>,
) -> Result<Response, ApiError> {
    let page = ledger.own_charges(&key, query).await?;
    Ok(if prefers_csv(&headers) { csv_response(page) } else { Json(page).into_response() })
}

async fn own_charges_csv(
    State(ledger): State<Arc<Ledger>>,
    Extension(key): Extension<BuyerKey>,
    ApiQuery(query): ApiQuery<ChargeQuery>,
) -> Result<Response, ApiError> {
    Ok(csv_response(ledger.own_charges(&key, query).await?))
}

async fn reserve(
    State(ledger): State<Arc<Ledger>>,
    ApiJson(request): ApiJson<ReserveRequest>,
) -> Result<Response, ApiError> {
    Ok(match ledger.reserve(request).await? {
        ReserveOutcome::Held(hold) => Json(hold).into_response(),
        ReserveOutcome::Refused(refusal) | ReserveOutcome::RefusedAgain(refusal) => {
            ApiError(refusal.body()).into_response()
        }
    })
}

/// An x402 top-up: a prepaid balance and a Pay Token, bought through a gateway.
async fn top_up(
    State(ledger): State<Arc<Ledger>>,
    ApiJson(request): ApiJson<TopUpRequest>,
) -> Result<Response, ApiError> {
    Ok(match ledger.top_up(request).await? {
        TopUpOutcome::ToppedUp(top_up) => Json(top_up).into_response(),
        TopUpOutcome::Refused(refusal) => ApiError(refusal.body()).into_response(),
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
) -> Result<Response, ApiError> {
    let minter = minter.ok_or_else(l402_off)?;
    let now = u64::try_from(now_millis() / 1000).unwrap_or(0);
    // Without a count, the answer keeps its original shape: one challenge.
    Ok(match request.count {
        None => Json(minter.mint(&request, now).await?).into_response(),
        Some(_) => {
            let challenges = minter.mint_batch(&request, now, BATCH_TIME_BUDGET).await?;
            Json(L402Challenges { challenges }).into_response()
        }
    })
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
            LedgerError::Refused(refusal) => return ApiError(refusal.body()),
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

/// `Path`, but a path parameter that does not decode (bytes that are not UTF-8) is a 400
/// `ErrorBody` naming it.
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    S: Send + Sync,
    Path<T>: FromRequestParts<S, Rejection = PathRejection>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(ApiPath(value)),
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use paystile_protocol::Usdc;
    use paystile_protocol::ledger_api::{
        BuyerKeyView, BuyerKeys, BuyerSpend, ChargePage, ChargeView, Hold, IssuedBuyerKey,
        IssuedToken, L402Challenge, SandboxPayment, SeriesBucket, SeriesWindow, ServiceList,
        ServiceSeries, ServiceSummary, SettleResponse, TokenSpend, TokenView, TopSpenders,
    };
    use serde::Serialize;
    use serde::de::DeserializeOwned;
    use serde_json::Value;

    use super::*;
    use crate::ledger::Limits;
    use crate::store::{SqliteStore, Store};

    fn document() -> Value {
        serde_json::from_str(OPENAPI).unwrap()
    }

    /// `/v1/tokens/{token_id}` and `/v1/tokens/{tokenId}` name the same route.
    fn template(path: &str) -> String {
        let mut out = String::new();
        let mut in_parameter = false;
        for c in path.chars() {
            match c {
                '{' => in_parameter = true,
                '}' => {
                    in_parameter = false;
                    out.push_str("{}");
                }
                _ if in_parameter => {}
                _ => out.push(c),
            }
        }
        out
    }

    #[test]
    fn every_route_is_documented_and_every_documented_route_exists() {
        let books = tempfile::TempDir::new().unwrap();
        let store = Store::Sqlite(SqliteStore::open(&books.path().join("ledger.db")).unwrap());
        let limits = Limits {
            hold_ttl: Duration::from_secs(60),
            max_replays: 5,
            daily_limits: Arc::default(),
            clock_offset_millis: 0,
            idempotency_retention: Duration::from_secs(86_400),
        };
        let credentials = crate::ledger::Credentials {
            verifier: Default::default(),
            published: Default::default(),
        };
        let ledger = Arc::new(Ledger::new(store, None, credentials, limits));
        let routes = routes(ledger, None, ApiKey::new("a"), ApiKey::new("g"));
        let served: BTreeSet<(String, String)> = routes
            .listed
            .iter()
            .map(|(method, path)| ((*method).to_owned(), template(path)))
            .collect();
        assert_eq!(served.len(), routes.listed.len(), "a route is added twice");

        let document = document();
        let mut documented = BTreeSet::new();
        for (path, operations) in document["paths"].as_object().unwrap() {
            for method in operations.as_object().unwrap().keys() {
                documented.insert((method.to_ascii_uppercase(), template(path)));
            }
        }
        assert_eq!(served, documented);
    }

    /// Reads an example as a protocol type and writes it back.
    type RoundTrip = fn(&Value) -> Value;

    fn round_trip<T: DeserializeOwned + Serialize>(example: &Value) -> Value {
        let parsed: T = serde_json::from_value(example.clone()).unwrap();
        serde_json::to_value(parsed).unwrap()
    }

    /// Every example is a body the protocol types read, and write back unchanged: so each
    /// field name and format in the document is the wire's.
    #[test]
    fn examples_are_what_the_protocol_types_read_and_write() {
        let parsers: [(&str, RoundTrip); 45] = [
            ("Usdc", round_trip::<Usdc>),
            ("ErrorBody", round_trip::<ErrorBody>),
            ("Jwks", round_trip::<paystile_protocol::jwk::Jwks>),
            ("Idempotency", round_trip::<paystile_protocol::ledger_api::Idempotency>),
            ("ReserveRequest", round_trip::<ReserveRequest>),
            ("Hold", round_trip::<Hold>),
            ("Settlement", round_trip::<paystile_protocol::ledger_api::Settlement>),
            ("SettleRequest", round_trip::<SettleRequest>),
            ("SettleResult", round_trip::<paystile_protocol::ledger_api::SettleResult>),
            ("SettleResponse", round_trip::<SettleResponse>),
            ("IssueTokenRequest", round_trip::<IssueTokenRequest>),
            ("IssuedToken", round_trip::<IssuedToken>),
            ("TokenView", round_trip::<TokenView>),
            ("ChildTokenRequest", round_trip::<ChildTokenRequest>),
            ("DepositRequest", round_trip::<DepositRequest>),
            ("Deposit", round_trip::<paystile_protocol::ledger_api::Deposit>),
            ("SetTierRequest", round_trip::<SetTierRequest>),
            ("AccountView", round_trip::<paystile_protocol::ledger_api::AccountView>),
            ("BuyerView", round_trip::<paystile_protocol::ledger_api::BuyerView>),
            ("BuyerRevocation", round_trip::<paystile_protocol::ledger_api::BuyerRevocation>),
            (
                "GatewayConfirmations",
                round_trip::<paystile_protocol::ledger_api::GatewayConfirmations>,
            ),
            ("RevocationFeed", round_trip::<paystile_protocol::ledger_api::RevocationFeed>),
            ("ChargeView", round_trip::<ChargeView>),
            ("SettlementView", round_trip::<paystile_protocol::ledger_api::SettlementView>),
            ("TopUpRequest", round_trip::<TopUpRequest>),
            ("TopUp", round_trip::<paystile_protocol::ledger_api::TopUp>),
            ("ChargePage", round_trip::<ChargePage>),
            ("ServiceSummary", round_trip::<ServiceSummary>),
            ("ChallengeRequest", round_trip::<ChallengeRequest>),
            ("L402Challenge", round_trip::<L402Challenge>),
            ("L402Challenges", round_trip::<L402Challenges>),
            ("SandboxPaymentRequest", round_trip::<SandboxPaymentRequest>),
            ("SandboxPayment", round_trip::<SandboxPayment>),
            ("Whoami", round_trip::<Whoami>),
            ("BuyerKeyRequest", round_trip::<BuyerKeyRequest>),
            ("BuyerKeyView", round_trip::<BuyerKeyView>),
            ("IssuedBuyerKey", round_trip::<IssuedBuyerKey>),
            ("BuyerKeys", round_trip::<BuyerKeys>),
            ("BuyerTokenRequest", round_trip::<BuyerTokenRequest>),
            ("ServiceList", round_trip::<ServiceList>),
            ("ServiceSeries", round_trip::<ServiceSeries>),
            ("SeriesBucket", round_trip::<SeriesBucket>),
            ("TopSpenders", round_trip::<TopSpenders>),
            ("TokenSpend", round_trip::<TokenSpend>),
            ("BuyerSpend", round_trip::<BuyerSpend>),
        ];
        let document = document();
        let schemas = document["components"]["schemas"].as_object().unwrap();
        for (name, parse) in parsers {
            let schema = &schemas[name];
            let example = &schema["example"];
            assert_eq!(&parse(example), example, "{name}");
            if let Some(properties) = schema["properties"].as_object() {
                for key in example.as_object().unwrap().keys() {
                    assert!(properties.contains_key(key), "{name}.{key} is not a property");
                }
                // OpenAPI 3.0 wants `required` left out rather than empty.
                for required in schema["required"].as_array().into_iter().flatten() {
                    assert!(example.get(required.as_str().unwrap()).is_some(), "{name}.{required}");
                }
            }
        }
        // The rest are plain enums and the health answer.
        let with_examples: BTreeSet<&str> = schemas
            .iter()
            .filter(|(_, schema)| schema.get("example").is_some())
            .map(|(name, _)| name.as_str())
            .collect();
        let parsed: BTreeSet<&str> =
            parsers.iter().map(|(name, _)| *name).chain(["Health"]).collect();
        assert_eq!(with_examples, parsed);

        // Every reference resolves.
        for reference in OPENAPI.split("\"$ref\": \"#/components/schemas/").skip(1) {
            let name = reference.split('"').next().unwrap();
            assert!(schemas.contains_key(name), "no schema {name}");
        }
    }

    /// The documented CSV is what the export writes for the documented charge.
    #[test]
    fn csv_examples_are_the_exports() {
        let document = document();
        let charge: ChargeView = serde_json::from_value(
            document["components"]["schemas"]["ChargeView"]["example"].clone(),
        )
        .unwrap();
        let written = journal::csv(&[charge], true);
        for path in ["/v1/charges", "/v1/charges.csv", "/v1/me/charges", "/v1/me/charges.csv"] {
            let example = &document["paths"][path]["get"]["responses"]["200"]["content"]["text/csv"]
                ["example"];
            assert_eq!(example.as_str(), Some(written.as_str()), "{path}");
        }
    }

    /// The documented query parameters are the query types' fields.
    #[test]
    fn query_parameters_are_the_query_types() {
        let full = ChargeQuery {
            token_id: Some(String::new()),
            buyer_id: Some(String::new()),
            service_id: Some(String::new()),
            status: Some(paystile_protocol::ledger_api::ChargeStatus::Held),
            settlement: Some(String::new()),
            sandbox: Some(false),
            from: Some(String::new()),
            to: Some(String::new()),
            limit: Some(1),
            cursor: Some(String::new()),
            order: Some(paystile_protocol::ledger_api::ChargeOrder::Desc),
        };
        let summary =
            SummaryQuery { sandbox: true, from: Some(String::new()), to: Some(String::new()) };
        let series = SeriesQuery { window: SeriesWindow::Day, sandbox: true };
        let top = TopSpendersQuery {
            from: Some(String::new()),
            to: Some(String::new()),
            sandbox: true,
            limit: Some(1),
        };
        let fields = |query: Value| -> BTreeSet<String> {
            query.as_object().unwrap().keys().cloned().collect()
        };
        let document = document();
        let parameters = |path: &str| -> BTreeSet<String> {
            document["paths"][path]["get"]["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["in"] == "query")
                .map(|p| p["name"].as_str().unwrap().to_owned())
                .collect()
        };
        let charge_fields = fields(serde_json::to_value(&full).unwrap());
        assert_eq!(parameters("/v1/charges"), charge_fields);
        assert_eq!(parameters("/v1/charges.csv"), charge_fields);
        assert_eq!(parameters("/v1/me/charges"), charge_fields);
        assert_eq!(parameters("/v1/me/charges.csv"), charge_fields);
        assert_eq!(
            parameters("/v1/services/{serviceId}/summary"),
            fields(serde_json::to_value(&summary).unwrap())
        );
        assert_eq!(
            parameters("/v1/services/{serviceId}/series"),
            fields(serde_json::to_value(&series).unwrap())
        );
        assert_eq!(parameters("/v1/top-spenders"), fields(serde_json::to_value(&top).unwrap()));
    }

    /// A handler that panics answers 500 `internal`, and the same connection and server go
    /// on answering (with `panic = "abort"` in the release profile, the process died).
    #[allow(clippy::panic)]
    #[tokio::test]
    async fn a_panicking_request_gets_a_500_and_the_ledger_goes_on() {
        async fn panics() -> &'static str {
            panic!("a bug")
        }
        let router = survive_panics(
            Router::new()
                .route("/panics", axum::routing::get(panics))
                .route("/answers", axum::routing::get(|| async { "fine" })),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move { axum::serve(listener, router).await });
        let client = reqwest::Client::new();

        let failed = client.get(format!("{url}/panics")).send().await.unwrap();
        assert_eq!(failed.status(), 500);
        let body: ErrorBody = failed.json().await.unwrap();
        assert_eq!(body.code, ErrorCode::Internal);
        assert!(!body.error.contains("a bug"), "the panic's message reached the client");
        for _ in 0..2 {
            let answered = client.get(format!("{url}/answers")).send().await.unwrap();
            assert_eq!(
                (answered.status().as_u16(), answered.text().await.unwrap()),
                (200, "fine".into())
            );
        }
        server.abort();
    }
}
