//! Prefetched holds: the extra holds a reserve got for a hot token, kept per VM to serve
//! that token's next calls without a ledger round trip each.
//!
//! Each entry is an ordinary hold on the ledger (durable, its own charge id, settled through
//! the queue like any other), so taking one changes nothing the ledger promises. An entry is
//! used at most once: [`Prefetched::take`] removes it. Entries no call took within the
//! maximum age are released from the tick; a token whose reserve was refused, or whose
//! settlement came back revoked or expired, loses all its entries at once.
//!
//! A pool is refilled ahead, before it runs dry, and by one reserve at a time: see
//! [`Prefetched::start_refill`]. Concurrent batch reserves for one token would only queue
//! behind each other on the ledger's writer.

use std::collections::{HashMap, VecDeque};

use paystile_protocol::Usdc;
use paystile_protocol::ledger_api::{Outcome, Settlement};

use crate::settle::Queued;

/// The calls one pool serves: holds of one token, for one service, of one amount, under
/// one presented cap.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub token_id: String,
    pub service_id: String,
    /// The route's price, or a metered route's maximum.
    pub amount: Usdc,
    pub cap: Option<Usdc>,
}

/// A prefetched hold, waiting for a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub charge_id: String,
    /// What the ledger said remained once the whole batch was held: at most this much does.
    pub remaining: Usdc,
    /// When the reserve that got it was sent (ms).
    pub reserved_at_ms: u64,
}

/// The VM's prefetched holds, and when each token last called.
#[derive(Debug, Default)]
pub struct Prefetched {
    pools: HashMap<PoolKey, VecDeque<Entry>>,
    last_call_ms: HashMap<String, u64>,
    /// The pools with a batch reserve on its way, and when it was sent (ms).
    refilling: HashMap<PoolKey, u64>,
    /// Entries taken out of the pools (dropped tokens), to be released from the next tick.
    dropped: Vec<Queued>,
    /// Tokens the ledger's revocation feed named, until when they are remembered (ms): a
    /// reserve the ledger answered before the revocation, read after it, must neither
    /// serve its call nor fill a pool.
    revoked: HashMap<String, u64>,
    /// Entries ever added to a pool: with [`Prefetched::waiting`], what the VM's metrics
    /// report (added, and gone: taken or given back).
    entered: u64,
    /// Entries in the pools, kept as they come and go: read after every call.
    waiting: usize,
}

impl Prefetched {
    /// Notes a call of `token_id` at `now_ms`: answers whether the token is hot, i.e. had
    /// another call within `max_age_ms`.
    pub fn note_call(&mut self, token_id: &str, now_ms: u64, max_age_ms: u64) -> bool {
        let last = match self.last_call_ms.get_mut(token_id) {
            Some(last) => std::mem::replace(last, now_ms),
            None => {
                self.last_call_ms.insert(token_id.to_owned(), now_ms);
                return false;
            }
        };
        now_ms.saturating_sub(last) <= max_age_ms
    }

    /// The oldest unused hold for `key` still within `max_age_ms`, removed from the pool.
    /// Older ones are never handed out: they go to the next tick's releases.
    pub fn take(&mut self, key: &PoolKey, now_ms: u64, max_age_ms: u64) -> Option<Entry> {
        let pool = self.pools.get_mut(key)?;
        let mut taken = None;
        while let Some(entry) = pool.pop_front() {
            self.waiting -= 1;
            if now_ms.saturating_sub(entry.reserved_at_ms) < max_age_ms {
                taken = Some(entry);
                break;
            }
            self.dropped.push(release(&key.token_id, entry.charge_id));
        }
        if pool.is_empty() {
            self.pools.remove(key);
        }
        taken
    }

    /// Whether a call of `key` at `now_ms` should reserve the pool's next batch: when the
    /// pool is down to `low_water` entries and no batch reserve is on its way (one sent more
    /// than `timeout_ms` ago is taken as lost: its stream ended before the answer). If so,
    /// the refill is noted as on its way until [`Prefetched::end_refill`].
    pub fn start_refill(
        &mut self,
        key: &PoolKey,
        low_water: usize,
        now_ms: u64,
        timeout_ms: u64,
    ) -> bool {
        let waiting = self.pools.get(key).map_or(0, VecDeque::len);
        let in_flight =
            self.refilling.get(key).is_some_and(|sent| now_ms.saturating_sub(*sent) <= timeout_ms);
        if waiting > low_water || in_flight {
            return false;
        }
        self.refilling.insert(key.clone(), now_ms);
        true
    }

    /// The batch reserve for `key` has been answered, or failed.
    pub fn end_refill(&mut self, key: &PoolKey) {
        self.refilling.remove(key);
    }

