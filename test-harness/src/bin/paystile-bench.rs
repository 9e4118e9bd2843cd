//! `bench/run`: the gateway benchmark. Runs each configuration in turn on free loopback ports,
//! each on a fresh stack of the same upstream, release ledger and Envoy flags, where only the
//! HTTP filter before Envoy's router changes: none (bare Envoy), Envoy's own `jwt_authn` on a
//! Pay Token, or paystile (paid Pay Token calls and paid L402 calls, each in the default
//! configuration and with more holds prefetched, Pay Token calls each reserved, 402
//! challenges with L402 on and with Pay Tokens only). Loads each with
//! wrk at fixed threads and connections after a warm-up, and prints one Markdown table.
//!
//! The environment sets the load: `PAYSTILE_BENCH_THREADS` (1), `PAYSTILE_BENCH_CONNECTIONS`
//! (16), `PAYSTILE_BENCH_SECONDS` (10), `PAYSTILE_BENCH_WARMUP_SECONDS` (3), Envoy's
//! `PAYSTILE_BENCH_ENVOY_WORKERS` (1), the prefetch rows' `ledger.prefetch_holds`
//! `PAYSTILE_BENCH_PREFETCH_HOLDS` (64), and `PAYSTILE_BENCH_ROUNDS` (3): the rows
//! are measured in turn that many times and each shows its median run. After each loaded run,
//! one connection for `PAYSTILE_BENCH_LATENCY_SECONDS` (5; 0: none) measures the latency a
//! request sees without queueing. Arguments name the rows to run (default: all).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use paystile_harness::bench::{self, Counted, Cpu, Expect, Load, Row};
use paystile_harness::chain::{self, X402Sandbox};
use paystile_harness::e2e;
use paystile_harness::paths;
use paystile_harness::stack::{HttpFilter, Ports, Secrets, Stack, StackOptions};
use paystile_harness::upstream::{FIXED_BODY, UpstreamMode};
use paystile_protocol::ledger_api::{self, IssueTokenRequest};
use paystile_protocol::x402;
use serde_json::{Value, json};

/// The Pay Token's cap and the L402 credential's budget: far more than any run spends.
const BUDGET_USDC: &str = "100000";
/// Targets from the "fast by default" issue, on bare Envoy's row: the default paid row, the
/// best-configured one (also against the wasm floor), the added p50 on one connection of
/// the default row, and 402s with L402 on. The L402 rows should be within 10 % of the Pay
/// Token rows, and the default Pay Token row faster than `jwt_authn`.
const PAY_TOKEN_MIN_RATIO: f64 = 0.6;
const BEST_PAY_TOKEN_MIN_RATIO: f64 = 0.7;
const BEST_PAY_TOKEN_MIN_FLOOR_RATIO: f64 = 0.85;
const ADDED_P50_MAX_MS: f64 = 0.15;
const CHALLENGE_MIN_RATIO: f64 = 0.85;
const L402_MAX_GAP: f64 = 0.1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Config {
    Bare,
    /// A proxy-wasm filter that does nothing (`bench/wasm-floor`): what any wasm filter pays.
    WasmFloor,
    JwtAuthn,
    /// paystile in the chain, on a path no route prices: the filter's fixed cost.
    Unpriced,
    /// The paid rows in the default configuration (holds prefetched, 32 a batch).
    PayToken,
    L402,
    /// The paid rows again with `ledger.prefetch_holds` as set for the bench (64).
    PayTokenPrefetch,
    L402Prefetch,
    /// A paid Pay Token row with prefetching off: every call reserves.
    PayTokenEachReserved,
    Challenge,
    /// 402s with L402 off: the gateway's own 402 path, without an invoice to mint.
    ChallengePayTokenOnly,
    /// 402s with x402 offered beside L402 and Pay Tokens.
    ChallengeX402,
    /// Paid x402 calls: each with a payment of its own (one pays one call), reserved at the
    /// ledger, which verifies its signature and settles it on a local anvil.
    X402,
}

impl Config {
    const ALL: [Config; 13] = [
        Config::Bare,
        Config::WasmFloor,
        Config::JwtAuthn,
        Config::Unpriced,
        Config::PayToken,
        Config::L402,
        Config::PayTokenPrefetch,
        Config::L402Prefetch,
        Config::PayTokenEachReserved,
        Config::Challenge,
        Config::ChallengePayTokenOnly,
        Config::ChallengeX402,
        Config::X402,
    ];

