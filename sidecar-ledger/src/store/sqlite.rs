//! The embedded store: one SQLite file in WAL mode, written by one thread that commits each
//! batch of waiting operations in a single transaction (group commit).
//!
//! - Durable: `synchronous = FULL`, and no caller hears back before the transaction holding
//!   its operation is committed, so every answer the ledger gave survives `kill -9` (and a
//!   power cut).
//! - Fast under load: operations that queue while a commit is syncing share the next one,
//!   and a batch waits a moment (at most 0.3 ms) for the callers the last one answered.
//! - Atomic per operation: each runs in a savepoint, so one that fails rolls back alone.

use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use paystile_protocol::Usdc;
use paystile_protocol::ledger_api::{
    ChargeStatus, GatewayConfirmations, RevocationFeed, SettleResult, SettleStatus, Settlement,
    TokenGrant,
};
use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags, Params, Row, params, params_from_iter};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot};

use super::journal::{
    self, ChargeFilter, Dialect, Param, ServiceTotals, ServiceWindow, SpendWindow, TokenSpendRecord,
};
use super::migrations::MIGRATIONS;
use super::sql::{self, Columns};
use super::{
    BuyerKeyRecord, BuyerRecord, ChargeRecord, DepositCommand, DepositRecord, ExpiredOnRead,
    FIRST_TIER, KeptRefusal, NewBuyerKey, PriorKey, ReserveCommand, ReserveOutcome, ReserveStep,
    Revoked, StoreError, TokenRecord, UnixMillis, confirmations, feed, replayed, scope_name,
    seq_i64, status_name,
};
use crate::rules::{self, Account, Books, ChildSpec, MAX_CHAIN_LEN, Refusal, SettleDecision};
use crate::telemetry::wire_name;

/// The most operations committed in one transaction.
const MAX_BATCH: usize = 512;
/// Operations waiting for the writer before callers wait to enqueue (backpressure).
const QUEUE_DEPTH: usize = 8192;
/// How long a batch may wait for the callers of the last one to come back (see [`collect`]).
const COLLECT_WAIT: Duration = Duration::from_micros(300);
/// How often the writer looks for them meanwhile.
const COLLECT_POLL: Duration = Duration::from_micros(20);
/// Prepared statements the writer keeps: more than the operations use, so that none of the
/// hot path's is ever evicted and compiled again.
const STATEMENT_CACHE: usize = 64;

/// A handle on the writer thread; cheap to clone. The thread ends when every handle is gone.
#[derive(Clone)]
pub struct SqliteStore {
    jobs: mpsc::Sender<Job>,
    /// A read-only connection for the journal's queries, which may scan many rows: in WAL
    /// mode they read the last commit without holding up the writer.
    reader: Arc<Mutex<Connection>>,
    /// Holds released on read (past their TTL when an operation touched their buyer),
    /// counted once their transaction has committed.
    pub(super) expired_on_read: ExpiredOnRead,
}

/// The transaction a batch of jobs runs in.
struct Batch<'c> {
    conn: &'c Connection,
    /// Set when a job could not roll its own savepoint back: the batch must not commit.
    poisoned: Cell<bool>,
}

