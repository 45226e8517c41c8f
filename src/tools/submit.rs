//! `fifo-executor submit`: publishes execution requests, with publisher confirms.

use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};

use crate::rabbit::{edge, topology};

#[derive(Debug, Clone)]
pub struct SubmitOptions {
    pub url: String,
    pub action: String,
    pub count: u64,
    /// JSON object sent as `parameters`.
    pub parameters: serde_json::Value,
    /// Requests per second; `None` is flat out.
    pub rate: Option<f64>,
    /// First execution id to use; `None` lets the executor assign ids.
    pub first_id: Option<u64>,
}

/// Publishes the requests and waits for the broker to confirm them all. Returns how long it took.
pub async fn run(opts: &SubmitOptions) -> Result<Duration, lapin::Error> {
    let conn = edge::connect(&opts.url, "fifo-executor submit").await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let start = Instant::now();
    let props = super::persistent_json();
    for i in 0..opts.count {
        if let Some(rate) = opts.rate.filter(|r| *r > 0.0) {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let mut body = serde_json::json!({
            "action_ref": opts.action,
            "request_id": format!("submit-{}-{i}", std::process::id()),
            "parameters": opts.parameters,
        });
        if let Some(first) = opts.first_id {
            body["execution_id"] = serde_json::json!(first + i);
        }
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        // The confirm is collected by wait_for_confirms below, not awaited one by one.
        let _confirm = ch
            .basic_publish(
                topology::EXCHANGE.into(),
                topology::REQUESTED_ROUTING_KEY.into(),
                BasicPublishOptions::default(),
                &bytes,
                props.clone(),
            )
            .await?;
    }
    ch.wait_for_confirms().await?;
    let took = start.elapsed();
    let _ = conn.close(200, "done".into()).await;
    Ok(took)
}
