-- A claim leaves the job row alone.
--
-- take_tasks wrote two rows a task: the task's, and its job's, set
-- `processing` with its `started_at` (skipped when another transaction held
-- the job: its status then caught up at the task's end). For a job of one
-- task that second write is a sixth of its drain: the prototype harness's
-- `lazystart` layout (README, "What the job row costs a claim") drained
-- text jobs at x1.17-1.18 of the same claim writing the job row.
--
-- Now a job's row says `queued` until something else writes it (a
-- completion, a failure, a sweep, a release, a cancellation). While it does,
-- the job is processing if one of its tasks is claimed or processing, and
-- it started when the first of its tasks was first claimed:
--
-- * job_tasks.first_claimed_at: the time of the task's first claim, kept
--   through retries (claimed_at is cleared when an attempt ends). Tasks in
--   flight now take it from their claim. task_history has the column too,
--   and all_tasks shows it: rows move between the two tables by position.
-- * open_jobs: `jobs` as readers see it, status and started_at derived as
--   above; all_jobs is open_jobs and job_history.
-- * refresh_job_status and complete_tasks write a job's started_at from its
--   tasks' first claims, not the time they run.
-- * heartbeat_tasks no longer catches a job's row up to `processing` (it did
--   for a claim that had found the row locked): it renews the lease only.
-- * take_tasks notifies the watchers of the jobs it claims tasks of (the
--   job row's trigger did). queue::events share-locks a job's open tasks
--   with its row when it registers a watch, so a claim either finishes
--   before the watch reads the job or skips those tasks until it is in.
--
-- The bodies are otherwise the ones before, with their settings
-- (take_tasks: 20261205000008, 20261206000001; complete_tasks:
-- 20261207000003; refresh_job_status: 20261205000001; heartbeat_tasks:
-- 20261205000010).

ALTER TABLE job_tasks ADD COLUMN first_claimed_at timestamptz;
ALTER TABLE task_history ADD COLUMN first_claimed_at timestamptz;
UPDATE job_tasks SET first_claimed_at = claimed_at WHERE status IN ('claimed', 'processing');

CREATE OR REPLACE VIEW all_tasks AS
    SELECT * FROM job_tasks UNION ALL SELECT * FROM task_history;

-- The columns of `jobs`, in its order. Only a job whose row says queued
-- looks at its tasks: any other status was written after its tasks'
-- claims. Subqueries in the columns rather than a join, so the view stays
-- a scan of `jobs` that all_jobs can read in key order (a tenant's newest
-- jobs first, stopping at the page): each is computed for a row returned.
CREATE VIEW open_jobs AS
    SELECT j.id, j.tenant, j.job_type,
           CASE WHEN j.status = 'queued'
                     AND EXISTS (SELECT 1 FROM job_tasks t
                                 WHERE t.job_id = j.id AND t.status IN ('claimed', 'processing'))
                THEN 'processing' ELSE j.status END AS status,
           j.input, j.priority, j.idempotency_key, j.error, j.created_at,
           CASE WHEN j.status = 'queued'
                THEN greatest(j.updated_at,
                              (SELECT max(t.claimed_at) FROM job_tasks t
                               WHERE t.job_id = j.id AND t.status IN ('claimed', 'processing')))
                ELSE j.updated_at END AS updated_at,
           CASE WHEN j.status = 'queued' AND j.started_at IS NULL
                THEN (SELECT min(t.first_claimed_at) FROM job_tasks t
                      WHERE t.job_id = j.id AND t.status IN ('claimed', 'processing'))
                ELSE j.started_at END AS started_at,
           j.finished_at, j.tasks_total, j.tasks_complete
    FROM jobs j;

CREATE OR REPLACE VIEW all_jobs AS
    SELECT * FROM open_jobs UNION ALL SELECT * FROM job_history;

CREATE OR REPLACE FUNCTION take_tasks(p_worker_id text, p_task_types text[], p_limit integer, p_status text, p_nonce uuid DEFAULT NULL::uuid)
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
            first_claimed_at = coalesce(t.first_claimed_at, now()),
            updated_at = now()
        WHERE t.id = ANY (ARRAY(SELECT c.id FROM candidates c))
        RETURNING t.*
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
        -- The jobs whose tasks were taken are processing now, though their
        -- rows were not written: watchers are told here. A statement of its
        -- own, after the tasks are locked: a watch committed before that is
        -- seen, and one registered later waited for these locks (or was
        -- skipped) and read the job after this claim.
        IF EXISTS (SELECT 1 FROM job_watches) THEN
            PERFORM pg_notify('backlog_job_status', w.job_id::text)
            FROM (SELECT DISTINCT w.job_id
                  FROM job_watches w
                  JOIN job_tasks t ON t.job_id = w.job_id
                  WHERE t.claimed_by = p_worker_id AND t.claimed_at = now() AND t.status = p_status) w;
        END IF;
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION complete_tasks(p_worker_id text, p_task_ids bigint[], p_claims integer[], p_outputs jsonb[])
 RETURNS TABLE(task_id bigint)
 LANGUAGE plpgsql
 SET enable_seqscan TO 'off'
 SET plan_cache_mode TO 'force_generic_plan'
AS $$
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
        -- Each task looked up by its key from the ids given (LIMIT keeps
        -- the lookup a subquery of its own), whatever the statistics say.
        SELECT DISTINCT ON (t.id) t.id, t.job_id, t.first_claimed_at, i.output
        FROM unnest(p_task_ids, p_claims, p_outputs) AS i(id, claim, output)
        CROSS JOIN LATERAL (
            SELECT t.id, t.job_id, t.first_claimed_at FROM job_tasks t
            WHERE t.id = i.id AND t.claimed_by = p_worker_id AND t.claims = i.claim
              AND task_phase(t.status, t.waiting_on) = 'in_flight'
            LIMIT 1
        ) t
    ), finishing AS (
        -- `started`: a claim leaves the job row alone, so a job finished by
        -- the tasks it first claimed started when the first of them did.
        SELECT j.id, j.ctid, c.n, c.started FROM jobs j
        JOIN (SELECT v.job_id, count(*)::int AS n, min(v.first_claimed_at) AS started
              FROM valid v GROUP BY v.job_id) c ON c.job_id = j.id
        WHERE j.status <> 'cancelled' AND j.tasks_complete + c.n >= j.tasks_total
    ), gone_jobs AS (
        -- Each step joins a set of rows to a table by its index, never two
        -- such sets to each other: the planner takes those for a row each
        -- and nests the loops, quadratic in the batch (22 ms a join at 500).
        DELETE FROM jobs j USING finishing f WHERE j.ctid = f.ctid
        RETURNING j.*, f.n, f.started
    ), kept_jobs AS (
        INSERT INTO job_history (id, tenant, job_type, status, input, priority, idempotency_key, error,
                                 created_at, updated_at, started_at, finished_at, tasks_total, tasks_complete)
        SELECT g.id, g.tenant, g.job_type, 'complete', g.input, g.priority, g.idempotency_key, NULL,
               g.created_at, now(), coalesce(g.started_at, g.started, now()), coalesce(g.finished_at, now()),
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
                                  claims, fair_at, first_claimed_at)
        SELECT g.id, g.job_id, g.task_type, CASE WHEN g.held THEN 'complete' ELSE g.status END,
               g.dependencies, g.waiting_on, g.priority, g.attempts, g.max_attempts, g.run_at,
               g.timeout_seconds, g.claimed_by, g.claimed_at,
               CASE WHEN g.held THEN now() ELSE g.heartbeat_at END,
               g.last_error,
               CASE WHEN g.held THEN g.new_output ELSE g.output END,
               g.created_at,
               CASE WHEN g.held THEN now() ELSE g.updated_at END,
               CASE WHEN g.held THEN now() ELSE g.finished_at END,
               g.has_dependents, g.claims, g.fair_at, g.first_claimed_at
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
    -- Every task named finished its job and went with it to history (the
    -- common case: a job of one task): none is left open to update.
    IF cardinality(v_moved) = cardinality(p_task_ids) THEN
        RETURN QUERY SELECT unnest(v_moved);
        RETURN;
    END IF;

    WITH done AS (
        UPDATE job_tasks t
        SET status = 'complete',
            output = i.output,
            finished_at = now(),
            updated_at = now(),
            heartbeat_at = now()
        FROM unnest(p_task_ids, p_claims, p_outputs) AS i(id, claim, output)
        -- The ids as a condition of the key's index too, not only a join.
        WHERE t.id = i.id
          AND t.id = ANY (p_task_ids)
          AND t.claimed_by = p_worker_id
          AND t.claims = i.claim
          AND task_phase(t.status, t.waiting_on) = 'in_flight'
        RETURNING t.id, t.job_id, t.task_type, t.has_dependents, t.first_claimed_at
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
            started_at = coalesce(j.started_at, d.started, now()),
            updated_at = now()
        FROM (SELECT done.job_id, count(*)::int AS n, min(done.first_claimed_at) AS started
              FROM done GROUP BY done.job_id) d
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

CREATE OR REPLACE FUNCTION refresh_job_status(p_job_ids uuid[])
 RETURNS void
 LANGUAGE sql
AS $$
    UPDATE jobs j
    SET status = s.status,
        error = CASE WHEN s.status = 'failed' THEN s.error ELSE NULL END,
        started_at = CASE WHEN s.status <> 'queued' THEN coalesce(j.started_at, s.started, now()) ELSE j.started_at END,
        finished_at = CASE WHEN s.status IN ('complete', 'failed') THEN coalesce(j.finished_at, now()) ELSE NULL END,
        updated_at = now()
    FROM (
        SELECT t.job_id,
               CASE
                   WHEN bool_and(t.status = 'complete') THEN 'complete'
                   WHEN bool_and(t.status IN ('complete', 'failed', 'cancelled')) THEN
                       CASE WHEN bool_or(t.status = 'failed') THEN 'failed' ELSE 'cancelled' END
                   WHEN bool_or(t.status <> 'pending' OR t.attempts > 0) THEN 'processing'
                   ELSE 'queued'
               END AS status,
               string_agg(t.task_type || ': ' || coalesce(t.last_error, 'failed'), '; ' ORDER BY t.id)
                   FILTER (WHERE t.status = 'failed') AS error,
               min(t.first_claimed_at) AS started
        FROM job_tasks t
        WHERE t.job_id = ANY (p_job_ids)
        GROUP BY t.job_id
        ORDER BY t.job_id
    ) s
    WHERE j.id = s.job_id
      AND j.status <> 'cancelled'
      AND (j.status IS DISTINCT FROM s.status OR j.error IS DISTINCT FROM s.error);
    SELECT retire_jobs(p_job_ids);
$$;

CREATE OR REPLACE FUNCTION heartbeat_tasks(p_worker_id text, p_task_ids bigint[], p_claims integer[])
 RETURNS TABLE(task_id bigint)
 LANGUAGE sql
AS $$
    SELECT set_config('synchronous_commit', 'off', true);
    WITH held AS (
        -- Locked here, above the sort; the update below finds them locked.
        -- The conditions are checked again on the row each lock returns.
        SELECT t.id
        FROM job_tasks t
        JOIN unnest(p_task_ids, p_claims) AS i(id, claim) ON t.id = i.id
        WHERE t.claimed_by = p_worker_id
          AND t.claims = i.claim
          AND t.status IN ('claimed', 'processing')
        ORDER BY t.id
        FOR NO KEY UPDATE OF t
    )
    UPDATE job_tasks t
    SET heartbeat_at = now(), status = 'processing', updated_at = now()
    FROM held h
    WHERE t.id = h.id
    RETURNING t.id;
$$;
