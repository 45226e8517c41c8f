//! The broker baseline (`--baseline broker`): the executor's three persistent hops with no
//! executor logic between them, to measure what RabbitMQ itself allows on this machine.
//!
//! The relay declares the executor's own topology (same queues, same queue type), consumes
//! requests and publishes each as a dispatch at once, and consumes completions and
//! acknowledges them. It is built from the executor's own RabbitMQ parts, so it is tuned
//! exactly the same way: the consumers' batching ([`consumers::consume`], batches of at most
//! [`edge::MAX_BATCH`]) and prefetch, the publisher task and its confirm window
//! ([`publisher`]), and the ack batching ([`Acks`]). A request is acknowledged once its
//! dispatch is confirmed, so nothing accepted can be lost, as with the executor.
//!
//! With [`RelaySettings::limits`] it is the *limited* relay: it also holds each action to its
//! concurrency limit in FIFO order, with an in-memory queue and a count of running executions
//! per action, and frees a slot when a completion arrives; nothing else (no ledger, no
//! timeouts, no metrics). That is the least any executor must do, so its throughput is what
//! the same three hops allow under the workload's own limits: at limit 1 a serial chain of
//! broker round trips, which the bare relay does not have to wait for. A request it queues is
//! acknowledged at once (it keeps no record to answer for it after a crash; it measures, it is
//! not a design), one it forwards at once when its dispatch is confirmed.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use lapin::options::{BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::sync::watch;

use crate::core::Dispatch;
use crate::model::{ActionRef, ExecutionId};
use crate::rabbit::acks::Acks;
use crate::rabbit::publisher::{self, OnConfirmed, Outgoing, PublisherHandle};
use crate::rabbit::topology::{self, TopologySpec};
use crate::rabbit::wire::RequestMsg;
use crate::rabbit::{consumers, edge, wire};

/// How the relay is tuned: the executor's settings.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    pub url: String,
    pub topology: TopologySpec,
    /// Unacknowledged deliveries per consumer (`rabbitmq.prefetch`).
    pub prefetch: u16,
    /// Publishes awaiting their confirm (`rabbitmq.confirm_window`).
    pub confirm_window: usize,
    /// Largest body read (`rabbitmq.max_message_bytes`).
    pub max_message_bytes: usize,
    /// Per action ref, its concurrency limit: the limited relay. `None`: the bare relay.
    pub limits: Option<HashMap<String, u32>>,
}

/// Errors of the relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error(transparent)]
    Topology(#[from] topology::TopologyError),
}

/// Runs the relay until `stop` turns true (or the connection fails).
pub async fn run(
    settings: RelaySettings,
    mut stop: watch::Receiver<bool>,
) -> Result<(), RelayError> {
    let conn = edge::connect(&settings.url, "fifo-executor bench relay").await?;
    let topo = conn.create_channel().await?;
    topology::declare(&topo, &settings.topology).await?;
    let publish = conn.create_channel().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let (publisher, slot, _task) = publisher::spawn(None, settings.confirm_window);
    slot.send_replace(Some(publish));

    let max_bytes = settings.max_message_bytes;
    let gate = settings.limits.map(|limits| {
        Arc::new(Mutex::new(Gate {
            limits,
            lines: HashMap::new(),
            running: HashMap::new(),
        }))
    });
    let relay = publisher.clone();
    let requests_gate = gate.clone();
    let requests = consume(
        &conn,
        topology::REQUESTS_QUEUE,
        settings.prefetch,
        move |batch, acks| {
            for d in batch {
                let Some(req) = request(&d, acks, max_bytes) else {
                    continue;
                };
                match &requests_gate {
                    None => forward(
                        &relay,
                        req,
                        None,
                        None,
                        Some((d.delivery_tag, acks.clone())),
                    ),
                    Some(gate) => lock(gate).submit(&relay, req, d.delivery_tag, acks),
                }
            }
        },
    );
    let relay = publisher.clone();
    let completions = consume(
        &conn,
        topology::COMPLETED_QUEUE,
        settings.prefetch,
        move |batch, acks| {
            for d in batch {
                if let Some(gate) = &gate {
                    let content_type = consumers::content_type(&d);
                    if let Ok(c) = wire::decode_completion(&d.data, content_type, max_bytes) {
                        lock(gate).complete(&relay, c.execution_id);
                    }
                }
                acks.ack(d.delivery_tag);
            }
        },
    );
    let result = tokio::select! {
        r = requests => r,
        r = completions => r,
        _ = stop.wait_for(|s| *s) => Ok(()),
    };
    drop(slot);
    let _ = conn.close(200, "relay done".into()).await;
    result
}

