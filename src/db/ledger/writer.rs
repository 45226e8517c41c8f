//! The writer task: batches what the sink hands in, commits each batch (retrying while
//! Postgres is unreachable), then settles its receipts and releases its held dispatches.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use sqlx::postgres::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::plan::{
    InsertColumns, Item, Plan, RowChange, Statements, UpdateColumns, plans_per_execution,
};
use super::{Input, Shared};
use crate::core::ahead::CANCELED_AHEAD_CAPACITY;
use crate::core::{Event, OutcomeSink};
use crate::db::actions::ActionIds;
use crate::db::{DbError, MAX_STORABLE_EXECUTION_ID, Schema, is_transient};
use crate::model::ActionRef;

/// How often a writer with nothing to write checks that its partitions are still its own.
const IDLE_FENCE_CHECK: Duration = Duration::from_secs(5);

/// How the writer batches and retries.
#[derive(Debug, Clone, Copy)]
pub struct LedgerOptions {
    /// Flush as soon as this many items (events and `running` marks) are pending
    /// (`database.batch_max_rows`).
    pub batch_max_rows: usize,
    /// Longest an item waits to be batched with others (`database.flush_interval_ms`).
    pub flush_interval: Duration,
    /// First pause after a failed flush.
    pub retry_min: Duration,
    /// Longest pause between attempts while Postgres stays unreachable.
    pub retry_max: Duration,
}

/// The writer's own defaults, for tests and benches; the service takes its options from the
/// config (where `flush_interval_ms` defaults to 20).
impl Default for LedgerOptions {
    fn default() -> Self {
        Self {
            batch_max_rows: 5000,
            flush_interval: Duration::from_millis(5),
            retry_min: Duration::from_millis(50),
            retry_max: Duration::from_secs(5),
        }
    }
}

/// What the writer has received and not yet written.
struct Inbox {
    pending: VecDeque<Item>,
    /// When the oldest pending item arrived: the flush deadline runs from it.
    oldest: Instant,
    /// Items received so far; a sync is answered once this many are committed.
    received: u64,
    syncs: VecDeque<(u64, oneshot::Sender<()>)>,
    /// The `created` last given to an acceptance of each action.
    last_created: HashMap<ActionRef, DateTime<Utc>>,
    /// `Item::Dispatches` in `pending`. While any wait, the writer flushes at once instead of
    /// waiting out the flush interval: a worker is idle until they go out. Under load this
    /// still batches, since what arrives during one commit goes into the next.
    dispatches: usize,
}

impl Default for Inbox {
    fn default() -> Self {
        Self {
            pending: VecDeque::new(),
            oldest: Instant::now(),
            received: 0,
            syncs: VecDeque::new(),
            last_created: HashMap::new(),
            dispatches: 0,
        }
    }
}

impl Inbox {
    fn accept(&mut self, input: Input) {
        if self.pending.is_empty() {
            self.oldest = Instant::now();
        }
        match input {
            Input::Events(events) => {
                self.received += events.len() as u64;
                for event in events {
                    let created = match &event {
                        Event::Accepted {
                            action,
                            enqueued_at,
                            ..
                        } => Some(self.created_for(action, *enqueued_at)),
                        _ => None,
                    };
                    self.pending.push_back(Item::Event { event, created });
                }
            }
            Input::Running(ids, at) => {
                self.received += ids.len() as u64;
                self.pending
                    .extend(ids.into_iter().map(|id| Item::Running { id, at }));
            }
            Input::Dispatches(batch, to) => {
                self.received += 1;
                self.dispatches += 1;
                self.pending.push_back(Item::Dispatches { batch, to });
            }
            Input::Sync(done) => self.syncs.push_back((self.received, done)),
        }
    }

