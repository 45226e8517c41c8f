//! The `fifo-executor serve` processes of a run with child processes (`--chaos`,
//! `--instances N`, `--kill-every D`): N of them on one vhost and one database, each with its
//! own HTTP port and `cluster.instance_id` (`bench-0`, `bench-1`, …), and in
//! `cluster.mode: shared` when there are several.
//!
//! What a fault needs from them is here: which instance is the busiest (it owns the most
//! partitions by `GET /api/v1/cluster`, asked of any live instance), which partitions it
//! owned just before the fault, and the failover time that follows: from the fault to the
//! first dispatch the workers receive, admitted after the fault (its `dispatched_at`), of an
//! action of one of those partitions; and until every one of them that had work waiting at
//! the fault had had such a dispatch. A fault counts in the failover figures when there was
//! work on its partitions (waiting then, or dispatched after). A supervisor starts again any instance that exits
//! by itself; an exit with status 3 (fenced) of an instance that was SIGSTOPped in that life
//! is expected of an instance in shared mode and is not a failure.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::{Mutex, watch};

use super::chaos::ServeProcess;
use super::load::Arrived;
use crate::cluster::Partition;
use crate::http::client::Client;

/// The exit status of a fenced instance (`app::FENCED_EXIT_STATUS`).
const FENCED_EXIT: i32 = crate::app::FENCED_EXIT_STATUS as i32;

/// How often the supervisor looks for instances that exited.
const SUPERVISE_EVERY: Duration = Duration::from_millis(250);

/// How long one question to an instance's HTTP API may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(2);

/// One `serve` process of the run.
pub struct Instance {
    /// `cluster.instance_id`.
    pub id: String,
    /// Its `api.listen`.
    pub api: SocketAddr,
    pub process: Mutex<ServeProcess>,
    /// Its live process id (0 while none runs), readable without the lock.
    pub pid: Arc<AtomicU32>,
    /// SIGSTOPped now.
    paused: AtomicBool,
}

impl Instance {
    pub fn new(id: String, api: SocketAddr, process: ServeProcess) -> Self {
        Self {
            pid: process.pid_cell(),
            id,
            api,
            process: Mutex::new(process),
            paused: AtomicBool::new(false),
        }
    }

    fn client(&self) -> Client {
        Client::for_listen_address(self.api).with_timeout(HTTP_TIMEOUT)
    }

    /// Whether a process runs and is not stopped.
    pub fn live(&self) -> bool {
        self.pid.load(Ordering::Acquire) != 0 && !self.paused.load(Ordering::Acquire)
    }

    /// SIGSTOP (`pause`) or SIGCONT its process.
    pub async fn pause(&self, pause: bool) -> Result<(), String> {
        let mut p = self.process.lock().await;
        p.signal(if pause { "STOP" } else { "CONT" }).await?;
        if pause {
            p.mark_stopped();
        }
        self.paused.store(pause, Ordering::Release);
        Ok(())
    }

