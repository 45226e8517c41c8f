//! Recovery against the real Postgres: an executor dies with work queued and running; a fresh
//! one gets it all back from the ledger, in acceptance order, with its slots held.

mod common_pg;

use std::sync::Arc;

use common_pg::{Rig, TestDb, action, limit, statuses};
use fifo_executor::core::memory::DiscardSink;
use fifo_executor::core::{QueueSettings, UniformPolicy};
use fifo_executor::db::recovery::{record_resends, recover};
use fifo_executor::model::{EndStatus, Verdict};

const BIG_ID: u64 = 9_000_000_000_000_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_executor_resumes_where_the_dead_one_stopped() {
    let db = TestDb::new().await;
    let a = action("core.recover");
    let b = action("core.other");

    // First life: limit 2; 10 and 11 take the slots, 30, 20, 25 wait in that order (acceptance
    // order, not id order). Only 10's dispatch is confirmed.
    let mut first = Rig::start(
        &db,
        QueueSettings::default(),
        Arc::new(UniformPolicy(limit(2))),
        Arc::new(DiscardSink),
    )
    .await;
    let _v = first.submit(&a, [10, 11, 30, 20, 25]);
    let sent: Vec<u64> = first
        .next_dispatches(2)
        .await
        .iter()
        .map(|d| d.execution_id)
        .collect();
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

    let mut second = Rig::start(
        &db,
        QueueSettings::default(),
        Arc::new(UniformPolicy(limit(2))),
        Arc::new(DiscardSink),
    )
    .await;
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
    record_resends(&db.pool, &db.schema, &[11])
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
