//! The credentials verified already, so that a token's next calls skip the signature check
//! and the claim parsing (most of a paid call's inline work), as Envoy's `jwt_authn` caches
//! its verified tokens. Each gateway VM keeps one, and so does the ledger.
//!
//! An entry is found by the exact bytes of the `Authorization` value, compared in constant
//! time, and used only within the time window the credential was verified for; it records
//! only what one [`Verifier`](crate::credential::Verifier)'s checks concluded, so each
//! verifier (a gateway's configuration, the ledger) has its own cache. Revocation and
//! budgets are the ledger's, checked on every reserve.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use ctutils::CtEq;

use crate::credential::{Scheme, Verified};
use crate::l402::Capability;

#[derive(Debug)]
pub struct VerifiedCache {
    /// By the keyed hash of the credential; a colliding credential replaces the entry.
    /// Shared, so that a call found here costs a count, not a copy of the claims.
    entries: HashMap<u64, (Box<[u8]>, Arc<Verified>)>,
    hasher: RandomState,
    /// Entries kept; past this, expired entries go first, then arbitrary ones.
    capacity: usize,
}

impl VerifiedCache {
    pub fn new(capacity: usize) -> VerifiedCache {
        VerifiedCache { entries: HashMap::new(), hasher: RandomState::new(), capacity }
    }

    /// The entry for `credential` when it is valid at `now` for a route of `capability`.
    /// An L402 was checked for one route capability (a gateway) or for any route (the
    /// ledger, whose cache holds nothing else); a Pay Token's checks ignore routes.
    pub fn get(
        &self,
        credential: &[u8],
        capability: Capability<'_>,
        now: u64,
    ) -> Option<&Arc<Verified>> {
        let (stored, verified) = self.entries.get(&self.hasher.hash_one(credential))?;
        let same: bool = stored.as_ref().ct_eq(credential).into();
        let wanted = match capability {
            Capability::Route(capability) => capability,
            Capability::Any => None,
        };
        let route_ok = verified.scheme != Scheme::L402 || verified.capability.as_deref() == wanted;
        (same && route_ok && verified.valid.contains(&now)).then_some(verified)
    }

    /// Keeps `verified` for `credential`, making room at `now` if the cache is full: expired
    /// entries go, then arbitrary ones down to three quarters, so that the scan runs once per
    /// quarter of the capacity in new credentials at most, not on each.
    pub fn insert(&mut self, credential: &[u8], verified: Arc<Verified>, now: u64) {
        if self.entries.len() >= self.capacity {
            self.entries.retain(|_, (_, entry)| now < entry.valid.end);
            let excess = self.entries.len().saturating_sub(self.capacity / 4 * 3);
            let dropped: Vec<u64> = self.entries.keys().take(excess).copied().collect();
            for key in dropped {
                self.entries.remove(&key);
            }
        }
        self.entries.insert(self.hasher.hash_one(credential), (credential.into(), verified));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::ops::Range;

    use super::*;
    use crate::Usdc;
    use crate::ledger_api::TokenGrant;
    use crate::pay_token::Scope;

    const CAPACITY: usize = 1024;

    fn verified(token_id: &str, valid: Range<u64>) -> Arc<Verified> {
        Arc::new(Verified {
            token: TokenGrant {
                token_id: token_id.into(),
                buyer_id: "agent".into(),
                buyer_tag: None,
                service_id: Some("weather".into()),
                scope: Scope::Single,
                limit_usdc: Usdc::from_micros(1_000_000).unwrap_or(Usdc::ZERO),
                expires_at: valid.end,
                sandbox: false,
            },
            cap: None,
            scheme: Scheme::PayToken,
            capability: None,
            valid,
            x402: None,
        })
    }

    #[test]
    fn an_entry_serves_only_its_exact_bytes_within_its_window() {
        let mut cache = VerifiedCache::new(CAPACITY);
        cache.insert(b"Bearer a.b.c", verified("tok_1", 100..200), 100);
        let id = |c: &VerifiedCache, bytes: &[u8], now| {
            c.get(bytes, Capability::Route(None), now).map(|v| v.token.token_id.clone())
        };
        assert_eq!(id(&cache, b"Bearer a.b.c", 100), Some("tok_1".into()));
        assert_eq!(id(&cache, b"Bearer a.b.c", 199), Some("tok_1".into()));
        assert_eq!(id(&cache, b"Bearer a.b.c", 200), None, "expired");
        assert_eq!(id(&cache, b"Bearer a.b.c", 99), None, "not yet valid");
        assert_eq!(id(&cache, b"Bearer a.b.d", 150), None, "other bytes");
        assert_eq!(id(&cache, b"Bearer a.b.c ", 150), None, "a longer value");
        assert_eq!(id(&cache, b"Bearer a.b.", 150), None, "a prefix");
    }

    #[test]
    fn an_l402_entry_serves_only_the_capability_it_was_checked_for() {
        let mut cache = VerifiedCache::new(CAPACITY);
        let entry = Verified {
            scheme: Scheme::L402,
            capability: Some("read".into()),
            ..Verified::clone(&verified("l", 0..9))
        };
        cache.insert(b"L402 m:p", Arc::new(entry), 0);
        let route = Capability::Route;
        assert!(cache.get(b"L402 m:p", route(Some("read")), 1).is_some());
        assert!(cache.get(b"L402 m:p", route(Some("write")), 1).is_none());
        assert!(cache.get(b"L402 m:p", route(None), 1).is_none());
        // A Pay Token's checks do not depend on the route.
        cache.insert(b"Bearer t", verified("t", 0..9), 0);
        assert!(cache.get(b"Bearer t", route(Some("write")), 1).is_some());
    }

    #[test]
    fn a_full_cache_drops_expired_entries_first_and_stays_bounded() {
        let mut cache = VerifiedCache::new(CAPACITY);
        for i in 0..CAPACITY {
            let window = if i % 2 == 0 { 0..10 } else { 0..1000 };
            cache.insert(format!("Bearer {i}").as_bytes(), verified("t", window), 0);
        }
        assert_eq!(cache.len(), CAPACITY);
        cache.insert(b"Bearer new", verified("new", 0..1000), 50);
        assert_eq!(cache.len(), CAPACITY / 2 + 1, "the expired half went");
        assert!(cache.get(b"Bearer 1", Capability::Route(None), 50).is_some(), "a live entry went");
        for i in 0..CAPACITY {
            cache.insert(format!("Bearer more {i}").as_bytes(), verified("t", 0..1000), 50);
        }
        assert!((CAPACITY / 4 * 3..=CAPACITY).contains(&cache.len()), "{}", cache.len());
        assert!(
            cache
                .get(
                    format!("Bearer more {}", CAPACITY - 1).as_bytes(),
                    Capability::Route(None),
                    50
                )
                .is_some()
        );
    }
}
