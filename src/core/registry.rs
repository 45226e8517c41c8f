//! The executor handle: the registry of action actors and the one way in for all work.
//!
//! Edges never talk to action actors directly. They call [`Executor`], which finds (or spawns)
//! the owning actor and claims execution ids in the live index, so that:
//! - an id is queued or running at most once across all actions (duplicates are answered at
//!   once and never reach an actor);
//! - a completion or cancel, which names only the execution id, finds its action;
//! - a cancel that overtakes its own submission still reaches the right actor after it;
//! - a cancel that arrives before its request (over RabbitMQ, where the two travel on
//!   different queues) is remembered, and the request is canceled when it arrives
//!   ([`super::ahead`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use ractor::{ActorId, ActorRef, ActorRuntime, ActorStatus, SpawnErr};

use super::action::{ActionActor, ActionArgs, ActionMsg, ActionOwner, ActionView, Inspect, Tenant};
use super::clock::Clock;
use super::dormant::Dormant;
use super::owner::{Owner, Permit};
use super::policy::{ActionPolicy, PolicySource, QueueSettings};
use super::ports::{Event, Ports, QueueStats};
use super::queue::{PurgeOrder, PurgedEntry, Restored};
use super::supervisor::{Supervisor, SupervisorArgs, SupervisorMsg};
use crate::model::{
    ActionRef, CancelRequest, CancelVerdict, Completion, ExecutionId, Rejection, Submission,
    UnmatchedReason, Verdict, settle,
};

// Re-exported from the lower modules that hold them, so that the paths `config` and the
// core's tests name stay.
pub use super::action::Shared;
pub use super::policy::DEFAULT_REMEMBER_ENDED;

/// Errors of the core.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("could not start an actor: {0}")]
    Spawn(#[from] SpawnErr),
    #[error("the actor for action {0} did not answer in time")]
    Timeout(ActionRef),
    #[error("the actor for action {0} has stopped")]
    Stopped(ActionRef),
}

/// Hands out execution ids for requests that came without one, always above every id seen
/// (within its block, when it has one).
#[derive(Debug)]
struct IdAllocator {
    next: AtomicU64,
    /// The block of ids this run owns (`[floor, ceiling)`; shared mode): ids seen outside it
    /// are other instances' and do not move `next`.
    floor: AtomicU64,
    ceiling: AtomicU64,
}

impl IdAllocator {
    fn starting_at(first: u64) -> Self {
        Self {
            next: AtomicU64::new(first.max(1)),
            floor: AtomicU64::new(0),
            ceiling: AtomicU64::new(u64::MAX),
        }
    }

    fn allocate(&self) -> ExecutionId {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    fn observe(&self, id: ExecutionId) {
        let inside = (self.floor.load(Ordering::Relaxed)..self.ceiling.load(Ordering::Relaxed))
            .contains(&id);
        if inside {
            self.next.fetch_max(id.saturating_add(1), Ordering::Relaxed);
        }
    }

    fn use_block(&self, first: u64, len: u64) {
        let first = first.max(1);
        self.floor.store(first, Ordering::Relaxed);
        self.ceiling
            .store(first.saturating_add(len), Ordering::Relaxed);
        self.next.store(first, Ordering::Relaxed);
    }
}

/// How long calls that wait for an actor's answer (stats, purge) may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The running core: a supervisor, one actor per action, and the live index.
pub struct Executor {
    shared: Arc<Shared>,
    supervisor: ActorRef<SupervisorMsg>,
    policies: Arc<dyn PolicySource>,
    /// Policies set at run time; they win over the policy source, also for an actor that is
    /// respawned later.
    overrides: DashMap<ActionRef, ActionPolicy>,
    /// Held while a policy is written to `overrides` and sent to its actor, so that the
    /// messages of two writers reach an actor in the order `overrides` saw them.
    policy_writes: std::sync::Mutex<()>,
    ids: IdAllocator,
    accepting: AtomicBool,
    /// Completions no action knew (unknown ids, or duplicates after the execution ended);
    /// per-action counters cannot hold them, since no action is known.
    unmatched_unknown: AtomicU64,
}

impl Executor {
    /// Starts the supervisor. Action actors start on first use.
    pub async fn start(
        settings: QueueSettings,
        ports: Ports,
        policies: Arc<dyn PolicySource>,
    ) -> Result<Self, CoreError> {
        Self::start_with_clock(settings, ports, policies, Clock::new()).await
    }

