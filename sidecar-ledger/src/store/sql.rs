//! What both dialects share of their statements: the SQL text, written once, and the readers
//! of the rows it answers.
//!
//! Placeholders are PostgreSQL's `$n`. SQLite takes `$1` as a parameter named "$1" and
//! numbers named parameters in the order they first appear, so `$n` binds positionally there
//! too as long as `$1, $2, …` first appear in that order: every statement here does (a test
//! checks it against SQLite's own numbering).

use paystile_protocol::Usdc;
use paystile_protocol::ledger_api::{ChargeStatus, TokenGrant};
use paystile_protocol::pay_token::Scope;

use super::{
    ALL_SCOPES, ALL_STATUSES, BuyerKeyRecord, ChargeRecord, PaymentKind, PaymentSettlement,
    SettlementJob, SettlementStatus, StoreError, TokenRecord, UnixMillis, scope_name, status_name,
};
use crate::rules::Account;

/// The columns [`token_record`] reads.
macro_rules! select_token {
    () => {
        "SELECT token_id, buyer_id, buyer_tag, service_id, scope, limit_micros, expires_at,
                used_micros, reserved_micros, revoked_at IS NOT NULL, parent_id, sandbox
         FROM tokens"
    };
}
pub(super) use select_token;

macro_rules! insert_token {
    () => {
        "INSERT INTO tokens (token_id, buyer_id, buyer_tag, service_id, scope, limit_micros,
                             expires_at, created_at, parent_id, sandbox)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
    };
}
pub(super) use insert_token;

/// The columns [`account`] reads.
macro_rules! select_account {
    () => {
        "SELECT balance_micros, held_micros, tier, spent_day, spent_micros
         FROM buyers WHERE buyer_id = $1"
    };
}
pub(super) use select_account;

/// The token `$1` and its descendants.
macro_rules! subtree {
    () => {
        "WITH RECURSIVE tree (token_id) AS (
             SELECT token_id FROM tokens WHERE token_id = $1
             UNION ALL
             SELECT t.token_id FROM tokens t JOIN tree ON t.parent_id = tree.token_id
         )"
    };
}
pub(super) use subtree;

/// The columns of a charge (from [`charges_joined`]) [`charge_record`] reads, in order.
macro_rules! charge_columns {
    () => {
        "c.charge_id, c.token_id, t.buyer_id, c.service_id, c.held_micros, c.status, \
         c.idempotency_key, c.upstream_status, c.created_at, c.settled_at, c.committed_micros, \
         t.sandbox, p.status, p.tx_hash, p.reason"
    };
}
pub(super) use charge_columns;

/// A charge with its token, and its x402 payment's settlement if it was paid so.
macro_rules! charges_joined {
    () => {
        "charges c JOIN tokens t ON t.token_id = c.token_id \
         LEFT JOIN x402_payments p ON p.token_id = c.token_id"
    };
}
pub(super) use charges_joined;

/// A refusal's columns in `idempotency_keys`, in the order [`KeptRefusal`](super::KeptRefusal)
/// reads and writes them.
macro_rules! refusal_columns {
    () => {
        "refusal_code, refusal_price_micros, refusal_limit_micros, refusal_used_micros,
         refusal_reserved_micros, refusal_available_micros, refusal_tier"
    };
}

/// The columns [`buyer_key`] reads.
macro_rules! select_buyer_key {
    () => {
        "SELECT key_id, buyer_id, label, services, max_limit_micros, created_at, last_used_at,
                revoked_at
         FROM buyer_keys"
    };
}

pub(super) const INSERT_BUYER_KEY: &str = "INSERT INTO buyer_keys
    (key_id, buyer_id, key_hash, label, services, max_limit_micros, created_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7)";
pub(super) const SELECT_BUYER_KEYS: &str =
    concat!(select_buyer_key!(), " WHERE buyer_id = $1 ORDER BY created_at DESC, key_id DESC");
