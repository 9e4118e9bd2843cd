//! The web console (`/console`, served by the ledger) in a real headless Chromium, on a real
//! stack: the ledger binary selling the demo's service, Envoy with the release filter, and
//! the demo upstream. A buyer issues a token, spends it through the gateway and kills it;
//! the token form's refusals; the seller's dashboard and journal; client-chosen ids and tags
//! shown as text; the key never in a URL or a cookie.
//!
//! Needs Chromium and chromedriver (`scripts/setup` installs Debian's); without them these
//! tests fail. Screenshots of each step go to `target/screenshots/<test>-<step>.png`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use paystile_harness::browser::Browser;
use paystile_harness::e2e::TestStack;
use paystile_harness::envoy::EnvoyConfig;
use paystile_protocol::Usdc;
use paystile_protocol::ledger_api::{DepositRequest, IssueTokenRequest, IssuedToken};
use serde_json::{Value, json};

const BUYER: &str = "console-buyer";
/// A paid path of the demo configuration.
const PAID_PATH: &str = "/v1/forecast/oslo";
/// How long the gateway may go on accepting a token after its kill switch.
const REVOCATION_DEADLINE: Duration = Duration::from_secs(5);

fn usdc(amount: &str) -> Usdc {
    amount.parse().unwrap()
}

/// A stack whose ledger sells the demo configuration's service (`--services <id>`).
async fn console_stack() -> TestStack {
    let filter = EnvoyConfig::demo().unwrap().filter_config().unwrap();
    let service = filter["service_id"].as_str().unwrap().to_owned();
    let stack = TestStack::start_with(json!({}), &["--services", &service]).await.unwrap();
    assert_eq!(stack.service_id(), service);
    stack
}

fn ledger_url(stack: &TestStack, segments: &[&str]) -> reqwest::Url {
    let mut url = reqwest::Url::parse(&stack.stack.ledger.url()).unwrap();
    url.path_segments_mut().unwrap().pop_if_empty().extend(segments);
    url
}

/// A prepaid balance of `amount` for `buyer`.
async fn deposit(stack: &TestStack, buyer: &str, amount: &str) {
    let request = DepositRequest { amount_usdc: usdc(amount), reference: None };
    stack.stack.admin.deposit(buyer, &request).await.unwrap();
}

/// A new buyer key for `buyer` (`POST /v1/buyers/{buyer}/keys` with the admin key).
async fn buyer_key(stack: &TestStack, buyer: &str) -> String {
    let response = stack
        .http
        .post(ledger_url(stack, &["v1", "buyers", buyer, "keys"]))
        .bearer_auth(&stack.stack.secrets.admin_key)
        .json(&json!({"label": "console test"}))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["buyerId"], buyer, "{body}");
    let key = body["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("pbk_"), "{body}");
    key
}

/// A token of the admin API for `buyer` (tagged `tag`), and a paid call with it: its charge.
async fn paid_token(stack: &TestStack, buyer: &str, tag: Option<&str>) -> (IssuedToken, String) {
    let request = IssueTokenRequest {
        service_id: stack.service_id(),
        limit_usdc: usdc("1"),
        buyer_id: buyer.to_owned(),
        buyer_tag: tag.map(str::to_owned),
        scope: None,
        expires_at: None,
        ttl_seconds: Some(3600),
        sandbox: false,
    };
    let token = stack.stack.admin.issue_token(&request).await.unwrap();
    let answer = stack.paid(PAID_PATH, &token.jwt).await.unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    let charge_id = answer.header("x-charge-id").unwrap().to_owned();
    stack.settled(&token.token_id).await.unwrap();
    (token, charge_id)
}

/// A browser on the stack's console, at its login form.
async fn open_console(stack: &TestStack, test: &str) -> Browser {
    let browser = Browser::start(test).await.unwrap();
    browser.goto(&format!("{}/console", stack.stack.ledger.url())).await.unwrap();
    browser.wait_visible("form#login-form").await.unwrap();
    let key_input = browser.wait_for("input#login-key").await.unwrap();
    assert_eq!(key_input.attr("type").await.unwrap().as_deref(), Some("password"));
    browser
}