/// What a job's caller hears once its batch has committed (or failed to).
type Reply = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
type Job = Box<dyn FnOnce(&Batch<'_>) -> Reply + Send>;

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, brings its schema up to date and
    /// starts the writer thread.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let mut conn = Connection::open(path)?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Corrupt(format!("cannot use WAL mode (got {mode})")));
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(Duration::from_secs(5))?;
        // rusqlite clears a cached statement's bindings when it is put back, and SQLite
        // expires (re-prepares at the next step) any statement whose plan looked at a bound
        // value, which its planner does for every join on `column = ?`: without the query
        // planner stability guarantee, the hot path's joins were compiled anew on each call.
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        migrate(&mut conn)?;
        let reader = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        reader.busy_timeout(Duration::from_secs(5))?;

        let (jobs, queue) = mpsc::channel(QUEUE_DEPTH);
        thread::Builder::new()
            .name("ledger-sqlite".into())
            .spawn(move || write_batches(conn, queue))
            .map_err(|e| StoreError::Corrupt(format!("cannot start the writer thread: {e}")))?;
        Ok(SqliteStore {
            jobs,
            reader: Arc::new(Mutex::new(reader)),
            expired_on_read: ExpiredOnRead::default(),
        })
    }

    /// Runs `op` in the writer's next transaction and answers once that has committed.
    async fn run<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (answer, answered) = oneshot::channel();
        let job: Job = Box::new(move |batch| {
            let result = in_savepoint(batch, op);
            Box::new(move |committed| {
                // The caller may have gone away (client disconnect); nothing to tell then.
                let _ = answer.send(committed.and(result));
            })
        });
        self.jobs.send(job).await.map_err(|_| StoreError::Closed)?;
        answered.await.map_err(|_| StoreError::Closed)?
    }

    pub async fn insert_token(&self, token: TokenGrant, now: UnixMillis) -> Result<(), StoreError> {
        self.run(move |conn| insert_token(conn, &token, None, now)).await
    }

    pub async fn token(
        &self,
        token_id: String,
        now: UnixMillis,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let (token, expired) = self
            .run(move |conn| {
                let expired = expire_token_buyer_holds(conn, &token_id, None, now)?;
                Ok((load_token(conn, &token_id)?, expired))
            })
            .await?;
        self.expired_on_read.count(expired);
        Ok(token)
    }

    /// Revokes the token (once; a second revoke keeps the first time). An unknown token is
    /// registered as `unknown` first, when given (a token the ledger has not seen used yet);
    /// otherwise the answer is `None`.
    pub async fn revoke_token(
        &self,
        token_id: String,
        unknown: Option<TokenGrant>,
        now: UnixMillis,
    ) -> Result<Revoked<Option<TokenRecord>>, StoreError> {
        self.run(move |conn| {
            if let Some(grant) = &unknown
                && load_token(conn, &token_id)?.is_none()
            {
                insert_token(conn, grant, None, now)?;
            }
            execute(conn, sql::REVOKE_SUBTREE, params![token_id, now])?;
            let fed = execute(conn, sql::FEED_SUBTREE, params![token_id, now])?;
            Ok(Revoked { value: load_token(conn, &token_id)?, feed_seq: feed_head(conn, fed)? })
        })
        .await
    }

    pub async fn mint_child(
        &self,
        parent_id: String,
        spec: ChildSpec,
        now: UnixMillis,
    ) -> Result<Option<Result<TokenRecord, Refusal>>, StoreError> {
        self.run(move |conn| {
            let chain = load_chain(conn, &parent_id)?;
            if chain.is_empty() {
                return Ok(None);
            }
            Ok(Some(match rules::child_grant(&chain, &spec) {
                Err(refusal) => Err(refusal),
                Ok(grant) => {
                    insert_token(conn, &grant, Some(&parent_id), now)?;
                    Ok(TokenRecord { parent_id: Some(parent_id), ..TokenRecord::new(grant) })
                }
            }))
        })
        .await
    }

    pub async fn deposit(
        &self,
        cmd: DepositCommand,
    ) -> Result<Result<DepositRecord, Refusal>, StoreError> {
        self.run(move |conn| {
            execute(conn, sql::OPEN_ACCOUNT, params![cmd.buyer_id, FIRST_TIER, cmd.now])?;
            let account = load_account(conn, &cmd.buyer_id)?
                .ok_or_else(|| StoreError::Corrupt("an account vanished".into()))?;
            let prior = match &cmd.reference {
                Some(reference) => {
                    query_opt(conn, sql::PRIOR_DEPOSIT, params![cmd.buyer_id, reference], |row| {
                        sql::prior_deposit(row)
                    })?
                }
                None => None,
            };
            let record = cmd.record(&account, prior)?;
            if let Ok(credit) = &record
                && !credit.replayed
            {
                execute(
                    conn,
                    sql::SET_BALANCE,
                    params![credit.balance.micros_i64(), cmd.buyer_id],
                )?;
                execute(
                    conn,
                    sql::INSERT_DEPOSIT,
                    params![
                        cmd.deposit_id,
                        cmd.buyer_id,
                        cmd.amount.micros_i64(),
                        cmd.reference,
                        cmd.now
                    ],
                )?;
            }
            Ok(record)
        })
        .await
    }

    pub async fn set_tier(
        &self,
        buyer_id: String,
        tier: u32,
        now: UnixMillis,
    ) -> Result<Account, StoreError> {
        self.run(move |conn| {
            execute(conn, sql::SET_TIER, params![buyer_id, tier, now])?;
            load_account(conn, &buyer_id)?
                .ok_or_else(|| StoreError::Corrupt("an account vanished".into()))
        })
        .await
    }

    pub async fn buyer(
        &self,
        buyer_id: String,
        now: UnixMillis,
    ) -> Result<BuyerRecord, StoreError> {
        let (buyer, expired) = self
            .run(move |conn| {
                let expired = expire_buyer_holds(conn, &buyer_id, now)?;
                let account = load_account(conn, &buyer_id)?;
                let tokens = query_all(conn, sql::SELECT_BUYER_TOKENS, params![buyer_id], |row| {
                    sql::token_record(row)
                })?;
                Ok((BuyerRecord { account, tokens }, expired))
            })
            .await?;
        self.expired_on_read.count(expired);
        Ok(buyer)
    }

    pub async fn revoke_buyer(
        &self,
        buyer_id: String,
        now: UnixMillis,
    ) -> Result<Revoked<Option<u64>>, StoreError> {
        self.run(move |conn| {
            let revoked = execute(conn, sql::REVOKE_BUYER, params![now, buyer_id])?;
            let known = revoked > 0
                || query_opt(conn, sql::BUYER_KNOWN, params![buyer_id], |_| Ok(()))?.is_some();
            let fed = execute(conn, sql::FEED_BUYER, params![now, buyer_id])?;
            Ok(Revoked {
                value: known.then(|| u64::try_from(revoked).unwrap_or(u64::MAX)),
                feed_seq: feed_head(conn, fed)?,
            })
        })
        .await
    }

    /// The revocation feed after `after`: at most `limit` entries.
    pub async fn revocations_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<RevocationFeed, StoreError> {
        self.read(move |conn| {
            let entries = query_all(
                conn,
                sql::FEED_AFTER,
                params![seq_i64(after), i64::try_from(limit).unwrap_or(i64::MAX)],
                |row| Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?)),
            )?;
            let head = conn.prepare_cached(sql::FEED_HEAD)?.query_row([], |row| row.get(0))?;
            Ok(feed(after, entries, head))
        })
        .await
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
        self.run(move |conn| {
            execute(conn, sql::WATCHER_SEEN, params![watcher, seq_i64(seq), now])?;
            execute(conn, sql::WATCHERS_GONE, params![forget_before])?;
            Ok(())
        })
        .await
    }

    /// The watchers heard from since `live_since`, split by whether they applied `seq`.
    pub async fn watchers(
        &self,
        seq: u64,
        live_since: UnixMillis,
    ) -> Result<GatewayConfirmations, StoreError> {
        self.read(move |conn| {
            let rows =
                query_all(conn, sql::WATCHERS_LIVE, params![seq_i64(seq), live_since], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, bool>(1)?))
                })?;
            Ok(confirmations(rows))
        })
        .await
    }

    pub async fn charge(
        &self,
        charge_id: String,
        now: UnixMillis,
    ) -> Result<Option<ChargeRecord>, StoreError> {
        let (charge, expired) = self
            .run(move |conn| {
                let buyer_id =
                    query_opt(conn, sql::CHARGE_BUYER, params![charge_id], |row| row.text(0))?;
                let expired = match buyer_id {
                    Some(buyer_id) => expire_buyer_holds(conn, &buyer_id, now)?,
                    None => 0,
                };
                Ok((load_charge(conn, &charge_id)?, expired))
            })
            .await?;
        self.expired_on_read.count(expired);
        Ok(charge)
    }

    pub async fn reserve(&self, command: ReserveCommand) -> Result<ReserveOutcome, StoreError> {
        let (outcome, expired) = self
            .run(move |conn| {
                let mut expired = 0;
                Ok((reserve(conn, &command, &mut expired)?, expired))
            })
            .await?;
        self.expired_on_read.count(expired);
        Ok(outcome)
    }

    pub async fn settle(
        &self,
        settlements: Vec<Settlement>,
        now: UnixMillis,
    ) -> Result<Vec<SettleResult>, StoreError> {
        self.run(move |conn| {
            let mut results = Vec::with_capacity(settlements.len());
            for s in &settlements {
                let held = match s.amount_usdc {
                    None => None,
                    Some(_) => query_opt(
                        conn,
                        "SELECT held_micros FROM charges WHERE charge_id = ?1",
                        params![s.charge_id],
                        |row| sql::usdc(row, 0),
                    )?,
                };
                if let Some(Err(problem)) =
                    held.map(|held| rules::commit_amount(s.amount_usdc, held))
                {
                    results.push(SettleResult::invalid(&s.charge_id, problem));
                    continue;
                }
                let status = settle(conn, s, now)?;
                results.push(SettleResult { charge_id: s.charge_id.clone(), status, error: None });
            }
            Ok(results)
        })
        .await
    }

    /// Moves the expiry of every open hold to `until` at the earliest; answers how many.
    /// A ledger that was down must not expire the holds whose outcomes gateways are still
    /// waiting to deliver.
    pub async fn extend_open_holds(&self, until: UnixMillis) -> Result<usize, StoreError> {
        self.run(move |conn| {
            let extended = conn.execute(
                "UPDATE charges SET hold_expires_at = ?1 WHERE status = 'held' AND hold_expires_at < ?1",
                params![until],
            )?;
            Ok(extended)
        })
        .await
    }

    /// Releases up to `limit` holds whose TTL has passed; answers how many.
    pub async fn expire_holds(&self, now: UnixMillis, limit: usize) -> Result<usize, StoreError> {
        self.run(move |conn| expire_holds(conn, now, limit)).await
    }

    pub async fn purge_idempotency_keys(
        &self,
        before: UnixMillis,
        limit: usize,
    ) -> Result<usize, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(move |conn| execute(conn, sql::PURGE_IDEMPOTENCY_KEYS, params![before, limit]))
            .await
    }

    pub async fn prune_revocations(&self, before: UnixMillis) -> Result<usize, StoreError> {
        self.run(move |conn| execute(conn, sql::PRUNE_FEED, params![before])).await
    }
}

