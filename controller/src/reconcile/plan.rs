//! `controller plan`: what the next pass of `run` would do for each pool,
//! from the state `run` decides from — the backend's replicas, the queue,
//! and the policy memory the leader stored (windows, rate limits, idle
//! time). Changes nothing.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::pass::{self, QueueSnapshot};
use super::{pool_key, Context, Leadership};
use crate::backend::{Backend, PoolRef};
use crate::manifest::LoadedPool;
use crate::policy::{self, Decision, History};
use crate::spec::WorkerPoolStatus;

/// One pool's planned pass.
#[derive(Debug, Clone)]
pub struct PlanReport {
    pub pool: String,
    /// The policy's decision; `None` when the backend could not be read.
    pub decision: Option<Decision>,
    pub status: WorkerPoolStatus,
    /// Idle replicas the pass would drain and stop, in order.
    pub would_remove: Vec<String>,
    /// Whether the leader's stored memory was used (else: an empty history,
    /// as a pool's first pass has).
    pub from_stored_memory: bool,
    /// Why the pool cannot be planned (its backend did not answer).
    pub error: Option<String>,
}

/// Plan every pool at time `now`. Reads only: the backend is asked through
/// [`Backend::inspect`].
pub async fn plan<B: Backend>(
    ctx: &Context<B>,
    pools: &[LoadedPool],
    now: DateTime<Utc>,
) -> Result<Vec<PlanReport>, queue::QueueError> {
    let snapshot: Result<QueueSnapshot, String> = Ok(QueueSnapshot::read(&ctx.queue).await?);
    let mut memories: HashMap<String, History> = ctx
        .queue
        .policy_memories()
        .await?
        .into_iter()
        .filter_map(|(key, document)| Some((key, pass::history_from_document(&document)?)))
        .collect();
    // Never leading: a write the backend's inspection would make is refused.
    let looking = Leadership::never();
    let mut reports = Vec::with_capacity(pools.len());
    for loaded in pools {
        let key = pool_key(loaded);
        let stored = memories.remove(&key);
        let mut report = PlanReport {
            pool: key,
            decision: None,
            status: WorkerPoolStatus::default(),
            would_remove: Vec::new(),
            from_stored_memory: stored.is_some(),
            error: None,
        };
        let replicas = match ctx.backend.inspect(PoolRef::new(loaded, &looking)).await {
            Ok(replicas) => replicas,
            Err(e) => {
                report.error = Some(e.to_string());
                reports.push(report);
                continue;
            }
        };
        let observation = pass::observe(&loaded.pool.spec.task_types, &replicas, &snapshot);
        let history = stored.unwrap_or_default();
        let decision = policy::decide(&loaded.pool.spec, &observation, &history, now);
        if decision.replicas < decision.from {
            let busy = &snapshot.as_ref().expect("read above").busy;
            let count = (decision.from - decision.replicas) as usize;
            report.would_remove = pass::removal_candidates(&replicas, busy, count);
        }
        pass::update_status(
            &mut report.status,
            loaded,
            &observation,
            &decision,
            report.would_remove.len(),
            now,
        );
        report.decision = Some(decision);
        reports.push(report);
    }
    Ok(reports)
}
