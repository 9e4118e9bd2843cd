//! L402 credentials: a macaroon bound to a Lightning payment hash, plus the preimage that
//! proves the invoice was paid. Formats follow Lightning Labs' aperture.
//!
//! - Identifier (`l402/identifier.go`), 66 bytes big-endian: `u16 version (0)`,
//!   `32-byte payment hash`, `32-byte token id`.
//! - Caveats are `condition=value`. aperture's: `services=<name>:<tier>[,…]`,
//!   `<service>_valid_until=<unix seconds>`, `<service>_capabilities=a,b`. paystile adds
//!   `<service>_budget_usdc=<amount>`: what the payment buys. A repeated caveat may only
//!   narrow; caveats this service does not know are ignored, as aperture does.
//! - Root keys: aperture looks them up in a database; an inline filter cannot, so each token's
//!   root key is `HMAC-SHA256(secret, token id)` under a secret the filter and ledger share.
//!   Revocation lives in the ledger.

use core::fmt;

use base64::Engine;
use base64::alphabet;
use base64::engine::general_purpose::STANDARD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

use crate::macaroon::{Macaroon, MacaroonError};
use crate::money::Usdc;
use crate::pay_token;

/// The location paystile writes into the macaroons it mints.
pub const LOCATION: &str = "paystile";
/// Ledger token ids of L402 tokens: this prefix and the identifier's token id in hex.
pub const TOKEN_ID_PREFIX: &str = "l402_";

const IDENTIFIER_VERSION: u16 = 0;
const IDENTIFIER_LEN: usize = 2 + 32 + 32;

pub const SERVICES: &str = "services";
pub const VALID_UNTIL_SUFFIX: &str = "_valid_until";
pub const CAPABILITIES_SUFFIX: &str = "_capabilities";
pub const BUDGET_SUFFIX: &str = "_budget_usdc";
/// `sandbox=true`: the invoice came from a sandbox backend, so nothing was really paid.
pub const SANDBOX: &str = "sandbox";

/// What a macaroon's identifier commits to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identifier {
    pub payment_hash: [u8; 32],
    pub token_id: [u8; 32],
}

impl Identifier {
    pub fn encode(&self) -> [u8; IDENTIFIER_LEN] {
        let mut out = [0; IDENTIFIER_LEN];
        out[..2].copy_from_slice(&IDENTIFIER_VERSION.to_be_bytes());
        out[2..34].copy_from_slice(&self.payment_hash);
        out[34..].copy_from_slice(&self.token_id);
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Identifier> {
        let bytes = <&[u8; IDENTIFIER_LEN]>::try_from(bytes).ok()?;
        if u16::from_be_bytes([bytes[0], bytes[1]]) != IDENTIFIER_VERSION {
            return None;
        }
        let mut id = Identifier { payment_hash: [0; 32], token_id: [0; 32] };
        id.payment_hash.copy_from_slice(&bytes[2..34]);
        id.token_id.copy_from_slice(&bytes[34..]);
        Some(id)
    }

    /// The id the ledger keeps this token's budget under.
    pub fn ledger_token_id(&self) -> String {
        format!("{TOKEN_ID_PREFIX}{}", hex::encode(self.token_id))
    }
}

/// The root key of the macaroon with this token id.
pub fn root_key(secret: &[u8], token_id: &[u8; 32]) -> [u8; 32] {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret).unwrap_or_else(|_| Hmac::new(&Default::default()));
    mac.update(token_id);
    mac.finalize().into_bytes().into()
}

/// What a paid L402 entitles its holder to: the caveats of a freshly minted macaroon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    pub service_id: String,
    /// Unix seconds.
    pub valid_until: u64,
    pub budget: Usdc,
    /// Restricts the token to routes with one of these capabilities; empty: no restriction.
    pub capabilities: Vec<String>,
    /// Marks a credential bought with a sandbox invoice; only gateways that accept sandbox
    /// credentials take it.
    pub sandbox: bool,
}

