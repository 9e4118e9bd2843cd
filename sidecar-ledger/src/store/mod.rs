//! Durable state: tokens (and their chains of delegation), charges (holds and their outcome),
//! Idempotency-Keys, and buyers' prepaid accounts with their deposits.
//!
//! Each operation is one atomic transaction that applies [`crate::rules`], so every store
//! keeps the same semantics. [`Store`] is the one the ledger runs on, chosen by the database
//! URL: SQLite, embedded in WAL mode with group commit, by default; PostgreSQL for ledgers
//! that share their books.

mod journal;
mod migrations;
mod postgres;
mod sql;
mod sqlite;

use std::collections::HashMap;
use std::sync::Arc;

use paystile_protocol::Usdc;
use paystile_protocol::ledger_api::{
    ChargeStatus, GatewayConfirmations, Hold, Idempotency, RevocationFeed, SettleResult,
    Settlement, TokenGrant,
};
use paystile_protocol::pay_token::Scope;

pub use journal::{ChargeFilter, ServiceTotals, ServiceWindow, SpendWindow, TokenSpendRecord};
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

use crate::domain::{TokenRecord, UnixMillis};
use crate::rules::{
    self, Account, Admission, Books, Call, ChildSpec, DailyLimits, DepositDecision, MAX_CHAIN_LEN,
    PriorOutcome, PriorUse, Refusal,
};
use crate::settings::Database;

/// A revocation's answer, and the revocation feed's position after the entries it added:
/// `None` when no revoked token had open holds (no gateway can hold any to drop).
#[derive(Debug)]
pub struct Revoked<T> {
    pub value: T,
    pub feed_seq: Option<u64>,
}

