//! What a configuration reload changes: the keys that differ between the configuration in force
//! and one just read, and which of them can change while the service runs.
//!
//! [`with_live_changes`] is the one place that decides what is live: it takes the running
//! configuration and copies over, from the one just read, exactly the keys the service can
//! apply without a restart. [`ConfigChange::between`] then finds the applied keys (running →
//! the result) and the keys that need a restart (the result → what was read) with
//! [`changed_keys`], so the two lists cannot disagree with what is actually applied.
//!
//! Live: `policies.*`, `executor.emergency_mode`, `executor.queue.*` except `enable_metrics`,
//! `health.*`, `purge.*`, `dlq.enabled` and `logging.filter`. Everything else needs a restart:
//! connections and their URLs, `api.*`, `cluster.*`, `stats.*`, the queue arguments of the DLQ
//! (`dlq.ttl_hours`, `dlq.max_entries`: a redeclare), `executor.durability`,
//! `executor.remember_ended_ids`, `executor.shutdown_timeout_seconds`,
//! `executor.queue.enable_metrics` and `logging.json`. The unit tests below name every key.
//!
//! Keys are dotted paths as in error messages, action refs quoted
//! (`policies.actions."core.http.get".concurrency_limit`); a policy added or removed as a whole
//! is its ref alone (`policies.actions."core.http.get"`). No value is ever part of a key, so
//! the lists are safe to show (the admin token and URLs with passwords among them).

use super::error::dotted;
use super::{
    ActionPolicy, ApiConfig, ClusterConfig, Config, DatabaseConfig, DefaultPolicy, DlqConfig,
    ExecutorConfig, HealthConfig, HealthThresholds, LoggingConfig, PoliciesConfig, PurgeConfig,
    QueueConfig, RabbitConfig, RabbitTlsConfig, RateLimitsConfig, StatsConfig,
};

/// What a reload of `loaded` over `running` does.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigChange {
    /// Keys whose new values are in force once the change is applied, in the order of
    /// `config/default.yaml`.
    pub applied: Vec<String>,
    /// Keys whose new values wait for a restart; their old values stay in force.
    pub needs_restart: Vec<String>,
    /// The running configuration with the live keys taken from the one read.
    pub in_force: Config,
}

impl ConfigChange {
    /// Compares the configuration in force with one just read and validated.
    pub fn between(running: &Config, loaded: &Config) -> Self {
        let in_force = with_live_changes(running, loaded);
        Self {
            applied: changed_keys(running, &in_force),
            needs_restart: changed_keys(&in_force, loaded),
            in_force,
        }
    }
}

/// `running` with every key that can change while the service runs taken from `loaded`.
///
/// Both were validated as a whole; the result is valid too, because every check that spans
/// several keys (a warning below its critical threshold, `cluster.mode` against
/// `executor.durability`) stays within one side: all of its keys are live or none is.
pub fn with_live_changes(running: &Config, loaded: &Config) -> Config {
    let mut c = running.clone();
    c.policies = loaded.policies.clone();
    c.executor.emergency_mode = loaded.executor.emergency_mode;
    let (queue, new) = (&mut c.executor.queue, &loaded.executor.queue);
    queue.max_queue_length = new.max_queue_length;
    queue.queue_timeout_seconds = new.queue_timeout_seconds;
    queue.no_route_retry_ms = new.no_route_retry_ms;
    queue.no_route_timeout_seconds = new.no_route_timeout_seconds;
    queue.passivate_after_seconds = new.passivate_after_seconds;
    queue.metrics_idle_after_seconds = new.metrics_idle_after_seconds;
    c.health = loaded.health.clone();
    c.purge = loaded.purge.clone();
    c.dlq.enabled = loaded.dlq.enabled;
    c.logging.filter = loaded.logging.filter.clone();
    c
}

/// Pushes `prefix.field` for every listed field whose values differ. The struct pattern names
/// every field of the type, leaves and sections handled elsewhere alike, so a field added to
/// the type and forgotten here does not compile.
macro_rules! compare {
    ($out:ident, $prefix:expr, $ty:ident, $a:expr, $b:expr,
     leaves [$($leaf:ident),* $(,)?] $(, sections [$($section:ident),* $(,)?])?) => {{
        let $ty { $($leaf: _,)* $($($section: _,)*)? } = $a;
        $(
            if $a.$leaf != $b.$leaf {
                $out.push(format!("{}.{}", $prefix, stringify!($leaf)));
            }
        )*
    }};
}

