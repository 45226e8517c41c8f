//! `fifo-executor serve` as a process of its own, the way systemd and Prometheus meet it:
//!
//! - the first answer of `/metrics` already has every family that can have a sample before
//!   any action exists (the recorder is process-wide, so only a fresh process shows what a
//!   restart looks like to Prometheus), and none of the per-action ones;
//! - with `NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace) it sends `READY=1`
//!   once the contract's topology is declared and consumed, and `STOPPING=1` on SIGTERM;
//! - the admin token read from `api.admin_token_file` is needed for every change (401 and
//!   nothing changed without it) and shows nowhere: not in a debug log, a served page or
//!   `check-config`'s dump.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use fifo_executor::http::client::Client;
use fifo_executor::ops::metrics::names;
use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use support::TestVhost;
use support::serve::{Dir, exits_cleanly, free_port, log_of, serve, stop, terminate};
use tokio::net::UnixDatagram;
use tokio::process::Command;

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

/// A config for `serve` in memory mode on `vhost`, HTTP on `port`.
fn config(dir: &Path, vhost: &TestVhost, port: u16) -> PathBuf {
    config_with(dir, vhost, port, "")
}

/// [`config`] with `queue` (lines of `executor.queue`, indented by four) added.
fn config_with(dir: &Path, vhost: &TestVhost, port: u16, queue: &str) -> PathBuf {
    let yaml = format!(
        "executor:\n  durability: memory\n  shutdown_timeout_seconds: 5\n  queue:\n{queue}\
         rabbitmq:\n  url: \"{}\"\n\
         api:\n  listen: \"127.0.0.1:{port}\"\n\
         logging:\n  filter: \"info,lapin=warn\"\n",
        vhost.url
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, yaml).expect("write the config");
    path
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

    stop(&mut child, &dir.0, DEADLINE).await;
}

/// A GET that must answer 200; its body as text.
async fn scrape(client: &Client, path: &str) -> String {
    let r = client
        .request("GET", path, None)
        .await
        .expect("HTTP answers");
    assert_eq!(
        r.status,
        200,
        "{path}: {}",
        String::from_utf8_lossy(&r.body)
    );
    String::from_utf8_lossy(&r.body).into_owned()
}

/// Publishes a request for `action`, as a producer would.
async fn request(ch: &lapin::Channel, id: u64, action: &str) {
    let body = serde_json::json!({"execution_id": id, "action_ref": action});
    support::publish_json(ch, "execution.requested", &body).await;
}

/// Publishes `id`'s completion, as its worker would.
async fn complete(ch: &lapin::Channel, id: u64, status: &str) {
    let body = serde_json::json!({"execution_id": id, "status": status});
    support::publish_json(ch, "execution.completed", &body).await;
}

fn has_action(text: &str, action: &str) -> bool {
    text.contains(&format!("action=\"{action}\""))
}

