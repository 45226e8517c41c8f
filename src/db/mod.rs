//! The Postgres edge: the durable ledger of executions and the operators' window onto the
//! queues.
//!
//! # Layout
//!
//! - [`ledger`]: [`LedgerSink`](ledger::LedgerSink), the [`OutcomeSink`](crate::core::OutcomeSink)
//!   that writes every execution's transitions to `execution` in batches and settles receipts
//!   only after the commit.
//! - [`stats`]: [`StatsWriter`](stats::StatsWriter), the
//!   [`StatsObserver`](crate::core::StatsObserver) that upserts `queue_stats` for the actions
//!   that changed and copies busy queues to `queue_snapshots`.
//! - [`recovery`]: puts the live executions recorded in the ledger back into a fresh
//!   [`Executor`](crate::core::Executor) before anything is consumed.
//! - [`policies`]: a [`PolicySource`](crate::core::PolicySource) backed by the `action` table
//!   and the poller that applies operators' changes (the runbook's "disable low-priority
//!   actions") within two seconds.
//!   [`DbPolicyStore`](policies::DbPolicyStore) writes policies set over HTTP to the same table.
//! - [`ops`]: the history of health checks and the purge of old ledger rows, behind the seams
//!   of [`crate::ops::hooks`].
//! - [`actions`]: the `ref → action.id` cache both writers share.
//! - [`history`]: [`LedgerHistory`](history::LedgerHistory), which the intake asks whether a
//!   supplied execution id was accepted before, once the executor's memory of ended ids is no
//!   longer complete.
//!
//! Nothing here runs inside an action actor: the ports only push to channels or maps, and the
//! I/O happens in the tasks this module spawns.
//!
//! # The schema name
//!
//! The tables live in one schema, `database.schema` (default `attune`, which the runbook's
//! queries name). sqlx migrations are plain SQL files with a checksum, so the schema cannot be
//! spliced into them without changing the checksum per schema. Instead:
//!
//! - the migration files use unqualified names, and [`migrate`] runs them on a connection of
//!   its own whose `search_path` is only the configured schema (created first if missing);
//!   that connection is closed afterwards, never returned to the pool;
//! - sqlx's bookkeeping table is `<schema>._sqlx_migrations`, so two schemas in one database
//!   migrate independently;
//! - every statement the executor runs at run time names its tables fully qualified, built
//!   once from the validated [`Schema`], so the pool needs no `search_path` and works whoever
//!   created it.
//!
//! The runbook's own queries say `attune.` literally; with another schema they need editing,
//! which is the point of choosing another one (e.g. a second executor in the same database).

pub mod actions;
pub mod history;
pub mod ledger;
pub mod ops;
pub mod partitions;
pub mod policies;
pub mod recovery;
pub mod stats;

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, SqlStr};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::core::CoreError;
use crate::model::ExecutionId;

/// Errors at the Postgres edge.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(
        "database.schema {0:?} is not a plain identifier (lowercase letters, digits and _, \
         not starting with a digit, at most 63 characters)"
    )]
    InvalidSchema(String),
    #[error("database.url is not a valid Postgres URL: {0}")]
    InvalidUrl(#[source] sqlx::Error),
    #[error("could not migrate schema {schema}: {source}")]
    Migrate {
        schema: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error("{context}: {source}")]
    Query {
        context: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error("the ledger writer has stopped")]
    WriterStopped,
    #[error("{context}: Postgres did not answer within {after:?}")]
    TimedOut {
        context: &'static str,
        after: std::time::Duration,
    },
}

impl DbError {
    pub(crate) fn query(context: &'static str) -> impl FnOnce(sqlx::Error) -> DbError {
        move |source| DbError::Query { context, source }
    }

    /// Whether the same call may work later: Postgres was unreachable, restarting or out of
    /// resources, not refusing what was asked.
    pub fn is_transient(&self) -> bool {
        match self {
            DbError::Query { source, .. } => is_transient(source),
            DbError::Migrate {
                source:
                    sqlx::migrate::MigrateError::Execute(source)
                    | sqlx::migrate::MigrateError::ExecuteMigration(source, _),
                ..
            } => is_transient(source),
            DbError::TimedOut { .. } => true,
            _ => false,
        }
    }
}

/// Pauses between attempts of [`retry_transient`]: from the first to the last, doubling.
const START_RETRY: (std::time::Duration, std::time::Duration) = (
    std::time::Duration::from_millis(100),
    std::time::Duration::from_secs(5),
);

