//! Partition queues (`cluster.mode: shared`): how a message reaches the instance that owns
//! its action.
//!
//! Each partition `p` has a quorum queue `attune.partition.<p>`, declared with
//! `x-single-active-consumer` and bound to `attune.executions` by `partition.<p>`. Every
//! instance consumes every partition queue; the broker keeps one consumer active per queue
//! and promotes a standby when the active one's channel closes. The instance that receives
//! anything from a partition's queue is therefore its one active consumer: it takes the
//! partition ([`Owner::take`]: the epoch raised in Postgres, the partition rebuilt from the
//! ledger) before it handles what came.
//!
//! The shared queues are consumed by every instance. A request whose action's partition this
//! instance owns is handled here; any other is carried to its partition's queue with a
//! publisher confirm, and the original is acknowledged only once the broker confirmed the
//! copy. Completions and cancels name only an execution: one live here is handled here, the
//! others find their action in the ledger ([`Owner::locate`]) and are carried likewise. A
//! completion the ledger does not know is handled here (counted as unmatched); a cancel it
//! does not know (its request not accepted yet) goes to every partition queue, so that
//! whichever owner accepts the request later has it remembered.
//!
//! # Order
//!
//! Requests of one action must be accepted in the order producers published them. Consumers
//! competing for one queue would break that, so one instance at a time consumes the shared
//! request queue: the *intake leader*, the single active consumer of [`LEADER_QUEUE`] (a
//! queue that carries only ticks). It handles a request here when it owns the request's
//! partition, and carries it to the partition's queue otherwise; both paths keep order, but a
//! request handled here must not overtake one carried earlier that still waits in the
//! partition's queue. So every message this instance carries to a partition is stamped with
//! this run and a number ([`STAMP_HEADER`]), and requests of a partition are handled here only
//! once everything it carried there has come back through the queue and been submitted. On
//! taking a partition over and on becoming leader it sends a stamped marker through each
//! queue concerned, which brings the count level once what others carried before is handled.
//! Completions and cancels have no order to keep: every instance consumes their queues.
//!
//! A message on a partition queue says what it is in the header [`KIND_HEADER`]; without it,
//! it is a request, so a producer may publish a request straight to `partition.<p>`.
//!
//! An instance that owns no partition would never learn that the broker made it active on a
//! queue nobody publishes to: every instance sends each partition it does not own a tick
//! every [`tick_interval`] (non-persistent, expiring), which the active consumer takes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};

use super::acks::Acks;
use super::publisher::{Outgoing, PublisherHandle};
use super::topology::EXCHANGE;
use crate::cluster::{Partition, partition_of};
use crate::model::{ActionRef, ExecutionId};

/// Name prefix of the partition queues; the partition's number follows.
pub const QUEUE_PREFIX: &str = "attune.partition.";
/// Routing key prefix that binds a partition queue to `attune.executions`.
pub const ROUTING_PREFIX: &str = "partition.";
/// What a message on a partition queue is: `request` (also when absent), `completion`,
/// `cancel` or `tick`.
pub const KIND_HEADER: &str = "x-attune-kind";
/// The queue whose single active consumer is the intake leader: the one instance that
/// consumes the shared request queue (see the module docs).
pub const LEADER_QUEUE: &str = "attune.intake.leader";
/// Routing key that binds [`LEADER_QUEUE`] to `attune.executions`.
pub const LEADER_ROUTING_KEY: &str = "intake.leader";
/// Which run of which instance carried a message to a partition queue, and its number among
/// that run's messages to the partition (`<run>:<seq>`).
pub const STAMP_HEADER: &str = "x-attune-stamp";
/// How often an instance ticks the partitions it does not own: a quarter of the heartbeat
/// (`rabbitmq.heartbeat_seconds`; 0, the broker's own, counts as 60 s), between 250 ms and
/// 1 s. A standby made active learns it within one tick, a small part of the two heartbeats
/// the broker takes to notice a paused owner.
pub fn tick_interval(heartbeat_seconds: u16) -> Duration {
    let heartbeat = match heartbeat_seconds {
        0 => Duration::from_secs(60),
        s => Duration::from_secs(u64::from(s)),
    };
    (heartbeat / 4).clamp(Duration::from_millis(250), Duration::from_secs(1))
}
/// A tick nobody took is dropped after this long.
const TICK_EXPIRATION_MS: &str = "5000";

