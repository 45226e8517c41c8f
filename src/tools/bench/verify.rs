//! The checks a bench run makes while it goes, as a plain state machine fed with what the
//! producers submitted and what the simulated workers saw, so each check is tested without a
//! broker.
//!
//! What is checked, per execution the bench submitted:
//! - **order**: per action, executions reach the workers in submission order, each counted
//!   at its first copy whatever its `attempt` (after a crash the executor sends with a
//!   raised attempt what it cannot know was sent; those still leave in order);
//! - **limit**: per action, executions running from the workers' point of view (dispatch
//!   received → completion published) never exceed the action's limit;
//! - **exactly once**: no execution is dispatched again without a higher `attempt` (a re-sent
//!   dispatch is counted and not run again; a copy the broker itself delivers again, flagged
//!   `redelivered`, is excused) and none is completed twice;
//! - **nothing missing**: at the end every execution is completed.
//!
//! The workers act on what [`Verifier::dispatched`] answers as a real worker that keys on
//! `execution_id` would: run a first copy, report the outcome again for a copy of an
//! execution that already finished (its first completion may have been lost), and leave a
//! copy of one still running alone.
//!
//! Dispatches of ids the bench did not submit (a shared vhost) are counted, not checked.

use std::fmt;
use std::time::{Duration, Instant, SystemTime};

/// Most violations kept with their details; the rest are only counted.
const MAX_KEPT: usize = 1000;

/// Execution ids listed in a "missing" line.
const MISSING_LISTED: usize = 20;

/// Something the executor (or the harness) got wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// A first dispatch overtook an execution submitted earlier for the same action.
    OutOfOrder {
        action: String,
        expected: u64,
        got: u64,
    },
    /// More executions of one action running at once than its limit.
    OverLimit {
        action: String,
        limit: u32,
        running: Vec<u64>,
    },
    /// A dispatch of an execution already dispatched, without a higher attempt and not a
    /// copy the broker delivered again.
    DispatchedTwice { execution_id: u64, attempt: u32 },
    /// A second completion of one execution.
    CompletedTwice { execution_id: u64 },
    /// A completion for an execution that was never dispatched (a harness fault).
    CompletedUndispatched { execution_id: u64 },
    /// A dispatch the workers could not read.
    Undecodable { detail: String },
    /// Executions that never completed.
    Missing {
        count: u64,
        never_dispatched: Vec<u64>,
        dispatched_not_completed: Vec<u64>,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::OutOfOrder {
                action,
                expected,
                got,
            } => write!(
                f,
                "order: action {action} dispatched execution {got} before {expected}, which was submitted earlier"
            ),
            Violation::OverLimit {
                action,
                limit,
                running,
            } => write!(
                f,
                "limit: action {action} had {} executions running at once (limit {limit}): {running:?}",
                running.len()
            ),
            Violation::DispatchedTwice {
                execution_id,
                attempt,
            } => write!(
                f,
                "exactly once: execution {execution_id} was dispatched again as attempt \
                 {attempt}, no higher than a copy already received"
            ),
            Violation::CompletedTwice { execution_id } => {
                write!(f, "exactly once: execution {execution_id} completed twice")
            }
            Violation::CompletedUndispatched { execution_id } => write!(
                f,
                "exactly once: execution {execution_id} completed without being dispatched"
            ),
            Violation::Undecodable { detail } => write!(f, "undecodable dispatch: {detail}"),
            Violation::Missing {
                count,
                never_dispatched,
                dispatched_not_completed,
            } => write!(
                f,
                "missing: {count} executions never completed; never dispatched (first \
                 {MISSING_LISTED}): {never_dispatched:?}; dispatched but not completed: \
                 {dispatched_not_completed:?}"
            ),
        }
    }
}

/// What a worker should do with a dispatch it received.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Dispatched {
    /// Run it. `queue_wait` is submission → dispatch received; `since_completion` is the time
    /// from the completion that freed the slot, when the action had executions waiting then.
    Run {
        queue_wait: Duration,
        since_completion: Option<Duration>,
    },
    /// It already finished: publish its completion again (reporting `failed` as before), in
    /// case the first one was lost, then acknowledge it.
    Report { failed: bool },
    /// Do not run it (a copy of one still running, or not ours); just acknowledge it.
    Skip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Submitted,
    Running,
    Completed,
}

