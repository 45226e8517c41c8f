//! What a run submits: which actions, how many executions each, their limits, and when each
//! request is published.

use std::time::Duration;

use clap::ValueEnum;

use crate::tools::DurationDist;

/// The named workloads (`--preset`); explicit flags override their parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// 1 action × 100,000 executions at limit 1, flat out: the pure FIFO hand-off.
    Single,
    /// 1,000 actions × 100 at limit 5, flat out.
    Wide,
    /// One hot action (50,000 at limit 5) beside 999 cold ones (50 each at limit 5).
    Hot,
    /// 100 actions × 500 at limit 5, in bursts of 5,000 requests at 2,000 requests/s on
    /// average.
    Bursty,
    /// 4 actions × 25 at limit 2, workers 0–2 ms failing 10 %: a check that everything works.
    Tiny,
}

/// One action of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionPlan {
    pub name: String,
    /// Executions submitted for it.
    pub count: u64,
    /// Its concurrency limit (set in-process; with `--external` the executor's own).
    pub limit: u32,
}

/// Everything a run does, resolved from the preset and the flags.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    pub actions: Vec<ActionPlan>,
    /// Requests per second over all producers; `None` is flat out.
    pub rate: Option<f64>,
    /// Requests published back to back before the producers pause (1: evenly spaced).
    pub burst: u64,
    /// Producer channels, each owning a share of the actions.
    pub producers: u16,
    pub duration: DurationDist,
    pub failure_rate: f64,
}

/// Overrides from the command line; `None` keeps the preset's value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub actions: Option<u32>,
    pub executions: Option<u64>,
    pub limit: Option<u32>,
    pub hot_executions: Option<u64>,
    pub hot_limit: Option<u32>,
    pub rate: Option<f64>,
    pub flat_out: bool,
    pub burst: Option<u64>,
    pub producers: Option<u16>,
    pub duration: Option<DurationDist>,
    pub failure_rate: Option<f64>,
}

/// Name of the i-th ordinary action.
fn action_name(i: u32) -> String {
    format!("bench.a{i:04}")
}

impl Workload {
    pub fn resolve(preset: Preset, o: &Overrides) -> Self {
        // (actions, executions each, limit, hot (executions, limit), rate, burst, duration, failure)
        let (n, m, limit, hot, rate, burst, duration, failure) = match preset {
            Preset::Single => (1, 100_000, 1, None, None, 1, 0, 0.0),
            Preset::Wide => (1000, 100, 5, None, None, 1, 0, 0.0),
            Preset::Hot => (999, 50, 5, Some((50_000, 5)), None, 1, 0, 0.0),
            Preset::Bursty => (100, 500, 5, None, Some(2000.0), 5000, 0, 0.0),
            Preset::Tiny => (4, 25, 2, None, None, 1, 2, 0.1),
        };
        let n = o.actions.unwrap_or(n);
        let m = o.executions.unwrap_or(m);
        let limit = o.limit.unwrap_or(limit).max(1);
        let hot = match (hot, o.hot_executions) {
            (_, Some(0)) => None,
            (Some((h, l)), None) => Some((h, o.hot_limit.unwrap_or(l))),
            (_, Some(h)) => Some((h, o.hot_limit.unwrap_or(limit))),
            (None, None) => None,
        };
        let mut actions = Vec::new();
        if let Some((count, limit)) = hot {
            actions.push(ActionPlan {
                name: "bench.hot".to_owned(),
                count,
                limit: limit.max(1),
            });
        }
        actions.extend((0..n).map(|i| ActionPlan {
            name: action_name(i),
            count: m,
            limit,
        }));
        let duration = o.duration.unwrap_or(if preset == Preset::Tiny {
            DurationDist::Uniform(Duration::ZERO, Duration::from_millis(duration))
        } else {
            DurationDist::Fixed(Duration::from_millis(duration))
        });
        Self {
            actions,
            rate: if o.flat_out {
                None
            } else {
                o.rate.or(rate).filter(|r| *r > 0.0)
            },
            burst: o.burst.unwrap_or(burst).max(1),
            producers: o.producers.unwrap_or(4).max(1),
            duration,
            failure_rate: o.failure_rate.unwrap_or(failure).clamp(0.0, 1.0),
        }
    }

