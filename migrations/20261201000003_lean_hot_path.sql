-- A leaner claim → complete path, from profiles of the no-op drain.
--
-- 1. Job-status notifications only for jobs someone watches. Every NOTIFY
--    makes its transaction take one cluster-wide lock at commit and hold it
--    through the WAL flush, so notifying each status change serialised all
--    completions behind each other. Event streams now register the job they
--    follow in job_watches (unlogged: after a crash the listeners reconnect,
--    resync and register again), and the trigger notifies only those jobs.
-- 2. A job whose last task completes is complete without re-reading all its
--    tasks: jobs count their tasks and completed tasks. Only partial
--    progress (a reading job's first tasks) still runs refresh_job_status.
--    complete_tasks is the only place a task becomes complete, fenced so it
--    happens once, and a retried job resets only failed and cancelled
--    tasks, so the count stays exact.
-- 3. Only tasks that others depend on look for dependents to unblock.

CREATE UNLOGGED TABLE job_watches (
    job_id     uuid        NOT NULL,
    -- One event stream; a job may have several.
    stream     uuid        NOT NULL,
    -- Streams renew their row; a row whose API process died expires and the
    -- sweeper removes it. Until then it only costs a spare notification.
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (job_id, stream)
);
CREATE INDEX job_watches_expires_at ON job_watches (expires_at);

CREATE OR REPLACE FUNCTION notify_job_status() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM job_watches w WHERE w.job_id = NEW.id) THEN
        PERFORM pg_notify('backlog_job_status', NEW.id::text);
    END IF;
    RETURN NULL;
END
$$;

ALTER TABLE jobs
    ADD COLUMN tasks_total    integer NOT NULL DEFAULT 0 CHECK (tasks_total >= 0),
    ADD COLUMN tasks_complete integer NOT NULL DEFAULT 0 CHECK (tasks_complete >= 0);
UPDATE jobs j
SET tasks_total = c.total, tasks_complete = c.complete
FROM (SELECT job_id, count(*)::int AS total, (count(*) FILTER (WHERE status = 'complete'))::int AS complete
      FROM job_tasks GROUP BY job_id) c
WHERE j.id = c.job_id;

ALTER TABLE job_tasks ADD COLUMN has_dependents boolean NOT NULL DEFAULT false;
UPDATE job_tasks t
SET has_dependents = true
WHERE EXISTS (SELECT 1 FROM job_tasks d WHERE d.job_id = t.job_id AND t.task_type = ANY (d.dependencies));

CREATE OR REPLACE FUNCTION complete_tasks(p_worker_id text, p_task_ids bigint[], p_attempts int[], p_outputs jsonb[])
RETURNS TABLE (task_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_ids bigint[];
    v_partial uuid[];
BEGIN
    WITH done AS (
        UPDATE job_tasks t
        SET status = 'complete',
            output = i.output,
            finished_at = now(),
            updated_at = now(),
            heartbeat_at = now()
        FROM unnest(p_task_ids, p_attempts, p_outputs) AS i(id, attempt, output)
        WHERE t.id = i.id
          AND t.claimed_by = p_worker_id
          AND t.attempts = i.attempt
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
        -- Jobs in id order, like refresh_job_status, so that concurrent
        -- batches rarely deadlock.
        UPDATE jobs j
        SET tasks_complete = j.tasks_complete + d.n,
            status = CASE WHEN j.tasks_complete + d.n >= j.tasks_total THEN 'complete' ELSE j.status END,
            error = CASE WHEN j.tasks_complete + d.n >= j.tasks_total THEN NULL ELSE j.error END,
            started_at = coalesce(j.started_at, now()),
            finished_at = CASE WHEN j.tasks_complete + d.n >= j.tasks_total
                               THEN coalesce(j.finished_at, now()) ELSE j.finished_at END,
            updated_at = now()
        FROM (SELECT done.job_id, count(*)::int AS n FROM done GROUP BY done.job_id ORDER BY done.job_id) d
        WHERE j.id = d.job_id AND j.status <> 'cancelled'
        RETURNING j.id, j.status
    )
    SELECT (SELECT array_agg(done.id) FROM done),
           (SELECT array_agg(p.id) FROM progressed p WHERE p.status <> 'complete')
    INTO v_ids, v_partial;

    -- Tasks still open: the job may be processing, or failed when the rest
    -- already finished badly. That takes the full derivation.
    IF v_partial IS NOT NULL THEN
        PERFORM refresh_job_status(v_partial);
    END IF;
    RETURN QUERY SELECT unnest(coalesce(v_ids, '{}'::bigint[]));
END
$$;
