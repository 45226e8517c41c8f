//! The `ATTUNE__` environment overlay: which variables count, how a name becomes a key path
//! and a value a YAML scalar, and how each is set into the tree read from the file.

use serde_yaml_ng::{Mapping, Value};

use super::error::{ConfigError, dotted};

/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "ATTUNE__";

/// One `ATTUNE__*` variable, decoded.
#[derive(Debug, Clone)]
pub(super) struct EnvOverride {
    pub(super) var: String,
    /// Lowercased key path.
    pub(super) path: Vec<String>,
    /// The value as it is merged: a YAML number or boolean, or the raw text.
    pub(super) value: Value,
    /// The raw text, for when a number or boolean turns out to be meant as text.
    pub(super) text: String,
}

pub(super) fn process_env() -> Result<Vec<(String, String)>, ConfigError> {
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

pub(super) fn parse_env(
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
        let value = match scalar(&text) {
            Some(typed) => typed,
            None => Value::String(text.clone()),
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

/// Longest variable value read as a YAML number or boolean; longer ones are text.
const MAX_SCALAR_LEN: usize = 64;

/// A variable's value as a YAML number or boolean, if it is one. Only short values without
/// brackets are given to the YAML parser: no number or boolean is longer or has any, and the
/// parser's time grows with the depth of brackets (a value of a million `[` took minutes).
fn scalar(text: &str) -> Option<Value> {
    if text.len() > MAX_SCALAR_LEN || text.contains(['[', '{']) {
        return None;
    }
    match serde_yaml_ng::from_str::<Value>(text) {
        Ok(typed @ (Value::Bool(_) | Value::Number(_))) => Some(typed),
        _ => None,
    }
}

/// Puts `value` at `path`, creating the sections on the way.
pub(super) fn set_at(tree: &mut Value, path: &[String], value: Value) -> Result<(), String> {
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

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use crate::config::Config;
    use crate::config::testing::{env, error_text, from_env};

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
    fn long_or_bracketed_values_are_text_without_parsing() {
        // Found by the fuzz tests: the YAML parser took minutes over a million `[`.
        assert_eq!(super::scalar(&"[".repeat(1_000_000)), None);
        assert_eq!(super::scalar("{a: 1}"), None);
        assert_eq!(super::scalar(&"1".repeat(65)), None);
        assert_eq!(super::scalar("12"), Some(serde_yaml_ng::Value::from(12)));
        assert_eq!(
            super::scalar("true"),
            Some(serde_yaml_ng::Value::from(true))
        );
        let text = error_text(from_env(&[("ATTUNE__EXECUTOR", &"[".repeat(1_000_000))]));
        assert!(
            text.contains("ATTUNE__EXECUTOR"),
            "{}",
            &text[..text.len().min(200)]
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
}
