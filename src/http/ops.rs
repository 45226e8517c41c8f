//! `GET /health`, `GET /ready`, `GET /metrics`, `GET /metrics/actions` and `POST /api/v1/purge`
//! (admin).

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde_json::json;

use super::AppState;
use super::error::ApiError;
use super::extract::{Params, action_refs};
use super::queues::Data;
use crate::ops::metrics::Metrics;
use crate::ops::purge::{PurgeError, PurgeReport};
use crate::ops::readiness::State as Readiness;

/// The latest health check. Always 200 while the process can answer: the verdict is in the
/// body. A liveness probe that restarted the executor because one queue is long would throw
/// away what is queued in memory and make things worse.
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    match state.health.latest() {
        Some(report) => axum::Json(&*report).into_response(),
        // Health checks are disabled, or the first has not finished yet: the process is up,
        // which is all that is known.
        None => axum::Json(json!({
            "status": "healthy",
            "last_check": null,
            "emergency_mode": state.health.emergency_mode(),
            "checks": {},
            "note": "no health check has run (health.enabled is false, or the first check \
                     has not finished); this answer only says the process is up",
        }))
        .into_response(),
    }
}

/// Whether the service takes work: 200 `{"status": "ready", "since": …}` once the RabbitMQ
/// topology is declared, the consumers run and recovery is done; before that, while the broker
/// session is lost, and while shutting down, 503 with the reason in the API's error body. A
/// probe, a deploy script or a producer waits for this, not for `/health`, before it publishes.
pub async fn ready(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let now = state.readiness.state();
    let since = now.since();
    match now {
        Readiness::Ready { .. } => {
            Ok(axum::Json(json!({"status": "ready", "since": since})).into_response())
        }
        Readiness::NotReady { reason, .. } => Err(ApiError::Unavailable(format!(
            "not ready since {since}: {reason}"
        ))),
    }
}

/// Most actions one `GET /metrics/actions` may name.
pub const MAX_METRICS_ACTIONS: usize = 1000;

fn enabled_metrics(state: &AppState) -> Result<&Metrics, ApiError> {
    state.metrics.as_ref().ok_or_else(|| {
        ApiError::NotFound(
            "metrics are disabled (executor.queue.enable_metrics is false)".to_owned(),
        )
    })
}

fn prometheus_text(text: String) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Prometheus text exposition: everything not per action, and the per-action series of the
/// actions busy or changed lately (see [`crate::ops::metrics::per_action`]).
pub async fn metrics(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let m = enabled_metrics(&state)?;
    Ok(prometheus_text(m.render(Utc::now())))
}

/// `GET /metrics/actions?action=a,b`: the named actions' per-action series, busy or not, for
/// a targeted scrape or a look at a quiet action. An action never seen has none.
pub async fn metrics_actions(
    State(state): State<Arc<AppState>>,
    params: Params,
) -> Result<Response, ApiError> {
    params.only(&["action"])?;
    let m = enabled_metrics(&state)?;
    let raw = params.get("action").ok_or_else(|| {
        ApiError::bad_request(
            "action",
            format!(
                "`action` is required: 1 to {MAX_METRICS_ACTIONS} action refs, separated by \
                 commas (all busy actions are on /metrics)"
            ),
        )
    })?;
    let actions = action_refs("action", raw, MAX_METRICS_ACTIONS)?;
    Ok(prometheus_text(m.render_actions(&actions, Utc::now())))
}

/// Runs one purge cycle now. `dry_run` defaults to `purge.dry_run` (as last loaded), so a deployment testing
/// its thresholds in dry-run mode is not purged for real by a bare POST. 409 while another
/// cycle runs (see [`crate::ops::purge`]).
pub async fn purge(
    State(state): State<Arc<AppState>>,
    params: Params,
) -> Result<axum::Json<Data<PurgeReport>>, ApiError> {
    params.only(&["dry_run"])?;
    let dry_run = params.get_bool("dry_run", state.purger.dry_run_by_default())?;
    match state.purger.try_run_cycle(dry_run).await {
        Ok(report) => Ok(axum::Json(Data { data: report })),
        Err(e @ PurgeError::Busy) => Err(ApiError::Conflict(e.to_string())),
    }
}
