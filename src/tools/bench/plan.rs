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
    /// The soak's order (`--soak`): the first `steady` actions run all along and the others
    /// come and go; `None`: every action round robin from the start.
    pub rolling: Option<Rolling>,
}

/// How a soak's actions follow each other: the actions from index `steady` on are each used
/// `uses` times within a short while and then never again, `group` of them at a time per
/// producer, spread evenly among the steady actions' requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rolling {
    pub steady: usize,
    pub group: usize,
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

/// Short-lived actions a soak's producer uses at a time.
const SOAK_GROUP: usize = 8;

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
            rolling: None,
        }
    }

    /// The soak's workload (`--soak`): `steady` actions at `steady_limit` that run all along,
    /// and `distinct` actions at `distinct_limit` used `uses` times each, a few at a time,
    /// then never again; `total` executions in all, so that the rate spreads them over the
    /// soak. `None` when the short-lived actions would take more than half of `total`.
    #[allow(clippy::too_many_arguments)]
    pub fn soak(
        mut self,
        total: u64,
        steady: u32,
        steady_limit: u32,
        distinct: u32,
        uses: u64,
        distinct_limit: u32,
    ) -> Option<Self> {
        let steady = steady.max(1);
        let rolling_total = u64::from(distinct) * uses;
        if rolling_total.saturating_mul(2) > total {
            return None;
        }
        let steady_total = total - rolling_total;
        let each = steady_total / u64::from(steady);
        let extra = steady_total % u64::from(steady);
        self.actions = (0..steady)
            .map(|i| ActionPlan {
                name: action_name(i),
                count: each + u64::from(u64::from(i) < extra),
                limit: steady_limit.max(1),
            })
            .chain((0..distinct).map(|i| ActionPlan {
                name: format!("bench.once{i:06}"),
                count: uses,
                limit: distinct_limit.max(1),
            }))
            .collect();
        self.rolling = Some(Rolling {
            steady: steady as usize,
            group: SOAK_GROUP,
        });
        Some(self)
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
    ///
    /// In a soak ([`Workload::rolling`]) the short-lived actions it owns go `group` at a time,
    /// round robin among the group until each has had its executions, group after group, and
    /// their requests are spread evenly among those of its steady actions.
    pub fn sequence(&self, p: u16) -> Vec<(u32, u64)> {
        let producers = usize::from(self.producers);
        let mine: Vec<usize> = (usize::from(p)..self.actions.len())
            .step_by(producers)
            .collect();
        let Some(rolling) = self.rolling else {
            return self.round_robin(&mine);
        };
        let (steady, once): (Vec<usize>, Vec<usize>) =
            mine.iter().partition(|&&a| a < rolling.steady);
        let steady = self.round_robin(&steady);
        let mut once_seq = Vec::new();
        for group in once.chunks(rolling.group.max(1)) {
            once_seq.extend(self.round_robin(group));
        }
        let total = steady.len() + once_seq.len();
        let (n, r) = (total as u64, once_seq.len() as u64);
        let (mut steady, mut once_seq) = (steady.into_iter(), once_seq.into_iter());
        (0..n)
            .filter_map(|i| {
                // The i-th request is a short-lived action's when the share of them due by
                // i + 1 steps up: Bresenham's spreading of r among n.
                if (i + 1) * r / n > i * r / n {
                    once_seq.next()
                } else {
                    steady.next()
                }
            })
            .collect()
    }

    /// The executions of `actions` (by index), round robin among them.
    fn round_robin(&self, actions: &[usize]) -> Vec<(u32, u64)> {
        let most = actions
            .iter()
            .map(|&a| self.actions[a].count)
            .max()
            .unwrap_or(0);
        let mut out = Vec::new();
        for k in 0..most {
            for &a in actions {
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
    fn a_soak_spreads_short_lived_actions_that_never_come_back() {
        let w = Workload::resolve(
            Preset::Wide,
            &Overrides {
                producers: Some(2),
                ..Overrides::default()
            },
        )
        .soak(10_000, 4, 5, 400, 3, 1)
        .expect("fits");
        assert_eq!(w.total(), 10_000);
        assert_eq!(w.actions.len(), 404);
        assert!(
            Workload::resolve(Preset::Wide, &Overrides::default())
                .soak(1000, 4, 5, 400, 3, 1)
                .is_none()
        );
        let mut seen = vec![Vec::new(); w.actions.len()];
        for p in 0..w.producers {
            let seq = w.sequence(p);
            let mut first = vec![None; w.actions.len()];
            for (j, &(a, k)) in seq.iter().enumerate() {
                seen[a as usize].push(k);
                first[a as usize].get_or_insert(j);
                if a >= 4 {
                    // A short-lived action's uses lie within a group's worth (8 actions × 3
                    // uses, one every `stride` requests), then it never comes back.
                    let stride = seq.len() / (200 * 3) + 1;
                    let since = j - first[a as usize].unwrap_or(j);
                    assert!(since < 8 * 3 * stride, "{a} {since}");
                }
            }
            // The short-lived actions are spread over the whole sequence: some in each tenth.
            for tenth in seq.chunks(seq.len() / 10) {
                assert!(tenth.iter().any(|&(a, _)| a >= 4));
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
