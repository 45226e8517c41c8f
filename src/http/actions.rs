//! The operations page's actions: `GET /api/v1/actions` (the actions table) and
//! `GET /api/v1/actions/{ref}` (one action in detail).
//!
//! # The table
//!
//! `GET /api/v1/actions?q=&sort=&order=&offset=&limit=` filters by a case-insensitive
//! substring of the ref, sorts by any column (ties by ref) and pages; `total` counts the
//! actions matching `q`. `GET /api/v1/actions?refs=a,b,c` answers the same rows for up to
//! [`MAX_REFS`] named actions, in the order named (unknown ones are left out): the page
//! refreshes the rows it shows with it, so a refresh costs work in proportion to them.
//!
//! Neither form asks the action actors ([`Executor::all_stats`] would send every one a
//! message): rows come from the latest counters each actor reported ([`LatestStats`], kept
//! by the stats observer after every change), the policies in force, and the last health
//! check's stuck counts. A listing over 10,000 actions is a copy and a sort in memory.
//!
//! In `cluster.mode: shared` the table lists every action: those of partitions this
//! instance owns from memory, the others from the `queue_stats` table as their owners last
//! wrote it (one query per listing, or per `refs` refresh for the refs held elsewhere), each
//! row with its `partition` and `owner`.
//!
//! Each row's `health` and `flags` are the health check's rules applied to the one action;
//! [`crate::ops::flags`] says what each flag means.
//!
//! # The detail
//!
//! `GET /api/v1/actions/{ref}?waiting=N` asks the action's actor (one message) for its
//! counters, the first N waiting executions (default 20, at most [`MAX_WAITING`]), the
//! executions holding a slot (the longest-running [`MAX_RUNNING`]) and its last ends
//! ([`crate::core::recent`]). An action another instance owns (shared mode) is answered
//! from `queue_stats` with empty lists and a `note`.
//!
//! [`Executor::all_stats`]: crate::core::Executor::all_stats
//! [`LatestStats`]: crate::core::memory::LatestStats

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use axum::extract::State;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use super::AppState;
use super::error::ApiError;
use super::extract::{Params, PathParam, action_ref, action_refs};
use super::queues::{Data, PolicyView, QueueStatsBody, RateLimitBody};
use crate::cluster::{Partition, partition_of};
use crate::config::HealthThresholds;
use crate::core::QueueStats;
use crate::core::action::Inspect;
use crate::model::{ActionRef, ExecutionId};
use crate::ops::flags::{self, Flag, Level};
use crate::ops::metrics::oldest_age_seconds;

/// Rows per page when `limit` is not given.
pub const DEFAULT_PAGE: usize = 50;
/// Most rows one page may ask for.
pub const MAX_PAGE: usize = 500;
/// Most refs one `refs=` refresh may name.
pub const MAX_REFS: usize = 500;
/// Largest `offset` accepted (far beyond any real number of actions).
pub const MAX_OFFSET: usize = 1_000_000_000;
/// Waiting executions shown when `waiting` is not given.
pub const DEFAULT_WAITING: usize = 20;
/// Most waiting executions one detail may ask for.
pub const MAX_WAITING: usize = 500;
/// Most running executions one detail lists (`running_total` counts them all).
pub const MAX_RUNNING: usize = 500;

/// The columns the table sorts by.
pub const SORTS: &[&str] = &[
    "action_ref",
    "queue_length",
    "active_count",
    "max_concurrent",
    "oldest",
    "rate_limit",
    "enabled",
    "health",
];

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// One row of the actions table.
#[derive(Debug, Serialize)]
pub struct ActionRow {
    pub action_ref: String,
    pub queue_length: usize,
    pub active_count: usize,
    pub max_concurrent: u32,
    pub oldest_age_seconds: f64,
    pub oldest_enqueued_at: Option<String>,
    pub rate_limit: Option<RateLimitBody>,
    pub enabled: bool,
    /// `ok` or the worst of `flags`.
    pub health: &'static str,
    pub flags: Vec<Flag>,
    pub last_updated: String,
    /// Shared mode only: the action's partition and who owns it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<Partition>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// The body of `GET /api/v1/actions`.
#[derive(Debug, Serialize)]
pub struct ActionList {
    pub data: Vec<ActionRow>,
    /// Actions matching `q` (with `refs`: the rows found).
    pub total: usize,
    pub offset: usize,
    pub limit: usize,
}

/// What rows are judged by: one clock reading and one copy of the last stuck counts per
/// request, and in shared mode the partitions' owners.
struct Judge<'a> {
    state: &'a AppState,
    now: DateTime<Utc>,
    thresholds: HealthThresholds,
    stuck: Arc<HashMap<ActionRef, usize>>,
    /// Owner by partition (shared mode).
    owners: Option<Vec<String>>,
}