    /// The `created` of an accepted execution: its acceptance time, nudged a microsecond past
    /// the previous acceptance of the same action when the two would tie. The core stamps every
    /// execution of one batch with the same time, and the runbook's FIFO evidence is
    /// `ORDER BY created`; with ties that order would be arbitrary and show violations that
    /// never happened. `enqueued_at` keeps the core's time unchanged.
    fn created_for(&mut self, action: &ActionRef, enqueued_at: DateTime<Utc>) -> DateTime<Utc> {
        let created = match self.last_created.get(action) {
            Some(last) if *last >= enqueued_at => *last + chrono::Duration::microseconds(1),
            _ => enqueued_at,
        };
        self.last_created.insert(action.clone(), created);
        created
    }

    fn answer_syncs(&mut self, committed: u64) {
        while self
            .syncs
            .front()
            .is_some_and(|(upto, _)| *upto <= committed)
        {
            if let Some((_, done)) = self.syncs.pop_front() {
                // The caller may have stopped waiting.
                let _ = done.send(());
            }
        }
    }
}

/// The writer task's state.
pub(super) struct Writer {
    pool: PgPool,
    ids: Arc<ActionIds>,
    inner: Arc<dyn OutcomeSink>,
    options: LedgerOptions,
    sql: Statements,
    shared: Arc<Shared>,
    /// The partitions this instance holds and their epochs; every flush checks them first.
    fence: Option<crate::db::partitions::Fence>,
}

/// Why a write failed.
enum WriteError {
    /// Postgres could not be reached; the same write will work later.
    Transient(DbError),
    /// Postgres refused the data; the same write will never work.
    Refused(DbError),
    /// Another instance took a partition this one held: no write will ever be allowed.
    Fenced,
}

/// Why a write was given up.
enum GivenUp {
    /// Postgres refused the data.
    Refused(DbError),
    /// This instance no longer owns its partitions.
    Fenced,
}

impl From<DbError> for WriteError {
    fn from(e: DbError) -> Self {
        let transient = match &e {
            DbError::Query { source, .. } => is_transient(source),
            _ => false,
        };
        if transient {
            WriteError::Transient(e)
        } else {
            WriteError::Refused(e)
        }
    }
}

impl Writer {
    pub(super) fn new(
        pool: PgPool,
        schema: &Schema,
        ids: Arc<ActionIds>,
        options: LedgerOptions,
        inner: Arc<dyn OutcomeSink>,
        shared: Arc<Shared>,
        fence: Option<crate::db::partitions::Fence>,
    ) -> Self {
        Writer {
            fence,
            pool,
            ids,
            inner,
            options: LedgerOptions {
                batch_max_rows: options.batch_max_rows.max(1),
                ..options
            },
            sql: Statements::new(schema),
            shared,
        }
    }

    pub(super) async fn run(
        self,
        mut rx: mpsc::UnboundedReceiver<Input>,
        mut stop: oneshot::Receiver<()>,
    ) {
        let mut inbox = Inbox::default();
        let mut committed: u64 = 0;
        let mut stopping = false;
        let batch_max = self.options.batch_max_rows;
        loop {
            inbox.answer_syncs(committed);
            let deadline = inbox.oldest + self.options.flush_interval;
            if !stopping {
                let waiting_for_more = !inbox.pending.is_empty()
                    && inbox.dispatches == 0
                    && inbox.pending.len() < batch_max
                    && Instant::now() < deadline;
                let idle = inbox.pending.is_empty();
                if idle || waiting_for_more {
                    // An idle owner checks its fence now and then, so that one whose
                    // partitions another took stops even if it has nothing to write.
                    let check_fence = idle && self.fence.is_some() && !self.shared.is_fenced();
                    tokio::select! {
                        biased;
                        _ = &mut stop => stopping = true,
                        input = rx.recv() => match input {
                            Some(input) => inbox.accept(input),
                            None => stopping = true,
                        },
                        _ = tokio::time::sleep_until(deadline), if !idle => {}
                        () = tokio::time::sleep(IDLE_FENCE_CHECK), if check_fence => {
                            self.write(Vec::new()).await;
                        }
                    }
                }
            }
            // Take whatever is already there without waiting; at shutdown, everything.
            while stopping || inbox.pending.len() < batch_max {
                match rx.try_recv() {
                    Ok(input) => inbox.accept(input),
                    Err(_) => break,
                }
            }
            if inbox.pending.is_empty() {
                if stopping {
                    inbox.answer_syncs(u64::MAX);
                    return;
                }
                continue;
            }
            let due = stopping
                || inbox.dispatches > 0
                || inbox.pending.len() >= batch_max
                || Instant::now() >= inbox.oldest + self.options.flush_interval;
            if !due {
                continue;
            }
            let n = inbox.pending.len().min(batch_max);
            let batch: Vec<Item> = inbox.pending.drain(..n).collect();
            inbox.dispatches -= batch
                .iter()
                .filter(|i| matches!(i, Item::Dispatches { .. }))
                .count();
            let began = Instant::now();
            self.write(batch).await;
            tracing::debug!(target: "fifo_executor::db::ledger::flush", items = n, ms = began.elapsed().as_secs_f64() * 1000.0, "ledger flush");
            committed += n as u64;
        }
    }

