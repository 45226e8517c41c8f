//! What the operations side keeps in Postgres, against the real server, each test in a
//! database of its own: health results stored (and a failing store that stops nothing),
//! policies set over HTTP written to the `action` table and kept by the poller, and the purge
//! of old ledger rows (dry run, batches, and never a live execution).

mod common_pg;
mod support;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use common_pg::{Rig, TestDb, action, eventually};
use fifo_executor::config::HealthThresholds;
use fifo_executor::core::{ActionPolicy, PolicyPatch, PolicySource, RateLimit, UniformPolicy};
use fifo_executor::db::ops::{DbHealthStore, DbLedgerPurge};
use fifo_executor::db::policies::{DbPolicySource, DbPolicyStore};
use fifo_executor::model::ActionRef;
use fifo_executor::ops::health::{HealthMonitor, Status};
use fifo_executor::ops::hooks::{HISTORY_RETENTION, LedgerPurged, PolicyStore};
use fifo_executor::ops::metrics::names;
use fifo_executor::ops::purge::{PurgeSettings, Purger, Trigger};
use sqlx::Row;
use support::idle_executor;

// ---------------------------------------------------------------------------------------------
// Health

#[tokio::test]
async fn each_health_check_is_stored_with_its_time_status_checks_and_totals() {
    let db = TestDb::new().await;
    let exec = idle_executor().await;
    let monitor = HealthMonitor::new(
        exec.clone(),
        None,
        HealthThresholds::default(),
        true,
        Arc::new(DbHealthStore::new(db.pool.clone(), &db.schema)),
    );
    let first = monitor.check().await;
    let second = monitor.check().await;
    let rows = sqlx::query(
        "SELECT checked_at, status, emergency_mode, checks, actions, queued, active, dlq, stuck, \
         stalled FROM attune.health_checks ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .expect("read");
    assert_eq!(rows.len(), 2);
    for (row, report) in rows.iter().zip([&first, &second]) {
        let at: chrono::DateTime<chrono::Utc> = row.get("checked_at");
        // Postgres keeps microseconds.
        assert_eq!(at.timestamp_micros(), report.last_check.timestamp_micros());
        assert_eq!(row.get::<String, _>("status"), "healthy");
        assert!(row.get::<bool, _>("emergency_mode"));
        let checks: serde_json::Value = row.get("checks");
        assert_eq!(checks, serde_json::to_value(&report.checks).expect("json"));
        assert_eq!(checks["stuck_executions"]["critical"], 50);
        assert_eq!(row.get::<i32, _>("actions"), 0);
        assert_eq!(row.get::<i64, _>("queued"), 0);
        assert_eq!(
            row.get::<Option<i64>, _>("dlq"),
            None,
            "the DLQ is disabled"
        );
        assert_eq!(row.get::<i64, _>("stuck"), 0);
    }
    exec.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_store_that_fails_neither_stops_the_health_loop_nor_hides_the_result() {
    let db = TestDb::new().await;
    // A database that does not exist: every store fails at once.
    let broken =
        fifo_executor::db::connect_lazy(&db.url.replace(&db.name, "fifo_no_such_database"), 2)
            .expect("pool");
    let exec = idle_executor().await;
    let monitor = Arc::new(HealthMonitor::new(
        exec.clone(),
        None,
        HealthThresholds::default(),
        false,
        Arc::new(DbHealthStore::new(broken, &db.schema)),
    ));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(monitor.clone().run(Duration::from_millis(200), stopped));
    let first = eventually(Duration::from_secs(20), "a first check", || async {
        monitor.latest()
    })
    .await;
    assert_eq!(first.status, Status::Healthy);
    eventually(Duration::from_secs(20), "a later check", || async {
        monitor.latest().filter(|r| r.last_check > first.last_check)
    })
    .await;
    let _ = stop.send(true);
    task.await.expect("the loop ends on shutdown, not before");
    exec.shutdown(Duration::from_secs(5)).await;
}

// ---------------------------------------------------------------------------------------------
// Policies

/// What the configuration says for every action: disabled, limit 1, at most 5 a second. A
/// policy set over HTTP must win over all three.
struct StrictConfig;

impl PolicySource for StrictConfig {
    fn policy_for(&self, _action: &ActionRef) -> ActionPolicy {
        ActionPolicy {
            concurrency_limit: NonZeroU32::MIN,
            rate_limit: Some(RateLimit {
                max: NonZeroU32::new(5).expect("5"),
                per: Duration::from_secs(1),
            }),
            enabled: false,
        }
    }
}

fn open_policy(limit: u32) -> ActionPolicy {
    ActionPolicy {
        concurrency_limit: NonZeroU32::new(limit).expect("nonzero"),
        rate_limit: None,
        enabled: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_set_over_http_is_the_action_row_and_the_poller_neither_reverts_nor_loses_it() {
    let db = TestDb::new().await;
    let (source, mut rig) = Rig::on_action_table(&db, Arc::new(StrictConfig)).await;
    let store = DbPolicyStore::new(db.pool.clone(), &db.schema, source.clone());
    let a = action("policy.pinned");
    let set = open_policy(4);

    store
        .apply(&rig.exec, &a, PolicyPatch::whole(set))
        .await
        .expect("stored");
    assert_eq!(rig.exec.policy(&a), set, "applied at once");
    let row = sqlx::query(
        "SELECT enabled, concurrency_limit, rate_limit_max, rate_limit_per_seconds, \
         policy_pinned FROM attune.action WHERE ref = $1",
    )
    .bind(a.as_str())
    .fetch_one(&db.pool)
    .await
    .expect("the row exists");
    assert!(row.get::<bool, _>("enabled"));
    assert_eq!(row.get::<Option<i32>, _>("concurrency_limit"), Some(4));
    assert_eq!(row.get::<Option<i32>, _>("rate_limit_max"), None);
    assert_eq!(row.get::<Option<i32>, _>("rate_limit_per_seconds"), None);
    assert!(row.get::<bool, _>("policy_pinned"));

    // The poller reads the row as the whole policy: no rate limit and enabled, although the
    // configuration says otherwise.
    let applied = source.refresh(&db.pool, &rig.exec).await.expect("poll");
    assert!(applied.is_empty(), "the poller changed {applied:?}");
    assert_eq!(rig.exec.policy(&a), set);

    // A restart reads the same policy from the table.
    let after_restart = DbPolicySource::new(&db.schema, Arc::new(StrictConfig));
    after_restart.load(&db.pool).await.expect("load");
    assert_eq!(after_restart.policy_for(&a), set);

    // The table is the one truth: an executor policy that disagrees with it (as a PUT that
    // lost a race would leave) is corrected by the next poll...
    rig.exec.set_policy(&a, open_policy(9)).expect("set");
    source.refresh(&db.pool, &rig.exec).await.expect("poll");
    assert_eq!(rig.exec.policy(&a), set);
    // ...and an operator's UPDATE of the pinned row is applied like any other.
    sqlx::query("UPDATE attune.action SET enabled = false, rate_limit_max = 2, rate_limit_per_seconds = 60 WHERE ref = $1")
        .bind(a.as_str())
        .execute(&db.pool)
        .await
        .expect("update");
    source.refresh(&db.pool, &rig.exec).await.expect("poll");
    let now = rig.exec.policy(&a);
    assert!(!now.enabled);
    assert_eq!(now.concurrency_limit.get(), 4);
    assert_eq!(
        now.rate_limit,
        Some(RateLimit {
            max: NonZeroU32::new(2).expect("2"),
            per: Duration::from_secs(60)
        })
    );

    // A policy for an action the table has no row for yet creates the row.
    let fresh = action("policy.fresh");
    store
        .apply(&rig.exec, &fresh, PolicyPatch::whole(open_policy(2)))
        .await
        .expect("stored");
    let (pinned, limit): (bool, Option<i32>) =
        sqlx::query_as("SELECT policy_pinned, concurrency_limit FROM attune.action WHERE ref = $1")
            .bind(fresh.as_str())
            .fetch_one(&db.pool)
            .await
            .expect("created");
    assert_eq!((pinned, limit), (true, Some(2)));
    rig.shutdown().await;
}

#[tokio::test]
async fn a_policy_the_table_cannot_take_changes_nothing() {
    let db = TestDb::new().await;
    let source = Arc::new(DbPolicySource::new(
        &db.schema,
        Arc::new(UniformPolicy(ActionPolicy::default())),
    ));
    let exec = idle_executor().await;
    let store = DbPolicyStore::new(db.pool.clone(), &db.schema, source);
    let a = action("policy.huge");
    let err = store
        .apply(&exec, &a, PolicyPatch::whole(open_policy(u32::MAX)))
        .await
        .expect_err("refused");
    assert!(err.0.contains("concurrency_limit"), "{err}");
    assert_eq!(exec.policy(&a), ActionPolicy::default());
    // The pool is closed: storing fails, and the executor keeps its policy.
    db.pool.close().await;
    assert!(
        store
            .apply(&exec, &a, PolicyPatch::whole(open_policy(3)))
            .await
            .is_err()
    );
    assert_eq!(exec.policy(&a), ActionPolicy::default());
    exec.shutdown(Duration::from_secs(5)).await;
}

// ---------------------------------------------------------------------------------------------
// Ledger purge

const DAY: i64 = 86_400;

/// Creates an action row and returns its id.
async fn action_row(db: &TestDb, name: &str) -> i64 {
    sqlx::query_scalar("INSERT INTO attune.action (ref) VALUES ($1) RETURNING id")
        .bind(name)
        .fetch_one(&db.pool)
        .await
        .expect("action row")
}

async fn execution(db: &TestDb, id: i64, action: i64, status: &str, age_seconds: i64) {
    sqlx::query(
        "INSERT INTO attune.execution (id, action, status, created, updated, enqueued_at) \
         VALUES ($1, $2, $3, now() - make_interval(secs => $4), \
                 now() - make_interval(secs => $4), now() - make_interval(secs => $4))",
    )
    .bind(id)
    .bind(action)
    .bind(status)
    .bind(age_seconds as f64)
    .execute(&db.pool)
    .await
    .expect("execution row");
}

async fn stats_row(db: &TestDb, action: i64, queue_length: i32, age_seconds: i64) {
    sqlx::query(
        "INSERT INTO attune.queue_stats (action_id, queue_length, last_updated) \
         VALUES ($1, $2, now() - make_interval(secs => $3))",
    )
    .bind(action)
    .bind(queue_length)
    .bind(age_seconds as f64)
    .execute(&db.pool)
    .await
    .expect("stats row");
}

/// A ledger with rows of every kind, old and recent; returns the ids of the actions whose
/// `queue_stats` rows must stay.
async fn seed(db: &TestDb) -> Vec<i64> {
    let idle = action_row(db, "purge.idle").await;
    let busy = action_row(db, "purge.busy").await;
    let waiting = action_row(db, "purge.waiting").await;
    let recent = action_row(db, "purge.recent").await;
    // Seven finished executions ten days old: to go.
    for (id, status) in (1..=7).zip([
        "succeeded",
        "failed",
        "canceled",
        "timeout",
        "succeeded",
        "failed",
        "succeeded",
    ]) {
        execution(db, id, idle, status, 10 * DAY).await;
    }
    // Finished an hour ago: stays.
    execution(db, 8, idle, "succeeded", 3600).await;
    // Queued or running for ten days: never purged from the ledger, whatever their age.
    for (id, status) in [(9, "requested"), (10, "scheduled"), (11, "running")] {
        execution(db, id, busy, status, 10 * DAY).await;
    }
    // Idle for two hours and nothing live: goes. The others stay: a live execution in the
    // ledger, executions waiting, or recently updated.
    stats_row(db, idle, 0, 7200).await;
    stats_row(db, busy, 0, 7200).await;
    stats_row(db, waiting, 3, 7200).await;
    stats_row(db, recent, 0, 60).await;
    for days in [31, 32, 40] {
        sqlx::query(
            "INSERT INTO attune.queue_snapshots (snapshot_time, action_id, queue_length) \
             VALUES (now() - make_interval(days => $1), $2, 1)",
        )
        .bind(days)
        .bind(idle)
        .execute(&db.pool)
        .await
        .expect("snapshot");
    }
    sqlx::query(
        "INSERT INTO attune.queue_snapshots (snapshot_time, action_id, queue_length) \
         VALUES (now() - interval '29 days', $1, 1)",
    )
    .bind(idle)
    .execute(&db.pool)
    .await
    .expect("snapshot");
    for days in [31, 45, 0] {
        sqlx::query(
            "INSERT INTO attune.health_checks (checked_at, status, emergency_mode, checks, \
             actions, queued, active, stuck, stalled) \
             VALUES (now() - make_interval(days => $1), 'healthy', false, '{}', 0, 0, 0, 0, 0)",
        )
        .bind(days)
        .execute(&db.pool)
        .await
        .expect("health row");
    }
    vec![busy, waiting, recent]
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&db.pool)
        .await
        .expect("count")
}

fn settings() -> PurgeSettings {
    PurgeSettings {
        max_queued_age: Duration::from_secs(7200),
        max_running_age: Duration::from_secs(3600),
        max_completed_age: Duration::from_secs(7 * DAY as u64),
        max_stale_stats_age: Duration::from_secs(3600),
        max_history_age: HISTORY_RETENTION,
    }
}

// The only test in this binary that moves the purge counters (the recorder is process-wide).
#[tokio::test]
async fn the_ledger_purge_counts_in_a_dry_run_deletes_in_batches_and_spares_live_executions() {
    let handle = fifo_executor::ops::metrics::install().expect("recorder");
    let db = TestDb::new().await;
    let kept_stats = seed(&db).await;
    let exec = idle_executor().await;
    // Batches of three: seven finished executions take three statements.
    let purger = Purger::new(
        exec.clone(),
        settings(),
        Arc::new(DbLedgerPurge::new(db.pool.clone(), &db.schema).with_batch(3)),
    );
    let want = LedgerPurged {
        completed_executions: 7,
        stale_stats: 1,
        old_snapshots: 3,
        old_health_checks: 2,
    };

    let (logs, _guard) = support::capture_logs();
    let dry = purger.run_cycle(true, Trigger::Manual).await;
    assert_eq!(dry.ledger, Some(want), "{:?}", dry.ledger_error);
    for line in [
        "[purge][dry-run] Would purge 7 finished executions from the ledger (age over max: 604800s)",
        "[purge][dry-run] Would purge 1 idle queue_stats rows from the ledger (age over max: 3600s)",
        "[purge][dry-run] Would purge 3 queue_snapshots rows from the ledger (age over max: 2592000s)",
        "[purge][dry-run] Would purge 2 health_checks rows from the ledger (age over max: 2592000s)",
    ] {
        assert!(logs.text().contains(line), "{line} in {}", logs.text());
    }
    assert_eq!(
        count(&db, "SELECT count(*) FROM attune.execution").await,
        11
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM attune.queue_stats").await,
        4
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM attune.queue_snapshots").await,
        4
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM attune.health_checks").await,
        3
    );

    let live = purger.run_cycle(false, Trigger::Scheduled).await;
    assert_eq!(live.ledger, Some(want), "{:?}", live.ledger_error);
    assert!(
        logs.text().contains(
            "[purge] Purged 7 finished executions from the ledger (age over max: 604800s)"
        ),
        "{}",
        logs.text()
    );
    let left: Vec<i64> = sqlx::query_scalar("SELECT id FROM attune.execution ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .expect("ids");
    assert_eq!(left, vec![8, 9, 10, 11]);
    let mut stats: Vec<i64> = sqlx::query_scalar("SELECT action_id FROM attune.queue_stats")
        .fetch_all(&db.pool)
        .await
        .expect("stats");
    stats.sort_unstable();
    assert_eq!(stats, kept_stats);
    assert_eq!(
        count(&db, "SELECT count(*) FROM attune.queue_snapshots").await,
        1
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM attune.health_checks").await,
        1
    );

    // Nothing old is left: a second cycle finds nothing.
    let again = purger.run_cycle(false, Trigger::Scheduled).await;
    assert_eq!(again.ledger, Some(LedgerPurged::default()));

    let text = handle.render();
    for (table, n) in want.by_table() {
        for mode in ["dry_run", "live"] {
            assert_eq!(
                support::metric_value(
                    &text,
                    names::PURGE_LEDGER_ROWS_TOTAL,
                    &[("table", table), ("mode", mode)]
                ),
                Some(n as f64),
                "{table} {mode}"
            );
        }
    }
    exec.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_ledger_purge_that_fails_is_reported_and_the_cycle_still_ends() {
    let db = TestDb::new().await;
    let exec = idle_executor().await;
    let purge = DbLedgerPurge::new(db.pool.clone(), &db.schema);
    db.pool.close().await;
    let purger = Purger::new(exec.clone(), settings(), Arc::new(purge));
    let report = purger.run_cycle(false, Trigger::Manual).await;
    assert_eq!(report.ledger, None);
    assert!(report.ledger_error.is_some());
    exec.shutdown(Duration::from_secs(5)).await;
}
