//! The ledger's HTTP API, tested against the real `paystile-ledger` binary: the conformance
//! suite. Every test that starts a ledger runs twice, on each store (`sqlite::…` and
//! `postgres::…`); a test on PostgreSQL gets a database of its own, dropped when it ends.
//! PostgreSQL must be reachable (see [`postgres_admin_url`]): its tests fail, never skip,
//! without it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use paystile_ledger::child::LedgerProcess;
use paystile_ledger::client::{AdminClient, BuyerClient, ClientError};
use paystile_ledger::token_keys;
use paystile_protocol::jws::{self, Key, SigningKey};
use paystile_protocol::l402;
use paystile_protocol::ledger_api::{
    AccountView, BuyerKeyRequest, BuyerTokenRequest, ChargeOrder, ChargeQuery, ChargeStatus,
    ChildTokenRequest, Deposit, DepositRequest, Hold, IssueTokenRequest, IssuedBuyerKey,
    IssuedToken, L402Challenge, L402Challenges, Role, SeriesBucket, ServiceSeries, SettleResponse,
    SettleStatus, TokenView, TopSpenders,
};
use paystile_protocol::pay_token::{self, Scope, Validation};
use paystile_protocol::{ErrorBody, ErrorCode, Usdc};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
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
    the_admin_cli_reaches_ids_holding_url_characters,
    sandbox_challenges_are_paid_by_the_sandbox_and_verify_inline,
    bad_challenge_requests_get_400_and_l402_is_off_without_its_settings,
    a_credential_stated_cap_lowers_the_limit_for_its_calls_only,
    an_l402_token_revoked_before_its_first_call_is_refused_at_it,
    a_gateway_key_alone_spends_nobody_s_money,
    eddsa_keys_sign_are_published_and_rotate_by_kid,
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
    a_settlement_that_does_not_fit_is_refused_alone,
    holds_past_their_ttl_are_released_on_read,
    idempotency_keys_are_forgotten_after_their_retention_once_settled,
    a_partial_commit_debits_the_balance_and_every_level_of_a_chain_by_the_amount,
    expired_holds_are_released_on_read_at_every_level_and_on_the_account,
    buyer_refusals_stay_refused_for_their_key,
    buyer_keys_reach_their_own_buyer_only,
    buyers_issue_tokens_within_their_balance_tier_and_key,
    series_and_top_spenders_add_up_to_the_journal,
    the_service_list_is_looked_up_at_most_once_a_minute,
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
        // Connections kept alive to the dead process would fail their next request.
        self.admin = AdminClient::new(&self.process.url(), ADMIN_KEY);
        self.http = reqwest::Client::new();
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
        self.post("/v1/holds", Some(GATEWAY_KEY), &presented(body).to_string()).await
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

/// `body` as a gateway sends it: a body that describes its token as a `token` grant gets, in
/// its place, the credential that proves it: a Pay Token with those claims, signed with the
/// ledger's HS256 key (written as given, so that a test can make any claim).
fn presented(body: &Value) -> Value {
    let Some(token) = body.get("token") else { return body.clone() };
    let mut claims = json!({
        "sub": token["buyerId"], "jti": token["tokenId"], "limitUsdc": token["limitUsdc"],
        "exp": token["expiresAt"], "scope": token.get("scope").unwrap_or(&json!("SINGLE")),
    });
    for (member, claim) in
        [("serviceId", "serviceId"), ("buyerTag", "buyerTag"), ("sandbox", "sandbox")]
    {
        if let Some(value) = token.get(member) {
            claims[claim] = value.clone();
        }
    }
    let jwt = jws::sign(claims.to_string().as_bytes(), &SigningKey::hs256(TOKEN_SECRET));
    let mut body = body.clone();
    if let Some(body) = body.as_object_mut() {
        body.remove("token");
        body.insert("credential".into(), json!(format!("Bearer {jwt}")));
    }
    body
}

/// The `Authorization` value of a paid L402 for the 32-byte token id `id` (its ledger id is
/// `l402_` and `id` in hex), buying `budget`, with `caveats` added by its holder.
fn l402_credential(id: [u8; 32], budget: &str, sandbox: bool, caveats: &[&str]) -> String {
    let preimage = [id[0]; 32];
    let identifier =
        l402::Identifier { payment_hash: Sha256::digest(preimage).into(), token_id: id };
    let offer = l402::Offer {
        service_id: "weather".into(),
        valid_until: unix_now() + 3_600,
        budget: usdc(budget),
        capabilities: vec![],
        sandbox,
    };
    let mut macaroon = l402::mint(L402_SECRET.as_bytes(), &identifier, &offer);
    for caveat in caveats {
        macaroon.add_first_party_caveat(caveat.as_bytes());
    }
    format!("L402 {}:{}", l402::encode_macaroon(&macaroon), hex::encode(preimage))
}

fn l402_body(credential: &str, price: &str) -> Value {
    json!({"credential": credential, "serviceId": "weather", "priceUsdc": price})
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
    let hold = presented(&reserve_body("tok_x", "1", "0.1")).to_string();
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
        (r#"{"serviceId":"s","limitUsdc":"1","buyerId":".."}"#, "buyerId must not be `.` or `..`"),
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
        (with_key(valid.clone(), "", 'a'), "idempotency.key"),
        (with_key(valid.clone(), &"k".repeat(256), 'a'), "idempotency.key"),
        (bad_fingerprint, "fingerprint"),
        (json!({"serviceId": "weather", "priceUsdc": "0.1"}), "missing field `credential`"),
        (
            json!({"credential": format!("Bearer {}", "a".repeat(9000)),
                "serviceId": "weather", "priceUsdc": "0.1"}),
            "credential must be at most 8192 bytes",
        ),
    ];
    // Claims no Pay Token may have: the credential is refused, as a gateway would refuse it.
    let bad_claims = [
        reserve_body("", "1", "0.1"),
        reserve_body(".", "1", "0.1"),
        // PostgreSQL's text cannot hold NUL; no store is asked to.
        reserve_body("tok_\u{0}", "1", "0.1"),
        {
            let mut body = valid.clone();
            body["token"]["buyerTag"] = json!("tag\u{0}");
            body
        },
    ];
    for body in bad_claims {
        let (status, answer) = ledger.reserve(&body).await;
        assert_eq!((status, answer["code"].as_str()), (401, Some("invalid_credential")), "{body}");
    }
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

/// PostgreSQL: a reserve that releases its buyer's expired holds locks their tokens with its
/// own, in id order as every transaction locks tokens, never after its own. Another
/// transaction that holds the lower token and then takes the reserve's is never deadlocked
/// with it: the reserve waits for the lower token holding nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserve_releasing_expired_holds_keeps_the_lock_order() {
    let database = Arc::new(TestDatabase::create().await);
    let args = ["--hold-ttl-seconds", "1", "--sweep-interval-seconds", "3600"];
    let ledger = Arc::new(Ledger::start_on(Books::Postgres(database.clone()), &args));
    // Both buyer-1's; tok_a sorts first. tok_a's hold expires, tok_b's is committed.
    let stale = ledger.hold(&reserve_body("tok_a", "1", "0.4")).await;
    let paid = ledger.hold(&reserve_body("tok_b", "1", "0.1")).await;
    assert_eq!(ledger.settle(&[(&paid.charge_id, "commit")]).await, [SettleStatus::Committed]);
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let connect = || async {
        let (client, connection) =
            tokio_postgres::connect(&database.url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client
    };
    let (mut other, watcher) = (connect().await, connect().await);
    let other = other.transaction().await.unwrap();
    // Shorter than deadlock_timeout (1 s by default): a wait for a lock the reserve holds
    // fails here before PostgreSQL would break a deadlock by aborting one side.
    other.batch_execute("SET LOCAL lock_timeout = '500ms'").await.unwrap();
    const LOCK: &str = "SELECT 1 FROM tokens WHERE token_id = $1 FOR NO KEY UPDATE";
    other.query(LOCK, &[&"tok_a"]).await.unwrap();
    let reserve = {
        let ledger = ledger.clone();
        tokio::spawn(async move { ledger.reserve(&reserve_body("tok_b", "1", "0.2")).await })
    };
    // Once the reserve waits for tok_a, this transaction takes tok_b, then lets both go.
    let mut waiting = false;
    while !waiting && !reserve.is_finished() {
        tokio::time::sleep(Duration::from_millis(20)).await;
        waiting = watcher
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = \
                 current_database() AND cardinality(pg_blocking_pids(pid)) > 0)",
                &[],
            )
            .await
            .unwrap()
            .get(0);
    }
    assert!(waiting, "the reserve did not wait for tok_a: {:?}", reserve.await);
    let taken = other.query(LOCK, &[&"tok_b"]).await;
    assert!(taken.is_ok(), "the reserve held tok_b while it waited for tok_a: {taken:?}");
    other.commit().await.unwrap();
    let answer = reserve.await.unwrap();
    assert_eq!(answer.0, 200, "{answer:?}");
    assert_eq!(ledger.admin.charge(&stale.charge_id).await.unwrap().status, ChargeStatus::Released);
    let token = ledger.token("tok_a").await;
    assert_eq!((token.used_usdc, token.reserved_usdc), (Usdc::ZERO, Usdc::ZERO));
}

