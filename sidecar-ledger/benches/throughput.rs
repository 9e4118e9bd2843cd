//! Throughput of the ledger's stores: reserve + commit pairs per second, each pair's commit
//! sent on its own ("single", one settlement per call) or gathered as the filter sends them
//! ("batched", up to 64 settlements per call). Every operation is durable before it is
//! answered: SQLite in WAL mode with `synchronous = FULL` and group commit; PostgreSQL with
//! its default `synchronous_commit = on`, in a fresh database on `PAYSTILE_BENCH_POSTGRES_URL`
//! (default `postgres://127.0.0.1:5432/test`, whose user may create databases).
//!
//! The rows:
//! - one store, one hot token, at 1, 8 and 64 concurrent clients;
//! - PostgreSQL only, two stores on one database: two [`Store`]s opened on the same URL, each
//!   with its own connection pool and writer, which is what two ledger processes sharing the
//!   books are to PostgreSQL. The clients are split evenly between them (2, 8 and 64 in all):
//!   on one hot token (both ledgers take turns at its row lock), then with a token of its own
//!   per client (different tokens, which should scale with the clients).
//!
//! `cargo bench -p paystile-ledger --bench throughput` prints one table (`-- PostgreSQL`: only
//! the rows whose store's name contains that). After each run it
//! checks the books through every store: each token's spend equals the pairs counted on it,
//! and nothing is left on hold. For PostgreSQL it also prints the write transactions the
//! server committed per second during the run (the transaction ids it handed out, which
//! counts other clients of the server too) and the pairs per transaction.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use paystile_ledger::ledger::now_millis;
use paystile_ledger::settings::{Database, PostgresUrl};
use paystile_ledger::store::{ReserveCommand, ReserveOutcome, Store};
use paystile_protocol::Usdc;
use paystile_protocol::ledger_api::{Outcome, SettleStatus, Settlement, TokenGrant};
use paystile_protocol::pay_token::Scope;

const RUN: Duration = Duration::from_secs(3);
const BATCH: usize = 64;
const HOT_TOKEN: &str = "tok_bench";
/// Charge ids are unique across runs.
static NEXT_CHARGE: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Single,
    Batched,
}

/// Which token each client spends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tokens {
    /// All of them the same one.
    Hot,
    /// Each its own, fresh for each run.
    PerClient,
}

fn grant(token_id: &str) -> TokenGrant {
    TokenGrant {
        token_id: token_id.into(),
        buyer_id: "bench".into(),
        buyer_tag: None,
        service_id: Some("bench".into()),
        scope: Scope::Single,
        limit_usdc: Usdc::MAX,
        expires_at: 4_000_000_000,
        sandbox: false,
    }
}

fn price() -> Usdc {
    Usdc::from_micros(1_000).unwrap_or(Usdc::ZERO)
}

async fn reserve(store: &Store, token_id: &str, n: u64) -> anyhow::Result<String> {
    let now = now_millis();
    let charge_id = format!("ch_bench_{n}");
    let outcome = store
        .reserve(ReserveCommand {
            charge_id: charge_id.clone(),
            extra_charge_ids: Vec::new(),
            extras_until: None,
            token: grant(token_id),
            service_id: "bench".into(),
            price: price(),
            idempotency: None,
            cap: None,
            now,
            hold_expires_at: now + 120_000,
            max_replays: 5,
            daily_limits: Default::default(),
        })
        .await?;
    ensure!(matches!(outcome, ReserveOutcome::Held(_)), "refused: {outcome:?}");
    Ok(charge_id)
}

async fn commit(store: &Store, charge_ids: Vec<String>) -> anyhow::Result<()> {
    let settlements = charge_ids
        .into_iter()
        .map(|charge_id| Settlement {
            charge_id,
            outcome: Outcome::Commit,
            upstream_status: Some(200),
            amount_usdc: None,
        })
        .collect();
    let results = store.settle(settlements, now_millis()).await?;
    ensure!(results.iter().all(|r| r.status == SettleStatus::Committed), "{results:?}");
    Ok(())
}

/// One client's loop until `deadline`: the pairs it committed.
async fn client(
    store: Store,
    token_id: String,
    mode: Mode,
    deadline: Instant,
) -> anyhow::Result<u64> {
    let mut pairs = 0;
    let mut held = Vec::new();
    while Instant::now() < deadline {
        held.push(reserve(&store, &token_id, NEXT_CHARGE.fetch_add(1, Ordering::Relaxed)).await?);
        if mode == Mode::Single || held.len() == BATCH {
            pairs += held.len() as u64;
            commit(&store, std::mem::take(&mut held)).await?;
        }
    }
    if !held.is_empty() {
        pairs += held.len() as u64;
        commit(&store, held).await?;
    }
    Ok(pairs)
}

