//! The periodic health check behind `GET /health` and `attune_health_status`.
//!
//! [`evaluate`] is a pure function of the inputs (queue counters, DLQ size, stuck count,
//! thresholds, the time), so every verdict is unit-tested without actors or a broker;
//! [`HealthMonitor`] gathers the inputs every `health.interval_seconds`, exports the result,
//! logs it and keeps the latest for `/health`. A configuration reload changes the thresholds,
//! the interval and whether checks run at all ([`HealthMonitor::reconfigure`]); the next check
//! then runs at once.
//!
//! Rules, all with strict `>` (a value equal to a threshold is still within it):
//!
//! | check | unhealthy | degraded |
//! | --- | --- | --- |
//! | `queue_length` (longest queue) | > `queue_length_critical` | > `queue_length_warning` |
//! | `oldest_age` (longest wait, seconds) | > `oldest_age_critical_seconds` | > `oldest_age_warning_seconds` |
//! | `dlq` (messages in `attune.dlq`) | > `dlq_critical` | > `dlq_warning`, or the size cannot be read |
//! | `stuck_executions` (running longer than `stuck_age_seconds`) | > `stuck_critical` | > `stuck_warning` |
//! | `stalled_queues` (executions waiting, no progress for `stalled_seconds`) | > 0 | — |
//!
//! The overall status is unhealthy if any check is, else degraded if any check is, else healthy.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use super::dlq::{Dlq, DlqStats};
use super::hooks::HealthStore;
use super::metrics::names;
use crate::config::HealthThresholds;
use crate::core::{Executor, QueueStats};

// Re-exported as well as used: the Postgres edge and the tests name them by these paths.
pub use super::health_report::{Check, HealthReport, Status, Totals};

/// What is known about the dead-letter queue's depth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DlqReading {
    /// Messages ready in `attune.dlq`.
    Known(u64),
    /// The broker could not be asked; the reason, for the report.
    Unavailable(String),
    /// `dlq.enabled` is false: nothing is dead-lettered to the queue, so it is not checked.
    Disabled,
}

/// Everything one check looks at.
#[derive(Debug, Clone)]
pub struct HealthInput<'a> {
    pub stats: &'a [QueueStats],
    pub dlq: DlqReading,
    /// Running executions older than `stuck_age_seconds`, per action.
    pub stuck: &'a [(crate::model::ActionRef, usize)],
    pub now: DateTime<Utc>,
    pub emergency_mode: bool,
}

/// `value > critical` is unhealthy, else `value > warning` is degraded.
fn grade(value: u64, warning: u64, critical: u64) -> Status {
    if value > critical {
        Status::Unhealthy
    } else if value > warning {
        Status::Degraded
    } else {
        Status::Healthy
    }
}

/// Seconds from `earlier` to `now`, never negative (whole seconds, as every age check
/// compares them).
pub(crate) fn seconds_since(now: DateTime<Utc>, earlier: DateTime<Utc>) -> u64 {
    u64::try_from((now - earlier).num_seconds()).unwrap_or(0)
}

/// The largest value over actions, with the actions that have it.
fn worst(values: impl Iterator<Item = (u64, String)>) -> (u64, Option<String>) {
    let mut max = 0;
    let mut at: Vec<String> = Vec::new();
    for (v, action) in values {
        if v > max {
            max = v;
            at.clear();
        }
        if v == max && v > 0 {
            at.push(action);
        }
    }
    let detail = (!at.is_empty()).then(|| format!("longest in {}", list(&at)));
    (max, detail)
}

/// At most five names, then a count, so a report stays readable with a thousand actions.
fn list(names: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut s = names
        .iter()
        .take(SHOWN)
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}

