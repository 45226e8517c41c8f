//! Test workers that behave like real ones, and the producer that feeds them.
//!
//! The workers treat `execution_id` as the idempotency key, as the contract asks: an
//! execution runs once however often it is dispatched. What an observer outside the executor
//! can check is recorded in a [`Record`]: the order of first dispatches per action, how many
//! executions of an action ran at once, and every dispatch that came again. A dispatch that
//! comes again with a higher `attempt` is a re-send (allowed, counted); one that comes again
//! without a higher `attempt` means the executor lost track that it had already sent it.

use std::collections::{HashMap, HashSet};
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fifo_executor::rabbit::topology;
use fifo_executor::tools::XorShift;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{Value, json};

use super::poll_until;

/// What the workers did with one execution.
struct Run {
    /// The highest `attempt` any dispatch of it carried.
    highest_attempt: u32,
    /// The status its completion reported, once it finished.
    outcome: Option<&'static str>,
}

/// Everything the workers saw.
#[derive(Default)]
pub struct Record {
    /// Per action, execution ids in the order of their first dispatch.
    pub first_order: HashMap<String, Vec<u64>>,
    /// Every execution dispatched at least once: the idempotency record a real worker keeps.
    runs: HashMap<u64, Run>,
    /// Per action, executions running now.
    active: HashMap<String, u32>,
    /// Per action, the most that ever ran at once.
    pub most_active: HashMap<String, u32>,
    /// `(action, execution id, running at once)` whenever a start exceeded the action's limit.
    pub over_limit: Vec<(String, u64, u32)>,
    /// Dispatches of an execution already seen, with a higher attempt: re-sends.
    pub resends: u64,
    /// `(execution id, attempt)` of dispatches of an execution already seen without a higher
    /// attempt.
    pub repeats: Vec<(u64, u32)>,
    /// Dispatches the broker delivered again (flagged `redelivered`) because the workers had
    /// not acknowledged them when their connection was lost: the broker's doing, not the
    /// executor's, and so not repeats.
    pub redelivered: u64,
    /// `(execution id, attempt)` of dispatches taken on the current connection.
    taken: HashSet<(u64, u32)>,
    /// Those taken on connections since lost: the only dispatches the broker may deliver
    /// again (those not acknowledged in time; an acknowledgement sent just before the loss
    /// may never have arrived, so all are excused, each once).
    excused: HashSet<(u64, u32)>,
    /// Executions that finished (their completion is published).
    pub finished: usize,
}

impl Record {
    /// The status each finished execution reported.
    pub fn outcomes(&self) -> HashMap<u64, &'static str> {
        self.runs
            .iter()
            .filter_map(|(id, r)| r.outcome.map(|o| (*id, o)))
            .collect()
    }

    /// Every way in which what the workers saw breaks the executor's promises, given what
    /// was submitted per action (in submission order) and each action's limit; empty when
    /// none.
    pub fn violations(
        &self,
        submitted: &HashMap<String, Vec<u64>>,
        limits: &HashMap<String, u32>,
    ) -> Vec<String> {
        let mut out = Vec::new();
        for (action, ids) in submitted {
            let seen = self.first_order.get(action).map_or(&[][..], Vec::as_slice);
            if let Some(i) = (0..ids.len().max(seen.len())).find(|&i| ids.get(i) != seen.get(i)) {
                out.push(format!(
                    "{action}: first dispatches out of submission order from position {i}: \
                     expected {:?}, got {:?} ({} submitted, {} dispatched)",
                    &ids[i.min(ids.len())..(i + 5).min(ids.len())],
                    &seen[i.min(seen.len())..(i + 5).min(seen.len())],
                    ids.len(),
                    seen.len()
                ));
            }
            let unfinished: Vec<u64> = ids
                .iter()
                .copied()
                .filter(|id| self.runs.get(id).is_none_or(|r| r.outcome.is_none()))
                .collect();
            if !unfinished.is_empty() {
                out.push(format!(
                    "{action}: {} executions never finished: {}",
                    unfinished.len(),
                    some(&unfinished)
                ));
            }
            let limit = limits.get(action).copied().unwrap_or(1);
            let most = self.most_active.get(action).copied().unwrap_or(0);
            if most > limit {
                let ids: Vec<u64> = self
                    .over_limit
                    .iter()
                    .filter(|(a, _, _)| a == action)
                    .map(|(_, id, _)| *id)
                    .collect();
                out.push(format!(
                    "{action}: {most} ran at once, limit {limit}; started over the limit: {}",
                    some(&ids)
                ));
            }
        }
        if !self.repeats.is_empty() {
            out.push(format!(
                "{} dispatches came again without a higher attempt (execution id, attempt): {:?}",
                self.repeats.len(),
                &self.repeats[..self.repeats.len().min(20)]
            ));
        }
        out
    }
}

