//! Prefetched holds through the gate, natively: a hot token's calls served from the extra
//! holds of one reserve, each hold used once, released when stale or no longer good.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::cell::RefCell;
use std::rc::Rc;

mod support;

use paystile_filter::answer::HeaderEdit;
use paystile_filter::config::Config;
use paystile_filter::gate::{Exchange, Gate, RequestAction, RequestHead};
use paystile_filter::ledger::LedgerReply;
use paystile_filter::prefetch::Prefetched;
use paystile_protocol::jws::SigningKey;
use paystile_protocol::ledger_api::{Outcome, ReserveRequest, Settlement};
use paystile_protocol::pay_token;
use serde_json::{Value, json};
use support::{answered, head};

const SECRET: &str = "gate-test-secret-0123456789abcdef";
const NOW: u64 = 1_900_000_000;
const NOW_MS: u64 = NOW * 1000;
const MAX_AGE: u64 = 1000;

fn gate_with(change: impl FnOnce(&mut Value)) -> Gate {
    gate_sharing(change, Rc::default())
}

/// A gate whose prefetched holds are `prefetched`, as the adapter keeps them per ledger.
fn gate_sharing(change: impl FnOnce(&mut Value), prefetched: Rc<RefCell<Prefetched>>) -> Gate {
    let mut json = json!({
        "service_id": "weather",
        "routes": [
            {"path_prefix": "/v1/forecast", "price_usdc": "0.001"},
            {"path": "/v1/chat", "metered": {
                "max_usdc": "0.5", "unit_price_usdc": "0.000002", "units_header": "x-usage-tokens"
            }}
        ],
        "ledger": {
            "upstream": "paystile_ledger", "gateway_key": "gateway-key-0123456789",
            "prefetch_holds": 4, "prefetch_max_age_ms": MAX_AGE
        },
        "pay_token": {"keys": [{"alg": "HS256", "secret": SECRET}]}
    });
    change(&mut json);
    Gate::sharing(Config::from_json(json.to_string().as_bytes()).unwrap(), prefetched)
}

fn gate() -> Gate {
    gate_with(|_| {})
}

fn bearer(jti: &str) -> String {
    format!(
        "Bearer {}",
        pay_token::sign(&support::claims(jti, "1", NOW), &SigningKey::hs256(SECRET))
    )
}

/// A hold answering a reserve, with `extras` granted beyond it.
fn hold_reply(amount: &str, charge_id: &str, extras: &[&str]) -> LedgerReply {
    let body = json!({"chargeId": charge_id, "amountUsdc": amount, "remainingUsdc": "0.9",
        "replayed": false, "extraChargeIds": extras});
    LedgerReply { status: Some(200), body: body.to_string().into_bytes() }
}

/// The request's reserve, if it went to the ledger (`None`: it went on at once, with the
/// charge id it answers in the second place).
fn call(
    gate: &Gate,
    exchange: &mut Exchange,
    request: &RequestHead<'_>,
    now_ms: u64,
) -> Result<ReserveRequest, String> {
    match exchange.on_request_headers(gate, request, now_ms) {
        RequestAction::CallLedger(call) => {
            assert_eq!(call.path, "/v1/holds");
            Ok(serde_json::from_slice(&call.body).unwrap())
        }
        RequestAction::Forward(edits) => {
            assert_eq!(edits[0], HeaderEdit::Remove("authorization"), "the credential goes on");
            match &edits[1] {
                HeaderEdit::Set("x-charge-id", id) => Err(id.clone()),
                other => panic!("no charge id upstream: {other:?}"),
            }
        }
        other => panic!("expected a reserve or a forward, got {other:?}"),
    }
}

/// A call on `token` at `now_ms` that the ledger answers with `reply`, if it asks.
fn call_answered(
    gate: &Gate,
    token: &str,
    now_ms: u64,
    reply: LedgerReply,
) -> (Exchange, Result<u16, String>) {
    let mut exchange = Exchange::default();
    let outcome = call(gate, &mut exchange, &head("/v1/forecast", Some(token)), now_ms);
    let outcome = outcome.map(|reserve| {
        let action = exchange.on_ledger_reply(gate, reply);
        assert!(matches!(action, RequestAction::Forward(_)), "{action:?}");
        reserve.count
    });
    (exchange, outcome)
}