/// A feed position as the database keeps it (a signed 64-bit integer).
fn seq_i64(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// The feed answer to a watcher at `after`: `entries` (position, token) past it, in order,
/// and `head`, the feed's last position read after them. Without entries the watcher stays
/// where it is: a revocation committed between the two reads is answered by its next poll,
/// never skipped. Only a head behind it (the feed started over) moves it back.
fn feed(after: u64, entries: Vec<(i64, String)>, head: i64) -> RevocationFeed {
    let head = u64::try_from(head).unwrap_or(0);
    let seq = match entries.last() {
        Some((last, _)) => u64::try_from(*last).unwrap_or(0),
        None => after.min(head),
    };
    RevocationFeed { seq, token_ids: entries.into_iter().map(|(_, token_id)| token_id).collect() }
}

/// Watchers (id, whether it applied the position asked about), as confirmations.
fn confirmations(watchers: Vec<(String, bool)>) -> GatewayConfirmations {
    let (confirmed, unconfirmed) = watchers.into_iter().partition::<Vec<_>, _>(|(_, seen)| *seen);
    GatewayConfirmations {
        confirmed: confirmed.into_iter().map(|(id, _)| id).collect(),
        unconfirmed: unconfirmed.into_iter().map(|(id, _)| id).collect(),
    }
}

/// The ledger's store; every operation is one atomic transaction.
#[derive(Clone)]
pub enum Store {
    Sqlite(SqliteStore),
    Postgres(PostgresStore),
}

impl Store {
    /// Opens the database `database` names, bringing its schema up to date.
    pub async fn open(database: &Database) -> Result<Store, StoreError> {
        match database {
            Database::Sqlite(path) => Ok(Store::Sqlite(SqliteStore::open(path)?)),
            Database::Postgres(url) => Ok(Store::Postgres(PostgresStore::open(url).await?)),
        }
    }

    pub async fn insert_token(&self, token: TokenGrant, now: UnixMillis) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(store) => store.insert_token(token, now).await,
            Store::Postgres(store) => store.insert_token(token, now).await,
        }
    }

    /// The token, once its holds past their TTL at `now` are released.
    pub async fn token(
        &self,
        token_id: String,
        now: UnixMillis,
    ) -> Result<Option<TokenRecord>, StoreError> {
        match self {
            Store::Sqlite(store) => store.token(token_id, now).await,
            Store::Postgres(store) => store.token(token_id, now).await,
        }
    }

    /// Revokes the token and its descendants; an unknown one is registered as `unknown`
    /// first, if given. Those with open holds go on the revocation feed.
    pub async fn revoke_token(
        &self,
        token_id: String,
        unknown: Option<TokenGrant>,
        now: UnixMillis,
    ) -> Result<Revoked<Option<TokenRecord>>, StoreError> {
        match self {
            Store::Sqlite(store) => store.revoke_token(token_id, unknown, now).await,
            Store::Postgres(store) => store.revoke_token(token_id, unknown, now).await,
        }
    }

    /// Mints a child under `parent_id` ([`crate::rules::child_grant`]): `None` if there is no
    /// such parent, the refusal if the rules refuse.
    pub async fn mint_child(
        &self,
        parent_id: String,
        spec: ChildSpec,
        now: UnixMillis,
    ) -> Result<Option<Result<TokenRecord, Refusal>>, StoreError> {
        match self {
            Store::Sqlite(store) => store.mint_child(parent_id, spec, now).await,
            Store::Postgres(store) => store.mint_child(parent_id, spec, now).await,
        }
    }

    /// Credits a buyer's account, opening it if needed ([`crate::rules::deposit`]).
    pub async fn deposit(
        &self,
        command: DepositCommand,
    ) -> Result<Result<DepositRecord, Refusal>, StoreError> {
        match self {
            Store::Sqlite(store) => store.deposit(command).await,
            Store::Postgres(store) => store.deposit(command).await,
        }
    }

    /// Sets a buyer's tier, opening the account (with no balance) if needed.
    pub async fn set_tier(
        &self,
        buyer_id: String,
        tier: u32,
        now: UnixMillis,
    ) -> Result<Account, StoreError> {
        match self {
            Store::Sqlite(store) => store.set_tier(buyer_id, tier, now).await,
            Store::Postgres(store) => store.set_tier(buyer_id, tier, now).await,
        }
    }

    /// A buyer's account, if any, and tokens (oldest first), once the buyer's holds past
    /// their TTL at `now` are released.
    pub async fn buyer(
        &self,
        buyer_id: String,
        now: UnixMillis,
    ) -> Result<BuyerRecord, StoreError> {
        match self {
            Store::Sqlite(store) => store.buyer(buyer_id, now).await,
            Store::Postgres(store) => store.buyer(buyer_id, now).await,
        }
    }

    /// The panic button: revokes every token of the buyer at once; answers how many were
    /// revoked now, or `None` for a buyer with neither an account nor a token.
    pub async fn revoke_buyer(
        &self,
        buyer_id: String,
        now: UnixMillis,
    ) -> Result<Revoked<Option<u64>>, StoreError> {
        match self {
            Store::Sqlite(store) => store.revoke_buyer(buyer_id, now).await,
            Store::Postgres(store) => store.revoke_buyer(buyer_id, now).await,
        }
    }

    /// Whether other processes may write the books too (and the revocation feed): then a
    /// watch must look at the store for revocations this process was not told of.
    pub fn is_shared(&self) -> bool {
        matches!(self, Store::Postgres(_))
    }

    /// The revocation feed after `after`: at most `limit` entries.
    pub async fn revocations_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<RevocationFeed, StoreError> {
        match self {
            Store::Sqlite(store) => store.revocations_after(after, limit).await,
            Store::Postgres(store) => store.revocations_after(after, limit).await,
        }
    }

    /// Records that `watcher` has applied the feed up to `seq` at `now`, and forgets the
    /// watchers not heard from since `forget_before`.
    pub async fn watcher_seen(
        &self,
        watcher: String,
        seq: u64,
        now: UnixMillis,
        forget_before: UnixMillis,
    ) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(store) => store.watcher_seen(watcher, seq, now, forget_before).await,
            Store::Postgres(store) => store.watcher_seen(watcher, seq, now, forget_before).await,
        }
    }

    /// The watchers heard from since `live_since`, split by whether they applied `seq`.
    pub async fn watchers(
        &self,
        seq: u64,
        live_since: UnixMillis,
    ) -> Result<GatewayConfirmations, StoreError> {
        match self {
            Store::Sqlite(store) => store.watchers(seq, live_since).await,
            Store::Postgres(store) => store.watchers(seq, live_since).await,
        }
    }

    /// The charge, once its token's holds past their TTL at `now` are released.
    pub async fn charge(
        &self,
        charge_id: String,
        now: UnixMillis,
    ) -> Result<Option<ChargeRecord>, StoreError> {
        match self {
            Store::Sqlite(store) => store.charge(charge_id, now).await,
            Store::Postgres(store) => store.charge(charge_id, now).await,
        }
    }

    pub async fn reserve(&self, command: ReserveCommand) -> Result<ReserveOutcome, StoreError> {
        match self {
            Store::Sqlite(store) => store.reserve(command).await,
            Store::Postgres(store) => store.reserve(command).await,
        }
    }

    /// Settles every hold named, one result per settlement in order; a settlement that does
    /// not fit its hold ([`crate::rules::commit_amount`]) is answered `invalid` and changes
    /// nothing.
    pub async fn settle(
        &self,
        settlements: Vec<Settlement>,
        now: UnixMillis,
    ) -> Result<Vec<SettleResult>, StoreError> {
        match self {
            Store::Sqlite(store) => store.settle(settlements, now).await,
            Store::Postgres(store) => store.settle(settlements, now).await,
        }
    }

    /// Moves the expiry of every open hold to `until` at the earliest; answers how many.
    pub async fn extend_open_holds(&self, until: UnixMillis) -> Result<usize, StoreError> {
        match self {
            Store::Sqlite(store) => store.extend_open_holds(until).await,
            Store::Postgres(store) => store.extend_open_holds(until).await,
        }
    }

    /// Counts the holds this store released on read (an operation on their buyer found them
    /// past their TTL), once each release has committed: what neither the sweeper's answer
    /// nor a settlement's `expired` reports.
    pub fn expired_on_read(&self) -> prometheus_client::metrics::counter::Counter {
        match self {
            Store::Sqlite(store) => store.expired_on_read.counter(),
            Store::Postgres(store) => store.expired_on_read.counter(),
        }
    }

    /// Releases up to `limit` holds whose TTL has passed; answers how many.
    pub async fn expire_holds(&self, now: UnixMillis, limit: usize) -> Result<usize, StoreError> {
        match self {
            Store::Sqlite(store) => store.expire_holds(now, limit).await,
            Store::Postgres(store) => store.expire_holds(now, limit).await,
        }
    }

    /// Forgets up to `limit` Idempotency-Keys recorded before `before` whose outcome is final
    /// (a refusal, or a settled charge); answers how many.
    pub async fn purge_idempotency_keys(
        &self,
        before: UnixMillis,
        limit: usize,
    ) -> Result<usize, StoreError> {
        match self {
            Store::Sqlite(store) => store.purge_idempotency_keys(before, limit).await,
            Store::Postgres(store) => store.purge_idempotency_keys(before, limit).await,
        }
    }

    /// Forgets the revocation feed's entries recorded before `before`, the last one kept;
    /// answers how many.
    pub async fn prune_revocations(&self, before: UnixMillis) -> Result<usize, StoreError> {
        match self {
            Store::Sqlite(store) => store.prune_revocations(before).await,
            Store::Postgres(store) => store.prune_revocations(before).await,
        }
    }
}

