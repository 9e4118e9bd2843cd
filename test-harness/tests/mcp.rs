//! `paystile-agent mcp` driven by a real MCP client: the official MCP Python SDK (`mcp` on
//! PyPI, scripts/requirements.txt) starts the built binary over stdio, lists its tools and
//! calls them against a real Envoy running the release filter in front of the real ledger.
//! A Pay Token pays the priced route; a per-call maximum below the price is refused as a tool
//! error, before anything is charged.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use paystile_harness::e2e::TestStack;
use paystile_harness::paths;
use paystile_protocol::Usdc;
use paystile_protocol::ledger_api::ChargeQuery;
use serde_json::{Value, json};
use tempfile::TempDir;

/// The MCP client: starts the server given in the config (argv[1], JSON), initializes,
/// lists the tools and makes the calls listed, and prints what it saw as JSON. A call named
/// `sleep` pauses the client instead (a model that retries later).
const CLIENT: &str = r#"
import asyncio, json, sys
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

config = json.loads(sys.argv[1])

def result(answer):
    texts = [c.text for c in answer.content if getattr(c, "type", None) == "text"]
    return {"isError": bool(answer.is_error), "text": "".join(texts)}

async def main():
    server = StdioServerParameters(
        command=config["command"], args=config["args"], env=config["env"])
    out = {}
    async with stdio_client(server) as (read, write):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            out["server"] = init.server_info.name
            tools = (await session.list_tools()).tools
            out["tools"] = {t.name: {"description": t.description, "inputSchema": t.input_schema}
                            for t in tools}
            out["calls"] = []
            for name, arguments in config["calls"]:
                if name == "sleep":
                    await asyncio.sleep(arguments["seconds"])
                    out["calls"].append({"isError": False, "text": "{}"})
                    continue
                answer = await session.call_tool(name, arguments)
                out["calls"].append(result(answer))
    print(json.dumps(out))

asyncio.run(main())
"#;

fn usdc(amount: &str) -> Usdc {
    amount.parse().unwrap()
}

