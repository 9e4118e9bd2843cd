//! What the end-to-end tests share: a stack per test on free ports in a temporary
//! directory, and a client that reads the gateway's answers.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use paystile_protocol::Usdc;
use paystile_protocol::l402;
use paystile_protocol::ledger_api::{IssueTokenRequest, IssuedToken, TokenView};
use serde_json::Value;
use tempfile::TempDir;

use crate::paths;
use crate::stack::{HttpFilter, Ports, Secrets, Stack, StackOptions};
use crate::upstream::UpstreamMode;

/// How long settlement (commits sent from the filter's tick) may take to reach the ledger.
const SETTLE_DEADLINE: Duration = Duration::from_secs(15);

/// A stack for one test; its directory (database, configs, logs) goes when it does.
pub struct TestStack {
    pub stack: Stack,
    pub http: reqwest::Client,
    _dir: TempDir,
}

/// A gateway answer, read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// The last value of each header.
    pub headers: HashMap<String, String>,
    /// Every `WWW-Authenticate` value, in order.
    pub challenges: Vec<String>,
    pub text: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// The L402 challenge's `(macaroon, invoice)`, if the answer carries one.
    pub fn l402_challenge(&self) -> Option<(String, String)> {
        self.challenges.iter().find_map(|value| {
            l402::parse_challenge(value).map(|(m, i)| (m.to_owned(), i.to_owned()))
        })
    }

    /// The body as JSON (`Null` if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }

    /// The error code of a gateway error body.
    pub fn code(&self) -> Option<String> {
        self.json()["code"].as_str().map(str::to_owned)
    }
}

impl TestStack {
    pub async fn start() -> anyhow::Result<TestStack> {
        TestStack::start_with(serde_json::json!({}), &[]).await
    }

    /// A stack whose filter configuration is patched with `filter` (RFC 7396) and whose
    /// ledger gets `ledger_args`.
    pub async fn start_with(filter: Value, ledger_args: &[&str]) -> anyhow::Result<TestStack> {
        TestStack::launch(filter, ledger_args, false).await
    }

    /// Like [`TestStack::start_with`], with the filter and the ledger logging everything.
    pub async fn start_verbose(filter: Value, ledger_args: &[&str]) -> anyhow::Result<TestStack> {
        TestStack::launch(filter, ledger_args, true).await
    }

    async fn launch(
        filter: Value,
        ledger_args: &[&str],
        verbose_logs: bool,
    ) -> anyhow::Result<TestStack> {
        let dir = TempDir::new()?;
        let stack = Stack::start(StackOptions {
            ports: Ports::ANY,
            secrets: Secrets::random(),
            dir: dir.path().to_path_buf(),
            filter,
            http_filter: HttpFilter::Paystile,
            ledger_args: ledger_args.iter().map(|a| (*a).to_owned()).collect(),
            envoy_workers: 2,
            verbose_logs,
            upstream: UpstreamMode::Echo,
        })
        .await?;
        let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build()?;
        Ok(TestStack { stack, http, _dir: dir })
    }

    /// The demo's service id and per-call price on `/v1/forecast…`.
    pub fn service_id(&self) -> String {
        self.stack.filter_config["service_id"].as_str().unwrap_or_default().to_owned()
    }

    pub fn forecast_price(&self) -> Usdc {
        self.stack.filter_config["routes"][0]["price_usdc"]
            .as_str()
            .and_then(|p| p.parse().ok())
            .unwrap_or_default()
    }

    /// Issues a Pay Token for this stack's service through the ledger's admin API.
    pub async fn issue(&self, limit: &str) -> anyhow::Result<IssuedToken> {
        let request = IssueTokenRequest {
            service_id: self.service_id(),
            limit_usdc: limit.parse()?,
            buyer_id: "e2e-agent".into(),
            buyer_tag: None,
            scope: None,
            expires_at: None,
            ttl_seconds: Some(3600),
            sandbox: false,
        };
        Ok(self.stack.admin.issue_token(&request).await?)
    }

    /// `GET path` on the gateway with `Authorization: <authorization>` and `extra` headers.
    pub async fn get(
        &self,
        path: &str,
        authorization: Option<&str>,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<Answer> {
        let mut request = self.http.get(self.stack.gateway_url(path));
        if let Some(authorization) = authorization {
            request = request.header("authorization", authorization);
        }
        for (name, value) in extra {
            request = request.header(*name, *value);
        }
        read(request.send().await?).await
    }

    /// `GET path` paid with the Pay Token `jwt`.
    pub async fn paid(&self, path: &str, jwt: &str) -> anyhow::Result<Answer> {
        self.get(path, Some(&format!("Bearer {jwt}")), &[]).await
    }

    /// Takes the L402 challenge of a 402 and pays its invoice through the sandbox: the
    /// `Authorization` value a client would then send.
    pub async fn buy_l402(&self, challenged: &Answer) -> anyhow::Result<String> {
        let (macaroon, invoice) =
            challenged.l402_challenge().context("the answer carries no L402 challenge")?;
        let paid = self.stack.admin.pay_sandbox_invoice(&invoice).await?;
        Ok(format!("L402 {macaroon}:{}", paid.preimage))
    }

    /// The token once every hold on it is settled (commits arrive from the filter's tick).
    pub async fn settled(&self, token_id: &str) -> anyhow::Result<TokenView> {
        let deadline = tokio::time::Instant::now() + SETTLE_DEADLINE;
        loop {
            let token = self.stack.admin.token(token_id).await?;
            if token.reserved_usdc.is_zero() {
                return Ok(token);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("holds on {token_id} still open after {SETTLE_DEADLINE:?}: {token:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub async fn read(response: reqwest::Response) -> anyhow::Result<Answer> {
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(name, value)| {
            (name.as_str().to_owned(), String::from_utf8_lossy(value.as_bytes()).into_owned())
        })
        .collect();
    let challenges = response
        .headers()
        .get_all("www-authenticate")
        .iter()
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
        .collect();
    let text = response.text().await?;
    Ok(Answer { status, headers, challenges, text })
}

/// Signs `claims` with PyJWT (an independent JWT implementation) with `alg`: `key` is the
/// HS256 secret, or for EdDSA the private JWK (JSON), whose `kid` goes in the header.
pub fn pyjwt(claims: &Value, key: &str, algorithm: &str) -> anyhow::Result<String> {
    const SCRIPT: &str = "import json, sys, jwt
claims, key, alg = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
headers = None
if alg == 'EdDSA':
    jwk = jwt.PyJWK(json.loads(key))
    key, headers = jwk.key, {'kid': jwk.key_id}
print(jwt.encode(claims, key, algorithm=alg, headers=headers))";
    let python = paths::python();
    let output = Command::new(&python)
        .args(["-W", "ignore", "-c", SCRIPT, &claims.to_string(), key, algorithm])
        .output()
        .with_context(|| {
            format!("cannot run {} (scripts/setup installs PyJWT)", python.display())
        })?;
    if !output.status.success() {
        bail!(
            "PyJWT failed (scripts/setup installs it): {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8(output.stdout)?.trim().to_owned())
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
