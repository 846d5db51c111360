//! The run loop: rounds on every tick, on a runnable task for a pool at
//! zero and whenever the source's pools change — while this controller
//! leads. Passes run beside the loop, so a round never waits for a slow
//! pool: a pool at zero is woken while another pool's backend hangs.

use std::time::Duration;

use chrono::Utc;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio_util::sync::CancellationToken;

use super::election::{AdvisoryLock, Election};
use super::source::PoolSource;
use super::{pool_key, Reconciler};
use crate::backend::Backend;

/// How the loop runs.
#[derive(Debug, Clone)]
pub struct LoopSettings {
    /// Round interval when nothing wakes the loop.
    pub tick: Duration,
    /// Advisory-lock key of the leader election.
    pub leader_key: i64,
}

/// Run as leader (or standby until leadership is won) until `shutdown`,
/// elected with a PostgreSQL advisory lock.
pub async fn run<B: Backend + 'static, S: PoolSource>(
    reconciler: Reconciler<B>,
    source: S,
    settings: LoopSettings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let election = AdvisoryLock::new(
        reconciler.context().queue.clone(),
        settings.leader_key,
        settings.tick,
    );
    run_elected(reconciler, source, election, settings, shutdown).await
}

/// The loop, elected by `election`.
pub async fn run_elected<B: Backend + 'static, S: PoolSource, E: Election>(
    mut reconciler: Reconciler<B>,
    mut source: S,
    mut election: E,
    settings: LoopSettings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    reconciler.set_leading(false);
    election.share(reconciler.leadership().clone());
    if !election.acquire(&shutdown).await? {
        return Ok(());
    }
    reconciler.set_leading(true);
    tracing::info!("leader: this controller acts on the pools");
    let queue = reconciler.context().queue.clone();
    let mut wake = loop {
        match queue.listen().await {
            Ok(wake) => break wake,
            Err(e) if e.is_transient() => {
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
    reconciler.take_office().await;
    let mut pools = source.load().await;
    reconciler.set_rejected(&pools, &source.rejected());
    let mut passes = FuturesUnordered::new();
    // When a pool at zero has a retry falling due: a round then, not at
    // the next tick.
    let mut due: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(done) = passes.next() => {
                if let Some(at) = reconciler.finish(done).and_then(|r| r.decision.wake_at) {
                    let wait = (at - Utc::now()).to_std().unwrap_or_default();
                    let at = tokio::time::Instant::now() + wait;
                    due = Some(due.map_or(at, |d| d.min(at)));
                }
                continue;
            }
            _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                due = None;
                tracing::debug!("woken for a retry falling due");
            }
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
            // a standby took over: act on nothing until leading again. Passes
            // in flight see it before their next action and stop there. The
            // replicas keep running; exiting would stop the local ones.
            reconciler.set_leading(false);
            tracing::warn!("lost leadership; standing by until it is won again");
            while let Some(done) = passes.next().await {
                reconciler.finish(done);
            }
            if !election.acquire(&shutdown).await? {
                break;
            }
            reconciler.set_leading(true);
            tracing::info!("leader again: this controller acts on the pools");
            // Whoever led meanwhile left memory and marks to take up.
            reconciler.take_office().await;
        }
        pools = source.load().await;
        reconciler.set_rejected(&pools, &source.rejected());
        let snapshot = reconciler.read_queue().await;
        for pass in reconciler.begin(&pools, snapshot, Utc::now()) {
            passes.push(pass.run());
        }
        reconciler.forget_removed(&pools).await;
    }
    tracing::info!("controller stopping");
    // Let passes in flight finish (each is bounded by its deadline): one
    // cut between drain and stop would leave its marks to the next leader.
    while let Some(done) = passes.next().await {
        reconciler.finish(done);
    }
    reconciler.context().backend.shutdown().await;
    election.release().await?;
    Ok(())
}
