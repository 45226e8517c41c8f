//! Acknowledging deliveries without a round trip each.
//!
//! A delivery is tracked when it arrives and settled whenever its outcome is safe (the
//! executor's receipt, or a dead letter's confirm), in any order. One task per channel turns
//! settlements into as few frames as possible: a single `basic.ack` with `multiple` covers every
//! settled tag below the lowest one still outstanding, and a requeue is sent at once on its own.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};

use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio::sync::{Notify, mpsc};

enum Settle {
    Ack(u64),
    /// Give the message back to the broker (only when the executor is shutting down).
    Requeue(u64),
}

/// Handle for one channel's deliveries. Cheap to clone; settling after the channel is gone
/// does nothing (the broker redelivers those messages anyway).
#[derive(Clone)]
pub struct Acks {
    tx: mpsc::UnboundedSender<Settle>,
    state: Arc<AckState>,
}

struct AckState {
    /// Delivered and not yet acknowledged to the broker.
    outstanding: Mutex<BTreeSet<u64>>,
    /// Woken whenever `outstanding` shrinks, for shutdown's "wait until settled".
    drained: Notify,
}

impl AckState {
    fn outstanding(&self) -> MutexGuard<'_, BTreeSet<u64>> {
        self.outstanding.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Acks {
    /// Starts the ack task for a channel.
    pub fn spawn(channel: Channel) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let state = Arc::new(AckState {
            outstanding: Mutex::new(BTreeSet::new()),
            drained: Notify::new(),
        });
        let task = tokio::spawn(run(channel, rx, state.clone()));
        (Self { tx, state }, task)
    }

    /// Records a delivery that must be settled.
    pub fn track(&self, tag: u64) {
        self.state.outstanding().insert(tag);
    }

    pub fn ack(&self, tag: u64) {
        let _ = self.tx.send(Settle::Ack(tag));
    }

    pub fn requeue(&self, tag: u64) {
        let _ = self.tx.send(Settle::Requeue(tag));
    }

    /// Deliveries not yet acknowledged.
    pub fn outstanding(&self) -> usize {
        self.state.outstanding().len()
    }

    /// Waits until every tracked delivery is acknowledged (or the timeout passes).
    pub async fn settled(&self, timeout: std::time::Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.state.drained.notified();
                if self.outstanding() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }
}

async fn run(channel: Channel, mut rx: mpsc::UnboundedReceiver<Settle>, state: Arc<AckState>) {
    // Settled with an ack but not yet covered by a `multiple` ack.
    let mut ready: BTreeSet<u64> = BTreeSet::new();
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(s) => batch.push(s),
                Err(_) => break,
            }
        }
        for s in batch {
            match s {
                Settle::Ack(tag) => {
                    ready.insert(tag);
                }
                Settle::Requeue(tag) => {
                    let opts = BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    };
                    if channel.basic_nack(tag, opts).await.is_err() {
                        return;
                    }
                    state.outstanding().remove(&tag);
                }
            }
        }
        // Everything settled below the lowest tag still outstanding goes in one frame.
        let upto = {
            let mut outstanding = state.outstanding();
            let lowest_open = outstanding
                .iter()
                .find(|t| !ready.contains(t))
                .copied()
                .unwrap_or(u64::MAX);
            let upto = ready.range(..lowest_open).next_back().copied();
            if let Some(upto) = upto {
                let covered: Vec<u64> = ready.range(..=upto).copied().collect();
                for t in &covered {
                    outstanding.remove(t);
                    ready.remove(t);
                }
                // Deliveries per frame is how well the batching works (BENCHMARKS.md).
                metrics::counter!("attune_rabbitmq_acks_total", "kind" => "frame").increment(1);
                metrics::counter!("attune_rabbitmq_acks_total", "kind" => "delivery")
                    .increment(covered.len() as u64);
            }
            upto
        };
        if let Some(upto) = upto {
            if channel
                .basic_ack(upto, BasicAckOptions { multiple: true })
                .await
                .is_err()
            {
                return;
            }
            state.drained.notify_waiters();
        }
    }
}
