//! paystile-agent end to end: the agent library pays a real Envoy running the release filter
//! in front of the real ledger binary, with each scheme (a Pay Token; L402 through the
//! ledger's sandbox; x402 signed locally and settled on anvil), and refuses what its limits
//! forbid before anything is paid. A hostile server that answers 402 again after payment is
//! paid once.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use paystile_agent::{
    Agent, AgentError, Config, Lightning, Limits, PayToken, Refusal, Request, Scheme, Wallet,
};
use paystile_harness::chain::{self, PAYEE, PAYER, PAYER_FUNDS, X402Sandbox};
use paystile_harness::e2e::TestStack;
use paystile_protocol::Usdc;
use paystile_protocol::ledger_api::ChargeQuery;
use paystile_protocol::x402::{OfferSettings, PaymentRequired, Resource, U256};
use serde_json::{Value, json};
use tempfile::TempDir;

fn usdc(amount: &str) -> Usdc {
    amount.parse().unwrap()
}

/// An agent holding `wallet`, with a budget, a per-call maximum, the stack's gateway as the
/// one allowed origin, and a spending log in `dir`.
fn agent(stack: &TestStack, wallet: Wallet, budget: &str, max: &str, dir: &Path) -> Agent {
    Agent::new(Config::new(wallet, limits(stack, budget, max), Some(log_path(dir)))).unwrap()
}

/// A budget, a per-call maximum, the stack's gateway as the one allowed origin, and the
/// stack's L402 rate (1000 sat per USDC).
fn limits(stack: &TestStack, budget: &str, max: &str) -> Limits {
    Limits {
        budget: Some(usdc(budget)),
        max_price: Some(usdc(max)),
        allow_origins: vec![gateway_origin(stack)],
        l402_max_sats_per_usdc: stack.stack.filter_config["l402"]["sats_per_usdc"].as_u64(),
        // One L402 purchase buys the stack's budget of calls.
        l402_max_purchase: Some(l402_budget(stack)),
        x402_assets: vec![],
    }
}

/// An agent that pays x402 in the sandbox's token.
fn x402_agent(
    stack: &TestStack,
    sandbox: &X402Sandbox,
    budget: &str,
    max: &str,
    dir: &Path,
) -> Agent {
    let limits = Limits {
        x402_assets: vec![sandbox.caip19().parse().unwrap()],
        ..limits(stack, budget, max)
    };
    Agent::new(Config::new(x402_wallet(), limits, Some(log_path(dir)))).unwrap()
}

/// What one L402 payment buys on `stack`: its configured budget.
fn l402_budget(stack: &TestStack) -> Usdc {
    usdc(stack.stack.filter_config["l402"]["budget_usdc"].as_str().unwrap())
}

fn pay_token(stack: &TestStack, jwt: &str) -> Wallet {
    let token = PayToken { token: jwt.to_owned(), origins: vec![gateway_origin(stack)] };
    Wallet { pay_token: Some(token), ..Wallet::default() }
}

fn gateway_origin(stack: &TestStack) -> String {
    paystile_agent::normalize_origin(&stack.stack.gateway_url("/")).unwrap()
}

fn log_path(dir: &Path) -> PathBuf {
    dir.join("spend").join("agent-spend.jsonl")
}

