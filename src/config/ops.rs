//! The sections of what operators and monitoring see and do: `stats`, `dlq`, `purge`,
//! `health`, `api` and `logging`.

use std::net::{Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;

use serde::Deserialize;

use super::Secret;

/// `stats.*`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatsConfig {
    /// How often changed queues are written to `attune.queue_stats`.
    pub interval_ms: u64,
    /// How often non-idle queues are copied to `attune.queue_snapshots` (growth-rate queries).
    pub snapshot_interval_seconds: u64,
}

impl Default for StatsConfig {
    fn default() -> Self {
        Self {
            interval_ms: 1000,
            snapshot_interval_seconds: 300,
        }
    }
}

/// `dlq.*`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DlqConfig {
    /// Whether failed executions are published to `attune.dlx` (otherwise only logged and
    /// counted).
    pub enabled: bool,
    /// How long a dead letter stays in `attune.dlq` (`x-message-ttl`).
    pub ttl_hours: u64,
    /// Most dead letters kept; the oldest are dropped first (`x-max-length`, `drop-head`).
    pub max_entries: u64,
}

impl Default for DlqConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            ttl_hours: 168,
            max_entries: 10_000,
        }
    }
}

/// `purge.*`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PurgeConfig {
    /// Whether the periodic purge runs at all.
    pub enabled: bool,
    /// Time between purge runs.
    pub interval_seconds: u64,
    /// Log and count what would be purged without changing anything.
    pub dry_run: bool,
    /// Queued executions older than this are dead-lettered (`queue_from: queued`), except in
    /// emergency mode.
    pub max_queued_age_seconds: u64,
    /// Running executions without a completion for this long are dead-lettered
    /// (`queue_from: running`) and their slot is reclaimed.
    pub max_running_age_seconds: u64,
    /// Finished execution rows older than this are deleted from Postgres.
    pub max_completed_age_seconds: u64,
    /// Idle `queue_stats` rows not updated for this long are deleted.
    pub max_stale_stats_age_seconds: u64,
}

impl Default for PurgeConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_seconds: 3600,
            dry_run: false,
            max_queued_age_seconds: 7200,
            max_running_age_seconds: 3600,
            max_completed_age_seconds: 604_800,
            max_stale_stats_age_seconds: 3600,
        }
    }
}

/// `health.*`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Whether the periodic health check runs (`/health` otherwise reports only liveness).
    pub enabled: bool,
    /// Time between health checks.
    pub interval_seconds: u64,
    /// Levels at which a check turns degraded (warning) or unhealthy (critical).
    pub thresholds: HealthThresholds,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_seconds: 60,
            thresholds: HealthThresholds::default(),
        }
    }
}

/// `health.thresholds.*`; each warning must not exceed its critical counterpart.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthThresholds {
    /// Longest queue (waiting executions) that is still healthy.
    pub queue_length_warning: u64,
    /// Longest queue that is still only degraded.
    pub queue_length_critical: u64,
    /// Oldest waiting execution, in seconds, that is still healthy.
    pub oldest_age_warning_seconds: u64,
    /// Oldest waiting execution, in seconds, that is still only degraded.
    pub oldest_age_critical_seconds: u64,
    /// Dead letters (`attune.dlq` depth) that are still healthy.
    pub dlq_warning: u64,
    /// Dead letters that are still only degraded.
    pub dlq_critical: u64,
    /// A running execution without a completion for this long counts as stuck.
    pub stuck_age_seconds: u64,
    /// Stuck executions that are still healthy.
    pub stuck_warning: u64,
    /// Stuck executions that are still only degraded.
    pub stuck_critical: u64,
    /// A non-empty queue that has not progressed (nothing dispatched or completed) for this
    /// long is unhealthy.
    pub stalled_seconds: u64,
}

impl Default for HealthThresholds {
    fn default() -> Self {
        Self {
            queue_length_warning: 100,
            queue_length_critical: 500,
            oldest_age_warning_seconds: 600,
            oldest_age_critical_seconds: 1800,
            dlq_warning: 100,
            dlq_critical: 1000,
            stuck_age_seconds: 600,
            stuck_warning: 10,
            stuck_critical: 50,
            stalled_seconds: 600,
        }
    }
}

/// `api.*`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Address the HTTP server binds (port 0 picks a free port, for tests).
    pub listen: SocketAddr,
    /// Bearer token required by every endpoint that changes state. Unset: those endpoints
    /// refuse every request; there is no unauthenticated mode.
    pub admin_token: Option<Secret>,
    /// A file holding the admin token instead (its whole content, surrounding whitespace and
    /// the final newline trimmed), read at start and at each reload; exclusive with
    /// `admin_token`. Keeps the token out of the config file and of the environment.
    pub admin_token_file: Option<std::path::PathBuf>,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// The runbook's "API rate limiting": a throttle on intake.
    pub rate_limits: RateLimitsConfig,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)),
            admin_token: None,
            admin_token_file: None,
            max_body_bytes: 64 * 1024,
            rate_limits: RateLimitsConfig::default(),
        }
    }
}

/// `api.rate_limits.*`
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitsConfig {
    /// One limit on all execution requests taken from RabbitMQ; absent: no limit.
    pub global: Option<GlobalRateLimit>,
}

/// `api.rate_limits.global`: the runbook writes it both with and without `enabled`, so a
/// section that names a rate is on unless it says `enabled: false`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlobalRateLimit {
    /// Lets an operator keep the number in the file while switching the limit off.
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
    /// Execution requests taken from RabbitMQ per minute, all actions together; the rest wait
    /// in the broker.
    pub max_requests_per_minute: u32,
}

fn enabled_by_default() -> bool {
    true
}

impl RateLimitsConfig {
    /// The intake limit in force, if any.
    pub fn intake_per_minute(&self) -> Option<NonZeroU32> {
        self.global
            .as_ref()
            .filter(|g| g.enabled)
            .and_then(|g| NonZeroU32::new(g.max_requests_per_minute))
    }
}

/// `logging.*`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// `tracing` filter directives (`info`, `fifo_executor=debug,lapin=warn`).
    pub filter: String,
    /// One JSON object per line instead of human-readable text.
    pub json: bool,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            filter: "info".to_owned(),
            json: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use crate::config::Config;
    use crate::config::testing::from_yaml;

    #[test]
    fn the_runbook_api_rate_limit_loads_with_and_without_enabled() {
        let on = from_yaml(
            "api:\n  rate_limits:\n    global:\n      enabled: true\n      \
             max_requests_per_minute: 500\n",
        )
        .expect("loads");
        assert_eq!(
            on.api.rate_limits.intake_per_minute().map(NonZeroU32::get),
            Some(500)
        );
        let implicit =
            from_yaml("api:\n  rate_limits:\n    global:\n      max_requests_per_minute: 1000\n")
                .expect("loads");
        assert_eq!(
            implicit
                .api
                .rate_limits
                .intake_per_minute()
                .map(NonZeroU32::get),
            Some(1000)
        );
        let off = from_yaml(
            "api:\n  rate_limits:\n    global:\n      enabled: false\n      \
             max_requests_per_minute: 500\n",
        )
        .expect("loads");
        assert_eq!(off.api.rate_limits.intake_per_minute(), None);
        let off_at_zero = from_yaml(
            "api:\n  rate_limits:\n    global:\n      enabled: false\n      \
             max_requests_per_minute: 0\n",
        )
        .expect("switched off, the number is not checked");
        assert_eq!(off_at_zero.api.rate_limits.intake_per_minute(), None);
        assert_eq!(Config::default().api.rate_limits.intake_per_minute(), None);
    }
}
