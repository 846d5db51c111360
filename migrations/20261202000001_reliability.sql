-- Guarantees under races: one lock order, leases unique per claim, a drain
-- that covers every claimer, and a repair for any job left behind.
--
-- 1. One lock order everywhere: a job's row before its tasks' rows, jobs in
--    id order. Every function that finishes, fails, releases or sweeps a
--    task first locks its job (FOR NO KEY UPDATE, which leaves the foreign
--    keys' KEY SHARE free), and only then reads the siblings to derive the
--    job's status, in a statement that starts after the lock: a sibling
--    changed concurrently has committed by then and is seen. Before this,
--    two tasks of one job finishing at once each derived the job's status
--    from a snapshot without the other and left it `processing` forever.
--    Claims never wait for a job: they take it SKIP LOCKED, so a claim can
--    neither deadlock with a cancel nor stall behind a completion.
-- 2. Leases are unique per claim. `claims` counts every claim of a task and
--    is never decremented (a release gives the attempt back, not the claim)
--    nor reset (a retried job keeps it), so (task, claims) names one claim
--    forever, whatever the worker id. The fence is `claims`, not `attempts`.
-- 3. Every claimer is in the registry: claim_tasks registers an unknown
--    worker id before it claims, so the drain step's row lock orders it
--    against the drain like any registered replica.
-- 4. repair_stuck_jobs re-derives any job whose tasks are all final but
--    which is not: it should never find one, and /metrics counts it if it
--    does.

ALTER TABLE job_tasks ADD COLUMN claims integer NOT NULL DEFAULT 0 CHECK (claims >= 0);
-- Live leases (attempt = attempts) stay valid; every other task starts past
-- any attempt number an earlier holder could present.
UPDATE job_tasks
SET claims = CASE WHEN status IN ('claimed', 'processing') THEN attempts
                  ELSE greatest(attempts, max_attempts) + 1 END
WHERE status <> 'complete' OR attempts > 0;

-- Each task's place in line for fair claims across tenants (see
-- place_in_line at the end).
ALTER TABLE job_tasks ADD COLUMN fair_at timestamptz NOT NULL DEFAULT now();
UPDATE job_tasks SET fair_at = run_at WHERE status = 'pending';

DROP INDEX job_tasks_runnable;
CREATE INDEX job_tasks_runnable ON job_tasks (task_type, priority DESC, fair_at, id)
    WHERE status = 'pending' AND waiting_on = 0;

-- The shortest delay retry_backoff can give: a retried task's place in
-- line is no earlier than this from now.
CREATE FUNCTION retry_backoff_floor(p_attempt int, p_base_seconds float8, p_cap_seconds float8)
RETURNS interval
LANGUAGE sql IMMUTABLE AS $$
    SELECT make_interval(secs => least(p_cap_seconds, p_base_seconds * power(2, greatest(p_attempt, 1) - 1)) / 2);
$$;

