//! Prometheus metrics.
//!
//! - The recorder is `metrics-exporter-prometheus`, installed once per process and rendered by
//!   the HTTP edge on `GET /metrics` (no listener of its own: one port, one server).
//! - [`MetricsSink`] wraps the outcome sink and counts every event the core records: per
//!   action in [`ActionTallies`] (plain atomics, exported as `attune_executions_total{action,
//!   outcome}` at scrape time), over all actions in `attune_executions_by_outcome_total{outcome}`,
//!   and how long admitted executions waited in one histogram over all actions
//!   (`attune_queue_wait_seconds`, no `action` label: one histogram per action would be fifteen
//!   buckets for each of 100,000 actions; the per-action figure, the oldest wait, is in the
//!   API, the page and `attune_queue_oldest_age_seconds`).
//! - The per-action series ([`names::PER_ACTION`]) are written at scrape time from the latest
//!   counters the app already keeps ([`LatestStats`], the core's stats observer), not on every
//!   change: the actors report after every batch while Prometheus scrapes every 15–30 s, and
//!   two of the values depend on the scrape time anyway (the age of the oldest waiting
//!   execution keeps growing while nothing changes; see [`refresh_queue_gauges`] for
//!   `last_updated`). Only the actions that are busy or changed lately are written, into a
//!   recorder of their own that drops every series not written again since the last scrape
//!   (see [`per_action`]), so `/metrics` grows with the busy actions, not with every action
//!   ever seen. `GET /metrics/actions?action=…` renders any named actions on request.
//!
//! Every name is a constant in [`names`]; the alert rules and the dashboard use only those (a
//! test checks it), so the documentation and the exported names cannot drift apart.

pub mod per_action;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::core::memory::LatestStats;
use crate::core::ports::RemovalReason;
use crate::core::{Event, OutcomeSink, QueueStats};
use crate::model::{ActionRef, EndStatus};
pub use per_action::{ActionTallies, PerActionExporter};

