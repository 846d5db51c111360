-- backlog's schema: jobs, their task DAG, artifacts and the worker registry.
-- Statuses are text with CHECK constraints (not enums) so that adding one is
-- a cheap migration.

CREATE TABLE jobs (
    id              uuid PRIMARY KEY,
    tenant          text        NOT NULL CHECK (tenant <> ''),
    job_type        text        NOT NULL CHECK (job_type IN ('reading', 'text', 'pdf', 'audiobook')),
    status          text        NOT NULL DEFAULT 'queued'
                    CHECK (status IN ('queued', 'processing', 'complete', 'failed', 'cancelled')),
    input           jsonb       NOT NULL,
    priority        integer     NOT NULL DEFAULT 0,
    idempotency_key text,
    error           text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz
) WITH (fillfactor = 90);
-- fillfactor leaves room on each page so status updates are HOT: no index
-- column changes when a job starts or finishes, so no index is touched.

-- Only keyed jobs are deduplicated; unkeyed ones cost this index nothing.
CREATE UNIQUE INDEX jobs_tenant_idempotency_key ON jobs (tenant, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Tenant listings, newest first (ids are UUIDv7, so id order is time order).
CREATE INDEX jobs_tenant_id ON jobs (tenant, id DESC);
-- Retention finds old jobs through the primary key: UUIDv7 ids sort by
-- creation time, so no index on finished_at is needed (one would make
-- every job completion a non-HOT update).

CREATE TABLE job_tasks (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id          uuid        NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    task_type       text        NOT NULL
                    CHECK (task_type IN ('text_generation', 'pdf_generation', 'audio_generation')),
    status          text        NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'claimed', 'processing', 'complete', 'failed', 'cancelled')),
    -- Task types of the same job that must complete first.
    dependencies    text[]      NOT NULL DEFAULT '{}',
    -- How many of those are not complete yet; runnable only at zero.
    waiting_on      integer     NOT NULL DEFAULT 0 CHECK (waiting_on >= 0),
    priority        integer     NOT NULL DEFAULT 0,
    attempts        integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts    integer     NOT NULL DEFAULT 5 CHECK (max_attempts >= 1),
    run_at          timestamptz NOT NULL DEFAULT now(),
    timeout_seconds integer     NOT NULL DEFAULT 300 CHECK (timeout_seconds > 0),
    claimed_by      text,
    claimed_at      timestamptz,
    heartbeat_at    timestamptz,
    last_error      text,
    output          jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    CONSTRAINT job_tasks_one_per_type UNIQUE (job_id, task_type)
);

-- The claim index: only runnable rows, in claim order.
CREATE INDEX job_tasks_runnable ON job_tasks (task_type, priority DESC, run_at, id)
    WHERE status = 'pending' AND waiting_on = 0;
-- Depth stats and lease sweeps read only unfinished rows, so their cost
-- follows the active set and never the history.
CREATE INDEX job_tasks_active ON job_tasks (task_type, status, waiting_on, run_at)
    WHERE status IN ('pending', 'claimed', 'processing');
-- Throughput: completions in a recent window.
CREATE INDEX job_tasks_completed ON job_tasks (finished_at, task_type)
    WHERE status = 'complete';

CREATE TABLE artifacts (
    id           uuid PRIMARY KEY,
    job_id       uuid        NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    task_id      bigint      NOT NULL REFERENCES job_tasks (id) ON DELETE CASCADE,
    kind         text        NOT NULL CHECK (kind IN ('text', 'pdf', 'audio')),
    content_type text        NOT NULL,
    storage_key  text        NOT NULL,
    bytes        bigint      NOT NULL CHECK (bytes >= 0),
    sha256       text        NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    metadata     jsonb       NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- A re-run overwrites, so a job never has two artifacts of one kind.
    CONSTRAINT artifacts_one_per_kind UNIQUE (job_id, kind)
);

CREATE TABLE workers (
    id           text PRIMARY KEY,
    pool         text,
    task_types   text[]      NOT NULL,
    concurrency  integer     NOT NULL CHECK (concurrency >= 1),
    state        text        NOT NULL DEFAULT 'running'
                 CHECK (state IN ('running', 'draining', 'stopped')),
    hostname     text,
    pid          integer,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);

-- Finished jobs moved out of the hot tables by retention in archive mode.
CREATE TABLE jobs_archive (
    id          uuid PRIMARY KEY,
    tenant      text        NOT NULL,
    job_type    text        NOT NULL,
    status      text        NOT NULL,
    finished_at timestamptz,
    archived_at timestamptz NOT NULL DEFAULT now(),
    job         jsonb       NOT NULL,
    tasks       jsonb       NOT NULL,
    artifacts   jsonb       NOT NULL
);

