//! The JSON error body every paystile component answers with, and its machine codes.
//!
//! The gateway's answers to clients (the status table in DESIGN.md) and the ledger's API
//! errors share this one shape: `{"error": "<message>", "code": "<code>", ...details}`.

use serde::{Deserialize, Serialize};

use crate::money::Usdc;

/// Machine-readable error codes. Each has one HTTP status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    // Answers the gateway gives to clients.
    PaymentRequired,
    InvalidCredential,
    TokenExpired,
    WrongService,
    TokenRevoked,
    TokenLimitExceeded,
    InsufficientBalance,
    DailyLimitExceeded,
    InvalidPreimage,
    /// An x402 payment that does not pay for the call (answered as x402 does: 402).
    InvalidPayment,
    /// An x402 payment that already paid for a call.
    PaymentAlreadyUsed,
    InvalidIdempotencyKey,
    IdempotencyKeyMismatch,
    IdempotencyKeyInUse,
    IdempotencyKeyExhausted,
    LedgerUnavailable,
    // Answers of the ledger's own API.
    BadRequest,
    Unauthorized,
    /// A valid key that may not do this (a buyer key on an admin endpoint).
    Forbidden,
    NotFound,
    MethodNotAllowed,
    Internal,
}

impl ErrorCode {
    pub const fn status(self) -> u16 {
        match self {
            ErrorCode::BadRequest | ErrorCode::InvalidIdempotencyKey => 400,
            ErrorCode::InvalidCredential
            | ErrorCode::TokenExpired
            | ErrorCode::InvalidPreimage
            | ErrorCode::Unauthorized => 401,
            ErrorCode::PaymentRequired
            | ErrorCode::TokenLimitExceeded
            | ErrorCode::InsufficientBalance
            | ErrorCode::DailyLimitExceeded
            | ErrorCode::InvalidPayment
            | ErrorCode::PaymentAlreadyUsed => 402,
            ErrorCode::WrongService | ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::IdempotencyKeyInUse => 409,
            ErrorCode::TokenRevoked
            | ErrorCode::IdempotencyKeyMismatch
            | ErrorCode::IdempotencyKeyExhausted => 422,
            ErrorCode::Internal => 500,
            ErrorCode::LedgerUnavailable => 503,
        }
    }

    /// The message used when there is nothing more specific to say.
    pub const fn default_message(self) -> &'static str {
        match self {
            ErrorCode::PaymentRequired => "Payment required",
            ErrorCode::InvalidCredential => "Invalid credential",
            ErrorCode::TokenExpired => "Token expired",
            ErrorCode::WrongService => "Token is not valid for this service",
            ErrorCode::TokenRevoked => "Token has been revoked",
            ErrorCode::TokenLimitExceeded => "Token limit exceeded",
            ErrorCode::InsufficientBalance => "Insufficient balance",
            ErrorCode::DailyLimitExceeded => "Daily limit exceeded",
            ErrorCode::InvalidPreimage => "Invalid preimage",
            ErrorCode::InvalidPayment => "Invalid payment",
            ErrorCode::PaymentAlreadyUsed => {
                "This payment already paid for a call, or pays for one in flight: sign a new one"
            }
            ErrorCode::InvalidIdempotencyKey => {
                "Idempotency-Key must be 1 to 255 printable ASCII characters"
            }
            ErrorCode::IdempotencyKeyMismatch => {
                "Idempotency-Key was already used for a different request"
            }
            ErrorCode::IdempotencyKeyInUse => {
                "A request with this Idempotency-Key is still in progress"
            }
            ErrorCode::IdempotencyKeyExhausted => {
                "Idempotency-Key was replayed as often as allowed; use a new key for a new call"
            }
            ErrorCode::LedgerUnavailable => "Payment ledger unavailable, retry shortly",
            ErrorCode::BadRequest => "Bad request",
            ErrorCode::Unauthorized => "Missing or invalid API key",
            ErrorCode::Forbidden => "This key may not do that",
            ErrorCode::NotFound => "Not found",
            ErrorCode::MethodNotAllowed => "Method not allowed",
            ErrorCode::Internal => "Internal error",
        }
    }
}

/// `{"error": "...", "code": "...", ...}`; the optional details are omitted when unset.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    pub error: String,
    pub code: ErrorCode,
    /// The price of the call that was refused or challenged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<Usdc>,
    /// What the token has spent (committed charges).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used: Option<Usdc>,
    /// What the token has on hold for calls in flight; counts against the limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved: Option<Usdc>,
    /// The token's cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<Usdc>,
    /// The service whose route answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_id: Option<String>,
    /// The credential schemes a challenge accepts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schemes: Vec<String>,
    /// True when the L402 challenge's invoice comes from the ledger's sandbox backend.
    #[serde(default, skip_serializing_if = "core::ops::Not::not")]
    pub sandbox: bool,
    /// x402 v1, for clients that read the 402's body: the version of `accepts` (1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x402_version: Option<u32>,
    /// x402 v1: the payments that would pay for the call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accepts: Vec<crate::x402::RequirementsV1>,
}

