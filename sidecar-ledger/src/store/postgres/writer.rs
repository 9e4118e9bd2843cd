//! Group commit for the hot path: reserves (without an Idempotency-Key) and settlements go
//! through one writer task per store, which runs every batch of waiting jobs in one
//! transaction, commits it once, and answers its callers once the COMMIT is durable.
//!
//! Locks. A batch takes every lock it needs up front, in the order every transaction of the
//! store takes them: the tokens of all its jobs (their chains, and those of the charges they
//! settle or release) in one statement, in id order; then the accounts of those tokens'
//! buyers, in id order. So batches of two ledgers never deadlock: on one hot token they take
//! turns holding it for a whole batch, and batches sharing any token queue behind each other
//! (PostgreSQL would break a deadlock only after `deadlock_timeout`, 1 s by default).
//!
//! Round trips. Under those locks the batch reads its rows once, decides every job in order on
//! those books in memory (each job sees the ones before it, as one after another would), and
//! writes the outcome with a few set statements, pipelined: the reads, the writes and the
//! COMMIT are a round trip each, however many jobs the batch holds.
//!
//! Failures. Deadlocks and serialization failures run the whole batch again. A job's own
//! error (a statement refused, corrupt data, a bug) rolls the batch back whole, and then each
//! of its jobs runs again alone, so the error stays that job's. A savepoint per job would keep
//! the others without running them again, but costs round trips, and past 64 in a transaction
//! PostgreSQL's snapshots overflow their subtransaction cache, slowing every backend. A panic
//! anywhere else in a batch (a bug in reading or writing the books) fails that batch's callers
//! with `Panicked`, and the writer goes on with the next.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::panic::{self, AssertUnwindSafe};
use std::time::Duration;

use deadpool_postgres::{Pool, Transaction};
use futures_util::FutureExt as _;
use futures_util::future::{try_join, try_join_all, try_join3};
use paystile_protocol::Usdc;
use paystile_protocol::ledger_api::{ChargeStatus, SettleResult, SettleStatus, Settlement};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_postgres::types::ToSql;

use super::{
    INSERT_TOKEN_IF_NEW, LOCK_CHAINS, insert_token, is_transient, retrying, status_name, storable,
};
use crate::domain::{TokenRecord, UnixMillis};
use crate::rules::{self, Account, MAX_CHAIN_LEN, SettleDecision};
use crate::store::sql;
use crate::store::{ReserveCommand, ReserveOutcome, ReserveStep, StoreError};
use crate::telemetry::wire_name;

/// The most jobs committed in one transaction.
const MAX_BATCH: usize = 512;
/// Jobs waiting for the writer before callers wait to enqueue (backpressure).
const QUEUE_DEPTH: usize = 8192;
/// How long a batch may wait for the callers of the last one to come back (see [`collect`]).
const COLLECT_WAIT: Duration = Duration::from_micros(500);

/// What a job does: each can run again from the start (a batch retried, or run alone).
pub(super) enum Work {
    /// A reserve without an Idempotency-Key.
    Reserve(Box<ReserveCommand>),
    Settle(Vec<Settlement>, UnixMillis),
}

/// A job's answer: a reserve's outcome with how many holds it released on read, or a
/// settlement's results.
pub(super) enum Done {
    Reserved(ReserveOutcome, usize),
    Settled(Vec<SettleResult>),
}

struct Job {
    work: Work,
    answer: oneshot::Sender<Result<Done, StoreError>>,
}

/// A handle on the writer task; cheap to clone. The task ends when every handle is gone.
#[derive(Clone)]
pub(super) struct Writer {
    jobs: mpsc::Sender<Job>,
}

impl Writer {
    pub(super) fn start(pool: Pool) -> Writer {
        let (jobs, queue) = mpsc::channel(QUEUE_DEPTH);
        tokio::spawn(write_batches(queue, move |work| run_jobs(pool.clone(), work)));
        Writer { jobs }
    }

    /// Runs `work` in the writer's next transaction; answers once that has committed.
    pub(super) async fn run(&self, work: Work) -> Result<Done, StoreError> {
        let (answer, answered) = oneshot::channel();
        self.jobs.send(Job { work, answer }).await.map_err(|_| StoreError::Closed)?;
        answered.await.map_err(|_| StoreError::Closed)?
    }
}

/// The writer task: take what is waiting, have `run` run it (in one transaction, committed
/// once), answer each caller. A panic in `run` (a bug outside a job's decision, which
/// [`run_batch`] catches itself) fails that batch's callers, not the task: every later
/// reserve and settlement would fail with it.
async fn write_batches<F, Fut>(mut queue: mpsc::Receiver<Job>, mut run: F)
where
    F: FnMut(Vec<Work>) -> Fut,
    Fut: Future<Output = Vec<Result<Done, StoreError>>>,
{
    let mut answered = 0;
    while let Some(first) = queue.recv().await {
        let jobs = collect(first, &mut queue, answered).await;
        answered = jobs.len();
        let (work, answers): (Vec<Work>, Vec<_>) =
            jobs.into_iter().map(|job| (job.work, job.answer)).unzip();
        let results = AssertUnwindSafe(run(work)).catch_unwind().await.unwrap_or_else(|panic| {
            let error = StoreError::panicked(&*panic);
            tracing::error!(error = %error, "a ledger batch panicked; its callers were told");
            answers.iter().map(|_| Err(error.clone())).collect()
        });
        for (answer, result) in answers.into_iter().zip(results) {
            // The caller may have gone away (client disconnect); nothing to tell then.
            let _ = answer.send(result);
        }
    }
}

