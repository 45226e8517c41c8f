//! The queue rules, tested directly on the `ActionQueue` state machine with paused tokio time.

mod common_core;

use std::time::Duration;

use common_core::rig::QueueRig;
use common_core::{limit, payload_of, policy};
use fifo_executor::core::ports::{Event, RemovalReason};
use fifo_executor::core::{ActionPolicy, PurgeOrder, QueueSettings, RateLimit, Restored};
use fifo_executor::model::{CancelVerdict, CompletionVerdict, Rejection, UnmatchedReason, Verdict};
use tokio::time::advance;

fn settings(max_queue_length: usize, queue_timeout: Duration) -> QueueSettings {
    QueueSettings {
        max_queue_length,
        queue_timeout,
        emergency_mode: false,
        ..QueueSettings::default()
    }
}

fn rig(concurrency: u32) -> QueueRig {
    QueueRig::new(QueueSettings::default(), policy(concurrency))
}

fn rate_limited(concurrency: u32, max: u32, per: Duration) -> fifo_executor::core::ActionPolicy {
    let mut p = policy(concurrency);
    p.rate_limit = Some(RateLimit {
        max: limit(max),
        per,
    });
    p
}

/// Advances paused time to the queue's next wake-up and handles it, as the actor's timer would.
async fn wake(q: &mut QueueRig) {
    let at = q.queue.next_wake().expect("the queue asked for a wake-up");
    advance(at.since(q.now())).await;
    q.tick();
}

// ---------------------------------------------------------------------------------------------
// Admission and FIFO order

#[tokio::test(start_paused = true)]
async fn an_execution_is_admitted_at_once_when_nothing_waits_and_a_slot_is_free() {
    let mut q = rig(2);
    assert_eq!(q.submit(1), Verdict::Queued { execution_id: 1 });
    assert_eq!(q.dispatched_ids(), vec![1]);
    assert!(q.queue.is_running(1));
    assert_eq!(q.queue.queue_length(), 0);
    let d = &q.dispatched[0];
    assert_eq!(d.payload, payload_of(1));
    assert_eq!(d.attempt, 1);
    assert_eq!(d.enqueued_at, d.dispatched_at);
}