impl ErrorBody {
    pub fn new(code: ErrorCode) -> ErrorBody {
        ErrorBody::with_message(code, code.default_message())
    }

    pub fn with_message(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
        ErrorBody {
            error: message.into(),
            code,
            price: None,
            used: None,
            reserved: None,
            limit: None,
            service_id: None,
            schemes: Vec::new(),
            sandbox: false,
            x402_version: None,
            accepts: Vec::new(),
        }
    }

    /// The 402 challenge body for a priced route called without a credential.
    pub fn payment_required(service_id: &str, price: Usdc, schemes: &[&str]) -> ErrorBody {
        ErrorBody {
            price: Some(price),
            service_id: Some(service_id.to_owned()),
            schemes: schemes.iter().map(|s| (*s).to_owned()).collect(),
            ..ErrorBody::new(ErrorCode::PaymentRequired)
        }
    }

    /// The 402 for a call whose price does not fit in what is left of the token's cap.
    pub fn token_limit_exceeded(used: Usdc, reserved: Usdc, limit: Usdc, price: Usdc) -> ErrorBody {
        ErrorBody {
            price: Some(price),
            used: Some(used),
            reserved: Some(reserved),
            limit: Some(limit),
            ..ErrorBody::with_message(
                ErrorCode::TokenLimitExceeded,
                format!(
                    "Token limit exceeded: limit={limit}, used={used}, reserved={reserved}, requested={price}"
                ),
            )
        }
    }

    pub fn status(&self) -> u16 {
        self.code.status()
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain strings and amounts into a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_have_the_statuses_of_the_contract() {
        let table = [
            (ErrorCode::PaymentRequired, 402, "payment_required"),
            (ErrorCode::InvalidCredential, 401, "invalid_credential"),
            (ErrorCode::TokenExpired, 401, "token_expired"),
            (ErrorCode::WrongService, 403, "wrong_service"),
            (ErrorCode::TokenRevoked, 422, "token_revoked"),
            (ErrorCode::TokenLimitExceeded, 402, "token_limit_exceeded"),
            (ErrorCode::InsufficientBalance, 402, "insufficient_balance"),
            (ErrorCode::DailyLimitExceeded, 402, "daily_limit_exceeded"),
            (ErrorCode::InvalidPreimage, 401, "invalid_preimage"),
            (ErrorCode::InvalidPayment, 402, "invalid_payment"),
            (ErrorCode::PaymentAlreadyUsed, 402, "payment_already_used"),
            (ErrorCode::IdempotencyKeyMismatch, 422, "idempotency_key_mismatch"),
            (ErrorCode::IdempotencyKeyInUse, 409, "idempotency_key_in_use"),
            (ErrorCode::IdempotencyKeyExhausted, 422, "idempotency_key_exhausted"),
            (ErrorCode::LedgerUnavailable, 503, "ledger_unavailable"),
        ];
        for (code, status, name) in table {
            assert_eq!(code.status(), status, "{name}");
            assert_eq!(serde_json::to_string(&code).unwrap(), format!("\"{name}\""));
        }
    }

    #[test]
    fn limit_body_carries_six_decimal_amounts() {
        let u = |s: &str| s.parse::<Usdc>().unwrap();
        let body = ErrorBody::token_limit_exceeded(u("0.009"), u("0.001"), u("0.01"), u("0.001"));
        let json: serde_json::Value = serde_json::from_slice(&body.to_json()).unwrap();
        assert_eq!(json["code"], "token_limit_exceeded");
        assert_eq!(json["used"], "0.009000");
        assert_eq!(json["reserved"], "0.001000");
        assert_eq!(json["limit"], "0.010000");
        assert_eq!(json["price"], "0.001000");
        assert_eq!(
            json["error"],
            "Token limit exceeded: limit=0.010000, used=0.009000, reserved=0.001000, requested=0.001000"
        );
        assert_eq!(serde_json::from_value::<ErrorBody>(json).unwrap(), body);
    }

    #[test]
    fn unset_details_are_left_out() {
        let json = String::from_utf8(ErrorBody::new(ErrorCode::TokenExpired).to_json()).unwrap();
        assert_eq!(json, r#"{"error":"Token expired","code":"token_expired"}"#);
    }
}
