//! The filter's decisions for one request, as a plain state machine.
//!
//! The proxy-wasm adapter feeds an [`Exchange`] what the host reports (request headers, the
//! ledger's reply, the response status, the end of the stream) and carries out the action
//! it answers. Nothing here calls a host, so every path runs in native tests.
//!
//! ```text
//!  New ──unpriced──▶ Free ──────────────────────────────▶ (untouched)
//!   │ bad credential ──▶ Done (401/403 answered locally)
//!   │ no credential ──▶ Done (402, with a pooled L402 challenge if L402 is on)
//!   │               └──▶ AwaitingChallenge (L402 on, pool empty) ──▶ Done (402; 503 when
//!   │                    no L402 challenge can be minted and Pay Tokens are off)
//!   ├─valid credential, a prefetched hold for it ──▶ Held (at once, no ledger call)
//!   └─valid credential──▶ AwaitingLedger ─held──▶ Held ──response──▶ Done + commit|release
//!                          │ replay ──▶ Replayed ──response──▶ Done (original charge)
//!                          │ refused ──▶ Done (402/409/422)
//!                          │ L402 budget gone ──▶ AwaitingChallenge
//!                          └ unreachable ──▶ Done (503) | Free (fail open)
//! ```

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use paystile_protocol::credential::{self, Scheme, Verified};
use paystile_protocol::headers;
use paystile_protocol::l402::Capability;
use paystile_protocol::ledger_api::{
    Hold, Idempotency, L402Challenge, Outcome, ReserveRequest, Settlement, TopUp, TopUpRequest,
    path,
};
use paystile_protocol::verified::VerifiedCache;
use paystile_protocol::x402;
use paystile_protocol::{ErrorBody, ErrorCode, Usdc};
use sha2::{Digest, Sha256};

use crate::answer::{self, HeaderEdit, LocalResponse, X402Ask};
use crate::config::{Config, FailureMode};
use crate::ledger::{
    Health, LedgerAnswer, LedgerCall, LedgerReply, is_about_the_key, is_charge_id,
};
use crate::pool::{self, ChallengePool, Refill, RefillOutcome};
use crate::prefetch::{Entry, PoolKey, Prefetched};
use crate::routes::X402Terms;
use crate::routes::{Metered, Route};
use crate::settle::Queued;

/// Credentials kept verified per VM (as Envoy's `jwt_authn` keeps its verified tokens).
pub const VERIFIED_CAPACITY: usize = 1024;

/// Per-VM state shared by every request: the configuration, how the ledger answered last
/// time (so that an outage is logged when it starts and ends, not once per call), the
/// holds prefetched for hot tokens, the L402 challenges minted ahead for this
/// configuration's offer, and the credentials verified under this configuration.
pub struct Gate {
    config: Config,
    ledger_health: Cell<Health>,
    prefetched: Rc<RefCell<Prefetched>>,
    challenges: RefCell<ChallengePool>,
    verified: RefCell<VerifiedCache>,
}

impl Gate {
    pub fn new(config: Config) -> Gate {
        Gate::sharing(config, Rc::default())
    }

