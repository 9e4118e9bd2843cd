//! `paystile-agent mcp`: the [`Agent`] as an MCP server over stdio (the official Rust SDK,
//! `rmcp`). Three tools: `call_paid_api` (a call that pays its 402 within the limits),
//! `budget` (what is left and what was spent where) and `last_offers` (what the last 402s
//! offered).
//!
//! Expected failures (a limit refusing a payment, a server that cannot be reached, a 402 the
//! agent cannot pay, a bad argument) are tool results with `isError: true` and the agent's
//! message, which the model reads and can act on; protocol errors are left to the SDK
//! (an unknown tool, arguments that do not match the schema). stdout is the protocol:
//! nothing else is written to it.

use std::collections::BTreeMap;
use std::sync::Arc;

use paystile_protocol::Usdc;
use paystile_protocol::headers::{self, IDEMPOTENCY_KEY};
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, Implementation, ServerCapabilities, ServerConfig};
use rmcp::{ServerHandler, ServiceExt as _, schemars, tool, tool_handler, tool_router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{Agent, AgentError, Fetched, Request};

/// The most of an answer's body returned to the model, in bytes of text: a larger body is
/// cut (at a character boundary) and `bodyTruncated` says so, with `bodyBytes` the whole
/// size. 64 KiB is about 16k tokens.
pub const MAX_BODY_TEXT: usize = 64 * 1024;

/// The answer headers returned to the model: the content's type and what paystile (and
/// x402) say about the payment.
pub const SELECTED_HEADERS: [&str; 5] =
    ["content-type", "x-charge-id", "x-amount-usdc", "x-remaining-usdc", "payment-response"];

const INSTRUCTIONS: &str = "paystile-agent calls HTTP APIs that charge per call and pays \
their HTTP 402 Payment Required answers with the wallet it was started with (a Pay Token, an \
L402 Lightning wallet, an x402 key). It never pays more than its limits: a session budget in \
USDC, a per-call maximum, and a list of origins it may pay. Limits are checked before anything \
is paid; a refusal says which limit and what is left. Use `budget` to see what is left and \
`last_offers` to see what servers asked for.";

/// The arguments of `call_paid_api`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct CallPaidApi {
    /// The URL to call (http or https), e.g. `http://127.0.0.1:10000/v1/forecast/oslo`.
    pub url: String,
    /// The HTTP method; GET when omitted.
    #[serde(default)]
    pub method: Option<String>,
    /// Request headers, name to value (e.g. {"Accept": "application/json"}). Payment
    /// headers are added by the agent; do not send credentials here.
    #[serde(default)]
    pub headers: Option<BTreeMap<String, String>>,
    /// The request body, as text (e.g. JSON for a POST).
    #[serde(default)]
    pub body: Option<String>,
    /// The most this one call may cost, in USDC, as a decimal string (e.g. "0.001"). It can
    /// only lower the agent's per-call maximum, never raise it. A call whose price is above
    /// it is refused before anything is paid.
    #[serde(default)]
    pub max_price_usdc: Option<String>,
    /// Sent as `Idempotency-Key`. Give one (any unique text, up to 255 characters) to a call
    /// that must not be charged twice, and the same one again when retrying it after an
    /// error that left its outcome unknown: a paystile gateway charges a key once and answers
    /// a retry with the first call's result.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// The MCP server: one [`Agent`], its limits and its spending for the whole session.
#[derive(Clone)]
pub struct PaystileMcp {
    agent: Arc<Agent>,
    tool_router: ToolRouter<PaystileMcp>,
}

#[tool_router]
impl PaystileMcp {
    pub fn new(agent: Agent) -> PaystileMcp {
        PaystileMcp { agent: Arc::new(agent), tool_router: Self::tool_router() }
    }

    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    #[tool(
        description = "Calls an HTTP API and, if it answers 402 Payment Required, pays it once \
        with the agent's wallet (Pay Token, L402 or x402, whichever the server offers and the \
        agent holds) and retries with the payment. Spends real money (USDC): the session \
        budget, the per-call maximum (lowered for this call by max_price_usdc) and the allowed \
        origins are checked BEFORE anything is paid, and a call that would exceed any of them \
        is refused with a message saying which limit and what is left; nothing is paid then. \
        Returns JSON: status, selected headers (content-type, x-charge-id, x-amount-usdc, \
        x-remaining-usdc, payment-response), body (text, cut at 65536 bytes; bodyTruncated \
        and bodyBytes say so), paid (scheme, amountUsdc, chargeId, transaction; null when \
        nothing was paid, e.g. an API that is free or a credential already bought), and the \
        session's spentUsdc and remainingUsdc. A credential that pays more calls (Pay Token, \
        L402) is reused for later calls to the same service.",
        annotations(
            title = "Call a paid API",
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false,
            open_world_hint = true
        )
    )]
    async fn call_paid_api(&self, Parameters(call): Parameters<CallPaidApi>) -> CallToolResult {
        match self.call(call).await {
            Ok(fetched) => text(&self.answer(&fetched)),
            Err(message) => CallToolResult::error(vec![ContentBlock::text(message)]),
        }
    }

    #[tool(
        description = "Shows the agent's spending limits and what this session spent: the \
        session budget, spent and remaining (USDC), the per-call maximum, the origins it may \
        pay, the spend per origin, and every payment made (time, url, scheme, amountUsdc, \
        chargeId). Pays nothing.",
        annotations(title = "Budget and spending", read_only_hint = true, open_world_hint = false)
    )]
    async fn budget(&self) -> CallToolResult {
        let agent = &self.agent;
        let limits = agent.limits();
        let payments = agent.payments();
        let mut by_origin: BTreeMap<String, Usdc> = BTreeMap::new();
        for payment in &payments {
            let sum = by_origin.entry(payment.origin.clone()).or_default();
            *sum = sum.checked_add(payment.amount_usdc).unwrap_or(Usdc::MAX);
        }
        let report = json!({
            "budgetUsdc": limits.budget,
            "spentUsdc": agent.spent(),
            "remainingUsdc": agent.remaining(),
            "maxPricePerCallUsdc": limits.max_price,
            "allowedOrigins": limits.allow_origins,
            "spentByOrigin": by_origin,
            "payments": payments,
        });
        text(&report)
    }

    #[tool(
        description = "Lists what the last HTTP 402 answers the agent met offered, newest \
        last: the URL and origin, the price (USDC) and service, and the schemes offered \
        (Bearer for a Pay Token, an L402 invoice, x402 exact offers with network, asset, payTo \
        and amount in atomic units), and any challenge that could not be read. Includes 402s \
        that were refused by a limit. Pays nothing.",
        annotations(title = "Last 402 offers", read_only_hint = true, open_world_hint = false)
    )]
    async fn last_offers(&self) -> CallToolResult {
        let offers = self.agent.last_offers();
        let report = json!({
            "offers": offers.iter().map(|o| {
                let mut value = serde_json::to_value(o).unwrap_or(Value::Null);
                value["schemes"] = json!(o.scheme_names());
                value
            }).collect::<Vec<_>>(),
        });
        text(&report)
    }
}

