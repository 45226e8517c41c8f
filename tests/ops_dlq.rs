//! Reading and replaying `attune.dlq` against the real RabbitMQ, each test in its own vhost:
//! the size, peeks that leave entries in place and in order, replays that publish the original
//! request with `x-retry-count` and take only the replayed entries off the queue, and the same
//! through the HTTP endpoints.

mod support;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use fifo_executor::config::HealthThresholds;
use fifo_executor::core::memory::{DiscardSink, LatestStats};
use fifo_executor::core::{ActionPolicy, Executor, Ports, QueueSettings, UniformPolicy};
use fifo_executor::http;
use fifo_executor::ops::dlq::{Dlq, DlqError, Filter, MAX_PEEK, Selection};
use fifo_executor::ops::health::{HealthMonitor, Status, UNREAD_QUEUE_FROM};
use fifo_executor::ops::hooks::NoHealthStore;
use fifo_executor::ops::metrics::names;
use fifo_executor::rabbit::topology;
use lapin::options::{BasicGetOptions, BasicPublishOptions};
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Channel, Connection};
use serde_json::{Value, json};
use support::{TestVhost, idle_executor, poll_until};
use tower::ServiceExt;

const DEADLINE: Duration = Duration::from_secs(20);

/// A vhost with the executor's topology and a confirm-mode channel to publish with.
async fn broker() -> (TestVhost, Connection, Channel) {
    support::broker_with_topology().await
}

/// Publishes a body to the dead-letter exchange, as the executor does, and waits for the
/// broker's confirm.
async fn dead_letter(ch: &Channel, queue_from: &str, body: &[u8]) {
    ch.basic_publish(
        topology::DLX.into(),
        topology::dlq_routing_key(queue_from).as_str().into(),
        BasicPublishOptions::default(),
        body,
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2),
    )
    .await
    .expect("publish")
    .await
    .expect("confirmed");
}

/// A dead letter as `rabbit::wire::DeadLetter` writes it.
fn letter(id: u64, queue_from: &str, error_class: &str, retry_count: u32) -> Value {
    let original = match queue_from {
        "requested" => json!({"execution_id": id, "action_ref": "core.http.get",
                              "request_id": format!("req-{id}"), "parameters": {"n": id}}),
        "queued" => json!({"execution_id": id, "action_ref": "core.http.get",
                           "request_id": format!("req-{id}"), "parameters": {"n": id},
                           "enqueued_at": "2026-11-22T10:00:00Z"}),
        _ => json!({"execution_id": id, "action_ref": "core.http.get",
                    "request_id": format!("req-{id}"), "dispatched_at": "2026-11-22T10:00:00Z"}),
    };
    json!({
        "execution_id": id, "action_ref": "core.http.get", "queue_from": queue_from,
        "error_class": error_class, "error_message": "test", "failed_at": format!("2026-11-22T10:00:{:02}Z", id % 60),
        "retry_count": retry_count, "request_id": format!("req-{id}"), "original": original
    })
}

async fn publish_letters(ch: &Channel, letters: &[Value]) {
    for l in letters {
        let from = l["queue_from"].as_str().unwrap_or("requested");
        dead_letter(ch, from, l.to_string().as_bytes()).await;
    }
}

fn ids(entries: &[Value]) -> Vec<u64> {
    entries
        .iter()
        .filter_map(|e| e["execution_id"].as_u64())
        .collect()
}

/// Everything in the requests queue, taken off it.
async fn requests(ch: &Channel) -> Vec<(Value, BasicProperties)> {
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(
            topology::REQUESTS_QUEUE.into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .expect("get")
    {
        let body = serde_json::from_slice(&m.delivery.data).expect("JSON request");
        out.push((body, m.delivery.properties.clone()));
    }
    out
}

fn header(props: &BasicProperties, name: &str) -> Option<i64> {
    props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(name).cloned())
        .and_then(|v| match v {
            AMQPValue::LongUInt(n) => Some(i64::from(n)),
            AMQPValue::LongLongInt(n) => Some(n),
            AMQPValue::LongInt(n) => Some(i64::from(n)),
            _ => None,
        })
}