/// x402 payments and their settlement jobs.
impl Store {
    /// Records a payment when it is first taken (again: nothing changes); answers what it
    /// was first taken for, whether that was now, and where its settlement is.
    pub async fn record_x402_payment(
        &self,
        record: X402PaymentRecord,
    ) -> Result<RecordedPayment, StoreError> {
        let amount = record.amount.micros_i64();
        let valid_before = i64::try_from(record.valid_before).unwrap_or(i64::MAX);
        let X402PaymentRecord { token_id, kind, payer, network, payment, now, .. } = record;
        let kind_name = kind.name();
        let (inserted, rows) = match self {
            Store::Sqlite(store) => {
                let params = (
                    token_id.clone(),
                    kind_name,
                    payer,
                    network,
                    amount,
                    valid_before,
                    payment,
                    now,
                );
                let inserted = store.execute(sql::RECORD_X402_PAYMENT, params).await?;
                let read = |row: &rusqlite::Row<'_>| sql::recorded_payment(row);
                let rows =
                    store.read_all(sql::X402_PAYMENT_KIND, (token_id.clone(),), read).await?;
                (inserted == 1, rows)
            }
            Store::Postgres(store) => {
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 8] = [
                    &token_id,
                    &kind_name,
                    &payer,
                    &network,
                    &amount,
                    &valid_before,
                    &payment,
                    &now,
                ];
                let inserted = store.execute(sql::RECORD_X402_PAYMENT, &params).await?;
                let rows = store
                    .query(sql::X402_PAYMENT_KIND, &[&token_id], sql::recorded_payment)
                    .await?;
                (inserted == 1, rows)
            }
        };
        let (kind, settlement) = rows
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::Corrupt(format!("x402 payment {token_id} not recorded")))?;
        Ok(RecordedPayment { kind, first: inserted, settlement })
    }

    /// The settlements due at `now`, at most `limit`.
    pub async fn due_settlements(
        &self,
        now: UnixMillis,
        limit: usize,
    ) -> Result<Vec<SettlementJob>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        match self {
            Store::Sqlite(store) => {
                // On the reader: the writer is the books' bottleneck, and due jobs are claimed
                // there anyway.
                store
                    .read_all(sql::DUE_SETTLEMENTS, (now, limit), |row| sql::settlement_job(row))
                    .await
            }
            Store::Postgres(store) => {
                store.query(sql::DUE_SETTLEMENTS, &[&now, &limit], sql::settlement_job).await
            }
        }
    }

    /// The settlement of the payment `token_id`, if it was recorded.
    pub async fn settlement_job(
        &self,
        token_id: String,
    ) -> Result<Option<SettlementJob>, StoreError> {
        let jobs = match self {
            Store::Sqlite(store) => {
                let read = |row: &rusqlite::Row<'_>| sql::settlement_job(row);
                store.read_all(sql::SELECT_SETTLEMENT, (token_id,), read).await?
            }
            Store::Postgres(store) => {
                store.query(sql::SELECT_SETTLEMENT, &[&token_id], sql::settlement_job).await?
            }
        };
        Ok(jobs.into_iter().next())
    }

    /// Takes `job`, due by `now`, until `until`: false when another worker took it first,
    /// or it is not due yet.
    pub async fn claim_settlement(
        &self,
        job: &SettlementJob,
        now: UnixMillis,
        until: UnixMillis,
    ) -> Result<bool, StoreError> {
        let token_id = job.token_id.clone();
        let changed = match self {
            Store::Sqlite(store) => {
                let params = (until, token_id, job.due_at, now);
                store.execute(sql::CLAIM_SETTLEMENT, params).await? == 1
            }
            Store::Postgres(store) => {
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
                    [&until, &token_id, &job.due_at, &now];
                store.execute(sql::CLAIM_SETTLEMENT, &params).await? == 1
            }
        };
        Ok(changed)
    }

    pub async fn update_settlement(
        &self,
        token_id: String,
        update: SettlementUpdate,
        now: UnixMillis,
    ) -> Result<(), StoreError> {
        let SettlementUpdate { status, tx_hash, raw_tx, attempts, next_attempt_at, reason } =
            update;
        let status = status.name();
        let attempts = i64::from(attempts);
        match self {
            Store::Sqlite(store) => {
                let params =
                    (status, tx_hash, raw_tx, attempts, next_attempt_at, reason, now, token_id);
                store.execute(sql::UPDATE_SETTLEMENT, params).await.map(drop)
            }
            Store::Postgres(store) => store
                .execute(
                    sql::UPDATE_SETTLEMENT,
                    &[
                        &status,
                        &tx_hash,
                        &raw_tx,
                        &attempts,
                        &next_attempt_at,
                        &reason,
                        &now,
                        &token_id,
                    ],
                )
                .await
                .map(drop),
        }
    }

    /// Voids the pending payments valid before `valid_before` (Unix seconds) that no charge
    /// held or committed; answers how many.
    pub async fn void_unused_payments(
        &self,
        valid_before: u64,
        now: UnixMillis,
    ) -> Result<usize, StoreError> {
        let valid_before = i64::try_from(valid_before).unwrap_or(i64::MAX);
        match self {
            Store::Sqlite(store) => store.execute(sql::VOID_PAYMENTS, (now, valid_before)).await,
            Store::Postgres(store) => {
                let changed = store.execute(sql::VOID_PAYMENTS, &[&now, &valid_before]).await?;
                Ok(usize::try_from(changed).unwrap_or(usize::MAX))
            }
        }
    }
}

