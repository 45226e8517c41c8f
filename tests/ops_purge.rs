//! The purge cycle over the real core, on paused time: dry runs report and change nothing, live
//! runs dead-letter stale queued executions and reclaim lost running ones, the periodic task
//! runs on its interval, emergency mode spares queued executions, and the log lines have the
//! operator guide's shape.

mod support;

use std::sync::Arc;
use std::time::Duration;

use fifo_executor::core::memory::{ChannelDispatcher, ChannelSink, LatestStats};
use fifo_executor::core::ports::{Event, RemovalReason};
use fifo_executor::core::{ActionPolicy, Executor, Ports, QueueSettings, UniformPolicy};
use fifo_executor::model::{ActionRef, Payload, Submission};
use fifo_executor::ops::hooks::NoLedgerPurge;
use fifo_executor::ops::purge::{PurgeSettings, Purger, Trigger};
use fifo_executor::rabbit::dead_letters::DeadLetterSink;
use fifo_executor::rabbit::publisher::{self, PublisherHandle};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::advance;

const MAX_QUEUED: Duration = Duration::from_secs(7200);
const MAX_RUNNING: Duration = Duration::from_secs(3600);

struct Rig {
    exec: Arc<Executor>,
    purger: Arc<Purger>,
    events: UnboundedReceiver<Event>,
    /// Dead letters go here; with no broker they stay pending, which the tests count.
    publisher: PublisherHandle,
    _dispatched: UnboundedReceiver<Vec<fifo_executor::core::Dispatch>>,
    _publisher_slot: publisher::ChannelSlot,
}

async fn rig(emergency_mode: bool) -> Rig {
    let (publisher, slot, _task) = publisher::spawn(None, publisher::CONFIRM_WINDOW);
    let (sink, events) = ChannelSink::new();
    let (dispatcher, dispatched) = ChannelDispatcher::new();
    let ports = Ports {
        dispatcher: Arc::new(dispatcher),
        sink: Arc::new(DeadLetterSink::new(publisher.clone(), true, Arc::new(sink))),
        observer: Arc::new(LatestStats::default()),
    };
    let settings = QueueSettings {
        // Longer than any test runs, so only the purge removes anything.
        queue_timeout: Duration::from_secs(365 * 24 * 3600),
        emergency_mode,
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
    let purger = Arc::new(Purger::new(
        exec.clone(),
        PurgeSettings {
            max_queued_age: MAX_QUEUED,
            max_running_age: MAX_RUNNING,
            max_completed_age: Duration::from_secs(604_800),
            max_stale_stats_age: Duration::from_secs(3600),
            max_history_age: fifo_executor::ops::hooks::HISTORY_RETENTION,
        },
        Arc::new(NoLedgerPurge),
    ));
    Rig {
        exec,
        purger,
        events,
        publisher,
        _dispatched: dispatched,
        _publisher_slot: slot,
    }
}

fn action(s: &str) -> ActionRef {
    ActionRef::parse(s).expect("valid ref")
}

fn submit(exec: &Executor, a: &ActionRef, ids: &[u64]) {
    exec.submit(
        a,
        ids.iter()
            .map(|&id| Submission::new(id, Payload::empty_object()))
            .collect(),
    );
}

fn drain(rx: &mut UnboundedReceiver<Event>) -> Vec<Event> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        out.push(e);
    }
    out
}

/// Waits (yielding, in real time) until a cycle has removed something; returns what.
async fn until_removed(events: &mut UnboundedReceiver<Event>) -> Vec<(u64, &'static str)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let seen = removals(&drain(events));
        if !seen.is_empty() {
            return seen;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no cycle removed anything"
        );
        tokio::task::yield_now().await;
    }
}

fn removals(events: &[Event]) -> Vec<(u64, &'static str)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Removed {
                reason: RemovalReason::Purged,
                execution,
                ..
            } => Some((execution.execution_id, "purged")),
            Event::Reclaimed { execution_id, .. } => Some((*execution_id, "reclaimed")),
            _ => None,
        })
        .collect()
}

