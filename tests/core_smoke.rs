//! A first end-to-end pass through the actors: submit, dispatch in order, complete, drain.

use std::num::NonZeroU32;
use std::sync::Arc;

use fifo_executor::core::memory::{ChannelDispatcher, DiscardSink, LatestStats};
use fifo_executor::core::{ActionPolicy, Executor, Ports, QueueSettings, UniformPolicy};
use fifo_executor::model::{ActionRef, Completion, EndStatus, Payload, Submission};

#[tokio::test]
async fn executions_flow_through_one_actor_in_order_within_the_limit() {
    let (dispatcher, mut dispatched) = ChannelDispatcher::new();
    let stats = Arc::new(LatestStats::default());
    let ports = Ports {
        dispatcher: Arc::new(dispatcher),
        sink: Arc::new(DiscardSink),
        observer: stats.clone(),
    };
    let policy = ActionPolicy {
        concurrency_limit: NonZeroU32::new(2).expect("nonzero"),
        ..ActionPolicy::default()
    };
    let exec = Executor::start(
        QueueSettings::default(),
        ports,
        Arc::new(UniformPolicy(policy)),
    )
    .await
    .expect("executor starts");
    let action = ActionRef::parse("core.http.get").expect("valid ref");
    exec.submit(
        &action,
        (1..=5)
            .map(|id| Submission::new(id, Payload::empty_object()))
            .collect(),
    );
    let mut order = Vec::new();
    while order.len() < 5 {
        let batch = dispatched.recv().await.expect("dispatch");
        for d in batch {
            order.push(d.execution_id);
            exec.complete(vec![Completion::new(d.execution_id, EndStatus::Succeeded)]);
        }
    }
    assert_eq!(order, vec![1, 2, 3, 4, 5]);
    let s = exec
        .stats(&action)
        .await
        .expect("answers")
        .expect("known action");
    assert_eq!(s.total_completed, 5);
    assert_eq!(s.queue_length + s.active_count, 0);
    exec.shutdown(std::time::Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_request_redelivered_after_its_execution_ended_is_a_duplicate_not_a_second_run() {
    use fifo_executor::model::{Receipt, Verdict};
    let (dispatcher, mut dispatched) = ChannelDispatcher::new();
    let ports = Ports {
        dispatcher: Arc::new(dispatcher),
        sink: Arc::new(DiscardSink),
        observer: Arc::new(LatestStats::default()),
    };
    let exec = Executor::start(
        QueueSettings::default(),
        ports,
        Arc::new(UniformPolicy(ActionPolicy::default())),
    )
    .await
    .expect("executor starts");
    let action = ActionRef::parse("core.once").expect("valid ref");
    exec.submit(&action, vec![Submission::new(42, Payload::empty_object())]);
    let first = dispatched.recv().await.expect("dispatched");
    assert_eq!(first[0].execution_id, 42);
    exec.complete(vec![Completion::new(42, EndStatus::Succeeded)]);
    // Wait until the completion is applied (the id is no longer live) before redelivering.
    while exec.is_live(42) {
        tokio::task::yield_now().await;
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let mut again = Submission::new(42, Payload::empty_object());
    again.receipt = Some(Receipt::new(move |v: Verdict| {
        let _ = tx.send(v);
    }));
    exec.submit(&action, vec![again]);
    assert_eq!(
        rx.await.expect("answered"),
        Verdict::Duplicate { execution_id: 42 }
    );
    let s = exec.stats(&action).await.expect("answers").expect("known");
    assert_eq!((s.total_enqueued, s.total_completed), (1, 1));
    assert!(
        dispatched.try_recv().is_err(),
        "not dispatched a second time"
    );
    exec.shutdown(std::time::Duration::from_secs(5)).await;
}
