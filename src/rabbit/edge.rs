//! The RabbitMQ session: connect, declare the topology, consume, and start over after a loss.
//!
//! A session is one connection with four channels: one for the publisher (confirm mode) and
//! one per consumer, each with its own prefetch and its own ack task. When anything in the
//! session fails (the broker restarts, an operator closes the connection) the whole session is
//! dropped and rebuilt with backoff: deliveries that were not acknowledged come back from the
//! broker (the executor recognises their execution ids), and unconfirmed publishes are sent
//! again by the publisher. A topology mismatch is not retried: it needs an operator.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::Channel;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use tokio::sync::watch;

use super::acks::Acks;
pub use super::connect;
use super::consumers::{self, ConsumerContext};
use super::publisher::ChannelSlot;
use super::routing;
use super::throttle::IntakeThrottle;
use super::topology::{self, TopologyError, TopologySpec};

/// Most deliveries handed to the executor in one batch (also the bench's broker baseline's).
pub const MAX_BATCH: usize = 256;

/// Settings of the RabbitMQ edge.
#[derive(Clone)]
pub struct EdgeSettings {
    pub url: String,
    /// `rabbitmq.tls`: the files an `amqps://` URL uses.
    pub tls: crate::config::RabbitTlsConfig,
    /// Unacknowledged deliveries per consumer.
    pub prefetch: u16,
    pub topology: TopologySpec,
    pub reconnect_max_backoff: Duration,
    /// `rabbitmq.heartbeat_seconds` (0: the broker's own, 60 s by default).
    pub heartbeat_seconds: u16,
    /// Whether nothing will be settled any more (the ledger is fenced): shutdown then does
    /// not wait for deliveries to settle, and the broker gets them back at once.
    pub settles_nothing_more: Arc<dyn Fn() -> bool + Send + Sync>,
    /// How long shutdown waits for in-flight work to settle.
    pub shutdown_timeout: Duration,
    /// `api.rate_limits.global`: limits the request consumer only. Shared across reconnects,
    /// so a new session does not start with a fresh burst.
    pub intake_throttle: Option<Arc<IntakeThrottle>>,
    /// Told when a session is being set up, is up (topology declared, consumers running) and
    /// is lost: the service's readiness follows it.
    pub on_session: Arc<dyn Fn(SessionEvent) + Send + Sync>,
    /// `cluster.mode: shared`: the partition count. The session then also consumes every
    /// partition queue and ticks the partitions not owned here; and a lost session is not
    /// reconnected: [`run`] returns, since the partitions may have moved meanwhile and the
    /// instance must start over ([`crate::app`]).
    pub shared_partitions: Option<u16>,
}

/// What happens to the RabbitMQ session, for [`EdgeSettings::on_session`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// Connecting, declaring the topology and starting the consumers; `last_error` is why the
    /// previous attempt or session ended, if there was one.
    Connecting { last_error: Option<String> },
    /// The topology is declared and every consumer runs.
    Up,
    /// The session failed or could not be set up.
    Lost { error: String, next: AfterLoss },
}

/// What the edge does after a lost session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterLoss {
    /// Tries again after this long.
    Retry(Duration),
    /// Returns: in shared mode the instance starts over in-process.
    StartOver,
    /// Returns: the error needs an operator (a topology mismatch); the service stops.
    Stop,
}

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("setting up the RabbitMQ session took longer than {0:?}")]
    SetupTimeout(Duration),
    #[error("RabbitMQ consumer for {queue} was canceled by the broker (queue deleted?)")]
    ConsumerCanceled { queue: String },
    #[error("RabbitMQ session lost in shared mode: {0}")]
    SharedSessionLost(Box<EdgeError>),
}

impl EdgeError {
    /// Errors a reconnect will not fix.
    fn is_fatal(&self) -> bool {
        matches!(
            self,
            EdgeError::Topology(TopologyError::Inequivalent(_) | TopologyError::InvalidSpec { .. })
        )
    }
}

