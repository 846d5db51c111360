-- A job of one task enqueued without a key has no row in `jobs` while it is
-- open: its task's row holds the job (issue #16, the prototypes' `folded`
-- layout). A drained text job wrote eight rows and their index entries (the
-- job's insert, its lock and delete, its history row; the task's insert,
-- claim, delete and history row); it now writes five: the job's row, its
-- lock and its delete are gone.
--
-- * job_tasks.job_tenant, job_type, job_input: set on such a task only;
--   `job_input IS NOT NULL` is what says the job lives in its task's row.
--   task_history has the three columns too, always NULL there: rows move
--   between the two tables by position (reopen_job, retire_jobs). A job
--   that goes to history goes as a `job_history` row like any other, and a
--   retried one comes back with a row in `jobs`.
-- * open_jobs reads such a job off its task (open_jobs_in_task_rows):
--   queued until the task's first claim, processing from then on (as
--   refresh_job_status derives it for a job with a row), started at that
--   first claim. A task of such a job is pending, claimed or processing:
--   one that ends moves to history in the same transaction.
-- * job_tasks_job_tenant: a tenant's waiting jobs of this kind, newest
--   first, beside `jobs_tenant_id`.
-- * complete_tasks moves such a job and its task to history in its first
--   statement; the task's lock stands for the job's. It locks the job rows
--   of the others itself (as lock_jobs_of_tasks does), noting on the way
--   which tasks are of jobs in task rows, so each is looked up once for
--   both. lock_jobs_of_tasks (failures, releases, artifacts) skips looking
--   for a job row such a task's job does not have.
-- * retire_jobs moves such a job to history when its task has finished
--   (failed, cancelled), as refresh_job_status finds it, and tells the
--   job's watchers (there is no job row whose trigger would).
-- * sweep_tasks takes the lease back from such a task as from any other;
--   with no job row to lock first, its update locks and checks the task.
--
-- Jobs enqueued before this migration keep their `jobs` rows: both kinds
-- are read and finished alike, so no row moves. The bodies are otherwise
-- the ones before, with their settings (complete_tasks: 20261208000001;
-- sweep_tasks: 20261206000002; retire_jobs: 20261205000001;
-- lock_jobs_of_tasks: 20261206000001).

ALTER TABLE job_tasks
    ADD COLUMN job_tenant text,
    ADD COLUMN job_type text,
    ADD COLUMN job_input jsonb,
    ADD CONSTRAINT job_tasks_job_in_task_row CHECK (
        (job_input IS NULL AND job_tenant IS NULL AND job_type IS NULL)
        OR (job_input IS NOT NULL AND job_tenant <> ''
            AND job_type IN ('reading', 'text', 'pdf', 'audiobook')));
ALTER TABLE task_history
    ADD COLUMN job_tenant text,
    ADD COLUMN job_type text,
    ADD COLUMN job_input jsonb;

-- A tenant's waiting jobs kept in task rows, newest first. Only waiting
-- ones: a claim's update is never heap-only (`status` is in the indexes'
-- predicates), so an index over claimed tasks too took a new entry at
-- every claim (README, the benchmark section). The ones in flight are few
-- (as many as workers run) and are read through `job_tasks_active`.
CREATE INDEX job_tasks_job_tenant ON job_tasks (job_tenant, job_id)
    WHERE job_input IS NOT NULL AND status = 'pending';

-- open_jobs, in two parts a tenant's list reads apart (queue::jobs): a
-- UNION ALL member with a WHERE of its own is planned as a subquery for its
-- whole result, so a tenant's newest page sorted every open job of the
-- tenant kept in a task's row (100 ms for 20,000) where a scan of the
-- (tenant, id) index stops at the page.
CREATE VIEW open_job_rows AS
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

