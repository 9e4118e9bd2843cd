//! The gateway benchmark's measuring parts (`bench/run`): a wrk run and its report, a
//! process's CPU time, the counters that tell which answers the gateway gave, the table.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, bail};

/// How wrk loads the gateway: the same for every row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Load {
    pub threads: u32,
    pub connections: u32,
    pub duration: Duration,
}

/// What wrk reports about one run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WrkReport {
    /// Responses completed.
    pub requests: u64,
    pub requests_per_second: f64,
    pub p50: Duration,
    pub p99: Duration,
    /// Responses with a status outside 2xx and 3xx.
    pub non_2xx: u64,
    /// Connect, read, write and timeout errors.
    pub socket_errors: u64,
}

/// Runs `wrk --latency` against `url` with `headers` (`Name: value`).
pub async fn wrk(load: Load, url: &str, headers: &[String]) -> anyhow::Result<WrkReport> {
    let mut command = wrk_command(load);
    for header in headers {
        command.arg("-H").arg(header);
    }
    run_wrk(command, url).await
}

/// Runs `wrk --latency` against `url` with the Lua `script` making each request.
pub async fn wrk_script(
    load: Load,
    url: &str,
    script: &std::path::Path,
) -> anyhow::Result<WrkReport> {
    let mut command = wrk_command(load);
    command.arg("-s").arg(script);
    run_wrk(command, url).await
}

fn wrk_command(load: Load) -> tokio::process::Command {
    let mut command = tokio::process::Command::new("wrk");
    command
        .arg(format!("-t{}", load.threads))
        .arg(format!("-c{}", load.connections))
        .arg(format!("-d{}s", load.duration.as_secs().max(1)))
        .arg("--latency");
    command
}

async fn run_wrk(mut command: tokio::process::Command, url: &str) -> anyhow::Result<WrkReport> {
    let output = command
        .arg(url)
        .kill_on_drop(true)
        .output()
        .await
        .context("cannot run wrk (bench/run installs it: apt-get install -y wrk)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!("wrk failed ({}): {text}{}", output.status, String::from_utf8_lossy(&output.stderr));
    }
    parse_wrk(&text).with_context(|| format!("cannot read wrk's report:\n{text}"))
}

/// Reads wrk's text report (with `--latency`).
pub fn parse_wrk(text: &str) -> anyhow::Result<WrkReport> {
    let mut requests = None;
    let mut requests_per_second = None;
    let mut p50 = None;
    let mut p99 = None;
    let mut non_2xx = 0;
    let mut socket_errors = 0;
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", time] => p50 = Some(parse_time(time)?),
            ["99%", time] => p99 = Some(parse_time(time)?),
            ["Requests/sec:", rate] => requests_per_second = Some(rate.parse()?),
            [count, "requests", "in", ..] => requests = Some(count.parse()?),
            ["Non-2xx", "or", "3xx", "responses:", count] => non_2xx = count.parse()?,
            ["Socket", "errors:", ..] => {
                // `Socket errors: connect 0, read 0, write 0, timeout 0`
                for count in words.iter().skip(3).step_by(2) {
                    socket_errors += count.trim_end_matches(',').parse::<u64>()?;
                }
            }
            _ => {}
        }
    }
    Ok(WrkReport {
        requests: requests.context("no request count")?,
        requests_per_second: requests_per_second.context("no Requests/sec")?,
        p50: p50.context("no 50% latency (was --latency given?)")?,
        p99: p99.context("no 99% latency (was --latency given?)")?,
        non_2xx,
        socket_errors,
    })
}

/// wrk's times: `412.00us`, `1.23ms`, `2.00s`, `1.50m`.
fn parse_time(text: &str) -> anyhow::Result<Duration> {
    let split = text.find(|c: char| c.is_ascii_alphabetic()).context("a time without a unit")?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().with_context(|| format!("bad time {text:?}"))?;
    let seconds = match unit {
        "us" => number / 1e6,
        "ms" => number / 1e3,
        "s" => number,
        "m" => number * 60.0,
        _ => bail!("unknown time unit in {text:?}"),
    };
    Duration::try_from_secs_f64(seconds).with_context(|| format!("bad time {text:?}"))
}

