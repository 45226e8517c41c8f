//! The ledger: every execution's transitions, written to `execution` in batches, with receipts
//! settled only after the commit.
//!
//! ```text
//!   ActionActor ──record(events)──┐
//!   RabbitMQ dispatcher ──mark_running(ids)──┤ unbounded channel
//!                                 ▼
//!                           writer task ── one transaction per flush ──► Postgres
//!                                 │ after COMMIT
//!                                 ├── settle each event's receipt (acks the intake message)
//!                                 └── inner OutcomeSink (dead letters, metrics), same order
//! ```
//!
//! # Batching
//!
//! The writer flushes when `batch_max_rows` items are pending or when the oldest pending item
//! has waited `flush_interval`, whichever comes first; under load the next batch accumulates
//! while the previous one is written. A flush is one transaction of at most five statements,
//! each covering every execution of its kind in the batch through `UNNEST` arrays:
//! resolve new action refs (only when there are any, and outside the transaction, see
//! [`ActionIds`]), insert `requested`, move to `scheduled`, to `running`, to an end status.
//! The statements run in that order and every UPDATE only moves a row forward (`scheduled`
//! only from `requested`, and so on), so an execution accepted, admitted and completed within
//! one batch ends in the right state, and a `running` confirmation that overtakes its
//! `scheduled` is harmless.
//!
//! # Mapping
//!
//! | event | row |
//! | --- | --- |
//! | `Accepted` | INSERT `requested` (ON CONFLICT DO NOTHING), `enqueued_at` = acceptance time, `created` = the same made strictly increasing per action (see below) |
//! | `Admitted` | `scheduled`, `dispatched_at` = admission time, `attempt` + 1 |
//! | [`LedgerSink::mark_running`] | `running` (the broker confirmed the dispatch) |
//! | `Completed` | the worker's status and result |
//! | `Removed{Canceled}` | `canceled` |
//! | `Removed{TimedOut}`, `Removed{Purged}` | `timeout`, result `{"error": "QueueTimeout: …"}` / `{"error": "Purged: …"}` |
//! | `Reclaimed` | `failed`, result `{"error": "LostCompletion: …"}`: the executor gave up waiting; whether the work ran is unknown, and a completion arriving later frees nothing and changes nothing |
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
//! batch commits, so the RabbitMQ edge acknowledges nothing and the broker keeps every message.
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
use crate::core::ports::RemovalReason;
use crate::core::{Event, OutcomeSink};
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
}

/// What the sink hands its writer.
enum Input {
    Events(Vec<Event>),
    Running(Vec<ExecutionId>, DateTime<Utc>),
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
}

