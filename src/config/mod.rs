//! Typed, validated configuration.
//!
//! # Layers
//!
//! 1. Built-in defaults: the `Default` impl of each section struct below. They are the only
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

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml_ng::{Mapping, Value};

/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "ATTUNE__";

/// Longest action ref accepted anywhere (requests, config, HTTP paths).
pub use crate::model::MAX_ACTION_REF_LEN;

/// Postgres truncates identifiers longer than this (NAMEDATALEN - 1).
const MAX_SCHEMA_LEN: usize = 63;

/// RabbitMQ refuses `x-message-ttl` values above this many milliseconds (Erlang timer limit).
const RABBITMQ_MAX_TTL_MS: u64 = 4_294_967_295;

/// RabbitMQ's hard ceiling for `max_message_size` (512 MiB).
const RABBITMQ_MAX_MESSAGE_BYTES: usize = 512 * 1024 * 1024;

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
}

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
            remember_ended_ids: crate::core::registry::DEFAULT_REMEMBER_ENDED,
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
    /// Whether Prometheus metrics are recorded and served on `/metrics`; the runbook turns them
    /// off to shed overhead in a crash loop.
    pub enable_metrics: bool,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            max_queue_length: 10_000,
            queue_timeout_seconds: 3600,
            no_route_retry_ms: 1000,
            no_route_timeout_seconds: 600,
            enable_metrics: true,
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

/// `rabbitmq.*`
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RabbitConfig {
    /// AMQP URI of the broker, vhost included (`%2f` is `/`). Only `amqp://`: this build has
    /// no TLS support.
    pub url: String,
    /// Deliveries of one message before it is dead-lettered as `PoisonMessage`, so a message
    /// that crashes the executor cannot loop forever.
    pub max_deliveries: u32,
    /// Kind of the executor's own queues.
    pub queue_type: QueueType,
    /// Unacknowledged messages the broker may push to each consumer; bounds memory and sets
    /// how much can be acknowledged in one batch.
    pub prefetch: u16,
    /// Dispatches, dead letters and replies the executor keeps awaiting their publisher
    /// confirm at once: enough to keep the broker's fsync batches full, small enough that a
    /// reconnect sends little again.
    pub confirm_window: usize,
    /// Largest message body accepted; bigger ones are dead-lettered unread.
    pub max_message_bytes: usize,
    /// Ceiling of the exponential back-off between reconnection attempts.
    pub reconnect_max_backoff_ms: u64,
}

impl Default for RabbitConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned(),
            max_deliveries: 5,
            queue_type: QueueType::default(),
            prefetch: 1000,
            confirm_window: 512,
            max_message_bytes: 1024 * 1024,
            reconnect_max_backoff_ms: 5000,
        }
    }
}

// The URL carries the broker password, and configs get logged at start-up.
impl fmt::Debug for RabbitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitConfig")
            .field("url", &redact_url_password(&self.url))
            .field("max_deliveries", &self.max_deliveries)
            .field("queue_type", &self.queue_type)
            .field("prefetch", &self.prefetch)
            .field("confirm_window", &self.confirm_window)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("reconnect_max_backoff_ms", &self.reconnect_max_backoff_ms)
            .finish()
    }
}

/// RabbitMQ queue type of the executor's queues: the topology's own type, so the setting needs
/// no translation on its way to the declaration.
pub use crate::rabbit::topology::QueueKind as QueueType;

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

/// A value that must not end up in logs: `Debug` prints a placeholder.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the rare place that must send it somewhere.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Compares with a candidate (a bearer token from a request) in time that does not depend
    /// on where they differ, so response timing does not reveal a prefix of the secret.
    pub fn matches(&self, candidate: &str) -> bool {
        let (secret, candidate) = (self.0.as_bytes(), candidate.as_bytes());
        if secret.len() != candidate.len() {
            return false;
        }
        let difference = secret
            .iter()
            .zip(candidate)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(difference) == 0
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.matches(&other.0)
    }
}

impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Replaces the password in `scheme://user:password@host/...` and in a `password=` query
/// parameter (Postgres accepts both) so the URL can be logged.
fn redact_url_password(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let mut redacted = redact_userinfo_password(base);
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((name, _)) if name.eq_ignore_ascii_case("password") => format!("{name}=***"),
                _ => param.to_owned(),
            })
            .collect();
        redacted.push('?');
        redacted.push_str(&params.join("&"));
    }
    redacted
}

fn redact_userinfo_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    // The last '@' ends the userinfo: a password with an unencoded '@' is still hidden whole.
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let (userinfo, host) = authority.split_at(at);
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***{host}{}", &rest[authority_end..]),
        None => url.to_owned(),
    }
}

impl Config {
    /// Reads the YAML file at `path` (built-in defaults when `None`), applies `ATTUNE__*`
    /// variables from the process environment and validates the result.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let file = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                Some((path.display().to_string(), text))
            }
            None => None,
        };
        let env = process_env()?;
        Config::load_from(
            file.as_ref()
                .map(|(name, text)| (name.as_str(), text.as_str())),
            env,
        )
    }

    /// Like [`Config::load`] but with the YAML text (`(source name, text)`) and the environment
    /// passed in, so tests do not touch the process environment.
    pub fn load_from(
        yaml_text: Option<(&str, &str)>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let file = match yaml_text {
            Some((name, text)) => Some((name.to_owned(), parse_file(name, text)?)),
            None => None,
        };
        let overrides = parse_env(env)?;
        let mut tree = file
            .as_ref()
            .map_or_else(|| Value::Mapping(Mapping::new()), |(_, tree)| tree.clone());
        for over in &overrides {
            set_at(&mut tree, &over.path, over.value.clone()).map_err(|reason| {
                ConfigError::Env {
                    var: over.var.clone(),
                    reason,
                }
            })?;
        }
        let provenance = Provenance {
            file: file.as_ref().map(|(name, tree)| (name.as_str(), tree)),
            env: &overrides,
        };
        let config = deserialize(&mut tree, &provenance)?;
        config.validate(&provenance)?;
        Ok(config)
    }

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

/// Checks that `s` is a valid action ref: 1 to 255 characters of `[A-Za-z0-9_.-]`. The error
/// says what is wrong, without repeating the input.
pub fn validate_action_ref(s: &str) -> Result<(), String> {
    crate::model::validate_action_ref(s).map_err(|e| e.to_string())
}

