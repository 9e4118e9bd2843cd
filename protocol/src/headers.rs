//! Header names paystile reads and writes (lower case, as HTTP/2 and proxy-wasm hosts use),
//! and the rules for header values it accepts.

pub const AUTHORIZATION: &str = "authorization";
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
pub const CHARGE_ID: &str = "x-charge-id";
pub const AMOUNT_USDC: &str = "x-amount-usdc";
pub const REMAINING_USDC: &str = "x-remaining-usdc";
pub const WWW_AUTHENTICATE: &str = "www-authenticate";
pub const RETRY_AFTER: &str = "retry-after";
pub const CONTENT_TYPE: &str = "content-type";
pub const CACHE_CONTROL: &str = "cache-control";
/// x402 v2: the 402's offers, the client's payment, the settlement's answer.
pub const PAYMENT_REQUIRED: &str = "payment-required";
pub const PAYMENT_SIGNATURE: &str = "payment-signature";
pub const PAYMENT_RESPONSE: &str = "payment-response";
/// x402 v1: the client's payment and the settlement's answer (v1's offers are the body).
pub const X_PAYMENT: &str = "x-payment";
pub const X_PAYMENT_RESPONSE: &str = "x-payment-response";

pub const APPLICATION_JSON: &str = "application/json";

/// The longest Idempotency-Key accepted (the IETF draft leaves it open; Stripe uses 255).
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// An Idempotency-Key: 1 to 255 printable ASCII characters (space included).
pub fn idempotency_key(value: &[u8]) -> Option<&str> {
    let printable = value.iter().all(|b| (0x20..=0x7e).contains(b));
    if value.is_empty() || value.len() > MAX_IDEMPOTENCY_KEY_LEN || !printable {
        return None;
    }
    core::str::from_utf8(value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_are_bounded_printable_ascii() {
        assert_eq!(idempotency_key(b"order-42"), Some("order-42"));
        assert_eq!(idempotency_key(&[b'k'; 255]).map(str::len), Some(255));
        assert_eq!(idempotency_key(&[b'k'; 256]), None);
        assert_eq!(idempotency_key(b""), None);
        assert_eq!(idempotency_key(b"tab\there"), None);
        assert_eq!(idempotency_key("ключ".as_bytes()), None);
        assert_eq!(idempotency_key(&[0xff, 0xfe]), None);
    }
}
