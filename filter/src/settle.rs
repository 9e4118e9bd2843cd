//! Commits and releases, queued inside the VM and sent to the ledger in batches from the root
//! context's tick. No response waits for them: Kong can neither pause nor dispatch while
//! response headers are processed, and in Envoy it would cost a round trip. The ledger
//! commits a batch in one transaction. A batch the ledger did not acknowledge goes back to
//! the front of the queue and is retried with backoff; settling twice is harmless, as the
//! ledger reports an already settled hold and changes nothing.
//!
//! A full batch still waiting when the previous one is acknowledged goes at once, not at the
//! next tick: one batch a tick would cap a worker at `MAX_BATCH` settlements per interval
//! (10,000 a second at the default 50 ms), below what one Envoy worker serves with
//! prefetched holds, and the queue would grow until holds expired unsettled.
//!
//! The ledger answers each settlement: one it refuses as `invalid` is dropped alone (and
//! logged), one its answer does not name is sent again, and a 200 whose body is not a
//! settle answer counts as no answer.
//!
//! One queue serves each ledger for the whole VM (see `ledgers`): a configuration reload
//! replaces the root context, and the settlements of calls still in flight under the old
//! one must not go with it. A batch whose reply never comes (its root context went away) is
//! sent again after its timeout.

use std::collections::{HashMap, VecDeque};

use paystile_protocol::ledger_api::{
    SettleRequest, SettleResponse, SettleResult, SettleStatus, Settlement, path,
};

use crate::ledger::{LedgerCall, LedgerReply};

/// The most settlements sent in one call.
pub const MAX_BATCH: usize = 500;
/// The most settlements kept while the ledger is unreachable; beyond, the oldest are
/// dropped (their holds expire on the ledger and are released, so nobody is overcharged).
pub const MAX_QUEUED: usize = 100_000;
const FIRST_BACKOFF_MS: u64 = 100;
const MAX_BACKOFF_MS: u64 = 5_000;

/// A settlement waiting to be sent, with the token its hold is on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Queued {
    pub settlement: Settlement,
    pub token_id: String,
}

#[derive(Debug, Default)]
pub struct SettleQueue {
    waiting: VecDeque<Queued>,
    in_flight: Option<InFlight>,
    sent: u64,
    retry_at_ms: u64,
    backoff_ms: u64,
}

#[derive(Debug)]
struct InFlight {
    id: u64,
    settlements: Vec<Queued>,
    /// When to give up waiting for the reply.
    deadline_ms: u64,
}

/// A batch to send; its reply goes back to the queue with its `id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub id: u64,
    pub call: LedgerCall,
}

/// What became of the batch in flight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BatchOutcome {
    /// The ledger answered it, settlement by settlement.
    Answered(Answered),
    /// Not acknowledged (no answer, an error status, or a 200 that is not a settle answer):
    /// queued again, next attempt in `retry_in_ms`.
    Retrying { retry_in_ms: u64 },
    /// Refused as malformed (400): dropped, since sending it again cannot succeed.
    Dropped { settlements: usize },
    /// No batch was in flight.
    Stray,
}

/// What the ledger's answer to a batch said.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Answered {
    /// Settlements the ledger answered with a final status.
    pub settled: usize,
    /// Of those, holds it could not commit as asked (expired, revoked, unknown).
    pub unsettled: usize,
    /// Settlements it refused as `invalid`, with its reason: dropped, never sent again.
    pub invalid: Vec<(String, String)>,
    /// Settlements its answer did not name: queued again.
    pub requeued: usize,
    /// The tokens (each once) of holds found revoked or expired: the ledger commits none of
    /// their holds any more, prefetched ones included.
    pub lost_tokens: Vec<String>,
}

impl SettleQueue {
    /// Queues a settlement. Answers `true` if the queue was full and the oldest was dropped.
    pub fn push(&mut self, settlement: Queued) -> bool {
        let full = self.waiting.len() >= MAX_QUEUED;
        if full {
            self.waiting.pop_front();
        }
        self.waiting.push_back(settlement);
        full
    }

    /// Whether a full batch is waiting: worth sending without waiting for the next tick.
    pub fn backlogged(&self) -> bool {
        self.waiting.len() >= MAX_BATCH
    }

