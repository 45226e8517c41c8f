//! `fifo-executor bench --soak DURATION --rate R`: the executor as a `serve` child process
//! (ledger on, in a vhost and a database of the run's own) under a fixed rate for a long
//! while, with what it holds sampled every `--sample-every` and the growth of each series
//! after the warm-up given as a least-squares slope per hour.
//!
//! The workload ([`super::plan::Workload::soak`]) has steady actions that run all along and
//! `--soak-actions` short-lived ones, each used `--soak-uses` times within a second or so and
//! then never again, spread over the whole soak: what an action seen once leaves behind shows
//! in the slopes. A sample reads the `serve` process's RSS (`/proc/<pid>/status`) and open
//! file descriptors (`/proc/<pid>/fd`), the Postgres connections to the run's database
//! (`pg_stat_activity`), the channels of the executor's own connections to the run's vhost
//! (`rabbitmqctl list_connections`, the bench's own left out), the DLQ's depth (a passive
//! declare of `attune.dlq`), the requests waiting in the broker for the executor to take them
//! (the same of the requests queue) and, from `GET /api/v1/overview`, what is queued and running and
//! how many actions the executor knows and how many of them have an actor.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::load::Collector;
use super::measure;
use super::report::{self, Report, Series};
use crate::rabbit::topology;

/// How long one question (HTTP, Postgres, rabbitmqctl, the broker) of a sample may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Connection names of the bench's own broker connections start with this.
const BENCH_CONNECTIONS: &str = "fifo-executor bench";

/// The soak's shape, from the command line.
#[derive(Debug, Clone)]
pub struct SoakPlan {
    pub duration: Duration,
    pub sample_every: Duration,
    /// Samples before this are left out of the slopes.
    pub warmup: Duration,
    /// Short-lived actions, each used `uses` times.
    pub distinct: u32,
    pub uses: u64,
    /// `executor.queue.passivate_after_seconds` and `metrics_idle_after_seconds` of the
    /// soak's executor.
    pub idle_after: Duration,
    /// `executor.remember_ended_ids` of the soak's executor.
    pub remember_ended: usize,
}

impl SoakPlan {
    /// The `ATTUNE__` variables the soak's executor runs with: short idle times, so that an
    /// hour shows the steady state of actions that come and go.
    pub fn env(&self) -> Vec<(String, String)> {
        let idle = self.idle_after.as_secs().max(1).to_string();
        vec![
            (
                "ATTUNE__EXECUTOR__QUEUE__PASSIVATE_AFTER_SECONDS".to_owned(),
                idle.clone(),
            ),
            (
                "ATTUNE__EXECUTOR__QUEUE__METRICS_IDLE_AFTER_SECONDS".to_owned(),
                idle,
            ),
            (
                "ATTUNE__EXECUTOR__REMEMBER_ENDED_IDS".to_owned(),
                self.remember_ended.to_string(),
            ),
        ]
    }
}

/// One sample; `None` where the reading failed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sample {
    /// Seconds since the sampler started (just before the first request).
    pub t_s: f64,
    pub rss_kb: Option<u64>,
    pub fds: Option<u64>,
    pub pg_connections: Option<u64>,
    /// Channels of the executor's connections to the run's vhost.
    pub channels: Option<u64>,
    pub dlq: Option<u64>,
    /// Requests waiting in `attune.execution.requests.queue` (not yet taken by the
    /// executor): grows when the executor does not keep up with the rate.
    pub requests_waiting: Option<u64>,
    pub queued: Option<u64>,
    pub running: Option<u64>,
    /// Actions the executor holds counters of (with an actor or retired).
    pub actions_known: Option<u64>,
    pub actors_awake: Option<u64>,
    pub actors_retired: Option<u64>,
    /// Executions completed so far.
    pub completed: u64,
}

