//! The ledger: every execution's transitions, written to `execution` in batches, with receipts
//! settled only after the commit.
//!
//! ```text
//!   ActionActor ──record(events), then dispatch(batch)──┐
//!   RabbitMQ dispatcher ──mark_running(ids)──────────────┤ unbounded channel
//!                                 ▼
//!                           writer task ── one transaction per flush ──► Postgres
//!                                 │ after COMMIT
//!                                 ├── settle each event's receipt (acks the intake message)
//!                                 ├── release held dispatches to the RabbitMQ dispatcher
//!                                 └── inner OutcomeSink (dead letters, metrics), same order
//! ```
//!
//! # When a dispatch may leave
//!
//! A dispatch must never leave in a way a restart could not account for. The service
//! dispatches through [`LedgerSink::dispatch_when_safe`] (`database.dispatch_wait:
//! acceptance`, the default): a dispatch leaves at once if its execution's acceptance is
//! committed, no earlier dispatch of the action is held, and at most [`SENT_AHEAD_PER_ACTION`]
//! admissions and removals of the action are uncommitted; otherwise it is held until the
//! commit. So everything a worker may hold is in the ledger, and what it may hold while the
//! ledger still shows it waiting is at the head of its action's queue: recovery raises the
//! attempt of the first [`SENT_AHEAD_PER_ACTION`] waiting executions of each action and the
//! next executor admits them first, so no action has more at its workers than its limit
//! across a crash either. An execution that waited in the queue was accepted long before its
//! slot freed, so the hand-off from a completion to the next dispatch waits for no commit;
//! only a new execution that finds a free slot waits for its acceptance's.
//!
//! (Until session 6 a request that named its `execution_id` could leave before its acceptance
//! was committed, the broker's redelivery standing in for the ledger. After a crash the next
//! executor knew nothing of such an execution until its request came back, and could admit
//! others of its action meanwhile while a worker still ran it: more at the workers than the
//! limit. A dispatch no longer leaves ahead of its acceptance, whatever the request names.)
//!
//! [`LedgerSink::dispatch_after_commit`] (`database.dispatch_wait: admission`) holds every
//! dispatch until its admission is committed: a worker never gets an execution the ledger
//! shows as waiting (`tests/pg_kill_restart.rs` saw 77 repeated first attempts over three
//! SIGKILLs when dispatches left with neither rule), at the price of a commit in every
//! hand-off. Either way, while a dispatch is held the writer does not wait out the flush
//! interval but commits at once (what arrives meanwhile joins the next commit).
//!
//! # Batching
//!
//! The writer flushes when `batch_max_rows` items are pending or when the oldest pending item
//! has waited `flush_interval`, whichever comes first; under load the next batch accumulates
//! while the previous one is written.
//!
//! A flush writes every execution it touches once, in the furthest state the batch took it
//! to: executions accepted in this batch are INSERTed already in that state, the others are
//! moved there by one UPDATE. So a flush is one statement (the INSERT and the UPDATE as two
//! data-modifying CTEs when it has both), one round trip and one implicit transaction,
//! covering all its rows through `UNNEST` arrays (plus, only when new action refs appear, one
//! statement before it, see [`ActionIds`]); and an execution that is accepted, dispatched and
//! completed within one flush costs one row write, not four. Writes only move a row forward
//! (requested < scheduled < running < an end status), so a `running` confirmation that
//! overtakes its admission, or an id accepted again after it ended, never moves a row back.
//!
//! # Mapping
//!
//! | event | row |
//! | --- | --- |
//! | `Accepted` | INSERT `requested` (an existing row is only moved forward), `enqueued_at` = acceptance time, `created` = the same made strictly increasing per action (see below) |
//! | `Admitted` | `scheduled`, `dispatched_at` = admission time, `attempt` + 1 |
//! | `Returned` | back to `requested` from `scheduled` or `running` (the one move backwards: the dispatch reached no queue), `dispatched_at` cleared, `attempt` − 1 |
//! | [`LedgerSink::mark_running`] | `running` (the broker confirmed the dispatch) |
//! | `Completed` | the worker's status and result |
//! | `Removed{Canceled}` | `canceled` |
//! | `Removed{TimedOut}`, `Removed{Purged}`, `Removed{NoRoute}` | `timeout`, result `{"error": "QueueTimeout: …"}` / `{"error": "Purged: …"}` / `{"error": "NoRoute: …"}` |
//! | `Reclaimed` | `failed`, result `{"error": "LostCompletion: …"}`: the executor gave up waiting; whether the work ran is unknown, and a completion arriving later frees nothing and changes nothing |
//! | `CanceledAhead` | a row in `cancel_ahead` (the newest [`CANCELED_AHEAD_CAPACITY`] kept), so a restart before the request comes still cancels it |
//! | `Removed{Canceled}` | also deletes the id's `cancel_ahead` row, if any |
//! | `Rejected`, `Unmatched` | nothing (they are settled and forwarded in order) |
//!
//! `updated` is the time the core stamped on the event, not the time of the write, so the
//! runbook's age queries stay truthful even when writes were held back by an outage.
//! `created` differs from `enqueued_at` by at most a few microseconds: the core stamps a
//! whole batch with one time, and ties are broken in acceptance order so that the runbook's
//! FIFO evidence (`ORDER BY created`) shows the real order.
//!
//! # While Postgres is unreachable
//!
//! A failed flush is retried, unchanged, with exponential backoff (`retry_min` doubling up to
//! `retry_max`); the pool replaces broken connections by itself. Nothing is settled until its
//! batch commits, so the RabbitMQ edge acknowledges nothing and the broker keeps every message;
//! completions still free slots in memory; of the dispatches they admit, at most
//! [`SENT_AHEAD_PER_ACTION`] per action leave (with `dispatch_wait: acceptance`), the rest
//! wait for the commit.
//! [`LedgerSink::healthy`] is false from the first failed attempt to the next commit.
//!
//! Memory: pending items live in the channel and the writer's queue. Their number is bounded
//! by what can happen without any receipt being settled: intake deliveries up to the request
//! consumer's prefetch, completions and cancels up to theirs, plus at most one admission, one
//! `running` and one end per execution already in memory. The payload is shared with the queue
//! entry, so an item costs about 200 bytes beyond data the executor holds anyway. The edge can
//! watch [`LedgerSink::pending`] to stop consuming earlier.
//!
//! A batch that fails for a reason other than reachability (Postgres rejects its data) would
//! fail forever; the writer then writes it again one execution per transaction, so only the
//! offending execution is lost from the ledger. Its events are still settled and forwarded (the
//! executor already acted on them), counted in [`LedgerCounters::dropped`] and logged as errors.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::SqlStr;
use sqlx::postgres::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::actions::ActionIds;
use super::{
    DbError, MAX_STORABLE_EXECUTION_ID, Schema, Worker, db_id, is_transient, jsonb_text, pg_text,
};
use crate::core::ahead::CANCELED_AHEAD_CAPACITY;
use crate::core::ports::RemovalReason;
use crate::core::{Dispatch, Dispatcher, Event, OutcomeSink};
use crate::model::{ActionRef, ExecutionId};

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
    /// Items whose row Postgres refused; see the module docs.
    pub dropped: u64,
}

