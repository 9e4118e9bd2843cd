//! Requests per second through a real Envoy, measured with `wrk` at fixed connections, on
//! loopback: bare Envoy (the demo config without the filter) proxying to the demo upstream,
//! and the 402 answered to a call without a credential with L402 on, with the challenge pool
//! on and off. Everything (wrk, Envoy with 2 workers, the release ledger on SQLite and the
//! upstream) shares the machine. Each figure is the median of `ROUNDS` runs, the cases taking
//! turns; before each run a short one warms the case up (and the pool learns the 402 rate).
//! It also counts the ledger's challenge calls per 402. Needs `wrk` on the PATH and the
//! release builds:
//!
//! ```text
//! cargo build --release --target wasm32-wasip1 -p paystile-filter
//! cargo build --release -p paystile-ledger
//! cargo bench -p paystile-harness --bench gateway
//! ```

use std::process::Command;

use anyhow::{Context, bail, ensure};
use paystile_harness::e2e::TestStack;
use paystile_harness::envoy::{EnvoyConfig, EnvoyProcess};
use serde_json::{Value, json};
use tempfile::TempDir;

const CONNECTIONS: &str = "32";
const WRK_THREADS: &str = "2";
const SECONDS: &str = "10";
const WARM_UP_SECONDS: &str = "2";
const ROUNDS: usize = 3;
const PATH: &str = "/v1/forecast/oslo";

/// `wrk` on `url` for `seconds`: requests per second, and how many requests it made.
fn wrk(url: &str, seconds: &str) -> anyhow::Result<(f64, u64)> {
    let output = Command::new("wrk")
        .args(["-t", WRK_THREADS, "-c", CONNECTIONS, "-d", &format!("{seconds}s"), url])
        .output()
        .context("cannot run wrk: install it (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    ensure!(output.status.success(), "wrk failed: {text}");
    ensure!(!text.contains("Socket errors"), "wrk saw socket errors: {text}");
    let field = |prefix: &str| {
        text.lines()
            .find_map(|line| line.trim().strip_prefix(prefix).map(str::trim).map(str::to_owned))
    };
    let rate = field("Requests/sec:").context("no Requests/sec")?.parse()?;
    let requests = text
        .lines()
        .find_map(|line| line.trim().split_once(" requests in ").map(|(n, _)| n.to_owned()))
        .context("no request count")?
        .parse()?;
    Ok((rate, requests))
}

/// How many `POST /v1/l402/challenges` the stack's ledger has answered.
async fn challenge_calls(stack: &TestStack) -> anyhow::Result<u64> {
    let url = format!("{}/metrics", stack.stack.ledger.url());
    let metrics = stack.http.get(url).send().await?.text().await?;
    let mut calls = 0;
    for line in metrics.lines().filter(|line| {
        line.starts_with("paystile_ledger_http_request_duration_seconds_count{")
            && line.contains(r#"endpoint="/v1/l402/challenges""#)
    }) {
        calls += line.rsplit(' ').next().context("no count")?.parse::<u64>()?;
    }
    Ok(calls)
}

/// The demo's Envoy without the filter, proxying to `stack`'s upstream, on free ports.
async fn bare_envoy(stack: &TestStack, dir: &TempDir) -> anyhow::Result<EnvoyProcess> {
    let mut demo = EnvoyConfig::demo()?;
    demo.set_admin_port(0)?;
    demo.set_listener_port(0)?;
    demo.set_cluster_port("demo_upstream", stack.stack.upstream.address().port())?;
    let path = dir.path().join("bare-envoy.json");
    demo.write(&path)?;
    let mut config: Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    let listener = &mut config["static_resources"]["listeners"][0];
    let filters = listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
        .as_array_mut()
        .context("no http_filters")?;
    let before = filters.len();
    filters.retain(|filter| filter["name"] != "paystile");
    ensure!(filters.len() + 1 == before, "no paystile filter to take out");
    std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
    EnvoyProcess::start(&path, dir.path(), 2).await
}

/// One 402 with an L402 challenge: the path measured is the one meant.
async fn check_402(stack: &TestStack) -> anyhow::Result<()> {
    let answer = stack.get(PATH, None, &[]).await?;
    if answer.status != 402 || answer.l402_challenge().is_none() {
        bail!("not a 402 with an L402 challenge: {answer:?}");
    }
    Ok(())
}

struct Case {
    name: &'static str,
    url: String,
    stack: Option<usize>,
    rates: Vec<f64>,
    /// Ledger challenge calls and requests, over the measured runs.
    calls: u64,
    requests: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let pooled = TestStack::start_with(json!({}), &[]).await?;
    let unpooled = TestStack::start_with(json!({"l402": {"challenge_pool": 0}}), &[]).await?;
    let dir = TempDir::new()?;
    let bare = bare_envoy(&pooled, &dir).await?;
    check_402(&pooled).await?;
    check_402(&unpooled).await?;
    let stacks = [&pooled, &unpooled];
    let mut cases = [
        Case {
            name: "bare Envoy → upstream 200",
            url: format!("http://{}{PATH}", bare.gateway()),
            stack: None,
            rates: vec![],
            calls: 0,
            requests: 0,
        },
        Case {
            name: "no credential, L402 on → 402 (pooled challenge)",
            url: pooled.stack.gateway_url(PATH),
            stack: Some(0),
            rates: vec![],
            calls: 0,
            requests: 0,
        },
        Case {
            name: "no credential, L402 pool off → 402 (minted for it)",
            url: unpooled.stack.gateway_url(PATH),
            stack: Some(1),
            rates: vec![],
            calls: 0,
            requests: 0,
        },
    ];
    for _ in 0..ROUNDS {
        for case in &mut cases {
            wrk(&case.url, WARM_UP_SECONDS)?;
            let before = match case.stack {
                Some(i) => challenge_calls(stacks[i]).await?,
                None => 0,
            };
            let (rate, requests) = wrk(&case.url, SECONDS)?;
            if let Some(i) = case.stack {
                case.calls += challenge_calls(stacks[i]).await? - before;
            }
            case.rates.push(rate);
            case.requests += requests;
        }
    }
    let median = |case: &Case| {
        let mut rates = case.rates.clone();
        rates.sort_by(f64::total_cmp);
        rates[rates.len() / 2]
    };
    let bare_rate = median(&cases[0]);
    println!(
        "wrk -t{WRK_THREADS} -c{CONNECTIONS} -d{SECONDS}s, median of {ROUNDS} runs; Envoy with 2 workers\n"
    );
    println!("| path | req/s | of bare Envoy | runs | ledger calls per 402 |");
    println!("|---|--:|--:|--:|--:|");
    for case in &cases {
        let rate = median(case);
        let runs: Vec<String> = case.rates.iter().map(|r| format!("{r:.0}")).collect();
        let calls = match case.stack {
            Some(_) => format!("{:.4}", case.calls as f64 / case.requests as f64),
            None => "–".to_owned(),
        };
        println!(
            "| {} | {rate:.0} | {:.0}% | {} | {calls} |",
            case.name,
            100.0 * rate / bare_rate,
            runs.join(", ")
        );
    }
    Ok(())
}
