//! Live configuration reload against the real RabbitMQ (and Postgres for the ledger): the
//! service started from a config file, the file changed, then `POST /api/v1/admin/reload` (the
//! service in this process) or SIGHUP (`fifo-executor serve` as a child process). A raised
//! concurrency limit lets more executions run at once, a new health threshold shows in
//! `/health`, a changed URL is only reported as needing a restart, a policy set over the API
//! keeps winning, an invalid file changes nothing and is answered with the start-up message,
//! and a reload without the token is refused.

mod common_pg;
mod support;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common_pg::TestDb;
use fifo_executor::app::{Hooks, Service};
use fifo_executor::config::Config;
use fifo_executor::http::client::Client;
use fifo_executor::ops::reload::Reloader;
use fifo_executor::rabbit::topology;
use fifo_executor::tools::ops::{self, OpsError};
use lapin::Channel;
use serde_json::{Value, json};
use support::fleet;
use support::{TestVhost, metric_value, poll_until, queue_depth};

const TOKEN: &str = "reload-test-token";
const DEADLINE: Duration = Duration::from_secs(30);

/// A config file of the test's own, removed at the end.
struct ConfigFile(PathBuf);

impl ConfigFile {
    fn new(name: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "fifo-reload-{}-{}-{name}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("a directory for the test's files");
        Self(dir)
    }

    fn path(&self) -> PathBuf {
        self.0.join("config.yaml")
    }

    fn write(&self, text: &str) {
        // Written whole and renamed, as an editor or a deploy does: a reload never reads half.
        let tmp = self.0.join("config.yaml.new");
        std::fs::write(&tmp, text).expect("write the config");
        std::fs::rename(&tmp, self.path()).expect("put the config in place");
    }

