//! Where the pieces are: the repository, the built filter and ledger, Envoy and Python.
//! Each can be overridden through the environment.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, bail};

pub fn repo_root() -> PathBuf {
    let harness = Path::new(env!("CARGO_MANIFEST_DIR"));
    harness.parent().unwrap_or(harness).to_path_buf()
}

/// Cargo's directory for this build's binaries (`target/debug`): tests run from its `deps/`.
fn profile_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the running executable")?;
    let dir = exe.parent().context("the executable has no directory")?;
    Ok(if dir.ends_with("deps") { dir.parent().unwrap_or(dir) } else { dir }.to_path_buf())
}

fn from_env(variable: &str) -> Option<PathBuf> {
    std::env::var_os(variable).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// The `paystile-ledger` binary built beside this one (`$PAYSTILE_LEDGER_BIN` overrides).
pub fn ledger_binary() -> anyhow::Result<PathBuf> {
    let binary = match from_env("PAYSTILE_LEDGER_BIN") {
        Some(binary) => binary,
        None => profile_dir()?.join("paystile-ledger"),
    };
    if !binary.is_file() {
        bail!(
            "no ledger binary at {}: build it with `cargo build -p paystile-ledger` (scripts/test does)",
            binary.display()
        );
    }
    Ok(binary)
}

/// The `paystile-agent` binary built beside this one (`$PAYSTILE_AGENT_BIN` overrides).
pub fn agent_binary() -> anyhow::Result<PathBuf> {
    let binary = match from_env("PAYSTILE_AGENT_BIN") {
        Some(binary) => binary,
        None => profile_dir()?.join("paystile-agent"),
    };
    if !binary.is_file() {
        bail!(
            "no agent binary at {}: build it with `cargo build -p paystile-agent`",
            binary.display()
        );
    }
    Ok(binary)
}

/// The benchmark's do-nothing wasm filter (`bench/wasm-floor`), as `bench/run` builds it.
pub fn floor_wasm() -> anyhow::Result<PathBuf> {
    let target = profile_dir()?.parent().map(Path::to_path_buf).context("no target directory")?;
    let wasm = target.join("wasm32-wasip1/release/paystile_wasm_floor.wasm");
    if !wasm.is_file() {
        bail!(
            "no floor filter at {}: build it with `cargo build --release --target wasm32-wasip1 -p paystile-wasm-floor` (bench/run does)",
            wasm.display()
        );
    }
    Ok(wasm)
}

/// The release filter module (`$PAYSTILE_FILTER_WASM` overrides). Refused when older than
/// the filter's sources, so that tests never run a stale build.
pub fn filter_wasm() -> anyhow::Result<PathBuf> {
    let wasm = match from_env("PAYSTILE_FILTER_WASM") {
        Some(wasm) => return Ok(wasm),
        None => {
            let target =
                profile_dir()?.parent().map(Path::to_path_buf).context("no target directory")?;
            target.join("wasm32-wasip1/release/paystile_filter.wasm")
        }
    };
    let build = "cargo build --release --target wasm32-wasip1 -p paystile-filter";
    let built = modified(&wasm).with_context(|| {
        format!("no filter at {}: build it with `{build}` (scripts/test does)", wasm.display())
    })?;
    let root = repo_root();
    for sources in ["filter/src", "protocol/src"] {
        if newest(&root.join(sources)) > Some(built) {
            bail!("{} is older than {sources}: rebuild it with `{build}`", wasm.display());
        }
    }
    Ok(wasm)
}

/// Envoy: `$PAYSTILE_ENVOY`, else the repository's `.venv` (scripts/setup), else `PATH`.
pub fn envoy_binary() -> PathBuf {
    from_env("PAYSTILE_ENVOY").unwrap_or_else(|| {
        let venv = repo_root().join(".venv/bin/envoy");
        if venv.is_file() { venv } else { PathBuf::from("envoy") }
    })
}

/// Python with the test clients (PyJWT, and pymacaroons and bolt11 for the interop tests):
/// the repository's `.venv`, else `python3`.
pub fn python() -> PathBuf {
    let venv = repo_root().join(".venv/bin/python");
    if venv.is_file() { venv } else { PathBuf::from("python3") }
}

/// Node.js for the interop helpers: `$PAYSTILE_NODE`, else `node` on `PATH`.
pub fn node() -> PathBuf {
    from_env("PAYSTILE_NODE").unwrap_or_else(|| PathBuf::from("node"))
}

/// anvil, the local EVM node of the x402 sandbox: `$PAYSTILE_ANVIL`, else the binary npm
/// installed with the interop packages (scripts/setup), from the platform's package
/// (`@foundry-rs/anvil-<os>-<arch>`). Not `.bin/anvil`: that is a Node.js launcher, and
/// killing it would leave the node it started running.
pub fn anvil() -> PathBuf {
    from_env("PAYSTILE_ANVIL").unwrap_or_else(|| {
        let packages = interop_dir().join("node_modules/@foundry-rs");
        std::fs::read_dir(&packages)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|entry| entry.file_name().to_string_lossy().starts_with("anvil-"))
            .map(|entry| entry.path().join("bin/anvil"))
            .find(|binary| binary.is_file())
            .unwrap_or_else(|| interop_dir().join("node_modules/.bin/anvil"))
    })
}

/// The interop helper scripts, with their npm packages in `node_modules` (scripts/setup).
pub fn interop_dir() -> PathBuf {
    repo_root().join("test-harness/interop")
}

fn modified(path: &Path) -> std::io::Result<SystemTime> {
    path.metadata()?.modified()
}

/// The newest modification time of any file under `dir`.
fn newest(dir: &Path) -> Option<SystemTime> {
    let entries = std::fs::read_dir(dir).ok()?;
    entries
        .flatten()
        .filter_map(|entry| {
            let path = entry.path();
            if path.is_dir() { newest(&path) } else { modified(&path).ok() }
        })
        .max()
}
