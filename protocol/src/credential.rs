//! The `Authorization` header: which paystile credential, if any, a request carries, and what
//! it proves. The gateway verifies it inline for each request; the ledger verifies it again
//! before it spends for it, so that a gateway's key alone opens no buyer's money. Both use
//! [`verify`], so every scheme is checked alike in both places.
//!
//! Parsing works on raw bytes because proxy-wasm hosts hand over whatever the client sent,
//! and any bytes must give an answer (never a panic).

use core::fmt;
use core::ops::Range;

use crate::jws::Key;
use crate::l402::{self, Capability, L402Error};
use crate::ledger_api::TokenGrant;
use crate::money::Usdc;
use crate::pay_token::{self, PayTokenError, Scope, Validation};
use crate::x402::{self, X402Error};
use crate::{ErrorBody, ErrorCode};

/// The longest `Authorization` value accepted; real Pay Tokens are well under 2 KiB.
pub const MAX_AUTHORIZATION_LEN: usize = 8 * 1024;

/// A credential paystile understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Credential<'a> {
    /// `Authorization: Bearer <Pay Token>`.
    Bearer(&'a str),
    /// `Authorization: L402 <base64 macaroon>:<hex preimage>` (or the older `LSAT`).
    L402 { macaroon: &'a str, preimage: &'a str },
    /// An x402 payment header's value, as a gateway presents it to the ledger
    /// ([`x402_presented`]): `x402v2 <PAYMENT-SIGNATURE>` or `x402v1 <X-PAYMENT>`.
    /// The payment's bytes are read by [`x402::Payment::decode`], which answers any.
    X402 { version: x402::Version, payment: &'a [u8] },
}

/// How a gateway presents an x402 payment header's value to the ledger, as the credential.
pub fn x402_presented(version: x402::Version, payment: &[u8]) -> String {
    let scheme = match version {
        x402::Version::V1 => "x402v1",
        x402::Version::V2 => "x402v2",
    };
    format!("{scheme} {}", String::from_utf8_lossy(payment))
}

/// An `Authorization` header that names a paystile scheme but cannot be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialError {
    TooLong,
    Empty,
    /// Bytes a token cannot contain (controls, spaces, non-ASCII).
    Malformed,
}

/// Reads an `Authorization` value. `Ok(None)` means "no paystile credential": another
/// scheme (Basic, Digest, ...) that the gateway answers with a payment challenge.
pub fn parse_authorization(value: &[u8]) -> Result<Option<Credential<'_>>, CredentialError> {
    if value.len() > MAX_AUTHORIZATION_LEN {
        return Err(CredentialError::TooLong);
    }
    let value = trim_ascii_whitespace(value);
    let scheme_end = value.iter().position(|b| *b == b' ').unwrap_or(value.len());
    let (scheme, rest) = value.split_at(scheme_end);
    let is_l402 = scheme.eq_ignore_ascii_case(b"l402") || scheme.eq_ignore_ascii_case(b"lsat");
    let x402 = match scheme {
        b"x402v1" => Some(x402::Version::V1),
        b"x402v2" => Some(x402::Version::V2),
        _ => None,
    };
    if !is_l402 && x402.is_none() && !scheme.eq_ignore_ascii_case(b"bearer") {
        return Ok(None);
    }
    let token = trim_ascii_whitespace(rest);
    if let Some(version) = x402 {
        return Ok(Some(Credential::X402 { version, payment: token }));
    }
    if token.is_empty() {
        return Err(CredentialError::Empty);
    }
    // RFC 6750 b64token characters: a JWT and a base64 macaroon use subsets of them.
    let b64token = |b: &u8| b.is_ascii_alphanumeric() || b"-._~+/=".contains(b);
    if !is_l402 {
        return read_token(token, b64token).map(|t| Some(Credential::Bearer(t)));
    }
    let (macaroon, preimage) = match token.iter().rposition(|b| *b == b':') {
        Some(colon) => (&token[..colon], &token[colon + 1..]),
        None => return Err(CredentialError::Malformed),
    };
    if macaroon.is_empty() || preimage.is_empty() {
        return Err(CredentialError::Empty);
    }
    Ok(Some(Credential::L402 {
        macaroon: read_token(macaroon, b64token)?,
        preimage: read_token(preimage, u8::is_ascii_hexdigit)?,
    }))
}

