//! Cost per request of the release filter, run in the wasmtime proxy-wasm host
//! (`paystile_harness::host`) as Envoy and as Kong would run it: no credential (with L402 on,
//! where the 402 takes a challenge from the pool the ticks refill, or with the pool off, where
//! the ledger mints one for the request; and with Pay Tokens only, where the 402 is answered at
//! once), a Pay Token paid call and an L402 paid call (each with its share of the settle batch
//! the next tick sends; the same credential every call, so after the first the VM's verified
//! credentials serve it; each call reserved, `ledger.prefetch_holds` 0), a Pay Token paid
//! call with holds prefetched, 16 a reserve (most calls go on at once on one), a Pay Token paid call with a token the VM has not seen (verified in
//! full), a Pay Token with a bad signature, and an x402 paid call (its terms checked in the
//! wasm, and with `x402.verify_signatures` its EIP-712 signature recovered there too). For every path it reports wasm
//! fuel per request (wasmtime charges about one unit per wasm instruction executed, none for
//! `nop`, `drop`, `block`, `loop` and `end`: a count of guest work that does not depend on the
//! machine) and wall time per request (the median of several runs of many requests on one VM,
//! after warm-up runs), both split by phase: request headers, the ledger's reply, response
//! headers, end of stream (`on_done`/`on_log`/`on_delete`), the settle batch and the pool's
//! refills (real sandbox challenges, minted by the ledger's code before the bench). Wall time
//! covers only the host calls into the guest: the guest's code (compiled by Cranelift, with
//! fuel checks), the hostcalls it makes and the host's own bookkeeping; the scripting and the
//! checks between calls are not timed. Every request is checked to have taken its path, so
//! a broken filter fails instead of printing a figure. Build the filter, then run:
//!
//! ```text
//! cargo build --release --target wasm32-wasip1 -p paystile-filter
//! cargo bench -p paystile-harness --bench host
//! ```

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use paystile_harness::host::{Action, Dispatch, Flavor, LEDGER_CLUSTER, Pairs, Reply, Vm, pairs};
use paystile_ledger::challenge::ChallengeMinter;
use paystile_ledger::invoice::InvoiceBackend;
use paystile_ledger::invoice::sandbox::SandboxNode;
use paystile_ledger::settings::Secret;
use paystile_protocol::jws::SigningKey;
use paystile_protocol::l402::{self, Identifier, Offer};
use paystile_protocol::ledger_api::{ChallengeRequest, L402Challenge};
use paystile_protocol::pay_token::{self, PayTokenClaims, Scope};
use paystile_protocol::x402;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Requests per run; for paid calls also the size of the settle batch sent after them
/// (the filter sends at most 500 settlements a batch).
const PER_RUN: usize = 250;
const WARM_UP_RUNS: usize = 3;
const RUNS: usize = 21;

const TOKEN_SECRET: &str = "bench-token-secret-0123456789abcdef";
const L402_SECRET: &str = "bench-l402-secret-0123456789abcdef";
const GATEWAY_KEY: &str = "bench-gateway-key-0123456789";
const KONG_LEDGER: &str = "127.0.0.1:8787";
/// The host's clock (`Vm::now` at load); credentials stay valid an hour past it.
const NOW: u64 = 1_900_000_000;

/// With the pool on, the root context ticks every this many requests, 50 ms apart on the
/// host's clock: 500 402s a second, which the pool's refills follow.
const REQUESTS_PER_TICK: usize = 25;
/// The prefetched path's `ledger.prefetch_holds` (the default was 16 when its figures were
/// published; the path's fuel per call hardly depends on it).
const PREFETCH_HOLDS: u16 = 16;
const TICK: Duration = Duration::from_millis(50);

const HOLDS: &str = "/v1/holds";
const CHALLENGES: &str = "/v1/l402/challenges";
const SETTLE: &str = "/v1/holds/settle";

