//! `GET /api/v1/cluster`: every partition with its owner, epoch and since when, and what it
//! holds now (its actions, queued and running).

use std::sync::Arc;

use axum::extract::State;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use super::AppState;
use super::error::ApiError;
use super::queues::Data;
use crate::cluster::{Partition, partition_of};
use crate::db::partitions::PartitionRow;

/// Where the partitions' owners are read from.
pub struct ClusterView {
    /// This instance's `cluster.instance_id`.
    pub instance_id: String,
    /// `cluster.partitions`.
    pub partitions: u16,
    /// The `partition` table (with the ledger); without it this instance owns every partition
    /// since it started, with no epoch.
    pub table: Option<(sqlx::PgPool, crate::db::Schema)>,
    /// When this instance started.
    pub started: DateTime<Utc>,
    /// `cluster.mode: shared`: whether this instance owns a partition now. `None`: it owns
    /// every partition (single mode).
    pub owns: Option<Arc<dyn Fn(Partition) -> bool + Send + Sync>>,
}

impl ClusterView {
    /// Whether this instance holds `action`'s queue (else the `queue_stats` table tells,
    /// as the owner last wrote it).
    pub fn holds(&self, action: &crate::model::ActionRef) -> bool {
        self.owns
            .as_ref()
            .is_none_or(|owns| owns(partition_of(action, self.partitions)))
    }

    /// Who owns `action`'s partition, by the `partition` table (shared mode only).
    pub async fn owner_of(&self, action: &crate::model::ActionRef) -> Option<(Partition, String)> {
        let (pool, schema) = self.table.as_ref().filter(|_| self.owns.is_some())?;
        let p = partition_of(action, self.partitions);
        let rows = crate::db::partitions::list(pool, schema).await.ok()?;
        rows.into_iter().find(|r| r.id == p).map(|r| (p, r.owner))
    }
}

impl std::fmt::Debug for ClusterView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterView")
            .field("instance_id", &self.instance_id)
            .field("partitions", &self.partitions)
            .finish()
    }
}

impl ClusterView {
    /// One instance owning every partition, with nothing in Postgres (`durability: memory`,
    /// tests).
    pub fn alone(instance_id: String, partitions: u16) -> Arc<Self> {
        Arc::new(Self {
            instance_id,
            partitions,
            table: None,
            started: Utc::now(),
            owns: None,
        })
    }
}

#[derive(Debug, Serialize)]
pub struct ClusterBody {
    /// The instance that answered.
    pub instance_id: String,
    pub partition_count: u16,
    pub partitions: Vec<PartitionBody>,
}

#[derive(Debug, Serialize)]
pub struct PartitionBody {
    pub partition: Partition,
    pub owner: String,
    /// Raised at every takeover; `null` without the ledger.
    pub epoch: Option<i64>,
    pub since: String,
    /// Actions of the partition with what they hold now: from this instance's memory for the
    /// partitions it owns, from `queue_stats` for the others.
    pub actions: usize,
    pub queued: usize,
    pub running: usize,
}

pub async fn cluster(
    State(state): State<Arc<AppState>>,
) -> Result<axum::Json<Data<ClusterBody>>, ApiError> {
    let view = &state.cluster;
    let rows: Vec<PartitionRow> = match &view.table {
        Some((pool, schema)) => crate::db::partitions::list(pool, schema)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "GET /api/v1/cluster: the partition table could not be read");
                ApiError::Unavailable("the partition table could not be read".to_owned())
            })?,
        None => (0..view.partitions)
            .map(|id| PartitionRow {
                id,
                owner: view.instance_id.clone(),
                epoch: 0,
                since: view.started,
            })
            .collect(),
    };
    let mut held = vec![(0usize, 0usize, 0usize); usize::from(view.partitions.max(1))];
    let mut count = |p: Partition, queued: usize, running: usize| {
        if let Some(h) = held.get_mut(usize::from(p)) {
            h.0 += 1;
            h.1 += queued;
            h.2 += running;
        }
    };
    // Shared: the partitions owned elsewhere as their owners last wrote them.
    if let (Some(owns), Some((pool, schema))) = (&view.owns, &view.table) {
        let stored = crate::db::stats::stored_holdings(pool, schema)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "GET /api/v1/cluster: queue_stats could not be read");
                ApiError::Unavailable("queue_stats could not be read".to_owned())
            })?;
        for (r, queued, running) in stored {
            let p = crate::cluster::partition_of_ref(&r, view.partitions);
            if !owns(p) {
                count(p, queued, running);
            }
        }
    }
    for s in state.stats.all() {
        if view.holds(&s.action_ref) {
            count(
                partition_of(&s.action_ref, view.partitions),
                s.queue_length,
                s.active_count,
            );
        }
    }
    let partitions = rows
        .into_iter()
        .map(|r| {
            let (actions, queued, running) =
                held.get(usize::from(r.id)).copied().unwrap_or_default();
            PartitionBody {
                partition: r.id,
                owner: r.owner,
                epoch: view.table.as_ref().map(|_| r.epoch),
                since: r.since.to_rfc3339_opts(SecondsFormat::Micros, true),
                actions,
                queued,
                running,
            }
        })
        .collect();
    Ok(axum::Json(Data {
        data: ClusterBody {
            instance_id: view.instance_id.clone(),
            partition_count: view.partitions,
            partitions,
        },
    }))
}
