//! The per-action series, and why `/metrics` stays small with 100,000 actions.
//!
//! An automation platform has tens of thousands of actions, most of them quiet most of the
//! time. Exporting every action ever seen made `/metrics` grow without bound (157 MB at 100,000
//! actions, issue 19). So the per-action families ([`names::PER_ACTION`] but the RabbitMQ
//! edge's `attune_dispatches_unroutable_total`) are exported, at each scrape, only for the
//! actions
//! - where something waits or runs (so a stuck action never loses its series, and the
//!   runbook's `attune_queue_length{action}` and `attune_queue_last_updated{action}` rules see
//!   it for as long as it is stuck), or
//! - whose counters changed within `executor.queue.metrics_idle_after_seconds` (so `rate()`
//!   sees an action's last increments before its series go, and an action that starts
//!   queueing has its series in the very next scrape).
//!
//! **How.** They live in a `metrics-exporter-prometheus` recorder of their own, built with an
//! idle timeout of zero for counters and gauges: the exporter drops, while rendering, every
//! series that was not written since the previous render. Right before each render the
//! chosen actions' values are written again (from [`LatestStats`] and [`ActionTallies`]),
//! so exactly they are rendered and every other action's series leave the recorder, which
//! then holds only what the last scrape showed. Renders are serialised: two scrapes at once
//! would otherwise see each other's writes as "not written since".
//!
//! The counts themselves are not kept by the recorder (a dropped counter would start again
//! from 0) but by [`ActionTallies`]: an action whose series come back after a quiet spell
//! continues its `attune_executions_total` where it left off.
//!
//! `GET /metrics/actions?action=a,b` renders named actions, busy or not, into a recorder
//! made for that one request.

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};
use metrics_util::MetricKindMask;

use super::{Outcome, UNKNOWN_ACTION, names, refresh_queue_gauges};
use crate::core::QueueStats;
use crate::core::memory::LatestStats;
use crate::model::ActionRef;

/// One action's execution counts by outcome, and when it last counted one.
#[derive(Debug, Default)]
struct Tally {
    counts: [AtomicU64; Outcome::ALL.len()],
    /// Unix microseconds of the last event counted.
    last_event: AtomicI64,
}

/// Execution counts per action and outcome (`None`: events no action owns), kept for as long
/// as the process runs, whether or not the action's series are exported.
#[derive(Debug, Default)]
pub struct ActionTallies(DashMap<Option<ActionRef>, Tally>);

impl ActionTallies {
    /// Counts one `outcome` of `action` at `at`.
    pub fn count(&self, action: Option<&ActionRef>, outcome: Outcome, at: DateTime<Utc>) {
        let bump = |t: &Tally| {
            t.counts[outcome.index()].fetch_add(1, Ordering::Relaxed);
            t.last_event
                .fetch_max(at.timestamp_micros(), Ordering::Relaxed);
        };
        // The common case, a known action, takes a read lock and no allocation.
        let key = action.cloned();
        if let Some(t) = self.0.get(&key) {
            bump(&t);
            return;
        }
        bump(&self.0.entry(key).or_default());
    }

    /// The count of `outcome` for `action` (`None`: no action).
    pub fn get(&self, action: Option<&ActionRef>, outcome: Outcome) -> u64 {
        self.0
            .get(&action.cloned())
            .map_or(0, |t| t.counts[outcome.index()].load(Ordering::Relaxed))
    }

    fn snapshot(t: &Tally) -> [u64; Outcome::ALL.len()] {
        std::array::from_fn(|i| t.counts[i].load(Ordering::Relaxed))
    }
}

