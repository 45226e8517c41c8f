//! What a bench run measures besides the checks: latency histograms, a timeline in fixed
//! intervals, and CPU time and memory read from `/proc`.
//!
//! # Whose CPU
//!
//! An executor started in-process runs on a tokio runtime of its own whose threads are named
//! [`EXECUTOR_THREADS`] (the blocking pool too), and everything it spawns stays there; the
//! load generator (producers, simulated workers, the verifier) runs on the bench's own
//! runtime. lapin runs one I/O thread per connection, all named `lapin-io-loop`; those that
//! appear while the executor starts (before the load generator connects) are its own. The
//! executor's CPU time is the sum of `utime + stime` over its runtime's threads and its lapin
//! I/O threads, read from `/proc/self/task/*/stat` at the start and the end of the measured
//! window; every other thread counts as load generator. A connection the executor opens
//! later (a reconnect, the health check's DLQ reader) counts as load generator. The per-name breakdown goes
//! into the report so that a thread nobody expected (a library's own I/O thread) is visible.
//! For `--external`, `--executor-pid` reads the whole other process instead. RSS is the
//! process's (`VmRSS`), so in-process it includes the load generator.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Thread name of the runtime an in-process executor (or broker relay) runs on.
pub const EXECUTOR_THREADS: &str = "fx-exec";

/// Linux reports `/proc/*/stat` times in USER_HZ ticks, 100 per second on every architecture
/// Linux supports (it is part of the ABI, independent of the kernel's own HZ).
const TICKS_PER_SECOND: f64 = 100.0;

/// Longest latency a histogram holds: an hour, in microseconds.
const MAX_MICROS: u64 = 3_600_000_000;

/// A latency histogram in microseconds, with 2 or 3 significant figures.
pub fn latency_histogram(significant_figures: u8) -> Histogram<u64> {
    // Constant bounds and at most 5 significant figures are always accepted.
    Histogram::new_with_bounds(1, MAX_MICROS, significant_figures.min(5))
        .expect("constant histogram bounds are valid")
}

/// Records `d` in microseconds, clamped to the histogram's range.
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let micros = (d.as_micros() as u64).clamp(1, MAX_MICROS);
    h.saturating_record(micros);
}

/// Percentiles of a latency histogram, in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    /// Samples recorded.
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            max_us: h.max(),
            mean_us: h.mean(),
        }
    }
}

/// One interval of the timeline.
#[derive(Debug, Clone, Serialize)]
pub struct Bucket {
    /// Seconds from the first submission to the start of this interval.
    pub t_s: f64,
    /// Executions completed per second in this interval.
    pub throughput: f64,
    /// Completion → next dispatch in this interval.
    pub completion_to_dispatch_p50_us: u64,
    pub completion_to_dispatch_p99_us: u64,
    /// Queue wait of the executions dispatched in this interval.
    pub queue_wait_p50_us: u64,
    pub queue_wait_p99_us: u64,
    /// RSS of the measured process at the end of the interval, when sampled.
    pub rss_kb: Option<u64>,
}

/// Samples in fixed intervals from the start of a run.
#[derive(Debug)]
pub struct Timeline {
    interval: Duration,
    completions: Vec<u64>,
    c2d: Vec<Histogram<u64>>,
    wait: Vec<Histogram<u64>>,
    rss_kb: Vec<Option<u64>>,
}

impl Timeline {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval: interval.max(Duration::from_millis(10)),
            completions: Vec::new(),
            c2d: Vec::new(),
            wait: Vec::new(),
            rss_kb: Vec::new(),
        }
    }

    fn index(&mut self, since_start: Duration) -> usize {
        let i = (since_start.as_nanos() / self.interval.as_nanos()) as usize;
        while self.completions.len() <= i {
            self.completions.push(0);
            self.c2d.push(latency_histogram(2));
            self.wait.push(latency_histogram(2));
            self.rss_kb.push(None);
        }
        i
    }

    pub fn completion(&mut self, since_start: Duration) {
        let i = self.index(since_start);
        self.completions[i] += 1;
    }

    pub fn dispatch(&mut self, since_start: Duration, wait: Duration, c2d: Option<Duration>) {
        let i = self.index(since_start);
        record(&mut self.wait[i], wait);
        if let Some(c2d) = c2d {
            record(&mut self.c2d[i], c2d);
        }
    }

    pub fn rss(&mut self, since_start: Duration, kb: u64) {
        let i = self.index(since_start);
        self.rss_kb[i] = Some(kb);
    }

    /// The intervals, the last one scaled to the part of it that elapsed by `end`.
    pub fn buckets(&self, end: Duration) -> Vec<Bucket> {
        let step = self.interval.as_secs_f64();
        (0..self.completions.len())
            .map(|i| {
                let t = i as f64 * step;
                let width = (end.as_secs_f64() - t).clamp(step / 100.0, step);
                let c2d = Percentiles::of(&self.c2d[i]);
                let wait = Percentiles::of(&self.wait[i]);
                Bucket {
                    t_s: t,
                    throughput: self.completions[i] as f64 / width,
                    completion_to_dispatch_p50_us: c2d.p50_us,
                    completion_to_dispatch_p99_us: c2d.p99_us,
                    queue_wait_p50_us: wait.p50_us,
                    queue_wait_p99_us: wait.p99_us,
                    rss_kb: self.rss_kb[i],
                }
            })
            .collect()
    }
}

