//! `paystile-agent`: the CLI over [`paystile_agent::Agent`].

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use paystile_agent::{
    Agent, Config, Lightning, Limits, PayToken, Request, Wallet, normalize_origin,
};
use paystile_protocol::Usdc;
use paystile_protocol::x402::SigningKey;

#[derive(Parser)]
#[command(name = "paystile-agent", about = "Calls HTTP APIs and pays their 402s, within limits")]
struct Cli {
    #[command(flatten)]
    options: Options,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Options {
    /// A Pay Token (JWT), sent as `Authorization: Bearer` to its origins only.
    #[arg(long, env = "PAYSTILE_PAY_TOKEN", global = true, hide_env_values = true)]
    pay_token: Option<String>,
    /// An origin the Pay Token may be sent to (the gateway it was issued for); repeatable,
    /// and required with --pay-token: any server the token reaches can spend it.
    #[arg(long, env = "PAYSTILE_PAY_TOKEN_ORIGINS", value_delimiter = ',', global = true)]
    pay_token_origin: Vec<String>,
    /// Pay L402 invoices through this paystile ledger's sandbox.
    #[arg(long, global = true, value_name = "LEDGER_URL")]
    l402_sandbox: Option<String>,
    /// The ledger's admin key, for the sandbox.
    #[arg(long, env = "PAYSTILE_ADMIN_KEY", global = true, hide_env_values = true)]
    l402_sandbox_key: Option<String>,
    /// Pay L402 invoices through this LND node's REST API.
    #[arg(long, global = true)]
    lnd_url: Option<String>,
    /// The LND macaroon file (binary, as LND writes it) that may send payments.
    #[arg(long, global = true)]
    lnd_macaroon: Option<PathBuf>,
    /// The most satoshis an L402 invoice may ask per USDC it buys (routing fees included);
    /// without it, no L402 invoice is paid.
    #[arg(long, env = "PAYSTILE_AGENT_L402_MAX_SATS_PER_USDC", global = true)]
    l402_max_sats_per_usdc: Option<u64>,
    /// The most one L402 purchase may buy, in USDC (a paystile gateway sells a budget of
    /// many calls); the per-call maximum when unset.
    #[arg(long, env = "PAYSTILE_AGENT_L402_MAX_PURCHASE_USDC", global = true)]
    l402_max_purchase_usdc: Option<Usdc>,
    /// The x402 payer's secp256k1 key (hex).
    #[arg(long, env = "PAYSTILE_X402_KEY", global = true, hide_env_values = true)]
    x402_key: Option<String>,
    /// A token x402 may transfer besides USDC on Base and Base Sepolia, as CAIP-19
    /// (`eip155:31337/erc20:0x…`): a 6-decimal USD token, counted as USDC. Repeatable.
    #[arg(long, env = "PAYSTILE_AGENT_X402_ASSETS", value_delimiter = ',', global = true)]
    x402_asset: Vec<String>,
    /// The most this session may pay in all, in USDC (none: pays nothing).
    #[arg(long, env = "PAYSTILE_AGENT_BUDGET_USDC", global = true)]
    budget_usdc: Option<Usdc>,
    /// The most one call may cost, in USDC.
    #[arg(long, env = "PAYSTILE_AGENT_MAX_PRICE_USDC", global = true)]
    max_price_usdc: Option<Usdc>,
    /// An origin the agent may pay (`http://127.0.0.1:10000`; `*` for any). Repeatable;
    /// none allows no payment.
    #[arg(long, env = "PAYSTILE_AGENT_ALLOW_ORIGINS", value_delimiter = ',', global = true)]
    allow_origin: Vec<String>,
    /// The spending log (JSON lines); default `~/.paystile/agent-spend.jsonl`.
    #[arg(long, env = "PAYSTILE_AGENT_LOG", global = true)]
    log: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Calls a URL, paying its 402 once if it answers one.
    Fetch {
        /// The method: GET, or POST with `-d` (as curl).
        #[arg(short = 'X', long)]
        request: Option<String>,
        /// `Name: value`; repeatable.
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        #[arg(short = 'd', long)]
        data: Option<String>,
        /// Print the status line and the headers too.
        #[arg(short = 'i', long)]
        include: bool,
        url: String,
    },
    /// Serves the same abilities as an MCP server over stdio (tools `call_paid_api`,
    /// `budget`, `last_offers`), with the wallet and limits above. stdout is the protocol;
    /// messages go to stderr.
    Mcp,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("paystile-agent: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let agent = Agent::new(config(&cli.options)?)?;
    match cli.command {
        Command::Fetch { request, headers, data, include, url } => {
            let method =
                request.unwrap_or_else(|| if data.is_some() { "POST" } else { "GET" }.into());
            let mut call = Request::new(&method, &url)?;
            for header in headers {
                let (name, value) = header
                    .split_once(':')
                    .with_context(|| format!("a header is `Name: value`, not {header:?}"))?;
                call.headers.push((name.trim().to_owned(), value.trim().to_owned()));
            }
            call.body = data.map(String::into_bytes);
            let fetched = agent.fetch(call).await?;
            let mut out = std::io::stdout().lock();
            if include {
                writeln!(out, "HTTP/1.1 {}", fetched.status)?;
                for (name, value) in &fetched.headers {
                    writeln!(out, "{name}: {value}")?;
                }
                writeln!(out)?;
            }
            out.write_all(&fetched.body)?;
            out.flush()?;
            let report = serde_json::json!({
                "status": fetched.status,
                "paid": fetched.payment,
                "spentUsdc": agent.spent(),
                "remainingUsdc": agent.remaining(),
            });
            eprintln!("{report}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Mcp => {
            let limits = agent.limits();
            eprintln!(
                "paystile-agent: MCP server on stdio (budget {}, per-call maximum {}, allowed \
                 origins: {}, L402 invoices: {})",
                limits.budget.map_or_else(|| "none: pays nothing".into(), |b| format!("{b} USDC")),
                limits.max_price.map_or_else(|| "none".into(), |m| format!("{m} USDC")),
                if limits.allow_origins.is_empty() {
                    "none".into()
                } else {
                    limits.allow_origins.join(", ")
                },
                limits.l402_max_sats_per_usdc.map_or_else(
                    || "none paid, no rate".into(),
                    |rate| format!("at most {rate} sat per USDC")
                ),
            );
            paystile_agent::mcp::serve_stdio(agent).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn config(options: &Options) -> anyhow::Result<Config> {
    let x402_key = match &options.x402_key {
        Some(hex_key) => {
            let bytes = hex::decode(hex_key.trim().trim_start_matches("0x"))
                .context("--x402-key is not hex")?;
            Some(SigningKey::from_slice(&bytes).context("--x402-key is not a secp256k1 key")?)
        }
        None => None,
    };
    let lightning = match (&options.l402_sandbox, &options.lnd_url) {
        (Some(_), Some(_)) => bail!("give --l402-sandbox or --lnd-url, not both"),
        (Some(ledger_url), None) => Some(Lightning::Sandbox {
            ledger_url: ledger_url.clone(),
            admin_key: options
                .l402_sandbox_key
                .clone()
                .context("--l402-sandbox needs --l402-sandbox-key or PAYSTILE_ADMIN_KEY")?,
        }),
        (None, Some(url)) => {
            let file = options.lnd_macaroon.as_ref().context("--lnd-url needs --lnd-macaroon")?;
            let macaroon =
                std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
            Some(Lightning::Lnd { url: url.clone(), macaroon_hex: hex::encode(macaroon) })
        }
        (None, None) => None,
    };
    let mut allow_origins = Vec::new();
    for entry in options.allow_origin.iter().filter(|e| !e.trim().is_empty()) {
        allow_origins.push(
            normalize_origin(entry)
                .with_context(|| format!("--allow-origin {entry:?} is not an origin"))?,
        );
    }
    if options.l402_max_sats_per_usdc == Some(0) {
        bail!("--l402-max-sats-per-usdc must be above 0");
    }
    let x402_assets = options
        .x402_asset
        .iter()
        .filter(|e| !e.trim().is_empty())
        .map(|entry| entry.parse().map_err(|e| anyhow::anyhow!("--x402-asset: {e}")))
        .collect::<anyhow::Result<_>>()?;
    let limits = Limits {
        budget: options.budget_usdc,
        max_price: options.max_price_usdc,
        allow_origins,
        l402_max_sats_per_usdc: options.l402_max_sats_per_usdc,
        l402_max_purchase: options.l402_max_purchase_usdc,
        x402_assets,
    };
    let pay_token = match &options.pay_token {
        Some(token) => {
            let mut origins = Vec::new();
            for entry in options.pay_token_origin.iter().filter(|e| !e.trim().is_empty()) {
                match normalize_origin(entry) {
                    Some(origin) if origin != "*" => origins.push(origin),
                    _ => {
                        bail!("--pay-token-origin {entry:?} is not an origin (and `*` is refused)")
                    }
                }
            }
            if origins.is_empty() {
                bail!(
                    "--pay-token needs --pay-token-origin (PAYSTILE_PAY_TOKEN_ORIGINS): the \
                     gateway the token was issued for, since any server it reaches can spend it"
                );
            }
            Some(PayToken { token: token.trim().to_owned(), origins })
        }
        None => None,
    };
    let log = match &options.log {
        Some(path) => path.clone(),
        None => {
            let home = std::env::var_os("HOME").context("no HOME: give --log")?;
            PathBuf::from(home).join(".paystile").join("agent-spend.jsonl")
        }
    };
    let wallet = Wallet { pay_token, lightning, x402_key };
    Ok(Config::new(wallet, limits, Some(log)))
}
