//! What a phase measures: an executor started in-process, one already running
//! (`--external`), or the broker relay; and the RabbitMQ vhost and Postgres database a run
//! creates for itself so it disturbs nobody else's queues or tables.
//!
//! An in-process executor or relay runs on a tokio runtime of its own, with threads named
//! [`measure::EXECUTOR_THREADS`], so its CPU time can be told from the load generator's.

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use sqlx::AssertSqlSafe;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::watch;

use super::measure;
use super::plan::Workload;
use super::relay::{self, RelayError, RelaySettings};
use crate::app::{AppError, Service};
use crate::config::{self, Config, Durability};
use crate::rabbit::edge;
use crate::rabbit::topology::{self, TopologySpec};

/// How often the start of consuming is checked.
const CONSUMING_POLL: Duration = Duration::from_millis(50);

/// Errors starting or reaching a target.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("rabbitmqctl {args}: {detail} (the run's own vhost needs rabbitmqctl on this machine)")]
    Rabbitmqctl { args: String, detail: String },
    #[error("could not build the executor's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("the executor did not start: {0}")]
    Service(#[from] AppError),
    #[error("the executor's start-up or shutdown panicked")]
    Panicked,
    #[error("Postgres (the run's own database): {0}")]
    Db(#[from] sqlx::Error),
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("nobody consumes {queue} after {after:?}: is the executor running on this vhost?")]
    NotConsuming {
        queue: &'static str,
        after: Duration,
    },
    #[error("the broker relay stopped: {0}")]
    Relay(#[from] RelayError),
}

/// A vhost made for one run with rabbitmqctl, deleted by [`Vhost::delete`].
#[derive(Debug)]
pub struct Vhost {
    name: String,
    /// The AMQP URL of the vhost, with the configured credentials.
    url: String,
}

impl Vhost {
    /// Creates `fifo-bench-<run>` on the broker of `base_url` and gives the URL's user every
    /// permission on it.
    pub async fn create(base_url: &str) -> Result<Self, TargetError> {
        let name = format!("fifo-bench-{}", super::run_id());
        rabbitmqctl(&["add_vhost", &name]).await?;
        let vhost = Self {
            url: with_path(base_url, &name),
            name,
        };
        let user = user_of(base_url);
        if let Err(e) = rabbitmqctl(&[
            "set_permissions",
            "-p",
            &vhost.name,
            &user,
            ".*",
            ".*",
            ".*",
        ])
        .await
        {
            vhost.delete().await;
            return Err(e);
        }
        Ok(vhost)
    }

    /// The vhost's name, for `rabbitmqctl -p`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The AMQP URL of the vhost.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub async fn delete(self) {
        if let Err(e) = rabbitmqctl(&["delete_vhost", &self.name]).await {
            tracing::warn!(error = %e, vhost = self.name, "could not delete the run's vhost");
        }
    }
}