/// The `# HELP` lines of the per-action families, given to each recorder that renders them.
fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_gauge!(
        names::QUEUE_LENGTH,
        "Executions waiting in the action's queue"
    );
    describe_gauge!(
        names::QUEUE_ACTIVE_COUNT,
        "Executions of the action holding a slot (dispatched, no completion yet)"
    );
    describe_gauge!(
        names::QUEUE_MAX_CONCURRENT,
        "The action's concurrency limit"
    );
    describe_gauge!(
        names::QUEUE_OLDEST_AGE_SECONDS,
        "Seconds the oldest waiting execution has waited, at scrape time; 0 when none waits"
    );
    describe_gauge!(
        names::QUEUE_LAST_UPDATED,
        "Unix time the queue last moved (admission, completion or removal) while executions \
         wait; the scrape time when none waits (nothing to be stuck on)"
    );
    describe_counter!(
        names::EXECUTIONS_TOTAL,
        "Execution events by action and outcome: accepted, rejected, succeeded, failed, \
         canceled, timeout, purged, no_route, reclaimed, unmatched. Exported for the actions \
         busy or changed within executor.queue.metrics_idle_after_seconds; counts continue \
         where they left off when an action's series come back"
    );
    describe_gauge!(
        names::ACTIONS_KNOWN,
        "Actions the executor keeps counters for"
    );
    describe_gauge!(
        names::ACTIONS_EXPORTED,
        "Actions with per-action series in this scrape: something waits or runs, or they \
         changed within executor.queue.metrics_idle_after_seconds"
    );
}

