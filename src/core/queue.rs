//! One action's queue as a plain state machine: no actor, no I/O, no clock of its own.
//!
//! Every operation takes the current [`Stamp`] and appends what it caused to an [`Effects`]
//! buffer; the action actor owns one `ActionQueue` and flushes the buffer to the ports after
//! each message. Keeping the rules here, apart from the actor, lets the unit and property tests
//! drive them directly and deterministically.
//!
//! The rules:
//! - FIFO is the order of acceptance. An execution is admitted at once only when nothing waits
//!   and a slot (and the rate limit) allows; otherwise it waits at the tail.
//! - A completion frees exactly its own execution's slot, then the head is admitted. A
//!   completion for a waiting execution frees nothing, unless the execution was restored
//!   after a crash as possibly sent: then a worker did run it, and it ends there.
//! - Waiting executions leave the queue only by admission, cancel, timeout or purge; the rest
//!   keep their order.
//! - A dispatch the broker returns (no worker queue is bound for the action) was never a
//!   dispatch: its slot is freed and it waits again at the head, before everything accepted
//!   after it. The action admits nothing more until its head is tried again
//!   (`no_route_retry` later) or a dispatch of it is delivered; once its dispatches have come
//!   back for longer than `no_route_timeout`, what comes back is dead-lettered.

use std::cell::Cell;
use std::collections::VecDeque;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::clock::{Clock, Stamp};
use super::policy::{self, ActionPolicy, Limiter, QueueSettings};
use super::ports::{Dispatch, Event, QueueStats, RemovalReason, Removed};
use crate::model::{
    ActionRef, CancelVerdict, Completion, ExecutionId, Payload, Receipt, Rejection, Submission,
    UnmatchedReason, settle,
};

/// A waiting execution. Kept small: this is the per-execution memory cost of a long queue.
#[derive(Debug)]
struct Waiting {
    id: ExecutionId,
    request_id: Option<Box<str>>,
    payload: Payload,
    enqueued: Stamp,
    /// Dispatches that may already have gone out for it (0 for a new execution; more for one
    /// restored after a crash that may have been sent before its admission was recorded).
    sent_before: u32,
    /// Its place in acceptance order (see [`ActionQueue::next_seq`]).
    seq: u64,
}

/// An execution holding a slot.
#[derive(Debug)]
struct Slot {
    admitted: Stamp,
    /// Its place in acceptance order, should its dispatch come back.
    seq: u64,
    /// Kept so that a reclaimed execution's dead letter still names its request.
    request_id: Option<Box<str>>,
}

/// What one or more operations produced, in order.
#[derive(Debug, Default)]
pub struct Effects {
    pub events: Vec<Event>,
    pub dispatches: Vec<Dispatch>,
    /// Whether the counters changed, i.e. whether observers should hear about it.
    pub changed: bool,
}

impl Effects {
    /// An empty buffer with room for what one message is expected to cause, so that pushing
    /// events and dispatches does not reallocate (and copy) them as the buffer grows.
    pub fn with_capacity(events: usize, dispatches: usize) -> Self {
        Self {
            events: Vec::with_capacity(events),
            dispatches: Vec::with_capacity(dispatches),
            changed: false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.dispatches.is_empty() && !self.changed
    }
}

/// An execution restored after a restart, in acceptance order.
#[derive(Debug)]
pub struct Restored {
    pub execution_id: ExecutionId,
    pub request_id: Option<Box<str>>,
    pub payload: Payload,
    pub enqueued_at: Stamp,
    /// When it took its slot; `None` if it was still waiting.
    pub admitted_at: Option<Stamp>,
    /// Dispatches that may already have reached a worker (the ledger's `attempt`); a waiting
    /// one is dispatched as attempt `sent_before + 1`.
    pub sent_before: u32,
    /// Holding a slot, but its dispatch may never have reached a worker (the broker never
    /// confirmed it): sent again as attempt `sent_before + 1` by the restore itself, ahead of
    /// every execution restored as waiting, so that nothing accepted after it reaches a
    /// worker first. The caller records the raised attempt before restoring.
    pub resend: bool,
}

/// What a purge should remove, and whether only to report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PurgeOrder {
    /// Waiting longer than this is purged; `None` leaves waiting executions alone.
    pub max_queued_age: Option<Duration>,
    /// Holding a slot longer than this without a completion: the slot is reclaimed.
    pub max_running_age: Option<Duration>,
    pub dry_run: bool,
}