/// CPU time (user + system, all threads) a process has used so far, from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32, ticks_per_second: u64) -> anyhow::Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    parse_cpu_ticks(&stat)
        .map(|ticks| Duration::from_secs_f64(ticks as f64 / ticks_per_second as f64))
        .with_context(|| format!("cannot read utime and stime in {path}"))
}

/// `utime + stime` in clock ticks: fields 14 and 15 of a `/proc/<pid>/stat` line, counted
/// after the command name, which is in parentheses and may itself hold spaces.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, after_name) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // `after_name` starts at field 3 (the state).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The kernel's clock ticks per second, the unit of `/proc/<pid>/stat`'s times.
pub fn ticks_per_second() -> anyhow::Result<u64> {
    let output = std::process::Command::new("getconf").arg("CLK_TCK").output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.trim().parse().with_context(|| format!("getconf CLK_TCK answered {text:?}"))
}

/// The value of the sample `name` in a Prometheus text exposition, its labels written into
/// `name` exactly as the exposition writes them; 0 when absent (no event yet).
pub fn prometheus_value(text: &str, name: &str) -> anyhow::Result<f64> {
    for line in text.lines() {
        if let Some(value) = line.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')) {
            return value.trim().parse().with_context(|| format!("{name} is not a number"));
        }
    }
    Ok(0.0)
}

/// The answer every request of a row must get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// A 2xx from the upstream.
    Success,
    /// A 402 from the gateway.
    PaymentRequired,
}

/// What the gateway and the ledger counted during a run, beside wrk's report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counted {
    /// Envoy's answers by class: `[2xx, 4xx, 5xx]`.
    pub envoy_answers: [u64; 3],
    /// For a row that goes through the ledger: the endpoint it must have answered once per
    /// answer (holds for paid calls, L402 challenges for 402s), and how often it did.
    pub ledger: Option<(&'static str, u64)>,
}

/// Why a run does not count: errors, or answers other than `expect`. Envoy and the ledger
/// may count a few more than wrk (requests in flight when wrk stops), never fewer.
pub fn problems(expect: Expect, wrk: &WrkReport, counted: &Counted) -> Vec<String> {
    let mut problems = wrk_problems(expect, wrk);
    let [ok, client, server] = counted.envoy_answers;
    let unexpected = match expect {
        Expect::Success => client + server > 0 || ok < wrk.requests,
        Expect::PaymentRequired => ok + server > 0 || client < wrk.requests,
    };
    if unexpected {
        problems.push(format!("Envoy answered {ok} 2xx, {client} 4xx, {server} 5xx"));
    }
    if let Some((what, count)) = counted.ledger
        && count < wrk.requests
    {
        problems
            .push(format!("the ledger answered {what} {count} times for {} answers", wrk.requests));
    }
    problems
}

/// One configuration's results.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub name: String,
    pub wrk: WrkReport,
    pub counted: Counted,
    /// How long the measured run took, wrk's start to its report.
    pub wall: Duration,
    /// CPU time used during the run by Envoy, by the ledger, and by the benchmark process
    /// (mostly the upstream's).
    pub cpu: Cpu,
    /// The ledger's own mean time to answer the row's calls to it (from its metrics).
    pub ledger_mean: Option<Duration>,
    /// A run on one connection after the loaded one: the latency a request sees without
    /// queueing behind others (at saturation, p50 is mostly the queue: connections / rate).
    pub one_connection: Option<WrkReport>,
    /// Why the run does not count, if it does not.
    pub problems: Vec<String>,
    /// req/s of every round, when the row was measured more than once.
    pub rounds: Vec<f64>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cpu {
    pub envoy: Duration,
    pub ledger: Duration,
    pub upstream: Duration,
}

