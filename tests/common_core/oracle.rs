//! An oracle that replays the core's event log and checks, event by event, that it tells a
//! consistent story; the property tests feed it everything the core produced and compare its
//! books with the core's own counters.
//!
//! What it checks as events arrive (per action):
//! - an execution is accepted only when it is not live anywhere;
//! - an admission takes the head of the waiting line (FIFO = acceptance order, minus what
//!   left the line) and happens only while active < limit, so active never grows past the
//!   limit; after a lowering it can only shrink until it is below;
//! - an execution leaves the line (cancel, timeout, purge) only while waiting, completes or is
//!   reclaimed only while running, and ends at most once;
//! - a timeout removes only what waited longer than the queue timeout, and never in
//!   emergency mode;
//! - every dispatch matches an admission, in the same order.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use fifo_executor::core::ports::{Dispatch, Event, RemovalReason};
use fifo_executor::core::{Clock, QueueSettings, QueueStats, Stamp};
use fifo_executor::model::{
    ActionRef, CancelVerdict, CompletionVerdict, ExecutionId, Rejection, UnmatchedReason, Verdict,
};

/// Where an execution is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Life {
    Waiting { since: Stamp },
    Running,
    Ended(End),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Completed,
    Removed(RemovalReason),
    Reclaimed,
}

/// The oracle's books for one action.
#[derive(Debug, Default)]
pub struct Book {
    pub limit: u32,
    /// Waiting executions, head first, as the event log says.
    pub line: VecDeque<ExecutionId>,
    pub running: Vec<ExecutionId>,
    pub admitted: Vec<ExecutionId>,
    pub dispatched: Vec<ExecutionId>,
    pub accepted: u64,
    pub rejected: u64,
    pub completed: u64,
    pub canceled: u64,
    pub timed_out: u64,
    pub purged: u64,
    pub reclaimed: u64,
    pub unmatched: u64,
    pub no_route: u64,
}

pub struct Oracle {
    pub clock: Clock,
    pub settings: QueueSettings,
    pub books: HashMap<ActionRef, Book>,
    pub lives: HashMap<ExecutionId, (ActionRef, Life)>,
    /// Completions no action owned (answered by the executor itself).
    pub unowned_unmatched: u64,
    /// When each execution was accepted: a returned one waits again with its first stamp.
    pub accepted_at: HashMap<ExecutionId, Stamp>,
    /// The order in which executions were accepted: a returned one goes back in it.
    pub accept_order: HashMap<ExecutionId, u64>,
}

pub type Check = Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

impl Oracle {
    pub fn new(clock: Clock, settings: QueueSettings) -> Self {
        Self {
            clock,
            settings,
            books: HashMap::new(),
            lives: HashMap::new(),
            unowned_unmatched: 0,
            accepted_at: HashMap::new(),
            accept_order: HashMap::new(),
        }
    }

    pub fn book(&mut self, action: &ActionRef) -> &mut Book {
        self.books.entry(action.clone()).or_default()
    }

    pub fn set_limit(&mut self, action: &ActionRef, limit: u32) {
        self.book(action).limit = limit;
    }

    pub fn life(&self, id: ExecutionId) -> Option<Life> {
        self.lives.get(&id).map(|(_, l)| *l)
    }

    pub fn is_live(&self, id: ExecutionId) -> bool {
        matches!(self.life(id), Some(Life::Waiting { .. } | Life::Running))
    }

