//! Jobs: enqueue (single and batch), read, list, cancel, retry.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::pool::PoolConnection;
use sqlx::{Connection, Postgres};
use uuid::Uuid;

use crate::error::{QueueError, Result};
use crate::model::{Job, JobStatus, JobType, NewJob, Task, TaskType};
use crate::tasks::retry_transient;
use crate::Queue;

/// The jobs of an enqueue, `$1`–`$6` and `$13` per job, kept where
/// `filter` holds.
macro_rules! insert_jobs_where {
    ($filter:literal) => {
        concat!(
            "INSERT INTO jobs (id, tenant, job_type, input, priority, idempotency_key, tasks_total)
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::jsonb[], $5::int[], $6::text[], $13::int[])
                           AS n(id, tenant, job_type, input, priority, idempotency_key, tasks_total) ",
            $filter,
            " RETURNING id, status, error, created_at, updated_at, started_at, finished_at"
        )
    };
}

/// The tasks of an enqueue, `$7`–`$12` and `$14`–`$18` per task, kept
/// where `filter` holds. `$16`–`$18` are the job's tenant, type and input
/// on the task of a job kept in its task's row, NULL on any other.
macro_rules! insert_tasks_where {
    ($filter:literal, $returning:literal) => {
        concat!(
            "INSERT INTO job_tasks (job_id, task_type, dependencies, waiting_on, priority, max_attempts,
                                    timeout_seconds, has_dependents, fair_at, job_tenant, job_type, job_input)
             SELECT p.job_id, p.task_type, d.deps, cardinality(d.deps), p.priority, p.max_attempts,
                    p.timeout_seconds, p.has_dependents, p.fair_at, p.job_tenant, p.job_type, p.job_input
             FROM unnest($7::uuid[], $8::text[], $9::text[], $10::int[], $11::int[], $12::int[], $14::bool[],
                         $15::timestamptz[], $16::text[], $17::text[], $18::jsonb[])
                  AS p(job_id, task_type, deps, priority, max_attempts, timeout_seconds, has_dependents, fair_at,
                       job_tenant, job_type, job_input)
             CROSS JOIN LATERAL (SELECT string_to_array(nullif(p.deps, ''), ',') AS deps_or_null) a
             CROSS JOIN LATERAL (SELECT coalesce(a.deps_or_null, '{}'::text[]) AS deps) d ",
            $filter,
            $returning
        )
    };
}

/// An enqueue whose jobs carry no idempotency key inserts every job and
/// task it is given. Without the key's statement (planned and started even
/// when it inserts nothing) and the tasks' check against the inserted jobs,
/// a one-job statement costs the server about a third less
/// (docs/bench-queue-log.md, "An enqueue without keys"). A job of one task
/// is given no `jobs` row: its task's row holds it (migration
/// `20261209000001`), and what the server set on it is read back from there.
const INSERT_JOBS: &str = concat!(
    "WITH inserted AS (",
    insert_jobs_where!(""),
    "), tasks AS (",
    insert_tasks_where!("", "RETURNING job_id, job_input IS NOT NULL AS in_task_row, created_at, updated_at"),
    ") SELECT * FROM inserted
      UNION ALL
      SELECT t.job_id, 'queued', NULL, t.created_at, t.updated_at, NULL, NULL FROM tasks t WHERE t.in_task_row"
);

/// An enqueue with keys: a job whose key is taken is not inserted, nor
/// are its tasks.
const INSERT_KEYED_JOBS: &str = concat!(
    "WITH keyed AS (
        -- A key is held in job_keys, across open and finished jobs; a job
        -- whose key is taken is not inserted, and of a key twice in the
        -- batch the first takes it.
        INSERT INTO job_keys (tenant, idempotency_key, job_id)
        SELECT DISTINCT ON (k.tenant, k.key) k.tenant, k.key, k.id
        FROM unnest($1::uuid[], $2::text[], $6::text[]) WITH ORDINALITY AS k(id, tenant, key, ord)
        WHERE k.key IS NOT NULL
        ORDER BY k.tenant, k.key, k.ord
        -- A key whose job retention dropped with its day is free until the
        -- cleaner forgets it. Only a key of a job older than a day can be
        -- (no shorter age drops a day), so a key just taken over is never
        -- taken again by a racing request.
        ON CONFLICT (tenant, idempotency_key) DO UPDATE SET job_id = EXCLUDED.job_id
        WHERE job_keys.job_id < uuid_v7_floor(now() - interval '1 day')
          AND NOT EXISTS (SELECT 1 FROM all_jobs j WHERE j.id = job_keys.job_id)
        RETURNING job_id
    ), inserted AS (",
    insert_jobs_where!("WHERE n.idempotency_key IS NULL OR n.id IN (SELECT job_id FROM keyed)"),
    "), tasks AS (",
    insert_tasks_where!("WHERE p.job_id IN (SELECT id FROM inserted)", ""),
    ") SELECT * FROM inserted"
);