/// The series the summary gives a slope of: (name, unit, reading).
type Reading = fn(&Sample) -> Option<f64>;
const SERIES: [(&str, &str, Reading); 11] = [
    ("rss", "MB", |s| s.rss_kb.map(|kb| kb as f64 / 1024.0)),
    ("fds", "", |s| s.fds.map(|v| v as f64)),
    ("pg_connections", "", |s| s.pg_connections.map(|v| v as f64)),
    ("channels", "", |s| s.channels.map(|v| v as f64)),
    ("dlq", "", |s| s.dlq.map(|v| v as f64)),
    ("requests_waiting", "", |s| {
        s.requests_waiting.map(|v| v as f64)
    }),
    ("queued", "", |s| s.queued.map(|v| v as f64)),
    ("running", "", |s| s.running.map(|v| v as f64)),
    ("actions_known", "", |s| s.actions_known.map(|v| v as f64)),
    ("actors_awake", "", |s| s.actors_awake.map(|v| v as f64)),
    ("actors_retired", "", |s| s.actors_retired.map(|v| v as f64)),
];

/// One series over the soak.
#[derive(Debug, Clone, Serialize)]
pub struct Trend {
    pub series: String,
    pub unit: String,
    pub first: Option<f64>,
    pub last: Option<f64>,
    pub max: Option<f64>,
    /// Least-squares slope per hour over the samples after the warm-up (`None`: fewer than
    /// two of them).
    pub slope_per_hour: Option<f64>,
    /// Mean after the warm-up.
    pub mean_after_warmup: Option<f64>,
    /// Samples after the warm-up the slope is of.
    pub samples_after_warmup: usize,
}

/// The soak part of the report.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub duration_s: f64,
    pub sample_every_s: f64,
    pub warmup_s: f64,
    pub steady_actions: usize,
    /// Short-lived actions, each used `uses` times.
    pub distinct_actions: u32,
    pub uses: u64,
    pub idle_after_s: u64,
    pub remember_ended: usize,
    pub trends: Vec<Trend>,
    pub samples: Vec<Sample>,
}

impl SoakReport {
    pub fn new(plan: &SoakPlan, steady_actions: usize, samples: Vec<Sample>) -> Self {
        let warmup_s = plan.warmup.as_secs_f64();
        let trends = SERIES
            .iter()
            .map(|(name, unit, read)| trend(name, unit, &samples, warmup_s, *read))
            .collect();
        Self {
            duration_s: plan.duration.as_secs_f64(),
            sample_every_s: plan.sample_every.as_secs_f64(),
            warmup_s,
            steady_actions,
            distinct_actions: plan.distinct,
            uses: plan.uses,
            idle_after_s: plan.idle_after.as_secs(),
            remember_ended: plan.remember_ended,
            trends,
            samples,
        }
    }

    /// The soak's lines of the summary.
    pub fn summary(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "soak: {:.0} s, {} steady actions and {} short-lived ones used {} times each, \
             idle after {} s, {} ended ids remembered; {} samples every {:.0} s, slopes after \
             a {:.0} s warm-up",
            self.duration_s,
            self.steady_actions,
            self.distinct_actions,
            self.uses,
            self.idle_after_s,
            self.remember_ended,
            self.samples.len(),
            self.sample_every_s,
            self.warmup_s
        );
        for line in self.trend_lines() {
            let _ = writeln!(out, "soak:   {line}");
        }
        let _ = writeln!(out, "soak: {}", self.actions_line());
    }

    /// The actions the soak used, and what the executor held of them at the last sample.
    pub fn actions_line(&self) -> String {
        let last = self.samples.last();
        let f = |v: Option<u64>| v.map_or("?".to_owned(), |v| v.to_string());
        format!(
            "actions used {} ({} steady, {} short-lived); at the last sample the executor knew \
             {}, {} with an actor, {} retired",
            self.steady_actions + self.distinct_actions as usize,
            self.steady_actions,
            self.distinct_actions,
            f(last.and_then(|s| s.actions_known)),
            f(last.and_then(|s| s.actors_awake)),
            f(last.and_then(|s| s.actors_retired)),
        ) + &self
            .bytes_per_known_action()
            .map(|b| format!("; RSS grew {b:.0} bytes per action known more (slope ÷ slope)"))
            .unwrap_or_default()
    }

    /// The RSS slope divided by the slope of the actions known, after the warm-up: what
    /// each action the executor came to know cost in memory, if the actions known grew.
    pub fn bytes_per_known_action(&self) -> Option<f64> {
        let slope_of = |name: &str| {
            self.trends
                .iter()
                .find(|t| t.series == name)
                .and_then(|t| t.slope_per_hour)
        };
        let rss_mb = slope_of("rss")?;
        let known = slope_of("actions_known").filter(|k| *k > 0.0)?;
        Some(rss_mb * 1024.0 * 1024.0 / known)
    }

    /// One line per series: first, last, max, mean and slope after the warm-up.
    pub fn trend_lines(&self) -> Vec<String> {
        let f = |v: Option<f64>| v.map_or("?".to_owned(), |v| format!("{v:.1}"));
        self.trends
            .iter()
            .map(|t| {
                format!(
                    "{:<16} first {:>9} last {:>9} max {:>9} mean {:>9} slope {:>9}/h (n={}){}",
                    t.series,
                    f(t.first),
                    f(t.last),
                    f(t.max),
                    f(t.mean_after_warmup),
                    t.slope_per_hour
                        .map_or("?".to_owned(), |v| format!("{v:+.2}")),
                    t.samples_after_warmup,
                    if t.unit.is_empty() {
                        String::new()
                    } else {
                        format!(" {}", t.unit)
                    }
                )
            })
            .collect()
    }
}

