//! What the executor costs in memory, measured with a counting global allocator.
//!
//! Run: `cargo bench --bench memory`. Two figures, each measured in a fresh child process so
//! neither inherits the other's heap:
//!
//! - **bytes per queued execution beyond its parameters**: one action at limit 1, 100,000
//!   executions with tiny payloads queued behind one that runs. Everything the executor
//!   allocates counts (queue entries, the live index, the payload's shared header, spare
//!   capacity of growing tables); only the payload's JSON text is subtracted.
//! - **memory of 100,000 idle actions**, each of which received one execution that completed:
//!   allocated bytes per action and the process's resident set (VmRSS).

use std::alloc::{GlobalAlloc, Layout, System};
use std::num::NonZeroU32;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use fifo_executor::core::memory::{ChannelDispatcher, DiscardSink, NoStats};
use fifo_executor::core::{ActionPolicy, Executor, Ports, QueueSettings, UniformPolicy};
use fifo_executor::model::{ActionRef, Completion, EndStatus, Payload, Submission};

/// Bytes currently allocated through the global allocator.
static ALLOCATED: AtomicIsize = AtomicIsize::new(0);

struct Counting;

// SAFETY: every call is forwarded unchanged to the system allocator; the counter is only
// bookkeeping on the side.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            ALLOCATED.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            ALLOCATED.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) };
        ALLOCATED.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            ALLOCATED.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const QUEUED: u64 = 100_000;
const IDLE_ACTIONS: u64 = 100_000;

/// Set for the child processes when this binary was not started by `cargo bench` (say by
/// `cargo test --all-targets`): then each scenario runs at a hundredth of its size, only to
/// show that it works.
const SMOKE_ENV: &str = "MEMORY_SMOKE";

fn scaled(n: u64) -> u64 {
    if std::env::var_os(SMOKE_ENV).is_some() {
        n / 100
    } else {
        n
    }
}

/// How many idle actions to create; `MEMORY_IDLE_ACTIONS` overrides it, for heap profilers
/// that cannot afford 100,000.
fn idle_actions() -> u64 {
    std::env::var("MEMORY_IDLE_ACTIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(scaled(IDLE_ACTIONS))
}
const BYTES_TARGET: f64 = 150.0;
const RSS_TARGET_MB: f64 = 150.0;

fn allocated() -> isize {
    ALLOCATED.load(Ordering::Relaxed)
}

/// The resident set size in kB, from /proc/self/status.
fn vm_rss_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("the bench runtime builds")
}

async fn executor(max_queue_length: usize) -> (Executor, ChannelRx) {
    let (dispatcher, rx) = ChannelDispatcher::new();
    let ports = Ports {
        dispatcher: Arc::new(dispatcher),
        sink: Arc::new(DiscardSink),
        observer: Arc::new(NoStats),
    };
    let settings = QueueSettings {
        max_queue_length,
        ..QueueSettings::default()
    };
    let policy = ActionPolicy {
        concurrency_limit: NonZeroU32::MIN,
        ..ActionPolicy::default()
    };
    let exec = Executor::start(settings, ports, Arc::new(UniformPolicy(policy)))
        .await
        .expect("the executor starts");
    (exec, rx)
}

type ChannelRx = tokio::sync::mpsc::UnboundedReceiver<Vec<fifo_executor::core::Dispatch>>;

/// A tiny JSON payload of its own per execution, as the intake would build it.
fn payload(i: u64) -> Payload {
    Payload::from_json(&format!("[{}]", i % 10)).expect("valid json")
}

/// Waits (polling with a deadline, never a fixed sleep) until `done` holds.
async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done().await {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        tokio::task::yield_now().await;
    }
}

fn queued_execution_cost() {
    let queued = scaled(QUEUED);
    let rt = runtime();
    rt.block_on(async {
        let (exec, _rx) = executor(queued as usize + 1).await;
        let action = ActionRef::parse("memory.queued").expect("valid ref");
        // One execution takes the slot, so the actor exists and everything after it waits.
        exec.submit(&action, vec![Submission::new(0, payload(0))]);
        until("the first execution to run", async || {
            exec.stats(&action)
                .await
                .ok()
                .flatten()
                .is_some_and(|s| s.active_count == 1)
        })
        .await;

        let before = allocated();
        let mut json_bytes = 0usize;
        for chunk in 0..queued / 1_000 {
            let subs: Vec<Submission> = (1..=1_000)
                .map(|i| {
                    let id = chunk * 1_000 + i;
                    let p = payload(id);
                    json_bytes += p.len();
                    Submission::new(id, p)
                })
                .collect();
            exec.submit(&action, subs);
        }
        until("all executions to be queued", async || {
            exec.stats(&action)
                .await
                .ok()
                .flatten()
                .is_some_and(|s| s.queue_length == queued as usize)
        })
        .await;
        let after = allocated();
        let delta = (after - before) as f64;
        let per = (delta - json_bytes as f64) / queued as f64;
        let arc_header = (2 * std::mem::size_of::<usize>()) as f64;
        println!("queued executions: {queued} on one action at limit 1, payloads of 3 bytes");
        println!(
            "  allocated: {:.1} MB for the queue, of which {:.1} MB JSON text",
            delta / 1e6,
            json_bytes as f64 / 1e6
        );
        println!(
            "  bytes per queued execution beyond its parameters: {per:.1} (target <= {BYTES_TARGET}: {})",
            if per <= BYTES_TARGET { "met" } else { "MISSED" }
        );
        println!(
            "    (of which {arc_header:.0} B is the payload's shared header; the executor's own share is {:.1} B)",
            per - arc_header
        );
        exec.shutdown(Duration::from_secs(30)).await;
    });
}

