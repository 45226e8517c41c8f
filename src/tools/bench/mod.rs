//! `fifo-executor bench`: the FIFO-ordering load benchmark (issue 6).
//!
//! A run drives an executor through the real RabbitMQ with simulated producers and workers,
//! checks while it goes that every action's dispatches keep submission order, that no action
//! ever runs more than its limit and that every execution completes exactly once, and
//! reports throughput, latencies, CPU and memory. With `--baseline broker` it first measures
//! the same three persistent hops through a bare relay ([`relay`]), the ceiling the executor's
//! throughput is given as a ratio of, and then through the limited relay, which holds each
//! action to its limit in FIFO order and does nothing else: the ceiling under the workload's
//! own limits.
//!
//! # Layout
//!
//! - [`plan`]: presets and the workload (actions, counts, limits, pacing).
//! - [`load`]: producers, simulated workers and the [`load::Collector`] they feed.
//! - [`verify`]: the checks, as a plain state machine.
//! - [`measure`]: histograms, the timeline, CPU and RSS from `/proc`.
//! - [`relay`]: the broker baseline.
//! - [`report`]: the summary, the JSON report and the SVG plot.
//! - [`target`]: what is measured (an executor in-process or already running, or the
//!   relay) and the vhost and database a run may create for itself.
//! - [`soak`]: `--soak`, the executor under a fixed rate for a long while, what it holds
//!   sampled, and each series' slope after the warm-up.
//! - [`chaos`]: `serve` as child processes, the faults injected into them and the audit
//!   afterwards; [`instances`]: several of them sharing the actions (`--instances`), the
//!   busiest one, failover times.

pub mod chaos;
pub mod instances;
pub mod load;
pub mod measure;
pub mod plan;
pub mod relay;
pub mod report;
pub mod soak;
pub mod target;
pub mod verify;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{ArgGroup, Parser, ValueEnum};
use tokio::sync::watch;

use self::load::{Collector, LoadError, WorkerSettings, Workers};
use self::plan::{Overrides, Preset, Workload};
use self::report::{Cpu, Machine, Memory, Phase, Report};
use self::target::{Target, TargetError};
use crate::config::{Config, Durability, QueueType};
use crate::tools::DurationDist;

/// Errors that stop a run before it can report.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("config: {0}")]
    Config(String),
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("could not write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// `--baseline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Baseline {
    /// The executor only.
    None,
    /// The broker ceiling and the limited relay first, then the executor, and the ratios.
    Broker,
    /// The broker ceiling and the limited relay only.
    BrokerOnly,
}

/// `--durability`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DurabilityArg {
    Ledger,
    Memory,
}

/// `--queue-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QueueTypeArg {
    Classic,
    Quorum,
}

