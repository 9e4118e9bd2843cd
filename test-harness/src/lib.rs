//! paystile's harness: the demo stack, and the end-to-end tests' view of it.
//!
//! A [`stack::Stack`] is a real Envoy (from PyPI) running `envoy-config/envoy.yaml` with the
//! release filter `.wasm`, the real `paystile-ledger` binary on its SQLite file, and the demo
//! [`upstream`]. The demo runs it on the default ports; tests run one per test on free ports.

pub mod e2e;
pub mod envoy;
pub mod paths;
pub mod stack;
pub mod upstream;
