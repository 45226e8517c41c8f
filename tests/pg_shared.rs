//! `cluster.mode: shared` in-process: two services on one vhost and one database share the
//! partitions through RabbitMQ's single-active-consumer partition queues. The one that
//! starts first owns every partition; the other takes requests from the shared intake and
//! carries them to the owner. When the owner stops gracefully, the other takes every
//! partition over from the ledger, and every execution still runs once, per action in
//! order, within its limit. A cancel that comes before its request reaches whichever
//! instance accepts the request.
//!
//! Either instance lists every action for the operations page, with its owner.
//!
//! Killing and pausing whole processes is `tests/cluster.rs`'s part.

mod common_pg;
mod support;

use std::collections::HashMap;
use std::time::Duration;

use common_pg::TestDb;
use fifo_executor::app::Service;
use fifo_executor::config::{ClusterMode, Config};
use support::fleet::{self, Fleet, WorkerSettings};
use support::{TestVhost, poll_until, wait_until};

fn config_for(vhost: &TestVhost, db: &TestDb, name: &str, limits: &HashMap<String, u32>) -> Config {
    support::init_tracing();
    let mut c = common_pg::service_config(&vhost.url, db, limits);
    c.cluster.mode = ClusterMode::Shared;
    c.cluster.instance_id = name.to_owned();
    c
}

/// Starts `a`, waits until it owns every partition, then starts `b` as its standby.
async fn start_pair(
    vhost: &TestVhost,
    db: &TestDb,
    limits: &HashMap<String, u32>,
) -> (Service, Service) {
    let a = Service::start(config_for(vhost, db, "a", limits))
        .await
        .expect("a starts");
    until_one_owns_all(db, "a").await;
    let b = Service::start(config_for(vhost, db, "b", limits))
        .await
        .expect("b starts");
    (a, b)
}