/// Mints the macaroon for `identifier` with the caveats of `offer`.
pub fn mint(secret: &[u8], identifier: &Identifier, offer: &Offer) -> Macaroon {
    let service = &offer.service_id;
    let mut macaroon = Macaroon::mint(
        &root_key(secret, &identifier.token_id),
        &identifier.encode(),
        LOCATION.as_bytes(),
    );
    let mut caveats = vec![
        format!("{SERVICES}={service}:0"),
        format!("{service}{VALID_UNTIL_SUFFIX}={}", offer.valid_until),
        format!("{service}{BUDGET_SUFFIX}={}", offer.budget),
    ];
    if !offer.capabilities.is_empty() {
        caveats.push(format!("{service}{CAPABILITIES_SUFFIX}={}", offer.capabilities.join(",")));
    }
    if offer.sandbox {
        caveats.push(format!("{SANDBOX}=true"));
    }
    for caveat in caveats {
        macaroon.add_first_party_caveat(caveat.as_bytes());
    }
    macaroon
}

/// A macaroon as the `WWW-Authenticate` challenge carries it: standard base64, padded.
pub fn encode_macaroon(macaroon: &Macaroon) -> String {
    STANDARD.encode(macaroon.to_binary())
}

/// `WWW-Authenticate: L402 macaroon="…", invoice="…"` (macaroon first: clients rely on it).
pub fn challenge(macaroon_b64: &str, invoice: &str) -> String {
    // Sized once: a gateway builds one per 402, each near a kilobyte.
    let parts = ["L402 macaroon=\"", macaroon_b64, "\", invoice=\"", invoice, "\""];
    let mut value = String::with_capacity(parts.iter().map(|p| p.len()).sum());
    parts.iter().for_each(|part| value.push_str(part));
    value
}

/// Reads an L402 (or LSAT) challenge: `(macaroon, invoice)`. Accepts `token=` for
/// `macaroon=`, as the spec allows.
pub fn parse_challenge(value: &str) -> Option<(&str, &str)> {
    let (scheme, params) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("L402") && !scheme.eq_ignore_ascii_case("LSAT") {
        return None;
    }
    let mut macaroon = None;
    let mut invoice = None;
    for param in params.split(',') {
        let (name, quoted) = param.trim().split_once('=')?;
        let value = quoted.strip_prefix('"')?.strip_suffix('"')?;
        match name.trim() {
            "macaroon" | "token" => macaroon = Some(value),
            "invoice" => invoice = Some(value),
            _ => {}
        }
    }
    Some((macaroon?, invoice?))
}

/// Why an L402 credential was refused. Each maps to one status in DESIGN.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L402Error {
    /// Not base64, not a V2 macaroon, or not an L402 identifier.
    Malformed(MacaroonError),
    BadIdentifier,
    /// The preimage is not 32 bytes of hex.
    BadPreimageEncoding,
    /// `sha256(preimage)` is not the identifier's payment hash.
    WrongPreimage,
    BadSignature(MacaroonError),
    /// A required caveat (services, budget) is missing or unreadable.
    MissingCaveat(&'static str),
    /// A repeated caveat that widens what an earlier one allowed.
    WideningCaveat(&'static str),
    /// `services` does not list this service.
    WrongService,
    Expired,
    /// The route's capability is not among those the macaroon grants.
    CapabilityNotGranted,
    /// Bought with a sandbox invoice, at a gateway that takes real payments only.
    SandboxCredential,
}

impl fmt::Display for L402Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            L402Error::Malformed(e) | L402Error::BadSignature(e) => e.fmt(f),
            L402Error::BadIdentifier => f.write_str("not an L402 macaroon identifier"),
            L402Error::BadPreimageEncoding => f.write_str("preimage must be 64 hex digits"),
            L402Error::WrongPreimage => f.write_str("preimage does not match the payment hash"),
            L402Error::MissingCaveat(c) => write!(f, "missing or unreadable {c} caveat"),
            L402Error::WideningCaveat(c) => write!(f, "{c} caveat widens an earlier one"),
            L402Error::WrongService => f.write_str("macaroon is not valid for this service"),
            L402Error::Expired => f.write_str("macaroon expired"),
            L402Error::CapabilityNotGranted => f.write_str("capability not granted"),
            L402Error::SandboxCredential => {
                f.write_str("a sandbox credential, and this gateway takes real payments only")
            }
        }
    }
}