#[derive(Debug, Clone)]
struct Exec {
    action: u32,
    /// Position in its action's submission order.
    pos: u32,
    submitted_at: Instant,
    state: State,
    /// The highest `attempt` received so far (0 before the first dispatch).
    highest_attempt: u32,
    /// What its completion reported, once completed.
    failed: bool,
    /// When its (first) completion was published, by monotonic and wall clock.
    completed_at: Option<(Instant, SystemTime)>,
}

#[derive(Debug)]
struct ActionState {
    name: String,
    limit: u32,
    /// Execution ids in submission order.
    order: Vec<u64>,
    /// Index in `order` of the next first dispatch expected.
    next: usize,
    /// First dispatches received so far.
    dispatched: usize,
    /// Running now, from the workers' point of view.
    running: Vec<u64>,
}

/// The verifier. Ids the bench submits are `base .. base + capacity`.
#[derive(Debug)]
pub struct Verifier {
    base: u64,
    execs: Vec<Option<Exec>>,
    actions: Vec<ActionState>,
    violations: Vec<Violation>,
    violations_total: u64,
    submitted: u64,
    completed: u64,
    resends: u64,
    /// Of `resends`, those whose execution no copy had reached before.
    raised_unseen: u64,
    redelivered: u64,
    foreign: u64,
}

impl Verifier {
    /// `actions` are (name, limit) by index; ids from `base`, at most `capacity` of them.
    pub fn new(base: u64, capacity: usize, actions: Vec<(String, u32)>) -> Self {
        Self {
            base,
            execs: vec![None; capacity],
            actions: actions
                .into_iter()
                .map(|(name, limit)| ActionState {
                    name,
                    limit,
                    order: Vec::new(),
                    next: 0,
                    dispatched: 0,
                    running: Vec::new(),
                })
                .collect(),
            violations: Vec::new(),
            violations_total: 0,
            submitted: 0,
            completed: 0,
            resends: 0,
            raised_unseen: 0,
            redelivered: 0,
            foreign: 0,
        }
    }

    fn slot(&self, id: u64) -> Option<usize> {
        let i = usize::try_from(id.checked_sub(self.base)?).ok()?;
        (i < self.execs.len()).then_some(i)
    }

    fn violate(&mut self, v: Violation) {
        self.violations_total += 1;
        if self.violations.len() < MAX_KEPT {
            self.violations.push(v);
        }
    }

    /// Records a submission, before its request is published (so its dispatch cannot come
    /// first). An id out of range or submitted twice is a harness fault and is ignored.
    pub fn submitted(&mut self, action: usize, id: u64, now: Instant) {
        let (Some(slot), Some(a)) = (self.slot(id), self.actions.get_mut(action)) else {
            return;
        };
        if self.execs[slot].is_some() {
            return;
        }
        let pos = a.order.len() as u32;
        a.order.push(id);
        self.execs[slot] = Some(Exec {
            action: action as u32,
            pos,
            submitted_at: now,
            state: State::Submitted,
            highest_attempt: 0,
            failed: false,
            completed_at: None,
        });
        self.submitted += 1;
    }