/// The tests of this binary run one at a time: one of them installs a thread-local log
/// subscriber, and tracing caches per call site whether anyone listens, so another test
/// hitting the same call sites at the same moment could make its log lines vanish.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(start_paused = true)]
async fn a_dry_run_reports_stale_queued_and_lost_running_executions_and_changes_nothing() {
    let _serial = SERIAL.lock().await;
    let mut r = rig(false).await;
    let a = action("purge.dry");
    submit(&r.exec, &a, &[1, 2, 3]);
    r.exec.stats(&a).await.expect("barrier");

    advance(MAX_RUNNING + Duration::from_secs(1)).await;
    let report = r.purger.run_cycle(true, Trigger::Manual).await;
    let seen: Vec<_> = report
        .entries
        .iter()
        .map(|e| (e.execution_id, e.state))
        .collect();
    assert_eq!(
        seen,
        vec![(1, "running")],
        "queued ones are not old enough yet"
    );

    advance(MAX_QUEUED - MAX_RUNNING).await;
    let report = r.purger.run_cycle(true, Trigger::Manual).await;
    assert!(report.dry_run);
    assert_eq!((report.queued, report.running, report.purged), (2, 1, 3));
    let queued: Vec<_> = report
        .entries
        .iter()
        .filter(|e| e.state == "queued")
        .map(|e| (e.execution_id, e.age_seconds as u64, e.limit_seconds as u64))
        .collect();
    assert_eq!(queued, vec![(2, 7201, 7200), (3, 7201, 7200)]);

    let s = r.exec.stats(&a).await.expect("answers").expect("known");
    assert_eq!((s.queue_length, s.active_count), (2, 1), "nothing removed");
    assert_eq!((s.total_purged, s.total_reclaimed), (0, 0));
    assert!(removals(&drain(&mut r.events)).is_empty(), "no events");
    assert_eq!(r.publisher.pending(), 0, "no dead letters");
    r.exec.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(start_paused = true)]
async fn a_live_cycle_dead_letters_stale_queued_executions_and_reclaims_lost_slots() {
    let _serial = SERIAL.lock().await;
    let mut r = rig(false).await;
    let a = action("purge.live");
    submit(&r.exec, &a, &[1, 2, 3]);
    r.exec.stats(&a).await.expect("barrier");
    advance(MAX_QUEUED + Duration::from_secs(1)).await;
    // A younger one, which must keep its place.
    submit(&r.exec, &a, &[4]);
    r.exec.stats(&a).await.expect("barrier");
    drain(&mut r.events);

    let report = r.purger.run_cycle(false, Trigger::Scheduled).await;
    assert!(!report.dry_run);
    assert_eq!((report.queued, report.running), (2, 1));
    let s = r.exec.stats(&a).await.expect("answers").expect("known");
    assert_eq!((s.total_purged, s.total_reclaimed), (2, 1));
    // The reclaimed slot went to the one execution left: 4.
    assert_eq!((s.queue_length, s.active_count), (0, 1));
    assert!(r.exec.is_live(4) && !r.exec.is_live(1));
    let events = drain(&mut r.events);
    let mut removed = removals(&events);
    removed.sort();
    assert_eq!(
        removed,
        vec![(1, "reclaimed"), (2, "purged"), (3, "purged")]
    );
    // Three dead letters (queue_from queued, Purge; running, LostCompletion) went to the
    // publisher; there is no broker here, so they wait there.
    assert_eq!(r.publisher.pending(), 3);
    r.exec.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(start_paused = true)]
async fn in_emergency_mode_queued_executions_are_spared_and_lost_slots_still_reclaimed() {
    let _serial = SERIAL.lock().await;
    let mut r = rig(true).await;
    let a = action("purge.emergency");
    submit(&r.exec, &a, &[1, 2]);
    r.exec.stats(&a).await.expect("barrier");
    advance(MAX_QUEUED + Duration::from_secs(1)).await;
    let report = r.purger.run_cycle(false, Trigger::Manual).await;
    assert!(report.emergency_mode);
    assert_eq!((report.queued, report.running), (0, 1));
    r.exec.stats(&a).await.expect("barrier");
    assert_eq!(removals(&drain(&mut r.events)), vec![(1, "reclaimed")]);
    r.exec.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(start_paused = true)]
