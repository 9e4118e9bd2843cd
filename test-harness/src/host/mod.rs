//! A proxy-wasm host on wasmtime that loads the release `.wasm` the way a gateway does, so
//! that every path through the filter can be scripted and checked without a real gateway.
//!
//! It follows ABI 0.2.1 (`../shared/reference/proxy-wasm-hosts.md`): WASI preview1 imports,
//! `_initialize` (during which only `proxy_log` and WASI may be called), memory handed to the
//! guest through `proxy_on_memory_allocate`, `dispatch_http_call` bound to the root context
//! with its callback on the root id, and the SDK's switch to the stream's context. In
//! [`Flavor::Kong`] it behaves like ngx_wasm_module where that differs from Envoy: its
//! not-yet-implemented hostcalls trap, pause and dispatch are refused while response headers
//! are processed, dispatch targets are `host:port`, and an increment of a gauge traps. Its
//! Kong is 3.8 or later (ngx_wasm_module 0.4+, which has the metrics calls); on Kong 3.4 to
//! 3.7 they trap, so a configuration for those turns metrics off, and tests check that the
//! filter then makes none of these calls.
//!
//! A test drives one VM: [`Vm::request_headers`] for a new stream, then the dispatches it
//! made ([`Vm::take_dispatches`]), the ledger's answers ([`Vm::reply`]), the local response
//! or the upstream request ([`Vm::stream`]), response headers out, the end of the stream and
//! ticks.

mod abi;
pub mod pairs;

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use wasmtime::{Engine, Instance, Linker, Module, Store, TypedFunc};

pub use pairs::{Pairs, pairs};

/// Which gateway the host behaves like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    Envoy,
    Kong,
}

/// A header callback's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Continue,
    Pause,
}

/// A reply the gateway sent itself (`proxy_send_local_response`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalResponse {
    pub status: u32,
    pub details: Vec<u8>,
    pub headers: Pairs,
    pub body: Vec<u8>,
}

