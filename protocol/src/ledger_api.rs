//! The ledger's HTTP API: paths and JSON bodies (camelCase, like LemonCake's API).
//!
//! Gateway endpoints (`/v1/holds…`) take the gateway key; admin endpoints take the admin key.
//! Errors are [`ErrorBody`](crate::ErrorBody) with the status of their code.

use serde::{Deserialize, Serialize};

use crate::money::Usdc;
use crate::pay_token::{PayTokenClaims, Scope};

pub mod path {
    /// `POST`: reserve a call's price (gateway).
    pub const HOLDS: &str = "/v1/holds";
    /// `POST`: commit or release a batch of holds (gateway).
    pub const SETTLEMENTS: &str = "/v1/holds/settle";
    /// `GET ?watcher=…&after=…`: the revocations that voided open holds, long-polled by each
    /// gateway VM that prefetches holds (gateway).
    pub const REVOCATIONS: &str = "/v1/revocations";
    /// `POST`: issue a Pay Token; `GET /{id}`, `POST /{id}/revoke` (admin).
    pub const TOKENS: &str = "/v1/tokens";
    /// `GET /{id}`: a buyer's account and tokens; `POST /{id}/deposits`, `PUT /{id}/tier`,
    /// `POST /{id}/revoke` (the panic button) (admin).
    pub const BUYERS: &str = "/v1/buyers";
    /// `GET`: the journal, a page of charges (admin); `GET /{id}`: one charge (admin).
    pub const CHARGES: &str = "/v1/charges";
    /// `GET`: the journal's page as CSV (admin).
    pub const CHARGES_CSV: &str = "/v1/charges.csv";
    /// `GET /{id}/summary`: a service's calls, revenue and refusals (admin).
    pub const SERVICES: &str = "/v1/services";
    /// `GET`: this API's OpenAPI 3 document (open).
    pub const OPENAPI: &str = "/openapi.json";
    /// `GET`: Prometheus metrics (open).
    pub const METRICS: &str = "/metrics";
    /// `POST`: mint L402 challenges, each a macaroon and its invoice (gateway).
    pub const L402_CHALLENGES: &str = "/v1/l402/challenges";
    /// `POST`: an x402 payment that buys a prepaid balance and a Pay Token (gateway).
    pub const X402_TOP_UPS: &str = "/v1/x402/top-ups";
    /// `POST`: pay a sandbox invoice, answering its preimage (admin; sandbox backend only).
    pub const SANDBOX_PAYMENTS: &str = "/v1/sandbox/payments";
    pub const HEALTHZ: &str = "/healthz";
    /// `GET`: the public keys of the ledger's EdDSA Pay Tokens, a JWK set (open).
    pub const JWKS: &str = "/.well-known/jwks.json";
    /// `GET`: who a key is: the admin, or a buyer and its key (admin or buyer key).
    pub const WHOAMI: &str = "/v1/whoami";
    /// A buyer's own API (buyer key): `GET` its account and tokens; `POST /tokens`,
    /// `GET /tokens/{id}`, `POST /tokens/{id}/revoke`, `POST /tokens/{id}/children`,
    /// `POST /revoke` (its panic button), `GET /charges`, `/charges.csv`, `/charges/{id}`.
    pub const ME: &str = "/v1/me";
    /// `GET`: the tokens and buyers that spent the most (admin).
    pub const TOP_SPENDERS: &str = "/v1/top-spenders";
    /// `GET`: the web console, a page and its assets (open; it asks for a key).
    pub const CONSOLE: &str = "/console";
}

