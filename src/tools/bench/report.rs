//! What a bench run reports: a summary on standard output, a JSON file (`--report`) and an
//! SVG plot of throughput and latency over time (`--plot`), drawn by hand: two panels of
//! polylines need no plotting library.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::measure::{Bucket, Percentiles};

/// The whole report of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The command line, so a figure can be reproduced.
    pub command: String,
    /// When the run started (UTC, RFC 3339).
    pub started_at: String,
    pub machine: Machine,
    /// The workload and the settings that shape it.
    pub settings: BTreeMap<String, String>,
    /// The broker ceiling, when `--baseline broker`.
    pub baseline: Option<Phase>,
    /// The limited relay (the same hops held to the workload's limits), when `--baseline
    /// broker`.
    pub limited_baseline: Option<Phase>,
    /// The executor, unless only the baseline ran.
    pub executor: Option<Phase>,
    /// Executor throughput / broker ceiling, when both ran.
    pub ratio: Option<f64>,
    /// Executor throughput / limited relay's, when both ran.
    pub ratio_limited: Option<f64>,
    /// `--load`: the limited relay flat out, whose throughput set the rate both the limited
    /// relay and the executor were then driven at.
    pub peak: Option<Phase>,
    /// `--load`: the fraction of the peak they were driven at.
    pub load_fraction: Option<f64>,
    /// The executor's figures divided by the limited relay's, when both ran.
    pub versus_limited: Option<Comparison>,
    /// The faults injected and the audit, when `--chaos`.
    pub chaos: Option<super::chaos::ChaosReport>,
    /// The samples and their trends, when `--soak`.
    pub soak: Option<super::soak::SoakReport>,
    /// No violation, nothing missing, no phase timed out.
    pub ok: bool,
}

/// The executor's figures divided by the limited relay's from the same run (above 1: the
/// executor is higher, i.e. faster for throughput, slower for latencies). `None` where the
/// relay's figure is zero (no samples).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Comparison {
    pub throughput: Option<f64>,
    pub queue_wait_p50: Option<f64>,
    pub queue_wait_p99: Option<f64>,
    pub completion_to_dispatch_p50: Option<f64>,
    pub completion_to_dispatch_p99: Option<f64>,
    /// RSS growth over the phase (peak − start), each from its own start.
    pub rss_growth: Option<f64>,
}

impl Comparison {
    pub fn of(executor: &Phase, limited: &Phase) -> Self {
        let div = |a: f64, b: f64| (b > 0.0).then(|| a / b);
        let us = |a: u64, b: u64| div(a as f64, b as f64);
        let growth =
            |p: &Phase| Some(p.memory.rss_peak_kb?.saturating_sub(p.memory.rss_start_kb?) as f64);
        Self {
            throughput: div(executor.throughput, limited.throughput),
            queue_wait_p50: us(executor.queue_wait.p50_us, limited.queue_wait.p50_us),
            queue_wait_p99: us(executor.queue_wait.p99_us, limited.queue_wait.p99_us),
            completion_to_dispatch_p50: us(
                executor.completion_to_dispatch.p50_us,
                limited.completion_to_dispatch.p50_us,
            ),
            completion_to_dispatch_p99: us(
                executor.completion_to_dispatch.p99_us,
                limited.completion_to_dispatch.p99_us,
            ),
            rss_growth: match (growth(executor), growth(limited)) {
                (Some(e), Some(l)) => div(e, l),
                _ => None,
            },
        }
    }

    fn line(&self) -> String {
        let r = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
        format!(
            "throughput {}, queue wait p50 {} p99 {}, completion → next dispatch p50 {} p99 {}, \
             RSS growth {}",
            r(self.throughput),
            r(self.queue_wait_p50),
            r(self.queue_wait_p99),
            r(self.completion_to_dispatch_p50),
            r(self.completion_to_dispatch_p99),
            r(self.rss_growth)
        )
    }
}

/// Where the figures come from.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    /// 1-minute load average at the start and the end of the run.
    pub load_average_start: Option<f64>,
    pub load_average_end: Option<f64>,
}