fn read_token(bytes: &[u8], allowed: impl Fn(&u8) -> bool) -> Result<&str, CredentialError> {
    if !bytes.iter().all(allowed) {
        return Err(CredentialError::Malformed);
    }
    core::str::from_utf8(bytes).map_err(|_| CredentialError::Malformed)
}

fn trim_ascii_whitespace(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(bytes.len());
    let end = bytes.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(start, |i| i + 1);
    &bytes[start..end]
}

/// A credential scheme paystile takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// A Pay Token, `Authorization: Bearer <jwt>`.
    PayToken,
    /// `Authorization: L402 <macaroon>:<preimage>`.
    L402,
    /// An x402 payment (`PAYMENT-SIGNATURE` or `X-PAYMENT`): one call's exact price.
    X402,
}

/// How credentials are verified: the schemes taken, with their keys and rules.
#[derive(Clone, Debug, Default)]
pub struct Verifier {
    pub pay_token: Option<PayTokenRules>,
    pub l402: Option<L402Rules>,
    pub x402: Option<X402Rules>,
}

#[derive(Clone, Debug)]
pub struct PayTokenRules {
    pub keys: Vec<Key>,
    pub validation: Validation,
    /// Whether sandbox Pay Tokens (charged to the ledger's sandbox book) are taken.
    pub accept_sandbox: bool,
}

#[derive(Clone)]
pub struct L402Rules {
    /// The secret macaroon root keys derive from.
    pub secret: Vec<u8>,
    /// Whether credentials bought with sandbox invoices are taken.
    pub accept_sandbox: bool,
}

#[derive(Clone, Debug)]
pub struct X402Rules {
    /// What is accepted: the chain, the token and its EIP-712 domain, the payee.
    pub offer: x402::Offer,
    /// Whether the signature is verified here, or left to the ledger (which always does).
    pub signature: x402::Signature,
}

impl fmt::Debug for L402Rules {
    /// Never prints the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("L402Rules").field("accept_sandbox", &self.accept_sandbox).finish()
    }
}

/// What a credential is checked for.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    pub service_id: &'a str,
    pub capability: Capability<'a>,
    /// The call's price: an x402 payment must be of exactly it.
    pub price: Usdc,
    /// Unix seconds.
    pub now: u64,
}

/// A verified credential: the token it pays from, and what else holds for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub token: TokenGrant,
    /// The narrower cap the presented copy states for itself (an attenuated L402), if any:
    /// calls must fit under it as well as under the token's limit.
    pub cap: Option<Usdc>,
    pub scheme: Scheme,
    /// The route capability an L402 was checked for (a Pay Token's checks ignore routes).
    pub capability: Option<String>,
    /// The Unix seconds in which the credential verifies.
    pub valid: Range<u64>,
    /// An x402 payment's terms, for its answer and its settlement.
    pub x402: Option<Box<X402Paid>>,
}

/// An x402 payment, checked: what the ledger settles, and what the answer reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct X402Paid {
    pub payment: x402::Payment,
    pub checked: x402::Checked,
    /// The network paid on, as the payment's version names it.
    pub network: String,
}

/// Why a credential pays for nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No credential of a scheme this verifier takes: the answer is a payment challenge.
    NotOffered,
    /// An `Authorization` of a paystile scheme that cannot be read.
    Unreadable(CredentialError),
    PayToken(PayTokenError),
    /// A sandbox Pay Token where only real payments are taken.
    SandboxToken,
    /// A Pay Token bound to another service.
    WrongService,
    L402(L402Error),
    X402(X402Error),
}

impl Refusal {
    pub fn code(&self) -> ErrorCode {
        match self {
            Refusal::NotOffered => ErrorCode::PaymentRequired,
            Refusal::PayToken(PayTokenError::Expired | PayTokenError::NotYetValid) => {
                ErrorCode::TokenExpired
            }
            Refusal::Unreadable(_) | Refusal::PayToken(_) | Refusal::SandboxToken => {
                ErrorCode::InvalidCredential
            }
            Refusal::WrongService => ErrorCode::WrongService,
            Refusal::L402(error) => match error {
                L402Error::WrongPreimage => ErrorCode::InvalidPreimage,
                L402Error::Expired => ErrorCode::TokenExpired,
                L402Error::WrongService | L402Error::CapabilityNotGranted => {
                    ErrorCode::WrongService
                }
                L402Error::Malformed(_)
                | L402Error::BadIdentifier
                | L402Error::BadPreimageEncoding
                | L402Error::BadSignature(_)
                | L402Error::MissingCaveat(_)
                | L402Error::WideningCaveat(_)
                | L402Error::SandboxCredential => ErrorCode::InvalidCredential,
            },
            // As the x402 spec answers a payment that does not verify: 402, with the offer.
            Refusal::X402(_) => ErrorCode::InvalidPayment,
        }
    }

