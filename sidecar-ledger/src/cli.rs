//! The `paystile-ledger` command line: `serve`, admin subcommands that call a running
//! ledger's admin API (one for each admin endpoint), and `me`, a buyer's own API with its
//! buyer key.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use paystile_protocol::Usdc;
use paystile_protocol::ledger_api::{
    BuyerKeyRequest, BuyerTokenRequest, ChargeQuery, ChargeStatus, ChildTokenRequest,
    DepositRequest, IssueTokenRequest, SummaryQuery,
};
use paystile_protocol::pay_token::Scope;
use serde::Serialize;

use crate::client::{AdminClient, BuyerClient, ClientError};
use crate::settings::{LogFormat, Options, Settings};
use crate::token_keys::{self, TokenKeys};

#[derive(Parser)]
#[command(name = "paystile-ledger", version, about = "paystile's sidecar ledger")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the ledger.
    Serve(Box<Options>),
    /// Issue, show or revoke Pay Tokens.
    Token {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Buyers' prepaid accounts: deposit, show, set a tier, revoke every token (panic button).
    Buyer {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        command: BuyerCommand,
    },
    /// Show a charge.
    Charge {
        #[command(flatten)]
        admin: AdminArgs,
        /// The charge id (ch_…), as in a response's X-Charge-Id.
        charge_id: String,
    },
    /// The journal: list or export charges, show one, sum up a service.
    Charges {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        command: ChargesCommand,
    },
    /// The ledger's Ed25519 Pay Token key file (`--token-keys`): add or remove a key, or
    /// print the public keys gateways are configured with. Works on the file; restart the
    /// ledger to apply.
    TokenKeys {
        /// The key file.
        #[arg(long, env = "PAYSTILE_TOKEN_KEYS")]
        file: std::path::PathBuf,
        #[command(subcommand)]
        command: TokenKeysCommand,
    },
    /// A buyer's own tokens, account and charges, with one of its buyer keys.
    Me {
        #[command(flatten)]
        buyer: BuyerArgs,
        #[command(subcommand)]
        command: MeCommand,
    },
    /// Pay an L402 invoice of this ledger's sandbox backend; prints its preimage.
    SandboxPay {
        #[command(flatten)]
        admin: AdminArgs,
        /// The BOLT11 invoice (lnbcrt…) from a 402's L402 challenge.
        invoice: String,
    },
}

#[derive(Subcommand)]
enum TokenKeysCommand {
    /// Make a new key that signs from the ledger's next start (the others keep verifying);
    /// prints its public JWK. Creates the file (mode 0600) if needed.
    Add {
        /// The new key's id, e.g. the month it starts signing: 2026-12.
        #[arg(long)]
        kid: String,
    },
    /// Remove a key: tokens it signed stop verifying at the ledger's next start.
    Remove {
        #[arg(long)]
        kid: String,
    },
    /// Print the public key set (what `GET /.well-known/jwks.json` serves).
    Public,
}

/// The ledger a subcommand talks to.
#[derive(clap::Args)]
struct LedgerUrl {
    /// The ledger to talk to.
    #[arg(
        long,
        env = "PAYSTILE_LEDGER_URL",
        default_value = "http://127.0.0.1:8787",
        global = true
    )]
    ledger_url: String,
}

#[derive(clap::Args)]
struct AdminArgs {
    #[command(flatten)]
    ledger: LedgerUrl,
    /// The ledger's admin key.
    #[arg(long, env = "PAYSTILE_ADMIN_KEY", hide_env_values = true, global = true)]
    admin_key: Option<String>,
}

#[derive(clap::Args)]
struct BuyerArgs {
    #[command(flatten)]
    ledger: LedgerUrl,
    /// A buyer key (pbk_…), from `paystile-ledger buyer key-create`.
    #[arg(long, env = "PAYSTILE_BUYER_KEY", hide_env_values = true, global = true)]
    buyer_key: Option<String>,
}