    /// Writes one batch, retrying while Postgres is unreachable, then settles and forwards it.
    /// Once fenced, drops it: nothing settled (its messages go back to the broker when this
    /// instance's connection closes), nothing dispatched, nothing forwarded.
    async fn write(&self, batch: Vec<Item>) {
        if self.shared.is_fenced() {
            self.drop_fenced(batch);
            return;
        }
        let unstorable = batch
            .iter()
            .filter(|i| i.execution_id() > Some(MAX_STORABLE_EXECUTION_ID))
            .count();
        if unstorable > 0 {
            self.shared
                .dropped
                .fetch_add(unstorable as u64, Ordering::Relaxed);
            tracing::error!(
                count = unstorable,
                "execution ids above {MAX_STORABLE_EXECUTION_ID} cannot be stored; not recorded"
            );
        }
        let outcome = {
            let plan = Plan::build(&batch);
            self.write_retrying(&plan).await
        };
        match outcome {
            Ok(()) => {}
            Err(GivenUp::Fenced) => {
                self.drop_fenced(batch);
                return;
            }
            Err(GivenUp::Refused(e)) => {
                tracing::error!(error = %e, items = batch.len(),
                    "Postgres refused a ledger batch; writing it one execution at a time");
                // One execution per transaction, so that a row Postgres refuses costs only
                // that execution's ledger entry.
                for (id, items, plan) in plans_per_execution(&batch) {
                    match self.write_retrying(&plan).await {
                        Ok(()) => {}
                        Err(GivenUp::Fenced) => {
                            self.drop_fenced(batch);
                            return;
                        }
                        Err(GivenUp::Refused(e)) => {
                            self.shared
                                .dropped
                                .fetch_add(items as u64, Ordering::Relaxed);
                            tracing::error!(execution_id = id, error = %e,
                                "Postgres refused this execution's ledger rows; not recorded");
                        }
                    }
                }
            }
        }
        self.finish(batch);
    }

    /// Marks the ledger fenced (the first time, says so) and drops `batch` unsettled.
    fn drop_fenced(&self, batch: Vec<Item>) {
        self.shared.mark_fenced();
        metrics::counter!("attune_fenced_writes_total").increment(1);
        let held = batch
            .iter()
            .filter_map(|i| match i {
                Item::Dispatches { batch, .. } => Some(batch.len() as u64),
                _ => None,
            })
            .sum::<u64>();
        if held > 0 {
            metrics::counter!("attune_dispatches_dropped_total", "reason" => "fenced")
                .increment(held);
        }
        let rows = batch
            .iter()
            .filter(|i| !matches!(i, Item::Dispatches { .. }))
            .count();
        self.shared.pending.fetch_sub(rows, Ordering::Relaxed);
    }

