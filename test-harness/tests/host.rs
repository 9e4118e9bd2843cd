//! The release filter in the wasmtime proxy-wasm host, every path scripted request by
//! request, and each test run twice: with the host behaving like Envoy, and like Kong.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use paystile_filter::settle::MAX_BATCH;
use paystile_harness::host::{Action, Dispatch, Flavor, LEDGER_CLUSTER, Reply, Vm, pairs};
use paystile_protocol::jws::SigningKey;
use paystile_protocol::l402::{self, Identifier, Offer};
use paystile_protocol::pay_token::{self, PayTokenClaims, Scope};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const TOKEN_SECRET: &str = "host-test-token-secret-0123456789";
const L402_SECRET: &str = "host-test-l402-secret-0123456789abcdef";
const GATEWAY_KEY: &str = "host-test-gateway-key-0123456789";
const KONG_LEDGER: &str = "127.0.0.1:8787";
const FLAVORS: [Flavor; 2] = [Flavor::Envoy, Flavor::Kong];

/// The filter configuration for `flavor`: only the ledger's address differs.
fn config(flavor: Flavor) -> Value {
    json!({
        "service_id": "weather",
        "routes": [{"path_prefix": "/v1/forecast", "price_usdc": "0.001"}],
        "ledger": {
            "upstream": upstream(flavor),
            "gateway_key": GATEWAY_KEY,
            "timeout_ms": 800,
        },
        "pay_token": {"keys": [{"alg": "HS256", "secret": TOKEN_SECRET}]},
        "l402": {"secret": L402_SECRET, "budget_usdc": "0.01", "sats_per_usdc": 1000},
    })
}

fn upstream(flavor: Flavor) -> &'static str {
    match flavor {
        Flavor::Envoy => LEDGER_CLUSTER,
        Flavor::Kong => KONG_LEDGER,
    }
}

fn vm_with(flavor: Flavor, config: &Value) -> Vm {
    let mut vm = Vm::load(flavor).unwrap();
    assert!(vm.configure(config.to_string().as_bytes()).unwrap(), "{:?}", vm.logs());
    vm
}

fn vm(flavor: Flavor) -> Vm {
    vm_with(flavor, &config(flavor))
}

fn bearer() -> String {
    let claims = PayTokenClaims {
        sub: "agent".into(),
        jti: "tok_host".into(),
        service_id: Some("weather".into()),
        limit_usdc: "1".parse().unwrap(),
        scope: Scope::Single,
        buyer_tag: None,
        exp: 1_900_000_000 + 3_600,
        iat: None,
        nbf: None,
        iss: None,
        aud: None,
        sandbox: false,
    };
    format!("Bearer {}", pay_token::sign(&claims, &SigningKey::hs256(TOKEN_SECRET)))
}

fn l402_credential() -> String {
    let preimage = [4u8; 32];
    let identifier =
        Identifier { payment_hash: Sha256::digest(preimage).into(), token_id: [8; 32] };
    let offer = Offer {
        service_id: "weather".into(),
        valid_until: 1_900_000_000 + 3_600,
        budget: "0.01".parse().unwrap(),
        capabilities: vec![],
        sandbox: false,
    };
    let macaroon = l402::mint(L402_SECRET.as_bytes(), &identifier, &offer);
    format!("L402 {}:{}", l402::encode_macaroon(&macaroon), hex::encode(preimage))
}

fn get(path: &str, authorization: Option<&str>) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut headers = pairs(&[(":method", "GET"), (":path", path), (":authority", "api.test")]);
    if let Some(authorization) = authorization {
        headers.push((b"authorization".to_vec(), authorization.as_bytes().to_vec()));
    }
    headers
}

/// The one dispatch made since the last look, checked to be a well-formed ledger call.
fn one_ledger_call(vm: &mut Vm, flavor: Flavor, path: &str) -> Dispatch {
    let dispatches = vm.take_dispatches();
    assert_eq!(dispatches.len(), 1, "{dispatches:?}");
    let call = dispatches.into_iter().next().unwrap();
    assert_eq!(call.upstream, upstream(flavor));
    assert_eq!(call.path(), path);
    assert_eq!(call.header(":method").as_deref(), Some("POST"));
    assert_eq!(call.header(":authority").as_deref(), Some("paystile-ledger"));
    assert_eq!(call.header("authorization"), Some(format!("Bearer {GATEWAY_KEY}")));
    assert_eq!(call.timeout, Duration::from_millis(800));
    call
}

fn hold(charge_id: &str) -> Reply {
    Reply::json(
        200,
        &json!({"chargeId": charge_id, "amountUsdc": "0.001", "remainingUsdc": "0.999", "replayed": false}),
    )
}

fn settled(charge_ids: &[&str]) -> Reply {
    let results: Vec<Value> =
        charge_ids.iter().map(|id| json!({"chargeId": id, "status": "committed"})).collect();
    Reply::json(200, &json!({ "results": results }))
}

/// A paid call up to the upstream: request, reserve dispatch, hold. Answers the stream.
fn admitted(vm: &mut Vm, flavor: Flavor, authorization: &str, charge_id: &str) -> u32 {
    let (id, action) = vm.request_headers(get("/v1/forecast/oslo", Some(authorization))).unwrap();
    assert_eq!(action, Action::Pause);
    let call = one_ledger_call(vm, flavor, "/v1/holds");
    vm.reply(call.token, hold(charge_id)).unwrap();
    id
}

/// The local response of stream `id`: status and body.
fn answered(vm: &Vm, id: u32) -> (u32, Value) {
    let response = vm.stream(id).unwrap().local_response.as_ref().expect("a local response");
    assert_eq!(response.headers_named("content-type"), ["application/json"]);
    (response.status, response.json())
}

