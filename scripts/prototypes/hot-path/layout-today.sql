-- Layout "today": the repository's migrations (applied before this file),
-- behind the same four functions the other layouts define, so one pgbench
-- script drives all three. Enqueue skips place_in_line (fair_at = now()),
-- which favours this layout slightly.

CREATE FUNCTION enqueue_text_jobs(p_count int) RETURNS void LANGUAGE sql AS $$
    WITH j AS (
        INSERT INTO jobs (id, tenant, job_type, input, tasks_total)
        SELECT proto_uuid(), 'tenant-' || (g % 10), 'text', '{"prompt": "a short story"}', 1
        FROM generate_series(1, p_count) g
        RETURNING id
    )
    INSERT INTO job_tasks (job_id, task_type) SELECT id, 'text_generation' FROM j;
$$;

CREATE FUNCTION claim(p_worker text, p_types text[], p_limit int)
RETURNS TABLE (id bigint, attempts int) LANGUAGE sql AS $$
    SELECT t.id, t.claims FROM claim_tasks(p_worker, p_types, p_limit) t;
$$;

CREATE FUNCTION complete(p_worker text, p_ids bigint[], p_attempts int[], p_outputs jsonb[])
RETURNS int LANGUAGE sql AS $$
    SELECT count(*)::int FROM complete_tasks(p_worker, p_ids, p_attempts, p_outputs);
$$;

CREATE FUNCTION fill_history(p_rows int) RETURNS void LANGUAGE sql AS $$
    WITH j AS (
        INSERT INTO jobs (id, tenant, job_type, status, input, tasks_total, tasks_complete,
                          created_at, started_at, finished_at)
        SELECT proto_uuid(), 'tenant-' || (g % 10), 'text', 'complete', '{"prompt": "a short story"}', 1, 1,
               now() - interval '2 days', now() - interval '2 days', now() - (g % 20) * interval '1 day' - interval '1 hour'
        FROM generate_series(1, p_rows) g
        RETURNING id, finished_at
    )
    INSERT INTO job_tasks (job_id, task_type, status, attempts, claims, output, finished_at)
    SELECT id, 'text_generation', 'complete', 1, 1, '{"text": "done"}', finished_at FROM j;
$$;