/// A tenant's page of jobs from one of the views `all_jobs` joins, newest
/// first (`$1` tenant, `$2` status, `$3` job type, `$4` before, `$5` page
/// size, `$6` created after).
macro_rules! page_of {
    ($source:literal) => {
        concat!(
            "(SELECT * FROM ",
            $source,
            " WHERE tenant = $1
               AND ($2::text IS NULL OR status = $2)
               AND ($3::text IS NULL OR job_type = $3)
               AND ($4::uuid IS NULL OR id < $4)
               AND ($6::timestamptz IS NULL OR created_at >= $6)
               -- The same bound on the key, so the scan of (tenant, id)
               -- stops near it instead of reading the tenant's whole
               -- history: ids are UUIDv7 from the API host's clock, an
               -- hour of slack against the database's.
               AND ($6::timestamptz IS NULL OR id >= uuid_v7_floor($6 - interval '1 hour'))
             ORDER BY id DESC
             LIMIT $5)"
        )
    };
}

/// A tenant's jobs, newest first: each of `all_jobs`' parts read as a page
/// of its own, so each scan of its (tenant, id) index stops at the page
/// (jobs in flight in task rows are as few as the workers' slots). Read
/// through `all_jobs`, open jobs kept in task rows were sorted whole first
/// (migration `20261209000001`).
const LIST_JOBS: &str = concat!(
    "SELECT * FROM (",
    page_of!("open_job_rows"),
    " UNION ALL ",
    page_of!("waiting_jobs_in_task_rows"),
    " UNION ALL ",
    page_of!("running_jobs_in_task_rows"),
    " UNION ALL ",
    page_of!("job_history"),
    " UNION ALL ",
    page_of!("finished_jobs_in_task_rows"),
    ") page ORDER BY id DESC LIMIT $5"
);

/// The job an enqueue returned, and whether this call created it (false when
/// an earlier call with the same idempotency key did).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Enqueued {
    pub job: Job,
    pub created: bool,
}

/// A job found under an idempotency key, with what a replay must match
/// beyond the job row.
#[derive(Debug, Clone, sqlx::FromRow)]
struct Existing {
    #[sqlx(flatten)]
    job: Job,
    task_max_attempts: Option<i32>,
}

/// What the server sets on a job it inserts; the rest of the row is what
/// the client sent. Reading back only these spares the enqueue sending
/// every job's input and tenant back and parsing them again: the job built
/// from them reads the same as the stored one, since jsonb keeps the
/// input's meaning and a `serde_json::Value` orders an object's keys
/// itself.
#[derive(Debug, sqlx::FromRow)]
struct InsertedJob {
    id: Uuid,
    #[sqlx(try_from = "String")]
    status: JobStatus,
    error: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
}

