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
//!        running, idle, minReplicas 0 ──▶ CoolingDown (≥ 1) ──cooldownSeconds──▶ Deactivating (→ 0)
//! ```
//!
//! Serving and cooling down follow HPA: the recommendation from load is
//! stabilised over the scale-up window (lowest recommendation wins) and the
//! scale-down window (highest wins), limited by the rate policies (the most
//! permissive policy of a direction applies, as HPA's `selectPolicy: Max`),
//! then bounded by `max(minReplicas, busy replicas)` and `maxReplicas`.
//! Activation skips the scale-up window: a pool at zero with work starts at
//! once. Deactivation skips the scale-down window and rate limits: after
//! `cooldownSeconds` with nothing pending or in flight there is nothing
//! left to protect.
//!
//! The caller keeps a [`History`] per pool and folds each decision into it
//! with [`History::record`], itself pure.

use std::collections::VecDeque;
use std::fmt;

use chrono::{DateTime, TimeDelta, Utc};

use crate::spec::{Direction, RateLimits, WorkerPoolSpec};

/// Recommendations and scale events kept per pool, at most. The age bound
/// (the longest window or period of the spec) normally keeps far fewer.
const MAX_HISTORY_ENTRIES: usize = 4096;

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
/// Retries waiting for a later `run_at` are left out: they become pending
/// at their time and a later tick sees them, whereas counting them would
/// keep replicas idling through whole backoffs.
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
    },
}

/// What a pool's past decisions leave for the next ones: recommendations
/// (stabilisation windows), replica changes (rate limits), consecutive
/// failed reads (fallback) and the start of the current idle spell
/// (cooldown). Bounded by age and by [`MAX_HISTORY_ENTRIES`].
/// Plain data, so the leader can store it beside the pool's status and a
/// successor or `controller plan` can decide from the same past.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct History {
    /// Oldest first. A run of equal recommendations keeps only its latest
    /// time, which answers "was this value recommended within the window"
    /// exactly.
    recommendations: VecDeque<(DateTime<Utc>, u32)>,
    /// Replicas added (positive) or removed (negative), oldest first.
    scale_events: VecDeque<(DateTime<Utc>, i64)>,
    consecutive_failures: u32,
    idle_since: Option<DateTime<Utc>>,
}

