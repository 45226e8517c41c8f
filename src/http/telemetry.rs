//! Counts and times every request, labelled by the route that matched (never the raw URI,
//! whose ids and refs would make a series per request), and logs refused ones once.

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

use super::error::ErrorDetail;
use crate::ops::metrics::names;

/// The `path` label of a request no route matched.
pub const UNMATCHED: &str = "unmatched";

pub async fn track(req: Request, next: Next) -> Response {
    let started = tokio::time::Instant::now();
    let method = method_label(req.method());
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| UNMATCHED.to_owned(), |p| p.as_str().to_owned());
    let response = next.run(req).await;
    let status = response.status();
    metrics::counter!(
        names::HTTP_REQUESTS_TOTAL,
        "method" => method,
        "path" => path.clone(),
        "status" => status.as_u16().to_string()
    )
    .increment(1);
    metrics::histogram!(
        names::HTTP_REQUEST_DURATION_SECONDS,
        "method" => method,
        "path" => path.clone()
    )
    .record(started.elapsed().as_secs_f64());
    if let Some(ErrorDetail(detail)) = response.extensions().get::<ErrorDetail>() {
        if status.is_server_error() {
            tracing::error!(%method, %path, status = status.as_u16(), error = %detail, "[api] request failed");
        } else {
            tracing::info!(%method, %path, status = status.as_u16(), error = %detail, "[api] request refused");
        }
    }
    response
}

/// Methods outside the standard set share one label, so a client inventing methods cannot
/// create series without bound.
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}