impl Store {
    /// The journal: the charges `filter` selects, at most `filter.limit + 1` of them (one
    /// more than a page says that another follows).
    pub async fn charges(&self, filter: ChargeFilter) -> Result<Vec<ChargeRecord>, StoreError> {
        match self {
            Store::Sqlite(store) => store.charges(filter).await,
            Store::Postgres(store) => store.charges(filter).await,
        }
    }

    /// A service's charge counts, revenue and refusals in a time window.
    pub async fn service_totals(&self, window: ServiceWindow) -> Result<ServiceTotals, StoreError> {
        match self {
            Store::Sqlite(store) => store.service_totals(window).await,
            Store::Postgres(store) => store.service_totals(window).await,
        }
    }
}

// Buyer keys, and the console's views of the journal.
impl Store {
    pub async fn insert_buyer_key(&self, key: NewBuyerKey) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(store) => store.insert_buyer_key(key).await,
            Store::Postgres(store) => store.insert_buyer_key(key).await,
        }
    }

    /// The buyer's keys, newest first, revoked ones included.
    pub async fn buyer_keys(&self, buyer_id: String) -> Result<Vec<BuyerKeyRecord>, StoreError> {
        match self {
            Store::Sqlite(store) => store.buyer_keys(buyer_id).await,
            Store::Postgres(store) => store.buyer_keys(buyer_id).await,
        }
    }

    /// The unrevoked key whose hash is `key_hash` (hex SHA-256).
    pub async fn live_buyer_key(
        &self,
        key_hash: String,
    ) -> Result<Option<BuyerKeyRecord>, StoreError> {
        match self {
            Store::Sqlite(store) => store.live_buyer_key(key_hash).await,
            Store::Postgres(store) => store.live_buyer_key(key_hash).await,
        }
    }

    /// Revokes the buyer's key `key_id` (once); `None` if the buyer has no such key.
    pub async fn revoke_buyer_key(
        &self,
        buyer_id: String,
        key_id: String,
        now: UnixMillis,
    ) -> Result<Option<BuyerKeyRecord>, StoreError> {
        match self {
            Store::Sqlite(store) => store.revoke_buyer_key(buyer_id, key_id, now).await,
            Store::Postgres(store) => store.revoke_buyer_key(buyer_id, key_id, now).await,
        }
    }

    /// Records that the key was presented at `now`.
    pub async fn touch_buyer_key(&self, key_id: String, now: UnixMillis) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(store) => store.touch_buyer_key(key_id, now).await,
            Store::Postgres(store) => store.touch_buyer_key(key_id, now).await,
        }
    }

    /// The services with a charge or a refusal since `since`, in no order.
    pub async fn service_ids(&self, since: UnixMillis) -> Result<Vec<String>, StoreError> {
        match self {
            Store::Sqlite(store) => store.service_ids(since).await,
            Store::Postgres(store) => store.service_ids(since).await,
        }
    }

    /// A service's totals per bucket of `width` ms from `window.from`, refusals included;
    /// buckets with neither a charge nor a refusal are left out.
    pub async fn service_series(
        &self,
        window: ServiceWindow,
        width: i64,
    ) -> Result<Vec<(i64, ServiceTotals)>, StoreError> {
        let (mut buckets, refusals) = match self {
            Store::Sqlite(store) => store.service_series(window, width).await?,
            Store::Postgres(store) => store.service_series(window, width).await?,
        };
        for (bucket, code, count) in refusals {
            let at = match buckets.binary_search_by_key(&bucket, |(b, _)| *b) {
                Ok(at) => at,
                Err(at) => {
                    buckets.insert(at, (bucket, ServiceTotals::default()));
                    at
                }
            };
            buckets[at].1.refusals.push((code, count));
        }
        Ok(buckets)
    }

    /// The tokens and the buyers that spent the most in `window`.
    pub async fn top_spenders(
        &self,
        window: SpendWindow,
    ) -> Result<(Vec<TokenSpendRecord>, Vec<(String, Usdc, u64)>), StoreError> {
        match self {
            Store::Sqlite(store) => store.top_spenders(window).await,
            Store::Postgres(store) => store.top_spenders(window).await,
        }
    }
}

/// A buyer key as stored; its hash stays in the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuyerKeyRecord {
    pub key_id: String,
    pub buyer_id: String,
    pub label: Option<String>,
    /// Empty: any service.
    pub services: Vec<String>,
    pub max_limit: Option<Usdc>,
    pub created_at: UnixMillis,
    pub last_used_at: Option<UnixMillis>,
    pub revoked_at: Option<UnixMillis>,
}

/// A buyer key to store: the record, and the hash a presented key is found by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewBuyerKey {
    pub record: BuyerKeyRecord,
    /// Hex SHA-256 of the key.
    pub key_hash: String,
}

impl NewBuyerKey {
    /// The row's parameters after the key id and buyer id: hash, label, services (JSON),
    /// cap (micro-USDC), creation time.
    fn columns(&self) -> (String, Option<String>, String, Option<i64>, UnixMillis) {
        let record = &self.record;
        (
            self.key_hash.clone(),
            record.label.clone(),
            serde_json::Value::from(record.services.clone()).to_string(),
            record.max_limit.map(Usdc::micros_i64),
            record.created_at,
        )
    }
}

