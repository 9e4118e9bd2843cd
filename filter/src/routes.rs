//! Which route prices a request. Security-relevant: a request that matches no priced route
//! reaches the upstream free, so every way of spelling a priced path must still match it,
//! and a free route must cover only what it names.
//!
//! Matching errs towards charging, because upstreams are forgiving: many route `/a/` and
//! `/a;x` like `/a`, match paths regardless of case, and run a GET handler for HEAD. So the
//! path is compared without its query and `;` parameters, ignoring ASCII case; exact paths
//! ignore trailing slashes; and a route priced for GET prices HEAD too. A prefix ends at a
//! path segment: `/docs` covers `/docs` and `/docs/…`, never `/docsecret`, so that a free
//! prefix listed first cannot open a priced neighbour; a segment may also start with what an
//! upstream decodes as a slash (`%2F`, `%5C`, `\`). A free route never covers a path that
//! an upstream may resolve elsewhere (a dot segment, an encoded slash or dot). The first
//! route that matches decides.

use std::sync::Arc;

use paystile_protocol::x402::{PaymentRequirements, RequirementsV1};
use paystile_protocol::{UnitPrice, Usdc};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    /// Without trailing slashes (`/` stays `/`, which covers every path).
    Prefix(String),
}

/// A priced (or, at price 0, explicitly free) route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub path: PathMatch,
    /// Upper-case methods; `None` matches every method.
    pub methods: Option<Vec<String>>,
    /// What a call holds: its price, or a metered route's maximum.
    pub price: Usdc,
    /// Priced by usage: the hold is committed in part, for the units the upstream reports.
    pub metered: Option<Metered>,
    /// What an L402 macaroon restricted to capabilities must grant to call this route.
    pub capability: Option<String>,
    /// What an x402 payment for a call must be, when x402 is offered here (fixed-price
    /// routes, with x402 on): made once with the configuration, as each 402 shows it.
    pub x402: Option<Arc<X402Terms>>,
    /// An x402 payment is settled on chain before the upstream is called (`settle:
    /// before`), rather than after it answered.
    pub settle_before: bool,
}

/// The x402 offer of a route, for its price: v2's requirements and v1's (whose resource
/// each 402 fills in).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct X402Terms {
    pub v2: PaymentRequirements,
    pub v1: RequirementsV1,
}

/// How a metered route charges: `units × unit_price` (rounded up to a micro-USDC, capped at
/// the route's maximum), the units read from the upstream's `units_header`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metered {
    pub unit_price: UnitPrice,
    /// Lower case, as hosts hand header names over.
    pub units_header: String,
}

impl PathMatch {
    /// A prefix route's path, without its trailing slashes.
    pub fn prefix(prefix: &str) -> PathMatch {
        let trimmed = trim_slashes(prefix.as_bytes()).len();
        PathMatch::Prefix(prefix[..trimmed].to_owned())
    }

    /// The path as configured.
    pub fn text(&self) -> &str {
        let (PathMatch::Exact(text) | PathMatch::Prefix(text)) = self;
        text
    }

    /// `path` is a [`route_path`].
    fn matches(&self, path: &[u8]) -> bool {
        match self {
            PathMatch::Exact(exact) => {
                trim_slashes(path).eq_ignore_ascii_case(trim_slashes(exact.as_bytes()))
            }
            PathMatch::Prefix(prefix) if prefix == "/" => path.starts_with(b"/"),
            PathMatch::Prefix(prefix) => {
                let (start, rest) = path.split_at(prefix.len().min(path.len()));
                start.eq_ignore_ascii_case(prefix.as_bytes())
                    && (rest.is_empty() || starts_segment(rest))
            }
        }
    }
}

impl Route {
    /// `path` is a [`route_path`].
    fn matches(&self, method: &[u8], path: &[u8]) -> bool {
        let method_matches = |m: &String| {
            m.as_bytes().eq_ignore_ascii_case(method)
                || (m == "GET" && method.eq_ignore_ascii_case(b"HEAD"))
        };
        // A free route never covers a path the upstream may resolve elsewhere: `/free/..%2F`
        // must not make a priced neighbour free (priced routes match such paths as usual).
        if self.price.is_zero() && may_resolve_elsewhere(path) {
            return false;
        }
        self.path.matches(path)
            && self.methods.as_ref().is_none_or(|methods| methods.iter().any(method_matches))
    }
}

/// The route of `routes` that prices this request, if any; `path` may carry a query.
pub fn find<'a>(routes: &'a [Route], method: &[u8], path: &[u8]) -> Option<&'a Route> {
    let path = route_path(path);
    routes.iter().find(|route| route.matches(method, &path))
}

/// The path routes compare: without the query, and without `;` parameters in any segment.
fn route_path(path: &[u8]) -> Vec<u8> {
    let path = path.split(|b| *b == b'?').next().unwrap_or(path);
    let mut routed = Vec::with_capacity(path.len());
    for (i, segment) in path.split(|b| *b == b'/').enumerate() {
        if i > 0 {
            routed.push(b'/');
        }
        routed.extend(segment.split(|b| *b == b';').next().unwrap_or(segment));
    }
    routed
}

