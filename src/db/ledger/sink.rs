//! The face of the ledger: [`LedgerSink`], which the actors record into and the RabbitMQ
//! dispatcher marks `running` through, and the dispatchers that send a batch at once or hold it
//! behind the commit.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use chrono::Utc;
use sqlx::postgres::PgPool;
use tokio::sync::{mpsc, oneshot};

use super::writer::{LedgerOptions, Writer};
use super::{Input, Shared};
use crate::core::{Dispatch, Dispatcher, Event, OutcomeSink};
use crate::db::actions::ActionIds;
use crate::db::{DbError, Schema, Worker};
use crate::model::ExecutionId;

#[cfg(doc)]
use super::SENT_AHEAD_PER_ACTION;

/// What the writer has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LedgerCounters {
    /// Items handed in and not yet committed.
    pub pending: usize,
    /// Items committed (or, for `dropped` ones, given up on).
    pub committed: u64,
    /// SQL statements that succeeded, BEGIN and COMMIT not counted.
    pub statements: u64,
    /// Transactions committed.
    pub transactions: u64,
    /// Flush attempts that failed.
    pub failed_attempts: u64,
    /// Items whose row Postgres refused; see the `ledger` module docs.
    pub dropped: u64,
}

/// The [`OutcomeSink`] that makes acceptances durable before they are acknowledged.
pub struct LedgerSink {
    tx: mpsc::UnboundedSender<Input>,
    shared: Arc<Shared>,
    /// For the few writes made beside the writer's flushes, behind the same fence.
    direct: Direct,
}

/// What a write beside the writer's flushes needs.
struct Direct {
    pool: PgPool,
    schema: Schema,
    fence: Option<crate::db::partitions::Fence>,
}

impl std::fmt::Debug for LedgerSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerSink")
            .field("counters", &self.counters())
            .finish()
    }
}

impl LedgerSink {
    /// Starts the writer task. `inner` receives every event after its batch committed, with
    /// its receipt already settled.
    pub fn start(
        pool: PgPool,
        schema: &Schema,
        ids: Arc<ActionIds>,
        options: LedgerOptions,
        inner: Arc<dyn OutcomeSink>,
    ) -> (Arc<LedgerSink>, Worker) {
        Self::start_fenced(pool, schema, ids, options, inner, None)
    }