-- Waiting (queued, or processing between attempts) and in flight: a
-- tenant's list reads each through its own index (job_tasks_job_tenant,
-- job_tasks_active by every task type).
CREATE VIEW waiting_jobs_in_task_rows AS
    SELECT t.job_id AS id, t.job_tenant AS tenant, t.job_type,
           CASE WHEN t.attempts = 0 THEN 'queued' ELSE 'processing' END AS status,
           t.job_input AS input, t.priority, NULL::text AS idempotency_key, NULL::text AS error,
           t.created_at, t.updated_at, t.first_claimed_at AS started_at, NULL::timestamptz AS finished_at,
           1 AS tasks_total, 0 AS tasks_complete
    FROM job_tasks t
    WHERE t.job_input IS NOT NULL AND t.status = 'pending';

CREATE VIEW running_jobs_in_task_rows AS
    SELECT t.job_id AS id, t.job_tenant AS tenant, t.job_type, 'processing'::text AS status,
           t.job_input AS input, t.priority, NULL::text AS idempotency_key, NULL::text AS error,
           t.created_at, t.updated_at, t.first_claimed_at AS started_at, NULL::timestamptz AS finished_at,
           1 AS tasks_total, 0 AS tasks_complete
    FROM job_tasks t
    WHERE t.job_input IS NOT NULL AND t.task_type = ANY (task_types())
      AND t.status IN ('claimed', 'processing');

CREATE VIEW open_jobs_in_task_rows AS
    SELECT * FROM waiting_jobs_in_task_rows UNION ALL SELECT * FROM running_jobs_in_task_rows;

CREATE OR REPLACE VIEW open_jobs AS
    SELECT * FROM open_job_rows UNION ALL SELECT * FROM open_jobs_in_task_rows;

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
    v_in_task_rows bigint[];
    v_jobs_locked bigint;