    /// The next batch to send, if one is waiting, none is in flight and no backoff is
    /// running. `timeout_ms` is how long the call may take before it counts as lost.
    pub fn next_batch(&mut self, now_ms: u64, timeout_ms: u64) -> Option<Batch> {
        self.take_batch(now_ms, timeout_ms, true)
    }

    /// The next batch to send even while a backoff runs: the VM is going away, and this is
    /// the last chance to deliver what is waiting.
    pub fn last_batch(&mut self, now_ms: u64, timeout_ms: u64) -> Option<Batch> {
        self.take_batch(now_ms, timeout_ms, false)
    }

    fn take_batch(&mut self, now_ms: u64, timeout_ms: u64, backoff: bool) -> Option<Batch> {
        if let Some(lost) = self.in_flight.take_if(|f| now_ms >= f.deadline_ms) {
            log::warn!("paystile: no reply to a settle batch; sending it again");
            self.requeue(lost.settlements, now_ms);
        }
        let waiting_out_backoff = backoff && now_ms < self.retry_at_ms;
        if self.in_flight.is_some() || self.waiting.is_empty() || waiting_out_backoff {
            return None;
        }
        let count = self.waiting.len().min(MAX_BATCH);
        let settlements: Vec<Queued> = self.waiting.drain(..count).collect();
        let request = SettleRequest {
            settlements: settlements.iter().map(|q| q.settlement.clone()).collect(),
        };
        // Serializing ids, enums and integers cannot fail.
        let body = serde_json::to_vec(&request).unwrap_or_default();
        self.sent += 1;
        // A second of slack over the call's own timeout, after which the host answers.
        let deadline_ms = now_ms.saturating_add(timeout_ms).saturating_add(1_000);
        self.in_flight = Some(InFlight { id: self.sent, settlements, deadline_ms });
        Some(Batch {
            id: self.sent,
            call: LedgerCall { path: path::SETTLEMENTS, body, timeout: None },
        })
    }

    /// The ledger's reply to batch `id`.
    pub fn on_reply(&mut self, id: u64, reply: &LedgerReply, now_ms: u64) -> BatchOutcome {
        let Some(batch) = self.in_flight.take_if(|f| f.id == id) else {
            return BatchOutcome::Stray;
        };
        let batch = batch.settlements;
        match reply.status {
            Some(200) => match serde_json::from_slice::<SettleResponse>(&reply.body) {
                Ok(response) => {
                    self.backoff_ms = 0;
                    self.retry_at_ms = 0;
                    let (answered, unanswered) = answered(batch, response);
                    if !unanswered.is_empty() {
                        self.requeue(unanswered, now_ms);
                    }
                    BatchOutcome::Answered(answered)
                }
                Err(_) => {
                    self.requeue(batch, now_ms);
                    BatchOutcome::Retrying { retry_in_ms: self.backoff_ms }
                }
            },
            Some(400) => BatchOutcome::Dropped { settlements: batch.len() },
            _ => {
                self.requeue(batch, now_ms);
                BatchOutcome::Retrying { retry_in_ms: self.backoff_ms }
            }
        }
    }

    /// Batch `id` could not even be sent (the host refused the dispatch).
    pub fn on_send_failed(&mut self, id: u64, now_ms: u64) {
        if let Some(batch) = self.in_flight.take_if(|f| f.id == id) {
            self.requeue(batch.settlements, now_ms);
        }
    }

    /// Settlements waiting or in flight.
    pub fn depth(&self) -> usize {
        self.waiting.len() + self.in_flight.as_ref().map_or(0, |f| f.settlements.len())
    }

    fn requeue(&mut self, batch: Vec<Queued>, now_ms: u64) {
        for settlement in batch.into_iter().rev() {
            self.waiting.push_front(settlement);
        }
        self.backoff_ms = (self.backoff_ms * 2).clamp(FIRST_BACKOFF_MS, MAX_BACKOFF_MS);
        self.retry_at_ms = now_ms.saturating_add(self.backoff_ms);
    }
}