/// `POST /v1/holds`: hold `priceUsdc` for one call to `serviceId`, paid with `credential`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReserveRequest {
    /// The `Authorization` value the call came with (`Bearer <Pay Token>`, `L402 …`). The
    /// ledger verifies it itself and spends only for the token it proves: the gateway's key
    /// alone opens nobody's money.
    pub credential: Presented,
    pub service_id: String,
    pub price_usdc: Usdc,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency: Option<Idempotency>,
    /// Holds wanted for calls of this shape, 1 to [`MAX_HOLDS_PER_RESERVE`]: a gateway that
    /// sees a token call often serves its next calls from the extra holds, without a round
    /// trip each. Never more than 1 with `idempotency`.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub count: u16,
    /// With `count` > 1: when the gateway stops waiting for this answer (Unix milliseconds,
    /// its clock). A reserve the ledger decides later (it was stalled, or the request waited
    /// in its queue) grants the first hold only: extras nobody will take would hold the token's budget
    /// until their TTL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extras_until_ms: Option<u64>,
    /// With an x402 payment, on a route that settles before it serves: when the gateway
    /// stops waiting (Unix milliseconds, its clock). The ledger answers the hold only once
    /// the transfer is confirmed on chain (and the charge committed), or refuses the payment
    /// with the reason it did not settle, before then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settle_until_ms: Option<u64>,
}

/// A credential as a gateway presents it to the ledger: the call's `Authorization` value,
/// at most [`MAX_AUTHORIZATION_LEN`](crate::credential::MAX_AUTHORIZATION_LEN) bytes. Debug
/// output shows `…`: no log ever carries it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Presented(String);

impl Presented {
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl From<String> for Presented {
    fn from(value: String) -> Presented {
        Presented(value)
    }
}

impl core::fmt::Debug for Presented {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Presented(…)")
    }
}

/// How long a revocation watch poll waits for a revocation before it answers empty (ms):
/// a gateway gives the poll this long and some more before it takes it as lost.
pub const WATCH_WAIT_MS: u64 = 20_000;

/// The most holds one reserve asks for.
pub const MAX_HOLDS_PER_RESERVE: u16 = 64;

fn one() -> u16 {
    1
}

fn is_one(count: &u16) -> bool {
    *count == 1
}

/// A token as a verified credential states it (see [`crate::credential::verify`]). The ledger
/// registers a token it has not seen yet (one minted elsewhere with a key it trusts, or an
/// L402 token) from these claims; afterwards its own record rules.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenGrant {
    pub token_id: String,
    pub buyer_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buyer_tag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_id: Option<String>,
    pub scope: Scope,
    pub limit_usdc: Usdc,
    /// Unix seconds.
    pub expires_at: u64,
    /// A sandbox credential (Pay Token claim, L402 caveat): metered in the sandbox book.
    #[serde(default, skip_serializing_if = "core::ops::Not::not")]
    pub sandbox: bool,
}

impl From<&PayTokenClaims> for TokenGrant {
    fn from(claims: &PayTokenClaims) -> TokenGrant {
        TokenGrant {
            token_id: claims.jti.clone(),
            buyer_id: claims.sub.clone(),
            buyer_tag: claims.buyer_tag.clone(),
            service_id: claims.service_id.clone(),
            scope: claims.scope,
            limit_usdc: claims.limit_usdc,
            expires_at: claims.exp,
            sandbox: claims.sandbox,
        }
    }
}

/// A client's `Idempotency-Key`, with a fingerprint of the request it came with. The key
/// keeps the outcome of its request: a charge, replayed while committed, or a refusal,
/// answered again as it was.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Idempotency {
    pub key: String,
    /// Hex SHA-256 of the request's method and path; another request under the same key is
    /// refused with `idempotency_key_mismatch`.
    pub fingerprint: String,
}

/// The answer to a successful reserve.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hold {
    pub charge_id: String,
    pub amount_usdc: Usdc,
    /// The token's limit minus everything spent or on hold, this hold (and its extra
    /// holds) included.
    pub remaining_usdc: Usdc,
    /// True when the Idempotency-Key matched an already committed charge: nothing new was
    /// held, and nothing must be settled for this call. `amountUsdc` is then what that charge
    /// committed.
    pub replayed: bool,
    /// With `count` > 1: the holds granted beyond this one, each of `amountUsdc` and settled
    /// on its own like any hold. At most `count - 1`, and at most a quarter of what the first
    /// hold left (so that one gateway never takes a token's last budget); possibly none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_charge_ids: Vec<String>,
    /// With `settleFirst`: the confirmed transfer's transaction. The charge is committed
    /// already, and nothing must be settled for this call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction: Option<String>,
}

