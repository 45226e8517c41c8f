//! Every health transition, through the real core and the [`HealthMonitor`] that serves
//! `/health` and `attune_health_status`, on paused tokio time: one monitor watches one executor
//! go from healthy through degraded and unhealthy (queue length, a stalled queue, stuck
//! executions) and back. The DLQ's transitions need the broker and are in `ops_dlq`.
//!
//! One test only: `attune_health_status` is one process-wide gauge.

mod support;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use fifo_executor::config::HealthThresholds;
use fifo_executor::core::memory::{ChannelDispatcher, DiscardSink, LatestStats};
use fifo_executor::core::{ActionPolicy, Executor, Ports, QueueSettings, UniformPolicy};
use fifo_executor::model::{ActionRef, Completion, EndStatus};
use fifo_executor::ops::health::{HealthMonitor, HealthReport, Status};
use fifo_executor::ops::hooks::NoHealthStore;
use fifo_executor::ops::metrics::{self, names};
use metrics_exporter_prometheus::PrometheusHandle;
use support::{metric_value, submit_and_wait};

fn thresholds() -> HealthThresholds {
    HealthThresholds {
        queue_length_warning: 2,
        queue_length_critical: 4,
        // Far away: these steps are about the other checks.
        oldest_age_warning_seconds: 10_000,
        oldest_age_critical_seconds: 20_000,
        stuck_age_seconds: 50,
        stuck_warning: 1,
        stuck_critical: 2,
        stalled_seconds: 100,
        ..HealthThresholds::default()
    }
}

fn action(s: &str) -> ActionRef {
    ActionRef::parse(s).expect("valid ref")
}

/// One check: the overall verdict, the verdict of the check that should have moved, and the
/// gauge, all three as expected.
async fn expect(
    monitor: &HealthMonitor,
    handle: &PrometheusHandle,
    check: &str,
    want: Status,
    step: &str,
) -> Arc<HealthReport> {
    let report = monitor.check().await;
    assert_eq!(report.status, want, "{step}: {:?}", report.checks);
    assert_eq!(report.checks[check].status, want, "{step}: {check}");
    assert_eq!(
        metric_value(&handle.render(), names::HEALTH_STATUS, &[]),
        Some(want.gauge()),
        "{step}: attune_health_status"
    );
    report
}

fn complete(exec: &Executor, ids: &[u64]) {
    exec.complete(
        ids.iter()
            .map(|&id| Completion::new(id, EndStatus::Succeeded))
            .collect(),
    );
}

#[tokio::test(start_paused = true)]
async fn the_monitor_moves_through_every_transition_and_back_to_healthy() {
    let handle = metrics::install().expect("recorder");
    let (dispatcher, _dispatched) = ChannelDispatcher::new();
    let exec = Arc::new(
        Executor::start(
            QueueSettings {
                // Nothing times out while the test moves time forward.
                queue_timeout: Duration::from_secs(365 * 24 * 3600),
                ..QueueSettings::default()
            },
            Ports {
                dispatcher: Arc::new(dispatcher),
                sink: Arc::new(DiscardSink),
                observer: Arc::new(LatestStats::default()),
            },
            Arc::new(UniformPolicy(ActionPolicy::default())),
        )
        .await
        .expect("starts"),
    );
    let monitor = HealthMonitor::new(
        exec.clone(),
        None,
        thresholds(),
        false,
        Arc::new(NoHealthStore),
    );
    let a = action("health.queue");

    expect(
        &monitor,
        &handle,
        "queue_length",
        Status::Healthy,
        "nothing at all",
    )
    .await;

    // Limit 1: one runs, two wait; equal to the warning level is still within it.
    submit_and_wait(&exec, &a, &[1, 2, 3]).await;
    expect(
        &monitor,
        &handle,
        "queue_length",
        Status::Healthy,
        "2 waiting",
    )
    .await;
    submit_and_wait(&exec, &a, &[4]).await;
    expect(
        &monitor,
        &handle,
        "queue_length",
        Status::Degraded,
        "3 waiting",
    )
    .await;
    submit_and_wait(&exec, &a, &[5, 6]).await;
    expect(
        &monitor,
        &handle,
        "queue_length",
        Status::Unhealthy,
        "5 waiting",
    )
    .await;
    complete(&exec, &[1]);
    expect(
        &monitor,
        &handle,
        "queue_length",
        Status::Degraded,
        "4 waiting",
    )
    .await;

    // No progress for longer than stalled_seconds while executions wait.
    tokio::time::advance(Duration::from_secs(101)).await;
    let r = expect(
        &monitor,
        &handle,
        "stalled_queues",
        Status::Unhealthy,
        "stalled",
    )
    .await;
    assert_eq!(r.totals.stalled, 1);
    // Execution 2 has run 101 s: stuck, but one is not above the warning level.
    assert_eq!(r.totals.stuck, 1);
    assert_eq!(r.checks["stuck_executions"].status, Status::Healthy);
    complete(&exec, &[2]);
    let r = expect(
        &monitor,
        &handle,
        "queue_length",
        Status::Degraded,
        "moving again",
    )
    .await;
    assert_eq!(r.checks["stalled_queues"].status, Status::Healthy);
    assert_eq!(r.totals.queued, 3);

    // Stuck executions: three of another action and one of the first, all running for 51 s.
    let b = action("health.stuck");
    exec.set_policy(
        &b,
        ActionPolicy {
            concurrency_limit: NonZeroU32::new(3).expect("3"),
            ..ActionPolicy::default()
        },
    )
    .expect("policy");
    submit_and_wait(&exec, &b, &[11]).await;
    tokio::time::advance(Duration::from_secs(51)).await;
    let r = monitor.check().await;
    assert_eq!(r.totals.stuck, 2, "execution 3 and 11");
    assert_eq!(r.checks["stuck_executions"].status, Status::Degraded);
    submit_and_wait(&exec, &b, &[12, 13]).await;
    tokio::time::advance(Duration::from_secs(51)).await;
    let r = expect(
        &monitor,
        &handle,
        "stuck_executions",
        Status::Unhealthy,
        "4 stuck",
    )
    .await;
    assert_eq!(r.totals.stuck, 4);

    // Everything finishes: healthy again.
    complete(&exec, &[3, 4, 5, 6, 11, 12, 13]);
    let r = expect(
        &monitor,
        &handle,
        "queue_length",
        Status::Healthy,
        "all done",
    )
    .await;
    assert_eq!(
        (r.totals.queued, r.totals.active, r.totals.stuck),
        (0, 0, 0)
    );
    exec.shutdown(Duration::from_secs(5)).await;
}
