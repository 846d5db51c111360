//! Maintenance: the sweeper that rescues stuck tasks, and retention that
//! keeps the hot tables small. Both are safe to run from several processes
//! at once.

use std::collections::HashSet;
use std::time::Duration;

use chrono::NaiveDate;
use serde::Serialize;
use uuid::Uuid;

use crate::artifacts::day_folder;
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
/// CTE of their ids), with their artifact records in `artifacts`, for the
/// cleaner: the recorded objects, and each job's whole folder
/// (`artifact_prefix`), so bytes stored by an attempt that stopped before
/// recording them go too; a job created before bytes went into day folders
/// also its old folder. Archived jobs keep their bytes, where the archived
/// records point.
fn queue_artifact_bytes(doomed: &str, artifacts: &str, mode: RetentionMode) -> String {
    match mode {
        RetentionMode::Delete => format!(
            "INSERT INTO artifact_deletions (storage_key)
             SELECT a.storage_key FROM {artifacts} a JOIN {doomed} d ON d.id = a.job_id
             UNION ALL
             SELECT artifact_prefix(d.id) FROM {doomed} d
             UNION ALL
             SELECT 'jobs/' || d.id::text || '/' FROM {doomed} d, artifact_layout l
             WHERE d.id < uuid_v7_floor(l.day_folders_from::timestamp AT TIME ZONE 'UTC')
             ON CONFLICT (storage_key) DO NOTHING"
        ),
        RetentionMode::Archive => "SELECT 1".to_string(),
    }
}

/// The finished jobs of a history table and its tasks' table, as one
/// relation shaped as `job_history`: the table's rows, and the jobs of one
/// task that completed in their task's row (the view
/// `finished_jobs_in_task_rows` reads them so from `task_history`; a day's
/// detached tables have no such view).
fn finished_jobs_of(jobs: &str, tasks: &str) -> String {
    format!(
        "(SELECT * FROM {jobs}
          UNION ALL
          SELECT t.job_id, t.job_tenant, t.job_type, t.status, t.job_input, t.priority, NULL::text, NULL::text,
                 t.created_at, t.updated_at, t.first_claimed_at, t.finished_at, 1, 1
          FROM {tasks} t WHERE t.job_input IS NOT NULL)"
    )
}

/// The statement copying the jobs in `doomed` (ids), read from `jobs`,
/// `tasks` and `artifacts`, into `jobs_archive`.
fn archive_statement(jobs: &str, tasks: &str, artifacts: &str, doomed: &str) -> String {
    format!(
        "INSERT INTO jobs_archive (id, tenant, job_type, status, finished_at, job, tasks, artifacts)
         SELECT j.id, j.tenant, j.job_type, j.status, j.finished_at, to_jsonb(j),
                coalesce((SELECT jsonb_agg(to_jsonb(t) ORDER BY t.id) FROM {tasks} t WHERE t.job_id = j.id), '[]'),
                coalesce((SELECT jsonb_agg(to_jsonb(a)) FROM {artifacts} a WHERE a.job_id = j.id), '[]')
         FROM {jobs} j JOIN {doomed} d ON d.id = j.id
         ON CONFLICT (id) DO NOTHING"
    )
}

/// A day of history that retention dropped, and what the cleaner still
/// has to do for it: forget the idempotency keys of its jobs and, unless
/// they were archived, remove their bytes from the day's folder. Jobs of
/// the day that are still kept (open, or finished late) keep both.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RetiredDay {
    pub day: NaiveDate,
    pub delete_bytes: bool,
}

impl RetiredDay {
    /// The store folder its jobs' bytes are under.
    pub fn folder(&self) -> String {
        day_folder(self.day)
    }
}

/// A day's history tables, named `{table}_YYYYMMDD`.
struct DayTables {
    day: NaiveDate,
    jobs: String,
    tasks: String,
    artifacts: String,
}

impl DayTables {
    /// `suffix` is eight digits read from the catalogue: a table name
    /// cannot be bound.
    fn of(suffix: &str) -> Result<Self> {
        let day = NaiveDate::parse_from_str(suffix, "%Y%m%d")
            .map_err(|e| QueueError::invalid("day", format!("{suffix:?}: {e}")))?;
        Ok(Self {
            day,
            jobs: format!("job_history_{suffix}"),
            tasks: format!("task_history_{suffix}"),
            artifacts: format!("artifacts_{suffix}"),
        })
    }
}