/// Sorts a batch by the ledger's answer: what it answered, and the settlements it did not
/// name (to send again).
fn answered(batch: Vec<Queued>, response: SettleResponse) -> (Answered, Vec<Queued>) {
    let mut results: HashMap<String, SettleResult> =
        response.results.into_iter().map(|r| (r.charge_id.clone(), r)).collect();
    let mut answered = Answered::default();
    let mut unanswered = Vec::new();
    for queued in batch {
        let Some(result) = results.remove(&queued.settlement.charge_id) else {
            unanswered.push(queued);
            continue;
        };
        match result.status {
            SettleStatus::Invalid => {
                let reason = result.error.unwrap_or_default();
                answered.invalid.push((result.charge_id, reason));
                continue;
            }
            SettleStatus::Expired | SettleStatus::Revoked => {
                answered.unsettled += 1;
                if !answered.lost_tokens.contains(&queued.token_id) {
                    answered.lost_tokens.push(queued.token_id);
                }
            }
            SettleStatus::Unknown => answered.unsettled += 1,
            SettleStatus::Committed
            | SettleStatus::Released
            | SettleStatus::AlreadyCommitted
            | SettleStatus::AlreadyReleased => {}
        }
        answered.settled += 1;
    }
    answered.requeued = unanswered.len();
    (answered, unanswered)
}

#[cfg(test)]
mod tests {
    use paystile_protocol::ledger_api::Outcome;

    use super::*;

    const TIMEOUT: u64 = 1_000;

    fn settlement(i: usize) -> Queued {
        Queued {
            settlement: Settlement {
                charge_id: format!("ch_{i}"),
                outcome: Outcome::Commit,
                upstream_status: Some(200),
                amount_usdc: None,
            },
            token_id: format!("tok_{}", i % 2),
        }
    }

    fn sent(batch: &Batch) -> Vec<String> {
        let request: SettleRequest = serde_json::from_slice(&batch.call.body).unwrap();
        request.settlements.into_iter().map(|s| s.charge_id).collect()
    }

    fn queued(queue: &SettleQueue) -> usize {
        queue.depth()
    }

    fn reply(status: Option<u16>, body: &str) -> LedgerReply {
        LedgerReply { status, body: body.as_bytes().to_vec() }
    }

    /// The ledger's 200 committing every settlement of `batch`.
    fn committed(batch: &Batch) -> LedgerReply {
        let results: Vec<_> = sent(batch)
            .into_iter()
            .map(|id| serde_json::json!({"chargeId": id, "status": "committed"}))
            .collect();
        reply(Some(200), &serde_json::json!({ "results": results }).to_string())
    }

    fn answered(settled: usize) -> BatchOutcome {
        BatchOutcome::Answered(Answered { settled, ..Answered::default() })
    }

    #[test]
    fn sends_one_batch_at_a_time_in_order() {
        let mut queue = SettleQueue::default();
        assert_eq!(queue.next_batch(0, TIMEOUT), None);
        for i in 0..MAX_BATCH + 3 {
            queue.push(settlement(i));
        }
        let first = queue.next_batch(0, TIMEOUT).unwrap();
        assert_eq!(first.call.path, "/v1/holds/settle");
        assert_eq!(sent(&first).len(), MAX_BATCH);
        assert_eq!(sent(&first)[0], "ch_0");
        assert_eq!(queue.next_batch(0, TIMEOUT), None, "a second batch while one is in flight");
        let outcome = queue.on_reply(first.id, &committed(&first), 0);
        assert_eq!(outcome, answered(MAX_BATCH));
        assert_eq!(sent(&queue.next_batch(0, TIMEOUT).unwrap()), ["ch_500", "ch_501", "ch_502"]);
    }

    #[test]
    fn a_full_batch_waiting_is_a_backlog() {
        let mut queue = SettleQueue::default();
        for i in 0..2 * MAX_BATCH - 1 {
            queue.push(settlement(i));
        }
        assert!(queue.backlogged());
        let first = queue.next_batch(0, TIMEOUT).unwrap();
        assert!(!queue.backlogged(), "{} waiting", MAX_BATCH - 1);
        queue.push(settlement(2 * MAX_BATCH));
        assert!(queue.backlogged());
        queue.on_reply(first.id, &committed(&first), 0);
        assert_eq!(sent(&queue.next_batch(0, TIMEOUT).unwrap()).len(), MAX_BATCH);
        assert!(!queue.backlogged());
    }