    /// A gate whose prefetched holds live in `prefetched`: the VM's, which outlives a
    /// reconfiguration (the holds of the old configuration are released at their age).
    /// Challenges are the configuration's own: its offer made them.
    pub fn sharing(config: Config, prefetched: Rc<RefCell<Prefetched>>) -> Gate {
        let challenges = match &config.l402 {
            Some(l402) => ChallengePool::new(l402.pool_capacity, l402.pool_max_age),
            None => ChallengePool::new(0, 0),
        };
        Gate {
            config,
            ledger_health: Cell::new(Health::Answering),
            prefetched,
            challenges: RefCell::new(challenges),
            verified: RefCell::new(VerifiedCache::new(VERIFIED_CAPACITY)),
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The route that prices a request of `method` to `path`, if any: only then does the
    /// gate need the request's credential, its Idempotency-Key and the clock.
    pub fn priced_route(&self, method: &[u8], path: &[u8]) -> Option<&Route> {
        self.config.route(method, path).filter(|route| !route.price.is_zero())
    }

    /// Whether a request to `path` (its query aside) is a top-up ([`Config::top_up`]).
    pub fn is_top_up(&self, path: &[u8]) -> bool {
        let path = path.split(|b| *b == b'?').next().unwrap_or_default();
        self.config.top_up.as_ref().is_some_and(|top_up| top_up.path.as_bytes() == path)
    }

    /// The prefetched holds to release at `now_ms` (from the tick): those no call took
    /// within the maximum age, and those of tokens dropped since the last tick.
    pub fn prefetch_releases(&self, now_ms: u64) -> Vec<Queued> {
        self.prefetched.borrow_mut().releases(now_ms, self.config.ledger.prefetch_max_age_ms)
    }

    /// Prefetched holds waiting for a call.
    pub fn prefetched_waiting(&self) -> usize {
        self.prefetched.borrow().waiting()
    }

    /// Credentials kept verified.
    pub fn verified_credentials(&self) -> usize {
        self.verified.borrow().len()
    }

    /// How a call with a verified credential goes on: on a prefetched hold, or by a reserve.
    /// When the token is hot and its pool is down to half a batch with no refill on its way,
    /// this call's reserve asks for the next batch (`prefetch_holds` holds, its `count`), so
    /// that the calls after it find holds waiting while it is answered. Any other call that
    /// finds the pool empty reserves just its own hold.
    fn plan(&self, key: Option<PoolKey>, now_ms: u64) -> Plan {
        let Some(key) = key else { return Plan::Reserve(None) };
        let ledger = &self.config.ledger;
        let mut prefetched = self.prefetched.borrow_mut();
        // A cold token asks for one: occasional callers never lock more than a call's worth.
        let hot = prefetched.note_call(&key.token_id, now_ms, ledger.prefetch_max_age_ms);
        let low_water = usize::from(ledger.prefetch_holds / 2);
        if hot && prefetched.start_refill(&key, low_water, now_ms, ledger.timeout_ms()) {
            let count = ledger.prefetch_holds;
            return Plan::Reserve(Some(Prefetch { key, count, at_ms: now_ms }));
        }
        match prefetched.take(&key, now_ms, ledger.prefetch_max_age_ms) {
            Some(entry) => Plan::Take(entry),
            None => Plan::Reserve(None),
        }
    }

    /// The challenge pool's refill to send at `now_ms`, if it is due (from the root context's
    /// tick, and again after each refill's reply).
    pub fn next_refill(&self, now_ms: u64) -> Option<Refill> {
        let l402 = self.config.l402.as_ref()?;
        let timeout = self.config.ledger.timeout_ms();
        self.challenges.borrow_mut().next_refill(&l402.offer, now_ms, timeout)
    }

    /// The ledger's reply to refill `id`.
    pub fn on_refill_reply(&self, id: u64, reply: &LedgerReply, now_ms: u64) -> RefillOutcome {
        self.challenges.borrow_mut().on_reply(id, reply, now_ms)
    }

    /// Refill `id` could not be sent.
    pub fn on_refill_send_failed(&self, id: u64, now_ms: u64) {
        self.challenges.borrow_mut().on_send_failed(id, now_ms);
    }

    fn note_ledger(&self, health: Health, status: Option<u16>) {
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
    /// An x402 payment header's value and version (`PAYMENT-SIGNATURE` is v2, `X-PAYMENT`
    /// v1); the host reads them only when x402 is on.
    pub payment: Option<(&'a [u8], x402::Version)>,
    /// `:scheme` and `:authority`, for the resource an x402 offer names (x402 on only).
    pub scheme: Option<&'a [u8]>,
    pub authority: Option<&'a [u8]>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestAction {
    /// Send the request on upstream with these edits (resuming it if it was paused).
    Forward(Vec<HeaderEdit>),
    /// Call the ledger and pause the request until its reply.
    CallLedger(LedgerCall),
    /// Answer the client; the request goes no further.
    Respond(LocalResponse),
    /// Answer the client with what it bought (a top-up): not a refusal.
    Sell(LocalResponse),
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
    /// How to price a metered route's call once its usage is known; `amount` is its maximum.
    metered: Option<Metered>,
    /// The x402 payment it is paid with, for the answer's `PAYMENT-RESPONSE`.
    x402: Option<Box<X402Receipt>>,
}

/// What a billed x402 call's answer reports of its payment (settled once the call is
/// committed: the ledger's settlement job sends the transfer).
#[derive(Clone, Debug, PartialEq, Eq)]
struct X402Receipt {
    version: x402::Version,
    payer: String,
    network: String,
    amount: u64,
    /// The transfer's transaction, when it was settled before the call was served.
    transaction: Option<String>,
}

impl X402Receipt {
    fn of(verified: &Verified) -> Option<Box<X402Receipt>> {
        let paid = verified.x402.as_deref()?;
        Some(Box::new(X402Receipt {
            version: paid.payment.version,
            payer: paid.checked.payer.to_checksum(None),
            network: paid.network.clone(),
            amount: verified.token.limit_usdc.micros(),
            transaction: None,
        }))
    }

    /// `PAYMENT-RESPONSE` (v2) or `X-PAYMENT-RESPONSE` (v1): the transaction, when the
    /// transfer was settled before the call (`settle: before`). Otherwise it is sent once
    /// the call is answered (`settle: after`), so none is known yet: the answer says
    /// `settlement_pending`, and the charge id finds the transaction in the ledger's journal.
    fn header(&self) -> (&'static str, String) {
        let response = x402::SettleResponse {
            success: true,
            error_reason: match self.transaction {
                Some(_) => None,
                None => Some("settlement_pending".into()),
            },
            payer: Some(self.payer.clone()),
            transaction: self.transaction.clone().unwrap_or_default(),
            network: self.network.clone(),
            amount: Some(self.amount.to_string()),
        };
        let name = match self.version {
            x402::Version::V1 => headers::X_PAYMENT_RESPONSE,
            x402::Version::V2 => headers::PAYMENT_RESPONSE,
        };
        (name, response.header_value())
    }
}

/// A reserve sent to the ledger, with what its answer is read against.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Reserving {
    /// The credential's scheme: a spent L402 is answered with a fresh challenge.
    scheme: Scheme,
    /// The route's metering, if it is metered.
    metered: Option<Metered>,
    token_id: String,
    /// Where the reserve's extra holds go, when it is a pool's refill.
    prefetch: Option<Prefetch>,
    /// When the request came (Unix seconds).
    now: u64,
    x402: Option<Box<X402Receipt>>,
    /// Settled before it is served: such a call never goes through unpaid.
    settle_first: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
enum State {
    #[default]
    New,
    /// Goes through without a charge: an unpriced route, or a priced one let through while
    /// the ledger is unavailable (`failed_open`).
    Free { failed_open: bool },
    /// Waiting for the ledger's answer to a reserve.
    AwaitingLedger(Reserving),
    /// Waiting for the ledger to mint an L402 challenge to answer `refusal` (a 402) with: the
    /// pool had none.
    AwaitingChallenge(Box<ErrorBody>),
    /// Forwarded with a hold, to be committed or released when the upstream answers.
    Held(Charge),
    /// Forwarded as a retry of a request already charged: report that charge, settle nothing.
    Replayed(Charge),
    /// Waiting for the ledger's answer to a top-up paid with this payment.
    AwaitingTopUp(Box<X402Receipt>),
    /// Answered locally, or settled.
    Done,
}

enum Plan {
    /// Go on at once on this prefetched hold.
    Take(Entry),
    /// Reserve; `Some` when the reply's extra holds go to the pool.
    Reserve(Option<Prefetch>),
}

/// A reserve that may bring extra holds for the pool.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Prefetch {
    key: PoolKey,
    /// How many holds the reserve asked for.
    count: u16,
    /// When the request came (ms): the extra holds' age counts from then.
    at_ms: u64,
}

/// One request's progress through the gate.
#[derive(Debug, Default)]
pub struct Exchange {
    state: State,
    /// The token a hold was placed on, kept once the call is settled.
    token_id: Option<String>,
    /// What an x402 payment for this call must be, when x402 is offered for it: each 402
    /// the call is answered with carries the offer.
    x402: Option<Box<X402Ask>>,
}

impl Exchange {
    /// The request's headers have arrived. `now_ms` is Unix milliseconds.
    pub fn on_request_headers(
        &mut self,
        gate: &Gate,
        request: &RequestHead<'_>,
        now_ms: u64,
    ) -> RequestAction {
        match gate.priced_route(request.method, request.path) {
            Some(route) => self.on_priced_request(gate, route, request, now_ms),
            None => self.on_free_request(),
        }
    }

    /// A request no route prices goes on, free.
    pub fn on_free_request(&mut self) -> RequestAction {
        self.state = State::Free { failed_open: false };
        // An upstream may trust X-Charge-Id as proof of payment: a client never sets it.
        RequestAction::Forward(vec![HeaderEdit::Remove(headers::CHARGE_ID)])
    }

    /// A request `route` prices ([`Gate::priced_route`]); `now_ms` is Unix milliseconds.
    pub fn on_priced_request(
        &mut self,
        gate: &Gate,
        route: &Route,
        request: &RequestHead<'_>,
        now_ms: u64,
    ) -> RequestAction {
        let now = now_ms / 1000;
        let config = gate.config();
        self.x402 = answer::x402_ask(route, request);
        // An x402 payment is taken where x402 is offered; elsewhere `Authorization` is read.
        let presented: Option<Cow<'_, [u8]>> = match request.payment {
            Some((payment, version)) if self.x402.is_some() => {
                Some(Cow::Owned(credential::x402_presented(version, payment).into_bytes()))
            }
            // The x402 schemes are the gateway's way of presenting a payment header to the
            // ledger, never a client's `Authorization`: a client's is answered as none.
            _ => request
                .authorization
                .filter(|value| !value.trim_ascii_start().starts_with(b"x402v"))
                .map(Cow::Borrowed),
        };
        match check_inline(gate, presented.as_deref(), request, route, now) {
            Ok((verified, idempotency)) => {
                let token_id = verified.token.token_id.clone();
                let key = prefetch_key(config, route, &verified, idempotency.is_some());
                let prefetch = match gate.plan(key, now_ms) {
                    Plan::Take(entry) => {
                        let charge = Charge {
                            id: entry.charge_id,
                            amount: route.price,
                            remaining: entry.remaining,
                            metered: route.metered.clone(),
                            x402: None,
                        };
                        return self.hold(config, charge, token_id, false);
                    }
                    Plan::Reserve(prefetch) => prefetch,
                };
                // Only a call that goes to the ledger carries its credential there.
                let presented = presented.as_deref().unwrap_or_default();
                // `settle: before`: the ledger answers once the transfer is on chain.
                let settle_first = route.settle_before && verified.scheme == Scheme::X402;
                let settle_timeout = config.ledger.settle_first_timeout;
                let reserve = ReserveRequest {
                    // A verified credential is printable ASCII (the scheme's characters only).
                    credential: String::from_utf8_lossy(presented).into_owned().into(),
                    service_id: config.service_id.clone(),
                    price_usdc: route.price,
                    idempotency,
                    count: prefetch.as_ref().map_or(1, |p| p.count),
                    // Extras answered after the call to the ledger timed out would be
                    // dropped here and hold the token's budget at the ledger until their TTL.
                    extras_until_ms: prefetch
                        .as_ref()
                        .map(|_| now_ms.saturating_add(config.ledger.timeout_ms())),
                    settle_until_ms: settle_first.then(|| {
                        now_ms.saturating_add(
                            u64::try_from(settle_timeout.as_millis()).unwrap_or(u64::MAX),
                        )
                    }),
                };
                self.state = State::AwaitingLedger(Reserving {
                    scheme: verified.scheme,
                    metered: route.metered.clone(),
                    token_id,
                    prefetch,
                    now,
                    x402: X402Receipt::of(&verified),
                    settle_first,
                });
                // Serializing strings, integers and amounts cannot fail.
                let body = serde_json::to_vec(&reserve).unwrap_or_default();
                let timeout = settle_first.then_some(settle_timeout);
                RequestAction::CallLedger(LedgerCall { path: path::HOLDS, body, timeout })
            }
            Err(refusal) if refusal.code == ErrorCode::PaymentRequired => {
                self.challenge(gate, refusal, now)
            }
            Err(refusal) => self.respond(config, &refusal),
        }
    }

    /// A request to the top-up path ([`Gate::is_top_up`]): `?amount_usdc=<amount>` bought
    /// with an x402 payment of exactly that. Without a payment, the 402 offers it; with one
    /// checked inline, the ledger settles it, credits the payer and issues the Pay Token,
    /// which is the answer.
    pub fn on_top_up(
        &mut self,
        gate: &Gate,
        request: &RequestHead<'_>,
        now_ms: u64,
    ) -> RequestAction {
        let config = gate.config();
        let (Some(top_up), Some(rules)) = (&config.top_up, &config.verifier.x402) else {
            return self.on_free_request();
        };
        let amount = match top_up_amount(request.path) {
            Some(amount) if (top_up.min..=top_up.max).contains(&amount) => amount,
            _ => {
                let message = format!(
                    "amount_usdc must be given in the query, {} to {} USDC",
                    top_up.min, top_up.max
                );
                let refusal = ErrorBody::with_message(ErrorCode::BadRequest, message);
                return self.respond(config, &refusal);
            }
        };
        let no_resource = x402::Resource { url: String::new(), description: None, mime_type: None };
        let micros = amount.micros();
        let terms = Arc::new(X402Terms {
            v2: rules.offer.requirements(micros),
            v1: rules.offer.requirements_v1(micros, &no_resource),
        });
        self.x402 = Some(Box::new(X402Ask { terms, resource: answer::resource(request) }));
        let Some((payment, version)) = request.payment else {
            let refusal = ErrorBody::payment_required(&config.service_id, amount, &["x402"]);
            return self.respond(config, &refusal);
        };
        let presented = credential::x402_presented(version, payment);
        let target = credential::Target {
            service_id: &config.service_id,
            capability: Capability::Any,
            price: amount,
            now: now_ms / 1000,
        };
        let verified = match credential::verify(presented.as_bytes(), &config.verifier, &target) {
            Ok(verified) => verified,
            Err(refusal) => return self.respond(config, &refusal.to_body()),
        };
        let Some(receipt) = X402Receipt::of(&verified) else {
            return self.respond(config, &ErrorBody::new(ErrorCode::InvalidPayment));
        };
        let timeout = config.ledger.settle_first_timeout;
        let top_up = TopUpRequest {
            credential: presented.into(),
            service_id: config.service_id.clone(),
            amount_usdc: amount,
            settle_until_ms: Some(
                now_ms.saturating_add(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)),
            ),
        };
        self.state = State::AwaitingTopUp(receipt);
        // Serializing strings and amounts cannot fail.
        let body = serde_json::to_vec(&top_up).unwrap_or_default();
        RequestAction::CallLedger(LedgerCall {
            path: path::X402_TOP_UPS,
            body,
            timeout: Some(timeout),
        })
    }

    /// The ledger's answer to a top-up: the Pay Token bought, with the transaction in
    /// `PAYMENT-RESPONSE`, or the refusal (a 402 with the offer again).
    fn on_top_up_reply(
        &mut self,
        gate: &Gate,
        reply: &LedgerReply,
        receipt: X402Receipt,
    ) -> RequestAction {
        let config = gate.config();
        let answer = match reply.status {
            None | Some(500..) => Err(LedgerAnswer::Unreachable),
            Some(200) => serde_json::from_slice::<TopUp>(&reply.body)
                .map_err(|_| LedgerAnswer::Confused)
                .map(Ok),
            Some(status) => match serde_json::from_slice::<ErrorBody>(&reply.body) {
                Ok(refusal) if refusal.status() == status => Ok(Err(refusal)),
                _ => Err(LedgerAnswer::Confused),
            },
        };
        gate.note_ledger(
            match &answer {
                Ok(_) => Health::Answering,
                Err(answer) => answer.health(),
            },
            reply.status,
        );
        match answer {
            Ok(Ok(top_up)) => {
                self.state = State::Done;
                let receipt = X402Receipt { transaction: Some(top_up.transaction), ..receipt };
                let (name, value) = receipt.header();
                RequestAction::Sell(LocalResponse {
                    // Not a refusal: a sale is never counted as one.
                    code: ErrorCode::PaymentRequired,
                    status: 200,
                    headers: vec![
                        (headers::CONTENT_TYPE, headers::APPLICATION_JSON.to_owned()),
                        (name, value),
                    ],
                    body: reply.body.clone(),
                })
            }
            Ok(Err(refusal)) => self.respond(config, &refusal),
            // Nothing is sold without the ledger: never open.
            Err(_) => self.respond(config, &ErrorBody::new(ErrorCode::LedgerUnavailable)),
        }
    }

    /// The ledger answered (or could not be reached).
    pub fn on_ledger_reply(&mut self, gate: &Gate, reply: LedgerReply) -> RequestAction {
        match std::mem::replace(&mut self.state, State::Done) {
            State::AwaitingLedger(reserving) => self.on_hold_reply(gate, reply, reserving),
            State::AwaitingTopUp(receipt) => self.on_top_up_reply(gate, &reply, *receipt),
            State::AwaitingChallenge(refusal) => {
                let config = gate.config();
                let challenge = read_challenge(&reply);
                gate.note_ledger(
                    match &challenge {
                        Ok(_) => Health::Answering,
                        Err(answer) => answer.health(),
                    },
                    reply.status,
                );
                match challenge {
                    Ok((header, sandbox)) => {
                        let refusal = ErrorBody { sandbox, ..*refusal };
                        RequestAction::Respond(LocalResponse::payment_required(
                            config,
                            &refusal,
                            Some(header),
                            self.x402.as_deref(),
                        ))
                    }
                    // Without an L402 challenge, a Pay Token or x402 still pays: answer the 402
                    // with their challenges. With L402 alone the client cannot pay: retry shortly.
                    Err(_) if config.verifier.pay_token.is_some() || self.x402.is_some() => {
                        let schemes = refusal.schemes.iter().filter(|s| *s != "L402").cloned();
                        let refusal = ErrorBody { schemes: schemes.collect(), ..*refusal };
                        self.respond(config, &refusal)
                    }
                    Err(_) => self.respond(config, &ErrorBody::new(ErrorCode::LedgerUnavailable)),
                }
            }
            other => {
                self.state = other;
                RequestAction::Nothing
            }
        }
    }

    fn on_hold_reply(
        &mut self,
        gate: &Gate,
        reply: LedgerReply,
        reserving: Reserving,
    ) -> RequestAction {
        let Reserving { scheme, metered, token_id, prefetch, now, x402, settle_first } = reserving;
        let config = gate.config();
        let answer = LedgerAnswer::read(&reply);
        gate.note_ledger(answer.health(), reply.status);
        if let LedgerAnswer::Refusal(refusal) = &answer
            && config.ledger.prefetch_holds > 0
            && !is_about_the_key(refusal.code)
        {
            // The ledger refuses this token now: what this VM prefetched for it goes back.
            gate.prefetched.borrow_mut().drop_token(&token_id);
        }
        if let Some(prefetch) = &prefetch {
            gate.prefetched.borrow_mut().end_refill(&prefetch.key);
        }
        match answer {
            LedgerAnswer::Hold(hold) if gate.prefetched.borrow().is_revoked(&token_id) => {
                // Held before the revocation, read after this VM heard of it: the call must
                // not go on (its hold can no longer commit), and the holds go back.
                let mut prefetched = gate.prefetched.borrow_mut();
                let unused = hold.extra_charge_ids.into_iter().chain([hold.charge_id]);
                // A replayed charge was committed by an earlier call: nothing to give back.
                for charge_id in unused.filter(|_| !hold.replayed) {
                    prefetched.release_unused(&token_id, charge_id);
                }
                self.respond(config, &ErrorBody::new(ErrorCode::TokenRevoked))
            }
            LedgerAnswer::Hold(hold) => {
                if let Some(prefetch) = prefetch.filter(|_| !hold.replayed) {
                    let extras = extra_entries(&hold, &prefetch);
                    gate.prefetched.borrow_mut().add(prefetch.key, extras);
                }
                // Settled before it is served: the charge is committed, and the answer
                // reports the transaction.
                let settled = hold.transaction.is_some();
                let x402 = x402.map(|receipt| {
                    Box::new(X402Receipt { transaction: hold.transaction, ..*receipt })
                });
                let charge = Charge {
                    id: hold.charge_id,
                    amount: hold.amount_usdc,
                    remaining: hold.remaining_usdc,
                    metered,
                    x402,
                };
                self.hold(config, charge, token_id, hold.replayed || settled)
            }
            // A spent L402 is answered with the means to buy more.
            LedgerAnswer::Refusal(refusal)
                if scheme == Scheme::L402 && refusal.code == ErrorCode::TokenLimitExceeded =>
            {
                self.challenge(gate, refusal, now)
            }
            LedgerAnswer::Refusal(refusal) => self.respond(config, &refusal),
            LedgerAnswer::Unreachable
                if config.failure_mode == FailureMode::Open && !settle_first =>
            {
                self.state = State::Free { failed_open: true };
                let mut edits = credential_removals(config);
                edits.push(HeaderEdit::Remove(headers::CHARGE_ID));
                RequestAction::Forward(edits)
            }
            // A ledger that answers nonsense (a wrong gateway key, say) is a misconfiguration:
            // failing open there would give every call away, so it always fails closed.
            LedgerAnswer::Unreachable | LedgerAnswer::Confused => {
                self.respond(config, &ErrorBody::new(ErrorCode::LedgerUnavailable))
            }
        }
    }

    /// Forwards the request on `charge`, without its credential.
    fn hold(
        &mut self,
        config: &Config,
        charge: Charge,
        token_id: String,
        replayed: bool,
    ) -> RequestAction {
        let mut edits = credential_removals(config);
        edits.push(HeaderEdit::Set(headers::CHARGE_ID, charge.id.clone()));
        self.token_id = Some(token_id);
        self.state = if replayed { State::Replayed(charge) } else { State::Held(charge) };
        RequestAction::Forward(edits)
    }

    /// The token this call's hold is on, for the settle queue (which tells the gate when the
    /// ledger no longer commits that token's holds).
    pub fn token_id(&self) -> Option<&str> {
        self.token_id.as_deref()
    }

    /// Whether the response's status matters: only when a charge must be settled or
    /// reported, or a priced call went through unpaid. The host may skip reading it otherwise.
    pub fn awaits_response(&self) -> bool {
        matches!(
            self.state,
            State::Held(_) | State::Replayed(_) | State::Free { failed_open: true }
        )
    }

    /// The response header a metered call's usage is read from, once the call is held: the
    /// host hands its value to [`Exchange::on_response_headers`].
    pub fn units_header(&self) -> Option<&str> {
        match &self.state {
            State::Held(Charge { metered: Some(metered), .. }) => Some(&metered.units_header),
            _ => None,
        }
    }

    /// The response's headers have arrived with `status` (`None` if unreadable), whether
    /// from the upstream or generated by the gateway (an upstream timeout, say), and the
    /// value of the [`Exchange::units_header`], if asked for and present.
    pub fn on_response_headers(
        &mut self,
        gate: &Gate,
        status: Option<u16>,
        units: Option<&[u8]>,
    ) -> ResponseStep {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Held(charge) => {
                let billable = status.is_some_and(|s| gate.config().billable.contains(s));
                let settlement = |outcome, amount_usdc| Settlement {
                    charge_id: charge.id.clone(),
                    outcome,
                    upstream_status: status,
                    amount_usdc,
                };
                match (billable, &charge.metered) {
                    (false, _) => ResponseStep {
                        edits: unbilled(),
                        settlement: Some(settlement(Outcome::Release, None)),
                    },
                    (true, None) => ResponseStep {
                        edits: charged(&charge),
                        settlement: Some(settlement(Outcome::Commit, None)),
                    },
                    (true, Some(metered)) => match metered_cost(metered, charge.amount, units) {
                        Some(cost) if !cost.is_zero() => {
                            let unused = charge.amount.saturating_sub(cost);
                            let billed = Charge {
                                amount: cost,
                                // The unused part of the hold is the token's again.
                                remaining: charge
                                    .remaining
                                    .checked_add(unused)
                                    .unwrap_or(Usdc::MAX),
                                ..charge.clone()
                            };
                            ResponseStep {
                                edits: charged(&billed),
                                settlement: Some(settlement(Outcome::Commit, Some(cost))),
                            }
                        }
                        // Nothing used: nothing to charge (the ledger commits only amounts > 0).
                        Some(_) => ResponseStep {
                            edits: unbilled(),
                            settlement: Some(settlement(Outcome::Release, None)),
                        },
                        // Usage unknown: the buyer never pays for what was not measured.
                        None => {
                            log::warn!(
                                "paystile: no usable {} header on a metered response; the call is not charged",
                                metered.units_header
                            );
                            ResponseStep {
                                edits: unbilled(),
                                settlement: Some(settlement(Outcome::Release, None)),
                            }
                        }
                    },
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
                amount_usdc: None,
            }),
            _ => None,
        }
    }

