//! What the agent may pay, checked before anything is paid: a session budget, a per-call
//! maximum and the origins it may pay at all. Each refusal says which limit, the price and
//! what is left, so that a model reading it can decide what to do next.

use paystile_protocol::Usdc;
use serde::Serialize;

/// The limits. Every one fails closed: no budget is a budget of zero, an empty allow list
/// allows no origin. An agent handed a wallet and no limits must not pay whoever answers 402
/// (a prompt-injected URL included); `*` in the allow list is the explicit opt-out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// The most the session may pay in all.
    pub budget: Option<Usdc>,
    /// The most one call may cost.
    pub max_price: Option<Usdc>,
    /// Origins (`scheme://host[:port]`, as [`origin_of`] writes them), or `*`.
    pub allow_origins: Vec<String>,
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
         maximum of {max} USDC (--max-price-usdc / PAYSTILE_AGENT_MAX_PRICE_USDC). Nothing \
         was paid."
    )]
    OverMaxPrice { scheme: String, price: Usdc, max: Usdc },
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
}

/// The origin of a URL as allow lists name it: `http://127.0.0.1:10000`, default ports left
/// out, host in lower case.
pub fn origin_of(url: &reqwest::Url) -> String {
    url.origin().ascii_serialization()
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

    /// Checks one payment: `price` is what the call costs (the per-call maximum's measure),
    /// `amount` what is paid now (more than the price when it buys a budget, as L402 does),
    /// against `spent` so far.
    pub fn check(
        &self,
        scheme: &str,
        price: Usdc,
        amount: Usdc,
        spent: Usdc,
    ) -> Result<(), Refusal> {
        if let Some(max) = self.max_price
            && price > max
        {
            return Err(Refusal::OverMaxPrice { scheme: scheme.to_owned(), price, max });
        }
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
        }
    }

    #[test]
    fn a_payment_within_every_limit_passes_and_each_limit_refuses_alone() {
        let limits = limits();
        assert_eq!(limits.check("x402", usdc("0.002"), usdc("0.002"), usdc("0.003")), Ok(()));
        assert_eq!(
            limits.check("x402", usdc("0.002001"), usdc("0.002001"), Usdc::ZERO),
            Err(Refusal::OverMaxPrice {
                scheme: "x402".into(),
                price: usdc("0.002001"),
                max: usdc("0.002")
            })
        );
        let over = limits.check("x402", usdc("0.002"), usdc("0.002"), usdc("0.003001"));
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
        assert_eq!(limits.check("L402", usdc("0.001"), usdc("0.005"), Usdc::ZERO), Ok(()));
        assert!(limits.check("L402", usdc("0.001"), usdc("0.006"), Usdc::ZERO).is_err());
        let no_budget = Limits { budget: None, ..limits };
        assert_eq!(
            no_budget.check("x402", Usdc::ZERO, Usdc::ZERO, Usdc::ZERO),
            Err(Refusal::NoBudget)
        );
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
