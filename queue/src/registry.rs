//! The worker registry: which replicas exist, what they run, and which hold
//! tasks. The controller reads it to remove only idle replicas, and drains
//! them through it so a scale-down never races a new claim.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::error::{QueueError, Result};
use crate::model::TaskType;
use crate::Queue;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    Running,
    /// Chosen for removal: claims nothing more.
    Draining,
    Stopped,
}

impl WorkerState {
    fn parse(s: &str) -> Result<Self> {
        match s {
            "running" => Ok(WorkerState::Running),
            "draining" => Ok(WorkerState::Draining),
            "stopped" => Ok(WorkerState::Stopped),
            other => Err(QueueError::invalid(
                "state",
                format!("unknown worker state {other:?}"),
            )),
        }
    }
}

/// A replica announcing itself.
#[derive(Debug, Clone)]
pub struct NewWorker {
    /// `FLY_MACHINE_ID`, `POD_NAME`, or host+pid.
    pub id: String,
    pub pool: Option<String>,
    pub task_types: Vec<TaskType>,
    pub concurrency: i32,
    pub hostname: Option<String>,
    pub pid: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkerRecord {
    pub id: String,
    pub pool: Option<String>,
    pub task_types: Vec<TaskType>,
    pub concurrency: i32,
    pub state: WorkerState,
    pub started_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
    /// Tasks it holds right now.
    pub in_flight: i64,
}

/// How many tasks one replica holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplicaLoad {
    pub worker_id: String,
    pub in_flight: i64,
}

type WorkerRow = (
    String,
    Option<String>,
    Vec<String>,
    i32,
    String,
    DateTime<Utc>,
    DateTime<Utc>,
    i64,
);