impl<'a> Judge<'a> {
    async fn new(state: &'a AppState) -> Result<Self, ApiError> {
        let clock = state.executor.clock();
        let view = &state.cluster;
        let owners = match (&view.owns, &view.table) {
            (Some(_), Some((pool, schema))) => {
                let rows = crate::db::partitions::list(pool, schema)
                    .await
                    .map_err(|e| {
                        tracing::warn!(error = %e, "the partition table could not be read");
                        ApiError::Unavailable("the partition table could not be read".to_owned())
                    })?;
                let mut owners = vec![String::new(); usize::from(view.partitions.max(1))];
                for r in rows {
                    if let Some(o) = owners.get_mut(usize::from(r.id)) {
                        *o = r.owner;
                    }
                }
                Some(owners)
            }
            _ => None,
        };
        Ok(Self {
            state,
            now: clock.wall(clock.now()),
            thresholds: state.health.thresholds(),
            stuck: state.health.stuck_by_action(),
            owners,
        })
    }

    fn flags(&self, s: &QueueStats) -> Vec<Flag> {
        let stuck = self.stuck.get(&s.action_ref).copied().unwrap_or(0);
        flags::flags(s, stuck, &self.thresholds, self.now)
    }

    fn row(&self, s: &QueueStats) -> ActionRow {
        let flags = self.flags(s);
        let policy = PolicyView::new(&s.action_ref, self.state.executor.policy(&s.action_ref));
        let partition = self
            .owners
            .as_ref()
            .map(|_| partition_of(&s.action_ref, self.state.cluster.partitions));
        ActionRow {
            action_ref: s.action_ref.to_string(),
            queue_length: s.queue_length,
            active_count: s.active_count,
            max_concurrent: s.max_concurrent,
            oldest_age_seconds: oldest_age_seconds(s, self.now),
            oldest_enqueued_at: s.oldest_enqueued_at.map(rfc3339),
            rate_limit: policy.rate_limit,
            enabled: s.enabled,
            health: flags::health(&flags),
            flags,
            last_updated: rfc3339(s.last_updated),
            partition,
            owner: partition.and_then(|p| {
                self.owners
                    .as_ref()
                    .and_then(|o| o.get(usize::from(p)).cloned())
            }),
        }
    }

    /// The sort key of a numeric column (every column but `action_ref`).
    fn key(&self, sort: &str, s: &QueueStats) -> f64 {
        match sort {
            "queue_length" => s.queue_length as f64,
            "active_count" => s.active_count as f64,
            "max_concurrent" => f64::from(s.max_concurrent),
            "oldest" => oldest_age_seconds(s, self.now),
            // Executions allowed per second; no rate limit allows the most.
            "rate_limit" => self
                .state
                .executor
                .policy(&s.action_ref)
                .rate_limit
                .map_or(f64::INFINITY, |r| {
                    f64::from(r.max.get()) / r.per.as_secs_f64().max(f64::MIN_POSITIVE)
                }),
            "enabled" => f64::from(u8::from(s.enabled)),
            "health" => level_rank(flags::level(&self.flags(s))),
            _ => 0.0,
        }
    }
}

fn level_rank(level: Level) -> f64 {
    match level {
        Level::Ok => 0.0,
        Level::Paused => 1.0,
        Level::Degraded => 2.0,
        Level::Unhealthy => 3.0,
    }
}

/// The counters of the actions asked for (`None`: all), from memory for the actions this
/// instance holds and, in shared mode, from `queue_stats` for the rest.
async fn known(state: &AppState, refs: Option<&[ActionRef]>) -> Result<Vec<QueueStats>, ApiError> {
    let view = &state.cluster;
    let mut found: Vec<QueueStats> = match refs {
        Some(refs) => refs
            .iter()
            .filter(|r| view.holds(r))
            .filter_map(|r| state.stats.get(r))
            .collect(),
        None => {
            let mut all = state.stats.all();
            all.retain(|s| view.holds(&s.action_ref));
            all
        }
    };
    let (Some(_), Some((pool, schema))) = (&view.owns, &view.table) else {
        return Ok(found);
    };
    let in_memory: HashSet<ActionRef> = found.iter().map(|s| s.action_ref.clone()).collect();
    let elsewhere: Option<Vec<ActionRef>> = refs.map(|refs| {
        refs.iter()
            .filter(|r| !in_memory.contains(*r))
            .cloned()
            .collect()
    });
    if elsewhere.as_ref().is_some_and(Vec::is_empty) {
        return Ok(found);
    }
    let stored = crate::db::stats::stored_many(pool, schema, elsewhere.as_deref())
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "the actions listing could not read queue_stats");
            ApiError::Unavailable("queue_stats could not be read".to_owned())
        })?;
    // A held action missing from memory (idle since this instance took its partition) is
    // shown as the table has it too.
    found.extend(
        stored
            .into_iter()
            .filter(|s| !in_memory.contains(&s.action_ref)),
    );
    Ok(found)
}

