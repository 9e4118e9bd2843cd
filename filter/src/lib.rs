//! paystile's proxy-wasm filter.
//!
//! The decisions live in plain Rust ([`gate`] for one request, [`settle`] for the queue of
//! commits and releases, [`prefetch`] for the holds reserved ahead for hot tokens, [`pool`]
//! for the L402 challenges minted ahead, [`verified`] for the credentials already verified,
//! [`config`] for the JSON configuration) and are tested natively.
//! `wasm` is the thin proxy-wasm adapter, compiled for the `wasm32-wasip1` module a
//! gateway loads.

pub mod config;
pub mod gate;
pub mod pool;
pub mod prefetch;
pub mod settle;
pub mod verified;

#[cfg(target_arch = "wasm32")]
mod wasm;