fn idle_actions_cost() {
    let idle = idle_actions();
    let rss_start = vm_rss_kb();
    let rt = runtime();
    rt.block_on(async {
        let (exec, mut rx) = executor(10).await;
        let exec = Arc::new(exec);
        let rss_before = vm_rss_kb();
        let before = allocated();
        let worker_exec = exec.clone();
        let worker = tokio::spawn(async move {
            let mut done = 0u64;
            while done < idle {
                let Some(batch) = rx.recv().await else { break };
                done += batch.len() as u64;
                worker_exec.complete(
                    batch
                        .into_iter()
                        .map(|d| Completion::new(d.execution_id, EndStatus::Succeeded))
                        .collect(),
                );
            }
            rx
        });
        let started = Instant::now();
        for i in 0..idle {
            let action = ActionRef::parse(&format!("memory.idle-{i}")).expect("valid ref");
            exec.submit(&action, vec![Submission::new(i + 1, payload(i))]);
        }
        let _rx = worker.await.expect("the worker finishes");
        until("every execution to be released", async || exec.live_count() == 0).await;
        let took = started.elapsed();
        let after = allocated();
        let rss_after = vm_rss_kb();
        let per = (after - before) as f64 / idle as f64;
        println!(
            "idle actions: {idle}, each ran one execution to completion ({took:.1?} to set up)"
        );
        println!(
            "  allocated per idle action: {per:.0} B (the ActionQueue value itself is {} B)",
            std::mem::size_of::<fifo_executor::core::queue::ActionQueue>()
        );
        match (rss_start, rss_before, rss_after) {
            (Some(start), Some(before), Some(after)) => {
                let mb = after as f64 / 1024.0;
                println!(
                    "  VmRSS: {mb:.1} MB (target < {RSS_TARGET_MB} MB: {}); {:.1} MB at process start, {:.1} MB with the executor started",
                    if mb < RSS_TARGET_MB { "met" } else { "MISSED" },
                    start as f64 / 1024.0,
                    before as f64 / 1024.0
                );
            }
            _ => println!("  VmRSS: not available (no /proc/self/status)"),
        }
        // Then every actor retires (executor.queue.passivate_after_seconds), leaving its
        // record: what 100,000 idle actions cost once passivated.
        let retiring = Instant::now();
        exec.set_settings(QueueSettings {
            passivate_after: Some(Duration::from_millis(1)),
            ..exec.settings()
        });
        until("every actor to retire", async || exec.actor_counts().0 == 0).await;
        let rested = allocated();
        let per = (rested - before) as f64 / idle as f64;
        println!(
            "  once every actor retired ({:.1?}): allocated per idle action {per:.0} B",
            retiring.elapsed()
        );
        if let Some(kb) = vm_rss_kb() {
            let mb = kb as f64 / 1024.0;
            println!(
                "  VmRSS once retired: {mb:.1} MB (target < {RSS_TARGET_MB} MB: {}; freed memory \
                 the allocator keeps counts too)",
                if mb < RSS_TARGET_MB { "met" } else { "MISSED" },
            );
        }
        exec.shutdown(Duration::from_secs(60)).await;
    });
}

fn main() {
    match std::env::var("MEMORY_SCENARIO").as_deref() {
        Ok("queued") => return queued_execution_cost(),
        Ok("idle") => return idle_actions_cost(),
        _ => {}
    }
    // `cargo bench` passes --bench (and `cargo test --benches` passes nothing special); a
    // filter argument that matches neither scenario name skips both.
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_default();
    let smoke = !std::env::args().any(|a| a == "--bench");
    if smoke {
        println!(
            "smoke run at 1/100 of the size (not under `cargo bench`): the targets apply to full runs only"
        );
    }
    let exe = std::env::current_exe().expect("the bench knows its own path");
    for scenario in ["queued", "idle"] {
        if !scenario.contains(filter.as_str()) {
            continue;
        }
        let mut child = Command::new(&exe);
        child.env("MEMORY_SCENARIO", scenario);
        if smoke {
            child.env(SMOKE_ENV, "1");
        }
        let status = child.status().expect("the scenario runs");
        assert!(status.success(), "scenario {scenario} failed");
    }
}