    pub async fn start_with_clock(
        settings: QueueSettings,
        ports: Ports,
        policies: Arc<dyn PolicySource>,
        clock: Clock,
    ) -> Result<Self, CoreError> {
        // Ids assigned here start at the current time in microseconds, so that even without a
        // ledger to ask, a restarted executor does not hand out ids it handed out before (it
        // would need to have assigned more than a million ids per second on average).
        let first_id = u64::try_from(chrono::Utc::now().timestamp_micros()).unwrap_or(1);
        let shared = Arc::new(Shared::new(clock, settings, ports));
        let (supervisor, _handle) = ractor::Actor::spawn(
            None,
            Supervisor,
            SupervisorArgs {
                shared: shared.clone(),
            },
        )
        .await?;
        Ok(Self {
            shared,
            supervisor,
            policies,
            overrides: DashMap::new(),
            policy_writes: std::sync::Mutex::new(()),
            ids: IdAllocator::starting_at(first_id),
            accepting: AtomicBool::new(true),
            unmatched_unknown: AtomicU64::new(0),
        })
    }

    pub fn clock(&self) -> &Clock {
        &self.shared.clock
    }

    pub fn settings(&self) -> QueueSettings {
        self.shared.settings()
    }

    /// Replaces the executor-wide settings (a configuration reload): every running actor gets
    /// them in its mailbox, after what is already there, and every actor started later
    /// (a retired one among them) starts with them. `remember_ended` keeps its value: the window of ended ids is sized once, at
    /// start.
    pub fn set_settings(&self, settings: QueueSettings) {
        let settings = QueueSettings {
            remember_ended: self.shared.settings().remember_ended,
            ..settings
        };
        // First the shared value, then the actors: one spawned in between reads the new value
        // in `pre_start` and is told again, which changes nothing.
        self.shared.replace_settings(settings);
        for tenant in self.shared.actors.iter() {
            if let Tenant::Awake(owner) = tenant.value() {
                let _ = owner.cast(ActionMsg::SetSettings(settings));
            }
        }
    }

    /// An id for a request that came without one.
    pub fn next_execution_id(&self) -> ExecutionId {
        self.ids.allocate()
    }

    /// Makes sure assigned ids stay above `id` (the ledger calls this at start).
    pub fn observe_execution_id(&self, id: ExecutionId) {
        self.ids.observe(id);
    }

    /// Assigns ids from `[first, first + len)` only, a block no other instance uses (shared
    /// mode); ids seen outside it no longer move the next one.
    pub fn use_id_block(&self, first: ExecutionId, len: u64) {
        self.ids.use_block(first, len);
    }

    /// Whether an execution id is queued or running right now.
    pub fn is_live(&self, id: ExecutionId) -> bool {
        self.shared.live.contains_key(&id)
    }

    /// Whether a request with this id would be a duplicate by what the executor holds in
    /// memory: it is queued or running, or it ended within the remembered window.
    pub fn is_known(&self, id: ExecutionId) -> bool {
        self.is_live(id) || self.shared.ended.contains(id)
    }

    /// Whether an id [`is_known`](Self::is_known) does not know may still have ended: it is
    /// not above the highest id the window of `remember_ended` ids evicted, nor above the
    /// highest id the ledger held at start (see [`ended_before_start`](Self::ended_before_start)).
    /// The intake asks the ledger about such ids before it submits them; any other unknown id
    /// is new.
    pub fn may_have_forgotten(&self, id: ExecutionId) -> bool {
        self.shared.ended.may_have_forgotten(id)
    }

