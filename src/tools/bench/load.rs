//! The load generator: producers that publish the workload's requests and simulated workers
//! that take dispatches and publish completions, both feeding one [`Collector`] that checks
//! and measures what they see. The same code drives the executor and the broker baseline, so
//! the two differ only in what sits between the queues.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use hdrhistogram::Histogram;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Confirmation, Connection};
use tokio::sync::{Notify, mpsc, watch};

use super::measure::{self, Timeline};
use super::plan::Workload;
use super::verify::{Dispatched, Verifier, Violation};
use crate::rabbit::acks::Acks;
use crate::rabbit::{edge, topology};
use crate::tools::{DurationDist, XorShift};

/// A worker queue left behind by a run that died is deleted by the broker after this long
/// unused (`x-expires`), so it does not collect dispatches for ever.
const WORKER_QUEUE_EXPIRES_MS: u32 = 60_000;

/// Errors of the load generator.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the broker refused (nacked) a request the bench published")]
    Nacked,
    #[error("a producer task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("the broker canceled the workers' consumer")]
    ConsumerEnded,
    #[error("opening a connection took longer than {0:?}")]
    OpenTimedOut(Duration),
}

/// What the producers and workers saw, checked and measured. Shared behind one lock: a few
/// thousand short updates a second do not contend.
pub struct Collector {
    inner: Mutex<Inner>,
    /// Completions so far, readable without the lock (progress bar, end of run).
    completed: AtomicU64,
    /// Completions published again for executions that had finished.
    reported_again: AtomicU64,
    total: u64,
    /// Woken when the last execution completes.
    pub done: Notify,
}

struct Inner {
    verifier: Verifier,
    queue_wait: Histogram<u64>,
    completion_to_dispatch: Histogram<u64>,
    to_admission: Histogram<u64>,
    from_admission: Histogram<u64>,
    timeline: Timeline,
    /// The first submission: the run's clock starts here.
    start: Option<Instant>,
    last_completion: Option<Instant>,
    /// Completions reported as failed (the failure rate at work).
    failed: u64,
    /// Every dispatch that arrived; kept only when asked for
    /// ([`Collector::keep_dispatch_log`]), for the chaos run's per-fault figures.
    dispatch_log: Option<Vec<Arrived>>,
}

/// One dispatch as it reached the workers, for the dispatch log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrived {
    pub at: Instant,
    pub kind: Arrival,
    /// Its action, by index in the workload (`None`: not an execution of this run).
    pub action: Option<u32>,
    /// Violations the verifier found in it (order, limit, a copy again).
    pub violations: u32,
    /// When the executor admitted it (its `dispatched_at`), if it said.
    pub admitted: Option<SystemTime>,
}

/// What kind of dispatch arrived, for the dispatch log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Attempt 1.
    First,
    /// A higher attempt of an execution a copy of which had arrived before: a re-send.
    Again,
    /// A higher attempt of an execution no copy of which had arrived: sent with a raised
    /// attempt because the executor could not know whether an earlier copy had left.
    RaisedUnseen,
}

/// What the collector holds at the end of a run.
pub struct Collected {
    pub violations: Vec<Violation>,
    pub violations_total: u64,
    pub submitted: u64,
    pub completed: u64,
    pub failed: u64,
    pub resends: u64,
    /// Of `resends`, those of executions no earlier copy had reached.
    pub raised_unseen: u64,
    /// Copies the broker delivered again (flagged `redelivered`).
    pub redelivered: u64,
    pub foreign: u64,
    pub queue_wait: Histogram<u64>,
    pub completion_to_dispatch: Histogram<u64>,
    /// The hand-off samples split at the executor's `dispatched_at`: completion → admission.
    pub to_admission: Histogram<u64>,
    /// … and admission → the worker received the dispatch.
    pub from_admission: Histogram<u64>,
    pub timeline: Timeline,
    /// First submission → last completion.
    pub elapsed: Duration,
}

impl Collector {
    /// `limits`: hold each action to its limit (not for the broker relay, which has none).
    pub fn new(workload: &Workload, base: u64, interval: Duration, limits: bool) -> Self {
        let actions = workload
            .actions
            .iter()
            .map(|a| (a.name.clone(), if limits { a.limit } else { u32::MAX }))
            .collect();
        let total = workload.total();
        Self {
            inner: Mutex::new(Inner {
                verifier: Verifier::new(base, total as usize, actions),
                queue_wait: measure::latency_histogram(3),
                completion_to_dispatch: measure::latency_histogram(3),
                to_admission: measure::latency_histogram(3),
                from_admission: measure::latency_histogram(3),
                timeline: Timeline::new(interval),
                start: None,
                last_completion: None,
                failed: 0,
                dispatch_log: None,
            }),
            completed: AtomicU64::new(0),
            reported_again: AtomicU64::new(0),
            total,
            done: Notify::new(),
        }
    }

