//! One pool's pass: observe the backend, decide, start replicas or drain
//! idle ones and stop them, settle draining marks, publish the status. A
//! pass owns a copy of its pool's state and hands it back, so passes over
//! different pools run side by side and a slow backend holds up only its
//! own pool.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::FutureExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use queue::{TaskDepth, TaskType};
use tokio::sync::Semaphore;

use super::{Context, Leadership, PassError, PoolReport};
use crate::backend::{Backend, PassOutcome, PoolRef, Replica};
use crate::manifest::LoadedPool;
use crate::metrics::ErrorLabels;
use crate::policy::{self, Decision, History, Observation, Phase, QueueLoad, QueueReading};
use crate::spec::{ConditionType, WorkerPoolSpec, WorkerPoolStatus};

/// The queue as read once per round, for every pool.
pub(super) struct QueueSnapshot {
    pub depth: Vec<TaskDepth>,
    /// Replica id → tasks it holds.
    pub busy: HashMap<String, i64>,
}

impl QueueSnapshot {
    /// The depth of every task type and the tasks each replica holds: what
    /// a round (or `plan`) decides from.
    pub async fn read(queue: &queue::Queue) -> Result<QueueSnapshot, queue::QueueError> {
        let depth = queue.depth().await?;
        let busy = queue.busy_replicas().await?;
        Ok(QueueSnapshot {
            depth,
            busy: busy.into_iter().map(|r| (r.worker_id, r.in_flight)).collect(),
        })
    }
}

/// A round's reading of the queue, shared by its passes: the snapshot, or
/// why it could not be read (the policy then holds or falls back).
pub(super) type SharedSnapshot = Arc<Result<QueueSnapshot, String>>;

/// A pool's memory between passes.
#[derive(Default, Clone)]
pub(super) struct PoolState {
    pub history: History,
    pub status: WorkerPoolStatus,
    /// Set while the pool's passes keep failing.
    pub failing: Option<Failing>,
    /// Whether this leadership has cleared the draining marks an earlier
    /// leader left on the pool's replicas (done in the pool's first pass,
    /// before its first decision).
    pub marks_settled: bool,
}

/// A pool whose last pass failed: it is retried with a growing delay, or
/// at once when its spec changes (the fix may be in the spec).
#[derive(Clone)]
pub(super) struct Failing {
    failures: u32,
    pub retry_at: DateTime<Utc>,
    pub spec: WorkerPoolSpec,
}

/// First retry delay of a failing pool; doubles per failure up to the cap.
const RETRY_BASE: chrono::Duration = chrono::Duration::seconds(1);
const RETRY_CAP: chrono::Duration = chrono::Duration::seconds(60);

fn retry_delay(failures: u32) -> chrono::Duration {
    let doubled = RETRY_BASE * 2i32.saturating_pow(failures.saturating_sub(1).min(16));
    doubled.min(RETRY_CAP)
}

/// The version of the stored policy memory; a document of another version
/// is ignored (the pool starts from an empty history, as before it existed).
const MEMORY_VERSION: u64 = 1;

pub(super) fn memory_document(history: &History) -> serde_json::Value {
    serde_json::json!({ "version": MEMORY_VERSION, "history": history })
}

/// The history in a stored memory document, if it is one this controller reads.
pub(super) fn history_from_document(document: &serde_json::Value) -> Option<History> {
    if document.get("version")?.as_u64()? != MEMORY_VERSION {
        return None;
    }
    serde_json::from_value(document.get("history")?.clone()).ok()
}

/// What a finished pass hands back to the reconciler.
pub(super) struct PassDone {
    pub key: String,
    pub state: PoolState,
    /// The pass's report when it succeeded.
    pub report: Option<PoolReport>,
}

/// Everything one pool's pass needs, owned, so it can run beside others.
pub(super) struct Pass<B> {
    pub ctx: Arc<Context<B>>,
    pub leadership: Leadership,
    pub deadline: Duration,
    pub permits: Arc<Semaphore>,
    pub loaded: LoadedPool,
    pub key: String,
    pub state: PoolState,
    pub snapshot: SharedSnapshot,
    pub now: DateTime<Utc>,
}

/// A failed pass: the error, and the decision when the pass got that far.
struct Failure {
    error: PassError,
    decision: Option<Box<Decision>>,
}

impl<E: Into<PassError>> From<E> for Failure {
    fn from(error: E) -> Self {
        Failure {
            error: error.into(),
            decision: None,
        }
    }
}

/// What the acting part of a pass did.
struct Acted {
    observation: Observation,
    decision: Decision,
    removed: Vec<String>,
    kept_busy: Vec<String>,
}

