//! Typed, validated configuration.
//!
//! # Layers
//!
//! 1. Built-in defaults: the `Default` impl of each section struct. They are the only
//!    place a default is written in code; `config/default.yaml` repeats them for operators and
//!    a unit test keeps the two identical.
//! 2. The YAML file given with `--config`, if any. Keys it leaves out keep their defaults; a
//!    section written with nothing under it (`executor:`) is the same as an empty section.
//! 3. Environment variables named `ATTUNE__SECTION__KEY`. After the prefix, a double
//!    underscore separates levels and each level is lowercased, so
//!    `ATTUNE__EXECUTOR__QUEUE__MAX_QUEUE_LENGTH=20000` sets `executor.queue.max_queue_length`.
//!    A value that reads as a YAML number or boolean (`20000`, `false`) is used as one, unless
//!    the key wants text, in which case the value is taken verbatim (so a numeric
//!    `ATTUNE__API__ADMIN_TOKEN` still works). Any other value is taken verbatim as text.
//!    Variables without the `ATTUNE__` prefix (case-sensitive) are ignored.
//!
//! Per-action policies (`policies.actions.<action_ref>`) cannot be set from the environment:
//! action refs contain dots and are case-sensitive, and neither survives the variable-name
//! mapping. Such a variable is refused rather than half-working; put per-action policies in the
//! file.
//!
//! # Errors
//!
//! Whatever stops start-up is a [`ConfigError`] whose message names the key as a dotted path
//! (action refs are quoted: `policies.actions."core.http.get".concurrency_limit`), where the
//! value came from (the file, an environment variable, or the built-in default) and what was
//! expected. Unknown keys, including in environment variables, are errors: a typo must not
//! silently leave a default in force. Impossible values (a concurrency limit of 0, a warning
//! threshold above its critical one, ...) are all reported at once.
//!
//! # Layout
//!
//! The sections are typed with their defaults in `executor.rs` (`executor`, `policies` and the
//! policy resolved per action), `rabbitmq.rs`, `database.rs`, `ops.rs` (`stats`, `dlq`,
//! `purge`, `health`, `api`, `logging`) and `cluster.rs`; `secret.rs` keeps passwords and tokens out of logs.
//! `env.rs` decodes the `ATTUNE__` variables, `load.rs` merges them over the file and reads
//! the result into the types, and `validate.rs` refuses impossible values. `error.rs` holds
//! [`ConfigError`]; `provenance.rs` finds which layer set a key, for the errors to name.
//! `reload.rs` compares two configurations for a reload: which keys changed, and which of them
//! apply while the service runs ([`ConfigChange`]).

mod cluster;
mod database;
mod env;
mod error;
mod executor;
mod load;
mod ops;
mod provenance;
mod rabbitmq;
mod reload;
mod secret;
#[cfg(test)]
mod testing;
mod validate;

use serde::Deserialize;

pub use cluster::{ClusterConfig, ClusterMode};
pub use database::{DatabaseConfig, DispatchWait};
pub use env::ENV_PREFIX;
pub use error::{ConfigError, Origin};
pub use executor::{
    ActionPolicy, DefaultPolicy, Durability, ExecutorConfig, PoliciesConfig, Policy, QueueConfig,
    RateLimit,
};
pub use ops::{
    ApiConfig, DlqConfig, GlobalRateLimit, HealthConfig, HealthThresholds, LoggingConfig,
    PurgeConfig, RateLimitsConfig, StatsConfig,
};
pub use rabbitmq::{QueueType, RabbitConfig, RabbitTlsConfig};
pub use reload::{ConfigChange, changed_keys, with_live_changes};
pub use secret::Secret;

/// Longest action ref accepted anywhere (requests, config, HTTP paths).
pub use crate::model::MAX_ACTION_REF_LEN;

/// The whole configuration of the service.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Queue limits and global execution behaviour.
    pub executor: ExecutorConfig,
    /// Concurrency and rate limits, by default and per action.
    pub policies: PoliciesConfig,
    /// The RabbitMQ connection that feeds and drains the queues.
    pub rabbitmq: RabbitConfig,
    /// The Postgres ledger and statistics tables.
    pub database: DatabaseConfig,
    /// How often queue statistics are written for operators.
    pub stats: StatsConfig,
    /// The dead-letter queue operators read.
    pub dlq: DlqConfig,
    /// Periodic clean-up of executions and statistics that are too old.
    pub purge: PurgeConfig,
    /// The `/health` check and its thresholds.
    pub health: HealthConfig,
    /// The HTTP API (queue stats, health, metrics, admin endpoints).
    pub api: ApiConfig,
    /// Log output.
    pub logging: LoggingConfig,
    /// How the actions are partitioned among instances.
    pub cluster: ClusterConfig,
}

