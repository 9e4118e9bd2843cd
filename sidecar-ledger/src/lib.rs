//! paystile's sidecar ledger: it holds each paid call's price atomically against the caller's
//! Pay Token, commits or releases the hold once the upstream has answered, and issues and
//! revokes tokens. See DESIGN.md for the API contract.

pub mod child;
pub mod cli;
pub mod client;
pub mod http;
pub mod ledger;
pub mod rules;
pub mod server;
pub mod settings;
pub mod store;