impl History {
    /// Folds a decision in. Call it for every decision, applied or not: a
    /// change the backend failed to make then still counts against the rate
    /// limits, which errs on the side of caution.
    pub fn record(&mut self, decision: &Decision, now: DateTime<Utc>) {
        match decision.memo.reading {
            Reading::Skipped => {}
            Reading::Failed => self.consecutive_failures = self.consecutive_failures.saturating_add(1),
            Reading::Read { recommendation, idle } => {
                self.consecutive_failures = 0;
                self.idle_since = idle.then(|| self.idle_since.unwrap_or(now));
                match self.recommendations.back_mut() {
                    Some((at, last)) if *last == recommendation => *at = now,
                    _ => self.recommendations.push_back((now, recommendation)),
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

    /// Entries held, for tests and metrics.
    pub fn len(&self) -> usize {
        self.recommendations.len() + self.scale_events.len()
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
        QueueReading::Read(load) => policy.read(observation.ready_replicas, load),
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
    fallback: Option<(u32, u32)>,
    retention: TimeDelta,
}

impl Settings {
    fn of(spec: &WorkerPoolSpec) -> Settings {
        let count = |value: i32| u32::try_from(value).unwrap_or(0);
        let seconds = |value: u32| TimeDelta::seconds(i64::from(value));
        let max = count(spec.max_replicas).max(1);
        let (up, down) = (spec.rate_limits(Direction::Up), spec.rate_limits(Direction::Down));
        let up_window = spec.stabilization_seconds(Direction::Up);
        let down_window = spec.stabilization_seconds(Direction::Down);
        let longest = [up_window, down_window, up.period_seconds, down.period_seconds];
        Settings {
            min: count(spec.min_replicas).min(max),
            max,
            tasks_per_replica: count(spec.tasks_per_replica).max(1),
            activation_tasks: u64::from(count(spec.activation_tasks).max(1)),
            target_queue_seconds: spec.target_queue_seconds.map(count).filter(|s| *s > 0),
            cooldown: seconds(count(spec.cooldown_seconds)),
            up_window: seconds(up_window),
            down_window: seconds(down_window),
            up,
            down,
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
}

/// The fewest replicas this tick allows, and why.
struct Floor {
    replicas: u32,
    note: String,
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
            memo: Memo {
                reading,
                retention: self.settings.retention,
            },
        }
    }

    /// Holds, then falls back; never goes to zero for want of a reading.
    fn unreadable(&self, error: &str) -> Decision {
        let failures = self.history.consecutive_failures.saturating_add(1);
        match self.settings.fallback {
            Some((threshold, replicas)) if failures >= threshold => self.decision(
                replicas,
                Phase::Fallback { failures },
                format!(
                    "fallback after {failures} failed queue reads (failureThreshold {threshold}): {error}"
                ),
                Reading::Failed,
            ),
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

    fn read(&self, ready: u32, load: &QueueLoad) -> Decision {
        let settings = &self.settings;
        let recommendation = self.recommend(ready, load);
        let idle = load.pending == 0 && load.in_flight == 0;
        let reading = Reading::Read {
            recommendation: recommendation.replicas,
            idle,
        };
        let floor = if load.busy_replicas > settings.min {
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

        if self.current == 0 {
            if load.pending < settings.activation_tasks && floor.replicas == 0 {
                let why = if load.pending == 0 {
                    "nothing pending".to_string()
                } else {
                    format!(
                        "{} pending, activationTasks is {}",
                        load.pending, settings.activation_tasks
                    )
                };
                return self.decision(0, Phase::Dormant, why, reading);
            }
            let (replicas, why) = self.serve(&recommendation, &floor);
            return self.decision(replicas, Phase::Activating, why, reading);
        }

        if idle && floor.replicas == 0 {
            let idle_for = self.now - self.history.idle_since.unwrap_or(self.now);
            let (idle_s, cooldown_s) = (idle_for.num_seconds(), settings.cooldown.num_seconds());
            if idle_for >= settings.cooldown {
                let why = format!("idle for {idle_s} s (cooldownSeconds {cooldown_s})");
                return self.decision(0, Phase::Deactivating, why, reading);
            }
            let cooling = Floor {
                replicas: 1,
                note: format!("kept at 1: idle for {idle_s} s, zero after cooldownSeconds {cooldown_s}"),
            };
            let (replicas, why) = self.serve(&recommendation, &cooling);
            return self.decision(replicas, Phase::CoolingDown, why, reading);
        }

        let (replicas, why) = self.serve(&recommendation, &floor);
        self.decision(replicas, Phase::Serving, why, reading)
    }

    /// `ceil((pending + inFlight) / tasksPerReplica)`, raised to drain the
    /// pending tasks within `targetQueueSeconds` at the measured throughput
    /// per replica when one is set and known.
    fn recommend(&self, ready: u32, load: &QueueLoad) -> Recommendation {
        let per_replica = u64::from(self.settings.tasks_per_replica);
        let by_load = (load.pending + load.in_flight).div_ceil(per_replica);
        let load_basis = format!(
            "{} pending + {} in flight at {per_replica} per replica",
            load.pending, load.in_flight
        );
        let by_load = Recommendation {
            replicas: saturate(by_load),
            basis: load_basis,
        };
        let Some(target) = self.settings.target_queue_seconds else {
            return by_load;
        };
        // Replicas that produced the completions: busy ones, or all ready ones.
        let serving = ready.max(load.busy_replicas);
        if load.completions_per_minute == 0 || serving == 0 || load.pending == 0 {
            return by_load;
        }
        let per_replica_per_second = load.completions_per_minute as f64 / 60.0 / f64::from(serving);
        let by_latency = (load.pending as f64 / (per_replica_per_second * f64::from(target))).ceil();
        if by_latency <= f64::from(by_load.replicas) {
            return by_load;
        }
        Recommendation {
            replicas: by_latency.min(f64::from(u32::MAX)) as u32,
            basis: format!(
                "{} pending to drain within targetQueueSeconds {target} at {per_replica_per_second:.2} tasks/s per replica (oldest waited {:.0} s)",
                load.pending, load.oldest_pending_seconds
            ),
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
        if limited != capped {
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

        let bounded = limited.max(floor.replicas).min(settings.max);
        if bounded > limited {
            notes.push(floor.note.clone());
        } else if bounded < limited && !notes.contains(&cap_note) {
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

    fn period_start(&self, limits: &RateLimits) -> u64 {
        let cutoff = self.now - TimeDelta::seconds(i64::from(limits.period_seconds));
        let start = i64::from(self.current) - self.history.change_since(cutoff);
        u64::try_from(start).unwrap_or(0)
    }
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

fn saturate(value: u64) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests;