/// State shared between the sink handle and its writer task.
#[derive(Debug, Default)]
struct Shared {
    pending: AtomicUsize,
    /// Starts true: until a write fails there is no reason to call the ledger unhealthy.
    unhealthy: AtomicBool,
    committed: AtomicU64,
    statements: AtomicU64,
    transactions: AtomicU64,
    failed_attempts: AtomicU64,
    dropped: AtomicU64,
    /// Per action, what is recorded and not yet committed; kept only once
    /// [`LedgerSink::dispatch_when_safe`] is in use.
    flights: Flights,
}

/// What the sink hands its writer.
enum Input {
    Events(Vec<Event>),
    Running(Vec<ExecutionId>, DateTime<Utc>),
    /// Dispatches held until everything handed in before them is committed; see
    /// [`LedgerSink::dispatch_after_commit`].
    Dispatches(Vec<Dispatch>, Arc<dyn Dispatcher>),
    /// Answered once everything handed in before it is committed.
    Sync(oneshot::Sender<()>),
}

/// One unit of pending work.
enum Item {
    /// `created` is set for acceptances only; see [`Inbox::created_for`].
    Event {
        event: Event,
        created: Option<DateTime<Utc>>,
    },
    Running {
        id: ExecutionId,
        at: DateTime<Utc>,
    },
    /// Released once the batch that holds this item has committed.
    Dispatches {
        /// One handler's dispatches, in FIFO order.
        batch: Vec<Dispatch>,
        /// The dispatcher they were meant for.
        to: Arc<dyn Dispatcher>,
    },
}

impl Item {
    /// The execution a row change is about; `None` for held dispatches, which write nothing.
    fn execution_id(&self) -> Option<ExecutionId> {
        match self {
            Item::Event { event, .. } => Some(event.execution_id()),
            Item::Running { id, .. } => Some(*id),
            Item::Dispatches { .. } => None,
        }
    }
}

