//! The sections the core reads: `executor.*` (queue limits, durability, shutdown) and
//! `policies.*`, and the [`Policy`] they resolve to for one action.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::Config;

/// `executor.*`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecutorConfig {
    /// Per-action queue limits.
    pub queue: QueueConfig,
    /// Overload mode from the runbook. When true: queued executions are never timed out or
    /// purged for age (an overload must not turn into a mass dead-lettering), and per-action
    /// rate limits are lifted ([`Config::policy_for`] already applies this). Concurrency limits
    /// and `max_queue_length` still hold. `/health` reports it and the gauge
    /// `attune_emergency_mode` is 1.
    pub emergency_mode: bool,
    /// Where accepted executions are recorded before they are acknowledged to RabbitMQ.
    pub durability: Durability,
    /// How many ended execution ids are kept in memory, so that a request redelivered after
    /// its execution ended is answered as a duplicate without asking Postgres. On the ledger,
    /// older ids are looked up in the `execution` table; in memory mode they are forgotten.
    pub remember_ended_ids: usize,
    /// How long shutdown may take to drain actors and flush the last statistics before the
    /// process exits anyway.
    pub shutdown_timeout_seconds: u64,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        Self {
            queue: QueueConfig::default(),
            emergency_mode: false,
            durability: Durability::default(),
            remember_ended_ids: crate::core::policy::DEFAULT_REMEMBER_ENDED,
            shutdown_timeout_seconds: 30,
        }
    }
}

/// `executor.queue.*`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Waiting executions per action; a request beyond this is rejected to the DLQ as
    /// `QueueFull`. Bounds memory during an overload.
    pub max_queue_length: usize,
    /// Longest an execution may wait in its queue before it is timed out to the DLQ
    /// (suspended in emergency mode).
    pub queue_timeout_seconds: u64,
    /// While an action's dispatches find no worker queue (the broker returns them), how
    /// often its head is tried again, in milliseconds.
    pub no_route_retry_ms: u64,
    /// How long an action's dispatches may find no worker queue before those that come back
    /// are dead-lettered (`NoRoute`); 0 never. Not applied in emergency mode.
    pub no_route_timeout_seconds: u64,
    /// Seconds an action may stay idle (nothing waiting or running) before its actor retires,
    /// leaving its counters in a record of about a hundred bytes; its next message starts a
    /// new actor from it. 0 never. Keeps the memory of many rarely used actions small.
    pub passivate_after_seconds: u64,
    /// Whether Prometheus metrics are recorded and served on `/metrics`; the runbook turns them
    /// off to shed overhead in a crash loop.
    pub enable_metrics: bool,
    /// How long after its last change an action with nothing waiting or running keeps its
    /// per-action series on `/metrics` (`attune_queue_*{action}`, `attune_executions_total`).
    /// Long enough for `rate()` to see its last increments; an action that queues again gets
    /// its series back at the next scrape.
    pub metrics_idle_after_seconds: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            max_queue_length: 10_000,
            queue_timeout_seconds: 3600,
            no_route_retry_ms: 1000,
            no_route_timeout_seconds: 600,
            passivate_after_seconds: crate::core::policy::DEFAULT_PASSIVATE_AFTER.as_secs(),
            enable_metrics: true,
            metrics_idle_after_seconds: 600,
        }
    }
}

/// How accepted executions survive a restart of the executor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Every accepted execution is written to Postgres before its message is acknowledged, so
    /// a restart loses nothing.
    #[default]
    Ledger,
    /// Queues live only in memory; a restart drops what was queued. For tests and benchmarks.
    Memory,
}

/// `policies.*`
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoliciesConfig {
    /// Policy of every action that has no entry (or no value for a field) in `actions`.
    pub default: DefaultPolicy,
    /// Per-action overrides, keyed by action ref (`core.http.get`).
    pub actions: BTreeMap<String, ActionPolicy>,
}

/// `policies.default.*`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DefaultPolicy {
    /// Executions of one action that may run at the same time.
    pub concurrency_limit: u32,
    /// Dispatch rate cap per action; `None` means no cap.
    pub rate_limit: Option<RateLimit>,
}

impl Default for DefaultPolicy {
    fn default() -> Self {
        Self {
            concurrency_limit: 1,
            rate_limit: None,
        }
    }
}

