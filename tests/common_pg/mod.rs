//! Helpers for tests against the real Postgres.
//!
//! - [`TestDb`]: a database of its own per test on the shared server (`FIFO_TEST_PG_URL`,
//!   default `postgres://postgres@127.0.0.1:5432/postgres`), migrated, dropped at the end.
//! - [`TempPg`]: a throwaway server of its own (initdb into a temporary directory, a free
//!   port), for tests that stop and restart Postgres. Never the shared one.
//! - [`eventually`]: poll until a condition holds, with a deadline; tests never sleep a fixed
//!   time to wait for something.
//! - [`Rig`]: an executor with the ledger and the stats writer as its ports.
//! - [`service_config`]: the whole service's config on the ledger, for in-process services.

#![allow(dead_code)] // each test binary uses a different subset

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fifo_executor::core::memory::ChannelDispatcher;
use fifo_executor::core::{
    ActionPolicy, Dispatch, Executor, OutcomeSink, PolicySource, Ports, QueueSettings,
};
use fifo_executor::db::actions::ActionIds;
use fifo_executor::db::ledger::{LedgerOptions, LedgerSink};
use fifo_executor::db::stats::StatsWriter;
use fifo_executor::db::{self, Schema, Worker};
use fifo_executor::model::{
    ActionRef, Completion, EndStatus, ExecutionId, Payload, Receipt, Submission, Verdict,
};
use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use tokio::sync::mpsc;
use tokio::time::Instant;

static NEXT_DB: AtomicUsize = AtomicUsize::new(0);

fn server_url() -> String {
    std::env::var("FIFO_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database of its own on a server, migrated into schema `attune`; dropped on drop.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
    pub schema: Schema,
    server_url: String,
}

impl TestDb {
    /// On the shared server.
    pub async fn new() -> TestDb {
        Self::on_server(&server_url()).await
    }

    /// On the server at `server_url` (a URL naming its maintenance database).
    pub async fn on_server(server_url: &str) -> TestDb {
        let name = format!(
            "fifo_test_{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::Relaxed)
        );
        let admin = admin_pool(server_url).await;
        // A previous run with the same pid may have died before dropping its database.
        sqlx::raw_sql(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&admin)
        .await
        .expect("drop leftover test database");
        // template0 accepts no connections, so parallel tests (and other suites connected to
        // template1) cannot make the copy fail with "being accessed by other users".
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE DATABASE {name} TEMPLATE template0"
        )))
        .execute(&admin)
        .await
        .expect("create test database");
        admin.close().await;
        let url = with_database(server_url, &name);
        // Like db::connect_lazy, with a short acquire timeout: the outage test waits for
        // failed attempts, and each one lasts as long as an acquire may wait.
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_millis(500))
            .connect_lazy(&url)
            .expect("pool");
        let schema = Schema::new("attune").expect("schema");
        db::migrate(&pool, &schema).await.expect("migrate");
        TestDb {
            name,
            url,
            pool,
            schema,
            server_url: server_url.to_owned(),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop runs outside async; a thread of its own with a small runtime does the async
        // clean-up without blocking (or nesting) the test's runtime.
        let server = self.server_url.clone();
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            // The test's own pool is not closed first: that would need the test's runtime, which
            // this drop is blocking. WITH (FORCE) ends its connections instead.
            rt.block_on(async move {
                let Ok(admin) = PgPoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(Duration::from_secs(3))
                    .connect(&server)
                    .await
                else {
                    return; // the server is gone (a TempPg); its directory goes with it
                };
                let _ = sqlx::raw_sql(AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&admin)
                .await;
            });
        })
        .join();
        if dropped.is_err() {
            eprintln!("could not drop test database {}", self.name);
        }
    }
}

async fn admin_pool(server_url: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(1)
        .connect(server_url)
        .await
        .unwrap_or_else(|e| panic!("cannot reach Postgres at {server_url}: {e}"))
}

fn with_database(server_url: &str, name: &str) -> String {
    let options: PgConnectOptions = server_url.parse().expect("server url");
    format!(
        "postgres://{}@{}:{}/{}",
        options.get_username(),
        options.get_host(),
        options.get_port(),
        name
    )
}

/// Polls `check` until it returns `Some`, or panics naming `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An executor whose outcome sink is the ledger and whose observer is the stats writer, with
/// dispatches going to a channel (standing in for RabbitMQ).
pub struct Rig {
    pub exec: Arc<Executor>,
    pub ledger: Arc<LedgerSink>,
    pub ledger_worker: Option<Worker>,
    pub stats: Arc<StatsWriter>,
    pub ids: Arc<ActionIds>,
    pub dispatched: mpsc::UnboundedReceiver<Vec<Dispatch>>,
}

