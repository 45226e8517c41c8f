//! The three consumers: execution requests (intake), completions from workers, and cancels.
//!
//! Each reads deliveries in batches (whatever is already buffered, up to the prefetch),
//! decodes them, hands them to the executor in one call per action, and settles each delivery
//! when its outcome is safe: a request when the executor's receipt says it is accepted (the
//! outcome sink decides when that is: at once in memory mode, after the ledger commit
//! otherwise), a completion or cancel when the executor has applied it, and anything that goes
//! to the dead-letter queue only once the broker confirmed the dead letter. Nothing is ever
//! requeued, except when the executor is shutting down and gives a request back.
//!
//! Intake may wait on Postgres, the actors never do: once the executor's memory of ended ids
//! is incomplete (after a restart on the ledger, or once its window evicted an id), the
//! request consumer asks the [`History`] about the supplied ids memory does not know, one
//! query per batch, before it submits the batch; ids found there are duplicates. The next
//! batch waits meanwhile, so acceptance order is kept.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use futures::StreamExt;
use futures::future::BoxFuture;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, ShortString};

use super::acks::Acks;
use super::publisher::{Outgoing, PublisherHandle};
use super::throttle::IntakeThrottle;
use super::wire::{self, DeadLetter, QueueFrom, Reply};
use crate::core::{Executor, History};
use crate::model::{
    ActionRef, CancelRequest, CancelVerdict, Completion, CompletionVerdict, ExecutionId, Receipt,
    Rejection, Submission, Verdict, settle,
};

/// What the consumers need to know, shared by all three.
pub struct ConsumerContext {
    pub executor: Arc<Executor>,
    pub publisher: PublisherHandle,
    /// Bodies larger than this are dead-lettered unread.
    pub max_message_bytes: usize,
    /// A message delivered more often than this is a poison message (plus one delivery per
    /// session this process lost; see [`ConsumerContext::poison_threshold`]).
    pub max_deliveries: u32,
    /// RabbitMQ sessions this process has lost so far (connections dropped or closed, broker
    /// restarts). Each gives every unacknowledged message back to the broker once: routine,
    /// not a sign of a message that breaks the executor.
    session_losses: AtomicU32,
    /// When off, failures are logged and counted but not published.
    pub dlq_enabled: super::dead_letters::DlqSwitch,
    /// Deliveries seen per message, for classic queues, which do not count redeliveries
    /// themselves. Only redelivered messages are tracked; reset when it grows large.
    redeliveries: Mutex<HashMap<u64, u32>>,
    /// What the completion listener reports in its periodic log line.
    completion_log: CompletionLog,
    /// Where to ask about supplied ids that ended beyond what the executor remembers; `None`
    /// in memory mode, where nothing is remembered across a restart anyway.
    history: Option<Arc<dyn History>>,
    /// Ids of requests held while the history is asked about their batch, and how many
    /// held batches name each. A cancel for one of them waits until they are submitted:
    /// before that it would find no execution and be lost.
    held: Mutex<HashMap<ExecutionId, u32>>,
    /// Woken whenever held requests are submitted.
    released: tokio::sync::Notify,
    /// `cluster.mode: shared`: which partitions this instance owns and how to reach the
    /// others ([`super::routing`]).
    pub router: Option<Arc<super::partitions::Router>>,
}

/// Requests held while the history is asked about them; released when dropped.
struct Held {
    ctx: Arc<ConsumerContext>,
    ids: Vec<ExecutionId>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.ctx.release(&self.ids);
    }
}

/// The runbook checks the completion listener with `journalctl … | grep CompletionListener`
/// ("is the listener running?") and `grep notify_completion` ("recent completions
/// processed?"). One line at most every [`COMPLETION_LOG_INTERVAL`] answers both without a
/// line per completion.
struct CompletionLog {
    /// Completions that freed a slot since the last line.
    freed: AtomicU64,
    /// Completions that freed nothing since the last line.
    unmatched: AtomicU64,
    /// When the last line was written.
    last: Mutex<Instant>,
}

/// How often the completion listener says what it processed (when it processed anything).
const COMPLETION_LOG_INTERVAL: Duration = Duration::from_secs(10);

impl CompletionLog {
    fn new() -> Self {
        Self {
            freed: AtomicU64::new(0),
            unmatched: AtomicU64::new(0),
            last: Mutex::new(Instant::now()),
        }
    }

