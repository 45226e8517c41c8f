//! `fifo-executor worker`: consumes dispatches and publishes completions after a simulated
//! duration, failing a given share of them.

use std::sync::Arc;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use tokio::sync::Mutex;

use super::{DurationDist, XorShift};
use crate::rabbit::topology;

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub url: String,
    /// `rabbitmq.tls`, for an `amqps://` URL.
    pub tls: crate::config::RabbitTlsConfig,
    /// Binding key below `execution.dispatch.`: `#` for every action, or an action ref.
    pub actions: String,
    /// The worker's own queue.
    pub queue: String,
    /// Executions worked on at once.
    pub concurrency: u16,
    /// How long each simulated execution takes.
    pub duration: DurationDist,
    /// Share of executions reported as failed, 0..=1.
    pub failure_rate: f64,
}

/// Runs until the connection fails or `stop` resolves.
pub async fn run(
    opts: &WorkerOptions,
    stop: impl std::future::Future<Output = ()>,
) -> Result<u64, lapin::Error> {
    let conn = crate::rabbit::connect_tls(&opts.url, &opts.tls, "fifo-executor worker").await?;
    let ch = conn.create_channel().await?;
    super::declare_dispatch_queue(&ch, &opts.queue, &opts.actions, FieldTable::default()).await?;
    ch.basic_qos(opts.concurrency.max(1), BasicQosOptions::default())
        .await?;
    let publish = conn.create_channel().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut consumer = ch
        .basic_consume(
            opts.queue.as_str().into(),
            "fifo-executor-worker".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let rng = Arc::new(Mutex::new(XorShift::seeded()));
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let work = async {
        while let Some(delivery) = consumer.next().await {
            let delivery = delivery?;
            let publish = publish.clone();
            let rng = rng.clone();
            let done = done.clone();
            let opts = opts.clone();
            tokio::spawn(async move {
                let (duration, failed) = {
                    let mut r = rng.lock().await;
                    (opts.duration.sample(&mut r), r.unit() < opts.failure_rate)
                };
                tokio::time::sleep(duration).await;
                let id = serde_json::from_slice::<serde_json::Value>(&delivery.data)
                    .ok()
                    .and_then(|v| v.get("execution_id").cloned())
                    .unwrap_or(serde_json::Value::Null);
                let sent = publish
                    .basic_publish(
                        topology::EXCHANGE.into(),
                        topology::COMPLETED_ROUTING_KEY.into(),
                        BasicPublishOptions::default(),
                        &super::completion_body(id, failed, duration),
                        super::persistent_json(),
                    )
                    .await;
                // Acknowledge the dispatch only once the completion is with the broker: a
                // crash in between redelivers the dispatch rather than losing the completion.
                if let Ok(confirm) = sent
                    && confirm.await.is_ok()
                {
                    let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
        Ok::<(), lapin::Error>(())
    };
    tokio::select! {
        r = work => r?,
        _ = stop => {}
    }
    let _ = conn.close(200, "worker stopping".into()).await;
    Ok(done.load(std::sync::atomic::Ordering::Relaxed))
}
