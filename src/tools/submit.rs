//! `fifo-executor submit`: publishes execution requests, with publisher confirms.
//!
//! With `cluster.mode: shared` in its config it publishes each request straight to its
//! action's partition queue (routing key `partition.<p>`, README "Running several
//! instances"), sparing the executor the hop from the shared intake queue.

use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};

use crate::rabbit::topology;

/// The routing key of a request for `action`: its partition's queue in shared mode.
pub fn routing_key_for(action: &str, cluster: &crate::config::ClusterConfig) -> String {
    match cluster.mode {
        crate::config::ClusterMode::Shared => crate::rabbit::partitions::routing_key(
            crate::cluster::partition_of_ref(action, cluster.partitions),
        ),
        crate::config::ClusterMode::Single => topology::REQUESTED_ROUTING_KEY.to_owned(),
    }
}

#[derive(Debug, Clone)]
pub struct SubmitOptions {
    pub url: String,
    /// `rabbitmq.tls`, for an `amqps://` URL.
    pub tls: crate::config::RabbitTlsConfig,
    pub action: String,
    pub count: u64,
    /// JSON object sent as `parameters`.
    pub parameters: serde_json::Value,
    /// Requests per second; `None` is flat out.
    pub rate: Option<f64>,
    /// First execution id to use; `None` lets the executor assign ids.
    pub first_id: Option<u64>,
    /// Spreads the requests over this many actions: request `i` goes to `<action>.<i mod N>`
    /// (so `--count N --spread N` gives N actions one request each). `None`: all to `action`.
    pub spread: Option<u64>,
    /// Where requests go: the shared intake, or each action's partition queue.
    pub cluster: crate::config::ClusterConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error(
        "{0} requests came back unrouted: no queue is bound to {1} (is an executor running \
         with the same cluster.mode and cluster.partitions?)"
    )]
    Unrouted(usize, String),
}

/// Publishes the requests and waits for the broker to confirm them all. Returns how long it took.
pub async fn run(opts: &SubmitOptions) -> Result<Duration, SubmitError> {
    let conn = crate::rabbit::connect_tls(&opts.url, &opts.tls, "fifo-executor submit").await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let start = Instant::now();
    let props = super::persistent_json();
    let mut confirms = Vec::with_capacity(usize::try_from(opts.count).unwrap_or(0).min(1 << 20));
    for i in 0..opts.count {
        if let Some(rate) = opts.rate.filter(|r| *r > 0.0) {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let action = match opts.spread.filter(|&n| n > 0) {
            Some(n) => format!("{}.{}", opts.action, i % n),
            None => opts.action.clone(),
        };
        let routing_key = routing_key_for(&action, &opts.cluster);
        let mut body = serde_json::json!({
            "action_ref": action,
            "request_id": format!("submit-{}-{i}", std::process::id()),
            "parameters": opts.parameters,
        });
        if let Some(first) = opts.first_id {
            body["execution_id"] = serde_json::json!(first + i);
        }
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        // Confirms are awaited together below, not one by one.
        let confirm = ch
            .basic_publish(
                topology::EXCHANGE.into(),
                routing_key.as_str().into(),
                // A request no queue takes must not vanish unnoticed.
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &bytes,
                props.clone(),
            )
            .await?;
        confirms.push(confirm);
    }
    let mut returned = 0;
    for confirm in confirms {
        if let lapin::Confirmation::Ack(Some(_)) | lapin::Confirmation::Nack(Some(_)) =
            confirm.await?
        {
            returned += 1;
        }
    }
    let took = start.elapsed();
    let _ = conn.close(200, "done".into()).await;
    if returned > 0 {
        let to = routing_key_for(&opts.action, &opts.cluster);
        return Err(SubmitError::Unrouted(returned, to));
    }
    Ok(took)
}
