//! Maintenance: the sweeper that rescues stuck tasks, and retention that
//! keeps the hot tables small. Both are safe to run from several processes
//! at once.

use std::time::Duration;

use serde::Serialize;
use uuid::Uuid;

use crate::error::{QueueError, Result};
use crate::model::TaskStatus;
use crate::tasks::retry_transient;
use crate::Queue;

/// A task the sweeper took back from a dead or overdue worker.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SweptTask {
    pub task_id: i64,
    pub job_id: Uuid,
    /// `pending` (will be retried) or `failed` (attempts spent).
    pub status: TaskStatus,
    /// Why, as the task's client-visible `last_error` says it.
    pub reason: String,
    /// The replica that held it: for the operator's log, not for clients.
    pub worker_id: Option<String>,
}

/// A job whose tasks had all finished while the job had not, put right by
/// [`Queue::repair_stuck_jobs`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RepairedJob {
    pub job_id: Uuid,
    pub status: crate::model::JobStatus,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SweepOutcome {
    pub tasks: Vec<SweptTask>,
    /// Registry rows removed because their replica stopped heartbeating.
    pub workers_removed: u64,
    /// Job watches removed because their stream stopped renewing them.
    pub watches_removed: u64,
}

impl SweepOutcome {
    pub fn retried(&self) -> usize {
        self.tasks
            .iter()
            .filter(|t| t.status == TaskStatus::Pending)
            .count()
    }

    pub fn failed(&self) -> usize {
        self.tasks
            .iter()
            .filter(|t| t.status == TaskStatus::Failed)
            .count()
    }
}

/// What to do with finished jobs past the retention age.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetentionMode {
    /// Delete the jobs, their tasks and artifact records, and queue the
    /// artifacts' bytes for deletion from the store.
    Delete,
    /// Copy job, tasks and artifact records into `jobs_archive`, then delete;
    /// the bytes stay in the store, where the archived records point.
    Archive,
}

#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub older_than: Duration,
    pub mode: RetentionMode,
    /// Jobs removed per statement, so a large backlog is pruned in short
    /// transactions.
    pub batch: i64,
}

/// The statement queueing the bytes of the jobs in `doomed` (a table or
/// CTE of their ids) for the cleaner: the recorded objects, and each job's
/// whole prefix (`artifact_prefix`), so bytes stored by an attempt that
/// stopped before recording them go too. Archived jobs keep their bytes,
/// where the archived records point.
fn queue_artifact_bytes(doomed: &str, mode: RetentionMode) -> String {
    match mode {
        RetentionMode::Delete => format!(
            "INSERT INTO artifact_deletions (storage_key)
             SELECT a.storage_key FROM artifacts a JOIN {doomed} d ON d.id = a.job_id
             UNION ALL
             SELECT 'jobs/' || d.id::text || '/' FROM {doomed} d
             ON CONFLICT (storage_key) DO NOTHING"
        ),
        RetentionMode::Archive => "SELECT 1".to_string(),
    }
}

/// The statement copying the jobs in `doomed` (ids), read from `jobs` and
/// `tasks`, with their artifact records, into `jobs_archive`.
fn archive_statement(jobs: &str, tasks: &str, doomed: &str) -> String {
    format!(
        "INSERT INTO jobs_archive (id, tenant, job_type, status, finished_at, job, tasks, artifacts)
         SELECT j.id, j.tenant, j.job_type, j.status, j.finished_at, to_jsonb(j),
                coalesce((SELECT jsonb_agg(to_jsonb(t) ORDER BY t.id) FROM {tasks} t WHERE t.job_id = j.id), '[]'),
                coalesce((SELECT jsonb_agg(to_jsonb(a)) FROM artifacts a WHERE a.job_id = j.id), '[]')
         FROM {jobs} j JOIN {doomed} d ON d.id = j.id
         ON CONFLICT (id) DO NOTHING"
    )
}

