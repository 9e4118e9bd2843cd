//! Clients for the ledger's admin API and a buyer's own API, used by the command line's
//! subcommands (and by tests).

use paystile_protocol::ErrorBody;
use paystile_protocol::ledger_api::{
    BuyerKeyRequest, BuyerKeyView, BuyerKeys, BuyerRevocation, BuyerTokenRequest, BuyerView,
    ChargePage, ChargeQuery, ChargeView, ChildTokenRequest, Deposit, DepositRequest,
    IssueTokenRequest, IssuedBuyerKey, IssuedToken, SandboxPayment, SandboxPaymentRequest,
    ServiceSummary, SetTierRequest, SummaryQuery, TokenView, Whoami, path,
};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::de::DeserializeOwned;

/// What an id keeps unencoded in a path: RFC 3986's unreserved characters. The rest (`/`,
/// `?`, `#`, `%` above all) is percent-encoded, so that an id is one segment, itself: never a
/// query, and never `..` taking the URL to another resource.
const ID_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the ledger: {0}")]
    Transport(#[from] reqwest::Error),
    #[error("the ledger answered {status}: {}", body.error)]
    Refused { status: u16, body: ErrorBody },
    #[error("the ledger answered {status} with an unexpected body: {body}")]
    Unexpected { status: u16, body: String },
}

/// A client for the admin API, with the admin key.
#[derive(Clone)]
pub struct AdminClient {
    http: reqwest::Client,
    base_url: String,
    key: String,
}

impl AdminClient {
    pub fn new(base_url: &str, admin_key: &str) -> AdminClient {
        AdminClient {
            http: reqwest::Client::new(),
            base_url: base_url.trim_end_matches('/').to_owned(),
            key: admin_key.to_owned(),
        }
    }

    /// A new key for the buyer (shown this once).
    pub async fn create_buyer_key(
        &self,
        buyer_id: &str,
        request: &BuyerKeyRequest,
    ) -> Result<IssuedBuyerKey, ClientError> {
        let url = self.id_url(path::BUYERS, buyer_id, "/keys");
        self.call(self.http.post(url).json(request)).await
    }

    pub async fn buyer_keys(&self, buyer_id: &str) -> Result<BuyerKeys, ClientError> {
        self.call(self.http.get(self.id_url(path::BUYERS, buyer_id, "/keys"))).await
    }

    pub async fn revoke_buyer_key(
        &self,
        buyer_id: &str,
        key_id: &str,
    ) -> Result<BuyerKeyView, ClientError> {
        let key = utf8_percent_encode(key_id, ID_SEGMENT);
        let url = self.id_url(path::BUYERS, buyer_id, &format!("/keys/{key}/revoke"));
        self.call(self.http.post(url)).await
    }

    pub async fn issue_token(
        &self,
        request: &IssueTokenRequest,
    ) -> Result<IssuedToken, ClientError> {
        self.call(self.http.post(self.url(path::TOKENS)).json(request)).await
    }

    pub async fn token(&self, token_id: &str) -> Result<TokenView, ClientError> {
        self.call(self.http.get(self.id_url(path::TOKENS, token_id, ""))).await
    }

    pub async fn revoke_token(&self, token_id: &str) -> Result<TokenView, ClientError> {
        self.call(self.http.post(self.id_url(path::TOKENS, token_id, "/revoke"))).await
    }

    /// Mints a child token under `parent_id`.
    pub async fn mint_child(
        &self,
        parent_id: &str,
        request: &ChildTokenRequest,
    ) -> Result<IssuedToken, ClientError> {
        let url = self.id_url(path::TOKENS, parent_id, "/children");
        self.call(self.http.post(url).json(request)).await
    }

    pub async fn deposit(
        &self,
        buyer_id: &str,
        request: &DepositRequest,
    ) -> Result<Deposit, ClientError> {
        let url = self.id_url(path::BUYERS, buyer_id, "/deposits");
        self.call(self.http.post(url).json(request)).await
    }

    pub async fn buyer(&self, buyer_id: &str) -> Result<BuyerView, ClientError> {
        self.call(self.http.get(self.id_url(path::BUYERS, buyer_id, ""))).await
    }

    pub async fn set_tier(&self, buyer_id: &str, tier: u32) -> Result<BuyerView, ClientError> {
        let url = self.id_url(path::BUYERS, buyer_id, "/tier");
        self.call(self.http.put(url).json(&SetTierRequest { tier })).await
    }

    /// The panic button: revokes every token of the buyer.
    pub async fn revoke_buyer(&self, buyer_id: &str) -> Result<BuyerRevocation, ClientError> {
        let url = self.id_url(path::BUYERS, buyer_id, "/revoke");
        self.call(self.http.post(url)).await
    }

    pub async fn charge(&self, charge_id: &str) -> Result<ChargeView, ClientError> {
        self.call(self.http.get(self.id_url(path::CHARGES, charge_id, ""))).await
    }

    /// Pays an invoice of the ledger's sandbox backend: its preimage.
    pub async fn pay_sandbox_invoice(&self, invoice: &str) -> Result<SandboxPayment, ClientError> {
        let request = SandboxPaymentRequest { invoice: invoice.to_owned() };
        self.call(self.http.post(self.url(path::SANDBOX_PAYMENTS)).json(&request)).await
    }