/// How a [`Rig`]'s dispatches wait for the ledger.
#[derive(Debug, Clone, Copy)]
enum Gate {
    /// Not at all.
    None,
    /// Until their admissions are committed.
    AfterCommit,
    /// Only when leaving at once would be unsafe for recovery.
    WhenSafe,
}

/// Ledger options for tests that stop Postgres: retries every 200 ms at most, so the writer
/// notices soon after it is back.
pub fn quick_retries() -> LedgerOptions {
    LedgerOptions {
        retry_max: Duration::from_millis(200),
        ..LedgerOptions::default()
    }
}

impl Rig {
    /// Waits until the ledger has failed to write at least `n` times (Postgres is down).
    pub async fn until_writes_failed(&self, n: u64) {
        eventually(
            Duration::from_secs(10),
            "the ledger failed to write",
            || async { (self.ledger.counters().failed_attempts >= n).then_some(()) },
        )
        .await;
    }

    pub async fn start(
        db: &TestDb,
        settings: QueueSettings,
        policies: Arc<dyn PolicySource>,
        inner: Arc<dyn OutcomeSink>,
    ) -> Rig {
        Self::start_on(&db.pool, &db.schema, settings, policies, inner).await
    }

    pub async fn start_on(
        pool: &PgPool,
        schema: &Schema,
        settings: QueueSettings,
        policies: Arc<dyn PolicySource>,
        inner: Arc<dyn OutcomeSink>,
    ) -> Rig {
        Self::start_with(
            pool,
            schema,
            settings,
            policies,
            inner,
            LedgerOptions::default(),
        )
        .await
    }

    pub async fn start_with(
        pool: &PgPool,
        schema: &Schema,
        settings: QueueSettings,
        policies: Arc<dyn PolicySource>,
        inner: Arc<dyn OutcomeSink>,
        options: LedgerOptions,
    ) -> Rig {
        Self::build(pool, schema, settings, policies, inner, options, Gate::None).await
    }

    /// Like [`start_with`](Self::start_with), with dispatches held until their admissions
    /// are committed (`dispatch_wait: admission`).
    pub async fn start_gated(
        pool: &PgPool,
        schema: &Schema,
        settings: QueueSettings,
        policies: Arc<dyn PolicySource>,
        options: LedgerOptions,
    ) -> Rig {
        let inner = Arc::new(fifo_executor::core::memory::DiscardSink);
        Self::build(
            pool,
            schema,
            settings,
            policies,
            inner,
            options,
            Gate::AfterCommit,
        )
        .await
    }

    /// Like [`start_gated`](Self::start_gated), dispatching the way the service does by
    /// default ([`LedgerSink::dispatch_when_safe`]), at the given limit for every action.
    pub async fn start_when_safe(
        pool: &PgPool,
        schema: &Schema,
        limit_of_all: u32,
        options: LedgerOptions,
    ) -> Rig {
        let inner = Arc::new(fifo_executor::core::memory::DiscardSink);
        let policies = Arc::new(fifo_executor::core::UniformPolicy(limit(limit_of_all)));
        let settings = QueueSettings::default();
        Self::build(
            pool,
            schema,
            settings,
            policies,
            inner,
            options,
            Gate::WhenSafe,
        )
        .await
    }

    async fn build(
        pool: &PgPool,
        schema: &Schema,
        settings: QueueSettings,
        policies: Arc<dyn PolicySource>,
        inner: Arc<dyn OutcomeSink>,
        options: LedgerOptions,
        gate: Gate,
    ) -> Rig {
        let ids = Arc::new(ActionIds::new(schema));
        let (ledger, ledger_worker) =
            LedgerSink::start(pool.clone(), schema, ids.clone(), options, inner);
        let stats = StatsWriter::new(pool.clone(), schema, ids.clone());
        let (dispatcher, dispatched) = ChannelDispatcher::new();
        let live_only = Arc::new(fifo_executor::db::ledger::LiveOnly::new(Arc::new(
            dispatcher,
        )));
        let dispatcher: Arc<dyn fifo_executor::core::Dispatcher> = match gate {
            Gate::None => live_only.clone(),
            Gate::AfterCommit => Arc::new(ledger.dispatch_after_commit(live_only.clone())),
            Gate::WhenSafe => Arc::new(ledger.dispatch_when_safe(live_only.clone())),
        };
        let ports = Ports {
            dispatcher,
            sink: ledger.clone(),
            observer: stats.clone(),
        };
        let exec = Arc::new(
            Executor::start(settings, ports, policies)
                .await
                .expect("executor starts"),
        );
        live_only.bind(&exec);
        Rig {
            exec,
            ledger,
            ledger_worker: Some(ledger_worker),
            stats,
            ids,
            dispatched,
        }
    }