/// The first id of a day's jobs, and of the next day's, as SQL of `$1`
/// (the day, a date): the day's range in every table keyed by job id.
const DAY_RANGE_FROM: &str = "uuid_v7_floor($1::timestamp AT TIME ZONE 'UTC')";
const DAY_RANGE_TO: &str = "uuid_v7_floor(($1 + 1)::timestamp AT TIME ZONE 'UTC')";

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
        // A claim holds its claimer's row while it takes tasks, and writes
        // the time of the claim there: re-checked once the claim commits,
        // that time keeps the row. The NOT EXISTS alone, read on this
        // statement's snapshot, would not see the tasks just claimed.
        let workers_removed = sqlx::query(
            "DELETE FROM workers w
             WHERE w.heartbeat_at < now() - make_interval(secs => $1)
               AND (w.last_claim_at IS NULL OR w.last_claim_at < now() - make_interval(secs => $1))
               AND NOT EXISTS (SELECT 1 FROM job_tasks t
                               WHERE t.claimed_by = w.id AND t.task_type = ANY (task_types())
                                 AND t.status IN ('claimed', 'processing'))",
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
            return self.prune_rows("job_history", "task_history", retention).await;
        }
        let mut total = self.drop_history_days(retention).await?;
        for (jobs, tasks) in [
            ("job_history_before", "task_history_before"),
            ("job_history_default", "task_history_default"),
        ] {
            total += self.prune_rows(jobs, tasks, retention).await?;
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
                self.detach_history_day_patiently(&day, retention).await?;
            }
            total += self.drop_detached_history_day(&day, retention.mode).await?;
        }
        Ok(total)
    }

    /// [`Self::detach_history_day`], tried again while it gives way to
    /// other transactions' locks (a second apart, five tries).
    async fn detach_history_day_patiently(&self, day: &str, retention: Retention) -> Result<()> {
        const TRIES: u32 = 5;
        let mut tries = 1;
        loop {
            match self.detach_history_day(day, retention).await {
                Err(e) if e.is_transient() && tries < TRIES => {
                    tracing::info!(day, tries, error = %e, "retention gave way to other transactions' locks; trying again");
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                result => return result,
            }
        }
    }

    /// Detach a day's partitions, moving out the jobs of that day that
    /// finished after the retention age (they go to DEFAULT) and the
    /// artifact records of those and of the day's jobs still open. Detaching
    /// locks history whole, so this transaction does nothing else: those
    /// jobs are few.
    async fn detach_history_day(&self, day: &str, retention: Retention) -> Result<()> {
        let DayTables {
            day,
            jobs,
            tasks,
            artifacts,
        } = DayTables::of(day)?;
        let mut tx = self.pool.begin().await?;
        // Every lock the detaches need, taken before reading what to keep: a
        // job of this day finishing meanwhile is then among the kept ones
        // (the detaches alone would lock only after that read, and drop such
        // a job with its day). Exclusive from the start, never raised later:
        // holding a weaker lock while waiting for the exclusive one
        // deadlocked a transaction that had read history or artifacts and
        // then wrote them (a worker recording an artifact, a retry). Readers
        // wait behind it, so it waits for a lock half the deadlock timeout
        // at most: in any cycle retention gives way, and retries.
        sqlx::query(
            "SELECT set_config('lock_timeout', (setting::int / 2)::text || 'ms', true)
             FROM pg_settings WHERE name = 'deadlock_timeout'",
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query("LOCK TABLE job_history, task_history, artifacts IN ACCESS EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await?;
        // Every day since 20261205000007 has a partition of artifact
        // records beside its history; a day made by hand may not.
        let records_by_day: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_inherits WHERE inhrelid = to_regclass($1)
                            AND inhparent = 'artifacts'::regclass)",
        )
        .bind(&artifacts)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(&format!(
            "CREATE TEMPORARY TABLE kept_jobs ON COMMIT DROP AS
                 SELECT * FROM {jobs} WHERE finished_at >= now() - make_interval(secs => $1)"
        ))
        .bind(retention.older_than.as_secs_f64())
        .execute(&mut *tx)
        .await?;
        // So the reads by kept job below go through the day's indexes.
        sqlx::query("ANALYZE kept_jobs").execute(&mut *tx).await?;
        // A job of one task that completed in its task's row is kept as
        // that row (`complete`, so the day's index of completions finds it).
        sqlx::query(&format!(
            "CREATE TEMPORARY TABLE kept_tasks ON COMMIT DROP AS
                 SELECT t.* FROM kept_jobs k JOIN {tasks} t ON t.job_id = k.id
                 UNION ALL
                 SELECT t.* FROM {tasks} t
                 WHERE t.status = 'complete' AND t.finished_at >= now() - make_interval(secs => $1)
                   AND t.job_input IS NOT NULL"
        ))
        .bind(retention.older_than.as_secs_f64())
        .execute(&mut *tx)
        .await?;
        let statements = [
            format!("ALTER TABLE job_history DETACH PARTITION {jobs}"),
            format!("ALTER TABLE task_history DETACH PARTITION {tasks}"),
            format!("DELETE FROM {jobs} WHERE id IN (SELECT id FROM kept_jobs)"),
            format!("DELETE FROM {tasks} WHERE job_id IN (SELECT job_id FROM kept_tasks)"),
            "INSERT INTO job_history SELECT * FROM kept_jobs".to_string(),
            "INSERT INTO task_history SELECT * FROM kept_tasks".to_string(),
        ];
        for sql in statements {
            sqlx::query(&sql).execute(&mut *tx).await?;
        }
        if records_by_day {
            sqlx::query(&format!(
                "CREATE TEMPORARY TABLE kept_artifacts ON COMMIT DROP AS
                     SELECT a.* FROM (SELECT id FROM kept_jobs
                                      UNION ALL
                                      SELECT job_id FROM kept_tasks WHERE job_input IS NOT NULL) k
                     JOIN {artifacts} a ON a.job_id = k.id
                     UNION ALL
                     SELECT a.* FROM jobs j JOIN {artifacts} a ON a.job_id = j.id
                     WHERE j.id >= {DAY_RANGE_FROM} AND j.id < {DAY_RANGE_TO}
                     UNION ALL
                     SELECT a.* FROM job_tasks t JOIN {artifacts} a ON a.job_id = t.job_id
                     WHERE t.job_input IS NOT NULL
                       AND t.job_id >= {DAY_RANGE_FROM} AND t.job_id < {DAY_RANGE_TO}"
            ))
            .bind(day)
            .execute(&mut *tx)
            .await?;
            for sql in [
                format!("ALTER TABLE artifacts DETACH PARTITION {artifacts}"),
                "INSERT INTO artifacts SELECT * FROM kept_artifacts".to_string(),
            ] {
                sqlx::query(&sql).execute(&mut *tx).await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Finish a detached day: copy its jobs to `jobs_archive` in archive
    /// mode, queue what the cleaner still has to do for it (its jobs'
    /// idempotency keys, and their bytes unless archived), then drop its
    /// tables. Costs the same however many jobs the day held; only a day
    /// from before bytes went into day folders queues its jobs' old folders
    /// one by one.
    async fn drop_detached_history_day(&self, day: &str, mode: RetentionMode) -> Result<u64> {
        let DayTables {
            day,
            jobs,
            tasks,
            artifacts,
        } = DayTables::of(day)?;
        let day_jobs = finished_jobs_of(&jobs, &tasks);
        let mut tx = self.pool.begin().await?;
        let (records_by_day, before_day_folders): (bool, bool) = sqlx::query_as(
            "SELECT to_regclass($1) IS NOT NULL, $2 < (SELECT day_folders_from FROM artifact_layout)",
        )
        .bind(&artifacts)
        .bind(day)
        .fetch_one(&mut *tx)
        .await?;
        // A day detached before artifact records had days left its records
        // in the DEFAULT partition.
        let records = if records_by_day {
            artifacts.as_str()
        } else {
            "artifacts"
        };
        if mode == RetentionMode::Archive {
            sqlx::query(&archive_statement(&day_jobs, &tasks, records, &day_jobs))
                .execute(&mut *tx)
                .await?;
        }
        if mode == RetentionMode::Delete && before_day_folders {
            sqlx::query(&queue_artifact_bytes(&day_jobs, records, mode))
                .execute(&mut *tx)
                .await?;
        }
        if !records_by_day {
            sqlx::query(&format!(
                "DELETE FROM artifacts a USING {day_jobs} d WHERE a.job_id = d.id"
            ))
            .execute(&mut *tx)
            .await?;
        }
        let removed: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {day_jobs} j"))
            .fetch_one(&mut *tx)
            .await?;
        // A day that kept no job has no keys or bytes left either: jobs
        // leave history only with their day or row by row, which removes
        // both itself.
        if removed > 0 {
            sqlx::query(
                "INSERT INTO retired_days (day, delete_bytes) VALUES ($1, $2)
                 ON CONFLICT (day) DO UPDATE SET delete_bytes = retired_days.delete_bytes OR EXCLUDED.delete_bytes",
            )
            .bind(day)
            .bind(mode == RetentionMode::Delete)
            .execute(&mut *tx)
            .await?;
        }
        let tables = if records_by_day {
            format!("{jobs}, {tasks}, {artifacts}")
        } else {
            format!("{jobs}, {tasks}")
        };
        sqlx::query(&format!("DROP TABLE {tables}"))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(removed as u64)
    }

    /// Remove old finished jobs from `jobs` (history or one of its
    /// partitions) and the jobs of one task that completed in their task's
    /// row in `tasks` (the matching tasks' table) row by row, `batch` of
    /// each per statement.
    async fn prune_rows(&self, jobs: &str, tasks: &str, retention: Retention) -> Result<u64> {
        let archive = match retention.mode {
            RetentionMode::Delete => String::new(),
            RetentionMode::Archive => format!(
                "archived AS ({}),",
                archive_statement(
                    &finished_jobs_of("job_history", "task_history"),
                    "task_history",
                    "artifacts",
                    "doomed"
                )
            ),
        };
        let sql = format!(
            "WITH doomed_jobs AS (
                 SELECT id FROM {jobs}
                 WHERE id < uuid_v7_floor(now() - make_interval(secs => $1))
                   AND finished_at < now() - make_interval(secs => $1)
                 LIMIT $2 FOR UPDATE SKIP LOCKED
             ), doomed_task_rows AS (
                 SELECT job_id AS id FROM {tasks}
                 WHERE job_input IS NOT NULL
                   AND job_id < uuid_v7_floor(now() - make_interval(secs => $1))
                   AND finished_at < now() - make_interval(secs => $1)
                 LIMIT $2 FOR UPDATE SKIP LOCKED
             ), doomed AS (
                 SELECT id FROM doomed_jobs UNION ALL SELECT id FROM doomed_task_rows
             ), {archive} bytes AS (
                 {queue_bytes}
             ), records AS (
                 DELETE FROM artifacts WHERE job_id IN (SELECT id FROM doomed)
             ), keys AS (
                 DELETE FROM job_keys WHERE job_id IN (SELECT id FROM doomed)
             ), gone_tasks AS (
                 DELETE FROM task_history WHERE job_id IN (SELECT id FROM doomed)
             ), gone_jobs AS (
                 DELETE FROM job_history WHERE id IN (SELECT id FROM doomed)
             )
             SELECT (SELECT count(*) FROM doomed_jobs), (SELECT count(*) FROM doomed_task_rows)",
            queue_bytes = queue_artifact_bytes("doomed", "artifacts", retention.mode),
        );
        let mut total = 0;
        loop {
            let (with_rows, in_task_rows): (i64, i64) = sqlx::query_as(&sql)
                .bind(retention.older_than.as_secs_f64())
                .bind(retention.batch)
                .fetch_one(&self.pool)
                .await?;
            total += (with_rows + in_task_rows) as u64;
            if with_rows < retention.batch && in_task_rows < retention.batch {
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

    /// Days of history retention dropped whose keys or bytes the cleaner
    /// has still to remove, oldest first.
    pub async fn retired_days(&self) -> Result<Vec<RetiredDay>> {
        Ok(
            sqlx::query_as("SELECT day, delete_bytes FROM retired_days ORDER BY day")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Forget the idempotency keys of a retired day's jobs that are gone
    /// (a kept job keeps its key), `batch` per statement so no statement
    /// holds many rows. Returns how many went.
    pub async fn forget_keys_of_retired_day(&self, day: &RetiredDay, batch: i64) -> Result<u64> {
        if batch < 1 {
            return Err(QueueError::invalid("batch", "must be at least 1"));
        }
        let sql = format!(
            "DELETE FROM job_keys k
             WHERE (k.tenant, k.idempotency_key) IN (
                 SELECT tenant, idempotency_key FROM job_keys g
                 WHERE g.job_id >= {DAY_RANGE_FROM} AND g.job_id < {DAY_RANGE_TO}
                   AND NOT EXISTS (SELECT 1 FROM all_jobs j WHERE j.id = g.job_id)
                 LIMIT $2 FOR UPDATE SKIP LOCKED)"
        );
        let mut total = 0;
        loop {
            let forgotten = sqlx::query(&sql)
                .bind(day.day)
                .bind(batch)
                .execute(&self.pool)
                .await?
                .rows_affected();
            total += forgotten;
            if forgotten < batch as u64 {
                return Ok(total);
            }
        }
    }

    /// Which of these jobs are still stored, open or finished: the cleaner
    /// leaves their bytes in a retired day's folder.
    pub async fn jobs_kept(&self, job_ids: &[Uuid]) -> Result<HashSet<Uuid>> {
        let kept: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM all_jobs WHERE id = ANY($1)")
            .bind(job_ids)
            .fetch_all(&self.pool)
            .await?;
        Ok(kept.into_iter().collect())
    }

    /// The cleaner is done with a retired day.
    pub async fn forget_retired_day(&self, day: &RetiredDay) -> Result<()> {
        sqlx::query("DELETE FROM retired_days WHERE day = $1")
            .bind(day.day)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
