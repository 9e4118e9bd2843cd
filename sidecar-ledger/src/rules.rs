//! The ledger's money rules, as pure decisions over records a store has loaded.
//!
//! A store loads the rows, asks these functions, and writes what they answer, all inside
//! one transaction. Keeping the rules here keeps every store (SQLite, PostgreSQL) to the same
//! semantics and makes them testable without a database.

use paystile_protocol::credential;
use paystile_protocol::ledger_api::{ChargeStatus, Outcome, SettleStatus, Settlement, TokenGrant};
use paystile_protocol::pay_token::Scope;
use paystile_protocol::{ErrorBody, ErrorCode, Usdc};

use crate::domain::{TokenRecord, UnixMillis};

/// The most tokens in one chain of delegation: a root and seven generations of children.
/// Every reserve and settle touches each of them, so the chain stays short.
pub const MAX_CHAIN_LEN: usize = 8;

const MILLIS_PER_DAY: i64 = 86_400_000;

/// The UTC day (days since the Unix epoch) of `now`: daily limits reset at UTC midnight.
pub fn utc_day(now: UnixMillis) -> i64 {
    now.div_euclid(MILLIS_PER_DAY)
}

/// A buyer's prepaid account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    /// Deposits minus committed charges.
    pub balance: Usdc,
    /// The holds of calls in flight; they count against the balance and the day.
    pub held: Usdc,
    /// 1-based, into [`DailyLimits`].
    pub tier: u32,
    /// The UTC day `spent` counts; an older day means nothing was spent today.
    pub spent_day: i64,
    pub spent: Usdc,
}

impl Account {
    /// What new holds may take: the balance minus the holds.
    pub fn available(&self) -> Usdc {
        self.balance.saturating_sub(self.held)
    }

    /// Committed on `day`.
    pub fn spent_on(&self, day: i64) -> Usdc {
        if self.spent_day == day { self.spent } else { Usdc::ZERO }
    }

    /// Spent and held on `day`: what its daily limit is measured against.
    pub fn used_on(&self, day: i64) -> Usdc {
        self.spent_on(day).checked_add(self.held).unwrap_or(Usdc::MAX)
    }
}

/// The daily spending limit of each tier, tier 1 first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DailyLimits(Vec<Usdc>);

impl DailyLimits {
    /// `None` without any tier.
    pub fn new(limits: Vec<Usdc>) -> Option<DailyLimits> {
        (!limits.is_empty()).then_some(DailyLimits(limits))
    }

    pub fn tiers(&self) -> u32 {
        u32::try_from(self.0.len()).unwrap_or(u32::MAX)
    }

    /// A tier beyond the configured ones (the setting lost tiers since it was set) has the
    /// highest limit configured.
    pub fn of_tier(&self, tier: u32) -> Usdc {
        let index = usize::try_from(tier.saturating_sub(1)).unwrap_or(usize::MAX);
        self.0.get(index).or(self.0.last()).copied().unwrap_or(Usdc::ZERO)
    }

    pub fn check_tier(&self, tier: u32) -> Result<(), Refusal> {
        if (1..=self.tiers()).contains(&tier) {
            return Ok(());
        }
        Err(Refusal::UnknownTier { tiers: self.tiers() })
    }
}

impl Default for DailyLimits {
    /// 10, 1,000 and 50,000 USDC a day.
    fn default() -> DailyLimits {
        let whole = |usdc| Usdc::from_whole(usdc).unwrap_or(Usdc::MAX);
        DailyLimits(vec![whole(10), whole(1_000), whole(50_000)])
    }
}

/// Everything a reserve's decision reads, locked by the store.
#[derive(Clone, Copy, Debug)]
pub struct Books<'a> {
    /// The token, then its parent, and so on to the root.
    pub chain: &'a [TokenRecord],
    /// The buyer's account, if the buyer has one.
    pub account: Option<&'a Account>,
    pub today: i64,
    pub daily_limits: &'a DailyLimits,
}

