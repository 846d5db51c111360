//! The scaling policy: `decide(spec, observation, history, now)` is a pure
//! function (no I/O, no clock) from what the controller saw to how many
//! replicas a pool should run, and why.
//!
//! Each tick puts the pool in one [`Phase`]:
//!
//! ```text
//!            paused ──▶ Paused (hold)
//!   queue unreadable ──▶ Unobserved (hold) ──failureThreshold──▶ Fallback
//!        at zero, fewer than activationTasks pending ──▶ Dormant (stay at 0)
//!        at zero, activationTasks pending (or min > 0) ──▶ Activating
//!        running, work pending or in flight ──▶ Serving
//!        running, idle, minReplicas 0 ──▶ CoolingDown (≥ 1) ──cooldownPeriod──▶ Deactivating (→ 0)
//! ```
//!
//! The recommendation comes from load. Without `targetQueueSeconds` it is
//! HPA's queue-length rule, `ceil((pending + inFlight) / tasksPerReplica)`.
//! With it, the pool is sized by Little's law from measured signals: the
//! arrival rate (completions plus the change in queue length over the last
//! minute), the mean task duration (average in flight over completions per
//! second, remembered across idle spells), both averaged over a couple of
//! minutes, and the age of the oldest pending task. Busy slots are
//! `arrivals/s × duration` (the mean, so the windows need not hold the
//! swings of a Poisson load; in flight before a minute is measured), and
//! pending tasks get the slots that start them all within the target:
//! `pending × min(1, duration / targetQueueSeconds)`, or one each once the
//! oldest has waited the target. Either way no move is made while the load
//! is within the direction's `tolerance` of the current capacity (HPA's
//! 10 % band).
//!
//! Serving and cooling down follow HPA: the recommendation is stabilised
//! over the scale-up window (lowest recommendation wins) and the scale-down
//! window (highest wins), limited by the rate policies (the most permissive
//! policy of a direction applies, as HPA's `selectPolicy: Max`; at most
//! one step per period in each direction once the pool runs, as HPA acts
//! once per sync, so a batch that arrives over a few ticks is met with one
//! step, not one per tick), then
//! bounded by `max(minReplicas, busy replicas)` and `maxReplicas`. A
//! removal smaller than `scaleDown.minPercentPerStep` of the pool waits
//! for more idle replicas (fewer, larger steps as a batch tails off). Removal
//! only ever takes idle replicas (the reconcile loop drains them), which
//! is what makes a short scale-down window safe. Activation skips the
//! scale-up window: a pool at zero with work starts at once. Deactivation
//! skips the scale-down window (after `cooldownPeriod` with nothing pending
//! or in flight there is nothing left to protect) but not the rate limits,
//! and waits while a retry falls due within the cooldown. A reading whose
//! counts hit the depth cap is a lower bound: the pool never shrinks on it.
//!
//! The caller keeps a [`History`] per pool and folds each decision into it
//! with [`History::record`], itself pure.

use std::collections::VecDeque;
use std::fmt;

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use crate::spec::{Direction, RateLimits, WorkerPoolSpec};

/// Recommendations and scale events kept per pool, at most. The age bound
/// (the longest window or period of the spec) normally keeps far fewer.
const MAX_HISTORY_ENTRIES: usize = 4096;

/// The span the arrival rate and the task duration are measured over: the
/// queue's completion count covers the last minute.
const SIGNAL_WINDOW: TimeDelta = TimeDelta::seconds(60);

/// Time constant of the averages of those measurements: a minute's
/// estimate of a Poisson rate is off by ±13 %, more than the tolerance.
const SMOOTHING: TimeDelta = TimeDelta::seconds(120);

/// What the controller saw this tick.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    /// Replicas the backend runs or is starting.
    pub current_replicas: u32,
    /// Of those, replicas that are up.
    pub ready_replicas: u32,
    pub queue: QueueReading,
}

/// The pool's queue, or why it could not be read.
#[derive(Clone, Debug, PartialEq)]
pub enum QueueReading {
    Read(QueueLoad),
    /// The depth query or the worker registry failed.
    Failed {
        error: String,
    },
}