/// The first ids of a list, and how many there are.
fn some(ids: &[u64]) -> String {
    format!(
        "{:?}{}",
        &ids[..ids.len().min(20)],
        if ids.len() > 20 { " …" } else { "" }
    )
}

/// How the test workers work.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Each execution takes a random time in this range, in milliseconds.
    pub duration_ms: RangeInclusive<u64>,
    /// Share of executions reported `failed`.
    pub failure_rate: f64,
    /// Per action, the limit a start is checked against as it happens.
    pub limits: HashMap<String, u32>,
}

/// Test workers consuming every dispatch from a queue of their own.
pub struct Fleet {
    /// What the workers saw, shared with the consuming task.
    pub record: Arc<Mutex<Record>>,
    /// The consuming task; aborted when the fleet is dropped.
    task: tokio::task::JoinHandle<()>,
}

impl Fleet {
    /// Declares the workers' queue (bound to every dispatch) and starts consuming it. The
    /// executor must have declared its exchange already. The workers outlive a lost
    /// connection (a broker restart): they connect again and go on, and what they had not
    /// acknowledged comes back from the broker.
    pub async fn start(url: &str, queue: &str, settings: WorkerSettings) -> Fleet {
        let record = Arc::new(Mutex::new(Record::default()));
        let session = WorkerSession::open(url, queue)
            .await
            .expect("the workers' first connection");
        let task = tokio::spawn(serve(
            url.to_owned(),
            queue.to_owned(),
            session,
            settings,
            record.clone(),
        ));
        Fleet { record, task }
    }

