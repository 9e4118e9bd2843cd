//! The VM's watch on a ledger's revocations: a long poll sent from the root context's tick
//! (`GET /v1/revocations`), answered as soon as a revocation voids open holds. The tokens
//! it names lose their prefetched holds at once (see `prefetch`), and the next poll, sent
//! as soon as they are dropped, tells the ledger so: a revoke answers once every watching
//! VM has applied it. A poll that fails is sent again after a growing pause.

use paystile_protocol::ledger_api::{RevocationFeed, WATCH_WAIT_MS, path};

use crate::ledger::LedgerReply;

/// How long a poll may go unanswered before it is taken as lost: the ledger's wait and
/// some more.
pub const POLL_TIMEOUT_MS: u64 = WATCH_WAIT_MS + 5_000;
/// The pause after a first failed poll; it doubles with each failure, up to the maximum.
const RETRY_MS: u64 = 250;
const MAX_RETRY_MS: u64 = 10_000;

/// One ledger's watch, as this VM keeps it.
#[derive(Debug, Default)]
pub struct Watch {
    /// The feed position applied; `None` until the ledger first answered.
    seq: Option<u64>,
    /// The poll on its way: its id and when it was sent (ms).
    in_flight: Option<(u64, u64)>,
    next_id: u64,
    failures: u32,
    /// No poll before this (ms), after a failure.
    retry_at_ms: u64,
}

/// A poll to send: `GET` `path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Poll {
    pub id: u64,
    pub path: String,
}

/// What a poll's reply means.
#[derive(Debug, PartialEq, Eq)]
pub enum Heard {
    /// Drop the prefetched holds of these tokens (all of them with `all`: the feed started
    /// over, so this VM cannot know what it missed), then poll again at once.
    Revoked { token_ids: Vec<String>, all: bool },
    /// No answer, or none of ours: the next poll goes after a pause.
    Failed { retry_in_ms: u64 },
    /// The reply to a poll given up on.
    Stray,
}

impl Watch {
    /// The poll to send at `now_ms` for `watcher` (this VM's name), if one is due: none is
    /// on its way (one older than [`POLL_TIMEOUT_MS`] is taken as lost) and no pause after
    /// a failure is running.
    pub fn next_poll(&mut self, watcher: &str, now_ms: u64) -> Option<Poll> {
        let waiting =
            self.in_flight.is_some_and(|(_, sent)| now_ms.saturating_sub(sent) < POLL_TIMEOUT_MS);
        if waiting || now_ms < self.retry_at_ms {
            return None;
        }
        self.next_id += 1;
        self.in_flight = Some((self.next_id, now_ms));
        let after = self.seq.map(|seq| format!("&after={seq}")).unwrap_or_default();
        Some(Poll {
            id: self.next_id,
            path: format!("{}?watcher={watcher}{after}", path::REVOCATIONS),
        })
    }

    /// The host would not send poll `id`.
    pub fn on_send_failed(&mut self, id: u64, now_ms: u64) {
        if self.in_flight.is_some_and(|(sent, _)| sent == id) {
            self.in_flight = None;
            self.back_off(now_ms);
        }
    }

    /// The reply to poll `id`.
    pub fn on_reply(&mut self, id: u64, reply: &LedgerReply, now_ms: u64) -> Heard {
        if self.in_flight.is_none_or(|(sent, _)| sent != id) {
            return Heard::Stray;
        }
        self.in_flight = None;
        let feed = match reply.status {
            Some(200) => serde_json::from_slice::<RevocationFeed>(&reply.body).ok(),
            _ => None,
        };
        let Some(feed) = feed else {
            return Heard::Failed { retry_in_ms: self.back_off(now_ms) };
        };
        self.failures = 0;
        let all = self.seq.is_some_and(|seq| feed.seq < seq);
        self.seq = Some(feed.seq);
        Heard::Revoked { token_ids: feed.token_ids, all }
    }

