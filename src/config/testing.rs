//! What the config's unit tests share: loading from text and variables the test passes in,
//! never the process's own file system or environment.

use super::{Config, ConfigError};

pub(super) fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
    vars.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub(super) fn from_yaml(yaml: &str) -> Result<Config, ConfigError> {
    Config::load_from(Some(("test.yaml", yaml)), Vec::new())
}

pub(super) fn from_env(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::load_from(None, env(vars))
}

pub(super) fn error_text(result: Result<Config, ConfigError>) -> String {
    match result {
        Ok(config) => panic!("expected an error, got {config:?}"),
        Err(error) => error.to_string(),
    }
}