/// A verified L402 credential: what the ledger meters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub identifier: Identifier,
    /// The budget the payment bought: the first budget caveat, which the minter wrote.
    pub limit: Usdc,
    /// The narrowest budget caveat: what this copy of the credential may spend up to.
    pub cap: Usdc,
    /// The first `_valid_until` (Unix seconds): when the token ends.
    pub expires_at: u64,
    /// The narrowest `_valid_until`: this copy of the credential verifies through it.
    pub valid_until: u64,
    /// Bought with a sandbox invoice: the ledger meters it in its sandbox book.
    pub sandbox: bool,
}

/// Which routes a credential is checked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capability<'a> {
    /// A route, with the capability it declares (if any): what a gateway checks.
    Route(Option<&'a str>),
    /// Any route of the service: what the ledger checks, which meters budgets and leaves
    /// routes to the gateway.
    Any,
}

/// The request a credential is checked against.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    pub service_id: &'a str,
    pub capability: Capability<'a>,
    /// Unix seconds.
    pub now: u64,
    /// Whether credentials bought with sandbox invoices are taken.
    pub accept_sandbox: bool,
}

/// Verifies `Authorization: L402 <macaroon>:<preimage>` (already split by
/// [`crate::credential`]): the payment, the signature chain, then the caveats.
pub fn verify(
    macaroon_b64: &str,
    preimage_hex: &str,
    secret: &[u8],
    target: &Target<'_>,
) -> Result<Grant, L402Error> {
    let macaroon = decode_macaroon(macaroon_b64)?;
    let identifier = Identifier::decode(macaroon.identifier()).ok_or(L402Error::BadIdentifier)?;
    let mut preimage = [0u8; 32];
    hex::decode_to_slice(preimage_hex, &mut preimage)
        .map_err(|_| L402Error::BadPreimageEncoding)?;
    // The payment hash is public; an ordinary comparison leaks nothing.
    if Sha256::digest(preimage).as_slice() != identifier.payment_hash {
        return Err(L402Error::WrongPreimage);
    }
    let caveats = macaroon
        .verify(&root_key(secret, &identifier.token_id))
        .map_err(L402Error::BadSignature)?;
    let caveats = Caveats::read(&caveats, target.service_id)?;
    if caveats.sandbox && !target.accept_sandbox {
        return Err(L402Error::SandboxCredential);
    }
    if !caveats.services.ok_or(L402Error::MissingCaveat(SERVICES))? {
        return Err(L402Error::WrongService);
    }
    let valid_until = caveats.valid_until.ok_or(L402Error::MissingCaveat("valid_until"))?;
    if target.now > valid_until.narrowest {
        return Err(L402Error::Expired);
    }
    if let (Some(granted), Capability::Route(wanted)) = (&caveats.capabilities, target.capability)
        && !wanted.is_some_and(|wanted| granted.contains(&wanted))
    {
        return Err(L402Error::CapabilityNotGranted);
    }
    let budget = caveats.budget.ok_or(L402Error::MissingCaveat("budget"))?;
    Ok(Grant {
        identifier,
        limit: budget.first,
        cap: budget.narrowest,
        expires_at: valid_until.first,
        valid_until: valid_until.narrowest,
        sandbox: caveats.sandbox,
    })
}

/// Standard or URL-safe base64, padded or not.
fn decode_macaroon(encoded: &str) -> Result<Macaroon, L402Error> {
    const CONFIG: GeneralPurposeConfig =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    const STANDARD_ANY: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, CONFIG);
    const URL_SAFE_ANY: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, CONFIG);
    if encoded.len() > crate::macaroon::MAX_MACAROON_LEN * 4 / 3 + 4 {
        return Err(L402Error::Malformed(MacaroonError::TooLong));
    }
    let engine = if encoded.contains(['-', '_']) { &URL_SAFE_ANY } else { &STANDARD_ANY };
    let bytes =
        engine.decode(encoded).map_err(|_| L402Error::Malformed(MacaroonError::Malformed))?;
    Macaroon::from_binary(&bytes).map_err(L402Error::Malformed)
}