#[derive(Subcommand)]
enum MeCommand {
    /// Show the balance, spend today, tier, limits and every token with its spend.
    Show,
    /// Issue a Pay Token for an agent (within the balance, the tier's daily limit and what
    /// the key allows) and print it (the JWT is in "jwt").
    Issue {
        #[arg(long)]
        service_id: String,
        /// The cap, in USDC (up to 6 decimals).
        #[arg(long)]
        limit_usdc: Usdc,
        #[arg(long)]
        buyer_tag: Option<String>,
        /// Lifetime in seconds [default: the ledger's].
        #[arg(long, conflicts_with = "expires_at")]
        ttl_seconds: Option<u64>,
        /// Expiry as an RFC 3339 time.
        #[arg(long)]
        expires_at: Option<String>,
    },
    /// Show one of the buyer's tokens.
    Token { token_id: String },
    /// Revoke one of the buyer's tokens at once (kill switch).
    Revoke { token_id: String },
    /// Revoke every one of the buyer's tokens at once (panic button).
    Panic,
    /// Mint a child token under one of the buyer's tokens.
    Child {
        parent_id: String,
        #[arg(long)]
        limit_usdc: Usdc,
        #[arg(long)]
        ttl_seconds: Option<u64>,
    },
    /// Print one page of the buyer's charges (JSON), oldest first.
    Charges {
        #[arg(long)]
        token_id: Option<String>,
        #[arg(long)]
        service_id: Option<String>,
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        to: Option<String>,
        #[arg(long)]
        limit: Option<u32>,
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Write every one of the buyer's charges as CSV to standard output.
    Export,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Issue a Pay Token and print it (the JWT is in "jwt").
    Issue {
        #[arg(long)]
        service_id: String,
        /// The cap, in USDC (up to 6 decimals).
        #[arg(long)]
        limit_usdc: Usdc,
        #[arg(long)]
        buyer_id: String,
        #[arg(long)]
        buyer_tag: Option<String>,
        /// SINGLE (this service only) or ALL.
        #[arg(long, value_parser = parse_scope)]
        scope: Option<Scope>,
        /// Lifetime in seconds [default: the ledger's].
        #[arg(long, conflicts_with = "expires_at")]
        ttl_seconds: Option<u64>,
        /// Expiry as an RFC 3339 time.
        #[arg(long)]
        expires_at: Option<String>,
        /// Charge the sandbox book, never the buyer's balance or daily limit.
        #[arg(long)]
        sandbox: bool,
    },
    /// Mint a child token under a parent (delegation): its spend counts against the parent.
    Child {
        /// The parent token's id.
        parent_id: String,
        /// The child's cap, in USDC: at most what the parent has left.
        #[arg(long)]
        limit_usdc: Usdc,
        /// [default: the parent's]
        #[arg(long)]
        service_id: Option<String>,
        /// SINGLE or ALL [default: the parent's].
        #[arg(long, value_parser = parse_scope)]
        scope: Option<Scope>,
        #[arg(long)]
        buyer_tag: Option<String>,
        /// Lifetime in seconds, within the parent's [default: the ledger's, cut to the parent's].
        #[arg(long, conflicts_with = "expires_at")]
        ttl_seconds: Option<u64>,
        /// Expiry as an RFC 3339 time, no later than the parent's.
        #[arg(long)]
        expires_at: Option<String>,
    },
    /// Show a token's limit, spend and state.
    Show { token_id: String },
    /// Revoke a token at once (kill switch).
    Revoke { token_id: String },
}

#[derive(Subcommand)]
enum BuyerCommand {
    /// Credit the buyer's prepaid balance (opens the account).
    Deposit {
        buyer_id: String,
        #[arg(long)]
        amount_usdc: Usdc,
        /// Makes the deposit once: the same reference again changes nothing.
        #[arg(long)]
        reference: Option<String>,
    },
    /// Show the buyer's balance, spend today, tier, limits and tokens.
    Show { buyer_id: String },
    /// Set the buyer's tier (its daily limit; opens the account).
    SetTier { buyer_id: String, tier: u32 },
    /// Revoke every token of the buyer at once (panic button).
    Revoke { buyer_id: String },
    /// Make a key with which the buyer manages its own tokens (`paystile-ledger me`, the
    /// console); prints it, shown this once.
    KeyCreate {
        buyer_id: String,
        #[arg(long)]
        label: Option<String>,
        /// A service the key may issue tokens for (repeat for more) [default: any].
        #[arg(long = "service")]
        services: Vec<String>,
        /// The largest cap of a token the key may issue, in USDC.
        #[arg(long)]
        max_limit_usdc: Option<Usdc>,
    },
    /// List the buyer's keys with their last use (never the keys themselves).
    Keys { buyer_id: String },
    /// Revoke one of the buyer's keys.
    KeyRevoke { buyer_id: String, key_id: String },
}

#[derive(Subcommand)]
enum ChargesCommand {
    /// Print one page of charges (JSON), oldest first; "nextCursor" continues it.
    List {
        #[command(flatten)]
        filters: ChargeFilters,
        /// Charges per page, 1 to 1000 [default: 100].
        #[arg(long)]
        limit: Option<u32>,
        /// A previous page's nextCursor.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Write every matching charge as CSV (RFC 4180) to standard output, page after page.
    Export {
        #[command(flatten)]
        filters: ChargeFilters,
        /// Charges per request, 1 to 1000.
        #[arg(long, default_value_t = crate::journal::MAX_LIMIT)]
        page_size: u32,
    },
    /// Print a service's calls, revenue, refusals and upstream error rate (live book).
    Summary {
        service_id: String,
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        to: Option<String>,
        /// Summarize the sandbox book instead of the live one.
        #[arg(long)]
        sandbox: bool,
    },
    /// Show one charge.
    Show {
        /// The charge id (ch_…), as in a response's X-Charge-Id.
        charge_id: String,
    },
}

#[derive(clap::Args)]
struct ChargeFilters {
    #[arg(long)]
    token_id: Option<String>,
    #[arg(long)]
    buyer_id: Option<String>,
    #[arg(long)]
    service_id: Option<String>,
    /// held, committed or released.
    #[arg(long, value_parser = parse_status)]
    status: Option<ChargeStatus>,
    /// x402-paid charges whose settlement is pending, submitted, settled, failed or void
    /// (failed: the served calls that went unpaid).
    #[arg(long)]
    settlement: Option<String>,
    /// true: the sandbox book only; false: the live book only [default: both].
    #[arg(long)]
    sandbox: Option<bool>,
    /// Created at or after this RFC 3339 time.
    #[arg(long)]
    from: Option<String>,
    /// Created before this RFC 3339 time.
    #[arg(long)]
    to: Option<String>,
}

impl ChargeFilters {
    fn query(self, limit: Option<u32>, cursor: Option<String>) -> ChargeQuery {
        ChargeQuery {
            token_id: self.token_id,
            buyer_id: self.buyer_id,
            service_id: self.service_id,
            status: self.status,
            settlement: self.settlement,
            sandbox: self.sandbox,
            from: self.from,
            to: self.to,
            limit,
            cursor,
            order: None,
        }
    }
}

fn parse_status(value: &str) -> Result<ChargeStatus, String> {
    serde_json::from_value(serde_json::Value::String(value.to_ascii_lowercase()))
        .map_err(|_| "expected held, committed or released".into())
}

fn parse_scope(value: &str) -> Result<Scope, String> {
    match value.to_ascii_uppercase().as_str() {
        "SINGLE" => Ok(Scope::Single),
        "ALL" => Ok(Scope::All),
        _ => Err("expected SINGLE or ALL".into()),
    }
}

pub fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(options) => serve(*options),
        Command::TokenKeys { file, command } => {
            let done = match command {
                TokenKeysCommand::Add { kid } => {
                    token_keys::add_key(&file, &kid).and_then(|jwk| print_or_say(&jwk))
                }
                TokenKeysCommand::Remove { kid } => token_keys::remove_key(&file, &kid),
                TokenKeysCommand::Public => {
                    TokenKeys::load(&file).and_then(|keys| print_or_say(&keys.public()))
                }
            };
            match done {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("paystile-ledger: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Token { admin, command } => admin_call(admin, |client| async move {
            match command {
                TokenCommand::Issue {
                    service_id,
                    limit_usdc,
                    buyer_id,
                    buyer_tag,
                    scope,
                    ttl_seconds,
                    expires_at,
                    sandbox,
                } => {
                    let request = IssueTokenRequest {
                        service_id,
                        limit_usdc,
                        buyer_id,
                        buyer_tag,
                        scope,
                        expires_at,
                        ttl_seconds,
                        sandbox,
                    };
                    print_json(&client.issue_token(&request).await?)
                }
                TokenCommand::Child {
                    parent_id,
                    limit_usdc,
                    service_id,
                    scope,
                    buyer_tag,
                    ttl_seconds,
                    expires_at,
                } => {
                    let request = ChildTokenRequest {
                        limit_usdc,
                        service_id,
                        scope,
                        buyer_tag,
                        expires_at,
                        ttl_seconds,
                    };
                    print_json(&client.mint_child(&parent_id, &request).await?)
                }
                TokenCommand::Show { token_id } => print_json(&client.token(&token_id).await?),
                TokenCommand::Revoke { token_id } => {
                    print_json(&client.revoke_token(&token_id).await?)
                }
            }
        }),
        Command::Buyer { admin, command } => admin_call(admin, |client| async move {
            match command {
                BuyerCommand::Deposit { buyer_id, amount_usdc, reference } => {
                    let request = DepositRequest { amount_usdc, reference };
                    print_json(&client.deposit(&buyer_id, &request).await?)
                }
                BuyerCommand::Show { buyer_id } => print_json(&client.buyer(&buyer_id).await?),
                BuyerCommand::SetTier { buyer_id, tier } => {
                    print_json(&client.set_tier(&buyer_id, tier).await?)
                }
                BuyerCommand::Revoke { buyer_id } => {
                    print_json(&client.revoke_buyer(&buyer_id).await?)
                }
                BuyerCommand::KeyCreate { buyer_id, label, services, max_limit_usdc } => {
                    let request = BuyerKeyRequest { label, services, max_limit_usdc };
                    print_json(&client.create_buyer_key(&buyer_id, &request).await?)
                }
                BuyerCommand::Keys { buyer_id } => print_json(&client.buyer_keys(&buyer_id).await?),
                BuyerCommand::KeyRevoke { buyer_id, key_id } => {
                    print_json(&client.revoke_buyer_key(&buyer_id, &key_id).await?)
                }
            }
        }),
        Command::Me { buyer, command } => buyer_call(buyer, |client| async move {
            match command {
                MeCommand::Show => print_json(&client.me().await?),
                MeCommand::Issue { service_id, limit_usdc, buyer_tag, ttl_seconds, expires_at } => {
                    let request = BuyerTokenRequest {
                        service_id,
                        limit_usdc,
                        buyer_tag,
                        expires_at,
                        ttl_seconds,
                    };
                    print_json(&client.issue_token(&request).await?)
                }
                MeCommand::Token { token_id } => print_json(&client.token(&token_id).await?),
                MeCommand::Revoke { token_id } => {
                    print_json(&client.revoke_token(&token_id).await?)
                }
                MeCommand::Panic => print_json(&client.revoke_all().await?),
                MeCommand::Child { parent_id, limit_usdc, ttl_seconds } => {
                    let request = ChildTokenRequest {
                        limit_usdc,
                        service_id: None,
                        scope: None,
                        buyer_tag: None,
                        expires_at: None,
                        ttl_seconds,
                    };
                    print_json(&client.mint_child(&parent_id, &request).await?)
                }
                MeCommand::Charges { token_id, service_id, from, to, limit, cursor } => {
                    let query = ChargeQuery {
                        token_id,
                        service_id,
                        from,
                        to,
                        limit,
                        cursor,
                        ..ChargeQuery::default()
                    };
                    print_json(&client.charges(&query).await?)
                }
                MeCommand::Export => {
                    let query = ChargeQuery {
                        limit: Some(crate::journal::MAX_LIMIT),
                        ..Default::default()
                    };
                    export(async |query| client.charges_csv(query).await, query).await
                }
            }
        }),
        Command::Charge { admin, charge_id } => {
            admin_call(admin, |client| async move { print_json(&client.charge(&charge_id).await?) })
        }
        Command::Charges { admin, command } => admin_call(admin, |client| async move {
            match command {
                ChargesCommand::List { filters, limit, cursor } => {
                    print_json(&client.charges(&filters.query(limit, cursor)).await?)
                }
                ChargesCommand::Export { filters, page_size } => {
                    export(
                        async |query| client.charges_csv(query).await,
                        filters.query(Some(page_size), None),
                    )
                    .await
                }
                ChargesCommand::Summary { service_id, from, to, sandbox } => print_json(
                    &client
                        .service_summary(&service_id, &SummaryQuery { sandbox, from, to })
                        .await?,
                ),
                ChargesCommand::Show { charge_id } => print_json(&client.charge(&charge_id).await?),
            }
        }),
        Command::SandboxPay { admin, invoice } => admin_call(admin, |client| async move {
            print_json(&client.pay_sandbox_invoice(&invoice).await?)
        }),
    }
}

fn serve(options: Options) -> ExitCode {
    let settings = match Settings::resolve(options) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("paystile-ledger: invalid settings: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(settings.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("paystile-ledger: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(crate::server::serve(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("paystile-ledger: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
}

fn admin_call<F, Fut>(admin: AdminArgs, call: F) -> ExitCode
where
    F: FnOnce(AdminClient) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let Some(admin_key) = admin.admin_key else {
        eprintln!("paystile-ledger: the admin key is required (--admin-key or PAYSTILE_ADMIN_KEY)");
        return ExitCode::from(2);
    };
    run(call(AdminClient::new(&admin.ledger.ledger_url, &admin_key)))
}

fn buyer_call<F, Fut>(buyer: BuyerArgs, call: F) -> ExitCode
where
    F: FnOnce(BuyerClient) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let Some(buyer_key) = buyer.buyer_key else {
        eprintln!("paystile-ledger: a buyer key is required (--buyer-key or PAYSTILE_BUYER_KEY)");
        return ExitCode::from(2);
    };
    run(call(BuyerClient::new(&buyer.ledger.ledger_url, &buyer_key)))
}

/// Runs a subcommand's call to the ledger.
fn run(call: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("paystile-ledger: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(call) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("paystile-ledger: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes every page of `query` as one CSV document: the header once, then each page's rows.
async fn export(
    page: impl AsyncFn(&ChargeQuery) -> Result<(String, Option<String>), ClientError>,
    mut query: ChargeQuery,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let mut first = true;
    loop {
        let (csv, next) = page(&query).await?;
        let rows =
            if first { csv.as_str() } else { csv.split_once("\r\n").map_or("", |(_, rows)| rows) };
        out.write_all(rows.as_bytes())?;
        first = false;
        match next {
            Some(cursor) => query.cursor = Some(cursor),
            None => return Ok(out.flush()?),
        }
    }
}

fn print_or_say(value: &impl Serialize) -> Result<(), String> {
    print_json(value).map_err(|e| e.to_string())
}

fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