    /// [`LedgerSink::start`], every flush first checking in its transaction that `fence`
    /// still holds (no other instance took a partition since). Once it does not, the ledger
    /// is fenced: it writes, settles and dispatches nothing more ([`LedgerSink::fenced`]).
    pub fn start_fenced(
        pool: PgPool,
        schema: &Schema,
        ids: Arc<ActionIds>,
        options: LedgerOptions,
        inner: Arc<dyn OutcomeSink>,
        fence: Option<crate::db::partitions::Fence>,
    ) -> (Arc<LedgerSink>, Worker) {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared::default());
        let direct = Direct {
            pool: pool.clone(),
            schema: schema.clone(),
            fence: fence.clone(),
        };
        let writer = Writer::new(pool, schema, ids, options, inner, shared.clone(), fence);
        let worker = Worker::spawn("ledger writer", move |stop| writer.run(rx, stop));
        (Arc::new(LedgerSink { tx, shared, direct }), worker)
    }

    /// Raises the attempts of dispatches about to be sent again
    /// ([`crate::db::recovery::record_resends`]), behind the fence. `Ok(false)`: another
    /// instance took the partitions; the ledger is fenced now and the copies must not go out.
    /// Retries while Postgres is unreachable.
    pub async fn record_resends(&self, ids: &[ExecutionId]) -> Result<bool, DbError> {
        if ids.is_empty() {
            return Ok(!self.is_fenced());
        }
        const WHAT: &str = "counting dispatches sent again";
        let allowed = crate::db::retry_transient(WHAT, || async {
            let Some(mut tx) = self.begin_fenced(WHAT).await? else {
                return Ok(false);
            };
            crate::db::recovery::record_resends(&mut tx, &self.direct.schema, ids).await?;
            tx.commit().await.map_err(DbError::query(WHAT))?;
            Ok(true)
        })
        .await?;
        Ok(allowed && !self.is_fenced())
    }

    /// Marks this run's stop clean ([`crate::db::recovery::mark_clean_stop`]) unless the
    /// ledger is fenced or the fence no longer holds: a clean mark over another instance's
    /// run would let its crash go unnoticed at the next start. Returns whether it was marked.
    pub async fn mark_clean_stop(&self) -> Result<bool, DbError> {
        const WHAT: &str = "marking a clean stop in executor_run";
        if self.is_fenced() {
            return Ok(false);
        }
        let Some(mut tx) = self.begin_fenced(WHAT).await? else {
            return Ok(false);
        };
        match &self.direct.fence {
            // Shared: the partitions, not the one run, carry the mark.
            Some(fence) if fence.is_shared() => {
                fence.release_cleanly(&mut tx, &self.direct.schema).await?;
            }
            _ => crate::db::recovery::mark_clean_stop(&mut tx, &self.direct.schema).await?,
        }
        tx.commit().await.map_err(DbError::query(WHAT))?;
        Ok(true)
    }

    /// The fence this ledger's writes go through, if any.
    pub fn fence(&self) -> Option<&crate::db::partitions::Fence> {
        self.direct.fence.as_ref()
    }

    /// A transaction whose fence (if any) was checked, its partition rows locked until it
    /// ends; `None`, with the ledger marked fenced, if the fence no longer holds.
    async fn begin_fenced(
        &self,
        what: &'static str,
    ) -> Result<Option<sqlx::Transaction<'static, sqlx::Postgres>>, DbError> {
        let mut tx = self
            .direct
            .pool
            .begin()
            .await
            .map_err(DbError::query(what))?;
        if let Some(fence) = &self.direct.fence
            && !fence.check(&mut tx).await?
        {
            self.shared.mark_fenced();
            return Ok(None);
        }
        Ok(Some(tx))
    }

    /// Records that the broker confirmed these dispatches: their rows become `running`. Called
    /// by the RabbitMQ dispatcher; returns at once.
    pub fn mark_running(&self, ids: Vec<ExecutionId>) {
        if ids.is_empty() {
            return;
        }
        self.shared.pending.fetch_add(ids.len(), Ordering::Relaxed);
        if self.tx.send(Input::Running(ids, Utc::now())).is_err() {
            tracing::error!("ledger writer stopped; running marks are lost");
        }
    }

    /// A [`Dispatcher`] that hands each batch to `inner` only once everything recorded before
    /// it is committed, above all the admissions of the executions it carries.
    ///
    /// So a worker never gets an execution the ledger does not show as `scheduled`: after a
    /// crash, whatever a worker may have received is restored holding its slot (and sent
    /// again with `attempt + 1` if the broker never confirmed it), never as waiting, where it
    /// would be dispatched a second time as a first attempt while a worker runs it. The price
    /// is a commit added to each dispatch's latency (the writer flushes at once while a
    /// dispatch waits, rather than after the flush interval), and no dispatches
    /// while Postgres is unreachable (slots still free in memory; the held dispatches leave in
    /// order once it is back).
    ///
    /// The action actors record their events before handing over the dispatches of the same
    /// handler, so a batch's admissions are always ahead of it in the writer's queue.
    pub fn dispatch_after_commit(self: &Arc<Self>, inner: Arc<dyn Dispatcher>) -> AfterCommit {
        AfterCommit {
            tx: self.tx.clone(),
            inner,
        }
    }

    /// A [`Dispatcher`] that sends a batch at once when that is safe for recovery, and
    /// otherwise holds it, like [`LedgerSink::dispatch_after_commit`], until what was recorded
    /// before it is committed. Safe means: the acceptance of every execution in it is
    /// committed (the ledger knows it exists), no earlier batch of the action is held (FIFO),
    /// and at most [`SENT_AHEAD_PER_ACTION`] admissions and removals of the action are still
    /// uncommitted.
    ///
    /// A dispatch sent this way may reach a worker while the ledger still shows the execution
    /// as `requested`. Recovery copes: such executions are always among the first
    /// [`SENT_AHEAD_PER_ACTION`] waiting ones of their action (everything accepted before them
    /// left the queue before them, and every such departure not yet committed counts towards
    /// the bound), and recovery raises the `attempt` of exactly those, so a second copy never
    /// carries an attempt a worker has seen. The price is that up to that many executions at the
    /// head of each queue may carry attempt 2 after a crash without having been sent before.
    ///
    /// A waiting execution's acceptance was committed long before the slot frees, so the
    /// hand-off from a completion to the next dispatch waits for no commit; only a dispatch
    /// of an execution accepted moments ago does.
    pub fn dispatch_when_safe(self: &Arc<Self>, inner: Arc<dyn Dispatcher>) -> WhenSafe {
        self.shared.flights.enable();
        WhenSafe {
            shared: self.shared.clone(),
            held: self.dispatch_after_commit(inner),
        }
    }

    /// Items handed in and not yet committed.
    pub fn pending(&self) -> usize {
        self.shared.pending.load(Ordering::Relaxed)
    }

    /// Whether another instance took a partition this one held: nothing is written any more.
    pub fn is_fenced(&self) -> bool {
        self.shared.is_fenced()
    }

    /// Resolves once the ledger is fenced (at once if it is already).
    pub async fn fenced(&self) {
        loop {
            let woken = self.shared.fenced_now.notified();
            if self.shared.is_fenced() {
                return;
            }
            woken.await;
        }
    }

    /// False from the first failed write until the next commit.
    pub fn healthy(&self) -> bool {
        !self.shared.unhealthy.load(Ordering::Relaxed)
    }

    pub fn counters(&self) -> LedgerCounters {
        let s = &self.shared;
        LedgerCounters {
            pending: s.pending.load(Ordering::Relaxed),
            committed: s.committed.load(Ordering::Relaxed),
            statements: s.statements.load(Ordering::Relaxed),
            transactions: s.transactions.load(Ordering::Relaxed),
            failed_attempts: s.failed_attempts.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
        }
    }

    /// Waits until everything handed in before this call is committed (or given up on). Waits
    /// as long as Postgres is down; callers that must not wait forever add a timeout.
    pub async fn sync(&self) -> Result<(), DbError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Input::Sync(done))
            .map_err(|_| DbError::WriterStopped)?;
        wait.await.map_err(|_| DbError::WriterStopped)
    }
}

