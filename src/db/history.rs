//! The ledger as the executor's long memory: which execution ids were ever accepted.
//!
//! The executor remembers the last `remember_ended` ended ids in memory. A request whose
//! supplied id ended before that window (or before this process started) would otherwise be
//! taken for new and run again; the intake asks [`LedgerHistory`] about such ids, one query
//! per intake batch for the ids memory does not know, and only once memory can no longer
//! answer alone.

use std::sync::Arc;

use futures::future::BoxFuture;
use sqlx::SqlStr;
use sqlx::postgres::PgPool;

use super::ledger::LedgerSink;
use super::{DbError, Schema, db_id};
use crate::core::{History, HistoryError};
use crate::model::ExecutionId;

/// [`History`] backed by the `execution` table.
pub struct LedgerHistory {
    /// The executor's pool: a lookup is one short query, and the pool keeps two connections
    /// or more, so it does not wait behind a ledger flush for long.
    pool: PgPool,
    /// `SELECT id … WHERE id = ANY($1)`, built once with the schema in it.
    find: SqlStr,
    /// The ledger writer, whose commits [`History::settled`] waits for.
    ledger: Arc<LedgerSink>,
}

impl LedgerHistory {
    pub fn new(pool: PgPool, schema: &Schema, ledger: Arc<LedgerSink>) -> Self {
        Self {
            pool,
            find: schema.sql("SELECT id FROM {s}.execution WHERE id = ANY($1)"),
            ledger,
        }
    }
}

impl History for LedgerHistory {
    fn recorded(
        &self,
        ids: Vec<ExecutionId>,
    ) -> BoxFuture<'static, Result<Vec<ExecutionId>, HistoryError>> {
        let pool = self.pool.clone();
        let find = self.find.clone();
        Box::pin(async move {
            // Ids beyond BIGINT are never stored, so they cannot have been recorded.
            let ids: Vec<i64> = ids.into_iter().filter_map(db_id).collect();
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let found: Vec<i64> = sqlx::query_scalar(find)
                .bind(&ids)
                .fetch_all(&pool)
                .await
                .map_err(|e| HistoryError(e.to_string()))?;
            Ok(found
                .into_iter()
                .filter_map(|id| u64::try_from(id).ok())
                .collect())
        })
    }

    fn settled(&self) -> BoxFuture<'static, ()> {
        let ledger = self.ledger.clone();
        Box::pin(async move {
            // An error means the writer stopped (shutdown): nothing more will commit, and the
            // answer goes out as it would have.
            let _ = ledger.sync().await;
        })
    }
}

/// Whether the ledger holds any execution that has ended.
pub async fn any_ended(pool: &PgPool, schema: &Schema) -> Result<bool, DbError> {
    sqlx::query_scalar(schema.sql(
        "SELECT EXISTS (SELECT 1 FROM {s}.execution \
         WHERE status NOT IN ('requested', 'scheduled', 'running'))",
    ))
    .fetch_one(pool)
    .await
    .map_err(DbError::query("looking for ended executions"))
}