/// Judges one set of inputs. Pure: same inputs, same report.
pub fn evaluate(input: &HealthInput<'_>, t: &HealthThresholds) -> HealthReport {
    let now = input.now;
    let mut checks = BTreeMap::new();

    let (longest, at) = worst(
        input
            .stats
            .iter()
            .map(|s| (s.queue_length as u64, s.action_ref.to_string())),
    );
    checks.insert(
        "queue_length",
        Check {
            status: grade(longest, t.queue_length_warning, t.queue_length_critical),
            value: Some(longest as f64),
            warning: Some(t.queue_length_warning),
            critical: Some(t.queue_length_critical),
            detail: at,
        },
    );

    let (oldest, at) = worst(input.stats.iter().filter_map(|s| {
        s.oldest_enqueued_at
            .map(|t| (seconds_since(now, t), s.action_ref.to_string()))
    }));
    checks.insert(
        "oldest_age",
        Check {
            status: grade(
                oldest,
                t.oldest_age_warning_seconds,
                t.oldest_age_critical_seconds,
            ),
            value: Some(oldest as f64),
            warning: Some(t.oldest_age_warning_seconds),
            critical: Some(t.oldest_age_critical_seconds),
            detail: at,
        },
    );

    let dlq_check = match &input.dlq {
        DlqReading::Known(n) => Check {
            status: grade(*n, t.dlq_warning, t.dlq_critical),
            value: Some(*n as f64),
            warning: Some(t.dlq_warning),
            critical: Some(t.dlq_critical),
            detail: None,
        },
        // Not knowing means the broker connection is in trouble: worth a look, not an alarm
        // on its own (the edge's reconnects have their own metric).
        DlqReading::Unavailable(why) => Check {
            status: Status::Degraded,
            value: None,
            warning: Some(t.dlq_warning),
            critical: Some(t.dlq_critical),
            detail: Some(format!("could not read the DLQ size: {why}")),
        },
        DlqReading::Disabled => Check {
            status: Status::Healthy,
            value: None,
            warning: None,
            critical: None,
            detail: Some("dlq.enabled is false".to_owned()),
        },
    };
    checks.insert("dlq", dlq_check);

    let stuck: u64 = input.stuck.iter().map(|(_, n)| *n as u64).sum();
    let stuck_actions: Vec<String> = input.stuck.iter().map(|(a, _)| a.to_string()).collect();
    checks.insert(
        "stuck_executions",
        Check {
            status: grade(stuck, t.stuck_warning, t.stuck_critical),
            value: Some(stuck as f64),
            warning: Some(t.stuck_warning),
            critical: Some(t.stuck_critical),
            detail: Some(format!(
                "running longer than {}s{}",
                t.stuck_age_seconds,
                if stuck_actions.is_empty() {
                    String::new()
                } else {
                    format!(" in {}", list(&stuck_actions))
                }
            )),
        },
    );

    let stalled: Vec<String> = input
        .stats
        .iter()
        .filter(|s| s.queue_length > 0 && seconds_since(now, s.last_progress) > t.stalled_seconds)
        .map(|s| s.action_ref.to_string())
        .collect();
    checks.insert(
        "stalled_queues",
        Check {
            status: grade(stalled.len() as u64, 0, 0),
            value: Some(stalled.len() as f64),
            warning: None,
            critical: Some(0),
            detail: Some(format!(
                "executions waiting and no progress for more than {}s{}",
                t.stalled_seconds,
                if stalled.is_empty() {
                    String::new()
                } else {
                    format!(": {}", list(&stalled))
                }
            )),
        },
    );

    // Dispatches the broker returns: nothing is bound to take them. Degraded, not unhealthy:
    // the executions wait in order (and the stalled check turns unhealthy if it lasts).
    let unroutable: Vec<String> = input
        .stats
        .iter()
        // Only while executions wait for a route: an action left idle keeps its state until
        // its next dispatch is delivered, and nothing suffers meanwhile.
        .filter(|s| s.no_route_since.is_some() && s.queue_length > 0)
        .map(|s| s.action_ref.to_string())
        .collect();
    checks.insert(
        "no_route",
        Check {
            status: if unroutable.is_empty() {
                Status::Healthy
            } else {
                Status::Degraded
            },
            value: Some(unroutable.len() as f64),
            warning: Some(0),
            critical: None,
            detail: Some(if unroutable.is_empty() {
                "every action's dispatches reach a worker queue".to_owned()
            } else {
                format!(
                    "dispatches come back from the broker, no worker queue being bound to \
                     execution.dispatch.<action>: {}",
                    list(&unroutable)
                )
            }),
        },
    );

    // Unhealthy first: one critical check outweighs any number of warnings.
    let status = if checks.values().any(|c| c.status == Status::Unhealthy) {
        Status::Unhealthy
    } else if checks.values().any(|c| c.status == Status::Degraded) {
        Status::Degraded
    } else {
        Status::Healthy
    };
    let totals = Totals {
        actions: input.stats.len(),
        queued: input.stats.iter().map(|s| s.queue_length as u64).sum(),
        active: input.stats.iter().map(|s| s.active_count as u64).sum(),
        dlq: match input.dlq {
            DlqReading::Known(n) => Some(n),
            _ => None,
        },
        stuck,
        stalled: stalled.len() as u64,
    };
    HealthReport {
        status,
        last_check: now,
        emergency_mode: input.emergency_mode,
        checks,
        totals,
    }
}

