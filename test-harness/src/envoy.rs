//! Envoy, configured from `envoy-config/envoy.yaml`: the shipped file, with only its ports,
//! the filter's path and the filter's configuration changed.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde_json::Value;

use crate::paths;

const LISTENER: &str = "gateway";
const CONNECTION_MANAGER: &str = "envoy.filters.network.http_connection_manager";
const FILTER: &str = "paystile";
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// The demo's Envoy configuration, as JSON, to adjust before running it.
pub struct EnvoyConfig(Value);

impl EnvoyConfig {
    pub fn demo() -> anyhow::Result<EnvoyConfig> {
        let path = paths::repo_root().join("envoy-config/envoy.yaml");
        let yaml = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let json = serde_norway::from_str(&yaml)
            .with_context(|| format!("{} is not valid YAML", path.display()))?;
        Ok(EnvoyConfig(json))
    }

    pub fn set_admin_port(&mut self, port: u16) -> anyhow::Result<()> {
        set(&mut self.0, &["admin", "address", "socket_address", "port_value"], port.into())
    }

    pub fn set_listener_port(&mut self, port: u16) -> anyhow::Result<()> {
        let listener = named(&mut self.0["static_resources"]["listeners"], LISTENER)?;
        set(listener, &["address", "socket_address", "port_value"], port.into())
    }

    pub fn set_cluster_port(&mut self, cluster: &str, port: u16) -> anyhow::Result<()> {
        let cluster = named(&mut self.0["static_resources"]["clusters"], cluster)?;
        let endpoint =
            &mut cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"];
        set(endpoint, &["address", "socket_address", "port_value"], port.into())
    }

    pub fn set_filter_module(&mut self, wasm: &Path) -> anyhow::Result<()> {
        let filename = wasm.to_str().context("the filter's path is not UTF-8")?;
        set(self.wasm_filter()?, &["vm_config", "code", "local", "filename"], filename.into())
    }

    /// The filter's JSON configuration.
    pub fn filter_config(&mut self) -> anyhow::Result<Value> {
        let text = self.wasm_filter()?["configuration"]["value"]
            .as_str()
            .context("the filter's configuration is not a StringValue")?;
        serde_json::from_str(text).context("the filter's configuration is not JSON")
    }

    pub fn set_filter_config(&mut self, config: &Value) -> anyhow::Result<()> {
        set(self.wasm_filter()?, &["configuration", "value"], config.to_string().into())
    }

    /// Puts `replacement` (an `http_filters` entry) in the paystile filter's place, or
    /// removes the filter when `None`.
    pub fn replace_filter(&mut self, replacement: Option<Value>) -> anyhow::Result<()> {
        let filters = self.http_filters()?;
        let list = filters.as_array_mut().context("envoy.yaml's http_filters is not a list")?;
        let at = list
            .iter()
            .position(|filter| filter["name"] == FILTER)
            .ok_or_else(|| anyhow!("envoy.yaml has no {FILTER:?}"))?;
        match replacement {
            Some(filter) => list[at] = filter,
            None => {
                list.remove(at);
            }
        }
        Ok(())
    }

    /// Adds a listener `name` on a free port, a copy of the gateway's whose paystile filter
    /// runs `filter_config` (in the same VM: the same `vm_id` and code).
    pub fn add_gateway(&mut self, name: &str, filter_config: &Value) -> anyhow::Result<()> {
        let listeners = &mut self.0["static_resources"]["listeners"];
        let mut listener = named(listeners, LISTENER)?.clone();
        listener["name"] = name.into();
        set(&mut listener, &["address", "socket_address", "port_value"], 0.into())?;
        let manager = named(&mut listener["filter_chains"][0]["filters"], CONNECTION_MANAGER)?;
        set(&mut manager["typed_config"], &["stat_prefix"], name.into())?;
        let filter = named(&mut manager["typed_config"]["http_filters"], FILTER)?;
        let config = &mut filter["typed_config"]["config"];
        set(config, &["configuration", "value"], filter_config.to_string().into())?;
        listeners.as_array_mut().context("envoy.yaml's listeners is not a list")?.push(listener);
        Ok(())
    }

    /// Adds a cluster `name`, a copy of `like` sending to `port` on loopback.
    pub fn add_cluster(&mut self, like: &str, name: &str, port: u16) -> anyhow::Result<()> {
        let clusters = &mut self.0["static_resources"]["clusters"];
        let mut cluster = named(clusters, like)?.clone();
        cluster["name"] = name.into();
        cluster["load_assignment"]["cluster_name"] = name.into();
        clusters.as_array_mut().context("envoy.yaml's clusters is not a list")?.push(cluster);
        self.set_cluster_port(name, port)
    }

    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, serde_json::to_vec_pretty(&self.0)?)
            .with_context(|| format!("cannot write {}", path.display()))
    }

    fn http_filters(&mut self) -> anyhow::Result<&mut Value> {
        let listener = named(&mut self.0["static_resources"]["listeners"], LISTENER)?;
        let manager = named(&mut listener["filter_chains"][0]["filters"], CONNECTION_MANAGER)?;
        Ok(&mut manager["typed_config"]["http_filters"])
    }

    fn wasm_filter(&mut self) -> anyhow::Result<&mut Value> {
        let filter = named(self.http_filters()?, FILTER)?;
        Ok(&mut filter["typed_config"]["config"])
    }
}

/// The element of a JSON array whose `name` is `name`.
fn named<'a>(list: &'a mut Value, name: &str) -> anyhow::Result<&'a mut Value> {
    list.as_array_mut()
        .and_then(|items| items.iter_mut().find(|item| item["name"] == name))
        .ok_or_else(|| anyhow!("envoy.yaml has no {name:?}"))
}