/// The holds a store released on read (an operation on their buyer found them past their
/// TTL), counted once each release has committed: what neither the sweeper's answer nor a
/// settlement's `expired` reports.
#[derive(Clone, Debug, Default)]
pub(crate) struct ExpiredOnRead(prometheus_client::metrics::counter::Counter);

impl ExpiredOnRead {
    pub(crate) fn count(&self, expired: usize) {
        self.0.inc_by(u64::try_from(expired).unwrap_or(u64::MAX));
    }

    pub(crate) fn counter(&self) -> prometheus_client::metrics::counter::Counter {
        self.0.clone()
    }
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(Arc<rusqlite::Error>),
    /// A statement failed (its message comes from the server; it never holds the URL).
    #[error("PostgreSQL: {}", error_chain(&**.0))]
    Postgres(Arc<tokio_postgres::Error>),
    /// No connection could be had: the server is down, refused us, or every connection
    /// stayed busy past the pool's wait timeout.
    #[error("no PostgreSQL connection: {}", error_chain(&**.0))]
    Unavailable(Arc<deadpool_postgres::PoolError>),
    #[error("the database cannot be used: {0}")]
    Setup(String),
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error("the store has shut down")]
    Closed,
    /// An operation panicked (a bug): it was rolled back and failed alone; the store goes on.
    #[error("an operation failed on a bug: {0}")]
    Panicked(String),
}

impl StoreError {
    /// The error of an operation that panicked with `panic`.
    pub(crate) fn panicked(panic: &(dyn std::any::Any + Send)) -> StoreError {
        let message = panic
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        StoreError::Panicked(message.to_owned())
    }
}

/// An error and its causes on one line. tokio-postgres keeps the cause (the server's message,
/// the OS error) out of its errors' own text, which alone says little ("db error").
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        let more = error.to_string();
        // Some errors repeat their cause's text in their own.
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        cause = error.source();
    }
    text
}

