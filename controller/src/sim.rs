//! A discrete-time simulator to measure an autoscaler: a FIFO queue fed by
//! a trace of tasks (each with its own duration), replicas that take a
//! while to start and run a fixed number of tasks at a time, and an
//! [`Autoscaler`] that looks at the queue every simulated second.
//!
//! Two autoscalers are built in: [`Backlog`], the pure policy driven the
//! way the reconcile loop drives it, and [`HpaKeda`], a model of what a
//! Kubernetes HPA fed by a KEDA queue scaler does. They differ in how
//! replicas leave, as the real systems do: backlog drains idle replicas
//! only; a Deployment scaled down by the HPA deletes the newest pods
//! whatever they run, and a pod's tasks that outlast its grace period are
//! killed and go back to the queue.

use std::collections::VecDeque;

use chrono::{DateTime, TimeDelta, Utc};
use serde::Serialize;

use crate::policy::{decide, History, Observation, QueueLoad, QueueReading};
use crate::spec::WorkerPoolSpec;

pub mod traces;

pub use traces::{Rng, Trace};

/// Tasks arriving at one second of a recorded trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrival {
    pub second: u64,
    pub tasks: u32,
}

/// One task: when it arrives and how long it runs once claimed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Task {
    pub arrival: u64,
    pub service_seconds: u64,
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
    pub name: &'static str,
    /// Seconds from a replica being requested to it claiming tasks, drawn
    /// uniformly from this range for each replica.
    pub startup_seconds: (u64, u64),
    /// Tasks one replica runs at once.
    pub concurrency: u32,
    /// Seconds a replica removed while busy has to finish its tasks; what
    /// is left then is killed and goes back to the queue (Kubernetes'
    /// default `terminationGracePeriodSeconds`).
    pub grace_seconds: u64,
    /// Seconds simulated after the last arrival, so every run ends drained and idle.
    pub tail_seconds: u64,
    /// Seed of the start-up times.
    pub seed: u64,
}

/// What a controller can see at one second.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct View {
    pub pending: u64,
    pub in_flight: u64,
    pub oldest_pending_seconds: u64,
    pub completions_last_minute: u64,
    /// Replicas that exist and are not leaving.
    pub current: u32,
    pub ready: u32,
    pub busy: u32,
}

/// Which replicas a scale-down takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Removal {
    /// backlog's drain: starting replicas, then idle ones; a busy replica
    /// (only ever asked for when the count falls below the busy ones)
    /// finishes its tasks first, however long they take.
    IdleFirst,
    /// A ReplicaSet's choice: pods not ready first, then the most recently
    /// ready, busy or not; a busy pod gets the grace period.
    NewestFirst,
}

pub trait Autoscaler {
    /// Called every simulated second; returns the replica count to scale to
    /// when the autoscaler acts at this second.
    fn tick(&mut self, second: u64, view: &View) -> Option<u32>;

    fn removal(&self) -> Removal {
        Removal::IdleFirst
    }
}

/// Figures of one run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub tasks: u64,
    /// Tasks not started by the end of the run.
    pub unfinished: u64,
    /// Sum over seconds of replicas in existence (starting, serving or leaving).
    pub replica_seconds: u64,
    /// From arrival to the start of the attempt that ran to completion.
    pub wait_p50_seconds: u64,
    pub wait_p95_seconds: u64,
    pub wait_p99_seconds: u64,
    pub wait_max_seconds: u64,
    pub peak_replicas: u32,
    /// Times the autoscaler changed the replica count.
    pub scale_changes: u64,
    /// Replicas started (each pays a start-up time).
    pub cold_starts: u64,
    /// Replicas removed.
    pub stops: u64,
    /// Tasks killed with their replica and run again.
    pub interrupted: u64,
}

struct Replica {
    ready_at: u64,
    /// (finish time, task index) of the tasks it runs.
    running: Vec<(u64, usize)>,
    /// Removed while busy: claims nothing, leaves when done or at this time.
    leaving_by: Option<u64>,
}

impl Replica {
    fn serving(&self) -> bool {
        self.leaving_by.is_none()
    }
}

/// Counters `scale` adds to.
#[derive(Default)]
struct Churn {
    cold_starts: u64,
    stops: u64,
}