/// Longest the service waits at start for its RabbitMQ session (topology declared) before the
/// first check, which it runs before HTTP answers: so that the first report does not flag a
/// DLQ that simply does not exist yet, and so that `attune_health_status` and `/health` have
/// a real result from the first scrape. A broker still unreachable by then is what the first
/// report says (the `dlq` check degraded).
pub const FIRST_CHECK_WAIT: Duration = Duration::from_secs(5);

/// Longest the [`HealthStore`] may take to keep one result; past it the result is not kept
/// and the check goes on (a slow Postgres must not hold up `/health` and the gauges).
pub const STORE_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest the DLQ may be read to count its entries by origin (see [`HealthMonitor::check`]).
pub const DLQ_BREAKDOWN_TIMEOUT: Duration = Duration::from_secs(10);

use super::metrics::DLQ_ORIGINS as QUEUE_FROMS;
pub use super::metrics::UNREAD_QUEUE_FROM;

/// When [`HealthMonitor::run_scheduled`] checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Schedule {
    /// Not said yet: nothing runs checks but whoever calls [`HealthMonitor::check`].
    Unset,
    /// `health.enabled` is false.
    Off,
    /// Every `health.interval_seconds`.
    Every(Duration),
}

/// Runs the checks and keeps the latest result.
pub struct HealthMonitor {
    /// Asked for every action's counters and the stuck count.
    executor: Arc<Executor>,
    /// `None` without a DLQ reader; a reader whose `dlq.enabled` is off is not asked either.
    dlq: Option<Arc<Dlq>>,
    /// `health.thresholds`; a configuration reload replaces them.
    thresholds: std::sync::RwLock<HealthThresholds>,
    /// Shown in the report and the log line: it changes what the queue checks mean.
    emergency_mode: std::sync::atomic::AtomicBool,
    /// When checks run. Changed by a configuration reload, which
    /// [`HealthMonitor::run_scheduled`] follows.
    schedule: watch::Sender<Schedule>,
    /// Where each result goes besides memory (Postgres with the ledger).
    store: Arc<dyn super::hooks::HealthStore>,
    /// Whether each check also reads the DLQ to export its size by origin: only worth the
    /// broker reads when metrics are exported.
    dlq_breakdown: bool,
    /// Origins exported before that are not in [`QUEUE_FROMS`], so they go back to 0 when
    /// they leave the DLQ rather than keep their last count.
    extra_origins: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// The latest result, for `/health`.
    latest: watch::Sender<Option<Arc<HealthReport>>>,
    /// The last check's stuck executions per action (only actions with some), for the
    /// per-action flags of the operations page.
    stuck: std::sync::Mutex<Arc<std::collections::HashMap<crate::model::ActionRef, usize>>>,
}