impl Books<'_> {
    /// The account a hold is placed on: the buyer's, unless the token is a sandbox token
    /// (its charges go to the sandbox book) or the buyer has no account (its tokens are
    /// bounded by their caps alone: tokens minted elsewhere, L402 tokens prepaid by
    /// Lightning).
    pub fn debited_account(&self) -> Option<&Account> {
        let sandbox = self.chain.first().is_none_or(|token| token.grant.sandbox);
        self.account.filter(|_| !sandbox)
    }
}

/// [`admit`] for the first token of `books.chain`, then every level above it: each
/// ancestor's cap must fit the price too (a child's spend counts against its parent, up the
/// chain), then the buyer's balance (minus holds), then the buyer's daily limit (spent today
/// plus holds). A replay (of a charge or of a recorded refusal) holds nothing and so is not
/// measured again.
pub fn admit_books(
    books: &Books<'_>,
    call: &Call<'_>,
    prior: Option<PriorUse<'_>>,
    max_replays: u32,
) -> Result<Admission, Refusal> {
    let Some((token, ancestors)) = books.chain.split_first() else {
        return Err(Refusal::NoToken);
    };
    let mut remaining = match admit(token, call, prior, max_replays)? {
        replay @ (Admission::Replay | Admission::ReplayRefusal) => return Ok(replay),
        Admission::Hold { remaining } => remaining,
    };
    for ancestor in ancestors {
        if ancestor.revoked {
            return Err(Refusal::TokenRevoked);
        }
        let limit = ancestor.grant.limit_usdc;
        let after = ancestor
            .used
            .checked_add(ancestor.reserved)
            .and_then(|spent| spent.checked_add(call.price))
            .filter(|after| *after <= limit)
            .ok_or(Refusal::TokenLimitExceeded {
                used: ancestor.used,
                reserved: ancestor.reserved,
                limit,
                price: call.price,
            })?;
        remaining = remaining.min(limit.saturating_sub(after));
    }
    if let Some(account) = books.debited_account() {
        let available = account.available();
        if call.price > available {
            return Err(Refusal::InsufficientBalance { available, price: call.price });
        }
        let limit = books.daily_limits.of_tier(account.tier);
        let used = account.used_on(books.today);
        if used.checked_add(call.price).is_none_or(|after| after > limit) {
            return Err(Refusal::DailyLimitExceeded {
                limit,
                tier: account.tier,
                used,
                price: call.price,
            });
        }
    }
    Ok(Admission::Hold { remaining })
}

/// How many extra holds of `call.price` a reserve that asked for `wanted` of them gets, once
/// its first hold was admitted leaving `remaining` under the token's chain (and cap): as many
/// as fit under every bound (the chain, the buyer's balance and daily limit), but at most a
/// quarter of what is left after the first hold, so that one gateway never takes a token's
/// last budget from the others.
pub fn extra_holds(books: &Books<'_>, call: &Call<'_>, remaining: Usdc, wanted: u16) -> u16 {
    let mut left = remaining;
    if let Some(account) = books.debited_account() {
        left = left.min(account.available().saturating_sub(call.price));
        let limit = books.daily_limits.of_tier(account.tier);
        let used = account.used_on(books.today).checked_add(call.price).unwrap_or(Usdc::MAX);
        left = left.min(limit.saturating_sub(used));
    }
    let fit = call
        .price
        .micros()
        .checked_mul(4)
        .filter(|quarter_unit| *quarter_unit > 0)
        .map_or(0, |quarter_unit| left.micros() / quarter_unit);
    u16::try_from(fit).unwrap_or(u16::MAX).min(wanted)
}

/// What the next call on `chain[0]` may spend: the least any level of the chain has left.
pub fn chain_remaining(chain: &[TokenRecord]) -> Usdc {
    chain.iter().map(TokenRecord::remaining).min().unwrap_or(Usdc::ZERO)
}

/// What a new child token asks for, as the ledger read it from the request.
#[derive(Clone, Debug)]
pub struct ChildSpec {
    pub token_id: String,
    pub limit: Usdc,
    pub service_id: Option<String>,
    pub scope: Option<Scope>,
    pub buyer_tag: Option<String>,
    /// Unix seconds, if the request gave an expiry.
    pub expires_at: Option<u64>,
    /// Unix seconds: when a token issued now expires by default.
    pub default_expires_at: u64,
    /// Unix seconds.
    pub now: u64,
}