/// Every metric the service exports (other than those the RabbitMQ edge names itself).
pub mod names {
    pub const QUEUE_LENGTH: &str = "attune_queue_length";
    pub const QUEUE_ACTIVE_COUNT: &str = "attune_queue_active_count";
    pub const QUEUE_MAX_CONCURRENT: &str = "attune_queue_max_concurrent";
    pub const QUEUE_OLDEST_AGE_SECONDS: &str = "attune_queue_oldest_age_seconds";
    pub const QUEUE_LAST_UPDATED: &str = "attune_queue_last_updated";
    pub const QUEUE_WAIT_SECONDS: &str = "attune_queue_wait_seconds";
    pub const EXECUTIONS_TOTAL: &str = "attune_executions_total";
    /// `attune_executions_total` summed over all actions, by `outcome` (every outcome from
    /// the first scrape).
    pub const EXECUTIONS_BY_OUTCOME_TOTAL: &str = "attune_executions_by_outcome_total";
    /// Actions the executor keeps counters for (every action seen since start).
    pub const ACTIONS_KNOWN: &str = "attune_actions_known";
    /// Actions with per-action series in this scrape (busy, or changed within
    /// `executor.queue.metrics_idle_after_seconds`).
    pub const ACTIONS_EXPORTED: &str = "attune_actions_exported";
    /// Counted by the RabbitMQ edge when it publishes a dead letter.
    pub const DLQ_MESSAGES_TOTAL: &str = "attune_dlq_messages_total";
    /// Messages ready in `attune.dlq`, all origins (RabbitMQ's own count).
    pub const DLQ_SIZE: &str = "attune_dlq_size";
    /// The same split by `queue_from`, from reading the DLQ's head at each health check
    /// (see `ops::health::HealthMonitor::check` for how stale it can be).
    pub const DLQ_SIZE_BY_QUEUE_FROM: &str = "attune_dlq_size_by_queue_from";
    pub const HEALTH_STATUS: &str = "attune_health_status";
    pub const HEALTH_STUCK_EXECUTIONS: &str = "attune_health_stuck_executions";
    pub const HEALTH_STALLED_QUEUES: &str = "attune_health_stalled_queues";
    pub const HEALTH_LAST_CHECK: &str = "attune_health_last_check";
    pub const EMERGENCY_MODE: &str = "attune_emergency_mode";
    pub const PURGE_CYCLE_SECONDS: &str = "attune_purge_cycle_seconds";
    pub const PURGE_CYCLES_TOTAL: &str = "attune_purge_cycles_total";
    pub const PURGE_ENTRIES_TOTAL: &str = "attune_purge_entries_total";
    /// Ledger rows a purge deleted (or would, `mode="dry_run"`), by `table`.
    pub const PURGE_LEDGER_ROWS_TOTAL: &str = "attune_purge_ledger_rows_total";
    pub const HTTP_REQUESTS_TOTAL: &str = "attune_http_requests_total";
    pub const HTTP_REQUEST_DURATION_SECONDS: &str = "attune_http_request_duration_seconds";
    /// Set by the RabbitMQ edge.
    pub const RABBITMQ_CONNECTED: &str = "attune_rabbitmq_connected";
    pub const RABBITMQ_RECONNECTS_TOTAL: &str = "attune_rabbitmq_reconnects_total";
    pub const UNMATCHED_COMPLETIONS_TOTAL: &str = "attune_unmatched_completions_total";
    /// Counted by the RabbitMQ edge for each cancel from the cancels queue, by `verdict`.
    pub const CANCELS_TOTAL: &str = "attune_cancels_total";
    /// Configuration reloads by `result` (`applied`, `unchanged`, `invalid`).
    pub const CONFIG_RELOADS_TOTAL: &str = "attune_config_reloads_total";
    /// Unix time the configuration in force was read (at start, or by a reload).
    pub const CONFIG_LAST_RELOAD_TIMESTAMP_SECONDS: &str =
        "attune_config_last_reload_timestamp_seconds";
    // The edges below name these themselves (the RabbitMQ edge and the cluster cannot import
    // this module); the names here are for the first samples and the tests.
    pub const RABBITMQ_ACKS_TOTAL: &str = "attune_rabbitmq_acks_total";
    pub const INTAKE_THROTTLED_TOTAL: &str = "attune_intake_throttled_total";
    pub const DISPATCHES_DROPPED_TOTAL: &str = "attune_dispatches_dropped_total";
    pub const DISPATCHES_UNROUTABLE_TOTAL: &str = "attune_dispatches_unroutable_total";
    pub const DISPATCH_BATCHES_TOTAL: &str = "attune_dispatch_batches_total";
    pub const PARTITIONS_OWNED: &str = "attune_partitions_owned";
    pub const FENCED_WRITES_TOTAL: &str = "attune_fenced_writes_total";
    pub const PARTITION_TAKEOVERS_TOTAL: &str = "attune_partition_takeovers_total";
    /// A summary (quantiles, `_sum`, `_count`): no buckets are configured for it.
    pub const PARTITION_REBUILD_SECONDS: &str = "attune_partition_rebuild_seconds";
    pub const FORWARDED_TOTAL: &str = "attune_forwarded_total";
    pub const INTAKE_LEADER: &str = "attune_intake_leader";
    pub const INSTANCE_RESTARTS_TOTAL: &str = "attune_instance_restarts_total";

    /// All of the above.
    pub const ALL: &[&str] = &[
        QUEUE_LENGTH,
        QUEUE_ACTIVE_COUNT,
        QUEUE_MAX_CONCURRENT,
        QUEUE_OLDEST_AGE_SECONDS,
        QUEUE_LAST_UPDATED,
        QUEUE_WAIT_SECONDS,
        EXECUTIONS_TOTAL,
        EXECUTIONS_BY_OUTCOME_TOTAL,
        ACTIONS_KNOWN,
        ACTIONS_EXPORTED,
        DLQ_MESSAGES_TOTAL,
        DLQ_SIZE,
        DLQ_SIZE_BY_QUEUE_FROM,
        HEALTH_STATUS,
        HEALTH_STUCK_EXECUTIONS,
        HEALTH_STALLED_QUEUES,
        HEALTH_LAST_CHECK,
        EMERGENCY_MODE,
        PURGE_CYCLE_SECONDS,
        PURGE_CYCLES_TOTAL,
        PURGE_ENTRIES_TOTAL,
        PURGE_LEDGER_ROWS_TOTAL,
        HTTP_REQUESTS_TOTAL,
        HTTP_REQUEST_DURATION_SECONDS,
        RABBITMQ_CONNECTED,
        RABBITMQ_RECONNECTS_TOTAL,
        UNMATCHED_COMPLETIONS_TOTAL,
        CANCELS_TOTAL,
        CONFIG_RELOADS_TOTAL,
        CONFIG_LAST_RELOAD_TIMESTAMP_SECONDS,
        RABBITMQ_ACKS_TOTAL,
        INTAKE_THROTTLED_TOTAL,
        DISPATCHES_DROPPED_TOTAL,
        DISPATCHES_UNROUTABLE_TOTAL,
        DISPATCH_BATCHES_TOTAL,
        PARTITIONS_OWNED,
        FENCED_WRITES_TOTAL,
        PARTITION_TAKEOVERS_TOTAL,
        PARTITION_REBUILD_SECONDS,
        FORWARDED_TOTAL,
        INTAKE_LEADER,
        INSTANCE_RESTARTS_TOTAL,
    ];

