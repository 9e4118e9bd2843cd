//! The hostcalls: `env.proxy_*` (ABI 0.2.1) and the WASI preview1 functions the SDK imports.
//!
//! Statuses are the spec's; the SDK turns some of them into panics, which is why tests can
//! make any of these fail on purpose ([`super::Vm::fail_next`]). Hostcalls the filter does
//! not use are linked too, so instantiation never fails: on Kong those ngx_wasm_module has
//! not implemented trap, as there, and every call to one is recorded.

use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use wasmtime::{Caller, Extern, Linker, Module, Val};

use super::pairs::{self, Pairs};
use super::{Dispatch, Flavor, HostState, LocalResponse, Metric, MetricKind, Phase, RootState};

mod status {
    pub const OK: i32 = 0;
    pub const NOT_FOUND: i32 = 1;
    pub const BAD_ARGUMENT: i32 = 2;
    pub const INVALID_MEMORY_ACCESS: i32 = 6;
    pub const UNIMPLEMENTED: i32 = 12;
}

mod map {
    pub const REQUEST_HEADERS: i32 = 0;
    pub const RESPONSE_HEADERS: i32 = 2;
    pub const HTTP_CALL_RESPONSE_HEADERS: i32 = 6;
}

mod buffer {
    pub const HTTP_CALL_RESPONSE_BODY: i32 = 4;
    pub const VM_CONFIGURATION: i32 = 6;
    pub const PLUGIN_CONFIGURATION: i32 = 7;
}

/// ngx_wasm_module's hostcalls that trap ("host trap (function not yet implemented)").
const KONG_NYI: &[&str] = &[
    "proxy_get_log_level",
    "proxy_get_status",
    "proxy_close_stream",
    "proxy_continue_response",
    "proxy_resolve_shared_queue",
    "proxy_grpc_call",
    "proxy_grpc_stream",
    "proxy_grpc_send",
    "proxy_grpc_cancel",
    "proxy_grpc_close",
];

type Ctx<'a> = Caller<'a, HostState>;

/// The `env` hostcalls this host implements; `link` defines exactly these.
const IMPLEMENTED: &[&str] = &[
    "proxy_log",
    "proxy_get_current_time_nanoseconds",
    "proxy_set_tick_period_milliseconds",
    "proxy_get_buffer_bytes",
    "proxy_get_header_map_pairs",
    "proxy_set_header_map_pairs",
    "proxy_get_header_map_value",
    "proxy_add_header_map_value",
    "proxy_replace_header_map_value",
    "proxy_remove_header_map_value",
    "proxy_send_local_response",
    "proxy_continue_stream",
    "proxy_http_call",
    "proxy_set_effective_context",
    "proxy_get_property",
    "proxy_set_property",
    "proxy_define_metric",
    "proxy_increment_metric",
    "proxy_record_metric",
    "proxy_get_metric",
    "proxy_done",
];

