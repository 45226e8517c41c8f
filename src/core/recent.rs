//! The last few ends of one action's executions, for the operations page's action detail
//! (`GET /api/v1/actions/{ref}`): which executions ended lately and how.
//!
//! Each action actor keeps one [`RecentEnds`] beside its queue. It costs nothing until the
//! action's first end (an empty `VecDeque` does not allocate), then at most
//! [`RECENT_ENDS`] entries of 24 bytes: an action that ran anything once holds about half a
//! kilobyte, an action never used holds none.

use std::collections::VecDeque;

use super::clock::Stamp;
use super::ports::{Event, RemovalReason};
use crate::model::{EndStatus, ExecutionId, Rejection};

/// Ends kept per action.
pub const RECENT_ENDS: usize = 20;

/// How an execution ended. The names are what the API shows (see [`EndOutcome::as_str`]);
/// the stage says where the execution was when it ended, in the words of a dead letter's
/// `queue_from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndOutcome {
    /// Its worker reported `succeeded`.
    Succeeded,
    /// Its worker reported `failed`.
    Failed,
    /// Its worker reported `canceled`.
    WorkerCanceled,
    /// Its worker reported `timeout`.
    WorkerTimeout,
    /// Canceled while it waited.
    Canceled,
    /// Waited longer than `executor.queue.queue_timeout_seconds` (dead-lettered).
    TimedOut,
    /// Removed by a purge while it waited (dead-lettered).
    Purged,
    /// Its dispatches found no worker queue for too long (dead-lettered).
    NoRoute,
    /// Held its slot without a completion too long; the slot was taken back (dead-lettered).
    Reclaimed,
    /// Refused at intake: the queue was full (dead-lettered).
    QueueFull,
    /// Refused at intake: the action is disabled (dead-lettered).
    ActionDisabled,
}

impl EndOutcome {
    /// `succeeded`, `failed`, `canceled`, `timeout` (the worker's status, as the ledger spells
    /// it), `canceled` (while waiting), `timed_out` (the queue timeout), `purged`,
    /// `no_route`, `reclaimed`, `rejected`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::WorkerCanceled | Self::Canceled => "canceled",
            Self::WorkerTimeout => "timeout",
            Self::TimedOut => "timed_out",
            Self::Purged => "purged",
            Self::NoRoute => "no_route",
            Self::Reclaimed => "reclaimed",
            Self::QueueFull | Self::ActionDisabled => "rejected",
        }
    }

    /// Where the execution was: `running` (it had a slot), `queued` (it waited) or
    /// `requested` (it was never accepted).
    pub fn stage(self) -> &'static str {
        match self {
            Self::Succeeded
            | Self::Failed
            | Self::WorkerCanceled
            | Self::WorkerTimeout
            | Self::Reclaimed => "running",
            Self::Canceled | Self::TimedOut | Self::Purged | Self::NoRoute => "queued",
            Self::QueueFull | Self::ActionDisabled => "requested",
        }
    }

    /// The dead letter's `error_class` for a rejection; `None` otherwise.
    pub fn error_class(self) -> Option<&'static str> {
        match self {
            Self::QueueFull => Some("QueueFull"),
            Self::ActionDisabled => Some("ActionDisabled"),
            _ => None,
        }
    }

    /// The end an event stands for, if it is one.
    pub fn of(event: &Event) -> Option<(ExecutionId, Self)> {
        let outcome = match event {
            Event::Completed {
                execution_id,
                status,
                ..
            } => (
                *execution_id,
                match status {
                    EndStatus::Succeeded => Self::Succeeded,
                    EndStatus::Failed => Self::Failed,
                    EndStatus::Canceled => Self::WorkerCanceled,
                    EndStatus::Timeout => Self::WorkerTimeout,
                },
            ),
            Event::Removed {
                reason, execution, ..
            } => (
                execution.execution_id,
                match reason {
                    RemovalReason::Canceled => Self::Canceled,
                    RemovalReason::TimedOut => Self::TimedOut,
                    RemovalReason::Purged => Self::Purged,
                    RemovalReason::NoRoute => Self::NoRoute,
                },
            ),
            Event::Reclaimed { execution_id, .. } => (*execution_id, Self::Reclaimed),
            Event::Rejected {
                execution_id,
                rejection,
                ..
            } => (
                *execution_id,
                match rejection {
                    Rejection::QueueFull { .. } => Self::QueueFull,
                    Rejection::ActionDisabled => Self::ActionDisabled,
                    // Left with the broker, not ended: it comes back after the restart.
                    Rejection::ShuttingDown => return None,
                },
            ),
            Event::Accepted { .. }
            | Event::Admitted { .. }
            | Event::Returned { .. }
            | Event::CanceledAhead { .. }
            | Event::Unmatched { .. } => return None,
        };
        Some(outcome)
    }
}

