//! Buyer keys, and what a buyer does with one: issue, read and revoke its own tokens, read
//! its own account and charges. Every operation here is scoped to the key's buyer; another
//! buyer's token or charge is answered as one that does not exist.

use paystile_protocol::Usdc;
use paystile_protocol::ledger_api::{
    BuyerKeyRequest, BuyerKeyView, BuyerKeys, BuyerRevocation, BuyerTokenRequest, BuyerView,
    ChargePage, ChargeQuery, ChargeView, ChildTokenRequest, IssueTokenRequest, IssuedBuyerKey,
    IssuedToken, TokenView,
};
use paystile_protocol::pay_token::Scope;
use sha2::{Digest, Sha256};

use crate::domain::UnixMillis;
use crate::ledger::{
    Ledger, LedgerError, check_account_id, check_id, check_tag, expiry, new_id, rfc3339_millis,
    seconds,
};
use crate::rules;
use crate::store::{BuyerKeyRecord, NewBuyerKey};

/// A buyer key's prefix: a key found in a log or a repository says what it is.
pub const KEY_PREFIX: &str = "pbk_";
/// The most services one key may be limited to.
const MAX_KEY_SERVICES: usize = 64;
/// `last_used_at` is recorded to this precision: a console polling every few seconds does
/// not write on every poll.
const LAST_USED_PRECISION_MS: UnixMillis = 60_000;

/// The hash a buyer key is stored and found by (hex SHA-256): a lookup by it compares
/// hashes, so its timing tells nothing about the key.
fn key_hash(key: &[u8]) -> String {
    hex::encode(Sha256::digest(key))
}

fn key_view(key: BuyerKeyRecord) -> BuyerKeyView {
    BuyerKeyView {
        key_id: key.key_id,
        buyer_id: key.buyer_id,
        label: key.label,
        services: key.services,
        max_limit_usdc: key.max_limit,
        created_at: rfc3339_millis(key.created_at),
        last_used_at: key.last_used_at.map(rfc3339_millis),
        revoked_at: key.revoked_at.map(rfc3339_millis),
    }
}

/// The buyer a key belongs to, and what the seller lets it do.
#[derive(Clone, Debug)]
pub struct BuyerKey(BuyerKeyRecord);

impl BuyerKey {
    pub fn buyer_id(&self) -> &str {
        &self.0.buyer_id
    }

    pub fn view(&self) -> BuyerKeyView {
        key_view(self.0.clone())
    }
}

impl Ledger {
    /// A new key for `buyer_id`: the answer holds it this once; the books keep its hash.
    pub async fn create_buyer_key(
        &self,
        buyer_id: String,
        request: BuyerKeyRequest,
    ) -> Result<IssuedBuyerKey, LedgerError> {
        check_account_id(&buyer_id)?;
        if let Some(label) = &request.label {
            check_tag("label", label)?;
        }
        if request.services.len() > MAX_KEY_SERVICES {
            return Err(LedgerError::Invalid(format!(
                "services: at most {MAX_KEY_SERVICES} services"
            )));
        }
        for service in &request.services {
            check_id("services", service)?;
            self.check_sold(service)?;
        }
        if request.max_limit_usdc.is_some_and(Usdc::is_zero) {
            return Err(LedgerError::Invalid("maxLimitUsdc must be greater than 0".into()));
        }
        let key = format!("{KEY_PREFIX}{}", hex::encode(rand::random::<[u8; 32]>()));
        let mut services = request.services;
        services.sort();
        services.dedup();
        let record = BuyerKeyRecord {
            key_id: new_id("bk"),
            buyer_id,
            label: request.label,
            services,
            max_limit: request.max_limit_usdc,
            created_at: self.now(),
            last_used_at: None,
            revoked_at: None,
        };
        let key_hash = key_hash(key.as_bytes());
        self.store().insert_buyer_key(NewBuyerKey { record: record.clone(), key_hash }).await?;
        tracing::info!(key_id = %record.key_id, buyer_id = %record.buyer_id, "buyer key created");
        Ok(IssuedBuyerKey { key, view: key_view(record) })
    }

