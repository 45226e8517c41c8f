//! Live configuration reload: `kill -HUP <pid>` and `POST /api/v1/admin/reload`.
//!
//! A reload reads the config file and the `ATTUNE__` variables again and validates them
//! exactly as start-up does ([`Config::load`]). The variables are the process's own
//! environment, which nothing outside can change while it runs: a reload sees the values it
//! started with, so in practice only the file changes anything (a systemd `EnvironmentFile`
//! edited since the start is read at the next restart, not by a reload).
//!
//! - **Invalid** (unreadable file, bad YAML, unknown key, impossible value): nothing changes;
//!   the answer is the message start-up would print (HTTP 400 for the API, an error line in
//!   the log for SIGHUP).
//! - Otherwise the keys that can change while running are applied
//!   ([`crate::config::with_live_changes`] says which) and every other changed key is
//!   reported as needing a restart, its old value staying in force. The result is `applied`
//!   when at least one key was applied, `unchanged` when none was.
//!
//! What applying does, per key:
//! - `policies.*` (and `executor.emergency_mode`, which lifts rate limits): the configured
//!   layer of the policies is replaced and the executor follows it with the same precedence as
//!   at start (see [`PolicyStore::reconcile`]): with the ledger, a policy set over HTTP (a
//!   pinned `action` row) keeps winning, and a row's own columns keep theirs; in memory mode a
//!   policy set over HTTP stays until the restart that would lose it anyway.
//! - `executor.queue.{max_queue_length, queue_timeout_seconds, no_route_retry_ms,
//!   no_route_timeout_seconds, passivate_after_seconds}` and `executor.emergency_mode`: every
//!   action actor gets the new
//!   settings in its mailbox ([`Executor::set_settings`]), actors started later start with
//!   them.
//! - `health.*`: thresholds, interval and on/off; the next check runs at once.
//! - `purge.*`: ages, dry run, interval and on/off, from the next cycle (the next scheduled one
//!   comes one interval after the reload).
//! - `dlq.enabled`: publishing dead letters and reading the DLQ, at once ([`DlqSwitch`]).
//! - `executor.queue.metrics_idle_after_seconds`: from the next scrape of `/metrics`.
//! - `logging.filter`: the process's log filter, unless `RUST_LOG` chose it at start.
//!
//! Reloads are serialised: one holds the configuration in force from reading the file to the
//! last change applied. The answer ([`ReloadReport`]) is kept for `GET /api/v1/config/status`
//! and counted in `attune_config_reloads_total{result}`;
//! `attune_config_last_reload_timestamp_seconds` is when the configuration in force was last
//! read successfully (at start, then by every reload that was not invalid).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Serialize, Serializer};

use super::health::HealthMonitor;
use super::hooks::PolicyStore;
use super::logging::{FilterChange, LogFilter};
use super::metrics::{Metrics, names};
use super::purge::{PurgeSettings, Purger};
use super::settings::{ConfigPolicies, queue_settings};
use crate::config::{Config, ConfigChange, ConfigError};
use crate::core::Executor;
use crate::rabbit::dead_letters::DlqSwitch;

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// SIGHUP.
    Signal,
    /// `POST /api/v1/admin/reload`.
    Api,
}

/// How a reload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReloadResult {
    /// At least one key changed and is in force now.
    Applied,
    /// Nothing that can change while running changed (keys that need a restart may have).
    Unchanged,
    /// The configuration read does not load or validate; nothing changed.
    Invalid,
}

impl ReloadResult {
    fn as_str(self) -> &'static str {
        match self {
            ReloadResult::Applied => "applied",
            ReloadResult::Unchanged => "unchanged",
            ReloadResult::Invalid => "invalid",
        }
    }
}