/// `POST /v1/holds/settle`: the outcomes of calls whose upstream has answered.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SettleRequest {
    pub settlements: Vec<Settlement>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Settlement {
    pub charge_id: String,
    pub outcome: Outcome,
    /// The upstream's status, for the journal; absent when the call never got an answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_status: Option<u16>,
    /// With `commit`: charge this much (greater than 0, at most the held amount) and release
    /// the rest; absent: charge the held amount. A settlement naming more than its hold holds
    /// is answered `invalid`, alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount_usdc: Option<Usdc>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The call was billable: charge the held amount (or the settlement's `amountUsdc`).
    Commit,
    /// The call was not billable: give the held amount back.
    Release,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SettleResponse {
    pub results: Vec<SettleResult>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SettleResult {
    pub charge_id: String,
    pub status: SettleStatus,
    /// Why, for a settlement refused as `invalid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl SettleResult {
    /// The answer to a settlement that cannot apply to its hold.
    pub fn invalid(charge_id: &str, problem: String) -> SettleResult {
        SettleResult {
            charge_id: charge_id.to_owned(),
            status: SettleStatus::Invalid,
            error: Some(problem),
        }
    }
}

/// What settling one hold did. Settling is idempotent: a repeated settlement reports the
/// first one's result as `already_*` and changes nothing. Every status is final: a gateway
/// sends a settlement again only when its answer named none for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SettleStatus {
    Committed,
    Released,
    AlreadyCommitted,
    AlreadyReleased,
    /// The hold outlived its TTL and was released; it can no longer be committed.
    Expired,
    /// The token was revoked while the call was in flight: the hold was released instead.
    Revoked,
    /// No such hold.
    Unknown,
    /// The settlement cannot apply to its hold (an amount above what it holds, an amount
    /// with a release): nothing was done, and sending it again cannot succeed. The others
    /// of its request are settled as usual.
    Invalid,
}

/// `POST /v1/tokens`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IssueTokenRequest {
    pub service_id: String,
    pub limit_usdc: Usdc,
    pub buyer_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buyer_tag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,
    /// RFC 3339 time; at most one of `expiresAt` and `ttlSeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    /// Charges go to the sandbox book: never to the buyer's balance or daily limit.
    #[serde(default, skip_serializing_if = "core::ops::Not::not")]
    pub sandbox: bool,
}

/// `POST /v1/tokens/{parentId}/children`: a child token for delegation. Its spend counts
/// against its parent and every ancestor; it has the parent's buyer and sandbox flag, and
/// may narrow (never widen) the parent's service, scope and expiry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChildTokenRequest {
    /// At most what the parent has left.
    pub limit_usdc: Usdc,
    /// Default: the parent's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_id: Option<String>,
    /// Default: the parent's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,
    /// Default: the parent's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buyer_tag: Option<String>,
    /// RFC 3339, no later than the parent's expiry; at most one of `expiresAt` and
    /// `ttlSeconds`. Default: the ledger's token TTL, cut to the parent's expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuedToken {
    pub token_id: String,
    pub jwt: String,
    pub limit_usdc: Usdc,
    /// RFC 3339.
    pub expires_at: String,
}

/// `POST /v1/x402/top-ups`: `amountUsdc` paid with the x402 payment `credential`
/// (`x402v2 …` or `x402v1 …`, as a reserve presents it), for `serviceId`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TopUpRequest {
    pub credential: Presented,
    pub service_id: String,
    pub amount_usdc: Usdc,
    /// When the gateway stops waiting (Unix milliseconds, its clock): the payment is settled
    /// before then, or refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settle_until_ms: Option<u64>,
}