/// Replays `tasks` (arrivals ascending) through `world` under `autoscaler`.
pub fn simulate(world: &World, tasks: &[Task], autoscaler: &mut dyn Autoscaler) -> Report {
    let end = tasks.last().map_or(0, |t| t.arrival) + world.tail_seconds;
    let removal = autoscaler.removal();
    let mut rng = Rng::new(world.seed);
    let mut next_task = 0;
    let mut pending: VecDeque<usize> = VecDeque::new();
    let mut started: Vec<Option<u64>> = vec![None; tasks.len()];
    let mut replicas: Vec<Replica> = Vec::new();
    let mut completions: VecDeque<u64> = VecDeque::new();
    let mut churn = Churn::default();
    let (mut replica_seconds, mut peak, mut scale_changes, mut interrupted) = (0, 0, 0, 0);

    for second in 0..=end {
        while next_task < tasks.len() && tasks[next_task].arrival <= second {
            pending.push_back(next_task);
            next_task += 1;
        }
        for replica in &mut replicas {
            replica.running.retain(|&(finish, _)| {
                let done = finish <= second;
                if done {
                    completions.push_back(second);
                }
                !done
            });
            if replica.leaving_by.is_some_and(|by| by <= second) {
                // Killed at the end of its grace period: the tasks run again.
                for &(_, task) in replica.running.iter().rev() {
                    started[task] = None;
                    pending.push_front(task);
                    interrupted += 1;
                }
                replica.running.clear();
            }
        }
        replicas.retain(|r| r.serving() || !r.running.is_empty());
        while completions.front().is_some_and(|&t| t + 60 <= second) {
            completions.pop_front();
        }

        let view = view(second, tasks, &pending, &replicas, completions.len());
        if let Some(target) = autoscaler.tick(second, &view) {
            if target != view.current {
                scale_changes += 1;
                let mut start = || second + rng.between(world.startup_seconds.0, world.startup_seconds.1);
                scale(
                    &mut replicas,
                    target,
                    removal,
                    second,
                    world.grace_seconds,
                    &mut start,
                    &mut churn,
                );
            }
        }

        for replica in replicas
            .iter_mut()
            .filter(|r| r.serving() && r.ready_at <= second)
        {
            while replica.running.len() < world.concurrency as usize {
                let Some(task) = pending.pop_front() else { break };
                started[task] = Some(second);
                replica
                    .running
                    .push((second + tasks[task].service_seconds.max(1), task));
            }
        }
        replica_seconds += replicas.len() as u64;
        peak = peak.max(replicas.len() as u32);
    }

    let mut waits: Vec<u64> = started
        .iter()
        .zip(tasks)
        .filter_map(|(start, task)| start.map(|s| s - task.arrival))
        .collect();
    waits.sort_unstable();
    Report {
        tasks: tasks.len() as u64,
        unfinished: (tasks.len() - waits.len()) as u64,
        replica_seconds,
        wait_p50_seconds: percentile(&waits, 50),
        wait_p95_seconds: percentile(&waits, 95),
        wait_p99_seconds: percentile(&waits, 99),
        wait_max_seconds: waits.last().copied().unwrap_or(0),
        peak_replicas: peak,
        scale_changes,
        cold_starts: churn.cold_starts,
        stops: churn.stops,
        interrupted,
    }
}

fn view(
    second: u64,
    tasks: &[Task],
    pending: &VecDeque<usize>,
    replicas: &[Replica],
    completions: usize,
) -> View {
    let serving = || replicas.iter().filter(|r| r.serving());
    View {
        pending: pending.len() as u64,
        in_flight: replicas.iter().map(|r| r.running.len() as u64).sum(),
        oldest_pending_seconds: pending
            .iter()
            .map(|&t| second - tasks[t].arrival)
            .max()
            .unwrap_or(0),
        completions_last_minute: completions as u64,
        current: serving().count() as u32,
        ready: serving().filter(|r| r.ready_at <= second).count() as u32,
        busy: serving().filter(|r| !r.running.is_empty()).count() as u32,
    }
}