/// Warms `token` up with a cold call, then a hot one whose reserve gets `extras`.
fn warmed(gate: &Gate, token: &str, extras: &[&str]) {
    let (_, cold) = call_answered(gate, token, NOW_MS, hold_reply("0.001", "ch_cold", &[]));
    assert_eq!(cold, Ok(1), "a token's first call asks for one hold");
    let (_, hot) = call_answered(gate, token, NOW_MS + 10, hold_reply("0.001", "ch_hot", extras));
    assert_eq!(hot, Ok(gate.config().ledger.prefetch_holds), "a hot token asks for a batch");
}

fn settlement_of(exchange: &mut Exchange, gate: &Gate, status: u16) -> Settlement {
    exchange.on_response_headers(gate, Some(status), None).settlement.unwrap()
}

#[test]
fn a_hot_tokens_next_calls_go_on_at_once_each_on_its_own_prefetched_hold() {
    let gate = gate();
    let token = bearer("tok_hot");
    warmed(&gate, &token, &["ch_x1", "ch_x2", "ch_x3"]);
    assert_eq!(gate.prefetched_waiting(), 3);
    let mut served = Vec::new();
    let mut refills = Vec::new();
    for i in 0..3 {
        let mut exchange = Exchange::default();
        let outcome =
            call(&gate, &mut exchange, &head("/v1/forecast", Some(&token)), NOW_MS + 20 + i);
        let charge_id = outcome.expect_err("a prefetched hold was there for the call");
        let step = exchange.on_response_headers(&gate, Some(200), None);
        assert_eq!(
            step.edits,
            [
                HeaderEdit::Set("x-charge-id", charge_id.clone()),
                HeaderEdit::Set("x-amount-usdc", "0.001000".into()),
                HeaderEdit::Set("x-remaining-usdc", "0.900000".into()),
            ]
        );
        let settlement = step.settlement.unwrap();
        assert_eq!(
            (settlement.charge_id.as_str(), settlement.outcome),
            (charge_id.as_str(), Outcome::Commit)
        );
        assert_eq!(exchange.token_id(), Some("tok_hot"));
        served.push(charge_id);
        if i == 0 {
            // Down to half a batch (2 of prefetch_holds 4): this call reserves the next batch,
            // and the calls after it go on without waiting for the answer.
            let mut refill = Exchange::default();
            let reserve =
                call(&gate, &mut refill, &head("/v1/forecast", Some(&token)), NOW_MS + 20);
            assert_eq!(reserve.map(|r| r.count), Ok(4));
            refills.push(refill);
        }
    }
    assert_eq!(served, ["ch_x1", "ch_x2", "ch_x3"], "each hold is used once, oldest first");
    // The pool is empty and its refill on its way: the next call reserves just its own hold.
    let (_, next) = call_answered(&gate, &token, NOW_MS + 30, hold_reply("0.001", "ch_4", &[]));
    assert_eq!(next, Ok(1));
    assert_eq!(gate.prefetched_waiting(), 0);
    // The refill's answer fills the pool for the calls after it.
    let mut refill = refills.pop().unwrap();
    let reply = hold_reply("0.001", "ch_5", &["ch_y1", "ch_y2", "ch_y3"]);
    assert!(matches!(refill.on_ledger_reply(&gate, reply), RequestAction::Forward(_)));
    let mut exchange = Exchange::default();
    let outcome = call(&gate, &mut exchange, &head("/v1/forecast", Some(&token)), NOW_MS + 40);
    assert_eq!(outcome.map(|r| r.count), Err("ch_y1".to_owned()));
    let released: Vec<_> = gate
        .prefetch_releases(NOW_MS + 5_000)
        .into_iter()
        .map(|r| r.settlement.charge_id)
        .collect();
    assert_eq!(released, ["ch_y2", "ch_y3"], "a used hold was released, or an unused one kept");
}

#[test]
fn a_refill_that_fails_lets_the_next_call_refill() {
    let gate = gate();
    let token = bearer("tok_refill");
    warmed(&gate, &token, &["ch_x1"]);
    let mut refill = Exchange::default();
    let reserve = call(&gate, &mut refill, &head("/v1/forecast", Some(&token)), NOW_MS + 20);
    assert_eq!(reserve.map(|r| r.count), Ok(4), "at low water, the call refills");
    // The ledger does not answer: the request fails closed, and the pool may refill again.
    let action = refill.on_ledger_reply(&gate, LedgerReply::default());
    assert_eq!(answered(&action).0, 503);
    let (_, next) = call_answered(&gate, &token, NOW_MS + 21, hold_reply("0.001", "ch_2", &[]));
    assert_eq!(next, Ok(4));
}