async fn the_periodic_task_runs_a_cycle_each_interval_and_stops_on_shutdown() {
    let _serial = SERIAL.lock().await;
    let mut r = rig(false).await;
    let a = action("purge.periodic");
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(
        r.purger
            .clone()
            .run(Duration::from_secs(600), false, stop_rx),
    );
    submit(&r.exec, &a, &[1]);
    r.exec.stats(&a).await.expect("barrier");
    // Running for 3600 s + 1: only a cycle after that reclaims it. Cycles come at 600 s steps:
    // the one at 4200 s is the first to find it.
    advance(Duration::from_secs(3600)).await;
    r.exec.stats(&a).await.expect("barrier");
    assert!(removals(&drain(&mut r.events)).is_empty());
    advance(Duration::from_secs(600)).await;
    // Let the cycle's actor calls finish.
    let seen = until_removed(&mut r.events).await;
    assert_eq!(seen, vec![(1, "reclaimed")]);
    stop.send_replace(true);
    task.await.expect("the task ends");
    r.exec.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(start_paused = true)]
async fn a_reconfigured_purger_follows_its_new_schedule_and_ages() {
    let _serial = SERIAL.lock().await;
    let mut r = rig(false).await;
    let a = action("purge.reconfigured");
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    // No schedule yet (purge.enabled false): nothing runs however long it waits.
    let task = tokio::spawn(r.purger.clone().run_scheduled(stop_rx));
    submit(&r.exec, &a, &[1]);
    r.exec.stats(&a).await.expect("barrier");
    // Below the configured running age (3600 s) even when the first cycle comes, 600 s after
    // the reconfiguration: only the new age (60 s) reclaims it.
    advance(Duration::from_secs(100)).await;
    r.exec.stats(&a).await.expect("barrier");
    assert!(
        removals(&drain(&mut r.events)).is_empty(),
        "no cycle while off"
    );

    // On, every 600 s, with a shorter running age; dry runs by default at first.
    let shorter = PurgeSettings {
        max_running_age: Duration::from_secs(60),
        ..r.purger.settings()
    };
    r.purger
        .reconfigure(shorter, Some(Duration::from_secs(600)), true);
    assert!(r.purger.dry_run_by_default());
    r.purger
        .reconfigure(shorter, Some(Duration::from_secs(600)), false);
    assert!(!r.purger.dry_run_by_default());
    assert_eq!(r.purger.settings().max_running_age, Duration::from_secs(60));
    // The task plans its beat when it wakes; on this single thread that is at the next yield.
    tokio::task::yield_now().await;
    // Not at once: a reload must not double as a purge.
    advance(Duration::from_secs(599)).await;
    r.exec.stats(&a).await.expect("barrier");
    assert!(removals(&drain(&mut r.events)).is_empty(), "no cycle yet");
    advance(Duration::from_secs(1)).await;
    let seen = until_removed(&mut r.events).await;
    assert_eq!(
        seen,
        vec![(1, "reclaimed")],
        "a live cycle, by the new default"
    );
    stop.send_replace(true);
    task.await.expect("the task ends");
    r.exec.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(start_paused = true)]
async fn the_log_lines_have_the_operator_guide_s_shape() {
    let _serial = SERIAL.lock().await;
    // The test runtime is single-threaded, so everything below logs through this subscriber.
    let (captured, _guard) = support::capture_logs();
    let r = rig(false).await;
    let a = action("core.http.get");
    submit(&r.exec, &a, &[122, 123]);
    r.exec.stats(&a).await.expect("barrier");
    advance(Duration::from_secs(7250)).await;

    r.purger.run_cycle(true, Trigger::Manual).await;
    let text = captured.text();
    assert!(
        text.contains("[purge][dry-run] Starting stale queue entry purge cycle"),
        "{text}"
    );
    assert!(
        text.contains(
            "[purge][dry-run] Would purge stale queued execution 123 of 'core.http.get' (age: 7250s, max: 7200s)"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "[purge][dry-run] Would reclaim the slot of running execution 122 of 'core.http.get' (age: 7250s, max: 3600s)"
        ),
        "{text}"
    );
    assert!(
        text.contains("[purge][dry-run] Completed purge cycle in 0.00s: 2 entries would be purged"),
        "{text}"
    );

    r.purger.run_cycle(false, Trigger::Manual).await;
    let text = captured.text();
    assert!(
        text.contains(
            "[purge] Purged stale queued execution 123 of 'core.http.get' to the DLQ (age: 7250s, max: 7200s)"
        ),
        "{text}"
    );
    assert!(
        text.contains("[purge] Completed purge cycle in 0.00s: 2 entries purged"),
        "{text}"
    );
    r.exec.shutdown(Duration::from_secs(5)).await;
}