/// Runs `rabbitmqctl -q <args…>` and returns its standard output.
pub async fn rabbitmqctl(args: &[&str]) -> Result<String, TargetError> {
    let failed = |detail: String| TargetError::Rabbitmqctl {
        args: args.join(" "),
        detail,
    };
    let out = tokio::process::Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| failed(e.to_string()))?;
    if !out.status.success() {
        return Err(failed(format!(
            "{}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `url` with its path (vhost or database name) replaced by `path`; query kept.
fn with_path(url: &str, path: &str) -> String {
    let authority_start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[authority_start..];
    let path_start = rest
        .find(['/', '?'])
        .map_or(url.len(), |i| authority_start + i);
    let query = url[path_start..]
        .find('?')
        .map_or("", |i| &url[path_start + i..]);
    format!("{}/{path}{query}", &url[..path_start])
}

/// The URL of the maintenance database on the server of `database_url`, and the name of the
/// database `database_url` names.
pub fn admin_url_and_name(database_url: &str) -> (String, String) {
    let authority_start = database_url.find("://").map_or(0, |i| i + 3);
    let rest = &database_url[authority_start..];
    let name = rest
        .find('/')
        .map(|i| &rest[i + 1..])
        .map(|p| p.split('?').next().unwrap_or(""))
        .unwrap_or("");
    (with_path(database_url, "postgres"), name.to_owned())
}

/// The user name of an AMQP URL (`guest` when it names none, as the broker assumes).
fn user_of(url: &str) -> String {
    let authority_start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[authority_start..];
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    match authority.rfind('@') {
        Some(at) => authority[..at]
            .split(':')
            .next()
            .unwrap_or("guest")
            .to_owned(),
        None => "guest".to_owned(),
    }
}

/// A Postgres database made for one run, dropped by [`Database::drop_it`].
#[derive(Debug)]
pub struct Database {
    name: String,
    /// The server's maintenance database, to drop this one from.
    admin_url: String,
    /// The URL of this database.
    url: String,
}

impl Database {
    /// Creates `fifo_bench_<run>` on the server of `database_url`.
    pub async fn create(database_url: &str) -> Result<Self, TargetError> {
        let name = format!("fifo_bench_{}", super::run_id().replace('-', "_"));
        let admin_url = with_path(database_url, "postgres");
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin_url)
            .await?;
        // The name is made of digits, letters and underscores only. template0 takes no
        // connections, so others' sessions on template1 cannot make the copy fail.
        let created = sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE DATABASE {name} TEMPLATE template0"
        )))
        .execute(&admin)
        .await;
        admin.close().await;
        created?;
        Ok(Self {
            url: with_path(database_url, &name),
            name,
            admin_url,
        })
    }

    /// The URL of the database.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub async fn drop_it(self) {
        let dropped = async {
            let admin = PgPoolOptions::new()
                .max_connections(1)
                .connect(&self.admin_url)
                .await?;
            let r = sqlx::raw_sql(AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&admin)
            .await;
            admin.close().await;
            r.map(|_| ())
        };
        if let Err(e) = dropped.await {
            tracing::warn!(error = %e, database = self.name, "could not drop the run's database");
        }
    }
}

/// A runtime of its own for what is measured.
fn runtime(threads: usize) -> Result<tokio::runtime::Runtime, TargetError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name(measure::EXECUTOR_THREADS)
        .enable_all()
        .build()
        .map_err(TargetError::Runtime)
}

/// Runs the future `make` builds to completion on `handle`'s runtime, from a thread of its
/// own, and hands back its output. `Service::start` and `shutdown` are futures the compiler
/// cannot prove `Send` for every lifetime (a known limit of its auto-trait inference), so
/// they cannot be `spawn`ed; `block_on` needs no `Send`, and the service's own tasks still
/// land on that runtime. The thread's name counts it as the executor's CPU.
async fn on_runtime<F, Fut, T>(handle: tokio::runtime::Handle, make: F) -> Result<T, TargetError>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("{}-ctl", measure::EXECUTOR_THREADS))
        .spawn(move || {
            let _ = tx.send(handle.block_on(make()));
        })
        .map_err(TargetError::Runtime)?;
    rx.await.map_err(|_| TargetError::Panicked)
}

/// What a phase runs against, with the probe connection that watches it start.
pub struct Target {
    kind: Kind,
    /// Opened before the target starts, so its lapin I/O thread is not taken for the
    /// executor's; closed at the end.
    probe: lapin::Connection,
    /// lapin I/O threads that existed before the target started.
    io_before: HashSet<u32>,
    /// The target's own lapin I/O threads, known once it consumes.
    executor_io: HashSet<u32>,
}

/// The three kinds of target.
enum Kind {
    InProcess {
        runtime: tokio::runtime::Runtime,
        /// Boxed: the service is large beside the other variants.
        service: Box<Service>,
        url: String,
        vhost: Option<Vhost>,
        database: Option<Database>,
    },
    Relay {
        runtime: tokio::runtime::Runtime,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<Result<(), RelayError>>,
        vhost: Vhost,
        /// The limited relay: it holds each action to its limit.
        limited: bool,
    },
    External {
        url: String,
        pid: Option<u32>,
    },
    /// `serve` as child processes that the chaos run kills and starts again; the run owns
    /// the processes, this only reads their ids.
    Process {
        url: String,
        pids: Vec<Arc<AtomicU32>>,
        /// Their ids when the target was made: CPU time is only a difference while they
        /// still run.
        first: Vec<u32>,
    },
}

