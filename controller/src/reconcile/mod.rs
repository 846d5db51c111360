//! The reconcile loop: one grouped depth query and one registry read per
//! round for all pools, then each pool's pass — the pure policy, the
//! backend, the drain protocol in front of every removal — side by side,
//! each with its own deadline, so no pool waits on another.
//!
//! - [`pass`]: one pool's pass;
//! - [`plan`]: what the next pass would do, for `controller plan`;
//! - [`source`]: where pools come from (files; Kubernetes has its own);
//! - [`election`]: which controller acts;
//! - [`run`]: the loop that ties them together.

mod election;
mod error;
mod pass;
mod plan;
mod run;
mod source;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use queue::Queue;
use tokio::sync::Semaphore;

pub use election::{AdvisoryLock, Election};
pub use error::PassError;
pub use plan::{plan, PlanReport};
pub use run::{run, run_elected, LoopSettings};
pub use source::{ManifestSource, PoolSource, RejectedPool};

use crate::backend::Backend;
use crate::manifest::LoadedPool;
use crate::metrics::Metrics;
use crate::policy::{Decision, History};
use crate::spec::{ConditionType, WorkerPoolStatus};
use pass::{Pass, PassDone, PoolState, QueueSnapshot, SharedSnapshot};

/// What `reconcile` needs, handed in once.
pub struct Context<B> {
    pub queue: Queue,
    pub backend: B,
    pub metrics: Arc<Metrics>,
}

/// The key a pool's state is kept under: `namespace/name` for WorkerPool
/// objects (names repeat across namespaces), the name for pools from files.
pub fn pool_key(pool: &LoadedPool) -> String {
    key_of(&pool.pool.metadata)
}

/// [`pool_key`] from a WorkerPool's metadata.
pub fn key_of(metadata: &kube::api::ObjectMeta) -> String {
    let name = metadata.name.as_deref().unwrap_or_default();
    match &metadata.namespace {
        Some(namespace) => format!("{namespace}/{name}"),
        None => name.to_string(),
    }
}

/// One pool's outcome of a pass, for logs and tests.
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

/// Whether this controller leads, as the run loop last learned it. Passes
/// and backends check it before every write (a start, a drain, a stop, a
/// scale), so a pass that outlives its controller's leadership acts on
/// nothing more.
#[derive(Clone, Debug)]
pub struct Leadership(Arc<AtomicBool>);

impl Leadership {
    /// Leading, until [`Leadership::set`] says otherwise.
    pub fn held() -> Self {
        Leadership(Arc::new(AtomicBool::new(true)))
    }

    /// Never leading: for looking without acting (`controller plan`).
    pub fn never() -> Self {
        Leadership(Arc::new(AtomicBool::new(false)))
    }

    pub fn is_held(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    pub fn set(&self, held: bool) {
        self.0.store(held, Ordering::SeqCst);
    }
}

/// How passes run.
#[derive(Debug, Clone)]
pub struct PassSettings {
    /// A pass (observe, decide, scale) abandoned after this long: the pool
    /// gets `Ready=False` (`DeadlineExceeded`) and is retried with backoff.
    /// Longer than a backend's own waits (a Fly machine's stop: 60 s).
    pub deadline: Duration,
    /// Passes running at once. A task type is served by one pool per
    /// database, so pools per controller are few.
    pub max_concurrent: usize,
}

impl Default for PassSettings {
    fn default() -> Self {
        PassSettings {
            deadline: Duration::from_secs(120),
            max_concurrent: 16,
        }
    }
}

pub struct Reconciler<B> {
    ctx: Arc<Context<B>>,
    state: HashMap<String, PoolState>,
    /// Pools whose pass is running; a new round skips them.
    in_flight: HashSet<String>,
    leadership: Leadership,
    settings: PassSettings,
    permits: Arc<Semaphore>,
    /// The pools the source turned away, reported `Ready=False`.
    rejected: Vec<RejectedPool>,
}

impl<B: Backend + 'static> Reconciler<B> {
    pub fn new(ctx: Context<B>) -> Self {
        Self::with_settings(ctx, PassSettings::default())
    }

