-- A job of one task that completes stays one row, its task's, in history;
-- a repeated completion names each task's job, and history loses its index
-- of task ids.
--
-- A job of one task enqueued without a key lives in its task's row while
-- it is open (20261209000001), but its completion still wrote two history
-- rows: a `job_history` row for the job and a `task_history` row for the
-- task. And a completion repeated after its answer was lost (it committed;
-- the connection broke before the reply) found its task in history by the
-- task's id alone, through `task_history_id`, an index entry for every
-- finished task read only by such repeats. Measured as the server's CPU
-- per drained task (scripts/prototypes/history-cost; README, "Where
-- backlog does not win"), the two took about 9 % of it.
--
-- * complete_tasks writes such a job's task to history with job_tenant,
--   job_type and job_input set, and no job_history row. Only this path
--   does: a job kept in its task's row that fails or is cancelled goes
--   through retire_jobs, as before, as a job_history row and a task row
--   without those columns. So in task_history, `job_input IS NOT NULL`
--   says the row is a job that completed in its task's row, and nothing
--   else.
-- * finished_jobs_in_task_rows reads such a row as a job (status
--   `complete`, one task of one, started at its first claim, no key, no
--   error); all_jobs is open_jobs, job_history and it.
-- * task_history_job_tenant: a tenant's such jobs by id, as
--   job_history_tenant_id is for the others (queue::jobs lists each part
--   as a page of its own).
-- * Retention keeps, archives and drops such a job with its day's tasks
--   partition (queue::maintenance).
-- * complete_tasks(worker, task ids, job ids, claims, outputs): the worker
--   knows each task's job (its lease carries it), and a repeat finds its
--   task by history's key (job_id, id). The job ids are read only there: a
--   wrong one leaves a repeat unanswered (the lease taken as lost), and
--   never completes or locks anything else. complete_and_claim_next takes
--   the job ids too, after the task ids. task_history_id goes.
-- * The previous signatures stay, for the instances of the previous
--   release still running while an upgrade rolls out: complete_tasks'
--   looks each task's job up (in history by reading it, so a repeat there,
--   or a task whose job finished otherwise, costs a read of history);
--   complete_and_claim_next's calls it; complete_and_claim_tasks reads
--   history as before, more slowly without the index.
--
-- Jobs already in history keep their job_history rows: both forms are
-- read alike, and nothing moves. complete_tasks is otherwise as
-- 20261210000001 left it, with its settings; it takes the first claim's
-- time from the claim when a row from before 20261208000001 has none.

CREATE INDEX task_history_job_tenant ON task_history (job_tenant, job_id) WHERE job_input IS NOT NULL;

CREATE VIEW finished_jobs_in_task_rows AS
    SELECT t.job_id AS id, t.job_tenant AS tenant, t.job_type, t.status,
           t.job_input AS input, t.priority, NULL::text AS idempotency_key, NULL::text AS error,
           t.created_at, t.updated_at, t.first_claimed_at AS started_at, t.finished_at,
           1 AS tasks_total, 1 AS tasks_complete
    FROM task_history t
    WHERE t.job_input IS NOT NULL;

CREATE OR REPLACE VIEW all_jobs AS
    SELECT * FROM open_jobs
    UNION ALL SELECT * FROM job_history
    UNION ALL SELECT * FROM finished_jobs_in_task_rows;

DROP INDEX task_history_id;

CREATE FUNCTION complete_tasks(p_worker_id text, p_task_ids bigint[], p_job_ids uuid[], p_claims integer[],
                               p_outputs jsonb[])
 RETURNS TABLE(task_id bigint)
 LANGUAGE plpgsql
 SET enable_seqscan TO 'off'
 SET enable_bitmapscan TO 'off'
 SET plan_cache_mode TO 'force_generic_plan'
AS $$
DECLARE
    v_moved bigint[];
    v_finishing uuid[];
    v_done bigint[];
    v_partial uuid[];
    v_in_task_rows bigint[];
    v_jobs_locked bigint;