/// Runs the MCP client against `paystile-agent mcp` with `args` and `env`, making `calls`.
fn mcp_client(args: &[String], env: Value, calls: Value) -> Value {
    let agent = paths::agent_binary().unwrap();
    let config = json!({
        "command": agent.display().to_string(),
        "args": args,
        "env": env,
        "calls": calls,
    });
    let python = paths::python();
    let output = Command::new(&python)
        .args(["-W", "ignore", "-c", CLIENT, &config.to_string()])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the MCP client failed (is `mcp` installed? `.venv/bin/pip install -r \
         scripts/requirements.txt`): {stderr}"
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "the client printed no JSON ({e}): {}\n{stderr}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// A tool result's text, as JSON.
fn json_text(call: &Value) -> Value {
    serde_json::from_str(call["text"].as_str().unwrap()).unwrap_or_else(|e| panic!("{e}: {call}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_mcp_client_pays_with_a_pay_token_and_a_lowered_maximum_is_refused() {
    let stack = TestStack::start().await.unwrap();
    let token = stack.issue("1").await.unwrap();
    let dir = TempDir::new().unwrap();
    let log = dir.path().join("agent-spend.jsonl");
    let price = stack.forecast_price();
    let origin = paystile_agent::normalize_origin(&stack.stack.gateway_url("/")).unwrap();
    let below = Usdc::from_micros(price.micros() - 1).unwrap();

    // Limits by flag, the token and the spending log by environment, as a client config
    // would set them.
    let args = vec![
        "mcp".to_owned(),
        "--budget-usdc".to_owned(),
        "0.01".to_owned(),
        "--max-price-usdc".to_owned(),
        "0.005".to_owned(),
        "--allow-origin".to_owned(),
        origin.clone(),
    ];
    let env = json!({
        "PAYSTILE_PAY_TOKEN": token.jwt,
        "PAYSTILE_PAY_TOKEN_ORIGINS": origin,
        "PAYSTILE_AGENT_LOG": log.display().to_string(),
    });
    let oslo = stack.stack.gateway_url("/v1/forecast/oslo");
    let calls = json!([
        ["call_paid_api", {"url": oslo, "idempotency_key": "oslo-1"}],
        ["budget", {}],
        ["call_paid_api", {
            "url": stack.stack.gateway_url("/v1/forecast/bergen"),
            "max_price_usdc": below.to_string(),
        }],
        ["last_offers", {}],
        ["budget", {}],
        ["call_paid_api", {"url": "not a url"}],
        // The first call again, as a model retries one whose answer it lost; a little later,
        // since the gateway answers 409 while the first call's charge is still being
        // committed.
        ["sleep", {"seconds": 2}],
        ["call_paid_api", {"url": oslo, "idempotency_key": "oslo-1"}],
        ["budget", {}],
        ["call_paid_api", {"url": oslo, "idempotency_key": ""}],
    ]);
    let started = std::time::Instant::now();
    let out = mcp_client(&args, env, calls);
    eprintln!("MCP session (start, 10 tool calls, one paid) in {:?}", started.elapsed());

    assert_eq!(out["server"], "paystile-agent");
    let mut names: Vec<&str> =
        out["tools"].as_object().unwrap().keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["budget", "call_paid_api", "last_offers"]);
    let schema = &out["tools"]["call_paid_api"]["inputSchema"];
    assert_eq!(schema["required"], json!(["url"]), "{schema}");
    for property in ["url", "method", "headers", "body", "max_price_usdc", "idempotency_key"] {
        assert!(schema["properties"].get(property).is_some(), "{property}: {schema}");
    }
    let description = out["tools"]["call_paid_api"]["description"].as_str().unwrap();
    assert!(description.contains("BEFORE anything is paid"), "{description}");

    // Paid with the Pay Token: 200, and the charge is in the ledger's journal.
    let calls = out["calls"].as_array().unwrap();
    assert_eq!(calls[0]["isError"], false, "{}", calls[0]);
    let paid = json_text(&calls[0]);
    assert_eq!(paid["status"], 200, "{paid}");
    let charge_id = paid["headers"]["x-charge-id"].as_str().unwrap().to_owned();
    assert_eq!(paid["paid"]["scheme"], "payToken");
    assert_eq!(paid["paid"]["amountUsdc"], price.to_string());
    assert_eq!(paid["paid"]["chargeId"], charge_id.as_str());
    assert_eq!(paid["headers"]["x-amount-usdc"], price.to_string());
    assert!(paid["body"].as_str().unwrap().contains("oslo"), "{paid}");
    assert_eq!(paid["bodyTruncated"], false);
    let journal = stack.stack.admin.charges(&ChargeQuery::default()).await.unwrap().charges;
    assert_eq!(journal.len(), 1, "{journal:?}");
    assert_eq!(journal[0].charge_id, charge_id);
    assert_eq!(journal[0].amount_usdc, price);

    // The budget: the price spent, all at the gateway.
    let budget = json_text(&calls[1]);
    assert_eq!(budget["spentUsdc"], price.to_string(), "{budget}");
    assert_eq!(budget["budgetUsdc"], usdc("0.01").to_string());
    assert_eq!(budget["remainingUsdc"], usdc("0.01").saturating_sub(price).to_string());
    assert_eq!(budget["maxPricePerCallUsdc"], usdc("0.005").to_string());
    assert_eq!(budget["allowedOrigins"], json!([origin]));
    assert_eq!(budget["spentByOrigin"][&origin], price.to_string());
    assert_eq!(budget["payments"].as_array().unwrap().len(), 1);

    // A per-call maximum below the price: a tool error the model can read, nothing charged.
    assert_eq!(calls[2]["isError"], true, "{}", calls[2]);
    let refusal = calls[2]["text"].as_str().unwrap();
    assert!(refusal.contains("refused before paying"), "{refusal}");
    assert!(
        refusal.contains(&format!("per-call maximum of {below} USDC (lowered for this call")),
        "{refusal}"
    );
    assert!(refusal.contains("Nothing was paid"), "{refusal}");
    let after = stack.stack.admin.charges(&ChargeQuery::default()).await.unwrap().charges;
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(json_text(&calls[4])["spentUsdc"], price.to_string());

    // What the 402s offered (oslo's, then bergen's: a path's first call meets its 402, so
    // its price is known before the token is sent): a Bearer challenge at the route's price.
    let offers = json_text(&calls[3])["offers"].clone();
    assert_eq!(offers.as_array().unwrap().len(), 2, "{offers}");
    assert!(offers[1]["url"].as_str().unwrap().ends_with("/v1/forecast/bergen"), "{offers}");
    assert_eq!(offers[0]["bearer"], true);
    assert_eq!(offers[0]["price"], price.to_string());
    assert_eq!(offers[0]["origin"], origin.as_str());
    assert!(offers[0]["schemes"].as_array().unwrap().contains(&json!("Bearer (Pay Token)")));

    // A bad argument is a tool error too, not a protocol error.
    assert_eq!(calls[5]["isError"], true, "{}", calls[5]);
    assert!(calls[5]["text"].as_str().unwrap().contains("bad URL"), "{}", calls[5]);

    // The retry with the same Idempotency-Key: the gateway answers with the first call's
    // charge and charges nothing more, and the agent counts nothing more.
    let replayed = json_text(&calls[7]);
    assert_eq!(replayed["status"], 200, "{replayed}");
    assert_eq!(replayed["headers"]["x-charge-id"], charge_id.as_str(), "{replayed}");
    assert_eq!(replayed["paid"], Value::Null, "{replayed}");
    assert_eq!(json_text(&calls[8])["spentUsdc"], price.to_string());
    let after = stack.stack.admin.charges(&ChargeQuery::default()).await.unwrap().charges;
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(calls[9]["isError"], true, "{}", calls[9]);
    assert!(calls[9]["text"].as_str().unwrap().contains("idempotency_key must be"), "{}", calls[9]);

    // The spending log holds the one payment.
    let lines = std::fs::read_to_string(&log).unwrap();
    assert_eq!(lines.lines().count(), 1, "{lines}");
    assert!(lines.contains(&charge_id));

    // A fresh session whose per-call maximum is below the price: max_price_usdc cannot raise
    // it, and the 402 is refused before the token is sent.
    let mut args = args;
    args[4] = below.to_string();
    let env = json!({
        "PAYSTILE_PAY_TOKEN": token.jwt,
        "PAYSTILE_PAY_TOKEN_ORIGINS": origin,
        "PAYSTILE_AGENT_LOG": log.display().to_string(),
    });
    let calls = json!([
        ["call_paid_api", {"url": oslo, "max_price_usdc": "1"}],
        ["budget", {}],
    ]);
    let out = mcp_client(&args, env, calls);
    let calls = out["calls"].as_array().unwrap();
    assert_eq!(calls[0]["isError"], true, "{}", calls[0]);
    let refusal = calls[0]["text"].as_str().unwrap();
    assert!(
        refusal.contains(&format!("per-call maximum of {below} USDC (--max-price-usdc")),
        "{refusal}"
    );
    assert_eq!(json_text(&calls[1])["spentUsdc"], Usdc::ZERO.to_string());
    let after = stack.stack.admin.charges(&ChargeQuery::default()).await.unwrap().charges;
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 1);
}