/// One execution a purge removed (or, in a dry run, would remove).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PurgedEntry {
    pub action_ref: ActionRef,
    pub execution_id: ExecutionId,
    /// `queued` or `running`.
    pub state: &'static str,
    pub age_seconds: f64,
    pub limit_seconds: f64,
}

/// An action whose dispatches come back from the broker unrouted.
#[derive(Debug, Clone, Copy)]
struct NoRoute {
    /// The first return since its dispatches were last delivered.
    since: Stamp,
    /// Nothing is admitted before this: the next try of the head. Cleared once it has come
    /// (the try is made then, or waits for what else holds the head back: the rate limit, a
    /// full set of slots, a disabled action).
    retry_at: Option<Stamp>,
}

/// The counters behind [`QueueStats`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counters {
    enqueued: u64,
    completed: u64,
    canceled: u64,
    timed_out: u64,
    purged: u64,
    reclaimed: u64,
    rejected: u64,
    unmatched: u64,
    no_route: u64,
}

/// What an idle queue carries into its next life: its counters and when it last changed and
/// last moved forward. With nothing waiting or running, nothing else of it is worth keeping
/// (see [`super::dormant`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct History {
    counters: Counters,
    last_updated: Stamp,
    last_progress: Stamp,
}

impl History {
    /// The counters of an action with this history and nothing waiting or running.
    pub fn idle_stats(
        &self,
        action: &ActionRef,
        policy: ActionPolicy,
        clock: &Clock,
    ) -> QueueStats {
        self.stats(action, policy, 0, 0, None, None, |s| clock.wall(s))
    }

    #[allow(clippy::too_many_arguments)]
    fn stats(
        &self,
        action: &ActionRef,
        policy: ActionPolicy,
        queue_length: usize,
        active_count: usize,
        oldest_enqueued_at: Option<DateTime<Utc>>,
        no_route_since: Option<DateTime<Utc>>,
        wall: impl Fn(Stamp) -> DateTime<Utc>,
    ) -> QueueStats {
        let c = &self.counters;
        QueueStats {
            action_ref: action.clone(),
            queue_length,
            active_count,
            max_concurrent: policy.concurrency_limit.get(),
            oldest_enqueued_at,
            total_enqueued: c.enqueued,
            total_completed: c.completed,
            total_canceled: c.canceled,
            total_timed_out: c.timed_out,
            total_purged: c.purged,
            total_reclaimed: c.reclaimed,
            total_rejected: c.rejected,
            total_unmatched: c.unmatched,
            total_no_route: c.no_route,
            no_route_since,
            last_updated: wall(self.last_updated),
            last_progress: wall(self.last_progress),
            enabled: policy.enabled,
        }
    }
}

/// One action's FIFO queue, its slots and its counters.
pub struct ActionQueue {
    action: ActionRef,
    clock: Clock,
    settings: QueueSettings,
    policy: ActionPolicy,
    limiter: Option<Limiter>,
    waiting: VecDeque<Waiting>,
    /// Keyed by id with foldhash: looked up on every admission and completion, and SipHash
    /// was a tenth of the cycle's instructions. Its random seed keeps producer-chosen ids
    /// from colliding at will.
    running: foldhash::HashMap<ExecutionId, Slot>,
    counters: Counters,
    last_updated: Stamp,
    last_progress: Stamp,
    /// When the rate limiter next allows an admission, if it is what holds the head back.
    rate_ready_at: Option<Stamp>,
    /// Set while the action's dispatches come back unrouted.
    no_route: Option<NoRoute>,
    /// The acceptance number the next execution gets: `waiting` is always in this order, so
    /// an execution whose dispatch came back goes back exactly where it was.
    next_seq: u64,
    /// The last two stamps turned into wall-clock times, most recent first. One handler
    /// converts the same few stamps (its `now`, a batch's enqueue time) again and again,
    /// alternating between two, and the calendar arithmetic behind each conversion was 6% of
    /// the cycle's instructions.
    last_wall: Cell<[(Stamp, DateTime<Utc>); 2]>,
}

impl std::fmt::Debug for ActionQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActionQueue")
            .field("action", &self.action)
            .field("waiting", &self.waiting.len())
            .field("running", &self.running.len())
            .field("policy", &self.policy)
            .finish()
    }
}

