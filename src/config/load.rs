//! Loading: the file and the environment overlay merged into one YAML tree, read into
//! [`Config`] with serde's errors reworded to name the key, then validated.

use std::path::Path;

use serde_yaml_ng::{Mapping, Value};

use super::Config;
use super::env::{parse_env, process_env, set_at};
use super::error::{ConfigError, Origin, dotted};
use super::provenance::Provenance;

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
        let mut config = deserialize(&mut tree, &provenance)?;
        read_admin_token_file(&mut config, &provenance)?;
        config.validate(&provenance)?;
        Ok(config)
    }
}

/// Takes `api.admin_token` from `api.admin_token_file` when only the file is named. An error
/// names the key and the path, never the content.
fn read_admin_token_file(config: &mut Config, provenance: &Provenance) -> Result<(), ConfigError> {
    let api = &mut config.api;
    let Some(path) = &api.admin_token_file else {
        return Ok(());
    };
    const KEY: [&str; 2] = ["api", "admin_token_file"];
    let invalid = |message: String| ConfigError::Invalid {
        key: dotted(&KEY),
        origin: provenance.origin_of_value(&KEY),
        message,
    };
    if api.admin_token.is_some() {
        return Err(invalid(
            "set either `api.admin_token` or `api.admin_token_file`, not both".to_owned(),
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(invalid(format!(
            "{} is empty (an empty bearer token is no protection)",
            path.display()
        )));
    }
    api.admin_token = Some(super::Secret::new(token));
    Ok(())
}

fn parse_file(name: &str, text: &str) -> Result<Value, ConfigError> {
    let syntax = |message: String| ConfigError::Syntax {
        file: name.to_owned(),
        message,
    };
    let depth = bracket_depth(text);
    if depth > MAX_BRACKET_DEPTH {
        return Err(syntax(format!(
            "brackets nest {depth} deep (at most {MAX_BRACKET_DEPTH}): the YAML parser's time \
             grows with the depth of [ ] and {{ }} collections, and no configuration needs more"
        )));
    }
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

/// Deepest `[`/`{` nesting a config file may have. The YAML parser rescans every open flow
/// collection at each token, so its time grows with tokens × depth: a file of a million `[`
/// took minutes (found by the fuzz tests). Documents nested deeper than 128 fail to load
/// anyway (serde_yaml_ng's recursion limit); the margin is for brackets in strings.
pub(super) const MAX_BRACKET_DEPTH: usize = 256;

/// How deep `[` and `{` nest in `text`, counting every bracket, quoted or not: the depth of
/// the flow collections, unless brackets in strings or comments disturb the count.
pub(super) fn bracket_depth(text: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    for b in text.bytes() {
        match b {
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::testing::{error_text, from_env, from_yaml};
    use crate::config::{Config, ConfigError, Durability, Origin, QueueType};

    /// A file of its own under the temporary directory, holding `content`.
    fn token_file(name: &str, content: &str) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("fifo-executor-token-{}-{name}", std::process::id()));
        std::fs::write(&path, content).expect("writes the token file");
        path
    }

    #[test]
    fn the_admin_token_comes_from_its_file_trimmed() {
        let path = token_file("ok", "  s3cret-from-file\n");
        let yaml = format!("api:\n  admin_token_file: {}\n", path.display());
        let config = from_yaml(&yaml).expect("loads");
        let token = config.api.admin_token.as_ref().expect("token read");
        assert_eq!(token.expose(), "s3cret-from-file");
        assert!(!format!("{config:?}").contains("s3cret"));
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_bad_admin_token_file_is_named_and_its_content_never_shown() {
        let missing = std::env::temp_dir().join("fifo-executor-no-such-token-file");
        let text = error_text(from_yaml(&format!(
            "api:\n  admin_token_file: {}\n",
            missing.display()
        )));
        assert!(text.contains("`api.admin_token_file`"), "{text}");
        assert!(text.contains("cannot read"), "{text}");

        let empty = token_file("empty", " \n");
        let text = error_text(from_yaml(&format!(
            "api:\n  admin_token_file: {}\n",
            empty.display()
        )));
        assert!(text.contains("is empty"), "{text}");

        let both = token_file("both", "hidden-file-token\n");
        let text = error_text(from_yaml(&format!(
            "api:\n  admin_token: hidden-inline-token\n  admin_token_file: {}\n",
            both.display()
        )));
        assert!(text.contains("not both"), "{text}");
        assert!(!text.contains("hidden-"), "{text}");
        for path in [empty, both] {
            let _ = std::fs::remove_file(path);
        }
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
    fn deeply_bracketed_yaml_is_refused_before_parsing() {
        // Found by the fuzz tests: the parser took minutes over a million `[`.
        let deep = 1_000_000;
        let text = format!("executor: {}1{}", "[".repeat(deep), "]".repeat(deep));
        let error = from_yaml(&text).expect_err("too deep");
        assert!(matches!(error, ConfigError::Syntax { .. }), "{error:?}");
        assert!(error.to_string().contains("at most 256"), "{error}");
        // Brackets that close keep the depth low however many there are.
        assert_eq!(super::bracket_depth(&"[]".repeat(deep)), 1);
        assert_eq!(super::bracket_depth("a: [{b: [1]}, {c: 2}]"), 3);
    }

    #[test]
    fn an_empty_section_gives_its_defaults() {
        let config = from_yaml("executor:\npolicies:\n  actions:\n").expect("loads");
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
    fn a_numeric_admin_token_in_the_file_is_not_echoed() {
        let text = error_text(from_yaml("api:\n  admin_token: 987654\n"));
        assert!(text.contains("`api.admin_token`"), "{text}");
        assert!(!text.contains("987654"), "the token leaked: {text}");
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
}
