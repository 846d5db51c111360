//! The periodic sweeper: takes tasks back from dead or overdue workers and,
//! when retention is set, prunes old finished jobs. Several API replicas
//! may run it at once; the queue makes concurrent sweeps safe.

use std::sync::Arc;

use queue::Queue;
use tokio::time::{interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::state::SweeperSettings;

pub async fn run(
    queue: Queue,
    settings: SweeperSettings,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut sweep_tick = interval(settings.interval);
    let mut retention_tick = interval(settings.retention_interval);
    for tick in [&mut sweep_tick, &mut retention_tick] {
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    }
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = sweep_tick.tick() => sweep_once(&queue, &settings, &metrics).await,
            _ = retention_tick.tick(), if settings.retention.is_some() => {
                prune_once(&queue, &settings, &metrics).await;
            }
        }
    }
}

pub async fn sweep_once(queue: &Queue, settings: &SweeperSettings, metrics: &Metrics) {
    match queue.sweep(settings.stale_after).await {
        Ok(outcome) => {
            metrics.record_run("sweep", true);
            metrics.record_sweep(&outcome);
            for task in &outcome.tasks {
                tracing::warn!(
                    task_id = task.task_id,
                    job_id = %task.job_id,
                    status = %task.status,
                    reason = task.reason,
                    "sweeper took a task back"
                );
            }
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