/// `GET /api/v1/actions`
pub async fn list(
    State(state): State<Arc<AppState>>,
    params: Params,
) -> Result<axum::Json<ActionList>, ApiError> {
    params.only(&["q", "sort", "order", "offset", "limit", "refs"])?;
    if let Some(raw) = params.get("refs") {
        if let Some(other) = ["q", "sort", "order", "offset", "limit"]
            .into_iter()
            .find(|p| params.get(p).is_some())
        {
            return Err(ApiError::bad_request(
                other,
                format!(
                    "`{other}` cannot be combined with `refs` (refs answers the rows named, in their order)"
                ),
            ));
        }
        let refs = action_refs("refs", raw, MAX_REFS)?;
        let found = known(&state, Some(&refs)).await?;
        let judge = Judge::new(&state).await?;
        let mut by_ref: HashMap<&ActionRef, &QueueStats> =
            found.iter().map(|s| (&s.action_ref, s)).collect();
        let data: Vec<ActionRow> = refs
            .iter()
            .filter_map(|r| by_ref.remove(r))
            .map(|s| judge.row(s))
            .collect();
        return Ok(axum::Json(ActionList {
            total: data.len(),
            offset: 0,
            limit: refs.len(),
            data,
        }));
    }
    let q = params.get("q").map(str::to_ascii_lowercase);
    let sort = params.get_choice("sort", SORTS, "action_ref")?;
    let descending = params.get_choice("order", &["asc", "desc"], "asc")? == "desc";
    let offset = params.get_usize("offset", 0, 0, MAX_OFFSET)?;
    let limit = params.get_usize("limit", DEFAULT_PAGE, 1, MAX_PAGE)?;

    let mut all = known(&state, None).await?;
    if let Some(q) = q.as_deref().filter(|q| !q.is_empty()) {
        // Refs are ASCII, so a lowercase copy of each matches case-insensitively.
        all.retain(|s| s.action_ref.as_str().to_ascii_lowercase().contains(q));
    }
    let judge = Judge::new(&state).await?;
    let total = all.len();
    let mut keyed: Vec<(f64, QueueStats)> = all
        .into_iter()
        .map(|s| {
            let k = if sort == "action_ref" {
                0.0
            } else {
                judge.key(sort, &s)
            };
            (k, s)
        })
        .collect();
    keyed.sort_by(|(ka, a), (kb, b)| {
        let by_key = if sort == "action_ref" {
            a.action_ref.cmp(&b.action_ref)
        } else {
            ka.total_cmp(kb)
        };
        let by_key = if descending { by_key.reverse() } else { by_key };
        by_key.then_with(|| a.action_ref.cmp(&b.action_ref))
    });
    let data = keyed
        .iter()
        .skip(offset)
        .take(limit)
        .map(|(_, s)| judge.row(s))
        .collect();
    Ok(axum::Json(ActionList {
        data,
        total,
        offset,
        limit,
    }))
}

/// A waiting execution in the detail.
#[derive(Debug, Serialize)]
pub struct WaitingRow {
    /// 1 for the head of the queue.
    pub position: usize,
    pub execution_id: ExecutionId,
    pub enqueued_at: String,
    pub wait_seconds: f64,
}

/// A running execution in the detail.
#[derive(Debug, Serialize)]
pub struct RunningRow {
    pub execution_id: ExecutionId,
    /// When it took its slot (was admitted and dispatched).
    pub started_at: String,
    pub running_seconds: f64,
}

/// An execution that ended lately.
#[derive(Debug, Serialize)]
pub struct EndRow {
    pub execution_id: ExecutionId,
    /// See [`crate::core::recent::EndOutcome::as_str`].
    pub outcome: &'static str,
    /// `running`, `queued` or `requested`: where it was when it ended.
    pub stage: &'static str,
    /// For `rejected`: `QueueFull` or `ActionDisabled`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_class: Option<&'static str>,
    pub ended_at: String,
}