/// `policies.actions.<action_ref>.*`: each field left out falls back to `policies.default`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActionPolicy {
    /// Executions of this action that may run at the same time.
    pub concurrency_limit: Option<u32>,
    /// Dispatch rate cap for this action. There is no way to exempt one action from a default
    /// rate limit; give it a generous one instead.
    pub rate_limit: Option<RateLimit>,
    /// Whether the action accepts new executions. Unset leaves the decision to the
    /// `attune.action.enabled` column, which is what the runbook flips in an emergency.
    pub enabled: Option<bool>,
}

/// At most `max` dispatches per `per_seconds` seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Dispatches allowed in each window.
    pub max: u32,
    /// Length of the window in seconds.
    pub per_seconds: u64,
}

/// The limits that apply to one action once defaults, overrides and emergency mode are
/// resolved. See [`Config::policy_for`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Executions of the action that may run at the same time (at least 1).
    pub concurrency_limit: u32,
    /// Dispatch rate cap, if any.
    pub rate_limit: Option<RateLimit>,
}

impl Config {
    /// The limits for `action_ref`: its own `policies.actions` entry where it sets a field,
    /// `policies.default` otherwise. In emergency mode rate limits are lifted.
    pub fn policy_for(&self, action_ref: &str) -> Policy {
        let default = &self.policies.default;
        let own = self.policies.actions.get(action_ref);
        let concurrency_limit = own
            .and_then(|policy| policy.concurrency_limit)
            .unwrap_or(default.concurrency_limit);
        let rate_limit = if self.executor.emergency_mode {
            None
        } else {
            own.and_then(|policy| policy.rate_limit)
                .or(default.rate_limit)
        };
        Policy {
            concurrency_limit,
            rate_limit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::from_yaml;

    #[test]
    fn runbook_snippets_load() {
        let config = from_yaml(
            "executor:\n  emergency_mode: true\n  queue:\n    max_queue_length: 50000\n\
             policies:\n  actions:\n    affected.action:\n      concurrency_limit: 10\n",
        )
        .expect("loads");
        assert!(config.executor.emergency_mode);
        assert_eq!(config.executor.queue.max_queue_length, 50_000);
        assert_eq!(config.policy_for("affected.action").concurrency_limit, 10);
    }

    #[test]
    fn policy_for_resolves_overrides_and_defaults() {
        let config = from_yaml(
            "policies:\n\
             \x20 default:\n\
             \x20   concurrency_limit: 2\n\
             \x20   rate_limit: {max: 10, per_seconds: 1}\n\
             \x20 actions:\n\
             \x20   core.http.get:\n\
             \x20     concurrency_limit: 5\n\
             \x20   core.slow:\n\
             \x20     rate_limit: {max: 1, per_seconds: 60}\n",
        )
        .expect("loads");
        let default_rate = RateLimit {
            max: 10,
            per_seconds: 1,
        };
        assert_eq!(
            config.policy_for("core.http.get"),
            Policy {
                concurrency_limit: 5,
                rate_limit: Some(default_rate),
            },
            "own concurrency limit, inherited rate limit"
        );
        assert_eq!(
            config.policy_for("core.slow"),
            Policy {
                concurrency_limit: 2,
                rate_limit: Some(RateLimit {
                    max: 1,
                    per_seconds: 60
                }),
            },
            "own rate limit, default concurrency limit"
        );
        assert_eq!(
            config.policy_for("never.configured"),
            Policy {
                concurrency_limit: 2,
                rate_limit: Some(default_rate),
            },
            "everything from the default"
        );
    }

    #[test]
    fn emergency_mode_lifts_rate_limits_but_not_concurrency_limits() {
        let config = from_yaml(
            "executor:\n  emergency_mode: true\n\
             policies:\n  default:\n    rate_limit: {max: 10, per_seconds: 1}\n\
             \x20 actions:\n    core.x:\n      concurrency_limit: 3\n\
             \x20     rate_limit: {max: 1, per_seconds: 1}\n",
        )
        .expect("loads");
        assert_eq!(
            config.policy_for("core.x"),
            Policy {
                concurrency_limit: 3,
                rate_limit: None
            }
        );
        assert_eq!(config.policy_for("other").rate_limit, None);
    }
}