    /// Says that executions with ids up to `max_id` may have ended before this executor
    /// started (recovery calls it with the ledger's highest id when the ledger holds ended
    /// executions), so that memory alone can no longer tell that such an id is new.
    pub fn ended_before_start(&self, max_id: ExecutionId) {
        self.shared.ended.forget_up_to(max_id);
    }

    /// Remembers ids the intake found ended in the ledger, so that another copy of their
    /// request is answered from memory.
    pub fn remember_ended(&self, ids: &[ExecutionId]) {
        self.shared.ended.remember(ids);
    }

    /// Completions that freed nothing because no action knew their id (per-action counters
    /// hold the rest, in `QueueStats::total_unmatched`).
    pub fn unmatched_unknown(&self) -> u64 {
        self.unmatched_unknown.load(Ordering::Relaxed)
    }

    /// Whether the executor still takes submissions (false once it is shutting down).
    pub fn is_accepting(&self) -> bool {
        self.accepting.load(Ordering::Acquire)
    }

    /// Number of executions queued or running over all actions.
    pub fn live_count(&self) -> usize {
        self.shared.live.len()
    }

    /// Submits executions for one action, in the order given. Each receipt is answered with
    /// the verdict: at once for duplicates, through the outcome sink otherwise.
    pub fn submit(&self, action: &ActionRef, subs: Vec<Submission>) {
        if !self.accepting.load(Ordering::Acquire) {
            reject_all(subs, Rejection::ShuttingDown);
            return;
        }
        // Held until the batch is sent: the actor cannot retire meanwhile, so a completion or
        // cancel that finds a claimed id below reaches it.
        let permit = match self.permit_for(action) {
            Ok(permit) => permit,
            Err(e) => {
                tracing::error!(action = %action, error = %e, "no actor for action");
                reject_all(subs, Rejection::ShuttingDown);
                return;
            }
        };
        // Before any claim, so that an id assigned meanwhile cannot equal one in this batch.
        if let Some(max) = subs.iter().map(|s| s.execution_id).max() {
            self.ids.observe(max);
        }
        let mut batch = Vec::with_capacity(subs.len());
        let mut canceled: Vec<CancelRequest> = Vec::new();
        let mut duplicates = Vec::new();
        for sub in subs {
            if self.shared.ended.contains(sub.execution_id) {
                let execution_id = sub.execution_id;
                settle(sub.receipt, Verdict::Duplicate { execution_id });
                continue;
            }
            match self.shared.live.entry(sub.execution_id) {
                // Answered below, once the shard lock is released: answering looks the id up
                // again (`handled_so_far`).
                Entry::Occupied(_) => duplicates.push(sub),
                Entry::Vacant(slot) => {
                    slot.insert(permit.owner().clone());
                    // Taken after the claim: see `cancel_or_remember`.
                    if self.shared.canceled_ahead.take(sub.execution_id) {
                        canceled.push(CancelRequest {
                            execution_id: sub.execution_id,
                            receipt: None,
                        });
                    }
                    batch.push(sub);
                }
            }
        }
        for sub in duplicates {
            let execution_id = sub.execution_id;
            settle(sub.receipt, Verdict::Duplicate { execution_id });
        }
        if batch.is_empty() {
            return;
        }
        // Cast before the batch, from this same caller, so the actor has them first and
        // removes those executions before it could admit them.
        let taken: Vec<ExecutionId> = canceled.iter().map(|r| r.execution_id).collect();
        if !canceled.is_empty() {
            // If the actor stopped, the batch below fails too and puts the marks back.
            let _ = permit.owner().cast(ActionMsg::Cancel(canceled));
        }
        // The send fails only if the actor stopped between lookup and send: during shutdown or
        // after a crash. Give the claims back and tell the edge to leave the message with the
        // broker.
        if let Err(ractor::MessagingErr::SendErr(ActionMsg::Submit(batch))) =
            permit.cast(ActionMsg::Submit(batch))
        {
            for sub in &batch {
                self.shared.live.remove(&sub.execution_id);
            }
            // Their requests come back from the broker; their cancels must still be waiting.
            for id in taken {
                self.shared.canceled_ahead.remember(id);
            }
            reject_all(batch, Rejection::ShuttingDown);
        }
    }

