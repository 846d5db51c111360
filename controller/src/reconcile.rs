//! The reconcile loop: one grouped depth query and one registry read per
//! pass for all pools, the pure policy per pool, then the backend — with
//! the drain protocol in front of every removal.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use queue::{Queue, TaskDepth, TaskType};
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, BackendError, PassOutcome, PoolRef, Replica};
use crate::manifest::{self, LoadedPool};
use crate::metrics::{DecisionLabels, ErrorLabels, Metrics, PoolLabels};
use crate::policy::{self, Decision, History, Observation, Phase, QueueLoad, QueueReading};
use crate::spec::{ConditionType, WorkerPoolStatus};

/// What `reconcile` needs, handed in once.
pub struct Context<B> {
    pub queue: Queue,
    pub backend: B,
    pub metrics: Arc<Metrics>,
}

/// A pool's memory between passes.
#[derive(Default)]
struct PoolState {
    history: History,
    status: WorkerPoolStatus,
    /// Set while the pool's backend keeps failing.
    failing: Option<Failing>,
}

/// A pool whose last pass failed: it is retried with a growing delay, or
/// at once when its spec changes (the fix may be in the spec).
struct Failing {
    failures: u32,
    retry_at: DateTime<Utc>,
    spec: crate::spec::WorkerPoolSpec,
}

/// First retry delay of a failing pool; doubles per failure up to the cap.
const RETRY_BASE: chrono::Duration = chrono::Duration::seconds(1);
const RETRY_CAP: chrono::Duration = chrono::Duration::seconds(60);

fn retry_delay(failures: u32) -> chrono::Duration {
    let doubled = RETRY_BASE * 2i32.saturating_pow(failures.saturating_sub(1).min(16));
    doubled.min(RETRY_CAP)
}

/// A failed pass over one pool: the error, and the decision when the pass got that far.
struct PoolFailure {
    error: BackendError,
    decision: Option<Decision>,
}

impl From<BackendError> for PoolFailure {
    fn from(error: BackendError) -> Self {
        PoolFailure {
            error,
            decision: None,
        }
    }
}

/// The key a pool's state is kept under: `namespace/name` for WorkerPool
/// objects (names repeat across namespaces), the name for pools from files.
pub fn pool_key(pool: &LoadedPool) -> String {
    match &pool.pool.metadata.namespace {
        Some(namespace) => format!("{namespace}/{}", pool.name()),
        None => pool.name().to_string(),
    }
}

/// One pool's outcome of a pass, for logs, `plan` and tests.
#[derive(Debug, Clone)]
pub struct PoolReport {
    pub pool: String,
    pub decision: Decision,
    pub status: WorkerPoolStatus,
    /// Replicas actually removed (drained and idle).
    pub removed: Vec<String>,
    /// Replicas chosen for removal and kept: they picked up work first, or
    /// the backend could not remove them this pass (and they were put back
    /// to work).
    pub kept_busy: Vec<String>,
}

pub struct Reconciler<B> {
    ctx: Context<B>,
    state: HashMap<String, PoolState>,
}

/// The queue as read once per pass, for every pool.
struct QueueSnapshot {
    depth: Vec<TaskDepth>,
    /// Replica id → tasks it holds.
    busy: HashMap<String, i64>,
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

impl<B: Backend> Reconciler<B> {
    pub fn new(ctx: Context<B>) -> Self {
        Reconciler {
            ctx,
            state: HashMap::new(),
        }
    }

    pub fn context(&self) -> &Context<B> {
        &self.ctx
    }