/// The answer of one reload (`data` of `POST /api/v1/admin/reload`, `last_reload` of
/// `GET /api/v1/config/status`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReloadReport {
    pub result: ReloadResult,
    pub trigger: Trigger,
    /// When this reload ran.
    #[serde(serialize_with = "rfc3339")]
    pub attempted_at: DateTime<Utc>,
    /// When the configuration in force was read: this reload's time unless it was invalid.
    #[serde(serialize_with = "rfc3339")]
    pub loaded_at: DateTime<Utc>,
    /// Dotted keys whose new values are in force now.
    pub applied: Vec<String>,
    /// Dotted keys that changed but keep their old values until a restart.
    pub needs_restart: Vec<String>,
    /// What an operator should know about how it went: a key applied with no effect
    /// (`logging.filter` under `RUST_LOG`), a part that could not be applied at once.
    pub notes: Vec<String>,
    /// Why the configuration was refused (`invalid`): the message start-up would print.
    pub error: Option<String>,
}

/// `data` of `GET /api/v1/config/status`. Holds no value of the configuration, so no secret.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConfigStatus {
    /// The config file as given to `serve --config`; `null` without one.
    pub path: Option<String>,
    /// False for a service given a configuration built in code (tests): nothing to re-read.
    pub reloadable: bool,
    /// When the configuration in force was read (at start, or by the last reload that was not
    /// invalid).
    #[serde(serialize_with = "rfc3339")]
    pub loaded_at: DateTime<Utc>,
    /// The last reload's answer; `null` before the first.
    pub last_reload: Option<ReloadReport>,
}

fn rfc3339<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

/// A reload asked of a service that was not started from a file and the environment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "this service was started with a configuration built in code, not read from a file and \
     the environment, so there is nothing to read again"
)]
pub struct NotReloadable;

/// What a reload changes in a running service.
pub struct LiveTargets {
    pub executor: Arc<Executor>,
    /// The configured layer of the policies.
    pub config_policies: Arc<ConfigPolicies>,
    /// Makes the executor follow the new configured layer, keeping what operators set.
    pub policies: Arc<dyn PolicyStore>,
    pub health: Arc<HealthMonitor>,
    pub purger: Arc<Purger>,
    pub dlq: DlqSwitch,
    /// `None` when `executor.queue.enable_metrics` is false.
    pub metrics: Option<Metrics>,
}

/// Where the configuration comes from.
#[derive(Debug)]
enum Source {
    /// `serve --config <path>` (or no file: the built-in defaults), and the environment.
    File(Option<PathBuf>),
    /// Built in code and handed to the service.
    Given,
}

/// Reads the configuration again on request, applies it, and remembers how that went. One
/// per process: it outlives a service that starts over (`cluster.mode: shared`), which
/// [attaches](Reloader::attach) what it runs each time it starts.
pub struct Reloader {
    source: Source,
    /// The configuration in force. Held for the whole of a reload, which serialises them.
    in_force: tokio::sync::Mutex<Config>,
    /// When `in_force` was read, and the last reload's answer: read without waiting for a
    /// reload in progress.
    status: RwLock<(DateTime<Utc>, Option<ReloadReport>)>,
    /// The running service's parts; `None` while no service runs.
    targets: Mutex<Option<Arc<LiveTargets>>>,
    /// The log filter, when the process set up its own logging.
    log: Option<LogFilter>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("source", &self.source)
            .finish()
    }
}

/// Longest the policies may take to follow a reload (the `action` table's poller may hold
/// them for one read of the table).
const RECONCILE_TIMEOUT: Duration = Duration::from_secs(15);

impl Reloader {
    /// Loads the configuration as start-up does: `path` (built-in defaults when `None`) and
    /// the `ATTUNE__` variables, validated.
    pub fn from_file(path: Option<&Path>) -> Result<Self, ConfigError> {
        let config = Config::load(path)?;
        Ok(Self::new(Source::File(path.map(Path::to_path_buf)), config))
    }

    /// For a configuration built in code: the status says when it was given; reloading is
    /// refused with [`NotReloadable`].
    pub fn given(config: Config) -> Self {
        Self::new(Source::Given, config)
    }

    fn new(source: Source, config: Config) -> Self {
        Self {
            source,
            in_force: tokio::sync::Mutex::new(config),
            status: RwLock::new((Utc::now(), None)),
            targets: Mutex::new(None),
            log: None,
        }
    }

    /// Changes `logging.filter` through `log` on reloads.
    pub fn with_log_filter(mut self, log: Option<LogFilter>) -> Self {
        self.log = log;
        self
    }