    /// The error answer (a [`Refusal::NotOffered`] is answered with a challenge instead,
    /// whose body the caller builds).
    pub fn to_body(&self) -> ErrorBody {
        let code = self.code();
        match self {
            Refusal::NotOffered | Refusal::Unreadable(_) | Refusal::WrongService => {
                ErrorBody::new(code)
            }
            Refusal::PayToken(PayTokenError::Expired | PayTokenError::NotYetValid) => {
                ErrorBody::new(code)
            }
            Refusal::PayToken(error) => {
                ErrorBody::with_message(code, format!("Invalid credential: {error}"))
            }
            Refusal::SandboxToken => ErrorBody::with_message(
                code,
                "Invalid credential: a sandbox token, and this gateway takes real payments only",
            ),
            Refusal::L402(error) => {
                ErrorBody::with_message(code, format!("{}: {error}", code.default_message()))
            }
            Refusal::X402(error) => ErrorBody::with_message(
                code,
                format!("{}: {error} ({})", code.default_message(), error.reason()),
            ),
        }
    }
}

/// Verifies the `Authorization` value `authorization` for `target`: what the credential
/// pays from, or why it pays for nothing.
pub fn verify(
    authorization: &[u8],
    verifier: &Verifier,
    target: &Target<'_>,
) -> Result<Verified, Refusal> {
    match parse_authorization(authorization).map_err(Refusal::Unreadable)? {
        None => Err(Refusal::NotOffered),
        Some(Credential::Bearer(token)) => {
            let rules = verifier.pay_token.as_ref().ok_or(Refusal::NotOffered)?;
            verify_pay_token(token, rules, target)
        }
        Some(Credential::L402 { macaroon, preimage }) => {
            let rules = verifier.l402.as_ref().ok_or(Refusal::NotOffered)?;
            verify_l402(macaroon, preimage, rules, target)
        }
        Some(Credential::X402 { version, payment }) => {
            let rules = verifier.x402.as_ref().ok_or(Refusal::NotOffered)?;
            verify_x402(version, payment, rules, target)
        }
    }
}

/// An x402 payment pays once, for one call: it is a token of its own, whose limit is the
/// transfer's value and whose buyer is the payer (`x402::token_id`, `x402::buyer_id`).
fn verify_x402(
    version: x402::Version,
    payment: &[u8],
    rules: &X402Rules,
    target: &Target<'_>,
) -> Result<Verified, Refusal> {
    let payment = x402::Payment::decode(payment, version).map_err(Refusal::X402)?;
    let offers = core::slice::from_ref(&rules.offer);
    let checked = payment
        .check_with(offers, target.price.micros(), target.now, rules.signature)
        .map_err(Refusal::X402)?;
    let valid_before = u64::try_from(payment.authorization.valid_before).unwrap_or(u64::MAX);
    let token = TokenGrant {
        token_id: x402::token_id(&checked.payment_id),
        buyer_id: x402::buyer_id(&checked.payer),
        buyer_tag: None,
        service_id: Some(target.service_id.to_owned()),
        scope: Scope::Single,
        limit_usdc: target.price,
        expires_at: valid_before,
        sandbox: false,
    };
    let network = match version {
        x402::Version::V2 => rules.offer.network(),
        x402::Version::V1 => rules.offer.network_v1(),
    };
    Ok(Verified {
        token,
        cap: None,
        scheme: Scheme::X402,
        capability: None,
        valid: 0..valid_before,
        x402: Some(Box::new(X402Paid { payment, checked, network })),
    })
}

fn verify_pay_token(
    token: &str,
    rules: &PayTokenRules,
    target: &Target<'_>,
) -> Result<Verified, Refusal> {
    let claims = pay_token::verify(token, &rules.keys, &rules.validation, target.now)
        .map_err(Refusal::PayToken)?;
    // Sandbox tokens pay from the sandbox book: a real service only where asked for.
    if claims.sandbox && !rules.accept_sandbox {
        return Err(Refusal::SandboxToken);
    }
    if !claims.allows_service(target.service_id) {
        return Err(Refusal::WrongService);
    }
    Ok(Verified {
        token: TokenGrant::from(&claims),
        cap: None,
        scheme: Scheme::PayToken,
        capability: None,
        valid: claims.valid_during(&rules.validation),
        x402: None,
    })
}