/// Load on the pool's task types, summed.
///
/// Retries waiting for a later `run_at` (`scheduled`) do not add replicas:
/// counting them would keep replicas idling through whole backoffs. They
/// keep one replica while one falls due within the cooldown, and a pool at
/// zero is told when the next falls due ([`Decision::wake_at`]). Blocked
/// tasks need nothing: the queue notifies when they become runnable.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct QueueLoad {
    /// Runnable now.
    pub pending: u64,
    /// Claimed or running.
    pub in_flight: u64,
    /// Age of the oldest runnable task.
    pub oldest_pending_seconds: f64,
    /// Tasks completed in the last minute.
    pub completions_per_minute: u64,
    /// Replicas holding at least one task (from the worker registry).
    pub busy_replicas: u32,
    /// Waiting for a later `run_at` (retries in backoff).
    pub scheduled: u64,
    /// Seconds until the earliest of those falls due.
    pub next_scheduled_seconds: Option<f64>,
    /// Waiting for tasks they depend on.
    pub blocked: u64,
    /// A count reached the depth query's cap: the figures are lower bounds.
    pub capped: bool,
}

/// Where the pool stands this tick; see the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Paused,
    /// The queue could not be read this many times in a row; holding.
    Unobserved {
        failures: u32,
    },
    /// The queue could not be read this many times in a row; fallback replicas.
    Fallback {
        failures: u32,
    },
    Dormant,
    Activating,
    Serving,
    CoolingDown,
    Deactivating,
}

impl Phase {
    /// A stable label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Paused => "paused",
            Phase::Unobserved { .. } => "unobserved",
            Phase::Fallback { .. } => "fallback",
            Phase::Dormant => "dormant",
            Phase::Activating => "activating",
            Phase::Serving => "serving",
            Phase::CoolingDown => "cooling_down",
            Phase::Deactivating => "deactivating",
        }
    }
}

/// How many replicas to run, and why in words.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub replicas: u32,
    /// The replicas the decision started from (the observation's current).
    pub from: u32,
    pub phase: Phase,
    /// E.g. "scale up 1→4: 37 pending + 3 in flight at 10 per replica".
    pub reason: String,
    /// The pool is left at zero with a retry falling due then: decide again
    /// at that time, since no notification announces it.
    pub wake_at: Option<DateTime<Utc>>,
    memo: Memo,
}

impl Decision {
    pub fn changes_replicas(&self) -> bool {
        self.replicas != self.from
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

/// What [`History::record`] keeps of a decision.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Memo {
    reading: Reading,
    /// How far back the spec's windows and periods look.
    retention: TimeDelta,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Reading {
    /// Paused: the queue was not consulted.
    Skipped,
    Failed,
    Read {
        /// The load's recommendation before stabilisation, rate limits and bounds.
        recommendation: u32,
        /// Nothing pending and nothing in flight.
        idle: bool,
        sample: LoadSample,
        signals: Smoothed,
    },
}

/// The queue's length at one read, for the arrival rate and the average
/// work in flight over the last minute.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoadSample {
    pub at: DateTime<Utc>,
    pub pending: u64,
    pub in_flight: u64,
}

/// What a pool's past decisions leave for the next ones: recommendations
/// (stabilisation windows), replica changes (rate limits), consecutive
/// failed reads (fallback), the start of the current idle spell
/// (cooldown), the last minute of queue lengths (arrival rate) and the
/// measured task duration. Bounded by age and by [`MAX_HISTORY_ENTRIES`].
///
/// Plain data: it serialises, so a restarted or standby controller can
/// carry on with the same windows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct History {
    /// Oldest first. A run of equal recommendations keeps only its latest
    /// time, which answers "was this value recommended within the window"
    /// exactly.
    recommendations: VecDeque<(DateTime<Utc>, u32)>,
    /// Replicas added (positive) or removed (negative), oldest first.
    scale_events: VecDeque<(DateTime<Utc>, i64)>,
    consecutive_failures: u32,
    idle_since: Option<DateTime<Utc>>,
    /// Reads of the last minute, and the newest one before it. Oldest first.
    load_samples: VecDeque<LoadSample>,
    /// Arrival rate and task duration, smoothed.
    signals: Smoothed,
}

/// The arrival rate and the mean task duration, each an exponentially
/// weighted average of the last minutes' measurements.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Smoothed {
    pub at: Option<DateTime<Utc>>,
    pub arrivals_per_second: Option<f64>,
    /// A property of the tasks: it outlives idle spells and sizes the next burst.
    pub service_seconds: Option<f64>,
}