/// The caveats that concern this service, each narrowed over its repetitions.
#[derive(Default)]
struct Caveats<'a> {
    /// Whether the last `services` caveat lists this service.
    services: Option<bool>,
    valid_until: Option<Narrowed<u64>>,
    capabilities: Option<Vec<&'a str>>,
    budget: Option<Narrowed<Usdc>>,
    /// Whether any caveat marks the credential as bought in a sandbox.
    sandbox: bool,
}

/// A repeated caveat: its first value (the minter's) and the narrowest.
#[derive(Clone, Copy)]
struct Narrowed<T> {
    first: T,
    narrowest: T,
}

impl<T: Copy + Ord> Narrowed<T> {
    /// `previous` narrowed to `value`, refused if `value` would widen it.
    fn narrow(
        previous: Option<Narrowed<T>>,
        value: T,
        name: &'static str,
    ) -> Result<Narrowed<T>, L402Error> {
        match previous {
            None => Ok(Narrowed { first: value, narrowest: value }),
            Some(prev) if value > prev.narrowest => Err(L402Error::WideningCaveat(name)),
            Some(prev) => Ok(Narrowed { first: prev.first, narrowest: value }),
        }
    }
}

impl<'a> Caveats<'a> {
    fn read(raw: &[&'a [u8]], service_id: &str) -> Result<Caveats<'a>, L402Error> {
        let mut caveats = Caveats::default();
        let mut services: Option<Vec<&str>> = None;
        for caveat in raw {
            // Caveats that are not `condition=value` text belong to someone else.
            let Some((condition, value)) =
                core::str::from_utf8(caveat).ok().and_then(|c| c.split_once('='))
            else {
                continue;
            };
            let (condition, value) = (condition.trim(), value.trim());
            if condition == SANDBOX {
                caveats.sandbox = true;
                continue;
            }
            if condition == SERVICES {
                let names: Vec<&str> =
                    value.split(',').map(|s| s.split(':').next().unwrap_or("").trim()).collect();
                if services.as_ref().is_some_and(|prev| names.iter().any(|n| !prev.contains(n))) {
                    return Err(L402Error::WideningCaveat(SERVICES));
                }
                services = Some(names);
                continue;
            }
            let Some(suffix) = condition.strip_prefix(service_id) else { continue };
            match suffix {
                VALID_UNTIL_SUFFIX => {
                    let until: u64 = value
                        .parse()
                        .ok()
                        .filter(|until| *until <= pay_token::MAX_EXPIRY_SECONDS)
                        .ok_or(L402Error::MissingCaveat("valid_until"))?;
                    caveats.valid_until =
                        Some(Narrowed::narrow(caveats.valid_until, until, "valid_until")?);
                }
                CAPABILITIES_SUFFIX => {
                    let granted: Vec<&str> = value.split(',').map(str::trim).collect();
                    if caveats
                        .capabilities
                        .as_ref()
                        .is_some_and(|prev| granted.iter().any(|c| !prev.contains(c)))
                    {
                        return Err(L402Error::WideningCaveat("capabilities"));
                    }
                    caveats.capabilities = Some(granted);
                }
                BUDGET_SUFFIX => {
                    let budget: Usdc =
                        value.parse().map_err(|_| L402Error::MissingCaveat("budget"))?;
                    caveats.budget = Some(Narrowed::narrow(caveats.budget, budget, "budget")?);
                }
                _ => {}
            }
        }
        caveats.services = services.map(|names| names.contains(&service_id));
        Ok(caveats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};

    const SECRET: &[u8] = b"an l402 secret of enough length!";
    const PREIMAGE: [u8; 32] = [7; 32];

    fn identifier() -> Identifier {
        Identifier { payment_hash: Sha256::digest(PREIMAGE).into(), token_id: [9; 32] }
    }

    fn offer() -> Offer {
        Offer {
            service_id: "weather".into(),
            valid_until: 2_000,
            budget: "1.5".parse().unwrap(),
            capabilities: vec![],
            sandbox: false,
        }
    }

    fn target(now: u64) -> Target<'static> {
        Target {
            service_id: "weather",
            capability: Capability::Route(None),
            now,
            accept_sandbox: false,
        }
    }

    fn check(m: &Macaroon, target: &Target<'_>) -> Result<Grant, L402Error> {
        verify(&encode_macaroon(m), &hex::encode(PREIMAGE), SECRET, target)
    }

    #[test]
    fn identifier_is_aperture_layout() {
        let id = identifier();
        let bytes = id.encode();
        assert_eq!(&bytes[..2], &[0, 0]);
        assert_eq!(&bytes[2..34], &id.payment_hash);
        assert_eq!(&bytes[34..], &[9; 32]);
        assert_eq!(Identifier::decode(&bytes), Some(id));
        let mut v1 = bytes;
        v1[1] = 1;
        assert_eq!(Identifier::decode(&v1), None);
        assert_eq!(Identifier::decode(&bytes[..65]), None);
        assert_eq!(id.ledger_token_id(), format!("l402_{}", "09".repeat(32)));
    }

    #[test]
    fn a_minted_credential_verifies_in_every_base64_dialect() {
        let m = mint(SECRET, &identifier(), &offer());
        let binary = m.to_binary();
        let grant = Grant {
            identifier: identifier(),
            limit: "1.5".parse().unwrap(),
            cap: "1.5".parse().unwrap(),
            expires_at: 2_000,
            valid_until: 2_000,
            sandbox: false,
        };
        for encoded in [
            STANDARD.encode(&binary),
            STANDARD.encode(&binary).trim_end_matches('=').to_owned(),
            URL_SAFE.encode(&binary),
            URL_SAFE_NO_PAD.encode(&binary),
        ] {
            assert_eq!(
                verify(&encoded, &hex::encode(PREIMAGE), SECRET, &target(1_000)),
                Ok(grant.clone())
            );
        }
        let caveats: Vec<String> =
            m.caveats().iter().map(|c| String::from_utf8(c.id.clone()).unwrap()).collect();
        assert_eq!(
            caveats,
            ["services=weather:0", "weather_valid_until=2000", "weather_budget_usdc=1.500000"]
        );
    }

    #[test]
    fn refusals_by_kind() {
        let m = mint(SECRET, &identifier(), &offer());
        let b64 = encode_macaroon(&m);
        assert_eq!(
            verify(&b64, &hex::encode([8; 32]), SECRET, &target(1_000)),
            Err(L402Error::WrongPreimage)
        );
        assert_eq!(
            verify(&b64, "abc", SECRET, &target(1_000)),
            Err(L402Error::BadPreimageEncoding)
        );
        assert_eq!(
            verify(&b64, &hex::encode(PREIMAGE), b"another secret", &target(1_000)),
            Err(L402Error::BadSignature(MacaroonError::BadSignature))
        );
        assert_eq!(check(&m, &target(2_001)), Err(L402Error::Expired));
        assert!(check(&m, &target(2_000)).is_ok());
        let other = Target { service_id: "maps", ..target(1_000) };
        assert_eq!(check(&m, &other), Err(L402Error::WrongService));
        assert!(matches!(verify("!!", "00", SECRET, &target(0)), Err(L402Error::Malformed(_))));
    }

    #[test]
    fn holders_may_narrow_but_never_widen() {
        let mut narrowed = mint(SECRET, &identifier(), &offer());
        narrowed.add_first_party_caveat(b"weather_budget_usdc=0.25");
        narrowed.add_first_party_caveat(b"weather_valid_until=1500");
        let grant = check(&narrowed, &target(1_000)).unwrap();
        assert_eq!((grant.limit, grant.cap), ("1.5".parse().unwrap(), "0.25".parse().unwrap()));
        assert_eq!(grant.expires_at, 2_000, "the token's own end");
        assert_eq!(grant.valid_until, 1_500, "this copy's end");
        assert!(check(&narrowed, &target(1_500)).is_ok());
        assert_eq!(check(&narrowed, &target(1_501)), Err(L402Error::Expired));
        assert_eq!(check(&narrowed, &target(1_600)), Err(L402Error::Expired));

        for widening in [
            &b"weather_budget_usdc=2"[..],
            b"weather_valid_until=3000",
            b"services=weather:0,maps:0",
        ] {
            let mut m = mint(SECRET, &identifier(), &offer());
            m.add_first_party_caveat(widening);
            assert!(matches!(check(&m, &target(1_000)), Err(L402Error::WideningCaveat(_))));
        }
        // Caveats for other services, other issuers' caveats and non-text are ignored.
        let mut foreign = mint(SECRET, &identifier(), &offer());
        for caveat in [&b"maps_valid_until=1"[..], b"time < 2020", &[0xff, b'=', 0xfe]] {
            foreign.add_first_party_caveat(caveat);
        }
        assert!(check(&foreign, &target(1_000)).is_ok());
    }

    #[test]
    fn capabilities_restrict_routes() {
        let offer = Offer { capabilities: vec!["read".into(), "search".into()], ..offer() };
        let m = mint(SECRET, &identifier(), &offer);
        let with =
            |capability| Target { capability: Capability::Route(capability), ..target(1_000) };
        assert!(check(&m, &with(Some("search"))).is_ok());
        assert_eq!(check(&m, &with(Some("write"))), Err(L402Error::CapabilityNotGranted));
        assert_eq!(check(&m, &with(None)), Err(L402Error::CapabilityNotGranted));
        // The ledger checks budgets, not routes.
        assert!(check(&m, &Target { capability: Capability::Any, ..target(1_000) }).is_ok());
        // Without a capabilities caveat, every route is open.
        assert!(
            check(&mint(SECRET, &identifier(), &super::tests::offer()), &with(Some("write")))
                .is_ok()
        );
    }

    #[test]
    fn sandbox_credentials_open_only_gateways_that_take_them() {
        let m = mint(SECRET, &identifier(), &Offer { sandbox: true, ..offer() });
        assert_eq!(check(&m, &target(1_000)), Err(L402Error::SandboxCredential));
        let grant = check(&m, &Target { accept_sandbox: true, ..target(1_000) }).unwrap();
        assert!(grant.sandbox, "the ledger must meter it in its sandbox book");
        assert!(!check(&mint(SECRET, &identifier(), &offer()), &target(1_000)).unwrap().sandbox);
        // Anyone may mark a credential as sandbox; nobody can unmark one.
        let mut real = mint(SECRET, &identifier(), &offer());
        real.add_first_party_caveat(b"sandbox=true");
        assert_eq!(check(&real, &target(1_000)), Err(L402Error::SandboxCredential));
    }

    #[test]
    fn required_caveats_must_be_there() {
        let root = root_key(SECRET, &identifier().token_id);
        let mut bare = Macaroon::mint(&root, &identifier().encode(), b"");
        assert_eq!(check(&bare, &target(0)), Err(L402Error::MissingCaveat(SERVICES)));
        bare.add_first_party_caveat(b"services=weather:0");
        assert_eq!(check(&bare, &target(0)), Err(L402Error::MissingCaveat("valid_until")));
        // Past the year 9999: unreadable, as the ledger's books could not hold it.
        let mut far = bare.clone();
        far.add_first_party_caveat(b"weather_valid_until=253402300800");
        assert_eq!(check(&far, &target(0)), Err(L402Error::MissingCaveat("valid_until")));
        bare.add_first_party_caveat(b"weather_valid_until=10");
        assert_eq!(check(&bare, &target(0)), Err(L402Error::MissingCaveat("budget")));
        bare.add_first_party_caveat(b"weather_budget_usdc=0.0000001");
        assert_eq!(check(&bare, &target(0)), Err(L402Error::MissingCaveat("budget")));
    }

    #[test]
    fn challenges_read_back_in_both_spellings() {
        let header = challenge("AgE=", "lnbcrt1");
        assert_eq!(header, r#"L402 macaroon="AgE=", invoice="lnbcrt1""#);
        assert_eq!(parse_challenge(&header), Some(("AgE=", "lnbcrt1")));
        assert_eq!(
            parse_challenge(r#"LSAT token="AgE=", invoice="lnbc1""#),
            Some(("AgE=", "lnbc1"))
        );
        assert_eq!(parse_challenge(r#"Bearer realm="paystile""#), None);
        assert_eq!(parse_challenge(r#"L402 macaroon="AgE=""#), None);
    }
}
