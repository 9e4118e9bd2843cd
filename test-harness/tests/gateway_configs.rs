#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The gateway configurations in `envoy-config/` (Kong, Istio, Envoy) and Kong's filter schema,
//! `envoy-config/kong/paystile_filter.meta.json` (JSON Schema draft 4), against the filter's own
//! validation, `Config::from_json`:
//! - the schema file has the shape Kong requires and uses draft 4 only;
//! - every shipped filter configuration passes the schema and the filter;
//! - for a set of good and bad configurations, the schema accepts exactly what the filter
//!   accepts (and the filter's refusal names the field at fault);
//! - the rules the schema cannot express are listed: the schema accepts, the filter refuses.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use jsonschema::Validator;
use paystile_filter::config::{Config, ConfigError};
use paystile_harness::envoy::EnvoyConfig;
use paystile_harness::paths::repo_root;
use serde_json::{Value, json};

/// The filter's name in Kong: its file name in `wasm_filters_path`, without `.wasm`.
const KONG_FILTER: &str = "paystile_filter";
const META_JSON: &str = "envoy-config/kong/paystile_filter.meta.json";
const DRAFT_4: &str = "http://json-schema.org/draft-04/schema#";

fn read(relative: &str) -> String {
    let path = repo_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn yaml(relative: &str) -> Value {
    serde_norway::from_str(&read(relative)).unwrap_or_else(|e| panic!("{relative}: not YAML: {e}"))
}

fn meta() -> Value {
    serde_json::from_str(&read(META_JSON)).unwrap_or_else(|e| panic!("{META_JSON}: {e}"))
}

fn schema() -> Validator {
    jsonschema::draft4::new(&meta()["config_schema"]).expect("the config schema compiles")
}

fn schema_verdict(schema: &Validator, config: &Value) -> Result<(), String> {
    let errors: Vec<String> =
        schema.iter_errors(config).map(|e| format!("{}: {e}", e.instance_path())).collect();
    if errors.is_empty() { Ok(()) } else { Err(errors.join("; ")) }
}

fn filter_verdict(json: &str) -> Result<(), ConfigError> {
    Config::from_json(json.as_bytes()).map(|_| ())
}

/// A configuration both the schema and the filter must accept.
fn assert_accepted(schema: &Validator, origin: &str, config: &Value) {
    if let Err(errors) = schema_verdict(schema, config) {
        panic!("{origin}: the schema refuses the configuration: {errors}");
    }
    if let Err(error) = filter_verdict(&config.to_string()) {
        panic!("{origin}: the filter refuses the configuration: {error}");
    }
}

// ---------------------------------------------------------------------------------------------
// The schema file
// ---------------------------------------------------------------------------------------------

/// Every keyword of JSON Schema draft 4 (validation and metadata). Kong validates filter
/// configurations with a draft 4 validator, which ignores keywords of later drafts (`const`,
/// `if`, numeric `exclusiveMinimum`, ...): such a keyword would silently check nothing.
const DRAFT_4_KEYWORDS: &[&str] = &[
    "$schema",
    "id",
    "title",
    "description",
    "default",
    "multipleOf",
    "maximum",
    "exclusiveMaximum",
    "minimum",
    "exclusiveMinimum",
    "maxLength",
    "minLength",
    "pattern",
    "additionalItems",
    "items",
    "maxItems",
    "minItems",
    "uniqueItems",
    "maxProperties",
    "minProperties",
    "required",
    "additionalProperties",
    "definitions",
    "properties",
    "patternProperties",
    "dependencies",
    "enum",
    "type",
    "allOf",
    "anyOf",
    "oneOf",
    "not",
    "format",
];

/// Walks every subschema, calling `visit(path, schema)`.
fn walk(path: &str, schema: &Value, visit: &mut dyn FnMut(&str, &serde_json::Map<String, Value>)) {
    let Some(object) = schema.as_object() else { return };
    visit(path, object);
    for (keyword, value) in object {
        match (keyword.as_str(), value) {
            (
                "properties" | "patternProperties" | "definitions" | "dependencies",
                Value::Object(map),
            ) => {
                for (name, sub) in map {
                    walk(&format!("{path}/{keyword}/{name}"), sub, visit);
                }
            }
            ("allOf" | "anyOf" | "oneOf" | "items", Value::Array(list)) => {
                for (i, sub) in list.iter().enumerate() {
                    walk(&format!("{path}/{keyword}/{i}"), sub, visit);
                }
            }
            ("items" | "not" | "additionalProperties" | "additionalItems", sub) => {
                walk(&format!("{path}/{keyword}"), sub, visit);
            }
            _ => {}
        }
    }
}

#[test]
fn meta_json_has_the_shape_kong_requires() {
    let meta = meta();
    // Kong reads `<filter>.meta.json` beside `<filter>.wasm`: `{"config_schema": <schema>}`.
    let keys: Vec<&String> = meta.as_object().expect("meta.json is a JSON object").keys().collect();
    assert_eq!(keys, ["config_schema"], "meta.json holds config_schema and nothing else");
    let schema = &meta["config_schema"];
    assert!(schema.is_object(), "config_schema is a schema object");
    // Kong overwrites $schema with draft 4; ours says so too, so other tools read it the same.
    assert_eq!(schema["$schema"], DRAFT_4);
    if let Err(error) = jsonschema::draft4::meta::validate(schema) {
        panic!("config_schema is not a valid draft 4 schema: {error}");
    }

    let mut problems = Vec::new();
    walk("", schema, &mut |path, object| {
        for keyword in object.keys() {
            if !DRAFT_4_KEYWORDS.contains(&keyword.as_str()) {
                problems.push(format!("{path}: {keyword:?} is not a draft 4 keyword"));
            }
        }
        // Every field of the configuration is explained to whoever reads Kong's errors.
        if let Some(Value::Object(properties)) = object.get("properties") {
            for (name, property) in properties {
                if property["description"].as_str().is_none_or(|d| d.trim().is_empty()) {
                    problems.push(format!("{path}/properties/{name}: no description"));
                }
            }
        }
        // The filter's sections all refuse unknown fields (serde deny_unknown_fields).
        let is_object_type = match object.get("type") {
            Some(Value::String(t)) => t == "object",
            Some(Value::Array(types)) => types.iter().any(|t| t == "object"),
            _ => false,
        };
        let describes_fields = object.contains_key("properties");
        if is_object_type
            && describes_fields
            && object.get("additionalProperties") != Some(&Value::Bool(false))
        {
            problems.push(format!("{path}: an object without additionalProperties: false"));
        }
    });
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // The rules left to the filter are listed where Kong users read the schema.
    let description = schema["description"].as_str().unwrap();
    for gap in [
        "budget_usdc",
        "capabilities",
        "kid",
        "bytes",
        "9223372036854.775807",
        "duplicate",
        "18446744.073709551615",
    ] {
        assert!(description.contains(gap), "the schema's description does not mention {gap}");
    }
}

// ---------------------------------------------------------------------------------------------
// The shipped configurations
// ---------------------------------------------------------------------------------------------

#[test]
fn the_kong_declarative_config_passes_the_schema_and_the_filter() {
    let kong = yaml("envoy-config/kong/kong.yml");
    assert_eq!(kong["_format_version"], "3.0");
    let mut configs = Vec::new();
    for service in kong["services"].as_array().expect("kong.yml has services") {
        for route in service["routes"].as_array().into_iter().flatten() {
            assert_eq!(route["strip_path"], false, "the upstream must get the path that is priced");
            for chain in route["filter_chains"].as_array().into_iter().flatten() {
                for filter in chain["filters"].as_array().into_iter().flatten() {
                    assert_eq!(filter["name"], KONG_FILTER, "a filter Kong would not find");
                    configs.push(filter["config"].clone());
                }
            }
        }
    }
    assert_eq!(configs.len(), 1, "kong.yml runs the filter on one route");
    let config = &configs[0];
    assert_accepted(&schema(), "kong.yml", config);
    // Kong dispatches to a host:port; an IP literal needs no DNS from the filter's timer.
    let upstream = config["ledger"]["upstream"].as_str().unwrap();
    assert!(upstream.parse::<SocketAddr>().is_ok(), "Kong's ledger.upstream {upstream:?}");
    // Kong's Lua re-encoding cannot keep an empty list a list, nor a null: kong.yml has neither.
    let mut awkward = Vec::new();
    find_empty_lists_and_nulls("", config, &mut awkward);
    assert!(awkward.is_empty(), "kong.yml config has empty lists or nulls at {awkward:?}");
    // The schema sits where Kong looks for it: beside the .wasm, named after the filter.
    assert!(META_JSON.ends_with(&format!("/{KONG_FILTER}.meta.json")));
}

fn find_empty_lists_and_nulls(path: &str, value: &Value, found: &mut Vec<String>) {
    match value {
        Value::Null => found.push(path.to_owned()),
        Value::Array(items) if items.is_empty() => found.push(path.to_owned()),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                find_empty_lists_and_nulls(&format!("{path}[{i}]"), item, found);
            }
        }
        Value::Object(map) => {
            for (key, item) in map {
                find_empty_lists_and_nulls(&format!("{path}.{key}"), item, found);
            }
        }
        _ => {}
    }
}

