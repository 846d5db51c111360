-- A claim updates the rows it locked where they are, not by their keys.
--
-- take_tasks locks its tasks in the claim index (FOR UPDATE SKIP LOCKED),
-- then updated them found again by id in job_tasks' key, and locked the
-- queued jobs of those tasks by id in jobs' key and updated them found by
-- id once more: two key lookups per task that only found rows this
-- statement already held. The locks now hand on each row's ctid and the
-- updates read those (a TID scan). A locked row cannot move until this
-- transaction ends, and the lock returns the row's latest version (a row
-- updated after the statement's snapshot is locked and rechecked at its
-- newest ctid), so the ctid is the row the update must change. A claim
-- of 50 one-task jobs read 669 buffers instead of 727 (auto_explain).
-- pgbench, claims of 50 then completions on one connection, after a
-- warm-up, six rounds alternating: the claim 2.90 / 2.57 / 3.01 ms against
-- 3.06 / 3.36 / 2.84 ms before; the rounds overlap, the medians are 5 %
-- apart.
-- queue/tests/lifecycle.rs counts the key lookups.
--
-- The body is otherwise the one before (20261205000009), with its
-- settings (20261205000006, 20261205000011, 20261206000001).

CREATE OR REPLACE FUNCTION take_tasks(p_worker_id text, p_task_types text[], p_limit int, p_status text,
                                      p_nonce uuid DEFAULT NULL)
 RETURNS SETOF job_tasks
 LANGUAGE plpgsql
 SET enable_bitmapscan TO 'off'
 SET enable_seqscan TO 'off'
 SET plan_cache_mode TO 'force_generic_plan'
AS $$
DECLARE
    v_state text;
    v_nonce uuid;
    v_claimed_at timestamptz;
    v_claimed int;
    -- How many tasks of each of p_task_types to lock, in its order.
    v_shares int[];
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
    -- A type named twice would be given its share twice.
    p_task_types := ARRAY(SELECT DISTINCT unnest(p_task_types));

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

    IF cardinality(p_task_types) > 1 THEN
        SELECT array_agg(coalesce(s.n, 0) ORDER BY tt.ord) INTO v_shares
        FROM unnest(p_task_types) WITH ORDINALITY AS tt(task_type, ord)
        LEFT JOIN (
            SELECT f.task_type, count(*)::int AS n
            FROM (
                SELECT c.task_type
                FROM unnest(p_task_types) AS tt(task_type)
                CROSS JOIN LATERAL (
                    SELECT t.task_type, t.priority, t.fair_at, t.id
                    FROM job_tasks t
                    WHERE t.task_type = tt.task_type
                      AND task_phase(t.status, t.waiting_on) = 'runnable'
                      AND t.run_at <= now()
                    ORDER BY t.priority DESC, t.fair_at, t.id
                    LIMIT p_limit
                ) c
                ORDER BY c.priority DESC, c.fair_at, c.id
                LIMIT p_limit
            ) f
            GROUP BY f.task_type
        ) s ON s.task_type = tt.task_type;
    ELSE
        v_shares := ARRAY[p_limit];
    END IF;

    RETURN QUERY
    WITH candidates AS (
        SELECT c.id, c.priority, c.fair_at, c.ctid
        FROM unnest(p_task_types, v_shares) AS tt(task_type, share)
        CROSS JOIN LATERAL (
            SELECT t.id, t.priority, t.fair_at, t.ctid
            FROM job_tasks t
            WHERE t.task_type = tt.task_type
              AND task_phase(t.status, t.waiting_on) = 'runnable'
              AND t.run_at <= now()
            ORDER BY t.priority DESC, t.fair_at, t.id
            LIMIT tt.share
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
        WHERE t.ctid = ANY (ARRAY(SELECT c.ctid FROM candidates c))
        RETURNING t.*
    ), started AS (
        -- A job someone else holds is left as it is rather than waited for
        -- (the lock order); its status catches up when the task finishes.
        UPDATE jobs j
        SET status = 'processing', started_at = coalesce(j.started_at, now()), updated_at = now()
        WHERE j.ctid = ANY (ARRAY(SELECT q.ctid FROM jobs q
                                  WHERE q.id = ANY (ARRAY(SELECT job_id FROM claimed)) AND q.status = 'queued'
                                  ORDER BY q.id
                                  FOR NO KEY UPDATE SKIP LOCKED))
    )
    -- In the order taken: the update returns its rows in the order of
    -- the table.
    SELECT * FROM claimed c ORDER BY c.priority DESC, c.fair_at, c.id;
    GET DIAGNOSTICS v_claimed = ROW_COUNT;
    -- With or without a nonce: the time keeps the claimer's registry row
    -- from a sweep waiting on it (queue/tests/races.rs), and a claim
    -- without a nonce leaves no earlier one to repeat.
    IF v_claimed > 0 THEN
        UPDATE workers SET last_claim_nonce = p_nonce, last_claim_at = now() WHERE id = p_worker_id;
    END IF;
END
$$;