    pub async fn buyer_keys(&self, buyer_id: String) -> Result<BuyerKeys, LedgerError> {
        check_id("buyerId", &buyer_id)?;
        let keys = self.store().buyer_keys(buyer_id).await?;
        Ok(BuyerKeys { keys: keys.into_iter().map(key_view).collect() })
    }

    /// From now on the key opens nothing; the tokens it issued stay as they are.
    pub async fn revoke_buyer_key(
        &self,
        buyer_id: String,
        key_id: String,
    ) -> Result<BuyerKeyView, LedgerError> {
        check_id("buyerId", &buyer_id)?;
        check_id("keyId", &key_id)?;
        let key = self
            .store()
            .revoke_buyer_key(buyer_id, key_id, self.now())
            .await?
            .ok_or(LedgerError::NotFound("buyer key"))?;
        tracing::info!(key_id = %key.key_id, buyer_id = %key.buyer_id, "buyer key revoked");
        Ok(key_view(key))
    }

    /// The buyer key `presented` is, unless it is unknown or revoked (the same answer).
    pub async fn buyer_key(&self, presented: &[u8]) -> Result<Option<BuyerKey>, LedgerError> {
        if !presented.starts_with(KEY_PREFIX.as_bytes()) {
            return Ok(None);
        }
        let Some(key) = self.store().live_buyer_key(key_hash(presented)).await? else {
            return Ok(None);
        };
        let now = self.now();
        // Best effort: a key's last use is for its owner's information, and a write that
        // fails must not refuse a request that only reads.
        if key.last_used_at.is_none_or(|at| now - at >= LAST_USED_PRECISION_MS)
            && let Err(error) = self.store().touch_buyer_key(key.key_id.clone(), now).await
        {
            tracing::warn!(key_id = %key.key_id, %error, "cannot record a buyer key's use");
        }
        Ok(Some(BuyerKey(key)))
    }

    /// Whether the ledger sells `service_id` (any, when it names none).
    fn check_sold(&self, service_id: &str) -> Result<(), LedgerError> {
        let services = self.services();
        if services.is_empty() || services.iter().any(|sold| sold == service_id) {
            return Ok(());
        }
        Err(LedgerError::Invalid(format!(
            "serviceId: unknown service {service_id:?}; this ledger sells {}",
            services.join(", ")
        )))
    }

    /// The buyer's account and tokens (an empty view for a buyer with neither yet).
    pub async fn own_buyer(&self, key: &BuyerKey) -> Result<BuyerView, LedgerError> {
        self.buyer_view(key.buyer_id().to_owned()).await
    }

    /// A Pay Token the buyer issues itself: for a service the ledger sells and the key may
    /// use, with a cap within the key's largest, the account's available balance and its
    /// tier's daily limit, expiring in the future.
    pub async fn issue_own_token(
        &self,
        key: &BuyerKey,
        request: BuyerTokenRequest,
    ) -> Result<IssuedToken, LedgerError> {
        let key = &key.0;
        check_id("serviceId", &request.service_id)?;
        let limit = request.limit_usdc;
        self.check_key_allows(key, Some(&request.service_id), Scope::Single, limit)?;
        // Checked before the account, so that a past expiry is named whatever the balance.
        expiry(&request.expires_at, request.ttl_seconds, seconds(self.now()))?;
        let now = self.now();
        let account =
            self.store().buyer(key.buyer_id.clone(), now).await?.account.ok_or_else(|| {
                LedgerError::Invalid(
                    "no prepaid balance yet: the seller credits it with a deposit".into(),
                )
            })?;
        let available = account.available();
        if limit > available {
            return Err(LedgerError::Invalid(format!(
                "limitUsdc {limit} is above your available balance, {available} USDC"
            )));
        }
        let view = self.account_view(&account, rules::utc_day(now));
        if limit > view.daily_limit_usdc {
            return Err(LedgerError::Invalid(format!(
                "limitUsdc {limit} is above your tier's daily limit, {} USDC",
                view.daily_limit_usdc
            )));
        }
        self.issue_token(IssueTokenRequest {
            service_id: request.service_id,
            limit_usdc: limit,
            buyer_id: key.buyer_id.clone(),
            buyer_tag: request.buyer_tag,
            scope: None,
            expires_at: request.expires_at,
            ttl_seconds: request.ttl_seconds,
            sandbox: false,
        })
        .await
    }

