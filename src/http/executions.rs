//! `POST /api/v1/executions/{id}/cancel` (admin).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use serde::Serialize;
use tokio::sync::oneshot;

use super::AppState;
use super::error::ApiError;
use super::extract::{PathParam, execution_id};
use super::queues::Data;
use crate::model::{CancelRequest, CancelVerdict, ExecutionId, Receipt};

/// How long to wait for the owning actor's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Serialize)]
pub struct Canceled {
    pub execution_id: ExecutionId,
    pub status: &'static str,
}

/// Cancels a waiting execution: 200 when it left its queue (recorded as canceled, the rest
/// keep their order), 409 when it is running (left to its worker, as the contract says for
/// cancels), 404 when no queued or running execution has the id.
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    PathParam(raw): PathParam,
) -> Result<axum::Json<Data<Canceled>>, ApiError> {
    let id = execution_id(&raw)?;
    let (tx, rx) = oneshot::channel();
    let receipt = Receipt::new(move |verdict: CancelVerdict| {
        // The caller may have given up waiting; the cancel happened regardless.
        let _ = tx.send(verdict);
    });
    state.executor.cancel(vec![CancelRequest {
        execution_id: id,
        receipt: Some(receipt),
    }]);
    match tokio::time::timeout(ANSWER_TIMEOUT, rx).await {
        Ok(Ok(CancelVerdict::Canceled)) => {
            tracing::info!(execution_id = id, "[api] execution canceled");
            Ok(axum::Json(Data {
                data: Canceled {
                    execution_id: id,
                    status: "canceled",
                },
            }))
        }
        Ok(Ok(CancelVerdict::Running)) => Err(ApiError::Conflict(format!(
            "execution {id} is running; a running execution is left to its worker"
        ))),
        // `Remembered` comes only from the cancels queue's way in, not from this one.
        Ok(Ok(CancelVerdict::Unknown | CancelVerdict::Remembered)) => Err(ApiError::NotFound(
            format!("no queued or running execution has id {id}"),
        )),
        Ok(Err(_)) | Err(_) => Err(ApiError::Unavailable(format!(
            "the executor did not answer the cancel of {id} in time; it may still happen"
        ))),
    }
}