/// A top-up's answer: the payment settled on chain, the payer's prepaid account credited
/// with it, and a Pay Token with that cap for the service (when the ledger issues tokens).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TopUp {
    /// The payer's address: its account, and the token's buyer.
    pub buyer_id: String,
    pub amount_usdc: Usdc,
    /// The transfer's transaction.
    pub transaction: String,
    /// The account's balance after the deposit.
    pub balance_usdc: Usdc,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<IssuedToken>,
}

/// `GET /v1/tokens/{tokenId}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenView {
    pub token_id: String,
    pub buyer_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buyer_tag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_id: Option<String>,
    pub scope: Scope,
    pub limit_usdc: Usdc,
    pub used_usdc: Usdc,
    pub reserved_usdc: Usdc,
    pub remaining_usdc: Usdc,
    pub revoked: bool,
    /// RFC 3339.
    pub expires_at: String,
    /// The token this one was minted under (`POST /v1/tokens/{id}/children`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    #[serde(default, skip_serializing_if = "core::ops::Not::not")]
    pub sandbox: bool,
    /// In a revoke's answer: the gateway VMs that have dropped the token's prefetched holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateways: Option<GatewayConfirmations>,
}

/// Which gateway VMs watching the ledger's revocations have applied a revocation before
/// its answer (see [`RevocationFeed`]). A VM listed as unconfirmed may still serve the
/// revoked tokens' calls from holds it prefetched, for at most its `prefetch_max_age_ms`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayConfirmations {
    pub confirmed: Vec<String>,
    pub unconfirmed: Vec<String>,
}

/// `GET /v1/revocations`'s query: who asks (an id the VM made up for itself, as a token id
/// is written), and the feed position it has applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WatchQuery {
    pub watcher: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<u64>,
}

/// `GET /v1/revocations?watcher=<id>&after=<seq>`: the tokens whose open holds were voided
/// by revocations after `seq`, answered as soon as there is one (or empty after a wait).
/// The next poll's `after` tells the ledger that this watcher has applied them. Without
/// `after`, the answer is at once: the current `seq` and no tokens.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevocationFeed {
    /// The feed's position once these are applied: the next poll's `after`.
    pub seq: u64,
    pub token_ids: Vec<String>,
}

/// `POST /v1/buyers/{buyerId}/deposits`: credit a buyer's prepaid balance. With a
/// `reference`, the deposit is made once: the same reference again answers the first deposit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DepositRequest {
    pub amount_usdc: Usdc,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Deposit {
    pub deposit_id: String,
    pub buyer_id: String,
    pub amount_usdc: Usdc,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// The balance after this request.
    pub balance_usdc: Usdc,
    /// True when the reference named an earlier deposit: nothing was credited now.
    pub replayed: bool,
    /// RFC 3339.
    pub created_at: String,
}

/// `PUT /v1/buyers/{buyerId}/tier`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SetTierRequest {
    /// 1 to the number of tiers the ledger's `daily_limits_usdc` setting lists.
    pub tier: u32,
}

/// `GET /v1/buyers/{buyerId}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuyerView {
    pub buyer_id: String,
    /// The prepaid account, once a deposit or a tier made one. Without it the buyer's
    /// tokens are bounded by their caps alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<AccountView>,
    pub tokens: Vec<TokenView>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccountView {
    /// Deposits minus committed charges.
    pub balance_usdc: Usdc,
    /// On hold for calls in flight.
    pub held_usdc: Usdc,
    /// What new calls may hold: balance minus holds.
    pub available_usdc: Usdc,
    /// Committed this UTC day.
    pub spent_today_usdc: Usdc,
    pub tier: u32,
    pub daily_limit_usdc: Usdc,
    /// The daily limit minus what was spent today and what is on hold.
    pub remaining_today_usdc: Usdc,
}

/// `POST /v1/buyers/{buyerId}/revoke`: the panic button's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuyerRevocation {
    pub buyer_id: String,
    /// Tokens this call revoked (those revoked before are not counted).
    pub revoked_tokens: u64,
    /// The gateway VMs that have dropped the buyer's prefetched holds.
    #[serde(default)]
    pub gateways: GatewayConfirmations,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChargeStatus {
    Held,
    Committed,
    Released,
}

