//! The RabbitMQ topology against the real broker, each test in its own vhost.

mod support;

use std::time::Duration;

use fifo_executor::rabbit::connect;
use fifo_executor::rabbit::topology::{
    self, CANCEL_QUEUE, CANCEL_ROUTING_KEY, COMPLETED_QUEUE, COMPLETED_ROUTING_KEY, DLQ, DLX,
    EXCHANGE, Entity, QueueKind, REQUESTED_ROUTING_KEY, REQUESTS_QUEUE, TopologyError,
    TopologySpec,
};
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, BasicRejectOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use support::{TestVhost, poll_until};

const DEADLINE: Duration = Duration::from_secs(10);

fn classic() -> TopologySpec {
    TopologySpec {
        queue_type: QueueKind::Classic,
        dlq_ttl_hours: 168,
        dlq_max_entries: 10_000,
    }
}

/// A named connection to `vhost` and a channel on it with publisher confirms, so that a publish
/// has reached its queues (or been returned as unroutable) once it is confirmed.
async fn open(vhost: &TestVhost) -> (Connection, Channel) {
    let connection = connect(&vhost.url, "fifo-executor topology test")
        .await
        .expect("connect to the test vhost");
    let channel = new_channel(&connection).await;
    (connection, channel)
}

async fn new_channel(connection: &Connection) -> Channel {
    let channel = connection.create_channel().await.expect("open a channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("enable publisher confirms");
    channel
}

/// Publishes `body` as mandatory and returns whether the broker routed it to at least one queue.
async fn publish(channel: &Channel, exchange: &str, routing_key: &str, body: &[u8]) -> bool {
    let confirmation = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("publisher confirm");
    assert!(confirmation.is_ack(), "{routing_key} was not acknowledged");
    confirmation.take_message().is_none()
}

/// Takes the next message from `queue` (acknowledged on delivery): routing key and body.
async fn take(channel: &Channel, queue: &str) -> Option<(String, Vec<u8>)> {
    channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
        .map(|message| {
            let delivery = message.delivery;
            (delivery.routing_key.as_str().to_owned(), delivery.data)
        })
}

async fn message_count(channel: &Channel, queue: &str) -> u32 {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .unwrap_or_else(|error| panic!("{queue} should exist: {error}"))
        .message_count()
}

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in entries {
        table.insert((*key).into(), value.clone());
    }
    table
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(value.into())
}

/// The arguments the contract gives each queue, written out here independently of the module.
fn contract_arguments(queue_type: &str) -> Vec<(&'static str, FieldTable)> {
    let executor_queue = |queue_from: &str| {
        table(&[
            ("x-dead-letter-exchange", text("attune.dlx")),
            (
                "x-dead-letter-routing-key",
                text(&format!("dlq.{queue_from}")),
            ),
            ("x-queue-type", text(queue_type)),
        ])
    };
    vec![
        (
            "attune.dlq",
            table(&[
                ("x-message-ttl", AMQPValue::LongLongInt(168 * 3600 * 1000)),
                ("x-max-length", AMQPValue::LongLongInt(10_000)),
                ("x-overflow", text("drop-head")),
                ("x-queue-type", text("classic")),
            ]),
        ),
        (
            "attune.execution.requests.queue",
            executor_queue("requested"),
        ),
        (
            "attune.execution.completed.queue",
            executor_queue("completed"),
        ),
        ("attune.execution.cancel.queue", executor_queue("cancel")),
    ]
}

/// Redeclares every exchange and queue with the contract's settings on a fresh channel. The
/// broker compares durability, exchange type and every queue argument it knows with what exists
/// and refuses the declaration if any differs, so success means they all match.
async fn assert_matches_contract(connection: &Connection, queue_type: &str) {
    let channel = new_channel(connection).await;
    for exchange in ["attune.executions", "attune.dlx"] {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|error| panic!("{exchange} differs from the contract: {error}"));
    }
    for (queue, arguments) in contract_arguments(queue_type) {
        channel
            .queue_declare(queue.into(), QueueDeclareOptions::durable(), arguments)
            .await
            .unwrap_or_else(|error| panic!("{queue} differs from the contract: {error}"));
    }
}