/// The trend of one series of `samples`.
fn trend(name: &str, unit: &str, samples: &[Sample], warmup_s: f64, read: Reading) -> Trend {
    let all: Vec<(f64, f64)> = samples
        .iter()
        .filter_map(|s| read(s).map(|v| (s.t_s, v)))
        .collect();
    let after: Vec<(f64, f64)> = all
        .iter()
        .filter(|(t, _)| *t >= warmup_s)
        .map(|(t, v)| (t / 3600.0, *v))
        .collect();
    Trend {
        series: name.to_owned(),
        unit: unit.to_owned(),
        first: all.first().map(|p| p.1),
        last: all.last().map(|p| p.1),
        max: all.iter().map(|p| p.1).reduce(f64::max),
        slope_per_hour: slope(&after),
        mean_after_warmup: (!after.is_empty())
            .then(|| after.iter().map(|p| p.1).sum::<f64>() / after.len() as f64),
        samples_after_warmup: after.len(),
    }
}

/// The least-squares slope of `points` (x, y); `None` for fewer than two distinct x.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// Where the sampler reads the executor.
pub struct Probe {
    /// The `serve` process's id (0 while none runs).
    pub pid: Arc<AtomicU32>,
    /// Its HTTP API.
    pub api: SocketAddr,
    /// The run's vhost.
    pub vhost: String,
    /// The AMQP URL of the run's vhost (for the depths of the DLQ and the requests queue).
    pub amqp_url: String,
    /// The URL of the run's database.
    pub database_url: String,
}

/// Samples the executor every `every` into `samples` until aborted.
pub struct Sampler {
    pub probe: Probe,
    pub every: Duration,
    pub samples: Arc<Mutex<Vec<Sample>>>,
}

impl Sampler {
    pub async fn run(self, collector: Arc<Collector>) {
        let start = Instant::now();
        let (admin_url, database) = super::target::admin_url_and_name(&self.probe.database_url);
        let pg = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(PROBE_TIMEOUT)
            .connect_lazy(&admin_url)
            .ok();
        let mut amqp: Option<lapin::Connection> = None;
        let mut ticks = tokio::time::interval(self.every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let t_s = start.elapsed().as_secs_f64();
            let pid = self.probe.pid.load(Ordering::Acquire);
            let (rss_kb, fds) = match pid {
                0 => (None, None),
                pid => (measure::rss_kb(Some(pid)).map(|r| r.0), open_fds(pid)),
            };
            let pg_connections = match &pg {
                Some(pg) => pg_connections(pg, &database).await,
                None => None,
            };
            let channels = executor_channels(&self.probe.vhost).await;
            let url = &self.probe.amqp_url;
            let dlq = queue_depth(url, &mut amqp, topology::DLQ).await;
            let requests_waiting = queue_depth(url, &mut amqp, topology::REQUESTS_QUEUE).await;
            let o = overview(self.probe.api).await.unwrap_or_default();
            let sample = Sample {
                t_s,
                rss_kb,
                fds,
                pg_connections,
                channels,
                dlq,
                requests_waiting,
                queued: o.queued,
                running: o.running,
                actions_known: o.actions,
                actors_awake: o.actors_awake,
                actors_retired: o.actors_retired,
                completed: collector.completed(),
            };
            tracing::info!(?sample, "soak sample");
            self.samples
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(sample);
        }
    }
}

