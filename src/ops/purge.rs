//! Auto-purge: every `purge.interval_seconds`, removes what has been stuck too long.
//!
//! - Executions *queued* longer than `purge.max_queued_age_seconds` leave their queue and are
//!   dead-lettered (`queue_from: queued`, `error_class: Purge`); the rest keep their order.
//!   Not in emergency mode (the core refuses, so an overload never becomes a mass purge).
//! - Executions *running* without a completion for longer than
//!   `purge.max_running_age_seconds` give their slot back (`queue_from: running`,
//!   `error_class: LostCompletion`); a completion arriving later frees nothing.
//! - The ledger's old rows go through the [`LedgerPurge`] hook (`crate::db::ops` with the
//!   Postgres ledger, nothing in memory mode): finished executions older than
//!   `purge.max_completed_age_seconds`, `queue_stats` rows of idle actions not updated for
//!   `purge.max_stale_stats_age_seconds`, `queue_snapshots` and `health_checks` older than
//!   [`HISTORY_RETENTION`] (30 days). Counted per table in `attune_purge_ledger_rows_total`.
//!
//! The removal itself is the core's ([`Executor::purge`]): each action's actor applies it
//! between two messages, so it never races a dispatch. The dead letters come from the outcome
//! sink chain (`rabbit::dead_letters`), like any other failure.
//!
//! **Cycles never overlap.** One mutex guards the cycle: the periodic task waits for it (so a
//! scheduled cycle right after a manual one still runs, later), and a manual cycle over HTTP
//! does not wait: it gets [`PurgeError::Busy`] (HTTP 409) so an operator's call never hangs for
//! the length of someone else's cycle. A dry run logs and reports what a live cycle would
//! remove and changes nothing.
//!
//! A configuration reload ([`Purger::reconfigure`]) changes the ages and `dry_run` from the
//! next cycle on, and the interval and `enabled` from the reload on: the next scheduled cycle
//! comes one interval after it.

use std::sync::Arc;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use serde::Serialize;
use tokio::sync::{Mutex, watch};

use super::hooks::{HISTORY_RETENTION, LedgerPurge, LedgerPurgeOrder, LedgerPurged};
use super::metrics::names;
use crate::config::{Config, PurgeConfig};
use crate::core::{Executor, PurgeOrder, PurgedEntry};

/// The ages a purge applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PurgeSettings {
    pub max_queued_age: Duration,
    pub max_running_age: Duration,
    pub max_completed_age: Duration,
    pub max_stale_stats_age: Duration,
    /// `queue_snapshots` and `health_checks` rows older than this go (not configurable:
    /// [`HISTORY_RETENTION`], as in the runbook).
    pub max_history_age: Duration,
}

impl PurgeSettings {
    pub fn from_config(c: &PurgeConfig) -> Self {
        Self {
            max_queued_age: Duration::from_secs(c.max_queued_age_seconds),
            max_running_age: Duration::from_secs(c.max_running_age_seconds),
            max_completed_age: Duration::from_secs(c.max_completed_age_seconds),
            max_stale_stats_age: Duration::from_secs(c.max_stale_stats_age_seconds),
            max_history_age: HISTORY_RETENTION,
        }
    }
}

/// Says so (at start, and after a reload) when the purge of queued executions can never find
/// anything, because the queue timeout removes them first: a threshold that silently does
/// nothing misleads.
pub fn note_if_shadowed(c: &Config) {
    if c.purge.enabled
        && !c.executor.emergency_mode
        && c.purge.max_queued_age_seconds >= c.executor.queue.queue_timeout_seconds
    {
        tracing::info!(
            max_queued_age_seconds = c.purge.max_queued_age_seconds,
            queue_timeout_seconds = c.executor.queue.queue_timeout_seconds,
            "[purge] purge.max_queued_age_seconds is not below executor.queue.queue_timeout_seconds: \
             queued executions time out (error_class QueueTimeout) before the purge would take \
             them; the purge still reclaims lost running executions"
        );
    }
}

/// What started a cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    Scheduled,
    Manual,
}

/// What one cycle removed (or, in a dry run, would remove).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PurgeReport {
    pub dry_run: bool,
    pub trigger: Trigger,
    pub started_at: String,
    pub duration_seconds: f64,
    /// Entries purged (or that would be): `queued` + `running`.
    pub purged: usize,
    pub queued: usize,
    pub running: usize,
    pub emergency_mode: bool,
    pub entries: Vec<PurgedEntry>,
    /// `null` when there is no ledger to purge.
    pub ledger: Option<LedgerPurged>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ledger_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PurgeError {
    #[error("a purge cycle is already running; try again when it has finished")]
    Busy,
}

