//! Several executors sharing the actions (issue 15), built on RabbitMQ's and Postgres's own
//! guarantees.
//!
//! The actions are split into `cluster.partitions` partitions by a fixed hash of their ref
//! ([`partition`]). Each partition has one owner at a time, recorded in Postgres with an
//! epoch that rises at every takeover; every ledger write of an owner is fenced by the epochs
//! it took (`db::partitions`). With `cluster.mode: single` one instance takes every partition at
//! start. With `shared`, RabbitMQ chooses: each partition has a single-active-consumer queue
//! (`rabbit::partitions`), and the instance made its active consumer takes it over
//! ([`takeover`]).

pub mod partition;
pub mod takeover;

pub use partition::{
    DEFAULT_PARTITIONS, MAX_PARTITIONS, Partition, partition_of, partition_of_ref,
};

/// The default `cluster.instance_id`: the host's name and the process id, so two instances on
/// one host differ and a restarted one is told from its predecessor.
pub fn default_instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}-{}", std::process::id())
}
