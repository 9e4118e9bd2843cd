//! Calls to the ledger, and what its replies mean: where to send them ([`LedgerTarget`]),
//! what is sent ([`LedgerCall`]), what came back ([`LedgerReply`]) and how a reserve's reply
//! reads ([`LedgerAnswer`]). The gate, the settle queue, the prefetched holds and the
//! challenge pool all speak to the ledger through these.

use std::time::Duration;

use paystile_protocol::ledger_api::Hold;
use paystile_protocol::{ErrorBody, ErrorCode};

/// Where and how to call the ledger.
#[derive(Clone, Debug)]
pub struct LedgerTarget {
    /// Envoy/Istio: a cluster name; Kong: a resolvable `host:port`.
    pub upstream: String,
    pub authority: String,
    pub timeout: Duration,
    /// `Bearer <gateway key>`, ready to send.
    pub authorization: String,
    pub settle_interval: Duration,
    /// Holds a reserve asks for when its token is hot on this VM (0: off, every call
    /// reserved on its own); the extras serve the token's next calls without the ledger.
    pub prefetch_holds: u16,
    /// How long a prefetched hold may wait for a call before it is released unused; also
    /// how recent a token's last call must be for the token to count as hot.
    pub prefetch_max_age_ms: u64,
    /// How long a reserve that settles an x402 payment first may take (`settle: before`).
    pub settle_first_timeout: Duration,
}

impl LedgerTarget {
    /// [`LedgerTarget::timeout`] in milliseconds, the unit of the gate's clocks.
    pub fn timeout_ms(&self) -> u64 {
        u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX)
    }
}

/// A call to the ledger: `POST <path>` with a JSON body. The adapter adds the target,
/// the authority and the gateway key from the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerCall {
    pub path: &'static str,
    pub body: Vec<u8>,
    /// Longer than the configured timeout, for a call that waits on a chain.
    pub timeout: Option<Duration>,
}

/// What came back from a ledger call. `status` is `None` when there was no answer at all
/// (connection refused or reset).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LedgerReply {
    pub status: Option<u16>,
    pub body: Vec<u8>,
}

/// How the ledger answered lately, as far as a gate can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Answering,
    Unreachable,
    Confused,
}

/// What a reserve call's reply means.
#[derive(Debug)]
pub enum LedgerAnswer {
    Hold(Hold),
    /// A refusal to pass on to the client.
    Refusal(ErrorBody),
    /// No answer, a timeout or a server error: the ledger may be down or overloaded.
    Unreachable,
    /// An answer that is none of ours: a misconfigured ledger or route.
    Confused,
}

impl LedgerAnswer {
    pub fn health(&self) -> Health {
        match self {
            LedgerAnswer::Hold(_) | LedgerAnswer::Refusal(_) => Health::Answering,
            LedgerAnswer::Unreachable => Health::Unreachable,
            LedgerAnswer::Confused => Health::Confused,
        }
    }

    pub fn read(reply: &LedgerReply) -> LedgerAnswer {
        match reply.status {
            // Envoy reports a refused connection or a timeout as its own 503 or 504.
            None | Some(500..) => LedgerAnswer::Unreachable,
            Some(200) => match serde_json::from_slice::<Hold>(&reply.body) {
                Ok(hold) if is_charge_id(&hold.charge_id) => LedgerAnswer::Hold(hold),
                _ => LedgerAnswer::Confused,
            },
            Some(status) => match serde_json::from_slice::<ErrorBody>(&reply.body) {
                Ok(refusal) if is_ledger_refusal(refusal.code) && refusal.status() == status => {
                    LedgerAnswer::Refusal(refusal)
                }
                _ => LedgerAnswer::Confused,
            },
        }
    }
}

/// Charge ids go into headers: 1 to 64 characters of `[A-Za-z0-9_-]` (the ledger's are
/// `ch_` and 32 hex digits).
pub fn is_charge_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The refusals the ledger may answer a reserve with, which the gateway passes on. The
/// ledger verifies the credential again, so a token that expired between the gateway's
/// check and the ledger's, or a credential only the ledger can judge, is refused there too.
fn is_ledger_refusal(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::InvalidCredential
            | ErrorCode::TokenExpired
            | ErrorCode::InvalidPreimage
            | ErrorCode::InvalidPayment
            | ErrorCode::PaymentAlreadyUsed
            | ErrorCode::TokenRevoked
            | ErrorCode::WrongService
            | ErrorCode::IdempotencyKeyExhausted
            | ErrorCode::TokenLimitExceeded
            | ErrorCode::InsufficientBalance
            | ErrorCode::DailyLimitExceeded
            | ErrorCode::IdempotencyKeyMismatch
            | ErrorCode::IdempotencyKeyInUse
    )
}

/// Refusals about an Idempotency-Key rather than the token: they say nothing of what else
/// the token may pay for.
pub fn is_about_the_key(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::IdempotencyKeyExhausted
            | ErrorCode::IdempotencyKeyMismatch
            | ErrorCode::IdempotencyKeyInUse
    )
}
