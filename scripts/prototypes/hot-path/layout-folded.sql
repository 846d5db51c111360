-- Layout "folded": as layout "active" (open tasks in a narrow table deleted
-- when they finish; history written once into day partitions), but a job
-- with a single task has no row in `jobs` while it is open: its task row
-- carries what the job's view and history need (tenant, job type, input),
-- and the job's status is read off the task (claimed: processing). Only
-- jobs of several tasks keep a `jobs` row, for their counters. A drained
-- single-task job then writes five rows (task insert, claim update, task
-- delete, two history inserts) instead of layout "active"'s eight.

CREATE TABLE jobs (
    id             uuid PRIMARY KEY,
    tenant         text        NOT NULL,
    job_type       text        NOT NULL,
    status         text        NOT NULL DEFAULT 'queued',
    input          jsonb       NOT NULL,
    priority       integer     NOT NULL DEFAULT 0,
    error          text,
    tasks_total    integer     NOT NULL,
    tasks_complete integer     NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    started_at     timestamptz
) WITH (fillfactor = 50);
CREATE INDEX jobs_tenant_id ON jobs (tenant, id DESC);

CREATE TABLE active_tasks (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id          uuid        NOT NULL,
    tenant          text        NOT NULL,
    -- Set only on a job's single task (the job has no `jobs` row); NULL
    -- when the job's row in `jobs` holds them.
    job_type        text,
    job_input       jsonb,
    task_type       text        NOT NULL,
    dependencies    text[]      NOT NULL DEFAULT '{}',
    waiting_on      integer     NOT NULL DEFAULT 0,
    has_dependents  boolean     NOT NULL DEFAULT false,
    priority        integer     NOT NULL DEFAULT 0,
    fair_at         timestamptz NOT NULL DEFAULT now(),
    run_at          timestamptz NOT NULL DEFAULT now(),
    attempts        integer     NOT NULL DEFAULT 0,
    max_attempts    integer     NOT NULL DEFAULT 5,
    timeout_seconds integer     NOT NULL DEFAULT 300,
    claimed_by      text,
    claimed_at      timestamptz,
    heartbeat_at    timestamptz,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 50);
CREATE INDEX active_tasks_runnable ON active_tasks (task_type, priority DESC, fair_at, id)
    WHERE claimed_by IS NULL AND waiting_on = 0;
-- A job's tasks (the API's view of an open job) and its tenant's open jobs.
CREATE INDEX active_tasks_job ON active_tasks (job_id);
CREATE INDEX active_tasks_tenant_job ON active_tasks (tenant, job_id DESC) WHERE job_input IS NOT NULL;

\ir history.sql

CREATE FUNCTION enqueue_text_jobs(p_count int) RETURNS void LANGUAGE sql AS $$
    INSERT INTO active_tasks (job_id, tenant, job_type, job_input, task_type)
    SELECT proto_uuid(), 'tenant-' || (g % 10), 'text', '{"prompt": "a short story"}', 'text_generation'
    FROM generate_series(1, p_count) g;
$$;

-- A job of several tasks keeps its row in `jobs`, as in layout "active".
CREATE FUNCTION enqueue_reading_jobs(p_count int) RETURNS void LANGUAGE sql AS $$
    WITH j AS (
        INSERT INTO jobs (id, tenant, job_type, input, tasks_total)
        SELECT proto_uuid(), 'tenant-' || (g % 10), 'reading', '{"prompt": "a short story"}', 3
        FROM generate_series(1, p_count) g
        RETURNING id, tenant
    )
    INSERT INTO active_tasks (job_id, tenant, task_type, dependencies, waiting_on, has_dependents)
    SELECT j.id, j.tenant, r.task_type, r.dependencies, cardinality(r.dependencies), r.has_dependents
    FROM j CROSS JOIN reading_tasks() r;
$$;

CREATE FUNCTION claim(p_worker text, p_types text[], p_limit int)
RETURNS TABLE (id bigint, attempts int) LANGUAGE plpgsql AS $$
DECLARE
    v_ids bigint[];
    v_attempts int[];
    v_jobs uuid[];
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    v_ids := ARRAY(
        SELECT c.id
        FROM unnest(p_types) AS tt(task_type)
        CROSS JOIN LATERAL (
            SELECT t.id, t.priority, t.fair_at FROM active_tasks t
            WHERE t.task_type = tt.task_type AND t.claimed_by IS NULL AND t.waiting_on = 0
              AND t.run_at <= now()
            ORDER BY t.priority DESC, t.fair_at, t.id
            LIMIT p_limit FOR UPDATE SKIP LOCKED
        ) c
        ORDER BY c.priority DESC, c.fair_at, c.id
        LIMIT p_limit);
    WITH u AS (
        UPDATE active_tasks t
        SET claimed_by = p_worker, claimed_at = now(), heartbeat_at = now(), attempts = t.attempts + 1
        WHERE t.id = ANY (v_ids)
        RETURNING t.id, t.attempts, t.job_id, t.job_input IS NULL AS has_job_row
    )
    SELECT array_agg(u.id), array_agg(u.attempts), array_agg(u.job_id) FILTER (WHERE u.has_job_row)
    INTO v_ids, v_attempts, v_jobs FROM u;
    -- A single-task job is processing because its task is claimed; only
    -- jobs with a row of their own are marked.
    IF v_jobs IS NOT NULL THEN
        UPDATE jobs j SET status = 'processing', started_at = now(), updated_at = now()
        WHERE j.id = ANY (ARRAY(SELECT q.id FROM jobs q WHERE q.id = ANY (v_jobs) AND q.status = 'queued'
                                ORDER BY q.id FOR NO KEY UPDATE SKIP LOCKED));
    END IF;
    RETURN QUERY SELECT * FROM unnest(v_ids, v_attempts);
