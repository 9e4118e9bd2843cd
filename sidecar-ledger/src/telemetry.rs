//! What the ledger tells its operators: Prometheus metrics (`GET /metrics`) and a structured
//! log event per reserve, settlement and refusal.
//!
//! Events carry ids (charge, token, buyer, service), amounts and codes: never a credential, an
//! API key or an Idempotency-Key (client-chosen text, possibly derived from request data).
//! Metric labels are bounded sets (codes, reasons, route templates), never ids.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use paystile_protocol::ledger_api::{
    ReserveRequest, SettleResult, SettleStatus, Settlement, TokenGrant,
};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::ledger::Ledger;
use crate::rules::Refusal;
use crate::store::ReserveOutcome;

/// The `Content-Type` of [`Metrics::render`]'s text (what Prometheus negotiates for it).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: String,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // label values, as Prometheus shows them
enum ReleaseReason {
    /// The gateway reported an unbillable call.
    outcome,
    /// The token was revoked while the call was in flight.
    revoked,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReleaseLabels {
    reason: ReleaseReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    /// One of HTTP's own methods, or `other`: any client can send a made-up one.
    method: &'static str,
    /// The route's template (`/v1/tokens/{token_id}`), or `unmatched`.
    endpoint: String,
    status: u16,
}

/// The ledger's counters and latency histograms, since this process started.
pub struct Metrics {
    registry: Registry,
    holds: Counter,
    prefetched: Counter,
    late_prefetches: Counter,
    replays: Counter,
    commits: Counter,
    releases: Family<ReleaseLabels, Counter>,
    expirations: Counter,
    refusals: Family<CodeLabels, Counter>,
    requests: Family<RequestLabels, Histogram, fn() -> Histogram>,
}

/// 0.25 ms to about 4 s: a reserve on a local store takes well under a millisecond, one
/// waiting on a remote PostgreSQL or a saturated disk much longer.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 15))
}

impl Metrics {
    /// The metrics, with `expired_on_read`: the store's count of the holds it released on
    /// read, which `expirations` includes.
    pub fn new(expired_on_read: Counter) -> Metrics {
        let mut metrics = Metrics {
            registry: Registry::with_prefix("paystile_ledger"),
            holds: Counter::default(),
            prefetched: Counter::default(),
            late_prefetches: Counter::default(),
            replays: Counter::default(),
            commits: Counter::default(),
            releases: Family::default(),
            expirations: expired_on_read,
            refusals: Family::default(),
            requests: Family::new_with_constructor(latency_histogram),
        };
        let registry = &mut metrics.registry;
        registry.register(
            "holds",
            "Holds placed (calls admitted), prefetched holds included",
            metrics.holds.clone(),
        );
        registry.register(
            "prefetched_holds",
            "Holds placed beyond a reserve's first, for a gateway to serve a hot token's next calls",
            metrics.prefetched.clone(),
        );
        registry.register(
            "late_prefetches",
            "Batch reserves answered past their gateway's deadline (extrasUntilMs) with their first hold only: extras decided after the deadline are not granted. Many of them from a prompt ledger mean the gateways' clocks are behind the ledger's",
            metrics.late_prefetches.clone(),
        );
        registry.register(
            "replays",
            "Reserves answered with an already committed charge (Idempotency-Key)",
            metrics.replays.clone(),
        );
        registry.register(
            "commits",
            "Holds committed (calls charged), partial commits (less than the hold) included",
            metrics.commits.clone(),
        );
        registry.register(
            "releases",
            "Holds released by a settlement: an unbillable call (outcome) or a revoked token",
            metrics.releases.clone(),
        );
        registry.register(
            "expirations",
            "Holds released because their TTL passed: by the sweeper, at a late settlement, or \
             on read (an operation on the buyer found them past it)",
            metrics.expirations.clone(),
        );
        registry.register(
            "refusals",
            "Reserves refused, by error code (a refusal recorded under an Idempotency-Key and \
             answered again is not counted again)",
            metrics.refusals.clone(),
        );
        registry.register_with_unit(
            "http_request_duration",
            "Time to answer an API request, by endpoint",
            Unit::Seconds,
            metrics.requests.clone(),
        );
        metrics
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }

    /// A reserve for extra holds answered past its gateway's deadline, without extras.
    pub fn late_prefetch(&self, request: &ReserveRequest, late_by_ms: u64) {
        self.late_prefetches.inc();
        tracing::debug!(
            event = "late_prefetch",
            service_id = %request.service_id,
            count = request.count,
            late_by_ms,
            "batch reserve answered past its gateway's deadline: no extra holds"
        );
    }

