//! The whole service with its HTTP API on a real socket, against the real RabbitMQ in a vhost of
//! its own: the CLI's calls read health, metrics and statistics; a request rejected for a
//! disabled action lands in the DLQ and a replay runs it once the action is enabled again;
//! `/ready` follows the broker session; the operations page's API (table, detail, overview
//! with its sampler running) follows executions submitted and completed over RabbitMQ; and
//! shutdown closes the HTTP listener.

mod support;

use std::time::Duration;

use fifo_executor::app::Service;
use fifo_executor::config::{self, Config, Secret};
use fifo_executor::http::client::Client;
use fifo_executor::rabbit::topology::{self};
use fifo_executor::tools::ops::{self, OpsError};
use lapin::options::BasicGetOptions;
use lapin::{Channel, Connection};
use serde_json::{Value, json};
use support::{TestVhost, poll_until};

const TOKEN: &str = "service-test-token";
const DEADLINE: Duration = Duration::from_secs(30);

fn config_for(vhost: &TestVhost) -> Config {
    let mut c = Config::default();
    c.rabbitmq.url = vhost.url.clone();
    c.executor.durability = config::Durability::Memory;
    c.executor.shutdown_timeout_seconds = 5;
    c.api.listen = ([127, 0, 0, 1], 0).into();
    c.api.admin_token = Some(Secret::new(TOKEN));
    // Checks every second, so a test waits at most that long for a fresh report.
    c.health.interval_seconds = 1;
    c
}

async fn channel(vhost: &TestVhost) -> (Connection, Channel) {
    support::topology_channel(vhost).await
}

fn client(service: &Service) -> Client {
    Client::for_listen_address(service.http_addr()).with_token(Some(TOKEN.to_owned()))
}

#[tokio::test]
async fn the_cli_reads_health_metrics_and_statistics_from_the_running_service() {
    let vhost = TestVhost::create().await;
    let (_conn, _ch) = channel(&vhost).await;
    let service = Service::start(config_for(&vhost))
        .await
        .expect("the service starts");
    let client = client(&service);

    // The first check may run before the edge has connected; a later one sees the DLQ.
    poll_until(DEADLINE, "a healthy report with the DLQ size", || async {
        ops::health(&client)
            .await
            .is_ok_and(|h| h["status"] == "healthy" && h["checks"]["dlq"]["value"] == 0.0)
    })
    .await;

    let answer = ops::call(&client, "GET", "/metrics", None).await;
    // /metrics is text, not JSON: the CLI's JSON call refuses it with a clear error.
    assert!(matches!(answer, Err(OpsError::NotJson(_))), "{answer:?}");
    let text = client
        .request("GET", "/metrics", None)
        .await
        .expect("metrics");
    let text = String::from_utf8_lossy(&text.body);
    for name in [
        "attune_health_status",
        "attune_emergency_mode",
        "attune_dlq_size",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "{name} in /metrics"
        );
    }

    let err = ops::stats(&client, Some("never.seen"), "queue_length", 10)
        .await
        .expect_err("unknown action");
    assert!(
        matches!(&err, OpsError::Api { status: 404, code, .. } if code == "NOT_FOUND"),
        "{err}"
    );
    let all = ops::stats(&client, None, "queue_length", 10)
        .await
        .expect("the list");
    assert_eq!(all["total"], 0);

    let report = ops::purge(&client, Some(true)).await.expect("a dry run");
    assert_eq!(report["data"]["dry_run"], true);

    let wrong =
        Client::for_listen_address(service.http_addr()).with_token(Some("wrong".to_owned()));
    let err = ops::dlq_stats(&wrong).await.expect_err("refused");
    assert!(matches!(err, OpsError::Api { status: 401, .. }), "{err}");

    let addr = service.http_addr();
    service.shutdown().await.expect("a clean shutdown");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "HTTP is closed after shutdown"
    );
}

/// Publishes a request as a producer would.
async fn request(ch: &Channel, body: Value) {
    support::publish_json(ch, topology::REQUESTED_ROUTING_KEY, &body).await;
}

async fn dlq_entries(client: &Client) -> Vec<Value> {
    ops::dlq_list(client, 100)
        .await
        .ok()
        .and_then(|a| a["data"]["entries"].as_array().cloned())
        .unwrap_or_default()
}

async fn set_enabled(client: &Client, action: &str, enabled: bool) {
    let answer = ops::call(
        client,
        "PUT",
        &format!("/api/v1/actions/{action}/policy"),
        Some(&json!({"concurrency_limit": 1, "enabled": enabled})),
    )
    .await
    .expect("policy set");
    assert_eq!(answer["data"]["enabled"], enabled);
}