/// `GET /v1/charges/{chargeId}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChargeView {
    pub charge_id: String,
    pub token_id: String,
    pub buyer_id: String,
    pub service_id: String,
    /// Held amount while held, charged amount once committed, zero once released.
    pub amount_usdc: Usdc,
    /// The amount the reserve held.
    pub held_usdc: Usdc,
    pub status: ChargeStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settled_at: Option<String>,
    /// Charged to the sandbox book.
    #[serde(default, skip_serializing_if = "core::ops::Not::not")]
    pub sandbox: bool,
    /// Paid with x402: where the payment's settlement on chain is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settlement: Option<SettlementView>,
}

/// An x402 payment's settlement on chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SettlementView {
    /// `pending` (not sent yet, or its charge not committed yet), `submitted` (sent, awaiting
    /// its receipt), `settled`, `failed` (never will: see `reason`), or `void` (no call was
    /// charged for it).
    pub status: String,
    /// The transaction's hash, once one was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction: Option<String>,
    /// Why it failed, or why its last attempt did not settle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `POST /v1/l402/challenges`: what a payment buys, as the service's gateway offers it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChallengeRequest {
    pub service_id: String,
    /// The budget the payment buys, metered like a Pay Token's limit.
    pub budget_usdc: Usdc,
    /// The invoice's amount, in millisatoshis.
    pub amount_msat: u64,
    /// How long the paid credential stays valid.
    pub valid_seconds: u64,
    /// Restricts the credential to routes with these capabilities; empty: every route.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
    /// How many challenges to mint, 1 to [`MAX_CHALLENGES_PER_CALL`], answered as
    /// [`L402Challenges`]; absent: one, answered as a lone [`L402Challenge`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u16>,
}

/// The most challenges one `POST /v1/l402/challenges` mints.
pub const MAX_CHALLENGES_PER_CALL: u16 = 256;

/// `POST /v1/l402/challenges` with a `count`: that many challenges, each for its own token
/// and invoice. A gateway hands each to one client only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct L402Challenges {
    pub challenges: Vec<L402Challenge>,
}

/// A minted L402 challenge: the gateway answers 402 with
/// `WWW-Authenticate: L402 macaroon="<macaroon>", invoice="<invoice>"`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct L402Challenge {
    /// The ledger token id the credential will be metered under, once paid.
    pub token_id: String,
    /// Standard base64 of the V2 macaroon.
    pub macaroon: String,
    /// BOLT11.
    pub invoice: String,
    /// Hex.
    pub payment_hash: String,
    pub budget_usdc: Usdc,
    pub amount_msat: u64,
    /// Unix seconds.
    pub valid_until: u64,
    /// True when the invoice comes from the sandbox backend: no real money moves.
    #[serde(default)]
    pub sandbox: bool,
}

/// `POST /v1/sandbox/payments`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SandboxPaymentRequest {
    pub invoice: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxPayment {
    /// 64 hex digits: the proof of payment an L402 credential carries.
    pub preimage: String,
    /// Always true: only the sandbox pays invoices.
    pub sandbox: bool,
}

/// `GET /v1/charges` (and its CSV export): the journal, filtered, oldest first (by creation
/// time, then charge id; or newest first with `order=desc`), one page at a time. Times are RFC 3339; `from` is inclusive, `to`
/// exclusive.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChargeQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buyer_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ChargeStatus>,
    /// Only charges paid with x402 whose settlement is in this state (`pending`,
    /// `submitted`, `settled`, `failed`, `void`): `failed` lists the served calls that went
    /// unpaid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settlement: Option<String>,
    /// `true`: only the sandbox book's charges; `false`: only the live book's; absent: both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// 1 to 1000; 100 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// A previous page's `nextCursor`: this page starts after its last charge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    /// `asc` (oldest first, the default) or `desc` (newest first: the latest charges in one
    /// page, then older ones page by page).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<ChargeOrder>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChargeOrder {
    #[default]
    Asc,
    Desc,
}

