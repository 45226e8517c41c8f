//! Everything the executor publishes goes through one publisher task: dispatches to workers,
//! dead letters and `reply_to` answers.
//!
//! The task owns a confirm-mode channel handed to it by the current session. It publishes in
//! the order jobs arrive (so one action's dispatches reach the broker in FIFO order), keeps up
//! to `rabbitmq.confirm_window` (default [`CONFIRM_WINDOW`]) publishes awaiting their confirm without waiting on each, and runs each
//! job's `on_confirmed` hook when the broker confirms it. When the connection drops, every
//! unconfirmed job goes back to the front of the line, in its original order, and is published
//! again on the next session's channel; a dispatch sent again carries `attempt + 1`, since the
//! first copy may have reached a worker. The raised attempt is made durable
//! ([`DispatchOutcomes::resending`]) before the copy leaves: an executor killed after sending
//! it raises the attempt again on its next start, and no two copies ever carry one attempt.
//!
//! Dispatches are published as mandatory. One that no queue takes (no worker queue is bound
//! to its routing key) comes back from the broker before its confirm; it reached no worker,
//! so it is handed back ([`DispatchOutcomes::returned`]) instead of being counted as
//! delivered. lapin hands a returned message to whichever confirm it resolves next, not
//! necessarily its own, so a return is matched to its dispatch by the execution id in its
//! body.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation};
use tokio::sync::{mpsc, watch};

use super::topology;
use super::wire::{self, DeadLetter, Reply};
use crate::core::{Dispatch, Dispatcher};
use crate::model::ExecutionId;

/// Publishes awaiting a confirm at once by default (`rabbitmq.confirm_window`). Enough to keep the broker busy (persistent messages
/// are confirmed after an fsync batch, a few ms), small enough that a reconnect re-sends little.
pub const CONFIRM_WINDOW: usize = 512;

/// Runs when the broker has confirmed a job (`true`) or the job was given up (`false`, only
/// at shutdown).
pub type OnConfirmed = Box<dyn FnOnce(bool) + Send>;

/// What becomes of dispatches once the broker has answered. Called from the publisher task:
/// implementations must return at once.
pub trait DispatchOutcomes: Send + Sync + 'static {
    /// The broker put this dispatch in a queue (the ledger marks it `running`).
    fn delivered(&self, d: &Dispatch);
    /// The broker returned this dispatch: no queue is bound to its routing key.
    fn returned(&self, d: Dispatch);
    /// Whether a dispatch whose confirm was lost with its connection is still worth sending
    /// again: not once its execution has ended (a worker got a copy and reported).
    fn still_wanted(&self, d: &Dispatch) -> bool;
    /// These dispatches go out again with their attempt raised by one: returns once that is
    /// recorded where recovery reads it (the ledger), retrying while it cannot be. The
    /// publisher sends nothing meanwhile, so nothing overtakes the copies sent again. `false`:
    /// they must not go out at all (another instance owns their partitions now).
    fn resending(&self, ids: Vec<ExecutionId>) -> futures::future::BoxFuture<'_, bool>;
}

/// Something to publish.
pub enum Outgoing {
    Dispatch(Dispatch),
    DeadLetter(DeadLetter),
    Reply {
        to: String,
        correlation_id: Option<ShortString>,
        reply: Reply,
    },
    /// A message carried to a partition's queue (`cluster.mode: shared`): a delivery taken
    /// from a shared queue, or a tick. Bound to its session: after a lost connection it is not
    /// sent again, since the delivery it carries comes back from the broker by itself.
    Forward {
        routing_key: String,
        body: Vec<u8>,
        properties: BasicProperties,
    },
}

impl Outgoing {
    fn is_session_bound(&self) -> bool {
        matches!(self, Outgoing::Forward { .. })
    }
}

struct Job {
    out: Outgoing,
    on_confirmed: Option<OnConfirmed>,
    /// A dispatch whose attempt was raised and whose new attempt is not yet recorded.
    unrecorded: bool,
}

impl Job {
    /// Marks a job that goes out again after its first copy may have been delivered.
    fn again(mut self) -> Self {
        if let Outgoing::Dispatch(d) = &mut self.out {
            d.attempt = d.attempt.saturating_add(1);
            self.unrecorded = true;
        }
        self
    }

    fn dispatch_id(&self) -> Option<ExecutionId> {
        match &self.out {
            Outgoing::Dispatch(d) => Some(d.execution_id),
            _ => None,
        }
    }
}

