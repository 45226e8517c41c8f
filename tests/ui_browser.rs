//! The operations page in a real browser: headless Chromium driven through WebDriver
//! (chromedriver), against the whole service on a real socket, the real RabbitMQ in a vhost of
//! its own, and producers and a worker played by the test over AMQP.
//!
//! Each test leaves a screenshot in `target/ui-screenshots/` for a person to look at.
//! `scripts/test.sh` installs Debian's `chromium` and `chromium-driver` when they are absent;
//! without them these tests fail, saying so.
//!
//! The tests take turns (one browser at a time): Chromium is heavy on a two-core machine, and
//! the waits below are for the page's own refresh, not for a starved browser.

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use fifo_executor::app::Service;
use fifo_executor::config::{self, Config, Secret};
use fifo_executor::http::client::Client as ApiClient;
use fifo_executor::rabbit::topology;
use fifo_executor::tools::ops;
use lapin::options::BasicGetOptions;
use lapin::{Channel, Connection};
use serde_json::{Value, json};
use support::{TestVhost, poll_until};
use tokio::sync::Mutex;

const TOKEN: &str = "ui-test-token";
const WORKER_QUEUE: &str = "ui.worker";
const DEADLINE: Duration = Duration::from_secs(60);
const INSTANCE: &str = "ui-test-instance";
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// One browser at a time.
static TURN: Mutex<()> = Mutex::const_new(());

// -------------------------------------------------------------------------------------------
// The service, the broker and the browser

struct Rig {
    _vhost: TestVhost,
    _conn: Connection,
    ch: Channel,
    service: Service,
    api: ApiClient,
    browser: Browser,
}

impl Rig {
    async fn start(tweak: impl FnOnce(&mut Config)) -> Rig {
        let (vhost, conn, ch) = support::broker_with_topology().await;
        // The worker: one queue for every action's dispatches.
        support::all_dispatches_queue(&ch, WORKER_QUEUE).await;

        let mut c = Config::default();
        c.rabbitmq.url = vhost.url.clone();
        c.executor.durability = config::Durability::Memory;
        c.executor.shutdown_timeout_seconds = 5;
        c.api.listen = ([127, 0, 0, 1], 0).into();
        c.api.admin_token = Some(Secret::new(TOKEN));
        c.health.interval_seconds = 1;
        c.cluster.instance_id = INSTANCE.to_owned();
        tweak(&mut c);
        let service = Service::start(c).await.expect("the service starts");
        let api =
            ApiClient::for_listen_address(service.http_addr()).with_token(Some(TOKEN.to_owned()));
        let browser = Browser::start().await;
        Rig {
            _vhost: vhost,
            _conn: conn,
            ch,
            service,
            api,
            browser,
        }
    }

    fn url(&self, fragment: &str) -> String {
        format!("http://{}/{fragment}", self.service.http_addr())
    }

    /// Publishes a request as a producer would.
    async fn request(&self, action: &str, execution_id: u64) {
        self.publish(
            topology::REQUESTED_ROUTING_KEY,
            json!({"execution_id": execution_id, "action_ref": action, "parameters": {"n": execution_id}}),
        )
        .await;
    }

    /// Publishes a worker's completion.
    async fn complete(&self, execution_id: u64) {
        self.publish(
            topology::COMPLETED_ROUTING_KEY,
            json!({"execution_id": execution_id, "status": "succeeded"}),
        )
        .await;
    }

    async fn publish(&self, routing_key: &str, body: Value) {
        support::publish_json(&self.ch, routing_key, &body).await;
    }

    /// The ids of the dispatches waiting in the worker's queue, taken off it.
    async fn take_dispatches(&self) -> Vec<u64> {
        let mut ids = Vec::new();
        while let Ok(Some(m)) = self
            .ch
            .basic_get(WORKER_QUEUE.into(), BasicGetOptions { no_ack: true })
            .await
        {
            let v: Value = serde_json::from_slice(&m.delivery.data).expect("a dispatch");
            ids.push(v["execution_id"].as_u64().expect("an id"));
        }
        ids
    }

    async fn set_enabled(&self, action: &str, enabled: bool) {
        ops::call(
            &self.api,
            "PUT",
            &format!("/api/v1/actions/{action}/policy"),
            Some(&json!({"concurrency_limit": 1, "enabled": enabled})),
        )
        .await
        .expect("policy set");
    }

    async fn finish(self) {
        self.browser.close().await;
        self.service.shutdown().await.expect("a clean shutdown");
    }
}

struct Browser {
    client: Client,
    driver: Child,
}