/// Runs one batch's work in one transaction; if that fails in a way that may be one job's,
/// runs each job again alone, so that the error stays that job's. Answers each job's result.
async fn run_jobs(pool: Pool, work: Vec<Work>) -> Vec<Result<Done, StoreError>> {
    let all: Vec<&Work> = work.iter().collect();
    match retrying(|| run_batch(&pool, &all)).await {
        Ok(done) => done.into_iter().map(Ok).collect(),
        Err(aborted) if aborted.alone && work.len() > 1 => {
            tracing::debug!(error = %aborted.error, "batch failed; running its jobs alone");
            let mut results = Vec::with_capacity(work.len());
            for job in &work {
                let alone = [job];
                let done = retrying(|| run_batch(&pool, &alone)).await;
                results.push(done.map_err(|a| a.error).and_then(|done| {
                    done.into_iter()
                        .next()
                        .ok_or_else(|| StoreError::Corrupt("a batch of one answered none".into()))
                }));
            }
            results
        }
        Err(aborted) => {
            tracing::error!(error = %aborted.error, "ledger transaction failed; its callers were told");
            work.iter().map(|_| Err(aborted.error.clone())).collect()
        }
    }
}

/// The batch that starts with `first`: every job waiting, and while fewer are waiting than
/// the last batch answered, those that arrive within [`COLLECT_WAIT`]. Callers just answered
/// send their next job within microseconds; a batch that starts before they do spends a
/// commit (a WAL flush, and a turn at a hot token's lock) on a few of them and the next on
/// the rest. A lone caller never waits.
async fn collect(first: Job, queue: &mut mpsc::Receiver<Job>, answered: usize) -> Vec<Job> {
    let mut jobs = vec![first];
    let deadline = Instant::now() + COLLECT_WAIT;
    while jobs.len() < answered.min(MAX_BATCH) {
        match tokio::time::timeout_at(deadline, queue.recv()).await {
            Ok(Some(job)) => jobs.push(job),
            Ok(None) | Err(_) => break,
        }
    }
    while jobs.len() < MAX_BATCH {
        match queue.try_recv() {
            Ok(job) => jobs.push(job),
            Err(_) => break,
        }
    }
    jobs
}

/// Why a batch did not commit.
struct Aborted {
    error: StoreError,
    /// Nothing was committed, and the cause may be one job's: each may run again alone.
    alone: bool,
}

impl Aborted {
    /// A COMMIT that failed, or no connection: every job fails with it. Run again, a job
    /// might be applied twice: a connection lost during the COMMIT leaves its fate unknown.
    fn fatal(error: impl Into<StoreError>) -> Aborted {
        Aborted { error: error.into(), alone: false }
    }

    /// A failure before the COMMIT: the transaction is rolled back. An error of the server's
    /// (it has a SQLSTATE), corrupt data or a bug may be one job's; one that exhausted its
    /// retries, or a lost connection, is everyone's.
    fn before_commit(error: impl Into<StoreError>) -> Aborted {
        let error = error.into();
        let alone = match &error {
            StoreError::Postgres(e) => e.code().is_some() && !is_transient(&error),
            StoreError::Unavailable(_) | StoreError::Closed => false,
            _ => true,
        };
        Aborted { error, alone }
    }
}

impl AsRef<StoreError> for Aborted {
    fn as_ref(&self) -> &StoreError {
        &self.error
    }
}

/// A batch's statements take arrays of any length: PostgreSQL would plan them afresh for
/// each batch (costing more than running them), as a plan for arrays of unknown length
/// looks dearer than one for the arrays at hand. Their generic plans use the same indexes.
const GENERIC_PLANS: &str = "SET LOCAL plan_cache_mode = force_generic_plan";
/// The holds past their TTL at `$3` of the buyers of the tokens `$1` (of the buyers `$2`
/// where a token is unknown), and which of the tokens are known; read without a lock.
const SURVEY: &str = "SELECT
     ARRAY(SELECT token_id FROM tokens WHERE token_id = ANY($1)),
     ARRAY(SELECT c.charge_id FROM charges c JOIN tokens t ON t.token_id = c.token_id
           WHERE c.status = 'held' AND c.hold_expires_at <= $3
             AND t.buyer_id IN (SELECT coalesce(k.buyer_id, u.buyer_id)
                                FROM unnest($1::text[], $2::text[]) AS u (token_id, buyer_id)
                                LEFT JOIN tokens k ON k.token_id = u.token_id))";
/// The accounts of the buyers of the tokens `$1` and of the charges `$2` (every account a
/// batch may touch), locked in id order after the tokens; `buyer_id` last, after the columns
/// [`sql::account`] reads.
const LOCK_ACCOUNTS: &str = "SELECT balance_micros, held_micros, tier, spent_day, spent_micros,
         buyer_id
     FROM buyers WHERE buyer_id IN (
         SELECT buyer_id FROM tokens WHERE token_id = ANY($1)
         UNION
         SELECT t.buyer_id FROM charges c JOIN tokens t ON t.token_id = c.token_id
         WHERE c.charge_id = ANY($2))
     ORDER BY buyer_id FOR NO KEY UPDATE";
/// The charges `$1`, as [`OpenHold`] keeps them; read once their tokens are locked.
const SELECT_HOLDS: &str = "SELECT c.charge_id, c.token_id, c.held_micros, c.status,
         c.hold_expires_at, CASE WHEN c.on_account THEN t.buyer_id END
     FROM charges c JOIN tokens t ON t.token_id = c.token_id WHERE c.charge_id = ANY($1)";
const INSERT_HOLDS: &str = "INSERT INTO charges (charge_id, token_id, service_id, held_micros,
         status, created_at, hold_expires_at, on_account)
     SELECT u.charge_id, u.token_id, u.service_id, u.held, 'held', u.created_at, u.expires,
            u.on_account
     FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::int8[],
                 $7::bool[])
          AS u (charge_id, token_id, service_id, held, created_at, expires, on_account)";
