//! Three executors share the actions (issue 15) and take over from each other: three real
//! `fifo-executor serve` processes in `cluster.mode: shared` on one vhost and one database of
//! the run's own, driven by `fifo-executor bench --instances 3` against the local RabbitMQ and
//! Postgres. 20,000 executions over 200 actions at limit 3, paced, with simulated workers;
//! meanwhile the instance that owns the most partitions (by `GET /api/v1/cluster`) is killed
//! with SIGKILL twice (and started again), and once stopped with SIGSTOP for 10 s, longer than
//! two heartbeats (`rabbitmq.heartbeat_seconds: 2`), then continued.
//!
//! Checked from the workers' side, by the bench's verifier and its audit
//! (`src/tools/bench/verify.rs`, `chaos.rs`): every execution ended exactly once; per action,
//! first attempts were dispatched in submission order; never more running per action than its
//! limit; no dispatch came again without a higher attempt; and afterwards the ledger holds
//! every execution in the end status its worker reported, none left live, nothing in the
//! dead-letter queue. A write accepted from a fenced owner would show there: an execution
//! dispatched twice, or ended in the ledger otherwise than its worker said.
//!
//! What the SIGSTOPped instance did once it woke is checked as far as it can be from outside:
//! the others must have taken its partitions over while it was stopped (a dispatch of one of
//! its partitions, admitted after the stop, reached the workers before it was continued). That
//! it then refused its own writes shows as its exit with status 3, its
//! `attune_fenced_writes_total`, or its log saying it was fenced; an instance that had nothing
//! pending when it woke may have refused nothing and simply reconnected as a standby, which is
//! correct, so that evidence is printed rather than required.
//!
//! The fault schedule is random (the seed is printed); `FIFO_CLUSTER_SEED` repeats one. Each
//! instance's log is kept in the printed directory if the test fails.

mod support;

use fifo_executor::tools::bench::{self, chaos::FaultKind};

/// How long the SIGSTOP lasts: more than two 2 s heartbeats, with room for the takeover.
const STOP_FOR_MS: f64 = 10_000.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_end_every_execution_once_in_order_within_limits_through_kills_and_a_stop()
{
    let dir = std::env::temp_dir().join(format!("fifo-cluster-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory for the run");
    let config = dir.join("bench.yaml");
    std::fs::write(
        &config,
        "rabbitmq:\n  heartbeat_seconds: 2\nlogging:\n  filter: info\n",
    )
    .expect("the config is written");
    let seed = std::env::var("FIFO_CLUSTER_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| fifo_executor::tools::XorShift::seeded().next_u64())
        .to_string();
    let args = support::bench_with_children(
        &dir,
        "--actions 200 --executions 100 --limit 3 --duration-ms 1-20 --rate 400",
        &[
            "--config",
            config.to_str().expect("utf-8 temp dir"),
            "--instances",
            "3",
            "--chaos",
            "kill:2,stop:1",
            "--stop-for",
            "10s",
            "--chaos-seed",
            &seed,
            "--timeout",
            "180",
        ],
    );

    let report = bench::run(&args).await.expect("the run reports");
    let summary = report.summary();
    println!("{summary}");
    assert!(report.ok, "{summary}");
    let chaos = report.chaos.as_ref().expect("a chaos report");
    assert_eq!(chaos.instances, 3, "{summary}");
    assert_eq!(chaos.faults.len(), 3, "{summary}");
    assert_eq!(chaos.not_injected, 0, "{summary}");
    let audit = chaos.audit.as_ref().expect("the audit ran");
    assert_eq!(
        audit.ledger_statuses.get("succeeded"),
        Some(&20_000),
        "{summary}"
    );
    for f in &chaos.faults {
        assert!(
            f.instance.is_some() && f.partitions_owned.is_some_and(|n| n > 0),
            "each fault hit the instance owning the most partitions: {summary}"
        );
    }
    let stop = chaos
        .faults
        .iter()
        .find(|f| f.fault == FaultKind::Stop)
        .expect("the stop was injected");
    assert!(
        stop.failover_ms.is_some_and(|ms| ms < STOP_FOR_MS),
        "the stopped instance's partitions were taken over while it was stopped: {summary}"
    );
    println!(
        "the stopped instance once it woke: {}",
        if stop.fenced.is_empty() {
            "refused nothing (it had nothing pending)".to_owned()
        } else {
            stop.fenced.join("; ")
        }
    );
    let _ = std::fs::remove_dir_all(&dir);
}