    /// Hands worker completions to the actors that own them. Completions for ids no action
    /// knows free nothing and are reported as unmatched.
    pub fn complete(&self, completions: Vec<Completion>) {
        let mut unmatched = Vec::new();
        for (actor, batch) in self.route(completions, |c| c.execution_id) {
            match actor {
                Some(actor) => {
                    if let Err(ractor::MessagingErr::SendErr(ActionMsg::Complete(batch))) =
                        actor.cast(ActionMsg::Complete(batch))
                    {
                        unmatched.extend(batch);
                    }
                }
                None => unmatched.extend(batch),
            }
        }
        if !unmatched.is_empty() {
            self.unmatched_unknown
                .fetch_add(unmatched.len() as u64, Ordering::Relaxed);
            let events = unmatched
                .into_iter()
                .map(|c| Event::Unmatched {
                    action: None,
                    execution_id: c.execution_id,
                    reason: UnmatchedReason::Unknown,
                    receipt: c.receipt,
                })
                .collect();
            self.shared.ports.sink.record(events);
        }
    }

    /// Dispatches the broker returned unrouted go back to their actors, which put them at the
    /// head of their queues again (see [`super::queue::ActionQueue::returned`]).
    pub fn returned(&self, dispatches: Vec<super::ports::Dispatch>) {
        for (actor, batch) in self.route(dispatches, |d| d.execution_id) {
            // No owner: the execution ended meanwhile (the purge reclaimed it).
            if let Some(actor) = actor {
                let _ = actor.cast(ActionMsg::Returned(batch));
            }
        }
    }

    /// A dispatch of `action` was delivered. Tells its actor only if its dispatches came
    /// back before: one lookup in an empty set otherwise.
    pub fn delivered(&self, action: &ActionRef) {
        if self.shared.no_route.contains(action)
            && let Some(tenant) = self.shared.actors.get(action)
            && let Tenant::Awake(owner) = tenant.value()
        {
            let _ = owner.cast(ActionMsg::Routed);
        }
    }

    /// Cancels waiting executions by id, as [`Executor::cancel`] does; a cancel for an id that
    /// no execution has, and none has ended with, is remembered instead
    /// ([`CancelVerdict::Remembered`]): its request, when it comes, is accepted and at once
    /// recorded as canceled. For the cancels queue, where a cancel can overtake its request.
    pub fn cancel_or_remember(&self, requests: Vec<CancelRequest>) {
        let mut known = Vec::with_capacity(requests.len());
        let mut marked = Vec::new();
        for r in requests {
            let id = r.execution_id;
            if self.shared.live.contains_key(&id) || self.shared.ended.contains(id) {
                known.push(r);
                continue;
            }
            self.shared.canceled_ahead.remember(id);
            // A submission may have claimed the id since the check above; it takes the mark
            // after claiming, so whichever of us takes it handles the cancel.
            if self.shared.live.contains_key(&id) && self.shared.canceled_ahead.take(id) {
                known.push(r);
            } else {
                // Answered once the mark is kept where a restart finds it.
                marked.push(Event::CanceledAhead {
                    execution_id: id,
                    receipt: r.receipt,
                });
            }
        }
        if !marked.is_empty() {
            self.shared.ports.sink.record(marked);
        }
        if !known.is_empty() {
            self.cancel(known);
        }
    }

    /// Marks again, at start, the ids whose cancel came before their request and was kept
    /// (oldest first).
    pub fn remember_canceled_ahead(&self, ids: &[ExecutionId]) {
        for &id in ids {
            self.shared.canceled_ahead.remember(id);
        }
    }

