//! Idle actors retiring and coming back (see [`super::dormant`]), through the [`Executor`].

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;

use super::action::Inspect;
use super::memory::{ChannelDispatcher, ChannelSink, NoStats};
use super::ports::{Dispatch, Event, RemovalReason};
use super::{ActionPolicy, Executor, Ports, QueueSettings, RateLimit, UniformPolicy};
use crate::model::{ActionRef, CancelRequest, Completion, EndStatus, Payload, Submission};

struct Rig {
    exec: Arc<Executor>,
    dispatches: UnboundedReceiver<Vec<Dispatch>>,
    events: UnboundedReceiver<Event>,
}

async fn rig(passivate_after: Option<Duration>, policy: ActionPolicy) -> Rig {
    let (dispatcher, dispatches) = ChannelDispatcher::new();
    let (sink, events) = ChannelSink::new();
    let ports = Ports {
        dispatcher: Arc::new(dispatcher),
        sink: Arc::new(sink),
        observer: Arc::new(NoStats),
    };
    let settings = QueueSettings {
        passivate_after,
        ..QueueSettings::default()
    };
    let exec = Executor::start(settings, ports, Arc::new(UniformPolicy(policy)))
        .await
        .expect("the executor starts");
    Rig {
        exec: Arc::new(exec),
        dispatches,
        events,
    }
}

fn action(name: &str) -> ActionRef {
    ActionRef::parse(name).expect("valid ref")
}

fn limited(limit: u32) -> ActionPolicy {
    ActionPolicy {
        concurrency_limit: NonZeroU32::new(limit).expect("nonzero"),
        ..ActionPolicy::default()
    }
}

fn sub(id: u64) -> Submission {
    Submission::new(
        id,
        Payload::from_json(&format!("{{\"n\":{id}}}")).expect("json"),
    )
}

/// Waits, yielding, until `cond` holds; a real-time deadline, so paused tokio time is left
/// alone.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "gave up waiting for: {what}"
        );
        tokio::task::yield_now().await;
    }
}

/// Lets the actors handle what is in their mailboxes (an actor call is a barrier for its
/// own).
async fn settle(exec: &Executor, action: &ActionRef) {
    let _ = exec.stats(action).await;
}

async fn next_dispatches(rig: &mut Rig) -> Vec<u64> {
    let batch = rig.dispatches.recv().await.expect("a dispatch");
    batch.into_iter().map(|d| d.execution_id).collect()
}

#[tokio::test(start_paused = true)]
async fn an_idle_actor_retires_and_comes_back_with_its_counters_ends_and_policy() {
    let mut r = rig(Some(Duration::from_secs(10)), limited(1)).await;
    let a = action("rest.a");
    r.exec.submit(&a, vec![sub(1)]);
    assert_eq!(next_dispatches(&mut r).await, vec![1]);
    r.exec
        .complete(vec![Completion::new(1, EndStatus::Succeeded)]);
    // A policy set at run time, kept by the registry through the retirement.
    let mut policy = limited(2);
    policy.enabled = true;
    r.exec.set_policy(&a, policy).expect("set");
    settle(&r.exec, &a).await;
    assert_eq!(r.exec.actor_counts(), (1, 0));
    let before = r.exec.stats(&a).await.expect("stats").expect("known");

    tokio::time::advance(Duration::from_secs(9)).await;
    settle(&r.exec, &a).await;
    assert_eq!(r.exec.actor_counts(), (1, 0), "not idle long enough yet");
    tokio::time::advance(Duration::from_secs(2)).await;
    let exec = r.exec.clone();
    until("the actor retires", || exec.actor_counts() == (0, 1)).await;

    // Read from the record: no actor is started for it.
    let resting = r.exec.stats(&a).await.expect("stats").expect("known");
    assert_eq!(resting, before);
    assert_eq!(r.exec.all_stats().await, vec![before.clone()]);
    assert_eq!(r.exec.actions(), vec![a.clone()]);
    let view = r
        .exec
        .inspect(
            &a,
            Inspect {
                waiting: 10,
                running: 10,
            },
        )
        .await
        .expect("inspect")
        .expect("known");
    assert_eq!(view.recent_ends.len(), 1);
    assert_eq!(view.recent_ends[0].0, 1);
    assert_eq!(r.exec.actor_counts(), (0, 1));

    // The next request starts a new actor from the record, with the policy set before.
    r.exec.submit(&a, vec![sub(2), sub(3), sub(4)]);
    assert_eq!(next_dispatches(&mut r).await, vec![2, 3]);
    let after = r.exec.stats(&a).await.expect("stats").expect("known");
    assert_eq!(r.exec.actor_counts(), (1, 0));
    assert_eq!(after.total_enqueued, 4);
    assert_eq!(after.total_completed, 1);
    assert_eq!((after.active_count, after.queue_length), (2, 1));
    assert_eq!(after.max_concurrent, 2);
}

