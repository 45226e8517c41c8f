//! One clock for the whole core: monotonic for every deadline (so tests can pause tokio time
//! and a wall-clock jump never times out a queue), with wall-clock times derived from it for
//! everything shown to people and written to Postgres.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;

/// A point on the core's clock: microseconds since the clock was created. Signed, because
/// executions recovered after a restart were enqueued before this process started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Stamp(i64);

impl Stamp {
    pub fn micros(self) -> i64 {
        self.0
    }

    /// Time from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Stamp) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0).max(0) as u64)
    }

    pub fn plus(self, d: Duration) -> Stamp {
        Stamp(self.0.saturating_add(micros_of(d)))
    }

    pub fn minus(self, d: Duration) -> Stamp {
        Stamp(self.0.saturating_sub(micros_of(d)))
    }

    /// The first stamp at or after `offset` past the clock's origin. Rounds up: a deadline
    /// finer than a microsecond must not turn into a stamp before it.
    pub fn at_or_after(offset: Duration) -> Stamp {
        let micros = offset.as_nanos().div_ceil(1_000);
        Stamp(i64::try_from(micros).unwrap_or(i64::MAX))
    }
}

fn micros_of(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Converts between the monotonic [`Stamp`]s the core uses and wall-clock times.
#[derive(Debug, Clone)]
pub struct Clock {
    /// The monotonic instant that is `Stamp(0)`.
    origin: Instant,
    /// The wall-clock time at `origin`, in microseconds since the Unix epoch.
    origin_wall_micros: i64,
}

impl Clock {
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
            origin_wall_micros: Utc::now().timestamp_micros(),
        }
    }

    /// A clock whose origin is the given wall-clock time; tests use it to get readable,
    /// deterministic timestamps.
    pub fn with_wall_origin(wall: DateTime<Utc>) -> Self {
        Self {
            origin: Instant::now(),
            origin_wall_micros: wall.timestamp_micros(),
        }
    }

    pub fn now(&self) -> Stamp {
        Stamp(micros_of(
            Instant::now().saturating_duration_since(self.origin),
        ))
    }

    /// The wall-clock time of a stamp.
    pub fn wall(&self, s: Stamp) -> DateTime<Utc> {
        DateTime::from_timestamp_micros(self.origin_wall_micros.saturating_add(s.0))
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    }

    /// The stamp of a wall-clock time, for executions recovered from the ledger.
    pub fn stamp_of(&self, wall: DateTime<Utc>) -> Stamp {
        Stamp(
            wall.timestamp_micros()
                .saturating_sub(self.origin_wall_micros),
        )
    }

    /// The monotonic instant of a stamp, for timers.
    pub fn instant(&self, s: Stamp) -> Instant {
        if s.0 >= 0 {
            self.origin + Duration::from_micros(s.0 as u64)
        } else {
            self.origin
                .checked_sub(Duration::from_micros(s.0.unsigned_abs()))
                .unwrap_or(self.origin)
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// Lets governor's rate limiters run on the core's clock, so paused tokio time drives them too.
impl governor::clock::Clock for Clock {
    type Instant = governor::nanos::Nanos;

    fn now(&self) -> Self::Instant {
        governor::nanos::Nanos::from(Instant::now().saturating_duration_since(self.origin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn stamps_follow_paused_time_and_map_to_wall_clock() {
        let wall0 = DateTime::from_timestamp(1_800_000_000, 0).expect("valid time");
        let clock = Clock::with_wall_origin(wall0);
        let t0 = clock.now();
        tokio::time::advance(Duration::from_secs(90)).await;
        let t1 = clock.now();
        assert_eq!(t1.since(t0), Duration::from_secs(90));
        assert_eq!(
            clock.wall(t1) - clock.wall(t0),
            chrono::Duration::seconds(90)
        );
        assert_eq!(clock.stamp_of(clock.wall(t1)), t1);
        let before_start = clock.stamp_of(wall0 - chrono::Duration::seconds(5));
        assert!(before_start < t0);
        assert_eq!(t0.since(before_start), Duration::from_secs(5));
    }

    #[test]
    fn deadlines_round_up_to_the_next_stamp() {
        assert_eq!(
            Stamp::at_or_after(Duration::from_nanos(333_333_333)).micros(),
            333_334
        );
        assert_eq!(Stamp::at_or_after(Duration::from_micros(7)).micros(), 7);
        assert_eq!(Stamp::at_or_after(Duration::ZERO).micros(), 0);
    }
}
