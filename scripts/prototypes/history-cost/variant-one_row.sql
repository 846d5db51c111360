-- A finished job of one task as one history row: its task's, with the
-- job's columns, and a tenant index over such rows as job_tasks has.
\set variant one_row
\ir rewrite-completion.sql
CREATE INDEX task_history_job_tenant ON task_history (job_tenant, job_id) WHERE job_input IS NOT NULL;
