//! The maintenance services, each on its own clock: the sweeper takes
//! tasks back from dead or overdue workers; the repairer puts right any job
//! left unfinished after its tasks (it should find none); retention, when
//! set, prunes old finished jobs; the partitioner creates the coming days'
//! history partitions; and the cleaner removes the bytes of
//! artifacts nobody records any more (pruned, or replaced by a re-run),
//! and the bytes and idempotency keys of the days retention dropped; the
//! vacuumer clears the entries claims leave at the head of the open-task
//! table's indexes.
//! They run side by side, so a slow store (an S3 delete retries for
//! minutes) never holds up the sweep that rescues tasks. Several API
//! replicas may run them at once; the queue makes concurrent sweeps safe,
//! and deleting an object twice is harmless.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use queue::{Queue, RetiredDay, VacuumOutcome};
use store::ArtifactStore;
use tokio::time::{interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::metrics::Metrics;
use crate::state::SweeperSettings;

pub async fn run(
    queue: Queue,
    artifacts: ArtifactStore,
    settings: SweeperSettings,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let (queue, settings, metrics) = (&queue, &settings, &*metrics);
    let retention = async {
        if settings.retention.is_some() {
            every(settings.retention_interval, &shutdown, || {
                prune_once(queue, settings, metrics)
            })
            .await;
        }
    };
    let vacuum = async {
        if let Some(period) = settings.vacuum_interval {
            let vacuumer = Vacuumer::default();
            every(period, &shutdown, || {
                vacuum_once(queue, settings, metrics, &vacuumer)
            })
            .await;
        }
    };
    tokio::join!(
        every(settings.interval, &shutdown, || sweep_once(
            queue, settings, metrics
        )),
        every(settings.repair_interval, &shutdown, || repair_once(
            queue, metrics
        )),
        every(settings.repair_interval, &shutdown, || clean_store(
            queue, &artifacts, metrics
        )),
        every(settings.repair_interval, &shutdown, || create_history_partitions(
            queue, metrics
        )),
        retention,
        vacuum,
    );
}

/// Runs `service` now and then every `period` (later, if a run overran),
/// until shutdown, which also ends a run under way: what a run leaves
/// undone is picked up by the next run of any replica.
async fn every<F: Future<Output = ()>>(
    period: Duration,
    shutdown: &CancellationToken,
    mut service: impl FnMut() -> F,
) {
    let mut tick = interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = service() => {}
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

/// What the vacuumer carries from one look to the next.
#[derive(Default)]
struct Vacuumer {
    /// Dead rows the last vacuum left: those a long transaction holds do
    /// not make every look vacuum again.
    left_last_time: AtomicI64,
    /// Whether the role's lack of the right to vacuum was logged.
    refusal_logged: AtomicBool,
}

/// Vacuum the open-task table once enough of its rows died since the last
/// vacuum (see `queue::TaskVacuum`); autovacuum looks at most once a minute.
async fn vacuum_once(queue: &Queue, settings: &SweeperSettings, metrics: &Metrics, vacuumer: &Vacuumer) {
    let left = vacuumer.left_last_time.load(Ordering::Relaxed);
    match queue.vacuum_tasks(settings.vacuum_min_dead_rows, left).await {
        Ok(look) => {
            metrics.record_run("vacuum", true);
            match look.outcome {
                VacuumOutcome::Vacuumed => {
                    vacuumer.left_last_time.store(look.dead_rows, Ordering::Relaxed);
                    metrics.record_vacuum();
                    tracing::debug!(dead_rows_left = look.dead_rows, "vacuumed the open-task table");
                }
                VacuumOutcome::NotAllowed if !vacuumer.refusal_logged.swap(true, Ordering::Relaxed) => {
                    tracing::warn!(
                        "this role may not vacuum job_tasks (it owns neither the table nor the database): the vacuumer leaves it to autovacuum"
                    );
                }
                VacuumOutcome::NotAllowed | VacuumOutcome::NotNeeded | VacuumOutcome::UnderWay => {}
            }
        }
        Err(error) => {
            metrics.record_run("vacuum", false);
            tracing::error!(%error, "vacuuming the open-task table failed");
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

/// Create the coming days' history partitions: a job finishing on a day
/// without one goes to the DEFAULT partition, which retention can only
/// empty row by row.
pub async fn create_history_partitions(queue: &Queue, metrics: &Metrics) {
    match queue.create_history_partitions().await {
        Ok(created) => {
            metrics.record_run("partitions", true);
            if !created.is_empty() {
                tracing::info!(days = ?created, "created history partitions");
            }
        }
        Err(error) => {
            metrics.record_run("partitions", false);
            tracing::error!(%error, "creating history partitions failed");
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

/// The cleaner: bytes queued key by key, then the folders of retired days.
async fn clean_store(queue: &Queue, artifacts: &ArtifactStore, metrics: &Metrics) {
    delete_pruned_artifacts(queue, artifacts, metrics).await;
    clean_retired_days(queue, artifacts, metrics).await;
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

/// Idempotency keys forgotten per statement for a retired day.
const KEY_BATCH: i64 = 5_000;

/// Finish what retention left for each day of history it dropped: forget
/// the keys of the day's jobs and remove their bytes from the day's folder,
/// sparing the jobs of that day still kept. A day is forgotten only once
/// both are done, so a run stopped halfway is finished by the next.
pub async fn clean_retired_days(queue: &Queue, artifacts: &ArtifactStore, metrics: &Metrics) {
    let days = match queue.retired_days().await {
        Ok(days) => days,
        Err(error) => {
            metrics.record_run("day_cleanup", false);
            tracing::error!(%error, "reading the retired days failed");
            return;
        }
    };
    for day in days {
        match clean_retired_day(queue, artifacts, &day).await {
            Ok(removed) => {
                metrics.record_run("day_cleanup", true);
                tracing::info!(day = %day.day, objects = removed, "cleaned up a retired day of history");
            }
            Err(error) => {
                metrics.record_run("day_cleanup", false);
                tracing::warn!(day = %day.day, error = format!("{error:#}"), "cleaning up a retired day failed; retrying later");
                return;
            }
        }
    }
}

/// Returns how many objects went.
async fn clean_retired_day(
    queue: &Queue,
    artifacts: &ArtifactStore,
    day: &RetiredDay,
) -> anyhow::Result<usize> {
    queue.forget_keys_of_retired_day(day, KEY_BATCH).await?;
    let mut removed = 0;
    if day.delete_bytes {
        let folder = day.folder();
        let mut listed = artifacts.list(&folder).chunks(DELETION_BATCH as usize);
        while let Some(chunk) = listed.next().await {
            let keys = chunk.into_iter().collect::<Result<Vec<String>, _>>()?;
            // `jobs/YYYYMMDD/ID/…`: what is not under a job's folder is
            // no job's, and stays.
            let owned: Vec<(String, Uuid)> = keys
                .into_iter()
                .filter_map(|key| {
                    let job = key.strip_prefix(&folder)?.split_once('/')?.0.parse().ok()?;
                    Some((key, job))
                })
                .collect();
            let ids: Vec<Uuid> = owned.iter().map(|(_, job)| *job).collect();
            let kept = queue.jobs_kept(&ids).await?;
            let doomed: Vec<String> = owned
                .into_iter()
                .filter(|(_, job)| !kept.contains(job))
                .map(|(key, _)| key)
                .collect();
            artifacts.delete_objects(&doomed).await?;
            removed += doomed.len();
        }
    }
    queue.forget_retired_day(day).await?;
    Ok(removed)
}
