//! JSON Web Signature in compact serialization (RFC 7515), for the algorithms paystile's keys
//! use: HS256 (RFC 7518 §3.2).
//!
//! The algorithm belongs to the key. A token's `alg` header must name its key's algorithm and
//! never chooses one, so `none` and every mismatch are refused. The MAC is computed over the
//! exact base64url segments as received (never a re-serialization) and compared in constant
//! time.

use core::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The longest compact JWS accepted. Pay Tokens are a few hundred bytes.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Algorithm {
    Hs256,
}

impl Algorithm {
    const fn name(self) -> &'static str {
        match self {
            Algorithm::Hs256 => "HS256",
        }
    }
}

/// A signing and verification key, with the one algorithm it may be used with.
#[derive(Clone)]
pub struct Key {
    kid: Option<String>,
    algorithm: Algorithm,
    secret: Vec<u8>,
}

impl Key {
    /// An HS256 key. HMAC accepts any key length; RFC 7518 asks for at least 32 bytes.
    pub fn hs256(secret: impl Into<Vec<u8>>) -> Key {
        Key { kid: None, algorithm: Algorithm::Hs256, secret: secret.into() }
    }

    /// Names the key; tokens that carry this `kid` are verified with it alone.
    pub fn with_kid(mut self, kid: impl Into<String>) -> Key {
        self.kid = Some(kid.into());
        self
    }

    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    fn mac(&self, signing_input: &[u8]) -> HmacSha256 {
        // HMAC is defined for keys of every length, so this constructor cannot fail; the
        // fallback keeps the signature of this function total without a panic path.
        let mut mac = HmacSha256::new_from_slice(&self.secret)
            .unwrap_or_else(|_| HmacSha256::new(&Default::default()));
        mac.update(signing_input);
        mac
    }
}

impl fmt::Debug for Key {
    /// Never prints the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

/// Why a compact JWS was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JwsError {
    /// Not three canonical base64url segments, or a header that is not a JSON object with `alg`.
    Malformed,
    /// The header names critical extensions (`crit`), none of which we implement.
    UnsupportedCritical,
    /// A `kid` that no configured key has.
    UnknownKey,
    /// An `alg` that is not the algorithm of the key(s) it would be verified with.
    AlgorithmNotAllowed,
    BadSignature,
}

impl fmt::Display for JwsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JwsError::Malformed => "malformed JWS",
            JwsError::UnsupportedCritical => "JWS header has unsupported critical extensions",
            JwsError::UnknownKey => "unknown key id",
            JwsError::AlgorithmNotAllowed => "algorithm not allowed for this key",
            JwsError::BadSignature => "bad signature",
        })
    }
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
    #[serde(default, skip_serializing, deserialize_with = "present")]
    crit: bool,
}

/// Whether a header parameter is there, whatever its value: `"crit": null` is a `crit` too
/// (RFC 7515 §4.1.11 allows only a list of names, which we would not understand either).
fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    serde::de::IgnoredAny::deserialize(deserializer).map(|_| true)
}

/// Signs `payload` with `key`: `base64url(header).base64url(payload).base64url(mac)`.
pub fn sign(payload: &[u8], key: &Key) -> String {
    let header = Header {
        alg: key.algorithm.name().to_owned(),
        kid: key.kid.clone(),
        typ: Some("JWT".to_owned()),
        crit: false,
    };
    // A struct of strings always serializes.
    let header = serde_json::to_vec(&header).unwrap_or_default();
    let mut token = URL_SAFE_NO_PAD.encode(header);
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(payload, &mut token);
    let tag = key.mac(token.as_bytes()).finalize().into_bytes();
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(tag, &mut token);
    token
}

/// Verifies a compact JWS against the configured keys and returns its payload bytes.
///
/// A token with a `kid` is verified with that key only. A token without one is tried against
/// every key (rotation without key ids). The payload is decoded only once the MAC is good.
pub fn verify(token: &str, keys: &[Key]) -> Result<Vec<u8>, JwsError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwsError::Malformed);
    }
    let (signing_input, signature) = token.rsplit_once('.').ok_or(JwsError::Malformed)?;
    let (header, payload) = signing_input.split_once('.').ok_or(JwsError::Malformed)?;
    if payload.contains('.') {
        return Err(JwsError::Malformed);
    }
    let header = decode_segment(header)?;
    let header: Header = serde_json::from_slice(&header).map_err(|_| JwsError::Malformed)?;
    if header.crit {
        return Err(JwsError::UnsupportedCritical);
    }
    let signature = decode_segment(signature)?;

    let mut candidates =
        keys.iter().filter(|key| header.kid.is_none() || key.kid == header.kid).peekable();
    if candidates.peek().is_none() {
        return Err(if keys.is_empty() { JwsError::BadSignature } else { JwsError::UnknownKey });
    }
    let mut algorithm_allowed = false;
    for key in candidates {
        if key.algorithm.name() != header.alg {
            continue;
        }
        algorithm_allowed = true;
        // `verify_slice` compares in constant time.
        if key.mac(signing_input.as_bytes()).verify_slice(&signature).is_ok() {
            return decode_segment(payload);
        }
    }
    Err(if algorithm_allowed { JwsError::BadSignature } else { JwsError::AlgorithmNotAllowed })
}