/// The [`OutcomeSink`] that makes acceptances durable before they are acknowledged.
pub struct LedgerSink {
    tx: mpsc::UnboundedSender<Input>,
    shared: Arc<Shared>,
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
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared::default());
        let writer = Writer {
            pool,
            ids,
            inner,
            options: LedgerOptions {
                batch_max_rows: options.batch_max_rows.max(1),
                ..options
            },
            sql: Statements::new(schema),
            shared: shared.clone(),
        };
        let worker = Worker::spawn("ledger writer", move |stop| writer.run(rx, stop));
        (Arc::new(LedgerSink { tx, shared }), worker)
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
        self.shared.flights.enabled.store(true, Ordering::Relaxed);
        WhenSafe {
            shared: self.shared.clone(),
            held: self.dispatch_after_commit(inner),
        }
    }

    /// Items handed in and not yet committed.
    pub fn pending(&self) -> usize {
        self.shared.pending.load(Ordering::Relaxed)
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

/// How many dispatches of one action may be out before their admissions are committed, when
/// dispatching through [`LedgerSink::dispatch_when_safe`]. Recovery raises the `attempt` of
/// this many waiting executions at the head of each action's queue (see
/// [`recovery`](super::recovery)), so it must not shrink from one version to the next.
///
/// 128 (16 until session 5): one commit window (the flush interval plus the commit) of a busy
/// action's admissions. With 16, an action dispatching a few thousand a second ran into the
/// bound every flush and its hand-offs waited for the commit: `hot` 2,712 and 3,269/s against
/// 3,364 and 3,493/s with 128, alternating (BENCHMARKS.md).
pub const SENT_AHEAD_PER_ACTION: usize = 128;

/// Per action, what has been recorded and is not yet committed: enough to tell whether a
/// dispatch may leave before the commit. One short lock per handler call and per commit.
#[derive(Debug, Default)]
struct Flights {
    /// Set once [`LedgerSink::dispatch_when_safe`] is in use; until then nothing is tracked.
    enabled: AtomicBool,
    by_action: std::sync::Mutex<HashMap<ActionRef, Flight>>,
}

#[derive(Debug, Default)]
struct Flight {
    /// Executions whose acceptance is recorded and not yet committed: none may leave before
    /// that commit.
    unaccepted: std::collections::HashSet<ExecutionId>,
    /// Admissions, removals and ends of waiting executions recorded and not yet committed:
    /// every way of leaving the waiting line.
    departures: usize,
    /// Dispatch batches held in the writer's queue until their commit.
    held: usize,
}

impl Flight {
    fn is_idle(&self) -> bool {
        self.unaccepted.is_empty() && self.departures == 0 && self.held == 0
    }
}

impl Flights {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ActionRef, Flight>> {
        // A panic while holding this lock leaves counters that are still consistent enough
        // to go on with (the worst is a dispatch held for one commit that need not be).
        self.by_action
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts what an actor just recorded.
    fn recorded(&self, events: &[Event]) {
        if !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        let mut flights = self.lock();
        for event in events {
            match event {
                Event::Accepted {
                    action,
                    execution_id,
                    ..
                } => {
                    flights
                        .entry(action.clone())
                        .or_default()
                        .unaccepted
                        .insert(*execution_id);
                }
                _ => {
                    if let Some(action) = departure(event) {
                        flights.entry(action.clone()).or_default().departures += 1;
                    }
                }
            }
        }
    }

    /// Forgets what one batch committed, and the held dispatch batches it released.
    fn committed(&self, events: &[Event], released: &[ActionRef]) {
        if !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        let mut flights = self.lock();
        let mut touched: Vec<&ActionRef> = Vec::new();
        for event in events {
            let action = match event {
                Event::Accepted {
                    action,
                    execution_id,
                    ..
                } => {
                    if let Some(f) = flights.get_mut(action) {
                        f.unaccepted.remove(execution_id);
                    }
                    action
                }
                _ => {
                    let Some(action) = departure(event) else {
                        continue;
                    };
                    if let Some(f) = flights.get_mut(action) {
                        f.departures = f.departures.saturating_sub(1);
                    }
                    action
                }
            };
            touched.push(action);
        }
        for action in released {
            if let Some(f) = flights.get_mut(action) {
                f.held = f.held.saturating_sub(1);
            }
            touched.push(action);
        }
        for action in touched {
            if flights.get(action).is_some_and(Flight::is_idle) {
                flights.remove(action);
            }
        }
    }

    /// Whether `batch` (one handler's dispatches of one action, its events recorded already)
    /// may leave now. If not, it is counted as held here, before it is queued for the writer.
    fn may_send_now(&self, batch: &[Dispatch]) -> bool {
        let Some(action) = batch.first().map(|d| &d.action) else {
            return true;
        };
        let mut flights = self.lock();
        let Some(f) = flights.get_mut(action) else {
            return true;
        };
        let safe = f.held == 0
            && f.departures <= SENT_AHEAD_PER_ACTION
            && !batch.iter().any(|d| f.unaccepted.contains(&d.execution_id));
        if !safe {
            f.held += 1;
        }
        safe
    }
}

/// The action whose waiting line `event` took an execution from, if it did: an admission, a
/// removal, or the end of an execution restored as possibly sent.
fn departure(event: &Event) -> Option<&ActionRef> {
    match event {
        Event::Admitted { action, .. }
        | Event::Removed { action, .. }
        | Event::Completed {
            action,
            from_waiting: true,
            ..
        } => Some(action),
        _ => None,
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

/// The statements of one flush, built once with the schema in them.
struct Statements {
    insert: SqlStr,
    update: SqlStr,
    /// Both in one statement (the two touch different rows): one round trip, one implicit
    /// transaction, for a flush that has new and earlier executions alike.
    both: SqlStr,
    /// Keeps cancels that came before their requests, the newest `$2` at most.
    mark: SqlStr,
    /// Forgets the marks of executions canceled.
    unmark: SqlStr,
}

/// `status` ranked by how far an execution has come, as SQL; a write only ever raises it.
const RANK_OF_STATUS: &str = "CASE e.status WHEN 'requested' THEN 0 WHEN 'scheduled' THEN 1 \
                              WHEN 'running' THEN 2 ELSE 3 END";

impl Statements {
    fn new(schema: &Schema) -> Self {
        // Data-modifying CTEs run exactly once each, and the two never touch the same row: a
        // flush writes each execution once, INSERTed if it was accepted in this flush and
        // UPDATEd otherwise. The UPDATE's parameters follow the INSERT's eleven.
        let both = schema.sql(&format!(
            "WITH inserted AS ({}), updated AS ({}) SELECT 1",
            Self::insert_template(),
            Self::update_template(12)
        ));
        Self {
            insert: schema.sql(&Self::insert_template()),
            update: schema.sql(&Self::update_template(1)),
            both,
            // The DELETE sees the table as it was before the INSERT (one snapshot): the bound
            // may be passed by one batch until the next one trims it.
            mark: schema.sql(
                "WITH added AS (INSERT INTO {s}.cancel_ahead (execution_id) \
                                SELECT unnest($1::int8[]) ON CONFLICT DO NOTHING) \
                 DELETE FROM {s}.cancel_ahead WHERE recorded < \
                   (SELECT recorded FROM {s}.cancel_ahead ORDER BY recorded DESC \
                    OFFSET $2 LIMIT 1)",
            ),
            unmark: schema.sql("DELETE FROM {s}.cancel_ahead WHERE execution_id = ANY($1::int8[])"),
        }
    }

    /// New executions, already in the state they reached within the batch. ORDER BY the
    /// array position: the identity default (accept_seq) is evaluated above the sort, so
    /// acceptance order within a batch is the order of the rows. A conflict (an id accepted
    /// again) only moves the existing row forward. Parameters $1 to $11.
    fn insert_template() -> String {
        format!(
            "INSERT INTO {{s}}.execution AS e \
               (id, action, status, created, updated, request_id, parameters, enqueued_at, \
                dispatched_at, attempt, result) \
             SELECT u.id, u.action, u.status, u.created, u.updated, u.request_id, \
                    u.parameters::jsonb, u.enqueued_at, u.dispatched_at, u.attempt, \
                    u.result::jsonb \
             FROM UNNEST($1::int8[], $2::int8[], $3::text[], $4::timestamptz[], \
                         $5::timestamptz[], $6::text[], $7::text[], $8::timestamptz[], \
                         $9::timestamptz[], $10::int4[], $11::text[]) \
                  WITH ORDINALITY \
                  AS u(id, action, status, created, updated, request_id, parameters, \
                       enqueued_at, dispatched_at, attempt, result, ord) \
             ORDER BY u.ord \
             ON CONFLICT (id) DO UPDATE SET \
               status = EXCLUDED.status, updated = EXCLUDED.updated, \
               dispatched_at = COALESCE(EXCLUDED.dispatched_at, e.dispatched_at), \
               attempt = e.attempt + EXCLUDED.attempt, \
               result = COALESCE(EXCLUDED.result, e.result) \
             WHERE {RANK_OF_STATUS} < \
               CASE EXCLUDED.status WHEN 'requested' THEN 0 WHEN 'scheduled' THEN 1 \
               WHEN 'running' THEN 2 ELSE 3 END"
        )
    }

    /// Executions accepted in an earlier batch: one UPDATE for all of them, each row moved
    /// straight to the state it reached in this batch: further than it was, or (`back`)
    /// from `scheduled` or `running` back to waiting when its dispatch came back unrouted.
    /// Nine parameters, numbered from `first`.
    fn update_template(first: usize) -> String {
        let p: Vec<String> = (first..first + 9).map(|n| format!("${n}")).collect();
        format!(
            "UPDATE {{s}}.execution e SET \
               status = u.status, updated = u.updated, \
               dispatched_at = CASE WHEN u.back AND u.dispatched_at IS NULL THEN NULL \
                               ELSE COALESCE(u.dispatched_at, e.dispatched_at) END, \
               attempt = GREATEST(e.attempt + u.admissions, u.min_attempt), \
               result = COALESCE(u.result::jsonb, e.result) \
             FROM UNNEST({}::int8[], {}::text[], {}::timestamptz[], {}::timestamptz[], \
                         {}::int4[], {}::int4[], {}::text[], {}::int4[], {}::bool[]) \
                  AS u(id, status, updated, dispatched_at, admissions, min_attempt, \
                       result, rank, back) \
             WHERE e.id = u.id AND ({RANK_OF_STATUS} < u.rank \
               OR (u.back AND e.status IN ('scheduled', 'running')))",
            p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8]
        )
    }
}

/// How far an execution has come; a row is only ever moved to a higher rank.
fn rank(status: &str) -> i32 {
    match status {
        "requested" => 0,
        "scheduled" => 1,
        "running" => 2,
        _ => 3,
    }
}

/// An acceptance: what only the INSERT needs.
struct Accept<'a> {
    action: &'a ActionRef,
    request_id: Option<Cow<'a, str>>,
    parameters: Cow<'a, str>,
    enqueued_at: DateTime<Utc>,
    created: DateTime<Utc>,
}

/// Everything one batch does to one execution, folded into the state it ends in.
struct RowChange<'a> {
    id: i64,
    accept: Option<Accept<'a>>,
    status: &'static str,
    /// When the status last changed.
    updated: DateTime<Utc>,
    dispatched_at: Option<DateTime<Utc>>,
    admissions: i32,
    result: Option<String>,
    /// Its dispatch came back unrouted in this batch: the row may move back to waiting.
    back: bool,
}

impl RowChange<'_> {
    /// Applies one transition if it moves the execution forward. Admissions are counted even
    /// when a `running` confirmation overtook them.
    fn advance(&mut self, status: &'static str, at: DateTime<Utc>, result: Option<String>) {
        if rank(status) > rank(self.status) {
            self.status = status;
            self.updated = at;
            if result.is_some() {
                self.result = result;
            }
        }
    }

    /// `attempt` at least 1 once the broker confirmed a dispatch.
    fn min_attempt(&self) -> i32 {
        i32::from(self.status == "running")
    }
}

