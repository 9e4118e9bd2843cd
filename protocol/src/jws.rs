//! JSON Web Signature in compact serialization (RFC 7515), for the algorithms paystile's keys
//! use: HS256 (RFC 7518 §3.2), a shared secret that both signs and verifies, and EdDSA with
//! Ed25519 (RFC 8037), whose public key only verifies: a gateway that holds it cannot mint.
//!
//! The algorithm belongs to the key. A token's `alg` header must name its key's algorithm and
//! never chooses one, so `none` and every mismatch are refused. The signature is checked over
//! the exact base64url segments as received (never a re-serialization); MACs are compared in
//! constant time, and Ed25519 signatures are checked strictly (RFC 8032 §5.1.7 with canonical
//! encodings and no small-order keys), so that no second encoding of one signature verifies.

use core::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signer as _, VerifyingKey};
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The longest compact JWS accepted. Pay Tokens are a few hundred bytes.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Algorithm {
    Hs256,
    EdDsa,
}

impl Algorithm {
    const fn name(self) -> &'static str {
        match self {
            Algorithm::Hs256 => "HS256",
            Algorithm::EdDsa => "EdDSA",
        }
    }
}

/// What a [`Key`] verifies with.
#[derive(Clone)]
enum Verifier {
    Hs256(Vec<u8>),
    Ed25519(VerifyingKey),
}

/// A verification key, with the one algorithm it may be used with.
#[derive(Clone)]
pub struct Key {
    kid: Option<String>,
    verifier: Verifier,
}

impl Key {
    /// An HS256 key. HMAC accepts any key length; RFC 7518 asks for at least 32 bytes.
    pub fn hs256(secret: impl Into<Vec<u8>>) -> Key {
        Key { kid: None, verifier: Verifier::Hs256(secret.into()) }
    }

    /// An Ed25519 public key (RFC 8037 `x`), if the 32 bytes encode a curve point.
    pub fn ed25519(public: &[u8; 32]) -> Option<Key> {
        let key = VerifyingKey::from_bytes(public).ok()?;
        // A small-order key verifies signatures that anyone can make.
        (!key.is_weak()).then_some(Key { kid: None, verifier: Verifier::Ed25519(key) })
    }

    /// Names the key; tokens that carry this `kid` are verified with it alone.
    pub fn with_kid(mut self, kid: impl Into<String>) -> Key {
        self.kid = Some(kid.into());
        self
    }

    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// The Ed25519 public key's 32 bytes (RFC 8037 `x`); `None` for a shared secret.
    pub fn ed25519_public(&self) -> Option<[u8; 32]> {
        match &self.verifier {
            Verifier::Ed25519(key) => Some(key.to_bytes()),
            Verifier::Hs256(_) => None,
        }
    }

    fn algorithm(&self) -> Algorithm {
        match self.verifier {
            Verifier::Hs256(_) => Algorithm::Hs256,
            Verifier::Ed25519(_) => Algorithm::EdDsa,
        }
    }

    /// Whether `signature` signs `signing_input` under this key.
    fn verifies(&self, signing_input: &[u8], signature: &[u8]) -> bool {
        match &self.verifier {
            // `verify_slice` compares in constant time.
            Verifier::Hs256(secret) => mac(secret, signing_input).verify_slice(signature).is_ok(),
            Verifier::Ed25519(key) => ed25519_dalek::Signature::from_slice(signature)
                .is_ok_and(|signature| key.verify_strict(signing_input, &signature).is_ok()),
        }
    }
}

impl fmt::Debug for Key {
    /// Never prints a secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm())
            .finish_non_exhaustive()
    }
}

/// What a [`SigningKey`] signs with.
#[derive(Clone)]
enum Signer {
    Hs256(Vec<u8>),
    Ed25519(Box<ed25519_dalek::SigningKey>),
}

/// A key that signs: an HS256 secret, or an Ed25519 private key.
#[derive(Clone)]
pub struct SigningKey {
    kid: Option<String>,
    signer: Signer,
}

impl SigningKey {
    pub fn hs256(secret: impl Into<Vec<u8>>) -> SigningKey {
        SigningKey { kid: None, signer: Signer::Hs256(secret.into()) }
    }

