//! The ledger against the real Postgres: statuses, batching, receipts only after the commit,
//! an outage, and rows Postgres refuses.

mod common_pg;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common_pg::{Rig, TempPg, TestDb, action, eventually, limit, quick_retries, statuses};
use fifo_executor::core::memory::{DiscardSink, VecSink};
use fifo_executor::core::{Event, OutcomeSink, PurgeOrder, QueueSettings, UniformPolicy};
use fifo_executor::db::actions::ActionIds;
use fifo_executor::db::ledger::{LedgerOptions, LedgerSink, SENT_AHEAD_PER_ACTION};
use fifo_executor::model::{
    ActionRef, CancelRequest, EndStatus, Payload, Receipt, Submission, Verdict,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_cycle_leaves_every_execution_in_its_true_status() {
    let db = TestDb::new().await;
    let settings = QueueSettings {
        queue_timeout: Duration::from_millis(700),
        ..QueueSettings::default()
    };
    let mut rig = Rig::start(
        &db,
        settings,
        Arc::new(UniformPolicy(limit(1))),
        Arc::new(DiscardSink),
    )
    .await;
    let a = action("core.cycle");

    let _verdicts = rig.submit(&a, [1, 2, 3, 4]);
    assert_eq!(rig.next_dispatches(1).await[0].execution_id, 1);
    rig.ledger.mark_running(vec![1]);
    rig.exec.cancel(vec![CancelRequest {
        execution_id: 2,
        receipt: None,
    }]);
    rig.complete(1, EndStatus::Succeeded);
    assert_eq!(rig.next_dispatches(1).await[0].execution_id, 3);
    rig.complete(3, EndStatus::Failed);
    assert_eq!(rig.next_dispatches(1).await[0].execution_id, 4);
    rig.ledger.mark_running(vec![4]);

    // 5 waits behind 4 until the queue timeout takes it.
    let _verdicts = rig.submit(&a, [5]);
    rig.sync().await;
    eventually(Duration::from_secs(5), "execution 5 timed out", || async {
        rig.sync().await;
        statuses(&db, "core.cycle")
            .await
            .contains(&(5, "timeout".to_owned()))
            .then_some(())
    })
    .await;

    // 4 never reports back: its slot is reclaimed, and 6 takes it without confirmation.
    let purged = rig
        .exec
        .purge(PurgeOrder {
            max_queued_age: None,
            max_running_age: Some(Duration::ZERO),
            dry_run: false,
        })
        .await;
    assert_eq!(purged.len(), 1);
    let _verdicts = rig.submit(&a, [6]);
    assert_eq!(rig.next_dispatches(1).await[0].execution_id, 6);
    rig.sync().await;

    let expected: Vec<(i64, String)> = [
        (1, "succeeded"),
        (2, "canceled"),
        (3, "failed"),
        (4, "failed"),
        (5, "timeout"),
        (6, "scheduled"),
    ]
    .into_iter()
    .map(|(id, s)| (id, s.to_owned()))
    .collect();
    assert_eq!(statuses(&db, "core.cycle").await, expected);

    let rows: Vec<LedgerRow> = sqlx::query_as(
        "SELECT id, result, attempt, dispatched_at IS NOT NULL, created - enqueued_at BETWEEN '0' AND '1 millisecond', \
                    request_id \
             FROM attune.execution ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .expect("rows");
    let result = |id: i64| rows[(id - 1) as usize].1.clone();
    assert_eq!(result(1), Some(serde_json::json!({"done": 1})));
    assert_eq!(result(2), None);
    let lost = result(4).expect("a reclaimed execution says why it failed");
    assert_eq!(lost["error_class"], "LostCompletion");
    assert!(
        lost["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("LostCompletion"))
    );
    assert_eq!(
        result(5).expect("a timed-out execution says why")["error_class"],
        "QueueTimeout"
    );
    for (id, _, attempt, dispatched, created_is_enqueued, request_id) in &rows {
        let was_admitted = *id != 2 && *id != 5;
        assert_eq!(*attempt, i32::from(was_admitted), "attempt of {id}");
        assert_eq!(*dispatched, was_admitted, "dispatched_at of {id}");
        assert!(
            created_is_enqueued,
            "created of {id} is the acceptance time, give or take a tie-break"
        );
        assert_eq!(request_id.as_deref(), Some(format!("req-{id}").as_str()));
    }
    // 1 to 4 were accepted in one batch with one timestamp; created still orders them.
    let by_created: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM attune.execution ORDER BY created")
            .fetch_all(&db.pool)
            .await
            .expect("ids");
    assert_eq!(by_created, vec![1, 2, 3, 4, 5, 6]);
    rig.shutdown().await;
}

/// id, result, attempt, dispatched_at is set, created ≈ enqueued_at, request_id
type LedgerRow = (
    i64,
    Option<serde_json::Value>,
    i32,
    bool,
    bool,
    Option<String>,
);

fn accepted(action: &ActionRef, id: u64, at: DateTime<Utc>) -> Event {
    Event::Accepted {
        action: action.clone(),
        execution_id: id,
        request_id: None,
        payload: Payload::empty_object(),
        enqueued_at: at,
        receipt: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_acceptances_take_a_handful_of_statements() {
    let db = TestDb::new().await;
    let ids = Arc::new(ActionIds::new(&db.schema));
    let (ledger, worker) = LedgerSink::start(
        db.pool.clone(),
        &db.schema,
        ids,
        LedgerOptions::default(),
        Arc::new(DiscardSink),
    );
    let actions = [action("bulk.a"), action("bulk.b")];
    let now = Utc::now();
    // As the actors would: many small record() calls in quick succession.
    for chunk in 0..100u64 {
        ledger.record(
            (0..100u64)
                .map(|i| accepted(&actions[(i % 2) as usize], chunk * 100 + i + 1, now))
                .collect(),
        );
    }
    ledger.sync().await.expect("sync");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM attune.execution")
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(rows, 10_000);
    let c = ledger.counters();
    println!("10000 acceptances: {c:?}");
    assert_eq!(c.pending, 0);
    assert!(
        c.statements <= 100,
        "{} statements for 10000 rows: not batched",
        c.statements
    );
    worker.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_writer_commits_and_settles_what_is_pending() {
    let db = TestDb::new().await;
    let ids = Arc::new(ActionIds::new(&db.schema));
    let (ledger, worker) = LedgerSink::start(
        db.pool.clone(),
        &db.schema,
        ids,
        // A flush interval far longer than the test: only the stop can flush.
        LedgerOptions {
            flush_interval: Duration::from_secs(3600),
            ..LedgerOptions::default()
        },
        Arc::new(DiscardSink),
    );
    let a = action("core.stop");
    let (tx, mut settled) = tokio::sync::mpsc::unbounded_channel();
    let events = (1..=50u64)
        .map(|id| {
            let tx = tx.clone();
            Event::Accepted {
                action: a.clone(),
                execution_id: id,
                request_id: None,
                payload: Payload::empty_object(),
                enqueued_at: Utc::now(),
                receipt: Some(Receipt::new(move |v| {
                    let _ = tx.send(v);
                })),
            }
        })
        .collect();
    ledger.record(events);
    assert!(
        worker.stop(Duration::from_secs(5)).await,
        "stopped by itself"
    );
    let mut answered = 0;
    while settled.try_recv().is_ok() {
        answered += 1;
    }
    assert_eq!(answered, 50);
    assert_eq!(statuses(&db, "core.stop").await.len(), 50);
    assert_eq!(ledger.pending(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executions_through_the_executor_share_statements() {
    let db = TestDb::new().await;
    let mut rig = Rig::start(
        &db,
        QueueSettings::default(),
        Arc::new(UniformPolicy(limit(2000))),
        Arc::new(DiscardSink),
    )
    .await;
    let a = action("core.bulk");
    let _verdicts = rig.submit(&a, 1..=2000);
    let dispatched = rig.next_dispatches(2000).await;
    rig.ledger
        .mark_running(dispatched.iter().map(|d| d.execution_id).collect());
    for d in &dispatched {
        rig.complete(d.execution_id, EndStatus::Succeeded);
    }
    rig.sync().await;
    let done: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM attune.execution WHERE status = 'succeeded' AND attempt = 1",
    )
    .fetch_one(&db.pool)
    .await
    .expect("count");
    assert_eq!(done, 2000);
    let c = rig.ledger.counters();
    println!("2000 executions x 4 transitions: {c:?}");
    // 8000 transitions; one statement per transition kind per flush.
    assert!(c.statements <= 160, "{c:?}");
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inner_sink_gets_every_event_in_order_after_its_receipt_was_settled_once() {
    let db = TestDb::new().await;
    let inner = Arc::new(VecSink::default());
    let mut rig = Rig::start(
        &db,
        QueueSettings::default(),
        Arc::new(UniformPolicy(limit(1))),
        inner.clone(),
    )
    .await;
    let a = action("core.inner");
    let mut verdicts = rig.submit(&a, 1..=3);
    for id in 1..=3 {
        let d = rig.next_dispatches(1).await;
        assert_eq!(d[0].execution_id, id);
        rig.complete(id, EndStatus::Succeeded);
    }
    rig.sync().await;
    let mut answered = Vec::new();
    while let Ok((id, v)) = verdicts.try_recv() {
        assert_eq!(v, Verdict::Queued { execution_id: id });
        answered.push(id);
    }
    assert_eq!(
        answered,
        vec![1, 2, 3],
        "each receipt answered exactly once"
    );

    let kinds: Vec<(u64, &str)> = inner
        .0
        .lock()
        .expect("lock")
        .iter()
        .map(|e| {
            let kind = match e {
                Event::Accepted { receipt, .. } => {
                    assert!(receipt.is_none(), "settled before forwarding");
                    "accepted"
                }
                Event::Admitted { .. } => "admitted",
                Event::Completed { receipt, .. } => {
                    assert!(receipt.is_none(), "settled before forwarding");
                    "completed"
                }
                _ => "other",
            };
            (e.execution_id(), kind)
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            (1, "accepted"),
            (1, "admitted"),
            (2, "accepted"),
            (3, "accepted"),
            (1, "completed"),
            (2, "admitted"),
            (2, "completed"),
            (3, "admitted"),
            (3, "completed"),
        ]
    );
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_settles_while_postgres_is_down_and_everything_does_after() {
    let pg = TempPg::start().await;
    let db = TestDb::on_server(&pg.url()).await;
    let mut rig = Rig::start_with(
        &db.pool,
        &db.schema,
        QueueSettings::default(),
        Arc::new(UniformPolicy(limit(100))),
        Arc::new(DiscardSink),
        // Short pauses keep the test fast; the behaviour is the same with the defaults.
        quick_retries(),
    )
    .await;
    let a = action("core.outage");

    let mut before = rig.submit(&a, 1..=10);
    for _ in 0..10 {
        let (id, v) = tokio::time::timeout(Duration::from_secs(5), before.recv())
            .await
            .expect("settled while Postgres is up")
            .expect("open");
        assert_eq!(v, Verdict::Queued { execution_id: id });
    }
    assert!(rig.ledger.healthy());

    pg.stop().await;
    let mut during = rig.submit(&a, 11..=20);
    rig.settle_actors().await;
    eventually(
        Duration::from_secs(10),
        "the ledger failed to write twice",
        || async {
            let c = rig.ledger.counters();
            (c.failed_attempts >= 2 && !rig.ledger.healthy()).then_some(())
        },
    )
    .await;
    assert!(
        during.try_recv().is_err(),
        "a receipt was settled although nothing could be committed"
    );
    // 10 acceptances and 10 admissions wait.
    assert_eq!(rig.ledger.pending(), 20);
    pg.restart().await;
    let mut settled = Vec::new();
    for _ in 0..10 {
        let (id, v) = tokio::time::timeout(Duration::from_secs(15), during.recv())
            .await
            .expect("settled once Postgres is back")
            .expect("open");
        assert_eq!(v, Verdict::Queued { execution_id: id });
        settled.push(id);
    }
    settled.sort_unstable();
    assert_eq!(settled, (11..=20).collect::<Vec<_>>());
    rig.sync().await;
    assert!(rig.ledger.healthy());
    assert_eq!(rig.ledger.pending(), 0);
    let rows = statuses(&db, "core.outage").await;
    assert_eq!(rows.len(), 20);
    assert!(rows.iter().all(|(_, s)| s == "scheduled"), "{rows:?}");
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatch_leaves_only_once_its_admission_is_committed() {
    let pg = TempPg::start().await;
    let db = TestDb::on_server(&pg.url()).await;
    let mut rig = Rig::start_gated(
        &db.pool,
        &db.schema,
        QueueSettings::default(),
        Arc::new(UniformPolicy(limit(2))),
        quick_retries(),
    )
    .await;
    let a = action("core.gated");

    let _before = rig.submit(&a, [1]);
    assert_eq!(rig.next_dispatches(1).await[0].execution_id, 1);
    assert_eq!(
        statuses(&db, "core.gated").await,
        vec![(1, "scheduled".to_owned())],
        "recorded as dispatched before it left"
    );

    pg.stop().await;
    let _during = rig.submit(&a, [2, 3]);
    rig.settle_actors().await;
    rig.until_writes_failed(2).await;
    assert!(
        rig.no_dispatch_waiting(),
        "2 was admitted in memory, but must not leave while its admission is not recorded"
    );
    pg.restart().await;
    assert_eq!(rig.next_dispatches(1).await[0].execution_id, 2);
    let rows = statuses(&db, "core.gated").await;
    assert_eq!(
        rows,
        vec![
            (1, "scheduled".to_owned()),
            (2, "scheduled".to_owned()),
            (3, "requested".to_owned())
        ]
    );
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_safe_a_waiting_execution_leaves_without_a_commit_but_only_so_far_ahead() {
    let pg = TempPg::start().await;
    let db = TestDb::on_server(&pg.url()).await;
    let mut rig = Rig::start_when_safe(&db.pool, &db.schema, 1, quick_retries()).await;
    let a = action("core.ahead");
    let ahead = SENT_AHEAD_PER_ACTION as u64;
    let total = ahead + 4;
    let _accepted = rig.submit(&a, 1..=total);
    assert_eq!(rig.next_dispatches(1).await[0].execution_id, 1);
    rig.sync().await;

    // Postgres goes away: no admission can be committed from here on.
    pg.stop().await;
    let mut sent = Vec::new();
    for id in 1..=ahead {
        rig.complete(id, EndStatus::Succeeded);
        sent.push(rig.next_dispatches(1).await[0].execution_id);
    }
    assert_eq!(
        sent,
        (2..=ahead + 1).collect::<Vec<_>>(),
        "accepted long before, so each left without waiting for a commit"
    );
    // One more uncommitted admission would put the action beyond the bound: it waits.
    rig.complete(ahead + 1, EndStatus::Succeeded);
    rig.settle_actors().await;
    rig.until_writes_failed(1).await;
    assert!(
        rig.no_dispatch_waiting(),
        "{ahead} admissions are uncommitted; the next must wait for the commit"
    );
    pg.restart().await;
    assert_eq!(rig.next_dispatches(1).await[0].execution_id, ahead + 2);
    // Committed again: the next hand-off is immediate again.
    rig.sync().await;
    rig.complete(ahead + 2, EndStatus::Succeeded);
    assert_eq!(rig.next_dispatches(1).await[0].execution_id, ahead + 3);
    rig.shutdown().await;
}

/// A `dispatch_when_safe` rig at `limit` on a Postgres of its own (for the test to stop),
/// where execution 1 of `a` is dispatched and everything is committed.
async fn when_safe_after_one(a: &ActionRef, limit: u32) -> (TempPg, TestDb, Rig) {
    let pg = TempPg::start().await;
    let db = TestDb::on_server(&pg.url()).await;
    let mut rig = Rig::start_when_safe(&db.pool, &db.schema, limit, quick_retries()).await;
    let _warm = rig.submit(a, [1]);
    assert_eq!(rig.next_dispatches(1).await[0].execution_id, 1);
    rig.sync().await;
    (pg, db, rig)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_safe_a_just_accepted_execution_waits_for_its_acceptance_commit() {
    let a = action("core.fresh");
    let (pg, _db, mut rig) = when_safe_after_one(&a, 2).await;

    pg.stop().await;
    let _fresh = rig.submit(&a, [2, 3]);
    rig.settle_actors().await;
    rig.until_writes_failed(1).await;
    assert!(
        rig.no_dispatch_waiting(),
        "2's request is not acknowledged and could come back after a crash as a new execution"
    );
    // 3 waits behind the held 2 even once a slot frees: FIFO.
    rig.complete(1, EndStatus::Succeeded);
    rig.settle_actors().await;
    assert!(rig.no_dispatch_waiting());
    pg.restart().await;
    let order = rig.next_dispatched_ids(2).await;
    assert_eq!(order, vec![2, 3]);
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_dispatch_is_committed_at_once_not_after_the_flush_interval() {
    let db = TestDb::new().await;
    let mut rig = Rig::start_gated(
        &db.pool,
        &db.schema,
        QueueSettings::default(),
        Arc::new(UniformPolicy(limit(1))),
        LedgerOptions {
            // Were dispatches to wait for it, none would leave within the test's deadline.
            flush_interval: Duration::from_secs(3600),
            ..LedgerOptions::default()
        },
    )
    .await;
    let a = action("core.prompt");
    let _first = rig.submit(&a, [1, 2]);
    assert_eq!(rig.next_dispatches(1).await[0].execution_id, 1);
    rig.complete(1, EndStatus::Succeeded);
    assert_eq!(rig.next_dispatches(1).await[0].execution_id, 2);
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatch_held_through_an_outage_is_not_sent_once_the_purge_reclaimed_its_slot() {
    let pg = TempPg::start().await;
    let db = TestDb::on_server(&pg.url()).await;
    let mut rig = Rig::start_gated(
        &db.pool,
        &db.schema,
        QueueSettings::default(),
        Arc::new(UniformPolicy(limit(1))),
        quick_retries(),
    )
    .await;
    let a = action("core.reclaimed");

    pg.stop().await;
    // 1 is admitted in memory; its dispatch waits for the ledger.
    let _during = rig.submit(&a, [1, 2]);
    rig.settle_actors().await;
    rig.until_writes_failed(1).await;
    // The outage outlasts the running age: the purge reclaims 1's slot and admits 2.
    let purged = rig
        .exec
        .purge(fifo_executor::core::PurgeOrder {
            max_queued_age: None,
            max_running_age: Some(Duration::ZERO),
            dry_run: false,
        })
        .await;
    assert_eq!(purged.len(), 1, "{purged:?}");
    assert!(rig.no_dispatch_waiting());
    pg.restart().await;
    let sent = rig.next_dispatches(1).await;
    assert_eq!(
        sent.iter().map(|d| d.execution_id).collect::<Vec<_>>(),
        vec![2],
        "1 was reclaimed (and dead-lettered) while its dispatch was held: it must not go out"
    );
    rig.ledger.sync().await.expect("sync");
    assert!(rig.no_dispatch_waiting(), "nothing else is sent");
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_postgres_refuses_costs_only_its_own_execution() {
    let db = TestDb::new().await;
    let mut rig = Rig::start(
        &db,
        QueueSettings::default(),
        Arc::new(UniformPolicy(limit(10))),
        Arc::new(DiscardSink),
    )
    .await;
    let a = action("core.refused");
    let (tx, mut verdicts) = tokio::sync::mpsc::unbounded_channel();
    let sub = |id: u64, payload: &str, request_id: &str| {
        let tx = tx.clone();
        let mut s = Submission::new(id, Payload::from_json(payload).expect("valid JSON"));
        s.request_id = Some(request_id.into());
        s.receipt = Some(Receipt::new(move |v| {
            let _ = tx.send((id, v));
        }));
        s
    };
    rig.exec.submit(
        &a,
        vec![
            sub(1, r#"{"ok": 1}"#, "r1"),
            // Valid JSON that jsonb refuses: a lone surrogate.
            sub(2, r#"{"s": "\ud800"}"#, "r2"),
            // A NUL in the request id and in the parameters: stored with U+FFFD instead.
            sub(3, r#"{"s": "a\u0000b"}"#, "a\u{0}b"),
            // Beyond BIGINT.
            sub(u64::MAX, "{}", "r4"),
        ],
    );
    rig.next_dispatches(4).await;
    rig.sync().await;
    let mut answered = 0;
    while let Ok((id, v)) = verdicts.try_recv() {
        assert_eq!(v, Verdict::Queued { execution_id: id });
        answered += 1;
    }
    assert_eq!(answered, 4, "every receipt is answered, recorded or not");
    let rows: Vec<(i64, Option<String>, String)> =
        sqlx::query_as("SELECT id, request_id, parameters::text FROM attune.execution ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .expect("rows");
    assert_eq!(
        rows,
        vec![
            (1, Some("r1".to_owned()), r#"{"ok": 1}"#.to_owned()),
            (
                3,
                Some("a\u{fffd}b".to_owned()),
                "{\"s\": \"a\u{fffd}b\"}".to_owned()
            ),
        ]
    );
    // Execution 2's acceptance and admission, and the id beyond BIGINT's two.
    assert_eq!(rig.ledger.counters().dropped, 4);
    assert!(rig.ledger.healthy());
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returned_dispatch_moves_its_row_back_to_waiting_and_the_next_copy_keeps_the_attempt() {
    let db = TestDb::new().await;
    let settings = QueueSettings {
        no_route_retry: Duration::from_millis(100),
        ..QueueSettings::default()
    };
    let mut rig = Rig::start_with(
        &db.pool,
        &db.schema,
        settings,
        Arc::new(UniformPolicy(limit(1))),
        Arc::new(DiscardSink),
        LedgerOptions::default(),
    )
    .await;
    let a = action("core.unbound");
    let _sub = rig.submit(&a, [1]);
    let first = rig.next_dispatches(1).await;
    rig.sync().await;
    // Confirmed before its return was seen (lapin may hand the return to a later confirm).
    rig.ledger.mark_running(vec![1]);
    rig.exec.returned(first);
    rig.settle_actors().await;
    rig.sync().await;
    let row: (String, i32, Option<DateTime<Utc>>) =
        sqlx::query_as("SELECT status, attempt, dispatched_at FROM attune.execution WHERE id = 1")
            .fetch_one(&db.pool)
            .await
            .expect("row");
    assert_eq!(row, ("requested".to_owned(), 0, None));
    let again = rig.next_dispatches(1).await;
    assert_eq!((again[0].execution_id, again[0].attempt), (1, 1));
    rig.sync().await;
    let row: (String, i32) =
        sqlx::query_as("SELECT status, attempt FROM attune.execution WHERE id = 1")
            .fetch_one(&db.pool)
            .await
            .expect("row");
    assert_eq!(row, ("scheduled".to_owned(), 1));
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_waits_for_a_fenced_flush_in_flight_and_refuses_every_one_after() {
    use fifo_executor::db::partitions;
    let db = TestDb::new().await;
    let first = partitions::take_all(&db.pool, &db.schema, 4, "first")
        .await
        .expect("first takes");
    assert_eq!(first.held(), vec![(0, 1), (1, 1), (2, 1), (3, 1)]);

    // A flush of the first owner is in flight: its fence checked, not yet committed.
    let mut flush = db.pool.begin().await.expect("a transaction");
    assert!(first.check(&mut flush).await.expect("check"));
    let takeover = tokio::spawn({
        let (pool, schema) = (db.pool.clone(), db.schema.clone());
        async move { partitions::take_all(&pool, &schema, 4, "second").await }
    });
    until_a_lock_wait(&db).await;
    assert!(
        !takeover.is_finished(),
        "the takeover waits for the flush to commit"
    );
    flush.commit().await.expect("the flush commits");
    let second = takeover
        .await
        .expect("joined")
        .expect("the takeover goes through once the flush committed");
    assert_eq!(epochs(&second), vec![2; 4]);

    // A takeover in flight (its rows locked, not committed): a flush's check waits for it
    // and, once it commits, finds the epochs moved on.
    let mut taking = db.pool.begin().await.expect("a transaction");
    sqlx::query("UPDATE attune.partition SET epoch = epoch + 1, owner = 'third'")
        .execute(&mut *taking)
        .await
        .expect("rows locked");
    let checking = tokio::spawn({
        let (pool, second) = (db.pool.clone(), second.clone());
        async move {
            let mut tx = pool.begin().await.expect("a transaction");
            second.check(&mut tx).await.expect("check")
        }
    });
    until_a_lock_wait(&db).await;
    assert!(!checking.is_finished(), "the check waits for the takeover");
    taking.commit().await.expect("the takeover commits");
    assert!(
        !checking.await.expect("joined"),
        "a check that waited sees the new epochs"
    );
    let third_rows = partitions::list(&db.pool, &db.schema).await.expect("list");
    assert!(
        third_rows
            .iter()
            .all(|r| r.owner == "third" && r.epoch == 3)
    );
    // Give the partitions back to the second owner for what follows.
    sqlx::query("UPDATE attune.partition SET epoch = 2, owner = 'second'")
        .execute(&db.pool)
        .await
        .expect("reset");

    // Every flush of the first owner after the takeover is refused; the second's pass.
    let mut late = db.pool.begin().await.expect("a transaction");
    assert!(!first.check(&mut late).await.expect("check"));
    drop(late);
    let mut now = db.pool.begin().await.expect("a transaction");
    assert!(second.check(&mut now).await.expect("check"));
    drop(now);

    // Fewer partitions: the rows beyond the count go.
    let third = partitions::take_all(&db.pool, &db.schema, 2, "third")
        .await
        .expect("third takes");
    assert_eq!(third.held(), vec![(0, 3), (1, 3)]);
    let rows = partitions::list(&db.pool, &db.schema).await.expect("list");
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.owner == "third"));
}

/// The epochs a fence holds, in partition order.
fn epochs(fence: &fifo_executor::db::partitions::Fence) -> Vec<i64> {
    fence.held().into_iter().map(|(_, e)| e).collect()
}

/// Waits until some session of this test's database waits for a row lock.
async fn until_a_lock_wait(db: &TestDb) {
    eventually(
        Duration::from_secs(10),
        "a session waiting for a lock",
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&db.pool)
            .await
            .expect("pg_stat_activity");
            (waiting > 0).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_is_not_held_up_for_good_by_an_owner_paused_inside_a_flush() {
    use fifo_executor::db::partitions;
    let db = TestDb::new().await;
    // The service's own pool, with its idle-in-transaction timeout.
    let pool = fifo_executor::db::connect_lazy(&db.url, 2).expect("a pool");
    let first = partitions::take_all(&pool, &db.schema, 4, "paused")
        .await
        .expect("first takes");
    // The owner checked its fence and then stopped (SIGSTOP) before its commit.
    let mut paused = pool.begin().await.expect("a transaction");
    assert!(first.check(&mut paused).await.expect("check"));
    let second = tokio::time::timeout(
        Duration::from_secs(60),
        partitions::take_all(&db.pool, &db.schema, 4, "next"),
    )
    .await
    .expect("the takeover goes through once Postgres ends the idle transaction")
    .expect("the takeover");
    assert_eq!(epochs(&second), vec![2; 4]);
    assert!(
        paused.commit().await.is_err(),
        "the paused owner's transaction is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_fence_grows_one_partition_at_a_time_and_any_one_taken_away_refuses_it() {
    use fifo_executor::db::partitions;
    let db = TestDb::new().await;
    let fence = partitions::Fence::shared(&db.schema);
    let mut tx = db.pool.begin().await.expect("a transaction");
    assert!(
        fence.check(&mut tx).await.expect("check"),
        "holding nothing, nothing can be taken away"
    );
    drop(tx);

    let first = partitions::take_one(&db.pool, &db.schema, 3, "a")
        .await
        .expect("a takes 3");
    assert_eq!(
        (first.epoch, first.released_cleanly),
        (1, false),
        "a partition never owned was not released cleanly"
    );
    fence.hold(3, first.epoch);
    let seven = partitions::take_one(&db.pool, &db.schema, 7, "a")
        .await
        .expect("a takes 7");
    fence.hold(7, seven.epoch);
    assert_eq!(fence.held(), vec![(3, 1), (7, 1)]);

    // A clean release is read, and cleared, by the next takeover.
    let mut tx = db.pool.begin().await.expect("a transaction");
    assert!(fence.check(&mut tx).await.expect("check"));
    fence
        .release_cleanly(&mut tx, &db.schema)
        .await
        .expect("released");
    tx.commit().await.expect("commit");
    let again = partitions::take_one(&db.pool, &db.schema, 7, "b")
        .await
        .expect("b takes 7");
    assert_eq!((again.epoch, again.released_cleanly), (2, true));
    let cleared: bool =
        sqlx::query_scalar("SELECT released_cleanly FROM attune.partition WHERE id = 7")
            .fetch_one(&db.pool)
            .await
            .expect("row");
    assert!(!cleared);

    // b took one of a's two partitions: every flush of a is refused now.
    let mut tx = db.pool.begin().await.expect("a transaction");
    assert!(!fence.check(&mut tx).await.expect("check"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn id_blocks_never_overlap_and_start_above_every_id_recorded() {
    use fifo_executor::db::partitions::{ID_BLOCK, take_id_block};
    let db = TestDb::new().await;
    let first = take_id_block(&db.pool, &db.schema).await.expect("a block");
    assert_eq!(first, ID_BLOCK);
    // An execution recorded far above (a producer's own id): the next block starts above it.
    let action: i64 =
        sqlx::query_scalar("INSERT INTO attune.action (ref) VALUES ('blocks.a') RETURNING id")
            .fetch_one(&db.pool)
            .await
            .expect("action");
    let high = (5 * ID_BLOCK + 17) as i64;
    sqlx::query(
        "INSERT INTO attune.execution (id, action, status, enqueued_at) VALUES ($1, $2, 'requested', now())",
    )
    .bind(high)
    .bind(action)
    .execute(&db.pool)
    .await
    .expect("execution");
    // Instances starting at once draw distinct blocks.
    let draws =
        futures::future::join_all((0..6).map(|_| take_id_block(&db.pool, &db.schema))).await;
    let mut blocks: Vec<u64> = draws.into_iter().map(|b| b.expect("a block")).collect();
    blocks.sort_unstable();
    blocks.dedup();
    assert_eq!(blocks.len(), 6, "{blocks:?}");
    assert!(blocks.iter().all(|b| *b > high as u64), "{blocks:?}");
    assert!(blocks.iter().all(|b| b % ID_BLOCK == 0));
}