/// The grant of a child minted under `chain[0]` (`chain`: the parent, then its ancestors).
/// A child may narrow its parent, never widen it: a cap within what the parent has left, the
/// parent's service if the parent is bound to one, an expiry no later than the parent's; it
/// has the parent's buyer and sandbox flag.
pub fn child_grant(chain: &[TokenRecord], spec: &ChildSpec) -> Result<TokenGrant, Refusal> {
    let Some(parent) = chain.first() else { return Err(Refusal::NoParent) };
    if chain.iter().any(|token| token.revoked) {
        return Err(Refusal::TokenRevoked);
    }
    let grant = &parent.grant;
    if spec.now >= grant.expires_at {
        return Err(Refusal::ParentExpired);
    }
    if chain.len() >= MAX_CHAIN_LEN {
        return Err(Refusal::ChainTooLong);
    }
    if spec.limit > parent.remaining() {
        return Err(Refusal::OverParentRemaining {
            limit: spec.limit,
            remaining: parent.remaining(),
        });
    }
    let scope = spec.scope.unwrap_or(grant.scope);
    let service_id = spec.service_id.clone().or_else(|| grant.service_id.clone());
    if grant.scope == Scope::Single && (scope != Scope::Single || service_id != grant.service_id) {
        return Err(Refusal::ParentServiceOnly);
    }
    if scope == Scope::Single && service_id.is_none() {
        return Err(Refusal::ServiceRequired);
    }
    let expires_at = match spec.expires_at {
        Some(at) if at > grant.expires_at => return Err(Refusal::OutlivesParent),
        Some(at) => at,
        None => spec.default_expires_at.min(grant.expires_at),
    };
    Ok(TokenGrant {
        token_id: spec.token_id.clone(),
        buyer_id: grant.buyer_id.clone(),
        buyer_tag: spec.buyer_tag.clone().or_else(|| grant.buyer_tag.clone()),
        service_id,
        scope,
        limit_usdc: spec.limit,
        expires_at,
        sandbox: grant.sandbox,
    })
}

/// What a deposit does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DepositDecision {
    /// Credit the amount; the balance becomes this.
    Credit { balance: Usdc },
    /// The reference named an earlier deposit of the same amount: credit nothing.
    Replay,
}

