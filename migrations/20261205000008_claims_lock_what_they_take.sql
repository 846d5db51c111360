-- A claim locks only the tasks it takes. For a claimer of several task
-- types it locked up to its limit of each type (FOR UPDATE SKIP LOCKED per
-- type), then kept the first of them by priority and place, the rest still
-- locked until it committed. A claimer of one of those types that woke on
-- the same notification skipped them, found nothing, and slept until its
-- next poll (5 s) with the tasks still pending and no one holding them
-- (queue/tests/contention.rs).
--
-- So a claim of several types first reads, without locking, how many of
-- its limit each type would give (the first `limit` of each type by the
-- claim index, merged in claim order), then locks that many of each, still
-- skipping the tasks others hold. A claim of one type locks its limit of
-- it, as before. A task another claimer holds between the two reads is
-- replaced by the next of its type, so a contended claim can return fewer
-- tasks than its limit while another type has more: the claimer claims
-- again.
--
-- Otherwise as in the claim-plan migration.
CREATE OR REPLACE FUNCTION take_tasks(p_worker_id text, p_task_types text[], p_limit int, p_status text,
                           p_nonce uuid DEFAULT NULL)
RETURNS SETOF job_tasks
LANGUAGE plpgsql AS $$
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
        SELECT c.id, c.priority, c.fair_at
        FROM unnest(p_task_types, v_shares) AS tt(task_type, share)
        CROSS JOIN LATERAL (
            SELECT t.id, t.priority, t.fair_at
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
-- As the previous migration set it (a function replaced keeps its settings
-- only if restated).
ALTER FUNCTION take_tasks(text, text[], int, text, uuid) SET enable_bitmapscan = off;