async fn answered_operations_survive_kill_9_in_the_middle_of_concurrent_load(store: Backend) {
    let mut ledger = Ledger::start(store, &[]).await;
    let body = presented(&reserve_body("tok_durable", "100", "0.01"));
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

/// Without `--listen` (nor its variable, nor a config file), the ledger binds loopback's port
/// 8787; if another process holds that port, the refusal names the address it tried.
#[test]
fn listens_on_loopback_by_default() {
    use std::io::BufRead;
    let dir = TempDir::new().unwrap();
    let database = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let mut child = std::process::Command::new(ledger_binary())
        .args(["serve", "--database-url", &database])
        .env_remove("PAYSTILE_LEDGER_LISTEN")
        .env_remove("PAYSTILE_LEDGER_CONFIG")
        .envs(envs())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The line that says where it listens, or nothing if it exits (or hangs).
    let stdout = child.stdout.take().unwrap();
    let (line_tx, line_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = line_tx.send(line);
    });
    let line = line_rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
    let _ = child.kill();
    let stderr = String::from_utf8_lossy(&child.wait_with_output().unwrap().stderr).into_owned();
    if line.is_empty() {
        assert!(stderr.contains("cannot listen on 127.0.0.1:8787"), "{stderr}");
    } else {
        assert_eq!(line.trim(), "paystile-ledger listening on http://127.0.0.1:8787");
    }
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

/// Ids are text: the admin CLI reaches one holding `/`, `?`, `#`, `%` or a space as itself,
/// and `team/../victim` is never `victim`.
async fn the_admin_cli_reaches_ids_holding_url_characters(store: Backend) {
    let ledger = Ledger::start(store, &[]).await;
    let run = |args: &[&str]| {
        std::process::Command::new(ledger_binary())
            .args(args)
            .args(["--ledger-url", &ledger.process.url()])
            .env("PAYSTILE_ADMIN_KEY", ADMIN_KEY)
            .output()
            .unwrap()
    };
    let cli = |args: &[&str]| {
        let output = run(args);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice::<Value>(&output.stdout).unwrap()
    };
    let odd = "team/a b?c#d%2F";
    let deposit = cli(&["buyer", "deposit", odd, "--amount-usdc", "2"]);
    assert_eq!(deposit["buyerId"], odd);
    let shown = cli(&["buyer", "show", odd]);
    assert_eq!(
        (&shown["buyerId"], &shown["account"]["balanceUsdc"]),
        (&json!(odd), &json!("2.000000"))
    );
    let summary = cli(&["charges", "summary", "eu/weather"]);
    assert_eq!(summary["serviceId"], "eu/weather");

    let victim = IssueTokenRequest { buyer_id: "victim".into(), ..issue_request("1") };
    let victim = ledger.admin.issue_token(&victim).await.unwrap();
    let traversal = run(&["buyer", "revoke", "team/../victim"]);
    let stderr = String::from_utf8_lossy(&traversal.stderr);
    assert!(!traversal.status.success() && stderr.contains("404"), "{stderr}");
    assert!(!ledger.token(&victim.token_id).await.revoked);
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
        capability: l402::Capability::Route(None),
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

    // A batch: that many challenges, each its own token and invoice, each payable.
    let mut batch = challenge_request();
    batch["count"] = json!(8);
    let (status, answer) =
        ledger.post("/v1/l402/challenges", Some(GATEWAY_KEY), &batch.to_string()).await;
    assert_eq!(status, 200, "{answer}");
    let batch: L402Challenges = serde_json::from_value(answer).unwrap();
    assert_eq!(batch.challenges.len(), 8);
    let invoices: BTreeSet<&str> = batch.challenges.iter().map(|c| c.invoice.as_str()).collect();
    let tokens: BTreeSet<&str> = batch.challenges.iter().map(|c| c.token_id.as_str()).collect();
    assert_eq!((invoices.len(), tokens.len()), (8, 8));
    let last = batch.challenges.last().unwrap();
    let pay = json!({ "invoice": last.invoice }).to_string();
    let (status, answer) = ledger.post("/v1/sandbox/payments", Some(ADMIN_KEY), &pay).await;
    assert_eq!(status, 200, "{answer}");
    let preimage = answer["preimage"].as_str().unwrap();
    let grant = l402::verify(&last.macaroon, preimage, L402_SECRET.as_bytes(), &target).unwrap();
    assert_eq!(grant.identifier.ledger_token_id(), last.token_id);
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
        (json!({"count": 0}), "count must be between 1 and 256"),
        (json!({"count": 257}), "count must be between 1 and 256"),
        (json!({"count": -1}), "count"),
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
    let ledger = Ledger::start(store, &sandbox_args()).await;
    let id = [0xaa; 32];
    let narrowed =
        l402_body(&l402_credential(id, "0.05", false, &["weather_budget_usdc=0.03"]), "0.02");
    ledger.hold(&narrowed).await;
    let (status, refusal) = ledger.reserve(&narrowed).await;
    assert_eq!((status, refusal["limit"].as_str()), (402, Some("0.030000")), "{refusal}");
    // The full credential still has the budget it paid for.
    let full = l402_body(&l402_credential(id, "0.05", false, &[]), "0.02");
    assert_eq!(ledger.hold(&full).await.remaining_usdc, usdc("0.01"));
    let token_id = format!("l402_{}", "aa".repeat(32));
    assert_eq!(ledger.token(&token_id).await.limit_usdc, usdc("0.05"));
}

/// The ledger signs with the first key of its key file and publishes every key's public
/// half; a new key signs from the next start while the old one still verifies, and a key
/// removed verifies nothing more.
async fn eddsa_keys_sign_are_published_and_rotate_by_kid(store: Backend) {
    let dir = tempfile::TempDir::new().unwrap();
    let keys = dir.path().join("token-keys.json");
    let first = token_keys::add_key(&keys, "2026-11").unwrap();
    let mut ledger = Ledger::start(store, &["--token-keys", keys.to_str().unwrap()]).await;
    let jwks = |ledger: &Ledger| {
        let url = format!("{}/.well-known/jwks.json", ledger.process.url());
        let http = ledger.http.clone();
        async move { http.get(url).send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let kid = |jwt: &str| {
        let header = URL_SAFE_NO_PAD.decode(jwt.split('.').next().unwrap()).unwrap();
        let header: Value = serde_json::from_slice(&header).unwrap();
        assert_eq!(header["alg"], "EdDSA");
        header["kid"].as_str().unwrap().to_owned()
    };
    let old = ledger.admin.issue_token(&issue_request("1")).await.unwrap();
    assert_eq!(kid(&old.jwt), "2026-11");
    assert_eq!(jwks(&ledger).await, json!({"keys": [first]}));
    assert_eq!(pays(&ledger, &old.jwt).await, 200);

    let second = token_keys::add_key(&keys, "2026-12").unwrap();
    ledger.crash_and_restart();
    let new = ledger.admin.issue_token(&issue_request("1")).await.unwrap();
    assert_eq!(kid(&new.jwt), "2026-12");
    assert_eq!(jwks(&ledger).await, json!({"keys": [second, first]}));
    for jwt in [&old.jwt, &new.jwt] {
        assert_eq!(pays(&ledger, jwt).await, 200);
    }

    token_keys::remove_key(&keys, "2026-11").unwrap();
    ledger.crash_and_restart();
    assert_eq!(pays(&ledger, &old.jwt).await, 401, "a removed key still verifies");
    assert_eq!(pays(&ledger, &new.jwt).await, 200);
    assert_eq!(jwks(&ledger).await, json!({"keys": [second]}));
}

/// The status of a reserve paid with the Pay Token `jwt`.
async fn pays(ledger: &Ledger, jwt: &str) -> u16 {
    let body =
        json!({"credential": format!("Bearer {jwt}"), "serviceId": "weather", "priceUsdc": "0.1"});
    ledger.post("/v1/holds", Some(GATEWAY_KEY), &body.to_string()).await.0
}

/// The gateway key reserves and settles; it is not a key to anybody's money. The ledger
/// spends only for a credential it verifies itself: a grant naming another buyer, a token
/// signed with a key the ledger does not hold, a forged L402 are refused, and nothing moves.
async fn a_gateway_key_alone_spends_nobody_s_money(store: Backend) {
    let ledger = Ledger::start(store, &sandbox_args()).await;
    ledger.deposit("victim", "10", None).await;
    let before = ledger.account("victim").await;
    // What a gateway once sent: the claims of a token, for the ledger to believe.
    let grant = json!({
        "token": {"tokenId": "tok_forged", "buyerId": "victim", "serviceId": "weather",
            "scope": "SINGLE", "limitUsdc": "10", "expiresAt": 4_000_000_000u64},
        "serviceId": "weather", "priceUsdc": "5",
    });
    let (status, answer) = ledger.post("/v1/holds", Some(GATEWAY_KEY), &grant.to_string()).await;
    assert_eq!((status, answer["code"].as_str()), (400, Some("bad_request")), "{answer}");
    // A Pay Token for the victim signed with a key the ledger does not hold (anyone's),
    // or with none at all.
    let claims = json!({"sub": "victim", "jti": "tok_forged", "serviceId": "weather",
        "limitUsdc": "10", "exp": 4_000_000_000u64});
    let stranger = SigningKey::ed25519(&[9; 32]);
    let unsigned = format!(
        "{}.{}.",
        base64_url(br#"{"alg":"none"}"#),
        base64_url(claims.to_string().as_bytes())
    );
    let forged_l402 = {
        let identifier =
            l402::Identifier { payment_hash: Sha256::digest([1; 32]).into(), token_id: [1; 32] };
        let offer = l402::Offer {
            service_id: "weather".into(),
            valid_until: unix_now() + 3_600,
            budget: usdc("10"),
            capabilities: vec![],
            sandbox: false,
        };
        let macaroon = l402::mint(b"not-the-ledger-s-l402-secret-!!!", &identifier, &offer);
        format!("L402 {}:{}", l402::encode_macaroon(&macaroon), hex::encode([1; 32]))
    };
    for credential in [
        format!("Bearer {}", jws::sign(claims.to_string().as_bytes(), &stranger)),
        format!("Bearer {unsigned}"),
        forged_l402,
        "Basic dmljdGltOnBhc3N3b3Jk".to_owned(),
    ] {
        let (status, answer) = ledger.reserve(&l402_body(&credential, "5")).await;
        assert_eq!(
            (status, answer["code"].as_str()),
            (401, Some("invalid_credential")),
            "{answer}"
        );
    }
    assert_eq!(ledger.account("victim").await, before, "money moved");
    let unknown = ledger.admin.token("tok_forged").await.unwrap_err();
    assert!(matches!(unknown, ClientError::Refused { status: 404, .. }), "{unknown}");
    // The victim's own credential, made with the ledger's key, pays as usual.
    let mut own = reserve_body("tok_own", "10", "5");
    own["token"]["buyerId"] = json!("victim");
    ledger.hold(&own).await;
    assert_eq!(ledger.account("victim").await.held_usdc, usdc("5"));
}

fn base64_url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

async fn an_l402_token_revoked_before_its_first_call_is_refused_at_it(store: Backend) {
    let ledger = Ledger::start(store, &sandbox_args()).await;
    let unused = format!("l402_{}", "ab".repeat(32));
    let tombstone = ledger.admin.revoke_token(&unused).await.unwrap();
    assert!(tombstone.revoked);
    assert_eq!(tombstone.limit_usdc, Usdc::ZERO);
    let paid = l402_body(&l402_credential([0xab; 32], "0.05", false, &[]), "0.001");
    let (status, refusal) = ledger.reserve(&paid).await;
    assert_eq!((status, refusal["code"].as_str()), (422, Some("token_revoked")), "{refusal}");
    // Other unknown ids are still unknown: a typo is not silently "revoked".
    for unknown in ["tok_nope", "l402_nothex", &format!("l402_{}", "AB".repeat(32))] {
        let error = ledger.admin.revoke_token(unknown).await.unwrap_err();
        assert!(matches!(error, ClientError::Refused { status: 404, .. }), "{unknown}: {error}");
    }
}

/// The journal (`GET /v1/charges`, its CSV export) and the per-service summary.
mod journal {
    use paystile_protocol::ledger_api::{ChargePage, ChargeStatus, ChargeView, ServiceSummary};
    use reqwest::header::HeaderMap;
    use time::OffsetDateTime;
    use time::format_description::well_known::Rfc3339;

    use super::*;

    on_both_stores! {
        the_journal_lists_every_charge_and_filters_it,
        paging_neither_skips_nor_repeats_under_inserts,
        the_csv_export_is_rfc_4180_with_6_decimal_amounts,
        bad_journal_queries_get_400_with_a_message,
        the_summary_counts_a_known_scenario,
        the_admin_cli_lists_exports_and_sums_up_charges,
        the_journal_keeps_the_books_of_partial_commits_sandbox_and_buyers,
        the_journal_never_shows_an_expired_hold_as_held,
        csv_cells_never_start_a_formula,
        time_bounds_inside_a_millisecond_count_by_the_instant,
    }

    /// Revenue is what commits charged, in the live book only (the sandbox book on asking);
    /// every fresh refusal counts, the buyers' codes too, and a recorded refusal answered
    /// again from its Idempotency-Key counts once.
    async fn the_journal_keeps_the_books_of_partial_commits_sandbox_and_buyers(store: Backend) {
        let ledger = Ledger::start(store, &[]).await;
        let partial = ledger.call("tok_p", "dana", "weather", "1").await;
        let body = json!({"settlements": [
            {"chargeId": partial, "outcome": "commit", "upstreamStatus": 200, "amountUsdc": "0.4"}
        ]});
        let (status, answer) =
            ledger.post("/v1/holds/settle", Some(GATEWAY_KEY), &body.to_string()).await;
        assert_eq!(status, 200, "{answer}");
        let mut sandbox = reserve_body("tok_s", "100", "2");
        sandbox["token"]["sandbox"] = json!(true);
        let played = ledger.hold(&sandbox).await.charge_id;
        ledger.settle_with(&played, "commit", 200).await;
        sandbox["priceUsdc"] = json!("99");
        assert_eq!(ledger.reserve(&sandbox).await.0, 402);

        // A refusal recorded under a key, answered again: one refusal.
        let over = with_key(reserve_body("tok_small", "0.05", "0.1"), "k", 'a');
        for _ in 0..2 {
            let (status, refusal) = ledger.reserve(&over).await;
            assert_eq!((status, refusal["code"].as_str()), (402, Some("token_limit_exceeded")));
        }
        // The same key for another request is a fresh refusal (about the key).
        assert_eq!(ledger.reserve(&with_key(over.clone(), "k", 'b')).await.0, 422);
        ledger.deposit("erin", "0.5", None).await;
        let mut poor = reserve_body("tok_e", "100", "1");
        poor["token"]["buyerId"] = json!("erin");
        let (status, refusal) = ledger.reserve(&poor).await;
        assert_eq!((status, refusal["code"].as_str()), (402, Some("insufficient_balance")));
        ledger.deposit("fay", "50", None).await;
        let mut spender = reserve_body("tok_f", "100", "11");
        spender["token"]["buyerId"] = json!("fay");
        let (status, refusal) = ledger.reserve(&spender).await;
        assert_eq!((status, refusal["code"].as_str()), (402, Some("daily_limit_exceeded")));

        let summary = |query: &'static str| {
            let ledger = &ledger;
            async move {
                let (status, _, body) =
                    ledger.get(&format!("/v1/services/weather/summary{query}"), None).await;
                assert_eq!(status, 200, "{body}");
                serde_json::from_str::<ServiceSummary>(&body).unwrap()
            }
        };
        let live = summary("").await;
        assert_eq!((live.calls, live.committed, live.sandbox), (1, 1, false), "{live:?}");
        assert_eq!(live.revenue_usdc, usdc("0.4"));
        assert_eq!(
            live.refusals,
            [
                ("daily_limit_exceeded".to_owned(), 1),
                ("idempotency_key_mismatch".to_owned(), 1),
                ("insufficient_balance".to_owned(), 1),
                ("token_limit_exceeded".to_owned(), 1),
            ]
            .into()
        );
        assert_eq!(summary("?sandbox=false").await, live);
        let played_book = summary("?sandbox=true").await;
        assert_eq!((played_book.calls, played_book.sandbox), (1, true));
        assert_eq!(played_book.revenue_usdc, usdc("2"));
        assert_eq!(played_book.refusals, [("token_limit_exceeded".to_owned(), 1)].into());
        // The metrics agree: the live refusal once and the sandbox one, not the replay.
        let url = format!("{}/metrics", ledger.process.url());
        let metrics = ledger.http.get(url).send().await.unwrap().text().await.unwrap();
        let series = "paystile_ledger_refusals_total{code=\"token_limit_exceeded\"} 2";
        assert!(metrics.lines().any(|line| line == series), "{metrics}");

        // The journal's rows are ChargeView's: committed amount, held amount, book.
        let all = ledger.all_charges("").await;
        assert_eq!(ids(&all), [partial.as_str(), played.as_str()]);
        assert_eq!(
            (all[0].amount_usdc, all[0].held_usdc, all[0].sandbox),
            (usdc("0.4"), usdc("1"), false)
        );
        assert_eq!(all[0], ledger.admin.charge(&partial).await.unwrap());
        assert!(all[1].sandbox);
        assert_eq!(ids(&ledger.all_charges("sandbox=true").await), [played.as_str()]);
        assert_eq!(ids(&ledger.all_charges("sandbox=false").await), [partial.as_str()]);
        let (_, _, csv) = ledger.get("/v1/charges.csv?sandbox=true", None).await;
        let row = csv.split_terminator("\r\n").nth(1).unwrap();
        assert!(row.starts_with(&format!("{played},tok_s,buyer-1,weather,2.000000,2.000000,")));
        assert!(row.ends_with(",true,,,"), "{row}");
        let (_, _, csv) = ledger.get("/v1/charges.csv?sandbox=false", None).await;
        let row = csv.split_terminator("\r\n").nth(1).unwrap();
        assert!(row.starts_with(&format!("{partial},tok_p,dana,weather,0.400000,1.000000,")));
    }

    /// A hold past its TTL reads as released in the journal and its summary, as it does
    /// alone; releases on read count as expirations.
    async fn the_journal_never_shows_an_expired_hold_as_held(store: Backend) {
        let ledger =
            Ledger::start(store, &["--hold-ttl-seconds", "1", "--sweep-interval-seconds", "3600"])
                .await;
        let alone = ledger.call("tok_x", "xena", "weather", "0.1").await;
        let listed = ledger.call("tok_y", "yann", "weather", "0.1").await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let charge = ledger.admin.charge(&alone).await.unwrap();
        assert_eq!(charge.status, ChargeStatus::Released);
        let expirations = |ledger: &Ledger| {
            let url = format!("{}/metrics", ledger.process.url());
            let http = ledger.http.clone();
            async move {
                let text = http.get(url).send().await.unwrap().text().await.unwrap();
                text.lines()
                    .find_map(|line| line.strip_prefix("paystile_ledger_expirations_total "))
                    .map(|value| value.parse::<f64>().unwrap())
                    .unwrap()
            }
        };
        assert_eq!(expirations(&ledger).await, 1.0);
        let all = ledger.all_charges("").await;
        assert_eq!(ids(&all), [alone.as_str(), listed.as_str()]);
        assert!(all.iter().all(|c| c.status == ChargeStatus::Released), "{all:?}");
        assert_eq!(expirations(&ledger).await, 2.0);
        let (_, _, body) = ledger.get("/v1/services/weather/summary", None).await;
        let summary: ServiceSummary = serde_json::from_str(&body).unwrap();
        assert_eq!((summary.held, summary.released), (0, 2));
    }

    async fn the_admin_cli_lists_exports_and_sums_up_charges(store: Backend) {
        let ledger = Ledger::start(store, &[]).await;
        let run = |args: &[&str]| {
            std::process::Command::new(ledger_binary())
                .args(args)
                .args(["--ledger-url", &ledger.process.url()])
                .env("PAYSTILE_ADMIN_KEY", ADMIN_KEY)
                .output()
                .unwrap()
        };
        let cli = |args: &[&str]| {
            let output = run(args);
            assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
            String::from_utf8(output.stdout).unwrap()
        };
        let mut made = Vec::new();
        for _ in 0..5 {
            let id = ledger.call("tok_cli", "cli-buyer", "weather", "0.2").await;
            ledger.settle_with(&id, "commit", 200).await;
            made.push(id);
        }
        ledger.call("tok_other", "someone-else", "weather", "0.2").await;

        let list = ["charges", "list", "--buyer-id", "cli-buyer", "--status", "committed"];
        let first: ChargePage =
            serde_json::from_str(&cli(&[&list[..], &["--limit", "3"]].concat())).unwrap();
        let cursor = first.next_cursor.clone().unwrap();
        let rest: ChargePage =
            serde_json::from_str(&cli(
                &[&list[..], &["--limit", "3", "--cursor", &cursor]].concat()
            ))
            .unwrap();
        assert_eq!(rest.next_cursor, None);
        let listed: Vec<&str> =
            first.charges.iter().chain(&rest.charges).map(|c| c.charge_id.as_str()).collect();
        assert_eq!(listed, made);

        // Three pages of two, one CSV document.
        let csv = cli(&["charges", "export", "--token-id", "tok_cli", "--page-size", "2"]);
        let lines: Vec<&str> = csv.split_terminator("\r\n").collect();
        assert_eq!(lines.len(), 6, "{csv}");
        assert!(lines[0].starts_with("chargeId,"));
        for (line, id) in lines[1..].iter().zip(&made) {
            let expected =
                format!("{id},tok_cli,cli-buyer,weather,0.200000,0.200000,committed,200,");
            assert!(line.starts_with(&expected), "{line}");
        }

        let summary: ServiceSummary =
            serde_json::from_str(&cli(&["charges", "summary", "weather"])).unwrap();
        assert_eq!((summary.calls, summary.committed, summary.held), (6, 5, 1));
        assert_eq!(summary.revenue_usdc, usdc("1"));
        let shown: ChargeView = serde_json::from_str(&cli(&["charges", "show", &made[0]])).unwrap();
        assert_eq!(shown, first.charges[0]);

        let refused = run(&["charges", "list", "--limit", "0"]);
        assert!(!refused.status.success());
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(stderr.contains("limit must be 1 to 1000"), "{stderr}");
    }

    impl Ledger {
        /// `GET path` with the admin key: status, headers, body.
        async fn get(&self, path: &str, accept: Option<&str>) -> (u16, HeaderMap, String) {
            let mut request =
                self.http.get(format!("{}{path}", self.process.url())).bearer_auth(ADMIN_KEY);
            if let Some(accept) = accept {
                request = request.header("accept", accept);
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            (status, headers, response.text().await.unwrap())
        }

        async fn page(&self, query: &str) -> ChargePage {
            let (status, _, body) = self.get(&format!("/v1/charges?{query}"), None).await;
            assert_eq!(status, 200, "{query}: {body}");
            serde_json::from_str(&body).unwrap()
        }

        /// Every page of `query` (which must not set a cursor), followed to the end.
        async fn all_charges(&self, query: &str) -> Vec<ChargeView> {
            let mut charges = Vec::new();
            let mut cursor = String::new();
            loop {
                let page = self.page(&format!("{query}&limit=3{cursor}")).await;
                charges.extend(page.charges);
                match page.next_cursor {
                    Some(next) => cursor = format!("&cursor={next}"),
                    None => return charges,
                }
            }
        }

        /// Reserves one call; answers its charge id.
        async fn call(&self, token_id: &str, buyer: &str, service: &str, price: &str) -> String {
            let body = json!({
                "token": {
                    "tokenId": token_id, "buyerId": buyer, "serviceId": service,
                    "scope": "SINGLE", "limitUsdc": "100", "expiresAt": 4_000_000_000u64
                },
                "serviceId": service,
                "priceUsdc": price,
            });
            self.hold(&body).await.charge_id
        }

        async fn settle_with(&self, charge_id: &str, outcome: &str, upstream: u16) {
            let body = json!({"settlements": [
                {"chargeId": charge_id, "outcome": outcome, "upstreamStatus": upstream}
            ]});
            let (status, answer) =
                self.post("/v1/holds/settle", Some(GATEWAY_KEY), &body.to_string()).await;
            assert_eq!(status, 200, "{answer}");
        }
    }

    fn millis(at: &str) -> i128 {
        OffsetDateTime::parse(at, &Rfc3339).unwrap().unix_timestamp_nanos() / 1_000_000
    }

    fn ids(charges: &[ChargeView]) -> Vec<&str> {
        charges.iter().map(|c| c.charge_id.as_str()).collect()
    }

    /// Oldest first, then by id: strictly increasing keys, so no charge twice.
    fn assert_in_journal_order(charges: &[ChargeView]) {
        for pair in charges.windows(2) {
            let key = |c: &ChargeView| (millis(&c.created_at), c.charge_id.clone());
            assert!(key(&pair[0]) < key(&pair[1]), "{:?} then {:?}", pair[0], pair[1]);
        }
    }

    async fn the_journal_lists_every_charge_and_filters_it(store: Backend) {
        let ledger = Ledger::start(store, &[]).await;
        let mut made = Vec::new();
        for (token, buyer, service) in [
            ("tok_a", "alice", "weather"),
            ("tok_b", "bob", "weather"),
            ("tok_a", "alice", "weather"),
            ("tok_c", "alice", "maps"),
            ("tok_b", "bob", "weather"),
            ("tok_c", "alice", "maps"),
        ] {
            made.push(ledger.call(token, buyer, service, "0.25").await);
            // Distinct milliseconds, so that time windows can split the list.
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        ledger.settle_with(&made[0], "commit", 200).await;
        ledger.settle_with(&made[1], "release", 502).await;
        ledger.settle_with(&made[3], "commit", 201).await;

        let all = ledger.all_charges("").await;
        assert_eq!(ids(&all), made.iter().map(String::as_str).collect::<Vec<_>>());
        assert_in_journal_order(&all);
        let first = &all[0];
        assert_eq!((first.token_id.as_str(), first.buyer_id.as_str()), ("tok_a", "alice"));
        assert_eq!((first.status, first.amount_usdc), (ChargeStatus::Committed, usdc("0.25")));
        assert_eq!((first.upstream_status, first.settled_at.is_some()), (Some(200), true));
        assert_eq!((all[1].status, all[1].amount_usdc), (ChargeStatus::Released, Usdc::ZERO));
        assert_eq!((all[2].status, all[2].upstream_status), (ChargeStatus::Held, None));

        let select =
            |picked: &[usize]| picked.iter().map(|&i| made[i].as_str()).collect::<Vec<_>>();
        let cases: [(&str, &[usize]); 9] = [
            ("tokenId=tok_a", &[0, 2]),
            ("buyerId=alice", &[0, 2, 3, 5]),
            ("serviceId=maps", &[3, 5]),
            ("status=held", &[2, 4, 5]),
            ("status=committed&buyerId=alice", &[0, 3]),
            ("serviceId=weather&status=released", &[1]),
            (&format!("from={}", all[2].created_at), &[2, 3, 4, 5]),
            (&format!("to={}", all[2].created_at), &[0, 1]),
            (&format!("from={}&to={}&buyerId=bob", all[1].created_at, all[4].created_at), &[1]),
        ];
        for (query, expected) in cases {
            let query = query.replace('+', "%2B");
            assert_eq!(ids(&ledger.all_charges(&query).await), select(expected), "{query}");
        }
        assert!(ledger.page("buyerId=nobody").await.charges.is_empty());
        // One charge, as the single-charge endpoint shows it.
        assert_eq!(ledger.admin.charge(&made[3]).await.unwrap(), all[3]);
        // Admin only.
        for path in ["/v1/charges", "/v1/charges.csv", "/v1/services/weather/summary"] {
            let url = format!("{}{path}", ledger.process.url());
            let response = ledger.http.get(url).bearer_auth(GATEWAY_KEY).send().await.unwrap();
            assert_eq!(response.status(), 401, "{path}");
        }
    }

    async fn paging_neither_skips_nor_repeats_under_inserts(store: Backend) {
        let ledger = Ledger::start(store, &[]).await;
        let mut before = Vec::new();
        for i in 0..20 {
            before.push(ledger.call(&format!("tok_{}", i % 3), "pager", "weather", "0.01").await);
        }
        let mut seen: Vec<ChargeView> = Vec::new();
        let mut cursor = String::new();
        let mut pages = 0;
        loop {
            let page = ledger.page(&format!("limit=4{cursor}")).await;
            assert!(page.charges.len() <= 4);
            seen.extend(page.charges);
            pages += 1;
            // Charges made while paging, some settled too: they come after every earlier one.
            if pages <= 3 {
                for _ in 0..3 {
                    let id = ledger.call("tok_new", "pager", "weather", "0.01").await;
                    ledger.settle_with(&id, "commit", 200).await;
                }
                ledger.settle_with(&before[pages], "commit", 200).await;
            }
            match page.next_cursor {
                Some(next) => cursor = format!("&cursor={next}"),
                None => break,
            }
        }
        assert_in_journal_order(&seen);
        let seen_ids = ids(&seen);
        for id in &before {
            assert_eq!(seen_ids.iter().filter(|s| *s == id).count(), 1, "{id}");
        }
        // Nothing vanished: everything in the journal now was seen.
        let now = ledger.all_charges("").await;
        assert_eq!(seen_ids, ids(&now));
        assert_eq!(now.len(), 29);
    }

    async fn the_csv_export_is_rfc_4180_with_6_decimal_amounts(store: Backend) {
        let ledger = Ledger::start(store, &[]).await;
        let plain = ledger.call("tok_csv", "buyer,\"quoted\"", "weather", "0.5").await;
        ledger.settle_with(&plain, "commit", 200).await;
        tokio::time::sleep(Duration::from_millis(3)).await;
        let keyed = with_key(reserve_body("tok_csv2", "1", "0.000001"), "k,\"1\"", 'a');
        let keyed = ledger.hold(&keyed).await.charge_id;
        let page = ledger.page("").await;

        let (status, headers, csv) = ledger.get("/v1/charges.csv", None).await;
        assert_eq!(status, 200, "{csv}");
        assert_eq!(headers["content-type"], "text/csv; charset=utf-8");
        let lines: Vec<&str> = csv.split_terminator("\r\n").collect();
        assert_eq!(
            lines,
            [
                "chargeId,tokenId,buyerId,serviceId,amountUsdc,heldUsdc,status,upstreamStatus,\
                 idempotencyKey,createdAt,settledAt,sandbox,settlement,transaction,settlementReason"
                    .to_owned(),
                format!(
                    "{plain},tok_csv,\"buyer,\"\"quoted\"\"\",weather,0.500000,0.500000,committed,200,,\
                     {},{},false,,,",
                    page.charges[0].created_at,
                    page.charges[0].settled_at.as_deref().unwrap()
                ),
                format!(
                    "{keyed},tok_csv2,buyer-1,weather,0.000001,0.000001,held,,\"k,\"\"1\"\"\",{},,false,,,",
                    page.charges[1].created_at
                ),
            ]
        );
        assert!(csv.ends_with("\r\n"));

        // `Accept: text/csv` on the list answers the same; a page's cursor is a header.
        let (status, headers, accepted) = ledger.get("/v1/charges", Some("text/csv")).await;
        assert_eq!((status, accepted.as_str()), (200, csv.as_str()));
        assert!(headers.get("x-next-cursor").is_none());
        // Only when CSV is acceptable and preferred over JSON (q-values; a tie is JSON).
        for (accept, wants_csv) in [
            ("application/json;q=0.5, text/csv", true),
            ("TEXT/CSV; q=0.9, */*;q=0.1", true),
            ("text/csv;q=0", false),
            ("text/csv;q=0.2, application/json", false),
            ("application/json, text/csv", false),
            ("*/*", false),
            ("text/csv;q=2", false),
        ] {
            let (_, headers, _) = ledger.get("/v1/charges", Some(accept)).await;
            let csv_answer = headers["content-type"].to_str().unwrap().starts_with("text/csv");
            assert_eq!(csv_answer, wants_csv, "Accept: {accept}");
        }
        let (_, headers, first) = ledger.get("/v1/charges.csv?limit=1", None).await;
        assert_eq!(first.split_terminator("\r\n").count(), 2);
        let cursor = headers["x-next-cursor"].to_str().unwrap();
        let (_, _, second) = ledger.get(&format!("/v1/charges.csv?cursor={cursor}"), None).await;
        assert_eq!(second.split_terminator("\r\n").nth(1), Some(lines[2]));
    }

    async fn bad_journal_queries_get_400_with_a_message(store: Backend) {
        let ledger = Ledger::start(store, &[]).await;
        ledger.call("tok_a", "alice", "weather", "0.1").await;
        let cursor = ledger.page("limit=1").await.next_cursor;
        assert!(cursor.is_none(), "one charge: one page");
        let garbage = "bm90LWEtY3Vyc29y"; // base64 of "not-a-cursor"
        let cases = [
            ("limit=0", "limit must be 1 to 1000"),
            ("limit=5000", "limit must be 1 to 1000"),
            ("limit=ten", "limit"),
            ("limit=-1", "limit"),
            (&format!("cursor={garbage}") as &str, "cursor"),
            ("cursor=%%%", "cursor"),
            ("from=yesterday", "from must be an RFC 3339 time"),
            ("to=2026-13-01T00:00:00Z", "to must be an RFC 3339 time"),
            ("from=2026-02-01T00:00:00Z&to=2026-01-01T00:00:00Z", "from must be before to"),
            ("status=pending", "status"),
            ("color=red", "unknown field `color`"),
            ("token_id=tok_a", "unknown field `token_id`"),
            ("tokenId=", "tokenId must not be empty"),
            ("buyerId=a%00b", "control characters"),
        ];
        for (query, message) in cases {
            for path in ["/v1/charges", "/v1/charges.csv"] {
                let (status, _, body) = ledger.get(&format!("{path}?{query}"), None).await;
                let answer: Value = serde_json::from_str(&body).unwrap();
                assert_eq!(
                    (status, answer["code"].as_str()),
                    (400, Some("bad_request")),
                    "{query}"
                );
                let error = answer["error"].as_str().unwrap();
                assert!(error.contains(message), "{path}?{query}: {error}");
            }
        }
        for (query, message) in [
            ("from=noon", "from must be an RFC 3339 time"),
            ("serviceId=x", "unknown field `serviceId`"),
        ] {
            let (status, _, body) =
                ledger.get(&format!("/v1/services/weather/summary?{query}"), None).await;
            assert_eq!(status, 400, "{query}: {body}");
            assert!(body.contains(message), "{query}: {body}");
        }
    }

    /// A cell a spreadsheet would read as a formula (`=`, `+`, `-` or `@` first) is exported
    /// behind an apostrophe: ids and Idempotency-Keys are text the clients chose. JSON keeps
    /// the text as it is.
    async fn csv_cells_never_start_a_formula(store: Backend) {
        let ledger = Ledger::start(store, &[]).await;
        let body = json!({
            "token": {
                "tokenId": "-tok", "buyerId": "@buyer", "serviceId": "+svc",
                "scope": "SINGLE", "limitUsdc": "1", "expiresAt": 4_000_000_000u64
            },
            "serviceId": "+svc",
            "priceUsdc": "0.1",
        });
        let key = "=HYPERLINK(\"http://127.0.0.1/\",\"x\")";
        let id = ledger.hold(&with_key(body, key, 'a')).await.charge_id;
        let charge = &ledger.page("").await.charges[0];
        assert_eq!(
            (charge.token_id.as_str(), charge.idempotency_key.as_deref()),
            ("-tok", Some(key))
        );
        let (status, _, csv) = ledger.get("/v1/charges.csv", None).await;
        assert_eq!(status, 200, "{csv}");
        let row = csv.split_terminator("\r\n").nth(1).unwrap();
        let expected = format!(
            "{id},'-tok,'@buyer,'+svc,0.100000,0.100000,held,,\
             \"'=HYPERLINK(\"\"http://127.0.0.1/\"\",\"\"x\"\")\",{},,false,,,",
            charge.created_at
        );
        assert_eq!(row, expected);
    }

    /// `from` and `to` are instants, finer than the journal's milliseconds: a charge counts by
    /// when it was made, whatever the bounds' sub-millisecond digits.
    async fn time_bounds_inside_a_millisecond_count_by_the_instant(store: Backend) {
        let ledger = Ledger::start(store, &[]).await;
        let id = ledger.call("tok_t", "tess", "weather", "0.1").await;
        let made =
            OffsetDateTime::parse(&ledger.page("").await.charges[0].created_at, &Rfc3339).unwrap();
        let at = |micros: i64| {
            let at = made + time::Duration::microseconds(micros);
            at.format(&Rfc3339).unwrap().replace('+', "%2B")
        };
        let it: &[&str] = &[id.as_str()];
        let cases: [(String, &[&str]); 6] = [
            (format!("from={}", at(-500)), it),
            (format!("from={}", at(0)), it),
            (format!("from={}", at(500)), &[]),
            (format!("to={}", at(500)), it),
            (format!("to={}", at(0)), &[]),
            (format!("from={}&to={}", at(100), at(200)), &[]),
        ];
        for (query, expected) in cases {
            assert_eq!(ids(&ledger.page(&query).await.charges), expected, "{query}");
            let (status, _, body) =
                ledger.get(&format!("/v1/services/weather/summary?{query}"), None).await;
            assert_eq!(status, 200, "{query}: {body}");
            let summary: ServiceSummary = serde_json::from_str(&body).unwrap();
            assert_eq!(summary.calls, expected.len() as u64, "{query}");
        }
    }

    async fn the_summary_counts_a_known_scenario(store: Backend) {
        let ledger = Ledger::start(store, &[]).await;
        let start = OffsetDateTime::now_utc().format(&Rfc3339).unwrap();
        for upstream in [200, 200, 201] {
            let id = ledger.call("tok_w", "alice", "weather", "0.1").await;
            ledger.settle_with(&id, "commit", upstream).await;
        }
        for upstream in [503, 500, 404] {
            let id = ledger.call("tok_w", "alice", "weather", "0.1").await;
            ledger.settle_with(&id, "release", upstream).await;
        }
        ledger.call("tok_w", "alice", "weather", "0.1").await; // still in flight
        let maps = ledger.call("tok_m", "bob", "maps", "7").await;
        ledger.settle_with(&maps, "commit", 200).await;

        // Refusals: over the cap twice, a revoked token once, another service once.
        let small = reserve_body("tok_small", "0.05", "0.1");
        for _ in 0..2 {
            assert_eq!(ledger.reserve(&small).await.0, 402);
        }
        ledger.call("tok_r", "carol", "weather", "0.1").await;
        ledger.admin.revoke_token("tok_r").await.unwrap();
        let mut revoked = reserve_body("tok_r", "100", "0.1");
        revoked["token"]["buyerId"] = json!("carol");
        assert_eq!(ledger.reserve(&revoked).await.0, 422);
        // A token for another service is refused when its credential is checked, before
        // the books: the gateway refuses it there too, so it is no refusal of `maps`.
        let mut elsewhere = reserve_body("tok_w", "100", "0.1");
        elsewhere["serviceId"] = json!("maps");
        assert_eq!(ledger.reserve(&elsewhere).await.0, 403);

        let summary = |query: String| {
            let ledger = &ledger;
            async move {
                let (status, _, body) =
                    ledger.get(&format!("/v1/services/weather/summary{query}"), None).await;
                assert_eq!(status, 200, "{body}");
                serde_json::from_str::<ServiceSummary>(&body).unwrap()
            }
        };
        let weather = summary(String::new()).await;
        assert_eq!(weather.service_id, "weather");
        assert_eq!(
            (weather.calls, weather.committed, weather.released, weather.held),
            (8, 3, 3, 2),
            "{weather:?}"
        );
        assert_eq!(weather.revenue_usdc, usdc("0.3"));
        assert_eq!(
            weather.refusals,
            [("token_limit_exceeded".to_owned(), 2), ("token_revoked".to_owned(), 1)].into()
        );
        assert_eq!((weather.upstream_answered, weather.upstream_errors), (6, 2));
        assert!((weather.error_rate - 2.0 / 6.0).abs() < 1e-9, "{}", weather.error_rate);

        let (status, _, body) = ledger.get("/v1/services/maps/summary", None).await;
        assert_eq!(status, 200);
        let maps: ServiceSummary = serde_json::from_str(&body).unwrap();
        assert_eq!((maps.calls, maps.revenue_usdc), (1, usdc("7")));
        assert_eq!(maps.refusals, [].into());
        assert_eq!((maps.upstream_answered, maps.error_rate), (1, 0.0));

        // The window: everything above is in [start, now]; nothing before it.
        let end =
            (OffsetDateTime::now_utc() + time::Duration::seconds(1)).format(&Rfc3339).unwrap();
        let within = summary(format!("?from={start}&to={end}").replace('+', "%2B")).await;
        assert_eq!(
            (within.calls, within.revenue_usdc, within.from),
            (8, usdc("0.3"), Some(start.clone()))
        );
        let before = summary(format!("?to={start}").replace('+', "%2B")).await;
        assert_eq!((before.calls, before.revenue_usdc, before.error_rate), (0, Usdc::ZERO, 0.0));
        assert!(before.refusals.is_empty());
        let (_, _, body) = ledger.get("/v1/services/nobody-sells-this/summary", None).await;
        let unknown: ServiceSummary = serde_json::from_str(&body).unwrap();
        assert_eq!((unknown.calls, unknown.revenue_usdc), (0, Usdc::ZERO));
    }
}

/// Metrics and structured logs.
mod operability {
    use std::collections::HashMap;

    use super::*;

    on_both_stores! {
        metrics_count_what_the_ledger_does,
        reserves_settlements_and_refusals_log_json_events_without_secrets,
        the_openapi_document_is_served_and_its_security_is_the_routers,
        path_ids_that_cannot_be_ids_get_400_or_404_with_a_message,
    }

    /// Each documented operation exists (no 404 or 405) and asks for a key exactly when the
    /// document says so.
    async fn the_openapi_document_is_served_and_its_security_is_the_routers(store: Backend) {
        let ledger = Ledger::start(store, &[]).await;
        let url = |path: &str| format!("{}{path}", ledger.process.url());
        let response = ledger.http.get(url("/openapi.json")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let document: Value = response.json().await.unwrap();
        assert!(document["openapi"].as_str().unwrap().starts_with("3."));
        let buyer_key = buyer_key(&ledger, "buyer-x", &BuyerKeyRequest::default()).await.key;
        let admin_only = [json!({"adminKey": []})];
        let gateway_only = [json!({"gatewayKey": []})];
        let buyer_only = [json!({"buyerKey": []})];
        let admin_or_buyer = [json!({"adminKey": []}), json!({"buyerKey": []})];
        let mut operations = 0;
        for (path, methods) in document["paths"].as_object().unwrap() {
            let concrete = path.replace("{tokenId}", "tok_x").replace("{chargeId}", "ch_x");
            let concrete = concrete
                .replace("{serviceId}", "weather")
                .replace("{buyerId}", "buyer-x")
                .replace("{keyId}", "bk_x");
            for (method, operation) in methods.as_object().unwrap() {
                let security = operation["security"].as_array().unwrap();
                let key = match security.as_slice() {
                    [] => None,
                    s if s == admin_only || s == admin_or_buyer => Some(ADMIN_KEY),
                    s if s == gateway_only => Some(GATEWAY_KEY),
                    s if s == buyer_only => Some(buyer_key.as_str()),
                    other => panic!("{path}: unexpected security {other:?}"),
                };
                let method: reqwest::Method = method.to_ascii_uppercase().parse().unwrap();
                let request = ledger.http.request(method.clone(), url(&concrete));
                let status = request.send().await.unwrap().status().as_u16();
                let expected = if key.is_some() { 401 } else { 200 };
                assert_eq!(status, expected, "{method} {path} without a key");
                if let Some(key) = key {
                    // The other API's key, a wrong one, the right one without its scheme or
                    // with a byte more: each refused before the handler reads the request.
                    let other = if key == GATEWAY_KEY { ADMIN_KEY } else { GATEWAY_KEY };
                    for authorization in [
                        format!("Bearer {other}"),
                        "Bearer not-the-key-0123456789".to_owned(),
                        key.to_owned(),
                        format!("Basic {key}"),
                        format!("Bearer {key}x"),
                        "Bearer ".to_owned(),
                    ] {
                        let request = ledger.http.request(method.clone(), url(&concrete));
                        let response =
                            request.header("authorization", &authorization).send().await.unwrap();
                        assert_eq!(response.status(), 401, "{method} {path} with {authorization}");
                        let body: Value = response.json().await.unwrap();
                        assert_eq!(body["code"], "unauthorized", "{method} {path}");
                    }
                    let request = ledger.http.request(method.clone(), url(&concrete));
                    let status = request.bearer_auth(key).send().await.unwrap().status();
                    assert!(![401, 405].contains(&status.as_u16()), "{method} {path}: {status}");
                }
                operations += 1;
            }
        }
        assert_eq!(operations, 38);
        // A known path with a method it does not take: 405, its methods, and a JSON body.
        for (method, path, allow) in [
            (reqwest::Method::DELETE, "/v1/charges", "GET,HEAD"),
            (reqwest::Method::GET, "/v1/holds", "POST"),
            (reqwest::Method::PATCH, "/healthz", "GET,HEAD"),
        ] {
            let request = ledger.http.request(method.clone(), url(path)).bearer_auth(ADMIN_KEY);
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 405, "{method} {path}");
            assert_eq!(response.headers()["allow"], allow, "{method} {path}");
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["code"], "method_not_allowed", "{method} {path}");
            assert!(body["error"].as_str().unwrap().contains("Allow"), "{body}");
        }
    }

    /// An id in a path that cannot be one (a control character, bytes that are not UTF-8)
    /// gets a 400 or 404 `ErrorBody` with a message, on every route taking one and on both
    /// stores alike, and the document lists that status.
    async fn path_ids_that_cannot_be_ids_get_400_or_404_with_a_message(store: Backend) {
        let ledger = Ledger::start(store, &[]).await;
        let url = |path: &str| format!("{}{path}", ledger.process.url());
        let document: Value =
            ledger.http.get(url("/openapi.json")).send().await.unwrap().json().await.unwrap();
        let schemas = &document["components"]["schemas"];
        let buyer_key = buyer_key(&ledger, "buyer-x", &BuyerKeyRequest::default()).await.key;
        let mut operations = 0;
        for (path, methods) in document["paths"].as_object().unwrap() {
            if !path.contains('{') {
                continue;
            }
            for (method, operation) in methods.as_object().unwrap() {
                let key = match operation["security"][0].as_object().unwrap().keys().next() {
                    Some(scheme) if scheme == "adminKey" => ADMIN_KEY,
                    Some(scheme) if scheme == "buyerKey" => buyer_key.as_str(),
                    other => panic!("{method} {path}: unexpected security {other:?}"),
                };
                // A body the route takes: its schema's example.
                let body =
                    operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                        .as_str()
                        .map(|schema| {
                            let name = schema.rsplit('/').next().unwrap();
                            schemas[name]["example"].to_string()
                        });
                for bad in ["a%00b", "%FF"] {
                    let concrete: String = path
                        .split('/')
                        .map(|part| if part.starts_with('{') { bad } else { part })
                        .collect::<Vec<_>>()
                        .join("/");
                    let method: reqwest::Method = method.to_ascii_uppercase().parse().unwrap();
                    let mut request = ledger.http.request(method.clone(), url(&concrete));
                    if let Some(body) = &body {
                        request =
                            request.header("content-type", "application/json").body(body.clone());
                    }
                    let response = request.bearer_auth(key).send().await.unwrap();
                    let status = response.status().as_u16();
                    let text = response.text().await.unwrap();
                    let answer: ErrorBody = serde_json::from_str(&text)
                        .unwrap_or_else(|_| panic!("{method} {concrete}: {status} {text}"));
                    assert!([400, 404].contains(&status), "{method} {concrete}: {status} {text}");
                    assert_eq!(answer.status(), status, "{method} {concrete}: {text}");
                    assert!(!answer.error.is_empty(), "{method} {concrete}");
                    let documented = operation["responses"].get(status.to_string()).is_some();
                    assert!(documented, "{method} {path}: {status} is not documented");
                }
                operations += 1;
            }
        }
        assert_eq!(operations, 17);
    }

    /// The method label is one of HTTP's own methods or `other`: made-up methods, which any
    /// client may send to the open endpoints, add no series.
    #[tokio::test]
    async fn made_up_methods_add_no_metric_series() {
        let ledger = Ledger::start(Backend::Sqlite, &[]).await;
        for method in ["BREW", "WHEN", "X-MADE-UP"] {
            let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
            for path in ["/healthz", "/nowhere"] {
                let url = format!("{}{path}", ledger.process.url());
                let status =
                    ledger.http.request(method.clone(), url).send().await.unwrap().status();
                assert!(status.is_client_error(), "{method} {path}: {status}");
            }
        }
        let after = metrics(&ledger).await;
        let counted: f64 = after
            .iter()
            .filter(|(series, _)| {
                series.starts_with("paystile_ledger_http_request_duration_seconds_count{")
                    && series.contains("method=\"other\"")
            })
            .map(|(_, count)| count)
            .sum();
        assert_eq!(counted, 6.0);
        for made_up in ["BREW", "WHEN", "X-MADE-UP"] {
            assert!(after.keys().all(|series| !series.contains(made_up)), "{made_up} is a label");
        }
    }

    /// The samples of a Prometheus text exposition: `name{labels}` → value.
    fn samples(text: &str) -> HashMap<String, f64> {
        text.lines()
            .filter(|line| !line.starts_with('#') && !line.is_empty())
            .map(|line| {
                let (series, value) = line.rsplit_once(' ').unwrap();
                (series.to_owned(), value.parse().unwrap())
            })
            .collect()
    }

    pub(super) async fn metrics(ledger: &Ledger) -> HashMap<String, f64> {
        // Open, like /healthz: no key.
        let response =
            ledger.http.get(format!("{}/metrics", ledger.process.url())).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(content_type.starts_with("application/openmetrics-text"), "{content_type}");
        let text = response.text().await.unwrap();
        assert!(text.ends_with("# EOF\n"), "{text}");
        samples(&text)
    }

    pub(super) fn value(samples: &HashMap<String, f64>, series: &str) -> f64 {
        samples.get(series).copied().unwrap_or(0.0)
    }

    async fn metrics_count_what_the_ledger_does(store: Backend) {
        let ledger =
            Ledger::start(store, &["--hold-ttl-seconds", "1", "--sweep-interval-seconds", "1"])
                .await;
        let before = metrics(&ledger).await;
        assert_eq!(value(&before, "paystile_ledger_holds_total"), 0.0);

        let body = reserve_body("tok_m", "1", "0.1");
        let committed = ledger.hold(&with_key(body.clone(), "once", 'a')).await.charge_id;
        let released = ledger.hold(&body).await.charge_id;
        ledger.hold(&body).await; // left to expire
        assert_eq!(
            ledger.settle(&[(&committed, "commit"), (&released, "release")]).await,
            [SettleStatus::Committed, SettleStatus::Released]
        );
        assert!(ledger.hold(&with_key(body.clone(), "once", 'a')).await.replayed);
        let revoked = ledger.hold(&reserve_body("tok_r", "1", "0.1")).await.charge_id;
        ledger.admin.revoke_token("tok_r").await.unwrap();
        assert_eq!(ledger.settle(&[(&revoked, "commit")]).await, [SettleStatus::Revoked]);
        for _ in 0..2 {
            assert_eq!(ledger.reserve(&reserve_body("tok_m", "1", "0.9")).await.0, 402);
        }
        assert_eq!(ledger.reserve(&reserve_body("tok_r", "1", "0.1")).await.0, 422);

        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let after = loop {
            let after = metrics(&ledger).await;
            if value(&after, "paystile_ledger_expirations_total") >= 1.0 {
                break after;
            }
            assert!(tokio::time::Instant::now() < deadline, "no expiration counted");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        for (series, expected) in [
            ("paystile_ledger_holds_total", 4.0),
            ("paystile_ledger_replays_total", 1.0),
            ("paystile_ledger_commits_total", 1.0),
            ("paystile_ledger_releases_total{reason=\"outcome\"}", 1.0),
            ("paystile_ledger_releases_total{reason=\"revoked\"}", 1.0),
            ("paystile_ledger_expirations_total", 1.0),
            ("paystile_ledger_refusals_total{code=\"token_limit_exceeded\"}", 2.0),
            ("paystile_ledger_refusals_total{code=\"token_revoked\"}", 1.0),
        ] {
            assert_eq!(value(&after, series), expected, "{series}");
        }
        // Latency per route template, never per id; refusals are answered requests too.
        let reserves = "paystile_ledger_http_request_duration_seconds_count\
                        {method=\"POST\",endpoint=\"/v1/holds\",status=\"200\"}";
        assert_eq!(value(&after, reserves), 5.0);
        let refused = "paystile_ledger_http_request_duration_seconds_count\
                       {method=\"POST\",endpoint=\"/v1/holds\",status=\"402\"}";
        assert_eq!(value(&after, refused), 2.0);
        let revokes = "paystile_ledger_http_request_duration_seconds_count\
                       {method=\"POST\",endpoint=\"/v1/tokens/{token_id}/revoke\",status=\"200\"}";
        assert_eq!(value(&after, revokes), 1.0);
        assert!(after.keys().all(|series| !series.contains("tok_")), "an id in a label");
    }

    async fn reserves_settlements_and_refusals_log_json_events_without_secrets(store: Backend) {
        let books = Books::new(store).await;
        let log_dir = TempDir::new().unwrap();
        let log_path = log_dir.path().join("ledger.log");
        let args: Vec<String> = ["--database-url", &books.url(), "--log-format", "json"]
            .iter()
            .map(|a| (*a).to_owned())
            .collect();
        let mut env = envs();
        env.retain(|(k, _)| k != "RUST_LOG");
        env.push(("RUST_LOG".into(), "paystile_ledger=debug".into()));
        let listen = ["--listen".to_owned(), "127.0.0.1:0".to_owned()];
        let process = LedgerProcess::start(
            ledger_binary(),
            &[args.clone(), listen.to_vec()].concat(),
            &env,
            Stdio::from(std::fs::File::create(&log_path).unwrap()),
        )
        .unwrap();
        let admin = AdminClient::new(&process.url(), ADMIN_KEY);
        let ledger = Ledger { process, args, admin, http: reqwest::Client::new(), books };

        let issued = ledger.admin.issue_token(&issue_request("0.15")).await.unwrap();
        let mut body = reserve_body(&issued.token_id, "0.15", "0.1");
        body["token"]["buyerId"] = json!("agent-7");
        let secret_key = "idem-secret-looking-key";
        let hold = ledger.hold(&with_key(body.clone(), secret_key, 'b')).await;
        ledger.settle(&[(&hold.charge_id, "commit")]).await;
        assert_eq!(ledger.reserve(&body).await.0, 402);

        let log = std::fs::read_to_string(&log_path).unwrap();
        for secret in [ADMIN_KEY, GATEWAY_KEY, TOKEN_SECRET, issued.jwt.as_str(), secret_key] {
            assert!(!log.contains(secret), "the log shows a secret: {log}");
        }
        let events: Vec<Value> = log
            .lines()
            .map(|line| serde_json::from_str::<Value>(line).unwrap()["fields"].clone())
            .filter(|fields| fields["event"].is_string())
            .collect();
        let event = |name: &str| {
            events
                .iter()
                .find(|fields| fields["event"] == name)
                .unwrap_or_else(|| panic!("no {name} event in {log}"))
        };
        let held = event("hold");
        assert_eq!(held["charge_id"], hold.charge_id.as_str());
        assert_eq!(held["token_id"], issued.token_id.as_str());
        assert_eq!(
            (&held["buyer_id"], &held["service_id"]),
            (&json!("agent-7"), &json!("weather"))
        );
        assert_eq!((&held["amount_usdc"], &held["idempotent"]), (&json!("0.100000"), &json!(true)));
        let settled = event("settlement");
        assert_eq!(settled["charge_id"], hold.charge_id.as_str());
        assert_eq!(
            (&settled["result"], &settled["upstream_status"]),
            (&json!("committed"), &json!(200))
        );
        let refused = event("refusal");
        assert_eq!(refused["code"], "token_limit_exceeded");
        assert_eq!(refused["token_id"], issued.token_id.as_str());
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
    // A sandbox Pay Token of the buyer first seen at a reserve (minted elsewhere).
    let mut sandbox = reserve_body("tok_sandbox_elsewhere", "5", "3");
    sandbox["token"]["buyerId"] = json!("agent-7");
    sandbox["token"]["sandbox"] = json!(true);
    ledger.hold(&sandbox).await;
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

/// A request the ledger cannot read is a 400 and settles nothing. A readable settlement that
/// does not fit its hold is answered `invalid`, with why, and changes nothing; the others of
/// its request settle (a gateway drops that one and keeps nothing else back).
async fn a_settlement_that_does_not_fit_is_refused_alone(store: Backend) {
    let ledger = Ledger::start(store, &[]).await;
    let body = reserve_body("tok_fit", "10", "0.25");
    let (first, second) = (ledger.hold(&body).await, ledger.hold(&body).await);
    let before = ledger.token("tok_fit").await;
    let ok = json!({"chargeId": first.charge_id, "outcome": "commit"});
    let with = |outcome: &str, amount: Value| json!({"chargeId": second.charge_id, "outcome": outcome, "amountUsdc": amount});
    for (unreadable, message) in [
        (with("commit", json!("0.0000001")), "more than 6 decimals"),
        (with("commit", json!("-0.1")), "negative"),
        (with("commit", json!(0.1)), "decimal strings"),
    ] {
        let (status, answer) = ledger.settle_raw(json!([ok, unreadable])).await;
        assert_eq!(
            (status, answer["code"].as_str()),
            (400, Some("bad_request")),
            "{unreadable}: {answer}"
        );
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains(message), "{unreadable}: {error}");
    }
    assert_eq!(ledger.token("tok_fit").await, before);

    for (misfit, message) in [
        (with("commit", json!("0.250001")), "amountUsdc 0.250001 is more than the 0.250000 held"),
        (with("commit", json!("0")), "amountUsdc must be greater than 0"),
        (with("release", json!("0.1")), "amountUsdc is for commits only"),
    ] {
        let paid = ledger.hold(&body).await;
        let ok = json!({"chargeId": paid.charge_id, "outcome": "commit"});
        let (status, answer) = ledger.settle_raw(json!([ok, misfit])).await;
        assert_eq!(status, 200, "{misfit}: {answer}");
        let results = &answer["results"];
        assert_eq!(results[0]["chargeId"], json!(paid.charge_id));
        assert_eq!(results[0]["status"], "committed", "{answer}");
        assert_eq!(results[1]["chargeId"], json!(second.charge_id));
        assert_eq!(results[1]["status"], "invalid", "{answer}");
        let error = results[1]["error"].as_str().unwrap();
        assert!(error.contains(message), "{misfit}: {error}");
    }
    // The misfit changed nothing: its hold is whole; the three others were committed.
    let second = ledger.admin.charge(&second.charge_id).await.unwrap();
    assert_eq!((second.status, second.held_usdc), (ChargeStatus::Held, usdc("0.25")));
    assert_eq!(ledger.token("tok_fit").await.used_usdc, usdc("0.75"));
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

/// Reserves of several holds at once (`count`): the extras a gateway prefetches for a hot
/// token, each an ordinary hold.
mod prefetched_holds {
    use paystile_protocol::ledger_api::{ChargeQuery, ChargeStatus};

    use super::*;

    on_both_stores! {
        extra_holds_are_open_holds_settled_one_by_one,
        extra_holds_take_at_most_a_quarter_of_what_is_left,
        bad_counts_get_400_and_hold_nothing,
        a_refused_first_hold_brings_no_extra_and_revocation_voids_them,
        a_reserve_read_after_its_gateway_stopped_waiting_gets_no_extras,
        clients_reserving_eight_at_once_never_exceed_the_cap(
            flavor = "multi_thread",
            worker_threads = 4
        ),
    }

    fn asking(mut body: Value, count: u16) -> Value {
        body["count"] = json!(count);
        body
    }

    /// The token's charges that are still held, by id.
    async fn held(ledger: &Ledger, token_id: &str) -> Vec<String> {
        let query = ChargeQuery {
            token_id: Some(token_id.into()),
            status: Some(ChargeStatus::Held),
            ..ChargeQuery::default()
        };
        let page = ledger.admin.charges(&query).await.unwrap();
        let mut ids: Vec<String> = page.charges.into_iter().map(|c| c.charge_id).collect();
        ids.sort();
        ids
    }

    async fn extra_holds_are_open_holds_settled_one_by_one(store: Backend) {
        let ledger = Ledger::start(store, &[]).await;
        let hold = ledger.hold(&asking(reserve_body("tok_pf", "1", "0.01"), 8)).await;
        assert_eq!(hold.extra_charge_ids.len(), 7, "{hold:?}");
        assert_eq!((hold.amount_usdc, hold.replayed), (usdc("0.01"), false));
        // What remains counts every hold of the batch.
        assert_eq!(hold.remaining_usdc, usdc("0.92"));
        let token = ledger.token("tok_pf").await;
        assert_eq!((token.reserved_usdc, token.remaining_usdc), (usdc("0.08"), usdc("0.92")));
        let mut all: Vec<String> = hold.extra_charge_ids.clone();
        all.push(hold.charge_id.clone());
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 8, "charge ids repeat");
        assert_eq!(held(&ledger, "tok_pf").await, all);
        for id in &hold.extra_charge_ids {
            let charge = ledger.admin.charge(id).await.unwrap();
            assert_eq!((charge.status, charge.held_usdc), (ChargeStatus::Held, usdc("0.01")));
            assert_eq!(
                (charge.token_id.as_str(), charge.service_id.as_str()),
                ("tok_pf", "weather")
            );
        }
        let [a, b, c, ..] = &hold.extra_charge_ids[..] else { panic!("{hold:?}") };
        let statuses = ledger.settle(&[(a, "commit"), (b, "release"), (c, "commit")]).await;
        assert_eq!(
            statuses,
            [SettleStatus::Committed, SettleStatus::Released, SettleStatus::Committed]
        );
        assert_eq!(ledger.settle(&[(a, "commit")]).await, [SettleStatus::AlreadyCommitted]);
        let token = ledger.token("tok_pf").await;
        assert_eq!((token.used_usdc, token.reserved_usdc), (usdc("0.02"), usdc("0.05")));
        // An extra commits in part like any hold.
        let (status, answer) = ledger
            .settle_raw(json!([{"chargeId": hold.extra_charge_ids[3], "outcome": "commit", "amountUsdc": "0.004"}]))
            .await;
        assert_eq!(status, 200, "{answer}");
        let token = ledger.token("tok_pf").await;
        assert_eq!((token.used_usdc, token.reserved_usdc), (usdc("0.024"), usdc("0.04")));
    }

    async fn extra_holds_take_at_most_a_quarter_of_what_is_left(store: Backend) {
        let ledger = Ledger::start(store, &[]).await;
        let body = asking(reserve_body("tok_q", "0.1", "0.01"), 64);
        // Left after each first hold: 0.09 (2 extras), 0.06 (1), 0.04 (1), 0.02 (none).
        for (extras, remaining) in [(2, "0.07"), (1, "0.05"), (1, "0.03"), (0, "0.02")] {
            let (status, answer) = ledger.reserve(&body).await;
            assert_eq!(status, 200, "{answer}");
            let ids = answer.get("extraChargeIds").map_or(0, |ids| ids.as_array().unwrap().len());
            assert_eq!(ids, extras, "{answer}");
            assert_eq!(answer["remainingUsdc"], usdc(remaining).to_string());
        }
        let token = ledger.token("tok_q").await;
        assert_eq!(token.reserved_usdc, usdc("0.08"));
        // The first hold is granted as ever, down to the last call's worth.
        ledger.hold(&body).await;
        ledger.hold(&body).await;
        let (status, refusal) = ledger.reserve(&body).await;
        assert_eq!((status, refusal["code"].as_str()), (402, Some("token_limit_exceeded")));

        // The buyer's balance bounds them too: 0.05 available, 0.04 after the first hold.
        ledger.deposit("buyer-1", "0.05", None).await;
        let hold = ledger.hold(&asking(reserve_body("tok_funded", "1", "0.01"), 64)).await;
        assert_eq!(hold.extra_charge_ids.len(), 1);
        assert_eq!(ledger.account("buyer-1").await.held_usdc, usdc("0.02"));
    }

    async fn bad_counts_get_400_and_hold_nothing(store: Backend) {
        let ledger = Ledger::start(store, &[]).await;
        let body = reserve_body("tok_bad", "1", "0.01");
        for (count, message) in [
            (json!(0), "count must be 1 to 64"),
            (json!(65), "count must be 1 to 64"),
            (json!(-1), "count"),
            (json!(70_000), "count"),
            (json!("8"), "count"),
        ] {
            let mut bad = body.clone();
            bad["count"] = count.clone();
            let (status, answer) = ledger.reserve(&bad).await;
            assert_eq!(
                (status, answer["code"].as_str()),
                (400, Some("bad_request")),
                "{count}: {answer}"
            );
            assert!(answer["error"].as_str().unwrap().contains(message), "{count}: {answer}");
        }
        let idempotent = asking(with_key(body.clone(), "order-1", 'a'), 2);
        let (status, answer) = ledger.reserve(&idempotent).await;
        assert_eq!(status, 400, "{answer}");
        assert_eq!(answer["error"], "count must be 1 with an idempotency key");
        // Nothing held, nor even the token registered.
        assert!(ledger.admin.token("tok_bad").await.is_err());
        // count 1 with a key is the plain idempotent reserve.
        let hold = ledger.hold(&asking(with_key(body, "order-1", 'a'), 1)).await;
        assert!(hold.extra_charge_ids.is_empty());
    }

    async fn a_refused_first_hold_brings_no_extra_and_revocation_voids_them(store: Backend) {
        let ledger = Ledger::start(store, &[]).await;
        // 0.015 left: the first hold of 0.02 does not fit, so nothing is held at all.
        let spent = ledger.hold(&reserve_body("tok_r", "0.1", "0.085")).await;
        let (status, refusal) =
            ledger.reserve(&asking(reserve_body("tok_r", "0.1", "0.02"), 8)).await;
        assert_eq!((status, refusal["code"].as_str()), (402, Some("token_limit_exceeded")));
        assert_eq!(held(&ledger, "tok_r").await, [spent.charge_id]);
        assert_eq!(ledger.token("tok_r").await.reserved_usdc, usdc("0.085"));

        let issued = ledger.admin.issue_token(&issue_request("1")).await.unwrap();
        let hold = ledger.hold(&asking(reserve_body(&issued.token_id, "1", "0.01"), 4)).await;
        assert_eq!(hold.extra_charge_ids.len(), 3);
        ledger.admin.revoke_token(&issued.token_id).await.unwrap();
        let settlements: Vec<(&str, &str)> =
            hold.extra_charge_ids.iter().map(|id| (id.as_str(), "commit")).collect();
        assert_eq!(ledger.settle(&settlements).await, [SettleStatus::Revoked; 3]);
        let (status, refusal) =
            ledger.reserve(&asking(reserve_body(&issued.token_id, "1", "0.01"), 4)).await;
        assert_eq!((status, refusal["code"].as_str()), (422, Some("token_revoked")));
        let token = ledger.token(&issued.token_id).await;
        assert_eq!((token.used_usdc, token.reserved_usdc), (Usdc::ZERO, usdc("0.01")));
    }

    async fn a_reserve_read_after_its_gateway_stopped_waiting_gets_no_extras(store: Backend) {
        let ledger = Ledger::start(store, &[]).await;
        let now_ms = unix_now() * 1000;
        let until = |ms: u64| {
            let mut body = asking(reserve_body("tok_late", "1", "0.01"), 4);
            body["extrasUntilMs"] = json!(ms);
            body
        };
        // The gateway still waits: extras as usual.
        let waited = ledger.hold(&until(now_ms + 60_000)).await;
        assert_eq!(waited.extra_charge_ids.len(), 3);
        // It stopped waiting a second ago: the first hold only, the budget not held for
        // extras nobody will take.
        let late = ledger.hold(&until(now_ms - 1_000)).await;
        assert!(late.extra_charge_ids.is_empty(), "{late:?}");
        assert_eq!(ledger.token("tok_late").await.reserved_usdc, usdc("0.05"));
        let metrics = operability::metrics(&ledger).await;
        assert_eq!(operability::value(&metrics, "paystile_ledger_late_prefetches_total"), 1.0);
    }

    /// 16 clients each reserve 8 holds at a time and commit all they get, until refused: the
    /// token's used plus reserved never passes its cap, and in the end used is exactly what
    /// the commits charged.
    async fn clients_reserving_eight_at_once_never_exceed_the_cap(store: Backend) {
        const CAP: &str = "0.05";
        let ledger = Arc::new(Ledger::start(store, &[]).await);
        let body = asking(reserve_body("tok_pool", CAP, "0.001"), 8);
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let (ledger, done) = (ledger.clone(), done.clone());
            tokio::spawn(async move {
                let mut looks = 0;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(token) = ledger.admin.token("tok_pool").await {
                        let spent = token.used_usdc.checked_add(token.reserved_usdc).unwrap();
                        assert!(spent <= usdc(CAP), "overspent: {token:?}");
                        looks += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                looks
            })
        };
        let clients = (0..16).map(|_| {
            let (ledger, body) = (ledger.clone(), body.clone());
            tokio::spawn(async move {
                let mut committed = 0u64;
                for _ in 0..100 {
                    let (status, answer) = ledger.reserve(&body).await;
                    if status == 402 {
                        assert_eq!(answer["code"], "token_limit_exceeded");
                        return committed;
                    }
                    assert_eq!(status, 200, "{answer}");
                    let hold: Hold = serde_json::from_value(answer).unwrap();
                    let mut ids = hold.extra_charge_ids.clone();
                    ids.push(hold.charge_id);
                    let settlements: Vec<(&str, &str)> =
                        ids.iter().map(|id| (id.as_str(), "commit")).collect();
                    let statuses = ledger.settle(&settlements).await;
                    assert!(statuses.iter().all(|s| *s == SettleStatus::Committed), "{statuses:?}");
                    committed += u64::try_from(ids.len()).unwrap();
                }
                panic!("never refused after 100 reserves");
            })
        });
        let mut committed = 0;
        for client in clients {
            committed += client.await.unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(watcher.await.unwrap() > 0, "the watcher never looked");
        let token = ledger.token("tok_pool").await;
        assert_eq!(committed, 50, "holds committed");
        assert_eq!((token.used_usdc, token.reserved_usdc), (usdc(CAP), Usdc::ZERO));
    }
}

/// The revocation feed gateway VMs watch, and revokes that wait for them to apply it.
mod revocation_watch {
    use super::*;

    on_both_stores! {
        a_revoke_reaches_every_watcher_and_answers_once_they_applied_it(
            flavor = "multi_thread",
            worker_threads = 4
        ),
        bad_watch_requests_get_400_or_401(flavor = "multi_thread", worker_threads = 2),
        entries_an_hour_old_are_forgotten_but_never_the_head(
            flavor = "multi_thread",
            worker_threads = 2
        ),
    }

    /// `GET /v1/revocations` as gateway VM `watcher` asks it.
    async fn watch(url: String, watcher: &'static str, after: Option<u64>) -> (u16, Value) {
        let mut query = vec![("watcher", watcher.to_owned())];
        query.extend(after.map(|after| ("after", after.to_string())));
        let response = reqwest::Client::new()
            .get(format!("{url}/v1/revocations"))
            .query(&query)
            .bearer_auth(GATEWAY_KEY)
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
    }

    /// A poll that waits: answered with entries past `after`.
    fn poll(url: &str, watcher: &'static str, after: u64) -> tokio::task::JoinHandle<(u16, Value)> {
        tokio::spawn(watch(url.to_owned(), watcher, Some(after)))
    }

    fn fed(answer: (u16, Value)) -> (u64, Vec<String>) {
        assert_eq!(answer.0, 200, "{}", answer.1);
        let feed: paystile_protocol::ledger_api::RevocationFeed =
            serde_json::from_value(answer.1).unwrap();
        (feed.seq, feed.token_ids)
    }

    fn prefetching(token_id: &str) -> Value {
        let mut body = reserve_body(token_id, "1", "0.01");
        body["count"] = json!(4);
        body
    }

    fn names(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    async fn a_revoke_reaches_every_watcher_and_answers_once_they_applied_it(store: Backend) {
        let ledger = Ledger::start(store, &[]).await;
        // With shared books, the VMs watch another ledger process than the one revoking.
        let other = match &ledger.books {
            Books::Postgres(database) => {
                Some(Ledger::start_on(Books::Postgres(database.clone()), &[]))
            }
            Books::Sqlite(_) => None,
        };
        let url = other.as_ref().unwrap_or(&ledger).process.url();
        let (start, none) = fed(watch(url.clone(), "vm-a", None).await);
        assert_eq!((start, none.len()), (0, 0));
        fed(watch(url.clone(), "vm-b", None).await);

        // A token without open holds: nothing any VM could have prefetched, nothing to wait for.
        ledger
            .settle(&[(
                &ledger.hold(&reserve_body("tok_idle", "1", "0.01")).await.charge_id,
                "commit",
            )])
            .await;
        let idle = ledger.admin.revoke_token("tok_idle").await.unwrap();
        assert_eq!(idle.gateways, Some(Default::default()));

        // A token with prefetched holds, and a child of it with a hold of its own.
        ledger.hold(&prefetching("tok_hot")).await;
        let issued = ledger.admin.issue_token(&issue_request("1")).await.unwrap();
        let child = ledger.child(&issued.token_id, "0.5").await;
        let child_reserve = json!({"credential": format!("Bearer {}", child.jwt),
            "serviceId": "weather", "priceUsdc": "0.01", "count": 4});
        ledger.hold(&child_reserve).await;

        let (a, b) = (poll(&url, "vm-a", start), poll(&url, "vm-b", start));
        let admin = ledger.admin.clone();
        let parent = issued.token_id.clone();
        let revoke = tokio::spawn(async move { admin.revoke_token(&parent).await.unwrap() });
        // Each watcher hears of the descendant with open holds (the parent has none).
        let (seq, tokens) = fed(a.await.unwrap());
        assert_eq!(tokens, std::slice::from_ref(&child.token_id));
        assert!(seq > start);
        assert_eq!(fed(b.await.unwrap()), (seq, tokens));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!revoke.is_finished(), "the revoke answered before any VM applied it");
        // vm-a's next poll says it applied it; the revoke still waits for vm-b.
        let a = poll(&url, "vm-a", seq);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!revoke.is_finished(), "the revoke answered before vm-b applied it");
        let b = poll(&url, "vm-b", seq);
        let revoked = revoke.await.unwrap();
        assert!(revoked.revoked);
        let gateways = revoked.gateways.unwrap();
        assert_eq!((gateways.confirmed, gateways.unconfirmed), (names(&["vm-a", "vm-b"]), vec![]));

        // vm-b stops asking: the next revoke answers at its timeout, naming it.
        let revoked = ledger.admin.revoke_token("tok_hot");
        let (revoked, a_heard, b_heard) = tokio::join!(
            revoked,
            async {
                let (next, tokens) = fed(a.await.unwrap());
                // vm-a applies it and asks again.
                let again = poll(&url, "vm-a", next);
                (tokens, again)
            },
            b
        );
        let (a_tokens, a_again) = a_heard;
        assert_eq!(a_tokens, ["tok_hot"]);
        assert_eq!(fed(b_heard.unwrap()).1, ["tok_hot"]);
        let gateways = revoked.unwrap().gateways.unwrap();
        assert_eq!(
            (gateways.confirmed, gateways.unconfirmed),
            (names(&["vm-a"]), names(&["vm-b"]))
        );

        // The panic button feeds the buyer's tokens that have open holds.
        ledger.hold(&prefetching("tok_b1")).await;
        ledger.hold(&prefetching("tok_b2")).await;
        let panic = ledger.admin.revoke_buyer("buyer-1");
        let (panic, heard) = tokio::join!(panic, async {
            let (next, mut tokens) = fed(a_again.await.unwrap());
            tokens.sort();
            let again = poll(&url, "vm-a", next);
            (tokens, again)
        });
        let (tokens, again) = heard;
        // tok_hot, revoked before, still has open holds: fed again, as a second revoke is.
        assert_eq!(tokens, ["tok_b1", "tok_b2", "tok_hot"]);
        let panic = panic.unwrap();
        assert_eq!(panic.gateways.confirmed, names(&["vm-a"]));
        // vm-b is still within its liveness (it asked less than a poll's wait ago).
        assert_eq!(panic.gateways.unconfirmed, names(&["vm-b"]));
        again.abort();
    }

    async fn entries_an_hour_old_are_forgotten_but_never_the_head(store: Backend) {
        let mut ledger = Ledger::start(store, &[]).await;
        for token in ["tok_old1", "tok_old2"] {
            ledger.hold(&prefetching(token)).await;
            ledger.admin.revoke_token(token).await.unwrap();
        }
        let url = ledger.process.url();
        let (head, tokens) = fed(watch(url, "vm-a", Some(0)).await);
        assert_eq!(tokens, ["tok_old1", "tok_old2"]);

        // Two hours later the sweeper forgets the entries, all but the head.
        ledger.restart_with(&["--clock-offset-seconds", "7200"]);
        let url = ledger.process.url();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (seq, tokens) = fed(watch(url.clone(), "vm-a", Some(0)).await);
            assert_eq!(seq, head, "the head moved");
            if tokens == ["tok_old2"] {
                break;
            }
            assert_eq!(tokens, ["tok_old1", "tok_old2"]);
            assert!(tokio::time::Instant::now() < deadline, "the old entry was never forgotten");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // A new watcher starts at the head, and the next revocation comes after it.
        assert_eq!(fed(watch(url.clone(), "vm-new", None).await), (head, vec![]));
        ledger.hold(&prefetching("tok_new")).await;
        ledger.admin.revoke_token("tok_new").await.unwrap();
        assert_eq!(fed(watch(url, "vm-new", Some(head)).await).1, ["tok_new"]);
    }

    async fn bad_watch_requests_get_400_or_401(store: Backend) {
        let ledger = Ledger::start(store, &[]).await;
        let url = format!("{}/v1/revocations", ledger.process.url());
        let http = reqwest::Client::new();
        let unkeyed = http.get(&url).query(&[("watcher", "vm-a")]).send().await.unwrap();
        assert_eq!(unkeyed.status(), 401);
        let admin_keyed =
            http.get(&url).query(&[("watcher", "vm-a")]).bearer_auth(ADMIN_KEY).send().await;
        assert_eq!(admin_keyed.unwrap().status(), 401);
        for query in [
            "",
            "?watcher=",
            "?watcher=vm-a&after=-1",
            "?watcher=vm-a&after=x",
            "?watcher=vm-a&since=3",
            "?watcher=vm%00a",
        ] {
            let answer = http.get(format!("{url}{query}")).bearer_auth(GATEWAY_KEY).send().await;
            let answer = answer.unwrap();
            assert_eq!(answer.status(), 400, "{query}");
            let body: Value = answer.json().await.unwrap();
            assert_eq!(body["code"], "bad_request", "{query}: {body}");
            assert!(!body["error"].as_str().unwrap().is_empty());
        }
        // None of them counts as a watcher: a revoke with open holds waits for nobody.
        ledger.hold(&prefetching("tok_w")).await;
        let revoked = ledger.admin.revoke_token("tok_w").await.unwrap();
        assert_eq!(revoked.gateways, Some(Default::default()));
    }
}

/// x402 payments at the ledger, as any gateway sharing it presents them: verified here,
/// signature included, each a one-call token; settled after commit (here against a node
/// that does not answer, so each attempt is retried and says why).
mod x402_payments {
    use paystile_protocol::x402::{self, B256, Offer, SigningKey, Terms, Version};

    use super::*;

    on_both_stores! {
        a_payment_pays_one_call_once_and_its_settlement_waits_for_the_chain,
        payments_that_do_not_pay_for_the_call_are_refused_as_x402_does,
        one_payment_on_two_gateways_at_once_pays_one_call(
            flavor = "multi_thread",
            worker_threads = 4
        ),
    }

    /// Two gateways present one payment at the same moment, many times over: one hold each
    /// time, the other refused.
    async fn one_payment_on_two_gateways_at_once_pays_one_call(store: Backend) {
        let ledger = Arc::new(ledger(store).await);
        let key = SigningKey::from_slice(&[0x35; 32]).unwrap();
        for _ in 0..20 {
            let credential = payment(&key, 1000, now() + 60);
            let reserve =
                |ledger: Arc<Ledger>, body: Value| async move { ledger.reserve(&body).await };
            let body = body(&credential, "0.001");
            let (a, b) = tokio::join!(
                tokio::spawn(reserve(ledger.clone(), body.clone())),
                tokio::spawn(reserve(ledger.clone(), body))
            );
            let mut answers = [a.unwrap(), b.unwrap()];
            answers.sort_by_key(|(status, _)| *status);
            assert_eq!(answers[0].0, 200, "{answers:?}");
            assert_eq!(
                (answers[1].0, answers[1].1["code"].as_str()),
                (402, Some("payment_already_used"))
            );
        }
    }

    const ASSET: &str = "0x5FbDB2315678afecb367f032d93F642f64180aa3";
    const PAY_TO: &str = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC";

    fn offer() -> Offer {
        Offer {
            chain_id: 31337,
            asset: ASSET.parse().unwrap(),
            name: "USD Coin".into(),
            version: "2".into(),
            pay_to: PAY_TO.parse().unwrap(),
            max_timeout_seconds: 60,
        }
    }

    /// A ledger taking [`offer`], settling directly through a node nobody listens for.
    async fn ledger(store: Backend) -> Ledger {
        Ledger::start(
            store,
            &[
                "--x402-network=eip155:31337",
                &format!("--x402-pay-to={PAY_TO}"),
                &format!("--x402-asset={ASSET}"),
                "--x402-asset-name=USD Coin",
                "--x402-asset-version=2",
                "--x402-settlement=direct",
                "--x402-rpc-url=http://127.0.0.1:9",
                "--x402-settler-key=0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
            ],
        )
        .await
    }

    fn payment(key: &SigningKey, amount: u64, valid_before: u64) -> String {
        let terms = Terms {
            offer: &offer(),
            amount,
            window: (0, valid_before),
            nonce: B256::from(rand::random::<[u8; 32]>()),
        };
        format!("x402v2 {}", x402::sign(key, &terms, Version::V2))
    }

    fn body(credential: &str, price: &str) -> Value {
        json!({"credential": credential, "serviceId": "weather", "priceUsdc": price})
    }

    fn now() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
    }

    async fn a_payment_pays_one_call_once_and_its_settlement_waits_for_the_chain(store: Backend) {
        let ledger = ledger(store).await;
        let key = SigningKey::from_slice(&[0x31; 32]).unwrap();
        let payer = x402::address_of(key.verifying_key());
        let credential = payment(&key, 1000, now() + 60);
        let hold = ledger.hold(&body(&credential, "0.001")).await;
        assert_eq!((hold.amount_usdc, hold.remaining_usdc), (usdc("0.001"), Usdc::ZERO));
        // Again, before or after its call is settled: the authorization has paid.
        for round in 0..2 {
            let (status, refusal) = ledger.reserve(&body(&credential, "0.001")).await;
            assert_eq!((status, refusal["code"].as_str()), (402, Some("payment_already_used")));
            if round == 0 {
                assert_eq!(
                    ledger.settle(&[(&hold.charge_id, "commit")]).await,
                    [SettleStatus::Committed]
                );
            }
        }
        let charge = ledger.admin.charge(&hold.charge_id).await.unwrap();
        assert_eq!(charge.buyer_id, format!("x402_0x{}", hex::encode(payer)));
        assert!(charge.token_id.starts_with("x402_"), "{charge:?}");
        // The node does not answer: the settlement stays pending, saying why.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let settlement = loop {
            let charge = ledger.admin.charge(&hold.charge_id).await.unwrap();
            let settlement = charge.settlement.unwrap();
            if settlement.reason.is_some() {
                break settlement;
            }
            assert!(tokio::time::Instant::now() < deadline, "{settlement:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(settlement.status, "pending");
        assert!(settlement.reason.unwrap().contains("did not answer"));
        // x402 payers have no account.
        let (status, answer) = ledger
            .post(
                &format!("/v1/buyers/{}/deposits", charge.buyer_id),
                Some(ADMIN_KEY),
                r#"{"amountUsdc":"1"}"#,
            )
            .await;
        assert_eq!(status, 400, "{answer}");
    }

    async fn payments_that_do_not_pay_for_the_call_are_refused_as_x402_does(store: Backend) {
        let ledger = ledger(store).await;
        let key = SigningKey::from_slice(&[0x32; 32]).unwrap();
        let forged = {
            let stranger = SigningKey::from_slice(&[0x33; 32]).unwrap();
            let header = payment(&stranger, 1000, now() + 60);
            let header = header.trim_start_matches("x402v2 ");
            let mut json: Value = serde_json::from_slice(
                &base64::engine::general_purpose::STANDARD.decode(header).unwrap(),
            )
            .unwrap();
            json["payload"]["authorization"]["from"] =
                json!(x402::address_of(key.verifying_key()).to_checksum(None));
            format!("x402v2 {}", base64::engine::general_purpose::STANDARD.encode(json.to_string()))
        };
        let cases = [
            (forged, "0.001", "signature"),
            (payment(&key, 1000, now() + 60), "0.002", "value_mismatch"),
            (payment(&key, 1000, now() + 3), "0.001", "valid_before"),
            (payment(&key, 1000, now() + 3600), "0.001", "valid_before"),
            ("x402v2 bm90IGpzb24=".into(), "0.001", "invalid_payload"),
        ];
        for (credential, price, reason) in cases {
            let (status, refusal) = ledger.reserve(&body(&credential, price)).await;
            assert_eq!(
                (status, refusal["code"].as_str()),
                (402, Some("invalid_payment")),
                "{refusal}"
            );
            assert!(refusal["error"].as_str().unwrap().contains(reason), "{refusal}");
        }
        // Without x402 settings the ledger takes no payment: nothing proves who pays.
        let plain = Ledger::start(store, &[]).await;
        let (status, refusal) =
            plain.reserve(&body(&payment(&key, 1000, now() + 60), "0.001")).await;
        assert_eq!((status, refusal["code"].as_str()), (401, Some("invalid_credential")));
    }
}

mod x402_settling_first {
    use paystile_protocol::x402::{self, B256, Offer, SigningKey, Terms, Version};

    use super::*;

    on_both_stores! {
        a_payment_the_chain_cannot_settle_in_time_is_503_and_its_hold_released,
    }

    /// With `settleUntilMs`, a ledger whose node does not answer cannot settle before the
    /// gateway's deadline: 503, the hold released, nothing charged; the payment is still
    /// pending (nothing was sent), and may pay a later call.
    async fn a_payment_the_chain_cannot_settle_in_time_is_503_and_its_hold_released(
        store: Backend,
    ) {
        let pay_to = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC";
        let asset = "0x5FbDB2315678afecb367f032d93F642f64180aa3";
        let ledger = Ledger::start(
            store,
            &[
                "--x402-network=eip155:31337",
                &format!("--x402-pay-to={pay_to}"),
                &format!("--x402-asset={asset}"),
                "--x402-asset-name=USD Coin",
                "--x402-asset-version=2",
                "--x402-settlement=direct",
                "--x402-rpc-url=http://127.0.0.1:9",
                "--x402-settler-key=0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
            ],
        )
        .await;
        let offer = Offer {
            chain_id: 31337,
            asset: asset.parse().unwrap(),
            name: "USD Coin".into(),
            version: "2".into(),
            pay_to: pay_to.parse().unwrap(),
            max_timeout_seconds: 60,
        };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        let key = SigningKey::from_slice(&[0x34; 32]).unwrap();
        let terms = Terms {
            offer: &offer,
            amount: 1000,
            window: (0, now.as_secs() + 60),
            nonce: B256::repeat_byte(5),
        };
        let header = x402::sign(&key, &terms, Version::V2);
        let until = u64::try_from(now.as_millis()).unwrap() + 2_000;
        let body = json!({
            "credential": format!("x402v2 {header}"), "serviceId": "weather",
            "priceUsdc": "0.001", "settleUntilMs": until,
        });
        let (status, refusal) = ledger.reserve(&body).await;
        assert_eq!(
            (status, refusal["code"].as_str()),
            (503, Some("ledger_unavailable")),
            "{refusal}"
        );
        let payment = x402::Payment::decode(header.as_bytes(), Version::V2).unwrap();
        let checked = payment.check(&[offer], 1000, now.as_secs()).unwrap();
        let token = ledger.token(&x402::token_id(&checked.payment_id)).await;
        assert_eq!((token.reserved_usdc, token.used_usdc), (Usdc::ZERO, Usdc::ZERO));
    }
}

// Buyer keys: a buyer's own API, and nothing else.

/// A buyer key, created through the admin API.
async fn buyer_key(ledger: &Ledger, buyer_id: &str, request: &BuyerKeyRequest) -> IssuedBuyerKey {
    ledger.admin.create_buyer_key(buyer_id, request).await.unwrap()
}

fn own_token_request(service: &str, limit: &str) -> BuyerTokenRequest {
    BuyerTokenRequest {
        service_id: service.into(),
        limit_usdc: usdc(limit),
        buyer_tag: None,
        expires_at: None,
        ttl_seconds: Some(600),
    }
}

/// A call paid with `jwt` for `service`, reserved and committed: its charge id.
async fn charged(ledger: &Ledger, jwt: &str, service: &str, price: &str) -> String {
    let body =
        json!({"credential": format!("Bearer {jwt}"), "serviceId": service, "priceUsdc": price});
    let (status, hold) = ledger.post("/v1/holds", Some(GATEWAY_KEY), &body.to_string()).await;
    assert_eq!(status, 200, "{hold}");
    let charge_id = hold["chargeId"].as_str().unwrap().to_owned();
    assert_eq!(ledger.settle(&[(&charge_id, "commit")]).await, [SettleStatus::Committed]);
    charge_id
}

/// `method path` with `key`: the status and the error code.
async fn answer(ledger: &Ledger, method: &str, path: &str, key: Option<&str>) -> (u16, Value) {
    let url = format!("{}{path}", ledger.process.url());
    let mut request = ledger
        .http
        .request(method.parse().unwrap(), url)
        .header("content-type", "application/json")
        .body("{}");
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Every endpoint a buyer key reaches answers for its own buyer only: another buyer's
/// tokens and charges are not found, and nothing of theirs changes; a buyer key on an
/// admin endpoint is forbidden, the admin key on a buyer's; a wrong, revoked or unknown key
/// gets the same 401.
async fn buyer_keys_reach_their_own_buyer_only(store: Backend) {
    let ledger = Ledger::start(store, &["--services", "weather"]).await;
    for buyer in ["alice", "bob"] {
        ledger.deposit(buyer, "5", None).await;
    }
    let alice_key = buyer_key(&ledger, "alice", &BuyerKeyRequest::default()).await;
    let bob_key = buyer_key(&ledger, "bob", &BuyerKeyRequest::default()).await;
    assert!(alice_key.key.starts_with("pbk_") && alice_key.key != bob_key.key);
    let alice = BuyerClient::new(&ledger.process.url(), &alice_key.key);
    let bob = BuyerClient::new(&ledger.process.url(), &bob_key.key);
    let alices = alice.issue_token(&own_token_request("weather", "1")).await.unwrap();
    let bobs = bob.issue_token(&own_token_request("weather", "1")).await.unwrap();
    let bobs_charge = charged(&ledger, &bobs.jwt, "weather", "0.25").await;
    let alices_charge = charged(&ledger, &alices.jwt, "weather", "0.1").await;

    // Alice's key on Bob's things: not found, every way in.
    let not_found = |(status, body): (u16, Value)| {
        assert_eq!((status, body["code"].as_str()), (404, Some("not_found")), "{body}");
    };
    let bob_token = &bobs.token_id;
    not_found(
        answer(&ledger, "GET", &format!("/v1/me/tokens/{bob_token}"), Some(&alice_key.key)).await,
    );
    not_found(
        answer(&ledger, "POST", &format!("/v1/me/tokens/{bob_token}/revoke"), Some(&alice_key.key))
            .await,
    );
    let child = json!({"limitUsdc": "0.1"}).to_string();
    let children = format!("/v1/me/tokens/{bob_token}/children");
    not_found(ledger.post(&children, Some(&alice_key.key), &child).await);
    not_found(
        answer(&ledger, "GET", &format!("/v1/me/charges/{bobs_charge}"), Some(&alice_key.key))
            .await,
    );
    not_found(answer(&ledger, "GET", "/v1/me/charges?buyerId=bob", Some(&alice_key.key)).await);
    let by_bobs_token = ChargeQuery { token_id: Some(bob_token.clone()), ..Default::default() };
    assert!(alice.charges(&by_bobs_token).await.unwrap().charges.is_empty());
    let (csv, _) = alice.charges_csv(&by_bobs_token).await.unwrap();
    assert_eq!(csv.lines().count(), 1, "only the header: {csv}");

    // Alice sees her own, and only hers.
    let me = alice.me().await.unwrap();
    assert_eq!(me.buyer_id, "alice");
    let tokens: Vec<&str> = me.tokens.iter().map(|t| t.token_id.as_str()).collect();
    assert_eq!(tokens, [alices.token_id.as_str()]);
    assert_eq!(me.tokens[0].used_usdc, usdc("0.1"));
    assert_eq!(me.account.unwrap().balance_usdc, usdc("4.9"));
    let page = alice.charges(&ChargeQuery::default()).await.unwrap();
    let charges: Vec<&str> = page.charges.iter().map(|c| c.charge_id.as_str()).collect();
    assert_eq!(charges, [alices_charge.as_str()]);
    assert_eq!(alice.charge(&alices_charge).await.unwrap().buyer_id, "alice");
    let (csv, _) = alice.charges_csv(&ChargeQuery::default()).await.unwrap();
    assert!(csv.contains(&alices_charge) && !csv.contains(&bobs_charge), "{csv}");

    // Her panic button and kill switch reach her tokens alone.
    let child = alice.mint_child(&alices.token_id, &child_request("0.2")).await.unwrap();
    assert_eq!(
        alice.token(&child.token_id).await.unwrap().parent_id.as_deref(),
        Some(alices.token_id.as_str())
    );
    assert!(alice.revoke_token(&child.token_id).await.unwrap().revoked);
    assert_eq!(alice.revoke_all().await.unwrap().revoked_tokens, 1);
    assert!(ledger.token(&alices.token_id).await.revoked);
    let bobs_view = ledger.token(bob_token).await;
    assert!(!bobs_view.revoked, "Bob's token was revoked by Alice's key");
    assert_eq!(bobs_view.used_usdc, usdc("0.25"));
    assert_eq!(ledger.admin.buyer("bob").await.unwrap().tokens.len(), 1, "a child under Bob's");

    // A buyer key on every admin endpoint: forbidden, and nothing done.
    let admin_endpoints = [
        ("POST", "/v1/tokens".to_owned()),
        ("GET", format!("/v1/tokens/{bob_token}")),
        ("POST", format!("/v1/tokens/{bob_token}/revoke")),
        ("POST", format!("/v1/tokens/{bob_token}/children")),
        ("GET", "/v1/buyers/bob".to_owned()),
        ("POST", "/v1/buyers/alice/deposits".to_owned()),
        ("PUT", "/v1/buyers/alice/tier".to_owned()),
        ("POST", "/v1/buyers/bob/revoke".to_owned()),
        ("POST", "/v1/buyers/alice/keys".to_owned()),
        ("GET", "/v1/buyers/bob/keys".to_owned()),
        ("POST", format!("/v1/buyers/bob/keys/{}/revoke", bob_key.view.key_id)),
        ("GET", format!("/v1/charges/{bobs_charge}")),
        ("GET", "/v1/charges".to_owned()),
        ("GET", "/v1/charges.csv".to_owned()),
        ("GET", "/v1/services".to_owned()),
        ("GET", "/v1/services/weather/summary".to_owned()),
        ("GET", "/v1/services/weather/series".to_owned()),
        ("GET", "/v1/top-spenders".to_owned()),
        ("POST", "/v1/sandbox/payments".to_owned()),
    ];
    for (method, path) in &admin_endpoints {
        let (status, body) = answer(&ledger, method, path, Some(&alice_key.key)).await;
        assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")), "{method} {path}");
    }
    assert!(!ledger.token(bob_token).await.revoked);
    assert_eq!(ledger.admin.buyer_keys("bob").await.unwrap().keys[0].revoked_at, None);

    // The admin key on a buyer's endpoints: forbidden (it has no buyer of its own).
    let me_endpoints = [
        ("GET", "/v1/me".to_owned()),
        ("POST", "/v1/me/tokens".to_owned()),
        ("GET", format!("/v1/me/tokens/{bob_token}")),
        ("POST", format!("/v1/me/tokens/{bob_token}/revoke")),
        ("POST", format!("/v1/me/tokens/{bob_token}/children")),
        ("POST", "/v1/me/revoke".to_owned()),
        ("GET", "/v1/me/charges".to_owned()),
        ("GET", "/v1/me/charges.csv".to_owned()),
        ("GET", format!("/v1/me/charges/{bobs_charge}")),
    ];
    for (method, path) in &me_endpoints {
        let (status, body) = answer(&ledger, method, path, Some(ADMIN_KEY)).await;
        assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")), "{method} {path}");
    }

    // Unknown, revoked, malformed or missing: one 401, whatever the endpoint.
    ledger.admin.revoke_buyer_key("bob", &bob_key.view.key_id).await.unwrap();
    let unknown = format!("pbk_{}", "0".repeat(64));
    let mut unauthorized = Vec::new();
    for key in
        [Some(bob_key.key.as_str()), Some(unknown.as_str()), Some("pbk_"), Some(GATEWAY_KEY), None]
    {
        for (method, path) in
            me_endpoints.iter().chain(&admin_endpoints).chain(&[("GET", "/v1/whoami".to_owned())])
        {
            let (status, body) = answer(&ledger, method, path, key).await;
            assert_eq!(status, 401, "{method} {path} {key:?}");
            unauthorized.push(body);
        }
    }
    assert!(unauthorized.windows(2).all(|pair| pair[0] == pair[1]), "401s differ");
    assert!(!ledger.token(bob_token).await.revoked, "a revoked key still revoked");

    // The keys as the admin lists them: last used, revoked, never the key.
    let keys = ledger.admin.buyer_keys("alice").await.unwrap().keys;
    assert_eq!(keys.len(), 1);
    assert!(keys[0].last_used_at.is_some() && keys[0].revoked_at.is_none());
    let listed = serde_json::to_string(&keys).unwrap();
    assert!(!listed.contains(&alice_key.key));
    let bobs_keys = ledger.admin.buyer_keys("bob").await.unwrap().keys;
    assert!(bobs_keys[0].revoked_at.is_some());
    let whoami = alice.whoami().await.unwrap();
    assert_eq!((whoami.role, whoami.services), (Role::Buyer, vec!["weather".to_owned()]));
    assert_eq!(whoami.key.unwrap().buyer_id, "alice");
}

/// A buyer issues tokens for itself within its balance, its tier's daily limit and what
/// its key allows; each refusal says why, and issues nothing. What it issues pays.
async fn buyers_issue_tokens_within_their_balance_tier_and_key(store: Backend) {
    let ledger =
        Ledger::start(store, &["--services", "weather,maps", "--daily-limits-usdc", "3,100"]).await;
    let key = buyer_key(&ledger, "carol", &BuyerKeyRequest::default()).await;
    let carol = BuyerClient::new(&ledger.process.url(), &key.key);
    let refused = async |request: BuyerTokenRequest, says: &str| match carol
        .issue_token(&request)
        .await
        .unwrap_err()
    {
        ClientError::Refused { status, body } => {
            assert_eq!((status, body.code), (400, ErrorCode::BadRequest));
            assert!(body.error.contains(says), "{:?} does not say {says:?}", body.error);
        }
        other => panic!("{other}"),
    };
    refused(own_token_request("weather", "1"), "no prepaid balance").await;
    ledger.deposit("carol", "5", None).await;
    refused(own_token_request("weather", "5.000001"), "above your available balance, 5.000000")
        .await;
    refused(own_token_request("weather", "3.5"), "above your tier's daily limit, 3.000000").await;
    refused(own_token_request("nope", "1"), "unknown service \"nope\"").await;
    let past = BuyerTokenRequest {
        expires_at: Some("2020-01-01T00:00:00Z".into()),
        ttl_seconds: None,
        ..own_token_request("weather", "1")
    };
    refused(past, "expire in the future").await;
    refused(own_token_request("weather", "0"), "greater than 0").await;
    assert!(carol.me().await.unwrap().tokens.is_empty(), "a refused request issued a token");

    // Within every bound: a token that pays, for Carol.
    let issued = carol.issue_token(&own_token_request("weather", "3")).await.unwrap();
    let claims = pay_token::verify(
        &issued.jwt,
        &[Key::hs256(TOKEN_SECRET)],
        &Validation::default(),
        unix_now(),
    )
    .unwrap();
    assert_eq!((claims.sub.as_str(), claims.service_id.as_deref()), ("carol", Some("weather")));
    charged(&ledger, &issued.jwt, "weather", "0.5").await;
    assert_eq!(carol.token(&issued.token_id).await.unwrap().used_usdc, usdc("0.5"));

    // A key the seller narrowed: its services, its largest cap.
    let narrow = BuyerKeyRequest {
        label: Some("agent fleet".into()),
        services: vec!["maps".into()],
        max_limit_usdc: Some(usdc("1")),
    };
    let narrow =
        BuyerClient::new(&ledger.process.url(), &buyer_key(&ledger, "carol", &narrow).await.key);
    let refused_narrow = async |request: BuyerTokenRequest, says: &str| {
        let error = narrow.issue_token(&request).await.unwrap_err();
        assert!(
            matches!(&error, ClientError::Refused { status: 400, body } if body.error.contains(says)),
            "{error}"
        );
    };
    refused_narrow(own_token_request("weather", "1"), "issues tokens for maps only").await;
    refused_narrow(own_token_request("maps", "1.5"), "above this key's largest cap, 1.000000")
        .await;
    narrow.issue_token(&own_token_request("maps", "1")).await.unwrap();
    assert_eq!(carol.me().await.unwrap().tokens.len(), 2);
    // Nor wider through a child of a token the seller issued to Carol for every service.
    let wide = IssueTokenRequest {
        buyer_id: "carol".into(),
        scope: Some(Scope::All),
        ..issue_request("2")
    };
    let wide = ledger.admin.issue_token(&wide).await.unwrap();
    let refused_child = async |request: ChildTokenRequest, says: &str| {
        let error = narrow.mint_child(&wide.token_id, &request).await.unwrap_err();
        assert!(
            matches!(&error, ClientError::Refused { status: 400, body } if body.error.contains(says)),
            "{error}"
        );
    };
    refused_child(child_request("0.5"), "issues tokens for maps only").await;
    let maps_child = |limit: &str| ChildTokenRequest {
        service_id: Some("maps".into()),
        scope: Some(Scope::Single),
        ..child_request(limit)
    };
    refused_child(maps_child("1.5"), "above this key's largest cap").await;
    let child = narrow.mint_child(&wide.token_id, &maps_child("1")).await.unwrap();
    let child = narrow.token(&child.token_id).await.unwrap();
    assert_eq!((child.service_id.as_deref(), child.scope), (Some("maps"), Scope::Single));
    assert_eq!(carol.me().await.unwrap().tokens.len(), 4);

    // A key may only name services the ledger sells; the buyer's CLI does what the API does.
    let bad = BuyerKeyRequest { services: vec!["nope".into()], ..Default::default() };
    assert!(is_status(
        ledger.admin.create_buyer_key("carol", &bad).await.unwrap_err(),
        400,
        ErrorCode::BadRequest
    ));
    let cli = |args: &[&str]| {
        let output = std::process::Command::new(ledger_binary())
            .args(args)
            .args(["--ledger-url", &ledger.process.url()])
            .env("PAYSTILE_BUYER_KEY", &key.key)
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice::<Value>(&output.stdout).unwrap()
    };
    let by_cli = cli(&["me", "issue", "--service-id", "maps", "--limit-usdc", "0.5"]);
    let token_id = by_cli["tokenId"].as_str().unwrap();
    assert_eq!(cli(&["me", "token", token_id])["buyerId"], "carol");
    assert_eq!(cli(&["me", "show"])["tokens"].as_array().unwrap().len(), 5);
    assert_eq!(cli(&["me", "revoke", token_id])["revoked"], true);
    assert_eq!(cli(&["me", "panic"])["revokedTokens"], 4);
    assert!(ledger.admin.buyer("carol").await.unwrap().tokens.iter().all(|t| t.revoked));
}

/// What the console draws: a service's calls, revenue, refusals and upstream errors per
/// minute add up to its summary; the top spenders are ordered by what they spent.
async fn series_and_top_spenders_add_up_to_the_journal(store: Backend) {
    let ledger = Ledger::start(store, &["--services", "maps"]).await;
    let big = ledger.admin.issue_token(&issue_request("5")).await.unwrap();
    let small = ledger
        .admin
        .issue_token(&IssueTokenRequest { buyer_id: "agent-8".into(), ..issue_request("0.2") })
        .await
        .unwrap();
    for _ in 0..3 {
        charged(&ledger, &big.jwt, "weather", "0.4").await;
    }
    charged(&ledger, &small.jwt, "weather", "0.15").await;
    // A refusal (over the cap) and a release.
    let over = json!({"credential": format!("Bearer {}", small.jwt), "serviceId": "weather", "priceUsdc": "0.1"});
    let (status, _) = ledger.post("/v1/holds", Some(GATEWAY_KEY), &over.to_string()).await;
    assert_eq!(status, 402);
    let released = json!({"credential": format!("Bearer {}", big.jwt), "serviceId": "weather", "priceUsdc": "0.3"});
    let (_, hold) = ledger.post("/v1/holds", Some(GATEWAY_KEY), &released.to_string()).await;
    ledger.settle(&[(hold["chargeId"].as_str().unwrap(), "release")]).await;

    let get = async |path: &str| -> Value {
        let (status, body) = answer(&ledger, "GET", path, Some(ADMIN_KEY)).await;
        assert_eq!(status, 200, "{path}: {body}");
        body
    };
    let series: ServiceSeries =
        serde_json::from_value(get("/v1/services/weather/series?window=hour").await).unwrap();
    assert_eq!((series.buckets.len(), series.bucket_seconds), (60, 60));
    let sum = |field: fn(&SeriesBucket) -> u64| series.buckets.iter().map(field).sum::<u64>();
    assert_eq!((sum(|b| b.calls), sum(|b| b.committed), sum(|b| b.released)), (5, 4, 1));
    let revenue = series
        .buckets
        .iter()
        .fold(Usdc::ZERO, |total, b| total.checked_add(b.revenue_usdc).unwrap());
    assert_eq!(revenue, usdc("1.35"));
    let refusals: u64 =
        series.buckets.iter().filter_map(|b| b.refusals.get("token_limit_exceeded")).sum();
    assert_eq!(refusals, 1);
    // Whole UTC minutes, each bucket a minute after the one before, the last holding now.
    let at = |rfc3339: &str| {
        use time::format_description::well_known::Rfc3339;
        time::OffsetDateTime::parse(rfc3339, &Rfc3339).unwrap().unix_timestamp()
    };
    let (from, to) = (at(&series.from), at(&series.to));
    assert_eq!((from % 60, to - from), (0, 3600));
    for (i, bucket) in series.buckets.iter().enumerate() {
        assert_eq!(at(&bucket.start), from + 60 * i64::try_from(i).unwrap(), "bucket {i}");
    }
    let now = i64::try_from(unix_now()).unwrap();
    assert!(to - 60 <= now && now < to + 1, "now {now} is not in the last bucket of {from}..{to}");
    let summary = get("/v1/services/weather/summary").await;
    assert_eq!(summary["calls"], 5);
    assert_eq!(summary["revenueUsdc"], "1.350000");
    for window in ["day", "month"] {
        let series: ServiceSeries = serde_json::from_value(
            get(&format!("/v1/services/weather/series?window={window}")).await,
        )
        .unwrap();
        assert_eq!(series.buckets.iter().map(|b| b.calls).sum::<u64>(), 5, "{window}");
    }
    let (status, body) =
        answer(&ledger, "GET", "/v1/services/weather/series?window=year", Some(ADMIN_KEY)).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_request")));

    let top: TopSpenders = serde_json::from_value(get("/v1/top-spenders?limit=5").await).unwrap();
    let tokens: Vec<(&str, Usdc, u64)> =
        top.tokens.iter().map(|t| (t.token_id.as_str(), t.spent_usdc, t.calls)).collect();
    assert_eq!(
        tokens,
        [(big.token_id.as_str(), usdc("1.2"), 3), (small.token_id.as_str(), usdc("0.15"), 1)]
    );
    let buyers: Vec<(&str, Usdc)> =
        top.buyers.iter().map(|b| (b.buyer_id.as_str(), b.spent_usdc)).collect();
    assert_eq!(buyers, [("agent-7", usdc("1.2")), ("agent-8", usdc("0.15"))]);
    let top_one: TopSpenders =
        serde_json::from_value(get("/v1/top-spenders?limit=1").await).unwrap();
    assert_eq!(top_one.tokens.len(), 1);
    let future: TopSpenders =
        serde_json::from_value(get("/v1/top-spenders?from=2999-01-01T00:00:00Z").await).unwrap();
    assert!(future.tokens.is_empty() && future.buyers.is_empty());

    // The journal newest first: the reverse of oldest first, page after page.
    let oldest_first = ledger.admin.charges(&ChargeQuery::default()).await.unwrap().charges;
    let mut newest_first = Vec::new();
    let mut query =
        ChargeQuery { order: Some(ChargeOrder::Desc), limit: Some(2), ..Default::default() };
    loop {
        let page = ledger.admin.charges(&query).await.unwrap();
        newest_first.extend(page.charges.into_iter().map(|c| c.charge_id));
        match page.next_cursor {
            Some(cursor) => query.cursor = Some(cursor),
            None => break,
        }
    }
    let mut expected: Vec<String> = oldest_first.into_iter().map(|c| c.charge_id).collect();
    expected.reverse();
    assert_eq!((newest_first.len(), &newest_first), (5, &expected));

    // The ledger's services, and those with calls.
    assert_eq!(get("/v1/services").await["services"], json!(["maps", "weather"]));
}

/// `GET /v1/services` answers from the services it looked up in the last minute: a console
/// polling every few seconds reads a month of charges once a minute, not on every poll, and
/// a service's first calls show in the list within a minute.
async fn the_service_list_is_looked_up_at_most_once_a_minute(store: Backend) {
    let mut ledger = Ledger::start(store, &["--services", "maps"]).await;
    let services = async |ledger: &Ledger| {
        let (status, body) = answer(ledger, "GET", "/v1/services", Some(ADMIN_KEY)).await;
        assert_eq!(status, 200, "{body}");
        body["services"].clone()
    };
    assert_eq!(services(&ledger).await, json!(["maps"]));
    let token = ledger.admin.issue_token(&issue_request("1")).await.unwrap();
    charged(&ledger, &token.jwt, "weather", "0.1").await;
    assert_eq!(services(&ledger).await, json!(["maps"]), "looked up again within the minute");
    // A new process looks them up afresh.
    ledger.restart_with(&["--services", "maps"]);
    assert_eq!(services(&ledger).await, json!(["maps", "weather"]));
}