    fn respond(&mut self, config: &Config, refusal: &ErrorBody) -> RequestAction {
        self.state = State::Done;
        RequestAction::Respond(if refusal.status() == 402 {
            LocalResponse::payment_required(config, refusal, None, self.x402.as_deref())
        } else {
            LocalResponse::error(refusal)
        })
    }

    /// Answers `refusal` (a 402) with the challenges of every scheme that is on. L402's
    /// comes from the pool, or when it has none is minted by the ledger for this request.
    fn challenge(&mut self, gate: &Gate, refusal: ErrorBody, now: u64) -> RequestAction {
        let config = gate.config();
        let Some(l402) = &config.l402 else { return self.respond(config, &refusal) };
        if let Some(pooled) = gate.challenges.borrow_mut().take(now) {
            self.state = State::Done;
            let refusal = ErrorBody { sandbox: pooled.sandbox, ..refusal };
            return RequestAction::Respond(LocalResponse::payment_required(
                config,
                &refusal,
                Some(pooled.header),
                self.x402.as_deref(),
            ));
        }
        self.state = State::AwaitingChallenge(Box::new(refusal));
        RequestAction::CallLedger(LedgerCall {
            path: path::L402_CHALLENGES,
            body: l402.challenge_body.clone(),
            timeout: None,
        })
    }
}

