//! What limits an action: its concurrency limit, an optional rate limit, whether it is enabled,
//! and the executor-wide queue settings.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::{Quota, RateLimiter, middleware::NoOpMiddleware, nanos::Nanos, state};

use super::clock::Clock;
use crate::model::ActionRef;

/// At most `max` admissions per `per`, as a token bucket: the long-run rate is `max / per`
/// and up to `max` may go at once after a quiet spell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub max: NonZeroU32,
    pub per: Duration,
}

/// The policy of one action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActionPolicy {
    /// Most executions holding a slot at once; at least 1.
    pub concurrency_limit: NonZeroU32,
    pub rate_limit: Option<RateLimit>,
    /// A disabled action dispatches nothing and rejects new requests; what already waits keeps
    /// its place.
    pub enabled: bool,
}

impl Default for ActionPolicy {
    fn default() -> Self {
        Self {
            concurrency_limit: NonZeroU32::MIN,
            rate_limit: None,
            enabled: true,
        }
    }
}

/// A change to some of an action's policy: each field left `None` keeps what is in force.
/// `rate_limit: Some(None)` removes the rate limit; `None` leaves it as it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyPatch {
    pub concurrency_limit: Option<NonZeroU32>,
    pub rate_limit: Option<Option<RateLimit>>,
    pub enabled: Option<bool>,
}

impl PolicyPatch {
    /// A patch that sets every field: the whole policy.
    pub fn whole(p: ActionPolicy) -> Self {
        Self {
            concurrency_limit: Some(p.concurrency_limit),
            rate_limit: Some(p.rate_limit),
            enabled: Some(p.enabled),
        }
    }

    /// Whether the patch changes nothing at all.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// `current` with the fields this patch sets replaced.
    pub fn over(&self, current: ActionPolicy) -> ActionPolicy {
        ActionPolicy {
            concurrency_limit: self.concurrency_limit.unwrap_or(current.concurrency_limit),
            rate_limit: self.rate_limit.unwrap_or(current.rate_limit),
            enabled: self.enabled.unwrap_or(current.enabled),
        }
    }
}

/// Where an action's policy comes from when its actor starts: config defaults and overrides,
/// later also what operators stored in the database.
pub trait PolicySource: Send + Sync + 'static {
    fn policy_for(&self, action: &ActionRef) -> ActionPolicy;
}

/// Every action gets the same policy; for tests and benches.
#[derive(Debug, Clone, Copy, Default)]
pub struct UniformPolicy(pub ActionPolicy);

impl PolicySource for UniformPolicy {
    fn policy_for(&self, _action: &ActionRef) -> ActionPolicy {
        self.0
    }
}

/// Settings that hold for every action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSettings {
    /// Waiting executions per action before new ones are rejected.
    pub max_queue_length: usize,
    /// Longest wait in the queue before an execution is timed out.
    pub queue_timeout: Duration,
    /// Emergency mode: no queue timeouts, no age purge of waiting executions, no rate limits.
    /// Concurrency limits and the queue length limit still hold.
    pub emergency_mode: bool,
    /// How many ended execution ids to remember so a late redelivery of their request is
    /// recognised as a duplicate; 0 remembers none.
    pub remember_ended: usize,
    /// While an action's dispatches find no worker queue, how long until its head is tried
    /// again.
    pub no_route_retry: Duration,
    /// How long an action's dispatches may find no worker queue before the executions whose
    /// dispatch comes back are dead-lettered (`NoRoute`); `None` never (nor in emergency
    /// mode).
    pub no_route_timeout: Option<Duration>,
    /// How long an action stays idle (nothing waiting or running) before its actor retires,
    /// its counters kept in a small record until its next message starts a new one; `None`
    /// never.
    pub passivate_after: Option<Duration>,
}

/// How long an idle action keeps its actor by default.
pub const DEFAULT_PASSIVATE_AFTER: Duration = Duration::from_secs(300);

/// How many ended ids the executor remembers by default: at 3,000 executions/s, about five
/// minutes, far longer than any redelivery after a reconnect takes; about 40 MB at most.
pub const DEFAULT_REMEMBER_ENDED: usize = 1_000_000;

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            max_queue_length: 10_000,
            queue_timeout: Duration::from_secs(3600),
            emergency_mode: false,
            remember_ended: DEFAULT_REMEMBER_ENDED,
            no_route_retry: Duration::from_secs(1),
            no_route_timeout: Some(Duration::from_secs(600)),
            passivate_after: Some(DEFAULT_PASSIVATE_AFTER),
        }
    }
}

pub(crate) type Limiter =
    RateLimiter<state::NotKeyed, state::InMemoryState, Clock, NoOpMiddleware<Nanos>>;

pub(crate) fn limiter(rate: RateLimit, clock: &Clock) -> Limiter {
    let period = rate.per / rate.max.get();
    // A period that rounds to zero means "no real limit"; governor refuses it, so allow a
    // nanosecond instead of failing.
    let quota = Quota::with_period(period.max(Duration::from_nanos(1)))
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
        .allow_burst(rate.max);
    RateLimiter::direct_with_clock(quota, clock.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(limit: u32, rate: Option<(u32, u64)>, enabled: bool) -> ActionPolicy {
        ActionPolicy {
            concurrency_limit: NonZeroU32::new(limit).expect("nonzero"),
            rate_limit: rate.map(|(max, per)| RateLimit {
                max: NonZeroU32::new(max).expect("nonzero"),
                per: Duration::from_secs(per),
            }),
            enabled,
        }
    }

    #[test]
    fn a_patch_replaces_only_the_fields_it_sets() {
        let current = policy(1, Some((10, 60)), false);
        let limit_only = PolicyPatch {
            concurrency_limit: NonZeroU32::new(3),
            ..PolicyPatch::default()
        };
        assert_eq!(limit_only.over(current), policy(3, Some((10, 60)), false));
        let clear_rate = PolicyPatch {
            rate_limit: Some(None),
            ..PolicyPatch::default()
        };
        assert_eq!(clear_rate.over(current), policy(1, None, false));
        let enable = PolicyPatch {
            enabled: Some(true),
            ..PolicyPatch::default()
        };
        assert_eq!(enable.over(current), policy(1, Some((10, 60)), true));
        assert!(PolicyPatch::default().is_empty());
        assert_eq!(PolicyPatch::default().over(current), current);
        let whole = policy(7, None, true);
        assert_eq!(PolicyPatch::whole(whole).over(current), whole);
        assert!(!PolicyPatch::whole(whole).is_empty());
    }
}
