//! The ledger's HTTP API, tested against the real `paystile-ledger` binary: the conformance
//! suite. Every test that starts a ledger runs twice, on each store (`sqlite::…` and
//! `postgres::…`); a test on PostgreSQL gets a database of its own, dropped when it ends.
//! PostgreSQL must be reachable (see [`postgres_admin_url`]): its tests fail, never skip,
//! without it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use paystile_ledger::child::LedgerProcess;
use paystile_ledger::client::{AdminClient, ClientError};
use paystile_protocol::jws::Key;
use paystile_protocol::l402;
use paystile_protocol::ledger_api::{
    AccountView, ChargeStatus, ChildTokenRequest, Deposit, DepositRequest, Hold, IssueTokenRequest,
    IssuedToken, L402Challenge, SettleResponse, SettleStatus, TokenView,
};
use paystile_protocol::pay_token::{self, Scope, Validation};
use paystile_protocol::{ErrorBody, ErrorCode, Usdc};
use serde_json::{Value, json};
use tempfile::TempDir;

const ADMIN_KEY: &str = "test-admin-key-0123456789";
const GATEWAY_KEY: &str = "test-gateway-key-0123456789";
const TOKEN_SECRET: &str = "test-token-secret-0123456789abcdef";

/// The store a test's ledger runs on.
#[derive(Clone, Copy, Debug)]
enum Backend {
    Sqlite,
    Postgres,
}

/// Generates, for each named test function `async fn name(store: Backend)`, the tests
/// `sqlite::name` and `postgres::name`, with the given `#[tokio::test]` arguments.
macro_rules! on_both_stores {
    ($($name:ident $(($($flavor:tt)*))?),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test$(($($flavor)*))?]
                async fn $name() {
                    super::$name(super::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test$(($($flavor)*))?]
                async fn $name() {
                    super::$name(super::Backend::Postgres).await
                }
            )*
        }
    };
}

on_both_stores! {
    endpoints_require_their_own_key,
    issues_tokens_that_verify_with_the_shared_secret,
    bad_requests_get_400_with_a_message_and_change_nothing,
    holds_commit_once_release_and_count_against_the_cap,
    revocation_is_immediate_and_voids_holds_in_flight,
    idempotency_keys_replay_charges_and_refuse_misuse,
    concurrent_reserves_never_overspend(flavor = "multi_thread", worker_threads = 4),
    the_largest_amounts_neither_overflow_nor_wrap,
    answered_operations_survive_kill_9_in_the_middle_of_concurrent_load(
        flavor = "multi_thread",
        worker_threads = 4
    ),
    a_restarted_ledger_gives_open_holds_a_new_ttl,
    a_hold_past_its_ttl_cannot_commit_even_before_the_sweep,
    replays_are_capped_and_tokens_pay_for_their_own_service,
    unsettled_holds_expire_and_cannot_commit_after,
    admin_cli_issues_shows_and_revokes,
    sandbox_challenges_are_paid_by_the_sandbox_and_verify_inline,
    bad_challenge_requests_get_400_and_l402_is_off_without_its_settings,
    a_credential_stated_cap_lowers_the_limit_for_its_calls_only,
    an_l402_token_revoked_before_its_first_call_is_refused_at_it,
    buyer_balances_are_debited_exactly_and_deposits_count_once,
    daily_limits_follow_the_tier_and_restart_at_utc_midnight,
    the_panic_button_revokes_every_token_and_voids_holds_in_flight(
        flavor = "multi_thread",
        worker_threads = 4
    ),
    a_three_level_chain_is_counted_at_every_level_under_concurrency(
        flavor = "multi_thread",
        worker_threads = 4
    ),
    sandbox_tokens_charge_the_sandbox_book_only,
    bad_buyer_and_child_requests_get_400_or_404_and_change_nothing,
    admin_cli_manages_buyers_and_child_tokens,
    a_refused_reserve_stays_refused_for_its_key,
    partial_commits_charge_the_amount_and_release_the_rest,
    settle_amounts_that_do_not_fit_get_400_and_change_nothing,
    holds_past_their_ttl_are_released_on_read,
    idempotency_keys_are_forgotten_after_their_retention_once_settled,
    a_partial_commit_debits_the_balance_and_every_level_of_a_chain_by_the_amount,
    expired_holds_are_released_on_read_at_every_level_and_on_the_account,
    buyer_refusals_stay_refused_for_their_key,
}

/// The PostgreSQL server the suite makes its databases on: `PAYSTILE_TEST_POSTGRES_URL`, or
/// `postgres://127.0.0.1:5432/test`. It must let its user create databases; the last path
/// segment names a database to connect to for that.
fn postgres_admin_url() -> String {
    std::env::var("PAYSTILE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://127.0.0.1:5432/test".to_owned())
}

