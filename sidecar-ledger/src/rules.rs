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

/// An earlier request under the same Idempotency-Key, and what became of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PriorUse<'a> {
    pub fingerprint: &'a str,
    pub outcome: PriorOutcome,
    /// How often its charge has been replayed already.
    pub replays: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PriorOutcome {
    /// It was admitted; its charge is in this state now.
    Charge(ChargeStatus),
    /// It was refused, and the refusal was recorded.
    Refused,
}

/// How a call may proceed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Hold the price; `remaining` is what the token has left once it is held.
    Hold { remaining: Usdc },
    /// A retry of a request that was charged: answer with that charge, hold nothing.
    Replay,
    /// A retry of a request that was refused: answer the recorded refusal again, as it was.
    ReplayRefusal,
}

/// Whether a refusal is kept under the call's Idempotency-Key, to answer its retries
/// (Stripe, and the IETF draft: the outcome of a request that ran is the key's). Refusals
/// about the key itself are not (the request did not run), and a key that keeps a charge
/// keeps it (a revoked token's refusal must not erase what it paid for).
pub fn records_refusal(refusal: &ErrorBody, prior: Option<PriorUse<'_>>) -> bool {
    let about_the_key = matches!(
        refusal.code,
        ErrorCode::IdempotencyKeyMismatch
            | ErrorCode::IdempotencyKeyInUse
            | ErrorCode::IdempotencyKeyExhausted
    );
    let keeps_an_outcome =
        prior.is_some_and(|prior| prior.outcome != PriorOutcome::Charge(ChargeStatus::Released));
    !about_the_key && !keeps_an_outcome
}

/// May `call` go ahead on `token`? In this order: a revoked token never pays; a `SINGLE`
/// token pays for its own service only; a reused Idempotency-Key must name the same
/// request, and answers its recorded refusal again, replays its charge (at most
/// `max_replays` times: the upstream runs again for free on each), or waits for it while it
/// is in flight; a key whose charge was released is tried anew; then
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
        match prior.outcome {
            PriorOutcome::Refused => return Ok(Admission::ReplayRefusal),
            PriorOutcome::Charge(ChargeStatus::Held) => {
                return Err(ErrorBody::new(ErrorCode::IdempotencyKeyInUse));
            }
            PriorOutcome::Charge(ChargeStatus::Committed) if prior.replays >= max_replays => {
                return Err(ErrorBody::new(ErrorCode::IdempotencyKeyExhausted));
            }
            PriorOutcome::Charge(ChargeStatus::Committed) => return Ok(Admission::Replay),
            // The first attempt was not charged (its upstream failed, or its outcome never
            // reached the ledger): the key promises at most one charge, and this retry may be it.
            PriorOutcome::Charge(ChargeStatus::Released) => {}
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
    /// Charge this amount (at most the held one) and release the rest.
    Commit(Usdc),
    /// Give the held amount back, reporting why.
    Release(SettleStatus),
    /// Already settled: change nothing, report the earlier result.
    Unchanged(SettleStatus),
}

/// The amount a commit charges: `requested` (a partial commit) or else all of `held`. More
/// than held is refused, for the whole settle request: it is a client's bug, not an outcome.
pub fn commit_amount(requested: Option<Usdc>, held: Usdc) -> Result<Usdc, String> {
    match requested {
        None => Ok(held),
        Some(amount) if amount <= held => Ok(amount),
        Some(amount) => Err(format!("amountUsdc {amount} is more than the {held} held")),
    }
}