#[tokio::test]
async fn declaring_the_topology_twice_changes_nothing() {
    let vhost = TestVhost::create().await;
    let (connection, channel) = open(&vhost).await;

    topology::declare(&channel, &classic())
        .await
        .expect("first declaration");
    assert!(publish(&channel, EXCHANGE, REQUESTED_ROUTING_KEY, b"kept").await);
    topology::declare(&channel, &classic())
        .await
        .expect("second declaration on the same channel");
    topology::declare(&new_channel(&connection).await, &classic())
        .await
        .expect("third declaration on another channel");

    assert_eq!(message_count(&channel, REQUESTS_QUEUE).await, 1);
    assert_matches_contract(&connection, "classic").await;
}

#[tokio::test]
async fn every_exchange_and_queue_exists_durable_with_the_contract_arguments() {
    let vhost = TestVhost::create().await;
    let (connection, channel) = open(&vhost).await;

    topology::declare(&channel, &classic())
        .await
        .expect("declaration");

    assert_matches_contract(&connection, "classic").await;
    let listed = vhost
        .rabbitmqctl(
            "list_queues",
            &["--no-table-headers", "name", "type", "durable"],
        )
        .await;
    let mut rows: Vec<&str> = listed.lines().collect();
    rows.sort_unstable();
    assert_eq!(
        rows,
        [
            "attune.dlq\tclassic\ttrue",
            "attune.execution.cancel.queue\tclassic\ttrue",
            "attune.execution.completed.queue\tclassic\ttrue",
            "attune.execution.requests.queue\tclassic\ttrue",
        ]
    );
}

#[tokio::test]
async fn each_routing_key_reaches_its_own_queue_and_dispatches_reach_none() {
    let vhost = TestVhost::create().await;
    let (_connection, channel) = open(&vhost).await;
    topology::declare(&channel, &classic())
        .await
        .expect("declaration");

    for (routing_key, queue) in [
        (REQUESTED_ROUTING_KEY, REQUESTS_QUEUE),
        (COMPLETED_ROUTING_KEY, COMPLETED_QUEUE),
        (CANCEL_ROUTING_KEY, CANCEL_QUEUE),
    ] {
        assert!(
            publish(&channel, EXCHANGE, routing_key, routing_key.as_bytes()).await,
            "{routing_key} was not routed"
        );
        assert_eq!(
            take(&channel, queue).await,
            Some((routing_key.to_owned(), routing_key.as_bytes().to_vec())),
            "{queue}"
        );
    }

    // Workers bind their own queues for dispatches; the executor's queues must not catch them.
    let dispatch = topology::dispatch_routing_key("core.http.get");
    assert!(!publish(&channel, EXCHANGE, &dispatch, b"{}").await);
}

#[tokio::test]
async fn a_dead_letter_published_on_the_dlx_lands_in_the_dlq() {
    let vhost = TestVhost::create().await;
    let (_connection, channel) = open(&vhost).await;
    topology::declare(&channel, &classic())
        .await
        .expect("declaration");

    assert!(
        publish(
            &channel,
            DLX,
            "dlq.requested",
            b"{\"error_class\":\"QueueFull\"}"
        )
        .await
    );

    assert_eq!(
        take(&channel, DLQ).await,
        Some((
            "dlq.requested".to_owned(),
            b"{\"error_class\":\"QueueFull\"}".to_vec()
        ))
    );
}

#[tokio::test]
async fn a_message_rejected_from_an_executor_queue_is_dead_lettered_into_the_dlq() {
    let vhost = TestVhost::create().await;
    let (_connection, channel) = open(&vhost).await;
    topology::declare(&channel, &classic())
        .await
        .expect("declaration");
    assert!(publish(&channel, EXCHANGE, COMPLETED_ROUTING_KEY, b"undecodable").await);

    let delivery = channel
        .basic_get(COMPLETED_QUEUE.into(), BasicGetOptions { no_ack: false })
        .await
        .expect("basic.get")
        .expect("the completion is in its queue")
        .delivery;
    delivery
        .reject(BasicRejectOptions { requeue: false })
        .await
        .expect("reject");

    poll_until(
        DEADLINE,
        "the rejected completion reaches attune.dlq",
        || {
            let channel = channel.clone();
            async move { message_count(&channel, DLQ).await == 1 }
        },
    )
    .await;
    assert_eq!(
        take(&channel, DLQ).await,
        Some(("dlq.completed".to_owned(), b"undecodable".to_vec()))
    );
}