pub(super) const SELECT_BUYER_KEY: &str =
    concat!(select_buyer_key!(), " WHERE key_id = $1 AND buyer_id = $2");
/// The key a presented one hashes to, unless revoked.
pub(super) const SELECT_LIVE_BUYER_KEY: &str =
    concat!(select_buyer_key!(), " WHERE key_hash = $1 AND revoked_at IS NULL");
/// Revokes once: a second revoke keeps the first time.
pub(super) const REVOKE_BUYER_KEY: &str = "UPDATE buyer_keys
    SET revoked_at = coalesce(revoked_at, $1) WHERE key_id = $2 AND buyer_id = $3";
pub(super) const TOUCH_BUYER_KEY: &str =
    "UPDATE buyer_keys SET last_used_at = $1 WHERE key_id = $2";

pub(super) const SELECT_TOKEN: &str = concat!(select_token!(), " WHERE token_id = $1");
pub(super) const SELECT_BUYER_TOKENS: &str =
    concat!(select_token!(), " WHERE buyer_id = $1 ORDER BY created_at, token_id");
pub(super) const INSERT_TOKEN: &str = insert_token!();
/// Revokes the token `$1` and its descendants at `$2`: a parent's revocation ends its
/// delegations. A second revoke keeps the first time.
pub(super) const REVOKE_SUBTREE: &str = concat!(
    subtree!(),
    " UPDATE tokens SET revoked_at = coalesce(revoked_at, $2)
     WHERE token_id IN (SELECT token_id FROM tree)"
);
pub(super) const REVOKE_BUYER: &str =
    "UPDATE tokens SET revoked_at = $1 WHERE buyer_id = $2 AND revoked_at IS NULL";
/// The feed entries of a token `$1` revoked at `$2`: it and each descendant with open holds
/// (what gateway VMs may have prefetched). The holds stay open until settled or expired;
/// none can commit any more.
pub(super) const FEED_SUBTREE: &str = concat!(
    subtree!(),
    " INSERT INTO revocations (token_id, revoked_at)
     SELECT DISTINCT token_id, CAST($2 AS BIGINT) FROM charges
     WHERE status = 'held' AND token_id IN (SELECT token_id FROM tree)"
);
/// The feed entries of the buyer `$2`'s tokens revoked at `$1`: those with open holds.
pub(super) const FEED_BUYER: &str = "INSERT INTO revocations (token_id, revoked_at)
     SELECT DISTINCT c.token_id, CAST($1 AS BIGINT) FROM charges c
     JOIN tokens t ON t.token_id = c.token_id
     WHERE c.status = 'held' AND t.buyer_id = $2";
pub(super) const FEED_HEAD: &str = "SELECT coalesce(max(seq), 0) FROM revocations";
/// Forgets the feed entries recorded before `$1`, but never the last one: it is the feed's
/// head, and a head that went back would tell every watcher that the feed started over.
pub(super) const PRUNE_FEED: &str = "DELETE FROM revocations
     WHERE revoked_at < $1 AND seq < (SELECT max(seq) FROM revocations)";
pub(super) const FEED_AFTER: &str =
    "SELECT seq, token_id FROM revocations WHERE seq > $1 ORDER BY seq LIMIT $2";
/// A watcher `$1` has applied the feed up to `$2`, at `$3`.
pub(super) const WATCHER_SEEN: &str = "INSERT INTO watchers (watcher_id, seen_seq, seen_at)
     VALUES ($1, $2, $3)
     ON CONFLICT (watcher_id) DO UPDATE SET seen_seq = excluded.seen_seq, seen_at = excluded.seen_at";
/// Forgets watchers that have not asked since `$1`: gateway VMs that went away.
pub(super) const WATCHERS_GONE: &str = "DELETE FROM watchers WHERE seen_at < $1";
/// The watchers that asked since `$2`, and whether each has applied the feed up to `$1`.
pub(super) const WATCHERS_LIVE: &str = "SELECT watcher_id, seen_seq >= $1 FROM watchers
     WHERE seen_at >= $2 ORDER BY watcher_id";

