//! The ledger's operations as its API offers them: input validation, ids, clocks and views
//! around the store's atomic operations.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use paystile_protocol::Usdc;
use paystile_protocol::credential::{self, Scheme, Verified, Verifier};
use paystile_protocol::headers;
use paystile_protocol::jwk::Jwks;
use paystile_protocol::jws::SigningKey;
use paystile_protocol::l402::{self, Capability};
use paystile_protocol::ledger_api::{
    AccountView, BuyerRevocation, BuyerView, ChargeStatus, ChargeView, ChildTokenRequest, Deposit,
    DepositRequest, GatewayConfirmations, Hold, IssueTokenRequest, IssuedToken,
    MAX_HOLDS_PER_RESERVE, Outcome, ReserveRequest, RevocationFeed, SetTierRequest, SettleRequest,
    SettleResponse, SettleResult, SettleStatus, Settlement, SettlementView, TokenGrant, TokenView,
    TopUp, TopUpRequest, WATCH_WAIT_MS,
};
use paystile_protocol::pay_token::{self, Audience, MAX_EXPIRY_SECONDS, PayTokenClaims, Scope};
use paystile_protocol::verified::VerifiedCache;
use paystile_protocol::x402;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::Notify;

use crate::domain::{TokenRecord, UnixMillis};
use crate::rules::{self, Account, ChildSpec, DailyLimits, Refusal};
use crate::settlement::{Settlements, Unsettled};
use crate::store::{
    ChargeRecord, DepositCommand, PaymentKind, PaymentSettlement, RecordedPayment, ReserveCommand,
    ReserveOutcome, SettlementStatus, Store, StoreError, X402PaymentRecord,
};
use crate::telemetry::Metrics;

/// The most holds (or Idempotency-Keys) one sweep releases (or forgets).
const PER_SWEEP: usize = 10_000;

/// Credentials kept verified: each is verified once per ledger process while it stays valid.
const VERIFIED_CAPACITY: usize = 16_384;

/// The most settlements accepted in one request.
pub const MAX_SETTLEMENTS: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The books refuse the operation (a revoked parent, a reused deposit reference, …).
    #[error("{0}")]
    Refused(Refusal),
    #[error("token issuing is off: the ledger has no token secret (PAYSTILE_TOKEN_SECRET)")]
    IssuingDisabled,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How the ledger signs the Pay Tokens it issues.
pub struct TokenIssuer {
    pub key: SigningKey,
    pub issuer: String,
    pub audience: Option<String>,
    pub default_ttl: Duration,
}

/// The money rules' knobs.
#[derive(Clone, Debug)]
pub struct Limits {
    /// A hold not settled within this time is released.
    pub hold_ttl: Duration,
    /// How often a charged call may be replayed under its Idempotency-Key.
    pub max_replays: u32,
    /// Each tier's daily limit for buyers with an account.
    pub daily_limits: Arc<DailyLimits>,
    /// Milliseconds added to the system clock: tests move a ledger across a UTC midnight.
    pub clock_offset_millis: i64,
    /// How long an Idempotency-Key keeps its outcome at least (once its charge is settled).
    pub idempotency_retention: Duration,
}

/// How the ledger knows who pays: it verifies every credential a reserve presents itself,
/// so that the gateway's key alone spends nobody's money.
pub struct Credentials {
    /// The keys and secrets credentials are verified with.
    pub verifier: Verifier,
    /// The Ed25519 keys' public halves, for `GET /.well-known/jwks.json`.
    pub published: Jwks,
}

/// How the revocation feed's changes reach the watch polls and the revokes that wait for
/// them. This process's own changes wake them at once; other processes' (ledgers sharing a
/// PostgreSQL database) are found by looking at the store every `backstop`.
struct Watch {
    fed: Notify,
    seen: Notify,
    backstop: Duration,
}

/// Feed entries answered to one watch poll at most; the rest go to the next.
const FEED_PAGE: usize = 1_000;
/// How long a revoke waits for the watching gateway VMs to apply it.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);
/// A watcher not heard from for this long is no longer waited for: a VM polls again as
/// soon as its poll is answered, and a poll is answered within [`WATCH_WAIT_MS`].
const WATCHER_LIVE: Duration = Duration::from_millis(WATCH_WAIT_MS + 10_000);
/// A watcher not heard from for this long is forgotten, and so are the revocation feed's
/// entries: a VM that polls is never that far behind, and the holds a VM away that long
/// prefetched have aged out of its pools (and the ledger refuses a revoked token anyway).
const WATCHER_FORGOTTEN: Duration = Duration::from_secs(3600);

