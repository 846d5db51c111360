-- A claim reads only the tasks it takes whatever the statistics say the
-- table holds. A queue drains empty and fills again: autovacuum analyzes
-- `job_tasks` while nothing in it is live, its pages still there, and for
-- the planner the next burst is next to no rows until the next analyze (a
-- minute or more). Planning the claim's update for one row, it took the
-- claimed tasks by walking the whole table in primary-key order and
-- testing each row against the candidates (a nested loop with the table
-- outside) once a worker's connection cached the plan (a function's
-- statements run a generic plan from the sixth call): 5,000 rows read for
-- a claim of 32 in a 5,000-task backlog, 20 ms (queue/tests/depth.rs).
--
-- So the update, and the jobs it starts, name their rows by an array of
-- ids, which is read through the primary key one id at a time whatever the
-- estimate, as complete_tasks already does for the same reason; the
-- claim returns them sorted into the order taken, which the join with the
-- candidates used to keep.
--
-- Otherwise as in the claims migration.
CREATE OR REPLACE FUNCTION take_tasks(p_worker_id text, p_task_types text[], p_limit int, p_status text,
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
        WHERE t.id = ANY (ARRAY(SELECT c.id FROM candidates c))
        RETURNING t.*
    ), started AS (
        -- A job someone else holds is left as it is rather than waited for
        -- (the lock order); its status catches up when the task finishes.
        UPDATE jobs j
        SET status = 'processing', started_at = coalesce(j.started_at, now()), updated_at = now()
        WHERE j.id IN (SELECT q.id FROM jobs q
                       WHERE q.id = ANY (ARRAY(SELECT job_id FROM claimed)) AND q.status = 'queued'
                       ORDER BY q.id
                       FOR NO KEY UPDATE SKIP LOCKED)
    )
    -- In the order taken: the update returns its rows in the order of
    -- the table.
    SELECT * FROM claimed c ORDER BY c.priority DESC, c.fair_at, c.id;
    GET DIAGNOSTICS v_claimed = ROW_COUNT;
    IF p_nonce IS NOT NULL AND v_claimed > 0 THEN
        UPDATE workers SET last_claim_nonce = p_nonce, last_claim_at = now() WHERE id = p_worker_id;
    END IF;
END
$$;