#[test]
fn a_prefetched_call_that_fails_or_never_answers_is_released() {
    let gate = gate_with(|c| c["ledger"]["prefetch_holds"] = json!(8));
    let token = bearer("tok_fail");
    warmed(&gate, &token, &["ch_x1", "ch_x2", "ch_x3", "ch_x4", "ch_x5", "ch_x6"]);
    let mut failed = Exchange::default();
    call(&gate, &mut failed, &head("/v1/forecast", Some(&token)), NOW_MS + 20).unwrap_err();
    let settlement = settlement_of(&mut failed, &gate, 503);
    assert_eq!((settlement.charge_id.as_str(), settlement.outcome), ("ch_x1", Outcome::Release));
    let mut reset = Exchange::default();
    call(&gate, &mut reset, &head("/v1/forecast", Some(&token)), NOW_MS + 20).unwrap_err();
    let settlement = reset.on_end().unwrap();
    assert_eq!((settlement.charge_id.as_str(), settlement.outcome), ("ch_x2", Outcome::Release));
}

#[test]
fn cold_tokens_ask_for_one_hold_and_idempotent_calls_never_prefetch() {
    let gate = gate();
    let token = bearer("tok_cold");
    let (_, first) = call_answered(&gate, &token, NOW_MS, hold_reply("0.001", "ch_1", &[]));
    assert_eq!(first, Ok(1));
    // Past the max age since its last call, a token is cold again.
    let (_, later) =
        call_answered(&gate, &token, NOW_MS + MAX_AGE + 1, hold_reply("0.001", "ch_2", &[]));
    assert_eq!(later, Ok(1));
    let t = NOW_MS + MAX_AGE + 2;
    let (_, hot) = call_answered(&gate, &token, t, hold_reply("0.001", "ch_3", &["ch_x1"]));
    assert_eq!(hot, Ok(4));
    let idempotent =
        RequestHead { idempotency_key: Some(b"order-7"), ..head("/v1/forecast", Some(&token)) };
    let mut exchange = Exchange::default();
    let reserve = call(&gate, &mut exchange, &idempotent, t + 10)
        .expect("an idempotent call goes to the ledger");
    assert_eq!((reserve.count, reserve.idempotency.is_some()), (1, true));
    // Even when it gets extra holds (a ledger must not grant them), none goes to the pool.
    exchange.on_ledger_reply(&gate, hold_reply("0.001", "ch_i", &["ch_bad"]));
    assert_eq!(gate.prefetched_waiting(), 1);
}

#[test]
fn a_batch_reserve_says_until_when_its_extras_are_wanted() {
    let gate = gate();
    let token = bearer("tok_deadline");
    let reserve_at = |now_ms, reply| {
        let mut exchange = Exchange::default();
        let reserve = call(&gate, &mut exchange, &head("/v1/forecast", Some(&token)), now_ms);
        exchange.on_ledger_reply(&gate, reply);
        reserve.unwrap()
    };
    // One hold: nothing would be orphaned beyond it.
    let cold = reserve_at(NOW_MS, hold_reply("0.001", "ch_1", &[]));
    assert_eq!((cold.count, cold.extras_until_ms), (1, None));
    // A batch: wanted until this call to the ledger times out, after which its answer
    // would be dropped.
    let hot = reserve_at(NOW_MS + 10, hold_reply("0.001", "ch_2", &["ch_x1"]));
    let timeout = gate.config().ledger.timeout_ms();
    assert_eq!((hot.count, hot.extras_until_ms), (4, Some(NOW_MS + 10 + timeout)));
}

#[test]
fn prefetching_off_reserves_every_call_on_its_own() {
    let gate = gate_with(|c| c["ledger"]["prefetch_holds"] = json!(0));
    let token = bearer("tok_off");
    for i in 0..3 {
        let (_, count) =
            call_answered(&gate, &token, NOW_MS + i, hold_reply("0.001", "ch_1", &["ch_x"]));
        assert_eq!(count, Ok(1));
    }
    assert_eq!(gate.prefetched_waiting(), 0);
    // One asked for is one hold: as many as asked when prefetch_holds is 1.
    let gate = gate_with(|c| c["ledger"]["prefetch_holds"] = json!(1));
    warmed_with(&gate, &token, 1);
}

