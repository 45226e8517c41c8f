//! The dead-letter queue (`attune.dlq`) as operators see it: its size, a look at its entries,
//! and replaying entries as new requests.
//!
//! # How entries are read without being consumed
//!
//! `basic.get` without auto-ack, one message at a time, on a channel of this module's own
//! connection (named `fifo-executor.ops`, apart from the consuming session). The messages stay
//! unacknowledged while they are read, then all of them are handed back with one
//! `basic.nack(multiple, requeue)` (closing the channel would do the same, and does if anything
//! fails halfway). `basic.get` was chosen over a short-lived consumer because the broker says
//! when the queue is exhausted (get-empty), so a read never waits on a guessed timeout for
//! messages that will not come, and it takes exactly as many as asked for.
//!
//! Effects, stated because operators will notice them:
//! - **Order is kept.** RabbitMQ puts a requeued message back at its original position in a
//!   classic queue when nothing else consumes the queue at the same time (nothing does: the DLQ
//!   has no consumers, only this module, one operation at a time). The DLQ is always a classic
//!   queue (see `rabbit::topology`).
//! - Read messages come back marked `redelivered`; nothing in this project reads that flag.
//! - **Expiry is kept**: a requeued message keeps its original per-message TTL deadline
//!   (`dlq.ttl_hours` counts from when it was dead-lettered, not from the last peek).
//! - While messages are unacknowledged they do not count towards `x-max-length` and the
//!   queue's ready count (what [`Dlq::size`] reports) excludes them. Operations are serialised
//!   on one lock, so a size reading never happens in the middle of a peek or replay.
//!
//! # Replay
//!
//! A replayed entry's `original` is published again as a new `execution.requested` message
//! with the header `x-retry-count` = the entry's `retry_count` + 1, mandatory and with a
//! publisher confirm; only once the broker has confirmed it is the entry acknowledged off the
//! DLQ. If the confirm is lost, the entry stays and may be replayed twice: entries that keep
//! their execution id are then answered as duplicates by the executor.
//!
//! Which entries can be replayed:
//! - `queue_from: requested` (rejected at intake: queue full, action disabled, poison): the
//!   original request as received, execution id included (it never ran, and the executor
//!   released it, so keeping it keeps a double replay harmless).
//! - `queue_from: queued` (timed out or purged while waiting): the original without its
//!   `execution_id`, so the executor assigns a new one. The old id has ended: the executor
//!   remembers ended ids and would take a request carrying it for a duplicate, and the ledger
//!   has recorded its end. The new message carries the header `x-replay-of` with the old id.
//! - Not `running` (the execution was dispatched and may have run; its dead letter holds no
//!   parameters), not `completed`/`cancel` (they are not requests), and not an original that
//!   does not decode as a request (it would only be dead-lettered again). These stay in the
//!   DLQ and are reported as skipped, with the reason.
//!
//! # Choosing entries, and discarding them
//!
//! Replay and discard take a [`Selection`]: entries by execution id (the first entry of each
//! id, anywhere in the queue), the first N entries, or the first N entries that match a
//! [`Filter`] on `queue_from` and `error_class`. Entries not chosen (or chosen and left, like
//! a replay's skipped ones) are held unacknowledged while the walk goes on and handed back
//! together at its end, so they stay in place and in order; only the chosen ones that were
//! dealt with are acknowledged off the queue.
//!
//! A discard acknowledges the chosen entries without publishing anything: they are gone.
//! Each is logged at info level (`[dlq] discarded`, with its execution id, action, origin and
//! error class) before its acknowledgement, so the log keeps what the queue no longer does.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::Mutex;

use crate::model::ExecutionId;
use crate::rabbit::dead_letters::DlqSwitch;
use crate::rabbit::{topology, wire};

/// Most entries one peek returns.
pub const MAX_PEEK: usize = 1000;
/// Most entries one replay may name or take.
pub const MAX_REPLAY: usize = 1000;
/// Most entries a replay by execution id looks through. The DLQ holds `dlq.max_entries`
/// (10,000 by default); only delivery tags are kept while scanning, not bodies.
pub const MAX_SCAN: usize = 100_000;
/// Longest one DLQ operation may take before it is abandoned (its channel is then closed and
/// the broker requeues whatever it held).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a size reading may take.
pub const SIZE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("cannot connect to RabbitMQ: {0}")]
    Connect(lapin::Error),
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("RabbitMQ did not finish the DLQ operation within {0:?}")]
    Timeout(Duration),
}