/// The command line of `fifo-executor bench`.
#[derive(Debug, Clone, Parser)]
#[command(name = "bench")]
#[command(group(
    ArgGroup::new("children")
        .args(["chaos", "instances", "kill_every", "soak"])
        .multiple(true)
))]
pub struct BenchArgs {
    /// The executor's config file (in-process: the service's whole config; --external: the
    /// broker URL). Built-in defaults and ATTUNE__ variables otherwise.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The workload; the flags below override its parts.
    #[arg(long, value_enum, default_value_t = Preset::Wide)]
    pub preset: Preset,
    /// Ordinary actions.
    #[arg(long)]
    pub actions: Option<u32>,
    /// Executions per ordinary action.
    #[arg(long)]
    pub executions: Option<u64>,
    /// Concurrency limit of each ordinary action (set in-process; with --external it must
    /// match the executor's policies, it is what the check holds the executor to).
    #[arg(long)]
    pub limit: Option<u32>,
    /// Executions of one hot action besides the others (0: none).
    #[arg(long)]
    pub hot_executions: Option<u64>,
    /// Concurrency limit of the hot action.
    #[arg(long)]
    pub hot_limit: Option<u32>,
    /// Requests per second over all producers (flat out when absent).
    #[arg(long, conflicts_with = "flat_out")]
    pub rate: Option<f64>,
    /// Publish as fast as the broker confirms, whatever the preset says.
    #[arg(long)]
    pub flat_out: bool,
    /// Below the peak: first drive the limited relay flat out to find its peak, then the
    /// limited relay and the executor each at this fraction of it (e.g. 0.8), and compare
    /// their latencies. Adds the limited relay (not the bare one) without --baseline.
    #[arg(long, conflicts_with_all = ["rate", "flat_out", "external", "chaos", "instances",
          "kill_every"])]
    pub load: Option<f64>,
    /// Requests published back to back before producers pause, keeping the average rate.
    #[arg(long)]
    pub burst: Option<u64>,
    /// Producer channels (each owns a share of the actions). Default 4.
    #[arg(long)]
    pub producers: Option<u16>,
    /// Simulated execution time in milliseconds: `MS`, `MIN-MAX` or `exp:MEAN`.
    #[arg(long)]
    pub duration_ms: Option<String>,
    /// Share of executions the workers report as failed (0 to 1).
    #[arg(long)]
    pub failure_rate: Option<f64>,
    /// Dispatches the simulated workers take at once (default: the larger of
    /// rabbitmq.prefetch and the sum of the limits, at most 65535).
    #[arg(long)]
    pub worker_prefetch: Option<u16>,
    /// Overrides executor.durability.
    #[arg(long, value_enum)]
    pub durability: Option<DurabilityArg>,
    /// Overrides rabbitmq.queue_type (executor and relay queues).
    #[arg(long, value_enum)]
    pub queue_type: Option<QueueTypeArg>,
    /// Overrides rabbitmq.prefetch (executor and relay consumers).
    #[arg(long)]
    pub prefetch: Option<u16>,
    /// Overrides rabbitmq.confirm_window (executor and relay publisher, and the producers').
    #[arg(long)]
    pub confirm_window: Option<usize>,
    /// Drive an executor that is already running (on rabbitmq.url) instead of starting one.
    #[arg(long)]
    pub external: bool,
    /// With --external: the executor's process id, to read its CPU time and RSS.
    #[arg(long, requires = "external")]
    pub executor_pid: Option<u32>,
    /// Run in a RabbitMQ vhost and (with the ledger) a Postgres database of the run's own,
    /// created with rabbitmqctl and CREATE DATABASE and dropped afterwards.
    #[arg(long, conflicts_with = "external")]
    pub isolated: bool,
    /// Measure the broker ceiling too (in a vhost of its own, made with rabbitmqctl).
    #[arg(long, value_enum, default_value_t = Baseline::None)]
    pub baseline: Baseline,
    /// Seconds the executor (or relay) may take to start consuming requests.
    #[arg(long, default_value_t = 60)]
    pub start_timeout: u64,
    /// Seconds each phase may take before the run fails, saying what is missing.
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
    /// Write the JSON report here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Write the SVG plot here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Width of the timeline's intervals, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
    /// Worker threads of the in-process executor's runtime.
    #[arg(long, default_value_t = 2)]
    pub executor_threads: usize,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Inject faults into a real `serve` process while the load runs, e.g.
    /// `kill:10,close:5,broker:1,postgres:3` (SIGKILL and restart the executor, close its
    /// RabbitMQ connections, restart RabbitMQ's app, restart PostgreSQL), then audit the
    /// ledger and the DLQ. Runs in a vhost and database of its own; the broker and PostgreSQL
    /// restarts affect everything else on this machine too.
    #[arg(long, conflicts_with_all = ["external", "baseline", "isolated"])]
    pub chaos: Option<chaos::ChaosPlan>,
    /// Run N `fifo-executor serve` processes (default 1) as children sharing a vhost and a
    /// database of the run's own, each with its own HTTP port and cluster.instance_id
    /// (bench-0, bench-1, …), in cluster.mode shared when N > 1. With or without --chaos.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64),
          conflicts_with_all = ["external", "isolated"])]
    pub instances: Option<u16>,
    /// Every DURATION (e.g. 10s), SIGKILL the busiest instance (the one owning the most
    /// partitions) and start it again; the report gives each failover time.
    #[arg(long, value_parser = instances::parse_duration,
          conflicts_with_all = ["external", "isolated"])]
    pub kill_every: Option<Duration>,
    /// How long a `stop` fault keeps its instance SIGSTOPped (default: two
    /// rabbitmq.heartbeat_seconds and 3 s).
    #[arg(long, value_parser = instances::parse_duration, requires = "chaos")]
    pub stop_for: Option<Duration>,
    /// Seed of the fault schedule (random when absent; the report says which).
    #[arg(long, requires = "children")]
    pub chaos_seed: Option<u64>,
    /// The fifo-executor binary the chaos run starts `serve` from (default: this one).
    #[arg(long, requires = "children")]
    pub serve_bin: Option<PathBuf>,
    /// Where the chaos run keeps the executor's config and logs (default: a new directory
    /// under the system's temporary directory).
    #[arg(long, requires = "children")]
    pub chaos_dir: Option<PathBuf>,
    /// The command that restarts PostgreSQL, split at spaces (default: `pg_ctlcluster
    /// --skip-systemctl-redirect <version> main restart`).
    #[arg(long, requires = "chaos")]
    pub postgres_restart: Option<String>,
    /// Soak for DURATION (e.g. 1h, 5m) at --rate: the executor runs as a `serve` child
    /// process (ledger on, in a vhost and a database of the run's own) over --actions steady
    /// actions (default 1,000, at --limit, default 5) and --soak-actions short-lived ones (at
    /// policies.default's limit) each used --soak-uses times within about a second and then
    /// never again; its RSS, open fds, Postgres connections, RabbitMQ channels, DLQ depth,
    /// queued and running executions and actions known and awake are sampled every
    /// --sample-every, and the summary gives each series' slope per hour after --warmup. The
    /// report and the plot carry the samples; the run's checks and the ledger audit apply.
    #[arg(long, value_parser = instances::parse_duration, requires = "rate",
          conflicts_with_all = ["external", "isolated", "baseline", "load", "chaos",
          "instances", "kill_every", "flat_out"])]
    pub soak: Option<Duration>,
    /// With --soak: the short-lived actions, each used --soak-uses times then never again.
    #[arg(long, default_value_t = 100_000, requires = "soak")]
    pub soak_actions: u32,
    /// With --soak: executions of each short-lived action.
    #[arg(long, default_value_t = 5, requires = "soak")]
    pub soak_uses: u64,
    /// With --soak: how often the executor is sampled.
    #[arg(long, value_parser = instances::parse_duration, default_value = "10s",
          requires = "soak")]
    pub sample_every: Duration,
    /// With --soak: samples before this are left out of the slopes (default: a tenth of the
    /// soak).
    #[arg(long, value_parser = instances::parse_duration, requires = "soak")]
    pub warmup: Option<Duration>,
    /// With --soak: the executor's executor.queue.passivate_after_seconds and
    /// metrics_idle_after_seconds (defaults 300 s and 600 s), shortened so that an hour
    /// shows the steady state of actions that come and go.
    #[arg(long, value_parser = instances::parse_duration, default_value = "60s",
          requires = "soak")]
    pub soak_idle_after: Duration,
    /// With --soak: the executor's executor.remember_ended_ids (default 1,000,000), so that
    /// the window of ended ids is full within the warm-up.
    #[arg(long, default_value_t = 100_000, requires = "soak")]
    pub soak_remember_ended: usize,
}

