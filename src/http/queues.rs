//! Queue statistics and policies: `/api/v1/actions/{ref}/queue-stats`, `/api/v1/queues`,
//! `/api/v1/actions/{ref}/policy`.

use std::cmp::Ordering;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::error::ApiError;
use super::extract::{Json, Params, PathParam, action_ref};
use crate::core::{ActionPolicy, PolicyPatch, QueueStats, RateLimit};
use crate::model::ActionRef;
use crate::ops::metrics::oldest_age_seconds;

/// `{"data": …}`, the envelope of every successful answer.
#[derive(Debug, Serialize)]
pub struct Data<T> {
    pub data: T,
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// One action's counters as the API shows them. The first eight fields are the contract's;
/// the rest say where the executions that left went.
#[derive(Debug, Serialize)]
pub struct QueueStatsBody {
    pub action_ref: String,
    pub queue_length: usize,
    pub active_count: usize,
    pub max_concurrent: u32,
    pub oldest_enqueued_at: Option<String>,
    pub total_enqueued: u64,
    pub total_completed: u64,
    pub last_updated: String,
    pub oldest_age_seconds: f64,
    pub last_progress: String,
    pub enabled: bool,
    pub total_canceled: u64,
    pub total_timed_out: u64,
    pub total_purged: u64,
    pub total_reclaimed: u64,
    pub total_rejected: u64,
    pub total_unmatched: u64,
    /// `cluster.mode: shared`: the action's partition and the instance that owns it. An
    /// instance that does not own it answers from `queue_stats`, as the owner last wrote it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<crate::cluster::Partition>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

impl QueueStatsBody {
    pub fn new(s: &QueueStats, now: DateTime<Utc>) -> Self {
        Self {
            action_ref: s.action_ref.to_string(),
            queue_length: s.queue_length,
            active_count: s.active_count,
            max_concurrent: s.max_concurrent,
            oldest_enqueued_at: s.oldest_enqueued_at.map(rfc3339),
            total_enqueued: s.total_enqueued,
            total_completed: s.total_completed,
            last_updated: rfc3339(s.last_updated),
            oldest_age_seconds: oldest_age_seconds(s, now),
            last_progress: rfc3339(s.last_progress),
            enabled: s.enabled,
            total_canceled: s.total_canceled,
            total_timed_out: s.total_timed_out,
            total_purged: s.total_purged,
            total_reclaimed: s.total_reclaimed,
            total_rejected: s.total_rejected,
            total_unmatched: s.total_unmatched,
            partition: None,
            owner: None,
        }
    }
}

/// An action's counters: asked of its actor (exact, now); if the actor cannot answer, the
/// latest it reported.
async fn stats_of(state: &AppState, action: &ActionRef) -> Result<Option<QueueStats>, ApiError> {
    match state.executor.stats(action).await {
        Ok(Some(s)) => Ok(Some(s)),
        Ok(None) => Ok(state.stats.get(action)),
        Err(e) => match state.stats.get(action) {
            Some(s) => Ok(Some(s)),
            None => Err(ApiError::Unavailable(e.to_string())),
        },
    }
}

/// `GET /api/v1/actions/{ref}/queue-stats`
pub async fn queue_stats(
    State(state): State<Arc<AppState>>,
    PathParam(raw): PathParam,
    params: Params,
) -> Result<axum::Json<Data<QueueStatsBody>>, ApiError> {
    params.only(&[])?;
    let action = action_ref(&raw)?;
    let view = &state.cluster;
    let found = match &view.table {
        Some((pool, schema)) if !view.holds(&action) => {
            crate::db::stats::stored(pool, schema, &action)
                .await
                .map_err(|e| ApiError::Unavailable(e.to_string()))?
        }
        _ => stats_of(&state, &action).await?,
    };
    let Some(s) = found else {
        return Err(ApiError::NotFound(format!(
            "action '{action}' has not been seen by this executor"
        )));
    };
    let mut body = QueueStatsBody::new(&s, Utc::now());
    if let Some((p, owner)) = view.owner_of(&action).await {
        body.partition = Some(p);
        body.owner = Some(owner);
    }
    Ok(axum::Json(Data { data: body }))
}

/// The body of `GET /api/v1/queues`.
#[derive(Debug, Serialize)]
pub struct QueueList {
    pub data: Vec<QueueStatsBody>,
    /// Actions known in all, before `limit`.
    pub total: usize,
}

/// `GET /api/v1/queues?sort=queue_length|active_count|oldest&order=desc|asc&limit=N`
pub async fn list_queues(
    State(state): State<Arc<AppState>>,
    params: Params,
) -> Result<axum::Json<QueueList>, ApiError> {
    params.only(&["sort", "order", "limit"])?;
    let sort = params.get_choice(
        "sort",
        &["queue_length", "active_count", "oldest"],
        "queue_length",
    )?;
    let descending = params.get_choice("order", &["desc", "asc"], "desc")? == "desc";
    let limit = params.get_usize("limit", 100, 1, 10_000)?;

    let mut all = state.executor.all_stats().await;
    // Actors that did not answer in time still show, with what they last reported.
    for latest in state.stats.all() {
        if !all.iter().any(|s| s.action_ref == latest.action_ref) {
            all.push(latest);
        }
    }
    let now = Utc::now();
    let key = |s: &QueueStats| -> f64 {
        match sort {
            "active_count" => s.active_count as f64,
            "oldest" => oldest_age_seconds(s, now),
            _ => s.queue_length as f64,
        }
    };
    all.sort_by(|a, b| {
        let by_key = key(a).partial_cmp(&key(b)).unwrap_or(Ordering::Equal);
        let by_key = if descending { by_key.reverse() } else { by_key };
        // Ties in a stable, readable order.
        by_key.then_with(|| a.action_ref.cmp(&b.action_ref))
    });
    let total = all.len();
    let data = all
        .iter()
        .take(limit)
        .map(|s| QueueStatsBody::new(s, now))
        .collect();
    Ok(axum::Json(QueueList { data, total }))
}

/// A rate limit as the API reads and writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitBody {
    pub max: u32,
    pub per_seconds: u64,
}

/// The body of `PUT /api/v1/actions/{ref}/policy`: any of the three fields, at least one. A
/// field left out keeps what is in force for the action; `"rate_limit": null` removes the
/// rate limit. `null` for either of the other two is refused rather than read as "left out":
/// no limit and no on/off switch mean nothing.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyBody {
    #[serde(default, deserialize_with = "present")]
    pub concurrency_limit: Option<u32>,
    /// `None`: absent; `Some(None)`: given as `null`.
    #[serde(default, deserialize_with = "present")]
    pub rate_limit: Option<Option<RateLimitBody>>,
    #[serde(default, deserialize_with = "present")]
    pub enabled: Option<bool>,
}