#[tokio::test]
async fn an_idle_action_leaves_metrics_a_busy_one_stays_and_one_that_runs_again_comes_back_counting_on()
 {
    let (vhost, _conn, ch) = support::broker_with_topology().await;
    support::all_dispatches_queue(&ch, "metrics-worker").await;
    let dir = Dir::new("idle-metrics");
    let port = free_port();
    let file = config_with(&dir.0, &vhost, port, "    metrics_idle_after_seconds: 1\n");
    let child = serve(&dir.0, &file, None);
    let client = Client::for_listen_address(([127, 0, 0, 1], port).into())
        .with_timeout(Duration::from_secs(20));
    support::poll_until(DEADLINE, "serve is ready", || async {
        client
            .request("GET", "/ready", None)
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;

    // `serve.quiet` runs 1 to its end; `serve.stuck` runs 2 (never completed), 3 waits.
    for (id, action) in [(1, "serve.quiet"), (2, "serve.stuck"), (3, "serve.stuck")] {
        request(&ch, id, action).await;
    }
    let dispatched = std::sync::Mutex::new(Vec::new());
    support::poll_until(DEADLINE, "1 and 2 are dispatched", || async {
        let got = support::take_dispatches(&ch, "metrics-worker").await;
        let mut seen = dispatched.lock().unwrap_or_else(|p| p.into_inner());
        seen.extend(got);
        seen.len() >= 2
    })
    .await;
    complete(&ch, 1, "succeeded").await;

    // Counted over all actions at once; the quiet action's series go a second later, the stuck
    // one's stay.
    support::poll_until(DEADLINE, "serve.quiet has left /metrics", || async {
        let text = scrape(&client, "/metrics").await;
        support::metric_value(
            &text,
            names::EXECUTIONS_BY_OUTCOME_TOTAL,
            &[("outcome", "succeeded")],
        ) == Some(1.0)
            && !has_action(&text, "serve.quiet")
    })
    .await;
    let text = scrape(&client, "/metrics").await;
    let value = |text: &str, name: &str, action: &str, outcome: Option<&str>| {
        let mut labels = vec![("action", action)];
        labels.extend(outcome.map(|o| ("outcome", o)));
        support::metric_value(text, name, &labels)
    };
    assert_eq!(
        value(&text, names::QUEUE_LENGTH, "serve.stuck", None),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, names::QUEUE_ACTIVE_COUNT, "serve.stuck", None),
        Some(1.0)
    );
    assert!(value(&text, names::QUEUE_LAST_UPDATED, "serve.stuck", None).is_some());
    assert_eq!(
        unlabelled(&text, names::ACTIONS_KNOWN).as_deref(),
        Some("2"),
        "{text}"
    );
    assert_eq!(
        unlabelled(&text, names::ACTIONS_EXPORTED).as_deref(),
        Some("1"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("attune_queue_wait_seconds_count ")),
        "one wait histogram, no action label: {text}"
    );

    // The quiet one is still one request away.
    let named = scrape(&client, "/metrics/actions?action=serve.quiet").await;
    assert_eq!(
        value(&named, names::QUEUE_LENGTH, "serve.quiet", None),
        Some(0.0),
        "{named}"
    );
    assert_eq!(
        value(
            &named,
            names::EXECUTIONS_TOTAL,
            "serve.quiet",
            Some("succeeded")
        ),
        Some(1.0),
        "{named}"
    );
    let bad = client
        .request("GET", "/metrics/actions?action=not%20a%20ref", None)
        .await
        .expect("HTTP answers");
    assert_eq!(bad.status, 400);
    assert!(String::from_utf8_lossy(&bad.body).contains("\"field\":\"action\""));

    // It runs again (4 is dispatched, no completion yet): back in the next scrape, its
    // counts where they were.
    request(&ch, 4, "serve.quiet").await;
    support::poll_until(DEADLINE, "serve.quiet is back on /metrics", || async {
        let text = scrape(&client, "/metrics").await;
        value(&text, names::QUEUE_ACTIVE_COUNT, "serve.quiet", None) == Some(1.0)
    })
    .await;
    let text = scrape(&client, "/metrics").await;
    assert_eq!(
        value(
            &text,
            names::EXECUTIONS_TOTAL,
            "serve.quiet",
            Some("accepted")
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            names::EXECUTIONS_TOTAL,
            "serve.quiet",
            Some("succeeded")
        ),
        Some(1.0),
        "{text}"
    );

    // A longer window, by SIGHUP: once 4 ends, serve.quiet stays past the old second.
    config_with(
        &dir.0,
        &vhost,
        port,
        "    metrics_idle_after_seconds: 3600\n",
    );
    let pid = child.id().expect("the child runs");
    let hup = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .await
        .expect("run kill");
    assert!(hup.success());
    support::poll_until(DEADLINE, "the reload applied the window", || async {
        let status = scrape(&client, "/api/v1/config/status").await;
        status.contains("executor.queue.metrics_idle_after_seconds")
    })
    .await;
    complete(&ch, 4, "failed").await;
    let seen_idle = std::sync::Mutex::new(None);
    support::poll_until(DEADLINE, "serve.quiet is idle", || async {
        let text = scrape(&client, "/metrics").await;
        let at = (value(&text, names::QUEUE_ACTIVE_COUNT, "serve.quiet", None) == Some(0.0))
            .then(|| value(&text, names::QUEUE_LAST_UPDATED, "serve.quiet", None))
            .flatten();
        *seen_idle.lock().unwrap_or_else(|p| p.into_inner()) = at;
        at.is_some()
    })
    .await;
    let ended_at = seen_idle
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .expect("seen idle");
    // Idle, its last_updated is the scrape time: scrape until that is 2 s on.
    support::poll_until(
        DEADLINE,
        "a scrape 2 s after 4 ended shows serve.quiet",
        || async {
            let text = scrape(&client, "/metrics").await;
            let shown = value(&text, names::QUEUE_LAST_UPDATED, "serve.quiet", None);
            assert!(
                shown.is_some(),
                "serve.quiet left within the new window: {text}"
            );
            shown.is_some_and(|t| t >= ended_at + 2.0)
        },
    )
    .await;

    let mut child = child;
    stop(&mut child, &dir.0, DEADLINE).await;
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
    exits_cleanly(&mut child, &dir.0, DEADLINE).await;
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

#[tokio::test]
async fn the_admin_token_from_its_file_guards_every_change_and_never_shows() {
    const TOKEN: &str = "tok-3f9a61c2-from-the-file";
    let vhost = TestVhost::create().await;
    let dir = Dir::new("token-file");
    let port = free_port();
    let token_file = dir.0.join("admin-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("writes the token file");
    let file = config(&dir.0, &vhost, port);
    // Everything logged.
    let yaml = std::fs::read_to_string(&file)
        .expect("the config")
        .replace("info,lapin=warn", "debug")
        .replace(
            &format!("  listen: \"127.0.0.1:{port}\"\n"),
            &format!(
                "  listen: \"127.0.0.1:{port}\"\n  admin_token_file: {}\n",
                token_file.display()
            ),
        );
    std::fs::write(&file, yaml).expect("rewrites the config");
    let mut child = serve(&dir.0, &file, None);
    let anonymous = Client::for_listen_address(([127, 0, 0, 1], port).into())
        .with_timeout(Duration::from_secs(20));
    let wrong = anonymous.clone().with_token(Some(format!("{TOKEN}x")));
    let admin = anonymous.clone().with_token(Some(TOKEN.to_owned()));
    support::poll_until(DEADLINE, "serve is ready", || async {
        anonymous
            .request("GET", "/ready", None)
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;

    let policy = "/api/v1/actions/secret.act/policy";
    let change = br#"{"concurrency_limit": 7}"#;
    let limit = |body: &[u8]| -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_slice(body).expect("JSON");
        v["data"]["concurrency_limit"].clone()
    };
    let before = anonymous
        .request("GET", policy, None)
        .await
        .expect("answers");
    assert_eq!(before.status, 200);
    for (who, client) in [("no token", &anonymous), ("a wrong token", &wrong)] {
        let r = client
            .request("PUT", policy, Some(change))
            .await
            .expect("answers");
        assert_eq!(r.status, 401, "{who}: {}", String::from_utf8_lossy(&r.body));
        let r = client
            .request("POST", "/api/v1/admin/reload", None)
            .await
            .expect("answers");
        assert_eq!(r.status, 401, "{who}");
        let after = anonymous
            .request("GET", policy, None)
            .await
            .expect("answers");
        assert_eq!(
            limit(&after.body),
            limit(&before.body),
            "{who} changed the policy"
        );
    }
    let r = admin
        .request("PUT", policy, Some(change))
        .await
        .expect("answers");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let after = anonymous
        .request("GET", policy, None)
        .await
        .expect("answers");
    assert_eq!(limit(&after.body), serde_json::json!(7));
    let reload = admin
        .request("POST", "/api/v1/admin/reload", None)
        .await
        .expect("answers");
    assert_eq!(
        reload.status,
        200,
        "{}",
        String::from_utf8_lossy(&reload.body)
    );

    // Nowhere to be read: not in what the service serves, nor in its log.
    for path in [
        "/metrics",
        "/api/v1/openapi.json",
        "/api/v1/config/status",
        "/api/v1/overview",
    ] {
        let text = scrape(&anonymous, path).await;
        assert!(!text.contains(TOKEN), "{path} shows the token");
    }
    stop(&mut child, &dir.0, DEADLINE).await;
    let log = log_of(&dir.0);
    assert!(!log.contains(TOKEN), "the log shows the token:\n{log}");

    // Nor in the dump of the configuration.
    let dump = Command::new(env!("CARGO_BIN_EXE_fifo-executor"))
        .arg("check-config")
        .arg("--config")
        .arg(&file)
        .output()
        .await
        .expect("runs check-config");
    let dump = String::from_utf8_lossy(&dump.stdout).into_owned();
    assert!(dump.contains("admin_token: Some("), "{dump}");
    assert!(
        !dump.contains(TOKEN),
        "check-config shows the token:\n{dump}"
    );
}
