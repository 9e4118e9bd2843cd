//! The whole paystile stack on one machine: the demo upstream, the ledger binary on its
//! SQLite file, and Envoy with the filter in front.

use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;

use anyhow::Context;
use paystile_ledger::child::LedgerProcess;
use paystile_ledger::client::AdminClient;
use paystile_ledger::token_keys;
use paystile_protocol::jwk::{Jwk, Jwks};
use serde_json::Value;

use crate::envoy::{EnvoyConfig, EnvoyProcess};
use crate::paths;
use crate::upstream::{Upstream, UpstreamMode};

/// The cluster names in `envoy-config/envoy.yaml`.
const UPSTREAM_CLUSTER: &str = "demo_upstream";
const LEDGER_CLUSTER: &str = "paystile_ledger";

/// The keys the pieces share.
#[derive(Clone, Debug)]
pub struct Secrets {
    /// The ledger's admin API key.
    pub admin_key: String,
    /// The key the filter presents to the ledger.
    pub gateway_key: String,
    /// The ledger's Ed25519 Pay Token key (a private JWK): it signs the tokens the ledger
    /// issues; the filter is given its public half.
    pub token_key: Jwk,
    /// The HS256 Pay Token key (its UTF-8 bytes), still accepted beside EdDSA.
    pub token_secret: String,
    /// The secret L402 macaroons' root keys derive from (its UTF-8 bytes).
    pub l402_secret: String,
}

impl Secrets {
    pub fn random() -> Secrets {
        Secrets {
            admin_key: random_key("adm"),
            gateway_key: random_key("gw"),
            token_key: new_token_key("paystile-1"),
            token_secret: random_key("pts"),
            l402_secret: random_key("l402"),
        }
    }

    /// The public half of [`Secrets::token_key`], as gateways are configured with it.
    pub fn token_public_key(&self) -> Option<Jwk> {
        self.token_key.verifying_key().ok().as_ref().and_then(Jwk::public)
    }
}

/// A new Ed25519 Pay Token key `kid`, as a private JWK.
pub fn new_token_key(kid: &str) -> Jwk {
    Jwk::private(&rand::random::<[u8; 32]>(), kid)
}

