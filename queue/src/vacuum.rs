//! The vacuumer: keeps the open-task table's indexes free of the entries
//! of tasks already taken.
//!
//! A claim takes the first runnable tasks in the claim index's order and
//! moves them out of the index's predicate, so their entries die at the
//! index's head, where the next claim starts reading. PostgreSQL removes
//! dead entries only when it vacuums (or when an insert lands on their
//! page, and new tasks mostly land further on), so every claim, and every
//! enqueue's look at the head of its line, walks all the entries taken
//! since the last vacuum: 786 index pages per claim, on average, while
//! four loops drained 200,000 tasks 50 at a time. Autovacuum looks at most
//! once a minute (`autovacuum_naptime`, a server setting), a minute of
//! claims at the rates this queue drains. So the queue vacuums the table
//! itself, once enough of its rows are dead.

use crate::error::Result;
use crate::Queue;

/// What one look at the open-task table found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskVacuum {
    /// Dead row versions of `job_tasks`, as PostgreSQL's statistics count
    /// them (each backend reports its own within a second or so when busy).
    pub dead_rows: i64,
    /// Whether a vacuum was run. One that finds another under way on the
    /// table (autovacuum's, another replica's) skips it without waiting.
    pub vacuumed: bool,
}

impl Queue {
    /// Vacuum `job_tasks`, its indexes included, once at least
    /// `min_dead_rows` of its row versions are dead. Cheap when there is
    /// nothing to do: one read of the statistics. Safe from several
    /// processes at once.
    pub async fn vacuum_tasks(&self, min_dead_rows: i64) -> Result<TaskVacuum> {
        let dead_rows: i64 = sqlx::query_scalar(
            "SELECT coalesce((SELECT n_dead_tup FROM pg_stat_user_tables
                              WHERE relid = 'job_tasks'::regclass), 0)",
        )
        .fetch_one(&self.pool)
        .await?;
        if dead_rows < min_dead_rows.max(1) {
            return Ok(TaskVacuum {
                dead_rows,
                vacuumed: false,
            });
        }
        // INDEX_CLEANUP ON: with a large backlog the dead rows sit on few of
        // the table's pages, and PostgreSQL would otherwise leave the indexes
        // as they are (the entries are what costs). VACUUM cannot run in a
        // transaction, nor as a prepared statement: sent as plain text.
        sqlx::raw_sql("VACUUM (INDEX_CLEANUP ON, SKIP_LOCKED) job_tasks")
            .execute(&self.pool)
            .await?;
        Ok(TaskVacuum {
            dead_rows,
            vacuumed: true,
        })
    }
}
