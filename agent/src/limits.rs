//! What the agent may pay, checked before anything is paid: a session budget, a per-call
//! maximum, the origins it may pay at all, the exchange rate an L402 invoice may ask, and
//! the tokens an x402 transfer may move. Each refusal says which limit, the price and what
//! is left, so that a model reading it can decide what to do next.

use paystile_protocol::Usdc;
use paystile_protocol::x402::{self, Address};
use serde::Serialize;

/// The limits. Every one fails closed: no budget is a budget of zero, an empty allow list
/// allows no origin, no L402 rate pays no invoice, and x402 moves only USDC where the
/// protocol knows it. An agent handed a wallet and no limits must not pay whoever answers
/// 402 (a prompt-injected URL included); `*` in the allow list is the explicit opt-out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// The most the session may pay in all.
    pub budget: Option<Usdc>,
    /// The most one call may cost.
    pub max_price: Option<Usdc>,
    /// Origins (`scheme://host[:port]`, as [`origin_of`] writes them), or `*`.
    pub allow_origins: Vec<String>,
    /// The most satoshis an L402 invoice may ask per USDC of what it buys (the budget its
    /// macaroon states, else the 402's price). Routing fees are paid within it.
    pub l402_max_sats_per_usdc: Option<u64>,
    /// The most one L402 purchase may buy; the per-call maximum when unset (the server
    /// states both the price and the budget a payment buys, so the price alone bounds
    /// nothing).
    pub l402_max_purchase: Option<Usdc>,
    /// Tokens x402 may transfer besides USDC on Base and Base Sepolia (a sandbox's, say):
    /// each must be a 6-decimal USD token, since its atomic units are counted as micro-USDC.
    pub x402_assets: Vec<X402Asset>,
}

/// A token on an EVM chain, as CAIP-19 names it: `eip155:<chain id>/erc20:<address>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct X402Asset {
    pub chain_id: u64,
    pub address: Address,
}

impl std::str::FromStr for X402Asset {
    type Err = String;

    fn from_str(text: &str) -> Result<X402Asset, String> {
        let wrong = || format!("{text:?} is not eip155:<chain id>/erc20:<address> (CAIP-19)");
        let (network, token) = text.trim().split_once('/').ok_or_else(wrong)?;
        let chain_id = network
            .strip_prefix("eip155:")
            .and_then(|_| x402::chain_id(network))
            .ok_or_else(wrong)?;
        let address = token.strip_prefix("erc20:").ok_or_else(wrong)?;
        let address = address.parse().map_err(|_| wrong())?;
        Ok(X402Asset { chain_id, address })
    }
}

impl std::fmt::Display for X402Asset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "eip155:{}/erc20:{}", self.chain_id, self.address)
    }
}

