-- The completion before migration 20261213000001: a
-- finished job of one task as two history rows (a job_history row and its
-- task's row), and task_history_id for repeated completions, which the
-- drain then calls without the tasks' jobs.
\ir ../../../migrations/20261210000001_completions_lock_task_row_jobs_as_they_delete_them.sql
CREATE INDEX task_history_id ON task_history (id);
DO $$ BEGIN
    EXECUTE format('ALTER DATABASE %I SET proto.completion_without_jobs = on', current_database());
END $$;