#[tokio::test]
async fn a_full_dlq_drops_its_oldest_dead_letter() {
    let vhost = TestVhost::create().await;
    let (_connection, channel) = open(&vhost).await;
    let spec = TopologySpec {
        dlq_max_entries: 2,
        ..classic()
    };
    topology::declare(&channel, &spec)
        .await
        .expect("declaration");

    for body in [b"first", b"secnd", b"third"] {
        assert!(publish(&channel, DLX, "dlq.queued", body).await);
    }

    assert_eq!(message_count(&channel, DLQ).await, 2);
    assert_eq!(
        take(&channel, DLQ).await.map(|m| m.1),
        Some(b"secnd".to_vec())
    );
    assert_eq!(
        take(&channel, DLQ).await.map(|m| m.1),
        Some(b"third".to_vec())
    );
}

#[tokio::test]
async fn a_dlq_that_exists_with_another_max_length_is_explained_naming_the_argument() {
    let vhost = TestVhost::create().await;
    let (connection, channel) = open(&vhost).await;
    let older = TopologySpec {
        dlq_max_entries: 5,
        ..classic()
    };
    topology::declare(&channel, &older)
        .await
        .expect("declaration with the old length");

    let retry = new_channel(&connection).await;
    let error = topology::declare(&retry, &classic())
        .await
        .expect_err("the DLQ exists with x-max-length 5");

    let TopologyError::Inequivalent(mismatch) = &error else {
        panic!("expected an explained inequivalence, got {error:?}");
    };
    assert_eq!(mismatch.entity, Entity::Queue(DLQ));
    assert_eq!(mismatch.argument, "x-max-length");
    assert_eq!(mismatch.wanted, "10000");
    assert_eq!(mismatch.current, "5");
    let message = error.to_string();
    for part in [
        "queue 'attune.dlq'",
        "x-max-length = 5",
        "x-max-length = 10000",
        &format!("rabbitmqctl delete_queue -p '{}' attune.dlq", vhost.name),
        "set dlq.max_entries to 5",
    ] {
        assert!(message.contains(part), "{part:?} missing from: {message}");
    }
    // The broker closed the failed channel; the connection and a new channel still work.
    assert!(!retry.status().connected());
    topology::declare(&new_channel(&connection).await, &older)
        .await
        .expect("the old settings still match");
}

#[tokio::test]
async fn quorum_executor_queues_are_declared_on_a_fresh_vhost() {
    let vhost = TestVhost::create().await;
    let (connection, channel) = open(&vhost).await;
    let quorum = TopologySpec {
        queue_type: QueueKind::Quorum,
        ..classic()
    };

    topology::declare(&channel, &quorum)
        .await
        .expect("first declaration");
    topology::declare(&channel, &quorum)
        .await
        .expect("second declaration");
    assert_matches_contract(&connection, "quorum").await;

    let listed = vhost
        .rabbitmqctl("list_queues", &["--no-table-headers", "name", "type"])
        .await;
    let mut rows: Vec<&str> = listed.lines().collect();
    rows.sort_unstable();
    assert_eq!(
        rows,
        [
            "attune.dlq\tclassic",
            "attune.execution.cancel.queue\tquorum",
            "attune.execution.completed.queue\tquorum",
            "attune.execution.requests.queue\tquorum",
        ]
    );

    assert!(publish(&channel, EXCHANGE, REQUESTED_ROUTING_KEY, b"req").await);
    assert_eq!(
        take(&channel, REQUESTS_QUEUE).await.map(|m| m.1),
        Some(b"req".to_vec())
    );

    let switched = topology::declare(&new_channel(&connection).await, &classic())
        .await
        .expect_err("the queues are quorum queues already")
        .to_string();
    assert!(
        switched.contains("already exists with x-queue-type = quorum"),
        "{switched}"
    );
    assert!(switched.contains("x-queue-type = classic"), "{switched}");
    assert!(
        switched.contains("set rabbitmq.queue_type to quorum"),
        "{switched}"
    );
}

#[tokio::test]
async fn a_connection_carries_the_name_it_was_opened_with() {
    let vhost = TestVhost::create().await;
    let name = format!("fifo-executor naming test {}", vhost.name);
    let _connection = connect(&vhost.url, &name).await.expect("connect");

    poll_until(DEADLINE, "rabbitmqctl lists the named connection", || {
        let name = name.clone();
        async move {
            support::rabbitmqctl(&["list_connections", "client_properties"])
                .await
                .contains(&name)
        }
    })
    .await;
}