#[test]
fn a_paid_call_holds_forwards_reports_and_commits_on_the_next_tick() {
    for flavor in FLAVORS {
        let mut vm = vm(flavor);
        assert_eq!(vm.tick_period(), Duration::from_millis(50));
        let mut headers = get("/v1/forecast/oslo", Some(&bearer()));
        headers.push((b"x-charge-id".to_vec(), b"ch_forged".to_vec()));
        let (id, action) = vm.request_headers(headers).unwrap();
        assert_eq!(action, Action::Pause, "{flavor:?}");
        let call = one_ledger_call(&mut vm, flavor, "/v1/holds");
        // The ledger is given the credential itself, to verify: never a grant to trust.
        assert_eq!(call.json()["credential"], bearer(), "{flavor:?}");
        assert_eq!(call.json().get("token"), None);
        assert_eq!(call.json()["priceUsdc"], "0.001000");
        assert!(vm.stream(id).unwrap().resumed == 0, "paused until the ledger answers");

        vm.reply(call.token, hold("ch_1")).unwrap();
        let stream = vm.stream(id).unwrap();
        assert_eq!(stream.resumed, 1);
        assert_eq!(stream.request_header("authorization"), None, "credential stripped");
        assert_eq!(stream.request_header("x-charge-id").as_deref(), Some("ch_1"));
        assert!(stream.local_response.is_none());

        let action = vm.response_headers(id, pairs(&[(":status", "200")])).unwrap();
        assert_eq!(action, Action::Continue);
        let stream = vm.stream(id).unwrap();
        assert_eq!(stream.response_header("x-charge-id").as_deref(), Some("ch_1"));
        assert_eq!(stream.response_header("x-amount-usdc").as_deref(), Some("0.001000"));
        assert_eq!(stream.response_header("x-remaining-usdc").as_deref(), Some("0.999000"));
        assert!(vm.take_dispatches().is_empty(), "{flavor:?}: no dispatch in response headers");
        vm.end(id).unwrap();

        vm.tick().unwrap();
        let settle = one_ledger_call(&mut vm, flavor, "/v1/holds/settle");
        assert_eq!(
            settle.json()["settlements"],
            json!([{"chargeId": "ch_1", "outcome": "commit", "upstreamStatus": 200}])
        );
        vm.reply(settle.token, settled(&["ch_1"])).unwrap();
        vm.advance(Duration::from_secs(10));
        vm.tick().unwrap();
        assert!(vm.take_dispatches().is_empty(), "an acknowledged batch is not sent again");
        assert!(vm.unimplemented_calls().is_empty(), "{:?}", vm.unimplemented_calls());
    }
}

#[test]
fn a_settle_backlog_goes_out_batch_after_batch_not_one_batch_a_tick() {
    for flavor in FLAVORS {
        let mut vm = vm(flavor);
        let bearer = bearer();
        let calls = 2 * MAX_BATCH + 20;
        for n in 0..calls {
            let id = admitted(&mut vm, flavor, &bearer, &format!("ch_{n}"));
            vm.response_headers(id, pairs(&[(":status", "200")])).unwrap();
            vm.end(id).unwrap();
        }
        let mut sent = Vec::new();
        let mut settle = |vm: &mut Vm| {
            let call = one_ledger_call(vm, flavor, "/v1/holds/settle");
            let ids: Vec<String> = call.json()["settlements"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["chargeId"].as_str().unwrap().to_owned())
                .collect();
            let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
            vm.reply(call.token, settled(&refs)).unwrap();
            sent.push(ids.len());
        };
        vm.tick().unwrap();
        settle(&mut vm);
        // No tick in between: a full batch waiting goes as soon as the last is acknowledged.
        settle(&mut vm);
        assert!(vm.take_dispatches().is_empty(), "{flavor:?}: 20 waiting go with the tick");
        vm.tick().unwrap();
        settle(&mut vm);
        assert_eq!(sent, [MAX_BATCH, MAX_BATCH, 20], "{flavor:?}");
    }
}

#[test]
fn unpriced_routes_pass_at_once_without_a_spoofed_charge_id() {
    for flavor in FLAVORS {
        let mut vm = vm(flavor);
        let mut headers = get("/healthz", Some("Bearer whatever"));
        headers.push((b"x-charge-id".to_vec(), b"ch_forged".to_vec()));
        let (id, action) = vm.request_headers(headers).unwrap();
        assert_eq!(action, Action::Continue);
        assert!(vm.take_dispatches().is_empty());
        let stream = vm.stream(id).unwrap();
        assert_eq!(stream.resumed, 0, "a request that was never paused is not resumed");
        assert_eq!(stream.request_header("x-charge-id"), None);
        assert_eq!(stream.request_header("authorization").as_deref(), Some("Bearer whatever"));
        vm.response_headers(id, pairs(&[(":status", "200")])).unwrap();
        assert_eq!(vm.stream(id).unwrap().response_header("x-amount-usdc"), None);
    }
}

#[test]
fn no_credential_gets_both_challenges_minted_by_the_ledger() {
    for flavor in FLAVORS {
        let mut vm = vm(flavor);
        let (id, action) = vm.request_headers(get("/v1/forecast", None)).unwrap();
        assert_eq!(action, Action::Pause);
        let call = one_ledger_call(&mut vm, flavor, "/v1/l402/challenges");
        assert_eq!(call.json()["amountMsat"], 10_000);
        let challenge = json!({
            "tokenId": format!("l402_{}", "01".repeat(32)), "macaroon": "AgE=",
            "invoice": "lnbcrt100n1x", "paymentHash": "00".repeat(32), "budgetUsdc": "0.01",
            "amountMsat": 10_000, "validUntil": 1_900_003_600u64, "sandbox": false
        });
        vm.reply(call.token, Reply::json(200, &challenge)).unwrap();
        let (status, body) = answered(&vm, id);
        assert_eq!((status, body["code"].as_str()), (402, Some("payment_required")));
        let response = vm.stream(id).unwrap().local_response.clone().unwrap();
        assert_eq!(
            response.headers_named("www-authenticate"),
            [
                r#"L402 macaroon="AgE=", invoice="lnbcrt100n1x""#,
                r#"Bearer realm="paystile", error="payment_required""#,
                r#"L402 macaroon="AgE=", invoice="lnbcrt100n1x""#,
            ]
        );
        assert_eq!(vm.stream(id).unwrap().resumed, 0, "a refused request is never resumed");
    }
}

/// The ledger's challenge number `i`: invoice `lnbcrt<i>`.
fn minted(i: usize) -> Value {
    json!({
        "tokenId": format!("l402_{i:064x}"), "macaroon": format!("AgE{i}="),
        "invoice": format!("lnbcrt{i}"), "paymentHash": "00".repeat(32), "budgetUsdc": "0.01",
        "amountMsat": 10_000, "validUntil": 1_900_086_400u64, "sandbox": false
    })
}

/// A refill's answer: challenges `first..first + count`.
fn batch(first: usize, count: usize) -> Reply {
    let challenges: Vec<Value> = (first..first + count).map(minted).collect();
    Reply::json(200, &json!({ "challenges": challenges }))
}

/// A 402 the pool answers: at once, without a dispatch. Its L402 challenge's invoice.
fn pooled_402(vm: &mut Vm) -> String {
    let (id, action) = vm.request_headers(get("/v1/forecast", None)).unwrap();
    assert_eq!(action, Action::Pause);
    assert!(vm.take_dispatches().is_empty(), "a pooled 402 calls nobody");
    let response = vm.stream(id).unwrap().local_response.clone().expect("answered at once");
    assert_eq!(response.status, 402);
    let challenges = response.headers_named("www-authenticate");
    // L402 first and last (for clients that keep one field), Bearer between.
    assert_eq!(challenges.len(), 3, "{challenges:?}");
    assert_eq!(challenges[0], challenges[2]);
    let (_, invoice) = l402::parse_challenge(&challenges[0]).unwrap();
    vm.end(id).unwrap();
    invoice.to_owned()
}

