-- History rows are not checked again on their way in.
--
-- job_history and task_history were made LIKE jobs and job_tasks INCLUDING
-- CONSTRAINTS (20261205000001), so every row moved to history was checked
-- against the same CHECKs it had passed in the open tables: the type, the
-- status, the counts, the tenant. Each copy is evaluated on every history
-- row written, and each statement that writes history prepares them again
-- for the partition it routes to. In a drain at 50 a call by 4 workers,
-- `perf` put 17 % of the server's CPU in the completion's two history
-- inserts, and 4.5 % in evaluating CHECKs; without these copies, 3.0 %,
-- the open tables' own (docs/bench-queue-log.md, "What history costs the
-- drain, and history rows checked once").
--
-- Every row reaches history from `jobs` or `job_tasks` (completions,
-- retire_jobs), or from history itself (retention keeps a day's late
-- finishers), so the open tables' checks have already held for it. The one
-- check that says something of history, that a job there is finished
-- (`job_history_finished`), stays. Partitions made from here on inherit
-- the parents' checks, so they have none of the others either.

ALTER TABLE job_history
    DROP CONSTRAINT jobs_job_type_check,
    DROP CONSTRAINT jobs_status_check,
    DROP CONSTRAINT jobs_tasks_complete_check,
    DROP CONSTRAINT jobs_tasks_total_check,
    DROP CONSTRAINT jobs_tenant_check;

ALTER TABLE task_history
    DROP CONSTRAINT job_tasks_attempts_check,
    DROP CONSTRAINT job_tasks_claims_check,
    DROP CONSTRAINT job_tasks_max_attempts_check,
    DROP CONSTRAINT job_tasks_status_check,
    DROP CONSTRAINT job_tasks_task_type_check,
    DROP CONSTRAINT job_tasks_timeout_seconds_check,
    DROP CONSTRAINT job_tasks_waiting_on_check;
