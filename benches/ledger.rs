//! What the Postgres ledger costs.
//!
//! - `ledger/accepted_rows`: acceptances written by `LedgerSink` alone, 10,000 per iteration
//!   in record() calls of 100 (as actors hand them over), until committed.
//! - `end_to_end/memory` and `end_to_end/ledger`: 2,000 executions per iteration through a real
//!   `Executor` (10 actions, limit 100 each): submit with a receipt, dispatch, complete; with
//!   the ledger the iteration ends when every transition is committed and every receipt
//!   settled, against the in-memory sink that settles at once.
//!
//! Needs Postgres (`FIFO_BENCH_PG_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`);
//! works in a database of its own, dropped at the end. Run:
//! `cargo bench --bench ledger`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use criterion::{Criterion, Throughput};
use fifo_executor::core::memory::{ChannelDispatcher, DiscardSink, NoStats};
use fifo_executor::core::{
    ActionPolicy, Dispatch, Event, Executor, OutcomeSink, Ports, QueueSettings, UniformPolicy,
};
use fifo_executor::db::actions::ActionIds;
use fifo_executor::db::ledger::{LedgerOptions, LedgerSink};
use fifo_executor::db::{self, Schema, Worker};
use fifo_executor::model::{ActionRef, Completion, EndStatus, Payload, Receipt, Submission};
use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgPool, PgPoolOptions};
use tokio::runtime::Runtime;
use tokio::sync::mpsc::UnboundedReceiver;

const ROWS_PER_ITER: u64 = 10_000;
const EXECUTIONS_PER_ITER: usize = 2_000;
const ACTIONS: usize = 10;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

struct BenchDb {
    server: String,
    name: String,
    pool: PgPool,
    schema: Schema,
}

impl BenchDb {
    async fn create() -> BenchDb {
        let server = std::env::var("FIFO_BENCH_PG_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
        let name = format!("fifo_bench_{}", std::process::id());
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&server)
            .await
            .expect("Postgres reachable");
        for sql in [
            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            format!("CREATE DATABASE {name} TEMPLATE template0"),
        ] {
            sqlx::raw_sql(AssertSqlSafe(sql))
                .execute(&admin)
                .await
                .expect("bench database");
        }
        admin.close().await;
        let base = server
            .rsplit_once('/')
            .map(|(base, _)| base)
            .expect("server url names a database");
        let pool = db::connect_lazy(&format!("{base}/{name}"), 8).expect("pool");
        let schema = Schema::new("attune").expect("schema");
        db::migrate(&pool, &schema).await.expect("migrate");
        BenchDb {
            server,
            name,
            pool,
            schema,
        }
    }

    async fn drop_database(self) {
        self.pool.close().await;
        if let Ok(admin) = PgPoolOptions::new()
            .max_connections(1)
            .connect(&self.server)
            .await
        {
            let _ = sqlx::raw_sql(AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&admin)
            .await;
        }
    }

    fn ledger(&self) -> (Arc<LedgerSink>, Worker) {
        LedgerSink::start(
            self.pool.clone(),
            &self.schema,
            Arc::new(ActionIds::new(&self.schema)),
            LedgerOptions::default(),
            Arc::new(DiscardSink),
        )
    }
}

fn actions() -> Vec<ActionRef> {
    (0..ACTIONS)
        .map(|i| ActionRef::parse(&format!("bench.action{i}")).expect("valid ref"))
        .collect()
}