/// `clients` concurrent clients for [`RUN`], spread evenly over `stores`: the pairs each
/// token got, and the rate of all of them per second.
async fn run(
    stores: &[Store],
    clients: usize,
    mode: Mode,
    tokens: Tokens,
    run_id: usize,
) -> anyhow::Result<(Vec<(String, u64)>, f64)> {
    let deadline = Instant::now() + RUN;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..clients {
        let store = stores[i % stores.len()].clone();
        let token_id = match tokens {
            Tokens::Hot => HOT_TOKEN.to_owned(),
            Tokens::PerClient => format!("tok_bench_{run_id}_{i}"),
        };
        let task = tokio::spawn(client(store, token_id.clone(), mode, deadline));
        tasks.push((token_id, task));
    }
    let mut counted = Vec::new();
    for (token_id, task) in tasks {
        counted.push((token_id, task.await??));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let pairs: u64 = counted.iter().map(|(_, pairs)| pairs).sum();
    Ok((counted, pairs as f64 / elapsed))
}

/// Each token's books, read through every store, must hold exactly the pairs counted on it,
/// and nothing on hold.
async fn check_books(stores: &[Store], token_id: &str, pairs: u64) -> anyhow::Result<()> {
    for store in stores {
        let token =
            store.token(token_id.into(), now_millis()).await?.context("the token is gone")?;
        ensure!(token.reserved.is_zero(), "holds left open: {token:?}");
        ensure!(
            token.used.micros() == pairs * price().micros(),
            "{token_id} spent {} for {pairs} pairs",
            token.used
        );
    }
    Ok(())
}

/// A fresh database on the PostgreSQL server, dropped at the end of [`main`].
async fn create_database(
    admin_url: &str,
) -> anyhow::Result<(tokio_postgres::Client, String, String)> {
    let (admin, connection) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls)
        .await
        .context("PostgreSQL is not reachable (PAYSTILE_BENCH_POSTGRES_URL)")?;
    tokio::spawn(connection);
    let name = format!("paystile_bench_{}", std::process::id());
    // One statement per call: DROP and CREATE DATABASE cannot share a transaction.
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name}")).await?;
    admin.batch_execute(&format!("CREATE DATABASE {name}")).await?;
    let (server, _) = admin_url.rsplit_once('/').context("expected postgres://host/dbname")?;
    Ok((admin, format!("{server}/{name}"), name))
}

/// The next transaction id the server will hand out: how many write transactions it has
/// started, on every database.
async fn next_xid(admin: &tokio_postgres::Client) -> anyhow::Result<i64> {
    let row = admin.query_one("SELECT pg_snapshot_xmax(pg_current_snapshot())::text", &[]).await?;
    Ok(row.get::<_, String>(0).parse()?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::TempDir::new()?;
    let admin_url = std::env::var("PAYSTILE_BENCH_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://127.0.0.1:5432/test".into());
    let (admin, postgres_url, postgres_db) = create_database(&admin_url).await?;
    let postgres =
        Database::Postgres(PostgresUrl::parse(&postgres_url).map_err(anyhow::Error::msg)?);
    let sqlite = Database::Sqlite(dir.path().join("bench.db"));

    let rows = [
        ("SQLite (WAL, synchronous=FULL)", &sqlite, 1, Tokens::Hot, [1, 8, 64]),
        ("PostgreSQL (synchronous_commit=on)", &postgres, 1, Tokens::Hot, [1, 8, 64]),
        ("PostgreSQL, 2 stores", &postgres, 2, Tokens::Hot, [2, 8, 64]),
        ("PostgreSQL, 2 stores", &postgres, 2, Tokens::PerClient, [2, 8, 64]),
    ];
    // Cargo passes `--bench`; any other argument picks rows.
    let only = std::env::args().skip(1).find(|arg| !arg.starts_with("--")).unwrap_or_default();
    println!("| store | token | mode | clients | pairs/s | PostgreSQL xacts/s | pairs/xact |");
    println!("|---|---|---|--:|--:|--:|--:|");
    let mut hot_pairs = [0, 0];
    let mut run_id = 0;
    for (name, database, count, tokens, client_counts) in rows {
        if !name.contains(&only) {
            continue;
        }
        let mut stores = Vec::new();
        for _ in 0..count {
            stores.push(Store::open(database).await?);
        }
        let is_postgres = matches!(database, Database::Postgres(_));
        for mode in [Mode::Single, Mode::Batched] {
            if tokens == Tokens::PerClient && mode == Mode::Batched {
                continue;
            }
            for clients in client_counts {
                run_id += 1;
                let xid = if is_postgres { Some(next_xid(&admin).await?) } else { None };
                let (counted, rate) = run(&stores, clients, mode, tokens, run_id).await?;
                let xacts = match xid {
                    Some(before) => Some(next_xid(&admin).await? - before),
                    None => None,
                };
                let mut pairs = 0;
                for (token_id, count) in &counted {
                    pairs += count;
                    if tokens == Tokens::PerClient {
                        check_books(&stores, token_id, *count).await?;
                    }
                }
                if tokens == Tokens::Hot {
                    let hot = &mut hot_pairs[usize::from(is_postgres)];
                    *hot += pairs;
                    check_books(&stores, HOT_TOKEN, *hot).await?;
                }
                let token = match tokens {
                    Tokens::Hot => "hot",
                    Tokens::PerClient => "one per client",
                };
                let (per_second, per_xact) = match xacts {
                    Some(xacts) => (
                        format!("{:.0}", xacts as f64 / RUN.as_secs_f64()),
                        format!("{:.1}", pairs as f64 / xacts.max(1) as f64),
                    ),
                    None => ("–".into(), "–".into()),
                };
                println!(
                    "| {name} | {token} | {mode:?} | {clients} | {rate:.0} | {per_second} | {per_xact} |"
                );
            }
        }
    }
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {postgres_db} WITH (FORCE)")).await?;
    Ok(())
}
