//! `fifo-executor bench --chaos PLAN`: a long load against real `fifo-executor serve`
//! processes while routine faults are injected at random moments, then an audit of what every
//! execution became.
//!
//! The executor runs as child processes on a vhost and a database of the run's own (the
//! current binary, or `--serve-bin`): one, or `--instances N` sharing them (see
//! [`instances`](super::instances)). Faults, each as often as the plan says, in a random
//! order at random points of the run's progress (seeded by `--chaos-seed`):
//!
//! | fault | what is done |
//! | --- | --- |
//! | `kill` | SIGKILL the busiest instance (the one owning the most partitions), start it again after 0–0.5 s |
//! | `stop` | SIGSTOP the busiest instance, SIGCONT it after `--stop-for` (default two heartbeats and 3 s) |
//! | `close` | `rabbitmqctl close_connection` on every instance's connections |
//! | `broker` | `rabbitmqctl stop_app`, 0.2–1 s later `start_app`: every connection drops and the durable queues are recovered from disk |
//! | `postgres` | restart PostgreSQL (`pg_ctlcluster … restart`, or `--postgres-restart`) |
//!
//! `--kill-every D` adds a `kill` every D of the run, whatever the plan.
//!
//! The producers and workers live through all of it (they connect again; see
//! [`load`](super::load)), and the run's checks hold throughout: first attempts in submission
//! order per action, never more running at once than the limit as the workers see it, no
//! dispatch again without a higher attempt (copies the broker itself redelivers excused),
//! every execution completed. Afterwards the audit waits for the ledger to settle and checks
//! that every execution ended there with the status its worker reported, that none is left
//! `requested`, `scheduled` or `running`, and that nothing went to the dead-letter queue.
//!
//! For each fault the report gives when it happened, how long the longest pause in
//! dispatching around it lasted, how long after the fault dispatching was back, and how many
//! re-sent dispatches (attempt > 1) the workers received until the next fault; for `kill`
//! and `stop`, the failover time on the instance's partitions, and for `stop` what shows that
//! the instance was fenced once it woke.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use sqlx::Row;
use tokio::process::{Child, Command};

use super::instances::{Instance, Instances, Watch};
use super::load::{Arrival, Arrived, Collector};
use super::plan::Workload;
use super::target::{Database, TargetError, Vhost, rabbitmqctl};
use crate::cluster::Partition;
use crate::config::Config;
use crate::tools::XorShift;

/// One kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FaultKind {
    /// SIGKILL the executor (the busiest instance) and start it again.
    Kill,
    /// SIGSTOP the executor (the busiest instance), SIGCONT it after a while.
    Stop,
    /// Close the executor's RabbitMQ connections.
    Close,
    /// Stop RabbitMQ's application and start it again.
    Broker,
    /// Restart PostgreSQL.
    Postgres,
}

impl FaultKind {
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Stop => "stop",
            FaultKind::Close => "close",
            FaultKind::Broker => "broker",
            FaultKind::Postgres => "postgres",
        }
    }
}

/// `--chaos`: how often each fault is injected, e.g. `kill:10,close:5,broker:1,postgres:3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChaosPlan {
    /// Each fault kind with its count, in the order given.
    pub counts: Vec<(FaultKind, u32)>,
}

impl FromStr for ChaosPlan {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut counts: Vec<(FaultKind, u32)> = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, count) = part.split_once(':').unwrap_or((part, "1"));
            let kind = match name.trim() {
                "kill" | "kill9" | "sigkill" => FaultKind::Kill,
                "stop" | "sigstop" | "pause" => FaultKind::Stop,
                "close" | "connections" => FaultKind::Close,
                "broker" | "rabbitmq" => FaultKind::Broker,
                "postgres" | "pg" => FaultKind::Postgres,
                other => {
                    return Err(format!(
                        "unknown fault {other:?}: expected kill, stop, close, broker or postgres"
                    ));
                }
            };
            let count: u32 = count
                .trim()
                .parse()
                .map_err(|_| format!("{part:?}: the count after ':' must be a whole number"))?;
            if counts.iter().any(|(k, _)| *k == kind) {
                return Err(format!("{} is named twice", kind.name()));
            }
            counts.push((kind, count));
        }
        if counts.iter().all(|(_, n)| *n == 0) {
            return Err("the plan injects nothing: name at least one fault, e.g. kill:3".into());
        }
        Ok(Self { counts })
    }
}

impl ChaosPlan {
    /// The faults in the order they will be injected, each with the share of the run's
    /// executions that must have completed before it is: a random order, at random points
    /// between 5 % and 60 % of the run (faults are injected one after another and some take
    /// seconds, so the last ones need room before the run ends).
    pub fn schedule(&self, rng: &mut XorShift) -> Vec<(FaultKind, f64)> {
        let mut faults: Vec<FaultKind> = self
            .counts
            .iter()
            .flat_map(|(k, n)| std::iter::repeat_n(*k, *n as usize))
            .collect();
        // Fisher–Yates.
        for i in (1..faults.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            faults.swap(i, j);
        }
        let mut at: Vec<f64> = faults.iter().map(|_| 0.05 + 0.55 * rng.unit()).collect();
        at.sort_by(f64::total_cmp);
        faults.into_iter().zip(at).collect()
    }
}

