//! Lightning invoices for L402 challenges, from the configured backend.
//!
//! The ledger asks for an invoice each time it mints a challenge. The payment hash goes into
//! the macaroon's identifier; the preimage reaches the client only by paying, and the filter
//! checks it inline, so nothing here is consulted again when the credential is used.

pub mod lnd;
pub mod sandbox;

use std::time::Duration;

use crate::settings::InvoiceBackendSettings;

/// What the invoice must ask for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvoiceRequest {
    pub amount_msat: u64,
    /// Shown by the payer's wallet.
    pub memo: String,
    pub expiry: Duration,
}

/// A payable invoice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invoice {
    pub payment_hash: [u8; 32],
    /// The BOLT11 payment request (`lnbc…`, `lnbcrt…`).
    pub bolt11: String,
}

#[derive(Debug, thiserror::Error)]
pub enum InvoiceError {
    /// The backend could not be reached or refused to answer; the caller may retry.
    #[error("invoice backend unavailable: {0}")]
    Unavailable(String),
    /// The backend answered something that is not a usable invoice.
    #[error("invoice backend answered nonsense: {0}")]
    BadAnswer(String),
}

/// The configured invoice backend.
pub enum InvoiceBackend {
    /// The ledger's own regtest node: signs invoices and pays them on request.
    Sandbox(sandbox::SandboxNode),
    /// An LND node, through its REST API.
    Lnd(lnd::LndClient),
}

impl InvoiceBackend {
    /// The backend `settings` describe. `secret` is the L402 secret; the sandbox derives its
    /// node key and preimages from it.
    pub fn new(
        settings: &InvoiceBackendSettings,
        secret: &[u8],
    ) -> Result<InvoiceBackend, InvoiceError> {
        match settings {
            InvoiceBackendSettings::Sandbox => {
                Ok(InvoiceBackend::Sandbox(sandbox::SandboxNode::new(secret)?))
            }
            // Reads the macaroon and certificate files; a wrong path fails here, at start-up.
            InvoiceBackendSettings::Lnd(settings) => lnd::LndClient::new(settings)
                .map(InvoiceBackend::Lnd)
                .map_err(|e| InvoiceError::Unavailable(e.to_string())),
        }
    }

    pub async fn create(&self, request: &InvoiceRequest) -> Result<Invoice, InvoiceError> {
        match self {
            InvoiceBackend::Sandbox(node) => node.create(request),
            InvoiceBackend::Lnd(client) => client.create(request).await,
        }
    }

    /// The sandbox node, when it is the backend.
    pub fn sandbox(&self) -> Option<&sandbox::SandboxNode> {
        match self {
            InvoiceBackend::Sandbox(node) => Some(node),
            InvoiceBackend::Lnd(_) => None,
        }
    }
}