/// The owner of every partition row, in partition order.
async fn owners(db: &TestDb) -> Vec<String> {
    sqlx::query_scalar("SELECT owner FROM attune.partition ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap_or_default()
}

async fn until_one_owns_all(db: &TestDb, name: &str) {
    poll_until(
        Duration::from_secs(30),
        &format!("{name} owns every partition"),
        || async { owners(db).await == vec![name.to_owned(); 16] },
    )
    .await;
}

/// Every partition's clean-release mark, in partition order.
async fn released(db: &TestDb) -> Vec<bool> {
    sqlx::query_scalar("SELECT released_cleanly FROM attune.partition ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .expect("partitions")
}

fn by_action(requests: &[(u64, String)]) -> HashMap<String, Vec<u64>> {
    let mut out: HashMap<String, Vec<u64>> = HashMap::new();
    for (id, action) in requests {
        out.entry(action.clone()).or_default().push(*id);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_intake_and_one_takes_over_when_the_other_stops() {
    let db = TestDb::new().await;
    let vhost = TestVhost::create().await;
    let limits: HashMap<String, u32> = (0..12)
        .map(|i| (format!("shared.action-{i:02}"), 1 + i % 3))
        .collect();
    let (a, b) = start_pair(&vhost, &db, &limits).await;
    let fleet = Fleet::start(
        &vhost.url,
        "shared.workers",
        WorkerSettings {
            duration_ms: 0..=4,
            failure_rate: 0.05,
            limits: limits.clone(),
        },
    )
    .await;

    let mut actions: Vec<&String> = limits.keys().collect();
    actions.sort();
    let requests: Vec<(u64, String)> = (1..=1_200u64)
        .map(|id| (id, actions[(id as usize * 7) % actions.len()].clone()))
        .collect();
    let url = vhost.url.clone();
    let to_publish = requests.clone();
    let producer = tokio::spawn(async move {
        fleet::publish_requests_paced(&url, &to_publish, 40, Duration::from_millis(20)).await;
    });
    // Part-way through, the owner stops; b, a standby of every partition queue, takes them.
    poll_until(Duration::from_secs(60), "a third finished", || async {
        fleet.finished() >= requests.len() / 3
    })
    .await;
    a.shutdown().await.expect("a stops cleanly");
    until_one_owns_all(&db, "b").await;
    producer.await.expect("the producer ends");

    wait_until(Duration::from_secs(90), || async {
        fleet.finished() >= requests.len()
    })
    .await;
    common_pg::until_ended(&db.pool, requests.len(), Duration::from_secs(30)).await;
    let (mut problems, outcomes) = {
        let record = fleet.record.lock().expect("record");
        (
            record.violations(&by_action(&requests), &limits),
            record.outcomes(),
        )
    };
    problems.extend(common_pg::ledger_disagreements(&db.pool, &outcomes).await);
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // b took requests from the shared queue while a owned their partitions, and carried them.
    let metrics = fifo_executor::http::client::Client::for_listen_address(b.http_addr())
        .request("GET", "/metrics", None)
        .await
        .expect("metrics");
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    let forwarded = support::metric_value(&text, "attune_forwarded_total", &[("kind", "request")]);
    assert!(forwarded.is_some_and(|n| n > 0.0), "{forwarded:?}");
    // a released its partitions with everything committed, so b raised no attempt of a
    // waiting execution (re-sends of dispatches a's broker never confirmed may remain).
    assert_eq!(
        released(&db).await,
        vec![false; 16],
        "b's takeovers cleared the marks"
    );
    b.shutdown().await.expect("b stops cleanly");
    assert_eq!(
        released(&db).await,
        vec![true; 16],
        "b released every partition cleanly"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_before_its_request_cancels_it_on_whichever_instance_accepts_it() {
    let db = TestDb::new().await;
    let vhost = TestVhost::create().await;
    let limits = HashMap::from([("shared.cancel".to_owned(), 1)]);
    let (a, b) = start_pair(&vhost, &db, &limits).await;
    let conn = fleet::connect(&vhost.url).await;
    // No worker: execution 1 holds the one slot, 2 to 9 wait; their cancels come first.
    let ids: Vec<u64> = (2..=9).collect();
    fleet::publish_cancels(&conn, &ids).await;
    poll_until(Duration::from_secs(30), "the cancels are taken", || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM attune.cancel_ahead")
            .fetch_one(&db.pool)
            .await
            .unwrap_or(0)
            == ids.len() as i64
    })
    .await;
    let requests: Vec<(u64, String)> = (1..=9).map(|id| (id, "shared.cancel".to_owned())).collect();
    fleet::publish_requests(&vhost.url, &requests).await;
    poll_until(Duration::from_secs(30), "2 to 9 canceled", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM attune.execution WHERE status = 'canceled' AND id BETWEEN 2 AND 9",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap_or(0)
            == ids.len() as i64
    })
    .await;
    b.shutdown().await.expect("b stops");
    a.shutdown().await.expect("a stops");
}

/// `GET path` on an instance's API, as JSON.
async fn api(service: &fifo_executor::app::Service, path: &str) -> serde_json::Value {
    let client = fifo_executor::http::client::Client::for_listen_address(service.http_addr());
    fifo_executor::tools::ops::call(&client, "GET", path, None)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_s_actions_show_every_action_and_its_owner_on_either_instance() {
    let db = TestDb::new().await;
    let vhost = TestVhost::create().await;
    let limits = HashMap::from([("shared.page".to_owned(), 1)]);
    let (a, b) = start_pair(&vhost, &db, &limits).await;
    // A worker queue nobody consumes: 1 holds the slot, 2 and 3 wait, on a (which owns
    // every partition).
    let conn = fleet::connect(&vhost.url).await;
    let ch = conn.create_channel().await.expect("channel");
    fleet::worker_queue(&ch, "shared.page.worker").await;
    let requests: Vec<(u64, String)> = (1..=3).map(|id| (id, "shared.page".to_owned())).collect();
    fleet::publish_requests(&vhost.url, &requests).await;
    poll_until(Duration::from_secs(30), "a's queue_stats row", || async {
        sqlx::query_scalar::<_, i32>(
            "SELECT q.queue_length FROM attune.queue_stats q \
             JOIN attune.action x ON x.id = q.action_id WHERE x.ref = 'shared.page'",
        )
        .fetch_optional(&db.pool)
        .await
        .ok()
        .flatten()
            == Some(2)
    })
    .await;

    let on_a = api(&a, "/api/v1/actions?q=shared.page").await;
    let on_b = api(&b, "/api/v1/actions?q=shared.page").await;
    for (who, body) in [("a", &on_a), ("b", &on_b)] {
        assert_eq!(body["total"], 1, "{who}: {body}");
        let row = &body["data"][0];
        assert_eq!(
            (&row["queue_length"], &row["active_count"], &row["owner"]),
            (
                &serde_json::json!(2),
                &serde_json::json!(1),
                &serde_json::json!("a")
            ),
            "{who}: {row}"
        );
        assert!(row["partition"].is_u64(), "{who}: {row}");
    }
    let refreshed = api(&b, "/api/v1/actions?refs=shared.page,shared.none").await;
    assert_eq!(refreshed["data"][0]["owner"], "a");
    assert_eq!(refreshed["total"], 1);

    // The detail: a has the lists; b says who does.
    let from_a = api(&a, "/api/v1/actions/shared.page").await;
    assert_eq!(from_a["data"]["waiting"].as_array().map(Vec::len), Some(2));
    assert!(from_a["data"].get("note").is_none());
    let from_b = api(&b, "/api/v1/actions/shared.page").await;
    let d = &from_b["data"];
    assert_eq!(d["waiting"], serde_json::json!([]));
    assert_eq!(
        (&d["waiting_total"], &d["running_total"]),
        (&serde_json::json!(2), &serde_json::json!(1))
    );
    assert_eq!(d["stats"]["owner"], "a");
    assert!(d["note"].as_str().is_some_and(|n| n.contains("(a)")), "{d}");
    let overview = api(&b, "/api/v1/overview").await;
    assert_eq!(
        (&overview["data"]["instance"], &overview["data"]["mode"]),
        (&serde_json::json!("b"), &serde_json::json!("shared"))
    );
    b.shutdown().await.expect("b stops");
    a.shutdown().await.expect("a stops");
}
