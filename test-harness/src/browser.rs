//! A real browser for the console's end-to-end tests: headless Chromium driven through
//! chromedriver (WebDriver), with waits on conditions and screenshots.
//!
//! [`Browser::start`] runs `chromedriver` on a free loopback port as a child in its own
//! process group, and opens a session; dropping the [`Browser`] kills that group (chromedriver
//! and the Chromium it started), so no browser outlives its test, even one that panicked.
//! Chromium is `/usr/bin/chromium` and chromedriver `/usr/bin/chromedriver` (Debian's
//! `chromium` and `chromium-driver`, which `scripts/setup` installs), or `$PAYSTILE_CHROMIUM`
//! and `$PAYSTILE_CHROMEDRIVER`. Without them the tests fail; they never skip.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use fantoccini::elements::Element;
use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::paths;

/// How long a wait on the page may take before it fails.
pub const WAIT: Duration = Duration::from_secs(15);
/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(50);
/// How long chromedriver may take to say where it listens and to answer `/status`.
const DRIVER_STARTUP: Duration = Duration::from_secs(30);
/// The browser window (the screenshots' width).
const WINDOW: (u32, u32) = (1400, 1000);

/// Chromium: `$PAYSTILE_CHROMIUM`, else Debian's `/usr/bin/chromium`.
pub fn chromium() -> PathBuf {
    from_env("PAYSTILE_CHROMIUM").unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// chromedriver: `$PAYSTILE_CHROMEDRIVER`, else Debian's `/usr/bin/chromedriver`.
pub fn chromedriver() -> PathBuf {
    from_env("PAYSTILE_CHROMEDRIVER").unwrap_or_else(|| PathBuf::from("/usr/bin/chromedriver"))
}

fn from_env(variable: &str) -> Option<PathBuf> {
    std::env::var_os(variable).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// Where the screenshots go: `<repo>/target/screenshots` (ignored by git with `/target`).
pub fn screenshot_dir() -> PathBuf {
    paths::repo_root().join("target/screenshots")
}

/// A `chromedriver` child in its own process group, which [`Drop`] kills whole.
struct ChromeDriver {
    child: Child,
    url: String,
    log: PathBuf,
}

impl ChromeDriver {
    /// Starts `chromedriver --port=0` (the system picks a free port, which chromedriver
    /// announces on stdout) and waits until it answers `/status` as ready.
    async fn start(binary: &Path, log: &Path) -> anyhow::Result<ChromeDriver> {
        if !binary.is_file() {
            bail!(
                "no chromedriver at {}: install Debian's chromium-driver (scripts/setup does) \
                 or set PAYSTILE_CHROMEDRIVER",
                binary.display()
            );
        }
        let log_file = File::create(log)?;
        let mut child = Command::new(binary)
            .args(["--port=0", "--allowed-ips=127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file.try_clone()?))
            // Its own process group: Chromium, its children and theirs join it, and one
            // signal to the group stops them all.
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot run {}", binary.display()))?;
        let stdout = child.stdout.take().context("chromedriver has no stdout")?;
        let mut driver = ChromeDriver { child, url: String::new(), log: log.to_path_buf() };

        // Its stdout, read to the end into the log (so that it never blocks on a full pipe),
        // and the port it announces sent back.
        let (port_tx, port_rx) = mpsc::channel();
        thread::spawn(move || {
            let mut log_file = log_file;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(log_file, "{line}");
                if let Some(port) = announced_port(&line) {
                    let _ = port_tx.send(port);
                }
            }
        });
        let port = port_rx.recv_timeout(DRIVER_STARTUP).map_err(|_| {
            anyhow!(
                "chromedriver did not say where it listens within {DRIVER_STARTUP:?}; see {}",
                log.display()
            )
        })?;
        driver.url = format!("http://127.0.0.1:{port}");
        driver.wait_ready().await?;
        Ok(driver)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
        let deadline = tokio::time::Instant::now() + DRIVER_STARTUP;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("chromedriver exited ({status}); see {}", self.log.display());
            }
            let last = match http.get(format!("{}/status", self.url)).send().await {
                Ok(response) => match response.json::<Value>().await {
                    Ok(body) if body["value"]["ready"] == true => return Ok(()),
                    Ok(body) => body.to_string(),
                    Err(error) => error.to_string(),
                },
                Err(error) => error.to_string(),
            };
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "chromedriver at {} not ready after {DRIVER_STARTUP:?} (last: {last}); see {}",
                    self.url,
                    self.log.display()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// The port of `ChromeDriver was started successfully on port 43567.`
fn announced_port(line: &str) -> Option<u16> {
    let (_, rest) = line.split_once("started successfully on port ")?;
    rest.trim().trim_end_matches('.').parse().ok()
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        // The whole group (chromedriver is its leader, and not yet reaped, so its id is
        // still the group's), then chromedriver itself.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A headless Chromium session for one test.
pub struct Browser {
    client: Client,
    /// The screenshots' prefix: `<test>-<step>.png`.
    test: String,
    // Dropped in this order: the driver (and the browser with it), then the profile.
    driver: ChromeDriver,
    dir: TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session with a fresh profile. `test`
    /// names the screenshots.
    pub async fn start(test: &str) -> anyhow::Result<Browser> {
        let chromium = chromium();
        if !chromium.is_file() {
            bail!(
                "no Chromium at {}: install Debian's chromium (scripts/setup does) or set \
                 PAYSTILE_CHROMIUM",
                chromium.display()
            );
        }
        let dir = TempDir::new()?;
        let driver =
            ChromeDriver::start(&chromedriver(), &dir.path().join("chromedriver.log")).await?;
        let profile = dir.path().join("profile");
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    format!("--window-size={},{}", WINDOW.0, WINDOW.1),
                    format!("--user-data-dir={}", profile.display()),
                    "--no-first-run",
                    "--no-default-browser-check",
                ],
            },
            // The page's console (errors, CSP violations), read by `page_errors`.
            "goog:loggingPrefs": {"browser": "ALL"},
        });
        let Value::Object(capabilities) = capabilities else {
            bail!("capabilities are not an object");
        };
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities)
            .connect(&driver.url)
            .await
            .with_context(|| {
                format!(
                    "chromedriver could not start {}; see {}",
                    chromium.display(),
                    driver.log.display()
                )
            })?;
        Ok(Browser { client, test: test.to_owned(), driver, dir })
    }

    /// The WebDriver client, for what the helpers do not cover.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Ends the session (chromedriver quits Chromium), then stops chromedriver. Dropping
    /// the browser without it kills both.
    pub async fn close(self) -> anyhow::Result<()> {
        self.client.clone().close().await?;
        Ok(())
    }

    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.client.goto(url).await.with_context(|| format!("cannot open {url}"))
    }

    pub async fn current_url(&self) -> anyhow::Result<String> {
        Ok(self.client.current_url().await?.to_string())
    }

    /// Runs `script` (a function body: `return …`) in the page with `args`.
    pub async fn script(&self, script: &str, args: Vec<Value>) -> anyhow::Result<Value> {
        self.client.execute(script, args).await.with_context(|| format!("script failed: {script}"))
    }

    /// The elements `selector` matches now (none is no error).
    pub async fn all(&self, selector: &str) -> anyhow::Result<Vec<Element>> {
        Ok(self.client.find_all(Locator::Css(selector)).await?)
    }

    /// Polls `check` until it answers `Ok`, for at most [`WAIT`]; its `Err` says what it saw
    /// instead, and is in the error when the wait fails, after `what` it waited for.
    pub async fn wait_until<T>(
        &self,
        what: &str,
        mut check: impl AsyncFnMut() -> Result<T, String>,
    ) -> anyhow::Result<T> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let last = match check().await {
                Ok(value) => return Ok(value),
                Err(seen) => seen,
            };
            if tokio::time::Instant::now() > deadline {
                bail!("waited {WAIT:?} for {what}; last seen: {last}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until `selector` matches an element; answers the first.
    pub async fn wait_for(&self, selector: &str) -> anyhow::Result<Element> {
        self.wait_until(&format!("an element `{selector}`"), async || self.first(selector).await)
            .await
    }

    /// Waits until `selector` matches a displayed element.
    pub async fn wait_visible(&self, selector: &str) -> anyhow::Result<Element> {
        self.wait_until(&format!("`{selector}` to be displayed"), async || {
            let element = self.first(selector).await?;
            match element.is_displayed().await {
                Ok(true) => Ok(element),
                Ok(false) => Err("present, not displayed".into()),
                Err(error) => Err(error.to_string()),
            }
        })
        .await
    }

    /// Waits until the text (`textContent`: the DOM's, before CSS transforms it) of the
    /// first element `selector` matches satisfies `accept`, which `what` describes; answers
    /// that text.
    pub async fn wait_text(
        &self,
        selector: &str,
        what: &str,
        accept: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        self.wait_until(&format!("the text of `{selector}` to {what}"), async || {
            let element = self.first(selector).await?;
            let text = element.prop("textContent").await.map_err(|e| e.to_string())?;
            let text = text.unwrap_or_default();
            if accept(&text) { Ok(text) } else { Err(format!("{text:?}")) }
        })
        .await
    }

    /// Waits until the attribute `name` of the first element `selector` matches satisfies
    /// `accept`; answers its value.
    pub async fn wait_attr(
        &self,
        selector: &str,
        name: &str,
        what: &str,
        accept: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        self.wait_until(&format!("`{selector}` [{name}] to {what}"), async || {
            let element = self.first(selector).await?;
            match element.attr(name).await.map_err(|e| e.to_string())? {
                Some(value) if accept(&value) => Ok(value),
                value => Err(format!("{value:?}")),
            }
        })
        .await
    }

    /// Waits until the number of elements `selector` matches satisfies `accept`.
    pub async fn wait_count(
        &self,
        selector: &str,
        what: &str,
        accept: impl Fn(usize) -> bool,
    ) -> anyhow::Result<usize> {
        self.wait_until(&format!("the number of `{selector}` to {what}"), async || {
            let count = self.all(selector).await.map_err(|e| e.to_string())?.len();
            if accept(count) { Ok(count) } else { Err(format!("{count} of them")) }
        })
        .await
    }

    /// The text (`textContent`) of the first element `selector` matches, now.
    pub async fn text(&self, selector: &str) -> anyhow::Result<String> {
        let element = self.first(selector).await.map_err(anyhow::Error::msg)?;
        Ok(element.prop("textContent").await?.unwrap_or_default())
    }

    /// The `value` of the input `selector` matches, now.
    pub async fn value(&self, selector: &str) -> anyhow::Result<String> {
        let element = self.first(selector).await.map_err(anyhow::Error::msg)?;
        Ok(element.prop("value").await?.unwrap_or_default())
    }

    /// Clicks `selector` once it is displayed and enabled. The page re-renders while it
    /// polls, so an element replaced between finding and clicking is found again.
    pub async fn click(&self, selector: &str) -> anyhow::Result<()> {
        self.wait_until(&format!("`{selector}` to be clicked"), async || {
            let element = self.first(selector).await?;
            let ready = async {
                Ok::<_, fantoccini::error::CmdError>(
                    element.is_displayed().await? && element.is_enabled().await?,
                )
            };
            match ready.await {
                Ok(true) => element.click().await.map_err(|e| e.to_string()),
                Ok(false) => Err("not displayed or disabled".into()),
                Err(error) => Err(error.to_string()),
            }
        })
        .await
    }

    /// Types `text` into the input `selector` after clearing it, as a user does.
    pub async fn type_into(&self, selector: &str, text: &str) -> anyhow::Result<()> {
        let element = self.wait_visible(selector).await?;
        element.clear().await?;
        element.send_keys(text).await?;
        Ok(())
    }

    /// Sets the value of the input `selector` from script and fires `input` and `change`:
    /// for inputs whose typing depends on the browser's locale (`datetime-local`).
    pub async fn set_value(&self, selector: &str, value: &str) -> anyhow::Result<()> {
        self.wait_visible(selector).await?;
        let script = "const input = document.querySelector(arguments[0]);
            input.value = arguments[1];
            input.dispatchEvent(new Event('input', {bubbles: true}));
            input.dispatchEvent(new Event('change', {bubbles: true}));
            return input.value;";
        let set = self.script(script, vec![selector.into(), value.into()]).await?;
        if set != value {
            bail!("`{selector}` took {set} for {value:?}");
        }
        Ok(())
    }

    /// Chooses the option `value` of the select `selector`.
    pub async fn select(&self, selector: &str, value: &str) -> anyhow::Result<()> {
        let element = self.wait_visible(selector).await?;
        element
            .select_by_value(value)
            .await
            .with_context(|| format!("`{selector}` has no option {value:?}"))
    }

    /// Saves the whole page as `<repo>/target/screenshots/<test>-<step>.png`: the window is
    /// made as tall as the page for the shot, then given its size back.
    pub async fn screenshot(&self, step: &str) -> anyhow::Result<PathBuf> {
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let heights = self
            .script(
                "return [document.documentElement.scrollHeight, \
                         window.outerHeight - window.innerHeight];",
                vec![],
            )
            .await?;
        let page = heights[0].as_u64().unwrap_or(u64::from(WINDOW.1));
        let chrome = heights[1].as_u64().unwrap_or(0);
        let tall = u32::try_from(page + chrome).unwrap_or(WINDOW.1).clamp(WINDOW.1, 8000);
        self.client.set_window_size(WINDOW.0, tall).await?;
        let png = self.client.screenshot().await;
        self.client.set_window_size(WINDOW.0, WINDOW.1).await?;
        let path = dir.join(format!("{}-{step}.png", self.test));
        std::fs::write(&path, png?).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }

    /// What the page logged to its console since the last call (Chromium's `browser` log):
    /// `(level, message)`, CSP violations and uncaught exceptions among them.
    pub async fn console_log(&self) -> anyhow::Result<Vec<(String, String)>> {
        let entries = self.client.issue_cmd(BrowserLog).await?;
        let entries = entries.as_array().context("the browser log is not a list")?;
        Ok(entries
            .iter()
            .map(|entry| {
                let field = |name: &str| entry[name].as_str().unwrap_or_default().to_owned();
                (field("level"), field("message"))
            })
            .collect())
    }

    /// The console messages that show the page broken: uncaught exceptions and what the
    /// Content-Security-Policy refused (an inline script or style the page relies on).
    pub async fn page_errors(&self) -> anyhow::Result<Vec<String>> {
        Ok(self
            .console_log()
            .await?
            .into_iter()
            .filter(|(_, message)| {
                message.contains("Uncaught")
                    || message.contains("Content Security Policy")
                    || message.contains("Refused to")
            })
            .map(|(level, message)| format!("{level}: {message}"))
            .collect())
    }

    /// The first element `selector` matches, or what went wrong, for waits.
    async fn first(&self, selector: &str) -> Result<Element, String> {
        match self.client.find_all(Locator::Css(selector)).await {
            Ok(elements) => {
                elements.into_iter().next().ok_or_else(|| format!("no element `{selector}`"))
            }
            Err(error) => Err(error.to_string()),
        }
    }

    /// The directory of the driver's log and the browser profile.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// chromedriver's log (with Chromium's own output).
    pub fn driver_log(&self) -> String {
        std::fs::read_to_string(&self.driver.log).unwrap_or_default()
    }
}

/// `url::ParseError`, named through reqwest's `Url`.
type UrlError = <reqwest::Url as std::str::FromStr>::Err;

/// chromedriver's `POST /session/{id}/se/log {"type": "browser"}`.
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &reqwest::Url,
        session_id: Option<&str>,
    ) -> Result<reqwest::Url, UrlError> {
        base_url.join(&format!("session/{}/se/log", session_id.unwrap_or_default()))
    }

    fn method_and_body(&self, _request_url: &reqwest::Url) -> (reqwest::Method, Option<String>) {
        (reqwest::Method::POST, Some(json!({"type": "browser"}).to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_port_chromedriver_announces() {
        let line = "ChromeDriver was started successfully on port 43567.";
        assert_eq!(announced_port(line), Some(43567));
        assert_eq!(announced_port("Starting ChromeDriver 156.0 on port 0"), None);
    }
}