/// `<prefix>_<128 random bits in hex>`.
pub fn random_key(prefix: &str) -> String {
    format!("{prefix}_{}", hex::encode(rand::random::<[u8; 16]>()))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ports {
    pub gateway: u16,
    pub envoy_admin: u16,
    pub ledger: u16,
    pub upstream: u16,
}

impl Ports {
    /// The demo's ports (DESIGN.md).
    pub const DEFAULT: Ports =
        Ports { gateway: 10000, envoy_admin: 9901, ledger: 8787, upstream: 8080 };
    /// Free ports, chosen by the system.
    pub const ANY: Ports = Ports { gateway: 0, envoy_admin: 0, ledger: 0, upstream: 0 };
}

pub struct StackOptions {
    pub ports: Ports,
    pub secrets: Secrets,
    /// Where the ledger's database, the configs and the logs go.
    pub dir: PathBuf,
    /// Merged into the filter configuration of `envoy.yaml` (JSON merge patch, RFC 7396).
    pub filter: Value,
    /// What runs where `envoy.yaml` has the paystile filter.
    pub http_filter: HttpFilter,
    /// Extra `paystile-ledger serve` flags.
    pub ledger_args: Vec<String>,
    pub envoy_workers: u32,
    /// Everything the filter and the ledger log (Envoy's `wasm` component at trace,
    /// `RUST_LOG=trace` for the ledger), for tests that read the logs; Envoy's own
    /// components stay at warning.
    pub verbose_logs: bool,
    /// How the demo upstream answers.
    pub upstream: UpstreamMode,
}

/// The HTTP filter in front of Envoy's router. Benchmarks compare the paystile filter with
/// bare Envoy and with Envoy's own filters on the same stack.
#[derive(Clone, Debug, PartialEq)]
pub enum HttpFilter {
    Paystile,
    /// Another filter (an `http_filters` entry) in the paystile filter's place.
    Other(Value),
    /// No filter before the router.
    Nothing,
}

pub struct Stack {
    pub upstream: Upstream,
    pub ledger: LedgerProcess,
    pub envoy: EnvoyProcess,
    pub admin: AdminClient,
    pub secrets: Secrets,
    /// The filter configuration Envoy runs.
    pub filter_config: Value,
    ledger_command: LedgerCommand,
    envoy_command: EnvoyCommand,
}

/// How to (re)start Envoy.
struct EnvoyCommand {
    config: EnvoyConfig,
    config_path: PathBuf,
    dir: PathBuf,
    workers: u32,
    wasm_log_level: &'static str,
}

impl EnvoyCommand {
    async fn start(&self) -> anyhow::Result<EnvoyProcess> {
        self.config.write(&self.config_path)?;
        EnvoyProcess::start(&self.config_path, &self.dir, self.workers, self.wasm_log_level).await
    }
}

/// How to (re)start the ledger on the same port and database.
struct LedgerCommand {
    binary: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    log: PathBuf,
}

impl LedgerCommand {
    fn start(&self, listen: SocketAddr) -> anyhow::Result<LedgerProcess> {
        let log = File::options().create(true).append(true).open(&self.log)?;
        let args = [self.args.clone(), vec!["--listen".into(), listen.to_string()]].concat();
        LedgerProcess::start(&self.binary, &args, &self.envs, Stdio::from(log))
            .with_context(|| format!("the ledger did not start; see {}", self.log.display()))
    }
}

impl Stack {
    pub async fn start(options: StackOptions) -> anyhow::Result<Stack> {
        let dir = &options.dir;
        std::fs::create_dir_all(dir)?;
        let localhost = |port| SocketAddr::from(([127, 0, 0, 1], port));

        let upstream = Upstream::start(localhost(options.ports.upstream), options.upstream)
            .await
            .with_context(|| {
            format!("cannot start the demo upstream on port {}", options.ports.upstream)
        })?;

        let database = dir.join("ledger.db");
        let token_keys = dir.join("token-keys.json");
        token_keys::write(&token_keys, &Jwks { keys: vec![options.secrets.token_key.clone()] })
            .map_err(anyhow::Error::msg)?;
        let mut envs: Vec<(String, String)> = vec![
            ("PAYSTILE_ADMIN_KEY".into(), options.secrets.admin_key.clone()),
            ("PAYSTILE_GATEWAY_KEY".into(), options.secrets.gateway_key.clone()),
            ("PAYSTILE_TOKEN_KEYS".into(), token_keys.display().to_string()),
            ("PAYSTILE_TOKEN_SECRET".into(), options.secrets.token_secret.clone()),
            ("PAYSTILE_L402_SECRET".into(), options.secrets.l402_secret.clone()),
            // The stack is for demos and tests: L402 invoices come from the sandbox.
            ("PAYSTILE_INVOICE_BACKEND".into(), "sandbox".into()),
        ];
        if options.verbose_logs {
            envs.push(("RUST_LOG".into(), "trace".into()));
        }
        let ledger_command = LedgerCommand {
            binary: paths::ledger_binary()?,
            args: [
                vec!["--database-url".into(), format!("sqlite://{}", database.display())],
                options.ledger_args,
            ]
            .concat(),
            envs,
            log: dir.join("ledger.log"),
        };
        let ledger = ledger_command.start(localhost(options.ports.ledger))?;

        let mut envoy_config = EnvoyConfig::demo()?;
        envoy_config.set_admin_port(options.ports.envoy_admin)?;
        envoy_config.set_listener_port(options.ports.gateway)?;
        envoy_config.set_cluster_port(UPSTREAM_CLUSTER, upstream.address().port())?;
        envoy_config.set_cluster_port(LEDGER_CLUSTER, ledger.address().port())?;
        envoy_config.set_filter_module(&paths::filter_wasm()?)?;
        let mut filter_config = envoy_config.filter_config()?;
        let public_key =
            options.secrets.token_public_key().context("the Pay Token key is not Ed25519")?;
        let secrets = serde_json::json!({
            "ledger": {"gateway_key": options.secrets.gateway_key},
            "pay_token": {
                // The ledger's public key (what its /.well-known/jwks.json serves), and the
                // HS256 secret for tokens minted with it.
                "keys": [public_key, {"alg": "HS256", "secret": options.secrets.token_secret}],
                "accept_sandbox": true,
            },
            // The ledger runs the sandbox backend, so the gateway takes its credentials.
            "l402": {"secret": options.secrets.l402_secret, "accept_sandbox": true},
        });
        merge_patch(&mut filter_config, &secrets);
        merge_patch(&mut filter_config, &options.filter);
        envoy_config.set_filter_config(&filter_config)?;
        match options.http_filter {
            HttpFilter::Paystile => {}
            HttpFilter::Other(filter) => envoy_config.replace_filter(Some(filter))?,
            HttpFilter::Nothing => envoy_config.replace_filter(None)?,
        }
        let mut envoy_command = EnvoyCommand {
            config: envoy_config,
            config_path: dir.join("envoy.json"),
            dir: dir.clone(),
            workers: options.envoy_workers,
            wasm_log_level: if options.verbose_logs { "trace" } else { "info" },
        };
        let envoy = envoy_command.start().await?;
        // A restart listens where this Envoy does, even if the system chose the port.
        envoy_command.config.set_listener_port(envoy.gateway().port())?;

        let admin = AdminClient::new(&ledger.url(), &options.secrets.admin_key);
        Ok(Stack {
            upstream,
            ledger,
            envoy,
            admin,
            secrets: options.secrets,
            filter_config,
            ledger_command,
            envoy_command,
        })
    }

    /// The gateway's URL for `path`.
    pub fn gateway_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.envoy.gateway())
    }

    /// Starts the ledger again (after a kill) on the same port and database.
    pub fn restart_ledger(&mut self) -> anyhow::Result<()> {
        self.ledger = self.ledger_command.start(self.ledger.address())?;
        Ok(())
    }

    /// Kills Envoy (`kill -9`, so the filter's queued settlements are lost with it) and
    /// starts it again on the same gateway port.
    pub async fn restart_envoy(&mut self) -> anyhow::Result<()> {
        self.envoy.kill()?;
        self.envoy = self.envoy_command.start().await?;
        Ok(())
    }

    /// Adds a gateway (an Envoy listener) `name` running the paystile filter with
    /// `filter_config`, whose `ledger.upstream` is made a new cluster sending to
    /// `ledger_port`, and restarts Envoy with it. The filter runs in the same VM as the
    /// gateway's (the shipped `vm_id`). Answers the new listener's address.
    pub async fn add_gateway(
        &mut self,
        name: &str,
        filter_config: &Value,
        ledger_port: u16,
    ) -> anyhow::Result<SocketAddr> {
        let cluster = format!("{LEDGER_CLUSTER}_{name}");
        let mut filter_config = filter_config.clone();
        filter_config["ledger"]["upstream"] = cluster.clone().into();
        let config = &mut self.envoy_command.config;
        config.add_cluster(LEDGER_CLUSTER, &cluster, ledger_port)?;
        config.add_gateway(name, &filter_config)?;
        self.restart_envoy().await?;
        self.envoy.listener(name).await
    }

    pub fn ledger_log(&self) -> String {
        std::fs::read_to_string(&self.ledger_command.log).unwrap_or_default()
    }
}

