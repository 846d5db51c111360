//! A discrete-time simulator to measure an autoscaler: a FIFO queue fed by
//! an arrival trace, replicas that take a while to start and serve a fixed
//! number of tasks at a time for a fixed time each, and an [`Autoscaler`]
//! that looks at the queue every simulated second.
//!
//! Two autoscalers are built in: [`Backlog`], the pure policy driven the
//! way the reconcile loop drives it, and [`HpaKeda`], a model of what a
//! Kubernetes HPA fed by a KEDA queue scaler does.

use std::collections::VecDeque;

use chrono::{DateTime, TimeDelta, Utc};
use serde::Serialize;

use crate::policy::{decide, History, Observation, QueueLoad, QueueReading};
use crate::spec::WorkerPoolSpec;

/// Tasks arriving at one second of the trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrival {
    pub second: u64,
    pub tasks: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("arrival trace line {line}: {message}")]
pub struct TraceError {
    pub line: usize,
    pub message: String,
}

/// Parses `second,tasks` lines (seconds ascending); `#` starts a comment
/// and a `second,tasks` header is allowed.
pub fn parse_trace(text: &str) -> Result<Vec<Arrival>, TraceError> {
    let mut arrivals: Vec<Arrival> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() || line == "second,tasks" {
            continue;
        }
        let error = |message: String| TraceError { line: n + 1, message };
        let (second, tasks) = line
            .split_once(',')
            .ok_or_else(|| error(format!("expected second,tasks, got {line:?}")))?;
        let arrival = Arrival {
            second: second.trim().parse().map_err(|e| error(format!("second: {e}")))?,
            tasks: tasks.trim().parse().map_err(|e| error(format!("tasks: {e}")))?,
        };
        if arrivals.last().is_some_and(|last| last.second >= arrival.second) {
            return Err(error(format!(
                "second {} is not after the previous line's",
                arrival.second
            )));
        }
        arrivals.push(arrival);
    }
    Ok(arrivals)
}

/// The simulated system, apart from its autoscaler.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct World {
    /// Seconds from a replica being requested to it claiming tasks.
    pub startup_seconds: u64,
    /// Seconds each task takes.
    pub service_seconds: u64,
    /// Tasks one replica runs at once.
    pub concurrency: u32,
    /// Seconds simulated after the last arrival, so every run ends drained and idle.
    pub tail_seconds: u64,
}

/// What a controller can see at one second.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct View {
    pub pending: u64,
    pub in_flight: u64,
    pub oldest_pending_seconds: u64,
    pub completions_last_minute: u64,
    /// Replicas that exist and are not draining.
    pub current: u32,
    pub ready: u32,
    pub busy: u32,
}

pub trait Autoscaler {
    /// Called every simulated second; returns the replica count to scale to
    /// when the autoscaler acts at this second.
    fn tick(&mut self, second: u64, view: &View) -> Option<u32>;
}

/// Figures of one run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub tasks: u64,
    /// Tasks not started by the end of the run.
    pub unfinished: u64,
    /// Sum over seconds of replicas in existence (starting, serving or draining).
    pub replica_seconds: u64,
    pub wait_p50_seconds: u64,
    pub wait_p95_seconds: u64,
    pub wait_max_seconds: u64,
    pub peak_replicas: u32,
    /// Times the autoscaler changed the replica count.
    pub scale_changes: u64,
}

struct Replica {
    ready_at: u64,
    /// Finish times of the tasks it runs.
    running: Vec<u64>,
    /// Removed by a scale-down while busy: claims nothing, leaves when done.
    draining: bool,
}

