//! The ledger's money rules, as pure decisions over records a store has loaded.
//!
//! A store loads the rows, asks these functions, and writes what they answer, all inside
//! one transaction. Keeping the rules here keeps every store (SQLite, PostgreSQL) to the same
//! semantics and makes them testable without a database.

use paystile_protocol::ledger_api::{ChargeStatus, Outcome, SettleStatus};
use paystile_protocol::pay_token::Scope;
use paystile_protocol::{ErrorBody, ErrorCode, Usdc};

use crate::store::TokenRecord;

/// One call asking for a hold.
#[derive(Clone, Copy, Debug)]
pub struct Call<'a> {
    pub service_id: &'a str,
    pub price: Usdc,
    /// The request's fingerprint, when it came with an Idempotency-Key.
    pub fingerprint: Option<&'a str>,
    /// The limit the presented credential states. It can only lower the stored limit: an
    /// L402 holder may attenuate its macaroon with a smaller budget caveat.
    pub cap: Usdc,
}

/// An earlier request under the same Idempotency-Key, and what became of its charge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PriorUse<'a> {
    pub fingerprint: &'a str,
    pub charge: ChargeStatus,
    /// How often its charge has been replayed already.
    pub replays: u32,
}

/// How a call may proceed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Hold the price; `remaining` is what the token has left once it is held.
    Hold { remaining: Usdc },
    /// A retry of a request that was charged: answer with that charge, hold nothing.
    Replay,
}