/// Which entries to replay or discard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// The entries of these executions, wherever they are in the queue.
    Ids(Vec<ExecutionId>),
    /// The first `n` entries from the head (oldest first); each is replayed or skipped.
    First(usize),
    /// The first `n` entries from the head that match the filter (looked for among the
    /// first [`MAX_SCAN`]); the others stay where they are.
    Matching(Filter, usize),
}

/// Which dead letters an operation is about, by two of their fields, compared exactly. A
/// field left out matches every entry; `(none)` matches the entries without that field
/// (which is how [`DlqStats`] counts them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    pub queue_from: Option<String>,
    pub error_class: Option<String>,
}

/// The value of [`Filter`] fields that stands for "the entry has no such field".
pub const NO_FIELD: &str = "(none)";

impl Filter {
    /// True when it matches every entry.
    pub fn is_empty(&self) -> bool {
        self.queue_from.is_none() && self.error_class.is_none()
    }

    /// Whether an entry with these fields matches.
    pub fn matches_fields(&self, queue_from: Option<&str>, error_class: Option<&str>) -> bool {
        let one = |want: &Option<String>, have: Option<&str>| match want {
            None => true,
            Some(w) => w.as_str() == have.unwrap_or(NO_FIELD),
        };
        one(&self.queue_from, queue_from) && one(&self.error_class, error_class)
    }

    /// Whether an entry, as a peek shows it, matches.
    pub fn matches(&self, entry: &Value) -> bool {
        let field = |k: &str| entry.get(k).and_then(Value::as_str);
        self.matches_fields(field("queue_from"), field("error_class"))
    }

    fn matches_letter(&self, l: Option<&Letter>) -> bool {
        self.matches_fields(
            l.and_then(|l| l.queue_from.as_deref()),
            l.and_then(|l| l.error_class.as_deref()),
        )
    }
}

/// What a peek saw.
#[derive(Debug, Clone, Serialize)]
pub struct Peek {
    /// Messages ready in the queue when the peek began.
    pub queue_size: u64,
    /// Entries from the head, oldest first: each dead letter's JSON as published, or for a
    /// message that is not a JSON object, `{"unreadable": true, "raw": …}`. With a filter,
    /// only the matching ones.
    pub entries: Vec<Value>,
    /// Entries read that match the filter (all of them without one); may exceed
    /// `entries` when more matched than were asked for.
    pub matched: usize,
    /// Entries read.
    pub scanned: usize,
}

/// Counts over the entries at the head of the DLQ (`dlq stats`, and the per-origin gauges the
/// health check exports).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DlqStats {
    /// Messages ready in the queue.
    pub queue_size: u64,
    /// Entries the counts below are taken over: the first [`MAX_PEEK`] at most. RabbitMQ
    /// gives only the queue's total; counting by origin means reading the entries.
    pub sampled: usize,
    /// `(none)` counts entries without a `queue_from` (not this executor's dead letters).
    pub by_queue_from: BTreeMap<String, u64>,
    /// `(none)` likewise.
    pub by_error_class: BTreeMap<String, u64>,
    /// The earliest and latest `failed_at` among the entries read (RFC 3339).
    pub oldest_failed_at: Option<String>,
    pub newest_failed_at: Option<String>,
}

impl DlqStats {
    /// Counts what a peek saw.
    pub fn of(peek: &Peek) -> Self {
        let mut by_queue_from = BTreeMap::new();
        let mut by_error_class = BTreeMap::new();
        let mut failed_at: Vec<&str> = Vec::new();
        for e in &peek.entries {
            let field = |k: &str| {
                e.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or(NO_FIELD)
                    .to_owned()
            };
            *by_queue_from.entry(field("queue_from")).or_insert(0) += 1;
            *by_error_class.entry(field("error_class")).or_insert(0) += 1;
            if let Some(t) = e.get("failed_at").and_then(Value::as_str) {
                failed_at.push(t);
            }
        }
        // RFC 3339 in UTC with a fixed format sorts as text.
        failed_at.sort_unstable();
        Self {
            queue_size: peek.queue_size,
            sampled: peek.entries.len(),
            by_queue_from,
            by_error_class,
            oldest_failed_at: failed_at.first().map(|s| (*s).to_owned()),
            newest_failed_at: failed_at.last().map(|s| (*s).to_owned()),
        }
    }
}

