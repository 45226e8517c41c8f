//! The sent-ahead bookkeeping: per action, what is recorded and not yet committed, so that
//! [`LedgerSink::dispatch_when_safe`] can tell whether a dispatch may leave before the commit.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::core::{Dispatch, Event};
use crate::model::{ActionRef, ExecutionId};

#[cfg(doc)]
use super::LedgerSink;

/// How many dispatches of one action may be out before their admissions are committed, when
/// dispatching through [`LedgerSink::dispatch_when_safe`]. Recovery raises the `attempt` of
/// this many waiting executions at the head of each action's queue (see
/// [`recovery`](crate::db::recovery)), so it must not shrink from one version to the next.
///
/// 128 (16 until session 5): one commit window (the flush interval plus the commit) of a busy
/// action's admissions. With 16, an action dispatching a few thousand a second ran into the
/// bound every flush and its hand-offs waited for the commit: `hot` 2,712 and 3,269/s against
/// 3,364 and 3,493/s with 128, alternating (BENCHMARKS.md).
pub const SENT_AHEAD_PER_ACTION: usize = 128;

/// Per action, what has been recorded and is not yet committed: enough to tell whether a
/// dispatch may leave before the commit. One short lock per handler call and per commit.
#[derive(Debug, Default)]
pub(super) struct Flights {
    /// Set once [`LedgerSink::dispatch_when_safe`] is in use; until then nothing is tracked.
    enabled: AtomicBool,
    by_action: std::sync::Mutex<HashMap<ActionRef, Flight>>,
}

#[derive(Debug, Default)]
struct Flight {
    /// Executions whose acceptance is recorded and not yet committed: none may leave before
    /// that commit.
    unaccepted: HashSet<ExecutionId>,
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
    /// Starts the tracking; [`LedgerSink::dispatch_when_safe`] calls it before any dispatch.
    pub(super) fn enable(&self) {
        self.enabled.store(true, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ActionRef, Flight>> {
        // A panic while holding this lock leaves counters that are still consistent enough
        // to go on with (the worst is a dispatch held for one commit that need not be).
        self.by_action
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts what an actor just recorded.
    pub(super) fn recorded(&self, events: &[Event]) {
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
    pub(super) fn committed(&self, events: &[Event], released: &[ActionRef]) {
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
    pub(super) fn may_send_now(&self, batch: &[Dispatch]) -> bool {
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