impl Browser {
    async fn start() -> Browser {
        for (what, path, package) in [
            ("Chromium", CHROMIUM, "chromium"),
            ("ChromeDriver", CHROMEDRIVER, "chromium-driver"),
        ] {
            assert!(
                std::path::Path::new(path).exists(),
                "{what} is not installed at {path}: `apt-get install {package}` (scripts/test.sh \
                 does this)"
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let browser = Browser {
            client: connect(port).await,
            driver,
        };
        browser
            .client
            .set_window_size(1400, 1000)
            .await
            .expect("window size");
        browser
    }

    async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }

    /// Saves what the browser shows as `target/ui-screenshots/<name>.png`.
    async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("a screenshot");
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/ui-screenshots");
        std::fs::create_dir_all(&dir).expect("screenshot folder");
        std::fs::write(dir.join(format!("{name}.png")), png).expect("screenshot written");
    }

    /// The text of the first element matching `css`, or `None` while there is none.
    async fn text(&self, css: &str) -> Option<String> {
        let e = self.client.find(Locator::Css(css)).await.ok()?;
        e.text().await.ok()
    }

    /// Waits until the element `css` shows text for which `ok` holds; returns that text.
    async fn wait_text(&self, css: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let start = tokio::time::Instant::now();
        loop {
            let last = self.text(css).await;
            if let Some(t) = last.as_deref().filter(|t| ok(t)) {
                return t.to_owned();
            }
            assert!(
                start.elapsed() < DEADLINE,
                "gave up waiting until {what}: `{css}` shows {last:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn click(&self, css: &str) {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no `{css}` to click: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("`{css}` cannot be clicked: {e}"));
    }

    async fn use_token(&self) {
        self.client
            .find(Locator::Css("#token"))
            .await
            .expect("the token field")
            .send_keys(TOKEN)
            .await
            .expect("typed");
        self.click("#token-set").await;
        self.wait_text("#token-state", "the page takes the token", |t| {
            t.contains("admin token set")
        })
        .await;
    }

    /// Cells of the actions table's row for `action`, once it is shown.
    async fn action_row(&self, action: &str) -> Option<Vec<String>> {
        let row = self
            .client
            .find(Locator::Css(&format!(
                "#actions-table tr[data-ref=\"{action}\"]"
            )))
            .await
            .ok()?;
        let mut cells = Vec::new();
        for td in row.find_all(Locator::Css("td")).await.ok()? {
            cells.push(td.text().await.ok()?);
        }
        Some(cells)
    }
}

async fn connect(port: u16) -> Client {
    let caps = json!({
        "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000"],
        }
    });
    let caps = match caps {
        Value::Object(m) => m,
        _ => unreachable!("an object literal"),
    };
    let url = format!("http://127.0.0.1:{port}");
    let mut last = None;
    for _ in 0..100 {
        match ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps.clone())
            .connect(&url)
            .await
        {
            Ok(c) => return c,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no WebDriver session on {url}: {last:?}");
}

// -------------------------------------------------------------------------------------------
// The tests

#[tokio::test]
async fn the_page_shows_an_action_appear_and_its_counts_change() {
    let _turn = TURN.lock().await;
    let rig = Rig::start(|_| {}).await;
    let b = &rig.browser;
    b.client.goto(&rig.url("#actions")).await.expect("opens");
    b.wait_text("#actions-page", "the empty list", |t| {
        t.contains("no actions")
    })
    .await;

    let action = "ui.watch";
    for id in 1..=3 {
        rig.request(action, id).await;
    }
    // Limit 1: one runs, two wait.
    poll_until(DEADLINE, "the row shows 2 queued, 1 running", || async {
        b.action_row(action)
            .await
            .is_some_and(|c| c.get(1).map(String::as_str) == Some("2") && c[2] == "1")
    })
    .await;
    assert_eq!(rig.take_dispatches().await, vec![1]);

    rig.complete(1).await;
    poll_until(
        DEADLINE,
        "the row shows 1 queued after a completion",
        || async {
            b.action_row(action)
                .await
                .is_some_and(|c| c.get(1).map(String::as_str) == Some("1") && c[2] == "1")
        },
    )
    .await;
    b.screenshot("actions").await;

    // The action's own page: the waiting list and what ended.
    b.click(&format!("#actions-table tr[data-ref=\"{action}\"] a"))
        .await;
    b.wait_text("#ad-waiting tbody", "execution 3 waits first", |t| {
        t.starts_with("1 3")
    })
    .await;
    b.wait_text("#ad-running-list tbody", "execution 2 runs", |t| {
        t.starts_with('2')
    })
    .await;
    b.wait_text("#ad-ends tbody", "execution 1 ended", |t| {
        t.starts_with('1')
    })
    .await;
    b.screenshot("action-detail").await;

    // The overview counts the same.
    b.client.goto(&rig.url("#overview")).await.expect("opens");
    b.wait_text("#ov-queued", "one queued in all", |t| t == "1")
        .await;
    b.wait_text("#ov-running", "one running in all", |t| t == "1")
        .await;
    b.wait_text("#ov-status", "a health verdict", |t| {
        ["healthy", "degraded", "unhealthy"].contains(&t)
    })
    .await;
    b.wait_text("#health-table tbody", "the health checks", |t| {
        t.contains("dlq")
    })
    .await;
    b.screenshot("overview").await;
    rig.finish().await;
}

#[tokio::test]
async fn pausing_and_resuming_an_action_from_the_page_stops_and_starts_dispatching() {
    let _turn = TURN.lock().await;
    let rig = Rig::start(|_| {}).await;
    let b = &rig.browser;
    let action = "ui.pause";
    rig.request(action, 10).await;
    poll_until(DEADLINE, "the first dispatch", || async {
        support::queue_depth(&rig.ch, WORKER_QUEUE).await == 1
    })
    .await;
    assert_eq!(rig.take_dispatches().await, vec![10]);
    rig.complete(10).await;

    b.client
        .goto(&rig.url(&format!("#action/{action}")))
        .await
        .expect("opens");
    b.wait_text("#ad-running", "nothing running", |t| t == "0 / 1")
        .await;
    // Without the token the controls that change state are disabled.
    let pause = b
        .client
        .find(Locator::Css("#ad-pause"))
        .await
        .expect("pause button");
    assert_eq!(
        pause.attr("disabled").await.expect("attribute").as_deref(),
        Some("true"),
        "pause is disabled without a token"
    );
    b.use_token().await;
    b.click("#ad-pause").await;
    b.wait_text("#pf-result", "the page says paused", |t| {
        t.contains("paused")
    })
    .await;
    b.wait_text("#ad-enabled", "enabled false", |t| t == "false")
        .await;

    // A paused action refuses new requests (they go to the DLQ) and dispatches nothing;
    // what waited before the pause keeps its place. So: three requests while enabled at
    // limit 1 (one runs, two wait), pause, complete the running one, and nothing follows.
    b.click("#ad-resume").await;
    b.wait_text("#ad-enabled", "enabled again", |t| t == "true")
        .await;
    for id in 11..=13 {
        rig.request(action, id).await;
    }
    b.wait_text("#ad-queued", "two waiting", |t| t == "2").await;
    assert_eq!(rig.take_dispatches().await, vec![11]);
    b.click("#ad-pause").await;
    b.wait_text("#ad-enabled", "paused", |t| t == "false").await;
    rig.complete(11).await;
    b.wait_text("#ad-running", "the slot freed", |t| t == "0 / 1")
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        rig.take_dispatches().await,
        Vec::<u64>::new(),
        "nothing is dispatched while paused"
    );
    assert_eq!(b.text("#ad-queued").await.as_deref(), Some("2"));
    b.screenshot("action-paused").await;