/// Entries of `/proc/<pid>/fd`.
fn open_fds(pid: u32) -> Option<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count() as u64)
}

async fn pg_connections(pg: &sqlx::PgPool, database: &str) -> Option<u64> {
    let q =
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM pg_stat_activity WHERE datname = $1")
            .bind(database)
            .fetch_one(pg);
    match tokio::time::timeout(PROBE_TIMEOUT, q).await {
        Ok(Ok(n)) => u64::try_from(n).ok(),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "soak: could not count the Postgres connections");
            None
        }
        Err(_) => None,
    }
}

/// Channels of the connections to `vhost` that are not the bench's own.
async fn executor_channels(vhost: &str) -> Option<u64> {
    let out = tokio::time::timeout(
        PROBE_TIMEOUT,
        super::target::rabbitmqctl(&[
            "list_connections",
            "vhost",
            "channels",
            "client_properties",
            "--formatter",
            "json",
        ]),
    )
    .await
    .ok()?
    .ok()?;
    channels_of(&out, vhost)
}

/// [`executor_channels`] from `rabbitmqctl list_connections vhost channels client_properties
/// --formatter json`.
fn channels_of(json: &str, vhost: &str) -> Option<u64> {
    let rows: Vec<serde_json::Value> = serde_json::from_str(json.trim()).ok()?;
    Some(
        rows.iter()
            .filter(|r| r["vhost"].as_str() == Some(vhost))
            .filter(|r| {
                !r["client_properties"]
                    .to_string()
                    .contains(BENCH_CONNECTIONS)
            })
            .filter_map(|r| r["channels"].as_u64())
            .sum(),
    )
}

/// Messages in `queue` by a passive declare on a connection of the bench's own (opened
/// again when lost).
async fn queue_depth(url: &str, conn: &mut Option<lapin::Connection>, queue: &str) -> Option<u64> {
    let read = async {
        if !conn.as_ref().is_some_and(|c| c.status().connected()) {
            *conn = Some(crate::rabbit::connect(url, "fifo-executor bench soak").await?);
        }
        let Some(c) = conn.as_ref() else {
            return Ok(None);
        };
        Ok::<_, lapin::Error>(super::chaos::queue_depth(c, queue).await?.map(u64::from))
    };
    match tokio::time::timeout(PROBE_TIMEOUT, read).await {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, queue, "soak: could not read a queue's depth");
            None
        }
        Err(_) => None,
    }
}

/// What a sample takes from `GET /api/v1/overview`.
#[derive(Debug, Default, PartialEq, Eq)]
struct Overview {
    actions: Option<u64>,
    queued: Option<u64>,
    running: Option<u64>,
    actors_awake: Option<u64>,
    actors_retired: Option<u64>,
}

async fn overview(api: SocketAddr) -> Option<Overview> {
    let r = crate::http::client::Client::for_listen_address(api)
        .with_timeout(PROBE_TIMEOUT)
        .request("GET", crate::http::paths::OVERVIEW, None)
        .await
        .ok()?;
    (r.status == 200).then(|| overview_of(&r.body)).flatten()
}