    /// Retries transient failures with backoff until the write commits; gives up if Postgres
    /// refused the data itself or the fence no longer holds.
    async fn write_retrying(&self, plan: &Plan<'_>) -> Result<(), GivenUp> {
        let mut backoff = self.options.retry_min;
        let mut down_since: Option<Instant> = None;
        loop {
            match self.try_write(plan).await {
                Ok(()) => {
                    if let Some(since) = down_since {
                        tracing::info!(
                            down_for_ms = since.elapsed().as_millis() as u64,
                            "ledger writes resumed"
                        );
                    }
                    self.shared.unhealthy.store(false, Ordering::Relaxed);
                    return Ok(());
                }
                Err(WriteError::Refused(e)) => {
                    self.shared.failed_attempts.fetch_add(1, Ordering::Relaxed);
                    return Err(GivenUp::Refused(e));
                }
                Err(WriteError::Fenced) => return Err(GivenUp::Fenced),
                Err(WriteError::Transient(e)) => {
                    self.shared.failed_attempts.fetch_add(1, Ordering::Relaxed);
                    self.shared.unhealthy.store(true, Ordering::Relaxed);
                    if down_since.is_none() {
                        down_since = Some(Instant::now());
                        tracing::warn!(error = %e, pending = self.shared.pending.load(Ordering::Relaxed),
                            "ledger write failed; retrying, nothing is acknowledged meanwhile");
                    } else {
                        tracing::debug!(error = %e, retry_in_ms = backoff.as_millis() as u64,
                            "ledger write failed again");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.options.retry_max);
                }
            }
        }
    }

    /// One attempt. Unfenced: the statements run on one connection, each its own implicit
    /// transaction (one round trip for most flushes). Fenced: one transaction that first
    /// checks the fence, locking the partition rows until the commit.
    async fn try_write(&self, plan: &Plan<'_>) -> Result<(), WriteError> {
        // With a fence even a batch that writes nothing is checked: settling its receipts
        // (unmatched completions, rejected requests) and releasing its dispatches are acts of
        // the partitions' owner too.
        if plan.is_empty() && self.fence.is_none() {
            return Ok(());
        }
        // New actions get their rows first, on a connection of their own and outside the
        // flush's transaction: that transaction never idles waiting for a second connection.
        let resolved = self.ids.ensure(&self.pool, plan.new_actions()).await?;
        self.count(resolved);
        let Some(fence) = &self.fence else {
            let mut conn = self
                .pool
                .acquire()
                .await
                .map_err(DbError::query("taking a connection for the ledger"))?;
            return self.write_plan(&mut conn, plan).await;
        };
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(DbError::query("beginning a ledger flush"))?;
        if !fence.check(&mut tx).await? {
            return Err(WriteError::Fenced);
        }
        self.write_plan(&mut tx, plan).await?;
        tx.commit()
            .await
            .map_err(DbError::query("committing a ledger flush"))?;
        // The check; BEGIN and COMMIT are not counted.
        self.count(1);
        Ok(())
    }

    /// Resolve new actions, then the marks, the rows and the marks used up, in that order.
    async fn write_plan(&self, conn: &mut PgConnection, plan: &Plan<'_>) -> Result<(), WriteError> {
        // Marks first, the rows, then the marks used up: a mark goes only once its request's
        // cancel is committed (a crash in between leaves a mark whose execution exists, which
        // recovery ignores). Statements of their own, rare, and harmless to repeat if a retry
        // follows a commit.
        if !plan.marks.is_empty() {
            sqlx::query(self.sql.mark.clone())
                .bind(&plan.marks)
                .bind(i64::try_from(CANCELED_AHEAD_CAPACITY).unwrap_or(i64::MAX))
                .execute(&mut *conn)
                .await
                .map_err(DbError::query(
                    "keeping cancels that came before their requests",
                ))?;
            self.count(1);
        }
        if !plan.rows.is_empty() {
            self.write_rows(conn, plan).await?;
        }
        if !plan.unmarks.is_empty() {
            sqlx::query(self.sql.unmark.clone())
                .bind(&plan.unmarks)
                .execute(&mut *conn)
                .await
                .map_err(DbError::query("forgetting cancels that were used"))?;
            self.count(1);
        }
        Ok(())
    }