/// Runs sessions until `shutdown` turns true. On shutdown: stops consuming, waits (up to the
/// timeout) until every delivery taken is settled, runs `drain` (the caller stops the
/// executor there, whose last dispatches still go out), waits for the publisher to have
/// everything confirmed, and closes the connection.
pub async fn run<F>(
    settings: EdgeSettings,
    ctx: Arc<ConsumerContext>,
    publisher_slot: ChannelSlot,
    mut shutdown: watch::Receiver<bool>,
    drain: F,
) -> Result<(), EdgeError>
where
    F: std::future::Future<Output = ()>,
{
    let mut backoff = Duration::from_millis(100);
    let mut drain = Some(Box::pin(drain));
    let mut last_error = None;
    loop {
        (settings.on_session)(SessionEvent::Connecting {
            last_error: last_error.take(),
        });
        match session(&settings, &ctx, &publisher_slot, &mut shutdown, &mut drain).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_fatal() => {
                (settings.on_session)(SessionEvent::Lost {
                    error: e.to_string(),
                    next: AfterLoss::Stop,
                });
                return Err(e);
            }
            Err(e) if settings.shared_partitions.is_some() => {
                publisher_slot.send_replace(None);
                metrics::counter!("attune_rabbitmq_reconnects_total").increment(1);
                (settings.on_session)(SessionEvent::Lost {
                    error: e.to_string(),
                    next: AfterLoss::StartOver,
                });
                return Err(EdgeError::SharedSessionLost(Box::new(e)));
            }
            Err(e) => {
                publisher_slot.send_replace(None);
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "RabbitMQ session lost; reconnecting");
                metrics::counter!("attune_rabbitmq_reconnects_total").increment(1);
                (settings.on_session)(SessionEvent::Lost {
                    error: e.to_string(),
                    next: AfterLoss::Retry(backoff),
                });
                last_error = Some(e.to_string());
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stopped(&mut shutdown) => {
                if let Some(d) = drain.take() {
                    d.await;
                }
                return Ok(());
            }
        }
        backoff = (backoff * 2).min(settings.reconnect_max_backoff);
    }
}

struct ConsumerSpec {
    queue: &'static str,
    tag: &'static str,
    handle: fn(&Arc<ConsumerContext>, Vec<lapin::message::Delivery>, &Acks) -> consumers::Handled,
    /// Subject to `intake_throttle`: requests only, never completions or cancels.
    throttled: bool,
    /// The name its log lines carry (the runbook greps for `CompletionListener`).
    listener: &'static str,
}

const CONSUMERS: [ConsumerSpec; 3] = [
    ConsumerSpec {
        queue: topology::REQUESTS_QUEUE,
        tag: "fifo-executor.requests",
        handle: routing::handle_requests,
        throttled: true,
        listener: "RequestListener",
    },
    ConsumerSpec {
        queue: topology::COMPLETED_QUEUE,
        tag: "fifo-executor.completed",
        handle: routing::handle_completions,
        throttled: false,
        listener: "CompletionListener",
    },
    ConsumerSpec {
        queue: topology::CANCEL_QUEUE,
        tag: "fifo-executor.cancel",
        handle: routing::handle_cancels,
        throttled: false,
        listener: "CancelListener",
    },
];

