//! paystile's harness: the demo stack, and the end-to-end tests' view of it.
//!
//! A [`stack::Stack`] is a real Envoy (from PyPI) running `envoy-config/envoy.yaml` with the
//! release filter `.wasm`, the real `paystile-ledger` binary on its SQLite file, and the demo
//! [`upstream`]. The demo runs it on the default ports; tests run one per test on free ports.
//!
//! [`chain`] is a local EVM node (anvil) with the x402 sandbox's USDC on it.
//!
//! [`browser`] drives headless Chromium through chromedriver for the console's tests.
//!
//! [`bench`] measures the gateway under wrk for `bench/run` (the `paystile-bench` binary).
//!
//! [`host`] is a proxy-wasm host on wasmtime that runs the same `.wasm` without a gateway,
//! behaving like Envoy or like Kong, so that every filter path can be scripted.

pub mod bench;
pub mod browser;
pub mod chain;
pub mod e2e;
pub mod envoy;
pub mod host;
pub mod paths;
pub mod stack;
pub mod upstream;