/// One measured phase: the broker baseline or the executor.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    /// `broker` or `executor`.
    pub name: String,
    pub executions: u64,
    pub completed: u64,
    /// Completions reported as failed by the simulated workers.
    pub failed: u64,
    /// Dispatches with attempt > 1 seen (those of executions seen before not run again).
    pub resends: u64,
    /// Of `resends`, those of executions no earlier copy had reached.
    pub raised_unseen: u64,
    /// Copies of dispatches the broker delivered again (flagged redelivered).
    pub redelivered: u64,
    /// Dispatches of executions this run did not submit.
    pub foreign: u64,
    /// First submission → last completion.
    pub elapsed_s: f64,
    /// Executions completed per second over `elapsed_s`.
    pub throughput: f64,
    /// Request published → dispatch received by a worker.
    pub queue_wait: Percentiles,
    /// A worker publishes a completion while its action has executions waiting in the
    /// executor (accepted before the completion was sent, by the dispatch's `enqueued_at`) →
    /// the next dispatch of that action arrives.
    pub completion_to_dispatch: Percentiles,
    /// The same samples up to the dispatch's `dispatched_at` (the executor admitted the
    /// execution): the completion's way in and the executor's work on it.
    pub completion_to_admission: Percentiles,
    /// … and from `dispatched_at` until the worker received the dispatch: the rest of the
    /// actor's handler (the events handed to the ledger), any wait for a commit, publishing
    /// and the broker's hop. Percentiles of the parts do not add up to the whole's.
    pub admission_to_worker: Percentiles,
    pub cpu: Cpu,
    pub memory: Memory,
    pub timeline: Vec<Bucket>,
    /// The first violations in full (execution ids included).
    pub violations: Vec<String>,
    pub violations_total: u64,
    /// The phase did not finish within `--timeout`.
    pub timed_out: bool,
}

/// CPU time over the measured window (first submission to the last completion).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Cpu {
    /// What `executor_s` counts.
    pub counted: String,
    /// The executor's (or relay's) CPU seconds; `None` when it cannot be read.
    pub executor_s: Option<f64>,
    /// Everything else in this process: producers, workers, the verifier.
    pub load_generator_s: f64,
    /// Executor CPU per execution, in microseconds.
    pub executor_us_per_execution: Option<f64>,
    /// CPU seconds by thread name in this process.
    pub by_thread: BTreeMap<String, f64>,
}

/// Memory of the measured process.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Memory {
    /// What the figures are of.
    pub counted: String,
    pub rss_start_kb: Option<u64>,
    /// RSS when a fifth of the executions had completed (after warm-up).
    pub rss_after_warmup_kb: Option<u64>,
    pub rss_end_kb: Option<u64>,
    /// The highest RSS since `peak_since`.
    pub rss_peak_kb: Option<u64>,
    /// `phase start` (the kernel's peak was reset when the phase began, so a phase run after
    /// others in the same process is not charged their peak) or `process start` (it could
    /// not be reset).
    pub peak_since: String,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

impl Report {
    /// The summary printed at the end of a run.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "machine: {} cpus, load average {} → {}",
            self.machine.cpus,
            fmt_opt(self.machine.load_average_start),
            fmt_opt(self.machine.load_average_end)
        );
        let settings: Vec<String> = self
            .settings
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(out, "settings: {}", settings.join(" "));
        if let (Some(peak), Some(f)) = (&self.peak, self.load_fraction) {
            peak.summary(&mut out);
            let _ = writeln!(
                out,
                "load: the limited relay's peak {:.0}/s × {f} = {:.0}/s for the phases below",
                peak.throughput,
                peak.throughput * f
            );
        }
        for phase in self.phases() {
            phase.summary(&mut out);
        }
        match (self.ratio, &self.baseline, &self.executor) {
            (Some(r), Some(b), Some(e)) => {
                let _ = writeln!(
                    out,
                    "ratio: executor {:.0}/s ÷ broker ceiling {:.0}/s = {:.2}",
                    e.throughput, b.throughput, r
                );
            }
            _ => {
                let _ = writeln!(out, "ratio: no broker ceiling measured (--baseline broker)");
            }
        }
        if let (Some(r), Some(b), Some(e)) =
            (self.ratio_limited, &self.limited_baseline, &self.executor)
        {
            let _ = writeln!(
                out,
                "ratio to the limited relay (same hops, same limits, FIFO, nothing else): \
                 executor {:.0}/s ÷ {:.0}/s = {:.2}",
                e.throughput, b.throughput, r
            );
        }
        if let Some(c) = &self.versus_limited {
            let _ = writeln!(out, "executor ÷ limited relay: {}", c.line());
        }
        if let Some(c) = &self.chaos {
            c.summary(&mut out);
        }
        if let Some(s) = &self.soak {
            s.summary(&mut out);
        }
        let _ = writeln!(out, "{}", if self.ok { "OK" } else { "FAILED" });
        out
    }

    /// The phases measured at the workload's rate, in the order they ran.
    fn phases(&self) -> impl Iterator<Item = &Phase> {
        [&self.baseline, &self.limited_baseline, &self.executor]
            .into_iter()
            .flatten()
    }
}

