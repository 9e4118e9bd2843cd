//! The host's own semantics, checked with tiny guests written in WAT: what Kong refuses or
//! traps on, calls made during `_initialize`, properties. The filter never calls these, so
//! only a guest that does can show the host behaves like the gateway.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use paystile_harness::host::{Action, Flavor, Vm, pairs};

/// A guest whose `_initialize`, request-headers and response-headers callbacks run the given
/// WAT instructions. It imports the hostcalls these tests use and allocates from a bump heap;
/// its data holds the strings they pass.
fn guest(initialize: &str, request_headers: &str, response_headers: &str) -> Vec<u8> {
    let dispatch_headers = pairs::serialize(&pairs::pairs(&[
        (":method", "POST"),
        (":path", "/v1/holds"),
        (":authority", "paystile-ledger"),
    ]));
    let escaped: String = dispatch_headers.iter().map(|b| format!("\\{b:02x}")).collect();
    let wat = format!(
        r#"(module
  (import "env" "proxy_done" (func $done (result i32)))
  (import "env" "proxy_get_log_level" (func $get_log_level (param i32) (result i32)))
  (import "env" "proxy_get_status" (func $get_status (param i32 i32 i32) (result i32)))
  (import "env" "proxy_grpc_cancel" (func $grpc_cancel (param i32) (result i32)))
  (import "env" "proxy_set_tick_period_milliseconds" (func $set_tick (param i32) (result i32)))
  (import "env" "proxy_get_property" (func $get_property (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_property" (func $set_property (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_http_call" (func $http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 65536))
  (data (i32.const 1024) "request\00path")      ;; 12 bytes
  (data (i32.const 1040) "x-path")             ;; 6
  (data (i32.const 1056) "paystile\00seen")     ;; 13
  (data (i32.const 1072) "yes")                ;; 3
  (data (i32.const 1088) "paystile_ledger")    ;; 15
  (data (i32.const 1200) "{escaped}")
  (func (export "_initialize") {initialize})
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $at i32)
    (local.set $at (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $size)))
    (local.get $at))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) {request_headers})
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32) {response_headers})
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_log") (param i32))
  (func (export "proxy_on_delete") (param i32))
  (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32))
  (func (export "proxy_on_tick") (param i32)))"#,
    );
    assert_eq!(dispatch_headers.len(), DISPATCH_HEADERS_LEN);
    wat::parse_str(&wat).unwrap()
}

/// The length of the serialized dispatch headers at offset 1200.
const DISPATCH_HEADERS_LEN: usize = 84;

/// `(drop (call …)) (i32.const 0)`: call a hostcall, ignore its status, continue.
fn calls(call: &str) -> String {
    format!("(drop {call}) (i32.const 0)")
}

const CONTINUE: &str = "(i32.const 0)";

fn request() -> Vec<(Vec<u8>, Vec<u8>)> {
    pairs::pairs(&[(":method", "GET"), (":path", "/x")])
}

#[test]
fn kong_traps_on_the_hostcalls_it_has_not_implemented_and_envoy_does_not() {
    for call in [
        "(call $done)",
        "(call $get_log_level (i32.const 2048))",
        "(call $get_status (i32.const 2048) (i32.const 2052) (i32.const 2056))",
        "(call $grpc_cancel (i32.const 1))",
    ] {
        let wasm = guest("", &calls(call), CONTINUE);
        let mut envoy = Vm::load_bytes(&wasm, Flavor::Envoy).unwrap();
        assert_eq!(envoy.request_headers(request()).unwrap().1, Action::Continue, "{call}");
        // Envoy has `proxy_done` (NOT_FOUND unless a root's on_done is pending); this host
        // implements it. The others it records as not implemented.
        let recorded = if call == "(call $done)" { 0 } else { 1 };
        assert_eq!(envoy.unimplemented_calls().len(), recorded, "recorded: {call}");

        let mut kong = Vm::load_bytes(&wasm, Flavor::Kong).unwrap();
        let error = kong.request_headers(request()).unwrap_err();
        assert!(
            format!("{error:#}").contains("host trap (function not yet implemented)"),
            "{call}: {error:#}"
        );
    }
}

#[test]
fn kong_refuses_pause_and_dispatch_while_response_headers_are_processed() {
    let pause = guest("", CONTINUE, "(i32.const 1)");
    let mut envoy = Vm::load_bytes(&pause, Flavor::Envoy).unwrap();
    let (id, _) = envoy.request_headers(request()).unwrap();
    assert_eq!(
        envoy.response_headers(id, pairs::pairs(&[(":status", "200")])).unwrap(),
        Action::Pause
    );
    let mut kong = Vm::load_bytes(&pause, Flavor::Kong).unwrap();
    let (id, _) = kong.request_headers(request()).unwrap();
    assert!(kong.response_headers(id, pairs::pairs(&[(":status", "200")])).is_err());

    // Dispatch to the Envoy cluster name from response headers: Envoy takes it, Kong traps.
    let dispatch = calls(
        "(call $http_call (i32.const 1088) (i32.const 15) (i32.const 1200) (i32.const 84)
                          (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
                          (i32.const 1000) (i32.const 2048))",
    );
    let wasm = guest("", CONTINUE, &dispatch);
    let mut envoy = Vm::load_bytes(&wasm, Flavor::Envoy).unwrap();
    let (id, _) = envoy.request_headers(request()).unwrap();
    envoy.response_headers(id, pairs::pairs(&[(":status", "200")])).unwrap();
    let dispatches = envoy.take_dispatches();
    assert_eq!(dispatches.len(), 1);
    assert_eq!(dispatches[0].path(), "/v1/holds");
    let mut kong = Vm::load_bytes(&wasm, Flavor::Kong).unwrap();
    let (id, _) = kong.request_headers(request()).unwrap();
    let error = kong.response_headers(id, pairs::pairs(&[(":status", "200")])).unwrap_err();
    assert!(format!("{error:#}").contains("not allowed in ResponseHeaders"), "{error:#}");
}

#[test]
fn only_logging_and_wasi_are_allowed_during_initialize() {
    let wasm = guest("(drop (call $set_tick (i32.const 10)))", CONTINUE, CONTINUE);
    for flavor in [Flavor::Envoy, Flavor::Kong] {
        let error = Vm::load_bytes(&wasm, flavor).err().expect("refused");
        assert!(format!("{error:#}").contains("called during _initialize"), "{error:#}");
    }
}

#[test]
fn properties_are_read_and_written_by_path() {
    // Reads request.path into a header, and sets paystile.seen.
    let body = "(drop (call $get_property (i32.const 1024) (i32.const 12) (i32.const 2048) (i32.const 2052)))
        (drop (call $add_header (i32.const 0) (i32.const 1040) (i32.const 6)
                                (i32.load (i32.const 2048)) (i32.load (i32.const 2052))))
        (drop (call $set_property (i32.const 1056) (i32.const 13) (i32.const 1072) (i32.const 3)))
        (i32.const 0)";
    let mut vm = Vm::load_bytes(&guest("", body, CONTINUE), Flavor::Envoy).unwrap();
    vm.set_property(&["request", "path"], b"/v1/forecast");
    let (id, _) = vm.request_headers(request()).unwrap();
    assert_eq!(vm.stream(id).unwrap().request_header("x-path").as_deref(), Some("/v1/forecast"));
    assert_eq!(vm.property(&["paystile", "seen"]), Some(&b"yes"[..]));
}
