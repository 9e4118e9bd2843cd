//! What a 402 offers, read defensively: the `WWW-Authenticate` challenges (Bearer, L402/LSAT),
//! x402's v2 `PAYMENT-REQUIRED` header and v1 body `accepts`, and paystile's body (`price`,
//! `serviceId`). Every reader takes bounded input; a malformed challenge is reported, never
//! guessed at.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use std::str::FromStr as _;

use lightning_invoice::Bolt11Invoice;
use paystile_protocol::l402::Identifier;
use paystile_protocol::macaroon::Macaroon;
use paystile_protocol::x402::{self, Offer as X402Terms, OfferSettings, Version};
use paystile_protocol::{Usdc, l402};
use serde::Serialize;
use serde_json::Value;

/// An L402 challenge: the macaroon to present and the invoice whose preimage unlocks it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct L402Offer {
    pub macaroon: String,
    pub invoice: String,
    /// The invoice's amount, in millisatoshi.
    pub invoice_msat: Option<u64>,
    /// The invoice's payment hash, which is also the macaroon's.
    #[serde(skip)]
    pub payment_hash: [u8; 32],
    /// The service the macaroon is for (its `services=` caveat), if it says.
    pub service: Option<String>,
    /// What paying buys, in USDC: paystile's `<service>_budget_usdc` caveat, if present.
    pub budget: Option<Usdc>,
}

/// One x402 `exact` offer on an EVM chain, as the agent would sign for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct X402Offer {
    /// 2: from `PAYMENT-REQUIRED`; 1: from the body's `accepts`.
    pub x402_version: u32,
    pub network: String,
    pub asset: String,
    pub pay_to: String,
    /// Atomic units; USDC's are micro-USDC.
    pub amount: u64,
    #[serde(skip)]
    pub terms: X402Terms,
}

impl X402Offer {
    pub fn version(&self) -> Version {
        if self.x402_version == 1 { Version::V1 } else { Version::V2 }
    }

    /// The price in USDC: atomic units of a 6-decimal token.
    pub fn price(&self) -> Option<Usdc> {
        Usdc::from_micros(self.amount)
    }
}

/// What one 402 offered.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Offers {
    pub url: String,
    pub origin: String,
    /// paystile's body: the price of the call.
    pub price: Option<Usdc>,
    pub service_id: Option<String>,
    /// A `Bearer` challenge was offered (a Pay Token pays it).
    pub bearer: bool,
    pub l402: Option<L402Offer>,
    /// Usable x402 offers, v2's first.
    pub x402: Vec<X402Offer>,
    /// Challenges that were present but could not be read, each with why.
    pub malformed: Vec<String>,
}

/// The most of a `WWW-Authenticate` or `PAYMENT-REQUIRED` value read: an L402 challenge is
/// about 1 KB, an x402 offer list a few.
pub const MAX_CHALLENGE_LEN: usize = 16 * 1024;

impl Offers {
    /// The service a credential for these offers is cached under.
    pub fn service(&self) -> String {
        self.service_id
            .clone()
            .or_else(|| self.l402.as_ref().and_then(|o| o.service.clone()))
            .unwrap_or_default()
    }

    /// Names of the offered schemes, for messages.
    pub fn scheme_names(&self) -> Vec<&'static str> {
        let mut names = Vec::new();
        if self.bearer {
            names.push("Bearer (Pay Token)");
        }
        if self.l402.is_some() {
            names.push("L402");
        }
        if !self.x402.is_empty() {
            names.push("x402 exact");
        }
        names
    }
}

