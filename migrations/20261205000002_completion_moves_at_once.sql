-- A completion that finishes its job writes the job and its tasks into
-- history once, final: the first history migration updated them in the
-- hot tables and then moved them, two writes of each row where one
-- suffices. Jobs still open after the call take the update path as
-- before. complete_and_claim_tasks and everything else call this function,
-- so they change with it.

CREATE OR REPLACE FUNCTION complete_tasks(p_worker_id text, p_task_ids bigint[], p_claims int[], p_outputs jsonb[])
RETURNS TABLE (task_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_moved bigint[];
    v_finishing uuid[];
    v_done bigint[];
    v_partial uuid[];
    v_finished uuid[];
BEGIN
    PERFORM lock_jobs_of_tasks(p_task_ids);

    -- A job this call finishes goes to history at once, final: its row and
    -- its tasks' are written there once, where updating them here and then
    -- moving them wrote each twice (the common case: a text job's one task).
    WITH valid AS (
        -- A task named twice counts once, as the update below would.
        SELECT DISTINCT ON (t.id) t.id, t.job_id, i.output
        FROM unnest(p_task_ids, p_claims, p_outputs) AS i(id, claim, output)
        JOIN job_tasks t ON t.id = i.id
        WHERE t.claimed_by = p_worker_id AND t.claims = i.claim AND t.status IN ('claimed', 'processing')
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
          AND t.status IN ('claimed', 'processing')
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
        UPDATE jobs j
        SET tasks_complete = j.tasks_complete + d.n,
            status = CASE WHEN j.tasks_complete + d.n >= j.tasks_total THEN 'complete' ELSE j.status END,
            error = CASE WHEN j.tasks_complete + d.n >= j.tasks_total THEN NULL ELSE j.error END,
            started_at = coalesce(j.started_at, now()),
            finished_at = CASE WHEN j.tasks_complete + d.n >= j.tasks_total
                               THEN coalesce(j.finished_at, now()) ELSE j.finished_at END,
            updated_at = now()
        FROM (SELECT done.job_id, count(*)::int AS n FROM done GROUP BY done.job_id) d
        WHERE j.id = d.job_id AND j.status <> 'cancelled'
        RETURNING j.id, j.status
    )
    SELECT (SELECT array_agg(done.id) FROM done),
           array_agg(p.id) FILTER (WHERE p.status <> 'complete'),
           array_agg(p.id) FILTER (WHERE p.status = 'complete')
    INTO v_done, v_partial, v_finished
    FROM progressed p;

    -- Tasks still open: the job may be processing, or failed when the rest
    -- already finished badly. That takes the full derivation (which moves
    -- a job it finishes to history). A job the counters say is complete
    -- left above; it is moved here only if they were behind.
    IF v_partial IS NOT NULL THEN
        PERFORM refresh_job_status(v_partial);
    END IF;
    IF v_finished IS NOT NULL THEN
        PERFORM retire_jobs(v_finished);
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

