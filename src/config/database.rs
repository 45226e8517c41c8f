//! The `database.*` section: the Postgres connection, its schema and how writes are batched
//! and awaited.

use std::fmt;

use serde::Deserialize;

use super::secret::redact_url_password;

/// `database.*`
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// Postgres connection URL.
    pub url: String,
    /// Schema holding every table, so the runbook's `attune.*` queries run unchanged.
    pub schema: String,
    /// Size of the connection pool.
    pub max_connections: u32,
    /// Longest a write waits to be batched with others before it is flushed (a dispatch that
    /// waits for a commit is flushed at once). 20 ms by default: at half load that took 40 %
    /// of Postgres's CPU off the machine against 5 ms, and lowered the hand-off's p50 and p90
    /// (BENCHMARKS.md); the price is acknowledgements and `reply_to` answers up to 20 ms later.
    pub flush_interval_ms: u64,
    /// Most rows written in one batch.
    pub batch_max_rows: usize,
    /// What a dispatch waits for before it leaves; see [`DispatchWait`].
    pub dispatch_wait: DispatchWait,
}

/// `database.dispatch_wait`: which commit a dispatch waits for. Both keep the same promise
/// (after a crash, no copy of a dispatch repeats an attempt a worker may have seen); they
/// differ in where they pay for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DispatchWait {
    /// The default: a dispatch waits only until its execution's acceptance is committed (long
    /// done for an execution that waited in the queue), and at most
    /// [`SENT_AHEAD_PER_ACTION`](crate::db::ledger::SENT_AHEAD_PER_ACTION) of an action may
    /// leave ahead of their admission's commit. Recovery gives the first that many waiting
    /// executions of each action a higher attempt. No commit in the hand-off from a completion
    /// to the next dispatch.
    #[default]
    Acceptance,
    /// A dispatch waits until its admission is committed: a commit (an fsync) in every
    /// hand-off, and no attempt is ever raised without a dispatch behind it.
    Admission,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/fifo_executor".to_owned(),
            schema: "attune".to_owned(),
            max_connections: 8,
            flush_interval_ms: 20,
            batch_max_rows: 5000,
            dispatch_wait: DispatchWait::default(),
        }
    }
}

// The URL may carry the database password, and configs get logged at start-up.
impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &redact_url_password(&self.url))
            .field("schema", &self.schema)
            .field("max_connections", &self.max_connections)
            .field("flush_interval_ms", &self.flush_interval_ms)
            .field("batch_max_rows", &self.batch_max_rows)
            .field("dispatch_wait", &self.dispatch_wait)
            .finish()
    }
}