-- Wake workers and the controller when tasks become runnable, on the
-- channel backlog_task_runnable with the task type as payload. Inserts
-- notify once per statement and type (a batch of 1,000 jobs sends at most
-- three messages); updates notify per row, but only rows that just became
-- runnable reach the function, so claims and completions cost nothing.
CREATE FUNCTION notify_inserted_runnable() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('backlog_task_runnable', r.task_type)
    FROM (SELECT DISTINCT task_type FROM inserted_tasks
          WHERE status = 'pending' AND waiting_on = 0 AND run_at <= now()) r;
    RETURN NULL;
END
$$;

CREATE FUNCTION notify_task_runnable() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('backlog_task_runnable', NEW.task_type);
    RETURN NULL;
END
$$;

CREATE TRIGGER job_tasks_runnable_insert
    AFTER INSERT ON job_tasks
    REFERENCING NEW TABLE AS inserted_tasks
    FOR EACH STATEMENT
    EXECUTE FUNCTION notify_inserted_runnable();

CREATE TRIGGER job_tasks_runnable_update
    AFTER UPDATE OF status, waiting_on, run_at ON job_tasks
    FOR EACH ROW
    WHEN (NEW.status = 'pending' AND NEW.waiting_on = 0 AND NEW.run_at <= now()
          AND (OLD.status <> 'pending' OR OLD.waiting_on <> 0 OR OLD.run_at > now()))
    EXECUTE FUNCTION notify_task_runnable();

-- A job's status follows its tasks. Called in the same transaction as every
-- task change. A cancelled job stays cancelled. Jobs are updated in id order
-- so that concurrent batches touching the same jobs rarely deadlock; the
-- queue library retries the rare deadlock PostgreSQL reports.
CREATE FUNCTION refresh_job_status(p_job_ids uuid[]) RETURNS void
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
$$;

-- Claim up to p_limit runnable tasks of the given types for a worker, highest
-- priority first, then oldest. A worker the controller marked draining claims
-- nothing: FOR SHARE on its registry row orders this claim against the
-- controller's drain (which takes the row FOR UPDATE), so a replica is never
-- handed work after it was chosen for removal. Unregistered callers (psql,
-- scripts) may claim too.
CREATE FUNCTION claim_tasks(p_worker_id text, p_task_types text[], p_limit int)
RETURNS SETOF job_tasks
LANGUAGE plpgsql AS $$
DECLARE
    v_state text;
BEGIN
    IF p_worker_id IS NULL OR p_worker_id = '' THEN
        RAISE EXCEPTION 'claim_tasks: p_worker_id must not be empty' USING ERRCODE = '22023';
    END IF;
    IF p_limit IS NULL OR p_limit < 1 THEN
        RAISE EXCEPTION 'claim_tasks: p_limit must be at least 1, got %', p_limit USING ERRCODE = '22023';
    END IF;

    -- A claim lost in a server crash only puts the task back to pending
    -- (the worker's later completion is then refused by the fence), so
    -- claims need not wait for the WAL flush. Completions do.
    PERFORM set_config('synchronous_commit', 'off', true);

    SELECT w.state INTO v_state FROM workers w WHERE w.id = p_worker_id FOR SHARE;
    IF v_state IS NOT NULL AND v_state <> 'running' THEN
        RETURN;
    END IF;

    RETURN QUERY
    WITH candidates AS (
        -- One ordered index range per task type; the outer ORDER BY merges them.
        SELECT c.id, c.priority, c.run_at
        FROM unnest(p_task_types) AS tt(task_type)
        CROSS JOIN LATERAL (
            SELECT t.id, t.priority, t.run_at
            FROM job_tasks t
            WHERE t.task_type = tt.task_type
              AND t.status = 'pending' AND t.waiting_on = 0
              AND t.run_at <= now()
            ORDER BY t.priority DESC, t.run_at, t.id
            LIMIT p_limit
            FOR UPDATE SKIP LOCKED
        ) c
        ORDER BY c.priority DESC, c.run_at, c.id
        LIMIT p_limit
    ), claimed AS (
        UPDATE job_tasks t
        SET status = 'claimed',
            claimed_by = p_worker_id,
            claimed_at = now(),
            heartbeat_at = now(),
            attempts = t.attempts + 1,
            updated_at = now()
        FROM candidates c
        WHERE t.id = c.id
        RETURNING t.*
    ), started AS (
        UPDATE jobs j
        SET status = 'processing', started_at = coalesce(j.started_at, now()), updated_at = now()
        WHERE j.id IN (SELECT job_id FROM claimed) AND j.status = 'queued'
    )
    SELECT * FROM claimed;
END
$$;
