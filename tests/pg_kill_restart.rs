//! Kill and restart: the real `fifo-executor serve` as a child process on the Postgres ledger,
//! SIGKILLed at random moments three times while executions over 20 actions flow through it,
//! and started again each time. Afterwards every execution ran exactly once, per action in
//! submission order, never more at once than the action's limit, no dispatch came again
//! without a higher attempt, and the ledger holds each one in the end status its worker
//! reported. Twice: 20,000 published at once (a backlog: everything waits in the queues), and
//! 6,000 paced so that most arrive at an empty queue and leave as soon as their acceptance is
//! committed, their admission not yet.
//!
//! A third test restarts RabbitMQ instead (its application: every connection is dropped and
//! the durable queues are recovered from disk) three times under the paced load, while the
//! executor, its workers and its producer live on and connect again; the same checks hold.
//! It runs alone: the other tests of this binary wait while it holds [`BROKER`]. Nothing else
//! may use the broker meanwhile: `cargo test` runs test binaries one after another, but a
//! second test run on the same machine at the same time would lose its connections.
//!
//! The executor gets a config file of its own: its own vhost, database and HTTP port.

mod common_pg;
mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common_pg::TestDb;
use fifo_executor::tools::XorShift;
use support::fleet::{self, Fleet, WorkerSettings};
use support::{TestVhost, poll_until, wait_until};
use tokio::process::{Child, Command};

const ACTIONS: u32 = 20;
/// Kills (or broker restarts) per run.
const KILLS: usize = 3;

/// Held for reading by the tests that leave the broker running, and for writing by the one
/// that restarts it.
static BROKER: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// What is done to the running service, once in each third of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disruption {
    /// SIGKILL the executor and start it again.
    KillExecutor,
    /// Stop RabbitMQ's application and start it again; the executor keeps running.
    RestartBroker,
    /// SIGKILL the executor, restart RabbitMQ while it is down, and start the executor
    /// again: what the dead executor had taken comes back from queues recovered from disk.
    KillBoth,
}
/// Supplied execution ids start here.
const FIRST_ID: u64 = 7_000_001;

fn action_name(i: u32) -> String {
    format!("kill.action-{i:02}")
}

/// The executor's own files: its config and one log per life.
struct Workdir(
    /// A directory of this test run's own, kept when the test fails so the logs can be read.
    PathBuf,
);