    /// The name that selects the row on the command line.
    fn key(self) -> &'static str {
        match self {
            Config::Bare => "bare",
            Config::WasmFloor => "wasm_floor",
            Config::Unpriced => "unpriced",
            Config::JwtAuthn => "jwt_authn",
            Config::PayToken => "pay_token",
            Config::L402 => "l402",
            Config::PayTokenPrefetch => "pay_token_prefetch",
            Config::L402Prefetch => "l402_prefetch",
            Config::PayTokenEachReserved => "pay_token_reserved",
            Config::Challenge => "challenge",
            Config::ChallengePayTokenOnly => "challenge_pay_token",
            Config::ChallengeX402 => "challenge_x402",
            Config::X402 => "x402",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Config::Bare => "bare Envoy",
            Config::WasmFloor => "a do-nothing wasm filter (the floor)",
            Config::Unpriced => "paystile, unpriced route",
            Config::JwtAuthn => "Envoy jwt_authn, EdDSA Pay Token",
            Config::PayToken => "paystile, paid Pay Token, default config",
            Config::L402 => "paystile, paid L402, default config",
            Config::PayTokenPrefetch => "paystile, paid Pay Token, bench prefetch_holds",
            Config::L402Prefetch => "paystile, paid L402, bench prefetch_holds",
            Config::PayTokenEachReserved => "paystile, paid Pay Token, each call reserved",
            Config::Challenge => "paystile, 402 challenge",
            Config::ChallengePayTokenOnly => "paystile, 402, Pay Tokens only (no L402)",
            Config::ChallengeX402 => "paystile, 402 challenge, x402 offered too",
            Config::X402 => "paystile, paid x402, a payment per call",
        }
    }

    fn http_filter(self, secrets: &Secrets) -> anyhow::Result<HttpFilter> {
        Ok(match self {
            Config::Bare => HttpFilter::Nothing,
            Config::WasmFloor => HttpFilter::Other(wasm_floor(&paths::floor_wasm()?)?),
            Config::JwtAuthn => HttpFilter::Other(jwt_authn(secrets)),
            _ => HttpFilter::Paystile,
        })
    }

    /// The filter's configuration beside the demo's; `x402` is the x402 sandbox's offer, for
    /// the rows that take x402.
    fn filter_config(self, settings: &Settings, x402: Option<Value>) -> Value {
        // A merge patch: null leaves the default, and removes the demo's l402 section.
        let prefetch_holds = match self {
            Config::PayTokenPrefetch | Config::L402Prefetch => json!(settings.prefetch_holds),
            Config::PayTokenEachReserved => json!(0),
            _ => Value::Null,
        };
        let l402 = match self {
            Config::ChallengePayTokenOnly => Value::Null,
            _ => json!({"budget_usdc": BUDGET_USDC}),
        };
        json!({
            "l402": l402,
            "ledger": {"prefetch_holds": prefetch_holds},
            "x402": x402.unwrap_or(Value::Null),
        })
    }

    fn expect(self) -> Expect {
        match self {
            Config::Challenge | Config::ChallengePayTokenOnly | Config::ChallengeX402 => {
                Expect::PaymentRequired
            }
            _ => Expect::Success,
        }
    }

    /// The ledger endpoint the gateway calls once per answer (holds for paid calls, L402
    /// challenges for 402s), which must have answered 200 that often.
    fn ledger_endpoint(self) -> Option<&'static str> {
        match self {
            Config::Bare
            | Config::WasmFloor
            | Config::JwtAuthn
            | Config::Unpriced
            | Config::ChallengePayTokenOnly => None,
            Config::PayToken
            | Config::L402
            | Config::PayTokenPrefetch
            | Config::L402Prefetch
            | Config::PayTokenEachReserved
            | Config::X402 => Some(ledger_api::path::HOLDS),
            Config::Challenge | Config::ChallengeX402 => Some(ledger_api::path::L402_CHALLENGES),
        }
    }

    /// Whether every answer costs one call to [`Config::ledger_endpoint`]; prefetched holds
    /// serve most calls without one, and pooled challenges most 402s.
    fn one_ledger_call_per_answer(self) -> bool {
        matches!(self, Config::PayTokenEachReserved | Config::X402)
    }

    fn takes_x402(self) -> bool {
        matches!(self, Config::ChallengeX402 | Config::X402)
    }
}

