//! Cancels that came before their requests.
//!
//! Requests and cancels travel on different RabbitMQ queues, so a producer's cancel can reach
//! the executor while its request still waits behind others. Such a cancel leaves a mark on
//! its execution id; when the request comes, the registry takes the mark and the request is
//! accepted and at once recorded as canceled, never dispatched.
//!
//! A mark may hold the cancel's receipt: its message then stays unacknowledged, so the broker
//! keeps it across a crash and hands it to the next executor, which marks the id again. At
//! most [`CanceledAhead::hold_up_to`] receipts are held (a consumer's prefetch must not fill
//! with them); beyond that the oldest are settled [`CancelVerdict::Remembered`] and their
//! marks live on in memory only. At a clean stop the held ones are given back
//! ([`CancelVerdict::GivenBack`]) so that the broker delivers them again to the next executor.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;

use crate::model::{CancelVerdict, ExecutionId, Receipt};

/// How many marks are kept at most (about 40 bytes each); beyond that the oldest are
/// forgotten, so that cancels for ids that never come cannot grow memory without bound.
pub const CANCELED_AHEAD_CAPACITY: usize = 100_000;

type Mark = Option<Receipt<CancelVerdict>>;

/// A mark as stored: a receipt is `Send` only, and the map must be `Sync`.
struct Slot(Mutex<Mark>);

impl Slot {
    fn take(&self) -> Mark {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn replace(&self, mark: Mark) -> Mark {
        std::mem::replace(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()), mark)
    }

    fn holds(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }
}

/// The marks, with the receipts some of them hold.
pub struct CanceledAhead {
    marks: DashMap<ExecutionId, Slot, foldhash::fast::RandomState>,
    /// The order of the two lists below, under one lock.
    order: Mutex<Order>,
    /// Marks in `marks`, never below their number: lets the intake skip hashing every id
    /// while there are none.
    len: AtomicUsize,
    capacity: usize,
    /// Receipts held at most; 0 settles every receipt at once.
    hold: AtomicUsize,
}

#[derive(Default)]
struct Order {
    /// Marked ids, oldest first; may still list ids whose mark was taken.
    marked: VecDeque<ExecutionId>,
    /// Ids whose mark holds a receipt, oldest first; may list ids whose receipt is gone.
    holding: VecDeque<ExecutionId>,
    /// Marks that hold a receipt now.
    held: usize,
}

impl CanceledAhead {
    pub fn new(capacity: usize) -> Self {
        Self {
            marks: DashMap::with_hasher(foldhash::fast::RandomState::default()),
            order: Mutex::new(Order::default()),
            len: AtomicUsize::new(0),
            capacity,
            hold: AtomicUsize::new(0),
        }
    }