/// A 402 the pool has nothing for: the ledger mints its challenge, number `i`.
fn minted_402(vm: &mut Vm, flavor: Flavor, i: usize) {
    let (id, action) = vm.request_headers(get("/v1/forecast", None)).unwrap();
    assert_eq!(action, Action::Pause);
    let call = one_ledger_call(vm, flavor, "/v1/l402/challenges");
    assert_eq!(call.json().get("count"), None, "a 402's own call asks for one");
    vm.reply(call.token, Reply::json(200, &minted(i))).unwrap();
    assert_eq!(answered(vm, id).0, 402);
    vm.end(id).unwrap();
}

#[test]
fn the_tick_mints_challenges_ahead_and_each_402_takes_its_own() {
    for flavor in FLAVORS {
        let mut vm = vm(flavor);
        vm.tick().unwrap();
        assert!(vm.take_dispatches().is_empty(), "{flavor:?}: nothing minted before a 402");
        minted_402(&mut vm, flavor, 1_000);
        // One 402 in the last minute: the tick asks for one.
        vm.tick().unwrap();
        let refill = one_ledger_call(&mut vm, flavor, "/v1/l402/challenges");
        assert_eq!(refill.json()["count"], 1);
        assert_eq!(refill.json()["amountMsat"], 10_000);
        vm.reply(refill.token, batch(0, 1)).unwrap();
        assert!(vm.take_dispatches().is_empty(), "{flavor:?}: full: no refill chained");
        assert_eq!(pooled_402(&mut vm), "lnbcrt0");

        // A burst: the pool is empty, so each 402 has its own minted, and the next tick
        // asks for a batch (at least 16, or as many as the minute's 402s).
        for i in 0..30 {
            minted_402(&mut vm, flavor, 2_000 + i);
        }
        vm.tick().unwrap();
        let refill = one_ledger_call(&mut vm, flavor, "/v1/l402/challenges");
        assert_eq!(refill.json()["count"], 16, "{flavor:?}");
        // The ledger minted 4 before its time budget ran out: still under half, so the
        // reply's callback asks again at once (Kong allows a dispatch there).
        vm.reply(refill.token, batch(10, 4)).unwrap();
        let chained = one_ledger_call(&mut vm, flavor, "/v1/l402/challenges");
        assert_eq!(chained.json()["count"], 16);
        vm.reply(chained.token, batch(20, 16)).unwrap();
        assert!(vm.take_dispatches().is_empty());
        let handed: Vec<String> = (0..20).map(|_| pooled_402(&mut vm)).collect();
        let expected: Vec<String> = (10..14).chain(20..36).map(|i| format!("lnbcrt{i}")).collect();
        assert_eq!(handed, expected, "{flavor:?}: each once, oldest first");
        // Drained: the next 402 falls back to a challenge of its own.
        minted_402(&mut vm, flavor, 3_000);
        assert!(vm.unimplemented_calls().is_empty(), "{:?}", vm.unimplemented_calls());
    }
}

#[test]
fn a_failed_refill_backs_off_and_402s_mint_their_own_meanwhile() {
    for flavor in FLAVORS {
        let mut vm = vm(flavor);
        minted_402(&mut vm, flavor, 1);
        vm.tick().unwrap();
        let refill = one_ledger_call(&mut vm, flavor, "/v1/l402/challenges");
        // An older ledger refuses the count as an unknown field.
        let refused = json!({"error": "unknown field `count`", "code": "bad_request"});
        vm.reply(refill.token, Reply::json(400, &refused)).unwrap();
        assert!(vm.take_dispatches().is_empty(), "{flavor:?}: no retry straight away");
        let logged = vm.logs().iter().any(|(_, m)| m.contains("minting L402 challenges ahead"));
        assert!(logged, "{flavor:?}: {:?}", vm.logs());
        vm.tick().unwrap();
        assert!(vm.take_dispatches().is_empty(), "{flavor:?}: backing off");
        minted_402(&mut vm, flavor, 2);
        vm.advance(Duration::from_secs(1));
        vm.tick().unwrap();
        let again = one_ledger_call(&mut vm, flavor, "/v1/l402/challenges");
        vm.reply(again.token, Reply::Reset).unwrap();
        vm.advance(Duration::from_secs(1));
        vm.tick().unwrap();
        assert!(vm.take_dispatches().is_empty(), "{flavor:?}: the backoff doubled");
        vm.advance(Duration::from_secs(1));
        vm.tick().unwrap();
        let third = one_ledger_call(&mut vm, flavor, "/v1/l402/challenges");
        vm.reply(third.token, batch(0, 2)).unwrap();
        assert_eq!(pooled_402(&mut vm), "lnbcrt0");
    }
}

#[test]
fn an_l402_credential_is_verified_in_the_wasm_and_held() {
    for flavor in FLAVORS {
        let mut vm = vm(flavor);
        let (id, action) =
            vm.request_headers(get("/v1/forecast", Some(&l402_credential()))).unwrap();
        assert_eq!(action, Action::Pause);
        let call = one_ledger_call(&mut vm, flavor, "/v1/holds");
        assert_eq!(call.json()["credential"], l402_credential(), "{flavor:?}");
        vm.reply(call.token, hold("ch_l402")).unwrap();
        assert_eq!(vm.stream(id).unwrap().request_header("authorization"), None);
        assert_eq!(vm.stream(id).unwrap().resumed, 1);
    }
}

#[test]
fn a_ledger_that_resets_times_out_or_fails_gets_503() {
    for flavor in FLAVORS {
        for reply in [
            Reply::Reset,
            Reply::status(504),
            Reply::status(503),
            Reply::json(500, &json!({"error": "boom"})),
        ] {
            let mut vm = vm(flavor);
            let (id, _) = vm.request_headers(get("/v1/forecast", Some(&bearer()))).unwrap();
            let call = one_ledger_call(&mut vm, flavor, "/v1/holds");
            vm.reply(call.token, reply.clone()).unwrap();
            let (status, body) = answered(&vm, id);
            assert_eq!(
                (status, body["code"].as_str()),
                (503, Some("ledger_unavailable")),
                "{reply:?}"
            );
            let response = vm.stream(id).unwrap().local_response.clone().unwrap();
            assert_eq!(response.headers_named("retry-after"), ["1"]);
            assert_eq!(vm.stream(id).unwrap().resumed, 0);
            // The local reply went through the response callback untouched, and nothing
            // is settled for it.
            let stream = vm.stream(id).unwrap();
            assert_eq!(stream.response_header(":status").as_deref(), Some("503"));
            assert_eq!(stream.response_header("x-amount-usdc"), None);
            vm.end(id).unwrap();
            vm.tick().unwrap();
            assert!(vm.take_dispatches().is_empty());
        }
    }
}