/// A deposit of `amount` to `account`; `prior` is the amount of an earlier deposit under
/// the same reference. A reference names one deposit: another amount under it is refused.
pub fn deposit(
    account: &Account,
    amount: Usdc,
    prior: Option<Usdc>,
) -> Result<DepositDecision, Refusal> {
    match prior {
        Some(prior) if prior == amount => Ok(DepositDecision::Replay),
        Some(prior) => Err(Refusal::ReferenceReused { amount: prior }),
        None => match account.balance.checked_add(amount) {
            Some(balance) => Ok(DepositDecision::Credit { balance }),
            None => Err(Refusal::BalanceOverflow),
        },
    }
}

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
///
/// Every other refusal is about the request and is recorded, whichever level of the books
/// refused it: the token's own (`token_revoked`, `wrong_service`, `token_limit_exceeded`),
/// an ancestor's in a chain of delegation (`token_revoked`, `token_limit_exceeded`), the
/// buyer's account (`insufficient_balance`, `daily_limit_exceeded`). A deposit or a new UTC
/// day does not turn a recorded refusal into a charge: the retry needs a new key.
pub fn records_refusal(refusal: &Refusal, prior: Option<PriorUse<'_>>) -> bool {
    let about_the_key = matches!(
        refusal,
        Refusal::IdempotencyKeyMismatch
            | Refusal::IdempotencyKeyInUse
            | Refusal::IdempotencyKeyExhausted
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
) -> Result<Admission, Refusal> {
    if token.revoked {
        return Err(Refusal::TokenRevoked);
    }
    let grant = &token.grant;
    if grant.scope == Scope::Single && grant.service_id.as_deref() != Some(call.service_id) {
        return Err(Refusal::WrongService);
    }
    if let Some(prior) = prior {
        if call.fingerprint != Some(prior.fingerprint) {
            return Err(Refusal::IdempotencyKeyMismatch);
        }
        match prior.outcome {
            PriorOutcome::Refused => return Ok(Admission::ReplayRefusal),
            PriorOutcome::Charge(ChargeStatus::Held) => {
                return Err(Refusal::IdempotencyKeyInUse);
            }
            PriorOutcome::Charge(ChargeStatus::Committed) if prior.replays >= max_replays => {
                return Err(Refusal::IdempotencyKeyExhausted);
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
        _ => Err(Refusal::TokenLimitExceeded {
            used: token.used,
            reserved: token.reserved,
            limit,
            price: call.price,
        }),
    }
}

/// Why the books refuse an operation. The API's answer for each is [`Refusal::body`], the one
/// place a refusal is worded; the stores keep a recorded one as its variant and amounts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    TokenRevoked,
    WrongService,
    /// The token's (or an ancestor's) limit cannot take the price.
    TokenLimitExceeded {
        used: Usdc,
        reserved: Usdc,
        limit: Usdc,
        price: Usdc,
    },
    /// The buyer's balance, minus its holds, cannot take the price.
    InsufficientBalance {
        available: Usdc,
        price: Usdc,
    },
    /// What the buyer spent or holds today, plus the price, is past its tier's daily limit.
    DailyLimitExceeded {
        limit: Usdc,
        tier: u32,
        used: Usdc,
        price: Usdc,
    },
    IdempotencyKeyMismatch,
    IdempotencyKeyInUse,
    IdempotencyKeyExhausted,
    /// The store asked about no token at all: its bug, not the caller's.
    NoToken,
    /// A child asked for under a token that does not exist.
    NoParent,
    ParentExpired,
    ChainTooLong,
    /// A child asking for more than its parent has left.
    OverParentRemaining {
        limit: Usdc,
        remaining: Usdc,
    },
    /// A child of a `SINGLE` token asking for another service, or for any.
    ParentServiceOnly,
    ServiceRequired,
    OutlivesParent,
    /// A deposit reference already used for a deposit of another `amount`.
    ReferenceReused {
        amount: Usdc,
    },
    /// A deposit that would take the balance past the largest amount kept.
    BalanceOverflow,
    /// A tier outside the configured daily limits' `tiers`.
    UnknownTier {
        tiers: u32,
    },
    /// The credential a reserve presented pays for nothing here.
    Credential(credential::Refusal),
    /// An x402 payment that already paid for a call (or holds one in flight).
    PaymentUsed,
    /// An x402 payment to settle before the call that did not settle: the reason.
    PaymentNotSettled(String),
    /// An x402 payment to settle before the call that could not be settled in time (the
    /// chain's node or the facilitator did not answer, a transaction not mined yet).
    SettlementUnavailable(String),
}

impl Refusal {
    pub fn code(&self) -> ErrorCode {
        match self {
            Refusal::TokenRevoked => ErrorCode::TokenRevoked,
            Refusal::WrongService => ErrorCode::WrongService,
            Refusal::TokenLimitExceeded { .. } => ErrorCode::TokenLimitExceeded,
            Refusal::InsufficientBalance { .. } => ErrorCode::InsufficientBalance,
            Refusal::DailyLimitExceeded { .. } => ErrorCode::DailyLimitExceeded,
            Refusal::IdempotencyKeyMismatch | Refusal::ReferenceReused { .. } => {
                ErrorCode::IdempotencyKeyMismatch
            }
            Refusal::IdempotencyKeyInUse => ErrorCode::IdempotencyKeyInUse,
            Refusal::IdempotencyKeyExhausted => ErrorCode::IdempotencyKeyExhausted,
            Refusal::NoToken => ErrorCode::Internal,
            Refusal::NoParent => ErrorCode::NotFound,
            Refusal::ParentExpired
            | Refusal::ChainTooLong
            | Refusal::OverParentRemaining { .. }
            | Refusal::ParentServiceOnly
            | Refusal::ServiceRequired
            | Refusal::OutlivesParent
            | Refusal::BalanceOverflow
            | Refusal::UnknownTier { .. } => ErrorCode::BadRequest,
            // No credential of a scheme this ledger verifies: nothing proves who pays.
            Refusal::Credential(credential::Refusal::NotOffered) => ErrorCode::InvalidCredential,
            Refusal::Credential(refusal) => refusal.code(),
            Refusal::PaymentUsed => ErrorCode::PaymentAlreadyUsed,
            Refusal::PaymentNotSettled(_) => ErrorCode::InvalidPayment,
            Refusal::SettlementUnavailable(_) => ErrorCode::LedgerUnavailable,
        }
    }

    /// The answer the API gives for this refusal.
    pub fn body(&self) -> ErrorBody {
        let code = self.code();
        let message = |message: String| ErrorBody::with_message(code, message);
        match self {
            Refusal::TokenLimitExceeded { used, reserved, limit, price } => {
                ErrorBody::token_limit_exceeded(*used, *reserved, *limit, *price)
            }
            Refusal::InsufficientBalance { available, price } => ErrorBody {
                price: Some(*price),
                ..message(format!("Insufficient balance: {available} USDC available"))
            },
            Refusal::DailyLimitExceeded { limit, tier, used, price } => ErrorBody {
                price: Some(*price),
                ..message(format!(
                    "Daily limit exceeded: {limit} USDC a day (tier {tier}), {used} USDC spent or held today"
                ))
            },
            Refusal::ParentExpired => message("the parent token has expired".into()),
            Refusal::ChainTooLong => {
                message(format!("a chain of delegation holds at most {MAX_CHAIN_LEN} tokens"))
            }
            Refusal::OverParentRemaining { limit, remaining } => message(format!(
                "limitUsdc {limit} is more than the parent's remaining {remaining}"
            )),
            Refusal::ParentServiceOnly => {
                message("the parent pays for its own service only, and so does its child".into())
            }
            Refusal::ServiceRequired => message("serviceId is required with scope SINGLE".into()),
            Refusal::OutlivesParent => message("the child must not outlive its parent".into()),
            Refusal::ReferenceReused { amount } => {
                message(format!("this reference was already used for a deposit of {amount} USDC"))
            }
            Refusal::BalanceOverflow => {
                message("the balance would exceed the largest amount the ledger keeps".into())
            }
            Refusal::UnknownTier { tiers } => {
                message(format!("tier must be 1 to {tiers} (the ledger's daily_limits_usdc)"))
            }
            Refusal::Credential(credential::Refusal::NotOffered) => message(
                "Invalid credential: the ledger verifies no credential of this scheme".into(),
            ),
            Refusal::Credential(refusal) => refusal.to_body(),
            Refusal::PaymentNotSettled(reason) => {
                message(format!("Invalid payment: it did not settle on chain: {reason}"))
            }
            Refusal::SettlementUnavailable(reason) => message(format!(
                "The payment could not be settled in time ({reason}); retry shortly"
            )),
            Refusal::TokenRevoked
            | Refusal::WrongService
            | Refusal::IdempotencyKeyMismatch
            | Refusal::IdempotencyKeyInUse
            | Refusal::IdempotencyKeyExhausted
            | Refusal::NoToken
            | Refusal::NoParent
            | Refusal::PaymentUsed => ErrorBody::new(code),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.body().error)
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

/// What makes a settlement wrong whatever its hold: an amount with a release, or a commit of
/// nothing. Such a settlement is answered `invalid`; the others of its request settle.
pub fn settlement_problem(settlement: &Settlement) -> Option<String> {
    match (settlement.amount_usdc, settlement.outcome) {
        (Some(_), Outcome::Release) => Some("amountUsdc is for commits only".into()),
        (Some(amount), Outcome::Commit) if amount.is_zero() => {
            Some("amountUsdc must be greater than 0 (release the hold instead)".into())
        }
        _ => None,
    }
}

/// The amount a commit charges: `requested` (a partial commit) or else all of `held`. More
/// than held is refused for that settlement (`invalid`): it is a client's bug, not an outcome.
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
                sandbox: false,
            },
            used: usdc(used),
            reserved: usdc(reserved),
            revoked: false,
            parent_id: None,
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

    fn code(result: Result<Admission, Refusal>) -> ErrorCode {
        result.unwrap_err().code()
    }

    /// A refusal of `code` (any amounts): what `records_refusal` judges by.
    fn refusal_of(code: ErrorCode) -> Refusal {
        let zero = Usdc::ZERO;
        match code {
            ErrorCode::TokenLimitExceeded => {
                Refusal::TokenLimitExceeded { used: zero, reserved: zero, limit: zero, price: zero }
            }
            ErrorCode::InsufficientBalance => {
                Refusal::InsufficientBalance { available: zero, price: zero }
            }
            ErrorCode::DailyLimitExceeded => {
                Refusal::DailyLimitExceeded { limit: zero, tier: 1, used: zero, price: zero }
            }
            ErrorCode::WrongService => Refusal::WrongService,
            ErrorCode::TokenRevoked => Refusal::TokenRevoked,
            ErrorCode::IdempotencyKeyMismatch => Refusal::IdempotencyKeyMismatch,
            ErrorCode::IdempotencyKeyInUse => Refusal::IdempotencyKeyInUse,
            ErrorCode::IdempotencyKeyExhausted => Refusal::IdempotencyKeyExhausted,
            other => panic!("no refusal of {other:?} here"),
        }
    }

    #[test]
    fn holds_count_against_the_cap() {
        assert_eq!(
            admit(&token("0.010", "0.005", "0.004"), &call("0.001"), None, 5),
            Ok(hold("0"))
        );
        let refused =
            admit(&token("0.010", "0.005", "0.005"), &call("0.001"), None, 5).unwrap_err().body();
        assert_eq!(refused.code, ErrorCode::TokenLimitExceeded);
        assert_eq!((refused.used, refused.reserved), (Some(usdc("0.005")), Some(usdc("0.005"))));
        assert_eq!((refused.limit, refused.price), (Some(usdc("0.010")), Some(usdc("0.001"))));
        assert_eq!(admit(&token("1", "0", "0"), &call("0.25"), None, 5), Ok(hold("0.75")));
    }

    #[test]
    fn a_presented_cap_can_lower_the_limit_but_never_raise_it() {
        let narrowed = Call { cap: usdc("0.5"), ..call("0.25") };
        assert_eq!(admit(&token("1", "0.25", "0"), &narrowed, None, 5), Ok(hold("0")));
        let refused = admit(&token("1", "0.25", "0.25"), &narrowed, None, 5).unwrap_err().body();
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
            records_refusal(&refusal_of(code), prior)
        };
        assert!(recorded(ErrorCode::TokenLimitExceeded, None));
        assert!(recorded(ErrorCode::WrongService, None));
        // The buyer's account refuses the request too: recorded as well.
        assert!(recorded(ErrorCode::InsufficientBalance, None));
        assert!(recorded(ErrorCode::DailyLimitExceeded, None));
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

    fn account(balance: &str, held: &str, spent: &str) -> Account {
        Account {
            balance: usdc(balance),
            held: usdc(held),
            tier: 1,
            spent_day: DAY,
            spent: usdc(spent),
        }
    }

    const DAY: i64 = 20_000;

    fn books<'a>(
        chain: &'a [TokenRecord],
        account: Option<&'a Account>,
        limits: &'a DailyLimits,
    ) -> Books<'a> {
        Books { chain, account, today: DAY, daily_limits: limits }
    }

    #[test]
    fn extra_holds_take_at_most_a_quarter_of_what_the_first_left() {
        let limits = DailyLimits::default();
        let chain = [token("1", "0", "0")];
        let extras = |account: Option<&Account>, remaining: &str, wanted| {
            extra_holds(&books(&chain, account, &limits), &call("0.01"), usdc(remaining), wanted)
        };
        // 0.99 left after the first: a quarter is 0.2475, room for 24 holds of 0.01.
        assert_eq!(extras(None, "0.99", 63), 24);
        assert_eq!(extras(None, "0.99", 7), 7, "never more than asked");
        assert_eq!(extras(None, "0.04", 63), 1);
        assert_eq!(extras(None, "0.039999", 63), 0, "near the cap, the first hold alone");
        assert_eq!(extras(None, "0", 63), 0);
        // The buyer's balance bounds them: 0.51 − 0.01 = 0.5 available after the first.
        let funded = account("0.51", "0", "0");
        assert_eq!(extras(Some(&funded), "0.99", 63), 12);
        // And the daily limit: 10 a day at tier 1, 9.79 of it spent.
        let spent = account("5000", "0", "9.79");
        assert_eq!(extras(Some(&spent), "0.99", 63), 5);
        let free = Call { price: Usdc::ZERO, ..call("0") };
        let no_price = extra_holds(&books(&chain, None, &limits), &free, usdc("1"), 63);
        assert_eq!(no_price, 0, "a zero price is never divided by");
    }

    #[test]
    fn balances_hold_what_is_available_and_say_how_much_is() {
        let limits = DailyLimits::default();
        let chain = [token("100", "0", "0")];
        let funded = account("2", "0.77", "0");
        // 2 − 0.77 = 1.23 available: exactly that fits, a micro-USDC more does not.
        let fits = admit_books(&books(&chain, Some(&funded), &limits), &call("1.23"), None, 5);
        assert_eq!(fits, Ok(hold("98.77")));
        let refused =
            admit_books(&books(&chain, Some(&funded), &limits), &call("1.230001"), None, 5)
                .unwrap_err()
                .body();
        assert_eq!(refused.code, ErrorCode::InsufficientBalance);
        assert_eq!(refused.error, "Insufficient balance: 1.230000 USDC available");
        assert_eq!(refused.price, Some(usdc("1.230001")));
        // No account: the token's cap alone bounds it.
        assert_eq!(
            admit_books(&books(&chain, None, &limits), &call("50"), None, 5),
            Ok(hold("50"))
        );
    }

    #[test]
    fn daily_limits_count_spend_and_holds_of_the_utc_day_by_tier() {
        let limits = DailyLimits::new(vec![usdc("10"), usdc("1000")]).unwrap();
        let chain = [token("5000", "0", "0")];
        let rich = |held: &str, spent: &str, tier| Account { tier, ..account("4000", held, spent) };
        let admit_on = |account: &Account, price: &str, today| {
            let books = Books { today, ..books(&chain, Some(account), &limits) };
            admit_books(&books, &call(price), None, 5)
        };
        assert!(admit_on(&rich("3", "6", 1), "1", DAY).is_ok(), "3 + 6 + 1 = the limit");
        let refused = admit_on(&rich("3", "6", 1), "1.000001", DAY).unwrap_err().body();
        assert_eq!(refused.code, ErrorCode::DailyLimitExceeded);
        assert_eq!(
            refused.error,
            "Daily limit exceeded: 10.000000 USDC a day (tier 1), 9.000000 USDC spent or held today"
        );
        // A new UTC day forgets yesterday's spend, not the holds still open.
        assert!(admit_on(&rich("3", "6", 1), "7", DAY + 1).is_ok());
        assert_eq!(
            code(admit_on(&rich("3", "6", 1), "7.000001", DAY + 1)),
            ErrorCode::DailyLimitExceeded
        );
        assert!(admit_on(&rich("3", "6", 2), "500", DAY).is_ok(), "tier 2: 1,000 a day");
        assert_eq!(utc_day(0), 0);
        assert_eq!(utc_day(MILLIS_PER_DAY - 1), 0);
        assert_eq!(utc_day(MILLIS_PER_DAY), 1);
        assert_eq!(utc_day(-1), -1);
    }

    #[test]
    fn sandbox_tokens_never_touch_the_account() {
        let limits = DailyLimits::default();
        let mut sandbox = token("100", "0", "0");
        sandbox.grant.sandbox = true;
        let broke = account("0", "0", "0");
        let chain = [sandbox];
        let books = books(&chain, Some(&broke), &limits);
        assert!(books.debited_account().is_none());
        assert_eq!(admit_books(&books, &call("20"), None, 5), Ok(hold("80")));
    }

    #[test]
    fn every_level_of_a_chain_must_fit_the_price() {
        let limits = DailyLimits::default();
        let chain = [token("1", "0", "0"), token("5", "4.5", "0.2"), token("10", "0", "0")];
        assert_eq!(
            admit_books(&books(&chain, None, &limits), &call("0.3"), None, 5),
            Ok(hold("0"))
        );
        let refused = admit_books(&books(&chain, None, &limits), &call("0.300001"), None, 5)
            .unwrap_err()
            .body();
        assert_eq!(refused.code, ErrorCode::TokenLimitExceeded);
        assert_eq!(refused.limit, Some(usdc("5")), "the parent refused");
        let mut revoked_root = chain.clone();
        revoked_root[2].revoked = true;
        assert_eq!(
            code(admit_books(&books(&revoked_root, None, &limits), &call("0.1"), None, 5)),
            ErrorCode::TokenRevoked
        );
        assert_eq!(chain_remaining(&chain), usdc("0.3"));
    }

    fn spec(limit: &str) -> ChildSpec {
        ChildSpec {
            token_id: "child".into(),
            limit: usdc(limit),
            service_id: None,
            scope: None,
            buyer_tag: None,
            expires_at: None,
            default_expires_at: 3_000_000_000,
            now: 1_000,
        }
    }

    #[test]
    fn children_narrow_their_parent_and_never_widen_it() {
        let parent = [token("1", "0.5", "0.2")];
        let child = child_grant(&parent, &spec("0.3")).unwrap();
        assert_eq!((child.buyer_id.as_str(), child.limit_usdc), ("buyer", usdc("0.3")));
        assert_eq!((child.service_id.as_deref(), child.scope), (Some("weather"), Scope::Single));
        assert_eq!(child.expires_at, 3_000_000_000, "the default, within the parent's expiry");
        let bad = |spec: ChildSpec| child_grant(&parent, &spec).unwrap_err().body().error;
        assert!(bad(spec("0.300001")).contains("remaining 0.300000"));
        assert!(bad(ChildSpec { scope: Some(Scope::All), ..spec("0.1") }).contains("own service"));
        assert!(
            bad(ChildSpec { service_id: Some("maps".into()), ..spec("0.1") })
                .contains("own service")
        );
        assert!(
            bad(ChildSpec { expires_at: Some(4_000_000_001), ..spec("0.1") }).contains("outlive")
        );
        assert!(bad(ChildSpec { now: 4_000_000_000, ..spec("0.1") }).contains("expired"));
        let mut all = token("1", "0", "0");
        all.grant.scope = Scope::All;
        let maps = ChildSpec { service_id: Some("maps".into()), ..spec("0.1") };
        assert_eq!(child_grant(&[all], &maps).unwrap().service_id.as_deref(), Some("maps"));
        let revoked = [token("1", "0", "0"), TokenRecord { revoked: true, ..token("1", "0", "0") }];
        assert_eq!(
            child_grant(&revoked, &spec("0.1")).unwrap_err().code(),
            ErrorCode::TokenRevoked
        );
        let deep = vec![token("1", "0", "0"); MAX_CHAIN_LEN];
        assert!(child_grant(&deep, &spec("0.1")).unwrap_err().body().error.contains("at most 8"));
        assert!(child_grant(&deep[1..], &spec("0.1")).is_ok());
    }

    #[test]
    fn deposits_credit_once_per_reference() {
        let funded = account("1", "0", "0");
        assert_eq!(
            deposit(&funded, usdc("2"), None),
            Ok(DepositDecision::Credit { balance: usdc("3") })
        );
        assert_eq!(deposit(&funded, usdc("2"), Some(usdc("2"))), Ok(DepositDecision::Replay));
        let reused = deposit(&funded, usdc("2"), Some(usdc("3"))).unwrap_err();
        assert_eq!(reused.code(), ErrorCode::IdempotencyKeyMismatch);
        let full = Account { balance: Usdc::MAX, ..funded };
        assert_eq!(
            deposit(&full, usdc("0.000001"), None).unwrap_err().code(),
            ErrorCode::BadRequest
        );
    }
}