/// Steady actions of a soak without --actions (as many as `wide`'s: at limit 5 they take
/// thousands a second without waiting for a slot).
const SOAK_STEADY_ACTIONS: u32 = 1000;

/// Concurrency limit of a soak's steady actions without --limit.
const SOAK_STEADY_LIMIT: u32 = 5;

impl BenchArgs {
    /// `--soak` and its settings.
    fn soak_plan(&self) -> Option<soak::SoakPlan> {
        let duration = self.soak?;
        Some(soak::SoakPlan {
            duration,
            sample_every: self.sample_every,
            warmup: self.warmup.unwrap_or(duration / 10),
            distinct: self.soak_actions,
            uses: self.soak_uses.max(1),
            idle_after: self.soak_idle_after,
            remember_ended: self.soak_remember_ended,
        })
    }
}

/// Runs `fifo-executor bench`, prints the summary and writes the files asked for. Exit status
/// 1 when anything was violated, missing or too slow.
pub async fn main(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let report = run(&args).await?;
    println!("{}", report.summary());
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Runs the phases asked for and returns the report (also written to `--report`/`--plot`).
pub async fn run(args: &BenchArgs) -> Result<Report, BenchError> {
    let mut config =
        Config::load(args.config.as_deref()).map_err(|e| BenchError::Config(e.to_string()))?;
    apply_overrides(&mut config, args);
    let duration = args
        .duration_ms
        .as_deref()
        .map(DurationDist::parse_ms)
        .transpose()
        .map_err(|e| BenchError::Usage(format!("--duration-ms: {e}")))?;
    if let Some(f) = args.failure_rate
        && !(0.0..=1.0).contains(&f)
    {
        return Err(BenchError::Usage(
            "--failure-rate must be between 0 and 1".to_owned(),
        ));
    }
    if let Some(f) = args.load
        && !(f > 0.0 && f <= 1.0)
    {
        return Err(BenchError::Usage(
            "--load must be a fraction of the peak above 0 and at most 1".to_owned(),
        ));
    }
    let mut workload = Workload::resolve(
        args.preset,
        &Overrides {
            actions: args.actions,
            executions: args.executions,
            limit: args.limit,
            hot_executions: args.hot_executions,
            hot_limit: args.hot_limit,
            rate: args.rate,
            flat_out: args.flat_out,
            burst: args.burst,
            producers: args.producers,
            duration,
            failure_rate: args.failure_rate,
        },
    );
    if let Some(plan) = args.soak_plan() {
        let rate = workload
            .rate
            .ok_or_else(|| BenchError::Usage("--soak needs --rate".to_owned()))?;
        let total = (rate * plan.duration.as_secs_f64()).round() as u64;
        workload = workload
            .soak(
                total,
                args.actions.unwrap_or(SOAK_STEADY_ACTIONS),
                args.limit.unwrap_or(SOAK_STEADY_LIMIT),
                plan.distinct,
                plan.uses,
                config.policies.default.concurrency_limit,
            )
            .ok_or_else(|| {
                BenchError::Usage(format!(
                    "--soak: {} short-lived actions × {} uses are more than half of the {total} \
                     executions --rate gives over the soak",
                    plan.distinct, plan.uses
                ))
            })?;
    }
    let workload = Arc::new(workload);
    if workload.total() == 0 {
        return Err(BenchError::Usage(
            "the workload has no executions".to_owned(),
        ));
    }
    let started_at = chrono::Utc::now().to_rfc3339();
    let load_start = measure::load_average();
    let limits: HashMap<String, u32> = workload
        .actions
        .iter()
        .map(|a| (a.name.clone(), a.limit))
        .collect();

    // --load: the limited relay's peak first; every phase after it runs at the fraction.
    let mut peak = None;
    let workload = match args.load {
        Some(fraction) => {
            let flat_out = Arc::new(Workload {
                rate: None,
                ..(*workload).clone()
            });
            let target =
                Target::relay(&config, args.executor_threads, Some(limits.clone())).await?;
            let measured = phase("peak", target, &config, &flat_out, args).await?;
            let rate = (measured.throughput * fraction).max(1.0);
            peak = Some(measured);
            Arc::new(Workload {
                rate: Some(rate),
                ..(*workload).clone()
            })
        }
        None => workload,
    };
    let mut settings = settings(args, &config, &workload);
    if let Some(f) = args.load {
        settings.insert("load".to_owned(), f.to_string());
    }

    let mut baseline = None;
    let mut limited_baseline = None;
    if args.baseline != Baseline::None {
        let target = Target::relay(&config, args.executor_threads, None).await?;
        baseline = Some(phase("broker", target, &config, &workload, args).await?);
    }
    if args.baseline != Baseline::None || args.load.is_some() {
        let target = Target::relay(&config, args.executor_threads, Some(limits)).await?;
        limited_baseline = Some(phase("limited", target, &config, &workload, args).await?);
    }
    let mut executor = None;
    let mut chaos_report = None;
    let mut soak_report = None;
    let children = args.chaos.is_some()
        || args.instances.is_some()
        || args.kill_every.is_some()
        || args.soak.is_some();
    if children && args.baseline == Baseline::BrokerOnly {
        return Err(BenchError::Usage(
            "--baseline broker-only measures no executor: drop --instances and --kill-every"
                .to_owned(),
        ));
    }
    if children {
        let (phase, report, soak) =
            chaos_phase(args.chaos.as_ref(), args, &config, &workload).await?;
        executor = Some(phase);
        chaos_report = Some(report);
        soak_report = soak;
    } else if args.baseline != Baseline::BrokerOnly {
        let target = if args.external {
            Target::external(&config, args.executor_pid).await?
        } else {
            Target::in_process(&config, &workload, args.isolated, args.executor_threads).await?
        };
        executor = Some(phase("executor", target, &config, &workload, args).await?);
    }
    let chaos_ok = chaos_report.as_ref().is_none_or(|c| c.not_injected == 0);
    let ratio_of = |b: &Option<Phase>| match (b, &executor) {
        (Some(b), Some(e)) if b.throughput > 0.0 => Some(e.throughput / b.throughput),
        _ => None,
    };
    let ratio = ratio_of(&baseline);
    let ratio_limited = ratio_of(&limited_baseline);
    let versus_limited = match (&executor, &limited_baseline) {
        (Some(e), Some(l)) => Some(report::Comparison::of(e, l)),
        _ => None,
    };
    let ok = [&peak, &baseline, &limited_baseline, &executor]
        .into_iter()
        .flatten()
        .all(|p| p.violations_total == 0 && !p.timed_out)
        && chaos_ok;
    let report = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        started_at,
        machine: Machine {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            load_average_start: load_start,
            load_average_end: measure::load_average(),
        },
        settings,
        baseline,
        limited_baseline,
        executor,
        ratio,
        ratio_limited,
        peak,
        load_fraction: args.load,
        versus_limited,
        chaos: chaos_report,
        soak: soak_report,
        ok,
    };
    if let Some(path) = &args.report {
        let json = serde_json::to_vec_pretty(&report).unwrap_or_default();
        write(path, &json)?;
    }
    if let Some(path) = &args.plot {
        write(path, report::svg(&report).as_bytes())?;
    }
    Ok(report)
}