/// Checks that `s` is a valid action ref: 1 to 255 characters of `[A-Za-z0-9_.-]`. The error
/// says what is wrong, without repeating the input.
pub fn validate_action_ref(s: &str) -> Result<(), String> {
    crate::model::validate_action_ref(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use serde_yaml_ng::Value;

    use super::provenance::lookup;
    use super::testing::from_env;
    use super::*;

    const DEFAULT_YAML: &str = include_str!("../../config/default.yaml");

    #[test]
    fn default_yaml_parses_and_equals_the_built_in_defaults() {
        let config = Config::load_from(Some(("config/default.yaml", DEFAULT_YAML)), Vec::new())
            .expect("default.yaml loads");
        assert_eq!(config, Config::default());
    }

    #[test]
    fn default_yaml_mentions_every_key() {
        // Deserialization cannot notice a key missing from the file; this does.
        let tree: Value = serde_yaml_ng::from_str(DEFAULT_YAML).expect("default.yaml is YAML");
        for path in [
            "executor.queue.max_queue_length",
            "executor.queue.queue_timeout_seconds",
            "executor.queue.no_route_retry_ms",
            "executor.queue.no_route_timeout_seconds",
            "executor.queue.passivate_after_seconds",
            "executor.queue.enable_metrics",
            "executor.queue.metrics_idle_after_seconds",
            "executor.emergency_mode",
            "executor.durability",
            "executor.remember_ended_ids",
            "executor.shutdown_timeout_seconds",
            "policies.default.concurrency_limit",
            "policies.actions",
            "rabbitmq.url",
            "rabbitmq.max_deliveries",
            "rabbitmq.queue_type",
            "rabbitmq.heartbeat_seconds",
            "cluster.partitions",
            "cluster.instance_id",
            "cluster.mode",
            "rabbitmq.prefetch",
            "rabbitmq.confirm_window",
            "rabbitmq.max_message_bytes",
            "rabbitmq.reconnect_max_backoff_ms",
            "database.url",
            "database.schema",
            "database.max_connections",
            "database.flush_interval_ms",
            "database.batch_max_rows",
            "database.dispatch_wait",
            "stats.interval_ms",
            "stats.snapshot_interval_seconds",
            "dlq.enabled",
            "dlq.ttl_hours",
            "dlq.max_entries",
            "purge.enabled",
            "purge.interval_seconds",
            "purge.dry_run",
            "purge.max_queued_age_seconds",
            "purge.max_running_age_seconds",
            "purge.max_completed_age_seconds",
            "purge.max_stale_stats_age_seconds",
            "health.enabled",
            "health.interval_seconds",
            "health.thresholds.queue_length_warning",
            "health.thresholds.queue_length_critical",
            "health.thresholds.oldest_age_warning_seconds",
            "health.thresholds.oldest_age_critical_seconds",
            "health.thresholds.dlq_warning",
            "health.thresholds.dlq_critical",
            "health.thresholds.stuck_age_seconds",
            "health.thresholds.stuck_warning",
            "health.thresholds.stuck_critical",
            "health.thresholds.stalled_seconds",
            "api.listen",
            "api.max_body_bytes",
            "logging.filter",
            "logging.json",
        ] {
            let segments: Vec<&str> = path.split('.').collect();
            assert!(lookup(&tree, &segments).is_some(), "{path} missing");
        }
    }

    #[test]
    fn default_yaml_documents_emergency_mode_as_specified() {
        let flattened: String = DEFAULT_YAML
            .lines()
            .map(|line| line.trim().trim_start_matches('#').trim())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(flattened.contains(
            "When true: queued executions are never timed out or purged for age (an overload \
             must not turn into a mass dead-lettering), and per-action rate limits are lifted. \
             Concurrency limits and max_queue_length still hold (raise them explicitly, as the \
             runbook does with max_queue_length: 50000). /health reports emergency mode and \
             the gauge attune_emergency_mode is 1."
        ));
    }

    #[test]
    fn the_built_in_defaults_are_valid() {
        assert_eq!(from_env(&[]).expect("defaults load"), Config::default());
    }

    #[test]
    fn validate_action_ref_accepts_and_refuses() {
        assert!(validate_action_ref("core.http.get").is_ok());
        assert!(validate_action_ref("A-b_9").is_ok());
        assert!(validate_action_ref(&"a".repeat(255)).is_ok());
        assert!(validate_action_ref("").is_err());
        assert!(validate_action_ref(&"a".repeat(256)).is_err());
        assert!(validate_action_ref("core/http").is_err());
        assert!(validate_action_ref("café").is_err());
    }
}