impl PaystileMcp {
    async fn call(&self, call: CallPaidApi) -> Result<Fetched, String> {
        let method = call.method.as_deref().map(str::trim).filter(|m| !m.is_empty());
        let mut request = Request::new(&method.unwrap_or("GET").to_ascii_uppercase(), &call.url)
            .map_err(|e| e.to_string())?;
        request.headers.extend(call.headers.unwrap_or_default());
        if let Some(key) = call.idempotency_key {
            if headers::idempotency_key(key.as_bytes()).is_none() {
                return Err(format!(
                    "invalid request: idempotency_key must be 1 to {} printable ASCII \
                     characters; nothing was paid",
                    headers::MAX_IDEMPOTENCY_KEY_LEN
                ));
            }
            request.headers.retain(|(name, _)| !name.eq_ignore_ascii_case(IDEMPOTENCY_KEY));
            request.headers.push((IDEMPOTENCY_KEY.to_owned(), key));
        }
        request.body = call.body.map(String::into_bytes);
        if let Some(max) = &call.max_price_usdc {
            let max: Usdc = max.trim().parse().map_err(|_| {
                format!(
                    "invalid request: max_price_usdc {max:?} is not a USDC amount (a decimal \
                     string such as \"0.001\"); nothing was paid"
                )
            })?;
            request.max_price = Some(max);
        }
        self.agent.fetch(request).await.map_err(|e: AgentError| {
            format!(
                "{e} (session: {} USDC spent, {} USDC left)",
                self.agent.spent(),
                self.agent.remaining()
            )
        })
    }

    fn answer(&self, fetched: &Fetched) -> Value {
        let headers: BTreeMap<&str, &str> = SELECTED_HEADERS
            .iter()
            .filter_map(|name| fetched.header(name).map(|value| (*name, value)))
            .collect();
        let (body, truncated) = body_text(&fetched.body);
        json!({
            "status": fetched.status,
            "headers": headers,
            "body": body,
            "bodyTruncated": truncated,
            "bodyBytes": fetched.body.len(),
            "paid": fetched.payment,
            "spentUsdc": self.agent.spent(),
            "remainingUsdc": self.agent.remaining(),
        })
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for PaystileMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("paystile-agent", env!("CARGO_PKG_VERSION")))
            .with_instructions(INSTRUCTIONS)
    }
}

/// Serves `agent` over stdin and stdout until the client closes them (before initializing
/// too: a client that starts the server and leaves is not an error).
pub async fn serve_stdio(agent: Agent) -> anyhow::Result<()> {
    use rmcp::service::ServerInitializeError;
    let service = match PaystileMcp::new(agent).serve(rmcp::transport::stdio()).await {
        Ok(service) => service,
        Err(
            ServerInitializeError::ConnectionClosed(_)
            | ServerInitializeError::ExpectedInitializeRequest(None),
        ) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    service.waiting().await?;
    Ok(())
}

fn text(value: &Value) -> CallToolResult {
    CallToolResult::success(vec![ContentBlock::text(value.to_string())])
}

/// The body as text, cut at [`MAX_BODY_TEXT`] bytes on a character boundary.
fn body_text(body: &[u8]) -> (String, bool) {
    let truncated = body.len() > MAX_BODY_TEXT;
    let mut text = String::from_utf8_lossy(&body[..body.len().min(MAX_BODY_TEXT)]).into_owned();
    if truncated {
        // A multi-byte character cut in two reads as U+FFFD at the end: drop it.
        while text.ends_with('\u{FFFD}') {
            text.pop();
        }
    }
    (text, truncated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_body_is_cut_at_a_character_boundary() {
        let (text, cut) = body_text(b"{\"ok\":true}");
        assert_eq!((text.as_str(), cut), ("{\"ok\":true}", false));
        let mut long = vec![b'a'; MAX_BODY_TEXT - 1];
        long.extend("é tail".as_bytes());
        let (text, cut) = body_text(&long);
        assert!(cut);
        assert_eq!(text.len(), MAX_BODY_TEXT - 1);
    }
}
