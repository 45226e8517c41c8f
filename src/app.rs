//! Startup and shutdown of the whole service, shared by `fifo-executor serve` and the tests.
//!
//! Order at start: metrics recorder (every unlabelled family gets its first sample), HTTP
//! listener (bound first, so a taken port stops the start before anything runs; connections
//! wait in its backlog until the server runs), core (executor and its ports, recovery from the
//! ledger), RabbitMQ edge, the first health check (once the edge's session is up, or after
//! [`FIRST_CHECK_WAIT`]), operations tasks (health checks, purge, metrics upkeep, the
//! overview's history sampler), HTTP server. So the first answer of `/health` and `/metrics`
//! already carries a health check's result. The service is *ready* ([`Readiness`],
//! `GET /ready`, systemd's `READY=1`) once the edge's session is up: topology declared,
//! consumers running, recovery done; not ready again while the session is lost or the service
//! shuts down. Order at shutdown (one path, see [`Service::shutdown`]): not ready, stop the
//! operations tasks (no purge starts while draining), stop consuming, settle what was taken,
//! drain the action actors, get the last publishes confirmed, close the connections, and close
//! HTTP last, so `/health`, `/ready` and `/metrics` answer until the end.
//!
//! A service started with [`Service::start_reloadable`] hands its live parts (executor,
//! configured policies, health monitor, purger, DLQ switch) to the [`Reloader`] once it runs,
//! and takes them back when it stops; the reload itself is [`crate::ops::reload`]'s.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use crate::config::{self, Config, DispatchWait};
use crate::core::memory::{DiscardSink, LatestStats};
use crate::core::{Executor, OutcomeSink, PolicySource, Ports};
use crate::http::{self, AppState};
use crate::ops::dlq::Dlq;
use crate::ops::health::{FIRST_CHECK_WAIT, HealthMonitor};
use crate::ops::history::{SAMPLE_INTERVAL, Sampler};
use crate::ops::hooks::{
    HealthStore, LedgerPurge, NoHealthStore, NoLedgerPurge, NoPolicyStore, PolicyStore,
};
use crate::ops::metrics::{self as ops_metrics, ActionTallies, Metrics, MetricsError, MetricsSink};
use crate::ops::purge::{PurgeSettings, Purger};
use crate::ops::readiness::Readiness;
use crate::ops::reload::{LiveTargets, Reloader};
use crate::rabbit::consumers::ConsumerContext;
use crate::rabbit::dead_letters::{DeadLetterSink, DlqSwitch};
use crate::rabbit::edge::{self, AfterLoss, EdgeError, EdgeSettings, SessionEvent};
use crate::rabbit::publisher;
use crate::rabbit::throttle::IntakeThrottle;
use crate::rabbit::topology::TopologySpec;

pub use crate::ops::settings::{ConfigPolicies, core_policy, queue_settings};

/// The exit status of `serve` when another instance took its partitions.
pub const FENCED_EXIT_STATUS: u8 = 3;

