//! `queue_stats` and `queue_snapshots`: the operators' view of every queue.
//!
//! Action actors report their counters after every change; [`StatsWriter::observe`] only
//! overwrites the latest copy in a map and marks it dirty. Every `interval` a task writes the
//! dirty ones in ONE upsert, so Postgres sees at most one statement per interval however many
//! executions went through, and the rows it writes grow with the number of actions that
//! changed, not with executions. Every `snapshot_interval` it copies the busy queues to
//! `queue_snapshots` with the runbook's own INSERT … SELECT.
//!
//! `last_updated` is the core's: when the queue last changed, not when the row was written. A
//! queue that stops changing keeps its old `last_updated` (no write happens at all), which is
//! what the runbook's stuck-queue query looks for. `last_progress` (an extra column) is when
//! the queue last moved forward, for a queue that keeps growing but never drains.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use sqlx::SqlStr;
use sqlx::postgres::PgPool;
use tokio::sync::oneshot;
use tokio::time::{Instant, MissedTickBehavior};

use super::actions::ActionIds;
use super::{DbError, Schema, Worker};
use crate::core::{QueueStats, StatsObserver};
use crate::model::ActionRef;

/// How often the writer writes.
#[derive(Debug, Clone, Copy)]
pub struct StatsOptions {
    /// Between upserts of changed queues (`stats.interval_ms`).
    pub interval: Duration,
    /// Between copies of busy queues to `queue_snapshots` (`stats.snapshot_interval_seconds`).
    pub snapshot_interval: Duration,
}

impl Default for StatsOptions {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(1000),
            snapshot_interval: Duration::from_secs(300),
        }
    }
}

/// What the writer has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsCounters {
    /// SQL statements that succeeded (upserts, action lookups, snapshots).
    pub statements: u64,
    /// `queue_stats` rows written.
    pub rows: u64,
    /// `queue_snapshots` rows inserted.
    pub snapshot_rows: u64,
    /// Periodic write cycles run, with or without anything to write.
    pub ticks: u64,
}

/// The latest counters of one action and whether Postgres has them yet.
#[derive(Debug)]
struct Tracked {
    stats: QueueStats,
    dirty: bool,
}

/// The [`StatsObserver`] that keeps `queue_stats` current.
#[derive(Debug)]
pub struct StatsWriter {
    pool: PgPool,
    ids: Arc<ActionIds>,
    latest: DashMap<ActionRef, Tracked>,
    upsert: SqlStr,
    snapshot: SqlStr,
    /// One write at a time: the task's tick and an explicit [`flush`](Self::flush) (at
    /// shutdown, in tests) must not interleave and write an older copy last.
    write_lock: tokio::sync::Mutex<()>,
    statements: AtomicU64,
    rows: AtomicU64,
    snapshot_rows: AtomicU64,
    ticks: AtomicU64,
    unhealthy: AtomicBool,
}

impl StatsWriter {
    pub fn new(pool: PgPool, schema: &Schema, ids: Arc<ActionIds>) -> Arc<Self> {
        let upsert = schema.sql(
            "INSERT INTO {s}.queue_stats AS q \
               (action_id, queue_length, active_count, max_concurrent, oldest_enqueued_at, \
                total_enqueued, total_completed, last_updated, last_progress) \
             SELECT * FROM UNNEST($1::int8[], $2::int4[], $3::int4[], $4::int4[], \
                                  $5::timestamptz[], $6::int8[], $7::int8[], \
                                  $8::timestamptz[], $9::timestamptz[]) \
             ON CONFLICT (action_id) DO UPDATE SET \
               queue_length = EXCLUDED.queue_length, \
               active_count = EXCLUDED.active_count, \
               max_concurrent = EXCLUDED.max_concurrent, \
               oldest_enqueued_at = EXCLUDED.oldest_enqueued_at, \
               total_enqueued = EXCLUDED.total_enqueued, \
               total_completed = EXCLUDED.total_completed, \
               last_updated = EXCLUDED.last_updated, \
               last_progress = EXCLUDED.last_progress",
        );
        // The runbook's snapshot statement, so that snapshots taken by the executor and by an
        // operator's cron job are the same thing.
        let snapshot = schema.sql(
            "INSERT INTO {s}.queue_snapshots (action_id, queue_length, active_count, total_enqueued) \
             SELECT action_id, queue_length, active_count, total_enqueued \
             FROM {s}.queue_stats \
             WHERE queue_length > 0 OR active_count > 0",
        );
        Arc::new(Self {
            pool,
            ids,
            latest: DashMap::new(),
            upsert,
            snapshot,
            write_lock: tokio::sync::Mutex::new(()),
            statements: AtomicU64::new(0),
            rows: AtomicU64::new(0),
            snapshot_rows: AtomicU64::new(0),
            ticks: AtomicU64::new(0),
            unhealthy: AtomicBool::new(false),
        })
    }