/// One row from several runs of it: the run with the median req/s (the lower of the two
/// middle ones), its figures kept together, with every run's problems.
pub fn median_run(mut runs: Vec<Row>) -> Option<Row> {
    runs.sort_by(|a, b| a.wrk.requests_per_second.total_cmp(&b.wrk.requests_per_second));
    let rounds: Vec<f64> = runs.iter().map(|run| run.wrk.requests_per_second).collect();
    let problems: Vec<String> = runs.iter().flat_map(|run| run.problems.clone()).collect();
    let mut median = runs.get(runs.len().checked_sub(1)? / 2)?.clone();
    median.problems = problems;
    if rounds.len() > 1 {
        median.rounds = rounds;
    }
    Some(median)
}

/// What is wrong with a run by wrk's own account: no answer, socket errors, or answers of
/// the wrong class.
pub fn wrk_problems(expect: Expect, wrk: &WrkReport) -> Vec<String> {
    let mut problems = Vec::new();
    if wrk.requests == 0 {
        problems.push("no answer".to_owned());
    }
    if wrk.socket_errors > 0 {
        problems.push(format!("{} socket errors", wrk.socket_errors));
    }
    match expect {
        Expect::Success if wrk.non_2xx > 0 => {
            problems.push(format!("{} answers were not 2xx", wrk.non_2xx));
        }
        Expect::PaymentRequired if wrk.non_2xx != wrk.requests => {
            problems.push(format!("{} answers were 2xx or 3xx", wrk.requests - wrk.non_2xx));
        }
        _ => {}
    }
    problems
}

/// The table, as Markdown; `baseline` (bare Envoy's row) gives the ratios.
pub fn table(rows: &[Row], baseline: Option<&Row>) -> String {
    let mut out = String::from(
        "| configuration | req/s | p50 ms | p99 ms | vs bare | added p50 ms | 1 conn: p50 ms | 1 conn: added p50 ms | Envoy CPU | ledger CPU | ledger mean ms | upstream CPU | answers (2xx/4xx/5xx) | check |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|\n",
    );
    for row in rows {
        let (ratio, added) = match baseline {
            Some(bare) => (
                format!("{:.2}", row.wrk.requests_per_second / bare.wrk.requests_per_second),
                format!("{:+.3}", millis(row.wrk.p50) - millis(bare.wrk.p50)),
            ),
            None => ("–".into(), "–".into()),
        };
        let [ok, client, server] = row.counted.envoy_answers;
        let check = if row.problems.is_empty() {
            "ok".to_owned()
        } else {
            format!("**FAILED**: {}", row.problems.join("; "))
        };
        let ledger_mean =
            row.ledger_mean.map_or("–".into(), |mean| format!("{:.3}", millis(mean)));
        let one_p50 =
            row.one_connection.map_or("–".into(), |one| format!("{:.3}", millis(one.p50)));
        let one_added = match (row.one_connection, baseline.and_then(|bare| bare.one_connection)) {
            (Some(one), Some(bare)) => format!("{:+.3}", millis(one.p50) - millis(bare.p50)),
            _ => "–".into(),
        };
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.3} | {:.3} | {ratio} | {added} | {one_p50} | {one_added} | {} | {} | {ledger_mean} | {} | {ok}/{client}/{server} | {check} |",
            row.name,
            row.wrk.requests_per_second,
            millis(row.wrk.p50),
            millis(row.wrk.p99),
            cpu_cell(row, row.cpu.envoy),
            cpu_cell(row, row.cpu.ledger),
            cpu_cell(row, row.cpu.upstream),
        );
    }
    out
}

/// `cpu` as a share of one core during the run, and per completed request.
fn cpu_cell(row: &Row, cpu: Duration) -> String {
    let share = cpu.as_secs_f64() / row.wall.as_secs_f64().max(f64::MIN_POSITIVE) * 100.0;
    let per_request = cpu.as_secs_f64() * 1e6 / row.wrk.requests.max(1) as f64;
    format!("{share:.0}% · {per_request:.0} µs")
}

pub fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    /// wrk 4.1.0's report, as Debian's package prints it.
    const REPORT: &str = "Running 10s test @ http://127.0.0.1:10000/v1/forecast/oslo
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.60ms  446.11us  11.08ms   83.45%
    Req/Sec    10.08k   412.46    10.71k    80.00%
  Latency Distribution
     50%    1.53ms
     75%    1.75ms
     90%    2.04ms
     99%    3.12ms
  100318 requests in 10.00s, 40.84MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 17
