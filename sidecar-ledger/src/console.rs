//! The web console: one page and its script and style, built into the binary (no CDN, no
//! separate server). The page asks for a key and calls the API with it from script, as an
//! `Authorization` header: no cookie is ever set, so no other site can make a browser send a
//! request with the key (no CSRF), and the key never appears in a URL.

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use paystile_protocol::ledger_api::path;

const INDEX: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/app.js");
const STYLE: &str = include_str!("console/style.css");

/// Only this origin's script and style run: no inline script, no other site's, and nothing
/// may frame the page (clickjacking a revoke button). Trusted Types make the browser refuse
/// any write of a string as markup or script, so the page can only show data as text.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'; require-trusted-types-for 'script'";

pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(path::CONSOLE, get(|| async { asset("text/html; charset=utf-8", INDEX) }))
        .route(
            &format!("{}/app.js", path::CONSOLE),
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            &format!("{}/style.css", path::CONSOLE),
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, content_type),
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-cache"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What keeps the page safe with the policy above: no inline script or style for it to
    /// block, no asset from elsewhere, and data written as text, never parsed as markup.
    #[test]
    fn the_page_runs_no_inline_code_and_writes_data_as_text() {
        assert!(INDEX.contains(r#"<script src="/console/app.js""#));
        assert!(!INDEX.contains("<script>"), "an inline script");
        assert!(!INDEX.contains(" style="), "an inline style");
        let handler = INDEX.split(" on").skip(1).find(|rest| {
            let name = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
            name > 0 && rest[name..].starts_with('=')
        });
        assert!(handler.is_none(), "an inline event handler: on{handler:?}");
        for markup_sink in ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write"] {
            assert!(!SCRIPT.contains(markup_sink), "app.js uses {markup_sink}");
        }
        for text in [INDEX, SCRIPT, STYLE] {
            assert!(!text.contains("http://") && !text.contains("https://"), "an outside asset");
        }
        assert!(!SCRIPT.contains("document.cookie"), "the key goes in a header, never a cookie");
    }
}