BEGIN
    IF cardinality(p_job_ids) IS DISTINCT FROM cardinality(p_task_ids) THEN
        RAISE EXCEPTION 'complete_tasks: p_job_ids must name the job of each of p_task_ids (% ids, % jobs)',
            cardinality(p_task_ids), cardinality(p_job_ids) USING ERRCODE = '22023';
    END IF;
    -- The jobs of the tasks named are locked first, in id order, as
    -- lock_jobs_of_tasks locks them. A task whose job is kept in its row
    -- has no job row to lock: it is noted here, and the statement below
    -- locks it as it takes it, so each task is looked up once for both.
    WITH named AS (
        SELECT k.id, k.job_id, k.in_task_row
        FROM unnest(p_task_ids) AS i(id)
        CROSS JOIN LATERAL (SELECT t.id, t.job_id, t.job_input IS NOT NULL AS in_task_row
                            FROM job_tasks t WHERE t.id = i.id LIMIT 1) k
    ), locked AS (
        SELECT o.job_id
        FROM (SELECT DISTINCT n.job_id FROM named n WHERE NOT n.in_task_row ORDER BY n.job_id) o
        CROSS JOIN LATERAL (SELECT 1 FROM jobs j WHERE j.id = o.job_id LIMIT 1 FOR NO KEY UPDATE OF j) l
    )
    SELECT ARRAY(SELECT n.id FROM named n WHERE n.in_task_row), (SELECT count(*) FROM locked)
    INTO v_in_task_rows, v_jobs_locked;
    -- A task named twice under different claims (a lease the sweeper took
    -- back, then claimed again by the same worker): keep the entry under
    -- the claim the task holds. The job-finishing path below finds a
    -- task's claim and output by its first position, and a stale first
    -- entry there moved a completed task to history unfinished, output
    -- lost, under a job recorded complete. Only a batch that names a task
    -- twice pays for the look.
    IF cardinality(p_task_ids) > (SELECT count(DISTINCT i) FROM unnest(p_task_ids) AS i) THEN
        SELECT array_agg(d.id ORDER BY d.ord), array_agg(d.job_id ORDER BY d.ord),
               array_agg(d.claim ORDER BY d.ord), array_agg(d.output ORDER BY d.ord)
        INTO p_task_ids, p_job_ids, p_claims, p_outputs
        FROM (
            SELECT DISTINCT ON (i.id) i.id, i.job_id, i.claim, i.output, i.ord
            FROM unnest(p_task_ids, p_job_ids, p_claims, p_outputs) WITH ORDINALITY AS i(id, job_id, claim, output, ord)
            LEFT JOIN job_tasks t ON t.id = i.id
            ORDER BY i.id, (t.claimed_by = p_worker_id AND t.claims = i.claim) DESC NULLS LAST, i.ord
        ) d;
    END IF;

    -- A job this call finishes goes to history at once, final: its row and
    -- its tasks' are written there once, where updating them here and then
    -- moving them wrote each twice (the common case: a text job's one task).
    WITH gone_folded AS (
        -- A job of one task enqueued without a key lives in its task's row
        -- (job_input set), and finishes there: the row goes to history
        -- with the job's columns, and no job_history row is written. The
        -- row is the job's, and its lock is the job's
        -- lock, taken here in id order as a heartbeat takes it (the key's
        -- index walks the ids in ascending order) and checked again on the
        -- row each lock returns (a sweep may have taken the lease back
        -- meanwhile).
        DELETE FROM job_tasks t
        WHERE t.id = ANY (v_in_task_rows)
          AND t.claimed_by = p_worker_id
          AND t.claims = p_claims[array_position(p_task_ids, t.id)]
          AND task_phase(t.status, t.waiting_on) = 'in_flight'
        RETURNING t.*, p_outputs[array_position(p_task_ids, t.id)] AS new_output
    ), kept_folded_tasks AS (
        INSERT INTO task_history (id, job_id, task_type, status, dependencies, waiting_on, priority, attempts,
                                  max_attempts, run_at, timeout_seconds, claimed_by, claimed_at, heartbeat_at,
                                  last_error, output, created_at, updated_at, finished_at, has_dependents,
                                  claims, fair_at, first_claimed_at, job_tenant, job_type, job_input)
        SELECT g.id, g.job_id, g.task_type, 'complete', g.dependencies, g.waiting_on, g.priority, g.attempts,
               g.max_attempts, g.run_at, g.timeout_seconds, g.claimed_by, g.claimed_at, now(),
               g.last_error, g.new_output, g.created_at, now(), now(), g.has_dependents,
               g.claims, g.fair_at, coalesce(g.first_claimed_at, g.claimed_at), g.job_tenant, g.job_type, g.job_input
        FROM gone_folded g
    ), valid AS (
        -- A task named twice counts once, as the update below would.
        -- Each task looked up by its key from the ids given (LIMIT keeps
        -- the lookup a subquery of its own), whatever the statistics say;
        -- the tasks of jobs kept in their rows are `gone_folded`'s.
        SELECT DISTINCT ON (t.id) t.id, t.job_id, t.first_claimed_at, i.output
        FROM unnest(p_task_ids, p_claims, p_outputs) AS i(id, claim, output)
        CROSS JOIN LATERAL (
            SELECT t.id, t.job_id, t.first_claimed_at FROM job_tasks t
            WHERE t.id = i.id AND NOT (i.id = ANY (v_in_task_rows))
              AND t.claimed_by = p_worker_id AND t.claims = i.claim
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
    SELECT (SELECT array_agg(g.id) FROM gone_tasks g WHERE g.held)
               || (SELECT array_agg(g.id) FROM gone_folded g),
           (SELECT array_agg(g.id) FROM gone_jobs g)
               || (SELECT array_agg(g.job_id) FROM gone_folded g)
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
    -- completed under that claim is reported again, wherever it now is,
    -- found by its job and its id (history's key).
    IF cardinality(v_done) < cardinality(p_task_ids) THEN
        RETURN QUERY
            SELECT h.id
            FROM unnest(p_task_ids, p_job_ids, p_claims) AS i(id, job_id, claim)
            JOIN all_tasks h ON h.job_id = i.job_id AND h.id = i.id
            WHERE NOT (i.id = ANY (v_done))
              AND h.status = 'complete' AND h.claimed_by = p_worker_id AND h.claims = i.claim;
    END IF;
END
$$;


-- The previous signature, for the instances of the previous release still
-- running while an upgrade rolls out: each task's job looked up by the
-- task's id, in the open tasks by their key, in history (a repeated
-- completion's, or a task whose job finished otherwise) by reading it.
CREATE OR REPLACE FUNCTION complete_tasks(p_worker_id text, p_task_ids bigint[], p_claims integer[], p_outputs jsonb[])
 RETURNS TABLE(task_id bigint)
 LANGUAGE sql
 SET enable_seqscan TO 'off'
 SET enable_bitmapscan TO 'off'
 SET plan_cache_mode TO 'force_generic_plan'
AS $$
    SELECT c.task_id
    FROM complete_tasks(
        p_worker_id, p_task_ids,
        ARRAY(SELECT coalesce((SELECT t.job_id FROM job_tasks t WHERE t.id = i.id),
                              (SELECT h.job_id FROM task_history h WHERE h.id = i.id LIMIT 1))
              FROM unnest(p_task_ids) WITH ORDINALITY AS i(id, ord) ORDER BY i.ord),
        p_claims, p_outputs) c;
$$;

CREATE FUNCTION complete_and_claim_next(p_worker_id text, p_task_ids bigint[], p_job_ids uuid[], p_claims int[],
                                        p_outputs jsonb[], p_task_types text[], p_limit int,
                                        p_nonce uuid DEFAULT NULL)
RETURNS SETOF job_tasks
LANGUAGE plpgsql
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_completed job_tasks;
BEGIN
    -- As the signature before (20261211000001), the tasks' jobs passed on.
    v_completed.status := 'complete';
    FOR v_completed.id IN
        SELECT c.task_id FROM complete_tasks(p_worker_id, p_task_ids, p_job_ids, p_claims, p_outputs) c
    LOOP
        RETURN NEXT v_completed;
    END LOOP;
    RETURN QUERY SELECT * FROM take_tasks(p_worker_id, p_task_types, p_limit, 'processing', p_nonce);
END
$$;
