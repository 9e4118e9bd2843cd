//! Fuzz targets for every parser of client bytes: the Pay Token (JWS and claims), the V2
//! macaroon, the L402 credential, the `Authorization` header, the L402 challenge, amounts and
//! Idempotency-Keys. Each takes arbitrary input and structure-aware mutations of valid input,
//! and checks that the answer is a typed error or a value that keeps the format's promises.
//!
//! CI runs `CI_CASES` cases of each; `PROPTEST_CASES=1000000 cargo test --release -p
//! paystile-protocol --test fuzz` runs a long pass (see README, "Fuzzing").
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use paystile_protocol::credential::{self, Credential};
use paystile_protocol::jws::{self, Key, SigningKey};
use paystile_protocol::l402::{self, Capability, Identifier, Offer, Target};
use paystile_protocol::macaroon::Macaroon;
use paystile_protocol::pay_token::{self, MAX_ID_LEN, PayTokenClaims, Scope, Validation};
use paystile_protocol::{Usdc, headers};
use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Cases per target when `PROPTEST_CASES` is not set: about ten seconds in all, for CI.
const CI_CASES: u32 = 1_000;
const SECRET: &str = "fuzz-token-secret-0123456789abcdef";
const L402_SECRET: &[u8] = b"fuzz-l402-secret-0123456789abcdef";
const SERVICE: &str = "weather";
const NOW: u64 = 1_900_000_000;
const PREIMAGE: [u8; 32] = [7; 32];

fn config() -> Config {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok());
    Config { cases: cases.unwrap_or(CI_CASES), ..Config::default() }
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

/// Any JSON value, with the strings and numbers a Pay Token's claims are made of.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        Just(json!(NOW + 60)),
        Just(json!(NOW - 60)),
        prop::sample::select(vec![
            "",
            "0",
            "0.001",
            "1",
            "-1",
            "1e3",
            "0.0000001",
            "18446744073709.551615",
            "18446744073709.551616",
            "SINGLE",
            "ALL",
            "single",
            SERVICE,
            "HS256",
            "none",
        ])
        .prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
        "x{250,260}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A change to a JSON object: a field replaced by any value, removed, or added.
#[derive(Clone, Debug)]
enum Edit {
    Replace(usize, Value),
    Remove(usize),
    Add(String, Value),
}

fn edits(names: &'static [&'static str]) -> impl Strategy<Value = Vec<Edit>> {
    let name = prop_oneof![prop::sample::select(names).prop_map(str::to_owned), ".{0,8}"];
    let edit = prop_oneof![
        (any::<usize>(), json_value()).prop_map(|(at, v)| Edit::Replace(at, v)),
        any::<usize>().prop_map(Edit::Remove),
        (name, json_value()).prop_map(|(n, v)| Edit::Add(n, v)),
    ];
    prop::collection::vec(edit, 1..4)
}

fn apply(object: &mut Value, edits: &[Edit]) {
    let Value::Object(map) = object else { return };
    for edit in edits {
        let keys: Vec<String> = map.keys().cloned().collect();
        match edit {
            Edit::Replace(at, value) if !keys.is_empty() => {
                map.insert(keys[at % keys.len()].clone(), value.clone());
            }
            Edit::Remove(at) if !keys.is_empty() => {
                map.remove(&keys[at % keys.len()]);
            }
            Edit::Add(name, value) => {
                map.insert(name.clone(), value.clone());
            }
            _ => {}
        }
    }
}

/// A change to a string or byte string, as a transmission or a forger would make it.
#[derive(Clone, Debug)]
enum Mutation {
    Flip(usize, u8),
    Delete(usize),
    Insert(usize, u8),
    Truncate(usize),
    /// Moves a slice of the input to another place.
    Splice(usize, usize, usize),
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    let mutation = prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(at, x)| Mutation::Flip(at, x)),
        any::<usize>().prop_map(Mutation::Delete),
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Mutation::Insert(at, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<usize>(), any::<usize>())
            .prop_map(|(a, b, c)| Mutation::Splice(a, b, c)),
    ];
    prop::collection::vec(mutation, 1..4)
}

