//! `fifo-executor serve` as a process of its own, the way systemd and Prometheus meet it:
//!
//! - the first answer of `/metrics` already has every family that can have a sample before
//!   any action exists (the recorder is process-wide, so only a fresh process shows what a
//!   restart looks like to Prometheus), and none of the per-action ones;
//! - with `NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace) it sends `READY=1`
//!   once the contract's topology is declared and consumed, and `STOPPING=1` on SIGTERM.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use fifo_executor::http::client::Client;
use fifo_executor::ops::metrics::names;
use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use support::TestVhost;
use tokio::net::UnixDatagram;
use tokio::process::{Child, Command};

const DEADLINE: Duration = Duration::from_secs(30);

/// The families the contract names (design/contract.md, "Metrics").
const CONTRACT_FAMILIES: &[&str] = &[
    "attune_queue_length",
    "attune_queue_active_count",
    "attune_queue_max_concurrent",
    "attune_queue_oldest_age_seconds",
    "attune_queue_last_updated",
    "attune_executions_total",
    "attune_dlq_messages_total",
    "attune_health_status",
    "attune_health_stuck_executions",
    "attune_queue_wait_seconds",
];

/// A directory of the test's own, removed at the end.
struct Dir(PathBuf);

impl Dir {
    fn new(what: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!(
            "fifo-serve-{what}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        ));
        std::fs::create_dir_all(&dir).expect("a test directory");
        Dir(dir)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A config for `serve` in memory mode on `vhost`, HTTP on `port`.
fn config(dir: &Path, vhost: &TestVhost, port: u16) -> PathBuf {
    let yaml = format!(
        "executor:\n  durability: memory\n  shutdown_timeout_seconds: 5\n\
         rabbitmq:\n  url: \"{}\"\n\
         api:\n  listen: \"127.0.0.1:{port}\"\n\
         logging:\n  filter: \"info,lapin=warn\"\n",
        vhost.url
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, yaml).expect("write the config");
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Starts `fifo-executor serve`, its output in `dir/serve.log`, with `NOTIFY_SOCKET` set to
/// `notify` if given and removed otherwise.
fn serve(dir: &Path, config: &Path, notify: Option<&str>) -> Child {
    let log = std::fs::File::create(dir.join("serve.log")).expect("a log file");
    let err = log.try_clone().expect("a log handle");
    let mut command = Command::new(env!("CARGO_BIN_EXE_fifo-executor"));
    command
        .arg("serve")
        .arg("--config")
        .arg(config)
        .env_remove("RUST_LOG")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .kill_on_drop(true);
    if let Some(socket) = notify {
        command.env("NOTIFY_SOCKET", socket);
    }
    command.spawn().expect("start fifo-executor serve")
}

fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default()
}

/// Sends SIGTERM (a graceful stop) to the child.
async fn terminate(child: &Child) {
    let pid = child.id().expect("the child runs");
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await
        .expect("run kill");
    assert!(status.success(), "kill -TERM {pid}");
}

/// Whether a line of Prometheus text is a sample of `family` (a histogram's or summary's
/// `_bucket`, `_sum` and `_count` included).
fn is_sample_of(line: &str, family: &str) -> bool {
    if line.starts_with('#') {
        return false;
    }
    let Some(rest) = line.strip_prefix(family) else {
        return false;
    };
    let rest = ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| rest.strip_prefix(s))
        .unwrap_or(rest);
    rest.starts_with('{') || rest.starts_with(' ')
}

/// The value of the unlabelled `family`'s sample.
fn unlabelled(text: &str, family: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{family} ")))
        .map(str::to_owned)
}

/// Every `attune_…` family a file names; histogram suffixes and the alert rules' group
/// names left out, and only whole names (the README's `attune_purge_*` is a pattern).
fn families_in(file: &str) -> Vec<String> {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{file}: {e}"));
    let mut out = Vec::new();
    for (i, _) in text.match_indices("attune_") {
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if name.ends_with('_') || ["attune_queues", "attune_executor"].contains(&name.as_str()) {
            continue;
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|f| names::HISTOGRAMS.contains(f))
            .unwrap_or(&name)
            .to_owned();
        if !out.contains(&family) {
            out.push(family);
        }
    }
    assert!(!out.is_empty(), "{file} names no metric");
    out
}

#[tokio::test]
async fn the_first_scrape_after_start_has_every_family_that_can_exist_before_an_action() {
    let vhost = TestVhost::create().await;
    let dir = Dir::new("metrics");
    let port = free_port();
    let mut child = serve(&dir.0, &config(&dir.0, &vhost, port), None);
    let client = Client::for_listen_address(([127, 0, 0, 1], port).into())
        .with_timeout(Duration::from_secs(20));

    // As early as it answers: a connection refused means the port is not bound yet; once it
    // is, the request waits in the listener's backlog until HTTP serves.
    let started = tokio::time::Instant::now();
    let first = loop {
        match client.request("GET", "/metrics", None).await {
            Ok(r) => break r,
            Err(e) => {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("serve exited with {status}: {}", log_of(&dir.0));
                }
                assert!(
                    started.elapsed() < DEADLINE,
                    "/metrics did not answer within {DEADLINE:?}: {e}\n{}",
                    log_of(&dir.0)
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    assert_eq!(first.status, 200);
    let text = String::from_utf8_lossy(&first.body).into_owned();

    // Every family the contract, the alert rules, the dashboard and the README name is one
    // the service exports, in exactly one of three kinds.
    let mut named: Vec<String> = CONTRACT_FAMILIES.iter().map(|f| (*f).to_owned()).collect();
    for file in [
        "config/prometheus/alerts.yml",
        "config/grafana/fifo-executor.json",
        "README.md",
    ] {
        for f in families_in(file) {
            if !named.contains(&f) {
                named.push(f);
            }
        }
    }
    for family in &named {
        let kinds = [names::FROM_START, names::PER_ACTION, names::PER_EVENT]
            .iter()
            .filter(|k| k.contains(&family.as_str()))
            .count();
        assert_eq!(kinds, 1, "{family}: named, but not exactly one kind");
    }
    // Those that can have a sample have one; those of actions have none, there being none.
    for family in names::FROM_START {
        assert!(
            text.lines().any(|l| is_sample_of(l, family)),
            "{family} missing from the first scrape:\n{text}"
        );
    }
    for family in names::PER_ACTION {
        assert!(
            !text.lines().any(|l| is_sample_of(l, family)),
            "{family} has a sample before any action:\n{text}"
        );
    }
    assert!(
        named.iter().any(|f| f == names::HEALTH_STATUS),
        "the list covers attune_health_status"
    );

    // The health gauges come from a real check, run once the topology was declared: the
    // fresh vhost's DLQ is read as empty, not NaN.
    let value = |family: &str| unlabelled(&text, family).unwrap_or_default();
    assert!(
        ["0", "1", "2"].contains(&value(names::HEALTH_STATUS).as_str()),
        "{text}"
    );
    assert!(
        value(names::HEALTH_LAST_CHECK)
            .parse::<f64>()
            .is_ok_and(|t| t > 1.0e9),
        "{text}"
    );
    assert_eq!(value(names::DLQ_SIZE), "0", "{text}");
    assert_eq!(value(names::RABBITMQ_CONNECTED), "1", "{text}");
    // Not measured yet: said as NaN, not as a made-up 0.
    assert_eq!(value(names::PURGE_CYCLE_SECONDS), "NaN", "{text}");
    assert_eq!(value(names::RABBITMQ_RECONNECTS_TOTAL), "0", "{text}");
    assert_eq!(value(names::INTAKE_LEADER), "1", "{text}");
    assert_eq!(value(names::PARTITIONS_OWNED), "16", "{text}");

    terminate(&child).await;
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("serve stops after SIGTERM")
        .expect("wait");
    assert!(status.success(), "{status}: {}", log_of(&dir.0));
}

/// The contract's exchanges and queues exist, and the executor consumes its three queues.
async fn contract_topology_is_declared_and_consumed(url: &str) -> Result<(), String> {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(|e| e.to_string())?;
    // A passive declare that fails closes its channel: one channel per name.
    // The contract's names, written out: this checks the contract, not the code's constants.
    for exchange in ["attune.executions", "attune.dlx"] {
        let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
        ch.exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("exchange {exchange}: {e}"))?;
    }
    for (queue, consumed) in [
        ("attune.execution.requests.queue", true),
        ("attune.execution.completed.queue", true),
        ("attune.execution.cancel.queue", true),
        ("attune.dlq", false),
    ] {
        let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("queue {queue}: {e}"))?;
        if consumed && q.consumer_count() == 0 {
            return Err(format!("queue {queue} has no consumer"));
        }
    }
    let _ = conn.close(200, "checked".into()).await;
    Ok(())
}

/// Waits for a datagram containing `line` (other messages, `STATUS=…`, come between) and
/// returns everything received up to it.
async fn until_message(socket: &UnixDatagram, line: &str, seen: &mut Vec<String>) {
    let mut buf = vec![0u8; 4096];
    let result = tokio::time::timeout(DEADLINE, async {
        loop {
            let n = socket.recv(&mut buf).await.expect("receive");
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            let found = message.lines().any(|l| l == line);
            seen.push(message);
            if found {
                return;
            }
        }
    })
    .await;
    assert!(
        result.is_ok(),
        "no {line} within {DEADLINE:?}; got {seen:?}"
    );
}

/// Runs `serve` notifying `name`, received on `socket`: READY=1 comes once the topology is
/// there and consumed, STOPPING=1 after SIGTERM, then a clean exit.
async fn ready_and_stopping_reach(socket: UnixDatagram, name: &str) {
    let vhost = TestVhost::create().await;
    let dir = Dir::new("notify");
    let mut child = serve(&dir.0, &config(&dir.0, &vhost, free_port()), Some(name));
    let mut seen = Vec::new();
    until_message(&socket, "READY=1", &mut seen).await;
    // At that very moment, before anything else happens.
    if let Err(e) = contract_topology_is_declared_and_consumed(&vhost.url).await {
        panic!("READY=1 came before the topology was ready: {e}\n{seen:?}");
    }
    assert!(
        seen.iter()
            .take(seen.len() - 1)
            .all(|m| m.starts_with("STATUS=not ready")),
        "only not-ready statuses before READY=1: {seen:?}"
    );
    assert!(
        child.try_wait().expect("poll").is_none(),
        "still running: {}",
        log_of(&dir.0)
    );

    terminate(&child).await;
    until_message(&socket, "STOPPING=1", &mut seen).await;
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("serve stops after SIGTERM")
        .expect("wait");
    assert!(status.success(), "{status}: {}", log_of(&dir.0));
}

#[tokio::test]
async fn serve_tells_systemd_ready_once_the_topology_is_consumed_and_stopping_on_sigterm() {
    let dir = Dir::new("socket");
    let path = dir.0.join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
    let name = path.to_str().expect("a UTF-8 path").to_owned();
    ready_and_stopping_reach(socket, &name).await;
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn an_abstract_notify_socket_named_with_an_at_sign_is_notified_too() {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("fifo-executor-test-notify-{}", std::process::id());
    let addr =
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("an address");
    let socket = std::os::unix::net::UnixDatagram::bind_addr(&addr).expect("bind");
    socket.set_nonblocking(true).expect("non-blocking");
    let socket = UnixDatagram::from_std(socket).expect("a tokio socket");
    ready_and_stopping_reach(socket, &format!("@{name}")).await;
}