#[test]
fn a_dispatch_the_host_refuses_is_a_503_at_once() {
    for flavor in FLAVORS {
        let mut vm = vm(flavor);
        vm.fail_next("proxy_http_call", 10); // INTERNAL_FAILURE
        let (id, action) = vm.request_headers(get("/v1/forecast", Some(&bearer()))).unwrap();
        assert!(vm.take_dispatches().is_empty());
        assert_eq!(answered(&vm, id).0, 503);
        // Paused or not, the local response ends the request: it never goes upstream.
        assert_eq!(vm.stream(id).unwrap().resumed, 0, "{action:?}");
    }
}

#[test]
fn each_gateway_takes_its_own_kind_of_dispatch_target() {
    // A cluster name is no host for Kong; a host:port is no cluster for Envoy.
    for (flavor, wrong) in [(Flavor::Envoy, KONG_LEDGER), (Flavor::Kong, LEDGER_CLUSTER)] {
        let mut config = config(flavor);
        config["ledger"]["upstream"] = json!(wrong);
        let mut vm = vm_with(flavor, &config);
        let (id, _) = vm.request_headers(get("/v1/forecast", Some(&bearer()))).unwrap();
        assert!(vm.take_dispatches().is_empty(), "{flavor:?}");
        assert_eq!(answered(&vm, id).0, 503, "{flavor:?}");
    }
}

#[test]
fn non_utf8_header_bytes_get_401_and_the_vm_lives_on() {
    for flavor in FLAVORS {
        let mut vm = vm(flavor);
        let mut headers = get("/v1/forecast", None);
        headers.push((b"authorization".to_vec(), b"Bearer \xff\xfe.\x80".to_vec()));
        headers.push((b"x-other".to_vec(), vec![0xc3, 0x28]));
        let (id, _) = vm.request_headers(headers).unwrap();
        assert_eq!(answered(&vm, id).0, 401);
        let mut headers = get("/v1/forecast", None);
        headers.push((b"authorization".to_vec(), b"L402 \xff:\xfe".to_vec()));
        let (id, _) = vm.request_headers(headers).unwrap();
        assert_eq!(answered(&vm, id).0, 401);
        // A non-UTF-8 path is priced (the prefix matches) and challenged, not a crash.
        let mut headers = get("/v1/forecast/x", None);
        headers[1].1 = b"/v1/forecast/\xff".to_vec();
        let (_, action) = vm.request_headers(headers).unwrap();
        assert_eq!(action, Action::Pause);
        one_ledger_call(&mut vm, flavor, "/v1/l402/challenges");
        let paid = admitted(&mut vm, flavor, &bearer(), "ch_after");
        assert_eq!(vm.stream(paid).unwrap().resumed, 1, "the VM still serves");
    }
}

#[test]
fn a_stream_closed_while_its_reserve_is_pending_ignores_the_late_answer() {
    for flavor in FLAVORS {
        let mut vm = vm(flavor);
        let (id, _) = vm.request_headers(get("/v1/forecast", Some(&bearer()))).unwrap();
        let call = one_ledger_call(&mut vm, flavor, "/v1/holds");
        vm.end(id).unwrap();
        match flavor {
            // Envoy still delivers the answer; the SDK finds no stream and drops it.
            Flavor::Envoy => vm.reply(call.token, hold("ch_late")).unwrap(),
            // Kong cancels a finished stream's dispatches: no answer ever comes.
            Flavor::Kong => assert!(vm.reply(call.token, hold("ch_late")).is_err()),
        }
        let stream = vm.stream(id).unwrap();
        assert!(stream.local_response.is_none() && stream.resumed == 0);
        vm.tick().unwrap();
        assert!(vm.take_dispatches().is_empty(), "nothing was held as far as the filter knows");
        // The VM goes on serving.
        admitted(&mut vm, flavor, &bearer(), "ch_next");
    }
}

#[test]
fn queued_settlements_go_in_one_batch_and_a_lost_batch_is_retried() {
    for flavor in FLAVORS {
        let mut vm = vm(flavor);
        let first = admitted(&mut vm, flavor, &bearer(), "ch_a");
        let second = admitted(&mut vm, flavor, &bearer(), "ch_b");
        let third = admitted(&mut vm, flavor, &bearer(), "ch_c");
        vm.response_headers(first, pairs(&[(":status", "200")])).unwrap();
        vm.response_headers(second, pairs(&[(":status", "502")])).unwrap();
        assert_eq!(
            vm.stream(second).unwrap().response_header("x-amount-usdc").as_deref(),
            Some("0.000000")
        );
        vm.end(third).unwrap(); // no response: released
        for id in [first, second] {
            vm.end(id).unwrap();
        }
        vm.tick().unwrap();
        let batch = one_ledger_call(&mut vm, flavor, "/v1/holds/settle");
        let outcomes: Vec<(String, String)> = batch.json()["settlements"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (s["chargeId"].as_str().unwrap().into(), s["outcome"].as_str().unwrap().into())
            })
            .collect();
        let expected = [("ch_a", "commit"), ("ch_b", "release"), ("ch_c", "release")];
        assert_eq!(outcomes, expected.map(|(a, b)| (a.to_owned(), b.to_owned())));

        // The ledger does not answer: after a backoff the same batch goes again.
        vm.reply(batch.token, Reply::Reset).unwrap();
        vm.tick().unwrap();
        assert!(vm.take_dispatches().is_empty(), "{flavor:?}: backs off before retrying");
        vm.advance(Duration::from_secs(6));
        vm.tick().unwrap();
        let retry = one_ledger_call(&mut vm, flavor, "/v1/holds/settle");
        assert_eq!(retry.json()["settlements"], batch.json()["settlements"]);
        vm.reply(retry.token, settled(&["ch_a", "ch_b", "ch_c"])).unwrap();
    }
}