Requests/sec:  10031.25
Transfer/sec:      4.08MB
";

    #[test]
    fn reads_wrks_report() {
        let report = parse_wrk(REPORT).unwrap();
        assert_eq!(
            report,
            WrkReport {
                requests: 100_318,
                requests_per_second: 10_031.25,
                p50: Duration::from_micros(1530),
                p99: Duration::from_micros(3120),
                non_2xx: 17,
                socket_errors: 3,
            }
        );
    }

    #[test]
    fn a_report_without_latencies_is_refused() {
        let without = REPORT.replace("50%", "");
        assert!(parse_wrk(&without).is_err());
        assert!(parse_wrk("").is_err());
    }

    #[test]
    fn reads_wrks_times() {
        assert_eq!(parse_time("412.00us").unwrap(), Duration::from_micros(412));
        assert_eq!(parse_time("2.50s").unwrap(), Duration::from_millis(2500));
        assert_eq!(parse_time("1.50m").unwrap(), Duration::from_secs(90));
        assert!(parse_time("12").is_err());
        assert!(parse_time("1.0h").is_err());
    }

    #[test]
    fn reads_cpu_ticks_past_a_command_name_with_spaces() {
        let stat = "4242 (envoy (wrk) x) S 1 4242 4242 0 -1 4194560 2000 0 0 0 1234 567 0 0 20 0 \
                    3 0 100 1000000 500 18446744073709551615";
        assert_eq!(parse_cpu_ticks(stat), Some(1234 + 567));
        assert_eq!(parse_cpu_ticks("4242 (short) S 1"), None);
    }

    #[test]
    fn this_process_has_used_some_cpu() {
        let ticks = ticks_per_second().unwrap();
        assert!(ticks > 0);
        let before = cpu_time(std::process::id(), ticks).unwrap();
        // Spin until the tick count moves (a few ticks of work), so the reading is known to
        // follow the process; the deadline only stops a broken reading from spinning forever.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut after = before;
        while after == before && std::time::Instant::now() < deadline {
            after = cpu_time(std::process::id(), ticks).unwrap();
        }
        assert!(after > before);
    }

    #[test]
    fn reads_a_labelled_sample() {
        let text = "# TYPE paystile_ledger_holds counter\n\
                    paystile_ledger_holds_total 41\n\
                    x_sum{endpoint=\"/v1/holds\",status=\"200\"} 0.125\n\
                    x_count{endpoint=\"/v1/holds\",status=\"200\"} 7\n\
                    x_count{endpoint=\"/v1/holds\",status=\"503\"} nan-ish\n";
        assert_eq!(prometheus_value(text, "paystile_ledger_holds_total").unwrap(), 41.0);
        let holds = "{endpoint=\"/v1/holds\",status=\"200\"}";
        assert_eq!(prometheus_value(text, &format!("x_count{holds}")).unwrap(), 7.0);
        assert_eq!(prometheus_value(text, &format!("x_sum{holds}")).unwrap(), 0.125);
        assert_eq!(prometheus_value(text, "paystile_ledger_holds").unwrap(), 0.0);
        let refused = "x_count{endpoint=\"/v1/holds\",status=\"503\"}";
        assert!(prometheus_value(text, refused).is_err());
    }

    #[test]
    fn a_run_counts_only_with_the_expected_answers() {
        let report = parse_wrk(REPORT).unwrap();
        let clean = WrkReport { non_2xx: 0, socket_errors: 0, ..report };
        let n = clean.requests;
        let paid = Counted { envoy_answers: [n + 3, 0, 0], ledger: Some(("/v1/holds", n + 2)) };
        assert!(problems(Expect::Success, &clean, &paid).is_empty());
        assert_eq!(
            problems(Expect::Success, &report, &paid),
            ["3 socket errors", "17 answers were not 2xx"]
        );
        let short = Counted { ledger: Some(("/v1/holds", n - 1)), ..paid };
        assert_eq!(
            problems(Expect::Success, &clean, &short),
            [format!("the ledger answered /v1/holds {} times for {n} answers", n - 1)]
        );
        let refused = Counted { envoy_answers: [n, 0, 1], ledger: None };
        assert_eq!(problems(Expect::Success, &clean, &refused).len(), 1);

        let challenged = WrkReport { non_2xx: n, ..clean };
        let minted = Counted { envoy_answers: [0, n, 0], ledger: Some(("/v1/l402/challenges", n)) };
        assert!(problems(Expect::PaymentRequired, &challenged, &minted).is_empty());
        assert_eq!(
            problems(Expect::PaymentRequired, &clean, &minted),
            [format!("{n} answers were 2xx or 3xx")]
        );
        let unavailable = Counted { envoy_answers: [0, n - 5, 5], ..minted };
        assert_eq!(problems(Expect::PaymentRequired, &challenged, &unavailable).len(), 1);
    }

    #[test]
    fn the_table_compares_with_bare_envoy() {
        let report = parse_wrk(REPORT).unwrap();
        let bare = Row {
            name: "bare Envoy".into(),
            wrk: report,
            counted: Counted { envoy_answers: [100_318, 0, 0], ledger: None },
            wall: Duration::from_secs(10),
            cpu: Cpu {
                envoy: Duration::from_secs(9),
                ledger: Duration::ZERO,
                upstream: Duration::from_secs(4),
            },
            ledger_mean: None,
            one_connection: Some(WrkReport { p50: Duration::from_micros(210), ..report }),
            problems: Vec::new(),
            rounds: Vec::new(),
        };
        let slower =
            WrkReport { requests_per_second: 5015.625, p50: Duration::from_micros(1780), ..report };
        let paid = Row {
            name: "paystile".into(),
            wrk: slower,
            ledger_mean: Some(Duration::from_micros(1250)),
            one_connection: Some(WrkReport { p50: Duration::from_micros(290), ..report }),
            problems: vec!["12 non-2xx".into()],
            ..bare.clone()
        };
        let table = table(&[bare.clone(), paid], Some(&bare));
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[2].contains("| 1.00 | +0.000 |"), "{}", lines[2]);
        assert!(lines[3].contains("| 0.50 | +0.250 | 0.290 | +0.080 |"), "{}", lines[3]);
        assert!(lines[2].contains("| +0.000 | 0.210 | +0.000 |"), "{}", lines[2]);
        assert!(lines[3].contains("| 1.250 |"), "{}", lines[3]);
        // 9 s of 10 s, and 9 s over 100,318 requests; none for the ledger.
        assert!(lines[2].contains("| 90% · 90 µs | 0% · 0 µs |"), "{}", lines[2]);
        assert!(lines[3].ends_with("| **FAILED**: 12 non-2xx |"), "{}", lines[3]);
    }

    #[test]
    fn several_rounds_give_the_median_run() {
        let report = parse_wrk(REPORT).unwrap();
        let run = |rate: f64, problem: Option<&str>| Row {
            name: "bare Envoy".into(),
            wrk: WrkReport { requests_per_second: rate, ..report },
            counted: Counted { envoy_answers: [1, 0, 0], ledger: None },
            wall: Duration::from_secs_f64(rate),
            cpu: Cpu::default(),
            ledger_mean: None,
            one_connection: None,
            problems: problem.into_iter().map(str::to_owned).collect(),
            rounds: Vec::new(),
        };
        let median = median_run(vec![
            run(900.0, None),
            run(300.0, Some("1 socket errors")),
            run(600.0, None),
        ])
        .unwrap();
        assert_eq!(median.wrk.requests_per_second, 600.0);
        assert_eq!(median.wall.as_secs(), 600, "the figures come from the same run");
        assert_eq!(median.rounds, [300.0, 600.0, 900.0]);
        assert_eq!(median.problems, ["1 socket errors"]);

        let lower = median_run(vec![run(900.0, None), run(300.0, None)]).unwrap();
        assert_eq!(lower.wrk.requests_per_second, 300.0);
        let once = median_run(vec![run(900.0, None)]).unwrap();
        assert!(once.rounds.is_empty());
        assert!(median_run(Vec::new()).is_none());
    }
}