    pub fn with_settings(ctx: Context<B>, settings: PassSettings) -> Self {
        // A reconciler leads until told otherwise (the run loop does).
        ctx.metrics.set_leader(true);
        Reconciler {
            ctx: Arc::new(ctx),
            state: HashMap::new(),
            in_flight: HashSet::new(),
            leadership: Leadership::held(),
            permits: Arc::new(Semaphore::new(settings.max_concurrent.max(1))),
            settings,
            rejected: Vec::new(),
        }
    }

    pub fn context(&self) -> &Context<B> {
        &self.ctx
    }

    pub fn leadership(&self) -> &Leadership {
        &self.leadership
    }

    /// Leadership won or lost: passes see it before their next action, and
    /// `/metrics` says it (a standby reports no pool).
    pub fn set_leading(&self, held: bool) {
        self.leadership.set(held);
        self.ctx.metrics.set_leader(held);
    }

    /// One round over every pool at time `now`, all passes side by side,
    /// returning when all are done. A pool whose pass fails gets
    /// `Ready=False` with the error and a backed-off retry; the other pools
    /// go on. The reports are those of the pools that succeeded, in order.
    pub async fn reconcile(&mut self, pools: &[LoadedPool], now: DateTime<Utc>) -> Vec<PoolReport> {
        let snapshot = self.read_queue().await;
        let passes = self.begin(pools, snapshot, now);
        let done = futures::future::join_all(passes.into_iter().map(Pass::run)).await;
        let reports = done.into_iter().filter_map(|d| self.finish(d)).collect();
        self.forget_removed(pools).await;
        reports
    }

    /// Read the queue once for a round.
    async fn read_queue(&self) -> SharedSnapshot {
        Arc::new(
            QueueSnapshot::read(&self.ctx.queue)
                .await
                .map_err(|e| e.to_string()),
        )
    }

    /// The passes of a round: every pool not already in a pass and not
    /// waiting out a failure's backoff.
    fn begin(&mut self, pools: &[LoadedPool], snapshot: SharedSnapshot, now: DateTime<Utc>) -> Vec<Pass<B>> {
        let mut passes = Vec::with_capacity(pools.len());
        for loaded in pools {
            let key = pool_key(loaded);
            if self.in_flight.contains(&key) || self.waiting_to_retry(&key, loaded, now) {
                continue;
            }
            self.in_flight.insert(key.clone());
            passes.push(Pass {
                ctx: self.ctx.clone(),
                leadership: self.leadership.clone(),
                deadline: self.settings.deadline,
                permits: self.permits.clone(),
                loaded: loaded.clone(),
                state: self.state.get(&key).cloned().unwrap_or_default(),
                key,
                snapshot: snapshot.clone(),
                now,
            });
        }
        passes
    }

    /// Keep what a pass learned.
    fn finish(&mut self, done: PassDone) -> Option<PoolReport> {
        self.in_flight.remove(&done.key);
        self.state.insert(done.key, done.state);
        done.report
    }

    /// The pools the source turned away: no pass runs for them, and
    /// `/metrics` says `Ready=False` (the alert on a pool not Ready covers
    /// a spec edited into an invalid one, which stops its scaling). A name
    /// an admitted pool also has (a duplicate document, another namespace's
    /// pool) stays that pool's.
    pub fn set_rejected(&mut self, pools: &[LoadedPool], rejected: &[RejectedPool]) {
        self.rejected = rejected
            .iter()
            .filter(|r| !pools.iter().any(|p| p.name() == r.name))
            .cloned()
            .collect();
        if self.leadership.is_held() {
            for rejected in &self.rejected {
                self.ctx.metrics.record_rejected(&rejected.name);
            }
        }
    }

