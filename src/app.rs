//! Startup and shutdown of the whole service, shared by `fifo-executor serve` and the tests.
//!
//! Order at start: metrics recorder, core (executor and its ports), RabbitMQ edge. Order at
//! shutdown (one path, see [`Service::shutdown`]): stop consuming, settle what was taken,
//! drain the action actors, get the last publishes confirmed, close the connection.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::{self, Config};
use crate::core::memory::{DiscardSink, LatestStats};
use crate::core::{
    ActionPolicy, Executor, OutcomeSink, PolicySource, Ports, QueueSettings, RateLimit,
};
use crate::model::ActionRef;
use crate::rabbit::consumers::ConsumerContext;
use crate::rabbit::dead_letters::DeadLetterSink;
use crate::rabbit::edge::{self, EdgeError, EdgeSettings};
use crate::rabbit::publisher;
use crate::rabbit::topology::{QueueKind, TopologySpec};

/// Policies as the config file gives them.
pub struct ConfigPolicies(pub Config);

impl PolicySource for ConfigPolicies {
    fn policy_for(&self, action: &ActionRef) -> ActionPolicy {
        let p = self.0.policy_for(action.as_str());
        let enabled = self
            .0
            .policies
            .actions
            .get(action.as_str())
            .and_then(|a| a.enabled)
            .unwrap_or(true);
        core_policy(p, enabled)
    }
}

/// Converts a validated config policy into the core's.
pub fn core_policy(p: config::Policy, enabled: bool) -> ActionPolicy {
    ActionPolicy {
        // Validation has refused 0 already; 1 is the safe reading if it ever slipped through.
        concurrency_limit: NonZeroU32::new(p.concurrency_limit).unwrap_or(NonZeroU32::MIN),
        rate_limit: p.rate_limit.and_then(|r| {
            Some(RateLimit {
                max: NonZeroU32::new(r.max)?,
                per: Duration::from_secs(r.per_seconds),
            })
        }),
        enabled,
    }
}

/// The core's queue settings from the config.
pub fn queue_settings(c: &Config) -> QueueSettings {
    QueueSettings {
        max_queue_length: c.executor.queue.max_queue_length,
        queue_timeout: Duration::from_secs(c.executor.queue.queue_timeout_seconds),
        emergency_mode: c.executor.emergency_mode,
        ..QueueSettings::default()
    }
}

/// Errors that stop the service from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("could not start the core: {0}")]
    Core(#[from] crate::core::CoreError),
    #[error(transparent)]
    Edge(#[from] EdgeError),
    #[error("the RabbitMQ edge task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// A running service.
pub struct Service {
    pub executor: Arc<Executor>,
    pub stats: Arc<LatestStats>,
    shutdown: watch::Sender<bool>,
    edge: tokio::task::JoinHandle<Result<(), EdgeError>>,
}

impl Service {
    /// Builds everything and starts consuming.
    pub async fn start(config: Config) -> Result<Self, AppError> {
        let (publisher, slot, _publisher_task) = publisher::spawn(None);
        let stats = Arc::new(LatestStats::default());
        let sink: Arc<dyn OutcomeSink> = Arc::new(DeadLetterSink::new(
            publisher.clone(),
            config.dlq.enabled,
            Arc::new(DiscardSink),
        ));
        let ports = Ports {
            dispatcher: Arc::new(publisher.clone()),
            sink,
            observer: stats.clone(),
        };
        let executor = Arc::new(
            Executor::start(
                queue_settings(&config),
                ports,
                Arc::new(ConfigPolicies(config.clone())),
            )
            .await?,
        );
        let ctx = Arc::new(ConsumerContext::new(
            executor.clone(),
            publisher,
            config.rabbitmq.max_message_bytes,
            config.rabbitmq.max_deliveries,
            config.dlq.enabled,
        ));
        let settings = EdgeSettings {
            url: config.rabbitmq.url.clone(),
            prefetch: config.rabbitmq.prefetch,
            topology: TopologySpec {
                queue_type: match config.rabbitmq.queue_type {
                    config::QueueType::Classic => QueueKind::Classic,
                    config::QueueType::Quorum => QueueKind::Quorum,
                },
                dlq_ttl_hours: config.dlq.ttl_hours,
                dlq_max_entries: config.dlq.max_entries,
            },
            reconnect_max_backoff: Duration::from_millis(config.rabbitmq.reconnect_max_backoff_ms),
            shutdown_timeout: Duration::from_secs(config.executor.shutdown_timeout_seconds),
        };
        let (shutdown, shutdown_rx) = watch::channel(false);
        let drain_executor = executor.clone();
        let drain_timeout = settings.shutdown_timeout;
        let edge = tokio::spawn(edge::run(settings, ctx, slot, shutdown_rx, async move {
            drain_executor.shutdown(drain_timeout).await;
        }));
        Ok(Self {
            executor,
            stats,
            shutdown,
            edge,
        })
    }

    /// Stops the service in the one fixed order and waits for it.
    pub async fn shutdown(self) -> Result<(), AppError> {
        let _ = self.shutdown.send(true);
        self.edge.await??;
        Ok(())
    }

    /// Waits until the service stops by itself (a fatal edge error) or `signal` resolves, then
    /// shuts down.
    pub async fn run_until(
        mut self,
        signal: impl std::future::Future<Output = ()>,
    ) -> Result<(), AppError> {
        tokio::select! {
            r = &mut self.edge => {
                r??;
                Ok(())
            }
            _ = signal => self.shutdown().await,
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn termination_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