/// Logs in with `key` and waits until the header says `role`.
async fn log_in(browser: &Browser, key: &str, role: &str) {
    browser.type_into("input#login-key", key).await.unwrap();
    browser.click("button#login-submit").await.unwrap();
    browser.wait_text("#role", &format!("be {role:?}"), |text| text.trim() == role).await.unwrap();
}

/// Waits for the confirmation dialog, presses "Confirm" and waits until it closes: the
/// dialog's message.
async fn confirm(browser: &Browser) -> String {
    browser.wait_visible("dialog#confirm").await.unwrap();
    let message = browser.wait_text("#confirm-message", "say something", |t| !t.trim().is_empty());
    let message = message.await.unwrap();
    browser.click("button#confirm-yes").await.unwrap();
    browser.wait_count("dialog#confirm[open]", "be 0 (closed)", |n| n == 0).await.unwrap();
    message
}

/// Submits the token form, confirming if the page asks, and waits until `#token-error`
/// satisfies `expected` (`what` describes it): that message.
async fn submit_refused_token(
    browser: &Browser,
    what: &str,
    expected: impl Fn(&str) -> bool,
) -> String {
    browser.click("button#token-submit").await.unwrap();
    let refused = async || {
        let dialog = browser.all("dialog#confirm[open]").await.map_err(|e| e.to_string())?;
        if !dialog.is_empty() {
            return Ok(None);
        }
        let error = browser.text("#token-error").await.map_err(|e| e.to_string())?;
        if expected(&error) { Ok(Some(error)) } else { Err(format!("#token-error: {error:?}")) }
    };
    let waited = format!("the confirmation dialog or #token-error to {what}");
    if let Some(message) = browser.wait_until(&waited, refused).await.unwrap() {
        return message;
    }
    confirm(browser).await;
    browser.wait_text("#token-error", what, expected).await.unwrap()
}

/// The rendered width of the first element `selector` matches, in CSS pixels.
async fn width(browser: &Browser, selector: &str) -> f64 {
    let script = "return document.querySelector(arguments[0]).getBoundingClientRect().width;";
    browser.script(script, vec![selector.into()]).await.unwrap().as_f64().unwrap()
}

/// The number in a text such as "3" or "1,204 calls".
fn number(text: &str) -> Option<u64> {
    let digits: String = text.chars().filter(char::is_ascii_digit).collect();
    digits.parse().ok()
}