    /// Keeps the extra holds a reserve for `key` got, in the order they were reserved (a
    /// revoked token's are released instead).
    pub fn add(&mut self, key: PoolKey, entries: Vec<Entry>) {
        if self.revoked.contains_key(&key.token_id) {
            self.dropped
                .extend(entries.into_iter().map(|entry| release(&key.token_id, entry.charge_id)));
        } else if !entries.is_empty() {
            self.entered += entries.len() as u64;
            self.waiting += entries.len();
            self.pools.entry(key).or_default().extend(entries);
        }
    }

    /// The ledger revoked `token_id`: its entries are released, and until `now_ms +
    /// remember_ms` holds the ledger made for it before the revocation are not used.
    pub fn revoke(&mut self, token_id: &str, now_ms: u64, remember_ms: u64) {
        self.drop_token(token_id);
        self.revoked.insert(token_id.to_owned(), now_ms.saturating_add(remember_ms));
    }

    /// Whether a revocation of `token_id` was heard lately.
    pub fn is_revoked(&self, token_id: &str) -> bool {
        self.revoked.contains_key(token_id)
    }

    /// Releases, from the next tick, the hold `charge_id` of `token_id` that no call will use.
    pub fn release_unused(&mut self, token_id: &str, charge_id: String) {
        self.dropped.push(release(token_id, charge_id));
    }

    /// Gives up every entry: the revocation feed started over, so which tokens were
    /// revoked meanwhile is unknown.
    pub fn drop_all(&mut self) {
        self.waiting = 0;
        for (key, pool) in self.pools.drain() {
            self.dropped
                .extend(pool.into_iter().map(|entry| release(&key.token_id, entry.charge_id)));
        }
    }

    /// Gives up every entry of `token_id`: its reserve was refused, or the ledger no longer
    /// commits its holds. They are released from the next tick.
    pub fn drop_token(&mut self, token_id: &str) {
        let keys: Vec<PoolKey> =
            self.pools.keys().filter(|key| key.token_id == token_id).cloned().collect();
        for key in keys {
            if let Some(pool) = self.pools.remove(&key) {
                self.waiting -= pool.len();
                self.dropped
                    .extend(pool.into_iter().map(|entry| release(&key.token_id, entry.charge_id)));
            }
        }
    }

    /// What to release now: the dropped tokens' entries and those past `max_age_ms`. Also
    /// forgets tokens that have not called within it, so that only hot tokens are tracked,
    /// and refills sent longer ago than that, whose streams ended before their answers.
    pub fn releases(&mut self, now_ms: u64, max_age_ms: u64) -> Vec<Queued> {
        let mut releases = std::mem::take(&mut self.dropped);
        let stale = |entry: &Entry| now_ms.saturating_sub(entry.reserved_at_ms) >= max_age_ms;
        self.pools.retain(|key, pool| {
            // Entries are added in reserve order: the oldest are at the front.
            while pool.front().is_some_and(stale) {
                if let Some(entry) = pool.pop_front() {
                    self.waiting -= 1;
                    releases.push(release(&key.token_id, entry.charge_id));
                }
            }
            !pool.is_empty()
        });
        self.last_call_ms.retain(|_, last| now_ms.saturating_sub(*last) <= max_age_ms);
        self.refilling.retain(|_, sent| now_ms.saturating_sub(*sent) <= max_age_ms);
        self.revoked.retain(|_, until| now_ms < *until);
        releases
    }

    /// Entries ever added to a pool.
    pub fn entered(&self) -> u64 {
        self.entered
    }

    /// Holds waiting for a call, over every pool.
    pub fn waiting(&self) -> usize {
        self.waiting
    }
}

