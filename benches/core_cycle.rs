//! The full cycle through the actors: submit → dispatch → complete, for 1 to 10,000 actions,
//! next to a bare tokio-mpsc pipeline of the same three hops as the reference.
//!
//! Run: `cargo bench --bench core_cycle`. Each round pushes `EXECUTIONS_PER_ROUND` executions
//! through; criterion reports the time per round and executions/s, and at the end this binary
//! prints the median executions/s of both pipelines and their ratio per action count.
//!
//! The driver, for both pipelines, on a multi-thread tokio runtime with 2 workers:
//! - a producer task submits, round-robin over the actions, batches of up to `BATCH`
//!   executions per action (the executor's API takes one `Vec<Submission>` per action);
//! - a worker task receives dispatch batches, takes whatever else has already arrived (up to
//!   `WORKER_BATCH`), and reports them complete in one call.
//!
//! The reference keeps the bare minimum of the same bookkeeping per action: one task owning
//! a FIFO `VecDeque`, the set of running ids and a limit, fed by an unbounded mpsc channel. It
//! has no live index (its worker knows each dispatch's action), no events, no counters, no
//! clock and no actor framework.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use fifo_executor::core::memory::{ChannelDispatcher, DiscardSink, NoStats};
use fifo_executor::core::{ActionPolicy, Executor, Ports, QueueSettings, UniformPolicy};
use fifo_executor::model::{ActionRef, Completion, EndStatus, Payload, Submission};
use tokio::sync::{Notify, mpsc};

const EXECUTIONS_PER_ROUND: u64 = 100_000;
const ACTION_COUNTS: [usize; 4] = [1, 100, 1_000, 10_000];
const CONCURRENCY: u32 = 10;
const BATCH: usize = 100;
const WORKER_BATCH: usize = 4_096;
const SAMPLES: usize = 10;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("the bench runtime builds")
}

fn action_refs(n: usize) -> Vec<ActionRef> {
    (0..n)
        .map(|i| ActionRef::parse(&format!("bench.action-{i}")).expect("valid action ref"))
        .collect()
}

/// Counts completed executions and wakes the driver when a round's target is reached.
#[derive(Default)]
struct Progress {
    done: AtomicU64,
    target: AtomicU64,
    notify: Notify,
}

impl Progress {
    fn add(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::AcqRel) + n;
        if done >= self.target.load(Ordering::Acquire) {
            self.notify.notify_one();
        }
    }

    async fn wait_for(&self, target: u64) {
        self.target.store(target, Ordering::Release);
        while self.done.load(Ordering::Acquire) < target {
            let notified = self.notify.notified();
            if self.done.load(Ordering::Acquire) >= target {
                break;
            }
            notified.await;
        }
    }
}

/// Spreads a round's executions over the actions: `(action index, ids)` batches in the order
/// the producer sends them.
fn plan(actions: usize, first_id: u64) -> Vec<(usize, Vec<u64>)> {
    let per_action = EXECUTIONS_PER_ROUND as usize / actions;
    let mut batches = Vec::new();
    let mut next = first_id;
    let mut sent = 0;
    while sent < per_action {
        let n = BATCH.min(per_action - sent);
        for a in 0..actions {
            batches.push((a, (next..next + n as u64).collect()));
            next += n as u64;
        }
        sent += n;
    }
    batches
}

// ---------------------------------------------------------------------------------------------
// The executor

struct ExecutorPipeline {
    exec: Arc<Executor>,
    actions: Arc<Vec<ActionRef>>,
    progress: Arc<Progress>,
    next_id: u64,
    payload: Payload,
}

