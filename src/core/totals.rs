//! Executor-wide counters of admissions, worker completions and queue waits, kept as atomics
//! the action actors add to once per handled message. They let the operations page show
//! throughput and queue wait over time ([`crate::ops::history`] samples them) without asking
//! every actor, and whether or not Prometheus metrics are on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::ports::Event;

/// The counters since the executor started.
#[derive(Debug, Default)]
pub struct Totals {
    admitted: AtomicU64,
    completed: AtomicU64,
    /// Sum of the waits of every admitted execution, in microseconds.
    waited_micros: AtomicU64,
    /// The longest wait of an execution admitted since [`Totals::take_longest_wait`] last ran.
    longest_wait_micros: AtomicU64,
}

/// The counters at one moment; differences between two are what happened in between.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TotalsSnapshot {
    /// Executions that took a slot (a dispatch the broker returned and that went out again
    /// counts twice).
    pub admitted: u64,
    /// Completions from workers that freed a slot (any status).
    pub completed: u64,
    /// Sum of the admitted executions' waits in the queue, in microseconds.
    pub waited_micros: u64,
}

impl Totals {
    /// Adds what one handler's events did.
    pub fn count(&self, events: &[Event]) {
        let (mut admitted, mut completed, mut waited, mut longest) = (0u64, 0u64, 0u64, 0u64);
        for event in events {
            match event {
                Event::Admitted { waited: w, .. } => {
                    let micros = u64::try_from(w.as_micros()).unwrap_or(u64::MAX);
                    admitted += 1;
                    waited = waited.saturating_add(micros);
                    longest = longest.max(micros);
                }
                Event::Completed { .. } => completed += 1,
                _ => {}
            }
        }
        if admitted > 0 {
            self.admitted.fetch_add(admitted, Ordering::Relaxed);
            self.waited_micros.fetch_add(waited, Ordering::Relaxed);
            self.longest_wait_micros
                .fetch_max(longest, Ordering::Relaxed);
        }
        if completed > 0 {
            self.completed.fetch_add(completed, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> TotalsSnapshot {
        TotalsSnapshot {
            admitted: self.admitted.load(Ordering::Relaxed),
            completed: self.completed.load(Ordering::Relaxed),
            waited_micros: self.waited_micros.load(Ordering::Relaxed),
        }
    }

    /// The longest wait among executions admitted since the last call, and starts over. Meant
    /// for one reader (the history sampler); two would split the intervals between them.
    pub fn take_longest_wait(&self) -> Duration {
        Duration::from_micros(self.longest_wait_micros.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ActionRef, EndStatus};

    fn admitted(waited_ms: u64) -> Event {
        Event::Admitted {
            action: ActionRef::parse("a").expect("ref"),
            execution_id: 1,
            at: chrono::Utc::now(),
            waited: Duration::from_millis(waited_ms),
        }
    }

    #[test]
    fn admissions_completions_and_waits_add_up_and_the_longest_wait_starts_over_when_taken() {
        let t = Totals::default();
        t.count(&[admitted(10), admitted(30)]);
        t.count(&[
            Event::Completed {
                action: ActionRef::parse("a").expect("ref"),
                execution_id: 1,
                status: EndStatus::Failed,
                result: None,
                at: chrono::Utc::now(),
                receipt: None,
                from_waiting: false,
            },
            admitted(20),
        ]);
        assert_eq!(
            t.snapshot(),
            TotalsSnapshot {
                admitted: 3,
                completed: 1,
                waited_micros: 60_000,
            }
        );
        assert_eq!(t.take_longest_wait(), Duration::from_millis(30));
        assert_eq!(t.take_longest_wait(), Duration::ZERO);
        t.count(&[admitted(5)]);
        assert_eq!(t.take_longest_wait(), Duration::from_millis(5));
    }
}