/// Sets an existing field: a path that is not in the file is an error, not a new field.
fn set(value: &mut Value, path: &[&str], new: Value) -> anyhow::Result<()> {
    let mut at = value;
    for key in path {
        at = at.get_mut(*key).ok_or_else(|| anyhow!("envoy.yaml has no {}", path.join(".")))?;
    }
    *at = new;
    Ok(())
}

/// A running Envoy, stopped when dropped.
pub struct EnvoyProcess {
    child: Child,
    admin: SocketAddr,
    gateway: SocketAddr,
    log: PathBuf,
}

impl EnvoyProcess {
    /// Starts Envoy on `config` in `dir` (its log is appended to `dir/envoy.log`, so that a
    /// restart keeps what came before) and waits until it is ready and listening. The filter
    /// logs at `wasm_log_level` (`info`; `trace` to see everything it logs).
    pub async fn start(
        config: &Path,
        dir: &Path,
        workers: u32,
        wasm_log_level: &str,
    ) -> anyhow::Result<EnvoyProcess> {
        let binary = paths::envoy_binary();
        let log = dir.join("envoy.log");
        let admin_file = dir.join("envoy-admin-address");
        let _ = std::fs::remove_file(&admin_file);
        let child = Command::new(&binary)
            .arg("--config-path")
            .arg(config)
            .arg("--admin-address-path")
            .arg(&admin_file)
            .args(["--disable-hot-restart", "--log-level", "warning"])
            .args(["--component-log-level", &format!("wasm:{wasm_log_level}")])
            .args(["--concurrency", &workers.to_string()])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::options().create(true).append(true).open(&log)?)
            .spawn()
            .with_context(|| {
                format!("cannot run {} (install Envoy with scripts/setup)", binary.display())
            })?;
        let mut envoy = EnvoyProcess {
            child,
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            gateway: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
        };
        envoy
            .wait_ready(&admin_file)
            .await
            .with_context(|| format!("Envoy did not start; its log:\n{}", envoy.log_text()))?;
        Ok(envoy)
    }

    async fn wait_ready(&mut self, admin_file: &Path) -> anyhow::Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let http = reqwest::Client::new();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("Envoy exited: {status}");
            }
            if Instant::now() > deadline {
                bail!("Envoy was not ready within {STARTUP_TIMEOUT:?}");
            }
            if let Some(admin) =
                std::fs::read_to_string(admin_file).ok().and_then(|a| a.trim().parse().ok())
            {
                self.admin = admin;
                let ready = http.get(format!("http://{admin}/ready")).send().await;
                if ready.is_ok_and(|r| r.status() == 200) {
                    let listeners: Value = http
                        .get(format!("http://{admin}/listeners?format=json"))
                        .send()
                        .await?
                        .json()
                        .await?;
                    self.gateway = listener_address(&listeners, LISTENER)?;
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn gateway(&self) -> SocketAddr {
        self.gateway
    }

    /// The address of the listener `name`.
    pub async fn listener(&self, name: &str) -> anyhow::Result<SocketAddr> {
        let listeners: Value = reqwest::get(format!("http://{}/listeners?format=json", self.admin))
            .await?
            .json()
            .await?;
        listener_address(&listeners, name)
    }

    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops Envoy without losing a charge, the README's way: `scripts/drain-gateway` (the
    /// listeners drained, requests in flight finished, the filter's queued settlements
    /// delivered), then SIGTERM. Answers whether the drain completed within `timeout`.
    pub async fn stop_gracefully(&mut self, timeout: Duration) -> anyhow::Result<bool> {
        let script = paths::repo_root().join("scripts/drain-gateway");
        let drained = tokio::process::Command::new(&script)
            .args([self.admin.to_string(), timeout.as_secs().to_string()])
            .status()
            .await
            .with_context(|| format!("cannot run {}", script.display()))?
            .success();
        let status = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status()?;
        if !status.success() {
            bail!("kill -TERM {} failed", self.pid());
        }
        let stop_deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > stop_deadline {
                bail!("Envoy did not stop within 10 s of its SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(drained)
    }

    /// `kill -9`: the filter's queued settlements die with it.
    pub fn kill(&mut self) -> std::io::Result<()> {
        self.child.kill()?;
        self.child.wait().map(drop)
    }
}

impl Drop for EnvoyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn listener_address(listeners: &Value, name: &str) -> anyhow::Result<SocketAddr> {
    let statuses = listeners["listener_statuses"].as_array().context("no listener_statuses")?;
    let gateway = statuses
        .iter()
        .find(|l| l["name"] == name)
        .with_context(|| format!("no listener {name:?}"))?;
    let socket = &gateway["local_address"]["socket_address"];
    let address = socket["address"].as_str().context("no listener address")?;
    let port = socket["port_value"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .context("no listener port")?;
    Ok(SocketAddr::new(address.parse()?, port))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn filter_names(config: &mut EnvoyConfig) -> Vec<String> {
        let filters = config.http_filters().unwrap().as_array().unwrap();
        filters.iter().map(|f| f["name"].as_str().unwrap().to_owned()).collect()
    }

    #[test]
    fn the_paystile_filter_can_be_replaced_or_removed() {
        let router = "envoy.filters.http.router";
        let mut config = EnvoyConfig::demo().unwrap();
        assert_eq!(filter_names(&mut config), [FILTER, router]);

        config.replace_filter(Some(json!({"name": "other"}))).unwrap();
        assert_eq!(filter_names(&mut config), ["other", router]);
        assert!(config.filter_config().is_err());
        assert!(config.replace_filter(None).is_err(), "the paystile filter is gone already");

        let mut bare = EnvoyConfig::demo().unwrap();
        bare.replace_filter(None).unwrap();
        assert_eq!(filter_names(&mut bare), [router]);
    }
}
