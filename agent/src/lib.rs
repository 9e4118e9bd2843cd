//! paystile's agent: an HTTP client that pays a 402 with what it was given (a Pay Token, an
//! L402 invoice paid through a Lightning wallet, an x402 `exact` transfer signed with a local
//! key), within limits checked before anything is paid, and that keeps a log of every
//! payment. [`Agent`] is the library the CLI and the MCP server ([`mcp`]) sit on.
//!
//! What a payment counts against the limits:
//! - Pay Token: the per-call price is the 402 body's `price`; what is spent is the answer's
//!   `X-Amount-Usdc` (the charge; zero when released), else the price for a 2xx.
//! - x402: the offer's `amount`, as micro-USDC (atomic units of a 6-decimal token; an offer in
//!   a token with more decimals looks dearer, so it is refused rather than underpaid).
//! - L402: the per-call price is the body's `price`; what is spent is what the payment buys,
//!   the macaroon's `<service>_budget_usdc` caveat (paystile's), else the body's price. The
//!   invoice is in satoshis and neither paystile's body nor the macaroon states an exchange
//!   rate, so the invoice's amount cannot be compared with a USDC price. What is checked
//!   instead: the invoice states an amount (BOLT11 human-readable part), the budget bought
//!   covers at least one call's price, and the preimage the wallet returns opens the
//!   macaroon (its SHA-256 is the payment hash in the macaroon's identifier).
//!   A server that states neither a budget nor a price is not paid: no limit could be checked.
//!
//! At most one payment per [`Agent::fetch`]: a 402 after paying is an error, never a second
//! payment. Credentials that pay more calls (a Pay Token, an L402) are cached per (origin,
//! service) for the agent's lifetime; x402 payments are one-time.

pub mod lightning;
pub mod limits;
pub mod mcp;
pub mod offers;

use std::collections::{HashMap, VecDeque};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use paystile_protocol::Usdc;
use paystile_protocol::headers;
use paystile_protocol::l402::Identifier;
use paystile_protocol::macaroon::Macaroon;
use paystile_protocol::x402::{self, B256, SigningKey, Terms, Version};
use serde::Serialize;
use sha2::{Digest, Sha256};

pub use lightning::Lightning;
pub use limits::{Limits, Refusal, normalize_origin, origin_of};
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
    pub pay_token: Option<String>,
    pub lightning: Option<Lightning>,
    pub x402_key: Option<SigningKey>,
}

impl std::fmt::Debug for Wallet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wallet")
            .field("pay_token", &self.pay_token.as_ref().map(|_| "…"))
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
            .map_err(|e| AgentError::InvalidRequest(format!("bad URL {url:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(AgentError::InvalidRequest(format!("not an http(s) URL: {url}")));
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
    Http { url: String, reason: String },
    #[error("the answer from {url} is too large: {what} over {limit} bytes; nothing was paid")]
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
        "the server answered 402 again after payment ({scheme}, {amount} USDC paid); not paying \
         again: {detail}"
    )]
    PaidButRefused { scheme: Scheme, amount: Usdc, detail: String },
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
    /// The last price seen for a call of this service.
    price: Option<Usdc>,
}

#[derive(Default)]
struct State {
    spent: Usdc,
    /// Amounts being paid right now: counted against the budget until they settle.
    reserved: Usdc,
    payments: Vec<Payment>,
    last_offers: VecDeque<Offers>,
    cache: HashMap<(String, String), Cached>,
    /// Which service a path of an origin belongs to, as its 402 said.
    routes: HashMap<(String, String), String>,
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
    price: Option<Usdc>,
    how: How,
}

enum How {
    PayToken(String),
    X402(X402Offer),
    L402(L402Offer),
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
        let mut pay_token_refused = false;

