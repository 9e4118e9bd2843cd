//! paystile's sidecar ledger: it holds each paid call's price atomically against the caller's
//! Pay Token or L402 credential, commits or releases the hold once the upstream has answered,
//! mints L402 challenges, and issues and revokes tokens. See DESIGN.md for the API contract.

pub mod buyer_access;
pub mod challenge;
pub mod child;
pub mod cli;
pub mod client;
pub mod console;
pub mod domain;
pub mod http;
pub mod invoice;
pub mod journal;
pub mod ledger;
pub mod rules;
pub mod server;
pub mod settings;
pub mod settlement;
pub mod store;
pub mod telemetry;
pub mod token_keys;
