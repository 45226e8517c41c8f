//! Recovery against the real Postgres: an executor dies with work queued and running; a fresh
//! one gets it all back from the ledger, in acceptance order, with its slots held.

mod common_pg;

use std::sync::Arc;

use common_pg::{Rig, TempPg, TestDb, action, limit, quick_retries, statuses};
use fifo_executor::core::memory::DiscardSink;
use fifo_executor::core::{QueueSettings, UniformPolicy};
use fifo_executor::db::recovery::{mark_clean_stop, record_resends, recover, recover_and_resend};
use fifo_executor::model::{EndStatus, Verdict};

const BIG_ID: u64 = 9_000_000_000_000_000_000;

/// A rig on `db` with every action at `limit` and no sink behind the ledger.
async fn rig_at(db: &TestDb, limit_of_all: u32) -> Rig {
    Rig::start(
        db,
        QueueSettings::default(),
        Arc::new(UniformPolicy(limit(limit_of_all))),
        Arc::new(DiscardSink),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_executor_resumes_where_the_dead_one_stopped() {
    let db = TestDb::new().await;
    let a = action("core.recover");
    let b = action("core.other");

    // First life: limit 2; 10 and 11 take the slots, 30, 20, 25 wait in that order (acceptance
    // order, not id order). Only 10's dispatch is confirmed.
    let mut first = rig_at(&db, 2).await;
    let _v = first.submit(&a, [10, 11, 30, 20, 25]);
    let sent = first.next_dispatched_ids(2).await;
    assert_eq!(sent, vec![10, 11]);
    first.ledger.mark_running(vec![10]);
    let _v = first.submit(&b, [BIG_ID]);
    first.next_dispatches(1).await;
    first.ledger.mark_running(vec![BIG_ID]);
    first.sync().await;
    let before = first.exec.stats(&a).await.expect("answers").expect("known");
    // The crash: nothing completes, the actors go away; only the ledger remains.
    first.shutdown().await;
    drop(first);

    let mut second = rig_at(&db, 2).await;
    let report = recover(&db.pool, &db.schema, &second.exec)
        .await
        .expect("recovers");
    assert_eq!(report.actions, 2);
    assert_eq!(report.waiting, 3);
    assert_eq!(report.running, 2, "10 and the big id were confirmed");
    let unconfirmed: Vec<u64> = report.unconfirmed.iter().map(|u| u.execution_id).collect();
    assert_eq!(unconfirmed, vec![11], "11 was admitted but never confirmed");
    assert_eq!(report.unconfirmed[0].attempt, 1);
    assert!(report.skipped.is_empty());
    assert!(!report.ended_before, "nothing has ended yet");
    assert!(
        !second.exec.may_have_forgotten(1),
        "nothing ended, so no id needs the ledger"
    );
    // The copy about to be sent again is counted first: attempt 2 in the ledger.
    let mut conn = db.pool.acquire().await.expect("a connection");
    record_resends(&mut conn, &db.schema, &[11])
        .await
        .expect("records the re-send");
    let attempt: i32 = sqlx::query_scalar("SELECT attempt FROM attune.execution WHERE id = 11")
        .fetch_one(&db.pool)
        .await
        .expect("attempt");
    assert_eq!(attempt, 2);
    assert_eq!(report.max_execution_id, Some(BIG_ID));
    assert!(second.exec.next_execution_id() > BIG_ID);

    let after = second
        .exec
        .stats(&a)
        .await
        .expect("answers")
        .expect("known");
    assert_eq!(after.queue_length, 3);
    assert_eq!(after.active_count, 2, "restored slots are held");
    assert_eq!(after.oldest_enqueued_at, before.oldest_enqueued_at);
    assert!(
        second.no_dispatch_waiting(),
        "no slot is free, nothing may be dispatched"
    );

    // A redelivered request for a restored execution is a duplicate, not a second copy.
    let mut again = second.submit(&a, [20]);
    let (_, verdict) = again.recv().await.expect("answered");
    assert_eq!(verdict, Verdict::Duplicate { execution_id: 20 });

    // Each completion frees one slot; the waiting ones go in acceptance order.
    let mut order = Vec::new();
    for done in [10, 11, 30, 20, 25] {
        second.complete(done, EndStatus::Succeeded);
        if order.len() < 3 {
            let d = second.next_dispatches(1).await;
            order.push(d[0].execution_id);
        }
        let s = second
            .exec
            .stats(&a)
            .await
            .expect("answers")
            .expect("known");
        assert!(s.active_count <= 2, "{s:?}");
    }
    assert_eq!(order, vec![30, 20, 25]);
    second.sync().await;
    assert!(
        statuses(&db, "core.recover")
            .await
            .iter()
            .all(|(_, s)| s == "succeeded")
    );
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconfirmed_dispatch_goes_out_again_before_a_waiting_one_takes_a_free_slot() {
    // The cluster run found a waiting execution dispatched into a free slot ahead of one
    // admitted earlier whose dispatch the broker never confirmed (it had never left): a
    // worker saw the later one first. Sent again by the restore, it leaves first.
    let db = TestDb::new().await;
    let a = action("core.resend");
    let mut first = rig_at(&db, 2).await;
    let _v = first.submit(&a, [10, 11, 12, 13]);
    assert_eq!(first.next_dispatched_ids(2).await, vec![10, 11]);
    first.ledger.mark_running(vec![10]);
    first.sync().await;
    first.shutdown().await;
    drop(first);

    // A higher limit now: one slot is free at once.
    let mut second = rig_at(&db, 3).await;
    let report = recover_and_resend(&db.pool, &db.schema, &second.exec, &second.ledger)
        .await
        .expect("recovers")
        .expect("no fence refuses");
    assert_eq!(report.unconfirmed.len(), 1);
    let sent = second.next_dispatches(2).await;
    let order: Vec<(u64, u32)> = sent.iter().map(|d| (d.execution_id, d.attempt)).collect();
    assert_eq!(
        order,
        vec![(11, 2), (12, 2)],
        "11 again with a raised attempt, then the head of the waiting line (maybe sent \
         ahead, so raised too)"
    );
    let attempt: i32 = sqlx::query_scalar("SELECT attempt FROM attune.execution WHERE id = 11")
        .fetch_one(&db.pool)
        .await
        .expect("attempt");
    assert_eq!(
        attempt, 2,
        "the raised attempt was recorded before the copy left"
    );
    second.sync().await;
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_head_of_each_waiting_line_goes_out_again_with_a_higher_attempt() {
    let db = TestDb::new().await;
    let a = action("core.head");
    let ahead = fifo_executor::db::ledger::SENT_AHEAD_PER_ACTION as u64;
    let total = ahead + 3;

    // First life: 1 holds the only slot, everything else waits.
    let mut first = rig_at(&db, 1).await;
    let _v = first.submit(&a, 1..=total);
    first.next_dispatches(1).await;
    first.ledger.mark_running(vec![1]);
    first.sync().await;
    first.shutdown().await;
    drop(first);

    let mut second = rig_at(&db, 1).await;
    let report = recover(&db.pool, &db.schema, &second.exec)
        .await
        .expect("recovers");
    assert_eq!(report.maybe_sent, ahead, "the first {ahead} waiting ones");
    let attempts: Vec<(i64, i32)> =
        sqlx::query_as("SELECT id, attempt FROM attune.execution ORDER BY accept_seq")
            .fetch_all(&db.pool)
            .await
            .expect("attempts");
    let raised: Vec<i64> = attempts
        .iter()
        .filter(|(_, n)| *n == 1)
        .map(|(id, _)| *id)
        .collect();
    // 1 is running with its one admission; 2..=ahead+1 were raised from 0 to 1.
    assert_eq!(raised, (1..=ahead as i64 + 1).collect::<Vec<_>>());
    // Each goes out in order once a slot frees: the raised ones as attempt 2, the rest as 1.
    let mut seen = Vec::new();
    for done in 1..total {
        second.complete(done, EndStatus::Succeeded);
        let d = second.next_dispatches(1).await;
        seen.push((d[0].execution_id, d[0].attempt));
    }
    let expected: Vec<(u64, u32)> = (2..=total)
        .map(|id| (id, if id <= ahead + 1 { 2 } else { 1 }))
        .collect();
    assert_eq!(seen, expected);
    second.sync().await;
    let attempt_of_2: i32 = sqlx::query_scalar("SELECT attempt FROM attune.execution WHERE id = 2")
        .fetch_one(&db.pool)
        .await
        .expect("attempt");
    assert_eq!(
        attempt_of_2, 2,
        "the ledger counts the attempt the dispatch carried"
    );
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_clean_stop_no_attempt_is_raised_and_after_a_crash_it_is() {
    let db = TestDb::new().await;
    let a = action("core.clean");
    let start = || {
        Rig::start(
            &db,
            QueueSettings::default(),
            Arc::new(UniformPolicy(limit(1))),
            Arc::new(DiscardSink),
        )
    };
    let mut first = start().await;
    let report = recover(&db.pool, &db.schema, &first.exec)
        .await
        .expect("recovers");
    assert!(!report.after_clean_stop, "no run recorded yet");
    let _v = first.submit(&a, [1, 2, 3]);
    first.next_dispatches(1).await;
    first.sync().await;
    first.shutdown().await;
    let mut conn = db.pool.acquire().await.expect("a connection");
    mark_clean_stop(&mut conn, &db.schema)
        .await
        .expect("records the clean stop");

    let mut second = start().await;
    let report = recover(&db.pool, &db.schema, &second.exec)
        .await
        .expect("recovers");
    assert!(report.after_clean_stop);
    assert_eq!(report.maybe_sent, 0);
    second.shutdown().await;
    // No clean stop recorded this time: a crash, as far as the next start can tell.

    let mut third = start().await;
    let report = recover(&db.pool, &db.schema, &third.exec)
        .await
        .expect("recovers");
    assert!(!report.after_clean_stop);
    assert_eq!(report.maybe_sent, 2, "2 and 3 wait at the head of the line");
    third.shutdown().await;
}

/// The case the raised attempts are for: a dispatch left before its admission was committed,
/// the executor died, and the worker may still be running it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatch_sent_before_its_admission_committed_goes_out_again_with_a_higher_attempt() {
    let pg = TempPg::start().await;
    let db = TestDb::on_server(&pg.url()).await;
    let a = action("core.crash");
    let options = quick_retries();
    let start = || Rig::start_when_safe(&db.pool, &db.schema, 1, options);
    let mut first = start().await;
    let _v = first.submit(&a, [1, 2, 3]);
    assert_eq!(first.next_dispatches(1).await[0].execution_id, 1);
    first.ledger.mark_running(vec![1]);
    first.sync().await;

    // Postgres goes away; 1 completes and 2 leaves at once, its admission not committed.
    pg.stop().await;
    first.complete(1, EndStatus::Succeeded);
    let sent = first.next_dispatches(1).await;
    assert_eq!((sent[0].execution_id, sent[0].attempt), (2, 1));
    // The executor dies: 1's end and 2's admission never reach the ledger.
    first.shutdown().await;
    drop(first);
    pg.restart().await;

    let mut second = start().await;
    let report = recover(&db.pool, &db.schema, &second.exec)
        .await
        .expect("recovers");
    assert!(!report.after_clean_stop);
    assert_eq!(report.running, 1, "1's end was never committed");
    assert_eq!(report.waiting, 2);
    assert_eq!(report.maybe_sent, 2, "2 and 3 head the waiting line");
    assert!(second.no_dispatch_waiting(), "1 holds the slot");
    // 1's completion was never acknowledged, so the broker brings it again.
    second.complete(1, EndStatus::Succeeded);
    let again = second.next_dispatches(1).await;
    assert_eq!(
        (again[0].execution_id, again[0].attempt),
        (2, 2),
        "a worker may be running 2 as attempt 1: the copy must say it is another attempt"
    );
    second.complete(2, EndStatus::Succeeded);
    let third = second.next_dispatches(1).await;
    assert_eq!((third[0].execution_id, third[0].attempt), (3, 2));
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_execution_whose_cancel_came_first_is_recorded_canceled_not_restored() {
    let db = TestDb::new().await;
    let a = action("core.marked");
    // First life at limit 1: 1 runs, 2 and 3 wait; then (as a batch that committed 3's
    // acceptance but not the cancel that followed it would leave things) 3 carries a mark
    // of a cancel that came before its request, and 4's mark waits for a request to come.
    let mut first = rig_at(&db, 1).await;
    let _v = first.submit(&a, [1, 2, 3]);
    first.next_dispatches(1).await;
    first.sync().await;
    first.shutdown().await;
    drop(first);
    sqlx::query("INSERT INTO attune.cancel_ahead (execution_id) VALUES (3), (4)")
        .execute(&db.pool)
        .await
        .expect("marks");

    let mut second = rig_at(&db, 1).await;
    let report = recover(&db.pool, &db.schema, &second.exec)
        .await
        .expect("recovers");
    assert_eq!(report.waiting, 1, "2 only");
    assert_eq!(
        report.canceled_ahead,
        vec![4],
        "4's request has yet to come"
    );
    assert_eq!(
        statuses(&db, "core.marked").await,
        vec![
            (1, "scheduled".to_owned()),
            (2, "requested".to_owned()),
            (3, "canceled".to_owned())
        ]
    );
    let marks: Vec<i64> =
        sqlx::query_scalar("SELECT execution_id FROM attune.cancel_ahead ORDER BY 1")
            .fetch_all(&db.pool)
            .await
            .expect("marks left");
    assert_eq!(marks, vec![4], "3's mark is used up");
    // 4's request, when it comes, is canceled without ever running.
    let verdicts = second.submit(&a, [4]);
    drop(verdicts);
    second.settle_actors().await;
    second.sync().await;
    assert_eq!(
        statuses(&db, "core.marked").await.last(),
        Some(&(4, "canceled".to_owned()))
    );
    second.shutdown().await;
}