/// JSON merge patch (RFC 7396): objects merge, `null` removes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use serde_json::json;

    use super::*;

    #[test]
    fn merge_patch_follows_rfc_7396() {
        let mut target = json!({"a": "b", "c": {"d": "e", "f": "g"}, "keep": [1]});
        merge_patch(&mut target, &json!({"a": "z", "c": {"f": null, "new": 1}, "keep": [2]}));
        assert_eq!(target, json!({"a": "z", "c": {"d": "e", "new": 1}, "keep": [2]}));
    }

    #[test]
    fn the_shipped_envoy_config_has_every_field_the_stack_sets() {
        let mut config = EnvoyConfig::demo().unwrap();
        config.set_admin_port(1).unwrap();
        config.set_listener_port(2).unwrap();
        config.set_cluster_port(UPSTREAM_CLUSTER, 3).unwrap();
        config.set_cluster_port(LEDGER_CLUSTER, 4).unwrap();
        config.set_filter_module(Path::new("/x.wasm")).unwrap();
        let filter = config.filter_config().unwrap();
        assert_eq!(filter["ledger"]["upstream"], LEDGER_CLUSTER);
        // The shipped filter configuration is one the filter accepts.
        paystile_filter::config::Config::from_json(filter.to_string().as_bytes()).unwrap();
        assert!(config.set_cluster_port("no_such_cluster", 1).is_err());
    }
}