#[tokio::test]
async fn a_request_rejected_for_a_disabled_action_is_replayed_from_the_dlq_once_enabled() {
    let vhost = TestVhost::create().await;
    let (_conn, ch) = channel(&vhost).await;
    // A worker's queue, to see the dispatch.
    support::all_dispatches_queue(&ch, "svc.worker").await;
    let service = Service::start(config_for(&vhost))
        .await
        .expect("the service starts");
    let client = client(&service);
    let action = "svc.replay";

    set_enabled(&client, action, false).await;
    request(
        &ch,
        json!({"execution_id": 777, "action_ref": action, "request_id": "req-777", "parameters": {"x": 1}}),
    )
    .await;
    poll_until(DEADLINE, "the rejection reaches the DLQ", || async {
        dlq_entries(&client).await.iter().any(|e| {
            e["execution_id"] == 777
                && e["error_class"] == "ActionDisabled"
                && e["retry_count"] == 0
        })
    })
    .await;

    // Replayed while still disabled: rejected again, and the new dead letter counts the try.
    let report = ops::dlq_replay(&client, &[777], None)
        .await
        .expect("replay");
    assert_eq!(report["data"]["replayed"][0]["execution_id"], 777);
    poll_until(
        DEADLINE,
        "the second rejection, with retry_count 1",
        || async {
            dlq_entries(&client)
                .await
                .iter()
                .any(|e| e["execution_id"] == 777 && e["retry_count"] == 1)
        },
    )
    .await;

    set_enabled(&client, action, true).await;
    let report = ops::dlq_replay(&client, &[777], None)
        .await
        .expect("replay");
    assert_eq!(report["data"]["replayed"][0]["retry_count"], 2);
    let dispatched = std::sync::Arc::new(std::sync::Mutex::new(None::<Value>));
    poll_until(DEADLINE, "the replayed execution is dispatched", || {
        let ch = ch.clone();
        let found = dispatched.clone();
        async move {
            if let Ok(Some(m)) = ch
                .basic_get("svc.worker".into(), BasicGetOptions { no_ack: true })
                .await
            {
                *found.lock().unwrap_or_else(|p| p.into_inner()) =
                    serde_json::from_slice(&m.delivery.data).ok();
            }
            found.lock().unwrap_or_else(|p| p.into_inner()).is_some()
        }
    })
    .await;
    let d = dispatched
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .expect("a dispatch");
    assert_eq!(d["execution_id"], 777);
    assert_eq!(d["request_id"], "req-777");
    assert_eq!(d["parameters"], json!({"x": 1}));
    assert!(
        dlq_entries(&client).await.is_empty(),
        "the DLQ is empty again"
    );
    let stats = ops::stats(&client, Some(action), "queue_length", 10)
        .await
        .expect("stats");
    assert_eq!(stats["data"]["active_count"], 1);
    assert_eq!(stats["data"]["total_rejected"], 2);

    service.shutdown().await.expect("a clean shutdown");
}

/// `GET /ready`: the status and the error message, if any.
async fn ready(client: &Client) -> (u16, String) {
    match client.request("GET", "/ready", None).await {
        Ok(r) => {
            let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
            (
                r.status,
                body["error"].as_str().unwrap_or_default().to_owned(),
            )
        }
        Err(e) => (0, e.to_string()),
    }
}

