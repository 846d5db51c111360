-- Layout "bare": not a candidate, a ceiling. One narrow row per job, updated
-- at claim and deleted at completion, with nothing kept afterwards (no job
-- row, no history, no outputs): the shape of a queue that forgets finished
-- work, as graphile-worker does. It tells how much of the gap to
-- graphile-worker is the harness and how much is what backlog keeps.

CREATE TABLE active_tasks (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_type    text        NOT NULL,
    payload      jsonb       NOT NULL,
    priority     integer     NOT NULL DEFAULT 0,
    run_at       timestamptz NOT NULL DEFAULT now(),
    attempts     integer     NOT NULL DEFAULT 0,
    max_attempts integer     NOT NULL DEFAULT 5,
    claimed_by   text,
    claimed_at   timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 50);
CREATE INDEX active_tasks_runnable ON active_tasks (task_type, priority DESC, run_at, id)
    WHERE claimed_by IS NULL;

CREATE FUNCTION enqueue_text_jobs(p_count int) RETURNS void LANGUAGE sql AS $$
    INSERT INTO active_tasks (task_type, payload)
    SELECT 'text_generation', '{"prompt": "a short story"}' FROM generate_series(1, p_count);
$$;

-- With no dependencies to keep, a reading job is three independent rows:
-- the bare layout's reading figures are a ceiling without the ordering.
CREATE FUNCTION enqueue_reading_jobs(p_count int) RETURNS void LANGUAGE sql AS $$
    INSERT INTO active_tasks (task_type, payload)
    SELECT r.task_type, '{"prompt": "a short story"}' FROM generate_series(1, p_count), reading_tasks() r;
$$;

CREATE FUNCTION claim(p_worker text, p_types text[], p_limit int)
RETURNS TABLE (id bigint, attempts int) LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    RETURN QUERY
    UPDATE active_tasks t
    SET claimed_by = p_worker, claimed_at = now(), attempts = t.attempts + 1
    WHERE t.id = ANY (ARRAY(
        SELECT c.id
        FROM unnest(p_types) AS tt(task_type)
        CROSS JOIN LATERAL (
            SELECT t2.id, t2.priority, t2.run_at FROM active_tasks t2
            WHERE t2.task_type = tt.task_type AND t2.claimed_by IS NULL AND t2.run_at <= now()
            ORDER BY t2.priority DESC, t2.run_at, t2.id
            LIMIT p_limit FOR UPDATE SKIP LOCKED
        ) c
        ORDER BY c.priority DESC, c.run_at, c.id
        LIMIT p_limit))
    RETURNING t.id, t.attempts;
END
$$;

CREATE FUNCTION complete(p_worker text, p_ids bigint[], p_attempts int[], p_outputs jsonb[])
RETURNS int LANGUAGE sql AS $$
    WITH done AS (
        DELETE FROM active_tasks t
        USING unnest(p_ids, p_attempts) AS i(id, attempt)
        WHERE t.id = i.id AND t.claimed_by = p_worker AND t.attempts = i.attempt
        RETURNING 1
    )
    SELECT count(*)::int FROM done;
$$;

-- Nothing is kept, so there is no history to fill.
CREATE FUNCTION fill_history(p_rows int) RETURNS void LANGUAGE sql AS $$ SELECT $$;

CREATE FUNCTION proto_drop_oldest_day(OUT tasks bigint, OUT ms double precision) LANGUAGE sql AS $$
    SELECT 0::bigint, NULL::double precision
$$;
CREATE FUNCTION proto_reset(p_keep_history boolean) RETURNS void LANGUAGE sql AS $$ TRUNCATE active_tasks $$;
CREATE FUNCTION proto_open_tasks() RETURNS bigint LANGUAGE sql AS $$ SELECT count(*) FROM active_tasks $$;

CREATE FUNCTION notify_inserted_runnable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('backlog_task_runnable', r.task_type)
    FROM (SELECT DISTINCT task_type FROM inserted WHERE run_at <= now()) r;
    RETURN NULL;
END
$$;
CREATE TRIGGER notify_runnable AFTER INSERT ON active_tasks
    REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT EXECUTE FUNCTION notify_inserted_runnable();