END
$$;

CREATE FUNCTION complete(p_worker text, p_ids bigint[], p_attempts int[], p_outputs jsonb[])
RETURNS int LANGUAGE plpgsql AS $$
DECLARE
    v_count int;
    v_jobs uuid[];
    v_dep_jobs uuid[];
    v_dep_types text[];
BEGIN
    -- Jobs with a row first, in id order, as in layout "active"; a
    -- single-task job's only lock is its task's.
    PERFORM 1 FROM jobs j
    WHERE j.id = ANY (ARRAY(SELECT t.job_id FROM active_tasks t
                            WHERE t.id = ANY (p_ids) AND t.job_input IS NULL))
    ORDER BY j.id FOR NO KEY UPDATE;

    WITH done AS (
        DELETE FROM active_tasks t
        USING unnest(p_ids, p_attempts, p_outputs) AS i(id, attempt, output)
        WHERE t.id = i.id AND t.claimed_by = p_worker AND t.attempts = i.attempt
        RETURNING t.*, i.output
    ), history AS (
        INSERT INTO task_history (id, job_id, task_type, status, attempts, claimed_by, output,
                                  created_at, claimed_at, finished_at)
        SELECT id, job_id, task_type, 'complete', attempts, claimed_by, output, created_at, claimed_at, now()
        FROM done
    ), single AS (
        INSERT INTO job_history (id, tenant, job_type, status, input, priority, created_at, started_at, finished_at)
        SELECT job_id, tenant, job_type, 'complete', job_input, priority, created_at, claimed_at, now()
        FROM done WHERE job_input IS NOT NULL
    )
    SELECT count(*)::int,
           array_agg(job_id) FILTER (WHERE job_input IS NULL),
           array_agg(job_id) FILTER (WHERE has_dependents),
           array_agg(task_type) FILTER (WHERE has_dependents)
    INTO v_count, v_jobs, v_dep_jobs, v_dep_types
    FROM done;
    IF v_jobs IS NULL THEN
        RETURN v_count;
    END IF;

    IF v_dep_jobs IS NOT NULL THEN
        UPDATE active_tasks d SET waiting_on = d.waiting_on - n.c, run_at = greatest(d.run_at, now())
        FROM (SELECT d2.id, count(*)::int AS c FROM unnest(v_dep_jobs, v_dep_types) AS x(job_id, task_type)
              JOIN active_tasks d2 ON d2.job_id = x.job_id AND x.task_type = ANY (d2.dependencies)
              GROUP BY d2.id) n
        WHERE d.id = n.id;
    END IF;

    WITH per_job AS (
        SELECT job_id, count(*)::int AS n FROM unnest(v_jobs) AS x(job_id) GROUP BY job_id
    ), finished AS (
        DELETE FROM jobs j USING per_job p
        WHERE j.id = p.job_id AND j.tasks_complete + p.n >= j.tasks_total
        RETURNING j.*
    ), moved AS (
        INSERT INTO job_history (id, tenant, job_type, status, input, priority, created_at, started_at, finished_at)
        SELECT id, tenant, job_type, 'complete', input, priority, created_at, started_at, now() FROM finished
    )
    UPDATE jobs j SET tasks_complete = j.tasks_complete + p.n, updated_at = now()
    FROM per_job p
    WHERE j.id = p.job_id AND j.tasks_complete + p.n < j.tasks_total;
    RETURN v_count;
END
$$;

-- Empty the queue between rounds; with p_keep_history, only what the last
-- round added (fill_history's rows are from earlier days).
CREATE FUNCTION proto_reset(p_keep_history boolean) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF p_keep_history THEN
        TRUNCATE jobs, active_tasks;
        PERFORM truncate_recent_history();
    ELSE
        TRUNCATE jobs, active_tasks, task_history, job_history;
    END IF;
END
$$;
CREATE FUNCTION proto_open_tasks() RETURNS bigint LANGUAGE sql AS $$ SELECT count(*) FROM active_tasks $$;

-- Wake-ups as in layout "active". A single-task job's status changes with
-- its task's row, so its watchers are notified from there.
CREATE FUNCTION notify_inserted_runnable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('backlog_task_runnable', r.task_type)
    FROM (SELECT DISTINCT task_type FROM inserted WHERE waiting_on = 0 AND run_at <= now()) r;
    RETURN NULL;
END
$$;
CREATE TRIGGER notify_runnable AFTER INSERT ON active_tasks
    REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT EXECUTE FUNCTION notify_inserted_runnable();

CREATE UNLOGGED TABLE job_watches (job_id uuid NOT NULL, stream uuid NOT NULL, PRIMARY KEY (job_id, stream));
CREATE FUNCTION notify_job_status() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM job_watches) THEN
        PERFORM pg_notify('backlog_job_status', c.id::text)
        FROM (SELECT DISTINCT o.job_id AS id FROM changed o JOIN job_watches w ON w.job_id = o.job_id) c;
    END IF;
    RETURN NULL;
END
$$;
CREATE FUNCTION notify_job_row_status() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM job_watches) THEN
        PERFORM pg_notify('backlog_job_status', c.id::text)
        FROM (SELECT DISTINCT o.id FROM changed o JOIN job_watches w ON w.job_id = o.id) c;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_status_changed AFTER UPDATE ON jobs
    REFERENCING OLD TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION notify_job_row_status();
CREATE TRIGGER jobs_finished AFTER DELETE ON jobs
    REFERENCING OLD TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION notify_job_row_status();
CREATE TRIGGER single_task_jobs_claimed AFTER UPDATE ON active_tasks
    REFERENCING OLD TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION notify_job_status();
CREATE TRIGGER single_task_jobs_finished AFTER DELETE ON active_tasks
    REFERENCING OLD TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION notify_job_status();