    /// One pass over every pool at time `now`. A pool whose backend fails
    /// gets `Ready=False` with the error and a backed-off retry; the other
    /// pools go on. The reports are those of the pools that succeeded.
    pub async fn reconcile(&mut self, pools: &[LoadedPool], now: DateTime<Utc>) -> Vec<PoolReport> {
        let started = std::time::Instant::now();
        let snapshot = self.read_queue().await;
        let mut reports = Vec::with_capacity(pools.len());
        for pool in pools {
            let key = pool_key(pool);
            if self.waiting_to_retry(&key, pool, now) {
                continue;
            }
            let pool_ref = PoolRef::from(pool);
            match self.reconcile_pool(pool, &key, snapshot.as_ref(), now).await {
                Ok(report) => {
                    let outcome = PassOutcome {
                        status: &report.status,
                        decision: Some(&report.decision),
                        error: None,
                        removed: &report.removed,
                    };
                    self.ctx.backend.pass_finished(pool_ref, outcome).await;
                    self.publish_status(&key, &report.status).await;
                    reports.push(report);
                }
                Err(failure) => {
                    let status = self.record_failure(&key, pool, &failure.error, now);
                    let outcome = PassOutcome {
                        status: &status,
                        decision: failure.decision.as_ref(),
                        error: Some(&failure.error),
                        removed: &[],
                    };
                    self.ctx.backend.pass_finished(pool_ref, outcome).await;
                    self.publish_status(&key, &status).await;
                }
            }
        }
        // Forget pools whose manifests were removed.
        let live: HashSet<String> = pools.iter().map(pool_key).collect();
        self.state.retain(|key, _| live.contains(key));
        let backend = self.ctx.backend.name();
        let live: Vec<String> = live.into_iter().collect();
        if let Err(e) = self.ctx.queue.forget_pool_statuses(backend, &live).await {
            tracing::warn!(error = %e, "could not prune the status of removed pools");
        }
        self.ctx
            .metrics
            .reconcile_seconds
            .observe(started.elapsed().as_secs_f64());
        reports
    }

    /// A failing pool waits for its retry time, unless its spec changed.
    fn waiting_to_retry(&self, key: &str, pool: &LoadedPool, now: DateTime<Utc>) -> bool {
        let failing = self.state.get(key).and_then(|s| s.failing.as_ref());
        failing.is_some_and(|f| now < f.retry_at && f.spec == pool.pool.spec)
    }

    /// `Ready=False` with the error's reason, and the next retry time.
    fn record_failure(
        &mut self,
        key: &str,
        pool: &LoadedPool,
        error: &BackendError,
        now: DateTime<Utc>,
    ) -> WorkerPoolStatus {
        self.count_error(pool.name(), "backend");
        let state = self.state.entry(key.to_string()).or_default();
        let failures = state.failing.as_ref().map_or(0, |f| f.failures) + 1;
        let delay = retry_delay(failures);
        tracing::warn!(pool = key, error = %error, failures, retry_in_s = delay.num_seconds(), "reconcile failed");
        state.failing = Some(Failing {
            failures,
            retry_at: now + delay,
            spec: pool.pool.spec.clone(),
        });
        state.status.observed_generation = pool.pool.metadata.generation;
        state.status.set_condition(
            ConditionType::Ready,
            false,
            error.reason(),
            &error.to_string(),
            &Time(now_k8s(now)),
        );
        state.status.clone()
    }

    /// The pool's status as of its last pass, if it had one.
    pub fn status(&self, key: &str) -> Option<&WorkerPoolStatus> {
        self.state.get(key).map(|s| &s.status)
    }

    async fn read_queue(&self) -> Result<QueueSnapshot, String> {
        let depth = self.ctx.queue.depth().await.map_err(|e| e.to_string())?;
        let busy = self.ctx.queue.busy_replicas().await.map_err(|e| e.to_string())?;
        Ok(QueueSnapshot {
            depth,
            busy: busy.into_iter().map(|r| (r.worker_id, r.in_flight)).collect(),
        })
    }