#[tokio::test(start_paused = true)]
async fn an_execution_waits_at_the_tail_when_no_slot_is_free() {
    let mut q = rig(1);
    q.submit_all([1, 2, 3]);
    assert_eq!(q.dispatched_ids(), vec![1]);
    assert_eq!(q.waiting_ids(), vec![2, 3]);
    assert_eq!(q.queue.active_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_new_execution_never_overtakes_a_waiting_one_even_when_a_slot_is_free() {
    // The rate limit holds the head back while a slot is free; a newcomer must still queue
    // behind it.
    let mut q = QueueRig::new(
        QueueSettings::default(),
        rate_limited(5, 1, Duration::from_secs(1)),
    );
    q.submit_all([1, 2]);
    assert_eq!(q.dispatched_ids(), vec![1]);
    assert_eq!(q.waiting_ids(), vec![2]);
    q.submit_all([3]);
    assert_eq!(q.dispatched_ids(), vec![1]);
    assert_eq!(q.waiting_ids(), vec![2, 3]);
}

#[tokio::test(start_paused = true)]
async fn dispatch_order_is_the_order_of_acceptance() {
    let mut q = rig(3);
    let ids = [42, 7, 1000, 3, 99, 5, 64, 8];
    q.submit_all(ids);
    while let Some(&id) = q
        .dispatched_ids()
        .iter()
        .find(|id| q.queue.is_running(**id))
    {
        assert_eq!(q.complete(id), CompletionVerdict::Freed);
    }
    assert_eq!(q.dispatched_ids(), ids.to_vec());
}

#[tokio::test(start_paused = true)]
async fn a_completion_frees_exactly_its_own_slot_and_admits_the_head() {
    let mut q = rig(2);
    q.submit_all([1, 2, 3, 4]);
    assert_eq!(q.dispatched_ids(), vec![1, 2]);
    // Completing the second frees its slot only; the first keeps running.
    assert_eq!(q.complete(2), CompletionVerdict::Freed);
    assert!(q.queue.is_running(1));
    assert!(!q.queue.is_running(2));
    assert_eq!(q.dispatched_ids(), vec![1, 2, 3]);
    assert_eq!(q.waiting_ids(), vec![4]);
    assert_eq!(q.queue.active_count(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_completion_frees_nothing_and_is_counted_as_unmatched() {
    let mut q = rig(1);
    q.submit_all([1, 2, 3]);
    assert_eq!(q.complete(1), CompletionVerdict::Freed);
    assert_eq!(q.dispatched_ids(), vec![1, 2]);
    assert_eq!(
        q.complete(1),
        CompletionVerdict::Unmatched(UnmatchedReason::Unknown)
    );
    assert_eq!(q.dispatched_ids(), vec![1, 2], "nothing more was admitted");
    assert!(q.queue.is_running(2));
    let s = q.queue.stats();
    assert_eq!(s.total_completed, 1);
    assert_eq!(s.total_unmatched, 1);
    assert_eq!(s.active_count, 1);
}

#[tokio::test(start_paused = true)]
async fn a_completion_for_a_waiting_execution_frees_nothing_and_says_it_was_never_dispatched() {
    let mut q = rig(1);
    q.submit_all([1, 2, 3]);
    assert_eq!(
        q.complete(3),
        CompletionVerdict::Unmatched(UnmatchedReason::NeverDispatched)
    );
    assert_eq!(
        q.waiting_ids(),
        vec![2, 3],
        "the waiting one keeps its place"
    );
    assert!(q.queue.is_running(1));
    assert_eq!(q.queue.stats().total_unmatched, 1);
}

#[tokio::test(start_paused = true)]
async fn a_completion_for_an_unknown_execution_frees_nothing_and_is_counted() {
    let mut q = rig(1);
    q.submit_all([1, 2]);
    assert_eq!(
        q.complete(77),
        CompletionVerdict::Unmatched(UnmatchedReason::Unknown)
    );
    assert_eq!(q.dispatched_ids(), vec![1]);
    assert_eq!(q.queue.stats().total_unmatched, 1);
    assert!(matches!(
        q.log.last(),
        Some(Event::Unmatched {
            execution_id: 77,
            action: Some(_),
            ..
        })
    ));
}

// ---------------------------------------------------------------------------------------------
// Limit changes

#[tokio::test(start_paused = true)]
async fn raising_the_limit_admits_from_the_head_at_once() {
    let mut q = rig(1);
    q.submit_all(1..=6);
    q.set_limit(4);
    assert_eq!(q.dispatched_ids(), vec![1, 2, 3, 4]);
    assert_eq!(q.waiting_ids(), vec![5, 6]);
    assert_eq!(q.queue.stats().max_concurrent, 4);
}

#[tokio::test(start_paused = true)]
async fn lowering_the_limit_preempts_nothing_and_admits_nothing_until_active_is_below_it() {
    let mut q = rig(4);
    q.submit_all(1..=8);
    assert_eq!(q.dispatched_ids(), vec![1, 2, 3, 4]);
    q.set_limit(2);
    assert_eq!(q.queue.active_count(), 4, "nothing is preempted");
    q.complete(1);
    q.complete(2);
    assert_eq!(q.queue.active_count(), 2);
    assert_eq!(
        q.dispatched_ids(),
        vec![1, 2, 3, 4],
        "2 active at limit 2: none admitted"
    );
    q.complete(3);
    assert_eq!(q.dispatched_ids(), vec![1, 2, 3, 4, 5]);
    assert_eq!(q.queue.active_count(), 2);
    q.complete(4);
    assert_eq!(q.dispatched_ids(), vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(q.waiting_ids(), vec![7, 8]);
}

// ---------------------------------------------------------------------------------------------
// Queue length

#[tokio::test(start_paused = true)]
async fn one_more_than_max_queue_length_is_rejected_and_nothing_queued_changes() {
    let mut q = QueueRig::new(settings(3, Duration::from_secs(3600)), policy(1));
    q.submit_all(1..=4);
    assert_eq!(q.waiting_ids(), vec![2, 3, 4]);
    let before = q.queue.stats();
    let verdict = q.submit(5);
    let Verdict::Rejected {
        execution_id: 5,
        rejection,
    } = verdict
    else {
        panic!("expected a rejection, got {verdict:?}");
    };
    assert_eq!(rejection, Rejection::QueueFull { max: 3 });
    assert_eq!(rejection.to_string(), "Queue full (max length: 3)");
    assert_eq!(rejection.error_class(), "QueueFull");
    assert_eq!(q.waiting_ids(), vec![2, 3, 4]);
    assert_eq!(q.dispatched_ids(), vec![1]);
    let after = q.queue.stats();
    assert_eq!(after.queue_length, before.queue_length);
    assert_eq!(after.active_count, before.active_count);
    assert_eq!(after.total_enqueued, before.total_enqueued);
    assert_eq!(after.total_rejected, before.total_rejected + 1);
    assert_eq!(after.last_progress, before.last_progress);
    // The rejected one never comes out later.
    for id in 1..=4 {
        q.complete(id);
    }
    assert_eq!(q.dispatched_ids(), vec![1, 2, 3, 4]);
}

#[tokio::test(start_paused = true)]
async fn the_queue_length_limit_counts_only_waiting_executions() {
    let mut q = QueueRig::new(settings(1, Duration::from_secs(3600)), policy(3));
    // Three are admitted at once and one waits: the queue holds four, at max length 1.
    q.submit_all(1..=4);
    assert_eq!(q.dispatched_ids(), vec![1, 2, 3]);
    assert!(matches!(q.submit(5), Verdict::Rejected { .. }));
    q.complete(1);
    q.submit_all([5]);
    assert_eq!(q.waiting_ids(), vec![5]);
}

// ---------------------------------------------------------------------------------------------
// Queue timeout

#[tokio::test(start_paused = true)]
async fn an_execution_that_waited_longer_than_the_queue_timeout_is_timed_out_and_the_rest_keep_order()
 {
    let timeout = Duration::from_secs(60);
    let mut q = QueueRig::new(settings(100, timeout), policy(1));
    q.submit_all([1, 2, 3]);
    advance(Duration::from_secs(30)).await;
    q.submit_all([4, 5]);
    advance(Duration::from_secs(30)).await;
    q.tick();
    assert!(
        q.removed(RemovalReason::TimedOut).is_empty(),
        "exactly 60 s is not longer"
    );
    advance(Duration::from_millis(1)).await;
    q.tick();
    assert_eq!(q.removed(RemovalReason::TimedOut), vec![2, 3]);
    assert_eq!(q.waiting_ids(), vec![4, 5]);
    let waited = q.log.iter().find_map(|e| match e {
        Event::Removed {
            reason: RemovalReason::TimedOut,
            execution,
            ..
        } => Some(execution.waited),
        _ => None,
    });
    assert_eq!(waited, Some(timeout + Duration::from_millis(1)));
    assert!(
        q.queue.is_running(1),
        "a running execution never times out in the queue"
    );
    q.complete(1);
    assert_eq!(q.dispatched_ids(), vec![1, 4]);
    assert_eq!(q.queue.stats().total_timed_out, 2);
}

#[tokio::test(start_paused = true)]
async fn the_timeout_wake_up_comes_just_after_the_head_s_deadline() {
    let timeout = Duration::from_secs(10);
    let mut q = QueueRig::new(settings(100, timeout), policy(1));
    assert_eq!(
        q.queue.next_wake(),
        None,
        "nothing waits, nothing to time out"
    );
    q.submit_all([1]);
    assert_eq!(q.queue.next_wake(), None);
    let t0 = q.now();
    q.submit_all([2]);
    advance(Duration::from_secs(4)).await;
    q.submit_all([3]);
    let first = q.queue.next_wake().expect("a wake-up for the head");
    assert!(first > t0.plus(timeout), "strictly after the deadline");
    assert!(first <= t0.plus(timeout).plus(Duration::from_millis(1)));
    wake(&mut q).await;
    assert_eq!(q.removed(RemovalReason::TimedOut), vec![2]);
    wake(&mut q).await;
    assert_eq!(q.removed(RemovalReason::TimedOut), vec![2, 3]);
    assert_eq!(q.queue.next_wake(), None);
}

#[tokio::test(start_paused = true)]
async fn a_submission_finds_room_once_stale_executions_have_timed_out() {
    let mut q = QueueRig::new(settings(2, Duration::from_secs(5)), policy(1));
    q.submit_all([1, 2, 3]);
    advance(Duration::from_secs(6)).await;
    // No tick has run yet: the submission itself must time the stale ones out first.
    assert_eq!(q.submit(4), Verdict::Queued { execution_id: 4 });
    assert_eq!(q.removed(RemovalReason::TimedOut), vec![2, 3]);
    assert_eq!(q.waiting_ids(), vec![4]);
}

// ---------------------------------------------------------------------------------------------
// Cancel

#[tokio::test(start_paused = true)]
async fn canceling_a_waiting_execution_removes_it_and_the_rest_keep_order() {
    let mut q = rig(1);
    q.submit_all(1..=5);
    assert_eq!(q.cancel(3), CancelVerdict::Canceled);
    assert_eq!(q.waiting_ids(), vec![2, 4, 5]);
    assert_eq!(q.removed(RemovalReason::Canceled), vec![3]);
    assert_eq!(q.queue.stats().total_canceled, 1);
    for id in [1, 2, 4, 5] {
        q.complete(id);
    }
    assert_eq!(q.dispatched_ids(), vec![1, 2, 4, 5]);
}

#[tokio::test(start_paused = true)]
async fn a_submission_canceled_before_it_came_is_recorded_canceled_even_if_full_or_disabled() {
    let mut q = QueueRig::new(settings(1, Duration::from_secs(3600)), policy(1));
    q.submit_all(1..=2);
    // The queue is full (2 waits behind 1), yet 3, canceled ahead, is accepted and canceled;
    // a rejection would put it in the DLQ, from where a replay would run it.
    for (id, enabled) in [(3, true), (4, false)] {
        q.set_enabled(enabled);
        let (receipt, answer) = common_core::Answer::new();
        let (cancel, canceled) = common_core::Answer::new();
        let mut s = common_core::sub(id);
        s.receipt = Some(receipt);
        let fx = q.run(|queue, now, fx| queue.submit_canceled(s, Some(cancel), now, fx));
        assert!(
            fx.dispatches.is_empty(),
            "{id} is never admitted: {:?}",
            fx.dispatches
        );
        assert!(
            !fx.events
                .iter()
                .any(|e| matches!(e, Event::Rejected { .. }))
        );
        assert_eq!(answer.get(), Some(Verdict::Queued { execution_id: id }));
        assert_eq!(canceled.get(), Some(CancelVerdict::Canceled));
    }
    q.set_enabled(true);
    assert_eq!(q.waiting_ids(), vec![2]);
    let stats = q.queue.stats();
    assert_eq!((stats.total_canceled, stats.total_rejected), (2, 0));
    q.complete(1);
    assert_eq!(q.dispatched_ids(), vec![1, 2]);
}

#[tokio::test(start_paused = true)]
async fn canceling_a_running_execution_answers_running_and_changes_nothing() {
    let mut q = rig(1);
    q.submit_all([1, 2]);
    let before = q.queue.stats();
    let events_before = q.log.len();
    assert_eq!(q.cancel(1), CancelVerdict::Running);
    assert!(q.queue.is_running(1));
    assert_eq!(q.waiting_ids(), vec![2]);
    assert_eq!(q.log.len(), events_before, "no event");
    assert_eq!(q.queue.stats(), before);
}

#[tokio::test(start_paused = true)]
async fn canceling_an_unknown_or_finished_execution_answers_unknown() {
    let mut q = rig(1);
    q.submit_all([1, 2]);
    q.complete(1);
    assert_eq!(q.cancel(1), CancelVerdict::Unknown);
    assert_eq!(q.cancel(99), CancelVerdict::Unknown);
    assert_eq!(q.cancel(2), CancelVerdict::Running);
}

// ---------------------------------------------------------------------------------------------
// Rate limit

#[tokio::test(start_paused = true)]
async fn the_rate_limit_holds_admissions_back_on_top_of_concurrency() {
    // Two per second, with room for ten at once: the rate is what limits.
    let mut q = QueueRig::new(
        QueueSettings::default(),
        rate_limited(10, 2, Duration::from_secs(1)),
    );
    q.submit_all(1..=6);
    assert_eq!(
        q.dispatched_ids(),
        vec![1, 2],
        "a burst of `max` goes at once"
    );
    let t0 = q.now();
    let mut admitted_at = Vec::new();
    for _ in 3..=6 {
        let n = q.dispatched.len();
        wake(&mut q).await;
        assert_eq!(q.dispatched.len(), n + 1, "one per wake-up");
        admitted_at.push(q.now().since(t0));
    }
    assert_eq!(q.dispatched_ids(), (1..=6).collect::<Vec<_>>());
    let ms: Vec<u128> = admitted_at.iter().map(|d| d.as_millis()).collect();
    assert_eq!(ms, vec![500, 1000, 1500, 2000]);
}

#[tokio::test(start_paused = true)]
async fn concurrency_still_holds_under_a_generous_rate_limit() {
    let mut q = QueueRig::new(
        QueueSettings::default(),
        rate_limited(2, 100, Duration::from_secs(1)),
    );
    q.submit_all(1..=5);
    assert_eq!(q.dispatched_ids(), vec![1, 2]);
    let wake = q.queue.next_wake().expect("the head's timeout");
    assert!(
        wake.since(q.now()) > Duration::from_secs(3599),
        "no slot is free, so the rate limit asks for no wake-up; only the timeout does"
    );
    q.complete(1);
    assert_eq!(q.dispatched_ids(), vec![1, 2, 3]);
}

#[tokio::test(start_paused = true)]
async fn the_rate_limit_wake_up_is_never_too_early_to_admit() {
    // 3 per second: the period (333,333,333 ns) is not a whole number of microseconds.
    let mut q = QueueRig::new(
        QueueSettings::default(),
        rate_limited(10, 3, Duration::from_secs(1)),
    );
    q.submit_all(1..=5);
    assert_eq!(q.dispatched_ids(), vec![1, 2, 3]);
    wake(&mut q).await;
    assert_eq!(
        q.dispatched_ids(),
        vec![1, 2, 3, 4],
        "the wake-up the queue asked for must admit the head"
    );
    wake(&mut q).await;
    assert_eq!(q.dispatched_ids(), vec![1, 2, 3, 4, 5]);
}

#[tokio::test(start_paused = true)]
async fn removing_the_rate_limit_admits_at_once() {
    let mut q = QueueRig::new(
        QueueSettings::default(),
        rate_limited(10, 1, Duration::from_secs(60)),
    );
    q.submit_all(1..=4);
    assert_eq!(q.dispatched_ids(), vec![1]);
    q.set_policy(policy(10));
    assert_eq!(q.dispatched_ids(), vec![1, 2, 3, 4]);
}

// ---------------------------------------------------------------------------------------------
// Enabled flag

#[tokio::test(start_paused = true)]
async fn a_disabled_action_rejects_new_submissions_and_dispatches_nothing() {
    let mut q = rig(1);
    q.submit_all([1, 2, 3]);
    q.set_enabled(false);
    assert_eq!(
        q.submit(4),
        Verdict::Rejected {
            execution_id: 4,
            rejection: Rejection::ActionDisabled
        }
    );
    assert_eq!(Rejection::ActionDisabled.error_class(), "ActionDisabled");
    assert_eq!(
        q.complete(1),
        CompletionVerdict::Freed,
        "running ones still complete"
    );
    assert_eq!(
        q.dispatched_ids(),
        vec![1],
        "nothing is dispatched while disabled"
    );
    assert_eq!(q.waiting_ids(), vec![2, 3], "what waits keeps its place");
    let s = q.queue.stats();
    assert!(!s.enabled);
    assert_eq!(s.total_rejected, 1);
}

#[tokio::test(start_paused = true)]
async fn re_enabling_an_action_resumes_dispatch_in_order() {
    let mut q = rig(2);
    q.set_enabled(false);
    assert!(matches!(q.submit(1), Verdict::Rejected { .. }));
    q.set_enabled(true);
    q.submit_all([2, 3, 4]);
    q.set_enabled(false);
    q.complete(2);
    q.complete(3);
    q.submit(5);
    assert_eq!(q.dispatched_ids(), vec![2, 3]);
    q.set_enabled(true);
    assert_eq!(q.dispatched_ids(), vec![2, 3, 4]);
    q.submit_all([6, 7]);
    assert_eq!(q.dispatched_ids(), vec![2, 3, 4, 6]);
    q.complete(4);
    assert_eq!(q.dispatched_ids(), vec![2, 3, 4, 6, 7]);
}

// ---------------------------------------------------------------------------------------------
// Emergency mode

fn emergency(max_queue_length: usize) -> QueueSettings {
    QueueSettings {
        max_queue_length,
        queue_timeout: Duration::from_secs(1),
        emergency_mode: true,
        ..QueueSettings::default()
    }
}

#[tokio::test(start_paused = true)]
async fn emergency_mode_times_nothing_out() {
    let mut q = QueueRig::new(emergency(100), policy(1));
    q.submit_all(1..=3);
    assert_eq!(q.queue.next_wake(), None);
    advance(Duration::from_secs(3600)).await;
    q.tick();
    assert_eq!(q.waiting_ids(), vec![2, 3]);
    assert_eq!(q.queue.stats().total_timed_out, 0);
}

#[tokio::test(start_paused = true)]
async fn emergency_mode_ignores_the_rate_limit_but_concurrency_and_queue_length_still_hold() {
    let mut q = QueueRig::new(emergency(2), rate_limited(3, 1, Duration::from_secs(3600)));
    q.submit_all(1..=5);
    assert_eq!(
        q.dispatched_ids(),
        vec![1, 2, 3],
        "no rate limit, concurrency 3"
    );
    assert_eq!(q.waiting_ids(), vec![4, 5]);
    assert!(matches!(
        q.submit(6),
        Verdict::Rejected {
            rejection: Rejection::QueueFull { max: 2 },
            ..
        }
    ));
    q.complete(1);
    q.complete(2);
    assert_eq!(q.dispatched_ids(), vec![1, 2, 3, 4, 5]);
    assert_eq!(q.queue.active_count(), 3);
}

// ---------------------------------------------------------------------------------------------
// Purge

fn purge_order(queued_secs: Option<u64>, running_secs: Option<u64>, dry_run: bool) -> PurgeOrder {
    PurgeOrder {
        max_queued_age: queued_secs.map(Duration::from_secs),
        max_running_age: running_secs.map(Duration::from_secs),
        dry_run,
    }
}

/// Limit 2: 1 and 2 run since t=0, 3 and 4 wait since t=0, 5 and 6 wait since t=100 s; now is
/// t=200 s.
async fn purge_scene() -> QueueRig {
    let mut q = rig(2);
    q.submit_all(1..=4);
    advance(Duration::from_secs(100)).await;
    q.submit_all([5, 6]);
    advance(Duration::from_secs(100)).await;
    q
}

#[tokio::test(start_paused = true)]
async fn a_purge_dry_run_reports_what_it_would_remove_and_changes_nothing() {
    let mut q = purge_scene().await;
    let before = q.queue.stats();
    let events = q.log.len();
    let report = q.purge(purge_order(Some(150), Some(150), true));
    let ids: Vec<_> = report.iter().map(|e| (e.execution_id, e.state)).collect();
    assert_eq!(
        ids,
        vec![(3, "queued"), (4, "queued"), (1, "running"), (2, "running")]
    );
    assert_eq!(report[0].age_seconds, 200.0);
    assert_eq!(report[0].limit_seconds, 150.0);
    assert_eq!(q.queue.stats(), before);
    assert_eq!(q.log.len(), events);
    assert_eq!(q.waiting_ids(), vec![3, 4, 5, 6]);
}

#[tokio::test(start_paused = true)]
async fn a_purge_removes_the_stale_waiting_prefix_as_purged() {
    let mut q = purge_scene().await;
    let report = q.purge(purge_order(Some(150), None, false));
    assert_eq!(report.len(), 2);
    assert_eq!(q.removed(RemovalReason::Purged), vec![3, 4]);
    assert_eq!(q.waiting_ids(), vec![5, 6]);
    assert!(q.queue.is_running(1) && q.queue.is_running(2));
    assert_eq!(q.queue.stats().total_purged, 2);
}

#[tokio::test(start_paused = true)]
async fn a_purge_reclaims_old_running_slots_and_admits_the_next() {
    let mut q = purge_scene().await;
    q.purge(purge_order(None, Some(150), false));
    assert_eq!(q.reclaimed(), vec![1, 2]);
    assert_eq!(q.dispatched_ids(), vec![1, 2, 3, 4]);
    let s = q.queue.stats();
    assert_eq!(s.total_reclaimed, 2);
    assert_eq!(s.active_count, 2);
    let running_for = q.log.iter().find_map(|e| match e {
        Event::Reclaimed { running_for, .. } => Some(*running_for),
        _ => None,
    });
    assert_eq!(running_for, Some(Duration::from_secs(200)));
}

#[tokio::test(start_paused = true)]
async fn a_late_completion_for_a_reclaimed_execution_frees_nothing() {
    let mut q = purge_scene().await;
    q.purge(purge_order(None, Some(150), false));
    assert_eq!(
        q.complete(1),
        CompletionVerdict::Unmatched(UnmatchedReason::Unknown)
    );
    assert_eq!(q.dispatched_ids(), vec![1, 2, 3, 4], "no extra admission");
    assert_eq!(q.queue.active_count(), 2);
}

#[tokio::test(start_paused = true)]
async fn emergency_mode_purges_no_waiting_execution_but_still_reclaims_slots() {
    let mut q = QueueRig::new(emergency(100), policy(1));
    q.submit_all([1, 2]);
    advance(Duration::from_secs(100)).await;
    q.purge(purge_order(Some(10), Some(10), false));
    assert!(q.removed(RemovalReason::Purged).is_empty());
    assert_eq!(q.reclaimed(), vec![1]);
    assert_eq!(q.dispatched_ids(), vec![1, 2]);
}

// ---------------------------------------------------------------------------------------------
// Restore

fn restored(id: u64, q: &QueueRig, enqueued_ago: u64, admitted_ago: Option<u64>) -> Restored {
    let now = q.now();
    Restored {
        execution_id: id,
        request_id: Some(format!("req-{id}").into()),
        payload: payload_of(id),
        enqueued_at: now.minus(Duration::from_secs(enqueued_ago)),
        admitted_at: admitted_ago.map(|a| now.minus(Duration::from_secs(a))),
        sent_before: 0,
        resend: false,
    }
}

#[tokio::test(start_paused = true)]
async fn an_unconfirmed_dispatch_restored_goes_out_again_before_the_waiting_ones() {
    // Found by the cluster run: the new owner dispatched the waiting 594 into a free slot
    // before it sent again 593, admitted by the dead owner but never confirmed, so a worker
    // saw 594 first. The copy sent again leaves with the restore, ahead of them.
    let mut q = rig(3);
    let mut unconfirmed = restored(2, &q, 40, Some(30));
    unconfirmed.resend = true;
    unconfirmed.sent_before = 1;
    q.restore(vec![
        restored(1, &q, 50, Some(40)),
        unconfirmed,
        restored(3, &q, 30, None),
        restored(4, &q, 20, None),
    ]);
    assert_eq!(
        q.dispatched_ids(),
        vec![2, 3],
        "2 again, then the free slot's 3"
    );
    assert_eq!(
        q.dispatched[0].attempt, 2,
        "a copy sent again carries a raised attempt"
    );
    assert_eq!(q.dispatched[0].request_id.as_deref(), Some("req-2"));
    assert_eq!(q.dispatched[0].payload, payload_of(2));
    assert_eq!(q.dispatched[1].attempt, 1);
    assert_eq!(q.waiting_ids(), vec![4]);
    assert_eq!(
        q.queue.stats().active_count,
        3,
        "2 holds its slot, sent again or not"
    );
    assert_eq!(q.complete(2), CompletionVerdict::Freed);
    assert_eq!(q.dispatched_ids(), vec![2, 3, 4]);
}

#[tokio::test(start_paused = true)]
async fn restore_puts_waiting_executions_back_in_order_and_running_ones_in_their_slots() {
    let mut q = rig(2);
    let list = vec![
        restored(10, &q, 50, Some(40)),
        restored(11, &q, 45, None),
        restored(12, &q, 44, None),
        restored(13, &q, 43, None),
    ];
    q.restore(list);
    assert!(q.queue.is_running(10));
    // One free slot: the head of the restored waiting ones is admitted, the rest wait in order.
    assert_eq!(q.dispatched_ids(), vec![11]);
    assert_eq!(q.waiting_ids(), vec![12, 13]);
    assert_eq!(q.dispatched[0].request_id.as_deref(), Some("req-11"));
    let s = q.queue.stats();
    assert_eq!(s.total_enqueued, 4);
    assert_eq!(s.active_count, 2);
    assert_eq!(q.complete(10), CompletionVerdict::Freed);
    assert_eq!(q.dispatched_ids(), vec![11, 12]);
}

#[tokio::test(start_paused = true)]
async fn restored_running_executions_may_exceed_the_limit_and_hold_back_admissions() {
    let mut q = rig(1);
    let list = vec![
        restored(1, &q, 30, Some(20)),
        restored(2, &q, 30, Some(10)),
        restored(3, &q, 5, None),
    ];
    q.restore(list);
    assert_eq!(q.queue.active_count(), 2);
    assert!(q.dispatched_ids().is_empty());
    q.complete(1);
    assert!(q.dispatched_ids().is_empty(), "1 active at limit 1");
    q.complete(2);
    assert_eq!(q.dispatched_ids(), vec![3]);
}

#[tokio::test(start_paused = true)]
async fn a_completion_for_a_restored_execution_that_may_have_been_sent_ends_it_while_it_waits() {
    // The dead executor sent 2 ahead of committing its admission and a worker finished it;
    // the completion comes before 2's turn in the new executor, whose slot 1 holds.
    let mut q = rig(1);
    let mut maybe_sent = restored(2, &q, 30, None);
    maybe_sent.sent_before = 1;
    q.restore(vec![
        restored(1, &q, 40, Some(35)),
        maybe_sent,
        restored(3, &q, 20, None),
    ]);
    assert_eq!(q.complete(2), CompletionVerdict::Freed);
    assert_eq!(q.waiting_ids(), vec![3], "2 ended where it waited");
    assert_eq!(q.queue.active_count(), 1, "1 still holds its slot");
    q.complete(1);
    assert_eq!(q.dispatched_ids(), vec![3], "2 is not sent again: it ran");
    assert_eq!(q.queue.stats().total_completed, 2);
}

#[tokio::test(start_paused = true)]
async fn a_restored_execution_that_may_have_been_sent_goes_out_with_a_higher_attempt() {
    let mut q = rig(1);
    let mut maybe_sent = restored(1, &q, 30, None);
    maybe_sent.sent_before = 1;
    q.restore(vec![maybe_sent, restored(2, &q, 20, None)]);
    assert_eq!(q.dispatched_ids(), vec![1]);
    assert_eq!(q.dispatched[0].attempt, 2);
    q.complete(1);
    assert_eq!(q.dispatched_ids(), vec![1, 2]);
    assert_eq!(
        q.dispatched[1].attempt, 1,
        "never sent before: a first attempt"
    );
    q.submit_all([3]);
    q.complete(2);
    assert_eq!(q.dispatched[2].attempt, 1);
}

#[tokio::test(start_paused = true)]
async fn restored_executions_keep_their_original_age_for_timeouts_and_purges() {
    let mut q = QueueRig::new(settings(100, Duration::from_secs(60)), policy(1));
    q.submit_all([1]);
    q.restore(vec![restored(2, &q, 70, None), restored(3, &q, 30, None)]);
    assert_eq!(q.removed(RemovalReason::TimedOut), vec![2]);
    assert_eq!(q.waiting_ids(), vec![3]);
}

// ---------------------------------------------------------------------------------------------
// Counters

#[tokio::test(start_paused = true)]
async fn a_queue_that_only_grows_shows_fresh_updates_but_old_progress() {
    let mut q = rig(1);
    q.submit_all([1]);
    let started = q.queue.stats().last_progress;
    advance(Duration::from_secs(30)).await;
    q.submit_all([2, 3]);
    let s = q.queue.stats();
    assert_eq!(s.last_progress, started);
    assert_eq!(s.last_updated - started, chrono::Duration::seconds(30));
    assert_eq!(s.oldest_enqueued_at, Some(s.last_updated));
    advance(Duration::from_secs(5)).await;
    q.complete(1);
    let s = q.queue.stats();
    assert_eq!(s.last_progress, s.last_updated);
    assert_eq!(s.last_progress - started, chrono::Duration::seconds(35));
}

#[tokio::test(start_paused = true)]
async fn counters_follow_every_kind_of_outcome() {
    let mut q = QueueRig::new(settings(3, Duration::from_secs(10)), policy(1));
    q.submit_all(1..=4); // 1 runs, 2 3 4 wait
    assert!(matches!(q.submit(5), Verdict::Rejected { .. }));
    q.cancel(3);
    q.complete(1); // 2 runs
    q.complete(1); // unmatched
    advance(Duration::from_secs(11)).await;
    q.tick(); // 4 times out
    let s = q.queue.stats();
    assert_eq!(
        (
            s.total_enqueued,
            s.total_completed,
            s.total_canceled,
            s.total_timed_out,
            s.total_rejected,
            s.total_unmatched,
        ),
        (4, 1, 1, 1, 1, 1)
    );
    assert_eq!((s.queue_length, s.active_count), (0, 1));
    assert_eq!(s.oldest_enqueued_at, None);
    assert!(q.queue.is_running(2));
    assert!(!q.queue.is_idle());
    q.complete(2);
    assert!(q.queue.is_idle());
}

// ---------------------------------------------------------------------------------------------
// Dispatches that no worker queue takes

fn no_route_settings(timeout: Option<Duration>) -> QueueSettings {
    QueueSettings {
        no_route_retry: Duration::from_secs(1),
        no_route_timeout: timeout,
        ..QueueSettings::default()
    }
}

#[tokio::test(start_paused = true)]
async fn a_returned_dispatch_frees_its_slot_and_goes_out_again_first_with_the_same_attempt() {
    let mut q = QueueRig::new(no_route_settings(None), policy(1));
    q.submit_all([1, 2]);
    assert_eq!(q.dispatched_ids(), vec![1]);
    q.returned(1);
    assert_eq!(
        q.queue.active_count(),
        0,
        "no worker got it: the slot is free"
    );
    assert_eq!(q.waiting_ids(), vec![1, 2], "1 keeps its place before 2");
    assert!(q.queue.no_route_since().is_some());
    assert_eq!(
        q.dispatched_ids(),
        vec![1],
        "nothing goes out until the next try"
    );
    assert_eq!(
        q.queue.next_wake(),
        Some(q.now().plus(Duration::from_secs(1)))
    );
    advance(Duration::from_secs(1)).await;
    q.tick_due();
    assert_eq!(q.dispatched_ids(), vec![1, 1]);
    assert_eq!(
        q.dispatched[1].attempt, 1,
        "the returned copy reached no worker"
    );
    assert!(
        q.log.iter().any(|e| matches!(
            e,
            Event::Returned {
                execution_id: 1,
                ..
            }
        )),
        "the ledger hears of it"
    );
}

#[tokio::test(start_paused = true)]
async fn returned_dispatches_wait_again_in_the_order_they_went_out() {
    let mut q = QueueRig::new(no_route_settings(None), policy(3));
    q.submit_all([1, 2, 3, 4]);
    assert_eq!(q.dispatched_ids(), vec![1, 2, 3]);
    for id in [1, 2, 3] {
        q.returned(id);
    }
    assert_eq!(q.waiting_ids(), vec![1, 2, 3, 4]);
    q.cancel(2);
    q.submit_all([5]);
    assert_eq!(q.waiting_ids(), vec![1, 3, 4, 5]);
    // A delivery ends the wait at once: a worker queue is bound now.
    q.routed();
    assert_eq!(q.dispatched_ids(), vec![1, 2, 3, 1, 3, 4]);
    assert!(q.queue.no_route_since().is_none());
    // Returned again later, the new ones go back behind nothing returned before.
    q.returned(4);
    assert_eq!(q.waiting_ids(), vec![4, 5]);
}

#[tokio::test(start_paused = true)]
async fn past_the_no_route_timeout_what_comes_back_is_dead_lettered_and_the_next_tried_at_once() {
    let mut q = QueueRig::new(no_route_settings(Some(Duration::from_secs(5))), policy(1));
    q.submit_all([1, 2]);
    q.returned(1);
    advance(Duration::from_secs(6)).await;
    q.tick_due();
    assert_eq!(q.dispatched_ids(), vec![1, 1]);
    q.returned(1);
    assert_eq!(q.removed(RemovalReason::NoRoute), vec![1]);
    assert_eq!(q.dispatched_ids(), vec![1, 1, 2], "2 goes out at once");
    assert_eq!(q.queue.stats().total_no_route, 1);
}

#[tokio::test(start_paused = true)]
async fn in_emergency_mode_nothing_is_dead_lettered_for_having_no_route() {
    let mut settings = no_route_settings(Some(Duration::from_secs(5)));
    settings.emergency_mode = true;
    let mut q = QueueRig::new(settings, policy(1));
    q.submit_all([1]);
    q.returned(1);
    advance(Duration::from_secs(60)).await;
    q.tick_due();
    q.returned(1);
    assert!(q.removed(RemovalReason::NoRoute).is_empty());
    assert_eq!(q.waiting_ids(), vec![1]);
}

#[tokio::test(start_paused = true)]
async fn a_return_for_an_execution_that_no_longer_holds_a_slot_changes_nothing() {
    let mut q = QueueRig::new(no_route_settings(None), policy(1));
    q.submit_all([1, 2]);
    q.complete(1);
    q.returned(1);
    assert!(q.queue.no_route_since().is_none());
    assert_eq!(q.dispatched_ids(), vec![1, 2]);
    assert!(q.waiting_ids().is_empty());
}

#[tokio::test(start_paused = true)]
async fn returns_in_any_order_and_partial_retries_keep_acceptance_order() {
    let mut q = QueueRig::new(
        no_route_settings(None),
        ActionPolicy {
            rate_limit: Some(RateLimit {
                max: limit(2),
                per: Duration::from_secs(2),
            }),
            ..policy(2)
        },
    );
    q.submit_all([1, 2, 3]);
    assert_eq!(q.dispatched_ids(), vec![1, 2]);
    // lapin may hand the returns over in either order.
    q.returned(2);
    q.returned(1);
    assert_eq!(q.waiting_ids(), vec![1, 2, 3]);
    // The next try finds one token: only 1 goes, and comes back again.
    advance(Duration::from_secs(1)).await;
    q.tick_due();
    assert_eq!(q.dispatched_ids(), vec![1, 2, 1]);
    q.returned(1);
    assert_eq!(q.waiting_ids(), vec![1, 2, 3], "1 stays ahead of 2");
}

#[tokio::test(start_paused = true)]
async fn a_try_the_rate_limit_or_a_disabled_action_holds_back_does_not_spin() {
    let mut q = QueueRig::new(
        no_route_settings(None),
        ActionPolicy {
            rate_limit: Some(RateLimit {
                max: limit(1),
                per: Duration::from_secs(10),
            }),
            ..policy(2)
        },
    );
    q.submit_all([1, 2]);
    q.returned(1);
    // The try is due after 1 s; the next token only after 10 s. tick_due panics if the
    // queue keeps asking for a wake-up that does nothing.
    advance(Duration::from_secs(2)).await;
    q.tick_due();
    assert_eq!(q.dispatched_ids(), vec![1]);
    advance(Duration::from_secs(9)).await;
    q.tick_due();
    assert_eq!(q.dispatched_ids(), vec![1, 1]);
    q.returned(1);
    q.set_enabled(false);
    advance(Duration::from_secs(5)).await;
    q.tick_due();
    assert!(
        q.queue.next_wake().is_none_or(|w| w > q.now()),
        "no wake-up in the past while disabled"
    );
    q.set_enabled(true);
    advance(Duration::from_secs(10)).await;
    q.tick_due();
    assert_eq!(q.dispatched_ids(), vec![1, 1, 1]);
}