/// A payment refused before anything was paid.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize)]
#[serde(tag = "limit", rename_all = "camelCase")]
pub enum Refusal {
    #[error(
        "refused before paying: {origin} is not an allowed origin (allowed: {allowed}); \
         add it with --allow-origin or PAYSTILE_AGENT_ALLOW_ORIGINS. Nothing was paid."
    )]
    OriginNotAllowed { origin: String, allowed: String },
    #[error(
        "refused before paying: {scheme} asks {price} USDC for this call, above the per-call \
         maximum of {max} USDC ({set_by}). Nothing was paid."
    )]
    OverMaxPrice { scheme: String, price: Usdc, max: Usdc, set_by: &'static str },
    #[error(
        "refused before paying: {scheme} would pay {amount} USDC, more than the {remaining} \
         USDC left of the session budget of {budget} USDC ({spent} USDC spent) \
         (--budget-usdc / PAYSTILE_AGENT_BUDGET_USDC). Nothing was paid."
    )]
    OverBudget { scheme: String, amount: Usdc, remaining: Usdc, budget: Usdc, spent: Usdc },
    #[error(
        "refused before paying: no session budget is set (--budget-usdc / \
         PAYSTILE_AGENT_BUDGET_USDC), so the agent pays nothing. Nothing was paid."
    )]
    NoBudget,
    #[error(
        "refused before paying: {scheme}'s price in USDC is unknown ({why}), so no limit can \
         be checked. Nothing was paid."
    )]
    UnknownPrice { scheme: String, why: String },
    #[error(
        "refused before paying: an L402 invoice is in satoshis and no rate is set \
         (--l402-max-sats-per-usdc / PAYSTILE_AGENT_L402_MAX_SATS_PER_USDC: the most \
         satoshis paid per USDC an invoice buys), so its amount cannot be checked. Nothing \
         was paid."
    )]
    NoSatsRate,
    #[error(
        "refused before paying: the L402 invoice asks {invoice_sat} sat for {buys} USDC, more \
         than the {max_sat} sat that is at {rate} sat per USDC (--l402-max-sats-per-usdc / \
         PAYSTILE_AGENT_L402_MAX_SATS_PER_USDC). Nothing was paid."
    )]
    InvoiceOverRate { invoice_sat: String, buys: Usdc, max_sat: String, rate: u64 },
    #[error(
        "refused before paying: x402 asks for a transfer of {asset} on {network}, which is \
         not USDC where the agent knows it (Base, Base Sepolia) nor a token added with \
         --x402-asset / PAYSTILE_AGENT_X402_ASSETS. Nothing was paid."
    )]
    AssetNotAllowed { network: String, asset: String },
    #[error(
        "refused before paying: the Pay Token is sent only to {allowed} (--pay-token-origin / \
         PAYSTILE_PAY_TOKEN_ORIGINS), not to {origin}. Nothing was paid."
    )]
    PayTokenOrigin { origin: String, allowed: String },
    #[error(
        "refused before paying: earlier this session {origin} {why}; the agent does not pay \
         it again this session. Nothing was paid."
    )]
    Blocked { origin: String, why: String },
    #[error(
        "refused before paying: the L402 invoice buys {buys} USDC at once, more than one \
         purchase may buy, {max} USDC (--l402-max-purchase-usdc / \
         PAYSTILE_AGENT_L402_MAX_PURCHASE_USDC; the per-call maximum when unset). Nothing was \
         paid."
    )]
    OverMaxPurchase { buys: Usdc, max: Usdc },
}

/// Where the per-call maximum of a check came from, for its refusal.
pub const MAX_PRICE_CONFIGURED: &str = "--max-price-usdc / PAYSTILE_AGENT_MAX_PRICE_USDC";
pub const MAX_PRICE_OF_CALL: &str = "lowered for this call by its max_price_usdc";

/// The origin of a URL as allow lists name it: `http://127.0.0.1:10000`, default ports left
/// out, host in lower case.
pub fn origin_of(url: &reqwest::Url) -> String {
    url.origin().ascii_serialization()
}

/// A URL as logs and answers show it: without its user, password, query and fragment,
/// which may carry secrets.
pub fn shown_url(url: &reqwest::Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.set_query(None);
    shown.set_fragment(None);
    shown.to_string()
}

/// An allow-list entry as written by a person, normalized as [`origin_of`] writes origins.
pub fn normalize_origin(entry: &str) -> Option<String> {
    let entry = entry.trim();
    if entry == "*" {
        return Some(entry.to_owned());
    }
    let url = reqwest::Url::parse(entry).ok()?;
    let origin = origin_of(&url);
    // An opaque origin ("null") is what a URL without a host gives.
    (origin != "null").then_some(origin)
}

impl Limits {
    pub fn allows_origin(&self, origin: &str) -> Result<(), Refusal> {
        if self.allow_origins.iter().any(|o| o == "*" || o == origin) {
            return Ok(());
        }
        let allowed = if self.allow_origins.is_empty() {
            "none: the list is empty".to_owned()
        } else {
            self.allow_origins.join(", ")
        };
        Err(Refusal::OriginNotAllowed { origin: origin.to_owned(), allowed })
    }

    /// Whether x402 may transfer `asset` on `chain_id`: USDC where the protocol knows it, or
    /// a token added to the list.
    pub fn allows_x402_asset(&self, chain_id: u64, asset: Address) -> bool {
        x402::is_known_usdc(chain_id, asset)
            || self.x402_assets.contains(&X402Asset { chain_id, address: asset })
    }