/// Replays `arrivals` through `world` under `autoscaler`.
pub fn simulate(world: &World, arrivals: &[Arrival], autoscaler: &mut dyn Autoscaler) -> Report {
    let end = arrivals.last().map_or(0, |a| a.second) + world.tail_seconds;
    let mut next_arrival = arrivals.iter().peekable();
    let mut pending: VecDeque<u64> = VecDeque::new();
    let mut replicas: Vec<Replica> = Vec::new();
    let mut completions: VecDeque<u64> = VecDeque::new();
    let mut waits: Vec<u64> = Vec::new();
    let (mut replica_seconds, mut peak, mut scale_changes) = (0, 0, 0);

    for second in 0..=end {
        while let Some(arrival) = next_arrival.next_if(|a| a.second == second) {
            pending.extend(std::iter::repeat_n(second, arrival.tasks as usize));
        }
        for replica in &mut replicas {
            replica.running.retain(|&finish| {
                let done = finish <= second;
                if done {
                    completions.push_back(second);
                }
                !done
            });
        }
        replicas.retain(|r| !(r.draining && r.running.is_empty()));
        while completions.front().is_some_and(|&t| t + 60 <= second) {
            completions.pop_front();
        }

        let view = view(second, &pending, &replicas, completions.len());
        if let Some(target) = autoscaler.tick(second, &view) {
            if target != view.current {
                scale_changes += 1;
                scale(&mut replicas, target, second + world.startup_seconds, second);
            }
        }

        for replica in replicas
            .iter_mut()
            .filter(|r| !r.draining && r.ready_at <= second)
        {
            while replica.running.len() < world.concurrency as usize {
                let Some(arrived) = pending.pop_front() else { break };
                waits.push(second - arrived);
                replica.running.push(second + world.service_seconds);
            }
        }
        replica_seconds += replicas.len() as u64;
        peak = peak.max(replicas.len() as u32);
    }

    let unfinished = pending.len() as u64;
    waits.sort_unstable();
    Report {
        tasks: waits.len() as u64 + unfinished,
        unfinished,
        replica_seconds,
        wait_p50_seconds: percentile(&waits, 50),
        wait_p95_seconds: percentile(&waits, 95),
        wait_max_seconds: waits.last().copied().unwrap_or(0),
        peak_replicas: peak,
        scale_changes,
    }
}

fn view(second: u64, pending: &VecDeque<u64>, replicas: &[Replica], completions: usize) -> View {
    let serving = || replicas.iter().filter(|r| !r.draining);
    View {
        pending: pending.len() as u64,
        in_flight: replicas.iter().map(|r| r.running.len() as u64).sum(),
        oldest_pending_seconds: pending.front().map_or(0, |&arrived| second - arrived),
        completions_last_minute: completions as u64,
        current: serving().count() as u32,
        ready: serving().filter(|r| r.ready_at <= second).count() as u32,
        busy: serving().filter(|r| !r.running.is_empty()).count() as u32,
    }
}

/// Scales like backlog's backends: a scale-up first takes back draining
/// replicas, a scale-down removes starting replicas, then idle ones, and
/// only drains busy ones (they finish their tasks first).
fn scale(replicas: &mut Vec<Replica>, target: u32, ready_at: u64, now: u64) {
    let target = target as usize;
    let mut serving = replicas.iter().filter(|r| !r.draining).count();
    for replica in replicas.iter_mut().filter(|r| r.draining) {
        if serving >= target {
            break;
        }
        replica.draining = false;
        serving += 1;
    }
    replicas.extend((serving..target).map(|_| Replica {
        ready_at,
        running: Vec::new(),
        draining: false,
    }));
    let mut excess = serving.saturating_sub(target);
    let idle = |r: &Replica| !r.draining && r.running.is_empty();
    for starting in [true, false] {
        replicas.retain(|r| {
            let remove = excess > 0 && idle(r) && (r.ready_at > now) == starting;
            excess -= usize::from(remove);
            !remove
        });
    }
    for replica in replicas.iter_mut().filter(|r| !r.draining) {
        if excess == 0 {
            break;
        }
        replica.draining = true;
        excess -= 1;
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], percent: u64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (sorted.len() as u64 * percent).div_ceil(100).max(1);
    sorted[rank as usize - 1]
}

