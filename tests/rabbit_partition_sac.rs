//! The broker guarantee partition ownership is to rest on (issue 15): a queue declared with
//! `x-single-active-consumer` delivers to one consumer at a time, and when that consumer's
//! connection dies, it gives the unacknowledged messages back and makes a standby active.
//! RabbitMQ 3.10 can fail to promote the standby of a classic queue after a crash
//! (rabbitmq-server issue 5460), so partition queues are quorum queues; this checks the
//! quorum queue's promotion after an abrupt close and prints how long it took, and prints the
//! classic queue's for comparison (README, "Running several instances").

mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use support::TestVhost;
use support::proxy::Proxy;

async fn channel(conn: &Connection) -> Channel {
    let ch = conn.create_channel().await.expect("a channel");
    ch.basic_qos(10, BasicQosOptions::default())
        .await
        .expect("qos");
    ch
}

async fn declare(ch: &Channel, queue: &str, kind: &str) {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString(kind.into()));
    args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        args,
    )
    .await
    .expect("a single-active-consumer queue");
}

/// The active consumer's connection is cut while it holds three messages: how long until the
/// standby has the first of them (it must get all three), or `None` if it never does within
/// `patience`.
async fn promotion_after_a_cut(kind: &str, patience: Duration) -> Option<Duration> {
    let vhost = TestVhost::create().await;
    let proxy = Proxy::start().await;
    let active = Connection::connect(&proxy.url(&vhost.name), ConnectionProperties::default())
        .await
        .expect("the active consumer's connection");
    let standby = Connection::connect(&vhost.url, ConnectionProperties::default())
        .await
        .expect("the standby's connection");
    let (a, b) = (channel(&active).await, channel(&standby).await);
    let queue = format!("partition.{kind}");
    declare(&a, &queue, kind).await;
    let mut first = a
        .basic_consume(
            queue.as_str().into(),
            "active".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("the first consumer");
    // Registered second: the standby.
    let mut second = b
        .basic_consume(
            queue.as_str().into(),
            "standby".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("the second consumer");
    b.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    for body in [&b"one"[..], b"two", b"three"] {
        b.basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirmed");
    }
    // The active consumer gets all three (its prefetch allows ten), the standby nothing.
    for _ in 0..3 {
        let held = tokio::time::timeout(Duration::from_secs(10), first.next())
            .await
            .expect("the active consumer gets every message")
            .expect("open")
            .expect("a delivery");
        assert!(!held.redelivered);
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), second.next())
            .await
            .is_err(),
        "the standby gets nothing while the active consumer lives"
    );

    let cut = Instant::now();
    proxy.cut();
    let mut took = None;
    for _ in 0..3 {
        let got = tokio::time::timeout(patience, second.next()).await.ok()?;
        let delivery = got.expect("open").expect("a delivery");
        assert!(delivery.redelivered, "a message the dead consumer held");
        took.get_or_insert(cut.elapsed());
    }
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_queues_standby_takes_over_when_the_active_consumers_connection_dies() {
    support::init_tracing();
    let mut quorum = Vec::new();
    for _ in 0..3 {
        quorum.push(
            promotion_after_a_cut("quorum", Duration::from_secs(15))
                .await
                .expect("the quorum queue promotes its standby"),
        );
    }
    let classic = promotion_after_a_cut("classic", Duration::from_secs(15)).await;
    println!(
        "single-active-consumer promotion after a cut connection: quorum {quorum:?}, classic {classic:?}"
    );
}