async fn session<F>(
    settings: &EdgeSettings,
    ctx: &Arc<ConsumerContext>,
    publisher_slot: &ChannelSlot,
    shutdown: &mut watch::Receiver<bool>,
    drain: &mut Option<std::pin::Pin<Box<F>>>,
) -> Result<(), EdgeError>
where
    F: std::future::Future<Output = ()>,
{
    tracing::debug!(url = %redact(&settings.url), "connecting to RabbitMQ");
    // Setting up must not hang: a broker that accepts the TCP connection but never answers
    // (overloaded, or a half-open connection) would otherwise stall the executor for good.
    let (conn, channels, mut loops, mut partition_loops) = tokio::time::timeout(
        SETUP_TIMEOUT,
        setup(settings, ctx, publisher_slot, shutdown.clone()),
    )
    .await
    .map_err(|_| EdgeError::SetupTimeout(SETUP_TIMEOUT))??;
    tracing::info!(url = %redact(&settings.url), "RabbitMQ session up; consuming");
    metrics::gauge!("attune_rabbitmq_connected").set(1.0);
    (settings.on_session)(SessionEvent::Up);

    let ticker = async {
        match &ctx.router {
            Some(router) if settings.shared_partitions.is_some() => loop {
                router.tick(&ctx.publisher);
                tokio::time::sleep(super::partitions::tick_interval(settings.heartbeat_seconds))
                    .await;
            },
            _ => std::future::pending::<()>().await,
        }
    };
    let outcome = tokio::select! {
        // The stop first: a consumer loop that ends because of it (the gated request
        // consumer of a shared instance that is not the intake leader) must not read as a
        // lost session, which would start a shared instance over instead of stopping it.
        biased;
        _ = stopped(shutdown) => Ok(()),
        Some((queue, r)) = loops.next() => match r {
            // Polling the stop first is not enough: under load tokio's cooperative budget can
            // leave the watch pending in the very poll in which such a loop is ready (seen in
            // pg_shared), so a loop that ends once the stop has come is taken for the stop too.
            Ok(()) if *shutdown.borrow() => Ok(()),
            Ok(()) => Err(EdgeError::ConsumerCanceled { queue }),
            Err(e) => Err(EdgeError::Amqp(e)),
        },
        Some((queue, r)) = partition_loops.next() => Err(match r {
            Ok(()) => EdgeError::ConsumerCanceled { queue },
            Err(e) => EdgeError::Amqp(e),
        }),
        () = ticker => Ok(()),
    };
    metrics::gauge!("attune_rabbitmq_connected").set(0.0);
    if let Err(e) = outcome {
        // A session that was up is lost: what it had taken comes back once more. (Failed
        // attempts to connect give nothing back and count for nothing.)
        ctx.session_lost();
        // Close explicitly: ack tasks still hold channels, and a connection kept open would keep
        // its unacknowledged deliveries from being redelivered.
        let _ = conn.close(320, "fifo-executor session failed".into()).await;
        return Err(e);
    }

    // Graceful shutdown, in order: stop taking work, settle what was taken, drain the core,
    // get the last publishes confirmed, close. The partition queues' consumers stay until the
    // connection closes: a standby is made active only once this instance has committed
    // everything and marked its partitions released cleanly (in `drain`); what reaches them
    // meanwhile is held unhandled and goes back to the broker with the connection.
    // Every step below is bounded: a broker that stops answering must not hold the process.
    let shared_queues = channels.len() - partition_loops.len();
    let _ = tokio::time::timeout(settings.shutdown_timeout, async {
        for (ch, _, _, tag) in channels.iter().take(shared_queues) {
            let _ = ch
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await;
        }
    })
    .await;
    // Let the consumer loops see their streams end and hand over what they had buffered.
    let _ = tokio::time::timeout(settings.shutdown_timeout, async {
        while loops.next().await.is_some() {}
    })
    .await;
    for (_, acks, queue, _) in channels.iter().take(shared_queues) {
        if (settings.settles_nothing_more)() {
            break;
        }
        if !acks.settled(settings.shutdown_timeout).await {
            tracing::warn!(
                queue = queue.as_str(),
                outstanding = acks.outstanding(),
                "deliveries left unsettled at shutdown; the broker will redeliver them"
            );
        }
    }
    if let Some(d) = drain.take() {
        d.await;
    }
    if !ctx.publisher.flush(settings.shutdown_timeout).await {
        tracing::warn!(
            pending = ctx.publisher.pending(),
            "publishes left unconfirmed at shutdown"
        );
    }
    publisher_slot.send_replace(None);
    if tokio::time::timeout(
        settings.shutdown_timeout,
        conn.close(200, "fifo-executor shutting down".into()),
    )
    .await
    .is_err()
    {
        tracing::warn!("RabbitMQ did not confirm the connection close in time; leaving it");
    }
    Ok(())
}

type ConsumerLoop =
    std::pin::Pin<Box<dyn std::future::Future<Output = (String, Result<(), lapin::Error>)> + Send>>;
/// A consumer's channel, its acks, its queue and its consumer tag.
type Consuming = (Channel, Acks, String, String);
/// The connection, every consumer (the shared queues' first), the shared queues' loops and
/// the partition queues' loops.
type SessionParts = (
    lapin::Connection,
    Vec<Consuming>,
    futures::stream::FuturesUnordered<ConsumerLoop>,
    futures::stream::FuturesUnordered<ConsumerLoop>,
);

/// How long connecting, declaring and opening the channels may take before the attempt is
/// abandoned and retried.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