    /// One page of the journal.
    pub async fn charges(&self, query: &ChargeQuery) -> Result<ChargePage, ClientError> {
        self.call(self.http.get(self.url(path::CHARGES)).query(query)).await
    }

    /// One page of the journal as CSV, and the next page's cursor.
    pub async fn charges_csv(
        &self,
        query: &ChargeQuery,
    ) -> Result<(String, Option<String>), ClientError> {
        self.csv(path::CHARGES_CSV, query).await
    }

    pub async fn service_summary(
        &self,
        service_id: &str,
        query: &SummaryQuery,
    ) -> Result<ServiceSummary, ClientError> {
        let url = self.id_url(path::SERVICES, service_id, "/summary");
        self.call(self.http.get(url).query(query)).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// `{collection}/{id}{rest}`, the id percent-encoded.
    fn id_url(&self, collection: &str, id: &str, rest: &str) -> String {
        self.url(&format!("{collection}/{}{rest}", utf8_percent_encode(id, ID_SEGMENT)))
    }

    async fn call<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let response = request.bearer_auth(&self.key).send().await?;
        let status = response.status().as_u16();
        let body = response.bytes().await?;
        if (200..300).contains(&status)
            && let Ok(value) = serde_json::from_slice(&body)
        {
            return Ok(value);
        }
        Err(refusal(status, &body))
    }

    /// A journal page at `path` as CSV, and the next page's cursor.
    async fn csv(
        &self,
        path: &str,
        query: &ChargeQuery,
    ) -> Result<(String, Option<String>), ClientError> {
        let request = self.http.get(self.url(path)).query(query);
        let response = request.bearer_auth(&self.key).send().await?;
        let status = response.status().as_u16();
        let next = response
            .headers()
            .get(crate::journal::NEXT_CURSOR_HEADER)
            .and_then(|cursor| cursor.to_str().ok())
            .map(str::to_owned);
        let body = response.bytes().await?;
        match String::from_utf8(body.to_vec()) {
            Ok(csv) if (200..300).contains(&status) => Ok((csv, next)),
            _ => Err(refusal(status, &body)),
        }
    }
}

/// A client for a buyer's own API (`/v1/me…`), with one of its buyer keys.
#[derive(Clone)]
pub struct BuyerClient(AdminClient);

impl BuyerClient {
    pub fn new(base_url: &str, buyer_key: &str) -> BuyerClient {
        BuyerClient(AdminClient::new(base_url, buyer_key))
    }

    pub async fn whoami(&self) -> Result<Whoami, ClientError> {
        self.0.call(self.0.http.get(self.0.url(path::WHOAMI))).await
    }

    /// The buyer's account and tokens.
    pub async fn me(&self) -> Result<BuyerView, ClientError> {
        self.0.call(self.0.http.get(self.0.url(path::ME))).await
    }

    pub async fn issue_token(
        &self,
        request: &BuyerTokenRequest,
    ) -> Result<IssuedToken, ClientError> {
        let url = self.0.url(&format!("{}/tokens", path::ME));
        self.0.call(self.0.http.post(url).json(request)).await
    }

    pub async fn token(&self, token_id: &str) -> Result<TokenView, ClientError> {
        let url = self.0.id_url(&format!("{}/tokens", path::ME), token_id, "");
        self.0.call(self.0.http.get(url)).await
    }

    /// The kill switch on one of the buyer's tokens.
    pub async fn revoke_token(&self, token_id: &str) -> Result<TokenView, ClientError> {
        let url = self.0.id_url(&format!("{}/tokens", path::ME), token_id, "/revoke");
        self.0.call(self.0.http.post(url)).await
    }

    pub async fn mint_child(
        &self,
        parent_id: &str,
        request: &ChildTokenRequest,
    ) -> Result<IssuedToken, ClientError> {
        let url = self.0.id_url(&format!("{}/tokens", path::ME), parent_id, "/children");
        self.0.call(self.0.http.post(url).json(request)).await
    }

    /// The panic button: every one of the buyer's tokens.
    pub async fn revoke_all(&self) -> Result<BuyerRevocation, ClientError> {
        self.0.call(self.0.http.post(self.0.url(&format!("{}/revoke", path::ME)))).await
    }

    pub async fn charges(&self, query: &ChargeQuery) -> Result<ChargePage, ClientError> {
        let url = self.0.url(&format!("{}/charges", path::ME));
        self.0.call(self.0.http.get(url).query(query)).await
    }

    pub async fn charges_csv(
        &self,
        query: &ChargeQuery,
    ) -> Result<(String, Option<String>), ClientError> {
        self.0.csv(&format!("{}/charges.csv", path::ME), query).await
    }

    pub async fn charge(&self, charge_id: &str) -> Result<ChargeView, ClientError> {
        let url = self.0.id_url(&format!("{}/charges", path::ME), charge_id, "");
        self.0.call(self.0.http.get(url)).await
    }
}

/// The error an unexpected answer makes: the ledger's error body, or the answer as it was.
fn refusal(status: u16, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(body) if !(200..300).contains(&status) => ClientError::Refused { status, body },
        _ => ClientError::Unexpected { status, body: String::from_utf8_lossy(body).into_owned() },
    }
}
