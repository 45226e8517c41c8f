//! The actions whose dispatches come back unrouted: set by their actors, read by the
//! registry for every delivered dispatch.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::model::ActionRef;

/// The actions whose dispatches the broker returns (no worker queue bound), kept by their
/// actors so that the publisher can tell, cheaply, whether a delivered dispatch is news.
#[derive(Default)]
pub struct Unroutable {
    actions: dashmap::DashSet<ActionRef>,
    /// Entries in `actions`, read without touching the set while it is empty (always, in a
    /// healthy deployment).
    len: AtomicU64,
}

impl Unroutable {
    /// Marks the action as returned (`true`) or delivered (`false`).
    pub fn set(&self, action: &ActionRef, returned: bool) {
        if returned {
            if self.actions.insert(action.clone()) {
                self.len.fetch_add(1, Ordering::AcqRel);
            }
        } else if self.actions.remove(action).is_some() {
            self.len.fetch_sub(1, Ordering::AcqRel);
        }
    }

    pub fn contains(&self, action: &ActionRef) -> bool {
        self.len.load(Ordering::Acquire) > 0 && self.actions.contains(action)
    }
}
