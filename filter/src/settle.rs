//! Commits and releases, queued inside the VM and sent to the ledger in batches from the root
//! context's tick. No response waits for them: Kong can neither pause nor dispatch while
//! response headers are processed, and in Envoy it would cost a round trip. The ledger
//! commits a batch in one transaction. A batch the ledger did not acknowledge goes back to
//! the front of the queue and is retried with backoff; settling twice is harmless, as the
//! ledger reports an already settled hold and changes nothing.

use std::collections::VecDeque;

use paystile_protocol::ledger_api::{
    SettleRequest, SettleResponse, SettleStatus, Settlement, path,
};

use crate::gate::{LedgerCall, LedgerReply};

/// The most settlements sent in one call.
pub const MAX_BATCH: usize = 500;
/// The most settlements kept while the ledger is unreachable; beyond, the oldest are
/// dropped (their holds expire on the ledger and are released, so nobody is overcharged).
pub const MAX_QUEUED: usize = 100_000;
const FIRST_BACKOFF_MS: u64 = 100;
const MAX_BACKOFF_MS: u64 = 5_000;

#[derive(Debug, Default)]
pub struct SettleQueue {
    waiting: VecDeque<Settlement>,
    in_flight: Option<Vec<Settlement>>,
    retry_at_ms: u64,
    backoff_ms: u64,
}

/// What became of the batch in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchOutcome {
    /// The ledger settled it. `unsettled` counts holds it could not commit as asked
    /// (expired, revoked, unknown), which deserve a log line.
    Acknowledged { settled: usize, unsettled: usize },
    /// Not acknowledged: queued again, next attempt in `retry_in_ms`.
    Retrying { retry_in_ms: u64 },
    /// Refused as malformed (400): dropped, since sending it again cannot succeed.
    Dropped { settlements: usize },
    /// No batch was in flight.
    Stray,
}

impl SettleQueue {
    /// Queues a settlement. Answers `true` if the queue was full and the oldest was dropped.
    pub fn push(&mut self, settlement: Settlement) -> bool {
        let full = self.waiting.len() >= MAX_QUEUED;
        if full {
            self.waiting.pop_front();
        }
        self.waiting.push_back(settlement);
        full
    }

    pub fn len(&self) -> usize {
        self.waiting.len() + self.in_flight.as_ref().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The next batch to send, if one is waiting, none is in flight and no backoff is running.
    pub fn next_batch(&mut self, now_ms: u64) -> Option<LedgerCall> {
        if self.in_flight.is_some() || self.waiting.is_empty() || now_ms < self.retry_at_ms {
            return None;
        }
        let count = self.waiting.len().min(MAX_BATCH);
        let request = SettleRequest { settlements: self.waiting.drain(..count).collect() };
        // Serializing ids, enums and integers cannot fail.
        let body = serde_json::to_vec(&request).unwrap_or_default();
        self.in_flight = Some(request.settlements);
        Some(LedgerCall { path: path::SETTLEMENTS, body })
    }

    /// The ledger's reply to the batch in flight.
    pub fn on_reply(&mut self, reply: &LedgerReply, now_ms: u64) -> BatchOutcome {
        let Some(batch) = self.in_flight.take() else {
            return BatchOutcome::Stray;
        };
        match reply.status {
            Some(200) => {
                self.backoff_ms = 0;
                self.retry_at_ms = 0;
                let unsettled =
                    serde_json::from_slice::<SettleResponse>(&reply.body).map_or(0, |r| {
                        r.results
                            .iter()
                            .filter(|r| {
                                matches!(
                                    r.status,
                                    SettleStatus::Expired
                                        | SettleStatus::Revoked
                                        | SettleStatus::Unknown
                                )
                            })
                            .count()
                    });
                BatchOutcome::Acknowledged { settled: batch.len(), unsettled }
            }
            Some(400) => BatchOutcome::Dropped { settlements: batch.len() },
            _ => {
                self.requeue(batch, now_ms);
                BatchOutcome::Retrying { retry_in_ms: self.backoff_ms }
            }
        }
    }

    /// The batch could not even be sent (the host refused the dispatch).
    pub fn on_send_failed(&mut self, now_ms: u64) {
        if let Some(batch) = self.in_flight.take() {
            self.requeue(batch, now_ms);
        }
    }

    fn requeue(&mut self, batch: Vec<Settlement>, now_ms: u64) {
        for settlement in batch.into_iter().rev() {
            self.waiting.push_front(settlement);
        }
        self.backoff_ms = (self.backoff_ms * 2).clamp(FIRST_BACKOFF_MS, MAX_BACKOFF_MS);
        self.retry_at_ms = now_ms.saturating_add(self.backoff_ms);
    }
}

#[cfg(test)]
mod tests {
    use paystile_protocol::ledger_api::Outcome;

    use super::*;