fn write(path: &PathBuf, bytes: &[u8]) -> Result<(), BenchError> {
    std::fs::write(path, bytes).map_err(|source| BenchError::Write {
        path: path.clone(),
        source,
    })
}

fn apply_overrides(config: &mut Config, args: &BenchArgs) {
    if let Some(d) = args.durability {
        config.executor.durability = match d {
            DurabilityArg::Ledger => Durability::Ledger,
            DurabilityArg::Memory => Durability::Memory,
        };
    }
    if let Some(q) = args.queue_type {
        config.rabbitmq.queue_type = match q {
            QueueTypeArg::Classic => QueueType::Classic,
            QueueTypeArg::Quorum => QueueType::Quorum,
        };
    }
    if let Some(p) = args.prefetch {
        config.rabbitmq.prefetch = p.max(1);
    }
    if let Some(w) = args.confirm_window {
        config.rabbitmq.confirm_window = w.max(1);
    }
}

/// The settings that shape the figures, for the report.
fn settings(args: &BenchArgs, c: &Config, w: &Workload) -> BTreeMap<String, String> {
    let preset = args
        .preset
        .to_possible_value()
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default();
    BTreeMap::from([
        ("preset".to_owned(), preset),
        ("actions".to_owned(), w.actions.len().to_string()),
        ("executions".to_owned(), w.total().to_string()),
        (
            "limits".to_owned(),
            format!(
                "{}..{}",
                w.actions.iter().map(|a| a.limit).min().unwrap_or(0),
                w.actions.iter().map(|a| a.limit).max().unwrap_or(0)
            ),
        ),
        (
            "rate".to_owned(),
            w.rate.map_or("flat-out".to_owned(), |r| format!("{r}/s")),
        ),
        ("burst".to_owned(), w.burst.to_string()),
        ("producers".to_owned(), w.producers.to_string()),
        ("duration_ms".to_owned(), w.duration.to_string()),
        ("failure_rate".to_owned(), w.failure_rate.to_string()),
        (
            "worker_prefetch".to_owned(),
            worker_prefetch(args, c, w).to_string(),
        ),
        (
            "durability".to_owned(),
            if args.external {
                "external".to_owned()
            } else {
                format!("{:?}", c.executor.durability).to_lowercase()
            },
        ),
        ("queue_type".to_owned(), c.rabbitmq.queue_type.to_string()),
        ("prefetch".to_owned(), c.rabbitmq.prefetch.to_string()),
        (
            "confirm_window".to_owned(),
            c.rabbitmq.confirm_window.to_string(),
        ),
        ("isolated".to_owned(), args.isolated.to_string()),
        (
            "soak".to_owned(),
            args.soak
                .map_or("no".to_owned(), |d| format!("{} s", d.as_secs())),
        ),
    ])
}

