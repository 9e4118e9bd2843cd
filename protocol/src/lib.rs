//! paystile's wire formats, shared by the proxy-wasm filter and the sidecar ledger.
//!
//! Everything here is pure (no I/O, no clock; the only randomness is the hash key of
//! [`verified::VerifiedCache`], from the host) so that it compiles to `wasm32-wasip1` for the
//! filter and is unit-testable natively. Each format has exactly one implementation, and it
//! lives here, as does the verification of credentials both the filter and the ledger run
//! ([`credential::verify`]).

pub mod credential;
pub mod error;
pub mod headers;
pub mod jwk;
pub mod jws;
pub mod l402;
pub mod ledger_api;
pub mod macaroon;
pub mod money;
pub mod pay_token;
pub mod verified;
pub mod x402;

pub use error::{ErrorBody, ErrorCode};
pub use money::{UnitPrice, Usdc};