    fn log(&self) -> PathBuf {
        self.0.join("serve.log")
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the tests change between two versions of a file.
struct Knobs<'a> {
    rabbit_url: &'a str,
    default_limit: u32,
    queue_length_warning: u64,
    log_filter: &'a str,
    max_queue_length: u64,
    /// An action with a policy of its own in the file, and its limit there.
    pinned: (&'a str, u32),
}

impl<'a> Knobs<'a> {
    /// What the services start with: limit 1, `pinned` at 1 in the file, `info` logs.
    fn at_start(rabbit_url: &'a str, pinned: &'a str) -> Self {
        Self {
            rabbit_url,
            default_limit: 1,
            queue_length_warning: 100,
            log_filter: "info",
            max_queue_length: 100,
            pinned: (pinned, 1),
        }
    }

    /// The config file: on the ledger in `db` if given (else in memory), HTTP on `port`.
    fn yaml(&self, db: Option<&TestDb>, port: u16) -> String {
        let (database, durability) = match db {
            Some(db) => (format!("database:\n  url: \"{}\"\n", db.url), "ledger"),
            None => (String::new(), "memory"),
        };
        format!(
            "{database}\
             rabbitmq:\n  url: \"{url}\"\n\
             executor:\n  durability: {durability}\n  shutdown_timeout_seconds: 5\n\
             \x20 queue:\n    max_queue_length: {max_queue}\n\
             policies:\n  default:\n    concurrency_limit: {limit}\n\
             \x20 actions:\n    {action}:\n      concurrency_limit: {pinned_limit}\n\
             health:\n  interval_seconds: 1\n\
             \x20 thresholds:\n    queue_length_warning: {warning}\n\
             purge:\n  enabled: false\n\
             api:\n  listen: \"127.0.0.1:{port}\"\n  admin_token: \"{TOKEN}\"\n\
             logging:\n  filter: \"{filter}\"\n",
            url = self.rabbit_url,
            max_queue = self.max_queue_length,
            limit = self.default_limit,
            action = self.pinned.0,
            pinned_limit = self.pinned.1,
            warning = self.queue_length_warning,
            filter = self.log_filter,
        )
    }
}

/// Channel on the vhost with the executor's topology declared (so the test can publish before
/// the service is up) and a worker queue bound to every dispatch.
async fn channel_with_worker_queue(vhost: &TestVhost, queue: &str) -> (lapin::Connection, Channel) {
    let conn = fleet::connect(&vhost.url).await;
    let ch = fleet::confirm_channel(&conn).await;
    support::declare_topology(&ch).await;
    fleet::worker_queue(&ch, queue).await;
    (conn, ch)
}

async fn publish_requests(ch: &Channel, action: &str, ids: std::ops::Range<u64>) {
    for id in ids {
        let body = json!({"execution_id": id, "action_ref": action, "parameters": {}});
        fleet::publish(
            ch,
            topology::REQUESTED_ROUTING_KEY,
            body.to_string().as_bytes(),
            fleet::json_props(),
        )
        .await;
    }
}

/// Sets an action's policy over the API, as an operator does.
async fn set_policy(client: &Client, action: &str, limit: u32) {
    ops::call(
        client,
        "PUT",
        &format!("/api/v1/actions/{action}/policy"),
        Some(&json!({"concurrency_limit": limit, "enabled": true})),
    )
    .await
    .expect("policy set");
}

/// `(queue_length, active_count)` of an action, once the service knows it.
async fn counts(client: &Client, action: &str) -> Option<(u64, u64)> {
    let s = ops::stats(client, Some(action), "queue_length", 1)
        .await
        .ok()?;
    Some((
        s["data"]["queue_length"].as_u64()?,
        s["data"]["active_count"].as_u64()?,
    ))
}

async fn get(client: &Client, path: &str) -> Value {
    ops::call(client, "GET", path, None)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

async fn reload(client: &Client) -> Result<Value, OpsError> {
    ops::call(client, "POST", "/api/v1/admin/reload", None).await
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// In this process, memory durability, POST /api/v1/admin/reload

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_over_http_applies_live_keys_reports_the_rest_and_refuses_an_invalid_file() {
    let vhost = TestVhost::create().await;
    let (_conn, ch) = channel_with_worker_queue(&vhost, "reload.workers").await;
    let file = ConfigFile::new("http");
    let before = Knobs::at_start(&vhost.url, "reload.pinned");
    file.write(&before.yaml(None, 0));
    let reloader = Arc::new(Reloader::from_file(Some(&file.path())).expect("the file loads"));
    let service = Service::start_reloadable(reloader, Hooks::default())
        .await
        .expect("the service starts");
    let client = Client::for_listen_address(service.http_addr()).with_token(Some(TOKEN.to_owned()));
    let anonymous = Client::for_listen_address(service.http_addr());
    let wrong = Client::for_listen_address(service.http_addr()).with_token(Some("nope".into()));

    let status = get(&anonymous, "/api/v1/config/status").await;
    assert_eq!(status["data"]["path"], file.path().display().to_string());
    assert_eq!(status["data"]["reloadable"], true);
    assert_eq!(status["data"]["last_reload"], Value::Null);
    let started_loaded_at = status["data"]["loaded_at"].clone();

    // An operator's policy, set over the API: a reload must leave it alone.
    set_policy(&client, "reload.pinned", 2).await;

    publish_requests(&ch, "reload.a", 1..11).await;
    poll_until(DEADLINE, "10 accepted, 1 dispatched at limit 1", || async {
        counts(&client, "reload.a").await == Some((9, 1))
    })
    .await;
    assert_eq!(queue_depth(&ch, "reload.workers").await, 1);

    let other_url = format!("{}?heartbeat=30", vhost.url);
    let after = Knobs {
        rabbit_url: &other_url,
        default_limit: 3,
        queue_length_warning: 4,
        log_filter: "debug",
        max_queue_length: 7,
        ..before
    };
    file.write(&after.yaml(None, 0));

    for (who, c) in [("no token", &anonymous), ("a wrong token", &wrong)] {
        let refused = reload(c).await.expect_err(who);
        assert!(
            matches!(&refused, OpsError::Api { status: 401, .. }),
            "{who}: {refused}"
        );
    }
    assert_eq!(
        get(&anonymous, "/api/v1/config/status").await["data"]["last_reload"],
        Value::Null,
        "a refused call reloads nothing"
    );

    // Several at once: serialised, so exactly one applies and the others find nothing new.
    let answers = futures::future::join_all((0..4).map(|_| reload(&client))).await;
    let mut applied = None;
    let mut unchanged = 0;
    for answer in answers {
        let data = answer.expect("a reload answers 200")["data"].clone();
        assert_eq!(strings(&data["needs_restart"]), ["rabbitmq.url"]);
        assert_eq!(data["error"], Value::Null);
        assert_eq!(data["trigger"], "api");
        match data["result"].as_str() {
            Some("applied") => assert!(applied.replace(data).is_none(), "applied twice"),
            Some("unchanged") => unchanged += 1,
            other => panic!("unexpected result {other:?}"),
        }
    }
    let applied = applied.expect("one reload applied");
    assert_eq!(unchanged, 3);
    assert_eq!(
        strings(&applied["applied"]),
        [
            "executor.queue.max_queue_length",
            "policies.default.concurrency_limit",
            "health.thresholds.queue_length_warning",
            "logging.filter",
        ]
    );
    assert!(
        strings(&applied["notes"])
            .iter()
            .any(|n| n.starts_with("logging.filter")),
        "this test's process set up its own logging: {applied}"
    );

    // The new limit governs dispatch at once; the policy set over the API stays.
    poll_until(DEADLINE, "3 executions running at once", || async {
        queue_depth(&ch, "reload.workers").await == 3
    })
    .await;
    let policy = |action: &'static str| {
        let client = &client;
        async move { get(client, &format!("/api/v1/actions/{action}/policy")).await }
    };
    assert_eq!(
        policy("reload.pinned").await["data"]["concurrency_limit"],
        2
    );
    assert_eq!(policy("reload.new").await["data"]["concurrency_limit"], 3);

    // The threshold shows in /health, and judges: 7 waiting > 4.
    poll_until(
        DEADLINE,
        "/health judging with the new threshold",
        || async {
            let health = ops::health(&client).await.unwrap_or_default();
            health["checks"]["queue_length"]["warning"] == 4
                && health["checks"]["queue_length"]["status"] == "degraded"
        },
    )
    .await;

    // The queue is full at 7 waiting: one more is rejected to the DLQ as QueueFull.
    publish_requests(&ch, "reload.a", 11..12).await;
    poll_until(DEADLINE, "the 11th rejected as QueueFull", || async {
        ops::dlq_stats(&client)
            .await
            .is_ok_and(|s| s["data"]["by_error_class"]["QueueFull"] == 1)
    })
    .await;

    let status = get(&anonymous, "/api/v1/config/status").await;
    let text = status.to_string();
    assert!(!text.contains(TOKEN), "the token leaked: {text}");
    assert!(!text.contains("guest:guest"), "a URL leaked: {text}");
    let data = &status["data"];
    assert_eq!(
        data["last_reload"]["result"], "unchanged",
        "the last of the four"
    );
    assert_eq!(data["loaded_at"], data["last_reload"]["loaded_at"]);
    assert_ne!(data["loaded_at"], started_loaded_at);
    let loaded_at = data["loaded_at"].clone();

    // An invalid file: nothing changes, and the answer is what start-up would print.
    file.write(
        &after
            .yaml(None, 0)
            .replace("max_queue_length", "max_queue_lenght"),
    );
    let expected = Config::load(Some(&file.path()))
        .expect_err("the file is invalid")
        .to_string();
    let refused = reload(&client).await.expect_err("invalid");
    match &refused {
        OpsError::Api {
            status: 400,
            code,
            message,
        } => {
            assert_eq!(code, "BAD_REQUEST");
            assert_eq!(message, &expected);
        }
        other => panic!("expected a 400, got {other}"),
    }
    assert!(expected.contains("max_queue_lenght"), "{expected}");
    let status = get(&anonymous, "/api/v1/config/status").await;
    assert_eq!(status["data"]["last_reload"]["result"], "invalid");
    assert_eq!(status["data"]["last_reload"]["error"], expected.as_str());
    assert_eq!(
        status["data"]["loaded_at"], loaded_at,
        "still the last good one"
    );
    assert_eq!(policy("reload.new").await["data"]["concurrency_limit"], 3);
    assert_eq!(service.executor.settings().max_queue_length, 7);

    // Back to what was applied: unchanged, and the URL still waits for a restart.
    file.write(&after.yaml(None, 0));
    let again = reload(&client).await.expect("reloads")["data"].clone();
    assert_eq!(again["result"], "unchanged");
    assert_eq!(strings(&again["needs_restart"]), ["rabbitmq.url"]);

    service.shutdown().await.expect("a clean shutdown");
}

#[tokio::test]
async fn a_service_given_a_configuration_in_code_has_nothing_to_reload() {
    let vhost = TestVhost::create().await;
    let mut config = Config::default();
    config.rabbitmq.url = vhost.url.clone();
    config.executor.durability = fifo_executor::config::Durability::Memory;
    config.executor.shutdown_timeout_seconds = 5;
    config.api.listen = ([127, 0, 0, 1], 0).into();
    config.api.admin_token = Some(fifo_executor::config::Secret::new(TOKEN));
    let service = Service::start(config).await.expect("the service starts");
    let client = Client::for_listen_address(service.http_addr()).with_token(Some(TOKEN.to_owned()));
    let refused = reload(&client).await.expect_err("nothing to reload");
    assert!(
        matches!(&refused, OpsError::Api { status: 409, .. }),
        "{refused}"
    );
    let status = get(&client, "/api/v1/config/status").await;
    assert_eq!(status["data"]["reloadable"], false);
    assert_eq!(status["data"]["path"], Value::Null);
    service.shutdown().await.expect("a clean shutdown");
}

// ---------------------------------------------------------------------------------------------
// `fifo-executor serve` as a child process, on the ledger, SIGHUP

/// The environment the child gets besides its parent's: one `ATTUNE__` variable for a key that
/// needs a restart. A reload reads the environment again and finds it as it was: were it not
/// read, the key would be back at its default and reported as needing a restart.
const CHILD_ENV: (&str, &str) = ("ATTUNE__STATS__INTERVAL_MS", "500");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn spawn_serve(file: &ConfigFile) -> tokio::process::Child {
    let out = std::fs::File::create(file.log()).expect("a log file");
    let err = out.try_clone().expect("a log file handle");
    tokio::process::Command::new(env!("CARGO_BIN_EXE_fifo-executor"))
        .arg("serve")
        .arg("--config")
        .arg(file.path())
        .env_remove("RUST_LOG")
        .env(CHILD_ENV.0, CHILD_ENV.1)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .expect("start fifo-executor serve")
}

fn signal(child: &tokio::process::Child, name: &str) {
    let pid = child.id().expect("the child runs").to_string();
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid}");
}

fn log_text(file: &ConfigFile) -> String {
    std::fs::read_to_string(file.log()).unwrap_or_default()
}

/// `attune_config_reloads_total{result}` in a scrape.
fn reloads(text: &str, result: &str) -> Option<f64> {
    metric_value(text, "attune_config_reloads_total", &[("result", result)])
}

async fn metrics_text(client: &Client) -> String {
    let response = client
        .request("GET", "/metrics", None)
        .await
        .expect("/metrics answers");
    String::from_utf8_lossy(&response.body).into_owned()
}

/// The last reload as `GET /api/v1/config/status` shows it, once it is another than
/// `previous` (told apart by `attempted_at`).
async fn until_reloaded(client: &Client, previous: &Value) -> Value {
    let last = std::sync::Mutex::new(Value::Null);
    let found = support::wait_until(DEADLINE, || async {
        let Ok(status) = ops::call(client, "GET", "/api/v1/config/status", None).await else {
            return false;
        };
        let reload = status["data"]["last_reload"].clone();
        let new = !reload.is_null() && reload["attempted_at"] != previous["attempted_at"];
        *last.lock().unwrap_or_else(|p| p.into_inner()) = reload;
        new
    })
    .await;
    let last = last.into_inner().unwrap_or_else(|p| p.into_inner());
    assert!(found, "no reload after SIGHUP; last: {last}");
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_file_on_the_ledger_and_keeps_the_policy_pinned_over_the_api() {
    let db = TestDb::new().await;
    let vhost = TestVhost::create().await;
    let (_conn, ch) = channel_with_worker_queue(&vhost, "hup.workers").await;
    let (_conn_pinned, ch_pinned) = {
        let conn = fleet::connect(&vhost.url).await;
        let ch = fleet::confirm_channel(&conn).await;
        (conn, ch)
    };
    // A second worker queue for the pinned action alone, to count its dispatches apart.
    ch_pinned
        .queue_declare(
            "hup.pinned.workers".into(),
            lapin::options::QueueDeclareOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("declare");
    ch_pinned
        .queue_bind(
            "hup.pinned.workers".into(),
            topology::EXCHANGE.into(),
            "execution.dispatch.hup.pinned".into(),
            lapin::options::QueueBindOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("bind");
    let file = ConfigFile::new("hup");
    let port = free_port();
    let before = Knobs::at_start(&vhost.url, "hup.pinned");
    file.write(&before.yaml(Some(&db), port));
    let mut child = spawn_serve(&file);
    let client = Client::for_listen_address(([127, 0, 0, 1], port).into())
        .with_token(Some(TOKEN.to_owned()));

    poll_until(DEADLINE, "the service answers", || async {
        ops::call(&client, "GET", "/api/v1/config/status", None)
            .await
            .is_ok()
    })
    .await;
    let start = get(&client, "/api/v1/config/status").await;
    let text = metrics_text(&client).await;
    for result in ["applied", "unchanged", "invalid"] {
        assert_eq!(
            reloads(&text, result),
            Some(0.0),
            "{result} from the first scrape"
        );
    }
    let loaded_gauge = metric_value(&text, "attune_config_last_reload_timestamp_seconds", &[])
        .expect("set at start");
    assert!(loaded_gauge > 1.7e9, "{loaded_gauge}");

    // Pinned over the API at 2; the file says 1 now and 5 after the reload: the row wins.
    set_policy(&client, "hup.pinned", 2).await;
    publish_requests(&ch, "hup.a", 1..7).await;
    publish_requests(&ch, "hup.pinned", 101..107).await;
    poll_until(
        DEADLINE,
        "1 of hup.a and 2 of hup.pinned running",
        || async {
            counts(&client, "hup.a").await == Some((5, 1))
                && counts(&client, "hup.pinned").await == Some((4, 2))
        },
    )
    .await;
    assert!(
        !log_text(&file).contains("DEBUG"),
        "no debug lines before the reload"
    );

    let other_url = format!("{}?heartbeat=30", vhost.url);
    let after = Knobs {
        rabbit_url: &other_url,
        default_limit: 4,
        queue_length_warning: 3,
        log_filter: "debug",
        max_queue_length: 50,
        pinned: ("hup.pinned", 5),
    };
    file.write(&after.yaml(Some(&db), port));
    signal(&child, "HUP");
    let report = until_reloaded(&client, &start["data"]["last_reload"]).await;
    assert_eq!(report["result"], "applied", "{report}");
    assert_eq!(report["trigger"], "signal");
    assert_eq!(
        strings(&report["applied"]),
        [
            "executor.queue.max_queue_length",
            "policies.default.concurrency_limit",
            "policies.actions.\"hup.pinned\".concurrency_limit",
            "health.thresholds.queue_length_warning",
            "logging.filter",
        ]
    );
    assert_eq!(strings(&report["needs_restart"]), ["rabbitmq.url"]);
    assert!(
        strings(&report["notes"]).is_empty(),
        "{report}: the environment is read again and found as it was"
    );

    poll_until(DEADLINE, "4 of hup.a running at once", || async {
        counts(&client, "hup.a").await == Some((2, 4))
    })
    .await;
    // Dispatches of both actions reach the shared worker queue: 4 + 2.
    poll_until(DEADLINE, "6 dispatches", || async {
        queue_depth(&ch, "hup.workers").await == 6
    })
    .await;
    assert_eq!(queue_depth(&ch, "hup.pinned.workers").await, 2);
    let pinned = get(&client, "/api/v1/actions/hup.pinned/policy").await;
    assert_eq!(
        pinned["data"]["concurrency_limit"], 2,
        "the pinned row wins"
    );
    poll_until(DEADLINE, "/health with the new threshold", || async {
        ops::health(&client)
            .await
            .is_ok_and(|h| h["checks"]["queue_length"]["warning"] == 3)
    })
    .await;
    poll_until(DEADLINE, "debug lines in the log", || async {
        log_text(&file).contains("DEBUG")
    })
    .await;
    let text = metrics_text(&client).await;
    assert_eq!(reloads(&text, "applied"), Some(1.0));
    let reloaded_gauge =
        metric_value(&text, "attune_config_last_reload_timestamp_seconds", &[]).expect("set");
    assert!(
        reloaded_gauge > loaded_gauge,
        "{reloaded_gauge} > {loaded_gauge}"
    );

    // Nothing else broke: completions free slots and the rest go out in order.
    let taken = support::take_dispatches(&ch, "hup.workers").await;
    assert_eq!(
        taken.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        [1, 2, 3, 4, 101, 102]
    );
    for (id, _) in &taken {
        let body = json!({"execution_id": id, "status": "succeeded", "result": {}});
        fleet::publish(
            &ch,
            topology::COMPLETED_ROUTING_KEY,
            body.to_string().as_bytes(),
            fleet::json_props(),
        )
        .await;
    }
    poll_until(
        DEADLINE,
        "the last two of hup.a and two more of hup.pinned",
        || async { queue_depth(&ch, "hup.workers").await == 4 },
    )
    .await;
    let next = support::take_dispatches(&ch, "hup.workers").await;
    assert_eq!(
        next.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        [5, 6, 103, 104]
    );

    // An invalid file: refused with the start-up message, at error level, nothing changed.
    let invalid = Knobs {
        pinned: ("hup.pinned", 0),
        ..after
    }
    .yaml(Some(&db), port);
    file.write(&invalid);
    let expected = Config::load_from(
        Some((&file.path().display().to_string(), &invalid)),
        [(CHILD_ENV.0.to_owned(), CHILD_ENV.1.to_owned())],
    )
    .expect_err("a limit of 0 is refused")
    .to_string();
    signal(&child, "HUP");
    let refused = until_reloaded(&client, &report).await;
    assert_eq!(refused["result"], "invalid");
    assert_eq!(refused["error"], expected.as_str());
    assert!(expected.contains("concurrency_limit"), "{expected}");
    poll_until(DEADLINE, "the refusal logged at error level", || async {
        log_text(&file)
            .lines()
            .any(|l| l.contains("ERROR") && l.contains("reload refused"))
    })
    .await;
    let text = metrics_text(&client).await;
    assert_eq!(reloads(&text, "invalid"), Some(1.0));
    assert_eq!(
        metric_value(&text, "attune_config_last_reload_timestamp_seconds", &[]),
        Some(reloaded_gauge),
        "an invalid file is not a load"
    );
    let a = get(&client, "/api/v1/actions/hup.a/policy").await;
    assert_eq!(a["data"]["concurrency_limit"], 4);

    // The graceful stop still works after SIGHUPs.
    signal(&child, "TERM");
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("stops within the deadline")
        .expect("exit status");
    assert!(status.success(), "{status}; log:\n{}", log_text(&file));
}