#[test]
fn interleaved_streams_on_one_vm_keep_their_own_charges() {
    for flavor in FLAVORS {
        let mut vm = vm(flavor);
        let (one, _) = vm.request_headers(get("/v1/forecast/1", Some(&bearer()))).unwrap();
        let first = one_ledger_call(&mut vm, flavor, "/v1/holds");
        let (two, _) = vm.request_headers(get("/v1/forecast/2", Some(&l402_credential()))).unwrap();
        let second = one_ledger_call(&mut vm, flavor, "/v1/holds");
        // Answers arrive in the other order.
        vm.reply(second.token, hold("ch_two")).unwrap();
        assert_eq!(vm.stream(one).unwrap().resumed, 0, "stream one still waits");
        vm.reply(
            first.token,
            Reply::json(
                402,
                &json!({
                    "error": "Token limit exceeded", "code": "token_limit_exceeded",
                    "used": "1", "reserved": "0", "limit": "1", "price": "0.001"
                }),
            ),
        )
        .unwrap();
        assert_eq!(
            vm.stream(two).unwrap().request_header("x-charge-id").as_deref(),
            Some("ch_two")
        );
        assert_eq!(answered(&vm, one).0, 402);
        assert!(vm.stream(two).unwrap().local_response.is_none());
        vm.response_headers(two, pairs(&[(":status", "200")])).unwrap();
        assert_eq!(
            vm.stream(two).unwrap().response_header("x-charge-id").as_deref(),
            Some("ch_two")
        );
    }
}

#[test]
fn a_spent_l402_asks_for_a_fresh_challenge_in_the_same_callback() {
    for flavor in FLAVORS {
        let mut vm = vm(flavor);
        let (id, _) = vm.request_headers(get("/v1/forecast", Some(&l402_credential()))).unwrap();
        let call = one_ledger_call(&mut vm, flavor, "/v1/holds");
        let spent = json!({"error": "spent", "code": "token_limit_exceeded", "used": "0.01",
                           "reserved": "0", "limit": "0.01", "price": "0.001"});
        // Kong and Envoy both allow a dispatch from a dispatch's callback.
        vm.reply(call.token, Reply::json(402, &spent)).unwrap();
        let challenge = one_ledger_call(&mut vm, flavor, "/v1/l402/challenges");
        vm.reply(challenge.token, Reply::Reset).unwrap();
        let (status, body) = answered(&vm, id);
        // No fresh challenge to give: the 402 offers the Bearer scheme alone.
        assert_eq!((status, body["code"].as_str()), (402, Some("token_limit_exceeded")));
    }
}

#[test]
fn a_bad_configuration_is_refused_and_named_in_the_log() {
    for flavor in FLAVORS {
        let mut vm = Vm::load(flavor).unwrap();
        let mut bad = config(flavor);
        bad["routes"][0]["price_usdc"] = json!("0.0000001");
        assert!(!vm.configure(bad.to_string().as_bytes()).unwrap());
        let logged: Vec<&str> = vm.logs().iter().map(|(_, m)| m.as_str()).collect();
        assert!(
            logged.iter().any(|m| m.contains("routes[0].price_usdc")),
            "{flavor:?}: {logged:?}"
        );
        assert!(!vm.configure(b"\xff not json").unwrap());
        assert!(
            vm.configure(config(flavor).to_string().as_bytes()).unwrap(),
            "a good one is taken after"
        );
        // Configured again (an update): Kong traps on a second tick period for one root, so
        // the filter asks for it only when the interval changes.
        assert!(vm.configure(config(flavor).to_string().as_bytes()).unwrap(), "{flavor:?}");
    }
}

#[test]
fn the_sdk_traps_on_host_statuses_it_does_not_expect() {
    // proxy-wasm 0.2.5 unwraps these statuses: the host reports a trap, which in a gateway
    // takes the VM down (fail closed). Recorded here so that an SDK upgrade that fixes it
    // shows up as a changed test.
    for flavor in FLAVORS {
        let mut vm = vm(flavor);
        vm.fail_next("proxy_get_current_time_nanoseconds", 2);
        let error = vm.request_headers(get("/v1/forecast", Some(&bearer()))).unwrap_err();
        assert!(
            format!("{error:?}").contains("wasm backtrace"),
            "{flavor:?}: not a trap: {error:#}"
        );
        let (level, message) = vm.logs().last().unwrap();
        assert_eq!(*level, 5, "the SDK's panic hook logs at critical");
        assert!(message.contains("unexpected status: 2"), "{message}");
        // A trapped VM is dead: the gateway never calls it again.
        let again = vm.request_headers(get("/healthz", None)).unwrap_err();
        assert!(format!("{again:#}").contains("trapped earlier"), "{again:#}");
    }
}

#[test]
fn every_kind_of_reserve_answer_takes_its_path() {
    for flavor in FLAVORS {
        // A replay: forwarded under the original charge, reported, never settled again.
        let mut vm = vm(flavor);
        let (id, _) = vm.request_headers(get("/v1/forecast", Some(&bearer()))).unwrap();
        let call = one_ledger_call(&mut vm, flavor, "/v1/holds");
        let replay = json!({"chargeId": "ch_first", "amountUsdc": "0.001", "remainingUsdc": "0.5", "replayed": true});
        vm.reply(call.token, Reply::json(200, &replay)).unwrap();
        assert_eq!(
            vm.stream(id).unwrap().request_header("x-charge-id").as_deref(),
            Some("ch_first")
        );
        vm.response_headers(id, pairs(&[(":status", "200")])).unwrap();
        assert_eq!(
            vm.stream(id).unwrap().response_header("x-charge-id").as_deref(),
            Some("ch_first")
        );
        vm.end(id).unwrap();
        vm.tick().unwrap();
        assert!(vm.take_dispatches().is_empty(), "{flavor:?}: a replay settles nothing");

        // Refusals pass through with their status; nonsense is a 503.
        for (reply, status) in [
            (Reply::json(409, &json!({"error": "in use", "code": "idempotency_key_in_use"})), 409),
            (Reply::json(422, &json!({"error": "revoked", "code": "token_revoked"})), 422),
            (Reply::json(200, &json!({"unexpected": true})), 503),
            (
                Reply::json(
                    401,
                    &json!({"error": "Missing or invalid API key", "code": "unauthorized"}),
                ),
                503,
            ),
        ] {
            let (id, _) = vm.request_headers(get("/v1/forecast", Some(&bearer()))).unwrap();
            let call = one_ledger_call(&mut vm, flavor, "/v1/holds");
            vm.reply(call.token, reply).unwrap();
            assert_eq!(answered(&vm, id).0, status, "{flavor:?}");
        }

        // Pay Tokens alone: the 402 needs no ledger.
        let mut config = config(flavor);
        config["l402"] = Value::Null;
        let mut bearer_only = vm_with(flavor, &config);
        let (id, _) = bearer_only.request_headers(get("/v1/forecast", None)).unwrap();
        assert!(bearer_only.take_dispatches().is_empty());
        assert_eq!(answered(&bearer_only, id).0, 402);

        // Failing open: an unreachable ledger lets the call through unpaid, and says so.
        let mut config = self::config(flavor);
        config["failure_mode"] = json!("open");
        let mut open = vm_with(flavor, &config);
        let (id, _) = open.request_headers(get("/v1/forecast", Some(&bearer()))).unwrap();
        let call = one_ledger_call(&mut open, flavor, "/v1/holds");
        open.reply(call.token, Reply::Reset).unwrap();
        let stream = open.stream(id).unwrap();
        assert_eq!((stream.resumed, stream.request_header("authorization")), (1, None));
        open.response_headers(id, pairs(&[(":status", "200")])).unwrap();
        let stream = open.stream(id).unwrap();
        assert_eq!(stream.response_header("x-amount-usdc").as_deref(), Some("0.000000"));
        assert_eq!(stream.response_header("x-charge-id"), None);
    }
}