impl InsertedJob {
    fn into_job(self, new: NewJob) -> Job {
        Job {
            id: self.id,
            tenant: new.tenant,
            job_type: new.job_type,
            status: self.status,
            input: new.input,
            priority: new.priority,
            idempotency_key: new.idempotency_key,
            error: self.error,
            created_at: self.created_at,
            updated_at: self.updated_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobWithTasks {
    pub job: Job,
    pub tasks: Vec<Task>,
}

/// Which of a tenant's jobs to list, newest first.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub status: Option<JobStatus>,
    pub job_type: Option<JobType>,
    /// Only jobs older than this one (the previous page's last id).
    pub before: Option<Uuid>,
    /// Only jobs created at or after this instant.
    pub created_after: Option<DateTime<Utc>>,
    pub limit: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobPage {
    pub jobs: Vec<Job>,
    /// The id to pass as `before` for the next page, when there is one.
    pub next: Option<Uuid>,
}

const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;
const MAX_TENANT_LEN: usize = 128;
const MAX_ATTEMPTS_LIMIT: i32 = 100;
/// Priority orders every tenant's work in one queue, so it is bounded: a
/// client can go first among its peers, not ahead of the whole system.
pub const PRIORITY_RANGE: std::ops::RangeInclusive<i32> = -100..=100;

impl Queue {
    /// Enqueue one job and its task DAG in one transaction.
    pub async fn enqueue(&self, job: NewJob) -> Result<Enqueued> {
        let mut out = self.enqueue_batch(vec![job]).await.map_err(|e| match e {
            // A single job's fields are not "jobs[0].…".
            QueueError::InvalidInput { field, message } => QueueError::InvalidInput {
                field: field.trim_start_matches("jobs[0].").to_string(),
                message,
            },
            e => e,
        })?;
        Ok(out.remove(0))
    }

    /// Enqueue many jobs and all their tasks in one statement and one
    /// transaction. Nothing is written unless every job is valid. Results are
    /// in input order.
    pub async fn enqueue_batch(&self, jobs: Vec<NewJob>) -> Result<Vec<Enqueued>> {
        self.enqueue_jobs(jobs, None).await
    }

    /// [`Queue::enqueue_batch`] as one request replayable under `key`: job
    /// `i` is keyed [`batch_item_key`]`(key, i)`. A replay must be the same
    /// batch, job for job and as many jobs: one that changes a job, adds
    /// one or leaves one out is refused with
    /// [`QueueError::IdempotencyConflict`] and writes nothing.
    pub async fn enqueue_batch_once(&self, key: &str, mut jobs: Vec<NewJob>) -> Result<Vec<Enqueued>> {
        for (i, job) in jobs.iter_mut().enumerate() {
            job.idempotency_key = Some(batch_item_key(key, i));
        }
        self.enqueue_jobs(jobs, Some(key)).await
    }

    async fn enqueue_jobs(&self, jobs: Vec<NewJob>, batch_key: Option<&str>) -> Result<Vec<Enqueued>> {
        if jobs.is_empty() {
            return Err(QueueError::invalid("jobs", "at least one job is required"));
        }
        if jobs.len() > self.config.max_batch_jobs {
            return Err(QueueError::invalid(
                "jobs",
                format!(
                    "{} jobs in one batch; the limit is {}",
                    jobs.len(),
                    self.config.max_batch_jobs
                ),
            ));
        }
        for (i, job) in jobs.iter().enumerate() {
            self.validate(job).map_err(|e| match e {
                QueueError::InvalidInput { field, message } => QueueError::InvalidInput {
                    field: format!("jobs[{i}].{field}"),
                    message,
                },
                e => e,
            })?;
        }

        // A replay takes no place in line: a place given and left empty
        // reads, to the tenant's next enqueue, as its line having been
        // served (`take_places_in_line` probes the latest place), and that job
        // would start at the head, ahead of the tenant's own waiting jobs.
        let keyed = jobs.iter().any(|j| j.idempotency_key.is_some());
        let replays = if keyed {
            self.replays_among(&jobs).await?
        } else {
            HashSet::new()
        };
        let lines: Vec<_> = (0..jobs.len())
            .filter(|i| !replays.contains(i))
            .map(|i| {
                (
                    jobs[i].tenant.as_str(),
                    jobs[i].job_type.plan()[0].task_type,
                    jobs[i].priority,
                )
            })
            .collect();
        // The place and the insert share one connection: a second checkout
        // costs the ping sqlx sends as each connection goes back to the pool.
        let (placed, mut conn) = self.place_in_line(&lines).await?;
        let mut placed = placed.into_iter();
        // A replay's tasks are not inserted; the place it is given is unused.
        let now = Utc::now();
        let places: Vec<DateTime<Utc>> = (0..jobs.len())
            .map(|i| {
                if replays.contains(&i) {
                    Some(now)
                } else {
                    placed.next()
                }
            })
            .collect::<Option<_>>()
            .ok_or_else(|| sqlx::Error::Protocol("place_in_line answered fewer places than asked".into()))?;
        let ids: Vec<Uuid> = jobs.iter().map(|_| Uuid::now_v7()).collect();
        // A job of one task lives in its task's row, unless it has a key:
        // a replay compares the job a key names, and finds it by its row.
        let in_task_row: Vec<bool> = jobs
            .iter()
            .map(|j| !keyed && j.job_type.plan().len() == 1)
            .collect();
        let with_row: Vec<usize> = (0..jobs.len()).filter(|&i| !in_task_row[i]).collect();
        let mut task_job = Vec::new();
        let mut task_type = Vec::new();
        let mut task_deps = Vec::new();
        let mut task_priority = Vec::new();
        let mut task_attempts = Vec::new();
        let mut task_timeout = Vec::new();
        let mut task_has_dependents = Vec::new();
        let mut task_fair_at = Vec::new();
        let mut task_job_tenant = Vec::new();
        let mut task_job_type = Vec::new();
        let mut task_job_input = Vec::new();
        for (((id, job), place), &in_row) in ids.iter().zip(&jobs).zip(&places).zip(&in_task_row) {
            let steps = job.job_type.plan();
            for plan in steps {
                task_job.push(*id);
                task_job_tenant.push(in_row.then_some(job.tenant.as_str()));
                task_job_type.push(in_row.then_some(job.job_type.as_str()));
                task_job_input.push(in_row.then_some(&job.input));
                task_type.push(plan.task_type.as_str());
                task_deps.push(
                    plan.depends_on
                        .iter()
                        .map(|t| t.as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                );
                task_priority.push(job.priority);
                task_attempts.push(job.max_attempts);
                task_timeout.push(plan.task_type.default_timeout_seconds());
                task_has_dependents.push(
                    steps
                        .iter()
                        .any(|other| other.depends_on.contains(&plan.task_type)),
                );
                task_fair_at.push(*place);
            }
        }

        // Only an idempotency key can make the statement insert less than
        // asked (and a conflicting replay must then undo the batch). Without
        // one the statement is its own transaction: no BEGIN and COMMIT
        // round trips on the path every enqueue → claim wake-up waits for.
        let job_rows = || with_row.iter().map(|&i| &jobs[i]);
        let insert = sqlx::query_as(if keyed { INSERT_KEYED_JOBS } else { INSERT_JOBS })
            .bind(with_row.iter().map(|&i| ids[i]).collect::<Vec<_>>())
            .bind(job_rows().map(|j| j.tenant.as_str()).collect::<Vec<_>>())
            .bind(job_rows().map(|j| j.job_type.as_str()).collect::<Vec<_>>())
            .bind(job_rows().map(|j| &j.input).collect::<Vec<_>>())
            .bind(job_rows().map(|j| j.priority).collect::<Vec<_>>())
            .bind(
                job_rows()
                    .map(|j| j.idempotency_key.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(&task_job)
            .bind(&task_type)
            .bind(&task_deps)
            .bind(&task_priority)
            .bind(&task_attempts)
            .bind(&task_timeout)
            .bind(
                job_rows()
                    .map(|j| j.job_type.plan().len() as i32)
                    .collect::<Vec<_>>(),
            )
            .bind(&task_has_dependents)
            .bind(&task_fair_at)
            .bind(&task_job_tenant)
            .bind(&task_job_type)
            .bind(&task_job_input);
        let mut tx = None;
        let inserted: Vec<InsertedJob> = if keyed {
            let tx = tx.insert(conn.begin().await?);
            insert.fetch_all(&mut **tx).await?
        } else {
            insert.fetch_all(&mut *conn).await?
        };

        let mut created: HashMap<Uuid, InsertedJob> = inserted.into_iter().map(|j| (j.id, j)).collect();
        // Jobs not inserted lost to an existing idempotency key (from an
        // earlier call, or earlier in this batch).
        let missing: Vec<usize> = (0..jobs.len())
            .filter(|i| !created.contains_key(&ids[*i]))
            .collect();
        let mut existing: HashMap<(String, String), Existing> = HashMap::new();
        if let (false, Some(tx)) = (missing.is_empty(), tx.as_mut()) {
            // The job's max_attempts is its tasks' (all alike): a replay
            // asking for other attempts is a different job.
            let rows: Vec<Existing> = sqlx::query_as(
                "SELECT j.*,
                        (SELECT t.max_attempts FROM all_tasks t WHERE t.job_id = j.id
                         ORDER BY t.id LIMIT 1) AS task_max_attempts
                 FROM job_keys k JOIN unnest($1::text[], $2::text[]) AS u(tenant, key)
                      ON k.tenant = u.tenant AND k.idempotency_key = u.key
                 JOIN all_jobs j ON j.id = k.job_id",
            )
            .bind(
                missing
                    .iter()
                    .map(|&i| jobs[i].tenant.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                missing
                    .iter()
                    .map(|&i| jobs[i].idempotency_key.as_deref())
                    .collect::<Vec<_>>(),
            )
            .fetch_all(&mut **tx)
            .await?;
            for row in rows {
                let key = (
                    row.job.tenant.clone(),
                    row.job.idempotency_key.clone().unwrap_or_default(),
                );
                existing.insert(key, row);
            }
        }

        let mut out = Vec::with_capacity(jobs.len());
        for (i, new) in jobs.into_iter().enumerate() {
            if let Some(inserted) = created.remove(&ids[i]) {
                out.push(Enqueued {
                    job: inserted.into_job(new),
                    created: true,
                });
                continue;
            }
            let key = new.idempotency_key.clone().unwrap_or_default();
            let Existing {
                job,
                task_max_attempts,
            } = existing
                .get(&(new.tenant.clone(), key.clone()))
                .cloned()
                .ok_or_else(|| QueueError::invalid("idempotency_key", "conflicting job vanished; retry"))?;
            let same_job = job.job_type == new.job_type
                && job.input == new.input
                && job.priority == new.priority
                && task_max_attempts.is_none_or(|attempts| attempts == new.max_attempts);
            if !same_job {
                return Err(QueueError::IdempotencyConflict {
                    key,
                    existing: job.id,
                });
            }
            out.push(Enqueued { job, created: false });
        }
        if let Some(mut tx) = tx {
            if let Some(key) = batch_key {
                // The batch's key is its first job's tenant's.
                same_batch_or_new(&mut tx, key, &out[0].job.tenant, &out).await?;
            }
            tx.commit().await?;
        }
        Ok(out)
    }

    /// The positions of jobs whose idempotency key names a job already
    /// stored, or one earlier in the batch. A request racing this one with
    /// the same key is not seen here; the insert still resolves it.
    async fn replays_among(&self, jobs: &[NewJob]) -> Result<HashSet<usize>> {
        let keys: Vec<(usize, &str, &str)> = jobs
            .iter()
            .enumerate()
            .filter_map(|(i, j)| Some((i, j.tenant.as_str(), j.idempotency_key.as_deref()?)))
            .collect();
        let stored: Vec<i64> = sqlx::query_scalar(
            "SELECT k.ord FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS k(tenant, key, ord)
             WHERE EXISTS (SELECT 1 FROM job_keys j JOIN all_jobs a ON a.id = j.job_id
                           WHERE j.tenant = k.tenant AND j.idempotency_key = k.key)",
        )
        .bind(keys.iter().map(|k| k.1).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k.2).collect::<Vec<_>>())
        .fetch_all(&self.pool)
        .await?;
        let mut replays: HashSet<usize> = stored.into_iter().map(|ord| keys[ord as usize - 1].0).collect();
        let mut seen = HashSet::new();
        for &(i, tenant, key) in &keys {
            if !seen.insert((tenant, key)) {
                replays.insert(i);
            }
        }
        Ok(replays)
    }

    /// Each job's place in line among its tenant's and the other tenants'
    /// (see `take_places_in_line` in the migrations), per job its tenant,
    /// first task type and priority; taken in its own short statement so the
    /// tenants' clocks are not held through the enqueue or retry. Returns
    /// the connection that took them, for the caller's next statement; a
    /// retry checks one out afresh.
    async fn place_in_line(
        &self,
        jobs: &[(&str, TaskType, i32)],
    ) -> Result<(Vec<DateTime<Utc>>, PoolConnection<Postgres>)> {
        let batch = LinesOfBatch::new(jobs);
        // Whole microseconds, as PostgreSQL's interval keeps them, so each
        // job's place below is where the line's clock counted it.
        let step_micros = (self.config.fair_share_interval.as_secs_f64() * 1e6).round() as i64;
        let (firsts, conn) = retry_transient(|| async {
            let mut conn = self.pool.acquire().await?;
            let firsts: Vec<(i64, DateTime<Utc>)> =
                sqlx::query_as("SELECT line_ord, first_place FROM take_places_in_line($1, $2, $3, $4, $5)")
                    .bind(batch.lines.iter().map(|l| l.0).collect::<Vec<_>>())
                    .bind(batch.lines.iter().map(|l| l.1.as_str()).collect::<Vec<_>>())
                    .bind(batch.lines.iter().map(|l| l.2).collect::<Vec<_>>())
                    .bind(&batch.counts)
                    .bind(step_micros as f64 / 1e6)
                    .fetch_all(&mut *conn)
                    .await?;
            Ok((firsts, conn))
        })
        .await?;
        let mut first_of_line = vec![None; batch.lines.len()];
        for (ord, first) in firsts {
            // `line_ord` counts the lines given from 1.
            if let Some(slot) = usize::try_from(ord - 1)
                .ok()
                .and_then(|i| first_of_line.get_mut(i))
            {
                *slot = Some(first);
            }
        }
        let places = batch
            .line_and_rank
            .iter()
            .map(|&(line, rank)| {
                first_of_line[line].map(|first| first + chrono::TimeDelta::microseconds(step_micros * rank))
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                sqlx::Error::Protocol("take_places_in_line answered fewer lines than asked".into())
            })?;
        Ok((places, conn))
    }

    fn validate(&self, job: &NewJob) -> Result<()> {
        validate_new_job(job, self.config.max_input_bytes)
    }
}

/// A batch's jobs grouped by line (tenant, first task type, priority), in
/// the order each line first appears: the lines and their job counts, and
/// per job its line and how many of the line's jobs come before it.
struct LinesOfBatch<'a> {
    lines: Vec<(&'a str, TaskType, i32)>,
    counts: Vec<i32>,
    line_and_rank: Vec<(usize, i64)>,
}

impl<'a> LinesOfBatch<'a> {
    fn new(jobs: &[(&'a str, TaskType, i32)]) -> Self {
        let mut index: HashMap<(&str, TaskType, i32), usize> = HashMap::new();
        let mut batch = LinesOfBatch {
            lines: Vec::new(),
            counts: Vec::new(),
            line_and_rank: Vec::with_capacity(jobs.len()),
        };
        for &job in jobs {
            let line = *index.entry(job).or_insert_with(|| {
                batch.lines.push(job);
                batch.counts.push(0);
                batch.lines.len() - 1
            });
            batch.line_and_rank.push((line, i64::from(batch.counts[line])));
            batch.counts[line] += 1;
        }
        batch
    }
}

/// What [`Queue::enqueue`] checks before it writes anything, for a client
/// that checks first (the CLI reads a whole batch file before it sends a
/// job): the fields, the input's shape and text, NUL characters, and the
/// input's size up to `max_input_bytes`.
pub fn validate_new_job(job: &NewJob, max_input_bytes: usize) -> Result<()> {
    if job.tenant.trim().is_empty() || job.tenant.len() > MAX_TENANT_LEN {
        return Err(QueueError::invalid(
            "tenant",
            format!("must be 1 to {MAX_TENANT_LEN} characters"),
        ));
    }
    refuse_nul("tenant", &job.tenant)?;
    if let Some(key) = &job.idempotency_key {
        if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN {
            return Err(QueueError::invalid(
                "idempotency_key",
                format!("must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} characters"),
            ));
        }
        refuse_nul("idempotency_key", key)?;
    }
    if !PRIORITY_RANGE.contains(&job.priority) {
        return Err(QueueError::invalid(
            "priority",
            format!(
                "must be between {} and {}, got {}",
                PRIORITY_RANGE.start(),
                PRIORITY_RANGE.end(),
                job.priority
            ),
        ));
    }
    if !(1..=MAX_ATTEMPTS_LIMIT).contains(&job.max_attempts) {
        return Err(QueueError::invalid(
            "max_attempts",
            format!(
                "must be between 1 and {MAX_ATTEMPTS_LIMIT}, got {}",
                job.max_attempts
            ),
        ));
    }
    let Some(input) = job.input.as_object() else {
        return Err(QueueError::invalid("input", "must be a JSON object"));
    };
    refuse_nul_in_json("input", &job.input)?;
    let size = job.input.to_string().len();
    if size > max_input_bytes {
        return Err(QueueError::invalid(
            "input",
            format!("is {size} bytes; the limit is {max_input_bytes} bytes"),
        ));
    }
    let required = match job.job_type {
        JobType::Reading | JobType::Text => "prompt",
        JobType::Pdf | JobType::Audiobook => "text",
    };
    // The markers the pipelines read as structure (headings, bullets):
    // a text of nothing else typesets an empty page and reads aloud
    // only the stand-in title.
    let only_markers = |s: &str| {
        s.chars()
            .all(|c| c.is_whitespace() || matches!(c, '#' | '-' | '*' | '+'))
    };
    match input.get(required) {
        Some(serde_json::Value::String(s))
            if required == "text" && !s.trim().is_empty() && only_markers(s) =>
        {
            return Err(QueueError::invalid(
                "input.text",
                "has nothing to typeset or read aloud, only Markdown markers",
            ))
        }
        Some(serde_json::Value::String(s)) if !s.trim().is_empty() => {}
        Some(serde_json::Value::String(_)) => {
            return Err(QueueError::invalid(
                format!("input.{required}"),
                "must not be empty",
            ))
        }
        Some(_) => {
            return Err(QueueError::invalid(
                format!("input.{required}"),
                "must be a string",
            ))
        }
        None => {
            return Err(QueueError::invalid(
                format!("input.{required}"),
                format!("is required for {} jobs", job.job_type),
            ))
        }
    }
    for optional in ["title", "voice", "lang"] {
        if let Some(v) = input.get(optional) {
            if !v.is_string() {
                return Err(QueueError::invalid(
                    format!("input.{optional}"),
                    "must be a string",
                ));
            }
        }
    }
    if let Some(unknown) = input
        .keys()
        .find(|k| ![required, "title", "voice", "lang"].contains(&k.as_str()))
    {
        return Err(QueueError::invalid(
            format!("input.{unknown}"),
            format!(
                "is not a field of {} jobs' input (expected {required}, title, voice, lang)",
                job.job_type
            ),
        ));
    }
    // Last, the contract the workers read (`crate::input`) has the final
    // word, whoever enqueues: what passes here is what they accept.
    if let Some(serde_json::Value::String(tag)) = input.get("lang") {
        crate::input::primary_language(tag).map_err(|message| QueueError::invalid("input.lang", message))?;
    }
    if let Some(serde_json::Value::String(voice)) = input.get("voice") {
        crate::input::check_voice(voice).map_err(|message| QueueError::invalid("input.voice", message))?;
    }
    crate::input::JobInput::parse(job.job_type, &job.input)
        .map_err(|e| QueueError::invalid("input", e.to_string()))?;
    Ok(())
}

impl Queue {
    /// A tenant's job; another tenant's job is not found.
    pub async fn job(&self, tenant: &str, id: Uuid) -> Result<Job> {
        sqlx::query_as("SELECT * FROM all_jobs WHERE id = $1 AND tenant = $2")
            .bind(id)
            .bind(tenant)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(QueueError::JobNotFound(id))
    }

    /// A job with its tasks, regardless of tenant (workers and operators).
    pub async fn job_by_id(&self, id: Uuid) -> Result<Job> {
        sqlx::query_as("SELECT * FROM all_jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(QueueError::JobNotFound(id))
    }

    /// A tenant's job and its tasks in dependency order.
    pub async fn job_with_tasks(&self, tenant: &str, id: Uuid) -> Result<JobWithTasks> {
        let job = self.job(tenant, id).await?;
        let tasks = self.tasks_of(id).await?;
        Ok(JobWithTasks { job, tasks })
    }

    pub async fn tasks_of(&self, job_id: Uuid) -> Result<Vec<Task>> {
        Ok(
            sqlx::query_as("SELECT * FROM all_tasks WHERE job_id = $1 ORDER BY id")
                .bind(job_id)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// A tenant's jobs, newest first.
    pub async fn list_jobs(&self, tenant: &str, filter: &JobFilter) -> Result<JobPage> {
        if !(1..=1000).contains(&filter.limit) {
            return Err(QueueError::invalid(
                "limit",
                format!("must be between 1 and 1000, got {}", filter.limit),
            ));
        }
        let mut jobs: Vec<Job> = sqlx::query_as(LIST_JOBS)
            .bind(tenant)
            .bind(filter.status.map(|s| s.as_str()))
            .bind(filter.job_type.map(|t| t.as_str()))
            .bind(filter.before)
            .bind(filter.limit + 1)
            .bind(filter.created_after)
            .fetch_all(&self.pool)
            .await?;
        let next = if jobs.len() as i64 > filter.limit {
            jobs.truncate(filter.limit as usize);
            jobs.last().map(|j| j.id)
        } else {
            None
        };
        Ok(JobPage { jobs, next })
    }

    /// Cancel a job: its unfinished tasks are cancelled (a worker holding one
    /// loses its lease at the next heartbeat). Cancelling a finished job is
    /// refused; cancelling a cancelled one is a no-op. The job is locked
    /// before its tasks, the order every task change follows.
    pub async fn cancel_job(&self, tenant: &str, id: Uuid) -> Result<Job> {
        let mut tx = self.pool.begin().await?;
        let job = locked_job(&mut tx, tenant, id, RowLock::NoKeyUpdate).await?;
        match job.status {
            JobStatus::Cancelled => return Ok(job),
            JobStatus::Complete | JobStatus::Failed => {
                return Err(QueueError::InvalidState {
                    job_id: id,
                    status: job.status.to_string(),
                    message: "a finished job cannot be cancelled".into(),
                })
            }
            JobStatus::Queued | JobStatus::Processing => {}
        }
        // The tasks are locked in id order, as a heartbeat locks them (it
        // takes no job lock): in the order of the job's index, a task the
        // heartbeat held could be the one this waited for while it held the
        // heartbeat's next.
        sqlx::query(
            "UPDATE job_tasks t SET status = 'cancelled', finished_at = now(), updated_at = now(),
                    last_error = coalesce(t.last_error, 'cancelled')
             FROM (SELECT o.id FROM job_tasks o
                   WHERE o.job_id = $1 AND o.status IN ('pending', 'claimed', 'processing')
                   ORDER BY o.id
                   FOR NO KEY UPDATE) l
             WHERE t.id = l.id",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        // A claim does not write the job's row: a job cancelled while its
        // tasks ran started when the first of them was claimed.
        let with_row: Option<Job> = sqlx::query_as(
            "UPDATE jobs j SET status = 'cancelled', finished_at = now(), updated_at = now(),
                    started_at = coalesce(j.started_at,
                        (SELECT min(t.first_claimed_at) FROM job_tasks t WHERE t.job_id = j.id))
             WHERE j.id = $1 RETURNING j.*",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        sqlx::query("SELECT retire_jobs(ARRAY[$1::uuid])")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        // A job kept in its task's row has no row to update: retire_jobs
        // wrote it to history from its cancelled task.
        let job = match with_row {
            Some(job) => job,
            None => {
                sqlx::query_as("SELECT * FROM job_history WHERE id = $1")
                    .bind(id)
                    .fetch_one(&mut *tx)
                    .await?
            }
        };
        tx.commit().await?;
        Ok(job)
    }

    /// Put a failed job's failed tasks (and the tasks they blocked) back to
    /// pending with fresh attempts. Their claim counters go on, so no lease
    /// of an earlier round becomes valid again. They queue behind their
    /// tenant's waiting jobs as a new job would: kept at the places they
    /// were first given, retries would go ahead of every tenant's line.
    pub async fn retry_job(&self, tenant: &str, id: Uuid) -> Result<Job> {
        // The first task to run again names the line. A retry refused below
        // (the job changed meanwhile) leaves a harmless gap in it.
        let first: Option<(String, i32)> = sqlx::query_as(
            "SELECT t.task_type, t.priority FROM all_jobs j JOIN all_tasks t ON t.job_id = j.id
             WHERE j.id = $1 AND j.tenant = $2 AND j.status = 'failed'
               AND t.status IN ('failed', 'cancelled')
             ORDER BY t.id LIMIT 1",
        )
        .bind(id)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        let place = match first {
            Some((task_type, priority)) => self
                .place_in_line(&[(tenant, task_type.parse()?, priority)])
                .await?
                .0
                .pop(),
            None => None,
        };
        let mut tx = self.pool.begin().await?;
        let job = locked_job(&mut tx, tenant, id, RowLock::Update).await?;
        if job.status != JobStatus::Failed {
            return Err(QueueError::InvalidState {
                job_id: id,
                status: job.status.to_string(),
                message: "only a failed job can be retried".into(),
            });
        }
        // Open again: back from history, with its tasks.
        sqlx::query("SELECT reopen_job($1)")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE job_tasks d
             SET status = 'pending', attempts = 0, run_at = now(), finished_at = NULL,
                 fair_at = coalesce($2, d.fair_at),
                 claimed_by = NULL, claimed_at = NULL, heartbeat_at = NULL, updated_at = now(),
                 waiting_on = (SELECT count(*) FROM job_tasks p
                               WHERE p.job_id = d.job_id AND p.task_type = ANY (d.dependencies)
                                 AND p.status <> 'complete')
             WHERE d.job_id = $1 AND d.status IN ('failed', 'cancelled')",
        )
        .bind(id)
        .bind(place)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE jobs SET status = 'queued', error = NULL, finished_at = NULL, updated_at = now() WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("SELECT refresh_job_status(ARRAY[$1::uuid])")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let job = sqlx::query_as("SELECT * FROM open_jobs WHERE id = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(job)
    }
}

/// Separates a batch's idempotency key from a job's index in the batch.
/// `№` (U+2116) is not ASCII, so an HTTP header cannot carry it as part of
/// a key, and no single job's key can equal a batch job's.
pub const BATCH_KEY_SEPARATOR: char = '№';

/// The key of job `i` of a batch sent with idempotency key `key`.
pub fn batch_item_key(key: &str, i: usize) -> String {
    format!("{key}{BATCH_KEY_SEPARATOR}{i}")
}

/// A batch enqueued under `key` (its jobs' results in `out`, in the same
/// transaction) is either new or a replay of the same batch: not some of
/// each (jobs added to the batch), and not a replay of a longer batch
/// (jobs left out; a batch is written whole, so its job past the replay's
/// last tells).
async fn same_batch_or_new(
    tx: &mut sqlx::PgConnection,
    key: &str,
    tenant: &str,
    out: &[Enqueued],
) -> Result<()> {
    let Some(replayed) = out.iter().find(|e| !e.created) else {
        return Ok(());
    };
    let conflict = |existing| QueueError::IdempotencyConflict {
        key: key.to_string(),
        existing,
    };
    if out.iter().any(|e| e.created) {
        return Err(conflict(replayed.job.id));
    }
    let longer: Option<Uuid> = sqlx::query_scalar(
        "SELECT k.job_id FROM job_keys k JOIN all_jobs j ON j.id = k.job_id
         WHERE k.tenant = $1 AND k.idempotency_key = $2",
    )
    .bind(tenant)
    .bind(batch_item_key(key, out.len()))
    .fetch_optional(&mut *tx)
    .await?;
    match longer {
        Some(existing) => Err(conflict(existing)),
        None => Ok(()),
    }
}

/// A row lock taken on a job read with [`locked_job`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum RowLock {
    /// The job's row and its open tasks: a claim writes only the tasks
    /// (`open_jobs` reads the job's status off them), so a reader that must
    /// see every status change after it holds both.
    Share,
    NoKeyUpdate,
    Update,
}

/// A tenant's job, open (`jobs`, or its task's row in `job_tasks`) or
/// finished (`job_history`, or its task's row in `task_history`), read
/// under a row lock in `conn`'s transaction; another tenant's job is not
/// found. A job that moved while this waited for its lock (it finished, or
/// was retried) is looked for again where it went.
pub(crate) async fn locked_job(
    conn: &mut sqlx::PgConnection,
    tenant: &str,
    id: Uuid,
    lock: RowLock,
) -> Result<Job> {
    let clause = match lock {
        RowLock::Share => "FOR SHARE",
        RowLock::NoKeyUpdate => "FOR NO KEY UPDATE",
        RowLock::Update => "FOR UPDATE",
    };
    let open = format!("SELECT 1 FROM jobs WHERE id = $1 AND tenant = $2 {clause}");
    // A job kept in its task's row: that row is the job's and its task's.
    let task_row = format!(
        "SELECT 1 FROM job_tasks WHERE job_id = $1 AND job_tenant = $2 AND job_input IS NOT NULL {clause}"
    );
    let finished = format!("SELECT * FROM job_history WHERE id = $1 AND tenant = $2 {clause}");
    // A job of one task that completed in its task's row stays that row.
    let finished_task_row =
        format!("SELECT * FROM finished_jobs_in_task_rows WHERE id = $1 AND tenant = $2 {clause}");
    // Each move is one transaction, so three looks see it settle.
    for _ in 0..3 {
        let in_job_row = sqlx::query_scalar::<_, i32>(&open)
            .bind(id)
            .bind(tenant)
            .fetch_optional(&mut *conn)
            .await?
            .is_some();
        let in_task_row = !in_job_row
            && sqlx::query_scalar::<_, i32>(&task_row)
                .bind(id)
                .bind(tenant)
                .fetch_optional(&mut *conn)
                .await?
                .is_some();
        if in_job_row || in_task_row {
            if in_job_row && matches!(lock, RowLock::Share) {
                // In id order, as every other locker of a job's tasks.
                sqlx::query(
                    "SELECT 1 FROM job_tasks WHERE job_id = $1 AND status IN ('pending', 'claimed', 'processing')
                     ORDER BY id FOR SHARE",
                )
                .bind(id)
                .execute(&mut *conn)
                .await?;
            }
            // Read after the locks, in a statement of its own: one that
            // waited for a lock still reads the tasks as they were before.
            return Ok(sqlx::query_as("SELECT * FROM open_jobs WHERE id = $1")
                .bind(id)
                .fetch_one(&mut *conn)
                .await?);
        }
        for finished in [&finished, &finished_task_row] {
            let job: Option<Job> = sqlx::query_as(finished)
                .bind(id)
                .bind(tenant)
                .fetch_optional(&mut *conn)
                .await?;
            if let Some(job) = job {
                return Ok(job);
            }
        }
    }
    Err(QueueError::JobNotFound(id))
}

/// PostgreSQL stores no NUL character in `text` (nor `\u0000` in `jsonb`):
/// refuse it here, naming the field, rather than fail in the database.
pub(crate) fn refuse_nul(field: &str, value: &str) -> Result<()> {
    if value.contains('\0') {
        return Err(QueueError::invalid(
            field,
            "must not contain a NUL character (\\u0000)",
        ));
    }
    Ok(())
}

/// [`refuse_nul`] for every string and object key of a JSON value; `at` is
/// the value's path (`input.extra.list[1]`). A bad key names its object.
fn refuse_nul_in_json(at: &str, value: &serde_json::Value) -> Result<()> {
    match value {
        serde_json::Value::String(s) => refuse_nul(at, s),
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, item)| refuse_nul_in_json(&format!("{at}[{i}]"), item)),
        serde_json::Value::Object(map) => map.iter().try_for_each(|(key, item)| {
            if key.contains('\0') {
                return Err(QueueError::invalid(
                    at,
                    "a key must not contain a NUL character (\\u0000)",
                ));
            }
            refuse_nul_in_json(&format!("{at}.{key}"), item)
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_grouped_into_lines_in_the_order_they_first_appear_and_each_job_ranked_in_its_line() {
        let text = TaskType::TextGeneration;
        let pdf = TaskType::PdfGeneration;
        let batch = LinesOfBatch::new(&[
            ("acme", text, 0),
            ("globex", text, 0),
            ("acme", text, 0),
            ("acme", pdf, 0),
            ("acme", text, 5),
            ("acme", text, 0),
            ("globex", text, 0),
        ]);
        assert_eq!(
            batch.lines,
            vec![
                ("acme", text, 0),
                ("globex", text, 0),
                ("acme", pdf, 0),
                ("acme", text, 5)
            ]
        );
        assert_eq!(batch.counts, vec![3, 2, 1, 1]);
        assert_eq!(
            batch.line_and_rank,
            vec![(0, 0), (1, 0), (0, 1), (2, 0), (3, 0), (0, 2), (1, 1)]
        );
    }
}
