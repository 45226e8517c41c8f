//! The whole service on the Postgres ledger, in-process, with test workers over the real
//! RabbitMQ: a request for an execution that ended before a restart, or beyond the ended ids
//! the executor remembers, is a duplicate; Postgres restarted in the middle of a load loses
//! nothing.

mod common_pg;
mod support;

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::time::Duration;

use common_pg::{TempPg, TestDb};
use fifo_executor::app::Service;
use fifo_executor::config::{self, Config};
use fifo_executor::http::client::Client;
use fifo_executor::rabbit::topology;
use fifo_executor::tools::ops;
use futures::StreamExt;
use lapin::Connection;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use serde_json::{Value, json};
use support::fleet::{self, Fleet, WorkerSettings};
use support::{TestVhost, poll_until, wait_until};

fn config_for(vhost: &TestVhost, db: &TestDb, limits: &HashMap<String, u32>) -> Config {
    support::init_tracing();
    common_pg::service_config(&vhost.url, db, limits)
}

fn workers(limits: &HashMap<String, u32>) -> WorkerSettings {
    WorkerSettings {
        duration_ms: 0..=3,
        failure_rate: 0.05,
        limits: limits.clone(),
    }
}

/// Per action, the ids of `requests` in submission order.
fn by_action(requests: &[(u64, String)]) -> HashMap<String, Vec<u64>> {
    let mut out: HashMap<String, Vec<u64>> = HashMap::new();
    for (id, action) in requests {
        out.entry(action.clone()).or_default().push(*id);
    }
    out
}

