-- Finished jobs leave the hot tables (issue #16, first slice). `jobs` and
-- `job_tasks` now hold open jobs only: when a job finishes (complete,
-- failed or cancelled), it and all its tasks move, in the transaction
-- that finished it, into `job_history` and `task_history`. A job's tasks
-- stay beside it while it is open, however many of them have finished, so
-- every task change still reads and locks one place. Readers of finished
-- jobs go through the views `all_jobs` and `all_tasks`.
--
-- History is partitioned by the job's id, a UUIDv7, so by the day the job
-- was created: a job and its tasks share a partition, a lookup by job id
-- reads one, and retention drops a whole day instead of deleting its rows.
-- Maintenance creates each day's partitions days ahead. What this migration
-- moves goes into one partition of everything before today; the DEFAULT
-- partition only takes a job that finishes after its day was dropped (open
-- past the retention age), so it stays small, and creating a partition,
-- which scans DEFAULT under lock, stays quick. Retention deletes from those
-- two row by row, as before.
--
-- The tables are created LIKE the hot ones, so their columns come in the
-- same order: `SELECT *` from either side of the views, and the moves
-- below, rely on it. A column added to `jobs` or `job_tasks` must be added
-- to its history table and the view recreated.

CREATE TABLE job_history (LIKE jobs INCLUDING CONSTRAINTS INCLUDING DEFAULTS,
    CONSTRAINT job_history_finished CHECK (status IN ('complete', 'failed', 'cancelled')),
    PRIMARY KEY (id))
PARTITION BY RANGE (id);
CREATE INDEX job_history_tenant_id ON job_history (tenant, id DESC);

CREATE TABLE task_history (LIKE job_tasks INCLUDING CONSTRAINTS INCLUDING DEFAULTS,
    PRIMARY KEY (job_id, id))
PARTITION BY RANGE (job_id);
-- A repeated completion finds its task by id alone; the depth query counts
-- the last minute's completions.
CREATE INDEX task_history_id ON task_history (id);
CREATE INDEX task_history_completed ON task_history (finished_at, task_type) WHERE status = 'complete';

CREATE TABLE job_history_default PARTITION OF job_history DEFAULT;
CREATE TABLE task_history_default PARTITION OF task_history DEFAULT;

-- The day partitions of history from p_from for p_days days, those not
-- there yet. A day whose rows already went to the DEFAULT partition (no
-- partition existed when they finished) is skipped: attaching it would
-- have to move them; retention deletes them from DEFAULT instead.
CREATE FUNCTION create_history_partitions(p_from date, p_days int)
RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    v_day date;
    v_lo uuid;
    v_hi uuid;
    v_suffix text;
BEGIN
    FOR i IN 0 .. p_days - 1 LOOP
        v_day := p_from + i;
        v_suffix := to_char(v_day, 'YYYYMMDD');
        CONTINUE WHEN to_regclass('job_history_' || v_suffix) IS NOT NULL;
        v_lo := uuid_v7_floor(v_day::timestamp AT TIME ZONE 'UTC');
        v_hi := uuid_v7_floor((v_day + 1)::timestamp AT TIME ZONE 'UTC');
        CONTINUE WHEN EXISTS (SELECT 1 FROM job_history_default WHERE id >= v_lo AND id < v_hi)
                   OR EXISTS (SELECT 1 FROM task_history_default WHERE job_id >= v_lo AND job_id < v_hi);
        EXECUTE format('CREATE TABLE %I PARTITION OF job_history FOR VALUES FROM (%L) TO (%L)',
                       'job_history_' || v_suffix, v_lo, v_hi);
        EXECUTE format('CREATE TABLE %I PARTITION OF task_history FOR VALUES FROM (%L) TO (%L)',
                       'task_history_' || v_suffix, v_lo, v_hi);
        RETURN NEXT v_suffix;
    END LOOP;
END
$$;

CREATE VIEW all_jobs AS
    SELECT * FROM jobs UNION ALL SELECT * FROM job_history;
CREATE VIEW all_tasks AS
    SELECT * FROM job_tasks UNION ALL SELECT * FROM task_history;

-- Idempotency keys outlive the job's move: a table of their own, holding
-- (tenant, key) unique across open and finished jobs. Only keyed jobs pay
-- for it; the partial unique index on `jobs` goes.
CREATE TABLE job_keys (
    tenant text NOT NULL,
    idempotency_key text NOT NULL,
    job_id uuid NOT NULL,
    PRIMARY KEY (tenant, idempotency_key)
);
CREATE INDEX job_keys_job_id ON job_keys (job_id);
INSERT INTO job_keys (tenant, idempotency_key, job_id)
SELECT tenant, idempotency_key, id FROM jobs WHERE idempotency_key IS NOT NULL;
DROP INDEX jobs_tenant_idempotency_key;

-- An artifact's job and task move; retention deletes its record itself.
ALTER TABLE artifacts DROP CONSTRAINT artifacts_job_id_fkey;
ALTER TABLE artifacts DROP CONSTRAINT artifacts_task_id_fkey;

-- Move finished jobs, and all their tasks, into history. Called by every
-- function that can finish a job, after it did; a job still open (or not
-- in `jobs`) is left alone.
CREATE FUNCTION retire_jobs(p_job_ids uuid[])
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
$$;

-- Every failure, sweep, release and repair derives the job's status here:
-- a job it finishes moves to history at once.
CREATE OR REPLACE FUNCTION refresh_job_status(p_job_ids uuid[])
RETURNS void
LANGUAGE sql AS $$
    UPDATE jobs j
    SET status = s.status,
        error = CASE WHEN s.status = 'failed' THEN s.error ELSE NULL END,
        started_at = CASE WHEN s.status <> 'queued' THEN coalesce(j.started_at, now()) ELSE j.started_at END,
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
                   FILTER (WHERE t.status = 'failed') AS error
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

-- A failed job open again, for a retry: it and its tasks move back from
-- history as they are. Returns how many tasks moved.
CREATE FUNCTION reopen_job(p_job_id uuid)
RETURNS int
LANGUAGE sql AS $$
    WITH job AS (
        DELETE FROM job_history WHERE id = p_job_id RETURNING *
    ), reopened AS (
        INSERT INTO jobs SELECT * FROM job
    ), tasks AS (
        DELETE FROM task_history WHERE job_id = p_job_id RETURNING *
    ), moved AS (
        INSERT INTO job_tasks OVERRIDING SYSTEM VALUE SELECT * FROM tasks RETURNING 1
    )
    SELECT count(*)::int FROM moved;
$$;

CREATE OR REPLACE FUNCTION complete_and_claim_tasks(p_worker_id text, p_task_ids bigint[], p_claims int[],
                                                    p_outputs jsonb[], p_task_types text[], p_limit int)
RETURNS SETOF job_tasks
LANGUAGE plpgsql AS $$
DECLARE
    v_synchronous_commit text := current_setting('synchronous_commit');
    v_held job_tasks[];
    v_completed bigint[];
    v_missing bigint[];
    v_task job_tasks;
BEGIN
    -- The rows are read while they are still open: a completion that
    -- finishes its job moves them to history, where finding one by task id
    -- alone would probe every partition.
    v_held := ARRAY(SELECT t FROM job_tasks t WHERE t.id = ANY (p_task_ids));
    -- Jobs are locked before tasks here as everywhere (complete_tasks);
    -- the claim that follows takes its tasks and jobs SKIP LOCKED, so it
    -- never waits while holding them.
    SELECT coalesce(array_agg(c.task_id), '{}') INTO v_completed
    FROM complete_tasks(p_worker_id, p_task_ids, p_claims, p_outputs) c;
    FOREACH v_task IN ARRAY v_held LOOP
        CONTINUE WHEN NOT (v_task.id = ANY (v_completed));
        v_task.status := 'complete';
        v_task.output := NULL;
        v_task.finished_at := now();
        RETURN NEXT v_task;
    END LOOP;
    -- Completed by an earlier call whose answer was lost, and moved since.
    v_missing := ARRAY(SELECT c.id FROM unnest(v_completed) c(id)
                       WHERE NOT (c.id = ANY (ARRAY(SELECT (h).id FROM unnest(v_held) h))));
    IF cardinality(v_missing) > 0 THEN
        FOR v_task IN SELECT * FROM all_tasks t WHERE t.id = ANY (v_missing) LOOP
            v_task.output := NULL;
            RETURN NEXT v_task;
        END LOOP;
    END IF;
    RETURN QUERY SELECT * FROM take_tasks(p_worker_id, p_task_types, p_limit, 'processing');
    -- take_tasks turns synchronous commit off for the transaction (a lost
    -- claim is harmless); this transaction also commits completions, which
    -- must be flushed before the worker is told they are stored.
    PERFORM set_config('synchronous_commit', v_synchronous_commit, true);
END
$$;

CREATE OR REPLACE FUNCTION repair_stuck_jobs()
RETURNS TABLE (job_id uuid, status text)
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
    RETURN QUERY SELECT j.id, j.status FROM all_jobs j WHERE j.id = ANY (v_jobs) ORDER BY j.id;
END
$$;

-- Partitions first, so what moves lands in them: everything before today in
-- one, today and the days ahead one each.
CREATE TABLE job_history_before PARTITION OF job_history
    FOR VALUES FROM (MINVALUE) TO (uuid_v7_floor(current_date::timestamp AT TIME ZONE 'UTC'));
CREATE TABLE task_history_before PARTITION OF task_history
    FOR VALUES FROM (MINVALUE) TO (uuid_v7_floor(current_date::timestamp AT TIME ZONE 'UTC'));
SELECT create_history_partitions(current_date, 3);

-- What already finished moves now (retire_jobs' statement, over every
-- finished job rather than an array of them).
WITH gone AS (
    DELETE FROM jobs j WHERE j.status IN ('complete', 'failed', 'cancelled')
    RETURNING j.*
), kept AS (
    INSERT INTO job_history SELECT * FROM gone
), tasks AS (
    DELETE FROM job_tasks t WHERE t.job_id IN (SELECT id FROM gone)
    RETURNING t.*
)
INSERT INTO task_history SELECT * FROM tasks;