    /// Forget pools whose manifests were removed, here and in the database,
    /// and report the rejected ones where `GET /v1/pools` reads.
    async fn forget_removed(&mut self, pools: &[LoadedPool]) {
        let names: Vec<&str> = pools
            .iter()
            .map(|p| p.name())
            .chain(self.rejected.iter().map(|r| r.name.as_str()))
            .collect();
        self.ctx.metrics.forget_pools_except(&names);
        let live: HashSet<String> = pools.iter().map(pool_key).collect();
        self.state
            .retain(|key, _| live.contains(key) || self.in_flight.contains(key));
        let backend = self.ctx.backend.name();
        let defined: Vec<String> = live
            .into_iter()
            .chain(self.rejected.iter().map(|r| r.key.clone()))
            .collect();
        if let Err(e) = self.ctx.queue.forget_pool_statuses(backend, &defined).await {
            tracing::warn!(error = %e, "could not prune the status of removed pools");
        }
        self.report_rejected().await;
    }

    /// Write `Ready=False, InvalidSpec` and why into each rejected pool's
    /// status row, keeping the rest of what its last pass wrote (its
    /// replicas may still run; nothing scales them now). Without it, a pool
    /// edited into an invalid spec went on showing `Ready=True` in
    /// `GET /v1/pools`, and a new one that never ran was missing there.
    async fn report_rejected(&self) {
        if self.rejected.is_empty() || !self.leadership.is_held() {
            return;
        }
        let stored = match self.ctx.queue.pool_statuses().await {
            Ok(stored) => stored,
            Err(e) => {
                tracing::warn!(error = %e, "could not read pool statuses to report rejected pools");
                return;
            }
        };
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        for rejected in &self.rejected {
            let last = stored
                .iter()
                .find(|r| r.status.pool == rejected.key)
                .map(|r| &r.status);
            let row = rejected_status(last, rejected, self.ctx.backend.name(), &now);
            if let Err(e) = self.ctx.queue.put_pool_status(&row).await {
                tracing::warn!(pool = %rejected.key, error = %e, "could not report the rejected pool's status");
                self.ctx.count_error(&rejected.name, "status");
            }
        }
    }

    /// A failing pool waits for its retry time, unless its spec changed.
    fn waiting_to_retry(&self, key: &str, pool: &LoadedPool, now: DateTime<Utc>) -> bool {
        let failing = self.state.get(key).and_then(|s| s.failing.as_ref());
        failing.is_some_and(|f| now < f.retry_at && f.spec == pool.pool.spec)
    }

    /// The pool's status as of its last pass, if it had one.
    pub fn status(&self, key: &str) -> Option<&WorkerPoolStatus> {
        self.state.get(key).map(|s| &s.status)
    }

    /// The policy's memory of the pool, as of its last pass.
    pub fn history(&self, key: &str) -> Option<&History> {
        self.state.get(key).map(|s| &s.history)
    }

    /// On winning leadership: take up the policy memory the last leader
    /// stored (its windows and rate limits hold across the hand-over), and
    /// have each pool's next pass clear, before its decision, the draining
    /// marks an earlier leader left on replicas it did not stop (it crashed
    /// or lost leadership between drain and stop). In the passes, not here:
    /// a hung backend must not keep the other pools from their first pass.
    pub async fn take_office(&mut self) {
        self.ctx.backend.take_office().await;
        self.restore_memory().await;
        for state in self.state.values_mut() {
            state.marks_settled = false;
        }
    }

    async fn restore_memory(&mut self) {
        let stored = match self.ctx.queue.policy_memories().await {
            Ok(stored) => stored,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the stored policy memory; starting from this controller's own");
                return;
            }
        };
        for (key, document) in stored {
            match pass::history_from_document(&document) {
                Some(history) => self.state.entry(key).or_default().history = history,
                None => {
                    tracing::warn!(pool = %key, "stored policy memory of another version; starting afresh")
                }
            }
        }
    }

    /// The pool's replicas were last seen at zero: a notification for one of
    /// its task types should wake the loop at once.
    pub fn is_at_zero(&self, key: &str) -> bool {
        self.state.get(key).is_none_or(|s| s.status.current_replicas == 0)
    }
}

