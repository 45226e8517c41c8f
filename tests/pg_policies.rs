//! The `action` table as the operators' switch: the runbook's emergency UPDATE pauses actions
//! within two seconds, and enabling them again resumes them in order. And a policy change over
//! HTTP that gives only some fields is merged into the row as it is.

mod common_pg;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use common_pg::{Rig, TestDb, action, eventually, limit};
use fifo_executor::core::{ActionPolicy, PolicyPatch, PolicySource, RateLimit, UniformPolicy};
use fifo_executor::db::policies::{DEFAULT_POLL_INTERVAL, DbPolicySource, DbPolicyStore};
use fifo_executor::model::{ActionRef, EndStatus, Rejection, Verdict};
use fifo_executor::ops::hooks::PolicyStore;

/// The runbook's "Temporarily Disable Non-Critical Actions", verbatim.
const RUNBOOK_DISABLE: &str = "UPDATE attune.action\n\
SET enabled = false\n\
WHERE priority < 5 OR tags @> '[\"low-priority\"]';";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runbook_update_pauses_low_priority_actions_and_enabling_resumes_them_in_order() {
    let db = TestDb::new().await;
    let (source, mut rig) = Rig::on_action_table(&db, Arc::new(UniformPolicy(limit(1)))).await;
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

fn rate(max: u32, per_seconds: u64) -> Option<RateLimit> {
    Some(RateLimit {
        max: NonZeroU32::new(max).expect("nonzero"),
        per: Duration::from_secs(per_seconds),
    })
}

/// `(enabled, concurrency_limit, rate_limit_max, rate_limit_per_seconds, policy_pinned)` of
/// an action's row.
type Row = (bool, Option<i32>, Option<i32>, Option<i32>, bool);

async fn row(db: &TestDb, a: &ActionRef) -> Row {
    sqlx::query_as(
        "SELECT enabled, concurrency_limit, rate_limit_max, rate_limit_per_seconds, \
         policy_pinned FROM attune.action WHERE ref = $1",
    )
    .bind(a.as_str())
    .fetch_one(&db.pool)
    .await
    .expect("the row exists")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_of_some_fields_is_merged_into_the_action_row_as_it_is() {
    let db = TestDb::new().await;
    // The configuration: limit 1, five a second, disabled.
    let config = ActionPolicy {
        concurrency_limit: NonZeroU32::MIN,
        rate_limit: rate(5, 1),
        enabled: false,
    };
    let (source, mut rig) = Rig::on_action_table(&db, Arc::new(UniformPolicy(config))).await;
    let store = DbPolicyStore::new(db.pool.clone(), &db.schema, source.clone());
    let a = action("policy.merged");
    let set = |patch| store.apply(&rig.exec, &a, patch);

    let whole = ActionPolicy {
        concurrency_limit: NonZeroU32::MIN,
        rate_limit: rate(10, 60),
        enabled: false,
    };
    assert_eq!(set(PolicyPatch::whole(whole)).await.expect("stored"), whole);

    // A lone limit change keeps the action disabled and its rate limit, in the row too.
    let raised = set(PolicyPatch {
        concurrency_limit: NonZeroU32::new(3),
        ..PolicyPatch::default()
    })
    .await
    .expect("stored");
    let expected = ActionPolicy {
        concurrency_limit: NonZeroU32::new(3).expect("3"),
        ..whole
    };
    assert_eq!(raised, expected);
    assert_eq!(rig.exec.policy(&a), expected, "applied at once");
    assert_eq!(
        row(&db, &a).await,
        (false, Some(3), Some(10), Some(60), true)
    );

    // An operator enables the action by hand; before the poller has seen it, a change of the
    // rate limit merges into the row, not into the executor's older policy. Null clears.
    sqlx::query("UPDATE attune.action SET enabled = true WHERE ref = $1")
        .bind(a.as_str())
        .execute(&db.pool)
        .await
        .expect("update");
    let cleared = set(PolicyPatch {
        rate_limit: Some(None),
        ..PolicyPatch::default()
    })
    .await
    .expect("stored");
    let expected = ActionPolicy {
        concurrency_limit: NonZeroU32::new(3).expect("3"),
        rate_limit: None,
        enabled: true,
    };
    assert_eq!(cleared, expected);
    assert_eq!(rig.exec.policy(&a), expected);
    assert_eq!(row(&db, &a).await, (true, Some(3), None, None, true));
    // The poller agrees with what was stored.
    let applied = source.refresh(&db.pool, &rig.exec).await.expect("poll");
    assert!(applied.is_empty(), "the poller changed {applied:?}");

    // An action without a row: the fields not given come from the configuration, and the
    // row pins them.
    let fresh = action("policy.fresh");
    let got = store
        .apply(
            &rig.exec,
            &fresh,
            PolicyPatch {
                concurrency_limit: NonZeroU32::new(2),
                ..PolicyPatch::default()
            },
        )
        .await
        .expect("stored");
    assert_eq!(
        got,
        ActionPolicy {
            concurrency_limit: NonZeroU32::new(2).expect("2"),
            ..config
        }
    );
    assert_eq!(
        row(&db, &fresh).await,
        (false, Some(2), Some(5), Some(1), true)
    );

    // Two instances change different fields of one action at once: the row lock orders
    // them and neither change is lost.
    let other_source = Arc::new(DbPolicySource::new(
        &db.schema,
        Arc::new(UniformPolicy(config)),
    ));
    let other = DbPolicyStore::new(db.pool.clone(), &db.schema, other_source);
    for round in 0..10_u32 {
        let limit = NonZeroU32::new(10 + round).expect("nonzero");
        let enabled = round % 2 == 0;
        let (x, y) = tokio::join!(
            store.apply(
                &rig.exec,
                &a,
                PolicyPatch {
                    concurrency_limit: Some(limit),
                    ..PolicyPatch::default()
                }
            ),
            other.apply(
                &rig.exec,
                &a,
                PolicyPatch {
                    enabled: Some(enabled),
                    ..PolicyPatch::default()
                }
            ),
        );
        x.expect("stored");
        y.expect("stored");
        let limit = i32::try_from(limit.get()).expect("small");
        assert_eq!(
            row(&db, &a).await,
            (enabled, Some(limit), None, None, true),
            "round {round}"
        );
    }
    rig.shutdown().await;
}
