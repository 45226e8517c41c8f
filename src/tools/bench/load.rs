//! The load generator: producers that publish the workload's requests and simulated workers
//! that take dispatches and publish completions, both feeding one [`Collector`] that checks
//! and measures what they see. The same code drives the executor and the broker baseline, so
//! the two differ only in what sits between the queues.

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
}

/// What the producers and workers saw, checked and measured. Shared behind one lock: a few
/// thousand short updates a second do not contend.
pub struct Collector {
    inner: Mutex<Inner>,
    /// Completions so far, readable without the lock (progress bar, end of run).
    completed: AtomicU64,
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
}

/// What the collector holds at the end of a run.
pub struct Collected {
    pub violations: Vec<Violation>,
    pub violations_total: u64,
    pub submitted: u64,
    pub completed: u64,
    pub failed: u64,
    pub resends: u64,
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
            }),
            completed: AtomicU64::new(0),
            total,
            done: Notify::new(),
        }
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

    fn dispatched(&self, id: u64, attempt: u32, stamps: Stamps) -> Dispatched {
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut inner = self.lock();
        let enqueued_at = stamps.enqueued_at;
        let outcome = inner.verifier.dispatched(id, attempt, now, enqueued_at);
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
            let first = inner.verifier.completed(id, now, SystemTime::now());
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

/// Publishes the workload's requests from `workload.producers` channels of one connection,
/// at most `window` awaiting their confirm per channel. `base` is the first execution id.
pub async fn produce(
    url: String,
    workload: Arc<Workload>,
    base: u64,
    window: usize,
    collector: Arc<Collector>,
) -> Result<(), LoadError> {
    let conn = edge::connect(&url, "fifo-executor bench producers").await?;
    let offsets = Arc::new(workload.offsets());
    let mut tasks = Vec::new();
    for p in 0..workload.producers {
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        tasks.push(tokio::spawn(producer(
            ch,
            p,
            workload.clone(),
            offsets.clone(),
            base,
            window.max(1),
            collector.clone(),
        )));
    }
    let mut result = Ok(());
    for t in tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(e),
            Err(join) => result = Err(join.into()),
        }
    }
    let _ = conn.close(200, "producers done".into()).await;
    result
}

async fn producer(
    ch: Channel,
    p: u16,
    workload: Arc<Workload>,
    offsets: Arc<Vec<u64>>,
    base: u64,
    window: usize,
    collector: Arc<Collector>,
) -> Result<(), LoadError> {
    let start = tokio::time::Instant::now();
    let mut confirms = FuturesOrdered::new();
    for (j, (a, k)) in workload.sequence(p).into_iter().enumerate() {
        if let Some(due) = workload.due(j as u64) {
            tokio::time::sleep_until(start + due).await;
        }
        let id = base + offsets[a as usize] + k;
        let body = serde_json::json!({
            "execution_id": id,
            "action_ref": workload.actions[a as usize].name,
            "request_id": format!("bench-{id}"),
            "parameters": {"n": k},
        });
        // Recorded before publishing, so the dispatch can never arrive first.
        collector.submitted(a, id);
        let confirm = ch
            .basic_publish(
                topology::EXCHANGE.into(),
                topology::REQUESTED_ROUTING_KEY.into(),
                BasicPublishOptions::default(),
                &serde_json::to_vec(&body).unwrap_or_default(),
                crate::tools::persistent_json(),
            )
            .await?;
        confirms.push_back(confirm);
        while confirms.len() >= window {
            confirmed(confirms.next().await)?;
        }
    }
    while !confirms.is_empty() {
        confirmed(confirms.next().await)?;
    }
    Ok(())
}

