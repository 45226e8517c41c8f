//! The RabbitMQ edge: everything that speaks AMQP lives here, nothing else does.
//!
//! The executor is fed and drained only through the broker. Producers publish execution requests,
//! workers publish completions and anyone may publish cancels, all on the `attune.executions`
//! topic exchange; the executor consumes them from its three durable queues, publishes dispatches
//! (`execution.dispatch.<action_ref>`) back on the same exchange for the workers, and publishes
//! what it cannot process to the dead-letter exchange `attune.dlx`, whose queue `attune.dlq` is
//! what operators read. The names and arguments are part of the external contract and are defined
//! once, in [`topology`].
//!
//! The core of the executor never imports this module: the edge turns deliveries into plain
//! values before they reach the per-action queues, and turns their decisions back into publishes.
//!
//! # Layout
//!
//! - [`topology`]: the exchange, queue and binding names and [`topology::declare`], which creates
//!   them idempotently at start and explains a mismatch with what already exists on the broker.
//! - [`connect`]: opens a named connection.
//! - [`wire`]: the contract's JSON messages, decoded with an error class per fault.
//! - [`edge`]: the session: connect, declare, consume; reconnect with backoff; ordered shutdown.
//! - [`consumers`]: intake, completions and cancels, in batches, into the executor.
//! - [`acks`]: settles deliveries in any order with as few `basic.ack` frames as possible.
//! - [`publisher`]: dispatches, dead letters and replies, with publisher confirms and resend.
//! - [`throttle`]: `api.rate_limits.global`, a steady limit on requests taken from the broker.
//! - [`partitions`] and [`routing`]: `cluster.mode: shared`: the partition queues, and which
//!   messages are handled here and which are carried to their partition's owner.
//! - [`dead_letters`]: turns the core's timeouts, purges and reclaimed slots into dead letters.

pub mod acks;
pub mod consumers;
pub mod dead_letters;
pub mod edge;
pub mod partitions;
pub mod publisher;
pub mod routing;
pub mod throttle;
pub mod topology;
pub mod wire;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::{Connection, ConnectionProperties};

use crate::config::RabbitTlsConfig;

/// Opens a connection to the broker at `url` (`amqp://user:pass@host:port/vhost`, vhost
/// percent-encoded: `%2f` is `/`) under the connection name `name`.
///
/// The name is sent as the `connection_name` client property so that an operator running
/// `rabbitmqctl list_connections name client_properties` (or looking at the management UI) can
/// tell the executor's connections from producers' and workers'. An `amqps://` URL is
/// verified against the system's trusted roots only; [`connect_tls`] adds a CA and a client
/// certificate.
pub async fn connect(url: &str, name: &str) -> Result<Connection, lapin::Error> {
    connect_tls(url, &RabbitTlsConfig::default(), name).await
}

/// [`connect`] with `rabbitmq.tls`'s files for an `amqps://` URL.
pub async fn connect_tls(
    url: &str,
    tls: &RabbitTlsConfig,
    name: &str,
) -> Result<Connection, lapin::Error> {
    connect_uri(parse_uri(url)?, tls, name).await
}

/// [`connect_tls`], asking the broker for a heartbeat every `heartbeat_seconds` (0: the
/// broker's own, 60 s by default) unless `url` names one itself (`?heartbeat=`). Two silent
/// heartbeats and the connection is dead on both sides, which is what bounds how long a
/// stalled executor holds its deliveries.
pub async fn connect_with_heartbeat(
    url: &str,
    tls: &RabbitTlsConfig,
    name: &str,
    heartbeat_seconds: u16,
) -> Result<Connection, lapin::Error> {
    let mut uri = parse_uri(url)?;
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(heartbeat_seconds);
    }
    connect_uri(uri, tls, name).await
}

fn parse_uri(url: &str) -> Result<lapin::uri::AMQPUri, lapin::Error> {
    url.parse().map_err(|e: String| {
        lapin::Error::from(std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    })
}

async fn connect_uri(
    uri: lapin::uri::AMQPUri,
    tls: &RabbitTlsConfig,
    name: &str,
) -> Result<Connection, lapin::Error> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    if !tls.is_set() {
        return Connection::connect_uri(uri, properties).await;
    }
    let config = tls_config(tls).map_err(lapin::Error::from)?;
    let runtime = lapin::runtime::default_runtime()?;
    Connection::connect_uri_with_config(uri, properties, config, runtime).await
}

/// Reads `rabbitmq.tls`'s files, at each connection so that a renewed certificate is taken
/// at the next reconnect. An error names the file, never its content.
pub fn tls_config(tls: &RabbitTlsConfig) -> std::io::Result<OwnedTLSConfig> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot read {}: {e}", path.display()))
        })
    };
    let cert_chain = match &tls.ca_file {
        Some(path) => Some(String::from_utf8(read(path)?).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is not a PEM text file", path.display()),
            )
        })?),
        None => None,
    };
    let identity = match (&tls.client_cert_file, &tls.client_key_file) {
        (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
            pem: read(cert)?,
            key: read(key)?,
        }),
        _ => None,
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
}