BEGIN
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
    WITH folded AS (
        -- A job of one task enqueued without a key lives in its task's row
        -- (job_input set): the row is the job's, and its lock is the job's
        -- lock, taken here in id order as a heartbeat takes it and checked
        -- again on the row each lock returns (a sweep may have taken the
        -- lease back meanwhile).
        SELECT t.id
        FROM (SELECT * FROM unnest(p_task_ids, p_claims) AS u(id, claim)
              WHERE u.id = ANY (v_in_task_rows) ORDER BY u.id) i
        CROSS JOIN LATERAL (
            SELECT t.id FROM job_tasks t
            WHERE t.id = i.id AND t.claimed_by = p_worker_id AND t.claims = i.claim
              AND task_phase(t.status, t.waiting_on) = 'in_flight'
            LIMIT 1
            FOR UPDATE
        ) t
    ), gone_folded AS (
        -- By key from the ids (a join to `folded` was planned, on a table
        -- just drained empty, as a hash join over the whole key).
        DELETE FROM job_tasks t WHERE t.id = ANY (ARRAY(SELECT f.id FROM folded f))
        RETURNING t.*, p_outputs[array_position(p_task_ids, t.id)] AS new_output
    ), kept_folded_jobs AS (
        INSERT INTO job_history (id, tenant, job_type, status, input, priority, idempotency_key, error,
                                 created_at, updated_at, started_at, finished_at, tasks_total, tasks_complete)
        SELECT g.job_id, g.job_tenant, g.job_type, 'complete', g.job_input, g.priority, NULL, NULL,
               g.created_at, now(), coalesce(g.first_claimed_at, now()), now(), 1, 1
        FROM gone_folded g
    ), kept_folded_tasks AS (
        INSERT INTO task_history (id, job_id, task_type, status, dependencies, waiting_on, priority, attempts,
                                  max_attempts, run_at, timeout_seconds, claimed_by, claimed_at, heartbeat_at,
                                  last_error, output, created_at, updated_at, finished_at, has_dependents,
                                  claims, fair_at, first_claimed_at)
        SELECT g.id, g.job_id, g.task_type, 'complete', g.dependencies, g.waiting_on, g.priority, g.attempts,
               g.max_attempts, g.run_at, g.timeout_seconds, g.claimed_by, g.claimed_at, now(),
               g.last_error, g.new_output, g.created_at, now(), now(), g.has_dependents,
               g.claims, g.fair_at, g.first_claimed_at
        FROM gone_folded g
    ), valid AS (
        -- A task named twice counts once, as the update below would.
        -- Each task looked up by its key from the ids given (LIMIT keeps
        -- the lookup a subquery of its own), whatever the statistics say;
        -- the tasks of jobs kept in their rows are `folded`'s.
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

CREATE OR REPLACE FUNCTION sweep_tasks(p_stale_seconds double precision, p_backoff_base double precision, p_backoff_cap double precision)
 RETURNS TABLE(task_id bigint, job_id uuid, status text, reason text, worker_id text)
 LANGUAGE plpgsql
AS $function$
DECLARE
    v_jobs uuid[];
    v_ids bigint[];
    v_job_ids uuid[];
    v_statuses text[];
    v_reasons text[];
    v_workers text[];
    v_failed bigint[];
BEGIN
    -- Every type named, so the scan skips the backlog (see above).
    SELECT array_agg(DISTINCT t.job_id) INTO v_jobs
    FROM job_tasks t
    WHERE t.task_type = ANY (task_types()) AND t.status IN ('claimed', 'processing')
      AND (t.heartbeat_at < now() - make_interval(secs => p_stale_seconds)
           OR t.claimed_at + make_interval(secs => t.timeout_seconds) < now());
    IF v_jobs IS NULL THEN
        RETURN;
    END IF;

    -- A job kept in its task's row has no row of its own to lock: the
    -- update below locks the task and checks it again.
    v_jobs := ARRAY(SELECT j.id FROM jobs j WHERE j.id = ANY (v_jobs) ORDER BY j.id
                    FOR NO KEY UPDATE SKIP LOCKED)
              || ARRAY(SELECT t.job_id FROM job_tasks t
                       WHERE t.job_id = ANY (v_jobs) AND t.job_input IS NOT NULL);
    IF cardinality(v_jobs) = 0 THEN
        RETURN;
    END IF;

    -- The staleness is re-checked on the row itself, so a heartbeat that
    -- landed since the first look keeps its task.
    WITH swept AS (
        UPDATE job_tasks t
        SET status = CASE WHEN t.attempts < t.max_attempts THEN 'pending' ELSE 'failed' END,
            run_at = CASE WHEN t.attempts < t.max_attempts
                          THEN now() + retry_backoff(t.attempts, p_backoff_base, p_backoff_cap)
                          ELSE t.run_at END,
            fair_at = CASE WHEN t.attempts < t.max_attempts
                           THEN greatest(t.fair_at, now() + retry_backoff_floor(t.attempts, p_backoff_base, p_backoff_cap))
                           ELSE t.fair_at END,
            finished_at = CASE WHEN t.attempts < t.max_attempts THEN NULL ELSE now() END,
            last_error = e.reason,
            claimed_by = NULL,
            claimed_at = NULL,
            heartbeat_at = NULL,
            updated_at = now()
        FROM (
            SELECT o.id, o.claimed_by,
                   CASE WHEN o.claimed_at + make_interval(secs => o.timeout_seconds) < now()
                        THEN format('timed out after %s s (attempt %s)', o.timeout_seconds, o.attempts)
                        ELSE format('lease expired: its worker stopped heartbeating (attempt %s)', o.attempts)
                   END AS reason
            FROM job_tasks o
            WHERE o.job_id = ANY (v_jobs) AND o.status IN ('claimed', 'processing')
        ) e
        WHERE t.id = e.id
          AND t.status IN ('claimed', 'processing')
          AND (t.heartbeat_at < now() - make_interval(secs => p_stale_seconds)
               OR t.claimed_at + make_interval(secs => t.timeout_seconds) < now())
        RETURNING t.id, t.job_id, t.status, e.reason, e.claimed_by
    )
    SELECT array_agg(s.id ORDER BY s.id), array_agg(s.job_id ORDER BY s.id),
           array_agg(s.status ORDER BY s.id), array_agg(s.reason ORDER BY s.id),
           array_agg(s.claimed_by ORDER BY s.id),
           array_agg(s.id) FILTER (WHERE s.status = 'failed')
    INTO v_ids, v_job_ids, v_statuses, v_reasons, v_workers, v_failed
    FROM swept s;

    IF v_ids IS NULL THEN
        RETURN;
    END IF;
    IF v_failed IS NOT NULL THEN
        PERFORM cancel_dependents(v_failed);
    END IF;
    PERFORM refresh_job_status(ARRAY(SELECT DISTINCT unnest(v_job_ids)));
    RETURN QUERY SELECT * FROM unnest(v_ids, v_job_ids, v_statuses, v_reasons, v_workers);
END
$function$;


-- A job kept in its task's row has no job row to look up and lock: its
-- task's lock is taken where the task is written.
CREATE OR REPLACE FUNCTION lock_jobs_of_tasks(p_task_ids bigint[])
 RETURNS void
 LANGUAGE plpgsql
 SET enable_seqscan TO 'off'
 SET plan_cache_mode TO 'force_generic_plan'
AS $function$
BEGIN
    -- Each task, then each job, looked up by its key from the ids given
    -- (LIMIT keeps each lookup a subquery of its own), the jobs in id
    -- order as before.
    PERFORM 1
    FROM (SELECT DISTINCT k.job_id
          FROM unnest(p_task_ids) AS i(id)
          CROSS JOIN LATERAL (SELECT t.job_id FROM job_tasks t
                              WHERE t.id = i.id AND t.job_input IS NULL LIMIT 1) k
          ORDER BY k.job_id) o
    CROSS JOIN LATERAL (SELECT 1 FROM jobs j WHERE j.id = o.job_id LIMIT 1 FOR NO KEY UPDATE OF j) l;
END
$function$;

CREATE OR REPLACE FUNCTION retire_jobs(p_job_ids uuid[])
RETURNS void
LANGUAGE sql AS $$
    WITH gone AS (
        DELETE FROM jobs j
        WHERE j.id = ANY (p_job_ids) AND j.status IN ('complete', 'failed', 'cancelled')
        RETURNING j.*
    ), kept AS (
        INSERT INTO job_history SELECT * FROM gone
    ), tasks AS (
        DELETE FROM job_tasks t WHERE t.job_id IN (SELECT id FROM gone)
        RETURNING t.*
    )
    INSERT INTO task_history SELECT * FROM tasks;

    -- A job kept in its task's row finished with its task; its status and
    -- error are what refresh_job_status would derive from that one task.
    WITH gone AS (
        DELETE FROM job_tasks t
        WHERE t.job_id = ANY (p_job_ids) AND t.job_input IS NOT NULL
          AND t.status IN ('complete', 'failed', 'cancelled')
        RETURNING t.*
    ), kept AS (
        INSERT INTO job_history (id, tenant, job_type, status, input, priority, idempotency_key, error,
                                 created_at, updated_at, started_at, finished_at, tasks_total, tasks_complete)
        SELECT g.job_id, g.job_tenant, g.job_type, g.status, g.job_input, g.priority, NULL,
               CASE WHEN g.status = 'failed' THEN g.task_type || ': ' || coalesce(g.last_error, 'failed') END,
               g.created_at, now(),
               CASE WHEN g.status = 'cancelled' THEN g.first_claimed_at ELSE coalesce(g.first_claimed_at, now()) END,
               coalesce(g.finished_at, now()), 1, CASE WHEN g.status = 'complete' THEN 1 ELSE 0 END
        FROM gone g
        RETURNING id
    ), tasks AS (
        INSERT INTO task_history (id, job_id, task_type, status, dependencies, waiting_on, priority, attempts,
                                  max_attempts, run_at, timeout_seconds, claimed_by, claimed_at, heartbeat_at,
                                  last_error, output, created_at, updated_at, finished_at, has_dependents,
                                  claims, fair_at, first_claimed_at)
        SELECT g.id, g.job_id, g.task_type, g.status, g.dependencies, g.waiting_on, g.priority, g.attempts,
               g.max_attempts, g.run_at, g.timeout_seconds, g.claimed_by, g.claimed_at, g.heartbeat_at,
               g.last_error, g.output, g.created_at, g.updated_at, g.finished_at, g.has_dependents,
               g.claims, g.fair_at, g.first_claimed_at
        FROM gone g
    )
    SELECT pg_notify('backlog_job_status', k.id::text)
    FROM kept k
    WHERE EXISTS (SELECT 1 FROM job_watches w WHERE w.job_id = k.id);
$$;
