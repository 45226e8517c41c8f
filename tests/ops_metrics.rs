//! Metric values after a known load through the real core with in-memory ports: the outcome
//! counters and the wait histogram from `MetricsSink`, the queue gauges refreshed at scrape
//! time, which actions have per-action series, and the health gauges. The Prometheus output
//! is rendered and parsed line by line.
//!
//! Each rig counts into a recorder of its own (the unlabelled totals and the wait histogram
//! would otherwise add up the tests running at once); the health gauges go to the process's
//! recorder and are asserted by one test only.

mod support;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use fifo_executor::config::HealthThresholds;
use fifo_executor::core::memory::{ChannelDispatcher, DiscardSink, LatestStats};
use fifo_executor::core::{ActionPolicy, Executor, Ports, QueueSettings, UniformPolicy};
use fifo_executor::model::{ActionRef, CancelRequest, Completion, EndStatus, Verdict};
use fifo_executor::ops::health::HealthMonitor;
use fifo_executor::ops::hooks::NoHealthStore;
use fifo_executor::ops::metrics::{self, ActionTallies, Metrics, MetricsSink, names};
use support::{metric_value as value, submit_and_wait as submit};

struct Rig {
    exec: Arc<Executor>,
    metrics: Metrics,
    _dispatched: tokio::sync::mpsc::UnboundedReceiver<Vec<fifo_executor::core::Dispatch>>,
}

/// `executor.queue.metrics_idle_after_seconds` of the rigs.
const IDLE_AFTER: Duration = Duration::from_secs(600);

async fn rig(max_queue_length: usize) -> Rig {
    let recorder = metrics::builder()
        .expect("the buckets are valid")
        .build_recorder();
    let stats = Arc::new(LatestStats::default());
    let tallies = Arc::new(ActionTallies::default());
    let sink = ::metrics::with_local_recorder(&recorder, || {
        MetricsSink::new(Arc::new(DiscardSink), tallies.clone())
    });
    let (dispatcher, dispatched) = ChannelDispatcher::new();
    let ports = Ports {
        dispatcher: Arc::new(dispatcher),
        sink: Arc::new(sink),
        observer: stats.clone(),
    };
    let settings = QueueSettings {
        max_queue_length,
        queue_timeout: Duration::from_secs(365 * 24 * 3600),
        ..QueueSettings::default()
    };
    let exec = Arc::new(
        Executor::start(
            settings,
            ports,
            Arc::new(UniformPolicy(ActionPolicy::default())),
        )
        .await
        .expect("the executor starts"),
    );
    Rig {
        exec,
        metrics: Metrics::new(recorder.handle(), stats, tallies, IDLE_AFTER),
        _dispatched: dispatched,
    }
}

fn action(s: &str) -> ActionRef {
    ActionRef::parse(s).expect("valid ref")
}

fn wall_now(exec: &Executor) -> chrono::DateTime<chrono::Utc> {
    exec.clock().wall(exec.clock().now())
}

