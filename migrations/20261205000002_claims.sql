-- Claims, in two parts: they read the claim index whatever the planner's
-- statistics say, and a claim repeated after a lost answer gets the tasks
-- of the call that was not heard, instead of more.
--
-- Queries for runnable tasks (the claim, and place_in_line's head of the
-- line and fair-restart probe) read the claim index whatever the planner's
-- statistics say. Until `job_tasks` is first analyzed with rows in it (a
-- new database's first burst, the minute before autovacuum gets there),
-- every filter gets PostgreSQL's default selectivity and every plan looks
-- like one row. The active-task index, keyed by task_type, status and
-- waiting_on, then looked cheaper than the claim index, whose predicate
-- already implies the last two: a claim of 50 read and sorted all 53,000
-- pending tasks, and each enqueue read them again in place_in_line.
--
-- So runnable is now a phase the claim index's predicate names, and the
-- queries for runnable tasks name it too. The phase is a CASE, which the
-- planner does not see through: the active-task index's predicate (a list
-- of statuses) cannot be proven from it, so for those queries that index
-- is not a candidate at all, with or without statistics. (A boolean SQL
-- function would be inlined back into the two conditions.) The depth query
-- and the sweeper still read the active-task index by status.
CREATE FUNCTION task_phase(p_status text, p_waiting_on int)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN p_status = 'pending' AND p_waiting_on = 0 THEN 'runnable'
        WHEN p_status = 'pending' THEN 'blocked'
        WHEN p_status IN ('claimed', 'processing') THEN 'in_flight'
    END;
$$;

DROP INDEX job_tasks_runnable;
CREATE INDEX job_tasks_runnable ON job_tasks (task_type, priority DESC, fair_at, id)
    WHERE task_phase(status, waiting_on) = 'runnable';