impl History {
    /// Folds a decision in. Call it for every decision, applied or not: a
    /// change the backend failed to make then still counts against the rate
    /// limits, which errs on the side of caution.
    pub fn record(&mut self, decision: &Decision, now: DateTime<Utc>) {
        match decision.memo.reading {
            Reading::Skipped => {}
            Reading::Failed => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                // Nobody knows what the queue did meanwhile: idle time
                // counts again from the next idle read.
                self.idle_since = None;
            }
            Reading::Read {
                recommendation,
                idle,
                sample,
                signals,
            } => {
                self.consecutive_failures = 0;
                self.idle_since = idle.then(|| self.idle_since.unwrap_or(now));
                match self.recommendations.back_mut() {
                    Some((at, last)) if *last == recommendation => *at = now,
                    _ => self.recommendations.push_back((now, recommendation)),
                }
                self.signals = signals;
                self.load_samples.push_back(sample);
                // Keep the newest sample at least a window old, and those after it.
                while self.load_samples.len() > MAX_HISTORY_ENTRIES
                    || self
                        .load_samples
                        .get(1)
                        .is_some_and(|s| s.at <= now - SIGNAL_WINDOW)
                {
                    self.load_samples.pop_front();
                }
            }
        }
        if decision.changes_replicas() {
            let change = i64::from(decision.replicas) - i64::from(decision.from);
            self.scale_events.push_back((now, change));
        }
        let horizon = now - decision.memo.retention;
        prune(&mut self.recommendations, horizon);
        prune(&mut self.scale_events, horizon);
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// Since when the pool has had nothing pending and nothing in flight.
    pub fn idle_since(&self) -> Option<DateTime<Utc>> {
        self.idle_since
    }

    /// The mean task duration last measured, in seconds.
    pub fn service_seconds(&self) -> Option<f64> {
        self.signals.service_seconds
    }

    /// Entries held, for tests and metrics.
    pub fn len(&self) -> usize {
        self.recommendations.len() + self.scale_events.len() + self.load_samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Net replicas added since `cutoff` (exclusive).
    fn change_since(&self, cutoff: DateTime<Utc>) -> i64 {
        self.scale_events
            .iter()
            .filter(|(at, _)| *at > cutoff)
            .map(|(_, change)| change)
            .sum()
    }

    /// The reads of the last minute, `now`'s included, once the history
    /// reaches a full minute back: (the newest read at least a minute old,
    /// the reads after it).
    fn last_minute<'a>(&'a self, now: &'a LoadSample) -> Option<(&'a LoadSample, Vec<&'a LoadSample>)> {
        let start = self
            .load_samples
            .iter()
            .rev()
            .find(|s| s.at <= now.at - SIGNAL_WINDOW)?;
        let after = self
            .load_samples
            .iter()
            .filter(|s| s.at > start.at && s.at < now.at)
            .chain(std::iter::once(now))
            .collect();
        Some((start, after))
    }
}

fn prune<T>(entries: &mut VecDeque<(DateTime<Utc>, T)>, horizon: DateTime<Utc>) {
    while entries.front().is_some_and(|(at, _)| *at < horizon) || entries.len() > MAX_HISTORY_ENTRIES {
        entries.pop_front();
    }
}

/// Decides how many replicas the pool should run now.
pub fn decide(
    spec: &WorkerPoolSpec,
    observation: &Observation,
    history: &History,
    now: DateTime<Utc>,
) -> Decision {
    let policy = Policy {
        settings: Settings::of(spec),
        history,
        now,
        current: observation.current_replicas,
    };
    if spec.paused {
        return policy.decision(
            observation.current_replicas,
            Phase::Paused,
            "paused".to_string(),
            Reading::Skipped,
        );
    }
    match &observation.queue {
        QueueReading::Failed { error } => policy.unreadable(error),
        QueueReading::Read(load) => policy.read(load),
    }
}

/// The spec's numbers, defaults applied. `validate()` rejects out-of-range
/// values; clamping here keeps `decide` total for specs that skipped it.
struct Settings {
    min: u32,
    max: u32,
    tasks_per_replica: u32,
    activation_tasks: u64,
    target_queue_seconds: Option<u32>,
    cooldown: TimeDelta,
    up_window: TimeDelta,
    down_window: TimeDelta,
    up: RateLimits,
    down: RateLimits,
    up_tolerance: f64,
    down_tolerance: f64,
    min_removal_percent: u32,
    fallback: Option<(u32, u32)>,
    retention: TimeDelta,
}