/// The rows one flush writes: one change per execution, in order of first appearance (for new
/// executions that is acceptance order).
#[derive(Default)]
struct Plan<'a> {
    rows: Vec<RowChange<'a>>,
    index: HashMap<i64, usize>,
    /// Ids whose cancel came before their request: kept in `cancel_ahead`.
    marks: Vec<i64>,
    /// Ids canceled in this batch: a mark they had is used up.
    unmarks: Vec<i64>,
}

impl<'a> Plan<'a> {
    /// Built before any await: events are not `Sync` (their receipts are not), so a future
    /// that held references to them could not move between threads; the plan holds only
    /// references to their plain fields.
    fn build(items: impl IntoIterator<Item = &'a Item>) -> Self {
        let mut p = Plan::default();
        for item in items {
            // Ids beyond BIGINT were counted as dropped when the batch arrived; held dispatches
            // write nothing.
            let Some(id) = item.execution_id().and_then(db_id) else {
                continue;
            };
            match item {
                Item::Running { at, .. } => {
                    // `dispatched_at` stays the admission time. The broker's confirm can come
                    // after the worker has already finished and the next execution was
                    // admitted, so writing the confirm time here would make the ledger show
                    // FIFO order broken when it was not.
                    let row = p.row(id, *at);
                    row.advance("running", *at, None);
                }
                Item::Event { event, created } => p.add_event(id, event, *created),
                Item::Dispatches { .. } => {}
            }
        }
        p
    }

