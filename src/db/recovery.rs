//! Start-up recovery: the executions the ledger holds as live go back into their queues.
//!
//! Run [`recover`] after the executor started and before any edge consumes: restored
//! executions claim their ids in the executor's live index, so a redelivered request for one of
//! them is a duplicate, and their order in the queue is their acceptance order (`accept_seq`).
//!
//! | ledger status | restored as |
//! | --- | --- |
//! | `requested` | waiting, in acceptance order; the first [`SENT_AHEAD_PER_ACTION`] of each action with `attempt` raised first (below) |
//! | `running` | holding a slot (a worker has it; its completion frees the slot) |
//! | `scheduled` | holding a slot, and listed in [`RecoveryReport::unconfirmed`]: the executor admitted it but the broker never confirmed its dispatch, so it may never have reached a worker; [`recover_and_resend`] and [`recover_partition`] send it again, ahead of the waiting ones |
//!
//! # Executions that may have been sent while the ledger said `requested`
//!
//! The service dispatches through [`LedgerSink::dispatch_when_safe`]: a dispatch may leave
//! before its admission is committed, so a worker may hold an execution the ledger still shows
//! as `requested`. Such executions are always among the first [`SENT_AHEAD_PER_ACTION`]
//! `requested` rows of their action in acceptance order. Recovery therefore raises `attempt`
//! of exactly those rows by one, committed with the reading, before anything is dispatched;
//! they are restored as waiting with that count ([`Restored::sent_before`]) and, when their
//! turn comes, dispatched as `attempt + 1`, so no copy repeats an attempt a worker may have
//! seen. They keep their place at the head of the queue, so the order is unchanged. Many of
//! them (up to `SENT_AHEAD_PER_ACTION` per action) may carry attempt 2 without a first copy
//! ever having left; that is the price of not
//! committing before every dispatch. After a clean stop (the previous executor drained its
//! ledger writes and said so in `executor_run`) nothing is raised.
//!
//! [`LedgerSink::dispatch_when_safe`]: super::ledger::LedgerSink::dispatch_when_safe
//!
//! Slots taken by restored executions may exceed a limit lowered meanwhile; the limit then
//! holds back new admissions until enough of them finish.
//!
//! Executions that ended before the restart are not loaded: when the ledger holds any,
//! recovery tells the executor that its memory of ended ids is incomplete, and the intake then
//! asks the ledger ([`history`](super::history)) about supplied ids memory does not know. So a
//! request redelivered after its execution ended (the executor died between the ledger commit
//! and the acknowledgement) is a duplicate, not a second run.

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use sqlx::PgConnection;
use sqlx::Row;
use sqlx::postgres::{PgPool, PgRow};

use super::ledger::{LedgerSink, SENT_AHEAD_PER_ACTION};
use super::{DbError, Schema, max_execution_id};
use crate::core::{Executor, Restored};
use crate::model::{ActionRef, ExecutionId, Payload};

/// What recovery put back.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecoveryReport {
    /// Actions that got executions back.
    pub actions: usize,
    /// Executions restored as waiting (`requested`).
    pub waiting: usize,
    /// Executions restored into a slot whose dispatch the broker had confirmed (`running`).
    pub running: usize,
    /// Executions restored into a slot whose dispatch was never confirmed (`scheduled`).
    pub unconfirmed: Vec<UnconfirmedDispatch>,
    /// The highest execution id in the ledger; ids the executor assigns are above it.
    pub max_execution_id: Option<ExecutionId>,
    /// Live rows that could not be restored, with the reason.
    pub skipped: Vec<SkippedExecution>,
    /// Whether the ledger holds executions that ended; if so, the intake asks it about ids
    /// memory does not know.
    pub ended_before: bool,
    /// `requested` executions whose `attempt` was raised because a dispatch may have left
    /// before their admission was committed (see the module docs).
    pub maybe_sent: u64,
    /// Whether the executor before this one stopped with everything committed; then nothing
    /// can have left ahead of its admission, and no attempt is raised.
    pub after_clean_stop: bool,
    /// Ids whose cancel came before their request and whose request has not come yet, oldest
    /// first: marked again, so the request is canceled when it comes.
    pub canceled_ahead: Vec<ExecutionId>,
}

/// A `scheduled` execution: admitted, dispatch not confirmed.
#[derive(Debug, Clone, PartialEq)]
pub struct UnconfirmedDispatch {
    pub action: ActionRef,
    pub execution_id: ExecutionId,
    pub request_id: Option<String>,
    /// The original parameters, for a dispatch sent again.
    pub payload: Payload,
    pub enqueued_at: DateTime<Utc>,
    pub dispatched_at: Option<DateTime<Utc>>,
    /// Admissions so far; a dispatch sent again would be attempt + 1.
    pub attempt: i32,
}

