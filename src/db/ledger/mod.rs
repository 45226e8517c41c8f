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
//! data-modifying CTEs when it has both) covering all its rows through `UNNEST` arrays (plus, only when new action refs appear, one
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
//!
//! Without partitions that statement is its own implicit transaction, one round trip. With
//! them (the service always takes them, `db::partitions`) the flush is one transaction that
//! first checks the partition fence; a flush the fence refuses writes nothing, and from then
//! on the ledger is fenced: it writes, settles and dispatches nothing more.
//!
//! # Parts
//!
//! - `sink`: [`LedgerSink`], what the actors and the RabbitMQ dispatcher call, and the
//!   dispatchers that hold dispatches for the commit ([`AfterCommit`], [`WhenSafe`],
//!   [`LiveOnly`]).
//! - `sent_ahead`: the per-action count of what is recorded and not yet committed, which
//!   decides whether a dispatch may leave before its admission's commit.
//! - `writer`: the task that batches what the sink hands in, commits it, retries while
//!   Postgres is unreachable and settles receipts after the commit.
//! - `plan`: what one flush writes: one row change per execution, and the SQL that writes it.
//!
//! [`ActionIds`]: super::actions::ActionIds
//! [`CANCELED_AHEAD_CAPACITY`]: crate::core::ahead::CANCELED_AHEAD_CAPACITY

mod plan;
mod sent_ahead;
mod sink;
mod writer;

pub use sent_ahead::SENT_AHEAD_PER_ACTION;
pub use sink::{AfterCommit, LedgerCounters, LedgerSink, LiveOnly, WhenSafe};
pub use writer::LedgerOptions;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};

use chrono::{DateTime, Utc};
use tokio::sync::oneshot;

use crate::core::{Dispatch, Dispatcher, Event};
use crate::model::ExecutionId;
use sent_ahead::Flights;

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
    /// Set for good once a write found that another instance took a partition this one
    /// held: nothing is written, settled or dispatched any more.
    fenced: AtomicBool,
    /// Woken when `fenced` is set.
    fenced_now: tokio::sync::Notify,
}

impl Shared {
    fn is_fenced(&self) -> bool {
        self.fenced.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Marks the ledger fenced for good; says so and wakes the waiters the first time.
    fn mark_fenced(&self) {
        if !self.fenced.swap(true, std::sync::atomic::Ordering::AcqRel) {
            tracing::error!(
                "another instance took a partition this one held: the ledger writes nothing \
                 more, and this instance stops"
            );
            metrics::gauge!("attune_partitions_owned").set(0.0);
            self.fenced_now.notify_waiters();
        }
    }
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