    #[test]
    fn unacknowledged_batches_are_retried_first_with_backoff() {
        let mut queue = SettleQueue::default();
        queue.push(settlement(1));
        let first = queue.next_batch(1_000, TIMEOUT).unwrap();
        queue.push(settlement(2));
        // A reset (no status), then a 503: back in front, waiting longer each time.
        let outcome = queue.on_reply(first.id, &reply(None, ""), 1_000);
        assert_eq!(outcome, BatchOutcome::Retrying { retry_in_ms: 100 });
        assert_eq!(queue.next_batch(1_050, TIMEOUT), None);
        let second = queue.next_batch(1_100, TIMEOUT).unwrap();
        let outcome = queue.on_reply(second.id, &reply(Some(503), ""), 1_100);
        assert_eq!(outcome, BatchOutcome::Retrying { retry_in_ms: 200 });
        assert_eq!(queue.next_batch(1_299, TIMEOUT), None);
        let third = queue.next_batch(1_300, TIMEOUT).unwrap();
        assert_eq!(sent(&third), ["ch_1", "ch_2"]);
        queue.on_send_failed(third.id, 1_300);
        assert_eq!(queued(&queue), 2);
        // Success resets the backoff.
        let fourth = queue.next_batch(1_700, TIMEOUT).unwrap();
        queue.on_reply(fourth.id, &committed(&fourth), 1_700);
        assert_eq!(queued(&queue), 0);
        queue.push(settlement(3));
        assert!(queue.next_batch(1_700, TIMEOUT).is_some());
    }

    /// When the VM goes, what waits is sent at once, backoff or not; still one batch at a time.
    #[test]
    fn the_last_batches_do_not_wait_out_the_backoff() {
        let mut queue = SettleQueue::default();
        queue.push(settlement(1));
        let failed = queue.next_batch(0, TIMEOUT).unwrap();
        queue.on_reply(failed.id, &reply(Some(503), ""), 0);
        assert_eq!(queue.next_batch(1, TIMEOUT), None, "in backoff");
        let last = queue.last_batch(1, TIMEOUT).unwrap();
        assert_eq!(sent(&last), ["ch_1"]);
        queue.push(settlement(2));
        assert_eq!(queue.last_batch(1, TIMEOUT), None, "a second batch while one is in flight");
    }

    #[test]
    fn backoff_is_capped() {
        let mut queue = SettleQueue::default();
        queue.push(settlement(1));
        let mut now = 0;
        for _ in 0..20 {
            let batch = queue.next_batch(now, TIMEOUT).unwrap();
            let outcome = queue.on_reply(batch.id, &reply(Some(502), ""), now);
            let BatchOutcome::Retrying { retry_in_ms } = outcome else { panic!("{outcome:?}") };
            assert!(retry_in_ms <= MAX_BACKOFF_MS);
            now += retry_in_ms;
        }
        assert_eq!(queue.backoff_ms, MAX_BACKOFF_MS);
    }