impl Queue {
    /// Return tasks whose heartbeat is older than `stale_after` or whose
    /// timeout passed to pending (with backoff), or to failed once attempts
    /// are spent; forget replicas silent for ten times `stale_after`, and
    /// job watches their stream stopped renewing.
    pub async fn sweep(&self, stale_after: Duration) -> Result<SweepOutcome> {
        let rows: Vec<(i64, Uuid, String, String, Option<String>)> = retry_transient(|| {
            sqlx::query_as("SELECT task_id, job_id, status, reason, worker_id FROM sweep_tasks($1, $2, $3)")
                .bind(stale_after.as_secs_f64())
                .bind(self.config.retry_base.as_secs_f64())
                .bind(self.config.retry_cap.as_secs_f64())
                .fetch_all(&self.pool)
        })
        .await?;
        let tasks = rows
            .into_iter()
            .map(|(task_id, job_id, status, reason, worker_id)| {
                Ok(SweptTask {
                    task_id,
                    job_id,
                    status: status.parse()?,
                    reason,
                    worker_id,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let workers_removed = sqlx::query(
            "DELETE FROM workers w
             WHERE w.heartbeat_at < now() - make_interval(secs => $1)
               AND NOT EXISTS (SELECT 1 FROM job_tasks t
                               WHERE t.claimed_by = w.id AND t.status IN ('claimed', 'processing'))",
        )
        .bind(stale_after.as_secs_f64() * 10.0)
        .execute(&self.pool)
        .await?
        .rows_affected();
        let watches_removed = sqlx::query("DELETE FROM job_watches WHERE expires_at < now()")
            .execute(&self.pool)
            .await?
            .rows_affected();
        for task in &tasks {
            tracing::warn!(
                task_id = task.task_id,
                job_id = %task.job_id,
                worker_id = task.worker_id.as_deref().unwrap_or(""),
                status = %task.status,
                reason = %task.reason,
                "sweeper took a task back from a stale or overdue worker"
            );
        }
        Ok(SweepOutcome {
            tasks,
            workers_removed,
            watches_removed,
        })
    }

    /// Put right jobs that are not final though all their tasks are: the
    /// state the queue's lock order prevents, so this should find nothing.
    /// Each one found is logged as an error. It reads every unfinished job,
    /// so run it every minute or so, not on every sweep.
    pub async fn repair_stuck_jobs(&self) -> Result<Vec<RepairedJob>> {
        let rows: Vec<(Uuid, String)> = retry_transient(|| {
            sqlx::query_as("SELECT job_id, status FROM repair_stuck_jobs()").fetch_all(&self.pool)
        })
        .await?;
        let repaired = rows
            .into_iter()
            .map(|(job_id, status)| {
                Ok(RepairedJob {
                    job_id,
                    status: status.parse()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        for job in &repaired {
            tracing::error!(job_id = %job.job_id, status = %job.status,
                "repaired a job whose tasks had all finished while it had not");
        }
        Ok(repaired)
    }

    /// Remove (or archive) finished jobs older than the retention age, with
    /// their tasks, idempotency keys and artifact records, and queue their
    /// bytes for the cleaner. Returns how many jobs were removed.
    ///
    /// History is partitioned by the day jobs were created. With a
    /// retention of a day or more, a day goes at once, its partitions
    /// dropped, when all of it is older than the age; jobs of that day that
    /// finished later are kept. So a job is kept at least the retention age
    /// and at most a day longer, and removing a day costs the same however
    /// many tasks it held. Only the partitions that are not a day (what
    /// history held before it was partitioned, and jobs that finished after
    /// their day was dropped) and retention shorter than a day delete row
    /// by row, `batch` jobs per statement.
    pub async fn prune(&self, retention: Retention) -> Result<u64> {
        if retention.batch < 1 {
            return Err(QueueError::invalid("batch", "must be at least 1"));
        }
        if chrono::Duration::from_std(retention.older_than).is_err() {
            return Err(QueueError::invalid("older_than", "is too large"));
        }
        if retention.older_than < Duration::from_secs(86_400) {
            return self.prune_rows("job_history", retention).await;
        }
        let mut total = self.drop_history_days(retention).await?;
        for table in ["job_history_before", "job_history_default"] {
            total += self.prune_rows(table, retention).await?;
        }
        Ok(total)
    }

    /// Create the history partitions of today and the next two days, where
    /// missing (the API's maintenance does it every minute; the migration
    /// did the first). Returns the days created, as `YYYYMMDD`.
    pub async fn create_history_partitions(&self) -> Result<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT create_history_partitions(current_date, 3)")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Whole days of history older than the retention age, each dropped in
    /// two transactions. Returns how many jobs went.
    async fn drop_history_days(&self, retention: Retention) -> Result<u64> {
        // A day detached by a run that stopped before dropping it is no
        // partition any more, and is finished first.
        let days: Vec<(String, bool)> = sqlx::query_as(
            "SELECT substr(c.relname, length('job_history_') + 1), c.relispartition FROM pg_class c
             WHERE c.relkind = 'r' AND c.relnamespace = (SELECT relnamespace FROM pg_class WHERE oid = 'job_history'::regclass)
               AND c.relname ~ '^job_history_[0-9]{8}$'
               AND (NOT c.relispartition
                    OR (to_date(substr(c.relname, length('job_history_') + 1), 'YYYYMMDD') + 1)::timestamp
                       AT TIME ZONE 'UTC' <= now() - make_interval(secs => $1))
             ORDER BY c.relispartition, c.relname",
        )
        .bind(retention.older_than.as_secs_f64())
        .fetch_all(&self.pool)
        .await?;
        let mut total = 0;
        for (day, attached) in days {
            if attached {
                self.detach_history_day(&day, retention).await?;
            }
            total += self.drop_detached_history_day(&day, retention.mode).await?;
        }
        Ok(total)
    }

    /// Detach a day's partitions, moving out the jobs of that day that
    /// finished after the retention age (they go to DEFAULT). Detaching
    /// locks history whole, so this transaction does nothing else: those
    /// jobs are few.
    async fn detach_history_day(&self, day: &str, retention: Retention) -> Result<()> {
        // `day` is eight digits read from the catalogue; a table name
        // cannot be bound.
        let (jobs, tasks) = (format!("job_history_{day}"), format!("task_history_{day}"));
        let mut tx = self.pool.begin().await?;
        sqlx::query(&format!(
            "CREATE TEMPORARY TABLE kept_jobs ON COMMIT DROP AS
                 SELECT * FROM {jobs} WHERE finished_at >= now() - make_interval(secs => $1)"
        ))
        .bind(retention.older_than.as_secs_f64())
        .execute(&mut *tx)
        .await?;
        for sql in [
            format!(
                "CREATE TEMPORARY TABLE kept_tasks ON COMMIT DROP AS
                         SELECT t.* FROM {tasks} t WHERE t.job_id IN (SELECT id FROM kept_jobs)"
            ),
            format!("ALTER TABLE job_history DETACH PARTITION {jobs}"),
            format!("ALTER TABLE task_history DETACH PARTITION {tasks}"),
            format!("DELETE FROM {jobs} WHERE id IN (SELECT id FROM kept_jobs)"),
            format!("DELETE FROM {tasks} WHERE job_id IN (SELECT id FROM kept_jobs)"),
            "INSERT INTO job_history SELECT * FROM kept_jobs".to_string(),
            "INSERT INTO task_history SELECT * FROM kept_tasks".to_string(),
        ] {
            sqlx::query(&sql).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Remove what refers to a detached day's jobs (artifact records,
    /// idempotency keys; their bytes queued for the cleaner, or everything
    /// copied to `jobs_archive`), then drop its tables.
    async fn drop_detached_history_day(&self, day: &str, mode: RetentionMode) -> Result<u64> {
        let (jobs, tasks) = (format!("job_history_{day}"), format!("task_history_{day}"));
        let mut tx = self.pool.begin().await?;
        if mode == RetentionMode::Archive {
            sqlx::query(&archive_statement(&jobs, &tasks, &jobs))
                .execute(&mut *tx)
                .await?;
        }
        let removed: i64 = sqlx::query_scalar(&format!(
            "WITH bytes AS (
                 {queue_bytes}
             ), records AS (
                 DELETE FROM artifacts a USING {jobs} d WHERE a.job_id = d.id
             ), keys AS (
                 DELETE FROM job_keys k USING {jobs} d WHERE k.job_id = d.id
             )
             SELECT count(*) FROM {jobs}",
            queue_bytes = queue_artifact_bytes(&jobs, mode),
        ))
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(&format!("DROP TABLE {jobs}, {tasks}"))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(removed as u64)
    }

    /// Remove old finished jobs from `table` (history or one of its
    /// partitions) row by row, `batch` per statement.
    async fn prune_rows(&self, table: &str, retention: Retention) -> Result<u64> {
        let archive = match retention.mode {
            RetentionMode::Delete => String::new(),
            RetentionMode::Archive => format!(
                "archived AS ({}),",
                archive_statement("job_history", "task_history", "doomed")
            ),
        };
        let sql = format!(
            "WITH doomed AS (
                 SELECT id FROM {table}
                 WHERE id < uuid_v7_floor(now() - make_interval(secs => $1))
                   AND finished_at < now() - make_interval(secs => $1)
                 LIMIT $2 FOR UPDATE SKIP LOCKED
             ), {archive} bytes AS (
                 {queue_bytes}
             ), records AS (
                 DELETE FROM artifacts WHERE job_id IN (SELECT id FROM doomed)
             ), keys AS (
                 DELETE FROM job_keys WHERE job_id IN (SELECT id FROM doomed)
             ), tasks AS (
                 DELETE FROM task_history WHERE job_id IN (SELECT id FROM doomed)
             )
             DELETE FROM job_history WHERE id IN (SELECT id FROM doomed)",
            queue_bytes = queue_artifact_bytes("doomed", retention.mode),
        );
        let mut total = 0;
        loop {
            let removed = sqlx::query(&sql)
                .bind(retention.older_than.as_secs_f64())
                .bind(retention.batch)
                .execute(&self.pool)
                .await?
                .rows_affected();
            total += removed;
            if removed < retention.batch as u64 {
                return Ok(total);
            }
        }
    }

    /// Storage keys whose artifact records retention deleted, oldest first:
    /// the bytes still to remove from the store.
    pub async fn artifact_deletions(&self, limit: i64) -> Result<Vec<String>> {
        if limit < 1 {
            return Err(QueueError::invalid("limit", "must be at least 1"));
        }
        Ok(sqlx::query_scalar(
            "SELECT storage_key FROM artifact_deletions ORDER BY queued_at, storage_key LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Forget keys whose bytes are gone from the store.
    pub async fn forget_artifact_deletions(&self, storage_keys: &[String]) -> Result<()> {
        sqlx::query("DELETE FROM artifact_deletions WHERE storage_key = ANY($1)")
            .bind(storage_keys)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
