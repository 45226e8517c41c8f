//! The short chaos run CI makes on every change: `fifo-executor bench --chaos` against the
//! real `fifo-executor serve` binary, with 8,000 executions paced over about fifty-five
//! seconds and one fault of every kind at random moments: two SIGKILLs of the executor, its
//! RabbitMQ connections closed twice, RabbitMQ's app restarted, PostgreSQL restarted. The run
//! fails unless every execution ran once, per action in order, never above its limit, no
//! dispatch came again without a higher attempt, and afterwards the ledger holds every
//! execution ended as its worker reported with nothing in the dead-letter queue (see
//! `src/tools/bench/chaos.rs`). The long run and its figures are in RELIABILITY.md.
//!
//! It restarts the machine's RabbitMQ and PostgreSQL, so it is a binary of its own: `cargo
//! test` runs test binaries one after another, and nothing else uses them meanwhile. A
//! different fault schedule each time (the seed is printed); `FIFO_CHAOS_SEED` repeats one.

use clap::Parser;
use fifo_executor::tools::bench::{self, BenchArgs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_execution_ends_once_in_order_within_limits_through_every_kind_of_fault() {
    let dir = std::env::temp_dir().join(format!("fifo-chaos-test-{}", std::process::id()));
    let seed = std::env::var("FIFO_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| fifo_executor::tools::XorShift::seeded().next_u64());
    let seed = seed.to_string();
    let args = BenchArgs::try_parse_from([
        "bench",
        "--preset",
        "wide",
        "--actions",
        "40",
        "--executions",
        "200",
        "--limit",
        "3",
        "--duration-ms",
        "1-20",
        "--rate",
        "150",
        "--chaos",
        "kill:2,close:2,broker:1,postgres:1",
        "--chaos-seed",
        &seed,
        "--serve-bin",
        env!("CARGO_BIN_EXE_fifo-executor"),
        "--chaos-dir",
        dir.to_str().expect("utf-8 temp dir"),
        "--no-progress",
        "--timeout",
        "300",
    ])
    .expect("valid arguments");

    let report = bench::run(&args).await.expect("the run reports");
    let summary = report.summary();
    println!("{summary}");
    assert!(report.ok, "{summary}");
    let chaos = report.chaos.as_ref().expect("a chaos report");
    assert_eq!(chaos.faults.len(), 6, "{summary}");
    assert_eq!(
        chaos.executor_starts, 3,
        "two kills, two restarts: {summary}"
    );
    let audit = chaos.audit.as_ref().expect("the audit ran");
    assert_eq!(
        audit.ledger_statuses.get("succeeded"),
        Some(&8000),
        "{summary}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