/// CPU seconds by thread name (digits dropped, so a pool's threads add up under one name).
pub type CpuByThread = BTreeMap<String, f64>;

/// Name of the I/O thread lapin starts for each connection.
pub const LAPIN_IO_THREAD: &str = "lapin-io-loop";

/// What the executor's (or relay's) own lapin I/O threads are reported as: under the
/// executor's prefix, so they count as its CPU.
pub const EXECUTOR_IO_THREADS: &str = "fx-exec/lapin-io-loop";

/// One thread of this process and the CPU it has used so far.
#[derive(Debug, Clone)]
pub struct ThreadCpu {
    pub tid: u32,
    pub name: String,
    pub seconds: f64,
}

/// This process's threads now.
pub fn threads() -> Vec<ThreadCpu> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| {
            let tid = task.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
            let (name, seconds) = parse_stat(&stat)?;
            Some(ThreadCpu { tid, name, seconds })
        })
        .collect()
}

/// Ids of this process's lapin I/O threads now.
pub fn lapin_io_threads() -> HashSet<u32> {
    threads()
        .into_iter()
        .filter(|t| t.name == LAPIN_IO_THREAD)
        .map(|t| t.tid)
        .collect()
}

/// CPU seconds by thread name; the lapin I/O threads in `executor_io` are named
/// [`EXECUTOR_IO_THREADS`].
pub fn by_name(threads: &[ThreadCpu], executor_io: &HashSet<u32>) -> CpuByThread {
    let mut by_name = CpuByThread::new();
    for t in threads {
        let name = if executor_io.contains(&t.tid) {
            EXECUTOR_IO_THREADS.to_owned()
        } else {
            t.name.chars().filter(|c| !c.is_ascii_digit()).collect()
        };
        *by_name.entry(name).or_default() += t.seconds;
    }
    by_name
}

/// CPU seconds of the threads counted as the executor's: its runtime and its lapin I/O.
pub fn executor_seconds(by_name: &CpuByThread) -> f64 {
    by_name
        .iter()
        .filter(|(n, _)| n.starts_with(EXECUTOR_THREADS))
        .map(|(_, s)| s)
        .sum()
}

/// CPU seconds spent so far by process `pid` (all its threads, including those that ended).
pub fn process_cpu(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat).map(|(_, s)| s)
}

/// `(comm, utime + stime in seconds)` from a `stat` line. The command name is in parentheses
/// and may itself hold spaces and parentheses, so the fields are counted from the last `)`.
fn parse_stat(stat: &str) -> Option<(String, f64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?.to_owned();
    let fields: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    // After the name: state is field 3, utime field 14 and stime field 15 (1-based).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((name, (utime + stime) as f64 / TICKS_PER_SECOND))
}

/// Resets the kernel's peak RSS (`VmHWM`) of process `pid` (`None`: this process) to its
/// current RSS, so that a peak read later is the peak since now (Linux 4.0 and later: "5" to
/// `/proc/<pid>/clear_refs`). Whether it could.
pub fn reset_peak_rss(pid: Option<u32>) -> bool {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/clear_refs"),
        None => "/proc/self/clear_refs".to_owned(),
    };
    std::fs::write(path, b"5").is_ok()
}

/// `VmRSS` and `VmHWM` (peak) in kB of process `pid` (`None`: this process).
pub fn rss_kb(pid: Option<u32>) -> Option<(u64, u64)> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_owned(),
    };
    let status = std::fs::read_to_string(path).ok()?;
    let field = |key: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// The 1-minute load average, for the record of how busy the machine was.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Subtracts `before` from `after`, name by name.
pub fn cpu_delta(before: &CpuByThread, after: &CpuByThread) -> CpuByThread {
    after
        .iter()
        .map(|(name, s)| {
            (
                name.clone(),
                (s - before.get(name).copied().unwrap_or(0.0)).max(0.0),
            )
        })
        .filter(|(_, s)| *s > 0.0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_gives_its_name_and_cpu_seconds() {
        let line = "4242 (fx-exec (1)) S 1 2 3 4 5 6 7 8 9 10 250 150 0 0 20 0 1 0";
        assert_eq!(parse_stat(line), Some(("fx-exec (1)".to_owned(), 4.0)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn the_peak_rss_resets_to_the_current_rss() {
        // Grow, reset, and the peak is back near the current RSS, far below the grown one.
        let grown: Vec<u8> = vec![1; 64 << 20];
        std::hint::black_box(&grown);
        drop(grown);
        if !reset_peak_rss(None) {
            return; // an older kernel: the report then says the peak is the process's
        }
        let (rss, peak) = rss_kb(None).expect("this process's status");
        assert!(peak < rss + 32 * 1024, "peak {peak} kB, rss {rss} kB");
    }

    #[test]
    fn this_process_has_threads_with_cpu_and_an_rss() {
        assert!(!threads().is_empty());
        assert!(rss_kb(None).is_some_and(|(rss, peak)| rss > 0 && peak >= rss));
    }

    #[test]
    fn percentiles_come_from_the_histogram() {
        let mut h = latency_histogram(3);
        for ms in 1..=100 {
            record(&mut h, Duration::from_millis(ms));
        }
        let p = Percentiles::of(&h);
        assert_eq!(p.count, 100);
        assert!((49_000..=51_000).contains(&p.p50_us), "{p:?}");
        assert!((99_000..=100_100).contains(&p.max_us), "{p:?}");
    }
}
