//! The proxy-wasm adapter: host callbacks in, gate actions out.
//!
//! Host-facing rules (see `shared/reference/proxy-wasm-hosts.md`):
//! - untrusted headers are read with the `*_bytes` getters: the SDK's `String` getters
//!   panic on non-UTF-8 values, and a panic kills the VM for every request on the worker;
//! - nothing here calls `get_log_level`, gRPC or `get_status` (they trap on Kong), nor
//!   `done` except after the host called `on_done` on the root (which Kong never does);
//! - commits and releases, and the refills of the L402 challenge pool, are dispatched from
//!   the root context's tick (or the reply to the previous one), never while response
//!   headers are processed (Kong cannot dispatch there).

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use paystile_protocol::ledger_api::Outcome;
use paystile_protocol::ledger_api::Settlement;
use paystile_protocol::{ErrorBody, ErrorCode};
use paystile_protocol::{headers, x402};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};

use crate::answer::{HeaderEdit, LocalResponse};
use crate::config::Config;
use crate::gate::{Exchange, Gate, RequestAction, RequestHead};
use crate::ledger::{LedgerCall, LedgerReply, LedgerTarget};
use crate::ledgers::{Books, Ledgers};
use crate::metrics::{self, Counter, Gauge};
use crate::pool::RefillOutcome;
use crate::settle::{Answered, BatchOutcome, Queued};
use crate::watch::{Heard, POLL_TIMEOUT_MS};

/// A ledger reply larger than this is not a reply of ours; it is read as no reply.
const MAX_REPLY_BYTES: usize = 64 * 1024;
/// The same for a batch of challenges: 256 of them at up to 4 KiB each.
const MAX_REFILL_REPLY_BYTES: usize = 1024 * 1024;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| Box::new(Root::new()));
}}

thread_local! {
    /// The VM's settle queues and prefetched holds, per ledger, shared by every root
    /// context (see `ledgers`).
    static LEDGERS: RefCell<Ledgers> = RefCell::default();
    /// The VM's metric ids, once a configuration with metrics on has defined them.
    static METRICS: RefCell<Option<MetricIds>> = const { RefCell::new(None) };
    /// The VM's name to the ledgers it watches: random, so that every worker's VM (and a
    /// restarted one) is told apart.
    static WATCHER: String = watcher_name();
}

/// `vm-` and 64 random bits in hex (from WASI's `random_get`); a host without randomness
/// gets the host's clock in nanoseconds instead, which still tells its VMs apart.
fn watcher_name() -> String {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        let now = hostcalls::get_current_time().map(since_epoch).unwrap_or_default();
        bytes = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX).to_le_bytes();
    }
    format!("vm-{}", hex::encode(bytes))
}

/// The host's ids of the VM's metrics (see `metrics`).
struct MetricIds {
    counters: Vec<(Counter, u32)>,
    gauges: Vec<(Gauge, u32)>,
}

impl MetricIds {
    /// Defines every metric. The SDK's `define_metric` panics on a status other than OK:
    /// hosts that have the call answer OK (Envoy, Kong 3.8+); Kong 3.4 to 3.7 trap on it,
    /// which is why a configuration can turn metrics off.
    fn define() -> MetricIds {
        let counters = Counter::all()
            .into_iter()
            .filter_map(|c| {
                Some((c, hostcalls::define_metric(MetricType::Counter, &c.name()).ok()?))
            })
            .collect();
        let gauges = Gauge::ALL
            .into_iter()
            .filter_map(|g| Some((g, hostcalls::define_metric(MetricType::Gauge, g.name()).ok()?)))
            .collect();
        MetricIds { counters, gauges }
    }
}

/// Adds `by` to `counter`, if metrics are on.
fn count(counter: Counter, by: usize) {
    if by == 0 {
        return;
    }
    METRICS.with(|metrics| {
        let metrics = metrics.borrow();
        let id = metrics.as_ref().and_then(|m| m.counters.iter().find(|(c, _)| *c == counter));
        if let Some((_, id)) = id {
            let _ = hostcalls::increment_metric(*id, i64::try_from(by).unwrap_or(i64::MAX));
        }
    });
}