/// Where a configuration value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The YAML file (its path as given).
    File(String),
    /// An environment variable (its name).
    Env(String),
    /// Nobody set it: the built-in default.
    Default,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(path) => write!(f, "in file {path}"),
            Origin::Env(var) => write!(f, "from environment variable {var}"),
            Origin::Default => f.write_str("built-in default"),
        }
    }
}

/// Why the configuration could not be loaded. Every variant that concerns a key names it as a
/// dotted path, along with where its value came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read (missing, unreadable, not UTF-8).
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The path as given.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The config file is not YAML, or not a mapping of sections.
    #[error("config file {file} is not valid: {message}")]
    Syntax {
        /// The file's name as given.
        file: String,
        /// What is wrong, with the line and column when known.
        message: String,
    },
    /// An `ATTUNE__*` variable that cannot be applied at all.
    #[error("environment variable {var}: {reason}")]
    Env {
        /// Name of the variable.
        var: String,
        /// Why it was refused.
        reason: String,
    },
    /// A key the configuration does not have (usually a typo).
    #[error("unknown key `{key}` ({origin}); {expected}")]
    UnknownKey {
        /// Dotted path of the unknown key.
        key: String,
        /// Where it was written.
        origin: Origin,
        /// The keys allowed at that place.
        expected: String,
    },
    /// A value of the wrong type or out of the type's range, or a missing required key.
    #[error("`{key}` ({origin}): {message}")]
    WrongType {
        /// Dotted path of the key.
        key: String,
        /// Where its value came from.
        origin: Origin,
        /// What was expected and what was found.
        message: String,
    },
    /// A well-typed value that cannot work (a limit of 0, warning above critical, ...).
    #[error("`{key}` ({origin}): {message}")]
    Invalid {
        /// Dotted path of the key.
        key: String,
        /// Where its value came from.
        origin: Origin,
        /// What is wrong and what was expected.
        message: String,
    },
    /// More than one impossible value; each is an [`ConfigError::Invalid`].
    #[error("{} configuration problems:\n{}", .0.len(), list_problems(.0))]
    Several(Vec<ConfigError>),
}

fn list_problems(problems: &[ConfigError]) -> String {
    problems
        .iter()
        .map(|problem| format!("  - {problem}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// One `ATTUNE__*` variable, decoded.
#[derive(Debug, Clone)]
struct EnvOverride {
    var: String,
    /// Lowercased key path.
    path: Vec<String>,
    /// The value as it is merged: a YAML number or boolean, or the raw text.
    value: Value,
    /// The raw text, for when a number or boolean turns out to be meant as text.
    text: String,
}

/// What the file and the environment set, to say where a value came from.
struct Provenance<'a> {
    file: Option<(&'a str, &'a Value)>,
    env: &'a [EnvOverride],
}

impl Provenance<'_> {
    /// Origin of the value at `path` as deserialized (an error there, or a whole section that
    /// failed, is blamed on the innermost source that wrote at or below it).
    fn origin_of(&self, path: &[String]) -> Origin {
        if let Some(over) = self.env.iter().find(|over| over.path == path) {
            return Origin::Env(over.var.clone());
        }
        if let Some((name, tree)) = self.file
            && lookup(tree, path).is_some()
        {
            return Origin::File(name.to_owned());
        }
        // A missing required key inside a mapping: blame whoever wrote into that mapping.
        if let Some(over) = self.env.iter().find(|over| over.path.starts_with(path)) {
            return Origin::Env(over.var.clone());
        }
        match self.file {
            Some((name, _)) => Origin::File(name.to_owned()),
            None => Origin::Default,
        }
    }

    /// Origin of a value that passed deserialization: the environment, the file, or neither.
    fn origin_of_value(&self, path: &[&str]) -> Origin {
        if let Some(over) = self.env.iter().find(|over| over.path == path) {
            return Origin::Env(over.var.clone());
        }
        match self.file {
            Some((name, tree)) if lookup(tree, path).is_some() => Origin::File(name.to_owned()),
            _ => Origin::Default,
        }
    }
}

fn lookup<'v, S: AsRef<str>>(tree: &'v Value, path: &[S]) -> Option<&'v Value> {
    path.iter()
        .try_fold(tree, |node, key| node.as_mapping()?.get(key.as_ref()))
}

