//! A local EVM chain for x402: anvil (npm `@foundry-rs/anvil`) on a free loopback port, with
//! paystile's sandbox USDC (`contracts/SandboxUsdc.sol`, compiled by the pinned npm `solc`)
//! deployed and minted to whoever needs it. Spoken to over plain JSON-RPC, with anvil's
//! unlocked development accounts sending the transactions.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use alloy_primitives::U256;
use alloy_sol_types::{SolCall, sol};
use anyhow::{Context, bail, ensure};
use paystile_protocol::x402::{Address, Offer, OfferSettings, SigningKey};
use serde_json::{Value, json};

use crate::paths;

sol! {
    function mint(address to, uint256 value);
    function balanceOf(address who) returns (uint256);
}

/// anvil's first development account: it deploys and mints (the token's owner).
pub const DEPLOYER: &str = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266";
/// anvil's second development account, and its well-known key: the payer, who signs.
pub const PAYER: &str = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8";
pub const PAYER_KEY: &str = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d";
/// The third: the payee (an offer's `payTo`).
pub const PAYEE: &str = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC";
/// The fourth: a settler, which submits a payer's authorization, and its key.
pub const SETTLER: &str = "0x90F79bf6EB2c4f870365E785982E1f101E93b906";
pub const SETTLER_KEY: &str = "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6";
/// The fifth: the facilitator's settler, and its key.
pub const FACILITATOR_KEY: &str =
    "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a";
/// The sandbox USDC's EIP-712 domain: USDC's (`contracts/SandboxUsdc.sol`).
const ASSET_NAME: &str = "USD Coin";
const ASSET_VERSION: &str = "2";

/// [`PAYER_KEY`], as a client signs with it.
pub fn payer_key() -> anyhow::Result<SigningKey> {
    Ok(SigningKey::from_slice(&hex::decode(PAYER_KEY.trim_start_matches("0x"))?)?)
}

/// What the sandbox mints to the payer: 100 USDC.
pub const PAYER_FUNDS: u64 = 100_000_000;

/// An x402 sandbox: anvil with the sandbox USDC deployed and [`PAYER_FUNDS`] minted to
/// [`PAYER`], and the settings with which a filter offers it and a ledger settles it
/// (`direct`, with [`SETTLER_KEY`]) to [`PAYEE`].
pub struct X402Sandbox {
    pub anvil: Anvil,
    pub token: Address,
}

impl X402Sandbox {
    pub async fn start() -> anyhow::Result<X402Sandbox> {
        let anvil = Anvil::start()?;
        let token = anvil.deploy_sandbox_usdc().await?;
        anvil.mint(token, PAYER.parse()?, PAYER_FUNDS).await?;
        Ok(X402Sandbox { anvil, token })
    }

