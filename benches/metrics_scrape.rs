//! What one scrape of `/metrics` costs with many actions (issue 19): its size and render time
//! for 1,000, 10,000 and 100,000 actions, all idle and with 1,000 of them busy, and whether the
//! process's resident set grows with repeated scrapes.
//!
//! Run: `cargo bench --bench metrics_scrape`. Each action has the counters it would have after
//! one execution that completed two hours ago (well past the default
//! `executor.queue.metrics_idle_after_seconds` of 600); a busy one has 5 executions waiting and
//! 1 running. Criterion reports the time of `Metrics::render` (what `GET /metrics` runs, HTTP
//! aside); this binary prints the size of each answer, and VmRSS before and after 200 more
//! scrapes of the largest case. Targets: 100,000 idle actions under 1 MB and 100 ms.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use criterion::{BenchmarkId, Criterion};
use fifo_executor::core::memory::LatestStats;
use fifo_executor::core::{QueueStats, StatsObserver};
use fifo_executor::model::ActionRef;
use fifo_executor::ops::metrics::{self, ActionTallies, Metrics, Outcome};
use fifo_executor::tools::bench::measure::rss_kb;

const ACTION_COUNTS: [usize; 3] = [1_000, 10_000, 100_000];
const BUSY: usize = 1_000;
const IDLE_AFTER: Duration = Duration::from_secs(600);
const RSS_SCRAPES: usize = 200;

/// A service's metrics with `actions` actions, the first `busy` of them busy, as of `now`.
fn metrics_with(actions: usize, busy: usize, now: DateTime<Utc>) -> Metrics {
    let handle = metrics::install().expect("the recorder installs");
    let stats = Arc::new(LatestStats::default());
    let tallies = Arc::new(ActionTallies::default());
    let long_ago = now - chrono::Duration::hours(2);
    for i in 0..actions {
        let action =
            ActionRef::parse(&format!("bench.pack{}.action{i}", i % 100)).expect("a valid ref");
        let is_busy = i < busy;
        stats.observe(&QueueStats {
            queue_length: if is_busy { 5 } else { 0 },
            active_count: usize::from(is_busy),
            max_concurrent: 1,
            oldest_enqueued_at: is_busy.then_some(long_ago),
            total_enqueued: 1,
            total_completed: 1,
            ..QueueStats::empty(action.clone(), long_ago)
        });
        for outcome in [Outcome::Accepted, Outcome::Succeeded] {
            tallies.count(Some(&action), outcome, long_ago);
        }
    }
    Metrics::new(handle, stats, tallies, IDLE_AFTER)
}

fn scrapes(c: &mut Criterion) {
    let now = Utc::now();
    let mut sizes = Vec::new();
    let mut group = c.benchmark_group("metrics_render");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    for actions in ACTION_COUNTS {
        for busy in [0, BUSY] {
            let m = metrics_with(actions, busy, now);
            let text = m.render(now);
            sizes.push((actions, busy, text.len(), text.lines().count()));
            let id = format!("{actions}_actions_{busy}_busy");
            group.bench_with_input(BenchmarkId::from_parameter(id), &m, |b, m| {
                b.iter(|| black_box(m.render(now)).len())
            });
        }
    }
    group.finish();

    println!("\n/metrics per scrape:");
    for (actions, busy, bytes, lines) in &sizes {
        println!(
            "  {actions:>7} actions, {busy:>5} busy: {:>9.1} kB, {lines:>6} lines",
            *bytes as f64 / 1e3
        );
    }

    // Repeated scrapes of the largest case must not grow the process.
    let m = metrics_with(100_000, BUSY, now);
    for _ in 0..20 {
        black_box(m.render(now));
    }
    let before = rss_kb(None);
    for _ in 0..RSS_SCRAPES {
        black_box(m.render(now));
    }
    let after = rss_kb(None);
    match (before, after) {
        (Some((b, _)), Some((a, peak))) => println!(
            "VmRSS, 100,000 actions with {BUSY} busy: {:.1} MB after 20 scrapes, {:.1} MB after \
             {RSS_SCRAPES} more ({:+.1} MB); peak {:.1} MB",
            b as f64 / 1024.0,
            a as f64 / 1024.0,
            (a as f64 - b as f64) / 1024.0,
            peak as f64 / 1024.0
        ),
        _ => println!("VmRSS: not available (no /proc/self/status)"),
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    scrapes(&mut c);
    c.final_summary();
}