impl ActionQueue {
    pub fn new(
        action: ActionRef,
        clock: Clock,
        settings: QueueSettings,
        policy: ActionPolicy,
    ) -> Self {
        Self::resume(action, clock, settings, policy, None)
    }

    /// A queue that goes on from the history of an earlier, idle one of the same action
    /// (empty, its counters and times as they were); a new one when `history` is `None`.
    pub fn resume(
        action: ActionRef,
        clock: Clock,
        settings: QueueSettings,
        policy: ActionPolicy,
        history: Option<History>,
    ) -> Self {
        let now = clock.now();
        let clock_wall = clock.wall(now);
        let limiter = policy.rate_limit.map(|r| policy::limiter(r, &clock));
        Self {
            action,
            clock,
            settings,
            policy,
            limiter,
            waiting: VecDeque::new(),
            running: foldhash::HashMap::default(),
            counters: history.map(|h| h.counters).unwrap_or_default(),
            last_updated: history.map_or(now, |h| h.last_updated),
            last_progress: history.map_or(now, |h| h.last_progress),
            rate_ready_at: None,
            no_route: None,
            next_seq: 0,
            last_wall: Cell::new([(now, clock_wall); 2]),
        }
    }

    pub fn action(&self) -> &ActionRef {
        &self.action
    }

    pub fn policy(&self) -> ActionPolicy {
        self.policy
    }

    pub fn queue_length(&self) -> usize {
        self.waiting.len()
    }

    pub fn active_count(&self) -> usize {
        self.running.len()
    }

