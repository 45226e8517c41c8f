//! The full cycle through the actors: submit → dispatch → complete, for 1 to 10,000 actions,
//! next to two references: a bare tokio-mpsc pipeline of the same three hops (group `cycle`),
//! and the design many executors use (group `versus_mutex`): one `tokio::sync::Mutex` around a
//! `VecDeque` per action in a `DashMap`, with one task per waiting execution parked on its own
//! `Notify` until a completion pops it.
//!
//! Run: `cargo bench --bench core_cycle` (or `-- versus_mutex` for the second group only). Each round pushes `EXECUTIONS_PER_ROUND` executions
//! through; criterion reports the time per round and executions/s, and at the end this binary
//! prints the median executions/s of both pipelines and their ratio per action count.
//!
//! The driver, for both pipelines, on a multi-thread tokio runtime with 2 workers:
//! - a producer task submits, round-robin over the actions, batches of up to `BATCH`
//!   executions per action (the executor's API takes one `Vec<Submission>` per action);
//! - a worker task receives dispatch batches, takes whatever else has already arrived (up to
//!   `WORKER_BATCH`), and reports them complete in one call.
//!
//! The mpsc reference keeps the bare minimum of the same bookkeeping per action: one task
//! owning a FIFO `VecDeque`, the set of running ids and a limit, fed by an unbounded mpsc
//! channel. It has no live index (its worker knows each dispatch's action), no events, no
//! counters, no clock and no actor framework.
//!
//! The mutex reference, per execution: the submitter locks the action's queue (creating it in
//! the `DashMap` on first use); with a slot free and nobody waiting it takes the slot and
//! dispatches at once, otherwise it parks a new `Notify` at the tail and spawns a task that
//! waits on it and dispatches when woken. The completer ends each dispatch at once: it locks
//! the action's queue and pops the head, handing it the slot (`notify_one`), or frees the
//! slot. Enqueueing in the submitter, in submission order, is what keeps it FIFO: a task per
//! execution that locked the queue itself would race the others to the lock.
//!
//! Both sides of `versus_mutex` check FIFO as they go: per action, every admission (the
//! executor's dispatch as its worker receives it; the reference's slot hand-over, under the
//! lock) must carry a higher id than the one before. A violation fails the bench.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use dashmap::DashMap;
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
fn plan(actions: usize, first_id: u64, batch: usize) -> Vec<(usize, Vec<u64>)> {
    let per_action = EXECUTIONS_PER_ROUND as usize / actions;
    let mut batches = Vec::new();
    let mut next = first_id;
    let mut sent = 0;
    while sent < per_action {
        let n = batch.max(1).min(per_action - sent);
        for a in 0..actions {
            batches.push((a, (next..next + n as u64).collect()));
            next += n as u64;
        }
        sent += n;
    }
    batches
}

/// FIFO violations seen by either side of `versus_mutex`; any fails the bench.
static FIFO_VIOLATIONS: AtomicU64 = AtomicU64::new(0);

/// Per action, the last id admitted: each admission must carry a higher one.
#[derive(Default)]
struct FifoCheck {
    last: HashMap<Box<str>, u64>,
}

impl FifoCheck {
    fn admitted(&mut self, action: &str, id: u64) {
        match self.last.get_mut(action) {
            Some(last) => {
                if id <= *last {
                    FIFO_VIOLATIONS.fetch_add(1, Ordering::Relaxed);
                }
                *last = id;
            }
            None => {
                self.last.insert(action.into(), id);
            }
        }
    }
}

fn assert_fifo() {
    let seen = FIFO_VIOLATIONS.load(Ordering::Relaxed);
    assert_eq!(seen, 0, "{seen} admissions out of FIFO order");
}

// ---------------------------------------------------------------------------------------------
// The executor

struct ExecutorPipeline {
    exec: Arc<Executor>,
    actions: Arc<Vec<ActionRef>>,
    progress: Arc<Progress>,
    next_id: u64,
    payload: Payload,
    batch: usize,
}

