//! Helpers shared by the integration test binaries (`mod support;` in each).
//!
//! Integration tests talk to the real RabbitMQ on 127.0.0.1:5672 as guest/guest, the way
//! `scripts/services.sh` leaves it. Each test gets its own vhost so tests run in parallel without
//! seeing each other's queues, and waits for asynchronous effects with [`poll_until`] instead of
//! sleeping a fixed time.

// Every test binary compiles this module but uses only part of it.
#![allow(dead_code)]

pub mod fleet;
pub mod proxy;
pub mod serve;

use std::future::Future;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where the broker listens; guest may only log in over loopback.
pub const BROKER_ADDR: &str = "127.0.0.1:5672";

/// A RabbitMQ vhost that exists for one test and is deleted, with everything in it, when dropped
/// (also when the test panics).
#[derive(Debug)]
pub struct TestVhost {
    /// Vhost name, for `rabbitmqctl -p`.
    pub name: String,
    /// AMQP URL that logs in to the vhost as guest.
    pub url: String,
}

impl TestVhost {
    /// Creates a fresh vhost and gives guest full permissions on it.
    pub async fn create() -> TestVhost {
        // The pid separates test binaries running at once, the counter the tests of one binary,
        // and the time a binary from a vhost that an earlier, killed run of the same pid left.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos())
            .unwrap_or_default();
        let name = format!(
            "fifo-test-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        rabbitmqctl(&["add_vhost", &name]).await;
        // Built before the next command so that, should it fail, dropping it removes the vhost.
        let vhost = TestVhost {
            url: format!("amqp://guest:guest@{BROKER_ADDR}/{name}"),
            name,
        };
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &vhost.name,
            "guest",
            ".*",
            ".*",
            ".*",
        ])
        .await;
        vhost
    }

    /// Runs `rabbitmqctl <command> -p <this vhost> <args…>` and returns its standard output.
    pub async fn rabbitmqctl(&self, command: &str, args: &[&str]) -> String {
        let mut all = vec![command, "-p", &self.name];
        all.extend_from_slice(args);
        rabbitmqctl(&all).await
    }
}