/// `fifo-executor serve` as a child process that can be killed and started again.
pub struct ServeProcess {
    bin: PathBuf,
    config: PathBuf,
    env: Vec<(String, String)>,
    dir: PathBuf,
    /// Each life logs to `<log_name>-<life>.log` in `dir`.
    log_name: String,
    child: Option<Child>,
    /// Starts so far.
    lives: usize,
    /// The live child's process id (0 while none runs), readable without the lock.
    pid: Arc<AtomicU32>,
    /// The current life was SIGSTOPped at some point.
    stopped: bool,
}

impl ServeProcess {
    /// `fifo-executor serve` from `bin` with the config file `config` and the variables
    /// `env`, logging to `<log_name>-<life>.log` in `dir`; not started yet.
    pub fn new(
        bin: PathBuf,
        config: PathBuf,
        env: Vec<(String, String)>,
        dir: PathBuf,
        log_name: String,
    ) -> Self {
        Self {
            bin,
            config,
            env,
            dir,
            log_name,
            child: None,
            lives: 0,
            pid: Arc::new(AtomicU32::new(0)),
            stopped: false,
        }
    }

    /// Starts the process (again).
    pub async fn start(&mut self) -> Result<(), TargetError> {
        self.lives += 1;
        self.stopped = false;
        let log_path = self
            .dir
            .join(format!("{}-{}.log", self.log_name, self.lives));
        let log = std::fs::File::create(&log_path).map_err(TargetError::Runtime)?;
        let err = log.try_clone().map_err(TargetError::Runtime)?;
        let child = Command::new(&self.bin)
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            // The bench's own log filter is not the executor's: its config file decides.
            .env_remove("RUST_LOG")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .map_err(TargetError::Runtime)?;
        self.pid.store(child.id().unwrap_or(0), Ordering::Release);
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILLs the process and waits for it to be gone.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        self.pid.store(0, Ordering::Release);
    }

