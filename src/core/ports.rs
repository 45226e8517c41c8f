//! The seams between the core and the edges. Action actors call these from inside their
//! handlers, so every implementation must return at once: hand the work to a channel or a task
//! and never wait on I/O here.
//!
//! Each call carries everything one handler invocation produced, in the order it happened, so
//! an implementation can batch without re-sorting.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::model::{
    ActionRef, CancelVerdict, CompletionVerdict, EndStatus, ExecutionId, Payload, Receipt,
    Rejection, Verdict,
};

/// An execution admitted to a slot, to be handed to a worker.
#[derive(Debug, Clone)]
pub struct Dispatch {
    pub action: ActionRef,
    pub execution_id: ExecutionId,
    pub request_id: Option<Box<str>>,
    pub payload: Payload,
    pub enqueued_at: DateTime<Utc>,
    pub dispatched_at: DateTime<Utc>,
    /// 1 on the first dispatch; higher when the same execution is sent again (a dispatch that
    /// was never confirmed, or a replay).
    pub attempt: u32,
    /// The execution whose completion freed the slot this one took, when it was admitted
    /// as that completion was handled (the hand-off); `None` when it took a slot that was
    /// already free, or one freed otherwise (a purge, a raised limit, a timer). Workers see it
    /// as the header `x-freed-by`, so that a hand-off's latency can be measured exactly.
    pub freed_by: Option<ExecutionId>,
}

/// Receives admitted executions, per action in FIFO order.
pub trait Dispatcher: Send + Sync + 'static {
    fn dispatch(&self, batch: Vec<Dispatch>);
}

/// A queued execution as it leaves the queue without being dispatched.
#[derive(Debug, Clone)]
pub struct Removed {
    pub execution_id: ExecutionId,
    pub request_id: Option<Box<str>>,
    pub payload: Payload,
    pub enqueued_at: DateTime<Utc>,
    /// How long it waited.
    pub waited: Duration,
}

/// Why a waiting execution left its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RemovalReason {
    /// Cancel request.
    Canceled,
    /// Waited longer than `executor.queue.queue_timeout_seconds`.
    TimedOut,
    /// Waited longer than `purge.max_queued_age_seconds` when a purge cycle ran.
    Purged,
    /// Its dispatch found no worker queue (the broker returned it) for longer than
    /// `executor.queue.no_route_timeout_seconds`.
    NoRoute,
}