impl LocalResponse {
    /// Every value of header `name`.
    pub fn headers_named(&self, name: &str) -> Vec<String> {
        values(&self.headers, name)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// One HTTP stream as the host sees it.
#[derive(Clone, Debug, Default)]
pub struct Stream {
    /// The request headers, with the filter's edits: what goes upstream.
    pub request_headers: Pairs,
    /// The response headers, with the filter's edits: what the client gets.
    pub response_headers: Pairs,
    pub local_response: Option<LocalResponse>,
    /// How often the filter resumed the paused request.
    pub resumed: u32,
    /// `on_done`, `on_log` and `on_delete` have run.
    pub ended: bool,
    /// Paused by its request-headers callback and not resumed yet.
    paused: bool,
    /// The request headers can still be read and changed: until the filter lets the request
    /// go (Continue, a resume or a local response), as in Envoy.
    request_headers_open: bool,
}

impl Stream {
    pub fn request_header(&self, name: &str) -> Option<String> {
        values(&self.request_headers, name).into_iter().next()
    }

    pub fn response_header(&self, name: &str) -> Option<String> {
        values(&self.response_headers, name).into_iter().next()
    }
}

/// A `dispatch_http_call` the filter made and the host has not answered yet.
#[derive(Clone, Debug)]
pub struct Dispatch {
    pub token: u32,
    /// The context the dispatch was made from (the root for the tick's settle calls).
    pub context: u32,
    pub upstream: String,
    pub headers: Pairs,
    pub body: Vec<u8>,
    pub timeout: Duration,
}

impl Dispatch {
    pub fn header(&self, name: &str) -> Option<String> {
        values(&self.headers, name).into_iter().next()
    }

    pub fn path(&self) -> String {
        self.header(":path").unwrap_or_default()
    }

    /// A poll of the ledger's revocation feed (`GET /v1/revocations?…`).
    pub fn is_watch_poll(&self) -> bool {
        self.header(":method").as_deref() == Some("GET")
            && self.path().starts_with(paystile_protocol::ledger_api::path::REVOCATIONS)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// How a dispatch ends.
#[derive(Clone, Debug)]
pub enum Reply {
    /// An HTTP answer. Envoy reports its own timeouts and unreachable clusters this way too
    /// (504, 503); Kong reports them as a reset.
    Answer { status: u16, headers: Pairs, body: Vec<u8> },
    /// No answer at all (reset, refused connection): the callback gets zero headers.
    Reset,
}

impl Reply {
    pub fn json(status: u16, body: &serde_json::Value) -> Reply {
        Reply::Answer {
            status,
            headers: pairs(&[("content-type", "application/json")]),
            body: body.to_string().into_bytes(),
        }
    }

    pub fn status(status: u16) -> Reply {
        Reply::Answer { status, headers: Vec::new(), body: Vec::new() }
    }
}

/// The callback the guest is in, for the rules that depend on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// `_initialize`: only `proxy_log` and WASI may be called (as Envoy enforces).
    Initializing,
    /// Between callbacks.
    Idle,
    /// Context creation, `on_vm_start`, `on_configure`.
    Setup,
    RequestHeaders,
    ResponseHeaders,
    StreamEnd,
    Tick,
    CallResponse,
}

/// Where the root context is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RootState {
    Running,
    /// Its `on_done` asked for time: it calls `proxy_done` when it has finished.
    Finishing,
    Done,
}

/// A metric the guest defined.
#[derive(Clone, Debug)]
struct Metric {
    name: String,
    kind: MetricKind,
    value: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

/// What the host keeps; the hostcalls in `abi.rs` read and change it.
struct HostState {
    flavor: Flavor,
    /// Envoy's clusters a dispatch may target.
    clusters: Vec<String>,
    phase: Phase,
    root_id: u32,
    /// The context hostcalls act on: the callback's, or one `proxy_set_effective_context`
    /// switched to.
    effective: u32,
    plugin_config: Vec<u8>,
    streams: BTreeMap<u32, Stream>,
    /// The response headers and body of the dispatch whose callback is running; none after a
    /// reset, as in Envoy (reading them is then an error).
    call_headers: Option<Pairs>,
    call_body: Option<Vec<u8>>,
    dispatches: Vec<Dispatch>,
    /// Revocation polls [`Vm::take_dispatches`] set aside.
    watch_polls: Vec<Dispatch>,
    /// Dispatches not answered yet, with the context that made them.
    pending: BTreeMap<u32, u32>,
    next_token: u32,
    tick_period: Duration,
    /// Whether the root has set a tick period (Kong traps on a second one).
    tick_set: bool,
    /// Streams answered locally whose reply has not been through the response callback yet.
    local_replies_due: Vec<u32>,
    now: Duration,
    logs: Vec<(u32, String)>,
    stdio: Vec<u8>,
    /// Hostcalls told to fail once with a status.
    failures: Vec<(String, u32)>,
    /// Hostcalls the filter called that this host does not implement.
    unimplemented: Vec<String>,
    /// Properties by path (segments joined with NUL, as the ABI passes them).
    properties: BTreeMap<Vec<u8>, Vec<u8>>,
    /// The metrics defined, their index their id.
    metrics: Vec<Metric>,
    root_state: RootState,
}

impl HostState {
    fn stream(&mut self) -> Option<&mut Stream> {
        let id = self.effective;
        self.streams.get_mut(&id)
    }

    /// The status a hostcall was told to fail with, once.
    fn failure(&mut self, hostcall: &str) -> Option<u32> {
        let at = self.failures.iter().position(|(name, _)| name == hostcall)?;
        Some(self.failures.remove(at).1)
    }
}

/// The guest's exports the host calls.
struct Exports {
    context_create: TypedFunc<(i32, i32), ()>,
    vm_start: TypedFunc<(i32, i32), i32>,
    configure: TypedFunc<(i32, i32), i32>,
    request_headers: TypedFunc<(i32, i32, i32), i32>,
    response_headers: TypedFunc<(i32, i32, i32), i32>,
    done: TypedFunc<i32, i32>,
    log: TypedFunc<i32, ()>,
    delete: TypedFunc<i32, ()>,
    http_call_response: TypedFunc<(i32, i32, i32, i32, i32), ()>,
    tick: TypedFunc<i32, ()>,
}

/// One filter VM, as one gateway worker runs it.
pub struct Vm {
    store: Store<HostState>,
    exports: Exports,
    next_context: u32,
    /// Why the VM is dead: a trap. Envoy fails such a VM, Kong replaces the instance; either
    /// way it is never called again.
    failed: Option<String>,
}

/// Fuel given to a VM: far more than any test spends, and counted down by every instruction.
const FUEL: u64 = u64::MAX / 4;
const ROOT_ID: u32 = 1;
/// The ledger cluster of `envoy-config/envoy.yaml`.
pub const LEDGER_CLUSTER: &str = "paystile_ledger";

/// The engine every VM of a process shares.
fn engine() -> anyhow::Result<&'static Engine> {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    if let Some(engine) = ENGINE.get() {
        return Ok(engine);
    }
    let mut config = wasmtime::Config::new();
    config.consume_fuel(true);
    // Tests compile the module once per process; unoptimized code compiles several times
    // faster, and fuel (counted per wasm instruction) does not depend on it.
    if cfg!(debug_assertions) {
        config.cranelift_opt_level(wasmtime::OptLevel::None);
    }
    let engine = Engine::new(&config)?;
    Ok(ENGINE.get_or_init(|| engine))
}

/// The filter, compiled once per process (compiling takes far longer than instantiating).
fn filter_module() -> anyhow::Result<&'static Module> {
    static FILTER: OnceLock<Module> = OnceLock::new();
    if let Some(module) = FILTER.get() {
        return Ok(module);
    }
    let wasm = crate::paths::filter_wasm()?;
    let module = Module::from_file(engine()?, &wasm)
        .with_context(|| format!("cannot compile {}", wasm.display()))?;
    Ok(FILTER.get_or_init(|| module))
}