impl Workdir {
    /// `name` tells apart the tests of one process.
    fn new(name: &str) -> Workdir {
        let dir = std::env::temp_dir().join(format!("fifo-kill-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the test's directory");
        Workdir(dir)
    }

    fn write_config(
        &self,
        vhost: &TestVhost,
        db: &TestDb,
        limits: &HashMap<String, u32>,
    ) -> PathBuf {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let mut policies = String::new();
        let mut names: Vec<&String> = limits.keys().collect();
        names.sort();
        for name in names {
            policies.push_str(&format!(
                "    {name}: {{concurrency_limit: {}}}\n",
                limits[name]
            ));
        }
        let yaml = format!(
            "executor:\n  durability: ledger\n  shutdown_timeout_seconds: 5\n\
             policies:\n  actions:\n{policies}\
             rabbitmq:\n  url: \"{}\"\n\
             database:\n  url: \"{}\"\n\
             api:\n  listen: \"127.0.0.1:{port}\"\n\
             health:\n  enabled: false\n\
             purge:\n  enabled: false\n\
             logging:\n  filter: \"info,lapin=warn,sqlx=warn\"\n",
            vhost.url, db.url
        );
        let path = self.0.join("config.yaml");
        std::fs::write(&path, yaml).expect("write the config");
        path
    }

    fn log(&self, life: usize) -> PathBuf {
        self.0.join(format!("executor-{life}.log"))
    }
}

/// While it lives, RabbitMQ's app may be stopped: dropping it (a test that fails between
/// `stop_app` and `start_app`) starts the app again, so no later test finds the broker down.
struct BrokerStopped;

impl Drop for BrokerStopped {
    fn drop(&mut self) {
        // Drop cannot await; a plain process, as `TestVhost`'s drop does.
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "start_app"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A connection to the vhost once RabbitMQ takes connections again after its restart.
async fn reconnect(url: &str) -> lapin::Connection {
    let mut last = String::new();
    for _ in 0..300 {
        match lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await {
            Ok(conn) => return conn,
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("RabbitMQ takes no connections 30 s after its restart: {last}");
}

/// Starts `fifo-executor serve` with its output in a log file of this life.
fn spawn(config: &Path, log: &Path) -> Child {
    let out = std::fs::File::create(log).expect("create a log file");
    let err = out.try_clone().expect("log file handle");
    Command::new(env!("CARGO_BIN_EXE_fifo-executor"))
        .arg("serve")
        .arg("--config")
        .arg(config)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .expect("start fifo-executor serve")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_executions_survive_three_sigkills_in_order_within_limits_exactly_once() {
    let _broker = BROKER.read().await;
    disrupt_three_times(20_000, 500, Duration::ZERO, Disruption::KillExecutor).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_arrivals_dispatched_before_their_admission_commits_survive_three_sigkills() {
    let _broker = BROKER.read().await;
    paced(Disruption::KillExecutor).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_restarted_three_times_mid_load_loses_nothing_and_repeats_nothing() {
    let _broker = BROKER.write().await;
    paced(Disruption::RestartBroker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executor_killed_and_rabbitmq_restarted_while_it_is_down_loses_nothing() {
    let _broker = BROKER.write().await;
    paced(Disruption::KillBoth).await;
}

/// 6,000 executions, 20 every 20 ms: about 1,000/s over 20 actions, well below what they can
/// run, so most arrive at an empty queue and leave before their admission is committed.
async fn paced(how: Disruption) {
    disrupt_three_times(6_000, 20, Duration::from_millis(20), how).await;
}

/// `executions` published `chunk` at a time with `pause` between chunks; three disruptions,
/// one in each third of the run; then every check.
async fn disrupt_three_times(executions: u64, chunk: usize, pause: Duration, how: Disruption) {
    let db = TestDb::new().await;
    let vhost = TestVhost::create().await;
    let workdir = Workdir::new(&format!("{executions}-{how:?}"));
    let limits: HashMap<String, u32> = (0..ACTIONS).map(|i| (action_name(i), i % 5 + 1)).collect();
    let config = workdir.write_config(&vhost, &db, &limits);

    let mut rng = XorShift::seeded();
    let requests: Vec<(u64, String)> = (0..executions)
        .map(|i| {
            let action = action_name((rng.next_u64() % u64::from(ACTIONS)) as u32);
            (FIRST_ID + i, action)
        })
        .collect();
    let mut submitted: HashMap<String, Vec<u64>> = HashMap::new();
    for (id, action) in &requests {
        submitted.entry(action.clone()).or_default().push(*id);
    }
    // One kill in each third of the run, at a random point of it.
    let third = executions as usize / KILLS;
    let kill_at: Vec<usize> = (0..KILLS)
        .map(|k| k * third + third / 10 + (rng.next_u64() as usize) % (third * 8 / 10))
        .collect();
    println!(
        "{how:?} after {kill_at:?} finished executions; logs in {}",
        workdir.0.display()
    );

    let mut probe = fleet::connect(&vhost.url).await;
    let mut life = 0;
    let mut child = spawn(&config, &workdir.log(life));
    fleet::until_consuming(&probe, Duration::from_secs(60)).await;
    let workers = Fleet::start(
        &vhost.url,
        "kill.workers",
        WorkerSettings {
            duration_ms: 0..=3,
            failure_rate: 0.05,
            limits: limits.clone(),
        },
    )
    .await;
    let url = vhost.url.clone();
    let producer =
        tokio::spawn(
            async move { fleet::publish_requests_paced(&url, &requests, chunk, pause).await },
        );

    for at in &kill_at {
        poll_until(
            Duration::from_secs(120),
            &format!("{at} executions finished"),
            || async { workers.finished() >= *at },
        )
        .await;
        if how != Disruption::RestartBroker {
            child.start_kill().expect("SIGKILL the executor");
            let status = child.wait().await.expect("the killed executor exits");
            println!(
                "life {life} killed at {} finished: {status}",
                workers.finished()
            );
            fleet::until_not_consuming(&probe, Duration::from_secs(30)).await;
        }
        if how != Disruption::KillExecutor {
            // Started again on the way out even if this test fails in between.
            let _restart = BrokerStopped;
            support::rabbitmqctl(&["stop_app"]).await;
            println!(
                "RabbitMQ stopped at {} finished executions",
                workers.finished()
            );
            let down = Duration::from_millis(rng.next_u64() % 1_500);
            tokio::time::sleep(down).await;
            support::rabbitmqctl(&["start_app"]).await;
            std::mem::forget(_restart);
            probe = reconnect(&vhost.url).await;
        }
        if how != Disruption::RestartBroker {
            life += 1;
            child = spawn(&config, &workdir.log(life));
        }
        fleet::until_consuming(&probe, Duration::from_secs(60)).await;
    }
    producer.await.expect("every request published");
    // On a timeout the checks below say which executions are missing.
    let all_finished = wait_until(Duration::from_secs(180), || async {
        workers.finished() >= executions as usize
    })
    .await;
    // The ledger catches up with the last completions; what it lacks is listed below.
    if all_finished {
        common_pg::until_ended(&db.pool, executions as usize, Duration::from_secs(30)).await;
    }
    let (mut problems, outcomes, resends, redelivered) = {
        let record = workers.record.lock().expect("record");
        (
            record.violations(&submitted, &limits),
            record.outcomes(),
            record.resends,
            record.redelivered,
        )
    };
    problems.extend(common_pg::ledger_disagreements(&db.pool, &outcomes).await);
    println!(
        "{} lives; {resends} dispatches sent again with a higher attempt, {redelivered} \
         delivered again by the broker",
        life + 1,
    );
    assert!(
        problems.is_empty(),
        "after {KILLS} × {how:?} (logs in {}):\n{}",
        workdir.0.display(),
        problems.join("\n")
    );
    child.start_kill().expect("stop the executor");
    let _ = child.wait().await;
    let _ = std::fs::remove_dir_all(&workdir.0);
}