    async fn reconcile_pool(
        &mut self,
        loaded: &LoadedPool,
        key: &str,
        snapshot: Result<&QueueSnapshot, &String>,
        now: DateTime<Utc>,
    ) -> Result<PoolReport, PoolFailure> {
        let name = loaded.name().to_string();
        let spec = &loaded.pool.spec;
        let pool = PoolRef {
            name: &name,
            metadata: &loaded.pool.metadata,
            spec,
        };
        let replicas = self.ctx.backend.observe(pool).await?;
        let queue = match snapshot {
            Ok(s) => QueueReading::Read(pool_load(&spec.task_types, s, &replicas)),
            Err(error) => QueueReading::Failed { error: error.clone() },
        };
        let observation = Observation {
            current_replicas: replicas.len() as u32,
            ready_replicas: replicas.iter().filter(|r| r.ready).count() as u32,
            queue,
        };
        let state = self.state.entry(key.to_string()).or_default();
        let decision = policy::decide(spec, &observation, &state.history, now);
        state.history.record(&decision, now);
        let failed = |error: BackendError, decision: &Decision| PoolFailure {
            error,
            decision: Some(decision.clone()),
        };

        let scaled = self.scale(pool, &decision, &replicas, snapshot).await;
        // Whatever the scaling did or failed to do, no mark outlives the
        // pass: every replica the backend runs (or just started) that is
        // marked draining and was not removed goes back to work.
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
        self.release_marks(&name, &running).await;
        let Scaled {
            removed, kept_busy, ..
        } = scaled.map_err(|error| failed(error, &decision))?;

        let state = self.state.get_mut(key).expect("inserted above");
        state.failing = None;
        update_status(
            &mut state.status,
            loaded,
            &observation,
            &decision,
            removed.len(),
            now,
        );
        self.ctx
            .backend
            .amend_status(pool, &mut state.status, &Time(now_k8s(now)));
        if decision.changes_replicas() || !kept_busy.is_empty() {
            tracing::info!(pool = %name, from = decision.from, to = decision.replicas, phase = decision.phase.as_str(),
                removed = ?removed, kept_busy = ?kept_busy, "{}", decision.reason);
        } else {
            tracing::debug!(pool = %name, replicas = decision.replicas, phase = decision.phase.as_str(), "{}", decision.reason);
        }
        let status = state.status.clone();
        self.record_metrics(&name, &status, &decision);
        Ok(PoolReport {
            pool: name,
            decision,
            status,
            removed,
            kept_busy,
        })
    }

    /// Carry out the decision: start replicas, or drain idle ones and
    /// stop those drained. A failure leaves its marks to the caller's sweep.
    async fn scale(
        &self,
        pool: PoolRef<'_>,
        decision: &Decision,
        replicas: &[Replica],
        snapshot: Result<&QueueSnapshot, &String>,
    ) -> Result<Scaled, BackendError> {
        let mut scaled = Scaled::default();
        if decision.replicas > decision.from {
            scaled.started = self
                .ctx
                .backend
                .add(pool, decision.replicas - decision.from)
                .await?;
        } else if decision.replicas < decision.from {
            let busy = match snapshot {
                Ok(s) => &s.busy,
                // The policy holds on a failed read, so this is unreachable
                // in practice; never remove blind.
                Err(_) => {
                    return Err(BackendError::Failed {
                        pool: pool.name.to_string(),
                        message: "queue unreadable: not removing replicas".into(),
                    })
                }
            };
            let candidates = removal_candidates(replicas, busy, (decision.from - decision.replicas) as usize);
            let drained = self
                .ctx
                .queue
                .drain_idle(&candidates)
                .await
                .map_err(|e| BackendError::Failed {
                    pool: pool.name.to_string(),
                    message: format!("drain: {e}"),
                })?;
            scaled.kept_busy = candidates
                .iter()
                .filter(|c| !drained.contains(c))
                .cloned()
                .collect();
            // Drained but not removed (or not removed at all): the sweep
            // after this puts them back to work.
            let gone = self.ctx.backend.remove(pool, &drained).await?;
            // A replica stopped by the backend deregisters itself as it
            // exits, but one that had died already never will: record it
            // stopped, so no draining mark outlives the pass. A stopped
            // replica claims nothing; one started again under its name
            // registers as running.
            if let Err(e) = self.ctx.queue.mark_stopped(&gone).await {
                tracing::warn!(pool = pool.name, error = %e, "could not record removed replicas as stopped");
                self.count_error(pool.name, "mark_stopped");
            }
            scaled
                .kept_busy
                .extend(drained.iter().filter(|d| !gone.contains(d)).cloned());
            scaled.removed = gone;
        }
        Ok(scaled)
    }

