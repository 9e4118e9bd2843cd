//! `scripts/demo`: the paystile demo stack on the default ports, with a paid `curl` to paste.
//!
//! Uses `PAYSTILE_ADMIN_KEY`, `PAYSTILE_TOKEN_SECRET` and `PAYSTILE_L402_SECRET` when set, and
//! makes up (and prints) dev values when not. L402 invoices come from the ledger's sandbox;
//! x402 payments settle on a local anvil with the sandbox USDC, whose demo wallet is funded.
//! State (the ledger's database, configs, logs) goes to `.paystile/demo`.

use std::process::ExitCode;

use paystile_harness::chain::{PAYER, PAYER_FUNDS, PAYER_KEY, X402Sandbox};
use paystile_harness::envoy::EnvoyConfig;
use paystile_harness::paths;
use paystile_harness::stack::{
    HttpFilter, Ports, Secrets, Stack, StackOptions, new_token_key, random_key,
};
use paystile_harness::upstream::UpstreamMode;
use paystile_protocol::jwk::Jwks;
use paystile_protocol::ledger_api::{BuyerKeyRequest, DepositRequest, IssueTokenRequest};

/// Where the demo gateway sells Pay Tokens for x402.
const TOP_UP_PATH: &str = "/paystile/top-up";
/// What an agent may spend in the commands and the MCP configuration the demo prints.
const AGENT_LIMITS: &str = "--budget-usdc 0.05 --max-price-usdc 0.01";
/// An L402 payment buys the demo route's whole budget (`l402.budget_usdc`, 1 USDC) at once.
const L402_AGENT_LIMITS: &str = "--budget-usdc 2 --max-price-usdc 0.01";

fn agent_token_request(service_id: &str) -> anyhow::Result<IssueTokenRequest> {
    Ok(IssueTokenRequest {
        service_id: service_id.to_owned(),
        limit_usdc: "0.05".parse()?,
        buyer_id: "demo-agent".into(),
        buyer_tag: None,
        scope: None,
        expires_at: None,
        ttl_seconds: Some(24 * 3600),
        sandbox: false,
    })
}

/// The buyer whose key the demo prints, for the console and `paystile-ledger me`.
const DEMO_BUYER: &str = "demo-buyer";

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("paystile demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn from_env_or_made_up(variable: &str, prefix: &str) -> (String, bool) {
    match std::env::var(variable) {
        Ok(value) if !value.is_empty() => (value, false),
        _ => (random_key(prefix), true),
    }
}