fn worker_prefetch(args: &BenchArgs, c: &Config, w: &Workload) -> u16 {
    args.worker_prefetch.unwrap_or_else(|| {
        let want = w.total_limit().max(u64::from(c.rabbitmq.prefetch));
        u16::try_from(want).unwrap_or(u16::MAX)
    })
}

/// A unique suffix for the names a run creates.
fn run_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{}-{nanos}", std::process::id())
}

/// How often the progress bar and the RSS sample are refreshed.
const TICK: Duration = Duration::from_millis(200);

/// One measured phase against `target`, which is stopped (and its vhost and database dropped)
/// before this returns.
async fn phase(
    name: &str,
    target: Target,
    config: &Config,
    workload: &Arc<Workload>,
    args: &BenchArgs,
) -> Result<Phase, BenchError> {
    let mut target = target;
    let outcome = drive(name, &mut target, config, workload, args, None).await;
    target.stop().await;
    outcome.map(|(phase, _)| phase)
}

/// The run with child processes (`--chaos`, `--instances`, `--kill-every`): the executor as
/// `serve` processes, faults injected while the load runs, then the audit. The processes,
/// their vhost and their database are gone when this returns; their logs are kept.
async fn chaos_phase(
    plan: Option<&chaos::ChaosPlan>,
    args: &BenchArgs,
    config: &Config,
    workload: &Arc<Workload>,
) -> Result<(Phase, chaos::ChaosReport, Option<soak::SoakReport>), BenchError> {
    if config.executor.durability != Durability::Ledger {
        return Err(BenchError::Usage(
            "--chaos, --instances and --soak need the Postgres ledger (executor.durability: \
             ledger)"
                .to_owned(),
        ));
    }
    let seed = args
        .chaos_seed
        .unwrap_or_else(|| crate::tools::XorShift::seeded().next_u64());
    let serve_bin = match &args.serve_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| BenchError::Usage(format!("cannot find this binary: {e}")))?,
    };
    let postgres_restart = args
        .postgres_restart
        .as_deref()
        .map_or_else(chaos::ChaosSettings::default_postgres_restart, |c| {
            c.split_whitespace().map(str::to_owned).collect()
        });
    let instances = usize::from(args.instances.unwrap_or(1));
    let settings = chaos::ChaosSettings {
        seed,
        serve_bin,
        dir: args
            .chaos_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join(format!("fifo-chaos-{}", run_id()))),
        postgres_restart: postgres_restart.clone(),
        instances,
        start_timeout: Duration::from_secs(args.start_timeout),
        env: args.soak_plan().map(|p| p.env()).unwrap_or_default(),
    };
    let ct = chaos::start_target(config, args.config.as_deref(), workload, &settings).await?;
    let fleet = ct.instances.clone();
    let (stop_supervisor, supervisor_stop) = watch::channel(false);
    let supervisor = tokio::spawn(fleet.clone().supervise(supervisor_stop));
    let outcome = async {
        let pids = fleet.all.iter().map(|i| i.pid.clone()).collect();
        let mut target = Target::process(&ct.url, pids).await?;
        let mut rng = crate::tools::XorShift::new(seed);
        let schedule = plan.map(|p| p.schedule(&mut rng)).unwrap_or_default();
        let planned = schedule.len() as u64;
        let heartbeat = u64::from(config.rabbitmq.heartbeat_seconds);
        let run = ChaosRun {
            schedule,
            kill_every: args.kill_every,
            faults: Arc::new(chaos::ChaosFaults {
                instances: fleet.clone(),
                vhost_name: ct.vhost_name.clone(),
                postgres_restart,
                stop_for: args
                    .stop_for
                    .unwrap_or(Duration::from_secs(2 * heartbeat + 3)),
                action_partitions: workload
                    .actions
                    .iter()
                    .map(|a| crate::cluster::partition_of_ref(&a.name, config.cluster.partitions))
                    .collect(),
            }),
            rng,
            injections: Arc::new(std::sync::Mutex::new(Vec::new())),
            soak: args.soak.map(|_| soak::Sampler {
                probe: soak::Probe {
                    pid: fleet.all[0].pid.clone(),
                    api: fleet.all[0].api,
                    vhost: ct.vhost_name.clone(),
                    amqp_url: ct.url.clone(),
                    database_url: ct.database_url.clone(),
                },
                every: args.sample_every,
                samples: Arc::new(std::sync::Mutex::new(Vec::new())),
            }),
        };
        let injections = run.injections.clone();
        let samples = run.soak.as_ref().map(|s| s.samples.clone());
        let broker_faults = plan.is_some_and(|p| {
            p.counts
                .iter()
                .any(|(k, n)| *k == chaos::FaultKind::Broker && *n > 0)
        });
        let driven = drive("executor", &mut target, config, workload, args, Some(run)).await;
        target.stop().await;
        // A fault cut short by the end of the run must not leave the broker or an executor
        // down (or stopped) for the audit.
        if broker_faults && let Err(e) = chaos::start_broker_app().await {
            tracing::warn!(error = %e, "could not make sure RabbitMQ's app runs");
        }
        fleet.resume_all().await;
        let _ = stop_supervisor.send(true);
        let _ = supervisor.await;
        fleet.ensure_running().await;
        let (mut phase, collector) = driven?;
        let soak = match (args.soak_plan(), samples) {
            (Some(plan), Some(samples)) => {
                let samples = std::mem::take(
                    &mut *samples
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner),
                );
                let steady = workload.rolling.map_or(0, |r| r.steady);
                Some(soak::SoakReport::new(&plan, steady, samples))
            }
            _ => None,
        };
        let mut injections: Vec<chaos::Injection> = injections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        injections.sort_by_key(|i| i.began);
        let audit = chaos::audit(
            &ct.database_url,
            &ct.url,
            &collector.outcomes(),
            collector.id_range(),
            Duration::from_secs(60),
        )
        .await;
        let exits = fleet.exits();
        let mut found: Vec<String> = exits
            .iter()
            .filter(|e| !e.expected)
            .map(|e| {
                format!(
                    "{} exited by itself ({}) in its life {}",
                    e.instance, e.status, e.life
                )
            })
            .collect();
        let audit = match audit {
            Ok(a) => {
                found.extend(a.violations());
                Some(a)
            }
            Err(e) => {
                found.push(format!(
                    "audit: could not read the ledger or the broker: {e}"
                ));
                None
            }
        };
        phase.violations_total += found.len() as u64;
        phase.violations.extend(found);
        let (start, end) = collector.span();
        let mut faults = chaos::fault_reports(&injections, &collector.dispatch_log(), start, end);
        for (report, injection) in faults.iter_mut().zip(&injections) {
            if injection.kind == chaos::FaultKind::Stop
                && let Some(w) = &injection.watch
            {
                report.fenced = fence_evidence(&fleet, w, &exits).await;
            }
        }
        // A fault counts when there was work on the instance's partitions: waiting at the
        // fault, or dispatched after it.
        let failover = instances::FailoverSummary::of(
            &faults
                .iter()
                .filter(|f| f.failover_ms.is_some() || f.partitions_waiting.is_some_and(|n| n > 0))
                .map(|f| f.failover_ms)
                .collect::<Vec<_>>(),
        );
        let scheduled = injections.iter().filter(|i| !i.periodic).count() as u64;
        let report = chaos::ChaosReport {
            plan: plan
                .map(|p| {
                    p.counts
                        .iter()
                        .map(|(k, n)| format!("{}:{n}", k.name()))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_else(|| "none".to_owned()),
            seed,
            dir: settings.dir.display().to_string(),
            faults,
            not_injected: planned.saturating_sub(scheduled),
            executor_starts: fleet.starts().await,
            instances,
            failover,
            exits,
            audit,
            completions_reported_again: collector.reports_again(),
            redelivered: phase.redelivered,
        };
        Ok::<_, BenchError>((phase, report, soak))
    }
    .await;
    let _ = stop_supervisor.send(true);
    fleet.stop(Duration::from_secs(30)).await;
    ct.vhost.delete().await;
    ct.database.drop_it().await;
    outcome
}

