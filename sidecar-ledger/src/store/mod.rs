//! Durable state: tokens (and their chains of delegation), charges (holds and their outcome),
//! Idempotency-Keys, and buyers' prepaid accounts with their deposits.
//!
//! Each operation is one atomic transaction that applies [`crate::rules`], so every store
//! keeps the same semantics. [`Store`] is the one the ledger runs on, chosen by the database
//! URL: SQLite, embedded in WAL mode with group commit, by default; PostgreSQL for ledgers
//! that share their books.

mod postgres;
mod sqlite;

use std::collections::HashMap;
use std::sync::Arc;

use paystile_protocol::ledger_api::{
    ChargeStatus, Hold, Idempotency, SettleResult, Settlement, TokenGrant,
};
use paystile_protocol::pay_token::Scope;
use paystile_protocol::{ErrorBody, Usdc};

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

use crate::rules::{Account, Call, ChildSpec, DailyLimits, MAX_CHAIN_LEN, PriorUse};
use crate::settings::Database;

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

    pub async fn token(&self, token_id: String) -> Result<Option<TokenRecord>, StoreError> {
        match self {
            Store::Sqlite(store) => store.token(token_id).await,
            Store::Postgres(store) => store.token(token_id).await,
        }
    }

    /// Revokes the token; an unknown one is registered as `unknown` first, if given.
    pub async fn revoke_token(
        &self,
        token_id: String,
        unknown: Option<TokenGrant>,
        now: UnixMillis,
    ) -> Result<Option<TokenRecord>, StoreError> {
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
    ) -> Result<Option<Result<TokenRecord, ErrorBody>>, StoreError> {
        match self {
            Store::Sqlite(store) => store.mint_child(parent_id, spec, now).await,
            Store::Postgres(store) => store.mint_child(parent_id, spec, now).await,
        }
    }

    /// Credits a buyer's account, opening it if needed ([`crate::rules::deposit`]).
    pub async fn deposit(
        &self,
        command: DepositCommand,
    ) -> Result<Result<DepositRecord, ErrorBody>, StoreError> {
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

    /// A buyer's account, if any, and tokens (oldest first).
    pub async fn buyer(&self, buyer_id: String) -> Result<BuyerRecord, StoreError> {
        match self {
            Store::Sqlite(store) => store.buyer(buyer_id).await,
            Store::Postgres(store) => store.buyer(buyer_id).await,
        }
    }

    /// The panic button: revokes every token of the buyer at once; answers how many were
    /// revoked now, or `None` for a buyer with neither an account nor a token.
    pub async fn revoke_buyer(
        &self,
        buyer_id: String,
        now: UnixMillis,
    ) -> Result<Option<u64>, StoreError> {
        match self {
            Store::Sqlite(store) => store.revoke_buyer(buyer_id, now).await,
            Store::Postgres(store) => store.revoke_buyer(buyer_id, now).await,
        }
    }

    pub async fn charge(&self, charge_id: String) -> Result<Option<ChargeRecord>, StoreError> {
        match self {
            Store::Sqlite(store) => store.charge(charge_id).await,
            Store::Postgres(store) => store.charge(charge_id).await,
        }
    }

    pub async fn reserve(&self, command: ReserveCommand) -> Result<ReserveOutcome, StoreError> {
        match self {
            Store::Sqlite(store) => store.reserve(command).await,
            Store::Postgres(store) => store.reserve(command).await,
        }
    }

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

    /// Releases up to `limit` holds whose TTL has passed; answers how many.
    pub async fn expire_holds(&self, now: UnixMillis, limit: usize) -> Result<usize, StoreError> {
        match self {
            Store::Sqlite(store) => store.expire_holds(now, limit).await,
            Store::Postgres(store) => store.expire_holds(now, limit).await,
        }
    }
}

/// Milliseconds since the Unix epoch: every timestamp the stores keep.
pub type UnixMillis = i64;

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
pub struct TokenRecord {
    pub grant: TokenGrant,
    pub used: Usdc,
    pub reserved: Usdc,
    pub revoked: bool,
    /// The token it was minted under, for a child token.
    pub parent_id: Option<String>,
}

impl TokenRecord {
    /// A token as first registered: nothing spent.
    pub fn new(grant: TokenGrant) -> TokenRecord {
        TokenRecord {
            grant,
            used: Usdc::ZERO,
            reserved: Usdc::ZERO,
            revoked: false,
            parent_id: None,
        }
    }

    /// What is left for new calls: the limit minus everything spent or on hold.
    pub fn remaining(&self) -> Usdc {
        self.grant.limit_usdc.saturating_sub(self.used).saturating_sub(self.reserved)
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
    pub status: ChargeStatus,
    pub idempotency_key: Option<String>,
    pub upstream_status: Option<u16>,
    pub created_at: UnixMillis,
    pub settled_at: Option<UnixMillis>,
    /// Charged to the sandbox book (its token is a sandbox token).
    pub sandbox: bool,
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
}

/// An Idempotency-Key's earlier use as a store reads it: fingerprint, charge id, the
/// charge's status, replays so far.
pub type PriorKey = (String, String, ChargeStatus, u32);

/// What the rules need of a [`PriorKey`].
pub fn prior_use(prior: &Option<PriorKey>) -> Option<PriorUse<'_>> {
    prior.as_ref().map(|(fingerprint, _, charge, replays)| PriorUse {
        fingerprint,
        charge: *charge,
        replays: *replays,
    })
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReserveOutcome {
    Held(Hold),
    Refused(ErrorBody),
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

/// A token's expiry (Unix seconds) as the stores keep it (Unix ms).
fn seconds_to_millis(seconds: u64) -> Result<UnixMillis, StoreError> {
    i64::try_from(seconds)
        .ok()
        .and_then(|s| s.checked_mul(1000))
        .ok_or_else(|| StoreError::Corrupt(format!("time {seconds} is out of range")))
}