    /// Counts and logs a reserve's outcome; `token` is what its credential proved.
    pub fn reserved(&self, token: &TokenGrant, request: &ReserveRequest, outcome: &ReserveOutcome) {
        match outcome {
            ReserveOutcome::Held(hold) => {
                if hold.replayed {
                    self.replays.inc();
                } else {
                    let extra = u64::try_from(hold.extra_charge_ids.len()).unwrap_or(u64::MAX);
                    self.holds.inc_by(extra.saturating_add(1));
                    self.prefetched.inc_by(extra);
                }
                tracing::debug!(
                    event = "hold",
                    charge_id = %hold.charge_id,
                    token_id = %token.token_id,
                    buyer_id = %token.buyer_id,
                    service_id = %request.service_id,
                    amount_usdc = %hold.amount_usdc,
                    remaining_usdc = %hold.remaining_usdc,
                    replayed = hold.replayed,
                    extra_holds = hold.extra_charge_ids.len(),
                    idempotent = request.idempotency.is_some(),
                    "reserve held"
                );
            }
            ReserveOutcome::Refused(refusal) => self.refused(token, request, refusal),
            ReserveOutcome::RefusedAgain(refusal) => tracing::debug!(
                event = "refusal_replayed",
                code = %wire_name(refusal.code()),
                token_id = %token.token_id,
                service_id = %request.service_id,
                "recorded refusal answered again"
            ),
        }
    }

    fn refused(&self, token: &TokenGrant, request: &ReserveRequest, refusal: &Refusal) {
        let code = wire_name(refusal.code());
        self.refusals.get_or_create(&CodeLabels { code: code.clone() }).inc();
        tracing::info!(
            event = "refusal",
            code = %code,
            token_id = %token.token_id,
            buyer_id = %token.buyer_id,
            service_id = %request.service_id,
            price_usdc = %request.price_usdc,
            "reserve refused"
        );
    }

    /// Counts and logs a reserve whose credential the ledger does not accept: a gateway
    /// that took it verifies with other keys than the ledger, or someone holding the gateway
    /// key is trying to spend without a credential. The credential itself is never logged.
    pub fn credential_refused(&self, request: &ReserveRequest, refusal: &Refusal) {
        let code = wire_name(refusal.code());
        self.refusals.get_or_create(&CodeLabels { code: code.clone() }).inc();
        tracing::warn!(
            event = "credential_refused",
            code = %code,
            reason = %refusal,
            service_id = %request.service_id,
            "reserve refused: its credential does not verify here"
        );
    }

    /// Counts and logs each settlement's result.
    pub fn settled(&self, settlements: &[Settlement], results: &[SettleResult]) {
        for (settlement, result) in settlements.iter().zip(results) {
            let counter = match result.status {
                SettleStatus::Committed => Some(self.commits.clone()),
                SettleStatus::Released => Some(self.release(ReleaseReason::outcome)),
                SettleStatus::Revoked => Some(self.release(ReleaseReason::revoked)),
                SettleStatus::Expired => Some(self.expirations.clone()),
                SettleStatus::AlreadyCommitted
                | SettleStatus::AlreadyReleased
                | SettleStatus::Unknown
                | SettleStatus::Invalid => None,
            };
            if let Some(counter) = counter {
                counter.inc();
            }
            tracing::debug!(
                event = "settlement",
                charge_id = %result.charge_id,
                outcome = %wire_name(settlement.outcome),
                upstream_status = settlement.upstream_status,
                result = %wire_name(result.status),
                "hold settled"
            );
        }
    }

    fn release(&self, reason: ReleaseReason) -> Counter {
        self.releases.get_or_create(&ReleaseLabels { reason }).clone()
    }

    /// Counts holds the sweeper released.
    pub fn expired(&self, holds: usize) {
        self.expirations.inc_by(u64::try_from(holds).unwrap_or(u64::MAX));
    }
}

/// A code or status as the API writes it (`token_limit_exceeded`, `already_committed`).
pub(crate) fn wire_name(value: impl serde::Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        _ => String::new(),
    }
}

fn method_label(method: &Method) -> &'static str {
    const KNOWN: [Method; 9] = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::CONNECT,
        Method::OPTIONS,
        Method::TRACE,
        Method::PATCH,
    ];
    KNOWN.iter().find(|known| *known == method).map_or("other", Method::as_str)
}

/// Middleware: times every request, labelled by its route's template.
pub async fn time_requests(
    State(ledger): State<Arc<Ledger>>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let response = next.run(request).await;
    let labels = RequestLabels { method, endpoint, status: response.status().as_u16() };
    let requests = &ledger.metrics().requests;
    requests.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
    response
}