#[tokio::test]
async fn the_size_is_the_number_of_dead_letters_ready_in_attune_dlq() {
    let (vhost, _conn, ch) = broker().await;
    let dlq = Dlq::new(vhost.url.clone());
    assert_eq!(dlq.size().await.expect("size"), 0);
    publish_letters(
        &ch,
        &[
            letter(1, "requested", "QueueFull", 0),
            letter(2, "queued", "QueueTimeout", 0),
            letter(3, "running", "LostCompletion", 0),
        ],
    )
    .await;
    poll_until(DEADLINE, "three dead letters counted", || async {
        dlq.size().await.ok() == Some(3)
    })
    .await;
    dlq.close().await;
}

#[tokio::test]
async fn a_peek_shows_entries_oldest_first_and_leaves_them_in_place_in_their_order() {
    let (vhost, _conn, ch) = broker().await;
    publish_letters(
        &ch,
        &(1..=5)
            .map(|id| letter(id, "requested", "QueueFull", 0))
            .collect::<Vec<_>>(),
    )
    .await;
    dead_letter(&ch, "requested", b"not json at all").await;
    let dlq = Dlq::new(vhost.url.clone());

    let first = dlq.peek(3).await.expect("peek");
    assert_eq!(first.queue_size, 6);
    assert_eq!(ids(&first.entries), vec![1, 2, 3]);
    assert_eq!(first.entries[0]["error_class"], "QueueFull");

    let all = dlq.peek(100).await.expect("peek again");
    assert_eq!(
        ids(&all.entries),
        vec![1, 2, 3, 4, 5],
        "same order after a peek"
    );
    assert_eq!(
        all.entries[5],
        json!({"unreadable": true, "raw": "not json at all"})
    );
    assert_eq!(dlq.size().await.expect("size"), 6, "nothing consumed");
    dlq.close().await;
}

#[tokio::test]
async fn replay_by_ids_republishes_originals_with_x_retry_count_and_takes_only_them_off() {
    let (vhost, _conn, ch) = broker().await;
    publish_letters(
        &ch,
        &[
            letter(11, "requested", "QueueFull", 0),
            letter(12, "queued", "QueueTimeout", 2),
            letter(13, "running", "LostCompletion", 0),
            letter(14, "requested", "ActionDisabled", 0),
        ],
    )
    .await;
    let dlq = Dlq::new(vhost.url.clone());

    let report = dlq
        .replay(Selection::Ids(vec![11, 12, 13, 99]))
        .await
        .expect("replay");
    let replayed: Vec<_> = report
        .replayed
        .iter()
        .map(|r| (r.execution_id, r.replay_of, r.retry_count))
        .collect();
    assert_eq!(
        replayed,
        vec![(Some(11), None, 1), (None, Some(12), 3)],
        "a rejected request keeps its id; a timed-out one gets a new one"
    );
    assert_eq!(report.skipped.len(), 1);
    assert_eq!(report.skipped[0].execution_id, Some(13));
    assert!(report.skipped[0].reason.contains("may have run"));
    assert_eq!(report.not_found, vec![99]);

    let left = dlq.peek(100).await.expect("peek");
    assert_eq!(ids(&left.entries), vec![13, 14], "the rest stay, in order");

    let sent = requests(&ch).await;
    assert_eq!(sent.len(), 2);
    let (body, props) = &sent[0];
    assert_eq!(body["execution_id"], 11);
    assert_eq!(body["parameters"], json!({"n": 11}));
    assert_eq!(body["request_id"], "req-11");
    assert_eq!(header(props, "x-retry-count"), Some(1));
    assert_eq!(props.delivery_mode(), &Some(2), "persistent");
    let (body, props) = &sent[1];
    assert_eq!(body.get("execution_id"), None);
    assert_eq!(body.get("enqueued_at"), None);
    assert_eq!(body["action_ref"], "core.http.get");
    assert_eq!(body["parameters"], json!({"n": 12}));
    assert_eq!(header(props, "x-retry-count"), Some(3));
    assert_eq!(header(props, "x-replay-of"), Some(12));
    dlq.close().await;
}

#[tokio::test]
async fn replay_by_limit_looks_at_entries_from_the_head_and_skips_what_cannot_run_again() {
    let (vhost, _conn, ch) = broker().await;
    publish_letters(
        &ch,
        &[
            letter(21, "running", "LostCompletion", 0),
            letter(22, "requested", "QueueFull", 0),
            letter(23, "requested", "QueueFull", 0),
        ],
    )
    .await;
    let dlq = Dlq::new(vhost.url.clone());
    let report = dlq.replay(Selection::First(2)).await.expect("replay");
    assert_eq!(report.scanned, 2);
    assert_eq!(
        report
            .replayed
            .iter()
            .map(|r| r.execution_id)
            .collect::<Vec<_>>(),
        vec![Some(22)]
    );
    assert_eq!(report.skipped.len(), 1);
    let left = dlq.peek(100).await.expect("peek");
    assert_eq!(ids(&left.entries), vec![21, 23]);
    assert_eq!(requests(&ch).await.len(), 1);
    dlq.close().await;
}