    /// True when nothing waits and nothing runs: the actor may be retired.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Ids waiting, head first (for tests and diagnostics).
    pub fn waiting_ids(&self) -> impl Iterator<Item = ExecutionId> + '_ {
        self.waiting.iter().map(|w| w.id)
    }

    pub fn is_running(&self, id: ExecutionId) -> bool {
        self.running.contains_key(&id)
    }

    /// The first `n` waiting executions, head first, with when each was enqueued.
    pub fn waiting_head(&self, n: usize) -> Vec<(ExecutionId, DateTime<Utc>)> {
        self.waiting
            .iter()
            .take(n)
            .map(|w| (w.id, self.wall(w.enqueued)))
            .collect()
    }

    /// Up to `n` executions holding a slot, the longest-running first, with when each took
    /// it.
    pub fn running_longest_first(&self, n: usize) -> Vec<(ExecutionId, DateTime<Utc>)> {
        let mut running: Vec<(Stamp, ExecutionId)> = self
            .running
            .iter()
            .map(|(id, slot)| (slot.admitted, *id))
            .collect();
        running.sort_unstable();
        running
            .into_iter()
            .take(n)
            .map(|(admitted, id)| (id, self.wall(admitted)))
            .collect()
    }

    /// Accepts or rejects one submission. The caller has already made sure the id is not live
    /// anywhere else.
    pub fn submit(&mut self, sub: Submission, now: Stamp, fx: &mut Effects) {
        if self.accept(sub, now, fx, true) {
            self.pump(now, fx);
        }
    }

    /// A submission whose cancel came first: accepted and, without ever being admitted,
    /// removed again as canceled (the cancel's receipt travels with the `Removed` event).
    /// Never rejected: it takes no place in the queue, and a rejection would send to the DLQ,
    /// from where a replay would run it, a request its producer canceled.
    pub fn submit_canceled(
        &mut self,
        sub: Submission,
        cancel: Option<Receipt<CancelVerdict>>,
        now: Stamp,
        fx: &mut Effects,
    ) {
        self.accept(sub, now, fx, false);
        // `accept` put it last in line; nothing was admitted since.
        if let Some(w) = self.waiting.pop_back() {
            self.counters.canceled += 1;
            self.remove_event(w, RemovalReason::Canceled, cancel, now, fx);
        }
    }

    /// Records one submission as accepted (last in line) or, when `may_reject` and the action
    /// is disabled or its queue full, rejected; admits nothing.
    fn accept(&mut self, sub: Submission, now: Stamp, fx: &mut Effects, may_reject: bool) -> bool {
        let Submission {
            execution_id,
            request_id,
            payload,
            receipt,
        } = sub;
        // What already waited too long leaves first: it must not count against the queue
        // length, even when the timer that removes it is still behind this message.
        self.expire(now, fx);
        let admits_at_once = self.waiting.is_empty() && self.has_free_slot();
        let rejection = if !may_reject {
            None
        } else if !self.policy.enabled {
            Some(Rejection::ActionDisabled)
        } else if !admits_at_once && self.waiting.len() >= self.settings.max_queue_length {
            Some(Rejection::QueueFull {
                max: self.settings.max_queue_length,
            })
        } else {
            None
        };
        if let Some(rejection) = rejection {
            self.counters.rejected += 1;
            self.touch(now, fx);
            fx.events.push(Event::Rejected {
                action: self.action.clone(),
                execution_id,
                request_id,
                rejection,
                receipt,
            });
            return false;
        }
        self.counters.enqueued += 1;
        self.touch(now, fx);
        fx.events.push(Event::Accepted {
            action: self.action.clone(),
            execution_id,
            request_id: request_id.clone(),
            payload: payload.clone(),
            enqueued_at: self.wall(now),
            receipt,
        });
        let seq = self.take_seq();
        self.waiting.push_back(Waiting {
            id: execution_id,
            request_id,
            payload,
            enqueued: now,
            sent_before: 0,
            seq,
        });
        true
    }

    /// Frees the slot of the completed execution and admits from the head.
    pub fn complete(&mut self, c: Completion, now: Stamp, fx: &mut Effects) {
        let Completion {
            execution_id,
            status,
            result,
            receipt,
        } = c;
        if self.running.remove(&execution_id).is_some() {
            self.counters.completed += 1;
            self.progress(now, fx);
            fx.events.push(Event::Completed {
                action: self.action.clone(),
                execution_id,
                status,
                result,
                at: self.wall(now),
                receipt,
                from_waiting: false,
            });
            self.pump_freed_by(now, fx, Some(execution_id));
            return;
        }
        let waiting_at = self.waiting.iter().position(|w| w.id == execution_id);
        // Restored after a crash with its attempt raised: the dead executor may have sent
        // it ahead of committing the admission, and this completion says a worker ran it.
        // It ends here; waiting for its copy to go out again would rely on the worker to
        // report once more an execution it already finished.
        if let Some(pos) = waiting_at.filter(|&p| self.waiting[p].sent_before > 0) {
            if let Some(w) = self.waiting.remove(pos) {
                self.counters.completed += 1;
                self.progress(now, fx);
                fx.events.push(Event::Completed {
                    action: self.action.clone(),
                    execution_id: w.id,
                    status,
                    result,
                    at: self.wall(now),
                    receipt,
                    from_waiting: true,
                });
            }
            return;
        }
        let reason = if waiting_at.is_some() {
            UnmatchedReason::NeverDispatched
        } else {
            UnmatchedReason::Unknown
        };
        self.counters.unmatched += 1;
        self.touch(now, fx);
        fx.events.push(Event::Unmatched {
            action: Some(self.action.clone()),
            execution_id,
            reason,
            receipt,
        });
    }

    /// Whether this queue holds the execution, waiting or running.
    pub fn holds(&self, id: ExecutionId) -> bool {
        self.running.contains_key(&id) || self.waiting.iter().any(|w| w.id == id)
    }

    /// Removes a waiting execution (its receipt then travels with the `Removed` event, so it is
    /// answered once the cancel is recorded); a running one is left to its worker. Removing a
    /// waiting execution frees no slot, so nothing is admitted here.
    pub fn cancel(
        &mut self,
        id: ExecutionId,
        receipt: Option<Receipt<CancelVerdict>>,
        now: Stamp,
        fx: &mut Effects,
    ) {
        if let Some(pos) = self.waiting.iter().position(|w| w.id == id) {
            if let Some(w) = self.waiting.remove(pos) {
                self.counters.canceled += 1;
                self.remove_event(w, RemovalReason::Canceled, receipt, now, fx);
            }
            return;
        }
        let verdict = if self.running.contains_key(&id) {
            CancelVerdict::Running
        } else {
            CancelVerdict::Unknown
        };
        settle(receipt, verdict);
    }

    /// A dispatch the broker returned unrouted: the admission is undone and the execution
    /// waits again at the head, behind the others returned before it, with the attempt it
    /// had (no worker got it). Past `no_route_timeout` without a route it is dead-lettered
    /// instead. A return for an execution no longer holding a slot (the purge reclaimed it
    /// meanwhile) changes nothing.
    pub fn returned(&mut self, d: Dispatch, now: Stamp, fx: &mut Effects) {
        let Some(slot) = self.running.remove(&d.execution_id) else {
            return;
        };
        let since = self.no_route.map_or(now, |n| n.since);
        fx.events.push(Event::Returned {
            action: self.action.clone(),
            execution_id: d.execution_id,
            at: self.wall(now),
        });
        let w = Waiting {
            id: d.execution_id,
            request_id: slot.request_id,
            payload: d.payload,
            enqueued: self.clock.stamp_of(d.enqueued_at),
            sent_before: d.attempt.saturating_sub(1),
            seq: slot.seq,
        };
        let expired = !self.settings.emergency_mode
            && self
                .settings
                .no_route_timeout
                .is_some_and(|t| now.since(since) > t);
        let retry_at = if expired {
            // The next one is tried at once: a worker queue bound now still gets it.
            self.counters.no_route += 1;
            self.remove_event(w, RemovalReason::NoRoute, None, now, fx);
            None
        } else {
            // Back where acceptance order puts it: ahead of everything accepted after it,
            // behind anything returned that was accepted before it, whatever order the
            // returns come in.
            let at = self.waiting.partition_point(|x| x.seq < w.seq);
            self.waiting.insert(at, w);
            self.touch(now, fx);
            Some(now.plus(self.settings.no_route_retry))
        };
        self.no_route = Some(NoRoute { since, retry_at });
        self.pump(now, fx);
    }

    /// A dispatch of this action was delivered: if its dispatches came back before, they
    /// have a route again and admissions go on at once.
    pub fn routed(&mut self, now: Stamp, fx: &mut Effects) {
        if self.no_route.take().is_some() {
            self.touch(now, fx);
            self.pump(now, fx);
        }
    }

    /// Since when the action's dispatches have come back unrouted, if they do.
    pub fn no_route_since(&self) -> Option<Stamp> {
        self.no_route.map(|n| n.since)
    }

    /// Applies a new policy. A higher limit admits from the head at once; a lower one preempts
    /// nothing and admits no more until active is below it.
    pub fn set_policy(&mut self, policy: ActionPolicy, now: Stamp, fx: &mut Effects) {
        if policy.rate_limit != self.policy.rate_limit {
            self.limiter = policy.rate_limit.map(|r| policy::limiter(r, &self.clock));
            self.rate_ready_at = None;
        }
        if policy != self.policy {
            self.policy = policy;
            self.touch(now, fx);
        }
        self.pump(now, fx);
    }

    /// Applies new executor-wide settings. A shorter queue timeout removes what has now waited
    /// too long at once; leaving emergency mode lets the timeouts and rate limits hold again;
    /// a longer queue admits more from the next submission on.
    pub fn set_settings(&mut self, settings: QueueSettings, now: Stamp, fx: &mut Effects) {
        self.settings = settings;
        self.pump(now, fx);
    }

    /// Handles timers: timeouts of waiting executions and the rate limiter's next window.
    pub fn tick(&mut self, now: Stamp, fx: &mut Effects) {
        self.pump(now, fx);
    }

    /// When the actor should next call [`tick`](Self::tick), if anything is time-dependent.
    pub fn next_wake(&self) -> Option<Stamp> {
        let timeout = if self.settings.emergency_mode {
            None
        } else {
            self.waiting
                .front()
                .map(|w| w.enqueued.plus(self.settings.queue_timeout).plus(TICK))
        };
        let (rate, retry) = if !self.waiting.is_empty() && self.has_free_slot() {
            (self.rate_ready_at, self.no_route.and_then(|n| n.retry_at))
        } else {
            (None, None)
        };
        [timeout, rate, retry].into_iter().flatten().min()
    }

    /// Removes executions that waited or ran too long (see [`PurgeOrder`]).
    pub fn purge(&mut self, order: PurgeOrder, now: Stamp, fx: &mut Effects) -> Vec<PurgedEntry> {
        let mut report = Vec::new();
        if let Some(max) = order
            .max_queued_age
            .filter(|_| !self.settings.emergency_mode)
        {
            // Waiting executions are in acceptance order, so the stale ones are a prefix.
            let stale = self
                .waiting
                .iter()
                .take_while(|w| now.since(w.enqueued) > max)
                .count();
            for w in self.waiting.iter().take(stale) {
                report.push(self.purged_entry(w.id, "queued", now.since(w.enqueued), max));
            }
            if !order.dry_run {
                for w in self.waiting.drain(..stale).collect::<Vec<_>>() {
                    self.counters.purged += 1;
                    self.remove_event(w, RemovalReason::Purged, None, now, fx);
                }
            }
        }
        if let Some(max) = order.max_running_age {
            let mut lost: Vec<(ExecutionId, Stamp)> = self
                .running
                .iter()
                .filter(|(_, s)| now.since(s.admitted) > max)
                .map(|(id, s)| (*id, s.admitted))
                .collect();
            lost.sort_by_key(|(id, admitted)| (*admitted, *id));
            for (id, admitted) in lost {
                report.push(self.purged_entry(id, "running", now.since(admitted), max));
                if order.dry_run {
                    continue;
                }
                if let Some(slot) = self.running.remove(&id) {
                    self.counters.reclaimed += 1;
                    self.progress(now, fx);
                    fx.events.push(Event::Reclaimed {
                        action: self.action.clone(),
                        execution_id: id,
                        request_id: slot.request_id,
                        admitted_at: self.wall(slot.admitted),
                        running_for: now.since(slot.admitted),
                    });
                }
            }
        }
        if !order.dry_run {
            self.pump(now, fx);
        }
        report
    }

    /// Puts executions recovered after a restart back in place, in the order given (acceptance
    /// order). Running ones take their slots even beyond the current limit: they are already
    /// out with workers, and the limit then holds back new admissions until they finish.
    pub fn restore(&mut self, restored: Vec<Restored>, now: Stamp, fx: &mut Effects) {
        for r in restored {
            self.counters.enqueued += 1;
            let seq = self.take_seq();
            match r.admitted_at {
                Some(admitted) => {
                    if r.resend {
                        fx.dispatches.push(Dispatch {
                            action: self.action.clone(),
                            execution_id: r.execution_id,
                            request_id: r.request_id.clone(),
                            payload: r.payload,
                            enqueued_at: self.wall(r.enqueued_at),
                            dispatched_at: self.wall(now),
                            attempt: r.sent_before.saturating_add(1),
                            freed_by: None,
                        });
                    }
                    self.running.insert(
                        r.execution_id,
                        Slot {
                            admitted,
                            seq,
                            request_id: r.request_id,
                        },
                    );
                }
                None => self.waiting.push_back(Waiting {
                    id: r.execution_id,
                    request_id: r.request_id,
                    payload: r.payload,
                    enqueued: r.enqueued_at,
                    sent_before: r.sent_before,
                    seq,
                }),
            }
        }
        self.touch(now, fx);
        self.pump(now, fx);
    }

    /// The counters now.
    pub fn stats(&self) -> QueueStats {
        self.history().stats(
            &self.action,
            self.policy,
            self.waiting.len(),
            self.running.len(),
            self.waiting.front().map(|w| self.wall(w.enqueued)),
            self.no_route.map(|n| self.wall(n.since)),
            |s| self.wall(s),
        )
    }

    /// The counters and times to carry over should the actor retire (see [`History`]).
    pub fn history(&self) -> History {
        History {
            counters: self.counters,
            last_updated: self.last_updated,
            last_progress: self.last_progress,
        }
    }

    /// When the queue last changed.
    pub fn last_updated(&self) -> Stamp {
        self.last_updated
    }

    /// When the queue last moved forward (an admission, an end).
    pub fn last_progress(&self) -> Stamp {
        self.last_progress
    }

    pub fn settings(&self) -> QueueSettings {
        self.settings
    }

    /// The wall-clock time of a stamp, remembering the last two.
    fn wall(&self, s: Stamp) -> DateTime<Utc> {
        let [recent, older] = self.last_wall.get();
        if recent.0 == s {
            return recent.1;
        }
        if older.0 == s {
            self.last_wall.set([older, recent]);
            return older.1;
        }
        let wall = self.clock.wall(s);
        self.last_wall.set([(s, wall), recent]);
        wall
    }

    fn has_free_slot(&self) -> bool {
        self.running.len() < self.policy.concurrency_limit.get() as usize
    }

    /// Times out what waited too long, then admits from the head while slots, the rate limit
    /// and the enabled flag allow.
    fn pump(&mut self, now: Stamp, fx: &mut Effects) {
        self.pump_freed_by(now, fx, None);
    }

    /// [`Self::pump`] right after the completion of `freed_by` freed a slot: the first
    /// admission takes that slot, and its dispatch says so ([`Dispatch::freed_by`]).
    fn pump_freed_by(&mut self, now: Stamp, fx: &mut Effects, mut freed_by: Option<ExecutionId>) {
        self.expire(now, fx);
        self.rate_ready_at = None;
        let mut admitted_at = None;
        // An action whose dispatches come back unrouted waits for its next try.
        let held_back = match self.no_route.as_mut() {
            Some(n) if n.retry_at.is_some_and(|at| now < at) => true,
            Some(n) => {
                n.retry_at = None;
                false
            }
            None => false,
        };
        while !held_back && self.policy.enabled && self.has_free_slot() {
            if self.waiting.is_empty() || !self.rate_allows(now) {
                break;
            }
            let Some(w) = self.waiting.pop_front() else {
                break;
            };
            let id = w.id;
            self.running.insert(
                id,
                Slot {
                    admitted: now,
                    seq: w.seq,
                    request_id: w.request_id.clone(),
                },
            );
            self.progress(now, fx);
            let waited = now.since(w.enqueued);
            let at = *admitted_at.get_or_insert_with(|| self.wall(now));
            fx.events.push(Event::Admitted {
                action: self.action.clone(),
                execution_id: id,
                at,
                waited,
            });
            fx.dispatches.push(Dispatch {
                action: self.action.clone(),
                execution_id: id,
                request_id: w.request_id,
                payload: w.payload,
                enqueued_at: self.wall(w.enqueued),
                dispatched_at: at,
                attempt: w.sent_before.saturating_add(1),
                freed_by: freed_by.take(),
            });
        }
    }

    /// Takes a token from the rate limiter if there is one; when there is none, remembers when
    /// the next one comes so the actor can set a timer.
    fn rate_allows(&mut self, now: Stamp) -> bool {
        if self.settings.emergency_mode {
            return true;
        }
        let Some(limiter) = &self.limiter else {
            return true;
        };
        match limiter.check() {
            Ok(()) => true,
            Err(not_until) => {
                // The limiter's instants are nanoseconds since the clock's origin. Rounding
                // them down to a stamp would wake the actor just before the token exists; it
                // would then find none and ask for a wake-up "now", over and over (with paused
                // time, forever).
                let ready = Stamp::at_or_after(not_until.earliest_possible().into());
                self.rate_ready_at = Some(ready.max(now));
                false
            }
        }
    }

    fn expire(&mut self, now: Stamp, fx: &mut Effects) {
        if self.settings.emergency_mode {
            return;
        }
        let timeout = self.settings.queue_timeout;
        while self
            .waiting
            .front()
            .is_some_and(|w| now.since(w.enqueued) > timeout)
        {
            if let Some(w) = self.waiting.pop_front() {
                self.counters.timed_out += 1;
                self.remove_event(w, RemovalReason::TimedOut, None, now, fx);
            }
        }
    }

    fn remove_event(
        &mut self,
        w: Waiting,
        reason: RemovalReason,
        receipt: Option<Receipt<CancelVerdict>>,
        now: Stamp,
        fx: &mut Effects,
    ) {
        self.progress(now, fx);
        fx.events.push(Event::Removed {
            action: self.action.clone(),
            reason,
            execution: Removed {
                execution_id: w.id,
                request_id: w.request_id,
                payload: w.payload,
                enqueued_at: self.wall(w.enqueued),
                waited: now.since(w.enqueued),
            },
            receipt,
        });
    }

    fn purged_entry(
        &self,
        id: ExecutionId,
        state: &'static str,
        age: Duration,
        limit: Duration,
    ) -> PurgedEntry {
        PurgedEntry {
            action_ref: self.action.clone(),
            execution_id: id,
            state,
            age_seconds: age.as_secs_f64(),
            limit_seconds: limit.as_secs_f64(),
        }
    }

    /// The next acceptance number.
    fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    fn touch(&mut self, now: Stamp, fx: &mut Effects) {
        self.last_updated = now;
        fx.changed = true;
    }

    fn progress(&mut self, now: Stamp, fx: &mut Effects) {
        self.last_progress = now;
        self.touch(now, fx);
    }
}

/// Timers fire this long after a deadline so that "waited longer than the timeout" holds
/// strictly when they do.
const TICK: Duration = Duration::from_millis(1);
