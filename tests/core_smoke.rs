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
