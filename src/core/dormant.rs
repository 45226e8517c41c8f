//! What an idle action keeps once its actor has retired.
//!
//! An action actor costs several kilobytes (ractor's mailboxes and two tasks) whether or not
//! anything waits, so 100,000 actions each seen once would hold most of a gigabyte. An actor
//! that has had nothing waiting or running for `executor.queue.passivate_after_seconds` (and
//! whose rate limit, if any, has refilled, whose dispatches are not coming back unrouted, and
//! that holds no cancel waiting for its request) retires: the registry keeps this record in
//! its place, about a hundred bytes, and the action's next message starts a new actor from
//! it.
//!
//! Kept: the counters (`total_*`), `last_updated` and `last_progress`, and the last ends the
//! operations page shows. Not kept, because an idle action has none of it or it comes back
//! by itself: waiting and running executions (there are none), the policy (the registry
//! gives a new actor the policy in force, set at run time or from the source, as it gives
//! every actor), the rate limiter (an actor retires only once its bucket is full again, the
//! state a new limiter starts in), the acceptance numbers (they only order what waits).

use super::clock::Clock;
use super::policy::ActionPolicy;
use super::ports::QueueStats;
use super::queue::History;
use super::recent::{End, RecentEnds};
use crate::model::ActionRef;

/// An idle action without an actor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dormant {
    /// Its counters and times.
    pub history: History,
    /// Its last ends, oldest first.
    pub ends: Box<[End]>,
}

impl Dormant {
    pub fn new(history: History, ends: RecentEnds) -> Self {
        Self {
            history,
            ends: ends.into_kept(),
        }
    }

    /// Its counters, as its actor would report them with `policy`.
    pub fn stats(&self, action: &ActionRef, policy: ActionPolicy, clock: &Clock) -> QueueStats {
        self.history.idle_stats(action, policy, clock)
    }

    /// Its last ends, most recent first.
    pub fn latest_first(&self) -> Vec<End> {
        self.ends.iter().rev().copied().collect()
    }
}
