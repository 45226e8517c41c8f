//! The process's log output (`logging.*`), and the handle through which a configuration reload
//! changes its filter.
//!
//! `RUST_LOG`, when set to a valid filter, wins over `logging.filter` at start, and keeps
//! winning after a reload: the environment of a running process cannot change, so a reload
//! reads the same `RUST_LOG` the process started with. `logging.json` picks the output format
//! once, at start.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, fmt, reload};

use crate::config::LoggingConfig;

/// The filter of the log output the process set up.
#[derive(Debug)]
pub struct LogFilter {
    handle: reload::Handle<EnvFilter, Registry>,
    /// `RUST_LOG` chose the filter at start; `logging.filter` is then never used.
    from_env: bool,
}

/// What [`LogFilter::set`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterChange {
    /// The new directives are in force.
    Applied,
    /// `RUST_LOG` is in force and stays so.
    KeptRustLog,
}

impl LogFilter {
    /// Filters by `directives` (`logging.filter`, already validated) from now on, unless
    /// `RUST_LOG` chose the filter.
    pub fn set(&self, directives: &str) -> Result<FilterChange, String> {
        if self.from_env {
            return Ok(FilterChange::KeptRustLog);
        }
        let filter = EnvFilter::builder()
            .parse(directives)
            .map_err(|e| format!("logging.filter is not a valid tracing filter: {e}"))?;
        self.handle
            .reload(filter)
            .map_err(|e| format!("could not change the log filter: {e}"))?;
        Ok(FilterChange::Applied)
    }
}

/// Sends logs to standard output as `config` says. `None` when the process already had a
/// subscriber (then that one stays, and its filter cannot be changed from here).
pub fn init(config: &LoggingConfig) -> Option<LogFilter> {
    let (from_env, filter) = match EnvFilter::try_from_default_env() {
        Ok(filter) => (true, filter),
        Err(_) => (false, EnvFilter::new(&config.filter)),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = if config.json {
        registry.with(fmt::layer().json()).try_init()
    } else {
        registry.with(fmt::layer()).try_init()
    };
    installed.ok().map(|()| LogFilter { handle, from_env })
}