impl OutcomeSink for LedgerSink {
    fn record(&self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        self.shared
            .pending
            .fetch_add(events.len(), Ordering::Relaxed);
        self.shared.flights.recorded(&events);
        // The writer stops only at shutdown. Events that arrive after it are not settled, so
        // their messages stay with the broker and come back to the next executor.
        if self.tx.send(Input::Events(events)).is_err() {
            tracing::error!("ledger writer stopped; events left unsettled");
        }
    }
}

/// Passes on only the dispatches of executions that are still live when the ledger releases
/// them. A dispatch waits for its admission's commit; if Postgres is down for longer than
/// `purge.max_running_age_seconds`, the purge reclaims the slot meanwhile (the execution is
/// dead-lettered as `LostCompletion` and the next one admitted), and the held dispatch must
/// then never reach a worker: it would run an execution the DLQ calls lost, beside the one
/// that took its slot. Put between [`LedgerSink::dispatch_after_commit`] and the publisher.
pub struct LiveOnly {
    /// The executor whose live index decides; weak, because the executor holds this
    /// dispatcher. Unset (before [`LiveOnly::bind`]) everything passes.
    executor: std::sync::OnceLock<std::sync::Weak<crate::core::Executor>>,
    /// Where live dispatches go (the RabbitMQ publisher).
    inner: Arc<dyn Dispatcher>,
}

impl LiveOnly {
    pub fn new(inner: Arc<dyn Dispatcher>) -> Self {
        Self {
            executor: std::sync::OnceLock::new(),
            inner,
        }
    }

    /// Names the executor, once it is built.
    pub fn bind(&self, executor: &Arc<crate::core::Executor>) {
        let _ = self.executor.set(Arc::downgrade(executor));
    }
}

impl Dispatcher for LiveOnly {
    fn dispatch(&self, mut batch: Vec<Dispatch>) {
        if let Some(executor) = self.executor.get().and_then(std::sync::Weak::upgrade) {
            let before = batch.len();
            batch.retain(|d| executor.is_live(d.execution_id));
            let dropped = before - batch.len();
            if dropped > 0 {
                metrics::counter!("attune_dispatches_dropped_total", "reason" => "ended_while_held")
                    .increment(dropped as u64);
                tracing::warn!(
                    count = dropped,
                    "dispatches held for the ledger were not sent: their executions ended \
                     meanwhile (slot reclaimed by the purge)"
                );
            }
        }
        if !batch.is_empty() {
            self.inner.dispatch(batch);
        }
    }
}

/// The dispatcher [`LedgerSink::dispatch_when_safe`] returns.
pub struct WhenSafe {
    shared: Arc<Shared>,
    /// The way held batches go: behind the commit of what was recorded before them.
    held: AfterCommit,
}

impl Dispatcher for WhenSafe {
    fn dispatch(&self, batch: Vec<Dispatch>) {
        if batch.is_empty() {
            return;
        }
        if self.shared.is_fenced() {
            metrics::counter!("attune_dispatches_dropped_total", "reason" => "fenced")
                .increment(batch.len() as u64);
            return;
        }
        if self.shared.flights.may_send_now(&batch) {
            metrics::counter!("attune_dispatch_batches_total", "sent" => "at_once").increment(1);
            self.held.inner.dispatch(batch);
        } else {
            metrics::counter!("attune_dispatch_batches_total", "sent" => "after_commit")
                .increment(1);
            self.held.dispatch(batch);
        }
    }
}

/// The dispatcher [`LedgerSink::dispatch_after_commit`] returns.
pub struct AfterCommit {
    /// The ledger writer's own channel, so that dispatches queue behind the events before them.
    tx: mpsc::UnboundedSender<Input>,
    /// Where the dispatches go once committed (the RabbitMQ publisher).
    inner: Arc<dyn Dispatcher>,
}

impl Dispatcher for AfterCommit {
    fn dispatch(&self, batch: Vec<Dispatch>) {
        if batch.is_empty() {
            return;
        }
        // The writer stops only at shutdown, after the actors: nothing can be admitted then.
        if let Err(mpsc::error::SendError(Input::Dispatches(batch, _))) =
            self.tx.send(Input::Dispatches(batch, self.inner.clone()))
        {
            tracing::error!(
                count = batch.len(),
                "ledger writer stopped; dispatches not sent (their executions are restored \
                 as waiting at the next start)"
            );
        }
    }
}
