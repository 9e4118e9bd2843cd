//! Durable state: tokens, charges (holds and their outcome) and Idempotency-Keys.
//!
//! Each operation is one atomic transaction that applies [`crate::rules`]. SQLite, embedded
//! in WAL mode with group commit, is the store today.

mod sqlite;

use std::sync::Arc;

use paystile_protocol::ledger_api::{ChargeStatus, Hold, Idempotency, TokenGrant};
use paystile_protocol::{ErrorBody, Usdc};

pub use sqlite::SqliteStore;

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