/// The body of `GET /api/v1/actions/{ref}`.
#[derive(Debug, Serialize)]
pub struct ActionDetail {
    pub stats: QueueStatsBody,
    pub policy: PolicyView,
    pub health: &'static str,
    pub flags: Vec<Flag>,
    pub waiting: Vec<WaitingRow>,
    /// Executions waiting in all.
    pub waiting_total: usize,
    pub running: Vec<RunningRow>,
    /// Executions holding a slot in all.
    pub running_total: usize,
    /// Most recent first.
    pub recent_ends: Vec<EndRow>,
    /// Why the lists are empty when they are not known here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

fn seconds_between(later: DateTime<Utc>, earlier: DateTime<Utc>) -> f64 {
    ((later - earlier).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6).max(0.0)
}

/// `GET /api/v1/actions/{ref}?waiting=N`
pub async fn detail(
    State(state): State<Arc<AppState>>,
    PathParam(raw): PathParam,
    params: Params,
) -> Result<axum::Json<Data<ActionDetail>>, ApiError> {
    params.only(&["waiting"])?;
    let waiting_wanted = params.get_usize("waiting", DEFAULT_WAITING, 0, MAX_WAITING)?;
    let action = action_ref(&raw)?;
    let clock = state.executor.clock();
    let now = clock.wall(clock.now());
    let thresholds = state.health.thresholds();
    let policy = PolicyView::new(&action, state.executor.policy(&action));
    let view = &state.cluster;
    let not_seen = || {
        ApiError::NotFound(format!(
            "action '{action}' has not been seen by this executor"
        ))
    };
    let owner = view.owner_of(&action).await;
    let with_owner = |mut body: QueueStatsBody| {
        if let Some((p, o)) = owner.clone() {
            body.partition = Some(p);
            body.owner = Some(o);
        }
        body
    };
    // Counters without the lists: from the table (owned elsewhere) or as last reported.
    let counters_only = |s: QueueStats, note: String| {
        let stuck = state
            .health
            .stuck_by_action()
            .get(&action)
            .copied()
            .unwrap_or(0);
        let flags = flags::flags(&s, stuck, &thresholds, now);
        ActionDetail {
            stats: with_owner(QueueStatsBody::new(&s, now)),
            policy: PolicyView::new(&action, state.executor.policy(&action)),
            health: flags::health(&flags),
            flags,
            waiting: Vec::new(),
            waiting_total: s.queue_length,
            running: Vec::new(),
            running_total: s.active_count,
            recent_ends: Vec::new(),
            note: Some(note),
        }
    };
    if let Some((pool, schema)) = view.table.as_ref().filter(|_| !view.holds(&action)) {
        let stored = crate::db::stats::stored(pool, schema, &action)
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))?
            .ok_or_else(not_seen)?;
        let note = format!(
            "another instance ({}) owns this action's partition: counters as it last wrote \
             them to queue_stats; ask it for the waiting and running executions",
            owner.as_ref().map_or("unknown", |(_, o)| o.as_str())
        );
        return Ok(axum::Json(Data {
            data: counters_only(stored, note),
        }));
    }
    let ask = Inspect {
        waiting: waiting_wanted,
        running: MAX_RUNNING,
    };
    let inspected = match state.executor.inspect(&action, ask).await {
        Ok(Some(v)) => v,
        Ok(None) => {
            let s = state.stats.get(&action).ok_or_else(not_seen)?;
            let note =
                "the action's actor has stopped: counters as it last reported them".to_owned();
            return Ok(axum::Json(Data {
                data: counters_only(s, note),
            }));
        }
        Err(e) => {
            let s = state
                .stats
                .get(&action)
                .ok_or_else(|| ApiError::Unavailable(e.to_string()))?;
            let note = format!("{e}: counters as it last reported them");
            return Ok(axum::Json(Data {
                data: counters_only(s, note),
            }));
        }
    };
    let running: Vec<RunningRow> = inspected
        .running
        .iter()
        .map(|(id, at)| RunningRow {
            execution_id: *id,
            started_at: rfc3339(*at),
            running_seconds: seconds_between(now, *at),
        })
        .collect();
    let stuck_age = thresholds.stuck_age_seconds as f64;
    let stuck = running
        .iter()
        .filter(|r| r.running_seconds > stuck_age)
        .count();
    let s = &inspected.stats;
    let flags = flags::flags(s, stuck, &thresholds, now);
    Ok(axum::Json(Data {
        data: ActionDetail {
            stats: with_owner(QueueStatsBody::new(s, now)),
            policy,
            health: flags::health(&flags),
            flags,
            waiting: inspected
                .waiting
                .iter()
                .enumerate()
                .map(|(i, (id, at))| WaitingRow {
                    position: i + 1,
                    execution_id: *id,
                    enqueued_at: rfc3339(*at),
                    wait_seconds: seconds_between(now, *at),
                })
                .collect(),
            waiting_total: s.queue_length,
            running,
            running_total: s.active_count,
            recent_ends: inspected
                .recent_ends
                .iter()
                .map(|(id, outcome, at)| EndRow {
                    execution_id: *id,
                    outcome: outcome.as_str(),
                    stage: outcome.stage(),
                    error_class: outcome.error_class(),
                    ended_at: rfc3339(*at),
                })
                .collect(),
            note: None,
        },
    }))
}