/// Records the raised attempts of this job and of every job waiting to go out again, in one
/// go, before the first of them is sent. Returns whether they may go out; if not, they are
/// given up (`pending` counted down) and `job` must be dropped too.
async fn record_raised(
    job: &mut Job,
    retry: &mut VecDeque<Job>,
    pending: &AtomicUsize,
    outcomes: Option<&dyn DispatchOutcomes>,
) -> bool {
    if !job.unrecorded {
        return true;
    }
    let mut ids = Vec::new();
    for j in std::iter::once(&mut *job).chain(retry.iter_mut()) {
        if j.unrecorded {
            j.unrecorded = false;
            ids.extend(j.dispatch_id());
        }
    }
    let allowed = match outcomes {
        Some(outcomes) => outcomes.resending(ids.clone()).await,
        None => true,
    };
    if !allowed {
        retry.retain(|j| !j.dispatch_id().is_some_and(|id| ids.contains(&id)));
        let given_up = ids.len();
        pending.fetch_sub(given_up, Ordering::AcqRel);
        metrics::counter!("attune_dispatches_dropped_total", "reason" => "fenced")
            .increment(given_up as u64);
    }
    allowed
}

/// The sending side: cheap to clone, never blocks.
#[derive(Clone)]
pub struct PublisherHandle {
    tx: mpsc::UnboundedSender<Job>,
    /// Jobs handed in and not yet confirmed or given up.
    pending: Arc<AtomicUsize>,
}

impl PublisherHandle {
    pub fn publish(&self, out: Outgoing, on_confirmed: Option<OnConfirmed>) {
        self.pending.fetch_add(1, Ordering::AcqRel);
        let job = Job {
            out,
            on_confirmed,
            unrecorded: false,
        };
        if let Err(mpsc::error::SendError(job)) = self.tx.send(job) {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            if let Some(f) = job.on_confirmed {
                f(false);
            }
        }
    }

    /// Jobs handed in and not yet confirmed.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Waits until everything handed in so far is confirmed, or the timeout passes. Returns
    /// whether it drained.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.pending() > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }
}

impl Dispatcher for PublisherHandle {
    fn dispatch(&self, batch: Vec<Dispatch>) {
        for d in batch {
            self.publish(Outgoing::Dispatch(d), None);
        }
    }
}

/// Where the session puts the channel the publisher should use (`None` while disconnected).
pub type ChannelSlot = watch::Sender<Option<Channel>>;

/// Starts the publisher task. It runs until every handle is dropped and all is confirmed.
/// At most `confirm_window` publishes (at least 1) await their confirm at once.
pub fn spawn(
    outcomes: Option<Arc<dyn DispatchOutcomes>>,
    confirm_window: usize,
) -> (PublisherHandle, ChannelSlot, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (slot, channel) = watch::channel(None);
    let pending = Arc::new(AtomicUsize::new(0));
    let task = tokio::spawn(run(
        rx,
        channel,
        pending.clone(),
        outcomes,
        confirm_window.max(1),
    ));
    (PublisherHandle { tx, pending }, slot, task)
}

type ConfirmFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = lapin::Result<Confirmation>> + Send>>;