/// Brings the schema up to date, and turns foreign keys on. Migrations run with them off, as
/// SQLite's procedure for rebuilding a table that others reference requires, and are
/// checked against them before each commits.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let applied: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    let applied = usize::try_from(applied).unwrap_or(usize::MAX);
    if applied > MIGRATIONS.len() {
        return Err(StoreError::Corrupt(format!(
            "the database has schema version {applied}, newer than this ledger's {}",
            MIGRATIONS.len()
        )));
    }
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    for migration in MIGRATIONS.iter().skip(applied) {
        let tx = conn.transaction()?;
        tx.execute_batch(migration.sqlite)?;
        if tx.prepare("PRAGMA foreign_key_check")?.exists([])? {
            return Err(StoreError::Corrupt(format!(
                "schema version {} would break a foreign key",
                migration.version
            )));
        }
        tx.pragma_update(None, "user_version", migration.version)?;
        tx.commit()?;
    }
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(())
}

/// The writer thread: take what is waiting, run it in one transaction, commit, answer.
fn write_batches(conn: Connection, mut queue: mpsc::Receiver<Job>) {
    let mut answered = 0;
    while let Some(first) = queue.blocking_recv() {
        let jobs = collect(first, &mut queue, answered);
        answered = jobs.len();
        let outcome = run_batch(&conn, jobs);
        if let Err(e) = outcome {
            tracing::error!(error = %e, "ledger transaction failed; its callers were told");
        }
    }
}

/// The batch that starts with `first`: every operation waiting, and while fewer are waiting
/// than the last batch answered, those that arrive within [`COLLECT_WAIT`]. Callers just
/// answered send their next operation within microseconds, but a batch that starts before
/// they do spends a disk sync on a few of them and the next sync on the rest: waiting keeps
/// them in one batch (under a steady hot-token load, twice its size). A lone caller never
/// waits.
fn collect(first: Job, queue: &mut mpsc::Receiver<Job>, answered: usize) -> Vec<Job> {
    let mut jobs = vec![first];
    let deadline = Instant::now() + COLLECT_WAIT;
    loop {
        while jobs.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => jobs.push(job),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return jobs,
            }
        }
        if jobs.len() >= answered.min(MAX_BATCH) || Instant::now() >= deadline {
            return jobs;
        }
        thread::sleep(COLLECT_POLL);
    }
}

fn run_batch(conn: &Connection, jobs: Vec<Job>) -> Result<(), StoreError> {
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        let e = StoreError::from(e);
        // A job never run still owes its caller an answer: run none, fail all.
        let batch = Batch { conn, poisoned: Cell::new(true) };
        for job in jobs {
            job(&batch)(Err(e.clone()));
        }
        return Err(e);
    }
    let batch = Batch { conn, poisoned: Cell::new(false) };
    let replies: Vec<Reply> = jobs.into_iter().map(|job| job(&batch)).collect();
    let committed = if batch.poisoned.get() {
        Err(StoreError::Corrupt("a savepoint could not be rolled back".into()))
    } else {
        conn.execute_batch("COMMIT").map_err(StoreError::from)
    };
    if committed.is_err() {
        // Nothing of this batch may stay half-applied; ROLLBACK fails only if no transaction
        // is open, which is the state we want anyway.
        let _ = conn.execute_batch("ROLLBACK");
    }
    for reply in replies {
        reply(committed.clone());
    }
    committed
}

