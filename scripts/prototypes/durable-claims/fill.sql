-- Refill between rounds: 60,000 single-task text jobs, all runnable.
SET client_min_messages = warning;
TRUNCATE jobs CASCADE;
INSERT INTO jobs (id, tenant, job_type, input, tasks_total)
SELECT gen_random_uuid(), 'acme', 'text', '{"prompt":"p"}', 1 FROM generate_series(1, 60000);
INSERT INTO job_tasks (job_id, task_type) SELECT id, 'text_generation' FROM jobs;
VACUUM ANALYZE jobs; VACUUM ANALYZE job_tasks;