/// Where a request's cost goes.
#[derive(Clone, Copy)]
enum Phase {
    RequestHeaders,
    LedgerReply,
    ResponseHeaders,
    End,
    Settle,
    Refill,
}

const PHASES: [(Phase, &str); 6] = [
    (Phase::RequestHeaders, "request headers"),
    (Phase::LedgerReply, "ledger reply"),
    (Phase::ResponseHeaders, "response headers"),
    (Phase::End, "end of stream"),
    (Phase::Settle, "settle share"),
    (Phase::Refill, "refill share"),
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    ChallengePooled,
    ChallengeMinted,
    PayTokensOnly402,
    PayTokenPaid,
    /// The warm path with holds prefetched, the default: most calls go on at once on a hold
    /// the VM prefetched (`ledger.prefetch_holds` 16), the rest reserve the next batch.
    PayTokenPrefetched,
    /// Each call with a token the VM has not verified before.
    PayTokenFirstUse,
    L402Paid,
    BadSignature,
    /// An x402 payment (a new one each call in real life; the filter keeps none), its terms
    /// checked in the wasm and its signature left to the ledger (the default).
    X402Paid,
    /// The same with `x402.verify_signatures`: the EIP-712 signature recovered in the wasm.
    X402PaidVerified,
}

const PATHS: [Path; 10] = [
    Path::ChallengePooled,
    Path::ChallengeMinted,
    Path::PayTokensOnly402,
    Path::PayTokenPaid,
    Path::PayTokenPrefetched,
    Path::PayTokenFirstUse,
    Path::L402Paid,
    Path::BadSignature,
    Path::X402Paid,
    Path::X402PaidVerified,
];

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::ChallengePooled => "no credential, L402 on → 402 (pooled challenge)",
            Path::ChallengeMinted => "no credential, L402 pool off → 402 (minted for it)",
            Path::PayTokensOnly402 => "no credential, Pay Tokens only → 402",
            Path::PayTokenPaid => "Pay Token paid call, each reserved → 200",
            Path::PayTokenPrefetched => "Pay Token paid call, prefetched holds (16) → 200",
            Path::PayTokenFirstUse => "Pay Token paid call, token not seen before → 200",
            Path::L402Paid => "L402 paid call → 200",
            Path::BadSignature => "Pay Token, bad signature → 401",
            Path::X402Paid => "x402 paid call, terms checked, signature left to the ledger → 200",
            Path::X402PaidVerified => "x402 paid call, signature verified in the wasm → 200",
        }
    }
}

/// Fuel and time spent in each phase over one run, and the challenges refilled.
#[derive(Clone, Copy, Default)]
struct Meter {
    fuel: [u64; PHASES.len()],
    time: [Duration; PHASES.len()],
    refilled: u64,
}

impl Meter {
    /// Runs one host call into the guest, charging its fuel and time to `phase`.
    fn measure<T>(
        &mut self,
        vm: &mut Vm,
        phase: Phase,
        call: impl FnOnce(&mut Vm) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let fuel = vm.fuel_used();
        let start = Instant::now();
        let result = call(vm);
        let elapsed = start.elapsed();
        self.fuel[phase as usize] += vm.fuel_used() - fuel;
        self.time[phase as usize] += elapsed;
        result
    }

    fn total_time(&self) -> Duration {
        self.time.iter().sum()
    }
}

/// What one flavor's scripts send: built once, cloned into each request outside the timing.
struct Script {
    flavor: Flavor,
    upstream: &'static str,
    no_credential: Pairs,
    pay_token: Pairs,
    l402: Pairs,
    bad_signature: Pairs,
    x402: Pairs,
    /// The ledger's answer to a 402's own challenge call.
    challenge: Reply,
    /// Real sandbox challenges, for the pool's refills (the same ones again each refill); the
    /// first also answers each call for a single one.
    minted: Vec<L402Challenge>,
    /// The ledger's hold for each request of a run, and the charge ids they carry.
    holds: Vec<Reply>,
    charge_ids: Vec<String>,
}