/// Waits (up to `deadline`) until the workers finished every one of `requests` and the ledger
/// ended them, then fails listing every execution that ran out of order, above its limit,
/// twice, not at all, or that the ledger records otherwise than its worker reported.
async fn assert_every_execution_ran_once(
    fleet: &Fleet,
    db: &TestDb,
    requests: &[(u64, String)],
    limits: &HashMap<String, u32>,
    deadline: Duration,
) {
    // On a timeout the checks below say which executions are missing.
    wait_until(deadline, || async { fleet.finished() >= requests.len() }).await;
    common_pg::until_ended(&db.pool, requests.len(), Duration::from_secs(30)).await;
    let (mut problems, outcomes) = {
        let record = fleet.record.lock().expect("record");
        (
            record.violations(&by_action(requests), limits),
            record.outcomes(),
        )
    };
    problems.extend(common_pg::ledger_disagreements(&db.pool, &outcomes).await);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The one action of the tests about ended ids, at limit 1.
const ONE_ACTION: &str = "history.a";

fn one_action() -> HashMap<String, u32> {
    HashMap::from([(ONE_ACTION.to_owned(), 1)])
}

/// Starts the service on the one action and waits until `probe` sees it consuming.
async fn start_one_action(vhost: &TestVhost, db: &TestDb, probe: &Connection) -> Service {
    let service = Service::start(config_for(vhost, db, &one_action()))
        .await
        .expect("service starts");
    fleet::until_consuming(probe, Duration::from_secs(30)).await;
    service
}

/// Runs executions `ids` (the next ones after those already run, from 1) through the service
/// until the workers finished them and the ledger has them ended.
async fn run_to_the_end(fleet: &Fleet, vhost: &TestVhost, db: &TestDb, ids: RangeInclusive<u64>) {
    let requests: Vec<(u64, String)> = ids.clone().map(|id| (id, ONE_ACTION.to_owned())).collect();
    fleet::publish_requests(&vhost.url, &requests).await;
    let n = *ids.end() as usize;
    poll_until(
        Duration::from_secs(30),
        &format!("{n} executions finished"),
        || async { fleet.finished() >= n },
    )
    .await;
    assert!(
        common_pg::until_ended(&db.pool, n, Duration::from_secs(10)).await,
        "the ledger has {n} ends"
    );
}

/// Publishes a request for `id` again, with `reply_to`, and returns the executor's answer.
async fn request_again(conn: &Connection, id: u64) -> Value {
    let mut answers = publish_again(conn, id).await;
    let answer = tokio::time::timeout(Duration::from_secs(10), answers.next())
        .await
        .expect("an answer on reply_to")
        .expect("reply stream open")
        .expect("reply delivered");
    serde_json::from_slice(&answer.data).expect("reply is JSON")
}

/// Publishes a request for `id` again, with `reply_to`, and returns where the answer comes.
async fn publish_again(conn: &Connection, id: u64) -> lapin::Consumer {
    let ch = fleet::confirm_channel(conn).await;
    let replies = fleet::reply_queue(&ch).await;
    let answers = ch
        .basic_consume(
            replies.as_str().into(),
            "replies".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume replies");
    let body = json!({"execution_id": id, "action_ref": ONE_ACTION, "parameters": {"again": true}});
    fleet::publish(
        &ch,
        topology::REQUESTED_ROUTING_KEY,
        body.to_string().as_bytes(),
        fleet::json_props().with_reply_to(replies),
    )
    .await;
    answers
}

/// Asks again for `id`, which ended, expects the answer "duplicate", and then runs one more
/// execution behind it: a second run of `id` would have been dispatched before it, so the
/// workers would have seen it.
async fn expect_duplicate(
    fleet: &Fleet,
    vhost: &TestVhost,
    db: &TestDb,
    conn: &Connection,
    id: u64,
    ran: u64,
) {
    let answer = request_again(conn, id).await;
    assert_eq!(answer["execution_id"], id);
    assert_eq!(answer["status"], "queued");
    assert_eq!(answer["duplicate"], true, "{answer}");
    run_to_the_end(fleet, vhost, db, ran + 1..=ran + 1).await;
    let all: Vec<(u64, String)> = (1..=ran + 1).map(|i| (i, ONE_ACTION.to_owned())).collect();
    let problems = fleet
        .record
        .lock()
        .expect("record")
        .violations(&by_action(&all), &one_action());
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_for_an_execution_that_ended_before_a_restart_is_a_duplicate() {
    let db = TestDb::new().await;
    let vhost = TestVhost::create().await;
    let probe = fleet::connect(&vhost.url).await;
    let service = start_one_action(&vhost, &db, &probe).await;
    let fleet = Fleet::start(&vhost.url, "history.workers", workers(&one_action())).await;
    run_to_the_end(&fleet, &vhost, &db, 1..=5).await;
    service.shutdown().await.expect("clean shutdown");

    // A new life knows nothing of 1..=5 in memory; only the ledger does.
    let service = start_one_action(&vhost, &db, &probe).await;
    expect_duplicate(&fleet, &vhost, &db, &probe, 3, 5).await;
    service.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_for_an_execution_that_ended_beyond_the_remembered_window_is_a_duplicate() {
    let db = TestDb::new().await;
    let vhost = TestVhost::create().await;
    let mut config = config_for(&vhost, &db, &one_action());
    config.executor.remember_ended_ids = 2;
    let service = Service::start(config).await.expect("service starts");
    let probe = fleet::connect(&vhost.url).await;
    fleet::until_consuming(&probe, Duration::from_secs(30)).await;
    let fleet = Fleet::start(&vhost.url, "window.workers", workers(&one_action())).await;
    // Memory keeps 3 and 4; 1 and 2 are only in the ledger.
    run_to_the_end(&fleet, &vhost, &db, 1..=4).await;
    expect_duplicate(&fleet, &vhost, &db, &probe, 1, 4).await;
    service.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_mid_load_loses_nothing_and_repeats_nothing() {
    const EXECUTIONS: u64 = 3000;
    let pg = TempPg::start().await;
    let db = TestDb::on_server(&pg.url()).await;
    let vhost = TestVhost::create().await;
    let limits: HashMap<String, u32> = (0..5u32)
        .map(|i| (format!("outage.action-{i}"), i + 1))
        .collect();
    let requests: Vec<(u64, String)> = (1..=EXECUTIONS)
        .map(|id| (id, format!("outage.action-{}", id * 7 % 5)))
        .collect();

    let service = Service::start(config_for(&vhost, &db, &limits))
        .await
        .expect("service starts");
    let probe = fleet::connect(&vhost.url).await;
    fleet::until_consuming(&probe, Duration::from_secs(30)).await;
    let fleet = Fleet::start(&vhost.url, "outage.workers", workers(&limits)).await;
    let url = vhost.url.clone();
    let to_publish = requests.clone();
    let producer = tokio::spawn(async move { fleet::publish_requests(&url, &to_publish).await });

    poll_until(Duration::from_secs(60), "a third finished", || async {
        fleet.finished() >= EXECUTIONS as usize / 3
    })
    .await;
    pg.stop().await;
    let at_stop = fleet.finished();
    // The outage must be felt before it ends: the ledger fails a write while requests and
    // completions keep coming.
    poll_until(
        Duration::from_secs(30),
        "the ledger failed a write",
        || async {
            service
                .ledger_counters()
                .is_some_and(|c| c.failed_attempts > 0)
        },
    )
    .await;
    pg.restart().await;
    println!("Postgres stopped and restarted after {at_stop} finished executions");

    producer.await.expect("every request published");
    assert_every_execution_ran_once(&fleet, &db, &requests, &limits, Duration::from_secs(120))
        .await;
    service.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_dispatch_waiting_for_the_admission_executions_still_run_once_in_order_and_the_ledger_agrees()
 {
    let db = TestDb::new().await;
    let vhost = TestVhost::create().await;
    let limits: HashMap<String, u32> = (0..3u32)
        .map(|i| (format!("prompt.action-{i}"), i + 1))
        .collect();
    let requests: Vec<(u64, String)> = (1..=600u64)
        .map(|id| (id, format!("prompt.action-{}", id % 3)))
        .collect();
    let mut config = config_for(&vhost, &db, &limits);
    config.database.dispatch_wait = fifo_executor::config::DispatchWait::Admission;
    let service = Service::start(config).await.expect("service starts");
    let probe = fleet::connect(&vhost.url).await;
    fleet::until_consuming(&probe, Duration::from_secs(30)).await;
    let fleet = Fleet::start(&vhost.url, "prompt.workers", workers(&limits)).await;
    fleet::publish_requests(&vhost.url, &requests).await;
    assert_every_execution_ran_once(&fleet, &db, &requests, &limits, Duration::from_secs(60)).await;
    service.shutdown().await.expect("clean shutdown");
}

/// Takes `n` requests from the executor's request queue without acknowledging them and
/// closes the channel: the broker puts them back, flagged as redelivered, as it does for an
/// executor that died holding them.
async fn leave_unacknowledged(conn: &Connection, n: usize) {
    let ch = conn.create_channel().await.expect("channel");
    let mut taken = ch
        .basic_consume(
            topology::REQUESTS_QUEUE.into(),
            "dies-holding-them".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume requests");
    for _ in 0..n {
        tokio::time::timeout(Duration::from_secs(10), taken.next())
            .await
            .expect("a request within 10 s")
            .expect("consumer open")
            .expect("delivered");
    }
    ch.close(200, "gone".into()).await.expect("close");
}

async fn attempt_of(db: &TestDb, id: u64) -> i32 {
    sqlx::query_scalar("SELECT attempt FROM attune.execution WHERE id = $1")
        .bind(i64::try_from(id).expect("small id"))
        .fetch_one(&db.pool)
        .await
        .expect("attempt")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_named_request_the_ledger_does_not_have_goes_out_as_attempt_one() {
    let db = TestDb::new().await;
    let vhost = TestVhost::create().await;
    let probe = fleet::connect(&vhost.url).await;
    // A first life declares the topology and records a clean stop.
    let service = start_one_action(&vhost, &db, &probe).await;
    service.shutdown().await.expect("clean shutdown");
    let fleet = Fleet::start(&vhost.url, "redelivery.workers", workers(&one_action())).await;

    // Request 1 was taken by a consumer that went away without acknowledging it, as an
    // executor that died before committing its acceptance would have. No dispatch leaves
    // before its acceptance is committed, so no worker can have it: it goes out as attempt 1,
    // like request 2, delivered for the first time.
    fleet::publish_requests(&vhost.url, &[(1, ONE_ACTION.to_owned())]).await;
    leave_unacknowledged(&probe, 1).await;
    fleet::publish_requests(&vhost.url, &[(2, ONE_ACTION.to_owned())]).await;
    let service = start_one_action(&vhost, &db, &probe).await;
    let ran: Vec<(u64, String)> = (1..=2).map(|i| (i, ONE_ACTION.to_owned())).collect();
    assert_every_execution_ran_once(&fleet, &db, &ran, &one_action(), Duration::from_secs(30))
        .await;
    assert_eq!(attempt_of(&db, 1).await, 1);
    assert_eq!(attempt_of(&db, 2).await, 1);
    service.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_started_while_postgres_restarts_waits_for_it_instead_of_exiting() {
    let pg = TempPg::start().await;
    let db = TestDb::on_server(&pg.url()).await;
    let vhost = TestVhost::create().await;
    let probe = fleet::connect(&vhost.url).await;
    // A service started by its supervisor (or after a kill -9) while Postgres restarts: its
    // migrations and its recovery find the server gone and must try again, not exit.
    pg.stop().await;
    let (service, ()) = tokio::join!(
        Service::start(config_for(&vhost, &db, &one_action())),
        async {
            // Longer than a connection is waited for (3 s): the start is refused outright.
            tokio::time::sleep(Duration::from_secs(4)).await;
            pg.restart().await;
        }
    );
    let service = service.expect("the service starts once Postgres is back");
    fleet::until_consuming(&probe, Duration::from_secs(30)).await;
    let fleet = Fleet::start(&vhost.url, "late.workers", workers(&one_action())).await;
    run_to_the_end(&fleet, &vhost, &db, 1..=3).await;
    service.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncommitted_execution_is_neither_dispatched_nor_answered_as_a_duplicate() {
    let pg = TempPg::start().await;
    let db = TestDb::on_server(&pg.url()).await;
    let vhost = TestVhost::create().await;
    let probe = fleet::connect(&vhost.url).await;
    let service = start_one_action(&vhost, &db, &probe).await;
    let fleet = Fleet::start(&vhost.url, "uncommitted.workers", workers(&one_action())).await;

    // With Postgres down, request 1 (its id named, its slot free) is accepted and waits for
    // its acceptance's commit before it may leave: were the executor to die now, the next one
    // would know nothing of 1 until its request came back, and could admit others of the
    // action while a worker still ran 1.
    pg.stop().await;
    fleet::publish_requests(&vhost.url, &[(1, ONE_ACTION.to_owned())]).await;
    poll_until(Duration::from_secs(30), "1 accepted", || async {
        service.executor.is_live(1)
    })
    .await;
    // The same request again, as the broker would deliver it after a reconnect: acknowledging
    // it now would leave nothing of 1 anywhere if the executor died before the commit.
    let mut answers = publish_again(&probe, 1).await;
    assert!(
        tokio::time::timeout(Duration::from_secs(2), answers.next())
            .await
            .is_err(),
        "no answer (and no ack) while 1 is uncommitted"
    );
    assert!(
        fleet.record.lock().expect("record").first_order.is_empty(),
        "no worker got 1 before its acceptance was committed"
    );
    pg.restart().await;
    let answer = tokio::time::timeout(Duration::from_secs(30), answers.next())
        .await
        .expect("an answer once Postgres is back")
        .expect("reply stream open")
        .expect("reply delivered");
    let answer: Value = serde_json::from_slice(&answer.data).expect("reply is JSON");
    assert_eq!(answer["duplicate"], true, "{answer}");
    assert!(common_pg::until_ended(&db.pool, 1, Duration::from_secs(30)).await);
    service.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_for_a_request_held_by_an_id_lookup_waits_for_it_and_cancels_it() {
    let pg = TempPg::start().await;
    let db = TestDb::on_server(&pg.url()).await;
    let vhost = TestVhost::create().await;
    // One dispatch a minute: after the first, executions wait in the queue, where a cancel
    // can still take them.
    let config = || {
        let mut c = config_for(&vhost, &db, &one_action());
        if let Some(p) = c.policies.actions.get_mut(ONE_ACTION) {
            p.rate_limit = Some(config::RateLimit {
                max: 1,
                per_seconds: 60,
            });
        }
        c
    };
    let probe = fleet::connect(&vhost.url).await;
    let service = Service::start(config()).await.expect("service starts");
    fleet::until_consuming(&probe, Duration::from_secs(30)).await;
    let fleet = Fleet::start(&vhost.url, "held.workers", workers(&one_action())).await;
    fleet::publish_requests(&vhost.url, &[(10, ONE_ACTION.to_owned())]).await;
    assert!(common_pg::until_ended(&db.pool, 1, Duration::from_secs(30)).await);
    service.shutdown().await.expect("clean shutdown");

    // A new life, whose memory cannot tell whether ids up to 10 ran: it asks the ledger.
    let service = Service::start(config())
        .await
        .expect("service starts again");
    fleet::until_consuming(&probe, Duration::from_secs(30)).await;
    fleet::publish_requests(&vhost.url, &[(11, ONE_ACTION.to_owned())]).await;
    assert!(common_pg::until_ended(&db.pool, 2, Duration::from_secs(30)).await);
    // 12 (above 10: no lookup) waits for the rate limit.
    fleet::publish_requests(&vhost.url, &[(12, ONE_ACTION.to_owned())]).await;
    let client = Client::for_listen_address(service.http_addr());
    let queued = || async {
        let path = format!("/api/v1/actions/{ONE_ACTION}/queue-stats");
        ops::call(&client, "GET", &path, None)
            .await
            .ok()
            .and_then(|v| v["data"]["queue_length"].as_u64())
    };
    poll_until(Duration::from_secs(10), "12 waits", || async {
        queued().await == Some(1)
    })
    .await;
    // With Postgres down, the lookup for 5 cannot answer, and the cancels for 5 and 12 come
    // first.
    pg.stop().await;
    fleet::publish_requests(&vhost.url, &[(5, ONE_ACTION.to_owned())]).await;
    // Time for the intake to take 5 and find that it cannot ask the ledger (the lookup fails
    // at once and is retried); only then do the cancels come.
    tokio::time::sleep(Duration::from_secs(1)).await;
    fleet::publish_cancels(&probe, &[5, 12]).await;
    // The cancel for 12 does not wait for 5's lookup.
    poll_until(
        Duration::from_secs(10),
        "12 leaves the queue while 5 is held",
        || async { queued().await == Some(0) },
    )
    .await;
    pg.restart().await;
    until_recorded_canceled(&db, 5).await;
    let outcomes = fleet.record.lock().expect("record").outcomes();
    assert!(
        !outcomes.contains_key(&5) && !outcomes.contains_key(&12),
        "5 and 12 were canceled, so they never ran"
    );
    service.shutdown().await.expect("clean shutdown");
}

/// Publishes a cancel for each id, in order, each confirmed.
/// Waits until the ledger records execution `id` as canceled.
async fn until_recorded_canceled(db: &TestDb, id: i64) {
    poll_until(
        Duration::from_secs(30),
        &format!("{id} is recorded as canceled"),
        || async {
            sqlx::query_scalar::<_, String>("SELECT status FROM attune.execution WHERE id = $1")
                .bind(id)
                .fetch_optional(&db.pool)
                .await
                .ok()
                .flatten()
                .as_deref()
                == Some("canceled")
        },
    )
    .await;
}

/// Messages ready and unacknowledged in one of the vhost's queues.
async fn messages_in(vhost: &TestVhost, queue: &str) -> Option<(u64, u64)> {
    let listing = vhost
        .rabbitmqctl(
            "list_queues",
            &[
                "--no-table-headers",
                "name",
                "messages_ready",
                "messages_unacknowledged",
            ],
        )
        .await;
    listing.lines().find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        match cols.as_slice() {
            [name, ready, unacked] if *name == queue => {
                Some((ready.parse().ok()?, unacked.parse().ok()?))
            }
            _ => None,
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_that_overtakes_its_request_still_cancels_it_after_a_restart() {
    let db = TestDb::new().await;
    let vhost = TestVhost::create().await;
    let probe = fleet::connect(&vhost.url).await;
    let service = start_one_action(&vhost, &db, &probe).await;
    let fleet = Fleet::start(&vhost.url, "ahead-restart.workers", workers(&one_action())).await;
    // The cancel for 30 comes first and is settled (acknowledged to the broker)…
    fleet::publish_cancels(&probe, &[30]).await;
    poll_until(Duration::from_secs(10), "the cancel is settled", || async {
        messages_in(&vhost, topology::CANCEL_QUEUE).await == Some((0, 0))
    })
    .await;
    // … then the executor restarts before 30's request comes: its memory is gone, and only
    // the ledger can tell that 30 was canceled.
    service.shutdown().await.expect("clean shutdown");
    let service = start_one_action(&vhost, &db, &probe).await;
    fleet::publish_requests(
        &vhost.url,
        &[(30, ONE_ACTION.to_owned()), (31, ONE_ACTION.to_owned())],
    )
    .await;
    poll_until(Duration::from_secs(30), "31 ran", || async {
        fleet.finished() >= 1
    })
    .await;
    until_recorded_canceled(&db, 30).await;
    let outcomes = fleet.record.lock().expect("record").outcomes();
    assert!(!outcomes.contains_key(&30), "30 was canceled: it never ran");
    let marks: i64 = sqlx::query_scalar("SELECT count(*) FROM attune.cancel_ahead")
        .fetch_one(&db.pool)
        .await
        .expect("count the marks");
    assert_eq!(marks, 0, "the mark was used up");
    service.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_that_overtakes_its_request_cancels_it_when_it_arrives() {
    let db = TestDb::new().await;
    let vhost = TestVhost::create().await;
    let probe = fleet::connect(&vhost.url).await;
    let service = start_one_action(&vhost, &db, &probe).await;
    let fleet = Fleet::start(&vhost.url, "ahead.workers", workers(&one_action())).await;
    // The cancel for 20 comes first (its request still behind others, say) and is settled.
    fleet::publish_cancels(&probe, &[20]).await;
    poll_until(Duration::from_secs(10), "the cancel is settled", || async {
        messages_in(&vhost, topology::CANCEL_QUEUE).await == Some((0, 0))
    })
    .await;
    let metrics = fifo_executor::ops::metrics::install().expect("the metrics recorder");
    let remembered = support::metric_value(
        &metrics.render(),
        "attune_cancels_total",
        &[("verdict", "remembered")],
    );
    assert!(remembered.is_some_and(|n| n >= 1.0), "{remembered:?}");
    // Then 20 arrives, with 21 behind it. The slot is free, yet 20 never runs.
    fleet::publish_requests(
        &vhost.url,
        &[(20, ONE_ACTION.to_owned()), (21, ONE_ACTION.to_owned())],
    )
    .await;
    poll_until(Duration::from_secs(30), "21 ran", || async {
        fleet.finished() >= 1
    })
    .await;
    until_recorded_canceled(&db, 20).await;
    poll_until(
        Duration::from_secs(10),
        "both requests are settled",
        || async { messages_in(&vhost, topology::REQUESTS_QUEUE).await == Some((0, 0)) },
    )
    .await;
    let outcomes = fleet.record.lock().expect("record").outcomes();
    assert!(
        !outcomes.contains_key(&20),
        "20 was canceled, so it never ran"
    );
    assert!(outcomes.contains_key(&21));
    service.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatch_no_worker_queue_takes_waits_and_goes_out_once_one_is_bound() {
    let db = TestDb::new().await;
    let vhost = TestVhost::create().await;
    let probe = fleet::connect(&vhost.url).await;
    let service = start_one_action(&vhost, &db, &probe).await;
    let action = fifo_executor::model::ActionRef::parse(ONE_ACTION).expect("ref");

    // Nobody has bound a queue to the dispatches yet: the broker returns the first one.
    fleet::publish_requests(&vhost.url, &[(1, ONE_ACTION.to_owned())]).await;
    poll_until(
        Duration::from_secs(30),
        "1's dispatch came back",
        || async {
            service
                .executor
                .stats(&action)
                .await
                .ok()
                .flatten()
                .is_some_and(|s| s.no_route_since.is_some() && s.queue_length == 1)
        },
    )
    .await;
    let health = service.health.check().await;
    let no_route = &health.checks["no_route"];
    assert!(
        no_route
            .detail
            .as_deref()
            .is_some_and(|d| d.contains(ONE_ACTION)),
        "{no_route:?}"
    );
    let stats = service.executor.stats(&action).await.ok().flatten();
    assert_eq!(
        stats.map(|s| s.active_count),
        Some(0),
        "no slot held for it"
    );
    assert_eq!(
        common_pg::statuses(&db, ONE_ACTION).await,
        vec![(1, "requested".to_owned())],
        "not running: no worker got it"
    );

    // A worker binds its queue a moment later and gets it within the retry interval.
    let fleet = Fleet::start(&vhost.url, "late-binding.workers", workers(&one_action())).await;
    let ran = vec![(1, ONE_ACTION.to_owned())];
    assert_every_execution_ran_once(&fleet, &db, &ran, &one_action(), Duration::from_secs(30))
        .await;
    assert_eq!(
        attempt_of(&db, 1).await,
        1,
        "the returned copy reached nobody"
    );
    let stats = service.executor.stats(&action).await.ok().flatten();
    assert_eq!(stats.and_then(|s| s.no_route_since), None);
    service.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatches_that_find_no_worker_queue_for_too_long_are_dead_lettered() {
    let db = TestDb::new().await;
    let vhost = TestVhost::create().await;
    let probe = fleet::connect(&vhost.url).await;
    let mut config = config_for(&vhost, &db, &one_action());
    config.executor.queue.no_route_timeout_seconds = 1;
    config.executor.queue.no_route_retry_ms = 200;
    let service = Service::start(config).await.expect("service starts");
    fleet::until_consuming(&probe, Duration::from_secs(30)).await;
    let requests: Vec<(u64, String)> = (1..=3).map(|i| (i, ONE_ACTION.to_owned())).collect();
    fleet::publish_requests(&vhost.url, &requests).await;
    let timed_out = (1..=3)
        .map(|i| (i, "timeout".to_owned()))
        .collect::<Vec<_>>();
    poll_until(Duration::from_secs(30), "all three timed out", || async {
        common_pg::statuses(&db, ONE_ACTION).await == timed_out
    })
    .await;
    let peek = fifo_executor::ops::dlq::Dlq::new(vhost.url.clone())
        .peek(10)
        .await
        .expect("the DLQ can be read");
    let classes: Vec<&str> = peek
        .entries
        .iter()
        .map(|l| l["error_class"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(classes, vec!["NoRoute"; 3], "{:?}", peek.entries);
    service.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatch_sent_again_after_a_lost_connection_has_its_raised_attempt_recorded_first() {
    // Found by the chaos run (seed 22): after a connection drop the publisher sent its
    // unconfirmed dispatches again as attempt + 1, but only in memory; the executor was then
    // killed, and its successor, reading the old attempt from the ledger, sent the same
    // attempt a third time. The raised attempt must be in the ledger before the copy leaves.
    let db = TestDb::new().await;
    let vhost = TestVhost::create().await;
    let proxy = support::proxy::Proxy::start().await;
    let direct = fleet::connect(&vhost.url).await;
    let ch = direct.create_channel().await.expect("a channel");
    fifo_executor::tools::declare_dispatch_queue(&ch, "again.workers", "#", FieldTable::default())
        .await
        .expect("a worker queue");
    let mut config = config_for(&vhost, &db, &one_action());
    config.rabbitmq.url = proxy.url(&vhost.name);
    let service = Service::start(config).await.expect("service starts");
    fleet::until_consuming(&direct, Duration::from_secs(30)).await;

    // 1 runs (the limit is 1), 2 waits with its acceptance committed.
    let requests: Vec<(u64, String)> = (1..=2).map(|i| (i, ONE_ACTION.to_owned())).collect();
    fleet::publish_requests(&vhost.url, &requests).await;
    poll_until(Duration::from_secs(30), "1 running, 2 waiting", || async {
        common_pg::statuses(&db, ONE_ACTION).await
            == vec![(1, "running".to_owned()), (2, "requested".to_owned())]
    })
    .await;
    // The broker's answers are held, so 2's dispatch, let go by a higher limit, reaches the
    // worker queue but its confirm never comes back: then the connection is lost.
    proxy.hold_from_broker();
    let action = fifo_executor::model::ActionRef::parse(ONE_ACTION).expect("a ref");
    service
        .executor
        .set_policy(&action, common_pg::limit(2))
        .expect("limit raised");
    poll_until(
        Duration::from_secs(10),
        "2 reached the worker queue",
        || async { support::queue_depth(&ch, "again.workers").await == 2 },
    )
    .await;
    proxy.cut();
    // Long enough for the cut to drop what was held before new connections pass again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.release();
    poll_until(Duration::from_secs(30), "2 sent again", || async {
        support::queue_depth(&ch, "again.workers").await == 3
    })
    .await;
    assert_eq!(
        support::take_dispatches(&ch, "again.workers").await,
        vec![(1, 1), (2, 1), (2, 2)]
    );
    // The ledger knows attempt 2 left (its admission may commit after the copy went out):
    // a restart now sends 2 again as attempt 3.
    poll_until(
        Duration::from_secs(10),
        "2's attempt 2 recorded",
        || async { attempt_of(&db, 2).await == 2 },
    )
    .await;
    service.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_whose_partitions_another_took_writes_and_dispatches_nothing_more_and_stops() {
    let db = TestDb::new().await;
    let (vhost_a, vhost_b) = (TestVhost::create().await, TestVhost::create().await);
    let probe_a = fleet::connect(&vhost_a.url).await;
    let mut config_a = config_for(&vhost_a, &db, &one_action());
    config_a.cluster.instance_id = "instance-a".to_owned();
    let a = Service::start(config_a).await.expect("a starts");
    fleet::until_consuming(&probe_a, Duration::from_secs(30)).await;
    let fleet_a = Fleet::start(&vhost_a.url, "fenced.workers", workers(&one_action())).await;
    run_to_the_end(&fleet_a, &vhost_a, &db, 1..=3).await;

    // A second instance on the same database (its own vhost, so the two share nothing else)
    // takes every partition: a was paused, or its network cut, and it does not know.
    let mut config_b = config_for(&vhost_b, &db, &one_action());
    config_b.cluster.instance_id = "instance-b".to_owned();
    let b = Service::start(config_b).await.expect("b starts");
    let owners: Vec<(String, i64)> =
        sqlx::query_as("SELECT owner, epoch FROM attune.partition ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .expect("partitions");
    assert_eq!(owners, vec![("instance-b".to_owned(), 2); 16]);

    // a still consumes and accepts in memory, but its first write is refused: it is fenced,
    // records nothing, dispatches nothing and acknowledges nothing.
    let more: Vec<(u64, String)> = (4..=6).map(|i| (i, ONE_ACTION.to_owned())).collect();
    fleet::publish_requests(&vhost_a.url, &more).await;
    poll_until(Duration::from_secs(30), "a fenced", || async {
        a.is_fenced()
    })
    .await;
    let stopped =
        tokio::time::timeout(Duration::from_secs(30), a.run_until(std::future::pending()))
            .await
            .expect("a stops by itself");
    assert!(
        matches!(stopped, Err(fifo_executor::app::AppError::Fenced)),
        "{stopped:?}"
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM attune.execution WHERE id > 3")
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(rows, 0, "nothing a wrote after the takeover");
    assert!(
        fleet_a
            .record
            .lock()
            .expect("record")
            .first_order
            .values()
            .flatten()
            .all(|id| *id <= 3),
        "no worker got 4 to 6 from a"
    );
    // What a never acknowledged is back in its queue for whoever owns the partitions now.
    poll_until(
        Duration::from_secs(30),
        "4 to 6 back in the queue",
        || async { messages_in(&vhost_a, topology::REQUESTS_QUEUE).await == Some((3, 0)) },
    )
    .await;

    let cluster = Client::for_listen_address(b.http_addr())
        .request("GET", "/api/v1/cluster", None)
        .await
        .expect("an answer");
    assert_eq!(cluster.status, 200);
    let body: Value = serde_json::from_slice(&cluster.body).expect("json");
    assert_eq!(body["data"]["instance_id"], "instance-b");
    assert_eq!(
        body["data"]["partitions"].as_array().map(Vec::len),
        Some(16)
    );
    assert_eq!(body["data"]["partitions"][0]["owner"], "instance-b");
    assert_eq!(body["data"]["partitions"][0]["epoch"], 2);
    b.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_taken_over_while_idle_notices_and_does_not_mark_the_new_owners_run_clean() {
    let db = TestDb::new().await;
    let (vhost_a, vhost_b) = (TestVhost::create().await, TestVhost::create().await);
    let mut config_a = config_for(&vhost_a, &db, &one_action());
    config_a.cluster.instance_id = "idle-a".to_owned();
    let a = Service::start(config_a).await.expect("a starts");
    let mut config_b = config_for(&vhost_b, &db, &one_action());
    config_b.cluster.instance_id = "idle-b".to_owned();
    let b = Service::start(config_b).await.expect("b starts");
    // a has nothing to write, but it checks its fence now and then and finds it gone.
    poll_until(
        Duration::from_secs(20),
        "idle a notices the takeover",
        || async { a.is_fenced() },
    )
    .await;
    // A clean stop now must not mark the run clean: it is b's run, and were b to crash, its
    // next start would skip raising attempts.
    a.shutdown().await.expect("a stops");
    let clean = stopped_cleanly(&db).await;
    assert!(!clean, "b's run is not marked clean by a");
    b.shutdown().await.expect("b stops");
    let clean = stopped_cleanly(&db).await;
    assert!(clean, "b, the owner, marks its own clean stop");
}

async fn stopped_cleanly(db: &TestDb) -> bool {
    sqlx::query_scalar("SELECT stopped_cleanly FROM attune.executor_run WHERE id = 1")
        .fetch_one(&db.pool)
        .await
        .expect("executor_run")
}