/// Writes ROWS_PER_ITER acceptances and waits for the commit.
async fn write_rows(ledger: &LedgerSink, actions: &[ActionRef]) {
    let now = Utc::now();
    let payload = Payload::from_json(r#"{"url": "https://example.org"}"#).expect("json");
    for chunk in 0..ROWS_PER_ITER / 100 {
        let events = (0..100)
            .map(|i| Event::Accepted {
                action: actions[((chunk + i) as usize) % actions.len()].clone(),
                execution_id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                request_id: None,
                payload: payload.clone(),
                enqueued_at: now,
                receipt: Some(Receipt::new(|_| {})),
            })
            .collect();
        ledger.record(events);
    }
    ledger.sync().await.expect("ledger sync");
}

/// One executor with its dispatch channel, and the ledger when it has one.
struct Pipeline {
    exec: Executor,
    dispatched: UnboundedReceiver<Vec<Dispatch>>,
    ledger: Option<(Arc<LedgerSink>, Worker)>,
    actions: Vec<ActionRef>,
}

impl Pipeline {
    async fn start(ledger: Option<(Arc<LedgerSink>, Worker)>) -> Pipeline {
        let (dispatcher, dispatched) = ChannelDispatcher::new();
        let sink: Arc<dyn OutcomeSink> = match &ledger {
            Some((l, _)) => l.clone(),
            None => Arc::new(DiscardSink),
        };
        let ports = Ports {
            dispatcher: Arc::new(dispatcher),
            sink,
            observer: Arc::new(NoStats),
        };
        let policy = ActionPolicy {
            concurrency_limit: std::num::NonZeroU32::new(100).expect("nonzero"),
            ..ActionPolicy::default()
        };
        let exec = Executor::start(
            QueueSettings::default(),
            ports,
            Arc::new(UniformPolicy(policy)),
        )
        .await
        .expect("executor");
        Pipeline {
            exec,
            dispatched,
            ledger,
            actions: actions(),
        }
    }

    /// Runs EXECUTIONS_PER_ITER executions from request to recorded completion.
    async fn run(&mut self) {
        let payload = Payload::from_json(r#"{"url": "https://example.org"}"#).expect("json");
        let settled = Arc::new(AtomicU64::new(0));
        let ids: Vec<u64> = (0..EXECUTIONS_PER_ITER)
            .map(|_| NEXT_ID.fetch_add(1, Ordering::Relaxed))
            .collect();
        for (i, chunk) in ids.chunks(100).enumerate() {
            let subs = chunk
                .iter()
                .map(|&id| {
                    let settled = settled.clone();
                    let mut s = Submission::new(id, payload.clone());
                    s.receipt = Some(Receipt::new(move |_| {
                        settled.fetch_add(1, Ordering::Relaxed);
                    }));
                    s
                })
                .collect();
            self.exec
                .submit(&self.actions[i % self.actions.len()], subs);
        }
        let mut done = 0;
        while done < EXECUTIONS_PER_ITER {
            let batch = self.dispatched.recv().await.expect("dispatches");
            done += batch.len();
            if let Some((ledger, _)) = &self.ledger {
                ledger.mark_running(batch.iter().map(|d| d.execution_id).collect());
            }
            self.exec.complete(
                batch
                    .iter()
                    .map(|d| Completion::new(d.execution_id, EndStatus::Succeeded))
                    .collect(),
            );
        }
        // Every actor has handled its completions once it answers a stats call.
        let _ = self.exec.all_stats().await;
        if let Some((ledger, _)) = &self.ledger {
            ledger.sync().await.expect("ledger sync");
        }
        assert_eq!(settled.load(Ordering::Relaxed), EXECUTIONS_PER_ITER as u64);
    }
}

fn bench(c: &mut Criterion, rt: &Runtime, bench_db: &BenchDb) {
    let mut group = c.benchmark_group("ledger");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Elements(ROWS_PER_ITER));
    let (ledger, _worker) = rt.block_on(async { bench_db.ledger() });
    let actions = actions();
    group.bench_function("accepted_rows", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                rt.block_on(write_rows(&ledger, &actions));
            }
            start.elapsed()
        })
    });
    group.finish();

    let mut group = c.benchmark_group("end_to_end");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Elements(EXECUTIONS_PER_ITER as u64));
    for with_ledger in [false, true] {
        let mut pipeline =
            rt.block_on(async { Pipeline::start(with_ledger.then(|| bench_db.ledger())).await });
        let name = if with_ledger { "ledger" } else { "memory" };
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    rt.block_on(pipeline.run());
                }
                start.elapsed()
            })
        });
        rt.block_on(pipeline.exec.shutdown(Duration::from_secs(5)));
    }
    group.finish();
}

/// The figures in plain words, measured again outside criterion's statistics.
fn summary(rt: &Runtime, bench_db: &BenchDb) {
    const ROUNDS: u32 = 5;
    let (ledger, _worker) = rt.block_on(async { bench_db.ledger() });
    let actions = actions();
    let before = ledger.counters();
    let start = Instant::now();
    for _ in 0..ROUNDS {
        rt.block_on(write_rows(&ledger, &actions));
    }
    let elapsed = start.elapsed();
    let after = ledger.counters();
    let rows = ROWS_PER_ITER * u64::from(ROUNDS);
    println!(
        "ledger alone: {:.0} rows/s ({} rows, {} statements, {} transactions)",
        rows as f64 / elapsed.as_secs_f64(),
        rows,
        after.statements - before.statements,
        after.transactions - before.transactions,
    );

    let mut per_execution = Vec::new();
    for with_ledger in [false, true] {
        let mut pipeline =
            rt.block_on(async { Pipeline::start(with_ledger.then(|| bench_db.ledger())).await });
        rt.block_on(pipeline.run()); // warm-up: actors spawned, statements prepared
        let start = Instant::now();
        for _ in 0..ROUNDS {
            rt.block_on(pipeline.run());
        }
        let micros =
            start.elapsed().as_secs_f64() * 1e6 / (EXECUTIONS_PER_ITER as f64 * f64::from(ROUNDS));
        let statements = pipeline
            .ledger
            .as_ref()
            .map(|(l, _)| l.counters().statements)
            .unwrap_or(0);
        per_execution.push((with_ledger, micros, statements));
        rt.block_on(pipeline.exec.shutdown(Duration::from_secs(5)));
    }
    for (with_ledger, micros, statements) in &per_execution {
        let total = EXECUTIONS_PER_ITER as u64 * u64::from(ROUNDS + 1);
        if *with_ledger {
            println!(
                "end to end with the ledger: {micros:.2} µs per execution \
                 ({:.3} statements per execution: 4 transitions each)",
                *statements as f64 / total as f64
            );
        } else {
            println!("end to end in memory:       {micros:.2} µs per execution");
        }
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let bench_db = rt.block_on(BenchDb::create());
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c, &rt, &bench_db);
    c.final_summary();
    summary(&rt, &bench_db);
    rt.block_on(bench_db.drop_database());
}