/// What [`postgres`]'s retries need of an error: the store's error it carries.
impl AsRef<StoreError> for StoreError {
    fn as_ref(&self) -> &StoreError {
        self
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        StoreError::Database(Arc::new(e))
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> StoreError {
        StoreError::Postgres(Arc::new(e))
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> StoreError {
        StoreError::Unavailable(Arc::new(e))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChargeRecord {
    pub charge_id: String,
    pub token_id: String,
    pub buyer_id: String,
    pub service_id: String,
    /// The amount held at reserve time.
    pub held: Usdc,
    /// The amount charged, once committed (at most `held`).
    pub committed: Option<Usdc>,
    pub status: ChargeStatus,
    pub idempotency_key: Option<String>,
    pub upstream_status: Option<u16>,
    pub created_at: UnixMillis,
    pub settled_at: Option<UnixMillis>,
    /// Charged to the sandbox book (its token is a sandbox token).
    pub sandbox: bool,
    /// Paid with an x402 payment: where its settlement is.
    pub settlement: Option<PaymentSettlement>,
}

/// Where an x402 payment's settlement on chain is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SettlementStatus {
    /// Not sent yet (or its charge not committed yet).
    Pending,
    /// A transaction was signed and sent; its receipt is awaited.
    Submitted,
    Settled,
    /// It will never settle: `reason` says why.
    Failed,
    /// No call was charged for it, and none can be: nothing to settle.
    Void,
}

impl SettlementStatus {
    pub const ALL: [SettlementStatus; 5] = [
        SettlementStatus::Pending,
        SettlementStatus::Submitted,
        SettlementStatus::Settled,
        SettlementStatus::Failed,
        SettlementStatus::Void,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SettlementStatus::Pending => "pending",
            SettlementStatus::Submitted => "submitted",
            SettlementStatus::Settled => "settled",
            SettlementStatus::Failed => "failed",
            SettlementStatus::Void => "void",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PaymentSettlement {
    pub status: SettlementStatus,
    /// The transaction's hash, once one was signed.
    pub transaction: Option<String>,
    /// Why it failed, or why its last attempt did not succeed.
    pub reason: Option<String>,
}

/// What an x402 payment is taken for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PaymentKind {
    /// One call: its charge is what it pays.
    Call,
    /// A prepaid balance, and a Pay Token on it.
    TopUp,
}

impl PaymentKind {
    pub const ALL: [PaymentKind; 2] = [PaymentKind::Call, PaymentKind::TopUp];

    pub fn name(self) -> &'static str {
        match self {
            PaymentKind::Call => "call",
            PaymentKind::TopUp => "top-up",
        }
    }
}

/// A payment as it was recorded: what it was first taken for, whether that was now, and
/// where its settlement is.
#[derive(Clone, Debug)]
pub struct RecordedPayment {
    pub kind: PaymentKind,
    pub first: bool,
    pub settlement: PaymentSettlement,
}

/// An x402 payment, as the ledger records it when it is first taken.
#[derive(Clone, Debug)]
pub struct X402PaymentRecord {
    pub token_id: String,
    pub kind: PaymentKind,
    pub payer: String,
    pub network: String,
    pub amount: Usdc,
    /// Unix seconds.
    pub valid_before: u64,
    /// The presented credential (`x402v2 <header>`).
    pub payment: String,
    pub now: UnixMillis,
}

/// A settlement that is due: what its worker needs.
#[derive(Clone, Debug)]
pub struct SettlementJob {
    pub token_id: String,
    pub payment: String,
    pub status: SettlementStatus,
    pub tx_hash: Option<String>,
    /// The signed transaction, sent again (never another) until it is mined.
    pub raw_tx: Option<String>,
    pub attempts: u32,
    /// When it was due: the claim compares it.
    pub due_at: UnixMillis,
    /// Unix seconds.
    pub valid_before: u64,
    /// Why its last attempt did not settle, or why it failed.
    pub reason: Option<String>,
}

/// A settlement's new state.
#[derive(Clone, Debug)]
pub struct SettlementUpdate {
    pub status: SettlementStatus,
    pub tx_hash: Option<String>,
    pub raw_tx: Option<String>,
    pub attempts: u32,
    pub next_attempt_at: UnixMillis,
    pub reason: Option<String>,
}

/// A buyer as the admin API shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuyerRecord {
    pub account: Option<Account>,
    pub tokens: Vec<TokenRecord>,
}

/// A deposit to make.
#[derive(Clone, Debug)]
pub struct DepositCommand {
    /// A fresh id, used if the deposit is made.
    pub deposit_id: String,
    pub buyer_id: String,
    pub amount: Usdc,
    pub reference: Option<String>,
    pub now: UnixMillis,
}

impl DepositCommand {
    /// The deposit's answer on `account`, `prior` being the deposit made earlier under its
    /// reference (id, amount, when). A record not `replayed` is a credit, which the store
    /// then writes: the balance becomes `balance`, and the deposit is inserted.
    fn record(
        &self,
        account: &Account,
        prior: Option<(String, Usdc, UnixMillis)>,
    ) -> Result<Result<DepositRecord, Refusal>, StoreError> {
        Ok(match rules::deposit(account, self.amount, prior.as_ref().map(|p| p.1)) {
            Err(refusal) => Err(refusal),
            Ok(DepositDecision::Replay) => {
                let (deposit_id, amount, created_at) = prior.ok_or_else(|| {
                    StoreError::Corrupt("a replay without a prior deposit".into())
                })?;
                let balance = account.balance;
                Ok(DepositRecord { deposit_id, amount, created_at, balance, replayed: true })
            }
            Ok(DepositDecision::Credit { balance }) => Ok(DepositRecord {
                deposit_id: self.deposit_id.clone(),
                amount: self.amount,
                created_at: self.now,
                balance,
                replayed: false,
            }),
        })
    }
}

/// A deposit made (now, or earlier under the same reference), and the balance after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DepositRecord {
    pub deposit_id: String,
    pub amount: Usdc,
    pub created_at: UnixMillis,
    pub balance: Usdc,
    pub replayed: bool,
}

/// One call's reservation, as the ledger service prepared it.
#[derive(Clone, Debug)]
pub struct ReserveCommand {
    /// A fresh id for the hold, used if one is created.
    pub charge_id: String,
    /// Fresh ids for the extra holds asked for (`count - 1` of them), used as far as they
    /// are granted ([`crate::rules::extra_holds`]).
    pub extra_charge_ids: Vec<String>,
    /// When the gateway stops waiting for the answer (Unix ms, wall clock): extras decided
    /// later are not granted. Judged when the store decides, after any wait in its queue.
    pub extras_until: Option<u64>,
    pub token: TokenGrant,
    pub service_id: String,
    pub price: Usdc,
    pub idempotency: Option<Idempotency>,
    /// A lower limit the credential states for itself (see `ReserveRequest::cap_usdc`).
    pub cap: Option<Usdc>,
    pub now: UnixMillis,
    pub hold_expires_at: UnixMillis,
    /// How often a committed charge may be replayed under its Idempotency-Key.
    pub max_replays: u32,
    pub daily_limits: Arc<DailyLimits>,
}

impl ReserveCommand {
    /// The call the rules judge. A cap the credential states only lowers the token's limit.
    pub fn call(&self) -> Call<'_> {
        Call {
            service_id: &self.service_id,
            price: self.price,
            fingerprint: self.idempotency.as_ref().map(|i| i.fingerprint.as_str()),
            cap: self.token.limit_usdc.min(self.cap.unwrap_or(Usdc::MAX)),
        }
    }

    /// The holds to place, the first having left `remaining`: the extras the rules grant.
    pub fn holds(&self, books: &Books<'_>, remaining: Usdc) -> Holds<'_> {
        let late = self
            .extras_until
            .is_some_and(|until| u64::try_from(crate::ledger::now_millis()).unwrap_or(0) > until);
        let wanted =
            if late { 0 } else { u16::try_from(self.extra_charge_ids.len()).unwrap_or(u16::MAX) };
        let granted = rules::extra_holds(books, &self.call(), remaining, wanted);
        let extra_ids = self.extra_charge_ids.get(..usize::from(granted)).unwrap_or_default();
        // Within `remaining`, itself within the token's limit: these never overflow.
        let extra = self.price.checked_mul(u64::from(granted)).unwrap_or(Usdc::MAX);
        Holds {
            extra_ids,
            total: self.price.checked_add(extra).unwrap_or(Usdc::MAX),
            remaining: remaining.saturating_sub(extra),
        }
    }
}

impl ReserveCommand {
    /// What this reserve does once its `books` and its key's `prior` use are read: the
    /// decision every dialect takes alike, and then writes.
    fn step(
        &self,
        books: &Books<'_>,
        prior: Option<PriorKey>,
    ) -> Result<ReserveStep<'_>, StoreError> {
        let used = prior_use(&prior);
        Ok(match rules::admit_books(books, &self.call(), used, self.max_replays) {
            Err(refusal) => {
                let key =
                    self.idempotency.as_ref().filter(|_| rules::records_refusal(&refusal, used));
                ReserveStep::Refuse { refusal, key }
            }
            Ok(Admission::ReplayRefusal) => match prior.map(|prior| prior.outcome) {
                Some(KeyOutcome::Refused(refusal)) => ReserveStep::RefuseAgain(refusal),
                _ => return Err(StoreError::Corrupt("a refusal replay without a refusal".into())),
            },
            Ok(Admission::Replay) => match (prior.map(|prior| prior.outcome), &self.idempotency) {
                (Some(KeyOutcome::Charge { charge_id, .. }), Some(idempotency)) => {
                    ReserveStep::Replay { charge_id, key: &idempotency.key }
                }
                _ => return Err(StoreError::Corrupt("a replay without a prior charge".into())),
            },
            Ok(Admission::Hold { remaining }) => ReserveStep::Hold {
                holds: self.holds(books, remaining),
                on_account: books.debited_account().is_some(),
            },
        })
    }