impl ExecutorPipeline {
    async fn start(actions: usize) -> Self {
        let (dispatcher, mut rx) = ChannelDispatcher::new();
        let ports = Ports {
            dispatcher: Arc::new(dispatcher),
            sink: Arc::new(DiscardSink),
            observer: Arc::new(NoStats),
        };
        let settings = QueueSettings {
            max_queue_length: EXECUTIONS_PER_ROUND as usize,
            ..QueueSettings::default()
        };
        let policy = ActionPolicy {
            concurrency_limit: NonZeroU32::new(CONCURRENCY).expect("nonzero"),
            ..ActionPolicy::default()
        };
        let exec = Arc::new(
            Executor::start(settings, ports, Arc::new(UniformPolicy(policy)))
                .await
                .expect("the executor starts"),
        );
        let progress = Arc::new(Progress::default());
        let (worker_exec, worker_progress) = (exec.clone(), progress.clone());
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut dispatches = first;
                while dispatches.len() < WORKER_BATCH {
                    match rx.try_recv() {
                        Ok(more) => dispatches.extend(more),
                        Err(_) => break,
                    }
                }
                let completions: Vec<Completion> = dispatches
                    .into_iter()
                    .map(|d| Completion::new(d.execution_id, EndStatus::Succeeded))
                    .collect();
                let n = completions.len() as u64;
                worker_exec.complete(completions);
                worker_progress.add(n);
            }
        });
        Self {
            exec,
            actions: Arc::new(action_refs(actions)),
            progress,
            next_id: 1,
            payload: Payload::empty_object(),
        }
    }

    async fn round(&mut self) {
        let batches = plan(self.actions.len(), self.next_id);
        self.next_id += EXECUTIONS_PER_ROUND;
        let target = self.progress.done.load(Ordering::Acquire) + EXECUTIONS_PER_ROUND;
        let (exec, actions, payload) = (
            self.exec.clone(),
            self.actions.clone(),
            self.payload.clone(),
        );
        tokio::spawn(async move {
            for (a, ids) in batches {
                let subs = ids
                    .into_iter()
                    .map(|id| Submission::new(id, payload.clone()))
                    .collect();
                exec.submit(&actions[a], subs);
            }
        });
        self.progress.wait_for(target).await;
    }

    async fn stop(self) {
        self.exec.shutdown(Duration::from_secs(30)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The reference: bare tokio mpsc

enum RefMsg {
    Submit(Vec<(u64, Payload)>),
    Complete(Vec<u64>),
}

/// What the reference worker receives: the action's index, the id and the payload.
type RefDispatch = (usize, u64, Payload);

struct ReferencePipeline {
    actions: Arc<Vec<mpsc::UnboundedSender<RefMsg>>>,
    progress: Arc<Progress>,
    next_id: u64,
    payload: Payload,
}

impl ReferencePipeline {
    fn start(actions: usize) -> Self {
        let (work_tx, mut work_rx) = mpsc::unbounded_channel::<Vec<RefDispatch>>();
        let mut senders = Vec::with_capacity(actions);
        for index in 0..actions {
            let (tx, mut rx) = mpsc::unbounded_channel::<RefMsg>();
            senders.push(tx);
            let work_tx = work_tx.clone();
            tokio::spawn(async move {
                let mut waiting: VecDeque<(u64, Payload)> = VecDeque::new();
                let mut running: HashSet<u64> = HashSet::new();
                while let Some(msg) = rx.recv().await {
                    match msg {
                        RefMsg::Submit(subs) => waiting.extend(subs),
                        RefMsg::Complete(ids) => {
                            for id in ids {
                                running.remove(&id);
                            }
                        }
                    }
                    let mut out = Vec::new();
                    while running.len() < CONCURRENCY as usize {
                        let Some((id, payload)) = waiting.pop_front() else {
                            break;
                        };
                        running.insert(id);
                        out.push((index, id, payload));
                    }
                    if !out.is_empty() {
                        let _ = work_tx.send(out);
                    }
                }
            });
        }
        let actions = Arc::new(senders);
        let progress = Arc::new(Progress::default());
        let (worker_actions, worker_progress) = (actions.clone(), progress.clone());
        tokio::spawn(async move {
            let mut by_action: HashMap<usize, Vec<u64>> = HashMap::new();
            while let Some(first) = work_rx.recv().await {
                let mut dispatches = first;
                while dispatches.len() < WORKER_BATCH {
                    match work_rx.try_recv() {
                        Ok(more) => dispatches.extend(more),
                        Err(_) => break,
                    }
                }
                let n = dispatches.len() as u64;
                for (a, id, payload) in dispatches {
                    black_box(payload);
                    by_action.entry(a).or_default().push(id);
                }
                for (a, ids) in by_action.drain() {
                    let _ = worker_actions[a].send(RefMsg::Complete(ids));
                }
                worker_progress.add(n);
            }
        });
        Self {
            actions,
            progress,
            next_id: 1,
            payload: Payload::empty_object(),
        }
    }

    async fn round(&mut self) {
        let batches = plan(self.actions.len(), self.next_id);
        self.next_id += EXECUTIONS_PER_ROUND;
        let target = self.progress.done.load(Ordering::Acquire) + EXECUTIONS_PER_ROUND;
        let (actions, payload) = (self.actions.clone(), self.payload.clone());
        tokio::spawn(async move {
            for (a, ids) in batches {
                let subs = ids.into_iter().map(|id| (id, payload.clone())).collect();
                let _ = actions[a].send(RefMsg::Submit(subs));
            }
        });
        self.progress.wait_for(target).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Driver

/// What was measured for one (pipeline, actions): seconds per round of every call criterion
/// made (the last `SAMPLES` are the measured samples; warm-up comes first), and the CPU time
/// the whole process used over all rounds.
#[derive(Default)]
struct Record {
    per_round: Vec<f64>,
    rounds: u64,
    cpu: Duration,
}

type Samples = Mutex<HashMap<(&'static str, usize), Record>>;

fn record(
    samples: &Samples,
    key: (&'static str, usize),
    iters: u64,
    took: Duration,
    cpu: Duration,
) {
    let mut s = samples.lock().unwrap_or_else(|p| p.into_inner());
    let r = s.entry(key).or_default();
    r.per_round.push(took.as_secs_f64() / iters as f64);
    r.rounds += iters;
    r.cpu += cpu;
}

fn median_rate(samples: &Samples, key: (&'static str, usize)) -> Option<f64> {
    let s = samples.lock().unwrap_or_else(|p| p.into_inner());
    let all = &s.get(&key)?.per_round;
    let mut last: Vec<f64> = all[all.len().saturating_sub(SAMPLES)..].to_vec();
    last.sort_by(f64::total_cmp);
    let median = last.get(last.len() / 2)?;
    Some(EXECUTIONS_PER_ROUND as f64 / median)
}

/// CPU nanoseconds (all threads) per execution. Steadier than wall time when other work
/// shares the machine, so it is the figure to compare before and after a change.
fn cpu_per_execution(samples: &Samples, key: (&'static str, usize)) -> Option<f64> {
    let s = samples.lock().unwrap_or_else(|p| p.into_inner());
    let r = s.get(&key)?;
    (r.rounds > 0).then(|| r.cpu.as_nanos() as f64 / (r.rounds * EXECUTIONS_PER_ROUND) as f64)
}

/// User + system CPU time of this process so far, from /proc/self/stat (in clock ticks of
/// 10 ms, the fixed USER_HZ of /proc on Linux). Zero where that file does not exist.
fn process_cpu() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // The command name (field 2) may contain spaces; the fields after it are plain numbers.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    Duration::from_millis(ticks * 10)
}

fn cycle(c: &mut Criterion, samples: &Samples) {
    let rt = runtime();
    let mut group = c.benchmark_group("cycle");
    group.sample_size(SAMPLES);
    group.warm_up_time(Duration::from_secs(2));
    group.measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(EXECUTIONS_PER_ROUND));
    for actions in ACTION_COUNTS {
        let mut ours = rt.block_on(ExecutorPipeline::start(actions));
        group.bench_function(BenchmarkId::new("executor", actions), |b| {
            b.iter_custom(|iters| {
                let cpu_before = process_cpu();
                let took = rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        ours.round().await;
                    }
                    start.elapsed()
                });
                let cpu = process_cpu().saturating_sub(cpu_before);
                record(samples, ("executor", actions), iters, took, cpu);
                took
            })
        });
        rt.block_on(ours.stop());

        let mut reference = rt.block_on(async { ReferencePipeline::start(actions) });
        group.bench_function(BenchmarkId::new("mpsc_reference", actions), |b| {
            b.iter_custom(|iters| {
                let cpu_before = process_cpu();
                let took = rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        reference.round().await;
                    }
                    start.elapsed()
                });
                let cpu = process_cpu().saturating_sub(cpu_before);
                record(samples, ("mpsc_reference", actions), iters, took, cpu);
                took
            })
        });
        drop(reference);
    }
    group.finish();
}