async fn run() -> anyhow::Result<()> {
    let (admin_key, made_up_admin) = from_env_or_made_up("PAYSTILE_ADMIN_KEY", "adm");
    let (token_secret, made_up_secret) = from_env_or_made_up("PAYSTILE_TOKEN_SECRET", "pts");
    let (l402_secret, made_up_l402) = from_env_or_made_up("PAYSTILE_L402_SECRET", "l402");
    let dir = paths::repo_root().join(".paystile/demo");
    // The ledger's Ed25519 signing key stays across demo runs, so tokens it issued still work.
    let token_key = std::fs::read_to_string(dir.join("token-keys.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<Jwks>(&text).ok())
        .and_then(|set| set.keys.into_iter().next())
        .unwrap_or_else(|| new_token_key("demo-1"));
    let secrets =
        Secrets { admin_key, token_key, token_secret, l402_secret, gateway_key: random_key("gw") };
    let x402 = X402Sandbox::start().await?;
    let mut x402_config = x402.filter_config();
    x402_config["top_up"] = serde_json::json!({"path": TOP_UP_PATH});
    // The ledger sells the demo filter's service: buyers issue tokens for it in the console.
    let service_id =
        EnvoyConfig::demo()?.filter_config()?["service_id"].as_str().unwrap_or_default().to_owned();
    let mut ledger_args = x402.ledger_args();
    ledger_args.extend(["--services".to_owned(), service_id.clone()]);
    let mut stack = Stack::start(StackOptions {
        ports: Ports::DEFAULT,
        secrets,
        dir: dir.clone(),
        filter: serde_json::json!({"x402": x402_config}),
        http_filter: HttpFilter::Paystile,
        ledger_args,
        envoy_workers: 2,
        verbose_logs: false,
        upstream: UpstreamMode::Echo,
    })
    .await?;

    let route = stack.filter_config["routes"][0].clone();
    let token = stack.admin.issue_token(&agent_token_request(&service_id)?).await?;
    // The agent's own Pay Token, for the MCP server's configuration.
    let agent_token = stack
        .admin
        .issue_token(&IssueTokenRequest {
            buyer_id: "demo-mcp-agent".into(),
            buyer_tag: Some("claude-desktop".into()),
            ..agent_token_request(&service_id)?
        })
        .await?;
    // A prepaid buyer with its own key: once per demo database (the deposit's reference).
    let seed = DepositRequest { amount_usdc: "10".parse()?, reference: Some("demo-seed".into()) };
    stack.admin.deposit(DEMO_BUYER, &seed).await?;
    let buyer_key = stack
        .admin
        .create_buyer_key(
            DEMO_BUYER,
            &BuyerKeyRequest { label: Some("demo".into()), ..BuyerKeyRequest::default() },
        )
        .await?;
    let priced_path = format!("{}/oslo", route["path_prefix"].as_str().unwrap_or("/v1/forecast"));
    let url = stack.gateway_url(&priced_path);

    let made_up = |made_up: bool| if made_up { "  (made up for this run)" } else { "" };
    println!();
    println!("paystile demo is up (state in {}):", dir.display());
    println!(
        "  gateway   {}   Envoy + paystile filter (admin http://{})",
        stack.gateway_url(""),
        stack.envoy.admin()
    );
    println!("  ledger    {}   sidecar ledger on SQLite", stack.ledger.url());
    println!("  upstream  http://{}   demo API, echoes what reached it", stack.upstream.address());
    println!(
        "  chain     {}   anvil (chain 31337), sandbox USDC at {}",
        x402.anvil.url(),
        x402.token.to_checksum(None)
    );
    println!();
    println!("  PAYSTILE_ADMIN_KEY={}{}", stack.secrets.admin_key, made_up(made_up_admin));
    println!(
        "  PAYSTILE_TOKEN_KEYS={}   the ledger's Ed25519 signing key (kid {})",
        dir.join("token-keys.json").display(),
        stack.secrets.token_key.kid.as_deref().unwrap_or("?")
    );
    println!(
        "  PAYSTILE_TOKEN_SECRET={}{}   HS256, still accepted",
        stack.secrets.token_secret,
        made_up(made_up_secret)
    );
    println!("  PAYSTILE_L402_SECRET={}{}", stack.secrets.l402_secret, made_up(made_up_l402));
    println!();
    println!(
        "Service {service_id:?} charges {} USDC per call under {}.",
        route["price_usdc"].as_str().unwrap_or("?"),
        route["path_prefix"].as_str().unwrap_or("?")
    );
    println!(
        "A Pay Token was issued: {} with a cap of {} USDC, signed EdDSA by the ledger. The",
        token.token_id, token.limit_usdc
    );
    println!("gateway holds only the ledger's public key: it verifies tokens, it cannot mint one");
    println!("  curl -s {}/.well-known/jwks.json", stack.ledger.url());
    println!("Paste this paid call:");
    println!();
    println!("curl -i -H 'Authorization: Bearer {}' {url}", token.jwt);
    println!();
    println!("Without the header you get the 402 challenge. See the token's spend with:");
    let ledger_cli =
        format!("PAYSTILE_ADMIN_KEY={} target/debug/paystile-ledger", stack.secrets.admin_key);
    println!("  {ledger_cli} token show {}", token.token_id);
    println!(
        "Its kill switch answers once every gateway worker has dropped the holds it prefetched for the token (\"gateways\"); the paid call then gets 422:"
    );
    println!("  {ledger_cli} token revoke {}", token.token_id);
    println!();
    println!("Or pay with L402 (sandbox invoices: regtest, no real money moves):");
    println!("  1. the challenge's macaroon=\"M\" and invoice=\"I\":");
    println!("     curl -si {url} | grep -im1 'www-authenticate: L402'");
    println!("  2. pay I through the sandbox; prints the preimage P:");
    println!("     {ledger_cli} sandbox-pay I");
    println!("  3. call with the credential:");
    println!("     curl -i -H 'Authorization: L402 M:P' {url}");
    println!();
    println!(
        "Or pay with x402: a signed USDC transfer, settled on the local chain. The demo wallet"
    );
    println!(
        "{PAYER} holds {} sandbox USDC; the x402 Python package pays the call with it:",
        paystile_protocol::Usdc::from_micros(PAYER_FUNDS).unwrap_or_default()
    );
    println!(
        "  .venv/bin/python test-harness/interop/x402_fetch.py --key {PAYER_KEY} --allow {}:{} {url}",
        x402.network(),
        x402.token.to_checksum(None)
    );
    println!("The ledger settles it on chain once the call is answered; see the transfer with:");
    println!("  {ledger_cli} charge <chargeId from the answer>");
    println!(
        "Or buy a Pay Token (1 USDC, settled first, on the wallet's prepaid balance) with it:"
    );
    println!(
        "  .venv/bin/python test-harness/interop/x402_fetch.py --key {PAYER_KEY} --allow {}:{} '{}'",
        x402.network(),
        x402.token.to_checksum(None),
        stack.gateway_url(&format!("{TOP_UP_PATH}?amount_usdc=1"))
    );
    println!();
    // The agent's client: next to this binary (scripts/demo builds it).
    let agent = std::env::current_exe()?.with_file_name("paystile-agent");
    let agent = agent.display();
    let gateway = stack.gateway_url("");
    println!("For agents: paystile-agent pays a 402 itself, within its limits (one per scheme):");
    println!(
        "  {agent} --pay-token {} --pay-token-origin {gateway} {AGENT_LIMITS} --allow-origin {gateway} fetch {url}",
        token.jwt
    );
    // The demo's invoices are at the filter's sats_per_usdc (envoy-config/envoy.yaml).
    // A payment buys the route's L402 budget of calls: the agent is told it may buy that much.
    let rate = stack.filter_config["l402"]["sats_per_usdc"].as_u64().unwrap_or(1000);
    let purchase = stack.filter_config["l402"]["budget_usdc"].as_str().unwrap_or("1");
    println!(
        "  {agent} --l402-sandbox {} --l402-sandbox-key {} --l402-max-sats-per-usdc {rate} --l402-max-purchase-usdc {purchase} {L402_AGENT_LIMITS} --allow-origin {gateway} fetch {url}",
        stack.ledger.url(),
        stack.secrets.admin_key
    );
    // The demo's x402 token is the sandbox's, not USDC on Base: named to the agent.
    println!(
        "  {agent} --x402-key {PAYER_KEY} --x402-asset {} {AGENT_LIMITS} --allow-origin {gateway} fetch {url}",
        x402.caip19()
    );
    println!(
        "As an MCP server, in Claude Desktop's claude_desktop_config.json (its own Pay Token):"
    );
    let mcp = serde_json::json!({
        "mcpServers": {
            "paystile": {
                "command": agent.to_string(),
                "args": ["mcp"],
                "env": {
                    "PAYSTILE_PAY_TOKEN": agent_token.jwt,
                    "PAYSTILE_PAY_TOKEN_ORIGINS": gateway,
                    "PAYSTILE_AGENT_BUDGET_USDC": "0.05",
                    "PAYSTILE_AGENT_MAX_PRICE_USDC": "0.01",
                    "PAYSTILE_AGENT_ALLOW_ORIGINS": gateway,
                }
            }
        }
    });
    println!("{}", serde_json::to_string_pretty(&mcp)?);
    println!();
    println!("The web console, on the ledger (log in with PAYSTILE_ADMIN_KEY as the seller, or as");
    println!("{DEMO_BUYER}, 10 USDC prepaid, with its buyer key: issue a token, call, kill it):");
    println!("  {}/console", stack.ledger.url());
    println!("  buyer key: {}", buyer_key.key);
    println!(
        "The buyer's CLI does the same: PAYSTILE_BUYER_KEY=<key> target/debug/paystile-ledger me show"
    );
    println!("A seller gives a buyer a key with: {ledger_cli} buyer key-create <buyerId>");
    println!();
    println!("The filter's counters (paid, refused by code, settlements queued and delivered):");
    println!("  curl -s 'http://{}/stats?filter=wasmcustom'", stack.envoy.admin());
    println!();
    println!("Ctrl-C stops the stack, draining the gateway first (scripts/drain-gateway).");

    // Ctrl-C or a TERM: return, so that the stack's processes are stopped on the way out.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        interrupted = tokio::signal::ctrl_c() => interrupted?,
        _ = terminate.recv() => {}
    }
    println!("stopping: draining the gateway (scripts/drain-gateway), then the rest");
    if !stack.envoy.stop_gracefully(std::time::Duration::from_secs(10)).await? {
        println!("the gateway did not drain within 10 s; some calls may go unpaid");
    }
    Ok(())
}