fn confirmed(c: Option<lapin::Result<Confirmation>>) -> Result<(), LoadError> {
    match c {
        Some(Ok(Confirmation::Nack(_))) => Err(LoadError::Nacked),
        Some(Err(e)) => Err(e.into()),
        _ => Ok(()),
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

/// Simulated workers, bound and consuming, ready before anything is submitted.
pub struct Workers {
    conn: Connection,
    consumer: lapin::Consumer,
    consume_ch: Channel,
    publish: Channel,
    settings: WorkerSettings,
}

impl Workers {
    /// Declares the workers' queue (durable, like a real worker's) and starts consuming.
    pub async fn connect(url: &str, settings: WorkerSettings) -> Result<Self, LoadError> {
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
        let publish = conn.create_channel().await?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
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
            settings,
        })
    }

    /// Works until `stop` turns true, then deletes the queue and closes the connection.
    pub async fn run(
        mut self,
        collector: Arc<Collector>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), LoadError> {
        let (acks, _ack_task) = Acks::spawn(self.consume_ch.clone());
        // Each dispatch is acknowledged once its completion is confirmed: a worker that
        // crashed in between would get the dispatch again rather than lose the completion.
        let (confirm_tx, mut confirm_rx) =
            mpsc::unbounded_channel::<(lapin::PublisherConfirm, u64)>();
        let confirm_acks = acks.clone();
        let confirm_task = tokio::spawn(async move {
            while let Some((confirm, tag)) = confirm_rx.recv().await {
                if confirm.await.is_err() {
                    return;
                }
                confirm_acks.ack(tag);
            }
        });
        let mut rng = XorShift::seeded();
        let result = loop {
            let delivery = tokio::select! {
                d = self.consumer.next() => d,
                _ = stop.wait_for(|s| *s) => break Ok(()),
            };
            let d = match delivery {
                None => break Ok(()),
                Some(Err(e)) => break Err(e.into()),
                Some(Ok(d)) => d,
            };
            let tag = d.delivery_tag;
            acks.track(tag);
            let (id, attempt, stamps) = match read_dispatch(&d.data) {
                Ok(x) => x,
                Err(e) => {
                    collector.undecodable(e);
                    acks.ack(tag);
                    continue;
                }
            };
            if collector.dispatched(id, attempt, stamps) == Dispatched::Skip {
                acks.ack(tag);
                continue;
            }
            let took = self.settings.duration.sample(&mut rng);
            let failed = rng.unit() < self.settings.failure_rate;
            let job = Completing {
                id,
                tag,
                failed,
                took,
                publish: self.publish.clone(),
                collector: collector.clone(),
                acks: acks.clone(),
                confirms: confirm_tx.clone(),
            };
            if took.is_zero() {
                job.finish().await;
            } else {
                tokio::spawn(async move {
                    tokio::time::sleep(took).await;
                    job.finish().await;
                });
            }
        };
        drop(confirm_tx);
        confirm_task.abort();
        let _ = self
            .consume_ch
            .queue_delete(
                self.settings.queue.as_str().into(),
                QueueDeleteOptions::default(),
            )
            .await;
        let _ = self.conn.close(200, "workers done".into()).await;
        result
    }
}

/// A simulated execution that has finished and is about to report.
struct Completing {
    id: u64,
    tag: u64,
    failed: bool,
    took: Duration,
    publish: Channel,
    collector: Arc<Collector>,
    acks: Acks,
    confirms: mpsc::UnboundedSender<(lapin::PublisherConfirm, u64)>,
}

impl Completing {
    async fn finish(self) {
        // Counted as no longer running before the completion leaves: the executor cannot
        // dispatch the next one before it has it.
        if !self.collector.completing(self.id, self.failed) {
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
            Err(e) => {
                tracing::warn!(error = %e, execution_id = self.id, "completion not published")
            }
        }
    }
}

/// When the executor says it accepted and admitted an execution (its dispatch's
/// `enqueued_at` and `dispatched_at`), where it says.
#[derive(Debug, Clone, Copy, Default)]
struct Stamps {
    enqueued_at: Option<SystemTime>,
    dispatched_at: Option<SystemTime>,
}

/// `(execution_id, attempt, stamps)` of a dispatch body.
fn read_dispatch(body: &[u8]) -> Result<(u64, u32, Stamps), String> {
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
