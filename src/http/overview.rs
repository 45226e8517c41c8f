//! `GET /api/v1/overview`: the operations page's first screen in one answer: which instance
//! answers, the latest health report, the totals and the last 15 minutes of throughput and
//! queue wait. Everything comes from what is already kept (the health monitor's latest
//! report, the history sampler's ring, [`crate::ops::history`]); a request asks no actor and
//! reads neither RabbitMQ nor Postgres.

use std::sync::Arc;

use axum::extract::State;
use chrono::SecondsFormat;
use serde::Serialize;

use super::AppState;
use super::error::ApiError;
use super::extract::Params;
use super::queues::Data;
use crate::ops::health::HealthReport;
use crate::ops::history::Sample;

#[derive(Debug, Serialize)]
pub struct Overview {
    /// `cluster.instance_id` of the instance that answered.
    pub instance: String,
    /// `single` or `shared` (`cluster.mode`).
    pub mode: &'static str,
    pub now: String,
    /// The latest health check as `/health` serves it; `null` before the first.
    pub health: Option<HealthReport>,
    pub totals: OverviewTotals,
    /// Oldest first, one every 5 s, at most 15 minutes.
    pub history: Vec<Sample>,
}

/// The latest sample's totals.
#[derive(Debug, Serialize)]
pub struct OverviewTotals {
    /// Actions this instance holds counters of.
    pub actions: usize,
    pub queued: u64,
    pub running: u64,
    pub dispatched_per_second: f64,
    pub completed_per_second: f64,
    /// `null` when `dlq.enabled` is false or the size could not be read.
    pub dlq_size: Option<u64>,
    /// When the sample these come from was taken (at most 5 s ago).
    pub sampled_at: String,
    /// Actions that have an actor right now, and actions whose actor retired while idle
    /// (`executor.queue.passivate_after_seconds`), counted at the request.
    pub actors_awake: usize,
    pub actors_retired: usize,
}

/// `GET /api/v1/overview`
pub async fn overview(
    State(state): State<Arc<AppState>>,
    params: Params,
) -> Result<axum::Json<Data<Overview>>, ApiError> {
    params.only(&[])?;
    let latest = state.history.latest().await;
    let clock = state.executor.clock();
    let view = &state.cluster;
    let (actors_awake, actors_retired) = state.executor.actor_counts();
    Ok(axum::Json(Data {
        data: Overview {
            instance: view.instance_id.clone(),
            mode: if view.owns.is_some() {
                "shared"
            } else {
                "single"
            },
            now: clock
                .wall(clock.now())
                .to_rfc3339_opts(SecondsFormat::Millis, true),
            health: state.health.latest().map(|r| (*r).clone()),
            totals: OverviewTotals {
                actions: latest.actions,
                queued: latest.queued,
                running: latest.running,
                dispatched_per_second: latest.dispatched_per_second,
                completed_per_second: latest.completed_per_second,
                dlq_size: latest.dlq_size,
                sampled_at: latest.at.to_rfc3339_opts(SecondsFormat::Secs, true),
                actors_awake,
                actors_retired,
            },
            history: state.history.history(),
        },
    }))
}