const CLOSE_HOLDS: &str = "UPDATE charges c SET status = u.status, settled_at = u.settled_at,
         upstream_status = u.upstream, committed_micros = u.committed
     FROM unnest($1::text[], $2::text[], $3::int8[], $4::int4[], $5::int8[])
          AS u (charge_id, status, settled_at, upstream, committed)
     WHERE c.charge_id = u.charge_id AND c.status = 'held'";
/// The tokens' counters as the batch leaves them: their rows are locked, so the values the
/// batch read and moved are the latest.
const SET_TOKENS: &str = "UPDATE tokens t SET used_micros = u.used, reserved_micros = u.reserved
     FROM unnest($1::text[], $2::int8[], $3::int8[]) AS u (token_id, used, reserved)
     WHERE t.token_id = u.token_id";
const SET_ACCOUNTS: &str = "UPDATE buyers b SET balance_micros = u.balance, held_micros = u.held,
         spent_day = u.spent_day, spent_micros = u.spent
     FROM unnest($1::text[], $2::int8[], $3::int8[], $4::int8[], $5::int8[])
          AS u (buyer_id, balance, held, spent_day, spent)
     WHERE b.buyer_id = u.buyer_id";
const INSERT_REFUSALS: &str = "INSERT INTO refusals (service_id, token_id, code, created_at,
         sandbox)
     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::bool[])";

/// Runs `work` in one transaction: locks and reads, decides each job in order, writes,
/// commits; answers each job's result, in order.
async fn run_batch(pool: &Pool, work: &[&Work]) -> Result<Vec<Done>, Aborted> {
    let mut client = pool.get().await.map_err(Aborted::fatal)?;
    let tx = client.transaction().await.map_err(Aborted::before_commit)?;
    let mut books = read(&tx, work).await.map_err(Aborted::before_commit)?;
    let mut writes = Writes::default();
    // A panic (a bug) fails the batch like an error: its jobs then run alone, and the one
    // that panics fails alone, instead of taking the writer task with it.
    let done = panic::catch_unwind(AssertUnwindSafe(|| {
        work.iter().map(|work| books.decide(work, &mut writes)).collect::<Result<Vec<_>, _>>()
    }))
    .unwrap_or_else(|panic| Err(StoreError::panicked(&*panic)))
    .map_err(Aborted::before_commit)?;
    writes.apply(&tx, &books).await.map_err(Aborted::before_commit)?;
    tx.commit().await.map_err(Aborted::fatal)?;
    Ok(done)
}

/// The rows a batch decides on, locked until it commits, as its jobs leave them.
struct Books {
    tokens: HashMap<String, TokenRecord>,
    accounts: HashMap<String, Account>,
    /// The charges the batch settles or may release, and the holds it places.
    holds: HashMap<String, OpenHold>,
    /// Holds that were past their TTL when the batch began: the reserves release those of
    /// their buyer. (A hold placed in the batch has a TTL of at least a second.)
    due: Vec<String>,
}

struct OpenHold {
    token_id: String,
    /// The buyer whose account holds it, if one does.
    account: Option<String>,
    held: Usdc,
    status: ChargeStatus,
    expires_at: UnixMillis,
}

/// Takes the batch's locks and reads what they guard.
async fn read(tx: &Transaction<'_>, work: &[&Work]) -> Result<Books, StoreError> {
    let mut reserves = Vec::new();
    let mut settled = Vec::new();
    for work in work {
        match work {
            Work::Reserve(cmd) => reserves.push(&**cmd),
            Work::Settle(settlements, _) => settled
                .extend(settlements.iter().map(|s| s.charge_id.as_str()).filter(|id| storable(id))),
        }
    }
    let token_ids: Vec<&str> = reserves.iter().map(|cmd| cmd.token.token_id.as_str()).collect();
    let mut due = Vec::new();
    if !reserves.is_empty() {
        // Holds past their TTL count against no level of a chain nor an account: the buyers'
        // expired holds are released first. Found before any lock is taken, so that their
        // chains are locked with the others, in id order.
        let buyers: Vec<&str> = reserves.iter().map(|cmd| cmd.token.buyer_id.as_str()).collect();
        let latest = reserves.iter().map(|cmd| cmd.now).max().unwrap_or_default();
        let survey = tx.prepare_cached(SURVEY).await?;
        let (_, row) = try_join(
            tx.batch_execute(GENERIC_PLANS),
            tx.query_one(&survey, &[&token_ids, &buyers, &latest]),
        )
        .await?;
        let known: HashSet<String> = row.try_get::<_, Vec<String>>(0)?.into_iter().collect();
        due = row.try_get(1)?;
        // Tokens first seen: registered before any lock is taken, in id order. Another ledger
        // registering one too makes this insert wait for it, and do nothing.
        let mut unknown: Vec<&ReserveCommand> =
            reserves.iter().copied().filter(|cmd| !known.contains(&cmd.token.token_id)).collect();
        unknown.sort_by(|a, b| a.token.token_id.cmp(&b.token.token_id));
        unknown.dedup_by(|a, b| a.token.token_id == b.token.token_id);
        for cmd in unknown {
            insert_token(tx, &cmd.token, None, cmd.now, INSERT_TOKEN_IF_NEW).await?;
        }
    } else {
        tx.batch_execute(GENERIC_PLANS).await?;
    }
    let charge_ids: Vec<&str> = settled.into_iter().chain(due.iter().map(String::as_str)).collect();
    let mut books = Books {
        tokens: HashMap::new(),
        accounts: HashMap::new(),
        holds: HashMap::new(),
        due: due.clone(),
    };
    if token_ids.is_empty() && charge_ids.is_empty() {
        return Ok(books);
    }
    // Pipelined, and so run in this order: the reads after the locks, each seeing what the
    // transactions that held them committed.
    let (lock_tokens, lock_accounts, select_holds) = (
        tx.prepare_cached(LOCK_CHAINS).await?,
        tx.prepare_cached(LOCK_ACCOUNTS).await?,
        tx.prepare_cached(SELECT_HOLDS).await?,
    );
    let (tokens, accounts, holds) = try_join3(
        tx.query(&lock_tokens, &[&token_ids, &charge_ids]),
        tx.query(&lock_accounts, &[&token_ids, &charge_ids]),
        tx.query(&select_holds, &[&charge_ids]),
    )
    .await?;
    for row in &tokens {
        let token = sql::token_record(row)?;
        books.tokens.insert(token.grant.token_id.clone(), token);
    }
    for row in &accounts {
        books.accounts.insert(row.try_get(5)?, sql::account(row)?);
    }
    for row in &holds {
        let hold = OpenHold {
            token_id: row.try_get(1)?,
            held: sql::usdc(row, 2)?,
            status: sql::charge_status(row, 3)?,
            expires_at: row.try_get(4)?,
            account: row.try_get(5)?,
        };
        books.holds.insert(row.try_get(0)?, hold);
    }
    Ok(books)
}