    /// The change of an execution, started as `requested` at `at` if it is new to the batch.
    fn row(&mut self, id: i64, at: DateTime<Utc>) -> &mut RowChange<'a> {
        let slot = *self.index.entry(id).or_insert_with(|| {
            self.rows.push(RowChange {
                id,
                accept: None,
                status: "requested",
                updated: at,
                dispatched_at: None,
                admissions: 0,
                result: None,
                back: false,
            });
            self.rows.len() - 1
        });
        &mut self.rows[slot]
    }

    fn add_event(&mut self, id: i64, event: &'a Event, created: Option<DateTime<Utc>>) {
        match event {
            Event::Accepted {
                action,
                request_id,
                payload,
                enqueued_at,
                ..
            } => {
                let row = self.row(id, *enqueued_at);
                row.accept = Some(Accept {
                    action,
                    request_id: request_id.as_deref().map(pg_text),
                    parameters: jsonb_text(payload.json()),
                    enqueued_at: *enqueued_at,
                    created: created.unwrap_or(*enqueued_at),
                });
            }
            Event::Admitted { at, .. } => {
                let row = self.row(id, *at);
                row.admissions += 1;
                row.dispatched_at = Some(*at);
                row.advance("scheduled", *at, None);
            }
            Event::Returned { at, .. } => {
                let row = self.row(id, *at);
                row.admissions -= 1;
                row.dispatched_at = None;
                row.status = "requested";
                row.updated = *at;
                row.back = true;
            }
            Event::Completed {
                status, result, at, ..
            } => {
                let result = result.as_ref().map(|r| jsonb_text(r.json()).into_owned());
                self.row(id, *at).advance(status.as_str(), *at, result);
            }
            Event::CanceledAhead { .. } => self.marks.push(id),
            Event::Removed {
                reason, execution, ..
            } => {
                if *reason == RemovalReason::Canceled {
                    self.unmarks.push(id);
                }
                let at = plus(execution.enqueued_at, execution.waited);
                let waited = execution.waited.as_secs_f64();
                let (status, result) = match reason {
                    RemovalReason::Canceled => ("canceled", None),
                    RemovalReason::TimedOut => (
                        "timeout",
                        Some(serde_json::json!({
                            "error": format!(
                                "QueueTimeout: waited {waited:.0}s in the queue without a slot"
                            ),
                            "error_class": "QueueTimeout",
                            "waited_seconds": waited,
                        })),
                    ),
                    RemovalReason::Purged => (
                        "timeout",
                        Some(serde_json::json!({
                            "error": format!(
                                "Purged: waited {waited:.0}s in the queue, longer than the purge allows"
                            ),
                            "error_class": "Purged",
                            "waited_seconds": waited,
                        })),
                    ),
                    RemovalReason::NoRoute => (
                        "timeout",
                        Some(serde_json::json!({
                            "error": "NoRoute: its dispatches found no worker queue for longer \
                                      than executor.queue.no_route_timeout_seconds",
                            "error_class": "NoRoute",
                            "waited_seconds": waited,
                        })),
                    ),
                };
                self.row(id, at)
                    .advance(status, at, result.map(|r| r.to_string()));
            }
            Event::Reclaimed {
                admitted_at,
                running_for,
                ..
            } => {
                let secs = running_for.as_secs_f64();
                let result = serde_json::json!({
                    "error": format!(
                        "LostCompletion: no completion {secs:.0}s after dispatch; \
                         the slot was reclaimed"
                    ),
                    "error_class": "LostCompletion",
                    "running_seconds": secs,
                });
                let at = plus(*admitted_at, *running_for);
                self.row(id, at)
                    .advance("failed", at, Some(result.to_string()));
            }
            Event::Rejected { .. } | Event::Unmatched { .. } => {}
        }
    }

    fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.marks.is_empty() && self.unmarks.is_empty()
    }

    fn new_actions(&self) -> impl Iterator<Item = &'a ActionRef> + '_ {
        self.rows
            .iter()
            .filter_map(|r| r.accept.as_ref().map(|a| a.action))
    }
}