fn millis_i64(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

pub struct Ledger {
    store: Store,
    watch: Watch,
    issuer: Option<TokenIssuer>,
    credentials: Credentials,
    /// What verified credentials proved, so that a token's next reserves skip the signature.
    verified: Mutex<VerifiedCache>,
    limits: Limits,
    metrics: Metrics,
    /// x402 settlement, when x402 is on: `settle: before` reserves settle through it.
    settlements: Option<Arc<Settlements>>,
    /// The services buyers may issue tokens for (byte order); empty: any.
    services: Vec<String>,
    /// The services with calls lately, and when they were looked up (`GET /v1/services`).
    pub(crate) seen_services: Mutex<Option<(UnixMillis, Vec<String>)>>,
}

/// A top-up: done, or refused.
#[derive(Debug)]
pub enum TopUpOutcome {
    ToppedUp(TopUp),
    Refused(Refusal),
}

/// How long a `settle: before` reserve (or a top-up) waits for its transfer at most; the
/// caller's deadline and half the hold TTL bound it too.
const SETTLE_FIRST_WITHIN: Duration = Duration::from_secs(120);
/// Kept between the settlement's deadline and the caller's, for the answer to reach it.
const SETTLE_FIRST_MARGIN_MS: u64 = 500;

impl Ledger {
    pub fn new(
        store: Store,
        issuer: Option<TokenIssuer>,
        credentials: Credentials,
        limits: Limits,
    ) -> Ledger {
        let metrics = Metrics::new(store.expired_on_read());
        let verified = Mutex::new(VerifiedCache::new(VERIFIED_CAPACITY));
        let backstop =
            if store.is_shared() { Duration::from_millis(25) } else { Duration::from_secs(1) };
        let watch = Watch { fed: Notify::new(), seen: Notify::new(), backstop };
        Ledger {
            store,
            watch,
            issuer,
            credentials,
            verified,
            limits,
            metrics,
            settlements: None,
            services: Vec::new(),
            seen_services: Mutex::new(None),
        }
    }

    /// This ledger with x402 settlement.
    pub fn settling_with(self, settlements: Arc<Settlements>) -> Ledger {
        Ledger { settlements: Some(settlements), ..self }
    }

    /// This ledger selling `services` only (byte order, each once): buyers issue tokens for
    /// these alone.
    pub fn selling(self, services: Vec<String>) -> Ledger {
        Ledger { services, ..self }
    }

    /// The services the ledger sells; empty: it names none, and takes any.
    pub fn services(&self) -> &[String] {
        &self.services
    }

    /// The public Pay Token keys gateways verify with.
    pub fn published_keys(&self) -> &Jwks {
        &self.credentials.published
    }

    /// What `request`'s credential proves, verified here (or found verified before).
    fn verify(&self, request: &ReserveRequest, now: UnixMillis) -> Result<Verified, Refusal> {
        let presented = request.credential.as_bytes();
        let now = seconds(now);
        // A poisoned lock only means a panic elsewhere mid-insert: the cache is still sound.
        let cache = || self.verified.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(verified) = cache().get(presented, Capability::Any, now) {
            return Ok(Verified::clone(verified));
        }
        // Verified without the lock: a signature check must not hold up every other reserve.
        let target = credential::Target {
            service_id: &request.service_id,
            capability: Capability::Any,
            price: request.price_usdc,
            now,
        };
        let verified = credential::verify(presented, &self.credentials.verifier, &target)
            .map_err(Refusal::Credential)?;
        // An x402 payment pays for one call: its next presentation is refused by the books.
        if verified.scheme != Scheme::X402 {
            cache().insert(presented, Arc::new(verified.clone()), now);
        }
        Ok(verified)
    }

    /// Gives every open hold a full TTL from now. Run at start: while the ledger was down,
    /// gateways kept the outcomes of calls they answered and will deliver them now.
    pub async fn reopen_holds(&self) -> Result<usize, LedgerError> {
        let until = self.now().saturating_add(millis(self.limits.hold_ttl));
        Ok(self.store.extend_open_holds(until).await?)
    }

    pub async fn issue_token(
        &self,
        request: IssueTokenRequest,
    ) -> Result<IssuedToken, LedgerError> {
        let issuer = self.issuer.as_ref().ok_or(LedgerError::IssuingDisabled)?;
        check_id("serviceId", &request.service_id)?;
        check_id("buyerId", &request.buyer_id)?;
        if let Some(tag) = &request.buyer_tag {
            check_tag("buyerTag", tag)?;
        }
        if request.limit_usdc.is_zero() {
            return Err(LedgerError::Invalid("limitUsdc must be greater than 0".into()));
        }
        let now = self.now();
        let now_seconds = seconds(now);
        let expires_at = expiry(&request.expires_at, request.ttl_seconds, now_seconds)?
            .unwrap_or_else(|| now_seconds.saturating_add(issuer.default_ttl.as_secs()));

        let claims = PayTokenClaims {
            sub: request.buyer_id,
            jti: new_id("tok"),
            service_id: Some(request.service_id),
            limit_usdc: request.limit_usdc,
            scope: request.scope.unwrap_or_default(),
            buyer_tag: request.buyer_tag,
            exp: expires_at,
            iat: Some(now_seconds),
            nbf: None,
            iss: Some(issuer.issuer.clone()),
            aud: issuer.audience.clone().map(Audience::One),
            sandbox: request.sandbox,
        };
        self.store.insert_token(TokenGrant::from(&claims), now).await?;
        Ok(sign(issuer, claims))
    }

    /// Mints a child under `parent_id`: a Pay Token whose spend counts against the parent
    /// and every ancestor ([`rules::child_grant`] says what it may be).
    pub async fn mint_child(
        &self,
        parent_id: String,
        request: ChildTokenRequest,
    ) -> Result<IssuedToken, LedgerError> {
        let issuer = self.issuer.as_ref().ok_or(LedgerError::IssuingDisabled)?;
        if let Some(service) = &request.service_id {
            check_id("serviceId", service)?;
        }
        if let Some(tag) = &request.buyer_tag {
            check_tag("buyerTag", tag)?;
        }
        if request.limit_usdc.is_zero() {
            return Err(LedgerError::Invalid("limitUsdc must be greater than 0".into()));
        }
        let now = self.now();
        let now_seconds = seconds(now);
        let spec = ChildSpec {
            token_id: new_id("tok"),
            limit: request.limit_usdc,
            service_id: request.service_id,
            scope: request.scope,
            buyer_tag: request.buyer_tag,
            expires_at: expiry(&request.expires_at, request.ttl_seconds, now_seconds)?,
            default_expires_at: now_seconds.saturating_add(issuer.default_ttl.as_secs()),
            now: now_seconds,
        };
        let child = self
            .store
            .mint_child(parent_id, spec, now)
            .await?
            .ok_or(LedgerError::NotFound("token"))?
            .map_err(LedgerError::Refused)?;
        let grant = child.grant;
        tracing::info!(token_id = %grant.token_id, parent_id = ?child.parent_id, "child token minted");
        let claims = PayTokenClaims {
            sub: grant.buyer_id,
            jti: grant.token_id,
            service_id: grant.service_id,
            limit_usdc: grant.limit_usdc,
            scope: grant.scope,
            buyer_tag: grant.buyer_tag,
            exp: grant.expires_at,
            iat: Some(now_seconds),
            nbf: None,
            iss: Some(issuer.issuer.clone()),
            aud: issuer.audience.clone().map(Audience::One),
            sandbox: grant.sandbox,
        };
        Ok(sign(issuer, claims))
    }

    /// Credits a buyer's prepaid balance, opening the account if needed. With a reference,
    /// at most once: the same reference again answers the first deposit.
    pub async fn deposit(
        &self,
        buyer_id: String,
        request: DepositRequest,
    ) -> Result<Deposit, LedgerError> {
        check_account_id(&buyer_id)?;
        if let Some(reference) = &request.reference {
            check_id("reference", reference)?;
        }
        if request.amount_usdc.is_zero() {
            return Err(LedgerError::Invalid("amountUsdc must be greater than 0".into()));
        }
        let deposit = self
            .store
            .deposit(DepositCommand {
                deposit_id: new_id("dep"),
                buyer_id: buyer_id.clone(),
                amount: request.amount_usdc,
                reference: request.reference.clone(),
                now: self.now(),
            })
            .await?
            .map_err(LedgerError::Refused)?;
        if !deposit.replayed {
            tracing::info!(%buyer_id, amount = %deposit.amount, "deposit");
        }
        Ok(Deposit {
            deposit_id: deposit.deposit_id,
            buyer_id,
            amount_usdc: deposit.amount,
            reference: request.reference,
            balance_usdc: deposit.balance,
            replayed: deposit.replayed,
            created_at: rfc3339_millis(deposit.created_at),
        })
    }

    /// Sets the buyer's tier (its daily limit), opening the account if needed.
    pub async fn set_tier(
        &self,
        buyer_id: String,
        request: SetTierRequest,
    ) -> Result<BuyerView, LedgerError> {
        check_account_id(&buyer_id)?;
        self.limits.daily_limits.check_tier(request.tier).map_err(LedgerError::Refused)?;
        self.store.set_tier(buyer_id.clone(), request.tier, self.now()).await?;
        self.buyer(buyer_id).await
    }

    pub async fn buyer(&self, buyer_id: String) -> Result<BuyerView, LedgerError> {
        let buyer = self.buyer_view(buyer_id).await?;
        if buyer.account.is_none() && buyer.tokens.is_empty() {
            return Err(LedgerError::NotFound("buyer"));
        }
        Ok(buyer)
    }

    /// The buyer's account, if any, and tokens (none, for a buyer the books do not know).
    pub(crate) async fn buyer_view(&self, buyer_id: String) -> Result<BuyerView, LedgerError> {
        let buyer = self.store.buyer(buyer_id.clone(), self.now()).await?;
        let today = rules::utc_day(self.now());
        Ok(BuyerView {
            account: buyer.account.map(|account| self.account_view(&account, today)),
            tokens: buyer.tokens.into_iter().map(token_view).collect(),
            buyer_id,
        })
    }

    /// The panic button: every token of the buyer revoked in one transaction; holds of calls
    /// in flight are released instead of committed, as with one token's kill switch.
    pub async fn revoke_buyer(&self, buyer_id: String) -> Result<BuyerRevocation, LedgerError> {
        let revoked = self.store.revoke_buyer(buyer_id.clone(), self.now()).await?;
        let revoked_tokens = revoked.value.ok_or(LedgerError::NotFound("buyer"))?;
        tracing::warn!(%buyer_id, revoked_tokens, "every token of the buyer revoked");
        let gateways = self.confirm(revoked.feed_seq).await?;
        Ok(BuyerRevocation { buyer_id, revoked_tokens, gateways })
    }

    /// A gateway VM's revocation watch (`watcher` names it): records that it has applied
    /// the feed up to `after`, then answers the feed past it as soon as there is any, or
    /// empty after [`WATCH_WAIT_MS`]. Without `after` (a VM that holds nothing yet) the
    /// answer is at once: the feed's head.
    pub async fn watch_revocations(
        &self,
        watcher: String,
        after: Option<u64>,
    ) -> Result<RevocationFeed, LedgerError> {
        check_id("watcher", &watcher)?;
        let Some(after) = after else {
            let head = self.store.revocations_after(u64::MAX, 0).await?;
            self.seen(watcher, head.seq).await?;
            return Ok(head);
        };
        self.seen(watcher, after).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(WATCH_WAIT_MS);
        loop {
            let fed = self.watch.fed.notified();
            tokio::pin!(fed);
            fed.as_mut().enable();
            let feed = self.store.revocations_after(after, FEED_PAGE).await?;
            // A position behind the watcher's: the feed started over (a new database).
            if !feed.token_ids.is_empty() || feed.seq < after {
                return Ok(feed);
            }
            let backstop = tokio::time::Instant::now() + self.watch.backstop;
            tokio::select! {
                () = fed => {}
                () = tokio::time::sleep_until(backstop.min(deadline)) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(feed);
            }
        }
    }

    async fn seen(&self, watcher: String, seq: u64) -> Result<(), LedgerError> {
        let now = self.now();
        let forget_before = now.saturating_sub(millis_i64(WATCHER_FORGOTTEN));
        self.store.watcher_seen(watcher, seq, now, forget_before).await?;
        self.watch.seen.notify_waiters();
        Ok(())
    }

    /// Waits until every live watcher has applied the feed up to `seq` (a revocation's
    /// entries), for at most [`CONFIRM_TIMEOUT`]; answers which have and which have not.
    async fn confirm(&self, seq: Option<u64>) -> Result<GatewayConfirmations, LedgerError> {
        let Some(seq) = seq else { return Ok(GatewayConfirmations::default()) };
        self.watch.fed.notify_waiters();
        let deadline = tokio::time::Instant::now() + CONFIRM_TIMEOUT;
        loop {
            let seen = self.watch.seen.notified();
            tokio::pin!(seen);
            seen.as_mut().enable();
            let live_since = self.now().saturating_sub(millis_i64(WATCHER_LIVE));
            let watchers = self.store.watchers(seq, live_since).await?;
            if watchers.unconfirmed.is_empty() || tokio::time::Instant::now() >= deadline {
                if !watchers.unconfirmed.is_empty() {
                    tracing::warn!(unconfirmed = ?watchers.unconfirmed, "gateway VMs did not confirm a revocation in time");
                }
                return Ok(watchers);
            }
            let backstop = tokio::time::Instant::now() + self.watch.backstop;
            tokio::select! {
                () = seen => {}
                () = tokio::time::sleep_until(backstop.min(deadline)) => {}
            }
        }
    }

    pub(crate) fn account_view(&self, account: &Account, today: i64) -> AccountView {
        let daily_limit = self.limits.daily_limits.of_tier(account.tier);
        AccountView {
            balance_usdc: account.balance,
            held_usdc: account.held,
            available_usdc: account.available(),
            spent_today_usdc: account.spent_on(today),
            tier: account.tier,
            daily_limit_usdc: daily_limit,
            remaining_today_usdc: daily_limit.saturating_sub(account.used_on(today)),
        }
    }

    /// The ledger's clock: the system's, moved by the test-only offset.
    pub(crate) fn now(&self) -> UnixMillis {
        now_millis().saturating_add(self.limits.clock_offset_millis)
    }

    pub async fn token(&self, token_id: String) -> Result<TokenView, LedgerError> {
        let token =
            self.store.token(token_id, self.now()).await?.ok_or(LedgerError::NotFound("token"))?;
        Ok(token_view(token))
    }

    /// The kill switch: from now on the token pays for nothing, and holds of calls in flight
    /// are released instead of committed.
    ///
    /// L402 tokens are minted without a trace in the ledger, which learns them on their
    /// first paid call; one revoked before that is recorded as revoked, with no budget, so
    /// that its first call is refused.
    pub async fn revoke_token(&self, token_id: String) -> Result<TokenView, LedgerError> {
        let unused_l402 = is_l402_token_id(&token_id).then(|| TokenGrant {
            token_id: token_id.clone(),
            buyer_id: token_id.clone(),
            buyer_tag: None,
            service_id: None,
            scope: Scope::Single,
            limit_usdc: Usdc::ZERO,
            expires_at: 0,
            sandbox: false,
        });
        let revoked = self.store.revoke_token(token_id, unused_l402, self.now()).await?;
        let token = revoked.value.ok_or(LedgerError::NotFound("token"))?;
        tracing::info!(token_id = %token.grant.token_id, "token revoked");
        let gateways = self.confirm(revoked.feed_seq).await?;
        Ok(TokenView { gateways: Some(gateways), ..token_view(token) })
    }

    /// The books, for the journal's queries (see `crate::journal`).
    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub async fn charge(&self, charge_id: String) -> Result<ChargeView, LedgerError> {
        let charge = self
            .store
            .charge(charge_id, self.now())
            .await?
            .ok_or(LedgerError::NotFound("charge"))?;
        Ok(charge_view(charge))
    }

    pub async fn reserve(&self, request: ReserveRequest) -> Result<ReserveOutcome, LedgerError> {
        check_id("serviceId", &request.service_id)?;
        if request.credential.as_bytes().len() > credential::MAX_AUTHORIZATION_LEN {
            return Err(LedgerError::Invalid(format!(
                "credential must be at most {} bytes",
                credential::MAX_AUTHORIZATION_LEN
            )));
        }
        if request.price_usdc.is_zero() {
            return Err(LedgerError::Invalid("priceUsdc must be greater than 0".into()));
        }
        if !(1..=MAX_HOLDS_PER_RESERVE).contains(&request.count) {
            return Err(LedgerError::Invalid(format!(
                "count must be 1 to {MAX_HOLDS_PER_RESERVE}"
            )));
        }
        // An Idempotency-Key promises one charge for one request: such calls are reserved
        // one by one.
        if request.count > 1 && request.idempotency.is_some() {
            return Err(LedgerError::Invalid("count must be 1 with an idempotency key".into()));
        }
        if let Some(idempotency) = &request.idempotency {
            if headers::idempotency_key(idempotency.key.as_bytes()).is_none() {
                return Err(LedgerError::Invalid(
                    "idempotency.key must be 1 to 255 printable ASCII characters".into(),
                ));
            }
            let fingerprint = &idempotency.fingerprint;
            if fingerprint.len() != 64 || !fingerprint.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(LedgerError::Invalid(
                    "idempotency.fingerprint must be a hex SHA-256".into(),
                ));
            }
        }
        let now = self.now();
        let verified = match self.verify(&request, now) {
            Ok(verified) => verified,
            Err(refusal) => {
                self.metrics.credential_refused(&request, &refusal);
                return Ok(ReserveOutcome::Refused(refusal));
            }
        };
        if verified.x402.is_some() {
            // Recorded before its hold: what a committed charge was paid with is always known.
            let presented = String::from_utf8_lossy(request.credential.as_bytes()).into_owned();
            let recorded =
                self.record_payment(&verified, PaymentKind::Call, presented, now).await?;
            if recorded.kind != PaymentKind::Call {
                return Ok(ReserveOutcome::Refused(Refusal::PaymentUsed));
            }
            // A payment that failed to settle pays for nothing: it would fail again.
            if recorded.settlement.status == SettlementStatus::Failed {
                let reason = recorded.settlement.reason.unwrap_or_else(|| "it failed".into());
                return Ok(ReserveOutcome::Refused(Refusal::PaymentNotSettled(reason)));
            }
        }
        let outcome = self
            .store
            .reserve(ReserveCommand {
                charge_id: new_charge_id(now),
                extra_charge_ids: (1..request.count).map(|_| new_charge_id(now)).collect(),
                // The gateway's deadline is on its wall clock: judged by ours, never the
                // offset clock of tests.
                extras_until: request.extras_until_ms.filter(|_| request.count > 1),
                token: verified.token.clone(),
                service_id: request.service_id.clone(),
                price: request.price_usdc,
                idempotency: request.idempotency.clone(),
                cap: verified.cap,
                now,
                hold_expires_at: now.saturating_add(millis(self.limits.hold_ttl)),
                max_replays: self.limits.max_replays,
                daily_limits: self.limits.daily_limits.clone(),
            })
            .await?;
        // A payment pays one call: its token's limit taken means it paid (or pays) another.
        let outcome = match outcome {
            ReserveOutcome::Refused(Refusal::TokenLimitExceeded { .. })
                if verified.x402.is_some() =>
            {
                ReserveOutcome::Refused(Refusal::PaymentUsed)
            }
            // A replay's charge is committed: its payment was settled for its first call.
            ReserveOutcome::Held(hold) if verified.x402.is_some() && !hold.replayed => {
                match request.settle_until_ms {
                    Some(until) => self.settle_first(hold, &verified.token.token_id, until).await?,
                    None => ReserveOutcome::Held(hold),
                }
            }
            outcome => outcome,
        };
        if let (ReserveOutcome::Held(hold), Some(until)) = (&outcome, request.extras_until_ms) {
            let late_by = u64::try_from(now_millis()).unwrap_or(0).saturating_sub(until);
            if request.count > 1 && hold.extra_charge_ids.is_empty() && late_by > 0 {
                self.metrics.late_prefetch(&request, late_by);
            }
        }
        self.metrics.reserved(&verified.token, &request, &outcome);
        Ok(outcome)
    }

    /// Records the x402 payment `verified` proves, taken for `kind`: what it was first taken
    /// for, and whether that was now.
    async fn record_payment(
        &self,
        verified: &Verified,
        kind: PaymentKind,
        presented: String,
        now: UnixMillis,
    ) -> Result<RecordedPayment, LedgerError> {
        let Some(paid) = &verified.x402 else {
            return Err(LedgerError::Invalid("credential must be an x402 payment".into()));
        };
        Ok(self
            .store
            .record_x402_payment(X402PaymentRecord {
                token_id: verified.token.token_id.clone(),
                kind,
                payer: paid.checked.payer.to_checksum(None),
                network: paid.network.clone(),
                amount: verified.token.limit_usdc,
                valid_before: verified.token.expires_at,
                payment: presented,
                now,
            })
            .await?)
    }

    /// A top-up: `amountUsdc` paid with an x402 payment, settled on chain now; the payer's
    /// prepaid account (its address) is credited with it, once (the deposit's reference is
    /// the payment), and a Pay Token with that cap for the service is issued to it, when
    /// this ledger issues tokens. A payment taken before, for a call or a top-up, is refused.
    pub async fn top_up(&self, request: TopUpRequest) -> Result<TopUpOutcome, LedgerError> {
        check_id("serviceId", &request.service_id)?;
        if request.amount_usdc.is_zero() {
            return Err(LedgerError::Invalid("amountUsdc must be greater than 0".into()));
        }
        if request.credential.as_bytes().len() > credential::MAX_AUTHORIZATION_LEN {
            return Err(LedgerError::Invalid(format!(
                "credential must be at most {} bytes",
                credential::MAX_AUTHORIZATION_LEN
            )));
        }
        let now = self.now();
        let target = credential::Target {
            service_id: &request.service_id,
            capability: Capability::Any,
            price: request.amount_usdc,
            now: seconds(now),
        };
        let presented = request.credential.as_bytes();
        let verified = match credential::verify(presented, &self.credentials.verifier, &target) {
            Ok(verified) if verified.scheme == Scheme::X402 => verified,
            Ok(_) => {
                return Err(LedgerError::Invalid("credential must be an x402 payment".into()));
            }
            Err(refusal) => return Ok(TopUpOutcome::Refused(Refusal::Credential(refusal))),
        };
        let presented = String::from_utf8_lossy(presented).into_owned();
        let recorded = self.record_payment(&verified, PaymentKind::TopUp, presented, now).await?;
        if !recorded.first {
            return Ok(TopUpOutcome::Refused(Refusal::PaymentUsed));
        }
        let token_id = &verified.token.token_id;
        let transaction = match self.settle_now(token_id, request.settle_until_ms).await {
            Ok(transaction) => transaction,
            Err(refusal) => return Ok(TopUpOutcome::Refused(refusal)),
        };
        let Some(paid) = &verified.x402 else {
            return Err(LedgerError::Invalid("credential must be an x402 payment".into()));
        };
        let buyer_id = paid.checked.payer.to_checksum(None);
        let deposit = self
            .deposit(
                buyer_id.clone(),
                DepositRequest {
                    amount_usdc: request.amount_usdc,
                    reference: Some(token_id.clone()),
                },
            )
            .await?;
        if deposit.replayed {
            return Ok(TopUpOutcome::Refused(Refusal::PaymentUsed));
        }
        let token = match &self.issuer {
            Some(_) => Some(
                self.issue_token(IssueTokenRequest {
                    service_id: request.service_id,
                    limit_usdc: request.amount_usdc,
                    buyer_id: buyer_id.clone(),
                    buyer_tag: None,
                    scope: None,
                    expires_at: None,
                    ttl_seconds: None,
                    sandbox: false,
                })
                .await?,
            ),
            None => None,
        };
        tracing::info!(%buyer_id, amount = %request.amount_usdc, %transaction, "x402 top-up");
        Ok(TopUpOutcome::ToppedUp(TopUp {
            buyer_id,
            amount_usdc: request.amount_usdc,
            transaction,
            balance_usdc: deposit.balance_usdc,
            token,
        }))
    }

    /// Settles the payment `token_id` now, before the caller's deadline `until_ms` (its
    /// clock; with a margin for the answer to reach it) and well within the hold TTL: its
    /// transaction, or the refusal: the payment's own (402 `invalid_payment`) or the
    /// chain's or facilitator's silence (503).
    async fn settle_now(&self, token_id: &str, until_ms: Option<u64>) -> Result<String, Refusal> {
        let Some(settlements) = &self.settlements else {
            return Err(Refusal::PaymentNotSettled("this ledger settles no x402 payment".into()));
        };
        let caller = until_ms
            .map(|until| until.saturating_sub(u64::try_from(now_millis()).unwrap_or(0)))
            .map_or(SETTLE_FIRST_WITHIN, |left| {
                Duration::from_millis(left.saturating_sub(SETTLE_FIRST_MARGIN_MS))
            });
        let within = caller.min(SETTLE_FIRST_WITHIN).min(self.limits.hold_ttl / 2);
        settlements.settle_now(token_id, within).await.map_err(|unsettled| match unsettled {
            Unsettled::Refused(reason) => Refusal::PaymentNotSettled(reason),
            Unsettled::Unavailable(reason) => Refusal::SettlementUnavailable(reason),
        })
    }

    /// `settle: before`: the payment of `hold` is settled on chain now; then its charge is
    /// committed and the hold answered with the transaction, or else released and the
    /// payment refused with the reason.
    async fn settle_first(
        &self,
        hold: Hold,
        token_id: &str,
        until_ms: u64,
    ) -> Result<ReserveOutcome, LedgerError> {
        let settled = self.settle_now(token_id, Some(until_ms)).await;
        let outcome = if settled.is_ok() { Outcome::Commit } else { Outcome::Release };
        let settlement = Settlement {
            charge_id: hold.charge_id.clone(),
            outcome,
            upstream_status: None,
            amount_usdc: None,
        };
        let results = self.store.settle(vec![settlement], self.now()).await?;
        let committed = results.first().is_some_and(|r| r.status == SettleStatus::Committed);
        Ok(match settled {
            Ok(transaction) if committed => {
                ReserveOutcome::Held(Hold { transaction: Some(transaction), ..hold })
            }
            // Settled, but its hold is gone (expired, or its token revoked meanwhile): the
            // call is not served; the payment's job says it was settled.
            Ok(transaction) => ReserveOutcome::Refused(Refusal::PaymentNotSettled(format!(
                "its hold ended while it settled (transaction {transaction})"
            ))),
            Err(refusal) => ReserveOutcome::Refused(refusal),
        })
    }

    pub async fn settle(&self, request: SettleRequest) -> Result<SettleResponse, LedgerError> {
        if request.settlements.len() > MAX_SETTLEMENTS {
            return Err(LedgerError::Invalid(format!(
                "at most {MAX_SETTLEMENTS} settlements per request"
            )));
        }
        // A settlement that cannot apply is answered `invalid` on its own; the rest settle.
        let (mut valid, mut refused) = (Vec::new(), Vec::new());
        for (i, settlement) in request.settlements.into_iter().enumerate() {
            match rules::settlement_problem(&settlement) {
                Some(problem) => {
                    refused.push((i, SettleResult::invalid(&settlement.charge_id, problem)))
                }
                None => valid.push(settlement),
            }
        }
        let settled = self.store.settle(valid.clone(), self.now()).await?;
        self.metrics.settled(&valid, &settled);
        let mut results = settled;
        for (i, result) in refused {
            results.insert(i, result);
        }
        Ok(SettleResponse { results })
    }

    /// Releases holds whose TTL has passed: the buyer is never charged for a call whose
    /// outcome the ledger never learned.
    pub async fn expire_holds(&self) -> Result<usize, LedgerError> {
        let expired = self.store.expire_holds(self.now(), PER_SWEEP).await?;
        self.metrics.expired(expired);
        Ok(expired)
    }

    /// Releases every hold whose TTL has passed, sweep after sweep: before a read that spans
    /// buyers (the journal), as reading one charge releases its buyer's.
    pub(crate) async fn release_expired_holds(&self) -> Result<(), LedgerError> {
        while self.expire_holds().await? == PER_SWEEP {}
        Ok(())
    }

    /// Forgets Idempotency-Keys older than the retention whose outcome is final; a key whose
    /// charge is still held is kept until it is settled or expires.
    pub async fn purge_idempotency_keys(&self) -> Result<usize, LedgerError> {
        let before = self.now().saturating_sub(millis(self.limits.idempotency_retention));
        Ok(self.store.purge_idempotency_keys(before, PER_SWEEP).await?)
    }

    /// Forgets the revocation feed's entries no watcher can still need.
    pub async fn prune_revocations(&self) -> Result<usize, LedgerError> {
        let before = self.now().saturating_sub(millis_i64(WATCHER_FORGOTTEN));
        Ok(self.store.prune_revocations(before).await?)
    }
}