impl<B: Backend> Pass<B> {
    pub async fn run(mut self) -> PassDone {
        // The semaphore is never closed.
        let _permit = self.permits.clone().acquire_owned().await.ok();
        let started = Instant::now();
        let name = self.loaded.name().to_string();
        let acting = act(
            &self.ctx,
            &self.leadership,
            &self.loaded,
            &mut self.state.history,
            &mut self.state.marks_settled,
            &self.snapshot,
            self.now,
        );
        // A bug that panics in one pool's pass fails that pass like any
        // error. Unwinding further would end the loop and drop the backend,
        // and the local backend's workers, busy or not, with it.
        let acting = AssertUnwindSafe(acting).catch_unwind().map(|caught| {
            caught.unwrap_or_else(|panic| {
                Err(Failure::from(PassError::Panicked {
                    pool: name.clone(),
                    message: panic_message(panic.as_ref()),
                }))
            })
        });
        let result = tokio::time::timeout(self.deadline, acting)
            .await
            .unwrap_or_else(|_| {
                Err(Failure::from(PassError::DeadlineExceeded {
                    pool: name.clone(),
                    deadline: self.deadline,
                }))
            });
        let report = match result {
            Ok(acted) => Some(self.succeeded(acted)),
            Err(failure) => {
                self.failed(&failure.error);
                self.publish(failure.decision.as_deref(), Some(&failure.error), &[])
                    .await;
                None
            }
        };
        if let Some(report) = &report {
            self.publish(Some(&report.decision), None, &report.removed).await;
        }
        self.record_metrics(report.as_ref().map(|r| &r.decision));
        self.ctx
            .metrics
            .reconcile_seconds
            .observe(started.elapsed().as_secs_f64());
        PassDone {
            key: self.key,
            state: self.state,
            report,
        }
    }

    fn succeeded(&mut self, acted: Acted) -> PoolReport {
        let Acted {
            observation,
            decision,
            removed,
            kept_busy,
        } = acted;
        let name = self.loaded.name().to_string();
        self.state.failing = None;
        update_status(
            &mut self.state.status,
            &self.loaded,
            &observation,
            &decision,
            removed.len(),
            self.now,
        );
        self.ctx.backend.amend_status(
            PoolRef::new(&self.loaded, &self.leadership),
            &mut self.state.status,
            &Time(now_k8s(self.now)),
        );
        if decision.changes_replicas() || !kept_busy.is_empty() {
            tracing::info!(pool = %name, from = decision.from, to = decision.replicas, phase = decision.phase.as_str(),
                removed = ?removed, kept_busy = ?kept_busy, "{}", decision.reason);
        } else {
            tracing::debug!(pool = %name, replicas = decision.replicas, phase = decision.phase.as_str(), "{}", decision.reason);
        }
        PoolReport {
            pool: name,
            decision,
            status: self.state.status.clone(),
            removed,
            kept_busy,
        }
    }

    /// `Ready=False` with the error's reason, and the next retry time.
    fn failed(&mut self, error: &PassError) {
        self.ctx.count_error(self.loaded.name(), "backend");
        let failures = self.state.failing.as_ref().map_or(0, |f| f.failures) + 1;
        let delay = retry_delay(failures);
        tracing::warn!(pool = %self.key, error = %error, failures, retry_in_s = delay.num_seconds(), "reconcile failed");
        self.state.failing = Some(Failing {
            failures,
            retry_at: self.now + delay,
            spec: self.loaded.pool.spec.clone(),
        });
        let status = &mut self.state.status;
        status.observed_generation = self.loaded.pool.metadata.generation;
        status.set_condition(
            ConditionType::Ready,
            false,
            error.reason(),
            &error.to_string(),
            &Time(now_k8s(self.now)),
        );
    }

    /// Tell the backend how the pass went, and store the status and the
    /// policy's memory where `GET /v1/pools`, `plan` and the next leader
    /// read them. Bounded by the deadline too: publishing never holds the
    /// pool past it.
    /// Tell the platform (the WorkerPool's status, Events) and the database
    /// (the pool's status, the policy memory a successor decides from) what
    /// the pass did. Not once leadership is gone: a former leader's write
    /// would replace the new leader's.
    async fn publish(&self, decision: Option<&Decision>, error: Option<&PassError>, removed: &[String]) {
        if !self.leadership.is_held() {
            return;
        }
        let outcome = PassOutcome {
            status: &self.state.status,
            decision,
            error,
            removed,
        };
        let publishing = async {
            self.ctx
                .backend
                .pass_finished(PoolRef::new(&self.loaded, &self.leadership), outcome)
                .await;
            self.ctx
                .publish_status(&self.key, &self.loaded, &self.state.status, &self.state.history)
                .await;
        };
        if tokio::time::timeout(self.deadline, publishing).await.is_err() {
            tracing::warn!(pool = %self.key, "publishing the pool's status timed out");
            self.ctx.count_error(self.loaded.name(), "status");
        }
    }

