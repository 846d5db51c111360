//! The reconcile loop: one grouped depth query and one registry read per
//! pass for all pools, the pure policy per pool, then the backend — with
//! the drain protocol in front of every removal.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use queue::{Queue, TaskDepth, TaskType};
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, PoolRef, Replica};
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
}

/// One pool's outcome of a pass, for logs, `plan` and tests.
#[derive(Debug, Clone)]
pub struct PoolReport {
    pub pool: String,
    pub decision: Decision,
    pub status: WorkerPoolStatus,
    /// Replicas actually removed (drained and idle).
    pub removed: Vec<String>,
    /// Replicas chosen for removal that picked up work first and were kept.
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

    /// One pass over every pool at time `now`.
    pub async fn reconcile(&mut self, pools: &[LoadedPool], now: DateTime<Utc>) -> Vec<PoolReport> {
        let started = std::time::Instant::now();
        let snapshot = self.read_queue().await;
        let mut reports = Vec::with_capacity(pools.len());
        for pool in pools {
            match self.reconcile_pool(pool, snapshot.as_ref(), now).await {
                Ok(report) => reports.push(report),
                Err(e) => {
                    tracing::warn!(pool = pool.name(), error = %e, "reconcile failed");
                    self.count_error(pool.name(), "backend");
                }
            }
        }
        // Forget pools whose manifests were removed.
        let live: HashSet<&str> = pools.iter().map(|p| p.name()).collect();
        self.state.retain(|name, _| live.contains(name.as_str()));
        if snapshot.is_ok() {
            self.publish_status(pools, &reports).await;
        }
        self.ctx
            .metrics
            .reconcile_seconds
            .observe(started.elapsed().as_secs_f64());
        reports
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
        snapshot: Result<&QueueSnapshot, &String>,
        now: DateTime<Utc>,
    ) -> Result<PoolReport, crate::backend::BackendError> {
        let name = loaded.name().to_string();
        let spec = &loaded.pool.spec;
        let pool = PoolRef { name: &name, spec };
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
        let state = self.state.entry(name.clone()).or_default();
        let decision = policy::decide(spec, &observation, &state.history, now);
        state.history.record(&decision, now);

        let mut removed = Vec::new();
        let mut kept_busy = Vec::new();
        if decision.replicas > decision.from {
            self.ctx
                .backend
                .add(pool, decision.replicas - decision.from)
                .await?;
        } else if decision.replicas < decision.from {
            let busy = match snapshot {
                Ok(s) => &s.busy,
                // The policy holds on a failed read, so this is unreachable
                // in practice; never remove blind.
                Err(_) => {
                    return Err(crate::backend::BackendError::Failed {
                        pool: name,
                        message: "queue unreadable: not removing replicas".into(),
                    })
                }
            };
            let candidates =
                removal_candidates(&replicas, busy, (decision.from - decision.replicas) as usize);
            let drained = self.ctx.queue.drain_idle(&candidates).await.map_err(|e| {
                crate::backend::BackendError::Failed {
                    pool: name.clone(),
                    message: format!("drain: {e}"),
                }
            })?;
            kept_busy = candidates
                .iter()
                .filter(|c| !drained.contains(c))
                .cloned()
                .collect();
            if let Err(e) = self.ctx.backend.remove(pool, &drained).await {
                // Not removed: let them claim again.
                let _ = self.ctx.queue.undrain(&drained).await;
                return Err(e);
            }
            removed = drained;
        }

        let state = self.state.get_mut(&name).expect("inserted above");
        update_status(
            &mut state.status,
            loaded,
            &observation,
            &decision,
            removed.len(),
            now,
        );
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
    async fn publish_status(&self, pools: &[LoadedPool], reports: &[PoolReport]) {
        let backend = self.ctx.backend.name();
        for report in reports {
            let s = &report.status;
            let row = queue::PoolStatus {
                pool: report.pool.clone(),
                backend: backend.to_string(),
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
                tracing::warn!(pool = %report.pool, error = %e, "could not write the pool's status");
                self.count_error(&report.pool, "status");
            }
        }
        let live: Vec<String> = pools.iter().map(|p| p.name().to_string()).collect();
        if let Err(e) = self.ctx.queue.forget_pool_statuses(backend, &live).await {
            tracing::warn!(error = %e, "could not prune the status of removed pools");
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
    pub fn is_at_zero(&self, pool: &str) -> bool {
        self.state
            .get(pool)
            .is_none_or(|s| s.status.current_replicas == 0)
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

/// How the loop runs.
#[derive(Debug, Clone)]
pub struct LoopSettings {
    /// Pass interval when nothing wakes the loop.
    pub tick: Duration,
    /// Advisory-lock key of the leader election.
    pub leader_key: i64,
}

/// Run as leader (or standby until leadership is won) until `shutdown`.
pub async fn run<B: Backend>(
    mut reconciler: Reconciler<B>,
    mut source: ManifestSource,
    settings: LoopSettings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let queue = reconciler.ctx.queue.clone();
    let mut leadership = loop {
        if let Some(lead) = queue.try_lead(settings.leader_key).await? {
            tracing::info!("leader: this controller acts on the pools");
            break lead;
        }
        tracing::info!("standby: another controller is the leader; waiting");
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(settings.tick) => {}
        }
    };

    let mut wake = queue.listen().await?;
    let mut tick = tokio::time::interval(settings.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
            note = wake.next(settings.tick) => match note {
                // A task became runnable: act now if its pool is at zero
                // (scale-from-zero must not wait for the tick).
                Ok(Some(Some(task_type))) => {
                    let pools = source.pools();
                    let Some(pool) = pools.iter().find(|p| p.pool.spec.task_types.contains(&task_type)) else { continue };
                    if !reconciler.is_at_zero(pool.name()) { continue; }
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
        if !leadership.still_held().await {
            anyhow::bail!("lost the leader lock's database session; exiting so a standby takes over");
        }
        let pools = source.pools().to_vec();
        reconciler.reconcile(&pools, Utc::now()).await;
    }
    tracing::info!("controller stopping");
    reconciler.ctx.backend.shutdown().await;
    leadership.release().await?;
    Ok(())
}