/// Everything that can be checked without the ledger, inline: what the credential proves,
/// and the Idempotency-Key. A refusal with `payment_required` calls for a challenge.
fn check_inline(
    gate: &Gate,
    presented: Option<&[u8]>,
    request: &RequestHead<'_>,
    route: &Route,
    now: u64,
) -> Result<(Arc<Verified>, Option<Idempotency>), ErrorBody> {
    let config = gate.config();
    let payment_required = || answer::payment_required(config, route);
    let Some(presented) = presented else { return Err(payment_required()) };
    let capability = Capability::Route(route.capability.as_deref());
    let cached = gate.verified.borrow().get(presented, capability, now).cloned();
    let verified = match cached {
        Some(verified) => verified,
        None => {
            let target = credential::Target {
                service_id: &config.service_id,
                capability,
                price: route.price,
                now,
            };
            let verified =
                credential::verify(presented, &config.verifier, &target).map_err(|refusal| {
                    match refusal {
                        credential::Refusal::NotOffered => payment_required(),
                        refusal => refusal.to_body(),
                    }
                })?;
            let verified = Arc::new(verified);
            // An x402 payment pays for one call: it is never presented again to any use.
            if verified.scheme != Scheme::X402 {
                gate.verified.borrow_mut().insert(presented, verified.clone(), now);
            }
            verified
        }
    };
    let idempotency = match request.idempotency_key {
        None => None,
        Some(raw) => {
            let key = headers::idempotency_key(raw)
                .ok_or_else(|| ErrorBody::new(ErrorCode::InvalidIdempotencyKey))?;
            Some(Idempotency { key: key.to_owned(), fingerprint: fingerprint(config, request) })
        }
    };
    Ok((verified, idempotency))
}