/// Decodes one segment: unpadded, canonical base64url (RFC 7515 §2), nothing else.
fn decode_segment(segment: &str) -> Result<Vec<u8>, JwsError> {
    URL_SAFE_NO_PAD.decode(segment).map_err(|_| JwsError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7515 Appendix A.1, from `../shared/vectors/jws-rfc7515-a1.json`.
    const RFC_KEY: &str =
        "AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow";
    const RFC_JWS: &str = "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ.dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";

    fn rfc_key() -> Key {
        Key::hs256(URL_SAFE_NO_PAD.decode(RFC_KEY).unwrap())
    }

    #[test]
    fn verifies_the_rfc_7515_a1_vector_over_its_exact_segments() {
        let payload = verify(RFC_JWS, &[rfc_key()]).unwrap();
        // The payload keeps its CR LF whitespace: nothing was re-serialized.
        assert_eq!(
            payload,
            b"{\"iss\":\"joe\",\r\n \"exp\":1300819380,\r\n \"http://example.com/is_root\":true}"
        );
    }

    #[test]
    fn refuses_any_change_to_the_vector() {
        let keys = [rfc_key()];
        let (input, sig) = RFC_JWS.rsplit_once('.').unwrap();
        // Flip one signature character: 'X' -> 'Y'.
        let tampered_sig = format!("{input}.{}", sig.replacen('X', "Y", 1));
        assert_eq!(verify(&tampered_sig, &keys), Err(JwsError::BadSignature));
        // A payload re-encoded without its whitespace has the same JSON but another MAC.
        let (header, _) = input.split_once('.').unwrap();
        let compact = URL_SAFE_NO_PAD
            .encode(br#"{"iss":"joe","exp":1300819380,"http://example.com/is_root":true}"#);
        assert_eq!(
            verify(&format!("{header}.{compact}.{sig}"), &keys),
            Err(JwsError::BadSignature)
        );
        assert_eq!(
            verify(RFC_JWS, &[Key::hs256(b"another key".to_vec())]),
            Err(JwsError::BadSignature)
        );
    }

    #[test]
    fn signs_what_it_verifies() {
        let key = Key::hs256(b"0123456789abcdef0123456789abcdef".to_vec());
        let token = sign(br#"{"sub":"a"}"#, &key);
        assert_eq!(verify(&token, &[key]).unwrap(), br#"{"sub":"a"}"#);
    }

    fn token_with_header(header: &str, key: &[u8]) -> String {
        let input = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode("{}"));
        let tag = Key::hs256(key.to_vec()).mac(input.as_bytes()).finalize().into_bytes();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(tag))
    }

    #[test]
    fn the_algorithm_comes_from_the_key() {
        let secret = b"0123456789abcdef0123456789abcdef";
        let keys = [Key::hs256(secret.to_vec())];
        // A correct HS256 MAC under a header that claims another algorithm is still refused.
        for alg in ["none", "HS512", "RS256", "hs256", ""] {
            let token = token_with_header(&format!(r#"{{"alg":"{alg}"}}"#), secret);
            assert_eq!(verify(&token, &keys), Err(JwsError::AlgorithmNotAllowed), "alg {alg:?}");
        }
        let unsigned = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
            URL_SAFE_NO_PAD.encode("{}")
        );
        assert_eq!(verify(&unsigned, &keys), Err(JwsError::AlgorithmNotAllowed));
        let no_alg = token_with_header(r#"{"typ":"JWT"}"#, secret);
        assert_eq!(verify(&no_alg, &keys), Err(JwsError::Malformed));
    }

    #[test]
    fn kid_selects_the_key() {
        let old = Key::hs256(b"old-secret-old-secret-old-secret".to_vec()).with_kid("2025");
        let new = Key::hs256(b"new-secret-new-secret-new-secret".to_vec()).with_kid("2026");
        let keys = [old.clone(), new.clone()];
        assert!(verify(&sign(b"{}", &old), &keys).is_ok());
        assert!(verify(&sign(b"{}", &new), &keys).is_ok());
        let unknown = Key::hs256(b"new-secret-new-secret-new-secret".to_vec()).with_kid("1999");
        assert_eq!(verify(&sign(b"{}", &unknown), &keys), Err(JwsError::UnknownKey));
        // Signed with the new secret but naming the old key: the old key alone is tried.
        let crossed = Key::hs256(b"new-secret-new-secret-new-secret".to_vec()).with_kid("2025");
        assert_eq!(verify(&sign(b"{}", &crossed), &keys), Err(JwsError::BadSignature));
        // Without a kid, every key is tried.
        let anonymous = Key::hs256(b"old-secret-old-secret-old-secret".to_vec());
        assert!(verify(&sign(b"{}", &anonymous), &keys).is_ok());
    }

    #[test]
    fn refuses_critical_extensions() {
        let secret = b"0123456789abcdef0123456789abcdef";
        for header in
            [r#"{"alg":"HS256","crit":["exp"],"exp":1}"#, r#"{"alg":"HS256","crit":null}"#]
        {
            let token = token_with_header(header, secret);
            assert_eq!(
                verify(&token, &[Key::hs256(secret.to_vec())]),
                Err(JwsError::UnsupportedCritical),
                "{header}"
            );
        }
    }

    #[test]
    fn refuses_malformed_compact_serializations() {
        let key = Key::hs256(b"0123456789abcdef0123456789abcdef".to_vec());
        let good = sign(b"{}", &key);
        let (input, sig) = good.rsplit_once('.').unwrap();
        let cases = [
            String::new(),
            "a.b".to_owned(),
            "a.b.c.d".to_owned(),
            format!("{good}."),
            format!("{input}.{sig}="), // padding
            format!("{input}.{sig}+"), // not base64url
            format!(" {good}"),
            format!("{}.{}", URL_SAFE_NO_PAD.encode("[1]"), &good[good.find('.').unwrap() + 1..]),
            "x".repeat(MAX_TOKEN_LEN + 1),
        ];
        for case in cases {
            assert!(verify(&case, std::slice::from_ref(&key)).is_err(), "{case:?}");
        }
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let shown = format!("{:?}", Key::hs256(b"hunter2-hunter2".to_vec()).with_kid("k"));
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
