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

CREATE FUNCTION enqueue_reading_jobs(p_count int) RETURNS void LANGUAGE sql AS $$
    WITH j AS (
        INSERT INTO jobs (id, tenant, job_type, input, tasks_total)
        SELECT proto_uuid(), 'tenant-' || (g % 10), 'reading', '{"prompt": "a short story"}', 3
        FROM generate_series(1, p_count) g
        RETURNING id
    )
    INSERT INTO job_tasks (job_id, task_type, dependencies, waiting_on, has_dependents)
    SELECT j.id, r.task_type, r.dependencies, cardinality(r.dependencies), r.has_dependents
    FROM j CROSS JOIN reading_tasks() r;
$$;

CREATE FUNCTION claim(p_worker text, p_types text[], p_limit int)
RETURNS TABLE (id bigint, attempts int) LANGUAGE sql AS $$
    SELECT t.id, t.claims FROM claim_tasks(p_worker, p_types, p_limit) t;
$$;

CREATE FUNCTION complete(p_worker text, p_ids bigint[], p_attempts int[], p_outputs jsonb[])
RETURNS int LANGUAGE sql AS $$
    SELECT count(*)::int FROM complete_tasks(p_worker, p_ids, p_attempts, p_outputs);
$$;

-- As history.sql's: spread over the 20 days before today, job ids from
-- their own day as production's UUIDv7 ids are.
CREATE FUNCTION fill_history(p_rows int) RETURNS void LANGUAGE sql AS $$
    WITH j AS (
        INSERT INTO jobs (id, tenant, job_type, status, input, tasks_total, tasks_complete,
                          created_at, started_at, finished_at)
        SELECT proto_uuid_at(d.at), 'tenant-' || (g % 10), 'text', 'complete', '{"prompt": "a short story"}', 1, 1,
               d.at, d.at, d.at
        FROM generate_series(1, p_rows) g
        CROSS JOIN LATERAL (SELECT current_date - (1 + g % 20) + interval '12 hours' AS at) d
        RETURNING id, finished_at
    )
    INSERT INTO job_tasks (job_id, task_type, status, attempts, claims, output, finished_at)
    SELECT id, 'text_generation', 'complete', 1, 1, '{"text": "done"}', finished_at FROM j;
$$;

-- Empty the queue between rounds; with p_keep_history, only what the last
-- round added (fill_history's rows are from earlier days).
CREATE FUNCTION proto_reset(p_keep_history boolean) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF p_keep_history THEN
        DELETE FROM job_tasks WHERE finished_at IS NULL OR finished_at >= current_date;
        DELETE FROM jobs WHERE finished_at IS NULL OR finished_at >= current_date;
    ELSE
        TRUNCATE jobs, job_tasks, workers CASCADE;
    END IF;
END
$$;

-- Retention of the oldest day as today's prune does it (one statement
-- instead of its batches): delete the day's jobs, found by their ids'
-- time prefix, and their tasks. Returns the tasks it removed and the
-- milliseconds it took.
CREATE FUNCTION proto_drop_oldest_day(OUT tasks bigint, OUT ms double precision) LANGUAGE plpgsql AS $$
DECLARE
    v_day date := current_date - 20;
    v_started timestamptz := clock_timestamp();
BEGIN
    WITH gone AS (
        DELETE FROM jobs
        WHERE id >= uuid_v7_floor(v_day) AND id < uuid_v7_floor(v_day + 1)
          AND status IN ('complete', 'failed', 'cancelled')
        RETURNING id
    ), gone_tasks AS (
        DELETE FROM job_tasks WHERE job_id IN (SELECT id FROM gone) RETURNING 1
    )
    SELECT count(*) INTO tasks FROM gone_tasks;
    ms := extract(epoch FROM clock_timestamp() - v_started) * 1000;
END
$$;
CREATE FUNCTION proto_open_tasks() RETURNS bigint LANGUAGE sql AS $$
    SELECT count(*) FROM job_tasks WHERE status <> 'complete'
$$;