    /// Keeps the arrival time of every dispatch from now on (see [`Collector::dispatch_log`]).
    pub fn keep_dispatch_log(&self) {
        self.lock().dispatch_log.get_or_insert_with(Vec::new);
    }

    /// Every dispatch that arrived, in arrival order; empty unless
    /// [`Collector::keep_dispatch_log`] was called.
    pub fn dispatch_log(&self) -> Vec<Arrived> {
        self.lock().dispatch_log.clone().unwrap_or_default()
    }

    /// The actions (by index) with submitted executions no dispatch has reached yet.
    pub fn waiting_actions(&self) -> Vec<u32> {
        self.lock().verifier.waiting_actions()
    }

    /// Each completed execution and whether it was reported failed.
    pub fn outcomes(&self) -> std::collections::HashMap<u64, bool> {
        self.lock().verifier.outcomes()
    }

    /// The execution ids of the run.
    pub fn id_range(&self) -> std::ops::Range<u64> {
        self.lock().verifier.id_range()
    }

    /// The first submission and the last completion (now, for either not seen yet).
    pub fn span(&self) -> (Instant, Instant) {
        let inner = self.lock();
        let now = Instant::now();
        (
            inner.start.unwrap_or(now),
            inner.last_completion.unwrap_or(now),
        )
    }

    /// Completions the workers published again for executions that had already finished
    /// (a copy of the dispatch came again).
    pub fn reports_again(&self) -> u64 {
        self.reported_again.load(Ordering::Relaxed)
    }

    fn reported_again(&self) {
        self.reported_again.fetch_add(1, Ordering::Relaxed);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere must not hide what was collected.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::Acquire)
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// Whether every execution has completed.
    pub fn finished(&self) -> bool {
        self.completed() >= self.total
    }

    fn submitted(&self, action: u32, id: u64) {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.start.get_or_insert(now);
        inner.verifier.submitted(action as usize, id, now);
    }

    fn dispatched(&self, id: u64, attempt: u32, redelivered: bool, stamps: Stamps) -> Dispatched {
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut inner = self.lock();
        let enqueued_at = stamps.enqueued_at;
        let violations_before = inner.verifier.violations_total();
        let outcome =
            inner
                .verifier
                .dispatched(id, attempt, redelivered, now, enqueued_at, stamps.freed_by);
        let violations = inner.verifier.violations_total() - violations_before;
        if inner.dispatch_log.is_some() {
            let kind = match outcome {
                _ if attempt <= 1 => Arrival::First,
                Dispatched::Run { .. } => Arrival::RaisedUnseen,
                _ => Arrival::Again,
            };
            let action = inner.verifier.action_of(id);
            if let Some(log) = inner.dispatch_log.as_mut() {
                log.push(Arrived {
                    at: now,
                    kind,
                    action,
                    violations: u32::try_from(violations).unwrap_or(u32::MAX),
                    admitted: stamps.dispatched_at,
                });
            }
        }
        if let Dispatched::Run {
            queue_wait,
            since_completion,
        } = outcome
        {
            let since_start = now.saturating_duration_since(inner.start.unwrap_or(now));
            measure::record(&mut inner.queue_wait, queue_wait);
            if let Some(c2d) = since_completion {
                measure::record(&mut inner.completion_to_dispatch, c2d);
                if let Some(admitted) = stamps.dispatched_at {
                    // Both clocks are this machine's; the split is clamped to the sample.
                    let after = wall.duration_since(admitted).unwrap_or_default().min(c2d);
                    measure::record(&mut inner.from_admission, after);
                    measure::record(&mut inner.to_admission, c2d - after);
                }
            }
            inner
                .timeline
                .dispatch(since_start, queue_wait, since_completion);
        }
        outcome
    }