/// Sets `gauge`, if metrics are on.
fn record(gauge: Gauge, value: usize) {
    METRICS.with(|metrics| {
        let metrics = metrics.borrow();
        let id = metrics.as_ref().and_then(|m| m.gauges.iter().find(|(g, _)| *g == gauge));
        if let Some((_, id)) = id {
            let _ = hostcalls::record_metric(*id, u64::try_from(value).unwrap_or(u64::MAX));
        }
    });
}

/// Counts the prefetched holds `books` added and those gone since the last report: summed
/// over the workers' VMs, their difference is what waits in pools (scripts/drain-gateway
/// waits for it to be 0; a gauge would show one VM's value only).
fn report_prefetched(books: &Books) {
    let (entered, waiting) = {
        let prefetched = books.prefetched.borrow();
        (prefetched.entered(), u64::try_from(prefetched.waiting()).unwrap_or(u64::MAX))
    };
    let now = (entered, entered.saturating_sub(waiting));
    let (added, gone) = books.prefetch_reported.replace(now);
    let delta = |total: u64, reported: u64| usize::try_from(total.saturating_sub(reported));
    count(Counter::PrefetchAdded, delta(now.0, added).unwrap_or(usize::MAX));
    count(Counter::PrefetchGone, delta(now.1, gone).unwrap_or(usize::MAX));
}

/// [`report_prefetched`] for every ledger's books.
fn report_all_prefetched() {
    for books in LEDGERS.with(|ledgers| ledgers.borrow().all()) {
        report_prefetched(&books);
    }
}

/// Counts a ledger call's answer that says the ledger is in trouble.
fn note_ledger(status: Option<u16>) {
    if let Some(counter) = metrics::ledger_trouble(status) {
        count(counter, 1);
    }
}