impl Drop for TestVhost {
    fn drop(&mut self) {
        // Drop cannot await, and the runtime may already be shutting down, so this blocks on a
        // plain process. A failure only leaves a vhost behind, which must not fail the test.
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "delete_vhost", &self.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The command line of `fifo-executor bench` against `serve` child processes of this build
/// (`--chaos`, `--instances`, `--kill-every`), their config and logs kept in `dir`, no
/// progress bar: `workload` split at spaces (e.g. `--actions 20 --executions 100`), then
/// `rest`.
pub fn bench_with_children(
    dir: &std::path::Path,
    workload: &str,
    rest: &[&str],
) -> fifo_executor::tools::bench::BenchArgs {
    use clap::Parser;
    let dir = dir.to_str().expect("a UTF-8 directory");
    let mut args = vec!["bench", "--preset", "wide"];
    args.extend(workload.split_whitespace());
    args.extend_from_slice(rest);
    args.extend([
        "--serve-bin",
        env!("CARGO_BIN_EXE_fifo-executor"),
        "--chaos-dir",
        dir,
        "--no-progress",
    ]);
    fifo_executor::tools::bench::BenchArgs::try_parse_from(args).expect("valid arguments")
}

/// Declares the executor's topology with the default arguments, as the service does, so a
/// test can publish before the service is up.
pub async fn declare_topology(ch: &lapin::Channel) {
    use fifo_executor::rabbit::topology::{self, QueueKind, TopologySpec};
    let spec = TopologySpec {
        queue_type: QueueKind::Classic,
        dlq_ttl_hours: 168,
        dlq_max_entries: 10_000,
    };
    topology::declare(ch, &spec).await.expect("topology");
}

/// How many messages `queue` holds now (0 if it does not exist).
pub async fn queue_depth(ch: &lapin::Channel, queue: &str) -> u32 {
    ch.queue_declare(
        queue.into(),
        lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await
    .map(|q| q.message_count())
    .unwrap_or(0)
}

/// `(execution_id, attempt)` of every dispatch in `queue`, taken off it, in id order.
pub async fn take_dispatches(ch: &lapin::Channel, queue: &str) -> Vec<(u64, u32)> {
    let mut out = Vec::new();
    while let Ok(Some(m)) = ch
        .basic_get(
            queue.into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
    {
        let v: serde_json::Value = serde_json::from_slice(&m.delivery.data).expect("a dispatch");
        let id = v["execution_id"].as_u64().expect("an id");
        let attempt = v["attempt"].as_u64().expect("an attempt");
        out.push((id, u32::try_from(attempt).expect("a small attempt")));
    }
    out.sort_unstable();
    out
}

/// Runs `rabbitmqctl -q <args…>` and returns its standard output; panics with its output if it
/// fails.
pub async fn rabbitmqctl(args: &[&str]) -> String {
    let output = tokio::process::Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|error| {
            panic!("could not run rabbitmqctl (run scripts/services.sh first): {error}")
        });
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?} failed with {}: {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Sends the library's logs to the test's output (warnings and above unless `RUST_LOG` says
/// otherwise); the first call in a test binary wins.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// Calls `condition` every 20 ms until it returns true; panics naming `what` if that has not
/// happened within `deadline`.
///
/// Time is tokio's, so under paused time the deadline is virtual too.
pub async fn poll_until<F, Fut>(deadline: Duration, what: &str, condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    if !wait_until(deadline, condition).await {
        panic!("gave up after {deadline:?} waiting until {what}");
    }
}

/// Like [`poll_until`], but returns whether `condition` became true, for tests that report
/// what went wrong in more detail than "timed out".
pub async fn wait_until<F, Fut>(deadline: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    loop {
        if condition().await {
            return true;
        }
        if start.elapsed() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of the series `name{labels…}` in Prometheus text, if present.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            let Some(rest) = l.strip_prefix(name) else {
                return false;
            };
            (rest.starts_with('{') || rest.starts_with(' '))
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// An executor with in-memory ports and nothing queued, for checks that only need one to ask.
pub async fn idle_executor() -> std::sync::Arc<fifo_executor::core::Executor> {
    use fifo_executor::core::memory::{ChannelDispatcher, DiscardSink, LatestStats};
    use fifo_executor::core::{ActionPolicy, Executor, Ports, QueueSettings, UniformPolicy};
    use std::sync::Arc;
    Arc::new(
        Executor::start(
            QueueSettings::default(),
            Ports {
                dispatcher: Arc::new(ChannelDispatcher::new().0),
                sink: Arc::new(DiscardSink),
                observer: Arc::new(LatestStats::default()),
            },
            Arc::new(UniformPolicy(ActionPolicy::default())),
        )
        .await
        .expect("the executor starts"),
    )
}

/// Submits executions with empty parameters to `action` and waits until each has its verdict.
pub async fn submit_and_wait(
    exec: &fifo_executor::core::Executor,
    action: &fifo_executor::model::ActionRef,
    ids: &[u64],
) -> Vec<fifo_executor::model::Verdict> {
    use fifo_executor::model::{Payload, Receipt, Submission};
    let mut rxs = Vec::new();
    let subs = ids
        .iter()
        .map(|&id| {
            let (tx, rx) = tokio::sync::oneshot::channel();
            rxs.push(rx);
            let mut s = Submission::new(id, Payload::empty_object());
            s.receipt = Some(Receipt::new(move |v| {
                let _ = tx.send(v);
            }));
            s
        })
        .collect();
    exec.submit(action, subs);
    let mut verdicts = Vec::new();
    for rx in rxs {
        verdicts.push(rx.await.expect("a verdict"));
    }
    verdicts
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
pub struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

/// Captures what this thread logs, as plain lines without time or target, until the guard is
/// dropped. Only for single-threaded test runtimes: other threads log elsewhere.
pub fn capture_logs() -> (Captured, tracing::subscriber::DefaultGuard) {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .finish();
    (captured, tracing::subscriber::set_default(subscriber))
}

/// A vhost of its own with the executor's topology declared (classic queues), and a
/// confirm-mode channel to publish with: what a producer or worker in a test starts from.
pub async fn broker_with_topology() -> (TestVhost, lapin::Connection, lapin::Channel) {
    let vhost = TestVhost::create().await;
    let (conn, ch) = topology_channel(&vhost).await;
    (vhost, conn, ch)
}

/// A confirm-mode channel on `vhost`, after declaring the topology the service declares
/// too, so a test can publish before the service is up.
pub async fn topology_channel(vhost: &TestVhost) -> (lapin::Connection, lapin::Channel) {
    use fifo_executor::rabbit::topology::{self, QueueKind, TopologySpec};
    let conn = lapin::Connection::connect(&vhost.url, lapin::ConnectionProperties::default())
        .await
        .expect("connects");
    let ch = conn.create_channel().await.expect("channel");
    topology::declare(
        &ch,
        &TopologySpec {
            queue_type: QueueKind::Classic,
            dlq_ttl_hours: 168,
            dlq_max_entries: 10_000,
        },
    )
    .await
    .expect("topology");
    ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    (conn, ch)
}

/// Publishes `body` as persistent JSON on the executor's exchange, as a producer or worker
/// would, and waits for the broker's confirm.
pub async fn publish_json(ch: &lapin::Channel, routing_key: &str, body: &serde_json::Value) {
    ch.basic_publish(
        fifo_executor::rabbit::topology::EXCHANGE.into(),
        routing_key.into(),
        lapin::options::BasicPublishOptions::default(),
        body.to_string().as_bytes(),
        lapin::BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2),
    )
    .await
    .expect("publish")
    .await
    .expect("confirmed");
}

/// A worker's queue `name`, bound to every action's dispatches.
pub async fn all_dispatches_queue(ch: &lapin::Channel, name: &str) {
    ch.queue_declare(
        name.into(),
        lapin::options::QueueDeclareOptions::default(),
        lapin::types::FieldTable::default(),
    )
    .await
    .expect("worker queue");
    ch.queue_bind(
        name.into(),
        fifo_executor::rabbit::topology::EXCHANGE.into(),
        "execution.dispatch.#".into(),
        lapin::options::QueueBindOptions::default(),
        lapin::types::FieldTable::default(),
    )
    .await
    .expect("bound");
}

/// The HTTP API's state over `exec` for router tests: the admin token `t0ken`, the in-memory
/// hooks, no metrics, one instance owning every partition (`test`), a history sampler that
/// reads `dlq` when given; change what a test needs with struct update syntax.
pub fn app_state(
    exec: std::sync::Arc<fifo_executor::core::Executor>,
    stats: std::sync::Arc<fifo_executor::core::memory::LatestStats>,
    health: std::sync::Arc<fifo_executor::ops::health::HealthMonitor>,
    dlq: Option<std::sync::Arc<fifo_executor::ops::dlq::Dlq>>,
) -> fifo_executor::http::AppState {
    use fifo_executor::ops::hooks::{NoLedgerPurge, NoPolicyStore};
    use fifo_executor::ops::purge::Purger;
    use std::sync::Arc;
    fifo_executor::http::AppState {
        executor: exec.clone(),
        stats: stats.clone(),
        health,
        purger: Arc::new(Purger::new(
            exec.clone(),
            purge_settings(),
            Arc::new(NoLedgerPurge),
        )),
        dlq: dlq.clone(),
        metrics: None,
        policies: Arc::new(NoPolicyStore::default()),
        admin_token: Some(fifo_executor::config::Secret::new("t0ken")),
        max_body_bytes: 65_536,
        reloader: Arc::new(fifo_executor::ops::reload::Reloader::given(
            fifo_executor::config::Config::default(),
        )),
        cluster: fifo_executor::http::cluster::ClusterView::alone("test".to_owned(), 16),
        readiness: Arc::new(fifo_executor::ops::readiness::Readiness::default()),
        history: Arc::new(fifo_executor::ops::history::Sampler::new(exec, stats, dlq)),
    }
}

/// The purge's default ages (`purge.*` as `config/default.yaml` has them).
pub fn purge_settings() -> fifo_executor::ops::purge::PurgeSettings {
    fifo_executor::ops::purge::PurgeSettings {
        max_queued_age: Duration::from_secs(7200),
        max_running_age: Duration::from_secs(3600),
        max_completed_age: Duration::from_secs(604_800),
        max_stale_stats_age: Duration::from_secs(3600),
        max_history_age: fifo_executor::ops::hooks::HISTORY_RETENTION,
    }
}