#[test]
fn kong_conf_turns_wasm_on_and_bounds_ledger_calls() {
    let text = read("envoy-config/kong/kong.conf");
    let settings: BTreeMap<&str, &str> = text
        .lines()
        .map(|line| line.split('#').next().unwrap_or("").trim())
        .filter(|line| !line.is_empty())
        .map(|line| {
            let (key, value) =
                line.split_once('=').unwrap_or_else(|| panic!("kong.conf: {line:?}"));
            (key.trim(), value.trim())
        })
        .collect();
    assert_eq!(settings.get("wasm"), Some(&"on"));
    assert!(settings.get("wasm_filters_path").is_some_and(|p| p.starts_with('/')));
    assert!(settings.get("declarative_config").is_some_and(|p| p.ends_with("/kong.yml")));
    for prefix in ["nginx_http_wasm_socket_", "nginx_wasm_socket_"] {
        for timeout in ["connect", "send", "read"] {
            let key = format!("{prefix}{timeout}_timeout");
            assert!(settings.contains_key(key.as_str()), "kong.conf does not set {key}");
        }
    }
}

#[test]
fn the_istio_wasm_plugin_passes_the_schema_and_the_filter() {
    let plugin = yaml("envoy-config/istio/wasmplugin.yaml");
    assert_eq!(plugin["apiVersion"], "extensions.istio.io/v1alpha1");
    assert_eq!(plugin["kind"], "WasmPlugin");
    let spec = &plugin["spec"];
    assert!(spec["url"].as_str().is_some_and(|url| url.starts_with("oci://")));
    let sha256 = spec["sha256"].as_str().expect("a sha256");
    assert!(sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit()), "{sha256:?}");
    assert_eq!(spec["phase"], "AUTHN");
    assert_eq!(spec["failStrategy"], "FAIL_CLOSE");
    let config = &spec["pluginConfig"];
    assert_accepted(&schema(), "wasmplugin.yaml", config);
    // In Istio the dispatch target is the cluster Istio makes for the ledger's Service.
    let upstream = config["ledger"]["upstream"].as_str().unwrap();
    assert!(
        upstream.starts_with("outbound|8787||paystile-ledger.")
            && upstream.ends_with(".svc.cluster.local"),
        "Istio's ledger.upstream {upstream:?}"
    );
}

#[test]
fn the_envoy_demo_config_passes_the_schema_and_the_filter() {
    let config = EnvoyConfig::demo().unwrap().filter_config().unwrap();
    assert_accepted(&schema(), "envoy.yaml", &config);
    assert_eq!(config["ledger"]["upstream"], "paystile_ledger", "Envoy dispatches to a cluster");
}

// ---------------------------------------------------------------------------------------------
// The schema accepts exactly what the filter accepts
// ---------------------------------------------------------------------------------------------

fn base() -> Value {
    json!({
        "service_id": "weather",
        "routes": [
            {"path_prefix": "/v1/forecast/free", "price_usdc": "0"},
            {"path_prefix": "/v1/forecast", "price_usdc": "0.001"},
            {"path": "/v1/report", "methods": ["GET", "post"], "price_usdc": "0.25"}
        ],
        "ledger": {"upstream": "127.0.0.1:8787", "gateway_key": "gateway-key-0123456789"},
        "pay_token": {"keys": [{"alg": "HS256", "secret": "a-pay-token-secret-of-32-chars!!"}]}
    })
}

fn l402_section() -> Value {
    json!({"secret": "an-l402-secret-of-32-characters!", "budget_usdc": "1", "sats_per_usdc": 1000})
}

/// The base configuration with `change` applied.
fn edit(change: impl FnOnce(&mut Value)) -> Value {
    let mut config = base();
    change(&mut config);
    config
}

/// The base configuration with an `l402` section, and `change` applied.
fn edit_l402(change: impl FnOnce(&mut Value)) -> Value {
    edit(|c| {
        c["l402"] = l402_section();
        change(c);
    })
}