/// Reads a field that is there (as `T`, which for an `Option` takes `null`). serde calls it
/// only for fields present in the body; `#[serde(default)]` makes an absent one `None`. This
/// is how `"rate_limit": null` is told from no `rate_limit` at all.
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// A policy as the API shows it.
#[derive(Debug, Serialize)]
pub struct PolicyView {
    pub action_ref: String,
    pub concurrency_limit: u32,
    pub rate_limit: Option<RateLimitBody>,
    pub enabled: bool,
}

impl PolicyView {
    pub(crate) fn new(action: &ActionRef, p: ActionPolicy) -> Self {
        Self {
            action_ref: action.to_string(),
            concurrency_limit: p.concurrency_limit.get(),
            rate_limit: p.rate_limit.map(|r| RateLimitBody {
                max: r.max.get(),
                per_seconds: r.per.as_secs(),
            }),
            enabled: p.enabled,
        }
    }
}

/// Longest rate-limit window accepted: a year. Longer ones mean nothing in practice and
/// would overflow the rate limiter's nanosecond arithmetic.
pub const MAX_RATE_WINDOW_SECONDS: u64 = 365 * 24 * 3600;

/// Largest concurrency limit or `rate_limit.max` accepted: the `action` table keeps them as
/// `INT`, and a policy set over HTTP must be one the table can hold.
pub const MAX_STORED_LIMIT: u32 = i32::MAX as u32;