    /// Cancels waiting executions by id.
    pub fn cancel(&self, requests: Vec<CancelRequest>) {
        for (actor, batch) in self.route(requests, |r| r.execution_id) {
            let Some(actor) = actor else {
                for r in batch {
                    settle(r.receipt, CancelVerdict::Unknown);
                }
                continue;
            };
            if let Err(ractor::MessagingErr::SendErr(ActionMsg::Cancel(batch))) =
                actor.cast(ActionMsg::Cancel(batch))
            {
                for r in batch {
                    settle(r.receipt, CancelVerdict::Unknown);
                }
            }
        }
    }

    /// Changes an action's policy at once and keeps it for the actor's lifetime and beyond.
    pub fn set_policy(&self, action: &ActionRef, policy: ActionPolicy) -> Result<(), CoreError> {
        let _one_writer = self.policy_writes.lock().unwrap_or_else(|p| p.into_inner());
        self.set_policy_held(action, policy)
    }

    /// [`Executor::set_policy`] with `policy_writes` held by the caller.
    fn set_policy_held(&self, action: &ActionRef, policy: ActionPolicy) -> Result<(), CoreError> {
        self.overrides.insert(action.clone(), policy);
        self.permit_for(action)?
            .cast(ActionMsg::SetPolicy(policy))
            .map_err(|_| CoreError::Stopped(action.clone()))
    }

    /// Makes the actors follow the policy source again after it changed (a configuration
    /// reload): every action that has an actor and no policy set at run time gets the source's
    /// policy now, and actors started later get it anyway. With `keep_set_at_run_time` false,
    /// the actions whose policy was set at run time ([`Executor::set_policy`]) get the
    /// source's too, where it differs: for a source that already holds what was set at run
    /// time (the `action` table), under whatever keeps its writers apart.
    pub fn follow_policy_source(&self, keep_set_at_run_time: bool) {
        // A policy set meanwhile must not be overtaken by the source's in the actor's mailbox.
        let _one_writer = self.policy_writes.lock().unwrap_or_else(|p| p.into_inner());
        // A retired action's next actor starts with the source's policy anyway.
        for entry in self.shared.actors.iter() {
            let action = entry.key();
            let Tenant::Awake(owner) = entry.value() else {
                continue;
            };
            if self.overrides.contains_key(action) {
                continue;
            }
            let _ = owner.cast(ActionMsg::SetPolicy(self.policies.policy_for(action)));
        }
        if keep_set_at_run_time {
            return;
        }
        let set: Vec<(ActionRef, ActionPolicy)> = self
            .overrides
            .iter()
            .map(|e| (e.key().clone(), *e.value()))
            .collect();
        for (action, policy) in set {
            let wanted = self.policies.policy_for(&action);
            if wanted != policy
                && let Err(e) = self.set_policy_held(&action, wanted)
            {
                tracing::warn!(action = %action, error = %e, "could not apply the reloaded policy");
            }
        }
    }

    /// The policy an action has now (or would get if it started now).
    pub fn policy(&self, action: &ActionRef) -> ActionPolicy {
        self.overrides
            .get(action)
            .map(|p| *p)
            .unwrap_or_else(|| self.policies.policy_for(action))
    }

    /// Puts executions recovered after a restart back into their action's queue. Their ids
    /// are claimed here, so a redelivered request for one of them is a duplicate.
    pub fn restore(&self, action: &ActionRef, restored: Vec<Restored>) -> Result<(), CoreError> {
        let permit = self.permit_for(action)?;
        for r in &restored {
            self.ids.observe(r.execution_id);
            self.shared
                .live
                .insert(r.execution_id, permit.owner().clone());
        }
        permit
            .cast(ActionMsg::Restore(restored))
            .map_err(|_| CoreError::Stopped(action.clone()))
    }

    /// The action refs seen, with an actor or retired.
    pub fn actions(&self) -> Vec<ActionRef> {
        self.shared.actors.iter().map(|e| e.key().clone()).collect()
    }

    /// How many actions have an actor now, and how many have retired theirs (see
    /// [`super::dormant`]).
    pub fn actor_counts(&self) -> (usize, usize) {
        let mut counts = (0, 0);
        for tenant in self.shared.actors.iter() {
            match tenant.value() {
                Tenant::Awake(_) => counts.0 += 1,
                Tenant::Dormant(_) => counts.1 += 1,
            }
        }
        counts
    }