    /// Put back to work those of `running` (replicas that keep running
    /// after this pass) that are marked draining. A failure is logged and
    /// counted; the next pass tries again, as it sweeps the same replicas.
    async fn release_marks(&self, pool: &str, running: &[String]) {
        match self.ctx.queue.undrain_marked(running).await {
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

    /// Start-up, once leading: clear the draining marks an earlier
    /// controller left on the replicas it did not stop (it crashed or lost
    /// leadership between drain and stop), before any decision.
    pub async fn release_stale_marks(&self, pools: &[LoadedPool]) {
        for loaded in pools {
            let pool = PoolRef::from(loaded);
            match self.ctx.backend.observe(pool).await {
                Ok(replicas) => {
                    let ids: Vec<String> = replicas.into_iter().map(|r| r.id).collect();
                    self.release_marks(pool.name, &ids).await;
                }
                // The pool's first pass observes again and sweeps then.
                Err(e) => tracing::warn!(pool = pool.name, error = %e, "could not list replicas at start-up"),
            }
        }
    }

    fn record_metrics(&self, pool: &str, status: &WorkerPoolStatus, decision: &Decision) {
        let m = &self.ctx.metrics;
        let labels = PoolLabels {
            pool: pool.to_string(),
        };
        m.desired_replicas
            .get_or_create(&labels)
            .set(status.desired_replicas as i64);
        m.current_replicas
            .get_or_create(&labels)
            .set(status.current_replicas as i64);
        m.ready_replicas
            .get_or_create(&labels)
            .set(status.ready_replicas as i64);
        m.busy_replicas
            .get_or_create(&labels)
            .set(status.busy_replicas as i64);
        m.pending_tasks.get_or_create(&labels).set(status.pending);
        m.in_flight_tasks.get_or_create(&labels).set(status.in_flight);
        m.decisions
            .get_or_create(&DecisionLabels {
                pool: pool.to_string(),
                phase: decision.phase.as_str().to_string(),
            })
            .inc();
    }

    /// Write each pool's status for `GET /v1/pools` and drop the rows of
    /// pools this backend no longer runs. A failed write is logged, never fatal.
    /// Write the pool's status where `GET /v1/pools` reads it, for every
    /// backend (on Kubernetes the WorkerPool's status subresource has it too).
    async fn publish_status(&self, key: &str, s: &WorkerPoolStatus) {
        let row = queue::PoolStatus {
            pool: key.to_string(),
            backend: self.ctx.backend.name().to_string(),
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
        if let Err(e) = self.ctx.queue.put_pool_status(&row).await {
            tracing::warn!(pool = %key, error = %e, "could not write the pool's status");
            self.count_error(key, "status");
        }
    }

    fn count_error(&self, pool: &str, stage: &str) {
        self.ctx
            .metrics
            .errors
            .get_or_create(&ErrorLabels {
                pool: pool.to_string(),
                stage: stage.to_string(),
            })
            .inc();
    }

    /// The pool's replicas were last seen at zero: a notification for one of
    /// its task types should wake the loop at once.
    pub fn is_at_zero(&self, key: &str) -> bool {
        self.state.get(key).is_none_or(|s| s.status.current_replicas == 0)
    }
}

/// `controller plan`: what each pool would do now, from a fresh history,
/// with replicas taken from the worker registry. Reads only.
pub async fn plan(
    queue: &Queue,
    pools: &[LoadedPool],
    now: DateTime<Utc>,
) -> Result<Vec<PoolReport>, queue::QueueError> {
    let depth = queue.depth().await?;
    let busy = queue
        .busy_replicas()
        .await?
        .into_iter()
        .map(|r| (r.worker_id, r.in_flight))
        .collect();
    let snapshot = QueueSnapshot { depth, busy };
    let workers = queue.workers(None).await?;
    Ok(pools
        .iter()
        .map(|pool| {
            let replicas: Vec<Replica> = workers
                .iter()
                .filter(|w| w.pool.as_deref() == Some(pool.name()))
                .map(|w| Replica {
                    id: w.id.clone(),
                    ready: w.state == queue::WorkerState::Running,
                })
                .collect();
            let observation = Observation {
                current_replicas: replicas.len() as u32,
                ready_replicas: replicas.iter().filter(|r| r.ready).count() as u32,
                queue: QueueReading::Read(pool_load(&pool.pool.spec.task_types, &snapshot, &replicas)),
            };
            let decision = policy::decide(&pool.pool.spec, &observation, &History::default(), now);
            let mut status = WorkerPoolStatus::default();
            update_status(&mut status, pool, &observation, &decision, 0, now);
            PoolReport {
                pool: pool.name().to_string(),
                decision,
                status,
                removed: vec![],
                kept_busy: vec![],
            }
        })
        .collect())
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
fn removal_candidates(replicas: &[Replica], busy: &HashMap<String, i64>, count: usize) -> Vec<String> {
    let mut idle: Vec<&Replica> = replicas.iter().filter(|r| !busy.contains_key(&r.id)).collect();
    idle.sort_by(|a, b| a.ready.cmp(&b.ready).then_with(|| b.id.cmp(&a.id)));
    idle.into_iter().take(count).map(|r| r.id.clone()).collect()
}

fn update_status(
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

fn now_k8s(now: DateTime<Utc>) -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::from_millisecond(now.timestamp_millis()).unwrap_or_default()
}

/// Where pools come from outside Kubernetes: a YAML file or folder,
/// re-read when anything in it changes.
pub struct ManifestSource {
    path: PathBuf,
    stamp: Option<Vec<(PathBuf, SystemTime)>>,
    pools: Vec<LoadedPool>,
}

impl ManifestSource {
    pub fn new(path: PathBuf) -> Self {
        ManifestSource {
            path,
            stamp: None,
            pools: Vec::new(),
        }
    }

    /// The current pools, reloading when a file changed. A manifest with
    /// errors is reported and skipped; the other pools keep running.
    pub fn pools(&mut self) -> &[LoadedPool] {
        let stamp = stamp(&self.path);
        if self.stamp.as_ref() != Some(&stamp) {
            let loaded = manifest::load(&self.path);
            for error in &loaded.errors {
                tracing::error!(error = %error, "manifest rejected");
            }
            let names: Vec<&str> = loaded.pools.iter().map(|p| p.name()).collect();
            tracing::info!(path = %self.path.display(), pools = ?names, "loaded WorkerPools");
            self.pools = loaded.pools;
            self.stamp = Some(stamp);
        }
        &self.pools
    }
}

fn stamp(path: &std::path::Path) -> Vec<(PathBuf, SystemTime)> {
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut out = Vec::new();
    if let Some(t) = modified(path) {
        out.push((path.to_path_buf(), t));
    }
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            if let Some(t) = modified(&entry.path()) {
                out.push((entry.path(), t));
            }
        }
    }
    out.sort();
    out
}

/// Where the run loop gets its pools: YAML files ([`ManifestSource`]) or
/// WorkerPool objects on Kubernetes
/// ([`crate::backend::kubernetes::WorkerPoolSource`]).
pub trait PoolSource: Send {
    /// The pools to reconcile now.
    fn load(&mut self) -> impl Future<Output = Vec<LoadedPool>> + Send;

    /// Resolves when the pools changed, so a pass should run now. Sources
    /// re-read on every pass never resolve.
    fn changed(&mut self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }
}

impl PoolSource for ManifestSource {
    async fn load(&mut self) -> Vec<LoadedPool> {
        self.pools().to_vec()
    }
}

/// How one controller of several becomes the one that acts.
pub trait Election: Send {
    /// Wait until this controller leads. `false`: shut down before that.
    fn acquire(&mut self, shutdown: &CancellationToken) -> impl Future<Output = anyhow::Result<bool>> + Send;

    /// Whether this controller still leads; asked before every pass.
    fn still_held(&mut self) -> impl Future<Output = bool> + Send;

    /// Step down so a standby can take over at once.
    fn release(self) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// Leader election with a PostgreSQL advisory lock, for everywhere but
/// Kubernetes: the lock lives as long as the leader's database session.
pub struct AdvisoryLock {
    queue: Queue,
    key: i64,
    retry: Duration,
    held: Option<queue::Leadership>,
}

impl AdvisoryLock {
    pub fn new(queue: Queue, key: i64, retry: Duration) -> Self {
        AdvisoryLock {
            queue,
            key,
            retry,
            held: None,
        }
    }
}

impl Election for AdvisoryLock {
    async fn acquire(&mut self, shutdown: &CancellationToken) -> anyhow::Result<bool> {
        loop {
            match self.queue.try_lead(self.key).await {
                Ok(Some(lead)) => {
                    self.held = Some(lead);
                    return Ok(true);
                }
                Ok(None) => tracing::info!("standby: another controller is the leader; waiting"),
                // A database restarting: try again rather than exit.
                Err(queue::QueueError::Database(e)) if queue::is_transient(&e) => {
                    tracing::warn!(error = %e, "standby: the database cannot be reached; waiting")
                }
                Err(e) => return Err(e.into()),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(false),
                _ = tokio::time::sleep(self.retry) => {}
            }
        }
    }

    async fn still_held(&mut self) -> bool {
        match self.held.as_mut() {
            Some(lead) => lead.still_held().await,
            None => false,
        }
    }

    async fn release(self) -> anyhow::Result<()> {
        if let Some(lead) = self.held {
            lead.release().await?;
        }
        Ok(())
    }
}

/// How the loop runs.
#[derive(Debug, Clone)]
pub struct LoopSettings {
    /// Pass interval when nothing wakes the loop.
    pub tick: Duration,
    /// Advisory-lock key of the leader election.
    pub leader_key: i64,
}

/// Run as leader (or standby until leadership is won) until `shutdown`,
/// elected with a PostgreSQL advisory lock.
pub async fn run<B: Backend, S: PoolSource>(
    reconciler: Reconciler<B>,
    source: S,
    settings: LoopSettings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let election = AdvisoryLock::new(reconciler.ctx.queue.clone(), settings.leader_key, settings.tick);
    run_elected(reconciler, source, election, settings, shutdown).await
}

/// The loop: a pass on every tick, on a runnable task for a pool at zero,
/// and whenever the source's pools change — while this controller leads.
pub async fn run_elected<B: Backend, S: PoolSource, E: Election>(
    mut reconciler: Reconciler<B>,
    mut source: S,
    mut election: E,
    settings: LoopSettings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if !election.acquire(&shutdown).await? {
        return Ok(());
    }
    tracing::info!("leader: this controller acts on the pools");
    let queue = reconciler.ctx.queue.clone();
    let mut wake = loop {
        match queue.listen().await {
            Ok(wake) => break wake,
            Err(queue::QueueError::Database(e)) if queue::is_transient(&e) => {
                tracing::warn!(error = %e, "listening failed: the database cannot be reached; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(settings.tick.min(Duration::from_secs(2))) => {}
                }
            }
            Err(e) => return Err(e.into()),
        }
    };
    let mut tick = tokio::time::interval(settings.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pools = source.load().await;
    reconciler.release_stale_marks(&pools).await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
            _ = source.changed() => tracing::debug!("pools changed"),
            note = wake.next(settings.tick) => match note {
                // A task became runnable: act now if its pool is at zero
                // (scale-from-zero must not wait for the tick).
                Ok(Some(Some(task_type))) => {
                    let Some(pool) = pools.iter().find(|p| p.pool.spec.task_types.contains(&task_type)) else { continue };
                    if !reconciler.is_at_zero(&pool_key(pool)) { continue; }
                    tracing::debug!(pool = pool.name(), %task_type, "woken by a runnable task");
                }
                Ok(Some(None)) => {}
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "listener failed; relying on the tick");
                    tokio::time::sleep(settings.tick).await;
                }
            },
        }
        if !election.still_held().await {
            // The lock's session died (a database restart, a network cut) or
            // a standby took over: act on nothing until leading again. The
            // replicas keep running; exiting would stop the local ones.
            tracing::warn!("lost leadership; standing by until it is won again");
            if !election.acquire(&shutdown).await? {
                break;
            }
            tracing::info!("leader again: this controller acts on the pools");
            // Marks set by whoever led meanwhile are this leader's to settle.
            pools = source.load().await;
            reconciler.release_stale_marks(&pools).await;
        }
        pools = source.load().await;
        reconciler.reconcile(&pools, Utc::now()).await;
    }
    tracing::info!("controller stopping");
    reconciler.ctx.backend.shutdown().await;
    election.release().await?;
    Ok(())
}