    /// An Ed25519 private key from its 32-byte seed (RFC 8037 `d`).
    pub fn ed25519(seed: &[u8; 32]) -> SigningKey {
        let key = ed25519_dalek::SigningKey::from_bytes(seed);
        SigningKey { kid: None, signer: Signer::Ed25519(Box::new(key)) }
    }

    /// Names the key: its tokens carry this `kid`.
    pub fn with_kid(mut self, kid: impl Into<String>) -> SigningKey {
        self.kid = Some(kid.into());
        self
    }

    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// The key that verifies what this one signs.
    pub fn verifying_key(&self) -> Key {
        let verifier = match &self.signer {
            Signer::Hs256(secret) => Verifier::Hs256(secret.clone()),
            Signer::Ed25519(key) => Verifier::Ed25519(key.verifying_key()),
        };
        Key { kid: self.kid.clone(), verifier }
    }

    fn algorithm(&self) -> Algorithm {
        match self.signer {
            Signer::Hs256(_) => Algorithm::Hs256,
            Signer::Ed25519(_) => Algorithm::EdDsa,
        }
    }

    fn sign(&self, signing_input: &[u8]) -> Vec<u8> {
        match &self.signer {
            Signer::Hs256(secret) => mac(secret, signing_input).finalize().into_bytes().to_vec(),
            Signer::Ed25519(key) => key.sign(signing_input).to_bytes().to_vec(),
        }
    }
}

impl fmt::Debug for SigningKey {
    /// Never prints the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm())
            .finish_non_exhaustive()
    }
}