    fn completing(&self, id: u64, failed: bool) -> bool {
        let now = Instant::now();
        let first = {
            let mut inner = self.lock();
            let first = inner.verifier.completed(id, failed, now, SystemTime::now());
            if first {
                let since_start = now.saturating_duration_since(inner.start.unwrap_or(now));
                inner.timeline.completion(since_start);
                inner.last_completion = Some(now);
                inner.failed += u64::from(failed);
            }
            first
        };
        if first && self.completed.fetch_add(1, Ordering::AcqRel) + 1 >= self.total {
            self.done.notify_one();
        }
        first
    }

    fn undecodable(&self, detail: String) {
        self.lock().verifier.undecodable(detail);
    }

    /// Records the measured process's RSS in the timeline.
    pub fn sample_rss(&self, kb: u64) {
        let mut inner = self.lock();
        if let Some(start) = inner.start {
            inner.timeline.rss(start.elapsed(), kb);
        }
    }

    /// Seconds since the first submission.
    pub fn elapsed(&self) -> Duration {
        self.lock().start.map(|s| s.elapsed()).unwrap_or_default()
    }

    /// Ends the run: adds what is missing to the violations and hands everything over.
    pub fn finish(&self) -> Collected {
        let mut inner = self.lock();
        let (violations, violations_total) = inner.verifier.finish();
        let elapsed = match (inner.start, inner.last_completion) {
            (Some(s), Some(e)) => e.saturating_duration_since(s),
            _ => Duration::ZERO,
        };
        let timeline = std::mem::replace(&mut inner.timeline, Timeline::new(Duration::ZERO));
        Collected {
            violations,
            violations_total,
            submitted: inner.verifier.submitted_count(),
            completed: inner.verifier.completed_count(),
            failed: inner.failed,
            resends: inner.verifier.resends(),
            raised_unseen: inner.verifier.raised_unseen(),
            redelivered: inner.verifier.redelivered(),
            foreign: inner.verifier.foreign(),
            queue_wait: inner.queue_wait.clone(),
            completion_to_dispatch: inner.completion_to_dispatch.clone(),
            to_admission: inner.to_admission.clone(),
            from_admission: inner.from_admission.clone(),
            timeline,
            elapsed,
        }
    }
}

/// How long the producers and workers wait before connecting again after losing their
/// connection (a broker restart, a connection closed by an operator).
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);

/// Longest a producer or worker connection may take to open, channels and all: a broker in
/// the middle of starting can accept the TCP connection and never finish the handshake.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// `open`, given up after [`OPEN_TIMEOUT`].
async fn within<T>(
    open: impl std::future::Future<Output = Result<T, LoadError>>,
) -> Result<T, LoadError> {
    tokio::time::timeout(OPEN_TIMEOUT, open)
        .await
        .unwrap_or(Err(LoadError::OpenTimedOut(OPEN_TIMEOUT)))
}

/// Publishes the workload's requests from `workload.producers` channels of one connection,
/// at most `window` awaiting their confirm per channel. `base` is the first execution id.
///
/// The producers outlive a lost connection, as a careful real producer would: they connect
/// again and publish once more every request whose confirm had not come, under the same
/// execution id (the executor answers a copy it already has as a duplicate), then go on.
/// Each action's requests leave from one channel in order, and a lost connection loses only
/// a suffix of what a channel published, so the copies keep each action's order. Nothing is
/// given up on: a request counts as submitted once it is recorded, and the run checks that
/// it ends.
pub async fn produce(
    url: String,
    workload: Arc<Workload>,
    base: u64,
    window: usize,
    collector: Arc<Collector>,
) -> Result<(), LoadError> {
    let offsets = Arc::new(workload.offsets());
    let start = tokio::time::Instant::now();
    let mut states: Vec<ProducerState> = (0..workload.producers)
        .map(|p| ProducerState {
            sequence: workload.sequence(p),
            next: 0,
            unconfirmed: VecDeque::new(),
        })
        .collect();
    loop {
        let connected =
            within(async { Ok(edge::connect(&url, "fifo-executor bench producers").await?) }).await;
        let conn = match connected {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "bench producers cannot connect; trying again");
                tokio::time::sleep(RECONNECT_PAUSE).await;
                continue;
            }
        };
        let mut tasks = Vec::new();
        for state in states.drain(..) {
            let job = Producer {
                workload: workload.clone(),
                offsets: offsets.clone(),
                base,
                window: window.max(1),
                start,
                collector: collector.clone(),
            };
            let conn = &conn;
            tasks.push(async move {
                match within(async { Ok(open_confirm_channel(conn).await?) }).await {
                    Ok(ch) => job.run(ch, state).await,
                    Err(e) => (state, Err(e)),
                }
            });
        }
        let mut failure = None;
        for (state, result) in futures::future::join_all(tasks).await {
            if let Err(e) = result {
                failure = Some(e);
            }
            states.push(state);
        }
        match failure {
            None => {
                let _ = conn.close(200, "producers done".into()).await;
                return Ok(());
            }
            Some(e) => {
                tracing::warn!(error = %e, "bench producers lost their connection; publishing \
                    what was not confirmed again");
                let _ = conn.close(200, "producers reconnecting".into()).await;
                tokio::time::sleep(RECONNECT_PAUSE).await;
            }
        }
    }
}

