//! The filter's decisions for one request, as a plain state machine.
//!
//! The proxy-wasm adapter feeds an [`Exchange`] what the host reports (request headers, the
//! ledger's reply, the response status, the end of the stream) and carries out the action
//! it answers. Nothing here calls a host, so every path runs in native tests.
//!
//! ```text
//!  New ──unpriced──▶ Free ──────────────────────────────▶ (untouched)
//!   │ no/bad credential ──▶ Done (402/401/403 answered locally)
//!   └─valid token──▶ AwaitingLedger ─held──▶ Held ──response──▶ Done + commit|release
//!                          │ replay ──▶ Replayed ──response──▶ Done (original charge)
//!                          │ refused ──▶ Done (402/409/422)
//!                          └ unreachable ──▶ Done (503) | Free (fail open)
//! ```

use std::cell::Cell;

use paystile_protocol::credential::{self, Credential};
use paystile_protocol::headers::{self, APPLICATION_JSON};
use paystile_protocol::ledger_api::{
    Hold, Idempotency, Outcome, ReserveRequest, Settlement, TokenGrant, path,
};
use paystile_protocol::pay_token::{self, PayTokenError};
use paystile_protocol::{ErrorBody, ErrorCode, Usdc};
use sha2::{Digest, Sha256};

use crate::config::{Config, FailureMode};

/// The Pay Token challenge. L402 will add its own beside it.
const BEARER_CHALLENGE: &str = r#"Bearer realm="paystile", error="payment_required""#;
const BEARER_INVALID: &str = r#"Bearer realm="paystile", error="invalid_token""#;
/// The schemes a 402 challenge lists in its body.
const SCHEMES: &[&str] = &["Bearer"];
/// Seconds a client should wait before retrying when the ledger is unavailable.
const RETRY_AFTER_SECONDS: &str = "1";