/// Whether the buyer `$1` has an account or a token.
pub(super) const BUYER_KNOWN: &str = "SELECT 1 FROM buyers WHERE buyer_id = $1
     UNION ALL SELECT 1 FROM tokens WHERE buyer_id = $1 LIMIT 1";

pub(super) const SELECT_ACCOUNT: &str = select_account!();
/// Opens the account `$1` at tier `$2` unless it exists.
pub(super) const OPEN_ACCOUNT: &str = "INSERT INTO buyers (buyer_id, tier, created_at)
     VALUES ($1, $2, $3) ON CONFLICT (buyer_id) DO NOTHING";
pub(super) const SET_TIER: &str = "INSERT INTO buyers (buyer_id, tier, created_at)
     VALUES ($1, $2, $3) ON CONFLICT (buyer_id) DO UPDATE SET tier = excluded.tier";
pub(super) const SET_BALANCE: &str = "UPDATE buyers SET balance_micros = $1 WHERE buyer_id = $2";
/// The deposit of buyer `$1` under reference `$2`, as [`prior_deposit`] reads it.
pub(super) const PRIOR_DEPOSIT: &str = "SELECT deposit_id, amount_micros, created_at FROM deposits
     WHERE buyer_id = $1 AND reference = $2";
pub(super) const INSERT_DEPOSIT: &str =
    "INSERT INTO deposits (deposit_id, buyer_id, amount_micros, reference, created_at)
     VALUES ($1, $2, $3, $4, $5)";

pub(super) const SELECT_CHARGE: &str =
    concat!("SELECT ", charge_columns!(), " FROM ", charges_joined!(), " WHERE c.charge_id = $1");

/// An x402 payment, recorded when it is first reserved; again, nothing changes.
pub(super) const RECORD_X402_PAYMENT: &str = "INSERT INTO x402_payments
         (token_id, kind, payer, network, amount_micros, valid_before, payment, status,
          next_attempt_at, created_at, updated_at)
     VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending', $8, $8, $8)
     ON CONFLICT (token_id) DO NOTHING";
/// What the payment `$1` was first taken for, and where its settlement is.
pub(super) const X402_PAYMENT_KIND: &str =
    "SELECT kind, status, tx_hash, reason FROM x402_payments WHERE token_id = $1";
/// The settlements due at `$1` (as [`settlement_job`] reads them), oldest first, at most
/// `$2`: those of payments a committed charge was paid with, and every transaction sent (a
/// settlement whose caller stopped waiting is followed to its end all the same).
pub(super) const DUE_SETTLEMENTS: &str = "SELECT p.token_id, p.payment, p.status, p.tx_hash,
         p.raw_tx, p.attempts, p.next_attempt_at, p.valid_before, p.reason
     FROM x402_payments p
     WHERE (p.status = 'pending' OR p.status = 'submitted') AND p.next_attempt_at <= $1
       AND (p.status = 'submitted'
            OR EXISTS (SELECT 1 FROM charges c
                       WHERE c.token_id = p.token_id AND c.status = 'committed'))
     ORDER BY p.next_attempt_at LIMIT $2";
/// The settlement of the payment `$1`, as [`settlement_job`] reads it.
pub(super) const SELECT_SETTLEMENT: &str = "SELECT p.token_id, p.payment, p.status, p.tx_hash,
         p.raw_tx, p.attempts, p.next_attempt_at, p.valid_before, p.reason
     FROM x402_payments p WHERE p.token_id = $1";
/// Takes the settlement of `$2`, seen due at `$3` and due by `$4` (now), until `$1`: another
/// worker (a ledger on the same database) that saw it due too finds it changed, and leaves
/// it; one that finds it taken (due later) leaves it too.
pub(super) const CLAIM_SETTLEMENT: &str = "UPDATE x402_payments SET next_attempt_at = $1
     WHERE token_id = $2 AND next_attempt_at = $3 AND next_attempt_at <= $4
       AND (status = 'pending' OR status = 'submitted')";
