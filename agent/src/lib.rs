//! paystile's agent: an HTTP client that pays a 402 with what it was given (a Pay Token, an
//! L402 invoice paid through a Lightning wallet, an x402 `exact` transfer signed with a local
//! key), within limits checked before anything is paid, and that keeps a log of every
//! payment. [`Agent`] is the library the CLI and the MCP server ([`mcp`]) sit on.
//!
//! What a payment counts against the limits:
//! - Pay Token: the per-call price is the 402 body's `price`; what is spent is the answer's
//!   `X-Amount-Usdc` (the charge; zero when released), else the price for a 2xx. The token
//!   is sent only to the origins it was given for ([`PayToken::origins`]).
//! - x402: the offer's `amount`, as micro-USDC. Only USDC where the protocol knows it (Base,
//!   Base Sepolia) and tokens listed in [`Limits::x402_assets`] are transferred: an amount in
//!   atomic units means USDC only in a 6-decimal USD token.
//! - L402: what the payment buys, in USDC: the macaroon's `<service>_budget_usdc` caveat
//!   (paystile's), else the body's price, else the invoice's satoshis at the agent's rate.
//!   The invoice (a signed BOLT11) must be for the macaroon's payment hash and ask at most
//!   [`Limits::l402_max_sats_per_usdc`] per USDC bought; routing fees are paid within that.
//!   The per-call maximum applies to the body's price (else to what is bought).
//!
//! At most one payment per [`Agent::fetch`]: a 402 after paying is an error, never a second
//! payment, and the agent pays that (origin, service) nothing more this session; so does a
//! payment whose outcome is unknown (a wallet that timed out). Credentials that pay more
//! calls (a Pay Token, an L402) are cached per (origin, service) for the agent's lifetime,
//! and sent at once on a path whose 402 named that service; concurrent fetches buy one L402
//! per (origin, service), not one each. x402 payments are one-time.

pub mod lightning;
pub mod limits;
pub mod mcp;
pub mod offers;

use std::collections::{HashMap, VecDeque};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use paystile_protocol::Usdc;
use paystile_protocol::headers;
use paystile_protocol::x402::{self, B256, SigningKey, Terms, Version};
use serde::Serialize;
use sha2::{Digest, Sha256};

pub use lightning::{Lightning, PayError};
pub use limits::{Limits, Refusal, X402Asset, normalize_origin, origin_of, shown_url};
pub use offers::{L402Offer, Offers, X402Offer};

/// The most of a 402's body read: paystile's is under 2 KB with x402's v1 offers.
pub const MAX_402_BODY: usize = 64 * 1024;
/// The most header bytes (names and values) a 402 may carry.
pub const MAX_402_HEADERS: usize = 64 * 1024;
/// The default most of an answer's body read.
pub const DEFAULT_MAX_BODY: usize = 32 * 1024 * 1024;
/// How many 402s [`Agent::last_offers`] keeps.
const OFFERS_KEPT: usize = 16;

/// A way to pay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Scheme {
    #[serde(rename = "payToken")]
    PayToken,
    #[serde(rename = "l402")]
    L402,
    #[serde(rename = "x402")]
    X402,
}

impl std::fmt::Display for Scheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Scheme::PayToken => "Pay Token",
            Scheme::L402 => "L402",
            Scheme::X402 => "x402",
        })
    }
}

/// What the agent pays with. Each is optional: a 402 is paid with the first of the offered
/// schemes it holds, in this order (a Pay Token is prepaid and the cheapest to use; x402
/// pays exactly the call; L402 buys a budget up front).
#[derive(Clone, Default)]
pub struct Wallet {
    pub pay_token: Option<PayToken>,
    pub lightning: Option<Lightning>,
    pub x402_key: Option<SigningKey>,
}

/// A Pay Token and the origins it may be sent to. It is a bearer credential that spends up
/// to its cap: any server it reaches can spend it, so it goes only where it was issued for,
/// never to whichever allowed origin offers Bearer.
#[derive(Clone)]
pub struct PayToken {
    pub token: String,
    /// Origins as [`origin_of`] writes them; `*` is not accepted.
    pub origins: Vec<String>,
}

impl std::fmt::Debug for Wallet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wallet")
            .field("pay_token_origins", &self.pay_token.as_ref().map(|t| &t.origins))
            .field("lightning", &self.lightning)
            .field("x402_key", &self.x402_key.as_ref().map(|k| x402::address_of(k.verifying_key())))
            .finish()
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub wallet: Wallet,
    pub limits: Limits,
    /// The spending log (JSON lines); `None` keeps none.
    pub log: Option<PathBuf>,
    pub max_body_bytes: usize,
    pub timeout: Duration,
}

impl Config {
    pub fn new(wallet: Wallet, limits: Limits, log: Option<PathBuf>) -> Config {
        Config {
            wallet,
            limits,
            log,
            max_body_bytes: DEFAULT_MAX_BODY,
            timeout: Duration::from_secs(60),
        }
    }
}

