//! The checks that run after the types are read: every impossible value (a limit of 0, a
//! warning above its critical threshold, a URL of the wrong scheme, ...) is collected and
//! reported at once, each naming its key.

use super::error::{ConfigError, dotted};
use super::provenance::Provenance;
use super::{
    ApiConfig, ClusterConfig, Config, DatabaseConfig, DlqConfig, ExecutorConfig, HealthConfig,
    LoggingConfig, PoliciesConfig, PurgeConfig, RabbitConfig, RabbitTlsConfig, RateLimit,
    StatsConfig, validate_action_ref,
};

/// Postgres truncates identifiers longer than this (NAMEDATALEN - 1).
const MAX_SCHEMA_LEN: usize = 63;

/// The longest `executor.queue.passivate_after_seconds`: a year. Longer is as good as never,
/// which 0 says.
const MAX_PASSIVATE_AFTER_SECONDS: u64 = 365 * 24 * 3600;

/// RabbitMQ refuses `x-message-ttl` values above this many milliseconds (Erlang timer limit).
const RABBITMQ_MAX_TTL_MS: u64 = 4_294_967_295;

/// RabbitMQ's hard ceiling for `max_message_size` (512 MiB).
const RABBITMQ_MAX_MESSAGE_BYTES: usize = 512 * 1024 * 1024;

