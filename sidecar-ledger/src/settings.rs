//! The ledger's settings. Each comes from, in order: a flag, an environment variable, the
//! TOML file given by `--config`, the default.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use paystile_protocol::Usdc;
use paystile_protocol::x402::{Offer, OfferSettings};
use serde::Deserialize;

use paystile_protocol::jws::{Key, SigningKey};

use crate::rules::DailyLimits;
use crate::token_keys::TokenKeys;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8787";
pub const DEFAULT_DATABASE_URL: &str = "sqlite://paystile-ledger.db";
/// Idempotency-Keys are kept at least this long (seconds): Stripe's 24 hours, which
/// clients' retry policies assume.
pub const MIN_IDEMPOTENCY_RETENTION: u64 = 86_400;
/// Keys shorter than this are refused: they are guessable.
pub const MIN_KEY_LEN: usize = 16;

/// Every setting, each optional: what one source (flags and environment, or the file) says.
/// The field names are the config file's keys.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// TOML file with any of these settings (keys as the long flags, with underscores).
    #[arg(long, env = "PAYSTILE_LEDGER_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to listen on. Loopback by default: the filter's gateway runs beside it.
    #[arg(long, env = "PAYSTILE_LEDGER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Where the ledger keeps its books: sqlite://<path> (the file is created if missing), or
    /// postgres://[user[:password]@]host[:port]/dbname (its schema is migrated on start).
    #[arg(long, env = "PAYSTILE_LEDGER_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Key for the admin API (Authorization: Bearer <key>). Required.
    #[arg(long, env = "PAYSTILE_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// Key the gateway filter presents to reserve and settle holds. Required.
    #[arg(long, env = "PAYSTILE_GATEWAY_KEY", hide_env_values = true)]
    pub gateway_key: Option<String>,
    /// HS256 key of Pay Tokens (UTF-8 bytes, at least 32 characters): tokens minted
    /// elsewhere with it are verified and metered, and the ledger issues with it when it has
    /// no Ed25519 key (`token_keys`).
    #[arg(long, env = "PAYSTILE_TOKEN_SECRET", hide_env_values = true)]
    pub token_secret: Option<String>,
    /// File of the ledger's Ed25519 Pay Token keys (a JWK set; `paystile-ledger token-keys
    /// add` makes and rotates it): the first private key signs issued tokens, every key
    /// verifies, and their public halves are published at /.well-known/jwks.json.
    #[arg(long, env = "PAYSTILE_TOKEN_KEYS")]
    pub token_keys: Option<PathBuf>,
    /// `kid` to put in the headers of HS256 tokens it issues (key rotation).
    #[arg(long, env = "PAYSTILE_TOKEN_KID")]
    pub token_kid: Option<String>,
    /// `iss` of issued tokens [default: paystile].
    #[arg(long, env = "PAYSTILE_TOKEN_ISSUER")]
    pub token_issuer: Option<String>,
    /// `aud` of issued tokens [default: none].
    #[arg(long, env = "PAYSTILE_TOKEN_AUDIENCE")]
    pub token_audience: Option<String>,
    /// Lifetime of issued tokens that ask for none [default: 86400].
    #[arg(long, env = "PAYSTILE_TOKEN_TTL_SECONDS")]
    pub token_ttl_seconds: Option<u64>,
    /// A hold not settled within this time is released [default: 120].
    #[arg(long, env = "PAYSTILE_HOLD_TTL_SECONDS")]
    pub hold_ttl_seconds: Option<u64>,
    /// How often a charged call may be replayed under its Idempotency-Key; each replay
    /// reaches the upstream again without a new charge [default: 5].
    #[arg(long, env = "PAYSTILE_MAX_REPLAYS")]
    pub max_replays: Option<u32>,
    /// Daily spending limit of each buyer tier in USDC, tier 1 first, comma-separated
    /// [default: 10,1000,50000]. Applies to buyers with an account.
    #[arg(long, env = "PAYSTILE_DAILY_LIMITS_USDC", value_delimiter = ',')]
    pub daily_limits_usdc: Option<Vec<Usdc>>,
    /// The services this ledger sells, comma-separated: buyers issue tokens for these only,
    /// and the console lists them. Unset: any service id.
    #[arg(long, env = "PAYSTILE_SERVICES", value_delimiter = ',')]
    pub services: Option<Vec<String>>,
    /// Test only: seconds added to the ledger's clock (days roll over at UTC midnight).
    #[arg(long, env = "PAYSTILE_CLOCK_OFFSET_SECONDS", hide = true, allow_hyphen_values = true)]
    #[serde(skip)]
    pub clock_offset_seconds: Option<i64>,
    /// How long an Idempotency-Key keeps its outcome, counted from when it was recorded; a
    /// key whose charge is still held is kept longer. At least a day, as Stripe keeps
    /// them [default: 86400].
    #[arg(long, env = "PAYSTILE_IDEMPOTENCY_RETENTION_SECONDS")]
    pub idempotency_retention_seconds: Option<u64>,
    /// How often expired holds are looked for [default: 1].
    #[arg(long, env = "PAYSTILE_SWEEP_INTERVAL_SECONDS")]
    pub sweep_interval_seconds: Option<u64>,
    /// Log format [default: text].
    #[arg(long, env = "PAYSTILE_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Secret that L402 macaroons' root keys derive from (UTF-8 bytes, at least 32
    /// characters); the filter holds the same one. Without it, L402 is off.
    #[arg(long, env = "PAYSTILE_L402_SECRET", hide_env_values = true)]
    pub l402_secret: Option<String>,
    /// Where L402 invoices come from: `lnd`, or `sandbox` (the ledger signs regtest invoices
    /// itself and pays them on request; for demos and tests only). Required with L402.
    #[arg(long, env = "PAYSTILE_INVOICE_BACKEND", value_enum)]
    pub invoice_backend: Option<InvoiceBackendKind>,
    /// LND's REST address, e.g. https://127.0.0.1:8080.
    #[arg(long, env = "PAYSTILE_LND_URL")]
    pub lnd_url: Option<String>,
    /// LND macaroon file allowing invoice creation (invoice.macaroon).
    #[arg(long, env = "PAYSTILE_LND_MACAROON")]
    pub lnd_macaroon: Option<PathBuf>,
    /// LND's TLS certificate (tls.cert, PEM), pinned: LND must present exactly it. Without
    /// it, the system roots verify LND's certificate.
    #[arg(long, env = "PAYSTILE_LND_TLS_CERT")]
    pub lnd_tls_cert: Option<PathBuf>,
    /// The chain x402 payments are taken on: eip155:<chain id> (eip155:8453 is Base), base
    /// or base-sepolia. With x402_pay_to, x402 is on; the filter offers the same.
    #[arg(long, env = "PAYSTILE_X402_NETWORK")]
    pub x402_network: Option<String>,
    /// The seller's address, which x402 payments transfer to.
    #[arg(long, env = "PAYSTILE_X402_PAY_TO")]
    pub x402_pay_to: Option<String>,
    /// The token's address [default: USDC, on Base and Base Sepolia].
    #[arg(long, env = "PAYSTILE_X402_ASSET")]
    pub x402_asset: Option<String>,
    /// The token's EIP-712 domain name [default: USDC's, on Base and Base Sepolia].
    #[arg(long, env = "PAYSTILE_X402_ASSET_NAME")]
    pub x402_asset_name: Option<String>,
    /// The token's EIP-712 domain version [default: USDC's, on Base and Base Sepolia].
    #[arg(long, env = "PAYSTILE_X402_ASSET_VERSION")]
    pub x402_asset_version: Option<String>,
    /// How long a payment may stay valid, as the filter offers it [default: 60].
    #[arg(long, env = "PAYSTILE_X402_MAX_TIMEOUT_SECONDS")]
    pub x402_max_timeout_seconds: Option<u64>,
    /// Who settles payments: `direct` (this ledger sends each transfer to x402_rpc_url with
    /// its settler key) or `facilitator` (an x402 facilitator at x402_facilitator_url).
    #[arg(long, env = "PAYSTILE_X402_SETTLEMENT", value_enum)]
    pub x402_settlement: Option<SettlementKind>,
    /// The chain's JSON-RPC URL (direct settlement).
    #[arg(long, env = "PAYSTILE_X402_RPC_URL")]
    pub x402_rpc_url: Option<String>,
    /// The settler's private key, 0x and 64 hex digits (direct settlement): it pays the gas
    /// of each transfer, and can move nobody's tokens but its own.
    #[arg(long, env = "PAYSTILE_X402_SETTLER_KEY", hide_env_values = true)]
    pub x402_settler_key: Option<String>,
    /// The x402 facilitator's base URL, e.g. https://x402.org/facilitator (facilitator
    /// settlement).
    #[arg(long, env = "PAYSTILE_X402_FACILITATOR_URL")]
    pub x402_facilitator_url: Option<String>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SettlementKind {
    Direct,
    Facilitator,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InvoiceBackendKind {
    Lnd,
    Sandbox,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// A secret that never shows in logs or debug output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(secret: impl Into<String>) -> Secret {
        Secret(secret.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Where the books are, chosen by the database URL's scheme.
#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    Sqlite(PathBuf),
    Postgres(PostgresUrl),
}

/// Shown without any password: the server logs it.
impl fmt::Display for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Database::Sqlite(path) => write!(f, "sqlite://{}", path.display()),
            Database::Postgres(url) => fmt::Display::fmt(url, f),
        }
    }
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Database::Sqlite(path) => f.debug_tuple("Sqlite").field(path).finish(),
            Database::Postgres(url) => f.debug_tuple("Postgres").field(url).finish(),
        }
    }
}

