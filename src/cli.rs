//! The command line: `serve` runs the service; the rest are tools around it. The operators'
//! commands (`stats`, `health`, `purge`, `dlq`) talk to a running service over its HTTP API
//! (`api.listen` from the config, or `--url`) and send `api.admin_token` (from the config or
//! `ATTUNE__API__ADMIN_TOKEN`) to the endpoints that need it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::Value;

use crate::app::{self, Hooks, Service};
use crate::config::Config;
use crate::http::client::Client;
use crate::ops::readiness::Readiness;
use crate::ops::reload::Reloader;
use crate::tools::ops::{self, render};
use crate::tools::{DurationDist, bench, submit, worker};

#[derive(Debug, Parser)]
#[command(
    name = "fifo-executor",
    version,
    about = "Per-action FIFO execution queues over RabbitMQ"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the executor.
    Serve {
        /// YAML config file; without one, built-in defaults and ATTUNE__ variables apply.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Load and validate a config file, print the result (secrets redacted) and exit.
    CheckConfig {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Publish execution requests (a producer).
    Submit {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Action ref to request.
        #[arg(long)]
        action: String,
        #[arg(long, default_value_t = 1)]
        count: u64,
        /// JSON object sent as `parameters`.
        #[arg(long, default_value = "{}")]
        parameters: String,
        /// Requests per second (flat out when absent).
        #[arg(long)]
        rate: Option<f64>,
        /// Give requests execution ids starting here (otherwise the executor assigns them).
        #[arg(long)]
        first_id: Option<u64>,
        /// Spread the requests over N actions, `<action>.0` to `<action>.<N-1>` in turn
        /// (`--count 100000 --spread 100000`: 100,000 actions, one request each).
        #[arg(long)]
        spread: Option<u64>,
    },
    /// Consume dispatches and publish completions (a simulated worker).
    Worker {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Action ref to take, or `#` for all.
        #[arg(long, default_value = "#")]
        actions: String,
        /// The worker's own queue name.
        #[arg(long, default_value = "fifo-executor.worker")]
        queue: String,
        #[arg(long, default_value_t = 10)]
        concurrency: u16,
        /// Simulated duration in milliseconds: `MS`, `MIN-MAX` or `exp:MEAN`.
        #[arg(long, default_value = "100")]
        duration_ms: String,
        /// Share of executions reported as failed (0 to 1).
        #[arg(long, default_value_t = 0.0)]
        failure_rate: f64,
    },
    /// The FIFO-ordering load benchmark: drives an executor (in-process or running) through
    /// RabbitMQ, checks order, limits and exactly-once completion, and reports throughput,
    /// latency, CPU and memory, optionally against the bare broker's ceiling.
    Bench(Box<bench::BenchArgs>),
    /// Queue statistics of one action, or of every action (longest queues first).
    Stats {
        /// Action ref; all actions when left out.
        action: Option<String>,
        /// What the list of all actions is sorted by, descending.
        #[arg(long, value_enum, default_value_t = SortBy::QueueLength)]
        sort: SortBy,
        /// Most actions listed.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// The latest health check. Exit status as a Nagios check: 0 healthy, 1 degraded,
    /// 2 unhealthy, 3 when the service cannot be asked.
    Health {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Run one purge cycle now (needs the admin token). Without --dry-run or --live, the
    /// service's purge.dry_run decides.
    Purge {
        /// Only report what would be purged.
        #[arg(long, conflicts_with = "live")]
        dry_run: bool,
        /// Purge for real even if purge.dry_run is set.
        #[arg(long)]
        live: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// The dead-letter queue (needs the admin token).
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Entries from the head of attune.dlq, oldest first; they stay in the queue.
    List {
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Dead letters by origin and error class.
    Stats {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Publish entries again as new execution requests, then remove them from the DLQ.
    Replay {
        /// Execution ids to replay (repeat, or separate with commas).
        #[arg(
            long = "id",
            value_delimiter = ',',
            required_unless_present = "limit",
            conflicts_with = "limit"
        )]
        ids: Vec<u64>,
        /// Replay the first N entries (those that cannot be replayed are skipped and stay).
        #[arg(long)]
        limit: Option<usize>,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// How `stats` sorts all actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SortBy {
    QueueLength,
    ActiveCount,
    Oldest,
}

impl SortBy {
    fn as_query(self) -> &'static str {
        match self {
            SortBy::QueueLength => "queue_length",
            SortBy::ActiveCount => "active_count",
            SortBy::Oldest => "oldest",
        }
    }
}

/// Where the running service is and how to print its answers.
#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// The service's config file: gives api.listen and api.admin_token.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The service's address, `http://host:port`, instead of api.listen.
    #[arg(long)]
    pub url: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl ApiArgs {
    /// A client for the service; with the admin token when `admin`.
    fn client(&self, admin: bool) -> anyhow::Result<Client> {
        let config = load(self.config.as_ref())?;
        let client = match &self.url {
            Some(url) => Client::for_url(url)?,
            None => Client::for_listen_address(config.api.listen),
        };
        let token = if admin {
            let token = config.api.admin_token.map(|t| t.expose().to_owned());
            anyhow::ensure!(
                token.is_some(),
                "this command needs the admin token: set api.admin_token in --config or \
                 ATTUNE__API__ADMIN_TOKEN"
            );
            token
        } else {
            None
        };
        Ok(client.with_token(token))
    }

    /// Prints the answer as JSON or through `table`.
    fn print(&self, answer: &Value, table: fn(&Value) -> String) {
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(answer).unwrap_or_else(|_| answer.to_string())
            );
        } else {
            println!("{}", table(answer));
        }
    }
}

fn load(config: Option<&PathBuf>) -> anyhow::Result<Config> {
    Config::load(config.map(PathBuf::as_path)).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Runs `serve` until SIGINT or SIGTERM (or a fatal error). SIGHUP reloads the configuration.
async fn serve(config_path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let reloader = Reloader::from_file(config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let config = reloader.in_force().await;
    let log_filter = crate::ops::logging::init(&config.logging);
    let reloader = Arc::new(reloader.with_log_filter(log_filter));
    // Before anything slow: until it is installed, a SIGHUP would end the process.
    #[cfg(unix)]
    let hangups = crate::ops::reload::reload_on_hangup(reloader.clone())
        .map_err(|e| anyhow::anyhow!("cannot listen for SIGHUP: {e}"))?;
    // From now on a SIGTERM waits for the graceful stop, also one during start.
    let mut termination = app::Termination::listen();
    tracing::info!(durability = ?config.executor.durability, "starting fifo-executor");
    let shared = config.cluster.mode == crate::config::ClusterMode::Shared;
    // Type=notify under systemd: READY=1 once consuming, STOPPING=1 at a graceful stop.
    let notifier = crate::ops::systemd::Notifier::from_env().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "NOTIFY_SOCKET is set but unusable; systemd is not told of readiness");
        None
    });
    let readiness = Arc::new(Readiness::new(notifier));
    let stopped = loop {
        // A start-over uses the configuration in force: what it started with and what
        // reloads applied since (keys that need a restart keep their values until one).
        let start = Service::start_reporting(reloader.clone(), Hooks::default(), readiness.clone());
        let service = tokio::select! {
            service = start => match service {
                Ok(service) => service,
                Err(e) => break Err(e.into()),
            },
            // Stopped while starting (waiting for Postgres, recovering, waiting for the first
            // session): the start is dropped where it is, as the default SIGTERM action did
            // before; anything the edge took in its first seconds goes back to the broker with
            // its connection, as after a crash.
            () = termination.recv() => {
                readiness.stopping();
                tracing::info!("stopped while starting");
                break Ok(ExitCode::SUCCESS);
            }
        };
        let signal = async {
            termination.recv().await;
            readiness.stopping();
        };
        match service.run_until(signal).await {
            // Shared: the instance drops everything it held and starts over as a
            // standby; the broker hands it partitions again when their owners go.
            Err(e) if shared && e.calls_for_a_new_start() => {
                tracing::warn!(error = %e, "starting over as a standby of every partition");
                metrics::counter!("attune_instance_restarts_total").increment(1);
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                continue;
            }
            // Single: not a failure to restart from: another instance owns the
            // partitions now, and a restart would only take them back (the systemd
            // unit does not restart on it).
            Err(e @ app::AppError::Fenced) => {
                tracing::error!("{e}");
                break Ok(ExitCode::from(app::FENCED_EXIT_STATUS));
            }
            Err(e) => break Err(e.into()),
            Ok(()) => break Ok(ExitCode::SUCCESS),
        }
    };
    #[cfg(unix)]
    hangups.abort();
    if matches!(stopped, Ok(ExitCode::SUCCESS)) {
        tracing::info!("fifo-executor stopped");
    }
    stopped
}
/// Runs a command; the exit status is success unless the command says otherwise (`health`).
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Stats {
            action,
            sort,
            limit,
            api,
        } => {
            let client = api.client(false)?;
            let answer = ops::stats(&client, action.as_deref(), sort.as_query(), limit).await?;
            if action.is_some() {
                api.print(&answer, |a| render::queue(&a["data"]));
            } else {
                api.print(&answer, render::queues);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Health { api } => {
            let client = api.client(false)?;
            match ops::health(&client).await {
                Ok(answer) => {
                    api.print(&answer, render::health);
                    Ok(ExitCode::from(match answer["status"].as_str() {
                        Some("healthy") => 0,
                        Some("degraded") => 1,
                        Some("unhealthy") => 2,
                        _ => 3,
                    }))
                }
                Err(e) => {
                    eprintln!("fifo-executor: UNKNOWN: {e}");
                    Ok(ExitCode::from(3))
                }
            }
        }
        Command::Purge { dry_run, live, api } => {
            let client = api.client(true)?;
            let mode = match (dry_run, live) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            };
            api.print(&ops::purge(&client, mode).await?, render::purge);
            Ok(ExitCode::SUCCESS)
        }
        Command::Dlq { command } => {
            match command {
                DlqCommand::List { limit, api } => {
                    let answer = ops::dlq_list(&api.client(true)?, limit).await?;
                    api.print(&answer, render::dlq_list);
                }
                DlqCommand::Stats { api } => {
                    let answer = ops::dlq_stats(&api.client(true)?).await?;
                    api.print(&answer, render::dlq_stats);
                }
                DlqCommand::Replay { ids, limit, api } => {
                    let answer = ops::dlq_replay(&api.client(true)?, &ids, limit).await?;
                    api.print(&answer, render::replay);
                }
            }
            Ok(ExitCode::SUCCESS)
        }

        Command::Serve { config } => serve(config.as_deref()).await,
        Command::Bench(args) => {
            // The in-process executor logs warnings and errors only: the summary is the output.
            // lapin logs every closed channel as an error, and the probe that waits for the
            // executor's queue closes one each time the queue does not exist yet.
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,lapin=off"));
            let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
            bench::main(*args).await
        }
        Command::CheckConfig { config } => {
            let config = load(config.as_ref())?;
            println!("{config:#?}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Submit {
            config,
            action,
            count,
            parameters,
            rate,
            first_id,
            spread,
        } => {
            let config = load(config.as_ref())?;
            let parameters: serde_json::Value = serde_json::from_str(&parameters)
                .map_err(|e| anyhow::anyhow!("--parameters is not JSON: {e}"))?;
            anyhow::ensure!(parameters.is_object(), "--parameters must be a JSON object");
            let widest = match spread {
                Some(n) if n > 0 => format!("{action}.{}", n - 1),
                _ => action.clone(),
            };
            crate::model::validate_action_ref(&widest)
                .map_err(|e| anyhow::anyhow!("--action: {e}"))?;
            let took = submit::run(&submit::SubmitOptions {
                url: config.rabbitmq.url.clone(),
                tls: config.rabbitmq.tls.clone(),
                cluster: config.cluster.clone(),
                action,
                count,
                parameters,
                rate,
                first_id,
                spread,
            })
            .await?;
            println!(
                "submitted {count} requests in {:.3}s ({:.0}/s)",
                took.as_secs_f64(),
                count as f64 / took.as_secs_f64().max(1e-9)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Worker {
            config,
            actions,
            queue,
            concurrency,
            duration_ms,
            failure_rate,
        } => {
            let config = load(config.as_ref())?;
            // The worker's filter never changes.
            drop(crate::ops::logging::init(&config.logging));
            let duration = DurationDist::parse_ms(&duration_ms)
                .map_err(|e| anyhow::anyhow!("--duration-ms: {e}"))?;
            anyhow::ensure!(
                (0.0..=1.0).contains(&failure_rate),
                "--failure-rate must be between 0 and 1"
            );
            let done = worker::run(
                &worker::WorkerOptions {
                    url: config.rabbitmq.url.clone(),
                    tls: config.rabbitmq.tls.clone(),
                    actions,
                    queue,
                    concurrency,
                    duration,
                    failure_rate,
                },
                app::termination_signal(),
            )
            .await?;
            println!("worker completed {done} executions");
            Ok(ExitCode::SUCCESS)
        }
    }
}