/// Reads a 402: its `WWW-Authenticate` fields (each as received, or joined), its
/// `PAYMENT-REQUIRED` header and its body (already capped by the caller).
pub fn read(
    url: &str,
    origin: &str,
    www_authenticate: &[&str],
    payment_required: Option<&str>,
    body: &[u8],
) -> Offers {
    let mut offers = Offers { url: url.to_owned(), origin: origin.to_owned(), ..Offers::default() };
    for field in www_authenticate {
        if field.len() > MAX_CHALLENGE_LEN {
            offers
                .malformed
                .push(format!("a WWW-Authenticate field over {MAX_CHALLENGE_LEN} bytes"));
            continue;
        }
        for challenge in challenges(field) {
            let scheme = challenge.split([' ', ',']).next().unwrap_or_default();
            if scheme.eq_ignore_ascii_case("Bearer") {
                offers.bearer = true;
            } else if scheme.eq_ignore_ascii_case("L402") || scheme.eq_ignore_ascii_case("LSAT") {
                if offers.l402.is_some() {
                    continue; // paystile repeats its challenge first and last: one is enough.
                }
                match read_l402(&challenge) {
                    Ok(offer) => offers.l402 = Some(offer),
                    Err(reason) => offers.malformed.push(format!("L402 challenge: {reason}")),
                }
            }
        }
    }
    let json: Option<Value> = serde_json::from_slice(body).ok();
    if let Some(json) = &json {
        offers.price = json.get("price").and_then(|p| serde_json::from_value(p.clone()).ok());
        offers.service_id = json.get("serviceId").and_then(Value::as_str).map(str::to_owned);
    }
    if let Some(value) = payment_required {
        match read_payment_required(value) {
            Ok(list) => offers.x402.extend(list),
            Err(reason) => offers.malformed.push(format!("PAYMENT-REQUIRED: {reason}")),
        }
    }
    // v1 lists its offers in the body; clients read v2 first, so v1's come after.
    if let Some(accepts) = json.as_ref().filter(|j| j["x402Version"] == 1).map(|j| &j["accepts"]) {
        match serde_json::from_value::<Vec<x402::RequirementsV1>>(accepts.clone()) {
            Ok(list) => offers.x402.extend(list.iter().filter_map(|r| {
                let extra = r.extra.as_ref();
                exact_offer(
                    1,
                    &r.scheme,
                    &r.network,
                    &r.asset,
                    &r.pay_to,
                    &r.max_amount_required,
                    r.max_timeout_seconds,
                    extra,
                )
                .ok()
                .flatten()
            })),
            Err(e) => offers.malformed.push(format!("x402 v1 body accepts: {e}")),
        }
    }
    offers
}

/// Splits a `WWW-Authenticate` value into its challenges, whichever way fields were joined
/// (`, ` between challenges as fetch and requests join them): a comma outside quotes starts
/// a new challenge when what follows is `<scheme> ` rather than `<param>=`.
fn challenges(value: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in value.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&value[start..]);
    let mut challenges: Vec<String> = Vec::new();
    for part in parts.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
        let before_eq = part.split('=').next().unwrap_or_default();
        let starts_challenge = before_eq.trim().contains(' ') || !part.contains('=');
        match challenges.last_mut() {
            Some(last) if !starts_challenge => {
                last.push_str(", ");
                last.push_str(part);
            }
            _ => challenges.push(part.to_owned()),
        }
    }
    challenges
}

