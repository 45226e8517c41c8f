//! Property tests: random interleavings of submissions, completions (also duplicate, early and
//! unknown ones), cancels, time passing (timeouts) and limit changes over several actions,
//! checked by replaying the event log through an oracle (see `common_core::oracle` for the
//! rules it enforces event by event).
//!
//! Two levels: directly on `ActionQueue` (many cases, fast) and through the `Executor`'s
//! actors with paused tokio time (fewer cases). Neither uses rate limits or disabled actions:
//! with those, "nothing waits while a slot is free" would not hold, and the unit tests cover
//! them.
//!
//! The limit rule checked: every admission happens while the action's running count is below
//! its limit at that moment. So the running count never exceeds the limit, except right after
//! the limit was lowered below it; from then on nothing is admitted, and it only decreases,
//! until it is below the new limit.

mod common_core;

use std::time::Duration;

use common_core::exec::ExecRig;
use common_core::oracle::{End, Life, Oracle};
use common_core::rig::QueueRig;
use common_core::{Answer, payload_of, policy};
use fifo_executor::core::{Clock, QueueSettings};
use fifo_executor::model::{
    ActionRef, CancelVerdict, CompletionVerdict, ExecutionId, Submission, Verdict,
};
use proptest::prelude::*;
use proptest::sample::Index;

const ACTIONS: usize = 3;

#[derive(Debug, Clone)]
enum Target {
    Waiting,
    Running,
    Unknown,
}

#[derive(Debug, Clone)]
enum Op {
    /// `n` fresh executions in one batch.
    Submit {
        action: usize,
        n: usize,
    },
    /// A running execution's completion.
    Complete {
        action: usize,
        pick: Index,
    },
    /// A second completion for one that already completed.
    CompleteAgain {
        pick: Index,
    },
    /// A completion for one that is still waiting.
    CompleteWaiting {
        action: usize,
        pick: Index,
    },
    /// A completion for an id nobody ever submitted.
    CompleteUnknown {
        action: usize,
    },
    Cancel {
        action: usize,
        pick: Index,
        target: Target,
    },
    /// Time passes; timers that fall due fire.
    Advance {
        micros: u64,
    },
    SetLimit {
        action: usize,
        limit: u32,
    },
    /// A live id submitted again (only the executor, which owns the live index, can see this).
    Resubmit {
        action: usize,
        pick: Index,
    },
    /// The broker returns a running execution's dispatch: no worker queue is bound.
    Return {
        action: usize,
        pick: Index,
    },
    /// A dispatch of the action was delivered.
    Routed {
        action: usize,
    },
}

#[derive(Debug, Clone)]
struct Case {
    settings: QueueSettings,
    limits: [u32; ACTIONS],
    ops: Vec<Op>,
}

fn op() -> impl Strategy<Value = Op> {
    let action = 0..ACTIONS;
    let target = prop_oneof![
        Just(Target::Waiting),
        Just(Target::Running),
        Just(Target::Unknown)
    ];
    prop_oneof![
        5 => (action.clone(), 1usize..=4).prop_map(|(action, n)| Op::Submit { action, n }),
        5 => (action.clone(), any::<Index>()).prop_map(|(action, pick)| Op::Complete { action, pick }),
        1 => any::<Index>().prop_map(|pick| Op::CompleteAgain { pick }),
        1 => (action.clone(), any::<Index>())
            .prop_map(|(action, pick)| Op::CompleteWaiting { action, pick }),
        1 => action.clone().prop_map(|action| Op::CompleteUnknown { action }),
        2 => (action.clone(), any::<Index>(), target)
            .prop_map(|(action, pick, target)| Op::Cancel { action, pick, target }),
        // Around the timeouts on purpose: just under, at and just over whole seconds, and
        // less than the millisecond between a deadline and the timer that acts on it.
        2 => prop::sample::select(vec![
            1u64, 500, 250_000, 999_000, 1_000_000, 1_000_500, 1_001_000, 1_500_000,
            2_999_000, 3_001_000,
        ])
        .prop_map(|micros| Op::Advance { micros }),
        1 => (action.clone(), 1u32..=5).prop_map(|(action, limit)| Op::SetLimit { action, limit }),
        1 => (action.clone(), any::<Index>()).prop_map(|(action, pick)| Op::Resubmit { action, pick }),
        1 => (action.clone(), any::<Index>()).prop_map(|(action, pick)| Op::Return { action, pick }),
        1 => action.prop_map(|action| Op::Routed { action }),
    ]
}