impl Vm {
    /// Loads the release filter (refusing a stale one) like a gateway: instantiate, run
    /// `_initialize`, create the root context and start the VM. Configure it next.
    pub fn load(flavor: Flavor) -> anyhow::Result<Vm> {
        Vm::instantiate(filter_module()?, flavor)
    }

    /// Loads another proxy-wasm module (binary): tests of the host itself.
    pub fn load_bytes(wasm: &[u8], flavor: Flavor) -> anyhow::Result<Vm> {
        Vm::instantiate(&Module::new(engine()?, wasm)?, flavor)
    }

    fn instantiate(module: &Module, flavor: Flavor) -> anyhow::Result<Vm> {
        let engine = module.engine();
        if module.get_export("proxy_abi_version_0_2_1").is_none() {
            bail!("the module does not export proxy_abi_version_0_2_1");
        }
        let state = HostState {
            flavor,
            clusters: vec![LEDGER_CLUSTER.to_owned()],
            phase: Phase::Initializing,
            root_id: ROOT_ID,
            effective: ROOT_ID,
            plugin_config: Vec::new(),
            streams: BTreeMap::new(),
            call_headers: None,
            call_body: None,
            dispatches: Vec::new(),
            watch_polls: Vec::new(),
            pending: BTreeMap::new(),
            next_token: 1,
            tick_period: Duration::ZERO,
            tick_set: false,
            local_replies_due: Vec::new(),
            now: Duration::from_secs(1_900_000_000),
            logs: Vec::new(),
            stdio: Vec::new(),
            failures: Vec::new(),
            unimplemented: Vec::new(),
            properties: BTreeMap::new(),
            metrics: Vec::new(),
            root_state: RootState::Running,
        };
        let mut store = Store::new(engine, state);
        store.set_fuel(FUEL)?;
        let mut linker = Linker::new(engine);
        abi::link(&mut linker, module)?;
        let instance = linker.instantiate(&mut store, module)?;
        let exports = Exports::find(&instance, &mut store)?;
        instance
            .get_typed_func::<(), ()>(&mut store, "_initialize")?
            .call(&mut store, ())
            .context("_initialize")?;
        let mut vm = Vm { store, exports, next_context: ROOT_ID + 1, failed: None };
        vm.in_phase(Phase::Setup, ROOT_ID, |vm| {
            let root = ROOT_ID as i32;
            vm.exports.context_create.call(&mut vm.store, (root, 0))?;
            match vm.exports.vm_start.call(&mut vm.store, (root, 0))? {
                0 => Err(anyhow!("proxy_on_vm_start refused")),
                _ => Ok(()),
            }
        })?;
        Ok(vm)
    }

    /// `proxy_on_configure` with `config`: whether the filter accepted it.
    pub fn configure(&mut self, config: &[u8]) -> anyhow::Result<bool> {
        self.store.data_mut().plugin_config = config.to_vec();
        let size = len_i32(config.len());
        self.in_phase(Phase::Setup, ROOT_ID, |vm| {
            Ok(vm.exports.configure.call(&mut vm.store, (ROOT_ID as i32, size))? != 0)
        })
    }