impl Script {
    fn new(flavor: Flavor, minted: Vec<L402Challenge>) -> anyhow::Result<Script> {
        let upstream = match flavor {
            Flavor::Envoy => LEDGER_CLUSTER,
            Flavor::Kong => KONG_LEDGER,
        };
        let charge_ids: Vec<String> = (0..PER_RUN).map(|i| format!("ch_bench_{i:04}")).collect();
        let holds = charge_ids
            .iter()
            .map(|id| {
                Reply::json(
                    200,
                    &json!({"chargeId": id, "amountUsdc": "0.001", "remainingUsdc": "0.999", "replayed": false}),
                )
            })
            .collect();
        Ok(Script {
            flavor,
            upstream,
            no_credential: get(None),
            pay_token: get(Some(&bearer(TOKEN_SECRET)?)),
            l402: get(Some(&l402_credential()?)),
            bad_signature: get(Some(&bearer("not-the-token-secret-0123456789abc")?)),
            x402: x402_payment()?,
            challenge: Reply::json(200, &serde_json::to_value(minted.first().context("none")?)?),
            minted,
            holds,
            charge_ids,
        })
    }

    /// A configured VM for `path`: L402 or its pool off only where the path says so.
    fn vm(&self, path: Path) -> anyhow::Result<Vm> {
        let mut config = json!({
            "service_id": "weather",
            "routes": [{"path_prefix": "/v1/forecast", "price_usdc": "0.001"}],
            "ledger": {"upstream": self.upstream, "gateway_key": GATEWAY_KEY, "timeout_ms": 800,
                "prefetch_holds": 0},
            "pay_token": {"keys": [{"alg": "HS256", "secret": TOKEN_SECRET}]},
            "l402": {"secret": L402_SECRET, "budget_usdc": "0.01", "sats_per_usdc": 1000},
        });
        if path == Path::PayTokensOnly402
            && let Some(config) = config.as_object_mut()
        {
            config.remove("l402");
        }
        if path == Path::ChallengeMinted {
            config["l402"]["challenge_pool"] = json!(0);
        }
        if path == Path::PayTokenPrefetched {
            config["ledger"]["prefetch_holds"] = json!(PREFETCH_HOLDS);
        }
        if matches!(path, Path::X402Paid | Path::X402PaidVerified) {
            config["x402"] = json!({
                "network": "eip155:31337", "asset": X402_ASSET, "asset_name": "USD Coin",
                "asset_version": "2", "pay_to": X402_PAY_TO,
                "verify_signatures": path == Path::X402PaidVerified,
            });
        }
        let mut vm = Vm::load(self.flavor)?;
        ensure!(vm.configure(config.to_string().as_bytes())?, "config refused: {:?}", vm.logs());
        Ok(vm)
    }

    /// The one dispatch made since the last look, checked to go to the ledger at `path`.
    fn one_call(&self, vm: &mut Vm, path: &str) -> anyhow::Result<Dispatch> {
        let mut dispatches = vm.take_dispatches();
        ensure!(dispatches.len() == 1, "expected one dispatch to {path}, got {dispatches:?}");
        let call = dispatches.remove(0);
        ensure!(call.upstream == self.upstream && call.path() == path, "unexpected {call:?}");
        Ok(call)
    }