async fn setup(
    settings: &EdgeSettings,
    ctx: &Arc<ConsumerContext>,
    publisher_slot: &ChannelSlot,
    shutdown: watch::Receiver<bool>,
) -> Result<SessionParts, EdgeError> {
    let conn = super::connect_with_heartbeat(
        &settings.url,
        &settings.tls,
        "fifo-executor",
        settings.heartbeat_seconds,
    )
    .await?;
    tracing::debug!("RabbitMQ connected; declaring topology");
    let topo = conn.create_channel().await?;
    topology::declare(&topo, &settings.topology).await?;
    if let Some(partitions) = settings.shared_partitions {
        super::partitions::declare(&topo, partitions).await?;
    }
    let _ = topo.close(200, "topology declared".into()).await;

    tracing::debug!("topology declared; opening channels");
    let publish = conn.create_channel().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    publisher_slot.send_replace(Some(publish.clone()));

    let mut channels: Vec<Consuming> = Vec::new();
    let loops: futures::stream::FuturesUnordered<ConsumerLoop> =
        futures::stream::FuturesUnordered::new();
    for spec in &CONSUMERS {
        let ch = conn.create_channel().await?;
        let throttle = settings.intake_throttle.clone().filter(|_| spec.throttled);
        // A throttled consumer holds deliveries unacknowledged while it waits for tokens; with
        // the full prefetch the last of them could wait past the broker's consumer_timeout
        // (30 min by default), which closes the channel and counts a redelivery against every
        // message held. So it is sent no more than one batch ahead.
        let prefetch = throttle.as_ref().map_or(settings.prefetch, |t| {
            u16::try_from(t.max_batch())
                .unwrap_or(u16::MAX)
                .min(settings.prefetch)
        });
        ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
        // Shared mode: only the intake leader consumes requests (`partitions`, "Order").
        let gate = ctx.router.clone().filter(|_| {
            settings.shared_partitions.is_some() && spec.queue == topology::REQUESTS_QUEUE
        });
        let consumer = match gate {
            Some(_) => None,
            None => Some(
                ch.basic_consume(
                    spec.queue.into(),
                    spec.tag.into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?,
            ),
        };
        let (acks, _ack_task) = Acks::spawn(ch.clone());
        let ctx = ctx.clone();
        let handle = spec.handle;
        let queue = spec.queue;
        let batch = MAX_BATCH.min(settings.prefetch.max(1) as usize);
        let acks_for_loop = acks.clone();
        let (listener, tag, gated_ch) = (spec.listener, spec.tag, ch.clone());
        let mut stop = shutdown.clone();
        if consumer.is_some() {
            tracing::info!(queue, "{listener}: consuming");
        }
        loops.push(Box::pin(async move {
            let consumer = match (consumer, gate) {
                (Some(consumer), _) => consumer,
                (None, Some(router)) => {
                    tokio::select! {
                        () = router.until_leader() => {}
                        _ = stopped(&mut stop) => return (queue.to_owned(), Ok(())),
                    }
                    let consumed = gated_ch
                        .basic_consume(
                            queue.into(),
                            tag.into(),
                            BasicConsumeOptions::default(),
                            FieldTable::default(),
                        )
                        .await;
                    match consumed {
                        Ok(c) => {
                            tracing::info!(queue, "{listener}: consuming (intake leader)");
                            c
                        }
                        Err(e) => return (queue.to_owned(), Err(e)),
                    }
                }
                (None, None) => return (queue.to_owned(), Ok(())),
            };
            let r = consumers::consume(consumer, acks_for_loop, batch, throttle, |b, a| {
                handle(&ctx, b, a)
            })
            .await;
            (queue.to_owned(), r)
        }));
        channels.push((ch, acks, spec.queue.to_owned(), spec.tag.to_owned()));
    }
    let partition_loops: futures::stream::FuturesUnordered<ConsumerLoop> =
        futures::stream::FuturesUnordered::new();
    if let Some(partitions) = settings.shared_partitions {
        let batch = MAX_BATCH.min(settings.prefetch.max(1) as usize);
        for p in 0..partitions {
            let queue = super::partitions::queue_name(p);
            let ctx = ctx.clone();
            let (ch, acks, run) = consume_queue(
                &conn,
                queue.clone(),
                settings.prefetch,
                batch,
                move |b, a| routing::handle_partition(&ctx, p, b, a),
            )
            .await?;
            partition_loops.push(run);
            channels.push((ch, acks, queue.clone(), format!("fifo-executor.{queue}")));
        }
        let queue = super::partitions::LEADER_QUEUE.to_owned();
        let ctx = ctx.clone();
        let (ch, acks, run) = consume_queue(&conn, queue.clone(), 16, 16, move |b, a| {
            routing::handle_leader(&ctx, b, a)
        })
        .await?;
        partition_loops.push(run);
        channels.push((ch, acks, queue.clone(), format!("fifo-executor.{queue}")));
        tracing::info!(
            partitions,
            "consuming every partition queue (cluster.mode: shared)"
        );
    }
    Ok((conn, channels, loops, partition_loops))
}

/// Opens a channel on `conn` with `prefetch`, consumes `queue` on it (consumer tag
/// `fifo-executor.<queue>`) and returns the channel, its acks and the loop that hands
/// batches of at most `batch` to `handle`.
async fn consume_queue(
    conn: &lapin::Connection,
    queue: String,
    prefetch: u16,
    batch: usize,
    mut handle: impl FnMut(Vec<lapin::message::Delivery>, &Acks) -> consumers::Handled + Send + 'static,
) -> Result<(Channel, Acks, ConsumerLoop), EdgeError> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let consumer = ch
        .basic_consume(
            queue.as_str().into(),
            format!("fifo-executor.{queue}").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let (acks, _ack_task) = Acks::spawn(ch.clone());
    let for_loop = acks.clone();
    let run: ConsumerLoop = Box::pin(async move {
        let r = consumers::consume(consumer, for_loop, batch, None, |b, a| handle(b, a)).await;
        (queue, r)
    });
    Ok((ch, acks, run))
}

/// The URL without its password, for logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..scheme + 3], user, &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// Resolves once shutdown is asked for (or nobody can ask any more).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns must not live across an await in a task that is sent
    // between threads, so it is dropped here.
    let _ = shutdown.wait_for(|s| *s).await.map(|_| ());
}
