//! Pay Tokens: JWT spending authorizations with a hard USDC cap, bound to a service.
//!
//! The claims follow LemonCake's Pay Token so that its tokens and tooling fit: `sub` (buyer),
//! `jti` (token id), `serviceId`, `limitUsdc` (decimal string), `scope` (`SINGLE` binds the
//! token to `serviceId`, `ALL` allows any service; absent means `SINGLE`), optional
//! `buyerTag`, and the registered `exp`, `iat`, `nbf`, `iss`, `aud`.

use core::fmt;
use core::ops::Range;

use serde::{Deserialize, Serialize};

use crate::jws::{self, JwsError, Key, SigningKey};
use crate::money::Usdc;

/// The longest token id, buyer id, service id or buyer tag accepted.
pub const MAX_ID_LEN: usize = 255;
/// The latest expiry a credential may have: the end of year 9999, as far as RFC 3339 (and the
/// ledger's journal) goes. A later one is a malformed credential, not a valid one.
pub const MAX_EXPIRY_SECONDS: u64 = 253_402_300_799;

/// Why a string cannot be a token, buyer or service id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdProblem {
    Empty,
    TooLong,
    /// `.` or `..`: ids are path segments of the ledger's admin API (`/v1/tokens/{id}`),
    /// where clients and proxies resolve these away, so such a token could never be shown
    /// or revoked.
    DotSegment,
    /// Ids end up in logs and CSV, and PostgreSQL's text cannot hold NUL at all.
    ControlCharacter,
}

impl fmt::Display for IdProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdProblem::Empty => f.write_str("must not be empty"),
            IdProblem::TooLong => write!(f, "is longer than {MAX_ID_LEN} bytes"),
            IdProblem::DotSegment => f.write_str("must not be `.` or `..`"),
            IdProblem::ControlCharacter => f.write_str("must not contain control characters"),
        }
    }
}

/// The one rule for ids, shared by the filter (claims, configuration) and the ledger.
pub fn check_id(id: &str) -> Result<(), IdProblem> {
    if id.is_empty() {
        Err(IdProblem::Empty)
    } else if id.len() > MAX_ID_LEN {
        Err(IdProblem::TooLong)
    } else if id == "." || id == ".." {
        Err(IdProblem::DotSegment)
    } else if id.chars().any(char::is_control) {
        Err(IdProblem::ControlCharacter)
    } else {
        Ok(())
    }
}

/// The rule for a buyer tag (the buyer's own label): an id's, except that it may be empty or
/// a dot segment, since it is never a path segment.
pub fn check_tag(tag: &str) -> Result<(), IdProblem> {
    match check_id(tag) {
        Err(IdProblem::Empty | IdProblem::DotSegment) => Ok(()),
        checked => checked,
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Scope {
    /// Valid for `serviceId` only.
    #[default]
    Single,
    /// Valid for every service that trusts the key.
    All,
}

/// `aud` is a string or an array of strings (RFC 7519 §4.1.3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn contains(&self, audience: &str) -> bool {
        match self {
            Audience::One(one) => one == audience,
            Audience::Many(many) => many.iter().any(|a| a == audience),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PayTokenClaims {
    /// The buyer.
    pub sub: String,
    /// The token id.
    pub jti: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_id: Option<String>,
    pub limit_usdc: Usdc,
    #[serde(default)]
    pub scope: Scope,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buyer_tag: Option<String>,
    /// Expiry, in seconds since the Unix epoch. Required: every Pay Token ends.
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Audience>,
    /// A sandbox token: its charges go to the ledger's sandbox book, never to the buyer's
    /// balance or daily limit.
    #[serde(default, skip_serializing_if = "core::ops::Not::not")]
    pub sandbox: bool,
}

impl PayTokenClaims {
    /// Whether the token may pay for calls to `service_id`.
    pub fn allows_service(&self, service_id: &str) -> bool {
        match self.scope {
            Scope::All => true,
            Scope::Single => self.service_id.as_deref() == Some(service_id),
        }
    }

    fn check_shape(&self) -> Result<(), PayTokenError> {
        let id_ok = |id: &str| check_id(id).is_ok();
        if !id_ok(&self.sub) || !id_ok(&self.jti) {
            return Err(PayTokenError::InvalidClaims);
        }
        if self.service_id.as_deref().is_some_and(|s| !id_ok(s))
            || self.buyer_tag.as_deref().is_some_and(|t| check_tag(t).is_err())
        {
            return Err(PayTokenError::InvalidClaims);
        }
        if self.scope == Scope::Single && self.service_id.is_none() {
            return Err(PayTokenError::InvalidClaims);
        }
        if self.exp > MAX_EXPIRY_SECONDS {
            return Err(PayTokenError::InvalidClaims);
        }
        Ok(())
    }
}

/// What a verifier checks beyond the signature.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Validation {
    /// When set, `iss` must equal it.
    pub issuer: Option<String>,
    /// When set, `aud` must contain it.
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    pub leeway_seconds: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayTokenError {
    Jws(JwsError),
    /// The payload is not a Pay Token: missing or mistyped claims, bad amounts, bad ids.
    InvalidClaims,
    Expired,
    NotYetValid,
    WrongIssuer,
    WrongAudience,
}

impl fmt::Display for PayTokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PayTokenError::Jws(e) => e.fmt(f),
            PayTokenError::InvalidClaims => f.write_str("invalid Pay Token claims"),
            PayTokenError::Expired => f.write_str("token expired"),
            PayTokenError::NotYetValid => f.write_str("token not yet valid"),
            PayTokenError::WrongIssuer => f.write_str("wrong issuer"),
            PayTokenError::WrongAudience => f.write_str("wrong audience"),
        }
    }
}