    fn count(&self, verdict: &CompletionVerdict) {
        let counter = match verdict {
            CompletionVerdict::Freed => &self.freed,
            CompletionVerdict::Unmatched(_) => &self.unmatched,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Writes the line if the interval has passed and something was processed; returns the
    /// (freed, unmatched) counts it reported.
    fn maybe_log(&self) -> Option<(u64, u64)> {
        // Another consumer batch is writing the line right now: nothing to add.
        let mut last = self.last.try_lock().ok()?;
        let since = last.elapsed();
        if since < COMPLETION_LOG_INTERVAL {
            return None;
        }
        let freed = self.freed.swap(0, Ordering::Relaxed);
        let unmatched = self.unmatched.swap(0, Ordering::Relaxed);
        if freed + unmatched == 0 {
            return None;
        }
        *last = Instant::now();
        tracing::info!(
            freed,
            unmatched,
            seconds = since.as_secs(),
            "CompletionListener: notify_completion processed {} completions since the last report",
            freed + unmatched
        );
        Some((freed, unmatched))
    }
}

/// Redelivery counts kept at most; past this the map starts over (a poison message then gets
/// a few more tries, which is harmless).
const MAX_TRACKED_REDELIVERIES: usize = 100_000;

impl ConsumerContext {
    pub fn new(
        executor: Arc<Executor>,
        publisher: PublisherHandle,
        max_message_bytes: usize,
        max_deliveries: u32,
        dlq_enabled: impl Into<super::dead_letters::DlqSwitch>,
    ) -> Self {
        Self {
            executor,
            publisher,
            max_message_bytes,
            max_deliveries,
            session_losses: AtomicU32::new(0),
            dlq_enabled: dlq_enabled.into(),
            redeliveries: Mutex::new(HashMap::new()),
            completion_log: CompletionLog::new(),
            history: None,
            held: Mutex::new(HashMap::new()),
            released: tokio::sync::Notify::new(),
            router: None,
        }
    }

    /// Routes by partition (`cluster.mode: shared`).
    pub fn with_router(mut self, router: Arc<super::partitions::Router>) -> Self {
        self.router = Some(router);
        self
    }

    /// Marks `ids` as held until the returned guard is dropped: when they are submitted, or
    /// when their batch is dropped unsubmitted (a lost connection; the broker redelivers it).
    fn hold(self: &Arc<Self>, ids: Vec<ExecutionId>) -> Held {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        for id in &ids {
            *held.entry(*id).or_default() += 1;
        }
        Held {
            ctx: self.clone(),
            ids,
        }
    }

    fn release(&self, ids: &[ExecutionId]) {
        {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            for id in ids {
                if let Some(n) = held.get_mut(id) {
                    *n -= 1;
                    if *n == 0 {
                        held.remove(id);
                    }
                }
            }
        }
        self.released.notify_waiters();
    }

    fn holds_any(&self, ids: &[ExecutionId]) -> bool {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        ids.iter().any(|id| held.contains_key(id))
    }

    /// Checks supplied execution ids that memory does not know against `history` before
    /// they are submitted.
    pub fn with_history(mut self, history: Arc<dyn History>) -> Self {
        self.history = Some(history);
        self
    }

    /// Says that the RabbitMQ session was lost: what it had not acknowledged comes back once
    /// more, and that must not count towards making it a poison message.
    pub fn session_lost(&self) {
        self.session_losses.fetch_add(1, Ordering::AcqRel);
    }

    /// Deliveries above which a message is poison: `rabbitmq.max_deliveries`, plus one for
    /// every session this process lost. A message that breaks the executor makes it crash
    /// (a new process, no losses counted yet), so it still reaches the bound with quorum
    /// queues, which count deliveries across processes. A message handled fine but given back
    /// by a dropped connection, a broker restart or a Postgres outage (nothing is
    /// acknowledged while the ledger cannot commit) is not poison, however often that happens:
    /// dead-lettering a completion for it would hold its slot for an hour.
    pub fn poison_threshold(&self) -> u32 {
        self.max_deliveries
            .saturating_add(self.session_losses.load(Ordering::Acquire))
    }

    /// How many times this message has been delivered, counting this time: from the broker's
    /// `x-delivery-count` (quorum queues) or our own count (classic queues).
    fn deliveries(&self, d: &Delivery) -> u32 {
        if !d.redelivered {
            return 1;
        }
        let header = d
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-delivery-count").and_then(as_u32));
        if let Some(previous) = header {
            return previous.saturating_add(1);
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        d.data.hash(&mut hasher);
        d.routing_key.as_str().hash(&mut hasher);
        self.count_redelivery(hasher.finish())
    }

    /// Counts one more delivery of the redelivered message with this hash (classic queues);
    /// returns its deliveries so far.
    fn count_redelivery(&self, key: u64) -> u32 {
        let mut seen = self.redeliveries.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() >= MAX_TRACKED_REDELIVERIES {
            seen.clear();
        }
        // A redelivered message we have not counted was delivered at least once before.
        let count = seen.entry(key).or_insert(1);
        *count = count.saturating_add(1);
        *count
    }

    /// Publishes a dead letter and acknowledges the delivery once the broker has it; if the
    /// publisher gives up (shutdown), the delivery goes back to the broker instead.
    fn dead_letter(&self, letter: DeadLetter, acks: &Acks, tag: u64) {
        metrics::counter!(
            "attune_dlq_messages_total",
            "queue_from" => letter.queue_from.as_str(),
            "error_class" => letter.error_class.clone()
        )
        .increment(1);
        tracing::warn!(
            queue_from = letter.queue_from.as_str(),
            error_class = %letter.error_class,
            error = %letter.error_message,
            execution_id = ?letter.execution_id,
            request_id = ?letter.request_id,
            "dead-lettering message"
        );
        if !self.dlq_enabled.is_on() {
            acks.ack(tag);
            return;
        }
        let acks = acks.clone();
        self.publisher.publish(
            Outgoing::DeadLetter(letter),
            Some(Box::new(move |confirmed| {
                if confirmed {
                    acks.ack(tag)
                } else {
                    acks.requeue(tag)
                }
            })),
        );
    }

    /// Dead-letters a delivery that will not be processed.
    fn refuse(
        &self,
        d: &Delivery,
        acks: &Acks,
        queue_from: QueueFrom,
        error_class: &str,
        error_message: String,
    ) {
        let salvage = wire::salvage(&d.data);
        let mut letter = DeadLetter::new(
            queue_from,
            error_class,
            error_message.clone(),
            wire::original(&d.data),
        );
        letter.execution_id = salvage.execution_id;
        letter.action_ref = salvage.action_ref;
        letter.request_id = salvage.request_id;
        letter.retry_count = retry_count(&d.properties);
        if queue_from == QueueFrom::Requested {
            reply(
                &self.publisher,
                d,
                Reply {
                    execution_id: letter.execution_id,
                    status: "rejected",
                    error: Some(error_message),
                    duplicate: false,
                },
            );
        }
        self.dead_letter(letter, acks, d.delivery_tag);
    }

    /// Dead-letters a message delivered too often, before anything else is done with it.
    fn is_poison(&self, d: &Delivery, acks: &Acks, queue_from: QueueFrom) -> bool {
        let deliveries = self.deliveries(d);
        if deliveries <= self.poison_threshold() {
            return false;
        }
        self.refuse(
            d,
            acks,
            queue_from,
            "PoisonMessage",
            format!(
                "delivered {deliveries} times (rabbitmq.max_deliveries is {}, plus {} for \
                 sessions lost)",
                self.max_deliveries,
                self.session_losses.load(Ordering::Acquire)
            ),
        );
        true
    }
}

fn as_u32(v: &AMQPValue) -> Option<u32> {
    let n: i64 = match v {
        AMQPValue::ShortShortInt(n) => (*n).into(),
        AMQPValue::ShortShortUInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::ShortUInt(n) => (*n).into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongUInt(n) => (*n).into(),
        AMQPValue::LongLongInt(n) => *n,
        _ => return None,
    };
    u32::try_from(n.max(0)).ok()
}

/// How often this message has been replayed from the DLQ: the `x-retry-count` header a replay
/// sets (see `ops::dlq`), 0 on a first attempt. Carried into the dead letter if it fails
/// again, so the DLQ shows how many tries an execution has had.
fn retry_count(properties: &lapin::BasicProperties) -> u32 {
    properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-retry-count").and_then(as_u32))
        .unwrap_or(0)
}

pub(crate) fn content_type(d: &Delivery) -> Option<&str> {
    d.properties
        .content_type()
        .as_ref()
        .map(ShortString::as_str)
}

fn reply(publisher: &PublisherHandle, d: &Delivery, reply: Reply) {
    let Some(to) = d.properties.reply_to() else {
        return;
    };
    publisher.publish(
        Outgoing::Reply {
            to: to.as_str().to_owned(),
            correlation_id: d.properties.correlation_id().clone(),
            reply,
        },
        None,
    );
}

/// What a handler leaves to be awaited before the next batch is read: nothing (a ready
/// future) for completions and cancels, the history lookup and the submission for requests
/// that need one.
pub type Handled = BoxFuture<'static, ()>;

pub(crate) fn done() -> Handled {
    Box::pin(std::future::ready(()))
}

/// Reads a consumer in batches and hands each batch to `handle` until the consumer ends
/// (`Ok`, it was canceled) or fails (`Err`, the channel or connection is gone). The next
/// batch is read only once the future `handle` returned has finished.
///
/// With a `throttle`, batches are no larger than its burst and each waits for as many tokens
/// as it holds before it is handled; meanwhile the deliveries stay unacknowledged and the rest
/// of the queue stays in the broker.
pub async fn consume(
    mut consumer: lapin::Consumer,
    acks: Acks,
    max_batch: usize,
    throttle: Option<Arc<IntakeThrottle>>,
    mut handle: impl FnMut(Vec<Delivery>, &Acks) -> Handled,
) -> Result<(), lapin::Error> {
    let max_batch = throttle
        .as_ref()
        .map_or(max_batch, |t| max_batch.min(t.max_batch()));
    loop {
        let first = match consumer.next().await {
            None => return Ok(()),
            Some(Err(e)) => return Err(e),
            Some(Ok(d)) => d,
        };
        let mut batch = vec![first];
        let mut failure = None;
        // Take what is already buffered without waiting. Polled with this task's own waker
        // (not a no-op one), so a delivery that arrives meanwhile still wakes the loop.
        while batch.len() < max_batch {
            match futures::poll!(consumer.next()) {
                std::task::Poll::Ready(Some(Ok(d))) => batch.push(d),
                std::task::Poll::Ready(Some(Err(e))) => {
                    failure = Some(e);
                    break;
                }
                _ => break,
            }
        }
        if let Some(t) = &throttle {
            t.acquire(batch.len()).await;
        }
        for d in &batch {
            acks.track(d.delivery_tag);
        }
        handle(batch, &acks).await;
        if let Some(e) = failure {
            return Err(e);
        }
    }
}

/// Intake: decodes requests and submits them, one call per action per batch, after asking
/// the history about supplied ids when memory cannot tell that they are new.
pub fn handle_requests(ctx: &Arc<ConsumerContext>, batch: Vec<Delivery>, acks: &Acks) -> Handled {
    let mut per_action: Vec<(ActionRef, Vec<Submission>)> = Vec::new();
    // Supplied ids only: assigned ones are above every id seen, so they are new.
    let mut supplied: Vec<ExecutionId> = Vec::new();
    for d in batch {
        if ctx.is_poison(&d, acks, QueueFrom::Requested) {
            continue;
        }
        let req = match wire::decode_request(&d.data, content_type(&d), ctx.max_message_bytes) {
            Ok(req) => req,
            Err(e) => {
                ctx.refuse(
                    &d,
                    acks,
                    QueueFrom::Requested,
                    e.error_class(),
                    e.to_string(),
                );
                continue;
            }
        };
        if let Some(id) = req.execution_id {
            supplied.push(id);
        }
        let execution_id = req
            .execution_id
            .unwrap_or_else(|| ctx.executor.next_execution_id());
        let receipt = request_receipt(ctx.clone(), acks.clone(), d, &req.action_ref);
        let sub = Submission {
            execution_id,
            request_id: req.request_id,
            payload: req.payload,
            receipt: Some(receipt),
        };
        match per_action.iter_mut().find(|(a, _)| *a == req.action_ref) {
            Some((_, subs)) => subs.push(sub),
            None => per_action.push((req.action_ref, vec![sub])),
        }
    }
    let unknown: Vec<ExecutionId> = match &ctx.history {
        Some(_) => supplied
            .into_iter()
            .filter(|id| !ctx.executor.is_known(*id) && ctx.executor.may_have_forgotten(*id))
            .collect(),
        _ => Vec::new(),
    };
    let Some(history) = ctx.history.clone().filter(|_| !unknown.is_empty()) else {
        submit(ctx, per_action);
        return done();
    };
    let ctx = ctx.clone();
    let held = ctx.hold(
        per_action
            .iter()
            .flat_map(|(_, subs)| subs.iter().map(|s| s.execution_id))
            .collect(),
    );
    Box::pin(async move {
        let recorded = recorded_among(&*history, unknown).await;
        if !recorded.is_empty() {
            ctx.executor.remember_ended(&recorded);
            let recorded: std::collections::HashSet<ExecutionId> = recorded.into_iter().collect();
            for (_, subs) in &mut per_action {
                subs.retain_mut(|sub| {
                    if !recorded.contains(&sub.execution_id) {
                        return true;
                    }
                    let execution_id = sub.execution_id;
                    tracing::info!(
                        execution_id,
                        "request for an execution the ledger already has; duplicate"
                    );
                    settle(sub.receipt.take(), Verdict::Duplicate { execution_id });
                    false
                });
            }
        }
        submit(&ctx, per_action);
        drop(held);
    })
}

fn submit(ctx: &ConsumerContext, per_action: Vec<(ActionRef, Vec<Submission>)>) {
    for (action, subs) in per_action {
        if !subs.is_empty() {
            ctx.executor.submit(&action, subs);
        }
    }
}

/// Longest a history lookup may take before it counts as failed.
const HISTORY_TIMEOUT: Duration = Duration::from_secs(10);
/// Pauses between failed lookups: from the first to the last, doubling.
const HISTORY_RETRY: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(5));

/// Which of `ids` the history holds, asking again until it answers: nothing in this batch
/// may be submitted before (it could run a second time), and nothing is acknowledged
/// meanwhile, so the broker keeps the messages. The same holds while the ledger itself
/// cannot commit.
async fn recorded_among(history: &dyn History, ids: Vec<ExecutionId>) -> Vec<ExecutionId> {
    let mut pause = HISTORY_RETRY.0;
    let mut failures = 0u32;
    loop {
        let error = match tokio::time::timeout(HISTORY_TIMEOUT, history.recorded(ids.clone())).await
        {
            Ok(Ok(found)) => {
                if failures > 0 {
                    tracing::info!(failures, "past executions can be looked up again");
                }
                return found;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {HISTORY_TIMEOUT:?}"),
        };
        if failures == 0 {
            tracing::warn!(error = %error, ids = ids.len(),
                "cannot tell whether requested executions ran before; intake waits");
        }
        failures += 1;
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(HISTORY_RETRY.1);
    }
}

/// What happens to a request delivery once the executor has decided.
fn request_receipt(
    ctx: Arc<ConsumerContext>,
    acks: Acks,
    d: Delivery,
    action: &ActionRef,
) -> Receipt<Verdict> {
    let action = action.clone();
    Receipt::new(move |verdict: Verdict| {
        let tag = d.delivery_tag;
        match verdict {
            Verdict::Queued { execution_id } | Verdict::Duplicate { execution_id } => {
                let duplicate = matches!(verdict, Verdict::Duplicate { .. });
                // A duplicate is answered once the first copy's actor has handled what it had
                // (its acceptance among it) and what was recorded is committed (see
                // `History::settled`).
                let settled = ctx.history.as_ref().filter(|_| duplicate).map(|h| {
                    let handled = ctx.executor.handled_so_far(execution_id);
                    let history = h.clone();
                    async move {
                        handled.await;
                        history.settled().await;
                    }
                });
                let answer = move || {
                    reply(
                        &ctx.publisher,
                        &d,
                        Reply {
                            execution_id: Some(execution_id),
                            status: "queued",
                            error: None,
                            duplicate,
                        },
                    );
                    acks.ack(tag);
                };
                match (settled, tokio::runtime::Handle::try_current()) {
                    (Some(settled), Ok(rt)) => {
                        rt.spawn(async move {
                            settled.await;
                            answer();
                        });
                    }
                    _ => answer(),
                }
            }
            Verdict::Rejected {
                rejection: Rejection::ShuttingDown,
                ..
            } => acks.requeue(tag),
            Verdict::Rejected {
                execution_id,
                rejection,
            } => {
                let message = rejection.to_string();
                reply(
                    &ctx.publisher,
                    &d,
                    Reply {
                        execution_id: Some(execution_id),
                        status: "rejected",
                        error: Some(message.clone()),
                        duplicate: false,
                    },
                );
                let salvage = wire::salvage(&d.data);
                let mut letter = DeadLetter::new(
                    QueueFrom::Requested,
                    rejection.error_class(),
                    message,
                    wire::original(&d.data),
                );
                letter.execution_id = Some(execution_id);
                letter.action_ref = Some(action.as_str().to_owned());
                letter.request_id = salvage.request_id;
                letter.retry_count = retry_count(&d.properties);
                ctx.dead_letter(letter, &acks, tag);
            }
        }
    })
}

/// Completions: decodes them and hands them to the owning actors.
pub fn handle_completions(
    ctx: &Arc<ConsumerContext>,
    batch: Vec<Delivery>,
    acks: &Acks,
) -> Handled {
    let mut completions = Vec::with_capacity(batch.len());
    for d in batch {
        if ctx.is_poison(&d, acks, QueueFrom::Completed) {
            continue;
        }
        match wire::decode_completion(&d.data, content_type(&d), ctx.max_message_bytes) {
            Ok(c) => {
                let acks = acks.clone();
                let tag = d.delivery_tag;
                let execution_id = c.execution_id;
                let ctx = ctx.clone();
                completions.push(Completion {
                    execution_id: c.execution_id,
                    status: c.status,
                    result: c.result,
                    receipt: Some(Receipt::new(move |verdict: CompletionVerdict| {
                        ctx.completion_log.count(&verdict);
                        if let CompletionVerdict::Unmatched(reason) = verdict {
                            metrics::counter!("attune_unmatched_completions_total", "reason" => reason.as_str())
                                .increment(1);
                            tracing::info!(execution_id, reason = reason.as_str(), "completion freed nothing");
                        }
                        acks.ack(tag);
                    })),
                });
            }
            Err(e) => ctx.refuse(
                &d,
                acks,
                QueueFrom::Completed,
                e.error_class(),
                e.to_string(),
            ),
        }
    }
    if !completions.is_empty() {
        ctx.executor.complete(completions);
    }
    let _ = ctx.completion_log.maybe_log();
    done()
}

/// Cancels: decodes them and hands them to the owning actors.
pub fn handle_cancels(ctx: &Arc<ConsumerContext>, batch: Vec<Delivery>, acks: &Acks) -> Handled {
    let mut requests = Vec::with_capacity(batch.len());
    for d in batch {
        if ctx.is_poison(&d, acks, QueueFrom::Cancel) {
            continue;
        }
        match wire::decode_cancel(&d.data, content_type(&d), ctx.max_message_bytes) {
            Ok(c) => {
                let acks = acks.clone();
                let tag = d.delivery_tag;
                let execution_id = c.execution_id;
                requests.push(CancelRequest {
                    execution_id,
                    receipt: Some(Receipt::new(move |verdict: CancelVerdict| {
                        tracing::info!(execution_id, ?verdict, "cancel handled");
                        let verdict = match verdict {
                            CancelVerdict::Canceled => "canceled",
                            CancelVerdict::Running => "running",
                            CancelVerdict::Unknown => "unknown",
                            CancelVerdict::Remembered => "remembered",
                        };
                        metrics::counter!("attune_cancels_total", "verdict" => verdict)
                            .increment(1);
                        acks.ack(tag);
                    })),
                });
            }
            Err(e) => ctx.refuse(&d, acks, QueueFrom::Cancel, e.error_class(), e.to_string()),
        }
    }
    // A cancel whose request is held while the history is asked about it waits for it to be
    // submitted, behind which it then queues in its actor; the others go at once.
    let (waiting, now): (Vec<CancelRequest>, Vec<CancelRequest>) = requests
        .into_iter()
        .partition(|r| ctx.holds_any(&[r.execution_id]));
    if !now.is_empty() {
        ctx.executor.cancel_or_remember(now);
    }
    if waiting.is_empty() {
        return done();
    }
    // Waited for on a task of their own, so that later cancels are not held up behind them.
    let ids: Vec<ExecutionId> = waiting.iter().map(|r| r.execution_id).collect();
    let ctx = ctx.clone();
    tokio::spawn(async move {
        loop {
            let released = ctx.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if !ctx.holds_any(&ids) {
                break;
            }
            released.await;
        }
        ctx.executor.cancel_or_remember(waiting);
    });
    done()
}

#[cfg(test)]
mod tests {
    use lapin::BasicProperties;
    use lapin::types::FieldTable;

    use super::*;
    use crate::core::memory::{ChannelDispatcher, DiscardSink, NoStats};
    use crate::core::{ActionPolicy, Ports, QueueSettings, UniformPolicy};

    /// A consumer context over an idle in-memory executor, with a publisher that never
    /// connects.
    async fn context(max_deliveries: u32) -> Arc<ConsumerContext> {
        let (dispatcher, _dispatched) = ChannelDispatcher::new();
        let ports = Ports {
            dispatcher: Arc::new(dispatcher),
            sink: Arc::new(DiscardSink),
            observer: Arc::new(NoStats),
        };
        let executor = Executor::start(
            QueueSettings::default(),
            ports,
            Arc::new(UniformPolicy(ActionPolicy::default())),
        )
        .await
        .expect("executor");
        let (publisher, _slot, _task) = crate::rabbit::publisher::spawn(None, 8);
        Arc::new(ConsumerContext::new(
            Arc::new(executor),
            publisher,
            1024,
            max_deliveries,
            false,
        ))
    }

    #[tokio::test]
    async fn held_requests_are_released_when_their_batch_is_submitted_or_dropped() {
        let ctx = context(5).await;
        let first = ctx.hold(vec![1, 2]);
        let second = ctx.hold(vec![2]);
        assert!(ctx.holds_any(&[1]) && ctx.holds_any(&[2]));
        // A batch whose lookup is abandoned (its connection lost) is dropped unsubmitted: its
        // ids must not stay held, or a cancel for them would wait for ever.
        let abandoned = Box::pin(async move {
            let _held = first;
            std::future::pending::<()>().await;
        });
        drop(abandoned);
        assert!(!ctx.holds_any(&[1]));
        assert!(ctx.holds_any(&[2]), "still held by the other batch");
        drop(second);
        assert!(!ctx.holds_any(&[1, 2]));
    }

    #[tokio::test]
    async fn redeliveries_caused_by_lost_sessions_do_not_make_a_message_poison() {
        let ctx = context(2).await;
        // A completion held unacknowledged while Postgres is down, its connection dropped
        // three times meanwhile: four deliveries in all.
        let mut deliveries = 1;
        for _ in 0..3 {
            ctx.session_lost();
            deliveries = ctx.count_redelivery(42);
        }
        assert_eq!(deliveries, 4);
        assert!(
            deliveries <= ctx.poison_threshold(),
            "three lost sessions explain three redeliveries"
        );
        // Coming back without a lost session to explain it is what a poison message does.
        let again = ctx.count_redelivery(42);
        let again = ctx.count_redelivery(42).max(again);
        assert!(again > ctx.poison_threshold());
    }

    #[test]
    fn the_retry_count_comes_from_the_x_retry_count_header_and_defaults_to_zero() {
        assert_eq!(retry_count(&BasicProperties::default()), 0);
        let mut headers = FieldTable::default();
        headers.insert("x-retry-count".into(), AMQPValue::LongUInt(3));
        assert_eq!(
            retry_count(&BasicProperties::default().with_headers(headers)),
            3
        );
        let mut headers = FieldTable::default();
        headers.insert("x-retry-count".into(), AMQPValue::LongString("x".into()));
        assert_eq!(
            retry_count(&BasicProperties::default().with_headers(headers)),
            0
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_completion_listener_reports_at_most_every_interval_and_only_when_busy() {
        let log = CompletionLog::new();
        log.count(&CompletionVerdict::Freed);
        log.count(&CompletionVerdict::Freed);
        log.count(&CompletionVerdict::Unmatched(
            crate::model::UnmatchedReason::Unknown,
        ));
        assert_eq!(log.maybe_log(), None, "too early: the counts wait");
        tokio::time::advance(COMPLETION_LOG_INTERVAL).await;
        assert_eq!(log.maybe_log(), Some((2, 1)));
        tokio::time::advance(COMPLETION_LOG_INTERVAL).await;
        assert_eq!(log.maybe_log(), None, "nothing processed: no line");
        log.count(&CompletionVerdict::Freed);
        assert_eq!(
            log.maybe_log(),
            Some((1, 0)),
            "the quiet interval already passed"
        );
    }
}