impl Item {
    fn execution_id(&self) -> ExecutionId {
        match self {
            Item::Event { event, .. } => event.execution_id(),
            Item::Running { id, .. } => *id,
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
        // The writer stops only at shutdown. Events that arrive after it are not settled, so
        // their messages stay with the broker and come back to the next executor.
        if self.tx.send(Input::Events(events)).is_err() {
            tracing::error!("ledger writer stopped; events left unsettled");
        }
    }
}

/// The statements of one flush, built once with the schema in them.
struct Statements {
    insert: SqlStr,
    scheduled: SqlStr,
    running: SqlStr,
    ended: SqlStr,
}

impl Statements {
    fn new(schema: &Schema) -> Self {
        Self {
            // ORDER BY the array position: the identity default (accept_seq) is evaluated above
            // the sort, so acceptance order within a batch is the order of the events.
            insert: schema.sql(
                "INSERT INTO {s}.execution \
                   (id, action, status, created, updated, request_id, parameters, enqueued_at) \
                 SELECT u.id, u.action, 'requested', u.created, u.enqueued_at, u.request_id, \
                        u.parameters::jsonb, u.enqueued_at \
                 FROM UNNEST($1::int8[], $2::int8[], $3::text[], $4::text[], \
                             $5::timestamptz[], $6::timestamptz[]) \
                      WITH ORDINALITY \
                      AS u(id, action, request_id, parameters, enqueued_at, created, ord) \
                 ORDER BY u.ord \
                 ON CONFLICT (id) DO NOTHING",
            ),
            scheduled: schema.sql(
                "UPDATE {s}.execution e \
                 SET status = 'scheduled', updated = u.at, dispatched_at = u.at, \
                     attempt = e.attempt + 1 \
                 FROM UNNEST($1::int8[], $2::timestamptz[]) AS u(id, at) \
                 WHERE e.id = u.id AND e.status = 'requested'",
            ),
            running: schema.sql(
                "UPDATE {s}.execution e \
                 SET status = 'running', updated = u.at, \
                     dispatched_at = COALESCE(e.dispatched_at, u.at), \
                     attempt = GREATEST(e.attempt, 1) \
                 FROM UNNEST($1::int8[], $2::timestamptz[]) AS u(id, at) \
                 WHERE e.id = u.id AND e.status IN ('requested', 'scheduled')",
            ),
            ended: schema.sql(
                "UPDATE {s}.execution e \
                 SET status = u.status, result = u.result::jsonb, updated = u.at \
                 FROM UNNEST($1::int8[], $2::text[], $3::text[], $4::timestamptz[]) \
                      AS u(id, status, result, at) \
                 WHERE e.id = u.id AND e.status IN ('requested', 'scheduled', 'running')",
            ),
        }
    }
}

/// The rows one flush writes, as column arrays.
#[derive(Default)]
struct Plan<'a> {
    insert_ids: Vec<i64>,
    insert_actions: Vec<&'a ActionRef>,
    insert_request_ids: Vec<Option<Cow<'a, str>>>,
    insert_parameters: Vec<Cow<'a, str>>,
    insert_enqueued_at: Vec<DateTime<Utc>>,
    insert_created: Vec<DateTime<Utc>>,
    scheduled_ids: Vec<i64>,
    scheduled_at: Vec<DateTime<Utc>>,
    running_ids: Vec<i64>,
    running_at: Vec<DateTime<Utc>>,
    ended_ids: Vec<i64>,
    ended_status: Vec<&'static str>,
    ended_result: Vec<Option<String>>,
    ended_at: Vec<DateTime<Utc>>,
}

impl<'a> Plan<'a> {
    /// Built before any await: events are not `Sync` (their receipts are not), so a future
    /// that held references to them could not move between threads; the plan holds only
    /// references to their plain fields.
    fn build(items: impl IntoIterator<Item = &'a Item>) -> Self {
        let mut p = Plan::default();
        for item in items {
            // Ids beyond BIGINT were counted as dropped when the batch arrived.
            let Some(id) = db_id(item.execution_id()) else {
                continue;
            };
            match item {
                Item::Running { at, .. } => {
                    p.running_ids.push(id);
                    p.running_at.push(*at);
                }
                Item::Event { event, created } => p.add_event(id, event, *created),
            }
        }
        p
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
                self.insert_ids.push(id);
                self.insert_actions.push(action);
                self.insert_request_ids
                    .push(request_id.as_deref().map(pg_text));
                self.insert_parameters.push(jsonb_text(payload.json()));
                self.insert_enqueued_at.push(*enqueued_at);
                self.insert_created.push(created.unwrap_or(*enqueued_at));
            }
            Event::Admitted { at, .. } => {
                self.scheduled_ids.push(id);
                self.scheduled_at.push(*at);
            }
            Event::Completed {
                status, result, at, ..
            } => self.end(
                id,
                status.as_str(),
                result.as_ref().map(|r| jsonb_text(r.json()).into_owned()),
                *at,
            ),
            Event::Removed {
                reason, execution, ..
            } => {
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
                };
                self.end(id, status, result.map(|r| r.to_string()), at);
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
                self.end(
                    id,
                    "failed",
                    Some(result.to_string()),
                    plus(*admitted_at, *running_for),
                );
            }
            Event::Rejected { .. } | Event::Unmatched { .. } => {}
        }
    }

    fn end(&mut self, id: i64, status: &'static str, result: Option<String>, at: DateTime<Utc>) {
        self.ended_ids.push(id);
        self.ended_status.push(status);
        self.ended_result.push(result);
        self.ended_at.push(at);
    }

    fn is_empty(&self) -> bool {
        self.insert_ids.is_empty()
            && self.scheduled_ids.is_empty()
            && self.running_ids.is_empty()
            && self.ended_ids.is_empty()
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
}