/// One end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct End {
    pub execution_id: ExecutionId,
    pub at: Stamp,
    pub outcome: EndOutcome,
}

/// The last [`RECENT_ENDS`] ends of one action, oldest first.
#[derive(Debug, Default)]
pub struct RecentEnds(VecDeque<End>);

impl RecentEnds {
    /// Keeps the ends among `events` (which happened at `at`), dropping the oldest beyond
    /// [`RECENT_ENDS`].
    pub fn record(&mut self, events: &[Event], at: Stamp) {
        for event in events {
            let Some((execution_id, outcome)) = EndOutcome::of(event) else {
                continue;
            };
            if self.0.capacity() == 0 {
                // Once, at the action's first end: exactly the room it will ever need.
                self.0.reserve_exact(RECENT_ENDS);
            }
            if self.0.len() == RECENT_ENDS {
                self.0.pop_front();
            }
            self.0.push_back(End {
                execution_id,
                at,
                outcome,
            });
        }
    }

    /// The ends kept, most recent first.
    pub fn latest_first(&self) -> Vec<End> {
        self.0.iter().rev().copied().collect()
    }

    /// The ends kept, oldest first, in exactly the room they take: what an action keeps
    /// while it has no actor.
    pub fn into_kept(self) -> Box<[End]> {
        Vec::from(self.0).into_boxed_slice()
    }

    /// Ends kept by [`RecentEnds::into_kept`], with the room to record more again.
    pub fn from_kept(kept: Box<[End]>) -> Self {
        let mut ends = VecDeque::from(kept.into_vec());
        if !ends.is_empty() {
            ends.reserve_exact(RECENT_ENDS.saturating_sub(ends.len()));
        }
        Self(ends)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ActionRef;

    fn completed(id: ExecutionId, status: EndStatus) -> Event {
        Event::Completed {
            action: ActionRef::parse("a").expect("ref"),
            execution_id: id,
            status,
            result: None,
            at: chrono::Utc::now(),
            receipt: None,
            from_waiting: false,
        }
    }

    #[test]
    fn nothing_is_allocated_before_the_first_end() {
        let mut ends = RecentEnds::default();
        assert_eq!(ends.0.capacity(), 0);
        ends.record(
            &[Event::Admitted {
                action: ActionRef::parse("a").expect("ref"),
                execution_id: 1,
                at: chrono::Utc::now(),
                waited: std::time::Duration::ZERO,
            }],
            Stamp::default(),
        );
        assert_eq!(ends.0.capacity(), 0, "an admission is not an end");
        ends.record(&[completed(1, EndStatus::Succeeded)], Stamp::default());
        assert!(ends.0.capacity() >= RECENT_ENDS);
    }

    #[test]
    fn only_the_last_ends_are_kept_most_recent_first() {
        let mut ends = RecentEnds::default();
        ends.record(&[completed(1, EndStatus::Failed)], Stamp::default());
        let room = ends.0.capacity();
        let events: Vec<Event> = (2..=25)
            .map(|id| completed(id, EndStatus::Failed))
            .collect();
        ends.record(&events, Stamp::default());
        let kept: Vec<ExecutionId> = ends.latest_first().iter().map(|e| e.execution_id).collect();
        assert_eq!(kept, (6..=25).rev().collect::<Vec<_>>());
        assert_eq!(ends.0.capacity(), room, "never grown past its first size");
    }

    #[test]
    fn outcomes_name_the_worker_status_or_why_the_executor_ended_it() {
        assert_eq!(EndOutcome::WorkerTimeout.as_str(), "timeout");
        assert_eq!(EndOutcome::TimedOut.as_str(), "timed_out");
        assert_eq!(
            (
                EndOutcome::Canceled.stage(),
                EndOutcome::WorkerCanceled.stage()
            ),
            ("queued", "running")
        );
        assert_eq!(EndOutcome::ActionDisabled.as_str(), "rejected");
        assert_eq!(
            EndOutcome::ActionDisabled.error_class(),
            Some("ActionDisabled")
        );
    }
}