/// What shows that the instance a `stop` hit was fenced once it woke: the exit of that life
/// with status 3, its `attune_fenced_writes_total` if that life still runs, a line of its log.
async fn fence_evidence(
    fleet: &instances::Instances,
    watch: &instances::Watch,
    exits: &[instances::Exit],
) -> Vec<String> {
    let mut evidence: Vec<String> = exits
        .iter()
        .filter(|e| e.instance == watch.instance && e.life == watch.life && e.expected)
        .map(|e| format!("exited: {}", e.status))
        .collect();
    if let Some(i) = fleet.all.iter().find(|i| i.id == watch.instance)
        && i.process.lock().await.lives() == watch.life
        && let Some(n) = i.fenced_writes().await
        && n > 0.0
    {
        evidence.push(format!("attune_fenced_writes_total {n}"));
    }
    if let Some(line) = watch.log.as_deref().and_then(instances::fence_in_log) {
        evidence.push(format!("log: {line}"));
    }
    evidence
}

/// What `drive` needs to inject the chaos run's faults.
struct ChaosRun {
    schedule: Vec<(chaos::FaultKind, f64)>,
    /// `--kill-every`.
    kill_every: Option<Duration>,
    faults: Arc<chaos::ChaosFaults>,
    rng: crate::tools::XorShift,
    /// What was injected so far; the injectors add to it as they go.
    injections: Arc<std::sync::Mutex<Vec<chaos::Injection>>>,
    /// `--soak`: samples the executor while the load runs.
    soak: Option<soak::Sampler>,
}

