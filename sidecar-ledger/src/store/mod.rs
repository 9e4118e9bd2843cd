//! Durable state: tokens, charges (holds and their outcome) and Idempotency-Keys.
//!
//! Each operation is one atomic transaction that applies [`crate::rules`], so every store
//! keeps the same semantics. [`Store`] is the one the ledger runs on, chosen by the database
//! URL: SQLite, embedded in WAL mode with group commit, by default.

mod sqlite;

use std::sync::Arc;

use paystile_protocol::ledger_api::{
    ChargeStatus, Hold, Idempotency, SettleResult, Settlement, TokenGrant,
};
use paystile_protocol::{ErrorBody, Usdc};

pub use sqlite::SqliteStore;

use crate::settings::Database;

/// The ledger's store; every operation is one atomic transaction.
#[derive(Clone)]
pub enum Store {
    Sqlite(SqliteStore),
}

impl Store {
    /// Opens the database `database` names, bringing its schema up to date.
    pub async fn open(database: &Database) -> Result<Store, StoreError> {
        match database {
            Database::Sqlite(path) => Ok(Store::Sqlite(SqliteStore::open(path)?)),
        }
    }

    pub async fn insert_token(&self, token: TokenGrant, now: UnixMillis) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(store) => store.insert_token(token, now).await,
        }
    }

    pub async fn token(&self, token_id: String) -> Result<Option<TokenRecord>, StoreError> {
        match self {
            Store::Sqlite(store) => store.token(token_id).await,
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
        }
    }

    pub async fn charge(&self, charge_id: String) -> Result<Option<ChargeRecord>, StoreError> {
        match self {
            Store::Sqlite(store) => store.charge(charge_id).await,
        }
    }

    pub async fn reserve(&self, command: ReserveCommand) -> Result<ReserveOutcome, StoreError> {
        match self {
            Store::Sqlite(store) => store.reserve(command).await,
        }
    }

    pub async fn settle(
        &self,
        settlements: Vec<Settlement>,
        now: UnixMillis,
    ) -> Result<Vec<SettleResult>, StoreError> {
        match self {
            Store::Sqlite(store) => store.settle(settlements, now).await,
        }
    }

    /// Moves the expiry of every open hold to `until` at the earliest; answers how many.
    pub async fn extend_open_holds(&self, until: UnixMillis) -> Result<usize, StoreError> {
        match self {
            Store::Sqlite(store) => store.extend_open_holds(until).await,
        }
    }

    /// Releases up to `limit` holds whose TTL has passed; answers how many.
    pub async fn expire_holds(&self, now: UnixMillis, limit: usize) -> Result<usize, StoreError> {
        match self {
            Store::Sqlite(store) => store.expire_holds(now, limit).await,
        }
    }
}

/// Milliseconds since the Unix epoch: every timestamp the stores keep.
pub type UnixMillis = i64;

#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(Arc<rusqlite::Error>),
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error("the store has shut down")]
    Closed,
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        StoreError::Database(Arc::new(e))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRecord {
    pub grant: TokenGrant,
    pub used: Usdc,
    pub reserved: Usdc,
    pub revoked: bool,
}

impl TokenRecord {
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
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReserveOutcome {
    Held(Hold),
    Refused(ErrorBody),
}
