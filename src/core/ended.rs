//! The execution ids that ended lately, so that a request redelivered after its execution
//! finished (its acknowledgement lost with a connection) is a duplicate, not a second run.
//! The action actors remember the ids they end; the registry asks before it accepts one.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::model::ExecutionId;

/// The last `capacity` execution ids that ended (completed, canceled, timed out, purged or
/// reclaimed). Bounded, so memory stays flat; the ledger answers for anything older (see
/// [`Executor::may_have_forgotten`](crate::core::Executor::may_have_forgotten)).
pub struct RecentlyEnded {
    set: dashmap::DashSet<ExecutionId>,
    order: std::sync::Mutex<std::collections::VecDeque<ExecutionId>>,
    capacity: usize,
    /// The highest id that may have ended without being in the set: evicted from it, or ended
    /// before this process started (the ledger's highest id at start). 0 while nothing is
    /// forgotten. An id above it that is not in the set has never ended, without asking the
    /// ledger: producers that number executions upwards never need a lookup.
    forgotten_up_to: AtomicU64,
}

impl RecentlyEnded {
    pub fn new(capacity: usize) -> Self {
        Self {
            set: dashmap::DashSet::new(),
            order: std::sync::Mutex::new(std::collections::VecDeque::new()),
            capacity,
            forgotten_up_to: AtomicU64::new(0),
        }
    }

    /// Remembers ids that just ended (one lock per batch, not per id).
    pub fn remember(&self, ids: &[ExecutionId]) {
        if ids.is_empty() {
            return;
        }
        if self.capacity == 0 {
            if let Some(&max) = ids.iter().max() {
                self.forget_up_to(max);
            }
            return;
        }
        let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        for &id in ids {
            if self.set.insert(id) {
                order.push_back(id);
            }
        }
        while order.len() > self.capacity {
            if let Some(old) = order.pop_front() {
                self.set.remove(&old);
                self.forget_up_to(old);
            }
        }
    }

    pub fn contains(&self, id: ExecutionId) -> bool {
        self.set.contains(&id)
    }

    /// Whether `id` may have ended without being remembered here.
    pub fn may_have_forgotten(&self, id: ExecutionId) -> bool {
        id <= self.forgotten_up_to.load(Ordering::Acquire)
    }

    /// Ids up to `id` may have ended unremembered. Only ever raised.
    pub fn forget_up_to(&self, id: ExecutionId) {
        self.forgotten_up_to.fetch_max(id, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ended_window_forgets_nothing_until_it_evicts_and_then_only_up_to_the_evicted_id() {
        let ended = RecentlyEnded::new(3);
        ended.remember(&[5, 2, 3]);
        ended.remember(&[2]);
        assert!(!ended.may_have_forgotten(1), "nothing was evicted yet");
        ended.remember(&[4]);
        assert!(!ended.contains(5), "5 was the oldest and was evicted");
        assert!(ended.contains(4));
        assert!(ended.may_have_forgotten(5) && ended.may_have_forgotten(1));
        assert!(!ended.may_have_forgotten(6), "above every evicted id: new");
        ended.remember(&[9]);
        assert!(ended.may_have_forgotten(2), "2 was evicted");
        assert!(
            !ended.may_have_forgotten(6),
            "the bound only follows the ids evicted"
        );
    }

    #[test]
    fn a_window_of_zero_forgets_every_id_that_ends() {
        let ended = RecentlyEnded::new(0);
        assert!(!ended.may_have_forgotten(1));
        ended.remember(&[7, 3]);
        assert!(!ended.contains(7));
        assert!(ended.may_have_forgotten(7));
        assert!(!ended.may_have_forgotten(8));
    }

    #[test]
    fn ends_before_the_start_are_forgotten_up_to_the_ledgers_highest_id_for_good() {
        let ended = RecentlyEnded::new(10);
        ended.forget_up_to(100);
        ended.remember(&[1]);
        ended.forget_up_to(50);
        assert!(ended.may_have_forgotten(100));
        assert!(!ended.may_have_forgotten(101));
    }
}