/// Errors that stop the service from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(
        "another instance took this instance's partitions (attune.partition): it stopped \
         without writing anything more"
    )]
    Fenced,
    #[error("could not start the core: {0}")]
    Core(#[from] crate::core::CoreError),
    #[error("could not listen for HTTP on {addr} (api.listen): {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("the HTTP server failed: {0}")]
    Http(std::io::Error),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Edge(#[from] EdgeError),
    #[error("the RabbitMQ edge task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("Postgres: {0}")]
    Db(#[from] crate::db::DbError),
}

impl AppError {
    /// Whether an instance in `cluster.mode: shared` starts over after this, as a standby of
    /// every partition queue: it was fenced (another instance took one of its partitions) or
    /// lost its RabbitMQ session (its partitions may have moved meanwhile). Its state is
    /// dropped either way; the partitions' owners rebuild theirs from the ledger.
    pub fn calls_for_a_new_start(&self) -> bool {
        matches!(
            self,
            AppError::Fenced | AppError::Edge(EdgeError::SharedSessionLost(_))
        )
    }
}

/// The Postgres side of a service running with `durability: ledger`.
struct Durable {
    pool: sqlx::PgPool,
    schema: crate::db::Schema,
    policies: Arc<crate::db::policies::DbPolicySource>,
    /// The ledger, to tell at shutdown whether everything was committed.
    ledger: Arc<crate::db::ledger::LedgerSink>,
    /// Stopped in this order at shutdown: the policy poller, then the ledger (its last batch),
    /// then the stats writer (the final counters).
    workers: Vec<crate::db::Worker>,
    /// `cluster.mode: shared`: the clean stop is marked on the partitions while draining,
    /// not at the end.
    shared: bool,
}

/// What the core is built with besides the dispatcher, and the Postgres side if there is one.
type CorePorts = (
    Arc<dyn OutcomeSink>,
    Arc<dyn crate::core::StatsObserver>,
    Arc<dyn PolicySource>,
    Option<Durable>,
);

/// What the publisher learns about dispatches goes to the ledger (`running` once delivered)
/// and to the executor (returned ones wait again; a delivery ends an action's no-route
/// state). Both are set after the publisher starts, hence the cells.
struct Outcomes {
    ledger: Arc<std::sync::OnceLock<Arc<crate::db::ledger::LedgerSink>>>,
    /// Weak: the executor's dispatcher holds the publisher.
    executor: Arc<std::sync::OnceLock<std::sync::Weak<Executor>>>,
}

impl Outcomes {
    fn executor(&self) -> Option<Arc<Executor>> {
        self.executor.get().and_then(std::sync::Weak::upgrade)
    }
}

impl publisher::DispatchOutcomes for Outcomes {
    fn delivered(&self, d: &crate::core::Dispatch) {
        if let Some(ledger) = self.ledger.get() {
            ledger.mark_running(vec![d.execution_id]);
        }
        if let Some(executor) = self.executor() {
            executor.delivered(&d.action);
        }
    }

    fn returned(&self, d: crate::core::Dispatch) {
        if let Some(executor) = self.executor() {
            executor.returned(vec![d]);
        }
    }

    fn resending(
        &self,
        ids: Vec<crate::model::ExecutionId>,
    ) -> futures::future::BoxFuture<'_, bool> {
        Box::pin(async move {
            let Some(ledger) = self.ledger.get() else {
                return true;
            };
            // Transient errors are retried inside; what is left is not about reachability, and
            // holding every dispatch back for it would stop the service: send, and say so.
            match ledger.record_resends(&ids).await {
                Ok(allowed) => allowed,
                Err(e) => {
                    tracing::error!(error = %e, count = ids.len(),
                        "could not record the raised attempts of dispatches sent again; sending them anyway");
                    true
                }
            }
        })
    }

    fn still_wanted(&self, d: &crate::core::Dispatch) -> bool {
        self.ledger.get().is_none_or(|l| !l.is_fenced())
            && self
                .executor()
                .is_none_or(|executor| executor.is_live(d.execution_id))
    }
}

/// Feeds the in-memory latest counters (HTTP, metrics, health) and the `queue_stats` writer.
struct BothStats(Arc<LatestStats>, Arc<crate::db::stats::StatsWriter>);

impl crate::core::StatsObserver for BothStats {
    fn observe(&self, stats: &crate::core::QueueStats) {
        self.0.observe(stats);
        self.1.observe(stats);
    }
}

/// Where the service keeps policies set over HTTP, health results and old ledger rows. A hook
/// left `None` (the default) is the service's own: the Postgres one under
/// `executor.durability: ledger`, the in-memory no-op under `memory`. Tests set their own.
#[derive(Clone, Default)]
pub struct Hooks {
    /// Stores and applies `PUT /api/v1/actions/{ref}/policy`.
    pub policies: Option<Arc<dyn PolicyStore>>,
    /// Keeps each health check's result.
    pub health: Option<Arc<dyn HealthStore>>,
    /// Deletes old ledger rows in each purge cycle.
    pub ledger_purge: Option<Arc<dyn LedgerPurge>>,
}

impl Hooks {
    /// Fills the hooks left `None`: from the Postgres side if there is one, else no-ops.
    fn resolve(self, durable: Option<&Durable>) -> ResolvedHooks {
        use crate::db::ops::{DbHealthStore, DbLedgerPurge};
        use crate::db::policies::DbPolicyStore;
        let policies = self.policies.unwrap_or_else(|| match durable {
            Some(d) => Arc::new(DbPolicyStore::new(
                d.pool.clone(),
                &d.schema,
                d.policies.clone(),
            )),
            None => Arc::new(NoPolicyStore::default()),
        });
        let health = self.health.unwrap_or_else(|| match durable {
            Some(d) => Arc::new(DbHealthStore::new(d.pool.clone(), &d.schema)),
            None => Arc::new(NoHealthStore),
        });
        let ledger_purge = self.ledger_purge.unwrap_or_else(|| match durable {
            Some(d) => Arc::new(DbLedgerPurge::new(d.pool.clone(), &d.schema)),
            None => Arc::new(NoLedgerPurge),
        });
        ResolvedHooks {
            policies,
            health,
            ledger_purge,
        }
    }
}

/// [`Hooks`] with every hook chosen.
struct ResolvedHooks {
    /// For the HTTP edge.
    policies: Arc<dyn PolicyStore>,
    /// For the health monitor.
    health: Arc<dyn HealthStore>,
    /// For the purger.
    ledger_purge: Arc<dyn LedgerPurge>,
}

/// How often recent histogram samples are folded into buckets when nobody scrapes (the
/// exporter's own default).
const METRICS_UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// A running service.
pub struct Service {
    pub executor: Arc<Executor>,
    pub stats: Arc<LatestStats>,
    durable: Option<Durable>,
    /// The ledger writer, with `durability: ledger`; its counters tell tests and operators
    /// whether Postgres is taking writes.
    ledger: Option<Arc<crate::db::ledger::LedgerSink>>,
    pub health: Arc<HealthMonitor>,
    pub purger: Arc<Purger>,
    dlq: Option<Arc<Dlq>>,
    http_addr: std::net::SocketAddr,
    shutdown: watch::Sender<bool>,
    edge: tokio::task::JoinHandle<Result<(), EdgeError>>,
    /// Stops the health, purge, metrics-upkeep and history-sampling loops.
    ops_shutdown: watch::Sender<bool>,
    ops_tasks: Vec<tokio::task::JoinHandle<()>>,
    http_shutdown: oneshot::Sender<()>,
    http: tokio::task::JoinHandle<std::io::Result<()>>,
    shutdown_timeout: Duration,
    /// Applies configuration reloads to this service while it runs.
    reloader: Arc<Reloader>,
    /// Whether the service takes work (`GET /ready`, systemd's `READY=1`).
    readiness: Arc<Readiness>,
}

impl Service {
    /// Builds everything and starts consuming, with the service's own hooks.
    pub async fn start(config: Config) -> Result<Self, AppError> {
        Self::start_with(config, Hooks::default()).await
    }

    /// Builds everything and starts consuming. `config` was built in code: there is nothing to
    /// reload it from (`POST /api/v1/admin/reload` answers 409).
    pub async fn start_with(config: Config, hooks: Hooks) -> Result<Self, AppError> {
        Self::start_reloadable(Arc::new(Reloader::given(config)), hooks).await
    }

    /// Builds everything from the configuration `reloader` holds in force and starts
    /// consuming; SIGHUP (where the caller listens for it) and `POST /api/v1/admin/reload`
    /// reload through `reloader`, which applies to this service until it stops.
    pub async fn start_reloadable(reloader: Arc<Reloader>, hooks: Hooks) -> Result<Self, AppError> {
        Self::start_reporting(reloader, hooks, Arc::new(Readiness::default())).await
    }

    /// [`Service::start_reloadable`], telling `readiness` how far it got (the command line
    /// passes the same one to every in-process restart, with systemd's socket).
    pub async fn start_reporting(
        reloader: Arc<Reloader>,
        hooks: Hooks,
        readiness: Arc<Readiness>,
    ) -> Result<Self, AppError> {
        readiness.starting("starting");
        let config = reloader.in_force().await;
        let metrics_handle = if config.executor.queue.enable_metrics {
            let handle = ops_metrics::install()?;
            first_samples(&config);
            Some(handle)
        } else {
            None
        };
        crate::ops::purge::note_if_shadowed(&config);
        let listener = tokio::net::TcpListener::bind(config.api.listen)
            .await
            .map_err(|source| AppError::Listen {
                addr: config.api.listen,
                source,
            })?;
        let http_addr = listener.local_addr().map_err(AppError::Http)?;

        let ledger_mode = config.executor.durability == config::Durability::Ledger;
        let instance_id = config.cluster.instance_id();
        // The ledger marks a dispatch `running` once the broker confirmed it; the publisher is
        // built before the ledger (the ledger's inner sink publishes dead letters), hence the cell.
        let ledger_cell: Arc<std::sync::OnceLock<Arc<crate::db::ledger::LedgerSink>>> =
            Arc::new(std::sync::OnceLock::new());
        let outcomes = Arc::new(Outcomes {
            ledger: ledger_cell.clone(),
            executor: Arc::new(std::sync::OnceLock::new()),
        });
        let (publisher, slot, _publisher_task) =
            publisher::spawn(Some(outcomes.clone()), config.rabbitmq.confirm_window);
        let stats = Arc::new(LatestStats::default());
        let dlq_switch = DlqSwitch::new(config.dlq.enabled);
        let dead_letters: Arc<dyn OutcomeSink> = Arc::new(DeadLetterSink::new(
            publisher.clone(),
            dlq_switch.clone(),
            Arc::new(DiscardSink),
        ));
        // Counting is skipped altogether when metrics are off (the runbook turns them off to
        // shed overhead in a crash loop).
        let tallies = Arc::new(ActionTallies::default());
        let sink: Arc<dyn OutcomeSink> = if metrics_handle.is_some() {
            Arc::new(MetricsSink::new(dead_letters, tallies.clone()))
        } else {
            dead_letters
        };
        let config_policies = Arc::new(ConfigPolicies::new(config.clone()));
        let (sink, observer, policies, mut durable): CorePorts = if ledger_mode {
            readiness.not_ready(
                "starting: opening the Postgres ledger (retried while Postgres is unreachable)",
            );
            let (sink, observer, durable) = open_ledger(
                &config,
                sink,
                stats.clone(),
                config_policies.clone(),
                &ledger_cell,
                &instance_id,
            )
            .await?;
            let policies: Arc<dyn PolicySource> = durable.policies.clone();
            (sink, observer, policies, Some(durable))
        } else {
            (sink, stats.clone(), config_policies.clone(), None)
        };
        // On the ledger, a dispatch leaves only once recovery could cope with a crash.
        let live_only = Arc::new(crate::db::ledger::LiveOnly::new(Arc::new(
            publisher.clone(),
        )));
        let dispatcher: Arc<dyn crate::core::Dispatcher> = match ledger_cell.get() {
            Some(ledger) => match config.database.dispatch_wait {
                DispatchWait::Acceptance => Arc::new(ledger.dispatch_when_safe(live_only.clone())),
                DispatchWait::Admission => {
                    Arc::new(ledger.dispatch_after_commit(live_only.clone()))
                }
            },
            None => Arc::new(publisher.clone()),
        };
        let ports = Ports {
            dispatcher,
            sink,
            observer,
        };
        let executor = Arc::new(Executor::start(queue_settings(&config), ports, policies).await?);
        live_only.bind(&executor);
        let _ = outcomes.executor.set(Arc::downgrade(&executor));
        let shared = config.cluster.mode == config::ClusterMode::Shared;
        if let (Some(d), true) = (durable.as_ref(), shared) {
            // Each partition is rebuilt when it is taken over; ids this run assigns come
            // from a block no other instance uses.
            let first = crate::db::retry_transient("taking a block of execution ids", || {
                crate::db::partitions::take_id_block(&d.pool, &d.schema)
            })
            .await?;
            executor.use_id_block(first, crate::db::partitions::ID_BLOCK);
            tracing::info!(
                first_id = first,
                "execution ids assigned here come from a block of this run's own"
            );
        }
        if let Some(d) = durable.as_mut().filter(|_| !shared) {
            readiness.not_ready("starting: recovering the queues from the ledger");
            // Everything the ledger holds goes back into the queues before anything is consumed.
            // Admitted but never confirmed by the broker: the worker may never have had it.
            // The new attempt is recorded before the copy leaves, and the copy leaves ahead of
            // the action's waiting executions. Refused: another instance took the partitions
            // meanwhile; nothing is restored and the service stops as soon as it runs (the
            // ledger is fenced).
            let report =
                crate::db::recovery::recover_and_resend(&d.pool, &d.schema, &executor, &d.ledger)
                    .await?;
            if let Some(report) = report {
                tracing::info!(
                    actions = report.actions,
                    waiting = report.waiting,
                    running = report.running,
                    unconfirmed = report.unconfirmed.len(),
                    skipped = report.skipped.len(),
                    "recovered the queues from the ledger"
                );
            }
        }
        if let Some(d) = durable.as_mut() {
            d.workers.insert(
                0,
                d.policies.spawn_poller(
                    d.pool.clone(),
                    executor.clone(),
                    crate::db::policies::DEFAULT_POLL_INTERVAL,
                ),
            );
        }

        // Shared: partitions are taken over one by one as RabbitMQ hands them over.
        let takeover = match (durable.as_ref(), ledger_cell.get(), shared) {
            (Some(d), Some(ledger), true) => {
                Some(Arc::new(crate::cluster::takeover::Takeover::new(
                    instance_id.clone(),
                    config.cluster.partitions,
                    d.pool.clone(),
                    d.schema.clone(),
                    executor.clone(),
                    ledger.clone(),
                )))
            }
            _ => None,
        };
        let hooks = hooks.resolve(durable.as_ref());
        // Connects on first use, and only while dlq.enabled is true (a reload may change it).
        let dlq = Some(Arc::new(
            Dlq::new(config.rabbitmq.url.clone())
                .with_tls(config.rabbitmq.tls.clone())
                .with_switch(dlq_switch.clone()),
        ));
        let health = Arc::new(
            HealthMonitor::new(
                executor.clone(),
                dlq.clone(),
                config.health.thresholds.clone(),
                config.executor.emergency_mode,
                hooks.health.clone(),
            )
            .with_dlq_breakdown(metrics_handle.is_some()),
        );
        let purger = Arc::new(Purger::new(
            executor.clone(),
            PurgeSettings::from_config(&config.purge),
            hooks.ledger_purge.clone(),
        ));
        let metrics = metrics_handle.map(|h| {
            Metrics::new(
                h,
                stats.clone(),
                tallies,
                Duration::from_secs(config.executor.queue.metrics_idle_after_seconds),
            )
        });
        let history = Arc::new(Sampler::new(executor.clone(), stats.clone(), dlq.clone()));

        let mut ctx = ConsumerContext::new(
            executor.clone(),
            publisher,
            config.rabbitmq.max_message_bytes,
            config.rabbitmq.max_deliveries,
            dlq_switch.clone(),
        );
        if let (Some(d), Some(ledger)) = (durable.as_ref(), ledger_cell.get()) {
            ctx = ctx.with_history(Arc::new(crate::db::history::LedgerHistory::new(
                d.pool.clone(),
                &d.schema,
                ledger.clone(),
            )));
        }
        if let Some(takeover) = takeover.clone() {
            ctx = ctx.with_router(Arc::new(crate::rabbit::partitions::Router::new(
                config.cluster.partitions,
                takeover,
            )));
        }
        let ctx = Arc::new(ctx);
        let settings = EdgeSettings {
            on_session: {
                let readiness = readiness.clone();
                Arc::new(move |event| follow_session(&readiness, event))
            },
            shared_partitions: shared.then_some(config.cluster.partitions),
            url: config.rabbitmq.url.clone(),
            tls: config.rabbitmq.tls.clone(),
            prefetch: config.rabbitmq.prefetch,
            topology: TopologySpec {
                queue_type: config.rabbitmq.queue_type,
                dlq_ttl_hours: config.dlq.ttl_hours,
                dlq_max_entries: config.dlq.max_entries,
            },
            reconnect_max_backoff: Duration::from_millis(config.rabbitmq.reconnect_max_backoff_ms),
            heartbeat_seconds: config.rabbitmq.heartbeat_seconds,
            settles_nothing_more: {
                let ledger = ledger_cell.get().cloned();
                Arc::new(move || ledger.as_ref().is_some_and(|l| l.is_fenced()))
            },
            shutdown_timeout: Duration::from_secs(config.executor.shutdown_timeout_seconds),
            intake_throttle: config
                .api
                .rate_limits
                .intake_per_minute()
                .map(|per_minute| {
                    tracing::info!(
                        per_minute = per_minute.get(),
                        "api.rate_limits.global: requests are taken from RabbitMQ at a limited rate"
                    );
                    Arc::new(IntakeThrottle::per_minute(
                        per_minute,
                        crate::core::Clock::new(),
                    ))
                }),
        };
        let (shutdown, shutdown_rx) = watch::channel(false);
        let drain_executor = executor.clone();
        let drain_timeout = settings.shutdown_timeout;
        let drain_ledger = ledger_cell.get().cloned();
        let edge = tokio::spawn(edge::run(settings, ctx, slot, shutdown_rx, async move {
            drain_executor.shutdown(drain_timeout).await;
            // The last admissions' dispatches leave the ledger only once committed; they must
            // reach the publisher before the edge waits for its last confirms.
            let Some(ledger) = drain_ledger else { return };
            if tokio::time::timeout(drain_timeout, ledger.sync())
                .await
                .is_err()
            {
                tracing::warn!("the ledger did not commit the last admissions before the timeout");
                return;
            }
            // Shared: the partitions are marked released cleanly now, while this instance
            // still holds their queues, so the next owner need not treat their waiting
            // executions as possibly sent. (Single marks its run at the very end.)
            if shared && ledger.pending() == 0 {
                match tokio::time::timeout(drain_timeout, ledger.mark_clean_stop()).await {
                    Ok(Ok(true)) => tracing::info!("partitions released cleanly"),
                    Ok(Ok(false)) => tracing::warn!(
                        "partitions not marked released cleanly: another instance took one"
                    ),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "could not mark the partitions released")
                    }
                    Err(_) => tracing::warn!("marking the partitions released timed out"),
                }
            }
        }));
        // The first health check before HTTP answers, once the session is up (or has had
        // its chance): `/health` and `attune_health_status` have a real result from the start.
        if config.health.enabled {
            readiness.wait_ready(FIRST_CHECK_WAIT).await;
            health.check().await;
        }
        let (ops_shutdown, ops_rx) = watch::channel(false);
        let mut ops_tasks = Vec::new();
        // Both run even when switched off, so that a reload can switch them on.
        health.set_schedule(
            config
                .health
                .enabled
                .then(|| Duration::from_secs(config.health.interval_seconds)),
        );
        ops_tasks.push(tokio::spawn(health.clone().run_scheduled(ops_rx.clone())));
        purger.set_schedule(
            config
                .purge
                .enabled
                .then(|| Duration::from_secs(config.purge.interval_seconds)),
            config.purge.dry_run,
        );
        ops_tasks.push(tokio::spawn(purger.clone().run_scheduled(ops_rx.clone())));
        if let Some(m) = metrics.clone() {
            ops_tasks.push(tokio::spawn(upkeep(m, ops_rx.clone())));
        }
        ops_tasks.push(tokio::spawn(
            history.clone().run(SAMPLE_INTERVAL, ops_rx.clone()),
        ));

        // After the schedules are set from `config`: a reload during the start applies over
        // them.
        reloader
            .attach(
                LiveTargets {
                    executor: executor.clone(),
                    config_policies,
                    policies: hooks.policies.clone(),
                    health: health.clone(),
                    purger: purger.clone(),
                    dlq: dlq_switch,
                    metrics: metrics.clone(),
                },
                &config,
            )
            .await;

        let app = http::router(AppState {
            executor: executor.clone(),
            stats: stats.clone(),
            health: health.clone(),
            purger: purger.clone(),
            dlq: dlq.clone(),
            metrics,
            policies: hooks.policies.clone(),
            admin_token: config.api.admin_token.clone(),
            max_body_bytes: config.api.max_body_bytes,
            reloader: reloader.clone(),
            readiness: readiness.clone(),
            cluster: Arc::new(http::cluster::ClusterView {
                instance_id: instance_id.clone(),
                partitions: config.cluster.partitions,
                table: durable.as_ref().map(|d| (d.pool.clone(), d.schema.clone())),
                started: chrono::Utc::now(),
                owns: takeover.clone().map(|t| {
                    let owns: Arc<dyn Fn(crate::cluster::Partition) -> bool + Send + Sync> =
                        Arc::new(move |p| crate::rabbit::partitions::Owner::owns(t.as_ref(), p));
                    owns
                }),
            }),
            history,
        });
        let (http_shutdown, http_stop) = oneshot::channel::<()>();
        let http = tokio::spawn(http::serve(listener, app, async move {
            let _ = http_stop.await;
        }));
        tracing::info!(%http_addr, "HTTP API listening");

        Ok(Self {
            executor,
            stats,
            durable,
            ledger: ledger_cell.get().cloned(),
            health,
            purger,
            dlq,
            http_addr,
            shutdown,
            edge,
            ops_shutdown,
            ops_tasks,
            http_shutdown,
            http,
            shutdown_timeout: drain_timeout,
            reloader,
            readiness,
        })
    }

    /// Reloads the configuration as SIGHUP does (tests in the same process).
    pub fn reloader(&self) -> &Arc<Reloader> {
        &self.reloader
    }

    /// The address the HTTP API listens on (the real port when `api.listen` asked for 0).
    pub fn http_addr(&self) -> std::net::SocketAddr {
        self.http_addr
    }

    /// Whether the service takes work (what `GET /ready` answers).
    pub fn readiness(&self) -> Arc<Readiness> {
        self.readiness.clone()
    }

    /// Whether another instance took this one's partitions (then it writes nothing more).
    pub fn is_fenced(&self) -> bool {
        self.durable.as_ref().is_some_and(|d| d.ledger.is_fenced())
    }

    /// The ledger writer's counters (`None` with `durability: memory`).
    pub fn ledger_counters(&self) -> Option<crate::db::ledger::LedgerCounters> {
        self.ledger.as_ref().map(|l| l.counters())
    }

    /// Stops the service in the one fixed order and waits for it.
    pub async fn shutdown(self) -> Result<(), AppError> {
        self.reloader.detach();
        self.readiness.hold();
        let _ = self.ops_shutdown.send(true);
        for mut task in self.ops_tasks {
            // A purge or health check in the middle of a slow call is cut off rather than
            // waited for without end.
            if tokio::time::timeout(self.shutdown_timeout, &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
        let _ = self.shutdown.send(true);
        let edge = self.edge.await;
        stop_durable(self.durable, self.shutdown_timeout).await;
        Self::close_http(
            self.dlq,
            self.http_shutdown,
            self.http,
            self.shutdown_timeout,
        )
        .await?;
        edge??;
        Ok(())
    }

    /// Closes the DLQ connection, then HTTP, letting requests in progress finish.
    async fn close_http(
        dlq: Option<Arc<Dlq>>,
        http_shutdown: oneshot::Sender<()>,
        http: tokio::task::JoinHandle<std::io::Result<()>>,
        timeout: Duration,
    ) -> Result<(), AppError> {
        if let Some(dlq) = dlq
            && tokio::time::timeout(timeout, dlq.close()).await.is_err()
        {
            tracing::warn!("the DLQ reader's RabbitMQ connection did not close in time");
        }
        let _ = http_shutdown.send(());
        match tokio::time::timeout(timeout, http).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(AppError::Http(e)),
            Ok(Err(join)) => Err(AppError::Join(join)),
            Err(_) => {
                tracing::warn!("HTTP requests still running at shutdown were cut off");
                Ok(())
            }
        }
    }

    /// Waits until the service stops by itself (a fatal edge error) or `signal` resolves, then
    /// shuts down.
    pub async fn run_until(
        mut self,
        signal: impl std::future::Future<Output = ()>,
    ) -> Result<(), AppError> {
        let ledger = self.durable.as_ref().map(|d| d.ledger.clone());
        let fenced = async {
            match &ledger {
                Some(ledger) => ledger.fenced().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            // Another instance took the partitions: stop, leaving every unacknowledged message
            // to the broker (the ledger settles nothing more) and no clean-stop mark.
            () = fenced => {
                self.readiness.not_ready(
                    "fenced: another instance took this instance's partitions; shutting down",
                );
                self.shutdown().await?;
                Err(AppError::Fenced)
            }
            // The edge said why (`follow_session`) when it gave up.
            r = &mut self.edge => {
                self.reloader.detach();
                self.readiness.hold();
                let _ = self.ops_shutdown.send(true);
                for task in self.ops_tasks {
                    let _ = task.await;
                }
                stop_durable(self.durable, self.shutdown_timeout).await;
                Self::close_http(self.dlq, self.http_shutdown, self.http, self.shutdown_timeout).await?;
                r??;
                Ok(())
            }
            _ = signal => self.shutdown().await,
        }
    }
}

/// Readiness follows the RabbitMQ session: ready once it is up (recovery is done before the
/// edge starts), not ready with the reason while it is being set up or was lost.
fn follow_session(readiness: &Readiness, event: SessionEvent) {
    match event {
        SessionEvent::Up => readiness.ready(),
        SessionEvent::Connecting { last_error: None } => readiness
            .not_ready("connecting to RabbitMQ, declaring the topology and starting the consumers"),
        SessionEvent::Connecting {
            last_error: Some(e),
        } => readiness.not_ready(format!(
            "connecting to RabbitMQ again, declaring the topology and starting the consumers \
             (the last attempt: {e})"
        )),
        SessionEvent::Lost { error, next } => readiness.not_ready(match next {
            AfterLoss::Retry(wait) => format!(
                "no RabbitMQ session ({error}); trying again in {} ms",
                wait.as_millis()
            ),
            AfterLoss::StartOver => format!(
                "RabbitMQ session lost ({error}); cluster.mode shared: starting over in-process \
                 as a standby of every partition"
            ),
            AfterLoss::Stop => format!("RabbitMQ: {error}; the service stops"),
        }),
    }
}

/// The first samples of the families whose value depends on this instance's settings (the
/// rest get theirs when the recorder is installed, see `ops::metrics`).
fn first_samples(config: &Config) {
    use crate::ops::metrics::names;
    let on = |b: bool| if b { 1.0 } else { 0.0 };
    metrics::gauge!(names::EMERGENCY_MODE).set(on(config.executor.emergency_mode));
    let shared = config.cluster.mode == config::ClusterMode::Shared;
    // Single: this instance is the one that consumes the request queue. Shared: not until
    // the broker makes it the intake leader.
    metrics::gauge!(names::INTAKE_LEADER).set(on(!shared));
    // In memory mode a single instance holds every action from the start; with the ledger
    // the partitions count once taken (`open_ledger`, the takeovers).
    if !shared && config.executor.durability == config::Durability::Memory {
        metrics::gauge!(names::PARTITIONS_OWNED).set(f64::from(config.cluster.partitions));
    }
}

/// Opens the Postgres edge: migrations, the ledger in front of `inner`, the stats writer beside
/// the in-memory counters, and the `action` table as the policy source.
async fn open_ledger(
    config: &Config,
    inner: Arc<dyn OutcomeSink>,
    latest: Arc<LatestStats>,
    fallback: Arc<dyn PolicySource>,
    ledger_cell: &std::sync::OnceLock<Arc<crate::db::ledger::LedgerSink>>,
    instance_id: &str,
) -> Result<
    (
        Arc<dyn OutcomeSink>,
        Arc<dyn crate::core::StatsObserver>,
        Durable,
    ),
    AppError,
> {
    use crate::db;
    // A paused owner's flush in flight holds its partition rows until Postgres ends its
    // session; ended within one heartbeat, the lock is gone before the broker (after two)
    // hands the partitions to another instance, so a takeover does not wait on it.
    let idle_limit = match config.rabbitmq.heartbeat_seconds {
        0 => db::IDLE_IN_TRANSACTION,
        hb => Duration::from_secs(u64::from(hb))
            .clamp(Duration::from_secs(1), db::IDLE_IN_TRANSACTION),
    };
    let pool = db::connect_lazy_idle(
        &config.database.url,
        config.database.max_connections,
        idle_limit,
    )?;
    let schema = db::Schema::new(&config.database.schema)?;
    db::retry_transient("migrating the schema", || db::migrate(&pool, &schema)).await?;
    let fence = match config.cluster.mode {
        // The partitions are taken before anything is read or written: from now on a write
        // of an instance that held them before is refused.
        config::ClusterMode::Single => {
            let fence = db::retry_transient("taking the partitions", || {
                db::partitions::take_all(&pool, &schema, config.cluster.partitions, instance_id)
            })
            .await?;
            tracing::info!(
                partitions = config.cluster.partitions,
                instance_id,
                highest_epoch = fence.held().iter().map(|(_, e)| *e).max(),
                "took every partition"
            );
            metrics::gauge!("attune_partitions_owned").set(f64::from(config.cluster.partitions));
            fence
        }
        // Taken one by one, as RabbitMQ makes this instance their queues' active consumer.
        config::ClusterMode::Shared => {
            tracing::info!(
                partitions = config.cluster.partitions,
                instance_id,
                "cluster.mode: shared; partitions are taken as RabbitMQ hands them over"
            );
            db::partitions::Fence::shared(&schema)
        }
    };
    let ids = Arc::new(db::actions::ActionIds::new(&schema));
    let (ledger, ledger_worker) = db::ledger::LedgerSink::start_fenced(
        pool.clone(),
        &schema,
        ids.clone(),
        db::ledger::LedgerOptions {
            batch_max_rows: config.database.batch_max_rows,
            flush_interval: Duration::from_millis(config.database.flush_interval_ms),
            ..db::ledger::LedgerOptions::default()
        },
        inner,
        Some(fence),
    );
    let _ = ledger_cell.set(ledger.clone());
    let writer = db::stats::StatsWriter::new(pool.clone(), &schema, ids);
    let stats_worker = writer.spawn(db::stats::StatsOptions {
        interval: Duration::from_millis(config.stats.interval_ms),
        snapshot_interval: Duration::from_secs(config.stats.snapshot_interval_seconds),
    });
    let policies = Arc::new(db::policies::DbPolicySource::new(&schema, fallback));
    db::retry_transient("loading the policies", || policies.load(&pool)).await?;
    tracing::info!(schema = schema.name(), "Postgres ledger open");
    let durable = Durable {
        pool,
        schema,
        policies,
        ledger: ledger.clone(),
        workers: vec![ledger_worker, stats_worker],
        shared: config.cluster.mode == config::ClusterMode::Shared,
    };
    Ok((ledger, Arc::new(BothStats(latest, writer)), durable))
}

/// Stops the Postgres workers after the core has drained, so their last batches hold
/// everything that happened.
async fn stop_durable(durable: Option<Durable>, timeout: Duration) {
    let Some(d) = durable else {
        return;
    };
    let mut drained = true;
    for worker in d.workers {
        if !worker.stop(timeout).await {
            drained = false;
            tracing::warn!("a Postgres writer did not finish its last batch before the timeout");
        }
    }
    // Every admission committed: the next start need not treat any waiting execution as
    // possibly sent (db::recovery).
    if drained && d.ledger.pending() == 0 && !d.shared {
        match tokio::time::timeout(timeout, d.ledger.mark_clean_stop()).await {
            Ok(Ok(true)) => tracing::debug!("clean stop recorded in executor_run"),
            Ok(Ok(false)) => tracing::warn!(
                "no clean stop recorded: another instance took this one's partitions"
            ),
            Ok(Err(e)) => tracing::warn!(error = %e, "could not record the clean stop"),
            Err(_) => tracing::warn!("recording the clean stop timed out"),
        }
    }
    // close() waits for every connection lent out to come back.
    if tokio::time::timeout(timeout, d.pool.close()).await.is_err() {
        tracing::warn!("Postgres connections still in use at shutdown were left to close");
    }
}

/// Folds histogram samples into buckets every few seconds until shutdown.
async fn upkeep(metrics: Metrics, mut shutdown: watch::Receiver<bool>) {
    let mut ticks = tokio::time::interval(METRICS_UPKEEP_INTERVAL);
    loop {
        tokio::select! {
            _ = ticks.tick() => metrics.upkeep(),
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn termination_signal() {
    Termination::listen().recv().await
}

/// SIGINT and SIGTERM, listened for from the moment this is made: a signal that comes
/// before [`Termination::recv`] is awaited (during start, or just after systemd was told
/// `READY=1`) is kept for it, instead of killing the process the default way.
pub struct Termination {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl Termination {
    pub fn listen() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Self {
                term: signal(SignalKind::terminate()).ok(),
                int: signal(SignalKind::interrupt()).ok(),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// Resolves at the next SIGINT or SIGTERM (at once for one that came already).
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        {
            async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            }
            tokio::select! {
                _ = next(&mut self.term) => {}
                _ = next(&mut self.int) => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
