//! `Authorization: Bearer <api.admin_token>` on every endpoint that changes state (and on the
//! DLQ reads, whose entries carry request parameters).
//!
//! The token is compared in constant time ([`crate::config::Secret::matches`]) and never
//! logged or echoed. With no token configured these endpoints refuse everyone: there is no
//! unauthenticated mode to fall into by forgetting a setting.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;

use super::AppState;
use super::error::ApiError;

/// Middleware for the admin routes. Runs before any extractor of the handler, so a caller
/// without the token learns nothing about what a valid request would look like.
pub async fn require_admin(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    check(&state, req.headers().get(header::AUTHORIZATION))?;
    Ok(next.run(req).await)
}

fn check(state: &AppState, header: Option<&axum::http::HeaderValue>) -> Result<(), ApiError> {
    let Some(token) = &state.admin_token else {
        return Err(ApiError::Unauthorized(
            "no admin token is configured (api.admin_token, or ATTUNE__API__ADMIN_TOKEN), so \
             endpoints that change state are disabled"
                .to_owned(),
        ));
    };
    let Some(value) = header else {
        return Err(ApiError::Unauthorized(
            "missing `Authorization: Bearer <token>` header".to_owned(),
        ));
    };
    let presented = value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, credentials)| credentials.trim());
    match presented {
        Some(candidate) if token.matches(candidate) => Ok(()),
        Some(_) => Err(ApiError::Unauthorized("invalid admin token".to_owned())),
        None => Err(ApiError::Unauthorized(
            "the Authorization header must read `Bearer <token>`".to_owned(),
        )),
    }
}
