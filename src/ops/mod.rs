//! The operations side of the service: what monitoring and operators see and do. Nothing in
//! the core imports it; it uses the core through the [`crate::core::Executor`] handle and the
//! ports, like any other edge.
//!
//! - [`metrics`]: the Prometheus recorder, execution counters and queue gauges.
//! - [`health`]: the periodic health check (a pure verdict function plus the task around it).
//! - [`health_report`]: what a check finds, which the check and the [`hooks`] both use.
//! - [`purge`]: the periodic purge of stale queued and lost running executions.
//! - [`dlq`]: reading and replaying the dead-letter queue.
//! - [`hooks`]: seams for what the Postgres edge keeps (policies, health results, old ledger
//!   rows), with the in-memory implementations; the Postgres ones are in [`crate::db`].

pub mod dlq;
pub mod health;
pub mod health_report;
pub mod hooks;
pub mod metrics;
pub mod purge;

use tokio::sync::watch;

/// Resolves once `shutdown` turns true (or its sender is gone). The guard `wait_for` returns
/// is dropped here so it never lives across an await in a task that moves between threads.
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await.map(|_| ());
}