async fn run(
    mut rx: mpsc::UnboundedReceiver<Job>,
    mut channel: watch::Receiver<Option<Channel>>,
    pending: Arc<AtomicUsize>,
    outcomes: Option<Arc<dyn DispatchOutcomes>>,
    confirm_window: usize,
) {
    let mut retry: VecDeque<Job> = VecDeque::new();
    let mut returns = Returns::default();
    let mut closed = false;
    loop {
        let Some(ch) = current_channel(&mut channel, closed && retry.is_empty()).await else {
            break;
        };
        let mut in_flight: VecDeque<Job> = VecDeque::new();
        let mut confirms: FuturesOrdered<ConfirmFuture> = FuturesOrdered::new();
        let mut broken = false;
        while !broken {
            if closed && retry.is_empty() && in_flight.is_empty() {
                return;
            }
            tokio::select! {
                biased;
                Some(first) = confirms.next(), if !confirms.is_empty() => {
                    // lapin resolves every confirm of one ack frame at once and hands the
                    // frame's returned messages to them in no particular order: the confirms
                    // that are ready are judged together, so a dispatch returned with
                    // another's confirm is never counted as delivered.
                    let mut group = vec![first];
                    while let Some(Some(next)) = confirms.next().now_or_never() {
                        group.push(next);
                    }
                    let jobs: Vec<Job> = group.iter().filter_map(|_| in_flight.pop_front()).collect();
                    for result in &mut group {
                        if let Ok(Confirmation::Ack(returned) | Confirmation::Nack(returned)) = result {
                            returns.take(returned.take(), &jobs, &in_flight, outcomes.as_deref());
                        }
                    }
                    let mut jobs = jobs.into_iter();
                    for result in group {
                        let Some(job) = jobs.next() else { break };
                        if result.is_ok() && returns.was_returned(&job) {
                            pending.fetch_sub(1, Ordering::AcqRel);
                            continue;
                        }
                        match result {
                            Ok(Confirmation::Nack(_)) => {
                                tracing::warn!("broker refused a publish (nack); sending it again");
                                retry.push_back(job.again());
                            }
                            Ok(_) => confirmed(job, &pending, outcomes.as_deref()),
                            Err(e) => {
                                // The channel is gone: this one and the rest of the group go
                                // back, in order, with what is still in flight.
                                tracing::warn!(error = %e, "publish confirm lost");
                                let rest: Vec<Job> = std::iter::once(job).chain(jobs.by_ref()).collect();
                                for job in rest.into_iter().rev() {
                                    in_flight.push_front(job);
                                }
                                broken = true;
                                break;
                            }
                        }
                    }
                }
                job = next_job(&mut retry, &mut rx, &mut closed), if in_flight.len() < confirm_window => {
                    let Some(mut job) = job else { continue };
                    if !record_raised(&mut job, &mut retry, &pending, outcomes.as_deref()).await {
                        continue;
                    }
                    match send(&ch, &job.out).await {
                        Ok(confirm) => {
                            in_flight.push_back(job);
                            confirms.push_back(Box::pin(confirm));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "publish failed; waiting for a new channel");
                            retry.push_front(job);
                            broken = true;
                        }
                    }
                }
                changed = channel.changed() => {
                    if changed.is_err() || channel.borrow().as_ref().map(|c| c.id()) != Some(ch.id()) {
                        broken = true;
                    }
                }
            }
        }
        // Whatever was not confirmed goes first next time, in the order it was published;
        // but not a dispatch the broker returned (it waits in its queue again) nor one whose
        // execution ended meanwhile (a worker had it and reported).
        let (lost, kept): (Vec<Job>, Vec<Job>) = std::mem::take(&mut retry)
            .into_iter()
            .partition(|j| j.out.is_session_bound());
        retry = kept.into();
        for job in lost {
            give_up(job, &pending);
        }
        while let Some(job) = in_flight.pop_back() {
            if job.out.is_session_bound() {
                give_up(job, &pending);
                continue;
            }
            let wanted = match &job.out {
                Outgoing::Dispatch(d) => outcomes.as_ref().is_none_or(|o| o.still_wanted(d)),
                _ => true,
            };
            if returns.was_returned(&job) || !wanted {
                if !wanted {
                    metrics::counter!("attune_dispatches_dropped_total", "reason" => "ended_before_resend")
                        .increment(1);
                }
                pending.fetch_sub(1, Ordering::AcqRel);
                continue;
            }
            retry.push_front(job.again());
        }
        let _ = channel.borrow_and_update();
    }
    // Shut down with jobs left and no broker: tell their owners.
    for job in retry {
        give_up(job, &pending);
    }
}

fn give_up(job: Job, pending: &AtomicUsize) {
    pending.fetch_sub(1, Ordering::AcqRel);
    if let Some(f) = job.on_confirmed {
        f(false);
    }
}

/// The channel to publish on, waiting for a session to provide one. `None` when there is
/// nothing left to do and no channel will come.
async fn current_channel(
    channel: &mut watch::Receiver<Option<Channel>>,
    done: bool,
) -> Option<Channel> {
    loop {
        if let Some(ch) = channel.borrow_and_update().clone()
            && ch.status().connected()
        {
            return Some(ch);
        }
        if done {
            return None;
        }
        if channel.changed().await.is_err() {
            return None;
        }
    }
}

async fn next_job(
    retry: &mut VecDeque<Job>,
    rx: &mut mpsc::UnboundedReceiver<Job>,
    closed: &mut bool,
) -> Option<Job> {
    if let Some(job) = retry.pop_front() {
        return Some(job);
    }
    if *closed {
        return std::future::pending().await;
    }
    match rx.recv().await {
        Some(job) => Some(job),
        None => {
            *closed = true;
            None
        }
    }
}