/// The queue of partition `p`.
pub fn queue_name(p: Partition) -> String {
    format!("{QUEUE_PREFIX}{p}")
}

/// The routing key of partition `p`'s queue.
pub fn routing_key(p: Partition) -> String {
    format!("{ROUTING_PREFIX}{p}")
}

/// What a message on a partition queue carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Request,
    Completion,
    Cancel,
    Tick,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Request => "request",
            Kind::Completion => "completion",
            Kind::Cancel => "cancel",
            Kind::Tick => "tick",
        }
    }

    /// The kind a delivery's [`KIND_HEADER`] names; a request without one (or with one this
    /// version does not know, which the request decoder then refuses as it would anything
    /// malformed).
    pub fn of(properties: &BasicProperties) -> Kind {
        let named = properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(KIND_HEADER))
            .and_then(|v| match v {
                AMQPValue::LongString(s) => Some(s.to_string()),
                AMQPValue::ShortString(s) => Some(s.to_string()),
                _ => None,
            });
        match named.as_deref() {
            Some("completion") => Kind::Completion,
            Some("cancel") => Kind::Cancel,
            Some("tick") => Kind::Tick,
            _ => Kind::Request,
        }
    }
}

/// Declares the `partitions` partition queues, [`LEADER_QUEUE`] and their bindings,
/// idempotently.
pub async fn declare(channel: &Channel, partitions: u16) -> Result<(), lapin::Error> {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    let queues = (0..partitions)
        .map(|p| (queue_name(p), routing_key(p)))
        .chain([(LEADER_QUEUE.to_owned(), LEADER_ROUTING_KEY.to_owned())]);
    for (queue, key) in queues {
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                arguments.clone(),
            )
            .await?;
        channel
            .queue_bind(
                queue.as_str().into(),
                EXCHANGE.into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// Failure of [`Owner::locate`]; the caller leaves the messages with the broker and asks
/// again.
#[derive(Debug, thiserror::Error)]
#[error("could not find the actions of executions: {0}")]
pub struct LocateError(pub String);

/// What the edge needs from the instance about partitions.
pub trait Owner: Send + Sync + 'static {
    /// Whether this instance owns `p` and has rebuilt it.
    fn owns(&self, p: Partition) -> bool;
    /// Takes `p` (this instance was just made its queue's active consumer): raises its epoch,
    /// rebuilds it from the ledger. Resolves once it is owned; `false` if it cannot be (the
    /// instance is stopping or fenced), and then nothing from its queue may be handled.
    fn take(self: Arc<Self>, p: Partition) -> BoxFuture<'static, bool>;
    /// The action of each of `ids` the ledger holds.
    fn locate(
        &self,
        ids: Vec<ExecutionId>,
    ) -> BoxFuture<'static, Result<Vec<(ExecutionId, ActionRef)>, LocateError>>;
}

/// The partition count and the owner: what the consumers route by.
pub struct Router {
    pub partitions: u16,
    pub owner: Arc<dyn Owner>,
    /// This run's stamp (random): tells its own carried messages from others'.
    run: u64,
    /// Per partition, messages this run carried there, and the highest number of those that
    /// came back through the queue and were handled here.
    sent: Vec<AtomicU64>,
    seen: Vec<AtomicU64>,
    /// Whether this instance is the intake leader.
    leader: tokio::sync::watch::Sender<bool>,
}

impl Router {
    pub fn new(partitions: u16, owner: Arc<dyn Owner>) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self {
            partitions,
            owner,
            run: seed ^ (u64::from(std::process::id()) << 32) | 1,
            sent: (0..partitions).map(|_| AtomicU64::new(0)).collect(),
            seen: (0..partitions).map(|_| AtomicU64::new(0)).collect(),
            leader: tokio::sync::watch::channel(false).0,
        }
    }

    pub fn partition_of(&self, action: &ActionRef) -> Partition {
        partition_of(action, self.partitions)
    }

    /// Whether a request of partition `p` taken from the shared queue is handled here: the
    /// partition is owned here and nothing this run carried there is still on its way.
    pub fn handles_here(&self, p: Partition) -> bool {
        let i = usize::from(p);
        self.owner.owns(p)
            && match (self.sent.get(i), self.seen.get(i)) {
                (Some(sent), Some(seen)) => {
                    seen.load(Ordering::Acquire) >= sent.load(Ordering::Acquire)
                }
                _ => false,
            }
    }

    /// Notes that messages with these stamps (from partition `p`'s queue) were handled.
    pub fn came_back(&self, p: Partition, stamps: &[(u64, u64)]) {
        let Some(seen) = self.seen.get(usize::from(p)) else {
            return;
        };
        for (run, seq) in stamps {
            if *run == self.run {
                seen.fetch_max(*seq, Ordering::AcqRel);
            }
        }
    }

    fn stamp(&self, p: Partition, headers: &mut FieldTable) {
        if let Some(sent) = self.sent.get(usize::from(p)) {
            let seq = sent.fetch_add(1, Ordering::AcqRel) + 1;
            headers.insert(
                STAMP_HEADER.into(),
                AMQPValue::LongString(format!("{:x}:{seq}", self.run).into()),
            );
        }
    }

    /// Sends a stamped marker through partition `p`'s queue: once it is back, everything
    /// carried there before it (by anyone) has been handled.
    pub fn mark(&self, publisher: &PublisherHandle, p: Partition) {
        let mut headers = FieldTable::default();
        headers.insert(KIND_HEADER.into(), AMQPValue::LongString("tick".into()));
        self.stamp(p, &mut headers);
        publisher.publish(
            Outgoing::Forward {
                routing_key: routing_key(p),
                body: Vec::new(),
                properties: BasicProperties::default()
                    .with_headers(headers)
                    .with_delivery_mode(2),
            },
            None,
        );
    }

    /// Whether this instance is the intake leader.
    pub fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }

    /// Makes this instance the intake leader (it was made the active consumer of
    /// [`LEADER_QUEUE`]): markers go through every partition queue, and the request consumer
    /// starts.
    pub fn lead(&self, publisher: &PublisherHandle) {
        if self.is_leader() {
            return;
        }
        for p in 0..self.partitions {
            self.mark(publisher, p);
        }
        self.leader.send_replace(true);
        metrics::gauge!("attune_intake_leader").set(1.0);
        tracing::info!("intake leader: this instance consumes the shared request queue");
    }

    /// Resolves once this instance is the intake leader.
    pub async fn until_leader(&self) {
        let mut rx = self.leader.subscribe();
        let _ = rx.wait_for(|l| *l).await;
    }

    /// Carries `delivery` to partition `p`'s queue as `kind`; the delivery is acknowledged
    /// once the broker confirmed the copy (left to the broker if the session ends first).
    pub fn forward(
        &self,
        publisher: &PublisherHandle,
        acks: &Acks,
        delivery: lapin::message::Delivery,
        p: Partition,
        kind: Kind,
    ) {
        self.carry(publisher, acks, delivery, &[p], kind);
    }

    /// Carries `delivery` to every partition's queue as `kind`: a cancel whose execution no
    /// instance has accepted yet, so that whichever owner gets the request cancels it. The
    /// delivery is acknowledged once every copy is confirmed.
    pub fn broadcast(
        &self,
        publisher: &PublisherHandle,
        acks: &Acks,
        delivery: lapin::message::Delivery,
        kind: Kind,
    ) {
        let all: Vec<Partition> = (0..self.partitions).collect();
        self.carry(publisher, acks, delivery, &all, kind);
    }

    fn carry(
        &self,
        publisher: &PublisherHandle,
        acks: &Acks,
        delivery: lapin::message::Delivery,
        to: &[Partition],
        kind: Kind,
    ) {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(
            KIND_HEADER.into(),
            AMQPValue::LongString(kind.as_str().into()),
        );
        let properties = delivery
            .properties
            .clone()
            .with_headers(headers)
            .with_delivery_mode(2);
        let tag = delivery.delivery_tag;
        let unconfirmed = Arc::new(std::sync::atomic::AtomicUsize::new(to.len()));
        metrics::counter!("attune_forwarded_total", "kind" => kind.as_str()).increment(1);
        for p in to {
            let acks = acks.clone();
            let unconfirmed = unconfirmed.clone();
            let mut stamped = properties.headers().clone().unwrap_or_default();
            self.stamp(*p, &mut stamped);
            publisher.publish(
                Outgoing::Forward {
                    routing_key: routing_key(*p),
                    body: delivery.data.clone(),
                    properties: properties.clone().with_headers(stamped),
                },
                Some(Box::new(move |confirmed| {
                    let last = unconfirmed.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1;
                    // A copy given up leaves the count above zero for good: the delivery goes
                    // back to the broker with its session and comes again.
                    if confirmed && last {
                        acks.ack(tag);
                    }
                })),
            );
        }
    }

    /// Ticks every partition this instance does not own, and the leader queue unless it leads (see the module docs).
    pub fn tick(&self, publisher: &PublisherHandle) {
        let keys = (0..self.partitions)
            .filter(|p| !self.owner.owns(*p))
            .map(routing_key)
            .chain((!self.is_leader()).then(|| LEADER_ROUTING_KEY.to_owned()));
        for key in keys {
            let mut headers = FieldTable::default();
            headers.insert(KIND_HEADER.into(), AMQPValue::LongString("tick".into()));
            publisher.publish(
                Outgoing::Forward {
                    routing_key: key,
                    body: Vec::new(),
                    properties: BasicProperties::default()
                        .with_headers(headers)
                        .with_expiration(TICK_EXPIRATION_MS.into()),
                },
                None,
            );
        }
    }
}