#[tokio::test(start_paused = true)]
async fn an_action_holding_work_or_a_spent_rate_limit_keeps_its_actor() {
    let rate = RateLimit {
        max: NonZeroU32::new(1).expect("nonzero"),
        per: Duration::from_secs(60),
    };
    let policy = ActionPolicy {
        rate_limit: Some(rate),
        ..limited(1)
    };
    let mut r = rig(Some(Duration::from_secs(10)), policy).await;
    let busy = action("rest.busy");
    let rated = action("rest.rated");
    r.exec.submit(&busy, vec![sub(1)]);
    assert_eq!(next_dispatches(&mut r).await, vec![1]);
    r.exec.submit(&rated, vec![sub(2)]);
    assert_eq!(next_dispatches(&mut r).await, vec![2]);
    r.exec
        .complete(vec![Completion::new(2, EndStatus::Succeeded)]);
    settle(&r.exec, &rated).await;

    tokio::time::advance(Duration::from_secs(30)).await;
    settle(&r.exec, &busy).await;
    settle(&r.exec, &rated).await;
    assert_eq!(
        r.exec.actor_counts(),
        (2, 0),
        "one runs an execution, the other's bucket is empty"
    );
    tokio::time::advance(Duration::from_secs(31)).await;
    let exec = r.exec.clone();
    until("the rate-limited action retires", || {
        exec.actor_counts() == (1, 1)
    })
    .await;
    r.exec.complete(vec![Completion::new(1, EndStatus::Failed)]);
    // Its rate limit, too, has to refill from its last step forward.
    settle(&r.exec, &busy).await;
    tokio::time::advance(Duration::from_secs(59)).await;
    settle(&r.exec, &busy).await;
    assert_eq!(exec.actor_counts(), (1, 1));
    tokio::time::advance(Duration::from_secs(2)).await;
    until("the other one retires", || exec.actor_counts() == (0, 2)).await;
    // A full bucket again: admitted at once.
    r.exec.submit(&rated, vec![sub(3)]);
    assert_eq!(next_dispatches(&mut r).await, vec![3]);
}

#[tokio::test(start_paused = true)]
async fn passivation_follows_the_settings_and_never_happens_when_off() {
    let r = rig(None, limited(1)).await;
    let a = action("rest.off");
    r.exec.submit(&a, vec![sub(1)]);
    r.exec
        .complete(vec![Completion::new(1, EndStatus::Succeeded)]);
    settle(&r.exec, &a).await;
    tokio::time::advance(Duration::from_secs(24 * 3600)).await;
    settle(&r.exec, &a).await;
    assert_eq!(r.exec.actor_counts(), (1, 0), "off: never");
    r.exec.set_settings(QueueSettings {
        passivate_after: Some(Duration::from_secs(5)),
        ..r.exec.settings()
    });
    settle(&r.exec, &a).await;
    tokio::time::advance(Duration::from_secs(1)).await;
    let exec = r.exec.clone();
    until("a reload turns it on", || exec.actor_counts() == (0, 1)).await;
}

