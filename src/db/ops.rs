//! What the operations side keeps in Postgres: the history of health checks
//! ([`DbHealthStore`]) and the purge of old ledger rows ([`DbLedgerPurge`]). Both implement the
//! seams of [`crate::ops::hooks`], so the health loop and the purge cycle know nothing of SQL.
//!
//! The purge never touches a live execution: every statement names the finished statuses in
//! the outer `DELETE`'s own `WHERE` (not only in a sub-select), so Postgres checks them again on
//! the row version it is about to delete. A row that changed between the sub-select and the
//! delete is judged as it is then, not as it was. (The ledger only ever moves a row forward, so
//! a finished row does not become live again; the re-check costs nothing and keeps the promise
//! independent of that.)

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use sqlx::postgres::PgPool;
use sqlx::{Row, SqlStr};

use super::{DbError, Schema};
use crate::ops::health::HealthReport;
use crate::ops::hooks::{HealthStore, HookError, LedgerPurge, LedgerPurgeOrder, LedgerPurged};

/// Rows one purge statement deletes at most: a statement that deleted a week of history at
/// once would hold its locks and bloat the WAL in one go, and stall the ledger's writes behind
/// it. The purge loops until a statement deletes fewer.
pub const PURGE_BATCH_ROWS: i64 = 10_000;

/// Statuses an execution no longer leaves; only these rows are purged.
const FINISHED: &str = "('succeeded', 'failed', 'canceled', 'timeout')";
/// Statuses of executions that are queued or running.
const LIVE: &str = "('requested', 'scheduled', 'running')";

fn hook_error(e: DbError) -> HookError {
    HookError(e.to_string())
}

/// Stores every health check in `health_checks`.
#[derive(Debug)]
pub struct DbHealthStore {
    /// The service's pool; a store waits at most its acquire timeout for a connection.
    pool: PgPool,
    /// The INSERT, built once for the schema.
    insert: SqlStr,
}

impl DbHealthStore {
    pub fn new(pool: PgPool, schema: &Schema) -> Self {
        Self {
            pool,
            insert: schema.sql(
                "INSERT INTO {s}.health_checks \
                   (checked_at, status, emergency_mode, checks, actions, queued, active, dlq, \
                    stuck, stalled) \
                 VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, $8, $9, $10)",
            ),
        }
    }

    async fn insert(&self, report: &HealthReport) -> Result<(), DbError> {
        let checks = serde_json::to_string(&report.checks).map_err(|e| DbError::Query {
            context: "encoding the health checks",
            source: sqlx::Error::Encode(Box::new(e)),
        })?;
        let t = &report.totals;
        // Counts beyond i64 cannot happen (they count things in memory); saturate rather than
        // refuse the row if one ever did.
        let big = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        sqlx::query(self.insert.clone())
            .bind(report.last_check)
            .bind(report.status.as_str())
            .bind(report.emergency_mode)
            .bind(super::jsonb_text(&checks).as_ref())
            .bind(i32::try_from(t.actions).unwrap_or(i32::MAX))
            .bind(big(t.queued))
            .bind(big(t.active))
            .bind(t.dlq.map(big))
            .bind(big(t.stuck))
            .bind(big(t.stalled))
            .execute(&self.pool)
            .await
            .map_err(DbError::query("storing a health check"))?;
        Ok(())
    }
}

impl HealthStore for DbHealthStore {
    fn store<'a>(&'a self, report: &'a HealthReport) -> BoxFuture<'a, Result<(), HookError>> {
        Box::pin(async move { self.insert(report).await.map_err(hook_error) })
    }
}

/// One kind of old row: how to count it and how to delete a batch of it. `$1` is the cutoff,
/// `$2` the batch size.
#[derive(Debug)]
struct Purgeable {
    /// For the log and the error context.
    what: &'static str,
    /// `SELECT count(*)` of what `delete` would delete, for a dry run.
    count: SqlStr,
    /// Deletes at most `$2` rows when `batched`, else every matching row at once.
    delete: SqlStr,
    /// False for a table with one row per action, small enough for one statement.
    batched: bool,
}

/// Deletes old rows from the ledger during each purge cycle (see the module docs).
#[derive(Debug)]
pub struct DbLedgerPurge {
    /// The service's pool.
    pool: PgPool,
    /// Finished executions by `updated` (when they finished).
    executions: Purgeable,
    /// Idle `queue_stats` rows of actions with nothing queued or running.
    stats: Purgeable,
    /// `queue_snapshots` by `snapshot_time`.
    snapshots: Purgeable,
    /// `health_checks` by `checked_at`.
    health: Purgeable,
    /// Rows per batched statement; [`PURGE_BATCH_ROWS`] unless a test asks for fewer to see
    /// the loop.
    batch: i64,
}