fn mutate(mut input: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for mutation in mutations {
        let len = input.len();
        match *mutation {
            Mutation::Flip(at, x) if len > 0 => input[at % len] ^= x,
            Mutation::Delete(at) if len > 0 => {
                input.remove(at % len);
            }
            Mutation::Insert(at, byte) => input.insert(at % (len + 1), byte),
            Mutation::Truncate(at) => input.truncate(at % (len + 1)),
            Mutation::Splice(from, to, at) if len > 0 => {
                let (a, b) = (from % len, to % len);
                let piece: Vec<u8> = input[a.min(b)..a.max(b)].to_vec();
                let at = at % (input.len() + 1);
                input.splice(at..at, piece);
            }
            _ => {}
        }
    }
    input
}

fn claims() -> PayTokenClaims {
    PayTokenClaims {
        sub: "agent-1".into(),
        jti: "tok_fuzz".into(),
        service_id: Some(SERVICE.into()),
        limit_usdc: "0.5".parse().unwrap(),
        scope: Scope::Single,
        buyer_tag: Some("team-a".into()),
        exp: NOW + 600,
        iat: Some(NOW),
        nbf: Some(NOW - 10),
        iss: Some("paystile".into()),
        aud: None,
        sandbox: false,
    }
}

const CLAIM_NAMES: &[&str] = &[
    "sub",
    "jti",
    "serviceId",
    "limitUsdc",
    "scope",
    "buyerTag",
    "exp",
    "iat",
    "nbf",
    "iss",
    "aud",
    "sandbox",
];
const HEADER_NAMES: &[&str] = &["alg", "kid", "typ", "crit", "jku", "jwk"];

fn keys() -> Vec<Key> {
    vec![Key::hs256(SECRET).with_kid("k1"), Key::hs256("another-secret-0123456789abcdef-x")]
}

/// A compact JWS of `header` and `payload` with a correct HS256 MAC under `secret`: what
/// reaches the parsers behind the signature check.
fn signed(header: &[u8], payload: &[u8], secret: &str) -> String {
    let input = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(payload));
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
}

/// What every accepted Pay Token keeps: the shape `verify` promises, at `NOW`.
fn assert_claims_hold(claims: &PayTokenClaims) -> Result<(), TestCaseError> {
    let id_ok = |id: &str| !id.is_empty() && id.len() <= MAX_ID_LEN;
    prop_assert!(id_ok(&claims.sub) && id_ok(&claims.jti), "{claims:?}");
    prop_assert!(claims.service_id.as_deref().is_none_or(id_ok), "{claims:?}");
    prop_assert!(claims.buyer_tag.as_ref().is_none_or(|t| t.len() <= MAX_ID_LEN));
    prop_assert!(claims.scope == Scope::All || claims.service_id.is_some());
    prop_assert!(NOW < claims.exp, "{claims:?}");
    prop_assert!(claims.nbf.is_none_or(|nbf| nbf <= NOW), "{claims:?}");
    // An accepted token signs again to itself.
    let again = pay_token::sign(claims, &SigningKey::hs256(SECRET));
    let read = pay_token::verify(&again, &[Key::hs256(SECRET)], &Validation::default(), NOW);
    prop_assert_eq!(read.as_ref(), Ok(claims));
    Ok(())
}

fn valid_l402() -> (Identifier, Offer, Macaroon) {
    let identifier =
        Identifier { payment_hash: Sha256::digest(PREIMAGE).into(), token_id: [9; 32] };
    let offer = Offer {
        service_id: SERVICE.into(),
        valid_until: NOW + 600,
        budget: "0.05".parse().unwrap(),
        capabilities: vec![],
        sandbox: false,
    };
    let macaroon = l402::mint(L402_SECRET, &identifier, &offer);
    (identifier, offer, macaroon)
}

