//! JSON Web Keys (RFC 7517) for Ed25519 (RFC 8037: `kty` `OKP`, `crv` `Ed25519`): the shape
//! in which the ledger publishes its Pay Token keys (`GET /.well-known/jwks.json`), keeps its
//! private ones, and a gateway is given the public ones.

use core::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::jws::{Key, SigningKey};

pub const KTY: &str = "OKP";
pub const CRV: &str = "Ed25519";
pub const ALG: &str = "EdDSA";
/// `use`: the key signs (RFC 7517 §4.2).
pub const USE_SIG: &str = "sig";

/// One Ed25519 key: public (`x`), or private too (`d`, the 32-byte seed).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Jwk {
    pub kty: String,
    pub crv: String,
    pub x: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    #[serde(default, rename = "use", skip_serializing_if = "Option::is_none")]
    pub use_: Option<String>,
}

/// A key set (RFC 7517 §5).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

/// Why a JWK is not an Ed25519 key paystile can use; `field` is the member at fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JwkError {
    pub field: &'static str,
    pub problem: &'static str,
}

impl fmt::Display for JwkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

impl std::error::Error for JwkError {}

fn error(field: &'static str, problem: &'static str) -> JwkError {
    JwkError { field, problem }
}

impl Jwk {
    /// The public JWK of `key` (an Ed25519 key), as a key set publishes it.
    pub fn public(key: &Key) -> Option<Jwk> {
        Some(Jwk {
            kty: KTY.into(),
            crv: CRV.into(),
            x: URL_SAFE_NO_PAD.encode(key.ed25519_public()?),
            d: None,
            kid: key.kid().map(str::to_owned),
            alg: Some(ALG.into()),
            use_: Some(USE_SIG.into()),
        })
    }

    /// The private JWK of an Ed25519 key made from `seed`.
    pub fn private(seed: &[u8; 32], kid: &str) -> Jwk {
        let signing = SigningKey::ed25519(seed).with_kid(kid);
        let public = signing.verifying_key().ed25519_public().unwrap_or_default();
        Jwk {
            kty: KTY.into(),
            crv: CRV.into(),
            x: URL_SAFE_NO_PAD.encode(public),
            d: Some(URL_SAFE_NO_PAD.encode(seed)),
            kid: Some(kid.into()),
            alg: Some(ALG.into()),
            use_: Some(USE_SIG.into()),
        }
    }

    /// The key that verifies with this JWK's public part.
    pub fn verifying_key(&self) -> Result<Key, JwkError> {
        self.check_kind()?;
        let x = decode32(&self.x).ok_or(error("x", "must be 32 bytes of base64url"))?;
        let key = Key::ed25519(&x).ok_or(error(
            "x",
            "is not a usable Ed25519 public key (not a point, or small order)",
        ))?;
        Ok(match &self.kid {
            Some(kid) => key.with_kid(kid),
            None => key,
        })
    }

    /// The key that signs with this JWK's private part (`d`), which must match its `x`.
    pub fn signing_key(&self) -> Result<SigningKey, JwkError> {
        let public = self.verifying_key()?;
        let d = self.d.as_deref().ok_or(error("d", "missing: not a private key"))?;
        let seed = decode32(d).ok_or(error("d", "must be 32 bytes of base64url"))?;
        let key = SigningKey::ed25519(&seed);
        if key.verifying_key().ed25519_public() != public.ed25519_public() {
            return Err(error("d", "is not the private key of x"));
        }
        Ok(match &self.kid {
            Some(kid) => key.with_kid(kid),
            None => key,
        })
    }

    fn check_kind(&self) -> Result<(), JwkError> {
        if self.kty != KTY {
            return Err(error("kty", "must be \"OKP\""));
        }
        if self.crv != CRV {
            return Err(error("crv", "must be \"Ed25519\""));
        }
        if self.alg.as_deref().is_some_and(|alg| alg != ALG) {
            return Err(error("alg", "must be \"EdDSA\" for an Ed25519 key"));
        }
        if self.use_.as_deref().is_some_and(|use_| use_ != USE_SIG) {
            return Err(error("use", "must be \"sig\""));
        }
        Ok(())
    }
}