    /// Ids in a given state, sorted, for picking one at random.
    pub fn ids_where(
        &self,
        action: Option<&ActionRef>,
        f: impl Fn(Life) -> bool,
    ) -> Vec<ExecutionId> {
        let mut ids: Vec<_> = self
            .lives
            .iter()
            .filter(|(_, (a, l))| action.is_none_or(|x| x == a) && f(*l))
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Feeds one event.
    pub fn event(&mut self, e: &Event) -> Check {
        match e {
            Event::Accepted {
                action,
                execution_id,
                enqueued_at,
                ..
            } => {
                let id = *execution_id;
                ensure!(!self.is_live(id), "{id} accepted while live");
                let since = self.clock.stamp_of(*enqueued_at);
                self.accepted_at.insert(id, since);
                let n = self.accept_order.len() as u64;
                self.accept_order.insert(id, n);
                self.lives
                    .insert(id, (action.clone(), Life::Waiting { since }));
                let b = self.book(action);
                b.accepted += 1;
                b.line.push_back(id);
            }
            Event::Rejected {
                action,
                execution_id,
                rejection,
                ..
            } => {
                let id = *execution_id;
                ensure!(!self.is_live(id), "{id} rejected but it is live");
                if let Rejection::QueueFull { max } = rejection {
                    ensure!(
                        *max == self.settings.max_queue_length,
                        "wrong max in {rejection}"
                    );
                    let b = self.book(action);
                    ensure!(
                        b.line.len() >= *max,
                        "{id} rejected as full with {} waiting",
                        b.line.len()
                    );
                }
                self.book(action).rejected += 1;
            }
            Event::Admitted {
                action,
                execution_id,
                ..
            } => {
                let id = *execution_id;
                let b = self.book(action);
                ensure!(
                    b.line.front() == Some(&id),
                    "{action}: admitted {id} but the head is {:?}",
                    b.line.front()
                );
                ensure!(
                    (b.running.len() as u32) < b.limit,
                    "{action}: admitted {id} with {} running at limit {}",
                    b.running.len(),
                    b.limit
                );
                b.line.pop_front();
                b.running.push(id);
                b.admitted.push(id);
                self.set_life(id, Life::Running);
            }
            Event::Removed {
                action,
                reason,
                execution,
                ..
            } => {
                let id = execution.execution_id;
                let Some(Life::Waiting { since }) = self.life(id) else {
                    return Err(format!(
                        "{id} removed ({reason:?}) while {:?}",
                        self.life(id)
                    ));
                };
                ensure!(
                    self.clock.stamp_of(execution.enqueued_at) == since,
                    "{id}: removed with another enqueue time than it was accepted with"
                );
                if *reason == RemovalReason::TimedOut {
                    ensure!(
                        !self.settings.emergency_mode,
                        "{id} timed out in emergency mode"
                    );
                    ensure!(
                        execution.waited > self.settings.queue_timeout,
                        "{id} timed out after only {:?}",
                        execution.waited
                    );
                }
                let b = self.book(action);
                b.line.retain(|x| *x != id);
                match reason {
                    RemovalReason::Canceled => b.canceled += 1,
                    RemovalReason::TimedOut => b.timed_out += 1,
                    RemovalReason::Purged => b.purged += 1,
                    RemovalReason::NoRoute => b.no_route += 1,
                }
                self.set_life(id, Life::Ended(End::Removed(*reason)));
            }
            Event::Completed {
                action,
                execution_id,
                ..
            } => {
                let id = *execution_id;
                self.end_running(action, id, End::Completed)?;
                self.book(action).completed += 1;
            }
            Event::Reclaimed {
                action,
                execution_id,
                ..
            } => {
                let id = *execution_id;
                self.end_running(action, id, End::Reclaimed)?;
                self.book(action).reclaimed += 1;
            }
            Event::Returned {
                action,
                execution_id,
                ..
            } => {
                let id = *execution_id;
                ensure!(
                    self.life(id) == Some(Life::Running),
                    "{id} returned while {:?}",
                    self.life(id)
                );
                // Back where acceptance order puts it.
                let order = self.accept_order.clone();
                let seq = order.get(&id).copied().unwrap_or(0);
                let b = self.book(action);
                b.running.retain(|x| *x != id);
                let at = b
                    .line
                    .iter()
                    .position(|x| order.get(x).is_none_or(|s| *s > seq))
                    .unwrap_or(b.line.len());
                b.line.insert(at, id);
                let since = self
                    .accepted_at
                    .get(&id)
                    .copied()
                    .unwrap_or(self.clock.now());
                self.set_life(id, Life::Waiting { since });
            }
            // A mark on an id not yet requested; its request, when it comes, shows as an
            // acceptance and a cancel, which are checked as any other.
            Event::CanceledAhead { .. } => {}
            Event::Unmatched {
                action,
                execution_id,
                reason,
                ..
            } => {
                let id = *execution_id;
                ensure!(
                    self.life(id) != Some(Life::Running),
                    "a completion for running {id} was unmatched"
                );
                let waiting = matches!(self.life(id), Some(Life::Waiting { .. }));
                ensure!(
                    waiting == (*reason == UnmatchedReason::NeverDispatched),
                    "{id}: unmatched as {reason:?} while {:?}",
                    self.life(id)
                );
                match action {
                    Some(a) => self.book(a).unmatched += 1,
                    None => self.unowned_unmatched += 1,
                }
            }
        }
        Ok(())
    }

    /// Checks that the dispatches seen so far are exactly the admissions, per action, in order.
    pub fn dispatches(&mut self, all: &[Dispatch]) -> Check {
        for b in self.books.values_mut() {
            b.dispatched.clear();
        }
        for d in all {
            self.book(&d.action).dispatched.push(d.execution_id);
        }
        for (a, b) in &self.books {
            ensure!(
                b.dispatched == b.admitted,
                "{a}: dispatched {:?} but admitted {:?}",
                b.dispatched,
                b.admitted
            );
        }
        Ok(())
    }

    /// Compares the oracle's books with the core's counters for one action.
    pub fn agrees_with(&self, s: &QueueStats) -> Check {
        let empty = Book::default();
        let b = self.books.get(&s.action_ref).unwrap_or(&empty);
        let ours = (
            s.total_enqueued,
            s.total_rejected,
            s.total_completed,
            s.total_canceled,
            s.total_timed_out,
            s.total_purged,
            s.total_reclaimed,
            s.total_unmatched,
            s.queue_length,
            s.active_count,
        );
        let log = (
            b.accepted,
            b.rejected,
            b.completed,
            b.canceled,
            b.timed_out,
            b.purged,
            b.reclaimed,
            b.unmatched,
            b.line.len(),
            b.running.len(),
        );
        ensure!(
            ours == log,
            "{}: counters (enq, rej, done, cancel, timeout, purge, reclaim, unmatched, waiting, running) {ours:?} but the log says {log:?}",
            s.action_ref
        );
        ensure!(
            s.max_concurrent == b.limit,
            "{}: limit {} vs {}",
            s.action_ref,
            s.max_concurrent,
            b.limit
        );
        Ok(())
    }

    /// Checks the steady-state rules that hold between operations: nothing waits while a
    /// slot is free (no rate limit, all enabled), and nothing waiting is older than the queue
    /// timeout plus `slack` (how late the timer may fire).
    pub fn settled(&self, slack: Duration, held_back: &[ActionRef]) -> Check {
        let now = self.clock.now();
        for (a, b) in &self.books {
            ensure!(
                b.line.is_empty() || b.running.len() as u32 >= b.limit || held_back.contains(a),
                "{a}: {} waiting while {} run at limit {}",
                b.line.len(),
                b.running.len(),
                b.limit
            );
            if self.settings.emergency_mode {
                continue;
            }
            for id in &b.line {
                if let Some(Life::Waiting { since }) = self.life(*id) {
                    ensure!(
                        now.since(since) <= self.settings.queue_timeout + slack,
                        "{a}: {id} has waited {:?}, past the timeout",
                        now.since(since)
                    );
                }
            }
        }
        Ok(())
    }

    /// Checks that every accepted execution has ended, exactly once (the event checks above
    /// already refuse a second end).
    pub fn all_ended(&self) -> Check {
        for (id, (a, life)) in &self.lives {
            ensure!(
                matches!(life, Life::Ended(_)),
                "{a}: {id} never ended: {life:?}"
            );
        }
        for (a, b) in &self.books {
            let ended = b.completed + b.canceled + b.timed_out + b.purged + b.reclaimed;
            ensure!(
                ended == b.accepted,
                "{a}: {} accepted, {ended} ended",
                b.accepted
            );
        }
        Ok(())
    }

    /// Waiting executions of an action that have not outlived the queue timeout: what is left
    /// of the line once the queue drops the stale ones, as it does before taking a submission.
    pub fn fresh_waiting(&self, action: &ActionRef) -> usize {
        let now = self.clock.now();
        self.books.get(action).map_or(0, |b| {
            b.line
                .iter()
                .filter(|id| match self.life(**id) {
                    Some(Life::Waiting { since }) => {
                        self.settings.emergency_mode
                            || now.since(since) <= self.settings.queue_timeout
                    }
                    _ => false,
                })
                .count()
        })
    }

    /// Whether a fresh submission would be admitted at once. `pending` counts the earlier
    /// submissions of the same batch: (queued, admitted at once).
    pub fn admits_at_once(&self, action: &ActionRef, pending: (usize, usize)) -> bool {
        let (running, limit) = self
            .books
            .get(action)
            .map_or((0, 1), |b| (b.running.len(), b.limit));
        self.fresh_waiting(action) + pending.0 == 0 && ((running + pending.1) as u32) < limit
    }

    /// The verdict a fresh submission should get right now: the queue first drops what has
    /// waited longer than the timeout, then admits at once if nothing waits and a slot is
    /// free, else queues unless the line is at its maximum.
    pub fn expected_verdict(
        &self,
        action: &ActionRef,
        id: ExecutionId,
        pending: (usize, usize),
    ) -> Verdict {
        let waiting = self.fresh_waiting(action) + pending.0;
        if !self.admits_at_once(action, pending) && waiting >= self.settings.max_queue_length {
            Verdict::Rejected {
                execution_id: id,
                rejection: Rejection::QueueFull {
                    max: self.settings.max_queue_length,
                },
            }
        } else {
            Verdict::Queued { execution_id: id }
        }
    }

    pub fn expected_completion(&self, id: ExecutionId) -> CompletionVerdict {
        match self.life(id) {
            Some(Life::Running) => CompletionVerdict::Freed,
            Some(Life::Waiting { .. }) => {
                CompletionVerdict::Unmatched(UnmatchedReason::NeverDispatched)
            }
            _ => CompletionVerdict::Unmatched(UnmatchedReason::Unknown),
        }
    }

    pub fn expected_cancel(&self, id: ExecutionId) -> CancelVerdict {
        match self.life(id) {
            Some(Life::Running) => CancelVerdict::Running,
            Some(Life::Waiting { .. }) => CancelVerdict::Canceled,
            _ => CancelVerdict::Unknown,
        }
    }

    fn set_life(&mut self, id: ExecutionId, life: Life) {
        if let Some(entry) = self.lives.get_mut(&id) {
            entry.1 = life;
        }
    }

    fn end_running(&mut self, action: &ActionRef, id: ExecutionId, end: End) -> Check {
        ensure!(
            self.life(id) == Some(Life::Running),
            "{id} ended ({end:?}) while {:?}",
            self.life(id)
        );
        let b = self.book(action);
        let before = b.running.len();
        b.running.retain(|x| *x != id);
        ensure!(
            b.running.len() + 1 == before,
            "{id} was not running in {action}"
        );
        self.set_life(id, Life::Ended(end));
        Ok(())
    }
}