/// A `postgres://` or `postgresql://` URL, as libpq reads it (user, password, hosts, ports,
/// database name, and parameters such as `connect_timeout` or `application_name`). It may
/// carry a password, so it shows only as `postgres://user@host:port/dbname`.
#[derive(Clone)]
pub struct PostgresUrl {
    url: Secret,
    /// Boxed: it is large, and `Database` is mostly SQLite.
    config: Box<tokio_postgres::Config>,
}

impl PostgresUrl {
    /// Parses `url`; the error never repeats it (it may hold a password).
    pub fn parse(url: &str) -> Result<PostgresUrl, String> {
        if !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
            return Err("expected postgres://[user[:password]@]host[:port]/dbname".into());
        }
        let config: Box<tokio_postgres::Config> =
            Box::new(url.parse().map_err(|e: tokio_postgres::Error| {
                // The causes name options, never their values.
                format!("not a valid PostgreSQL URL: {}", crate::store::error_chain(&e))
            })?);
        // No TLS connector is built in yet: say so now rather than at the first connection.
        if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
            return Err("sslmode=require: this ledger connects without TLS (yet)".into());
        }
        if config.get_dbname().is_none() {
            return Err("the PostgreSQL URL names no database (postgres://host/dbname)".into());
        }
        Ok(PostgresUrl { url: Secret(url.to_owned()), config })
    }

    /// The connection settings, password included.
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }
}