#[test]
fn a_metered_call_commits_the_units_the_upstream_reports() {
    for flavor in FLAVORS {
        let mut config = config(flavor);
        config["routes"] = json!([{"path_prefix": "/v1/chat", "metered": {
            "max_usdc": "0.5", "unit_price_usdc": "0.000002", "units_header": "X-Usage-Tokens"
        }}]);
        config.as_object_mut().unwrap().remove("l402");
        let mut vm = vm_with(flavor, &config);
        let mut metered_call = |charge_id: &str, units: &[u8]| {
            let (id, _) = vm.request_headers(get("/v1/chat", Some(&bearer()))).unwrap();
            let call = one_ledger_call(&mut vm, flavor, "/v1/holds");
            assert_eq!(call.json()["priceUsdc"], "0.500000", "{flavor:?}: the maximum is held");
            let hold = json!({"chargeId": charge_id, "amountUsdc": "0.5", "remainingUsdc": "0.5", "replayed": false});
            vm.reply(call.token, Reply::json(200, &hold)).unwrap();
            let mut response = pairs(&[(":status", "200")]);
            response.push((b"x-usage-tokens".to_vec(), units.to_vec()));
            vm.response_headers(id, response).unwrap();
            let stream = vm.stream(id).unwrap();
            let reported = (
                stream.response_header("x-amount-usdc"),
                stream.response_header("x-remaining-usdc"),
            );
            vm.end(id).unwrap();
            reported
        };
        let used = metered_call("ch_used", b"1234");
        assert_eq!(used, (Some("0.002468".into()), Some("0.997532".into())), "{flavor:?}");
        // Bytes that are no count (not even UTF-8): released, and the VM lives on.
        let garbled = metered_call("ch_garbled", b"\xff12");
        assert_eq!(garbled, (Some("0.000000".into()), None), "{flavor:?}");

        vm.tick().unwrap();
        let settle = one_ledger_call(&mut vm, flavor, "/v1/holds/settle");
        assert_eq!(
            settle.json()["settlements"],
            json!([
                {"chargeId": "ch_used", "outcome": "commit", "upstreamStatus": 200, "amountUsdc": "0.002468"},
                {"chargeId": "ch_garbled", "outcome": "release", "upstreamStatus": 200}
            ]),
            "{flavor:?}"
        );
        assert!(vm.unimplemented_calls().is_empty(), "{:?}", vm.unimplemented_calls());
    }
}

/// A VM that prefetches 4 holds for a hot token, kept up to 1 s.
fn prefetching_vm(flavor: Flavor) -> Vm {
    let mut config = config(flavor);
    config["ledger"]["prefetch_holds"] = json!(8);
    config["ledger"]["prefetch_max_age_ms"] = json!(1000);
    vm_with(flavor, &config)
}

/// A hold with `extras` beyond it, of 0.001 each.
fn hold_with_extras(charge_id: &str, extras: &[&str]) -> Reply {
    Reply::json(
        200,
        &json!({"chargeId": charge_id, "amountUsdc": "0.001", "remainingUsdc": "0.995",
            "replayed": false, "extraChargeIds": extras}),
    )
}

/// A cold call, then a hot one whose reserve asks for 8 holds and gets 7 extras named
/// `<prefix>1` to `<prefix>7`; both answered 200 and ended. Their commits wait in the settle
/// queue.
fn warm_up(vm: &mut Vm, flavor: Flavor, prefix: &str) {
    let extras = extras(prefix);
    let extras: Vec<&str> = extras.iter().map(String::as_str).collect();
    for (charge_id, count, reply) in [
        ("ch_cold", None, hold("ch_cold")),
        ("ch_hot", Some(8), hold_with_extras("ch_hot", &extras)),
    ] {
        let (id, action) = vm.request_headers(get("/v1/forecast", Some(&bearer()))).unwrap();
        assert_eq!(action, Action::Pause);
        let call = one_ledger_call(vm, flavor, "/v1/holds");
        assert_eq!(
            call.json().get("count").and_then(Value::as_u64),
            count,
            "{flavor:?}: {charge_id}"
        );
        vm.reply(call.token, reply).unwrap();
        vm.response_headers(id, pairs(&[(":status", "200")])).unwrap();
        vm.end(id).unwrap();
        vm.advance(Duration::from_millis(10));
    }
}

fn extras(prefix: &str) -> Vec<String> {
    (1..=7).map(|i| format!("{prefix}{i}")).collect()
}

/// The settle batch the next tick sends, as (charge id, outcome) pairs, acknowledged with
/// `status` for each.
fn settle_round(vm: &mut Vm, flavor: Flavor, status: &str) -> Vec<(String, String)> {
    vm.tick().unwrap();
    let batch = one_ledger_call(vm, flavor, "/v1/holds/settle");
    let settlements = batch.json()["settlements"].as_array().unwrap().clone();
    let results: Vec<Value> =
        settlements.iter().map(|s| json!({"chargeId": s["chargeId"], "status": status})).collect();
    vm.reply(batch.token, Reply::json(200, &json!({ "results": results }))).unwrap();
    settlements
        .iter()
        .map(|s| (s["chargeId"].as_str().unwrap().into(), s["outcome"].as_str().unwrap().into()))
        .collect()
}

/// The token's next call finds no prefetched hold: it reserves, and the ledger answers that
/// the token is revoked.
fn reserved_and_refused_as_revoked(vm: &mut Vm, flavor: Flavor) {
    let (id, action) = vm.request_headers(get("/v1/forecast", Some(&bearer()))).unwrap();
    assert_eq!(action, Action::Pause, "{flavor:?}: a dropped hold was used");
    let call = one_ledger_call(vm, flavor, "/v1/holds");
    let refusal = json!({"error": "Token revoked", "code": "token_revoked"});
    vm.reply(call.token, Reply::json(422, &refusal)).unwrap();
    assert_eq!(answered(vm, id).0, 422);
}