    /// Families with a sample from the first scrape after start: every unlabelled one, and
    /// the labelled ones whose label values are fixed and all exported from the start
    /// (`attune_dlq_size_by_queue_from`, `attune_config_reloads_total`,
    /// `attune_executions_by_outcome_total`). Those of the health
    /// check need `health.enabled` (the first check runs before HTTP answers); a value not
    /// measured yet is `NaN` (see [`super::first_samples`]).
    pub const FROM_START: &[&str] = &[
        QUEUE_WAIT_SECONDS,
        EXECUTIONS_BY_OUTCOME_TOTAL,
        ACTIONS_KNOWN,
        ACTIONS_EXPORTED,
        CONFIG_RELOADS_TOTAL,
        CONFIG_LAST_RELOAD_TIMESTAMP_SECONDS,
        HEALTH_STATUS,
        HEALTH_STUCK_EXECUTIONS,
        HEALTH_STALLED_QUEUES,
        HEALTH_LAST_CHECK,
        DLQ_SIZE,
        DLQ_SIZE_BY_QUEUE_FROM,
        EMERGENCY_MODE,
        PURGE_CYCLE_SECONDS,
        RABBITMQ_CONNECTED,
        RABBITMQ_RECONNECTS_TOTAL,
        INTAKE_THROTTLED_TOTAL,
        PARTITIONS_OWNED,
        FENCED_WRITES_TOTAL,
        PARTITION_TAKEOVERS_TOTAL,
        PARTITION_REBUILD_SECONDS,
        INTAKE_LEADER,
        INSTANCE_RESTARTS_TOTAL,
    ];

    /// Labelled by `action`: an action's series appear once the executor has seen it, so
    /// none before the first action. All but `attune_dispatches_unroutable_total` (counted by
    /// the RabbitMQ edge as dispatches come back, for the few actions without a worker
    /// queue) are written at scrape time for the busy and recent actions only
    /// ([`super::per_action`]).
    pub const PER_ACTION: &[&str] = &[
        QUEUE_LENGTH,
        QUEUE_ACTIVE_COUNT,
        QUEUE_MAX_CONCURRENT,
        QUEUE_OLDEST_AGE_SECONDS,
        QUEUE_LAST_UPDATED,
        EXECUTIONS_TOTAL,
        DISPATCHES_UNROUTABLE_TOTAL,
    ];

    /// Labelled by what happened (an error class, a verdict, a route and status, a purge
    /// mode): a series appears with the first event of its labels.
    pub const PER_EVENT: &[&str] = &[
        DLQ_MESSAGES_TOTAL,
        PURGE_CYCLES_TOTAL,
        PURGE_ENTRIES_TOTAL,
        PURGE_LEDGER_ROWS_TOTAL,
        HTTP_REQUESTS_TOTAL,
        HTTP_REQUEST_DURATION_SECONDS,
        UNMATCHED_COMPLETIONS_TOTAL,
        CANCELS_TOTAL,
        RABBITMQ_ACKS_TOTAL,
        DISPATCHES_DROPPED_TOTAL,
        DISPATCH_BATCHES_TOTAL,
        FORWARDED_TOTAL,
    ];

