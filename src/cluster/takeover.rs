//! Taking a partition over (`cluster.mode: shared`): what an instance does when RabbitMQ
//! made it the active consumer of a partition's queue.
//!
//! In this order, one partition at a time:
//! 1. the partition's row in Postgres gets this instance as owner and a raised epoch
//!    (`db::partitions::take_one`); from that commit on, every ledger write of the previous
//!    owner is refused, and a flush of its in flight has committed before it;
//! 2. the epoch joins this instance's fence, so its own writes for the partition are checked;
//! 3. the attempts of the dispatches the previous owner's broker never confirmed are raised
//!    behind the fence;
//! 4. the partition's live executions go back into their queues from the ledger, in
//!    acceptance order, those running holding their slots, and each action's actor sends the
//!    unconfirmed ones again before it dispatches anything restored as waiting
//!    (`db::recovery::recover_partition`);
//! 5. the partition counts as owned: its queue's messages are handled, and requests for its
//!    actions taken from the shared queue are handled here instead of being carried over.
//!
//! Once the fence refuses a write (another instance took one of this instance's partitions),
//! the ledger is fenced and the whole instance starts over (`app`): all its partitions'
//! state is dropped, and it comes back as a standby of every queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::future::BoxFuture;
use sqlx::postgres::PgPool;
use sqlx::{Row, SqlStr};

use super::Partition;
use crate::core::Executor;
use crate::db::ledger::LedgerSink;
use crate::db::{DbError, Schema};
use crate::model::{ActionRef, ExecutionId};
use crate::rabbit::partitions::{LocateError, Owner};

/// The partitions this instance owns, and how it takes one.
pub struct Takeover {
    instance_id: String,
    partitions: u16,
    owned: Vec<AtomicBool>,
    pool: PgPool,
    schema: Schema,
    executor: Arc<Executor>,
    ledger: Arc<LedgerSink>,
    locate: SqlStr,
    /// One takeover at a time: each reads the ledger, and a burst at start (a lone instance
    /// takes every partition) should not hold every connection of the pool.
    one_at_a_time: tokio::sync::Mutex<()>,
}

impl Takeover {
    pub fn new(
        instance_id: String,
        partitions: u16,
        pool: PgPool,
        schema: Schema,
        executor: Arc<Executor>,
        ledger: Arc<LedgerSink>,
    ) -> Self {
        metrics::gauge!("attune_partitions_owned").set(0.0);
        Self {
            instance_id,
            partitions,
            owned: (0..partitions).map(|_| AtomicBool::new(false)).collect(),
            locate: schema.sql(
                "SELECT e.id, a.ref FROM {s}.execution e JOIN {s}.action a ON a.id = e.action \
                 WHERE e.id = ANY($1)",
            ),
            pool,
            schema,
            executor,
            ledger,
            one_at_a_time: tokio::sync::Mutex::new(()),
        }
    }

    /// How many partitions this instance owns now.
    pub fn owned_count(&self) -> usize {
        self.owned
            .iter()
            .filter(|o| o.load(Ordering::Acquire))
            .count()
    }

    async fn take_now(&self, p: Partition) -> Result<bool, DbError> {
        let _one = self.one_at_a_time.lock().await;
        if self.owns(p) {
            return Ok(true);
        }
        if self.ledger.is_fenced() {
            return Ok(false);
        }
        let started = std::time::Instant::now();
        let taken = crate::db::retry_transient("taking a partition", || {
            crate::db::partitions::take_one(&self.pool, &self.schema, p, &self.instance_id)
        })
        .await?;
        let Some(fence) = self.ledger.fence() else {
            return Ok(false);
        };
        fence.hold(p, taken.epoch);
        // Unconfirmed dispatches go out again from the restore itself, ahead of the waiting.
        let Some(report) = crate::db::recovery::recover_partition(
            &self.pool,
            &self.schema,
            &self.executor,
            &self.ledger,
            self.partitions,
            p,
            taken.released_cleanly,
        )
        .await?
        else {
            return Ok(false);
        };
        let unconfirmed = report.unconfirmed.len();
        if let Some(slot) = self.owned.get(usize::from(p)) {
            slot.store(true, Ordering::Release);
        }
        let seconds = started.elapsed().as_secs_f64();
        metrics::counter!("attune_partition_takeovers_total").increment(1);
        metrics::histogram!("attune_partition_rebuild_seconds").record(seconds);
        metrics::gauge!("attune_partitions_owned").set(self.owned_count() as f64);
        tracing::info!(
            partition = p,
            epoch = taken.epoch,
            released_cleanly = taken.released_cleanly,
            actions = report.actions,
            waiting = report.waiting,
            running = report.running,
            unconfirmed,
            maybe_sent = report.maybe_sent,
            rebuild_ms = (seconds * 1000.0) as u64,
            "took partition over"
        );
        Ok(true)
    }
}

impl Owner for Takeover {
    fn owns(&self, p: Partition) -> bool {
        self.owned
            .get(usize::from(p))
            .is_some_and(|o| o.load(Ordering::Acquire))
    }

    fn take(self: Arc<Self>, p: Partition) -> BoxFuture<'static, bool> {
        Box::pin(async move {
            match self.take_now(p).await {
                Ok(taken) => taken,
                Err(e) => {
                    // Not transient (those are retried): the instance cannot own the
                    // partition; its queue's messages stay with the broker, and the ledger
                    // error shows in the log.
                    tracing::error!(partition = p, error = %e, "could not take the partition over");
                    false
                }
            }
        })
    }

    fn locate(
        &self,
        ids: Vec<ExecutionId>,
    ) -> BoxFuture<'static, Result<Vec<(ExecutionId, ActionRef)>, LocateError>> {
        let pool = self.pool.clone();
        let sql = self.locate.clone();
        Box::pin(async move {
            let ids: Vec<i64> = ids.into_iter().filter_map(crate::db::db_id).collect();
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let rows = sqlx::query(sql)
                .bind(&ids)
                .fetch_all(&pool)
                .await
                .map_err(|e| LocateError(e.to_string()))?;
            let mut found = Vec::with_capacity(rows.len());
            for row in rows {
                let id: i64 = row.try_get("id").map_err(|e| LocateError(e.to_string()))?;
                let r: String = row.try_get("ref").map_err(|e| LocateError(e.to_string()))?;
                if let (Ok(id), Ok(action)) = (u64::try_from(id), ActionRef::parse(&r)) {
                    found.push((id, action));
                }
            }
            Ok(found)
        })
    }
}