/// The settlement of `$8` is now as the other parameters say, unless it is final already
/// (a late write never undoes a settled or failed one).
pub(super) const UPDATE_SETTLEMENT: &str = "UPDATE x402_payments
     SET status = $1, tx_hash = $2, raw_tx = $3, attempts = $4, next_attempt_at = $5,
         reason = $6, updated_at = $7
     WHERE token_id = $8 AND (status = 'pending' OR status = 'submitted')";
/// Payments valid before `$2` (Unix seconds) that no charge held or committed: no call was
/// charged for them and none can be now. `$1`: now.
pub(super) const VOID_PAYMENTS: &str = "UPDATE x402_payments SET status = 'void', updated_at = $1
     WHERE status = 'pending' AND valid_before < $2
       AND NOT EXISTS (SELECT 1 FROM charges c
                       WHERE c.token_id = x402_payments.token_id AND c.status <> 'released')";

pub(super) const CHARGE_BUYER: &str = "SELECT t.buyer_id FROM charges c
     JOIN tokens t ON t.token_id = c.token_id WHERE c.charge_id = $1";
/// A hold placed by a reserve: `$5` its Idempotency-Key, if any.
pub(super) const INSERT_HOLD: &str =
    "INSERT INTO charges (charge_id, token_id, service_id, held_micros, status, idempotency_key,
                          created_at, hold_expires_at, on_account)
     VALUES ($1, $2, $3, $4, 'held', $5, $6, $7, $8)";
pub(super) const HOLD_ON_ACCOUNT: &str =
    "UPDATE buyers SET held_micros = held_micros + $1 WHERE buyer_id = $2";

/// The key `$2` of the token `$1`, as [`PriorKey`](super::PriorKey) reads it.
pub(super) const PRIOR_KEY: &str = concat!(
    "SELECT k.fingerprint, k.replays, k.charge_id, c.status, ",
    refusal_columns!(),
    " FROM idempotency_keys k LEFT JOIN charges c ON c.charge_id = k.charge_id
     WHERE k.token_id = $1 AND k.key = $2"
);
/// Keeps a refusal under the key `$2` of the token `$1`: `$5` to `$11` as
/// [`KeptRefusal`](super::KeptRefusal) holds them.
pub(super) const KEY_REFUSED: &str = concat!(
    "INSERT INTO idempotency_keys (token_id, key, fingerprint, created_at, ",
    refusal_columns!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
     ON CONFLICT (token_id, key) DO UPDATE SET charge_id = NULL, replays = 0,
         created_at = excluded.created_at, refusal_code = excluded.refusal_code,
         refusal_price_micros = excluded.refusal_price_micros,
         refusal_limit_micros = excluded.refusal_limit_micros,
         refusal_used_micros = excluded.refusal_used_micros,
         refusal_reserved_micros = excluded.refusal_reserved_micros,
         refusal_available_micros = excluded.refusal_available_micros,
         refusal_tier = excluded.refusal_tier"
);
pub(super) const KEY_CHARGED: &str =
    "INSERT INTO idempotency_keys (token_id, key, fingerprint, charge_id, created_at)
     VALUES ($1, $2, $3, $4, $5)
     ON CONFLICT (token_id, key) DO UPDATE SET charge_id = excluded.charge_id, replays = 0,
         created_at = excluded.created_at, refusal_code = NULL, refusal_price_micros = NULL,
         refusal_limit_micros = NULL, refusal_used_micros = NULL,
         refusal_reserved_micros = NULL, refusal_available_micros = NULL, refusal_tier = NULL";
pub(super) const KEY_REPLAYED: &str =
    "UPDATE idempotency_keys SET replays = replays + 1 WHERE token_id = $1 AND key = $2";