impl DbLedgerPurge {
    pub fn new(pool: PgPool, schema: &Schema) -> Self {
        let executions = Purgeable {
            what: "finished executions",
            count: schema.sql(&format!(
                "SELECT count(*) FROM {{s}}.execution WHERE status IN {FINISHED} AND updated < $1"
            )),
            delete: schema.sql(&format!(
                "DELETE FROM {{s}}.execution e \
                 WHERE e.id IN (SELECT id FROM {{s}}.execution \
                                WHERE status IN {FINISHED} AND updated < $1 LIMIT $2) \
                   AND e.status IN {FINISHED} AND e.updated < $1"
            )),
            batched: true,
        };
        // The runbook's "Clear stale queue stats", plus the ledger's word that nothing of the
        // action is queued or running (the row's own counters can lag the stats writer by one
        // interval). One row per action: no batching needed.
        let stale = format!(
            "q.last_updated < $1 AND q.queue_length = 0 AND q.active_count = 0 \
             AND NOT EXISTS (SELECT 1 FROM {{s}}.execution e \
                             WHERE e.action = q.action_id AND e.status IN {LIVE})"
        );
        let stats = Purgeable {
            what: "idle queue_stats rows",
            count: schema.sql(&format!(
                "SELECT count(*) FROM {{s}}.queue_stats q WHERE {stale}"
            )),
            delete: schema.sql(&format!("DELETE FROM {{s}}.queue_stats q WHERE {stale}")),
            batched: false,
        };
        // The runbook creates queue_snapshots without a key, hence ctid.
        let snapshots = Purgeable {
            what: "old queue_snapshots rows",
            count: schema.sql("SELECT count(*) FROM {s}.queue_snapshots WHERE snapshot_time < $1"),
            delete: schema.sql(
                "DELETE FROM {s}.queue_snapshots \
                 WHERE ctid = ANY(ARRAY(SELECT ctid FROM {s}.queue_snapshots \
                                        WHERE snapshot_time < $1 LIMIT $2)) \
                   AND snapshot_time < $1",
            ),
            batched: true,
        };
        let health = Purgeable {
            what: "old health_checks rows",
            count: schema.sql("SELECT count(*) FROM {s}.health_checks WHERE checked_at < $1"),
            delete: schema.sql(
                "DELETE FROM {s}.health_checks \
                 WHERE id IN (SELECT id FROM {s}.health_checks WHERE checked_at < $1 LIMIT $2)",
            ),
            batched: true,
        };
        Self {
            pool,
            executions,
            stats,
            snapshots,
            health,
            batch: PURGE_BATCH_ROWS,
        }
    }

    /// Fewer rows per statement (at least one); for tests of the batching.
    pub fn with_batch(mut self, rows: i64) -> Self {
        self.batch = rows.max(1);
        self
    }

    /// Counts (dry run) or deletes one kind of row older than `max_age`.
    async fn apply(&self, p: &Purgeable, max_age: Duration, dry_run: bool) -> Result<u64, DbError> {
        let cutoff = cutoff(max_age);
        if dry_run {
            let row = sqlx::query(p.count.clone())
                .bind(cutoff)
                .fetch_one(&self.pool)
                .await
                .map_err(DbError::query("counting rows to purge"))?;
            let n: i64 = row
                .try_get(0)
                .map_err(DbError::query("counting rows to purge"))?;
            return Ok(u64::try_from(n).unwrap_or(0));
        }
        let mut total = 0u64;
        loop {
            let mut q = sqlx::query(p.delete.clone()).bind(cutoff);
            if p.batched {
                q = q.bind(self.batch);
            }
            let done = q
                .execute(&self.pool)
                .await
                .map_err(DbError::query("purging old rows"))?
                .rows_affected();
            total += done;
            if !p.batched || done < u64::try_from(self.batch).unwrap_or(u64::MAX) {
                break;
            }
        }
        tracing::debug!(what = p.what, rows = total, "[purge] ledger rows deleted");
        Ok(total)
    }

    async fn purge_all(&self, order: LedgerPurgeOrder) -> Result<LedgerPurged, DbError> {
        let dry = order.dry_run;
        Ok(LedgerPurged {
            completed_executions: self
                .apply(&self.executions, order.max_completed_age, dry)
                .await?,
            stale_stats: self
                .apply(&self.stats, order.max_stale_stats_age, dry)
                .await?,
            old_snapshots: self
                .apply(&self.snapshots, order.max_history_age, dry)
                .await?,
            old_health_checks: self.apply(&self.health, order.max_history_age, dry).await?,
        })
    }
}

/// The wall-clock time `age` ago: the ledger's timestamps are the core's wall clock. An age
/// too large for chrono reaches back to the earliest time it has, i.e. nothing is that old.
fn cutoff(age: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(age)
        .ok()
        .and_then(|age| Utc::now().checked_sub_signed(age))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

impl LedgerPurge for DbLedgerPurge {
    fn purge<'a>(
        &'a self,
        order: LedgerPurgeOrder,
    ) -> BoxFuture<'a, Result<Option<LedgerPurged>, HookError>> {
        Box::pin(async move { self.purge_all(order).await.map(Some).map_err(hook_error) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_age_beyond_chrono_s_range_cuts_off_nothing() {
        assert_eq!(cutoff(Duration::MAX), DateTime::<Utc>::MIN_UTC);
        let a_day = cutoff(Duration::from_secs(86_400));
        assert!(a_day < Utc::now() && a_day > Utc::now() - chrono::Duration::days(2));
    }
}