    /// A worker received a dispatch of `id` with `attempt`, flagged `redelivered` by the
    /// broker or not; `enqueued_at` is when the executor says it accepted the execution (its
    /// `enqueued_at`), if it said; `freed_by` the execution whose completion freed the slot it
    /// took (its `x-freed-by` header), if one did.
    pub fn dispatched(
        &mut self,
        id: u64,
        attempt: u32,
        redelivered: bool,
        now: Instant,
        enqueued_at: Option<SystemTime>,
        freed_by: Option<u64>,
    ) -> Dispatched {
        let Some(slot) = self.slot(id) else {
            self.foreign += 1;
            return Dispatched::Skip;
        };
        let Some(exec) = self.execs[slot].as_mut() else {
            self.foreign += 1;
            return Dispatched::Skip;
        };
        if exec.state != State::Submitted {
            let again = if attempt > exec.highest_attempt {
                exec.highest_attempt = attempt;
                self.resends += 1;
                None
            } else if redelivered {
                self.redelivered += 1;
                None
            } else {
                Some(Violation::DispatchedTwice {
                    execution_id: id,
                    attempt,
                })
            };
            let answer = match exec.state {
                State::Completed => Dispatched::Report {
                    failed: exec.failed,
                },
                _ => Dispatched::Skip,
            };
            if let Some(v) = again {
                self.violate(v);
            }
            return answer;
        }
        if attempt > 1 {
            // No copy reached us before: the executor could not know whether one had.
            self.resends += 1;
            self.raised_unseen += 1;
        }
        exec.highest_attempt = attempt;
        exec.state = State::Running;
        let (action, pos, queue_wait) = (
            exec.action as usize,
            exec.pos as usize,
            now.saturating_duration_since(exec.submitted_at),
        );
        let a = &self.actions[action];
        let mut found = Vec::new();
        if pos != a.next {
            found.push(Violation::OutOfOrder {
                action: a.name.clone(),
                expected: a.order[a.next],
                got: id,
            });
        }
        // Past everything already dispatched: an overtaken execution stays expected.
        while let Some(&next) = self.actions[action].order.get(self.actions[action].next)
            && self.is_dispatched(next)
        {
            self.actions[action].next += 1;
        }
        let a = &mut self.actions[action];
        a.dispatched += 1;
        a.running.push(id);
        if a.running.len() > a.limit as usize {
            found.push(Violation::OverLimit {
                action: a.name.clone(),
                limit: a.limit,
                running: a.running.clone(),
            });
        }
        // Paired exactly: the completion the executor says freed this slot. Only one it could
        // act on counts: sent after it had accepted this execution. One sent while the request
        // was still on its way in measures the intake, not the hand-off (the queue wait
        // already covers that).
        let since_completion = freed_by
            .and_then(|f| self.slot(f))
            .and_then(|s| self.execs[s].as_ref())
            .filter(|e| e.action as usize == action)
            .and_then(|e| e.completed_at)
            .filter(|(_, wall)| enqueued_at.is_none_or(|e| e <= *wall))
            .map(|(t, _)| now.saturating_duration_since(t));
        for v in found {
            self.violate(v);
        }
        Dispatched::Run {
            queue_wait,
            since_completion,
        }
    }

    fn is_dispatched(&self, id: u64) -> bool {
        self.slot(id)
            .and_then(|s| self.execs[s].as_ref())
            .is_some_and(|e| e.state != State::Submitted)
    }

    /// A worker is about to publish the completion of `id` (at `now`, `wall` by the wall
    /// clock), reporting `failed` or not. Returns whether the completion is a first one for an
    /// execution of this run (a worker sends nothing otherwise).
    pub fn completed(&mut self, id: u64, failed: bool, now: Instant, wall: SystemTime) -> bool {
        let Some(exec) = self.slot(id).and_then(|s| self.execs[s].as_mut()) else {
            return false;
        };
        match exec.state {
            State::Completed => {
                self.violate(Violation::CompletedTwice { execution_id: id });
                false
            }
            State::Submitted => {
                self.violate(Violation::CompletedUndispatched { execution_id: id });
                false
            }
            State::Running => {
                exec.state = State::Completed;
                exec.failed = failed;
                exec.completed_at = Some((now, wall));
                let a = &mut self.actions[exec.action as usize];
                a.running.retain(|r| *r != id);
                self.completed += 1;
                true
            }
        }
    }

    /// A dispatch the workers could not read.
    pub fn undecodable(&mut self, detail: String) {
        self.violate(Violation::Undecodable { detail });
    }

    /// Executions submitted so far.
    pub fn submitted_count(&self) -> u64 {
        self.submitted
    }