    /// The rows of one flush: one statement, in the flush's transaction or its own.
    async fn write_rows(&self, conn: &mut PgConnection, plan: &Plan<'_>) -> Result<(), WriteError> {
        let (inserts, updates): (Vec<&RowChange<'_>>, Vec<&RowChange<'_>>) =
            plan.rows.iter().partition(|r| r.accept.is_some());
        let mut c = InsertColumns::with_capacity(inserts.len());
        for row in &inserts {
            let Some(accept) = &row.accept else { continue };
            let Some(action_id) = self.ids.get(accept.action) else {
                return Err(WriteError::Refused(DbError::Query {
                    context: "looking up an action id",
                    source: sqlx::Error::RowNotFound,
                }));
            };
            c.id.push(row.id);
            c.action.push(action_id);
            c.status.push(row.status);
            c.created.push(accept.created);
            c.updated.push(row.updated);
            c.request_id.push(accept.request_id.as_deref());
            c.parameters.push(&accept.parameters);
            c.enqueued_at.push(accept.enqueued_at);
            c.dispatched_at.push(row.dispatched_at);
            c.attempt.push(row.admissions.max(row.min_attempt()));
            c.result.push(row.result.as_deref());
        }
        let u = UpdateColumns::of(&updates);
        // One statement, so one round trip, and atomic on its own: all of it
        // commits or none of it does.
        let (sql, context) = match (inserts.is_empty(), updates.is_empty()) {
            (false, true) => (&self.sql.insert, "recording accepted executions"),
            (true, false) => (&self.sql.update, "recording execution transitions"),
            _ => (&self.sql.both, "recording executions"),
        };
        let mut query = sqlx::query(sql.clone());
        if !inserts.is_empty() {
            query = query
                .bind(c.id)
                .bind(c.action)
                .bind(c.status)
                .bind(c.created)
                .bind(c.updated)
                .bind(c.request_id)
                .bind(c.parameters)
                .bind(c.enqueued_at)
                .bind(c.dispatched_at)
                .bind(c.attempt)
                .bind(c.result);
        }
        if !updates.is_empty() {
            query = query
                .bind(u.id)
                .bind(u.status)
                .bind(u.updated)
                .bind(u.dispatched_at)
                .bind(u.admissions)
                .bind(u.min_attempt)
                .bind(u.result)
                .bind(u.rank)
                .bind(u.back);
        }
        query
            .execute(&mut *conn)
            .await
            .map_err(DbError::query(context))?;
        self.count(1);
        self.shared.transactions.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn count(&self, statements: u64) {
        self.shared
            .statements
            .fetch_add(statements, Ordering::Relaxed);
    }

    /// Settles every receipt in the batch, then forwards the events in their order. Settling
    /// takes each receipt out of its event, so the inner sink's own `settle` finds nothing.
    /// Held dispatches are released here too, in their order.
    fn finish(&self, batch: Vec<Item>) {
        let mut events = Vec::with_capacity(batch.len());
        let mut rows = 0;
        let mut released: Vec<ActionRef> = Vec::new();
        for item in batch {
            match item {
                Item::Event { mut event, .. } => {
                    event.settle();
                    events.push(event);
                    rows += 1;
                }
                Item::Running { .. } => rows += 1,
                Item::Dispatches { batch, to } => {
                    if let Some(first) = batch.first() {
                        released.push(first.action.clone());
                    }
                    to.dispatch(batch);
                }
            }
        }
        // Only after the held dispatches went on: a later dispatch of the same action that
        // sees them gone may then go straight out without overtaking them.
        self.shared.flights.committed(&events, &released);
        self.shared.pending.fetch_sub(rows, Ordering::Relaxed);
        self.shared
            .committed
            .fetch_add(rows as u64, Ordering::Relaxed);
        if !events.is_empty() {
            self.inner.record(events);
        }
    }
}