impl Books {
    fn decide(&mut self, work: &Work, writes: &mut Writes) -> Result<Done, StoreError> {
        Ok(match work {
            Work::Reserve(cmd) => {
                let (outcome, expired) = self.reserve(cmd, writes)?;
                Done::Reserved(outcome, expired)
            }
            Work::Settle(settlements, now) => {
                Done::Settled(self.settle(settlements, *now, writes)?)
            }
        })
    }

    fn token(&self, token_id: &str) -> Result<&TokenRecord, StoreError> {
        self.tokens
            .get(token_id)
            .ok_or_else(|| StoreError::Corrupt(format!("token {token_id} is not locked")))
    }

    /// The chain from `token_id` up to its root, as the batch has left it.
    fn chain(&self, token_id: &str) -> Result<Vec<TokenRecord>, StoreError> {
        let mut chain = Vec::new();
        let mut next = Some(token_id);
        while let Some(id) = next {
            if chain.len() == MAX_CHAIN_LEN {
                return Err(StoreError::Corrupt(format!("the chain of {token_id} is too long")));
            }
            let token = self.token(id)?;
            next = token.parent_id.as_deref();
            chain.push(token.clone());
        }
        Ok(chain)
    }

    fn reserve(
        &mut self,
        cmd: &ReserveCommand,
        writes: &mut Writes,
    ) -> Result<(ReserveOutcome, usize), StoreError> {
        let token_id = cmd.token.token_id.as_str();
        let buyer_id = self.token(token_id)?.grant.buyer_id.clone();
        let mut expired = 0;
        for charge_id in std::mem::take(&mut self.due) {
            if let Some(hold) = self.holds.get(&charge_id)
                && hold.status == ChargeStatus::Held
                && hold.expires_at <= cmd.now
                && self.token(&hold.token_id)?.grant.buyer_id == buyer_id
            {
                self.close(&charge_id, None, cmd.now, None, writes)?;
                expired += 1;
            }
            self.due.push(charge_id);
        }
        let chain = self.chain(token_id)?;
        let token = &chain[0];
        // A sandbox token's buyer is not read: the sandbox book never touches the account.
        let account = match token.grant.sandbox {
            true => None,
            false => self.accounts.get(&buyer_id).cloned(),
        };
        let books = rules::Books {
            chain: &chain,
            account: account.as_ref(),
            today: rules::utc_day(cmd.now),
            daily_limits: &cmd.daily_limits,
        };
        let outcome = match cmd.step(&books, None)? {
            ReserveStep::Refuse { refusal, .. } => {
                writes.refusals.push(RefusalRow {
                    service_id: cmd.service_id.clone(),
                    token_id: token_id.to_owned(),
                    code: wire_name(refusal.code()),
                    created_at: cmd.now,
                    sandbox: token.grant.sandbox,
                });
                ReserveOutcome::Refused(refusal)
            }
            ReserveStep::RefuseAgain(_) | ReserveStep::Replay { .. } => {
                return Err(StoreError::Corrupt("a reserve without a key replayed".into()));
            }
            ReserveStep::Hold { holds, on_account } => {
                for (charge_id, _) in cmd.hold_rows(&holds) {
                    writes.holds.push(NewHold {
                        charge_id: charge_id.to_owned(),
                        token_id: token_id.to_owned(),
                        service_id: cmd.service_id.clone(),
                        held: cmd.price.micros_i64(),
                        created_at: cmd.now,
                        expires_at: cmd.hold_expires_at,
                        on_account,
                    });
                    let hold = OpenHold {
                        token_id: token_id.to_owned(),
                        account: on_account.then(|| buyer_id.clone()),
                        held: cmd.price,
                        status: ChargeStatus::Held,
                        expires_at: cmd.hold_expires_at,
                    };
                    self.holds.insert(charge_id.to_owned(), hold);
                }
                // Held at every level of the chain, and on the account.
                for level in &chain {
                    let id = &level.grant.token_id;
                    let token = self.token_mut(id)?;
                    token.reserved = plus(token.reserved, holds.total)?;
                    writes.tokens.insert(id.clone());
                }
                if on_account {
                    let account = self.account_mut(&buyer_id)?;
                    account.held = plus(account.held, holds.total)?;
                    writes.accounts.insert(buyer_id.clone());
                }
                cmd.held(&holds)
            }
        };
        Ok((outcome, expired))
    }