impl PolicyBody {
    /// The change this body asks for, each field checked against its range.
    pub fn validate(&self) -> Result<PolicyPatch, ApiError> {
        let concurrency_limit = self.concurrency_limit.map(validate_limit).transpose()?;
        let rate_limit = self
            .rate_limit
            .map(|r| r.map(validate_rate).transpose())
            .transpose()?;
        let patch = PolicyPatch {
            concurrency_limit,
            rate_limit,
            enabled: self.enabled,
        };
        if patch.is_empty() {
            return Err(ApiError::BadRequest {
                field: None,
                message: "the body changes nothing: give at least one of concurrency_limit, \
                          rate_limit (null removes it) and enabled"
                    .to_owned(),
            });
        }
        Ok(patch)
    }
}

fn validate_limit(limit: u32) -> Result<NonZeroU32, ApiError> {
    let limit = NonZeroU32::new(limit).ok_or_else(|| {
        ApiError::bad_request(
            "concurrency_limit",
            "concurrency_limit must be at least 1 (0 would never run anything)",
        )
    })?;
    if limit.get() > MAX_STORED_LIMIT {
        return Err(ApiError::bad_request(
            "concurrency_limit",
            format!("concurrency_limit must be at most {MAX_STORED_LIMIT}"),
        ));
    }
    Ok(limit)
}

fn validate_rate(r: RateLimitBody) -> Result<RateLimit, ApiError> {
    let max = NonZeroU32::new(r.max)
        .filter(|m| m.get() <= MAX_STORED_LIMIT)
        .ok_or_else(|| {
            ApiError::bad_request(
                "rate_limit.max",
                format!("rate_limit.max must be from 1 to {MAX_STORED_LIMIT}"),
            )
        })?;
    if !(1..=MAX_RATE_WINDOW_SECONDS).contains(&r.per_seconds) {
        return Err(ApiError::bad_request(
            "rate_limit.per_seconds",
            format!("rate_limit.per_seconds must be from 1 to {MAX_RATE_WINDOW_SECONDS}"),
        ));
    }
    Ok(RateLimit {
        max,
        per: Duration::from_secs(r.per_seconds),
    })
}

/// `GET /api/v1/actions/{ref}/policy`: the policy in force (or that the action would get).
pub async fn get_policy(
    State(state): State<Arc<AppState>>,
    PathParam(raw): PathParam,
) -> Result<axum::Json<Data<PolicyView>>, ApiError> {
    let action = action_ref(&raw)?;
    Ok(axum::Json(Data {
        data: PolicyView::new(&action, state.executor.policy(&action)),
    }))
}

/// `PUT /api/v1/actions/{ref}/policy` (admin): changes the fields the body gives and keeps
/// the others as they are in force. The [`PolicyStore`] hook merges, stores the result (with
/// the Postgres ledger: in the `action` table, merged with the row as it is) and then applies
/// it at once; if storing fails, nothing changes. A higher limit admits from the head of the
/// queue now; a lower one preempts nothing. The answer is the whole policy now in force.
///
/// [`PolicyStore`]: crate::ops::hooks::PolicyStore
pub async fn put_policy(
    State(state): State<Arc<AppState>>,
    PathParam(raw): PathParam,
    Json(body): Json<PolicyBody>,
) -> Result<axum::Json<Data<PolicyView>>, ApiError> {
    let action = action_ref(&raw)?;
    let patch = body.validate()?;
    let policy = state
        .policies
        .apply(&state.executor, &action, patch)
        .await
        .map_err(|e| {
            ApiError::Unavailable(format!("could not store the policy, nothing changed: {e}"))
        })?;
    tracing::info!(
        action = %action,
        concurrency_limit = policy.concurrency_limit.get(),
        rate_limit = ?policy.rate_limit,
        enabled = policy.enabled,
        changed = ?patch,
        "[api] policy set"
    );
    Ok(axum::Json(Data {
        data: PolicyView::new(&action, policy),
    }))
}