fn remove(value: &mut Value, key: &str) {
    value.as_object_mut().unwrap().remove(key).unwrap_or_else(|| panic!("no {key} to remove"));
}

struct Case {
    name: &'static str,
    config: Value,
    /// `None`: accepted; `Some(field)`: refused, naming `field`.
    refused_at: Option<&'static str>,
}

fn good(name: &'static str, config: Value) -> Case {
    Case { name, config, refused_at: None }
}

fn bad(name: &'static str, field: &'static str, config: Value) -> Case {
    Case { name, config, refused_at: Some(field) }
}

/// RFC 8037's example Ed25519 public key (appendix A.2).
const ED25519_X: &str = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";

/// An Ed25519 public JWK with `changes` merged in.
fn jwk(changes: Value) -> Value {
    let mut key = json!({"kty": "OKP", "crv": "Ed25519", "x": ED25519_X});
    for (name, value) in changes.as_object().into_iter().flatten() {
        key[name] = value.clone();
    }
    key
}

fn good_cases() -> Vec<Case> {
    vec![
        good("the minimal configuration", base()),
        good("an Ed25519 public JWK", edit(|c| c["pay_token"]["keys"] = json!([jwk(json!({}))]))),
        good(
            "the ledger's published JWK beside an HS256 key",
            edit(|c| {
                let published = jwk(json!({"kid": "2026-12", "alg": "EdDSA", "use": "sig"}));
                c["pay_token"]["keys"] = json!([published, c["pay_token"]["keys"][0].clone()]);
            }),
        ),
        good(
            "every field set",
            json!({
                "service_id": "weather",
                "routes": [
                    {"path_prefix": "/v1/free", "price_usdc": "0"},
                    {"path": "/v1/report", "methods": ["GET"], "price_usdc": "0.25", "capability": "report"}
                ],
                "ledger": {
                    "upstream": "paystile_ledger", "authority": "ledger.local", "timeout_ms": 1000,
                    "gateway_key": "gateway-key-0123456789", "settle_interval_ms": 50,
                    "prefetch_holds": 8, "prefetch_max_age_ms": 1000
                },
                "pay_token": {
                    "keys": [{"kid": "2026-11", "alg": "HS256", "secret": "a-pay-token-secret-of-32-chars!!"}],
                    "issuer": "paystile", "audience": "weather", "leeway_seconds": 60
                },
                "l402": {
                    "secret": "an-l402-secret-of-32-characters!", "budget_usdc": "1.00",
                    "sats_per_usdc": 1000, "valid_seconds": 86400, "capabilities": ["report"],
                    "accept_sandbox": true, "challenge_pool": 1024
                },
                "billable_statuses": ["2xx", "304"],
                "failure_mode": "open"
            }),
        ),
        good(
            "optional fields null",
            edit(|c| {
                c["routes"][2]["path_prefix"] = Value::Null;
                c["routes"][2]["capability"] = Value::Null;
                c["routes"][0]["methods"] = Value::Null;
                c["routes"][0]["path"] = Value::Null;
                for key in [
                    "authority",
                    "timeout_ms",
                    "settle_interval_ms",
                    "prefetch_holds",
                    "prefetch_max_age_ms",
                ] {
                    c["ledger"][key] = Value::Null;
                }
                for key in ["issuer", "audience", "leeway_seconds"] {
                    c["pay_token"][key] = Value::Null;
                }
                c["pay_token"]["keys"][0]["kid"] = Value::Null;
                c["l402"] = Value::Null;
                c["billable_statuses"] = Value::Null;
            }),
        ),
        good("l402 only", edit_l402(|c| remove(c, "pay_token"))),
        good("l402, and pay_token null", edit_l402(|c| c["pay_token"] = Value::Null)),
        good("pay_token and l402", edit_l402(|_| {})),
        good(
            "l402 optional fields null",
            edit_l402(|c| {
                c["l402"]["valid_seconds"] = Value::Null;
                c["l402"]["capabilities"] = Value::Null;
                c["l402"]["challenge_pool"] = Value::Null;
            }),
        ),
        good("a whole JSON number price", edit(|c| c["routes"][1]["price_usdc"] = json!(1))),
        good("a JSON number price of 0", edit(|c| c["routes"][1]["price_usdc"] = json!(0))),
        good(
            "a price with leading zeros",
            edit(|c| c["routes"][1]["price_usdc"] = json!("000.000001")),
        ),
        good(
            "a price with 6 decimals",
            edit(|c| c["routes"][1]["price_usdc"] = json!("12.345678")),
        ),
        good(
            "the largest whole number price",
            edit(|c| c["routes"][1]["price_usdc"] = json!(9_223_372_036_854_u64)),
        ),
        good(
            "the largest price (2^63-1 micro-USDC)",
            edit(|c| c["routes"][1]["price_usdc"] = json!("9223372036854.775807")),
        ),
        good(
            "13 integer digits behind leading zeros",
            edit(|c| c["routes"][1]["price_usdc"] = json!("0009223372036854")),
        ),
        good(
            "statuses and classes at their bounds",
            edit(|c| c["billable_statuses"] = json!(["100", "599", "1xx", "5xx", "200"])),
        ),
        good("failure mode open", edit(|c| c["failure_mode"] = json!("open"))),
        good(
            "timeouts at their bounds",
            edit(|c| {
                c["ledger"]["timeout_ms"] = json!(1);
                c["ledger"]["settle_interval_ms"] = json!(60_000);
            }),
        ),
        good(
            "prefetching at its bounds",
            edit(|c| {
                c["ledger"]["prefetch_holds"] = json!(64);
                c["ledger"]["prefetch_max_age_ms"] = json!(100);
            }),
        ),
        good(
            "prefetching off, and the longest max age",
            edit(|c| {
                c["ledger"]["prefetch_holds"] = json!(0);
                c["ledger"]["prefetch_max_age_ms"] = json!(10_000);
            }),
        ),
        good("a 255-byte service id", edit(|c| c["service_id"] = json!("s".repeat(255)))),
        good(
            "a 16-character gateway key of punctuation",
            edit(|c| c["ledger"]["gateway_key"] = json!("!\"#$%&'()*+,-./0")),
        ),
        good(
            "an l402 secret of 32 non-ASCII characters",
            edit_l402(|c| c["l402"]["secret"] = json!("é".repeat(32))),
        ),
        good(
            "l402 capabilities that priced routes name",
            edit_l402(|c| {
                c["routes"][1]["capability"] = json!("forecast");
                c["routes"][2]["capability"] = json!("report");
                c["l402"]["capabilities"] = json!(["forecast", "report"]);
            }),
        ),
        good("empty l402 capabilities", edit_l402(|c| c["l402"]["capabilities"] = json!([]))),
        good("a whole JSON number budget", edit_l402(|c| c["l402"]["budget_usdc"] = json!(1))),
        good(
            "the largest exchange rate on a micro-USDC budget",
            edit_l402(|c| {
                c["routes"] = json!([{"path": "/a", "price_usdc": "0.000001"}]);
                c["l402"]["budget_usdc"] = json!("0.000001");
                c["l402"]["sats_per_usdc"] = json!(u64::MAX);
            }),
        ),
        good(
            "integers at their bounds",
            edit_l402(|c| {
                c["l402"]["valid_seconds"] = json!(315_360_000);
                c["l402"]["challenge_pool"] = json!(4096);
                c["pay_token"]["leeway_seconds"] = json!(u64::MAX);
            }),
        ),
        good("no leeway", edit(|c| c["pay_token"]["leeway_seconds"] = json!(0))),
        good("the challenge pool off", edit_l402(|c| c["l402"]["challenge_pool"] = json!(0))),
        good(
            "two keys with different kids, and two without",
            edit(|c| {
                c["pay_token"]["keys"] = json!([
                    {"kid": "a", "alg": "HS256", "secret": "a-pay-token-secret-of-32-chars!1"},
                    {"kid": "b", "alg": "HS256", "secret": "a-pay-token-secret-of-32-chars!2"},
                    {"alg": "HS256", "secret": "a-pay-token-secret-of-32-chars!3"},
                    {"alg": "HS256", "secret": "a-pay-token-secret-of-32-chars!4"}
                ]);
            }),
        ),
        good(
            "paths: the root, and non-ASCII",
            edit(|c| {
                c["routes"][0]["path_prefix"] = json!("/météo");
                c["routes"][2]["path"] = json!("/");
            }),
        ),
        good(
            "a route capability without l402",
            edit(|c| c["routes"][1]["capability"] = json!("read")),
        ),
        good(
            "with l402, a service id of allowed punctuation",
            edit_l402(|c| c["service_id"] = json!("a!b-c.d_e~f/g;h<i>j")),
        ),
        good(
            "with capabilities, a free route needs none",
            edit_l402(|c| {
                c["routes"] = json!([
                    {"path": "/free", "price_usdc": "0"},
                    {"path": "/paid", "price_usdc": "0.1", "capability": "read"}
                ]);
                c["l402"]["capabilities"] = json!(["read"]);
            }),
        ),
        good("a metered route", metered(json!({}))),
        good(
            "a metered route with a null price",
            edit(|c| {
                c["routes"][1] = json!({"path_prefix": "/v1/chat", "price_usdc": null, "metered": metered_section(json!({}))});
            }),
        ),
        good("a priced route with metered null", edit(|c| c["routes"][1]["metered"] = Value::Null)),
        good(
            "a metered route with a whole-number maximum and a 12-decimal unit price",
            metered(json!({"max_usdc": 2, "unit_price_usdc": "0.000000000001"})),
        ),
        good("a units header in capitals", metered(json!({"units_header": "X-Usage-Tokens"}))),
        good(
            "an l402 budget covering a metered maximum",
            edit_l402(|c| {
                c["routes"] = json!([{"path": "/chat", "metered": metered_section(json!({"max_usdc": "0.05"}))}]);
            }),
        ),
    ]
}

