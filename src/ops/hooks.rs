//! Seams for what the Postgres edge stores: operator policies, health results, and the purge of
//! old ledger rows. Each has an in-memory (no-op) implementation, which the service uses with
//! `executor.durability: memory`; with `ledger` it uses the Postgres ones in
//! [`crate::db::policies`] and [`crate::db::ops`] (see `app::Hooks`).
//!
//! The traits return boxed futures rather than using `async fn`, because the service holds
//! them as `Arc<dyn …>` and `async fn` in a trait cannot be called through `dyn`.

use std::time::Duration;

use futures::future::BoxFuture;

use super::health_report::HealthReport;
use crate::core::{ActionPolicy, Executor, PolicyPatch};
use crate::model::ActionRef;

/// A store refused or failed; the message is for the operator (it is returned in the HTTP
/// error body), so it must not contain secrets.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct HookError(pub String);

/// Sets policies over HTTP: merges a change of some of a policy's fields into the policy in
/// force, stores the result so that it survives a restart, then applies it to the executor and
/// returns it. The three steps are the store's, so that a store which has other writers of the
/// same policies (the `action`-table poller, an operator's `UPDATE`) can merge with the latest
/// of them and keep them in step. If storing fails, nothing changes.
pub trait PolicyStore: Send + Sync + 'static {
    fn apply<'a>(
        &'a self,
        executor: &'a Executor,
        action: &'a ActionRef,
        patch: PolicyPatch,
    ) -> BoxFuture<'a, Result<ActionPolicy, HookError>>;

    /// After the configured policies changed (a reload), makes the executor follow them with
    /// the same precedence as at start. By default, for a store that keeps nothing but the
    /// executor's own record of what was set over HTTP: that stays in force (until a restart),
    /// everything else follows the configuration.
    fn reconcile<'a>(&'a self, executor: &'a Executor) -> BoxFuture<'a, Result<(), HookError>> {
        Box::pin(async move {
            executor.follow_policy_source(true);
            Ok(())
        })
    }
}

/// Keeps policies in memory only (the executor's overrides), i.e. until the next restart.
#[derive(Debug, Default)]
pub struct NoPolicyStore {
    /// Held from reading the policy in force to setting the merged one, so two changes at
    /// once cannot each merge into the same old policy and lose the other's fields.
    merging: std::sync::Mutex<()>,
}

impl PolicyStore for NoPolicyStore {
    fn apply<'a>(
        &'a self,
        executor: &'a Executor,
        action: &'a ActionRef,
        patch: PolicyPatch,
    ) -> BoxFuture<'a, Result<ActionPolicy, HookError>> {
        Box::pin(async move {
            let _merging = self.merging.lock().unwrap_or_else(|p| p.into_inner());
            let policy = patch.over(executor.policy(action));
            executor
                .set_policy(action, policy)
                .map_err(|e| HookError(e.to_string()))?;
            Ok(policy)
        })
    }
}

/// Records each health check's result (the Postgres edge keeps a history of them). The health
/// loop bounds each call in time and only logs a failure.
pub trait HealthStore: Send + Sync + 'static {
    fn store<'a>(&'a self, report: &'a HealthReport) -> BoxFuture<'a, Result<(), HookError>>;
}

/// Keeps only the latest result, in memory (served on `/health`).
#[derive(Debug, Default)]
pub struct NoHealthStore;

impl HealthStore for NoHealthStore {
    fn store<'a>(&'a self, _report: &'a HealthReport) -> BoxFuture<'a, Result<(), HookError>> {
        Box::pin(async { Ok(()) })
    }
}

/// How long `queue_snapshots` and `health_checks` rows are kept: the runbook's weekly
/// maintenance deletes snapshots older than 30 days, and the health history follows suit.
pub const HISTORY_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// What a purge cycle asks of the ledger: rows the runbook's weekly maintenance deletes by hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerPurgeOrder {
    /// Finished `execution` rows older than this go (`purge.max_completed_age_seconds`).
    pub max_completed_age: Duration,
    /// Idle `queue_stats` rows not updated for this long go
    /// (`purge.max_stale_stats_age_seconds`).
    pub max_stale_stats_age: Duration,
    /// `queue_snapshots` and `health_checks` rows older than this go ([`HISTORY_RETENTION`]).
    pub max_history_age: Duration,
    /// Count only.
    pub dry_run: bool,
}

/// Rows a ledger purge deleted (or, in a dry run, would delete).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LedgerPurged {
    /// `execution` rows in an end status.
    pub completed_executions: u64,
    /// Idle `queue_stats` rows.
    pub stale_stats: u64,
    /// `queue_snapshots` rows.
    pub old_snapshots: u64,
    /// `health_checks` rows.
    pub old_health_checks: u64,
}

impl LedgerPurged {
    /// Each count with the table it is about, for logs and metrics.
    pub fn by_table(&self) -> [(&'static str, u64); 4] {
        [
            ("execution", self.completed_executions),
            ("queue_stats", self.stale_stats),
            ("queue_snapshots", self.old_snapshots),
            ("health_checks", self.old_health_checks),
        ]
    }
}

/// Deletes old rows from the ledger during each purge cycle.
pub trait LedgerPurge: Send + Sync + 'static {
    /// `Ok(None)` when there is no ledger to purge.
    fn purge<'a>(
        &'a self,
        order: LedgerPurgeOrder,
    ) -> BoxFuture<'a, Result<Option<LedgerPurged>, HookError>>;
}

/// No ledger (`executor.durability: memory`).
#[derive(Debug, Default)]
pub struct NoLedgerPurge;

impl LedgerPurge for NoLedgerPurge {
    fn purge<'a>(
        &'a self,
        _order: LedgerPurgeOrder,
    ) -> BoxFuture<'a, Result<Option<LedgerPurged>, HookError>> {
        Box::pin(async { Ok(None) })
    }
}