fn token_view(token: TokenRecord) -> TokenView {
    let remaining = token.remaining();
    let grant = token.grant;
    TokenView {
        token_id: grant.token_id,
        buyer_id: grant.buyer_id,
        buyer_tag: grant.buyer_tag,
        service_id: grant.service_id,
        scope: grant.scope,
        limit_usdc: grant.limit_usdc,
        used_usdc: token.used,
        reserved_usdc: token.reserved,
        remaining_usdc: remaining,
        revoked: token.revoked,
        expires_at: rfc3339_seconds(grant.expires_at),
        parent_id: token.parent_id,
        sandbox: grant.sandbox,
        gateways: None,
    }
}

pub(crate) fn charge_view(charge: ChargeRecord) -> ChargeView {
    ChargeView {
        amount_usdc: match charge.status {
            ChargeStatus::Released => Usdc::ZERO,
            ChargeStatus::Held => charge.held,
            ChargeStatus::Committed => charge.committed.unwrap_or(charge.held),
        },
        held_usdc: charge.held,
        charge_id: charge.charge_id,
        token_id: charge.token_id,
        buyer_id: charge.buyer_id,
        service_id: charge.service_id,
        status: charge.status,
        upstream_status: charge.upstream_status,
        idempotency_key: charge.idempotency_key,
        created_at: rfc3339_millis(charge.created_at),
        settled_at: charge.settled_at.map(rfc3339_millis),
        sandbox: charge.sandbox,
        settlement: charge.settlement.map(|settlement| settlement_view(&settlement)),
    }
}