impl PartialEq for PostgresUrl {
    fn eq(&self, other: &PostgresUrl) -> bool {
        self.url == other.url
    }
}

impl Eq for PostgresUrl {}

impl fmt::Display for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use tokio_postgres::config::Host;
        let config = &self.config;
        f.write_str("postgres://")?;
        if let Some(user) = config.get_user() {
            write!(f, "{user}@")?;
        }
        let ports = config.get_ports();
        for (i, host) in config.get_hosts().iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match host {
                Host::Tcp(name) if name.contains(':') => write!(f, "[{name}]")?,
                Host::Tcp(name) => f.write_str(name)?,
                #[cfg(unix)]
                Host::Unix(path) => write!(f, "{}", path.display())?,
            }
            // One port for all hosts, or one each.
            if let Some(port) = ports.get(i).or(ports.first()) {
                write!(f, ":{port}")?;
            }
        }
        write!(f, "/{}", config.get_dbname().unwrap_or_default())
    }
}

impl fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// Pay Token keys and what issued tokens say.
#[derive(Clone, Debug)]
pub struct TokenSettings {
    /// The HS256 secret, if any.
    pub secret: Option<Secret>,
    /// The HS256 secret's `kid`.
    pub kid: Option<String>,
    /// The Ed25519 keys of `token_keys`.
    pub keys: TokenKeys,
    pub issuer: String,
    pub audience: Option<String>,
    pub ttl: Duration,
}

impl TokenSettings {
    /// The key issued tokens are signed with: the first Ed25519 key, else the HS256 secret.
    pub fn signing_key(&self) -> Option<SigningKey> {
        if let Some(key) = &self.keys.signing {
            return Some(key.clone());
        }
        let key = SigningKey::hs256(self.secret.as_ref()?.expose().as_bytes());
        Some(match &self.kid {
            Some(kid) => key.with_kid(kid),
            None => key,
        })
    }

    /// Every key a Pay Token may be signed with.
    pub fn verifying_keys(&self) -> Vec<Key> {
        let mut keys = self.keys.verifying.clone();
        if let Some(secret) = &self.secret {
            let key = Key::hs256(secret.expose().as_bytes());
            keys.push(match &self.kid {
                Some(kid) => key.with_kid(kid),
                None => key,
            });
        }
        keys
    }
}