async fn open_confirm_channel(conn: &Connection) -> Result<Channel, lapin::Error> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(ch)
}

/// One producer's progress, kept across connections.
struct ProducerState {
    /// What it publishes, in order: (action index, execution number within the action).
    sequence: Vec<(u32, u64)>,
    /// Index in `sequence` of the next request never published.
    next: usize,
    /// Published and not yet confirmed, oldest first: (execution id, body).
    unconfirmed: VecDeque<(u64, Vec<u8>)>,
}

/// What every producer shares.
struct Producer {
    workload: Arc<Workload>,
    offsets: Arc<Vec<u64>>,
    base: u64,
    window: usize,
    /// When the run's producers started: requests are due from here.
    start: tokio::time::Instant,
    collector: Arc<Collector>,
}

impl Producer {
    /// Publishes on `ch` until the sequence is done and confirmed, or the channel fails;
    /// hands the state back either way.
    async fn run(
        &self,
        ch: Channel,
        mut st: ProducerState,
    ) -> (ProducerState, Result<(), LoadError>) {
        let result = self.publish_all(&ch, &mut st).await;
        (st, result)
    }

    async fn publish_all(&self, ch: &Channel, st: &mut ProducerState) -> Result<(), LoadError> {
        let mut confirms = FuturesOrdered::new();
        // Copies of what a lost connection left unconfirmed go first, in their order.
        let again: Vec<(u64, Vec<u8>)> = st.unconfirmed.drain(..).collect();
        for (id, body) in again {
            let confirm = publish_request(ch, &body).await;
            st.unconfirmed.push_back((id, body));
            confirms.push_back(confirm?);
            while confirms.len() >= self.window {
                confirmed(confirms.next().await, st)?;
            }
        }
        while let Some(&(a, k)) = st.sequence.get(st.next) {
            if let Some(due) = self.workload.due(st.next as u64) {
                tokio::time::sleep_until(self.start + due).await;
            }
            let id = self.base + self.offsets[a as usize] + k;
            let body = serde_json::json!({
                "execution_id": id,
                "action_ref": self.workload.actions[a as usize].name,
                "request_id": format!("bench-{id}"),
                "parameters": {"n": k},
            });
            let body = serde_json::to_vec(&body).unwrap_or_default();
            // Recorded before publishing, so the dispatch can never arrive first.
            self.collector.submitted(a, id);
            st.next += 1;
            let confirm = publish_request(ch, &body).await;
            st.unconfirmed.push_back((id, body));
            confirms.push_back(confirm?);
            while confirms.len() >= self.window {
                confirmed(confirms.next().await, st)?;
            }
        }
        while !confirms.is_empty() {
            confirmed(confirms.next().await, st)?;
        }
        Ok(())
    }
}

async fn publish_request(ch: &Channel, body: &[u8]) -> Result<lapin::PublisherConfirm, LoadError> {
    Ok(ch
        .basic_publish(
            topology::EXCHANGE.into(),
            topology::REQUESTED_ROUTING_KEY.into(),
            BasicPublishOptions::default(),
            body,
            crate::tools::persistent_json(),
        )
        .await?)
}

/// Takes the oldest unconfirmed request off the list once the broker confirmed it.
fn confirmed(
    c: Option<lapin::Result<Confirmation>>,
    st: &mut ProducerState,
) -> Result<(), LoadError> {
    match c {
        Some(Ok(Confirmation::Nack(_))) => Err(LoadError::Nacked),
        Some(Err(e)) => Err(e.into()),
        _ => {
            st.unconfirmed.pop_front();
            Ok(())
        }
    }
}

/// How the simulated workers behave.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Their own queue, bound to every dispatch.
    pub queue: String,
    /// Dispatches taken at once (the queue's prefetch).
    pub prefetch: u16,
    pub duration: DurationDist,
    pub failure_rate: f64,
}