/// A live row recovery left alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedExecution {
    pub execution_id: i64,
    pub action_ref: String,
    pub reason: String,
}

/// Puts every live execution recorded in the ledger back into `executor`, per action in
/// acceptance order, and raises the executor's id allocator above every recorded id.
/// Unconfirmed dispatches hold their slots and are not sent again (see
/// [`recover_and_resend`] for what the service does).
pub async fn recover(
    pool: &PgPool,
    schema: &Schema,
    executor: &Executor,
) -> Result<RecoveryReport, DbError> {
    let (report, groups) = read_all(pool, schema, executor).await?;
    restore_all(executor, &report, groups)?;
    Ok(report)
}

/// As [`recover`], and the dispatches the broker never confirmed go out again: their attempt
/// is raised in the ledger behind the fence first, then each action's actor sends them as
/// it restores its queue, ahead of everything restored as waiting, so no execution accepted
/// later reaches a worker before them. `None`: the fence refused (another instance took the
/// partitions); nothing was restored or sent.
pub async fn recover_and_resend(
    pool: &PgPool,
    schema: &Schema,
    executor: &Executor,
    ledger: &LedgerSink,
) -> Result<Option<RecoveryReport>, DbError> {
    let (report, mut groups) = read_all(pool, schema, executor).await?;
    if !mark_resends(ledger, &report, &mut groups).await? {
        return Ok(None);
    }
    restore_all(executor, &report, groups)?;
    Ok(Some(report))
}

async fn read_all(
    pool: &PgPool,
    schema: &Schema,
    executor: &Executor,
) -> Result<(RecoveryReport, Groups), DbError> {
    // Everything is read before anything is restored, so that a Postgres restart in the
    // middle costs a retry of the reading, never an execution restored twice.
    let clock = executor.clock().clone();
    // Once: a retry after it committed would read this run's own mark, not the last stop.
    let after_clean_stop =
        super::retry_transient("marking the executor's run", || begin_run(pool, schema)).await?;
    super::retry_transient("recovering the queues from the ledger", || {
        read(pool, schema, &clock, after_clean_stop, None)
    })
    .await
}

fn restore_all(
    executor: &Executor,
    report: &RecoveryReport,
    groups: Groups,
) -> Result<(), DbError> {
    for (action, restored) in groups {
        executor.restore(&action, restored)?;
    }
    executor.remember_canceled_ahead(&report.canceled_ahead);
    if let Some(max) = report.max_execution_id {
        executor.observe_execution_id(max);
        if report.ended_before {
            executor.ended_before_start(max);
        }
    }
    tracing::info!(
        actions = report.actions,
        waiting = report.waiting,
        running = report.running,
        unconfirmed = report.unconfirmed.len(),
        maybe_sent = report.maybe_sent,
        skipped = report.skipped.len(),
        canceled_ahead = report.canceled_ahead.len(),
        "recovered live executions from the ledger"
    );
    Ok(())
}

/// Records the raised attempts of the unconfirmed dispatches behind the fence and marks them
/// to be sent again by the restore. `false`: the fence refused.
async fn mark_resends(
    ledger: &LedgerSink,
    report: &RecoveryReport,
    groups: &mut Groups,
) -> Result<bool, DbError> {
    let ids: Vec<ExecutionId> = report.unconfirmed.iter().map(|u| u.execution_id).collect();
    if !ledger.record_resends(&ids).await? {
        return Ok(false);
    }
    if ids.is_empty() {
        return Ok(true);
    }
    let ids: std::collections::HashSet<ExecutionId> = ids.into_iter().collect();
    for (_, restored) in groups.iter_mut() {
        for r in restored.iter_mut() {
            r.resend = r.admitted_at.is_some() && ids.contains(&r.execution_id);
        }
    }
    Ok(true)
}

