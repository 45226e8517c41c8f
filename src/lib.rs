//! fifo-executor: per-action FIFO execution queues with concurrency limits.
//!
//! # Layout
//!
//! - [`config`]: the YAML configuration with `ATTUNE__` environment overrides, typed and
//!   validated at start.
//! - [`model`]: the vocabulary every part shares: action refs, execution ids, payloads,
//!   submissions, completions, cancels and the verdicts on them.
//! - [`core`]: the actors. One [`core::action`] actor per action owns its FIFO queue, slots
//!   and counters ([`core::queue`] holds the rules as a plain state machine);
//!   [`core::registry`] is the [`core::Executor`] handle every edge calls, and
//!   [`core::supervisor`] watches the actors. What the actors share with the registry is
//!   [`core::action::Shared`]: the live index, the ids that ended lately
//!   ([`core::ended`]), the cancels that came before their requests ([`core::ahead`]) and
//!   the actions whose dispatches come back unrouted ([`core::unroutable`]), and the
//!   executor-wide counters of admissions, completions and waits ([`core::totals`]). Each
//!   actor keeps its last few ends ([`core::recent`]) for the operations page.
//!   [`core::policy`] holds the limits and settings, [`core::clock`] the one clock,
//!   [`core::ports`] the traits through which the core reaches the edges and
//!   [`core::memory`] their in-memory versions. Imports point one way: registry →
//!   supervisor → action → the rest.
//! - [`db`]: the Postgres edge: the ledger of executions (an outcome sink that settles receipts
//!   only after the commit), the `queue_stats` writer, recovery at start, the `action`
//!   table as the one source of policies, the health history and the ledger purge.
//! - [`rabbit`]: the RabbitMQ edge (intake, dispatch, completions, cancels, dead letters,
//!   and in shared mode the partition queues).
//! - [`ops`]: what operators and monitoring see and do: Prometheus metrics, the periodic
//!   health check (its result in [`ops::health_report`], its rules applied to one action in
//!   [`ops::flags`]) and purge, the overview's 15-minute history ([`ops::history`]), reading,
//!   replaying and discarding the DLQ, the hooks through which the Postgres edge keeps
//!   policies, health results and the ledger's history in check, the log output, live
//!   configuration reload ([`ops::reload`], applying what [`config`]'s comparison of two
//!   configurations allows), and readiness ([`ops::readiness`], told to systemd by
//!   [`ops::systemd`]).
//! - [`http`]: the HTTP edge on `api.listen`: the operators' API (with what the operations
//!   page reads: the overview, the actions table, one action in detail), `/health`, `/ready`,
//!   `/metrics`, and the operations page (`GET /`, [`http::ui`]) built on that API.
//! - [`cluster`]: how the actions are split into partitions (a fixed hash of the ref), what
//!   an instance is called, and ([`cluster::takeover`]) how an instance in `cluster.mode:
//!   shared` takes a partition over. `db::partitions` records who owns each partition and
//!   fences the ledger's writes by it; `rabbit::partitions` and `rabbit::routing` are the
//!   partition queues and what is carried to another instance's.
//! - [`app`]: builds the service from the config and stops it, in one fixed order.
//! - [`fuzzing`]: what the fuzz targets (`fuzz/`) and the corpus replay test run on each
//!   input: the decoders of untrusted input and what the service does next with the result.
//! - [`cli`] and [`tools`]: the command line (`serve`, the ops commands that call the HTTP
//!   API, and the producer and worker simulators).
//!
//! # Supervision and ordering
//!
//! ```text
//!   Executor (handle) ──► Supervisor
//!                          ├── ActionActor(a)   owns queue a, slots a, counters a
//!                          └── ActionActor(b)   …
//!   edges ──submit/complete/cancel──► Executor ──batch message──► ActionActor
//!   ActionActor ──► Dispatcher (admitted, FIFO)   OutcomeSink (events)   StatsObserver
//! ```
//!
//! Ractor orders messages per sender only, so nothing relies on that: every operation on an
//! action is a message to that action's single actor, and the actor's mailbox order is the
//! order of acceptance. Dispatches of one action leave in acceptance order; actions never
//! wait on one another.

pub mod app;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod core;
pub mod db;
pub mod fuzzing;
pub mod http;
pub mod model;
pub mod ops;
pub mod rabbit;
pub mod tools;