/// Runs one operation in a savepoint so that its failure undoes its own writes only.
fn in_savepoint<T>(
    batch: &Batch<'_>,
    op: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    if batch.poisoned.get() {
        return Err(StoreError::Corrupt("the transaction could not start".into()));
    }
    // Prepared once, like every statement of the hot path: parsing them anew for each
    // operation cost more than running them.
    let run = |sql| batch.conn.prepare_cached(sql).and_then(|mut statement| statement.execute([]));
    run("SAVEPOINT op")?;
    // A panic (a bug) fails this operation alone, rolled back like an error: it must not
    // take the writer thread, and every later operation, with it.
    let result = panic::catch_unwind(AssertUnwindSafe(|| op(batch.conn)))
        .unwrap_or_else(|panic| Err(StoreError::panicked(&*panic)));
    let closed = match &result {
        Ok(_) => run("RELEASE op").map(drop),
        Err(_) => batch.conn.execute_batch("ROLLBACK TO op; RELEASE op"),
    };
    if let Err(e) = closed {
        batch.poisoned.set(true);
        return Err(e.into());
    }
    result
}

/// Reserves `cmd`; `expired` is set to how many of the buyer's holds were released on read.
fn reserve(
    conn: &Connection,
    cmd: &ReserveCommand,
    expired: &mut usize,
) -> Result<ReserveOutcome, StoreError> {
    // Holds past their TTL count against no level of the chain nor the account, and keep no
    // key in flight: the buyer's expired holds are released first.
    *expired =
        expire_token_buyer_holds(conn, &cmd.token.token_id, Some(&cmd.token.buyer_id), cmd.now)?;
    let mut chain = load_chain(conn, &cmd.token.token_id)?;
    if chain.is_empty() {
        insert_token(conn, &cmd.token, None, cmd.now)?;
        chain.push(TokenRecord::new(cmd.token.clone()));
    }
    let token = &chain[0];
    let token_id = &token.grant.token_id;
    let account = load_account(conn, &token.grant.buyer_id)?;
    let books = Books {
        chain: &chain,
        account: account.as_ref(),
        today: rules::utc_day(cmd.now),
        daily_limits: &cmd.daily_limits,
    };
    let prior = match &cmd.idempotency {
        Some(idempotency) => {
            query_opt(conn, sql::PRIOR_KEY, params![token_id, idempotency.key], |row| {
                PriorKey::read(row)
            })?
        }
        None => None,
    };
    match cmd.step(&books, prior)? {
        ReserveStep::Refuse { refusal, key } => {
            record_refusal(conn, cmd, token.grant.sandbox, &refusal)?;
            if let Some(idempotency) = key {
                let kept = KeptRefusal::of(&refusal)?;
                execute(
                    conn,
                    sql::KEY_REFUSED,
                    params![
                        token_id,
                        idempotency.key,
                        idempotency.fingerprint,
                        cmd.now,
                        kept.code,
                        kept.price,
                        kept.limit,
                        kept.used,
                        kept.reserved,
                        kept.available,
                        kept.tier
                    ],
                )?;
            }
            Ok(ReserveOutcome::Refused(refusal))
        }
        ReserveStep::RefuseAgain(refusal) => Ok(ReserveOutcome::RefusedAgain(refusal)),
        ReserveStep::Replay { charge_id, key } => {
            execute(conn, sql::KEY_REPLAYED, params![token_id, key])?;
            let first = load_charge(conn, &charge_id)?
                .ok_or_else(|| StoreError::Corrupt("an idempotency key names no charge".into()))?;
            Ok(replayed(first, &chain))
        }
        ReserveStep::Hold { holds, on_account } => {
            for (charge_id, key) in cmd.hold_rows(&holds) {
                execute(
                    conn,
                    sql::INSERT_HOLD,
                    params![
                        charge_id,
                        token_id,
                        cmd.service_id,
                        cmd.price.micros_i64(),
                        key,
                        cmd.now,
                        cmd.hold_expires_at,
                        on_account,
                    ],
                )?;
            }
            // Held at every level of the chain, and on the account.
            let total = holds.total.micros_i64();
            for level in &chain {
                execute(conn, RESERVE_ON_TOKEN, params![total, level.grant.token_id])?;
            }
            if on_account {
                execute(conn, sql::HOLD_ON_ACCOUNT, params![total, token.grant.buyer_id])?;
            }
            if let Some(idempotency) = &cmd.idempotency {
                execute(
                    conn,
                    sql::KEY_CHARGED,
                    params![
                        token_id,
                        idempotency.key,
                        idempotency.fingerprint,
                        cmd.charge_id,
                        cmd.now
                    ],
                )?;
            }
            Ok(cmd.held(&holds))
        }
    }
}

/// One level of a chain's hold (PostgreSQL holds on every level in one statement).
const RESERVE_ON_TOKEN: &str =
    "UPDATE tokens SET reserved_micros = reserved_micros + ?1 WHERE token_id = ?2";

fn settle(conn: &Connection, s: &Settlement, now: UnixMillis) -> Result<SettleStatus, StoreError> {
    let hold = query_opt(
        conn,
        "SELECT c.charge_id, c.token_id, t.buyer_id, c.on_account, c.held_micros, t.parent_id,
                c.status, c.hold_expires_at, t.revoked_at IS NOT NULL
         FROM charges c JOIN tokens t ON t.token_id = c.token_id
         WHERE c.charge_id = ?1",
        params![s.charge_id],
        |row| Ok((open_hold(row)?, sql::charge_status(row, 6)?, row.int(7)?, row.flag(8)?)),
    )?;
    let Some((hold, status, hold_expires_at, revoked)) = hold else {
        return Ok(SettleStatus::Unknown);
    };
    let upstream_status = s.upstream_status.map(i64::from);
    // The caller answered a settlement that does not fit its hold `invalid` before this.
    let amount = rules::commit_amount(s.amount_usdc, hold.held).map_err(StoreError::Corrupt)?;
    match rules::settle(status, now >= hold_expires_at, revoked, s.outcome, amount) {
        SettleDecision::Unchanged(result) => Ok(result),
        SettleDecision::Commit(amount) => {
            close_hold(conn, &hold, Some(amount), now, upstream_status)?;
            Ok(SettleStatus::Committed)
        }
        SettleDecision::Release(result) => {
            close_hold(conn, &hold, None, now, upstream_status)?;
            Ok(result)
        }
    }
}