impl Settings {
    fn of(spec: &WorkerPoolSpec) -> Settings {
        let count = |value: i32| u32::try_from(value).unwrap_or(0);
        let seconds = |value: u32| TimeDelta::seconds(i64::from(value));
        let fraction = |value: f64| {
            if value.is_finite() {
                value.clamp(0.0, 1.0)
            } else {
                0.0
            }
        };
        let max = count(spec.max_replicas).max(1);
        let (up, down) = (spec.rate_limits(Direction::Up), spec.rate_limits(Direction::Down));
        let up_window = spec.stabilization_window_seconds(Direction::Up);
        let down_window = spec.stabilization_window_seconds(Direction::Down);
        let longest = [up_window, down_window, up.period_seconds, down.period_seconds];
        Settings {
            min: count(spec.min_replicas).min(max),
            max,
            tasks_per_replica: count(spec.tasks_per_replica).max(1),
            activation_tasks: u64::from(count(spec.activation_tasks).max(1)),
            target_queue_seconds: spec.target_queue_seconds.map(count).filter(|s| *s > 0),
            cooldown: seconds(count(spec.cooldown_period)),
            up_window: seconds(up_window),
            down_window: seconds(down_window),
            up,
            down,
            up_tolerance: fraction(spec.tolerance(Direction::Up)),
            down_tolerance: fraction(spec.tolerance(Direction::Down)),
            min_removal_percent: spec.min_removal_percent().min(100),
            fallback: spec
                .fallback
                .as_ref()
                .map(|f| (count(f.failure_threshold).max(1), count(f.replicas).clamp(1, max))),
            retention: seconds(longest.into_iter().max().unwrap_or(0)),
        }
    }
}

struct Policy<'a> {
    settings: Settings,
    history: &'a History,
    now: DateTime<Utc>,
    current: u32,
}

/// The load's own answer, before stabilisation, rate limits and bounds.
struct Recommendation {
    replicas: u32,
    /// What it is based on, e.g. "37 pending + 3 in flight at 10 per replica".
    basis: String,
    /// The signals after this read.
    signals: Smoothed,
}

/// The fewest replicas this tick allows, and why.
struct Floor {
    replicas: u32,
    note: String,
}

/// What the last minute of reads says about the pool's work.
struct Signals {
    /// Tasks arriving per second (completions plus growth of the queue).
    arrivals_per_second: Option<f64>,
    /// Mean task duration measured now (Little's law: average in flight
    /// over completions per second), if the last minute allows it.
    measured_service_seconds: Option<f64>,
}

impl Settings {
    fn limits(&self, direction: Direction) -> RateLimits {
        match direction {
            Direction::Up => self.up,
            Direction::Down => self.down,
        }
    }
}

