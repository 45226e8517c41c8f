//! The configuration over HTTP: `GET /api/v1/config/status` (when the configuration in force
//! was loaded, and the last reload) and `POST /api/v1/admin/reload` (admin; read the config
//! file and the environment again and apply what can change while running, see
//! [`crate::ops::reload`]).

use std::sync::Arc;

use axum::extract::State;

use super::AppState;
use super::error::ApiError;
use super::extract::Params;
use super::queues::Data;
use crate::ops::reload::{ConfigStatus, ReloadReport, ReloadResult, Trigger};

/// `GET /api/v1/config/status`. No token: it holds no value of the configuration.
pub async fn status(State(state): State<Arc<AppState>>) -> axum::Json<Data<ConfigStatus>> {
    axum::Json(Data {
        data: state.reloader.status(),
    })
}

/// `POST /api/v1/admin/reload`: 200 with the report when the configuration loaded (`applied`
/// or `unchanged`), 400 with the message start-up would print when it did not (nothing
/// changed), 409 when the service has no file to read again. Waits for a reload in progress.
pub async fn reload(
    State(state): State<Arc<AppState>>,
    params: Params,
) -> Result<axum::Json<Data<ReloadReport>>, ApiError> {
    params.only(&[])?;
    let report = state
        .reloader
        .reload(Trigger::Api)
        .await
        .map_err(|e| ApiError::Conflict(e.to_string()))?;
    if report.result == ReloadResult::Invalid {
        return Err(ApiError::BadRequest {
            field: None,
            message: report.error.unwrap_or_default(),
        });
    }
    Ok(axum::Json(Data { data: report }))
}