    /// `PER_RUN` requests down `path` (and, for paid calls, the settle batch after them).
    /// `warming`: the pool may still be learning the rate, and run dry.
    fn run(&self, vm: &mut Vm, path: Path, warming: bool) -> anyhow::Result<Meter> {
        let mut meter = Meter::default();
        // The charge ids the prefetched path's calls went on with, in order.
        let mut served = Vec::new();
        for i in 0..PER_RUN {
            match path {
                Path::ChallengePooled => {
                    if i % REQUESTS_PER_TICK == 0 {
                        vm.advance(TICK);
                        self.refill(vm, &mut meter)?;
                    }
                    self.pooled(vm, &mut meter, warming)?
                }
                Path::ChallengeMinted => self.challenged(vm, &mut meter)?,
                Path::PayTokensOnly402 => {
                    self.answered_at_once(vm, &mut meter, &self.no_credential, 402)?
                }
                Path::BadSignature => {
                    self.answered_at_once(vm, &mut meter, &self.bad_signature, 401)?
                }
                Path::PayTokenPaid => self.paid(vm, &mut meter, &self.pay_token, i)?,
                Path::PayTokenPrefetched => {
                    let charge_id = self.prefetched(vm, &mut meter)?;
                    served.push(charge_id);
                }
                Path::PayTokenFirstUse => {
                    let fresh = get(Some(&bearer_with(TOKEN_SECRET, &unique_token_id())?));
                    self.paid(vm, &mut meter, &fresh, i)?
                }
                Path::L402Paid => self.paid(vm, &mut meter, &self.l402, i)?,
                Path::X402Paid | Path::X402PaidVerified => {
                    self.paid(vm, &mut meter, &self.x402, i)?
                }
            }
        }
        let settled = [
            Path::PayTokenPaid,
            Path::PayTokenFirstUse,
            Path::L402Paid,
            Path::X402Paid,
            Path::X402PaidVerified,
        ];
        if settled.contains(&path) {
            self.settle(vm, &mut meter, &self.charge_ids)?;
        }
        if path == Path::PayTokenPrefetched {
            self.settle(vm, &mut meter, &served)?;
        }
        Ok(meter)
    }

    /// The tick, and the refills it (and each refill's reply) sends, answered with as many
    /// challenges as asked for.
    fn refill(&self, vm: &mut Vm, meter: &mut Meter) -> anyhow::Result<()> {
        meter.measure(vm, Phase::Refill, Vm::tick)?;
        let mut dispatches: VecDeque<Dispatch> = vm.take_dispatches().into();
        while let Some(call) = dispatches.pop_front() {
            ensure!(call.path() == CHALLENGES, "unexpected {call:?}");
            let count = call.json()["count"].as_u64().context("a refill without a count")?;
            let count = usize::try_from(count)?;
            ensure!(count <= self.minted.len(), "asked for {count}");
            let reply = Reply::json(200, &json!({ "challenges": &self.minted[..count] }));
            meter.measure(vm, Phase::Refill, |vm| vm.reply(call.token, reply))?;
            meter.refilled += u64::try_from(count)?;
            dispatches.extend(vm.take_dispatches());
        }
        Ok(())
    }

    /// Request headers → local 402 with a pooled challenge; while `warming`, a 402 the pool
    /// has nothing for is answered the way [`Script::challenged`] does.
    fn pooled(&self, vm: &mut Vm, meter: &mut Meter, warming: bool) -> anyhow::Result<()> {
        let headers = self.no_credential.clone();
        let (id, _) = meter.measure(vm, Phase::RequestHeaders, |vm| vm.request_headers(headers))?;
        let dispatches = vm.take_dispatches();
        if let Some(call) = dispatches.first() {
            ensure!(warming && dispatches.len() == 1, "the pool ran dry: {dispatches:?}");
            let reply = self.challenge.clone();
            meter.measure(vm, Phase::LedgerReply, |vm| vm.reply(call.token, reply))?;
        }
        expect_l402_challenge(vm, id)?;
        self.end(vm, meter, id)
    }

    /// Request headers → challenge dispatch → the ledger's challenge → local 402.
    fn challenged(&self, vm: &mut Vm, meter: &mut Meter) -> anyhow::Result<()> {
        let headers = self.no_credential.clone();
        let (id, action) =
            meter.measure(vm, Phase::RequestHeaders, |vm| vm.request_headers(headers))?;
        ensure!(action == Action::Pause, "not paused for the challenge");
        let call = self.one_call(vm, CHALLENGES)?;
        let reply = self.challenge.clone();
        meter.measure(vm, Phase::LedgerReply, |vm| vm.reply(call.token, reply))?;
        expect_l402_challenge(vm, id)?;
        self.end(vm, meter, id)
    }