/// A valid `metered` section with `changes` applied.
fn metered_section(changes: Value) -> Value {
    let mut metered =
        json!({"max_usdc": "0.5", "unit_price_usdc": "0.000002", "units_header": "x-usage-tokens"});
    for (key, value) in changes.as_object().unwrap() {
        metered[key] = value.clone();
    }
    metered
}

/// The base configuration with `routes[1]` metered by `metered_section(changes)`.
fn metered(changes: Value) -> Value {
    edit(|c| {
        c["routes"][1] = json!({"path_prefix": "/v1/chat", "metered": metered_section(changes)})
    })
}

fn bad_metered_cases() -> Vec<Case> {
    let field = "routes[1].metered";
    vec![
        bad(
            "a price and metered both",
            "routes[1]",
            edit(|c| c["routes"][1]["metered"] = metered_section(json!({}))),
        ),
        bad(
            "metered null and no price",
            "routes[1]",
            edit(|c| c["routes"][1] = json!({"path": "/m", "metered": null})),
        ),
        bad(
            "metered as a list",
            field,
            edit(|c| c["routes"][1] = json!({"path": "/m", "metered": ["0.5", "0.000002", "x"]})),
        ),
        bad(
            "metered as a string",
            field,
            edit(|c| c["routes"][1] = json!({"path": "/m", "metered": "0.5"})),
        ),
        bad(
            "metered without units_header",
            field,
            edit(|c| {
                c["routes"][1] =
                    json!({"path": "/m", "metered": {"max_usdc": "0.5", "unit_price_usdc": "0.1"}});
            }),
        ),
        bad(
            "metered with an unknown field",
            "routes[1].metered.per",
            metered(json!({"per": "token"})),
        ),
        bad(
            "a metered maximum of 0",
            "routes[1].metered.max_usdc",
            metered(json!({"max_usdc": "0.000"})),
        ),
        bad(
            "a metered maximum of number 0",
            "routes[1].metered.max_usdc",
            metered(json!({"max_usdc": 0})),
        ),
        bad(
            "a metered maximum with 7 decimals",
            "routes[1].metered.max_usdc",
            metered(json!({"max_usdc": "0.0000001"})),
        ),
        bad(
            "a negative metered maximum",
            "routes[1].metered.max_usdc",
            metered(json!({"max_usdc": "-1"})),
        ),
        bad(
            "a unit price of 0",
            "routes[1].metered.unit_price_usdc",
            metered(json!({"unit_price_usdc": "0.0"})),
        ),
        bad(
            "a unit price with 13 decimals",
            "routes[1].metered.unit_price_usdc",
            metered(json!({"unit_price_usdc": "0.0000000000001"})),
        ),
        bad(
            "a unit price as a number",
            "routes[1].metered.unit_price_usdc",
            metered(json!({"unit_price_usdc": 1})),
        ),
        bad(
            "a negative unit price",
            "routes[1].metered.unit_price_usdc",
            metered(json!({"unit_price_usdc": "-0.1"})),
        ),
        bad(
            "a pseudo-header for units",
            "routes[1].metered.units_header",
            metered(json!({"units_header": ":status"})),
        ),
        bad(
            "a units header with a space",
            "routes[1].metered.units_header",
            metered(json!({"units_header": "x usage"})),
        ),
        bad(
            "an empty units header",
            "routes[1].metered.units_header",
            metered(json!({"units_header": ""})),
        ),
    ]
}