async fn drive(
    name: &str,
    target: &mut Target,
    config: &Config,
    workload: &Arc<Workload>,
    args: &BenchArgs,
    chaos: Option<ChaosRun>,
) -> Result<(Phase, Arc<Collector>), BenchError> {
    let url = target.url().to_owned();
    target
        .wait_until_consuming(Duration::from_secs(args.start_timeout))
        .await?;
    // Ids above everything a previous run (or the executor itself) used: Unix microseconds.
    let base = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(1);
    let collector = Arc::new(Collector::new(
        workload,
        base,
        Duration::from_millis(args.interval_ms),
        target.has_limits(),
    ));
    let workers = Workers::connect(
        &url,
        WorkerSettings {
            queue: format!("fifo-executor.bench.{}", run_id()),
            prefetch: worker_prefetch(args, config, workload),
            duration: workload.duration,
            failure_rate: workload.failure_rate,
        },
    )
    .await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let workers = tokio::spawn(workers.run(collector.clone(), stop_rx));

    let cpu_before = target.threads_cpu();
    let target_cpu_before = target.cpu();
    let peak_reset = target.reset_rss_peak();
    let rss_start = target.rss();
    let mut rss_after_warmup = None;
    // The per-fault figures need every dispatch's arrival; a soak has no faults.
    if chaos.as_ref().is_some_and(|c| c.soak.is_none()) {
        collector.keep_dispatch_log();
    }
    let mut producers = tokio::spawn(load::produce(
        url.clone(),
        workload.clone(),
        base,
        config.rabbitmq.confirm_window,
        collector.clone(),
    ));
    let mut injectors = Vec::new();
    if let Some(mut c) = chaos {
        if let Some(sampler) = c.soak.take() {
            injectors.push(tokio::spawn(sampler.run(collector.clone())));
        }
        if let Some(every) = c.kill_every {
            // Its own stream of random pauses, drawn from the run's seed.
            let rng = crate::tools::XorShift::new(c.rng.next_u64());
            injectors.push(tokio::spawn(chaos::kill_periodically(
                every,
                c.faults.clone(),
                collector.clone(),
                rng,
                c.injections.clone(),
            )));
        }
        injectors.push(tokio::spawn(chaos::inject(
            c.schedule,
            c.faults,
            collector.clone(),
            c.rng,
            c.injections,
        )));
    }
    let progress = progress_bar(args, name, collector.total());
    // A soak's phase takes its duration, and --timeout on top.
    let deadline = tokio::time::Instant::now()
        + Duration::from_secs(args.timeout)
        + args.soak.unwrap_or_default();
    let mut ticks = tokio::time::interval(TICK);
    let mut produced = false;
    let mut timed_out = false;
    let mut produce_error = None;
    while !collector.finished() {
        tokio::select! {
            _ = collector.done.notified() => {}
            _ = ticks.tick() => {}
            _ = tokio::time::sleep_until(deadline) => { timed_out = true; break; }
            r = &mut producers, if !produced => {
                produced = true;
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => { produce_error = Some(e); break; }
                    Err(join) => { produce_error = Some(LoadError::Task(join)); break; }
                }
            }
        }
        let done = collector.completed();
        progress.set_position(done);
        if let Some((rss, _)) = target.rss() {
            collector.sample_rss(rss);
            if rss_after_warmup.is_none() && done * 5 >= collector.total() {
                rss_after_warmup = Some(rss);
            }
        }
    }
    progress.finish_and_clear();
    for injector in injectors {
        // Done by now unless the run ended or stalled before the last fault was due; what
        // it injected is already recorded.
        injector.abort();
        let _ = injector.await;
    }
    let cpu_after = target.threads_cpu();
    let target_cpu_after = target.cpu();
    let rss_end = target.rss();
    let _ = stop_tx.send(true);
    if !produced {
        producers.abort();
    }
    if let Ok(Err(e)) = workers.await {
        tracing::warn!(error = %e, "the simulated workers stopped with an error");
    }
    if let Some(e) = produce_error {
        return Err(e.into());
    }

    let collected = collector.finish();
    let by_thread = measure::cpu_delta(&cpu_before, &cpu_after);
    let executor_s = match (target_cpu_before, target_cpu_after) {
        (Some(b), Some(a)) => Some((a - b).max(0.0)),
        _ => None,
    };
    let load_generator_s = by_thread.values().sum::<f64>() - measure::executor_seconds(&by_thread);
    let completed = collected.completed;
    let elapsed = collected.elapsed.as_secs_f64();
    let mut violations: Vec<String> = collected
        .violations
        .iter()
        .map(ToString::to_string)
        .collect();
    if timed_out {
        violations.push(format!(
            "timeout: {} of {} executions completed within --timeout {} s (submitted {})",
            completed,
            collector.total(),
            args.timeout,
            collected.submitted
        ));
    }
    let phase = Phase {
        name: name.to_owned(),
        executions: collector.total(),
        completed,
        failed: collected.failed,
        resends: collected.resends,
        raised_unseen: collected.raised_unseen,
        redelivered: collected.redelivered,
        foreign: collected.foreign,
        elapsed_s: elapsed,
        throughput: if elapsed > 0.0 {
            completed as f64 / elapsed
        } else {
            0.0
        },
        queue_wait: measure::Percentiles::of(&collected.queue_wait),
        completion_to_dispatch: measure::Percentiles::of(&collected.completion_to_dispatch),
        completion_to_admission: measure::Percentiles::of(&collected.to_admission),
        admission_to_worker: measure::Percentiles::of(&collected.from_admission),
        cpu: Cpu {
            counted: target.cpu_counted().to_owned(),
            executor_s,
            load_generator_s,
            executor_us_per_execution: executor_s
                .filter(|_| completed > 0)
                .map(|s| s * 1e6 / completed as f64),
            by_thread,
        },
        memory: Memory {
            counted: target.rss_counted().to_owned(),
            rss_start_kb: rss_start.map(|r| r.0),
            rss_after_warmup_kb: rss_after_warmup,
            rss_end_kb: rss_end.map(|r| r.0),
            rss_peak_kb: rss_end.map(|r| r.1),
            peak_since: if peak_reset {
                "phase start"
            } else {
                "process start"
            }
            .to_owned(),
        },
        timeline: collected.timeline.buckets(collected.elapsed),
        violations,
        violations_total: collected.violations_total + u64::from(timed_out),
        timed_out,
    };
    Ok((phase, collector))
}

fn progress_bar(args: &BenchArgs, name: &str, total: u64) -> indicatif::ProgressBar {
    if args.no_progress {
        return indicatif::ProgressBar::hidden();
    }
    // Drawn on standard error, and only when it is a terminal (indicatif's default).
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {per_sec} eta {eta}",
    ) {
        bar.set_style(style);
    }
    bar.set_prefix(name.to_owned());
    bar
}