impl super::chaos::ChaosReport {
    fn summary(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "[chaos] plan {} seed {}, {} instance(s): {} faults injected{}, executors started {} times; logs in {}",
            self.plan,
            self.seed,
            self.instances,
            self.faults.len(),
            if self.not_injected > 0 {
                format!(
                    " ({} NOT INJECTED: the run ended or stalled first)",
                    self.not_injected
                )
            } else {
                String::new()
            },
            self.executor_starts,
            self.dir
        );
        for f in &self.faults {
            let _ = writeln!(
                out,
                "[chaos]   {:>7.2}s {:<8} took {:>6.0} ms; dispatching paused {:>6.0} ms, back {:>6.0} ms after; {} re-sent, {} of them with no earlier copy{} ({})",
                f.at_s,
                f.fault.name(),
                f.took_ms,
                f.stalled_ms,
                f.resumed_after_ms,
                f.resent,
                f.resent_without_earlier_copy,
                if f.violations > 0 {
                    format!("; {} VIOLATIONS until the next fault", f.violations)
                } else {
                    String::new()
                },
                f.detail
            );
            if let Some(waiting) = f.partitions_waiting {
                let _ = writeln!(
                    out,
                    "[chaos]            failover: first dispatch on its partitions after {}; on all {waiting} with work waiting then after {}{}",
                    fmt_ms(f.failover_ms),
                    fmt_ms(f.all_partitions_back_ms),
                    if f.fault == super::chaos::FaultKind::Stop && self.instances > 1 {
                        if f.fenced.is_empty() {
                            "; nothing shows it was fenced".to_owned()
                        } else {
                            format!("; fenced: {}", f.fenced.join("; "))
                        }
                    } else {
                        String::new()
                    }
                );
            }
        }
        let fo = &self.failover;
        if !fo.each_ms.is_empty() || fo.never > 0 {
            let each: Vec<String> = fo.each_ms.iter().map(|m| format!("{m:.0}")).collect();
            let _ = writeln!(
                out,
                "[chaos] failover (ms): {}; p50 {}, max {}{}",
                each.join(", "),
                fmt_ms(fo.p50_ms),
                fmt_ms(fo.max_ms),
                if fo.never > 0 {
                    format!(
                        "; {} faults saw no dispatch on the partitions again",
                        fo.never
                    )
                } else {
                    String::new()
                }
            );
        }
        for e in &self.exits {
            let _ = writeln!(
                out,
                "[chaos] {} exited by itself ({}) in its life {}{}; started again",
                e.instance,
                e.status,
                e.life,
                if e.expected {
                    " as a fenced instance may"
                } else {
                    ""
                }
            );
        }
        let _ = writeln!(
            out,
            "[chaos] workers: {} completions reported again, {} copies redelivered by the broker",
            self.completions_reported_again, self.redelivered
        );
        if let Some(a) = &self.audit {
            let mut statuses: Vec<String> = a
                .ledger_statuses
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            statuses.sort();
            let _ = writeln!(
                out,
                "[chaos] ledger after {:.0} ms: {}; dead letters {}; left in the executor's queues {}",
                a.settled_after_ms,
                statuses.join(", "),
                a.dead_letters,
                a.left_in_queues
            );
        }
    }
}