pub(crate) fn settlement_view(settlement: &PaymentSettlement) -> SettlementView {
    SettlementView {
        status: settlement.status.name().to_owned(),
        transaction: settlement.transaction.clone(),
        reason: settlement.reason.clone(),
    }
}

/// `l402_` and the identifier's 32-byte token id in hex, as the filter reports it.
fn is_l402_token_id(token_id: &str) -> bool {
    token_id.strip_prefix(l402::TOKEN_ID_PREFIX).is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Signs `claims` into the issued token's answer.
fn sign(issuer: &TokenIssuer, claims: PayTokenClaims) -> IssuedToken {
    IssuedToken {
        jwt: pay_token::sign(&claims, &issuer.key),
        token_id: claims.jti,
        limit_usdc: claims.limit_usdc,
        expires_at: rfc3339_seconds(claims.exp),
    }
}

/// The expiry (Unix seconds) a request asks for with `expiresAt` or `ttlSeconds`, if any.
pub(crate) fn expiry(
    expires_at: &Option<String>,
    ttl_seconds: Option<u64>,
    now_seconds: u64,
) -> Result<Option<u64>, LedgerError> {
    let expires_at = match (expires_at, ttl_seconds) {
        (Some(_), Some(_)) => {
            return Err(LedgerError::Invalid(
                "give at most one of expiresAt and ttlSeconds".into(),
            ));
        }
        (Some(at), None) => parse_rfc3339("expiresAt", at)?,
        (None, Some(ttl)) => now_seconds.saturating_add(ttl),
        (None, None) => return Ok(None),
    };
    if expires_at <= now_seconds || expires_at > MAX_EXPIRY_SECONDS {
        return Err(LedgerError::Invalid(
            "the token must expire in the future, before the year 10000".into(),
        ));
    }
    Ok(Some(expires_at))
}

/// A buyer id an account may be opened for. L402 holders are prepaid by Lightning, each
/// token its own anonymous buyer: an account would meter them twice.
pub(crate) fn check_account_id(buyer_id: &str) -> Result<(), LedgerError> {
    check_id("buyerId", buyer_id)?;
    if buyer_id.starts_with(l402::TOKEN_ID_PREFIX) {
        return Err(LedgerError::Invalid(format!(
            "buyerId: {}… ids are L402 buyers, prepaid by Lightning; they have no account",
            l402::TOKEN_ID_PREFIX
        )));
    }
    if buyer_id.starts_with(x402::TOKEN_ID_PREFIX) {
        return Err(LedgerError::Invalid(format!(
            "buyerId: {}… ids are x402 payers, who pay each call on chain; they have no account",
            x402::TOKEN_ID_PREFIX
        )));
    }
    Ok(())
}

/// A buyer tag follows the rule for ids, but may be empty, `.` or `..`: it is never a path
/// segment.
pub(crate) fn check_tag(field: &str, value: &str) -> Result<(), LedgerError> {
    pay_token::check_tag(value)
        .map_err(|problem| LedgerError::Invalid(format!("{field} {problem}")))
}

pub(crate) fn check_id(field: &str, value: &str) -> Result<(), LedgerError> {
    pay_token::check_id(value).map_err(|problem| LedgerError::Invalid(format!("{field} {problem}")))
}

/// `<prefix>_<128 random bits in hex>`.
pub(crate) fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", hex::encode(rand::random::<[u8; 16]>()))
}