    /// Settles every hold named, one result per settlement in order (see
    /// [`super::super::Store::settle`]).
    fn settle(
        &mut self,
        settlements: &[Settlement],
        now: UnixMillis,
        writes: &mut Writes,
    ) -> Result<Vec<SettleResult>, StoreError> {
        let mut results = Vec::with_capacity(settlements.len());
        for s in settlements {
            let Some(hold) = self.holds.get(&s.charge_id) else {
                results.push(SettleResult {
                    charge_id: s.charge_id.clone(),
                    status: SettleStatus::Unknown,
                    error: None,
                });
                continue;
            };
            let amount = match rules::commit_amount(s.amount_usdc, hold.held) {
                Ok(amount) => amount,
                Err(problem) => {
                    results.push(SettleResult::invalid(&s.charge_id, problem));
                    continue;
                }
            };
            let expired = now >= hold.expires_at;
            let revoked = self.token(&hold.token_id)?.revoked;
            let upstream = s.upstream_status.map(i32::from);
            let status = match rules::settle(hold.status, expired, revoked, s.outcome, amount) {
                SettleDecision::Unchanged(result) => result,
                SettleDecision::Commit(amount) => {
                    self.close(&s.charge_id, Some(amount), now, upstream, writes)?;
                    SettleStatus::Committed
                }
                SettleDecision::Release(result) => {
                    self.close(&s.charge_id, None, now, upstream, writes)?;
                    result
                }
            };
            results.push(SettleResult { charge_id: s.charge_id.clone(), status, error: None });
        }
        Ok(results)
    }

    /// Closes a held charge, at every level of its token's chain and on its buyer's account
    /// if it was held there: committed for `charged` (which becomes used, and is debited from
    /// the account; the rest of the hold is freed), or released (all of it freed) when
    /// `charged` is `None`.
    fn close(
        &mut self,
        charge_id: &str,
        charged: Option<Usdc>,
        now: UnixMillis,
        upstream: Option<i32>,
        writes: &mut Writes,
    ) -> Result<(), StoreError> {
        let hold = self
            .holds
            .get_mut(charge_id)
            .ok_or_else(|| StoreError::Corrupt(format!("charge {charge_id} is not read")))?;
        let status =
            if charged.is_some() { ChargeStatus::Committed } else { ChargeStatus::Released };
        hold.status = status;
        let (held, account) = (hold.held, hold.account.clone());
        let used = charged.unwrap_or(Usdc::ZERO);
        let mut level = Some(hold.token_id.clone());
        for _ in 0..MAX_CHAIN_LEN {
            let Some(id) = level else { break };
            let token = self.token_mut(&id)?;
            token.used = plus(token.used, used)?;
            token.reserved = minus(token.reserved, held)?;
            level = token.parent_id.clone();
            writes.tokens.insert(id);
        }
        if level.is_some() {
            return Err(StoreError::Corrupt(format!(
                "the chain of charge {charge_id} is too long"
            )));
        }
        if let Some(buyer_id) = account {
            let account = self.account_mut(&buyer_id)?;
            account.balance = minus(account.balance, used)?;
            account.held = minus(account.held, held)?;
            // Spent today counts commits on their UTC day: the first of a day starts it
            // afresh. The day only moves forward: a settler whose clock is behind adds
            // nothing to today.
            let today = rules::utc_day(now);
            if today > account.spent_day {
                (account.spent_day, account.spent) = (today, used);
            } else if today == account.spent_day {
                account.spent = plus(account.spent, used)?;
            }
            writes.accounts.insert(buyer_id);
        }
        writes.closed.push(Closed {
            charge_id: charge_id.to_owned(),
            status: status_name(status),
            settled_at: now,
            upstream,
            committed: charged.map(Usdc::micros_i64),
        });
        Ok(())
    }

    fn token_mut(&mut self, token_id: &str) -> Result<&mut TokenRecord, StoreError> {
        self.tokens
            .get_mut(token_id)
            .ok_or_else(|| StoreError::Corrupt(format!("token {token_id} is not locked")))
    }

    fn account_mut(&mut self, buyer_id: &str) -> Result<&mut Account, StoreError> {
        self.accounts
            .get_mut(buyer_id)
            .ok_or_else(|| StoreError::Corrupt(format!("the account of {buyer_id} is not locked")))
    }
}

fn plus(a: Usdc, b: Usdc) -> Result<Usdc, StoreError> {
    a.checked_add(b).ok_or_else(|| StoreError::Corrupt(format!("{a} + {b} overflows")))
}

fn minus(a: Usdc, b: Usdc) -> Result<Usdc, StoreError> {
    a.micros()
        .checked_sub(b.micros())
        .and_then(Usdc::from_micros)
        .ok_or_else(|| StoreError::Corrupt(format!("{a} - {b} is below zero")))
}

/// What a batch writes once every job is decided.
#[derive(Default)]
struct Writes {
    holds: Vec<NewHold>,
    closed: Vec<Closed>,
    refusals: Vec<RefusalRow>,
    /// The tokens and accounts whose counters moved.
    tokens: BTreeSet<String>,
    accounts: BTreeSet<String>,
}

struct NewHold {
    charge_id: String,
    token_id: String,
    service_id: String,
    held: i64,
    created_at: UnixMillis,
    expires_at: UnixMillis,
    on_account: bool,
}

struct Closed {
    charge_id: String,
    status: &'static str,
    settled_at: UnixMillis,
    upstream: Option<i32>,
    committed: Option<i64>,
}

struct RefusalRow {
    service_id: String,
    token_id: String,
    code: String,
    created_at: UnixMillis,
    sandbox: bool,
}

type Params<'a> = Vec<Box<dyn ToSql + Sync + Send + 'a>>;