/// Runs `op` again, with backoff, for as long as it fails only because Postgres cannot be
/// reached (a restart, a failover, the server not up yet); any other error is returned at
/// once. For the start-up steps (migrations, policies, recovery): a service started while
/// Postgres restarts waits for it instead of exiting.
pub async fn retry_transient<T, F, Fut>(what: &str, mut op: F) -> Result<T, DbError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, DbError>>,
{
    let mut pause = START_RETRY.0;
    let mut failures = 0u32;
    loop {
        match op().await {
            Ok(v) => {
                if failures > 0 {
                    tracing::info!(failures, "{what}: Postgres answers again");
                }
                return Ok(v);
            }
            Err(e) if e.is_transient() => {
                if failures == 0 {
                    tracing::warn!(error = %e, "{what}: Postgres cannot be reached; trying again");
                } else {
                    tracing::debug!(error = %e, "{what}: still failing");
                }
                failures += 1;
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(START_RETRY.1);
            }
            Err(e) => return Err(e),
        }
    }
}

/// The longest schema name Postgres keeps without truncating it.
const MAX_SCHEMA_LEN: usize = 63;

/// A validated schema name (`database.schema`): the same rule the config applies, checked
/// again here because this module builds SQL from it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Schema(Arc<str>);

impl Schema {
    pub fn new(name: &str) -> Result<Self, DbError> {
        let mut chars = name.chars();
        let starts_well = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
        let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !starts_well || !rest_ok || name.len() > MAX_SCHEMA_LEN {
            return Err(DbError::InvalidSchema(name.to_owned()));
        }
        Ok(Self(Arc::from(name)))
    }

    pub fn name(&self) -> &str {
        &self.0
    }

    /// A statement template with every `{s}.` replaced by the quoted schema name (quoted
    /// although the rule makes it unnecessary, so a schema named like a keyword works). Built
    /// once per writer, so a statement's text is the same on every call and Postgres reuses
    /// the prepared statement.
    pub(crate) fn sql(&self, template: &str) -> SqlStr {
        let text = template.replace("{s}.", &format!("\"{}\".", self.0));
        sqlx::SqlSafeStr::into_sql_str(AssertSqlSafe(text))
    }
}

impl fmt::Debug for Schema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Schema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How long a writer waits for a pooled connection before it counts the attempt as failed and
/// backs off; short, so that an outage shows in the health flag within seconds.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// `idle_in_transaction_session_timeout` of every session of a pool from [`connect_lazy`].
pub const IDLE_IN_TRANSACTION: Duration = Duration::from_secs(10);

/// A pool that connects on first use and reconnects by itself: broken connections are dropped
/// and replaced on the next acquire, so writers only have to retry.
pub fn connect_lazy(url: &str, max_connections: u32) -> Result<PgPool, DbError> {
    connect_lazy_idle(url, max_connections, IDLE_IN_TRANSACTION)
}

/// [`connect_lazy`] with sessions ended by Postgres once idle inside a transaction for
/// `idle_limit` (whole milliseconds, at least one).
pub fn connect_lazy_idle(
    url: &str,
    max_connections: u32,
    idle_limit: Duration,
) -> Result<PgPool, DbError> {
    let options: PgConnectOptions = url.parse().map_err(DbError::InvalidUrl)?;
    let idle_limit = format!("{}ms", idle_limit.as_millis().max(1));
    // At least two, so that the ledger's writes never queue behind a stats write or the
    // policy poll.
    Ok(PgPoolOptions::new()
        .max_connections(max_connections.max(2))
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_lazy_with(
            options
                .application_name("fifo-executor")
                // A flush transaction holds share locks on the partition rows: if its process
                // is paused between two statements (SIGSTOP, a stall), Postgres ends the
                // session after this long and a takeover waiting on those locks goes on.
                // Nothing of ours idles inside a transaction for anywhere near it.
                .options([("idle_in_transaction_session_timeout", idle_limit.as_str())]),
        ))
}

/// Applies the embedded migrations to `schema` (see the module docs for how the schema name
/// gets in). Safe to run from several processes at once: sqlx takes an advisory lock.
pub async fn migrate(pool: &PgPool, schema: &Schema) -> Result<(), DbError> {
    let migrate_err = |source| DbError::Migrate {
        schema: schema.name().to_owned(),
        source,
    };
    // The session's search_path is changed below, so this connection must never go back to
    // the pool where run-time queries would inherit it.
    let mut conn = pool
        .acquire()
        .await
        .map_err(DbError::query("connecting to migrate"))?
        .detach();
    let quoted = format!("\"{}\"", schema.name());
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE SCHEMA IF NOT EXISTS {quoted}; SET search_path TO {quoted}"
    )))
    .execute(&mut conn)
    .await
    .map_err(DbError::query("creating the schema"))?;
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.dangerous_set_table_name(format!("{quoted}._sqlx_migrations"));
    migrator.run(&mut conn).await.map_err(migrate_err)?;
    // Closing politely is a courtesy; the migration is committed either way.
    let _ = sqlx::Connection::close(conn).await;
    Ok(())
}