fn target() -> Target<'static> {
    Target {
        service_id: SERVICE,
        capability: Capability::Route(None),
        now: NOW,
        accept_sandbox: false,
    }
}

/// Caveats as an attenuating holder could add them: known conditions with any values, and
/// any bytes.
fn caveat() -> impl Strategy<Value = Vec<u8>> {
    let condition = prop::sample::select(vec![
        "services".to_owned(),
        format!("{SERVICE}_valid_until"),
        format!("{SERVICE}_budget_usdc"),
        format!("{SERVICE}_capabilities"),
        "sandbox".to_owned(),
        "maps_budget_usdc".to_owned(),
    ]);
    let value = prop_oneof![
        Just(format!("{SERVICE}:0")),
        Just("maps:0,weather:1".to_owned()),
        (0..NOW * 2).prop_map(|n| n.to_string()),
        prop::sample::select(vec!["0", "0.01", "0.05", "0.06", "1", "-1", "true", "a,b", ""])
            .prop_map(str::to_owned),
        ".{0,20}",
    ];
    prop_oneof![
        3 => (condition, value).prop_map(|(c, v)| format!("{c}={v}").into_bytes()),
        1 => bytes(60),
    ]
}

proptest! {
    #![proptest_config(config())]

    /// Any string as a Pay Token: refused with a typed error (no key signed it).
    #[test]
    fn any_string_is_not_a_pay_token(token in prop_oneof![".{0,300}", "[A-Za-z0-9_.=-]{0,300}"]) {
        let verified = pay_token::verify(&token, &keys(), &Validation::default(), NOW);
        prop_assert!(verified.is_err(), "{token:?}");
    }

    /// A valid Pay Token changed anywhere is refused, never read differently.
    #[test]
    fn a_changed_pay_token_is_refused(mutations in mutations()) {
        let token = pay_token::sign(&claims(), &SigningKey::hs256(SECRET).with_kid("k1"));
        let changed = mutate(token.clone().into_bytes(), &mutations);
        let Ok(changed) = String::from_utf8(changed) else { return Ok(()) };
        let verified = pay_token::verify(&changed, &keys(), &Validation::default(), NOW);
        if changed == token {
            prop_assert_eq!(verified, Ok(claims()));
        } else {
            prop_assert!(verified.is_err(), "{changed} was accepted");
        }
    }

    /// Correctly signed claims of any shape: accepted only as a Pay Token that keeps its
    /// promises, else a typed error.
    #[test]
    fn signed_claims_of_any_shape_are_checked(edits in edits(CLAIM_NAMES), raw in bytes(200), use_raw in any::<bool>()) {
        let payload = if use_raw {
            raw
        } else {
            let mut claims = serde_json::to_value(claims()).unwrap();
            apply(&mut claims, &edits);
            claims.to_string().into_bytes()
        };
        let token = signed(br#"{"alg":"HS256","typ":"JWT"}"#, &payload, SECRET);
        match pay_token::verify(&token, &keys(), &Validation::default(), NOW) {
            Ok(claims) => assert_claims_hold(&claims)?,
            Err(error) => prop_assert!(!error.to_string().is_empty()),
        }
    }

    /// Correctly signed headers of any shape: only `alg: HS256` without `crit`, under a `kid`
    /// the keys have (or none), is accepted.
    #[test]
    fn signed_headers_of_any_shape_are_checked(edits in edits(HEADER_NAMES), raw in bytes(80), use_raw in any::<bool>()) {
        let mut header = json!({"alg": "HS256", "typ": "JWT", "kid": "k1"});
        apply(&mut header, &edits);
        let header_bytes = if use_raw { raw } else { header.to_string().into_bytes() };
        let payload = serde_json::to_vec(&claims()).unwrap();
        let token = signed(&header_bytes, &payload, SECRET);
        let verified = jws::verify(&token, &keys());
        if let Ok(payload_read) = &verified {
            prop_assert_eq!(payload_read, &payload);
            let header: Value = serde_json::from_slice(&header_bytes).unwrap();
            prop_assert_eq!(&header["alg"], "HS256");
            prop_assert!(header.get("crit").is_none());
            // A null `kid` reads as none: the token is then tried against every key.
            let kid = header.get("kid").filter(|kid| !kid.is_null());
            prop_assert!(kid.is_none_or(|kid| kid == "k1"), "{header}");
        }
    }

    /// Any bytes as a V2 macaroon: an error, or a macaroon that writes back to a macaroon
    /// reading the same.
    #[test]
    fn any_bytes_are_a_macaroon_or_an_error(input in prop_oneof![bytes(600), bytes(600).prop_map(|b| [&[2u8][..], &b].concat())]) {
        if let Ok(m) = Macaroon::from_binary(&input) {
            prop_assert_eq!(Macaroon::from_binary(&m.to_binary()), Ok(m));
        }
    }

    /// A valid macaroon changed anywhere: unreadable, or refused by its root key unless what
    /// it signs (identifier, caveats, signature) is unchanged.
    #[test]
    fn a_changed_macaroon_does_not_verify(mutations in mutations()) {
        let (identifier, _, macaroon) = valid_l402();
        let root = l402::root_key(L402_SECRET, &identifier.token_id);
        let changed = mutate(macaroon.to_binary(), &mutations);
        if let Ok(read) = Macaroon::from_binary(&changed) {
            let same = read.identifier() == macaroon.identifier()
                && read.caveats() == macaroon.caveats()
                && read.signature() == macaroon.signature();
            prop_assert_eq!(read.verify(&root).is_ok(), same);
        }
    }

    /// Caveats added by a holder (validly chained) can only narrow an L402 credential: it
    /// keeps its token, first budget and first expiry, and may spend no more than it bought.
    #[test]
    fn added_caveats_never_widen_an_l402_credential(added in prop::collection::vec(caveat(), 0..6)) {
        let (identifier, offer, mut macaroon) = valid_l402();
        for caveat in &added {
            macaroon.add_first_party_caveat(caveat);
        }
        let encoded = l402::encode_macaroon(&macaroon);
        match l402::verify(&encoded, &hex::encode(PREIMAGE), L402_SECRET, &target()) {
            Ok(grant) => {
                prop_assert_eq!(grant.identifier, identifier);
                prop_assert_eq!(grant.limit, offer.budget);
                prop_assert!(grant.cap <= offer.budget);
                prop_assert_eq!(grant.expires_at, offer.valid_until);
                prop_assert!(!grant.sandbox);
            }
            Err(error) => prop_assert!(!error.to_string().is_empty()),
        }
    }

    /// Any macaroon text and preimage, and a valid credential's text changed anywhere:
    /// refused with a typed error unless the change left the credential as it was.
    #[test]
    fn l402_credentials_are_verified_or_refused(
        macaroon in prop_oneof![".{0,200}", "[A-Za-z0-9+/=_-]{0,600}"],
        preimage in prop_oneof![".{0,70}", "[0-9a-fA-F]{64}"],
        mutations in mutations(),
        changed_valid in any::<bool>(),
    ) {
        let (_, _, valid) = valid_l402();
        let encoded = l402::encode_macaroon(&valid);
        let (macaroon, preimage) = if changed_valid {
            let text = format!("{encoded}:{}", hex::encode(PREIMAGE));
            let changed = String::from_utf8_lossy(&mutate(text.into_bytes(), &mutations)).into_owned();
            match changed.rsplit_once(':') {
                Some((m, p)) => (m.to_owned(), p.to_owned()),
                None => (changed, String::new()),
            }
        } else {
            (macaroon, preimage)
        };
        if let Ok(grant) = l402::verify(&macaroon, &preimage, L402_SECRET, &target()) {
            // Only the valid credential, perhaps spelled otherwise (base64 alphabet, padding,
            // hex case), is accepted.
            let expected = l402::verify(&encoded, &hex::encode(PREIMAGE), L402_SECRET, &target());
            prop_assert_eq!(Ok(grant), expected);
            prop_assert_eq!(preimage.to_ascii_lowercase(), hex::encode(PREIMAGE));
        }
    }

    /// Any `Authorization` bytes: another scheme, a typed error, or a credential made only of
    /// the characters its scheme allows, taken from the header as sent.
    #[test]
    fn any_authorization_header_gets_an_answer(
        scheme in prop::sample::select(vec!["Bearer", "bearer", "L402", "LSAT", "lsat", "Basic", "", "Bearer\t", "x402v1", "x402v2", "X402v2"]),
        gap in prop::sample::select(vec![" ", "  ", "\t", "", " \r\n "]),
        rest in prop_oneof![
            bytes(300),
            "[A-Za-z0-9+/=._~-]{0,300}".prop_map(String::into_bytes),
            "[A-Za-z0-9+/=._~:-]{0,300}".prop_map(String::into_bytes),
        ],
        mutations in mutations(),
        mutate_valid in any::<bool>(),
    ) {
        let value = if mutate_valid {
            let valid = format!("L402 {}:{}", l402::encode_macaroon(&valid_l402().2), hex::encode(PREIMAGE));
            mutate(valid.into_bytes(), &mutations)
        } else {
            [scheme.as_bytes(), gap.as_bytes(), &rest].concat()
        };
        let b64token = |c: char| c.is_ascii_alphanumeric() || "-._~+/=".contains(c);
        let within = |part: &str| value.windows(part.len()).any(|w| w == part.as_bytes());
        match credential::parse_authorization(&value) {
            Ok(Some(Credential::Bearer(token))) => {
                prop_assert!(!token.is_empty() && token.chars().all(b64token) && within(token));
            }
            Ok(Some(Credential::L402 { macaroon, preimage })) => {
                prop_assert!(!macaroon.is_empty() && macaroon.chars().all(b64token) && within(macaroon));
                prop_assert!(!preimage.is_empty() && preimage.chars().all(|c| c.is_ascii_hexdigit()));
            }
            Ok(Some(Credential::X402 { payment, .. })) => {
                prop_assert!(payment.is_empty() || value.windows(payment.len()).any(|w| w == payment));
            }
            Ok(None) | Err(_) => {}
        }
    }

    /// Any `WWW-Authenticate` value: no challenge, or one whose parts are in the value.
    #[test]
    fn any_challenge_header_gets_an_answer(value in prop_oneof![
        ".{0,200}",
        ("(L402|LSAT|l402) ", "(macaroon|token|invoice|x)=\"[^\"]{0,30}\"(, ?(macaroon|token|invoice)=\"[^\"]{0,30}\"){0,3}")
            .prop_map(|(s, p)| s + &p),
    ]) {
        if let Some((macaroon, invoice)) = l402::parse_challenge(&value) {
            prop_assert!(value.contains(macaroon) && value.contains(invoice));
        }
    }

    /// Any amount text: an error, or an amount that prints and reads back as itself.
    #[test]
    fn any_amount_text_reads_exactly_or_not_at_all(text in prop_oneof![".{0,30}", "-?[0-9]{0,16}(\\.[0-9]{0,9})?", "[0-9eE.+-]{0,12}"]) {
        if let Ok(amount) = text.parse::<Usdc>() {
            prop_assert_eq!(amount.to_string().parse::<Usdc>(), Ok(amount));
            let json: Usdc = serde_json::from_value(json!(text)).unwrap();
            prop_assert_eq!(json, amount);
        }
    }

    /// Any Idempotency-Key bytes: refused, or 1 to 255 printable ASCII characters as sent.
    #[test]
    fn any_idempotency_key_is_printable_or_refused(value in bytes(300)) {
        if let Some(key) = headers::idempotency_key(&value) {
            prop_assert_eq!(key.as_bytes(), &value[..]);
            prop_assert!(!key.is_empty() && key.len() <= headers::MAX_IDEMPOTENCY_KEY_LEN);
            prop_assert!(key.bytes().all(|b| (0x20..=0x7e).contains(&b)));
        }
    }
}