fn warmed_with(gate: &Gate, token: &str, count: u16) {
    call_answered(gate, token, NOW_MS, hold_reply("0.001", "ch_cold", &[])).1.unwrap();
    let (_, hot) =
        call_answered(gate, token, NOW_MS + 10, hold_reply("0.001", "ch_hot", &["ch_x"]));
    assert_eq!(hot, Ok(count));
    assert_eq!(
        gate.prefetched_waiting(),
        usize::from(count - 1),
        "more extras kept than asked for"
    );
}

#[test]
fn stale_prefetched_holds_are_released_from_the_tick_never_used() {
    let gate = gate();
    let token = bearer("tok_stale");
    warmed(&gate, &token, &["ch_x1", "ch_x2", "ch_x3"]);
    assert!(gate.prefetch_releases(NOW_MS + MAX_AGE - 1).is_empty());
    // The extras' age counts from the hot call's arrival (NOW_MS + 10).
    let mut exchange = Exchange::default();
    let reserve =
        call(&gate, &mut exchange, &head("/v1/forecast", Some(&token)), NOW_MS + 10 + MAX_AGE);
    assert_eq!(reserve.map(|r| r.count), Ok(1), "a stale hold was used");
    let releases = gate.prefetch_releases(NOW_MS + 10 + MAX_AGE);
    let released: Vec<_> = releases.iter().map(|r| r.settlement.charge_id.as_str()).collect();
    assert_eq!(released, ["ch_x1", "ch_x2", "ch_x3"]);
    for release in &releases {
        assert_eq!(
            (release.settlement.outcome, release.settlement.upstream_status),
            (Outcome::Release, None)
        );
        assert_eq!(release.token_id, "tok_stale");
    }
    assert_eq!(gate.prefetched_waiting(), 0);
}

#[test]
fn a_refused_reserve_or_a_lost_token_drops_the_tokens_prefetched_holds() {
    for refused in [true, false] {
        let books: Rc<RefCell<Prefetched>> = Rc::default();
        let gate = gate_sharing(|_| {}, books.clone());
        let token = bearer("tok_a");
        let other = bearer("tok_b");
        warmed(&gate, &token, &["ch_a1", "ch_a2", "ch_a3"]);
        warmed(&gate, &other, &["ch_b1"]);
        // A metered route's pool of the same token goes too.
        let mut metered = Exchange::default();
        call(
            &gate,
            &mut metered,
            &RequestHead { method: b"POST", ..head("/v1/chat", Some(&token)) },
            NOW_MS + 20,
        )
        .unwrap();
        metered.on_ledger_reply(&gate, hold_reply("0.5", "ch_m", &["ch_m1"]));
        assert_eq!(gate.prefetched_waiting(), 5);
        if refused {
            // Another VM's calls took the pool's place on the ledger; this reserve is refused.
            let mut exchange = Exchange::default();
            let idempotent =
                RequestHead { idempotency_key: Some(b"k"), ..head("/v1/forecast", Some(&token)) };
            call(&gate, &mut exchange, &idempotent, NOW_MS + 20).unwrap();
            let revoked = json!({"error": "Token revoked", "code": "token_revoked"});
            let reply = LedgerReply { status: Some(422), body: revoked.to_string().into_bytes() };
            let action = exchange.on_ledger_reply(&gate, reply);
            assert_eq!(answered(&action).0, 422);
        } else {
            // What the adapter does when a settlement comes back revoked or expired.
            books.borrow_mut().drop_token("tok_a");
        }
        let mut exchange = Exchange::default();
        assert!(
            call(&gate, &mut exchange, &head("/v1/forecast", Some(&token)), NOW_MS + 30).is_ok(),
            "a dropped hold was used"
        );
        let mut released: Vec<_> = gate
            .prefetch_releases(NOW_MS + 30)
            .into_iter()
            .map(|r| r.settlement.charge_id)
            .collect();
        released.sort();
        assert_eq!(released, ["ch_a1", "ch_a2", "ch_a3", "ch_m1"], "refused: {refused}");
        assert_eq!(gate.prefetched_waiting(), 1, "another token's hold went too");
    }
}