    /// The configuration in force: the one read at start with every live change since.
    pub async fn in_force(&self) -> Config {
        self.in_force.lock().await.clone()
    }

    /// Where the configuration comes from, when it was read, and the last reload.
    pub fn status(&self) -> ConfigStatus {
        let (loaded_at, last_reload) = self
            .status
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (path, reloadable) = match &self.source {
            Source::File(path) => (path.as_ref().map(|p| p.display().to_string()), true),
            Source::Given => (None, false),
        };
        ConfigStatus {
            path,
            reloadable,
            loaded_at,
            last_reload,
        }
    }

    /// Reloads apply to `targets` from now on (a service started, built from `built_from`).
    /// A reload that came while the service was starting has changed only the configuration
    /// in force; what it changed is applied to `targets` now. Exports the reload metrics: the
    /// counters at 0 for every result, and when the configuration in force was read.
    pub async fn attach(&self, targets: LiveTargets, built_from: &Config) {
        // Held while attaching, so a reload comes either wholly before or wholly after.
        let in_force = self.in_force.lock().await;
        *self.targets.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(targets));
        if *in_force != *built_from {
            let mut notes = Vec::new();
            self.apply(built_from, &in_force, &mut notes).await;
            tracing::info!("[config] applied what a reload during the start changed");
            for note in notes {
                tracing::warn!("[config] {note}");
            }
        }
        for result in [
            ReloadResult::Applied,
            ReloadResult::Unchanged,
            ReloadResult::Invalid,
        ] {
            metrics::counter!(names::CONFIG_RELOADS_TOTAL, "result" => result.as_str())
                .increment(0);
        }
        let loaded_at = self.status.read().unwrap_or_else(|p| p.into_inner()).0;
        set_loaded_gauge(loaded_at);
    }

    /// The service stopped: reloads change only the configuration in force (which its next
    /// start uses) and the log filter.
    pub fn detach(&self) {
        self.targets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }

    /// Reads the configuration again and applies what can change while running; logs the
    /// outcome. Waits for a reload in progress to finish first.
    pub async fn reload(&self, trigger: Trigger) -> Result<ReloadReport, NotReloadable> {
        let Source::File(path) = &self.source else {
            return Err(NotReloadable);
        };
        let mut in_force = self.in_force.lock().await;
        let attempted_at = Utc::now();
        // File reads block; a slow disk must not hold up a runtime thread.
        let path = path.clone();
        let loaded = tokio::task::spawn_blocking(move || Config::load(path.as_deref()))
            .await
            .unwrap_or_else(|e| {
                Err(ConfigError::Syntax {
                    file: "(the configuration)".to_owned(),
                    message: format!("reading it failed: {e}"),
                })
            });
        let report = match loaded {
            Err(e) => ReloadReport {
                result: ReloadResult::Invalid,
                trigger,
                attempted_at,
                loaded_at: self.status.read().unwrap_or_else(|p| p.into_inner()).0,
                applied: Vec::new(),
                needs_restart: Vec::new(),
                notes: Vec::new(),
                error: Some(e.to_string()),
            },
            Ok(loaded) => {
                let change = ConfigChange::between(&in_force, &loaded);
                let mut notes = Vec::new();
                if !change.applied.is_empty() {
                    self.apply(&in_force, &change.in_force, &mut notes).await;
                    *in_force = change.in_force;
                }
                ReloadReport {
                    result: if change.applied.is_empty() {
                        ReloadResult::Unchanged
                    } else {
                        ReloadResult::Applied
                    },
                    trigger,
                    attempted_at,
                    loaded_at: attempted_at,
                    applied: change.applied,
                    needs_restart: change.needs_restart,
                    notes,
                    error: None,
                }
            }
        };
        *self.status.write().unwrap_or_else(|p| p.into_inner()) =
            (report.loaded_at, Some(report.clone()));
        metrics::counter!(names::CONFIG_RELOADS_TOTAL, "result" => report.result.as_str())
            .increment(1);
        set_loaded_gauge(report.loaded_at);
        log(&report);
        Ok(report)
    }

    /// Puts `now` in force where `was` was.
    async fn apply(&self, was: &Config, now: &Config, notes: &mut Vec<String>) {
        if was.logging.filter != now.logging.filter {
            match self.log.as_ref().map(|l| l.set(&now.logging.filter)) {
                Some(Ok(FilterChange::Applied)) => {}
                Some(Ok(FilterChange::KeptRustLog)) => notes.push(
                    "logging.filter: RUST_LOG is set and wins over logging.filter, as it did at \
                     start (a running process's environment cannot change)"
                        .to_owned(),
                ),
                Some(Err(e)) => notes.push(e),
                None => notes.push(
                    "logging.filter: this process's logging was not set up by `fifo-executor \
                     serve`, so its filter is unchanged"
                        .to_owned(),
                ),
            }
        }
        let targets = self
            .targets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(t) = targets else {
            notes.push(
                "the service is starting (or starting over); it takes the new values as soon \
                 as it runs"
                    .to_owned(),
            );
            return;
        };
        t.dlq.set(now.dlq.enabled);
        if let Some(m) = &t.metrics {
            m.set_idle_after(Duration::from_secs(
                now.executor.queue.metrics_idle_after_seconds,
            ));
        }
        if queue_settings(was) != queue_settings(now) {
            t.executor.set_settings(queue_settings(now));
        }
        metrics::gauge!(names::EMERGENCY_MODE).set(if now.executor.emergency_mode {
            1.0
        } else {
            0.0
        });
        let emergency_changed = was.executor.emergency_mode != now.executor.emergency_mode;
        if was.policies != now.policies || emergency_changed {
            t.config_policies.replace(now.clone());
            match tokio::time::timeout(RECONCILE_TIMEOUT, t.policies.reconcile(&t.executor)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => notes.push(format!("policies: {e}")),
                Err(_) => notes.push(format!(
                    "policies: not all applied within {RECONCILE_TIMEOUT:?}; the action \
                     table's poller applies them with its next poll"
                )),
            }
        }
        if was.health != now.health || emergency_changed {
            t.health.reconfigure(
                now.health.thresholds.clone(),
                now.executor.emergency_mode,
                now.health
                    .enabled
                    .then(|| Duration::from_secs(now.health.interval_seconds)),
            );
        }
        if was.purge != now.purge {
            t.purger.reconfigure(
                PurgeSettings::from_config(&now.purge),
                now.purge
                    .enabled
                    .then(|| Duration::from_secs(now.purge.interval_seconds)),
                now.purge.dry_run,
            );
        }
        super::purge::note_if_shadowed(now);
    }
}