    b.click("#ad-resume").await;
    b.wait_text("#ad-running", "dispatching again", |t| t == "1 / 1")
        .await;
    assert_eq!(rig.take_dispatches().await, vec![12]);
    b.wait_text("#ad-queued", "one waiting", |t| t == "1").await;
    b.screenshot("action-resumed").await;
    rig.finish().await;
}

#[tokio::test]
async fn a_dead_letter_is_replayed_from_the_page_and_dispatched() {
    let _turn = TURN.lock().await;
    let rig = Rig::start(|_| {}).await;
    let b = &rig.browser;
    let action = "ui.replay";
    rig.set_enabled(action, false).await;
    rig.request(action, 4242).await;
    poll_until(DEADLINE, "the rejection reaches the DLQ", || async {
        ops::dlq_list(&rig.api, 100).await.is_ok_and(|a| {
            a["data"]["entries"]
                .as_array()
                .is_some_and(|e| e.iter().any(|e| e["execution_id"] == 4242))
        })
    })
    .await;
    rig.set_enabled(action, true).await;

    b.client.goto(&rig.url("#dlq")).await.expect("opens");
    b.wait_text("#dlq-locked", "the DLQ asks for the token", |t| {
        t.contains("admin token")
    })
    .await;
    b.use_token().await;
    let row = "#dlq-table tbody tr:first-child";
    b.wait_text(row, "the entry is listed", |t| {
        t.contains("4242") && t.contains("ActionDisabled")
    })
    .await;
    b.click(&format!("{row} button:nth-of-type(1)")).await;
    b.wait_text("#dlq-entry-json", "the whole entry", |t| {
        t.contains("\"original\"") && t.contains("\"error_message\"")
    })
    .await;
    b.screenshot("dlq-entry").await;
    b.click("#dlq-entry button").await;
    b.click(&format!("{row} button:nth-of-type(2)")).await;
    b.wait_text("#dlq-result", "the replay is reported", |t| {
        t.contains("replayed 1")
    })
    .await;
    poll_until(DEADLINE, "the replayed execution is dispatched", || async {
        support::queue_depth(&rig.ch, WORKER_QUEUE).await == 1
    })
    .await;
    assert_eq!(rig.take_dispatches().await, vec![4242]);
    b.wait_text("#dlq-size", "the DLQ is empty", |t| t.starts_with("0 "))
        .await;
    b.screenshot("dlq-replayed").await;
    rig.finish().await;
}

