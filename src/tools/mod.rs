//! Companion tools behind `fifo-executor submit` and `fifo-executor worker`: a producer and a
//! simulated worker that speak the contract over RabbitMQ, so the whole flow can be watched
//! from two terminals and tests and benchmarks have realistic peers; and [`ops`], the
//! operators' commands (`stats`, `health`, `purge`, `dlq`) over the service's HTTP API.

pub mod ops;
pub mod submit;
pub mod worker;

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