/// A held charge, as closing it needs it.
struct OpenHold {
    charge_id: String,
    token_id: String,
    buyer_id: String,
    on_account: bool,
    held: Usdc,
    /// The token's parent, for a child token.
    parent_id: Option<String>,
}

/// Reads an [`OpenHold`] from columns 0 to 5: charge id, token id, buyer id, on_account, held,
/// the token's parent.
fn open_hold(row: &Row<'_>) -> Result<OpenHold, StoreError> {
    Ok(OpenHold {
        charge_id: row.text(0)?,
        token_id: row.text(1)?,
        buyer_id: row.text(2)?,
        on_account: row.flag(3)?,
        held: sql::usdc(row, 4)?,
        parent_id: row.opt_text(5)?,
    })
}

fn expire_holds(conn: &Connection, now: UnixMillis, limit: usize) -> Result<usize, StoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let expired = query_all(
        conn,
        "SELECT c.charge_id, c.token_id, t.buyer_id, c.on_account, c.held_micros, t.parent_id
         FROM charges c JOIN tokens t ON t.token_id = c.token_id
         WHERE c.status = 'held' AND c.hold_expires_at <= ?1
         ORDER BY c.hold_expires_at LIMIT ?2",
        params![now, limit],
        open_hold,
    )?;
    for hold in &expired {
        close_hold(conn, hold, None, now, None)?;
    }
    Ok(expired.len())
}

/// Whether any open hold is past its TTL at `now`: one probe of the open holds' expiry
/// index. The sweeper keeps that set near empty, so this usually spares an operation the
/// search through its buyer's tokens.
fn any_hold_due(conn: &Connection, now: UnixMillis) -> Result<bool, StoreError> {
    let due = conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM charges WHERE status = 'held' AND hold_expires_at <= ?1)",
        )?
        .query_row(params![now], |row| row.get(0))?;
    Ok(due)
}

/// Releases every hold of the buyer whose TTL has passed (on read: the sweeper may lag).
/// The buyer's, not just one token's: each level of a chain of delegation, and the buyer's
/// account, count the holds of every token below them.
fn expire_buyer_holds(
    conn: &Connection,
    buyer_id: &str,
    now: UnixMillis,
) -> Result<usize, StoreError> {
    if !any_hold_due(conn, now)? {
        return Ok(0);
    }
    release_buyer_holds(conn, buyer_id, now)
}

/// [`expire_buyer_holds`] once some hold is known to be due.
fn release_buyer_holds(
    conn: &Connection,
    buyer_id: &str,
    now: UnixMillis,
) -> Result<usize, StoreError> {
    let expired = query_all(
        conn,
        "SELECT c.charge_id, c.token_id, t.buyer_id, c.on_account, c.held_micros, t.parent_id
         FROM charges c JOIN tokens t ON t.token_id = c.token_id
         WHERE c.status = 'held' AND c.hold_expires_at <= ?1 AND t.buyer_id = ?2",
        params![now, buyer_id],
        open_hold,
    )?;
    for hold in &expired {
        close_hold(conn, hold, None, now, None)?;
    }
    Ok(expired.len())
}

/// [`expire_buyer_holds`] for the buyer of `token_id` (`buyer_id` if the token is unknown).
fn expire_token_buyer_holds(
    conn: &Connection,
    token_id: &str,
    buyer_id: Option<&str>,
    now: UnixMillis,
) -> Result<usize, StoreError> {
    if !any_hold_due(conn, now)? {
        return Ok(0);
    }
    let stored = query_opt(
        conn,
        "SELECT buyer_id FROM tokens WHERE token_id = ?1",
        params![token_id],
        |row| row.text(0),
    )?;
    match stored.as_deref().or(buyer_id) {
        Some(buyer_id) => release_buyer_holds(conn, buyer_id, now),
        None => Ok(0),
    }
}

/// Closes a held charge, at every level of its token's chain and on its buyer's account if
/// it was held there: committed for `charged` (which becomes used, and is debited from the
/// account; the rest of the hold is freed), or released (all of it freed) when `charged` is
/// `None`.
fn close_hold(
    conn: &Connection,
    hold: &OpenHold,
    charged: Option<Usdc>,
    now: UnixMillis,
    upstream_status: Option<i64>,
) -> Result<(), StoreError> {
    let status = if charged.is_some() { ChargeStatus::Committed } else { ChargeStatus::Released };
    let committed = charged.map(Usdc::micros_i64);
    conn.prepare_cached(
        "UPDATE charges SET status = ?1, settled_at = ?2, upstream_status = ?3,
                            committed_micros = ?4
         WHERE charge_id = ?5 AND status = 'held'",
    )?
    .execute(params![status_name(status), now, upstream_status, committed, hold.charge_id])?;
    let (held, used) = (hold.held.micros_i64(), committed.unwrap_or(0));
    // Every level of the chain, one plain statement each: a recursive CTE (or RETURNING)
    // builds a temporary table on every run, which costs more than the update itself.
    let mut token_id = hold.token_id.clone();
    let mut parent_id = hold.parent_id.clone();
    for level in 1.. {
        conn.prepare_cached(
            "UPDATE tokens SET used_micros = used_micros + ?1,
                               reserved_micros = reserved_micros - ?2
             WHERE token_id = ?3",
        )?
        .execute(params![used, held, token_id])?;
        let Some(parent) = parent_id else { break };
        if level == MAX_CHAIN_LEN {
            return Err(StoreError::Corrupt(format!("the chain of {} is too long", hold.token_id)));
        }
        parent_id = conn
            .prepare_cached("SELECT parent_id FROM tokens WHERE token_id = ?1")?
            .query_row(params![parent], |row| row.get(0))?;
        token_id = parent;
    }
    if hold.on_account {
        // Spent today counts commits on their UTC day: the first of a day starts it afresh.
        // The day only moves forward: a settler whose clock is behind adds nothing to today.
        conn.prepare_cached(
            "UPDATE buyers SET balance_micros = balance_micros - ?1,
                               held_micros = held_micros - ?2,
                               spent_micros = CASE
                                   WHEN spent_day IS NULL OR ?3 > spent_day THEN ?1
                                   WHEN ?3 = spent_day THEN spent_micros + ?1
                                   ELSE spent_micros END,
                               spent_day = CASE
                                   WHEN spent_day IS NULL OR ?3 > spent_day THEN ?3
                                   ELSE spent_day END
             WHERE buyer_id = ?4",
        )?
        .execute(params![used, held, rules::utc_day(now), hold.buyer_id])?;
    }
    Ok(())
}

