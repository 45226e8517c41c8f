//! [`ConfigError`], whatever stops start-up, and the wording its messages share: the dotted
//! key path and the [`Origin`] of a value.

use std::fmt;
use std::path::PathBuf;

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

/// Renders a key path, quoting the segments that are not plain words (action refs).
pub(super) fn dotted<S: AsRef<str>>(path: &[S]) -> String {
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