    /// Executions in all.
    pub fn total(&self) -> u64 {
        self.actions.iter().map(|a| a.count).sum()
    }

    /// The most executions any one action gets (the executor's queue must hold them).
    pub fn max_count(&self) -> u64 {
        self.actions.iter().map(|a| a.count).max().unwrap_or(0)
    }

    /// Executions that may run at once over all actions.
    pub fn total_limit(&self) -> u64 {
        self.actions.iter().map(|a| u64::from(a.limit)).sum()
    }

    /// Offset of each action's first execution id from the run's base id.
    pub fn offsets(&self) -> Vec<u64> {
        let mut next = 0;
        self.actions
            .iter()
            .map(|a| {
                let o = next;
                next += a.count;
                o
            })
            .collect()
    }

    /// What producer `p` of the workload's producers publishes, in order: (action index,
    /// execution number within the action). It owns the actions whose index is `p` modulo
    /// the producer count and takes them round robin, so actions interleave as in real
    /// traffic and each action's requests leave from one channel, in order.
    pub fn sequence(&self, p: u16) -> Vec<(u32, u64)> {
        let producers = usize::from(self.producers);
        let mine: Vec<usize> = (usize::from(p)..self.actions.len())
            .step_by(producers)
            .collect();
        let most = mine
            .iter()
            .map(|&a| self.actions[a].count)
            .max()
            .unwrap_or(0);
        let mut out = Vec::new();
        for k in 0..most {
            for &a in &mine {
                if k < self.actions[a].count {
                    out.push((a as u32, k));
                }
            }
        }
        out
    }

    /// When a producer's `j`-th request is due, from the start; `None` is at once.
    pub fn due(&self, j: u64) -> Option<Duration> {
        let per_producer = self.rate? / f64::from(self.producers);
        // Bursts: the whole burst is due when its first request would be.
        let first_of_burst = j - j % self.burst;
        Some(Duration::from_secs_f64(
            first_of_burst as f64 / per_producer,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_the_sizes_the_issue_names() {
        let single = Workload::resolve(Preset::Single, &Overrides::default());
        assert_eq!((single.actions.len(), single.total()), (1, 100_000));
        assert_eq!(single.actions[0].limit, 1);
        let wide = Workload::resolve(Preset::Wide, &Overrides::default());
        assert_eq!(
            (wide.actions.len(), wide.total(), wide.total_limit()),
            (1000, 100_000, 5000)
        );
        let hot = Workload::resolve(Preset::Hot, &Overrides::default());
        assert_eq!(hot.actions.len(), 1000);
        assert_eq!(hot.max_count(), 50_000);
        assert!(Workload::resolve(Preset::Bursty, &Overrides::default()).burst > 1);
    }

    #[test]
    fn flags_override_the_preset() {
        let o = Overrides {
            actions: Some(3),
            executions: Some(7),
            limit: Some(2),
            flat_out: true,
            ..Overrides::default()
        };
        let w = Workload::resolve(Preset::Bursty, &o);
        assert_eq!((w.actions.len(), w.total()), (3, 21));
        assert_eq!(w.rate, None);
        assert!(w.actions.iter().all(|a| a.limit == 2));
    }

    #[test]
    fn producers_share_out_every_execution_once_in_order_per_action() {
        let w = Workload::resolve(
            Preset::Hot,
            &Overrides {
                actions: Some(5),
                executions: Some(3),
                hot_executions: Some(10),
                ..Overrides::default()
            },
        );
        let mut seen = vec![Vec::new(); w.actions.len()];
        for p in 0..w.producers {
            for (a, k) in w.sequence(p) {
                seen[a as usize].push(k);
            }
        }
        for (a, ks) in seen.iter().enumerate() {
            assert_eq!(*ks, (0..w.actions[a].count).collect::<Vec<_>>());
        }
    }

    #[test]
    fn bursts_are_due_together_at_the_average_rate() {
        let w = Workload::resolve(
            Preset::Bursty,
            &Overrides {
                producers: Some(1),
                rate: Some(100.0),
                burst: Some(10),
                ..Overrides::default()
            },
        );
        assert_eq!(w.due(0), Some(Duration::ZERO));
        assert_eq!(w.due(9), Some(Duration::ZERO));
        assert_eq!(w.due(10), Some(Duration::from_millis(100)));
    }
}