fn plus(at: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| at.checked_add_signed(d))
        .unwrap_or(at)
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

/// The INSERT's column arrays.
struct InsertColumns<'r> {
    id: Vec<i64>,
    action: Vec<i64>,
    status: Vec<&'static str>,
    created: Vec<DateTime<Utc>>,
    updated: Vec<DateTime<Utc>>,
    request_id: Vec<Option<&'r str>>,
    parameters: Vec<&'r str>,
    enqueued_at: Vec<DateTime<Utc>>,
    dispatched_at: Vec<Option<DateTime<Utc>>>,
    attempt: Vec<i32>,
    result: Vec<Option<&'r str>>,
}

impl InsertColumns<'_> {
    fn with_capacity(n: usize) -> Self {
        Self {
            id: Vec::with_capacity(n),
            action: Vec::with_capacity(n),
            status: Vec::with_capacity(n),
            created: Vec::with_capacity(n),
            updated: Vec::with_capacity(n),
            request_id: Vec::with_capacity(n),
            parameters: Vec::with_capacity(n),
            enqueued_at: Vec::with_capacity(n),
            dispatched_at: Vec::with_capacity(n),
            attempt: Vec::with_capacity(n),
            result: Vec::with_capacity(n),
        }
    }
}

/// The UPDATE's column arrays.
struct UpdateColumns<'r> {
    id: Vec<i64>,
    status: Vec<&'static str>,
    updated: Vec<DateTime<Utc>>,
    dispatched_at: Vec<Option<DateTime<Utc>>>,
    admissions: Vec<i32>,
    min_attempt: Vec<i32>,
    result: Vec<Option<&'r str>>,
    rank: Vec<i32>,
    back: Vec<bool>,
}