-- Lock the jobs of these tasks, in id order: the first step of every
-- function that changes a claimed task.
CREATE FUNCTION lock_jobs_of_tasks(p_task_ids bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM jobs j
    WHERE j.id IN (SELECT t.job_id FROM job_tasks t WHERE t.id = ANY (p_task_ids))
    ORDER BY j.id
    FOR NO KEY UPDATE OF j;
END
$$;

CREATE OR REPLACE FUNCTION claim_tasks(p_worker_id text, p_task_types text[], p_limit int)
RETURNS SETOF job_tasks
LANGUAGE plpgsql AS $$
DECLARE
    v_state text;
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

    -- A claim lost in a server crash only puts the task back to pending
    -- (the worker's later completion is then refused by the fence), so
    -- claims need not wait for the WAL flush. Completions do.
    PERFORM set_config('synchronous_commit', 'off', true);

    -- FOR SHARE on the claimer's registry row orders this claim against the
    -- drain step (which takes it FOR UPDATE). A claimer with no row (psql,
    -- a script, a replica the sweeper forgot) is registered first; if the
    -- drain is inserting a placeholder for it at this moment, the insert
    -- waits for the drain and the claimer then reads `draining`.
    SELECT w.state INTO v_state FROM workers w WHERE w.id = p_worker_id FOR SHARE;
    IF NOT FOUND THEN
        INSERT INTO workers (id, task_types, concurrency)
        VALUES (p_worker_id, p_task_types, p_limit)
        ON CONFLICT (id) DO NOTHING;
        SELECT w.state INTO v_state FROM workers w WHERE w.id = p_worker_id FOR SHARE;
    END IF;
    IF v_state IS DISTINCT FROM 'running' THEN
        RETURN;
    END IF;

    RETURN QUERY
    WITH candidates AS (
        -- One ordered index range per task type; the outer ORDER BY merges
        -- them. Highest priority first, then fair order across tenants
        -- (`fair_at`, see place_in_line below).
        SELECT c.id, c.priority, c.fair_at
        FROM unnest(p_task_types) AS tt(task_type)
        CROSS JOIN LATERAL (
            SELECT t.id, t.priority, t.fair_at
            FROM job_tasks t
            WHERE t.task_type = tt.task_type
              AND t.status = 'pending' AND t.waiting_on = 0
              AND t.run_at <= now()
            ORDER BY t.priority DESC, t.fair_at, t.id
            LIMIT p_limit
            FOR UPDATE SKIP LOCKED
        ) c
        ORDER BY c.priority DESC, c.fair_at, c.id
        LIMIT p_limit
    ), claimed AS (
        UPDATE job_tasks t
        SET status = 'claimed',
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
        -- A job someone else holds (a cancel, a retry) is left as it is
        -- rather than waited for: holding a task while waiting for its job
        -- is the opposite of the lock order. Its status catches up when the
        -- task finishes.
        UPDATE jobs j
        SET status = 'processing', started_at = coalesce(j.started_at, now()), updated_at = now()
        WHERE j.id IN (SELECT q.id FROM jobs q
                       WHERE q.id IN (SELECT job_id FROM claimed) AND q.status = 'queued'
                       ORDER BY q.id
                       FOR NO KEY UPDATE SKIP LOCKED)
    )
    SELECT * FROM claimed;
END
$$;

-- Complete a batch of held tasks. Returns the ids completed by this lease,
-- including ones an earlier call with the same lease already completed (so
-- a call repeated after a lost connection is answered truthfully); a task
-- not held under this lease is left alone and missing from the result.
-- The fence's parameter is now a claim, not an attempt.
DROP FUNCTION complete_tasks(text, bigint[], int[], jsonb[]);
CREATE FUNCTION complete_tasks(p_worker_id text, p_task_ids bigint[], p_claims int[], p_outputs jsonb[])
RETURNS TABLE (task_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_partial uuid[];
BEGIN
    PERFORM lock_jobs_of_tasks(p_task_ids);

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
    SELECT array_agg(p.id) INTO v_partial FROM progressed p WHERE p.status <> 'complete';

    -- Tasks still open: the job may be processing, or failed when the rest
    -- already finished badly. That takes the full derivation.
    IF v_partial IS NOT NULL THEN
        PERFORM refresh_job_status(v_partial);
    END IF;
    -- A fresh statement sees this call's completions and any earlier one's.
    -- Materialized, so the tasks are read by primary key: the partial index
    -- of completed tasks matches `status = 'complete'` too, and scanning it
    -- costs the whole history.
    RETURN QUERY
        WITH held AS MATERIALIZED (
            SELECT t.id, t.status, t.claimed_by, t.claims FROM job_tasks t WHERE t.id = ANY (p_task_ids)
        )
        SELECT h.id
        FROM held h
        JOIN unnest(p_task_ids, p_claims) AS i(id, claim) ON h.id = i.id
        WHERE h.status = 'complete' AND h.claimed_by = p_worker_id AND h.claims = i.claim;
END
$$;

-- Fail a held task: back to pending after a backoff while attempts remain
-- and the error is retryable, otherwise failed (and its dependents
-- cancelled). Returns the new status and run_at, or no row when the lease
-- is no longer held.
-- The fence's parameter is now a claim, not an attempt.
DROP FUNCTION fail_task(text, bigint, int, text, boolean, float8, float8);
CREATE FUNCTION fail_task(p_worker_id text, p_task_id bigint, p_claim int, p_error text,
                                     p_retryable boolean, p_backoff_base float8, p_backoff_cap float8)
RETURNS TABLE (status text, run_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_job uuid;
    v_status text;
    v_run_at timestamptz;
BEGIN
    PERFORM lock_jobs_of_tasks(ARRAY[p_task_id]);

    UPDATE job_tasks t
    SET status = CASE WHEN p_retryable AND t.attempts < t.max_attempts THEN 'pending' ELSE 'failed' END,
        run_at = CASE WHEN p_retryable AND t.attempts < t.max_attempts
                      THEN now() + retry_backoff(t.attempts, p_backoff_base, p_backoff_cap)
                      ELSE t.run_at END,
        fair_at = CASE WHEN p_retryable AND t.attempts < t.max_attempts
                       THEN greatest(t.fair_at, now() + retry_backoff_floor(t.attempts, p_backoff_base, p_backoff_cap))
                       ELSE t.fair_at END,
        finished_at = CASE WHEN p_retryable AND t.attempts < t.max_attempts THEN NULL ELSE now() END,
        last_error = p_error,
        claimed_by = NULL,
        claimed_at = NULL,
        heartbeat_at = NULL,
        updated_at = now()
    WHERE t.id = p_task_id
      AND t.claimed_by = p_worker_id
      AND t.claims = p_claim
      AND t.status IN ('claimed', 'processing')
    RETURNING t.job_id, t.status, t.run_at INTO v_job, v_status, v_run_at;

    IF v_job IS NULL THEN
        RETURN;
    END IF;
    IF v_status = 'failed' THEN
        PERFORM cancel_dependents(ARRAY[p_task_id]);
    END IF;
    PERFORM refresh_job_status(ARRAY[v_job]);
    RETURN QUERY SELECT v_status, v_run_at;
END
$$;

-- Renew the leases a worker holds; the first heartbeat also marks a claimed
-- task as processing. Returns the ids still held; anything missing was
-- cancelled or swept and must be abandoned. Like claims, heartbeats need not
-- wait for the WAL flush: losing one in a crash costs at most a re-run. No
-- job lock: the job's status does not tell claimed from processing.
-- The fence's parameter is now a claim, not an attempt.
DROP FUNCTION heartbeat_tasks(text, bigint[], int[]);
CREATE FUNCTION heartbeat_tasks(p_worker_id text, p_task_ids bigint[], p_claims int[])
RETURNS TABLE (task_id bigint)
LANGUAGE sql AS $$
    SELECT set_config('synchronous_commit', 'off', true);
    UPDATE job_tasks t
    SET heartbeat_at = now(), status = 'processing', updated_at = now()
    FROM unnest(p_task_ids, p_claims) AS i(id, claim)
    WHERE t.id = i.id
      AND t.claimed_by = p_worker_id
      AND t.claims = i.claim
      AND t.status IN ('claimed', 'processing')
    RETURNING t.id;
$$;

-- Hand held tasks back without counting the attempt (a worker shutting down
-- releases what it has not finished). The claim still counts, so the
-- released lease is dead for good. Returns the ids released.
-- The fence's parameter is now a claim, not an attempt.
DROP FUNCTION release_tasks(text, bigint[], int[]);
CREATE FUNCTION release_tasks(p_worker_id text, p_task_ids bigint[], p_claims int[])
RETURNS TABLE (task_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_ids bigint[];
    v_jobs uuid[];
BEGIN
    PERFORM lock_jobs_of_tasks(p_task_ids);

    WITH released AS (
        UPDATE job_tasks t
        SET status = 'pending',
            attempts = t.attempts - 1,
            run_at = now(),
            claimed_by = NULL,
            claimed_at = NULL,
            heartbeat_at = NULL,
            updated_at = now()
        FROM unnest(p_task_ids, p_claims) AS i(id, claim)
        WHERE t.id = i.id
          AND t.claimed_by = p_worker_id
          AND t.claims = i.claim
          AND t.status IN ('claimed', 'processing')
        RETURNING t.id, t.job_id
    )
    SELECT array_agg(id), array_agg(DISTINCT job_id) INTO v_ids, v_jobs FROM released;
    IF v_ids IS NOT NULL THEN
        PERFORM refresh_job_status(v_jobs);
    END IF;
    RETURN QUERY SELECT unnest(coalesce(v_ids, '{}'::bigint[]));
END
$$;

-- Rescue tasks whose worker stopped heartbeating or whose timeout passed:
-- back to pending with backoff, or failed once attempts are spent. Jobs
-- another sweeper or a completion holds are skipped until the next sweep.
-- The reason is client-visible (the task's last_error), so it names no
-- worker; the worker is returned for the operator's log.
DROP FUNCTION sweep_tasks(float8, float8, float8);
CREATE FUNCTION sweep_tasks(p_stale_seconds float8, p_backoff_base float8, p_backoff_cap float8)
RETURNS TABLE (task_id bigint, job_id uuid, status text, reason text, worker_id text)
LANGUAGE plpgsql AS $$
DECLARE
    v_jobs uuid[];
    v_ids bigint[];
    v_job_ids uuid[];
    v_statuses text[];
    v_reasons text[];
    v_workers text[];
    v_failed bigint[];
BEGIN
    SELECT array_agg(DISTINCT t.job_id) INTO v_jobs
    FROM job_tasks t
    WHERE t.status IN ('claimed', 'processing')
      AND (t.heartbeat_at < now() - make_interval(secs => p_stale_seconds)
           OR t.claimed_at + make_interval(secs => t.timeout_seconds) < now());
    IF v_jobs IS NULL THEN
        RETURN;
    END IF;

    SELECT array_agg(l.id) INTO v_jobs
    FROM (SELECT j.id FROM jobs j WHERE j.id = ANY (v_jobs) ORDER BY j.id
          FOR NO KEY UPDATE SKIP LOCKED) l;
    IF v_jobs IS NULL THEN
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
$$;

-- Re-derive the status of jobs that are not final though every task is:
-- the state the lock order above prevents. Returns the jobs it changed.
-- It reads every unfinished job (no index on status, which would make
-- each job's status change a non-HOT update), so it runs rarely.
CREATE FUNCTION repair_stuck_jobs() RETURNS TABLE (job_id uuid, status text)
LANGUAGE plpgsql AS $$
DECLARE
    v_jobs uuid[];
BEGIN
    SELECT array_agg(l.id) INTO v_jobs
    FROM (SELECT j.id FROM jobs j
          WHERE j.status IN ('queued', 'processing')
            AND NOT EXISTS (SELECT 1 FROM job_tasks t
                            WHERE t.job_id = j.id AND t.status IN ('pending', 'claimed', 'processing'))
          ORDER BY j.id
          FOR NO KEY UPDATE SKIP LOCKED) l;
    IF v_jobs IS NULL THEN
        RETURN;
    END IF;
    -- Under the locks, a fresh look: a job finished meanwhile is left alone.
    SELECT array_agg(j.id) INTO v_jobs
    FROM jobs j
    WHERE j.id = ANY (v_jobs) AND j.status IN ('queued', 'processing')
      AND NOT EXISTS (SELECT 1 FROM job_tasks t
                      WHERE t.job_id = j.id AND t.status IN ('pending', 'claimed', 'processing'));
    IF v_jobs IS NULL THEN
        RETURN;
    END IF;
    -- Counters too: the fast completion path trusts them.
    UPDATE jobs j
    SET tasks_complete = c.n
    FROM (SELECT t.job_id, count(*) FILTER (WHERE t.status = 'complete')::int AS n
          FROM job_tasks t WHERE t.job_id = ANY (v_jobs) GROUP BY t.job_id) c
    WHERE j.id = c.job_id AND j.tasks_complete <> c.n;
    PERFORM refresh_job_status(v_jobs);
    RETURN QUERY SELECT j.id, j.status FROM jobs j WHERE j.id = ANY (v_jobs) ORDER BY j.id;
END
$$;

-- The smallest UUIDv7 of a moment: retention finds jobs created before a
-- cutoff through the primary key, with the cutoff taken from the
-- database's clock rather than the calling host's.
CREATE FUNCTION uuid_v7_floor(p_at timestamptz) RETURNS uuid
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT (lpad(to_hex(greatest(floor(extract(epoch FROM p_at) * 1000), 0)::bigint), 12, '0')
            || '70008000000000000000')::uuid;
$$;

-- Fair order across tenants within a priority. Claims take the highest
-- priority first and, within it, the task whose place in line (`fair_at`)
-- comes first. A job's place is given at enqueue by its tenant's clock for
-- its first task type and priority: a tenant whose jobs wait in line
-- continues from its clock, a tenant with nothing waiting starts at the
-- head of the line, and each job moves the clock on by a small interval.
-- So a burst of 10,000 jobs from one tenant is interleaved one for one
-- with the jobs other tenants submit meanwhile, instead of holding the
-- type's workers until it is done; with one tenant the order is the
-- submission order, as before. A retried task's place is no earlier than
-- its run_at, so tasks in backoff sit behind the runnable ones in the
-- claim index.

-- Where each tenant's line has reached, per task type and priority.
CREATE TABLE tenant_clocks (
    tenant    text        NOT NULL,
    task_type text        NOT NULL,
    priority  integer     NOT NULL,
    fair_at   timestamptz NOT NULL,
    PRIMARY KEY (tenant, task_type, priority)
);

-- Places in line for a batch of jobs, in input order: per job its tenant,
-- first task type and priority. Run in its own short transaction before
-- the enqueue, so tenants' clocks are locked only for this statement (a
-- clock moved for an enqueue that then failed leaves a harmless gap).
CREATE FUNCTION place_in_line(p_tenants text[], p_task_types text[], p_priorities int[],
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
                  AND t.status = 'pending' AND t.waiting_on = 0
                ORDER BY t.fair_at LIMIT 1) AS head
        FROM unnest(p_tenants, p_task_types, p_priorities) AS i(tenant, task_type, priority)
        GROUP BY i.tenant, i.task_type, i.priority
        ORDER BY i.tenant, i.task_type, i.priority
    LOOP
        INSERT INTO tenant_clocks AS c (tenant, task_type, priority, fair_at)
        VALUES (v_line.tenant, v_line.task_type, v_line.priority,
                coalesce(v_line.head, now()) + v_line.n * v_step)
        ON CONFLICT (tenant, task_type, priority) DO UPDATE
        SET fair_at = CASE WHEN v_line.head IS NULL THEN now()
                           ELSE greatest(c.fair_at, v_line.head) END + v_line.n * v_step
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