/// Renders a key path, quoting the segments that are not plain words (action refs).
fn dotted<S: AsRef<str>>(path: &[S]) -> String {
    if path.is_empty() {
        return "(top level)".to_owned();
    }
    path.iter()
        .map(|segment| {
            let segment = segment.as_ref();
            let plain = !segment.is_empty()
                && segment
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if plain {
                segment.to_owned()
            } else {
                format!("{segment:?}")
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

fn process_env() -> Result<Vec<(String, String)>, ConfigError> {
    let mut vars = Vec::new();
    for (name, value) in std::env::vars_os() {
        if !name.as_encoded_bytes().starts_with(ENV_PREFIX.as_bytes()) {
            continue;
        }
        let name = name.to_string_lossy().into_owned();
        let Ok(value) = value.into_string() else {
            return Err(ConfigError::Env {
                var: name,
                reason: "the value is not valid UTF-8".to_owned(),
            });
        };
        vars.push((name, value));
    }
    Ok(vars)
}

fn parse_file(name: &str, text: &str) -> Result<Value, ConfigError> {
    let syntax = |message: String| ConfigError::Syntax {
        file: name.to_owned(),
        message,
    };
    let mut tree: Value = serde_yaml_ng::from_str(text).map_err(|e| syntax(e.to_string()))?;
    // Anchors and `<<` merge keys let operators share a policy between actions.
    tree.apply_merge().map_err(|e| syntax(e.to_string()))?;
    match tree {
        Value::Null => Ok(Value::Mapping(Mapping::new())),
        Value::Mapping(_) => Ok(tree),
        _ => Err(syntax(
            "the top level must be a mapping of sections (executor:, policies:, ...)".to_owned(),
        )),
    }
}

fn parse_env(
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<EnvOverride>, ConfigError> {
    let mut overrides = Vec::new();
    for (var, text) in env {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let refuse = |reason: &str| ConfigError::Env {
            var: var.clone(),
            reason: reason.to_owned(),
        };
        let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        if path.iter().any(String::is_empty) {
            return Err(refuse(
                "empty key name: levels are separated by exactly one double underscore, \
                 as in ATTUNE__EXECUTOR__QUEUE__MAX_QUEUE_LENGTH",
            ));
        }
        if path.len() > 2 && path[..2] == ["policies", "actions"] {
            return Err(refuse(
                "per-action policies cannot be set from the environment (action refs contain \
                 dots and are case-sensitive); set policies.actions in the config file",
            ));
        }
        let value = match serde_yaml_ng::from_str::<Value>(&text) {
            Ok(typed @ (Value::Bool(_) | Value::Number(_))) => typed,
            _ => Value::String(text.clone()),
        };
        overrides.push(EnvOverride {
            var,
            path,
            value,
            text,
        });
    }
    // Parents before children, so that a variable setting a whole section and another setting
    // a key inside it conflict visibly instead of depending on the environment's order.
    overrides.sort_by(|a, b| a.path.cmp(&b.path).then_with(|| a.var.cmp(&b.var)));
    for pair in overrides.windows(2) {
        if pair[0].path == pair[1].path {
            return Err(ConfigError::Env {
                var: pair[1].var.clone(),
                reason: format!(
                    "sets `{}`, which {} sets too",
                    dotted(&pair[1].path),
                    pair[0].var
                ),
            });
        }
    }
    Ok(overrides)
}

/// Puts `value` at `path`, creating the sections on the way.
fn set_at(tree: &mut Value, path: &[String], value: Value) -> Result<(), String> {
    let Some((last, parents)) = path.split_last() else {
        return Err("no key after the prefix".to_owned());
    };
    let mut node = tree;
    for (depth, key) in parents.iter().enumerate() {
        if node.is_null() {
            *node = Value::Mapping(Mapping::new());
        }
        let Some(mapping) = node.as_mapping_mut() else {
            return Err(format!(
                "cannot set `{}`: `{}` is a single value, not a section",
                dotted(path),
                dotted(&path[..depth])
            ));
        };
        node = mapping
            .entry(Value::String(key.clone()))
            .or_insert(Value::Null);
    }
    if node.is_null() {
        *node = Value::Mapping(Mapping::new());
    }
    match node.as_mapping_mut() {
        Some(mapping) => {
            mapping.insert(Value::String(last.clone()), value);
            Ok(())
        }
        None => Err(format!(
            "cannot set `{}`: `{}` is a single value, not a section",
            dotted(path),
            dotted(parents)
        )),
    }
}

fn deserialize(tree: &mut Value, provenance: &Provenance<'_>) -> Result<Config, ConfigError> {
    // Errors met while an env value was still a number or boolean, kept in case reading it as
    // text fails too: "expected true or false, found integer `1`" beats the text's complaint.
    let mut typed_errors: Vec<(Vec<String>, String)> = Vec::new();
    loop {
        let error = match serde_path_to_error::deserialize::<_, Config>(&*tree) {
            Ok(config) => return Ok(config),
            Err(error) => error,
        };
        let path = path_segments(error.path());
        let already_retried = typed_errors.iter().any(|(retried, _)| *retried == path);
        let retry = provenance
            .env
            .iter()
            .find(|over| over.path == path && !over.value.is_string());
        if let (Some(over), false) = (retry, already_retried) {
            // `ATTUNE__API__ADMIN_TOKEN=12345` is text, not a number: the key decides.
            set_at(tree, &over.path, Value::String(over.text.clone())).map_err(|reason| {
                ConfigError::Env {
                    var: over.var.clone(),
                    reason,
                }
            })?;
            typed_errors.push((path, error.inner().to_string()));
            continue;
        }
        let message = typed_errors
            .iter()
            .find(|(typed_path, _)| *typed_path == path)
            .map_or_else(|| error.inner().to_string(), |(_, m)| m.clone());
        return Err(describe_serde_error(
            &path,
            provenance.origin_of(&path),
            &message,
        ));
    }
}

fn path_segments(path: &serde_path_to_error::Path) -> Vec<String> {
    use serde_path_to_error::Segment;
    path.iter()
        .map(|segment| match segment {
            Segment::Map { key } => key.clone(),
            Segment::Seq { index } => format!("[{index}]"),
            Segment::Enum { variant } => variant.clone(),
            Segment::Unknown => NON_TEXT_KEY.to_owned(),
        })
        .collect()
}

/// Stands for a mapping key that is not a string in an error path (no real key contains a NUL).
const NON_TEXT_KEY: &str = "\0";

/// Keys whose values must not be echoed in error messages.
const SENSITIVE_KEYS: [&[&str]; 3] = [
    &["api", "admin_token"],
    &["rabbitmq", "url"],
    &["database", "url"],
];

/// Turns serde's message into one that speaks of keys and plain types.
fn describe_serde_error(path: &[String], origin: Origin, message: &str) -> ConfigError {
    let key = dotted(path);
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let expected = rest.split_once("`, ").map_or(
            "see config/default.yaml for the keys that exist",
            |(_, e)| e,
        );
        return ConfigError::UnknownKey {
            key,
            origin,
            expected: expected.to_owned(),
        };
    }
    if path.last().is_some_and(|segment| segment == NON_TEXT_KEY) {
        // YAML reads an unquoted `123:` or `true:` as a number or boolean, not as a name.
        let parent = dotted(&path[..path.len() - 1]);
        let found = message
            .rsplit_once("found ")
            .or_else(|| message.split_once(": "))
            .map_or(message, |(_, found)| found);
        return ConfigError::WrongType {
            key: parent,
            origin,
            message: format!(
                "has a key that is not text ({found}); quote keys that read as numbers or \
                 booleans, as in \"123\":"
            ),
        };
    }
    let sensitive = SENSITIVE_KEYS.iter().any(|k| path == *k);
    let message = if let Some(field) = message.strip_prefix("missing field ") {
        format!("missing required key {field}")
    } else if let Some(rest) = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "))
    {
        match rest.rfind(", expected ") {
            Some(at) => {
                let found = &rest[..at];
                let expected = plain_expectation(&rest[at + ", expected ".len()..]);
                if sensitive {
                    format!("expected {expected}")
                } else {
                    let found = if found == "unit value" {
                        "an empty value"
                    } else {
                        found
                    };
                    format!("expected {expected}, found {found}")
                }
            }
            None if sensitive => "invalid value".to_owned(),
            None => message.to_owned(),
        }
    } else if path == ["api", "listen"] {
        format!("{message}; expected an IP address and port such as 127.0.0.1:8080")
    } else {
        message.to_owned()
    };
    ConfigError::WrongType {
        key,
        origin,
        message,
    }
}

fn plain_expectation(expected: &str) -> String {
    match expected {
        "u64" | "usize" => "a non-negative integer".to_owned(),
        "u32" => format!("a non-negative integer up to {}", u32::MAX),
        "u16" => format!("a non-negative integer up to {}", u16::MAX),
        "a boolean" => "true or false".to_owned(),
        "a Value::Tagged enum" => "a name (string)".to_owned(),
        "a map" => "a mapping".to_owned(),
        other if other.starts_with("struct ") => "a section (a mapping of keys)".to_owned(),
        other => other.to_owned(),
    }
}

impl Config {
    fn validate(&self, provenance: &Provenance<'_>) -> Result<(), ConfigError> {
        let mut check = Validator {
            provenance,
            problems: Vec::new(),
        };
        check.executor(&self.executor);
        check.policies(&self.policies);
        check.rabbitmq(&self.rabbitmq);
        check.database(&self.database);
        check.stats(&self.stats);
        check.dlq(&self.dlq);
        check.purge(&self.purge);
        check.health(&self.health);
        check.api(&self.api);
        check.logging(&self.logging);
        let mut problems = check.problems;
        match problems.len() {
            0 => Ok(()),
            1 => Err(problems.remove(0)),
            _ => Err(ConfigError::Several(problems)),
        }
    }
}

struct Validator<'a> {
    provenance: &'a Provenance<'a>,
    problems: Vec<ConfigError>,
}

impl Validator<'_> {
    fn require(&mut self, ok: bool, path: &[&str], message: impl FnOnce() -> String) {
        if !ok {
            self.problems.push(ConfigError::Invalid {
                key: dotted(path),
                origin: self.provenance.origin_of_value(path),
                message: message(),
            });
        }
    }

    /// Rejects 0, saying what 0 would mean.
    fn positive(&mut self, path: &[&str], is_zero: bool, zero_means: &str) {
        self.require(!is_zero, path, || {
            format!("must be at least 1, got 0 ({zero_means})")
        });
    }

    fn interval(&mut self, path: &[&str], is_zero: bool) {
        self.positive(path, is_zero, "an interval of 0 would spin");
    }

    fn warning_below_critical(&mut self, section: &[&str], pair: (&str, u64, &str, u64)) {
        let (warning_key, warning, critical_key, critical) = pair;
        let warning_path = [section, &[warning_key]].concat();
        let critical_path = [section, &[critical_key]].concat();
        let critical_origin = self.provenance.origin_of_value(&critical_path);
        self.require(warning <= critical, &warning_path, || {
            format!(
                "is {warning}, above `{}` ({critical}, {critical_origin}); a warning must not \
                 exceed its critical threshold",
                dotted(&critical_path)
            )
        });
    }

    fn rate_limit(&mut self, path: &[&str], limit: Option<&RateLimit>) {
        let Some(limit) = limit else { return };
        let max = [path, &["max"]].concat();
        let per = [path, &["per_seconds"]].concat();
        self.positive(&max, limit.max == 0, "nothing would ever be dispatched");
        self.positive(&per, limit.per_seconds == 0, "the window would be empty");
    }

    fn executor(&mut self, executor: &ExecutorConfig) {
        let queue = &executor.queue;
        self.positive(
            &["executor", "queue", "max_queue_length"],
            queue.max_queue_length == 0,
            "every request would be rejected",
        );
        self.positive(
            &["executor", "queue", "queue_timeout_seconds"],
            queue.queue_timeout_seconds == 0,
            "every queued execution would time out at once",
        );
        self.require(
            queue.no_route_retry_ms >= 10,
            &["executor", "queue", "no_route_retry_ms"],
            || {
                "must be at least 10: an action without a worker queue would be retried in a \
                 tight loop"
                    .to_owned()
            },
        );
        self.positive(
            &["executor", "shutdown_timeout_seconds"],
            executor.shutdown_timeout_seconds == 0,
            "shutdown could never drain or flush the last statistics",
        );
    }

    fn policies(&mut self, policies: &PoliciesConfig) {
        const NEVER_RUNS: &str = "nothing would ever run";
        self.positive(
            &["policies", "default", "concurrency_limit"],
            policies.default.concurrency_limit == 0,
            NEVER_RUNS,
        );
        self.rate_limit(
            &["policies", "default", "rate_limit"],
            policies.default.rate_limit.as_ref(),
        );
        for (action_ref, policy) in &policies.actions {
            let base = ["policies", "actions", action_ref.as_str()];
            if let Err(reason) = validate_action_ref(action_ref) {
                self.require(false, &base, || reason);
            }
            self.positive(
                &[&base[..], &["concurrency_limit"]].concat(),
                policy.concurrency_limit == Some(0),
                NEVER_RUNS,
            );
            self.rate_limit(
                &[&base[..], &["rate_limit"]].concat(),
                policy.rate_limit.as_ref(),
            );
        }
    }

    fn rabbitmq(&mut self, rabbitmq: &RabbitConfig) {
        let url = rabbitmq.url.to_ascii_lowercase();
        self.require(!url.starts_with("amqps://"), &["rabbitmq", "url"], || {
            "amqps:// is not supported (this build has no TLS for AMQP); use amqp://, \
             through a TLS tunnel if the broker is remote"
                .to_owned()
        });
        self.require(
            url.starts_with("amqp://") || url.starts_with("amqps://"),
            &["rabbitmq", "url"],
            || "expected a URL starting with amqp://".to_owned(),
        );
        self.positive(
            &["rabbitmq", "max_deliveries"],
            rabbitmq.max_deliveries == 0,
            "every message would be dead-lettered unread",
        );
        self.positive(
            &["rabbitmq", "prefetch"],
            rabbitmq.prefetch == 0,
            "AMQP reads 0 as unlimited, which would let the broker flood the executor",
        );
        self.positive(
            &["rabbitmq", "confirm_window"],
            rabbitmq.confirm_window == 0,
            "nothing could ever be published",
        );
        self.positive(
            &["rabbitmq", "max_message_bytes"],
            rabbitmq.max_message_bytes == 0,
            "every message would be too big",
        );
        self.require(
            rabbitmq.max_message_bytes <= RABBITMQ_MAX_MESSAGE_BYTES,
            &["rabbitmq", "max_message_bytes"],
            || format!("RabbitMQ never delivers messages above {RABBITMQ_MAX_MESSAGE_BYTES} bytes"),
        );
        self.positive(
            &["rabbitmq", "reconnect_max_backoff_ms"],
            rabbitmq.reconnect_max_backoff_ms == 0,
            "reconnection would retry in a tight loop",
        );
    }

    fn database(&mut self, database: &DatabaseConfig) {
        let url = database.url.to_ascii_lowercase();
        self.require(
            url.starts_with("postgres://") || url.starts_with("postgresql://"),
            &["database", "url"],
            || "expected a URL starting with postgres:// or postgresql://".to_owned(),
        );
        let schema = &database.schema;
        let identifier = schema
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && schema
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        self.require(identifier, &["database", "schema"], || {
            format!(
                "expected a plain SQL identifier (lowercase letters, digits and '_', not \
                 starting with a digit), got {schema:?}"
            )
        });
        self.require(
            schema.len() <= MAX_SCHEMA_LEN,
            &["database", "schema"],
            || {
                format!(
                    "is {} characters long; Postgres identifiers have at most {MAX_SCHEMA_LEN}",
                    schema.len()
                )
            },
        );
        self.positive(
            &["database", "max_connections"],
            database.max_connections == 0,
            "the pool could never connect",
        );
        self.interval(
            &["database", "flush_interval_ms"],
            database.flush_interval_ms == 0,
        );
        self.positive(
            &["database", "batch_max_rows"],
            database.batch_max_rows == 0,
            "nothing could ever be written",
        );
    }

    fn stats(&mut self, stats: &StatsConfig) {
        self.interval(&["stats", "interval_ms"], stats.interval_ms == 0);
        self.interval(
            &["stats", "snapshot_interval_seconds"],
            stats.snapshot_interval_seconds == 0,
        );
    }

    fn dlq(&mut self, dlq: &DlqConfig) {
        self.positive(
            &["dlq", "ttl_hours"],
            dlq.ttl_hours == 0,
            "dead letters would expire on arrival",
        );
        let max_hours = RABBITMQ_MAX_TTL_MS / 3_600_000;
        self.require(dlq.ttl_hours <= max_hours, &["dlq", "ttl_hours"], || {
            format!(
                "is {}, but RabbitMQ accepts a message TTL of at most {max_hours} hours",
                dlq.ttl_hours
            )
        });
        self.positive(
            &["dlq", "max_entries"],
            dlq.max_entries == 0,
            "every dead letter would be dropped",
        );
    }

    fn purge(&mut self, purge: &PurgeConfig) {
        self.interval(&["purge", "interval_seconds"], purge.interval_seconds == 0);
        let ages = [
            ("max_queued_age_seconds", purge.max_queued_age_seconds),
            ("max_running_age_seconds", purge.max_running_age_seconds),
            ("max_completed_age_seconds", purge.max_completed_age_seconds),
            (
                "max_stale_stats_age_seconds",
                purge.max_stale_stats_age_seconds,
            ),
        ];
        for (key, age) in ages {
            self.positive(
                &["purge", key],
                age == 0,
                "everything would be purged as soon as it exists",
            );
        }
    }

    fn health(&mut self, health: &HealthConfig) {
        self.interval(
            &["health", "interval_seconds"],
            health.interval_seconds == 0,
        );
        let t = &health.thresholds;
        let section = ["health", "thresholds"];
        self.warning_below_critical(
            &section,
            (
                "queue_length_warning",
                t.queue_length_warning,
                "queue_length_critical",
                t.queue_length_critical,
            ),
        );
        self.warning_below_critical(
            &section,
            (
                "oldest_age_warning_seconds",
                t.oldest_age_warning_seconds,
                "oldest_age_critical_seconds",
                t.oldest_age_critical_seconds,
            ),
        );
        self.warning_below_critical(
            &section,
            ("dlq_warning", t.dlq_warning, "dlq_critical", t.dlq_critical),
        );
        self.warning_below_critical(
            &section,
            (
                "stuck_warning",
                t.stuck_warning,
                "stuck_critical",
                t.stuck_critical,
            ),
        );
        self.positive(
            &["health", "thresholds", "stuck_age_seconds"],
            t.stuck_age_seconds == 0,
            "every running execution would count as stuck",
        );
        self.positive(
            &["health", "thresholds", "stalled_seconds"],
            t.stalled_seconds == 0,
            "every non-empty queue would count as stalled",
        );
    }

    fn api(&mut self, api: &ApiConfig) {
        if let Some(token) = &api.admin_token {
            self.require(
                !token.expose().trim().is_empty(),
                &["api", "admin_token"],
                || {
                    "must not be empty (an empty bearer token is no protection); leave the key \
                     out to refuse all state-changing requests"
                        .to_owned()
                },
            );
        }
        self.positive(
            &["api", "max_body_bytes"],
            api.max_body_bytes == 0,
            "every request with a body would be refused",
        );
        if let Some(global) = api.rate_limits.global.as_ref().filter(|g| g.enabled) {
            self.positive(
                &["api", "rate_limits", "global", "max_requests_per_minute"],
                global.max_requests_per_minute == 0,
                "no request would ever be taken; set `enabled: false` to lift the limit",
            );
        }
    }

    fn logging(&mut self, logging: &LoggingConfig) {
        let parsed = if logging.filter.trim().is_empty() {
            Err("must not be empty; `info` is the usual choice".to_owned())
        } else {
            tracing_subscriber::EnvFilter::builder()
                .parse(&logging.filter)
                .map(drop)
                .map_err(|e| format!("is not a valid tracing filter: {e}"))
        };
        if let Err(message) = parsed {
            self.require(false, &["logging", "filter"], || message);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT_YAML: &str = include_str!("../../config/default.yaml");

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn from_yaml(yaml: &str) -> Result<Config, ConfigError> {
        Config::load_from(Some(("test.yaml", yaml)), Vec::new())
    }

    fn from_env(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::load_from(None, env(vars))
    }

    fn error_text(result: Result<Config, ConfigError>) -> String {
        match result {
            Ok(config) => panic!("expected an error, got {config:?}"),
            Err(error) => error.to_string(),
        }
    }

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
            "executor.queue.enable_metrics",
            "executor.emergency_mode",
            "executor.durability",
            "executor.remember_ended_ids",
            "executor.shutdown_timeout_seconds",
            "policies.default.concurrency_limit",
            "policies.actions",
            "rabbitmq.url",
            "rabbitmq.max_deliveries",
            "rabbitmq.queue_type",
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
    fn empty_yaml_gives_the_defaults() {
        assert_eq!(from_yaml("").expect("loads"), Config::default());
        assert_eq!(
            from_yaml("# nothing but a comment\n").expect("loads"),
            Config::default()
        );
    }

    #[test]
    fn an_empty_section_gives_its_defaults() {
        let config = from_yaml("executor:\npolicies:\n  actions:\n").expect("loads");
        assert_eq!(config, Config::default());
    }

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

    #[test]
    fn an_api_rate_limit_of_zero_is_refused_by_name() {
        let error =
            from_yaml("api:\n  rate_limits:\n    global:\n      max_requests_per_minute: 0\n")
                .expect_err("invalid");
        let text = error.to_string();
        assert!(
            text.contains("`api.rate_limits.global.max_requests_per_minute`"),
            "{text}"
        );
        assert!(text.contains("enabled: false"), "{text}");
    }

    #[test]
    fn the_api_rate_limit_can_be_set_from_the_environment() {
        let config = from_env(&[(
            "ATTUNE__API__RATE_LIMITS__GLOBAL__MAX_REQUESTS_PER_MINUTE",
            "300",
        )])
        .expect("loads");
        assert_eq!(
            config
                .api
                .rate_limits
                .intake_per_minute()
                .map(NonZeroU32::get),
            Some(300)
        );
    }

    #[test]
    fn env_override_sets_nested_key() {
        let config =
            from_env(&[("ATTUNE__EXECUTOR__QUEUE__MAX_QUEUE_LENGTH", "20000")]).expect("loads");
        assert_eq!(config.executor.queue.max_queue_length, 20_000);
    }

    #[test]
    fn env_override_wins_over_the_file() {
        let config = Config::load_from(
            Some((
                "test.yaml",
                "executor:\n  queue:\n    enable_metrics: true\n",
            )),
            env(&[("ATTUNE__EXECUTOR__QUEUE__ENABLE_METRICS", "false")]),
        )
        .expect("loads");
        assert!(!config.executor.queue.enable_metrics);
    }

    #[test]
    fn env_override_sets_the_admin_token() {
        let config = from_env(&[("ATTUNE__API__ADMIN_TOKEN", "s3cret")]).expect("loads");
        let token = config.api.admin_token.expect("token set");
        assert_eq!(token.expose(), "s3cret");
    }

    #[test]
    fn a_numeric_env_value_is_text_where_the_key_wants_text() {
        let config = from_env(&[
            ("ATTUNE__API__ADMIN_TOKEN", "0123"),
            ("ATTUNE__LOGGING__FILTER", "true"),
        ])
        .expect("loads");
        assert_eq!(config.api.admin_token.expect("token set").expose(), "0123");
        assert_eq!(config.logging.filter, "true");
    }

    #[test]
    fn env_vars_without_the_prefix_are_ignored() {
        let config = from_env(&[
            ("PATH", "/usr/bin"),
            ("ATTUNE_EXECUTOR__EMERGENCY_MODE", "true"),
            ("attune__executor__emergency_mode", "true"),
        ])
        .expect("loads");
        assert_eq!(config, Config::default());
    }

    #[test]
    fn unknown_key_in_the_file_names_the_key_and_the_file() {
        let result = from_yaml("executor:\n  queue:\n    max_queue_lenght: 5\n");
        let error = result.expect_err("unknown key");
        assert!(
            matches!(&error, ConfigError::UnknownKey { key, origin: Origin::File(file), .. }
                if key == "executor.queue.max_queue_lenght" && file == "test.yaml"),
            "{error:?}"
        );
        let text = error.to_string();
        assert!(
            text.contains("unknown key `executor.queue.max_queue_lenght`"),
            "{text}"
        );
        assert!(text.contains("test.yaml"), "{text}");
        assert!(text.contains("max_queue_length"), "{text}");
    }

    #[test]
    fn unknown_env_var_names_the_variable() {
        let text = error_text(from_env(&[("ATTUNE__EXECUTOR__QUEUE__MAX_LENGTH", "5")]));
        assert!(
            text.contains("unknown key `executor.queue.max_length`"),
            "{text}"
        );
        assert!(
            text.contains("ATTUNE__EXECUTOR__QUEUE__MAX_LENGTH"),
            "{text}"
        );
    }

    #[test]
    fn unknown_section_from_env_names_the_variable() {
        let text = error_text(from_env(&[("ATTUNE__WORKER__COUNT", "5")]));
        assert!(text.contains("unknown key `worker`"), "{text}");
        assert!(text.contains("ATTUNE__WORKER__COUNT"), "{text}");
    }

    #[test]
    fn per_action_policies_from_env_are_refused() {
        let text = error_text(from_env(&[(
            "ATTUNE__POLICIES__ACTIONS__CORE__CONCURRENCY_LIMIT",
            "5",
        )]));
        assert!(
            text.contains("ATTUNE__POLICIES__ACTIONS__CORE__CONCURRENCY_LIMIT"),
            "{text}"
        );
        assert!(text.contains("config file"), "{text}");
    }

    #[test]
    fn malformed_env_var_names_are_refused() {
        let text = error_text(from_env(&[("ATTUNE__EXECUTOR____EMERGENCY_MODE", "true")]));
        assert!(
            text.contains("ATTUNE__EXECUTOR____EMERGENCY_MODE"),
            "{text}"
        );
        assert!(text.contains("empty key"), "{text}");
    }

    #[test]
    fn two_env_vars_for_the_same_key_are_refused() {
        let text = error_text(from_env(&[
            ("ATTUNE__EXECUTOR__EMERGENCY_MODE", "true"),
            ("ATTUNE__executor__emergency_mode", "false"),
        ]));
        assert!(text.contains("executor.emergency_mode"), "{text}");
    }

    #[test]
    fn env_var_below_a_plain_value_is_refused() {
        let text = error_text(from_env(&[
            ("ATTUNE__EXECUTOR", "5"),
            ("ATTUNE__EXECUTOR__EMERGENCY_MODE", "true"),
        ]));
        assert!(text.contains("ATTUNE__EXECUTOR__EMERGENCY_MODE"), "{text}");
        assert!(text.contains("not a section"), "{text}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let error =
            from_yaml("executor:\n  queue:\n    max_queue_length: lots\n").expect_err("wrong type");
        assert!(matches!(error, ConfigError::WrongType { .. }), "{error:?}");
        let text = error.to_string();
        assert!(text.contains("`executor.queue.max_queue_length`"), "{text}");
        assert!(text.contains("test.yaml"), "{text}");
        assert!(text.contains("expected a non-negative integer"), "{text}");
        assert!(text.contains("lots"), "{text}");
    }

    #[test]
    fn wrong_type_from_env_names_the_variable() {
        let text = error_text(from_env(&[(
            "ATTUNE__EXECUTOR__QUEUE__MAX_QUEUE_LENGTH",
            "lots",
        )]));
        assert!(text.contains("`executor.queue.max_queue_length`"), "{text}");
        assert!(
            text.contains("ATTUNE__EXECUTOR__QUEUE__MAX_QUEUE_LENGTH"),
            "{text}"
        );
        assert!(text.contains("expected a non-negative integer"), "{text}");
    }

    #[test]
    fn a_number_where_a_bool_belongs_keeps_the_typed_message() {
        let text = error_text(from_env(&[("ATTUNE__DLQ__ENABLED", "1")]));
        assert!(text.contains("`dlq.enabled`"), "{text}");
        assert!(
            text.contains("expected true or false, found integer `1`"),
            "{text}"
        );
    }

    #[test]
    fn negative_age_names_the_key() {
        let text = error_text(from_yaml("purge:\n  max_queued_age_seconds: -5\n"));
        assert!(text.contains("`purge.max_queued_age_seconds`"), "{text}");
        assert!(text.contains("test.yaml"), "{text}");
        assert!(text.contains("expected a non-negative integer"), "{text}");
        assert!(text.contains("-5"), "{text}");
    }

    #[test]
    fn a_value_out_of_range_names_the_limit() {
        let text = error_text(from_yaml("rabbitmq:\n  prefetch: 70000\n"));
        assert!(text.contains("`rabbitmq.prefetch`"), "{text}");
        assert!(text.contains("up to 65535"), "{text}");
    }

    #[test]
    fn concurrency_limit_zero_for_a_dotted_action_names_that_action() {
        let error =
            from_yaml("policies:\n  actions:\n    core.http.get:\n      concurrency_limit: 0\n")
                .expect_err("invalid");
        assert!(
            matches!(&error, ConfigError::Invalid { key, origin: Origin::File(_), .. }
                if key == "policies.actions.\"core.http.get\".concurrency_limit"),
            "{error:?}"
        );
        let text = error.to_string();
        assert!(text.contains("at least 1"), "{text}");
    }

    #[test]
    fn default_concurrency_limit_zero_is_refused() {
        let text = error_text(from_env(&[(
            "ATTUNE__POLICIES__DEFAULT__CONCURRENCY_LIMIT",
            "0",
        )]));
        assert!(
            text.contains("`policies.default.concurrency_limit`"),
            "{text}"
        );
        assert!(
            text.contains("ATTUNE__POLICIES__DEFAULT__CONCURRENCY_LIMIT"),
            "{text}"
        );
    }

    #[test]
    fn a_zero_rate_limit_is_refused() {
        let text = error_text(from_yaml(
            "policies:\n  default:\n    rate_limit: {max: 0, per_seconds: 0}\n",
        ));
        assert!(text.contains("2 configuration problems"), "{text}");
        assert!(text.contains("`policies.default.rate_limit.max`"), "{text}");
        assert!(
            text.contains("`policies.default.rate_limit.per_seconds`"),
            "{text}"
        );
    }

    #[test]
    fn a_rate_limit_without_its_window_names_the_missing_key() {
        let text = error_text(from_yaml(
            "policies:\n  actions:\n    core.http.get:\n      rate_limit: {max: 5}\n",
        ));
        assert!(
            text.contains("`policies.actions.\"core.http.get\".rate_limit`"),
            "{text}"
        );
        assert!(text.contains("per_seconds"), "{text}");
    }

    #[test]
    fn warning_above_critical_names_both_keys() {
        let error = from_yaml("health:\n  thresholds:\n    queue_length_warning: 1000\n")
            .expect_err("invalid");
        let text = error.to_string();
        assert!(
            text.contains("`health.thresholds.queue_length_warning`"),
            "{text}"
        );
        assert!(
            text.contains("`health.thresholds.queue_length_critical`"),
            "{text}"
        );
        assert!(text.contains("built-in default"), "{text}");
        assert!(text.contains("test.yaml"), "{text}");
    }

    #[test]
    fn a_bad_action_ref_is_refused() {
        let text = error_text(from_yaml(
            "policies:\n  actions:\n    \"core http\":\n      concurrency_limit: 2\n",
        ));
        assert!(text.contains("`policies.actions.\"core http\"`"), "{text}");
        assert!(text.contains("' '"), "{text}");
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

    #[test]
    fn a_bad_schema_is_refused() {
        for schema in ["Attune", "1attune", "at-tune", "attune; drop table x", ""] {
            let yaml = format!("database:\n  schema: {schema:?}\n");
            let text = error_text(from_yaml(&yaml));
            assert!(text.contains("`database.schema`"), "{text}");
        }
        let long = format!("database:\n  schema: {}\n", "a".repeat(64));
        assert!(error_text(from_yaml(&long)).contains("63"));
        assert!(from_yaml("database:\n  schema: _attune_2\n").is_ok());
    }

    #[test]
    fn amqps_is_refused_with_a_reason() {
        let text = error_text(from_env(&[(
            "ATTUNE__RABBITMQ__URL",
            "amqps://user:pw@broker:5671/%2f",
        )]));
        assert!(text.contains("`rabbitmq.url`"), "{text}");
        assert!(text.contains("amqps:// is not supported"), "{text}");
        assert!(!text.contains("pw@"), "the password leaked: {text}");
    }

    #[test]
    fn a_non_postgres_database_url_is_refused() {
        let text = error_text(from_yaml("database:\n  url: mysql://localhost/db\n"));
        assert!(text.contains("`database.url`"), "{text}");
        assert!(text.contains("postgres://"), "{text}");
        assert!(from_yaml("database:\n  url: postgresql://h/db\n").is_ok());
    }

    #[test]
    fn zero_intervals_are_refused() {
        let text = error_text(from_yaml(
            "stats:\n  interval_ms: 0\npurge:\n  interval_seconds: 0\ndlq:\n  ttl_hours: 0\n",
        ));
        assert!(text.contains("`stats.interval_ms`"), "{text}");
        assert!(text.contains("`purge.interval_seconds`"), "{text}");
        assert!(text.contains("`dlq.ttl_hours`"), "{text}");
    }

    #[test]
    fn a_dlq_ttl_beyond_rabbitmq_is_refused() {
        let text = error_text(from_yaml("dlq:\n  ttl_hours: 2000\n"));
        assert!(text.contains("1193 hours"), "{text}");
    }

    #[test]
    fn an_empty_admin_token_is_refused() {
        let text = error_text(from_env(&[("ATTUNE__API__ADMIN_TOKEN", "")]));
        assert!(text.contains("`api.admin_token`"), "{text}");
    }

    #[test]
    fn a_numeric_admin_token_in_the_file_is_not_echoed() {
        let text = error_text(from_yaml("api:\n  admin_token: 987654\n"));
        assert!(text.contains("`api.admin_token`"), "{text}");
        assert!(!text.contains("987654"), "the token leaked: {text}");
    }

    #[test]
    fn an_invalid_log_filter_is_refused() {
        let text = error_text(from_yaml("logging:\n  filter: \"info,lapin=loud\"\n"));
        assert!(text.contains("`logging.filter`"), "{text}");
    }

    #[test]
    fn a_bad_listen_address_names_the_key() {
        let text = error_text(from_env(&[("ATTUNE__API__LISTEN", "localhost")]));
        assert!(text.contains("`api.listen`"), "{text}");
        assert!(text.contains("ATTUNE__API__LISTEN"), "{text}");
    }

    #[test]
    fn an_unknown_durability_lists_the_choices() {
        let text = error_text(from_yaml("executor:\n  durability: disk\n"));
        assert!(text.contains("`executor.durability`"), "{text}");
        assert!(
            text.contains("`ledger`") && text.contains("`memory`"),
            "{text}"
        );
    }

    #[test]
    fn a_numeric_action_ref_must_be_quoted() {
        let text = error_text(from_yaml(
            "policies:\n  actions:\n    123:\n      concurrency_limit: 2\n",
        ));
        assert!(text.contains("`policies.actions`"), "{text}");
        assert!(text.contains("quote"), "{text}");
        let config = from_yaml("policies:\n  actions:\n    \"123\":\n      concurrency_limit: 2\n")
            .expect("loads");
        assert_eq!(config.policy_for("123").concurrency_limit, 2);
    }

    #[test]
    fn enums_read_their_lowercase_names() {
        let config = from_env(&[
            ("ATTUNE__EXECUTOR__DURABILITY", "memory"),
            ("ATTUNE__RABBITMQ__QUEUE_TYPE", "quorum"),
        ])
        .expect("loads");
        assert_eq!(config.executor.durability, Durability::Memory);
        assert_eq!(config.rabbitmq.queue_type, QueueType::Quorum);
    }

    #[test]
    fn invalid_yaml_names_the_file() {
        let error = from_yaml("executor: [unclosed\n").expect_err("invalid");
        assert!(matches!(error, ConfigError::Syntax { .. }), "{error:?}");
        assert!(error.to_string().contains("test.yaml"));
        let text = error_text(from_yaml("- a\n- b\n"));
        assert!(text.contains("mapping of sections"), "{text}");
    }

    #[test]
    fn a_missing_file_names_it() {
        let path = Path::new("/nonexistent/fifo-executor/config.yaml");
        let error = Config::load(Some(path)).expect_err("missing");
        assert!(matches!(error, ConfigError::Read { .. }), "{error:?}");
        assert!(
            error
                .to_string()
                .contains("/nonexistent/fifo-executor/config.yaml")
        );
    }

    #[test]
    fn yaml_merge_keys_share_a_policy() {
        let config = from_yaml(
            "policies:\n  actions:\n    core.a: &shared\n      concurrency_limit: 4\n\
             \x20   core.b:\n      <<: *shared\n",
        )
        .expect("loads");
        assert_eq!(config.policy_for("core.b").concurrency_limit, 4);
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

    #[test]
    fn debug_output_hides_the_admin_token_and_url_passwords() {
        let config = Config::load_from(
            Some((
                "test.yaml",
                "rabbitmq:\n  url: amqp://app:rabbitpw@mq:5672/%2f\n\
                 database:\n  url: postgres://app:dbpw@db:5432/x\n",
            )),
            env(&[("ATTUNE__API__ADMIN_TOKEN", "s3cret")]),
        )
        .expect("loads");
        let debug = format!("{config:?}");
        for secret in ["s3cret", "rabbitpw", "dbpw"] {
            assert!(!debug.contains(secret), "{secret} leaked: {debug}");
        }
        assert!(debug.contains("amqp://app:***@mq:5672/%2f"), "{debug}");
        assert!(debug.contains("postgres://app:***@db:5432/x"), "{debug}");
    }

    #[test]
    fn secret_matches_only_the_same_value() {
        let secret = Secret::new("token");
        assert!(secret.matches("token"));
        assert!(!secret.matches("tokem"));
        assert!(!secret.matches("token2"));
        assert!(!secret.matches(""));
    }

    #[test]
    fn url_redaction_hides_passwords_and_nothing_else() {
        assert_eq!(
            redact_url_password("postgres://postgres@127.0.0.1:5432/x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(redact_url_password("amqp://h/%2f"), "amqp://h/%2f");
        assert_eq!(
            redact_url_password("postgres://u:p@ss@db/x?sslmode=disable&password=pw"),
            "postgres://u:***@db/x?sslmode=disable&password=***"
        );
    }
}
