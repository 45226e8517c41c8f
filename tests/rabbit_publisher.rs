//! The publisher against the real RabbitMQ, with a proxy in between that holds back the
//! broker's confirms and cuts the connection when the test says: what was in flight when a
//! connection was lost goes out again with a higher attempt, unless its execution ended
//! meanwhile; a dispatch no queue takes comes back and is not counted as delivered.

mod support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fifo_executor::core::{Dispatch, Dispatcher};
use fifo_executor::model::{ActionRef, Payload};
use fifo_executor::rabbit::publisher::{self, DispatchOutcomes};
use lapin::options::ConfirmSelectOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use support::proxy::Proxy;
use support::{TestVhost, poll_until};

/// What the publisher said about each dispatch.
#[derive(Default)]
struct Seen {
    delivered: Mutex<Vec<(u64, u32)>>,
    returned: Mutex<Vec<u64>>,
    /// Executions that ended meanwhile: not to be sent again.
    ended: HashSet<u64>,
    /// Ids whose raised attempt the publisher asked to record, and what had gone out by then.
    recorded: Mutex<Vec<(Vec<u64>, usize)>>,
}

impl DispatchOutcomes for Seen {
    fn delivered(&self, d: &Dispatch) {
        self.delivered
            .lock()
            .expect("seen")
            .push((d.execution_id, d.attempt));
    }
    fn returned(&self, d: Dispatch) {
        self.returned.lock().expect("seen").push(d.execution_id);
    }
    fn still_wanted(&self, d: &Dispatch) -> bool {
        !self.ended.contains(&d.execution_id)
    }
    fn resending(&self, ids: Vec<u64>) -> futures::future::BoxFuture<'_, bool> {
        let delivered = self.delivered.lock().expect("seen").len();
        self.recorded.lock().expect("seen").push((ids, delivered));
        Box::pin(std::future::ready(true))
    }
}

fn dispatch(action: &str, id: u64) -> Dispatch {
    let now = chrono::Utc::now();
    Dispatch {
        action: ActionRef::parse(action).expect("ref"),
        execution_id: id,
        request_id: None,
        payload: Payload::empty_object(),
        enqueued_at: now,
        dispatched_at: now,
        attempt: 1,
        freed_by: None,
    }
}

async fn confirm_channel(conn: &Connection) -> Channel {
    let ch = conn.create_channel().await.expect("a channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    ch
}

/// A worker queue bound to the dispatches of `actions` (`#` for all).
async fn worker_queue(ch: &Channel, name: &str, actions: &str) {
    fifo_executor::tools::declare_dispatch_queue(ch, name, actions, FieldTable::default())
        .await
        .expect("a worker queue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatch_lost_with_its_connection_goes_out_again_higher_unless_its_execution_ended() {
    support::init_tracing();
    let vhost = TestVhost::create().await;
    let direct = Connection::connect(&vhost.url, ConnectionProperties::default())
        .await
        .expect("a direct connection");
    let ch = direct.create_channel().await.expect("a channel");
    worker_queue(&ch, "resend.workers", "#").await;
    let seen = Arc::new(Seen {
        ended: HashSet::from([2]),
        ..Seen::default()
    });
    let (publisher, slot, _task) = publisher::spawn(Some(seen.clone()), 16);

    let proxy = Proxy::start().await;
    let proxied = Connection::connect(&proxy.url(&vhost.name), ConnectionProperties::default())
        .await
        .expect("a connection through the proxy");
    slot.send_replace(Some(confirm_channel(&proxied).await));
    // The broker takes both dispatches, but its confirms never come back: then the
    // connection is lost. Meanwhile 2's worker reported (its execution ended); 1's did not.
    proxy.hold_from_broker();
    publisher.dispatch(vec![dispatch("core.a", 1), dispatch("core.a", 2)]);
    poll_until(
        Duration::from_secs(10),
        "both reached the queue",
        || async { support::queue_depth(&ch, "resend.workers").await == 2 },
    )
    .await;
    proxy.cut();
    slot.send_replace(Some(confirm_channel(&direct).await));
    assert!(
        publisher.flush(Duration::from_secs(10)).await,
        "all settled"
    );

    assert_eq!(
        support::take_dispatches(&ch, "resend.workers").await,
        vec![(1, 1), (1, 2), (2, 1)],
        "1 again as attempt 2 (a worker may have it); 2 not again (it ended)"
    );
    assert_eq!(*seen.delivered.lock().expect("seen"), vec![(1, 2)]);
    assert!(seen.returned.lock().expect("seen").is_empty());
    assert_eq!(
        *seen.recorded.lock().expect("seen"),
        vec![(vec![1], 0)],
        "1's raised attempt recorded once, before its copy went out"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatch_no_queue_takes_comes_back_and_is_not_delivered() {
    support::init_tracing();
    let vhost = TestVhost::create().await;
    let conn = Connection::connect(&vhost.url, ConnectionProperties::default())
        .await
        .expect("a connection");
    let ch = conn.create_channel().await.expect("a channel");
    // Workers for core.bound only.
    worker_queue(&ch, "bound.workers", "core.bound").await;
    let seen = Arc::new(Seen::default());
    let (publisher, slot, _task) = publisher::spawn(Some(seen.clone()), 16);
    slot.send_replace(Some(confirm_channel(&conn).await));
    // Odd ids for core.bound, even ones for nobody: the broker confirms many at a time, and
    // lapin hands each return to any confirm of the same frame.
    publisher.dispatch(
        (1..=200)
            .map(|id| {
                dispatch(
                    if id % 2 == 1 {
                        "core.bound"
                    } else {
                        "core.nobody"
                    },
                    id,
                )
            })
            .collect(),
    );
    assert!(
        publisher.flush(Duration::from_secs(10)).await,
        "all settled"
    );
    let mut delivered = seen.delivered.lock().expect("seen").clone();
    delivered.sort_unstable();
    let odd: Vec<(u64, u32)> = (1..=200).step_by(2).map(|id| (id, 1)).collect();
    assert_eq!(delivered, odd, "only what a queue took is delivered");
    let mut returned = seen.returned.lock().expect("seen").clone();
    returned.sort_unstable();
    assert_eq!(returned, (2..=200).step_by(2).collect::<Vec<u64>>());
    assert_eq!(support::take_dispatches(&ch, "bound.workers").await, odd);
}