/// Per-VM state shared by every request: the configuration, and how the ledger answered
/// last time (so that an outage is logged when it starts and ends, not once per call).
pub struct Gate {
    config: Config,
    ledger_health: Cell<Health>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Health {
    Answering,
    Unreachable,
    Confused,
}

impl Gate {
    pub fn new(config: Config) -> Gate {
        Gate { config, ledger_health: Cell::new(Health::Answering) }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    fn note_ledger(&self, answer: &LedgerAnswer, status: Option<u16>) {
        let health = match answer {
            LedgerAnswer::Hold(_) | LedgerAnswer::Refusal(_) => Health::Answering,
            LedgerAnswer::Unreachable => Health::Unreachable,
            LedgerAnswer::Confused => Health::Confused,
        };
        if self.ledger_health.replace(health) == health {
            return;
        }
        match health {
            Health::Answering => log::info!("paystile: the ledger answers again"),
            Health::Unreachable => log::warn!("paystile: ledger unavailable (status {status:?})"),
            Health::Confused => log::error!(
                "paystile: the ledger's answers are not a ledger's (status {status:?}): check ledger.upstream and ledger.gateway_key"
            ),
        }
    }
}

/// The parts of a request the gate reads, as raw bytes: clients may send anything.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestHead<'a> {
    pub method: &'a [u8],
    pub path: &'a [u8],
    pub authorization: Option<&'a [u8]>,
    pub idempotency_key: Option<&'a [u8]>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderEdit {
    Set(&'static str, String),
    Remove(&'static str),
}

/// A response the gateway sends itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalResponse {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl LocalResponse {
    /// The JSON error answer for `body`, with the headers its code calls for.
    pub fn error(body: &ErrorBody) -> LocalResponse {
        let mut headers = vec![(headers::CONTENT_TYPE, APPLICATION_JSON.to_owned())];
        match body.code.status() {
            402 => headers.push((headers::WWW_AUTHENTICATE, BEARER_CHALLENGE.to_owned())),
            401 => headers.push((headers::WWW_AUTHENTICATE, BEARER_INVALID.to_owned())),
            503 => headers.push((headers::RETRY_AFTER, RETRY_AFTER_SECONDS.to_owned())),
            _ => {}
        }
        LocalResponse { status: body.status(), headers, body: body.to_json() }
    }
}

/// A call to the ledger: `POST <path>` with a JSON body. The adapter adds the target,
/// the authority and the gateway key from the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerCall {
    pub path: &'static str,
    pub body: Vec<u8>,
}

/// What came back from a ledger call. `status` is `None` when there was no answer at all
/// (connection refused or reset).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LedgerReply {
    pub status: Option<u16>,
    pub body: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestAction {
    /// Send the request on upstream with these edits (resuming it if it was paused).
    Forward(Vec<HeaderEdit>),
    /// Call the ledger and pause the request until its reply.
    CallLedger(LedgerCall),
    /// Answer the client; the request goes no further.
    Respond(LocalResponse),
    /// Nothing to do (a callback in a state that expects none).
    Nothing,
}

/// What to do when the upstream's response headers arrive.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResponseStep {
    pub edits: Vec<HeaderEdit>,
    /// The hold's outcome, for the settle queue.
    pub settlement: Option<Settlement>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Charge {
    id: String,
    amount: Usdc,
    remaining: Usdc,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
enum State {
    #[default]
    New,
    /// Goes through without a charge: an unpriced route, or a priced one let through while
    /// the ledger is unavailable (`failed_open`).
    Free {
        failed_open: bool,
    },
    AwaitingLedger,
    /// Forwarded with a hold, to be committed or released when the upstream answers.
    Held(Charge),
    /// Forwarded as a retry of a request already charged: report that charge, settle nothing.
    Replayed(Charge),
    /// Answered locally, or settled.
    Done,
}

/// One request's progress through the gate.
#[derive(Debug, Default)]
pub struct Exchange {
    state: State,
}

impl Exchange {
    /// The request's headers have arrived. `now` is Unix seconds.
    pub fn on_request_headers(
        &mut self,
        gate: &Gate,
        request: &RequestHead<'_>,
        now: u64,
    ) -> RequestAction {
        let config = gate.config();
        let Some(route) = config.route(request.method, request.path).filter(|r| !r.price.is_zero())
        else {
            self.state = State::Free { failed_open: false };
            // An upstream may trust X-Charge-Id as proof of payment: a client never sets it.
            return RequestAction::Forward(vec![HeaderEdit::Remove(headers::CHARGE_ID)]);
        };
        match reserve_request(config, request, route.price, now) {
            Ok(reserve) => {
                self.state = State::AwaitingLedger;
                // Serializing strings, integers and amounts cannot fail.
                let body = serde_json::to_vec(&reserve).unwrap_or_default();
                RequestAction::CallLedger(LedgerCall { path: path::HOLDS, body })
            }
            Err(refusal) => self.respond(&refusal),
        }
    }

    /// The ledger answered the reserve call (or could not be reached).
    pub fn on_ledger_reply(&mut self, gate: &Gate, reply: LedgerReply) -> RequestAction {
        if self.state != State::AwaitingLedger {
            return RequestAction::Nothing;
        }
        let answer = LedgerAnswer::read(&reply);
        gate.note_ledger(&answer, reply.status);
        match answer {
            LedgerAnswer::Hold(hold) => {
                let edits = vec![
                    HeaderEdit::Remove(headers::AUTHORIZATION),
                    HeaderEdit::Set(headers::CHARGE_ID, hold.charge_id.clone()),
                ];
                let charge = Charge {
                    id: hold.charge_id,
                    amount: hold.amount_usdc,
                    remaining: hold.remaining_usdc,
                };
                self.state =
                    if hold.replayed { State::Replayed(charge) } else { State::Held(charge) };
                RequestAction::Forward(edits)
            }
            LedgerAnswer::Refusal(refusal) => self.respond(&refusal),
            LedgerAnswer::Unreachable if gate.config().failure_mode == FailureMode::Open => {
                self.state = State::Free { failed_open: true };
                RequestAction::Forward(vec![
                    HeaderEdit::Remove(headers::AUTHORIZATION),
                    HeaderEdit::Remove(headers::CHARGE_ID),
                ])
            }
            // A ledger that answers nonsense (a wrong gateway key, say) is a misconfiguration:
            // failing open there would give every call away, so it always fails closed.
            LedgerAnswer::Unreachable | LedgerAnswer::Confused => {
                self.respond(&ErrorBody::new(ErrorCode::LedgerUnavailable))
            }
        }
    }

    /// Whether the response's status matters: only when a charge must be settled or
    /// reported, or a priced call went through unpaid. The host may skip reading it otherwise.
    pub fn awaits_response(&self) -> bool {
        matches!(
            self.state,
            State::Held(_) | State::Replayed(_) | State::Free { failed_open: true }
        )
    }

    /// The response's headers have arrived with `status` (`None` if unreadable), whether
    /// from the upstream or generated by the gateway (an upstream timeout, say).
    pub fn on_response_headers(&mut self, gate: &Gate, status: Option<u16>) -> ResponseStep {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Held(charge) => {
                let billable = status.is_some_and(|s| gate.config().billable.contains(s));
                let outcome = if billable { Outcome::Commit } else { Outcome::Release };
                let edits = if billable { charged(&charge) } else { unbilled() };
                ResponseStep {
                    edits,
                    settlement: Some(Settlement {
                        charge_id: charge.id,
                        outcome,
                        upstream_status: status,
                    }),
                }
            }
            State::Replayed(charge) => ResponseStep { edits: charged(&charge), settlement: None },
            State::Free { failed_open: true } => {
                ResponseStep { edits: unbilled(), settlement: None }
            }
            State::Free { failed_open: false } => {
                self.state = State::Free { failed_open: false };
                ResponseStep::default()
            }
            other => {
                self.state = other;
                ResponseStep::default()
            }
        }
    }

    /// The stream has ended. A hold whose response never came (client gone, stream reset)
    /// is released: the buyer never pays for a call whose outcome was not seen.
    pub fn on_end(&mut self) -> Option<Settlement> {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Held(charge) => Some(Settlement {
                charge_id: charge.id,
                outcome: Outcome::Release,
                upstream_status: None,
            }),
            _ => None,
        }
    }

