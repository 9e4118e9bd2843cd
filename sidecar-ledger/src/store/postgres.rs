//! PostgreSQL: one set of books for several ledger processes (or machines).
//!
//! Every operation runs in a READ COMMITTED transaction that first locks the rows its decision
//! rests on (`SELECT … FOR NO KEY UPDATE`): the tokens of the chains involved (a token and
//! its ancestors), in token-id order and in one statement, then the buyers' accounts
//! involved, in buyer-id order.
//! A token's lock guards its counters, its charges' status and expiry, its Idempotency-Keys
//! and the minting of children under it; an account's lock guards its balance, holds and
//! deposits. So ledgers sharing the database take turns per token and per buyer, and each
//! decision of [`crate::rules`] is taken on the latest committed state: no ledger can
//! overspend a token, a chain or a balance, commit a hold twice or charge an Idempotency-Key
//! twice. The schema's CHECKs (`used + reserved <= limit`, `held <= balance`) back that up.
//! Taking locks in one global order (tokens by id, then buyers by id) keeps concurrent
//! transactions from deadlocking; a transaction PostgreSQL aborts all the same (deadlock,
//! serialization failure) was rolled back whole, and runs again.
//!
//! The hot path (reserves without an Idempotency-Key, settlements) runs through [`writer`]:
//! many operations per transaction, one COMMIT (group commit), locks taken as above.
//!
//! `FOR NO KEY UPDATE` rather than `FOR UPDATE`: it excludes the other ledgers just the same,
//! but not the foreign-key checks of rows inserted under the token.

mod writer;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use deadpool_postgres::{
    GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Transaction,
};
use paystile_protocol::Usdc;
use paystile_protocol::ledger_api::{
    ChargeStatus, GatewayConfirmations, RevocationFeed, SettleResult, Settlement, TokenGrant,
};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use super::journal::{
    self, ChargeFilter, Dialect, Param, ServiceTotals, ServiceWindow, SpendWindow, TokenSpendRecord,
};
use super::migrations::MIGRATIONS;
use super::sql::{self, Columns, insert_token, select_account, select_token, subtree};
use super::{
    BuyerKeyRecord, BuyerRecord, ChargeRecord, DepositCommand, DepositRecord, ExpiredOnRead,
    FIRST_TIER, KeptRefusal, NewBuyerKey, PriorKey, ReserveCommand, ReserveOutcome, ReserveStep,
    Revoked, StoreError, TokenRecord, UnixMillis, confirmations, feed, into_chain, replayed,
    scope_name, seq_i64, status_name,
};
use crate::rules::{self, Account, Books, ChildSpec, Refusal};
use crate::settings::PostgresUrl;
use crate::telemetry::wire_name;
use writer::{Done, Work, Writer};

/// Connections per ledger process. Operations on one token take turns anyway; more
/// connections serve more tokens at once, at a cost to the server per connection.
const POOL_SIZE: usize = 16;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an operation waits for a free connection before it fails.
const WAIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Runs of one transaction that PostgreSQL aborts as a deadlock or serialization failure.
const MAX_ATTEMPTS: u32 = 8;
/// The advisory lock under which migrations run ("paystile" in ASCII): ledgers starting
/// together take turns, and the second finds the schema up to date.
const MIGRATION_LOCK: i64 = 0x7061_7973_7469_6c65;

/// Ends a `SELECT token_id FROM tokens …` that locks several tokens: in id order, the same
/// in every transaction, so that two of them cannot each hold a lock the other waits for.
macro_rules! lock_in_order {
    () => {
        " ORDER BY token_id FOR NO KEY UPDATE"
    };
}

/// Locks the tokens `$1` and the tokens of the charges `$2` names, with all their ancestors,
/// in one statement and so in id order; answers them. Locked until the
/// transaction ends: the other ledgers' operations on them wait, and this one sees the state
/// they left.
const LOCK_CHAINS: &str = concat!(
    "WITH RECURSIVE chain (token_id, parent_id) AS (
         SELECT token_id, parent_id FROM tokens WHERE token_id = ANY($1)
         UNION
         SELECT t.token_id, t.parent_id FROM tokens t JOIN charges c ON c.token_id = t.token_id
         WHERE c.charge_id = ANY($2)
         UNION
         SELECT p.token_id, p.parent_id FROM tokens p JOIN chain c ON p.token_id = c.parent_id
     ) ",
    select_token!(),
    " WHERE token_id IN (SELECT token_id FROM chain)",
    lock_in_order!()
);
/// The holds past their TTL at `$3` of the buyer of the token `$1` (of the buyer `$2` if the
/// token is unknown), and whether the token is known; read without a lock.
const SURVEY_RESERVE: &str = "SELECT
         EXISTS (SELECT 1 FROM tokens WHERE token_id = $1),
         ARRAY(SELECT c.charge_id FROM charges c JOIN tokens t ON t.token_id = c.token_id
               WHERE c.status = 'held' AND c.hold_expires_at <= $3
                 AND t.buyer_id = coalesce((SELECT buyer_id FROM tokens WHERE token_id = $1), $2))";
/// A buyer's account, locked: after every token lock the transaction takes.
const LOCK_ACCOUNT: &str = concat!(select_account!(), " FOR NO KEY UPDATE");
const INSERT_TOKEN_IF_NEW: &str = concat!(insert_token!(), " ON CONFLICT (token_id) DO NOTHING");

/// A pool of connections to one database; cheap to clone.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    /// Runs the hot path's writes (reserves without an Idempotency-Key, settlements) in
    /// batches, one transaction each (group commit).
    writer: Writer,
    /// Holds released on read (past their TTL when an operation touched their buyer),
    /// counted once their transaction has committed.
    pub(super) expired_on_read: ExpiredOnRead,
}

