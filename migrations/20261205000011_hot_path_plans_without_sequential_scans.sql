-- The hot path's functions plan without sequential scans.
--
-- PL/pgSQL keeps the plans of a function's statements for the life of the
-- connection, and from the sixth call on may keep one generic plan. A
-- queue that drained empty is vacuumed down to no pages (autovacuum
-- truncates a table's empty end), and a plan made then costs a sequential
-- scan at nothing. The worker's connection that polled the empty queue, or
-- the producer's that placed its first jobs, kept such plans, and the
-- burst that followed ran them against a growing table until the next
-- analyze invalidated them:
--
-- - place_in_line read every task twice per enqueue (the head of the line
--   and the fair-restart probe): 50 ms a call at 99,000 tasks, in a run
--   of `make bench-queue`'s enqueue phase, whose rate it about halved;
-- - a claim of 32 read 100,000 rows and entries at 50,000 tasks (63 ms);
-- - a completion of 32 (lock_jobs_of_tasks, a join of jobs and tasks
--   planned as loops over sequential scans) ran for more than ten minutes
--   at 50,000 jobs before it was cancelled.
--
-- Each statement of these functions has an index made for it, so none
-- needs a sequential scan; they are ruled out. That alone left whole-index
-- walks where the planner takes a table for one row: a walk of one index
-- then costs what lookups in another do.
--
-- - place_in_line's fair-restart probe, an equality on the place, walked
--   the job-and-type index (38 ms): it now asks for the first runnable
--   place from there on in the claim index's order, which only that index
--   gives without a sort.
-- - A completion joined the ids it was given to the tasks, and the planner
--   walked the task table's key in order and matched each row against the
--   ids (three statements, 15,536 entries read for a completion of 32 from
--   a 5,000-task backlog, 59,842 before this migration): each task and job
--   is now looked up by its key from the ids, in a subquery of its own.
--
-- Tests: queue/tests/depth.rs, *_when_the_queue_drained_empty.

-- As in the claims migration, with the probe asked in the claim index's order.
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
                -- Is the tenant's latest place still waiting? Asked as the
                -- first runnable place from there on, in the claim index's
                -- order: an equality on fair_at would make any index of
                -- the type look as good.
                WHEN c.fair_at > v_line.head AND (
                    SELECT t.fair_at FROM job_tasks t
                    WHERE t.task_type = v_line.task_type AND t.priority = v_line.priority
                      AND task_phase(t.status, t.waiting_on) = 'runnable'
                      AND t.fair_at >= c.fair_at - v_step
                    ORDER BY t.fair_at
                    LIMIT 1) IS DISTINCT FROM c.fair_at - v_step THEN v_line.head
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


-- lock_jobs_of_tasks as in the reliability migration, and complete_tasks
-- as in the one-claim-per-completion migration, each task looked up by key.
CREATE OR REPLACE FUNCTION lock_jobs_of_tasks(p_task_ids bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    -- Each task, then each job, looked up by its key from the ids given
    -- (LIMIT keeps each lookup a subquery of its own), the jobs in id
    -- order as before.
    PERFORM 1
    FROM (SELECT DISTINCT k.job_id
          FROM unnest(p_task_ids) AS i(id)
          CROSS JOIN LATERAL (SELECT t.job_id FROM job_tasks t WHERE t.id = i.id LIMIT 1) k
          ORDER BY k.job_id) o
    CROSS JOIN LATERAL (SELECT 1 FROM jobs j WHERE j.id = o.job_id LIMIT 1 FOR NO KEY UPDATE OF j) l;
END
$$;

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
        -- Each task looked up by its key from the ids given (LIMIT keeps
        -- the lookup a subquery of its own), whatever the statistics say.
        SELECT DISTINCT ON (t.id) t.id, t.job_id, i.output
        FROM unnest(p_task_ids, p_claims, p_outputs) AS i(id, claim, output)
        CROSS JOIN LATERAL (
            SELECT t.id, t.job_id FROM job_tasks t
            WHERE t.id = i.id AND t.claimed_by = p_worker_id AND t.claims = i.claim
              AND task_phase(t.status, t.waiting_on) = 'in_flight'
            LIMIT 1
        ) t
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
        -- The ids as a condition of the key's index too, not only a join.
        WHERE t.id = i.id
          AND t.id = ANY (p_task_ids)
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

ALTER FUNCTION place_in_line(text[], text[], int[], float8) SET enable_seqscan = off;
-- Its earlier setting (enable_bitmapscan = off) stays.
ALTER FUNCTION take_tasks(text, text[], int, text, uuid) SET enable_seqscan = off;
ALTER FUNCTION complete_tasks(text, bigint[], int[], jsonb[]) SET enable_seqscan = off;
ALTER FUNCTION complete_and_claim_tasks(text, bigint[], int[], jsonb[], text[], int, uuid) SET enable_seqscan = off;
ALTER FUNCTION lock_jobs_of_tasks(bigint[]) SET enable_seqscan = off;
ALTER FUNCTION fail_task(text, bigint, int, text, boolean, float8, float8, float8) SET enable_seqscan = off;
ALTER FUNCTION release_tasks(text, bigint[], int[]) SET enable_seqscan = off;
