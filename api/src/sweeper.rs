//! The periodic sweeper: takes tasks back from dead or overdue workers;
//! repairs any job left unfinished after its tasks (it should find none);
//! when retention is set, prunes old finished jobs; and removes the bytes of
//! artifacts nobody records any more (pruned, or replaced by a re-run). Several API replicas may run it
//! at once; the queue makes concurrent sweeps safe, and deleting an object
//! twice is harmless.

use std::sync::Arc;

use futures::StreamExt;
use queue::Queue;
use store::ArtifactStore;
use tokio::time::{interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::state::SweeperSettings;

pub async fn run(
    queue: Queue,
    artifacts: ArtifactStore,
    settings: SweeperSettings,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut sweep_tick = interval(settings.interval);
    let mut retention_tick = interval(settings.retention_interval);
    let mut repair_tick = interval(settings.repair_interval);
    for tick in [&mut sweep_tick, &mut retention_tick, &mut repair_tick] {
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    }
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = sweep_tick.tick() => sweep_once(&queue, &settings, &metrics).await,
            _ = repair_tick.tick() => {
                repair_once(&queue, &metrics).await;
                delete_pruned_artifacts(&queue, &artifacts, &metrics).await;
            }
            _ = retention_tick.tick(), if settings.retention.is_some() => {
                prune_once(&queue, &settings, &metrics).await;
                delete_pruned_artifacts(&queue, &artifacts, &metrics).await;
            }
        }
    }
}

pub async fn sweep_once(queue: &Queue, settings: &SweeperSettings, metrics: &Metrics) {
    match queue.sweep(settings.stale_after).await {
        Ok(outcome) => {
            metrics.record_run("sweep", true);
            // The queue logs each task taken back, with its worker.
            metrics.record_sweep(&outcome);
            if outcome.workers_removed > 0 {
                tracing::info!(
                    workers = outcome.workers_removed,
                    "sweeper removed silent workers"
                );
            }
        }
        Err(error) => {
            metrics.record_run("sweep", false);
            tracing::error!(%error, "sweep failed");
        }
    }
}

/// Put right jobs whose tasks all finished while they did not. Counted in
/// `/metrics` (`action="jobs_repaired"`): anything but zero is a bug.
pub async fn repair_once(queue: &Queue, metrics: &Metrics) {
    match queue.repair_stuck_jobs().await {
        Ok(repaired) => {
            metrics.record_run("repair", true);
            metrics.record_repaired(repaired.len() as u64);
            if !repaired.is_empty() {
                // The ids an operator needs to look into it (README, BacklogJobsRepaired).
                tracing::warn!(jobs = ?repaired, "repaired jobs left unfinished after all their tasks finished");
            }
        }
        Err(error) => {
            metrics.record_run("repair", false);
            tracing::error!(%error, "repairing stuck jobs failed");
        }
    }
}

async fn prune_once(queue: &Queue, settings: &SweeperSettings, metrics: &Metrics) {
    let Some(retention) = settings.retention else {
        return;
    };
    match queue.prune(retention).await {
        Ok(removed) => {
            metrics.record_run("retention", true);
            metrics.record_pruned(removed);
            if removed > 0 {
                tracing::info!(jobs = removed, mode = ?retention.mode, "retention removed finished jobs");
            }
        }
        Err(error) => {
            metrics.record_run("retention", false);
            tracing::error!(%error, "retention failed");
        }
    }
}

/// Keys taken from the queue per round of the cleaner.
const DELETION_BATCH: i64 = 500;
/// Objects deleted at once: S3 deletes are round trips.
const DELETION_CONCURRENCY: usize = 8;

/// Remove the bytes of artifacts whose records retention deleted. A key is
/// forgotten only once its object is gone, so a failed delete is retried at
/// the next round.
pub async fn delete_pruned_artifacts(queue: &Queue, artifacts: &ArtifactStore, metrics: &Metrics) {
    loop {
        let keys = match queue.artifact_deletions(DELETION_BATCH).await {
            Ok(keys) => keys,
            Err(error) => {
                metrics.record_run("artifact_cleanup", false);
                tracing::error!(%error, "reading the artifacts to delete failed");
                return;
            }
        };
        if keys.is_empty() {
            return;
        }
        let results: Vec<(String, Result<(), store::StoreError>)> =
            futures::stream::iter(keys.iter().cloned())
                .map(|key| async move {
                    let result = artifacts.delete(&key).await;
                    (key, result)
                })
                .buffer_unordered(DELETION_CONCURRENCY)
                .collect()
                .await;
        let mut deleted = Vec::with_capacity(results.len());
        let mut failed = 0;
        for (key, result) in results {
            match result {
                Ok(()) => deleted.push(key),
                // A bad key or a refused permission will not get better:
                // say so once and forget it, or it would block the queue.
                Err(error) if !error.is_retryable() => {
                    tracing::error!(key = %key, %error, "cannot delete an artifact's bytes; giving up on it");
                    deleted.push(key);
                }
                Err(error) => {
                    failed += 1;
                    tracing::warn!(key = %key, %error, "could not delete an artifact's bytes; retrying later");
                }
            }
        }
        if let Err(error) = queue.forget_artifact_deletions(&deleted).await {
            metrics.record_run("artifact_cleanup", false);
            tracing::error!(%error, "recording deleted artifacts failed");
            return;
        }
        metrics.record_run("artifact_cleanup", failed == 0);
        tracing::info!(
            deleted = deleted.len(),
            failed,
            "removed pruned artifacts from the store"
        );
        if failed > 0 || (keys.len() as i64) < DELETION_BATCH {
            return;
        }
    }
}