    #[test]
    fn counts_what_the_ledger_could_not_commit_and_names_the_tokens_it_no_longer_commits() {
        let mut queue = SettleQueue::default();
        for i in 0..5 {
            queue.push(settlement(i));
        }
        let batch = queue.next_batch(0, TIMEOUT).unwrap();
        let body = r#"{"results":[{"chargeId":"ch_0","status":"committed"},
            {"chargeId":"ch_1","status":"revoked"},{"chargeId":"ch_2","status":"unknown"},
            {"chargeId":"ch_3","status":"expired"},{"chargeId":"ch_4","status":"released"}]}"#;
        let outcome = queue.on_reply(batch.id, &reply(Some(200), body), 0);
        // ch_1 and ch_3 are both on tok_1: named once. An unknown hold says nothing of its token.
        let lost_tokens = vec!["tok_1".to_owned()];
        let expected = Answered { settled: 5, unsettled: 3, lost_tokens, ..Answered::default() };
        assert_eq!(outcome, BatchOutcome::Answered(expected));
        assert_eq!(queued(&queue), 0);
    }

    /// One settlement the ledger refuses does not take the others with it: it is dropped
    /// (with the ledger's reason), the others are settled, and nothing is sent again.
    #[test]
    fn an_invalid_settlement_is_dropped_alone() {
        let mut queue = SettleQueue::default();
        for i in 0..3 {
            queue.push(settlement(i));
        }
        let batch = queue.next_batch(0, TIMEOUT).unwrap();
        let body = r#"{"results":[{"chargeId":"ch_0","status":"committed"},
            {"chargeId":"ch_1","status":"invalid","error":"amountUsdc 2 is more than the 1 held"},
            {"chargeId":"ch_2","status":"already_committed"}]}"#;
        let outcome = queue.on_reply(batch.id, &reply(Some(200), body), 0);
        let invalid = vec![("ch_1".to_owned(), "amountUsdc 2 is more than the 1 held".to_owned())];
        let expected = Answered { settled: 2, invalid, ..Answered::default() };
        assert_eq!(outcome, BatchOutcome::Answered(expected));
        assert_eq!(queued(&queue), 0);
        assert_eq!(queue.next_batch(10_000, TIMEOUT), None);
    }

    /// Settlements the answer does not name are not acknowledged: they go again.
    #[test]
    fn settlements_missing_from_the_answer_are_sent_again() {
        let mut queue = SettleQueue::default();
        for i in 0..3 {
            queue.push(settlement(i));
        }
        let batch = queue.next_batch(0, TIMEOUT).unwrap();
        let body = r#"{"results":[{"chargeId":"ch_1","status":"committed"}]}"#;
        let outcome = queue.on_reply(batch.id, &reply(Some(200), body), 0);
        let expected = Answered { settled: 1, requeued: 2, ..Answered::default() };
        assert_eq!(outcome, BatchOutcome::Answered(expected));
        let again = queue.next_batch(FIRST_BACKOFF_MS, TIMEOUT).unwrap();
        assert_eq!(sent(&again), ["ch_0", "ch_2"]);
    }

    /// A 200 whose body is not a settle answer (a proxy's page, a truncated body) is no
    /// acknowledgement.
    #[test]
    fn a_200_that_is_not_a_settle_answer_is_retried() {
        for body in ["", "<html>ok</html>", r#"{"results":"#, r#"{"results":[{"chargeId":1}]}"#] {
            let mut queue = SettleQueue::default();
            queue.push(settlement(1));
            let batch = queue.next_batch(0, TIMEOUT).unwrap();
            let outcome = queue.on_reply(batch.id, &reply(Some(200), body), 0);
            assert_eq!(outcome, BatchOutcome::Retrying { retry_in_ms: FIRST_BACKOFF_MS }, "{body}");
            assert_eq!(sent(&queue.next_batch(FIRST_BACKOFF_MS, TIMEOUT).unwrap()), ["ch_1"]);
        }
    }

    #[test]
    fn malformed_batches_are_dropped_not_retried_forever() {
        let mut queue = SettleQueue::default();
        queue.push(settlement(1));
        let batch = queue.next_batch(0, TIMEOUT).unwrap();
        let outcome = queue.on_reply(batch.id, &reply(Some(400), "{}"), 0);
        assert_eq!(outcome, BatchOutcome::Dropped { settlements: 1 });
        assert_eq!(queued(&queue), 0);
        assert_eq!(queue.on_reply(batch.id, &committed(&batch), 0), BatchOutcome::Stray);
    }

    #[test]
    fn a_full_queue_drops_the_oldest() {
        let mut queue = SettleQueue::default();
        for i in 0..MAX_QUEUED {
            assert!(!queue.push(settlement(i)));
        }
        assert!(queue.push(settlement(MAX_QUEUED)));
        assert_eq!(queued(&queue), MAX_QUEUED);
        assert_eq!(sent(&queue.next_batch(0, TIMEOUT).unwrap())[0], "ch_1");
    }

    #[test]
    fn a_batch_whose_reply_never_comes_is_sent_again_and_its_late_reply_ignored() {
        let mut queue = SettleQueue::default();
        queue.push(settlement(1));
        let lost = queue.next_batch(0, TIMEOUT).unwrap();
        queue.push(settlement(2));
        assert_eq!(queue.next_batch(TIMEOUT, TIMEOUT), None, "gave up before the timeout");
        // Past the timeout (and its second of slack) the batch counts as failed: it is
        // queued again and sent after the usual backoff.
        let lost_at = TIMEOUT + 1_000;
        assert_eq!(queue.next_batch(lost_at, TIMEOUT), None);
        let again = queue.next_batch(lost_at + FIRST_BACKOFF_MS, TIMEOUT).unwrap();
        assert_eq!(sent(&again), ["ch_1", "ch_2"]);
        // The lost batch's reply arrives after all: it must not acknowledge the new one.
        assert_eq!(queue.on_reply(lost.id, &committed(&lost), 3_000), BatchOutcome::Stray);
        assert_eq!(queued(&queue), 2);
        assert_eq!(queue.on_reply(again.id, &committed(&again), 3_000), answered(2));
    }
}