/// Scales to `target` serving replicas. Up: backlog first takes back
/// replicas it was draining (a terminating pod cannot be), then starts new
/// ones. Down: as `removal` says.
fn scale(
    replicas: &mut Vec<Replica>,
    target: u32,
    removal: Removal,
    now: u64,
    grace_seconds: u64,
    start: &mut dyn FnMut() -> u64,
    churn: &mut Churn,
) {
    let target = target as usize;
    let mut serving = replicas.iter().filter(|r| r.serving()).count();
    if removal == Removal::IdleFirst {
        for replica in replicas.iter_mut().filter(|r| !r.serving()) {
            if serving >= target {
                break;
            }
            replica.leaving_by = None;
            serving += 1;
        }
    }
    for _ in serving..target {
        churn.cold_starts += 1;
        replicas.push(Replica {
            ready_at: start(),
            running: Vec::new(),
            leaving_by: None,
        });
    }
    let excess = serving.saturating_sub(target);
    if excess == 0 {
        return;
    }
    // Rank the serving replicas, first to go first.
    let mut order: Vec<usize> = (0..replicas.len()).filter(|&i| replicas[i].serving()).collect();
    match removal {
        Removal::IdleFirst => order.sort_by_key(|&i| {
            let r = &replicas[i];
            (r.ready_at <= now, !r.running.is_empty())
        }),
        Removal::NewestFirst => order.sort_by_key(|&i| {
            let r = &replicas[i];
            (
                r.ready_at <= now,
                std::cmp::Reverse(r.ready_at),
                std::cmp::Reverse(i),
            )
        }),
    }
    let deadline = match removal {
        Removal::IdleFirst => u64::MAX,
        Removal::NewestFirst => now + grace_seconds,
    };
    let chosen: Vec<usize> = order.into_iter().take(excess).collect();
    for &i in &chosen {
        churn.stops += 1;
        replicas[i].leaving_by = Some(deadline);
    }
    // Idle ones (and those still starting) are gone at once.
    replicas.retain(|r| r.serving() || !r.running.is_empty());
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
                ..QueueLoad::default()
            }),
        };
        let now = self.epoch + TimeDelta::seconds(second as i64);
        let decision = decide(&self.spec, &observation, &self.history, now);
        self.history.record(&decision, now);
        Some(decision.replicas)
    }
}

/// A reference, not an autoscaler anyone runs: a pool of fixed size, sized
/// in hindsight, present from the trace's first arrival until its last task
/// has finished. On a stationary load (the Poisson traces) a well-chosen
/// fixed pool is about the cheapest way to reach a given wait, so it shows
/// how much saving any policy can still find there.
pub struct FixedPool {
    replicas: u32,
    first_arrival: u64,
    last_arrival: u64,
}

impl FixedPool {
    pub fn new(replicas: u32, tasks: &[Task]) -> FixedPool {
        FixedPool {
            replicas,
            first_arrival: tasks.first().map_or(0, |t| t.arrival),
            last_arrival: tasks.last().map_or(0, |t| t.arrival),
        }
    }
}

impl Autoscaler for FixedPool {
    fn tick(&mut self, second: u64, view: &View) -> Option<u32> {
        let working = view.pending + view.in_flight > 0;
        let open = (self.first_arrival..=self.last_arrival).contains(&second);
        Some(if open || working { self.replicas } else { 0 })
    }
}