    /// Asks the process to stop (SIGTERM) and waits up to `grace`; kills it after that.
    pub async fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await;
        }
        if tokio::time::timeout(grace, child.wait()).await.is_err() {
            tracing::warn!("the executor did not stop within {grace:?}; killing it");
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        self.pid.store(0, Ordering::Release);
    }

    /// How often the process was started.
    pub fn lives(&self) -> usize {
        self.lives
    }

    /// Sends the live process `SIG<name>` (`STOP`, `CONT`).
    pub async fn signal(&self, name: &str) -> Result<(), String> {
        let Some(pid) = self.child.as_ref().and_then(Child::id) else {
            return Err("no process runs".to_owned());
        };
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .stdin(Stdio::null())
            .status()
            .await
            .map_err(|e| format!("kill -{name} {pid}: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("kill -{name} {pid}: {status}"))
        }
    }

    /// Notes that the current life was SIGSTOPped.
    pub fn mark_stopped(&mut self) {
        self.stopped = true;
    }

    /// Whether the current life was SIGSTOPped.
    pub fn was_stopped_this_life(&self) -> bool {
        self.stopped
    }

    /// The log of the current (or last) life.
    pub fn log_path(&self) -> Option<PathBuf> {
        (self.lives > 0).then(|| {
            self.dir
                .join(format!("{}-{}.log", self.log_name, self.lives))
        })
    }

    /// Whether the process has exited by itself (it should not).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// The process id of the live child, if one runs.
    pub fn pid_cell(&self) -> Arc<AtomicU32> {
        self.pid.clone()
    }

    /// Where its logs are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// What the chaos run needs to reach the executors from outside.
pub struct ChaosTarget {
    pub instances: Arc<Instances>,
    /// The executors' vhost: their connections are closed by name there.
    pub vhost_name: String,
    pub url: String,
    pub database_url: String,
    pub vhost: Vhost,
    pub database: Database,
}

/// Settings of a chaos run from the command line.
#[derive(Debug, Clone)]
pub struct ChaosSettings {
    pub seed: u64,
    /// The `fifo-executor` binary to run `serve` with.
    pub serve_bin: PathBuf,
    /// Where the executors' config and logs go.
    pub dir: PathBuf,
    /// The command that restarts PostgreSQL.
    pub postgres_restart: Vec<String>,
    /// How many `serve` processes share the vhost and the database.
    pub instances: usize,
    /// How long each may take to answer on HTTP after its start.
    pub start_timeout: Duration,
    /// More `ATTUNE__` variables for every instance (the soak's idle times).
    pub env: Vec<(String, String)>,
}

impl ChaosSettings {
    /// The default PostgreSQL restart: Debian's `pg_ctlcluster` on the one cluster in
    /// `/etc/postgresql` (the machine's own PostgreSQL, as `scripts/services.sh` runs it).
    pub fn default_postgres_restart() -> Vec<String> {
        let version = std::fs::read_dir("/etc/postgresql")
            .ok()
            .and_then(|d| {
                d.filter_map(Result::ok)
                    .filter_map(|e| e.file_name().into_string().ok())
                    .max()
            })
            .unwrap_or_else(|| "15".to_owned());
        [
            "pg_ctlcluster",
            "--skip-systemctl-redirect",
            &version,
            "main",
            "restart",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    }
}

/// `n` free TCP ports on loopback, all different.
fn free_ports(n: usize) -> Result<Vec<u16>, TargetError> {
    // Held together until every port is known, so none is handed out twice.
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(TargetError::Runtime)?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(TargetError::Runtime)
}

/// Starts the executors for a chaos run: a vhost and database of their own, a config with
/// the workload's limits, and `settings.instances` processes, the first alone until it
/// answers on HTTP (it runs the migrations), then the others.
pub async fn start_target(
    config: &Config,
    config_file: Option<&Path>,
    workload: &Workload,
    settings: &ChaosSettings,
) -> Result<ChaosTarget, TargetError> {
    std::fs::create_dir_all(&settings.dir).map_err(TargetError::Runtime)?;
    let vhost = Vhost::create(&config.rabbitmq.url).await?;
    let database = match Database::create(&config.database.url).await {
        Ok(d) => d,
        Err(e) => {
            vhost.delete().await;
            return Err(e);
        }
    };
    let url = vhost.url().to_owned();
    let database_url = database.url().to_owned();
    let config_path = settings.dir.join("executor.yaml");
    let default_limit = config.policies.default.concurrency_limit;
    let instances = match write_config(config_file, workload, default_limit, &config_path) {
        Ok(()) => start_instances(
            config,
            workload,
            settings,
            &config_path,
            &url,
            &database_url,
        )
        .await
        .map_err(|e| TargetError::Runtime(std::io::Error::other(e))),
        Err(e) => Err(e),
    };
    let instances = match instances {
        Ok(i) => i,
        Err(e) => {
            vhost.delete().await;
            database.drop_it().await;
            return Err(e);
        }
    };
    Ok(ChaosTarget {
        instances,
        vhost_name: vhost.name().to_owned(),
        url,
        database_url,
        vhost,
        database,
    })
}

/// Starts the processes of [`start_target`]; stops those it started if one fails.
async fn start_instances(
    config: &Config,
    workload: &Workload,
    settings: &ChaosSettings,
    config_path: &Path,
    url: &str,
    database_url: &str,
) -> Result<Arc<Instances>, String> {
    let n = settings.instances.max(1);
    let ports = free_ports(n).map_err(|e| e.to_string())?;
    let mut common = vec![
        ("ATTUNE__RABBITMQ__URL".to_owned(), url.to_owned()),
        ("ATTUNE__DATABASE__URL".to_owned(), database_url.to_owned()),
        (
            "ATTUNE__EXECUTOR__DURABILITY".to_owned(),
            "ledger".to_owned(),
        ),
        (
            "ATTUNE__EXECUTOR__QUEUE__MAX_QUEUE_LENGTH".to_owned(),
            config
                .executor
                .queue
                .max_queue_length
                .max(usize::try_from(workload.max_count()).unwrap_or(usize::MAX))
                .to_string(),
        ),
    ];
    common.extend(settings.env.iter().cloned());
    let mut all = Vec::new();
    for (i, port) in ports.into_iter().enumerate() {
        let id = format!("bench-{i}");
        let api = SocketAddr::from(([127, 0, 0, 1], port));
        let mut env = common.clone();
        env.push(("ATTUNE__API__LISTEN".to_owned(), api.to_string()));
        env.push(("ATTUNE__CLUSTER__INSTANCE_ID".to_owned(), id.clone()));
        if n > 1 {
            env.push(("ATTUNE__CLUSTER__MODE".to_owned(), "shared".to_owned()));
        }
        // One instance keeps the log names of the runs before there were several.
        let log_name = if n == 1 {
            "executor".to_owned()
        } else {
            id.clone()
        };
        let process = ServeProcess::new(
            settings.serve_bin.clone(),
            config_path.to_path_buf(),
            env,
            settings.dir.clone(),
            log_name,
        );
        all.push(Arc::new(Instance::new(id, api, process)));
    }
    let instances = Arc::new(Instances::new(all, config.cluster.partitions));
    let started = async {
        for (k, i) in instances.all.iter().enumerate() {
            i.process
                .lock()
                .await
                .start()
                .await
                .map_err(|e| format!("{}: {e}", i.id))?;
            if k == 0 {
                i.wait_until_up(settings.start_timeout).await?;
            }
        }
        for i in &instances.all {
            i.wait_until_up(settings.start_timeout).await?;
        }
        Ok::<_, String>(())
    }
    .await;
    if let Err(e) = started {
        instances.stop(Duration::from_secs(10)).await;
        return Err(format!("{e} (logs in {})", settings.dir.display()));
    }
    Ok(instances)
}

/// The executor's config file: the one given (if any) with the workload's limits added as
/// per-action policies, which only the file can carry. Everything else the run sets goes
/// through `ATTUNE__` variables. Actions whose limit is `default_limit` get no entry (the
/// default gives it them), so a soak's 100,000 short-lived actions do not fill the file.
fn write_config(
    config_file: Option<&Path>,
    workload: &Workload,
    default_limit: u32,
    out: &Path,
) -> Result<(), TargetError> {
    use serde_yaml_ng::{Mapping, Value};
    let invalid = |e: String| TargetError::Runtime(std::io::Error::other(e));
    let mut root = match config_file {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(TargetError::Runtime)?;
            serde_yaml_ng::from_str::<Value>(&text)
                .map_err(|e| invalid(format!("{}: {e}", p.display())))?
        }
        None => Value::Mapping(Mapping::new()),
    };
    if root.is_null() {
        root = Value::Mapping(Mapping::new());
    }
    let section = |v: &mut Value, key: &str| -> Result<(), TargetError> {
        let Some(map) = v.as_mapping_mut() else {
            return Err(invalid(format!("the config's {key} is not a mapping")));
        };
        if !map.contains_key(key) {
            map.insert(Value::from(key), Value::Mapping(Mapping::new()));
        }
        Ok(())
    };
    section(&mut root, "policies")?;
    let policies = &mut root["policies"];
    section(policies, "actions")?;
    let actions = &mut policies["actions"];
    for a in workload.actions.iter().filter(|a| a.limit != default_limit) {
        let mut p = Mapping::new();
        p.insert(
            Value::from("concurrency_limit"),
            Value::from(u64::from(a.limit)),
        );
        if let Some(map) = actions.as_mapping_mut() {
            map.insert(Value::from(a.name.as_str()), Value::Mapping(p));
        }
    }
    let text = serde_yaml_ng::to_string(&root).map_err(|e| invalid(e.to_string()))?;
    std::fs::write(out, text).map_err(TargetError::Runtime)
}

/// One injected fault, as it happened.
#[derive(Debug, Clone)]
pub struct Injection {
    pub kind: FaultKind,
    /// When it began and when the action was done (for `kill`, once the new process runs).
    pub began: Instant,
    pub done: Instant,
    /// What was done, or what went wrong doing it.
    pub detail: String,
    /// For `kill` and `stop`: the instance, what it owned, what was waiting.
    pub watch: Option<Watch>,
    /// Injected by `--kill-every`, not by the plan.
    pub periodic: bool,
}

/// Injects the faults of `schedule` as the run reaches each one's share of completions,
/// adding each to `done` once it is done.
pub async fn inject(
    schedule: Vec<(FaultKind, f64)>,
    target: Arc<ChaosFaults>,
    collector: Arc<Collector>,
    mut rng: XorShift,
    done: Arc<std::sync::Mutex<Vec<Injection>>>,
) {
    let total = collector.total() as f64;
    for (kind, share) in schedule {
        while (collector.completed() as f64) < share * total {
            if collector.finished() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let injection = target.inject(kind, &mut rng, &collector, false).await;
        record(&done, injection);
    }
}

/// `--kill-every`: every `every`, SIGKILLs the busiest instance and starts it again, until
/// the run is over.
pub async fn kill_periodically(
    every: Duration,
    target: Arc<ChaosFaults>,
    collector: Arc<Collector>,
    mut rng: XorShift,
    done: Arc<std::sync::Mutex<Vec<Injection>>>,
) {
    loop {
        tokio::time::sleep(every).await;
        if collector.finished() {
            return;
        }
        // Not while every instance is down or stopped (a `stop` of the plan under way).
        if !target.instances.all.iter().any(|i| i.live()) {
            continue;
        }
        let injection = target
            .inject(FaultKind::Kill, &mut rng, &collector, true)
            .await;
        record(&done, injection);
    }
}

fn record(done: &std::sync::Mutex<Vec<Injection>>, injection: Injection) {
    done.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(injection);
}

/// How faults reach the executors and the services.
pub struct ChaosFaults {
    pub instances: Arc<Instances>,
    pub vhost_name: String,
    pub postgres_restart: Vec<String>,
    /// How long a `stop` keeps the instance stopped.
    pub stop_for: Duration,
    /// The partition of each action of the workload, by index.
    pub action_partitions: Vec<Partition>,
}

/// The connection names of the executor's own connections (the session's, and the DLQ
/// reader's).
const EXECUTOR_CONNECTIONS: [&str; 2] = ["fifo-executor", "fifo-executor.ops"];

impl ChaosFaults {
    async fn inject(
        &self,
        kind: FaultKind,
        rng: &mut XorShift,
        collector: &Collector,
        periodic: bool,
    ) -> Injection {
        let began = Instant::now();
        tracing::info!(fault = kind.name(), periodic, "chaos: injecting");
        let (detail, watch) = match kind {
            FaultKind::Kill | FaultKind::Stop => self.signal(kind, rng, collector).await,
            _ => (self.apply(kind, rng).await, None),
        };
        tracing::info!(fault = kind.name(), detail, "chaos: injected");
        Injection {
            kind,
            began,
            done: Instant::now(),
            detail,
            watch,
            periodic,
        }
    }

    /// `kill` or `stop` of the busiest instance.
    async fn signal(
        &self,
        kind: FaultKind,
        rng: &mut XorShift,
        collector: &Collector,
    ) -> (String, Option<Watch>) {
        let Some(victim) = self.instances.busiest(rng.next_u64()).await else {
            return ("no instance was running".to_owned(), None);
        };
        let instance = self.instances.all[victim.index].clone();
        let owned = victim
            .owned
            .as_ref()
            .map_or("?".to_owned(), |o| o.len().to_string());
        if kind == FaultKind::Kill {
            let mut p = instance.process.lock().await;
            let watch = Watch::new(
                &instance,
                &p,
                victim.owned,
                &collector.waiting_actions(),
                &self.action_partitions,
            );
            p.kill().await;
            let pause = Duration::from_millis(rng.next_u64() % 500);
            tokio::time::sleep(pause).await;
            let detail = match p.start().await {
                Ok(()) => format!(
                    "killed {} (owned {owned} partitions, {} with work waiting); started again after {} ms",
                    instance.id,
                    watch.waiting.len(),
                    pause.as_millis()
                ),
                Err(e) => format!("killed {}; could not start again: {e}", instance.id),
            };
            return (detail, Some(watch));
        }
        let watch = {
            let p = instance.process.lock().await;
            Watch::new(
                &instance,
                &p,
                victim.owned,
                &collector.waiting_actions(),
                &self.action_partitions,
            )
        };
        if let Err(e) = instance.pause(true).await {
            return (format!("could not stop {}: {e}", instance.id), None);
        }
        tokio::time::sleep(self.stop_for).await;
        let resumed = instance.pause(false).await;
        let detail = format!(
            "stopped {} (owned {owned} partitions, {} with work waiting) for {} ms, then {}",
            instance.id,
            watch.waiting.len(),
            self.stop_for.as_millis(),
            match resumed {
                Ok(()) => "continued".to_owned(),
                Err(e) => format!("could not continue it: {e}"),
            }
        );
        (detail, Some(watch))
    }

    /// `close`, `broker` or `postgres`.
    async fn apply(&self, kind: FaultKind, rng: &mut XorShift) -> String {
        match kind {
            FaultKind::Kill | FaultKind::Stop => "not a fault of the services".to_owned(),
            FaultKind::Close => self.close_connections().await,
            FaultKind::Broker => {
                if let Err(e) = rabbitmqctl(&["stop_app"]).await {
                    return format!("stop_app failed: {e}");
                }
                let pause = Duration::from_millis(200 + rng.next_u64() % 800);
                tokio::time::sleep(pause).await;
                let started = start_broker_app().await;
                format!(
                    "stop_app, {} ms, start_app{}",
                    pause.as_millis(),
                    started
                        .err()
                        .map(|e| format!(" failed: {e}"))
                        .unwrap_or_default()
                )
            }
            FaultKind::Postgres => {
                let Some((cmd, args)) = self.postgres_restart.split_first() else {
                    return "no restart command".to_owned();
                };
                match Command::new(cmd)
                    .args(args)
                    .stdin(Stdio::null())
                    .output()
                    .await
                {
                    Ok(o) if o.status.success() => "restarted".to_owned(),
                    Ok(o) => format!(
                        "{} failed: {}{}",
                        self.postgres_restart.join(" "),
                        String::from_utf8_lossy(&o.stdout).trim(),
                        String::from_utf8_lossy(&o.stderr).trim()
                    ),
                    Err(e) => format!("{} failed: {e}", self.postgres_restart.join(" ")),
                }
            }
        }
    }

    /// Closes every connection of the executor's on its vhost; tries for a few seconds if it
    /// finds none (the executor may be between two sessions).
    async fn close_connections(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            // The JSON output tells connections apart by name and vhost, but its pids are
            // written relative to the CLI's own node and close_connection refuses them; the
            // plain output's pids are accepted. The two are matched by connection name.
            let listed = rabbitmqctl(&[
                "list_connections",
                "name",
                "vhost",
                "client_properties",
                "--formatter",
                "json",
            ])
            .await;
            let names = match listed {
                Ok(json) => executor_connections(&json, &self.vhost_name),
                Err(e) => return format!("list_connections failed: {e}"),
            };
            let pids = if names.is_empty() {
                Vec::new()
            } else {
                match rabbitmqctl(&["-s", "list_connections", "pid", "name"]).await {
                    Ok(plain) => pids_named(&plain, &names),
                    Err(e) => return format!("list_connections failed: {e}"),
                }
            };
            let mut closed = 0;
            for pid in &pids {
                if rabbitmqctl(&["close_connection", pid, "fifo-executor bench --chaos"])
                    .await
                    .is_ok()
                {
                    closed += 1;
                }
            }
            if closed > 0 {
                return format!("closed {closed} connection(s)");
            }
            if Instant::now() >= deadline {
                return "found no connection of the executor to close".to_owned();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Starts RabbitMQ's application, trying again for a while: a broker that is still stopping
/// refuses at first.
pub async fn start_broker_app() -> Result<(), TargetError> {
    let mut last = None;
    for _ in 0..20 {
        match rabbitmqctl(&["start_app"]).await {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(last.unwrap_or(TargetError::Panicked))
}

/// The names (`client:port -> server:port`) of the executor's connections on `vhost`, from
/// `rabbitmqctl list_connections name vhost client_properties --formatter json`.
fn executor_connections(json: &str, vhost: &str) -> Vec<String> {
    let Ok(serde_json::Value::Array(rows)) = serde_json::from_str::<serde_json::Value>(json) else {
        return Vec::new();
    };
    rows.iter()
        .filter(|r| r["vhost"].as_str() == Some(vhost))
        .filter(|r| {
            // client_properties: [[name, type, value], …]
            r["client_properties"].as_array().is_some_and(|props| {
                props.iter().any(|p| {
                    p[0].as_str() == Some("connection_name")
                        && p[2]
                            .as_str()
                            .is_some_and(|n| EXECUTOR_CONNECTIONS.contains(&n))
                })
            })
        })
        .filter_map(|r| r["name"].as_str().map(str::to_owned))
        .collect()
}

/// The pids of the connections named `names`, from `rabbitmqctl -s list_connections pid name`
/// (a pid and a name per line, separated by a tab).
fn pids_named(plain: &str, names: &[String]) -> Vec<String> {
    plain
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(_, name)| names.iter().any(|n| n == name.trim()))
        .map(|(pid, _)| pid.trim().to_owned())
        .collect()
}

/// What the run reports about one fault.
#[derive(Debug, Clone, Serialize)]
pub struct FaultReport {
    pub fault: FaultKind,
    /// Seconds from the first submission to the fault.
    pub at_s: f64,
    /// How long doing it took (for `kill`: the kill, the pause and the new start).
    pub took_ms: f64,
    /// The longest pause between two dispatches around the fault (from the last dispatch
    /// before it to the next fault).
    pub stalled_ms: f64,
    /// From the fault's beginning to the end of that pause: when dispatching was back.
    pub resumed_after_ms: f64,
    /// Dispatches with attempt > 1 the workers received from the fault to the next one.
    pub resent: u64,
    /// Of those, dispatches of executions no earlier copy had reached (a crash made the
    /// executor raise the attempt of what it could not know was sent).
    pub resent_without_earlier_copy: u64,
    /// Violations the workers' checks found in the dispatches from the fault to the next one
    /// (order, limit, a copy again).
    pub violations: u64,
    pub detail: String,
    /// Injected by `--kill-every` rather than the plan.
    pub periodic: bool,
    /// For `kill` and `stop`: the instance it hit.
    pub instance: Option<String>,
    /// … the partitions it owned just before, by the cluster API (`None`: unknown) …
    pub partitions_owned: Option<usize>,
    /// … and of those, the partitions with work waiting then.
    pub partitions_waiting: Option<usize>,
    /// From the signal to the first dispatch, admitted after it, of an action of the
    /// partitions it owned (`None`: none came before the run ended).
    pub failover_ms: Option<f64>,
    /// … and until each partition with work waiting at the fault had had one.
    pub all_partitions_back_ms: Option<f64>,
    /// For `stop`: what shows the instance was fenced once it woke (its exit with status 3,
    /// `attune_fenced_writes_total`, its log); empty when nothing does.
    pub fenced: Vec<String>,
}

/// Per-fault figures from the dispatch log (arrival times and whether each was a re-send).
pub fn fault_reports(
    injections: &[Injection],
    log: &[Arrived],
    run_start: Instant,
    run_end: Instant,
) -> Vec<FaultReport> {
    let mut out = Vec::new();
    for (i, f) in injections.iter().enumerate() {
        let until = injections.get(i + 1).map_or(run_end, |n| n.began);
        // The gaps between consecutive dispatches, from the last one before the fault.
        let first_after = log.partition_point(|a| a.at < f.began);
        let from = first_after.saturating_sub(1);
        let upto = log.partition_point(|a| a.at < until);
        let mut times: Vec<Instant> = log[from..upto].iter().map(|a| a.at).collect();
        if first_after == 0 {
            times.insert(0, f.began);
        }
        let (mut stalled, mut resumed) = (Duration::ZERO, Duration::ZERO);
        for w in times.windows(2) {
            let gap = w[1].saturating_duration_since(w[0]);
            if gap > stalled {
                stalled = gap;
                resumed = w[1].saturating_duration_since(f.began);
            }
        }
        // Nothing came after the fault up to the next one: dispatching was back no sooner.
        if let Some(last) = times.last()
            && until.saturating_duration_since(*last) > stalled
        {
            stalled = until.saturating_duration_since(*last);
            resumed = until.saturating_duration_since(f.began);
        }
        let window = &log[first_after..upto];
        let resent = window.iter().filter(|a| a.kind != Arrival::First).count() as u64;
        let unseen = window
            .iter()
            .filter(|a| a.kind == Arrival::RaisedUnseen)
            .count() as u64;
        let violations = window.iter().map(|a| u64::from(a.violations)).sum();
        let (failover, all_back) = f.watch.as_ref().map_or((None, None), |w| w.failover(log));
        out.push(FaultReport {
            fault: f.kind,
            at_s: f.began.saturating_duration_since(run_start).as_secs_f64(),
            took_ms: ms(f.done.saturating_duration_since(f.began)),
            stalled_ms: ms(stalled),
            resumed_after_ms: ms(resumed),
            resent,
            resent_without_earlier_copy: unseen,
            violations,
            detail: f.detail.clone(),
            periodic: f.periodic,
            instance: f.watch.as_ref().map(|w| w.instance.clone()),
            partitions_owned: f
                .watch
                .as_ref()
                .and_then(|w| w.owned.as_ref().map(Vec::len)),
            partitions_waiting: f
                .watch
                .as_ref()
                .and_then(|w| w.owned.as_ref().map(|_| w.waiting.len())),
            failover_ms: failover.map(ms),
            all_partitions_back_ms: all_back.map(ms),
            fenced: Vec::new(),
        });
    }
    out
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// What the ledger and the broker hold once the run is over.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Audit {
    /// Executions of the run per ledger status.
    pub ledger_statuses: HashMap<String, u64>,
    /// Executions the run submitted that the ledger does not have.
    pub ledger_missing: u64,
    /// Executions whose ledger status is not what their worker reported (first ids).
    pub ledger_mismatched: Vec<u64>,
    /// Executions still `requested`, `scheduled` or `running` in the ledger (first ids).
    pub ledger_live: Vec<u64>,
    /// Messages in `attune.dlq`.
    pub dead_letters: u32,
    /// Messages left in the executor's three queues.
    pub left_in_queues: u32,
    /// How long the ledger took to settle after the last completion.
    pub settled_after_ms: f64,
}

impl Audit {
    /// What the audit found wrong, one line each.
    pub fn violations(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.ledger_live.is_empty() {
            let live: u64 = ["requested", "scheduled", "running"]
                .iter()
                .filter_map(|s| self.ledger_statuses.get(*s))
                .sum();
            out.push(format!(
                "ledger: {live} executions still live after the run (first ids {:?})",
                self.ledger_live
            ));
        }
        if self.ledger_missing > 0 {
            out.push(format!(
                "ledger: {} submitted executions have no row",
                self.ledger_missing
            ));
        }
        if !self.ledger_mismatched.is_empty() {
            out.push(format!(
                "ledger: executions whose status is not what their worker reported (first ids \
                 {:?})",
                self.ledger_mismatched
            ));
        }
        if self.dead_letters > 0 {
            out.push(format!(
                "dead letters: {} messages in attune.dlq",
                self.dead_letters
            ));
        }
        if self.left_in_queues > 0 {
            out.push(format!(
                "broker: {} messages left in the executor's queues",
                self.left_in_queues
            ));
        }
        out
    }
}

/// Most ids listed in an audit line.
const LISTED: usize = 20;

/// Waits (up to `deadline`) until the ledger holds no live execution of the run, then
/// compares it with what the workers reported (`outcomes`: execution id → failed) and counts
/// what the broker still holds.
pub async fn audit(
    database_url: &str,
    amqp_url: &str,
    outcomes: &HashMap<u64, bool>,
    ids: std::ops::Range<u64>,
    deadline: Duration,
) -> Result<Audit, TargetError> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(database_url)
        .await?;
    let (lo, hi) = (
        i64::try_from(ids.start).unwrap_or(i64::MAX),
        i64::try_from(ids.end).unwrap_or(i64::MAX),
    );
    let began = Instant::now();
    let rows = loop {
        let rows = sqlx::query(
            "SELECT id, status FROM attune.execution WHERE id >= $1 AND id < $2 ORDER BY id",
        )
        .bind(lo)
        .bind(hi)
        .fetch_all(&pool)
        .await?;
        let live = rows.iter().any(|r| {
            matches!(
                r.try_get::<String, _>("status").as_deref(),
                Ok("requested" | "scheduled" | "running")
            )
        });
        if !live || began.elapsed() >= deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let mut audit = Audit {
        settled_after_ms: ms(began.elapsed()),
        ..Audit::default()
    };
    let mut seen = 0u64;
    for row in &rows {
        let id = u64::try_from(row.try_get::<i64, _>("id")?).unwrap_or(0);
        let status: String = row.try_get("status")?;
        seen += u64::from(outcomes.contains_key(&id));
        match status.as_str() {
            "requested" | "scheduled" | "running" if audit.ledger_live.len() < LISTED => {
                audit.ledger_live.push(id)
            }
            "succeeded" | "failed" => {
                let failed = status == "failed";
                if outcomes.get(&id).is_some_and(|f| *f != failed)
                    && audit.ledger_mismatched.len() < LISTED
                {
                    audit.ledger_mismatched.push(id);
                }
            }
            _ if outcomes.contains_key(&id) && audit.ledger_mismatched.len() < LISTED => {
                audit.ledger_mismatched.push(id)
            }
            _ => {}
        }
        *audit.ledger_statuses.entry(status).or_default() += 1;
    }
    audit.ledger_missing = (outcomes.len() as u64).saturating_sub(seen);
    pool.close().await;

    let conn = crate::rabbit::connect(amqp_url, "fifo-executor bench audit").await?;
    for queue in [
        crate::rabbit::topology::DLQ,
        crate::rabbit::topology::REQUESTS_QUEUE,
        crate::rabbit::topology::COMPLETED_QUEUE,
        crate::rabbit::topology::CANCEL_QUEUE,
    ] {
        if let Some(n) = queue_depth(&conn, queue).await? {
            if queue == crate::rabbit::topology::DLQ {
                audit.dead_letters = n;
            } else {
                audit.left_in_queues += n;
            }
        }
    }
    let _ = conn.close(200, "audit done".into()).await;
    Ok(audit)
}

/// Messages in `queue` by a passive declare on a channel of its own (`None`: no such
/// queue; the broker closes that channel).
pub async fn queue_depth(
    conn: &lapin::Connection,
    queue: &str,
) -> Result<Option<u32>, lapin::Error> {
    let ch = conn.create_channel().await?;
    let q = ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await;
    if q.is_ok() {
        let _ = ch.close(200, "queue depth read".into()).await;
    }
    Ok(q.ok().map(|q| q.message_count()))
}

/// The chaos part of a run's report.
#[derive(Debug, Clone, Serialize)]
pub struct ChaosReport {
    pub plan: String,
    pub seed: u64,
    /// Where the executor's config and logs are.
    pub dir: String,
    pub faults: Vec<FaultReport>,
    /// Faults the plan had that the run never reached (it ended or stalled first).
    pub not_injected: u64,
    /// How often the executor was started in all (every instance's starts).
    pub executor_starts: usize,
    /// `serve` processes sharing the vhost and the database.
    pub instances: usize,
    /// Failover times of the `kill` and `stop` faults that found work waiting on the
    /// instance's partitions.
    pub failover: super::instances::FailoverSummary,
    /// Instances that exited by themselves and were started again (an expected one: status
    /// 3, fenced, after a SIGSTOP in that life).
    pub exits: Vec<super::instances::Exit>,
    pub audit: Option<Audit>,
    /// Completions the workers published again for executions they had finished.
    pub completions_reported_again: u64,
    /// Copies of dispatches the broker delivered again (flagged redelivered).
    pub redelivered: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_names_each_fault_once_with_its_count() {
        let plan: ChaosPlan = "kill:10, close:5,broker,pg:3,stop:2"
            .parse()
            .expect("a plan");
        assert_eq!(
            plan.counts,
            vec![
                (FaultKind::Kill, 10),
                (FaultKind::Close, 5),
                (FaultKind::Broker, 1),
                (FaultKind::Postgres, 3),
                (FaultKind::Stop, 2)
            ]
        );
        assert!("kill:2,kill:3".parse::<ChaosPlan>().is_err());
        assert!("reboot:1".parse::<ChaosPlan>().is_err());
        assert!("kill:x".parse::<ChaosPlan>().is_err());
        assert!("kill:0".parse::<ChaosPlan>().is_err());
    }

    #[test]
    fn the_schedule_has_every_fault_at_increasing_points_within_the_run() {
        let plan: ChaosPlan = "kill:4,close:3,postgres:2".parse().expect("a plan");
        let schedule = plan.schedule(&mut XorShift::new(7));
        assert_eq!(schedule.len(), 9);
        assert!(schedule.windows(2).all(|w| w[0].1 <= w[1].1));
        assert!(schedule.iter().all(|(_, s)| (0.05..=0.6).contains(s)));
        let kills = schedule
            .iter()
            .filter(|(k, _)| *k == FaultKind::Kill)
            .count();
        assert_eq!(kills, 4);
    }

    #[test]
    fn the_executors_connections_are_found_by_vhost_and_name() {
        let json = r#"[
          {"name":"a:1 -> b:2","vhost":"v","client_properties":[["connection_name","longstr","fifo-executor"]]},
          {"name":"a:3 -> b:2","vhost":"v","client_properties":[["connection_name","longstr","fifo-executor bench workers"]]},
          {"name":"a:4 -> b:2","vhost":"w","client_properties":[["connection_name","longstr","fifo-executor"]]},
          {"name":"a:5 -> b:2","vhost":"v","client_properties":[["connection_name","longstr","fifo-executor.ops"]]}
        ]"#;
        let names = executor_connections(json, "v");
        assert_eq!(names, vec!["a:1 -> b:2", "a:5 -> b:2"]);
        assert!(executor_connections("not json", "v").is_empty());
        let plain = "<rabbit@h.1.10.0>\ta:1 -> b:2\n<rabbit@h.1.11.0>\ta:3 -> b:2\n\
                     <rabbit@h.1.12.0>\ta:5 -> b:2\n";
        assert_eq!(
            pids_named(plain, &names),
            vec!["<rabbit@h.1.10.0>", "<rabbit@h.1.12.0>"]
        );
    }

    #[test]
    fn a_fault_reports_the_longest_pause_after_it_and_the_resends_until_the_next() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let arrived = |ms: u64, kind: Arrival| Arrived {
            at: at(ms),
            kind,
            action: Some(0),
            violations: u32::from(kind == Arrival::RaisedUnseen),
            admitted: None,
        };
        let log = vec![
            arrived(0, Arrival::First),
            arrived(10, Arrival::First),
            arrived(20, Arrival::First),
            // fault at 25; dispatching back at 500 with a re-send
            arrived(500, Arrival::Again),
            arrived(505, Arrival::RaisedUnseen),
            arrived(510, Arrival::First),
            // second fault at 600, nothing after it until the end at 1000
        ];
        let injection = |kind, began, done| Injection {
            kind,
            began,
            done,
            detail: String::new(),
            watch: None,
            periodic: false,
        };
        let injections = vec![
            injection(FaultKind::Kill, at(25), at(125)),
            injection(FaultKind::Close, at(600), at(601)),
        ];
        let r = fault_reports(&injections, &log, t0, at(1000));
        assert_eq!(r[0].stalled_ms.round(), 480.0);
        assert_eq!(r[0].resumed_after_ms.round(), 475.0);
        assert_eq!(r[0].resent, 2);
        assert_eq!(r[0].resent_without_earlier_copy, 1);
        assert_eq!(r[0].violations, 1);
        assert_eq!(r[1].violations, 0);
        assert_eq!(r[0].took_ms.round(), 100.0);
        assert_eq!(r[1].stalled_ms.round(), 490.0);
        assert_eq!(r[1].resumed_after_ms.round(), 400.0);
        assert_eq!(r[1].resent, 0);
    }
}
