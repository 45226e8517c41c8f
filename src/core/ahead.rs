//! Cancels that came before their requests.
//!
//! Requests and cancels travel on different RabbitMQ queues, so a producer's cancel can reach
//! the executor while its request still waits behind others. Such a cancel leaves a mark on
//! its execution id and is acknowledged once the outcome sink has kept it (the ledger's
//! `cancel_ahead` table, from which recovery marks the ids again after a restart); when the
//! request comes, the registry takes the mark, and the request is accepted and at once
//! recorded as canceled, never dispatched.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::model::ExecutionId;

/// How many cancels that came before their requests are remembered at most (about 40 bytes
/// each); beyond that the oldest are forgotten, so that cancels for ids that never come
/// cannot grow memory without bound.
pub const CANCELED_AHEAD_CAPACITY: usize = 100_000;

/// Execution ids whose cancel arrived while no execution had them and none had ended with
/// them: a producer's cancel that overtook its request, which waits behind others in the
/// requests queue. When the request arrives it is accepted and at once recorded as canceled,
/// never dispatched. The oldest are forgotten beyond a capacity.
pub struct CanceledAhead {
    /// Each marked id with the number of its entry in `order`.
    marks: dashmap::DashMap<ExecutionId, u64, foldhash::fast::RandomState>,
    /// Insertion order, for forgetting the oldest; may hold entries of marks already taken.
    order: Mutex<Order>,
    /// Marks in `marks`, never below their number: lets the intake skip hashing every id
    /// while there are none.
    len: AtomicUsize,
    capacity: usize,
}

#[derive(Default)]
struct Order {
    entries: VecDeque<(ExecutionId, u64)>,
    next: u64,
}

impl CanceledAhead {
    pub fn new(capacity: usize) -> Self {
        Self {
            marks: dashmap::DashMap::with_hasher(foldhash::fast::RandomState::default()),
            order: Mutex::new(Order::default()),
            len: AtomicUsize::new(0),
            capacity,
        }
    }

    /// Remembers that `id`'s cancel came first.
    pub fn remember(&self, id: ExecutionId) {
        let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        // Counted before it is in the map, so that `len` is never below the number of marks
        // and `take` never skips a mark that is there.
        self.len.fetch_add(1, Ordering::AcqRel);
        let seq = order.next;
        match self.marks.entry(id) {
            dashmap::mapref::entry::Entry::Occupied(_) => {
                self.len.fetch_sub(1, Ordering::AcqRel);
            }
            dashmap::mapref::entry::Entry::Vacant(e) => {
                e.insert(seq);
                order.next += 1;
                order.entries.push_back((id, seq));
            }
        }
        while order.entries.len() > self.capacity {
            let Some((old, old_seq)) = order.entries.pop_front() else {
                break;
            };
            // Only the mark this entry was made for: an id taken and marked again has a
            // newer entry further back.
            if self.marks.remove_if(&old, |_, s| *s == old_seq).is_some() {
                self.len.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// Takes `id`'s mark if it has one: true for exactly one caller.
    pub fn take(&self, id: ExecutionId) -> bool {
        if self.len.load(Ordering::Acquire) == 0 {
            return false;
        }
        let taken = self.marks.remove(&id).is_some();
        if taken {
            self.len.fetch_sub(1, Ordering::AcqRel);
        }
        taken
    }

    /// Ids remembered now.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_mark_is_taken_once_and_the_oldest_are_forgotten_beyond_the_capacity() {
        let ahead = CanceledAhead::new(2);
        assert!(!ahead.take(1), "nothing remembered yet");
        ahead.remember(1);
        ahead.remember(1);
        assert_eq!(ahead.len(), 1);
        assert!(ahead.take(1));
        assert!(!ahead.take(1), "taken once only");
        for id in [2, 3, 4] {
            ahead.remember(id);
        }
        assert_eq!(ahead.len(), 2);
        assert!(!ahead.take(2), "the oldest is forgotten");
        assert!(ahead.take(3) && ahead.take(4));
        assert!(ahead.is_empty());
        // An id taken and marked again keeps its new mark when its old entry is evicted.
        ahead.remember(5);
        assert!(ahead.take(5));
        ahead.remember(6);
        ahead.remember(5);
        ahead.remember(7);
        assert!(ahead.take(5), "5's new mark outlives its old entry");
        assert!(!ahead.take(6), "6 was the oldest mark");
    }
}