#[test]
fn a_hot_tokens_calls_go_on_at_once_on_prefetched_holds_and_commit_on_the_tick() {
    for flavor in FLAVORS {
        let mut vm = prefetching_vm(flavor);
        warm_up(&mut vm, flavor, "ch_x");
        assert_eq!(settle_round(&mut vm, flavor, "committed").len(), 2);
        for (i, charge_id) in ["ch_x1", "ch_x2", "ch_x3"].into_iter().enumerate() {
            let (id, action) = vm.request_headers(get("/v1/forecast", Some(&bearer()))).unwrap();
            assert_eq!(action, Action::Continue, "{flavor:?}: no pause on a prefetched hold");
            assert!(vm.take_dispatches().is_empty(), "{flavor:?}: a reserve for call {i}");
            let stream = vm.stream(id).unwrap();
            assert_eq!(stream.request_header("authorization"), None, "credential stripped");
            assert_eq!(stream.request_header("x-charge-id").as_deref(), Some(charge_id));
            let status = if i == 1 { "503" } else { "200" };
            vm.response_headers(id, pairs(&[(":status", status)])).unwrap();
            let stream = vm.stream(id).unwrap();
            if i == 1 {
                assert_eq!(stream.response_header("x-amount-usdc").as_deref(), Some("0.000000"));
            } else {
                assert_eq!(stream.response_header("x-charge-id").as_deref(), Some(charge_id));
                assert_eq!(stream.response_header("x-amount-usdc").as_deref(), Some("0.001000"));
                assert_eq!(stream.response_header("x-remaining-usdc").as_deref(), Some("0.995000"));
            }
            vm.end(id).unwrap();
        }
        let expected = [("ch_x1", "commit"), ("ch_x2", "release"), ("ch_x3", "commit")];
        assert_eq!(
            settle_round(&mut vm, flavor, "committed"),
            expected.map(|(a, b)| (a.to_owned(), b.to_owned()))
        );
        // The pool is down to half a batch: the next call reserves the next batch.
        vm.request_headers(get("/v1/forecast", Some(&bearer()))).unwrap();
        let call = one_ledger_call(&mut vm, flavor, "/v1/holds");
        assert_eq!(call.json()["count"], 8);
        assert!(vm.unimplemented_calls().is_empty(), "{:?}", vm.unimplemented_calls());
    }
}

#[test]
fn unused_prefetched_holds_are_released_at_their_age_and_a_revoked_token_loses_them() {
    for flavor in FLAVORS {
        let mut vm = prefetching_vm(flavor);
        warm_up(&mut vm, flavor, "ch_x");
        settle_round(&mut vm, flavor, "committed");
        vm.advance(Duration::from_millis(1000));
        let released = settle_round(&mut vm, flavor, "released");
        let expected: Vec<_> =
            extras("ch_x").into_iter().map(|id| (id, "release".into())).collect();
        assert_eq!(released, expected, "{flavor:?}");
        // Quiet for a second, the token is cold again: warmed up anew.
        warm_up(&mut vm, flavor, "ch_y");
        settle_round(&mut vm, flavor, "committed");

        // The token is revoked: the next commit comes back `revoked`, and the pool goes.
        let (id, action) = vm.request_headers(get("/v1/forecast", Some(&bearer()))).unwrap();
        assert_eq!(action, Action::Continue);
        vm.response_headers(id, pairs(&[(":status", "200")])).unwrap();
        vm.end(id).unwrap();
        let revoked = settle_round(&mut vm, flavor, "revoked");
        assert!(revoked.contains(&("ch_y1".to_owned(), "commit".to_owned())), "{revoked:?}");
        let released = settle_round(&mut vm, flavor, "released");
        let expected: Vec<_> =
            extras("ch_y").into_iter().skip(1).map(|id| (id, "release".into())).collect();
        assert_eq!(released, expected, "{flavor:?}");
        reserved_and_refused_as_revoked(&mut vm, flavor);
    }
}

/// The kill switch through the adapter: a prefetching VM keeps one revocation poll open
/// from its root context (sent again at once when answered, from the position applied); a
/// poll that names the token drops its pool at once, and the token's next call reserves.
#[test]
fn a_revocation_poll_drops_the_tokens_prefetched_holds_and_polls_again_from_there() {
    for flavor in FLAVORS {
        let mut vm = prefetching_vm(flavor);
        vm.tick().unwrap();
        let polls = vm.take_watch_polls();
        assert_eq!(polls.len(), 1, "{flavor:?}: {polls:?}");
        let poll = &polls[0];
        let watcher = poll.path().strip_prefix("/v1/revocations?watcher=vm-").unwrap().to_owned();
        assert_eq!(watcher.len(), 16, "{flavor:?}: 64 random bits: {watcher}");
        assert_eq!(poll.header("authorization"), Some(format!("Bearer {GATEWAY_KEY}")));
        assert_eq!(poll.timeout, Duration::from_secs(25), "the ledger's wait and some more");
        vm.tick().unwrap();
        assert!(vm.take_watch_polls().is_empty(), "{flavor:?}: a second poll while one waits");
        vm.reply(poll.token, Reply::json(200, &json!({"seq": 4, "tokenIds": []}))).unwrap();
        let polls = vm.take_watch_polls();
        assert_eq!(polls.len(), 1, "{flavor:?}: answered, the next poll goes at once");
        assert_eq!(polls[0].path(), format!("/v1/revocations?watcher=vm-{watcher}&after=4"));

        warm_up(&mut vm, flavor, "ch_x");
        settle_round(&mut vm, flavor, "committed");
        let revocation = json!({"seq": 5, "tokenIds": ["tok_other", "tok_host"]});
        vm.reply(polls[0].token, Reply::json(200, &revocation)).unwrap();
        let next = vm.take_watch_polls();
        assert_eq!(next.len(), 1);
        assert!(next[0].path().ends_with("&after=5"), "{flavor:?}: {}", next[0].path());
        // The pool went: the next call reserves, and the tick releases every extra.
        reserved_and_refused_as_revoked(&mut vm, flavor);
        let released = settle_round(&mut vm, flavor, "released");
        let expected: Vec<_> =
            extras("ch_x").into_iter().map(|id| (id, "release".into())).collect();
        assert_eq!(released, expected, "{flavor:?}");
        // A failed poll is sent again after a pause, from the same position.
        vm.reply(next[0].token, Reply::status(503)).unwrap();
        vm.tick().unwrap();
        assert!(vm.take_watch_polls().is_empty(), "{flavor:?}: retried without a pause");
        vm.advance(Duration::from_millis(250));
        vm.tick().unwrap();
        let retried = vm.take_watch_polls();
        assert_eq!(retried.len(), 1, "{flavor:?}");
        assert!(retried[0].path().ends_with("&after=5"));
    }
}