impl Config {
    pub(super) fn validate(&self, provenance: &Provenance<'_>) -> Result<(), ConfigError> {
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
        check.cluster(&self.cluster, self.executor.durability);
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
        self.positive(
            &["executor", "queue", "metrics_idle_after_seconds"],
            queue.metrics_idle_after_seconds == 0,
            "an action's series would leave /metrics at the first scrape after its last \
             execution ended, before rate() could see its last increments",
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
        self.require(
            queue.passivate_after_seconds <= MAX_PASSIVATE_AFTER_SECONDS,
            &["executor", "queue", "passivate_after_seconds"],
            || "must be at most a year (31536000); 0 never retires an idle action".to_owned(),
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
        self.require(
            url.starts_with("amqp://") || url.starts_with("amqps://"),
            &["rabbitmq", "url"],
            || "expected a URL starting with amqp:// or amqps://".to_owned(),
        );
        self.rabbitmq_tls(&rabbitmq.tls, url.starts_with("amqps://"));
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

    /// The TLS files: only with `amqps://`, the certificate with its key, each readable and
    /// holding PEM (what is in them is judged at the handshake, by the broker too).
    fn rabbitmq_tls(&mut self, tls: &RabbitTlsConfig, amqps: bool) {
        self.require(!tls.is_set() || amqps, &["rabbitmq", "tls"], || {
            "names TLS files, but rabbitmq.url is not amqps:// (they would be ignored)".to_owned()
        });
        self.require(
            tls.client_cert_file.is_some() == tls.client_key_file.is_some(),
            &["rabbitmq", "tls"],
            || "client_cert_file and client_key_file go together: set both or neither".to_owned(),
        );
        let files = [
            ("ca_file", &tls.ca_file),
            ("client_cert_file", &tls.client_cert_file),
            ("client_key_file", &tls.client_key_file),
        ];
        for (key, path) in files {
            let Some(path) = path else { continue };
            let problem = match std::fs::read(path) {
                Err(e) => Some(format!("cannot read {}: {e}", path.display())),
                Ok(bytes) if !bytes.windows(11).any(|w| w == b"-----BEGIN ") => Some(format!(
                    "{} holds no PEM block (-----BEGIN …)",
                    path.display()
                )),
                Ok(_) => None,
            };
            if let Some(problem) = problem {
                self.require(false, &["rabbitmq", "tls", key], || problem);
            }
        }
    }

    fn cluster(&mut self, cluster: &ClusterConfig, durability: super::Durability) {
        let max = crate::cluster::MAX_PARTITIONS;
        self.require(
            cluster.mode == super::ClusterMode::Single || durability == super::Durability::Ledger,
            &["cluster", "mode"],
            || {
                "shared needs executor.durability: ledger (a partition is rebuilt from the ledger \
                 when another instance takes it over)"
                    .to_owned()
            },
        );
        self.require(
            (1..=max).contains(&cluster.partitions),
            &["cluster", "partitions"],
            || format!("expected 1 to {max}"),
        );
        self.require(
            cluster.instance_id.len() <= 255 && !cluster.instance_id.chars().any(char::is_control),
            &["cluster", "instance_id"],
            || "expected at most 255 characters, none of them control characters".to_owned(),
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
    use crate::config::testing::{error_text, from_env, from_yaml};
    use crate::config::{ConfigError, Origin};

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
    fn amqps_is_taken_and_tls_files_are_checked() {
        let dir =
            std::env::temp_dir().join(format!("fifo-executor-tls-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let pem = dir.join("ca.pem");
        std::fs::write(
            &pem,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .expect("writes");
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello").expect("writes");

        let ok = from_yaml(&format!(
            "rabbitmq:\n  url: amqps://user:pw@broker/%2f\n  tls:\n    ca_file: {}\n",
            pem.display()
        ))
        .expect("amqps with a CA file loads");
        assert_eq!(ok.rabbitmq.tls.ca_file.as_deref(), Some(pem.as_path()));

        let plain = error_text(from_yaml(&format!(
            "rabbitmq:\n  url: amqp://user:pw@broker/%2f\n  tls:\n    ca_file: {}\n",
            pem.display()
        )));
        assert!(
            plain.contains("`rabbitmq.tls`") && plain.contains("not amqps://"),
            "{plain}"
        );
        assert!(!plain.contains("pw@"), "the password leaked: {plain}");

        let half = error_text(from_yaml(&format!(
            "rabbitmq:\n  url: amqps://broker/%2f\n  tls:\n    client_cert_file: {}\n",
            pem.display()
        )));
        assert!(half.contains("go together"), "{half}");

        let bad = error_text(from_yaml(&format!(
            "rabbitmq:\n  url: amqps://broker/%2f\n  tls:\n    ca_file: {}\n    \
             client_cert_file: {}\n    client_key_file: {}\n",
            dir.join("missing.pem").display(),
            not_pem.display(),
            pem.display()
        )));
        assert!(
            bad.contains("`rabbitmq.tls.ca_file`") && bad.contains("cannot read"),
            "{bad}"
        );
        assert!(
            bad.contains("`rabbitmq.tls.client_cert_file`") && bad.contains("no PEM"),
            "{bad}"
        );
        assert!(!bad.contains("hello"), "a file's content was shown: {bad}");
        let _ = std::fs::remove_dir_all(dir);
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
    fn a_metrics_idle_window_of_zero_is_refused_and_a_negative_one_is_a_type_error() {
        let text = error_text(from_yaml(
            "executor:\n  queue:\n    metrics_idle_after_seconds: 0\n",
        ));
        assert!(
            text.contains("`executor.queue.metrics_idle_after_seconds`"),
            "{text}"
        );
        assert!(text.contains("rate()"), "{text}");
        let text = error_text(from_env(&[(
            "ATTUNE__EXECUTOR__QUEUE__METRICS_IDLE_AFTER_SECONDS",
            "-5",
        )]));
        assert!(text.contains("metrics_idle_after_seconds"), "{text}");
        assert!(
            from_yaml("executor:\n  queue:\n    metrics_idle_after_seconds: 60\n").is_ok_and(|c| c
                .executor
                .queue
                .metrics_idle_after_seconds
                == 60)
        );
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
    fn an_invalid_log_filter_is_refused() {
        let text = error_text(from_yaml("logging:\n  filter: \"info,lapin=loud\"\n"));
        assert!(text.contains("`logging.filter`"), "{text}");
    }
}