/// Purges old Idempotency-Keys: `$1` the cutoff, `$2` how many. A key whose charge is still
/// held stays (its request is in flight).
// The age is tested on the deleted row itself too: PostgreSQL re-checks only those
// conditions after waiting for a row lock, and a reserve that reused the key meanwhile made
// it young again.
pub(super) const PURGE_IDEMPOTENCY_KEYS: &str =
    "DELETE FROM idempotency_keys WHERE created_at < $1 AND (token_id, key) IN (
     SELECT k.token_id, k.key FROM idempotency_keys k
     LEFT JOIN charges c ON c.charge_id = k.charge_id
     WHERE k.created_at < $1 AND (k.charge_id IS NULL OR c.status <> 'held')
     LIMIT $2)";

/// Counts a fresh refused reserve for its service's summary.
pub(super) const INSERT_REFUSAL: &str =
    "INSERT INTO refusals (service_id, token_id, code, created_at, sandbox)
     VALUES ($1, $2, $3, $4, $5)";

/// A row of either driver, read by column index. Integers are read whatever their width
/// (PostgreSQL's INTEGER and BIGINT, SQLite's one INTEGER).
pub(super) trait Columns {
    fn text(&self, index: usize) -> Result<String, StoreError>;
    fn opt_text(&self, index: usize) -> Result<Option<String>, StoreError>;
    fn opt_int(&self, index: usize) -> Result<Option<i64>, StoreError>;
    fn flag(&self, index: usize) -> Result<bool, StoreError>;

    fn int(&self, index: usize) -> Result<i64, StoreError> {
        self.opt_int(index)?.ok_or_else(|| corrupt("NULL in column", index))
    }
}

impl Columns for rusqlite::Row<'_> {
    fn text(&self, index: usize) -> Result<String, StoreError> {
        Ok(self.get(index)?)
    }
    fn opt_text(&self, index: usize) -> Result<Option<String>, StoreError> {
        Ok(self.get(index)?)
    }
    fn opt_int(&self, index: usize) -> Result<Option<i64>, StoreError> {
        Ok(self.get(index)?)
    }
    fn flag(&self, index: usize) -> Result<bool, StoreError> {
        Ok(self.get(index)?)
    }
}

impl Columns for tokio_postgres::Row {
    fn text(&self, index: usize) -> Result<String, StoreError> {
        Ok(self.try_get(index)?)
    }
    fn opt_text(&self, index: usize) -> Result<Option<String>, StoreError> {
        Ok(self.try_get(index)?)
    }
    fn opt_int(&self, index: usize) -> Result<Option<i64>, StoreError> {
        use tokio_postgres::types::Type;
        let ty = self.columns().get(index).map(|column| column.type_().clone());
        Ok(match ty {
            Some(Type::INT2) => self.try_get::<_, Option<i16>>(index)?.map(i64::from),
            Some(Type::INT4) => self.try_get::<_, Option<i32>>(index)?.map(i64::from),
            _ => self.try_get(index)?,
        })
    }
    fn flag(&self, index: usize) -> Result<bool, StoreError> {
        Ok(self.try_get(index)?)
    }
}

pub(super) fn corrupt(what: &str, value: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("bad {what} {value}"))
}

pub(super) fn usdc(row: &impl Columns, index: usize) -> Result<Usdc, StoreError> {
    let micros = row.int(index)?;
    Usdc::from_micros_i64(micros).ok_or_else(|| corrupt("amount", micros))
}

fn opt_usdc(row: &impl Columns, index: usize) -> Result<Option<Usdc>, StoreError> {
    match row.opt_int(index)? {
        Some(_) => usdc(row, index).map(Some),
        None => Ok(None),
    }
}

pub(super) fn count(row: &impl Columns, index: usize) -> Result<u64, StoreError> {
    let count = row.int(index)?;
    u64::try_from(count).map_err(|_| corrupt("count", count))
}