    /// Actors that retired while idle since the start.
    pub fn retirements(&self) -> u64 {
        self.shared.retirements.load(Ordering::Relaxed)
    }

    /// One action's counters, asked of its actor or read from its record; `None` for an
    /// action never seen.
    pub async fn stats(&self, action: &ActionRef) -> Result<Option<QueueStats>, CoreError> {
        let permit = match self.visit(action) {
            Visit::Unknown => return Ok(None),
            Visit::Dormant(d) => {
                return Ok(Some(d.stats(action, self.policy(action), self.clock())));
            }
            Visit::Awake(permit) => permit,
        };
        match permit.call(ActionMsg::Stats, Some(CALL_TIMEOUT)).await {
            Ok(ractor::rpc::CallResult::Success(stats)) => Ok(Some(stats)),
            Ok(_) => Err(CoreError::Timeout(action.clone())),
            Err(_) => Err(CoreError::Stopped(action.clone())),
        }
    }

    /// Resolves once the actor that owns `id` (if it is live) has handled everything already
    /// in its mailbox: the submission that claimed the id among it, whose events are then
    /// recorded. A duplicate is answered only after this and the ledger's commit (see
    /// [`super::ports::History::settled`]), even when its actor lags far behind. Gives up
    /// waiting after a minute.
    pub fn handled_so_far(&self, id: ExecutionId) -> futures::future::BoxFuture<'static, ()> {
        let owner = self.shared.live.get(&id).map(|a| a.value().clone());
        Box::pin(async move {
            // An actor that retired since had handled everything.
            if let Some(owner) = owner {
                let _ = owner
                    .call(ActionMsg::Stats, Some(Duration::from_secs(60)))
                    .await;
            }
        })
    }

    /// One action as the operations page shows it (see [`ActionView`]), asked of its actor
    /// or read from its record (nothing waits or runs then); `None` for an action never
    /// seen.
    pub async fn inspect(
        &self,
        action: &ActionRef,
        ask: Inspect,
    ) -> Result<Option<ActionView>, CoreError> {
        let permit = match self.visit(action) {
            Visit::Unknown => return Ok(None),
            Visit::Dormant(d) => {
                let clock = self.clock();
                return Ok(Some(ActionView {
                    stats: d.stats(action, self.policy(action), clock),
                    waiting: Vec::new(),
                    running: Vec::new(),
                    recent_ends: d
                        .latest_first()
                        .into_iter()
                        .map(|e| (e.execution_id, e.outcome, clock.wall(e.at)))
                        .collect(),
                }));
            }
            Visit::Awake(permit) => permit,
        };
        match permit
            .call(|reply| ActionMsg::Inspect(ask, reply), Some(CALL_TIMEOUT))
            .await
        {
            Ok(ractor::rpc::CallResult::Success(view)) => Ok(Some(view)),
            Ok(_) => Err(CoreError::Timeout(action.clone())),
            Err(_) => Err(CoreError::Stopped(action.clone())),
        }
    }

    /// Admissions, completions and queue waits over every action since the start.
    pub fn totals(&self) -> super::totals::TotalsSnapshot {
        self.shared.totals.snapshot()
    }

    /// The longest queue wait of an execution admitted since the last call (zero if none),
    /// and starts over; see [`super::totals::Totals::take_longest_wait`].
    pub fn take_longest_wait(&self) -> Duration {
        self.shared.totals.take_longest_wait()
    }

    /// Every action's counters: the retired ones' from their records, the others asked of
    /// their actors.
    pub async fn all_stats(&self) -> Vec<QueueStats> {
        let mut all = Vec::new();
        let mut asks = Vec::new();
        for action in self.actions() {
            match self.visit(&action) {
                Visit::Unknown => {}
                Visit::Dormant(d) => all.push(d.stats(&action, self.policy(&action), self.clock())),
                Visit::Awake(permit) => {
                    asks.push(permit.call(ActionMsg::Stats, Some(CALL_TIMEOUT)))
                }
            }
        }
        let answers = futures::future::join_all(asks).await;
        all.extend(answers.into_iter().filter_map(|r| match r {
            Ok(ractor::rpc::CallResult::Success(stats)) => Some(stats),
            _ => None,
        }));
        all
    }