fn case(max_ops: usize) -> impl Strategy<Value = Case> {
    (
        1usize..=6,
        prop::sample::select(vec![1000u64, 2000, 3000]),
        prop::bool::weighted(0.15),
        [1u32..=3, 1u32..=3, 1u32..=3],
        prop::collection::vec(op(), 1..max_ops),
    )
        .prop_map(
            |(max_queue_length, timeout_ms, emergency_mode, limits, ops)| Case {
                settings: QueueSettings {
                    max_queue_length,
                    queue_timeout: Duration::from_millis(timeout_ms),
                    emergency_mode,
                    ..QueueSettings::default()
                },
                limits,
                ops,
            },
        )
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("a test runtime builds")
}

fn fail(msg: String) -> TestCaseError {
    TestCaseError::fail(msg)
}

fn pick(ids: &[ExecutionId], pick: &Index) -> Option<ExecutionId> {
    (!ids.is_empty()).then(|| *pick.get(ids))
}

/// The id an op targets, chosen among those in the right state; `None` when there are none.
fn target_of(o: &Oracle, action: &ActionRef, target: &Target, p: &Index) -> Option<ExecutionId> {
    match target {
        Target::Waiting => pick(
            &o.ids_where(Some(action), |l| matches!(l, Life::Waiting { .. })),
            p,
        ),
        Target::Running => pick(&o.ids_where(Some(action), |l| l == Life::Running), p),
        Target::Unknown => Some(UNKNOWN_ID),
    }
}

/// An id no case ever submits.
const UNKNOWN_ID: ExecutionId = 9_999_999;

// ---------------------------------------------------------------------------------------------
// Level 1: the state machine

fn run_on_queues(case: Case) -> Result<(), TestCaseError> {
    paused_runtime().block_on(async move {
        let clock = Clock::new();
        let mut rigs: Vec<QueueRig> = (0..ACTIONS)
            .map(|i| {
                QueueRig::with_clock(
                    &format!("prop.q{i}"),
                    clock.clone(),
                    case.settings,
                    policy(case.limits[i]),
                )
            })
            .collect();
        let actions: Vec<ActionRef> = rigs.iter().map(|r| r.action().clone()).collect();
        let mut o = Oracle::new(clock.clone(), case.settings);
        for (a, l) in actions.iter().zip(case.limits) {
            o.set_limit(a, l);
        }
        let mut seen = [0usize; ACTIONS];
        let mut next_id: ExecutionId = 1;
        let rig_of = |o: &Oracle, id: ExecutionId| {
            o.lives
                .get(&id)
                .and_then(|(a, _)| actions.iter().position(|x| x == a))
        };

        for op in case
            .ops
            .iter()
            .chain(std::iter::once(&Op::Advance { micros: 0 }))
        {
            match op {
                Op::Submit { action, n } => {
                    for _ in 0..*n {
                        let id = next_id;
                        next_id += 1;
                        let want = o.expected_verdict(&actions[*action], id, (0, 0));
                        let got = rigs[*action].submit(id);
                        prop_assert_eq!(&got, &want, "submit {} to {}", id, actions[*action]);
                        feed(&mut o, &rigs, &mut seen)?;
                    }
                }
                Op::Complete { action, pick: p } => {
                    if let Some(id) = target_of(&o, &actions[*action], &Target::Running, p) {
                        prop_assert_eq!(rigs[*action].complete(id), CompletionVerdict::Freed);
                    }
                }
                Op::CompleteAgain { pick: p } => {
                    let done = o.ids_where(None, |l| l == Life::Ended(End::Completed));
                    if let Some(id) = pick(&done, p) {
                        let i = rig_of(&o, id).expect("an ended id has an action");
                        let want = o.expected_completion(id);
                        prop_assert_eq!(rigs[i].complete(id), want);
                    }
                }
                Op::CompleteWaiting { action, pick: p } => {
                    if let Some(id) = target_of(&o, &actions[*action], &Target::Waiting, p) {
                        let want = o.expected_completion(id);
                        prop_assert_eq!(rigs[*action].complete(id), want);
                    }
                }
                Op::CompleteUnknown { action } => {
                    let want = o.expected_completion(UNKNOWN_ID);
                    prop_assert_eq!(rigs[*action].complete(UNKNOWN_ID), want);
                }
                Op::Cancel {
                    action,
                    pick: p,
                    target,
                } => {
                    if let Some(id) = target_of(&o, &actions[*action], target, p) {
                        let want = o.expected_cancel(id);
                        prop_assert_eq!(rigs[*action].cancel(id), want, "cancel {}", id);
                    }
                }
                Op::Advance { micros } => {
                    tokio::time::advance(Duration::from_micros(*micros)).await;
                    for r in &mut rigs {
                        r.tick_due();
                    }
                }
                Op::SetLimit { action, limit } => {
                    o.set_limit(&actions[*action], *limit);
                    rigs[*action].set_limit(*limit);
                }
                // The queue trusts its caller to keep ids unique; see the executor level.
                Op::Resubmit { .. } => {}
                Op::Return { action, pick: p } => {
                    if let Some(id) = target_of(&o, &actions[*action], &Target::Running, p) {
                        rigs[*action].returned(id);
                    }
                }
                Op::Routed { action } => rigs[*action].routed(),
            }
            feed(&mut o, &rigs, &mut seen)?;
            check_queues(&o, &rigs)?;
        }

        // Drain: room for everyone (and a route), then every running one completes.
        for (i, r) in rigs.iter_mut().enumerate() {
            o.set_limit(&actions[i], 1000);
            r.set_limit(1000);
            r.routed();
        }
        feed(&mut o, &rigs, &mut seen)?;
        for (i, a) in actions.iter().enumerate() {
            for id in o.ids_where(Some(a), |l| l == Life::Running) {
                prop_assert_eq!(rigs[i].complete(id), CompletionVerdict::Freed);
            }
        }
        feed(&mut o, &rigs, &mut seen)?;
        check_queues(&o, &rigs)?;
        o.all_ended().map_err(fail)?;
        for r in &rigs {
            prop_assert!(r.queue.is_idle());
        }
        Ok(())
    })
}