fn overview_of(body: &[u8]) -> Option<Overview> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let t = &v["data"]["totals"];
    Some(Overview {
        actions: t["actions"].as_u64(),
        queued: t["queued"].as_u64(),
        running: t["running"].as_u64(),
        actors_awake: t["actors_awake"].as_u64(),
        actors_retired: t["actors_retired"].as_u64(),
    })
}

/// The soak's plot: throughput, then RSS, then the counts, over the soak, and the trends.
pub fn svg(report: &Report, soak: &SoakReport) -> String {
    let t_max = soak
        .samples
        .last()
        .map(|s| s.t_s)
        .unwrap_or(0.0)
        .max(soak.duration_s)
        .max(1.0);
    let points = |read: Reading| -> Vec<(f64, f64)> {
        soak.samples
            .iter()
            .filter_map(|s| read(s).map(|v| (s.t_s, v)))
            .collect()
    };
    let read = |name: &str| -> Reading {
        SERIES
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|s| s.2)
            .unwrap_or(|_| None)
    };
    let throughput: Vec<(f64, f64)> = report
        .executor
        .iter()
        .flat_map(|p| p.timeline.iter().map(|b| (b.t_s, b.throughput)))
        .collect();
    let panels: Vec<(&str, Vec<Series>)> = vec![
        ("executions/s", vec![("completed", "#1f77b4", throughput)]),
        (
            "executor RSS, MB",
            vec![("RSS", "#d62728", points(read("rss")))],
        ),
        (
            "open fds, Postgres connections, RabbitMQ channels",
            vec![
                ("fds", "#9467bd", points(read("fds"))),
                ("pg conns", "#2ca02c", points(read("pg_connections"))),
                ("channels", "#ff7f0e", points(read("channels"))),
            ],
        ),
        (
            "actions known, with an actor",
            vec![
                ("known", "#8c564b", points(read("actions_known"))),
                ("awake", "#17becf", points(read("actors_awake"))),
            ],
        ),
        (
            "DLQ, requests waiting in the broker, queued and running in the executor",
            vec![
                ("dlq", "#d62728", points(read("dlq"))),
                ("requests", "#7f7f7f", points(read("requests_waiting"))),
                ("queued", "#1f77b4", points(read("queued"))),
                ("running", "#2ca02c", points(read("running"))),
            ],
        ),
    ];
    let mut rows = vec![format!(
        "{} executions at {} over {} actions, {} ({} in the JSON report)",
        report.executor.as_ref().map_or(0, |p| p.completed),
        report.settings.get("rate").map_or("?", String::as_str),
        report.settings.get("actions").map_or("?", String::as_str),
        if report.ok { "OK" } else { "FAILED" },
        "command, samples and settings"
    )];
    rows.extend(soak.trend_lines());
    rows.push(soak.actions_line());
    let title = format!(
        "fifo-executor bench --soak: {:.0} s, {} short-lived actions × {}, slopes after {:.0} s",
        soak.duration_s, soak.distinct_actions, soak.uses, soak.warmup_s
    );
    report::draw(&title, t_max, &panels, &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slope_is_the_least_squares_one() {
        assert_eq!(slope(&[]), None);
        assert_eq!(slope(&[(1.0, 5.0)]), None);
        assert_eq!(slope(&[(1.0, 5.0), (1.0, 6.0)]), None);
        let line: Vec<(f64, f64)> = (0..10)
            .map(|x| (f64::from(x), 3.0 + 2.0 * f64::from(x)))
            .collect();
        assert!((slope(&line).unwrap_or(0.0) - 2.0).abs() < 1e-12);
        // Noise around a flat line: slope 0.
        let flat = [(0.0, 1.0), (1.0, -1.0), (2.0, 1.0), (3.0, -1.0), (4.0, 0.0)];
        assert!(slope(&flat).unwrap_or(1.0).abs() < 0.21);
        let zigzag = [(0.0, 0.0), (1.0, 2.0), (2.0, 0.0)];
        assert_eq!(slope(&zigzag), Some(0.0));
    }

    fn sample(t_s: f64, rss_mb: u64, fds: u64) -> Sample {
        Sample {
            t_s,
            rss_kb: Some(rss_mb * 1024),
            fds: Some(fds),
            ..Sample::default()
        }
    }

    #[test]
    fn trends_leave_out_the_warm_up_and_give_slopes_per_hour() {
        // RSS climbs for the first 600 s, then stays; fds grow by one every 360 s.
        let samples: Vec<Sample> = (0..=36)
            .map(|i| {
                let t = f64::from(i) * 100.0;
                let rss = if t < 600.0 { 10 + i as u64 * 10 } else { 70 };
                sample(t, rss, 20 + u64::from(i as u32) * 100 / 360)
            })
            .collect();
        let plan = SoakPlan {
            duration: Duration::from_secs(3600),
            sample_every: Duration::from_secs(100),
            warmup: Duration::from_secs(600),
            distinct: 10,
            uses: 2,
            idle_after: Duration::from_secs(60),
            remember_ended: 100,
        };
        let r = SoakReport::new(&plan, 3, samples);
        let rss = &r.trends[0];
        assert_eq!(rss.series, "rss");
        assert_eq!(
            (rss.first, rss.last, rss.max),
            (Some(10.0), Some(70.0), Some(70.0))
        );
        assert_eq!(rss.slope_per_hour, Some(0.0));
        assert_eq!(rss.samples_after_warmup, 31);
        let fds = &r.trends[1];
        assert!(
            (fds.slope_per_hour.unwrap_or(0.0) - 10.0).abs() < 1.0,
            "{fds:?}"
        );
        // Never read: no figures, no slope.
        let pg = &r.trends[2];
        assert_eq!((pg.first, pg.slope_per_hour), (None, None));
        // Nothing known: no cost per action.
        assert_eq!(r.bytes_per_known_action(), None);
        let mut summary = String::new();
        r.summary(&mut summary);
        assert!(summary.contains("slope     +0.00/h"), "{summary}");
    }

    #[test]
    fn what_an_action_known_costs_is_the_ratio_of_the_slopes() {
        // Every 360 s, 1,000 actions more and 1 MB more.
        let samples: Vec<Sample> = (0..=10)
            .map(|i| Sample {
                actions_known: Some(i * 1000),
                ..sample(i as f64 * 360.0, 50 + i, 20)
            })
            .collect();
        let plan = SoakPlan {
            duration: Duration::from_secs(3600),
            sample_every: Duration::from_secs(360),
            warmup: Duration::ZERO,
            distinct: 10_000,
            uses: 1,
            idle_after: Duration::from_secs(60),
            remember_ended: 100,
        };
        let r = SoakReport::new(&plan, 0, samples);
        let b = r.bytes_per_known_action().unwrap_or(0.0);
        assert!((b - 1048.576).abs() < 1e-6, "{b}");
        assert!(r.actions_line().contains("1049 bytes per action"));
    }

    #[test]
    fn only_the_executors_channels_of_the_vhost_count() {
        let json = r#"[
            {"vhost":"v1","channels":3,"client_properties":[["connection_name","longstr","fifo-executor"]]},
            {"vhost":"v1","channels":5,"client_properties":[["connection_name","longstr","fifo-executor bench workers"]]},
            {"vhost":"v2","channels":7,"client_properties":[]},
            {"vhost":"v1","channels":2,"client_properties":{}}
        ]"#;
        assert_eq!(channels_of(json, "v1"), Some(5));
        assert_eq!(channels_of("[]", "v1"), Some(0));
        assert_eq!(channels_of("Error", "v1"), None);
    }

    #[test]
    fn the_overview_gives_the_totals() {
        let body = br#"{"data":{"totals":{"actions":12,"queued":3,"running":2,
            "actors_awake":4,"actors_retired":8,"dlq_size":null}}}"#;
        assert_eq!(
            overview_of(body),
            Some(Overview {
                actions: Some(12),
                queued: Some(3),
                running: Some(2),
                actors_awake: Some(4),
                actors_retired: Some(8),
            })
        );
        assert_eq!(overview_of(b"{}"), Some(Overview::default()));
        assert_eq!(overview_of(b"nope"), None);
    }
}