fn insert_token(
    conn: &Connection,
    token: &TokenGrant,
    parent_id: Option<&str>,
    now: UnixMillis,
) -> Result<(), StoreError> {
    let expires_at = sql::seconds_to_millis(token.expires_at)?;
    execute(
        conn,
        sql::INSERT_TOKEN,
        params![
            token.token_id,
            token.buyer_id,
            token.buyer_tag,
            token.service_id,
            scope_name(token.scope),
            token.limit_usdc.micros_i64(),
            expires_at,
            now,
            parent_id,
            token.sandbox,
        ],
    )?;
    Ok(())
}

fn load_token(conn: &Connection, token_id: &str) -> Result<Option<TokenRecord>, StoreError> {
    query_opt(conn, sql::SELECT_TOKEN, params![token_id], |row| sql::token_record(row))
}

/// The token and its ancestors, the token first; empty for an unknown token.
fn load_chain(conn: &Connection, token_id: &str) -> Result<Vec<TokenRecord>, StoreError> {
    let mut chain = Vec::new();
    let mut next = load_token(conn, token_id)?;
    while let Some(token) = next {
        if chain.len() == MAX_CHAIN_LEN {
            return Err(StoreError::Corrupt(format!("the chain of {token_id} is too long")));
        }
        next = match &token.parent_id {
            Some(parent_id) => Some(load_token(conn, parent_id)?.ok_or_else(|| {
                StoreError::Corrupt(format!("the parent {parent_id} is missing"))
            })?),
            None => None,
        };
        chain.push(token);
    }
    Ok(chain)
}

fn load_account(conn: &Connection, buyer_id: &str) -> Result<Option<Account>, StoreError> {
    query_opt(conn, sql::SELECT_ACCOUNT, params![buyer_id], |row| sql::account(row))
}

fn load_charge(conn: &Connection, charge_id: &str) -> Result<Option<ChargeRecord>, StoreError> {
    query_opt(conn, sql::SELECT_CHARGE, params![charge_id], |row| sql::charge_record(row))
}

// Each statement is prepared once (the writer's statement cache).

/// The feed's position once a revocation that added `fed` entries has committed; `None` if
/// it added none. The single writer orders feed entries by commit.
fn feed_head(conn: &Connection, fed: usize) -> Result<Option<u64>, StoreError> {
    if fed == 0 {
        return Ok(None);
    }
    let head: i64 = conn.prepare_cached(sql::FEED_HEAD)?.query_row([], |row| row.get(0))?;
    Ok(Some(u64::try_from(head).unwrap_or(0)))
}

fn execute(conn: &Connection, sql: &str, params: impl Params) -> Result<usize, StoreError> {
    Ok(conn.prepare_cached(sql)?.execute(params)?)
}