/// The shortest Pay Token secret accepted, as the filter requires.
pub const MIN_TOKEN_SECRET_LEN: usize = 32;
/// The shortest L402 secret accepted: every macaroon's root key derives from it.
pub const MIN_L402_SECRET_LEN: usize = 32;

#[derive(Clone, Debug)]
pub struct L402Settings {
    pub secret: Secret,
    pub backend: InvoiceBackendSettings,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InvoiceBackendSettings {
    Sandbox,
    Lnd(LndSettings),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LndSettings {
    pub url: String,
    pub macaroon: PathBuf,
    pub tls_cert: Option<PathBuf>,
}

/// x402: what is accepted, and who settles it.
#[derive(Clone, Debug)]
pub struct X402Settings {
    pub offer: Offer,
    pub settlement: SettlementSettings,
}

#[derive(Clone, Debug)]
pub enum SettlementSettings {
    Direct { rpc_url: String, settler_key: Secret },
    Facilitator { url: String },
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    pub database: Database,
    pub admin_key: Secret,
    pub gateway_key: Secret,
    pub token: TokenSettings,
    pub hold_ttl: Duration,
    pub max_replays: u32,
    pub daily_limits: DailyLimits,
    /// The services buyers may issue tokens for; empty: any.
    pub services: Vec<String>,
    pub clock_offset_seconds: i64,
    pub idempotency_retention: Duration,
    pub sweep_interval: Duration,
    pub log_format: LogFormat,
    pub l402: Option<L402Settings>,
    pub x402: Option<X402Settings>,
}

/// A setting that is missing or wrong; the message names it.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct SettingsError {
    pub field: &'static str,
    pub problem: String,
}

fn problem(field: &'static str, problem: impl Into<String>) -> SettingsError {
    SettingsError { field, problem: problem.into() }
}

impl Options {
    /// Each setting from `self` where given, else from `lower`.
    fn or(self, lower: Options) -> Options {
        Options {
            config: self.config.or(lower.config),
            listen: self.listen.or(lower.listen),
            database_url: self.database_url.or(lower.database_url),
            admin_key: self.admin_key.or(lower.admin_key),
            gateway_key: self.gateway_key.or(lower.gateway_key),
            token_secret: self.token_secret.or(lower.token_secret),
            token_keys: self.token_keys.or(lower.token_keys),
            token_kid: self.token_kid.or(lower.token_kid),
            token_issuer: self.token_issuer.or(lower.token_issuer),
            token_audience: self.token_audience.or(lower.token_audience),
            token_ttl_seconds: self.token_ttl_seconds.or(lower.token_ttl_seconds),
            hold_ttl_seconds: self.hold_ttl_seconds.or(lower.hold_ttl_seconds),
            max_replays: self.max_replays.or(lower.max_replays),
            daily_limits_usdc: self.daily_limits_usdc.or(lower.daily_limits_usdc),
            services: self.services.or(lower.services),
            clock_offset_seconds: self.clock_offset_seconds.or(lower.clock_offset_seconds),
            idempotency_retention_seconds: self
                .idempotency_retention_seconds
                .or(lower.idempotency_retention_seconds),
            sweep_interval_seconds: self.sweep_interval_seconds.or(lower.sweep_interval_seconds),
            log_format: self.log_format.or(lower.log_format),
            l402_secret: self.l402_secret.or(lower.l402_secret),
            invoice_backend: self.invoice_backend.or(lower.invoice_backend),
            lnd_url: self.lnd_url.or(lower.lnd_url),
            lnd_macaroon: self.lnd_macaroon.or(lower.lnd_macaroon),
            lnd_tls_cert: self.lnd_tls_cert.or(lower.lnd_tls_cert),
            x402_network: self.x402_network.or(lower.x402_network),
            x402_pay_to: self.x402_pay_to.or(lower.x402_pay_to),
            x402_asset: self.x402_asset.or(lower.x402_asset),
            x402_asset_name: self.x402_asset_name.or(lower.x402_asset_name),
            x402_asset_version: self.x402_asset_version.or(lower.x402_asset_version),
            x402_max_timeout_seconds: self
                .x402_max_timeout_seconds
                .or(lower.x402_max_timeout_seconds),
            x402_settlement: self.x402_settlement.or(lower.x402_settlement),
            x402_rpc_url: self.x402_rpc_url.or(lower.x402_rpc_url),
            x402_settler_key: self.x402_settler_key.or(lower.x402_settler_key),
            x402_facilitator_url: self.x402_facilitator_url.or(lower.x402_facilitator_url),
        }
    }
}

impl Settings {
    /// Resolves flags and environment (`given`) over the config file, then defaults.
    pub fn resolve(given: Options) -> Result<Settings, SettingsError> {
        let from_file = match &given.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    problem("config", format!("cannot read {}: {e}", path.display()))
                })?;
                toml::from_str(&text)
                    .map_err(|e| problem("config", format!("{}: {e}", path.display())))?
            }
            None => Options::default(),
        };
        Settings::from_options(given.or(from_file))
    }

    fn from_options(options: Options) -> Result<Settings, SettingsError> {
        let l402 = l402_settings(&options)?;
        let x402 = x402_settings(&options)?;
        let admin_key =
            required_key("admin_key", "--admin-key, PAYSTILE_ADMIN_KEY", options.admin_key)?;
        let gateway_key = required_key(
            "gateway_key",
            "--gateway-key, PAYSTILE_GATEWAY_KEY",
            options.gateway_key,
        )?;
        if admin_key == gateway_key {
            return Err(problem("gateway_key", "must differ from admin_key"));
        }
        let secret = match options.token_secret {
            // RFC 7518 §3.2: an HS256 key has at least 256 bits.
            Some(secret) if secret.chars().count() < MIN_TOKEN_SECRET_LEN => {
                return Err(problem(
                    "token_secret",
                    format!(
                        "must be at least {MIN_TOKEN_SECRET_LEN} characters (RFC 7518: 256 bits)"
                    ),
                ));
            }
            secret => secret.map(Secret),
        };
        let keys = match &options.token_keys {
            Some(path) => TokenKeys::load(path).map_err(|e| problem("token_keys", e))?,
            None => TokenKeys::default(),
        };
        let token = TokenSettings {
            secret,
            kid: options.token_kid,
            keys,
            issuer: options.token_issuer.unwrap_or_else(|| "paystile".into()),
            audience: options.token_audience,
            ttl: Duration::from_secs(positive(
                "token_ttl_seconds",
                options.token_ttl_seconds,
                86_400,
            )?),
        };
        let database_url = options.database_url.unwrap_or_else(|| DEFAULT_DATABASE_URL.into());
        let database = match database_url.strip_prefix("sqlite://") {
            Some(path) if !path.is_empty() => Database::Sqlite(PathBuf::from(path)),
            Some(_) => return Err(problem("database_url", "expected sqlite://<path>")),
            None if database_url.starts_with("postgres://")
                || database_url.starts_with("postgresql://") =>
            {
                Database::Postgres(
                    PostgresUrl::parse(&database_url).map_err(|e| problem("database_url", e))?,
                )
            }
            None => {
                return Err(problem(
                    "database_url",
                    "expected sqlite://<path> or postgres://[user[:password]@]host[:port]/dbname",
                ));
            }
        };
        let listen = match options.listen {
            Some(listen) => listen,
            None => DEFAULT_LISTEN.parse().map_err(|_| problem("listen", "bad default"))?,
        };
        Ok(Settings {
            listen,
            database,
            admin_key,
            gateway_key,
            token,
            hold_ttl: Duration::from_secs(positive(
                "hold_ttl_seconds",
                options.hold_ttl_seconds,
                120,
            )?),
            max_replays: options.max_replays.unwrap_or(5),
            daily_limits: match options.daily_limits_usdc {
                None => DailyLimits::default(),
                Some(limits) if limits.iter().any(|limit| limit.is_zero()) => {
                    return Err(problem("daily_limits_usdc", "every limit must be greater than 0"));
                }
                Some(limits) => DailyLimits::new(limits)
                    .ok_or_else(|| problem("daily_limits_usdc", "give at least one tier"))?,
            },
            services: services(options.services)?,
            clock_offset_seconds: options.clock_offset_seconds.unwrap_or(0),
            idempotency_retention: Duration::from_secs(
                match options.idempotency_retention_seconds.unwrap_or(MIN_IDEMPOTENCY_RETENTION) {
                    seconds if seconds < MIN_IDEMPOTENCY_RETENTION => {
                        return Err(problem(
                            "idempotency_retention_seconds",
                            format!(
                                "must be at least {MIN_IDEMPOTENCY_RETENTION} (24 hours: clients retry for that long)"
                            ),
                        ));
                    }
                    seconds => seconds,
                },
            ),
            sweep_interval: Duration::from_secs(positive(
                "sweep_interval_seconds",
                options.sweep_interval_seconds,
                1,
            )?),
            log_format: options.log_format.unwrap_or_default(),
            l402,
            x402,
        })
    }
}

