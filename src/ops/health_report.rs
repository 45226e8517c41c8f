//! What one health check finds: the overall status, each check's value and verdict, and the
//! totals. [`super::health`] produces it, the [`HealthStore`](super::hooks::HealthStore) hook
//! keeps it and `/health` serves it. It has a file of its own so that the health check and
//! the hooks can both import it while only the check imports the hooks.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

/// Overall and per-check verdicts; ordered from best to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Healthy,
    Degraded,
    Unhealthy,
}

impl Status {
    /// The value of `attune_health_status`.
    pub fn gauge(self) -> f64 {
        match self {
            Status::Healthy => 0.0,
            Status::Degraded => 1.0,
            Status::Unhealthy => 2.0,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Healthy => "healthy",
            Status::Degraded => "degraded",
            Status::Unhealthy => "unhealthy",
        }
    }
}

/// One check's value, its thresholds and its verdict.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    pub status: Status,
    /// The measured value (`null` when it could not be measured).
    pub value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub critical: Option<u64>,
    /// Which actions the value comes from, or why it is missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Totals for the log line and the report.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Totals {
    pub actions: usize,
    pub queued: u64,
    pub active: u64,
    pub dlq: Option<u64>,
    pub stuck: u64,
    pub stalled: u64,
}

/// The result of one health check, as `/health` serves it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HealthReport {
    pub status: Status,
    #[serde(serialize_with = "rfc3339")]
    pub last_check: DateTime<Utc>,
    pub emergency_mode: bool,
    pub checks: BTreeMap<&'static str, Check>,
    pub totals: Totals,
}

fn rfc3339<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Secs, true))
}

impl HealthReport {
    /// `[health] Status: HEALTHY | Queues: Q=45 A=12 | DLQ=25 | Stuck=3 | Stale=0`
    pub fn log_line(&self) -> String {
        let t = &self.totals;
        let dlq = t.dlq.map_or_else(|| "?".to_owned(), |n| n.to_string());
        format!(
            "[health] Status: {} | Queues: Q={} A={} | DLQ={} | Stuck={} | Stale={}{}",
            self.status.as_str().to_ascii_uppercase(),
            t.queued,
            t.active,
            dlq,
            t.stuck,
            t.stalled,
            if self.emergency_mode {
                " | EMERGENCY MODE"
            } else {
                ""
            }
        )
    }
}
