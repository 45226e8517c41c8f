//! Idle actions giving up their actors (`executor.queue.passivate_after_seconds`) in the whole
//! service, on the Postgres ledger, with test workers over the real RabbitMQ: retired actions
//! stay listed with their counters (API, `queue_stats`, metrics), and requests and a policy
//! change wake them with FIFO, limits and counters intact, also across a restart.

mod common_pg;
mod support;

use std::collections::HashMap;
use std::time::Duration;

use common_pg::TestDb;
use fifo_executor::app::Service;
use fifo_executor::config::{Config, Secret};
use fifo_executor::http::client::Client;
use fifo_executor::tools::ops;
use serde_json::{Value, json};
use support::fleet::{self, Fleet, WorkerSettings};
use support::{TestVhost, poll_until};

const TOKEN: &str = "passivate-token";
const ACTIONS: [&str; 3] = ["rest.a", "rest.b", "rest.c"];

fn limits(a: u32) -> HashMap<String, u32> {
    HashMap::from([
        ("rest.a".to_owned(), a),
        ("rest.b".to_owned(), 2),
        ("rest.c".to_owned(), 3),
    ])
}

fn config_for(vhost: &TestVhost, db: &TestDb) -> Config {
    support::init_tracing();
    let mut c = common_pg::service_config(&vhost.url, db, &limits(1));
    c.executor.queue.passivate_after_seconds = 1;
    c.api.admin_token = Some(Secret::new(TOKEN.to_owned()));
    c
}

/// Requests `ids`, spread over the actions in turn.
fn requests(ids: std::ops::RangeInclusive<u64>) -> Vec<(u64, String)> {
    ids.map(|id| (id, ACTIONS[(id % 3) as usize].to_owned()))
        .collect()
}

fn by_action(requests: &[(u64, String)]) -> HashMap<String, Vec<u64>> {
    let mut out: HashMap<String, Vec<u64>> = HashMap::new();
    for (id, action) in requests {
        out.entry(action.clone()).or_default().push(*id);
    }
    out
}