/// The services given, each a valid id, once each, in byte order.
fn services(given: Option<Vec<String>>) -> Result<Vec<String>, SettingsError> {
    let mut services = given.unwrap_or_default();
    for service in &services {
        paystile_protocol::pay_token::check_id(service)
            .map_err(|id_problem| problem("services", format!("a service id {id_problem}")))?;
    }
    services.sort();
    services.dedup();
    Ok(services)
}

fn x402_settings(options: &Options) -> Result<Option<X402Settings>, SettingsError> {
    let (network, pay_to) = match (&options.x402_network, &options.x402_pay_to) {
        (None, None) => {
            if options.x402_settlement.is_some() {
                return Err(problem("x402_network", "required when x402_settlement is set"));
            }
            return Ok(None);
        }
        (Some(network), Some(pay_to)) => (network, pay_to),
        (None, Some(_)) => return Err(problem("x402_network", "required with x402_pay_to")),
        (Some(_), None) => return Err(problem("x402_pay_to", "required with x402_network")),
    };
    let offer = Offer::from_settings(&OfferSettings {
        network,
        pay_to,
        asset: options.x402_asset.as_deref(),
        asset_name: options.x402_asset_name.as_deref(),
        asset_version: options.x402_asset_version.as_deref(),
        max_timeout_seconds: options.x402_max_timeout_seconds,
    })
    .map_err(|error| {
        let field = match error.field {
            "network" => "x402_network",
            "pay_to" => "x402_pay_to",
            "asset" => "x402_asset",
            "asset_name" => "x402_asset_name",
            "asset_version" => "x402_asset_version",
            _ => "x402_max_timeout_seconds",
        };
        problem(field, error.message)
    })?;
    let url = |field, value: &Option<String>| -> Result<String, SettingsError> {
        let value = value.clone().ok_or_else(|| problem(field, "required"))?;
        if !value.starts_with("https://") && !value.starts_with("http://") {
            return Err(problem(field, "expected an http:// or https:// URL"));
        }
        Ok(value)
    };
    let settlement = match options.x402_settlement {
        None => {
            return Err(problem("x402_settlement", "required with x402: direct or facilitator"));
        }
        Some(SettlementKind::Direct) => {
            let rpc_url = url("x402_rpc_url", &options.x402_rpc_url)?;
            let key = options
                .x402_settler_key
                .clone()
                .ok_or_else(|| problem("x402_settler_key", "required with direct settlement"))?;
            let digits = key.strip_prefix("0x").unwrap_or(&key);
            if digits.len() != 64 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(problem("x402_settler_key", "expected 0x and 64 hex digits"));
            }
            SettlementSettings::Direct { rpc_url, settler_key: Secret(key) }
        }
        Some(SettlementKind::Facilitator) => SettlementSettings::Facilitator {
            url: url("x402_facilitator_url", &options.x402_facilitator_url)?
                .trim_end_matches('/')
                .to_owned(),
        },
    };
    Ok(Some(X402Settings { offer, settlement }))
}