    /// The pool's gauges from its status, successful pass or not. Not
    /// once leadership is gone: the figures are the new leader's to give.
    fn record_metrics(&self, decision: Option<&Decision>) {
        if !self.leadership.is_held() {
            return;
        }
        let metrics = &self.ctx.metrics;
        let pool = self.loaded.name();
        metrics.record_pool(pool, &self.loaded.pool.spec, &self.state.status);
        if let Some(decision) = decision {
            metrics.record_decision(pool, decision);
        }
    }
}

/// What a panic said, as far as it can be read.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(message), _) => message.to_string(),
        (_, Some(message)) => message.clone(),
        _ => "a panic without a message".to_string(),
    }
}

/// Observe, decide, scale, and settle the draining marks.
async fn act<B: Backend>(
    ctx: &Context<B>,
    leadership: &Leadership,
    loaded: &LoadedPool,
    history: &mut History,
    marks_settled: &mut bool,
    snapshot: &Result<QueueSnapshot, String>,
    now: DateTime<Utc>,
) -> Result<Acted, Failure> {
    let pool = PoolRef::new(loaded, leadership);
    let replicas = ctx.backend.observe(pool).await?;
    if !*marks_settled && leadership.is_held() {
        // Marks an earlier leader left (it crashed or lost leadership
        // between drain and stop) are cleared before any decision.
        let ids: Vec<String> = replicas.iter().map(|r| r.id.clone()).collect();
        ctx.release_marks(pool.name, &ids).await;
        *marks_settled = true;
    }
    let observation = observe(&loaded.pool.spec.task_types, &replicas, snapshot);
    let decision = policy::decide(pool.spec, &observation, history, now);
    history.record(&decision, now);

    let scaled = scale(ctx, pool, &decision, &replicas, snapshot).await;
    // Whatever the scaling did or failed to do, no mark outlives the pass:
    // every replica the backend runs (or just started) that is marked
    // draining and was not removed goes back to work — unless leadership
    // is gone, when the marks are the new leader's (it may have drained
    // them itself, to remove them).
    let (removed, started) = match &scaled {
        Ok(s) => (s.removed.as_slice(), s.started.as_slice()),
        Err(_) => (&[][..], &[][..]),
    };
    let running: Vec<String> = replicas
        .iter()
        .map(|r| r.id.clone())
        .chain(started.iter().cloned())
        .filter(|id| !removed.contains(id))
        .collect();
    if leadership.is_held() {
        ctx.release_marks(pool.name, &running).await;
    }
    let Scaled {
        removed, kept_busy, ..
    } = scaled.map_err(|error| Failure {
        error,
        decision: Some(Box::new(decision.clone())),
    })?;
    Ok(Acted {
        observation,
        decision,
        removed,
        kept_busy,
    })
}

/// What a pass's scaling did.
#[derive(Default)]
struct Scaled {
    /// Replicas stopped (drained and idle).
    removed: Vec<String>,
    /// Chosen for removal and kept (busy, or not stopped by the backend).
    kept_busy: Vec<String>,
    /// Replica ids the backend (re)started, where it knows them.
    started: Vec<String>,
}