async fn get(client: &Client, path: &str) -> Value {
    ops::call(client, "GET", path, None)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// `(actors_awake, actors_retired)` from the overview.
async fn actors(client: &Client) -> (u64, u64) {
    let totals = &get(client, "/api/v1/overview").await["data"]["totals"];
    (
        totals["actors_awake"].as_u64().expect("actors_awake"),
        totals["actors_retired"].as_u64().expect("actors_retired"),
    )
}

async fn until_all_retired(client: &Client) {
    poll_until(
        Duration::from_secs(30),
        "every action's actor retired",
        || async { actors(client).await == (0, ACTIONS.len() as u64) },
    )
    .await;
}

/// Publishes `reqs` in small paced chunks, so that actions go idle and retire in between,
/// and waits until the workers finished all `total` so far and the ledger ended them.
async fn run(fleet: &Fleet, vhost: &TestVhost, db: &TestDb, reqs: &[(u64, String)], total: usize) {
    fleet::publish_requests_paced(&vhost.url, reqs, 7, Duration::from_millis(400)).await;
    poll_until(
        Duration::from_secs(60),
        &format!("{total} executions finished"),
        || async { fleet.finished() >= total },
    )
    .await;
    assert!(
        common_pg::until_ended(&db.pool, total, Duration::from_secs(30)).await,
        "the ledger has {total} ends"
    );
}

fn assert_ran_once_in_order(fleet: &Fleet, all: &[(u64, String)], limits: &HashMap<String, u32>) {
    let problems = fleet
        .record
        .lock()
        .expect("record")
        .violations(&by_action(all), limits);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

async fn queue_stats(client: &Client, action: &str) -> Value {
    get(client, &format!("/api/v1/actions/{action}/queue-stats")).await["data"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_actions_retire_and_come_back_with_counters_fifo_and_limits() {
    let db = TestDb::new().await;
    let vhost = TestVhost::create().await;
    let config = config_for(&vhost, &db);
    let service = Service::start(config.clone())
        .await
        .expect("service starts");
    let probe = fleet::connect(&vhost.url).await;
    fleet::until_consuming(&probe, Duration::from_secs(30)).await;
    let workers = WorkerSettings {
        duration_ms: 0..=5,
        failure_rate: 0.1,
        limits: limits(2),
    };
    let fleet = Fleet::start(&vhost.url, "rest.workers", workers).await;
    let client = Client::for_listen_address(service.http_addr()).with_token(Some(TOKEN.into()));

    // 1. Thirty executions; then every action is idle and retires.
    let first = requests(1..=30);
    run(&fleet, &vhost, &db, &first, 30).await;
    until_all_retired(&client).await;
    for action in ACTIONS {
        let stats = queue_stats(&client, action).await;
        assert_eq!(stats["total_enqueued"], 10, "{action}: {stats}");
        assert_eq!(stats["total_completed"], 10, "{action}: {stats}");
        assert_eq!(stats["queue_length"], 0);
    }
    let listed = get(&client, "/api/v1/actions").await;
    assert_eq!(listed["total"], 3, "{listed}");
    // Reading them woke none.
    assert_eq!(actors(&client).await, (0, 3));
    let metrics = client
        .request("GET", "/metrics", None)
        .await
        .expect("GET /metrics");
    let metrics = String::from_utf8_lossy(&metrics.body);
    for action in ACTIONS {
        assert!(
            metrics.contains(&format!("action=\"{action}\"")),
            "{action} is in /metrics"
        );
    }
    common_pg::eventually(
        Duration::from_secs(10),
        "queue_stats has the counters",
        || async {
            let rows: Vec<(i64, i64)> =
                sqlx::query_as("SELECT total_enqueued, total_completed FROM attune.queue_stats")
                    .fetch_all(&db.pool)
                    .await
                    .ok()?;
            (rows.len() == 3 && rows.iter().all(|r| *r == (10, 10))).then_some(())
        },
    )
    .await;

    // 2. A policy change wakes rest.a with its counters; then more work for all, paced so
    // that the actions retire and wake again and again.
    let answer = ops::call(
        &client,
        "PUT",
        "/api/v1/actions/rest.a/policy",
        Some(&json!({"concurrency_limit": 2})),
    )
    .await
    .expect("PUT policy");
    assert_eq!(answer["data"]["concurrency_limit"], 2, "{answer}");
    let stats = queue_stats(&client, "rest.a").await;
    assert_eq!(
        (
            stats["max_concurrent"].as_u64(),
            stats["total_enqueued"].as_u64()
        ),
        (Some(2), Some(10))
    );
    let second = requests(31..=120);
    run(&fleet, &vhost, &db, &second, 120).await;
    let all: Vec<(u64, String)> = first.iter().chain(&second).cloned().collect();
    assert_ran_once_in_order(&fleet, &all, &limits(2));
    until_all_retired(&client).await;
    for action in ACTIONS {
        let stats = queue_stats(&client, action).await;
        assert_eq!(stats["total_enqueued"], 40, "{action}: {stats}");
        assert_eq!(stats["total_completed"], 40, "{action}: {stats}");
    }
    assert_eq!(queue_stats(&client, "rest.a").await["max_concurrent"], 2);
    service.shutdown().await.expect("clean shutdown");

    // 3. A new life recovers from the ledger (nothing was left queued) and goes on; the
    // policy set over the API is still in force.
    let service = Service::start(config).await.expect("service starts again");
    fleet::until_consuming(&probe, Duration::from_secs(30)).await;
    let client = Client::for_listen_address(service.http_addr()).with_token(Some(TOKEN.into()));
    let third = requests(121..=150);
    run(&fleet, &vhost, &db, &third, 150).await;
    let all: Vec<(u64, String)> = all.iter().chain(&third).cloned().collect();
    assert_ran_once_in_order(&fleet, &all, &limits(2));
    until_all_retired(&client).await;
    assert_eq!(queue_stats(&client, "rest.a").await["max_concurrent"], 2);
    service.shutdown().await.expect("clean shutdown");
}