    fn respond(&mut self, refusal: &ErrorBody) -> RequestAction {
        self.state = State::Done;
        RequestAction::Respond(LocalResponse::error(refusal))
    }
}

/// Everything that can be checked without the ledger, inline; the reserve call if it passes.
fn reserve_request(
    config: &Config,
    request: &RequestHead<'_>,
    price: Usdc,
    now: u64,
) -> Result<ReserveRequest, ErrorBody> {
    let token = match request.authorization.map(credential::parse_authorization) {
        None | Some(Ok(None)) => {
            return Err(ErrorBody::payment_required(&config.service_id, price, SCHEMES));
        }
        Some(Err(_)) => return Err(ErrorBody::new(ErrorCode::InvalidCredential)),
        Some(Ok(Some(Credential::Bearer(token)))) => token,
    };
    let claims =
        pay_token::verify(token, &config.keys, &config.validation, now).map_err(|e| match e {
            PayTokenError::Expired | PayTokenError::NotYetValid => {
                ErrorBody::new(ErrorCode::TokenExpired)
            }
            other => ErrorBody::with_message(
                ErrorCode::InvalidCredential,
                format!("Invalid credential: {other}"),
            ),
        })?;
    if !claims.allows_service(&config.service_id) {
        return Err(ErrorBody::new(ErrorCode::WrongService));
    }
    let idempotency = match request.idempotency_key {
        None => None,
        Some(raw) => {
            let key = headers::idempotency_key(raw)
                .ok_or_else(|| ErrorBody::new(ErrorCode::InvalidIdempotencyKey))?;
            Some(Idempotency { key: key.to_owned(), fingerprint: fingerprint(config, request) })
        }
    };
    Ok(ReserveRequest {
        token: TokenGrant::from(&claims),
        service_id: config.service_id.clone(),
        price_usdc: price,
        idempotency,
    })
}

/// What a reserve call's reply means.
enum LedgerAnswer {
    Hold(Hold),
    /// A refusal to pass on to the client.
    Refusal(ErrorBody),
    /// No answer, a timeout or a server error: the ledger may be down or overloaded.
    Unreachable,
    /// An answer that is none of ours: a misconfigured ledger or route.
    Confused,
}

impl LedgerAnswer {
    fn read(reply: &LedgerReply) -> LedgerAnswer {
        match reply.status {
            // Envoy reports a refused connection or a timeout as its own 503 or 504.
            None | Some(500..) => LedgerAnswer::Unreachable,
            Some(200) => match serde_json::from_slice::<Hold>(&reply.body) {
                Ok(hold) if is_charge_id(&hold.charge_id) => LedgerAnswer::Hold(hold),
                _ => LedgerAnswer::Confused,
            },
            Some(status) => match serde_json::from_slice::<ErrorBody>(&reply.body) {
                Ok(refusal) if is_ledger_refusal(refusal.code) && refusal.status() == status => {
                    LedgerAnswer::Refusal(refusal)
                }
                _ => LedgerAnswer::Confused,
            },
        }
    }
}

/// Charge ids go into headers: 1 to 64 characters of `[A-Za-z0-9_-]` (the ledger's are
/// `ch_` and 32 hex digits).
fn is_charge_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The refusals the ledger may answer a reserve with, which the gateway passes on.
fn is_ledger_refusal(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::TokenRevoked
            | ErrorCode::WrongService
            | ErrorCode::IdempotencyKeyExhausted
            | ErrorCode::TokenLimitExceeded
            | ErrorCode::InsufficientBalance
            | ErrorCode::DailyLimitExceeded
            | ErrorCode::IdempotencyKeyMismatch
            | ErrorCode::IdempotencyKeyInUse
    )
}

fn charged(charge: &Charge) -> Vec<HeaderEdit> {
    vec![
        HeaderEdit::Set(headers::CHARGE_ID, charge.id.clone()),
        HeaderEdit::Set(headers::AMOUNT_USDC, charge.amount.to_string()),
        HeaderEdit::Set(headers::REMAINING_USDC, charge.remaining.to_string()),
    ]
}

fn unbilled() -> Vec<HeaderEdit> {
    vec![
        HeaderEdit::Set(headers::AMOUNT_USDC, Usdc::ZERO.to_string()),
        HeaderEdit::Remove(headers::CHARGE_ID),
        HeaderEdit::Remove(headers::REMAINING_USDC),
    ]
}

/// What makes two requests "the same" under one Idempotency-Key: service, method and path
/// (with its query). The body is not read: the filter never buffers it.
fn fingerprint(config: &Config, request: &RequestHead<'_>) -> String {
    let mut hash = Sha256::new();
    for part in [config.service_id.as_bytes(), request.method, request.path] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    hex::encode(hash.finalize())
}
