//! One action's health at a glance, for the operations page's actions table and action
//! detail: the health check's rules ([`super::health`]) applied to a single action, with the
//! same `health.thresholds` and the same strict `>`.
//!
//! | flag | the action … | level |
//! | --- | --- | --- |
//! | `stalled` | has executions waiting and no progress (admission, completion, removal) for more than `stalled_seconds` | unhealthy |
//! | `queue_critical` | has more than `queue_length_critical` executions waiting | unhealthy |
//! | `wait_critical` | has an execution waiting for more than `oldest_age_critical_seconds` | unhealthy |
//! | `stuck` | has executions holding a slot without a completion for more than `stuck_age_seconds` | degraded |
//! | `queue_long` | has more than `queue_length_warning` executions waiting (and not more than critical) | degraded |
//! | `wait_long` | has an execution waiting for more than `oldest_age_warning_seconds` (and not more than critical) | degraded |
//! | `no_route` | has executions waiting while its dispatches come back from the broker unrouted | degraded |
//! | `disabled` | is disabled (paused): nothing is dispatched, new requests are rejected | paused |
//!
//! An action with none of these is `ok`. Its `health` is its worst flag (the first of the
//! table's order among the worst level); `flags` lists them all, worst first.
//!
//! Where `stuck` comes from differs by endpoint: the actions table takes the counts of the
//! last health check (every `health.interval_seconds`; no flag before the first check), so a
//! listing never asks every actor; the action detail counts the running executions it has
//! just asked the action's actor for.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::health::seconds_since;
use crate::config::HealthThresholds;
use crate::core::QueueStats;

/// How bad a flag is, from best to worst; sorting the actions table by health sorts by this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    /// Deliberately stopped by an operator: not a fault, but nothing moves.
    Paused,
    Degraded,
    Unhealthy,
}

/// One thing wrong with an action (see the module docs for each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Flag {
    Stalled,
    QueueCritical,
    WaitCritical,
    Stuck,
    QueueLong,
    WaitLong,
    NoRoute,
    Disabled,
}

impl Flag {
    pub fn as_str(self) -> &'static str {
        match self {
            Flag::Stalled => "stalled",
            Flag::QueueCritical => "queue_critical",
            Flag::WaitCritical => "wait_critical",
            Flag::Stuck => "stuck",
            Flag::QueueLong => "queue_long",
            Flag::WaitLong => "wait_long",
            Flag::NoRoute => "no_route",
            Flag::Disabled => "disabled",
        }
    }

    pub fn level(self) -> Level {
        match self {
            Flag::Stalled | Flag::QueueCritical | Flag::WaitCritical => Level::Unhealthy,
            Flag::Stuck | Flag::QueueLong | Flag::WaitLong | Flag::NoRoute => Level::Degraded,
            Flag::Disabled => Level::Paused,
        }
    }

    /// Every flag, in the order [`flags`] reports them.
    pub const ALL: [Flag; 8] = [
        Flag::Stalled,
        Flag::QueueCritical,
        Flag::WaitCritical,
        Flag::Stuck,
        Flag::QueueLong,
        Flag::WaitLong,
        Flag::NoRoute,
        Flag::Disabled,
    ];
}

/// One action's flags, worst first (the order of [`Flag::ALL`]).
///
/// `stuck` is how many of its executions run longer than `stuck_age_seconds`; `now` is on
/// the clock the counters' times come from.
pub fn flags(s: &QueueStats, stuck: usize, t: &HealthThresholds, now: DateTime<Utc>) -> Vec<Flag> {
    let waiting = s.queue_length as u64;
    let oldest = s.oldest_enqueued_at.map_or(0, |at| seconds_since(now, at));
    let mut out = Vec::new();
    if waiting > 0 && seconds_since(now, s.last_progress) > t.stalled_seconds {
        out.push(Flag::Stalled);
    }
    if waiting > t.queue_length_critical {
        out.push(Flag::QueueCritical);
    }
    if oldest > t.oldest_age_critical_seconds {
        out.push(Flag::WaitCritical);
    }
    if stuck > 0 {
        out.push(Flag::Stuck);
    }
    if waiting > t.queue_length_warning && waiting <= t.queue_length_critical {
        out.push(Flag::QueueLong);
    }
    if oldest > t.oldest_age_warning_seconds && oldest <= t.oldest_age_critical_seconds {
        out.push(Flag::WaitLong);
    }
    if waiting > 0 && s.no_route_since.is_some() {
        out.push(Flag::NoRoute);
    }
    if !s.enabled {
        out.push(Flag::Disabled);
    }
    out
}