impl Writes {
    /// Writes it all in one pipeline: a statement per kind of row, whatever the batch's size.
    /// The holds are inserted before any is closed: a batch may settle the holds it places.
    async fn apply(&self, tx: &Transaction<'_>, books: &Books) -> Result<(), StoreError> {
        let mut statements: Vec<(&str, Params<'_>)> = Vec::new();
        if !self.holds.is_empty() {
            let column = |f: fn(&NewHold) -> &str| self.holds.iter().map(f).collect::<Vec<_>>();
            let number = |f: fn(&NewHold) -> i64| self.holds.iter().map(f).collect::<Vec<_>>();
            statements.push((
                INSERT_HOLDS,
                vec![
                    Box::new(column(|h| &h.charge_id)),
                    Box::new(column(|h| &h.token_id)),
                    Box::new(column(|h| &h.service_id)),
                    Box::new(number(|h| h.held)),
                    Box::new(number(|h| h.created_at)),
                    Box::new(number(|h| h.expires_at)),
                    Box::new(self.holds.iter().map(|h| h.on_account).collect::<Vec<_>>()),
                ],
            ));
        }
        if !self.closed.is_empty() {
            statements.push((
                CLOSE_HOLDS,
                vec![
                    Box::new(self.closed.iter().map(|c| c.charge_id.as_str()).collect::<Vec<_>>()),
                    Box::new(self.closed.iter().map(|c| c.status).collect::<Vec<_>>()),
                    Box::new(self.closed.iter().map(|c| c.settled_at).collect::<Vec<_>>()),
                    Box::new(self.closed.iter().map(|c| c.upstream).collect::<Vec<_>>()),
                    Box::new(self.closed.iter().map(|c| c.committed).collect::<Vec<_>>()),
                ],
            ));
        }
        if !self.tokens.is_empty() {
            let tokens =
                self.tokens.iter().map(|id| books.token(id)).collect::<Result<Vec<_>, _>>()?;
            statements.push((
                SET_TOKENS,
                vec![
                    Box::new(self.tokens.iter().map(String::as_str).collect::<Vec<_>>()),
                    Box::new(tokens.iter().map(|t| t.used.micros_i64()).collect::<Vec<_>>()),
                    Box::new(tokens.iter().map(|t| t.reserved.micros_i64()).collect::<Vec<_>>()),
                ],
            ));
        }
        if !self.accounts.is_empty() {
            let accounts = self
                .accounts
                .iter()
                .map(|id| {
                    books.accounts.get(id).ok_or_else(|| {
                        StoreError::Corrupt(format!("the account of {id} is not locked"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let micros = |f: fn(&Account) -> Usdc| {
                accounts.iter().map(|a| f(a).micros_i64()).collect::<Vec<_>>()
            };
            statements.push((
                SET_ACCOUNTS,
                vec![
                    Box::new(self.accounts.iter().map(String::as_str).collect::<Vec<_>>()),
                    Box::new(micros(|a| a.balance)),
                    Box::new(micros(|a| a.held)),
                    Box::new(accounts.iter().map(|a| a.spent_day).collect::<Vec<_>>()),
                    Box::new(micros(|a| a.spent)),
                ],
            ));
        }
        if !self.refusals.is_empty() {
            let r = &self.refusals;
            statements.push((
                INSERT_REFUSALS,
                vec![
                    Box::new(r.iter().map(|r| r.service_id.as_str()).collect::<Vec<_>>()),
                    Box::new(r.iter().map(|r| r.token_id.as_str()).collect::<Vec<_>>()),
                    Box::new(r.iter().map(|r| r.code.as_str()).collect::<Vec<_>>()),
                    Box::new(r.iter().map(|r| r.created_at).collect::<Vec<_>>()),
                    Box::new(r.iter().map(|r| r.sandbox).collect::<Vec<_>>()),
                ],
            ));
        }
        // Prepared first (once per connection), so that the pipeline sends them in order.
        let mut prepared = Vec::with_capacity(statements.len());
        for (sql, _) in &statements {
            prepared.push(tx.prepare_cached(sql).await?);
        }
        let params: Vec<Vec<&(dyn ToSql + Sync)>> = statements
            .iter()
            .map(|(_, params)| params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect())
            .collect();
        let counts = try_join_all(
            prepared.iter().zip(&params).map(|(statement, params)| tx.execute(statement, params)),
        )
        .await?;
        let wanted = [
            (INSERT_HOLDS, self.holds.len()),
            (CLOSE_HOLDS, self.closed.len()),
            (SET_TOKENS, self.tokens.len()),
            (SET_ACCOUNTS, self.accounts.len()),
        ];
        for ((sql, _), count) in statements.iter().zip(counts) {
            if let Some((_, rows)) = wanted.iter().find(|(wanted, _)| wanted == sql)
                && usize::try_from(count).ok() != Some(*rows)
            {
                // Their tokens' locks should have kept them as read: change nothing.
                return Err(StoreError::Corrupt(format!(
                    "a batch wrote {count} rows of {rows}: some changed under their locks"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use paystile_protocol::ledger_api::{Outcome, TokenGrant};
    use paystile_protocol::pay_token::Scope;
    use tokio_postgres::error::SqlState;

    use super::*;
    use crate::rules::Refusal;
    use crate::settings::PostgresUrl;
    use crate::store::PostgresStore;

    const NOW: UnixMillis = 1_800_000_000_000;
    const PRICE: u64 = 1_000;

    /// The server the tests make their databases on (as `tests/api.rs`).
    fn admin_url() -> String {
        std::env::var("PAYSTILE_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://127.0.0.1:5432/test".to_owned())
    }

    async fn admin() -> tokio_postgres::Client {
        let (client, connection) =
            tokio_postgres::connect(&admin_url(), tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client
    }

    /// A fresh database, dropped with its connections when the test ends.
    struct Database {
        name: String,
        url: PostgresUrl,
    }

    impl Database {
        async fn create() -> Database {
            let name = format!("paystile_w_{}", hex::encode(rand::random::<[u8; 8]>()));
            admin().await.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
            let admin_url = admin_url();
            let (server, _) = admin_url.rsplit_once('/').unwrap();
            let url = PostgresUrl::parse(&format!("{server}/{name}")).unwrap();
            Database { name, url }
        }

        /// A store of its own (pool and writer): what one more ledger process is.
        async fn store(&self) -> PostgresStore {
            PostgresStore::open(&self.url).await.unwrap()
        }
    }

    impl Drop for Database {
        fn drop(&mut self) {
            let name = self.name.clone();
            // Drop cannot await: a thread with its own runtime drops the database.
            let _ = std::thread::spawn(move || {
                let runtime =
                    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                runtime.block_on(async {
                    let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                    admin().await.batch_execute(&sql).await
                })
            })
            .join();
        }
    }

    fn usdc(holds: u64) -> Usdc {
        Usdc::from_micros(holds * PRICE).unwrap()
    }

    fn reserve(charge_id: &str, token_id: &str, cap_holds: u64) -> Work {
        Work::Reserve(Box::new(ReserveCommand {
            charge_id: charge_id.into(),
            extra_charge_ids: Vec::new(),
            extras_until: None,
            token: TokenGrant {
                token_id: token_id.into(),
                buyer_id: "buyer".into(),
                buyer_tag: None,
                service_id: Some("svc".into()),
                scope: Scope::Single,
                limit_usdc: usdc(cap_holds),
                expires_at: 4_000_000_000,
                sandbox: false,
            },
            service_id: "svc".into(),
            price: usdc(1),
            idempotency: None,
            cap: None,
            now: NOW,
            hold_expires_at: NOW + 60_000,
            max_replays: 5,
            daily_limits: Arc::default(),
        }))
    }

    fn settle(settlements: &[(&str, Outcome)]) -> Work {
        let settlements = settlements
            .iter()
            .map(|(charge_id, outcome)| Settlement {
                charge_id: (*charge_id).into(),
                outcome: *outcome,
                upstream_status: Some(200),
                amount_usdc: None,
            })
            .collect();
        Work::Settle(settlements, NOW)
    }

    /// Runs `work` as one batch (every job is queued before the writer looks), and answers
    /// each job's result.
    async fn one_batch(store: &PostgresStore, work: Vec<Work>) -> Vec<Result<Done, StoreError>> {
        let (jobs, queue) = mpsc::channel(QUEUE_DEPTH);
        let mut answers = Vec::new();
        for work in work {
            let (answer, answered) = oneshot::channel();
            jobs.send(Job { work, answer }).await.unwrap();
            answers.push(answered);
        }
        drop(jobs);
        let pool = store.pool.clone();
        write_batches(queue, move |work| run_jobs(pool.clone(), work)).await;
        let mut results = Vec::new();
        for answered in answers {
            results.push(answered.await.unwrap());
        }
        results
    }

    /// No database: the writer's loop alone, with a runner whose first batch panics.
    #[tokio::test]
    async fn a_batch_that_panics_fails_its_callers_and_the_writer_goes_on() {
        let (jobs, queue) = mpsc::channel(QUEUE_DEPTH);
        let writer = Writer { jobs };
        let mut batches = 0;
        tokio::spawn(write_batches(queue, move |work: Vec<Work>| {
            batches += 1;
            let first = batches == 1;
            async move {
                assert!(!first, "a bug in reading the books");
                work.iter().map(|_| Ok(Done::Settled(Vec::new()))).collect()
            }
        }));
        let failed = writer.run(settle(&[])).await;
        assert!(
            matches!(&failed, Err(StoreError::Panicked(m)) if m == "a bug in reading the books"),
            "{:?}",
            failed.err()
        );
        assert!(matches!(writer.run(settle(&[])).await, Ok(Done::Settled(_))));
    }

    fn held(result: &Result<Done, StoreError>) -> bool {
        matches!(result, Ok(Done::Reserved(ReserveOutcome::Held(_), _)))
    }

    fn refused(result: &Result<Done, StoreError>) -> bool {
        matches!(
            result,
            Ok(Done::Reserved(ReserveOutcome::Refused(Refusal::TokenLimitExceeded { .. }), _))
        )
    }

    fn settled(result: &Result<Done, StoreError>) -> Vec<SettleStatus> {
        match result {
            Ok(Done::Settled(results)) => results.iter().map(|r| r.status).collect(),
            _ => panic!("not a settlement's answer: {}", result.is_ok()),
        }
    }

    async fn books(store: &PostgresStore, token_id: &str) -> (Usdc, Usdc) {
        let token = store.token(token_id.into(), NOW).await.unwrap().unwrap();
        (token.used, token.reserved)
    }

    /// A batch reserve whose gateway stopped waiting while it sat in the queue is decided
    /// without extras: the deadline is judged when the writer decides, not when it arrived.
    #[tokio::test]
    async fn extras_decided_past_their_deadline_are_not_granted() {
        let database = Database::create().await;
        let store = database.store().await;
        let with_extras = |charge_id: &str, until_ms: u64| {
            let Work::Reserve(mut command) = reserve(charge_id, "tok_late", 100) else {
                unreachable!()
            };
            command.extra_charge_ids = (1..4).map(|i| format!("{charge_id}_x{i}")).collect();
            command.extras_until = Some(until_ms);
            Work::Reserve(command)
        };
        let now_ms = u64::try_from(crate::ledger::now_millis()).unwrap();
        let answers = one_batch(
            &store,
            vec![with_extras("ch_waited", now_ms + 60_000), with_extras("ch_late", now_ms - 1)],
        )
        .await;
        let extras = |answer: &Result<Done, StoreError>| match answer {
            Ok(Done::Reserved(ReserveOutcome::Held(hold), _)) => hold.extra_charge_ids.len(),
            _ => panic!("not held"),
        };
        assert_eq!((extras(&answers[0]), extras(&answers[1])), (3, 0));
        assert_eq!(books(&store, "tok_late").await, (Usdc::ZERO, usdc(5)));
    }

    /// In one batch each job is decided on the books the jobs before it left, as if they
    /// had run one after another: holds up to the cap, then refusals (each recorded); a
    /// settlement of holds placed in the same batch; a reserve that fits again once a hold
    /// is released.
    #[tokio::test]
    async fn a_batch_decides_each_job_on_the_books_the_ones_before_it_left() {
        let database = Database::create().await;
        let store = database.store().await;
        let answers = one_batch(
            &store,
            vec![
                reserve("ch_1", "tok", 3),
                reserve("ch_2", "tok", 3),
                reserve("ch_3", "tok", 3),
                reserve("ch_4", "tok", 3),
                settle(&[("ch_1", Outcome::Commit), ("ch_2", Outcome::Release)]),
                settle(&[("ch_1", Outcome::Commit), ("ch_4", Outcome::Commit)]),
                reserve("ch_5", "tok", 3),
                reserve("ch_6", "tok", 3),
            ],
        )
        .await;
        assert!(
            answers[..3].iter().all(held),
            "{:?}",
            answers.iter().map(held).collect::<Vec<_>>()
        );
        assert!(refused(&answers[3]));
        assert_eq!(settled(&answers[4]), [SettleStatus::Committed, SettleStatus::Released]);
        assert_eq!(settled(&answers[5]), [SettleStatus::AlreadyCommitted, SettleStatus::Unknown]);
        assert!(held(&answers[6]));
        assert!(refused(&answers[7]));
        // Committed: ch_1; held: ch_3 and ch_5.
        assert_eq!(books(&store, "tok").await, (usdc(1), usdc(2)));
        for (charge_id, status) in [
            ("ch_1", ChargeStatus::Committed),
            ("ch_2", ChargeStatus::Released),
            ("ch_3", ChargeStatus::Held),
            ("ch_5", ChargeStatus::Held),
        ] {
            let charge = store.charge(charge_id.into(), NOW).await.unwrap().unwrap();
            assert_eq!(charge.status, status, "{charge_id}");
        }
        let client = store.pool.get().await.unwrap();
        let refusals: i64 = client
            .query_one("SELECT count(*) FROM refusals WHERE token_id = 'tok'", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(refusals, 2);
    }

    /// A job that fails (its hold's id is taken) fails alone: the batch is rolled back, and
    /// the other jobs run again and commit, a settlement of a hold placed in the same batch
    /// included.
    #[tokio::test]
    async fn one_failing_job_fails_alone_and_the_others_of_its_batch_commit() {
        let database = Database::create().await;
        let store = database.store().await;
        assert!(held(&one_batch(&store, vec![reserve("ch_taken", "tok", 10)]).await[0]));
        let answers = one_batch(
            &store,
            vec![
                reserve("ch_new", "tok", 10),
                reserve("ch_taken", "tok", 10),
                settle(&[("ch_new", Outcome::Commit), ("ch_taken", Outcome::Commit)]),
            ],
        )
        .await;
        assert!(held(&answers[0]));
        assert!(
            matches!(
                &answers[1],
                Err(StoreError::Postgres(e)) if e.code() == Some(&SqlState::UNIQUE_VIOLATION)
            ),
            "{:?}",
            answers[1].as_ref().err()
        );
        assert_eq!(settled(&answers[2]), [SettleStatus::Committed, SettleStatus::Committed]);
        assert_eq!(books(&store, "tok").await, (usdc(2), Usdc::ZERO));
    }

    /// Two stores on one database (two ledger processes), their writers batching at once on
    /// two tokens near their caps, batches mixing both tokens, each hold settled through the
    /// other store: between them exactly the caps are held and spent, and every operation
    /// is answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_stores_batching_on_two_hot_tokens_never_overspend() {
        let database = Database::create().await;
        let stores = [database.store().await, database.store().await];
        const CAP: u64 = 40;
        let tokens = ["tok_a", "tok_b"];
        let clients: Vec<_> = (0..32)
            .map(|client| {
                let (mine, other) = (stores[client % 2].clone(), stores[(client + 1) % 2].clone());
                tokio::spawn(async move {
                    let mut holds = Vec::new();
                    for attempt in 0..10 {
                        let token_id = tokens[(client + attempt) % 2];
                        let charge_id = format!("ch_{client}_{attempt}");
                        let Work::Reserve(command) = reserve(&charge_id, token_id, CAP) else {
                            unreachable!()
                        };
                        match mine.reserve(*command).await.unwrap() {
                            ReserveOutcome::Held(_) => holds.push((charge_id, token_id)),
                            ReserveOutcome::Refused(Refusal::TokenLimitExceeded { .. }) => {}
                            other => panic!("{other:?}"),
                        }
                    }
                    let settlements = holds
                        .iter()
                        .map(|(charge_id, _)| Settlement {
                            charge_id: charge_id.clone(),
                            outcome: Outcome::Commit,
                            upstream_status: None,
                            amount_usdc: None,
                        })
                        .collect();
                    let results = other.settle(settlements, NOW).await.unwrap();
                    assert!(results.iter().all(|r| r.status == SettleStatus::Committed));
                    holds
                })
            })
            .collect();
        let mut holds = Vec::new();
        for client in clients {
            holds.extend(client.await.unwrap());
        }
        for token_id in tokens {
            let granted = holds.iter().filter(|(_, token)| *token == token_id).count();
            assert_eq!(granted, 40, "{token_id}: holds granted out of 160 attempts");
            for store in &stores {
                assert_eq!(books(store, token_id).await, (usdc(CAP), Usdc::ZERO), "{token_id}");
            }
        }
    }
}
