//! The `cluster.*` section: how the actions are partitioned and what this instance is called.

use serde::Deserialize;

use crate::cluster::DEFAULT_PARTITIONS;

/// `cluster.*`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Partitions the actions are split into (README, "Running several instances"). Every
    /// instance and every producer that routes by partition must use the same count; changing
    /// it moves actions between partitions, so stop every instance first.
    pub partitions: u16,
    /// This instance's name in the `partition` table and `GET /api/v1/cluster`; empty: the
    /// host name and the process id.
    pub instance_id: String,
    /// `single`: this instance takes every partition at start (one instance, the default).
    /// `shared`: every instance consumes every partition queue and owns the partitions
    /// RabbitMQ makes it the single active consumer of.
    pub mode: ClusterMode,
}

/// `cluster.mode`: how an instance comes to own partitions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClusterMode {
    /// Takes every partition at start; no partition queues.
    #[default]
    Single,
    /// Owns a partition while RabbitMQ makes it the active consumer of the partition's queue.
    Shared,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            partitions: DEFAULT_PARTITIONS,
            instance_id: String::new(),
            mode: ClusterMode::Single,
        }
    }
}

impl ClusterConfig {
    /// `instance_id`, or the default made of the host name and the process id.
    pub fn instance_id(&self) -> String {
        if self.instance_id.is_empty() {
            crate::cluster::default_instance_id()
        } else {
            self.instance_id.clone()
        }
    }
}
