//! The operations side of the service: what monitoring and operators see and do. Nothing in
//! the core imports it; it uses the core through the [`crate::core::Executor`] handle and the
//! ports, like any other edge.
//!
//! - [`metrics`]: the Prometheus recorder, execution counters and queue gauges;
//!   [`metrics::per_action`] keeps the per-action series to the busy and recent actions.
//! - [`health`]: the periodic health check (a pure verdict function plus the task around it).
//! - [`health_report`]: what a check finds, which the check and the [`hooks`] both use.
//! - [`flags`]: the health check's rules applied to one action (the operations page's
//!   per-action health flag).
//! - [`history`]: the last 15 minutes of throughput, queue wait and totals, sampled every 5 s
//!   for the operations page's overview.
//! - [`purge`]: the periodic purge of stale queued and lost running executions.
//! - [`dlq`]: reading and replaying the dead-letter queue.
//! - [`hooks`]: seams for what the Postgres edge keeps (policies, health results, old ledger
//!   rows), with the in-memory implementations; the Postgres ones are in [`crate::db`].
//! - [`settings`]: the core's settings and configured policies from the configuration.
//! - [`reload`]: live configuration reload (SIGHUP, `POST /api/v1/admin/reload`): reads and
//!   validates again, applies what can change while running, reports the rest.
//! - [`logging`]: the log output, and the filter a reload changes.
//! - [`readiness`]: whether the service takes work yet (`GET /ready`), told to systemd through
//!   [`systemd`] (`READY=1`, `STOPPING=1`).

pub mod dlq;
pub mod flags;
pub mod health;
pub mod health_report;
pub mod history;
pub mod hooks;
pub mod logging;
pub mod metrics;
pub mod purge;
pub mod readiness;
pub mod reload;
pub mod settings;
pub mod systemd;

use tokio::sync::watch;

/// Resolves once `shutdown` turns true (or its sender is gone). The guard `wait_for` returns
/// is dropped here so it never lives across an await in a task that moves between threads.
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await.map(|_| ());
}

/// The beat of a periodic task (health checks, purge cycles) whose interval, or whether it
/// runs at all, a configuration reload can change: every change of the schedule starts the
/// beat over.
pub(crate) struct Ticker<S> {
    /// The schedule, as the task's owner last set it.
    schedule: watch::Receiver<S>,
    /// Reads the interval out of the schedule; `None`: the task does not run.
    every: fn(&S) -> Option<std::time::Duration>,
    /// The current beat; `None` until planned, and again after the schedule changed.
    ticks: Option<tokio::time::Interval>,
    /// How long after planning the first beat comes (at most one interval).
    first: std::time::Duration,
    /// `first` for every plan after a change of the schedule.
    after_change: std::time::Duration,
}

impl<S> Ticker<S> {
    /// The first beat comes `first` after the start (at most one interval), and
    /// `after_change` after each change of the schedule (`Duration::MAX`: one interval).
    pub(crate) fn new(
        schedule: watch::Receiver<S>,
        every: fn(&S) -> Option<std::time::Duration>,
        first: std::time::Duration,
        after_change: std::time::Duration,
    ) -> Self {
        Self {
            schedule,
            every,
            ticks: None,
            first,
            after_change,
        }
    }

    /// Waits for the next beat: true when the task should run now, false once `shutdown`
    /// turned true. A beat that comes while the task still runs is delayed, never doubled.
    pub(crate) async fn next(&mut self, shutdown: &mut watch::Receiver<bool>) -> bool {
        loop {
            if self.ticks.is_none() {
                let every = (self.every)(&self.schedule.borrow_and_update());
                if let Some(interval) = every {
                    let start = tokio::time::Instant::now() + self.first.min(interval);
                    let mut ticks = tokio::time::interval_at(start, interval);
                    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    self.ticks = Some(ticks);
                }
            }
            let changed = match self.ticks.as_mut() {
                Some(ticks) => tokio::select! {
                    _ = ticks.tick() => return true,
                    changed = self.schedule.changed() => changed,
                    _ = stopped(shutdown) => return false,
                },
                None => tokio::select! {
                    changed = self.schedule.changed() => changed,
                    _ = stopped(shutdown) => return false,
                },
            };
            if changed.is_err() {
                // The owner is gone: nothing will change the schedule again, nor stop waiting.
                stopped(shutdown).await;
                return false;
            }
            self.ticks = None;
            self.first = self.after_change;
        }
    }
}

/// Runs `work` at every tick of `ticks` until `shutdown` turns true; a run still going when it
/// does is dropped. Missed ticks are delayed, so runs never overlap: one that overruns the
/// interval delays the next.
pub(crate) async fn every<F, Fut>(
    mut ticks: tokio::time::Interval,
    mut shutdown: watch::Receiver<bool>,
    mut work: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stopped(&mut shutdown) => return,
        }
        tokio::select! {
            _ = work() => {}
            _ = stopped(&mut shutdown) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::watch;
    use tokio::time::Instant;

    use super::Ticker;

    #[tokio::test(start_paused = true)]
    async fn the_ticker_beats_on_its_schedule_and_starts_over_when_it_changes() {
        let secs = Duration::from_secs;
        let (schedule, rx) = watch::channel(Some(secs(10)));
        let (stop, mut shutdown) = watch::channel(false);
        let mut ticker = Ticker::new(rx, |s: &Option<Duration>| *s, secs(2), Duration::ZERO);
        let start = Instant::now();
        assert!(ticker.next(&mut shutdown).await);
        assert_eq!(
            start.elapsed(),
            secs(2),
            "the first beat comes after `first`"
        );
        assert!(ticker.next(&mut shutdown).await);
        assert_eq!(start.elapsed(), secs(12));
        schedule.send_replace(Some(secs(3)));
        assert!(ticker.next(&mut shutdown).await);
        assert_eq!(start.elapsed(), secs(12), "after a change, `after_change`");
        assert!(ticker.next(&mut shutdown).await);
        assert_eq!(start.elapsed(), secs(15), "then the new interval");
        schedule.send_replace(None);
        tokio::select! {
            _ = ticker.next(&mut shutdown) => panic!("a beat while switched off"),
            _ = tokio::time::sleep(secs(3600)) => {}
        }
        stop.send_replace(true);
        assert!(!ticker.next(&mut shutdown).await, "false once shut down");
    }
}
