//! The dead-letter queue over HTTP (admin, since entries carry request parameters):
//! `GET /api/v1/dlq?limit=N`, `GET /api/v1/dlq/stats`, `POST /api/v1/dlq/replay`.
//! How entries are read without being consumed, and what a replay publishes, is in
//! [`crate::ops::dlq`].

use std::sync::Arc;

use axum::extract::State;
use serde::Deserialize;

use super::AppState;
use super::error::ApiError;
use super::extract::{Json, Params};
use super::queues::Data;
use crate::ops::dlq::{
    Dlq, DlqError, DlqStats, MAX_PEEK, MAX_REPLAY, Peek, ReplayReport, Selection,
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

/// `GET /api/v1/dlq?limit=N`: the first N entries (default 50), oldest first, left in place.
pub async fn list(
    State(state): State<Arc<AppState>>,
    params: Params,
) -> Result<axum::Json<Data<Peek>>, ApiError> {
    params.only(&["limit"])?;
    let limit = params.get_usize("limit", 50, 1, MAX_PEEK)?;
    let peek = dlq(&state)?.peek(limit).await.map_err(unavailable)?;
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

/// The body of `POST /api/v1/dlq/replay`: exactly one of the two.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayBody {
    pub execution_ids: Option<Vec<u64>>,
    pub limit: Option<usize>,
}

impl ReplayBody {
    fn selection(self) -> Result<Selection, ApiError> {
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
            (None, Some(n)) if (1..=MAX_REPLAY).contains(&n) => Ok(Selection::First(n)),
            (None, Some(_)) => Err(ApiError::bad_request(
                "limit",
                format!("limit must be from 1 to {MAX_REPLAY}"),
            )),
            _ => Err(ApiError::BadRequest {
                field: None,
                message: "give exactly one of `execution_ids` (a list) or `limit` (a number)"
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