/// May `call` go ahead on `token`? In this order: a revoked token never pays; a `SINGLE`
/// token pays for its own service only; a reused Idempotency-Key must name the same
/// request, and replays its charge (at most `max_replays` times: the upstream runs again
/// for free on each) or waits for it while it is in flight; then
/// `used + reserved + price <= min(limit, cap)`. Holds count against the cap, so no mix of concurrent
/// calls can spend past it, whichever of them commit.
pub fn admit(
    token: &TokenRecord,
    call: &Call<'_>,
    prior: Option<PriorUse<'_>>,
    max_replays: u32,
) -> Result<Admission, ErrorBody> {
    if token.revoked {
        return Err(ErrorBody::new(ErrorCode::TokenRevoked));
    }
    let grant = &token.grant;
    if grant.scope == Scope::Single && grant.service_id.as_deref() != Some(call.service_id) {
        return Err(ErrorBody::new(ErrorCode::WrongService));
    }
    if let Some(prior) = prior {
        if call.fingerprint != Some(prior.fingerprint) {
            return Err(ErrorBody::new(ErrorCode::IdempotencyKeyMismatch));
        }
        match prior.charge {
            ChargeStatus::Held => return Err(ErrorBody::new(ErrorCode::IdempotencyKeyInUse)),
            ChargeStatus::Committed if prior.replays >= max_replays => {
                return Err(ErrorBody::new(ErrorCode::IdempotencyKeyExhausted));
            }
            ChargeStatus::Committed => return Ok(Admission::Replay),
            // The first attempt was not charged: this one may be.
            ChargeStatus::Released => {}
        }
    }
    let limit = grant.limit_usdc.min(call.cap);
    let after =
        token.used.checked_add(token.reserved).and_then(|spent| spent.checked_add(call.price));
    match after {
        Some(after) if after <= limit => {
            Ok(Admission::Hold { remaining: limit.saturating_sub(after) })
        }
        _ => Err(ErrorBody::token_limit_exceeded(token.used, token.reserved, limit, call.price)),
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
    use paystile_protocol::ledger_api::TokenGrant;

    use super::*;

    fn usdc(s: &str) -> Usdc {
        s.parse().unwrap()
    }

    fn token(limit: &str, used: &str, reserved: &str) -> TokenRecord {
        TokenRecord {
            grant: TokenGrant {
                token_id: "tok".into(),
                buyer_id: "buyer".into(),
                buyer_tag: None,
                service_id: Some("weather".into()),
                scope: Scope::Single,
                limit_usdc: usdc(limit),
                expires_at: 4_000_000_000,
                sandbox: false,
            },
            used: usdc(used),
            reserved: usdc(reserved),
            revoked: false,
        }
    }

    fn call(price: &str) -> Call<'static> {
        Call {
            service_id: "weather",
            price: price.parse().unwrap(),
            fingerprint: None,
            cap: Usdc::MAX,
        }
    }

    fn hold(remaining: &str) -> Admission {
        Admission::Hold { remaining: usdc(remaining) }
    }

    fn code(result: Result<Admission, ErrorBody>) -> ErrorCode {
        result.unwrap_err().code
    }

    #[test]
    fn holds_count_against_the_cap() {
        assert_eq!(
            admit(&token("0.010", "0.005", "0.004"), &call("0.001"), None, 5),
            Ok(hold("0"))
        );
        let refused =
            admit(&token("0.010", "0.005", "0.005"), &call("0.001"), None, 5).unwrap_err();
        assert_eq!(refused.code, ErrorCode::TokenLimitExceeded);
        assert_eq!((refused.used, refused.reserved), (Some(usdc("0.005")), Some(usdc("0.005"))));
        assert_eq!((refused.limit, refused.price), (Some(usdc("0.010")), Some(usdc("0.001"))));
        assert_eq!(admit(&token("1", "0", "0"), &call("0.25"), None, 5), Ok(hold("0.75")));
    }

    #[test]
    fn a_presented_cap_can_lower_the_limit_but_never_raise_it() {
        let narrowed = Call { cap: usdc("0.5"), ..call("0.25") };
        assert_eq!(admit(&token("1", "0.25", "0"), &narrowed, None, 5), Ok(hold("0")));
        let refused = admit(&token("1", "0.25", "0.25"), &narrowed, None, 5).unwrap_err();
        assert_eq!(refused.limit, Some(usdc("0.5")));
        let widened = Call { cap: usdc("5"), ..call("0.25") };
        assert_eq!(admit(&token("1", "0", "0"), &widened, None, 5), Ok(hold("0.75")));
    }

    #[test]
    fn overflowing_sums_are_refused_not_wrapped() {
        let mut full = token("1", "0", "0");
        (full.grant.limit_usdc, full.used) = (Usdc::MAX, Usdc::MAX);
        assert_eq!(code(admit(&full, &call("0.000001"), None, 5)), ErrorCode::TokenLimitExceeded);
    }

    #[test]
    fn a_single_service_token_pays_for_its_service_only() {
        let elsewhere = Call { service_id: "maps", ..call("0.001") };
        assert_eq!(
            code(admit(&token("1", "0", "0"), &elsewhere, None, 5)),
            ErrorCode::WrongService
        );
        let mut anywhere = token("1", "0", "0");
        anywhere.grant.scope = Scope::All;
        assert_eq!(admit(&anywhere, &elsewhere, None, 5), Ok(hold("0.999")));
    }

    #[test]
    fn revocation_wins_over_everything() {
        let revoked = TokenRecord { revoked: true, ..token("5", "0", "0") };
        let committed =
            Some(PriorUse { fingerprint: "fp", charge: ChargeStatus::Committed, replays: 0 });
        let keyed = Call { fingerprint: Some("fp"), ..call("0.001") };
        assert_eq!(code(admit(&revoked, &keyed, committed, 5)), ErrorCode::TokenRevoked);
        let decision = settle(ChargeStatus::Held, false, true, Outcome::Commit);
        assert_eq!(decision, SettleDecision::Release(SettleStatus::Revoked));
    }

    #[test]
    fn reused_keys_replay_wait_refuse_or_retry() {
        let spent = token("0.001", "0.001", "0");
        let reuse = |fp: &'static str, charge, replays| {
            let prior = Some(PriorUse { fingerprint: "fp1", charge, replays });
            admit(&spent, &Call { fingerprint: Some(fp), ..call("0.001") }, prior, 2)
        };
        // A replay is answered even when the budget is gone: it costs nothing more...
        assert_eq!(reuse("fp1", ChargeStatus::Committed, 1), Ok(Admission::Replay));
        // ...but only so often, since the upstream runs again each time.
        assert_eq!(
            code(reuse("fp1", ChargeStatus::Committed, 2)),
            ErrorCode::IdempotencyKeyExhausted
        );
        assert_eq!(code(reuse("fp1", ChargeStatus::Held, 0)), ErrorCode::IdempotencyKeyInUse);
        assert_eq!(
            code(reuse("fp2", ChargeStatus::Committed, 0)),
            ErrorCode::IdempotencyKeyMismatch
        );
        // A retry after an uncharged attempt is a new call, and the cap applies.
        assert_eq!(code(reuse("fp1", ChargeStatus::Released, 0)), ErrorCode::TokenLimitExceeded);
        let prior =
            Some(PriorUse { fingerprint: "fp1", charge: ChargeStatus::Released, replays: 0 });
        let keyed = Call { fingerprint: Some("fp1"), ..call("0.25") };
        assert_eq!(admit(&token("1", "0", "0"), &keyed, prior, 2), Ok(hold("0.75")));
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