/// The highest execution id the ledger has ever recorded, live or finished.
pub async fn max_execution_id(
    pool: &PgPool,
    schema: &Schema,
) -> Result<Option<ExecutionId>, DbError> {
    let max: Option<i64> = sqlx::query_scalar(schema.sql("SELECT max(id) FROM {s}.execution"))
        .fetch_one(pool)
        .await
        .map_err(DbError::query("reading the highest execution id"))?;
    // The column has CHECK (id > 0), so a negative value cannot come back; map it to None
    // rather than trust that.
    Ok(max.and_then(|m| u64::try_from(m).ok()))
}

/// Execution ids the ledger can store: `execution.id` is a BIGINT. The intake edge should
/// refuse larger ids; the ledger skips (and logs) any that get through.
pub const MAX_STORABLE_EXECUTION_ID: ExecutionId = i64::MAX as u64;

/// A background task of this module, with the one way to stop it.
#[derive(Debug)]
pub struct Worker {
    name: &'static str,
    stop: Option<oneshot::Sender<()>>,
    join: JoinHandle<()>,
}

impl Worker {
    pub(crate) fn spawn<F>(
        name: &'static str,
        task: impl FnOnce(oneshot::Receiver<()>) -> F,
    ) -> Self
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let (stop, stopped) = oneshot::channel();
        Self {
            name,
            stop: Some(stop),
            join: tokio::spawn(task(stopped)),
        }
    }

    /// Asks the task to finish its last write and stop; aborts it if that takes longer than
    /// `timeout` (e.g. Postgres is down at shutdown). Returns whether it stopped by itself.
    pub async fn stop(mut self, timeout: Duration) -> bool {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match tokio::time::timeout(timeout, &mut self.join).await {
            Ok(_) => true,
            Err(_) => {
                tracing::warn!(task = self.name, "did not stop in time; aborted");
                self.join.abort();
                false
            }
        }
    }

    pub fn is_finished(&self) -> bool {
        self.join.is_finished()
    }
}

/// Whether an error is about reaching Postgres (retry the same work later) rather than about
/// the work itself (retrying it unchanged would fail forever).
pub(crate) fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::BeginFailed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exceptions; 53: out of resources (disk full, too many
            // connections); 57P: shutdown and crash recovery; 40: serialization failure and
            // deadlock; 25006: read-only transaction (a failover in progress).
            code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57P")
                || code.starts_with("40")
                || code == "25006"
        }),
        _ => false,
    }
}

/// JSON text as `jsonb` will take it. Postgres refuses the escape `\u0000` inside jsonb
/// strings although it is valid JSON; the ledger's copy gets U+FFFD instead so that the row is
/// written at all (the dispatch carries the original text).
pub(crate) fn jsonb_text(json: &str) -> Cow<'_, str> {
    if json.contains("\\u0000") {
        Cow::Owned(json.replace("\\u0000", "\\ufffd"))
    } else {
        Cow::Borrowed(json)
    }
}

/// Text as a TEXT column will take it: Postgres refuses NUL characters, which a request id
/// decoded from JSON (`"\u0000"`) can contain.
pub(crate) fn pg_text(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        Cow::Owned(text.replace('\0', "\u{fffd}"))
    } else {
        Cow::Borrowed(text)
    }
}

/// Converts an id for a BIGINT column.
pub(crate) fn db_id(id: ExecutionId) -> Option<i64> {
    i64::try_from(id).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_follow_the_config_rule() {
        assert!(Schema::new("attune").is_ok());
        assert!(Schema::new("_attune_2").is_ok());
        for bad in [
            "",
            "Attune",
            "1attune",
            "at-tune",
            "a\"b",
            "attune; drop table x",
        ] {
            assert!(Schema::new(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(Schema::new(&"a".repeat(64)).is_err());
    }

    #[test]
    fn statements_name_the_schema() {
        let s = Schema::new("attune").expect("valid");
        assert_eq!(
            s.sql("SELECT 1 FROM {s}.execution JOIN {s}.action")
                .as_str(),
            "SELECT 1 FROM \"attune\".execution JOIN \"attune\".action"
        );
    }

    #[test]
    fn nul_escapes_are_replaced_for_jsonb() {
        assert_eq!(jsonb_text(r#"{"a":"x\u0000y"}"#), r#"{"a":"x\ufffdy"}"#);
        assert_eq!(jsonb_text(r#"{"a":1}"#), r#"{"a":1}"#);
        assert_eq!(pg_text("req\0x"), "req\u{fffd}x");
    }
}
