//! What a VM keeps for each ledger it talks to: the settlements waiting for it, the holds
//! prefetched from it and the watch on its revocations.
//!
//! Envoy runs every filter configuration with the same `vm_id` and code in one VM, and each
//! configuration may name its own ledger. A hold belongs to the ledger that made it: its
//! commit or release must go there, and a prefetched hold may only serve calls metered by
//! that ledger. So this state is kept per ledger (identified by where it is called and with
//! which gateway key), outlives the configurations (a reload must not strand a queue), and
//! any root context's tick flushes every ledger's queue.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use crate::ledger::LedgerTarget;
use crate::prefetch::Prefetched;
use crate::settle::SettleQueue;
use crate::watch::Watch;

/// One ledger's settlements and prefetched holds.
#[derive(Debug)]
pub struct Books {
    /// Where to send them: the latest configuration's settings for this ledger.
    target: RefCell<LedgerTarget>,
    pub queue: RefCell<SettleQueue>,
    pub prefetched: Rc<RefCell<Prefetched>>,
    /// The watch on the ledger's revocations, kept while holds are prefetched from it.
    pub watch: RefCell<Watch>,
    /// The prefetched holds added and gone (taken or given back) as last reported in the
    /// VM's counters.
    pub prefetch_reported: Cell<(u64, u64)>,
}

impl Books {
    pub fn target(&self) -> LedgerTarget {
        self.target.borrow().clone()
    }

    fn keeps(&self, target: &LedgerTarget) -> bool {
        let ours = self.target.borrow();
        ours.upstream == target.upstream
            && ours.authority == target.authority
            && ours.authorization == target.authorization
    }
}

/// The books of every ledger the VM's configurations have named.
#[derive(Debug, Default)]
pub struct Ledgers {
    books: Vec<Rc<Books>>,
}

impl Ledgers {
    /// The books of `target`'s ledger, opened on first sight. A later configuration's
    /// settings for the same ledger (timeouts, prefetch ages) replace the earlier ones.
    pub fn books(&mut self, target: &LedgerTarget) -> Rc<Books> {
        if let Some(books) = self.books.iter().find(|b| b.keeps(target)) {
            *books.target.borrow_mut() = target.clone();
            return books.clone();
        }
        let books = Rc::new(Books {
            target: RefCell::new(target.clone()),
            queue: RefCell::default(),
            prefetched: Rc::default(),
            watch: RefCell::default(),
            prefetch_reported: Cell::default(),
        });
        self.books.push(books.clone());
        books
    }

    pub fn all(&self) -> Vec<Rc<Books>> {
        self.books.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn target(upstream: &str, key: &str) -> LedgerTarget {
        LedgerTarget {
            upstream: upstream.into(),
            authority: "paystile-ledger".into(),
            timeout: Duration::from_secs(1),
            authorization: format!("Bearer {key}"),
            settle_interval: Duration::from_millis(50),
            prefetch_holds: 0,
            prefetch_max_age_ms: 1_000,
            settle_first_timeout: Duration::ZERO,
        }
    }

    #[test]
    fn each_ledger_has_its_own_books_and_a_reload_finds_them_again() {
        let mut ledgers = Ledgers::default();
        let a = ledgers.books(&target("ledger_a", "key-a"));
        let b = ledgers.books(&target("ledger_b", "key-a"));
        let a_other_key = ledgers.books(&target("ledger_a", "key-b"));
        assert!(!Rc::ptr_eq(&a, &b) && !Rc::ptr_eq(&a, &a_other_key));

        let mut reloaded = target("ledger_a", "key-a");
        reloaded.timeout = Duration::from_secs(3);
        let again = ledgers.books(&reloaded);
        assert!(Rc::ptr_eq(&a, &again), "a reload opened new books for the same ledger");
        assert_eq!(a.target().timeout, Duration::from_secs(3));
        assert_eq!(ledgers.all().len(), 3);
    }
}
