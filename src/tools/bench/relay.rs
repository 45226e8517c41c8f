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

use lapin::options::{BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::sync::watch;

use crate::core::Dispatch;
use crate::rabbit::acks::Acks;
use crate::rabbit::publisher::{self, Outgoing, PublisherHandle};
use crate::rabbit::topology::{self, TopologySpec};
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
    let relay = publisher.clone();
    let requests = consume(
        &conn,
        topology::REQUESTS_QUEUE,
        settings.prefetch,
        move |batch, acks| {
            for d in batch {
                forward(&relay, &d, acks, max_bytes);
            }
        },
    );
    let completions = consume(
        &conn,
        topology::COMPLETED_QUEUE,
        settings.prefetch,
        |batch, acks| {
            for d in batch {
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

/// Publishes a request as its dispatch; acknowledges the request once the broker confirmed
/// the dispatch. A request that does not decode is acknowledged and dropped (the bench's
/// requests always decode).
fn forward(
    publisher: &PublisherHandle,
    d: &lapin::message::Delivery,
    acks: &Acks,
    max_bytes: usize,
) {
    let tag = d.delivery_tag;
    let content_type = d.properties.content_type().as_ref().map(|c| c.as_str());
    let Ok(req) = wire::decode_request(&d.data, content_type, max_bytes) else {
        acks.ack(tag);
        return;
    };
    let now = chrono::Utc::now();
    let acks = acks.clone();
    publisher.publish(
        Outgoing::Dispatch(Dispatch {
            action: req.action_ref,
            execution_id: req.execution_id.unwrap_or_default(),
            request_id: req.request_id,
            payload: req.payload,
            enqueued_at: now,
            dispatched_at: now,
            attempt: 1,
        }),
        Some(Box::new(move |confirmed| {
            if confirmed {
                acks.ack(tag)
            } else {
                acks.requeue(tag)
            }
        })),
    );
}