impl Default for Inbox {
    fn default() -> Self {
        Self {
            pending: VecDeque::new(),
            oldest: Instant::now(),
            received: 0,
            syncs: VecDeque::new(),
            last_created: HashMap::new(),
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
                || inbox.pending.len() >= batch_max
                || Instant::now() >= inbox.oldest + self.options.flush_interval;
            if !due {
                continue;
            }
            let n = inbox.pending.len().min(batch_max);
            let batch: Vec<Item> = inbox.pending.drain(..n).collect();
            self.write(batch).await;
            committed += n as u64;
        }
    }

    /// Writes one batch, retrying while Postgres is unreachable, then settles and forwards it.
    async fn write(&self, batch: Vec<Item>) {
        let unstorable = batch
            .iter()
            .filter(|i| i.execution_id() > MAX_STORABLE_EXECUTION_ID)
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
        let id = item.execution_id();
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

    /// One attempt: resolve new actions, then one transaction.
    async fn try_write(&self, plan: &Plan<'_>) -> Result<(), WriteError> {
        if plan.is_empty() {
            return Ok(());
        }
        let resolved = self
            .ids
            .ensure(&self.pool, plan.insert_actions.iter().copied())
            .await?;
        self.count(resolved);
        let mut action_ids = Vec::with_capacity(plan.insert_actions.len());
        for action in &plan.insert_actions {
            match self.ids.get(action) {
                Some(id) => action_ids.push(id),
                None => {
                    return Err(WriteError::Refused(DbError::Query {
                        context: "looking up an action id",
                        source: sqlx::Error::RowNotFound,
                    }));
                }
            }
        }
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(DbError::query("starting a ledger transaction"))?;
        if !plan.insert_ids.is_empty() {
            let parameters: Vec<&str> = plan.insert_parameters.iter().map(|p| &**p).collect();
            let request_ids: Vec<Option<&str>> = plan
                .insert_request_ids
                .iter()
                .map(|r| r.as_deref())
                .collect();
            sqlx::query(self.sql.insert.clone())
                .bind(&plan.insert_ids)
                .bind(&action_ids)
                .bind(&request_ids)
                .bind(&parameters)
                .bind(&plan.insert_enqueued_at)
                .bind(&plan.insert_created)
                .execute(&mut *tx)
                .await
                .map_err(DbError::query("recording accepted executions"))?;
            self.count(1);
        }
        if !plan.scheduled_ids.is_empty() {
            sqlx::query(self.sql.scheduled.clone())
                .bind(&plan.scheduled_ids)
                .bind(&plan.scheduled_at)
                .execute(&mut *tx)
                .await
                .map_err(DbError::query("recording admitted executions"))?;
            self.count(1);
        }
        if !plan.running_ids.is_empty() {
            sqlx::query(self.sql.running.clone())
                .bind(&plan.running_ids)
                .bind(&plan.running_at)
                .execute(&mut *tx)
                .await
                .map_err(DbError::query("recording running executions"))?;
            self.count(1);
        }
        if !plan.ended_ids.is_empty() {
            sqlx::query(self.sql.ended.clone())
                .bind(&plan.ended_ids)
                .bind(&plan.ended_status)
                .bind(&plan.ended_result)
                .bind(&plan.ended_at)
                .execute(&mut *tx)
                .await
                .map_err(DbError::query("recording ended executions"))?;
            self.count(1);
        }
        tx.commit()
            .await
            .map_err(DbError::query("committing a ledger transaction"))?;
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
    fn finish(&self, batch: Vec<Item>) {
        let n = batch.len();
        let mut events = Vec::with_capacity(n);
        for item in batch {
            if let Item::Event { mut event, .. } = item {
                event.settle();
                events.push(event);
            }
        }
        self.shared.pending.fetch_sub(n, Ordering::Relaxed);
        self.shared.committed.fetch_add(n as u64, Ordering::Relaxed);
        if !events.is_empty() {
            self.inner.record(events);
        }
    }
}