fn confirmed(job: Job, pending: &AtomicUsize, outcomes: Option<&dyn DispatchOutcomes>) {
    pending.fetch_sub(1, Ordering::AcqRel);
    if let (Outgoing::Dispatch(d), Some(outcomes)) = (&job.out, outcomes) {
        outcomes.delivered(d);
    }
    if let Some(f) = job.on_confirmed {
        f(true);
    }
}

/// Dispatches the broker returned whose own confirm has not been seen yet: lapin may attach
/// a return to an earlier confirm than its dispatch's.
#[derive(Default)]
struct Returns {
    awaiting_confirm: std::collections::HashSet<ExecutionId>,
}

impl Returns {
    /// Hands a returned dispatch back; notes it if its own confirm is among those being
    /// handled (`current`) or is still to come.
    fn take(
        &mut self,
        returned: Option<lapin::message::BasicReturnMessage>,
        current: &[Job],
        in_flight: &VecDeque<Job>,
        outcomes: Option<&dyn DispatchOutcomes>,
    ) {
        let Some(msg) = returned else { return };
        let Some(d) = wire::decode_dispatch(&msg.delivery.data) else {
            tracing::warn!(
                exchange = %msg.delivery.exchange,
                routing_key = %msg.delivery.routing_key,
                "the broker returned a message that is not a dispatch; dropped"
            );
            return;
        };
        metrics::counter!("attune_dispatches_unroutable_total", "action" => d.action.to_string())
            .increment(1);
        tracing::warn!(
            action = %d.action,
            execution_id = d.execution_id,
            routing_key = %msg.delivery.routing_key,
            "dispatch returned: no worker queue is bound to its routing key; it waits again"
        );
        let is =
            |j: &Job| matches!(&j.out, Outgoing::Dispatch(o) if o.execution_id == d.execution_id);
        let still_to_confirm = current.iter().any(is) || in_flight.iter().any(is);
        if still_to_confirm {
            self.awaiting_confirm.insert(d.execution_id);
        }
        if let Some(outcomes) = outcomes {
            outcomes.returned(d);
        }
    }

    /// Whether `job` is a dispatch the broker returned (its return already handed back).
    fn was_returned(&mut self, job: &Job) -> bool {
        match &job.out {
            Outgoing::Dispatch(d) if !self.awaiting_confirm.is_empty() => {
                self.awaiting_confirm.remove(&d.execution_id)
            }
            _ => false,
        }
    }
}

/// The dispatch header naming the execution whose completion freed the slot
/// ([`Dispatch::freed_by`]).
pub const FREED_BY_HEADER: &str = "x-freed-by";

fn json_properties() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
}

async fn send(ch: &Channel, out: &Outgoing) -> lapin::Result<lapin::PublisherConfirm> {
    let (exchange, routing_key, body, props) = match out {
        Outgoing::Dispatch(d) => {
            let mut headers = FieldTable::default();
            headers.insert("x-attempt".into(), AMQPValue::LongUInt(d.attempt));
            // AMQP has no unsigned 64-bit field: an id above i64::MAX goes without it.
            if let Some(freed_by) = d.freed_by.and_then(|id| i64::try_from(id).ok()) {
                headers.insert(FREED_BY_HEADER.into(), AMQPValue::LongLongInt(freed_by));
            }
            (
                topology::EXCHANGE.to_owned(),
                topology::dispatch_routing_key(d.action.as_str()),
                wire::encode_dispatch(d),
                json_properties()
                    .with_message_id(d.execution_id.to_string().into())
                    .with_headers(headers),
            )
        }
        Outgoing::DeadLetter(letter) => (
            topology::DLX.to_owned(),
            topology::dlq_routing_key(letter.queue_from.as_str()),
            letter.encode(),
            json_properties(),
        ),
        Outgoing::Reply {
            to,
            correlation_id,
            reply,
        } => {
            let mut props = BasicProperties::default().with_content_type("application/json".into());
            if let Some(c) = correlation_id {
                props = props.with_correlation_id(c.clone());
            }
            (String::new(), to.clone(), reply.encode(), props)
        }
        Outgoing::Forward {
            routing_key,
            body,
            properties,
        } => (
            topology::EXCHANGE.to_owned(),
            routing_key.clone(),
            body.clone(),
            properties.clone(),
        ),
    };
    // A dispatch that no queue takes must come back: it is not a dispatch.
    let options = BasicPublishOptions {
        mandatory: matches!(out, Outgoing::Dispatch(_)),
        ..BasicPublishOptions::default()
    };
    ch.basic_publish(
        exchange.as_str().into(),
        routing_key.as_str().into(),
        options,
        &body,
        props,
    )
    .await
}