    /// Executions completed so far.
    pub fn completed_count(&self) -> u64 {
        self.completed
    }

    /// Re-sent dispatches (attempt > 1) seen.
    pub fn resends(&self) -> u64 {
        self.resends
    }

    /// Each completed execution and whether its completion reported it failed.
    pub fn outcomes(&self) -> std::collections::HashMap<u64, bool> {
        self.execs
            .iter()
            .enumerate()
            .filter_map(|(i, e)| {
                e.as_ref()
                    .filter(|e| e.state == State::Completed)
                    .map(|e| (self.base + i as u64, e.failed))
            })
            .collect()
    }

    /// The ids this run may submit.
    pub fn id_range(&self) -> std::ops::Range<u64> {
        self.base..self.base + self.execs.len() as u64
    }

    /// Dispatches with attempt > 1 of executions no earlier copy had reached.
    pub fn raised_unseen(&self) -> u64 {
        self.raised_unseen
    }

    /// Copies the broker delivered again (flagged `redelivered`, no higher attempt) seen.
    pub fn redelivered(&self) -> u64 {
        self.redelivered
    }

    /// Violations found so far.
    pub fn violations_total(&self) -> u64 {
        self.violations_total
    }

    /// Dispatches of executions this run did not submit.
    pub fn foreign(&self) -> u64 {
        self.foreign
    }

    /// The action (by index) of execution `id`, if the run submitted it.
    pub fn action_of(&self, id: u64) -> Option<u32> {
        self.slot(id)
            .and_then(|s| self.execs[s].as_ref())
            .map(|e| e.action)
    }

    /// The actions (by index) with executions submitted that no dispatch has reached yet:
    /// the ones with work waiting in the executor (or on its way there).
    pub fn waiting_actions(&self) -> Vec<u32> {
        self.actions
            .iter()
            .enumerate()
            .filter(|(_, a)| a.dispatched < a.order.len())
            .map(|(i, _)| i as u32)
            .collect()
    }