        let mut first = None;
        if let Some((service, cached, confirmed)) = self.cached(&origin, &path) {
            self.config.limits.allows_origin(&origin)?;
            // A Pay Token pays each call: the last price seen must fit the limits.
            let reserve = if cached.scheme == Scheme::PayToken {
                let price = cached.price.unwrap_or_default();
                self.reserve(Scheme::PayToken, price, price, request.max_price)?
            } else {
                Usdc::ZERO // an L402 budget was counted when it was bought
            };
            let answer = match self.send(&request, Some(&cached.authorization)).await {
                Ok(answer) => answer,
                Err(e) => {
                    self.settle(reserve, Usdc::ZERO);
                    return Err(e);
                }
            };
            if answer.status == 402 {
                // Spent or revoked: forget it, and treat this 402 as a fresh one.
                self.settle(reserve, Usdc::ZERO);
                self.state().cache.remove(&(origin.clone(), service));
                pay_token_refused = cached.scheme == Scheme::PayToken;
                first = Some(answer);
            } else if !confirmed && matches!(answer.status, 401 | 403) {
                // A guess (the origin's only credential, on a path no 402 named) that this
                // path's service refuses: call it as if nothing were cached.
                self.settle(reserve, Usdc::ZERO);
            } else {
                self.state().routes.insert((origin.clone(), path.clone()), service);
                let payment = match cached.scheme {
                    Scheme::PayToken => {
                        let amount = charged(&answer, cached.price);
                        self.settle(reserve, amount);
                        let payment = self.payment(&request, Scheme::PayToken, amount, &answer);
                        self.record(&payment, amount > Usdc::ZERO)?;
                        Some(payment)
                    }
                    Scheme::L402 | Scheme::X402 => None,
                };
                return Ok(answer.into_fetched(payment));
            }
        }
        let first = match first {
            Some(answer) => answer,
            None => {
                let answer = self.send(&request, None).await?;
                if answer.status != 402 {
                    return Ok(answer.into_fetched(None));
                }
                answer
            }
        };