impl Target {
    /// Starts the executor from `config`, with the workload's limits as its policies and a
    /// queue long enough for the largest action; in a vhost and database of its own when
    /// `isolated`. Its HTTP API takes a free port, so it never collides with a running
    /// service.
    pub async fn in_process(
        config: &Config,
        workload: &Workload,
        isolated: bool,
        threads: usize,
    ) -> Result<Target, TargetError> {
        let mut config = config.clone();
        let mut vhost = None;
        let mut database = None;
        if isolated {
            let v = Vhost::create(&config.rabbitmq.url).await?;
            config.rabbitmq.url = v.url.clone();
            vhost = Some(v);
            if config.executor.durability == Durability::Ledger {
                match Database::create(&config.database.url).await {
                    Ok(d) => {
                        config.database.url = d.url.clone();
                        database = Some(d);
                    }
                    Err(e) => {
                        cleanup(vhost, None).await;
                        return Err(e);
                    }
                }
            }
        }
        config.api.listen = ([127, 0, 0, 1], 0).into();
        config.executor.queue.max_queue_length = config
            .executor
            .queue
            .max_queue_length
            .max(usize::try_from(workload.max_count()).unwrap_or(usize::MAX));
        for a in &workload.actions {
            config.policies.actions.insert(
                a.name.clone(),
                config::ActionPolicy {
                    concurrency_limit: Some(a.limit),
                    rate_limit: None,
                    enabled: None,
                },
            );
        }
        let url = config.rabbitmq.url.clone();
        let (probe, io_before, rt) = match prepare(&url, threads).await {
            Ok(p) => p,
            Err(e) => {
                cleanup(vhost, database).await;
                return Err(e);
            }
        };
        let started = on_runtime(rt.handle().clone(), move || Service::start(config)).await;
        match started {
            Ok(Ok(service)) => Ok(Target::new(
                Kind::InProcess {
                    runtime: rt,
                    service: Box::new(service),
                    url,
                    vhost,
                    database,
                },
                probe,
                io_before,
            )),
            Ok(Err(e)) => {
                let _ = probe.close(200, "executor did not start".into()).await;
                rt.shutdown_background();
                cleanup(vhost, database).await;
                Err(e.into())
            }
            Err(e) => {
                let _ = probe.close(200, "executor did not start".into()).await;
                rt.shutdown_background();
                cleanup(vhost, database).await;
                Err(e)
            }
        }
    }

    /// Starts the broker relay in a vhost of its own, with the executor's tuning; with
    /// `limits` (per action ref), the limited relay.
    pub async fn relay(
        config: &Config,
        threads: usize,
        limits: Option<HashMap<String, u32>>,
    ) -> Result<Target, TargetError> {
        let limited = limits.is_some();
        let vhost = Vhost::create(&config.rabbitmq.url).await?;
        let (probe, io_before, rt) = match prepare(&vhost.url, threads).await {
            Ok(p) => p,
            Err(e) => {
                vhost.delete().await;
                return Err(e);
            }
        };
        let (stop, stop_rx) = watch::channel(false);
        let task = rt.spawn(relay::run(
            RelaySettings {
                url: vhost.url.clone(),
                topology: TopologySpec {
                    queue_type: config.rabbitmq.queue_type,
                    dlq_ttl_hours: config.dlq.ttl_hours,
                    dlq_max_entries: config.dlq.max_entries,
                },
                prefetch: config.rabbitmq.prefetch,
                confirm_window: config.rabbitmq.confirm_window,
                max_message_bytes: config.rabbitmq.max_message_bytes,
                limits,
            },
            stop_rx,
        ));
        Ok(Target::new(
            Kind::Relay {
                runtime: rt,
                stop,
                task,
                vhost,
                limited,
            },
            probe,
            io_before,
        ))
    }

    /// An executor already running on `rabbitmq.url`.
    pub async fn external(config: &Config, pid: Option<u32>) -> Result<Target, TargetError> {
        let url = config.rabbitmq.url.clone();
        let probe = edge::connect(&url, "fifo-executor bench probe").await?;
        Ok(Target::new(
            Kind::External { url, pid },
            probe,
            HashSet::new(),
        ))
    }