struct Root {
    gate: Option<Rc<Gate>>,
    /// The books of this configuration's ledger.
    books: Option<Rc<Books>>,
    /// The settle calls this root has in flight: dispatch token, whose books, batch id.
    settling: Vec<(u32, Rc<Books>, u64)>,
    /// The dispatch token and refill id of the challenge pool's refill in flight.
    refilling: Option<(u32, u64)>,
    /// The revocation polls this root has in flight: dispatch token, whose books, poll id.
    watching: Vec<(u32, Rc<Books>, u64)>,
    /// The tick period asked for. Kong traps on a second `set_tick_period` for one root
    /// context, so a reconfiguration asks again only if the interval changed.
    tick_period: Option<Duration>,
    /// Where the root is in its life: the host asks it to finish (`on_done`), it delivers
    /// what is queued, then says it is done, once.
    life: Life,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Life {
    Running,
    Finishing,
    Done,
}

impl Root {
    fn new() -> Root {
        Root {
            gate: None,
            books: None,
            settling: Vec::new(),
            refilling: None,
            watching: Vec::new(),
            tick_period: None,
            life: Life::Running,
        }
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        log::info!("paystile filter {} starting", env!("CARGO_PKG_VERSION"));
        true
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        let json = self.get_plugin_configuration().unwrap_or_default();
        match Config::from_json(&json) {
            Ok(config) => {
                log::info!(
                    "paystile: {} routes priced for service {}",
                    config.routes.len(),
                    config.service_id
                );
                if config.metrics {
                    METRICS.with(|metrics| {
                        metrics.borrow_mut().get_or_insert_with(MetricIds::define);
                    });
                }
                let period = config.ledger.settle_interval;
                if self.tick_period.replace(period) != Some(period) {
                    self.set_tick_period(period);
                }
                // The new gate has its own (empty) challenge pool: a refill in flight for
                // the old one is not awaited. Prefetched holds are the ledger's and stay.
                let books = LEDGERS.with(|ledgers| ledgers.borrow_mut().books(&config.ledger));
                self.gate = Some(Rc::new(Gate::sharing(config, books.prefetched.clone())));
                self.books = Some(books);
                self.refilling = None;
                true
            }
            Err(error) => {
                log::error!("paystile: configuration refused: {error}");
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let (Some(gate), Some(books)) = (self.gate.clone(), self.books.clone()) else { return };
        let now = millis(self.get_current_time());
        for release in gate.prefetch_releases(now) {
            push(&books, release);
        }
        // Every ledger's queue, this configuration's or not: a configuration that went away
        // may have left settlements behind.
        let (mut queued, mut prefetched) = (0, 0);
        for books in LEDGERS.with(|ledgers| ledgers.borrow().all()) {
            self.settle(&books, now, false);
            self.watch(&books, now);
            queued += books.queue.borrow().depth();
            prefetched += books.prefetched.borrow().waiting();
        }
        record(Gauge::SettleQueue, queued);
        record(Gauge::PrefetchedHolds, prefetched);
        report_all_prefetched();
        self.refill(&gate, now);
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            gate: self.gate.clone(),
            books: self.books.clone(),
            exchange: Exchange::default(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

impl Root {
    /// Sends `books`' next settle batch, if one is due (`last`: at once, backoff or not).
    fn settle(&mut self, books: &Rc<Books>, now: u64, last: bool) {
        let ledger = books.target();
        let timeout = ledger.timeout_ms();
        let batch = if last {
            books.queue.borrow_mut().last_batch(now, timeout)
        } else {
            books.queue.borrow_mut().next_batch(now, timeout)
        };
        let Some(batch) = batch else { return };
        match post(self, &ledger, &batch.call) {
            Some(token) => self.settling.push((token, books.clone(), batch.id)),
            None => books.queue.borrow_mut().on_send_failed(batch.id, now),
        }
    }

    fn on_settle_reply(&mut self, books: Rc<Books>, batch: u64, headers: usize, body: usize) {
        let reply = read_reply(self, headers, body, MAX_REPLY_BYTES);
        note_ledger(reply.status);
        let now = millis(self.get_current_time());
        let outcome = books.queue.borrow_mut().on_reply(batch, &reply, now);
        let answered = matches!(outcome, BatchOutcome::Answered(_));
        match outcome {
            BatchOutcome::Answered(answered) => report(&books, answered),
            BatchOutcome::Stray => {}
            BatchOutcome::Retrying { retry_in_ms } => {
                log::warn!(
                    "paystile: settling failed (status {:?}); retrying in {retry_in_ms} ms",
                    reply.status
                );
            }
            BatchOutcome::Dropped { settlements } => {
                count(Counter::SettleDropped, settlements);
                log::error!(
                    "paystile: the ledger refused a batch of {settlements} settlements as malformed; dropped"
                );
            }
        }
        match self.life {
            // A backlog goes on at once (a failed batch still waits for its backoff).
            Life::Running if books.queue.borrow().backlogged() => self.settle(&books, now, false),
            Life::Running | Life::Done => {}
            // What is left goes while the ledger answers; one that fails is not retried in
            // a loop while the VM goes away (those holds expire unpaid).
            Life::Finishing => {
                if answered {
                    self.settle(&books, now, true);
                }
                if self.settling.is_empty() {
                    self.life = Life::Done;
                    self.done();
                }
            }
        }
    }

    /// Sends `books`' next revocation poll, if its holds are prefetched and one is due.
    fn watch(&mut self, books: &Rc<Books>, now: u64) {
        let ledger = books.target();
        if ledger.prefetch_holds == 0 || self.life != Life::Running {
            return;
        }
        let poll = WATCHER.with(|watcher| books.watch.borrow_mut().next_poll(watcher, now));
        let Some(poll) = poll else { return };
        let timeout = Duration::from_millis(POLL_TIMEOUT_MS);
        match dispatch(self, &ledger, "GET", &poll.path, None, timeout) {
            Some(token) => self.watching.push((token, books.clone(), poll.id)),
            None => books.watch.borrow_mut().on_send_failed(poll.id, now),
        }
    }

    fn on_watch_reply(&mut self, books: Rc<Books>, poll: u64, headers: usize, body: usize) {
        let reply = read_reply(self, headers, body, MAX_REPLY_BYTES);
        let now = millis(self.get_current_time());
        match books.watch.borrow_mut().on_reply(poll, &reply, now) {
            Heard::Revoked { token_ids, all } => {
                let ledger = books.target();
                // A reserve answered before a revocation arrives within the call timeout.
                let remember = ledger.timeout_ms().saturating_add(ledger.prefetch_max_age_ms);
                let mut prefetched = books.prefetched.borrow_mut();
                if all {
                    prefetched.drop_all();
                }
                for token_id in &token_ids {
                    prefetched.revoke(token_id, now, remember);
                }
                if !token_ids.is_empty() {
                    log::info!(
                        "paystile: {} revoked tokens' prefetched holds dropped",
                        token_ids.len()
                    );
                }
            }
            Heard::Failed { retry_in_ms } => {
                note_ledger(reply.status);
                log::warn!(
                    "paystile: watching the ledger's revocations failed (status {:?}); again in {retry_in_ms} ms",
                    reply.status
                );
            }
            Heard::Stray => {}
        }
        // The next poll goes at once: it tells the ledger what this VM has applied.
        self.watch(&books, now);
    }

    /// Sends the challenge pool's refill, if one is due.
    fn refill(&mut self, gate: &Gate, now: u64) {
        let Some(refill) = gate.next_refill(now) else { return };
        match post(self, &gate.config().ledger, &refill.call) {
            Some(token) => self.refilling = Some((token, refill.id)),
            None => gate.on_refill_send_failed(refill.id, now),
        }
    }

    fn on_refill_reply(&mut self, id: u64, headers: usize, body_size: usize) {
        let Some(gate) = self.gate.clone() else { return };
        let reply = read_reply(self, headers, body_size, MAX_REFILL_REPLY_BYTES);
        note_ledger(reply.status);
        let now = millis(self.get_current_time());
        if let RefillOutcome::Failed { retry_in_ms } = gate.on_refill_reply(id, &reply, now) {
            log::warn!(
                "paystile: minting L402 challenges ahead failed (status {:?}); each 402 mints its own until a refill in {retry_in_ms} ms succeeds",
                reply.status
            );
        }
        // A burst may have taken the pool below half again while the refill was away.
        self.refill(&gate, now);
    }
}

impl Context for Root {
    /// The configuration goes away (a reload, its removal, the VM's end): whatever waits
    /// is sent at once, and the host is told `done` once the replies are in. Envoy calls
    /// this; Kong never does, and Envoy's SIGTERM stops the event loop without it (see the
    /// README's "Stopping a gateway").
    fn on_done(&mut self) -> bool {
        self.life = Life::Finishing;
        let now = millis(self.get_current_time());
        let waiting: usize = LEDGERS.with(|ledgers| {
            ledgers.borrow().all().iter().map(|books| books.queue.borrow().depth()).sum()
        });
        log::info!("paystile: the configuration is going away; delivering {waiting} settlements");
        for books in LEDGERS.with(|ledgers| ledgers.borrow().all()) {
            // Prefetched holds no call will take go back with the rest, not at their TTL.
            let unused = {
                let mut prefetched = books.prefetched.borrow_mut();
                prefetched.drop_all();
                prefetched.releases(now, books.target().prefetch_max_age_ms)
            };
            for release in unused {
                push(&books, release);
            }
            report_prefetched(&books);
            self.settle(&books, now, true);
        }
        if self.settling.is_empty() {
            self.life = Life::Done;
        }
        self.life == Life::Done
    }

    fn on_http_call_response(
        &mut self,
        token: u32,
        headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        if let Some((_, id)) = self.refilling.take_if(|(sent, _)| *sent == token) {
            self.on_refill_reply(id, headers, body_size);
            return;
        }
        if let Some(at) = self.settling.iter().position(|(sent, _, _)| *sent == token) {
            let (_, books, batch) = self.settling.swap_remove(at);
            self.on_settle_reply(books, batch, headers, body_size);
        } else if let Some(at) = self.watching.iter().position(|(sent, _, _)| *sent == token) {
            let (_, books, poll) = self.watching.swap_remove(at);
            self.on_watch_reply(books, poll, headers, body_size);
        }
        report_all_prefetched();
    }
}

/// Logs what a settle answer says beyond "settled", and forgets the prefetched holds of
/// tokens the ledger no longer commits.
fn report(books: &Books, answered: Answered) {
    count(Counter::SettleAnswered, answered.settled);
    count(Counter::SettleDropped, answered.invalid.len());
    if answered.unsettled > 0 {
        log::warn!(
            "paystile: {} of {} settlements found their hold expired, revoked or unknown",
            answered.unsettled,
            answered.settled
        );
    }
    for (charge_id, reason) in &answered.invalid {
        log::error!(
            "paystile: the ledger refused the settlement of {charge_id}: {reason}; dropped"
        );
    }
    let mut prefetched = books.prefetched.borrow_mut();
    for token_id in &answered.lost_tokens {
        prefetched.drop_token(token_id);
    }
}

struct Stream {
    gate: Option<Rc<Gate>>,
    books: Option<Rc<Books>>,
    exchange: Exchange,
}

impl Stream {
    /// Carries out `action`; `paused` says whether the request is waiting for us.
    fn perform(&mut self, gate: &Gate, action: RequestAction, paused: bool) -> Action {
        match action {
            RequestAction::Forward(edits) => {
                for edit in edits {
                    match edit {
                        HeaderEdit::Set(name, value) => {
                            self.set_http_request_header(name, Some(&value))
                        }
                        HeaderEdit::Remove(name) => self.remove_http_request_header(name),
                    }
                }
                if paused {
                    self.resume_http_request();
                }
                Action::Continue
            }
            RequestAction::CallLedger(call) => match post(self, &gate.config().ledger, &call) {
                Some(_) => Action::Pause,
                None => {
                    let action = self.exchange.on_ledger_reply(gate, LedgerReply::default());
                    self.perform(gate, action, paused)
                }
            },
            RequestAction::Respond(response) => {
                self.respond(response);
                Action::Pause
            }
            RequestAction::Sell(response) => {
                let headers =
                    response.headers.iter().map(|(name, value)| (*name, value.as_str())).collect();
                self.send_http_response(u32::from(response.status), headers, Some(&response.body));
                Action::Pause
            }
            RequestAction::Nothing => Action::Continue,
        }
    }

    fn settle(&self, settlement: Settlement) {
        count(
            match settlement.outcome {
                Outcome::Commit => Counter::Paid,
                Outcome::Release => Counter::Released,
            },
            1,
        );
        let token_id = self.exchange.token_id().unwrap_or_default().to_owned();
        if let Some(books) = &self.books {
            push(books, Queued { settlement, token_id });
        }
    }

    fn respond(&self, response: LocalResponse) {
        count(Counter::Refused(response.code), 1);
        let headers =
            response.headers.iter().map(|(name, value)| (*name, value.as_str())).collect();
        self.send_http_response(u32::from(response.status), headers, Some(&response.body));
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let Some(gate) = self.gate.clone() else {
            // Hosts only create streams once the configuration is accepted; if one ever
            // is created without it, fail closed.
            self.respond(LocalResponse::error(&ErrorBody::new(ErrorCode::LedgerUnavailable)));
            return Action::Pause;
        };
        let method = self.get_http_request_header_bytes(":method").unwrap_or_default();
        let path = self.get_http_request_header_bytes(":path").unwrap_or_default();
        // A free route needs neither the credential nor the clock: each read is a host call.
        let top_up = gate.is_top_up(&path);
        let action = match gate.priced_route(&method, &path).filter(|_| !top_up) {
            None if !top_up => self.exchange.on_free_request(),
            route => {
                let authorization = self.get_http_request_header_bytes(headers::AUTHORIZATION);
                let idempotency_key = self.get_http_request_header_bytes(headers::IDEMPOTENCY_KEY);
                // x402's headers only where it is on: each read is a host call.
                let x402 = gate.config().verifier.x402.is_some();
                let read =
                    |name| if x402 { self.get_http_request_header_bytes(name) } else { None };
                let payment = read(headers::PAYMENT_SIGNATURE)
                    .map(|value| (value, x402::Version::V2))
                    .or_else(|| read(headers::X_PAYMENT).map(|value| (value, x402::Version::V1)));
                let (scheme, authority) = (read(":scheme"), read(":authority"));
                let request = RequestHead {
                    method: &method,
                    path: &path,
                    authorization: authorization.as_deref(),
                    idempotency_key: idempotency_key.as_deref(),
                    payment: payment.as_ref().map(|(value, version)| (value.as_slice(), *version)),
                    scheme: scheme.as_deref(),
                    authority: authority.as_deref(),
                };
                let now = millis(self.get_current_time());
                match route {
                    Some(route) => self.exchange.on_priced_request(&gate, route, &request, now),
                    None => self.exchange.on_top_up(&gate, &request, now),
                }
            }
        };
        let action = self.perform(&gate, action, false);
        if let Some(books) = &self.books {
            report_prefetched(books);
        }
        action
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let Some(gate) = self.gate.clone() else { return Action::Continue };
        if !self.exchange.awaits_response() {
            return Action::Continue;
        }
        let status = self
            .get_http_response_header_bytes(":status")
            .and_then(|s| std::str::from_utf8(&s).ok().and_then(|s| s.parse().ok()));
        let units =
            self.exchange.units_header().and_then(|name| self.get_http_response_header_bytes(name));
        let step = self.exchange.on_response_headers(&gate, status, units.as_deref());
        for edit in step.edits {
            match edit {
                HeaderEdit::Set(name, value) => self.set_http_response_header(name, Some(&value)),
                HeaderEdit::Remove(name) => self.remove_http_response_header(name),
            }
        }
        if let Some(settlement) = step.settlement {
            self.settle(settlement);
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        if let Some(settlement) = self.exchange.on_end() {
            self.settle(settlement);
        }
    }
}

impl Context for Stream {
    fn on_http_call_response(
        &mut self,
        _token: u32,
        headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let Some(gate) = self.gate.clone() else { return };
        let reply = read_reply(self, headers, body_size, MAX_REPLY_BYTES);
        note_ledger(reply.status);
        let action = self.exchange.on_ledger_reply(&gate, reply);
        self.perform(&gate, action, true);
        if let Some(books) = &self.books {
            report_prefetched(books);
        }
    }
}

fn push(books: &Books, queued: Queued) {
    count(Counter::SettleQueued, 1);
    if books.queue.borrow_mut().push(queued) {
        count(Counter::SettleDropped, 1);
        log::error!(
            "paystile: settle queue full; dropped the oldest settlement (its hold will expire)"
        );
    }
}

/// `POST`s `call` to the ledger; the token of the dispatch, or `None` if the host refused it.
fn post(context: &dyn Context, ledger: &LedgerTarget, call: &LedgerCall) -> Option<u32> {
    dispatch(
        context,
        ledger,
        "POST",
        call.path,
        Some(&call.body),
        call.timeout.unwrap_or(ledger.timeout),
    )
}

/// Calls the ledger; the token of the dispatch, or `None` if the host refused it.
fn dispatch(
    context: &dyn Context,
    ledger: &LedgerTarget,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Option<u32> {
    let mut headers = vec![
        (":method", method),
        (":path", path),
        (":authority", ledger.authority.as_str()),
        (headers::AUTHORIZATION, ledger.authorization.as_str()),
    ];
    if body.is_some() {
        headers.push((headers::CONTENT_TYPE, headers::APPLICATION_JSON));
    }
    match context.dispatch_http_call(&ledger.upstream, headers, body, vec![], timeout) {
        Ok(token) => Some(token),
        Err(status) => {
            log::warn!("paystile: cannot call the ledger at {:?}: {status:?}", ledger.upstream);
            None
        }
    }
}

/// The reply to a dispatch; a body over `max_body` bytes is read as none.
fn read_reply(
    context: &dyn Context,
    headers: usize,
    body_size: usize,
    max_body: usize,
) -> LedgerReply {
    if headers == 0 {
        // The call failed without an answer (reset, refused connection).
        return LedgerReply::default();
    }
    let status = context
        .get_http_call_response_header_bytes(":status")
        .and_then(|s| std::str::from_utf8(&s).ok().and_then(|s| s.parse().ok()));
    let body = if body_size > max_body {
        Vec::new()
    } else {
        context.get_http_call_response_body(0, body_size).unwrap_or_default()
    };
    LedgerReply { status, body }
}

fn since_epoch(time: SystemTime) -> Duration {
    time.duration_since(UNIX_EPOCH).unwrap_or_default()
}

fn millis(time: SystemTime) -> u64 {
    u64::try_from(since_epoch(time).as_millis()).unwrap_or(u64::MAX)
}