/// When the periodic cycles run, and whether they only look (`purge.dry_run`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Schedule {
    /// `None`: no periodic cycles (`purge.enabled` false).
    every: Option<Duration>,
    /// What a cycle does when nobody says: the periodic ones, and a manual one over HTTP
    /// without `dry_run`.
    dry_run: bool,
}

/// Runs purge cycles, one at a time.
pub struct Purger {
    executor: Arc<Executor>,
    /// The ages; a configuration reload replaces them, for the next cycle on.
    settings: std::sync::RwLock<PurgeSettings>,
    /// Followed by [`Purger::run_scheduled`]; a configuration reload replaces it.
    schedule: watch::Sender<Schedule>,
    ledger: Arc<dyn LedgerPurge>,
    /// Held for the whole of a cycle.
    running: Mutex<()>,
}

impl Purger {
    /// No periodic cycles until [`Purger::set_schedule`] (or [`Purger::run`]) says when.
    pub fn new(
        executor: Arc<Executor>,
        settings: PurgeSettings,
        ledger: Arc<dyn LedgerPurge>,
    ) -> Self {
        Self {
            executor,
            settings: std::sync::RwLock::new(settings),
            schedule: watch::channel(Schedule {
                every: None,
                dry_run: false,
            })
            .0,
            ledger,
            running: Mutex::new(()),
        }
    }

    pub fn settings(&self) -> PurgeSettings {
        *self.settings.read().unwrap_or_else(|p| p.into_inner())
    }

    /// `purge.dry_run`: what a cycle does when its caller does not say.
    pub fn dry_run_by_default(&self) -> bool {
        self.schedule.borrow().dry_run
    }

    /// Periodic cycles every `every` (none when `None`), each a dry run if `dry_run`. A
    /// changed interval counts from now: the next cycle comes one interval later, never at
    /// once (a reload must not double as a purge).
    pub fn set_schedule(&self, every: Option<Duration>, dry_run: bool) {
        self.schedule.send_if_modified(|s| {
            let new = Schedule { every, dry_run };
            let replan = s.every != every;
            *s = new;
            replan
        });
    }

    /// New settings from a configuration reload, in force from the next cycle on (one in
    /// progress finishes with the old ones).
    pub fn reconfigure(&self, settings: PurgeSettings, every: Option<Duration>, dry_run: bool) {
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) = settings;
        self.set_schedule(every, dry_run);
    }

    /// Runs a cycle, after the one in progress if there is one.
    pub async fn run_cycle(&self, dry_run: bool, trigger: Trigger) -> PurgeReport {
        let _one_at_a_time = self.running.lock().await;
        self.cycle(dry_run, trigger).await
    }

    /// Runs a cycle now, or refuses if one is in progress.
    pub async fn try_run_cycle(&self, dry_run: bool) -> Result<PurgeReport, PurgeError> {
        let _one_at_a_time = self.running.try_lock().map_err(|_| PurgeError::Busy)?;
        Ok(self.cycle(dry_run, Trigger::Manual).await)
    }

    async fn cycle(&self, dry_run: bool, trigger: Trigger) -> PurgeReport {
        let tag = if dry_run {
            "[purge][dry-run]"
        } else {
            "[purge]"
        };
        let started = tokio::time::Instant::now();
        let started_at = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
        let settings = self.settings();
        let emergency_mode = self.executor.settings().emergency_mode;
        tracing::info!(?trigger, "{tag} Starting stale queue entry purge cycle");
        if emergency_mode {
            tracing::info!(
                "{tag} Emergency mode: queued executions are not purged for their age, only \
                 lost running ones"
            );
        }
        let entries = self
            .executor
            .purge(PurgeOrder {
                max_queued_age: Some(settings.max_queued_age),
                max_running_age: Some(settings.max_running_age),
                dry_run,
            })
            .await;
        for e in &entries {
            log_entry(e, dry_run);
        }
        let (ledger, ledger_error) = match self
            .ledger
            .purge(LedgerPurgeOrder {
                max_completed_age: settings.max_completed_age,
                max_stale_stats_age: settings.max_stale_stats_age,
                max_history_age: settings.max_history_age,
                dry_run,
            })
            .await
        {
            Ok(l) => (l, None),
            Err(e) => {
                tracing::error!(error = %e, "{tag} Ledger purge failed");
                (None, Some(e.to_string()))
            }
        };
        let queued = entries.iter().filter(|e| e.state == "queued").count();
        let running = entries.len() - queued;
        let took = started.elapsed().as_secs_f64();
        let mode = if dry_run { "dry_run" } else { "live" };
        metrics::gauge!(names::PURGE_CYCLE_SECONDS).set(took);
        metrics::counter!(names::PURGE_CYCLES_TOTAL, "mode" => mode).increment(1);
        for (state, n) in [("queued", queued), ("running", running)] {
            if n > 0 {
                metrics::counter!(names::PURGE_ENTRIES_TOTAL, "state" => state, "mode" => mode)
                    .increment(n as u64);
            }
        }
        if let Some(l) = &ledger {
            log_ledger(&settings, l, dry_run);
            for (table, n) in l.by_table() {
                if n > 0 {
                    metrics::counter!(names::PURGE_LEDGER_ROWS_TOTAL, "table" => table, "mode" => mode)
                        .increment(n);
                }
            }
        }
        let ledger_note = ledger.map_or(String::new(), |l| {
            format!(
                " (ledger: {} finished executions, {} stale stats rows, {} snapshots, {} health \
                 checks)",
                l.completed_executions, l.stale_stats, l.old_snapshots, l.old_health_checks
            )
        });
        if dry_run {
            tracing::info!(
                "{tag} Completed purge cycle in {took:.2}s: {} entries would be purged{ledger_note}",
                entries.len()
            );
        } else {
            tracing::info!(
                "{tag} Completed purge cycle in {took:.2}s: {} entries purged{ledger_note}",
                entries.len()
            );
        }
        PurgeReport {
            dry_run,
            trigger,
            started_at,
            duration_seconds: took,
            purged: entries.len(),
            queued,
            running,
            emergency_mode,
            entries,
            ledger,
            ledger_error,
        }
    }

    /// Runs a cycle every `interval` until `shutdown` turns true (see
    /// [`Purger::run_scheduled`]).
    pub async fn run(
        self: Arc<Self>,
        interval: Duration,
        dry_run: bool,
        shutdown: watch::Receiver<bool>,
    ) {
        self.set_schedule(Some(interval), dry_run);
        self.run_scheduled(shutdown).await;
    }

    /// Runs cycles as the schedule says until `shutdown` turns true: every
    /// `purge.interval_seconds`, the first one interval after start (not at once: a restart
    /// must not double as a purge), none while `purge.enabled` is false. A cycle in progress
    /// when shutdown comes is finished, so the core is never left halfway.
    pub async fn run_scheduled(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut ticker = super::Ticker::new(
            self.schedule.subscribe(),
            |s: &Schedule| s.every,
            Duration::MAX,
            Duration::MAX,
        );
        while ticker.next(&mut shutdown).await {
            self.run_cycle(self.dry_run_by_default(), Trigger::Scheduled)
                .await;
        }
    }
}