impl Phase {
    fn summary(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "[{}] {}/{} completed ({} failed by the workers, {} re-sent dispatches ({} with no earlier copy), {} redelivered, {} foreign) in {:.2}s: {:.0} executions/s",
            self.name,
            self.completed,
            self.executions,
            self.failed,
            self.resends,
            self.raised_unseen,
            self.redelivered,
            self.foreign,
            self.elapsed_s,
            self.throughput
        );
        for (what, p) in [
            ("queue wait", &self.queue_wait),
            ("completion → next dispatch", &self.completion_to_dispatch),
            ("  … completion → admitted", &self.completion_to_admission),
            ("  … admitted → worker", &self.admission_to_worker),
        ] {
            if p.count == 0 && what.starts_with(' ') {
                continue;
            }
            let _ = writeln!(
                out,
                "[{}] {what} (ms, {} samples): p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
                self.name,
                p.count,
                ms(p.p50_us),
                ms(p.p90_us),
                ms(p.p99_us),
                ms(p.max_us)
            );
        }
        let _ = writeln!(
            out,
            "[{}] CPU: {} {} s ({} µs/execution); load generator {:.2} s",
            self.name,
            self.cpu.counted,
            fmt_opt(self.cpu.executor_s),
            fmt_opt(self.cpu.executor_us_per_execution),
            self.cpu.load_generator_s
        );
        let kb =
            |v: Option<u64>| v.map_or("?".to_owned(), |v| format!("{:.1} MB", v as f64 / 1024.0));
        let _ = writeln!(
            out,
            "[{}] RSS ({}): start {}, after warm-up {}, end {}, peak since {} {}",
            self.name,
            self.memory.counted,
            kb(self.memory.rss_start_kb),
            kb(self.memory.rss_after_warmup_kb),
            kb(self.memory.rss_end_kb),
            self.memory.peak_since,
            kb(self.memory.rss_peak_kb)
        );
        if let (Some(start), Some(peak)) = (self.memory.rss_start_kb, self.memory.rss_peak_kb)
            && self.memory.peak_since == "phase start"
        {
            let _ = writeln!(
                out,
                "[{}] RSS growth over the phase (peak − start): {}",
                self.name,
                kb(Some(peak.saturating_sub(start)))
            );
        }
        if self.timed_out {
            let _ = writeln!(out, "[{}] TIMED OUT", self.name);
        }
        if self.violations_total > 0 {
            let _ = writeln!(out, "[{}] {} VIOLATIONS:", self.name, self.violations_total);
            for v in &self.violations {
                let _ = writeln!(out, "[{}]   {v}", self.name);
            }
        }
    }
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or("-".to_owned(), |v| format!("{v:.0} ms"))
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or("?".to_owned(), |v| format!("{v:.2}"))
}

/// Plot size and margins, in SVG user units.
const WIDTH: f64 = 900.0;
const PANEL_HEIGHT: f64 = 220.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const GAP: f64 = 60.0;

/// A line of a panel: its legend, its colour and its (seconds, value) points.
pub type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

/// Two panels over time: throughput (executions/s) of every phase of the report, and
/// completion → next dispatch p50/p99 (ms) of the phases that keep limits. A soak's report
/// gets the soak's plot instead ([`super::soak::svg`]).
pub fn svg(report: &Report) -> String {
    if let Some(soak) = &report.soak {
        return super::soak::svg(report, soak);
    }
    let phases: Vec<&Phase> = report.phases().collect();
    let t_max = phases
        .iter()
        .flat_map(|p| p.timeline.last().map(|b| b.t_s + 1.0))
        .fold(1.0_f64, f64::max);
    let throughput: Vec<Series> = phases
        .iter()
        .map(|p| {
            let colour = match p.name.as_str() {
                "broker" => "#888888",
                "limited" => "#ff7f0e",
                _ => "#1f77b4",
            };
            let points = p.timeline.iter().map(|b| (b.t_s, b.throughput)).collect();
            (p.name.as_str(), colour, points)
        })
        .collect();
    let mut latency = Vec::new();
    for p in &phases {
        let (l50, l99, c50, c99) = match p.name.as_str() {
            "limited" => ("limited p50", "limited p99", "#ffbb78", "#ff7f0e"),
            _ => ("p50", "p99", "#2ca02c", "#d62728"),
        };
        let series = |f: fn(&Bucket) -> u64| -> Vec<(f64, f64)> {
            p.timeline
                .iter()
                .filter(|b| f(b) > 0)
                .map(|b| (b.t_s, ms(f(b))))
                .collect()
        };
        if p.name != "broker" {
            latency.push((l50, c50, series(|b| b.completion_to_dispatch_p50_us)));
            latency.push((l99, c99, series(|b| b.completion_to_dispatch_p99_us)));
        }
    }
    let title = format!(
        "fifo-executor bench: {}",
        report
            .settings
            .get("preset")
            .map(String::as_str)
            .unwrap_or("")
    );
    draw(
        &title,
        t_max,
        &[
            ("executions/s", throughput),
            ("completion → next dispatch, ms", latency),
        ],
        &figures(report),
    )
}

