//! The three consumers: execution requests (intake), completions from workers, and cancels.
//!
//! Each reads deliveries in batches (whatever is already buffered, up to the prefetch),
//! decodes them, hands them to the executor in one call per action, and settles each delivery
//! when its outcome is safe: a request when the executor's receipt says it is accepted (the
//! outcome sink decides when that is: at once in memory mode, after the ledger commit
//! otherwise), a completion or cancel when the executor has applied it, and anything that goes
//! to the dead-letter queue only once the broker confirmed the dead letter. Nothing is ever
//! requeued, except when the executor is shutting down and gives a request back.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, ShortString};

use super::acks::Acks;
use super::publisher::{Outgoing, PublisherHandle};
use super::wire::{self, DeadLetter, QueueFrom, Reply};
use crate::core::Executor;
use crate::model::{
    ActionRef, CancelRequest, Completion, CompletionVerdict, Receipt, Rejection, Submission,
    Verdict,
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
        }
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

/// Reads a consumer in batches and hands each batch to `handle` until the consumer ends
/// (`Ok`, it was canceled) or fails (`Err`, the channel or connection is gone).
pub async fn consume(
    mut consumer: lapin::Consumer,
    acks: Acks,
    max_batch: usize,
    mut handle: impl FnMut(Vec<Delivery>, &Acks),
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
        handle(batch, &acks);
        if let Some(e) = failure {
            return Err(e);
        }
    }
}

/// Intake: decodes requests and submits them, one call per action per batch.
pub fn handle_requests(ctx: &Arc<ConsumerContext>, batch: Vec<Delivery>, acks: &Acks) {
    let mut per_action: Vec<(ActionRef, Vec<Submission>)> = Vec::new();
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
    for (action, subs) in per_action {
        ctx.executor.submit(&action, subs);
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
pub fn handle_completions(ctx: &Arc<ConsumerContext>, batch: Vec<Delivery>, acks: &Acks) {
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
}

/// Cancels: decodes them and hands them to the owning actors.
pub fn handle_cancels(ctx: &Arc<ConsumerContext>, batch: Vec<Delivery>, acks: &Acks) {
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
