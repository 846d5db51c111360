-- Two fixes found by review, each reproduced with psql first.
--
-- complete_tasks, given one task twice under different claims, could
-- finish its job with the task left unfinished: see the comment in it.
--
-- take_tasks writes the time of a claim that took tasks whether or not the
-- claim carries a nonce. Only claims with a nonce wrote it, and the
-- sweeper's registry DELETE, waiting on the row a claim without one held
-- (claim_tasks called with three arguments, as from psql), then removed
-- the row of a claimer holding the tasks it had just taken.
--
-- Otherwise as in the completion-plan and claims-lock-what-they-take
-- migrations.
CREATE OR REPLACE FUNCTION complete_tasks(p_worker_id text, p_task_ids bigint[], p_claims int[], p_outputs jsonb[])
RETURNS TABLE (task_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_moved bigint[];
    v_finishing uuid[];
    v_done bigint[];
    v_partial uuid[];
BEGIN
    PERFORM lock_jobs_of_tasks(p_task_ids);
    -- A task named twice under different claims (a lease the sweeper took
    -- back, then claimed again by the same worker): keep the entry under
    -- the claim the task holds. The job-finishing path below finds a
    -- task's claim and output by its first position, and a stale first
    -- entry there moved a completed task to history unfinished, output
    -- lost, under a job recorded complete. Only a batch that names a task
    -- twice pays for the look.
    IF cardinality(p_task_ids) > (SELECT count(DISTINCT i) FROM unnest(p_task_ids) AS i) THEN
        SELECT array_agg(d.id ORDER BY d.ord), array_agg(d.claim ORDER BY d.ord), array_agg(d.output ORDER BY d.ord)
        INTO p_task_ids, p_claims, p_outputs
        FROM (
            SELECT DISTINCT ON (i.id) i.id, i.claim, i.output, i.ord
            FROM unnest(p_task_ids, p_claims, p_outputs) WITH ORDINALITY AS i(id, claim, output, ord)
            LEFT JOIN job_tasks t ON t.id = i.id
            ORDER BY i.id, (t.claimed_by = p_worker_id AND t.claims = i.claim) DESC NULLS LAST, i.ord
        ) d;
    END IF;

    -- A job this call finishes goes to history at once, final: its row and
    -- its tasks' are written there once, where updating them here and then
    -- moving them wrote each twice (the common case: a text job's one task).
    WITH valid AS (
        -- A task named twice counts once, as the update below would.
        SELECT DISTINCT ON (t.id) t.id, t.job_id, i.output
        FROM unnest(p_task_ids, p_claims, p_outputs) AS i(id, claim, output)
        JOIN job_tasks t ON t.id = i.id
        WHERE t.claimed_by = p_worker_id AND t.claims = i.claim
          AND task_phase(t.status, t.waiting_on) = 'in_flight'
    ), finishing AS (
        SELECT j.id, c.n FROM jobs j
        JOIN (SELECT v.job_id, count(*)::int AS n FROM valid v GROUP BY v.job_id) c ON c.job_id = j.id
        WHERE j.status <> 'cancelled' AND j.tasks_complete + c.n >= j.tasks_total
    ), gone_jobs AS (
        -- Each step joins a set of rows to a table by its index, never two
        -- such sets to each other: the planner takes those for a row each
        -- and nests the loops, quadratic in the batch (22 ms a join at 500).
        DELETE FROM jobs j USING finishing f WHERE j.id = f.id
        RETURNING j.*, f.n
    ), kept_jobs AS (
        INSERT INTO job_history (id, tenant, job_type, status, input, priority, idempotency_key, error,
                                 created_at, updated_at, started_at, finished_at, tasks_total, tasks_complete)
        SELECT g.id, g.tenant, g.job_type, 'complete', g.input, g.priority, g.idempotency_key, NULL,
               g.created_at, now(), coalesce(g.started_at, now()), coalesce(g.finished_at, now()),
               g.tasks_total, g.tasks_complete + g.n
        FROM gone_jobs g
    ), gone_tasks AS (
        -- `held`: completed by this call, as `valid` found it (one of this
        -- worker's, under the claim given); its output is found by position.
        DELETE FROM job_tasks t USING finishing f WHERE t.job_id = f.id
        RETURNING t.*,
                  coalesce(t.claimed_by = p_worker_id AND t.status IN ('claimed', 'processing')
                           AND t.claims = p_claims[array_position(p_task_ids, t.id)], false) AS held,
                  p_outputs[array_position(p_task_ids, t.id)] AS new_output
    ), kept_tasks AS (
        INSERT INTO task_history (id, job_id, task_type, status, dependencies, waiting_on, priority, attempts,
                                  max_attempts, run_at, timeout_seconds, claimed_by, claimed_at, heartbeat_at,
                                  last_error, output, created_at, updated_at, finished_at, has_dependents,
                                  claims, fair_at)
        SELECT g.id, g.job_id, g.task_type, CASE WHEN g.held THEN 'complete' ELSE g.status END,
               g.dependencies, g.waiting_on, g.priority, g.attempts, g.max_attempts, g.run_at,
               g.timeout_seconds, g.claimed_by, g.claimed_at,
               CASE WHEN g.held THEN now() ELSE g.heartbeat_at END,
               g.last_error,
               CASE WHEN g.held THEN g.new_output ELSE g.output END,
               g.created_at,
               CASE WHEN g.held THEN now() ELSE g.updated_at END,
               CASE WHEN g.held THEN now() ELSE g.finished_at END,
               g.has_dependents, g.claims, g.fair_at
        FROM gone_tasks g
    )
    SELECT (SELECT array_agg(g.id) FROM gone_tasks g WHERE g.held),
           (SELECT array_agg(g.id) FROM gone_jobs g)
    INTO v_moved, v_finishing;
    -- No row was updated, so the status trigger did not fire: notify as it would.
    IF v_finishing IS NOT NULL THEN
        PERFORM pg_notify('backlog_job_status', f.id::text)
        FROM unnest(v_finishing) AS f(id)
        WHERE EXISTS (SELECT 1 FROM job_watches w WHERE w.job_id = f.id);
    END IF;

    WITH done AS (
        UPDATE job_tasks t
        SET status = 'complete',
            output = i.output,
            finished_at = now(),
            updated_at = now(),
            heartbeat_at = now()
        FROM unnest(p_task_ids, p_claims, p_outputs) AS i(id, claim, output)
        WHERE t.id = i.id
          AND t.claimed_by = p_worker_id
          AND t.claims = i.claim
          AND task_phase(t.status, t.waiting_on) = 'in_flight'
        RETURNING t.id, t.job_id, t.task_type, t.has_dependents
    ), unblocked AS (
        UPDATE job_tasks d
        SET waiting_on = d.waiting_on - n.done_count,
            run_at = greatest(d.run_at, now()),
            updated_at = now()
        FROM (
            SELECT d2.id, count(*)::int AS done_count
            FROM done
            JOIN job_tasks d2 ON d2.job_id = done.job_id AND done.task_type = ANY (d2.dependencies)
            WHERE done.has_dependents AND d2.status = 'pending'
            GROUP BY d2.id
        ) n
        WHERE d.id = n.id
    ), progressed AS (
        -- Jobs this call finishes left above, counted by the same rule under
        -- the same locks: these stay open.
        UPDATE jobs j
        SET tasks_complete = j.tasks_complete + d.n,
            started_at = coalesce(j.started_at, now()),
            updated_at = now()
        FROM (SELECT done.job_id, count(*)::int AS n FROM done GROUP BY done.job_id) d
        WHERE j.id = d.job_id AND j.status <> 'cancelled'
        RETURNING j.id
    )
    SELECT (SELECT array_agg(done.id) FROM done), array_agg(p.id)
    INTO v_done, v_partial
    FROM progressed p;

    -- Tasks still open: the job may be processing, or failed when the rest
    -- already finished badly. That takes the full derivation (which moves
    -- a job it finishes to history).
    IF v_partial IS NOT NULL THEN
        PERFORM refresh_job_status(v_partial);
    END IF;
    v_done := coalesce(v_done, '{}'::bigint[]) || coalesce(v_moved, '{}'::bigint[]);
    RETURN QUERY SELECT unnest(v_done);
    -- A completion repeated after its answer was lost: the task this worker
    -- completed under that claim is reported again, wherever it now is.
    IF cardinality(v_done) < cardinality(p_task_ids) THEN
        RETURN QUERY
            SELECT h.id
            FROM unnest(p_task_ids, p_claims) AS i(id, claim)
            JOIN all_tasks h ON h.id = i.id
            WHERE NOT (i.id = ANY (v_done))
              AND h.status = 'complete' AND h.claimed_by = p_worker_id AND h.claims = i.claim;
    END IF;
END
$$;

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
    -- With or without a nonce: the time keeps the claimer's registry row
    -- from a sweep waiting on it (queue/tests/races.rs), and a claim
    -- without a nonce leaves no earlier one to repeat.
    IF v_claimed > 0 THEN
        UPDATE workers SET last_claim_nonce = p_nonce, last_claim_at = now() WHERE id = p_worker_id;
    END IF;
END
$$;
-- As the previous migration set it (a function replaced keeps its settings
-- only if restated).
ALTER FUNCTION take_tasks(text, text[], int, text, uuid) SET enable_bitmapscan = off;