fn feed(
    o: &mut Oracle,
    rigs: &[QueueRig],
    seen: &mut [usize; ACTIONS],
) -> Result<(), TestCaseError> {
    for (i, r) in rigs.iter().enumerate() {
        for e in &r.log[seen[i]..] {
            o.event(e).map_err(fail)?;
        }
        seen[i] = r.log.len();
    }
    let all: Vec<_> = rigs
        .iter()
        .flat_map(|r| r.dispatched.iter().cloned())
        .collect();
    o.dispatches(&all).map_err(fail)
}

fn check_queues(o: &Oracle, rigs: &[QueueRig]) -> Result<(), TestCaseError> {
    for r in rigs {
        o.agrees_with(&r.queue.stats()).map_err(fail)?;
        let line: Vec<_> = o
            .books
            .get(r.action())
            .map(|b| b.line.iter().copied().collect())
            .unwrap_or_default();
        prop_assert_eq!(r.waiting_ids(), line, "waiting line of {}", r.action());
    }
    // The rigs tick exactly when the queue asks, which is 1 ms after a deadline. An action
    // whose dispatches came back may hold its head back until its next try.
    let held: Vec<_> = rigs
        .iter()
        .filter(|r| r.queue.no_route_since().is_some())
        .map(|r| r.action().clone())
        .collect();
    o.settled(Duration::from_millis(1), &held).map_err(fail)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        ..ProptestConfig::default()
    })]

    #[test]
    fn on_the_queue_state_machine_every_interleaving_keeps_fifo_the_limit_and_the_books(
        case in case(60)
    ) {
        run_on_queues(case)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Level 2: through the executor's actors

fn run_on_executor(case: Case) -> Result<(), TestCaseError> {
    paused_runtime().block_on(async move {
        let mut r = ExecRig::start(case.settings, policy(1)).await;
        let actions: Vec<ActionRef> = (0..ACTIONS)
            .map(|i| common_core::action(&format!("prop.x{i}")))
            .collect();
        let mut o = Oracle::new(r.exec.clock().clone(), case.settings);
        for (a, l) in actions.iter().zip(case.limits) {
            o.set_limit(a, l);
            r.exec.set_policy(a, policy(l)).expect("policy set");
        }
        let all: Vec<&ActionRef> = actions.iter().collect();
        let mut seen = 0usize;
        let mut next_id: ExecutionId = 1;

        for op in case
            .ops
            .iter()
            .chain(std::iter::once(&Op::Advance { micros: 0 }))
        {
            let mut expect_submit: Vec<(Answer<Verdict>, Verdict)> = Vec::new();
            let mut expect_complete: Vec<(Answer<CompletionVerdict>, CompletionVerdict)> =
                Vec::new();
            let mut expect_cancel: Vec<(Answer<CancelVerdict>, CancelVerdict)> = Vec::new();
            match op {
                Op::Submit { action, n } => {
                    let a = &actions[*action];
                    let mut batch = Vec::new();
                    let mut pending = (0, 0);
                    for _ in 0..*n {
                        let id = next_id;
                        next_id += 1;
                        let want = o.expected_verdict(a, id, pending);
                        if matches!(want, Verdict::Queued { .. }) {
                            if o.admits_at_once(a, pending) {
                                pending.1 += 1;
                            } else {
                                pending.0 += 1;
                            }
                        }
                        let (receipt, answer) = Answer::new();
                        let mut s = Submission::new(id, payload_of(id));
                        s.receipt = Some(receipt);
                        batch.push(s);
                        expect_submit.push((answer, want));
                    }
                    r.exec.submit(a, batch);
                }
                Op::Complete { action, pick: p } => {
                    if let Some(id) = target_of(&o, &actions[*action], &Target::Running, p) {
                        let answer = r.complete(&[id]).remove(0);
                        expect_complete.push((answer, CompletionVerdict::Freed));
                    }
                }
                Op::CompleteAgain { pick: p } => {
                    let done = o.ids_where(None, |l| l == Life::Ended(End::Completed));
                    if let Some(id) = pick(&done, p) {
                        let want = o.expected_completion(id);
                        expect_complete.push((r.complete(&[id]).remove(0), want));
                    }
                }
                Op::CompleteWaiting { action, pick: p } => {
                    if let Some(id) = target_of(&o, &actions[*action], &Target::Waiting, p) {
                        let want = o.expected_completion(id);
                        expect_complete.push((r.complete(&[id]).remove(0), want));
                    }
                }
                Op::CompleteUnknown { .. } => {
                    let want = o.expected_completion(UNKNOWN_ID);
                    expect_complete.push((r.complete(&[UNKNOWN_ID]).remove(0), want));
                }
                Op::Cancel {
                    action,
                    pick: p,
                    target,
                } => {
                    if let Some(id) = target_of(&o, &actions[*action], target, p) {
                        let want = o.expected_cancel(id);
                        expect_cancel.push((r.cancel(&[id]).remove(0), want));
                    }
                }
                Op::Advance { micros } => {
                    // Sleeping on paused time lets it jump from timer to timer, so each
                    // actor's wake-up fires (and is handled) at its own time.
                    tokio::time::sleep(Duration::from_micros(*micros)).await;
                }
                Op::SetLimit { action, limit } => {
                    o.set_limit(&actions[*action], *limit);
                    r.exec
                        .set_policy(&actions[*action], policy(*limit))
                        .expect("policy set");
                }
                Op::Resubmit { action, pick: p } => {
                    let live =
                        o.ids_where(None, |l| matches!(l, Life::Waiting { .. } | Life::Running));
                    if let Some(id) = pick(&live, p) {
                        let answer = r.submit(&actions[*action], &[id]).remove(0);
                        expect_submit.push((answer, Verdict::Duplicate { execution_id: id }));
                    }
                }
                // Returns are the queue's rules; the queue level checks them.
                Op::Return { .. } | Op::Routed { .. } => {}
            }
            r.barrier(&all).await;
            for e in &r.events[seen..] {
                o.event(e).map_err(fail)?;
            }
            seen = r.events.len();
            o.dispatches(&r.dispatched).map_err(fail)?;
            for (answer, want) in expect_submit {
                prop_assert_eq!(answer.get(), Some(want));
            }
            for (answer, want) in expect_complete {
                prop_assert_eq!(answer.get(), Some(want));
            }
            for (answer, want) in expect_cancel {
                prop_assert_eq!(answer.get(), Some(want));
            }
            for a in &actions {
                o.agrees_with(&r.stats(a).await).map_err(fail)?;
            }
            let live = o.ids_where(None, |l| matches!(l, Life::Waiting { .. } | Life::Running));
            prop_assert_eq!(r.exec.live_count(), live.len(), "the live index");
            // A wake-up is asked for 1 ms after a deadline and tokio rounds timers up to the
            // next millisecond.
            o.settled(Duration::from_millis(2), &[]).map_err(fail)?;
        }

        for a in &actions {
            o.set_limit(a, 1000);
            r.exec.set_policy(a, policy(1000)).expect("policy set");
        }
        r.barrier(&all).await;
        for e in &r.events[seen..] {
            o.event(e).map_err(fail)?;
        }
        seen = r.events.len();
        let running = o.ids_where(None, |l| l == Life::Running);
        r.complete(&running);
        r.barrier(&all).await;
        for e in &r.events[seen..] {
            o.event(e).map_err(fail)?;
        }
        o.dispatches(&r.dispatched).map_err(fail)?;
        o.all_ended().map_err(fail)?;
        prop_assert_eq!(r.exec.live_count(), 0);
        r.shutdown().await;
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
    })]

    #[test]
    fn through_the_actors_every_interleaving_keeps_fifo_the_limit_and_the_books(
        case in case(40)
    ) {
        run_on_executor(case)?;
    }
}