impl HealthMonitor {
    /// `dlq` is `None` when there is no DLQ to read.
    pub fn new(
        executor: Arc<Executor>,
        dlq: Option<Arc<Dlq>>,
        thresholds: HealthThresholds,
        emergency_mode: bool,
        store: Arc<dyn HealthStore>,
    ) -> Self {
        Self {
            executor,
            dlq,
            thresholds: std::sync::RwLock::new(thresholds),
            emergency_mode: std::sync::atomic::AtomicBool::new(emergency_mode),
            schedule: watch::channel(Schedule::Unset).0,
            store,
            dlq_breakdown: true,
            extra_origins: std::sync::Mutex::new(std::collections::BTreeSet::new()),
            latest: watch::channel(None).0,
            stuck: std::sync::Mutex::default(),
        }
    }

    /// Whether each check reads the DLQ's entries to export `attune_dlq_size_by_queue_from`
    /// (on by default; the service turns it off when metrics are off).
    pub fn with_dlq_breakdown(mut self, on: bool) -> Self {
        self.dlq_breakdown = on;
        self
    }

    /// The last check's result; `None` before the first one (or when checks are disabled).
    pub fn latest(&self) -> Option<Arc<HealthReport>> {
        self.latest.borrow().clone()
    }

    pub fn emergency_mode(&self) -> bool {
        self.emergency_mode
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The thresholds in force.
    pub fn thresholds(&self) -> HealthThresholds {
        self.thresholds
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// New settings from a configuration reload. With checks on (`interval` is `Some`), the
    /// next check runs at once, so `/health` shows the new thresholds within one check, and
    /// the ones after every `interval`; with checks off (`None`), the last result is dropped,
    /// as if checks had never run, and `/health` says only that the process is up.
    pub fn reconfigure(
        &self,
        thresholds: HealthThresholds,
        emergency_mode: bool,
        interval: Option<Duration>,
    ) {
        *self.thresholds.write().unwrap_or_else(|p| p.into_inner()) = thresholds;
        self.emergency_mode
            .store(emergency_mode, std::sync::atomic::Ordering::Relaxed);
        if interval.is_none() {
            self.latest.send_replace(None);
            *self.stuck.lock().unwrap_or_else(|p| p.into_inner()) = Arc::default();
        }
        self.set_schedule(interval);
    }

    /// Checks every `interval`, or none (`health.enabled` false); see
    /// [`HealthMonitor::run_scheduled`].
    pub fn set_schedule(&self, interval: Option<Duration>) {
        // Replaced even when equal: the loop takes every change as "check now".
        self.schedule
            .send_replace(interval.map_or(Schedule::Off, Schedule::Every));
    }

    /// Per action, its executions the last check found running longer than
    /// `stuck_age_seconds` (actions with none are absent; empty before the first check).
    pub fn stuck_by_action(
        &self,
    ) -> Arc<std::collections::HashMap<crate::model::ActionRef, usize>> {
        self.stuck.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Runs one check now: gathers the inputs, judges, exports, logs, stores, keeps.
    ///
    /// With the DLQ breakdown on, it also reads the entries at the head of the DLQ, the way
    /// `dlq stats` does (at most [`dlq::MAX_PEEK`](super::dlq::MAX_PEEK), within
    /// [`DLQ_BREAKDOWN_TIMEOUT`]; nothing when the DLQ is empty), and sets
    /// `attune_dlq_size_by_queue_from{queue_from}`. RabbitMQ counts only the whole queue, so
    /// this is the one honest way to split it. **How stale:** the values are those of the
    /// last check, i.e. up to `health.interval_seconds` plus the read old; entries beyond the
    /// first 1,000 are counted under [`UNREAD_QUEUE_FROM`]; when a read fails the gauges keep
    /// their last values (the failure is logged, and `attune_dlq_size` still moves).
    pub async fn check(&self) -> Arc<HealthReport> {
        let thresholds = self.thresholds();
        let emergency_mode = self.emergency_mode();
        let stats = self.executor.all_stats().await;
        let stuck = self
            .executor
            .count_stuck(Duration::from_secs(thresholds.stuck_age_seconds))
            .await;
        let dlq = match self.dlq.as_ref().filter(|d| d.is_enabled()) {
            None => DlqReading::Disabled,
            Some(dlq) => match dlq.size().await {
                Ok(n) => DlqReading::Known(n),
                Err(e) => DlqReading::Unavailable(e.to_string()),
            },
        };
        let report = Arc::new(evaluate(
            &HealthInput {
                stats: &stats,
                dlq,
                stuck: &stuck,
                // The core's clock, which every time in `stats` comes from: the wall clock
                // can step (NTP) while the core's cannot, and paused tokio time drives it in
                // tests.
                now: self.executor.clock().wall(self.executor.clock().now()),
                emergency_mode,
            },
            &thresholds,
        ));
        export(&report);
        if report.status == Status::Healthy {
            tracing::info!("{}", report.log_line());
        } else {
            tracing::warn!("{}", report.log_line());
        }
        if let (true, Some(dlq), Some(size)) = (self.dlq_breakdown, &self.dlq, report.totals.dlq) {
            self.export_dlq_breakdown(dlq, size).await;
        }
        match tokio::time::timeout(STORE_TIMEOUT, self.store.store(&report)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "[health] could not store the health check result");
            }
            Err(_) => tracing::warn!(
                "[health] storing the health check result took longer than {STORE_TIMEOUT:?}; \
                 not stored"
            ),
        }
        *self.stuck.lock().unwrap_or_else(|p| p.into_inner()) =
            Arc::new(stuck.into_iter().collect());
        // Checks turned off meanwhile: the result is dropped, as `reconfigure` promises.
        if *self.schedule.borrow() != Schedule::Off {
            self.latest.send_replace(Some(report.clone()));
        }
        report
    }

    /// Checks every `interval` until `shutdown` turns true (see
    /// [`HealthMonitor::run_scheduled`]).
    pub async fn run(self: Arc<Self>, interval: Duration, shutdown: watch::Receiver<bool>) {
        self.set_schedule(Some(interval));
        self.run_scheduled(shutdown).await;
    }

    /// Checks as the schedule says until `shutdown` turns true: every `health.interval_seconds`,
    /// or not at all while `health.enabled` is false. One task, so checks never overlap; a
    /// check that overruns the interval delays the next one. The first check comes one
    /// interval from now: the service runs the first check itself, before HTTP answers (see
    /// [`FIRST_CHECK_WAIT`]). After a reconfiguration (checks switched on by a reload, or a
    /// new interval) the next check comes at once.
    pub async fn run_scheduled(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let every = |s: &Schedule| match s {
            Schedule::Every(interval) => Some(*interval),
            Schedule::Unset | Schedule::Off => None,
        };
        let mut ticker = super::Ticker::new(
            self.schedule.subscribe(),
            every,
            Duration::MAX,
            Duration::ZERO,
        );
        while ticker.next(&mut shutdown).await {
            tokio::select! {
                _ = self.check() => {}
                _ = super::stopped(&mut shutdown) => return,
            }
        }
    }
}

impl HealthMonitor {
    /// Reads the DLQ's head and sets the per-origin gauges (see [`HealthMonitor::check`]).
    async fn export_dlq_breakdown(&self, dlq: &Dlq, size: u64) {
        let stats = if size == 0 {
            // Nothing to read; every origin is 0.
            DlqStats::of(&super::dlq::Peek {
                queue_size: 0,
                entries: Vec::new(),
                matched: 0,
                scanned: 0,
            })
        } else {
            match dlq
                .peek_within(super::dlq::MAX_PEEK, DLQ_BREAKDOWN_TIMEOUT)
                .await
            {
                Ok(peek) => DlqStats::of(&peek),
                Err(e) => {
                    tracing::warn!(error = %e, "[health] could not read the DLQ to count its \
                        entries by queue_from; attune_dlq_size_by_queue_from keeps its last values");
                    return;
                }
            }
        };
        let mut extra = self.extra_origins.lock().unwrap_or_else(|p| p.into_inner());
        for origin in QUEUE_FROMS
            .iter()
            .copied()
            .chain(extra.iter().map(String::as_str))
        {
            let n = stats.by_queue_from.get(origin).copied().unwrap_or(0);
            ::metrics::gauge!(names::DLQ_SIZE_BY_QUEUE_FROM, "queue_from" => origin.to_owned())
                .set(n as f64);
        }
        for (origin, n) in &stats.by_queue_from {
            if !QUEUE_FROMS.contains(&origin.as_str()) {
                ::metrics::gauge!(names::DLQ_SIZE_BY_QUEUE_FROM, "queue_from" => origin.clone())
                    .set(*n as f64);
                extra.insert(origin.clone());
            }
        }
        let unread = stats.queue_size.saturating_sub(stats.sampled as u64);
        ::metrics::gauge!(names::DLQ_SIZE_BY_QUEUE_FROM, "queue_from" => UNREAD_QUEUE_FROM)
            .set(unread as f64);
    }
}

/// Sets the health gauges from a report.
fn export(report: &HealthReport) {
    ::metrics::gauge!(names::HEALTH_STATUS).set(report.status.gauge());
    ::metrics::gauge!(names::HEALTH_STUCK_EXECUTIONS).set(report.totals.stuck as f64);
    ::metrics::gauge!(names::HEALTH_STALLED_QUEUES).set(report.totals.stalled as f64);
    ::metrics::gauge!(names::HEALTH_LAST_CHECK)
        .set(report.last_check.timestamp_micros() as f64 / 1e6);
    // Left at its last value when unknown: a gap is better shown by the DLQ check's verdict
    // than by a drop to zero that would look like an emptied queue.
    if let Some(n) = report.totals.dlq {
        ::metrics::gauge!(names::DLQ_SIZE).set(n as f64);
    }
}

impl std::fmt::Debug for HealthMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthMonitor")
            .field("thresholds", &self.thresholds())
            .finish()
    }
}

