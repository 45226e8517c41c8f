//! The core's settings and policies as the configuration gives them: what the service starts
//! with, and what a configuration reload ([`super::reload`]) replaces.

use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::config::{self, Config};
use crate::core::{ActionPolicy, PolicySource, QueueSettings, RateLimit};
use crate::model::ActionRef;

/// The policies of `policies.*` (rate limits lifted in `executor.emergency_mode`): the layer
/// under whatever operators set at run time (the `action` table, `PUT …/policy`). A reload
/// replaces the configuration it answers from.
pub struct ConfigPolicies(RwLock<Arc<Config>>);

impl ConfigPolicies {
    pub fn new(config: Config) -> Self {
        Self(RwLock::new(Arc::new(config)))
    }

    /// Answers from `config` from now on.
    pub fn replace(&self, config: Config) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
    }

    fn config(&self) -> Arc<Config> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl std::fmt::Debug for ConfigPolicies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ConfigPolicies")
            .field(&self.config().policies)
            .finish()
    }
}

impl PolicySource for ConfigPolicies {
    fn policy_for(&self, action: &ActionRef) -> ActionPolicy {
        let config = self.config();
        let p = config.policy_for(action.as_str());
        let enabled = config
            .policies
            .actions
            .get(action.as_str())
            .and_then(|a| a.enabled)
            .unwrap_or(true);
        core_policy(p, enabled)
    }
}

/// Converts a validated config policy into the core's.
pub fn core_policy(p: config::Policy, enabled: bool) -> ActionPolicy {
    ActionPolicy {
        // Validation has refused 0 already; 1 is the safe reading if it ever slipped through.
        concurrency_limit: NonZeroU32::new(p.concurrency_limit).unwrap_or(NonZeroU32::MIN),
        rate_limit: p.rate_limit.and_then(|r| {
            Some(RateLimit {
                max: NonZeroU32::new(r.max)?,
                per: Duration::from_secs(r.per_seconds),
            })
        }),
        enabled,
    }
}

/// The core's queue settings from the config.
pub fn queue_settings(c: &Config) -> QueueSettings {
    QueueSettings {
        max_queue_length: c.executor.queue.max_queue_length,
        queue_timeout: Duration::from_secs(c.executor.queue.queue_timeout_seconds),
        emergency_mode: c.executor.emergency_mode,
        remember_ended: c.executor.remember_ended_ids,
        no_route_retry: Duration::from_millis(c.executor.queue.no_route_retry_ms),
        no_route_timeout: (c.executor.queue.no_route_timeout_seconds > 0)
            .then(|| Duration::from_secs(c.executor.queue.no_route_timeout_seconds)),
        passivate_after: (c.executor.queue.passivate_after_seconds > 0)
            .then(|| Duration::from_secs(c.executor.queue.passivate_after_seconds)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_configuration_answers_from_then_on() {
        let mut config = Config::default();
        let source = ConfigPolicies::new(config.clone());
        let action = ActionRef::parse("core.a").expect("a ref");
        assert_eq!(source.policy_for(&action).concurrency_limit.get(), 1);
        config.policies.default.concurrency_limit = 4;
        config.policies.actions.insert(
            "core.a".to_owned(),
            config::ActionPolicy {
                enabled: Some(false),
                ..config::ActionPolicy::default()
            },
        );
        source.replace(config);
        let now = source.policy_for(&action);
        assert_eq!(now.concurrency_limit.get(), 4);
        assert!(!now.enabled);
    }
}