impl PayTokenClaims {
    /// The Unix seconds in which the token is valid: from `nbf` (if any) to `exp`, the end
    /// excluded, each widened by `validation`'s leeway.
    pub fn valid_during(&self, validation: &Validation) -> Range<u64> {
        let start = self.nbf.map_or(0, |nbf| nbf.saturating_sub(validation.leeway_seconds));
        start..self.exp.saturating_add(validation.leeway_seconds)
    }
}

/// Verifies a Pay Token at `now` (Unix seconds): signature, claims, time window, issuer and
/// audience. Whether it may pay for a given service is `allows_service`'s question.
pub fn verify(
    token: &str,
    keys: &[Key],
    validation: &Validation,
    now: u64,
) -> Result<PayTokenClaims, PayTokenError> {
    let payload = jws::verify(token, keys).map_err(PayTokenError::Jws)?;
    let claims: PayTokenClaims =
        serde_json::from_slice(&payload).map_err(|_| PayTokenError::InvalidClaims)?;
    claims.check_shape()?;
    let valid = claims.valid_during(validation);
    if now >= valid.end {
        return Err(PayTokenError::Expired);
    }
    if now < valid.start {
        return Err(PayTokenError::NotYetValid);
    }
    if validation.issuer.as_ref().is_some_and(|issuer| claims.iss.as_ref() != Some(issuer)) {
        return Err(PayTokenError::WrongIssuer);
    }
    let audience_ok = |wanted: &String| claims.aud.as_ref().is_some_and(|aud| aud.contains(wanted));
    if validation.audience.as_ref().is_some_and(|wanted| !audience_ok(wanted)) {
        return Err(PayTokenError::WrongAudience);
    }
    Ok(claims)
}

