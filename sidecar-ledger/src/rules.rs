//! The ledger's money rules, as pure decisions over records a store has loaded.
//!
//! A store loads the rows, asks these functions, and writes what they answer, all inside
//! one transaction. Keeping the rules here keeps every store (SQLite today) to the same
//! semantics and makes them testable without a database.

use paystile_protocol::ledger_api::{ChargeStatus, Outcome, SettleStatus};
use paystile_protocol::{ErrorBody, ErrorCode, Usdc};

/// A token's spending position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Balance {
    pub limit: Usdc,
    /// Committed charges.
    pub used: Usdc,
    /// Holds of calls in flight.
    pub reserved: Usdc,
    pub revoked: bool,
}

impl Balance {
    /// What is left for new calls: the limit minus everything spent or on hold.
    pub fn remaining(&self) -> Usdc {
        self.limit.saturating_sub(self.used).saturating_sub(self.reserved)
    }
}

/// An earlier request under the same Idempotency-Key, and what became of its charge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PriorUse<'a> {
    pub fingerprint: &'a str,
    pub charge: ChargeStatus,
}

/// How a call may proceed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Hold the price; `remaining` is what the token has left once it is held.
    Hold { remaining: Usdc },
    /// A retry of a request that was charged: answer with that charge, hold nothing.
    Replay,
}

/// May a call costing `price` go ahead? In this order: a revoked token never pays; a reused
/// Idempotency-Key must name the same request and replays its charge, or waits for it while
/// it is in flight; then `used + reserved + price <= limit`. Holds count against the cap, so
/// no mix of concurrent calls can spend past it, whichever of them commit.
pub fn admit(
    balance: &Balance,
    price: Usdc,
    fingerprint: Option<&str>,
    prior: Option<PriorUse<'_>>,
) -> Result<Admission, ErrorBody> {
    if balance.revoked {
        return Err(ErrorBody::new(ErrorCode::TokenRevoked));
    }
    if let Some(prior) = prior {
        if fingerprint != Some(prior.fingerprint) {
            return Err(ErrorBody::new(ErrorCode::IdempotencyKeyMismatch));
        }
        match prior.charge {
            ChargeStatus::Held => return Err(ErrorBody::new(ErrorCode::IdempotencyKeyInUse)),
            ChargeStatus::Committed => return Ok(Admission::Replay),
            // The first attempt was not charged: this one may be.
            ChargeStatus::Released => {}
        }
    }
    let after =
        balance.used.checked_add(balance.reserved).and_then(|spent| spent.checked_add(price));
    match after {
        Some(after) if after <= balance.limit => {
            Ok(Admission::Hold { remaining: balance.limit.saturating_sub(after) })
        }
        _ => Err(ErrorBody::token_limit_exceeded(
            balance.used,
            balance.reserved,
            balance.limit,
            price,
        )),
    }
}

/// What to do with a hold when its call's outcome arrives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SettleDecision {
    /// Charge the held amount.
    Commit,
    /// Give the held amount back, reporting why.
    Release(SettleStatus),
    /// Already settled: change nothing, report the earlier result.
    Unchanged(SettleStatus),
}