/// The spending log's lines.
fn log(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(log_path(dir))
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

async fn get(
    agent: &Agent,
    stack: &TestStack,
    path: &str,
) -> Result<paystile_agent::Fetched, AgentError> {
    agent.fetch(Request::get(&stack.stack.gateway_url(path)).unwrap()).await
}

async fn journal(stack: &TestStack) -> Vec<paystile_protocol::ledger_api::ChargeView> {
    stack.stack.admin.charges(&ChargeQuery::default()).await.unwrap().charges
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pay_token_pays_each_call_and_is_sent_at_once_once_the_path_is_known() {
    let stack = TestStack::start().await.unwrap();
    let token = stack.issue("1").await.unwrap();
    let dir = TempDir::new().unwrap();
    let wallet = pay_token(&stack, &token.jwt);
    let agent = agent(&stack, wallet, "0.01", "0.002", dir.path());
    let price = stack.forecast_price();

    let started = std::time::Instant::now();
    let first = get(&agent, &stack, "/v1/forecast/oslo").await.unwrap();
    eprintln!("Pay Token: 402 + paid retry in {:?}", started.elapsed());
    assert_eq!(first.status, 200, "{}", String::from_utf8_lossy(&first.body));
    let paid = first.payment.clone().unwrap();
    assert_eq!((paid.scheme, paid.amount_usdc), (Scheme::PayToken, price));
    let charge_id = first.header("x-charge-id").unwrap();
    assert_eq!(paid.charge_id.as_deref(), Some(charge_id));
    // The 402 was read and its offer kept.
    let offers = agent.last_offers();
    assert_eq!(offers.len(), 1);
    assert!(offers[0].bearer);
    assert_eq!(offers[0].price, Some(price));

    // The same path again goes with the token at once: no 402.
    let started = std::time::Instant::now();
    let second = get(&agent, &stack, "/v1/forecast/oslo").await.unwrap();
    eprintln!("Pay Token: cached call in {:?}", started.elapsed());
    assert_eq!(second.status, 200);
    assert_eq!(second.payment.unwrap().amount_usdc, price);
    assert_eq!(agent.last_offers().len(), 1, "a second 402 was met");
    // Another path: its price is not known, so it meets its 402 first (the token is not
    // sent where its price is unchecked), then pays with the token.
    let third = get(&agent, &stack, "/v1/forecast/bergen").await.unwrap();
    assert_eq!((third.status, third.payment.unwrap().amount_usdc), (200, price));
    assert_eq!(agent.last_offers().len(), 2);
    let three = price.checked_mul(3).unwrap();
    assert_eq!(agent.spent(), three);
    assert_eq!(agent.remaining(), usdc("0.01").saturating_sub(three));

    let lines = log(dir.path());
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["scheme"], "payToken");
    assert_eq!(lines[0]["chargeId"], charge_id);
    assert_eq!(lines[0]["amountUsdc"], price.to_string());
    assert_eq!(lines[0]["origin"], gateway_origin(&stack));
    assert!(lines[0]["url"].as_str().unwrap().ends_with("/v1/forecast/oslo"));
    let settled = stack.settled(&token.token_id).await.unwrap();
    assert_eq!(settled.used_usdc, three);
}

#[tokio::test(flavor = "multi_thread")]
async fn l402_through_the_sandbox_buys_a_budget_once_and_buys_again_when_it_is_spent() {
    let filter = json!({
        "routes": [{"path_prefix": "/v1/forecast", "price_usdc": "0.001"}],
        "l402": {"budget_usdc": "0.002"},
    });
    let stack = TestStack::start_with(filter, &[]).await.unwrap();
    let dir = TempDir::new().unwrap();
    let lightning = Lightning::Sandbox {
        ledger_url: stack.stack.ledger.url(),
        admin_key: stack.stack.secrets.admin_key.clone(),
    };
    let wallet = Wallet { lightning: Some(lightning), ..Wallet::default() };
    // Room for two budgets of 0.002, not three.
    let agent = agent(&stack, wallet, "0.005", "0.001", dir.path());

    let started = std::time::Instant::now();
    let first = get(&agent, &stack, "/v1/forecast/oslo").await.unwrap();
    eprintln!("L402 (sandbox): 402 + invoice + paid retry in {:?}", started.elapsed());
    assert_eq!(first.status, 200, "{}", String::from_utf8_lossy(&first.body));
    let paid = first.payment.clone().unwrap();
    assert_eq!((paid.scheme, paid.amount_usdc), (Scheme::L402, usdc("0.002")));
    assert_eq!(first.header("x-remaining-usdc"), Some("0.001000"));
    let token_id =
        stack.stack.admin.charge(paid.charge_id.as_deref().unwrap()).await.unwrap().token_id;
    assert!(token_id.starts_with("l402_"), "{token_id}");

    // The cached credential pays the next call: nothing new is paid.
    let second = get(&agent, &stack, "/v1/forecast/oslo").await.unwrap();
    assert_eq!((second.status, second.header("x-remaining-usdc")), (200, Some("0.000000")));
    assert!(second.payment.is_none());
    assert_eq!(agent.spent(), usdc("0.002"));

    // Spent: the 402 carries a fresh challenge, which is bought once.
    let third = get(&agent, &stack, "/v1/forecast/oslo").await.unwrap();
    assert_eq!(third.status, 200);
    assert_eq!(third.payment.unwrap().amount_usdc, usdc("0.002"));
    assert_eq!(agent.spent(), usdc("0.004"));
    let _ = get(&agent, &stack, "/v1/forecast/oslo").await.unwrap();

    // A third budget would exceed the session's: refused before the invoice is paid.
    let refused = get(&agent, &stack, "/v1/forecast/oslo").await.unwrap_err();
    match &refused {
        AgentError::Refused(Refusal::OverBudget { amount, remaining, .. }) => {
            assert_eq!((*amount, *remaining), (usdc("0.002"), usdc("0.001")));
        }
        other => panic!("{other}"),
    }
    assert!(refused.to_string().contains("0.001000 USDC left"), "{refused}");
    assert_eq!(agent.spent(), usdc("0.004"));
    let lines = log(dir.path());
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().all(|l| l["scheme"] == "l402" && l["amountUsdc"] == "0.002000"));
    assert_eq!(stack.stack.upstream.seen().len(), 4);
}