/// The do-nothing filter `wasm` in the paystile filter's place, in its own VM, with the
/// same runtime and failure policy.
fn wasm_floor(wasm: &Path) -> anyhow::Result<Value> {
    let filename = wasm.to_str().context("the floor filter's path is not UTF-8")?;
    Ok(json!({
        "name": "wasm_floor",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": "wasm_floor",
                "root_id": "wasm_floor",
                "failure_policy": "FAIL_CLOSED",
                "vm_config": {
                    "vm_id": "wasm_floor",
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": filename}},
                },
            },
        },
    }))
}

/// Envoy's JWT filter verifying the same Pay Tokens (the ledger's EdDSA ones) with the
/// ledger's public key.
fn jwt_authn(secrets: &Secrets) -> Value {
    let jwks = json!({"keys": [secrets.token_public_key()]});
    json!({
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"pay_token": {
                "local_jwks": {"inline_string": jwks.to_string()},
                // Like paystile, the upstream does not get the credential.
                "forward": false,
            }},
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "pay_token"}}],
        },
    })
}

struct Settings {
    load: Load,
    /// The one-connection run's length (zero: none).
    one_connection: Duration,
    /// The prefetch rows' `ledger.prefetch_holds`.
    prefetch_holds: u16,
    warmup: Duration,
    envoy_workers: u32,
    rounds: u32,
    ticks_per_second: u64,
}

fn setting(variable: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(variable) {
        Ok(value) if !value.is_empty() => {
            value.parse().with_context(|| format!("{variable}={value:?} is not a whole number"))
        }
        _ => Ok(default),
    }
}