    /// Request headers → local response `status`, without a dispatch.
    fn answered_at_once(
        &self,
        vm: &mut Vm,
        meter: &mut Meter,
        headers: &Pairs,
        status: u32,
    ) -> anyhow::Result<()> {
        let headers = headers.clone();
        let (id, _) = meter.measure(vm, Phase::RequestHeaders, |vm| vm.request_headers(headers))?;
        let dispatches = vm.take_dispatches();
        ensure!(dispatches.is_empty(), "unexpected dispatches {dispatches:?}");
        let stream = vm.stream(id).context("no stream")?;
        let response = stream.local_response.as_ref().context("no local response")?;
        ensure!(response.status == status, "expected {status}, got {response:?}");
        ensure!(stream.resumed == 0, "a refused request was resumed");
        self.end(vm, meter, id)
    }

    /// Request headers → reserve dispatch → hold → response headers 200 → end of stream.
    fn paid(
        &self,
        vm: &mut Vm,
        meter: &mut Meter,
        headers: &Pairs,
        i: usize,
    ) -> anyhow::Result<()> {
        let headers = headers.clone();
        let (id, action) =
            meter.measure(vm, Phase::RequestHeaders, |vm| vm.request_headers(headers))?;
        ensure!(action == Action::Pause, "not paused for the reserve");
        let call = self.one_call(vm, HOLDS)?;
        let hold = self.holds[i].clone();
        meter.measure(vm, Phase::LedgerReply, |vm| vm.reply(call.token, hold))?;
        let stream = vm.stream(id).context("no stream")?;
        ensure!(
            stream.resumed == 1 && stream.local_response.is_none(),
            "the held request was not forwarded: {:?}",
            stream.local_response
        );
        let charge_id = &self.charge_ids[i];
        ensure!(stream.request_header("x-charge-id").as_ref() == Some(charge_id), "no charge id");
        let response = pairs(&[(":status", "200")]);
        let action =
            meter.measure(vm, Phase::ResponseHeaders, |vm| vm.response_headers(id, response))?;
        ensure!(action == Action::Continue, "response headers paused");
        let stream = vm.stream(id).context("no stream")?;
        ensure!(
            stream.response_header("x-amount-usdc").as_deref() == Some("0.001000"),
            "no charge reported: {:?}",
            stream.response_headers
        );
        ensure!(vm.take_dispatches().is_empty(), "a dispatch outside the tick");
        self.end(vm, meter, id)
    }

    fn end(&self, vm: &mut Vm, meter: &mut Meter, id: u32) -> anyhow::Result<()> {
        meter.measure(vm, Phase::End, |vm| vm.end(id))?;
        ensure!(vm.stream(id).is_some_and(|s| s.ended), "stream {id} not ended");
        Ok(())
    }

