//! The core: per-action FIFO queues, each owned by one actor, behind the [`Executor`] handle.
//!
//! It imports nothing from the RabbitMQ, Postgres or HTTP edges; it reaches them only through
//! the traits in [`ports`].

pub mod action;
pub mod ahead;
pub mod clock;
pub mod dormant;
pub mod ended;
pub mod memory;
pub mod owner;
#[cfg(test)]
mod passivation_tests;
pub mod policy;
pub mod ports;
pub mod queue;
pub mod recent;
pub mod registry;
pub mod supervisor;
pub mod totals;
pub mod unroutable;

pub use clock::{Clock, Stamp};
pub use policy::{
    ActionPolicy, PolicyPatch, PolicySource, QueueSettings, RateLimit, UniformPolicy,
};
pub use ports::{
    Dispatch, Dispatcher, Event, History, HistoryError, OutcomeSink, Ports, QueueStats,
    StatsObserver,
};
pub use queue::{PurgeOrder, PurgedEntry, Restored};
pub use registry::{CoreError, Executor};