/// Every key whose value differs between `a` and `b`, in the order of `config/default.yaml`.
pub fn changed_keys(a: &Config, b: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let Config {
        executor,
        policies,
        rabbitmq,
        database,
        stats,
        dlq,
        purge,
        health,
        api,
        logging,
        cluster,
    } = a;
    executor_keys(&mut out, executor, &b.executor);
    policies_keys(&mut out, policies, &b.policies);
    compare!(out, "rabbitmq", RabbitConfig, rabbitmq, (&b.rabbitmq),
        leaves [url, max_deliveries, queue_type, prefetch, confirm_window, max_message_bytes,
                reconnect_max_backoff_ms, heartbeat_seconds], sections [tls]);
    let (ta, tb) = (&rabbitmq.tls, &b.rabbitmq.tls);
    compare!(out, "rabbitmq.tls", RabbitTlsConfig, ta, tb,
        leaves [ca_file, client_cert_file, client_key_file]);
    compare!(out, "database", DatabaseConfig, database, (&b.database),
        leaves [url, schema, max_connections, flush_interval_ms, batch_max_rows, dispatch_wait]);
    compare!(out, "stats", StatsConfig, stats, (&b.stats),
        leaves [interval_ms, snapshot_interval_seconds]);
    compare!(out, "dlq", DlqConfig, dlq, (&b.dlq), leaves [enabled, ttl_hours, max_entries]);
    compare!(out, "purge", PurgeConfig, purge, (&b.purge),
        leaves [enabled, interval_seconds, dry_run, max_queued_age_seconds,
                max_running_age_seconds, max_completed_age_seconds, max_stale_stats_age_seconds]);
    health_keys(&mut out, health, &b.health);
    api_keys(&mut out, api, &b.api);
    compare!(out, "logging", LoggingConfig, logging, (&b.logging), leaves [filter, json]);
    compare!(out, "cluster", ClusterConfig, cluster, (&b.cluster),
        leaves [partitions, instance_id, mode]);
    out
}

fn executor_keys(out: &mut Vec<String>, a: &ExecutorConfig, b: &ExecutorConfig) {
    let (qa, qb) = (&a.queue, &b.queue);
    compare!(out, "executor.queue", QueueConfig, qa, qb,
        leaves [max_queue_length, queue_timeout_seconds, no_route_retry_ms,
                no_route_timeout_seconds, passivate_after_seconds, enable_metrics,
                metrics_idle_after_seconds]);
    compare!(out, "executor", ExecutorConfig, a, b,
        leaves [emergency_mode, durability, remember_ended_ids, shutdown_timeout_seconds],
        sections [queue]);
}

fn policies_keys(out: &mut Vec<String>, a: &PoliciesConfig, b: &PoliciesConfig) {
    let PoliciesConfig {
        default: _,
        actions: _,
    } = a;
    let (da, db) = (&a.default, &b.default);
    compare!(out, "policies.default", DefaultPolicy, da, db,
        leaves [concurrency_limit, rate_limit]);
    // Both maps are sorted by ref, so the keys come out sorted too.
    let mut refs: Vec<&String> = a.actions.keys().chain(b.actions.keys()).collect();
    refs.sort();
    refs.dedup();
    for action_ref in refs {
        let prefix = dotted(&["policies", "actions", action_ref.as_str()]);
        match (a.actions.get(action_ref), b.actions.get(action_ref)) {
            (Some(pa), Some(pb)) => {
                compare!(out, prefix, ActionPolicy, pa, pb,
                    leaves [concurrency_limit, rate_limit, enabled]);
            }
            _ => out.push(prefix),
        }
    }
}

fn health_keys(out: &mut Vec<String>, a: &HealthConfig, b: &HealthConfig) {
    compare!(out, "health", HealthConfig, a, b,
        leaves [enabled, interval_seconds], sections [thresholds]);
    let (ta, tb) = (&a.thresholds, &b.thresholds);
    compare!(out, "health.thresholds", HealthThresholds, ta, tb,
        leaves [queue_length_warning, queue_length_critical, oldest_age_warning_seconds,
                oldest_age_critical_seconds, dlq_warning, dlq_critical, stuck_age_seconds,
                stuck_warning, stuck_critical, stalled_seconds]);
}