/// Consumes `queue` the way the executor's edge does, handing batches to `handle`.
async fn consume(
    conn: &Connection,
    queue: &'static str,
    prefetch: u16,
    mut handle: impl FnMut(Vec<lapin::message::Delivery>, &Acks),
) -> Result<(), RelayError> {
    let ch: Channel = conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let consumer = ch
        .basic_consume(
            queue.into(),
            "fifo-executor-bench-relay".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let (acks, _task) = Acks::spawn(ch.clone());
    let batch = edge::MAX_BATCH.min(usize::from(prefetch.max(1)));
    // The relay has nothing to await between batches and is never throttled.
    consumers::consume(consumer, acks, batch, None, |b, a| -> consumers::Handled {
        handle(b, a);
        Box::pin(std::future::ready(()))
    })
    .await?;
    Ok(())
}

/// Decodes a request; one that does not decode is acknowledged and dropped (the bench's
/// requests always decode).
fn request(d: &lapin::message::Delivery, acks: &Acks, max_bytes: usize) -> Option<RequestMsg> {
    match wire::decode_request(&d.data, consumers::content_type(d), max_bytes) {
        Ok(req) => Some(req),
        Err(_) => {
            acks.ack(d.delivery_tag);
            None
        }
    }
}

/// Publishes a request as its dispatch; with `ack`, acknowledges the request once the broker
/// confirmed the dispatch.
fn forward(
    publisher: &PublisherHandle,
    req: RequestMsg,
    enqueued_at: Option<DateTime<Utc>>,
    freed_by: Option<ExecutionId>,
    ack: Option<(u64, Acks)>,
) {
    let now = Utc::now();
    publisher.publish(
        Outgoing::Dispatch(Dispatch {
            action: req.action_ref,
            execution_id: req.execution_id.unwrap_or_default(),
            request_id: req.request_id,
            payload: req.payload,
            enqueued_at: enqueued_at.unwrap_or(now),
            dispatched_at: now,
            attempt: 1,
            freed_by,
        }),
        ack.map(|(tag, acks)| -> OnConfirmed {
            Box::new(move |confirmed| {
                if confirmed {
                    acks.ack(tag)
                } else {
                    acks.requeue(tag)
                }
            })
        }),
    );
}

/// The limited relay's state: per action, its waiting requests and running count.
struct Gate {
    limits: HashMap<String, u32>,
    lines: HashMap<ActionRef, Line>,
    /// Running executions and their actions, to free the slot a completion names.
    running: HashMap<ExecutionId, ActionRef>,
}

#[derive(Default)]
struct Line {
    /// Queued requests and when they were queued.
    waiting: VecDeque<(RequestMsg, DateTime<Utc>)>,
    running: u32,
}

fn lock(gate: &Mutex<Gate>) -> std::sync::MutexGuard<'_, Gate> {
    gate.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Gate {
    /// Forwards the request if its action has a free slot and nothing waiting; queues it
    /// (and acknowledges it) otherwise.
    fn submit(&mut self, publisher: &PublisherHandle, req: RequestMsg, tag: u64, acks: &Acks) {
        let limit = self
            .limits
            .get(req.action_ref.as_str())
            .copied()
            .unwrap_or(u32::MAX);
        let line = self.lines.entry(req.action_ref.clone()).or_default();
        if line.waiting.is_empty() && line.running < limit {
            line.running += 1;
            self.running
                .insert(req.execution_id.unwrap_or_default(), req.action_ref.clone());
            forward(publisher, req, None, None, Some((tag, acks.clone())));
        } else {
            line.waiting.push_back((req, Utc::now()));
            acks.ack(tag);
        }
    }

    /// Frees the completed execution's slot and forwards the head of its action's queue.
    fn complete(&mut self, publisher: &PublisherHandle, id: ExecutionId) {
        let Some(action) = self.running.remove(&id) else {
            return;
        };
        let Some(line) = self.lines.get_mut(&action) else {
            return;
        };
        line.running = line.running.saturating_sub(1);
        if let Some((next, enqueued_at)) = line.waiting.pop_front() {
            line.running += 1;
            self.running
                .insert(next.execution_id.unwrap_or_default(), action);
            forward(publisher, next, Some(enqueued_at), Some(id), None);
        }
    }
}