fn l402_settings(options: &Options) -> Result<Option<L402Settings>, SettingsError> {
    let Some(secret) = &options.l402_secret else {
        return match options.invoice_backend {
            Some(_) => Err(problem("l402_secret", "required when invoice_backend is set")),
            None => Ok(None),
        };
    };
    if secret.chars().count() < MIN_L402_SECRET_LEN {
        return Err(problem(
            "l402_secret",
            format!("must be at least {MIN_L402_SECRET_LEN} characters"),
        ));
    }
    let backend = match options.invoice_backend {
        None => {
            return Err(problem("invoice_backend", "required with l402_secret: lnd or sandbox"));
        }
        Some(InvoiceBackendKind::Sandbox) => InvoiceBackendSettings::Sandbox,
        Some(InvoiceBackendKind::Lnd) => {
            let url = options
                .lnd_url
                .clone()
                .ok_or_else(|| problem("lnd_url", "required with invoice_backend = lnd"))?;
            if !url.starts_with("https://") && !url.starts_with("http://") {
                return Err(problem("lnd_url", "expected https://host:port"));
            }
            let macaroon = options
                .lnd_macaroon
                .clone()
                .ok_or_else(|| problem("lnd_macaroon", "required with invoice_backend = lnd"))?;
            InvoiceBackendSettings::Lnd(LndSettings {
                url,
                macaroon,
                tls_cert: options.lnd_tls_cert.clone(),
            })
        }
    };
    Ok(Some(L402Settings { secret: Secret(secret.clone()), backend }))
}