impl Queue {
    /// Register (or re-register after a restart) a replica as running, or as
    /// draining when the controller already chose it for removal: a drain
    /// mark is the controller's to lift (its pass puts back to work every
    /// replica it marked and did not stop), never a registration's. A
    /// replica restarted between its drain and its stop, or a registration
    /// repeated because its answer was lost, must not claim work that the
    /// stop would then cut short.
    pub async fn register_worker(&self, worker: &NewWorker) -> Result<()> {
        if worker.id.is_empty() {
            return Err(QueueError::invalid("id", "worker identity must not be empty"));
        }
        if worker.task_types.is_empty() {
            return Err(QueueError::invalid(
                "task_types",
                "a worker runs at least one task type",
            ));
        }
        if worker.concurrency < 1 {
            return Err(QueueError::invalid(
                "concurrency",
                format!("must be at least 1, got {}", worker.concurrency),
            ));
        }
        sqlx::query(
            "INSERT INTO workers (id, pool, task_types, concurrency, hostname, pid)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (id) DO UPDATE
             SET pool = EXCLUDED.pool, task_types = EXCLUDED.task_types,
                 concurrency = EXCLUDED.concurrency, hostname = EXCLUDED.hostname,
                 pid = EXCLUDED.pid, started_at = now(), heartbeat_at = now(),
                 state = CASE WHEN workers.state = 'draining' THEN 'draining' ELSE 'running' END",
        )
        .bind(&worker.id)
        .bind(&worker.pool)
        .bind(worker.task_types.iter().map(|t| t.as_str()).collect::<Vec<_>>())
        .bind(worker.concurrency)
        .bind(&worker.hostname)
        .bind(worker.pid)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Record that the replica is alive; returns its state (a worker that
    /// reads `Draining` stops claiming). `None` when it is not registered.
    pub async fn worker_heartbeat(&self, worker_id: &str) -> Result<Option<WorkerState>> {
        let state: Option<String> =
            sqlx::query_scalar("UPDATE workers SET heartbeat_at = now() WHERE id = $1 RETURNING state")
                .bind(worker_id)
                .fetch_optional(&self.pool)
                .await?;
        state.as_deref().map(WorkerState::parse).transpose()
    }

    pub async fn deregister_worker(&self, worker_id: &str) -> Result<()> {
        sqlx::query("DELETE FROM workers WHERE id = $1")
            .bind(worker_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Registered replicas (of one pool, or all) with the tasks each holds.
    pub async fn workers(&self, pool: Option<&str>) -> Result<Vec<WorkerRecord>> {
        let rows: Vec<WorkerRow> = sqlx::query_as(
            "SELECT w.id, w.pool, w.task_types, w.concurrency, w.state, w.started_at, w.heartbeat_at,
                    (SELECT count(*) FROM job_tasks t
                     WHERE t.claimed_by = w.id AND t.task_type = ANY (task_types())
                       AND t.status IN ('claimed', 'processing')) AS in_flight
             FROM workers w
             WHERE $1::text IS NULL OR w.pool = $1
             ORDER BY w.id",
        )
        .bind(pool)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(
                |(id, pool, types, concurrency, state, started_at, heartbeat_at, in_flight)| {
                    Ok(WorkerRecord {
                        id,
                        pool,
                        task_types: types.iter().map(|t| t.parse()).collect::<Result<_>>()?,
                        concurrency,
                        state: WorkerState::parse(&state)?,
                        started_at,
                        heartbeat_at,
                        in_flight,
                    })
                },
            )
            .collect()
    }

    /// Replicas holding at least one task, with how many: one grouped read of
    /// the active tasks for every pool at once.
    pub async fn busy_replicas(&self) -> Result<Vec<ReplicaLoad>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT claimed_by, count(*) FROM job_tasks
             WHERE task_type = ANY (task_types()) AND status IN ('claimed', 'processing')
               AND claimed_by IS NOT NULL
             GROUP BY claimed_by ORDER BY claimed_by",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(worker_id, in_flight)| ReplicaLoad { worker_id, in_flight })
            .collect())
    }

    /// The drain step of a scale-down: mark these replicas draining, but only
    /// those that hold no task at that moment. Returns the ones marked; the
    /// others picked up work and must be kept. Taking the registry rows
    /// FOR UPDATE first waits out any claim in progress (claims lock them
    /// too), and the idle check then sees every committed claim.
    ///
    /// A replica not registered yet (a pod still starting) gets a draining
    /// placeholder row, so when it registers it claims nothing; one that
    /// registers (or claims: `claim_tasks` registers unknown claimers) while
    /// this runs keeps its own row and is not drained, and one that holds a
    /// task without a row is never drained.
    pub async fn drain_idle(&self, worker_ids: &[String]) -> Result<Vec<String>> {
        if worker_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin().await?;
        let locked: Vec<String> =
            sqlx::query_scalar("SELECT id FROM workers WHERE id = ANY($1) ORDER BY id FOR UPDATE")
                .bind(worker_ids)
                .fetch_all(&mut *tx)
                .await?;
        let mut drained: Vec<String> = sqlx::query_scalar(
            "UPDATE workers w SET state = 'draining'
             WHERE w.id = ANY($1)
               AND NOT EXISTS (SELECT 1 FROM job_tasks t
                               WHERE t.claimed_by = w.id AND t.task_type = ANY (task_types())
                                 AND t.status IN ('claimed', 'processing'))
             RETURNING w.id",
        )
        .bind(&locked)
        .fetch_all(&mut *tx)
        .await?;
        let unregistered: Vec<&String> = worker_ids.iter().filter(|id| !locked.contains(id)).collect();
        if !unregistered.is_empty() {
            // No task types: the mark of a placeholder, never of a registration.
            let placeholders: Vec<String> = sqlx::query_scalar(
                "INSERT INTO workers (id, task_types, concurrency, state)
                 SELECT u.id, '{}', 1, 'draining' FROM unnest($1::text[]) AS u(id)
                 WHERE NOT EXISTS (SELECT 1 FROM job_tasks t
                                   WHERE t.claimed_by = u.id AND t.task_type = ANY (task_types())
                                     AND t.status IN ('claimed', 'processing'))
                 ON CONFLICT (id) DO NOTHING
                 RETURNING id",
            )
            .bind(&unregistered)
            .fetch_all(&mut *tx)
            .await?;
            drained.extend(placeholders);
        }
        tx.commit().await?;
        Ok(drained)
    }

    /// Put draining replicas back to running (a removal that did not happen).
    pub async fn undrain(&self, worker_ids: &[String]) -> Result<()> {
        sqlx::query("UPDATE workers SET state = 'running' WHERE id = ANY($1) AND state = 'draining'")
            .bind(worker_ids)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

impl Queue {
    /// Of these replicas, put the ones marked draining (or recorded stopped:
    /// the backend lists them as running, so their removal did not happen)
    /// back to running and return them: the controller's sweep of marks no
    /// removal followed (a crash between drain and stop, a failed undrain, a
    /// name that came back). Rows are locked in id order, as `drain_idle`
    /// locks them.
    pub async fn undrain_marked(&self, worker_ids: &[String]) -> Result<Vec<String>> {
        if worker_ids.is_empty() {
            return Ok(Vec::new());
        }
        let undrained = sqlx::query_scalar(
            "WITH marked AS (
                 SELECT id FROM workers WHERE id = ANY($1) AND state IN ('draining', 'stopped')
                 ORDER BY id FOR UPDATE
             )
             UPDATE workers w SET state = 'running' FROM marked
             WHERE w.id = marked.id
             RETURNING w.id",
        )
        .bind(worker_ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(undrained)
    }

    /// Record replicas the controller removed as stopped, where they are
    /// still marked draining (a replica that died before its removal never
    /// deregisters itself). Returns the ids recorded.
    pub async fn mark_stopped(&self, worker_ids: &[String]) -> Result<Vec<String>> {
        if worker_ids.is_empty() {
            return Ok(Vec::new());
        }
        Ok(sqlx::query_scalar(
            "UPDATE workers SET state = 'stopped'
             WHERE id = ANY($1) AND state = 'draining'
             RETURNING id",
        )
        .bind(worker_ids)
        .fetch_all(&self.pool)
        .await?)
    }
}