    /// The histograms, which Prometheus sees as `<name>_bucket`, `<name>_sum`, `<name>_count`.
    pub const HISTOGRAMS: &[&str] = &[QUEUE_WAIT_SECONDS, HTTP_REQUEST_DURATION_SECONDS];
}

/// Buckets of `attune_queue_wait_seconds`, in seconds. Chosen for the questions operators ask:
/// executions admitted at once wait microseconds and land in the first bucket, so "how many had
/// to queue at all" is one ratio; the sub-second buckets show a rate limit or a busy slot;
/// 600 s and 1800 s are exactly the runbook's "oldest enqueued > 10 min / > 30 min" levels (and
/// the health thresholds' defaults), so "share of executions that waited longer than that" is
/// exact rather than interpolated; 3600 s is the default queue timeout, past which nothing is
/// admitted. One histogram over all actions: fifteen buckets.
pub const WAIT_SECONDS_BUCKETS: &[f64] = &[
    0.005, 0.025, 0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
];

/// Buckets of `attune_http_request_duration_seconds`: the API answers from memory in well
/// under a millisecond; DLQ reads and replays talk to the broker and take up to seconds.
pub const HTTP_SECONDS_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0];

/// The `action` label of an event no action owns (a completion for an id nobody knows). The
/// parentheses cannot occur in an action ref, so it never collides with a real one.
pub const UNKNOWN_ACTION: &str = "(unknown)";

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("could not build the Prometheus recorder: {0}")]
    Build(String),
    #[error("another metrics recorder is already installed in this process: {0}")]
    Install(String),
}

/// The process recorder's configuration: the histograms' buckets. Tests build recorders of
/// their own from it.
pub fn builder() -> Result<PrometheusBuilder, MetricsError> {
    let build = |e: metrics_exporter_prometheus::BuildError| MetricsError::Build(e.to_string());
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(names::QUEUE_WAIT_SECONDS.to_owned()),
            WAIT_SECONDS_BUCKETS,
        )
        .map_err(build)?
        .set_buckets_for_metric(
            Matcher::Full(names::HTTP_REQUEST_DURATION_SECONDS.to_owned()),
            HTTP_SECONDS_BUCKETS,
        )
        .map_err(build)
}

/// Installs the Prometheus recorder as the process's `metrics` recorder and returns the handle
/// that renders it. Idempotent: a second call (a second service in the same test process)
/// gets the same handle.
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    static HANDLE: Mutex<Option<PrometheusHandle>> = Mutex::new(None);
    let mut slot = HANDLE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(handle) = slot.as_ref() {
        return Ok(handle.clone());
    }
    let handle = builder()?
        .install_recorder()
        .map_err(|e| MetricsError::Install(e.to_string()))?;
    describe();
    first_samples();
    *slot = Some(handle.clone());
    Ok(handle)
}

/// Every origin a dead letter of this executor can have (`queue_from`): the DLQ's split by
/// origin always exports each, as 0 when none.
pub const DLQ_ORIGINS: &[&str] = &["requested", "queued", "running", "completed", "cancel"];

/// The `queue_from` label of `attune_dlq_size_by_queue_from` for entries beyond those read
/// (the DLQ holds more than [`dlq::MAX_PEEK`](super::dlq::MAX_PEEK)). The parentheses keep it
/// apart from every real origin.
pub const UNREAD_QUEUE_FROM: &str = "(unread)";

