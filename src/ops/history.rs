//! The last 15 minutes of throughput and queue wait, for the operations page's overview
//! (`GET /api/v1/overview`).
//!
//! One task ([`Sampler::run`], started by the service) takes a [`Sample`] every
//! [`SAMPLE_INTERVAL`] and keeps the last [`HISTORY_SAMPLES`] in a ring. A sample costs one
//! pass over the latest counters of every action ([`LatestStats::sums`], never a message to an
//! actor) and at most one DLQ size reading; the overview serves the latest sample, so a page
//! request costs neither.
//!
//! What a sample holds:
//! - `dispatched_per_second` and `completed_per_second`: admissions and worker completions
//!   since the previous sample (the executor's totals, [`crate::core::totals`]) over the time
//!   between the two; 0 in the first sample.
//! - `queue_wait_mean_seconds` and `queue_wait_max_seconds`: over the executions admitted
//!   since the previous sample; `null` when none was.
//! - `queued`, `running` and `actions`: what every action last reported, at the sample.
//! - `dlq_size`: messages ready in `attune.dlq`, read with each sample within
//!   [`DLQ_READ_TIMEOUT`] (the DLQ's operations share one lock, so a long replay can hold it);
//!   `null` when `dlq.enabled` is false (as last loaded) or the reading failed.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use super::dlq::Dlq;
use crate::core::Executor;
use crate::core::memory::LatestStats;
use crate::core::totals::TotalsSnapshot;

/// Time between two samples.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);
/// Samples kept: 15 minutes at [`SAMPLE_INTERVAL`].
pub const HISTORY_SAMPLES: usize = 180;
/// Longest a sample waits for the DLQ size.
pub const DLQ_READ_TIMEOUT: Duration = Duration::from_secs(3);

/// One moment of the history.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    #[serde(serialize_with = "rfc3339")]
    pub at: DateTime<Utc>,
    pub dispatched_per_second: f64,
    pub completed_per_second: f64,
    pub queued: u64,
    pub running: u64,
    pub queue_wait_mean_seconds: Option<f64>,
    pub queue_wait_max_seconds: Option<f64>,
    /// Not part of the history the overview serves (see [`Sampler::history`]); the latest
    /// sample's values are its totals.
    #[serde(skip)]
    pub actions: usize,
    #[serde(skip)]
    pub dlq_size: Option<u64>,
}

fn rfc3339<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Secs, true))
}

/// The counters at the previous sample.
#[derive(Debug, Clone, Copy)]
struct Previous {
    at: Instant,
    totals: TotalsSnapshot,
}

/// Takes the samples and keeps the ring.
pub struct Sampler {
    executor: Arc<Executor>,
    stats: Arc<LatestStats>,
    /// `None` when `dlq.enabled` is false.
    dlq: Option<Arc<Dlq>>,
    /// The samples, oldest first, and the counters of the last one. One lock, so two samples
    /// taken at once (the task and a first overview request) cannot interleave.
    ring: Mutex<(VecDeque<Sample>, Option<Previous>)>,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler").finish_non_exhaustive()
    }
}

impl Sampler {
    pub fn new(executor: Arc<Executor>, stats: Arc<LatestStats>, dlq: Option<Arc<Dlq>>) -> Self {
        Self {
            executor,
            stats,
            dlq,
            ring: Mutex::new((VecDeque::with_capacity(HISTORY_SAMPLES), None)),
        }
    }

    /// Takes one sample now and keeps it.
    pub async fn sample(&self) -> Sample {
        let dlq_size = match self.dlq.as_ref().filter(|d| d.is_enabled()) {
            None => None,
            Some(dlq) => match tokio::time::timeout(DLQ_READ_TIMEOUT, dlq.size()).await {
                Ok(Ok(n)) => Some(n),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "[history] could not read the DLQ size");
                    None
                }
                Err(_) => None,
            },
        };
        let sums = self.stats.sums();
        let clock = self.executor.clock();
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        // Read under the lock, so that consecutive samples' counters are in order.
        let now = Instant::now();
        let totals = self.executor.totals();
        let longest = self.executor.take_longest_wait();
        let (samples, previous) = &mut *ring;
        let (dispatched, completed, waited_micros, seconds) = match previous {
            Some(p) => (
                totals.admitted.saturating_sub(p.totals.admitted),
                totals.completed.saturating_sub(p.totals.completed),
                totals.waited_micros.saturating_sub(p.totals.waited_micros),
                now.saturating_duration_since(p.at).as_secs_f64(),
            ),
            None => (0, 0, 0, 0.0),
        };
        let per_second = |n: u64| {
            if seconds > 0.0 {
                n as f64 / seconds
            } else {
                0.0
            }
        };
        let sample = Sample {
            at: clock.wall(clock.now()),
            dispatched_per_second: per_second(dispatched),
            completed_per_second: per_second(completed),
            queued: sums.queued,
            running: sums.running,
            queue_wait_mean_seconds: (dispatched > 0)
                .then(|| waited_micros as f64 / 1e6 / dispatched as f64),
            queue_wait_max_seconds: (dispatched > 0).then_some(longest.as_secs_f64()),
            actions: sums.actions,
            dlq_size,
        };
        *previous = Some(Previous { at: now, totals });
        if samples.len() == HISTORY_SAMPLES {
            samples.pop_front();
        }
        samples.push_back(sample.clone());
        sample
    }

    /// The latest sample; taken now if there is none yet (the task has not run).
    pub async fn latest(&self) -> Sample {
        let latest = self
            .ring
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .back()
            .cloned();
        match latest {
            Some(s) => s,
            None => self.sample().await,
        }
    }

    /// Every sample kept, oldest first.
    pub fn history(&self) -> Vec<Sample> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.0.iter().cloned().collect()
    }

    /// Samples every `interval`, the first at once, until `shutdown` turns true.
    pub async fn run(self: Arc<Self>, interval: Duration, shutdown: watch::Receiver<bool>) {
        super::every(tokio::time::interval(interval), shutdown, || async {
            self.sample().await;
        })
        .await;
    }
}