/// One page of the journal. `nextCursor` is null on the last page.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChargePage {
    pub charges: Vec<ChargeView>,
    pub next_cursor: Option<String>,
}

/// `GET /v1/services/{serviceId}/summary`: `from` inclusive, `to` exclusive (RFC 3339).
/// One book at a time: the live book unless `sandbox` is true, so that sandbox calls never
/// count as revenue.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SummaryQuery {
    /// `true`: summarize the sandbox book instead of the live one.
    #[serde(default, skip_serializing_if = "core::ops::Not::not")]
    pub sandbox: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

/// A service's calls in a time window: the charges created in it, and the reserves refused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSummary {
    pub service_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// The book summarized: the sandbox one, or (false) the live one.
    #[serde(default, skip_serializing_if = "core::ops::Not::not")]
    pub sandbox: bool,
    /// Calls that got a hold (replays of a charged call are not new calls).
    pub calls: u64,
    pub committed: u64,
    pub released: u64,
    /// Still in flight.
    pub held: u64,
    /// What the committed charges charged (a partial commit counts its committed amount,
    /// not what it held).
    pub revenue_usdc: Usdc,
    /// Reserves refused, by error code (`token_limit_exceeded`, `token_revoked`,
    /// `insufficient_balance`, `daily_limit_exceeded`, …). A refusal answered again from its
    /// Idempotency-Key is counted once, when it was first refused.
    pub refusals: std::collections::BTreeMap<String, u64>,
    /// Settled calls whose upstream status is known.
    pub upstream_answered: u64,
    /// Those whose upstream answered 5xx.
    pub upstream_errors: u64,
    /// `upstreamErrors / upstreamAnswered`; 0 when no upstream status is known.
    pub error_rate: f64,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_reserve_asks_for_one_hold_unless_it_says_more() {
        let one = json!({"credential": "Bearer a.b.c", "serviceId": "weather",
            "priceUsdc": "0.001000"});
        let request: ReserveRequest = serde_json::from_value(one.clone()).unwrap();
        assert_eq!(request.count, 1);
        // `count` is left out when it asks for one.
        assert_eq!(serde_json::to_value(&request).unwrap(), one);
        let eight =
            ReserveRequest { count: 8, extras_until_ms: Some(1_700_000_000_500), ..request };
        assert_eq!(serde_json::to_value(&eight).unwrap()["count"], 8);
        assert_eq!(serde_json::to_value(&eight).unwrap()["extrasUntilMs"], 1_700_000_000_500u64);
        assert!(!format!("{eight:?}").contains("a.b.c"), "a credential in debug output");
    }

    #[test]
    fn a_hold_lists_its_extra_holds_only_when_it_has_some() {
        let hold = Hold {
            charge_id: "ch_1".into(),
            amount_usdc: Usdc::from_micros(1000).unwrap(),
            remaining_usdc: Usdc::from_micros(5000).unwrap(),
            replayed: false,
            extra_charge_ids: Vec::new(),
            transaction: None,
        };
        let json = serde_json::to_value(&hold).unwrap();
        assert_eq!(json.get("extraChargeIds"), None);
        assert_eq!(json.get("transaction"), None);
        assert_eq!(serde_json::from_value::<Hold>(json).unwrap(), hold);
        let extra = Hold { extra_charge_ids: vec!["ch_2".into(), "ch_3".into()], ..hold };
        let json = serde_json::to_value(&extra).unwrap();
        assert_eq!(json["extraChargeIds"], json!(["ch_2", "ch_3"]));
        assert_eq!(serde_json::from_value::<Hold>(json).unwrap(), extra);
    }
}

/// Who holds a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The seller: the admin key.
    Admin,
    /// A buyer: one of its buyer keys.
    Buyer,
}

/// `GET /v1/whoami`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Whoami {
    pub role: Role,
    /// A buyer's key (never the secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<BuyerKeyView>,
    /// The services the ledger sells (its `services` setting); empty: it names none.
    pub services: Vec<String>,
}