#[tokio::test]
async fn an_unreachable_broker_is_an_error_the_health_check_reports_as_degraded() {
    // Nothing listens on port 1.
    let dlq = Arc::new(
        Dlq::new("amqp://guest:guest@127.0.0.1:1/%2f").with_timeout(Duration::from_secs(10)),
    );
    assert!(matches!(dlq.size().await, Err(DlqError::Connect(_))));
    let exec = idle_executor().await;
    let monitor = HealthMonitor::new(
        exec.clone(),
        Some(dlq),
        HealthThresholds::default(),
        false,
        Arc::new(NoHealthStore),
    );
    let report = monitor.check().await;
    assert_eq!(report.status, Status::Degraded);
    assert_eq!(report.checks["dlq"].status, Status::Degraded);
    exec.shutdown(Duration::from_secs(5)).await;
}

async fn call(
    app: &axum::Router,
    method: Method,
    uri: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut b = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::AUTHORIZATION, "Bearer t0ken");
    let body = match body {
        Some(v) => {
            b = b.header(header::CONTENT_TYPE, "application/json");
            Body::from(v.to_string())
        }
        None => Body::empty(),
    };
    let response = app
        .clone()
        .oneshot(b.body(body).expect("request"))
        .await
        .expect("answers");
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body");
    (status, serde_json::from_slice(&bytes).expect("JSON"))
}

/// The HTTP API over an idle core and the vhost's DLQ, with the admin token `t0ken`.
async fn dlq_app(vhost: &TestVhost) -> (axum::Router, Arc<Executor>, Arc<Dlq>) {
    let stats = Arc::new(LatestStats::default());
    let exec = Arc::new(
        Executor::start(
            QueueSettings::default(),
            Ports {
                dispatcher: Arc::new(fifo_executor::core::memory::ChannelDispatcher::new().0),
                sink: Arc::new(DiscardSink),
                observer: stats.clone(),
            },
            Arc::new(UniformPolicy(ActionPolicy::default())),
        )
        .await
        .expect("starts"),
    );
    let dlq = Arc::new(Dlq::new(vhost.url.clone()));
    let health = Arc::new(HealthMonitor::new(
        exec.clone(),
        Some(dlq.clone()),
        HealthThresholds::default(),
        false,
        Arc::new(NoHealthStore),
    ));
    let app = http::router(support::app_state(
        exec.clone(),
        stats,
        health,
        Some(dlq.clone()),
    ));

    (app, exec, dlq)
}

