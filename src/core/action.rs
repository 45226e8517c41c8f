//! The action actor: one per action ref, the only owner of that action's [`ActionQueue`].
//!
//! Every submission, completion, cancel, policy change, purge and timer for the action arrives
//! here as a message, so the queue is only ever touched by one task and the order of operations
//! is the order of the mailbox. Handlers never await: after each message the actor hands what
//! happened to the ports (which queue it for I/O elsewhere) and sets its one timer.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use ractor::concurrency::JoinHandle;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::ahead::{CANCELED_AHEAD_CAPACITY, CanceledAhead};
use super::clock::{Clock, Stamp};
use super::dormant::Dormant;
use super::ended::RecentlyEnded;
use super::owner::Owner;
use super::policy::{ActionPolicy, QueueSettings};
use super::ports::{Event, Ports};
use super::queue::{ActionQueue, Effects, PurgeOrder, PurgedEntry, Restored};
use super::recent::{EndOutcome, RecentEnds};
use super::totals::Totals;
use super::unroutable::Unroutable;
use crate::model::{
    ActionRef, CancelRequest, CancelVerdict, Completion, ExecutionId, Receipt, Submission, settle,
};

/// Messages an action actor handles. Work arrives in batches: one message per action per
/// batch the edge read, not one per execution.
#[derive(Debug)]
pub enum ActionMsg {
    Submit(Vec<Submission>),
    Complete(Vec<Completion>),
    Cancel(Vec<CancelRequest>),
    SetPolicy(ActionPolicy),
    /// New executor-wide settings (a configuration reload).
    SetSettings(QueueSettings),
    /// Executions recovered after a restart, in acceptance order.
    Restore(Vec<Restored>),
    Purge(PurgeOrder, RpcReplyPort<Vec<PurgedEntry>>),
    Stats(RpcReplyPort<super::ports::QueueStats>),
    /// What the operations page shows of one action (see [`ActionView`]).
    Inspect(Inspect, RpcReplyPort<ActionView>),
    /// The actor's timer: queue timeouts and the rate limiter's next window.
    Wake,
    /// Dispatches the broker returned unrouted (no worker queue bound).
    Returned(Vec<super::ports::Dispatch>),
    /// A dispatch of this action was delivered after some had come back unrouted.
    Routed,
}

/// How much of the queue an [`ActionMsg::Inspect`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inspect {
    /// Waiting executions from the head.
    pub waiting: usize,
    /// Running executions, the longest-running first.
    pub running: usize,
}

/// One action as the operations page shows it: its counters, the head of its queue, what
/// runs and what ended lately. Times are wall-clock times of the core's clock.
#[derive(Debug, Clone)]
pub struct ActionView {
    pub stats: super::ports::QueueStats,
    /// The first waiting executions, head first, with when each was enqueued.
    pub waiting: Vec<(ExecutionId, DateTime<Utc>)>,
    /// Executions holding a slot, the longest-running first, with when each took it.
    pub running: Vec<(ExecutionId, DateTime<Utc>)>,
    /// The last ends (at most [`super::recent::RECENT_ENDS`]), most recent first.
    pub recent_ends: Vec<(ExecutionId, EndOutcome, DateTime<Utc>)>,
}

/// The task that will send the actor its next [`ActionMsg::Wake`].
type TimerHandle = JoinHandle<Result<(), ractor::MessagingErr<ActionMsg>>>;

/// The actor itself carries nothing; all it owns is in [`ActionState`].
pub struct ActionActor;

/// What every action actor shares, with the others and with the [`Executor`] that spawns
/// them.
///
/// It lives beside the actor rather than in a file of its own because the live index names
/// the actor's messages: the registry and the supervisor import it from here, and nothing
/// here imports them.
///
/// [`Executor`]: super::Executor
pub struct Shared {
    pub clock: Clock,
    /// What every actor starts with; [`Executor::set_settings`](super::Executor::set_settings)
    /// replaces it and tells the running actors.
    settings: std::sync::RwLock<QueueSettings>,
    pub ports: Ports,
    /// Every action seen, with its actor or, while it has none, its record.
    pub actors: Roster,
    /// Every queued or running execution id, with the actor that owns it.
    pub live: LiveIndex,
    /// Ids that ended lately, so that a request redelivered after its execution finished (its
    /// acknowledgement lost with a connection) is a duplicate, not a second run.
    pub ended: RecentlyEnded,
    /// Ids whose cancel came before their request.
    pub canceled_ahead: CanceledAhead,
    /// Actions whose dispatches come back unrouted.
    pub no_route: Unroutable,
    /// Admissions, completions and queue waits over every action.
    pub totals: Totals,
    /// Actors that retired while idle, since the start (see [`super::dormant`]).
    pub retirements: std::sync::atomic::AtomicU64,
}