    /// One of the buyer's tokens; another's is not found.
    pub async fn own_token(
        &self,
        key: &BuyerKey,
        token_id: String,
    ) -> Result<TokenView, LedgerError> {
        let token = self.token(token_id).await?;
        if token.buyer_id != key.buyer_id() {
            return Err(LedgerError::NotFound("token"));
        }
        Ok(token)
    }

    /// The kill switch, on one of the buyer's own tokens.
    pub async fn revoke_own_token(
        &self,
        key: &BuyerKey,
        token_id: String,
    ) -> Result<TokenView, LedgerError> {
        self.own_token(key, token_id.clone()).await?;
        self.revoke_token(token_id).await
    }

    /// A child of one of the buyer's own tokens, within what the key allows: a key limited
    /// to some services or caps mints no wider child under a token another key (or the
    /// seller) issued.
    pub async fn mint_own_child(
        &self,
        key: &BuyerKey,
        parent_id: String,
        request: ChildTokenRequest,
    ) -> Result<IssuedToken, LedgerError> {
        let parent = self.own_token(key, parent_id.clone()).await?;
        let service = request.service_id.as_deref().or(parent.service_id.as_deref());
        let scope = request.scope.unwrap_or(parent.scope);
        self.check_key_allows(&key.0, service, scope, request.limit_usdc)?;
        self.mint_child(parent_id, request).await
    }

    /// Whether `key` may issue a token for `service` with `scope` and cap `limit`: a
    /// service the ledger sells, one of the key's when it names some (and then bound to it),
    /// a cap greater than 0 and within the key's largest.
    fn check_key_allows(
        &self,
        key: &BuyerKeyRecord,
        service: Option<&str>,
        scope: Scope,
        limit: Usdc,
    ) -> Result<(), LedgerError> {
        if let Some(service) = service {
            self.check_sold(service)?;
        }
        if !key.services.is_empty() {
            let allowed = scope == Scope::Single
                && service.is_some_and(|service| key.services.iter().any(|s| s == service));
            if !allowed {
                return Err(LedgerError::Invalid(format!(
                    "serviceId: this key issues tokens for {} only",
                    key.services.join(", ")
                )));
            }
        }
        if limit.is_zero() {
            return Err(LedgerError::Invalid("limitUsdc must be greater than 0".into()));
        }
        if let Some(max) = key.max_limit
            && limit > max
        {
            return Err(LedgerError::Invalid(format!(
                "limitUsdc {limit} is above this key's largest cap, {max} USDC"
            )));
        }
        Ok(())
    }

    /// The panic button, on the buyer's own tokens.
    pub async fn revoke_own_tokens(&self, key: &BuyerKey) -> Result<BuyerRevocation, LedgerError> {
        match self.revoke_buyer(key.buyer_id().to_owned()).await {
            // A buyer with neither an account nor a token yet has nothing to revoke.
            Err(LedgerError::NotFound(_)) => Ok(BuyerRevocation {
                buyer_id: key.buyer_id().to_owned(),
                revoked_tokens: 0,
                gateways: Default::default(),
            }),
            revoked => revoked,
        }
    }

    /// One of the buyer's own charges.
    pub async fn own_charge(
        &self,
        key: &BuyerKey,
        charge_id: String,
    ) -> Result<ChargeView, LedgerError> {
        let charge = self.charge(charge_id).await?;
        if charge.buyer_id != key.buyer_id() {
            return Err(LedgerError::NotFound("charge"));
        }
        Ok(charge)
    }

    /// A page of the buyer's own charges; a query naming another buyer finds no buyer.
    pub async fn own_charges(
        &self,
        key: &BuyerKey,
        query: ChargeQuery,
    ) -> Result<ChargePage, LedgerError> {
        if query.buyer_id.as_deref().is_some_and(|buyer| buyer != key.buyer_id()) {
            return Err(LedgerError::NotFound("buyer"));
        }
        self.charges(ChargeQuery { buyer_id: Some(key.buyer_id().to_owned()), ..query }).await
    }
}