/// An SVG of `panels` (label and series each) one under the other over `t_max` seconds, and
/// the `rows` of text under them.
pub fn draw(title: &str, t_max: f64, panels: &[(&str, Vec<Series>)], rows: &[String]) -> String {
    let n = panels.len() as f64;
    let table_top = TOP + n * PANEL_HEIGHT + (n - 1.0).max(0.0) * GAP + 40.0;
    let height = table_top + ROW * (rows.len() as f64 + 1.0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="20" font-size="14">{}</text>"#,
        escape(title)
    );
    for (i, (label, series)) in panels.iter().enumerate() {
        let top = TOP + i as f64 * (PANEL_HEIGHT + GAP);
        panel(&mut out, top, label, t_max, series);
    }
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">seconds since the first request</text>"#,
        LEFT + (WIDTH - LEFT - RIGHT) / 2.0,
        table_top - 8.0
    );
    for (i, row) in rows.iter().enumerate() {
        let y = table_top + ROW * (i as f64 + 1.0);
        let _ = writeln!(
            out,
            r#"<text x="{LEFT}" y="{y}" font-family="monospace" font-size="11">{}</text>"#,
            escape(row)
        );
    }
    out.push_str("</svg>\n");
    out
}

/// Height of a line of the figures under the plot.
const ROW: f64 = 15.0;

/// Every figure of the summary that the panels do not show, one line each, for the plot.
fn figures(report: &Report) -> Vec<String> {
    let ms = |us: u64| us as f64 / 1000.0;
    let mb = |kb: Option<u64>| kb.map_or("?".to_owned(), |kb| format!("{:.1}", kb as f64 / 1024.0));
    let mut rows = vec![format!(
        "{:<9} {:>9} {:>20} {:>20} {:>8} {:>24}",
        "phase",
        "exec/s",
        "queue wait p50/p99",
        "compl→disp p50/p99",
        "µs/exec",
        "RSS MB start/end/peak"
    )];
    let peak = report.peak.iter().map(|p| (p, "peak"));
    for (p, label) in peak.chain(report.phases().map(|p| (p, p.name.as_str()))) {
        rows.push(format!(
            "{:<9} {:>9.0} {:>20} {:>20} {:>8} {:>24}",
            label,
            p.throughput,
            format!(
                "{:.1}/{:.1} ms",
                ms(p.queue_wait.p50_us),
                ms(p.queue_wait.p99_us)
            ),
            format!(
                "{:.1}/{:.1} ms",
                ms(p.completion_to_dispatch.p50_us),
                ms(p.completion_to_dispatch.p99_us)
            ),
            p.cpu
                .executor_us_per_execution
                .map_or("?".to_owned(), |u| format!("{u:.1}")),
            format!(
                "{}/{}/{}",
                mb(p.memory.rss_start_kb),
                mb(p.memory.rss_end_kb),
                mb(p.memory.rss_peak_kb)
            ),
        ));
    }
    if let Some(f) = report.load_fraction {
        rows.push(format!("load: {f} of the limited relay's peak"));
    }
    if let Some(r) = report.ratio {
        rows.push(format!("executor ÷ broker ceiling: throughput {r:.2}"));
    }
    if let Some(c) = &report.versus_limited {
        rows.push(format!("executor ÷ limited relay: {}", c.line()));
    }
    rows.push(if report.ok { "OK" } else { "FAILED" }.to_owned());
    rows
}