    /// Submits executions and returns a channel that receives each one's verdict.
    pub fn submit(
        &self,
        action: &ActionRef,
        ids: impl IntoIterator<Item = ExecutionId>,
    ) -> mpsc::UnboundedReceiver<(ExecutionId, Verdict)> {
        let (tx, rx) = mpsc::unbounded_channel();
        let subs = ids
            .into_iter()
            .map(|id| {
                let tx = tx.clone();
                let mut sub = Submission::new(
                    id,
                    Payload::from_json(&format!(r#"{{"n": {id}}}"#)).expect("json"),
                );
                sub.request_id = Some(format!("req-{id}").into_boxed_str());
                sub.receipt = Some(Receipt::new(move |v| {
                    let _ = tx.send((id, v));
                }));
                sub
            })
            .collect();
        self.exec.submit(action, subs);
        rx
    }

    /// Waits for the next `n` dispatches (over all actions) and returns their ids in order.
    pub async fn next_dispatches(&mut self, n: usize) -> Vec<Dispatch> {
        let mut out = Vec::new();
        while out.len() < n {
            let batch = tokio::time::timeout(Duration::from_secs(5), self.dispatched.recv())
                .await
                .expect("a dispatch within 5 s")
                .expect("dispatcher open");
            out.extend(batch);
        }
        out
    }

    /// The ids of the next `n` dispatches, in order.
    pub async fn next_dispatched_ids(&mut self, n: usize) -> Vec<ExecutionId> {
        let sent = self.next_dispatches(n).await;
        sent.iter().map(|d| d.execution_id).collect()
    }

    /// No dispatch is waiting right now (call after something that made the actors answer).
    pub fn no_dispatch_waiting(&mut self) -> bool {
        self.dispatched.try_recv().is_err()
    }

    pub fn complete(&self, id: ExecutionId, status: EndStatus) {
        let mut c = Completion::new(id, status);
        c.result = Some(Payload::from_json(&format!(r#"{{"done": {id}}}"#)).expect("json"));
        self.exec.complete(vec![c]);
    }

    /// Makes every action actor handle everything sent to it so far: a stats call goes
    /// through each mailbox behind the earlier messages.
    pub async fn settle_actors(&self) {
        let _ = self.exec.all_stats().await;
    }

    /// Everything the actors were sent so far is handled and committed to the ledger. The
    /// ledger commits in batches, so seeing a dispatch (handed straight to the channel here) is
    /// not enough.
    pub async fn sync(&self) {
        self.settle_actors().await;
        self.ledger.sync().await.expect("ledger sync");
    }

    pub async fn shutdown(&mut self) {
        self.exec.shutdown(Duration::from_secs(5)).await;
        if let Some(w) = self.ledger_worker.take() {
            w.stop(Duration::from_secs(5)).await;
        }
    }

    /// A rig whose policies come from the `action` table (read once now) over `fallback`, as
    /// the service's are; the source is returned for polls and policy stores.
    pub async fn on_action_table(
        db: &TestDb,
        fallback: Arc<dyn PolicySource>,
    ) -> (Arc<fifo_executor::db::policies::DbPolicySource>, Rig) {
        let source = Arc::new(fifo_executor::db::policies::DbPolicySource::new(
            &db.schema, fallback,
        ));
        source.load(&db.pool).await.expect("load the action table");
        let rig = Rig::start(
            db,
            QueueSettings::default(),
            source.clone(),
            Arc::new(fifo_executor::core::memory::DiscardSink),
        )
        .await;
        (source, rig)
    }
}

pub fn action(name: &str) -> ActionRef {
    ActionRef::parse(name).expect("valid ref")
}

pub fn limit(n: u32) -> ActionPolicy {
    ActionPolicy {
        concurrency_limit: std::num::NonZeroU32::new(n).expect("nonzero"),
        ..ActionPolicy::default()
    }
}

/// `(id, status)` of every execution of an action, in id order.
pub async fn statuses(db: &TestDb, action: &str) -> Vec<(i64, String)> {
    sqlx::query_as(
        "SELECT e.id, e.status FROM attune.execution e JOIN attune.action a ON a.id = e.action \
         WHERE a.ref = $1 ORDER BY e.id",
    )
    .bind(action)
    .fetch_all(&db.pool)
    .await
    .expect("read statuses")
}

/// A Postgres server of its own in a temporary directory, for tests that stop it.
pub struct TempPg {
    dir: PathBuf,
    pub port: u16,
}

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

impl TempPg {
    /// initdb and start. initdb refuses root, so as root it runs as `postgres`.
    pub async fn start() -> TempPg {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!(
            "fifo-pg-{}-{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let data = dir.to_string_lossy().into_owned();
        run_pg(
            "initdb",
            &["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync"],
        )
        .await;
        let pg = TempPg { dir, port };
        pg.start_server().await;
        pg
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    async fn start_server(&self) {
        let data = self.dir.to_string_lossy().into_owned();
        let log = self.dir.join("server.log").to_string_lossy().into_owned();
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port, data
        );
        run_pg(
            "pg_ctl",
            &["-D", &data, "-l", &log, "-o", &opts, "-w", "start"],
        )
        .await;
    }

    /// Stops the server the way a crash would (no shutdown checkpoint, connections cut).
    pub async fn stop(&self) {
        let data = self.dir.to_string_lossy().into_owned();
        run_pg("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]).await;
    }

    pub async fn restart(&self) {
        self.start_server().await;
    }
}

impl Drop for TempPg {
    fn drop(&mut self) {
        let data = self.dir.to_string_lossy().into_owned();
        let _ = as_pg_user("pg_ctl", &["-D", &data, "-m", "immediate", "stop"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

fn as_pg_user(tool: &str, args: &[&str]) -> std::process::Command {
    let path = format!("{PG_BIN}/{tool}");
    if is_root() {
        let mut cmd = std::process::Command::new("runuser");
        cmd.args(["-u", "postgres", "--", &path]).args(args);
        cmd
    } else {
        let mut cmd = std::process::Command::new(path);
        cmd.args(args);
        cmd
    }
}

async fn run_pg(tool: &str, args: &[&str]) {
    let out = tokio::process::Command::from(as_pg_user(tool, args))
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Waits until the ledger shows at least `n` executions ended as `succeeded` or `failed` (the
/// end statuses test workers report), at most `timeout`; returns whether it does. Callers
/// then list what is missing with [`ledger_disagreements`].
pub async fn until_ended(pool: &PgPool, n: usize, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let ended: Option<i64> = sqlx::query_scalar(
            "SELECT count(*) FROM attune.execution WHERE status IN ('succeeded', 'failed')",
        )
        .fetch_one(pool)
        .await
        .ok();
        if ended.is_some_and(|e| e >= n as i64) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How the ledger disagrees with what the workers reported: every id of `expected` must have
/// a row in the status its worker reported, and there must be no other rows. Empty when it
/// agrees.
pub async fn ledger_disagreements(
    pool: &PgPool,
    expected: &std::collections::HashMap<u64, &str>,
) -> Vec<String> {
    let rows: Vec<(i64, String)> = sqlx::query_as("SELECT id, status FROM attune.execution")
        .fetch_all(pool)
        .await
        .expect("read the ledger");
    let in_ledger: std::collections::HashMap<u64, String> = rows
        .into_iter()
        .filter_map(|(id, s)| Some((u64::try_from(id).ok()?, s)))
        .collect();
    let mut wrong: Vec<(u64, Option<&str>, &str)> = expected
        .iter()
        .filter(|(id, status)| in_ledger.get(*id).map(String::as_str) != Some(**status))
        .map(|(id, status)| (*id, in_ledger.get(id).map(String::as_str), *status))
        .collect();
    wrong.sort_unstable();
    let mut extra: Vec<u64> = in_ledger
        .keys()
        .filter(|id| !expected.contains_key(*id))
        .copied()
        .collect();
    extra.sort_unstable();
    let mut problems = Vec::new();
    if !wrong.is_empty() {
        problems.push(format!(
            "{} ledger rows disagree with the workers (id, ledger, worker): {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(20)]
        ));
    }
    if !extra.is_empty() {
        problems.push(format!(
            "{} ledger rows for executions never submitted: {:?}",
            extra.len(),
            &extra[..extra.len().min(20)]
        ));
    }
    problems
}

/// The config of an in-process service on the ledger: RabbitMQ at `rabbit_url`, Postgres in
/// `db`, HTTP on a free port, no health checks or purges, and `limits` per action.
pub fn service_config(
    rabbit_url: &str,
    db: &TestDb,
    limits: &std::collections::HashMap<String, u32>,
) -> fifo_executor::config::Config {
    use fifo_executor::config;
    let mut c = config::Config::default();
    c.rabbitmq.url = rabbit_url.to_owned();
    c.database.url = db.url.clone();
    c.executor.durability = config::Durability::Ledger;
    c.executor.shutdown_timeout_seconds = 5;
    c.api.listen = ([127, 0, 0, 1], 0).into();
    c.health.enabled = false;
    c.purge.enabled = false;
    for (action, n) in limits {
        c.policies.actions.insert(
            action.clone(),
            config::ActionPolicy {
                concurrency_limit: Some(*n),
                rate_limit: None,
                enabled: None,
            },
        );
    }
    c
}