    /// The most an L402 invoice may ask, in millisatoshi, for `buys` USDC: at the rate,
    /// rounded up to a whole millisatoshi as a paystile gateway rounds its invoices.
    pub fn l402_max_msat(&self, buys: Usdc) -> Result<u64, Refusal> {
        let rate = self.l402_max_sats_per_usdc.ok_or(Refusal::NoSatsRate)?;
        // 1 micro-USDC buys rate / 1000 msat.
        let msat = (u128::from(buys.micros()) * u128::from(rate)).div_ceil(1000);
        Ok(u64::try_from(msat).unwrap_or(u64::MAX))
    }

    /// What an L402 invoice that states nothing in USDC is worth at the rate: its amount in
    /// USDC, rounded up to a whole micro-USDC.
    pub fn l402_value(&self, invoice_msat: u64) -> Result<Usdc, Refusal> {
        let rate = self.l402_max_sats_per_usdc.ok_or(Refusal::NoSatsRate)?;
        let micros = (u128::from(invoice_msat) * 1000).div_ceil(u128::from(rate.max(1)));
        Ok(u64::try_from(micros).ok().and_then(Usdc::from_micros).unwrap_or(Usdc::MAX))
    }

    /// Checks an L402 invoice of `invoice_msat` that buys `buys` USDC against the most one
    /// purchase may buy and the rate: the fee the wallet may add within it, in millisatoshi.
    pub fn check_invoice(&self, invoice_msat: u64, buys: Usdc) -> Result<u64, Refusal> {
        if let Some(max) = self.l402_max_purchase.or(self.max_price)
            && buys > max
        {
            return Err(Refusal::OverMaxPurchase { buys, max });
        }
        let max_msat = self.l402_max_msat(buys)?;
        if invoice_msat > max_msat {
            return Err(Refusal::InvoiceOverRate {
                invoice_sat: sats(invoice_msat),
                buys,
                max_sat: sats(max_msat),
                rate: self.l402_max_sats_per_usdc.unwrap_or_default(),
            });
        }
        Ok(max_msat - invoice_msat)
    }

    /// Checks one call's price against the per-call maximum, lowered by `call_max`.
    pub fn check_price(
        &self,
        scheme: &str,
        price: Usdc,
        call_max: Option<Usdc>,
    ) -> Result<(), Refusal> {
        let max = match (call_max, self.max_price) {
            (Some(call), Some(max)) if call >= max => Some((max, MAX_PRICE_CONFIGURED)),
            (Some(call), _) => Some((call, MAX_PRICE_OF_CALL)),
            (None, max) => max.map(|max| (max, MAX_PRICE_CONFIGURED)),
        };
        match max {
            Some((max, set_by)) if price > max => {
                Err(Refusal::OverMaxPrice { scheme: scheme.to_owned(), price, max, set_by })
            }
            _ => Ok(()),
        }
    }

    /// Checks one payment: `price` is what the call costs (the per-call maximum's measure),
    /// `amount` what is paid now (more than the price when it buys a budget, as L402 does),
    /// against `spent` so far. `call_max` lowers the per-call maximum for this call (never
    /// raises it).
    pub fn check(
        &self,
        scheme: &str,
        price: Usdc,
        amount: Usdc,
        spent: Usdc,
        call_max: Option<Usdc>,
    ) -> Result<(), Refusal> {
        self.check_price(scheme, price, call_max)?;
        let budget = self.budget.ok_or(Refusal::NoBudget)?;
        let remaining = budget.saturating_sub(spent);
        if amount > remaining {
            return Err(Refusal::OverBudget {
                scheme: scheme.to_owned(),
                amount,
                remaining,
                budget,
                spent,
            });
        }
        Ok(())
    }
}