async fn connect_admin() -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) =
        tokio_postgres::connect(&postgres_admin_url(), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// A PostgreSQL database for one test (or the ledgers of one test), dropped with its
/// connections when the last holder lets go.
struct TestDatabase {
    name: String,
    url: String,
}

impl TestDatabase {
    async fn create() -> TestDatabase {
        let admin = connect_admin().await.unwrap_or_else(|e| {
            let cause = std::error::Error::source(&e).map(|c| format!(": {c}")).unwrap_or_default();
            panic!(
                "PostgreSQL is not reachable at {} ({e}{cause}). Every API test runs on \
                 PostgreSQL too and is not skipped without it: start it (on Debian: \
                 pg_ctlcluster --skip-systemctl-redirect <version> main start), or set \
                 PAYSTILE_TEST_POSTGRES_URL to a server that lets its user create databases",
                postgres_admin_url()
            )
        });
        let name = format!("paystile_t_{}", hex::encode(rand::random::<[u8; 8]>()));
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
        let admin_url = postgres_admin_url();
        let (server, _) = admin_url.rsplit_once('/').expect("a postgres://host/dbname URL");
        TestDatabase { url: format!("{server}/{name}"), name }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop cannot await: a thread with its own runtime drops the database.
        let dropped = std::thread::spawn(move || {
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let admin = connect_admin().await?;
                admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("cannot drop the test database {}: {dropped:?}", self.name);
        }
    }
}

/// Where a test ledger keeps its books; deleted when the test ends.
enum Books {
    Sqlite(TempDir),
    Postgres(Arc<TestDatabase>),
}

impl Books {
    async fn new(store: Backend) -> Books {
        match store {
            Backend::Sqlite => Books::Sqlite(TempDir::new().unwrap()),
            Backend::Postgres => Books::Postgres(Arc::new(TestDatabase::create().await)),
        }
    }

    fn url(&self) -> String {
        match self {
            Books::Sqlite(dir) => format!("sqlite://{}", dir.path().join("ledger.db").display()),
            Books::Postgres(database) => database.url.clone(),
        }
    }
}

struct Ledger {
    /// Killed first when the test ends (fields drop in order), then its books go.
    process: LedgerProcess,
    args: Vec<String>,
    admin: AdminClient,
    http: reqwest::Client,
    books: Books,
}

fn ledger_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_paystile-ledger"))
}

fn envs() -> Vec<(String, String)> {
    [("PAYSTILE_ADMIN_KEY", ADMIN_KEY), ("PAYSTILE_GATEWAY_KEY", GATEWAY_KEY)]
        .into_iter()
        .chain([("PAYSTILE_TOKEN_SECRET", TOKEN_SECRET), ("RUST_LOG", "warn")])
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

impl Ledger {
    /// A ledger on fresh books in `store`.
    async fn start(store: Backend, extra: &[&str]) -> Ledger {
        Ledger::start_on(Books::new(store).await, extra)
    }

    /// A ledger on `books`, which other ledgers may share (PostgreSQL).
    fn start_on(books: Books, extra: &[&str]) -> Ledger {
        let mut args: Vec<String> = vec!["--database-url".into(), books.url()];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let listen = ["--listen".to_owned(), "127.0.0.1:0".to_owned()];
        let process = LedgerProcess::start(
            ledger_binary(),
            &[args.clone(), listen.to_vec()].concat(),
            &envs(),
            Stdio::inherit(),
        )
        .unwrap();
        let admin = AdminClient::new(&process.url(), ADMIN_KEY);
        Ledger { process, args, admin, http: reqwest::Client::new(), books }
    }

    /// Stops the ledger and starts another on the same books with `extra` settings.
    fn restart_with(&mut self, extra: &[&str]) {
        self.process.kill().unwrap();
        let mut args: Vec<String> = vec!["--database-url".into(), self.books.url()];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let listen = ["--listen".to_owned(), "127.0.0.1:0".to_owned()];
        self.process = LedgerProcess::start(
            ledger_binary(),
            &[args.clone(), listen.to_vec()].concat(),
            &envs(),
            Stdio::inherit(),
        )
        .unwrap();
        self.args = args;
        self.admin = AdminClient::new(&self.process.url(), ADMIN_KEY);
    }

    async fn put(&self, path: &str, body: &str) -> (u16, Value) {
        let response = self
            .http
            .put(format!("{}{path}", self.process.url()))
            .header("content-type", "application/json")
            .bearer_auth(ADMIN_KEY)
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn deposit(&self, buyer_id: &str, amount: &str, reference: Option<&str>) -> Deposit {
        let request =
            DepositRequest { amount_usdc: usdc(amount), reference: reference.map(Into::into) };
        self.admin.deposit(buyer_id, &request).await.unwrap()
    }

    async fn account(&self, buyer_id: &str) -> AccountView {
        self.admin.buyer(buyer_id).await.unwrap().account.unwrap()
    }

    async fn child(&self, parent_id: &str, limit: &str) -> IssuedToken {
        self.admin.mint_child(parent_id, &child_request(limit)).await.unwrap()
    }

    /// Makes every Idempotency-Key `by` older, straight in the books (no clock to move).
    async fn age_idempotency_keys(&self, by: Duration) {
        let by = i64::try_from(by.as_millis()).unwrap();
        match &self.books {
            Books::Sqlite(dir) => {
                let conn = rusqlite::Connection::open(dir.path().join("ledger.db")).unwrap();
                conn.busy_timeout(Duration::from_secs(5)).unwrap();
                conn.execute("UPDATE idempotency_keys SET created_at = created_at - ?1", [by])
                    .unwrap();
            }
            Books::Postgres(database) => {
                let (client, connection) =
                    tokio_postgres::connect(&database.url, tokio_postgres::NoTls).await.unwrap();
                tokio::spawn(connection);
                client
                    .execute("UPDATE idempotency_keys SET created_at = created_at - $1", &[&by])
                    .await
                    .unwrap();
            }
        }
    }

    /// `POST /v1/holds/settle` with `settlements` as given.
    async fn settle_raw(&self, settlements: Value) -> (u16, Value) {
        let body = json!({ "settlements": settlements }).to_string();
        self.post("/v1/holds/settle", Some(GATEWAY_KEY), &body).await
    }

    /// `kill -9`, then start again on the same port and database.
    fn crash_and_restart(&mut self) {
        let address = self.process.address();
        self.process.kill().unwrap();
        let listen = ["--listen".to_owned(), address.to_string()];
        self.process = LedgerProcess::start(
            ledger_binary(),
            &[self.args.clone(), listen.to_vec()].concat(),
            &envs(),
            Stdio::inherit(),
        )
        .unwrap();
    }

    async fn post(&self, path: &str, key: Option<&str>, body: &str) -> (u16, Value) {
        let mut request = self
            .http
            .post(format!("{}{path}", self.process.url()))
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn reserve(&self, body: &Value) -> (u16, Value) {
        self.post("/v1/holds", Some(GATEWAY_KEY), &body.to_string()).await
    }

    async fn hold(&self, body: &Value) -> Hold {
        let (status, answer) = self.reserve(body).await;
        assert_eq!(status, 200, "{answer}");
        serde_json::from_value(answer).unwrap()
    }

    async fn settle(&self, settlements: &[(&str, &str)]) -> Vec<SettleStatus> {
        let settlements: Vec<Value> = settlements
            .iter()
            .map(|(id, outcome)| json!({"chargeId": id, "outcome": outcome, "upstreamStatus": 200}))
            .collect();
        let body = json!({ "settlements": settlements }).to_string();
        let (status, answer) = self.post("/v1/holds/settle", Some(GATEWAY_KEY), &body).await;
        assert_eq!(status, 200, "{answer}");
        let answer: SettleResponse = serde_json::from_value(answer).unwrap();
        answer.results.into_iter().map(|r| r.status).collect()
    }

    async fn token(&self, token_id: &str) -> TokenView {
        self.admin.token(token_id).await.unwrap()
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn usdc(amount: &str) -> Usdc {
    amount.parse().unwrap()
}

/// A reserve body for `token_id` with cap `limit`, as the filter sends it.
fn reserve_body(token_id: &str, limit: &str, price: &str) -> Value {
    json!({
        "token": {
            "tokenId": token_id, "buyerId": "buyer-1", "serviceId": "weather",
            "scope": "SINGLE", "limitUsdc": limit, "expiresAt": 4_000_000_000u64
        },
        "serviceId": "weather",
        "priceUsdc": price,
    })
}

fn with_key(mut body: Value, key: &str, fingerprint_byte: char) -> Value {
    body["idempotency"] =
        json!({ "key": key, "fingerprint": fingerprint_byte.to_string().repeat(64) });
    body
}

fn issue_request(limit: &str) -> IssueTokenRequest {
    IssueTokenRequest {
        service_id: "weather".into(),
        limit_usdc: usdc(limit),
        buyer_id: "agent-7".into(),
        buyer_tag: Some("nightly-batch".into()),
        scope: None,
        expires_at: None,
        ttl_seconds: Some(600),
        sandbox: false,
    }
}

async fn endpoints_require_their_own_key(store: Backend) {
    let ledger = Ledger::start(store, &[]).await;
    let health = ledger.http.get(format!("{}/healthz", ledger.process.url())).send().await.unwrap();
    assert_eq!(health.status(), 200);

    let issue = json!({"serviceId": "s", "limitUsdc": "1", "buyerId": "b"}).to_string();
    let hold = reserve_body("tok_x", "1", "0.1").to_string();
    for (path, body, right_key, wrong_key) in [
        ("/v1/tokens", &issue, ADMIN_KEY, GATEWAY_KEY),
        ("/v1/holds", &hold, GATEWAY_KEY, ADMIN_KEY),
    ] {
        for key in [None, Some("not-the-key-0123456789"), Some(wrong_key)] {
            let (status, answer) = ledger.post(path, key, body).await;
            assert_eq!(
                (status, answer["code"].as_str()),
                (401, Some("unauthorized")),
                "{path} {key:?}"
            );
        }
        let (status, answer) = ledger.post(path, Some(right_key), body).await;
        assert!(status == 200 || status == 201, "{path}: {answer}");
    }
    // Nothing was held by the refused calls: one hold of 0.1 exists.
    assert_eq!(ledger.token("tok_x").await.reserved_usdc, usdc("0.1"));
}

async fn issues_tokens_that_verify_with_the_shared_secret(store: Backend) {
    let ledger = Ledger::start(store, &["--token-issuer", "paystile-test"]).await;
    let issued = ledger.admin.issue_token(&issue_request("2.5")).await.unwrap();
    assert!(issued.token_id.starts_with("tok_"));
    assert_eq!(issued.limit_usdc, usdc("2.5"));

    let validation = Validation { issuer: Some("paystile-test".into()), ..Validation::default() };
    let claims =
        pay_token::verify(&issued.jwt, &[Key::hs256(TOKEN_SECRET)], &validation, unix_now())
            .unwrap();
    assert_eq!(claims.jti, issued.token_id);
    assert_eq!((claims.sub.as_str(), claims.service_id.as_deref()), ("agent-7", Some("weather")));
    assert_eq!((claims.limit_usdc, claims.scope), (usdc("2.5"), Scope::Single));
    assert_eq!(claims.buyer_tag.as_deref(), Some("nightly-batch"));
    assert_eq!(claims.exp - claims.iat.unwrap(), 600);

    let view = ledger.token(&issued.token_id).await;
    assert_eq!(
        (view.limit_usdc, view.used_usdc, view.remaining_usdc),
        (usdc("2.5"), Usdc::ZERO, usdc("2.5"))
    );
    assert_eq!((view.revoked, view.expires_at), (false, issued.expires_at));
}

async fn bad_requests_get_400_with_a_message_and_change_nothing(store: Backend) {
    let ledger = Ledger::start(store, &[]).await;
    let issued = ledger.admin.issue_token(&issue_request("1")).await.unwrap();
    let before = ledger.token(&issued.token_id).await;

    let issue_cases = [
        ("{not json", "JSON"),
        (
            r#"{"serviceId":"s","limitUsdc":"1","buyerId":"b","color":"red"}"#,
            "unknown field `color`",
        ),
        (r#"{"serviceId":"s","limitUsdc":"1.0000001","buyerId":"b"}"#, "more than 6 decimals"),
        (r#"{"serviceId":"s","limitUsdc":"-1","buyerId":"b"}"#, "negative"),
        (r#"{"serviceId":"s","limitUsdc":0.5,"buyerId":"b"}"#, "decimal strings"),
        (r#"{"serviceId":"s","limitUsdc":"99999999999999999999","buyerId":"b"}"#, "too large"),
        (r#"{"serviceId":"s","limitUsdc":"0","buyerId":"b"}"#, "greater than 0"),
        (r#"{"serviceId":"","limitUsdc":"1","buyerId":"b"}"#, "serviceId must not be empty"),
        (
            r#"{"serviceId":"s","limitUsdc":"1","buyerId":"b","ttlSeconds":5,"expiresAt":"2030-01-01T00:00:00Z"}"#,
            "at most one",
        ),
        (r#"{"serviceId":"s","limitUsdc":"1","buyerId":"b","expiresAt":"tomorrow"}"#, "RFC 3339"),
        (
            r#"{"serviceId":"s","limitUsdc":"1","buyerId":"b","expiresAt":"2001-01-01T00:00:00Z"}"#,
            "future",
        ),
    ];
    for (body, message) in issue_cases {
        let (status, answer) = ledger.post("/v1/tokens", Some(ADMIN_KEY), body).await;
        assert_eq!(
            (status, answer["code"].as_str()),
            (400, Some("bad_request")),
            "{body}: {answer}"
        );
        assert!(answer["error"].as_str().unwrap().contains(message), "{body}: {answer}");
    }

    let valid = reserve_body(&issued.token_id, "1", "0.1");
    let mut bad_fingerprint = with_key(valid.clone(), "k", 'a');
    bad_fingerprint["idempotency"]["fingerprint"] = json!("short");
    let reserve_cases = [
        (reserve_body(&issued.token_id, "1", "0"), "priceUsdc must be greater than 0"),
        (reserve_body(&issued.token_id, "1", "0.0000001"), "more than 6 decimals"),
        (reserve_body("", "1", "0.1"), "token.tokenId must not be empty"),
        (with_key(valid.clone(), "", 'a'), "idempotency.key"),
        (with_key(valid.clone(), &"k".repeat(256), 'a'), "idempotency.key"),
        (bad_fingerprint, "fingerprint"),
        (json!({"serviceId": "weather", "priceUsdc": "0.1"}), "missing field `token`"),
        // PostgreSQL's text cannot hold NUL; no store is asked to.
        (reserve_body("tok_\u{0}", "1", "0.1"), "control characters"),
        (
            {
                let mut body = valid.clone();
                body["token"]["buyerTag"] = json!("tag\u{0}");
                body
            },
            "control characters",
        ),
    ];
    for (body, message) in reserve_cases {
        let (status, answer) = ledger.reserve(&body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(answer["error"].as_str().unwrap().contains(message), "{body}: {answer}");
    }
    let (status, answer) = ledger
        .post(
            "/v1/holds/settle",
            Some(GATEWAY_KEY),
            r#"{"settlements":[{"chargeId":"c","outcome":"maybe"}]}"#,
        )
        .await;
    assert_eq!(status, 400, "{answer}");

    // Ids no store could hold are unknown ids.
    assert_eq!(ledger.settle(&[("ch_\u{0}", "commit")]).await, [SettleStatus::Unknown]);

    assert_eq!(ledger.token(&issued.token_id).await, before, "a refused request changed the token");
    for unknown in ["tok_missing", "tok_%00"] {
        let missing = ledger.admin.token(unknown).await.unwrap_err();
        assert!(
            matches!(
                missing,
                ClientError::Refused {
                    status: 404,
                    body: ErrorBody { code: ErrorCode::NotFound, .. }
                }
            ),
            "{unknown}: {missing}"
        );
        let missing = ledger.admin.revoke_token(unknown).await.unwrap_err();
        assert!(matches!(missing, ClientError::Refused { status: 404, .. }), "{unknown}");
    }
    for unknown in ["ch_missing", "ch_%00"] {
        let missing = ledger.admin.charge(unknown).await.unwrap_err();
        assert!(matches!(missing, ClientError::Refused { status: 404, .. }), "{unknown}");
    }
}

async fn holds_commit_once_release_and_count_against_the_cap(store: Backend) {
    let ledger = Ledger::start(store, &[]).await;
    // A token minted elsewhere: the ledger learns it from its first reserve.
    let body = reserve_body("tok_external", "0.003", "0.001");
    let first = ledger.hold(&body).await;
    let second = ledger.hold(&body).await;
    let third = ledger.hold(&body).await;
    assert_eq!(
        [first.remaining_usdc, second.remaining_usdc, third.remaining_usdc],
        [usdc("0.002"), usdc("0.001"), Usdc::ZERO]
    );
    let (status, refusal) = ledger.reserve(&body).await;
    assert_eq!(
        (status, refusal["code"].as_str()),
        (402, Some("token_limit_exceeded")),
        "{refusal}"
    );
    assert_eq!(
        (refusal["reserved"].as_str(), refusal["limit"].as_str()),
        (Some("0.003000"), Some("0.003000"))
    );

    let results = ledger
        .settle(&[
            (&first.charge_id, "commit"),
            (&second.charge_id, "release"),
            (&first.charge_id, "commit"),
            ("ch_nope", "commit"),
        ])
        .await;
    assert_eq!(
        results,
        [
            SettleStatus::Committed,
            SettleStatus::Released,
            SettleStatus::AlreadyCommitted,
            SettleStatus::Unknown
        ]
    );
    assert_eq!(
        ledger.settle(&[(&second.charge_id, "commit")]).await,
        [SettleStatus::AlreadyReleased]
    );

    let token = ledger.token("tok_external").await;
    assert_eq!(
        (token.used_usdc, token.reserved_usdc, token.remaining_usdc),
        (usdc("0.001"), usdc("0.001"), usdc("0.001"))
    );
    let charge = ledger.admin.charge(&first.charge_id).await.unwrap();
    assert_eq!(
        (charge.status, charge.amount_usdc, charge.upstream_status),
        (ChargeStatus::Committed, usdc("0.001"), Some(200))
    );
    assert_eq!(
        (charge.token_id.as_str(), charge.buyer_id.as_str(), charge.service_id.as_str()),
        ("tok_external", "buyer-1", "weather")
    );
    let released = ledger.admin.charge(&second.charge_id).await.unwrap();
    assert_eq!((released.status, released.amount_usdc), (ChargeStatus::Released, Usdc::ZERO));

    // The freed amount can be held again.
    ledger.hold(&body).await;
}

async fn revocation_is_immediate_and_voids_holds_in_flight(store: Backend) {
    let ledger = Ledger::start(store, &[]).await;
    let issued = ledger.admin.issue_token(&issue_request("1")).await.unwrap();
    let body = reserve_body(&issued.token_id, "1", "0.25");
    let in_flight = ledger.hold(&body).await;

    let revoked = ledger.admin.revoke_token(&issued.token_id).await.unwrap();
    assert!(revoked.revoked);
    let (status, refusal) = ledger.reserve(&body).await;
    assert_eq!((status, refusal["code"].as_str()), (422, Some("token_revoked")), "{refusal}");
    assert_eq!(ledger.settle(&[(&in_flight.charge_id, "commit")]).await, [SettleStatus::Revoked]);
    let token = ledger.token(&issued.token_id).await;
    assert_eq!((token.used_usdc, token.reserved_usdc), (Usdc::ZERO, Usdc::ZERO));
    assert!(
        ledger.admin.revoke_token(&issued.token_id).await.unwrap().revoked,
        "revoking twice is fine"
    );
}

async fn idempotency_keys_replay_charges_and_refuse_misuse(store: Backend) {
    let ledger = Ledger::start(store, &[]).await;
    let base = reserve_body("tok_idem", "1", "0.1");
    let first = ledger.hold(&with_key(base.clone(), "order-1", 'a')).await;

    let (status, busy) = ledger.reserve(&with_key(base.clone(), "order-1", 'a')).await;
    assert_eq!((status, busy["code"].as_str()), (409, Some("idempotency_key_in_use")));
    let (status, other) = ledger.reserve(&with_key(base.clone(), "order-1", 'b')).await;
    assert_eq!((status, other["code"].as_str()), (422, Some("idempotency_key_mismatch")));

    ledger.settle(&[(&first.charge_id, "commit")]).await;
    let replay = ledger.hold(&with_key(base.clone(), "order-1", 'a')).await;
    assert_eq!((replay.charge_id.as_str(), replay.replayed), (first.charge_id.as_str(), true));
    assert_eq!(replay.amount_usdc, usdc("0.1"));
    let token = ledger.token("tok_idem").await;
    assert_eq!(
        (token.used_usdc, token.reserved_usdc),
        (usdc("0.1"), Usdc::ZERO),
        "a replay held money"
    );

    // A key whose first attempt was released may be charged on retry, once.
    let failed = ledger.hold(&with_key(base.clone(), "order-2", 'a')).await;
    ledger.settle(&[(&failed.charge_id, "release")]).await;
    let retry = ledger.hold(&with_key(base.clone(), "order-2", 'a')).await;
    assert!(!retry.replayed && retry.charge_id != failed.charge_id);
    ledger.settle(&[(&retry.charge_id, "commit")]).await;
    let again = ledger.hold(&with_key(base.clone(), "order-2", 'a')).await;
    assert_eq!((again.charge_id, again.replayed), (retry.charge_id, true));

    // Keys are scoped to the token: another token may use the same key.
    let elsewhere =
        ledger.hold(&with_key(reserve_body("tok_other", "1", "0.1"), "order-1", 'a')).await;
    assert!(!elsewhere.replayed);
    assert_eq!(ledger.token("tok_idem").await.used_usdc, usdc("0.2"));
}

async fn concurrent_reserves_never_overspend(store: Backend) {
    let ledger = std::sync::Arc::new(Ledger::start(store, &[]).await);
    // 0.037 allows exactly 37 holds of 0.001; 120 callers race for them.
    let body = reserve_body("tok_race", "0.037", "0.001");
    let calls = (0..120).map(|_| {
        let (ledger, body) = (ledger.clone(), body.clone());
        tokio::spawn(async move { ledger.reserve(&body).await })
    });
    let mut held = Vec::new();
    for call in calls {
        match call.await.unwrap() {
            (200, hold) => held.push(hold["chargeId"].as_str().unwrap().to_owned()),
            (402, refusal) => assert_eq!(refusal["code"], "token_limit_exceeded"),
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!(held.len(), 37);
    let settlements: Vec<(&str, &str)> = held.iter().map(|id| (id.as_str(), "commit")).collect();
    // Commit all, twice over: nothing is charged twice.
    for _ in 0..2 {
        ledger.settle(&settlements).await;
    }
    let token = ledger.token("tok_race").await;
    assert_eq!((token.used_usdc, token.reserved_usdc), (usdc("0.037"), Usdc::ZERO));
}

async fn the_largest_amounts_neither_overflow_nor_wrap(store: Backend) {
    let ledger = Ledger::start(store, &[]).await;
    let max = Usdc::MAX.to_string();
    let hold = ledger.hold(&reserve_body("tok_max", &max, &max)).await;
    assert_eq!(hold.remaining_usdc, Usdc::ZERO);
    let (status, refusal) = ledger.reserve(&reserve_body("tok_max", &max, "0.000001")).await;
    assert_eq!(
        (status, refusal["code"].as_str()),
        (402, Some("token_limit_exceeded")),
        "{refusal}"
    );
    assert_eq!(ledger.settle(&[(&hold.charge_id, "commit")]).await, [SettleStatus::Committed]);
    let token = ledger.token("tok_max").await;
    assert_eq!((token.used_usdc, token.reserved_usdc), (Usdc::MAX, Usdc::ZERO));
    let (status, _) = ledger.reserve(&reserve_body("tok_max", &max, &max)).await;
    assert_eq!(status, 402);
}

/// Two ledger processes on one PostgreSQL database, driven at once at the same token: between
/// them they never hold or spend past its cap, commit each hold once, and charge an
/// Idempotency-Key once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_ledgers_on_one_postgres_database_never_overspend() {
    let database = Arc::new(TestDatabase::create().await);
    // Started together: their migrations take turns under the advisory lock.
    let [a, b] = std::thread::scope(|scope| {
        [0, 1]
            .map(|_| {
                let books = Books::Postgres(database.clone());
                scope.spawn(move || Ledger::start_on(books, &[]))
            })
            .map(|started| Arc::new(started.join().unwrap()))
    });

    // 0.040 fits 40 holds of 0.001; 16 clients, 8 on each ledger, try 20 times each. Each
    // hold is committed through both ledgers at once.
    const CAP: &str = "0.040";
    let body = reserve_body("tok_shared", CAP, "0.001");
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (a, b, done) = (a.clone(), b.clone(), done.clone());
        tokio::spawn(async move {
            let mut looks = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                for ledger in [&a, &b] {
                    if let Ok(token) = ledger.admin.token("tok_shared").await {
                        let spent = token.used_usdc.checked_add(token.reserved_usdc).unwrap();
                        assert!(spent <= usdc(CAP), "overspent: {token:?}");
                        looks += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            looks
        })
    };
    let clients: Vec<_> = (0..16)
        .map(|i| {
            let (mine, other) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
            let (mine, other, body) = (mine.clone(), other.clone(), body.clone());
            tokio::spawn(async move {
                let mut held = Vec::new();
                for _ in 0..20 {
                    match mine.reserve(&body).await {
                        (200, hold) => {
                            let id = hold["chargeId"].as_str().unwrap().to_owned();
                            let commit = [(id.as_str(), "commit")];
                            let (here, there) =
                                tokio::join!(mine.settle(&commit), other.settle(&commit));
                            held.push((id, [here[0], there[0]]));
                        }
                        (402, refusal) => assert_eq!(refusal["code"], "token_limit_exceeded"),
                        other => panic!("unexpected answer {other:?}"),
                    }
                }
                held
            })
        })
        .collect();
    let mut held = Vec::new();
    for client in clients {
        held.extend(client.await.unwrap());
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(watcher.await.unwrap() > 0, "the watcher never saw the token");

    assert_eq!(held.len(), 40, "holds granted out of 320 attempts");
    for (id, mut results) in held.clone() {
        results.sort_by_key(|status| format!("{status:?}"));
        assert_eq!(
            results,
            [SettleStatus::AlreadyCommitted, SettleStatus::Committed],
            "{id}: one commit per hold"
        );
    }
    let mut committed = Usdc::ZERO;
    for (id, _) in &held {
        let charge = b.admin.charge(id).await.unwrap();
        assert_eq!(charge.status, ChargeStatus::Committed, "{id}");
        committed = committed.checked_add(charge.amount_usdc).unwrap();
    }
    for ledger in [&a, &b] {
        let token = ledger.token("tok_shared").await;
        assert_eq!((token.used_usdc, token.reserved_usdc), (committed, Usdc::ZERO));
        assert_eq!(token.used_usdc, usdc(CAP));
    }

    // The same Idempotency-Key sent to both ledgers at once: one hold, the other call told
    // the key is in use; once committed, both replay that one charge.
    let keyed = reserve_body("tok_keys", "1", "0.01");
    let orders: Vec<_> = (0..8)
        .map(|n| {
            let (a, b) = (a.clone(), b.clone());
            let body = with_key(keyed.clone(), &format!("order-{n}"), 'a');
            tokio::spawn(async move {
                let (here, there) = tokio::join!(a.reserve(&body), b.reserve(&body));
                let (first, busy) = if here.0 == 200 { (here, there) } else { (there, here) };
                assert_eq!(first.0, 200, "{first:?} {busy:?}");
                assert_eq!(first.1["replayed"], false);
                assert_eq!(
                    (busy.0, busy.1["code"].as_str()),
                    (409, Some("idempotency_key_in_use")),
                    "{busy:?}"
                );
                let charge_id = first.1["chargeId"].as_str().unwrap().to_owned();
                assert_eq!(b.settle(&[(&charge_id, "commit")]).await, [SettleStatus::Committed]);
                let (here, there) = tokio::join!(a.hold(&body), b.hold(&body));
                for replay in [here, there] {
                    assert_eq!((replay.charge_id.as_str(), replay.replayed), (&*charge_id, true));
                }
            })
        })
        .collect();
    for order in orders {
        order.await.unwrap();
    }
    let token = a.token("tok_keys").await;
    assert_eq!((token.used_usdc, token.reserved_usdc), (usdc("0.08"), Usdc::ZERO));
}

async fn answered_operations_survive_kill_9_in_the_middle_of_concurrent_load(store: Backend) {
    let mut ledger = Ledger::start(store, &[]).await;
    let body = reserve_body("tok_durable", "100", "0.01");
    let answered = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (url, http) = (ledger.process.url(), ledger.http.clone());
    // 16 callers reserve and commit in a loop; their answers are recorded until the ledger dies.
    let callers: Vec<_> = (0..16)
        .map(|_| {
            let (url, http, body) = (url.clone(), http.clone(), body.to_string());
            let (answered, sent) = (answered.clone(), sent.clone());
            tokio::spawn(async move {
                let post = |path: &str, body: String| {
                    http.post(format!("{url}{path}"))
                        .bearer_auth(GATEWAY_KEY)
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                };
                loop {
                    let Ok(hold) = post("/v1/holds", body.clone()).await else { return };
                    let Ok(hold) = hold.json::<Hold>().await else { return };
                    sent.lock().unwrap().push(hold.charge_id.clone());
                    let settle =
                        json!({"settlements": [{"chargeId": hold.charge_id, "outcome": "commit"}]});
                    let Ok(answer) = post("/v1/holds/settle", settle.to_string()).await else {
                        return;
                    };
                    let Ok(answer) = answer.json::<SettleResponse>().await else { return };
                    assert_eq!(answer.results[0].status, SettleStatus::Committed);
                    answered.lock().unwrap().push(hold.charge_id);
                }
            })
        })
        .collect();
    while answered.lock().unwrap().len() < 200 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    ledger.crash_and_restart();
    for caller in callers {
        caller.await.unwrap();
    }

    // Every commit the ledger answered is there; every hold it answered is held or committed;
    // and the token's spend is exactly its committed charges.
    let mut committed = 0;
    let answered = answered.lock().unwrap().clone();
    let sent = sent.lock().unwrap().clone();
    for charge_id in &sent {
        let charge = ledger.admin.charge(charge_id).await.unwrap();
        if answered.contains(charge_id) {
            assert_eq!(charge.status, ChargeStatus::Committed, "{charge_id} was lost");
        }
        assert_ne!(charge.status, ChargeStatus::Released, "{charge_id}");
        committed += u64::from(charge.status == ChargeStatus::Committed);
    }
    let token = ledger.token("tok_durable").await;
    assert_eq!(token.used_usdc, usdc("0.01").checked_mul(committed).unwrap());
    assert!(committed >= answered.len() as u64);
}

async fn a_restarted_ledger_gives_open_holds_a_new_ttl(store: Backend) {
    let mut ledger = Ledger::start(store, &["--hold-ttl-seconds", "2"]).await;
    let open = ledger.hold(&reserve_body("tok_reopen", "1", "0.1")).await;
    ledger.process.kill().unwrap();
    // Down for longer than the TTL: the gateway still holds this call's outcome.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    ledger.crash_and_restart();
    assert_eq!(ledger.settle(&[(&open.charge_id, "commit")]).await, [SettleStatus::Committed]);
    assert_eq!(ledger.token("tok_reopen").await.used_usdc, usdc("0.1"));
}

async fn a_hold_past_its_ttl_cannot_commit_even_before_the_sweep(store: Backend) {
    let ledger =
        Ledger::start(store, &["--hold-ttl-seconds", "1", "--sweep-interval-seconds", "3600"])
            .await;
    let hold = ledger.hold(&reserve_body("tok_late", "1", "0.1")).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(ledger.settle(&[(&hold.charge_id, "commit")]).await, [SettleStatus::Expired]);
    let token = ledger.token("tok_late").await;
    assert_eq!((token.used_usdc, token.reserved_usdc), (Usdc::ZERO, Usdc::ZERO));
}

async fn replays_are_capped_and_tokens_pay_for_their_own_service(store: Backend) {
    let ledger = Ledger::start(store, &["--max-replays", "2"]).await;
    let keyed = with_key(reserve_body("tok_replay", "1", "0.1"), "k", 'a');
    let first = ledger.hold(&keyed).await;
    ledger.settle(&[(&first.charge_id, "commit")]).await;
    for _ in 0..2 {
        assert!(ledger.hold(&keyed).await.replayed);
    }
    let (status, refusal) = ledger.reserve(&keyed).await;
    assert_eq!(
        (status, refusal["code"].as_str()),
        (422, Some("idempotency_key_exhausted")),
        "{refusal}"
    );
    assert_eq!(ledger.token("tok_replay").await.used_usdc, usdc("0.1"));

    let mut elsewhere = reserve_body("tok_bound", "1", "0.1");
    elsewhere["serviceId"] = json!("maps");
    let (status, refusal) = ledger.reserve(&elsewhere).await;
    assert_eq!((status, refusal["code"].as_str()), (403, Some("wrong_service")), "{refusal}");
}

async fn unsettled_holds_expire_and_cannot_commit_after(store: Backend) {
    let ledger =
        Ledger::start(store, &["--hold-ttl-seconds", "1", "--sweep-interval-seconds", "1"]).await;
    let hold = ledger.hold(&reserve_body("tok_ttl", "1", "0.5")).await;
    assert_eq!(ledger.token("tok_ttl").await.reserved_usdc, usdc("0.5"));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while ledger.token("tok_ttl").await.reserved_usdc != Usdc::ZERO {
        assert!(tokio::time::Instant::now() < deadline, "the hold was never released");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let charge = ledger.admin.charge(&hold.charge_id).await.unwrap();
    assert_eq!(charge.status, ChargeStatus::Released);
    assert_eq!(
        ledger.settle(&[(&hold.charge_id, "commit")]).await,
        [SettleStatus::AlreadyReleased]
    );
    assert_eq!(ledger.token("tok_ttl").await.used_usdc, Usdc::ZERO);
}

#[test]
fn refuses_to_start_without_keys_naming_the_setting() {
    let output = std::process::Command::new(ledger_binary())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env_remove("PAYSTILE_ADMIN_KEY")
        .env("PAYSTILE_GATEWAY_KEY", GATEWAY_KEY)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("admin_key: required"), "{stderr}");
}

async fn admin_cli_issues_shows_and_revokes(store: Backend) {
    let ledger = Ledger::start(store, &[]).await;
    let cli = |args: &[&str]| {
        let output = std::process::Command::new(ledger_binary())
            .args(args)
            .args(["--ledger-url", &ledger.process.url()])
            .env("PAYSTILE_ADMIN_KEY", ADMIN_KEY)
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice::<Value>(&output.stdout).unwrap()
    };
    let issued = cli(&[
        "token",
        "issue",
        "--service-id",
        "weather",
        "--limit-usdc",
        "0.5",
        "--buyer-id",
        "cli-agent",
    ]);
    let token_id = issued["tokenId"].as_str().unwrap();
    assert_eq!(issued["limitUsdc"], "0.500000");
    assert_eq!(cli(&["token", "show", token_id])["buyerId"], "cli-agent");
    assert_eq!(cli(&["token", "revoke", token_id])["revoked"], true);
    assert!(ledger.token(token_id).await.revoked);
}

const L402_SECRET: &str = "test-l402-secret-of-32-characters";

fn sandbox_args() -> [&'static str; 4] {
    ["--l402-secret", L402_SECRET, "--invoice-backend", "sandbox"]
}

fn challenge_request() -> Value {
    json!({"serviceId": "weather", "budgetUsdc": "0.05", "amountMsat": 50_000, "validSeconds": 600})
}

async fn sandbox_challenges_are_paid_by_the_sandbox_and_verify_inline(store: Backend) {
    let ledger = Ledger::start(store, &sandbox_args()).await;
    let body = challenge_request().to_string();
    for key in [None, Some(ADMIN_KEY)] {
        let (status, _) = ledger.post("/v1/l402/challenges", key, &body).await;
        assert_eq!(status, 401, "minting takes the gateway key");
    }
    let (status, answer) = ledger.post("/v1/l402/challenges", Some(GATEWAY_KEY), &body).await;
    assert_eq!(status, 200, "{answer}");
    let challenge: L402Challenge = serde_json::from_value(answer).unwrap();
    assert!(challenge.sandbox, "the sandbox says so in every answer");
    assert!(challenge.invoice.starts_with("lnbcrt500n1"), "{}", challenge.invoice);
    assert!(challenge.valid_until >= unix_now() + 599);

    let pay = json!({ "invoice": challenge.invoice }).to_string();
    let (status, _) = ledger.post("/v1/sandbox/payments", Some(GATEWAY_KEY), &pay).await;
    assert_eq!(status, 401, "paying takes the admin key");
    let (status, answer) = ledger.post("/v1/sandbox/payments", Some(ADMIN_KEY), &pay).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["sandbox"], true);
    let preimage = answer["preimage"].as_str().unwrap();
    let target = l402::Target {
        service_id: "weather",
        capability: None,
        now: unix_now(),
        accept_sandbox: true,
    };
    let grant =
        l402::verify(&challenge.macaroon, preimage, L402_SECRET.as_bytes(), &target).unwrap();
    assert_eq!(grant.identifier.ledger_token_id(), challenge.token_id);
    assert_eq!(hex::encode(grant.identifier.payment_hash), challenge.payment_hash);

    let (status, answer) = ledger
        .post("/v1/sandbox/payments", Some(ADMIN_KEY), &json!({"invoice": "lnbc1nope"}).to_string())
        .await;
    assert_eq!((status, answer["code"].as_str()), (400, Some("bad_request")), "{answer}");
}

async fn bad_challenge_requests_get_400_and_l402_is_off_without_its_settings(store: Backend) {
    let ledger = Ledger::start(store, &sandbox_args()).await;
    for (change, expected) in [
        (json!({"budgetUsdc": "0.0000001"}), "more than 6 decimals"),
        (json!({"budgetUsdc": "-1"}), "negative"),
        (json!({"amountMsat": 0}), "amountMsat"),
        (json!({"serviceId": "a=b"}), "serviceId"),
        (json!({"validSeconds": 0}), "validSeconds"),
        (json!({"colour": "red"}), "unknown field"),
    ] {
        let mut body = challenge_request();
        for (key, value) in change.as_object().unwrap() {
            body[key] = value.clone();
        }
        let (status, answer) =
            ledger.post("/v1/l402/challenges", Some(GATEWAY_KEY), &body.to_string()).await;
        assert_eq!(status, 400, "{body}: {answer}");
        let message = answer["error"].as_str().unwrap();
        assert!(message.contains(expected), "{body}: {message}");
    }

    let plain = Ledger::start(store, &[]).await;
    let (status, answer) = plain
        .post("/v1/l402/challenges", Some(GATEWAY_KEY), &challenge_request().to_string())
        .await;
    assert_eq!((status, answer["code"].as_str()), (404, Some("not_found")), "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("L402 is off"));
    let (status, _) = plain
        .post("/v1/sandbox/payments", Some(ADMIN_KEY), &json!({"invoice": "x"}).to_string())
        .await;
    assert_eq!(status, 404);
}

async fn a_credential_stated_cap_lowers_the_limit_for_its_calls_only(store: Backend) {
    let ledger = Ledger::start(store, &[]).await;
    let mut narrowed = reserve_body("l402_aa", "0.05", "0.02");
    narrowed["capUsdc"] = json!("0.03");
    ledger.hold(&narrowed).await;
    let (status, refusal) = ledger.reserve(&narrowed).await;
    assert_eq!((status, refusal["limit"].as_str()), (402, Some("0.030000")), "{refusal}");
    // The full credential still has the budget it paid for.
    let full = reserve_body("l402_aa", "0.05", "0.02");
    assert_eq!(ledger.hold(&full).await.remaining_usdc, usdc("0.01"));
    assert_eq!(ledger.token("l402_aa").await.limit_usdc, usdc("0.05"));
}

async fn an_l402_token_revoked_before_its_first_call_is_refused_at_it(store: Backend) {
    let ledger = Ledger::start(store, &[]).await;
    let unused = format!("l402_{}", "ab".repeat(32));
    let tombstone = ledger.admin.revoke_token(&unused).await.unwrap();
    assert!(tombstone.revoked);
    assert_eq!(tombstone.limit_usdc, Usdc::ZERO);
    let (status, refusal) = ledger.reserve(&reserve_body(&unused, "0.05", "0.001")).await;
    assert_eq!((status, refusal["code"].as_str()), (422, Some("token_revoked")), "{refusal}");
    // Other unknown ids are still unknown: a typo is not silently "revoked".
    for unknown in ["tok_nope", "l402_nothex", &format!("l402_{}", "AB".repeat(32))] {
        let error = ledger.admin.revoke_token(unknown).await.unwrap_err();
        assert!(matches!(error, ClientError::Refused { status: 404, .. }), "{unknown}: {error}");
    }
}

fn child_request(limit: &str) -> ChildTokenRequest {
    ChildTokenRequest {
        limit_usdc: usdc(limit),
        service_id: None,
        scope: None,
        buyer_tag: None,
        expires_at: None,
        ttl_seconds: None,
    }
}

fn is_status(error: ClientError, wanted: u16, code: ErrorCode) -> bool {
    matches!(error, ClientError::Refused { status, body } if status == wanted && body.code == code)
}

async fn buyer_balances_are_debited_exactly_and_deposits_count_once(store: Backend) {
    let ledger = Ledger::start(store, &[]).await;
    let first = ledger.deposit("buyer-1", "1.5", Some("wire-1")).await;
    assert_eq!((first.balance_usdc, first.replayed), (usdc("1.5"), false));
    let again = ledger.deposit("buyer-1", "1.5", Some("wire-1")).await;
    assert_eq!((again.deposit_id.as_str(), again.replayed), (first.deposit_id.as_str(), true));
    let other = ledger.deposit("buyer-1", "0.5", None).await;
    assert_eq!(other.balance_usdc, usdc("2"));
    let reused = DepositRequest { amount_usdc: usdc("9"), reference: Some("wire-1".into()) };
    let error = ledger.admin.deposit("buyer-1", &reused).await.unwrap_err();
    assert!(is_status(error, 422, ErrorCode::IdempotencyKeyMismatch));

    // 0.77 in flight leaves 1.23 available: a micro-USDC more is refused, with the figure.
    let in_flight = ledger.hold(&reserve_body("tok_b1", "100", "0.77")).await;
    let (status, refusal) = ledger.reserve(&reserve_body("tok_b1", "100", "1.230001")).await;
    assert_eq!((status, refusal["code"].as_str()), (402, Some("insufficient_balance")));
    assert_eq!(refusal["error"], "Insufficient balance: 1.230000 USDC available");
    let rest = ledger.hold(&reserve_body("tok_b2", "100", "1.23")).await;
    let account = ledger.account("buyer-1").await;
    assert_eq!((account.balance_usdc, account.held_usdc), (usdc("2"), usdc("2")));
    assert_eq!(account.available_usdc, Usdc::ZERO);

    let results =
        ledger.settle(&[(&in_flight.charge_id, "commit"), (&rest.charge_id, "release")]).await;
    assert_eq!(results, [SettleStatus::Committed, SettleStatus::Released]);
    let account = ledger.account("buyer-1").await;
    assert_eq!(
        (account.balance_usdc, account.held_usdc, account.spent_today_usdc),
        (usdc("1.23"), Usdc::ZERO, usdc("0.77"))
    );
    assert_eq!((account.tier, account.daily_limit_usdc), (1, usdc("10")));
    let view = ledger.admin.buyer("buyer-1").await.unwrap();
    let tokens: Vec<&str> = view.tokens.iter().map(|t| t.token_id.as_str()).collect();
    assert_eq!(tokens, ["tok_b1", "tok_b2"]);

    // A buyer without an account is bounded by its tokens' caps alone.
    let mut elsewhere = reserve_body("tok_anon", "100", "50");
    elsewhere["token"]["buyerId"] = json!("no-account");
    ledger.hold(&elsewhere).await;
    assert!(ledger.admin.buyer("no-account").await.unwrap().account.is_none());
}

async fn daily_limits_follow_the_tier_and_restart_at_utc_midnight(store: Backend) {
    let now = i64::try_from(unix_now()).unwrap();
    let midnight = (now / 86_400 + 1) * 86_400;
    let before = (midnight - 60 - now).to_string();
    let after = (midnight + 60 - now).to_string();
    let settings = |offset: &str| {
        ["--daily-limits-usdc", "1,3", "--hold-ttl-seconds", "3600", "--clock-offset-seconds"]
            .into_iter()
            .map(str::to_owned)
            .chain([offset.to_owned()])
            .collect::<Vec<_>>()
    };
    let args = settings(&before);
    let mut ledger =
        Ledger::start(store, &args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    ledger.deposit("buyer-1", "100", None).await;
    let spent = ledger.hold(&reserve_body("tok_day", "100", "0.6")).await;
    ledger.settle(&[(&spent.charge_id, "commit")]).await;
    let in_flight = ledger.hold(&reserve_body("tok_day", "100", "0.3")).await;
    ledger.hold(&reserve_body("tok_day", "100", "0.1")).await;
    // Tier 1: 1 USDC a day, reached by 0.6 spent and 0.4 held.
    let (status, refusal) = ledger.reserve(&reserve_body("tok_day", "100", "0.000001")).await;
    assert_eq!(
        (status, refusal["code"].as_str()),
        (402, Some("daily_limit_exceeded")),
        "{refusal}"
    );
    let upgraded = ledger.admin.set_tier("buyer-1", 2).await.unwrap().account.unwrap();
    assert_eq!((upgraded.daily_limit_usdc, upgraded.remaining_today_usdc), (usdc("3"), usdc("2")));
    ledger.hold(&reserve_body("tok_day", "100", "2")).await;
    let (status, _) = ledger.reserve(&reserve_body("tok_day", "100", "0.000001")).await;
    assert_eq!(status, 402);
    ledger.admin.set_tier("buyer-1", 1).await.unwrap();

    // Past UTC midnight: nothing spent today, but the 2.4 still held counts.
    let args = settings(&after);
    ledger.restart_with(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let account = ledger.account("buyer-1").await;
    assert_eq!((account.spent_today_usdc, account.held_usdc), (Usdc::ZERO, usdc("2.4")));
    let (status, _) = ledger.reserve(&reserve_body("tok_day", "100", "0.000001")).await;
    assert_eq!(status, 402, "holds count against the new day");
    ledger.admin.set_tier("buyer-1", 2).await.unwrap();
    ledger.hold(&reserve_body("tok_day", "100", "0.6")).await;
    let (status, _) = ledger.reserve(&reserve_body("tok_day", "100", "0.000001")).await;
    assert_eq!(status, 402, "2.4 held + 0.6 = 3");
    // A commit counts on the day it happens.
    ledger.settle(&[(&in_flight.charge_id, "commit")]).await;
    let account = ledger.account("buyer-1").await;
    assert_eq!((account.spent_today_usdc, account.held_usdc), (usdc("0.3"), usdc("2.7")));
    assert_eq!(account.balance_usdc, usdc("99.1"));
}

async fn the_panic_button_revokes_every_token_and_voids_holds_in_flight(store: Backend) {
    let ledger = Arc::new(Ledger::start(store, &[]).await);
    ledger.deposit("agent-7", "10", None).await;
    let mut tokens = Vec::new();
    for _ in 0..3 {
        tokens.push(ledger.admin.issue_token(&issue_request("1")).await.unwrap().token_id);
    }
    tokens.push(ledger.child(&tokens[0], "0.5").await.token_id);
    let mut bystander = issue_request("1");
    bystander.buyer_id = "agent-8".into();
    let bystander = ledger.admin.issue_token(&bystander).await.unwrap().token_id;

    // Callers keep reserving on every token while the button is pressed.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let callers: Vec<_> = tokens
        .iter()
        .map(|token| {
            let (ledger, stop, body) =
                (ledger.clone(), stop.clone(), reserve_body(token, "1", "0.01"));
            tokio::spawn(async move {
                let mut held = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match ledger.reserve(&body).await {
                        (200, hold) => held.push(hold["chargeId"].as_str().unwrap().to_owned()),
                        (422, refusal) => {
                            assert_eq!(refusal["code"], "token_revoked");
                            break;
                        }
                        other => panic!("unexpected answer {other:?}"),
                    }
                }
                held
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let revocation = ledger.admin.revoke_buyer("agent-7").await.unwrap();
    assert_eq!(revocation.revoked_tokens, 4);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut held = Vec::new();
    for caller in callers {
        held.extend(caller.await.unwrap());
    }
    assert!(!held.is_empty(), "no call was in flight");
    // Every hold made before the button is released, never committed.
    let settlements: Vec<(&str, &str)> = held.iter().map(|id| (id.as_str(), "commit")).collect();
    let results = ledger.settle(&settlements).await;
    assert!(results.iter().all(|r| *r == SettleStatus::Revoked), "{results:?}");
    for token in &tokens {
        let view = ledger.token(token).await;
        assert!(view.revoked, "{token}");
        assert_eq!((view.used_usdc, view.reserved_usdc), (Usdc::ZERO, Usdc::ZERO));
    }
    let account = ledger.account("agent-7").await;
    assert_eq!((account.balance_usdc, account.held_usdc), (usdc("10"), Usdc::ZERO));
    assert!(!ledger.token(&bystander).await.revoked, "another buyer's token was revoked");
    assert_eq!(ledger.admin.revoke_buyer("agent-7").await.unwrap().revoked_tokens, 0);
    let error = ledger.admin.revoke_buyer("nobody").await.unwrap_err();
    assert!(is_status(error, 404, ErrorCode::NotFound));
}

async fn a_three_level_chain_is_counted_at_every_level_under_concurrency(store: Backend) {
    let ledger = Arc::new(Ledger::start(store, &[]).await);
    ledger.deposit("agent-7", "100", None).await;
    let root = ledger.admin.issue_token(&issue_request("1")).await.unwrap().token_id;
    let child = ledger.child(&root, "0.6").await.token_id;
    let grandchild = ledger.child(&child, "0.6").await.token_id;
    assert_eq!(ledger.token(&grandchild).await.parent_id.as_deref(), Some(child.as_str()));

    // 40 calls of 0.05 at each level race: the root's 1 USDC fits 20 of them in all.
    let calls: Vec<_> = [&root, &child, &grandchild]
        .into_iter()
        .flat_map(|token| std::iter::repeat_n(token.clone(), 40))
        .map(|token| {
            let ledger = ledger.clone();
            tokio::spawn(async move {
                match ledger.reserve(&reserve_body(&token, "1", "0.05")).await {
                    (200, hold) => Some((token, hold["chargeId"].as_str().unwrap().to_owned())),
                    (402, refusal) => {
                        assert_eq!(refusal["code"], "token_limit_exceeded");
                        None
                    }
                    other => panic!("unexpected answer {other:?}"),
                }
            })
        })
        .collect();
    let mut held = Vec::new();
    for call in calls {
        held.extend(call.await.unwrap());
    }
    assert_eq!(held.len(), 20);
    let count = |token: &String| held.iter().filter(|(t, _)| t == token).count() as u64;
    let settlements: Vec<(&str, &str)> =
        held.iter().map(|(_, id)| (id.as_str(), "commit")).collect();
    ledger.settle(&settlements).await;
    let price = usdc("0.05");
    let (root_view, child_view, grandchild_view) =
        (ledger.token(&root).await, ledger.token(&child).await, ledger.token(&grandchild).await);
    assert_eq!(root_view.used_usdc, usdc("1"));
    assert_eq!(
        child_view.used_usdc,
        price.checked_mul(count(&child) + count(&grandchild)).unwrap()
    );
    assert_eq!(grandchild_view.used_usdc, price.checked_mul(count(&grandchild)).unwrap());
    assert!(child_view.used_usdc <= usdc("0.6") && grandchild_view.used_usdc <= usdc("0.6"));
    for view in [&root_view, &child_view, &grandchild_view] {
        assert_eq!(view.reserved_usdc, Usdc::ZERO);
    }
    // The buyer pays once per call, whatever the depth.
    let account = ledger.account("agent-7").await;
    assert_eq!((account.balance_usdc, account.spent_today_usdc), (usdc("99"), usdc("1")));

    // Revoking the child revokes the grandchild, not the root.
    ledger.admin.revoke_token(&child).await.unwrap();
    assert!(ledger.token(&grandchild).await.revoked);
    assert!(!ledger.token(&root).await.revoked);
    let error = ledger.admin.mint_child(&child, &child_request("0.01")).await.unwrap_err();
    assert!(is_status(error, 422, ErrorCode::TokenRevoked));

    // Chains hold at most 8 tokens.
    let mut parent = ledger.admin.issue_token(&issue_request("1")).await.unwrap().token_id;
    for _ in 1..8 {
        parent = ledger.child(&parent, "0.1").await.token_id;
    }
    let error = ledger.admin.mint_child(&parent, &child_request("0.1")).await.unwrap_err();
    assert!(
        matches!(&error, ClientError::Refused { status: 400, body } if body.error.contains("at most 8")),
        "{error}"
    );
}

async fn sandbox_tokens_charge_the_sandbox_book_only(store: Backend) {
    let ledger = Ledger::start(store, &[]).await;
    ledger.deposit("agent-7", "1", None).await;
    let request = IssueTokenRequest { sandbox: true, ..issue_request("50") };
    let issued = ledger.admin.issue_token(&request).await.unwrap();
    let claims = pay_token::verify(
        &issued.jwt,
        &[Key::hs256(TOKEN_SECRET)],
        &Validation::default(),
        unix_now(),
    )
    .unwrap();
    assert!(claims.sandbox, "the token says it is a sandbox token");
    // Past the balance and the daily limit: the sandbox book knows neither.
    let hold = ledger.hold(&reserve_body(&issued.token_id, "50", "20")).await;
    assert_eq!(ledger.settle(&[(&hold.charge_id, "commit")]).await, [SettleStatus::Committed]);
    let view = ledger.token(&issued.token_id).await;
    assert!(view.sandbox);
    assert_eq!(view.used_usdc, usdc("20"));
    assert!(ledger.admin.charge(&hold.charge_id).await.unwrap().sandbox);
    // Its children are sandbox tokens too.
    let child = ledger.child(&issued.token_id, "1").await;
    assert!(ledger.token(&child.token_id).await.sandbox);
    // A sandbox credential first seen at a reserve (an L402 bought in the sandbox).
    let mut l402 = reserve_body(&format!("l402_{}", "cd".repeat(32)), "5", "3");
    l402["token"]["buyerId"] = json!("agent-7");
    l402["token"]["sandbox"] = json!(true);
    ledger.hold(&l402).await;
    let account = ledger.account("agent-7").await;
    assert_eq!(
        (account.balance_usdc, account.held_usdc, account.spent_today_usdc),
        (usdc("1"), Usdc::ZERO, Usdc::ZERO)
    );
    // Real tokens of the buyer still pay from the balance.
    let real = ledger.admin.issue_token(&issue_request("50")).await.unwrap();
    assert!(!ledger.token(&real.token_id).await.sandbox);
    let (status, refusal) = ledger.reserve(&reserve_body(&real.token_id, "50", "2")).await;
    assert_eq!((status, refusal["code"].as_str()), (402, Some("insufficient_balance")));
}

async fn bad_buyer_and_child_requests_get_400_or_404_and_change_nothing(store: Backend) {
    let ledger = Ledger::start(store, &[]).await;
    ledger.deposit("agent-7", "1", Some("r")).await;
    let parent = ledger.admin.issue_token(&issue_request("1")).await.unwrap().token_id;
    let before = (ledger.admin.buyer("agent-7").await.unwrap(), ledger.token(&parent).await);

    let l402_buyer = format!("/v1/buyers/l402_{}/deposits", "ab".repeat(32));
    let cases = [
        ("/v1/buyers/agent-7/deposits", r#"{"amountUsdc":"0"}"#, "greater than 0"),
        ("/v1/buyers/agent-7/deposits", r#"{"amountUsdc":"-1"}"#, "negative"),
        ("/v1/buyers/agent-7/deposits", r#"{"amountUsdc":"0.0000001"}"#, "more than 6 decimals"),
        ("/v1/buyers/agent-7/deposits", r#"{"amountUsdc":"99999999999999999999"}"#, "too large"),
        ("/v1/buyers/agent-7/deposits", r#"{"amountUsdc":"1","colour":"red"}"#, "unknown field"),
        ("/v1/buyers/agent-7/deposits", r#"{"amountUsdc":"1","reference":""}"#, "reference"),
        ("/v1/buyers/agent-7/deposits", "{not json", "JSON"),
        (&l402_buyer, r#"{"amountUsdc":"1"}"#, "prepaid by Lightning"),
        ("/v1/buyers/agent-7/deposits", &format!(r#"{{"amountUsdc":"{}"}}"#, Usdc::MAX), "largest"),
    ];
    for (path, body, message) in cases {
        let (status, answer) = ledger.post(path, Some(ADMIN_KEY), body).await;
        assert_eq!(
            (status, answer["code"].as_str()),
            (400, Some("bad_request")),
            "{body}: {answer}"
        );
        assert!(answer["error"].as_str().unwrap().contains(message), "{body}: {answer}");
    }
    for body in [r#"{"tier":0}"#, r#"{"tier":4}"#, r#"{"tier":"2"}"#, r#"{}"#] {
        let (status, answer) = ledger.put("/v1/buyers/agent-7/tier", body).await;
        assert_eq!(status, 400, "{body}: {answer}");
    }
    let children = format!("/v1/tokens/{parent}/children");
    for (body, message) in [
        (r#"{"limitUsdc":"1.000001"}"#, "remaining 1.000000"),
        (r#"{"limitUsdc":"0"}"#, "greater than 0"),
        (r#"{"limitUsdc":"0.5","scope":"ALL"}"#, "own service"),
        (r#"{"limitUsdc":"0.5","ttlSeconds":999999}"#, "outlive"),
        (r#"{"limitUsdc":"0.5","buyerId":"x"}"#, "unknown field"),
    ] {
        let (status, answer) = ledger.post(&children, Some(ADMIN_KEY), body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(answer["error"].as_str().unwrap().contains(message), "{body}: {answer}");
    }
    let after = (ledger.admin.buyer("agent-7").await.unwrap(), ledger.token(&parent).await);
    assert_eq!(after, before, "a refused request changed something");

    for unknown in ["nobody", "no%00body"] {
        let error = ledger.admin.buyer(unknown).await.unwrap_err();
        assert!(is_status(error, 404, ErrorCode::NotFound), "{unknown}");
        let error = ledger.admin.revoke_buyer(unknown).await.unwrap_err();
        assert!(is_status(error, 404, ErrorCode::NotFound), "{unknown}");
    }
    let error = ledger.admin.mint_child("tok_missing", &child_request("0.1")).await.unwrap_err();
    assert!(is_status(error, 404, ErrorCode::NotFound));
}

async fn admin_cli_manages_buyers_and_child_tokens(store: Backend) {
    let ledger = Ledger::start(store, &[]).await;
    let cli = |args: &[&str]| {
        let output = std::process::Command::new(ledger_binary())
            .args(args)
            .args(["--ledger-url", &ledger.process.url()])
            .env("PAYSTILE_ADMIN_KEY", ADMIN_KEY)
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice::<Value>(&output.stdout).unwrap()
    };
    let deposit =
        cli(&["buyer", "deposit", "cli-agent", "--amount-usdc", "12.5", "--reference", "w1"]);
    assert_eq!(deposit["balanceUsdc"], "12.500000");
    assert_eq!(
        cli(&["buyer", "set-tier", "cli-agent", "3"])["account"]["dailyLimitUsdc"],
        "50000.000000"
    );
    let parent = cli(&[
        "token",
        "issue",
        "--service-id",
        "weather",
        "--limit-usdc",
        "2",
        "--buyer-id",
        "cli-agent",
    ]);
    let parent_id = parent["tokenId"].as_str().unwrap();
    let child = cli(&["token", "child", parent_id, "--limit-usdc", "0.5", "--ttl-seconds", "60"]);
    assert_eq!(child["limitUsdc"], "0.500000");
    let shown = cli(&["buyer", "show", "cli-agent"]);
    assert_eq!(shown["account"]["balanceUsdc"], "12.500000");
    assert_eq!(shown["tokens"][1]["parentId"], parent_id);
    assert_eq!(cli(&["buyer", "revoke", "cli-agent"])["revokedTokens"], 2);
    assert!(ledger.token(child["tokenId"].as_str().unwrap()).await.revoked);
}

async fn a_refused_reserve_stays_refused_for_its_key(store: Backend) {
    let ledger = Ledger::start(store, &[]).await;
    let blocking = ledger.hold(&reserve_body("tok_refused", "0.1", "0.1")).await;
    let keyed = with_key(reserve_body("tok_refused", "0.1", "0.05"), "order-9", 'a');
    let (status, first) = ledger.reserve(&keyed).await;
    assert_eq!((status, first["code"].as_str()), (402, Some("token_limit_exceeded")), "{first}");

    // The budget is free again, but the key keeps its answer: the same status and body.
    ledger.settle(&[(&blocking.charge_id, "release")]).await;
    assert_eq!(ledger.reserve(&keyed).await, (402, first.clone()));
    assert_eq!(ledger.reserve(&keyed).await, (402, first), "a second retry differs");
    let (status, other) =
        ledger.reserve(&with_key(reserve_body("tok_refused", "0.1", "0.05"), "order-9", 'b')).await;
    assert_eq!((status, other["code"].as_str()), (422, Some("idempotency_key_mismatch")));
    // Nothing was held for the refused key; a new key pays.
    let token = ledger.token("tok_refused").await;
    assert_eq!((token.used_usdc, token.reserved_usdc), (Usdc::ZERO, Usdc::ZERO));
    let fresh = with_key(reserve_body("tok_refused", "0.1", "0.05"), "order-10", 'a');
    assert!(!ledger.hold(&fresh).await.replayed);

    // A key that was charged keeps its charge, even once the token is revoked.
    let paid = with_key(reserve_body("tok_keeps", "1", "0.1"), "k", 'a');
    let charge = ledger.hold(&paid).await;
    ledger.settle(&[(&charge.charge_id, "commit")]).await;
    ledger.admin.revoke_token("tok_keeps").await.unwrap();
    let (status, refusal) = ledger.reserve(&paid).await;
    assert_eq!((status, refusal["code"].as_str()), (422, Some("token_revoked")), "{refusal}");
    let view = ledger.admin.charge(&charge.charge_id).await.unwrap();
    assert_eq!(
        (view.status, view.idempotency_key.as_deref()),
        (ChargeStatus::Committed, Some("k"))
    );
}

async fn partial_commits_charge_the_amount_and_release_the_rest(store: Backend) {
    let ledger = Ledger::start(store, &[]).await;
    let keyed = with_key(reserve_body("tok_metered", "1", "0.5"), "call-1", 'a');
    let hold = ledger.hold(&keyed).await;
    assert_eq!(ledger.token("tok_metered").await.remaining_usdc, usdc("0.5"));
    let (status, answer) = ledger
        .settle_raw(
            json!([{"chargeId": hold.charge_id, "outcome": "commit", "amountUsdc": "0.123457"}]),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["results"][0]["status"], "committed");
    let token = ledger.token("tok_metered").await;
    assert_eq!(
        (token.used_usdc, token.reserved_usdc, token.remaining_usdc),
        (usdc("0.123457"), Usdc::ZERO, usdc("0.876543"))
    );
    let charge = ledger.admin.charge(&hold.charge_id).await.unwrap();
    assert_eq!(
        (charge.status, charge.amount_usdc, charge.held_usdc),
        (ChargeStatus::Committed, usdc("0.123457"), usdc("0.5"))
    );
    // Once only: a second commit, with or without an amount, changes nothing.
    let (status, answer) = ledger
        .settle_raw(json!([{"chargeId": hold.charge_id, "outcome": "commit", "amountUsdc": "0.2"}]))
        .await;
    assert_eq!((status, answer["results"][0]["status"].as_str()), (200, Some("already_committed")));
    assert_eq!(ledger.token("tok_metered").await.used_usdc, usdc("0.123457"));
    // A retry replays the charge with what it committed.
    let replay = ledger.hold(&keyed).await;
    assert_eq!((replay.replayed, replay.amount_usdc), (true, usdc("0.123457")));

    // The whole hold is the full amount: the same as no amount.
    let full = ledger.hold(&reserve_body("tok_metered", "1", "0.5")).await;
    let (status, _) = ledger
        .settle_raw(json!([{"chargeId": full.charge_id, "outcome": "commit", "amountUsdc": "0.5"}]))
        .await;
    assert_eq!(status, 200);
    assert_eq!(ledger.token("tok_metered").await.used_usdc, usdc("0.623457"));
}

async fn settle_amounts_that_do_not_fit_get_400_and_change_nothing(store: Backend) {
    let ledger = Ledger::start(store, &[]).await;
    let body = reserve_body("tok_fit", "1", "0.25");
    let (first, second) = (ledger.hold(&body).await, ledger.hold(&body).await);
    let before = ledger.token("tok_fit").await;
    let ok = json!({"chargeId": first.charge_id, "outcome": "commit"});
    let with = |outcome: &str, amount: Value| json!({"chargeId": second.charge_id, "outcome": outcome, "amountUsdc": amount});
    for (bad, message) in [
        (
            with("commit", json!("0.250001")),
            "settlements[1]: amountUsdc 0.250001 is more than the 0.250000 held",
        ),
        (with("commit", json!("0.0000001")), "more than 6 decimals"),
        (with("commit", json!("-0.1")), "negative"),
        (with("commit", json!(0.1)), "decimal strings"),
        (with("commit", json!("0")), "settlements[1]: amountUsdc must be greater than 0"),
        (with("release", json!("0.1")), "settlements[1]: amountUsdc is for commits only"),
    ] {
        let (status, answer) = ledger.settle_raw(json!([ok, bad])).await;
        assert_eq!(
            (status, answer["code"].as_str()),
            (400, Some("bad_request")),
            "{bad}: {answer}"
        );
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains(message), "{bad}: {error}");
    }
    // Neither hold was settled, the valid one included.
    assert_eq!(ledger.token("tok_fit").await, before);
    for hold in [&first, &second] {
        assert_eq!(ledger.admin.charge(&hold.charge_id).await.unwrap().status, ChargeStatus::Held);
    }
}

async fn holds_past_their_ttl_are_released_on_read(store: Backend) {
    // No sweep within the test: only reads release what has expired.
    let ledger =
        Ledger::start(store, &["--hold-ttl-seconds", "1", "--sweep-interval-seconds", "3600"])
            .await;
    let viewed = ledger.hold(&reserve_body("tok_view", "1", "0.4")).await;
    let charged = ledger.hold(&reserve_body("tok_charge", "1", "0.4")).await;
    let keyed = with_key(reserve_body("tok_reserve", "1", "0.6"), "k", 'a');
    let stale = ledger.hold(&keyed).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let token = ledger.token("tok_view").await;
    assert_eq!((token.reserved_usdc, token.remaining_usdc), (Usdc::ZERO, usdc("1")));
    assert_eq!(
        ledger.admin.charge(&viewed.charge_id).await.unwrap().status,
        ChargeStatus::Released
    );

    let charge = ledger.admin.charge(&charged.charge_id).await.unwrap();
    assert_eq!((charge.status, charge.amount_usdc), (ChargeStatus::Released, Usdc::ZERO));
    assert_eq!(ledger.token("tok_charge").await.reserved_usdc, Usdc::ZERO);

    // A reserve does not count the stale hold, nor see its key in flight: the retry is held anew.
    let retry = ledger.hold(&keyed).await;
    assert!(!retry.replayed && retry.charge_id != stale.charge_id);
    assert_eq!(retry.remaining_usdc, usdc("0.4"));
    assert_eq!(
        ledger.settle(&[(&stale.charge_id, "commit")]).await,
        [SettleStatus::AlreadyReleased]
    );
    assert_eq!(ledger.settle(&[(&retry.charge_id, "commit")]).await, [SettleStatus::Committed]);
    let token = ledger.token("tok_reserve").await;
    assert_eq!((token.used_usdc, token.reserved_usdc), (usdc("0.6"), Usdc::ZERO));
}

async fn idempotency_keys_are_forgotten_after_their_retention_once_settled(store: Backend) {
    // Replays enough for the polling below.
    let ledger =
        Ledger::start(store, &["--sweep-interval-seconds", "1", "--max-replays", "1000"]).await;
    let settled = with_key(reserve_body("tok_retain", "1", "0.1"), "settled", 'a');
    let in_flight = with_key(reserve_body("tok_retain", "1", "0.1"), "in-flight", 'a');
    let recent = with_key(reserve_body("tok_retain", "1", "0.1"), "recent", 'a');
    let first = ledger.hold(&settled).await;
    ledger.settle(&[(&first.charge_id, "commit")]).await;
    ledger.hold(&in_flight).await;
    // A day and a second ago, as far as the keys can tell; then one fresh key.
    ledger.age_idempotency_keys(Duration::from_secs(86_401)).await;
    let fresh = ledger.hold(&recent).await;
    ledger.settle(&[(&fresh.charge_id, "commit")]).await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let again = loop {
        let hold = ledger.hold(&settled).await;
        if !hold.replayed {
            break hold;
        }
        assert!(tokio::time::Instant::now() < deadline, "the settled key was never forgotten");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Forgotten: the same key is a new call now.
    assert_ne!(again.charge_id, first.charge_id);
    // Still in flight: kept however old.
    let (status, busy) = ledger.reserve(&in_flight).await;
    assert_eq!((status, busy["code"].as_str()), (409, Some("idempotency_key_in_use")), "{busy}");
    // Within its retention: replayed.
    assert!(ledger.hold(&recent).await.replayed);
}

#[test]
fn refuses_an_idempotency_retention_under_a_day() {
    let output = std::process::Command::new(ledger_binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--idempotency-retention-seconds", "3600"])
        .envs(envs())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("idempotency_retention_seconds: must be at least 86400"), "{stderr}");
}

async fn a_partial_commit_debits_the_balance_and_every_level_of_a_chain_by_the_amount(
    store: Backend,
) {
    let ledger = Ledger::start(store, &[]).await;
    ledger.deposit("agent-7", "5", None).await;
    let root = ledger.admin.issue_token(&issue_request("2")).await.unwrap().token_id;
    let child = ledger.child(&root, "1").await.token_id;
    let grandchild = ledger.child(&child, "0.8").await.token_id;
    let levels = [&grandchild, &child, &root];

    let hold = ledger.hold(&reserve_body(&grandchild, "0.8", "0.5")).await;
    for level in levels {
        assert_eq!(ledger.token(level).await.reserved_usdc, usdc("0.5"), "{level}");
    }
    assert_eq!(ledger.account("agent-7").await.held_usdc, usdc("0.5"));

    let (status, answer) = ledger
        .settle_raw(
            json!([{"chargeId": hold.charge_id, "outcome": "commit", "amountUsdc": "0.123457"}]),
        )
        .await;
    assert_eq!((status, answer["results"][0]["status"].as_str()), (200, Some("committed")));
    // Every level and the account are debited the committed amount; the rest is released.
    for level in levels {
        let view = ledger.token(level).await;
        assert_eq!((view.used_usdc, view.reserved_usdc), (usdc("0.123457"), Usdc::ZERO), "{level}");
    }
    assert_eq!(ledger.token(&grandchild).await.remaining_usdc, usdc("0.676543"));
    let account = ledger.account("agent-7").await;
    assert_eq!(
        (account.balance_usdc, account.held_usdc, account.spent_today_usdc),
        (usdc("4.876543"), Usdc::ZERO, usdc("0.123457"))
    );
    assert_eq!(account.available_usdc, usdc("4.876543"));
    let charge = ledger.admin.charge(&hold.charge_id).await.unwrap();
    assert_eq!(
        (charge.status, charge.amount_usdc, charge.held_usdc),
        (ChargeStatus::Committed, usdc("0.123457"), usdc("0.5"))
    );

    // A full commit on the child, then a release: the books add up at every level.
    let full = ledger.hold(&reserve_body(&child, "1", "0.3")).await;
    let released = ledger.hold(&reserve_body(&grandchild, "0.8", "0.2")).await;
    let results =
        ledger.settle(&[(&full.charge_id, "commit"), (&released.charge_id, "release")]).await;
    assert_eq!(results, [SettleStatus::Committed, SettleStatus::Released]);
    let used = |view: TokenView| (view.used_usdc, view.reserved_usdc);
    assert_eq!(used(ledger.token(&grandchild).await), (usdc("0.123457"), Usdc::ZERO));
    assert_eq!(used(ledger.token(&child).await), (usdc("0.423457"), Usdc::ZERO));
    assert_eq!(used(ledger.token(&root).await), (usdc("0.423457"), Usdc::ZERO));
    let account = ledger.account("agent-7").await;
    assert_eq!(
        (account.balance_usdc, account.held_usdc, account.spent_today_usdc),
        (usdc("4.576543"), Usdc::ZERO, usdc("0.423457"))
    );
}

async fn expired_holds_are_released_on_read_at_every_level_and_on_the_account(store: Backend) {
    // No sweep within the test: only reads (and reserves) release what has expired.
    let ledger =
        Ledger::start(store, &["--hold-ttl-seconds", "1", "--sweep-interval-seconds", "3600"])
            .await;
    ledger.deposit("agent-7", "1", None).await;
    let root = ledger.admin.issue_token(&issue_request("2")).await.unwrap().token_id;
    let child = ledger.child(&root, "1").await.token_id;
    let sibling = ledger.admin.issue_token(&issue_request("2")).await.unwrap().token_id;
    let stale = ledger.hold(&reserve_body(&child, "1", "0.8")).await;
    let (status, refusal) = ledger.reserve(&reserve_body(&sibling, "2", "0.9")).await;
    assert_eq!((status, refusal["code"].as_str()), (402, Some("insufficient_balance")));
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // A reserve on another of the buyer's tokens no longer counts the expired hold against
    // the balance.
    let fresh = ledger.hold(&reserve_body(&sibling, "2", "0.9")).await;
    assert_eq!(ledger.account("agent-7").await.held_usdc, usdc("0.9"));
    // Released at every level of the child's chain, the root's included.
    for level in [&root, &child] {
        let view = ledger.token(level).await;
        assert_eq!((view.used_usdc, view.reserved_usdc), (Usdc::ZERO, Usdc::ZERO), "{level}");
    }
    assert_eq!(
        ledger.settle(&[(&stale.charge_id, "commit")]).await,
        [SettleStatus::AlreadyReleased]
    );

    // Reading the buyer releases its holds too.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let account = ledger.account("agent-7").await;
    assert_eq!((account.balance_usdc, account.held_usdc), (usdc("1"), Usdc::ZERO));
    assert_eq!(ledger.admin.charge(&fresh.charge_id).await.unwrap().status, ChargeStatus::Released);
    // A parent read releases a child's expired hold.
    let late = ledger.hold(&reserve_body(&child, "1", "0.5")).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(ledger.token(&root).await.reserved_usdc, Usdc::ZERO);
    assert_eq!(ledger.token(&child).await.reserved_usdc, Usdc::ZERO);
    assert_eq!(ledger.account("agent-7").await.held_usdc, Usdc::ZERO);
    assert_eq!(ledger.admin.charge(&late.charge_id).await.unwrap().status, ChargeStatus::Released);
}

/// The account's refusals are about the request: its key keeps them, as it keeps a token's.
async fn buyer_refusals_stay_refused_for_their_key(store: Backend) {
    let ledger = Ledger::start(store, &["--daily-limits-usdc", "1,3"]).await;
    ledger.deposit("agent-7", "0.1", None).await;
    let token = ledger.admin.issue_token(&issue_request("50")).await.unwrap().token_id;
    let poor = with_key(reserve_body(&token, "50", "0.2"), "poor", 'a');
    let (status, first) = ledger.reserve(&poor).await;
    assert_eq!((status, first["code"].as_str()), (402, Some("insufficient_balance")), "{first}");
    ledger.deposit("agent-7", "10", None).await;
    assert_eq!(ledger.reserve(&poor).await, (402, first), "a deposit changed the key's answer");

    let over = with_key(reserve_body(&token, "50", "1.5"), "over", 'a');
    let (status, first) = ledger.reserve(&over).await;
    assert_eq!((status, first["code"].as_str()), (402, Some("daily_limit_exceeded")), "{first}");
    ledger.admin.set_tier("agent-7", 2).await.unwrap();
    assert_eq!(ledger.reserve(&over).await, (402, first), "a new tier changed the key's answer");
    // Another request under the key is still a mismatch; a new key pays.
    let (status, other) =
        ledger.reserve(&with_key(reserve_body(&token, "50", "1"), "over", 'b')).await;
    assert_eq!((status, other["code"].as_str()), (422, Some("idempotency_key_mismatch")));
    let paid = ledger.hold(&with_key(reserve_body(&token, "50", "1.5"), "new", 'a')).await;
    assert!(!paid.replayed);
    let account = ledger.account("agent-7").await;
    assert_eq!((account.balance_usdc, account.held_usdc), (usdc("10.1"), usdc("1.5")));
}
