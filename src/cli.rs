//! The command line: `serve` runs the service; the rest are tools around it.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::app::{self, Service};
use crate::config::Config;
use crate::tools::{submit, worker};

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
        /// Simulated duration in milliseconds, `MIN` or `MIN-MAX`.
        #[arg(long, default_value = "100")]
        duration_ms: String,
        /// Share of executions reported as failed (0 to 1).
        #[arg(long, default_value_t = 0.0)]
        failure_rate: f64,
    },
}

fn load(config: Option<&PathBuf>) -> anyhow::Result<Config> {
    Config::load(config.map(PathBuf::as_path)).map_err(|e| anyhow::anyhow!("{e}"))
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.logging.filter));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if config.logging.json {
        let _ = builder.json().try_init();
    } else {
        let _ = builder.try_init();
    }
}

fn parse_range(s: &str) -> anyhow::Result<(Duration, Duration)> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let a: u64 = a
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("--duration-ms: {s:?} is not MIN or MIN-MAX"))?;
    let b: u64 = b
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("--duration-ms: {s:?} is not MIN or MIN-MAX"))?;
    Ok((
        Duration::from_millis(a.min(b)),
        Duration::from_millis(a.max(b)),
    ))
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { config } => {
            let config = load(config.as_ref())?;
            init_logging(&config);
            tracing::info!(durability = ?config.executor.durability, "starting fifo-executor");
            if config.executor.durability == crate::config::Durability::Ledger {
                // Said loudly because it is what operators rely on: until the Postgres ledger
                // is wired in, a crash or restart loses what is queued.
                tracing::warn!(
                    "executor.durability is `ledger`, but the Postgres ledger is not wired into \
                     `serve` yet: running in memory mode; queued executions do not survive a restart"
                );
            }
            let service = Service::start(config).await?;
            service.run_until(app::termination_signal()).await?;
            tracing::info!("fifo-executor stopped");
            Ok(())
        }
        Command::CheckConfig { config } => {
            let config = load(config.as_ref())?;
            println!("{config:#?}");
            Ok(())
        }
        Command::Submit {
            config,
            action,
            count,
            parameters,
            rate,
            first_id,
        } => {
            let config = load(config.as_ref())?;
            let parameters: serde_json::Value = serde_json::from_str(&parameters)
                .map_err(|e| anyhow::anyhow!("--parameters is not JSON: {e}"))?;
            anyhow::ensure!(parameters.is_object(), "--parameters must be a JSON object");
            crate::model::validate_action_ref(&action)
                .map_err(|e| anyhow::anyhow!("--action: {e}"))?;
            let took = submit::run(&submit::SubmitOptions {
                url: config.rabbitmq.url.clone(),
                action,
                count,
                parameters,
                rate,
                first_id,
            })
            .await?;
            println!(
                "submitted {count} requests in {:.3}s ({:.0}/s)",
                took.as_secs_f64(),
                count as f64 / took.as_secs_f64().max(1e-9)
            );
            Ok(())
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
            init_logging(&config);
            let (min_duration, max_duration) = parse_range(&duration_ms)?;
            anyhow::ensure!(
                (0.0..=1.0).contains(&failure_rate),
                "--failure-rate must be between 0 and 1"
            );
            let done = worker::run(
                &worker::WorkerOptions {
                    url: config.rabbitmq.url.clone(),
                    actions,
                    queue,
                    concurrency,
                    min_duration,
                    max_duration,
                    failure_rate,
                },
                app::termination_signal(),
            )
            .await?;
            println!("worker completed {done} executions");
            Ok(())
        }
    }
}