pub(super) fn small(row: &impl Columns, index: usize, what: &str) -> Result<u32, StoreError> {
    let value = row.int(index)?;
    u32::try_from(value).map_err(|_| corrupt(what, value))
}

/// Reads a TEXT column holding one of `values`, as written by `name`.
fn named<T: Copy>(
    row: &impl Columns,
    index: usize,
    values: &[T],
    name: fn(T) -> &'static str,
) -> Result<T, StoreError> {
    let text = row.text(index)?;
    values.iter().copied().find(|value| name(*value) == text).ok_or_else(|| corrupt("value", text))
}

pub(super) fn charge_status(row: &impl Columns, index: usize) -> Result<ChargeStatus, StoreError> {
    named(row, index, &ALL_STATUSES, status_name)
}

fn scope(row: &impl Columns, index: usize) -> Result<Scope, StoreError> {
    named(row, index, &ALL_SCOPES, scope_name)
}

/// A token as `select_token!` selects it.
pub(super) fn token_record(row: &impl Columns) -> Result<TokenRecord, StoreError> {
    Ok(TokenRecord {
        grant: TokenGrant {
            token_id: row.text(0)?,
            buyer_id: row.text(1)?,
            buyer_tag: row.opt_text(2)?,
            service_id: row.opt_text(3)?,
            scope: scope(row, 4)?,
            limit_usdc: usdc(row, 5)?,
            expires_at: u64::try_from(row.int(6)? / 1000).unwrap_or(0),
            sandbox: row.flag(11)?,
        },
        used: usdc(row, 7)?,
        reserved: usdc(row, 8)?,
        revoked: row.flag(9)?,
        parent_id: row.opt_text(10)?,
    })
}

/// An account as `select_account!` selects it.
pub(super) fn account(row: &impl Columns) -> Result<Account, StoreError> {
    Ok(Account {
        balance: usdc(row, 0)?,
        held: usdc(row, 1)?,
        tier: small(row, 2, "tier")?,
        spent_day: row.int(3)?,
        spent: usdc(row, 4)?,
    })
}

/// A charge as `charge_columns!` selects it.
pub(super) fn charge_record(row: &impl Columns) -> Result<ChargeRecord, StoreError> {
    let upstream_status = row
        .opt_int(7)?
        .map(|status| u16::try_from(status).map_err(|_| corrupt("upstream status", status)))
        .transpose()?;
    Ok(ChargeRecord {
        charge_id: row.text(0)?,
        token_id: row.text(1)?,
        buyer_id: row.text(2)?,
        service_id: row.text(3)?,
        held: usdc(row, 4)?,
        committed: opt_usdc(row, 10)?,
        status: charge_status(row, 5)?,
        idempotency_key: row.opt_text(6)?,
        upstream_status,
        created_at: row.int(8)?,
        settled_at: row.opt_int(9)?,
        sandbox: row.flag(11)?,
        settlement: match row.opt_text(12)? {
            None => None,
            Some(status) => Some(PaymentSettlement {
                status: settlement_status(&status)?,
                transaction: row.opt_text(13)?,
                reason: row.opt_text(14)?,
            }),
        },
    })
}

fn settlement_status(name: &str) -> Result<SettlementStatus, StoreError> {
    SettlementStatus::ALL
        .into_iter()
        .find(|status| status.name() == name)
        .ok_or_else(|| corrupt("settlement status", name))
}

/// A payment as [`X402_PAYMENT_KIND`] selects it.
pub(super) fn recorded_payment(
    row: &impl Columns,
) -> Result<(PaymentKind, PaymentSettlement), StoreError> {
    let kind = row.text(0)?;
    let kind = PaymentKind::ALL
        .into_iter()
        .find(|k| k.name() == kind)
        .ok_or_else(|| corrupt("x402 payment kind", kind))?;
    let settlement = PaymentSettlement {
        status: settlement_status(&row.text(1)?)?,
        transaction: row.opt_text(2)?,
        reason: row.opt_text(3)?,
    };
    Ok((kind, settlement))
}

