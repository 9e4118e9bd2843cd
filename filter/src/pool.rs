//! L402 challenges minted ahead, so that a 402 needs no call to the ledger.
//!
//! A challenge (a fresh token id, its invoice and macaroon) must reach one client only, so a
//! 402 takes one out of the pool. The root context's tick refills the pool in batches from
//! the ledger's challenge endpoint, sized by the 402s seen lately: a quarter second of the
//! busiest recent second, at least [`MIN_BATCH`] (but never more than the last max age
//! used, so a quiet gateway mints little that goes unused), at most the configured capacity.
//! It refills once the pool holds less than half of that, up to [`MAX_BATCH`] a call, and a
//! refill that leaves it still below half is followed by the next one at once.
//!
//! The ledger stores nothing it mints, so dropping a challenge costs nothing: entries older
//! than the max age are dropped (well inside their invoice's and macaroon's validity), and
//! a reconfigured gate starts with an empty pool. An empty pool is not an error: the 402
//! falls back to minting its own challenge, as when the pool is off. A failed refill backs
//! off and is tried again; until then, 402s fall back the same way.

use std::collections::VecDeque;

use paystile_protocol::l402;
use paystile_protocol::ledger_api::{
    ChallengeRequest, L402Challenge, L402Challenges, MAX_CHALLENGES_PER_CALL, path,
};

use crate::ledger::{LedgerCall, LedgerReply};

/// The fewest challenges a refill asks for, unless the 402s of the last max age were fewer.
pub const MIN_BATCH: usize = 16;
/// The most a refill asks for: what the ledger mints in one call.
pub const MAX_BATCH: usize = MAX_CHALLENGES_PER_CALL as usize;
/// The pool holds this fraction of a second of the busiest recent second's 402s (a burst
/// then has a few ticks to be refilled in).
const SECOND_FRACTION: u32 = 4;
const FIRST_BACKOFF_MS: u64 = 1_000;
const MAX_BACKOFF_MS: u64 = 30_000;

/// A minted challenge, ready for one 402.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pooled {
    /// The `WWW-Authenticate` value.
    pub header: String,
    /// Minted by the ledger's sandbox invoice backend.
    pub sandbox: bool,
    /// Unix seconds.
    received_at: u64,
}

/// A refill call to make; its reply goes back to the pool with its `id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refill {
    pub id: u64,
    pub count: usize,
    pub call: LedgerCall,
}

/// What became of the refill in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefillOutcome {
    /// The pool holds `added` more challenges.
    Filled { added: usize },
    /// No usable batch (no answer, an error, or no challenges of ours): the next refill is
    /// in `retry_in_ms`.
    Failed { retry_in_ms: u64 },
    /// No refill was in flight with that id.
    Stray,
}

#[derive(Debug)]
struct InFlight {
    id: u64,
    count: usize,
    /// When to give up waiting for the reply.
    deadline_ms: u64,
}

#[derive(Debug)]
pub struct ChallengePool {
    capacity: usize,
    /// Seconds an entry is handed out for after it arrives.
    max_age: u64,
    entries: VecDeque<Pooled>,
    per_second: Window,
    per_max_age: Window,
    in_flight: Option<InFlight>,
    sent: u64,
    retry_at_ms: u64,
    backoff_ms: u64,
}

impl ChallengePool {
    /// A pool of at most `capacity` challenges, each handed out within `max_age` seconds of
    /// its arrival. A capacity or max age of 0 turns it off: every 402 mints its own.
    pub fn new(capacity: usize, max_age: u64) -> ChallengePool {
        let capacity = if max_age == 0 { 0 } else { capacity };
        ChallengePool {
            capacity,
            max_age,
            entries: VecDeque::new(),
            per_second: Window::new(1),
            per_max_age: Window::new(max_age),
            in_flight: None,
            sent: 0,
            retry_at_ms: 0,
            backoff_ms: 0,
        }
    }

    /// A challenge for a 402 at `now` (Unix seconds), the oldest first; `None` when the pool
    /// is empty or off. Counts the 402 either way: it is the demand refills follow.
    pub fn take(&mut self, now: u64) -> Option<Pooled> {
        if self.capacity == 0 {
            return None;
        }
        self.per_second.record(now);
        self.per_max_age.record(now);
        self.expire(now);
        self.entries.pop_front()
    }