    /// The executor running as child processes (the chaos run's), whose current process
    /// ids are in `pids` (0 while none runs).
    pub async fn process(url: &str, pids: Vec<Arc<AtomicU32>>) -> Result<Target, TargetError> {
        let probe = edge::connect(url, "fifo-executor bench probe").await?;
        let first = pids.iter().map(|p| p.load(Ordering::Acquire)).collect();
        Ok(Target::new(
            Kind::Process {
                url: url.to_owned(),
                pids,
                first,
            },
            probe,
            HashSet::new(),
        ))
    }

    fn new(kind: Kind, probe: lapin::Connection, io_before: HashSet<u32>) -> Self {
        Self {
            kind,
            probe,
            io_before,
            executor_io: HashSet::new(),
        }
    }

    /// The AMQP URL the load generator uses.
    pub fn url(&self) -> &str {
        match &self.kind {
            Kind::InProcess { url, .. }
            | Kind::External { url, .. }
            | Kind::Process { url, .. } => url,
            Kind::Relay { vhost, .. } => &vhost.url,
        }
    }

    /// Waits until something consumes the requests queue (the executor's topology is
    /// declared and bound), so no request is published into nowhere.
    pub async fn wait_until_consuming(&mut self, deadline: Duration) -> Result<(), TargetError> {
        let conn = &self.probe;
        let start = tokio::time::Instant::now();
        let outcome = loop {
            if let Kind::Relay { task, .. } = &self.kind
                && task.is_finished()
            {
                break Err(TargetError::NotConsuming {
                    queue: topology::REQUESTS_QUEUE,
                    after: start.elapsed(),
                });
            }
            // A passive declare of a queue that does not exist yet closes the channel: a new
            // channel each time.
            let ch = conn.create_channel().await?;
            let declared = ch
                .queue_declare(
                    topology::REQUESTS_QUEUE.into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await;
            if let Ok(q) = declared {
                let _ = ch.close(200, "probe".into()).await;
                if q.consumer_count() > 0 {
                    break Ok(());
                }
            }
            if start.elapsed() >= deadline {
                break Err(TargetError::NotConsuming {
                    queue: topology::REQUESTS_QUEUE,
                    after: deadline,
                });
            }
            tokio::time::sleep(CONSUMING_POLL).await;
        };
        if !matches!(self.kind, Kind::External { .. } | Kind::Process { .. }) {
            self.executor_io = &measure::lapin_io_threads() - &self.io_before;
        }
        outcome
    }

    /// CPU seconds by thread name of this process, the target's lapin I/O threads named as
    /// its own.
    pub fn threads_cpu(&self) -> measure::CpuByThread {
        measure::by_name(&measure::threads(), &self.executor_io)
    }

    /// Whether the target applies the actions' limits (the bare relay passes everything on).
    pub fn has_limits(&self) -> bool {
        !matches!(self.kind, Kind::Relay { limited: false, .. })
    }

    /// CPU seconds the target has used so far, when they can be read.
    pub fn cpu(&self) -> Option<f64> {
        match &self.kind {
            Kind::External { pid, .. } => pid.and_then(measure::process_cpu),
            // Each restart starts the count again: a difference would mean nothing.
            Kind::Process { pids, first, .. } => {
                let now: Vec<u32> = pids.iter().map(|p| p.load(Ordering::Acquire)).collect();
                if now != *first || now.contains(&0) {
                    return None;
                }
                now.into_iter().map(measure::process_cpu).sum()
            }
            _ => Some(measure::executor_seconds(&self.threads_cpu())),
        }
    }

    /// What [`Target::cpu`] counts.
    pub fn cpu_counted(&self) -> &'static str {
        match &self.kind {
            Kind::InProcess { .. } => "executor runtime and its lapin I/O threads (fx-exec*)",
            Kind::Relay { .. } => "relay runtime and its lapin I/O threads (fx-exec*)",
            Kind::External { pid: Some(_), .. } => "executor process (--executor-pid)",
            Kind::External { pid: None, .. } => "not measured (no --executor-pid)",
            Kind::Process { .. } => {
                "executor processes, summed (not measured once one was started again)"
            }
        }
    }

    /// `(RSS, peak RSS)` in kB of the process the target runs in.
    pub fn rss(&self) -> Option<(u64, u64)> {
        match &self.kind {
            Kind::External { pid, .. } => pid.and_then(|p| measure::rss_kb(Some(p))),
            Kind::Process { pids, .. } => pids
                .iter()
                .map(|p| match p.load(Ordering::Acquire) {
                    0 => None,
                    p => measure::rss_kb(Some(p)),
                })
                .try_fold((0, 0), |(r, h), x| x.map(|(a, b)| (r + a, h + b))),
            _ => measure::rss_kb(None),
        }
    }