pub(super) fn link(linker: &mut Linker<HostState>, module: &Module) -> Result<()> {
    linker.func_wrap("env", "proxy_log", log)?;
    linker.func_wrap("env", "proxy_get_current_time_nanoseconds", current_time)?;
    linker.func_wrap("env", "proxy_set_tick_period_milliseconds", set_tick_period)?;
    linker.func_wrap("env", "proxy_get_buffer_bytes", get_buffer_bytes)?;
    linker.func_wrap("env", "proxy_get_header_map_pairs", get_header_map_pairs)?;
    linker.func_wrap("env", "proxy_set_header_map_pairs", set_header_map_pairs)?;
    linker.func_wrap("env", "proxy_get_header_map_value", get_header_map_value)?;
    linker.func_wrap("env", "proxy_add_header_map_value", add_header_map_value)?;
    linker.func_wrap("env", "proxy_replace_header_map_value", replace_header_map_value)?;
    linker.func_wrap("env", "proxy_remove_header_map_value", remove_header_map_value)?;
    linker.func_wrap("env", "proxy_send_local_response", send_local_response)?;
    linker.func_wrap("env", "proxy_continue_stream", continue_stream)?;
    linker.func_wrap("env", "proxy_http_call", http_call)?;
    linker.func_wrap("env", "proxy_set_effective_context", set_effective_context)?;
    linker.func_wrap("env", "proxy_get_property", get_property)?;
    linker.func_wrap("env", "proxy_set_property", set_property)?;
    linker.func_wrap("env", "proxy_define_metric", define_metric)?;
    linker.func_wrap("env", "proxy_increment_metric", increment_metric)?;
    linker.func_wrap("env", "proxy_record_metric", record_metric)?;
    linker.func_wrap("env", "proxy_get_metric", get_metric)?;
    linker.func_wrap("env", "proxy_done", done)?;
    linker.func_wrap("wasi_snapshot_preview1", "fd_write", fd_write)?;
    linker.func_wrap("wasi_snapshot_preview1", "environ_sizes_get", environ_sizes_get)?;
    linker.func_wrap("wasi_snapshot_preview1", "environ_get", |_: Ctx<'_>, _: i32, _: i32| 0)?;
    linker.func_wrap("wasi_snapshot_preview1", "random_get", random_get)?;
    linker.func_wrap(
        "wasi_snapshot_preview1",
        "proc_exit",
        |_: Ctx<'_>, code: i32| -> Result<()> { bail!("proc_exit({code})") },
    )?;
    // Everything else the module imports: recorded, and a trap where Kong traps.
    for import in module.imports() {
        let (wasmtime::ExternType::Func(ty), "env") = (import.ty(), import.module()) else {
            continue;
        };
        let name = import.name().to_owned();
        if IMPLEMENTED.contains(&name.as_str()) {
            continue;
        }
        linker.func_new("env", &name.clone(), ty, move |mut caller, _params, results| {
            let state = caller.data_mut();
            if state.phase == Phase::Initializing {
                bail!("{name} called during _initialize");
            }
            state.unimplemented.push(name.clone());
            if state.flavor == Flavor::Kong && KONG_NYI.contains(&name.as_str()) {
                bail!("host trap (function not yet implemented): {name}");
            }
            if let Some(result) = results.first_mut() {
                *result = Val::I32(status::UNIMPLEMENTED);
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// Refuses hostcalls made while `_initialize` runs (Envoy allows only `proxy_log` and WASI
/// there), and answers a failure a test asked for.
fn enter(caller: &mut Ctx<'_>, hostcall: &str) -> Result<Option<i32>> {
    let state = caller.data_mut();
    if state.phase == Phase::Initializing {
        bail!("{hostcall} called during _initialize");
    }
    Ok(state.failure(hostcall).map(|status| status as i32))
}

fn log(mut caller: Ctx<'_>, level: i32, ptr: i32, len: i32) -> Result<i32> {
    let message = match read(&mut caller, ptr, len) {
        Some(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        None => return Ok(status::INVALID_MEMORY_ACCESS),
    };
    caller.data_mut().logs.push((level as u32, message));
    Ok(status::OK)
}

fn current_time(mut caller: Ctx<'_>, ret: i32) -> Result<i32> {
    if let Some(status) = enter(&mut caller, "proxy_get_current_time_nanoseconds")? {
        return Ok(status);
    }
    let nanos = u64::try_from(caller.data().now.as_nanos()).unwrap_or(u64::MAX);
    Ok(write(&mut caller, ret, &nanos.to_le_bytes()))
}

fn set_tick_period(mut caller: Ctx<'_>, millis: i32) -> Result<i32> {
    if let Some(status) = enter(&mut caller, "proxy_set_tick_period_milliseconds")? {
        return Ok(status);
    }
    let state = caller.data_mut();
    if state.flavor == Flavor::Kong && state.tick_set {
        bail!("Kong: tick_period already set");
    }
    state.tick_set = true;
    state.tick_period = Duration::from_millis(millis as u32 as u64);
    Ok(status::OK)
}

fn get_buffer_bytes(
    mut caller: Ctx<'_>,
    kind: i32,
    start: i32,
    max: i32,
    ret_ptr: i32,
    ret_len: i32,
) -> Result<i32> {
    if let Some(status) = enter(&mut caller, "proxy_get_buffer_bytes")? {
        return Ok(status);
    }
    let state = caller.data();
    let buffer = match kind {
        buffer::PLUGIN_CONFIGURATION => Some(state.plugin_config.clone()),
        buffer::VM_CONFIGURATION => Some(Vec::new()),
        buffer::HTTP_CALL_RESPONSE_BODY => state.call_body.clone(),
        _ => None,
    };
    let Some(buffer) = buffer else { return Ok(status::NOT_FOUND) };
    // The SDK asks for `usize::MAX` bytes of the configuration: clamp to what there is.
    let start = (start as u32 as usize).min(buffer.len());
    let end = start.saturating_add(max as u32 as usize).min(buffer.len());
    give(&mut caller, &buffer[start..end], ret_ptr, ret_len)
}

/// The header map `map` of the effective context, if it is there to be used. As in Envoy,
/// request headers are gone once the request went on (or was answered), response headers
/// exist only in their callback, and a dispatch's response headers only in its callback and
/// not after a reset: using them then is BAD_ARGUMENT, on which the SDK panics.
fn header_map(state: &mut HostState, map: i32) -> Option<&mut Pairs> {
    let phase = state.phase;
    match map {
        map::REQUEST_HEADERS => {
            state.stream().filter(|s| s.request_headers_open).map(|s| &mut s.request_headers)
        }
        map::RESPONSE_HEADERS if phase == Phase::ResponseHeaders => {
            state.stream().map(|s| &mut s.response_headers)
        }
        map::HTTP_CALL_RESPONSE_HEADERS => state.call_headers.as_mut(),
        _ => None,
    }
}

/// Trailers: this host never has any; Envoy answers an empty map.
fn is_trailers(map: i32) -> bool {
    matches!(map, 1 | 3 | 7)
}

fn get_header_map_pairs(mut caller: Ctx<'_>, map: i32, ret_ptr: i32, ret_len: i32) -> Result<i32> {
    if let Some(status) = enter(&mut caller, "proxy_get_header_map_pairs")? {
        return Ok(status);
    }
    if is_trailers(map) {
        return give(&mut caller, &[], ret_ptr, ret_len);
    }
    let Some(headers) = header_map(caller.data_mut(), map) else {
        return Ok(status::BAD_ARGUMENT);
    };
    let serialized = pairs::serialize(headers);
    give(&mut caller, &serialized, ret_ptr, ret_len)
}

fn set_header_map_pairs(mut caller: Ctx<'_>, map: i32, ptr: i32, len: i32) -> Result<i32> {
    if let Some(status) = enter(&mut caller, "proxy_set_header_map_pairs")? {
        return Ok(status);
    }
    let Some(new) = read(&mut caller, ptr, len).and_then(|b| pairs::deserialize(&b)) else {
        return Ok(status::BAD_ARGUMENT);
    };
    match header_map(caller.data_mut(), map) {
        Some(headers) => {
            *headers = new;
            Ok(status::OK)
        }
        None => Ok(status::BAD_ARGUMENT),
    }
}

fn get_header_map_value(
    mut caller: Ctx<'_>,
    map: i32,
    key_ptr: i32,
    key_len: i32,
    ret_ptr: i32,
    ret_len: i32,
) -> Result<i32> {
    if let Some(status) = enter(&mut caller, "proxy_get_header_map_value")? {
        return Ok(status);
    }
    let Some(key) = read(&mut caller, key_ptr, key_len) else {
        return Ok(status::INVALID_MEMORY_ACCESS);
    };
    let Some(headers) = header_map(caller.data_mut(), map) else {
        return Ok(status::BAD_ARGUMENT);
    };
    // Header names are case-insensitive; the first value is the answer.
    match headers.iter().find(|(name, _)| name.eq_ignore_ascii_case(&key)) {
        Some((_, value)) => {
            let value = value.clone();
            give(&mut caller, &value, ret_ptr, ret_len)
        }
        None => Ok(status::NOT_FOUND),
    }
}

/// Applies `edit` to header map `map` with the key and value the guest passed.
fn edit_header(
    caller: &mut Ctx<'_>,
    hostcall: &str,
    map: i32,
    key: (i32, i32),
    value: Option<(i32, i32)>,
    edit: fn(&mut Pairs, Vec<u8>, Vec<u8>),
) -> Result<i32> {
    if let Some(status) = enter(caller, hostcall)? {
        return Ok(status);
    }
    let Some(key) = read(caller, key.0, key.1) else { return Ok(status::INVALID_MEMORY_ACCESS) };
    let value = match value {
        Some((ptr, len)) => match read(caller, ptr, len) {
            Some(value) => value,
            None => return Ok(status::INVALID_MEMORY_ACCESS),
        },
        None => Vec::new(),
    };
    match header_map(caller.data_mut(), map) {
        Some(headers) => {
            edit(headers, key.to_ascii_lowercase(), value);
            Ok(status::OK)
        }
        None => Ok(status::BAD_ARGUMENT),
    }
}

fn add_header_map_value(
    mut c: Ctx<'_>,
    map: i32,
    kp: i32,
    kl: i32,
    vp: i32,
    vl: i32,
) -> Result<i32> {
    edit_header(&mut c, "proxy_add_header_map_value", map, (kp, kl), Some((vp, vl)), |h, k, v| {
        h.push((k, v))
    })
}

fn replace_header_map_value(
    mut c: Ctx<'_>,
    map: i32,
    kp: i32,
    kl: i32,
    vp: i32,
    vl: i32,
) -> Result<i32> {
    edit_header(
        &mut c,
        "proxy_replace_header_map_value",
        map,
        (kp, kl),
        Some((vp, vl)),
        |h, k, v| {
            // Replaces every value of the header with this one, adding it if absent.
            match h.iter().position(|(name, _)| name.eq_ignore_ascii_case(&k)) {
                Some(first) => {
                    h[first].1 = v;
                    let mut i = first + 1;
                    while i < h.len() {
                        if h[i].0.eq_ignore_ascii_case(&k) {
                            h.remove(i);
                        } else {
                            i += 1;
                        }
                    }
                }
                None => h.push((k, v)),
            }
        },
    )
}

fn remove_header_map_value(mut c: Ctx<'_>, map: i32, kp: i32, kl: i32) -> Result<i32> {
    edit_header(&mut c, "proxy_remove_header_map_value", map, (kp, kl), None, |h, k, _| {
        h.retain(|(name, _)| !name.eq_ignore_ascii_case(&k))
    })
}

#[allow(clippy::too_many_arguments)]
fn send_local_response(
    mut caller: Ctx<'_>,
    status_code: i32,
    details_ptr: i32,
    details_len: i32,
    body_ptr: i32,
    body_len: i32,
    headers_ptr: i32,
    headers_len: i32,
    _grpc_status: i32,
) -> Result<i32> {
    if let Some(status) = enter(&mut caller, "proxy_send_local_response")? {
        return Ok(status);
    }
    let (Some(details), Some(body), Some(headers)) = (
        read(&mut caller, details_ptr, details_len),
        read(&mut caller, body_ptr, body_len),
        read(&mut caller, headers_ptr, headers_len),
    ) else {
        return Ok(status::INVALID_MEMORY_ACCESS);
    };
    let Some(headers) = pairs::deserialize(&headers) else { return Ok(status::BAD_ARGUMENT) };
    let flavor = caller.data().flavor;
    let id = caller.data().effective;
    let Some(stream) = caller.data_mut().stream() else { return Ok(status::BAD_ARGUMENT) };
    if stream.local_response.is_some() {
        // Kong traps ("local response already stashed"); Envoy hangs the client (#28826).
        bail!("{flavor:?}: a second local response on one stream");
    }
    stream.local_response =
        Some(LocalResponse { status: status_code as u32, details, headers, body });
    stream.paused = false;
    stream.request_headers_open = false;
    caller.data_mut().local_replies_due.push(id);
    Ok(status::OK)
}

fn continue_stream(mut caller: Ctx<'_>, stream_type: i32) -> Result<i32> {
    if let Some(status) = enter(&mut caller, "proxy_continue_stream")? {
        return Ok(status);
    }
    const HTTP_REQUEST: i32 = 0;
    if stream_type != HTTP_REQUEST {
        // Kong cannot yield in response phases, and this filter never asks to.
        return Ok(status::BAD_ARGUMENT);
    }
    match caller.data_mut().stream() {
        // Resuming a request that is not paused is a filter bug (Envoy asserts on it).
        Some(stream) if stream.paused => {
            stream.paused = false;
            stream.request_headers_open = false;
            stream.resumed += 1;
            Ok(status::OK)
        }
        _ => Ok(status::BAD_ARGUMENT),
    }
}

#[allow(clippy::too_many_arguments)]
fn http_call(
    mut caller: Ctx<'_>,
    upstream_ptr: i32,
    upstream_len: i32,
    headers_ptr: i32,
    headers_len: i32,
    body_ptr: i32,
    body_len: i32,
    _trailers_ptr: i32,
    _trailers_len: i32,
    timeout_ms: i32,
    ret_token: i32,
) -> Result<i32> {
    if let Some(status) = enter(&mut caller, "proxy_http_call")? {
        return Ok(status);
    }
    let (Some(upstream), Some(headers), Some(body)) = (
        read(&mut caller, upstream_ptr, upstream_len),
        read(&mut caller, headers_ptr, headers_len),
        read(&mut caller, body_ptr, body_len),
    ) else {
        return Ok(status::INVALID_MEMORY_ACCESS);
    };
    let Some(headers) = pairs::deserialize(&headers) else { return Ok(status::BAD_ARGUMENT) };
    let upstream = String::from_utf8_lossy(&upstream).into_owned();
    let state = caller.data();
    // ngx_wasm_module dispatches from request headers (and body), ticks and dispatch
    // callbacks only; elsewhere (response headers, on_log, on_configure) it refuses.
    let kong_allows =
        matches!(state.phase, Phase::RequestHeaders | Phase::Tick | Phase::CallResponse);
    if state.flavor == Flavor::Kong && !kong_allows {
        bail!("Kong: dispatch_http_call is not allowed in {:?}", state.phase);
    }
    let has = |name: &str| headers.iter().any(|(k, _)| k == name.as_bytes());
    let target_known = match state.flavor {
        // Envoy looks the upstream up among its clusters.
        Flavor::Envoy => state.clusters.contains(&upstream),
        // ngx_wasm_module takes a resolvable host, with an optional port.
        Flavor::Kong => is_host_port(&upstream),
    };
    let required = match state.flavor {
        Flavor::Envoy => has(":method") && has(":path") && has(":authority"),
        Flavor::Kong => has(":method") && has(":path"),
    };
    if !target_known || !required || timeout_ms < 0 {
        return Ok(status::BAD_ARGUMENT);
    }
    let state = caller.data_mut();
    let token = state.next_token;
    state.next_token += 1;
    let context = state.effective;
    state.pending.insert(token, context);
    state.dispatches.push(Dispatch {
        token,
        context,
        upstream,
        headers,
        body,
        timeout: Duration::from_millis(timeout_ms as u64),
    });
    Ok(write(&mut caller, ret_token, &token.to_le_bytes()))
}

/// `host[:port]`: a hostname or IP address (ASCII letters, digits, `.`, `-`), and a port.
fn is_host_port(target: &str) -> bool {
    let (host, port) = target.rsplit_once(':').unwrap_or((target, "80"));
    !host.is_empty()
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        && port.parse::<u16>().is_ok_and(|p| p > 0)
}

fn set_effective_context(mut caller: Ctx<'_>, context: i32) -> Result<i32> {
    if let Some(status) = enter(&mut caller, "proxy_set_effective_context")? {
        return Ok(status);
    }
    let state = caller.data_mut();
    let context = context as u32;
    if context != state.root_id && !state.streams.contains_key(&context) {
        return Ok(status::BAD_ARGUMENT);
    }
    state.effective = context;
    Ok(status::OK)
}

/// A property by path (segments joined with NUL, no trailing NUL). Values are bytes as the
/// host stored them: on Kong every value is a string, on Envoy some are typed binary.
fn get_property(
    mut caller: Ctx<'_>,
    path_ptr: i32,
    path_len: i32,
    ret_ptr: i32,
    ret_len: i32,
) -> Result<i32> {
    if let Some(status) = enter(&mut caller, "proxy_get_property")? {
        return Ok(status);
    }
    let Some(path) = read(&mut caller, path_ptr, path_len) else {
        return Ok(status::INVALID_MEMORY_ACCESS);
    };
    match caller.data().properties.get(&path).cloned() {
        Some(value) => give(&mut caller, &value, ret_ptr, ret_len),
        None => Ok(status::NOT_FOUND),
    }
}

fn set_property(
    mut caller: Ctx<'_>,
    path_ptr: i32,
    path_len: i32,
    value_ptr: i32,
    value_len: i32,
) -> Result<i32> {
    if let Some(status) = enter(&mut caller, "proxy_set_property")? {
        return Ok(status);
    }
    let (Some(path), Some(value)) =
        (read(&mut caller, path_ptr, path_len), read(&mut caller, value_ptr, value_len))
    else {
        return Ok(status::INVALID_MEMORY_ACCESS);
    };
    caller.data_mut().properties.insert(path, value);
    Ok(status::OK)
}

/// `proxy_define_metric`: a counter (0), gauge (1) or histogram (2) by name; defining a name
/// again answers the same id (as Envoy and ngx_wasm_module do).
fn define_metric(
    mut caller: Ctx<'_>,
    kind: i32,
    name_ptr: i32,
    name_len: i32,
    ret_id: i32,
) -> Result<i32> {
    if let Some(status) = enter(&mut caller, "proxy_define_metric")? {
        return Ok(status);
    }
    let Some(name) = read(&mut caller, name_ptr, name_len) else {
        return Ok(status::INVALID_MEMORY_ACCESS);
    };
    let kind = match kind {
        0 => MetricKind::Counter,
        1 => MetricKind::Gauge,
        2 => MetricKind::Histogram,
        _ => return Ok(status::BAD_ARGUMENT),
    };
    let name = String::from_utf8_lossy(&name).into_owned();
    let metrics = &mut caller.data_mut().metrics;
    let id = match metrics.iter().position(|m| m.name == name) {
        Some(at) => at,
        None => {
            metrics.push(Metric { name, kind, value: 0 });
            metrics.len() - 1
        }
    };
    Ok(write(&mut caller, ret_id, &(id as u32).to_le_bytes()))
}

/// `proxy_done`: the root context has finished what its `on_done` started. Envoy answers
/// NOT_FOUND when no `on_done` is pending; ngx_wasm_module traps (not implemented).
fn done(mut caller: Ctx<'_>) -> Result<i32> {
    if let Some(status) = enter(&mut caller, "proxy_done")? {
        return Ok(status);
    }
    let state = caller.data_mut();
    if state.flavor == Flavor::Kong {
        bail!("host trap (function not yet implemented): proxy_done");
    }
    if state.root_state != RootState::Finishing {
        return Ok(status::NOT_FOUND);
    }
    state.root_state = RootState::Done;
    Ok(status::OK)
}

/// How a metric changes.
#[derive(Clone, Copy)]
enum MetricChange {
    Increment(i64),
    Record(i64),
}

/// `proxy_increment_metric`. ngx_wasm_module traps on a gauge ("metric not a counter");
/// Envoy adds to it. A counter never goes down.
fn increment_metric(caller: Ctx<'_>, id: i32, offset: i64) -> Result<i32> {
    change_metric(caller, "proxy_increment_metric", id, MetricChange::Increment(offset))
}

/// `proxy_record_metric`: sets a gauge. A counter is only incremented (ngx_wasm_module
/// refuses to record one; so does this host, on both flavors).
fn record_metric(caller: Ctx<'_>, id: i32, value: i64) -> Result<i32> {
    change_metric(caller, "proxy_record_metric", id, MetricChange::Record(value))
}

fn change_metric(
    mut caller: Ctx<'_>,
    hostcall: &str,
    id: i32,
    change: MetricChange,
) -> Result<i32> {
    if let Some(status) = enter(&mut caller, hostcall)? {
        return Ok(status);
    }
    let state = caller.data_mut();
    let flavor = state.flavor;
    let Some(metric) = state.metrics.get_mut(id as u32 as usize) else {
        return Ok(status::NOT_FOUND);
    };
    match (change, metric.kind, flavor) {
        (MetricChange::Increment(offset), MetricKind::Counter, _) if offset < 0 => {
            Ok(status::BAD_ARGUMENT)
        }
        (MetricChange::Increment(_), MetricKind::Gauge | MetricKind::Histogram, Flavor::Kong) => {
            bail!(
                "host trap (internal error): could not increment metric id \"{id}\": metric not a counter"
            )
        }
        (MetricChange::Record(_), MetricKind::Counter, Flavor::Kong) => {
            bail!("host trap: cannot record a counter")
        }
        (MetricChange::Record(_), MetricKind::Counter, Flavor::Envoy) => Ok(status::BAD_ARGUMENT),
        (MetricChange::Increment(offset), _, _) => {
            metric.value = metric.value.saturating_add(offset);
            Ok(status::OK)
        }
        (MetricChange::Record(value), _, _) => {
            metric.value = value;
            Ok(status::OK)
        }
    }
}

fn get_metric(mut caller: Ctx<'_>, id: i32, ret_value: i32) -> Result<i32> {
    if let Some(status) = enter(&mut caller, "proxy_get_metric")? {
        return Ok(status);
    }
    let Some(metric) = caller.data().metrics.get(id as u32 as usize) else {
        return Ok(status::NOT_FOUND);
    };
    let value = metric.value as u64;
    Ok(write(&mut caller, ret_value, &value.to_le_bytes()))
}

/// WASI `fd_write`: stdout and stderr go to the host's record (the SDK's panic message).
fn fd_write(mut caller: Ctx<'_>, _fd: i32, iovs: i32, count: i32, ret_written: i32) -> Result<i32> {
    let mut written = 0u32;
    for i in 0..count {
        let Some(iov) = read(&mut caller, iovs + 8 * i, 8) else { return Ok(21) };
        let ptr = i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
        let len = i32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
        let Some(bytes) = read(&mut caller, ptr, len) else { return Ok(21) };
        written += bytes.len() as u32;
        caller.data_mut().stdio.extend_from_slice(&bytes);
    }
    Ok(match write(&mut caller, ret_written, &written.to_le_bytes()) {
        status::OK => 0,
        _ => 21, // WASI EFAULT
    })
}

fn environ_sizes_get(mut caller: Ctx<'_>, ret_count: i32, ret_size: i32) -> Result<i32> {
    let ok = write(&mut caller, ret_count, &0u32.to_le_bytes()) == status::OK
        && write(&mut caller, ret_size, &0u32.to_le_bytes()) == status::OK;
    Ok(if ok { 0 } else { 21 })
}

/// WASI `random_get`: deterministic bytes, so runs repeat exactly.
fn random_get(mut caller: Ctx<'_>, ptr: i32, len: i32) -> Result<i32> {
    let bytes: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(7)).collect();
    Ok(if write(&mut caller, ptr, &bytes) == status::OK { 0 } else { 21 })
}

fn memory(caller: &mut Ctx<'_>) -> Option<wasmtime::Memory> {
    match caller.get_export("memory") {
        Some(Extern::Memory(memory)) => Some(memory),
        _ => None,
    }
}

/// `len` bytes of guest memory at `ptr`, if they are all inside it.
fn read(caller: &mut Ctx<'_>, ptr: i32, len: i32) -> Option<Vec<u8>> {
    let memory = memory(caller)?;
    let start = ptr as u32 as usize;
    let end = start.checked_add(len as u32 as usize)?;
    memory.data(&caller).get(start..end).map(<[u8]>::to_vec)
}

fn write(caller: &mut Ctx<'_>, ptr: i32, bytes: &[u8]) -> i32 {
    let Some(memory) = memory(caller) else { return status::INVALID_MEMORY_ACCESS };
    match memory.write(&mut *caller, ptr as u32 as usize, bytes) {
        Ok(()) => status::OK,
        Err(_) => status::INVALID_MEMORY_ACCESS,
    }
}

/// Hands `bytes` to the guest in memory from its own allocator (the SDK takes ownership of
/// the buffer), writing the address and length to `ret_ptr` and `ret_len`.
fn give(caller: &mut Ctx<'_>, bytes: &[u8], ret_ptr: i32, ret_len: i32) -> Result<i32> {
    let address = if bytes.is_empty() {
        0
    } else {
        let allocate = match caller.get_export("proxy_on_memory_allocate") {
            Some(Extern::Func(f)) => f.typed::<i32, i32>(&*caller)?,
            _ => return Err(anyhow!("the module exports no proxy_on_memory_allocate")),
        };
        let address = allocate.call(&mut *caller, bytes.len() as i32)?;
        if address == 0 || write(caller, address, bytes) != status::OK {
            bail!("proxy_on_memory_allocate({}) gave no usable memory", bytes.len());
        }
        address
    };
    let len = bytes.len() as u32;
    if write(caller, ret_ptr, &address.to_le_bytes()) != status::OK
        || write(caller, ret_len, &len.to_le_bytes()) != status::OK
    {
        return Ok(status::INVALID_MEMORY_ACCESS);
    }
    Ok(status::OK)
}