    /// Runs a purge over every action; returns what was (or, in a dry run, would be) removed.
    pub async fn purge(&self, order: PurgeOrder) -> Vec<PurgedEntry> {
        // A retired action has nothing waiting or running to purge.
        let permits: Vec<_> = self
            .shared
            .actors
            .iter()
            .filter_map(|e| match e.value() {
                Tenant::Awake(owner) => owner.permit(),
                Tenant::Dormant(_) => None,
            })
            .collect();
        let answers = futures::future::join_all(
            permits
                .into_iter()
                .map(|p| p.call(|reply| ActionMsg::Purge(order, reply), Some(CALL_TIMEOUT))),
        )
        .await;
        let mut report: Vec<PurgedEntry> = answers
            .into_iter()
            .filter_map(|r| match r {
                Ok(ractor::rpc::CallResult::Success(entries)) => Some(entries),
                _ => None,
            })
            .flatten()
            .collect();
        report.sort_by(|a, b| {
            (a.action_ref.as_str(), a.execution_id).cmp(&(b.action_ref.as_str(), b.execution_id))
        });
        report
    }

    /// Per action, how many executions have held their slot longer than `older_than` without
    /// a completion (actions with none are left out), sorted by action. The health check
    /// calls it every interval, so it reuses what a dry-run purge of running executions
    /// already computes in each actor (a walk over the running set, at most the concurrency
    /// limit long) instead of adding a message of its own; a dry run changes nothing.
    pub async fn count_stuck(&self, older_than: Duration) -> Vec<(ActionRef, usize)> {
        let order = PurgeOrder {
            max_queued_age: None,
            max_running_age: Some(older_than),
            dry_run: true,
        };
        let mut counts: Vec<(ActionRef, usize)> = Vec::new();
        // The report is sorted by action, so equal actions are adjacent.
        for entry in self.purge(order).await {
            match counts.last_mut() {
                Some((action, n)) if *action == entry.action_ref => *n += 1,
                _ => counts.push((entry.action_ref, 1)),
            }
        }
        counts
    }

    /// Stops accepting work, lets every actor finish the messages already in its mailbox,
    /// then stops them. Executions still queued stay wherever the outcome sink put them (the
    /// ledger); in memory mode they are gone.
    pub async fn shutdown(&self, timeout: Duration) {
        self.accepting.store(false, Ordering::Release);
        self.supervisor
            .get_cell()
            .drain_children_and_wait(Some(timeout))
            .await;
        let _ = self.supervisor.stop_and_wait(None, Some(timeout)).await;
    }

    /// Admits one message for the actor of an action, starting the actor on first use, again
    /// after it retired (from its record) or after it failed.
    fn permit_for(&self, action: &ActionRef) -> Result<Permit<ActionMsg>, CoreError> {
        // Admitted under the entry's read lock: an actor retires under its write lock, so
        // the admission cannot fail here but by a failure of the actor.
        if let Some(tenant) = self.shared.actors.get(action)
            && let Tenant::Awake(owner) = tenant.value()
            && is_alive(owner.actor())
            && let Some(permit) = owner.permit()
        {
            return Ok(permit);
        }
        let owner = match self.shared.actors.entry(action.clone()) {
            Entry::Occupied(mut o) => {
                if let Tenant::Awake(owner) = o.get()
                    && is_alive(owner.actor())
                    && let Some(permit) = owner.permit()
                {
                    return Ok(permit);
                }
                let dormant = match o.get_mut() {
                    Tenant::Dormant(d) => Some(d.clone()),
                    Tenant::Awake(_) => None,
                };
                let owner = self.spawn(action, dormant)?;
                o.insert(Tenant::Awake(owner.clone()));
                owner
            }
            Entry::Vacant(v) => {
                let owner = self.spawn(action, None)?;
                v.insert(Tenant::Awake(owner.clone()));
                owner
            }
        };
        // A new actor retires only after a message was handled.
        owner
            .permit()
            .ok_or_else(|| CoreError::Stopped(action.clone()))
    }