fn verify_l402(
    macaroon: &str,
    preimage: &str,
    rules: &L402Rules,
    target: &Target<'_>,
) -> Result<Verified, Refusal> {
    let l402_target = l402::Target {
        service_id: target.service_id,
        capability: target.capability,
        now: target.now,
        accept_sandbox: rules.accept_sandbox,
    };
    let grant =
        l402::verify(macaroon, preimage, &rules.secret, &l402_target).map_err(Refusal::L402)?;
    let token_id = grant.identifier.ledger_token_id();
    let token = TokenGrant {
        // An L402 holder is anonymous: each token is its own buyer.
        buyer_id: token_id.clone(),
        token_id,
        buyer_tag: None,
        service_id: Some(target.service_id.to_owned()),
        scope: Scope::Single,
        limit_usdc: grant.limit,
        expires_at: grant.expires_at,
        sandbox: grant.sandbox,
    };
    let capability = match target.capability {
        Capability::Route(capability) => capability.map(str::to_owned),
        Capability::Any => None,
    };
    Ok(Verified {
        token,
        cap: (grant.cap < grant.limit).then_some(grant.cap),
        scheme: Scheme::L402,
        capability,
        valid: 0..grant.valid_until.saturating_add(1),
        x402: None,
    })
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    use super::*;
    use crate::jws::SigningKey;
    use crate::l402::{Identifier, Offer};
    use crate::pay_token::PayTokenClaims;

    const NOW: u64 = 1_800_000_000;
    const L402_SECRET: &[u8] = b"an l402 secret of enough length!";
    const PREIMAGE: [u8; 32] = [7; 32];

    fn signer() -> SigningKey {
        SigningKey::ed25519(&[5; 32]).with_kid("2026-12")
    }

    fn verifier() -> Verifier {
        Verifier {
            pay_token: Some(PayTokenRules {
                keys: vec![signer().verifying_key()],
                validation: Validation::default(),
                accept_sandbox: false,
            }),
            l402: Some(L402Rules { secret: L402_SECRET.to_vec(), accept_sandbox: true }),
            x402: Some(X402Rules { offer: anvil_offer(), signature: x402::Signature::Verify }),
        }
    }

    /// What the x402 vector (`testdata/x402-v2-payment.b64`) pays: 1000 units to the
    /// sandbox token on anvil, signed at [`X402_NOW`] for 60 s.
    fn anvil_offer() -> x402::Offer {
        x402::Offer {
            chain_id: 31337,
            asset: "0x5FbDB2315678afecb367f032d93F642f64180aa3".parse().unwrap(),
            name: "USD Coin".into(),
            version: "2".into(),
            pay_to: "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC".parse().unwrap(),
            max_timeout_seconds: 60,
        }
    }

    const X402_V2: &str = include_str!("../testdata/x402-v2-payment.b64");
    const X402_NOW: u64 = 1_796_671_525;

    fn target(capability: Capability<'static>) -> Target<'static> {
        Target { service_id: "weather", capability, price: "0.001".parse().unwrap(), now: NOW }
    }

    fn claims() -> PayTokenClaims {
        PayTokenClaims {
            sub: "agent-7".into(),
            jti: "tok_1".into(),
            service_id: Some("weather".into()),
            limit_usdc: "5".parse().unwrap(),
            scope: Scope::Single,
            buyer_tag: Some("crawler".into()),
            exp: NOW + 60,
            iat: None,
            nbf: None,
            iss: None,
            aud: None,
            sandbox: false,
        }
    }

    fn bearer(claims: &PayTokenClaims, key: &SigningKey) -> String {
        format!("Bearer {}", pay_token::sign(claims, key))
    }

    fn l402(extra_caveats: &[&[u8]], sandbox: bool) -> String {
        let identifier =
            Identifier { payment_hash: Sha256::digest(PREIMAGE).into(), token_id: [3; 32] };
        let offer = Offer {
            service_id: "weather".into(),
            valid_until: NOW + 3_600,
            budget: "0.05".parse().unwrap(),
            capabilities: vec!["read".into()],
            sandbox,
        };
        let mut macaroon = l402::mint(L402_SECRET, &identifier, &offer);
        for caveat in extra_caveats {
            macaroon.add_first_party_caveat(caveat);
        }
        format!("L402 {}:{}", l402::encode_macaroon(&macaroon), hex::encode(PREIMAGE))
    }

    #[test]
    fn a_pay_token_proves_its_claims() {
        let verified =
            verify(bearer(&claims(), &signer()).as_bytes(), &verifier(), &target(Capability::Any))
                .unwrap();
        assert_eq!(verified.token, TokenGrant::from(&claims()));
        assert_eq!((verified.scheme, verified.cap), (Scheme::PayToken, None));
        assert_eq!(verified.valid, 0..NOW + 60);
        // A key outside the set, another service, a sandbox token: refused.
        let stranger = SigningKey::ed25519(&[6; 32]).with_kid("2026-12");
        let refused = |authorization: String| {
            verify(authorization.as_bytes(), &verifier(), &target(Capability::Any)).unwrap_err()
        };
        assert_eq!(refused(bearer(&claims(), &stranger)).code(), ErrorCode::InvalidCredential);
        let maps = PayTokenClaims { service_id: Some("maps".into()), ..claims() };
        assert_eq!(refused(bearer(&maps, &signer())), Refusal::WrongService);
        let sandbox = PayTokenClaims { sandbox: true, ..claims() };
        assert_eq!(refused(bearer(&sandbox, &signer())), Refusal::SandboxToken);
        let expired = PayTokenClaims { exp: NOW - 1, ..claims() };
        assert_eq!(refused(bearer(&expired, &signer())).code(), ErrorCode::TokenExpired);
    }

    #[test]
    fn an_l402_proves_its_budget_and_the_cap_of_its_copy() {
        let verified =
            verify(l402(&[], true).as_bytes(), &verifier(), &target(Capability::Any)).unwrap();
        let token_id = format!("l402_{}", "03".repeat(32));
        assert_eq!(verified.token.token_id, token_id);
        assert_eq!(verified.token.buyer_id, token_id, "each L402 token is its own buyer");
        assert_eq!(verified.token.limit_usdc, "0.05".parse().unwrap());
        assert_eq!(verified.token.expires_at, NOW + 3_600);
        assert_eq!(verified.token.service_id.as_deref(), Some("weather"));
        assert!(verified.token.sandbox, "the ledger meters it in its sandbox book");
        assert_eq!((verified.scheme, verified.cap), (Scheme::L402, None));
        // An attenuated copy states a lower cap.
        let narrowed = l402(&[b"weather_budget_usdc=0.01"], false);
        let verified = verify(narrowed.as_bytes(), &verifier(), &target(Capability::Any)).unwrap();
        assert_eq!(verified.cap, Some("0.01".parse().unwrap()));
        assert!(!verified.token.sandbox);
    }

    #[test]
    fn a_gateway_checks_the_route_and_the_ledger_the_budget_only() {
        let credential = l402(&[], false);
        let check = |capability| verify(credential.as_bytes(), &verifier(), &target(capability));
        assert!(check(Capability::Any).is_ok());
        assert_eq!(
            check(Capability::Route(Some("read"))).unwrap().capability.as_deref(),
            Some("read")
        );
        assert_eq!(
            check(Capability::Route(Some("write"))).unwrap_err().code(),
            ErrorCode::WrongService
        );
    }

    #[test]
    fn what_is_not_offered_asks_for_a_challenge() {
        let pay_tokens_only = Verifier { l402: None, ..verifier() };
        let any = target(Capability::Any);
        for authorization in ["Basic dXNlcg==", ""] {
            assert_eq!(
                verify(authorization.as_bytes(), &pay_tokens_only, &any),
                Err(Refusal::NotOffered)
            );
        }
        assert_eq!(
            verify(l402(&[], false).as_bytes(), &pay_tokens_only, &any),
            Err(Refusal::NotOffered)
        );
        assert_eq!(
            verify(b"Bearer a b", &verifier(), &any).unwrap_err().code(),
            ErrorCode::InvalidCredential
        );
        assert_eq!(Refusal::NotOffered.code(), ErrorCode::PaymentRequired);
    }

    #[test]
    fn an_x402_payment_is_a_one_call_token_of_its_payer() {
        let presented = x402_presented(x402::Version::V2, X402_V2.trim().as_bytes());
        let at = |now, price: &str| Target {
            now,
            price: price.parse().unwrap(),
            ..target(Capability::Route(Some("write")))
        };
        let verified = verify(presented.as_bytes(), &verifier(), &at(X402_NOW, "0.001")).unwrap();
        let paid = verified.x402.as_deref().unwrap();
        assert_eq!(verified.scheme, Scheme::X402);
        assert_eq!(verified.token.token_id, x402::token_id(&paid.checked.payment_id));
        assert!(x402::is_token_id(&verified.token.token_id));
        assert_eq!(verified.token.buyer_id, "x402_0x70997970c51812dc3a010c7d01b50e0d17dc79c8");
        assert_eq!(verified.token.limit_usdc, "0.001".parse().unwrap());
        assert_eq!(verified.token.expires_at, X402_NOW + 60);
        assert_eq!(paid.network, "eip155:31337");
        // Another price, a tampered signature, x402 off: refused as a payment, or not offered.
        let refused = |presented: &str, verifier: &Verifier| {
            verify(presented.as_bytes(), verifier, &at(X402_NOW, "0.002")).unwrap_err()
        };
        let wrong_price = refused(&presented, &verifier());
        assert_eq!(wrong_price, Refusal::X402(X402Error::ValueMismatch));
        assert_eq!(wrong_price.code(), ErrorCode::InvalidPayment);
        assert_eq!(wrong_price.to_body().status(), 402);
        assert!(wrong_price.to_body().error.contains("value_mismatch"));
        let off = Verifier { x402: None, ..verifier() };
        assert_eq!(refused(&presented, &off), Refusal::NotOffered);
        assert_eq!(
            parse_authorization(b"x402v1 e30="),
            Ok(Some(Credential::X402 { version: x402::Version::V1, payment: b"e30=" }))
        );
        // Any payment bytes are the decoder's to refuse, as an invalid payment.
        let unreadable = verify(b"x402v2 \xff", &verifier(), &at(X402_NOW, "0.001"));
        assert_eq!(unreadable.unwrap_err().code(), ErrorCode::InvalidPayment);
        assert_eq!(parse_authorization(b"x402v3 e30="), Ok(None));
    }

    #[test]
    fn reads_bearer_tokens_case_insensitively() {
        assert_eq!(parse_authorization(b"Bearer a.b.c"), Ok(Some(Credential::Bearer("a.b.c"))));
        assert_eq!(parse_authorization(b"bearer   a.b.c  "), Ok(Some(Credential::Bearer("a.b.c"))));
        assert_eq!(parse_authorization(b"BEARER x-_"), Ok(Some(Credential::Bearer("x-_"))));
    }

    #[test]
    fn other_schemes_are_not_ours() {
        assert_eq!(parse_authorization(b"Basic dXNlcjpwYXNz"), Ok(None));
        assert_eq!(parse_authorization(b"Bearerx a.b.c"), Ok(None));
        assert_eq!(parse_authorization(b""), Ok(None));
        assert_eq!(parse_authorization(&[0xff, 0x00, 0x80]), Ok(None));
    }

    #[test]
    fn unreadable_bearer_values_are_errors() {
        assert_eq!(parse_authorization(b"Bearer"), Err(CredentialError::Empty));
        assert_eq!(parse_authorization(b"Bearer    "), Err(CredentialError::Empty));
        assert_eq!(parse_authorization(b"Bearer a b"), Err(CredentialError::Malformed));
        assert_eq!(parse_authorization(b"Bearer a\x00b"), Err(CredentialError::Malformed));
        assert_eq!(parse_authorization(b"Bearer \xc3\xa9"), Err(CredentialError::Malformed));
        let long = [b"Bearer ".as_slice(), &[b'a'; MAX_AUTHORIZATION_LEN]].concat();
        assert_eq!(parse_authorization(&long), Err(CredentialError::TooLong));
    }

    #[test]
    fn reads_l402_and_lsat_credentials() {
        let l402 = |macaroon, preimage| Ok(Some(Credential::L402 { macaroon, preimage }));
        assert_eq!(parse_authorization(b"L402 AgE+/w==:0aF9"), l402("AgE+/w==", "0aF9"));
        assert_eq!(parse_authorization(b"lsat  AgE-_w:00 "), l402("AgE-_w", "00"));
        for bad in [&b"L402 AgE"[..], b"L402 AgE:", b"L402 :00", b"L402 Ag E:00", b"L402 AgE:0g"] {
            assert!(parse_authorization(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(parse_authorization(b"L402"), Err(CredentialError::Empty));
        assert_eq!(parse_authorization(b"L402 \t "), Err(CredentialError::Empty));
    }
}