/// `POST /v1/buyers/{buyerId}/keys`: a key with which the buyer manages its own tokens
/// and reads its own account and charges.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BuyerKeyRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The services the key may issue tokens for; empty: any the ledger sells.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    /// The largest cap of a token the key may issue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_limit_usdc: Option<Usdc>,
}

/// A buyer key as listed: never its secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuyerKeyView {
    pub key_id: String,
    pub buyer_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    pub services: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_limit_usdc: Option<Usdc>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339, to the minute: when the key was last presented.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
}

/// A new buyer key: `key` is shown this once; the ledger keeps only its hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuedBuyerKey {
    pub key: String,
    #[serde(flatten)]
    pub view: BuyerKeyView,
}

/// `GET /v1/buyers/{buyerId}/keys`: newest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuyerKeys {
    pub keys: Vec<BuyerKeyView>,
}

/// `POST /v1/me/tokens`: a Pay Token a buyer issues for itself, within its balance, its
/// tier's daily limit and what its key allows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BuyerTokenRequest {
    pub service_id: String,
    pub limit_usdc: Usdc,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buyer_tag: Option<String>,
    /// RFC 3339; at most one of `expiresAt` and `ttlSeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
}

/// `GET /v1/services`: the services the ledger sells, and every service with a charge or a
/// refusal, in byte order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceList {
    pub services: Vec<String>,
}

/// How far back a series goes, and its buckets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeriesWindow {
    /// 60 one-minute buckets.
    #[default]
    Hour,
    /// 24 one-hour buckets.
    Day,
    /// 30 one-day buckets.
    Month,
}

impl SeriesWindow {
    /// The bucket's width and how many buckets.
    pub const fn buckets(self) -> (u64, u32) {
        match self {
            SeriesWindow::Hour => (60, 60),
            SeriesWindow::Day => (3600, 24),
            SeriesWindow::Month => (86_400, 30),
        }
    }
}

/// `GET /v1/services/{serviceId}/series`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SeriesQuery {
    #[serde(default)]
    pub window: SeriesWindow,
    /// `true`: the sandbox book instead of the live one.
    #[serde(default, skip_serializing_if = "core::ops::Not::not")]
    pub sandbox: bool,
}

/// A service's calls over time: every bucket of the window, oldest first, the last one
/// holding now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSeries {
    pub service_id: String,
    pub window: SeriesWindow,
    #[serde(default, skip_serializing_if = "core::ops::Not::not")]
    pub sandbox: bool,
    pub bucket_seconds: u64,
    /// RFC 3339: the first bucket's start (inclusive).
    pub from: String,
    /// RFC 3339: the last bucket's end (exclusive).
    pub to: String,
    pub buckets: Vec<SeriesBucket>,
}

/// One bucket of a [`ServiceSeries`]: what [`ServiceSummary`] counts, for its time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SeriesBucket {
    /// RFC 3339.
    pub start: String,
    pub calls: u64,
    pub committed: u64,
    pub released: u64,
    pub revenue_usdc: Usdc,
    /// Reserves refused, by error code.
    pub refusals: std::collections::BTreeMap<String, u64>,
    pub upstream_answered: u64,
    pub upstream_errors: u64,
}

/// `GET /v1/top-spenders`: committed charges in `[from, to)` (RFC 3339), in one book.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TopSpendersQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(default, skip_serializing_if = "core::ops::Not::not")]
    pub sandbox: bool,
    /// 1 to 100; 10 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// The tokens and buyers that spent the most, most first (ties by id).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TopSpenders {
    pub tokens: Vec<TokenSpend>,
    pub buyers: Vec<BuyerSpend>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenSpend {
    pub token_id: String,
    pub buyer_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buyer_tag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_id: Option<String>,
    pub spent_usdc: Usdc,
    pub calls: u64,
    pub revoked: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuyerSpend {
    pub buyer_id: String,
    pub spent_usdc: Usdc,
    pub calls: u64,
}