/// Carry out the decision: start replicas, or drain idle ones and stop
/// those drained. Leadership is checked before every action, and the
/// backend checks it again before each of its writes. A failure leaves its
/// marks to the caller's sweep.
async fn scale<B: Backend>(
    ctx: &Context<B>,
    pool: PoolRef<'_>,
    decision: &Decision,
    replicas: &[Replica],
    snapshot: &Result<QueueSnapshot, String>,
) -> Result<Scaled, PassError> {
    let mut scaled = Scaled::default();
    if decision.replicas > decision.from {
        pool.check_leading("starting replicas")?;
        scaled.started = ctx.backend.add(pool, decision.replicas - decision.from).await?;
    } else if decision.replicas < decision.from {
        // The policy holds on a failed read, so this is unreachable in
        // practice; never remove blind.
        let Ok(snapshot) = snapshot else {
            return Err(PassError::QueueUnreadable {
                pool: pool.name.to_string(),
            });
        };
        pool.check_leading("draining replicas")?;
        if let Some(why) = ctx.backend.removal_blocked(pool).await? {
            tracing::info!(pool = pool.name, %why, "scale-down held back: no replica is drained");
            return Ok(scaled);
        }
        let count = (decision.from - decision.replicas) as usize;
        let candidates = removal_candidates(replicas, &snapshot.busy, count);
        let drained = ctx
            .queue
            .drain_idle(&candidates)
            .await
            .map_err(|source| PassError::Drain {
                pool: pool.name.to_string(),
                source,
            })?;
        scaled.kept_busy = candidates
            .iter()
            .filter(|c| !drained.contains(c))
            .cloned()
            .collect();
        // Drained but not removed (or not removed at all): the sweep after
        // this puts them back to work.
        pool.check_leading("stopping replicas")?;
        let gone = ctx.backend.remove(pool, &drained).await?;
        // A replica stopped by the backend deregisters itself as it exits,
        // but one that had died already never will: record it stopped, so
        // no draining mark outlives the pass. A stopped replica claims
        // nothing; one started again under its name registers as running.
        if let Err(e) = ctx.queue.mark_stopped(&gone).await {
            tracing::warn!(pool = pool.name, error = %e, "could not record removed replicas as stopped");
            ctx.count_error(pool.name, "mark_stopped");
        }
        scaled
            .kept_busy
            .extend(drained.iter().filter(|d| !gone.contains(d)).cloned());
        scaled.removed = gone;
    }
    Ok(scaled)
}

/// What the policy sees of a pool: its replicas and its share of the queue.
pub(super) fn observe(
    task_types: &[TaskType],
    replicas: &[Replica],
    snapshot: &Result<QueueSnapshot, String>,
) -> Observation {
    let queue = match snapshot {
        Ok(s) => QueueReading::Read(pool_load(task_types, s, replicas)),
        Err(error) => QueueReading::Failed { error: error.clone() },
    };
    Observation {
        current_replicas: replicas.len() as u32,
        ready_replicas: replicas.iter().filter(|r| r.ready).count() as u32,
        queue,
    }
}

/// Sum the depth of a pool's task types; busy replicas are the pool's
/// replicas that hold a task in the registry.
fn pool_load(task_types: &[TaskType], snapshot: &QueueSnapshot, replicas: &[Replica]) -> QueueLoad {
    let mut load = QueueLoad::default();
    for d in snapshot
        .depth
        .iter()
        .filter(|d| task_types.contains(&d.task_type))
    {
        load.pending += d.pending.max(0) as u64;
        load.in_flight += d.in_flight.max(0) as u64;
        load.oldest_pending_seconds = load.oldest_pending_seconds.max(d.oldest_pending_seconds);
        load.completions_per_minute += d.completed_last_minute.max(0) as u64;
        load.scheduled += d.scheduled.max(0) as u64;
        load.blocked += d.blocked.max(0) as u64;
        load.capped |= d.capped;
        if let Some(due) = d.next_scheduled_seconds {
            load.next_scheduled_seconds = Some(load.next_scheduled_seconds.map_or(due, |s| s.min(due)));
        }
    }
    load.busy_replicas = replicas
        .iter()
        .filter(|r| snapshot.busy.contains_key(&r.id))
        .count() as u32;
    load
}

/// Which replicas to try to remove: idle ones only, replicas that are not
/// ready first (they serve nothing), then the newest (the oldest have proven
/// themselves and keep warm caches).
pub(super) fn removal_candidates(
    replicas: &[Replica],
    busy: &HashMap<String, i64>,
    count: usize,
) -> Vec<String> {
    let mut idle: Vec<&Replica> = replicas.iter().filter(|r| !busy.contains_key(&r.id)).collect();
    idle.sort_by(|a, b| a.ready.cmp(&b.ready).then_with(|| b.id.cmp(&a.id)));
    idle.into_iter().take(count).map(|r| r.id.clone()).collect()
}