    /// Request headers → (a reserve for the next batch, answered with `PREFETCH_HOLDS` − 1
    /// extras, or at once on a prefetched hold) → response headers 200 → end of stream; the
    /// charge id the call went on with.
    fn prefetched(&self, vm: &mut Vm, meter: &mut Meter) -> anyhow::Result<String> {
        let headers = self.pay_token.clone();
        let (id, action) =
            meter.measure(vm, Phase::RequestHeaders, |vm| vm.request_headers(headers))?;
        let dispatches = vm.take_dispatches();
        if let Some(call) = dispatches.first() {
            ensure!(dispatches.len() == 1 && action == Action::Pause, "{dispatches:?}");
            ensure!(call.path() == HOLDS, "unexpected {call:?}");
            let count = call.json()["count"].as_u64().unwrap_or(1);
            let mut ids: Vec<String> = (0..count).map(|_| unique_charge_id()).collect();
            let first = ids.remove(0);
            let hold = Reply::json(
                200,
                &json!({"chargeId": first, "amountUsdc": "0.001", "remainingUsdc": "0.999",
                    "replayed": false, "extraChargeIds": ids}),
            );
            meter.measure(vm, Phase::LedgerReply, |vm| vm.reply(call.token, hold))?;
        } else {
            ensure!(action == Action::Continue, "paused without a reserve");
        }
        let stream = vm.stream(id).context("no stream")?;
        ensure!(stream.resumed <= 1 && stream.local_response.is_none(), "not forwarded");
        let charge_id = stream.request_header("x-charge-id").context("no charge id")?;
        let response = pairs(&[(":status", "200")]);
        meter.measure(vm, Phase::ResponseHeaders, |vm| vm.response_headers(id, response))?;
        let stream = vm.stream(id).context("no stream")?;
        ensure!(
            stream.response_header("x-charge-id").as_ref() == Some(&charge_id),
            "no charge reported: {:?}",
            stream.response_headers
        );
        ensure!(vm.take_dispatches().is_empty(), "a dispatch outside the tick");
        self.end(vm, meter, id)?;
        Ok(charge_id)
    }

    /// The tick that sends the run's commits (of `charge_ids`, in order), and the ledger's
    /// acknowledgement.
    fn settle(&self, vm: &mut Vm, meter: &mut Meter, charge_ids: &[String]) -> anyhow::Result<()> {
        meter.measure(vm, Phase::Settle, Vm::tick)?;
        let call = self.one_call(vm, SETTLE)?;
        let settlements = call.json()["settlements"].as_array().cloned().unwrap_or_default();
        let committed = settlements
            .iter()
            .zip(charge_ids)
            .all(|(s, id)| s["chargeId"].as_str() == Some(id.as_str()) && s["outcome"] == "commit");
        ensure!(settlements.len() == PER_RUN && committed, "unexpected batch {settlements:?}");
        let results: Vec<Value> =
            charge_ids.iter().map(|id| json!({"chargeId": id, "status": "committed"})).collect();
        let reply = Reply::json(200, &json!({ "results": results }));
        meter.measure(vm, Phase::Settle, |vm| vm.reply(call.token, reply))?;
        // Acknowledged: the next tick has nothing to send (a tick's cost, not a request's).
        vm.tick()?;
        ensure!(vm.take_dispatches().is_empty(), "an acknowledged batch was sent again");
        Ok(())
    }
}

fn get(authorization: Option<&str>) -> Pairs {
    let mut headers = pairs(&[
        (":method", "GET"),
        (":path", "/v1/forecast/oslo"),
        (":authority", "api.test"),
        (":scheme", "https"),
        ("user-agent", "paystile-bench/1"),
        ("accept", "application/json"),
    ]);
    if let Some(authorization) = authorization {
        headers.push((b"authorization".to_vec(), authorization.as_bytes().to_vec()));
    }
    headers
}

const X402_ASSET: &str = "0x5FbDB2315678afecb367f032d93F642f64180aa3";
const X402_PAY_TO: &str = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC";

/// A request with an x402 payment of the route's price, valid for a minute at [`NOW`].
fn x402_payment() -> anyhow::Result<Pairs> {
    let offer = x402::Offer {
        chain_id: 31337,
        asset: X402_ASSET.parse()?,
        name: "USD Coin".into(),
        version: "2".into(),
        pay_to: X402_PAY_TO.parse()?,
        max_timeout_seconds: 60,
    };
    let key = x402::SigningKey::from_slice(&[0x42; 32])?;
    let terms =
        x402::Terms { offer: &offer, amount: 1000, window: (0, NOW + 60), nonce: x402::B256::ZERO };
    let mut headers = get(None);
    let payment = x402::sign(&key, &terms, x402::Version::V2);
    headers.push((b"payment-signature".to_vec(), payment.into_bytes()));
    Ok(headers)
}