fn api_keys(out: &mut Vec<String>, a: &ApiConfig, b: &ApiConfig) {
    compare!(out, "api", ApiConfig, a, b,
        leaves [listen, admin_token, admin_token_file, max_body_bytes], sections [rate_limits]);
    let (ra, rb) = (&a.rate_limits, &b.rate_limits);
    compare!(
        out,
        "api.rate_limits",
        RateLimitsConfig,
        ra,
        rb,
        leaves[global]
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::from_yaml;
    use crate::config::{
        ClusterMode, DispatchWait, Durability, GlobalRateLimit, QueueType, RateLimit, Secret,
    };

    type Mutation = fn(&mut Config);

    /// Every key, how to change it, and whether the change applies live. Adding a key to the
    /// configuration without adding it here fails `every_key_is_either_live_or_needs_a_restart`
    /// (the diff would report it, and its count would not match).
    #[rustfmt::skip]
    const KEYS: &[(&str, Mutation, bool)] = &[
        ("executor.queue.max_queue_length", |c| c.executor.queue.max_queue_length += 1, true),
        ("executor.queue.queue_timeout_seconds", |c| c.executor.queue.queue_timeout_seconds += 1, true),
        ("executor.queue.no_route_retry_ms", |c| c.executor.queue.no_route_retry_ms += 1, true),
        ("executor.queue.no_route_timeout_seconds", |c| c.executor.queue.no_route_timeout_seconds += 1, true),
        ("executor.queue.passivate_after_seconds", |c| c.executor.queue.passivate_after_seconds += 1, true),
        ("executor.queue.enable_metrics", |c| c.executor.queue.enable_metrics ^= true, false),
        ("executor.queue.metrics_idle_after_seconds", |c| c.executor.queue.metrics_idle_after_seconds += 1, true),
        ("executor.emergency_mode", |c| c.executor.emergency_mode ^= true, true),
        ("executor.durability", |c| c.executor.durability = Durability::Memory, false),
        ("executor.remember_ended_ids", |c| c.executor.remember_ended_ids += 1, false),
        ("executor.shutdown_timeout_seconds", |c| c.executor.shutdown_timeout_seconds += 1, false),
        ("policies.default.concurrency_limit", |c| c.policies.default.concurrency_limit += 1, true),
        ("policies.default.rate_limit", |c| c.policies.default.rate_limit = Some(RateLimit { max: 1, per_seconds: 1 }), true),
        ("policies.actions.\"core.a\"", |c| { c.policies.actions.insert("core.a".into(), ActionPolicy::default()); }, true),
        ("rabbitmq.url", |c| c.rabbitmq.url.push('x'), false),
        ("rabbitmq.max_deliveries", |c| c.rabbitmq.max_deliveries += 1, false),
        ("rabbitmq.queue_type", |c| c.rabbitmq.queue_type = QueueType::Quorum, false),
        ("rabbitmq.prefetch", |c| c.rabbitmq.prefetch += 1, false),
        ("rabbitmq.confirm_window", |c| c.rabbitmq.confirm_window += 1, false),
        ("rabbitmq.max_message_bytes", |c| c.rabbitmq.max_message_bytes += 1, false),
        ("rabbitmq.reconnect_max_backoff_ms", |c| c.rabbitmq.reconnect_max_backoff_ms += 1, false),
        ("rabbitmq.heartbeat_seconds", |c| c.rabbitmq.heartbeat_seconds += 1, false),
        ("rabbitmq.tls.ca_file", |c| c.rabbitmq.tls.ca_file = Some("/etc/ca.pem".into()), false),
        ("rabbitmq.tls.client_cert_file", |c| c.rabbitmq.tls.client_cert_file = Some("/c.pem".into()), false),
        ("rabbitmq.tls.client_key_file", |c| c.rabbitmq.tls.client_key_file = Some("/k.pem".into()), false),
        ("database.url", |c| c.database.url.push('x'), false),
        ("database.schema", |c| c.database.schema.push('x'), false),
        ("database.max_connections", |c| c.database.max_connections += 1, false),
        ("database.flush_interval_ms", |c| c.database.flush_interval_ms += 1, false),
        ("database.batch_max_rows", |c| c.database.batch_max_rows += 1, false),
        ("database.dispatch_wait", |c| c.database.dispatch_wait = DispatchWait::Admission, false),
        ("stats.interval_ms", |c| c.stats.interval_ms += 1, false),
        ("stats.snapshot_interval_seconds", |c| c.stats.snapshot_interval_seconds += 1, false),
        ("dlq.enabled", |c| c.dlq.enabled ^= true, true),
        ("dlq.ttl_hours", |c| c.dlq.ttl_hours += 1, false),
        ("dlq.max_entries", |c| c.dlq.max_entries += 1, false),
        ("purge.enabled", |c| c.purge.enabled ^= true, true),
        ("purge.interval_seconds", |c| c.purge.interval_seconds += 1, true),
        ("purge.dry_run", |c| c.purge.dry_run ^= true, true),
        ("purge.max_queued_age_seconds", |c| c.purge.max_queued_age_seconds += 1, true),
        ("purge.max_running_age_seconds", |c| c.purge.max_running_age_seconds += 1, true),
        ("purge.max_completed_age_seconds", |c| c.purge.max_completed_age_seconds += 1, true),
        ("purge.max_stale_stats_age_seconds", |c| c.purge.max_stale_stats_age_seconds += 1, true),
        ("health.enabled", |c| c.health.enabled ^= true, true),
        ("health.interval_seconds", |c| c.health.interval_seconds += 1, true),
        ("health.thresholds.queue_length_warning", |c| c.health.thresholds.queue_length_warning += 1, true),
        ("health.thresholds.queue_length_critical", |c| c.health.thresholds.queue_length_critical += 1, true),
        ("health.thresholds.oldest_age_warning_seconds", |c| c.health.thresholds.oldest_age_warning_seconds += 1, true),
        ("health.thresholds.oldest_age_critical_seconds", |c| c.health.thresholds.oldest_age_critical_seconds += 1, true),
        ("health.thresholds.dlq_warning", |c| c.health.thresholds.dlq_warning += 1, true),
        ("health.thresholds.dlq_critical", |c| c.health.thresholds.dlq_critical += 1, true),
        ("health.thresholds.stuck_age_seconds", |c| c.health.thresholds.stuck_age_seconds += 1, true),
        ("health.thresholds.stuck_warning", |c| c.health.thresholds.stuck_warning += 1, true),
        ("health.thresholds.stuck_critical", |c| c.health.thresholds.stuck_critical += 1, true),
        ("health.thresholds.stalled_seconds", |c| c.health.thresholds.stalled_seconds += 1, true),
        ("api.listen", |c| c.api.listen.set_port(9), false),
        ("api.admin_token", |c| c.api.admin_token = Some(Secret::new("t0ken-value")), false),
        ("api.admin_token_file", |c| c.api.admin_token_file = Some("/run/secrets/t".into()), false),
        ("api.max_body_bytes", |c| c.api.max_body_bytes += 1, false),
        ("api.rate_limits.global", |c| c.api.rate_limits.global = Some(GlobalRateLimit { enabled: true, max_requests_per_minute: 5 }), false),
        ("logging.filter", |c| c.logging.filter = "debug".into(), true),
        ("logging.json", |c| c.logging.json ^= true, false),
        ("cluster.partitions", |c| c.cluster.partitions += 1, false),
        ("cluster.instance_id", |c| c.cluster.instance_id.push('x'), false),
        ("cluster.mode", |c| c.cluster.mode = ClusterMode::Shared, false),
    ];

    #[test]
    fn every_key_is_either_live_or_needs_a_restart() {
        let running = Config::default();
        for (key, mutate, live) in KEYS {
            let mut loaded = running.clone();
            mutate(&mut loaded);
            let change = ConfigChange::between(&running, &loaded);
            let (applied, waiting): (Vec<String>, Vec<String>) = if *live {
                (vec![(*key).to_owned()], vec![])
            } else {
                (vec![], vec![(*key).to_owned()])
            };
            assert_eq!(change.applied, applied, "{key}");
            assert_eq!(change.needs_restart, waiting, "{key}");
            let expected_in_force = if *live { &loaded } else { &running };
            assert_eq!(&change.in_force, expected_in_force, "{key}");
        }
    }

    #[test]
    fn every_key_of_default_yaml_is_listed() {
        // The leaves of the documented file against the table above: a key the file gains
        // must be classified there.
        let tree: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(include_str!("../../config/default.yaml")).expect("YAML");
        let mut leaves = Vec::new();
        collect_leaves(&tree, String::new(), &mut leaves);
        let listed: Vec<&str> = KEYS.iter().map(|(k, _, _)| *k).collect();
        // default.yaml writes `actions: {}` (its entries are per ref) and `tls:` with its keys
        // in comments...
        let unlisted: Vec<&String> = leaves
            .iter()
            .filter(|l| {
                !listed.contains(&l.as_str())
                    && !["policies.actions", "rabbitmq.tls"].contains(&l.as_str())
            })
            .collect();
        assert!(unlisted.is_empty(), "not classified: {unlisted:?}");
        // ... and leaves the default rate limit, the admin token and the TLS files in comments.
        let undocumented: Vec<&&str> = listed
            .iter()
            .filter(|k| {
                !leaves.iter().any(|l| l == **k)
                    && ![
                        "policies.default.rate_limit",
                        "policies.actions.\"core.a\"",
                        "api.admin_token",
                        "api.admin_token_file",
                        "rabbitmq.tls.ca_file",
                        "rabbitmq.tls.client_cert_file",
                        "rabbitmq.tls.client_key_file",
                    ]
                    .contains(k)
            })
            .collect();
        assert!(
            undocumented.is_empty(),
            "not in default.yaml: {undocumented:?}"
        );
    }

    fn collect_leaves(v: &serde_yaml_ng::Value, prefix: String, out: &mut Vec<String>) {
        match v.as_mapping() {
            Some(m) if !m.is_empty() => {
                for (k, v) in m {
                    let k = k.as_str().expect("text keys");
                    let path = if prefix.is_empty() {
                        k.to_owned()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    collect_leaves(v, path, out);
                }
            }
            _ => out.push(prefix),
        }
    }

    #[test]
    fn the_same_configuration_changes_nothing() {
        let c = from_yaml("policies:\n  actions:\n    core.a: {concurrency_limit: 3}\n")
            .expect("loads");
        let change = ConfigChange::between(&c, &c.clone());
        assert!(change.applied.is_empty() && change.needs_restart.is_empty());
        assert_eq!(change.in_force, c);
    }

    #[test]
    fn live_keys_apply_and_a_url_waits_for_a_restart() {
        let running =
            from_yaml("policies:\n  default:\n    concurrency_limit: 1\n").expect("loads");
        let loaded = from_yaml(
            "policies:\n  default:\n    concurrency_limit: 4\n\
             health:\n  thresholds:\n    queue_length_warning: 7\n\
             logging:\n  filter: debug\n\
             executor:\n  queue:\n    max_queue_length: 20\n\
             rabbitmq:\n  url: amqp://other:5672/%2f\n",
        )
        .expect("loads");
        let change = ConfigChange::between(&running, &loaded);
        assert_eq!(
            change.applied,
            [
                "executor.queue.max_queue_length",
                "policies.default.concurrency_limit",
                "health.thresholds.queue_length_warning",
                "logging.filter",
            ]
        );
        assert_eq!(change.needs_restart, ["rabbitmq.url"]);
        assert_eq!(change.in_force.policies.default.concurrency_limit, 4);
        assert_eq!(change.in_force.health.thresholds.queue_length_warning, 7);
        assert_eq!(change.in_force.executor.queue.max_queue_length, 20);
        assert_eq!(change.in_force.logging.filter, "debug");
        assert_eq!(change.in_force.rabbitmq.url, running.rabbitmq.url);
        // A second reload of the same file: nothing more applies, the URL still waits.
        let again = ConfigChange::between(&change.in_force, &loaded);
        assert!(again.applied.is_empty(), "{:?}", again.applied);
        assert_eq!(again.needs_restart, ["rabbitmq.url"]);
    }

    #[test]
    fn per_action_policies_are_named_by_quoted_ref_and_field() {
        let running = from_yaml(
            "policies:\n  actions:\n    core.kept: {concurrency_limit: 2}\n\
             \x20   core.gone: {concurrency_limit: 2}\n\
             \x20   core.changed: {concurrency_limit: 2, enabled: true}\n",
        )
        .expect("loads");
        let loaded = from_yaml(
            "policies:\n  actions:\n    core.kept: {concurrency_limit: 2}\n\
             \x20   core.changed: {concurrency_limit: 3, enabled: false}\n\
             \x20   core.new: {rate_limit: {max: 1, per_seconds: 2}}\n",
        )
        .expect("loads");
        let change = ConfigChange::between(&running, &loaded);
        assert_eq!(
            change.applied,
            [
                "policies.actions.\"core.changed\".concurrency_limit",
                "policies.actions.\"core.changed\".enabled",
                "policies.actions.\"core.gone\"",
                "policies.actions.\"core.new\"",
            ]
        );
        assert!(change.needs_restart.is_empty());
        assert_eq!(change.in_force.policies, loaded.policies);
    }

    #[test]
    fn a_changed_secret_is_named_but_never_shown() {
        let running = from_yaml("api:\n  admin_token: old-secret-1\n").expect("loads");
        let loaded = from_yaml(
            "api:\n  admin_token: new-secret-2\n\
             database:\n  url: postgres://u:db-password-3@h/x\n",
        )
        .expect("loads");
        let change = ConfigChange::between(&running, &loaded);
        assert_eq!(change.needs_restart, ["database.url", "api.admin_token"]);
        let shown = format!("{change:?}");
        for secret in ["old-secret-1", "new-secret-2", "db-password-3"] {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
    }
}
