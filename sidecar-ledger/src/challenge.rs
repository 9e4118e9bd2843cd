//! L402 challenges: a fresh token id, an invoice from the configured backend, and a
//! macaroon binding the two to the service, an expiry and the budget the payment buys.
//!
//! A gateway may ask for a batch, to hand out one by one without a call per 402.
//! Minting stores nothing. The filter verifies a paid credential inline (the root key
//! derives from the shared L402 secret) and the ledger learns the token, with its budget,
//! on the first paid call, like a Pay Token minted elsewhere.

use std::time::{Duration, Instant};

use paystile_protocol::l402::{self, Identifier, Offer};
use paystile_protocol::ledger_api::{
    ChallengeRequest, L402Challenge, MAX_CHALLENGES_PER_CALL, SandboxPayment, SandboxPaymentRequest,
};
use paystile_protocol::pay_token::MAX_ID_LEN;

use crate::invoice::sandbox::SandboxPayError;
use crate::invoice::{InvoiceBackend, InvoiceError, InvoiceRequest};
use crate::settings::Secret;

/// The longest a paid credential may stay valid: ten years.
const MAX_VALID_SECONDS: u64 = 10 * 365 * 86_400;
/// Invoices expire within an hour (or with the credential, if sooner): a client pays at once.
const MAX_INVOICE_EXPIRY: Duration = Duration::from_secs(3_600);
/// More capabilities than any route set needs; bounds the macaroon's size.
const MAX_CAPABILITIES: usize = 16;
/// A batch stops growing after this long: well inside a gateway's call timeout (1 s by
/// default), whatever each invoice costs the backend (an LND node writes each to disk).
pub const BATCH_TIME_BUDGET: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum ChallengeError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Invoice(#[from] InvoiceError),
    #[error("sandbox payments are off: the invoice backend is not the sandbox")]
    SandboxOff,
    #[error("{0}")]
    SandboxRefused(#[from] SandboxPayError),
}

pub struct ChallengeMinter {
    secret: Secret,
    backend: InvoiceBackend,
}

impl ChallengeMinter {
    pub fn new(secret: Secret, backend: InvoiceBackend) -> ChallengeMinter {
        ChallengeMinter { secret, backend }
    }

    /// Mints a challenge for `request` at `now` (Unix seconds).
    pub async fn mint(
        &self,
        request: &ChallengeRequest,
        now: u64,
    ) -> Result<L402Challenge, ChallengeError> {
        check(request)?;
        self.mint_checked(request, now).await
    }

    /// Mints `request.count` challenges, or as many as `budget` allows (at least one; the API
    /// gives [`BATCH_TIME_BUDGET`]), so that a slow invoice backend cannot make the gateway's
    /// call time out. Each has its own token id and invoice.
    pub async fn mint_batch(
        &self,
        request: &ChallengeRequest,
        now: u64,
        budget: Duration,
    ) -> Result<Vec<L402Challenge>, ChallengeError> {
        check(request)?;
        let count = request.count.unwrap_or(1);
        if !(1..=MAX_CHALLENGES_PER_CALL).contains(&count) {
            return Err(ChallengeError::Invalid(format!(
                "count must be between 1 and {MAX_CHALLENGES_PER_CALL}"
            )));
        }
        let started = Instant::now();
        let mut challenges = Vec::with_capacity(usize::from(count));
        while challenges.len() < usize::from(count)
            && (challenges.is_empty() || started.elapsed() < budget)
        {
            challenges.push(self.mint_checked(request, now).await?);
            // The sandbox signs without awaiting anything: let other requests run between
            // signatures rather than after the whole batch.
            tokio::task::yield_now().await;
        }
        Ok(challenges)
    }

    async fn mint_checked(
        &self,
        request: &ChallengeRequest,
        now: u64,
    ) -> Result<L402Challenge, ChallengeError> {
        let valid_until = now.saturating_add(request.valid_seconds);
        let sandbox = self.backend.sandbox().is_some();
        let invoice = self
            .backend
            .create(&InvoiceRequest {
                amount_msat: request.amount_msat,
                memo: format!(
                    "{}{} USDC of {}",
                    if sandbox { "SANDBOX, not payable: " } else { "" },
                    request.budget_usdc,
                    request.service_id
                ),
                expiry: MAX_INVOICE_EXPIRY.min(Duration::from_secs(request.valid_seconds)),
            })
            .await?;
        let identifier =
            Identifier { payment_hash: invoice.payment_hash, token_id: rand::random() };
        let offer = Offer {
            service_id: request.service_id.clone(),
            valid_until,
            budget: request.budget_usdc,
            capabilities: request.capabilities.clone(),
            sandbox,
        };
        let macaroon = l402::mint(self.secret.expose().as_bytes(), &identifier, &offer);
        Ok(L402Challenge {
            token_id: identifier.ledger_token_id(),
            macaroon: l402::encode_macaroon(&macaroon),
            invoice: invoice.bolt11,
            payment_hash: hex::encode(invoice.payment_hash),
            budget_usdc: offer.budget,
            amount_msat: request.amount_msat,
            valid_until,
            sandbox,
        })
    }

    /// Pays a sandbox invoice: its preimage.
    pub fn pay_sandbox(
        &self,
        request: &SandboxPaymentRequest,
    ) -> Result<SandboxPayment, ChallengeError> {
        let node = self.backend.sandbox().ok_or(ChallengeError::SandboxOff)?;
        let preimage = node.pay(&request.invoice)?;
        Ok(SandboxPayment { preimage: hex::encode(preimage), sandbox: true })
    }
}

/// Caveat values are `condition=value` text with comma-separated lists: the service id and
/// capabilities must not break that grammar.
fn check(request: &ChallengeRequest) -> Result<(), ChallengeError> {
    let invalid = |message: &str| Err(ChallengeError::Invalid(message.to_owned()));
    let caveat_safe = |value: &str| {
        !value.is_empty()
            && value.len() <= MAX_ID_LEN
            && value.bytes().all(|b| b.is_ascii_graphic() && !b",=:".contains(&b))
    };
    if !caveat_safe(&request.service_id) {
        return invalid("serviceId must be 1 to 255 visible ASCII characters without , = :");
    }
    if request.budget_usdc.is_zero() {
        return invalid("budgetUsdc must be greater than 0");
    }
    if request.amount_msat == 0 {
        return invalid("amountMsat must be greater than 0");
    }
    if request.valid_seconds == 0 || request.valid_seconds > MAX_VALID_SECONDS {
        return invalid("validSeconds must be between 1 and 315360000 (ten years)");
    }
    if request.capabilities.len() > MAX_CAPABILITIES
        || !request.capabilities.iter().all(|c| caveat_safe(c))
    {
        return invalid(
            "capabilities: at most 16, each 1 to 255 visible ASCII characters without , = :",
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    use super::*;
    use crate::invoice::sandbox::SandboxNode;

    const SECRET: &str = "an-l402-secret-of-32-characters!";

    fn minter() -> ChallengeMinter {
        let node = SandboxNode::new(SECRET.as_bytes()).unwrap();
        ChallengeMinter::new(Secret::new(SECRET), InvoiceBackend::Sandbox(node))
    }

    fn request() -> ChallengeRequest {
        ChallengeRequest {
            service_id: "weather".into(),
            budget_usdc: "0.05".parse().unwrap(),
            amount_msat: 50_000,
            valid_seconds: 3_600,
            capabilities: vec![],
            count: None,
        }
    }

    #[tokio::test]
    async fn a_paid_challenge_verifies_as_the_filter_would() {
        let minter = minter();
        let challenge = minter.mint(&request(), 1_000).await.unwrap();
        assert!(challenge.sandbox);
        assert_eq!(challenge.valid_until, 4_600);
        let paid = minter
            .pay_sandbox(&SandboxPaymentRequest { invoice: challenge.invoice.clone() })
            .unwrap();
        assert_eq!(
            hex::encode(Sha256::digest(hex::decode(&paid.preimage).unwrap())),
            challenge.payment_hash
        );
        let target = l402::Target {
            service_id: "weather",
            capability: l402::Capability::Route(None),
            now: 1_001,
            accept_sandbox: true,
        };
        let grant =
            l402::verify(&challenge.macaroon, &paid.preimage, SECRET.as_bytes(), &target).unwrap();
        assert_eq!(grant.identifier.ledger_token_id(), challenge.token_id);
        assert_eq!((grant.limit, grant.cap), (challenge.budget_usdc, challenge.budget_usdc));
        assert_eq!(grant.expires_at, 4_600);
        let production = l402::Target { accept_sandbox: false, ..target };
        let refused =
            l402::verify(&challenge.macaroon, &paid.preimage, SECRET.as_bytes(), &production);
        assert_eq!(refused, Err(l402::L402Error::SandboxCredential));
        let other = minter.mint(&request(), 1_000).await.unwrap();
        assert_ne!(other.token_id, challenge.token_id, "every challenge is a new token");
        assert_ne!(other.payment_hash, challenge.payment_hash);
    }

    #[tokio::test]
    async fn requests_that_would_break_the_caveat_grammar_are_refused() {
        let minter = minter();
        for bad in [
            ChallengeRequest { service_id: "a,b".into(), ..request() },
            ChallengeRequest { service_id: String::new(), ..request() },
            ChallengeRequest { capabilities: vec!["read=all".into()], ..request() },
            ChallengeRequest { budget_usdc: "0".parse().unwrap(), ..request() },
            ChallengeRequest { amount_msat: 0, ..request() },
            ChallengeRequest { valid_seconds: 0, ..request() },
        ] {
            assert!(matches!(minter.mint(&bad, 0).await, Err(ChallengeError::Invalid(_))));
            let batch = ChallengeRequest { count: Some(2), ..bad };
            let minted = minter.mint_batch(&batch, 0, BATCH_TIME_BUDGET).await;
            assert!(matches!(minted, Err(ChallengeError::Invalid(_))));
        }
        for count in [0, MAX_CHALLENGES_PER_CALL + 1] {
            let batch = ChallengeRequest { count: Some(count), ..request() };
            let minted = minter.mint_batch(&batch, 0, BATCH_TIME_BUDGET).await;
            assert!(matches!(minted, Err(ChallengeError::Invalid(_))));
        }
    }

    #[tokio::test]
    async fn a_batch_is_that_many_distinct_challenges_each_payable() {
        let minter = minter();
        let batch = ChallengeRequest { count: Some(MAX_CHALLENGES_PER_CALL), ..request() };
        let challenges = minter.mint_batch(&batch, 1_000, Duration::MAX).await.unwrap();
        assert_eq!(challenges.len(), usize::from(MAX_CHALLENGES_PER_CALL));
        let distinct = |field: fn(&L402Challenge) -> &String| {
            challenges.iter().map(field).collect::<std::collections::HashSet<_>>().len()
        };
        assert_eq!(distinct(|c| &c.token_id), challenges.len());
        assert_eq!(distinct(|c| &c.invoice), challenges.len());
        assert_eq!(distinct(|c| &c.macaroon), challenges.len());
        let target = l402::Target {
            service_id: "weather",
            capability: l402::Capability::Route(None),
            now: 1_001,
            accept_sandbox: true,
        };
        for challenge in [&challenges[0], &challenges[255]] {
            let paid = minter
                .pay_sandbox(&SandboxPaymentRequest { invoice: challenge.invoice.clone() })
                .unwrap();
            let grant =
                l402::verify(&challenge.macaroon, &paid.preimage, SECRET.as_bytes(), &target)
                    .unwrap();
            assert_eq!(grant.identifier.ledger_token_id(), challenge.token_id);
        }
        // Out of time: one challenge all the same, since the gateway asked for it.
        let rushed = minter.mint_batch(&batch, 1_000, Duration::ZERO).await.unwrap();
        assert_eq!(rushed.len(), 1);
    }
}