    /// Executions finished so far.
    pub fn finished(&self) -> usize {
        self.record.lock().expect("record").finished
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One connection of the workers: its dispatch consumer and its completion publisher.
struct WorkerSession {
    conn: Connection,
    consumer: lapin::Consumer,
    publisher: Channel,
}

impl WorkerSession {
    async fn open(url: &str, queue: &str) -> Result<WorkerSession, lapin::Error> {
        let conn = Connection::connect(url, ConnectionProperties::default()).await?;
        let ch = conn.create_channel().await?;
        declare_worker_queue(&ch, queue).await?;
        ch.basic_qos(1000, BasicQosOptions::default()).await?;
        let publisher = conn.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let consumer = ch
            .basic_consume(
                queue.into(),
                "test-fleet".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(WorkerSession {
            conn,
            consumer,
            publisher,
        })
    }
}

/// Works through sessions: when one ends (its connection lost), opens the next, trying every
/// 200 ms.
async fn serve(
    url: String,
    queue: String,
    mut session: WorkerSession,
    settings: WorkerSettings,
    record: Arc<Mutex<Record>>,
) {
    let rng = Arc::new(Mutex::new(XorShift::seeded()));
    loop {
        work(session, &settings, &record, &rng).await;
        {
            // What was not acknowledged comes back from the broker, flagged `redelivered`.
            let mut guard = record.lock().expect("record");
            let r = &mut *guard;
            let lost: Vec<(u64, u32)> = r.taken.drain().collect();
            r.excused.extend(lost);
        }
        session = loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if let Ok(s) = WorkerSession::open(&url, &queue).await {
                break s;
            }
        };
    }
}

/// What a worker does with a dispatch.
enum Plan {
    /// A first dispatch: run it.
    Run(&'static str, Duration),
    /// Seen before and finished: report the same outcome again, so the executor can free the
    /// slot it holds for it.
    Report(&'static str),
    /// Seen before and still running: its completion will come.
    Nothing,
}

/// Runs the dispatches of one session until its connection is lost.
async fn work(
    session: WorkerSession,
    settings: &WorkerSettings,
    record: &Arc<Mutex<Record>>,
    rng: &Arc<Mutex<XorShift>>,
) {
    let WorkerSession {
        conn: _conn,
        mut consumer,
        publisher,
    } = session;
    while let Some(Ok(delivery)) = consumer.next().await {
        let v: Value = serde_json::from_slice(&delivery.data).expect("a dispatch is JSON");
        let id = v["execution_id"].as_u64().expect("execution_id");
        let action = v["action_ref"].as_str().expect("action_ref").to_owned();
        let attempt = v["attempt"]
            .as_u64()
            .and_then(|a| u32::try_from(a).ok())
            .expect("attempt");
        let plan = {
            let mut guard = record.lock().expect("record");
            let r = &mut *guard;
            match r.runs.get_mut(&id) {
                Some(run) => {
                    if attempt > run.highest_attempt {
                        run.highest_attempt = attempt;
                        r.resends += 1;
                    } else if delivery.redelivered && r.excused.remove(&(id, attempt)) {
                        r.redelivered += 1;
                    } else {
                        r.repeats.push((id, attempt));
                    }
                    match r.runs.get(&id).and_then(|run| run.outcome) {
                        Some(outcome) => Plan::Report(outcome),
                        None => Plan::Nothing,
                    }
                }
                None => {
                    r.runs.insert(
                        id,
                        Run {
                            highest_attempt: attempt,
                            outcome: None,
                        },
                    );
                    r.first_order.entry(action.clone()).or_default().push(id);
                    let now = {
                        let a = r.active.entry(action.clone()).or_default();
                        *a += 1;
                        *a
                    };
                    let most = r.most_active.entry(action.clone()).or_default();
                    *most = (*most).max(now);
                    if now > settings.limits.get(&action).copied().unwrap_or(1) {
                        r.over_limit.push((action.clone(), id, now));
                    }
                    let mut rng = rng.lock().expect("rng");
                    let (lo, hi) = (*settings.duration_ms.start(), *settings.duration_ms.end());
                    let ms = lo + rng.next_u64() % (hi - lo + 1);
                    let outcome = if rng.unit() < settings.failure_rate {
                        "failed"
                    } else {
                        "succeeded"
                    };
                    Plan::Run(outcome, Duration::from_millis(ms))
                }
            }
        };
        record.lock().expect("record").taken.insert((id, attempt));
        let publisher = publisher.clone();
        let record = record.clone();
        let action = action.clone();
        tokio::spawn(async move {
            let outcome = match plan {
                Plan::Nothing => None,
                Plan::Report(outcome) => Some(outcome),
                Plan::Run(outcome, took) => {
                    // Simulated work.
                    tokio::time::sleep(took).await;
                    // Counted as finished before the completion leaves, so that the count of
                    // running executions can only be lower than what the executor holds.
                    let mut guard = record.lock().expect("record");
                    let r = &mut *guard;
                    if let Some(a) = r.active.get_mut(&action) {
                        *a -= 1;
                    }
                    if let Some(run) = r.runs.get_mut(&id) {
                        run.outcome = Some(outcome);
                    }
                    r.finished += 1;
                    Some(outcome)
                }
            };
            if let Some(outcome) = outcome {
                let body = json!({"execution_id": id, "status": outcome, "result": {"by": "test"}});
                let sent = try_publish(
                    &publisher,
                    topology::COMPLETED_ROUTING_KEY,
                    body.to_string().as_bytes(),
                    json_props(),
                )
                .await;
                if sent.is_err() {
                    // The connection is lost: the dispatch stays unacknowledged, comes back
                    // from the broker, and its outcome is reported again then.
                    return;
                }
            }
            // Only once the completion is with the broker.
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
        });
    }
}

/// Declares a queue of the test's own bound to every dispatch, as a worker's would be.
pub async fn worker_queue(ch: &Channel, name: &str) {
    declare_worker_queue(ch, name)
        .await
        .expect("declare and bind a worker queue");
}

async fn declare_worker_queue(ch: &Channel, name: &str) -> Result<(), lapin::Error> {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.queue_bind(
        name.into(),
        topology::EXCHANGE.into(),
        "execution.dispatch.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
}

/// Declares a server-named exclusive queue for `reply_to` answers and returns its name.
pub async fn reply_queue(ch: &Channel) -> lapin::types::ShortString {
    ch.queue_declare(
        "".into(),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("reply queue")
    .name()
    .clone()
}

pub async fn connect(url: &str) -> Connection {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("a test connection to RabbitMQ")
}

pub async fn confirm_channel(conn: &Connection) -> Channel {
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    ch
}

pub fn json_props() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
}

/// Publishes one message and waits for the broker's confirm; an error when the connection is
/// lost or the broker refuses it.
pub async fn try_publish(
    ch: &Channel,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
) -> Result<(), String> {
    let confirm = ch
        .basic_publish(
            topology::EXCHANGE.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    if confirm.is_nack() {
        return Err("nacked by the broker".to_owned());
    }
    Ok(())
}

/// Publishes one message and waits for the broker's confirm.
pub async fn publish(ch: &Channel, routing_key: &str, body: &[u8], props: BasicProperties) {
    if let Err(e) = try_publish(ch, routing_key, body, props).await {
        panic!("publish to {routing_key}: {e}");
    }
}

/// Publishes a request for each `(execution id, action)` in order, many confirms in flight at
/// once, and returns once the broker has confirmed them all.
pub async fn publish_requests(url: &str, requests: &[(u64, String)]) {
    publish_requests_paced(url, requests, 500, Duration::ZERO).await;
}

/// Publishes `requests` in order, `chunk` at a time, pausing `pause` after each chunk (so that
/// requests arrive at queues the executor keeps empty, not at a backlog). A chunk whose
/// connection is lost before the broker confirmed all of it is published again whole on a new
/// connection, as a careful producer would: copies the executor has already taken are
/// duplicates to it, and submission order holds because a chunk leaves only once the one
/// before it is confirmed. Panics if the broker cannot be reached for two minutes.
pub async fn publish_requests_paced(
    url: &str,
    requests: &[(u64, String)],
    chunk: usize,
    pause: Duration,
) {
    let mut open: Option<(Connection, Channel)> = None;
    for chunk in requests.chunks(chunk.max(1)) {
        let give_up = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let attempt = match open.take() {
                Some(c) => Ok(c),
                None => open_publisher(url).await,
            };
            let failed = match attempt {
                Ok((conn, ch)) => match publish_chunk(&ch, chunk).await {
                    Ok(()) => {
                        open = Some((conn, ch));
                        break;
                    }
                    Err(e) => e,
                },
                Err(e) => e,
            };
            assert!(
                std::time::Instant::now() < give_up,
                "requests could not be published for two minutes: {failed}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    if let Some((conn, _)) = open {
        let _ = conn.close(200, "done".into()).await;
    }
}

async fn open_publisher(url: &str) -> Result<(Connection, Channel), String> {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(|e| e.to_string())?;
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    Ok((conn, ch))
}

/// Publishes one chunk of requests and waits until the broker has confirmed every one.
async fn publish_chunk(ch: &Channel, chunk: &[(u64, String)]) -> Result<(), String> {
    let mut confirms = Vec::with_capacity(chunk.len());
    for (id, action) in chunk {
        let body = json!({"execution_id": id, "action_ref": action, "parameters": {"n": id}});
        confirms.push(
            ch.basic_publish(
                topology::EXCHANGE.into(),
                topology::REQUESTED_ROUTING_KEY.into(),
                BasicPublishOptions::default(),
                body.to_string().as_bytes(),
                json_props(),
            )
            .await
            .map_err(|e| e.to_string())?,
        );
    }
    for confirm in confirms {
        if confirm.await.map_err(|e| e.to_string())?.is_nack() {
            return Err("a request was nacked".to_owned());
        }
    }
    Ok(())
}

/// How many consumers each of the executor's three queues has; `None` while they do not all
/// exist yet.
pub async fn executor_consumers(conn: &Connection) -> Option<[u32; 3]> {
    let mut counts = [0; 3];
    for (i, queue) in [
        topology::REQUESTS_QUEUE,
        topology::COMPLETED_QUEUE,
        topology::CANCEL_QUEUE,
    ]
    .into_iter()
    .enumerate()
    {
        // A failed passive declare closes its channel, so each probe has its own.
        let probe = conn.create_channel().await.ok()?;
        let q = probe
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .ok()?;
        counts[i] = q.consumer_count();
        let _ = probe.close(200, "probed".into()).await;
    }
    Some(counts)
}

/// Waits until an executor consumes all three of its queues (its topology is then declared
/// and bound, so nothing published from now on is unroutable).
pub async fn until_consuming(conn: &Connection, deadline: Duration) {
    poll_until(deadline, "the executor consumes its queues", || async {
        executor_consumers(conn)
            .await
            .is_some_and(|c| c.iter().all(|n| *n >= 1))
    })
    .await;
}

/// Waits until no executor consumes its queues any more (the broker has seen a killed one go,
/// and taken back what it had not acknowledged).
pub async fn until_not_consuming(conn: &Connection, deadline: Duration) {
    poll_until(
        deadline,
        "the broker sees no executor consuming",
        || async {
            executor_consumers(conn)
                .await
                .is_some_and(|c| c.iter().all(|n| *n == 0))
        },
    )
    .await;
}

/// Publishes a cancel for each of `ids`, confirmed by the broker.
pub async fn publish_cancels(conn: &Connection, ids: &[u64]) {
    let ch = confirm_channel(conn).await;
    for id in ids {
        publish(
            &ch,
            topology::CANCEL_ROUTING_KEY,
            json!({"execution_id": id}).to_string().as_bytes(),
            json_props(),
        )
        .await;
    }
}