/// One replayed entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Replayed {
    /// The execution id the new request carries; `null` when the executor assigns a new one.
    pub execution_id: Option<ExecutionId>,
    /// The dead-lettered execution's id, when the new request does not carry it.
    pub replay_of: Option<ExecutionId>,
    pub action_ref: Option<String>,
    pub queue_from: String,
    pub error_class: String,
    /// The new message's `x-retry-count`.
    pub retry_count: u32,
}

/// One entry left in the DLQ, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Skipped {
    pub execution_id: Option<ExecutionId>,
    pub reason: String,
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReplayReport {
    pub replayed: Vec<Replayed>,
    pub skipped: Vec<Skipped>,
    /// Execution ids asked for that no entry has (already expired, replayed or never there).
    pub not_found: Vec<ExecutionId>,
    /// Entries looked at.
    pub scanned: usize,
}

/// The operators' handle on `attune.dlq`.
pub struct Dlq {
    url: String,
    /// `rabbitmq.tls`, for an `amqps://` URL.
    tls: crate::config::RabbitTlsConfig,
    timeout: Duration,
    /// The connection, opened on first use and again after it broke. The lock also
    /// serialises operations (see the module docs).
    conn: Mutex<Option<Connection>>,
    /// `dlq.enabled`: while off, the health check and the API leave the DLQ alone (nothing is
    /// dead-lettered to it, so there is nothing new to read).
    enabled: DlqSwitch,
}

