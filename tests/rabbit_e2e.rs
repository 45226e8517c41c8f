//! The executor end to end through the real RabbitMQ: producers publish requests, test workers
//! consume dispatches and publish completions, and the test checks FIFO order per action, the
//! concurrency limit, exactly-once completion, dead letters and `reply_to` answers.
//!
//! Each test runs the whole service in-process against its own vhost.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use fifo_executor::app::Service;
use fifo_executor::config::{self, Config};
use fifo_executor::rabbit::topology;
use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use serde_json::{Value, json};
use support::fleet::{Fleet, WorkerSettings};
use support::fleet::{confirm_channel, json_props, publish};
use support::{TestVhost, poll_until, wait_until};

fn config_for(vhost: &TestVhost) -> Config {
    support::init_tracing();
    let mut c = Config::default();
    c.rabbitmq.url = vhost.url.clone();
    c.executor.durability = config::Durability::Memory;
    c.executor.shutdown_timeout_seconds = 5;
    // Tests run in parallel: each service takes a free port rather than the default 8080.
    c.api.listen = ([127, 0, 0, 1], 0).into();
    c
}

fn limit(c: &mut Config, action: &str, n: u32) {
    c.policies.actions.insert(
        action.to_owned(),
        config::ActionPolicy {
            concurrency_limit: Some(n),
            rate_limit: None,
            enabled: None,
        },
    );
}

async fn connect(vhost: &TestVhost) -> Connection {
    support::fleet::connect(&vhost.url).await
}

/// A queue of the test's own bound to dispatches, like a worker's.
async fn worker_queue(ch: &Channel, name: &str) {
    support::fleet::worker_queue(ch, name).await;
}

/// Test workers on a queue of their own, checked against each action's limit as they start
/// executions.
async fn start_workers(vhost: &TestVhost, limits: &HashMap<String, u32>) -> Fleet {
    Fleet::start(
        &vhost.url,
        "test.workers",
        WorkerSettings {
            duration_ms: 0..=6,
            failure_rate: 0.0,
            limits: limits.clone(),
        },
    )
    .await
}

