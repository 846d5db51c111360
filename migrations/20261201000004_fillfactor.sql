-- Every job row is updated twice (claimed, then finished) and every task row
-- twice soon after it is written. Room on the page lets a job's updates stay
-- heap-only (no index entries) and keeps a task's new versions beside the
-- old one; on the no-op drain (pgbench, median of five runs each) ~7 % less
-- CPU per task and ~9 % more tasks/s. Only pages written from now on are
-- affected.
ALTER TABLE jobs SET (fillfactor = 50);
ALTER TABLE job_tasks SET (fillfactor = 50);