#[tokio::test(start_paused = true)]
async fn outcome_counters_and_the_wait_histogram_match_a_known_load() {
    let r = rig(2).await;
    let a = action("metrics.load");
    // 1 admitted at once, 2 and 3 wait, 4 finds the queue full.
    let verdicts = submit(&r.exec, &a, &[1, 2, 3, 4]).await;
    assert!(matches!(verdicts[3], Verdict::Rejected { .. }));
    tokio::time::advance(Duration::from_secs(10)).await;
    r.exec
        .complete(vec![Completion::new(1, EndStatus::Succeeded)]);
    r.exec.stats(&a).await.expect("barrier");
    tokio::time::advance(Duration::from_secs(20)).await;
    r.exec.complete(vec![Completion::new(2, EndStatus::Failed)]);
    r.exec.stats(&a).await.expect("barrier");
    // 3 is running now; cancel it (running: left alone), then an id nobody knows.
    r.exec.cancel(vec![CancelRequest {
        execution_id: 3,
        receipt: None,
    }]);
    r.exec
        .complete(vec![Completion::new(999_999, EndStatus::Succeeded)]);
    r.exec
        .complete(vec![Completion::new(3, EndStatus::Timeout)]);
    r.exec.stats(&a).await.expect("barrier");

    let text = r.metrics.render(wall_now(&r.exec));
    let count = |outcome: &str| {
        value(
            &text,
            names::EXECUTIONS_TOTAL,
            &[("action", "metrics.load"), ("outcome", outcome)],
        )
    };
    assert_eq!(count("accepted"), Some(3.0));
    assert_eq!(count("rejected"), Some(1.0));
    assert_eq!(count("succeeded"), Some(1.0));
    assert_eq!(count("failed"), Some(1.0));
    assert_eq!(count("timeout"), Some(1.0));
    assert_eq!(
        count("canceled"),
        None,
        "a running execution is not canceled"
    );
    assert!(
        value(
            &text,
            names::EXECUTIONS_TOTAL,
            &[
                ("action", metrics::UNKNOWN_ACTION),
                ("outcome", "unmatched")
            ]
        )
        .is_some_and(|n| n >= 1.0)
    );

    // Waits: 0 s (admitted at once), 10 s, 30 s; one histogram over all actions.
    let bucket = |le: &str| {
        value(
            &text,
            &format!("{}_bucket", names::QUEUE_WAIT_SECONDS),
            &[("le", le)],
        )
    };
    assert_eq!(bucket("0.005"), Some(1.0));
    assert_eq!(bucket("5"), Some(1.0));
    assert_eq!(bucket("15"), Some(2.0));
    assert_eq!(bucket("30"), Some(3.0));
    assert_eq!(bucket("+Inf"), Some(3.0));
    let sum = value(&text, &format!("{}_sum", names::QUEUE_WAIT_SECONDS), &[]).expect("a sum");
    assert!((sum - 40.0).abs() < 0.01, "sum {sum}");
    assert_eq!(
        value(&text, &format!("{}_count", names::QUEUE_WAIT_SECONDS), &[]),
        Some(3.0)
    );
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with(names::QUEUE_WAIT_SECONDS) && l.contains("action=")),
        "the wait histogram has no action label:\n{text}"
    );
    // The totals over all actions.
    let total = |outcome: &str| {
        value(
            &text,
            names::EXECUTIONS_BY_OUTCOME_TOTAL,
            &[("outcome", outcome)],
        )
    };
    assert_eq!(total("accepted"), Some(3.0));
    assert_eq!(total("succeeded"), Some(1.0));
    assert_eq!(total("unmatched"), Some(1.0));
    // Removals count too.
    let b = action("metrics.removed");
    submit(&r.exec, &b, &[11, 12]).await;
    r.exec.cancel(vec![CancelRequest {
        execution_id: 12,
        receipt: None,
    }]);
    r.exec.stats(&b).await.expect("barrier");
    let text = r.metrics.render(wall_now(&r.exec));
    assert_eq!(
        value(
            &text,
            names::EXECUTIONS_TOTAL,
            &[("action", "metrics.removed"), ("outcome", "canceled")]
        ),
        Some(1.0)
    );
    r.exec.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(start_paused = true)]
async fn queue_gauges_are_computed_at_scrape_time_and_the_oldest_age_grows_while_nothing_changes() {
    let r = rig(100).await;
    let busy = action("metrics.gauges.busy");
    let idle = action("metrics.gauges.idle");
    r.exec
        .set_policy(
            &busy,
            ActionPolicy {
                concurrency_limit: NonZeroU32::new(2).expect("nonzero"),
                ..ActionPolicy::default()
            },
        )
        .expect("policy set");
    submit(&r.exec, &busy, &[21, 22, 23, 24, 25]).await;
    submit(&r.exec, &idle, &[31]).await;
    r.exec
        .complete(vec![Completion::new(31, EndStatus::Succeeded)]);
    r.exec.stats(&idle).await.expect("barrier");
    let progressed_at = wall_now(&r.exec);

    tokio::time::advance(Duration::from_secs(90)).await;
    let first_scrape = wall_now(&r.exec);
    let text = r.metrics.render(first_scrape);
    let g = |name: &str, a: &str| value(&text, name, &[("action", a)]);
    let busy_s = "metrics.gauges.busy";
    let idle_s = "metrics.gauges.idle";
    assert_eq!(g(names::QUEUE_LENGTH, busy_s), Some(3.0));
    assert_eq!(g(names::QUEUE_ACTIVE_COUNT, busy_s), Some(2.0));
    assert_eq!(g(names::QUEUE_MAX_CONCURRENT, busy_s), Some(2.0));
    assert_eq!(g(names::QUEUE_OLDEST_AGE_SECONDS, busy_s), Some(90.0));
    assert_eq!(g(names::QUEUE_LENGTH, idle_s), Some(0.0));
    assert_eq!(g(names::QUEUE_OLDEST_AGE_SECONDS, idle_s), Some(0.0));
    let unix = |t: chrono::DateTime<chrono::Utc>| t.timestamp_micros() as f64 / 1e6;
    // A queue with executions waiting shows when it last moved; an idle one, the scrape time.
    assert_eq!(
        g(names::QUEUE_LAST_UPDATED, busy_s),
        Some(unix(progressed_at))
    );
    assert_eq!(
        g(names::QUEUE_LAST_UPDATED, idle_s),
        Some(unix(first_scrape))
    );

    // Ten minutes on: the busy action keeps its series, the idle one has left /metrics.
    tokio::time::advance(IDLE_AFTER).await;
    let text = r.metrics.render(wall_now(&r.exec));
    assert_eq!(
        value(
            &text,
            names::QUEUE_OLDEST_AGE_SECONDS,
            &[("action", busy_s)]
        ),
        Some(690.0),
        "the age grew with nothing happening in the queue"
    );
    // What the runbook's StuckQueue rule compares: last_updated < time() - 600.
    let last = value(&text, names::QUEUE_LAST_UPDATED, &[("action", busy_s)]).expect("gauge");
    assert!(last < unix(wall_now(&r.exec)) - 600.0);
    assert!(
        !text.contains(idle_s),
        "an idle action has no series after metrics_idle_after_seconds:\n{text}"
    );
    assert_eq!(value(&text, names::ACTIONS_KNOWN, &[]), Some(2.0));
    assert_eq!(value(&text, names::ACTIONS_EXPORTED, &[]), Some(1.0));
    r.exec.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(start_paused = true)]