fn bad_cases() -> Vec<Case> {
    vec![
        // Not a configuration at all.
        bad("null", ".", Value::Null),
        bad("a string", ".", json!("weather")),
        // Missing fields.
        bad("no service_id", ".", edit(|c| remove(c, "service_id"))),
        bad("no routes", ".", edit(|c| remove(c, "routes"))),
        bad("no ledger", ".", edit(|c| remove(c, "ledger"))),
        bad("no ledger.upstream", "ledger", edit(|c| remove(&mut c["ledger"], "upstream"))),
        bad("no ledger.gateway_key", "ledger", edit(|c| remove(&mut c["ledger"], "gateway_key"))),
        bad(
            "a route without a price",
            "routes[1]",
            edit(|c| remove(&mut c["routes"][1], "price_usdc")),
        ),
        bad(
            "a key without alg",
            "pay_token.keys[0].alg",
            edit(|c| remove(&mut c["pay_token"]["keys"][0], "alg")),
        ),
        bad(
            "a private JWK",
            "pay_token.keys[0].d",
            edit(|c| c["pay_token"]["keys"][0] = jwk(json!({"d": ED25519_X}))),
        ),
        bad(
            "an RSA JWK",
            "pay_token.keys[0].kty",
            edit(|c| c["pay_token"]["keys"][0] = jwk(json!({"kty": "RSA"}))),
        ),
        bad(
            "an Ed448 JWK",
            "pay_token.keys[0].crv",
            edit(|c| c["pay_token"]["keys"][0] = jwk(json!({"crv": "Ed448"}))),
        ),
        bad(
            "a JWK of 31 bytes",
            "pay_token.keys[0].x",
            edit(|c| c["pay_token"]["keys"][0] = jwk(json!({"x": &ED25519_X[..42]}))),
        ),
        bad(
            "a JWK with an HMAC alg",
            "pay_token.keys[0].alg",
            edit(|c| c["pay_token"]["keys"][0] = jwk(json!({"alg": "HS256"}))),
        ),
        bad(
            "a JWK for encryption",
            "pay_token.keys[0].use",
            edit(|c| c["pay_token"]["keys"][0] = jwk(json!({"use": "enc"}))),
        ),
        bad(
            "a JWK with a secret",
            "pay_token.keys[0]",
            edit(|c| c["pay_token"]["keys"][0] = jwk(json!({"secret": "s".repeat(40)}))),
        ),
        bad(
            "a key without secret",
            "pay_token.keys[0]",
            edit(|c| remove(&mut c["pay_token"]["keys"][0], "secret")),
        ),
        bad("pay_token without keys", "pay_token", edit(|c| c["pay_token"] = json!({}))),
        bad("l402 without budget", "l402", edit_l402(|c| remove(&mut c["l402"], "budget_usdc"))),
        bad("l402 without rate", "l402", edit_l402(|c| remove(&mut c["l402"], "sats_per_usdc"))),
        bad("l402 without secret", "l402", edit_l402(|c| remove(&mut c["l402"], "secret"))),
        // Unknown fields, in every section.
        bad("an unknown top-level field", "colour", edit(|c| c["colour"] = json!("red"))),
        bad(
            "an unknown route field",
            "routes[1].prices",
            edit(|c| c["routes"][1]["prices"] = json!("1")),
        ),
        bad(
            "an unknown ledger field",
            "ledger.url",
            edit(|c| c["ledger"]["url"] = json!("http://x")),
        ),
        bad(
            "an unknown pay_token field",
            "pay_token.algorithms",
            edit(|c| c["pay_token"]["algorithms"] = json!(["HS256"])),
        ),
        bad(
            "an unknown key field",
            "pay_token.keys[0].public_key",
            edit(|c| c["pay_token"]["keys"][0]["public_key"] = json!("x")),
        ),
        bad(
            "an unknown l402 field",
            "l402.invoice",
            edit_l402(|c| c["l402"]["invoice"] = json!("lnbc")),
        ),
        bad("a misspelt field", "failure", edit(|c| c["failure"] = json!("open"))),
        // service_id.
        bad("an empty service id", "service_id", edit(|c| c["service_id"] = json!(""))),
        bad(
            "a 256-byte service id",
            "service_id",
            edit(|c| c["service_id"] = json!("s".repeat(256))),
        ),
        bad("a numeric service id", "service_id", edit(|c| c["service_id"] = json!(7))),
        bad(
            "with l402, a service id with :",
            "service_id",
            edit_l402(|c| c["service_id"] = json!("a:b")),
        ),
        bad(
            "with l402, a service id with a space",
            "service_id",
            edit_l402(|c| c["service_id"] = json!("a b")),
        ),
        bad(
            "with l402, a non-ASCII service id",
            "service_id",
            edit_l402(|c| c["service_id"] = json!("météo")),
        ),
        // Routes.
        bad("no route", "routes", edit(|c| c["routes"] = json!([]))),
        bad("routes as an object", "routes", edit(|c| c["routes"] = json!({"path": "/a"}))),
        bad(
            "a path and a prefix",
            "routes[2]",
            edit(|c| c["routes"][2]["path_prefix"] = json!("/v1")),
        ),
        bad("neither path nor prefix", "routes[2]", edit(|c| remove(&mut c["routes"][2], "path"))),
        bad(
            "path and prefix both null",
            "routes[2]",
            edit(|c| {
                c["routes"][2]["path"] = Value::Null;
                c["routes"][2]["path_prefix"] = Value::Null;
            }),
        ),
        bad(
            "a path without its /",
            "routes[2].path",
            edit(|c| c["routes"][2]["path"] = json!("v1/report")),
        ),
        bad(
            "an empty prefix",
            "routes[1].path_prefix",
            edit(|c| c["routes"][1]["path_prefix"] = json!("")),
        ),
        bad(
            "a full URL as a path",
            "routes[2].path",
            edit(|c| c["routes"][2]["path"] = json!("http://x/a")),
        ),
        bad("no methods", "routes[2].methods", edit(|c| c["routes"][2]["methods"] = json!([]))),
        bad(
            "a method with a space",
            "routes[2].methods[0]",
            edit(|c| c["routes"][2]["methods"] = json!(["GE T"])),
        ),
        bad(
            "an empty method",
            "routes[2].methods[1]",
            edit(|c| c["routes"][2]["methods"] = json!(["GET", ""])),
        ),
        bad(
            "a method with a digit",
            "routes[2].methods[0]",
            edit(|c| c["routes"][2]["methods"] = json!(["GET2"])),
        ),
        bad(
            "methods as a string",
            "routes[2].methods",
            edit(|c| c["routes"][2]["methods"] = json!("GET")),
        ),
        bad(
            "an empty capability",
            "routes[0].capability",
            edit(|c| c["routes"][0]["capability"] = json!("")),
        ),
        bad(
            "a capability with ,",
            "routes[1].capability",
            edit(|c| c["routes"][1]["capability"] = json!("a,b")),
        ),
        bad(
            "a capability with =",
            "routes[1].capability",
            edit(|c| c["routes"][1]["capability"] = json!("a=b")),
        ),
        bad(
            "a capability with a space",
            "routes[1].capability",
            edit(|c| c["routes"][1]["capability"] = json!("a b")),
        ),
        bad(
            "a 256-character capability",
            "routes[1].capability",
            edit(|c| c["routes"][1]["capability"] = json!("c".repeat(256))),
        ),
        // Amounts.
        bad("a price with 7 decimals", "routes[1].price_usdc", price(json!("0.0000001"))),
        bad("a negative price", "routes[1].price_usdc", price(json!("-1"))),
        bad("a negative number price", "routes[1].price_usdc", price(json!(-1))),
        bad("a fractional number price", "routes[1].price_usdc", price(json!(1.5))),
        bad("a number price written 1.0", "routes[1].price_usdc", price(json!(1.0))),
        bad("a number price written -0", "routes[1].price_usdc", price(json!(-0.0))),
        bad(
            "a whole number price too large",
            "routes[1].price_usdc",
            price(json!(9_223_372_036_855_u64)),
        ),
        bad("a price of 14 integer digits", "routes[1].price_usdc", price(json!("10000000000000"))),
        bad("a price ending in a dot", "routes[1].price_usdc", price(json!("1."))),
        bad("a price starting with a dot", "routes[1].price_usdc", price(json!(".5"))),
        bad("a price with an exponent", "routes[1].price_usdc", price(json!("1e3"))),
        bad("a price with a plus sign", "routes[1].price_usdc", price(json!("+1"))),
        bad("a price with a space", "routes[1].price_usdc", price(json!(" 1"))),
        bad("a price with a trailing newline", "routes[1].price_usdc", price(json!("0.25\n"))),
        bad("a price with a comma", "routes[1].price_usdc", price(json!("0,25"))),
        bad("an empty price", "routes[1].price_usdc", price(json!(""))),
        bad("a price with Arabic digits", "routes[1].price_usdc", price(json!("٣"))),
        bad("a boolean price", "routes[1].price_usdc", price(json!(true))),
        // Ledger.
        bad("an empty upstream", "ledger.upstream", edit(|c| c["ledger"]["upstream"] = json!(""))),
        bad(
            "an empty authority",
            "ledger.authority",
            edit(|c| c["ledger"]["authority"] = json!("")),
        ),
        bad(
            "an authority that would inject a header",
            "ledger.authority",
            edit(|c| c["ledger"]["authority"] = json!("ledger\r\nx-injected: 1")),
        ),
        bad(
            "an authority with a space",
            "ledger.authority",
            edit(|c| c["ledger"]["authority"] = json!("paystile ledger")),
        ),
        bad("a timeout of 0", "ledger.timeout_ms", edit(|c| c["ledger"]["timeout_ms"] = json!(0))),
        bad(
            "a timeout of 60001",
            "ledger.timeout_ms",
            edit(|c| c["ledger"]["timeout_ms"] = json!(60_001)),
        ),
        bad(
            "a negative timeout",
            "ledger.timeout_ms",
            edit(|c| c["ledger"]["timeout_ms"] = json!(-1)),
        ),
        bad(
            "a timeout as a string",
            "ledger.timeout_ms",
            edit(|c| c["ledger"]["timeout_ms"] = json!("1000")),
        ),
        bad(
            "a timeout written 1000.0",
            "ledger.timeout_ms",
            edit(|c| c["ledger"]["timeout_ms"] = json!(1000.0)),
        ),
        bad(
            "a timeout too large for u64",
            "ledger.timeout_ms",
            edit(|c| c["ledger"]["timeout_ms"] = json!(1e20)),
        ),
        bad(
            "a settle interval of 0",
            "ledger.settle_interval_ms",
            edit(|c| c["ledger"]["settle_interval_ms"] = json!(0)),
        ),
        bad(
            "a settle interval of 60001",
            "ledger.settle_interval_ms",
            edit(|c| c["ledger"]["settle_interval_ms"] = json!(60_001)),
        ),
        bad(
            "65 prefetched holds",
            "ledger.prefetch_holds",
            edit(|c| c["ledger"]["prefetch_holds"] = json!(65)),
        ),
        bad(
            "a negative prefetch",
            "ledger.prefetch_holds",
            edit(|c| c["ledger"]["prefetch_holds"] = json!(-1)),
        ),
        bad(
            "a prefetch written 8.5",
            "ledger.prefetch_holds",
            edit(|c| c["ledger"]["prefetch_holds"] = json!(8.5)),
        ),
        bad(
            "a prefetch as a string",
            "ledger.prefetch_holds",
            edit(|c| c["ledger"]["prefetch_holds"] = json!("8")),
        ),
        bad(
            "a prefetch max age of 99 ms",
            "ledger.prefetch_max_age_ms",
            edit(|c| c["ledger"]["prefetch_max_age_ms"] = json!(99)),
        ),
        bad(
            "a prefetch max age of 10001 ms",
            "ledger.prefetch_max_age_ms",
            edit(|c| c["ledger"]["prefetch_max_age_ms"] = json!(10_001)),
        ),
        bad(
            "a 15-character gateway key",
            "ledger.gateway_key",
            edit(|c| c["ledger"]["gateway_key"] = json!("k".repeat(15))),
        ),
        bad(
            "a gateway key with a space",
            "ledger.gateway_key",
            edit(|c| c["ledger"]["gateway_key"] = json!("gateway key 0123456789")),
        ),
        bad(
            "a non-ASCII gateway key",
            "ledger.gateway_key",
            edit(|c| c["ledger"]["gateway_key"] = json!("clé-de-passerelle-0123")),
        ),
        // Pay Tokens.
        bad("no pay_token and no l402", "pay_token", edit(|c| remove(c, "pay_token"))),
        bad("pay_token null and no l402", "pay_token", edit(|c| c["pay_token"] = Value::Null)),
        bad("no key", "pay_token.keys", edit(|c| c["pay_token"]["keys"] = json!([]))),
        bad(
            "alg none",
            "pay_token.keys[0].alg",
            edit(|c| c["pay_token"]["keys"][0]["alg"] = json!("none")),
        ),
        bad(
            "alg RS256",
            "pay_token.keys[0].alg",
            edit(|c| c["pay_token"]["keys"][0]["alg"] = json!("RS256")),
        ),
        bad(
            "alg in lower case",
            "pay_token.keys[0].alg",
            edit(|c| c["pay_token"]["keys"][0]["alg"] = json!("hs256")),
        ),
        bad(
            "an empty secret",
            "pay_token.keys[0].secret",
            edit(|c| c["pay_token"]["keys"][0]["secret"] = json!("")),
        ),
        bad(
            "a 31-character HS256 secret (RFC 7518 wants 256 bits)",
            "pay_token.keys[0].secret",
            edit(|c| c["pay_token"]["keys"][0]["secret"] = json!("s".repeat(31))),
        ),
        bad(
            "a negative leeway",
            "pay_token.leeway_seconds",
            edit(|c| c["pay_token"]["leeway_seconds"] = json!(-1)),
        ),
        bad(
            "a leeway as a string",
            "pay_token.leeway_seconds",
            edit(|c| c["pay_token"]["leeway_seconds"] = json!("60")),
        ),
        bad("a numeric issuer", "pay_token.issuer", edit(|c| c["pay_token"]["issuer"] = json!(1))),
        // L402.
        bad(
            "a 31-character l402 secret",
            "l402.secret",
            edit_l402(|c| c["l402"]["secret"] = json!("s".repeat(31))),
        ),
        bad(
            "a budget of 0",
            "l402.budget_usdc",
            edit_l402(|c| c["l402"]["budget_usdc"] = json!("0")),
        ),
        bad(
            "a budget of 0.000",
            "l402.budget_usdc",
            edit_l402(|c| c["l402"]["budget_usdc"] = json!("000.000")),
        ),
        bad(
            "a number budget of 0",
            "l402.budget_usdc",
            edit_l402(|c| c["l402"]["budget_usdc"] = json!(0)),
        ),
        bad(
            "a budget with 7 decimals",
            "l402.budget_usdc",
            edit_l402(|c| c["l402"]["budget_usdc"] = json!("1.0000001")),
        ),
        bad(
            "a rate of 0",
            "l402.sats_per_usdc",
            edit_l402(|c| c["l402"]["sats_per_usdc"] = json!(0)),
        ),
        bad(
            "a rate as a string",
            "l402.sats_per_usdc",
            edit_l402(|c| c["l402"]["sats_per_usdc"] = json!("1000")),
        ),
        bad(
            "a challenge pool over 4096",
            "l402.challenge_pool",
            edit_l402(|c| c["l402"]["challenge_pool"] = json!(4097)),
        ),
        bad(
            "a negative challenge pool",
            "l402.challenge_pool",
            edit_l402(|c| c["l402"]["challenge_pool"] = json!(-1)),
        ),
        bad(
            "credentials valid 0 seconds",
            "l402.valid_seconds",
            edit_l402(|c| c["l402"]["valid_seconds"] = json!(0)),
        ),
        bad(
            "credentials valid over 10 years",
            "l402.valid_seconds",
            edit_l402(|c| c["l402"]["valid_seconds"] = json!(315_360_001)),
        ),
        bad(
            "a capability with :",
            "l402.capabilities[1]",
            edit_l402(|c| c["l402"]["capabilities"] = json!(["read", "a:b"])),
        ),
        bad(
            "an empty capability in l402",
            "l402.capabilities[0]",
            edit_l402(|c| c["l402"]["capabilities"] = json!([""])),
        ),
        bad(
            "accept_sandbox as a string",
            "l402.accept_sandbox",
            edit_l402(|c| c["l402"]["accept_sandbox"] = json!("yes")),
        ),
        bad(
            "accept_sandbox null",
            "l402.accept_sandbox",
            edit_l402(|c| c["l402"]["accept_sandbox"] = Value::Null),
        ),
        bad("l402 as a string", "l402", edit(|c| c["l402"] = json!("on"))),
        // Billable statuses and failure mode.
        bad(
            "no billable status",
            "billable_statuses",
            edit(|c| c["billable_statuses"] = json!([])),
        ),
        bad(
            "status 600",
            "billable_statuses[1]",
            edit(|c| c["billable_statuses"] = json!(["2xx", "600"])),
        ),
        bad(
            "status 099",
            "billable_statuses[0]",
            edit(|c| c["billable_statuses"] = json!(["099"])),
        ),
        bad("class 0xx", "billable_statuses[0]", edit(|c| c["billable_statuses"] = json!(["0xx"]))),
        bad("class 6xx", "billable_statuses[0]", edit(|c| c["billable_statuses"] = json!(["6xx"]))),
        bad(
            "class in upper case",
            "billable_statuses[0]",
            edit(|c| c["billable_statuses"] = json!(["2XX"])),
        ),
        bad(
            "a two-digit status",
            "billable_statuses[0]",
            edit(|c| c["billable_statuses"] = json!(["20"])),
        ),
        bad(
            "a signed status",
            "billable_statuses[0]",
            edit(|c| c["billable_statuses"] = json!(["+99"])),
        ),
        bad(
            "a numeric status",
            "billable_statuses[0]",
            edit(|c| c["billable_statuses"] = json!([200])),
        ),
        bad(
            "failure mode sideways",
            "failure_mode",
            edit(|c| c["failure_mode"] = json!("sideways")),
        ),
        bad(
            "failure mode capitalized",
            "failure_mode",
            edit(|c| c["failure_mode"] = json!("Closed")),
        ),
        bad("failure mode null", "failure_mode", edit(|c| c["failure_mode"] = Value::Null)),
        bad("metrics as a string", "metrics", edit(|c| c["metrics"] = json!("off"))),
    ]
}