fn required_key(
    field: &'static str,
    sources: &str,
    key: Option<String>,
) -> Result<Secret, SettingsError> {
    let key = key.ok_or_else(|| {
        problem(field, format!("required ({sources}, or {field} in the config file)"))
    })?;
    if key.chars().count() < MIN_KEY_LEN {
        return Err(problem(field, format!("must be at least {MIN_KEY_LEN} characters")));
    }
    Ok(Secret(key))
}

fn positive(field: &'static str, value: Option<u64>, default: u64) -> Result<u64, SettingsError> {
    match value.unwrap_or(default) {
        0 => Err(problem(field, "must be greater than 0")),
        value => Ok(value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Options {
        Options {
            admin_key: Some("admin-key-0123456789".into()),
            gateway_key: Some("gateway-key-0123456789".into()),
            ..Options::default()
        }
    }

    #[test]
    fn defaults_are_loopback_and_an_embedded_file() {
        let settings = Settings::from_options(keys()).unwrap();
        assert_eq!(settings.listen.to_string(), DEFAULT_LISTEN);
        assert!(settings.listen.ip().is_loopback());
        assert_eq!(settings.database, Database::Sqlite("paystile-ledger.db".into()));
        assert_eq!(settings.hold_ttl, Duration::from_secs(120));
        assert_eq!(settings.idempotency_retention, Duration::from_secs(86_400));
        assert!(
            settings.token.signing_key().is_none() && settings.token.verifying_keys().is_empty()
        );
    }

    #[test]
    fn problems_name_the_setting() {
        let error = |options: Options| Settings::from_options(options).unwrap_err().to_string();
        assert!(error(Options { admin_key: None, ..keys() }).starts_with("admin_key: required"));
        assert!(
            error(Options { gateway_key: Some("short".into()), ..keys() })
                .starts_with("gateway_key: must be at least")
        );
        assert_eq!(
            error(Options { gateway_key: keys().admin_key, ..keys() }),
            "gateway_key: must differ from admin_key"
        );
        assert!(
            error(Options { database_url: Some("mysql://x".into()), ..keys() })
                .starts_with("database_url:")
        );
        assert!(
            error(Options { hold_ttl_seconds: Some(0), ..keys() }).starts_with("hold_ttl_seconds:")
        );
        assert_eq!(
            error(Options { idempotency_retention_seconds: Some(86_399), ..keys() }),
            "idempotency_retention_seconds: must be at least 86400 (24 hours: clients retry for that long)"
        );
        let week = Options { idempotency_retention_seconds: Some(604_800), ..keys() };
        assert_eq!(
            Settings::from_options(week).unwrap().idempotency_retention,
            Duration::from_secs(604_800)
        );
        assert!(
            error(Options { token_secret: Some("s".repeat(31)), ..keys() })
                .starts_with("token_secret: must be at least 32")
        );
    }

    #[test]
    fn l402_needs_a_long_secret_and_a_backend() {
        let secret = Some("an-l402-secret-of-32-characters!".to_owned());
        let error = |options: Options| Settings::from_options(options).unwrap_err().to_string();
        assert!(
            error(Options { l402_secret: Some("short".into()), ..keys() })
                .starts_with("l402_secret:")
        );
        assert!(
            error(Options { l402_secret: secret.clone(), ..keys() })
                .starts_with("invoice_backend:")
        );
        assert!(
            error(Options { invoice_backend: Some(InvoiceBackendKind::Sandbox), ..keys() })
                .starts_with("l402_secret:")
        );
        let lnd = Options {
            l402_secret: secret.clone(),
            invoice_backend: Some(InvoiceBackendKind::Lnd),
            ..keys()
        };
        assert!(error(Options { ..lnd }).starts_with("lnd_url:"));
        let lnd = Options {
            l402_secret: secret.clone(),
            invoice_backend: Some(InvoiceBackendKind::Lnd),
            lnd_url: Some("https://127.0.0.1:8080".into()),
            ..keys()
        };
        assert!(error(lnd).starts_with("lnd_macaroon:"));
        let sandbox = Options {
            l402_secret: secret,
            invoice_backend: Some(InvoiceBackendKind::Sandbox),
            ..keys()
        };
        let settings = Settings::from_options(sandbox).unwrap();
        assert_eq!(settings.l402.unwrap().backend, InvoiceBackendSettings::Sandbox);
        assert!(Settings::from_options(keys()).unwrap().l402.is_none());
    }

    #[test]
    fn flags_and_environment_win_over_the_file() {
        let file: Options = toml::from_str(
            "listen = \"127.0.0.1:9999\"\nhold_ttl_seconds = 30\nadmin_key = \"from-file-0123456789\"",
        )
        .unwrap();
        let given = Options { hold_ttl_seconds: Some(5), ..keys() };
        let settings = Settings::from_options(given.or(file)).unwrap();
        assert_eq!(settings.listen.to_string(), "127.0.0.1:9999");
        assert_eq!(settings.hold_ttl, Duration::from_secs(5));
        assert_eq!(settings.admin_key.expose(), "admin-key-0123456789");
        assert!(!format!("{settings:?}").contains("0123456789"), "secrets leak into Debug");
    }

    #[test]
    fn postgres_urls_choose_postgres_and_never_show_their_password() {
        let database = |url: &str| {
            Settings::from_options(Options { database_url: Some(url.into()), ..keys() })
                .map(|settings| settings.database)
                .map_err(|e| e.to_string())
        };
        for (url, shown) in [
            (
                "postgres://ledger:hunter2pw@db.internal:6432/books",
                "postgres://ledger@db.internal:6432/books",
            ),
            (
                "postgresql://ledger:hunter2pw@[::1]/books?sslmode=disable",
                "postgres://ledger@[::1]:5432/books",
            ),
            (
                "postgres://127.0.0.1/books?user=ledger&password=hunter2pw",
                "postgres://ledger@127.0.0.1:5432/books",
            ),
        ] {
            let database = database(url).unwrap();
            let Database::Postgres(parsed) = &database else { panic!("{url}: {database:?}") };
            assert_eq!(parsed.config().get_password(), Some(&b"hunter2pw"[..]));
            assert_eq!(database.to_string(), shown);
            assert_eq!(format!("{database:?}"), format!("Postgres(\"{shown}\")"));
            let settings =
                Settings::from_options(Options { database_url: Some(url.into()), ..keys() });
            assert!(!format!("{settings:?}").contains("hunter2pw"), "{url}");
        }
        for (url, problem) in [
            ("postgres://ledger:hunter2pw@host:port/books", "invalid value for option `port`"),
            ("postgres://ledger:hunter2pw@host", "names no database"),
            ("postgres://ledger:hunter2pw@host/books?colour=red", "unknown option `colour`"),
            ("postgres://ledger:hunter2pw@host/books?sslmode=require", "without TLS"),
        ] {
            let error = database(url).unwrap_err();
            assert!(error.starts_with("database_url:") && error.contains(problem), "{error}");
            assert!(!error.contains("hunter2pw"), "{error}");
        }
        assert_eq!(database("sqlite://ledger.db").unwrap().to_string(), "sqlite://ledger.db");
    }

    #[test]
    fn daily_limits_are_tiers_of_positive_amounts() {
        let limits = |given: Option<Vec<&str>>| {
            let given = given.map(|l| l.into_iter().map(|a| a.parse().unwrap()).collect());
            Settings::from_options(Options { daily_limits_usdc: given, ..keys() })
                .map(|settings| settings.daily_limits)
                .map_err(|e| e.to_string())
        };
        let default = limits(None).unwrap();
        assert_eq!(
            [1, 2, 3, 4].map(|tier| default.of_tier(tier).to_string()),
            ["10.000000", "1000.000000", "50000.000000", "50000.000000"]
        );
        assert_eq!(limits(Some(vec!["5", "7.5"])).unwrap().tiers(), 2);
        assert!(limits(Some(vec![])).unwrap_err().starts_with("daily_limits_usdc:"));
        assert!(limits(Some(vec!["5", "0"])).unwrap_err().starts_with("daily_limits_usdc:"));
        let file: Options = toml::from_str(r#"daily_limits_usdc = ["1", "2"]"#).unwrap();
        assert_eq!(file.daily_limits_usdc.map(|l| l.len()), Some(2));
    }

    #[test]
    fn the_file_refuses_unknown_keys() {
        let error = toml::from_str::<Options>("hold_ttl = 3").unwrap_err().to_string();
        assert!(error.contains("unknown field `hold_ttl`"), "{error}");
    }
}