async fn an_action_that_queues_again_gets_its_series_back_with_its_counts_where_they_were() {
    let r = rig(100).await;
    let a = action("metrics.comeback");
    let a_s = "metrics.comeback";
    submit(&r.exec, &a, &[51]).await;
    r.exec
        .complete(vec![Completion::new(51, EndStatus::Succeeded)]);
    r.exec.stats(&a).await.expect("barrier");
    let text = r.metrics.render(wall_now(&r.exec));
    let accepted = |text: &str| {
        value(
            text,
            names::EXECUTIONS_TOTAL,
            &[("action", a_s), ("outcome", "accepted")],
        )
    };
    assert_eq!(accepted(&text), Some(1.0));

    tokio::time::advance(IDLE_AFTER + Duration::from_secs(1)).await;
    let text = r.metrics.render(wall_now(&r.exec));
    assert!(!text.contains(a_s), "idle, so no series:\n{text}");
    // Still one request away.
    let named = r
        .metrics
        .render_actions(std::slice::from_ref(&a), wall_now(&r.exec));
    assert_eq!(
        value(&named, names::QUEUE_LENGTH, &[("action", a_s)]),
        Some(0.0)
    );
    assert_eq!(accepted(&named), Some(1.0));

    // 52 runs, 53 waits: busy again, and the very next scrape has it.
    submit(&r.exec, &a, &[52, 53]).await;
    let text = r.metrics.render(wall_now(&r.exec));
    assert_eq!(
        value(&text, names::QUEUE_LENGTH, &[("action", a_s)]),
        Some(1.0)
    );
    assert_eq!(
        value(&text, names::QUEUE_ACTIVE_COUNT, &[("action", a_s)]),
        Some(1.0)
    );
    assert_eq!(accepted(&text), Some(3.0), "counted on, not from 0");
    assert_eq!(
        value(
            &text,
            names::EXECUTIONS_TOTAL,
            &[("action", a_s), ("outcome", "succeeded")]
        ),
        Some(1.0)
    );
    // While it waits it keeps its series, however long nothing moves.
    tokio::time::advance(IDLE_AFTER * 6).await;
    let text = r.metrics.render(wall_now(&r.exec));
    assert_eq!(
        value(&text, names::QUEUE_LENGTH, &[("action", a_s)]),
        Some(1.0)
    );
    r.exec.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(start_paused = true)]
async fn a_health_check_exports_status_and_stuck_executions() {
    let global = metrics::install().expect("the process recorder");
    let r = rig(100).await;
    let a = action("metrics.health");
    submit(&r.exec, &a, &[41]).await;
    let thresholds = HealthThresholds {
        // One stuck execution is already too many.
        stuck_warning: 0,
        stuck_critical: 0,
        ..HealthThresholds::default()
    };
    let monitor = HealthMonitor::new(
        r.exec.clone(),
        None,
        thresholds.clone(),
        false,
        Arc::new(NoHealthStore),
    );
    tokio::time::advance(Duration::from_secs(thresholds.stuck_age_seconds + 1)).await;
    let report = monitor.check().await;
    assert_eq!(report.totals.stuck, 1);
    let text = global.render();
    assert_eq!(value(&text, names::HEALTH_STATUS, &[]), Some(2.0));
    assert_eq!(value(&text, names::HEALTH_STUCK_EXECUTIONS, &[]), Some(1.0));
    assert!(value(&text, names::HEALTH_LAST_CHECK, &[]).is_some_and(|t| t > 1.7e9));
    assert_eq!(
        monitor.latest().map(|r| r.status),
        Some(report.status),
        "the report is kept for /health"
    );
    r.exec.shutdown(Duration::from_secs(5)).await;
}

#[test]
fn every_metric_the_alert_rules_and_dashboard_use_is_one_the_service_exports() {
    let exported = |name: &str| {
        names::ALL.contains(&name)
            || names::HISTOGRAMS.iter().any(|h| {
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| name == format!("{h}{suffix}"))
            })
    };
    for file in [
        "config/prometheus/alerts.yml",
        "config/prometheus/alerts.test.yml",
        "config/grafana/fifo-executor.json",
    ] {
        let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{file}: {e}"));
        let mut seen = 0;
        for (i, _) in text.match_indices("attune_") {
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // The rule groups' names are not metrics.
            if ["attune_queues", "attune_executor"].contains(&name.as_str()) {
                continue;
            }
            seen += 1;
            assert!(exported(&name), "{file} uses {name}, which is not exported");
        }
        assert!(seen > 0, "{file} names no metric");
    }
}
