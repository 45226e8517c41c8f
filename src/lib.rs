//! fifo-executor: per-action FIFO execution queues with concurrency limits.

pub mod rabbit;
