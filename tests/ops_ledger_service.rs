//! `fifo-executor serve` on the Postgres ledger (the default durability), with its HTTP API on a
//! real socket, the real RabbitMQ in a vhost of its own and a database of its own: the
//! operations hooks are the Postgres ones. Health checks land in `health_checks`, a policy set
//! over HTTP is in the `action` table and still in force after a restart, and a purge cycle
//! deletes old ledger rows.

mod common_pg;
mod support;

use std::time::Duration;

use common_pg::{TestDb, eventually};
use fifo_executor::app::Service;
use fifo_executor::config::{self, Config, Secret};
use fifo_executor::http::client::Client;
use fifo_executor::tools::ops;
use serde_json::json;
use support::TestVhost;

const TOKEN: &str = "ledger-service-token";
const DEADLINE: Duration = Duration::from_secs(30);

fn config_for(db: &TestDb, vhost: &TestVhost) -> Config {
    let mut c = Config::default();
    c.rabbitmq.url = vhost.url.clone();
    c.executor.durability = config::Durability::Ledger;
    c.executor.shutdown_timeout_seconds = 5;
    c.database.url = db.url.clone();
    c.api.listen = ([127, 0, 0, 1], 0).into();
    c.api.admin_token = Some(Secret::new(TOKEN));
    // Checks every second, so the first stored check comes within a second or two.
    c.health.interval_seconds = 1;
    c
}

fn client(service: &Service) -> Client {
    Client::for_listen_address(service.http_addr()).with_token(Some(TOKEN.to_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_the_ledger_stores_health_keeps_http_policies_across_a_restart_and_purges() {
    let db = TestDb::new().await;
    let vhost = TestVhost::create().await;
    let config = config_for(&db, &vhost);
    let service = Service::start(config.clone()).await.expect("starts");
    let policy = json!({"concurrency_limit": 3, "enabled": false,
                        "rate_limit": {"max": 2, "per_seconds": 60}});
    let set = ops::call(
        &client(&service),
        "PUT",
        "/api/v1/actions/ops.pinned/policy",
        Some(&policy),
    )
    .await
    .expect("policy set");
    assert_eq!(set["data"]["concurrency_limit"], 3);
    let (action_id, pinned, enabled): (i64, bool, bool) = sqlx::query_as(
        "SELECT id, policy_pinned, enabled FROM attune.action WHERE ref = 'ops.pinned'",
    )
    .fetch_one(&db.pool)
    .await
    .expect("the policy is in the action table");
    assert!(pinned && !enabled);

    eventually(DEADLINE, "a health check is stored", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM attune.health_checks")
            .fetch_one(&db.pool)
            .await
            .ok()?;
        (n > 0).then_some(())
    })
    .await;

    sqlx::query(
        "INSERT INTO attune.execution (id, action, status, created, updated, enqueued_at) \
         VALUES (1, $1, 'succeeded', now() - interval '30 days', now() - interval '30 days', \
                 now() - interval '30 days')",
    )
    .bind(action_id)
    .execute(&db.pool)
    .await
    .expect("an old finished execution");
    let purged = ops::call(
        &client(&service),
        "POST",
        "/api/v1/purge?dry_run=false",
        None,
    )
    .await
    .expect("purge");
    assert_eq!(
        purged["data"]["ledger"]["completed_executions"], 1,
        "{purged}"
    );
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM attune.execution")
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(left, 0);
    service.shutdown().await.expect("stops");

    let service = Service::start(config).await.expect("starts again");
    let read = ops::call(
        &client(&service),
        "GET",
        "/api/v1/actions/ops.pinned/policy",
        None,
    )
    .await
    .expect("policy read");
    assert_eq!(read["data"]["concurrency_limit"], 3);
    assert_eq!(read["data"]["enabled"], false);
    assert_eq!(
        read["data"]["rate_limit"],
        json!({"max": 2, "per_seconds": 60})
    );
    service.shutdown().await.expect("stops");
}
