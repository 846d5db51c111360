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
    /// Seconds until the earliest `scheduled` task falls due; none without one.
    /// Nothing notifies when a `run_at` passes, so a controller with the
    /// pool at zero wakes itself then.
    pub next_scheduled_seconds: Option<f64>,
    /// Waiting for tasks they depend on.
    pub blocked: i64,
    /// Claimed or processing.
    pub in_flight: i64,
    /// How long the oldest runnable task has waited, in seconds.
    pub oldest_pending_seconds: f64,
    /// Completions in the last minute.
    pub completed_last_minute: i64,
    /// Some count reached `QueueConfig::depth_count_cap` and stopped there:
    /// the figures are lower bounds.
    pub capped: bool,
}

impl TaskDepth {
    pub fn empty(task_type: TaskType) -> Self {
        TaskDepth {
            task_type,
            pending: 0,
            scheduled: 0,
            next_scheduled_seconds: None,
            blocked: 0,
            in_flight: 0,
            oldest_pending_seconds: 0.0,
            completed_last_minute: 0,
            capped: false,
        }
    }
}

/// One statement; per task type, each figure is an index range of the
/// partial indexes over open tasks (and, for the last minute's completions,
/// of the completed-task index of each history partition), read up to
/// `$2` rows. Its cost follows the active set, never the history, and is
/// bounded even when the backlog is huge: counting 100,000 pending rows
/// exactly cost ~17 ms here, counting to the cap a few ms.
pub(crate) const DEPTH_SQL: &str = r#"
SELECT tt.task_type,
    (SELECT count(*) FROM (SELECT FROM job_tasks t
        WHERE t.task_type = tt.task_type AND t.status = 'pending' AND t.waiting_on = 0 AND t.run_at <= now()
        LIMIT $2) c) AS pending,
    (SELECT count(*) FROM (SELECT FROM job_tasks t
        WHERE t.task_type = tt.task_type AND t.status = 'pending' AND t.waiting_on = 0 AND t.run_at > now()
        LIMIT $2) c) AS scheduled,
    (SELECT count(*) FROM (SELECT FROM job_tasks t
        WHERE t.task_type = tt.task_type AND t.status = 'pending' AND t.waiting_on > 0
        LIMIT $2) c) AS blocked,
    (SELECT count(*) FROM (SELECT FROM job_tasks t
        WHERE t.task_type = tt.task_type AND t.status IN ('claimed', 'processing')
        LIMIT $2) c) AS in_flight,
    coalesce((SELECT extract(epoch FROM now() - min(t.run_at)) FROM job_tasks t
        WHERE t.task_type = tt.task_type AND t.status = 'pending' AND t.waiting_on = 0 AND t.run_at <= now()),
        0)::float8 AS oldest,
    (SELECT count(*) FROM (SELECT FROM all_tasks t
        WHERE t.task_type = tt.task_type AND t.status = 'complete' AND t.finished_at > now() - interval '1 minute'
        LIMIT $2) c) AS completed,
    (SELECT extract(epoch FROM min(t.run_at) - now()) FROM job_tasks t
        WHERE t.task_type = tt.task_type AND t.status = 'pending' AND t.waiting_on = 0 AND t.run_at > now()
    )::float8 AS next_scheduled
FROM unnest($1::text[]) AS tt(task_type)
"#;

impl Queue {
    /// Depth for every task type, in `TaskType::ALL` order, in one query.
    /// Counts are exact up to `QueueConfig::depth_count_cap`.
    pub async fn depth(&self) -> Result<Vec<TaskDepth>> {
        let cap = self.config.depth_count_cap.max(1);
        type Row = (String, i64, i64, i64, i64, f64, i64, Option<f64>);
        let rows: Vec<Row> = sqlx::query_as(DEPTH_SQL)
            .bind(task_type_names())
            .bind(cap)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(
                |(task_type, pending, scheduled, blocked, in_flight, oldest, completed, next_scheduled)| {
                    Ok(TaskDepth {
                        task_type: task_type.parse()?,
                        pending,
                        scheduled,
                        next_scheduled_seconds: next_scheduled,
                        blocked,
                        in_flight,
                        oldest_pending_seconds: oldest,
                        completed_last_minute: completed,
                        capped: [pending, scheduled, blocked, in_flight, completed]
                            .iter()
                            .any(|&n| n >= cap),
                    })
                },
            )
            .collect()
    }

    /// `EXPLAIN` of the depth query, for tests and operators.
    pub async fn explain_depth(&self) -> Result<String> {
        let lines: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN {DEPTH_SQL}"))
            .bind(task_type_names())
            .bind(self.config.depth_count_cap.max(1))
            .fetch_all(&self.pool)
            .await?;
        Ok(lines.join("\n"))
    }
}

fn task_type_names() -> Vec<&'static str> {
    TaskType::ALL.iter().map(|t| t.as_str()).collect()
}