fn set_loaded_gauge(loaded_at: DateTime<Utc>) {
    metrics::gauge!(names::CONFIG_LAST_RELOAD_TIMESTAMP_SECONDS)
        .set(loaded_at.timestamp_millis() as f64 / 1e3);
}

/// One line for the outcome, at error level when the configuration was refused, and one
/// warning per note and for the keys that wait for a restart.
fn log(report: &ReloadReport) {
    let trigger = report.trigger;
    match report.result {
        ReloadResult::Invalid => tracing::error!(
            ?trigger,
            "[config] reload refused, nothing changed: {}",
            report.error.as_deref().unwrap_or("")
        ),
        ReloadResult::Applied => tracing::info!(
            ?trigger,
            applied = ?report.applied,
            "[config] reloaded: {} changed keys applied",
            report.applied.len()
        ),
        ReloadResult::Unchanged => {
            tracing::info!(?trigger, "[config] reloaded: nothing to apply")
        }
    }
    if !report.needs_restart.is_empty() {
        tracing::warn!(
            needs_restart = ?report.needs_restart,
            "[config] changed keys that keep their old values until a restart"
        );
    }
    for note in &report.notes {
        tracing::warn!("[config] {note}");
    }
}

/// Reloads on every SIGHUP until the process ends (several signals during one reload make one
/// more reload). Installed at once, so a SIGHUP no longer ends the process.
#[cfg(unix)]
pub fn reload_on_hangup(reloader: Arc<Reloader>) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            // The outcome is logged by `reload`.
            if let Err(e) = reloader.reload(Trigger::Signal).await {
                tracing::error!("[config] SIGHUP: {e}");
            }
        }
    }))
}