/// Runs `$body` (which may use `$tx` and `?`) in a transaction on a pooled connection and
/// commits; runs it again from the start if PostgreSQL aborted it (see [`retrying`]).
/// Whatever `$body` uses from outside must be `Copy` (references), as it may run again.
macro_rules! in_transaction {
    ($pool:expr, |$tx:ident| $body:expr) => {{
        let pool: &Pool = $pool;
        retrying(move || async move {
            let mut client = pool.get().await?;
            let $tx = client.transaction().await?;
            let value = $body;
            $tx.commit().await?;
            Ok::<_, StoreError>(value)
        })
        .await
    }};
}

impl PostgresStore {
    /// Connects to the database `url` names and brings its schema up to date.
    pub async fn open(url: &PostgresUrl) -> Result<PostgresStore, StoreError> {
        // `from_config` takes any TLS connector; loopback and private networks need none yet.
        let manager = Manager::from_config(
            url.config().clone(),
            NoTls,
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(CONNECT_TIMEOUT))
            .wait_timeout(Some(WAIT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Setup(format!("cannot build the connection pool: {e}")))?;
        let writer = Writer::start(pool.clone());
        let store = PostgresStore { pool, writer, expired_on_read: ExpiredOnRead::default() };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version    BIGINT PRIMARY KEY,
                 name       TEXT NOT NULL,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
             )",
        )
        .await?;
        let applied: i64 = tx
            .query_one("SELECT coalesce(max(version), 0) FROM schema_migrations", &[])
            .await?
            .try_get(0)?;
        let known = MIGRATIONS.last().map_or(0, |m| m.version);
        if applied > known {
            return Err(StoreError::Setup(format!(
                "the database has schema version {applied}, newer than this ledger's {known}"
            )));
        }
        for migration in MIGRATIONS.iter().filter(|m| m.version > applied) {
            tx.batch_execute(migration.postgres).await?;
            tx.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                &[&migration.version, &migration.name],
            )
            .await?;
            tracing::info!(version = migration.version, name = migration.name, "migrated");
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn insert_token(&self, token: TokenGrant, now: UnixMillis) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        insert_token(&client, &token, None, now, sql::INSERT_TOKEN).await
    }

    pub async fn token(
        &self,
        token_id: String,
        now: UnixMillis,
    ) -> Result<Option<TokenRecord>, StoreError> {
        if !storable(&token_id) {
            return Ok(None);
        }
        let token_id = token_id.as_str();
        let (token, expired) = in_transaction!(&self.pool, |tx| {
            match load_token(&tx, token_id).await? {
                Some(token) => match expire_buyer_holds(&tx, &token.grant.buyer_id, now).await? {
                    0 => (Some(token), 0),
                    expired => (load_token(&tx, token_id).await?, expired),
                },
                None => (None, 0),
            }
        })?;
        self.expired_on_read.count(expired);
        Ok(token)
    }

    /// Revokes the token (once; a second revoke keeps the first time). An unknown token is
    /// registered as `unknown` first, when given; otherwise the answer is `None`.
    pub async fn revoke_token(
        &self,
        token_id: String,
        unknown: Option<TokenGrant>,
        now: UnixMillis,
    ) -> Result<Revoked<Option<TokenRecord>>, StoreError> {
        if !storable(&token_id) {
            return Ok(Revoked { value: None, feed_seq: None });
        }
        let (token_id, unknown) = (token_id.as_str(), unknown.as_ref());
        in_transaction!(&self.pool, |tx| {
            if let Some(grant) = unknown {
                insert_token(&tx, grant, None, now, INSERT_TOKEN_IF_NEW).await?;
            }
            // The token and its descendants: a parent's revocation ends its delegations.
            // Their locks, in id order, order the revocation against settles and reserves;
            // holding the token's lock, no child can be minted under it any more, and the
            // UPDATE (a statement of its own, seeing every commit so far) finds them all.
            query(
                &tx,
                concat!(
                    subtree!(),
                    " SELECT token_id FROM tokens WHERE token_id IN (SELECT token_id FROM tree)",
                    lock_in_order!()
                ),
                &[&token_id],
            )
            .await?;
            execute(&tx, sql::REVOKE_SUBTREE, &[&token_id, &now]).await?;
            let feed_seq = feed_revocation(&tx, sql::FEED_SUBTREE, &[&token_id, &now]).await?;
            Revoked { value: load_token(&tx, token_id).await?, feed_seq }
        })
    }

    pub async fn mint_child(
        &self,
        parent_id: String,
        spec: ChildSpec,
        now: UnixMillis,
    ) -> Result<Option<Result<TokenRecord, Refusal>>, StoreError> {
        if !storable(&parent_id) {
            return Ok(None);
        }
        let (parent_id, spec) = (parent_id.as_str(), &spec);
        in_transaction!(&self.pool, |tx| {
            let chain = lock_chain(&tx, parent_id).await?;
            if chain.is_empty() {
                None
            } else {
                Some(match rules::child_grant(&chain, spec) {
                    Err(refusal) => Err(refusal),
                    Ok(grant) => {
                        insert_token(&tx, &grant, Some(parent_id), now, sql::INSERT_TOKEN).await?;
                        let parent_id = Some(parent_id.to_owned());
                        Ok(TokenRecord { parent_id, ..TokenRecord::new(grant) })
                    }
                })
            }
        })
    }

    pub async fn deposit(
        &self,
        cmd: DepositCommand,
    ) -> Result<Result<DepositRecord, Refusal>, StoreError> {
        let cmd = &cmd;
        in_transaction!(&self.pool, |tx| {
            let buyer_id = cmd.buyer_id.as_str();
            execute(&tx, sql::OPEN_ACCOUNT, &[&buyer_id, &tier_i32(FIRST_TIER)?, &cmd.now]).await?;
            let account = load_account(&tx, LOCK_ACCOUNT, buyer_id)
                .await?
                .ok_or_else(|| StoreError::Corrupt("an account vanished".into()))?;
            // Read under the account's lock: a concurrent deposit under the same reference
            // has committed by now, or waits.
            let prior = match &cmd.reference {
                Some(reference) => query_opt(&tx, sql::PRIOR_DEPOSIT, &[&buyer_id, reference])
                    .await?
                    .as_ref()
                    .map(sql::prior_deposit)
                    .transpose()?,
                None => None,
            };
            let record = cmd.record(&account, prior)?;
            if let Ok(credit) = &record
                && !credit.replayed
            {
                execute(&tx, sql::SET_BALANCE, &[&credit.balance.micros_i64(), &buyer_id]).await?;
                let amount = cmd.amount.micros_i64();
                execute(
                    &tx,
                    sql::INSERT_DEPOSIT,
                    &[&cmd.deposit_id, &buyer_id, &amount, &cmd.reference, &cmd.now],
                )
                .await?;
            }
            record
        })
    }

    pub async fn set_tier(
        &self,
        buyer_id: String,
        tier: u32,
        now: UnixMillis,
    ) -> Result<Account, StoreError> {
        let (buyer_id, tier) = (buyer_id.as_str(), tier_i32(tier)?);
        in_transaction!(&self.pool, |tx| {
            execute(&tx, sql::SET_TIER, &[&buyer_id, &tier, &now]).await?;
            load_account(&tx, sql::SELECT_ACCOUNT, buyer_id)
                .await?
                .ok_or_else(|| StoreError::Corrupt("an account vanished".into()))?
        })
    }

    pub async fn buyer(
        &self,
        buyer_id: String,
        now: UnixMillis,
    ) -> Result<BuyerRecord, StoreError> {
        if !storable(&buyer_id) {
            return Ok(BuyerRecord { account: None, tokens: Vec::new() });
        }
        let buyer_id = buyer_id.as_str();
        let (buyer, expired) = in_transaction!(&self.pool, |tx| {
            let expired = expire_buyer_holds(&tx, buyer_id, now).await?;
            let account = load_account(&tx, sql::SELECT_ACCOUNT, buyer_id).await?;
            let tokens = query(&tx, sql::SELECT_BUYER_TOKENS, &[&buyer_id])
                .await?
                .iter()
                .map(sql::token_record)
                .collect::<Result<_, _>>()?;
            (BuyerRecord { account, tokens }, expired)
        })?;
        self.expired_on_read.count(expired);
        Ok(buyer)
    }

    pub async fn revoke_buyer(
        &self,
        buyer_id: String,
        now: UnixMillis,
    ) -> Result<Revoked<Option<u64>>, StoreError> {
        if !storable(&buyer_id) {
            return Ok(Revoked { value: None, feed_seq: None });
        }
        let buyer_id = buyer_id.as_str();
        in_transaction!(&self.pool, |tx| {
            // Every token of the buyer locked in id order, as reserves and settles lock them.
            // The UPDATE, a statement of its own, also finds a child whose minting was
            // committed while this waited for its parent's lock.
            query(
                &tx,
                concat!("SELECT token_id FROM tokens WHERE buyer_id = $1", lock_in_order!()),
                &[&buyer_id],
            )
            .await?;
            let revoked = execute(&tx, sql::REVOKE_BUYER, &[&now, &buyer_id]).await?;
            let known =
                revoked > 0 || query_opt(&tx, sql::BUYER_KNOWN, &[&buyer_id]).await?.is_some();
            let feed_seq = feed_revocation(&tx, sql::FEED_BUYER, &[&now, &buyer_id]).await?;
            Revoked { value: known.then_some(revoked), feed_seq }
        })
    }

    /// The revocation feed after `after`: at most `limit` entries.
    pub async fn revocations_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<RevocationFeed, StoreError> {
        let client = self.pool.get().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = query(&client, sql::FEED_AFTER, &[&seq_i64(after), &limit]).await?;
        let entries = rows
            .iter()
            .map(|row| Ok((row.try_get::<_, i64>(0)?, row.try_get::<_, String>(1)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let head: i64 = query_one(&client, sql::FEED_HEAD, &[]).await?.try_get(0)?;
        Ok(feed(after, entries, head))
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
        let client = self.pool.get().await?;
        execute(&client, sql::WATCHER_SEEN, &[&watcher, &seq_i64(seq), &now]).await?;
        execute(&client, sql::WATCHERS_GONE, &[&forget_before]).await?;
        Ok(())
    }

    /// The watchers heard from since `live_since`, split by whether they applied `seq`.
    pub async fn watchers(
        &self,
        seq: u64,
        live_since: UnixMillis,
    ) -> Result<GatewayConfirmations, StoreError> {
        let client = self.pool.get().await?;
        let rows = query(&client, sql::WATCHERS_LIVE, &[&seq_i64(seq), &live_since]).await?;
        let rows = rows
            .iter()
            .map(|row| Ok((row.try_get::<_, String>(0)?, row.try_get::<_, bool>(1)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(confirmations(rows))
    }

    pub async fn charge(
        &self,
        charge_id: String,
        now: UnixMillis,
    ) -> Result<Option<ChargeRecord>, StoreError> {
        if !storable(&charge_id) {
            return Ok(None);
        }
        let charge_id = charge_id.as_str();
        let (charge, expired) = in_transaction!(&self.pool, |tx| {
            let buyer = query_opt(&tx, sql::CHARGE_BUYER, &[&charge_id]).await?;
            let expired = match buyer {
                Some(buyer) => expire_buyer_holds(&tx, buyer.try_get(0)?, now).await?,
                None => 0,
            };
            (load_charge(&tx, charge_id).await?, expired)
        })?;
        self.expired_on_read.count(expired);
        Ok(charge)
    }

    /// A reserve without an Idempotency-Key joins the writer's next batch. One with a key runs
    /// in a transaction of its own (the batch does not keep keys): slower on a hot token, and
    /// ordered with the batches by the same locks.
    pub async fn reserve(&self, command: ReserveCommand) -> Result<ReserveOutcome, StoreError> {
        let (outcome, expired) = if command.idempotency.is_none() {
            match self.writer.run(Work::Reserve(Box::new(command))).await? {
                Done::Reserved(outcome, expired) => (outcome, expired),
                Done::Settled(_) => return Err(StoreError::Corrupt("a reserve settled".into())),
            }
        } else {
            let command = &command;
            in_transaction!(&self.pool, |tx| {
                let mut expired = 0;
                (reserve(&tx, command, &mut expired).await?, expired)
            })?
        };
        self.expired_on_read.count(expired);
        Ok(outcome)
    }

    pub async fn settle(
        &self,
        settlements: Vec<Settlement>,
        now: UnixMillis,
    ) -> Result<Vec<SettleResult>, StoreError> {
        match self.writer.run(Work::Settle(settlements, now)).await? {
            Done::Settled(results) => Ok(results),
            Done::Reserved(..) => Err(StoreError::Corrupt("a settlement reserved".into())),
        }
    }

    /// Moves the expiry of every open hold to `until` at the earliest; answers how many.
    /// A ledger that was down must not expire the holds whose outcomes gateways are still
    /// waiting to deliver.
    pub async fn extend_open_holds(&self, until: UnixMillis) -> Result<usize, StoreError> {
        in_transaction!(&self.pool, |tx| {
            let tokens: Vec<String> = query(
                &tx,
                concat!(
                    "SELECT token_id FROM tokens WHERE token_id IN (SELECT token_id FROM charges
                     WHERE status = 'held' AND hold_expires_at < $1)",
                    lock_in_order!()
                ),
                &[&until],
            )
            .await?
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()?;
            // Only the charges of the locked tokens: a hold made meanwhile has a fresh TTL.
            let extended = execute(
                &tx,
                "UPDATE charges SET hold_expires_at = $1
                 WHERE status = 'held' AND hold_expires_at < $1 AND token_id = ANY($2)",
                &[&until, &tokens],
            )
            .await?;
            usize::try_from(extended).unwrap_or(usize::MAX)
        })
    }

    /// Releases up to `limit` holds whose TTL has passed; answers how many.
    pub async fn expire_holds(&self, now: UnixMillis, limit: usize) -> Result<usize, StoreError> {
        in_transaction!(&self.pool, |tx| expire_holds(&tx, now, limit).await?)
    }

    /// A key purged while a reserve reads it under its token's lock is harmless: the key is
    /// past its retention, and either answer (its outcome, or a fresh start) is allowed.
    pub async fn purge_idempotency_keys(
        &self,
        before: UnixMillis,
        limit: usize,
    ) -> Result<usize, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let client = self.pool.get().await?;
        let purged = execute(&client, sql::PURGE_IDEMPOTENCY_KEYS, &[&before, &limit]).await?;
        Ok(usize::try_from(purged).unwrap_or(usize::MAX))
    }

    /// Waits for a revoke holding the feed's lock (its EXCLUSIVE lock conflicts with the
    /// DELETE's); the head this keeps is the newest row committed before it started.
    pub async fn prune_revocations(&self, before: UnixMillis) -> Result<usize, StoreError> {
        let client = self.pool.get().await?;
        let pruned = execute(&client, sql::PRUNE_FEED, &[&before]).await?;
        Ok(usize::try_from(pruned).unwrap_or(usize::MAX))
    }
}

/// Runs `attempt`, one whole transaction, again while PostgreSQL aborts it as a deadlock or a
/// serialization failure: it was rolled back whole, so running it again is safe. Any other
/// error (a lost connection above all, when a COMMIT's fate is unknown) is final.
async fn retrying<T, E, F, Fut>(mut attempt: F) -> Result<T, E>
where
    E: AsRef<StoreError>,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempts = 1;
    loop {
        match attempt().await {
            Err(e) if attempts < MAX_ATTEMPTS && is_transient(e.as_ref()) => {
                tracing::debug!(error = %e.as_ref(), attempts, "transaction aborted; running it again");
                // A short, growing, random pause, so that the parties do not collide again.
                let pause = rand::random_range(1..=5 * u64::from(attempts));
                tokio::time::sleep(Duration::from_millis(pause)).await;
                attempts += 1;
            }
            result => return result,
        }
    }
}

fn is_transient(error: &StoreError) -> bool {
    let StoreError::Postgres(error) = error else { return false };
    error.code().is_some_and(|code| {
        *code == SqlState::T_R_SERIALIZATION_FAILURE || *code == SqlState::T_R_DEADLOCK_DETECTED
    })
}

/// PostgreSQL's text cannot hold NUL: no stored id contains one, so a lookup of one finds
/// nothing (instead of failing). The ledger refuses such ids before any write.
fn storable(id: &str) -> bool {
    !id.contains('\0')
}

/// Locks the token `token_id` and its ancestors (in id order); answers them, the token
/// first, or nothing for an unknown token.
async fn lock_chain(tx: &Transaction<'_>, token_id: &str) -> Result<Vec<TokenRecord>, StoreError> {
    let (tokens, _) = lock_chains(tx, &[token_id], &[] as &[&str]).await?;
    if tokens.is_empty() {
        return Ok(Vec::new());
    }
    into_chain(tokens, token_id)
}

/// Each locked token's parent.
type Parents = HashMap<String, Option<String>>;

/// Locks the chains of `token_ids` and those of the charges `charge_ids` ([`LOCK_CHAINS`]);
/// answers the tokens locked, by id, and each one's parent.
async fn lock_chains(
    tx: &Transaction<'_>,
    token_ids: &[&str],
    charge_ids: &[impl ToSql + Sync],
) -> Result<(HashMap<String, TokenRecord>, Parents), StoreError> {
    let mut tokens = HashMap::new();
    let mut parents = Parents::new();
    for row in query(tx, LOCK_CHAINS, &[&token_ids, &charge_ids]).await? {
        let token = sql::token_record(&row)?;
        parents.insert(token.grant.token_id.clone(), token.parent_id.clone());
        tokens.insert(token.grant.token_id.clone(), token);
    }
    Ok((tokens, parents))
}

/// Reserves `cmd`; `expired` is set to how many of the buyer's holds were released on read.
async fn reserve(
    tx: &Transaction<'_>,
    cmd: &ReserveCommand,
    expired: &mut usize,
) -> Result<ReserveOutcome, StoreError> {
    let token_id = cmd.token.token_id.as_str();
    // Holds past their TTL count against no level of the chain nor the account, and keep no
    // key in flight: the buyer's expired holds are released first. They are found before any
    // lock is taken, and their chains locked with this token's in one statement, so in id
    // order: locked after this chain, they would break the order every transaction follows,
    // and deadlock (and retry) against one that holds one of them and waits for this chain.
    let survey = query_one(tx, SURVEY_RESERVE, &[&token_id, &cmd.token.buyer_id, &cmd.now]).await?;
    let (known, due): (bool, Vec<String>) = (survey.try_get(0)?, survey.try_get(1)?);
    if !known {
        // Another ledger may be registering it right now: then this insert waits for that
        // one's transaction and does nothing, and the lock below finds its row. A token
        // registered here has no parent: children are minted by the ledger.
        insert_token(tx, &cmd.token, None, cmd.now, INSERT_TOKEN_IF_NEW).await?;
    }
    let (tokens, parents) = lock_chains(tx, &[token_id], &due).await?;
    let mut chain = into_chain(tokens, token_id)?;
    // Then the accounts, as every transaction locks accounts after tokens.
    *expired = release_locked(tx, &due, &parents, cmd.now).await?;
    if *expired > 0 {
        chain = lock_chain(tx, token_id).await?;
    }
    let token = &chain[0];
    // Locked after the chain's tokens, as every transaction does. A sandbox token's buyer
    // is not read: the sandbox book never touches the account.
    let account = match token.grant.sandbox {
        true => None,
        false => load_account(tx, LOCK_ACCOUNT, &token.grant.buyer_id).await?,
    };
    let books = Books {
        chain: &chain,
        account: account.as_ref(),
        today: rules::utc_day(cmd.now),
        daily_limits: &cmd.daily_limits,
    };

    let prior = match &cmd.idempotency {
        Some(idempotency) => query_opt(tx, sql::PRIOR_KEY, &[&token_id, &idempotency.key])
            .await?
            .as_ref()
            .map(PriorKey::read)
            .transpose()?,
        None => None,
    };
    match cmd.step(&books, prior)? {
        ReserveStep::Refuse { refusal, key } => {
            record_refusal(tx, cmd, token.grant.sandbox, &refusal).await?;
            if let Some(idempotency) = key {
                let kept = KeptRefusal::of(&refusal)?;
                let (key, fingerprint) = (&idempotency.key, &idempotency.fingerprint);
                execute(
                    tx,
                    sql::KEY_REFUSED,
                    &[
                        &token_id,
                        key,
                        fingerprint,
                        &cmd.now,
                        &kept.code,
                        &kept.price,
                        &kept.limit,
                        &kept.used,
                        &kept.reserved,
                        &kept.available,
                        &kept.tier,
                    ],
                )
                .await?;
            }
            Ok(ReserveOutcome::Refused(refusal))
        }
        ReserveStep::RefuseAgain(refusal) => Ok(ReserveOutcome::RefusedAgain(refusal)),
        ReserveStep::Replay { charge_id, key } => {
            execute(tx, sql::KEY_REPLAYED, &[&token_id, &key]).await?;
            let first = load_charge(tx, &charge_id)
                .await?
                .ok_or_else(|| StoreError::Corrupt("an idempotency key names no charge".into()))?;
            Ok(replayed(first, &chain))
        }
        ReserveStep::Hold { holds, on_account } => {
            let price = cmd.price.micros_i64();
            for (charge_id, key) in cmd.hold_rows(&holds) {
                let (expires, service) = (&cmd.hold_expires_at, &cmd.service_id);
                execute(
                    tx,
                    sql::INSERT_HOLD,
                    &[&charge_id, &token_id, service, &price, &key, &cmd.now, expires, &on_account],
                )
                .await?;
            }
            // Held at every level of the chain, and on the account.
            let total = holds.total.micros_i64();
            let levels: Vec<&str> = chain.iter().map(|t| t.grant.token_id.as_str()).collect();
            execute(
                tx,
                "UPDATE tokens SET reserved_micros = reserved_micros + $1 WHERE token_id = ANY($2)",
                &[&total, &levels],
            )
            .await?;
            if on_account {
                execute(tx, sql::HOLD_ON_ACCOUNT, &[&total, &token.grant.buyer_id]).await?;
            }
            if let Some(idempotency) = &cmd.idempotency {
                let (key, fingerprint) = (&idempotency.key, &idempotency.fingerprint);
                execute(
                    tx,
                    sql::KEY_CHARGED,
                    &[&token_id, key, fingerprint, &cmd.charge_id, &cmd.now],
                )
                .await?;
            }
            Ok(cmd.held(&holds))
        }
    }
}

/// A hold to close: committed for `charged` (which becomes used; the rest of the hold is
/// freed), or released (all of it freed) when `charged` is `None`.
struct Closing {
    charge_id: String,
    token_id: String,
    account: Option<String>,
    held: Usdc,
    charged: Option<Usdc>,
    upstream_status: Option<i32>,
}

async fn expire_holds(
    tx: &Transaction<'_>,
    now: UnixMillis,
    limit: usize,
) -> Result<usize, StoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let due: Vec<String> = query(
        tx,
        "SELECT charge_id FROM charges WHERE status = 'held' AND hold_expires_at <= $1
         ORDER BY hold_expires_at LIMIT $2",
        &[&now, &limit],
    )
    .await?
    .iter()
    .map(|row| row.try_get(0))
    .collect::<Result<_, _>>()?;
    release_due(tx, &due, now).await
}

/// Releases every hold of the buyer whose TTL has passed (on read: the sweeper may lag).
/// The buyer's, not just one token's: each level of a chain of delegation, and the buyer's
/// account, count the holds of every token below them. Takes no lock when none is due.
async fn expire_buyer_holds(
    tx: &Transaction<'_>,
    buyer_id: &str,
    now: UnixMillis,
) -> Result<usize, StoreError> {
    let due: Vec<String> = query(
        tx,
        "SELECT c.charge_id FROM charges c JOIN tokens t ON t.token_id = c.token_id
         WHERE c.status = 'held' AND c.hold_expires_at <= $1 AND t.buyer_id = $2",
        &[&now, &buyer_id],
    )
    .await?
    .iter()
    .map(|row| row.try_get(0))
    .collect::<Result<_, _>>()?;
    release_due(tx, &due, now).await
}

/// Releases the holds `due` names that are still held and past their TTL at `now`, at every
/// level of their chains and on their accounts; answers how many.
async fn release_due(
    tx: &Transaction<'_>,
    due: &[String],
    now: UnixMillis,
) -> Result<usize, StoreError> {
    if due.is_empty() {
        return Ok(0);
    }
    let (_, parents) = lock_chains(tx, &[], due).await?;
    release_locked(tx, due, &parents, now).await
}

/// [`release_due`] once the chains of the holds `due` are locked (`parents` naming each
/// locked token's parent).
async fn release_locked(
    tx: &Transaction<'_>,
    due: &[String],
    parents: &Parents,
    now: UnixMillis,
) -> Result<usize, StoreError> {
    if due.is_empty() {
        return Ok(0);
    }
    // Again under the locks: another ledger's sweep, or a settle, may have closed some.
    let closing = query(
        tx,
        "SELECT c.charge_id, c.token_id, c.held_micros, CASE WHEN c.on_account THEN t.buyer_id END
         FROM charges c JOIN tokens t ON t.token_id = c.token_id
         WHERE c.charge_id = ANY($1) AND c.status = 'held' AND c.hold_expires_at <= $2",
        &[&due, &now],
    )
    .await?
    .iter()
    .map(|row| {
        Ok(Closing {
            charge_id: row.try_get(0)?,
            token_id: row.try_get(1)?,
            held: sql::usdc(row, 2)?,
            account: row.try_get(3)?,
            charged: None,
            upstream_status: None,
        })
    })
    .collect::<Result<Vec<_>, StoreError>>()?;
    close_holds(tx, &closing, parents, now).await?;
    Ok(closing.len())
}

/// Closes the holds (all held, their chains locked by this transaction, `parents` naming
/// each locked token's parent) and moves the counters of every level of their chains and of
/// the accounts holding them: a commit's amount becomes used (and is debited from the
/// account), the whole hold stops being held. A statement for the charges, one for the
/// tokens and one for the accounts, however many.
async fn close_holds(
    tx: &Transaction<'_>,
    closing: &[Closing],
    parents: &Parents,
    now: UnixMillis,
) -> Result<(), StoreError> {
    if closing.is_empty() {
        return Ok(());
    }
    let charge_ids: Vec<&str> = closing.iter().map(|c| c.charge_id.as_str()).collect();
    let statuses: Vec<&str> = closing
        .iter()
        .map(|c| match c.charged {
            Some(_) => status_name(ChargeStatus::Committed),
            None => status_name(ChargeStatus::Released),
        })
        .collect();
    let upstream: Vec<Option<i32>> = closing.iter().map(|c| c.upstream_status).collect();
    let committed: Vec<Option<i64>> =
        closing.iter().map(|c| c.charged.map(Usdc::micros_i64)).collect();
    let closed = execute(
        tx,
        "UPDATE charges c SET status = u.status, settled_at = $5, upstream_status = u.upstream,
                              committed_micros = u.committed
         FROM unnest($1::text[], $2::text[], $3::int4[], $4::int8[])
              AS u (charge_id, status, upstream, committed)
         WHERE c.charge_id = u.charge_id AND c.status = 'held'",
        &[&charge_ids, &statuses, &upstream, &committed, &now],
    )
    .await?;
    if usize::try_from(closed).ok() != Some(closing.len()) {
        // Their tokens' locks should have kept them held: change nothing.
        return Err(StoreError::Corrupt(format!(
            "closed {closed} of {} holds: some were settled under their token's lock",
            closing.len()
        )));
    }

    // Per token and per account: (what becomes used, what stops being held).
    let mut deltas: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    let mut accounts: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    let add = |(used, freed): &mut (i64, i64), c: &Closing| {
        let held = c.held.micros_i64();
        let overflow = || StoreError::Corrupt(format!("token {} holds too much", c.token_id));
        *freed = freed.checked_add(held).ok_or_else(overflow)?;
        if let Some(charged) = c.charged {
            *used = used.checked_add(charged.micros_i64()).ok_or_else(overflow)?;
        }
        Ok::<_, StoreError>(())
    };
    for c in closing {
        let mut level = Some(c.token_id.as_str());
        while let Some(token_id) = level {
            add(deltas.entry(token_id).or_default(), c)?;
            level = parents
                .get(token_id)
                .ok_or_else(|| StoreError::Corrupt(format!("token {token_id} is not locked")))?
                .as_deref();
        }
        if let Some(buyer_id) = &c.account {
            add(accounts.entry(buyer_id.as_str()).or_default(), c)?;
        }
    }
    let token_ids: Vec<&str> = deltas.keys().copied().collect();
    let used: Vec<i64> = deltas.values().map(|(used, _)| *used).collect();
    let freed: Vec<i64> = deltas.values().map(|(_, freed)| *freed).collect();
    execute(
        tx,
        "UPDATE tokens t SET used_micros = t.used_micros + u.used,
                             reserved_micros = t.reserved_micros - u.freed
         FROM unnest($1::text[], $2::int8[], $3::int8[]) AS u (token_id, used, freed)
         WHERE t.token_id = u.token_id",
        &[&token_ids, &used, &freed],
    )
    .await?;
    if accounts.is_empty() {
        return Ok(());
    }
    let buyer_ids: Vec<&str> = accounts.keys().copied().collect();
    // After the tokens, in id order, as every transaction locks accounts.
    query(
        tx,
        concat!(
            "SELECT buyer_id FROM buyers WHERE buyer_id = ANY($1)",
            " ORDER BY buyer_id FOR NO KEY UPDATE"
        ),
        &[&buyer_ids],
    )
    .await?;
    let used: Vec<i64> = accounts.values().map(|(used, _)| *used).collect();
    let freed: Vec<i64> = accounts.values().map(|(_, freed)| *freed).collect();
    // Spent today counts commits on their UTC day: the first of a day starts it afresh. The
    // day only moves forward: a settler whose clock is behind adds nothing to today.
    execute(
        tx,
        "UPDATE buyers b SET balance_micros = b.balance_micros - u.used,
                             held_micros = b.held_micros - u.freed,
                             spent_micros = CASE
                                 WHEN b.spent_day IS NULL OR $4 > b.spent_day THEN u.used
                                 WHEN $4 = b.spent_day THEN b.spent_micros + u.used
                                 ELSE b.spent_micros END,
                             spent_day = CASE
                                 WHEN b.spent_day IS NULL OR $4 > b.spent_day THEN $4
                                 ELSE b.spent_day END
         FROM unnest($1::text[], $2::int8[], $3::int8[]) AS u (buyer_id, used, freed)
         WHERE b.buyer_id = u.buyer_id",
        &[&buyer_ids, &used, &freed, &rules::utc_day(now)],
    )
    .await?;
    Ok(())
}

async fn insert_token(
    db: &impl GenericClient,
    token: &TokenGrant,
    parent_id: Option<&str>,
    now: UnixMillis,
    statement: &str,
) -> Result<(), StoreError> {
    let expires_at = sql::seconds_to_millis(token.expires_at)?;
    execute(
        db,
        statement,
        &[
            &token.token_id,
            &token.buyer_id,
            &token.buyer_tag,
            &token.service_id,
            &scope_name(token.scope),
            &token.limit_usdc.micros_i64(),
            &expires_at,
            &now,
            &parent_id,
            &token.sandbox,
        ],
    )
    .await?;
    Ok(())
}

async fn load_token(
    db: &impl GenericClient,
    token_id: &str,
) -> Result<Option<TokenRecord>, StoreError> {
    query_opt(db, sql::SELECT_TOKEN, &[&token_id])
        .await?
        .as_ref()
        .map(sql::token_record)
        .transpose()
}

/// Reads an account with `statement`: [`sql::SELECT_ACCOUNT`], or [`LOCK_ACCOUNT`] to lock
/// it too.
async fn load_account(
    db: &impl GenericClient,
    statement: &str,
    buyer_id: &str,
) -> Result<Option<Account>, StoreError> {
    query_opt(db, statement, &[&buyer_id]).await?.as_ref().map(sql::account).transpose()
}

fn tier_i32(tier: u32) -> Result<i32, StoreError> {
    i32::try_from(tier).map_err(|_| sql::corrupt("tier", tier))
}

async fn load_charge(
    db: &impl GenericClient,
    charge_id: &str,
) -> Result<Option<ChargeRecord>, StoreError> {
    query_opt(db, sql::SELECT_CHARGE, &[&charge_id])
        .await?
        .as_ref()
        .map(sql::charge_record)
        .transpose()
}

// Each statement is prepared once per connection (deadpool's statement cache).

/// Adds a revocation's feed entries (`insert`, which adds the tokens with open holds) and
/// answers the feed's position after them, or `None` if it added none. The table's lock,
/// held to the commit, makes the order of positions the order of commits.
async fn feed_revocation(
    tx: &Transaction<'_>,
    insert: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Option<u64>, StoreError> {
    tx.batch_execute("LOCK TABLE revocations IN EXCLUSIVE MODE").await?;
    if execute(tx, insert, params).await? == 0 {
        return Ok(None);
    }
    let head: i64 = query_one(tx, sql::FEED_HEAD, &[]).await?.try_get(0)?;
    Ok(Some(u64::try_from(head).unwrap_or(0)))
}

async fn query(
    db: &impl GenericClient,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>, StoreError> {
    let statement = db.prepare_cached(sql).await?;
    Ok(db.query(&statement, params).await?)
}

async fn query_one(
    db: &impl GenericClient,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Row, StoreError> {
    let statement = db.prepare_cached(sql).await?;
    Ok(db.query_one(&statement, params).await?)
}

async fn query_opt(
    db: &impl GenericClient,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Option<Row>, StoreError> {
    let statement = db.prepare_cached(sql).await?;
    Ok(db.query_opt(&statement, params).await?)
}

async fn execute(
    db: &impl GenericClient,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, StoreError> {
    let statement = db.prepare_cached(sql).await?;
    Ok(db.execute(&statement, params).await?)
}

/// One statement, outside any other work's transaction (x402 settlements).
impl PostgresStore {
    pub(super) async fn execute(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        execute(&self.pool.get().await?, sql, params).await
    }

    pub(super) async fn query<T>(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        read: impl Fn(&Row) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        query(&self.pool.get().await?, sql, params).await?.iter().map(read).collect()
    }
}

// The journal.

const DIALECT: Dialect = Dialect { placeholder: |n| format!("${n}"), byte_order: " COLLATE \"C\"" };

impl PostgresStore {
    pub async fn charges(&self, filter: ChargeFilter) -> Result<Vec<ChargeRecord>, StoreError> {
        let (statement, params) = journal::charges_query(&filter, &DIALECT);
        let params: Vec<Box<dyn ToSql + Sync + Send>> = params
            .into_iter()
            .map(|param| -> Box<dyn ToSql + Sync + Send> {
                match param {
                    Param::Text(text) => Box::new(text),
                    Param::Int(int) => Box::new(int),
                    Param::Bool(flag) => Box::new(flag),
                }
            })
            .collect();
        let params: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|param| &**param as &(dyn ToSql + Sync)).collect();
        let client = self.pool.get().await?;
        query(&client, &statement, &params).await?.iter().map(sql::charge_record).collect()
    }

    pub async fn service_totals(&self, window: ServiceWindow) -> Result<ServiceTotals, StoreError> {
        let client = self.pool.get().await?;
        let params: [&(dyn ToSql + Sync); 4] =
            [&window.service_id, &window.from, &window.to, &window.sandbox];
        let refusals = query(&client, &journal::refusals_query(&DIALECT), &params)
            .await?
            .iter()
            .map(|row| Ok((row.text(0)?, sql::count(row, 1)?)))
            .collect::<Result<_, StoreError>>()?;
        let row = query_one(&client, &journal::totals_query(&DIALECT), &params).await?;
        journal::totals(&row, refusals)
    }
}

// Buyer keys, and the console's views of the journal.
impl PostgresStore {
    pub async fn insert_buyer_key(&self, key: NewBuyerKey) -> Result<(), StoreError> {
        let (hash, label, services, max_limit, created_at) = key.columns();
        let record = &key.record;
        let client = self.pool.get().await?;
        execute(
            &client,
            sql::INSERT_BUYER_KEY,
            &[&record.key_id, &record.buyer_id, &hash, &label, &services, &max_limit, &created_at],
        )
        .await?;
        Ok(())
    }

    pub async fn buyer_keys(&self, buyer_id: String) -> Result<Vec<BuyerKeyRecord>, StoreError> {
        let client = self.pool.get().await?;
        query(&client, sql::SELECT_BUYER_KEYS, &[&buyer_id])
            .await?
            .iter()
            .map(sql::buyer_key)
            .collect()
    }

    pub async fn live_buyer_key(
        &self,
        key_hash: String,
    ) -> Result<Option<BuyerKeyRecord>, StoreError> {
        let client = self.pool.get().await?;
        query_opt(&client, sql::SELECT_LIVE_BUYER_KEY, &[&key_hash])
            .await?
            .as_ref()
            .map(sql::buyer_key)
            .transpose()
    }

    pub async fn revoke_buyer_key(
        &self,
        buyer_id: String,
        key_id: String,
        now: UnixMillis,
    ) -> Result<Option<BuyerKeyRecord>, StoreError> {
        let client = self.pool.get().await?;
        execute(&client, sql::REVOKE_BUYER_KEY, &[&now, &key_id, &buyer_id]).await?;
        query_opt(&client, sql::SELECT_BUYER_KEY, &[&key_id, &buyer_id])
            .await?
            .as_ref()
            .map(sql::buyer_key)
            .transpose()
    }

    pub async fn touch_buyer_key(&self, key_id: String, now: UnixMillis) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        execute(&client, sql::TOUCH_BUYER_KEY, &[&now, &key_id]).await.map(drop)
    }

    pub async fn service_ids(&self, since: UnixMillis) -> Result<Vec<String>, StoreError> {
        let client = self.pool.get().await?;
        query(&client, journal::SERVICE_IDS, &[&since])
            .await?
            .iter()
            .map(|row| row.text(0))
            .collect()
    }

    pub async fn service_series(
        &self,
        window: ServiceWindow,
        width: i64,
    ) -> Result<(Vec<(i64, ServiceTotals)>, Vec<(i64, String, u64)>), StoreError> {
        let client = self.pool.get().await?;
        let params: [&(dyn ToSql + Sync); 5] =
            [&window.from, &width, &window.service_id, &window.to, &window.sandbox];
        let buckets = query(&client, &journal::series_query(&DIALECT), &params)
            .await?
            .iter()
            .map(journal::bucket_totals)
            .collect::<Result<_, _>>()?;
        let refusals = query(&client, &journal::series_refusals_query(&DIALECT), &params)
            .await?
            .iter()
            .map(|row| Ok((row.int(0)?, row.text(1)?, sql::count(row, 2)?)))
            .collect::<Result<_, StoreError>>()?;
        Ok((buckets, refusals))
    }

    pub async fn top_spenders(
        &self,
        window: SpendWindow,
    ) -> Result<(Vec<TokenSpendRecord>, Vec<(String, Usdc, u64)>), StoreError> {
        let client = self.pool.get().await?;
        let limit = i64::try_from(window.limit).unwrap_or(i64::MAX);
        let params: [&(dyn ToSql + Sync); 4] = [&window.from, &window.to, &window.sandbox, &limit];
        let tokens = query(&client, &journal::top_tokens_query(&DIALECT), &params)
            .await?
            .iter()
            .map(journal::token_spend)
            .collect::<Result<_, _>>()?;
        let buyers = query(&client, &journal::top_buyers_query(&DIALECT), &params)
            .await?
            .iter()
            .map(journal::buyer_spend)
            .collect::<Result<_, _>>()?;
        Ok((tokens, buyers))
    }
}

/// Counts a refused reserve for its service's summary, in the reserve's transaction.
async fn record_refusal(
    tx: &Transaction<'_>,
    cmd: &ReserveCommand,
    sandbox: bool,
    refusal: &Refusal,
) -> Result<(), StoreError> {
    execute(
        tx,
        sql::INSERT_REFUSAL,
        &[&cmd.service_id, &cmd.token.token_id, &wire_name(refusal.code()), &cmd.now, &sandbox],
    )
    .await?;
    Ok(())
}