/// Everything that happens to executions, in order per action. The ledger records these, the
/// dead-letter edge publishes the failures, metrics count them.
#[derive(Debug)]
pub enum Event {
    /// The execution is in the executor's hands. The sink settles the receipt (with
    /// [`Verdict::Queued`]) once the acceptance is safe: at once in memory mode, after the
    /// ledger commit otherwise. This is the one place that decides when an intake message may
    /// be acknowledged.
    Accepted {
        action: ActionRef,
        execution_id: ExecutionId,
        request_id: Option<Box<str>>,
        payload: Payload,
        enqueued_at: DateTime<Utc>,
        receipt: Option<Receipt<Verdict>>,
    },
    /// Not accepted; the sink settles the receipt with [`Verdict::Rejected`].
    Rejected {
        action: ActionRef,
        execution_id: ExecutionId,
        request_id: Option<Box<str>>,
        rejection: Rejection,
        receipt: Option<Receipt<Verdict>>,
    },
    /// Took a slot; the matching [`Dispatch`] went to the dispatcher.
    Admitted {
        action: ActionRef,
        execution_id: ExecutionId,
        at: DateTime<Utc>,
        waited: Duration,
    },
    /// Its dispatch reached no queue (the broker returned it, no worker queue being bound
    /// to its routing key): the admission is undone, the slot freed, and the execution waits
    /// again at the head of its queue. Its next dispatch carries the same attempt.
    Returned {
        action: ActionRef,
        execution_id: ExecutionId,
        at: DateTime<Utc>,
    },
    /// Left the queue without being dispatched. A cancel's receipt travels here; the sink
    /// settles it with [`CancelVerdict::Canceled`] once the cancel is recorded.
    Removed {
        action: ActionRef,
        reason: RemovalReason,
        execution: Removed,
        receipt: Option<Receipt<CancelVerdict>>,
    },
    /// Its worker reported the end; the slot is free. The sink settles the receipt with
    /// [`CompletionVerdict::Freed`] once the end is recorded.
    Completed {
        action: ActionRef,
        execution_id: ExecutionId,
        status: EndStatus,
        result: Option<Payload>,
        at: DateTime<Utc>,
        receipt: Option<Receipt<CompletionVerdict>>,
        /// It ended while it waited (restored after a crash as possibly sent, and a worker
        /// reported it): like an admission, it left the waiting line.
        from_waiting: bool,
    },
    /// Held a slot with no completion for longer than `purge.max_running_age_seconds`; the slot
    /// was taken back. A completion arriving later frees nothing.
    Reclaimed {
        action: ActionRef,
        execution_id: ExecutionId,
        request_id: Option<Box<str>>,
        admitted_at: DateTime<Utc>,
        running_for: Duration,
    },
    /// A cancel came for an id no execution has (its request still on its way): the id is
    /// marked, and its request will be canceled when it comes. The sink keeps the mark (the
    /// ledger in `cancel_ahead`, so a restart in between does not forget it) and settles the
    /// receipt with [`CancelVerdict::Remembered`]. Belongs to no action yet.
    CanceledAhead {
        execution_id: ExecutionId,
        receipt: Option<Receipt<CancelVerdict>>,
    },
    /// A completion that freed nothing. The sink settles the receipt with
    /// [`CompletionVerdict::Unmatched`].
    Unmatched {
        /// `None` when no action knows the id.
        action: Option<ActionRef>,
        execution_id: ExecutionId,
        reason: crate::model::UnmatchedReason,
        receipt: Option<Receipt<CompletionVerdict>>,
    },
}

impl Event {
    /// Answers the receipt this event carries, if any, with the verdict it stands for. A sink
    /// calls this once the event is as safe as it needs to be.
    pub fn settle(&mut self) {
        use crate::model::settle;
        match self {
            Event::Accepted {
                execution_id,
                receipt,
                ..
            } => settle(
                receipt.take(),
                Verdict::Queued {
                    execution_id: *execution_id,
                },
            ),
            Event::Rejected {
                execution_id,
                rejection,
                receipt,
                ..
            } => settle(
                receipt.take(),
                Verdict::Rejected {
                    execution_id: *execution_id,
                    rejection: rejection.clone(),
                },
            ),
            Event::Removed { receipt, .. } => settle(receipt.take(), CancelVerdict::Canceled),
            Event::CanceledAhead { receipt, .. } => {
                settle(receipt.take(), CancelVerdict::Remembered)
            }
            Event::Completed { receipt, .. } => settle(receipt.take(), CompletionVerdict::Freed),
            Event::Unmatched {
                reason, receipt, ..
            } => settle(receipt.take(), CompletionVerdict::Unmatched(*reason)),
            Event::Admitted { .. } | Event::Returned { .. } | Event::Reclaimed { .. } => {}
        }
    }

    /// The execution this event is about.
    pub fn execution_id(&self) -> ExecutionId {
        match self {
            Event::Accepted { execution_id, .. }
            | Event::Rejected { execution_id, .. }
            | Event::Admitted { execution_id, .. }
            | Event::Completed { execution_id, .. }
            | Event::Returned { execution_id, .. }
            | Event::Reclaimed { execution_id, .. }
            | Event::CanceledAhead { execution_id, .. }
            | Event::Unmatched { execution_id, .. } => *execution_id,
            Event::Removed { execution, .. } => execution.execution_id,
        }
    }
}