/// backlog's policy as the reconcile loop runs it: a tick every
/// `interval_seconds`, and at once when a pool at zero gets work (the
/// loop LISTENs for new runnable tasks).
pub struct Backlog {
    spec: WorkerPoolSpec,
    history: History,
    interval_seconds: u64,
    epoch: DateTime<Utc>,
}

impl Backlog {
    pub fn new(spec: WorkerPoolSpec, interval_seconds: u64) -> Backlog {
        Backlog {
            spec,
            history: History::default(),
            interval_seconds: interval_seconds.max(1),
            epoch: DateTime::UNIX_EPOCH,
        }
    }
}

impl Autoscaler for Backlog {
    fn tick(&mut self, second: u64, view: &View) -> Option<u32> {
        let notified = view.current == 0 && view.pending > 0;
        if !second.is_multiple_of(self.interval_seconds) && !notified {
            return None;
        }
        let observation = Observation {
            current_replicas: view.current,
            ready_replicas: view.ready,
            queue: QueueReading::Read(QueueLoad {
                pending: view.pending,
                in_flight: view.in_flight,
                oldest_pending_seconds: view.oldest_pending_seconds as f64,
                completions_per_minute: view.completions_last_minute,
                busy_replicas: view.busy,
            }),
        };
        let now = self.epoch + TimeDelta::seconds(second as i64);
        let decision = decide(&self.spec, &observation, &self.history, now);
        self.history.record(&decision, now);
        Some(decision.replicas)
    }
}

/// A Kubernetes HPA on a KEDA queue-length metric, with their defaults:
/// KEDA polls every 30 s, wakes a deployment at zero to one replica when
/// the metric is non-zero and puts it back to zero after a cooldown with
/// the metric at zero; in between, the HPA syncs every 15 s with the ratio
/// rule `ceil(current * metric / target)` (no change within a 10 %
/// tolerance), a 300 s scale-down window and its default scale-up limit
/// (+4 replicas or +100 % per 15 s, whichever is more).
pub struct HpaKeda {
    /// Queue length (pending + in flight) one replica is sized for.
    pub target_per_replica: u64,
    pub max_replicas: u32,
    pub keda_polling_seconds: u64,
    pub keda_cooldown_seconds: u64,
    pub hpa_sync_seconds: u64,
    pub hpa_tolerance: f64,
    pub hpa_scale_down_window_seconds: u64,
    recommendations: VecDeque<(u64, u32)>,
    last_active: Option<u64>,
}

impl HpaKeda {
    pub fn new(target_per_replica: u64, max_replicas: u32) -> HpaKeda {
        HpaKeda {
            target_per_replica: target_per_replica.max(1),
            max_replicas,
            keda_polling_seconds: 30,
            keda_cooldown_seconds: 300,
            hpa_sync_seconds: 15,
            hpa_tolerance: 0.1,
            hpa_scale_down_window_seconds: 300,
            recommendations: VecDeque::new(),
            last_active: None,
        }
    }

    fn keda(&mut self, second: u64, metric: u64, current: u32) -> Option<u32> {
        if metric > 0 {
            self.last_active = Some(second);
        }
        let cooled = self
            .last_active
            .is_none_or(|active| second - active >= self.keda_cooldown_seconds);
        match current {
            0 if metric > 0 => Some(1),
            1.. if metric == 0 && cooled => {
                self.recommendations.clear();
                Some(0)
            }
            _ => None,
        }
    }

    fn hpa(&mut self, second: u64, metric: u64, current: u32) -> u32 {
        let ratio = metric as f64 / (f64::from(current) * self.target_per_replica as f64);
        let recommendation = if (ratio - 1.0).abs() <= self.hpa_tolerance {
            current
        } else {
            (ratio * f64::from(current)).ceil() as u32
        }
        .clamp(1, self.max_replicas);
        self.recommendations.push_back((second, recommendation));
        let cutoff = second.saturating_sub(self.hpa_scale_down_window_seconds);
        while self.recommendations.front().is_some_and(|&(at, _)| at <= cutoff) {
            self.recommendations.pop_front();
        }
        let highest = self
            .recommendations
            .iter()
            .map(|&(_, r)| r)
            .max()
            .unwrap_or(recommendation);
        let up_limit = (current + 4).max(current * 2);
        if recommendation > current {
            recommendation.min(up_limit)
        } else {
            highest.min(current)
        }
    }
}