    /// The refill to send now, if the pool is low, none is in flight and no backoff runs.
    /// `offer` is what every challenge offers; `timeout_ms` is how long the call may take
    /// before it counts as lost.
    pub fn next_refill(
        &mut self,
        offer: &ChallengeRequest,
        now_ms: u64,
        timeout_ms: u64,
    ) -> Option<Refill> {
        if self.capacity == 0 {
            return None;
        }
        let now = now_ms / 1000;
        self.expire(now);
        if self.in_flight.take_if(|f| now_ms >= f.deadline_ms).is_some() {
            log::warn!("paystile: no reply to an L402 challenge refill; trying again");
            self.back_off(now_ms);
        }
        if self.in_flight.is_some() || now_ms < self.retry_at_ms {
            return None;
        }
        let target = self.target(now);
        let held = self.entries.len();
        if held * 2 >= target {
            return None;
        }
        let count = (target - held)
            .clamp(MIN_BATCH.min(target), MAX_BATCH)
            .min(self.capacity.saturating_sub(held));
        let request = ChallengeRequest {
            // At most MAX_BATCH, which is a u16.
            count: Some(u16::try_from(count).unwrap_or(MAX_CHALLENGES_PER_CALL)),
            ..offer.clone()
        };
        // Strings, integers and amounts always serialize.
        let body = serde_json::to_vec(&request).unwrap_or_default();
        self.sent += 1;
        // A second of slack over the call's own timeout, after which the host answers.
        let deadline_ms = now_ms.saturating_add(timeout_ms).saturating_add(1_000);
        self.in_flight = Some(InFlight { id: self.sent, count, deadline_ms });
        Some(Refill {
            id: self.sent,
            count,
            call: LedgerCall { path: path::L402_CHALLENGES, body, timeout: None },
        })
    }

    /// The ledger's reply to refill `id`, at `now_ms`.
    pub fn on_reply(&mut self, id: u64, reply: &LedgerReply, now_ms: u64) -> RefillOutcome {
        let Some(refill) = self.in_flight.take_if(|f| f.id == id) else {
            return RefillOutcome::Stray;
        };
        let Some(batch) = read_batch(reply, refill.count) else {
            self.back_off(now_ms);
            return RefillOutcome::Failed { retry_in_ms: self.backoff_ms };
        };
        self.backoff_ms = 0;
        self.retry_at_ms = 0;
        let received_at = now_ms / 1000;
        let room = self.capacity.saturating_sub(self.entries.len());
        let added = batch.len().min(room);
        self.entries.extend(batch.into_iter().take(added).map(|(header, sandbox)| Pooled {
            header,
            sandbox,
            received_at,
        }));
        RefillOutcome::Filled { added }
    }

    /// Refill `id` could not even be sent (the host refused the dispatch).
    pub fn on_send_failed(&mut self, id: u64, now_ms: u64) {
        if self.in_flight.take_if(|f| f.id == id).is_some() {
            self.back_off(now_ms);
        }
    }

    /// How many challenges the pool should hold at `now`: see the module's documentation.
    fn target(&mut self, now: u64) -> usize {
        let busiest_second = self.per_second.peak(now) / SECOND_FRACTION;
        let recent = self.per_max_age.peak(now);
        let target = busiest_second.max(MIN_BATCH as u32).min(recent);
        usize::try_from(target).unwrap_or(usize::MAX).min(self.capacity)
    }

    fn expire(&mut self, now: u64) {
        while self
            .entries
            .front()
            .is_some_and(|e| e.received_at.saturating_add(self.max_age) <= now)
        {
            self.entries.pop_front();
        }
    }

    fn back_off(&mut self, now_ms: u64) {
        self.backoff_ms = (self.backoff_ms * 2).clamp(FIRST_BACKOFF_MS, MAX_BACKOFF_MS);
        self.retry_at_ms = now_ms.saturating_add(self.backoff_ms);
    }
}

/// A refill's challenges as (`WWW-Authenticate` value, sandbox), if the reply is a batch of
/// 1 to `asked` usable ones.
fn read_batch(reply: &LedgerReply, asked: usize) -> Option<Vec<(String, bool)>> {
    if reply.status != Some(200) {
        return None;
    }
    let batch: L402Challenges = serde_json::from_slice(&reply.body).ok()?;
    if batch.challenges.is_empty() || batch.challenges.len() > asked {
        return None;
    }
    batch.challenges.iter().map(|c| Some((header_value(c)?, c.sandbox))).collect()
}

/// The `WWW-Authenticate` value of `challenge`, if its macaroon (base64) and invoice
/// (bech32) are safe inside a quoted header parameter.
pub fn header_value(challenge: &L402Challenge) -> Option<String> {
    // Tables, not per-byte comparisons: a refill checks some 800 bytes per challenge.
    const ALPHANUMERIC: [bool; 256] = byte_set(b"");
    const BASE64: [bool; 256] = byte_set(b"+/=-_");
    let made_of = |s: &str, set: &[bool; 256]| {
        (1..=4096).contains(&s.len()) && s.bytes().all(|b| set[usize::from(b)])
    };
    let safe = made_of(&challenge.macaroon, &BASE64) && made_of(&challenge.invoice, &ALPHANUMERIC);
    safe.then(|| l402::challenge(&challenge.macaroon, &challenge.invoice))
}