#[test]
fn a_metered_prefetched_hold_is_committed_for_the_units_used() {
    let gate = gate();
    let token = bearer("tok_metered");
    let chat = || RequestHead { method: b"POST", ..head("/v1/chat", Some(&token)) };
    let batch = &["ch_x1", "ch_x2", "ch_x3"][..];
    for (at, charge, extras) in [(NOW_MS, "ch_1", &[][..]), (NOW_MS + 10, "ch_2", batch)] {
        let mut exchange = Exchange::default();
        call(&gate, &mut exchange, &chat(), at).unwrap();
        exchange.on_ledger_reply(&gate, hold_reply("0.5", charge, extras));
    }
    // A route of another price has its own pool: the forecast call does not take the chat hold.
    let mut forecast = Exchange::default();
    assert!(call(&gate, &mut forecast, &head("/v1/forecast", Some(&token)), NOW_MS + 20).is_ok());
    let mut exchange = Exchange::default();
    assert_eq!(call(&gate, &mut exchange, &chat(), NOW_MS + 20), Err("ch_x1".to_owned()));
    assert_eq!(exchange.units_header(), Some("x-usage-tokens"));
    let step = exchange.on_response_headers(&gate, Some(200), Some(b"1000"));
    let settlement = step.settlement.unwrap();
    assert_eq!(
        (settlement.outcome, settlement.amount_usdc),
        (Outcome::Commit, Some("0.002".parse().unwrap()))
    );
    // The unused part of the hold is the token's again.
    assert!(
        step.edits.contains(&HeaderEdit::Set("x-remaining-usdc", "1.398000".into())),
        "{:?}",
        step.edits
    );
}

#[test]
fn extra_holds_that_do_not_fit_the_request_are_not_kept() {
    let gate = gate();
    let token = bearer("tok_odd");
    call_answered(&gate, &token, NOW_MS, hold_reply("0.001", "ch_cold", &[])).1.unwrap();
    // Too many, one a bad id, one the first hold's own id: only fitting ones, up to count - 1.
    let extras = ["ch_hot", "bad id", "ch_1", "ch_2", "ch_3", "ch_4", "ch_5"];
    call_answered(&gate, &token, NOW_MS + 10, hold_reply("0.001", "ch_hot", &extras)).1.unwrap();
    assert_eq!(gate.prefetched_waiting(), 3);
    // A hold of another amount than the route's (a confused ledger): none kept.
    let gate = self::gate();
    call_answered(&gate, &token, NOW_MS, hold_reply("0.001", "ch_cold", &[])).1.unwrap();
    call_answered(&gate, &token, NOW_MS + 10, hold_reply("0.002", "ch_hot", &["ch_1"])).1.unwrap();
    assert_eq!(gate.prefetched_waiting(), 0);
}

/// The kill switch with prefetched holds: the ledger's revocation feed names the token while
/// a batch reserve for it is on its way. Its pool is released at once, and the reserve's
/// answer (held before the revocation, read after it) neither serves its call nor fills the
/// pool: every hold it brought is released.
#[test]
fn a_revocation_heard_drops_the_pool_and_refuses_a_hold_answered_before_it() {
    let prefetched: Rc<RefCell<Prefetched>> = Rc::default();
    let gate = gate_sharing(|_| {}, prefetched.clone());
    let token = bearer("tok_kill");
    warmed(&gate, &token, &["ch_x1", "ch_x2"]);
    // At low water (2 of 4): the next call reserves the next batch.
    let mut refill = Exchange::default();
    let reserve = call(&gate, &mut refill, &head("/v1/forecast", Some(&token)), NOW_MS + 20);
    assert_eq!(reserve.map(|r| r.count), Ok(4));
    prefetched.borrow_mut().revoke("tok_kill", NOW_MS + 21, 2_000);
    assert_eq!(gate.prefetched_waiting(), 0, "the pool outlived the revocation");
    let reply = hold_reply("0.001", "ch_late", &["ch_y1", "ch_y2", "ch_y3"]);
    let action = refill.on_ledger_reply(&gate, reply);
    let (status, body, _) = answered(&action);
    assert_eq!((status, body.code), (422, paystile_protocol::ErrorCode::TokenRevoked));
    assert_eq!(refill.on_end(), None, "a refused call settles nothing itself");
    assert_eq!(gate.prefetched_waiting(), 0, "the late batch filled the pool");
    let mut released: Vec<String> =
        gate.prefetch_releases(NOW_MS + 22).into_iter().map(|r| r.settlement.charge_id).collect();
    released.sort();
    assert_eq!(released, ["ch_late", "ch_x1", "ch_x2", "ch_y1", "ch_y2", "ch_y3"]);
    // Once the revocation is old enough that no reserve from before it can still be
    // answered, the token is forgotten: the ledger refuses its reserves itself.
    gate.prefetch_releases(NOW_MS + 21 + 2_000);
    assert!(!prefetched.borrow().is_revoked("tok_kill"));
}
