//! The dead-letter queue over HTTP (admin, since entries carry request parameters):
//! `GET /api/v1/dlq?limit=N&queue_from=X&error_class=Y`, `GET /api/v1/dlq/stats`,
//! `POST /api/v1/dlq/replay` and `POST /api/v1/dlq/discard`.
//! How entries are read without being consumed, how entries are chosen, what a replay
//! publishes and what a discard logs is in [`crate::ops::dlq`].
//!
//! Replay and discard take the same body: `{"execution_ids": [...]}`, or `{"limit": N}`
//! (the first N entries), or `{"filter": {"queue_from": …, "error_class": …}, "limit": N}`
//! (the first N entries that match; the others stay in place and in order).

use std::sync::Arc;

use axum::extract::State;
use serde::Deserialize;

use super::AppState;
use super::error::ApiError;
use super::extract::{Json, Params};
use super::queues::Data;
use crate::ops::dlq::{
    DiscardReport, Dlq, DlqError, DlqStats, Filter, MAX_PEEK, MAX_REPLAY, Peek, ReplayReport,
    Selection,
};
use crate::rabbit::wire::MAX_EXECUTION_ID;

fn dlq(state: &AppState) -> Result<&Dlq, ApiError> {
    state
        .dlq
        .as_deref()
        .filter(|d| d.is_enabled())
        .ok_or_else(|| {
            ApiError::Unavailable(
                "dlq.enabled is false: nothing is dead-lettered to attune.dlq, so it is not read"
                    .to_owned(),
            )
        })
}

fn unavailable(e: DlqError) -> ApiError {
    ApiError::Unavailable(e.to_string())
}

/// `GET /api/v1/dlq?limit=N&queue_from=X&error_class=Y`: the first N entries (default 50),
/// oldest first, left in place. With a filter, the first N that match among the first
/// [`MAX_PEEK`]; `matched` counts all that match among them.
pub async fn list(
    State(state): State<Arc<AppState>>,
    params: Params,
) -> Result<axum::Json<Data<Peek>>, ApiError> {
    params.only(&["limit", "queue_from", "error_class"])?;
    let limit = params.get_usize("limit", 50, 1, MAX_PEEK)?;
    let field = |name: &str| -> Result<Option<String>, ApiError> {
        match params.get(name) {
            None => Ok(None),
            Some("") => Err(ApiError::bad_request(
                name,
                format!("`{name}` must not be empty (leave it out to match every entry)"),
            )),
            Some(v) => Ok(Some(v.to_owned())),
        }
    };
    let filter = Filter {
        queue_from: field("queue_from")?,
        error_class: field("error_class")?,
    };
    let peek = dlq(&state)?
        .peek_matching(&filter, limit)
        .await
        .map_err(unavailable)?;
    Ok(axum::Json(Data { data: peek }))
}

/// `GET /api/v1/dlq/stats`
pub async fn stats(
    State(state): State<Arc<AppState>>,
    params: Params,
) -> Result<axum::Json<Data<DlqStats>>, ApiError> {
    params.only(&[])?;
    let peek = dlq(&state)?.peek(MAX_PEEK).await.map_err(unavailable)?;
    Ok(axum::Json(Data {
        data: DlqStats::of(&peek),
    }))
}

/// The body of `POST /api/v1/dlq/replay` and `POST /api/v1/dlq/discard`: `execution_ids`,
/// or `limit` with an optional `filter`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectionBody {
    pub execution_ids: Option<Vec<u64>>,
    pub limit: Option<usize>,
    pub filter: Option<Filter>,
}

/// The body of `POST /api/v1/dlq/replay`.
pub type ReplayBody = SelectionBody;

impl SelectionBody {
    /// The entries this body chooses, or why it chooses none.
    pub fn selection(self) -> Result<Selection, ApiError> {
        if let Some(f) = &self.filter {
            if self.execution_ids.is_some() {
                return Err(ApiError::bad_request(
                    "filter",
                    "`filter` goes with `limit`, not with `execution_ids`",
                ));
            }
            if f.queue_from.as_deref() == Some("") || f.error_class.as_deref() == Some("") {
                return Err(ApiError::bad_request(
                    "filter",
                    "a filter field must not be empty (leave it out to match every entry)",
                ));
            }
            if self.limit.is_none() {
                return Err(ApiError::bad_request(
                    "limit",
                    format!(
                        "a `filter` needs a `limit` (1 to {MAX_REPLAY}): how many matching entries to take"
                    ),
                ));
            }
        }
        match (self.execution_ids, self.limit) {
            (Some(ids), None) => {
                if ids.is_empty() || ids.len() > MAX_REPLAY {
                    return Err(ApiError::bad_request(
                        "execution_ids",
                        format!("execution_ids must list 1 to {MAX_REPLAY} ids"),
                    ));
                }
                if let Some(bad) = ids.iter().find(|id| !(1..=MAX_EXECUTION_ID).contains(*id)) {
                    return Err(ApiError::bad_request(
                        "execution_ids",
                        format!("{bad} is not an execution id (1 to {MAX_EXECUTION_ID})"),
                    ));
                }
                Ok(Selection::Ids(ids))
            }
            (None, Some(n)) if (1..=MAX_REPLAY).contains(&n) => Ok(match self.filter {
                Some(f) => Selection::Matching(f, n),
                None => Selection::First(n),
            }),
            (None, Some(_)) => Err(ApiError::bad_request(
                "limit",
                format!("limit must be from 1 to {MAX_REPLAY}"),
            )),
            _ => Err(ApiError::BadRequest {
                field: None,
                message: "give exactly one of `execution_ids` (a list) or `limit` (a number, \
                          with an optional `filter`)"
                    .to_owned(),
            }),
        }
    }
}

/// `POST /api/v1/dlq/replay`
pub async fn replay(
    State(state): State<Arc<AppState>>,
    Json(body): Json<ReplayBody>,
) -> Result<axum::Json<Data<ReplayReport>>, ApiError> {
    let selection = body.selection()?;
    let dlq = dlq(&state)?;
    let report = dlq.replay(selection).await.map_err(unavailable)?;
    tracing::info!(
        replayed = report.replayed.len(),
        skipped = report.skipped.len(),
        not_found = report.not_found.len(),
        "[api] DLQ replay"
    );
    Ok(axum::Json(Data { data: report }))
}

/// `POST /api/v1/dlq/discard`: acknowledges the chosen entries off the DLQ; each is logged.
pub async fn discard(
    State(state): State<Arc<AppState>>,
    Json(body): Json<SelectionBody>,
) -> Result<axum::Json<Data<DiscardReport>>, ApiError> {
    let selection = body.selection()?;
    let dlq = dlq(&state)?;
    let report = dlq.discard(selection).await.map_err(unavailable)?;
    tracing::info!(
        discarded = report.discarded.len(),
        not_found = report.not_found.len(),
        "[api] DLQ discard"
    );
    Ok(axum::Json(Data { data: report }))
}