/// One panel: axes, a y scale from 0 to the largest value, and a polyline per series.
fn panel(out: &mut String, top: f64, label: &str, t_max: f64, series: &[Series]) {
    let w = WIDTH - LEFT - RIGHT;
    let h = PANEL_HEIGHT;
    let y_max = series
        .iter()
        .flat_map(|(_, _, pts)| pts.iter().map(|p| p.1))
        .fold(0.0_f64, f64::max)
        .max(1e-9)
        * 1.1;
    let _ = writeln!(
        out,
        r##"<rect x="{LEFT}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#333"/>"##
    );
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="{}">{}</text>"#,
        top - 6.0,
        escape(label)
    );
    for i in 0..=4 {
        let v = y_max * f64::from(i) / 4.0;
        let y = top + h - h * f64::from(i) / 4.0;
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + w,
            LEFT - 4.0,
            y + 4.0,
            short(v)
        );
        let t = t_max * f64::from(i) / 4.0;
        let x = LEFT + w * f64::from(i) / 4.0;
        let _ = writeln!(
            out,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{:.0}</text>"#,
            top + h + 14.0,
            t
        );
    }
    for (k, (name, colour, pts)) in series.iter().enumerate() {
        let points: Vec<String> = pts
            .iter()
            .map(|(t, v)| {
                format!(
                    "{:.1},{:.1}",
                    LEFT + w * (t / t_max),
                    top + h - h * (v / y_max)
                )
            })
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/>"#,
            points.join(" ")
        );
        let lx = LEFT + w - 120.0;
        let ly = top + 14.0 + 14.0 * k as f64;
        let _ = writeln!(
            out,
            r#"<line x1="{lx}" y1="{:.1}" x2="{}" y2="{:.1}" stroke="{colour}" stroke-width="2"/><text x="{}" y="{ly:.1}">{}</text>"#,
            ly - 4.0,
            lx + 20.0,
            ly - 4.0,
            lx + 26.0,
            escape(name)
        );
    }
}

fn short(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phase(name: &str) -> Phase {
        Phase {
            name: name.to_owned(),
            executions: 10,
            completed: 10,
            failed: 0,
            resends: 0,
            raised_unseen: 0,
            redelivered: 0,
            foreign: 0,
            elapsed_s: 2.0,
            throughput: 5.0,
            queue_wait: Percentiles::default(),
            completion_to_dispatch: Percentiles::default(),
            completion_to_admission: Percentiles::default(),
            admission_to_worker: Percentiles::default(),
            cpu: Cpu::default(),
            memory: Memory::default(),
            timeline: vec![Bucket {
                t_s: 0.0,
                throughput: 5.0,
                completion_to_dispatch_p50_us: 1000,
                completion_to_dispatch_p99_us: 3000,
                queue_wait_p50_us: 10,
                queue_wait_p99_us: 20,
                rss_kb: None,
            }],
            violations: Vec::new(),
            violations_total: 0,
            timed_out: false,
        }
    }

    #[test]
    fn the_plot_is_one_svg_with_a_line_per_series() {
        let report = Report {
            command: "bench".to_owned(),
            started_at: String::new(),
            machine: Machine {
                cpus: 2,
                load_average_start: None,
                load_average_end: None,
            },
            settings: BTreeMap::from([("preset".to_owned(), "a<b".to_owned())]),
            baseline: Some(phase("broker")),
            limited_baseline: Some(phase("limited")),
            executor: Some(phase("executor")),
            ratio: Some(1.0),
            ratio_limited: Some(1.0),
            peak: None,
            load_fraction: None,
            versus_limited: Some(Comparison::of(&phase("executor"), &phase("limited"))),
            chaos: None,
            soak: None,
            ok: true,
        };
        let svg = svg(&report);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // Throughput for each of the three phases, p50 and p99 for the two with limits.
        assert_eq!(svg.matches("<polyline").count(), 7);
        assert!(svg.contains("a&lt;b"));
        let summary = report.summary();
        assert!(summary.contains("ratio: executor 5/s"));
        assert!(summary.contains("ratio to the limited relay"));
        assert!(summary.contains("executor ÷ limited relay: throughput 1.00"));
        assert!(svg.contains("executor ÷ limited relay: throughput 1.00"));
    }
}