/// One call to make.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: reqwest::Method,
    pub url: reqwest::Url,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
    /// A per-call maximum for this call only (USDC): it lowers the configured one, never
    /// raises it.
    pub max_price: Option<Usdc>,
}

impl Request {
    pub fn get(url: &str) -> Result<Request, AgentError> {
        Request::new("GET", url)
    }

    pub fn new(method: &str, url: &str) -> Result<Request, AgentError> {
        let method = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|_| AgentError::InvalidRequest(format!("bad method {method:?}")))?;
        let url = reqwest::Url::parse(url)
            .map_err(|e| AgentError::InvalidRequest(format!("bad URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(AgentError::InvalidRequest(format!(
                "not an http(s) URL: {}:…",
                url.scheme()
            )));
        }
        Ok(Request { method, url, headers: Vec::new(), body: None, max_price: None })
    }
}

/// A payment made for one call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Payment {
    /// RFC 3339, UTC.
    pub time: String,
    pub origin: String,
    pub url: String,
    pub scheme: Scheme,
    /// What was paid now: the charge (Pay Token), the budget bought (L402), the transfer
    /// (x402).
    pub amount_usdc: Usdc,
    /// The answer's `X-Charge-Id`.
    pub charge_id: Option<String>,
    /// x402: the transaction in `PAYMENT-RESPONSE`, when it is known.
    pub transaction: Option<String>,
    pub outcome: Outcome,
    /// The request's `Idempotency-Key`: a retry with it is not counted again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// Whether a payment is known to have been made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    Paid,
    /// The wallet or the server stopped answering after the payment was sent: it may have
    /// been made, so it is counted as spent.
    Unknown,
}

/// An answer, and what was paid for it.
#[derive(Clone, Debug)]
pub struct Fetched {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub payment: Option<Payment>,
}

impl Fetched {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("the request to {url} failed: {reason}")]
    Http {
        url: String,
        reason: String,
        /// Whether the request may have reached the server (it was not a connect error).
        reached: bool,
    },
    #[error("the answer from {url} is too large: {what} over {limit} bytes")]
    TooLarge { url: String, what: &'static str, limit: usize },
    #[error("{origin} answered 402 with a malformed challenge ({problems}); nothing was paid")]
    MalformedChallenge { origin: String, problems: String },
    #[error(
        "{origin} answered 402 offering {offered}, and the agent holds {held}; nothing was paid"
    )]
    NoPayableScheme { origin: String, offered: String, held: String },
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("paying the L402 invoice failed: {0}; nothing was paid")]
    Lightning(String),
    #[error(
        "the {scheme} payment's outcome is unknown ({detail}): {amount} USDC is counted as \
         spent and logged; {next}"
    )]
    OutcomeUnknown { scheme: Scheme, amount: Usdc, detail: String, next: &'static str },
    #[error(
        "the server answered 402 again after payment ({scheme}, {amount} USDC paid); not paying \
         again: {detail}"
    )]
    PaidButRefused { scheme: Scheme, amount: Usdc, detail: String },
    #[error(
        "{origin} answered 402 to the {scheme} the agent holds (spent, revoked, or not for this \
         service), and it holds nothing else it offers; nothing was paid: {detail}"
    )]
    CredentialRefused { origin: String, scheme: Scheme, detail: String },
    #[error("the payment was made but its retry failed: {0}")]
    PaidButFailed(String),
    #[error("cannot write the spending log {path}: {reason}")]
    Log { path: String, reason: String },
}

/// A credential kept for an (origin, service).
#[derive(Clone)]
struct Cached {
    scheme: Scheme,
    /// The `Authorization` value.
    authorization: String,
}

/// What a path's last 402 said: its service and the price of a call (routes of one service
/// may be priced apart).
#[derive(Clone)]
struct Route {
    service: String,
    price: Option<Usdc>,
}

/// An (origin, service).
type Seller = (String, String);

#[derive(Default)]
struct State {
    spent: Usdc,
    /// Amounts being paid right now: counted against the budget until they settle.
    reserved: Usdc,
    payments: Vec<Payment>,
    last_offers: VecDeque<Offers>,
    cache: HashMap<Seller, Cached>,
    /// Which service a path of an origin belongs to, as its 402 said.
    /// Keyed by (method, origin, path): a gateway prices routes per method.
    routes: HashMap<(String, String, String), Route>,
    /// Origins not paid again this session, and why. By origin: the service is the
    /// server's to name.
    blocked: HashMap<String, String>,
    /// One purchase at a time per seller.
    purchases: HashMap<Seller, Arc<tokio::sync::Mutex<()>>>,
}

/// The agent: a wallet, limits, a spending log, and credentials cached for its lifetime.
pub struct Agent {
    config: Config,
    http: reqwest::Client,
    state: Mutex<State>,
}

