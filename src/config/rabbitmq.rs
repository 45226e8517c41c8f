//! The `rabbitmq.*` section: the broker connection and the type of the executor's queues.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::secret::redact_url_password;

/// `rabbitmq.*`
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RabbitConfig {
    /// AMQP URI of the broker, vhost included (`%2f` is `/`): `amqp://`, or `amqps://` for
    /// TLS (port 5671 by default), verified against the system's trusted roots and
    /// [`RabbitTlsConfig::ca_file`].
    pub url: String,
    /// Deliveries of one message before it is dead-lettered as `PoisonMessage`, so a message
    /// that crashes the executor cannot loop forever.
    pub max_deliveries: u32,
    /// Kind of the executor's own queues.
    pub queue_type: QueueType,
    /// Unacknowledged messages the broker may push to each consumer; bounds memory and sets
    /// how much can be acknowledged in one batch.
    pub prefetch: u16,
    /// Dispatches, dead letters and replies the executor keeps awaiting their publisher
    /// confirm at once: enough to keep the broker's fsync batches full, small enough that a
    /// reconnect sends little again.
    pub confirm_window: usize,
    /// Largest message body accepted; bigger ones are dead-lettered unread.
    pub max_message_bytes: usize,
    /// Ceiling of the exponential back-off between reconnection attempts.
    pub reconnect_max_backoff_ms: u64,
    /// AMQP heartbeat asked of the broker, in seconds (0: the broker's own, 60 s by default). A connection silent for two
    /// of them is dead: the broker closes it (and hands its unacknowledged messages, and the
    /// active consumer of a single-active-consumer queue, to others), and the executor
    /// reconnects. A `heartbeat=` in `url` wins over this.
    pub heartbeat_seconds: u16,
    /// `rabbitmq.tls.*`: the files an `amqps://` connection uses.
    pub tls: RabbitTlsConfig,
}

/// `rabbitmq.tls.*`: PEM files for `amqps://`, read again at each connection (so a renewed
/// certificate is taken at the next reconnect). Paths, not secrets: the key stays in its file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RabbitTlsConfig {
    /// Certificate authorities trusted besides the system's (a private CA's certificate).
    pub ca_file: Option<PathBuf>,
    /// The executor's own certificate (chain), for brokers that ask for one
    /// (`ssl_options.verify = verify_peer`); needs `client_key_file`.
    pub client_cert_file: Option<PathBuf>,
    /// The private key of `client_cert_file` (PKCS#8, PKCS#1 or SEC1 PEM, unencrypted).
    pub client_key_file: Option<PathBuf>,
}

impl RabbitTlsConfig {
    /// Whether any file is named.
    pub fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.client_cert_file.is_some() || self.client_key_file.is_some()
    }
}

impl Default for RabbitConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned(),
            max_deliveries: 5,
            queue_type: QueueType::default(),
            prefetch: 1000,
            confirm_window: 512,
            max_message_bytes: 1024 * 1024,
            reconnect_max_backoff_ms: 5000,
            heartbeat_seconds: 10,
            tls: RabbitTlsConfig::default(),
        }
    }
}

// The URL carries the broker password, and configs get logged at start-up.
impl fmt::Debug for RabbitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitConfig")
            .field("url", &redact_url_password(&self.url))
            .field("max_deliveries", &self.max_deliveries)
            .field("queue_type", &self.queue_type)
            .field("prefetch", &self.prefetch)
            .field("confirm_window", &self.confirm_window)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("reconnect_max_backoff_ms", &self.reconnect_max_backoff_ms)
            .field("heartbeat_seconds", &self.heartbeat_seconds)
            .field("tls", &self.tls)
            .finish()
    }
}

/// RabbitMQ queue type of the executor's three input queues (`rabbitmq.queue_type`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Single-node queue; RabbitMQ's default.
    #[default]
    Classic,
    /// Raft-replicated queue; counts deliveries itself (`x-delivery-count`).
    Quorum,
}

impl QueueType {
    /// The value of the `x-queue-type` argument.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

impl fmt::Display for QueueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_type_reads_from_config_in_lowercase() {
        let kind: QueueType = serde_yaml_ng::from_str("quorum").expect("parses");
        assert_eq!(kind, QueueType::Quorum);
        assert!(serde_yaml_ng::from_str::<QueueType>("Quorum").is_err());
    }
}