    /// A new stream whose request headers are `headers`: `proxy_on_context_create`, then
    /// `proxy_on_request_headers`. Answers the stream's id and the filter's action.
    pub fn request_headers(&mut self, headers: Pairs) -> anyhow::Result<(u32, Action)> {
        let id = self.next_context;
        self.next_context += 1;
        let count = len_i32(headers.len());
        let stream =
            Stream { request_headers: headers, request_headers_open: true, ..Stream::default() };
        self.store.data_mut().streams.insert(id, stream);
        self.in_phase(Phase::Setup, id, |vm| {
            vm.exports.context_create.call(&mut vm.store, (id as i32, ROOT_ID as i32))
        })?;
        let action = self.in_phase(Phase::RequestHeaders, id, |vm| {
            // A GET without a body: Envoy says end of stream; Kong always says false.
            let end_of_stream = i32::from(vm.store.data().flavor == Flavor::Envoy);
            vm.exports.request_headers.call(&mut vm.store, (id as i32, count, end_of_stream))
        })?;
        let action = action_of(action)?;
        let stream = self.stream_mut(id)?;
        let answered = stream.local_response.is_some();
        stream.paused = action == Action::Pause && !answered;
        stream.request_headers_open = stream.paused;
        self.deliver_local_responses()?;
        Ok((id, action))
    }

    /// The upstream's (or the gateway's) response headers for stream `id`.
    pub fn response_headers(&mut self, id: u32, headers: Pairs) -> anyhow::Result<Action> {
        let stream = self.stream_mut(id)?;
        if stream.ended {
            bail!("stream {id} has ended");
        }
        stream.response_headers = headers;
        self.run_response_headers(id)
    }

    fn run_response_headers(&mut self, id: u32) -> anyhow::Result<Action> {
        let count = len_i32(self.stream_mut(id)?.response_headers.len());
        let action = self.in_phase(Phase::ResponseHeaders, id, |vm| {
            vm.exports.response_headers.call(&mut vm.store, (id as i32, count, 0))
        })?;
        let action = action_of(action)?;
        if action == Action::Pause && self.store.data().flavor == Flavor::Kong {
            bail!("Kong: pausing in on_response_headers is not supported");
        }
        Ok(action)
    }

    /// Envoy runs the encoder callbacks on a local reply once the callback that sent it
    /// returns: the filter's `on_response_headers` sees it like an upstream response.
    fn deliver_local_responses(&mut self) -> anyhow::Result<()> {
        let due = std::mem::take(&mut self.store.data_mut().local_replies_due);
        for id in due {
            let Some(response) = self.stream_mut(id)?.local_response.clone() else { continue };
            let mut headers = vec![(b":status".to_vec(), response.status.to_string().into_bytes())];
            headers.extend(response.headers);
            self.stream_mut(id)?.response_headers = headers;
            self.run_response_headers(id)?;
        }
        Ok(())
    }

    /// The stream is over (answered, reset or abandoned): `proxy_on_log`, `proxy_on_done`
    /// and `proxy_on_delete` in Envoy's order; Kong calls `on_done` first. Kong also cancels
    /// the stream's pending dispatches.
    pub fn end(&mut self, id: u32) -> anyhow::Result<()> {
        if self.stream_mut(id)?.ended {
            bail!("stream {id} has ended already");
        }
        self.in_phase(Phase::StreamEnd, id, |vm| {
            let ctx = id as i32;
            if vm.store.data().flavor == Flavor::Kong {
                vm.exports.done.call(&mut vm.store, ctx)?;
                vm.exports.log.call(&mut vm.store, ctx)?;
            } else {
                vm.exports.log.call(&mut vm.store, ctx)?;
                vm.exports.done.call(&mut vm.store, ctx)?;
            }
            vm.exports.delete.call(&mut vm.store, ctx)
        })?;
        let state = self.store.data_mut();
        if state.flavor == Flavor::Kong {
            state.pending.retain(|_, context| *context != id);
        }
        self.stream_mut(id)?.ended = true;
        Ok(())
    }