/// The action's health in one word: its worst flag, or `ok`.
pub fn health(flags: &[Flag]) -> &'static str {
    flags.first().map_or("ok", |f| f.as_str())
}

/// The level of the worst flag ([`Level::Ok`] without any).
pub fn level(flags: &[Flag]) -> Level {
    flags.iter().map(|f| f.level()).max().unwrap_or(Level::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::health::tests::{now, queue};

    /// `queued` waiting, the oldest for `age` seconds, last progress `idle` seconds ago.
    fn action(queued: usize, age: i64, idle: i64) -> QueueStats {
        queue("a", queued, 0, age, idle)
    }

    fn of(s: &QueueStats, stuck: usize) -> Vec<Flag> {
        flags(s, stuck, &HealthThresholds::default(), now())
    }

    #[test]
    fn a_quiet_enabled_action_is_ok() {
        let f = of(&action(0, 0, 100_000), 0);
        assert!(f.is_empty());
        assert_eq!((health(&f), level(&f)), ("ok", Level::Ok));
    }

    #[test]
    fn queue_length_flags_above_the_warning_and_turn_critical_above_critical() {
        for (len, want) in [
            (100, vec![]),
            (101, vec![Flag::QueueLong]),
            (500, vec![Flag::QueueLong]),
            (501, vec![Flag::QueueCritical]),
        ] {
            assert_eq!(of(&action(len, 0, 0), 0), want, "length {len}");
        }
    }

    #[test]
    fn the_oldest_wait_flags_above_ten_minutes_and_turns_critical_above_thirty() {
        for (age, want) in [
            (600, vec![]),
            (601, vec![Flag::WaitLong]),
            (1800, vec![Flag::WaitLong]),
            (1801, vec![Flag::WaitCritical]),
        ] {
            assert_eq!(of(&action(1, age, 0), 0), want, "age {age}");
        }
    }

    #[test]
    fn waiting_without_progress_is_stalled_but_an_idle_empty_queue_is_not() {
        assert_eq!(of(&action(1, 0, 601), 0), vec![Flag::Stalled]);
        assert_eq!(of(&action(1, 0, 600), 0), vec![]);
        assert_eq!(of(&action(0, 0, 100_000), 0), vec![]);
    }

    #[test]
    fn stuck_unrouted_and_disabled_are_flagged_worst_first() {
        let mut s = action(3, 0, 0);
        s.no_route_since = Some(now());
        s.enabled = false;
        let f = of(&s, 2);
        assert_eq!(f, vec![Flag::Stuck, Flag::NoRoute, Flag::Disabled]);
        assert_eq!((health(&f), level(&f)), ("stuck", Level::Degraded));
        // An idle action keeps its no-route state until its next delivery; nothing waits.
        let mut idle = action(0, 0, 0);
        idle.no_route_since = Some(now());
        assert_eq!(of(&idle, 0), vec![]);
    }

    #[test]
    fn a_disabled_action_with_a_stalled_queue_is_unhealthy_first() {
        let mut s = action(600, 2000, 700);
        s.enabled = false;
        let f = of(&s, 0);
        assert_eq!(
            f,
            vec![
                Flag::Stalled,
                Flag::QueueCritical,
                Flag::WaitCritical,
                Flag::Disabled
            ]
        );
        assert_eq!((health(&f), level(&f)), ("stalled", Level::Unhealthy));
        let paused = of(&action(0, 0, 0), 0);
        assert_eq!(level(&paused), Level::Ok);
        let mut off = action(0, 0, 0);
        off.enabled = false;
        assert_eq!(level(&of(&off, 0)), Level::Paused);
    }

    #[test]
    fn flags_serialize_as_their_names() {
        for f in Flag::ALL {
            assert_eq!(
                serde_json::to_value(f).expect("serializes"),
                serde_json::Value::from(f.as_str())
            );
        }
    }
}
