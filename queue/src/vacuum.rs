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
//! itself, once enough rows died since the last vacuum.

use crate::error::Result;
use crate::Queue;

/// What one look at the open-task table found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskVacuum {
    /// Dead row versions of `job_tasks` after the look (after the vacuum,
    /// when one ran), as PostgreSQL's statistics count them; each backend
    /// reports its own within a second or so when busy. The caller hands
    /// the figure back as the next look's `left_last_time`.
    pub dead_rows: i64,
    pub outcome: VacuumOutcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VacuumOutcome {
    /// Vacuumed: PostgreSQL counted a vacuum of the table since the look.
    Vacuumed,
    /// Too few rows died since the last vacuum.
    NotNeeded,
    /// Another vacuum of the table is under way (autovacuum's, another
    /// replica's), or took it first: not waited for.
    UnderWay,
    /// This role may not vacuum the table (only its owner, a member of the
    /// owner's role, a superuser, the database's owner or, from PostgreSQL
    /// 17, a role with MAINTAIN on it may): PostgreSQL would skip it with a
    /// warning on every look.
    NotAllowed,
}

impl Queue {
    /// Vacuum `job_tasks`, its indexes included, once at least
    /// `min_dead_rows` more of its row versions are dead than the last
    /// vacuum left (`left_last_time`, 0 at first; rows a long transaction
    /// still holds stay dead through a vacuum, and must not make every look
    /// vacuum again). One read of the statistics when there is nothing to
    /// do. Safe from several processes at once.
    pub async fn vacuum_tasks(&self, min_dead_rows: i64, left_last_time: i64) -> Result<TaskVacuum> {
        // Who may vacuum it, as VACUUM itself decides: the table's owner (a
        // member of its role, a superuser) or, from PostgreSQL 17, a role
        // with MAINTAIN on it (pg_maintain's members among them); and in
        // every version the database's owner.
        let (dead_rows, vacuums, allowed, under_way): (i64, i64, bool, bool) = sqlx::query_as(
            "SELECT s.n_dead_tup, s.vacuum_count + s.autovacuum_count,
                    CASE WHEN current_setting('server_version_num')::int >= 170000
                         THEN has_table_privilege(c.oid, 'MAINTAIN')
                         ELSE pg_has_role(c.relowner, 'USAGE') END
                    OR pg_has_role(d.datdba, 'USAGE'),
                    EXISTS (SELECT 1 FROM pg_stat_progress_vacuum p WHERE p.relid = c.oid)
             FROM pg_class c JOIN pg_stat_user_tables s ON s.relid = c.oid
                  JOIN pg_database d ON d.datname = current_database()
             WHERE c.oid = 'job_tasks'::regclass",
        )
        .fetch_one(&self.pool)
        .await?;
        let outcome = if dead_rows - left_last_time.max(0) < min_dead_rows.max(1) {
            VacuumOutcome::NotNeeded
        } else if !allowed {
            VacuumOutcome::NotAllowed
        } else if under_way {
            VacuumOutcome::UnderWay
        } else {
            VacuumOutcome::Vacuumed
        };
        if outcome != VacuumOutcome::Vacuumed {
            return Ok(TaskVacuum { dead_rows, outcome });
        }
        // INDEX_CLEANUP ON: with a large backlog the dead rows sit on few of
        // the table's pages, and PostgreSQL would otherwise leave the indexes
        // as they are (the entries are what costs). TRUNCATE false: a queue
        // that drained has an empty end, and cutting it off takes a lock
        // every claim waits for. VACUUM cannot run in a transaction, nor as
        // a prepared statement: sent as plain text.
        sqlx::raw_sql("VACUUM (INDEX_CLEANUP ON, TRUNCATE false, SKIP_LOCKED) job_tasks")
            .execute(&self.pool)
            .await?;
        // A vacuum reports its counts as it ends.
        let (dead_rows, vacuums_after): (i64, i64) = sqlx::query_as(
            "SELECT n_dead_tup, vacuum_count + autovacuum_count FROM pg_stat_user_tables
             WHERE relid = 'job_tasks'::regclass",
        )
        .fetch_one(&self.pool)
        .await?;
        let outcome = if vacuums_after > vacuums {
            VacuumOutcome::Vacuumed
        } else {
            // SKIP_LOCKED found another vacuum there first.
            VacuumOutcome::UnderWay
        };
        Ok(TaskVacuum { dead_rows, outcome })
    }
}