/// A rejected pool's status row: the last one written for it (or an empty
/// one) with `Ready=False, InvalidSpec` and why; `lastTransitionTime` stays
/// when it was already not ready, the Kubernetes way.
fn rejected_status(
    last: Option<&queue::PoolStatus>,
    rejected: &RejectedPool,
    backend: &str,
    now: &Time,
) -> queue::PoolStatus {
    let mut row = last.cloned().unwrap_or_else(|| queue::PoolStatus {
        pool: rejected.key.clone(),
        ..Default::default()
    });
    let mut status = WorkerPoolStatus {
        conditions: serde_json::from_value(row.conditions.clone()).unwrap_or_default(),
        ..Default::default()
    };
    status.set_condition(ConditionType::Ready, false, "InvalidSpec", &rejected.message, now);
    row.conditions = serde_json::to_value(&status.conditions).unwrap_or_else(|_| serde_json::json!([]));
    row.backend = backend.to_string();
    row
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(message: &str) -> RejectedPool {
        RejectedPool {
            key: "text".into(),
            name: "text".into(),
            message: message.into(),
        }
    }

    fn at(seconds: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(1_800_000_000 + seconds).unwrap())
    }

    fn ready(row: &queue::PoolStatus) -> serde_json::Value {
        row.conditions
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .cloned()
            .unwrap()
    }

    #[test]
    fn a_pool_rejected_before_it_ever_ran_gets_a_row_saying_why() {
        let row = rejected_status(
            None,
            &rejected("spec.minReplicas: 9 is above maxReplicas 5"),
            "local",
            &at(0),
        );
        assert_eq!((row.pool.as_str(), row.backend.as_str()), ("text", "local"));
        assert_eq!((row.desired_replicas, row.current_replicas), (0, 0));
        let ready = ready(&row);
        assert_eq!(
            (ready["status"].as_str(), ready["reason"].as_str()),
            (Some("False"), Some("InvalidSpec"))
        );
        assert_eq!(ready["message"], "spec.minReplicas: 9 is above maxReplicas 5");
    }

    #[test]
    fn a_running_pool_edited_into_an_invalid_spec_keeps_its_figures_and_turns_not_ready() {
        let mut running = WorkerPoolStatus::default();
        running.set_condition(ConditionType::Ready, true, "Reconciled", "", &at(0));
        running.set_condition(ConditionType::Active, true, "Pending", "", &at(0));
        let last = queue::PoolStatus {
            pool: "text".into(),
            backend: "local".into(),
            desired_replicas: 3,
            current_replicas: 3,
            ready_replicas: 3,
            busy_replicas: 2,
            pending: 7,
            in_flight: 2,
            conditions: serde_json::to_value(&running.conditions).unwrap(),
            task_types: vec!["text_generation".into()],
            ..Default::default()
        };
        let row = rejected_status(Some(&last), &rejected("bad"), "local", &at(60));
        assert_eq!((row.current_replicas, row.busy_replicas, row.pending), (3, 2, 7));
        assert_eq!(row.task_types, ["text_generation"]);
        let ready = ready(&row);
        assert_eq!(
            (ready["status"].as_str(), ready["message"].as_str()),
            (Some("False"), Some("bad"))
        );
        assert_eq!(ready["lastTransitionTime"], serde_json::to_value(at(60)).unwrap());
        assert_eq!(row.conditions.as_array().unwrap().len(), 2, "Active is kept");

        // Still rejected a pass later, for another reason: the time it
        // turned not ready stays.
        let again = rejected_status(Some(&row), &rejected("worse"), "local", &at(120));
        let ready = self::ready(&again);
        assert_eq!(ready["message"], "worse");
        assert_eq!(ready["lastTransitionTime"], serde_json::to_value(at(60)).unwrap());
    }
}