impl<'r> UpdateColumns<'r> {
    fn of(rows: &[&'r RowChange<'_>]) -> Self {
        Self {
            id: rows.iter().map(|r| r.id).collect(),
            status: rows.iter().map(|r| r.status).collect(),
            updated: rows.iter().map(|r| r.updated).collect(),
            dispatched_at: rows.iter().map(|r| r.dispatched_at).collect(),
            admissions: rows.iter().map(|r| r.admissions).collect(),
            min_attempt: rows.iter().map(|r| r.min_attempt()).collect(),
            result: rows.iter().map(|r| r.result.as_deref()).collect(),
            rank: rows.iter().map(|r| rank(r.status)).collect(),
            back: rows.iter().map(|r| r.back).collect(),
        }
    }
}

/// The writer task's state.
struct Writer {
    pool: PgPool,
    ids: Arc<ActionIds>,
    inner: Arc<dyn OutcomeSink>,
    options: LedgerOptions,
    sql: Statements,
    shared: Arc<Shared>,
}

/// Why a write failed.
enum WriteError {
    /// Postgres could not be reached; the same write will work later.
    Transient(DbError),
    /// Postgres refused the data; the same write will never work.
    Refused(DbError),
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
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Input>, mut stop: oneshot::Receiver<()>) {
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
                if inbox.pending.is_empty() {
                    tokio::select! {
                        biased;
                        _ = &mut stop => stopping = true,
                        input = rx.recv() => match input {
                            Some(input) => inbox.accept(input),
                            None => stopping = true,
                        },
                    }
                } else if waiting_for_more {
                    tokio::select! {
                        biased;
                        _ = &mut stop => stopping = true,
                        input = rx.recv() => match input {
                            Some(input) => inbox.accept(input),
                            None => stopping = true,
                        },
                        _ = tokio::time::sleep_until(deadline) => {}
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
    async fn write(&self, batch: Vec<Item>) {
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
        let refused = {
            let plan = Plan::build(&batch);
            self.write_retrying(&plan).await.err()
        };
        if let Some(e) = refused {
            tracing::error!(error = %e, items = batch.len(),
                "Postgres refused a ledger batch; writing it one execution at a time");
            // One execution per transaction, so that a row Postgres refuses costs only that
            // execution's ledger entry.
            for (id, items, plan) in plans_per_execution(&batch) {
                if let Err(e) = self.write_retrying(&plan).await {
                    self.shared
                        .dropped
                        .fetch_add(items as u64, Ordering::Relaxed);
                    tracing::error!(execution_id = id, error = %e,
                        "Postgres refused this execution's ledger rows; not recorded");
                }
            }
        }
        self.finish(batch);
    }
}

/// Splits a batch into one plan per execution, in the order the executions first appear;
/// each entry says how many items it covers.
fn plans_per_execution(batch: &[Item]) -> Vec<(ExecutionId, usize, Plan<'_>)> {
    let mut order: Vec<ExecutionId> = Vec::new();
    let mut members: HashMap<ExecutionId, Vec<&Item>> = HashMap::new();
    for item in batch {
        let Some(id) = item.execution_id() else {
            continue;
        };
        members
            .entry(id)
            .or_insert_with(|| {
                order.push(id);
                Vec::new()
            })
            .push(item);
    }
    order
        .iter()
        .filter_map(|id| members.remove(id).map(|m| (*id, m.len(), Plan::build(m))))
        .collect()
}

impl Writer {
    /// Retries transient failures with backoff until the write commits; returns the error if
    /// Postgres refused the data itself.
    async fn write_retrying(&self, plan: &Plan<'_>) -> Result<(), DbError> {
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
                    return Err(e);
                }
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

    /// One attempt: resolve new actions, then one transaction of at most two statements.
    async fn try_write(&self, plan: &Plan<'_>) -> Result<(), WriteError> {
        if plan.is_empty() {
            return Ok(());
        }
        // Marks first, the rows, then the marks used up: a mark goes only once its request's
        // cancel is committed (a crash in between leaves a mark whose execution exists, which
        // recovery ignores). Statements of their own, rare, and harmless to repeat if a retry
        // follows a commit.
        if !plan.marks.is_empty() {
            sqlx::query(self.sql.mark.clone())
                .bind(&plan.marks)
                .bind(i64::try_from(CANCELED_AHEAD_CAPACITY).unwrap_or(i64::MAX))
                .execute(&self.pool)
                .await
                .map_err(DbError::query(
                    "keeping cancels that came before their requests",
                ))?;
            self.count(1);
        }
        if !plan.rows.is_empty() {
            self.write_rows(plan).await?;
        }
        if !plan.unmarks.is_empty() {
            sqlx::query(self.sql.unmark.clone())
                .bind(&plan.unmarks)
                .execute(&self.pool)
                .await
                .map_err(DbError::query("forgetting cancels that were used"))?;
            self.count(1);
        }
        Ok(())
    }

    /// The rows of one flush: one statement, one implicit transaction.
    async fn write_rows(&self, plan: &Plan<'_>) -> Result<(), WriteError> {
        let resolved = self.ids.ensure(&self.pool, plan.new_actions()).await?;
        self.count(resolved);
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
        // One statement, so one round trip and an implicit transaction of its own: all of it
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
            .execute(&self.pool)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EndStatus, Payload};

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_800_000_000_000 + ms).expect("valid time")
    }

    fn event(e: Event) -> Item {
        Item::Event {
            event: e,
            created: None,
        }
    }

    #[test]
    fn a_whole_lifecycle_in_one_batch_is_one_row_in_its_final_state() {
        let a = ActionRef::parse("core.x").expect("valid");
        let items = vec![
            event(Event::Accepted {
                action: a.clone(),
                execution_id: 7,
                request_id: None,
                payload: Payload::empty_object(),
                enqueued_at: at(0),
                receipt: None,
            }),
            event(Event::Admitted {
                action: a.clone(),
                execution_id: 7,
                at: at(1),
                waited: Duration::from_millis(1),
            }),
            Item::Running { id: 7, at: at(2) },
            event(Event::Completed {
                action: a,
                execution_id: 7,
                status: EndStatus::Failed,
                result: Some(Payload::from_json(r#"{"code": 1}"#).expect("json")),
                at: at(3),
                receipt: None,
                from_waiting: false,
            }),
        ];
        let plan = Plan::build(&items);
        assert_eq!(plan.rows.len(), 1);
        let row = &plan.rows[0];
        assert!(row.accept.is_some());
        assert_eq!(row.status, "failed");
        assert_eq!(row.updated, at(3));
        assert_eq!(row.dispatched_at, Some(at(1)));
        assert_eq!(row.admissions, 1);
        assert_eq!(row.result.as_deref(), Some(r#"{"code": 1}"#));
    }

    #[test]
    fn a_confirmation_that_overtakes_its_admission_does_not_move_the_row_back() {
        let a = ActionRef::parse("core.x").expect("valid");
        let items = vec![
            Item::Running { id: 8, at: at(5) },
            event(Event::Admitted {
                action: a,
                execution_id: 8,
                at: at(4),
                waited: Duration::ZERO,
            }),
        ];
        let plan = Plan::build(&items);
        let row = &plan.rows[0];
        assert!(row.accept.is_none(), "accepted in an earlier batch");
        assert_eq!(row.status, "running");
        assert_eq!(row.updated, at(5));
        assert_eq!(row.admissions, 1);
        assert_eq!(row.min_attempt(), 1);
    }
}