    /// Starts the periodic task. On stop it writes once more, so the last counters reach
    /// Postgres at shutdown.
    pub fn spawn(self: &Arc<Self>, options: StatsOptions) -> Worker {
        let writer = self.clone();
        Worker::spawn("stats writer", move |stop| writer.run(options, stop))
    }

    /// Writes every changed queue now; returns how many rows were written.
    pub async fn flush(&self) -> Result<usize, DbError> {
        let _one_at_a_time = self.write_lock.lock().await;
        let batch: Vec<QueueStats> = self
            .latest
            .iter_mut()
            .filter_map(|mut entry| {
                let tracked = entry.value_mut();
                if tracked.dirty {
                    tracked.dirty = false;
                    Some(tracked.stats.clone())
                } else {
                    None
                }
            })
            .collect();
        if batch.is_empty() {
            return Ok(0);
        }
        match self.write(&batch).await {
            Ok(()) => {
                self.unhealthy.store(false, Ordering::Relaxed);
                self.rows.fetch_add(batch.len() as u64, Ordering::Relaxed);
                Ok(batch.len())
            }
            Err(e) => {
                // The map holds the newest copy anyway; marking it dirty again is enough for the
                // next tick to write it.
                for stats in &batch {
                    if let Some(mut tracked) = self.latest.get_mut(&stats.action_ref) {
                        tracked.dirty = true;
                    }
                }
                self.unhealthy.store(true, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Copies the busy queues to `queue_snapshots`; returns how many rows were inserted.
    pub async fn snapshot(&self) -> Result<u64, DbError> {
        let done = sqlx::query(self.snapshot.clone())
            .execute(&self.pool)
            .await
            .map_err(DbError::query("taking a queue snapshot"))?;
        self.statements.fetch_add(1, Ordering::Relaxed);
        self.snapshot_rows
            .fetch_add(done.rows_affected(), Ordering::Relaxed);
        Ok(done.rows_affected())
    }

    /// The latest counters the writer has seen for an action.
    pub fn latest(&self, action: &ActionRef) -> Option<QueueStats> {
        self.latest.get(action).map(|t| t.stats.clone())
    }

    /// False from a failed write until the next successful one.
    pub fn healthy(&self) -> bool {
        !self.unhealthy.load(Ordering::Relaxed)
    }

    pub fn counters(&self) -> StatsCounters {
        StatsCounters {
            statements: self.statements.load(Ordering::Relaxed),
            rows: self.rows.load(Ordering::Relaxed),
            snapshot_rows: self.snapshot_rows.load(Ordering::Relaxed),
            ticks: self.ticks.load(Ordering::Relaxed),
        }
    }

    async fn write(&self, batch: &[QueueStats]) -> Result<(), DbError> {
        let lookups = self
            .ids
            .ensure(&self.pool, batch.iter().map(|s| &s.action_ref))
            .await?;
        self.statements.fetch_add(lookups, Ordering::Relaxed);
        let mut cols = Columns::with_capacity(batch.len());
        for stats in batch {
            let Some(action_id) = self.ids.get(&stats.action_ref) else {
                return Err(DbError::Query {
                    context: "looking up an action id",
                    source: sqlx::Error::RowNotFound,
                });
            };
            cols.push(action_id, stats);
        }
        sqlx::query(self.upsert.clone())
            .bind(&cols.action_id)
            .bind(&cols.queue_length)
            .bind(&cols.active_count)
            .bind(&cols.max_concurrent)
            .bind(&cols.oldest_enqueued_at)
            .bind(&cols.total_enqueued)
            .bind(&cols.total_completed)
            .bind(&cols.last_updated)
            .bind(&cols.last_progress)
            .execute(&self.pool)
            .await
            .map_err(DbError::query("writing queue_stats"))?;
        self.statements.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn run(self: Arc<Self>, options: StatsOptions, mut stop: oneshot::Receiver<()>) {
        let mut tick = tokio::time::interval(options.interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut next_snapshot = Instant::now() + options.snapshot_interval;
        loop {
            tokio::select! {
                biased;
                _ = &mut stop => {
                    if let Err(e) = self.flush().await {
                        tracing::warn!(error = %e, "last queue_stats write at shutdown failed");
                    }
                    return;
                }
                _ = tick.tick() => {}
            }
            let was_healthy = self.healthy();
            let flushed = self.flush().await;
            self.ticks.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = flushed {
                // Once per outage is enough; the next success says it is over.
                if was_healthy {
                    tracing::warn!(error = %e, "queue_stats write failed; will retry");
                }
                continue;
            }
            if !was_healthy {
                tracing::info!("queue_stats writes resumed");
            }
            if Instant::now() >= next_snapshot {
                next_snapshot = Instant::now() + options.snapshot_interval;
                if let Err(e) = self.snapshot().await {
                    tracing::warn!(error = %e, "queue snapshot failed");
                }
            }
        }
    }
}

impl StatsObserver for StatsWriter {
    fn observe(&self, stats: &QueueStats) {
        if let Some(mut tracked) = self.latest.get_mut(&stats.action_ref) {
            tracked.stats.clone_from(stats);
            tracked.dirty = true;
            return;
        }
        self.latest.insert(
            stats.action_ref.clone(),
            Tracked {
                stats: stats.clone(),
                dirty: true,
            },
        );
    }
}

/// One upsert's column arrays.
struct Columns {
    action_id: Vec<i64>,
    queue_length: Vec<i32>,
    active_count: Vec<i32>,
    max_concurrent: Vec<i32>,
    oldest_enqueued_at: Vec<Option<DateTime<Utc>>>,
    total_enqueued: Vec<i64>,
    total_completed: Vec<i64>,
    last_updated: Vec<DateTime<Utc>>,
    last_progress: Vec<DateTime<Utc>>,
}

impl Columns {
    fn with_capacity(n: usize) -> Self {
        Self {
            action_id: Vec::with_capacity(n),
            queue_length: Vec::with_capacity(n),
            active_count: Vec::with_capacity(n),
            max_concurrent: Vec::with_capacity(n),
            oldest_enqueued_at: Vec::with_capacity(n),
            total_enqueued: Vec::with_capacity(n),
            total_completed: Vec::with_capacity(n),
            last_updated: Vec::with_capacity(n),
            last_progress: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, action_id: i64, s: &QueueStats) {
        // The columns are INT and BIGINT as the runbook has them; counts beyond them cannot
        // occur in practice, and saturating keeps a write from failing if they did.
        let int = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
        let big = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.action_id.push(action_id);
        self.queue_length.push(int(s.queue_length));
        self.active_count.push(int(s.active_count));
        self.max_concurrent
            .push(i32::try_from(s.max_concurrent).unwrap_or(i32::MAX));
        self.oldest_enqueued_at.push(s.oldest_enqueued_at);
        self.total_enqueued.push(big(s.total_enqueued));
        self.total_completed.push(big(s.total_completed));
        self.last_updated.push(s.last_updated);
        self.last_progress.push(s.last_progress);
    }
}
/// One action's row in `queue_stats`, as the instance that owns the action last wrote it
/// (shared mode: another instance asks for an action it does not own). Counters the table
/// does not keep are zero.
pub async fn stored(
    pool: &PgPool,
    schema: &Schema,
    action: &ActionRef,
) -> Result<Option<QueueStats>, DbError> {
    let row: Option<StoredRow> = sqlx::query_as(stored_sql(schema, "WHERE a.ref = $1"))
        .bind(action.as_str())
        .fetch_optional(pool)
        .await
        .map_err(DbError::query("reading an action's queue_stats row"))?;
    Ok(row.map(|r| from_row(action.clone(), r)))
}

/// The `queue_stats` rows of the given actions (all of them when `actions` is `None`), as
/// [`stored`] reads one. The operations page lists, from here, the actions of partitions
/// another instance owns.
pub async fn stored_many(
    pool: &PgPool,
    schema: &Schema,
    actions: Option<&[ActionRef]>,
) -> Result<Vec<QueueStats>, DbError> {
    let refs: Option<Vec<&str>> = actions.map(|a| a.iter().map(ActionRef::as_str).collect());
    let rows: Vec<StoredRow> = sqlx::query_as(stored_sql(
        schema,
        "WHERE $1::text[] IS NULL OR a.ref = ANY($1)",
    ))
    .bind(refs)
    .fetch_all(pool)
    .await
    .map_err(DbError::query("reading queue_stats"))?;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            // Every ref in the table was checked when it was written; one that is not valid
            // now is skipped rather than failing the whole listing.
            let action = ActionRef::parse(&r.9).ok()?;
            Some(from_row(action, r))
        })
        .collect())
}

/// What [`stored`] and [`stored_many`] select (a [`StoredRow`]), with `filter`.
fn stored_sql(schema: &Schema, filter: &str) -> sqlx::SqlStr {
    schema.sql(&format!(
        "SELECT q.queue_length, q.active_count, q.max_concurrent, q.oldest_enqueued_at, \
                q.total_enqueued, q.total_completed, q.last_updated, q.last_progress, a.enabled, \
                a.ref \
         FROM {{s}}.queue_stats q JOIN {{s}}.action a ON a.id = q.action_id {filter}"
    ))
}

fn from_row(action: ActionRef, r: StoredRow) -> QueueStats {
    QueueStats {
        queue_length: usize::try_from(r.0).unwrap_or(0),
        active_count: usize::try_from(r.1).unwrap_or(0),
        max_concurrent: u32::try_from(r.2).unwrap_or(0),
        oldest_enqueued_at: r.3,
        total_enqueued: u64::try_from(r.4).unwrap_or(0),
        total_completed: u64::try_from(r.5).unwrap_or(0),
        last_progress: r.7.unwrap_or(r.6),
        enabled: r.8,
        ..QueueStats::empty(action, r.6)
    }
}

type StoredRow = (
    i32,
    i32,
    i32,
    Option<DateTime<Utc>>,
    i64,
    i64,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    bool,
    String,
);

/// Every action's ref with its queued and running counts from `queue_stats`.
pub async fn stored_holdings(
    pool: &PgPool,
    schema: &Schema,
) -> Result<Vec<(String, usize, usize)>, DbError> {
    let rows: Vec<(String, i32, i32)> = sqlx::query_as(schema.sql(
        "SELECT a.ref, q.queue_length, q.active_count \
         FROM {s}.queue_stats q JOIN {s}.action a ON a.id = q.action_id",
    ))
    .fetch_all(pool)
    .await
    .map_err(DbError::query("reading queue_stats"))?;
    Ok(rows
        .into_iter()
        .map(|(r, q, a)| {
            (
                r,
                usize::try_from(q).unwrap_or(0),
                usize::try_from(a).unwrap_or(0),
            )
        })
        .collect())
}