/// Whether the exchange producers publish to exists in the vhost (a passive declare).
async fn exchange_exists(vhost: &TestVhost) -> bool {
    let conn = Connection::connect(&vhost.url, lapin::ConnectionProperties::default())
        .await
        .expect("connects");
    let ch = conn.create_channel().await.expect("channel");
    let exists = ch
        .exchange_declare(
            topology::EXCHANGE.into(),
            lapin::ExchangeKind::Topic,
            lapin::options::ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .is_ok();
    let _ = conn.close(200, "checked".into()).await;
    exists
}

#[tokio::test]
async fn ready_is_a_503_naming_the_reason_until_the_topology_is_consumed_and_while_the_broker_is_away()
 {
    let vhost = TestVhost::create().await;
    let proxy = support::proxy::Proxy::start().await;
    // The broker is away: every connection through the proxy is closed at once.
    proxy.refuse(true);
    let mut config = config_for(&vhost);
    config.rabbitmq.url = proxy.url(&vhost.name);
    config.rabbitmq.reconnect_max_backoff_ms = 200;
    // No first health check to wait for: HTTP answers while the edge is still trying.
    config.health.enabled = false;
    let service = Service::start(config).await.expect("the service starts");
    let client = client(&service);

    poll_until(DEADLINE, "/ready says why it is not ready", || async {
        let (status, error) = ready(&client).await;
        status == 503 && error.contains("RabbitMQ") && error.contains("the last attempt")
    })
    .await;
    assert!(
        !exchange_exists(&vhost).await,
        "not ready, and indeed a producer's publish would find no exchange"
    );

    proxy.refuse(false);
    poll_until(DEADLINE, "/ready answers 200", || async {
        ready(&client).await.0 == 200
    })
    .await;
    assert!(
        exchange_exists(&vhost).await,
        "ready: the topology is there"
    );
    let text = client
        .request("GET", "/ready", None)
        .await
        .expect("an answer");
    let body: Value = serde_json::from_slice(&text.body).expect("JSON");
    assert_eq!(body["status"], "ready");

    // The session is lost and the broker stays away: not ready again, saying so.
    proxy.refuse(true);
    proxy.cut();
    poll_until(
        DEADLINE,
        "/ready is a 503 after the session is lost",
        || async {
            let (status, error) = ready(&client).await;
            status == 503 && error.contains("RabbitMQ")
        },
    )
    .await;
    proxy.refuse(false);
    poll_until(DEADLINE, "/ready is 200 again once reconnected", || async {
        ready(&client).await.0 == 200
    })
    .await;

    service.shutdown().await.expect("a clean shutdown");
}

/// Publishes a worker's completion.
async fn completion(ch: &Channel, id: u64, status: &str) {
    support::publish_json(
        ch,
        topology::COMPLETED_ROUTING_KEY,
        &json!({"execution_id": id, "status": status}),
    )
    .await;
}

#[tokio::test]
async fn the_page_s_api_follows_executions_submitted_and_completed_over_rabbitmq() {
    let vhost = TestVhost::create().await;
    let (_conn, ch) = channel(&vhost).await;
    support::all_dispatches_queue(&ch, "page.worker").await;
    let service = Service::start(config_for(&vhost))
        .await
        .expect("the service starts");
    let client = client(&service);
    let action = "page.svc";
    for id in 901..=903 {
        request(
            &ch,
            json!({"execution_id": id, "action_ref": action, "parameters": {}}),
        )
        .await;
    }

    // The table, then a refresh of its one row.
    poll_until(
        DEADLINE,
        "the action's row: 1 running, 2 waiting",
        || async {
            ops::call(&client, "GET", "/api/v1/actions?q=PAGE.", None)
                .await
                .is_ok_and(|b| {
                    b["total"] == 1
                        && b["data"][0]["action_ref"] == action
                        && b["data"][0]["active_count"] == 1
                        && b["data"][0]["queue_length"] == 2
                })
        },
    )
    .await;
    let row = ops::call(
        &client,
        "GET",
        "/api/v1/actions?refs=page.svc,other.x",
        None,
    )
    .await
    .expect("refresh");
    assert_eq!(row["total"], 1);
    assert_eq!(row["data"][0]["health"], "ok");

    let detail = ops::call(&client, "GET", "/api/v1/actions/page.svc", None)
        .await
        .expect("detail");
    let d = &detail["data"];
    let waiting: Vec<&Value> = d["waiting"]
        .as_array()
        .expect("waiting")
        .iter()
        .map(|w| &w["execution_id"])
        .collect();
    assert_eq!(waiting, vec![&json!(902), &json!(903)]);
    assert_eq!(d["running"][0]["execution_id"], 901);

    completion(&ch, 901, "succeeded").await;
    poll_until(DEADLINE, "901's end in the detail, 902 running", || async {
        ops::call(&client, "GET", "/api/v1/actions/page.svc", None)
            .await
            .is_ok_and(|b| {
                b["data"]["recent_ends"][0]["execution_id"] == 901
                    && b["data"]["recent_ends"][0]["outcome"] == "succeeded"
                    && b["data"]["running"][0]["execution_id"] == 902
            })
    })
    .await;

    // The sampler runs every 5 s: a sample after the admissions shows them, and the DLQ
    // size once the topology exists.
    poll_until(
        Duration::from_secs(20),
        "the overview's totals and history",
        || async {
            ops::call(&client, "GET", "/api/v1/overview", None)
                .await
                .is_ok_and(|b| {
                    let d = &b["data"];
                    d["mode"] == "single"
                        && d["totals"]["queued"] == 1
                        && d["totals"]["running"] == 1
                        && d["totals"]["dlq_size"] == 0
                        && d["history"].as_array().is_some_and(|h| {
                            h.iter().any(|s| {
                                s["dispatched_per_second"].as_f64().is_some_and(|r| r > 0.0)
                            })
                        })
                })
        },
    )
    .await;
    service.shutdown().await.expect("a clean shutdown");
}