    /// Ends the run: adds what is missing and returns every violation (the first
    /// [`MAX_KEPT`] in full) and how many there were in all.
    pub fn finish(&mut self) -> (Vec<Violation>, u64) {
        let mut never = Vec::new();
        let mut running = Vec::new();
        let mut count = 0u64;
        for (i, e) in self.execs.iter().enumerate() {
            let Some(e) = e else { continue };
            let id = self.base + i as u64;
            match e.state {
                State::Completed => continue,
                State::Submitted if never.len() < MISSING_LISTED => never.push(id),
                State::Running if running.len() < MISSING_LISTED => running.push(id),
                _ => {}
            }
            count += 1;
        }
        if count > 0 {
            self.violate(Violation::Missing {
                count,
                never_dispatched: never,
                dispatched_not_completed: running,
            });
        }
        (self.violations.clone(), self.violations_total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier(limit: u32) -> (Verifier, Instant) {
        let v = Verifier::new(
            100,
            10,
            vec![("a".to_owned(), limit), ("b".to_owned(), limit)],
        );
        (v, Instant::now())
    }

    fn run(v: &mut Verifier, id: u64, now: Instant) {
        assert!(matches!(
            v.dispatched(id, 1, false, now, None, None),
            Dispatched::Run { .. }
        ));
        assert!(v.completed(id, false, now, SystemTime::now()));
    }

    #[test]
    fn a_correct_run_has_no_violations() {
        let (mut v, now) = verifier(1);
        for id in 100..104 {
            v.submitted((id % 2) as usize, id, now);
        }
        // Actions interleave freely; within each, submission order holds.
        for id in [101, 100, 103, 102] {
            run(&mut v, id, now);
        }
        let (violations, total) = v.finish();
        assert_eq!(total, 0, "{violations:?}");
        assert_eq!(v.completed_count(), 4);
    }

    #[test]
    fn an_action_waits_while_a_submission_has_no_dispatch_yet() {
        let (mut v, now) = verifier(1);
        assert!(v.waiting_actions().is_empty());
        v.submitted(0, 100, now);
        v.submitted(1, 101, now);
        v.submitted(1, 102, now);
        assert_eq!(v.waiting_actions(), vec![0, 1]);
        run(&mut v, 100, now);
        run(&mut v, 101, now);
        assert_eq!(v.waiting_actions(), vec![1]);
        assert_eq!(v.action_of(102), Some(1));
        assert_eq!(v.action_of(99), None);
        assert_eq!(v.action_of(105), None);
    }

    #[test]
    fn a_dispatch_out_of_submission_order_is_caught_with_both_ids() {
        let (mut v, now) = verifier(5);
        for id in 100..103 {
            v.submitted(0, id, now);
        }
        for id in [100, 102, 101] {
            run(&mut v, id, now);
        }
        let (violations, total) = v.finish();
        assert_eq!(total, 1);
        assert_eq!(
            violations[0],
            Violation::OutOfOrder {
                action: "a".to_owned(),
                expected: 101,
                got: 102
            }
        );
    }

    #[test]
    fn running_more_than_the_limit_is_caught_with_the_running_ids() {
        let (mut v, now) = verifier(2);
        for id in 100..103 {
            v.submitted(0, id, now);
        }
        for id in 100..103 {
            v.dispatched(id, 1, false, now, None, None);
        }
        let (violations, _) = v.finish();
        assert!(violations.contains(&Violation::OverLimit {
            action: "a".to_owned(),
            limit: 2,
            running: vec![100, 101, 102]
        }));
    }

    #[test]
    fn a_completion_frees_the_slot_for_the_limit() {
        let (mut v, now) = verifier(1);
        v.submitted(0, 100, now);
        v.submitted(0, 101, now);
        run(&mut v, 100, now);
        run(&mut v, 101, now);
        assert_eq!(v.finish().1, 0);
    }

    #[test]
    fn a_double_completion_and_a_double_first_dispatch_are_caught() {
        let (mut v, now) = verifier(1);
        v.submitted(0, 100, now);
        run(&mut v, 100, now);
        assert!(!v.completed(100, false, now, SystemTime::now()));
        assert_eq!(
            v.dispatched(100, 1, false, now, None, None),
            Dispatched::Report { failed: false }
        );
        let (violations, total) = v.finish();
        assert_eq!(total, 2);
        assert!(violations.contains(&Violation::CompletedTwice { execution_id: 100 }));
        assert!(violations.contains(&Violation::DispatchedTwice {
            execution_id: 100,
            attempt: 1
        }));
    }

    #[test]
    fn a_resent_dispatch_is_counted_and_not_run_again() {
        let (mut v, now) = verifier(1);
        v.submitted(0, 100, now);
        assert!(matches!(
            v.dispatched(100, 1, false, now, None, None),
            Dispatched::Run { .. }
        ));
        assert_eq!(
            v.dispatched(100, 2, false, now, None, None),
            Dispatched::Skip
        );
        assert!(v.completed(100, true, now, SystemTime::now()));
        assert_eq!(
            v.dispatched(100, 3, false, now, None, None),
            Dispatched::Report { failed: true },
            "a finished execution's outcome is reported again"
        );
        assert_eq!(v.resends(), 2);
        assert_eq!(v.finish().1, 0);
    }

    #[test]
    fn a_copy_the_broker_delivers_again_is_excused_and_one_the_executor_repeats_is_not() {
        let (mut v, now) = verifier(1);
        v.submitted(0, 100, now);
        v.dispatched(100, 1, false, now, None, None);
        assert_eq!(
            v.dispatched(100, 1, true, now, None, None),
            Dispatched::Skip
        );
        assert_eq!(v.redelivered(), 1);
        assert_eq!(
            v.dispatched(100, 2, false, now, None, None),
            Dispatched::Skip
        );
        assert_eq!(
            v.dispatched(100, 2, false, now, None, None),
            Dispatched::Skip
        );
        let (violations, total) = v.finish();
        assert_eq!(total, 2, "the repeat of attempt 2, and 100 never completed");
        assert!(violations.contains(&Violation::DispatchedTwice {
            execution_id: 100,
            attempt: 2
        }));
    }

    #[test]
    fn a_missing_execution_is_reported_with_its_id_and_state() {
        let (mut v, now) = verifier(1);
        for id in 100..103 {
            v.submitted(0, id, now);
        }
        run(&mut v, 100, now);
        v.dispatched(101, 1, false, now, None, None);
        let (violations, total) = v.finish();
        assert_eq!(total, 1);
        assert_eq!(
            violations[0],
            Violation::Missing {
                count: 2,
                never_dispatched: vec![102],
                dispatched_not_completed: vec![101]
            }
        );
        assert!(violations[0].to_string().contains("102"));
    }

    #[test]
    fn dispatches_of_other_ids_are_counted_as_foreign() {
        let (mut v, now) = verifier(1);
        assert_eq!(v.dispatched(5, 1, false, now, None, None), Dispatched::Skip);
        assert_eq!(
            v.dispatched(105, 1, false, now, None, None),
            Dispatched::Skip
        );
        assert_eq!(v.foreign(), 2);
        assert_eq!(v.finish().1, 0);
    }

    #[test]
    fn completion_to_next_dispatch_is_measured_only_when_executions_were_waiting() {
        let (mut v, t0) = verifier(1);
        let wall = SystemTime::now();
        v.submitted(0, 100, t0);
        v.submitted(0, 101, t0);
        v.dispatched(100, 1, false, t0, None, None);
        let t1 = t0 + Duration::from_millis(10);
        v.completed(100, false, t1, wall);
        let t2 = t1 + Duration::from_millis(3);
        assert_eq!(
            v.dispatched(101, 1, false, t2, Some(wall), Some(100)),
            Dispatched::Run {
                queue_wait: Duration::from_millis(13),
                since_completion: Some(Duration::from_millis(3))
            }
        );
        // Nothing waits behind 101: its completion starts no measurement.
        v.completed(101, false, t2, wall);
        v.submitted(0, 102, t2);
        assert!(matches!(
            v.dispatched(102, 1, false, t2, None, None),
            Dispatched::Run {
                since_completion: None,
                ..
            }
        ));
    }

    #[test]
    fn a_completion_sent_before_the_executor_accepted_the_next_one_is_not_a_sample() {
        let (mut v, t0) = verifier(1);
        let wall = SystemTime::now();
        v.submitted(0, 100, t0);
        v.submitted(0, 101, t0);
        v.dispatched(100, 1, false, t0, None, None);
        v.completed(100, false, t0, wall);
        let accepted_later = wall + Duration::from_millis(5);
        assert!(matches!(
            v.dispatched(101, 1, false, t0, Some(accepted_later), Some(100)),
            Dispatched::Run {
                since_completion: None,
                ..
            }
        ));
    }

    #[test]
    fn completion_to_next_dispatch_pairs_the_completion_the_executor_names() {
        // Limit 2: 100 completes first, then 101, but the executor handled 101's completion
        // first and says so: 102 took 101's slot, 103 took 100's.
        let (mut v, t0) = verifier(2);
        let wall = SystemTime::now();
        for id in 100..104 {
            v.submitted(0, id, t0);
        }
        v.dispatched(100, 1, false, t0, None, None);
        v.dispatched(101, 1, false, t0, None, None);
        v.completed(100, false, t0 + Duration::from_millis(10), wall);
        v.completed(101, false, t0 + Duration::from_millis(20), wall);
        let since = |d: Dispatched| match d {
            Dispatched::Run {
                since_completion, ..
            } => since_completion,
            other => panic!("not run: {other:?}"),
        };
        let t = t0 + Duration::from_millis(25);
        assert_eq!(
            since(v.dispatched(102, 1, false, t, Some(wall), Some(101))),
            Some(Duration::from_millis(5))
        );
        assert_eq!(
            since(v.dispatched(103, 1, false, t, Some(wall), Some(100))),
            Some(Duration::from_millis(15))
        );
        assert!(v.violations.is_empty(), "{:?}", v.violations);
    }
}