fn read_l402(challenge: &str) -> Result<L402Offer, String> {
    let (macaroon, invoice) =
        l402::parse_challenge(challenge).ok_or("expected L402 macaroon=\"…\", invoice=\"…\"")?;
    let bytes = [STANDARD, URL_SAFE, STANDARD_NO_PAD, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(macaroon).ok())
        .ok_or("the macaroon is not base64")?;
    let parsed = Macaroon::from_binary(&bytes).map_err(|e| format!("the macaroon: {e:?}"))?;
    let payment_hash = Identifier::decode(parsed.identifier())
        .ok_or("the macaroon's identifier names no payment hash")?
        .payment_hash;
    // Paying an invoice for another payment hash would buy a preimage that opens nothing:
    // checked before paying, on the invoice's own (signed, checksummed) fields.
    let bolt11 = Bolt11Invoice::from_str(invoice.trim())
        .map_err(|e| format!("the invoice is not a BOLT11 invoice: {e}"))?;
    if AsRef::<[u8]>::as_ref(bolt11.payment_hash()) != payment_hash.as_slice() {
        return Err("the invoice is for another payment than the macaroon's (payment hashes \
                    differ)"
            .into());
    }
    if bolt11.is_expired() {
        return Err("the invoice has expired".into());
    }
    let caveats: Vec<(String, String)> = parsed
        .caveats()
        .iter()
        .filter_map(|c| std::str::from_utf8(&c.id).ok())
        .filter_map(|c| c.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    // `services=<name>:<tier>[,…]`: the first service names it.
    let service = caveats
        .iter()
        .find(|(k, _)| k == l402::SERVICES)
        .and_then(|(_, v)| v.split(',').next())
        .map(|s| s.split(':').next().unwrap_or(s).trim().to_owned());
    let budget = service.as_ref().and_then(|service| {
        let name = format!("{service}{}", l402::BUDGET_SUFFIX);
        // The minter's caveat comes first; later ones may only narrow what is spendable.
        caveats.iter().find(|(k, _)| *k == name).and_then(|(_, v)| v.parse().ok())
    });
    Ok(L402Offer {
        macaroon: macaroon.to_owned(),
        invoice: invoice.to_owned(),
        invoice_msat: bolt11.amount_milli_satoshis(),
        payment_hash,
        service,
        budget,
    })
}

fn read_payment_required(value: &str) -> Result<Vec<X402Offer>, String> {
    let bytes = [STANDARD, STANDARD_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(value.trim()).ok())
        .ok_or("not base64")?;
    let required: x402::PaymentRequired = serde_json::from_slice(&bytes)
        .map_err(|e| format!("not an x402 v2 PaymentRequired: {e}"))?;
    if required.x402_version != 2 {
        return Err(format!(
            "x402Version {} (only 2 is read from this header)",
            required.x402_version
        ));
    }
    let mut offers = Vec::new();
    let mut problems = Vec::new();
    for r in &required.accepts {
        match exact_offer(
            2,
            &r.scheme,
            &r.network,
            &r.asset,
            &r.pay_to,
            &r.amount,
            r.max_timeout_seconds,
            r.extra.as_ref(),
        ) {
            Ok(Some(offer)) => offers.push(offer),
            Ok(None) => {}
            Err(e) => problems.push(e),
        }
    }
    if offers.is_empty() && !problems.is_empty() {
        return Err(problems.join("; "));
    }
    Ok(offers)
}

/// One requirement as an offer the agent can sign: `Ok(None)` for another scheme or a
/// non-EVM network (not ours to pay), `Err` for an `exact` offer that does not read.
#[allow(clippy::too_many_arguments)]
fn exact_offer(
    version: u32,
    scheme: &str,
    network: &str,
    asset: &str,
    pay_to: &str,
    amount: &str,
    max_timeout_seconds: u64,
    extra: Option<&Value>,
) -> Result<Option<X402Offer>, String> {
    if scheme != x402::SCHEME_EXACT || x402::chain_id(network).is_none() {
        return Ok(None);
    }
    if amount.is_empty() || !amount.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("amount {amount:?} is not a whole number of atomic units"));
    }
    let amount: u64 = amount.parse().map_err(|_| format!("amount {amount} is too large"))?;
    let name = extra.and_then(|e| e["name"].as_str());
    let asset_version = extra.and_then(|e| e["version"].as_str());
    let settings = OfferSettings {
        network,
        pay_to,
        asset: Some(asset),
        asset_name: name,
        asset_version,
        max_timeout_seconds: Some(max_timeout_seconds),
    };
    let terms =
        X402Terms::from_settings(&settings).map_err(|e| format!("{}: {}", e.field, e.message))?;
    Ok(Some(X402Offer {
        x402_version: version,
        network: network.to_owned(),
        asset: asset.to_owned(),
        pay_to: pay_to.to_owned(),
        amount,
        terms,
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    use paystile_ledger::invoice::InvoiceRequest;
    use paystile_ledger::invoice::sandbox::SandboxNode;
    use paystile_protocol::l402::{Identifier, Offer as L402Terms};
    use paystile_protocol::x402::{PaymentRequired, Resource};

    /// A signed regtest invoice of `msat` (the ledger's sandbox node makes real ones).
    fn invoice(msat: u64) -> (String, [u8; 32]) {
        invoice_expiring(msat, std::time::Duration::from_secs(600))
    }

    fn invoice_expiring(msat: u64, expiry: std::time::Duration) -> (String, [u8; 32]) {
        let node = SandboxNode::new(b"offers test secret").unwrap();
        let request = InvoiceRequest { amount_msat: msat, memo: "test".into(), expiry };
        let invoice = node.create(&request).unwrap();
        (invoice.bolt11, invoice.payment_hash)
    }

    fn macaroon(payment_hash: [u8; 32]) -> String {
        let id = Identifier { payment_hash, token_id: [2; 32] };
        let terms = L402Terms {
            service_id: "weather".into(),
            valid_until: 4_000_000_000,
            budget: "0.003".parse().unwrap(),
            capabilities: vec![],
            sandbox: true,
        };
        l402::encode_macaroon(&l402::mint(b"secret", &id, &terms))
    }

    fn x402_terms() -> X402Terms {
        let settings = OfferSettings {
            network: "eip155:31337",
            pay_to: "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC",
            asset: Some("0x5FbDB2315678afecb367f032d93F642f64180aa3"),
            asset_name: Some("USD Coin"),
            asset_version: Some("2"),
            max_timeout_seconds: None,
        };
        X402Terms::from_settings(&settings).unwrap()
    }

    #[test]
    fn an_l402_challenge_is_found_however_the_fields_were_joined() {
        let (bolt11, hash) = invoice(3_000);
        let l402 = l402::challenge(&macaroon(hash), &bolt11);
        let bearer = r#"Bearer realm="paystile", error="payment_required""#;
        let joined = format!("{l402}, {bearer}, {l402}");
        let lsat_first = format!("{bearer}, {}", l402.replacen("L402", "LSAT", 1));
        for fields in [
            vec![l402.as_str()],
            vec![bearer, l402.as_str()],
            vec![joined.as_str()],
            vec![lsat_first.as_str()],
        ] {
            let offers = read("http://h/x", "http://h", &fields, None, b"");
            let offer = offers.l402.as_ref().unwrap_or_else(|| panic!("{fields:?}"));
            assert_eq!(offer.invoice, bolt11);
            assert_eq!(offer.macaroon, macaroon(hash));
            assert_eq!(offer.service.as_deref(), Some("weather"));
            assert_eq!(offer.budget, Some("0.003".parse().unwrap()));
            assert_eq!((offer.invoice_msat, offer.payment_hash), (Some(3_000), hash));
            assert!(offers.malformed.is_empty(), "{:?}", offers.malformed);
        }
        let only_bearer = read("u", "o", &[bearer], None, b"");
        assert!(only_bearer.bearer && only_bearer.l402.is_none());
        assert!(!read("u", "o", &[l402.as_str()], None, b"").bearer);
    }

    #[test]
    fn a_malformed_or_huge_l402_challenge_is_reported_not_paid() {
        let (bolt11, hash) = invoice(3_000);
        let good = macaroon(hash);
        let no_hash = {
            let mut minted = Macaroon::mint(b"k", b"not an L402 identifier", b"");
            minted.add_first_party_caveat(b"services=weather:0");
            l402::encode_macaroon(&minted)
        };
        // Expiring at once: its timestamp is whole seconds, so some time has passed.
        let (expired, expired_hash) = invoice_expiring(3_000, std::time::Duration::ZERO);
        let mut tampered = bolt11.clone();
        tampered.pop();
        tampered.push(if bolt11.ends_with('q') { 'p' } else { 'q' });
        let cases = [
            ("L402 macaroon=\"AgEE\", invoice=\"lnbc1\"".to_owned(), "the macaroon"),
            ("L402 invoice=\"lnbc1\"".to_owned(), "expected L402"),
            ("L402 macaroon=\"%%%\", invoice=\"lnbc1\"".to_owned(), "not base64"),
            (l402::challenge(&no_hash, &bolt11), "names no payment hash"),
            (l402::challenge(&macaroon([1; 32]), &bolt11), "payment hashes differ"),
            (l402::challenge(&good, &tampered), "not a BOLT11 invoice"),
            (l402::challenge(&good, "lnbcrt30n1pexample"), "not a BOLT11 invoice"),
            (l402::challenge(&macaroon(expired_hash), &expired), "has expired"),
        ];
        for (bad, why) in cases {
            let offers = read("u", "o", &[bad.as_str()], None, b"");
            assert!(offers.l402.is_none(), "{bad}");
            assert_eq!(offers.malformed.len(), 1, "{bad}: {:?}", offers.malformed);
            assert!(offers.malformed[0].contains(why), "{why}: {:?}", offers.malformed);
        }
        let huge = format!("L402 macaroon=\"{}\", invoice=\"x\"", "A".repeat(MAX_CHALLENGE_LEN));
        let offers = read("u", "o", &[huge.as_str()], None, b"");
        assert!(offers.l402.is_none());
        assert!(offers.malformed[0].contains("over"), "{:?}", offers.malformed);
        // Any text as the invoice (a hostile server's) is an error, never a panic.
        for length in 0..200 {
            let text: String = "lnbc9é1€ü\u{1F4B8}0p".chars().cycle().take(length).collect();
            let offers = read("u", "o", &[&l402::challenge(&good, &text)], None, b"");
            assert!(offers.l402.is_none() && offers.malformed.len() == 1, "{text:?}");
        }
    }

    #[test]
    fn x402_offers_come_from_the_v2_header_then_the_v1_body() {
        let terms = x402_terms();
        let resource = Resource { url: "http://h/x".into(), description: None, mime_type: None };
        let required = PaymentRequired {
            x402_version: 2,
            error: None,
            resource: resource.clone(),
            accepts: vec![terms.requirements(1000)],
        };
        let body = serde_json::json!({
            "error": "Payment required", "code": "payment_required", "price": "0.001000",
            "serviceId": "weather", "schemes": ["Bearer", "x402"], "x402Version": 1,
            "accepts": [terms.requirements_v1(1000, &resource)],
        });
        let body = serde_json::to_vec(&body).unwrap();
        let offers = read("u", "o", &[], Some(&required.header_value()), &body);
        assert_eq!(offers.x402.len(), 2);
        assert_eq!((offers.x402[0].x402_version, offers.x402[1].x402_version), (2, 1));
        assert_eq!(offers.x402[0].amount, 1000);
        assert_eq!(offers.x402[0].terms, terms);
        assert_eq!(offers.price, Some("0.001".parse().unwrap()));
        assert_eq!(offers.service(), "weather");

        // Not base64, not JSON, an amount that is not an integer: reported.
        for bad in ["!!!", &STANDARD.encode("{}")] {
            let offers = read("u", "o", &[], Some(bad), b"");
            assert!(offers.x402.is_empty());
            assert_eq!(offers.malformed.len(), 1, "{bad}");
        }
        let mut fractional = required.clone();
        fractional.accepts[0].amount = "1.5".into();
        let offers = read("u", "o", &[], Some(&fractional.header_value()), b"");
        assert!(offers.x402.is_empty() && offers.malformed[0].contains("amount"));
        // Another scheme or a non-EVM network is not ours to pay, and not an error.
        let mut upto = required.clone();
        upto.accepts[0].scheme = "upto".into();
        let offers = read("u", "o", &[], Some(&upto.header_value()), b"");
        assert!(offers.x402.is_empty() && offers.malformed.is_empty());
    }
}