impl fmt::Debug for Jwk {
    /// Never prints `d`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Jwk")
            .field("kid", &self.kid)
            .field("x", &self.x)
            .field("private", &self.d.is_some())
            .finish_non_exhaustive()
    }
}

/// Canonical unpadded base64url of exactly 32 bytes.
fn decode32(text: &str) -> Option<[u8; 32]> {
    URL_SAFE_NO_PAD.decode(text).ok()?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jws;

    /// RFC 8037 Appendix A.1 and A.2.
    const RFC_PRIVATE: &str = r#"{"kty":"OKP","crv":"Ed25519",
        "d":"nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A",
        "x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}"#;

    #[test]
    fn reads_the_rfc_8037_key_and_signs_what_its_public_part_verifies() {
        let jwk: Jwk = serde_json::from_str(RFC_PRIVATE).unwrap();
        let signing = jwk.signing_key().unwrap();
        let public = Jwk::public(&signing.verifying_key()).unwrap();
        assert_eq!(public.x, jwk.x);
        assert_eq!(public.d, None, "a published key carries no private part");
        let token = jws::sign(b"{}", &signing);
        assert!(jws::verify(&token, &[public.verifying_key().unwrap()]).is_ok());
    }

    #[test]
    fn a_generated_private_jwk_round_trips_with_its_kid() {
        let jwk = Jwk::private(&[9; 32], "2026-12");
        let text = serde_json::to_string(&jwk).unwrap();
        let read: Jwk = serde_json::from_str(&text).unwrap();
        let signing = read.signing_key().unwrap();
        assert_eq!(signing.kid(), Some("2026-12"));
        let public = Jwk::public(&signing.verifying_key()).unwrap();
        assert_eq!(
            serde_json::to_value(&public).unwrap(),
            serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": jwk.x, "kid": "2026-12",
                "alg": "EdDSA", "use": "sig"})
        );
    }

    #[test]
    fn refusals_name_the_member() {
        let jwk = |change: &dyn Fn(&mut serde_json::Value)| {
            let mut value: serde_json::Value = serde_json::from_str(RFC_PRIVATE).unwrap();
            change(&mut value);
            serde_json::from_value::<Jwk>(value).unwrap()
        };
        let cases: [(Jwk, &str); 7] = [
            (jwk(&|v| v["kty"] = "RSA".into()), "kty"),
            (jwk(&|v| v["crv"] = "X25519".into()), "crv"),
            (jwk(&|v| v["alg"] = "HS256".into()), "alg"),
            (jwk(&|v| v["use"] = "enc".into()), "use"),
            (jwk(&|v| v["x"] = "AAAA".into()), "x"),
            (jwk(&|v| v["d"] = "AAAA".into()), "d"),
            (jwk(&|v| v["d"] = URL_SAFE_NO_PAD.encode([1; 32]).into()), "d"),
        ];
        for (jwk, field) in cases {
            assert_eq!(jwk.signing_key().unwrap_err().field, field, "{jwk:?}");
        }
        let public = jwk(&|v| {
            v.as_object_mut().unwrap().remove("d");
        });
        assert!(public.verifying_key().is_ok());
        assert_eq!(public.signing_key().unwrap_err().field, "d");
        assert!(
            serde_json::from_str::<Jwk>(r#"{"kty":"OKP","crv":"Ed25519","x":"","n":"1"}"#).is_err()
        );
    }

    #[test]
    fn debug_never_shows_the_private_part() {
        let jwk: Jwk = serde_json::from_str(RFC_PRIVATE).unwrap();
        assert!(!format!("{jwk:?}").contains("nWGxne"));
    }
}