/// Signs `claims` into a compact JWT with `key`.
pub fn sign(claims: &PayTokenClaims, key: &SigningKey) -> String {
    // Claims are strings, integers and amounts: they always serialize.
    jws::sign(&serde_json::to_vec(claims).unwrap_or_default(), key)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn key() -> SigningKey {
        SigningKey::hs256(b"paystile-test-secret-0123456789ab".to_vec())
    }

    fn claims() -> PayTokenClaims {
        PayTokenClaims {
            sub: "buyer_1".into(),
            jti: "tok_1".into(),
            service_id: Some("weather".into()),
            limit_usdc: "5".parse().unwrap(),
            scope: Scope::Single,
            buyer_tag: None,
            exp: NOW + 3600,
            iat: Some(NOW),
            nbf: None,
            iss: Some("paystile".into()),
            aud: None,
            sandbox: false,
        }
    }

    fn check(
        claims: &PayTokenClaims,
        validation: &Validation,
    ) -> Result<PayTokenClaims, PayTokenError> {
        verify(&sign(claims, &key()), &[key().verifying_key()], validation, NOW)
    }

    #[test]
    fn round_trips_claims() {
        assert_eq!(check(&claims(), &Validation::default()), Ok(claims()));
    }

    #[test]
    fn uses_lemoncake_claim_names() {
        let token = sign(&claims(), &key());
        let payload = jws::verify(&token, &[key().verifying_key()]).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(json["serviceId"], "weather");
        assert_eq!(json["limitUsdc"], "5.000000");
        assert_eq!(json["scope"], "SINGLE");
        assert_eq!(json["sub"], "buyer_1");
        assert_eq!(json["jti"], "tok_1");
        assert!(json.get("sandbox").is_none(), "real tokens carry no sandbox claim");
        let sandbox = PayTokenClaims { sandbox: true, ..claims() };
        assert_eq!(check(&sandbox, &Validation::default()), Ok(sandbox));
    }

    #[test]
    fn enforces_the_time_window_with_leeway() {
        let expired = PayTokenClaims { exp: NOW - 10, ..claims() };
        assert_eq!(check(&expired, &Validation::default()), Err(PayTokenError::Expired));
        let lenient = Validation { leeway_seconds: 30, ..Validation::default() };
        assert!(check(&expired, &lenient).is_ok());
        let at_exp = PayTokenClaims { exp: NOW, ..claims() };
        assert_eq!(check(&at_exp, &Validation::default()), Err(PayTokenError::Expired));
        let early = PayTokenClaims { nbf: Some(NOW + 100), ..claims() };
        assert_eq!(check(&early, &Validation::default()), Err(PayTokenError::NotYetValid));
    }

    #[test]
    fn checks_issuer_and_audience_when_configured() {
        let validation = Validation {
            issuer: Some("kyapay".into()),
            audience: Some("kyapay-service".into()),
            leeway_seconds: 0,
        };
        assert_eq!(check(&claims(), &validation), Err(PayTokenError::WrongIssuer));
        let issued = PayTokenClaims { iss: Some("kyapay".into()), ..claims() };
        assert_eq!(check(&issued, &validation), Err(PayTokenError::WrongAudience));
        for aud in [
            Audience::One("kyapay-service".into()),
            Audience::Many(vec!["x".into(), "kyapay-service".into()]),
        ] {
            let full = PayTokenClaims { aud: Some(aud), ..issued.clone() };
            assert!(check(&full, &validation).is_ok());
        }
    }

    #[test]
    fn scope_decides_which_services_a_token_pays_for() {
        assert!(claims().allows_service("weather"));
        assert!(!claims().allows_service("maps"));
        let all = PayTokenClaims { scope: Scope::All, service_id: None, ..claims() };
        assert!(check(&all, &Validation::default()).is_ok());
        assert!(all.allows_service("maps"));
        let unbound = PayTokenClaims { service_id: None, ..claims() };
        assert_eq!(check(&unbound, &Validation::default()), Err(PayTokenError::InvalidClaims));
    }

    #[test]
    fn an_expiry_past_the_year_9999_is_malformed() {
        let last = PayTokenClaims { exp: MAX_EXPIRY_SECONDS, ..claims() };
        assert!(check(&last, &Validation::default()).is_ok());
        let beyond = PayTokenClaims { exp: MAX_EXPIRY_SECONDS + 1, ..claims() };
        assert_eq!(check(&beyond, &Validation::default()), Err(PayTokenError::InvalidClaims));
    }

    #[test]
    fn refuses_payloads_that_are_not_pay_tokens() {
        let payloads = [
            r#"{"sub":"b","jti":"t","serviceId":"s","exp":1900000000}"#, // no limit
            r#"{"sub":"b","jti":"t","serviceId":"s","limitUsdc":"5"}"#,  // no exp
            r#"{"sub":"b","jti":"t","serviceId":"s","limitUsdc":"-5","exp":1900000000}"#,
            r#"{"sub":"b","jti":"t","serviceId":"s","limitUsdc":"0.1234567","exp":1900000000}"#,
            r#"{"sub":"b","jti":"t","serviceId":"s","limitUsdc":0.5,"exp":1900000000}"#,
            r#"{"sub":"b","jti":"t","serviceId":"s","limitUsdc":"5","exp":1.9e9}"#,
            r#"{"sub":"","jti":"t","serviceId":"s","limitUsdc":"5","exp":1900000000}"#,
            r#"{"sub":"b","jti":"..","serviceId":"s","limitUsdc":"5","exp":1900000000}"#,
            r#"{"sub":"b","jti":"t\u0000","serviceId":"s","limitUsdc":"5","exp":1900000000}"#,
            r#"{"sub":"b","jti":"t","serviceId":"s","limitUsdc":"5","exp":1900000000,"scope":"SOME"}"#,
            r#"{"sub":"b","jti":"t","serviceId":"s","limitUsdc":"5","exp":1900000000,"buyerTag":"a\nb"}"#,
            r#"{"sub":"b","sub":"c","jti":"t","serviceId":"s","limitUsdc":"5","exp":1900000000}"#,
            r#"[]"#,
            "not json",
        ];
        for payload in payloads {
            let token = jws::sign(payload.as_bytes(), &key());
            assert_eq!(
                verify(&token, &[key().verifying_key()], &Validation::default(), NOW),
                Err(PayTokenError::InvalidClaims),
                "{payload}"
            );
        }
    }
}