    /// The holds to insert, each with its Idempotency-Key: the first carries the call's, if
    /// any; extras (never with a key) are ordinary holds of the same call shape.
    fn hold_rows<'a>(
        &'a self,
        holds: &Holds<'a>,
    ) -> impl Iterator<Item = (&'a str, Option<&'a str>)> + 'a {
        let key = self.idempotency.as_ref().map(|i| i.key.as_str());
        std::iter::once((self.charge_id.as_str(), key))
            .chain(holds.extra_ids.iter().map(|id| (id.as_str(), None)))
    }

    /// The answer once `holds` are placed.
    fn held(&self, holds: &Holds<'_>) -> ReserveOutcome {
        ReserveOutcome::Held(Hold {
            charge_id: self.charge_id.clone(),
            amount_usdc: self.price,
            remaining_usdc: holds.remaining,
            replayed: false,
            extra_charge_ids: holds.extra_ids.to_vec(),
            transaction: None,
        })
    }
}

/// A replay's answer: the key's `first` charge, and what the `chain` has left.
fn replayed(first: ChargeRecord, chain: &[TokenRecord]) -> ReserveOutcome {
    ReserveOutcome::Held(Hold {
        amount_usdc: first.committed.unwrap_or(first.held),
        charge_id: first.charge_id,
        remaining_usdc: rules::chain_remaining(chain),
        replayed: true,
        extra_charge_ids: Vec::new(),
        transaction: None,
    })
}

/// What a reserve writes, as [`ReserveCommand::step`] decided it.
enum ReserveStep<'a> {
    /// A fresh refusal: counted for the journal, and kept under `key` if given.
    Refuse { refusal: Refusal, key: Option<&'a Idempotency> },
    /// The refusal the key recorded, answered again: nothing is written.
    RefuseAgain(Refusal),
    /// A retry of a charged request: one more replay of the key, answered with its charge.
    Replay { charge_id: String, key: &'a str },
    /// The holds to place, on the buyer's account too when `on_account`.
    Hold { holds: Holds<'a>, on_account: bool },
}

/// The holds a reserve places once its first one is admitted.
pub struct Holds<'a> {
    /// The extra holds' ids.
    pub extra_ids: &'a [String],
    /// What all of them hold together, the first included.
    pub total: Usdc,
    /// What the token's chain has left once they are held.
    pub remaining: Usdc,
}

/// An Idempotency-Key's earlier use, as a store reads it.
#[derive(Clone, Debug)]
pub struct PriorKey {
    pub fingerprint: String,
    pub replays: u32,
    pub outcome: KeyOutcome,
}

/// What an Idempotency-Key keeps: one of its charge, or the refusal its request got.
#[derive(Clone, Debug)]
pub enum KeyOutcome {
    Charge { charge_id: String, status: ChargeStatus },
    Refused(Refusal),
}

impl PriorKey {
    /// Reads a key as [`sql::PRIOR_KEY`] selects it: the charge (id and status) or the
    /// refusal it keeps.
    fn read(row: &impl sql::Columns) -> Result<PriorKey, StoreError> {
        let charge = match row.opt_text(2)? {
            Some(charge_id) => Some((charge_id, sql::charge_status(row, 3)?)),
            None => None,
        };
        let outcome = match (charge, row.opt_text(4)?) {
            (Some((charge_id, status)), None) => KeyOutcome::Charge { charge_id, status },
            (None, Some(code)) => KeyOutcome::Refused(KeptRefusal::read(row, code, 5)?),
            _ => return Err(StoreError::Corrupt("an idempotency key keeps no outcome".into())),
        };
        Ok(PriorKey { fingerprint: row.text(0)?, replays: sql::small(row, 1, "replays")?, outcome })
    }
}

/// What the rules need of a [`PriorKey`].
pub fn prior_use(prior: &Option<PriorKey>) -> Option<PriorUse<'_>> {
    prior.as_ref().map(|prior| PriorUse {
        fingerprint: &prior.fingerprint,
        outcome: match &prior.outcome {
            KeyOutcome::Charge { status, .. } => PriorOutcome::Charge(*status),
            KeyOutcome::Refused(_) => PriorOutcome::Refused,
        },
        replays: prior.replays,
    })
}

/// A refusal as an Idempotency-Key keeps it: its code, and the amounts its answer needs
/// (micro-USDC), in the order of `refusal_columns!`.
struct KeptRefusal {
    code: &'static str,
    price: Option<i64>,
    limit: Option<i64>,
    used: Option<i64>,
    reserved: Option<i64>,
    available: Option<i64>,
    tier: Option<i32>,
}