/// Receives [`Event`]s. It owns the receipts inside them and must settle each exactly once.
pub trait OutcomeSink: Send + Sync + 'static {
    fn record(&self, events: Vec<Event>);
}

/// The counters of one action at one moment.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct QueueStats {
    pub action_ref: ActionRef,
    pub queue_length: usize,
    pub active_count: usize,
    pub max_concurrent: u32,
    pub oldest_enqueued_at: Option<DateTime<Utc>>,
    pub total_enqueued: u64,
    pub total_completed: u64,
    pub total_canceled: u64,
    pub total_timed_out: u64,
    pub total_purged: u64,
    pub total_reclaimed: u64,
    pub total_rejected: u64,
    pub total_unmatched: u64,
    /// Executions dead-lettered because their dispatches found no worker queue.
    pub total_no_route: u64,
    /// Since when this action's dispatches find no worker queue (the broker returns them);
    /// `None` while they are delivered.
    pub no_route_since: Option<DateTime<Utc>>,
    /// When anything about this queue last changed.
    pub last_updated: DateTime<Utc>,
    /// When this queue last moved forward: an admission, a completion or a removal. A queue
    /// that only grows has `last_updated` fresh and `last_progress` old.
    pub last_progress: DateTime<Utc>,
    pub enabled: bool,
}

impl QueueStats {
    /// An action with nothing queued, running or counted, last changed `at`.
    pub fn empty(action_ref: ActionRef, at: DateTime<Utc>) -> Self {
        Self {
            action_ref,
            queue_length: 0,
            active_count: 0,
            max_concurrent: 0,
            oldest_enqueued_at: None,
            total_enqueued: 0,
            total_completed: 0,
            total_canceled: 0,
            total_timed_out: 0,
            total_purged: 0,
            total_reclaimed: 0,
            total_rejected: 0,
            total_unmatched: 0,
            total_no_route: 0,
            no_route_since: None,
            last_updated: at,
            last_progress: at,
            enabled: true,
        }
    }
}

/// Receives the counters of an action after every handler invocation that changed them.
/// Called often: keep the latest and coalesce.
pub trait StatsObserver: Send + Sync + 'static {
    fn observe(&self, stats: &QueueStats);
}

/// The record of executions the executor no longer holds in memory. The intake asks it, per
/// batch, about supplied execution ids that memory does not know, once memory can no longer
/// tell that such an id is new (see
/// [`may_have_forgotten`](crate::core::Executor::may_have_forgotten)). Awaited by
/// the intake edge before it submits; never called from an actor.
pub trait History: Send + Sync + 'static {
    /// Which of `ids` were ever accepted (whatever became of them).
    fn recorded(
        &self,
        ids: Vec<ExecutionId>,
    ) -> futures::future::BoxFuture<'static, Result<Vec<ExecutionId>, HistoryError>>;

    /// Resolves once everything recorded before the call is committed. The intake answers a
    /// duplicate only then, after [`Executor::handled_so_far`](super::Executor::handled_so_far)
    /// (so the first copy's acceptance is recorded): the first copy may still be uncommitted
    /// while the delivery that would bring it back sits on a channel that died, so
    /// acknowledging the duplicate could leave no trace of the execution anywhere if the
    /// executor died next.
    fn settled(&self) -> futures::future::BoxFuture<'static, ()>;
}

/// Why [`History::recorded`] could not answer; the caller asks again later.
#[derive(Debug, thiserror::Error)]
#[error("could not look up past executions: {0}")]
pub struct HistoryError(pub String);

/// The three ports an executor is built with.
#[derive(Clone)]
pub struct Ports {
    pub dispatcher: Arc<dyn Dispatcher>,
    pub sink: Arc<dyn OutcomeSink>,
    pub observer: Arc<dyn StatsObserver>,
}

impl std::fmt::Debug for Ports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ports")
    }
}