/// One line per kind of ledger row that was (or would be) deleted, with its age limit.
fn log_ledger(st: &PurgeSettings, l: &LedgerPurged, dry_run: bool) {
    for (what, n, limit) in [
        (
            "finished executions",
            l.completed_executions,
            st.max_completed_age,
        ),
        (
            "idle queue_stats rows",
            l.stale_stats,
            st.max_stale_stats_age,
        ),
        ("queue_snapshots rows", l.old_snapshots, st.max_history_age),
        (
            "health_checks rows",
            l.old_health_checks,
            st.max_history_age,
        ),
    ] {
        let max = limit.as_secs();
        match (n, dry_run) {
            (0, _) => {}
            (_, true) => tracing::info!(
                "[purge][dry-run] Would purge {n} {what} from the ledger (age over max: {max}s)"
            ),
            (_, false) => {
                tracing::info!("[purge] Purged {n} {what} from the ledger (age over max: {max}s)")
            }
        }
    }
}

impl std::fmt::Debug for Purger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Purger")
            .field("settings", &self.settings())
            .finish()
    }
}

fn log_entry(e: &PurgedEntry, dry_run: bool) {
    let (id, action) = (e.execution_id, e.action_ref.as_str());
    // Whole seconds, rounded down: "age: 7250s, max: 7200s" reads at a glance.
    let (age, max) = (e.age_seconds as u64, e.limit_seconds as u64);
    match (e.state, dry_run) {
        ("queued", true) => tracing::info!(
            "[purge][dry-run] Would purge stale queued execution {id} of '{action}' (age: {age}s, max: {max}s)"
        ),
        ("queued", false) => tracing::warn!(
            "[purge] Purged stale queued execution {id} of '{action}' to the DLQ (age: {age}s, max: {max}s)"
        ),
        (_, true) => tracing::info!(
            "[purge][dry-run] Would reclaim the slot of running execution {id} of '{action}' (age: {age}s, max: {max}s)"
        ),
        (_, false) => tracing::warn!(
            "[purge] Reclaimed the slot of running execution {id} of '{action}', no completion came (age: {age}s, max: {max}s)"
        ),
    }
}
