//! The operations page: `GET /` and its two assets, compiled into the binary.
//!
//! The page is plain HTML, one script and one stylesheet (in `src/http/ui/`), with no build
//! step and nothing fetched from anywhere else: every figure it shows comes from the JSON API
//! under `/api/v1`, the same one scripts use. It is served without a token; the controls that
//! change state send `Authorization: Bearer <api.admin_token>`, which the operator types into
//! the page once and which stays in that browser tab's `sessionStorage` (never in a URL or a
//! cookie).
//!
//! Every answer carries a Content-Security-Policy that allows only this origin's script,
//! stylesheet and API: a page that tried to fetch anything from elsewhere would be refused by
//! the browser itself, and no inline script can run.

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// The page's paths.
pub mod paths {
    pub const PAGE: &str = "/";
    pub const SCRIPT: &str = "/ui/app.js";
    pub const STYLE: &str = "/ui/app.css";
}

const PAGE: &str = include_str!("ui/index.html");
const SCRIPT: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/app.css");

/// What the browser may load and call on behalf of the page: this origin only, and no
/// inline script or style attribute.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// The page's routes, to merge into the API router.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            paths::PAGE,
            get(|| async { asset("text/html; charset=utf-8", PAGE) }),
        )
        .route(
            paths::SCRIPT,
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            paths::STYLE,
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CONTENT_SECURITY_POLICY),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
            // The assets change with the binary; a stale script against a newer API would
            // show wrong figures, so the browser asks again each load (they are small).
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_its_own_assets() {
        // Nothing in the page, script or stylesheet names another origin.
        for (name, text) in [("index.html", PAGE), ("app.js", SCRIPT), ("app.css", STYLE)] {
            for scheme in ["http://", "https://", "//cdn", "@import"] {
                let hits: Vec<&str> = text
                    .lines()
                    .filter(|l| l.contains(scheme) && !l.contains("http://www.w3.org/2000/svg"))
                    .collect();
                assert!(hits.is_empty(), "{name} refers elsewhere: {hits:?}");
            }
        }
        assert!(PAGE.contains(paths::SCRIPT) && PAGE.contains(paths::STYLE));
    }

    #[test]
    fn every_element_the_script_looks_up_is_in_the_page() {
        let mut missing = Vec::new();
        let mut rest = SCRIPT;
        while let Some(i) = rest.find("$(\"") {
            rest = &rest[i + 3..];
            let Some(end) = rest.find('"') else { break };
            let id = &rest[..end];
            if !PAGE.contains(&format!("id=\"{id}\"")) {
                missing.push(id.to_owned());
            }
        }
        assert!(
            missing.is_empty(),
            "ids the script needs but the page lacks: {missing:?}"
        );
    }
}