/// A settlement as [`DUE_SETTLEMENTS`] selects it.
pub(super) fn settlement_job(row: &impl Columns) -> Result<SettlementJob, StoreError> {
    Ok(SettlementJob {
        token_id: row.text(0)?,
        payment: row.text(1)?,
        status: settlement_status(&row.text(2)?)?,
        tx_hash: row.opt_text(3)?,
        raw_tx: row.opt_text(4)?,
        attempts: u32::try_from(row.int(5)?).unwrap_or(u32::MAX),
        due_at: row.int(6)?,
        valid_before: u64::try_from(row.int(7)?).unwrap_or(0),
        reason: row.opt_text(8)?,
    })
}

/// A deposit as [`PRIOR_DEPOSIT`] selects it: id, amount, when.
pub(super) fn prior_deposit(row: &impl Columns) -> Result<(String, Usdc, UnixMillis), StoreError> {
    Ok((row.text(0)?, usdc(row, 1)?, row.int(2)?))
}

/// A token's expiry (Unix seconds) as the stores keep it (Unix ms).
pub(super) fn buyer_key(row: &impl Columns) -> Result<BuyerKeyRecord, StoreError> {
    let services = row.text(3)?;
    Ok(BuyerKeyRecord {
        key_id: row.text(0)?,
        buyer_id: row.text(1)?,
        label: row.opt_text(2)?,
        services: serde_json::from_str(&services).map_err(|_| corrupt("services", services))?,
        max_limit: opt_usdc(row, 4)?,
        created_at: row.int(5)?,
        last_used_at: row.opt_int(6)?,
        revoked_at: row.opt_int(7)?,
    })
}

pub(super) fn seconds_to_millis(seconds: u64) -> Result<UnixMillis, StoreError> {
    i64::try_from(seconds)
        .ok()
        .and_then(|s| s.checked_mul(1000))
        .ok_or_else(|| StoreError::Corrupt(format!("time {seconds} is out of range")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every shared statement, each numbering its `$n` in the order SQLite does.
    #[test]
    fn sqlite_numbers_every_shared_placeholder_as_postgresql_does() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        drop(super::super::SqliteStore::open(&path).unwrap());
        let conn = rusqlite::Connection::open(&path).unwrap();
        for sql in [
            SELECT_TOKEN,
            SELECT_BUYER_TOKENS,
            INSERT_TOKEN,
            REVOKE_SUBTREE,
            REVOKE_BUYER,
            BUYER_KNOWN,
            SELECT_ACCOUNT,
            OPEN_ACCOUNT,
            SET_TIER,
            SET_BALANCE,
            PRIOR_DEPOSIT,
            INSERT_DEPOSIT,
            SELECT_CHARGE,
            CHARGE_BUYER,
            INSERT_HOLD,
            HOLD_ON_ACCOUNT,
            PRIOR_KEY,
            KEY_REFUSED,
            KEY_CHARGED,
            KEY_REPLAYED,
            PURGE_IDEMPOTENCY_KEYS,
            INSERT_REFUSAL,
            PRUNE_FEED,
            RECORD_X402_PAYMENT,
            DUE_SETTLEMENTS,
            CLAIM_SETTLEMENT,
            UPDATE_SETTLEMENT,
            VOID_PAYMENTS,
            SELECT_SETTLEMENT,
            X402_PAYMENT_KIND,
            INSERT_BUYER_KEY,
            SELECT_BUYER_KEYS,
            SELECT_BUYER_KEY,
            SELECT_LIVE_BUYER_KEY,
            REVOKE_BUYER_KEY,
            TOUCH_BUYER_KEY,
        ] {
            let statement = conn.prepare(sql).unwrap();
            for index in 1..=statement.parameter_count() {
                let name = statement.parameter_name(index);
                assert_eq!(name, Some(format!("${index}").as_str()), "{sql}");
            }
        }
    }
}