        let www: Vec<&str> = first
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(headers::WWW_AUTHENTICATE))
            .map(|(_, v)| v.as_str())
            .collect();
        let offers = offers::read(
            request.url.as_str(),
            &origin,
            &www,
            first.header(headers::PAYMENT_REQUIRED),
            &first.body,
        );
        self.remember(&offers, &path);
        let plan = self.plan(&offers, pay_token_refused, request.max_price)?;
        self.pay_and_retry(&request, &offers, plan).await
    }

    /// The credential cached for the service of `path` at `origin` (confirmed: a 402 or an
    /// answer named the path's service); for a path not seen yet, the origin's credential if
    /// it has only one (a guess).
    fn cached(&self, origin: &str, path: &str) -> Option<(String, Cached, bool)> {
        let state = self.state();
        if let Some(service) = state.routes.get(&(origin.to_owned(), path.to_owned())) {
            let key = (origin.to_owned(), service.clone());
            return state.cache.get(&key).map(|c| (service.clone(), c.clone(), true));
        }
        let mut at_origin = state.cache.iter().filter(|((o, _), _)| o == origin);
        match (at_origin.next(), at_origin.next()) {
            (Some(((_, service), cached)), None) => Some((service.clone(), cached.clone(), false)),
            _ => None,
        }
    }

    fn remember(&self, offers: &Offers, path: &str) {
        let mut state = self.state();
        state.routes.insert((offers.origin.clone(), path.to_owned()), offers.service());
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
        let mut candidates: Vec<(Scheme, Usdc, Result<Usdc, Refusal>, How)> = Vec::new();
        let unknown = |scheme: Scheme, why: &str| Refusal::UnknownPrice {
            scheme: scheme.to_string(),
            why: why.to_owned(),
        };
        if let Some(token) = &wallet.pay_token
            && offers.bearer
            && !pay_token_refused
        {
            let price =
                offers.price.ok_or_else(|| unknown(Scheme::PayToken, "the 402 states no price"));
            candidates.push((
                Scheme::PayToken,
                offers.price.unwrap_or_default(),
                price,
                How::PayToken(token.clone()),
            ));
        }
        if wallet.x402_key.is_some() {
            for offer in &offers.x402 {
                let price = offer
                    .price()
                    .ok_or_else(|| unknown(Scheme::X402, "the amount is out of range"));
                let shown = offer.price().unwrap_or(Usdc::MAX);
                candidates.push((Scheme::X402, shown, price, How::X402(offer.clone())));
            }
        }
        if wallet.lightning.is_some()
            && let Some(offer) = &offers.l402
        {
            if offer.invoice_msat.is_none() {
                return Err(AgentError::MalformedChallenge {
                    origin: offers.origin.clone(),
                    problems: "the L402 invoice states no amount".into(),
                });
            }
            // What the payment buys: the macaroon's budget caveat, else the body's price.
            let amount = offer.budget.or(offers.price).ok_or_else(|| {
                unknown(
                    Scheme::L402,
                    "neither a budget caveat in the macaroon nor a price in the body",
                )
            });
            if let (Some(budget), Some(price)) = (offer.budget, offers.price)
                && budget < price
            {
                return Err(AgentError::MalformedChallenge {
                    origin: offers.origin.clone(),
                    problems: format!(
                        "the L402 invoice buys {budget} USDC, less than one call's price of {price} USDC"
                    ),
                });
            }
            let price = offers.price.or(offer.budget).unwrap_or_default();
            candidates.push((Scheme::L402, price, amount, How::L402(offer.clone())));
        }
        if candidates.is_empty() {
            if !offers.malformed.is_empty() {
                return Err(AgentError::MalformedChallenge {
                    origin: offers.origin.clone(),
                    problems: offers.malformed.join("; "),
                });
            }
            let offered = offers.scheme_names();
            return Err(AgentError::NoPayableScheme {
                origin: offers.origin.clone(),
                offered: if offered.is_empty() { "no scheme".into() } else { offered.join(", ") },
                held: self.held(),
            });
        }
        self.config.limits.allows_origin(&offers.origin)?;
        let mut first_refusal = None;
        for (scheme, price, amount, how) in candidates {
            let reserved = amount
                .and_then(|amount| self.reserve(scheme, price, amount, call_max).map(|_| amount));
            match reserved {
                Ok(amount) => {
                    return Ok(Plan { scheme, amount, price: Some(price), how });
                }
                Err(refusal) => {
                    first_refusal.get_or_insert(refusal);
                }
            }
        }
        Err(first_refusal.map_or_else(
            || AgentError::NoPayableScheme {
                origin: offers.origin.clone(),
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
        let limits = &self.config.limits;
        let lowered;
        let limits = match (call_max, limits.max_price) {
            (Some(call), Some(max)) if call >= max => limits,
            (Some(call), _) => {
                lowered = Limits { max_price: Some(call), ..limits.clone() };
                &lowered
            }
            (None, _) => limits,
        };
        let mut state = self.state();
        let committed = state.spent.checked_add(state.reserved).unwrap_or(Usdc::MAX);
        limits.check(&scheme.to_string(), price, amount, committed)?;
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
            How::L402(offer) => match self.pay_invoice(offer).await {
                Ok(value) => (headers::AUTHORIZATION, value),
                Err(PayInvoice::NotPaid(e)) => {
                    self.settle(amount, Usdc::ZERO);
                    return Err(AgentError::Lightning(e));
                }
                Err(PayInvoice::PaidBadPreimage(e)) => {
                    self.settle(amount, amount);
                    let payment = self.new_payment(request, scheme, amount);
                    self.record(&payment, true)?;
                    return Err(AgentError::PaidButFailed(e));
                }
            },
        };
        let retry = self.send_with(request, header, &value).await;
        let answer = match retry {
            Ok(answer) => answer,
            Err(e) => {
                // An L402 invoice is paid and an x402 authorization was sent: both count.
                let paid = if scheme == Scheme::PayToken { Usdc::ZERO } else { amount };
                self.settle(amount, paid);
                let payment = self.new_payment(request, scheme, paid);
                self.record(&payment, paid > Usdc::ZERO)?;
                return Err(AgentError::PaidButFailed(e.to_string()));
            }
        };
        let paid = match scheme {
            Scheme::PayToken => charged(&answer, price),
            Scheme::L402 | Scheme::X402 => amount,
        };
        self.settle(amount, paid);
        let payment = self.payment(request, scheme, paid, &answer);
        self.record(&payment, paid > Usdc::ZERO)?;
        if answer.status == 402 {
            let detail =
                String::from_utf8_lossy(&answer.body[..answer.body.len().min(500)]).into_owned();
            return Err(AgentError::PaidButRefused { scheme, amount: paid, detail });
        }
        if scheme != Scheme::X402 {
            // Pay Tokens and L402 credentials pay more calls; x402 payments are one-time.
            let authorization = value;
            let service = offers.service();
            self.state().cache.insert(
                (offers.origin.clone(), service),
                Cached { scheme, authorization, price: offers.price },
            );
        }
        Ok(answer.into_fetched(Some(payment)))
    }

    async fn pay_invoice(&self, offer: &L402Offer) -> Result<String, PayInvoice> {
        let lightning = self
            .config
            .wallet
            .lightning
            .as_ref()
            .ok_or_else(|| PayInvoice::NotPaid("no Lightning wallet".into()))?;
        let preimage =
            lightning.pay(&self.http, &offer.invoice).await.map_err(PayInvoice::NotPaid)?;
        // The macaroon is bound to a payment hash: a preimage that does not match it would
        // be refused, whatever the wallet paid.
        let hash = macaroon_payment_hash(&offer.macaroon);
        if hash.is_some_and(|hash| Sha256::digest(preimage).as_slice() != hash) {
            return Err(PayInvoice::PaidBadPreimage(
                "the invoice's preimage does not match the macaroon's payment hash: the invoice \
                 was for another macaroon"
                    .into(),
            ));
        }
        Ok(format!("L402 {}:{}", offer.macaroon, hex::encode(preimage)))
    }

    fn new_payment(&self, request: &Request, scheme: Scheme, amount: Usdc) -> Payment {
        Payment {
            time: now_rfc3339(),
            origin: origin_of(&request.url),
            url: request.url.to_string(),
            scheme,
            amount_usdc: amount,
            charge_id: None,
            transaction: None,
        }
    }

    fn payment(&self, request: &Request, scheme: Scheme, amount: Usdc, answer: &Answer) -> Payment {
        let mut payment = self.new_payment(request, scheme, amount);
        payment.charge_id = answer.header(headers::CHARGE_ID).map(str::to_owned);
        payment.transaction = answer
            .header(headers::PAYMENT_RESPONSE)
            .or_else(|| answer.header(headers::X_PAYMENT_RESPONSE))
            .and_then(settled_transaction);
        payment
    }

    /// Keeps `payment` in the session and, if money moved, in the spending log.
    fn record(&self, payment: &Payment, paid: bool) -> Result<(), AgentError> {
        if !paid {
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
        let url = request.url.to_string();
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
        let http_error =
            |e: reqwest::Error| AgentError::Http { url: url.clone(), reason: e.to_string() };
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

enum PayInvoice {
    NotPaid(String),
    PaidBadPreimage(String),
}

/// What a Pay Token call was charged: the gateway's `X-Amount-Usdc`, else the price for a
/// 2xx (a server that does not say is assumed to charge).
fn charged(answer: &Answer, price: Option<Usdc>) -> Usdc {
    match answer.header(headers::AMOUNT_USDC).and_then(|a| a.trim().parse().ok()) {
        Some(amount) => amount,
        None if (200..300).contains(&answer.status) => price.unwrap_or_default(),
        None => Usdc::ZERO,
    }
}

/// The transaction of a `PAYMENT-RESPONSE`, when it names one.
fn settled_transaction(value: &str) -> Option<String> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD.decode(value.trim()).ok()?;
    let response: x402::SettleResponse = serde_json::from_slice(&bytes).ok()?;
    (!response.transaction.is_empty()).then_some(response.transaction)
}

fn macaroon_payment_hash(macaroon: &str) -> Option<[u8; 32]> {
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let bytes = [STANDARD, URL_SAFE, STANDARD_NO_PAD, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(macaroon).ok())?;
    let macaroon = Macaroon::from_binary(&bytes).ok()?;
    Identifier::decode(macaroon.identifier()).map(|id| id.payment_hash)
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