    /// Whether it is SIGSTOPped now.
    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// Waits until its HTTP API answers `GET /api/v1/cluster`.
    pub async fn wait_until_up(&self, deadline: Duration) -> Result<(), String> {
        let start = Instant::now();
        loop {
            match self.client().request("GET", CLUSTER_PATH, None).await {
                Ok(r) if r.status == 200 => return Ok(()),
                Ok(r) if start.elapsed() >= deadline => {
                    return Err(format!("{} answers HTTP {}", self.id, r.status));
                }
                Err(e) if start.elapsed() >= deadline => return Err(format!("{}: {e}", self.id)),
                _ => {}
            }
            {
                let mut p = self.process.lock().await;
                if let Some(status) = p.exited() {
                    let tail = p.log_path().map(|l| log_tail(&l)).unwrap_or_default();
                    return Err(format!(
                        "{} exited at its start ({status}): {tail}",
                        self.id
                    ));
                }
            }
            if self.pid.load(Ordering::Acquire) == 0 {
                return Err(format!("{} is not running", self.id));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `attune_fenced_writes_total` from its `/metrics`, if it answers.
    pub async fn fenced_writes(&self) -> Option<f64> {
        let r = self.client().request("GET", "/metrics", None).await.ok()?;
        (r.status == 200)
            .then(|| metric(&String::from_utf8_lossy(&r.body), FENCED_METRIC))
            .flatten()
    }
}

const CLUSTER_PATH: &str = "/api/v1/cluster";
const FENCED_METRIC: &str = "attune_fenced_writes_total";

/// The sum of the samples of `name` (any labels) in Prometheus text, if it has any.
fn metric(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        if let Some(v) = rest
            .rsplit(' ')
            .next()
            .and_then(|v| v.trim().parse::<f64>().ok())
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// The owner of each partition, from a `GET /api/v1/cluster` body.
fn owners(body: &[u8]) -> Option<Vec<(Partition, String)>> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let rows = v["data"]["partitions"].as_array()?;
    rows.iter()
        .map(|r| {
            let p = Partition::try_from(r["partition"].as_u64()?).ok()?;
            Some((p, r["owner"].as_str()?.to_owned()))
        })
        .collect()
}

/// [`Instances::busiest`] among the `live` instances (indexes into `ids`, not empty), by the
/// partitions' `owners` when they are known.
fn busiest_of(
    live: &[usize],
    ids: &[&str],
    owners: Option<&[(Partition, String)]>,
    partitions: u16,
    pick: u64,
) -> Victim {
    let owned_by = |i: usize| -> Option<Vec<Partition>> {
        owners.map(|o| {
            o.iter()
                .filter(|(_, owner)| *owner == ids[i])
                .map(|(p, _)| *p)
                .collect()
        })
    };
    let best = live
        .iter()
        .copied()
        .max_by_key(|&i| (owned_by(i).map_or(0, |o| o.len()), std::cmp::Reverse(i)));
    if let Some(i) = best
        && let Some(owned) = owned_by(i).filter(|o| !o.is_empty())
    {
        return Victim {
            index: i,
            owned: Some(owned),
        };
    }
    let index = live[(pick % live.len().max(1) as u64) as usize];
    let owned = if ids.len() == 1 {
        Some((0..partitions).collect())
    } else {
        owned_by(index)
    };
    Victim { index, owned }
}

/// An instance's exit that the supervisor saw (and started it again after).
#[derive(Debug, Clone, Serialize)]
pub struct Exit {
    pub instance: String,
    /// The life that exited (1 for the first start).
    pub life: usize,
    pub status: String,
    /// Status 3 (fenced) after being SIGSTOPped in that life: what an instance in shared mode
    /// is expected to do.
    pub expected: bool,
    #[serde(skip)]
    pub at: Option<Instant>,
}

/// The instances of the run.
pub struct Instances {
    pub all: Vec<Arc<Instance>>,
    /// `cluster.partitions`.
    pub partitions: u16,
    exits: std::sync::Mutex<Vec<Exit>>,
}

/// The instance a fault is aimed at, and what it owned just before.
#[derive(Debug, Clone)]
pub struct Victim {
    pub index: usize,
    /// The partitions it owned by the cluster API (`None`: no instance answered).
    pub owned: Option<Vec<Partition>>,
}

impl Instances {
    pub fn new(all: Vec<Arc<Instance>>, partitions: u16) -> Self {
        Self {
            all,
            partitions,
            exits: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// The partitions' owners, asked of the live instances in turn until one answers.
    pub async fn owners(&self) -> Option<Vec<(Partition, String)>> {
        for i in self.all.iter().filter(|i| i.live()) {
            if let Ok(r) = i.client().request("GET", CLUSTER_PATH, None).await
                && r.status == 200
                && let Some(o) = owners(&r.body)
            {
                return Some(o);
            }
        }
        None
    }

    /// The live instance that owns the most partitions (ties: the first); with none known, a
    /// random live one (with one instance, that one owns every partition).
    pub async fn busiest(&self, pick: u64) -> Option<Victim> {
        let live: Vec<usize> = (0..self.all.len())
            .filter(|&i| self.all[i].live())
            .collect();
        if live.is_empty() {
            return None;
        }
        let ids: Vec<&str> = self.all.iter().map(|i| i.id.as_str()).collect();
        let owners = self.owners().await;
        Some(busiest_of(
            &live,
            &ids,
            owners.as_deref(),
            self.partitions,
            pick,
        ))
    }

    /// Starts again every instance that exited by itself, until `stop`.
    pub async fn supervise(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            self.restart_exited().await;
            tokio::select! {
                _ = stop.changed() => return,
                () = tokio::time::sleep(SUPERVISE_EVERY) => {}
            }
        }
    }

    /// Starts again the instances whose process exited by itself, noting each exit.
    pub async fn restart_exited(&self) {
        for i in &self.all {
            let Ok(mut p) = i.process.try_lock() else {
                continue;
            };
            let Some(status) = p.exited() else {
                continue;
            };
            let expected = status.code() == Some(FENCED_EXIT) && p.was_stopped_this_life();
            let exit = Exit {
                instance: i.id.clone(),
                life: p.lives(),
                status: status.to_string(),
                expected,
                at: Some(Instant::now()),
            };
            tracing::info!(instance = i.id, status = %status, expected, "an instance exited; starting it again");
            self.exits
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(exit);
            i.paused.store(false, Ordering::Release);
            if let Err(e) = p.start().await {
                tracing::warn!(instance = i.id, error = %e, "could not start the instance again");
            }
        }
    }

    /// The exits seen so far.
    pub fn exits(&self) -> Vec<Exit> {
        self.exits
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Continues every SIGSTOPped instance (a stop cut short by the end of the run).
    pub async fn resume_all(&self) {
        for i in self.all.iter().filter(|i| i.paused()) {
            if let Err(e) = i.pause(false).await {
                tracing::warn!(instance = i.id, error = %e, "could not continue the instance");
            }
        }
    }

    /// Makes sure every instance runs (for the audit), starting those that do not.
    pub async fn ensure_running(&self) {
        self.restart_exited().await;
        for i in &self.all {
            let mut p = i.process.lock().await;
            if i.pid.load(Ordering::Acquire) == 0
                && let Err(e) = p.start().await
            {
                tracing::warn!(instance = i.id, error = %e, "could not start the instance again");
            }
        }
    }

    /// Starts lives over all instances.
    pub async fn starts(&self) -> usize {
        let mut n = 0;
        for i in &self.all {
            n += i.process.lock().await.lives();
        }
        n
    }

    /// Stops every instance (SIGTERM, then SIGKILL after `grace`).
    pub async fn stop(&self, grace: Duration) {
        self.resume_all().await;
        for i in &self.all {
            i.process.lock().await.stop(grace).await;
        }
    }
}

/// What a `kill` or `stop` fault aimed at, for its failover time.
#[derive(Debug, Clone)]
pub struct Watch {
    pub instance: String,
    /// When the signal was sent.
    pub at: Instant,
    pub wall: SystemTime,
    /// The partitions the instance owned just before (`None`: unknown).
    pub owned: Option<Vec<Partition>>,
    /// Whether each action of the workload (by index) is in one of those partitions.
    owns_action: Vec<bool>,
    /// Of those, the partitions with work waiting at the fault, and their waiting actions
    /// (by index in the workload).
    pub waiting: Vec<(Partition, Vec<u32>)>,
    /// The log of the life that was faulted (for `stop`: where a fence would be written).
    pub log: Option<PathBuf>,
    /// The life that was faulted.
    pub life: usize,
}

impl Watch {
    /// What was faulted: `owned` partitions of `instance`, and among them those whose actions
    /// (`action_partitions`, by action index) are in `waiting_actions`.
    pub fn new(
        instance: &Instance,
        process: &ServeProcess,
        owned: Option<Vec<Partition>>,
        waiting_actions: &[u32],
        action_partitions: &[Partition],
    ) -> Self {
        let mut waiting: Vec<(Partition, Vec<u32>)> = Vec::new();
        if let Some(owned) = &owned {
            for &a in waiting_actions {
                let Some(&p) = action_partitions.get(a as usize) else {
                    continue;
                };
                if !owned.contains(&p) {
                    continue;
                }
                match waiting.iter_mut().find(|(q, _)| *q == p) {
                    Some((_, actions)) => actions.push(a),
                    None => waiting.push((p, vec![a])),
                }
            }
        }
        waiting.sort_by_key(|(p, _)| *p);
        let owns_action = action_partitions
            .iter()
            .map(|p| owned.as_ref().is_some_and(|o| o.contains(p)))
            .collect();
        Self {
            instance: instance.id.clone(),
            at: Instant::now(),
            wall: SystemTime::now(),
            owned,
            owns_action,
            waiting,
            log: process.log_path(),
            life: process.lives(),
        }
    }

    /// The failover after the fault, from the dispatch log (in arrival order), counting only
    /// dispatches admitted after the signal (not those already on their way): from the
    /// signal to the first dispatch of an action of a partition the instance owned, and to
    /// the moment each partition that had work waiting at the fault had had one. `None` for
    /// either if it never came.
    pub fn failover(&self, log: &[Arrived]) -> (Option<Duration>, Option<Duration>) {
        let from = log.partition_point(|a| a.at < self.at);
        let mut first = None;
        let mut back: Vec<bool> = vec![false; self.waiting.len()];
        let mut all = None;
        for a in &log[from..] {
            if a.admitted.is_some_and(|t| t < self.wall) {
                continue;
            }
            let Some(action) = a.action else {
                continue;
            };
            if !self
                .owns_action
                .get(action as usize)
                .copied()
                .unwrap_or(false)
            {
                continue;
            }
            let after = a.at.saturating_duration_since(self.at);
            first.get_or_insert(after);
            if let Some(k) = self
                .waiting
                .iter()
                .position(|(_, actions)| actions.contains(&action))
            {
                back[k] = true;
            }
            if !self.waiting.is_empty() && back.iter().all(|b| *b) {
                all = Some(after);
                break;
            }
        }
        (first, all)
    }
}

/// Failover times over the run's faults.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FailoverSummary {
    /// Each fault's failover time, in the order of the faults.
    pub each_ms: Vec<f64>,
    pub p50_ms: Option<f64>,
    pub max_ms: Option<f64>,
    /// Faults with waiting work on the faulted instance's partitions that saw no dispatch
    /// of it again before the run ended.
    pub never: u64,
}

impl FailoverSummary {
    pub fn of(samples: &[Option<f64>]) -> Self {
        let each_ms: Vec<f64> = samples.iter().flatten().copied().collect();
        let mut sorted = each_ms.clone();
        sorted.sort_by(f64::total_cmp);
        // The lower median for an even count: a figure that was measured.
        let p50_ms = (!sorted.is_empty()).then(|| sorted[(sorted.len() - 1) / 2]);
        Self {
            p50_ms,
            max_ms: sorted.last().copied(),
            never: samples.iter().filter(|s| s.is_none()).count() as u64,
            each_ms,
        }
    }
}

/// The last lines of a log, for an error message.
fn log_tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

/// What the log of a faulted life says about a fence: its first line that mentions one.
pub fn fence_in_log(path: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("fenced") || l.contains("another instance took")
        })
        .map(|l| l.chars().take(300).collect())
}

/// `--kill-every`, `--stop-for` and the soak's durations: `500ms`, `10s`, `2m`, `1h`, or a
/// number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: expected e.g. 500ms, 10s, 2m or 1h"))?;
    let seconds = match unit.trim() {
        "ms" => n / 1000.0,
        "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        other => return Err(format!("{s:?}: unknown unit {other:?} (ms, s, m or h)")),
    };
    if !seconds.is_finite() || seconds <= 0.0 {
        return Err(format!("{s:?}: must be more than zero"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::super::load::Arrival;
    use super::*;

    #[test]
    fn durations_take_a_unit_or_mean_seconds() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("ten").is_err());
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("3d").is_err());
    }

    #[test]
    fn the_owners_come_from_the_cluster_api() {
        let body = br#"{"data":{"instance_id":"bench-0","partition_count":3,"partitions":[
            {"partition":0,"owner":"bench-1","epoch":3,"since":"x","actions":1,"queued":0,"running":0},
            {"partition":1,"owner":"bench-0","epoch":1,"since":"x","actions":0,"queued":0,"running":0},
            {"partition":2,"owner":"bench-1","epoch":2,"since":"x","actions":0,"queued":0,"running":0}]}}"#;
        assert_eq!(
            owners(body),
            Some(vec![
                (0, "bench-1".to_owned()),
                (1, "bench-0".to_owned()),
                (2, "bench-1".to_owned())
            ])
        );
        assert_eq!(owners(b"{}"), None);
        assert_eq!(owners(b"not json"), None);
    }

    #[test]
    fn the_busiest_live_instance_owns_the_most_partitions() {
        let ids = ["bench-0", "bench-1", "bench-2"];
        let owners: Vec<(Partition, String)> = [(0, "bench-1"), (1, "bench-2"), (2, "bench-1")]
            .iter()
            .map(|(p, o)| (*p, (*o).to_owned()))
            .collect();
        let v = busiest_of(&[0, 1, 2], &ids, Some(&owners), 3, 0);
        assert_eq!((v.index, v.owned), (1, Some(vec![0, 2])));
        // bench-1 is stopped or down: the next busiest.
        let v = busiest_of(&[0, 2], &ids, Some(&owners), 3, 0);
        assert_eq!((v.index, v.owned), (2, Some(vec![1])));
        // The live ones own nothing: any of them, owning nothing.
        let v = busiest_of(&[0], &ids, Some(&owners), 3, 7);
        assert_eq!((v.index, v.owned), (0, Some(Vec::new())));
        // Nobody answered: a random live one, its partitions unknown…
        let v = busiest_of(&[0, 2], &ids, None, 3, 1);
        assert_eq!((v.index, v.owned), (2, None));
        // … unless it is the only instance, which owns them all.
        let v = busiest_of(&[0], &ids[..1], None, 3, 5);
        assert_eq!((v.index, v.owned), (0, Some(vec![0, 1, 2])));
    }

    #[test]
    fn a_metric_is_summed_over_its_labels() {
        let text = "# TYPE attune_fenced_writes_total counter\n\
                    attune_fenced_writes_total 2\n\
                    attune_fenced_writes_total_other 9\n\
                    attune_x{a=\"b\"} 1\n";
        assert_eq!(metric(text, FENCED_METRIC), Some(2.0));
        let labelled = "m{a=\"1\"} 1\nm{a=\"2\"} 2.5\n";
        assert_eq!(metric(labelled, "m"), Some(3.5));
        assert_eq!(metric("", FENCED_METRIC), None);
    }

    /// Ten actions, action `a` in partition `a`; the instance owned `owned`.
    fn watch(
        at: Instant,
        wall: SystemTime,
        owned: &[Partition],
        waiting: Vec<(Partition, Vec<u32>)>,
    ) -> Watch {
        Watch {
            instance: "bench-1".to_owned(),
            at,
            wall,
            owned: Some(owned.to_vec()),
            owns_action: (0..10).map(|a| owned.contains(&a)).collect(),
            waiting,
            log: None,
            life: 1,
        }
    }

    #[test]
    fn failover_is_the_first_dispatch_admitted_after_the_fault_of_an_owned_action() {
        let t0 = Instant::now();
        let w0 = SystemTime::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let wall = |ms: u64| w0 + Duration::from_millis(ms);
        let arrived = |ms: u64, action: u32, admitted: u64| Arrived {
            at: at(ms),
            kind: Arrival::First,
            action: Some(action),
            violations: 0,
            admitted: Some(wall(admitted)),
        };
        let log = vec![
            arrived(5, 1, 4),     // before the fault
            arrived(120, 1, 90),  // in flight: admitted before the fault
            arrived(130, 9, 130), // another instance's partition
            arrived(400, 2, 390), // the first of an owned one: 300 ms after the fault
            arrived(450, 1, 440), // a partition with work waiting at the fault
            arrived(900, 3, 890), // the last one of those back
        ];
        let w = watch(
            at(100),
            wall(100),
            &[1, 2, 3],
            vec![(1, vec![1]), (3, vec![3])],
        );
        let (first, all) = w.failover(&log);
        assert_eq!(first, Some(Duration::from_millis(300)));
        assert_eq!(all, Some(Duration::from_millis(800)));

        // Nothing waited at the fault: only the first dispatch.
        let idle = watch(at(100), wall(100), &[2], Vec::new());
        assert_eq!(
            idle.failover(&log),
            (Some(Duration::from_millis(300)), None)
        );
        // No dispatch of the partitions came again.
        let never = watch(at(100), wall(100), &[5], vec![(5, vec![5])]);
        assert_eq!(never.failover(&log), (None, None));
    }

    #[test]
    fn the_summary_gives_each_time_the_median_and_the_max() {
        let s = FailoverSummary::of(&[Some(300.0), None, Some(100.0), Some(200.0)]);
        assert_eq!(s.each_ms, vec![300.0, 100.0, 200.0]);
        assert_eq!(s.p50_ms, Some(200.0));
        assert_eq!(s.max_ms, Some(300.0));
        assert_eq!(s.never, 1);
        assert_eq!(FailoverSummary::of(&[]).p50_ms, None);
    }
}
