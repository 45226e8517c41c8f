//! A TCP proxy in front of RabbitMQ, so a test can hold back what the broker sends (confirms,
//! deliveries) and cut the connections at a moment of its choosing: a dropped connection
//! with publishes in flight, made to order.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};

/// Forwards every connection made to [`Proxy::port`] to the broker.
pub struct Proxy {
    pub port: u16,
    /// While true, bytes from the broker are read and held, not passed on.
    hold: Arc<AtomicBool>,
    held_released: Arc<Notify>,
    /// While true, new connections are closed at once, as by a broker that is down.
    refusing: Arc<AtomicBool>,
    /// Set to cut every connection open now.
    cut: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a port");
        let port = listener.local_addr().expect("local address").port();
        let hold = Arc::new(AtomicBool::new(false));
        let held_released = Arc::new(Notify::new());
        let refusing = Arc::new(AtomicBool::new(false));
        let (cut, cuts) = watch::channel(0u64);
        let (h, r, refuse) = (hold.clone(), held_released.clone(), refusing.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if refuse.load(Ordering::Acquire) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(super::BROKER_ADDR).await else {
                    continue;
                };
                tokio::spawn(pipe(client, server, h.clone(), r.clone(), cuts.clone()));
            }
        });
        Proxy {
            port,
            hold,
            held_released,
            refusing,
            cut,
            task,
        }
    }

    /// While `on`, closes every new connection at once (the open ones are left alone).
    pub fn refuse(&self, on: bool) {
        self.refusing.store(on, Ordering::Release);
    }

    /// The AMQP URL of `vhost` through the proxy.
    pub fn url(&self, vhost: &str) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/{vhost}", self.port)
    }

    /// Holds back everything the broker sends from now on.
    pub fn hold_from_broker(&self) {
        self.hold.store(true, Ordering::Release);
    }

    /// Passes on again what the broker sends (what was held first).
    pub fn release(&self) {
        self.hold.store(false, Ordering::Release);
        self.held_released.notify_waiters();
    }

    /// Cuts every connection open now (new ones are still accepted); what was held is lost.
    pub fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

async fn pipe(
    client: TcpStream,
    server: TcpStream,
    hold: Arc<AtomicBool>,
    released: Arc<Notify>,
    mut cuts: watch::Receiver<u64>,
) {
    let _ = cuts.borrow_and_update();
    let (mut client_r, mut client_w) = client.into_split();
    let (mut server_r, mut server_w) = server.into_split();
    let up = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = client_r.read(&mut buf).await.unwrap_or(0);
            if n == 0 || server_w.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; 16 * 1024];
        let mut held: Vec<u8> = Vec::new();
        loop {
            tokio::select! {
                r = server_r.read(&mut buf) => {
                    let n = r.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    held.extend_from_slice(&buf[..n]);
                }
                _ = released.notified() => {}
            }
            if !hold.load(Ordering::Acquire) && !held.is_empty() {
                if client_w.write_all(&held).await.is_err() {
                    return;
                }
                held.clear();
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = cuts.changed() => {}
    }
}