/// Puts the live executions of one partition's actions back into `executor` (shared mode:
/// the instance just took the partition, and its epoch fences the previous owner), and sends
/// again what the broker never confirmed, as [`recover_and_resend`]. As [`recover`], for
/// those actions only; `released_cleanly` (the previous owner stopped with every write
/// committed) stands in for the clean-stop mark of a whole run. Assigned ids come from the
/// instance's own block, so the ledger's highest id is not observed; it still tells memory
/// which supplied ids may have ended before. `None`: the fence refused.
pub async fn recover_partition(
    pool: &PgPool,
    schema: &Schema,
    executor: &Executor,
    ledger: &LedgerSink,
    partitions: u16,
    partition: crate::cluster::Partition,
    released_cleanly: bool,
) -> Result<Option<RecoveryReport>, DbError> {
    let clock = executor.clock().clone();
    let only = super::retry_transient("finding a partition's live actions", || {
        live_actions_of(pool, schema, partitions, partition)
    })
    .await?;
    let (report, mut groups) =
        super::retry_transient("rebuilding a partition from the ledger", || {
            read(pool, schema, &clock, released_cleanly, Some(&only))
        })
        .await?;
    if !mark_resends(ledger, &report, &mut groups).await? {
        return Ok(None);
    }
    for (action, restored) in groups {
        executor.restore(&action, restored)?;
    }
    executor.remember_canceled_ahead(&report.canceled_ahead);
    if let (Some(max), true) = (report.max_execution_id, report.ended_before) {
        executor.ended_before_start(max);
    }
    Ok(Some(report))
}

/// The ids of the actions of `partition` that have live executions.
async fn live_actions_of(
    pool: &PgPool,
    schema: &Schema,
    partitions: u16,
    partition: crate::cluster::Partition,
) -> Result<Vec<i64>, DbError> {
    let rows: Vec<(i64, String)> = sqlx::query_as(schema.sql(
        "SELECT a.id, a.ref FROM {s}.action a WHERE EXISTS (SELECT 1 FROM {s}.execution e \
           WHERE e.action = a.id AND e.status IN ('requested', 'scheduled', 'running'))",
    ))
    .fetch_all(pool)
    .await
    .map_err(DbError::query("reading the actions with live executions"))?;
    let ids = rows
        .into_iter()
        .filter(|(_, r)| crate::cluster::partition_of_ref(r, partitions) == partition)
        .map(|(id, _)| id)
        .collect();
    Ok(ids)
}

/// Sorts of the recovery's reading (a million live executions: about 160 MB) stay in memory
/// up to this, for its transaction only; beyond it Postgres spills to disk as usual.
const RECOVERY_WORK_MEM: &str = "SET LOCAL work_mem = '256MB'";

/// The live executions of the ledger per action, in acceptance order.
type Groups = Vec<(ActionRef, Vec<Restored>)>;

/// Raises the attempts a crash calls for, cancels waiting executions whose cancel came
/// first, and reads every live execution. Safe to run again after it failed half-way: at
/// worst a second attempt raises an attempt once more (a higher attempt never repeats one a
/// worker saw).
async fn read(
    pool: &PgPool,
    schema: &Schema,
    clock: &crate::core::Clock,
    after_clean_stop: bool,
    only: Option<&[i64]>,
) -> Result<(RecoveryReport, Groups), DbError> {
    let mut report = RecoveryReport {
        after_clean_stop,
        ..RecoveryReport::default()
    };
    // One transaction whose sorts may use memory (a million live executions sort in memory in
    // a fraction of the time on disk, scripts/restart-1m.sh); the raise, the cancels and the
    // reading commit together.
    let begin = DbError::query("starting the recovery's transaction");
    let mut tx = pool.begin().await.map_err(begin)?;
    sqlx::query(RECOVERY_WORK_MEM)
        .execute(&mut *tx)
        .await
        .map_err(DbError::query("setting the recovery's work_mem"))?;
    if !report.after_clean_stop {
        report.maybe_sent = raise_possible_sends(&mut tx, schema, only).await?;
    }
    cancel_marked(&mut tx, schema, only).await?;
    // Grouped by the action's id, not its ref: integers sort faster than text, and the
    // restore needs each action's executions together in acceptance order, not the actions in
    // any order.
    let sql = schema.sql(
        "SELECT e.id, a.ref, e.status, e.request_id, e.parameters::text AS parameters, \
                e.enqueued_at, e.dispatched_at, e.attempt \
         FROM {s}.execution e JOIN {s}.action a ON a.id = e.action \
         WHERE e.status IN ('requested', 'scheduled', 'running') \
           AND ($1::int8[] IS NULL OR e.action = ANY($1)) \
         ORDER BY e.action, e.accept_seq",
    );
    let mut rows = sqlx::query(sql).bind(only).fetch(&mut *tx);
    let mut groups: Groups = Vec::new();
    while let Some(row) = rows
        .try_next()
        .await
        .map_err(DbError::query("reading live executions"))?
    {
        let live = match LiveRow::read(&row) {
            Ok(live) => live,
            Err(skipped) => {
                tracing::error!(execution_id = skipped.execution_id, action = %skipped.action_ref,
                    reason = %skipped.reason, "live execution not restored");
                report.skipped.push(skipped);
                continue;
            }
        };
        if groups.last().is_none_or(|(a, _)| *a != live.action) {
            report.actions += 1;
            groups.push((live.action.clone(), Vec::new()));
        }
        let admitted_at = match live.status.as_str() {
            "requested" => {
                report.waiting += 1;
                None
            }
            status => {
                if status == "scheduled" {
                    report.unconfirmed.push(UnconfirmedDispatch {
                        action: live.action.clone(),
                        execution_id: live.id,
                        request_id: live.request_id.clone(),
                        payload: live.payload.clone(),
                        enqueued_at: live.enqueued_at,
                        dispatched_at: live.dispatched_at,
                        attempt: live.attempt,
                    });
                } else {
                    report.running += 1;
                }
                Some(clock.stamp_of(live.dispatched_at.unwrap_or(live.enqueued_at)))
            }
        };
        if let Some((_, restored)) = groups.last_mut() {
            restored.push(Restored {
                execution_id: live.id,
                request_id: live.request_id.map(String::into_boxed_str),
                payload: live.payload,
                enqueued_at: clock.stamp_of(live.enqueued_at),
                admitted_at,
                sent_before: u32::try_from(live.attempt).unwrap_or(0),
                resend: false,
            });
        }
    }
    drop(rows);
    tx.commit()
        .await
        .map_err(DbError::query("committing the recovery's transaction"))?;
    let marks: Vec<i64> = sqlx::query_scalar(schema.sql(
        "SELECT c.execution_id FROM {s}.cancel_ahead c \
         WHERE NOT EXISTS (SELECT 1 FROM {s}.execution e WHERE e.id = c.execution_id) \
         ORDER BY c.recorded, c.execution_id",
    ))
    .fetch_all(pool)
    .await
    .map_err(DbError::query(
        "reading cancels that came before their requests",
    ))?;
    report.canceled_ahead = marks
        .into_iter()
        .filter_map(|id| u64::try_from(id).ok())
        .collect();
    report.ended_before = super::history::any_ended(pool, schema).await?;
    report.max_execution_id = max_execution_id(pool, schema).await?;
    Ok((report, groups))
}