/// ASCII letters, digits and `extra`.
const fn byte_set(extra: &[u8]) -> [bool; 256] {
    let mut set = [false; 256];
    let mut b = 0;
    while b < 256 {
        set[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let mut i = 0;
    while i < extra.len() {
        set[extra[i] as usize] = true;
        i += 1;
    }
    set
}

/// Counts events in fixed windows of `length` seconds: the current one and the one before.
#[derive(Debug)]
struct Window {
    length: u64,
    start: u64,
    current: u32,
    previous: u32,
}

impl Window {
    fn new(length: u64) -> Window {
        Window { length: length.max(1), start: 0, current: 0, previous: 0 }
    }

    fn record(&mut self, now: u64) {
        self.roll(now);
        self.current = self.current.saturating_add(1);
    }

    /// The larger count of the current window and the one before.
    fn peak(&mut self, now: u64) -> u32 {
        self.roll(now);
        self.current.max(self.previous)
    }

    fn roll(&mut self, now: u64) {
        let elapsed = now.saturating_sub(self.start);
        if elapsed >= self.length {
            self.previous = if elapsed < self.length.saturating_mul(2) { self.current } else { 0 };
            self.current = 0;
            self.start = now - elapsed % self.length;
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const TIMEOUT: u64 = 1_000;
    /// Unix seconds, and the same in milliseconds for the refill calls.
    const NOW: u64 = 1_900_000_000;
    const NOW_MS: u64 = NOW * 1000;
    const MAX_AGE: u64 = 60;

    fn offer() -> ChallengeRequest {
        ChallengeRequest {
            service_id: "weather".into(),
            budget_usdc: "0.05".parse().unwrap(),
            amount_msat: 50_000,
            valid_seconds: 86_400,
            capabilities: vec![],
            count: None,
        }
    }

    /// A batch of `count` challenges whose invoices are `lnbcrt<first + i>`.
    fn batch(first: usize, count: usize) -> LedgerReply {
        let challenges: Vec<_> = (first..first + count)
            .map(|i| {
                json!({
                    "tokenId": format!("l402_{i:064x}"), "macaroon": format!("AgE{i}="),
                    "invoice": format!("lnbcrt{i}"), "paymentHash": "ab".repeat(32),
                    "budgetUsdc": "0.05", "amountMsat": 50_000, "validUntil": NOW + 86_400,
                    "sandbox": true
                })
            })
            .collect();
        let body = json!({ "challenges": challenges }).to_string().into_bytes();
        LedgerReply { status: Some(200), body }
    }

    fn asked(refill: &Refill) -> u16 {
        let request: ChallengeRequest = serde_json::from_slice(&refill.call.body).unwrap();
        assert_eq!(ChallengeRequest { count: None, ..request.clone() }, offer());
        assert_eq!(refill.call.path, "/v1/l402/challenges");
        request.count.unwrap()
    }

    fn invoice(pooled: &Pooled) -> &str {
        let at = pooled.header.find("invoice=\"").unwrap() + "invoice=\"".len();
        pooled.header[at..].trim_end_matches('"')
    }

    /// A pool that has seen `demand` 402s at NOW and holds a batch of `held`.
    fn filled(demand: usize, held: usize) -> ChallengePool {
        let mut pool = ChallengePool::new(1024, MAX_AGE);
        for _ in 0..demand {
            assert_eq!(pool.take(NOW), None);
        }
        let refill = pool.next_refill(&offer(), NOW_MS, TIMEOUT).unwrap();
        let outcome = pool.on_reply(refill.id, &batch(0, held), NOW_MS);
        assert_eq!(outcome, RefillOutcome::Filled { added: held });
        pool
    }

    #[test]
    fn nothing_is_minted_before_a_402_asks_for_it() {
        let mut pool = ChallengePool::new(1024, MAX_AGE);
        assert_eq!(pool.next_refill(&offer(), NOW_MS, TIMEOUT), None, "no demand yet");
        assert_eq!(pool.take(NOW), None, "empty: the 402 mints its own");
        let refill = pool.next_refill(&offer(), NOW_MS, TIMEOUT).unwrap();
        assert_eq!(asked(&refill), 1, "one 402 in the last minute: one challenge");
        assert_eq!(pool.next_refill(&offer(), NOW_MS, TIMEOUT), None, "one refill at a time");
    }

    #[test]
    fn each_challenge_is_handed_out_once_oldest_first() {
        let mut pool = filled(20, 16);
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..16 {
            let pooled = pool.take(NOW).unwrap();
            assert_eq!(invoice(&pooled), format!("lnbcrt{i}"));
            assert_eq!(pooled.header, format!(r#"L402 macaroon="AgE{i}=", invoice="lnbcrt{i}""#));
            assert!(pooled.sandbox);
            assert!(seen.insert(pooled.header));
        }
        assert_eq!(pool.take(NOW), None, "drained: the next 402 mints its own");
    }

    #[test]
    fn entries_expire_at_the_max_age() {
        let mut pool = filled(20, 16);
        assert!(pool.take(NOW + MAX_AGE - 1).is_some());
        assert_eq!(pool.take(NOW + MAX_AGE), None, "every entry of the batch is as old");
        assert!(pool.entries.is_empty());
    }

    #[test]
    fn the_batch_follows_the_402_rate_within_bounds() {
        // A few 402s a minute: no more than were asked for lately.
        let mut quiet = ChallengePool::new(1024, MAX_AGE);
        for _ in 0..3 {
            quiet.take(NOW);
        }
        assert_eq!(asked(&quiet.next_refill(&offer(), NOW_MS, TIMEOUT).unwrap()), 3);
        // A steady trickle: at least MIN_BATCH.
        let mut steady = ChallengePool::new(1024, MAX_AGE);
        for second in 0..30 {
            steady.take(NOW + second);
        }
        let refill = steady.next_refill(&offer(), (NOW + 30) * 1000, TIMEOUT).unwrap();
        assert_eq!(usize::from(asked(&refill)), MIN_BATCH);
        // 2,000 in one second: a quarter second of them, MAX_BATCH a call.
        let mut busy = ChallengePool::new(1024, MAX_AGE);
        for _ in 0..2_000 {
            busy.take(NOW);
        }
        assert_eq!(busy.target(NOW), 500);
        let first = busy.next_refill(&offer(), NOW_MS, TIMEOUT).unwrap();
        assert_eq!(usize::from(asked(&first)), MAX_BATCH);
        busy.on_reply(first.id, &batch(0, MAX_BATCH), NOW_MS);
        // 256 of 500 is above half: enough until the 402s take some.
        assert_eq!(busy.next_refill(&offer(), NOW_MS, TIMEOUT), None);
        for _ in 0..8 {
            busy.take(NOW);
        }
        let second = busy.next_refill(&offer(), NOW_MS, TIMEOUT).unwrap();
        assert_eq!(asked(&second), 502 - 248, "up to the new target, 2,008 / 4");
        // The capacity bounds it all.
        let mut small = ChallengePool::new(100, MAX_AGE);
        for _ in 0..2_000 {
            small.take(NOW);
        }
        assert_eq!(asked(&small.next_refill(&offer(), NOW_MS, TIMEOUT).unwrap()), 100);
    }

    #[test]
    fn demand_is_forgotten_after_a_quiet_max_age() {
        let mut pool = filled(20, 16);
        // A minute later, the entries have expired and the 402s are a window old: one
        // more window of quiet and there is no demand left, so nothing is minted.
        let later = NOW + MAX_AGE;
        assert_eq!(asked(&pool.next_refill(&offer(), later * 1000, TIMEOUT).unwrap()), 16);
        let mut idle = filled(20, 16);
        let much_later = NOW + 2 * MAX_AGE;
        assert_eq!(idle.next_refill(&offer(), much_later * 1000, TIMEOUT), None);
        assert!(idle.entries.is_empty());
    }

    #[test]
    fn a_failed_refill_backs_off_and_the_pool_stays_usable() {
        let mut pool = ChallengePool::new(1024, MAX_AGE);
        pool.take(NOW);
        let bad_replies = [
            LedgerReply { status: None, body: vec![] },
            LedgerReply { status: Some(503), body: vec![] },
            // An older ledger refuses the count.
            LedgerReply { status: Some(400), body: br#"{"code":"bad_request"}"#.to_vec() },
            // A lone challenge, not a batch.
            LedgerReply {
                status: Some(200),
                body: br#"{"macaroon":"AgE=","invoice":"x"}"#.to_vec(),
            },
            LedgerReply { status: Some(200), body: br#"{"challenges":[]}"#.to_vec() },
        ];
        let mut now = NOW_MS;
        let mut backoff = FIRST_BACKOFF_MS;
        for reply in bad_replies {
            let refill = pool.next_refill(&offer(), now, TIMEOUT).unwrap();
            let outcome = pool.on_reply(refill.id, &reply, now);
            assert_eq!(outcome, RefillOutcome::Failed { retry_in_ms: backoff }, "{reply:?}");
            assert_eq!(pool.next_refill(&offer(), now + backoff - 1, TIMEOUT), None);
            assert_eq!(pool.take(now / 1000), None, "the 402 mints its own meanwhile");
            now += backoff;
            backoff *= 2;
        }
        let refill = pool.next_refill(&offer(), now, TIMEOUT).unwrap();
        pool.on_send_failed(refill.id, now);
        assert_eq!(pool.backoff_ms, MAX_BACKOFF_MS, "capped");
        assert_eq!(pool.next_refill(&offer(), now + MAX_BACKOFF_MS - 1, TIMEOUT), None);
        now += MAX_BACKOFF_MS;
        // Success resets the backoff.
        let refill = pool.next_refill(&offer(), now, TIMEOUT).unwrap();
        pool.on_reply(refill.id, &batch(0, 1), now);
        assert_eq!(pool.backoff_ms, 0);
        assert!(pool.take(now / 1000).is_some());
    }

    #[test]
    fn backoff_is_capped() {
        let mut pool = ChallengePool::new(1024, MAX_AGE);
        let mut now = NOW_MS;
        for _ in 0..20 {
            pool.take(now / 1000);
            let refill = pool.next_refill(&offer(), now, TIMEOUT).unwrap();
            let outcome = pool.on_reply(refill.id, &LedgerReply::default(), now);
            let RefillOutcome::Failed { retry_in_ms } = outcome else { panic!("{outcome:?}") };
            assert!(retry_in_ms <= MAX_BACKOFF_MS);
            now += retry_in_ms;
        }
        assert_eq!(pool.backoff_ms, MAX_BACKOFF_MS);
    }

    #[test]
    fn a_batch_with_unsafe_or_extra_challenges_is_refused_whole() {
        let mut pool = ChallengePool::new(1024, MAX_AGE);
        pool.take(NOW);
        let refill = pool.next_refill(&offer(), NOW_MS, TIMEOUT).unwrap();
        assert_eq!(asked(&refill), 1);
        let outcome = pool.on_reply(refill.id, &batch(0, 2), NOW_MS);
        assert!(matches!(outcome, RefillOutcome::Failed { .. }), "more than asked");

        let mut reply = batch(0, 1);
        let mut body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        body["challenges"][0]["invoice"] = json!("lnbc\r\nx-injected: 1");
        reply.body = body.to_string().into_bytes();
        let refill = pool.next_refill(&offer(), NOW_MS + FIRST_BACKOFF_MS, TIMEOUT).unwrap();
        let outcome = pool.on_reply(refill.id, &reply, NOW_MS + FIRST_BACKOFF_MS);
        assert!(matches!(outcome, RefillOutcome::Failed { .. }), "an unsafe invoice");
        assert!(pool.entries.is_empty());
    }

    #[test]
    fn a_refill_whose_reply_never_comes_is_sent_again_and_its_late_reply_ignored() {
        let mut pool = ChallengePool::new(1024, MAX_AGE);
        pool.take(NOW);
        let lost = pool.next_refill(&offer(), NOW_MS, TIMEOUT).unwrap();
        assert_eq!(pool.next_refill(&offer(), NOW_MS + TIMEOUT, TIMEOUT), None, "still waiting");
        let lost_at = NOW_MS + TIMEOUT + 1_000;
        assert_eq!(pool.next_refill(&offer(), lost_at, TIMEOUT), None, "backing off");
        let again = pool.next_refill(&offer(), lost_at + FIRST_BACKOFF_MS, TIMEOUT).unwrap();
        assert_ne!(again.id, lost.id);
        assert_eq!(pool.on_reply(lost.id, &batch(0, 1), lost_at), RefillOutcome::Stray);
        assert_eq!(
            pool.on_reply(again.id, &batch(1, 1), lost_at),
            RefillOutcome::Filled { added: 1 }
        );
        assert_eq!(invoice(&pool.take(lost_at / 1000).unwrap()), "lnbcrt1");
    }

    #[test]
    fn an_off_pool_never_refills() {
        for mut pool in [ChallengePool::new(0, MAX_AGE), ChallengePool::new(1024, 0)] {
            for _ in 0..100 {
                assert_eq!(pool.take(NOW), None);
            }
            assert_eq!(pool.next_refill(&offer(), NOW_MS, TIMEOUT), None);
        }
    }
}