/// The filter's counters and gauges, through the metrics hostcalls, on Envoy and on Kong
/// 3.8+ (where an increment of a gauge would trap): a paid call, a 402, a ledger outage, a
/// settlement the ledger refuses, and the queue and prefetched holds as gauges.
#[test]
fn metrics_count_what_the_filter_does() {
    for flavor in FLAVORS {
        let mut config = config(flavor);
        config["ledger"]["prefetch_holds"] = json!(4);
        // Pay Tokens alone: a 402 is answered at once.
        config.as_object_mut().unwrap().remove("l402");
        let mut vm = vm_with(flavor, &config);
        let bearer = bearer();
        assert_eq!(vm.metric("paystile_paid"), Some(0), "{flavor:?}: defined at configure");

        // Paid and committed.
        let id = admitted(&mut vm, flavor, &bearer, "ch_1");
        vm.response_headers(id, pairs(&[(":status", "200")])).unwrap();
        vm.end(id).unwrap();
        // Held, then released (the upstream failed).
        let id = admitted(&mut vm, flavor, &bearer, "ch_2");
        vm.response_headers(id, pairs(&[(":status", "500")])).unwrap();
        vm.end(id).unwrap();
        // No credential: a 402; a bad one: a 401.
        let (id, _) = vm.request_headers(get("/v1/forecast", None)).unwrap();
        vm.end(id).unwrap();
        let (id, _) = vm.request_headers(get("/v1/forecast", Some("Bearer x.y.z"))).unwrap();
        vm.end(id).unwrap();
        // The ledger times out, then resets: 503s.
        for reply in [Reply::status(504), Reply::Reset] {
            let (id, _) = vm.request_headers(get("/v1/forecast/x", Some(&bearer))).unwrap();
            let call = one_ledger_call(&mut vm, flavor, "/v1/holds");
            vm.reply(call.token, reply).unwrap();
            vm.end(id).unwrap();
        }
        assert_eq!(vm.metric("paystile_paid"), Some(1), "{flavor:?}");
        assert_eq!(vm.metric("paystile_released"), Some(1));
        assert_eq!(vm.metric("paystile_refused_payment_required"), Some(1));
        assert_eq!(vm.metric("paystile_refused_invalid_credential"), Some(1));
        assert_eq!(vm.metric("paystile_refused_ledger_unavailable"), Some(2));
        assert_eq!(vm.metric("paystile_ledger_timeouts"), Some(1));
        assert_eq!(vm.metric("paystile_ledger_errors"), Some(1));
        assert_eq!(vm.metric("paystile_settle_queued"), Some(2));

        vm.tick().unwrap();
        assert_eq!(vm.metric("paystile_settle_queue"), Some(2), "{flavor:?}");
        let settle = one_ledger_call(&mut vm, flavor, "/v1/holds/settle");
        let results = json!({"results": [{"chargeId": "ch_1", "status": "committed"},
            {"chargeId": "ch_2", "status": "invalid", "error": "amountUsdc is for commits only"}]});
        vm.reply(settle.token, Reply::json(200, &results)).unwrap();
        assert_eq!(vm.metric("paystile_settle_answered"), Some(1));
        assert_eq!(vm.metric("paystile_settle_dropped"), Some(1));
        assert!(vm.logs().iter().any(|(_, line)| line.contains("refused the settlement of ch_2")));
        vm.tick().unwrap();
        assert_eq!(vm.metric("paystile_settle_queue"), Some(0));
        assert_eq!(vm.metric("paystile_prefetched_holds"), Some(0));
        assert!(vm.unimplemented_calls().is_empty(), "{:?}", vm.unimplemented_calls());
    }
}

/// Kong 3.4 to 3.7 trap on every metrics hostcall: with `"metrics": false` the filter makes
/// none, and it still logs its version at start.
#[test]
fn with_metrics_off_no_metric_is_defined() {
    for flavor in FLAVORS {
        let mut config = config(flavor);
        config["metrics"] = json!(false);
        let mut vm = vm_with(flavor, &config);
        let id = admitted(&mut vm, flavor, &bearer(), "ch_1");
        vm.response_headers(id, pairs(&[(":status", "200")])).unwrap();
        vm.end(id).unwrap();
        vm.tick().unwrap();
        assert_eq!(vm.metrics_defined(), 0, "{flavor:?}");
        let version = format!("paystile filter {} starting", env!("CARGO_PKG_VERSION"));
        assert!(vm.logs().iter().any(|(_, line)| *line == version), "{:?}", vm.logs());
    }
}

/// When Envoy finishes the root context (the configuration goes away), what is queued goes
/// to the ledger at once, backoff or not; the root says `done` once the ledger has answered.
#[test]
fn a_finished_configuration_delivers_its_queue_before_it_is_done() {
    let mut finishing = vm(Flavor::Envoy);
    for (n, status) in [(1, "200"), (2, "200")] {
        let id = admitted(&mut finishing, Flavor::Envoy, &bearer(), &format!("ch_{n}"));
        finishing.response_headers(id, pairs(&[(":status", status)])).unwrap();
        finishing.end(id).unwrap();
    }
    // The ledger fails once: the next attempt waits for a backoff.
    finishing.tick().unwrap();
    let failed = one_ledger_call(&mut finishing, Flavor::Envoy, "/v1/holds/settle");
    finishing.reply(failed.token, Reply::status(503)).unwrap();

    assert!(!finishing.finish().unwrap(), "done before the queue was delivered");
    let last = one_ledger_call(&mut finishing, Flavor::Envoy, "/v1/holds/settle");
    assert_eq!(last.json()["settlements"].as_array().unwrap().len(), 2);
    assert!(!finishing.root_done());
    finishing.reply(last.token, settled(&["ch_1", "ch_2"])).unwrap();
    assert!(finishing.root_done(), "the root did not say done once its queue was delivered");
    assert!(finishing.take_dispatches().is_empty());

    // With nothing queued, a root is done at once.
    let mut idle = vm(Flavor::Envoy);
    assert!(idle.finish().unwrap());

    // A ledger that fails while the root finishes is not retried in a loop: the root gives
    // up (those holds expire unpaid) and says done.
    let mut failing = vm(Flavor::Envoy);
    let id = admitted(&mut failing, Flavor::Envoy, &bearer(), "ch_3");
    failing.response_headers(id, pairs(&[(":status", "200")])).unwrap();
    failing.end(id).unwrap();
    assert!(!failing.finish().unwrap());
    let last = one_ledger_call(&mut failing, Flavor::Envoy, "/v1/holds/settle");
    failing.reply(last.token, Reply::status(503)).unwrap();
    assert!(failing.take_dispatches().is_empty(), "retried at once while finishing");
    assert!(failing.root_done());
}