/// The pool a reserve's call may be served from, when prefetching is on. Idempotent calls
/// never are: the ledger must see each key.
fn prefetch_key(
    config: &Config,
    route: &Route,
    verified: &Verified,
    idempotent: bool,
) -> Option<PoolKey> {
    let reusable = verified.scheme != Scheme::X402;
    (config.ledger.prefetch_holds > 0 && !idempotent && reusable).then(|| PoolKey {
        token_id: verified.token.token_id.clone(),
        service_id: config.service_id.clone(),
        amount: route.price,
        cap: verified.cap,
    })
}

/// The extra holds of `hold` worth keeping: of the amount asked, no more than asked for,
/// each with an id fit for a header. Others (none from a sound ledger) expire on the ledger.
fn extra_entries(hold: &Hold, prefetch: &Prefetch) -> Vec<Entry> {
    if hold.amount_usdc != prefetch.key.amount {
        return Vec::new();
    }
    let wanted = usize::from(prefetch.count.saturating_sub(1));
    hold.extra_charge_ids
        .iter()
        .filter(|id| is_charge_id(id) && **id != hold.charge_id)
        .take(wanted)
        .map(|id| Entry {
            charge_id: id.clone(),
            remaining: hold.remaining_usdc,
            reserved_at_ms: prefetch.at_ms,
        })
        .collect()
}