/// A Kubernetes HPA on a KEDA queue-length metric (`AverageValue`), with
/// their defaults: KEDA polls every 30 s (`pollingInterval`), wakes a
/// deployment at zero to one replica when the metric is non-zero and puts
/// it back to zero `cooldownPeriod` (300 s) after the metric was last
/// non-zero; in between, the HPA syncs every 15 s with
/// `ceil(metric / target)` unless `metric / (current × target)` is within
/// the 10 % tolerance, a 300 s scale-down stabilisation window and its
/// default scale-up limit (+4 pods or +100 % per 15 s, whichever is more).
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

    /// The same with KEDA's `cooldownPeriod` and the HPA's
    /// `behavior.scaleDown.stabilizationWindowSeconds` set to these.
    pub fn with_windows(mut self, scale_down_window_seconds: u64, cooldown_period: u64) -> HpaKeda {
        self.hpa_scale_down_window_seconds = scale_down_window_seconds;
        self.keda_cooldown_seconds = cooldown_period;
        self
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
            metric.div_ceil(self.target_per_replica) as u32
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

    fn removal(&self) -> Removal {
        Removal::NewestFirst
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world() -> World {
        World {
            name: "test",
            startup_seconds: (20, 20),
            concurrency: 2,
            grace_seconds: 30,
            tail_seconds: 60,
            seed: 1,
        }
    }

    fn batch(arrival: u64, count: usize, service_seconds: u64) -> Vec<Task> {
        vec![
            Task {
                arrival,
                service_seconds
            };
            count
        ]
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
        let report = simulate(&world(), &batch(0, 4, 30), &mut Fixed(1));
        assert_eq!((report.tasks, report.unfinished), (4, 0));
        assert_eq!((report.wait_p50_seconds, report.wait_max_seconds), (20, 50));
        assert_eq!(report.replica_seconds, 61, "one replica for seconds 0..=60");
        assert_eq!((report.cold_starts, report.stops, report.interrupted), (1, 0, 0));
    }

    fn replica(ready_at: u64, running: &[(u64, usize)]) -> Replica {
        Replica {
            ready_at,
            running: running.to_vec(),
            leaving_by: None,
        }
    }

    #[test]
    fn backlog_removes_idle_replicas_and_lets_busy_ones_finish() {
        let mut replicas = vec![replica(0, &[(400, 0)]), replica(0, &[]), replica(30, &[])];
        let mut churn = Churn::default();
        scale(
            &mut replicas,
            0,
            Removal::IdleFirst,
            10,
            30,
            &mut || 45,
            &mut churn,
        );
        assert_eq!(replicas.len(), 1, "the idle and the starting replica go at once");
        assert_eq!(replicas[0].leaving_by, Some(u64::MAX), "no deadline on a drain");

        scale(
            &mut replicas,
            2,
            Removal::IdleFirst,
            11,
            30,
            &mut || 45,
            &mut churn,
        );
        assert_eq!(
            replicas.len(),
            2,
            "the draining replica is taken back, one is started"
        );
        assert!(replicas[0].serving());
        assert_eq!(replicas[1].ready_at, 45);
        assert_eq!((churn.stops, churn.cold_starts), (3, 1));
    }

    #[test]
    fn a_replica_set_removes_the_newest_pods_busy_or_not() {
        // The oldest pod is idle; the newest runs a task: Kubernetes takes the newest.
        let mut replicas = vec![replica(0, &[]), replica(5, &[(400, 0)])];
        let mut churn = Churn::default();
        scale(
            &mut replicas,
            1,
            Removal::NewestFirst,
            10,
            30,
            &mut || 45,
            &mut churn,
        );
        assert_eq!(replicas.len(), 2, "the busy pod is terminating");
        assert_eq!(replicas[1].leaving_by, Some(40), "with its grace period");
        assert!(replicas[0].serving());
    }

    #[test]
    fn a_task_outlasting_the_grace_period_runs_again() {
        /// One replica, a second at 30 s, back to one at 40 s.
        struct UpThenDown;
        impl Autoscaler for UpThenDown {
            fn tick(&mut self, second: u64, _: &View) -> Option<u32> {
                match second {
                    0 => Some(1),
                    30 => Some(2),
                    55 => Some(1),
                    _ => None,
                }
            }
            fn removal(&self) -> Removal {
                Removal::NewestFirst
            }
        }
        // Two long tasks fill the first replica, the third starts on the
        // second replica at 50 and is killed at 85, then waits for a slot.
        let mut tasks = batch(0, 2, 100);
        tasks.extend(batch(40, 1, 100));
        let world = World {
            tail_seconds: 200,
            ..world()
        };
        let report = simulate(&world, &tasks, &mut UpThenDown);
        assert_eq!(report.interrupted, 1);
        assert_eq!(
            report.wait_max_seconds,
            120 - 40,
            "restarted when a slot freed at 120"
        );
    }

    #[test]
    fn a_fixed_pool_serves_from_the_first_arrival_until_the_last_task_finishes() {
        // Two replicas from second 10 (ready at 30); four 30 s tasks on four
        // slots finish at 60; the pool is gone from second 60 to the end (120).
        let tasks = batch(10, 4, 30);
        let report = simulate(&world(), &tasks, &mut FixedPool::new(2, &tasks));
        assert_eq!(
            (report.tasks, report.unfinished, report.wait_max_seconds),
            (4, 0, 20)
        );
        assert_eq!(report.replica_seconds, 2 * 50, "two replicas for seconds 10..60");
        assert_eq!(
            (report.scale_changes, report.cold_starts, report.stops),
            (2, 2, 2)
        );
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
    fn the_matched_baseline_takes_the_given_windows() {
        let mut baseline = HpaKeda::new(10, 20).with_windows(60, 90);
        let at = |current, metric| View {
            pending: metric,
            current,
            ..View::default()
        };
        assert_eq!(baseline.tick(15, &at(10, 100)), Some(10));
        assert_eq!(baseline.tick(60, &at(10, 20)), Some(10), "within 60 s of 10");
        assert_eq!(baseline.tick(90, &at(10, 20)), Some(2));
        assert_eq!(
            baseline.tick(150, &at(2, 0)),
            Some(1),
            "the HPA goes down to its minimum; KEDA's cooldown is not over (active at 90)"
        );
        assert_eq!(
            baseline.tick(180, &at(1, 0)),
            Some(0),
            "the 90 s cooldown has passed"
        );
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
}