/// The `(run, number)` a carried message was stamped with.
pub fn stamp_of(properties: &BasicProperties) -> Option<(u64, u64)> {
    let value = properties.headers().as_ref()?.inner().get(STAMP_HEADER)?;
    let text = match value {
        AMQPValue::LongString(s) => s.to_string(),
        AMQPValue::ShortString(s) => s.to_string(),
        _ => return None,
    };
    let (run, seq) = text.split_once(':')?;
    Some((u64::from_str_radix(run, 16).ok()?, seq.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_without_a_kind_is_a_request() {
        assert_eq!(Kind::of(&BasicProperties::default()), Kind::Request);
        for kind in [Kind::Request, Kind::Completion, Kind::Cancel, Kind::Tick] {
            let mut headers = FieldTable::default();
            headers.insert(
                KIND_HEADER.into(),
                AMQPValue::LongString(kind.as_str().into()),
            );
            assert_eq!(
                Kind::of(&BasicProperties::default().with_headers(headers)),
                kind
            );
        }
    }

    #[test]
    fn ticks_come_four_times_a_heartbeat_within_bounds() {
        assert_eq!(tick_interval(2), Duration::from_millis(500));
        assert_eq!(tick_interval(1), Duration::from_millis(250));
        assert_eq!(tick_interval(10), Duration::from_secs(1));
        assert_eq!(tick_interval(0), Duration::from_secs(1));
    }

    #[test]
    fn names_follow_the_partition() {
        assert_eq!(queue_name(7), "attune.partition.7");
        assert_eq!(routing_key(15), "partition.15");
    }
}