/// `ch_<the ms of `now`, 48 bits><80 random bits>`, in hex: as long as other ids, but in
/// time order, so that a new charge lands at the end of the charges' primary-key index
/// instead of on a random page of it (a page written to the WAL per hold otherwise, and
/// copied again at the checkpoint). 80 random bits keep ids of one millisecond apart.
fn new_charge_id(now: UnixMillis) -> String {
    let millis = u64::try_from(now).unwrap_or(0) & 0xffff_ffff_ffff;
    format!("ch_{millis:012x}{}", hex::encode(rand::random::<[u8; 10]>()))
}

pub fn now_millis() -> UnixMillis {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}

pub(crate) fn seconds(millis: UnixMillis) -> u64 {
    u64::try_from(millis / 1000).unwrap_or(0)
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

fn parse_rfc3339(field: &str, value: &str) -> Result<u64, LedgerError> {
    let invalid = || LedgerError::Invalid(format!("{field} must be an RFC 3339 time"));
    let at = OffsetDateTime::parse(value, &Rfc3339).map_err(|_| invalid())?;
    u64::try_from(at.unix_timestamp()).map_err(|_| invalid())
}

fn rfc3339_seconds(seconds: u64) -> String {
    rfc3339_millis(i64::try_from(seconds).unwrap_or(i64::MAX).saturating_mul(1000))
}

pub(crate) fn rfc3339_millis(millis: UnixMillis) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000)
        .ok()
        .and_then(|at| at.format(&Rfc3339).ok())
        .unwrap_or_else(|| millis.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charge_ids_are_in_time_order_and_apart_within_a_millisecond() {
        let (earlier, later) = (new_charge_id(1_763_750_000_000), new_charge_id(1_763_750_000_001));
        assert!(earlier < later, "{earlier} sorts after {later}");
        assert_eq!((earlier.len(), new_id("ch").len()), (35, 35));
        assert!(
            earlier.starts_with("ch_019aa") && earlier[3..].bytes().all(|b| b.is_ascii_hexdigit())
        );
        assert_ne!(new_charge_id(5), new_charge_id(5));
    }
}