impl Settings {
    fn from_env() -> anyhow::Result<Settings> {
        let whole = |variable, default| {
            setting(variable, default)
                .and_then(|n| u32::try_from(n).with_context(|| format!("{variable} is too large")))
        };
        let load = Load {
            threads: whole("PAYSTILE_BENCH_THREADS", 1)?,
            connections: whole("PAYSTILE_BENCH_CONNECTIONS", 16)?,
            duration: Duration::from_secs(setting("PAYSTILE_BENCH_SECONDS", 10)?),
        };
        if load.threads == 0 || load.connections < load.threads || load.duration.is_zero() {
            bail!("wrk needs threads ≥ 1, connections ≥ threads and a duration ≥ 1 s");
        }
        Ok(Settings {
            load,
            one_connection: Duration::from_secs(setting("PAYSTILE_BENCH_LATENCY_SECONDS", 5)?),
            prefetch_holds: match setting("PAYSTILE_BENCH_PREFETCH_HOLDS", 64)? {
                holds @ 1..=64 => holds as u16,
                _ => bail!("PAYSTILE_BENCH_PREFETCH_HOLDS must be 1 to 64"),
            },
            warmup: Duration::from_secs(setting("PAYSTILE_BENCH_WARMUP_SECONDS", 3)?),
            envoy_workers: whole("PAYSTILE_BENCH_ENVOY_WORKERS", 1)?.max(1),
            rounds: whole("PAYSTILE_BENCH_ROUNDS", 3)?.max(1),
            ticks_per_second: bench::ticks_per_second()?,
        })
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("paystile bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Whether every row counted.
async fn run() -> anyhow::Result<bool> {
    let settings = Settings::from_env()?;
    let chosen: Vec<String> = std::env::args().skip(1).collect();
    let configs: Vec<Config> = if chosen.is_empty() {
        Config::ALL.to_vec()
    } else {
        chosen
            .iter()
            .map(|name| {
                Config::ALL.into_iter().find(|c| c.key() == name).with_context(|| {
                    let names: Vec<&str> = Config::ALL.iter().map(|c| c.key()).collect();
                    format!("no row {name:?}; rows: {}", names.join(" "))
                })
            })
            .collect::<anyhow::Result<_>>()?
    };

    let load = settings.load;
    println!("{}", conditions(&settings)?);
    warn_if_busy();
    let secrets = Secrets::random();
    // Rounds go through every row in turn, so that a burst of other work on the machine
    // falls on all rows alike.
    let mut runs: Vec<Vec<Row>> = vec![Vec::new(); configs.len()];
    for round in 1..=settings.rounds {
        for (config, runs) in configs.iter().zip(&mut runs) {
            eprintln!(
                "bench: round {round}/{}: {} ({}) …",
                settings.rounds,
                config.title(),
                config.key()
            );
            let row = measure(*config, &settings, &secrets)
                .await
                .with_context(|| format!("the {} row", config.key()))?;
            eprintln!(
                "bench: {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms",
                row.wrk.requests_per_second,
                bench::millis(row.wrk.p50),
                bench::millis(row.wrk.p99)
            );
            runs.push(row);
        }
    }
    let rows: Vec<(Config, Row)> = configs
        .iter()
        .zip(runs)
        .filter_map(|(config, runs)| Some((*config, bench::median_run(runs)?)))
        .collect();
    let baseline = rows.iter().find(|(c, _)| *c == Config::Bare).map(|(_, row)| row.clone());
    let table_rows: Vec<Row> = rows.iter().map(|(_, row)| row.clone()).collect();
    println!(
        "wrk -t{} -c{} -d{}s --latency after a {} s warm-up, then -c1 for {} s; Envoy --concurrency {}; prefetched holds: ledger.prefetch_holds {}; {}; load average at the end {}",
        load.threads,
        load.connections,
        load.duration.as_secs(),
        settings.warmup.as_secs(),
        settings.one_connection.as_secs(),
        settings.envoy_workers,
        settings.prefetch_holds,
        match settings.rounds {
            1 => "one round".to_owned(),
            n => format!("median of {n} rounds"),
        },
        load_average()
    );
    println!();
    print!("{}", bench::table(&table_rows, baseline.as_ref()));
    if settings.rounds > 1 {
        println!();
    }
    for row in table_rows.iter().filter(|row| !row.rounds.is_empty()) {
        let rates: Vec<String> = row.rounds.iter().map(|r| format!("{r:.0}")).collect();
        println!("- {} req/s by round, sorted: {}", row.name, rates.join(", "));
    }
    // What paystile's own work costs, apart from what any wasm filter costs in this Envoy.
    if let Some((_, floor)) = rows.iter().find(|(c, _)| *c == Config::WasmFloor) {
        println!();
        for (config, row) in
            rows.iter().filter(|(c, _)| !matches!(c, Config::Bare | Config::WasmFloor))
        {
            println!(
                "- {} req/s vs the wasm floor: {:.2}",
                config.title(),
                row.wrk.requests_per_second / floor.wrk.requests_per_second
            );
        }
    }
    if let Some(bare) = &baseline {
        println!();
        let ratio = |config| {
            rows.iter()
                .find(|(c, _)| *c == config)
                .map(|(_, row)| row.wrk.requests_per_second / bare.wrk.requests_per_second)
        };
        let rate = |config| {
            rows.iter().find(|(c, _)| *c == config).map(|(_, row)| row.wrk.requests_per_second)
        };
        let best = (Config::PayTokenPrefetch, BEST_PAY_TOKEN_MIN_RATIO);
        for (paid, min) in [(Config::PayToken, PAY_TOKEN_MIN_RATIO), best] {
            target(&format!("{} req/s vs bare", paid.title()), ratio(paid), |r| {
                (r >= min, format!("{r:.2} (target ≥ {min:.2})"))
            });
        }
        let floor_ratio = rate(Config::PayTokenPrefetch)
            .zip(rate(Config::WasmFloor))
            .map(|(paid, floor)| paid / floor);
        target(&format!("{} req/s vs the wasm floor", best.0.title()), floor_ratio, |r| {
            let min = BEST_PAY_TOKEN_MIN_FLOOR_RATIO;
            (r >= min, format!("{r:.2} (target ≥ {min:.2})"))
        });
        let vs_jwt = rate(Config::PayToken).zip(rate(Config::JwtAuthn)).map(|(p, j)| p / j);
        target(&format!("{} req/s vs jwt_authn", Config::PayToken.title()), vs_jwt, |r| {
            (r > 1.0, format!("{r:.2} (target > 1)"))
        });
        for (l402, pay_token) in
            [(Config::L402, Config::PayToken), (Config::L402Prefetch, Config::PayTokenPrefetch)]
        {
            let gap = rate(l402).zip(rate(pay_token)).map(|(l, p)| 1.0 - l / p);
            target(&format!("{} req/s below the Pay Token row", l402.title()), gap, |g| {
                (g <= L402_MAX_GAP, format!("{:.0} % (target ≤ 10 %)", g * 100.0))
            });
        }
        {
            let paid = Config::PayToken;
            let row = rows.iter().find(|(c, _)| *c == paid).map(|(_, row)| row);
            let added =
                |p50: Duration, bare_p50: Duration| bench::millis(p50) - bench::millis(bare_p50);
            // At saturation every row's p50 is mostly its queue (connections / rate): it
            // restates the rate. The latency target is judged on one connection.
            let loaded = row.map(|row| added(row.wrk.p50, bare.wrk.p50));
            if let Some(ms) = loaded {
                println!(
                    "- {} added p50 at {} connections: {ms:+.3} ms (the queue at saturation; not judged)",
                    paid.title(),
                    load.connections
                );
            }
            let unloaded = row
                .and_then(|row| row.one_connection)
                .zip(bare.one_connection)
                .map(|(one, bare)| added(one.p50, bare.p50));
            target(&format!("{} added p50 on one connection", paid.title()), unloaded, |ms| {
                (ms <= ADDED_P50_MAX_MS, format!("{ms:+.3} ms (target ≤ {ADDED_P50_MAX_MS} ms)"))
            });
        }
        for challenge in [Config::Challenge, Config::ChallengePayTokenOnly] {
            target(&format!("{} req/s vs bare", challenge.title()), ratio(challenge), |r| {
                (r >= CHALLENGE_MIN_RATIO, format!("{r:.2} (target ≥ {CHALLENGE_MIN_RATIO:.2})"))
            });
        }
    }
    let failed: Vec<&str> =
        rows.iter().filter(|(_, row)| !row.problems.is_empty()).map(|(c, _)| c.key()).collect();
    if !failed.is_empty() {
        println!();
        println!(
            "FAILED rows (errors or unexpected answers; their figures do not count): {}",
            failed.join(", ")
        );
    }
    Ok(failed.is_empty())
}

fn target(name: &str, value: Option<f64>, judge: impl Fn(f64) -> (bool, String)) {
    if let Some(value) = value {
        let (pass, text) = judge(value);
        println!("- {name}: {text}: {}", if pass { "pass" } else { "FAIL" });
    }
}

/// One row: a fresh stack, a credential, a probe, a warm-up, the measured run.
async fn measure(config: Config, settings: &Settings, secrets: &Secrets) -> anyhow::Result<Row> {
    let dir = bench_dir().join(config.key());
    // Each row starts from an empty ledger; the previous run's files are only for reading.
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    // The x402 rows offer the sandbox's token; only the paid row's ledger settles on it.
    let sandbox = if config.takes_x402() { Some(X402Sandbox::start().await?) } else { None };
    let ledger_args = match (&sandbox, config) {
        (Some(sandbox), Config::X402) => sandbox.ledger_args(),
        _ => Vec::new(),
    };
    let payments = dir.join("payments");
    let stack = Stack::start(StackOptions {
        ports: Ports::ANY,
        secrets: secrets.clone(),
        dir,
        filter: config.filter_config(settings, sandbox.as_ref().map(X402Sandbox::filter_config)),
        http_filter: config.http_filter(secrets)?,
        ledger_args,
        envoy_workers: settings.envoy_workers,
        verbose_logs: false,
        upstream: UpstreamMode::Fixed,
    })
    .await?;
    let prefix = stack.filter_config["routes"][0]["path_prefix"]
        .as_str()
        .context("envoy.yaml's first route has no path_prefix")?;
    let url = match config {
        // Beside every priced route: envoy.yaml prices `/v1/forecast…` and one report.
        Config::Unpriced | Config::WasmFloor => stack.gateway_url("/v1/unpriced/oslo"),
        _ => stack.gateway_url(&format!("{prefix}/oslo")),
    };
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;

    let authorization = credential(config, &stack, &http, &url).await?;
    let headers: Vec<String> =
        authorization.iter().map(|value| format!("Authorization: {value}")).collect();
    // A paid x402 row signs a payment for each request ahead of each wrk run (one pays
    // one call), and its wrk sends them in turn.
    let paying = match (&sandbox, config) {
        (Some(sandbox), Config::X402) => Some(Paying::new(sandbox, &stack, payments)?),
        _ => None,
    };
    let wrk = |load: Load| {
        let (url, headers, paying) = (&url, &headers, &paying);
        async move {
            match paying {
                Some(paying) => bench::wrk_script(load, url, &paying.script).await,
                None => bench::wrk(load, url, headers).await,
            }
        }
    };
    // Signed before each run is measured: the CPU it takes is the client's, not the row's.
    let prepare = |load: Load| paying.as_ref().map_or(Ok(()), |paying| paying.prepare(load));
    let probe_headers = || -> anyhow::Result<Vec<(&'static str, String)>> {
        Ok(match (&paying, &authorization) {
            (Some(paying), _) => vec![("payment-signature", paying.sign(1)?.remove(0))],
            (None, Some(authorization)) => vec![("authorization", authorization.clone())],
            (None, None) => Vec::new(),
        })
    };
    probe(config, &http, &url, &probe_headers()?).await.context("before the run")?;

    if !settings.warmup.is_zero() {
        let warmup = Load { duration: settings.warmup, ..settings.load };
        prepare(warmup)?;
        wrk(warmup).await?;
    }
    prepare(settings.load)?;
    let before = Snapshot::take(config, &stack, &http, settings.ticks_per_second).await?;
    let started = Instant::now();
    let report = wrk(settings.load).await?;
    let wall = started.elapsed();
    let after = Snapshot::take(config, &stack, &http, settings.ticks_per_second).await?;
    probe(config, &http, &url, &probe_headers()?).await.context("after the run")?;
    // The latency a request sees when it does not queue behind others.
    let one_connection = if settings.one_connection.is_zero() {
        None
    } else {
        let load = Load { threads: 1, connections: 1, duration: settings.one_connection };
        prepare(load)?;
        Some(wrk(load).await?)
    };

    let answers = |i: usize| after.envoy_answers[i].saturating_sub(before.envoy_answers[i]);
    let ledger_answers = after.ledger_answers.saturating_sub(before.ledger_answers);
    let ledger_seconds = after.ledger_seconds - before.ledger_seconds;
    let counted = Counted {
        envoy_answers: [answers(0), answers(1), answers(2)],
        ledger: config
            .ledger_endpoint()
            .filter(|_| config.one_ledger_call_per_answer())
            .map(|endpoint| (endpoint, ledger_answers)),
    };
    let ledger_mean = match (config.ledger_endpoint(), u32::try_from(ledger_answers)) {
        (Some(_), Ok(answers @ 1..)) => {
            Duration::try_from_secs_f64(ledger_seconds).ok().map(|total| total / answers)
        }
        _ => None,
    };
    let used = |cpu: fn(&Snapshot) -> Duration| cpu(&after).saturating_sub(cpu(&before));
    let mut problems = bench::problems(config.expect(), &report, &counted);
    if let Some(one) = &one_connection {
        let one_problems = bench::wrk_problems(config.expect(), one);
        problems.extend(one_problems.into_iter().map(|p| format!("on one connection: {p}")));
    }
    Ok(Row {
        name: config.title().to_owned(),
        problems,
        wrk: report,
        counted,
        wall,
        cpu: Cpu {
            envoy: used(|s| s.envoy_cpu),
            ledger: used(|s| s.ledger_cpu),
            upstream: used(|s| s.own_cpu),
        },
        ledger_mean,
        one_connection,
        rounds: Vec::new(),
    })
}

/// Payments signed per second of a paid x402 run, per wrk thread: more than the row can
/// answer here. A run that used them all would send the rest unpaid, and its 402s would
/// mark the row as failed.
const X402_PAYMENTS_PER_SECOND: u64 = 6_000;

/// The paid x402 row's payments: signed by the sandbox's funded payer, for the route's
/// price, fresh for each wrk run (an authorization is valid for the offer's 60 s), written
/// one file per wrk thread, which its Lua script sends in turn.
struct Paying {
    key: x402::SigningKey,
    offer: x402::Offer,
    price: u64,
    dir: PathBuf,
    /// The Lua script that sends them.
    script: PathBuf,
}

impl Paying {
    fn new(sandbox: &X402Sandbox, stack: &Stack, dir: PathBuf) -> anyhow::Result<Paying> {
        let (key, offer) = (chain::payer_key()?, sandbox.offer()?);
        let price: paystile_protocol::Usdc = stack.filter_config["routes"][0]["price_usdc"]
            .as_str()
            .context("the first route has no price")?
            .parse()?;
        std::fs::create_dir_all(&dir)?;
        let script = dir.join("pay.lua");
        std::fs::write(&script, PAYING_SCRIPT.replace("@DIR@", &dir.to_string_lossy()))?;
        Ok(Paying { key, offer, price: price.micros(), dir, script })
    }

    /// `count` payments, each under a random nonce, valid from now for the offer's timeout.
    fn sign(&self, count: u64) -> anyhow::Result<Vec<String>> {
        let now = e2e::unix_now();
        let window = (0, now + self.offer.max_timeout_seconds);
        Ok((0..count)
            .map(|_| {
                let nonce = x402::B256::from(rand::random::<[u8; 32]>());
                let terms = x402::Terms { offer: &self.offer, amount: self.price, window, nonce };
                x402::sign(&self.key, &terms, x402::Version::V2)
            })
            .collect())
    }

    /// Signs the payments of a run under `load`, a file for each wrk thread.
    fn prepare(&self, load: Load) -> anyhow::Result<()> {
        let per_thread = X402_PAYMENTS_PER_SECOND * load.duration.as_secs().max(1);
        for thread in 0..load.threads {
            let payments = self.sign(per_thread)?.join("\n");
            std::fs::write(self.dir.join(format!("payments-{thread}.txt")), payments)?;
        }
        Ok(())
    }
}

/// wrk's Lua: each thread sends its own payments, one per request; past the last, none.
const PAYING_SCRIPT: &str = r#"
local threads = 0
function setup(thread)
  thread:set("id", threads)
  threads = threads + 1
end
function init(args)
  payments = {}
  for line in io.lines(string.format("@DIR@/payments-%d.txt", id)) do
    payments[#payments + 1] = line
  end
  sent = 0
end
function request()
  sent = sent + 1
  local payment = payments[sent]
  if payment == nil then return wrk.format() end
  return wrk.format(nil, nil, {["PAYMENT-SIGNATURE"] = payment})
end
"#;

/// Where each row's ledger database, configs and logs go: `.paystile/bench/<row>`.
fn bench_dir() -> PathBuf {
    paths::repo_root().join(".paystile/bench")
}

/// The `Authorization` value the row's requests carry.
async fn credential(
    config: Config,
    stack: &Stack,
    http: &reqwest::Client,
    url: &str,
) -> anyhow::Result<Option<String>> {
    match config {
        Config::Bare
        | Config::WasmFloor
        | Config::Unpriced
        | Config::Challenge
        | Config::ChallengePayTokenOnly
        | Config::ChallengeX402
        | Config::X402 => Ok(None),
        Config::JwtAuthn
        | Config::PayToken
        | Config::PayTokenPrefetch
        | Config::PayTokenEachReserved => {
            let service_id = stack.filter_config["service_id"].as_str().unwrap_or_default();
            let token = stack
                .admin
                .issue_token(&IssueTokenRequest {
                    service_id: service_id.to_owned(),
                    limit_usdc: BUDGET_USDC.parse()?,
                    buyer_id: "bench-agent".into(),
                    buyer_tag: None,
                    scope: None,
                    expires_at: None,
                    ttl_seconds: Some(24 * 3600),
                    sandbox: false,
                })
                .await?;
            Ok(Some(format!("Bearer {}", token.jwt)))
        }
        Config::L402 | Config::L402Prefetch => {
            let challenged = e2e::read(http.get(url).send().await?).await?;
            let (macaroon, invoice) = challenged.l402_challenge().with_context(|| {
                format!("no L402 challenge in a {} answer: {}", challenged.status, challenged.text)
            })?;
            let paid = stack.admin.pay_sandbox_invoice(&invoice).await?;
            Ok(Some(format!("L402 {macaroon}:{}", paid.preimage)))
        }
    }
}

/// One request by hand: the row's configuration gives the answer the row expects.
async fn probe(
    config: Config,
    http: &reqwest::Client,
    url: &str,
    headers: &[(&str, String)],
) -> anyhow::Result<()> {
    let mut request = http.get(url);
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let answer = e2e::read(request.send().await?).await?;
    let expected = match config.expect() {
        // The upstream's answer, not one of the gateway's.
        Expect::Success => answer.status == 200 && answer.text == FIXED_BODY,
        // An L402 challenge exactly when L402 is on, an x402 offer when x402 is.
        Expect::PaymentRequired => {
            answer.status == 402
                && answer.l402_challenge().is_some() == (config != Config::ChallengePayTokenOnly)
                && answer.header("payment-required").is_some() == config.takes_x402()
        }
    };
    if !expected {
        bail!("{:?} expected, got {}: {}", config.expect(), answer.status, answer.text);
    }
    Ok(())
}

/// The counters and CPU times read just before and just after a measured run.
struct Snapshot {
    envoy_cpu: Duration,
    ledger_cpu: Duration,
    /// This process: the upstream's tasks, and the idle client.
    own_cpu: Duration,
    /// `[2xx, 4xx, 5xx]` answered on the gateway listener.
    envoy_answers: [u64; 3],
    /// 200s from the row's ledger endpoint, and the seconds the ledger took to give them
    /// (0 for rows that do not use the ledger).
    ledger_answers: u64,
    ledger_seconds: f64,
}

impl Snapshot {
    async fn take(
        config: Config,
        stack: &Stack,
        http: &reqwest::Client,
        ticks: u64,
    ) -> anyhow::Result<Snapshot> {
        let stats: Value = http
            .get(format!("http://{}/stats?format=json", stack.envoy.admin()))
            .query(&[("filter", r"^http\.gateway\.downstream_rq_[245]xx$")])
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let stat = |class: &str| {
            let name = format!("http.gateway.downstream_rq_{class}");
            stats["stats"]
                .as_array()
                .and_then(|all| all.iter().find(|s| s["name"] == name.as_str()))
                .and_then(|s| s["value"].as_u64())
                .with_context(|| format!("Envoy has no {name}"))
        };
        let (ledger_answers, ledger_seconds) = match config.ledger_endpoint() {
            Some(endpoint) => {
                let text = http
                    .get(format!("{}{}", stack.ledger.url(), ledger_api::path::METRICS))
                    .send()
                    .await?
                    .error_for_status()?
                    .text()
                    .await?;
                let sample = |suffix: &str| {
                    let labels = format!("method=\"POST\",endpoint=\"{endpoint}\",status=\"200\"");
                    let name = format!("paystile_ledger_http_request_duration_seconds_{suffix}");
                    bench::prometheus_value(&text, &format!("{name}{{{labels}}}"))
                };
                // A count is a whole number, well below 2^53.
                (sample("count")? as u64, sample("sum")?)
            }
            None => (0, 0.0),
        };
        Ok(Snapshot {
            envoy_cpu: bench::cpu_time(stack.envoy.pid(), ticks)?,
            ledger_cpu: bench::cpu_time(stack.ledger.pid(), ticks)?,
            own_cpu: bench::cpu_time(std::process::id(), ticks)?,
            envoy_answers: [stat("2xx")?, stat("4xx")?, stat("5xx")?],
            ledger_answers,
            ledger_seconds,
        })
    }
}

/// The machine and the software, as the table's caption.
fn conditions(settings: &Settings) -> anyhow::Result<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name").and_then(|l| l.split_once(':')))
        .map_or("unknown", |(_, model)| model.trim());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let envoy = command_line(paths::envoy_binary().as_os_str(), "--version")?;
    // `<path>  version: <commit>/1.40.0/Clean/RELEASE/BoringSSL`
    let envoy = envoy
        .split_once("version: ")
        .and_then(|(_, version)| version.split('/').nth(1))
        .unwrap_or("unknown")
        .to_owned();
    let wrk = command_line("wrk".as_ref(), "--version")
        .map(|v| v.lines().next().unwrap_or_default().to_owned())
        .unwrap_or_default();
    let ledger = paths::ledger_binary()?;
    Ok(format!(
        "machine: {cores} cores, {model}, Linux {}\nEnvoy {envoy} (--concurrency {}), {}, ledger {}\nload average at the start: {}\n",
        kernel.trim(),
        settings.envoy_workers,
        wrk.split(" Copyright").next().unwrap_or_default().trim(),
        ledger.display(),
        load_average()
    ))
}

fn command_line(program: &std::ffi::OsStr, argument: &str) -> anyhow::Result<String> {
    let output = std::process::Command::new(program)
        .arg(argument)
        .output()
        .with_context(|| format!("cannot run {}", program.to_string_lossy()))?;
    // wrk prints its version on stderr and exits 1.
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
}

/// Other work on the machine takes cores from the gateway and wrk: say so before the figures.
fn warn_if_busy() {
    let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let one_minute: f64 =
        text.split_whitespace().next().and_then(|l| l.parse().ok()).unwrap_or(0.0);
    if one_minute > cores / 2.0 {
        eprintln!(
            "bench: warning: the load average ({one_minute}) shows other work on these {cores} cores; \
             the figures will be lower and noisier than on an idle machine"
        );
    }
}

/// `/proc/loadavg`'s 1, 5 and 15 minute averages.
fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}
