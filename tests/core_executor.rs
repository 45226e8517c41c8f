//! The core through its actors: the `Executor` handle, the live index, timers, and scenarios
//! with simulated workers. Time is paused tokio time; asynchronous effects are awaited with a
//! barrier (an actor call) or a poll with a deadline, never a fixed sleep.

mod common_core;

use std::sync::Arc;
use std::time::Duration;

use common_core::exec::{ExecRig, answers};
use common_core::{Answer, action, limit, lock, policy, sub};
use fifo_executor::core::action::{ActionActor, ActionArgs, ActionMsg};
use fifo_executor::core::memory::{ChannelDispatcher, ChannelSink, NoStats};
use fifo_executor::core::owner::Owner;
use fifo_executor::core::ports::{Event, RemovalReason};
use fifo_executor::core::registry::Shared;
use fifo_executor::core::{
    ActionPolicy, Clock, Ports, PurgeOrder, QueueSettings, RateLimit, Restored,
};
use fifo_executor::model::{
    CancelRequest, CancelVerdict, CompletionVerdict, Rejection, UnmatchedReason, Verdict,
};
use tokio::time::advance;

fn settings(max_queue_length: usize, queue_timeout: Duration) -> QueueSettings {
    QueueSettings {
        max_queue_length,
        queue_timeout,
        emergency_mode: false,
        ..QueueSettings::default()
    }
}

/// Settings whose timeout never fires within a test, even if paused time jumps ahead.
fn no_timeout(max_queue_length: usize) -> QueueSettings {
    settings(max_queue_length, Duration::from_secs(365 * 24 * 3600))
}

fn is_removed(e: &Event, reason: RemovalReason, id: u64) -> bool {
    matches!(e, Event::Removed { reason: r, execution, .. } if *r == reason && execution.execution_id == id)
}

// ---------------------------------------------------------------------------------------------
// Identity: duplicates, unknown ids, cancels