impl std::fmt::Debug for Dlq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dlq")
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Dlq {
    /// Connects lazily to the broker at `url`, on first use.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            tls: crate::config::RabbitTlsConfig::default(),
            timeout: DEFAULT_TIMEOUT,
            conn: Mutex::new(None),
            enabled: DlqSwitch::new(true),
        }
    }

    /// Connects with `rabbitmq.tls`'s files (an `amqps://` URL).
    pub fn with_tls(mut self, tls: crate::config::RabbitTlsConfig) -> Self {
        self.tls = tls;
        self
    }

    /// Follows `dlq.enabled` as `switch` says (on by default).
    pub fn with_switch(mut self, switch: DlqSwitch) -> Self {
        self.enabled = switch;
        self
    }

    /// Whether `dlq.enabled` is true now.
    pub fn is_enabled(&self) -> bool {
        self.enabled.is_on()
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Messages ready in `attune.dlq` (a passive declare: cheap, changes nothing). Bounded by
    /// [`SIZE_TIMEOUT`] rather than the operation timeout: the health check asks every
    /// interval and must not hang for a minute on an unreachable broker.
    pub async fn size(&self) -> Result<u64, DlqError> {
        self.with_channel_within(self.timeout.min(SIZE_TIMEOUT), |ch| async move {
            queue_size(&ch).await
        })
        .await
    }

    /// The first `limit` entries (at most [`MAX_PEEK`]), left in the queue in their order.
    pub async fn peek(&self, limit: usize) -> Result<Peek, DlqError> {
        self.peek_within(limit, self.timeout).await
    }

    /// [`peek`](Self::peek), given up after `timeout` (the entries read so far go back to the
    /// queue when the channel closes).
    pub async fn peek_within(&self, limit: usize, timeout: Duration) -> Result<Peek, DlqError> {
        let limit = limit.min(MAX_PEEK);
        self.with_channel_within(timeout.min(self.timeout), |ch| async move {
            let queue_size = queue_size(&ch).await?;
            let mut entries = Vec::new();
            let mut last_tag = None;
            while entries.len() < limit {
                let Some(msg) = get(&ch).await? else { break };
                last_tag = Some(msg.delivery.delivery_tag);
                entries.push(entry_json(&msg.delivery.data));
            }
            give_back(&ch, last_tag).await?;
            let n = entries.len();
            Ok(Peek {
                queue_size,
                entries,
                matched: n,
                scanned: n,
            })
        })
        .await
    }

    /// The first `limit` entries that match `filter`, looked for among the first
    /// [`MAX_PEEK`], all left in the queue in their order; `matched` counts every match
    /// among those read.
    pub async fn peek_matching(&self, filter: &Filter, limit: usize) -> Result<Peek, DlqError> {
        if filter.is_empty() {
            return self.peek(limit).await;
        }
        let mut peek = self.peek(MAX_PEEK).await?;
        peek.scanned = peek.entries.len();
        peek.entries.retain(|e| filter.matches(e));
        peek.matched = peek.entries.len();
        peek.entries.truncate(limit);
        Ok(peek)
    }

    /// Replays the selected entries (see the module docs for which can be replayed).
    pub async fn replay(&self, selection: Selection) -> Result<ReplayReport, DlqError> {
        self.with_channel(|ch| async move { replay_on(&ch, selection).await })
            .await
    }

    /// Acknowledges the selected entries off the queue without publishing anything, logging
    /// each (see the module docs).
    pub async fn discard(&self, selection: Selection) -> Result<DiscardReport, DlqError> {
        self.with_channel(|ch| async move { discard_on(&ch, selection).await })
            .await
    }

    /// Closes the connection (at shutdown).
    pub async fn close(&self) {
        if let Some(conn) = self.conn.lock().await.take() {
            let _ = conn.close(200, "fifo-executor shutting down".into()).await;
        }
    }

    /// Runs `op` on a fresh channel of the shared connection, under the lock and the timeout,
    /// and closes the channel afterwards.
    async fn with_channel<T, F, Fut>(&self, op: F) -> Result<T, DlqError>
    where
        F: FnOnce(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T, DlqError>>,
    {
        self.with_channel_within(self.timeout, op).await
    }

    async fn with_channel_within<T, F, Fut>(&self, timeout: Duration, op: F) -> Result<T, DlqError>
    where
        F: FnOnce(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T, DlqError>>,
    {
        let mut conn = self.conn.lock().await;
        let attempt = tokio::time::timeout(timeout, async {
            let ch = open_channel(&self.url, &self.tls, &mut conn).await?;
            let result = op(ch.clone()).await;
            // Closing hands back anything still unacknowledged, should `op` have failed
            // before giving it back itself.
            let _ = ch.close(200, "done".into()).await;
            result
        })
        .await;
        match attempt {
            Ok(Err(e @ (DlqError::Amqp(_) | DlqError::Connect(_)))) => {
                // A channel error may have left the connection unusable; start afresh.
                *conn = None;
                Err(e)
            }
            Ok(result) => result,
            Err(_) => {
                // Dropping the connection closes it, and the broker requeues what it held.
                *conn = None;
                Err(DlqError::Timeout(timeout))
            }
        }
    }
}

async fn open_channel(
    url: &str,
    tls: &crate::config::RabbitTlsConfig,
    conn: &mut Option<Connection>,
) -> Result<Channel, DlqError> {
    if let Some(c) = conn.as_ref()
        && c.status().connected()
        && let Ok(ch) = c.create_channel().await
    {
        return Ok(ch);
    }
    let fresh = crate::rabbit::connect_tls(url, tls, "fifo-executor.ops")
        .await
        .map_err(DlqError::Connect)?;
    let ch = fresh.create_channel().await?;
    *conn = Some(fresh);
    Ok(ch)
}

async fn queue_size(ch: &Channel) -> Result<u64, DlqError> {
    let q = ch
        .queue_declare(
            topology::DLQ.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(u64::from(q.message_count()))
}

async fn get(ch: &Channel) -> Result<Option<lapin::message::BasicGetMessage>, DlqError> {
    Ok(ch
        .basic_get(topology::DLQ.into(), BasicGetOptions { no_ack: false })
        .await?)
}

/// Requeues every message still unacknowledged on `ch` up to `last_tag`, in one frame.
async fn give_back(ch: &Channel, last_tag: Option<u64>) -> Result<(), DlqError> {
    if let Some(tag) = last_tag {
        ch.basic_nack(
            tag,
            BasicNackOptions {
                multiple: true,
                requeue: true,
            },
        )
        .await?;
    }
    Ok(())
}

/// A DLQ message as JSON for operators.
fn entry_json(body: &[u8]) -> Value {
    match wire::original(body) {
        v @ Value::Object(_) => v,
        raw => serde_json::json!({"unreadable": true, "raw": raw}),
    }
}

/// The fields of a dead letter a replay needs.
#[derive(Debug)]
struct Letter {
    execution_id: Option<ExecutionId>,
    action_ref: Option<String>,
    queue_from: Option<String>,
    error_class: Option<String>,
    retry_count: u32,
    original: Option<Value>,
}

fn letter(body: &[u8]) -> Option<Letter> {
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) else {
        return None;
    };
    let text = |k: &str| map.get(k).and_then(Value::as_str).map(str::to_owned);
    Some(Letter {
        execution_id: map.get("execution_id").and_then(Value::as_u64),
        action_ref: text("action_ref"),
        queue_from: text("queue_from"),
        error_class: text("error_class"),
        retry_count: map
            .get("retry_count")
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0),
        original: map.get("original").cloned(),
    })
}

/// The request to publish for a dead letter, or why there is none.
fn replay_body(l: &Letter) -> Result<Map<String, Value>, String> {
    let stage = l.queue_from.as_deref().unwrap_or("");
    match stage {
        "requested" | "queued" => {}
        "running" => {
            return Err(
                "a reclaimed execution was dispatched and may have run; its dead \
                        letter keeps no parameters to run it again"
                    .to_owned(),
            );
        }
        "completed" | "cancel" => {
            return Err(format!(
                "a dead letter from `{stage}` is not an execution request"
            ));
        }
        _ => return Err("not a dead-letter entry of this executor (no queue_from)".to_owned()),
    }
    let Some(Value::Object(original)) = &l.original else {
        return Err("its original is not a JSON object".to_owned());
    };
    let mut body = original.clone();
    if stage == "queued" {
        body.remove("execution_id");
        // Only the dead letter's record of the first wait; a new request has its own.
        body.remove("enqueued_at");
    }
    let bytes = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
    wire::decode_request(&bytes, Some("application/json"), usize::MAX).map_err(|e| {
        format!("its original is not a valid request ({e}); replaying it would only dead-letter it again")
    })?;
    Ok(body)
}

/// One walk over the DLQ from its head, picking the entries a [`Selection`] chooses. Every
/// message it reads and does not hand out is held unacknowledged, and so is every one handed
/// out and then [`leave`](Walk::leave)-d; [`finish`](Walk::finish) gives them all back with
/// one multiple-nack, so they keep their places.
struct Walk {
    /// By id: the ids still looked for.
    wanted: BTreeSet<ExecutionId>,
    by_id: bool,
    filter: Filter,
    /// Entries still to hand out.
    take: usize,
    /// Entries still to read.
    budget: usize,
    scanned: usize,
    /// The highest tag still unacknowledged: one multiple-nack at the end returns it and
    /// every lower one still held.
    held: Option<u64>,
}

/// An entry a [`Walk`] handed out.
struct Picked {
    tag: u64,
    /// `None` when the message is not a JSON object.
    letter: Option<Letter>,
    /// Its execution id (the dead letter's, else its original's).
    id: Option<ExecutionId>,
}

impl Walk {
    /// At most `most` entries are handed out (by id: as many as asked for).
    fn new(selection: Selection, most: usize) -> Self {
        let (wanted, by_id, filter, take) = match selection {
            Selection::Ids(ids) => (
                ids.into_iter().collect(),
                true,
                Filter::default(),
                usize::MAX,
            ),
            Selection::First(n) => (BTreeSet::new(), false, Filter::default(), n.min(most)),
            Selection::Matching(filter, n) => (BTreeSet::new(), false, filter, n.min(most)),
        };
        Self {
            wanted,
            by_id,
            filter,
            take,
            budget: MAX_SCAN,
            scanned: 0,
            held: None,
        }
    }

    /// The next chosen entry, or `None` once the selection is exhausted or the queue is.
    async fn next(&mut self, ch: &Channel) -> Result<Option<Picked>, DlqError> {
        while self.budget > 0 && self.take > 0 && !(self.by_id && self.wanted.is_empty()) {
            let Some(msg) = get(ch).await? else { break };
            self.budget -= 1;
            self.scanned += 1;
            let tag = msg.delivery.delivery_tag;
            let letter = letter(&msg.delivery.data);
            let id = letter.as_ref().and_then(|l| {
                l.execution_id.or_else(|| {
                    l.original
                        .as_ref()
                        .and_then(|o| o.get("execution_id"))
                        .and_then(Value::as_u64)
                })
            });
            let chosen = if self.by_id {
                id.is_some_and(|id| self.wanted.remove(&id))
            } else {
                self.filter.matches_letter(letter.as_ref())
            };
            if !chosen {
                self.held = Some(tag);
                continue;
            }
            self.take -= 1;
            return Ok(Some(Picked { tag, letter, id }));
        }
        Ok(None)
    }

    /// Leaves a handed-out entry in the queue.
    fn leave(&mut self, tag: u64) {
        self.held = Some(tag);
    }

    /// Gives back everything held; returns the ids asked for that no entry had.
    async fn finish(self, ch: &Channel) -> Result<Vec<ExecutionId>, DlqError> {
        give_back(ch, self.held).await?;
        Ok(self.wanted.into_iter().collect())
    }
}

async fn replay_on(ch: &Channel, selection: Selection) -> Result<ReplayReport, DlqError> {
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut walk = Walk::new(selection, MAX_REPLAY);
    let mut report = ReplayReport::default();
    while let Some(Picked { tag, letter, id }) = walk.next(ch).await? {
        let Some(l) = letter else {
            report.skipped.push(Skipped {
                execution_id: None,
                reason: "not a JSON dead letter".to_owned(),
            });
            walk.leave(tag);
            continue;
        };
        let body = match replay_body(&l) {
            Ok(body) => body,
            Err(reason) => {
                report.skipped.push(Skipped {
                    execution_id: id,
                    reason,
                });
                walk.leave(tag);
                continue;
            }
        };
        match publish(ch, &l, &body).await? {
            Ok(()) => {
                ch.basic_ack(tag, BasicAckOptions { multiple: false })
                    .await?;
                let carried = body.get("execution_id").and_then(Value::as_u64);
                report.replayed.push(Replayed {
                    execution_id: carried,
                    replay_of: id.filter(|_| carried.is_none()),
                    action_ref: l.action_ref.clone(),
                    queue_from: l.queue_from.clone().unwrap_or_default(),
                    error_class: l.error_class.clone().unwrap_or_default(),
                    retry_count: l.retry_count.saturating_add(1),
                });
            }
            Err(reason) => {
                report.skipped.push(Skipped {
                    execution_id: id,
                    reason,
                });
                walk.leave(tag);
            }
        }
    }
    report.scanned = walk.scanned;
    report.not_found = walk.finish(ch).await?;
    Ok(report)
}

/// One discarded entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Discarded {
    pub execution_id: Option<ExecutionId>,
    pub action_ref: Option<String>,
    pub queue_from: Option<String>,
    pub error_class: Option<String>,
}