impl Policy<'_> {
    fn decision(&self, replicas: u32, phase: Phase, why: String, reading: Reading) -> Decision {
        let from = self.current;
        let verb = match replicas.cmp(&from) {
            std::cmp::Ordering::Greater => format!("scale up {from}→{replicas}"),
            std::cmp::Ordering::Less => format!("scale down {from}→{replicas}"),
            std::cmp::Ordering::Equal => format!("hold {replicas}"),
        };
        Decision {
            replicas,
            from,
            phase,
            reason: format!("{verb}: {why}"),
            wake_at: None,
            memo: Memo {
                reading,
                retention: self.settings.retention,
            },
        }
    }

    /// Holds, then falls back; never goes to zero for want of a reading,
    /// and never below the current count: removing replicas safely needs
    /// the registry's busy list, which is as unreadable as the queue.
    fn unreadable(&self, error: &str) -> Decision {
        let failures = self.history.consecutive_failures.saturating_add(1);
        match self.settings.fallback {
            Some((threshold, replicas)) if failures >= threshold => {
                let mut why = format!(
                    "fallback after {failures} failed queue reads (failureThreshold {threshold}): {error}"
                );
                if replicas < self.current {
                    why = format!(
                        "{why}; fallback is {replicas}, but replicas are only removed once the queue and the registry can be read"
                    );
                }
                self.decision(
                    replicas.max(self.current),
                    Phase::Fallback { failures },
                    why,
                    Reading::Failed,
                )
            }
            Some((threshold, _)) => self.decision(
                self.current,
                Phase::Unobserved { failures },
                format!("queue unreadable ({failures} of {threshold} before fallback): {error}"),
                Reading::Failed,
            ),
            None => self.decision(
                self.current,
                Phase::Unobserved { failures },
                format!("queue unreadable ({failures} in a row, no fallback): {error}"),
                Reading::Failed,
            ),
        }
    }

    fn read(&self, load: &QueueLoad) -> Decision {
        let settings = &self.settings;
        let sample = LoadSample {
            at: self.now,
            pending: load.pending,
            in_flight: load.in_flight,
        };
        let recommendation = self.recommend(load, &sample);
        let idle = load.pending == 0 && load.in_flight == 0;
        let reading = Reading::Read {
            recommendation: recommendation.replicas,
            idle,
            sample,
            signals: recommendation.signals,
        };
        let mut floor = if load.busy_replicas > settings.min {
            Floor {
                replicas: load.busy_replicas,
                note: format!(
                    "kept at {} busy replicas, which are never removed",
                    load.busy_replicas
                ),
            }
        } else {
            Floor {
                replicas: settings.min,
                note: format!("raised to minReplicas {}", settings.min),
            }
        };
        if load.capped && self.current > floor.replicas {
            floor = Floor {
                replicas: self.current,
                note: format!(
                    "held at {}: the depth counts reached their cap, so the load is at least this and no reason to shrink",
                    self.current
                ),
            };
        }
        let due = load.next_scheduled_seconds.map(|s| s.max(0.0));
        let wake_at = due.map(|s| self.now + TimeDelta::milliseconds((s * 1000.0).ceil() as i64));

        if self.current == 0 {
            if load.pending < settings.activation_tasks && floor.replicas == 0 {
                let mut why = if load.pending == 0 {
                    "nothing pending".to_string()
                } else {
                    format!(
                        "{} pending, activationTasks is {}",
                        load.pending, settings.activation_tasks
                    )
                };
                why.push_str(&waiting_note(load));
                let mut decision = self.decision(0, Phase::Dormant, why, reading);
                decision.wake_at = wake_at;
                return decision;
            }
            let (replicas, why) = self.serve(&recommendation, &floor);
            return self.decision(replicas, Phase::Activating, why, reading);
        }

        if idle && floor.replicas == 0 {
            let idle_for = self.now - self.history.idle_since.unwrap_or(self.now);
            let (idle_s, cooldown_s) = (idle_for.num_seconds(), settings.cooldown.num_seconds());
            let retry_soon = due.filter(|s| *s <= cooldown_s as f64);
            if idle_for >= settings.cooldown && retry_soon.is_none() {
                let mut why = format!("idle for {idle_s} s (cooldownPeriod {cooldown_s})");
                let replicas = self.rate_limit(0);
                if let (Some(ago), true) = (self.stepped_within_period(Direction::Down), replicas > 0) {
                    why.push_str("; ");
                    why.push_str(&held_by_period(replicas, Direction::Down, ago, &settings.down));
                } else if replicas > 0 {
                    why.push_str(&format!(
                        "; limited to {replicas} by scaleDown ({}per {} s)",
                        describe_limits(&settings.down),
                        settings.down.period_seconds
                    ));
                }
                why.push_str(&waiting_note(load));
                let mut decision = self.decision(replicas, Phase::Deactivating, why, reading);
                decision.wake_at = wake_at.filter(|_| replicas == 0);
                return decision;
            }
            let note = match retry_soon {
                Some(seconds) => format!(
                    "kept at 1: a retry falls due in {seconds:.0} s, within cooldownPeriod {cooldown_s}"
                ),
                None => format!("kept at 1: idle for {idle_s} s, zero after cooldownPeriod {cooldown_s}"),
            };
            let cooling = Floor { replicas: 1, note };
            let (replicas, why) = self.serve(&recommendation, &cooling);
            return self.decision(replicas, Phase::CoolingDown, why, reading);
        }

        let (replicas, why) = self.serve(&recommendation, &floor);
        self.decision(replicas, Phase::Serving, why, reading)
    }

    /// Arrival rate and task duration over the last minute of reads.
    fn signals(&self, load: &QueueLoad, now: &LoadSample) -> Signals {
        let Some((start, reads)) = self.history.last_minute(now) else {
            return Signals {
                arrivals_per_second: None,
                measured_service_seconds: None,
            };
        };
        let span = (now.at - start.at).as_seconds_f64().max(1.0);
        let minute = SIGNAL_WINDOW.as_seconds_f64();
        // Completions are counted over exactly a minute; scale them to the span.
        let completed = load.completions_per_minute as f64 * span / minute;
        let length = |s: &LoadSample| (s.pending + s.in_flight) as f64;
        let arrived = (completed + length(now) - length(start)).max(0.0);
        // Time-weighted average in flight over the span, each read
        // standing for the time since the previous one.
        let mut previous = start.at;
        let mut weighted = 0.0;
        for read in &reads {
            weighted += read.in_flight as f64 * (read.at - previous).as_seconds_f64();
            previous = read.at;
        }
        let average_in_flight = weighted / span;
        let throughput = load.completions_per_minute as f64 / minute;
        Signals {
            arrivals_per_second: Some(arrived / span),
            measured_service_seconds: (throughput > 0.0 && average_in_flight > 0.0)
                .then(|| average_in_flight / throughput),
        }
    }

    /// HPA's queue-length rule, or Little's law with `targetQueueSeconds`;
    /// then HPA's tolerance around the current capacity.
    fn recommend(&self, load: &QueueLoad, now: &LoadSample) -> Recommendation {
        let per_replica = u64::from(self.settings.tasks_per_replica);
        let signals = self.smoothed(self.signals(load, now));
        let service_seconds = signals.service_seconds;
        let (slots, basis) = match (self.settings.target_queue_seconds, service_seconds) {
            (Some(target), Some(duration)) => {
                let target = f64::from(target);
                // The mean, not this instant's count: the queue absorbs
                // the swings, and the windows need not hold their peaks.
                let busy = signals
                    .arrivals_per_second
                    .map_or(load.in_flight as f64, |rate| rate * duration);
                let late = load.oldest_pending_seconds >= target;
                let share = if late { 1.0 } else { (duration / target).min(1.0) };
                let waiting = load.pending as f64 * share;
                let arrivals = signals
                    .arrivals_per_second
                    .map_or("unmeasured".to_string(), |rate| format!("{rate:.2}/s"));
                let pending_basis = if late {
                    format!(
                        "{} pending, the oldest {:.0} s old (targetQueueSeconds {target:.0}): a slot each",
                        load.pending, load.oldest_pending_seconds
                    )
                } else {
                    format!(
                        "{} pending to start within targetQueueSeconds {target:.0}",
                        load.pending
                    )
                };
                let basis = format!(
                    "{} in flight, arrivals {arrivals}, tasks take {duration:.1} s: {busy:.1} busy slots; {pending_basis}: {waiting:.1} slots; at {per_replica} per replica",
                    load.in_flight
                );
                (busy + waiting, basis)
            }
            (target, _) => {
                let mut basis = format!(
                    "{} pending + {} in flight at {per_replica} per replica",
                    load.pending, load.in_flight
                );
                if target.is_some() {
                    basis.push_str(" (task duration not measured yet)");
                }
                ((load.pending + load.in_flight) as f64, basis)
            }
        };
        let wanted = slots / per_replica as f64;
        let mut replicas = saturate((wanted - 1e-9).max(0.0).ceil() as u64);
        let mut basis = basis;
        if load.capped {
            basis.push_str(" (counts capped: at least this)");
        }
        // HPA's tolerance: no move while the load is within the band
        // around what the current replicas absorb.
        if self.current > 0 {
            let ratio = wanted / f64::from(self.current);
            let (tolerance, moving) = if ratio > 1.0 {
                (self.settings.up_tolerance, replicas > self.current)
            } else {
                (self.settings.down_tolerance, replicas < self.current)
            };
            if moving && (ratio - 1.0).abs() <= tolerance {
                basis = format!(
                    "{basis}: within tolerance {tolerance} of {} replicas",
                    self.current
                );
                replicas = self.current;
            }
        }
        Recommendation {
            replicas,
            basis,
            signals,
        }
    }

    /// Folds this read's measurements into the averages, each reading
    /// weighing `1 - e^(-elapsed / SMOOTHING)`. An arrival rate older than
    /// two smoothing spans is stale and dropped; a duration is kept.
    fn smoothed(&self, measured: Signals) -> Smoothed {
        let previous = self.history.signals;
        let elapsed = previous.at.map(|at| (self.now - at).as_seconds_f64().max(0.0));
        let span = SMOOTHING.as_seconds_f64();
        let weight = elapsed.map_or(1.0, |e| 1.0 - (-e / span).exp());
        let fold = |old: Option<f64>, new: Option<f64>| match (old, new) {
            (Some(old), Some(new)) => Some(old + (new - old) * weight),
            (old, None) => old,
            (None, new) => new,
        };
        let fresh = elapsed.is_some_and(|e| e <= 2.0 * span);
        let arrivals = previous.arrivals_per_second.filter(|_| fresh);
        Smoothed {
            at: Some(self.now),
            arrivals_per_second: fold(arrivals, measured.arrivals_per_second),
            service_seconds: fold(previous.service_seconds, measured.measured_service_seconds),
        }
    }

    /// Stabilise, rate-limit, bound; say what changed the recommendation.
    fn serve(&self, recommendation: &Recommendation, floor: &Floor) -> (u32, String) {
        let settings = &self.settings;
        let wanted = recommendation.replicas;
        let mut notes = Vec::new();

        let stabilized = if self.current == 0 {
            wanted // activation does not wait for the scale-up window
        } else {
            self.stabilize(wanted)
        };
        if stabilized != wanted {
            let (direction, window) = if stabilized > wanted {
                ("scaleDown", settings.down_window)
            } else {
                ("scaleUp", settings.up_window)
            };
            notes.push(format!(
                "kept at {stabilized} by the {} s {direction} window",
                window.num_seconds()
            ));
        }

        // maxReplicas is absolute: apply it before the rate limit, so the
        // reason names it, and again after the floors.
        let capped = stabilized.min(settings.max);
        let cap_note = format!("capped at maxReplicas {}", settings.max);
        if capped < stabilized {
            notes.push(cap_note.clone());
        }

        let limited = self.rate_limit(capped);
        let direction = if capped > self.current {
            Direction::Up
        } else {
            Direction::Down
        };
        let stepped_ago = self
            .stepped_within_period(direction)
            .filter(|_| capped != self.current);
        if let (Some(ago), true) = (stepped_ago, limited != capped) {
            notes.push(held_by_period(
                limited,
                direction,
                ago,
                &settings.limits(direction),
            ));
        } else if limited != capped {
            let (direction, limits) = if limited < capped {
                ("scaleUp", settings.up)
            } else {
                ("scaleDown", settings.down)
            };
            notes.push(format!(
                "limited to {limited} by {direction} ({}per {} s)",
                describe_limits(&limits),
                limits.period_seconds
            ));
        }

        let floored = limited.max(floor.replicas);
        if floored > limited && floored <= settings.max {
            notes.push(floor.note.clone());
        }
        let stepped = self.min_removal(floored);
        if stepped != floored {
            notes.push(format!(
                "held at {stepped}: removing {} of {stepped} is less than scaleDown.minPercentPerStep {} %, waiting for more idle replicas",
                stepped - floored,
                settings.min_removal_percent
            ));
        }
        let bounded = stepped.min(settings.max);
        if bounded < stepped && !notes.contains(&cap_note) {
            notes.push(cap_note);
        }

        let mut why = recommendation.basis.clone();
        if !notes.is_empty() {
            why = format!("{why} wants {wanted}; {}", notes.join("; "));
        }
        (bounded, why)
    }

    /// HPA's stabilisation: up to the lowest recommendation within the
    /// scale-up window, down to the highest within the scale-down window,
    /// and no move when the current count lies between them.
    fn stabilize(&self, wanted: u32) -> u32 {
        let up_cutoff = self.now - self.settings.up_window;
        let down_cutoff = self.now - self.settings.down_window;
        let (mut lowest, mut highest) = (wanted, wanted);
        for &(at, recommended) in &self.history.recommendations {
            if at > up_cutoff {
                lowest = lowest.min(recommended);
            }
            if at > down_cutoff {
                highest = highest.max(recommended);
            }
        }
        self.current.clamp(lowest, highest)
    }

    /// HPA's rate limits, measured from the replica count at the start of
    /// the period. Of a direction's limits the most permissive applies; a
    /// percentage step adds at least one replica, so a percent-only policy
    /// still wakes a pool from zero.
    fn rate_limit(&self, wanted: u32) -> u32 {
        let current = self.current;
        if wanted > current {
            let limits = self.settings.up;
            // Activation is exempt: a pool at zero starts at once.
            if current > 0 && self.stepped_within_period(Direction::Up).is_some() {
                return current;
            }
            let start = self.period_start(&limits);
            let by_count = limits.replicas_per_step.map(|n| start + u64::from(n));
            let by_percent = limits
                .percent_per_step
                .map(|p| start + (start * u64::from(p)).div_ceil(100).max(1));
            match by_count.into_iter().chain(by_percent).max() {
                Some(limit) => wanted.min(saturate(limit).max(current)),
                None => wanted,
            }
        } else if wanted < current {
            let limits = self.settings.down;
            if self.stepped_within_period(Direction::Down).is_some() {
                return current;
            }
            let start = self.period_start(&limits);
            let by_count = limits
                .replicas_per_step
                .map(|n| start.saturating_sub(u64::from(n)));
            let by_percent = limits
                .percent_per_step
                .map(|p| start.saturating_sub((start * u64::from(p)).div_ceil(100)));
            match by_count.into_iter().chain(by_percent).min() {
                Some(limit) => wanted.max(saturate(limit).min(current)),
                None => wanted,
            }
        } else {
            wanted
        }
    }

    /// `scaleDown.minPercentPerStep`: a removal smaller than that share of
    /// the pool waits until more replicas are idle. Each stop is a cold
    /// start later, and as a batch tails off replicas fall idle one by one;
    /// removing them in fewer, larger steps costs a few idle replica-seconds
    /// and saves most of the churn. Going to zero is not held, and
    /// `maxReplicas` still applies at once.
    fn min_removal(&self, replicas: u32) -> u32 {
        let current = self.current;
        let removed = current.saturating_sub(replicas);
        let too_small =
            u64::from(removed) * 100 < u64::from(current) * u64::from(self.settings.min_removal_percent);
        if removed > 0 && replicas > 0 && too_small {
            current
        } else {
            replicas
        }
    }

    /// How long ago replicas were last added (up) or removed (down), if
    /// within that direction's period: one step per period, as HPA takes
    /// one per sync. Without it a short tick follows a batch as it arrives
    /// and walks a pool down in many small steps.
    fn stepped_within_period(&self, direction: Direction) -> Option<TimeDelta> {
        let limits = self.settings.limits(direction);
        let period = TimeDelta::seconds(i64::from(limits.period_seconds));
        self.history
            .scale_events
            .iter()
            .rev()
            .find(|(_, change)| match direction {
                Direction::Up => *change > 0,
                Direction::Down => *change < 0,
            })
            .map(|(at, _)| self.now - *at)
            .filter(|ago| *ago < period)
    }

    fn period_start(&self, limits: &RateLimits) -> u64 {
        let cutoff = self.now - TimeDelta::seconds(i64::from(limits.period_seconds));
        let start = i64::from(self.current) - self.history.change_since(cutoff);
        u64::try_from(start).unwrap_or(0)
    }
}

