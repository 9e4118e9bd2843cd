//! paystile's proxy-wasm filter.
//!
//! The decisions live in plain Rust and are tested natively: [`gate`] for one request,
//! [`routes`] for which route prices it, [`answer`] for the answers the gateway makes itself,
//! [`ledger`] for the calls to the ledger and what its replies mean, [`settle`] for the queue
//! of commits and releases, [`ledgers`] for what the VM keeps per ledger, [`metrics`] for what it reports, [`prefetch`] for the holds reserved ahead for hot tokens,
//! [`watch`] for the ledger's revocations that drop them at once,
//! [`pool`] for the L402 challenges minted ahead, and [`config`] for the JSON configuration.
//! Credentials are verified by `paystile_protocol::credential`, as the ledger verifies them.
//! `wasm` is the thin proxy-wasm adapter, compiled for the `wasm32-wasip1` module a gateway
//! loads.

pub mod answer;
pub mod config;
pub mod gate;
pub mod ledger;
pub mod ledgers;
pub mod metrics;
pub mod pool;
pub mod prefetch;
pub mod routes;
pub mod settle;
pub mod watch;

#[cfg(target_arch = "wasm32")]
mod wasm;