/// Simulated workers, bound and consuming, ready before anything is submitted. They behave
/// as real workers that key on `execution_id`: a copy of an execution they already finished
/// gets its outcome reported again, a copy of one still running is left alone, and a lost
/// connection is opened again (what they had not acknowledged comes back from the broker).
pub struct Workers {
    url: String,
    session: WorkerSession,
    settings: WorkerSettings,
}

/// One connection of the workers.
struct WorkerSession {
    conn: Connection,
    consumer: lapin::Consumer,
    consume_ch: Channel,
    publish: Channel,
}

impl WorkerSession {
    async fn open(url: &str, settings: &WorkerSettings) -> Result<Self, LoadError> {
        let conn = edge::connect(url, "fifo-executor bench workers").await?;
        let ch = conn.create_channel().await?;
        let mut args = FieldTable::default();
        args.insert(
            "x-expires".into(),
            AMQPValue::LongUInt(WORKER_QUEUE_EXPIRES_MS),
        );
        crate::tools::declare_dispatch_queue(&ch, &settings.queue, "#", args).await?;
        ch.basic_qos(settings.prefetch.max(1), BasicQosOptions::default())
            .await?;
        let publish = open_confirm_channel(&conn).await?;
        let consumer = ch
            .basic_consume(
                settings.queue.as_str().into(),
                "fifo-executor-bench-worker".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Self {
            conn,
            consumer,
            consume_ch: ch,
            publish,
        })
    }
}

impl Workers {
    /// Declares the workers' queue (durable, like a real worker's) and starts consuming.
    pub async fn connect(url: &str, settings: WorkerSettings) -> Result<Self, LoadError> {
        let session = within(WorkerSession::open(url, &settings)).await?;
        Ok(Self {
            url: url.to_owned(),
            session,
            settings,
        })
    }

    /// Works until `stop` turns true, then deletes the queue and closes the connection.
    pub async fn run(
        self,
        collector: Arc<Collector>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), LoadError> {
        let Workers {
            url,
            mut session,
            settings,
        } = self;
        let mut rng = XorShift::seeded();
        loop {
            let lost = work(&mut session, &settings, &collector, &mut stop, &mut rng).await;
            let Err(e) = lost else { break };
            tracing::warn!(error = %e, "bench workers lost their connection; connecting again");
            let _ = session.conn.close(200, "workers reconnecting".into()).await;
            session = loop {
                tokio::select! {
                    _ = tokio::time::sleep(RECONNECT_PAUSE) => {}
                    _ = stop.wait_for(|s| *s) => return Ok(()),
                }
                let opened = tokio::select! {
                    opened = within(WorkerSession::open(&url, &settings)) => opened,
                    _ = stop.wait_for(|s| *s) => return Ok(()),
                };
                match opened {
                    Ok(s) => break s,
                    Err(e) => tracing::debug!(error = %e, "bench workers cannot connect yet"),
                }
            };
        }
        let _ = session
            .consume_ch
            .queue_delete(
                settings.queue.as_str().into(),
                QueueDeleteOptions::default(),
            )
            .await;
        let _ = session.conn.close(200, "workers done".into()).await;
        Ok(())
    }
}

/// Works one session until `stop` turns true (`Ok`) or its connection is lost (`Err`).
async fn work(
    session: &mut WorkerSession,
    settings: &WorkerSettings,
    collector: &Arc<Collector>,
    stop: &mut watch::Receiver<bool>,
    rng: &mut XorShift,
) -> Result<(), LoadError> {
    let (acks, _ack_task) = Acks::spawn(session.consume_ch.clone());
    // Each dispatch is acknowledged once its completion is confirmed: a worker that
    // crashed in between would get the dispatch again rather than lose the completion.
    let (confirm_tx, mut confirm_rx) = mpsc::unbounded_channel::<(lapin::PublisherConfirm, u64)>();
    let confirm_acks = acks.clone();
    let confirm_task = tokio::spawn(async move {
        while let Some((confirm, tag)) = confirm_rx.recv().await {
            if confirm.await.is_err() {
                return;
            }
            confirm_acks.ack(tag);
        }
    });
    let result = loop {
        let delivery = tokio::select! {
            d = session.consumer.next() => d,
            _ = stop.wait_for(|s| *s) => break Ok(()),
        };
        let d = match delivery {
            None => break Err(LoadError::ConsumerEnded),
            Some(Err(e)) => break Err(e.into()),
            Some(Ok(d)) => d,
        };
        let tag = d.delivery_tag;
        acks.track(tag);
        let (id, attempt, stamps) = match read_dispatch(&d.data, d.properties.headers()) {
            Ok(x) => x,
            Err(e) => {
                collector.undecodable(e);
                acks.ack(tag);
                continue;
            }
        };
        let job = Completing {
            id,
            tag,
            failed: false,
            took: Duration::ZERO,
            again: false,
            publish: session.publish.clone(),
            collector: collector.clone(),
            acks: acks.clone(),
            confirms: confirm_tx.clone(),
        };
        match collector.dispatched(id, attempt, d.redelivered, stamps) {
            Dispatched::Skip => acks.ack(tag),
            Dispatched::Report { failed } => {
                Completing {
                    failed,
                    again: true,
                    ..job
                }
                .finish()
                .await
            }
            Dispatched::Run { .. } => {
                let took = settings.duration.sample(rng);
                let job = Completing {
                    failed: rng.unit() < settings.failure_rate,
                    took,
                    ..job
                };
                if took.is_zero() {
                    job.finish().await;
                } else {
                    tokio::spawn(async move {
                        tokio::time::sleep(took).await;
                        job.finish().await;
                    });
                }
            }
        }
    };
    drop(confirm_tx);
    confirm_task.abort();
    result
}