fn release(token_id: &str, charge_id: String) -> Queued {
    Queued {
        settlement: Settlement {
            charge_id,
            outcome: Outcome::Release,
            upstream_status: None,
            amount_usdc: None,
        },
        token_id: token_id.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGE: u64 = 1000;

    fn key(token: &str) -> PoolKey {
        PoolKey {
            token_id: token.into(),
            service_id: "weather".into(),
            amount: Usdc::from_micros(1000).unwrap_or(Usdc::ZERO),
            cap: None,
        }
    }

    fn entry(id: &str, at: u64) -> Entry {
        Entry {
            charge_id: id.into(),
            remaining: Usdc::from_micros(5000).unwrap_or(Usdc::ZERO),
            reserved_at_ms: at,
        }
    }

    fn released(releases: &[Queued]) -> Vec<&str> {
        releases.iter().map(|r| r.settlement.charge_id.as_str()).collect()
    }

    #[test]
    fn each_entry_is_taken_once_and_only_by_its_own_key() {
        let mut pool = Prefetched::default();
        pool.add(key("tok_a"), vec![entry("ch_1", 0), entry("ch_2", 0)]);
        assert_eq!(pool.take(&key("tok_b"), 10, AGE), None);
        let other_price = PoolKey { amount: Usdc::ZERO, ..key("tok_a") };
        assert_eq!(pool.take(&other_price, 10, AGE), None);
        let capped = PoolKey { cap: Some(Usdc::ZERO), ..key("tok_a") };
        assert_eq!(pool.take(&capped, 10, AGE), None);
        let mut take = || pool.take(&key("tok_a"), 10, AGE).map(|e| e.charge_id);
        assert_eq!([take(), take(), take()], [Some("ch_1".into()), Some("ch_2".into()), None]);
        assert_eq!(pool.waiting(), 0);
        assert!(pool.releases(10_000, AGE).is_empty(), "a taken entry was released too");
    }

    #[test]
    fn stale_entries_are_never_taken_and_are_released_from_the_tick() {
        let mut pool = Prefetched::default();
        pool.add(key("tok_a"), vec![entry("ch_old", 0)]);
        pool.add(key("tok_a"), vec![entry("ch_new", 600)]);
        assert!(pool.releases(999, AGE).is_empty());
        let releases = pool.releases(1000, AGE);
        assert_eq!(released(&releases), ["ch_old"]);
        let release = &releases[0];
        assert_eq!(
            (release.settlement.outcome, release.settlement.upstream_status),
            (Outcome::Release, None)
        );
        assert_eq!(release.token_id, "tok_a");
        assert_eq!(pool.waiting(), 1);
        // Past its age, an entry is not handed out but released with the next tick's.
        pool.add(key("tok_b"), vec![entry("ch_b1", 0), entry("ch_b2", 500)]);
        let taken = pool.take(&key("tok_b"), 1000, AGE);
        assert_eq!(taken.map(|e| e.charge_id).as_deref(), Some("ch_b2"));
        assert_eq!(
            pool.take(&key("tok_a"), 1599, AGE).map(|e| e.charge_id).as_deref(),
            Some("ch_new")
        );
        assert_eq!(released(&pool.releases(1599, AGE)), ["ch_b1"]);
        assert_eq!(pool.waiting(), 0);
    }

    #[test]
    fn a_dropped_token_releases_every_entry_and_keeps_no_other() {
        let mut pool = Prefetched::default();
        pool.add(key("tok_a"), vec![entry("ch_1", 0), entry("ch_2", 0)]);
        pool.add(PoolKey { cap: Some(Usdc::ZERO), ..key("tok_a") }, vec![entry("ch_3", 0)]);
        pool.add(key("tok_b"), vec![entry("ch_4", 0)]);
        pool.drop_token("tok_a");
        assert_eq!(pool.take(&key("tok_a"), 1, AGE), None);
        let mut releases = pool.releases(1, AGE);
        releases.sort_by(|a, b| a.settlement.charge_id.cmp(&b.settlement.charge_id));
        assert_eq!(released(&releases), ["ch_1", "ch_2", "ch_3"]);
        assert!(pool.releases(2, AGE).is_empty(), "released twice");
        assert_eq!(pool.waiting(), 1);
    }

    #[test]
    fn one_refill_at_a_time_and_only_at_the_low_water_mark() {
        let mut pool = Prefetched::default();
        let (low_water, timeout) = (2, 100);
        assert!(pool.start_refill(&key("tok_a"), low_water, 0, timeout), "an empty pool refills");
        assert!(!pool.start_refill(&key("tok_a"), low_water, 1, timeout), "two on their way");
        assert!(pool.start_refill(&key("tok_b"), low_water, 1, timeout), "pools are apart");
        pool.add(key("tok_a"), vec![entry("ch_1", 0), entry("ch_2", 0), entry("ch_3", 0)]);
        pool.end_refill(&key("tok_a"));
        assert!(!pool.start_refill(&key("tok_a"), low_water, 2, timeout), "above low water");
        pool.take(&key("tok_a"), 3, AGE);
        assert!(pool.start_refill(&key("tok_a"), low_water, 3, timeout), "at low water");
        // An answer that never came (its stream ended first) blocks no refill past the timeout.
        assert!(!pool.start_refill(&key("tok_a"), low_water, 3 + timeout, timeout));
        assert!(pool.start_refill(&key("tok_a"), low_water, 4 + timeout, timeout));
        pool.releases(4 + timeout + AGE + 1, AGE);
        assert!(pool.refilling.is_empty(), "the tick forgets lost refills");
    }

    #[test]
    fn a_token_is_hot_when_it_called_within_the_max_age() {
        let mut pool = Prefetched::default();
        assert!(!pool.note_call("tok_a", 0, AGE), "a first call is cold");
        assert!(pool.note_call("tok_a", 1000, AGE));
        assert!(!pool.note_call("tok_a", 2001, AGE), "a call after a pause is cold");
        assert!(!pool.note_call("tok_b", 2001, AGE));
        // The tick forgets tokens that went quiet: their next call is cold again.
        pool.releases(4000, AGE);
        assert!(pool.last_call_ms.is_empty());
        assert!(!pool.note_call("tok_a", 4001, AGE));
    }
}