fn mac(secret: &[u8], signing_input: &[u8]) -> HmacSha256 {
    // HMAC is defined for keys of every length, so this constructor cannot fail; the
    // fallback keeps the signature of this function total without a panic path.
    let mut mac =
        HmacSha256::new_from_slice(secret).unwrap_or_else(|_| HmacSha256::new(&Default::default()));
    mac.update(signing_input);
    mac
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

/// Signs `payload` with `key`: `base64url(header).base64url(payload).base64url(signature)`.
pub fn sign(payload: &[u8], key: &SigningKey) -> String {
    let header = Header {
        alg: key.algorithm().name().to_owned(),
        kid: key.kid.clone(),
        typ: Some("JWT".to_owned()),
        crit: false,
    };
    // A struct of strings always serializes.
    let header = serde_json::to_vec(&header).unwrap_or_default();
    let mut token = URL_SAFE_NO_PAD.encode(header);
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(payload, &mut token);
    let signature = key.sign(token.as_bytes());
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(signature, &mut token);
    token
}

/// Verifies a compact JWS against the configured keys and returns its payload bytes.
///
/// A token with a `kid` is verified with that key only. A token without one is tried against
/// every key (rotation without key ids). The payload is decoded only once the signature is
/// good.
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
        if key.algorithm().name() != header.alg {
            continue;
        }
        algorithm_allowed = true;
        if key.verifies(signing_input.as_bytes(), &signature) {
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
        let key = SigningKey::hs256(b"0123456789abcdef0123456789abcdef".to_vec());
        let token = sign(br#"{"sub":"a"}"#, &key);
        assert_eq!(verify(&token, &[key.verifying_key()]).unwrap(), br#"{"sub":"a"}"#);
        let ed = SigningKey::ed25519(&[7; 32]).with_kid("e");
        let token = sign(br#"{"sub":"a"}"#, &ed);
        assert!(token.starts_with(&URL_SAFE_NO_PAD.encode(r#"{"alg":"EdDSA","kid":"e""#)));
        assert_eq!(verify(&token, &[ed.verifying_key()]).unwrap(), br#"{"sub":"a"}"#);
    }

    /// RFC 8037 Appendix A.1 (the key) and A.4 (its signature of the A.4 payload).
    const RFC_8037_D: &str = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A";
    const RFC_8037_X: &str = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";
    const RFC_8037_JWS: &str = "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc.hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg";

    fn bytes32(b64: &str) -> [u8; 32] {
        URL_SAFE_NO_PAD.decode(b64).unwrap().try_into().unwrap()
    }

    #[test]
    fn verifies_and_signs_the_rfc_8037_ed25519_vector() {
        let public = Key::ed25519(&bytes32(RFC_8037_X)).unwrap();
        assert_eq!(
            verify(RFC_8037_JWS, std::slice::from_ref(&public)).unwrap(),
            b"Example of Ed25519 signing"
        );
        let private = SigningKey::ed25519(&bytes32(RFC_8037_D));
        assert_eq!(private.verifying_key().ed25519_public(), Some(bytes32(RFC_8037_X)));
        // Ed25519 is deterministic: the same header and payload sign to the vector itself.
        let (input, signature) = RFC_8037_JWS.rsplit_once('.').unwrap();
        assert_eq!(URL_SAFE_NO_PAD.encode(private.sign(input.as_bytes())), signature);
        // Any other key, or a changed byte, is refused.
        let other = SigningKey::ed25519(&[1; 32]).verifying_key();
        assert_eq!(verify(RFC_8037_JWS, &[other]), Err(JwsError::BadSignature));
        let flipped = format!("{input}.{}", signature.replacen('h', "i", 1));
        assert_eq!(verify(&flipped, &[public]), Err(JwsError::BadSignature));
    }

    #[test]
    fn ed25519_keys_that_verify_anything_are_refused() {
        // The identity point (small order): every "signature" with R = identity, s = 0
        // would verify under it.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert!(Key::ed25519(&identity).is_none());
    }

    #[test]
    fn an_hs256_secret_never_verifies_an_eddsa_token_and_the_reverse() {
        let ed = SigningKey::ed25519(&[7; 32]);
        let hs = SigningKey::hs256(b"0123456789abcdef0123456789abcdef".to_vec());
        let eddsa_token = sign(b"{}", &ed);
        assert_eq!(verify(&eddsa_token, &[hs.verifying_key()]), Err(JwsError::AlgorithmNotAllowed));
        assert_eq!(
            verify(&sign(b"{}", &hs), &[ed.verifying_key()]),
            Err(JwsError::AlgorithmNotAllowed)
        );
        // An EdDSA header over an HMAC of the public key's bytes (the classic confusion
        // attack) is refused by the Ed25519 key.
        let public = ed.verifying_key().ed25519_public().unwrap();
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"EdDSA"}"#),
            URL_SAFE_NO_PAD.encode("{}")
        );
        let tag = mac(&public, input.as_bytes()).finalize().into_bytes();
        let forged = format!("{input}.{}", URL_SAFE_NO_PAD.encode(tag));
        assert_eq!(verify(&forged, &[ed.verifying_key()]), Err(JwsError::BadSignature));
    }

    fn token_with_header(header: &str, key: &[u8]) -> String {
        let input = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode("{}"));
        let tag = mac(key, input.as_bytes()).finalize().into_bytes();
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
        let old = SigningKey::hs256(b"old-secret-old-secret-old-secret".to_vec()).with_kid("2025");
        let new = SigningKey::ed25519(&[2; 32]).with_kid("2026");
        let keys = [old.verifying_key(), new.verifying_key()];
        assert!(verify(&sign(b"{}", &old), &keys).is_ok());
        assert!(verify(&sign(b"{}", &new), &keys).is_ok());
        let unknown = SigningKey::ed25519(&[2; 32]).with_kid("1999");
        assert_eq!(verify(&sign(b"{}", &unknown), &keys), Err(JwsError::UnknownKey));
        // Signed with the new key but naming the old one: the old key alone is tried.
        let crossed =
            SigningKey::hs256(b"new-secret-new-secret-new-secret".to_vec()).with_kid("2025");
        assert_eq!(verify(&sign(b"{}", &crossed), &keys), Err(JwsError::BadSignature));
        // Without a kid, every key is tried.
        let anonymous = SigningKey::ed25519(&[2; 32]);
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
        let signer = SigningKey::hs256(b"0123456789abcdef0123456789abcdef".to_vec());
        let key = signer.verifying_key();
        let good = sign(b"{}", &signer);
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
        let shown = format!("{:?}", SigningKey::hs256(b"hunter2-hunter2".to_vec()));
        assert!(!shown.contains("hunter2"), "{shown}");
        let shown = format!("{:?}", SigningKey::ed25519(&[0x41; 32]));
        assert!(!shown.contains("65, 65") && !shown.contains("4141"), "{shown}");
    }
}