    fn settlement(i: usize) -> Settlement {
        Settlement {
            charge_id: format!("ch_{i}"),
            outcome: Outcome::Commit,
            upstream_status: Some(200),
        }
    }

    fn sent(call: &LedgerCall) -> Vec<String> {
        let request: SettleRequest = serde_json::from_slice(&call.body).unwrap();
        request.settlements.into_iter().map(|s| s.charge_id).collect()
    }

    fn reply(status: Option<u16>, body: &str) -> LedgerReply {
        LedgerReply { status, body: body.as_bytes().to_vec() }
    }

    #[test]
    fn sends_one_batch_at_a_time_in_order() {
        let mut queue = SettleQueue::default();
        assert_eq!(queue.next_batch(0), None);
        for i in 0..MAX_BATCH + 3 {
            queue.push(settlement(i));
        }
        let first = queue.next_batch(0).unwrap();
        assert_eq!(first.path, "/v1/holds/settle");
        assert_eq!(sent(&first).len(), MAX_BATCH);
        assert_eq!(sent(&first)[0], "ch_0");
        assert_eq!(queue.next_batch(0), None, "a second batch while one is in flight");
        let outcome = queue.on_reply(&reply(Some(200), r#"{"results":[]}"#), 0);
        assert_eq!(outcome, BatchOutcome::Acknowledged { settled: MAX_BATCH, unsettled: 0 });
        assert_eq!(sent(&queue.next_batch(0).unwrap()), ["ch_500", "ch_501", "ch_502"]);
    }

    #[test]
    fn unacknowledged_batches_are_retried_first_with_backoff() {
        let mut queue = SettleQueue::default();
        queue.push(settlement(1));
        queue.next_batch(1_000).unwrap();
        queue.push(settlement(2));
        // A reset (no status), then a 503: back in front, waiting longer each time.
        assert_eq!(
            queue.on_reply(&reply(None, ""), 1_000),
            BatchOutcome::Retrying { retry_in_ms: 100 }
        );
        assert_eq!(queue.next_batch(1_050), None);
        queue.next_batch(1_100).unwrap();
        assert_eq!(
            queue.on_reply(&reply(Some(503), ""), 1_100),
            BatchOutcome::Retrying { retry_in_ms: 200 }
        );
        assert_eq!(queue.next_batch(1_299), None);
        assert_eq!(sent(&queue.next_batch(1_300).unwrap()), ["ch_1", "ch_2"]);
        queue.on_send_failed(1_300);
        assert_eq!(queue.len(), 2);
        // Success resets the backoff.
        queue.next_batch(1_700).unwrap();
        queue.on_reply(&reply(Some(200), "{}"), 1_700);
        assert!(queue.is_empty());
        queue.push(settlement(3));
        assert!(queue.next_batch(1_700).is_some());
    }

    #[test]
    fn backoff_is_capped() {
        let mut queue = SettleQueue::default();
        queue.push(settlement(1));
        let mut now = 0;
        for _ in 0..20 {
            queue.next_batch(now).unwrap();
            if let BatchOutcome::Retrying { retry_in_ms } =
                queue.on_reply(&reply(Some(502), ""), now)
            {
                assert!(retry_in_ms <= MAX_BACKOFF_MS);
                now += retry_in_ms;
            }
        }
        assert_eq!(queue.backoff_ms, MAX_BACKOFF_MS);
    }

    #[test]
    fn counts_what_the_ledger_could_not_commit() {
        let mut queue = SettleQueue::default();
        (0..3).for_each(|i| {
            queue.push(settlement(i));
        });
        queue.next_batch(0).unwrap();
        let body = r#"{"results":[{"chargeId":"ch_0","status":"committed"},
            {"chargeId":"ch_1","status":"revoked"},{"chargeId":"ch_2","status":"expired"}]}"#;
        assert_eq!(
            queue.on_reply(&reply(Some(200), body), 0),
            BatchOutcome::Acknowledged { settled: 3, unsettled: 2 }
        );
    }

    #[test]
    fn malformed_batches_are_dropped_not_retried_forever() {
        let mut queue = SettleQueue::default();
        queue.push(settlement(1));
        queue.next_batch(0).unwrap();
        assert_eq!(
            queue.on_reply(&reply(Some(400), "{}"), 0),
            BatchOutcome::Dropped { settlements: 1 }
        );
        assert!(queue.is_empty());
        assert_eq!(queue.on_reply(&reply(Some(200), "{}"), 0), BatchOutcome::Stray);
    }

    #[test]
    fn a_full_queue_drops_the_oldest() {
        let mut queue = SettleQueue::default();
        for i in 0..MAX_QUEUED {
            assert!(!queue.push(settlement(i)));
        }
        assert!(queue.push(settlement(MAX_QUEUED)));
        assert_eq!(queue.len(), MAX_QUEUED);
        assert_eq!(sent(&queue.next_batch(0).unwrap())[0], "ch_1");
    }
}