#[tokio::test]
async fn the_purge_preview_lists_what_would_go_and_changes_nothing() {
    let _turn = TURN.lock().await;
    let rig = Rig::start(|c| {
        c.purge.enabled = false;
        c.purge.max_queued_age_seconds = 1;
    })
    .await;
    let b = &rig.browser;
    let action = "ui.purge";
    for id in 21..=23 {
        rig.request(action, id).await;
    }
    poll_until(DEADLINE, "one dispatched", || async {
        support::queue_depth(&rig.ch, WORKER_QUEUE).await == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    b.client.goto(&rig.url("#purge")).await.expect("opens");
    b.use_token().await;
    b.click("#purge-preview").await;
    b.wait_text("#purge-summary", "the dry run's summary", |t| {
        t.starts_with("Dry run: would purge 2 (2 queued")
    })
    .await;
    let report = b.text("#purge-report").await.unwrap_or_default();
    assert!(
        report.contains("22") && report.contains("23"),
        "the ids are listed: {report}"
    );
    b.screenshot("purge-preview").await;
    let stats = ops::call(
        &rig.api,
        "GET",
        &format!("/api/v1/actions/{action}/queue-stats"),
        None,
    )
    .await
    .expect("stats");
    assert_eq!(
        stats["data"]["queue_length"], 2,
        "a dry run removes nothing"
    );
    rig.finish().await;
}

#[tokio::test]
async fn the_page_fetches_nothing_from_outside_the_service() {
    let _turn = TURN.lock().await;
    let rig = Rig::start(|_| {}).await;
    let b = &rig.browser;
    rig.request("ui.origin", 31).await;
    b.client.goto(&rig.url("")).await.expect("opens");
    b.use_token().await;
    for tab in [
        "#overview",
        "#actions",
        "#action/ui.origin",
        "#dlq",
        "#purge",
        "#cluster",
    ] {
        b.client.goto(&rig.url(tab)).await.expect("opens");
        b.wait_text("#updated", "the tab refreshed", |t| {
            t.starts_with("Updated")
        })
        .await;
    }
    b.wait_text("#cluster-table tbody", "the partitions", |t| {
        t.contains(INSTANCE)
    })
    .await;
    b.screenshot("cluster").await;
    let loaded = b
        .client
        .execute(
            "return performance.getEntriesByType('resource').map(e => e.name)\
             .concat([location.href]);",
            vec![],
        )
        .await
        .expect("the resource timings");
    let origin = format!("http://{}/", rig.service.http_addr());
    let urls: Vec<String> = loaded
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|u| u.as_str().map(str::to_owned))
        .collect();
    assert!(urls.len() > 5, "the page made its API calls: {urls:?}");
    for u in &urls {
        assert!(u.starts_with(&origin), "{u} is outside {origin}");
        assert!(!u.contains(TOKEN), "the token is never in a URL: {u}");
    }
    let head = response_head(rig.service.http_addr(), "/").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.contains("content-security-policy: default-src 'none'")
            && head.contains("connect-src 'self'"),
        "the page forbids the browser anything from elsewhere: {head}"
    );
    rig.finish().await;
}

/// The status line and headers of `GET path`, lower-cased.
async fn response_head(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connects");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("sent");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read");
    let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    text.split("\r\n\r\n").next().unwrap_or_default().to_owned()
}
