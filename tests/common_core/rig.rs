//! A test rig around one [`ActionQueue`]: it runs each operation at the clock's current time,
//! settles the receipts the way an in-memory sink would, and keeps the full event log and the
//! dispatch order for assertions.

use fifo_executor::core::ports::{Dispatch, Event, RemovalReason};
use fifo_executor::core::queue::{ActionQueue, Effects};
use fifo_executor::core::{
    ActionPolicy, Clock, PurgeOrder, PurgedEntry, QueueSettings, Restored, Stamp,
};
use fifo_executor::model::{
    ActionRef, CancelVerdict, Completion, CompletionVerdict, EndStatus, ExecutionId, Submission,
    Verdict,
};

use super::{Answer, action, sub};

pub struct QueueRig {
    pub clock: Clock,
    pub queue: ActionQueue,
    /// Every event, in the order the queue produced them.
    pub log: Vec<Event>,
    /// Every dispatch, in order.
    pub dispatched: Vec<Dispatch>,
}

impl QueueRig {
    /// A rig on a fresh clock. Call it inside a paused tokio runtime so time moves only when the
    /// test advances it.
    pub fn new(settings: QueueSettings, policy: ActionPolicy) -> Self {
        Self::named("test.action", settings, policy)
    }

    pub fn named(name: &str, settings: QueueSettings, policy: ActionPolicy) -> Self {
        Self::with_clock(name, Clock::new(), settings, policy)
    }

    /// A rig on a given clock, so several rigs (several actions) share one time line.
    pub fn with_clock(
        name: &str,
        clock: Clock,
        settings: QueueSettings,
        policy: ActionPolicy,
    ) -> Self {
        let queue = ActionQueue::new(action(name), clock.clone(), settings, policy);
        Self {
            clock,
            queue,
            log: Vec::new(),
            dispatched: Vec::new(),
        }
    }

    pub fn action(&self) -> &ActionRef {
        self.queue.action()
    }

    pub fn now(&self) -> Stamp {
        self.clock.now()
    }

    /// Runs one operation at the current time and returns the events it produced (receipts
    /// already settled).
    pub fn run(&mut self, op: impl FnOnce(&mut ActionQueue, Stamp, &mut Effects)) -> Effects {
        let now = self.clock.now();
        let mut fx = Effects::default();
        op(&mut self.queue, now, &mut fx);
        for e in &mut fx.events {
            e.settle();
        }
        self.dispatched.extend(fx.dispatches.iter().cloned());
        fx
    }

    /// Keeps an operation's events in the log and returns how many it produced.
    fn keep(&mut self, fx: Effects) -> usize {
        let n = fx.events.len();
        self.log.extend(fx.events);
        n
    }

    pub fn submit(&mut self, id: ExecutionId) -> Verdict {
        self.submit_with(sub(id))
    }

    pub fn submit_with(&mut self, mut s: Submission) -> Verdict {
        let (receipt, answer) = Answer::new();
        s.receipt = Some(receipt);
        let fx = self.run(|q, now, fx| q.submit(s, now, fx));
        self.keep(fx);
        answer.expect("a submission")
    }

    /// Submits each id and asserts it was accepted.
    pub fn submit_all(&mut self, ids: impl IntoIterator<Item = ExecutionId>) {
        for id in ids {
            let v = self.submit(id);
            assert_eq!(v, Verdict::Queued { execution_id: id }, "submitting {id}");
        }
    }

    pub fn complete(&mut self, id: ExecutionId) -> CompletionVerdict {
        let (receipt, answer) = Answer::new();
        let mut c = Completion::new(id, EndStatus::Succeeded);
        c.receipt = Some(receipt);
        let fx = self.run(|q, now, fx| q.complete(c, now, fx));
        self.keep(fx);
        answer.expect("a completion")
    }

    pub fn cancel(&mut self, id: ExecutionId) -> CancelVerdict {
        let (receipt, answer) = Answer::new();
        let fx = self.run(|q, now, fx| q.cancel(id, Some(receipt), now, fx));
        self.keep(fx);
        answer.expect("a cancel")
    }

    pub fn set_policy(&mut self, policy: ActionPolicy) {
        let fx = self.run(|q, now, fx| q.set_policy(policy, now, fx));
        self.keep(fx);
    }

    pub fn set_limit(&mut self, limit: u32) {
        let mut p = self.queue.policy();
        p.concurrency_limit = super::limit(limit);
        self.set_policy(p);
    }

    pub fn set_enabled(&mut self, enabled: bool) {
        let mut p = self.queue.policy();
        p.enabled = enabled;
        self.set_policy(p);
    }

    /// The broker returns the dispatch of `id` that went out last (no worker queue bound).
    pub fn returned(&mut self, id: ExecutionId) {
        let d = self
            .dispatched
            .iter()
            .rev()
            .find(|d| d.execution_id == id)
            .cloned()
            .expect("a dispatch of this id to return");
        let fx = self.run(|q, now, fx| q.returned(d, now, fx));
        self.keep(fx);
    }

    /// A dispatch of the action was delivered.
    pub fn routed(&mut self) {
        let fx = self.run(|q, now, fx| q.routed(now, fx));
        self.keep(fx);
    }

    pub fn tick(&mut self) {
        let fx = self.run(|q, now, fx| q.tick(now, fx));
        self.keep(fx);
    }

    /// Ticks whenever the queue's timer would have fired up to now, as the actor would.
    pub fn tick_due(&mut self) {
        let mut guard = 0;
        while let Some(wake) = self.queue.next_wake() {
            if wake > self.now() {
                break;
            }
            self.tick();
            guard += 1;
            assert!(
                guard < 10_000,
                "next_wake keeps asking for a tick that does nothing"
            );
        }
    }

    pub fn purge(&mut self, order: PurgeOrder) -> Vec<PurgedEntry> {
        let mut report = Vec::new();
        let fx = self.run(|q, now, fx| report = q.purge(order, now, fx));
        self.keep(fx);
        report
    }

    pub fn restore(&mut self, restored: Vec<Restored>) {
        let fx = self.run(|q, now, fx| q.restore(restored, now, fx));
        self.keep(fx);
    }

    /// Ids dispatched so far, in order.
    pub fn dispatched_ids(&self) -> Vec<ExecutionId> {
        self.dispatched.iter().map(|d| d.execution_id).collect()
    }

    pub fn waiting_ids(&self) -> Vec<ExecutionId> {
        self.queue.waiting_ids().collect()
    }

    /// Ids that left the queue for the given reason, in order.
    pub fn removed(&self, reason: RemovalReason) -> Vec<ExecutionId> {
        self.log
            .iter()
            .filter_map(|e| match e {
                Event::Removed {
                    reason: r,
                    execution,
                    ..
                } if *r == reason => Some(execution.execution_id),
                _ => None,
            })
            .collect()
    }

    pub fn reclaimed(&self) -> Vec<ExecutionId> {
        self.log
            .iter()
            .filter_map(|e| match e {
                Event::Reclaimed { execution_id, .. } => Some(*execution_id),
                _ => None,
            })
            .collect()
    }
}