/// A simulated execution that has finished and is about to report.
struct Completing {
    id: u64,
    tag: u64,
    failed: bool,
    took: Duration,
    /// Its outcome was reported before: report it again, without counting it again.
    again: bool,
    publish: Channel,
    collector: Arc<Collector>,
    acks: Acks,
    confirms: mpsc::UnboundedSender<(lapin::PublisherConfirm, u64)>,
}

impl Completing {
    async fn finish(self) {
        // Counted as no longer running before the completion leaves: the executor cannot
        // dispatch the next one before it has it.
        if self.again {
            self.collector.reported_again();
        } else if !self.collector.completing(self.id, self.failed) {
            self.acks.ack(self.tag);
            return;
        }
        let body = crate::tools::completion_body(self.id.into(), self.failed, self.took);
        match self
            .publish
            .basic_publish(
                topology::EXCHANGE.into(),
                topology::COMPLETED_ROUTING_KEY.into(),
                BasicPublishOptions::default(),
                &body,
                crate::tools::persistent_json(),
            )
            .await
        {
            Ok(confirm) => {
                let _ = self.confirms.send((confirm, self.tag));
            }
            // The connection is lost: the dispatch stays unacknowledged, comes back from the
            // broker, and its outcome is reported again then.
            Err(e) => {
                tracing::debug!(error = %e, execution_id = self.id, "completion not published")
            }
        }
    }
}

/// When the executor says it accepted and admitted an execution (its dispatch's
/// `enqueued_at` and `dispatched_at`), where it says, and which completion freed the slot it
/// took (the header `x-freed-by`), if one did.
#[derive(Debug, Clone, Copy, Default)]
struct Stamps {
    enqueued_at: Option<SystemTime>,
    dispatched_at: Option<SystemTime>,
    freed_by: Option<u64>,
}

/// The execution id in a dispatch's `x-freed-by` header, whatever integer type carries it.
fn freed_by(headers: &Option<lapin::types::FieldTable>) -> Option<u64> {
    use lapin::types::AMQPValue;
    let value = headers
        .as_ref()?
        .inner()
        .get(crate::rabbit::publisher::FREED_BY_HEADER)?;
    match value {
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongUInt(v) => Some(u64::from(*v)),
        AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
        _ => None,
    }
}

/// `(execution_id, attempt, stamps)` of a dispatch.
fn read_dispatch(
    body: &[u8],
    headers: &Option<lapin::types::FieldTable>,
) -> Result<(u64, u32, Stamps), String> {
    #[derive(serde::Deserialize)]
    struct Wire {
        execution_id: u64,
        attempt: u32,
        enqueued_at: Option<chrono::DateTime<chrono::Utc>>,
        dispatched_at: Option<chrono::DateTime<chrono::Utc>>,
    }
    serde_json::from_slice::<Wire>(body)
        .map(|w| {
            (
                w.execution_id,
                w.attempt,
                Stamps {
                    enqueued_at: w.enqueued_at.map(SystemTime::from),
                    dispatched_at: w.dispatched_at.map(SystemTime::from),
                    freed_by: freed_by(headers),
                },
            )
        })
        .map_err(|e| {
            format!(
                "{e}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            )
        })
}