impl ExecutorPipeline {
    /// `limit` per action; the producer submits `batch` executions per call.
    async fn start(actions: usize, limit: u32, batch: usize) -> Self {
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
            concurrency_limit: NonZeroU32::new(limit).expect("nonzero"),
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
            let mut order = FifoCheck::default();
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
                    .map(|d| {
                        order.admitted(d.action.as_str(), d.execution_id);
                        Completion::new(d.execution_id, EndStatus::Succeeded)
                    })
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
            batch,
        }
    }

    async fn round(&mut self) {
        let batches = plan(self.actions.len(), self.next_id, self.batch);
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
        assert_fifo();
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
        let batches = plan(self.actions.len(), self.next_id, BATCH);
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
// The reference: a Mutex<VecDeque> per action, a task per waiting execution on its own Notify

/// One action's queue in the mutex reference.
#[derive(Default)]
struct MutexQueue {
    running: usize,
    waiting: VecDeque<(u64, Arc<Notify>)>,
    /// The last id given a slot, for the FIFO check.
    last_admitted: u64,
}

impl MutexQueue {
    fn admit(&mut self, id: u64) {
        if id <= self.last_admitted {
            FIFO_VIOLATIONS.fetch_add(1, Ordering::Relaxed);
        }
        self.last_admitted = id;
    }
}

type MutexQueues = DashMap<usize, Arc<tokio::sync::Mutex<MutexQueue>>>;

struct MutexPipeline {
    queues: Arc<MutexQueues>,
    dispatch: mpsc::UnboundedSender<RefDispatch>,
    actions: usize,
    limit: usize,
    batch: usize,
    progress: Arc<Progress>,
    next_id: u64,
    payload: Payload,
}

impl MutexPipeline {
    fn start(actions: usize, limit: u32, batch: usize) -> Self {
        let queues: Arc<MutexQueues> = Arc::new(DashMap::new());
        let (dispatch, mut rx) = mpsc::unbounded_channel::<RefDispatch>();
        let progress = Arc::new(Progress::default());
        let (completer_queues, completer_progress) = (queues.clone(), progress.clone());
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(WORKER_BATCH);
            while rx.recv_many(&mut batch, WORKER_BATCH).await > 0 {
                let n = batch.len() as u64;
                for (a, _, payload) in batch.drain(..) {
                    black_box(payload);
                    let Some(q) = completer_queues.get(&a).map(|q| q.clone()) else {
                        continue;
                    };
                    let mut q = q.lock().await;
                    match q.waiting.pop_front() {
                        Some((next, woken)) => {
                            q.admit(next);
                            woken.notify_one();
                        }
                        None => q.running -= 1,
                    }
                }
                completer_progress.add(n);
            }
        });
        Self {
            queues,
            dispatch,
            actions,
            limit: limit as usize,
            batch,
            progress,
            next_id: 1,
            payload: Payload::empty_object(),
        }
    }

    async fn round(&mut self) {
        let batches = plan(self.actions, self.next_id, self.batch);
        self.next_id += EXECUTIONS_PER_ROUND;
        let target = self.progress.done.load(Ordering::Acquire) + EXECUTIONS_PER_ROUND;
        let (queues, dispatch, payload, limit) = (
            self.queues.clone(),
            self.dispatch.clone(),
            self.payload.clone(),
            self.limit,
        );
        tokio::spawn(async move {
            for (a, ids) in batches {
                let q = queues.entry(a).or_default().clone();
                for id in ids {
                    let payload = payload.clone();
                    let mut g = q.lock().await;
                    if g.running < limit && g.waiting.is_empty() {
                        g.running += 1;
                        g.admit(id);
                        drop(g);
                        let _ = dispatch.send((a, id, payload));
                    } else {
                        let woken = Arc::new(Notify::new());
                        g.waiting.push_back((id, woken.clone()));
                        drop(g);
                        let dispatch = dispatch.clone();
                        tokio::spawn(async move {
                            woken.notified().await;
                            let _ = dispatch.send((a, id, payload));
                        });
                    }
                }
            }
        });
        self.progress.wait_for(target).await;
        assert_fifo();
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

/// One summary row, formatted: our median rate, the reference's, their ratio and both CPU
/// times per execution; `None` when neither side ran.
fn comparison(
    samples: &Samples,
    ours: (&'static str, usize),
    reference: (&'static str, usize),
) -> Option<[String; 5]> {
    let (o, r) = (median_rate(samples, ours), median_rate(samples, reference));
    if o.is_none() && r.is_none() {
        return None;
    }
    let show = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"));
    let ratio = match (o, r) {
        (Some(o), Some(r)) => format!("{:.2}", o / r),
        _ => "-".to_owned(),
    };
    Some([
        show(o),
        show(r),
        ratio,
        show(cpu_per_execution(samples, ours)),
        show(cpu_per_execution(samples, reference)),
    ])
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
        let mut ours = rt.block_on(ExecutorPipeline::start(actions, CONCURRENCY, BATCH));
        measure(
            &mut group,
            &rt,
            samples,
            (BenchmarkId::new("executor", actions), ("executor", actions)),
            &mut ours,
        );
        rt.block_on(ours.stop());
        let mut reference = rt.block_on(async { ReferencePipeline::start(actions) });
        measure(
            &mut group,
            &rt,
            samples,
            (
                BenchmarkId::new("mpsc_reference", actions),
                ("mpsc_reference", actions),
            ),
            &mut reference,
        );
    }
    group.finish();
}

/// One workload of `versus_mutex`: 100,000 executions spread evenly over `actions`, each
/// action at `limit`, submitted `batch` per call.
struct Scenario {
    actions: usize,
    limit: u32,
    batch: usize,
}

impl Scenario {
    fn label(&self) -> String {
        format!(
            "{}x{}@{}/b{}",
            self.actions,
            EXECUTIONS_PER_ROUND as usize / self.actions,
            self.limit,
            self.batch
        )
    }
}

/// The workloads issue 17 names: 1,000 × 100 at limit 5 (submitted one or 100 at a time),
/// one action × 100,000 at limit 1, 10,000 × 10 at limit 5.
const SCENARIOS: [Scenario; 5] = [
    Scenario {
        actions: 1_000,
        limit: 5,
        batch: 100,
    },
    Scenario {
        actions: 1_000,
        limit: 5,
        batch: 1,
    },
    Scenario {
        actions: 1,
        limit: 1,
        batch: 100,
    },
    Scenario {
        actions: 1,
        limit: 1,
        batch: 1,
    },
    Scenario {
        actions: 10_000,
        limit: 5,
        batch: 10,
    },
];

/// A pipeline the driver can push rounds through.
trait Pipeline {
    /// Pushes `EXECUTIONS_PER_ROUND` executions through and waits until all completed.
    async fn round(&mut self);
}

impl Pipeline for ExecutorPipeline {
    async fn round(&mut self) {
        ExecutorPipeline::round(self).await
    }
}

impl Pipeline for ReferencePipeline {
    async fn round(&mut self) {
        ReferencePipeline::round(self).await
    }
}

impl Pipeline for MutexPipeline {
    async fn round(&mut self) {
        MutexPipeline::round(self).await
    }
}

/// Runs rounds of `pipeline` under criterion's timing and records them under `key`.
fn measure(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &tokio::runtime::Runtime,
    samples: &Samples,
    (id, key): (BenchmarkId, (&'static str, usize)),
    pipeline: &mut impl Pipeline,
) {
    group.bench_function(id, |b| {
        b.iter_custom(|iters| {
            let cpu_before = process_cpu();
            let took = rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    pipeline.round().await;
                }
                start.elapsed()
            });
            let cpu = process_cpu().saturating_sub(cpu_before);
            record(samples, key, iters, took, cpu);
            took
        })
    });
}

fn versus_mutex(c: &mut Criterion, samples: &Samples) {
    let rt = runtime();
    let mut group = c.benchmark_group("versus_mutex");
    group.sample_size(SAMPLES);
    group.warm_up_time(Duration::from_secs(2));
    group.measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(EXECUTIONS_PER_ROUND));
    for (i, sc) in SCENARIOS.iter().enumerate() {
        let mut ours = rt.block_on(ExecutorPipeline::start(sc.actions, sc.limit, sc.batch));
        measure(
            &mut group,
            &rt,
            samples,
            (BenchmarkId::new("executor", sc.label()), ("vs_executor", i)),
            &mut ours,
        );
        rt.block_on(ours.stop());
        let mut reference =
            rt.block_on(async { MutexPipeline::start(sc.actions, sc.limit, sc.batch) });
        measure(
            &mut group,
            &rt,
            samples,
            (
                BenchmarkId::new("mutex_reference", sc.label()),
                ("vs_mutex", i),
            ),
            &mut reference,
        );
    }
    group.finish();
}