/// Gives each unlabelled family (and the DLQ's split by origin) its sample before anything
/// has happened, once per process, so that an `absent()` rule does not fire after a restart
/// and `rate()` sees the first increment: counters at 0; gauges not measured yet at `NaN`,
/// which Prometheus keeps as a value, compares as false in every rule, and Grafana shows as
/// no value (the DLQ's size until a health check has read it, the last purge cycle's
/// duration until one has run); the rebuild summary empty. The health gauges come from the
/// first health check, which the service runs before HTTP answers; the gauges whose value
/// depends on the instance's mode are set by the service at start (`app`).
fn first_samples() {
    for counter in [
        names::RABBITMQ_RECONNECTS_TOTAL,
        names::INTAKE_THROTTLED_TOTAL,
        names::FENCED_WRITES_TOTAL,
        names::PARTITION_TAKEOVERS_TOTAL,
        names::INSTANCE_RESTARTS_TOTAL,
    ] {
        metrics::counter!(counter).increment(0);
    }
    metrics::gauge!(names::RABBITMQ_CONNECTED).set(0.0);
    metrics::gauge!(names::PURGE_CYCLE_SECONDS).set(f64::NAN);
    metrics::gauge!(names::DLQ_SIZE).set(f64::NAN);
    for origin in DLQ_ORIGINS.iter().chain([&UNREAD_QUEUE_FROM]) {
        metrics::gauge!(names::DLQ_SIZE_BY_QUEUE_FROM, "queue_from" => *origin).set(f64::NAN);
    }
    for outcome in Outcome::ALL {
        metrics::counter!(names::EXECUTIONS_BY_OUTCOME_TOTAL, "outcome" => outcome.as_str())
            .increment(0);
    }
    // Registered without a sample: rendered with a count of 0.
    let _ = metrics::histogram!(names::PARTITION_REBUILD_SECONDS);
    let _ = metrics::histogram!(names::QUEUE_WAIT_SECONDS);
}

/// The `# HELP` lines.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_histogram!(
        names::QUEUE_WAIT_SECONDS,
        "Seconds admitted executions waited in the queue, over all actions (the oldest wait \
         of each action is attune_queue_oldest_age_seconds and the API's oldest_enqueued_at)"
    );
    describe_counter!(
        names::EXECUTIONS_BY_OUTCOME_TOTAL,
        "Execution events over all actions by outcome: accepted, rejected, succeeded, failed, \
         canceled, timeout, purged, no_route, reclaimed, unmatched"
    );
    describe_counter!(
        names::CANCELS_TOTAL,
        "Cancels from the cancels queue by verdict: canceled, running (left to its worker), \
         unknown (nothing to cancel) and remembered (its request had not come yet; it is \
         canceled when it does)"
    );
    describe_counter!(
        names::CONFIG_RELOADS_TOTAL,
        "Configuration reloads (SIGHUP or POST /api/v1/admin/reload) by result: applied, \
         unchanged, invalid (refused, nothing changed)"
    );
    describe_gauge!(
        names::CONFIG_LAST_RELOAD_TIMESTAMP_SECONDS,
        "Unix time the configuration in force was read: at start, then by each reload that \
         was not invalid"
    );
    describe_counter!(
        names::DLQ_MESSAGES_TOTAL,
        "Dead letters published, by the stage they came from and their error class"
    );
    describe_gauge!(
        names::DLQ_SIZE,
        "Messages ready in attune.dlq at the last health check (passive declare)"
    );
    describe_gauge!(
        names::HEALTH_STATUS,
        "Last health check: 0 healthy, 1 degraded, 2 unhealthy"
    );
    describe_gauge!(
        names::HEALTH_STUCK_EXECUTIONS,
        "Running executions without a completion for longer than health.thresholds.stuck_age_seconds"
    );
    describe_gauge!(
        names::HEALTH_STALLED_QUEUES,
        "Queues with executions waiting and no progress for health.thresholds.stalled_seconds"
    );
    describe_gauge!(
        names::HEALTH_LAST_CHECK,
        "Unix time of the last completed health check"
    );
    describe_gauge!(
        names::EMERGENCY_MODE,
        "1 when executor.emergency_mode is on"
    );
    describe_gauge!(
        names::PURGE_CYCLE_SECONDS,
        "Duration of the last purge cycle"
    );
    describe_counter!(names::PURGE_CYCLES_TOTAL, "Purge cycles run, by mode");
    describe_counter!(
        names::PURGE_ENTRIES_TOTAL,
        "Executions a purge removed (mode=live) or found (mode=dry_run), by state"
    );
    describe_counter!(
        names::HTTP_REQUESTS_TOTAL,
        "HTTP requests by method, matched route and status"
    );
    describe_histogram!(
        names::HTTP_REQUEST_DURATION_SECONDS,
        "HTTP request duration by method and matched route"
    );
}