/// Commit at most once, never after the hold expired or the token was revoked. `amount` is
/// what a commit charges ([`commit_amount`]).
pub fn settle(
    state: ChargeStatus,
    hold_expired: bool,
    token_revoked: bool,
    outcome: Outcome,
    amount: Usdc,
) -> SettleDecision {
    match state {
        ChargeStatus::Committed => SettleDecision::Unchanged(SettleStatus::AlreadyCommitted),
        ChargeStatus::Released => SettleDecision::Unchanged(SettleStatus::AlreadyReleased),
        ChargeStatus::Held if hold_expired => SettleDecision::Release(SettleStatus::Expired),
        ChargeStatus::Held => match outcome {
            Outcome::Release => SettleDecision::Release(SettleStatus::Released),
            Outcome::Commit if token_revoked => SettleDecision::Release(SettleStatus::Revoked),
            Outcome::Commit => SettleDecision::Commit(amount),
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
        let committed = Some(PriorUse {
            fingerprint: "fp",
            outcome: PriorOutcome::Charge(ChargeStatus::Committed),
            replays: 0,
        });
        let keyed = Call { fingerprint: Some("fp"), ..call("0.001") };
        assert_eq!(code(admit(&revoked, &keyed, committed, 5)), ErrorCode::TokenRevoked);
        let decision = settle(ChargeStatus::Held, false, true, Outcome::Commit, usdc("1"));
        assert_eq!(decision, SettleDecision::Release(SettleStatus::Revoked));
    }

    #[test]
    fn reused_keys_replay_wait_refuse_or_retry() {
        let spent = token("0.001", "0.001", "0");
        let reuse = |fp: &'static str, charge, replays| {
            let prior = Some(PriorUse {
                fingerprint: "fp1",
                outcome: PriorOutcome::Charge(charge),
                replays,
            });
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
        let prior = Some(PriorUse {
            fingerprint: "fp1",
            outcome: PriorOutcome::Charge(ChargeStatus::Released),
            replays: 0,
        });
        let keyed = Call { fingerprint: Some("fp1"), ..call("0.25") };
        assert_eq!(admit(&token("1", "0", "0"), &keyed, prior, 2), Ok(hold("0.75")));
    }

    #[test]
    fn a_refused_key_stays_refused_for_its_request_only() {
        let refused = |fp: &'static str| {
            let prior =
                Some(PriorUse { fingerprint: "fp1", outcome: PriorOutcome::Refused, replays: 0 });
            // The token could pay now: the key's answer is still the refusal.
            admit(&token("1", "0", "0"), &Call { fingerprint: Some(fp), ..call("0.1") }, prior, 0)
        };
        assert_eq!(refused("fp1"), Ok(Admission::ReplayRefusal));
        assert_eq!(code(refused("fp2")), ErrorCode::IdempotencyKeyMismatch);
        let recorded = |code, outcome: Option<PriorOutcome>| {
            let prior = outcome.map(|outcome| PriorUse { fingerprint: "fp1", outcome, replays: 0 });
            records_refusal(&ErrorBody::new(code), prior)
        };
        assert!(recorded(ErrorCode::TokenLimitExceeded, None));
        assert!(recorded(ErrorCode::WrongService, None));
        let released = Some(PriorOutcome::Charge(ChargeStatus::Released));
        assert!(recorded(ErrorCode::TokenLimitExceeded, released), "a released key is tried anew");
        for about_the_key in [
            ErrorCode::IdempotencyKeyMismatch,
            ErrorCode::IdempotencyKeyInUse,
            ErrorCode::IdempotencyKeyExhausted,
        ] {
            assert!(!recorded(about_the_key, None), "{about_the_key:?}");
        }
        let committed = Some(PriorOutcome::Charge(ChargeStatus::Committed));
        assert!(!recorded(ErrorCode::TokenRevoked, committed), "a refusal erased a charge");
        assert!(!recorded(ErrorCode::TokenRevoked, Some(PriorOutcome::Refused)));
    }

    #[test]
    fn a_partial_commit_charges_at_most_the_hold() {
        assert_eq!(commit_amount(None, usdc("0.5")), Ok(usdc("0.5")));
        assert_eq!(commit_amount(Some(usdc("0.2")), usdc("0.5")), Ok(usdc("0.2")));
        assert_eq!(commit_amount(Some(usdc("0.5")), usdc("0.5")), Ok(usdc("0.5")));
        let refused = commit_amount(Some(usdc("0.500001")), usdc("0.5")).unwrap_err();
        assert_eq!(refused, "amountUsdc 0.500001 is more than the 0.500000 held");
        assert_eq!(
            settle(ChargeStatus::Held, false, false, Outcome::Commit, usdc("0.2")),
            SettleDecision::Commit(usdc("0.2"))
        );
    }

    #[test]
    fn settling_is_once_only_and_expiry_releases() {
        use SettleDecision::*;
        let one = usdc("1");
        assert_eq!(settle(ChargeStatus::Held, false, false, Outcome::Commit, one), Commit(one));
        assert_eq!(
            settle(ChargeStatus::Held, false, false, Outcome::Release, one),
            Release(SettleStatus::Released)
        );
        assert_eq!(
            settle(ChargeStatus::Held, true, false, Outcome::Commit, one),
            Release(SettleStatus::Expired)
        );
        assert_eq!(
            settle(ChargeStatus::Committed, false, false, Outcome::Commit, one),
            Unchanged(SettleStatus::AlreadyCommitted)
        );
        assert_eq!(
            settle(ChargeStatus::Released, false, false, Outcome::Commit, one),
            Unchanged(SettleStatus::AlreadyReleased)
        );
    }
}