/// An action actor, with the count of messages admitted for it.
pub type ActionOwner = Arc<Owner<ActionMsg>>;

/// What the registry holds for one action.
#[derive(Debug)]
pub enum Tenant {
    /// Its actor.
    Awake(ActionOwner),
    /// Its record: its actor retired while idle (see [`super::dormant`]).
    Dormant(Dormant),
}

/// Every action seen, by ref.
pub type Roster = DashMap<ActionRef, Tenant>;

/// The live index: touched three times per execution (claimed on submit, looked up on
/// completion, released when it ends) by the intake, the workers' completions and every
/// action actor at once.
///
/// Hashed with foldhash rather than SipHash: ids are plain integers and this map is on the hot
/// path. Its per-process random seed keeps some resistance to producers choosing colliding
/// ids (ids may come from producers); what a successful attack costs is a slower map. More
/// shards than dashmap's default (4 × cores) because all of the above contend for them.
pub type LiveIndex = DashMap<ExecutionId, ActionOwner, foldhash::fast::RandomState>;

/// Shards of the live index; a power of two, as dashmap requires.
const LIVE_SHARDS: usize = 64;

impl Shared {
    pub fn new(clock: Clock, settings: QueueSettings, ports: Ports) -> Self {
        Self {
            clock,
            settings: std::sync::RwLock::new(settings),
            ports,
            actors: DashMap::new(),
            live: DashMap::with_hasher_and_shard_amount(
                foldhash::fast::RandomState::default(),
                LIVE_SHARDS,
            ),
            ended: RecentlyEnded::new(settings.remember_ended),
            canceled_ahead: CanceledAhead::new(CANCELED_AHEAD_CAPACITY),
            no_route: Unroutable::default(),
            totals: Totals::default(),
            retirements: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> QueueSettings {
        *self.settings.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the settings an actor starting from now on gets (the running ones are told by
    /// the executor).
    pub fn replace_settings(&self, settings: QueueSettings) {
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) = settings;
    }
}

pub struct ActionArgs {
    pub action: ActionRef,
    pub policy: ActionPolicy,
    pub shared: Arc<Shared>,
    /// What the action's last actor left when it retired; `None` for a new action.
    pub dormant: Option<Dormant>,
}

pub struct ActionState {
    queue: ActionQueue,
    shared: Arc<Shared>,
    /// Cancels that overtook their own submission in the mailbox (the id was already claimed
    /// for this actor but its `Submit` had not been handled); applied right after it is.
    early_cancels: HashMap<ExecutionId, Option<Receipt<CancelVerdict>>>,
    /// The pending timer and when it fires.
    timer: Option<(Stamp, TimerHandle)>,
    /// The last ends, for [`ActionMsg::Inspect`]; empty (and unallocated) until the first.
    ends: RecentEnds,
    /// Messages handled, its own timer's aside: once every message admitted for it
    /// ([`Owner`]) is among them, the actor may retire.
    received: u64,
    /// Not before then may the actor try to retire again: a try failed because a message was
    /// still on its way (or a sender held an admission it then did not use).
    retry_rest: Stamp,
}

/// How long after a failed try to retire the actor tries again, if nothing else happened.
const RETRY_REST: std::time::Duration = std::time::Duration::from_millis(100);

impl Actor for ActionActor {
    type Msg = ActionMsg;
    type State = ActionState;
    type Arguments = ActionArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: ActionArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let (history, ends) = match args.dormant {
            Some(d) => (Some(d.history), RecentEnds::from_kept(d.ends)),
            None => (None, RecentEnds::default()),
        };
        let queue = ActionQueue::resume(
            args.action,
            args.shared.clock.clone(),
            args.shared.settings(),
            args.policy,
            history,
        );
        Ok(ActionState {
            queue,
            shared: args.shared,
            early_cancels: HashMap::new(),
            timer: None,
            ends,
            received: 0,
            retry_rest: Stamp::default(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let now = st.shared.clock.now();
        let mut fx = expected_effects(&msg, &st.queue);
        let timer = matches!(msg, ActionMsg::Wake);
        if !timer {
            st.received += 1;
        }
        match msg {
            ActionMsg::Submit(subs) => {
                for sub in subs {
                    // Almost always empty; checking first saves hashing every id. A cancel
                    // that came first removes its execution before it can be admitted.
                    let early = if st.early_cancels.is_empty() {
                        None
                    } else {
                        st.early_cancels.remove(&sub.execution_id)
                    };
                    match early {
                        Some(receipt) => st.queue.submit_canceled(sub, receipt, now, &mut fx),
                        None => st.queue.submit(sub, now, &mut fx),
                    }
                }
            }
            ActionMsg::Complete(completions) => {
                for c in completions {
                    st.queue.complete(c, now, &mut fx);
                }
            }
            ActionMsg::Cancel(requests) => {
                for CancelRequest {
                    execution_id,
                    receipt,
                } in requests
                {
                    if !st.queue.holds(execution_id)
                        && claimed_by(&st.shared, execution_id, &myself)
                    {
                        // Two cancels may come first (one remembered ahead, one redelivered):
                        // both are answered when the submission is canceled.
                        let held = st.early_cancels.remove(&execution_id).flatten();
                        st.early_cancels
                            .insert(execution_id, Receipt::both(held, receipt));
                    } else {
                        st.queue.cancel(execution_id, receipt, now, &mut fx);
                    }
                }
            }
            ActionMsg::SetPolicy(policy) => st.queue.set_policy(policy, now, &mut fx),
            ActionMsg::SetSettings(settings) => st.queue.set_settings(settings, now, &mut fx),
            ActionMsg::Restore(restored) => st.queue.restore(restored, now, &mut fx),
            ActionMsg::Purge(order, reply) => {
                let report = st.queue.purge(order, now, &mut fx);
                // The caller may have given up waiting; the purge happened regardless.
                let _ = reply.send(report);
            }
            ActionMsg::Stats(reply) => {
                let _ = reply.send(st.queue.stats());
            }
            ActionMsg::Inspect(ask, reply) => {
                let clock = &st.shared.clock;
                let _ = reply.send(ActionView {
                    stats: st.queue.stats(),
                    waiting: st.queue.waiting_head(ask.waiting),
                    running: st.queue.running_longest_first(ask.running),
                    recent_ends: st
                        .ends
                        .latest_first()
                        .into_iter()
                        .map(|e| (e.execution_id, e.outcome, clock.wall(e.at)))
                        .collect(),
                });
            }
            ActionMsg::Wake => {
                st.timer = None;
                st.queue.tick(now, &mut fx);
            }
            ActionMsg::Returned(dispatches) => {
                for d in dispatches {
                    st.queue.returned(d, now, &mut fx);
                }
                let unroutable = st.queue.no_route_since().is_some();
                st.shared.no_route.set(st.queue.action(), unroutable);
            }
            ActionMsg::Routed => {
                st.queue.routed(now, &mut fx);
                st.shared.no_route.set(st.queue.action(), false);
            }
        }
        flush(&myself, st, fx, now);
        if timer && rest_at(st).is_some_and(|at| at <= now) {
            if retire(&myself, st) {
                myself.stop(None);
                return Ok(());
            }
            st.retry_rest = now.plus(RETRY_REST);
        }
        arm_timer(&myself, st, now);
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Some((_, handle)) = st.timer.take() {
            handle.abort();
        }
        st.shared.no_route.set(st.queue.action(), false);
        // Cancels still waiting for a submission that never came get their answer.
        for (_, receipt) in st.early_cancels.drain() {
            settle(receipt, CancelVerdict::Unknown);
        }
        tracing::debug!(action = %st.queue.action(), actor = %myself.get_id(), "action actor stopped");
        Ok(())
    }
}

/// A buffer sized for what a message usually causes: a submission is accepted (or rejected)
/// and may be admitted at once, up to the concurrency limit; a completion frees a slot and
/// admits at most one; a cancel removes one.
fn expected_effects(msg: &ActionMsg, queue: &ActionQueue) -> Effects {
    let limit = queue.policy().concurrency_limit.get() as usize;
    match msg {
        ActionMsg::Submit(subs) => Effects::with_capacity(2 * subs.len(), subs.len().min(limit)),
        ActionMsg::Complete(done) => Effects::with_capacity(2 * done.len(), done.len()),
        ActionMsg::Cancel(requests) => Effects::with_capacity(requests.len(), 0),
        _ => Effects::default(),
    }
}

/// Whether the executor's live index says this id was claimed for this actor.
fn claimed_by(shared: &Shared, id: ExecutionId, me: &ActorRef<ActionMsg>) -> bool {
    shared
        .live
        .get(&id)
        .is_some_and(|owner| owner.id() == me.get_id())
}

/// Hands one handler's effects to the ports and releases the ids that ended; counts them in
/// the executor's totals and keeps the ends among them.
fn flush(myself: &ActorRef<ActionMsg>, st: &mut ActionState, fx: Effects, now: Stamp) {
    if fx.is_empty() {
        return;
    }
    let Effects {
        events,
        dispatches,
        changed,
    } = fx;
    let me = myself.get_id();
    let mut ended = Vec::new();
    let mut released = Vec::new();
    for event in &events {
        match event {
            // A rejected id never ran: the producer may submit it again.
            Event::Rejected { execution_id, .. } => released.push(*execution_id),
            Event::Completed { execution_id, .. } | Event::Reclaimed { execution_id, .. } => {
                ended.push(*execution_id)
            }
            Event::Removed { execution, .. } => ended.push(execution.execution_id),
            Event::Accepted { .. }
            | Event::Admitted { .. }
            | Event::Returned { .. }
            | Event::CanceledAhead { .. }
            | Event::Unmatched { .. } => {}
        }
    }
    // Remembered before the live entries go, so there is no moment in which a redelivered
    // request for one of them would look new.
    st.shared.ended.remember(&ended);
    for id in ended.iter().chain(&released) {
        st.shared.live.remove_if(id, |_, owner| owner.id() == me);
    }
    st.shared.totals.count(&events);
    st.ends.record(&events, now);
    let ports = &st.shared.ports;
    // Events first: a ledger that holds dispatches until their admissions are committed must
    // have those admissions ahead of them.
    if !events.is_empty() {
        ports.sink.record(events);
    }
    if !dispatches.is_empty() {
        ports.dispatcher.dispatch(dispatches);
    }
    if changed {
        ports.observer.observe(&st.queue.stats());
    }
}

/// When the actor may retire, if it is idle and nothing else holds it (see
/// [`super::dormant`]): `passivate_after` past the queue's last change, and not before its
/// rate limit, if any, has refilled since the last admission.
fn rest_at(st: &ActionState) -> Option<Stamp> {
    let after = st.queue.settings().passivate_after?;
    let holds_nothing =
        st.queue.is_idle() && st.early_cancels.is_empty() && st.queue.no_route_since().is_none();
    if !holds_nothing {
        return None;
    }
    let rest = st.queue.last_updated().plus(after).max(st.retry_rest);
    Some(match st.queue.policy().rate_limit {
        Some(rate) => rest.max(st.queue.last_progress().plus(rate.per)),
        None => rest,
    })
}

/// Hands the action over to its record in the registry, if every message admitted for this
/// actor has been handled; the caller then stops the actor. Under the registry's entry lock,
/// so that a sender looking the action up either admits its message before the close (and
/// the close fails) or finds the record.
fn retire(myself: &ActorRef<ActionMsg>, st: &mut ActionState) -> bool {
    let Some(mut tenant) = st.shared.actors.get_mut(st.queue.action()) else {
        return false;
    };
    let mine = matches!(&*tenant, Tenant::Awake(owner)
        if owner.id() == myself.get_id() && owner.close(st.received));
    if mine {
        let ends = std::mem::take(&mut st.ends);
        *tenant = Tenant::Dormant(Dormant::new(st.queue.history(), ends));
        st.shared
            .retirements
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    mine
}

/// Keeps exactly one timer pending for the earliest time-dependent change, or for the
/// moment the actor may retire.
fn arm_timer(myself: &ActorRef<ActionMsg>, st: &mut ActionState, now: Stamp) {
    let Some(wake) = [st.queue.next_wake(), rest_at(st)]
        .into_iter()
        .flatten()
        .min()
    else {
        return;
    };
    if let Some((at, _)) = &st.timer
        && *at <= wake
    {
        return;
    }
    if let Some((_, old)) = st.timer.take() {
        old.abort();
    }
    let handle = myself.send_after(wake.since(now), || ActionMsg::Wake);
    st.timer = Some((wake, handle));
}