/// Millisatoshi as satoshis: `3`, `3.5`, `0.001`.
fn sats(msat: u64) -> String {
    let (whole, rest) = (msat / 1000, msat % 1000);
    if rest == 0 {
        whole.to_string()
    } else {
        format!("{whole}.{rest:03}").trim_end_matches('0').to_owned()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn usdc(s: &str) -> Usdc {
        s.parse().unwrap()
    }

    fn limits() -> Limits {
        Limits {
            budget: Some(usdc("0.005")),
            max_price: Some(usdc("0.002")),
            allow_origins: vec!["http://127.0.0.1:10000".into()],
            ..Limits::default()
        }
    }

    #[test]
    fn a_payment_within_every_limit_passes_and_each_limit_refuses_alone() {
        let limits = limits();
        let check = |price, amount, spent, call| limits.check("x402", price, amount, spent, call);
        assert_eq!(check(usdc("0.002"), usdc("0.002"), usdc("0.003"), None), Ok(()));
        assert_eq!(
            check(usdc("0.002001"), usdc("0.002001"), Usdc::ZERO, None),
            Err(Refusal::OverMaxPrice {
                scheme: "x402".into(),
                price: usdc("0.002001"),
                max: usdc("0.002"),
                set_by: MAX_PRICE_CONFIGURED,
            })
        );
        // A call's own maximum lowers the configured one, and its refusal says so; it never
        // raises it.
        let lowered = check(usdc("0.0015"), usdc("0.0015"), Usdc::ZERO, Some(usdc("0.001")));
        let message = lowered.unwrap_err().to_string();
        assert!(message.contains("maximum of 0.001000 USDC (lowered for this call"), "{message}");
        let raised = check(usdc("0.003"), usdc("0.003"), Usdc::ZERO, Some(usdc("1")));
        assert!(matches!(raised, Err(Refusal::OverMaxPrice { set_by: MAX_PRICE_CONFIGURED, .. })));
        let over = check(usdc("0.002"), usdc("0.002"), usdc("0.003001"), None);
        assert_eq!(
            over,
            Err(Refusal::OverBudget {
                scheme: "x402".into(),
                amount: usdc("0.002"),
                remaining: usdc("0.001999"),
                budget: usdc("0.005"),
                spent: usdc("0.003001"),
            })
        );
        let message = over.unwrap_err().to_string();
        assert!(message.contains("0.001999 USDC left") && message.contains("Nothing was paid"));
        // L402 buys a budget: the per-call maximum looks at the call's price, the session
        // budget at what is paid.
        assert_eq!(limits.check("L402", usdc("0.001"), usdc("0.005"), Usdc::ZERO, None), Ok(()));
        assert!(limits.check("L402", usdc("0.001"), usdc("0.006"), Usdc::ZERO, None).is_err());
        let no_budget = Limits { budget: None, ..limits.clone() };
        assert_eq!(
            no_budget.check("x402", Usdc::ZERO, Usdc::ZERO, Usdc::ZERO, None),
            Err(Refusal::NoBudget)
        );
    }

    #[test]
    fn an_invoice_is_paid_only_within_the_rate_and_no_rate_pays_none() {
        let limits = Limits {
            l402_max_sats_per_usdc: Some(1000),
            l402_max_purchase: Some(usdc("0.003")),
            ..limits()
        };
        // One purchase buys at most its own maximum, else the per-call maximum.
        assert_eq!(
            limits.check_invoice(1, usdc("0.003001")),
            Err(Refusal::OverMaxPurchase { buys: usdc("0.003001"), max: usdc("0.003") })
        );
        let by_call = Limits { l402_max_purchase: None, ..limits.clone() };
        assert!(matches!(
            by_call.check_invoice(1, usdc("0.002001")),
            Err(Refusal::OverMaxPurchase { .. })
        ));
        // 0.003 USDC at 1000 sat/USDC: 3 sat; the 1 sat left is the routing fee's room.
        assert_eq!(limits.check_invoice(2_000, usdc("0.003")), Ok(1_000));
        assert_eq!(limits.check_invoice(3_000, usdc("0.003")), Ok(0));
        let over = limits.check_invoice(3_001, usdc("0.003")).unwrap_err();
        assert_eq!(
            over,
            Refusal::InvoiceOverRate {
                invoice_sat: "3.001".into(),
                buys: usdc("0.003"),
                max_sat: "3".into(),
                rate: 1000,
            }
        );
        assert!(over.to_string().contains("asks 3.001 sat for 0.003000 USDC"), "{over}");
        // Rounded up to a whole msat, as a gateway rounds its invoice: 0.0000015 USDC is not
        // representable, but 1 micro-USDC at 1500 sat/USDC is 1.5 msat, so 2 msat pass.
        let odd = Limits { l402_max_sats_per_usdc: Some(1500), ..limits.clone() };
        assert_eq!(odd.check_invoice(2, usdc("0.000001")), Ok(0));
        assert!(odd.check_invoice(3, usdc("0.000001")).is_err());
        // An invoice stating nothing in USDC is worth its sats at the rate, rounded up.
        assert_eq!(limits.l402_value(3_000), Ok(usdc("0.003")));
        assert_eq!(limits.l402_value(3_001), Ok(usdc("0.003001")));
        assert_eq!(limits.l402_value(u64::MAX), Ok(Usdc::MAX));
        let no_rate = self::limits();
        assert_eq!(no_rate.check_invoice(1, usdc("0.001")), Err(Refusal::NoSatsRate));
        assert_eq!(no_rate.l402_value(1), Err(Refusal::NoSatsRate));
        let huge = Limits { l402_max_sats_per_usdc: Some(u64::MAX), ..limits };
        assert_eq!(huge.l402_max_msat(Usdc::MAX), Ok(u64::MAX));
    }

    #[test]
    fn x402_moves_known_usdc_and_listed_tokens_only() {
        let base: Address = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913".parse().unwrap();
        let anvil: Address = "0x5FbDB2315678afecb367f032d93F642f64180aa3".parse().unwrap();
        let limits = limits();
        assert!(limits.allows_x402_asset(8453, base));
        assert!(!limits.allows_x402_asset(84532, base) && !limits.allows_x402_asset(31337, anvil));
        let listed: X402Asset =
            "eip155:31337/erc20:0x5FbDB2315678afecb367f032d93F642f64180aa3".parse().unwrap();
        assert_eq!(listed, X402Asset { chain_id: 31337, address: anvil });
        assert_eq!(listed.to_string().parse::<X402Asset>(), Ok(listed));
        let limits = Limits { x402_assets: vec![listed], ..limits };
        assert!(limits.allows_x402_asset(31337, anvil) && !limits.allows_x402_asset(1, anvil));
        for bad in [
            "",
            "eip155:31337",
            "base/erc20:0x5FbDB2315678afecb367f032d93F642f64180aa3",
            "eip155:x/erc20:0x5FbDB2315678afecb367f032d93F642f64180aa3",
            "eip155:31337/erc721:0x5FbDB2315678afecb367f032d93F642f64180aa3",
            "eip155:31337/erc20:0x5FbD",
        ] {
            let error = bad.parse::<X402Asset>().unwrap_err();
            assert!(error.contains("CAIP-19"), "{bad}: {error}");
        }
    }

    #[test]
    fn urls_are_shown_without_secrets() {
        let url = reqwest::Url::parse("https://user:pw@api.example/v1/x?key=s3cret#frag").unwrap();
        assert_eq!(shown_url(&url), "https://api.example/v1/x");
    }

    #[test]
    fn origins_are_compared_normalized_and_an_empty_list_allows_none() {
        let limits = limits();
        assert_eq!(limits.allows_origin("http://127.0.0.1:10000"), Ok(()));
        assert!(limits.allows_origin("http://127.0.0.1:10001").is_err());
        assert!(limits.allows_origin("https://127.0.0.1:10000").is_err());
        let empty = Limits { allow_origins: vec![], ..limits.clone() };
        let refusal = empty.allows_origin("http://127.0.0.1:10000").unwrap_err();
        assert!(refusal.to_string().contains("the list is empty"), "{refusal}");
        let any = Limits { allow_origins: vec!["*".into()], ..limits };
        assert_eq!(any.allows_origin("https://api.example"), Ok(()));
        assert_eq!(
            normalize_origin("HTTP://API.Example:80/path"),
            Some("http://api.example".into())
        );
        assert_eq!(normalize_origin("https://api.example:443"), Some("https://api.example".into()));
        assert_eq!(
            normalize_origin(" http://127.0.0.1:10000/ "),
            Some("http://127.0.0.1:10000".into())
        );
        assert_eq!(normalize_origin("not a url"), None);
        assert_eq!(normalize_origin("*"), Some("*".into()));
    }
}