    /// The dispatches made since the last call, oldest first, but for the revocation
    /// watch's polls: a ledger holds those open while nothing is revoked, so they wait for
    /// a test that is about them ([`Vm::take_watch_polls`]).
    pub fn take_dispatches(&mut self) -> Vec<Dispatch> {
        let state = self.store.data_mut();
        let (polls, others): (Vec<_>, Vec<_>) =
            std::mem::take(&mut state.dispatches).into_iter().partition(Dispatch::is_watch_poll);
        state.watch_polls.extend(polls);
        others
    }

    /// The revocation watch's polls made and not yet taken, oldest first.
    pub fn take_watch_polls(&mut self) -> Vec<Dispatch> {
        self.take_dispatches();
        std::mem::take(&mut self.store.data_mut().watch_polls)
    }

    /// Delivers the outcome of dispatch `token` to the root context, as Envoy does (the SDK
    /// then switches to the stream that made it, if it still exists).
    pub fn reply(&mut self, token: u32, reply: Reply) -> anyhow::Result<()> {
        if self.store.data_mut().pending.remove(&token).is_none() {
            bail!("no pending dispatch {token} (answered, cancelled or never made)");
        }
        let (headers, body) = match reply {
            Reply::Answer { status, mut headers, body } => {
                headers.insert(0, (b":status".to_vec(), status.to_string().into_bytes()));
                (Some(headers), Some(body))
            }
            Reply::Reset => (None, None),
        };
        let header_count = headers.as_ref().map_or(0, Vec::len);
        let body_size = body.as_ref().map_or(0, Vec::len);
        let args = (ROOT_ID as i32, token as i32, len_i32(header_count), len_i32(body_size), 0);
        let state = self.store.data_mut();
        state.call_headers = headers;
        state.call_body = body;
        let result = self.in_phase(Phase::CallResponse, ROOT_ID, |vm| {
            vm.exports.http_call_response.call(&mut vm.store, args)
        });
        let state = self.store.data_mut();
        state.call_headers = None;
        state.call_body = None;
        result?;
        self.deliver_local_responses()
    }

    /// Fires the root context's tick (as the host does every tick period).
    pub fn tick(&mut self) -> anyhow::Result<()> {
        if self.store.data().tick_period.is_zero() {
            bail!("no tick period is set: the host would not tick");
        }
        self.in_phase(Phase::Tick, ROOT_ID, |vm| {
            vm.exports.tick.call(&mut vm.store, ROOT_ID as i32)
        })
    }

    pub fn tick_period(&self) -> Duration {
        self.store.data().tick_period
    }

    /// `proxy_on_done` on the root context, as Envoy calls it when the configuration goes
    /// away (and at SIGTERM): whether the root is done at once. If not, it is done when it
    /// calls `proxy_done` ([`Vm::root_done`]). Kong never calls it.
    pub fn finish(&mut self) -> anyhow::Result<bool> {
        if self.store.data().flavor == Flavor::Kong {
            bail!("Kong never calls on_done on a root context");
        }
        self.store.data_mut().root_state = RootState::Finishing;
        let done = self.in_phase(Phase::Setup, ROOT_ID, |vm| {
            vm.exports.done.call(&mut vm.store, ROOT_ID as i32)
        })?;
        if done != 0 {
            self.store.data_mut().root_state = RootState::Done;
        }
        Ok(done != 0)
    }

    /// Whether the root context is done (its `on_done` said so, or it called `proxy_done`).
    pub fn root_done(&self) -> bool {
        self.store.data().root_state == RootState::Done
    }

    /// Moves the host's clock (`proxy_get_current_time_nanoseconds`) forward.
    pub fn advance(&mut self, by: Duration) {
        self.store.data_mut().now += by;
    }

    /// The time the host reports, since the Unix epoch.
    pub fn now(&self) -> Duration {
        self.store.data().now
    }

    pub fn stream(&self, id: u32) -> Option<&Stream> {
        self.store.data().streams.get(&id)
    }

    /// Sets the property at `path` (`proxy_get_property`), e.g. `["request", "path"]`.
    pub fn set_property(&mut self, path: &[&str], value: &[u8]) {
        self.store.data_mut().properties.insert(path.join("\0").into_bytes(), value.to_vec());
    }

    /// The property at `path`, as the filter or the host set it.
    pub fn property(&self, path: &[&str]) -> Option<&[u8]> {
        self.store.data().properties.get(path.join("\0").as_bytes()).map(Vec::as_slice)
    }

