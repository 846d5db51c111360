//! Queue depth per task type: what the controller scales on.

use serde::Serialize;

use crate::error::Result;
use crate::model::TaskType;
use crate::Queue;

/// The load on one task type right now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskDepth {
    pub task_type: TaskType,
    /// Runnable now.
    pub pending: i64,
    /// Waiting for a later `run_at` (retries in backoff).
    pub scheduled: i64,
    /// Waiting for tasks they depend on.
    pub blocked: i64,
    /// Claimed or processing.
    pub in_flight: i64,
    /// How long the oldest runnable task has waited, in seconds.
    pub oldest_pending_seconds: f64,
    /// Completions in the last minute.
    pub completed_last_minute: i64,
}

impl TaskDepth {
    pub fn empty(task_type: TaskType) -> Self {
        TaskDepth {
            task_type,
            pending: 0,
            scheduled: 0,
            blocked: 0,
            in_flight: 0,
            oldest_pending_seconds: 0.0,
            completed_last_minute: 0,
        }
    }
}

/// One grouped statement over the active-task index plus the recent
/// completions range: its cost follows the active set, never the history.
pub(crate) const DEPTH_SQL: &str = r#"
WITH active AS (
    SELECT task_type,
           count(*) FILTER (WHERE status = 'pending' AND waiting_on = 0 AND run_at <= now()) AS pending,
           count(*) FILTER (WHERE status = 'pending' AND waiting_on = 0 AND run_at > now()) AS scheduled,
           count(*) FILTER (WHERE status = 'pending' AND waiting_on > 0) AS blocked,
           count(*) FILTER (WHERE status IN ('claimed', 'processing')) AS in_flight,
           coalesce(extract(epoch FROM now() - min(run_at)
               FILTER (WHERE status = 'pending' AND waiting_on = 0 AND run_at <= now())), 0)::float8 AS oldest
    FROM job_tasks
    WHERE status IN ('pending', 'claimed', 'processing')
    GROUP BY task_type
), recent AS (
    SELECT task_type, count(*) AS completed
    FROM job_tasks
    WHERE status = 'complete' AND finished_at > now() - interval '1 minute'
    GROUP BY task_type
)
SELECT coalesce(a.task_type, r.task_type) AS task_type,
       coalesce(a.pending, 0), coalesce(a.scheduled, 0), coalesce(a.blocked, 0),
       coalesce(a.in_flight, 0), coalesce(a.oldest, 0), coalesce(r.completed, 0)
FROM active a FULL JOIN recent r ON a.task_type = r.task_type
"#;

impl Queue {
    /// Depth for every task type (types with no tasks report zeros), in one
    /// query.
    pub async fn depth(&self) -> Result<Vec<TaskDepth>> {
        let rows: Vec<(String, i64, i64, i64, i64, f64, i64)> =
            sqlx::query_as(DEPTH_SQL).fetch_all(&self.pool).await?;
        let mut out: Vec<TaskDepth> = TaskType::ALL.iter().map(|t| TaskDepth::empty(*t)).collect();
        for (task_type, pending, scheduled, blocked, in_flight, oldest, completed) in rows {
            let task_type: TaskType = task_type.parse()?;
            let d = out
                .iter_mut()
                .find(|d| d.task_type == task_type)
                .expect("every type listed");
            *d = TaskDepth {
                task_type,
                pending,
                scheduled,
                blocked,
                in_flight,
                oldest_pending_seconds: oldest,
                completed_last_minute: completed,
            };
        }
        Ok(out)
    }

    /// `EXPLAIN` of the depth query, for tests and operators.
    pub async fn explain_depth(&self) -> Result<String> {
        let lines: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN {DEPTH_SQL}"))
            .fetch_all(&self.pool)
            .await?;
        Ok(lines.join("\n"))
    }
}