#[tokio::test(start_paused = true)]
async fn a_duplicate_execution_id_submitted_while_live_is_answered_duplicate_and_not_queued_twice()
{
    let mut r = ExecRig::start(no_timeout(100), policy(1)).await;
    let a = action("dup.a");
    let b = action("dup.b");
    r.submit_accepted(&a, &[1, 2]).await;
    // 1 runs, 2 waits: both are live, in this action or any other.
    let again = r.submit(&a, &[2, 1, 3]);
    let elsewhere = r.submit(&b, &[2]);
    let verdicts = answers("duplicate verdicts", &again).await;
    assert_eq!(
        verdicts,
        vec![
            Verdict::Duplicate { execution_id: 2 },
            Verdict::Duplicate { execution_id: 1 },
            Verdict::Queued { execution_id: 3 },
        ]
    );
    assert_eq!(
        answers("other action", &elsewhere).await,
        vec![Verdict::Duplicate { execution_id: 2 }]
    );
    r.barrier(&[&a]).await;
    assert_eq!(r.stats(&a).await.queue_length, 2);
    assert_eq!(r.stats(&a).await.total_enqueued, 3);
    for id in [1, 2, 3] {
        r.until_dispatched(id as usize).await;
        r.complete(&[id]);
    }
    r.barrier(&[&a]).await;
    assert_eq!(r.dispatched_ids(), vec![1, 2, 3], "2 was dispatched once");
    assert!(r.dispatched_ids_of(&b).is_empty());
    assert_eq!(r.stats(&b).await.total_enqueued, 0);
    assert_eq!(r.exec.live_count(), 0);
    r.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_completion_for_an_id_no_action_knows_frees_nothing_and_is_answered_unmatched() {
    let mut r = ExecRig::start(no_timeout(100), policy(1)).await;
    let a = action("unknown.a");
    r.submit_accepted(&a, &[1, 2]).await;
    let got = answers("completion", &r.complete(&[999])).await;
    assert_eq!(
        got,
        vec![CompletionVerdict::Unmatched(UnmatchedReason::Unknown)]
    );
    r.barrier(&[&a]).await;
    assert!(r.events.iter().any(|e| matches!(
        e,
        Event::Unmatched {
            action: None,
            execution_id: 999,
            ..
        }
    )));
    assert_eq!(r.dispatched_ids(), vec![1]);
    r.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_completion_through_the_executor_frees_nothing() {
    let mut r = ExecRig::start(no_timeout(100), policy(1)).await;
    let a = action("dupdone.a");
    r.submit_accepted(&a, &[1, 2, 3]).await;
    // Twice in one batch: both reach the actor, the second frees nothing and is counted there.
    let first = r.complete(&[1, 1]);
    assert_eq!(
        answers("same batch", &first).await,
        vec![
            CompletionVerdict::Freed,
            CompletionVerdict::Unmatched(UnmatchedReason::Unknown)
        ]
    );
    // Once more later: the id has ended, no actor owns it any more.
    let late = r.complete(&[1]);
    assert_eq!(
        answers("later", &late).await,
        vec![CompletionVerdict::Unmatched(UnmatchedReason::Unknown)]
    );
    // And one for an execution still waiting.
    let early = r.complete(&[3]);
    assert_eq!(
        answers("never dispatched", &early).await,
        vec![CompletionVerdict::Unmatched(
            UnmatchedReason::NeverDispatched
        )]
    );
    r.barrier(&[&a]).await;
    assert_eq!(r.dispatched_ids(), vec![1, 2], "exactly one slot was freed");
    let s = r.stats(&a).await;
    assert_eq!((s.active_count, s.queue_length), (1, 1));
    assert_eq!(s.total_completed, 1);
    assert_eq!(
        s.total_unmatched, 2,
        "the later one never reached the action"
    );
    r.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn cancel_answers_canceled_for_waiting_running_for_running_and_unknown_otherwise() {
    let mut r = ExecRig::start(no_timeout(100), policy(1)).await;
    let a = action("cancel.a");
    r.submit_accepted(&a, &[1, 2, 3]).await;
    let got = answers("cancels", &r.cancel(&[2, 1, 42])).await;
    assert_eq!(
        got,
        vec![
            CancelVerdict::Canceled,
            CancelVerdict::Running,
            CancelVerdict::Unknown
        ]
    );
    r.barrier(&[&a]).await;
    assert!(!r.exec.is_live(2));
    assert!(r.exec.is_live(1) && r.exec.is_live(3));
    r.complete(&[1]);
    r.until_dispatched(2).await;
    assert_eq!(r.dispatched_ids(), vec![1, 3]);
    r.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_cancel_that_comes_before_its_request_cancels_it_on_arrival_even_with_a_slot_free() {
    let mut r = ExecRig::start(no_timeout(100), policy(1)).await;
    let a = action("ahead.a");
    // Over the cancels queue, an id no execution has yet is remembered.
    let got = answers("early cancel", &r.cancel_or_remember(&[7])).await;
    assert_eq!(got, vec![CancelVerdict::Remembered]);
    // The slot is free, yet 7 is accepted and at once canceled, never admitted; 8 goes.
    let verdicts = answers("submissions", &r.submit(&a, &[7, 8])).await;
    assert_eq!(
        verdicts,
        vec![
            Verdict::Queued { execution_id: 7 },
            Verdict::Queued { execution_id: 8 }
        ]
    );
    r.until_dispatched(1).await;
    r.barrier(&[&a]).await;
    assert_eq!(r.dispatched_ids(), vec![8]);
    assert!(
        r.events
            .iter()
            .any(|e| is_removed(e, RemovalReason::Canceled, 7))
    );
    assert_eq!(r.stats(&a).await.total_canceled, 1);
    assert!(!r.exec.is_live(7));
    // The mark is used up: a later request with that id is a duplicate of the canceled one.
    let again = answers("resubmission", &r.submit(&a, &[7])).await;
    assert_eq!(again, vec![Verdict::Duplicate { execution_id: 7 }]);
    // An id that already ended is not remembered; nor is one the operators' API cancels.
    r.complete(&[8]);
    r.barrier(&[&a]).await;
    let got = answers("late cancels", &r.cancel_or_remember(&[8])).await;
    assert_eq!(got, vec![CancelVerdict::Unknown]);
    let got = answers("api cancel", &r.cancel(&[9])).await;
    assert_eq!(got, vec![CancelVerdict::Unknown]);
    r.submit_accepted(&a, &[9]).await;
    r.until_dispatched(2).await;
    assert_eq!(r.dispatched_ids(), vec![8, 9]);
    r.shutdown().await;
}

/// An outcome sink as slow as a lagging actor: each record takes 300 ms of the actor's time.
struct SlowSink(Arc<std::sync::atomic::AtomicUsize>);

impl fifo_executor::core::OutcomeSink for SlowSink {
    fn record(&self, events: Vec<Event>) {
        std::thread::sleep(Duration::from_millis(300));
        for mut e in events {
            e.settle();
        }
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// What the intake waits for before it answers a duplicate: the first copy's actor has
/// handled its submission (and recorded its acceptance), however far behind it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_waits_until_the_first_copy_s_actor_has_recorded_it() {
    let recorded = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (dispatcher, _dispatched) = ChannelDispatcher::new();
    let ports = Ports {
        dispatcher: Arc::new(dispatcher),
        sink: Arc::new(SlowSink(recorded.clone())),
        observer: Arc::new(NoStats),
    };
    let exec = fifo_executor::core::Executor::start(
        no_timeout(100),
        ports,
        Arc::new(fifo_executor::core::UniformPolicy(policy(1))),
    )
    .await
    .expect("the executor starts");
    let a = action("dup.slow");
    exec.submit(&a, vec![sub(1)]);
    let (receipt, duplicate) = Answer::new();
    let mut again = sub(1);
    again.receipt = Some(receipt);
    exec.submit(&a, vec![again]);
    assert_eq!(
        duplicate.get(),
        Some(Verdict::Duplicate { execution_id: 1 })
    );
    exec.handled_so_far(1).await;
    assert!(
        recorded.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the first copy's acceptance is recorded"
    );
    exec.shutdown(Duration::from_secs(5)).await;
}

/// Requests and their cancels racing on two threads, cancels in any order relative to their
/// requests: every one of them is canceled, whichever side got there first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_racing_their_requests_cancel_every_one() {
    const N: u64 = 2_000;
    let mut r = ExecRig::start(no_timeout(10_000), policy(1)).await;
    let a = action("ahead.race");
    // 0 holds the only slot, so everything else would wait.
    r.submit_accepted(&a, &[0]).await;
    let exec = r.exec.clone();
    let submitter = {
        let a = a.clone();
        let exec = exec.clone();
        tokio::spawn(async move {
            for chunk in (1..=N).collect::<Vec<_>>().chunks(50) {
                exec.submit(&a, chunk.iter().map(|&id| sub(id)).collect());
                tokio::task::yield_now().await;
            }
        })
    };
    let mut verdicts = Vec::new();
    for chunk in (1..=N).rev().collect::<Vec<_>>().chunks(50) {
        verdicts.extend(r.cancel_or_remember(chunk));
        tokio::task::yield_now().await;
    }
    submitter.await.expect("submitted");
    for v in answers("cancels", &verdicts).await {
        assert!(
            matches!(v, CancelVerdict::Canceled | CancelVerdict::Remembered),
            "{v:?}"
        );
    }
    r.barrier(&[&a]).await;
    let stats = r.stats(&a).await;
    assert_eq!(stats.total_canceled, N, "every execution canceled");
    assert_eq!(stats.queue_length, 0);
    assert_eq!(r.dispatched_ids(), vec![0]);
    r.shutdown().await;
}

/// Drives one action actor directly, without the `Executor`, to put a cancel in its mailbox
/// before the submission it names, as happens when the two come from different tasks.
#[tokio::test(start_paused = true)]
async fn a_cancel_that_overtakes_its_submission_is_still_applied() {
    let (dispatcher, mut dispatch_rx) = ChannelDispatcher::new();
    let (sink, mut event_rx) = ChannelSink::new();
    let shared = Arc::new(Shared::new(
        Clock::new(),
        no_timeout(100),
        Ports {
            dispatcher: Arc::new(dispatcher),
            sink: Arc::new(sink),
            observer: Arc::new(NoStats),
        },
    ));
    let (actor, handle) = ractor::Actor::spawn(
        None,
        ActionActor,
        ActionArgs {
            action: action("overtake.a"),
            policy: policy(1),
            shared: shared.clone(),
            dormant: None,
        },
    )
    .await
    .expect("the actor starts");
    // What Executor::submit does first: claim the ids for this actor. 1 will take the slot, so
    // 2 would wait.
    let owner = Arc::new(Owner::new(actor.clone()));
    for id in [1, 2] {
        shared.live.insert(id, owner.clone());
    }
    // Two cancels for 2 (one remembered ahead, one redelivered, say): both are answered.
    let (receipt, canceled) = Answer::new();
    let (receipt_too, canceled_too) = Answer::new();
    actor
        .cast(ActionMsg::Cancel(vec![
            CancelRequest {
                execution_id: 2,
                receipt: Some(receipt),
            },
            CancelRequest {
                execution_id: 2,
                receipt: Some(receipt_too),
            },
        ]))
        .expect("cast");
    assert!(
        canceled.get().is_none(),
        "held until the submission arrives"
    );
    actor
        .cast(ActionMsg::Submit(vec![sub(1), sub(2)]))
        .expect("cast");
    let stats = actor
        .call(ActionMsg::Stats, Some(Duration::from_secs(5)))
        .await
        .expect("call")
        .expect("answered");
    assert_eq!(canceled.get(), Some(CancelVerdict::Canceled));
    assert_eq!(canceled_too.get(), Some(CancelVerdict::Canceled));
    assert_eq!((stats.active_count, stats.queue_length), (1, 0));
    assert_eq!(stats.total_canceled, 1);
    let mut events = Vec::new();
    while let Ok(e) = event_rx.try_recv() {
        events.push(e);
    }
    assert!(
        events
            .iter()
            .any(|e| is_removed(e, RemovalReason::Canceled, 2))
    );
    let dispatched: Vec<_> = std::iter::from_fn(|| dispatch_rx.try_recv().ok())
        .flatten()
        .map(|d| d.execution_id)
        .collect();
    assert_eq!(dispatched, vec![1]);
    assert!(!shared.live.contains_key(&2), "the canceled id is released");
    actor.stop(None);
    handle.await.expect("the actor stops");
}

#[tokio::test(start_paused = true)]
async fn a_cancel_waiting_for_a_submission_that_never_comes_is_answered_unknown_at_stop() {
    let (dispatcher, _dispatch_rx) = ChannelDispatcher::new();
    let (sink, _event_rx) = ChannelSink::new();
    let shared = Arc::new(Shared::new(
        Clock::new(),
        no_timeout(100),
        Ports {
            dispatcher: Arc::new(dispatcher),
            sink: Arc::new(sink),
            observer: Arc::new(NoStats),
        },
    ));
    let (actor, handle) = ractor::Actor::spawn(
        None,
        ActionActor,
        ActionArgs {
            action: action("overtake.b"),
            policy: policy(1),
            shared: shared.clone(),
            dormant: None,
        },
    )
    .await
    .expect("the actor starts");
    shared.live.insert(7, Arc::new(Owner::new(actor.clone())));
    let (receipt, answer) = Answer::new();
    actor
        .cast(ActionMsg::Cancel(vec![CancelRequest {
            execution_id: 7,
            receipt: Some(receipt),
        }]))
        .expect("cast");
    // Drain rather than stop: a stop would overtake the cancel still in the mailbox.
    actor.drain().expect("drain");
    handle.await.expect("the actor stops");
    assert_eq!(answer.get(), Some(CancelVerdict::Unknown));
}

// ---------------------------------------------------------------------------------------------
// Independence of actions

#[tokio::test(start_paused = true)]
async fn a_full_a_disabled_or_a_slow_action_never_delays_another() {
    let mut r = ExecRig::start(no_timeout(5), policy(1)).await;
    let full = action("indep.full");
    let disabled = action("indep.disabled");
    let slow = action("indep.slow");
    let free = action("indep.free");
    // full: one running that never completes and a full queue; more are rejected.
    r.submit_accepted(&full, &[1, 2, 3, 4, 5, 6]).await;
    let rejected = answers("full", &r.submit(&full, &[7])).await;
    assert!(matches!(
        rejected[0],
        Verdict::Rejected {
            rejection: Rejection::QueueFull { max: 5 },
            ..
        }
    ));
    // disabled: rejects everything.
    r.exec
        .set_policy(
            &disabled,
            ActionPolicy {
                enabled: false,
                ..policy(1)
            },
        )
        .expect("policy set");
    let off = answers("disabled", &r.submit(&disabled, &[20])).await;
    assert!(matches!(
        off[0],
        Verdict::Rejected {
            rejection: Rejection::ActionDisabled,
            ..
        }
    ));
    // slow: its worker never answers, so everything behind it waits.
    r.submit_accepted(&slow, &[30, 31, 32]).await;
    // The free action goes through a full cycle regardless.
    r.submit_accepted(&free, &[40, 41, 42]).await;
    for (n, id) in [40, 41, 42].into_iter().enumerate() {
        r.until_dispatched(3 + n).await;
        r.complete(&[id]);
    }
    r.barrier(&[&free, &full, &slow]).await;
    assert_eq!(r.dispatched_ids_of(&free), vec![40, 41, 42]);
    assert_eq!(r.stats(&free).await.total_completed, 3);
    assert_eq!(r.dispatched_ids_of(&full), vec![1]);
    assert_eq!(r.dispatched_ids_of(&slow), vec![30]);
    assert!(r.dispatched_ids_of(&disabled).is_empty());
    r.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Timers

#[tokio::test(start_paused = true)]
async fn the_actor_s_timer_times_out_executions_that_waited_too_long() {
    let mut r = ExecRig::start(settings(100, Duration::from_secs(10)), policy(1)).await;
    let a = action("timer.a");
    r.submit_accepted(&a, &[1, 2, 3]).await;
    advance(Duration::from_secs(6)).await;
    r.submit_accepted(&a, &[4]).await;
    advance(Duration::from_secs(4) + Duration::from_millis(2)).await;
    r.until_event("2 and 3 timed out", |e| {
        is_removed(e, RemovalReason::TimedOut, 3)
    })
    .await;
    r.barrier(&[&a]).await;
    let s = r.stats(&a).await;
    assert_eq!(s.total_timed_out, 2);
    assert_eq!(s.queue_length, 1);
    assert!(!r.exec.is_live(2) && !r.exec.is_live(3) && r.exec.is_live(4));
    advance(Duration::from_secs(6)).await;
    r.until_event("4 timed out", |e| is_removed(e, RemovalReason::TimedOut, 4))
        .await;
    r.complete(&[1]);
    r.barrier(&[&a]).await;
    assert_eq!(r.dispatched_ids(), vec![1], "nothing left to admit");
    r.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn the_actor_s_timer_releases_rate_limited_executions_one_period_apart() {
    let mut p = policy(10);
    p.rate_limit = Some(RateLimit {
        max: limit(3),
        per: Duration::from_secs(1),
    });
    let mut r = ExecRig::start(no_timeout(100), p).await;
    let a = action("rate.a");
    r.submit_accepted(&a, &[1, 2, 3, 4, 5, 6]).await;
    r.barrier(&[&a]).await;
    assert_eq!(r.dispatched_ids(), vec![1, 2, 3]);
    advance(Duration::from_millis(300)).await;
    r.barrier(&[&a]).await;
    assert_eq!(r.dispatched.len(), 3, "not before a third of a second");
    advance(Duration::from_millis(34)).await;
    r.until_dispatched(4).await;
    advance(Duration::from_millis(333)).await;
    r.until_dispatched(5).await;
    advance(Duration::from_millis(334)).await;
    r.until_dispatched(6).await;
    assert_eq!(r.dispatched_ids(), (1..=6).collect::<Vec<_>>());
    r.shutdown().await;
}

/// Submits `n` executions under a rate limit and returns when each was dispatched, in
/// microseconds of paused time. The test awaits the dispatches, so paused time advances on its
/// own to exactly the wake-ups the actor asks for.
fn dispatch_times_under(rate: RateLimit, n: u64) -> Vec<u128> {
    common_core::run_paused_within_deadline("rate-limited dispatches", async move {
        let mut p = policy(10);
        p.rate_limit = Some(rate);
        let mut r = ExecRig::start(no_timeout(100), p).await;
        let a = action("rate.auto");
        let start = r.exec.clock().now();
        r.exec.submit(&a, (1..=n).map(sub).collect());
        let mut times = Vec::new();
        let mut ids = Vec::new();
        while (ids.len() as u64) < n {
            let batch = r.dispatch_rx.recv().await.expect("dispatches keep coming");
            for d in batch {
                ids.push(d.execution_id);
                times.push(r.exec.clock().now().since(start).as_micros());
            }
        }
        assert_eq!(ids, (1..=n).collect::<Vec<_>>());
        r.shutdown().await;
        times
    })
}

#[test]
fn rate_limited_executions_leave_one_period_apart_when_time_advances_on_its_own() {
    let times = dispatch_times_under(
        RateLimit {
            max: limit(3),
            per: Duration::from_secs(1),
        },
        7,
    );
    // A burst of three, then one every third of a second; tokio's timers round up to the next
    // millisecond.
    assert_eq!(times, vec![0, 0, 0, 334_000, 667_000, 1_000_000, 1_334_000]);
}

/// A period just over a whole millisecond: the actor used to set its timer to the token's
/// time rounded down to the microsecond, which the millisecond timer then hit exactly, 500 ns
/// too early. It found no token and asked for a wake-up "now", forever, and paused time never
/// moved again.
#[test]
fn the_rate_timer_never_wakes_the_actor_before_the_token_is_there() {
    let times = dispatch_times_under(
        RateLimit {
            max: limit(1),
            per: Duration::from_nanos(2_000_000_500),
        },
        3,
    );
    assert_eq!(times.len(), 3);
    assert_eq!(times[0], 0);
    assert!(
        times[1] >= 2_000_001 && times[2] >= times[1] + 2_000_001,
        "{times:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Policy changes

#[tokio::test(start_paused = true)]
async fn disabling_rejects_with_action_disabled_and_re_enabling_resumes_in_order() {
    let mut r = ExecRig::start(no_timeout(100), policy(1)).await;
    let a = action("toggle.a");
    r.submit_accepted(&a, &[1, 2, 3]).await;
    r.exec
        .set_policy(
            &a,
            ActionPolicy {
                enabled: false,
                ..policy(1)
            },
        )
        .expect("disable");
    let got = answers("while disabled", &r.submit(&a, &[4])).await;
    assert_eq!(
        got,
        vec![Verdict::Rejected {
            execution_id: 4,
            rejection: Rejection::ActionDisabled
        }]
    );
    r.complete(&[1]);
    r.barrier(&[&a]).await;
    assert_eq!(
        r.dispatched_ids(),
        vec![1],
        "nothing dispatched while disabled"
    );
    assert!(!r.stats(&a).await.enabled);
    assert!(!r.exec.policy(&a).enabled);
    r.exec.set_policy(&a, policy(2)).expect("enable");
    r.until_dispatched(3).await;
    assert_eq!(r.dispatched_ids(), vec![1, 2, 3]);
    r.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn raising_the_limit_through_the_executor_admits_at_once() {
    let mut r = ExecRig::start(no_timeout(100), policy(1)).await;
    let a = action("raise.a");
    r.submit_accepted(&a, &[1, 2, 3, 4]).await;
    r.exec.set_policy(&a, policy(3)).expect("raise");
    r.until_dispatched(3).await;
    r.barrier(&[&a]).await;
    assert_eq!(r.dispatched_ids(), vec![1, 2, 3]);
    assert_eq!(r.watch.peak_active(&a), 3);
    r.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Settings and policies replaced while running (a configuration reload)

#[tokio::test(start_paused = true)]
async fn new_settings_reach_running_actors_and_actors_started_later() {
    let r = ExecRig::start(no_timeout(2), policy(1)).await;
    let a = action("settings.a");
    r.submit_accepted(&a, &[1, 2, 3]).await;
    let full = answers("queue full", &r.submit(&a, &[4])).await;
    assert_eq!(
        full,
        vec![Verdict::Rejected {
            execution_id: 4,
            rejection: Rejection::QueueFull { max: 2 }
        }]
    );
    r.exec.set_settings(QueueSettings {
        remember_ended: 7,
        ..no_timeout(3)
    });
    assert_eq!(r.exec.settings().max_queue_length, 3);
    assert_eq!(
        r.exec.settings().remember_ended,
        QueueSettings::default().remember_ended,
        "the window of ended ids keeps its size"
    );
    let room = answers("one more place", &r.submit(&a, &[5])).await;
    assert_eq!(room, vec![Verdict::Queued { execution_id: 5 }]);
    // An action first seen after the change starts with the new settings.
    let b = action("settings.b");
    r.submit_accepted(&b, &[10, 11, 12, 13]).await;
    let full = answers("b full at 3", &r.submit(&b, &[14])).await;
    assert_eq!(
        full,
        vec![Verdict::Rejected {
            execution_id: 14,
            rejection: Rejection::QueueFull { max: 3 }
        }]
    );
    r.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_shorter_queue_timeout_times_out_what_already_waited_longer() {
    let mut r = ExecRig::start(no_timeout(100), policy(1)).await;
    let a = action("settings.timeout");
    r.submit_accepted(&a, &[1, 2, 3]).await;
    advance(Duration::from_secs(60)).await;
    r.exec.set_settings(settings(100, Duration::from_secs(30)));
    r.until_event("2 timed out", |e| is_removed(e, RemovalReason::TimedOut, 2))
        .await;
    r.until_event("3 timed out", |e| is_removed(e, RemovalReason::TimedOut, 3))
        .await;
    r.barrier(&[&a]).await;
    assert_eq!(r.stats(&a).await.queue_length, 0);
    assert_eq!(r.dispatched_ids(), vec![1], "the running one is left alone");
    r.shutdown().await;
}

/// A policy source whose answer a test changes, as a reload changes the configured policies.
struct Switchable(std::sync::Mutex<ActionPolicy>);

impl fifo_executor::core::PolicySource for Switchable {
    fn policy_for(&self, _action: &fifo_executor::model::ActionRef) -> ActionPolicy {
        *lock(&self.0)
    }
}

#[tokio::test(start_paused = true)]
async fn following_the_policy_source_keeps_or_replaces_what_was_set_at_run_time() {
    let source = Arc::new(Switchable(std::sync::Mutex::new(policy(1))));
    let (dispatcher, mut dispatch_rx) = ChannelDispatcher::new();
    let (sink, _events) = ChannelSink::new();
    let exec = fifo_executor::core::Executor::start(
        no_timeout(100),
        Ports {
            dispatcher: Arc::new(dispatcher),
            sink: Arc::new(sink),
            observer: Arc::new(NoStats),
        },
        source.clone(),
    )
    .await
    .expect("starts");
    let (a, b) = (action("follow.a"), action("follow.b"));
    exec.set_policy(&b, policy(2)).expect("set at run time");
    for (action, ids) in [(&a, [1, 2, 3, 4, 5]), (&b, [11, 12, 13, 14, 15])] {
        exec.submit(action, common_core::subs(ids));
    }
    *lock(&source.0) = policy(3);
    exec.follow_policy_source(true);
    let mut dispatched = Vec::new();
    common_core::poll_until("a at 3, b still at 2", || {
        while let Ok(batch) = dispatch_rx.try_recv() {
            dispatched.extend(batch.into_iter().map(|d| d.execution_id));
        }
        dispatched.len() >= 5
    })
    .await;
    exec.stats(&a).await.expect("a answers");
    exec.stats(&b).await.expect("b answers");
    while let Ok(batch) = dispatch_rx.try_recv() {
        dispatched.extend(batch.into_iter().map(|d| d.execution_id));
    }
    dispatched.sort_unstable();
    assert_eq!(dispatched, vec![1, 2, 3, 11, 12]);
    assert_eq!(exec.policy(&b), policy(2), "kept");
    // A source that holds what was set at run time (the action table) replaces it too.
    exec.follow_policy_source(false);
    assert_eq!(exec.policy(&b), policy(3));
    exec.stats(&b).await.expect("b answers");
    while let Ok(batch) = dispatch_rx.try_recv() {
        dispatched.extend(batch.into_iter().map(|d| d.execution_id));
    }
    assert!(dispatched.contains(&13), "{dispatched:?}");
    exec.shutdown(Duration::from_secs(5)).await;
}

// ---------------------------------------------------------------------------------------------
// Purge and restore

#[tokio::test(start_paused = true)]
async fn a_purge_through_the_executor_reports_in_a_dry_run_and_reclaims_in_a_live_one() {
    let mut r = ExecRig::start(no_timeout(100), policy(1)).await;
    let a = action("purge.a");
    let b = action("purge.b");
    r.submit_accepted(&a, &[1, 2]).await;
    r.submit_accepted(&b, &[10, 11]).await;
    advance(Duration::from_secs(100)).await;
    r.submit_accepted(&b, &[12]).await;
    let order = PurgeOrder {
        max_queued_age: Some(Duration::from_secs(50)),
        max_running_age: Some(Duration::from_secs(50)),
        dry_run: true,
    };
    let dry = r.exec.purge(order).await;
    let seen: Vec<_> = dry
        .iter()
        .map(|e| (e.action_ref.as_str().to_owned(), e.execution_id, e.state))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("purge.a".to_owned(), 1, "running"),
            ("purge.a".to_owned(), 2, "queued"),
            ("purge.b".to_owned(), 10, "running"),
            ("purge.b".to_owned(), 11, "queued"),
        ]
    );
    r.barrier(&[&a, &b]).await;
    assert_eq!(r.dispatched_ids(), vec![1, 10], "a dry run changes nothing");
    assert_eq!(r.stats(&b).await.queue_length, 2);

    let live = r
        .exec
        .purge(
            PurgeOrder {
                max_queued_age: None,
                ..order
            }
            .with_live_run(),
        )
        .await;
    assert_eq!(live.len(), 2);
    r.barrier(&[&a, &b]).await;
    assert_eq!(
        r.dispatched_ids_of(&a),
        vec![1, 2],
        "the next one took the slot"
    );
    assert_eq!(r.dispatched_ids_of(&b), vec![10, 11]);
    assert!(!r.exec.is_live(1));
    let late = answers("late completion", &r.complete(&[1])).await;
    assert_eq!(
        late,
        vec![CompletionVerdict::Unmatched(UnmatchedReason::Unknown)]
    );
    r.barrier(&[&a]).await;
    let s = r.stats(&a).await;
    assert_eq!(
        (s.total_reclaimed, s.active_count, s.total_completed),
        (1, 1, 0)
    );
    r.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn count_stuck_counts_per_action_only_running_executions_older_than_the_age_and_changes_nothing()
 {
    let mut r = ExecRig::start(no_timeout(100), policy(2)).await;
    let a = action("stuck.a");
    let b = action("stuck.b");
    let c = action("stuck.c");
    // a: two running, one waiting; b: one running; all admitted now.
    r.submit_accepted(&a, &[1, 2, 3]).await;
    r.submit_accepted(&b, &[10]).await;
    advance(Duration::from_secs(100)).await;
    // c's execution is admitted 100 s later: younger than the age asked about below.
    r.submit_accepted(&c, &[20]).await;
    assert_eq!(
        r.exec.count_stuck(Duration::from_secs(100)).await,
        vec![],
        "exactly the age is not older than it"
    );
    let stuck = r.exec.count_stuck(Duration::from_secs(50)).await;
    assert_eq!(stuck, vec![(a.clone(), 2), (b.clone(), 1)]);
    r.barrier(&[&a, &b, &c]).await;
    let s = r.stats(&a).await;
    assert_eq!(
        (s.active_count, s.queue_length, s.total_reclaimed),
        (2, 1, 0),
        "counting reclaims nothing and dequeues nothing"
    );
    assert!(
        !r.events
            .iter()
            .any(|e| matches!(e, Event::Reclaimed { .. } | Event::Removed { .. })),
        "counting records no event"
    );
    r.shutdown().await;
}

trait LiveRun {
    fn with_live_run(self) -> Self;
}

impl LiveRun for PurgeOrder {
    fn with_live_run(self) -> Self {
        PurgeOrder {
            dry_run: false,
            ..self
        }
    }
}

#[tokio::test(start_paused = true)]
async fn restored_executions_are_live_and_come_out_in_order() {
    let mut r = ExecRig::start(no_timeout(100), policy(1)).await;
    let a = action("restore.a");
    let now = r.exec.clock().now();
    let entry = |id: u64, running: bool| Restored {
        execution_id: id,
        request_id: None,
        payload: common_core::payload_of(id),
        enqueued_at: now.minus(Duration::from_secs(60)),
        admitted_at: running.then(|| now.minus(Duration::from_secs(30))),
        sent_before: 0,
        resend: false,
    };
    r.exec
        .restore(&a, vec![entry(5, true), entry(6, false), entry(7, false)])
        .expect("restore");
    let dup = answers("duplicate of a restored id", &r.submit(&a, &[6])).await;
    assert_eq!(dup, vec![Verdict::Duplicate { execution_id: 6 }]);
    r.submit_accepted(&a, &[8]).await;
    r.barrier(&[&a]).await;
    assert!(
        r.dispatched.is_empty(),
        "the restored running one holds the slot"
    );
    for (n, id) in [5, 6, 7].into_iter().enumerate() {
        r.complete(&[id]);
        r.until_dispatched(n + 1).await;
    }
    assert_eq!(r.dispatched_ids(), vec![6, 7, 8]);
    assert!(
        r.exec.next_execution_id() > 8,
        "assigned ids stay above restored ones"
    );
    r.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Lifecycle

#[tokio::test(start_paused = true)]
async fn after_shutdown_submissions_are_rejected_as_shutting_down() {
    let r = ExecRig::start(no_timeout(100), policy(1)).await;
    let a = action("stop.a");
    r.submit_accepted(&a, &[1]).await;
    r.exec.shutdown(Duration::from_secs(5)).await;
    let got = answers("after shutdown", &r.submit(&a, &[2])).await;
    assert_eq!(
        got,
        vec![Verdict::Rejected {
            execution_id: 2,
            rejection: Rejection::ShuttingDown
        }]
    );
    assert_eq!(Rejection::ShuttingDown.error_class(), "ShuttingDown");
}

#[tokio::test(start_paused = true)]
async fn stats_of_an_action_never_seen_are_none() {
    let r = ExecRig::start(no_timeout(100), policy(1)).await;
    assert!(
        r.exec
            .stats(&action("never.seen"))
            .await
            .expect("ok")
            .is_none()
    );
    assert!(r.exec.actions().is_empty());
    r.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Scenarios

/// Fails the scenario instead of hanging if it gets stuck. With paused time this deadline
/// passes only when every task is idle, i.e. when nothing can make progress any more.
async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(24 * 3600), fut)
        .await
        .unwrap_or_else(|_| panic!("stuck: {what}"))
}

#[tokio::test(start_paused = true)]
async fn ten_thousand_executions_at_limit_ten_go_through_one_action_in_order() {
    let mut r = ExecRig::start(no_timeout(10_000), policy(10)).await;
    let a = action("scenario.tenk");
    let n: u64 = 10_000;
    r.exec.submit(&a, (1..=n).map(sub).collect());
    let mut rx = std::mem::replace(&mut r.dispatch_rx, tokio::sync::mpsc::unbounded_channel().1);
    let order = within("10,000 executions", async {
        let mut order = Vec::<u64>::with_capacity(n as usize);
        let mut completed = 0usize;
        while order.len() < n as usize {
            let batch = rx.recv().await.expect("dispatches keep coming");
            let ids: Vec<_> = batch.iter().map(|d| d.execution_id).collect();
            order.extend(&ids);
            assert!(
                order.len() - completed <= 10,
                "more than 10 handed out and not yet completed"
            );
            completed += ids.len();
            r.complete(&ids);
        }
        order
    })
    .await;
    assert_eq!(order, (1..=n).collect::<Vec<_>>());
    r.barrier(&[&a]).await;
    let s = r.stats(&a).await;
    assert_eq!(s.total_completed, n);
    assert_eq!((s.queue_length, s.active_count), (0, 0));
    assert_eq!(r.watch.peak_active(&a), 10);
    assert_eq!(r.exec.live_count(), 0);
    r.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn three_actions_of_fifty_at_limit_one_released_round_robin_each_keep_their_order() {
    let mut r = ExecRig::start(no_timeout(100), policy(1)).await;
    let actions = [action("rr.a"), action("rr.b"), action("rr.c")];
    for (k, a) in actions.iter().enumerate() {
        let base = 1000 * (k as u64 + 1);
        r.exec.submit(a, (base + 1..=base + 50).map(sub).collect());
    }
    r.until_dispatched(3).await;
    for round in 0..50u64 {
        for (k, a) in actions.iter().enumerate() {
            let expected = 1000 * (k as u64 + 1) + round + 1;
            let running: Vec<_> = r
                .dispatched_ids_of(a)
                .into_iter()
                .filter(|id| r.exec.is_live(*id))
                .collect();
            assert_eq!(running, vec![expected], "exactly one running for {a}");
            r.complete(&[expected]);
        }
        let want = 3 * (round as usize + 2).min(51);
        r.until_dispatched(want.min(150)).await;
        r.barrier(&[&actions[0], &actions[1], &actions[2]]).await;
    }
    for (k, a) in actions.iter().enumerate() {
        let base = 1000 * (k as u64 + 1);
        assert_eq!(
            r.dispatched_ids_of(a),
            (base + 1..=base + 50).collect::<Vec<_>>()
        );
        assert_eq!(r.watch.peak_active(a), 1);
        assert_eq!(r.stats(a).await.total_completed, 50);
    }
    // Released round-robin, the actions took turns: every window of three is one of each.
    for w in r.dispatched.chunks(3) {
        let mut names: Vec<_> = w.iter().map(|d| d.action.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, vec!["rr.a", "rr.b", "rr.c"]);
    }
    r.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn thirty_executions_at_limit_three_are_each_admitted_once_in_order_by_workers_of_different_speeds()
 {
    let mut r = ExecRig::start(no_timeout(100), policy(3)).await;
    let a = action("workers.a");
    let exec = r.exec.clone();
    exec.submit(&a, (1..=30).map(sub).collect());

    // Dispatches go onto one shared work list; three workers take from it at their own pace.
    let (work_tx, work_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let work_rx = Arc::new(tokio::sync::Mutex::new(work_rx));
    let admitted = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut dispatch_rx =
        std::mem::replace(&mut r.dispatch_rx, tokio::sync::mpsc::unbounded_channel().1);
    let feeder = {
        let admitted = admitted.clone();
        tokio::spawn(async move {
            while let Some(batch) = dispatch_rx.recv().await {
                for d in batch {
                    lock(&admitted).push(d.execution_id);
                    if work_tx.send(d.execution_id).is_err() {
                        return;
                    }
                }
            }
        })
    };
    // Completions are reported on a channel that the test awaits: awaiting (rather than
    // polling) lets paused time advance to the workers' next wake-up.
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, u64)>();
    let mut workers = Vec::new();
    for (w, pace_ms) in [(0usize, 7u64), (1, 23), (2, 61)] {
        let (work_rx, exec, done_tx) = (work_rx.clone(), exec.clone(), done_tx.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let next = work_rx.lock().await.recv().await;
                let Some(id) = next else { return };
                // Simulated work: a timer on paused time, not a wait for an effect.
                tokio::time::sleep(Duration::from_millis(pace_ms)).await;
                exec.complete(vec![fifo_executor::model::Completion::new(
                    id,
                    fifo_executor::model::EndStatus::Succeeded,
                )]);
                if done_tx.send((w, id)).is_err() {
                    return;
                }
            }
        }));
    }
    let done = within("30 executions by three workers", async {
        let mut done = Vec::new();
        while done.len() < 30 {
            done.push(done_rx.recv().await.expect("workers keep reporting"));
        }
        done
    })
    .await;
    feeder.abort();
    for w in workers {
        w.abort();
    }
    assert_eq!(*lock(&admitted), (1..=30).collect::<Vec<_>>());
    let mut finished: Vec<u64> = done.iter().map(|(_, id)| *id).collect();
    finished.sort_unstable();
    assert_eq!(
        finished,
        (1..=30).collect::<Vec<_>>(),
        "each completed once"
    );
    for w in 0..3 {
        assert!(
            done.iter().any(|(who, _)| *who == w),
            "worker {w} did some of the work"
        );
    }
    let s = exec.stats(&a).await.expect("answers").expect("known");
    assert_eq!(s.total_completed, 30);
    assert_eq!(r.watch.peak_active(&a), 3);
    drop(exec);
    r.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn cancels_at_queue_positions_two_five_and_eight_of_ten_leave_the_rest_in_order() {
    let mut r = ExecRig::start(no_timeout(100), policy(1)).await;
    let a = action("scenario.cancel");
    r.submit_accepted(&a, &[100]).await;
    let waiting: Vec<u64> = (1..=10).collect();
    r.submit_accepted(&a, &waiting).await;
    let at_positions: Vec<u64> = [2, 5, 8].iter().map(|p| waiting[p - 1]).collect();
    let got = answers("cancels", &r.cancel(&at_positions)).await;
    assert_eq!(got, vec![CancelVerdict::Canceled; 3]);
    r.barrier(&[&a]).await;
    assert_eq!(r.stats(&a).await.queue_length, 7);
    let mut expected = vec![100];
    expected.extend(waiting.iter().filter(|id| !at_positions.contains(id)));
    for n in 1..expected.len() {
        r.complete(&[expected[n - 1]]);
        r.until_dispatched(n + 1).await;
    }
    r.complete(&[*expected.last().expect("non-empty")]);
    r.barrier(&[&a]).await;
    assert_eq!(r.dispatched_ids(), expected);
    let s = r.stats(&a).await;
    assert_eq!((s.total_canceled, s.total_completed), (3, 8));
    r.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_queue_full_at_ten_rejects_the_next_and_changes_nothing() {
    let mut r = ExecRig::start(no_timeout(10), policy(1)).await;
    let a = action("scenario.full");
    r.submit_accepted(&a, &(1..=11).collect::<Vec<_>>()).await;
    r.barrier(&[&a]).await;
    let before = r.stats(&a).await;
    assert_eq!((before.active_count, before.queue_length), (1, 10));
    let got = answers("one too many", &r.submit(&a, &[12])).await;
    let Verdict::Rejected {
        execution_id: 12,
        rejection,
    } = &got[0]
    else {
        panic!("expected a rejection, got {got:?}");
    };
    assert_eq!(rejection.to_string(), "Queue full (max length: 10)");
    r.barrier(&[&a]).await;
    let after = r.stats(&a).await;
    assert_eq!(after.queue_length, before.queue_length);
    assert_eq!(after.active_count, before.active_count);
    assert_eq!(after.total_enqueued, before.total_enqueued);
    assert_eq!(after.total_rejected, before.total_rejected + 1);
    assert!(!r.exec.is_live(12));
    for id in 1..=11u64 {
        r.complete(&[id]);
        r.barrier(&[&a]).await;
    }
    assert_eq!(r.dispatched_ids(), (1..=11).collect::<Vec<_>>());
    r.shutdown().await;
}