fn query_opt<T>(
    conn: &Connection,
    sql: &str,
    params: impl Params,
    read: impl FnOnce(&Row<'_>) -> Result<T, StoreError>,
) -> Result<Option<T>, StoreError> {
    let mut statement = conn.prepare_cached(sql)?;
    let mut rows = statement.query(params)?;
    rows.next()?.map(read).transpose()
}

fn query_all<T>(
    conn: &Connection,
    sql: &str,
    params: impl Params,
    read: impl Fn(&Row<'_>) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut statement = conn.prepare_cached(sql)?;
    let mut rows = statement.query(params)?;
    let mut all = Vec::new();
    while let Some(row) = rows.next()? {
        all.push(read(row)?);
    }
    Ok(all)
}

/// One statement (x402 settlements): a write runs in the writer's next transaction.
impl SqliteStore {
    pub(super) async fn execute<P>(&self, sql: &'static str, params: P) -> Result<usize, StoreError>
    where
        P: Params + Send + 'static,
    {
        self.run(move |conn| execute(conn, sql, params)).await
    }

    /// Reads with one statement, on the read-only connection.
    pub(super) async fn read_all<T, P>(
        &self,
        sql: &'static str,
        params: P,
        read: impl Fn(&Row<'_>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<Vec<T>, StoreError>
    where
        T: Send + 'static,
        P: Params + Send + 'static,
    {
        self.read(move |conn| query_all(conn, sql, params, read)).await
    }
}

// The journal.

const DIALECT: Dialect = Dialect { placeholder: |n| format!("?{n}"), byte_order: "" };

impl SqliteStore {
    /// Runs `op` on the read-only connection, off the async runtime's threads.
    async fn read<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            // A read that panicked left the connection as it was (reads change nothing).
            let conn = reader.lock().unwrap_or_else(PoisonError::into_inner);
            panic::catch_unwind(AssertUnwindSafe(|| op(&conn)))
                .unwrap_or_else(|panic| Err(StoreError::panicked(&*panic)))
        })
        .await
        .map_err(|_| StoreError::Closed)?
    }

    pub async fn charges(&self, filter: ChargeFilter) -> Result<Vec<ChargeRecord>, StoreError> {
        self.read(move |conn| {
            let (statement, params) = journal::charges_query(&filter, &DIALECT);
            let params = params.into_iter().map(|param| match param {
                Param::Text(text) => rusqlite::types::Value::Text(text),
                Param::Int(int) => rusqlite::types::Value::Integer(int),
                Param::Bool(flag) => rusqlite::types::Value::Integer(i64::from(flag)),
            });
            query_all(conn, &statement, params_from_iter(params), |row| sql::charge_record(row))
        })
        .await
    }

    pub async fn service_totals(&self, window: ServiceWindow) -> Result<ServiceTotals, StoreError> {
        self.read(move |conn| {
            let params = params![window.service_id, window.from, window.to, window.sandbox];
            let refusals = query_all(conn, &journal::refusals_query(&DIALECT), params, |row| {
                Ok((row.text(0)?, sql::count(row, 1)?))
            })?;
            query_opt(conn, &journal::totals_query(&DIALECT), params, |row| {
                journal::totals(row, refusals)
            })?
            .ok_or_else(|| StoreError::Corrupt("no totals".into()))
        })
        .await
    }
}

// Buyer keys, and the console's views of the journal.
impl SqliteStore {
    pub async fn insert_buyer_key(&self, key: NewBuyerKey) -> Result<(), StoreError> {
        self.run(move |conn| {
            let (hash, label, services, max_limit, created_at) = key.columns();
            let record = &key.record;
            execute(
                conn,
                sql::INSERT_BUYER_KEY,
                params![
                    record.key_id,
                    record.buyer_id,
                    hash,
                    label,
                    services,
                    max_limit,
                    created_at
                ],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn buyer_keys(&self, buyer_id: String) -> Result<Vec<BuyerKeyRecord>, StoreError> {
        self.read(move |conn| {
            query_all(conn, sql::SELECT_BUYER_KEYS, params![buyer_id], |row| sql::buyer_key(row))
        })
        .await
    }

    pub async fn live_buyer_key(
        &self,
        key_hash: String,
    ) -> Result<Option<BuyerKeyRecord>, StoreError> {
        self.read(move |conn| {
            query_opt(conn, sql::SELECT_LIVE_BUYER_KEY, params![key_hash], |row| {
                sql::buyer_key(row)
            })
        })
        .await
    }

    pub async fn revoke_buyer_key(
        &self,
        buyer_id: String,
        key_id: String,
        now: UnixMillis,
    ) -> Result<Option<BuyerKeyRecord>, StoreError> {
        self.run(move |conn| {
            execute(conn, sql::REVOKE_BUYER_KEY, params![now, key_id, buyer_id])?;
            query_opt(conn, sql::SELECT_BUYER_KEY, params![key_id, buyer_id], |row| {
                sql::buyer_key(row)
            })
        })
        .await
    }

    pub async fn touch_buyer_key(&self, key_id: String, now: UnixMillis) -> Result<(), StoreError> {
        self.execute(sql::TOUCH_BUYER_KEY, (now, key_id)).await.map(drop)
    }

    pub async fn service_ids(&self, since: UnixMillis) -> Result<Vec<String>, StoreError> {
        self.read_all(journal::SERVICE_IDS, (since,), |row| row.text(0)).await
    }

    pub async fn service_series(
        &self,
        window: ServiceWindow,
        width: i64,
    ) -> Result<(Vec<(i64, ServiceTotals)>, Vec<(i64, String, u64)>), StoreError> {
        self.read(move |conn| {
            let params = params![window.from, width, window.service_id, window.to, window.sandbox];
            let buckets = query_all(conn, &journal::series_query(&DIALECT), params, |row| {
                journal::bucket_totals(row)
            })?;
            let refusals =
                query_all(conn, &journal::series_refusals_query(&DIALECT), params, |row| {
                    Ok((row.int(0)?, row.text(1)?, sql::count(row, 2)?))
                })?;
            Ok((buckets, refusals))
        })
        .await
    }

    pub async fn top_spenders(
        &self,
        window: SpendWindow,
    ) -> Result<(Vec<TokenSpendRecord>, Vec<(String, Usdc, u64)>), StoreError> {
        self.read(move |conn| {
            let limit = i64::try_from(window.limit).unwrap_or(i64::MAX);
            let params = params![window.from, window.to, window.sandbox, limit];
            let tokens = query_all(conn, &journal::top_tokens_query(&DIALECT), params, |row| {
                journal::token_spend(row)
            })?;
            let buyers = query_all(conn, &journal::top_buyers_query(&DIALECT), params, |row| {
                journal::buyer_spend(row)
            })?;
            Ok((tokens, buyers))
        })
        .await
    }
}

/// Counts a refused reserve for its service's summary, in the reserve's transaction.
fn record_refusal(
    conn: &Connection,
    cmd: &ReserveCommand,
    sandbox: bool,
    refusal: &Refusal,
) -> Result<(), StoreError> {
    execute(
        conn,
        sql::INSERT_REFUSAL,
        params![cmd.service_id, cmd.token.token_id, wire_name(refusal.code()), cmd.now, sandbox],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::KeyOutcome;

    /// A bug that panics inside one operation fails that operation, rolled back; the writer
    /// thread and the reader go on serving the others.
    #[allow(clippy::panic)]
    #[tokio::test]
    async fn a_panicking_operation_fails_alone_and_the_store_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("ledger.db")).unwrap();
        let write = store
            .run(|conn| -> Result<(), StoreError> {
                conn.execute_batch("CREATE TABLE half_done (x)")?;
                panic!("a bug")
            })
            .await;
        assert!(matches!(&write, Err(StoreError::Panicked(m)) if m == "a bug"), "{write:?}");
        let read = store.read(|_| -> Result<(), StoreError> { panic!("a read bug") }).await;
        assert!(matches!(read, Err(StoreError::Panicked(_))), "{read:?}");
        for _ in 0..2 {
            let tables = store
                .read(|conn| {
                    let sql = "SELECT count(*) FROM sqlite_master WHERE name = 'half_done'";
                    Ok(conn.query_row(sql, [], |row| row.get::<_, i64>(0))?)
                })
                .await
                .unwrap();
            assert_eq!(tables, 0, "the panicking operation was not rolled back");
            store.run(|conn| Ok(conn.execute_batch("SELECT 1")?)).await.unwrap();
        }
    }

    /// Books written by version 1 keep their meaning: a committed charge charged all it held,
    /// and an Idempotency-Key still names its charge.
    #[test]
    fn version_1_books_migrate_with_their_meaning() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(MIGRATIONS[0].sqlite).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute_batch(
            "INSERT INTO tokens (token_id, buyer_id, scope, limit_micros, used_micros,
                                 reserved_micros, expires_at, created_at)
                 VALUES ('tok', 'b', 'SINGLE', 10, 3, 4, 0, 0);
             INSERT INTO charges (charge_id, token_id, service_id, held_micros, status,
                                  idempotency_key, created_at, hold_expires_at)
                 VALUES ('ch_c', 'tok', 's', 3, 'committed', 'k', 0, 0),
                        ('ch_h', 'tok', 's', 4, 'held', NULL, 0, 0);
             INSERT INTO idempotency_keys (token_id, key, fingerprint, charge_id, replays, created_at)
                 VALUES ('tok', 'k', 'fp', 'ch_c', 2, 7);",
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let committed = |id: &str| {
            conn.query_row(
                "SELECT committed_micros FROM charges WHERE charge_id = ?1",
                [id],
                |row| row.get::<_, Option<i64>>(0),
            )
            .unwrap()
        };
        assert_eq!((committed("ch_c"), committed("ch_h")), (Some(3), None));
        let key = conn
            .query_row(
                "SELECT charge_id, refusal_code, replays, created_at FROM idempotency_keys",
                [],
                |row| {
                    Ok((
                        row.get::<_, Option<String>>(0)?,
                        row.get::<_, Option<String>>(1)?,
                        row.get::<_, i64>(2)?,
                        row.get::<_, i64>(3)?,
                    ))
                },
            )
            .unwrap();
        assert_eq!(key, (Some("ch_c".into()), None, 2, 7));
        // A key keeps exactly one outcome.
        let both = conn.execute(
            "UPDATE idempotency_keys SET refusal_code = 'token_revoked' WHERE key = 'k'",
            [],
        );
        assert!(both.is_err());
        // Version 3 (buyers) on top of version 2 (money): old tokens are root, real tokens,
        // old holds are on no account.
        let version: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0)).unwrap();
        assert_eq!(version, i64::try_from(MIGRATIONS.len()).unwrap());
        assert_eq!(MIGRATIONS.len(), 9);
        let token = conn
            .query_row("SELECT parent_id, sandbox FROM tokens WHERE token_id = 'tok'", [], |row| {
                Ok((row.get::<_, Option<String>>(0)?, row.get::<_, bool>(1)?))
            })
            .unwrap();
        assert_eq!(token, (None, false));
        let on_account: i64 = conn
            .query_row("SELECT count(*) FROM charges WHERE on_account", [], |row| row.get(0))
            .unwrap();
        assert_eq!(on_account, 0);
        // Version 5 rebuilt the charges: every row kept, statuses and foreign keys still
        // checked.
        let charges: i64 =
            conn.query_row("SELECT count(*) FROM charges", [], |row| row.get(0)).unwrap();
        assert_eq!(charges, 2);
        let bad_status =
            conn.execute("UPDATE charges SET status = 'lost' WHERE charge_id = 'ch_h'", []);
        assert!(bad_status.is_err());
        let dangling = conn.execute(
            "INSERT INTO idempotency_keys (token_id, key, fingerprint, charge_id, created_at)
             VALUES ('tok', 'k2', 'fp', 'ch_none', 8)",
            [],
        );
        assert!(dangling.is_err());
    }

    /// Version 6 keeps a recorded refusal as its code and amounts: a refusal recorded as
    /// JSON by version 5 is answered again byte for byte as it was.
    #[test]
    fn refusals_recorded_as_json_are_kept_as_columns_and_answered_alike() {
        let usdc = |s: &str| s.parse::<Usdc>().unwrap();
        let refusals = [
            Refusal::TokenRevoked,
            Refusal::WrongService,
            Refusal::TokenLimitExceeded {
                used: usdc("0.005"),
                reserved: usdc("0.004"),
                limit: usdc("0.01"),
                price: usdc("0.002"),
            },
            Refusal::InsufficientBalance { available: usdc("1.23"), price: usdc("1.230001") },
            Refusal::DailyLimitExceeded {
                limit: usdc("1000"),
                tier: 2,
                used: usdc("999.5"),
                price: usdc("0.75"),
            },
        ];
        let mut conn = Connection::open_in_memory().unwrap();
        for migration in &MIGRATIONS[..5] {
            conn.execute_batch(migration.sqlite).unwrap();
        }
        conn.pragma_update(None, "user_version", 5).unwrap();
        conn.execute_batch(
            "INSERT INTO tokens (token_id, buyer_id, scope, limit_micros, expires_at, created_at)
             VALUES ('tok', 'b', 'SINGLE', 10, 0, 0)",
        )
        .unwrap();
        for (i, refusal) in refusals.iter().enumerate() {
            conn.execute(
                "INSERT INTO idempotency_keys (token_id, key, fingerprint, refusal, created_at)
                 VALUES ('tok', ?1, 'fp', ?2, 0)",
                params![format!("k{i}"), serde_json::to_string(&refusal.body()).unwrap()],
            )
            .unwrap();
        }
        // A code version 5 never recorded is forgotten.
        conn.execute_batch(
            "INSERT INTO idempotency_keys (token_id, key, fingerprint, refusal, created_at)
             VALUES ('tok', 'odd', 'fp', '{\"error\":\"x\",\"code\":\"payment_required\"}', 0)",
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        for (i, refusal) in refusals.iter().enumerate() {
            let key = format!("k{i}");
            let prior =
                query_opt(&conn, sql::PRIOR_KEY, params!["tok", key], |row| PriorKey::read(row))
                    .unwrap()
                    .unwrap();
            let KeyOutcome::Refused(kept) = prior.outcome else { panic!("{key} kept a charge") };
            assert_eq!(&kept, refusal);
            assert_eq!(
                serde_json::to_string(&kept.body()).unwrap(),
                serde_json::to_string(&refusal.body()).unwrap()
            );
        }
        let odd =
            query_opt(&conn, sql::PRIOR_KEY, params!["tok", "odd"], |row| PriorKey::read(row))
                .unwrap();
        assert!(odd.is_none());
    }
}