/// Raises `attempt` of the first [`SENT_AHEAD_PER_ACTION`] `requested` executions of each
/// action, in acceptance order: the only ones a worker may hold while the ledger shows them
/// waiting. Returns how many rows it raised.
async fn raise_possible_sends(
    conn: &mut PgConnection,
    schema: &Schema,
    only: Option<&[i64]>,
) -> Result<u64, DbError> {
    let head = i64::try_from(SENT_AHEAD_PER_ACTION).unwrap_or(i64::MAX);
    let done = sqlx::query(schema.sql(
        "UPDATE {s}.execution e SET attempt = e.attempt + 1 \
         FROM (SELECT id, row_number() OVER (PARTITION BY action ORDER BY accept_seq) AS place \
               FROM {s}.execution WHERE status = 'requested' \
                 AND ($2::int8[] IS NULL OR action = ANY($2))) h \
         WHERE e.id = h.id AND h.place <= $1",
    ))
    .bind(head)
    .bind(only)
    .execute(&mut *conn)
    .await
    .map_err(DbError::query(
        "raising the attempt of possibly sent executions",
    ))?;
    Ok(done.rows_affected())
}

/// Records as canceled the waiting executions whose cancel came before their request: the
/// executor that accepted the request died before committing the cancel (a batch may commit
/// an acceptance without the cancel that follows it), and the request was acknowledged.
async fn cancel_marked(
    conn: &mut PgConnection,
    schema: &Schema,
    only: Option<&[i64]>,
) -> Result<u64, DbError> {
    let done = sqlx::query(schema.sql(
        "WITH used AS ( \
           UPDATE {s}.execution e SET status = 'canceled', updated = now() \
           FROM {s}.cancel_ahead c \
           WHERE c.execution_id = e.id AND e.status = 'requested' \
             AND ($1::int8[] IS NULL OR e.action = ANY($1)) RETURNING e.id) \
         DELETE FROM {s}.cancel_ahead c USING used WHERE c.execution_id = used.id",
    ))
    .bind(only)
    .execute(&mut *conn)
    .await
    .map_err(DbError::query(
        "canceling waiting executions canceled ahead",
    ))?;
    if done.rows_affected() > 0 {
        tracing::info!(
            canceled = done.rows_affected(),
            "waiting executions whose cancel came first recorded as canceled"
        );
    }
    Ok(done.rows_affected())
}