-- A claim repeated with the nonce of a call that committed (its answer
-- was lost: the connection cut at the commit) returns that call's tasks,
-- still held, instead of claiming more: before, the first batch stayed
-- with a worker that never heard of it until the sweeper took it back (a
-- lease's expiry and an attempt later). A claim that took tasks records
-- its nonce and time on the claimer's registry row, which it already
-- locks; its tasks are those of the claimer claimed at that time (one
-- transaction's now()). The repeat reads them without an index on
-- claimed_by: it is rare, and a claim stays one write lighter.
ALTER TABLE workers ADD COLUMN last_claim_nonce uuid, ADD COLUMN last_claim_at timestamptz;

-- As in the durable-claims migration, naming the phase, with the nonce.
-- The wrappers take it too; a caller that gives none claims as before.
DROP FUNCTION claim_tasks(text, text[], int);
DROP FUNCTION claim_and_start_tasks(text, text[], int);
DROP FUNCTION take_tasks(text, text[], int, text);
CREATE FUNCTION take_tasks(p_worker_id text, p_task_types text[], p_limit int, p_status text,
                           p_nonce uuid DEFAULT NULL)
RETURNS SETOF job_tasks
LANGUAGE plpgsql AS $$
DECLARE
    v_state text;
    v_nonce uuid;
    v_claimed_at timestamptz;
    v_claimed int;
BEGIN
    IF p_worker_id IS NULL OR p_worker_id = '' THEN
        RAISE EXCEPTION 'claim_tasks: p_worker_id must not be empty' USING ERRCODE = '22023';
    END IF;
    IF p_task_types IS NULL OR cardinality(p_task_types) = 0 THEN
        RAISE EXCEPTION 'claim_tasks: p_task_types must name at least one task type' USING ERRCODE = '22023';
    END IF;
    IF p_limit IS NULL OR p_limit < 1 THEN
        RAISE EXCEPTION 'claim_tasks: p_limit must be at least 1, got %', p_limit USING ERRCODE = '22023';
    END IF;
    IF p_status IS NULL OR p_status NOT IN ('claimed', 'processing') THEN
        RAISE EXCEPTION 'take_tasks: p_status must be claimed or processing, got %', p_status USING ERRCODE = '22023';
    END IF;

    -- The lock on the claimer's registry row orders this claim against the
    -- drain step (which takes it FOR UPDATE); an unknown claimer is
    -- registered first (see the reliability migration). It was FOR SHARE;
    -- a claim now writes the row, so two claims of one claimer take turns
    -- here rather than deadlock on that write.
    SELECT w.state, w.last_claim_nonce, w.last_claim_at INTO v_state, v_nonce, v_claimed_at
    FROM workers w WHERE w.id = p_worker_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        INSERT INTO workers (id, task_types, concurrency)
        VALUES (p_worker_id, p_task_types, p_limit)
        ON CONFLICT (id) DO NOTHING;
        SELECT w.state, w.last_claim_nonce, w.last_claim_at INTO v_state, v_nonce, v_claimed_at
        FROM workers w WHERE w.id = p_worker_id FOR NO KEY UPDATE;
    END IF;
    -- A repeat: the tasks are this claimer's whatever its state is now.
    IF p_nonce IS NOT NULL AND p_nonce = v_nonce THEN
        RETURN QUERY
        SELECT t.* FROM job_tasks t
        WHERE t.claimed_by = p_worker_id AND t.claimed_at = v_claimed_at
          AND t.status IN ('claimed', 'processing')
        ORDER BY t.priority DESC, t.fair_at, t.id;
        RETURN;
    END IF;
    IF v_state IS DISTINCT FROM 'running' THEN
        RETURN;
    END IF;

    RETURN QUERY
    WITH candidates AS (
        SELECT c.id, c.priority, c.fair_at
        FROM unnest(p_task_types) AS tt(task_type)
        CROSS JOIN LATERAL (
            SELECT t.id, t.priority, t.fair_at
            FROM job_tasks t
            WHERE t.task_type = tt.task_type
              AND task_phase(t.status, t.waiting_on) = 'runnable'
              AND t.run_at <= now()
            ORDER BY t.priority DESC, t.fair_at, t.id
            LIMIT p_limit
            FOR UPDATE SKIP LOCKED
        ) c
        ORDER BY c.priority DESC, c.fair_at, c.id
        LIMIT p_limit
    ), claimed AS (
        UPDATE job_tasks t
        SET status = p_status,
            claimed_by = p_worker_id,
            claimed_at = now(),
            heartbeat_at = now(),
            attempts = t.attempts + 1,
            claims = t.claims + 1,
            updated_at = now()
        FROM candidates c
        WHERE t.id = c.id
        RETURNING t.*
    ), started AS (
        -- A job someone else holds is left as it is rather than waited for
        -- (the lock order); its status catches up when the task finishes.
        UPDATE jobs j
        SET status = 'processing', started_at = coalesce(j.started_at, now()), updated_at = now()
        WHERE j.id IN (SELECT q.id FROM jobs q
                       WHERE q.id IN (SELECT job_id FROM claimed) AND q.status = 'queued'
                       ORDER BY q.id
                       FOR NO KEY UPDATE SKIP LOCKED)
    )
    SELECT * FROM claimed;
    GET DIAGNOSTICS v_claimed = ROW_COUNT;
    IF p_nonce IS NOT NULL AND v_claimed > 0 THEN
        UPDATE workers SET last_claim_nonce = p_nonce, last_claim_at = now() WHERE id = p_worker_id;
    END IF;
END
$$;

CREATE FUNCTION claim_tasks(p_worker_id text, p_task_types text[], p_limit int, p_nonce uuid DEFAULT NULL)
RETURNS SETOF job_tasks
LANGUAGE sql AS $$
    SELECT * FROM take_tasks(p_worker_id, p_task_types, p_limit, 'claimed', p_nonce);
$$;

CREATE FUNCTION claim_and_start_tasks(p_worker_id text, p_task_types text[], p_limit int,
                                      p_nonce uuid DEFAULT NULL)
RETURNS SETOF job_tasks
LANGUAGE sql AS $$
    SELECT * FROM take_tasks(p_worker_id, p_task_types, p_limit, 'processing', p_nonce);
$$;

-- As in the fair-restart migration, naming the phase, and with the probe a
-- scalar subquery under LIMIT 1: as an EXISTS, PostgreSQL may plan it as a
-- hashed subplan, which reads every pending task of the line into a hash
-- table to answer for one place.
CREATE OR REPLACE FUNCTION place_in_line(p_tenants text[], p_task_types text[], p_priorities int[],
                                         p_interval_seconds float8)
RETURNS TABLE (job_ord bigint, place timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_step interval := make_interval(secs => p_interval_seconds);
    v_line record;
    v_start timestamptz;
    v_keys text[] := '{}';
    v_starts timestamptz[] := '{}';
BEGIN
    -- Losing a clock's advance in a crash only forgets a little history.
    PERFORM set_config('synchronous_commit', 'off', true);
    FOR v_line IN
        SELECT i.tenant, i.task_type, i.priority, count(*)::int AS n,
               (SELECT t.fair_at FROM job_tasks t
                WHERE t.task_type = i.task_type AND t.priority = i.priority
                  AND task_phase(t.status, t.waiting_on) = 'runnable'
                ORDER BY t.fair_at LIMIT 1) AS head
        FROM unnest(p_tenants, p_task_types, p_priorities) AS i(tenant, task_type, priority)
        GROUP BY i.tenant, i.task_type, i.priority
        ORDER BY i.tenant, i.task_type, i.priority
    LOOP
        INSERT INTO tenant_clocks AS c (tenant, task_type, priority, fair_at)
        VALUES (v_line.tenant, v_line.task_type, v_line.priority,
                coalesce(v_line.head, now()) + v_line.n * v_step)
        ON CONFLICT (tenant, task_type, priority) DO UPDATE
        SET fair_at = CASE
                WHEN v_line.head IS NULL THEN now()
                WHEN c.fair_at > v_line.head AND (
                    SELECT 1 FROM job_tasks t
                    WHERE t.task_type = v_line.task_type AND t.priority = v_line.priority
                      AND task_phase(t.status, t.waiting_on) = 'runnable'
                      AND t.fair_at = c.fair_at - v_step
                    LIMIT 1) IS NULL THEN v_line.head
                ELSE greatest(c.fair_at, v_line.head)
            END + v_line.n * v_step
        RETURNING c.fair_at - v_line.n * v_step INTO v_start;
        v_keys := v_keys || (v_line.tenant || E'\x1f' || v_line.task_type || E'\x1f' || v_line.priority);
        v_starts := v_starts || v_start;
    END LOOP;

    RETURN QUERY
    SELECT j.ord,
           s.start + (row_number() OVER (PARTITION BY j.key ORDER BY j.ord) - 1) * v_step
    FROM (SELECT i.ord, i.tenant || E'\x1f' || i.task_type || E'\x1f' || i.priority AS key
          FROM unnest(p_tenants, p_task_types, p_priorities) WITH ORDINALITY AS i(tenant, task_type, priority, ord)) j
    JOIN unnest(v_keys, v_starts) AS s(key, start) ON s.key = j.key
    ORDER BY j.ord;
END
$$;
