//! Companion tools behind `fifo-executor submit` and `fifo-executor worker`: a producer and a
//! simulated worker that speak the contract over RabbitMQ, so the whole flow can be watched
//! from two terminals and tests and benchmarks have realistic peers; [`bench`], the load
//! benchmark that drives an executor (or a bare broker relay) with both and checks what it
//! sees; and [`ops`], the operators' commands (`stats`, `health`, `purge`, `dlq`) over the
//! service's HTTP API.

pub mod bench;
pub mod ops;
pub mod submit;
pub mod worker;

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};

use crate::rabbit::topology;

/// Properties of every message the tools publish: JSON, persistent, as the contract says.
pub fn persistent_json() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
}

/// Declares a worker's own durable queue, bound to the dispatches of `actions` (`#` for all),
/// and the exchange in case the executor has not run yet. `arguments` are the queue's own
/// (the bench gives its queues an expiry).
pub async fn declare_dispatch_queue(
    ch: &Channel,
    queue: &str,
    actions: &str,
    arguments: FieldTable,
) -> Result<(), lapin::Error> {
    ch.exchange_declare(
        topology::EXCHANGE.into(),
        lapin::ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        arguments,
    )
    .await?;
    ch.queue_bind(
        queue.into(),
        topology::EXCHANGE.into(),
        topology::dispatch_routing_key(actions).as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(())
}

/// The body of a completion a simulated worker sends.
pub fn completion_body(execution_id: serde_json::Value, failed: bool, took: Duration) -> Vec<u8> {
    let body = serde_json::json!({
        "execution_id": execution_id,
        "status": if failed { "failed" } else { "succeeded" },
        "result": {"simulated_ms": took.as_millis() as u64},
    });
    // A JSON value built here always serializes.
    serde_json::to_vec(&body).unwrap_or_default()
}

/// How long a simulated execution takes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DurationDist {
    /// Always this long (`5`; `0` completes at once).
    Fixed(Duration),
    /// Evenly spread between the two (`5-50`).
    Uniform(Duration, Duration),
    /// Exponentially distributed with this mean (`exp:20`): many short, a few long, like
    /// real tasks.
    Exponential(Duration),
}

impl DurationDist {
    /// Parses milliseconds: `MS`, `MIN-MAX` or `exp:MEAN`.
    pub fn parse_ms(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not MS, MIN-MAX or exp:MEAN (milliseconds)");
        let ms = |t: &str| -> Result<Duration, String> {
            let v: f64 = t.trim().parse().map_err(|_| bad())?;
            if v.is_finite() && v >= 0.0 {
                Ok(Duration::from_secs_f64(v / 1000.0))
            } else {
                Err(bad())
            }
        };
        if let Some(mean) = s.trim().strip_prefix("exp:") {
            return Ok(Self::Exponential(ms(mean)?));
        }
        match s.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (ms(a)?, ms(b)?);
                Ok(Self::Uniform(a.min(b), a.max(b)))
            }
            None => Ok(Self::Fixed(ms(s)?)),
        }
    }

    /// One simulated duration.
    pub fn sample(&self, rng: &mut XorShift) -> Duration {
        match *self {
            Self::Fixed(d) => d,
            Self::Uniform(a, b) => a + (b - a).mul_f64(rng.unit()),
            // Inverse transform; 1 - u is in (0, 1], so the logarithm is finite.
            Self::Exponential(mean) => mean.mul_f64(-(1.0 - rng.unit()).ln()),
        }
    }
}

impl std::fmt::Display for DurationDist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        match *self {
            Self::Fixed(d) => write!(f, "{}", ms(d)),
            Self::Uniform(a, b) => write!(f, "{}-{}", ms(a), ms(b)),
            Self::Exponential(m) => write!(f, "exp:{}", ms(m)),
        }
    }
}

/// A small, fast, seedable generator for simulated durations and failures; statistical
/// quality does not matter here, and it keeps the tools free of another dependency.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    pub fn seeded() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9E37_79B9_7F4A_7C15);
        Self(nanos ^ u64::from(std::process::id()) | 1)
    }

    /// A generator that repeats the same sequence for the same seed.
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A float in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_as_fixed_range_or_exponential_milliseconds() {
        assert_eq!(
            DurationDist::parse_ms("5"),
            Ok(DurationDist::Fixed(Duration::from_millis(5)))
        );
        assert_eq!(
            DurationDist::parse_ms("50-5"),
            Ok(DurationDist::Uniform(
                Duration::from_millis(5),
                Duration::from_millis(50)
            ))
        );
        assert_eq!(
            DurationDist::parse_ms("exp:20"),
            Ok(DurationDist::Exponential(Duration::from_millis(20)))
        );
        assert!(DurationDist::parse_ms("soon").is_err());
        assert!(DurationDist::parse_ms("-3").is_err());
    }

    #[test]
    fn sampled_durations_stay_in_their_range() {
        let mut rng = XorShift::seeded();
        let range = DurationDist::Uniform(Duration::from_millis(5), Duration::from_millis(6));
        for _ in 0..1000 {
            let d = range.sample(&mut rng);
            assert!(d >= Duration::from_millis(5) && d <= Duration::from_millis(6));
        }
        let exp = DurationDist::Exponential(Duration::from_millis(10));
        let mean = (0..20_000)
            .map(|_| exp.sample(&mut rng).as_secs_f64())
            .sum::<f64>()
            / 20_000.0;
        assert!((0.008..0.012).contains(&mean), "mean {mean}");
    }
}
