//! Seams for what the Postgres edge will store: operator policies, health results, and the
//! purge of old ledger rows. Each has a no-op implementation that the service uses until the
//! Postgres edge provides a real one (see `app::Hooks`).
//!
//! The traits return boxed futures rather than using `async fn`, because the service holds
//! them as `Arc<dyn …>` and `async fn` in a trait cannot be called through `dyn`.

use std::time::Duration;

use futures::future::BoxFuture;

use super::health::HealthReport;
use crate::core::ActionPolicy;
use crate::model::ActionRef;

/// A store refused or failed; the message is for the operator (it is returned in the HTTP
/// error body), so it must not contain secrets.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct HookError(pub String);

/// Persists policies set over HTTP, so they survive a restart. Called before the policy is
/// applied: if it fails, nothing changes.
pub trait PolicyStore: Send + Sync + 'static {
    fn save<'a>(
        &'a self,
        action: &'a ActionRef,
        policy: ActionPolicy,
    ) -> BoxFuture<'a, Result<(), HookError>>;
}

/// Keeps policies in memory only (the executor's overrides), i.e. until the next restart.
#[derive(Debug, Default)]
pub struct NoPolicyStore;

impl PolicyStore for NoPolicyStore {
    fn save<'a>(
        &'a self,
        _action: &'a ActionRef,
        _policy: ActionPolicy,
    ) -> BoxFuture<'a, Result<(), HookError>> {
        Box::pin(async { Ok(()) })
    }
}

/// Records each health check's result (the Postgres edge will keep a history of them).
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

/// What a purge cycle asks of the ledger: rows the runbook's weekly maintenance deletes by hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerPurgeOrder {
    /// Finished `execution` rows older than this go (`purge.max_completed_age_seconds`).
    pub max_completed_age: Duration,
    /// Idle `queue_stats` rows not updated for this long go
    /// (`purge.max_stale_stats_age_seconds`).
    pub max_stale_stats_age: Duration,
    /// Count only.
    pub dry_run: bool,
}

/// Rows a ledger purge deleted (or, in a dry run, would delete).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LedgerPurged {
    pub completed_executions: u64,
    pub stale_stats: u64,
}

/// Deletes old rows from the ledger during each purge cycle.
pub trait LedgerPurge: Send + Sync + 'static {
    /// `Ok(None)` when there is no ledger to purge.
    fn purge<'a>(
        &'a self,
        order: LedgerPurgeOrder,
    ) -> BoxFuture<'a, Result<Option<LedgerPurged>, HookError>>;
}

/// No ledger (memory mode, or until the Postgres edge is wired in).
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