async fn x402_stack(sandbox: &X402Sandbox) -> TestStack {
    let args = sandbox.ledger_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    TestStack::start_with(json!({"x402": sandbox.filter_config()}), &args).await.unwrap()
}

fn x402_wallet() -> Wallet {
    Wallet { x402_key: Some(chain::payer_key().unwrap()), ..Wallet::default() }
}

#[tokio::test(flavor = "multi_thread")]
async fn x402_is_signed_locally_paid_per_call_and_settled_on_chain() {
    let sandbox = X402Sandbox::start().await.unwrap();
    let stack = x402_stack(&sandbox).await;
    let dir = TempDir::new().unwrap();
    let agent = x402_agent(&stack, &sandbox, "0.01", "0.001", dir.path());
    let price = stack.forecast_price();

    for call in 1..=2u64 {
        let started = std::time::Instant::now();
        let answer = get(&agent, &stack, "/v1/forecast/oslo").await.unwrap();
        eprintln!("x402: 402 + signed retry in {:?}", started.elapsed());
        assert_eq!(answer.status, 200, "{}", String::from_utf8_lossy(&answer.body));
        assert!(answer.header("payment-response").is_some());
        let paid = answer.payment.unwrap();
        assert_eq!((paid.scheme, paid.amount_usdc), (Scheme::X402, price));
        assert!(paid.charge_id.is_some());
        // One-time payments: each call meets a 402 and pays it.
        assert_eq!(agent.last_offers().len() as u64, call);
    }
    assert_eq!(agent.spent(), price.checked_mul(2).unwrap());
    let lines = log(dir.path());
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().all(|l| l["scheme"] == "x402"));
    assert_ne!(lines[0]["chargeId"], lines[1]["chargeId"]);

    // Settled on chain by the ledger: the payee has both prices.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let expected = U256::from(price.micros() * 2);
    while sandbox.balance(PAYEE).await.unwrap() != expected {
        assert!(tokio::time::Instant::now() < deadline, "{}", stack.stack.ledger_log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(sandbox.balance(PAYER).await.unwrap(), U256::from(PAYER_FUNDS - price.micros() * 2));
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_refuse_before_anything_is_paid() {
    let sandbox = X402Sandbox::start().await.unwrap();
    let stack = x402_stack(&sandbox).await;
    let price = stack.forecast_price();

    // Over the per-call maximum: nothing signed, nothing logged, nothing in the journal.
    let dir = TempDir::new().unwrap();
    let cheap = x402_agent(&stack, &sandbox, "1", "0.0005", dir.path());
    let refused = get(&cheap, &stack, "/v1/forecast/oslo").await.unwrap_err();
    assert!(
        matches!(&refused, AgentError::Refused(Refusal::OverMaxPrice { price: p, .. }) if *p == price),
        "{refused}"
    );
    assert!(refused.to_string().contains("per-call maximum of 0.000500 USDC"), "{refused}");
    assert_eq!((cheap.spent(), log(dir.path()).len()), (Usdc::ZERO, 0));
    assert_eq!(cheap.last_offers().len(), 1, "the offer is still reported");
    assert!(journal(&stack).await.is_empty());

    // Origin not allowed, and an empty list: refused alike.
    for allowed in [vec!["http://127.0.0.1:1".to_owned()], vec![]] {
        let limits = Limits { allow_origins: allowed, ..limits(&stack, "1", "1") };
        let dir = TempDir::new().unwrap();
        let agent =
            Agent::new(Config::new(x402_wallet(), limits, Some(log_path(dir.path())))).unwrap();
        let refused = get(&agent, &stack, "/v1/forecast/oslo").await.unwrap_err();
        assert!(
            matches!(refused, AgentError::Refused(Refusal::OriginNotAllowed { .. })),
            "{refused}"
        );
        assert_eq!(log(dir.path()).len(), 0);
    }
    // No budget at all: nothing is paid.
    let no_budget = Limits {
        budget: None,
        x402_assets: vec![sandbox.caip19().parse().unwrap()],
        ..limits(&stack, "1", "1")
    };
    let unbudgeted = Agent::new(Config::new(x402_wallet(), no_budget, None)).unwrap();
    let refused = get(&unbudgeted, &stack, "/v1/forecast/oslo").await.unwrap_err();
    assert!(matches!(refused, AgentError::Refused(Refusal::NoBudget)), "{refused}");
    assert!(journal(&stack).await.is_empty());
    assert!(stack.stack.upstream.seen().is_empty());

    // A budget of two calls: the third is refused.
    let dir = TempDir::new().unwrap();
    let budget = price.checked_mul(2).unwrap().to_string();
    let agent = x402_agent(&stack, &sandbox, &budget, "1", dir.path());
    for _ in 0..2 {
        assert_eq!(get(&agent, &stack, "/v1/forecast/oslo").await.unwrap().status, 200);
    }
    let refused = get(&agent, &stack, "/v1/forecast/oslo").await.unwrap_err();
    assert!(
        matches!(refused, AgentError::Refused(Refusal::OverBudget { remaining, .. }) if remaining.is_zero()),
        "{refused}"
    );
    assert_eq!(agent.remaining(), Usdc::ZERO);
    assert_eq!(log(dir.path()).len(), 2);
    assert_eq!(journal(&stack).await.len(), 2);
    assert_eq!(stack.stack.upstream.seen().len(), 2);
}

/// A server that answers every call with 402 and an x402 offer (and counts the calls).
async fn always_402() -> (String, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let settings = OfferSettings {
        network: "eip155:31337",
        pay_to: PAYEE,
        asset: Some("0x5FbDB2315678afecb367f032d93F642f64180aa3"),
        asset_name: Some("USD Coin"),
        asset_version: Some("2"),
        max_timeout_seconds: None,
    };
    let offer = paystile_protocol::x402::Offer::from_settings(&settings).unwrap();
    let required = PaymentRequired {
        x402_version: 2,
        error: None,
        resource: Resource { url: "http://x/".into(), description: None, mime_type: None },
        accepts: vec![offer.requirements(1000)],
    };
    let header = required.header_value();
    let counter = calls.clone();
    let app =
        axum::Router::new().fallback(move || {
            let header = header.clone();
            counter.fetch_add(1, Ordering::SeqCst);
            async move {
                (axum::http::StatusCode::PAYMENT_REQUIRED, [("payment-required", header)], "pay")
            }
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, calls)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_402_after_payment_is_an_error_and_never_a_second_payment() {
    let (url, calls) = always_402().await;
    let dir = TempDir::new().unwrap();
    let limits = Limits {
        budget: Some(usdc("1")),
        max_price: Some(usdc("0.01")),
        allow_origins: vec![url.clone()],
        x402_assets: vec![
            "eip155:31337/erc20:0x5FbDB2315678afecb367f032d93F642f64180aa3".parse().unwrap(),
        ],
        ..Limits::default()
    };
    let agent = Agent::new(Config::new(x402_wallet(), limits, Some(log_path(dir.path())))).unwrap();
    let error = agent.fetch(Request::get(&format!("{url}/thing")).unwrap()).await.unwrap_err();
    assert!(matches!(error, AgentError::PaidButRefused { scheme: Scheme::X402, .. }), "{error}");
    assert!(error.to_string().contains("402 again after payment"), "{error}");
    assert_eq!(calls.load(Ordering::SeqCst), 2, "one call, one retry");
    // The signed authorization left the agent: counted and logged, once.
    assert_eq!(agent.spent(), usdc("0.001"));
    assert_eq!(log(dir.path()).len(), 1);
}

/// Runs the `paystile-agent` binary with `args` (and no `PAYSTILE_*` from the environment):
/// exit status, stdout, stderr.
async fn cli(args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let mut command =
        tokio::process::Command::new(paystile_harness::paths::agent_binary().unwrap());
    for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("PAYSTILE_")) {
        command.env_remove(name);
    }
    let output = command.args(args).output().await.unwrap();
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).unwrap();
    (output.status, text(output.stdout), text(output.stderr))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_pays_with_each_scheme_and_refuses_over_its_maximum() {
    let sandbox = X402Sandbox::start().await.unwrap();
    // x402 on, and L402 through the ledger's sandbox as every stack has it.
    let stack = x402_stack(&sandbox).await;
    let price = stack.forecast_price();
    // What one L402 payment buys: the stack's configured budget.
    let l402_budget = l402_budget(&stack);
    let l402_purchase = l402_budget.to_string();
    let dir = TempDir::new().unwrap();
    let log_file = log_path(dir.path());
    let origin = gateway_origin(&stack);
    let (ledger, admin_key) = (stack.stack.ledger.url(), stack.stack.secrets.admin_key.clone());
    let jwt = stack.issue("1").await.unwrap().jwt;
    let limits = |max: &'static str| {
        let log = log_file.to_str().unwrap().to_owned();
        let limits = ["--budget-usdc", "1", "--max-price-usdc", max, "--allow-origin", &origin];
        let mut args: Vec<String> = limits.iter().map(|a| (*a).to_owned()).collect();
        args.extend(["--log".to_owned(), log]);
        args
    };
    let asset = sandbox.caip19();
    let l402 = [
        "--l402-sandbox",
        &ledger,
        "--l402-sandbox-key",
        &admin_key,
        "--l402-max-purchase-usdc",
        &l402_purchase,
    ];
    let wallets: [(&str, Vec<&str>, Usdc); 3] = [
        ("payToken", vec!["--pay-token", &jwt, "--pay-token-origin", &origin], price),
        ("l402", [&l402[..], &["--l402-max-sats-per-usdc", "1000"]].concat(), l402_budget),
        ("x402", vec!["--x402-key", chain::PAYER_KEY, "--x402-asset", &asset], price),
    ];

    for (logged, (scheme, wallet, amount)) in wallets.into_iter().enumerate() {
        let url = stack.stack.gateway_url(&format!("/v1/forecast/cli-{scheme}"));
        let mut args: Vec<&str> = wallet;
        let limits = limits("0.001");
        args.extend(limits.iter().map(String::as_str));
        args.extend(["fetch", "-i", &url]);
        let (status, stdout, stderr) = cli(&args).await;
        assert!(status.success(), "{scheme}: {status}\n{stderr}");
        let (head, body) = stdout.split_once("\n\n").unwrap();
        assert_eq!(head.lines().next(), Some("HTTP/1.1 200"), "{scheme}: {stdout}");
        assert!(body.contains(&format!("\"path\":\"/v1/forecast/cli-{scheme}\"")), "{body}");
        let charge_id = head
            .lines()
            .filter_map(|line| line.split_once(": "))
            .find_map(|(name, value)| name.eq_ignore_ascii_case("x-charge-id").then_some(value))
            .unwrap_or_else(|| panic!("{scheme}: no X-Charge-Id in {head}"));
        let report: Value = serde_json::from_str(stderr.lines().last().unwrap()).unwrap();
        assert_eq!(report["status"], 200);
        assert_eq!(report["paid"]["scheme"], scheme, "{stderr}");
        assert_eq!(report["paid"]["amountUsdc"], amount.to_string(), "{stderr}");
        assert_eq!(report["paid"]["chargeId"], charge_id, "{stderr}");
        let lines = log(dir.path());
        assert_eq!(lines.len(), logged + 1, "{scheme}");
        assert_eq!(lines.last().unwrap()["scheme"], scheme);
        assert_eq!(lines.iter().filter(|l| l["scheme"] == scheme).count(), 1);
        assert!(journal(&stack).await.iter().any(|c| c.charge_id == charge_id), "{scheme}");
    }
    assert_eq!(log(dir.path()).len(), 3);

    // Below the price: refused before anything is paid, and it says which limit.
    let url = stack.stack.gateway_url("/v1/forecast/cli-refused");
    let mut args = vec!["--x402-key", chain::PAYER_KEY, "--x402-asset", &asset];
    let limits = limits("0.0005");
    args.extend(limits.iter().map(String::as_str));
    args.extend(["fetch", &url]);
    let charges = journal(&stack).await.len();
    let (status, _, stderr) = cli(&args).await;
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("per-call maximum of 0.000500 USDC"), "{stderr}");
    assert_eq!((log(dir.path()).len(), journal(&stack).await.len()), (3, charges));
}
