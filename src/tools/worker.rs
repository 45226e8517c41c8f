//! `fifo-executor worker`: consumes dispatches and publishes completions after a simulated
//! duration, failing a given share of them.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use tokio::sync::Mutex;

use super::XorShift;
use crate::rabbit::{edge, topology};

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub url: String,
    /// Binding key below `execution.dispatch.`: `#` for every action, or an action ref.
    pub actions: String,
    /// The worker's own queue.
    pub queue: String,
    /// Executions worked on at once.
    pub concurrency: u16,
    /// Simulated duration range.
    pub min_duration: Duration,
    pub max_duration: Duration,
    /// Share of executions reported as failed, 0..=1.
    pub failure_rate: f64,
}

/// Runs until the connection fails or `stop` resolves.
pub async fn run(
    opts: &WorkerOptions,
    stop: impl std::future::Future<Output = ()>,
) -> Result<u64, lapin::Error> {
    let conn = edge::connect(&opts.url, "fifo-executor worker").await?;
    let ch = conn.create_channel().await?;
    ch.exchange_declare(
        topology::EXCHANGE.into(),
        lapin::ExchangeKind::Topic,
        lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.queue_declare(
        opts.queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.queue_bind(
        opts.queue.as_str().into(),
        topology::EXCHANGE.into(),
        topology::dispatch_routing_key(&opts.actions)
            .as_str()
            .into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
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
                    let span = opts.max_duration.saturating_sub(opts.min_duration);
                    (
                        opts.min_duration + span.mul_f64(r.unit()),
                        r.unit() < opts.failure_rate,
                    )
                };
                tokio::time::sleep(duration).await;
                let id = serde_json::from_slice::<serde_json::Value>(&delivery.data)
                    .ok()
                    .and_then(|v| v.get("execution_id").cloned())
                    .unwrap_or(serde_json::Value::Null);
                let body = serde_json::json!({
                    "execution_id": id,
                    "status": if failed { "failed" } else { "succeeded" },
                    "result": {"simulated_ms": duration.as_millis() as u64},
                });
                let sent = publish
                    .basic_publish(
                        topology::EXCHANGE.into(),
                        topology::COMPLETED_ROUTING_KEY.into(),
                        BasicPublishOptions::default(),
                        &serde_json::to_vec(&body).unwrap_or_default(),
                        BasicProperties::default()
                            .with_content_type("application/json".into())
                            .with_delivery_mode(2),
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