    fn back_off(&mut self, now_ms: u64) -> u64 {
        let pause = RETRY_MS.saturating_mul(1 << self.failures.min(6)).min(MAX_RETRY_MS);
        self.failures = self.failures.saturating_add(1);
        self.retry_at_ms = now_ms.saturating_add(pause);
        pause
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(body: &str) -> LedgerReply {
        LedgerReply { status: Some(200), body: body.as_bytes().to_vec() }
    }

    #[test]
    fn polls_one_at_a_time_from_the_position_applied() {
        let mut watch = Watch::default();
        let first = watch.next_poll("vm-1", 0).unwrap();
        assert_eq!(first.path, "/v1/revocations?watcher=vm-1");
        assert_eq!(watch.next_poll("vm-1", 1), None, "two polls on their way");
        let heard = watch.on_reply(first.id, &answer(r#"{"seq":7,"tokenIds":[]}"#), 2);
        assert_eq!(heard, Heard::Revoked { token_ids: vec![], all: false });
        let second = watch.next_poll("vm-1", 2).unwrap();
        assert_eq!(second.path, "/v1/revocations?watcher=vm-1&after=7");
        let heard =
            watch.on_reply(second.id, &answer(r#"{"seq":9,"tokenIds":["tok_a","tok_b"]}"#), 3);
        assert_eq!(
            heard,
            Heard::Revoked { token_ids: vec!["tok_a".into(), "tok_b".into()], all: false }
        );
        assert_eq!(
            watch.next_poll("vm-1", 3).unwrap().path,
            "/v1/revocations?watcher=vm-1&after=9"
        );
        // A reply to a poll no longer awaited changes nothing.
        assert_eq!(
            watch.on_reply(second.id, &answer(r#"{"seq":1,"tokenIds":[]}"#), 4),
            Heard::Stray
        );
    }

    #[test]
    fn a_feed_that_started_over_drops_everything() {
        let mut watch = Watch::default();
        let poll = watch.next_poll("vm-1", 0).unwrap();
        watch.on_reply(poll.id, &answer(r#"{"seq":50,"tokenIds":[]}"#), 0);
        let poll = watch.next_poll("vm-1", 0).unwrap();
        let heard = watch.on_reply(poll.id, &answer(r#"{"seq":3,"tokenIds":[]}"#), 0);
        assert_eq!(heard, Heard::Revoked { token_ids: vec![], all: true });
        assert!(watch.next_poll("vm-1", 0).unwrap().path.ends_with("&after=3"));
    }

    #[test]
    fn failures_back_off_and_a_lost_poll_is_sent_again() {
        let mut watch = Watch::default();
        let poll = watch.next_poll("vm-1", 0).unwrap();
        let unreachable = LedgerReply::default();
        assert_eq!(watch.on_reply(poll.id, &unreachable, 0), Heard::Failed { retry_in_ms: 250 });
        assert_eq!(watch.next_poll("vm-1", 249), None);
        let poll = watch.next_poll("vm-1", 250).unwrap();
        let nonsense = LedgerReply { status: Some(200), body: b"<html>".to_vec() };
        assert_eq!(watch.on_reply(poll.id, &nonsense, 250), Heard::Failed { retry_in_ms: 500 });
        let poll = watch.next_poll("vm-1", 750).unwrap();
        watch.on_send_failed(poll.id, 750);
        assert_eq!(watch.next_poll("vm-1", 1749), None);
        let poll = watch.next_poll("vm-1", 1750).unwrap();
        // Its answer never comes: past the timeout, another goes.
        assert_eq!(watch.next_poll("vm-1", 1750 + POLL_TIMEOUT_MS - 1), None);
        let again = watch.next_poll("vm-1", 1750 + POLL_TIMEOUT_MS).unwrap();
        assert_ne!(again.id, poll.id);
        // An answer resets the pause.
        watch.on_reply(again.id, &answer(r#"{"seq":0,"tokenIds":[]}"#), 30_000);
        let poll = watch.next_poll("vm-1", 30_000).unwrap();
        assert_eq!(
            watch.on_reply(poll.id, &unreachable, 30_000),
            Heard::Failed { retry_in_ms: 250 }
        );
    }
}