    /// Makes the next call of `hostcall` (e.g. `"proxy_http_call"`) fail with `status`.
    pub fn fail_next(&mut self, hostcall: &str, status: u32) {
        self.store.data_mut().failures.push((hostcall.to_owned(), status));
    }

    /// What the filter logged: `(level, message)`.
    pub fn logs(&self) -> &[(u32, String)] {
        &self.store.data().logs
    }

    /// What the guest wrote to stdout and stderr (a panic message, say).
    pub fn stdio(&self) -> String {
        String::from_utf8_lossy(&self.store.data().stdio).into_owned()
    }

    /// The value of the metric `name`, if the filter defined it.
    pub fn metric(&self, name: &str) -> Option<i64> {
        self.store.data().metrics.iter().find(|m| m.name == name).map(|m| m.value)
    }

    /// How many metrics the filter defined.
    pub fn metrics_defined(&self) -> usize {
        self.store.data().metrics.len()
    }

    /// Hostcalls the filter made that this host (and, for some, Kong) does not implement.
    pub fn unimplemented_calls(&self) -> &[String] {
        &self.store.data().unimplemented
    }

    /// Fuel the VM has burnt so far: about one unit per wasm instruction.
    pub fn fuel_used(&self) -> u64 {
        FUEL - self.store.get_fuel().unwrap_or(FUEL)
    }

    fn stream_mut(&mut self, id: u32) -> anyhow::Result<&mut Stream> {
        self.store.data_mut().streams.get_mut(&id).ok_or_else(|| anyhow!("no stream {id}"))
    }

    /// Runs a guest callback for `context` in `phase`, then restores the host's idle state.
    /// A trap kills the VM: it is never called again.
    fn in_phase<T>(
        &mut self,
        phase: Phase,
        context: u32,
        call: impl FnOnce(&mut Vm) -> wasmtime::Result<T>,
    ) -> anyhow::Result<T> {
        if let Some(reason) = &self.failed {
            bail!("the VM trapped earlier and is dead: {reason}");
        }
        let state = self.store.data_mut();
        state.phase = phase;
        state.effective = context;
        let result = call(self);
        let state = self.store.data_mut();
        state.phase = Phase::Idle;
        state.effective = state.root_id;
        result.map_err(|e| {
            self.failed = Some(format!("{e:#}"));
            let stdio = String::from_utf8_lossy(&self.store.data().stdio).into_owned();
            if stdio.is_empty() { e } else { e.context(format!("guest output: {stdio}")) }
        })
    }
}

impl Exports {
    fn find(instance: &Instance, store: &mut Store<HostState>) -> anyhow::Result<Exports> {
        Ok(Exports {
            context_create: instance.get_typed_func(&mut *store, "proxy_on_context_create")?,
            vm_start: instance.get_typed_func(&mut *store, "proxy_on_vm_start")?,
            configure: instance.get_typed_func(&mut *store, "proxy_on_configure")?,
            request_headers: instance.get_typed_func(&mut *store, "proxy_on_request_headers")?,
            response_headers: instance.get_typed_func(&mut *store, "proxy_on_response_headers")?,
            done: instance.get_typed_func(&mut *store, "proxy_on_done")?,
            log: instance.get_typed_func(&mut *store, "proxy_on_log")?,
            delete: instance.get_typed_func(&mut *store, "proxy_on_delete")?,
            http_call_response: instance
                .get_typed_func(&mut *store, "proxy_on_http_call_response")?,
            tick: instance.get_typed_func(&mut *store, "proxy_on_tick")?,
        })
    }
}

fn action_of(raw: i32) -> anyhow::Result<Action> {
    match raw {
        0 => Ok(Action::Continue),
        1 => Ok(Action::Pause),
        other => Err(anyhow!("unknown action {other}")),
    }
}

fn len_i32(len: usize) -> i32 {
    i32::try_from(len).unwrap_or(i32::MAX)
}

/// Every value of header `name` (case-insensitive), lossily as text.
fn values(pairs: &[(Vec<u8>, Vec<u8>)], name: &str) -> Vec<String> {
    pairs
        .iter()
        .filter(|(key, _)| key.eq_ignore_ascii_case(name.as_bytes()))
        .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
        .collect()
}