    /// What the registry holds for an action, with a message admitted if it has an actor.
    fn visit(&self, action: &ActionRef) -> Visit {
        let Some(tenant) = self.shared.actors.get(action) else {
            return Visit::Unknown;
        };
        match tenant.value() {
            Tenant::Dormant(d) => Visit::Dormant(d.clone()),
            Tenant::Awake(owner) => owner.permit().map_or(Visit::Unknown, Visit::Awake),
        }
    }

    fn spawn(
        &self,
        action: &ActionRef,
        dormant: Option<Dormant>,
    ) -> Result<ActionOwner, CoreError> {
        // Spawned "instantly" so that it can be done under the registry's entry lock (one
        // actor per action, even when two tasks race) and messages can be sent before
        // `pre_start` has run; they wait in the mailbox.
        let (actor, _join) = ActorRuntime::spawn_linked_instant(
            None,
            ActionActor,
            ActionArgs {
                action: action.clone(),
                policy: self.policy(action),
                shared: self.shared.clone(),
                dormant,
            },
            self.supervisor.get_cell(),
        )?;
        Ok(Arc::new(Owner::new(actor)))
    }

    /// Groups items by the actor that owns their execution id; `None` collects unknown ids.
    /// Groups appear in the order of their first item, and items keep their order within a
    /// group. A batch from a worker can span many actions, so groups are found by actor id in
    /// a map rather than by scanning them, an actor ref is cloned once per group, and each
    /// group's batch is allocated once at its final size.
    fn route<T>(
        &self,
        items: Vec<T>,
        id_of: impl Fn(&T) -> ExecutionId,
    ) -> Vec<(Option<ActionOwner>, Vec<T>)> {
        let mut owners: Vec<(Option<ActionOwner>, usize)> = Vec::new();
        let mut index: foldhash::HashMap<Option<ActorId>, usize> = foldhash::HashMap::default();
        let mut slots = Vec::with_capacity(items.len());
        // Consecutive items mostly belong to the same actor.
        let mut last: Option<(Option<ActorId>, usize)> = None;
        for item in &items {
            let owner = self.shared.live.get(&id_of(item));
            let key = owner.as_ref().map(|a| a.id());
            let slot = match last {
                Some((k, slot)) if k == key => slot,
                _ => *index.entry(key).or_insert_with(|| {
                    owners.push((owner.as_ref().map(|a| a.value().clone()), 0));
                    owners.len() - 1
                }),
            };
            drop(owner);
            last = Some((key, slot));
            owners[slot].1 += 1;
            slots.push(slot);
        }
        let mut groups: Vec<(Option<ActionOwner>, Vec<T>)> = owners
            .into_iter()
            .map(|(owner, n)| (owner, Vec::with_capacity(n)))
            .collect();
        for (item, slot) in items.into_iter().zip(slots) {
            groups[slot].1.push(item);
        }
        groups
    }
}

/// What [`Executor::visit`] found.
enum Visit {
    Unknown,
    Dormant(Dormant),
    Awake(Permit<ActionMsg>),
}

fn is_alive(actor: &ActorRef<ActionMsg>) -> bool {
    matches!(
        actor.get_status(),
        ActorStatus::Unstarted
            | ActorStatus::Starting
            | ActorStatus::Running
            | ActorStatus::Upgrading
    )
}

fn reject_all(subs: Vec<Submission>, rejection: Rejection) {
    for sub in subs {
        let execution_id = sub.execution_id;
        settle(
            sub.receipt,
            Verdict::Rejected {
                execution_id,
                rejection: rejection.clone(),
            },
        );
    }
}