/// Fixed work instead of criterion's timed loop, for profilers: with
/// `CORE_CYCLE_FIXED=<pipeline>:<actions>:<rounds>` (pipeline `executor` or `mpsc`), runs that
/// many rounds once and prints the time. E.g. under callgrind, whose instruction counts do not
/// depend on what else runs on the machine.
fn fixed_work(spec: &str) {
    let parts: Vec<&str> = spec.split(':').collect();
    let (Some(pipeline), Some(Ok(actions)), Some(Ok(rounds))) = (
        parts.first(),
        parts.get(1).map(|a| a.parse::<usize>()),
        parts.get(2).map(|r| r.parse::<u64>()),
    ) else {
        eprintln!("CORE_CYCLE_FIXED must look like executor:1000:3 or mpsc:1000:3");
        std::process::exit(2);
    };
    let rt = runtime();
    let start = Instant::now();
    match *pipeline {
        "mpsc" => rt.block_on(async {
            let mut p = ReferencePipeline::start(actions);
            for _ in 0..rounds {
                p.round().await;
            }
        }),
        _ => rt.block_on(async {
            let mut p = ExecutorPipeline::start(actions).await;
            for _ in 0..rounds {
                p.round().await;
            }
            p.stop().await;
        }),
    }
    let took = start.elapsed();
    let n = rounds * EXECUTIONS_PER_ROUND;
    println!(
        "{pipeline}, {actions} actions: {n} executions in {took:?} ({:.0}/s, including startup)",
        n as f64 / took.as_secs_f64()
    );
}