impl Autoscaler for HpaKeda {
    fn tick(&mut self, second: u64, view: &View) -> Option<u32> {
        let metric = view.pending + view.in_flight;
        if second.is_multiple_of(self.keda_polling_seconds) {
            if let Some(replicas) = self.keda(second, metric, view.current) {
                return Some(replicas);
            }
        }
        (view.current > 0 && second.is_multiple_of(self.hpa_sync_seconds))
            .then(|| self.hpa(second, metric, view.current))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world() -> World {
        World {
            startup_seconds: 20,
            service_seconds: 30,
            concurrency: 2,
            tail_seconds: 60,
        }
    }

    /// Scales to a fixed count at second 0 and never again.
    struct Fixed(u32);

    impl Autoscaler for Fixed {
        fn tick(&mut self, second: u64, _: &View) -> Option<u32> {
            (second == 0).then_some(self.0)
        }
    }

    #[test]
    fn a_trace_parses_with_comments_and_a_header() {
        let trace = "# bursty\nsecond,tasks\n0,2\n5,1 # lone\n\n";
        assert_eq!(
            parse_trace(trace),
            Ok(vec![
                Arrival { second: 0, tasks: 2 },
                Arrival { second: 5, tasks: 1 }
            ])
        );
    }

    #[test]
    fn a_trace_out_of_order_names_its_line() {
        assert_eq!(
            parse_trace("5,1\n5,2\n").unwrap_err().to_string(),
            "arrival trace line 2: second 5 is not after the previous line's"
        );
        assert_eq!(
            parse_trace("x\n").unwrap_err().to_string(),
            "arrival trace line 1: expected second,tasks, got \"x\""
        );
    }

    #[test]
    fn tasks_wait_for_start_up_then_for_a_free_slot() {
        // One replica requested at 0, ready at 20, two slots of 30 s: tasks
        // 1-2 wait 20 s, tasks 3-4 wait for the first pair to finish at 50.
        let arrivals = [Arrival { second: 0, tasks: 4 }];
        let report = simulate(&world(), &arrivals, &mut Fixed(1));
        assert_eq!(report.tasks, 4);
        assert_eq!(report.unfinished, 0);
        assert_eq!((report.wait_p50_seconds, report.wait_max_seconds), (20, 50));
        assert_eq!(report.replica_seconds, 61, "one replica for seconds 0..=60");
    }

    #[test]
    fn a_scale_down_drains_busy_replicas_instead_of_killing_them() {
        let mut replicas = vec![
            Replica {
                ready_at: 0,
                running: vec![40],
                draining: false,
            },
            Replica {
                ready_at: 0,
                running: vec![],
                draining: false,
            },
            Replica {
                ready_at: 30,
                running: vec![],
                draining: false,
            },
        ];
        scale(&mut replicas, 0, 45, 10);
        assert_eq!(replicas.len(), 1, "the idle and the starting replica go at once");
        assert!(replicas[0].draining && replicas[0].running == [40]);

        scale(&mut replicas, 2, 45, 11);
        assert_eq!(
            replicas.len(),
            2,
            "the draining replica is taken back, one is started"
        );
        assert!(!replicas[0].draining);
        assert_eq!(replicas[1].ready_at, 45);
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let waits: Vec<u64> = (1..=20).collect();
        assert_eq!(percentile(&waits, 50), 10);
        assert_eq!(percentile(&waits, 95), 19);
        assert_eq!(percentile(&[], 95), 0);
    }

    #[test]
    fn the_baseline_waits_for_a_keda_poll_to_wake_from_zero() {
        let mut baseline = HpaKeda::new(2, 10);
        let busy = View {
            pending: 6,
            ..View::default()
        };
        assert_eq!(baseline.tick(1, &busy), None, "between polls nothing happens");
        assert_eq!(baseline.tick(30, &busy), Some(1), "KEDA wakes it to one");
        let one = View { current: 1, ..busy };
        assert_eq!(baseline.tick(45, &one), Some(3), "then the HPA's ratio rule");
    }

    #[test]
    fn the_baseline_ignores_changes_within_its_tolerance_and_holds_scale_downs_for_300_s() {
        let mut baseline = HpaKeda::new(10, 20);
        let at = |current, metric| View {
            pending: metric,
            current,
            ..View::default()
        };
        assert_eq!(baseline.tick(15, &at(10, 105)), Some(10), "5 % over target");
        assert_eq!(
            baseline.tick(45, &at(10, 20)),
            Some(10),
            "the 300 s window holds 10"
        );
        assert_eq!(baseline.tick(330, &at(10, 20)), Some(2));
    }

    #[test]
    fn backlog_reacts_to_work_at_zero_without_waiting_for_its_tick() {
        let spec: WorkerPoolSpec = serde_json::from_value(serde_json::json!({
            "taskTypes": ["text_generation"],
            "target": {"local": {"command": ["text-worker"]}},
            "maxReplicas": 5,
            "tasksPerReplica": 2,
        }))
        .expect("valid spec");
        let mut backlog = Backlog::new(spec, 5);
        let view = View {
            pending: 3,
            ..View::default()
        };
        assert_eq!(backlog.tick(7, &view), Some(2));
        let running = View { current: 2, ..view };
        assert_eq!(backlog.tick(8, &running), None, "then it waits for its interval");
    }

    const TRACE: &str = include_str!("../testdata/arrivals.csv");

    #[test]
    fn the_checked_in_trace_is_two_hours_of_bursts_and_long_gaps() {
        let arrivals = parse_trace(TRACE).expect("the trace parses");
        let last = arrivals.last().unwrap().second;
        assert!((6600..=7200).contains(&last), "{last}");
        let longest_gap = arrivals
            .windows(2)
            .map(|w| w[1].second - w[0].second)
            .max()
            .unwrap();
        assert!(longest_gap >= 1500, "{longest_gap}");
        let busiest_minute = arrivals
            .iter()
            .map(|a| {
                arrivals
                    .iter()
                    .filter(|b| (a.second..a.second + 60).contains(&b.second))
                    .map(|b| b.tasks)
                    .sum::<u32>()
            })
            .max()
            .unwrap();
        assert!(busiest_minute >= 100, "{busiest_minute}");
    }

    #[test]
    fn on_the_checked_in_trace_backlog_costs_less_than_the_baseline_without_longer_waits() {
        let world = World {
            startup_seconds: 20,
            service_seconds: 30,
            concurrency: 4,
            tail_seconds: 1800,
        };
        let spec: WorkerPoolSpec = serde_json::from_value(serde_json::json!({
            "taskTypes": ["text_generation"],
            "target": {"local": {"command": ["text-worker"]}},
            "maxReplicas": 20,
            "tasksPerReplica": 4,
        }))
        .expect("valid spec");
        let arrivals = parse_trace(TRACE).unwrap();
        let backlog = simulate(&world, &arrivals, &mut Backlog::new(spec, 5));
        let baseline = simulate(&world, &arrivals, &mut HpaKeda::new(4, 20));
        assert_eq!((backlog.unfinished, baseline.unfinished), (0, 0));
        assert!(
            backlog.replica_seconds < baseline.replica_seconds,
            "{backlog:?}\n{baseline:?}"
        );
        assert!(
            backlog.wait_p95_seconds <= baseline.wait_p95_seconds,
            "{backlog:?}\n{baseline:?}"
        );
    }
}