/// Shared with the per-action flags' tests ([`super::flags`]), which judge by the same rules.
#[cfg(test)]
pub(crate) mod tests {
    use chrono::TimeZone;

    use super::*;
    use crate::model::ActionRef;

    pub(crate) fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 22, 12, 0, 0)
            .single()
            .expect("a time")
    }

    fn t() -> HealthThresholds {
        HealthThresholds::default()
    }

    /// An action with `queued` waiting (the oldest for `age` seconds, progress `idle` seconds
    /// ago) and `active` running.
    pub(crate) fn queue(
        name: &str,
        queued: usize,
        active: usize,
        age: i64,
        idle: i64,
    ) -> QueueStats {
        let n = now();
        QueueStats {
            queue_length: queued,
            active_count: active,
            max_concurrent: 1,
            oldest_enqueued_at: (queued > 0).then(|| n - chrono::Duration::seconds(age)),
            last_progress: n - chrono::Duration::seconds(idle),
            ..QueueStats::empty(ActionRef::parse(name).expect("valid ref"), n)
        }
    }

    fn judge(stats: &[QueueStats], dlq: DlqReading, stuck: usize) -> HealthReport {
        let stuck = if stuck > 0 {
            vec![(ActionRef::parse("s").expect("ref"), stuck)]
        } else {
            vec![]
        };
        evaluate(
            &HealthInput {
                stats,
                dlq,
                stuck: &stuck,
                now: now(),
                emergency_mode: false,
            },
            &t(),
        )
    }

    fn check(r: &HealthReport, name: &str) -> Status {
        r.checks[name].status
    }

    #[test]
    fn no_actions_an_empty_dlq_and_nothing_stuck_is_healthy() {
        let r = judge(&[], DlqReading::Known(0), 0);
        assert_eq!(r.status, Status::Healthy);
        assert!(r.checks.values().all(|c| c.status == Status::Healthy));
    }

    #[test]
    fn queue_length_turns_degraded_only_above_the_warning_and_unhealthy_only_above_critical() {
        for (len, want) in [
            (100, Status::Healthy),
            (101, Status::Degraded),
            (500, Status::Degraded),
            (501, Status::Unhealthy),
        ] {
            let r = judge(&[queue("a", len, 0, 0, 0)], DlqReading::Known(0), 0);
            assert_eq!(check(&r, "queue_length"), want, "length {len}");
            assert_eq!(r.status, want, "length {len}");
        }
    }

    #[test]
    fn the_oldest_wait_turns_degraded_above_ten_minutes_and_unhealthy_above_thirty() {
        for (age, want) in [
            (600, Status::Healthy),
            (601, Status::Degraded),
            (1800, Status::Degraded),
            (1801, Status::Unhealthy),
        ] {
            let r = judge(&[queue("a", 1, 0, age, 0)], DlqReading::Known(0), 0);
            assert_eq!(check(&r, "oldest_age"), want, "age {age}");
            assert_eq!(r.checks["oldest_age"].value, Some(age as f64));
        }
    }

    #[test]
    fn the_dlq_size_turns_degraded_above_the_warning_and_unhealthy_above_critical() {
        for (n, want) in [
            (100, Status::Healthy),
            (101, Status::Degraded),
            (1000, Status::Degraded),
            (1001, Status::Unhealthy),
        ] {
            let r = judge(&[], DlqReading::Known(n), 0);
            assert_eq!(check(&r, "dlq"), want, "dlq {n}");
            assert_eq!(r.status, want, "dlq {n}");
        }
    }

    #[test]
    fn an_unreadable_dlq_is_degraded_and_a_disabled_one_is_not_checked() {
        let r = judge(&[], DlqReading::Unavailable("connection refused".into()), 0);
        assert_eq!(r.status, Status::Degraded);
        assert_eq!(r.checks["dlq"].value, None);
        assert!(
            r.checks["dlq"]
                .detail
                .as_deref()
                .is_some_and(|d| d.contains("connection refused"))
        );
        let r = judge(&[], DlqReading::Disabled, 0);
        assert_eq!(r.status, Status::Healthy);
        assert_eq!(r.totals.dlq, None);
    }

    #[test]
    fn stuck_executions_turn_degraded_above_the_warning_and_unhealthy_above_critical() {
        for (n, want) in [
            (10, Status::Healthy),
            (11, Status::Degraded),
            (50, Status::Degraded),
            (51, Status::Unhealthy),
        ] {
            let r = judge(&[], DlqReading::Known(0), n);
            assert_eq!(check(&r, "stuck_executions"), want, "stuck {n}");
            assert_eq!(r.totals.stuck, n as u64);
        }
    }

    #[test]
    fn a_non_empty_queue_without_progress_for_longer_than_stalled_seconds_is_unhealthy() {
        let r = judge(&[queue("a", 1, 1, 0, 601)], DlqReading::Known(0), 0);
        assert_eq!(check(&r, "stalled_queues"), Status::Unhealthy);
        assert_eq!(r.status, Status::Unhealthy);
        assert_eq!(r.totals.stalled, 1);
        assert!(
            r.checks["stalled_queues"]
                .detail
                .as_deref()
                .is_some_and(|d| d.contains("'a'"))
        );
    }

    #[test]
    fn a_queue_idle_for_exactly_stalled_seconds_or_with_nothing_waiting_is_not_stalled() {
        let r = judge(&[queue("a", 1, 0, 0, 600)], DlqReading::Known(0), 0);
        assert_eq!(check(&r, "stalled_queues"), Status::Healthy);
        // Long-running executions and no waiting ones: nothing is held up.
        let r = judge(&[queue("b", 0, 3, 0, 100_000)], DlqReading::Known(0), 0);
        assert_eq!(check(&r, "stalled_queues"), Status::Healthy);
        assert_eq!(r.status, Status::Healthy);
    }

    #[test]
    fn one_unhealthy_check_outweighs_any_number_of_degraded_ones() {
        let r = judge(&[queue("a", 101, 0, 601, 0)], DlqReading::Known(1001), 11);
        assert_eq!(check(&r, "queue_length"), Status::Degraded);
        assert_eq!(check(&r, "oldest_age"), Status::Degraded);
        assert_eq!(check(&r, "stuck_executions"), Status::Degraded);
        assert_eq!(check(&r, "dlq"), Status::Unhealthy);
        assert_eq!(r.status, Status::Unhealthy);
    }

    #[test]
    fn the_worst_action_decides_and_is_named() {
        let r = judge(
            &[queue("calm", 3, 0, 5, 0), queue("busy", 200, 0, 5, 0)],
            DlqReading::Known(0),
            0,
        );
        assert_eq!(r.status, Status::Degraded);
        assert_eq!(r.checks["queue_length"].value, Some(200.0));
        assert_eq!(
            r.checks["queue_length"].detail.as_deref(),
            Some("longest in 'busy'")
        );
        assert_eq!((r.totals.queued, r.totals.actions), (203, 2));
    }

    #[test]
    fn the_log_line_has_the_operator_guide_s_shape() {
        let r = judge(&[queue("a", 45, 12, 1, 0)], DlqReading::Known(25), 3);
        assert_eq!(
            r.log_line(),
            "[health] Status: HEALTHY | Queues: Q=45 A=12 | DLQ=25 | Stuck=3 | Stale=0"
        );
        let r = judge(&[], DlqReading::Unavailable("x".into()), 0);
        assert!(r.log_line().contains("Status: DEGRADED") && r.log_line().contains("DLQ=?"));
    }

    #[test]
    fn the_report_serializes_with_each_check_s_value_thresholds_and_verdict() {
        let r = judge(&[queue("a", 101, 0, 0, 0)], DlqReading::Known(7), 0);
        let v = serde_json::to_value(&r).expect("serializes");
        assert_eq!(v["status"], "degraded");
        assert_eq!(v["last_check"], "2026-11-22T12:00:00Z");
        assert_eq!(v["emergency_mode"], false);
        assert_eq!(v["checks"]["queue_length"]["status"], "degraded");
        assert_eq!(v["checks"]["queue_length"]["value"], 101.0);
        assert_eq!(v["checks"]["queue_length"]["warning"], 100);
        assert_eq!(v["checks"]["queue_length"]["critical"], 500);
        assert_eq!(v["checks"]["dlq"]["value"], 7.0);
        for name in [
            "queue_length",
            "oldest_age",
            "dlq",
            "stuck_executions",
            "stalled_queues",
        ] {
            assert!(v["checks"].get(name).is_some(), "{name} missing");
        }
    }

    #[test]
    fn an_action_whose_dispatches_come_back_unrouted_is_degraded_and_named() {
        let mut lost = queue("core.nobody", 3, 0, 1, 1);
        lost.no_route_since = Some(now());
        let r = judge(
            &[queue("core.fine", 1, 1, 1, 1), lost],
            DlqReading::Known(0),
            0,
        );
        assert_eq!(check(&r, "no_route"), Status::Degraded);
        assert_eq!(r.status, Status::Degraded);
        let detail = r.checks["no_route"].detail.clone().unwrap_or_default();
        assert!(
            detail.contains("core.nobody") && !detail.contains("core.fine"),
            "{detail}"
        );
        let fine = judge(&[queue("core.fine", 1, 1, 1, 1)], DlqReading::Known(0), 0);
        assert_eq!(check(&fine, "no_route"), Status::Healthy);
    }

    #[test]
    fn status_gauge_values_are_zero_one_two() {
        assert_eq!(Status::Healthy.gauge(), 0.0);
        assert_eq!(Status::Degraded.gauge(), 1.0);
        assert_eq!(Status::Unhealthy.gauge(), 2.0);
    }
}