/// The base configuration with `routes[1].price_usdc` replaced.
fn price(amount: Value) -> Value {
    edit(|c| c["routes"][1]["price_usdc"] = amount)
}

#[test]
fn the_schema_accepts_exactly_what_the_filter_accepts() {
    let schema = schema();
    let (good, bad) =
        (good_cases(), bad_cases().into_iter().chain(bad_metered_cases()).collect::<Vec<_>>());
    assert!(good.len() >= 30 && bad.len() >= 90, "{} good, {} bad", good.len(), bad.len());
    let mut failures = Vec::new();
    for case in good.iter().chain(&bad) {
        let filter = filter_verdict(&case.config.to_string());
        let schema = schema_verdict(&schema, &case.config);
        match (&case.refused_at, &filter, &schema) {
            (None, Ok(()), Ok(())) => {}
            (Some(field), Err(error), Err(_)) if error.field == *field => {}
            (Some(field), Err(error), Err(_)) => failures.push(format!(
                "{}: the filter's refusal names {:?}, not {field:?}: {error}",
                case.name, error.field
            )),
            _ => failures.push(format!(
                "{}: expected {}, the filter says {filter:?}, the schema {schema:?}",
                case.name,
                case.refused_at.map_or("acceptance".to_owned(), |f| format!("a refusal at {f}")),
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases:\n{}",
        failures.len(),
        good.len() + bad.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// What draft 4 cannot say
// ---------------------------------------------------------------------------------------------

/// Configurations the schema accepts and the filter refuses, each with the start of the
/// filter's error: the rules listed in the schema's description. A rule moved into the schema
/// (or dropped from the filter) fails this test, so that the list stays true.
fn schema_gaps() -> Vec<(&'static str, String, &'static str)> {
    let text = |config: Value| config.to_string();
    vec![
        (
            "an l402 budget below a route's price (cross-field)",
            text(edit_l402(|c| c["l402"]["budget_usdc"] = json!("0.1"))),
            "l402.budget_usdc: must cover one call of every priced route; routes[2] costs 0.250000",
        ),
        (
            "l402 capabilities, and a priced route without one (cross-field)",
            text(edit_l402(|c| {
                c["routes"][2]["capability"] = json!("report");
                c["l402"]["capabilities"] = json!(["report"]);
            })),
            "routes[1].capability: must be one of l402.capabilities",
        ),
        (
            "l402 capabilities that do not list a priced route's (cross-field)",
            text(edit_l402(|c| {
                c["routes"][1]["capability"] = json!("forecast");
                c["routes"][2]["capability"] = json!("report");
                c["l402"]["capabilities"] = json!(["forecast"]);
            })),
            "routes[2].capability: must be one of l402.capabilities",
        ),
        (
            "an invoice amount beyond 64 bits of millisatoshi (cross-field)",
            text(edit_l402(|c| {
                c["l402"]["budget_usdc"] = json!("9000000000000");
                c["l402"]["sats_per_usdc"] = json!(u64::MAX);
            })),
            "l402.sats_per_usdc: must be greater than 0, and the invoice within range",
        ),
        (
            "two keys with the same kid (across list items)",
            text(edit(|c| {
                c["pay_token"]["keys"] = json!([
                    {"kid": "a", "alg": "HS256", "secret": "a-pay-token-secret-of-32-chars!1"},
                    {"kid": "a", "alg": "HS256", "secret": "a-pay-token-secret-of-32-chars!2"}
                ]);
            })),
            "pay_token.keys[1].kid: is used by another key",
        ),
        (
            "a service id of 200 characters but 400 bytes (maxLength counts characters)",
            text(edit(|c| c["service_id"] = json!("é".repeat(200)))),
            "service_id: must be 1 to 255 bytes",
        ),
        (
            "a price of 2^63 micro-USDC (left to the filter)",
            text(price(json!("9223372036854.775808"))),
            "routes[1].price_usdc: amount is too large",
        ),
        (
            "the largest 13-digit price (left to the filter)",
            text(price(json!("9999999999999.999999"))),
            "routes[1].price_usdc: amount is too large",
        ),
        (
            "a unit price of 2^64 pico-USDC (left to the filter)",
            text(metered(json!({"unit_price_usdc": "18446744.073709551616"}))),
            "routes[1].metered.unit_price_usdc: amount is too large",
        ),
        (
            "an l402 budget below a metered maximum (cross-field)",
            text(edit_l402(|c| {
                c["routes"] = json!([{"path": "/chat", "metered": metered_section(json!({"max_usdc": "1.5"}))}]);
            })),
            "l402.budget_usdc: must cover one call of every priced route; routes[0] costs 1.500000",
        ),
        (
            "a duplicate key (a validator keeps one of them)",
            base().to_string().replacen('{', r#"{"service_id":"first","#, 1),
            "duplicate field `service_id`",
        ),
    ]
}

#[test]
fn the_rules_draft_4_cannot_express_are_left_to_the_filter() {
    let schema = schema();
    let mut failures = Vec::new();
    for (name, text, expected) in schema_gaps() {
        let value: Value = serde_json::from_str(&text).unwrap();
        if let Err(errors) = schema_verdict(&schema, &value) {
            failures.push(format!(
                "{name}: the schema now refuses it ({errors}): move it to the equivalence cases"
            ));
        }
        match filter_verdict(&text) {
            Ok(()) => failures.push(format!("{name}: the filter accepts it")),
            Err(error) if error.to_string().starts_with(expected) => {}
            Err(error) => {
                failures.push(format!("{name}: the filter says {error}, expected {expected:?}"))
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Serde's derived structs also read a JSON array as a struct, field by field; the filter
/// refuses arrays where its sections, routes and keys belong, as the schema does.
#[test]
fn sections_written_as_positional_arrays_are_refused_by_both() {
    let schema = schema();
    let cases = [
        (
            "the whole configuration as an array",
            "",
            json!([
                "weather",
                [{"path": "/a", "price_usdc": "1"}],
                ["127.0.0.1:8787", null, null, "gateway-key-0123456789"],
                {"keys": [{"alg": "HS256", "secret": "a-pay-token-secret-of-32-chars!!"}]}
            ]),
        ),
        (
            "a route as an array",
            "routes[1]",
            edit(|c| c["routes"][1] = json!([null, "/v1/forecast", null, "0.001"])),
        ),
        (
            "a key as an array",
            "pay_token.keys[0]",
            edit(|c| {
                c["pay_token"]["keys"][0] =
                    json!(["k", "HS256", "a-pay-token-secret-of-32-chars!!"])
            }),
        ),
    ];
    for (name, field, config) in cases {
        assert!(schema_verdict(&schema, &config).is_err(), "{name}: the schema accepts it");
        let error = filter_verdict(&config.to_string()).expect_err(name);
        assert!(error.to_string().starts_with(field), "{name}: {error}");
        assert!(error.to_string().contains("expected an object"), "{name}: {error}");
    }
}