/// Writes `counts` as `attune_executions_total{action, outcome}`, the outcomes counted so far.
fn write_counts(action: &str, counts: &[u64; Outcome::ALL.len()]) {
    for (outcome, n) in Outcome::ALL.iter().zip(counts) {
        if *n > 0 {
            metrics::counter!(
                names::EXECUTIONS_TOTAL,
                "action" => action.to_owned(),
                "outcome" => outcome.as_str()
            )
            .absolute(*n);
        }
    }
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

/// Renders the per-action families for the busy and recent actions (see the module doc).
pub struct PerActionExporter {
    stats: Arc<LatestStats>,
    tallies: Arc<ActionTallies>,
    /// `executor.queue.metrics_idle_after_seconds`, changed by a reload.
    idle_after_secs: AtomicU64,
    /// Held for a whole render: writes and render must not interleave with another's.
    recorder: Mutex<PrometheusRecorder>,
}

impl PerActionExporter {
    pub fn new(stats: Arc<LatestStats>, tallies: Arc<ActionTallies>, idle_after: Duration) -> Self {
        let recorder = PrometheusBuilder::new()
            .idle_timeout(
                MetricKindMask::COUNTER | MetricKindMask::GAUGE,
                Some(Duration::ZERO),
            )
            .build_recorder();
        metrics::with_local_recorder(&recorder, describe);
        Self {
            stats,
            tallies,
            idle_after_secs: AtomicU64::new(idle_after.as_secs()),
            recorder: Mutex::new(recorder),
        }
    }

    pub fn set_idle_after(&self, idle_after: Duration) {
        self.idle_after_secs
            .store(idle_after.as_secs(), Ordering::Relaxed);
    }

    /// The busy and recent actions' series as of `now`, with `attune_actions_known` and
    /// `attune_actions_exported`.
    pub fn render(&self, now: DateTime<Utc>) -> String {
        let idle_after = i64::try_from(self.idle_after_secs.load(Ordering::Relaxed))
            .unwrap_or(i64::MAX)
            .saturating_mul(1_000_000);
        let since = micros(now).saturating_sub(idle_after);
        let mut chosen: Vec<QueueStats> = Vec::new();
        let mut known = 0usize;
        self.stats.for_each(|s| {
            known += 1;
            let busy = s.queue_length > 0 || s.active_count > 0;
            if busy || micros(s.last_updated) > since {
                chosen.push(s.clone());
            }
        });
        // The counts of the chosen actions, and of any whose events are recent although their
        // counters are not (the events no action owns, above all). The walk over every
        // action's counts only reads an atomic; the chosen ones are looked up by name.
        let mut counts: Vec<(String, [u64; Outcome::ALL.len()])> = Vec::new();
        let chosen_refs: HashSet<&ActionRef> = chosen.iter().map(|s| &s.action_ref).collect();
        for e in self.tallies.0.iter() {
            let recent = e.value().last_event.load(Ordering::Relaxed) > since;
            if recent && !e.key().as_ref().is_some_and(|a| chosen_refs.contains(a)) {
                let label = e.key().as_ref().map_or(UNKNOWN_ACTION, ActionRef::as_str);
                counts.push((label.to_owned(), ActionTallies::snapshot(e.value())));
            }
        }
        let counted_only = counts.len();
        for s in &chosen {
            if let Some(t) = self.tallies.0.get(&Some(s.action_ref.clone())) {
                counts.push((
                    s.action_ref.as_str().to_owned(),
                    ActionTallies::snapshot(&t),
                ));
            }
        }
        let exported = chosen.len() + counted_only;
        let recorder = self.recorder.lock().unwrap_or_else(|p| p.into_inner());
        metrics::with_local_recorder(&*recorder, || {
            refresh_queue_gauges(&chosen, now);
            for (action, c) in &counts {
                write_counts(action, c);
            }
            metrics::gauge!(names::ACTIONS_KNOWN).set(known as f64);
            metrics::gauge!(names::ACTIONS_EXPORTED).set(exported as f64);
        });
        recorder.handle().render()
    }

    /// The named actions' series, busy or not, as of `now`, from a recorder made for this
    /// request; an action never seen has none.
    pub fn render_named(&self, actions: &[ActionRef], now: DateTime<Utc>) -> String {
        let stats: Vec<QueueStats> = actions.iter().filter_map(|a| self.stats.get(a)).collect();
        let counts: Vec<(&ActionRef, [u64; Outcome::ALL.len()])> = actions
            .iter()
            .filter_map(|a| {
                self.tallies
                    .0
                    .get(&Some(a.clone()))
                    .map(|t| (a, ActionTallies::snapshot(&t)))
            })
            .collect();
        let recorder = PrometheusBuilder::new().build_recorder();
        metrics::with_local_recorder(&recorder, || {
            describe();
            refresh_queue_gauges(&stats, now);
            for (action, c) in &counts {
                write_counts(action.as_str(), c);
            }
        });
        recorder.handle().render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::StatsObserver;

    fn action(s: &str) -> ActionRef {
        ActionRef::parse(s).expect("a valid ref")
    }

    fn stats(a: &str, queued: usize, running: usize, at: DateTime<Utc>) -> QueueStats {
        QueueStats {
            queue_length: queued,
            active_count: running,
            oldest_enqueued_at: (queued > 0).then_some(at),
            ..QueueStats::empty(action(a), at)
        }
    }

    /// The families written at scrape time.
    fn scrape_time_families() -> impl Iterator<Item = &'static str> {
        names::PER_ACTION
            .iter()
            .copied()
            .filter(|f| *f != names::DISPATCHES_UNROUTABLE_TOTAL)
    }

    fn has_series(text: &str, family: &str, a: &str) -> bool {
        let needle = format!("action=\"{a}\"");
        text.lines()
            .any(|l| l.starts_with(family) && l.contains(&needle))
    }

    struct Rig {
        stats: Arc<LatestStats>,
        tallies: Arc<ActionTallies>,
        exporter: PerActionExporter,
    }

    fn rig(idle_after_secs: u64) -> Rig {
        let stats = Arc::new(LatestStats::default());
        let tallies = Arc::new(ActionTallies::default());
        let exporter = PerActionExporter::new(
            stats.clone(),
            tallies.clone(),
            Duration::from_secs(idle_after_secs),
        );
        Rig {
            stats,
            tallies,
            exporter,
        }
    }

    #[test]
    fn an_idle_action_loses_its_series_after_the_window_and_gets_them_back_when_it_queues() {
        let r = rig(600);
        let t0 = Utc::now();
        let a = action("idle.then.busy");
        r.stats.observe(&stats("idle.then.busy", 0, 0, t0));
        r.tallies.count(Some(&a), Outcome::Succeeded, t0);

        let text = r.exporter.render(t0 + chrono::Duration::seconds(10));
        assert!(
            has_series(&text, names::QUEUE_LENGTH, "idle.then.busy"),
            "{text}"
        );
        assert!(
            has_series(&text, names::EXECUTIONS_TOTAL, "idle.then.busy"),
            "{text}"
        );

        let text = r.exporter.render(t0 + chrono::Duration::seconds(601));
        for family in scrape_time_families() {
            assert!(
                !has_series(&text, family, "idle.then.busy"),
                "{family}: {text}"
            );
        }
        assert!(text.contains("attune_actions_known 1\n"), "{text}");
        assert!(text.contains("attune_actions_exported 0\n"), "{text}");

        // It queues again: the next scrape has its series, the count where it left off.
        let t1 = t0 + chrono::Duration::seconds(3600);
        r.stats.observe(&stats("idle.then.busy", 3, 0, t1));
        r.tallies.count(Some(&a), Outcome::Accepted, t1);
        let text = r.exporter.render(t1);
        assert!(
            text.lines()
                .any(|l| l == "attune_queue_length{action=\"idle.then.busy\"} 3"),
            "{text}"
        );
        assert!(
            text.lines().any(|l| l
                == "attune_executions_total{action=\"idle.then.busy\",outcome=\"succeeded\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn a_stuck_action_keeps_its_series_however_long_nothing_changes() {
        let r = rig(60);
        let t0 = Utc::now();
        r.stats.observe(&stats("stuck.one", 2, 1, t0));
        for hours in [1, 2, 24] {
            let text = r.exporter.render(t0 + chrono::Duration::hours(hours));
            for family in scrape_time_families() {
                if family == names::EXECUTIONS_TOTAL {
                    continue;
                }
                assert!(has_series(&text, family, "stuck.one"), "{family}: {text}");
            }
            assert!(text.contains("attune_actions_exported 1\n"), "{text}");
        }
    }

    #[test]
    fn events_no_action_owns_are_exported_while_recent() {
        let r = rig(60);
        let t0 = Utc::now();
        r.tallies.count(None, Outcome::Unmatched, t0);
        let text = r.exporter.render(t0);
        assert!(
            has_series(&text, names::EXECUTIONS_TOTAL, UNKNOWN_ACTION),
            "{text}"
        );
        let text = r.exporter.render(t0 + chrono::Duration::seconds(61));
        assert!(
            !has_series(&text, names::EXECUTIONS_TOTAL, UNKNOWN_ACTION),
            "{text}"
        );
    }

    #[test]
    fn a_shorter_window_applies_from_the_next_scrape() {
        let r = rig(600);
        let t0 = Utc::now();
        r.stats.observe(&stats("window.a", 0, 0, t0));
        let later = t0 + chrono::Duration::seconds(120);
        assert!(has_series(
            &r.exporter.render(later),
            names::QUEUE_LENGTH,
            "window.a"
        ));
        r.exporter.set_idle_after(Duration::from_secs(60));
        assert!(!has_series(
            &r.exporter.render(later),
            names::QUEUE_LENGTH,
            "window.a"
        ));
    }

    #[test]
    fn named_actions_are_rendered_busy_or_not_and_leave_the_scrape_alone() {
        let r = rig(60);
        let t0 = Utc::now();
        let a = action("named.idle");
        r.stats.observe(&stats("named.idle", 0, 0, t0));
        r.tallies.count(Some(&a), Outcome::Failed, t0);
        r.stats.observe(&stats("named.busy", 1, 0, t0));
        let later = t0 + chrono::Duration::hours(1);
        let text = r
            .exporter
            .render_named(&[a.clone(), action("never.seen")], later);
        assert!(
            has_series(&text, names::QUEUE_LENGTH, "named.idle"),
            "{text}"
        );
        assert!(
            text.contains("attune_executions_total{action=\"named.idle\",outcome=\"failed\"} 1"),
            "{text}"
        );
        assert!(!text.contains("named.busy"), "{text}");
        assert!(!text.contains("never.seen"), "{text}");
        assert!(text.contains("# HELP attune_queue_length"), "{text}");
        let scrape = r.exporter.render(later);
        assert!(!scrape.contains("named.idle"), "{scrape}");
        assert!(
            has_series(&scrape, names::QUEUE_LENGTH, "named.busy"),
            "{scrape}"
        );
    }
}
