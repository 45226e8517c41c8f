//! The intake throttle: `api.rate_limits.global`, the runbook's "Enable API Rate Limiting" step
//! for a system-wide overload.
//!
//! Producers reach the executor through `attune.execution.requests.queue`, so that is where the
//! limit applies: the request consumer takes at most `max_requests_per_minute` deliveries a
//! minute and waits for the next token otherwise. Nothing is rejected or dead-lettered: what
//! the executor does not take stays in RabbitMQ (at most `prefetch` messages wait unacknowledged
//! in this process), and is taken in order once tokens come back. Completions and cancels are
//! never throttled, so running executions keep freeing their slots.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::{Quota, RateLimiter, middleware::NoOpMiddleware, nanos::Nanos, state};

use crate::core::Clock;

type Limiter = RateLimiter<state::NotKeyed, state::InMemoryState, Clock, NoOpMiddleware<Nanos>>;

/// Hands out intake tokens at a steady rate.
pub struct IntakeThrottle {
    /// A GCRA bucket refilled at `per_minute / 60` tokens a second.
    limiter: Limiter,
    /// The same clock the limiter reads, so paused tokio time drives the waits in tests.
    clock: Clock,
    /// Most tokens one batch may take at once: the bucket's burst size.
    burst: NonZeroU32,
}

impl std::fmt::Debug for IntakeThrottle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntakeThrottle")
            .field("burst", &self.burst)
            .finish_non_exhaustive()
    }
}

impl IntakeThrottle {
    /// A throttle of `per_minute` requests a minute. Its burst is one second's worth (at least
    /// one), so a limit of 600 a minute takes about 10 a second rather than 600 at once and then
    /// nothing for a minute.
    pub fn per_minute(per_minute: NonZeroU32, clock: Clock) -> Self {
        let burst = NonZeroU32::new(per_minute.get().div_ceil(60)).unwrap_or(NonZeroU32::MIN);
        let period = Duration::from_secs(60) / per_minute.get();
        // A period that rounds to zero cannot happen for a u32 per minute (60 s / u32::MAX is
        // about 14 ns), but governor refuses zero, so fall back to its fastest quota.
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
            .allow_burst(burst);
        Self {
            limiter: RateLimiter::direct_with_clock(quota, clock.clone()),
            clock,
            burst,
        }
    }

    /// Most deliveries one batch may hold, so that [`IntakeThrottle::acquire`] can grant it.
    pub fn max_batch(&self) -> usize {
        self.burst.get() as usize
    }

    /// Waits until `n` tokens are available and takes them. `n` above the burst is clamped to
    /// it (the caller sizes its batches with [`IntakeThrottle::max_batch`]).
    pub async fn acquire(&self, n: usize) {
        let n = u32::try_from(n)
            .ok()
            .and_then(NonZeroU32::new)
            .map_or(NonZeroU32::MIN, |n| n.min(self.burst));
        loop {
            match self.limiter.check_n(n) {
                Ok(Ok(())) => return,
                Ok(Err(not_until)) => {
                    let wait = not_until.wait_time_from(governor::clock::Clock::now(&self.clock));
                    metrics::counter!("attune_intake_throttled_total").increment(1);
                    tokio::time::sleep(wait).await;
                }
                // Only when n exceeds the burst, which the clamp above rules out.
                Err(_) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle(per_minute: u32) -> IntakeThrottle {
        IntakeThrottle::per_minute(NonZeroU32::new(per_minute).expect("positive"), Clock::new())
    }

    #[test]
    fn the_burst_is_one_seconds_worth() {
        assert_eq!(throttle(500).max_batch(), 9);
        assert_eq!(throttle(600).max_batch(), 10);
        assert_eq!(throttle(30).max_batch(), 1);
        assert_eq!(throttle(1).max_batch(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn sixty_a_minute_takes_one_token_a_second() {
        let t = throttle(60);
        let start = tokio::time::Instant::now();
        for _ in 0..5 {
            t.acquire(1).await;
        }
        // The first token is free; each of the next four waits for one second of (paused) time.
        assert_eq!(start.elapsed(), Duration::from_secs(4));
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_takes_as_many_tokens_as_it_holds() {
        let t = throttle(600); // 10 a second, burst 10
        let start = tokio::time::Instant::now();
        t.acquire(10).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        t.acquire(10).await;
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        // Larger than the burst: clamped, not refused and not stuck.
        t.acquire(1000).await;
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }
}