    /// Resets the measured processes' peak RSS to their current RSS, so that the peak read
    /// at the end is this phase's own. Whether it could (otherwise the peak is the
    /// processes' whole life's).
    pub fn reset_rss_peak(&self) -> bool {
        match &self.kind {
            Kind::External { pid, .. } => pid.is_some_and(|p| measure::reset_peak_rss(Some(p))),
            Kind::Process { pids, .. } => pids.iter().all(|p| match p.load(Ordering::Acquire) {
                0 => false,
                p => measure::reset_peak_rss(Some(p)),
            }),
            _ => measure::reset_peak_rss(None),
        }
    }

    /// What [`Target::rss`] is of.
    pub fn rss_counted(&self) -> &'static str {
        match &self.kind {
            Kind::External { pid: Some(_), .. } => "executor process",
            Kind::External { pid: None, .. } => "not measured (no --executor-pid)",
            Kind::Process { .. } => "executor processes, summed (their current lives)",
            _ => "whole bench process: executor and load generator",
        }
    }

    /// Stops what was started and drops what was created for the run.
    pub async fn stop(self) {
        let _ = self.probe.close(200, "bench done".into()).await;
        match self.kind {
            Kind::InProcess {
                runtime,
                service,
                vhost,
                database,
                ..
            } => {
                match on_runtime(runtime.handle().clone(), move || service.shutdown()).await {
                    Ok(Err(e)) => tracing::warn!(error = %e, "the executor stopped with an error"),
                    Err(e) => tracing::warn!(error = %e, "the executor's shutdown task failed"),
                    Ok(Ok(())) => {}
                }
                // Dropping a runtime blocks, which is not allowed inside another runtime.
                runtime.shutdown_background();
                cleanup(vhost, database).await;
            }
            Kind::Relay {
                runtime,
                stop,
                task,
                vhost,
                ..
            } => {
                let _ = stop.send(true);
                if let Ok(Err(e)) = task.await {
                    tracing::warn!(error = %e, "the broker relay stopped with an error");
                }
                runtime.shutdown_background();
                vhost.delete().await;
            }
            Kind::External { .. } | Kind::Process { .. } => {}
        }
    }
}

/// Opens the probe connection, notes the lapin I/O threads that exist without the target,
/// and builds the target's runtime.
async fn prepare(
    url: &str,
    threads: usize,
) -> Result<(lapin::Connection, HashSet<u32>, tokio::runtime::Runtime), TargetError> {
    let probe = edge::connect(url, "fifo-executor bench probe").await?;
    let io_before = measure::lapin_io_threads();
    match runtime(threads) {
        Ok(rt) => Ok((probe, io_before, rt)),
        Err(e) => {
            let _ = probe.close(200, "bench failed".into()).await;
            Err(e)
        }
    }
}

async fn cleanup(vhost: Option<Vhost>, database: Option<Database>) {
    if let Some(v) = vhost {
        v.delete().await;
    }
    if let Some(d) = database {
        d.drop_it().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_of_a_url_is_replaced_and_its_query_kept() {
        assert_eq!(
            with_path("amqp://guest:guest@127.0.0.1:5672/%2f", "v1"),
            "amqp://guest:guest@127.0.0.1:5672/v1"
        );
        assert_eq!(with_path("amqp://h:5672", "v1"), "amqp://h:5672/v1");
        assert_eq!(
            with_path("postgres://postgres@h:5432/db?sslmode=disable", "x"),
            "postgres://postgres@h:5432/x?sslmode=disable"
        );
        assert_eq!(
            admin_url_and_name("postgres://postgres@h:5432/fifo_bench_1?sslmode=disable"),
            (
                "postgres://postgres@h:5432/postgres?sslmode=disable".to_owned(),
                "fifo_bench_1".to_owned()
            )
        );
    }

    #[test]
    fn the_user_comes_from_the_url() {
        assert_eq!(user_of("amqp://bob:pw@h/v"), "bob");
        assert_eq!(user_of("amqp://h/v"), "guest");
    }
}