/// Whether `rest`, what follows a prefix, starts a new path segment: a `/`, or what an
/// upstream may decode as one (`\`, `%2F`, `%5C`). Otherwise `/api%2Fdata` would dodge a
/// price on `/api` where the gateway does not decode slashes (Envoy can; Kong does not).
fn starts_segment(rest: &[u8]) -> bool {
    let encoded = |code: &[u8]| rest.get(..3).is_some_and(|start| start.eq_ignore_ascii_case(code));
    rest.starts_with(b"/") || rest.starts_with(b"\\") || encoded(b"%2f") || encoded(b"%5c")
}

/// Whether an upstream may route `path` elsewhere than it reads: it holds a dot segment, or
/// a slash, backslash or dot that the upstream may decode.
fn may_resolve_elsewhere(path: &[u8]) -> bool {
    let lower = path.to_ascii_lowercase();
    let holds = |what: &[u8]| lower.windows(what.len()).any(|w| w == what);
    holds(b"%2f")
        || holds(b"%5c")
        || holds(b"%2e")
        || holds(b"\\")
        || path.split(|b| *b == b'/').any(|segment| segment == b".." || segment == b".")
}

/// `/a/b//` is `/a/b`; `/` stays `/`.
fn trim_slashes(path: &[u8]) -> &[u8] {
    let end = path.iter().rposition(|b| *b != b'/').map_or(path.len().min(1), |i| i + 1);
    &path[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(path: PathMatch) -> Route {
        Route {
            path,
            methods: None,
            price: Usdc::ZERO,
            metered: None,
            capability: None,
            x402: None,
            settle_before: false,
        }
    }

    fn matches(path: &PathMatch, request: &str) -> bool {
        find(&[route(path.clone())], b"GET", request.as_bytes()).is_some()
    }

    #[test]
    fn a_prefix_covers_its_path_and_what_lies_below_it_only() {
        let docs = PathMatch::prefix("/docs");
        for covered in ["/docs", "/docs/", "/docs/a/b", "/DOCS/x", "/docs?x=1", "/docs;v=1/x"] {
            assert!(matches(&docs, covered), "{covered}");
        }
        for outside in ["/docsecret", "/docs.json", "/doc", "/", "/v1/docs", "/docs%2Fx"] {
            assert!(!matches(&docs, outside), "{outside}");
        }
        // Trailing slashes in the configuration change nothing.
        assert_eq!(PathMatch::prefix("/docs//"), docs);
        assert!(matches(&PathMatch::prefix("/docs/"), "/docs"));
        // `/` covers every path.
        let all = PathMatch::prefix("/");
        assert_eq!(PathMatch::prefix("//"), all);
        for path in ["/", "/a", "/docs/x?y"] {
            assert!(matches(&all, path), "{path}");
        }
    }

    /// A priced prefix also covers what an upstream may decode into a path below it; a free
    /// one covers no path an upstream may resolve elsewhere.
    #[test]
    fn encoded_slashes_and_dot_segments_err_towards_charging() {
        let price = Usdc::from_micros(1_000).unwrap();
        let api = Route { price, ..route(PathMatch::prefix("/api")) };
        let priced =
            |request: &str| find(std::slice::from_ref(&api), b"GET", request.as_bytes()).is_some();
        for covered in ["/api%2Fdata", "/api%2fdata", "/api\\data", "/api%5Cdata", "/api/../x"] {
            assert!(priced(covered), "{covered}");
        }
        assert!(!priced("/apis"));
        let docs = PathMatch::prefix("/docs");
        for elsewhere in [
            "/docs/../secret",
            "/docs/./x",
            "/docs/..%2Fsecret",
            "/docs/%2e%2e/secret",
            "/docs/%2E%2E/secret",
            "/docs\\..\\secret",
            "/docs/a%5csecret",
        ] {
            assert!(!matches(&docs, elsewhere), "{elsewhere}");
        }
    }

    #[test]
    fn an_exact_path_ignores_trailing_slashes_and_parameters() {
        let report = PathMatch::Exact("/v1/report".into());
        for covered in ["/v1/report", "/v1/report/", "/v1/report;x", "/V1/REPORT?y"] {
            assert!(matches(&report, covered), "{covered}");
        }
        for outside in ["/v1/report/x", "/v1/reports", "/v1"] {
            assert!(!matches(&report, outside), "{outside}");
        }
    }

    #[test]
    fn the_routed_path_drops_the_query_and_parameters() {
        assert_eq!(route_path(b"/a;b/c;d?e;f"), b"/a/c");
        assert_eq!(
            (trim_slashes(b"/"), trim_slashes(b"//"), trim_slashes(b"")),
            (&b"/"[..], &b"/"[..], &b""[..])
        );
    }
}