/// A small deterministic generator, so a failing iteration can be told by its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Requests, completions and cancels race the retirement of actors that retire as soon as
/// they are idle: over many runs with random timing, every action's dispatches keep
/// submission order, never exceed the limit, and every execution ends exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_racing_a_retirement_are_neither_lost_nor_reordered() {
    const ACTIONS: u64 = 4;
    const PER_ACTION: u64 = 150;
    let mut retirements = 0;
    for seed in 1..=25u64 {
        let limit = 1 + (seed % 3) as u32;
        let mut r = rig(Some(Duration::from_micros(1)), limited(limit)).await;
        let actions: Vec<ActionRef> = (0..ACTIONS).map(|i| action(&format!("race.{i}"))).collect();
        // Ids are action-major: action i submits i*PER_ACTION+1.. in order.
        let action_of = |id: u64| ((id - 1) / PER_ACTION) as usize;

        // Workers: complete every dispatch after a random pause, noting any dispatch out of
        // order or above the limit.
        let exec = r.exec.clone();
        let mut dispatches = std::mem::replace(&mut r.dispatches, ChannelDispatcher::new().1);
        let violations = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let noted = violations.clone();
        let worker = tokio::spawn(async move {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let mut last = vec![0u64; ACTIONS as usize];
            let running = Arc::new(std::sync::Mutex::new(vec![0u32; ACTIONS as usize]));
            while let Some(batch) = dispatches.recv().await {
                for d in batch {
                    let id = d.execution_id;
                    let i = action_of(id);
                    if id <= last[i] {
                        noted
                            .lock()
                            .expect("lock")
                            .push(format!("{id} after {}", last[i]));
                    }
                    last[i] = id;
                    {
                        let mut running = running.lock().expect("lock");
                        running[i] += 1;
                        if running[i] > limit {
                            noted
                                .lock()
                                .expect("lock")
                                .push(format!("{id}: {} running", running[i]));
                        }
                    }
                    let pause = rng.below(4);
                    let exec = exec.clone();
                    let running = running.clone();
                    tokio::spawn(async move {
                        for _ in 0..pause {
                            tokio::task::yield_now().await;
                        }
                        if pause == 3 {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        running.lock().expect("lock")[i] -= 1;
                        exec.complete(vec![Completion::new(id, EndStatus::Succeeded)]);
                    });
                }
            }
        });

        // Producers: one task per action, small batches with pauses; some cancels.
        let mut producers = Vec::new();
        for (i, a) in actions.iter().enumerate() {
            let exec = r.exec.clone();
            let a = a.clone();
            producers.push(tokio::spawn(async move {
                let mut rng = Rng((seed << 8 | i as u64).wrapping_mul(0x2545_F491_4F6C_DD1D) | 1);
                let first = i as u64 * PER_ACTION + 1;
                let mut next = first;
                while next < first + PER_ACTION {
                    let n = (1 + rng.below(4)).min(first + PER_ACTION - next);
                    exec.submit(&a, (next..next + n).map(sub).collect());
                    if rng.below(5) == 0 {
                        exec.cancel(vec![CancelRequest {
                            execution_id: next + rng.below(n),
                            receipt: None,
                        }]);
                    }
                    next += n;
                    // Timers fire on millisecond ticks: a pause of a tick or two often ends just as
                    // the idle actor retires.
                    match rng.below(4) {
                        0 => tokio::task::yield_now().await,
                        1 => tokio::time::sleep(Duration::from_millis(1)).await,
                        2 => tokio::time::sleep(Duration::from_millis(2)).await,
                        _ => {}
                    }
                }
            }));
        }
        for p in producers {
            p.await.expect("producer");
        }

        // Every execution ends exactly once: completed, or canceled while it waited.
        let total = ACTIONS * PER_ACTION;
        let mut ends: HashMap<u64, u32> = HashMap::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut canceled = 0u64;
        while ends.len() < total as usize {
            assert!(
                std::time::Instant::now() < deadline,
                "seed {seed}: {} of {total} ended",
                ends.len()
            );
            match tokio::time::timeout(Duration::from_millis(100), r.events.recv()).await {
                Ok(Some(Event::Completed { execution_id, .. })) => {
                    *ends.entry(execution_id).or_default() += 1;
                }
                Ok(Some(Event::Removed {
                    reason: RemovalReason::Canceled,
                    execution,
                    ..
                })) => {
                    canceled += 1;
                    *ends.entry(execution.execution_id).or_default() += 1;
                }
                Ok(Some(_)) | Err(_) => {}
                Ok(None) => panic!("seed {seed}: the sink closed"),
            }
        }
        assert!(
            ends.values().all(|&n| n == 1),
            "seed {seed}: an execution ended twice"
        );
        worker.abort();
        let violations = violations.lock().expect("lock").clone();
        assert!(
            violations.is_empty(),
            "seed {seed}, limit {limit}: {violations:?}"
        );
        assert!(canceled < total, "seed {seed}: something ran");
        // Counters survived every retirement.
        let mut enqueued = 0;
        let mut done = 0;
        for a in &actions {
            let s = r.exec.stats(a).await.expect("stats").expect("known");
            assert_eq!((s.queue_length, s.active_count), (0, 0), "seed {seed}");
            enqueued += s.total_enqueued;
            done += s.total_completed + s.total_canceled;
        }
        assert_eq!((enqueued, done), (total, total), "seed {seed}");
        assert_eq!(r.exec.live_count(), 0, "seed {seed}");
        retirements += r.exec.retirements();
        r.exec.shutdown(Duration::from_secs(5)).await;
    }
    // Each run's actors retired many times while work kept coming.
    assert!(
        retirements > 25 * ACTIONS * 3,
        "only {retirements} retirements"
    );
    println!("{retirements} retirements");
}