/// An answer as read, before it is returned or paid.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn into_fetched(self, payment: Option<Payment>) -> Fetched {
        Fetched { status: self.status, headers: self.headers, body: self.body, payment }
    }
}

/// What a chosen payment sends, and counts.
struct Plan {
    scheme: Scheme,
    /// What is counted against the budget now.
    amount: Usdc,
    /// The call's price (what a Pay Token call is counted when the answer does not say).
    price: Usdc,
    how: How,
}

enum How {
    PayToken(String),
    X402(X402Offer),
    /// The invoice, and the most the wallet may pay in routing fees (millisatoshi).
    L402(L402Offer, u64),
}

/// A cached credential's call: answered, or refused with a 402 (the credential is spent).
enum Sent {
    Answered(Fetched),
    Refused(Answer),
}

impl Agent {
    /// An agent; fails if the spending log cannot be opened, since it must never pay
    /// without recording it.
    pub fn new(config: Config) -> Result<Agent, AgentError> {
        if let Some(path) = &config.log {
            open_log(path)?;
        }
        // No redirects: a credential or payment header must not follow a redirect elsewhere.
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.timeout)
            .build()
            .map_err(|e| AgentError::InvalidRequest(format!("HTTP client: {e}")))?;
        Ok(Agent { config, http, state: Mutex::new(State::default()) })
    }

    pub fn limits(&self) -> &Limits {
        &self.config.limits
    }

    /// What this session has paid.
    pub fn spent(&self) -> Usdc {
        self.state().spent
    }

    /// What is left of the session budget (zero with none set).
    pub fn remaining(&self) -> Usdc {
        let state = self.state();
        self.config
            .limits
            .budget
            .unwrap_or_default()
            .saturating_sub(state.spent.checked_add(state.reserved).unwrap_or(Usdc::MAX))
    }

    /// Every payment this session made, oldest first.
    pub fn payments(&self) -> Vec<Payment> {
        self.state().payments.clone()
    }

    /// What the last 402s offered, newest last.
    pub fn last_offers(&self) -> Vec<Offers> {
        self.state().last_offers.iter().cloned().collect()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves consistent sums (each update is one
        // statement), so the state stays usable.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Calls `request`; on a 402, pays it once with what the wallet holds and the limits
    /// allow, and calls again once with the credential.
    pub async fn fetch(&self, request: Request) -> Result<Fetched, AgentError> {
        let origin = origin_of(&request.url);
        let path = request.url.path().to_owned();
        // The cached credential this fetch sent and saw refused: not sent or paid with again
        // in this fetch.
        let mut refused: Option<Cached> = None;
        let mut answer = None;
        if let Some((route, cached)) = self.cached_for_path(&request, &origin, &path) {
            let seller = (origin.clone(), route.service);
            match self.send_cached(&request, &seller, &cached, route.price).await? {
                Sent::Answered(fetched) => return Ok(fetched),
                Sent::Refused(paywall) => (refused, answer) = (Some(cached), Some(paywall)),
            }
        }
        let mut answer = match answer {
            Some(answer) => answer,
            None => {
                let answer = self.send(&request, None).await?;
                if answer.status != 402 {
                    return Ok(answer.into_fetched(None));
                }
                answer
            }
        };
        loop {
            let offers = self.offers(&request, &origin, &answer);
            self.remember(&request, &offers, &path);
            let seller = (origin.clone(), offers.service());
            // One purchase at a time per seller: a credential a concurrent fetch bought
            // meanwhile (or one bought on another path of this service) is used instead; so
            // is one bought while this fetch's was being refused.
            let purchase = self.purchase_lock(&seller).lock_owned().await;
            if let Some(cached) = self.cached(&seller)
                && refused.as_ref().is_none_or(|r| r.authorization != cached.authorization)
            {
                drop(purchase);
                match self.send_cached(&request, &seller, &cached, offers.price).await? {
                    Sent::Answered(fetched) => return Ok(fetched),
                    Sent::Refused(paywall) => {
                        (refused, answer) = (Some(cached), paywall);
                        continue;
                    }
                }
            }
            let pay_token_refused = refused.as_ref().is_some_and(|r| r.scheme == Scheme::PayToken);
            let plan = match self.plan(&offers, pay_token_refused, request.max_price) {
                Ok(plan) => plan,
                // Nothing else to pay with: the refused credential is the news.
                Err(AgentError::NoPayableScheme { .. }) if let Some(refused) = refused => {
                    return Err(AgentError::CredentialRefused {
                        origin,
                        scheme: refused.scheme,
                        detail: excerpt(&answer.body),
                    });
                }
                Err(e) => return Err(e),
            };
            // Only an L402 buys what a concurrent fetch could use: its lock is kept until
            // the credential is cached.
            let _purchase = (plan.scheme == Scheme::L402).then_some(purchase);
            return self.pay_and_retry(&request, &offers, plan).await;
        }
    }

    /// Sends `request` with a cached credential. A Pay Token's call is checked against the
    /// limits at `price`, the one its path's 402 stated; an L402's was paid when bought.
    async fn send_cached(
        &self,
        request: &Request,
        seller: &Seller,
        cached: &Cached,
        price: Option<Usdc>,
    ) -> Result<Sent, AgentError> {
        let limits = &self.config.limits;
        limits.allows_origin(&seller.0)?;
        // A blocked origin is not paid, with a cached Pay Token either.
        if cached.scheme == Scheme::PayToken
            && let Some(why) = self.state().blocked.get(&seller.0)
        {
            let (origin, why) = (seller.0.clone(), why.clone());
            return Err(Refusal::Blocked { origin, why }.into());
        }
        // What is held against the budget, and the call's price (a Pay Token's; an L402's
        // calls were paid when it was bought).
        let (reserve, price) = match (cached.scheme, price) {
            (Scheme::PayToken, Some(price)) => {
                // The retry of a call already counted (its answer was lost) costs nothing more.
                let amount = if unresolved(&mut self.state().payments, request).is_some() {
                    Usdc::ZERO
                } else {
                    price
                };
                (self.reserve(Scheme::PayToken, price, amount, request.max_price)?, price)
            }
            (Scheme::PayToken, None) => {
                let why = "the 402 states no price".to_owned();
                return Err(
                    Refusal::UnknownPrice { scheme: Scheme::PayToken.to_string(), why }.into()
                );
            }
            // Prepaid when bought; the call's price still must fit the per-call maximum.
            (Scheme::L402 | Scheme::X402, price) => {
                if let Some(price) = price {
                    limits.check_price(&cached.scheme.to_string(), price, request.max_price)?;
                }
                (Usdc::ZERO, Usdc::ZERO)
            }
        };
        let answer = match self.send(request, Some(&cached.authorization)).await {
            Ok(answer) => answer,
            Err(e) => return Err(self.settle_failed(request, cached.scheme, reserve, e)?),
        };
        if answer.status == 402 {
            // Spent or revoked: forgotten, and this 402 is read as a fresh one.
            self.settle(reserve, Usdc::ZERO);
            self.forget(seller, &cached.authorization);
            return Ok(Sent::Refused(answer));
        }
        let payment = match cached.scheme {
            Scheme::PayToken => {
                let amount = self.charged(request, &answer, price);
                self.settle(reserve, amount);
                let payment = self.payment(request, Scheme::PayToken, amount, &answer);
                self.record(&payment)?;
                // Nothing charged (released, or a replay): nothing paid.
                (!amount.is_zero()).then_some(payment)
            }
            Scheme::L402 | Scheme::X402 => None,
        };
        Ok(Sent::Answered(answer.into_fetched(payment)))
    }

    /// Ends the reservation of a Pay Token call whose request failed, and says what the
    /// failure means: if the request may have reached the gateway (it failed after sending,
    /// or its answer was too large to read), it may have been charged, so its price counts
    /// and is logged as unknown.
    fn settle_failed(
        &self,
        request: &Request,
        scheme: Scheme,
        reserved: Usdc,
        error: AgentError,
    ) -> Result<AgentError, AgentError> {
        let reached = matches!(error, AgentError::Http { reached: true, .. })
            || matches!(error, AgentError::TooLarge { what: "the body", .. });
        // A retry of a call already counted as unknown is not counted again.
        let counted = unresolved(&mut self.state().payments, request).is_some();
        if scheme != Scheme::PayToken || !reached || reserved.is_zero() || counted {
            self.settle(reserved, Usdc::ZERO);
            return Ok(error);
        }
        self.settle(reserved, reserved);
        self.record(&self.new_payment(request, scheme, reserved, Outcome::Unknown))?;
        Ok(AgentError::OutcomeUnknown {
            scheme,
            amount: reserved,
            detail: error.to_string(),
            next: "retry with the same Idempotency-Key and a paystile gateway charges the call \
                   once",
        })
    }

    /// The credential cached for the service a 402 named for `path` at `origin`. A path no
    /// 402 has named gets none: the price of its call is not known yet.
    fn cached_for_path(
        &self,
        request: &Request,
        origin: &str,
        path: &str,
    ) -> Option<(Route, Cached)> {
        let state = self.state();
        let key = (request.method.to_string(), origin.to_owned(), path.to_owned());
        let route = state.routes.get(&key)?;
        let cached = state.cache.get(&(origin.to_owned(), route.service.clone()))?;
        Some((route.clone(), cached.clone()))
    }

    fn cached(&self, seller: &Seller) -> Option<Cached> {
        self.state().cache.get(seller).cloned()
    }

    /// Forgets `seller`'s credential if it is still `authorization` (a concurrent fetch may
    /// have bought a new one).
    fn forget(&self, seller: &Seller, authorization: &str) {
        let mut state = self.state();
        if state.cache.get(seller).is_some_and(|c| c.authorization == authorization) {
            state.cache.remove(seller);
        }
    }

    fn purchase_lock(&self, seller: &Seller) -> Arc<tokio::sync::Mutex<()>> {
        self.state().purchases.entry(seller.clone()).or_default().clone()
    }

    fn block(&self, origin: &str, why: String) {
        self.state().blocked.entry(origin.to_owned()).or_insert(why);
    }

    fn offers(&self, request: &Request, origin: &str, answer: &Answer) -> Offers {
        let www: Vec<&str> = answer
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(headers::WWW_AUTHENTICATE))
            .map(|(_, v)| v.as_str())
            .collect();
        offers::read(
            &shown_url(&request.url),
            origin,
            &www,
            answer.header(headers::PAYMENT_REQUIRED),
            &answer.body,
        )
    }

    fn remember(&self, request: &Request, offers: &Offers, path: &str) {
        let mut state = self.state();
        let route = Route { service: offers.service(), price: offers.price };
        let key = (request.method.to_string(), offers.origin.clone(), path.to_owned());
        state.routes.insert(key, route);
        if state.last_offers.len() == OFFERS_KEPT {
            state.last_offers.pop_front();
        }
        state.last_offers.push_back(offers.clone());
    }

    /// Chooses how to pay `offers`: the first scheme offered that the wallet holds and the
    /// limits allow. Nothing is paid here; the amount is reserved against the budget.
    fn plan(
        &self,
        offers: &Offers,
        pay_token_refused: bool,
        call_max: Option<Usdc>,
    ) -> Result<Plan, AgentError> {
        let wallet = &self.config.wallet;
        let limits = &self.config.limits;
        let origin = &offers.origin;
        // (scheme, the call's price, what is paid now or why it may not be, how)
        let mut candidates: Vec<(Scheme, Usdc, Result<Usdc, Refusal>, How)> = Vec::new();
        let unknown = |scheme: Scheme, why: &str| Refusal::UnknownPrice {
            scheme: scheme.to_string(),
            why: why.to_owned(),
        };
        if let Some(pay_token) = &wallet.pay_token
            && offers.bearer
            && !pay_token_refused
        {
            let price = if !pay_token.origins.contains(origin) {
                Err(Refusal::PayTokenOrigin {
                    origin: origin.clone(),
                    allowed: pay_token.origins.join(", "),
                })
            } else {
                offers.price.ok_or_else(|| unknown(Scheme::PayToken, "the 402 states no price"))
            };
            let how = How::PayToken(pay_token.token.clone());
            candidates.push((Scheme::PayToken, offers.price.unwrap_or_default(), price, how));
        }
        if wallet.x402_key.is_some() {
            for offer in &offers.x402 {
                let price = if !limits.allows_x402_asset(offer.terms.chain_id, offer.terms.asset) {
                    Err(Refusal::AssetNotAllowed {
                        network: offer.network.clone(),
                        asset: offer.asset.clone(),
                    })
                } else {
                    offer.price().ok_or_else(|| unknown(Scheme::X402, "the amount is out of range"))
                };
                let shown = offer.price().unwrap_or(Usdc::MAX);
                candidates.push((Scheme::X402, shown, price, How::X402(offer.clone())));
            }
        }
        if wallet.lightning.is_some()
            && let Some(offer) = &offers.l402
        {
            if let (Some(budget), Some(price)) = (offer.budget, offers.price)
                && budget < price
            {
                return Err(AgentError::MalformedChallenge {
                    origin: origin.clone(),
                    problems: format!(
                        "the L402 invoice buys {budget} USDC, less than one call's price of {price} USDC"
                    ),
                });
            }
            // What the payment buys: the macaroon's budget caveat, else the body's price,
            // else the invoice's worth at the rate. The invoice must be within the rate.
            let invoice_msat = offer.invoice_msat.unwrap_or_default();
            let buys = match (offer.invoice_msat, offer.budget.or(offers.price)) {
                (None, _) => Err(unknown(Scheme::L402, "the invoice states no amount")),
                (Some(_), Some(buys)) => Ok(buys),
                (Some(msat), None) => limits.l402_value(msat),
            };
            let fee_limit = buys.clone().and_then(|buys| limits.check_invoice(invoice_msat, buys));
            let price = offers.price.or(offer.budget).or(buys.clone().ok()).unwrap_or_default();
            let how = How::L402(offer.clone(), fee_limit.clone().unwrap_or_default());
            candidates.push((Scheme::L402, price, fee_limit.and(buys), how));
        }
        if candidates.is_empty() {
            if !offers.malformed.is_empty() {
                return Err(AgentError::MalformedChallenge {
                    origin: origin.clone(),
                    problems: offers.malformed.join("; "),
                });
            }
            let offered = offers.scheme_names();
            return Err(AgentError::NoPayableScheme {
                origin: origin.clone(),
                offered: if offered.is_empty() { "no scheme".into() } else { offered.join(", ") },
                held: self.held(),
            });
        }
        limits.allows_origin(origin)?;
        if let Some(why) = self.state().blocked.get(origin) {
            let why = why.clone();
            return Err(AgentError::Refused(Refusal::Blocked { origin: origin.clone(), why }));
        }
        let mut first_refusal = None;
        for (scheme, price, amount, how) in candidates {
            let reserved = amount
                .and_then(|amount| self.reserve(scheme, price, amount, call_max).map(|_| amount));
            match reserved {
                Ok(amount) => {
                    return Ok(Plan { scheme, amount, price, how });
                }
                Err(refusal) => {
                    first_refusal.get_or_insert(refusal);
                }
            }
        }
        Err(first_refusal.map_or_else(
            || AgentError::NoPayableScheme {
                origin: origin.clone(),
                offered: offers.scheme_names().join(", "),
                held: self.held(),
            },
            AgentError::Refused,
        ))
    }

    fn held(&self) -> String {
        let wallet = &self.config.wallet;
        let held: Vec<&str> = [
            wallet.pay_token.as_ref().map(|_| "a Pay Token"),
            wallet.lightning.as_ref().map(|_| "a Lightning wallet (L402)"),
            wallet.x402_key.as_ref().map(|_| "an x402 key"),
        ]
        .into_iter()
        .flatten()
        .collect();
        if held.is_empty() { "nothing to pay with".into() } else { held.join(", ") }
    }

    /// Checks the limits and holds `amount` against the budget, atomically: concurrent
    /// fetches cannot together overspend.
    /// `call_max` lowers the per-call maximum for this call (never raises it).
    fn reserve(
        &self,
        scheme: Scheme,
        price: Usdc,
        amount: Usdc,
        call_max: Option<Usdc>,
    ) -> Result<Usdc, Refusal> {
        let mut state = self.state();
        let committed = state.spent.checked_add(state.reserved).unwrap_or(Usdc::MAX);
        self.config.limits.check(&scheme.to_string(), price, amount, committed, call_max)?;
        state.reserved = state.reserved.checked_add(amount).unwrap_or(Usdc::MAX);
        Ok(amount)
    }

    /// Ends a reservation: `amount` was really paid.
    fn settle(&self, reserved: Usdc, amount: Usdc) {
        let mut state = self.state();
        state.reserved = state.reserved.saturating_sub(reserved);
        state.spent = state.spent.checked_add(amount).unwrap_or(Usdc::MAX);
    }

    async fn pay_and_retry(
        &self,
        request: &Request,
        offers: &Offers,
        plan: Plan,
    ) -> Result<Fetched, AgentError> {
        let Plan { scheme, amount, price, how } = plan;
        let seller = (offers.origin.clone(), offers.service());
        // The one payment of this fetch: from here on, no path pays again.
        let (header, value) = match &how {
            How::PayToken(token) => (headers::AUTHORIZATION, format!("Bearer {token}")),
            How::X402(offer) => {
                let Some(key) = &self.config.wallet.x402_key else {
                    self.settle(amount, Usdc::ZERO);
                    return Err(AgentError::InvalidRequest("no x402 key".into()));
                };
                let now = unix_now();
                let terms = Terms {
                    offer: &offer.terms,
                    amount: offer.amount,
                    window: (0, now + offer.terms.max_timeout_seconds),
                    nonce: B256::from(rand::random::<[u8; 32]>()),
                };
                let version = offer.version();
                let header = match version {
                    Version::V2 => headers::PAYMENT_SIGNATURE,
                    Version::V1 => headers::X_PAYMENT,
                };
                (header, x402::sign(key, &terms, version))
            }
            How::L402(offer, fee_limit_msat) => {
                match self.pay_invoice(offer, *fee_limit_msat).await {
                    Ok(value) => {
                        // Bought: cached before anything else can fail, so that no later
                        // fetch buys it again.
                        let cached = Cached { scheme, authorization: value.clone() };
                        self.state().cache.insert(seller.clone(), cached);
                        (headers::AUTHORIZATION, value)
                    }
                    Err(PayError::NotPaid(e)) => {
                        self.settle(amount, Usdc::ZERO);
                        return Err(AgentError::Lightning(e));
                    }
                    Err(PayError::Unknown(detail)) => {
                        self.settle(amount, amount);
                        self.block(&seller.0, "left an L402 payment's outcome unknown".into());
                        self.record(&self.new_payment(request, scheme, amount, Outcome::Unknown))?;
                        return Err(AgentError::OutcomeUnknown {
                            scheme,
                            amount,
                            detail,
                            next: NOT_AGAIN,
                        });
                    }
                }
            }
        };
        let answer = match self.send_with(request, header, &value).await {
            Ok(answer) => answer,
            Err(e) if scheme == Scheme::PayToken => {
                return Err(self.settle_failed(request, scheme, amount, e)?);
            }
            Err(e) if scheme == Scheme::L402 => {
                // Paid, and its credential is kept for the next call.
                self.settle(amount, amount);
                self.record(&self.new_payment(request, scheme, amount, Outcome::Paid))?;
                return Err(AgentError::PaidButFailed(e.to_string()));
            }
            Err(e @ AgentError::Http { reached: false, .. }) => {
                // The x402 authorization never left.
                self.settle(amount, Usdc::ZERO);
                return Err(e);
            }
            Err(e) => {
                // The x402 authorization was sent and may be settled.
                self.settle(amount, amount);
                self.block(&seller.0, "left an x402 payment's outcome unknown".into());
                self.record(&self.new_payment(request, scheme, amount, Outcome::Unknown))?;
                let detail = e.to_string();
                return Err(AgentError::OutcomeUnknown { scheme, amount, detail, next: NOT_AGAIN });
            }
        };
        let paid = match scheme {
            Scheme::PayToken => self.charged(request, &answer, price),
            Scheme::L402 | Scheme::X402 => amount,
        };
        self.settle(amount, paid);
        if answer.status == 402 {
            self.forget(&seller, &value);
            if scheme != Scheme::PayToken {
                self.block(&seller.0, format!("answered 402 after a {scheme} payment"));
            }
            self.record(&self.payment(request, scheme, paid, &answer))?;
            let detail = excerpt(&answer.body);
            return Err(AgentError::PaidButRefused { scheme, amount: paid, detail });
        }
        if scheme == Scheme::PayToken {
            // A Pay Token pays more calls; x402 payments are one-time (an L402 is cached).
            let cached = Cached { scheme, authorization: value };
            self.state().cache.insert(seller, cached);
        }
        let payment = self.payment(request, scheme, paid, &answer);
        self.record(&payment)?;
        Ok(answer.into_fetched((!paid.is_zero()).then_some(payment)))
    }

    /// What a Pay Token call was charged: the gateway's `X-Amount-Usdc`, else the price for
    /// a 2xx (a server that does not say is assumed to charge). Nothing for a retry with an
    /// Idempotency-Key this session already counted at the origin (paid, or outcome
    /// unknown): a paystile gateway charges a key once.
    fn charged(&self, request: &Request, answer: &Answer, price: Usdc) -> Usdc {
        let origin = origin_of(&request.url);
        let charge_id = answer.header(headers::CHARGE_ID);
        let mut state = self.state();
        // A replay names the first call's charge.
        if charge_id.is_some()
            && state.payments.iter().any(|p| {
                p.scheme == Scheme::PayToken
                    && p.origin == origin
                    && p.charge_id.as_deref() == charge_id
            })
        {
            return Usdc::ZERO;
        }
        // The retry of a call whose answer was lost, already counted: settled now.
        if let Some(unknown) = unresolved(&mut state.payments, request) {
            unknown.charge_id = Some(charge_id.unwrap_or_default().to_owned());
            return Usdc::ZERO;
        }
        drop(state);
        match answer.header(headers::AMOUNT_USDC).and_then(|a| a.trim().parse().ok()) {
            Some(amount) => amount,
            None if (200..300).contains(&answer.status) => price,
            None => Usdc::ZERO,
        }
    }

    async fn pay_invoice(
        &self,
        offer: &L402Offer,
        fee_limit_msat: u64,
    ) -> Result<String, PayError> {
        let lightning = self
            .config
            .wallet
            .lightning
            .as_ref()
            .ok_or_else(|| PayError::NotPaid("no Lightning wallet".into()))?;
        let preimage = lightning.pay(&self.http, &offer.invoice, fee_limit_msat).await?;
        // The invoice was checked to be for the macaroon's payment hash: a preimage that does
        // not hash to it was not this invoice's, whatever the wallet paid.
        if Sha256::digest(preimage).as_slice() != offer.payment_hash {
            return Err(PayError::Unknown(
                "the wallet answered a preimage that is not the invoice's".into(),
            ));
        }
        Ok(format!("L402 {}:{}", offer.macaroon, hex::encode(preimage)))
    }

    fn new_payment(
        &self,
        request: &Request,
        scheme: Scheme,
        amount: Usdc,
        outcome: Outcome,
    ) -> Payment {
        Payment {
            time: now_rfc3339(),
            origin: origin_of(&request.url),
            url: shown_url(&request.url),
            scheme,
            amount_usdc: amount,
            charge_id: None,
            transaction: None,
            outcome,
            idempotency_key: idempotency_key(request).map(str::to_owned),
        }
    }

    fn payment(&self, request: &Request, scheme: Scheme, amount: Usdc, answer: &Answer) -> Payment {
        let mut payment = self.new_payment(request, scheme, amount, Outcome::Paid);
        payment.charge_id = answer.header(headers::CHARGE_ID).map(str::to_owned);
        payment.transaction = answer
            .header(headers::PAYMENT_RESPONSE)
            .or_else(|| answer.header(headers::X_PAYMENT_RESPONSE))
            .and_then(settled_transaction);
        payment
    }

    /// Keeps `payment` in the session and the spending log, if money moved (or may have).
    fn record(&self, payment: &Payment) -> Result<(), AgentError> {
        if payment.amount_usdc.is_zero() {
            return Ok(());
        }
        self.state().payments.push(payment.clone());
        let Some(path) = &self.config.log else { return Ok(()) };
        let failed = |e: std::io::Error| AgentError::Log {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        let mut line = serde_json::to_vec(payment).unwrap_or_default();
        line.push(b'\n');
        open_log(path)?.write_all(&line).map_err(failed)
    }

    async fn send_with(
        &self,
        request: &Request,
        header: &str,
        value: &str,
    ) -> Result<Answer, AgentError> {
        if header == headers::AUTHORIZATION {
            self.send(request, Some(value)).await
        } else {
            self.send_raw(request, None, Some((header, value))).await
        }
    }

    async fn send(
        &self,
        request: &Request,
        authorization: Option<&str>,
    ) -> Result<Answer, AgentError> {
        self.send_raw(request, authorization, None).await
    }

    /// Sends `request`, with `authorization` or `extra` if given, and reads the answer: a 402
    /// within [`MAX_402_HEADERS`] and [`MAX_402_BODY`] (it is read to be paid, so hostile
    /// sizes are refused), anything else within the configured body limit.
    async fn send_raw(
        &self,
        request: &Request,
        authorization: Option<&str>,
        extra: Option<(&str, &str)>,
    ) -> Result<Answer, AgentError> {
        let url = shown_url(&request.url);
        let mut builder = self.http.request(request.method.clone(), request.url.clone());
        for (name, value) in &request.headers {
            if authorization.is_some() && name.eq_ignore_ascii_case(headers::AUTHORIZATION) {
                continue;
            }
            builder = builder.header(name, value);
        }
        if let Some(value) = authorization {
            builder = builder.header(headers::AUTHORIZATION, value);
        }
        if let Some((name, value)) = extra {
            builder = builder.header(name, value);
        }
        if let Some(body) = &request.body {
            builder = builder.body(body.clone());
        }
        // reqwest's message would name the whole URL, query included.
        let http_error = |e: reqwest::Error| {
            let reached = !(e.is_connect() || e.is_builder());
            AgentError::Http { url: url.clone(), reason: e.without_url().to_string(), reached }
        };
        let mut response = builder.send().await.map_err(http_error)?;
        let status = response.status().as_u16();
        let headers: Vec<(String, String)> = response
            .headers()
            .iter()
            .map(|(n, v)| {
                (n.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned())
            })
            .collect();
        let limit = if status == 402 {
            let size: usize = headers.iter().map(|(n, v)| n.len() + v.len()).sum();
            if size > MAX_402_HEADERS {
                return Err(AgentError::TooLarge {
                    url,
                    what: "the 402's headers",
                    limit: MAX_402_HEADERS,
                });
            }
            MAX_402_BODY
        } else {
            self.config.max_body_bytes
        };
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(http_error)? {
            if body.len() + chunk.len() > limit {
                let what = if status == 402 { "the 402's body" } else { "the body" };
                return Err(AgentError::TooLarge { url, what, limit });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer { status, headers, body })
    }
}

/// What an unknown outcome that blocks the origin tells the caller.
const NOT_AGAIN: &str = "the agent does not pay this server again this session; check the wallet";

/// The Pay Token payment of this session whose answer was lost (outcome unknown, no charge
/// seen yet) and that `request` retries: same origin, same Idempotency-Key.
fn unresolved<'a>(payments: &'a mut [Payment], request: &Request) -> Option<&'a mut Payment> {
    let key = idempotency_key(request)?;
    let origin = origin_of(&request.url);
    payments.iter_mut().find(|p| {
        p.scheme == Scheme::PayToken
            && p.outcome == Outcome::Unknown
            && p.charge_id.is_none()
            && p.origin == origin
            && p.idempotency_key.as_deref() == Some(key)
    })
}

/// The request's `Idempotency-Key`, if it sends one.
fn idempotency_key(request: &Request) -> Option<&str> {
    request
        .headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(headers::IDEMPOTENCY_KEY))
        .map(|(_, value)| value.as_str())
}

/// The start of a body, for a message.
fn excerpt(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(500)]).into_owned()
}

/// The transaction of a `PAYMENT-RESPONSE`, when it names one.
fn settled_transaction(value: &str) -> Option<String> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD.decode(value.trim()).ok()?;
    let response: x402::SettleResponse = serde_json::from_slice(&bytes).ok()?;
    (!response.transaction.is_empty()).then_some(response.transaction)
}

fn open_log(path: &PathBuf) -> Result<std::fs::File, AgentError> {
    let failed = |e: std::io::Error| AgentError::Log {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(failed)?;
    }
    std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(failed)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
