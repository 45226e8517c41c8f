//! The `action` table as the operators' switch: the runbook's emergency UPDATE pauses actions
//! within two seconds, and enabling them again resumes them in order.

mod common_pg;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use common_pg::{Rig, TestDb, action, eventually, limit};
use fifo_executor::core::memory::DiscardSink;
use fifo_executor::core::{PolicySource, QueueSettings, UniformPolicy};
use fifo_executor::db::policies::{DEFAULT_POLL_INTERVAL, DbPolicySource};
use fifo_executor::model::{EndStatus, Rejection, Verdict};

/// The runbook's "Temporarily Disable Non-Critical Actions", verbatim.
const RUNBOOK_DISABLE: &str = "UPDATE attune.action\n\
SET enabled = false\n\
WHERE priority < 5 OR tags @> '[\"low-priority\"]';";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runbook_update_pauses_low_priority_actions_and_enabling_resumes_them_in_order() {
    let db = TestDb::new().await;
    let source = Arc::new(DbPolicySource::new(
        &db.schema,
        Arc::new(UniformPolicy(limit(1))),
    ));
    source.load(&db.pool).await.expect("load");
    let mut rig = Rig::start(
        &db,
        QueueSettings::default(),
        source.clone(),
        Arc::new(DiscardSink),
    )
    .await;
    let poller = source.spawn_poller(db.pool.clone(), rig.exec.clone(), DEFAULT_POLL_INTERVAL);
    let low = action("reports.nightly");
    let high = action("core.http.get");

    let _v = rig.submit(&low, [1, 2, 3, 4]);
    assert_eq!(rig.next_dispatches(1).await[0].execution_id, 1);
    let _v = rig.submit(&high, [11, 12]);
    assert_eq!(rig.next_dispatches(1).await[0].execution_id, 11);
    rig.sync().await;
    // An operator tags the report action; that alone changes no policy.
    sqlx::query("UPDATE attune.action SET tags = '[\"low-priority\"]' WHERE ref = $1")
        .bind(low.as_str())
        .execute(&db.pool)
        .await
        .expect("tag");

    let disabled = sqlx::raw_sql(RUNBOOK_DISABLE)
        .execute(&db.pool)
        .await
        .expect("the runbook's UPDATE runs");
    assert_eq!(disabled.rows_affected(), 1);
    eventually(Duration::from_secs(2), "the action is paused", || async {
        let s = rig.exec.stats(&low).await.ok().flatten()?;
        (!s.enabled).then_some(())
    })
    .await;
    assert!(rig.exec.policy(&high).enabled);

    // The running one finishes; nothing else of the paused action is dispatched.
    rig.complete(1, EndStatus::Succeeded);
    rig.settle_actors().await;
    assert!(rig.no_dispatch_waiting());
    let s = rig.exec.stats(&low).await.expect("answers").expect("known");
    assert_eq!((s.queue_length, s.active_count), (3, 0));
    // New requests are refused; the waiting ones keep their place.
    let mut refused = rig.submit(&low, [5]);
    assert_eq!(
        refused.recv().await.expect("answered").1,
        Verdict::Rejected {
            execution_id: 5,
            rejection: Rejection::ActionDisabled
        }
    );
    // Other actions carry on.
    rig.complete(11, EndStatus::Succeeded);
    assert_eq!(rig.next_dispatches(1).await[0].execution_id, 12);

    // The trigger keeps `updated` truthful although the UPDATE did not set it.
    let touched: bool =
        sqlx::query_scalar("SELECT updated > created FROM attune.action WHERE ref = $1")
            .bind(low.as_str())
            .fetch_one(&db.pool)
            .await
            .expect("read");
    assert!(touched);

    sqlx::query("UPDATE attune.action SET enabled = true WHERE ref = $1")
        .bind(low.as_str())
        .execute(&db.pool)
        .await
        .expect("enable");
    let mut order = Vec::new();
    let first = tokio::time::timeout(Duration::from_secs(2), rig.next_dispatches(1))
        .await
        .expect("resumed within 2 s");
    order.push(first[0].execution_id);
    for _ in 0..2 {
        rig.complete(*order.last().expect("one"), EndStatus::Succeeded);
        order.push(rig.next_dispatches(1).await[0].execution_id);
    }
    assert_eq!(order, vec![2, 3, 4]);

    // Limits come from the table too, and NULL means the configured one.
    sqlx::query("UPDATE attune.action SET concurrency_limit = 3 WHERE ref = $1")
        .bind(high.as_str())
        .execute(&db.pool)
        .await
        .expect("raise the limit");
    eventually(Duration::from_secs(2), "the new limit applies", || async {
        (rig.exec.policy(&high).concurrency_limit.get() == 3).then_some(())
    })
    .await;
    assert_eq!(
        source.policy_for(&low).concurrency_limit,
        NonZeroU32::MIN,
        "NULL falls back to the configured limit"
    );

    poller.stop(Duration::from_secs(5)).await;
    rig.shutdown().await;
}