fn bearer(secret: &str) -> anyhow::Result<String> {
    bearer_with(secret, "tok_bench")
}

/// Checks that stream `id` was answered locally with a 402 carrying an L402 challenge first
/// and last, Bearer between.
fn expect_l402_challenge(vm: &Vm, id: u32) -> anyhow::Result<()> {
    let stream = vm.stream(id).context("no stream")?;
    let response = stream.local_response.as_ref().context("no local response")?;
    let challenges = response.headers_named("www-authenticate");
    ensure!(
        response.status == 402
            && challenges.len() == 3
            && challenges[0].starts_with("L402 ")
            && challenges[1].starts_with("Bearer ")
            && challenges[2] == challenges[0],
        "not a 402 with an L402 challenge: {response:?}"
    );
    Ok(())
}

/// A token id no earlier request of the process used.
fn unique_charge_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("ch_prefetched_{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn unique_token_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("tok_bench_{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn bearer_with(secret: &str, token_id: &str) -> anyhow::Result<String> {
    let claims = PayTokenClaims {
        sub: "agent".into(),
        jti: token_id.into(),
        service_id: Some("weather".into()),
        limit_usdc: "1".parse()?,
        scope: Scope::Single,
        buyer_tag: None,
        exp: NOW + 3_600,
        iat: None,
        nbf: None,
        iss: None,
        aud: None,
        sandbox: false,
    };
    Ok(format!("Bearer {}", pay_token::sign(&claims, &SigningKey::hs256(secret))))
}

fn l402_credential() -> anyhow::Result<String> {
    let preimage = [4u8; 32];
    let identifier =
        Identifier { payment_hash: Sha256::digest(preimage).into(), token_id: [8; 32] };
    let offer = Offer {
        service_id: "weather".into(),
        valid_until: NOW + 3_600,
        budget: "0.01".parse()?,
        capabilities: vec![],
        sandbox: false,
    };
    let macaroon = l402::mint(L402_SECRET.as_bytes(), &identifier, &offer);
    Ok(format!("L402 {}:{}", l402::encode_macaroon(&macaroon), hex::encode(preimage)))
}

/// One path's figures: the run with the median wall time, and the spread of the runs.
struct Row {
    flavor: Flavor,
    path: Path,
    median: Meter,
    fastest: Duration,
    slowest: Duration,
    fuel_varies: bool,
}

fn measure(script: &Script, path: Path) -> anyhow::Result<Row> {
    let mut vm = script.vm(path)?;
    ensure!(vm.now() == Duration::from_secs(NOW), "the host's clock moved: {:?}", vm.now());
    for _ in 0..WARM_UP_RUNS {
        script.run(&mut vm, path, true)?;
    }
    let mut runs = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        runs.push(script.run(&mut vm, path, false)?);
    }
    ensure!(vm.unimplemented_calls().is_empty(), "{:?}", vm.unimplemented_calls());
    let fuel_varies = runs.iter().any(|run| run.fuel != runs[0].fuel);
    runs.sort_by_key(Meter::total_time);
    let (Some(first), Some(last)) = (runs.first(), runs.last()) else { bail!("no runs") };
    Ok(Row {
        flavor: script.flavor,
        path,
        median: runs[runs.len() / 2],
        fastest: first.total_time(),
        slowest: last.total_time(),
        fuel_varies,
    })
}

/// Per-request figures, with `PER_RUN` requests a run.
fn per_request_fuel(fuel: u64) -> String {
    let fuel = fuel / PER_RUN as u64;
    if fuel == 0 { "–".to_owned() } else { thousands(fuel) }
}

fn per_request_micros(time: Duration) -> String {
    if time.is_zero() {
        "–".to_owned()
    } else {
        format!("{:.2}", time.as_secs_f64() * 1e6 / PER_RUN as f64)
    }
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

fn print_tables(rows: &[Row]) {
    let phases: Vec<&str> = PHASES.iter().map(|(_, name)| *name).collect();
    println!("### Wasm fuel per request (≈ wasm instructions executed)\n");
    println!("| gateway | path | total | {} |", phases.join(" | "));
    println!("|---|---|--:|{}", "--:|".repeat(PHASES.len()));
    for row in rows {
        let total: u64 = row.median.fuel.iter().sum();
        let split: Vec<String> = row.median.fuel.iter().map(|f| per_request_fuel(*f)).collect();
        let mark = if row.fuel_varies { " (varies between runs)" } else { "" };
        println!(
            "| {:?} | {} | {}{mark} | {} |",
            row.flavor,
            row.path.name(),
            per_request_fuel(total),
            split.join(" | ")
        );
    }
    println!(
        "\n### Wall time per request, µs (median of {RUNS} runs of {PER_RUN} requests; fastest–slowest run)\n"
    );
    println!("| gateway | path | total | runs | {} |", phases.join(" | "));
    println!("|---|---|--:|--:|{}", "--:|".repeat(PHASES.len()));
    for row in rows {
        let split: Vec<String> = row.median.time.iter().map(|t| per_request_micros(*t)).collect();
        println!(
            "| {:?} | {} | {} | {}–{} | {} |",
            row.flavor,
            row.path.name(),
            per_request_micros(row.median.total_time()),
            per_request_micros(row.fastest),
            per_request_micros(row.slowest),
            split.join(" | ")
        );
    }
    println!(
        "\nSettle share: the tick sending the batch of {PER_RUN} commits plus the ledger's reply, \
         divided by {PER_RUN}. Refill share: the ticks (one per {REQUESTS_PER_TICK} requests) and \
         the refills they send with the ledger's replies, divided by {PER_RUN}. A dash: the path \
         has no such phase."
    );
}

/// Real sandbox challenges for this bench's offer, as the ledger mints them.
fn mint_challenges() -> anyhow::Result<Vec<L402Challenge>> {
    let node = SandboxNode::new(L402_SECRET.as_bytes())?;
    let minter = ChallengeMinter::new(Secret::new(L402_SECRET), InvoiceBackend::Sandbox(node));
    let offer = ChallengeRequest {
        service_id: "weather".into(),
        budget_usdc: "0.01".parse()?,
        amount_msat: 10_000,
        valid_seconds: 86_400,
        capabilities: vec![],
        count: Some(256),
    };
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    Ok(runtime.block_on(minter.mint_batch(&offer, NOW, Duration::MAX))?)
}

fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    let minted = mint_challenges()?;
    let minting = started.elapsed();
    let bytes = serde_json::to_vec(&minted)?.len() / minted.len();
    ensure!(minted.len() == 256, "minted {}", minted.len());
    // Compiles the module once for the process, before anything is timed.
    drop(Vm::load(Flavor::Envoy)?);
    let compiled = started.elapsed();
    let mut rows = Vec::new();
    for flavor in [Flavor::Envoy, Flavor::Kong] {
        let script = Script::new(flavor, minted.clone())?;
        for path in PATHS {
            let row =
                measure(&script, path).with_context(|| format!("{flavor:?}: {}", path.name()))?;
            rows.push(row);
        }
    }
    print_tables(&rows);
    for row in rows.iter().filter(|row| row.median.refilled > 0) {
        let fuel = row.median.fuel[Phase::Refill as usize] / row.median.refilled;
        println!(
            "{:?}: refills cost {} fuel per challenge ({} challenges in the median run).",
            row.flavor,
            thousands(fuel),
            row.median.refilled
        );
    }
    println!(
        "\nA sandbox challenge is {bytes} bytes of JSON in a refill's reply; the ledger's code \
         minted {} in {:.1} ms.",
        minted.len(),
        minting.as_secs_f64() * 1e3
    );
    println!(
        "\nModule compiled in {:.2} s; whole bench {:.1} s.",
        compiled.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