/// Sets the per-action queue gauges from the latest counters, as of `now`.
///
/// `attune_queue_last_updated` is the time the queue last *moved* while executions wait in
/// it, and the scrape time when none waits. The runbook's rule `attune_queue_last_updated <
/// time() - 600` means "queue not progressing": a queue that only grows (its counters change
/// on every arrival) is exactly the stuck case and must not look fresh, and a quiet action
/// with nothing waiting is not stuck and must not fire a critical alert. Long-running
/// executions are covered by `attune_health_stuck_executions` instead. This matches the health
/// check's "stalled" rule.
pub fn refresh_queue_gauges(stats: &[QueueStats], now: DateTime<Utc>) {
    let now_unix = unix_seconds(now);
    for s in stats {
        let action = s.action_ref.as_str().to_owned();
        metrics::gauge!(names::QUEUE_LENGTH, "action" => action.clone()).set(s.queue_length as f64);
        metrics::gauge!(names::QUEUE_ACTIVE_COUNT, "action" => action.clone())
            .set(s.active_count as f64);
        metrics::gauge!(names::QUEUE_MAX_CONCURRENT, "action" => action.clone())
            .set(f64::from(s.max_concurrent));
        metrics::gauge!(names::QUEUE_OLDEST_AGE_SECONDS, "action" => action.clone())
            .set(oldest_age_seconds(s, now));
        let last_updated = if s.queue_length == 0 {
            now_unix
        } else {
            unix_seconds(s.last_progress)
        };
        metrics::gauge!(names::QUEUE_LAST_UPDATED, "action" => action).set(last_updated);
    }
}

/// Seconds the oldest waiting execution has waited at `now`; 0 when nothing waits.
pub fn oldest_age_seconds(s: &QueueStats, now: DateTime<Utc>) -> f64 {
    s.oldest_enqueued_at
        .map(|t| ((now - t).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6).max(0.0))
        .unwrap_or(0.0)
}

fn unix_seconds(t: DateTime<Utc>) -> f64 {
    t.timestamp_micros() as f64 / 1e6
}

/// Renders `/metrics` and `/metrics/actions`.
///
/// `/metrics` is the process-wide recorder (everything not per action) followed by the
/// per-action series of the actions that are busy or changed within the idle window
/// ([`PerActionExporter`]).
#[derive(Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
    per_action: Arc<PerActionExporter>,
}

impl Metrics {
    /// `idle_after` is `executor.queue.metrics_idle_after_seconds`.
    pub fn new(
        handle: PrometheusHandle,
        stats: Arc<LatestStats>,
        tallies: Arc<ActionTallies>,
        idle_after: Duration,
    ) -> Self {
        Self {
            handle,
            per_action: Arc::new(PerActionExporter::new(stats, tallies, idle_after)),
        }
    }

    /// `GET /metrics` as of `now`.
    pub fn render(&self, now: DateTime<Utc>) -> String {
        let mut text = self.handle.render();
        text.push_str(&self.per_action.render(now));
        text
    }

    /// `GET /metrics/actions`: the per-action series of `actions`, busy or not, as of `now`.
    /// An action never seen has none.
    pub fn render_actions(&self, actions: &[ActionRef], now: DateTime<Utc>) -> String {
        self.per_action.render_named(actions, now)
    }

    /// Applies a new `executor.queue.metrics_idle_after_seconds` from the next scrape.
    pub fn set_idle_after(&self, idle_after: Duration) {
        self.per_action.set_idle_after(idle_after);
    }

    /// Folds recent histogram samples into their buckets. The recorder keeps every sample
    /// until this runs, so it must run periodically even when nobody scrapes.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// The `outcome` label of `attune_executions_total` and `attune_executions_by_outcome_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    Rejected,
    Succeeded,
    Failed,
    Canceled,
    Timeout,
    Purged,
    NoRoute,
    Reclaimed,
    Unmatched,
}

impl Outcome {
    /// Every outcome, in the order of their index.
    pub const ALL: [Outcome; 10] = [
        Outcome::Accepted,
        Outcome::Rejected,
        Outcome::Succeeded,
        Outcome::Failed,
        Outcome::Canceled,
        Outcome::Timeout,
        Outcome::Purged,
        Outcome::NoRoute,
        Outcome::Reclaimed,
        Outcome::Unmatched,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Rejected => "rejected",
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::Canceled => "canceled",
            Outcome::Timeout => "timeout",
            Outcome::Purged => "purged",
            Outcome::NoRoute => "no_route",
            Outcome::Reclaimed => "reclaimed",
            Outcome::Unmatched => "unmatched",
        }
    }

    /// Its place in [`Outcome::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// The outcome an event counts as, and the action it belongs to; `None` for the events that