/// What a discard did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DiscardReport {
    pub discarded: Vec<Discarded>,
    /// Execution ids asked for that no entry has (already expired, replayed or never there).
    pub not_found: Vec<ExecutionId>,
    /// Entries looked at.
    pub scanned: usize,
}

async fn discard_on(ch: &Channel, selection: Selection) -> Result<DiscardReport, DlqError> {
    let mut walk = Walk::new(selection, MAX_REPLAY);
    let mut report = DiscardReport::default();
    while let Some(Picked { tag, letter, id }) = walk.next(ch).await? {
        let gone = Discarded {
            execution_id: id,
            action_ref: letter.as_ref().and_then(|l| l.action_ref.clone()),
            queue_from: letter.as_ref().and_then(|l| l.queue_from.clone()),
            error_class: letter.as_ref().and_then(|l| l.error_class.clone()),
        };
        tracing::info!(
            execution_id = ?gone.execution_id,
            action_ref = gone.action_ref.as_deref().unwrap_or(NO_FIELD),
            queue_from = gone.queue_from.as_deref().unwrap_or(NO_FIELD),
            error_class = gone.error_class.as_deref().unwrap_or(NO_FIELD),
            "[dlq] discarded"
        );
        ch.basic_ack(tag, BasicAckOptions { multiple: false })
            .await?;
        report.discarded.push(gone);
    }
    report.scanned = walk.scanned;
    report.not_found = walk.finish(ch).await?;
    Ok(report)
}