    pub fn network(&self) -> &'static str {
        "eip155:31337"
    }

    /// The offer a filter and a ledger configured by [`X402Sandbox::filter_config`] and
    /// [`X402Sandbox::ledger_args`] make: what a client signs for.
    pub fn offer(&self) -> anyhow::Result<Offer> {
        let asset = self.token.to_checksum(None);
        let settings = OfferSettings {
            network: self.network(),
            pay_to: PAYEE,
            asset: Some(&asset),
            asset_name: Some(ASSET_NAME),
            asset_version: Some(ASSET_VERSION),
            max_timeout_seconds: None,
        };
        Offer::from_settings(&settings).map_err(|e| anyhow::anyhow!("{}: {}", e.field, e.message))
    }

    /// The token as CAIP-19 names it, as `paystile-agent --x402-asset` takes it: an agent
    /// transfers only USDC where x402 knows it unless told of another token.
    pub fn caip19(&self) -> String {
        format!("{}/erc20:{}", self.network(), self.token.to_checksum(None))
    }

    /// The filter's `x402` section.
    pub fn filter_config(&self) -> Value {
        json!({
            "network": self.network(),
            "asset": self.token.to_checksum(None),
            "asset_name": ASSET_NAME,
            "asset_version": ASSET_VERSION,
            "pay_to": PAYEE,
        })
    }

    /// `paystile-ledger serve` flags that take and settle the same offer, directly.
    pub fn ledger_args(&self) -> Vec<String> {
        self.ledger_args_settling(&[
            ("--x402-settlement", "direct"),
            ("--x402-rpc-url", self.anvil.url()),
            ("--x402-settler-key", SETTLER_KEY),
        ])
    }

    /// The same offer, settled by the facilitator at `url`.
    pub fn ledger_args_with_facilitator(&self, url: &str) -> Vec<String> {
        self.ledger_args_settling(&[
            ("--x402-settlement", "facilitator"),
            ("--x402-facilitator-url", url),
        ])
    }

    fn ledger_args_settling(&self, settlement: &[(&str, &str)]) -> Vec<String> {
        let settlement = settlement.iter().map(|(flag, value)| (*flag, (*value).to_owned()));
        [
            ("--x402-network", self.network().to_owned()),
            ("--x402-pay-to", PAYEE.to_owned()),
            ("--x402-asset", self.token.to_checksum(None)),
            ("--x402-asset-name", ASSET_NAME.to_owned()),
            ("--x402-asset-version", ASSET_VERSION.to_owned()),
        ]
        .into_iter()
        .chain(settlement)
        .flat_map(|(flag, value)| [flag.to_owned(), value])
        .collect()
    }

    /// The x402 Python package's facilitator (`interop/x402_facilitator.py`), settling on
    /// this sandbox's anvil with [`FACILITATOR_KEY`].
    pub fn start_facilitator(&self) -> anyhow::Result<Facilitator> {
        let script = paths::interop_dir().join("x402_facilitator.py");
        let mut child = Command::new(paths::python())
            .arg(&script)
            .args(["--key", FACILITATOR_KEY, "--rpc-url", self.anvil.url()])
            .args(["--network", self.network()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot run {} (run scripts/setup)", script.display()))?;
        let stdout = child.stdout.take().context("the facilitator has no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let Some(url) = line.trim().strip_prefix("listening on ") else {
            let _ = child.kill();
            bail!("the facilitator did not start: {line:?}");
        };
        Ok(Facilitator { url: url.to_owned(), child })
    }
    /// `who`'s sandbox USDC, in micro-USDC.
    pub async fn balance(&self, who: &str) -> anyhow::Result<U256> {
        self.anvil.balance(self.token, who.parse()?).await
    }
}

/// A running facilitator, killed when dropped.
pub struct Facilitator {
    pub url: String,
    child: Child,
}

impl Drop for Facilitator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running anvil, killed when dropped.
pub struct Anvil {
    child: Child,
    url: String,
    http: reqwest::Client,
}

impl Anvil {
    /// Starts anvil on a free loopback port (chain id 31337, blocks mined on each
    /// transaction) and waits until it listens.
    pub fn start() -> anyhow::Result<Anvil> {
        let binary = paths::anvil();
        let mut child = Command::new(&binary)
            .args(["--host", "127.0.0.1", "--port", "0", "--chain-id", "31337"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot run {} (run scripts/setup)", binary.display()))?;
        let stdout = child.stdout.take().context("anvil has no stdout")?;
        let (found, listening) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if let Some(address) = line.strip_prefix("Listening on ") {
                    let _ = found.send(address.trim().to_owned());
                }
            }
        });
        let address = match listening.recv_timeout(Duration::from_secs(30)) {
            Ok(address) => address,
            Err(_) => {
                let _ = child.kill();
                bail!("anvil did not start listening within 30 s");
            }
        };
        Ok(Anvil { child, url: format!("http://{address}"), http: reqwest::Client::new() })
    }

    /// The JSON-RPC URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// One JSON-RPC call; its `result`.
    async fn rpc(&self, method: &str, params: Value) -> anyhow::Result<Value> {
        let request = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        let answer: Value = self
            .http
            .post(&self.url)
            .json(&request)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        if let Some(error) = answer.get("error") {
            bail!("{method}: {error}");
        }
        answer.get("result").cloned().with_context(|| format!("{method}: no result in {answer}"))
    }

    pub async fn chain_id(&self) -> anyhow::Result<u64> {
        quantity(&self.rpc("eth_chainId", json!([])).await?)
    }

    /// Sends a transaction from unlocked account `from` and answers its receipt, once mined
    /// (anvil mines each transaction as it comes, but its receipt may lag the hash by a few
    /// milliseconds). A reverted transaction is a receipt with status 0, not an error.
    pub async fn send(
        &self,
        from: &str,
        to: Option<Address>,
        data: &[u8],
    ) -> anyhow::Result<Value> {
        let mut transaction = json!({"from": from, "data": format!("0x{}", hex::encode(data))});
        if let Some(to) = to {
            transaction["to"] = json!(to.to_checksum(None));
        }
        let hash = self.rpc("eth_sendTransaction", json!([transaction])).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let receipt = self.rpc("eth_getTransactionReceipt", json!([hash])).await?;
            if !receipt.is_null() {
                return Ok(receipt);
            }
            ensure!(tokio::time::Instant::now() < deadline, "{hash} was not mined within 10 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `eth_call` at the latest block: the raw answer.
    async fn call(&self, to: Address, data: &[u8]) -> anyhow::Result<Vec<u8>> {
        let call = json!({"to": to.to_checksum(None), "data": format!("0x{}", hex::encode(data))});
        let answer = self.rpc("eth_call", json!([call, "latest"])).await?;
        let text = answer.as_str().context("eth_call answered no data")?;
        Ok(hex::decode(text.trim_start_matches("0x"))?)
    }

    /// Deploys the sandbox USDC from [`DEPLOYER`]; answers its address.
    pub async fn deploy_sandbox_usdc(&self) -> anyhow::Result<Address> {
        let receipt = self.send(DEPLOYER, None, &sandbox_usdc_bytecode()?).await?;
        ensure!(receipt["status"] == "0x1", "the sandbox USDC's deployment failed: {receipt}");
        let address = receipt["contractAddress"].as_str().context("no contract address")?;
        Ok(address.parse()?)
    }

    /// Mints `amount` atomic units of the sandbox USDC at `token` to `to`.
    pub async fn mint(&self, token: Address, to: Address, amount: u64) -> anyhow::Result<()> {
        let data = mintCall { to, value: U256::from(amount) }.abi_encode();
        let receipt = self.send(DEPLOYER, Some(token), &data).await?;
        ensure!(receipt["status"] == "0x1", "mint failed: {receipt}");
        Ok(())
    }

    /// `who`'s balance of `token`, in atomic units.
    pub async fn balance(&self, token: Address, who: Address) -> anyhow::Result<U256> {
        let answer = self.call(token, &balanceOfCall { who }.abi_encode()).await?;
        Ok(balanceOfCall::abi_decode_returns(&answer)?)
    }
}

impl Drop for Anvil {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sandbox USDC's creation bytecode, compiled now by the pinned solc
/// (`test-harness/interop/solc_build.mjs`).
fn sandbox_usdc_bytecode() -> anyhow::Result<Vec<u8>> {
    let script = paths::interop_dir().join("solc_build.mjs");
    let output = Command::new(paths::node())
        .arg(&script)
        .output()
        .with_context(|| format!("cannot run node {} (run scripts/setup)", script.display()))?;
    ensure!(output.status.success(), "solc failed: {}", String::from_utf8_lossy(&output.stderr));
    let built: Value = serde_json::from_slice(&output.stdout)?;
    let bytecode = built["bytecode"].as_str().context("solc printed no bytecode")?;
    Ok(hex::decode(bytecode.trim_start_matches("0x"))?)
}

/// A JSON-RPC quantity (`0x`-hex).
fn quantity(value: &Value) -> anyhow::Result<u64> {
    let text = value.as_str().with_context(|| format!("not a quantity: {value}"))?;
    Ok(u64::from_str_radix(text.trim_start_matches("0x"), 16)?)
}