pub(super) fn update_status(
    status: &mut WorkerPoolStatus,
    loaded: &LoadedPool,
    observation: &Observation,
    decision: &Decision,
    removed: usize,
    now: DateTime<Utc>,
) {
    let time = Time(now_k8s(now));
    status.observed_generation = loaded.pool.metadata.generation;
    if let QueueReading::Read(load) = &observation.queue {
        status.pending = load.pending as i64;
        status.in_flight = load.in_flight as i64;
        status.oldest_pending_seconds = load.oldest_pending_seconds as i64;
        status.busy_replicas = load.busy_replicas as i32;
        status.scheduled = load.scheduled as i64;
        status.blocked = load.blocked as i64;
        status.depth_capped = load.capped;
    }
    status.desired_replicas = decision.replicas as i32;
    // After this pass's change: everything added, or what was removed.
    status.current_replicas = if decision.replicas > decision.from {
        decision.replicas as i32
    } else {
        (observation.current_replicas as usize - removed) as i32
    };
    status.ready_replicas = observation.ready_replicas as i32;
    if decision.changes_replicas() {
        status.last_scale_time = Some(time.clone());
    }
    status.last_decision = Some(decision.reason.clone());
    status.set_condition(
        ConditionType::Ready,
        true,
        "Reconciled",
        "the backend answered",
        &time,
    );
    let active = decision.replicas > 0;
    status.set_condition(
        ConditionType::Active,
        active,
        if active { "Running" } else { "ScaledToZero" },
        &decision.reason,
        &time,
    );
    let (fallback, fb_reason) = match decision.phase {
        Phase::Fallback { .. } => (true, "QueueUnreadable"),
        // Held at its count: below the failure threshold, or with no
        // fallback to run. The message says which.
        Phase::Unobserved { .. } => (false, "QueueUnreadable"),
        _ => (false, "QueueReadable"),
    };
    status.set_condition(
        ConditionType::Fallback,
        fallback,
        fb_reason,
        &decision.reason,
        &time,
    );
    let paused = decision.phase == Phase::Paused;
    status.set_condition(
        ConditionType::Paused,
        paused,
        if paused { "Paused" } else { "Scaling" },
        "",
        &time,
    );
}

pub(super) fn now_k8s(now: DateTime<Utc>) -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::from_millisecond(now.timestamp_millis()).unwrap_or_default()
}

impl<B: Backend> Context<B> {
    pub(super) fn count_error(&self, pool: &str, stage: &str) {
        self.metrics
            .errors
            .get_or_create(&ErrorLabels {
                pool: pool.to_string(),
                stage: stage.to_string(),
            })
            .inc();
    }

    /// Put back to work those of `running` (replicas that keep running
    /// after this pass) that are marked draining. A failure is logged and
    /// counted; the next pass tries again, as it sweeps the same replicas.
    pub(super) async fn release_marks(&self, pool: &str, running: &[String]) {
        match self.queue.undrain_marked(running).await {
            Ok(undrained) if !undrained.is_empty() => {
                tracing::info!(pool, replicas = ?undrained, "replicas marked draining and not stopped are back to work");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(pool, error = %e, "could not put draining replicas back to work; retrying next pass");
                self.count_error(pool, "undrain");
            }
        }
    }

    /// Write the pool's status where `GET /v1/pools` reads it, for every
    /// backend (on Kubernetes the WorkerPool's status subresource has it
    /// too), and the policy's memory beside it. A failed write is logged,
    /// never fatal.
    async fn publish_status(&self, key: &str, loaded: &LoadedPool, s: &WorkerPoolStatus, history: &History) {
        let row = queue::PoolStatus {
            pool: key.to_string(),
            backend: self.backend.name().to_string(),
            task_types: loaded
                .pool
                .spec
                .task_types
                .iter()
                .map(|t| t.as_str().to_string())
                .collect(),
            created_at: loaded
                .pool
                .metadata
                .creation_timestamp
                .as_ref()
                .and_then(|t| DateTime::from_timestamp_millis(t.0.as_millisecond())),
            desired_replicas: s.desired_replicas,
            current_replicas: s.current_replicas,
            ready_replicas: s.ready_replicas,
            busy_replicas: s.busy_replicas,
            pending: s.pending,
            in_flight: s.in_flight,
            conditions: serde_json::to_value(&s.conditions).unwrap_or_else(|_| serde_json::json!([])),
            last_decision: s.last_decision.clone(),
            last_scale_at: s
                .last_scale_time
                .as_ref()
                .and_then(|t| DateTime::from_timestamp_millis(t.0.as_millisecond())),
        };
        let written = async {
            self.queue.put_pool_status(&row).await?;
            self.queue.put_policy_memory(key, &memory_document(history)).await
        };
        if let Err(e) = written.await {
            tracing::warn!(pool = %key, error = %e, "could not write the pool's status");
            // Labelled by name, as every other series of the pool; the key
            // is `namespace/name` for a pool from the cluster.
            self.count_error(loaded.name(), "status");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_pool_waits_one_second_doubling_to_a_minute() {
        let delays: Vec<i64> = [1, 2, 3, 6, 7, 8, 1000, u32::MAX]
            .into_iter()
            .map(|failures| retry_delay(failures).num_seconds())
            .collect();
        assert_eq!(delays, [1, 2, 4, 32, 60, 60, 60, 60]);
    }
}