/// Publishes one replay and waits for the broker's confirm. `Ok(Err(reason))` when the broker
/// took the message but refused or could not route it.
async fn publish(
    ch: &Channel,
    l: &Letter,
    body: &Map<String, Value>,
) -> Result<Result<(), String>, DlqError> {
    let mut headers = FieldTable::default();
    headers.insert(
        "x-retry-count".into(),
        AMQPValue::LongUInt(l.retry_count.saturating_add(1)),
    );
    let mut props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    match body.get("execution_id").and_then(Value::as_u64) {
        Some(id) => props = props.with_message_id(id.to_string().into()),
        None => {
            if let Some(old) = l.execution_id {
                // Longlong: execution ids go up to i64::MAX (the ledger's BIGINT).
                headers.insert(
                    "x-replay-of".into(),
                    AMQPValue::LongLongInt(i64::try_from(old).unwrap_or(i64::MAX)),
                );
            }
        }
    }
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let confirm = ch
        .basic_publish(
            topology::EXCHANGE.into(),
            topology::REQUESTED_ROUTING_KEY.into(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            &bytes,
            props.with_headers(headers),
        )
        .await?
        .await?;
    Ok(match confirm {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => Err(format!(
            "unroutable: nothing is bound to `{}` on `{}` (is the executor's topology declared?)",
            topology::REQUESTED_ROUTING_KEY,
            topology::EXCHANGE
        )),
        Confirmation::Nack(_) => Err("the broker refused the replayed message".to_owned()),
        Confirmation::NotRequested => Err("no publisher confirm".to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(v: Value) -> Letter {
        letter(&serde_json::to_vec(&v).expect("json")).expect("a letter")
    }

    #[test]
    fn a_rejected_request_is_replayed_as_received_with_its_execution_id() {
        let letter = l(serde_json::json!({
            "execution_id": 7, "queue_from": "requested", "error_class": "QueueFull",
            "retry_count": 2,
            "original": {"execution_id": 7, "action_ref": "core.http.get", "parameters": {"a": 1}}
        }));
        let body = replay_body(&letter).expect("replayable");
        assert_eq!(body.get("execution_id"), Some(&Value::from(7)));
        assert_eq!(letter.retry_count, 2);
    }

    #[test]
    fn a_timed_out_execution_is_replayed_without_its_ended_id() {
        let letter = l(serde_json::json!({
            "execution_id": 8, "queue_from": "queued", "error_class": "QueueTimeout",
            "original": {"execution_id": 8, "action_ref": "a", "request_id": null,
                         "parameters": {}, "enqueued_at": "2026-01-01T00:00:00Z"}
        }));
        let body = replay_body(&letter).expect("replayable");
        assert!(!body.contains_key("execution_id"));
        assert!(!body.contains_key("enqueued_at"));
        assert_eq!(body.get("action_ref"), Some(&Value::from("a")));
    }

    #[test]
    fn reclaimed_completions_and_invalid_originals_are_not_replayable() {
        for (v, why) in [
            (
                serde_json::json!({"queue_from": "running", "original": {"action_ref": "a"}}),
                "may have run",
            ),
            (
                serde_json::json!({"queue_from": "completed", "original": {"execution_id": 1}}),
                "not an execution request",
            ),
            (
                serde_json::json!({"queue_from": "requested", "original": "not json"}),
                "not a JSON object",
            ),
            (
                serde_json::json!({"queue_from": "requested", "original": {"action_ref": "bad ref!"}}),
                "not a valid request",
            ),
            (serde_json::json!({"hello": 1}), "no queue_from"),
        ] {
            let reason = replay_body(&l(v.clone())).expect_err("not replayable");
            assert!(reason.contains(why), "{v}: {reason}");
        }
    }

    #[test]
    fn a_message_that_is_not_a_json_object_is_shown_as_unreadable() {
        assert_eq!(
            entry_json(b"plain"),
            serde_json::json!({"unreadable": true, "raw": "plain"})
        );
        assert_eq!(entry_json(br#"{"a":1}"#), serde_json::json!({"a": 1}));
    }
}