/// Commit at most once, never after the hold expired or the token was revoked.
pub fn settle(
    state: ChargeStatus,
    hold_expired: bool,
    token_revoked: bool,
    outcome: Outcome,
) -> SettleDecision {
    match state {
        ChargeStatus::Committed => SettleDecision::Unchanged(SettleStatus::AlreadyCommitted),
        ChargeStatus::Released => SettleDecision::Unchanged(SettleStatus::AlreadyReleased),
        ChargeStatus::Held if hold_expired => SettleDecision::Release(SettleStatus::Expired),
        ChargeStatus::Held => match outcome {
            Outcome::Release => SettleDecision::Release(SettleStatus::Released),
            Outcome::Commit if token_revoked => SettleDecision::Release(SettleStatus::Revoked),
            Outcome::Commit => SettleDecision::Commit,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usdc(s: &str) -> Usdc {
        s.parse().unwrap()
    }

    fn balance(limit: &str, used: &str, reserved: &str) -> Balance {
        Balance { limit: usdc(limit), used: usdc(used), reserved: usdc(reserved), revoked: false }
    }

    fn hold(remaining: &str) -> Admission {
        Admission::Hold { remaining: usdc(remaining) }
    }

    #[test]
    fn holds_count_against_the_cap() {
        let admit_new = |b: &Balance, price| admit(b, usdc(price), None, None);
        assert_eq!(admit_new(&balance("0.010", "0.005", "0.004"), "0.001"), Ok(hold("0")));
        let refused = admit_new(&balance("0.010", "0.005", "0.005"), "0.001").unwrap_err();
        assert_eq!(refused.code, ErrorCode::TokenLimitExceeded);
        assert_eq!((refused.used, refused.reserved), (Some(usdc("0.005")), Some(usdc("0.005"))));
        assert_eq!((refused.limit, refused.price), (Some(usdc("0.010")), Some(usdc("0.001"))));
        assert_eq!(admit_new(&balance("1", "0", "0"), "0.25"), Ok(hold("0.75")));
    }

    #[test]
    fn overflowing_sums_are_refused_not_wrapped() {
        let full =
            Balance { limit: Usdc::MAX, used: Usdc::MAX, reserved: Usdc::ZERO, revoked: false };
        let refused = admit(&full, usdc("0.000001"), None, None).unwrap_err();
        assert_eq!(refused.code, ErrorCode::TokenLimitExceeded);
    }

    #[test]
    fn revocation_wins_over_everything() {
        let revoked = Balance { revoked: true, ..balance("5", "0", "0") };
        let committed = Some(PriorUse { fingerprint: "fp", charge: ChargeStatus::Committed });
        let refused = admit(&revoked, usdc("0.001"), Some("fp"), committed).unwrap_err();
        assert_eq!(refused.code, ErrorCode::TokenRevoked);
        let decision = settle(ChargeStatus::Held, false, true, Outcome::Commit);
        assert_eq!(decision, SettleDecision::Release(SettleStatus::Revoked));
    }

    #[test]
    fn reused_keys_replay_wait_refuse_or_retry() {
        let spent = balance("0.001", "0.001", "0");
        let reuse = |fp: &str, charge| {
            admit(&spent, usdc("0.001"), Some(fp), Some(PriorUse { fingerprint: "fp1", charge }))
        };
        // A replay is answered even when the budget is gone: it costs nothing more.
        assert_eq!(reuse("fp1", ChargeStatus::Committed), Ok(Admission::Replay));
        let code = |r: Result<Admission, ErrorBody>| r.unwrap_err().code;
        assert_eq!(code(reuse("fp1", ChargeStatus::Held)), ErrorCode::IdempotencyKeyInUse);
        assert_eq!(code(reuse("fp2", ChargeStatus::Committed)), ErrorCode::IdempotencyKeyMismatch);
        // A retry after an uncharged attempt is a new call, and the cap applies.
        assert_eq!(code(reuse("fp1", ChargeStatus::Released)), ErrorCode::TokenLimitExceeded);
        let fresh = balance("1", "0", "0");
        let prior = Some(PriorUse { fingerprint: "fp1", charge: ChargeStatus::Released });
        assert_eq!(admit(&fresh, usdc("0.25"), Some("fp1"), prior), Ok(hold("0.75")));
    }

    #[test]
    fn settling_is_once_only_and_expiry_releases() {
        use SettleDecision::*;
        assert_eq!(settle(ChargeStatus::Held, false, false, Outcome::Commit), Commit);
        assert_eq!(
            settle(ChargeStatus::Held, false, false, Outcome::Release),
            Release(SettleStatus::Released)
        );
        assert_eq!(
            settle(ChargeStatus::Held, true, false, Outcome::Commit),
            Release(SettleStatus::Expired)
        );
        assert_eq!(
            settle(ChargeStatus::Committed, false, false, Outcome::Commit),
            Unchanged(SettleStatus::AlreadyCommitted)
        );
        assert_eq!(
            settle(ChargeStatus::Released, false, false, Outcome::Commit),
            Unchanged(SettleStatus::AlreadyReleased)
        );
    }
}