fn main() {
    if let Ok(spec) = std::env::var("CORE_CYCLE_FIXED") {
        fixed_work(&spec);
        return;
    }
    let samples = Samples::default();
    let mut c = Criterion::default().configure_from_args();
    cycle(&mut c, &samples);
    c.final_summary();
    println!();
    println!(
        "full cycle, {EXECUTIONS_PER_ROUND} executions per round, limit {CONCURRENCY}, batches of {BATCH}, 2 runtime workers (medians):"
    );
    println!(
        "{:>8}  {:>16}  {:>16}  {:>6}  {:>14}  {:>14}",
        "actions", "executor exec/s", "mpsc ref exec/s", "ratio", "executor ns/ex", "mpsc ns/ex"
    );
    for actions in ACTION_COUNTS {
        let ours = median_rate(&samples, ("executor", actions));
        let reference = median_rate(&samples, ("mpsc_reference", actions));
        if ours.is_none() && reference.is_none() {
            continue;
        }
        let show = |r: Option<f64>| r.map_or_else(|| "-".to_owned(), |r| format!("{r:.0}"));
        let ratio = match (ours, reference) {
            (Some(o), Some(r)) => format!("{:.2}", o / r),
            _ => "-".to_owned(),
        };
        println!(
            "{actions:>8}  {:>16}  {:>16}  {ratio:>6}  {:>14}  {:>14}",
            show(ours),
            show(reference),
            show(cpu_per_execution(&samples, ("executor", actions))),
            show(cpu_per_execution(&samples, ("mpsc_reference", actions))),
        );
    }
    println!("(ns/ex: CPU time of all threads per execution, over warm-up and samples)");
}
