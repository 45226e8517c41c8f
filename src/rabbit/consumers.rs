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
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, ShortString};

use super::acks::Acks;
use super::publisher::{Outgoing, PublisherHandle};
use super::wire::{self, DeadLetter, QueueFrom, Reply};
use crate::core::{Executor, History};
use crate::model::{
    ActionRef, CancelRequest, Completion, CompletionVerdict, ExecutionId, Receipt, Rejection,
    Submission, Verdict, settle,
};

/// What the consumers need to know, shared by all three.
pub struct ConsumerContext {
    pub executor: Arc<Executor>,
    pub publisher: PublisherHandle,
    /// Bodies larger than this are dead-lettered unread.
    pub max_message_bytes: usize,
    /// A message delivered more often than this is a poison message.
    pub max_deliveries: u32,
    /// When false, failures are logged and counted but not published.
    pub dlq_enabled: bool,
    /// Deliveries seen per message, for classic queues, which do not count redeliveries
    /// themselves. Only redelivered messages are tracked; reset when it grows large.
    redeliveries: Mutex<HashMap<u64, u32>>,
    /// Where to ask about supplied ids that ended beyond what the executor remembers; `None`
    /// in memory mode, where nothing is remembered across a restart anyway.
    history: Option<Arc<dyn History>>,
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
        dlq_enabled: bool,
    ) -> Self {
        Self {
            executor,
            publisher,
            max_message_bytes,
            max_deliveries,
            dlq_enabled,
            redeliveries: Mutex::new(HashMap::new()),
            history: None,
        }
    }

    /// Checks supplied execution ids that memory does not know against `history` before
    /// they are submitted.
    pub fn with_history(mut self, history: Arc<dyn History>) -> Self {
        self.history = Some(history);
        self
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
        let key = hasher.finish();
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
        if !self.dlq_enabled {
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
        if deliveries <= self.max_deliveries {
            return false;
        }
        self.refuse(
            d,
            acks,
            queue_from,
            "PoisonMessage",
            format!(
                "delivered {deliveries} times (rabbitmq.max_deliveries is {})",
                self.max_deliveries
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

fn content_type(d: &Delivery) -> Option<&str> {
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

fn done() -> Handled {
    Box::pin(std::future::ready(()))
}

/// Reads a consumer in batches and hands each batch to `handle` until the consumer ends
/// (`Ok`, it was canceled) or fails (`Err`, the channel or connection is gone). The next
/// batch is read only once the future `handle` returned has finished.
pub async fn consume(
    mut consumer: lapin::Consumer,
    acks: Acks,
    max_batch: usize,
    mut handle: impl FnMut(Vec<Delivery>, &Acks) -> Handled,
) -> Result<(), lapin::Error> {
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
        Some(_) if !ctx.executor.remembers_every_ended_id() => supplied
            .into_iter()
            .filter(|id| !ctx.executor.is_known(*id))
            .collect(),
        _ => Vec::new(),
    };
    let Some(history) = ctx.history.clone().filter(|_| !unknown.is_empty()) else {
        submit(ctx, per_action);
        return done();
    };
    let ctx = ctx.clone();
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
                completions.push(Completion {
                    execution_id: c.execution_id,
                    status: c.status,
                    result: c.result,
                    receipt: Some(Receipt::new(move |verdict: CompletionVerdict| {
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
                    receipt: Some(Receipt::new(move |verdict| {
                        tracing::info!(execution_id, ?verdict, "cancel handled");
                        acks.ack(tag);
                    })),
                });
            }
            Err(e) => ctx.refuse(&d, acks, QueueFrom::Cancel, e.error_class(), e.to_string()),
        }
    }
    if !requests.is_empty() {
        ctx.executor.cancel(requests);
    }
    done()
}

#[cfg(test)]
mod tests {
    use lapin::BasicProperties;
    use lapin::types::FieldTable;

    use super::*;

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
}