#[tokio::test]
async fn the_dlq_endpoints_peek_count_and_replay_through_http() {
    let (vhost, _conn, ch) = broker().await;
    publish_letters(
        &ch,
        &[
            letter(31, "requested", "QueueFull", 0),
            letter(32, "queued", "QueueTimeout", 0),
            letter(33, "requested", "ActionDisabled", 0),
        ],
    )
    .await;
    let (app, exec, dlq) = dlq_app(&vhost).await;

    let (status, body) = call(&app, Method::GET, "/api/v1/dlq?limit=2", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["queue_size"], 3);
    let entries = body["data"]["entries"].as_array().expect("entries");
    assert_eq!(ids(entries), vec![31, 32]);

    let (status, body) = call(&app, Method::GET, "/api/v1/dlq/stats", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["sampled"], 3);
    assert_eq!(
        body["data"]["by_queue_from"],
        json!({"requested": 2, "queued": 1})
    );
    assert_eq!(
        body["data"]["by_error_class"],
        json!({"QueueFull": 1, "QueueTimeout": 1, "ActionDisabled": 1})
    );

    let (status, body) = call(
        &app,
        Method::POST,
        "/api/v1/dlq/replay",
        Some(json!({"execution_ids": [33]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["replayed"][0]["execution_id"], 33);
    assert_eq!(body["data"]["replayed"][0]["retry_count"], 1);
    assert_eq!(dlq.size().await.expect("size"), 2);
    assert_eq!(requests(&ch).await.len(), 1);
    dlq.close().await;
    exec.shutdown(Duration::from_secs(5)).await;
}

/// Publishes many dead letters and then waits for all the confirms (one round trip each
/// would make a thousand letters slow).
async fn publish_many(ch: &Channel, letters: &[Value]) {
    let mut confirms = Vec::new();
    for l in letters {
        let from = l["queue_from"].as_str().unwrap_or("requested");
        confirms.push(
            ch.basic_publish(
                topology::DLX.into(),
                topology::dlq_routing_key(from).as_str().into(),
                BasicPublishOptions::default(),
                l.to_string().as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish"),
        );
    }
    for c in confirms {
        c.await.expect("confirmed");
    }
}

// The metrics recorder is process-wide: this is the only test in this binary that exports
// the DLQ gauges.
#[tokio::test]
async fn a_health_check_exports_the_dlq_size_by_queue_from_and_counts_what_it_did_not_read() {
    let handle = fifo_executor::ops::metrics::install().expect("recorder");
    let (vhost, _conn, ch) = broker().await;
    let exec = idle_executor().await;
    let monitor = HealthMonitor::new(
        exec.clone(),
        Some(Arc::new(Dlq::new(vhost.url.clone()))),
        HealthThresholds::default(),
        false,
        Arc::new(NoHealthStore),
    );
    let by = |origin: &str| {
        support::metric_value(
            &handle.render(),
            names::DLQ_SIZE_BY_QUEUE_FROM,
            &[("queue_from", origin)],
        )
    };

    let mut letters: Vec<Value> = (1..=3)
        .map(|i| letter(i, "requested", "QueueFull", 0))
        .collect();
    letters.extend((4..=5).map(|i| letter(i, "queued", "QueueTimeout", 0)));
    letters.push(letter(6, "running", "LostCompletion", 0));
    publish_letters(&ch, &letters).await;
    // Not a dead letter of this executor at all.
    dead_letter(&ch, "completed", b"plain text").await;

    let report = monitor.check().await;
    assert_eq!(report.totals.dlq, Some(7));
    let text = handle.render();
    assert_eq!(
        support::metric_value(&text, names::DLQ_SIZE, &[]),
        Some(7.0)
    );
    for (origin, n) in [
        ("requested", 3.0),
        ("queued", 2.0),
        ("running", 1.0),
        ("completed", 0.0),
        ("cancel", 0.0),
        ("(none)", 1.0),
        (UNREAD_QUEUE_FROM, 0.0),
    ] {
        assert_eq!(by(origin), Some(n), "queue_from {origin}");
    }
    // Reading did not consume anything.
    assert_eq!(Dlq::new(vhost.url.clone()).size().await.expect("size"), 7);

    // Beyond the first MAX_PEEK entries only the total is known.
    let more: Vec<Value> = (100..1100)
        .map(|i| letter(i, "queued", "Purge", 0))
        .collect();
    publish_many(&ch, &more).await;
    monitor.check().await;
    assert_eq!(by("requested"), Some(3.0));
    assert_eq!(by("queued"), Some(2.0 + (MAX_PEEK - 7) as f64));
    assert_eq!(by(UNREAD_QUEUE_FROM), Some(7.0));
    assert_eq!(by("(none)"), Some(1.0));

    // An emptied DLQ shows 0 for every origin, also the ones seen only once.
    ch.queue_purge(
        topology::DLQ.into(),
        lapin::options::QueuePurgeOptions::default(),
    )
    .await
    .expect("purge");
    monitor.check().await;
    for origin in [
        "requested",
        "queued",
        "running",
        "(none)",
        UNREAD_QUEUE_FROM,
    ] {
        assert_eq!(by(origin), Some(0.0), "queue_from {origin}");
    }
    exec.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn dead_letters_expire_one_by_one_and_the_dlq_itself_stays() {
    let (vhost, _conn, ch) = broker().await;
    // The executor's own TTL is whole hours; a policy with a shorter message TTL takes over
    // (RabbitMQ applies the lower of the two), so expiry can be watched within a test.
    vhost
        .rabbitmqctl(
            "set_policy",
            &[
                "short-dlq-ttl",
                "^attune\\.dlq$",
                r#"{"message-ttl": 300}"#,
                "--apply-to",
                "queues",
            ],
        )
        .await;
    let dlq = Dlq::new(vhost.url.clone());
    publish_letters(&ch, &[letter(1, "requested", "QueueFull", 0)]).await;
    poll_until(DEADLINE, "the dead letter has expired", || async {
        dlq.size().await.is_ok_and(|n| n == 0)
    })
    .await;
    // Each entry expired on its own: the queue is still there (a TTL on the queue would have
    // deleted it, and the size reading would fail) and still takes dead letters.
    let routed = ch
        .basic_publish(
            topology::DLX.into(),
            topology::dlq_routing_key("queued").as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            letter(2, "queued", "Purge", 0).to_string().as_bytes(),
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(
        matches!(routed, lapin::Confirmation::Ack(None)),
        "the DLQ is still bound and takes dead letters: {routed:?}"
    );
}

#[tokio::test]
async fn the_dlq_check_turns_degraded_above_the_warning_unhealthy_above_critical_and_back() {
    let (vhost, _conn, ch) = broker().await;
    let exec = idle_executor().await;
    let monitor = HealthMonitor::new(
        exec.clone(),
        Some(Arc::new(Dlq::new(vhost.url.clone()))),
        HealthThresholds {
            dlq_warning: 2,
            dlq_critical: 4,
            ..HealthThresholds::default()
        },
        false,
        Arc::new(NoHealthStore),
    );
    let mut next = 0;
    for (total, want) in [
        (0, Status::Healthy),
        (2, Status::Healthy),
        (3, Status::Degraded),
        (4, Status::Degraded),
        (5, Status::Unhealthy),
    ] {
        let letters: Vec<Value> = (next..total)
            .map(|i| letter(i + 1, "requested", "QueueFull", 0))
            .collect();
        publish_letters(&ch, &letters).await;
        next = total;
        let report = monitor.check().await;
        assert_eq!(report.totals.dlq, Some(total), "{total} dead letters");
        assert_eq!(report.checks["dlq"].status, want, "{total} dead letters");
        assert_eq!(report.status, want, "{total} dead letters");
    }
    ch.queue_purge(
        topology::DLQ.into(),
        lapin::options::QueuePurgeOptions::default(),
    )
    .await
    .expect("purge");
    assert_eq!(monitor.check().await.status, Status::Healthy, "emptied");
    exec.shutdown(Duration::from_secs(5)).await;
}

// ---------------------------------------------------------------------------------------------
// Filters and discards (the operations page's DLQ view)

/// The execution ids a replay's new requests carry, in order.
fn replayed_ids(report: &fifo_executor::ops::dlq::ReplayReport) -> Vec<Option<u64>> {
    report.replayed.iter().map(|r| r.execution_id).collect()
}

/// The execution ids of the entries a discard took off, in order.
fn discarded_ids(report: &fifo_executor::ops::dlq::DiscardReport) -> Vec<Option<u64>> {
    report.discarded.iter().map(|d| d.execution_id).collect()
}

fn filter(queue_from: Option<&str>, error_class: Option<&str>) -> Filter {
    Filter {
        queue_from: queue_from.map(str::to_owned),
        error_class: error_class.map(str::to_owned),
    }
}

/// Five dead letters of mixed origins and classes, and one message that is not JSON.
async fn mixed(ch: &Channel) {
    publish_letters(
        ch,
        &[
            letter(41, "requested", "QueueFull", 0),
            letter(42, "queued", "QueueTimeout", 0),
            letter(43, "requested", "ActionDisabled", 0),
            letter(44, "running", "LostCompletion", 0),
            letter(45, "requested", "QueueFull", 0),
        ],
    )
    .await;
    dead_letter(ch, "requested", b"not json").await;
}

#[tokio::test]
async fn a_filtered_peek_returns_the_first_matches_counts_every_match_and_moves_nothing() {
    let (vhost, _conn, ch) = broker().await;
    mixed(&ch).await;
    let dlq = Dlq::new(vhost.url.clone());

    let peek = dlq
        .peek_matching(&filter(Some("requested"), None), 2)
        .await
        .expect("peek");
    assert_eq!(ids(&peek.entries), vec![41, 43]);
    assert_eq!(
        (peek.queue_size, peek.matched, peek.scanned),
        (6, 3, 6),
        "41, 43 and 45; the unreadable one was routed as requested but has no queue_from"
    );
    let peek = dlq
        .peek_matching(&filter(Some("requested"), Some("QueueFull")), 50)
        .await
        .expect("peek");
    assert_eq!(ids(&peek.entries), vec![41, 45]);
    assert_eq!(peek.matched, 2);
    let none = dlq
        .peek_matching(&filter(Some("(none)"), None), 50)
        .await
        .expect("peek");
    assert_eq!(
        none.entries,
        vec![json!({"unreadable": true, "raw": "not json"})]
    );
    let nothing = dlq
        .peek_matching(&filter(None, Some("NoSuchClass")), 50)
        .await
        .expect("peek");
    assert_eq!((nothing.entries.len(), nothing.matched), (0, 0));

    let plain = dlq.peek(3).await.expect("peek");
    assert_eq!(ids(&plain.entries), vec![41, 42, 43]);
    assert_eq!((plain.matched, plain.scanned), (3, 3));
    let all = dlq.peek(100).await.expect("peek");
    assert_eq!(ids(&all.entries), vec![41, 42, 43, 44, 45], "order kept");
    dlq.close().await;
}

#[tokio::test]
async fn replay_by_filter_replays_the_first_matches_and_leaves_the_rest_in_order() {
    let (vhost, _conn, ch) = broker().await;
    mixed(&ch).await;
    let dlq = Dlq::new(vhost.url.clone());
    let report = dlq
        .replay(Selection::Matching(filter(None, Some("QueueFull")), 1))
        .await
        .expect("replay");
    assert_eq!(replayed_ids(&report), vec![Some(41)]);
    let report = dlq
        .replay(Selection::Matching(filter(Some("requested"), None), 10))
        .await
        .expect("replay");
    assert_eq!(
        replayed_ids(&report),
        vec![Some(43), Some(45)],
        "only entries with the field match; the unreadable one has none"
    );
    assert_eq!(report.scanned, 5);
    let left = dlq.peek(100).await.expect("peek");
    assert_eq!(ids(&left.entries), vec![42, 44], "the rest stay, in order");
    assert_eq!(left.entries.len(), 3, "and the unreadable one after them");
    let sent: Vec<Value> = requests(&ch).await.into_iter().map(|(b, _)| b).collect();
    assert_eq!(
        sent.iter()
            .map(|b| b["execution_id"].as_u64())
            .collect::<Vec<_>>(),
        vec![Some(41), Some(43), Some(45)]
    );
    dlq.close().await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_discard_takes_the_chosen_entries_off_logs_each_and_keeps_the_rest_in_order() {
    let (logs, _guard) = support::capture_logs();
    let (vhost, _conn, ch) = broker().await;
    mixed(&ch).await;
    let dlq = Dlq::new(vhost.url.clone());

    let report = dlq
        .discard(Selection::Ids(vec![44, 99]))
        .await
        .expect("discard");
    assert_eq!(report.not_found, vec![99]);
    assert_eq!(report.discarded.len(), 1);
    let gone = &report.discarded[0];
    assert_eq!(gone.execution_id, Some(44));
    assert_eq!(gone.action_ref.as_deref(), Some("core.http.get"));
    assert_eq!(gone.queue_from.as_deref(), Some("running"));
    assert_eq!(gone.error_class.as_deref(), Some("LostCompletion"));

    let report = dlq
        .discard(Selection::Matching(
            filter(Some("requested"), Some("QueueFull")),
            1,
        ))
        .await
        .expect("discard");
    assert_eq!(discarded_ids(&report), vec![Some(41)]);
    let report = dlq
        .discard(Selection::Matching(filter(Some("(none)"), None), 5))
        .await
        .expect("discard");
    assert_eq!(report.discarded.len(), 1, "the unreadable message");
    assert_eq!(report.discarded[0].execution_id, None);

    let left = dlq.peek(100).await.expect("peek");
    assert_eq!(ids(&left.entries), vec![42, 43, 45], "the rest, in order");
    assert_eq!(left.queue_size, 3);
    assert!(
        requests(&ch).await.is_empty(),
        "a discard publishes nothing"
    );
    let text = logs.text();
    let discarded: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("[dlq] discarded"))
        .collect();
    assert_eq!(discarded.len(), 3, "{text}");
    assert!(
        discarded[0].contains("execution_id=Some(44)")
            && discarded[0].contains("action_ref=\"core.http.get\"")
            && discarded[0].contains("error_class=\"LostCompletion\""),
        "{}",
        discarded[0]
    );
    assert!(discarded[1].contains("execution_id=Some(41)") && discarded[1].contains("QueueFull"));
    dlq.close().await;
}

#[tokio::test]
async fn the_filter_replay_and_discard_endpoints_work_through_http_and_refuse_bad_bodies() {
    let (vhost, _conn, ch) = broker().await;
    mixed(&ch).await;
    let (app, exec, dlq) = dlq_app(&vhost).await;

    let (status, body) = call(
        &app,
        Method::GET,
        "/api/v1/dlq?queue_from=requested&error_class=QueueFull&limit=1",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let d = &body["data"];
    assert_eq!(ids(d["entries"].as_array().expect("entries")), vec![41]);
    assert_eq!(
        (&d["queue_size"], &d["matched"], &d["scanned"]),
        (&json!(6), &json!(2), &json!(6))
    );

    let (status, body) = call(
        &app,
        Method::POST,
        "/api/v1/dlq/replay",
        Some(json!({"filter": {"queue_from": "queued"}, "limit": 5})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["replayed"][0]["replay_of"], 42);

    let (status, body) = call(
        &app,
        Method::POST,
        "/api/v1/dlq/discard",
        Some(json!({"execution_ids": [43, 7]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["discarded"][0]["execution_id"], 43);
    assert_eq!(
        body["data"]["discarded"][0]["error_class"],
        "ActionDisabled"
    );
    assert_eq!(body["data"]["not_found"], json!([7]));
    let (status, body) = call(
        &app,
        Method::POST,
        "/api/v1/dlq/discard",
        Some(json!({"filter": {"error_class": "QueueFull"}, "limit": 10})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["discarded"].as_array().map(Vec::len), Some(2));
    let left = dlq.peek(100).await.expect("peek");
    assert_eq!(
        (ids(&left.entries), left.entries.len()),
        (vec![44], 2),
        "the reclaimed one and the unreadable one, in order"
    );

    for (uri, body, field) in [
        (
            "/api/v1/dlq/discard",
            json!({"filter": {"queue_from": "queued"}}),
            Some("limit"),
        ),
        (
            "/api/v1/dlq/replay",
            json!({"filter": {}, "execution_ids": [1]}),
            Some("filter"),
        ),
        (
            "/api/v1/dlq/discard",
            json!({"filter": {"queue_from": ""}, "limit": 1}),
            Some("filter"),
        ),
        (
            "/api/v1/dlq/discard",
            json!({"filter": {"color": "red"}, "limit": 1}),
            Some("filter"),
        ),
        ("/api/v1/dlq/discard", json!({"limit": 1001}), Some("limit")),
        ("/api/v1/dlq/discard", json!({}), None),
    ] {
        let (status, answer) = call(&app, Method::POST, uri, Some(body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri} {body}: {answer}");
        match field {
            Some(f) => assert!(
                answer["field"]
                    .as_str()
                    .is_some_and(|got| got.starts_with(f)),
                "{uri} {body}: {answer}"
            ),
            None => assert!(answer.get("field").is_none(), "{answer}"),
        }
    }
    let (status, answer) = call(&app, Method::GET, "/api/v1/dlq?queue_from=", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(answer["field"], "queue_from");
    assert_eq!(
        dlq.size().await.expect("size"),
        2,
        "refusals changed nothing"
    );
    dlq.close().await;
    exec.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn the_overview_history_reads_the_dlq_size_with_each_sample() {
    let (vhost, _conn, ch) = broker().await;
    let exec = idle_executor().await;
    let sampler = fifo_executor::ops::history::Sampler::new(
        exec.clone(),
        Arc::new(LatestStats::default()),
        Some(Arc::new(Dlq::new(vhost.url.clone()))),
    );
    assert_eq!(sampler.sample().await.dlq_size, Some(0));
    mixed(&ch).await;
    assert_eq!(sampler.sample().await.dlq_size, Some(6));
    let unreachable = fifo_executor::ops::history::Sampler::new(
        exec.clone(),
        Arc::new(LatestStats::default()),
        Some(Arc::new(
            Dlq::new("amqp://guest:guest@127.0.0.1:1/%2f").with_timeout(Duration::from_secs(2)),
        )),
    );
    assert_eq!(
        unreachable.sample().await.dlq_size,
        None,
        "unreadable is null, not 0"
    );
    exec.shutdown(Duration::from_secs(5)).await;
}