/// are no execution's outcome.
pub fn outcome(event: &Event) -> Option<(Option<&ActionRef>, Outcome)> {
    Some(match event {
        Event::Accepted { action, .. } => (Some(action), Outcome::Accepted),
        Event::Rejected { action, .. } => (Some(action), Outcome::Rejected),
        Event::Completed { action, status, .. } => (
            Some(action),
            match status {
                EndStatus::Succeeded => Outcome::Succeeded,
                EndStatus::Failed => Outcome::Failed,
                EndStatus::Canceled => Outcome::Canceled,
                EndStatus::Timeout => Outcome::Timeout,
            },
        ),
        Event::Removed { action, reason, .. } => (
            Some(action),
            match reason {
                RemovalReason::Canceled => Outcome::Canceled,
                // The queue timeout: the execution never ran, like a worker-side timeout it
                // did not finish in the time it had.
                RemovalReason::TimedOut => Outcome::Timeout,
                RemovalReason::Purged => Outcome::Purged,
                RemovalReason::NoRoute => Outcome::NoRoute,
            },
        ),
        Event::Reclaimed { action, .. } => (Some(action), Outcome::Reclaimed),
        Event::Unmatched { action, .. } => (action.as_ref(), Outcome::Unmatched),
        // Admissions are not an outcome; they feed the wait histogram. A dispatch that came
        // back will go out again (attune_dispatches_unroutable_total counts it), and a mark on
        // an id not requested yet is counted by attune_cancels_total{verdict="remembered"}.
        Event::Admitted { .. } | Event::Returned { .. } | Event::CanceledAhead { .. } => {
            return None;
        }
    })
}

/// Counts events on their way to the next sink, which gets them unchanged.
///
/// Runs inside the actors' handlers, so it only touches atomics: the per-action counts are
/// plain atomics in [`ActionTallies`] (no label set is built per event, and no series exists
/// for them until a scrape writes one), the totals and the wait histogram are handles made
/// once.
pub struct MetricsSink {
    inner: Arc<dyn OutcomeSink>,
    tallies: Arc<ActionTallies>,
    by_outcome: [Counter; Outcome::ALL.len()],
    waits: Histogram,
}

impl MetricsSink {
    /// Counts into `tallies` (shared with the [`Metrics`] that exports them) and the
    /// process's recorder.
    pub fn new(inner: Arc<dyn OutcomeSink>, tallies: Arc<ActionTallies>) -> Self {
        Self {
            inner,
            tallies,
            by_outcome: Outcome::ALL.map(
                |o| metrics::counter!(names::EXECUTIONS_BY_OUTCOME_TOTAL, "outcome" => o.as_str()),
            ),
            waits: metrics::histogram!(names::QUEUE_WAIT_SECONDS),
        }
    }

    fn count(&self, event: &Event, now: DateTime<Utc>) {
        if let Event::Admitted { waited, .. } = event {
            self.waits.record(waited.as_secs_f64());
            return;
        }
        if let Some((action, outcome)) = outcome(event) {
            self.by_outcome[outcome.index()].increment(1);
            self.tallies.count(action, outcome, now);
        }
    }
}

impl OutcomeSink for MetricsSink {
    fn record(&self, events: Vec<Event>) {
        let now = Utc::now();
        for event in &events {
            self.count(event, now);
        }
        self.inner.record(events);
    }
}

#[cfg(test)]
mod tests {
    use super::names;

    #[test]
    fn every_family_is_of_exactly_one_kind() {
        let kinds = [names::FROM_START, names::PER_ACTION, names::PER_EVENT];
        for name in names::ALL {
            let n = kinds.iter().filter(|k| k.contains(name)).count();
            assert_eq!(
                n, 1,
                "{name} is in {n} of FROM_START, PER_ACTION, PER_EVENT"
            );
        }
        for name in kinds.iter().flat_map(|k| k.iter()) {
            assert!(names::ALL.contains(name), "{name} is not in ALL");
        }
    }
}