/// E.g. "held at 6: replicas were added 5 s ago, one scale-up step per 15 s period".
fn held_by_period(replicas: u32, direction: Direction, ago: TimeDelta, limits: &RateLimits) -> String {
    let (verb, name) = match direction {
        Direction::Up => ("added", "scale-up"),
        Direction::Down => ("removed", "scale-down"),
    };
    format!(
        "held at {replicas}: replicas were {verb} {} s ago, one {name} step per {} s period",
        ago.num_seconds(),
        limits.period_seconds
    )
}

fn describe_limits(limits: &RateLimits) -> String {
    let mut parts = Vec::new();
    if let Some(n) = limits.replicas_per_step {
        parts.push(format!("{n} replicas "));
    }
    if let Some(p) = limits.percent_per_step {
        parts.push(format!("{p}% "));
    }
    parts.join("or ")
}

/// Work the pool keeps but does not size for, e.g. "; 3 retries due in 40 s".
fn waiting_note(load: &QueueLoad) -> String {
    let mut note = String::new();
    if let (scheduled @ 1.., Some(seconds)) = (load.scheduled, load.next_scheduled_seconds) {
        note.push_str(&format!(
            "; {scheduled} retries waiting, the next due in {seconds:.0} s"
        ));
    }
    if load.blocked > 0 {
        note.push_str(&format!(
            "; {} blocked on other tasks (their runnable notification wakes the pool)",
            load.blocked
        ));
    }
    note
}

fn saturate(value: u64) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests;