impl KeptRefusal {
    /// The columns of `refusal`; only the refusals of a request are kept
    /// ([`rules::records_refusal`]).
    fn of(refusal: &Refusal) -> Result<KeptRefusal, StoreError> {
        let code = |code| KeptRefusal {
            code,
            price: None,
            limit: None,
            used: None,
            reserved: None,
            available: None,
            tier: None,
        };
        let micros = |amount: &Usdc| Some(amount.micros_i64());
        Ok(match refusal {
            Refusal::TokenRevoked => code("token_revoked"),
            Refusal::WrongService => code("wrong_service"),
            Refusal::NoToken => code("internal"),
            Refusal::TokenLimitExceeded { used, reserved, limit, price } => KeptRefusal {
                price: micros(price),
                limit: micros(limit),
                used: micros(used),
                reserved: micros(reserved),
                ..code("token_limit_exceeded")
            },
            Refusal::InsufficientBalance { available, price } => KeptRefusal {
                price: micros(price),
                available: micros(available),
                ..code("insufficient_balance")
            },
            Refusal::DailyLimitExceeded { limit, tier, used, price } => KeptRefusal {
                price: micros(price),
                limit: micros(limit),
                used: micros(used),
                tier: Some(i32::try_from(*tier).map_err(|_| sql::corrupt("tier", tier))?),
                ..code("daily_limit_exceeded")
            },
            other => {
                return Err(StoreError::Corrupt(format!("cannot keep the refusal {other:?}")));
            }
        })
    }

    /// The refusal kept as `code`, its amounts in the columns from `first` on.
    fn read(row: &impl sql::Columns, code: String, first: usize) -> Result<Refusal, StoreError> {
        let amount = |offset: usize| {
            let index = first + offset;
            match row.opt_int(index)? {
                Some(_) => sql::usdc(row, index),
                None => Err(StoreError::Corrupt(format!("a kept {code} lacks an amount"))),
            }
        };
        Ok(match code.as_str() {
            "token_revoked" => Refusal::TokenRevoked,
            "wrong_service" => Refusal::WrongService,
            "internal" => Refusal::NoToken,
            "token_limit_exceeded" => Refusal::TokenLimitExceeded {
                price: amount(0)?,
                limit: amount(1)?,
                used: amount(2)?,
                reserved: amount(3)?,
            },
            "insufficient_balance" => {
                Refusal::InsufficientBalance { price: amount(0)?, available: amount(4)? }
            }
            "daily_limit_exceeded" => Refusal::DailyLimitExceeded {
                price: amount(0)?,
                limit: amount(1)?,
                used: amount(2)?,
                tier: sql::small(row, first + 5, "tier")?,
            },
            _ => return Err(sql::corrupt("kept refusal", code)),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReserveOutcome {
    Held(Hold),
    Refused(Refusal),
    /// The refusal an Idempotency-Key recorded, answered again: no new refusal (the journal
    /// and the metrics count it once, when it was first refused).
    RefusedAgain(Refusal),
}

/// The tier of an account opened by a deposit.
pub const FIRST_TIER: u32 = 1;

/// Orders `tokens` (read by id) into the chain from `token_id` up to its root; `tokens` must
/// hold the whole chain.
fn into_chain(
    mut tokens: HashMap<String, TokenRecord>,
    token_id: &str,
) -> Result<Vec<TokenRecord>, StoreError> {
    let mut chain = Vec::with_capacity(tokens.len());
    let mut next = Some(token_id.to_owned());
    while let Some(id) = next {
        if chain.len() == MAX_CHAIN_LEN {
            return Err(StoreError::Corrupt(format!("the chain of {token_id} is too long")));
        }
        let token = tokens
            .remove(&id)
            .ok_or_else(|| StoreError::Corrupt(format!("token {id} of a chain is missing")))?;
        next = token.parent_id.clone();
        chain.push(token);
    }
    Ok(chain)
}

/// How a charge status is written in `charges.status` (both schemas' CHECKs list the same).
fn status_name(status: ChargeStatus) -> &'static str {
    match status {
        ChargeStatus::Held => "held",
        ChargeStatus::Committed => "committed",
        ChargeStatus::Released => "released",
    }
}

const ALL_STATUSES: [ChargeStatus; 3] =
    [ChargeStatus::Held, ChargeStatus::Committed, ChargeStatus::Released];

/// How a scope is written in `tokens.scope`.
fn scope_name(scope: Scope) -> &'static str {
    match scope {
        Scope::Single => "SINGLE",
        Scope::All => "ALL",
    }
}

const ALL_SCOPES: [Scope; 2] = [Scope::Single, Scope::All];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_feed_answer_never_moves_a_watcher_past_entries_it_did_not_see() {
        let entries = vec![(7, "tok_a".to_owned()), (8, "tok_b".to_owned())];
        let answer = feed(5, entries, 8);
        assert_eq!((answer.seq, answer.token_ids), (8, vec!["tok_a".into(), "tok_b".into()]));
        // No entries past 5 were read, but entry 6 committed before the head was: the
        // watcher stays at 5 and its next poll gets entry 6.
        assert_eq!(feed(5, Vec::new(), 6).seq, 5);
        // A head behind the watcher: the feed started over.
        assert_eq!(feed(12, Vec::new(), 3).seq, 3);
        // A new watcher (no position) starts at the head.
        assert_eq!(feed(u64::MAX, Vec::new(), 9).seq, 9);
    }
}