    /// Holds at most `n` receipts from now on (the RabbitMQ edge sets half its prefetch).
    pub fn hold_up_to(&self, n: usize) {
        self.hold.store(n, Ordering::Release);
        let mut order = self.lock();
        self.release_beyond(&mut order, n);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Order> {
        self.order.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks `id`: its cancel came first. `receipt` is held if there is room, and settled
    /// [`CancelVerdict::Remembered`] otherwise. A second cancel for a marked id replaces the
    /// receipt held (the first one's message was redelivered after a lost connection, say).
    pub fn remember(&self, id: ExecutionId, receipt: Mark) {
        let hold = self.hold.load(Ordering::Acquire);
        let receipt = match receipt {
            Some(r) if hold == 0 => {
                r.settle(CancelVerdict::Remembered);
                None
            }
            r => r,
        };
        let holds = receipt.is_some();
        let mut order = self.lock();
        // Counted before it is in the map, so that `len` is never below the number of marks.
        self.len.fetch_add(1, Ordering::AcqRel);
        let replaced = match self.marks.entry(id) {
            dashmap::mapref::entry::Entry::Occupied(e) => {
                self.len.fetch_sub(1, Ordering::AcqRel);
                Some(e.get().replace(receipt))
            }
            dashmap::mapref::entry::Entry::Vacant(e) => {
                e.insert(Slot(Mutex::new(receipt)));
                order.marked.push_back(id);
                None
            }
        };
        if let Some(Some(old)) = replaced {
            order.held -= 1;
            old.settle(CancelVerdict::Remembered);
        }
        if holds {
            order.held += 1;
            order.holding.push_back(id);
        }
        self.release_beyond(&mut order, hold);
        while order.marked.len() > self.capacity {
            let Some(old) = order.marked.pop_front() else {
                break;
            };
            if let Some((_, slot)) = self.marks.remove(&old) {
                self.len.fetch_sub(1, Ordering::AcqRel);
                if let Some(r) = slot.take() {
                    order.held -= 1;
                    r.settle(CancelVerdict::Remembered);
                }
            }
        }
    }

    /// Settles the oldest held receipts until at most `hold` are held.
    fn release_beyond(&self, order: &mut Order, hold: usize) {
        while order.held > hold {
            let Some(id) = order.holding.pop_front() else {
                break;
            };
            let receipt = self.marks.get(&id).and_then(|m| m.take());
            if let Some(r) = receipt {
                order.held -= 1;
                r.settle(CancelVerdict::Remembered);
            }
        }
        // Ids whose receipt went another way: keep the list from growing without bound.
        if order.holding.len() > 2 * order.held + 64 {
            let marks = &self.marks;
            order
                .holding
                .retain(|id| marks.get(id).is_some_and(|m| m.holds()));
        }
    }

    /// Takes `id`'s mark if it has one, with the receipt it holds: `Some` for exactly one
    /// caller.
    pub fn take(&self, id: ExecutionId) -> Option<Mark> {
        if self.len.load(Ordering::Acquire) == 0 {
            return None;
        }
        let (_, slot) = self.marks.remove(&id)?;
        self.len.fetch_sub(1, Ordering::AcqRel);
        let mark = slot.take();
        if mark.is_some() {
            self.lock().held -= 1;
        }
        Some(mark)
    }

    /// Settles every held receipt [`CancelVerdict::GivenBack`] (a clean stop: the broker
    /// delivers those cancels again to the next executor); the marks stay.
    pub fn give_back(&self) {
        let mut order = self.lock();
        while let Some(id) = order.holding.pop_front() {
            let receipt = self.marks.get(&id).and_then(|m| m.take());
            if let Some(r) = receipt {
                order.held -= 1;
                r.settle(CancelVerdict::GivenBack);
            }
        }
    }

    /// Marks now.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Receipts held now.
    pub fn held(&self) -> usize {
        self.lock().held
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    fn receipt() -> (Mark, Arc<Mutex<Vec<CancelVerdict>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let r = Receipt::new(move |v| s.lock().expect("answers").push(v));
        (Some(r), seen)
    }

    fn answers(seen: &Arc<Mutex<Vec<CancelVerdict>>>) -> Vec<CancelVerdict> {
        seen.lock().expect("answers").clone()
    }

    #[test]
    fn a_mark_is_taken_once_and_the_oldest_are_forgotten_beyond_the_capacity() {
        let ahead = CanceledAhead::new(2);
        assert!(ahead.take(1).is_none(), "nothing marked yet");
        ahead.remember(1, None);
        ahead.remember(1, None);
        assert_eq!(ahead.len(), 1);
        assert!(ahead.take(1).is_some());
        assert!(ahead.take(1).is_none(), "taken once only");
        for id in [2, 3, 4] {
            ahead.remember(id, None);
        }
        assert_eq!(ahead.len(), 2);
        assert!(ahead.take(2).is_none(), "the oldest is forgotten");
        assert!(ahead.take(3).is_some() && ahead.take(4).is_some());
        assert!(ahead.is_empty());
    }

    #[test]
    fn receipts_are_held_up_to_the_bound_and_the_oldest_settled_beyond_it() {
        let ahead = CanceledAhead::new(100);
        // Holding nothing: settled at once.
        let (r, seen) = receipt();
        ahead.remember(1, r);
        assert_eq!(answers(&seen), vec![CancelVerdict::Remembered]);
        ahead.hold_up_to(2);
        let (r2, seen2) = receipt();
        let (r3, seen3) = receipt();
        let (r4, seen4) = receipt();
        ahead.remember(2, r2);
        ahead.remember(3, r3);
        assert_eq!(ahead.held(), 2);
        assert!(answers(&seen2).is_empty() && answers(&seen3).is_empty());
        ahead.remember(4, r4);
        assert_eq!(
            answers(&seen2),
            vec![CancelVerdict::Remembered],
            "the oldest"
        );
        assert_eq!(ahead.held(), 2);
        // Taking a mark hands over its receipt; 2's mark lives on without one.
        let taken = ahead.take(3).expect("3 is marked");
        assert!(taken.is_some());
        assert_eq!(ahead.held(), 1);
        assert!(ahead.take(2).expect("2 is marked").is_none());
        // A second cancel for 4 replaces the receipt held; the first is settled.
        let (r4b, seen4b) = receipt();
        ahead.remember(4, r4b);
        assert_eq!(answers(&seen4), vec![CancelVerdict::Remembered]);
        assert_eq!(ahead.held(), 1);
        // A clean stop gives the held ones back and keeps the marks.
        ahead.give_back();
        assert_eq!(answers(&seen4b), vec![CancelVerdict::GivenBack]);
        assert_eq!(ahead.held(), 0);
        assert!(ahead.take(4).is_some());
        drop(taken);
        assert!(answers(&seen3).is_empty(), "3's receipt went with its mark");
    }
}