/// Reads everything in the DLQ.
async fn drain_dlq(ch: &Channel) -> Vec<Value> {
    let mut out = Vec::new();
    while let Some(msg) = ch
        .basic_get(topology::DLQ.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic_get")
    {
        out.push(serde_json::from_slice(&msg.delivery.data).expect("dead letter is JSON"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_executions_over_ten_actions_keep_fifo_order_and_limits() {
    let vhost = TestVhost::create().await;
    let mut config = config_for(&vhost);
    let limits: Vec<(String, u32)> = (0..10)
        .map(|i| (format!("e2e.action-{i}"), i % 5 + 1))
        .collect();
    for (a, n) in &limits {
        limit(&mut config, a, *n);
    }
    let service = Service::start(config).await.expect("service starts");
    // The worker queue must exist before the first dispatch, or it would be unroutable.
    let conn = connect(&vhost).await;
    let ch = confirm_channel(&conn).await;
    wait_for_topology(&conn).await;
    let workers = start_workers(&vhost, &limits.iter().cloned().collect()).await;

    let mut submitted: HashMap<String, Vec<u64>> = HashMap::new();
    for id in 1..=1000u64 {
        let (action, _) = &limits[(id * 7 % 10) as usize];
        submitted.entry(action.clone()).or_default().push(id);
        let body = json!({"execution_id": id, "action_ref": action, "parameters": {"n": id}});
        publish(
            &ch,
            topology::REQUESTED_ROUTING_KEY,
            body.to_string().as_bytes(),
            json_props(),
        )
        .await;
    }
    wait_until(Duration::from_secs(60), || async {
        workers.finished() >= 1000
    })
    .await;
    let problems = workers
        .record
        .lock()
        .expect("record")
        .violations(&submitted, &limits.into_iter().collect());
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    drop(workers);
    service.shutdown().await.expect("clean shutdown");
}

/// Waits until the executor is consuming from all three of its queues. It starts consuming only
/// after the whole topology is declared and bound, so a request published before then could be
/// unroutable and silently dropped; the existence of one queue is not enough.
async fn wait_for_topology(conn: &Connection) {
    support::fleet::until_consuming(conn, Duration::from_secs(60)).await;
}

/// Messages ready in a queue that exists.
async fn count(ch: &Channel, queue: &str) -> usize {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .map(|q| q.message_count() as usize)
    .unwrap_or(0)
}

/// A service that takes messages of at most 4 KiB, a confirm channel to its broker and a
/// worker queue `test.workers`.
async fn hostile_setup() -> (TestVhost, Service, Connection, Channel) {
    let vhost = TestVhost::create().await;
    let mut config = config_for(&vhost);
    config.rabbitmq.max_message_bytes = 4096;
    let service = Service::start(config).await.expect("service starts");
    let conn = connect(&vhost).await;
    let ch = confirm_channel(&conn).await;
    wait_for_topology(&conn).await;
    worker_queue(&ch, "test.workers").await;
    (vhost, service, conn, ch)
}

/// Publishes a good request with `props`, waits until it is dispatched to `test.workers`
/// and until the DLQ holds `bad` letters, and returns them (the DLQ drained).
async fn served_and_dead_lettered(
    conn: &Connection,
    ch: &Channel,
    body: &[u8],
    props: BasicProperties,
    bad: usize,
) -> Vec<Value> {
    publish(ch, topology::REQUESTED_ROUTING_KEY, body, props).await;
    poll_until(
        Duration::from_secs(60),
        "the good request was dispatched",
        || async {
            ch.basic_get("test.workers".into(), BasicGetOptions { no_ack: true })
                .await
                .ok()
                .flatten()
                .is_some()
        },
    )
    .await;
    let counter = conn.create_channel().await.expect("channel");
    poll_until(
        Duration::from_secs(60),
        "every bad message reached the DLQ",
        || async { count(&counter, topology::DLQ).await >= bad },
    )
    .await;
    drain_dlq(ch).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_hostile_requests_are_dead_lettered_once_and_the_service_keeps_serving() {
    let (_vhost, service, conn, ch) = hostile_setup().await;

    let deep = format!(
        "{{\"action_ref\": \"a\", \"parameters\": {}{}}}",
        "[".repeat(1500),
        "]".repeat(1500)
    );
    let cases: Vec<(Vec<u8>, Option<&str>, &str)> = vec![
        (b"\xff\xfe not utf8".to_vec(), None, "InvalidUtf8"),
        (deep.clone().into_bytes(), None, "InvalidJson"),
        (b"{\"action_ref\": ".to_vec(), None, "InvalidJson"),
        (br#"{"action_ref": 42}"#.to_vec(), None, "InvalidActionRef"),
        (br#"{"parameters": {}}"#.to_vec(), None, "InvalidActionRef"),
        (
            br#"{"action_ref": "rm -rf /"}"#.to_vec(),
            None,
            "InvalidActionRef",
        ),
        (
            br#"{"action_ref": "ok.action", "execution_id": "12"}"#.to_vec(),
            None,
            "InvalidExecutionId",
        ),
        (
            br#"{"action_ref": "ok.action", "parameters": "x"}"#.to_vec(),
            None,
            "InvalidMessage",
        ),
        (
            br#"{"action_ref": "ok.action"}"#.to_vec(),
            Some("text/xml"),
            "UnsupportedContentType",
        ),
        (vec![b' '; 10_000], None, "MessageTooLarge"),
    ];
    for (body, ct, _) in &cases {
        let mut props = BasicProperties::default().with_delivery_mode(2);
        if let Some(ct) = ct {
            props = props.with_content_type((*ct).into());
        }
        publish(&ch, topology::REQUESTED_ROUTING_KEY, body, props).await;
    }
    // A good request after all of them is still served.
    let letters = served_and_dead_lettered(
        &conn,
        &ch,
        br#"{"execution_id": 77, "action_ref": "ok.action"}"#,
        json_props(),
        cases.len(),
    )
    .await;
    let counter = conn.create_channel().await.expect("channel");
    let mut classes: Vec<&str> = letters
        .iter()
        .map(|l| l["error_class"].as_str().unwrap_or("?"))
        .collect();
    let mut expected: Vec<&str> = cases.iter().map(|(_, _, c)| *c).collect();
    classes.sort_unstable();
    expected.sort_unstable();
    assert_eq!(
        classes, expected,
        "one dead letter per bad message, none twice"
    );
    for l in &letters {
        assert_eq!(l["queue_from"], "requested");
        assert!(l["failed_at"].is_string() && l["error_message"].is_string());
        assert!(!l["original"].is_null(), "original kept: {l}");
    }
    let utf8 = letters
        .iter()
        .find(|l| l["error_class"] == "InvalidUtf8")
        .expect("utf8 letter");
    assert!(
        utf8["original"]["base64"].is_string(),
        "raw bytes kept as base64"
    );
    assert_eq!(
        count(&counter, topology::REQUESTS_QUEUE).await,
        0,
        "nothing left or requeued"
    );
    service.shutdown().await.expect("clean shutdown");
}

type Case = (
    &'static str,
    Vec<u8>,
    Option<&'static str>,
    &'static str,
    &'static str,
);

/// Headers nobody should send: an `x-death` history of a thousand entries, delivery and retry
/// counts of the wrong type or sign, a table nested deep. Bad bodies under them still reach
/// the DLQ once each with their reason, whatever the queue; a good request under them is
/// served; nothing is left or requeued. (Not a NaN double: RabbitMQ itself closes the
/// connection of a publisher that sends one, as Erlang has no NaN.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_headers_and_a_thousand_entry_x_death_change_nothing_about_dead_lettering() {
    use lapin::types::{AMQPValue, FieldArray, ShortString};
    let (_vhost, service, conn, ch) = hostile_setup().await;

    let mut headers = FieldTable::default();
    let deaths: Vec<AMQPValue> = (0..1000)
        .map(|i| {
            let mut death = FieldTable::default();
            death.insert("count".into(), AMQPValue::LongLongInt(i64::MAX - i));
            death.insert("reason".into(), AMQPValue::LongString("rejected".into()));
            death.insert("queue".into(), AMQPValue::LongString("q".into()));
            AMQPValue::FieldTable(death)
        })
        .collect();
    headers.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(deaths)),
    );
    headers.insert(
        "x-delivery-count".into(),
        AMQPValue::LongString("lots".into()),
    );
    headers.insert("x-retry-count".into(), AMQPValue::LongLongInt(i64::MIN));
    headers.insert("x-attempt".into(), AMQPValue::Double(-1.5));
    let mut nested = FieldTable::default();
    for depth in 0..50 {
        let mut outer = FieldTable::default();
        outer.insert(
            ShortString::from(format!("level-{depth}")),
            AMQPValue::FieldTable(nested),
        );
        nested = outer;
    }
    headers.insert("x-nested".into(), AMQPValue::FieldTable(nested));
    let props = |ct: Option<&str>| {
        let p = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers.clone());
        match ct {
            Some(ct) => p.with_content_type(ct.into()),
            None => p,
        }
    };

    // (routing key, body, content type, error class, queue_from)
    let cases: Vec<Case> = vec![
        (
            topology::REQUESTED_ROUTING_KEY,
            b"\xff not utf8".to_vec(),
            None,
            "InvalidUtf8",
            "requested",
        ),
        (
            topology::REQUESTED_ROUTING_KEY,
            br#"{"action_ref": "ok.action"}"#.to_vec(),
            Some("application/xml"),
            "UnsupportedContentType",
            "requested",
        ),
        (
            topology::REQUESTED_ROUTING_KEY,
            vec![b'['; 5000],
            None,
            "MessageTooLarge",
            "requested",
        ),
        (
            topology::COMPLETED_ROUTING_KEY,
            format!("{}{}", "[".repeat(1000), "]".repeat(1000)).into_bytes(),
            None,
            "InvalidJson",
            "completed",
        ),
        (
            topology::COMPLETED_ROUTING_KEY,
            br#"{"execution_id": 5, "status": "done"}"#.to_vec(),
            Some("application/json"),
            "InvalidStatus",
            "completed",
        ),
        (
            topology::CANCEL_ROUTING_KEY,
            br#"{"execution_id": -5}"#.to_vec(),
            None,
            "InvalidExecutionId",
            "cancel",
        ),
    ];
    for (key, body, ct, _, _) in &cases {
        publish(&ch, key, body, props(*ct)).await;
    }
    let letters = served_and_dead_lettered(
        &conn,
        &ch,
        br#"{"execution_id": 78, "action_ref": "ok.action"}"#,
        props(Some("application/json")),
        cases.len(),
    )
    .await;
    let counter = conn.create_channel().await.expect("channel");
    let mut got: Vec<(String, String)> = letters
        .iter()
        .map(|l| {
            assert_eq!(
                l["retry_count"], 0,
                "a negative x-retry-count reads as 0: {l}"
            );
            (
                l["queue_from"].as_str().unwrap_or("?").to_owned(),
                l["error_class"].as_str().unwrap_or("?").to_owned(),
            )
        })
        .collect();
    let mut expected: Vec<(String, String)> = cases
        .iter()
        .map(|(_, _, _, class, from)| ((*from).to_owned(), (*class).to_owned()))
        .collect();
    got.sort_unstable();
    expected.sort_unstable();
    assert_eq!(got, expected, "one dead letter per bad message, none twice");
    for queue in [
        topology::REQUESTS_QUEUE,
        topology::COMPLETED_QUEUE,
        topology::CANCEL_QUEUE,
    ] {
        assert_eq!(
            count(&counter, queue).await,
            0,
            "nothing left or requeued in {queue}"
        );
    }
    service.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_rejects_to_the_dlq_and_answers_on_reply_to() {
    let vhost = TestVhost::create().await;
    let mut config = config_for(&vhost);
    config.executor.queue.max_queue_length = 2;
    let service = Service::start(config).await.expect("service starts");
    let conn = connect(&vhost).await;
    let ch = confirm_channel(&conn).await;
    wait_for_topology(&conn).await;
    worker_queue(&ch, "test.workers").await;
    let reply_to = support::fleet::reply_queue(&ch).await.as_str().to_owned();
    // Limit 1 and no worker completing: one runs, two wait, the fourth finds the queue full.
    for id in 1..=4u64 {
        let body = json!({"execution_id": id, "action_ref": "full.action", "request_id": format!("req-{id}")});
        let props = json_props()
            .with_reply_to(reply_to.as_str().into())
            .with_correlation_id(format!("corr-{id}").into());
        publish(
            &ch,
            topology::REQUESTED_ROUTING_KEY,
            body.to_string().as_bytes(),
            props,
        )
        .await;
    }
    let mut answers: HashMap<String, Value> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while answers.len() < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} replies: {answers:?}",
            answers.len()
        );
        match ch
            .basic_get(reply_to.as_str().into(), BasicGetOptions { no_ack: true })
            .await
        {
            Ok(Some(m)) => {
                let corr = m
                    .delivery
                    .properties
                    .correlation_id()
                    .as_ref()
                    .map(|c| c.as_str().to_owned())
                    .unwrap_or_default();
                answers.insert(
                    corr,
                    serde_json::from_slice(&m.delivery.data).expect("reply JSON"),
                );
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    for id in 1..=3 {
        assert_eq!(answers[&format!("corr-{id}")]["status"], "queued");
    }
    let rejected = &answers["corr-4"];
    assert_eq!(rejected["status"], "rejected");
    assert_eq!(rejected["execution_id"], 4);
    assert_eq!(rejected["error"], "Queue full (max length: 2)");
    let counter = conn.create_channel().await.expect("channel");
    poll_until(
        Duration::from_secs(60),
        "the rejection reached the DLQ",
        || async { count(&counter, topology::DLQ).await == 1 },
    )
    .await;
    let letters = drain_dlq(&ch).await;
    assert_eq!(letters[0]["error_class"], "QueueFull");
    assert_eq!(letters[0]["error_message"], "Queue full (max length: 2)");
    assert_eq!(letters[0]["execution_id"], 4);
    assert_eq!(letters[0]["request_id"], "req-4");
    assert_eq!(letters[0]["original"]["action_ref"], "full.action");
    let stats = service
        .executor
        .stats(&fifo_executor::model::ActionRef::parse("full.action").expect("ref"))
        .await
        .expect("stats")
        .expect("known");
    assert_eq!(
        (stats.active_count, stats.queue_length, stats.total_rejected),
        (1, 2, 1)
    );
    service.shutdown().await.expect("clean shutdown");
}

/// Closes every connection the executor has open in the vhost, as an operator would with
/// `rabbitmqctl close_connection`.
async fn close_executor_connections(vhost: &TestVhost) -> usize {
    let listing = support::rabbitmqctl(&[
        "list_connections",
        "--silent",
        "pid",
        "vhost",
        "client_properties",
    ])
    .await;
    let mut closed = 0;
    for line in listing.lines() {
        let cols: Vec<&str> = line.split('\t').collect();
        // RabbitMQ 3.10 has no user_provided_name column; the name is in the client properties.
        if cols.len() == 3
            && cols[1] == vhost.name
            && cols[2].contains("{\"connection_name\",\"fifo-executor\"}")
        {
            support::rabbitmqctl(&["close_connection", cols[0], "test closes the executor"]).await;
            closed += 1;
        }
    }
    closed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executions_still_complete_in_order_when_the_broker_closes_the_connection_mid_stream() {
    let vhost = TestVhost::create().await;
    let mut config = config_for(&vhost);
    config.rabbitmq.reconnect_max_backoff_ms = 500;
    let actions: Vec<String> = (0..5).map(|i| format!("reconnect.action-{i}")).collect();
    for a in &actions {
        limit(&mut config, a, 2);
    }
    let service = Service::start(config).await.expect("service starts");
    let conn = connect(&vhost).await;
    let ch = confirm_channel(&conn).await;
    wait_for_topology(&conn).await;
    let limits: HashMap<String, u32> = actions.iter().map(|a| (a.clone(), 2)).collect();
    let workers = start_workers(&vhost, &limits).await;
    let total = 600u64;
    let mut submitted: HashMap<String, Vec<u64>> = HashMap::new();
    for id in 1..=total {
        let action = &actions[(id % 5) as usize];
        submitted.entry(action.clone()).or_default().push(id);
        let body = json!({"execution_id": id, "action_ref": action});
        publish(
            &ch,
            topology::REQUESTED_ROUTING_KEY,
            body.to_string().as_bytes(),
            json_props(),
        )
        .await;
    }
    poll_until(Duration::from_secs(120), "a third completed", || async {
        workers.finished() >= (total / 3) as usize
    })
    .await;
    assert!(
        close_executor_connections(&vhost).await >= 1,
        "found the executor's connection"
    );
    // On a timeout the check below says which executions are missing.
    wait_until(Duration::from_secs(180), || async {
        workers.finished() >= total as usize
    })
    .await;
    let problems = workers
        .record
        .lock()
        .expect("record")
        .violations(&submitted, &limits);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    drop(workers);
    service.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_unknown_and_premature_completions_free_nothing() {
    let vhost = TestVhost::create().await;
    let config = config_for(&vhost);
    let service = Service::start(config).await.expect("service starts");
    let conn = connect(&vhost).await;
    let ch = confirm_channel(&conn).await;
    wait_for_topology(&conn).await;
    worker_queue(&ch, "test.workers").await;
    let action = fifo_executor::model::ActionRef::parse("dup.action").expect("ref");
    for id in [1u64, 2, 3] {
        let body = json!({"execution_id": id, "action_ref": action.as_str()});
        publish(
            &ch,
            topology::REQUESTED_ROUTING_KEY,
            body.to_string().as_bytes(),
            json_props(),
        )
        .await;
    }
    let counter = conn.create_channel().await.expect("channel");
    poll_until(
        Duration::from_secs(60),
        "execution 1 dispatched",
        || async { count(&counter, "test.workers").await == 1 },
    )
    .await;
    let complete = |id: u64| json!({"execution_id": id, "status": "succeeded"}).to_string();
    // Unknown id, and one that is still waiting (never dispatched): neither frees the slot.
    publish(
        &ch,
        topology::COMPLETED_ROUTING_KEY,
        complete(999).as_bytes(),
        json_props(),
    )
    .await;
    publish(
        &ch,
        topology::COMPLETED_ROUTING_KEY,
        complete(3).as_bytes(),
        json_props(),
    )
    .await;
    let exec = service.executor.clone();
    poll_until(
        Duration::from_secs(60),
        "the premature completion was counted",
        || async {
            exec.stats(&action)
                .await
                .ok()
                .flatten()
                .is_some_and(|s| s.total_unmatched == 1)
        },
    )
    .await;
    let s = exec.stats(&action).await.expect("stats").expect("known");
    assert_eq!(
        (s.active_count, s.queue_length, s.total_completed),
        (1, 2, 0)
    );
    assert_eq!(
        count(&counter, "test.workers").await,
        1,
        "nothing more dispatched"
    );
    assert_eq!(exec.unmatched_unknown(), 1, "the unknown id was counted");
    // The real completion frees the slot once; its duplicate frees nothing more.
    publish(
        &ch,
        topology::COMPLETED_ROUTING_KEY,
        complete(1).as_bytes(),
        json_props(),
    )
    .await;
    publish(
        &ch,
        topology::COMPLETED_ROUTING_KEY,
        complete(1).as_bytes(),
        json_props(),
    )
    .await;
    // The duplicate is counted by the action if it arrives while the execution is still known
    // there (in the same batch as the real one), and executor-wide once it belongs to no action.
    poll_until(
        Duration::from_secs(60),
        "the duplicate was counted",
        || async {
            let per_action = exec
                .stats(&action)
                .await
                .ok()
                .flatten()
                .map_or(0, |s| s.total_unmatched);
            per_action + exec.unmatched_unknown() == 3
        },
    )
    .await;
    let s = exec.stats(&action).await.expect("stats").expect("known");
    assert_eq!(
        (s.active_count, s.queue_length, s.total_completed),
        (1, 1, 1)
    );
    assert_eq!(
        count(&counter, "test.workers").await,
        2,
        "exactly one more dispatched"
    );
    assert_eq!(
        count(&counter, topology::COMPLETED_QUEUE).await,
        0,
        "all completions acknowledged"
    );
    service.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runbook_api_rate_limit_takes_requests_at_its_rate_and_loses_none() {
    let vhost = TestVhost::create().await;
    let mut config = config_for(&vhost);
    // 120 a minute: two a second, in bursts of two.
    config.api.rate_limits.global = Some(config::GlobalRateLimit {
        enabled: true,
        max_requests_per_minute: 120,
    });
    limit(&mut config, "e2e.throttled", 10);
    let service = Service::start(config).await.expect("service starts");
    let conn = connect(&vhost).await;
    let ch = confirm_channel(&conn).await;
    wait_for_topology(&conn).await;
    let limits: HashMap<String, u32> = [("e2e.throttled".to_owned(), 10)].into();
    let workers = start_workers(&vhost, &limits).await;

    let ids: Vec<u64> = (1..=8).collect();
    for id in &ids {
        let body = json!({"execution_id": id, "action_ref": "e2e.throttled", "parameters": {}});
        publish(
            &ch,
            topology::REQUESTED_ROUTING_KEY,
            body.to_string().as_bytes(),
            json_props(),
        )
        .await;
    }
    // How fast requests are taken is checked on paused time in `rabbit::throttle`; here, that
    // a throttled intake loses nothing and keeps the order.
    poll_until(
        Duration::from_secs(60),
        "all throttled executions completed",
        || async { workers.finished() == ids.len() },
    )
    .await;
    {
        let r = workers.record.lock().expect("record");
        let submitted: HashMap<String, Vec<u64>> =
            [("e2e.throttled".to_owned(), ids.clone())].into();
        assert_eq!(r.violations(&submitted, &limits), Vec::<String>::new());
    }
    // The consumer had to wait for tokens at least once: eight requests, bursts of two.
    let metrics = fifo_executor::http::client::Client::for_listen_address(service.http_addr())
        .request("GET", "/metrics", None)
        .await
        .expect("GET /metrics");
    let metrics = String::from_utf8_lossy(&metrics.body);
    assert!(
        metrics.contains("attune_intake_throttled_total"),
        "the throttle's waits are counted"
    );
    drop(workers);
    service.shutdown().await.expect("clean shutdown");
}