/// A challenge-minting call's reply: the challenge's header value and whether it is a
/// sandbox one, or why there is none.
fn read_challenge(reply: &LedgerReply) -> Result<(String, bool), LedgerAnswer> {
    match reply.status {
        None | Some(500..) => Err(LedgerAnswer::Unreachable),
        Some(200) => serde_json::from_slice::<L402Challenge>(&reply.body)
            .ok()
            .and_then(|challenge| Some((pool::header_value(&challenge)?, challenge.sandbox)))
            .ok_or(LedgerAnswer::Confused),
        Some(_) => Err(LedgerAnswer::Confused),
    }
}

fn charged(charge: &Charge) -> Vec<HeaderEdit> {
    let mut edits = vec![
        HeaderEdit::Set(headers::CHARGE_ID, charge.id.clone()),
        HeaderEdit::Set(headers::AMOUNT_USDC, charge.amount.to_string()),
        HeaderEdit::Set(headers::REMAINING_USDC, charge.remaining.to_string()),
    ];
    if let Some(receipt) = &charge.x402 {
        let (name, value) = receipt.header();
        edits.push(HeaderEdit::Set(name, value));
    }
    edits
}

/// The headers that carry credentials, removed before the upstream: `Authorization`, and
/// the x402 payment headers when x402 is on.
fn credential_removals(config: &Config) -> Vec<HeaderEdit> {
    let mut edits = vec![HeaderEdit::Remove(headers::AUTHORIZATION)];
    if config.verifier.x402.is_some() {
        edits.push(HeaderEdit::Remove(headers::PAYMENT_SIGNATURE));
        edits.push(HeaderEdit::Remove(headers::X_PAYMENT));
    }
    edits
}

/// What a metered call costs for the `units` header's value: `None` when the header is
/// missing or not a whole number. Digits only, with optional surrounding whitespace; a count
/// beyond 64 bits is well-formed and costs the maximum.
fn metered_cost(metered: &Metered, max: Usdc, units: Option<&[u8]>) -> Option<Usdc> {
    let units = units?.trim_ascii();
    if units.is_empty() || !units.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let count = units.iter().try_fold(0u64, |count, digit| {
        count.checked_mul(10).and_then(|c| c.checked_add(u64::from(digit - b'0')))
    });
    Some(metered.unit_price.cost(count.unwrap_or(u64::MAX), max))
}

/// A top-up's `amount_usdc` query parameter, if it reads as an amount.
fn top_up_amount(path: &[u8]) -> Option<Usdc> {
    let query = path.splitn(2, |b| *b == b'?').nth(1)?;
    query.split(|b| *b == b'&').find_map(|pair| {
        let value = pair.strip_prefix(b"amount_usdc=")?;
        core::str::from_utf8(value).ok()?.parse().ok()
    })
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