async fn assert_no_page_errors(browser: &Browser) {
    let errors = browser.page_errors().await.unwrap();
    assert!(errors.is_empty(), "the page logged errors: {errors:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_buyer_issues_a_token_spends_it_through_the_gateway_and_kills_it() {
    let stack = console_stack().await;
    let service = stack.service_id();
    deposit(&stack, BUYER, "10").await;
    let key = buyer_key(&stack, BUYER).await;

    let browser = open_console(&stack, "buyer").await;
    browser.screenshot("1-login").await.unwrap();
    log_in(&browser, &key, "buyer").await;
    browser.wait_text("#whoami", "name the buyer", |t| t.contains(BUYER)).await.unwrap();
    browser.wait_text("#balance", "show 10 USDC", |t| t.contains("10.000000")).await.unwrap();
    browser.wait_visible("section#buyer-view").await.unwrap();
    for seller_view in browser.all("section#seller-view").await.unwrap() {
        assert!(!seller_view.is_displayed().await.unwrap(), "a buyer sees the seller's view");
    }
    browser.screenshot("2-logged-in").await.unwrap();

    // Issue a token with the form: the service, a 1 USDC cap, confirmed in the dialog.
    browser.select("select#token-service", &service).await.unwrap();
    browser.type_into("input#token-cap", "1").await.unwrap();
    browser.click("button#token-submit").await.unwrap();
    assert!(
        stack.stack.admin.buyer(BUYER).await.unwrap().tokens.is_empty(),
        "a token was issued before the dialog was confirmed"
    );
    confirm(&browser).await;
    browser.wait_visible("#new-token").await.unwrap();
    let jwt = browser
        .wait_until("the JWT in #new-token-jwt", async || {
            let jwt = browser.value("textarea#new-token-jwt").await.map_err(|e| e.to_string())?;
            if jwt.split('.').count() == 3 { Ok(jwt) } else { Err(format!("{jwt:?}")) }
        })
        .await
        .unwrap();
    let textarea = browser.wait_for("textarea#new-token-jwt").await.unwrap();
    assert!(textarea.attr("readonly").await.unwrap().is_some(), "the JWT's textarea is editable");
    let token_id = browser.wait_text("#new-token-id", "hold an id", |t| !t.trim().is_empty());
    let token_id = token_id.await.unwrap().trim().to_owned();
    let token = stack.stack.admin.token(&token_id).await.unwrap();
    assert_eq!(
        (token.buyer_id.as_str(), token.service_id.as_deref(), token.limit_usdc, token.revoked),
        (BUYER, Some(service.as_str()), usdc("1"), false)
    );

    let row = format!("#tokens tr[data-token-id=\"{token_id}\"]");
    let fill = format!("{row} .spend-bar .spend-fill");
    browser
        .wait_text(&format!("{row} .token-service"), "be the service", |t| t.trim() == service)
        .await
        .unwrap();
    browser
        .wait_text(&format!("{row} .token-state"), "be active", |t| t.trim() == "active")
        .await
        .unwrap();
    browser
        .wait_attr(&fill, "data-used-usdc", "be 0", |v| {
            v.parse::<Usdc>().is_ok_and(|v| v.is_zero())
        })
        .await
        .unwrap();
    let unspent_width = width(&browser, &fill).await;
    browser.screenshot("3-issued").await.unwrap();

    // Three paid calls through Envoy with the token the page showed.
    let mut charges = Vec::new();
    for _ in 0..3 {
        let answer = stack.paid(PAID_PATH, &jwt).await.unwrap();
        assert_eq!(answer.status, 200, "{answer:?}");
        charges.push(answer.header("x-charge-id").unwrap().to_owned());
    }
    let spent = stack.forecast_price().checked_mul(3).unwrap();
    browser
        .wait_attr(&fill, "data-used-usdc", &format!("be {spent}"), |v| {
            v.parse::<Usdc>().ok() == Some(spent)
        })
        .await
        .unwrap();
    browser
        .wait_until(&format!("`{fill}` to grow from {unspent_width}px"), async || {
            let now = width(&browser, &fill).await;
            if now > unspent_width { Ok(now) } else { Err(format!("{now}px")) }
        })
        .await
        .unwrap();
    let used = browser.text(&format!("{row} .token-used")).await.unwrap();
    assert!(used.contains(&spent.to_string()) && used.contains("1.000000"), "{used:?}");
    browser
        .wait_count("#buyer-charges tr[data-charge-id]", "be at least 3", |n| n >= 3)
        .await
        .unwrap();
    for charge in &charges {
        browser.wait_for(&format!("#buyer-charges tr[data-charge-id=\"{charge}\"]")).await.unwrap();
    }
    browser.screenshot("4-spent").await.unwrap();

    // The kill switch, confirmed: the gateway refuses the token from then on.
    browser.click(&format!("{row} button.kill")).await.unwrap();
    assert!(!stack.stack.admin.token(&token_id).await.unwrap().revoked, "revoked unconfirmed");
    confirm(&browser).await;
    browser
        .wait_text(&format!("{row} .token-state"), "be revoked", |t| t.trim() == "revoked")
        .await
        .unwrap();
    let kill = format!("{row} button.kill");
    let disabled = async || match browser.wait_for(&kill).await {
        Ok(button) => match button.is_enabled().await {
            Ok(false) => Ok(()),
            Ok(true) => Err("enabled".to_owned()),
            Err(error) => Err(error.to_string()),
        },
        Err(error) => Err(error.to_string()),
    };
    browser.wait_until("the revoked token's kill switch to be disabled", disabled).await.unwrap();
    assert!(stack.stack.admin.token(&token_id).await.unwrap().revoked);
    let deadline = tokio::time::Instant::now() + REVOCATION_DEADLINE;
    loop {
        let answer = stack.paid(PAID_PATH, &jwt).await.unwrap();
        if answer.status == 422 && answer.code().as_deref() == Some("token_revoked") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still accepted: {answer:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    browser.screenshot("5-killed").await.unwrap();
    assert_no_page_errors(&browser).await;
    browser.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_token_form_refuses_a_cap_above_the_balance_and_a_past_expiry() {
    let stack = console_stack().await;
    deposit(&stack, BUYER, "0.5").await;
    let key = buyer_key(&stack, BUYER).await;
    let browser = open_console(&stack, "token-form").await;
    log_in(&browser, &key, "buyer").await;
    browser.wait_text("#balance", "show 0.5 USDC", |t| t.contains("0.500000")).await.unwrap();

    browser.select("select#token-service", &stack.service_id()).await.unwrap();
    browser.type_into("input#token-cap", "5").await.unwrap();
    let message = submit_refused_token(&browser, "mention the balance", |t| {
        t.to_lowercase().contains("balance")
    })
    .await;
    assert!(browser.wait_visible("#token-error").await.is_ok(), "{message}");
    browser.screenshot("1-above-balance").await.unwrap();

    browser.type_into("input#token-cap", "0.1").await.unwrap();
    browser.set_value("input#token-expiry", "2020-01-01T00:00").await.unwrap();
    submit_refused_token(&browser, "say the expiry is past", |t| {
        let t = t.to_lowercase();
        t.contains("past") || t.contains("expir")
    })
    .await;
    browser.screenshot("2-past-expiry").await.unwrap();

    // Nothing was issued: not in the ledger, not on the page.
    assert_eq!(stack.stack.admin.buyer(BUYER).await.unwrap().tokens, vec![]);
    assert_eq!(browser.all("#tokens tr[data-token-id]").await.unwrap().len(), 0);
    for new_token in browser.all("#new-token").await.unwrap() {
        assert!(!new_token.is_displayed().await.unwrap(), "a refused token shows as issued");
    }
    assert_no_page_errors(&browser).await;
    browser.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_seller_sees_the_service_s_calls_revenue_and_journal() {
    let stack = console_stack().await;
    let service = stack.service_id();
    let token = stack.issue("1").await.unwrap();
    let mut charges = Vec::new();
    for city in ["oslo", "lima", "pune"] {
        let answer = stack.paid(&format!("/v1/forecast/{city}"), &token.jwt).await.unwrap();
        assert_eq!(answer.status, 200, "{answer:?}");
        charges.push(answer.header("x-charge-id").unwrap().to_owned());
    }
    stack.settled(&token.token_id).await.unwrap();
    let revenue = stack.forecast_price().checked_mul(3).unwrap();

    let browser = open_console(&stack, "seller").await;
    log_in(&browser, &stack.stack.secrets.admin_key, "seller").await;
    browser.wait_text("#whoami", "say seller", |t| t.contains("seller")).await.unwrap();
    browser.wait_visible("section#seller-view").await.unwrap();
    for buyer_view in browser.all("section#buyer-view").await.unwrap() {
        assert!(!buyer_view.is_displayed().await.unwrap(), "the seller sees the buyer's view");
    }

    let section = format!("#services section.service[data-service-id=\"{service}\"]");
    browser
        .wait_text(&format!("{section} h3"), "be the service", |t| t.trim() == service)
        .await
        .unwrap();
    browser
        .wait_text(&format!("{section} .calls"), "count at least 3", |t| {
            number(t).is_some_and(|n| n >= 3)
        })
        .await
        .unwrap();
    browser
        .wait_text(&format!("{section} .revenue"), &format!("show {revenue}"), |t| {
            t.contains(&revenue.to_string())
        })
        .await
        .unwrap();
    // The hour's chart: 60 one-minute bars, those of the calls summing to them.
    let bars = format!("{section} svg.chart rect.bar-calls");
    browser.wait_count(&bars, "be 60 (an hour of minutes)", |n| n == 60).await.unwrap();
    let calls_in_bars = async || bar_calls(&browser, &bars, 3).await;
    browser.wait_until("bars with the 3 calls", calls_in_bars).await.unwrap();

    for charge in &charges {
        browser.wait_for(&format!("#journal tr[data-charge-id=\"{charge}\"]")).await.unwrap();
    }
    browser
        .wait_for(&format!("#top-tokens tr[data-token-id=\"{}\"]", token.token_id))
        .await
        .unwrap();
    browser.wait_for("#top-buyers tr[data-buyer-id=\"e2e-agent\"]").await.unwrap();
    browser.screenshot("1-hour").await.unwrap();

    // The day's window: 24 one-hour bars, the calls still in them.
    browser.click("button#window-day").await.unwrap();
    browser.wait_count(&bars, "be 24 (a day of hours)", |n| n == 24).await.unwrap();
    let calls_in_bars = async || bar_calls(&browser, &bars, 3).await;
    browser.wait_until("the day's bars with the 3 calls", calls_in_bars).await.unwrap();
    browser
        .wait_text(&format!("{section} .calls"), "count at least 3", |t| {
            number(t).is_some_and(|n| n >= 3)
        })
        .await
        .unwrap();
    browser.screenshot("2-day").await.unwrap();
    assert_no_page_errors(&browser).await;
    browser.close().await.unwrap();
}

/// The calls of the bars `bars` matches, once some bar has calls and they add up to at least
/// `calls`.
async fn bar_calls(browser: &Browser, bars: &str, calls: u64) -> Result<u64, String> {
    let script = "return [...document.querySelectorAll(arguments[0])]
        .map(bar => Number(bar.getAttribute('data-calls')));";
    let found = browser.script(script, vec![bars.into()]).await.map_err(|e| e.to_string())?;
    let found: Vec<u64> =
        found.as_array().map_or(vec![], |a| a.iter().filter_map(Value::as_u64).collect());
    let total: u64 = found.iter().sum();
    if found.iter().any(|&n| n > 0) && total >= calls {
        Ok(total)
    } else {
        Err(format!("{found:?}"))
    }
}

/// Markup a page would make of an id or a tag it put in `innerHTML`.
const HOSTILE_BUYER: &str = "<b class=pwn>agent<img src=x onerror=window.pwned=3>";
const HOSTILE_TAG: &str = "<script>window.pwned=1</script><img src=x onerror=window.pwned=2>";

/// No element the hostile values would have made, and none of their scripts ran.
async fn assert_no_injected_markup(browser: &Browser) {
    let script = "return {
        pwned: typeof window.pwned,
        bold: document.querySelectorAll('b.pwn').length,
        images: document.querySelectorAll('img[src=\"x\"], img[onerror]').length,
        scripts: [...document.querySelectorAll('script')]
            .filter(s => s.textContent.includes('pwned')).length,
    };";
    let found = browser.script(script, vec![]).await.unwrap();
    assert_eq!(found, json!({"pwned": "undefined", "bold": 0, "images": 0, "scripts": 0}));
}

#[tokio::test(flavor = "multi_thread")]
async fn client_chosen_ids_and_tags_show_as_text_never_as_markup() {
    let stack = console_stack().await;
    let (token, charge) = paid_token(&stack, HOSTILE_BUYER, Some(HOSTILE_TAG)).await;

    let browser = open_console(&stack, "escaping").await;
    log_in(&browser, &stack.stack.secrets.admin_key, "seller").await;
    let journal_row = format!("#journal tr[data-charge-id=\"{charge}\"]");
    browser
        .wait_text(&journal_row, "show the buyer id as text", |t| t.contains(HOSTILE_BUYER))
        .await
        .unwrap();
    let top_buyer = async || {
        let script = "return [...document.querySelectorAll('#top-buyers tr[data-buyer-id]')]
            .filter(row => row.getAttribute('data-buyer-id') === arguments[0])
            .map(row => row.textContent);";
        let rows = browser.script(script, vec![HOSTILE_BUYER.into()]).await;
        match rows.map_err(|e| e.to_string())?.as_array().map(Vec::as_slice) {
            Some([Value::String(text)]) if text.contains(HOSTILE_BUYER) => Ok(()),
            rows => Err(format!("{rows:?}")),
        }
    };
    browser.wait_until("a top buyer row of the hostile buyer id", top_buyer).await.unwrap();
    browser
        .wait_for(&format!("#top-tokens tr[data-token-id=\"{}\"]", token.token_id))
        .await
        .unwrap();
    browser
        .wait_text("section#seller-view", "show the buyer tag as text", |t| t.contains(HOSTILE_TAG))
        .await
        .unwrap();
    assert_no_injected_markup(&browser).await;
    browser.screenshot("1-seller").await.unwrap();

    // The same buyer in its own view.
    let key = buyer_key(&stack, HOSTILE_BUYER).await;
    browser.click("button#logout").await.unwrap();
    browser.wait_visible("form#login-form").await.unwrap();
    log_in(&browser, &key, "buyer").await;
    browser
        .wait_text("#whoami", "show the buyer id as text", |t| t.contains(HOSTILE_BUYER))
        .await
        .unwrap();
    browser.wait_for(&format!("#tokens tr[data-token-id=\"{}\"]", token.token_id)).await.unwrap();
    browser.wait_for(&format!("#buyer-charges tr[data-charge-id=\"{charge}\"]")).await.unwrap();
    assert_no_injected_markup(&browser).await;
    browser.screenshot("2-buyer").await.unwrap();
    assert_no_page_errors(&browser).await;
    browser.close().await.unwrap();
}

/// Where a key could leak from the page: its URL, cookies, local storage, the URLs it
/// fetched.
async fn assert_key_kept_out_of_urls_and_cookies(browser: &Browser, key: &str) {
    let url = browser.current_url().await.unwrap();
    assert!(!url.contains(key), "the key is in the URL {url}");
    let script = "return {
        cookie: document.cookie,
        local: JSON.stringify(Object.assign({}, localStorage)),
        fetched: performance.getEntriesByType('resource').map(entry => entry.name)
            .concat(performance.getEntriesByType('navigation').map(entry => entry.name)),
    };";
    let seen = browser.script(script, vec![]).await.unwrap();
    assert_eq!(seen["cookie"], "", "the console sets cookies");
    assert!(browser.client().get_all_cookies().await.unwrap().is_empty(), "cookies were set");
    assert!(!seen["local"].as_str().unwrap().contains(key), "the key is in localStorage");
    let fetched = seen["fetched"].as_array().unwrap();
    assert!(!fetched.is_empty(), "{seen}");
    for url in fetched {
        assert!(!url.as_str().unwrap().contains(key), "the key is in the fetched URL {url}");
    }
}

async fn session_storage(browser: &Browser) -> String {
    let storage =
        browser.script("return JSON.stringify(Object.assign({}, sessionStorage));", vec![]);
    storage.await.unwrap().as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_key_is_never_in_a_url_or_a_cookie() {
    let stack = console_stack().await;
    deposit(&stack, BUYER, "1").await;
    let key = buyer_key(&stack, BUYER).await;
    let admin_key = stack.stack.secrets.admin_key.clone();
    let browser = open_console(&stack, "secrets").await;

    // A wrong key: refused on the form, and in no URL either.
    let wrong = format!("pbk_{}", "0".repeat(32));
    browser.type_into("input#login-key", &wrong).await.unwrap();
    browser.click("button#login-submit").await.unwrap();
    browser.wait_text("#login-error", "say why", |t| !t.trim().is_empty()).await.unwrap();
    assert_key_kept_out_of_urls_and_cookies(&browser, &wrong).await;
    browser.screenshot("1-wrong-key").await.unwrap();

    log_in(&browser, &key, "buyer").await;
    browser.wait_text("#balance", "show 1 USDC", |t| t.contains("1.000000")).await.unwrap();
    assert_key_kept_out_of_urls_and_cookies(&browser, &key).await;
    assert!(session_storage(&browser).await.contains(&key), "the key is not in sessionStorage");

    // Logging out forgets the key.
    browser.click("button#logout").await.unwrap();
    browser.wait_visible("form#login-form").await.unwrap();
    assert!(!session_storage(&browser).await.contains(&key), "the key outlived the logout");
    assert_eq!(browser.value("input#login-key").await.unwrap(), "", "the key is still typed in");

    log_in(&browser, &admin_key, "seller").await;
    browser.wait_visible("section#seller-view").await.unwrap();
    assert_key_kept_out_of_urls_and_cookies(&browser, &admin_key).await;
    assert_key_kept_out_of_urls_and_cookies(&browser, &key).await;
    browser.screenshot("2-seller").await.unwrap();

    let log = stack.stack.ledger_log();
    assert!(!log.contains(&key) && !log.contains(&admin_key), "the ledger logged a key");
    assert_no_page_errors(&browser).await;
    browser.close().await.unwrap();
}