/// Reads whether the previous run stopped cleanly and marks this one as running, in one
/// committed transaction, before anything is dispatched.
async fn begin_run(pool: &PgPool, schema: &Schema) -> Result<bool, DbError> {
    let err = DbError::query("marking the executor's run in executor_run");
    let mut tx = pool.begin().await.map_err(err)?;
    let clean: Option<bool> = sqlx::query_scalar(
        schema.sql("SELECT stopped_cleanly FROM {s}.executor_run WHERE id = 1 FOR UPDATE"),
    )
    .fetch_optional(&mut *tx)
    .await
    .map_err(DbError::query("reading executor_run"))?;
    sqlx::query(schema.sql(
        "INSERT INTO {s}.executor_run (id, started_at, stopped_at, stopped_cleanly) \
         VALUES (1, now(), NULL, false) \
         ON CONFLICT (id) DO UPDATE SET started_at = now(), stopped_at = NULL, \
           stopped_cleanly = false",
    ))
    .execute(&mut *tx)
    .await
    .map_err(DbError::query("writing executor_run"))?;
    tx.commit()
        .await
        .map_err(DbError::query("committing executor_run"))?;
    Ok(clean.unwrap_or(false))
}

/// Records that this run stopped with every ledger write committed, so that the next start
/// need not raise any attempt. Call it only after the ledger writer has drained, and (with
/// partitions) in a transaction whose fence was checked: an instance whose partitions another
/// took must not mark the other's run clean (`LedgerSink::mark_clean_stop`).
pub async fn mark_clean_stop(conn: &mut PgConnection, schema: &Schema) -> Result<(), DbError> {
    sqlx::query(schema.sql(
        "UPDATE {s}.executor_run SET stopped_at = now(), stopped_cleanly = true WHERE id = 1",
    ))
    .execute(conn)
    .await
    .map_err(DbError::query("marking a clean stop in executor_run"))?;
    Ok(())
}

/// Raises `attempt` of these executions by one while they are not confirmed (`scheduled`, or
/// `requested` when their admission is not committed yet: the admission adds its own one).
/// Run it before dispatching them again, at start for what recovery found unconfirmed and
/// after a lost connection for what the publisher sends again, so that the copy sent now
/// carries an attempt no earlier copy carried, even if the executor dies before the broker
/// confirms it. `LedgerSink::record_resends` runs it behind the partition fence.
pub async fn record_resends(
    conn: &mut PgConnection,
    schema: &Schema,
    ids: &[ExecutionId],
) -> Result<(), DbError> {
    let ids: Vec<i64> = ids.iter().filter_map(|id| super::db_id(*id)).collect();
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(schema.sql(
        "UPDATE {s}.execution SET attempt = attempt + 1 \
         WHERE id = ANY($1) AND status IN ('requested', 'scheduled')",
    ))
    .bind(&ids)
    .execute(conn)
    .await
    .map_err(DbError::query("counting dispatches sent again"))?;
    Ok(())
}

/// One live row, checked.
struct LiveRow {
    id: ExecutionId,
    action: ActionRef,
    status: String,
    request_id: Option<String>,
    payload: Payload,
    enqueued_at: DateTime<Utc>,
    dispatched_at: Option<DateTime<Utc>>,
    attempt: i32,
}

impl LiveRow {
    fn read(row: &PgRow) -> Result<Self, SkippedExecution> {
        let id: i64 = row.try_get("id").unwrap_or_default();
        let action_ref: String = row.try_get("ref").unwrap_or_default();
        let skip = |reason: String| SkippedExecution {
            execution_id: id,
            action_ref: action_ref.clone(),
            reason,
        };
        let column = |e: sqlx::Error| skip(format!("unreadable row: {e}"));
        let action =
            ActionRef::parse(&action_ref).map_err(|e| skip(format!("bad action ref: {e}")))?;
        let execution_id =
            u64::try_from(id).map_err(|_| skip("execution id is not positive".to_owned()))?;
        let parameters: Option<String> = row.try_get("parameters").map_err(column)?;
        let payload = match parameters {
            Some(text) => {
                Payload::from_json(&text).map_err(|e| skip(format!("bad parameters: {e}")))?
            }
            None => Payload::empty_object(),
        };
        Ok(Self {
            id: execution_id,
            action,
            status: row.try_get("status").map_err(column)?,
            request_id: row.try_get("request_id").map_err(column)?,
            payload,
            enqueued_at: row.try_get("enqueued_at").map_err(column)?,
            dispatched_at: row.try_get("dispatched_at").map_err(column)?,
            attempt: row.try_get("attempt").map_err(column)?,
        })
    }
}
