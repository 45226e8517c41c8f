//! `queue_stats` and `queue_snapshots` against the real Postgres.

mod common_pg;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common_pg::{Rig, TestDb, action, eventually, limit};
use fifo_executor::core::memory::DiscardSink;
use fifo_executor::core::{QueueSettings, QueueStats, StatsObserver, UniformPolicy};
use fifo_executor::db::actions::ActionIds;
use fifo_executor::db::stats::{StatsOptions, StatsWriter};
use fifo_executor::model::{ActionRef, EndStatus};

type Row = (
    String,
    i32,
    i32,
    i32,
    Option<DateTime<Utc>>,
    i64,
    i64,
    DateTime<Utc>,
);

async fn rows(db: &TestDb) -> Vec<Row> {
    sqlx::query_as(
        "SELECT a.ref, qs.queue_length, qs.active_count, qs.max_concurrent, \
                qs.oldest_enqueued_at, qs.total_enqueued, qs.total_completed, qs.last_updated \
         FROM attune.queue_stats qs JOIN attune.action a ON a.id = qs.action_id \
         ORDER BY a.ref",
    )
    .fetch_all(&db.pool)
    .await
    .expect("queue_stats")
}

fn as_row(s: &QueueStats) -> Row {
    (
        s.action_ref.to_string(),
        s.queue_length as i32,
        s.active_count as i32,
        s.max_concurrent as i32,
        s.oldest_enqueued_at,
        s.total_enqueued as i64,
        s.total_completed as i64,
        s.last_updated,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_stats_equal_the_counters_in_memory_after_one_interval() {
    let db = TestDb::new().await;
    let mut rig = Rig::start(
        &db,
        QueueSettings::default(),
        Arc::new(UniformPolicy(limit(2))),
        Arc::new(DiscardSink),
    )
    .await;
    let interval = Duration::from_millis(100);
    let worker = rig.stats.spawn(StatsOptions {
        interval,
        snapshot_interval: Duration::from_millis(200),
    });
    let (a, b) = (action("stats.a"), action("stats.b"));
    let _va = rig.submit(&a, 1..=5);
    let _vb = rig.submit(&b, 11..=12);
    let first = rig.next_dispatches(4).await;
    assert!(first.iter().any(|d| d.execution_id == 1));
    rig.complete(1, EndStatus::Succeeded);
    rig.next_dispatches(1).await;
    rig.settle_actors().await;

    let mut expected: Vec<Row> = rig.exec.all_stats().await.iter().map(as_row).collect();
    expected.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(expected.len(), 2);
    eventually(interval * 3, "queue_stats matches the counters", || async {
        let got = rows(&db).await;
        (got == expected).then_some(())
    })
    .await;

    // Both queues are busy, so every snapshot has a row for each.
    let snapshot_actions: Vec<String> = eventually(
        Duration::from_secs(2),
        "a snapshot of both busy queues",
        || async {
            let refs: Vec<String> = sqlx::query_scalar(
                "SELECT DISTINCT a.ref FROM attune.queue_snapshots s \
                 JOIN attune.action a ON a.id = s.action_id ORDER BY a.ref",
            )
            .fetch_all(&db.pool)
            .await
            .expect("snapshots");
            (refs.len() == 2).then_some(refs)
        },
    )
    .await;
    assert_eq!(snapshot_actions, vec!["stats.a", "stats.b"]);

    // Nothing changes from here: the next ticks write nothing, so last_updated stays the time
    // the queue last changed.
    let written = rig.stats.counters().rows;
    let later = rig.stats.counters().ticks + 3;
    eventually(Duration::from_secs(2), "three more ticks", || async {
        (rig.stats.counters().ticks >= later).then_some(())
    })
    .await;
    assert_eq!(rig.stats.counters().rows, written);
    assert_eq!(rows(&db).await, expected);

    worker.stop(Duration::from_secs(5)).await;
    rig.shutdown().await;
}

fn stats_of(action: &ActionRef, queue_length: usize, at: DateTime<Utc>) -> QueueStats {
    QueueStats {
        queue_length,
        active_count: 1,
        max_concurrent: 1,
        oldest_enqueued_at: Some(at),
        total_enqueued: queue_length as u64 + 1,
        ..QueueStats::empty(action.clone(), at)
    }
}

#[tokio::test]
async fn writes_grow_with_the_actions_that_changed_not_with_executions() {
    let db = TestDb::new().await;
    let writer = StatsWriter::new(
        db.pool.clone(),
        &db.schema,
        Arc::new(ActionIds::new(&db.schema)),
    );
    let (a, b) = (action("busy.a"), action("busy.b"));
    let now = Utc::now();
    // A thousand changes to two queues between two writes.
    for n in 0..1000 {
        writer.observe(&stats_of(if n % 2 == 0 { &a } else { &b }, n, now));
    }
    assert_eq!(writer.flush().await.expect("flush"), 2);
    let c = writer.counters();
    assert_eq!(c.rows, 2);
    assert_eq!(c.statements, 2, "one action lookup, one upsert");

    assert_eq!(writer.flush().await.expect("flush"), 0, "nothing changed");
    assert_eq!(writer.counters().statements, 2);

    writer.observe(&stats_of(&a, 7, now));
    assert_eq!(writer.flush().await.expect("flush"), 1);
    let c = writer.counters();
    assert_eq!((c.rows, c.statements), (3, 3), "ids are cached now");
    let lengths: Vec<(String, i32)> = sqlx::query_as(
        "SELECT a.ref, qs.queue_length FROM attune.queue_stats qs \
         JOIN attune.action a ON a.id = qs.action_id ORDER BY a.ref",
    )
    .fetch_all(&db.pool)
    .await
    .expect("rows");
    assert_eq!(
        lengths,
        vec![("busy.a".to_owned(), 7), ("busy.b".to_owned(), 999)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_stats_writer_writes_the_last_counters() {
    let db = TestDb::new().await;
    let writer = StatsWriter::new(
        db.pool.clone(),
        &db.schema,
        Arc::new(ActionIds::new(&db.schema)),
    );
    // An interval far longer than the test: only the stop can write.
    let worker = writer.spawn(StatsOptions {
        interval: Duration::from_secs(3600),
        snapshot_interval: Duration::from_secs(3600),
    });
    // The first tick of an interval fires at once; wait for it to pass.
    eventually(Duration::from_secs(2), "the first tick", || async {
        (writer.counters().ticks >= 1).then_some(())
    })
    .await;
    writer.observe(&stats_of(&action("last.words"), 4, Utc::now()));
    assert!(worker.stop(Duration::from_secs(5)).await);
    let lengths: Vec<i32> = sqlx::query_scalar("SELECT queue_length FROM attune.queue_stats")
        .fetch_all(&db.pool)
        .await
        .expect("rows");
    assert_eq!(lengths, vec![4]);
}
