//! In-memory implementations of the ports, for tests, benches and `durability: memory` runs
//! without edges. They do no I/O and settle every receipt at once.

use std::sync::Mutex;

use dashmap::DashMap;
use tokio::sync::mpsc;

use super::ports::{Dispatch, Dispatcher, Event, OutcomeSink, QueueStats, StatsObserver};
use crate::model::ActionRef;

/// Sends each batch of dispatches down a channel.
#[derive(Debug)]
pub struct ChannelDispatcher(mpsc::UnboundedSender<Vec<Dispatch>>);

impl ChannelDispatcher {
    pub fn new() -> (Self, mpsc::UnboundedReceiver<Vec<Dispatch>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self(tx), rx)
    }
}

impl Dispatcher for ChannelDispatcher {
    fn dispatch(&self, batch: Vec<Dispatch>) {
        // A closed receiver means the test or bench that owned it is over.
        let _ = self.0.send(batch);
    }
}

/// Settles receipts at once and keeps nothing.
#[derive(Debug, Default)]
pub struct DiscardSink;

impl OutcomeSink for DiscardSink {
    fn record(&self, events: Vec<Event>) {
        for mut e in events {
            e.settle();
        }
    }
}

/// Settles receipts at once and sends every event down a channel.
#[derive(Debug)]
pub struct ChannelSink(mpsc::UnboundedSender<Event>);

impl ChannelSink {
    pub fn new() -> (Self, mpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self(tx), rx)
    }
}

impl OutcomeSink for ChannelSink {
    fn record(&self, events: Vec<Event>) {
        for mut e in events {
            e.settle();
            let _ = self.0.send(e);
        }
    }
}

/// Keeps the latest counters of every action.
#[derive(Debug, Default)]
pub struct LatestStats(DashMap<ActionRef, QueueStats>);

impl LatestStats {
    pub fn get(&self, action: &ActionRef) -> Option<QueueStats> {
        self.0.get(action).map(|s| s.clone())
    }

    pub fn all(&self) -> Vec<QueueStats> {
        self.0.iter().map(|e| e.value().clone()).collect()
    }

    /// Calls `f` with each action's counters without copying them. Each shard of the map is
    /// read-locked while `f` runs over its entries, so `f` must be quick.
    pub fn for_each(&self, mut f: impl FnMut(&QueueStats)) {
        for e in self.0.iter() {
            f(e.value());
        }
    }

    /// Actions known, and the executions waiting and running over all of them, without
    /// copying anyone's counters.
    pub fn sums(&self) -> StatsSums {
        let mut sums = StatsSums::default();
        for e in self.0.iter() {
            sums.actions += 1;
            sums.queued += e.queue_length as u64;
            sums.running += e.active_count as u64;
        }
        sums
    }
}

/// What [`LatestStats::sums`] adds up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSums {
    pub actions: usize,
    pub queued: u64,
    pub running: u64,
}

impl StatsObserver for LatestStats {
    fn observe(&self, stats: &QueueStats) {
        match self.0.get_mut(&stats.action_ref) {
            Some(mut slot) => slot.clone_from(stats),
            None => {
                self.0.insert(stats.action_ref.clone(), stats.clone());
            }
        }
    }
}

/// Ignores counters.
#[derive(Debug, Default)]
pub struct NoStats;

impl StatsObserver for NoStats {
    fn observe(&self, _stats: &QueueStats) {}
}

/// Collects events in a vector (for tests that look at them after the fact).
#[derive(Debug, Default)]
pub struct VecSink(pub Mutex<Vec<Event>>);

impl OutcomeSink for VecSink {
    fn record(&self, events: Vec<Event>) {
        let mut kept = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for mut e in events {
            e.settle();
            kept.push(e);
        }
    }
}