/// Fixed work instead of criterion's timed loop, for profilers: with
/// `CORE_CYCLE_FIXED=<pipeline>:<actions>:<rounds>[:<limit>:<batch>]` (pipeline `executor`,
/// `mpsc` or `mutex`), runs that
/// many rounds once and prints the time. E.g. under callgrind, whose instruction counts do not
/// depend on what else runs on the machine.
fn fixed_work(spec: &str) {
    let parts: Vec<&str> = spec.split(':').collect();
    let number = |i: usize, default: usize| -> Option<usize> {
        parts.get(i).map_or(Some(default), |p| p.parse().ok())
    };
    let (Some(pipeline), Some(actions), Some(rounds), Some(limit), Some(batch)) = (
        parts.first(),
        number(1, 1_000),
        number(2, 3),
        number(3, CONCURRENCY as usize),
        number(4, BATCH),
    ) else {
        eprintln!(
            "CORE_CYCLE_FIXED must look like <pipeline>:<actions>:<rounds>[:<limit>:<batch>], \
             pipeline executor, mpsc or mutex (e.g. executor:1000:3 or mutex:10000:3:5:10)"
        );
        std::process::exit(2);
    };
    let limit = u32::try_from(limit.max(1)).unwrap_or(u32::MAX);
    let rt = runtime();
    let start = Instant::now();
    match *pipeline {
        "mpsc" => rt.block_on(async {
            let mut p = ReferencePipeline::start(actions);
            for _ in 0..rounds {
                p.round().await;
            }
        }),
        "mutex" => rt.block_on(async {
            let mut p = MutexPipeline::start(actions, limit, batch);
            for _ in 0..rounds {
                p.round().await;
            }
        }),
        _ => rt.block_on(async {
            let mut p = ExecutorPipeline::start(actions, limit, batch).await;
            for _ in 0..rounds {
                p.round().await;
            }
            p.stop().await;
        }),
    }
    let took = start.elapsed();
    let n = rounds as u64 * EXECUTIONS_PER_ROUND;
    println!(
        "{pipeline}, {actions} actions at limit {limit}, {batch} per call: {n} executions in \
         {took:?} ({:.0}/s, including startup)",
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
    versus_mutex(&mut c, &samples);
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
        let Some([ours, reference, ratio, ours_cpu, ref_cpu]) =
            comparison(&samples, ("executor", actions), ("mpsc_reference", actions))
        else {
            continue;
        };
        println!(
            "{actions:>8}  {ours:>16}  {reference:>16}  {ratio:>6}  {ours_cpu:>14}  {ref_cpu:>14}"
        );
    }
    println!("(ns/ex: CPU time of all threads per execution, over warm-up and samples)");
    println!();
    println!(
        "against a Mutex<VecDeque> per action in a DashMap, a task per waiting execution on its own Notify (medians):"
    );
    println!(
        "{:>18}  {:>16}  {:>16}  {:>6}  {:>14}  {:>14}",
        "workload", "executor exec/s", "mutex ref exec/s", "ratio", "executor ns/ex", "mutex ns/ex"
    );
    for (i, sc) in SCENARIOS.iter().enumerate() {
        let Some([ours, reference, ratio, ours_cpu, ref_cpu]) =
            comparison(&samples, ("vs_executor", i), ("vs_mutex", i))
        else {
            continue;
        };
        println!(
            "{:>18}  {ours:>16}  {reference:>16}  {ratio:>6}  {ours_cpu:>14}  {ref_cpu:>14}",
            sc.label(),
        );
    }
    println!(
        "(workload: actions x executions each @ limit / submitted per call; 2 runtime workers)"
    );
}
