//! `fifo-executor bench` end to end: the tiny preset against the real RabbitMQ and Postgres,
//! the executor in-process with its ledger, in a vhost and a database of the run's own, after
//! the broker baseline and the limited relay. What is checked is the tool's verdict and its counts, never its
//! timings (benchmarks are benchmarks).

mod support;

use clap::Parser;
use fifo_executor::tools::bench::{self, BenchArgs};
use support::TestVhost;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tiny_preset_completes_every_execution_with_no_violation_and_writes_its_files() {
    let dir = std::env::temp_dir();
    let stem = format!("fifo-bench-test-{}", std::process::id());
    let report_path = dir.join(format!("{stem}.json"));
    let plot_path = dir.join(format!("{stem}.svg"));
    let args = BenchArgs::try_parse_from([
        "bench",
        "--preset",
        "tiny",
        "--isolated",
        "--baseline",
        "broker",
        "--durability",
        "ledger",
        "--no-progress",
        "--timeout",
        "120",
        "--report",
        report_path.to_str().expect("utf-8 temp dir"),
        "--plot",
        plot_path.to_str().expect("utf-8 temp dir"),
    ])
    .expect("valid arguments");

    let report = bench::run(&args).await.expect("the run reports");

    assert!(report.ok, "{}", report.summary());
    let executor = report.executor.as_ref().expect("the executor phase ran");
    assert_eq!(executor.executions, 100);
    assert_eq!(executor.completed, 100);
    assert_eq!(executor.violations_total, 0, "{:?}", executor.violations);
    assert!(executor.completion_to_dispatch.count > 0);
    // Every hand-off sample is split at the dispatch's `dispatched_at`.
    assert_eq!(
        executor.completion_to_admission.count,
        executor.completion_to_dispatch.count
    );
    assert_eq!(
        executor.admission_to_worker.count,
        executor.completion_to_dispatch.count
    );
    let baseline = report.baseline.as_ref().expect("the broker phase ran");
    assert_eq!(baseline.completed, 100);
    assert!(report.ratio.is_some());
    // The limited relay is checked like the executor: FIFO, limits, exactly once.
    let limited = report
        .limited_baseline
        .as_ref()
        .expect("the limited relay ran");
    assert_eq!(limited.completed, 100);
    assert_eq!(limited.violations_total, 0, "{:?}", limited.violations);
    assert!(limited.completion_to_dispatch.count > 0);
    assert!(report.ratio_limited.is_some());

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report_path).expect("report written"))
            .expect("the report is JSON");
    assert_eq!(json["executor"]["completed"], 100);
    assert_eq!(json["limited_baseline"]["completed"], 100);
    assert_eq!(json["ok"], true);
    let svg = std::fs::read_to_string(&plot_path).expect("plot written");
    assert!(svg.starts_with("<svg"));
    let _ = std::fs::remove_file(report_path);
    let _ = std::fs::remove_file(plot_path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_executor_that_never_consumes_fails_the_run_with_a_reason() {
    // --external against a vhost of no executor: nothing consumes the requests queue.
    let vhost = TestVhost::create().await;
    // The URL goes in through a config file: setting the environment would reach the other
    // test running in this binary at the same time.
    let config = std::env::temp_dir().join(format!("{}.yaml", vhost.name));
    std::fs::write(&config, format!("rabbitmq:\n  url: \"{}\"\n", vhost.url))
        .expect("config written");
    let args = BenchArgs::try_parse_from([
        "bench",
        "--preset",
        "tiny",
        "--external",
        "--start-timeout",
        "2",
        "--no-progress",
        "--config",
        config.to_str().expect("utf-8 temp dir"),
    ])
    .expect("valid arguments");
    let outcome = tokio::time::timeout(std::time::Duration::from_secs(120), bench::run(&args))
        .await
        .expect("the probe gives up by itself");
    let _ = std::fs::remove_file(config);
    let error = outcome
        .expect_err("nothing consumes, so the run cannot start")
        .to_string();
    assert!(error.contains("nobody consumes"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_serve_process_lives_through_a_stop_and_periodic_kills_with_their_failover_times() {
    // One instance (cluster.mode single, the default): a SIGSTOP past two 1 s heartbeats,
    // and a SIGKILL every 4 s; the instance owns every partition, so each failover is its
    // own return.
    let dir = std::env::temp_dir().join(format!("fifo-bench-one-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory for the run");
    let config = dir.join("bench.yaml");
    std::fs::write(&config, "rabbitmq:\n  heartbeat_seconds: 1\n").expect("config written");
    let args = support::bench_with_children(
        &dir,
        "--actions 20 --executions 100 --limit 3 --duration-ms 1-10 --rate 150",
        &[
            "--config",
            config.to_str().expect("utf-8 temp dir"),
            "--instances",
            "1",
            "--chaos",
            "stop:1",
            "--kill-every",
            "4s",
            "--timeout",
            "120",
        ],
    );

    let report = bench::run(&args).await.expect("the run reports");
    let summary = report.summary();
    assert!(report.ok, "{summary}");
    let chaos = report.chaos.as_ref().expect("a chaos report");
    assert_eq!(chaos.instances, 1);
    let stops: Vec<_> = chaos.faults.iter().filter(|f| !f.periodic).collect();
    assert_eq!(stops.len(), 1, "{summary}");
    assert!(stops[0].detail.starts_with("stopped bench-0"), "{summary}");
    let kills = chaos.faults.iter().filter(|f| f.periodic).count();
    assert!(kills >= 1, "{summary}");
    assert_eq!(chaos.executor_starts, 1 + kills, "{summary}");
    for f in &chaos.faults {
        assert_eq!(f.partitions_owned, Some(16), "{summary}");
    }
    // Every fault came while executions still flowed; each saw the instance dispatch again.
    assert_eq!(chaos.failover.never, 0, "{summary}");
    assert!(chaos.failover.max_ms.is_some(), "{summary}");
    let audit = chaos.audit.as_ref().expect("the audit ran");
    assert_eq!(
        audit.ledger_statuses.get("succeeded"),
        Some(&2000),
        "{summary}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_soak_samples_the_serve_process_and_uses_every_short_lived_action_once() {
    // 20 s at 100/s: 10 steady actions and 300 short-lived ones used twice each.
    let dir = std::env::temp_dir().join(format!("fifo-bench-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory for the run");
    let plot = dir.join("soak.svg");
    let args = support::bench_with_children(
        &dir,
        "--actions 10 --limit 3 --rate 100",
        &[
            "--soak",
            "20s",
            "--soak-actions",
            "300",
            "--soak-uses",
            "2",
            "--sample-every",
            "2s",
            "--timeout",
            "120",
            "--plot",
            plot.to_str().expect("utf-8 temp dir"),
        ],
    );

    let report = bench::run(&args).await.expect("the run reports");
    let summary = report.summary();
    assert!(report.ok, "{summary}");
    let executor = report.executor.as_ref().expect("the executor ran");
    assert_eq!(executor.completed, 2000, "{summary}");
    let audit = report
        .chaos
        .as_ref()
        .and_then(|c| c.audit.as_ref())
        .expect("the audit ran");
    assert_eq!(
        audit.ledger_statuses.get("succeeded"),
        Some(&2000),
        "{summary}"
    );
    let soak = report.soak.as_ref().expect("a soak report");
    assert_eq!((soak.steady_actions, soak.distinct_actions), (10, 300));
    assert_eq!(soak.trends.len(), 11);
    // The first sample is taken as the load starts: the process, its descriptors, its
    // database connections and broker channels are there to read.
    let first = soak.samples.first().expect("at least one sample");
    assert!(first.rss_kb.is_some_and(|kb| kb > 0), "{summary}");
    assert!(first.fds.is_some_and(|n| n > 0), "{summary}");
    assert!(first.pg_connections.is_some_and(|n| n > 0), "{summary}");
    assert!(first.channels.is_some_and(|n| n > 0), "{summary}");
    assert_eq!(first.dlq, Some(0), "{summary}");
    assert!(first.requests_waiting.is_some(), "{summary}");
    assert!(summary.contains("actions used 310 (10 steady, 300 short-lived)"));
    let svg = std::fs::read_to_string(&plot).expect("plot written");
    assert!(svg.contains("executor RSS, MB"));
    let _ = std::fs::remove_dir_all(&dir);
}
