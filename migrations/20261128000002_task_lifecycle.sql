-- The task lifecycle as functions, so each hot-path operation is one round
-- trip and one transaction. All of them are fenced: they only touch a task
-- held by the given worker at the given attempt.

-- Capped exponential backoff with "equal jitter": half the delay is fixed and
-- half random, so retries spread out yet each delay is at least as long as
-- the previous one's minimum.
CREATE FUNCTION retry_backoff(p_attempt int, p_base_seconds float8, p_cap_seconds float8)
RETURNS interval
LANGUAGE sql VOLATILE AS $$
    SELECT make_interval(secs => d / 2 + random() * d / 2)
    FROM (SELECT least(p_cap_seconds, p_base_seconds * power(2, greatest(p_attempt, 1) - 1)) AS d) s;
$$;

-- Cancel the pending tasks that can no longer run because a task they
-- depend on (directly or not) failed.
CREATE FUNCTION cancel_dependents(p_task_ids bigint[]) RETURNS void
LANGUAGE sql AS $$
    WITH RECURSIVE blocked (id, job_id, task_type) AS (
        SELECT d.id, d.job_id, d.task_type
        FROM job_tasks f
        JOIN job_tasks d ON d.job_id = f.job_id AND f.task_type = ANY (d.dependencies)
        WHERE f.id = ANY (p_task_ids)
        UNION
        SELECT d.id, d.job_id, d.task_type
        FROM blocked b
        JOIN job_tasks d ON d.job_id = b.job_id AND b.task_type = ANY (d.dependencies)
    )
    UPDATE job_tasks t
    SET status = 'cancelled',
        last_error = 'not run: a task it depends on failed',
        finished_at = now(),
        updated_at = now()
    FROM blocked b
    WHERE t.id = b.id AND t.status = 'pending';
$$;

-- Complete a batch of held tasks. Returns the ids that were completed; a
-- task not held by this worker at this attempt (swept, re-claimed,
-- cancelled) is left alone and missing from the result.
CREATE FUNCTION complete_tasks(p_worker_id text, p_task_ids bigint[], p_attempts int[], p_outputs jsonb[])
RETURNS TABLE (task_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_ids bigint[];
    v_jobs uuid[];
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
        RETURNING t.id, t.job_id, t.task_type
    ), unblocked AS (
        UPDATE job_tasks d
        SET waiting_on = d.waiting_on - n.done_count,
            run_at = greatest(d.run_at, now()),
            updated_at = now()
        FROM (
            SELECT d2.id, count(*)::int AS done_count
            FROM done
            JOIN job_tasks d2 ON d2.job_id = done.job_id AND done.task_type = ANY (d2.dependencies)
            WHERE d2.status = 'pending'
            GROUP BY d2.id
        ) n
        WHERE d.id = n.id
    )
    SELECT array_agg(done.id), array_agg(DISTINCT done.job_id) INTO v_ids, v_jobs FROM done;

    IF v_ids IS NOT NULL THEN
        PERFORM refresh_job_status(v_jobs);
    END IF;
    RETURN QUERY SELECT unnest(coalesce(v_ids, '{}'::bigint[]));
END
$$;

-- Fail a held task: back to pending after a backoff while attempts remain
-- and the error is retryable, otherwise failed (and its dependents
-- cancelled). Returns the new status and run_at, or no row when the lease
-- is no longer held.
CREATE FUNCTION fail_task(p_worker_id text, p_task_id bigint, p_attempt int, p_error text,
                          p_retryable boolean, p_backoff_base float8, p_backoff_cap float8)
RETURNS TABLE (status text, run_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_job uuid;
    v_status text;
    v_run_at timestamptz;
BEGIN
    UPDATE job_tasks t
    SET status = CASE WHEN p_retryable AND t.attempts < t.max_attempts THEN 'pending' ELSE 'failed' END,
        run_at = CASE WHEN p_retryable AND t.attempts < t.max_attempts
                      THEN now() + retry_backoff(t.attempts, p_backoff_base, p_backoff_cap)
                      ELSE t.run_at END,
        finished_at = CASE WHEN p_retryable AND t.attempts < t.max_attempts THEN NULL ELSE now() END,
        last_error = p_error,
        claimed_by = NULL,
        claimed_at = NULL,
        heartbeat_at = NULL,
        updated_at = now()
    WHERE t.id = p_task_id
      AND t.claimed_by = p_worker_id
      AND t.attempts = p_attempt
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
-- wait for the WAL flush: losing one in a crash costs at most a re-run.
CREATE FUNCTION heartbeat_tasks(p_worker_id text, p_task_ids bigint[], p_attempts int[])
RETURNS TABLE (task_id bigint)
LANGUAGE sql AS $$
    SELECT set_config('synchronous_commit', 'off', true);
    UPDATE job_tasks t
    SET heartbeat_at = now(), status = 'processing', updated_at = now()
    FROM unnest(p_task_ids, p_attempts) AS i(id, attempt)
    WHERE t.id = i.id
      AND t.claimed_by = p_worker_id
      AND t.attempts = i.attempt
      AND t.status IN ('claimed', 'processing')
    RETURNING t.id;
$$;

-- Hand held tasks back without counting the attempt (a worker shutting down
-- releases what it has not finished). Returns the ids released.
CREATE FUNCTION release_tasks(p_worker_id text, p_task_ids bigint[], p_attempts int[])
RETURNS TABLE (task_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_ids bigint[];
    v_jobs uuid[];
BEGIN
    WITH released AS (
        UPDATE job_tasks t
        SET status = 'pending',
            attempts = t.attempts - 1,
            run_at = now(),
            claimed_by = NULL,
            claimed_at = NULL,
            heartbeat_at = NULL,
            updated_at = now()
        FROM unnest(p_task_ids, p_attempts) AS i(id, attempt)
        WHERE t.id = i.id
          AND t.claimed_by = p_worker_id
          AND t.attempts = i.attempt
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
-- back to pending with backoff, or failed once attempts are spent. Rows
-- another sweeper is handling are skipped, and the status is re-checked
-- under the row lock, so concurrent sweeps never act twice on one task.
CREATE FUNCTION sweep_tasks(p_stale_seconds float8, p_backoff_base float8, p_backoff_cap float8)
RETURNS TABLE (task_id bigint, job_id uuid, status text, reason text)
LANGUAGE plpgsql AS $$
DECLARE
    v_failed bigint[];
    v_jobs uuid[];
BEGIN
    CREATE TEMP TABLE IF NOT EXISTS swept_tasks (
        task_id bigint, job_id uuid, status text, reason text
    ) ON COMMIT DROP;
    TRUNCATE swept_tasks;

    WITH expired AS (
        SELECT t.id,
               CASE WHEN t.claimed_at + make_interval(secs => t.timeout_seconds) < now()
                    THEN format('timed out after %s s (attempt %s on %s)', t.timeout_seconds, t.attempts, t.claimed_by)
                    ELSE format('lease expired: worker %s stopped heartbeating (attempt %s)', t.claimed_by, t.attempts)
               END AS reason
        FROM job_tasks t
        WHERE t.status IN ('claimed', 'processing')
          AND (t.heartbeat_at < now() - make_interval(secs => p_stale_seconds)
               OR t.claimed_at + make_interval(secs => t.timeout_seconds) < now())
        FOR UPDATE SKIP LOCKED
    ), swept AS (
        UPDATE job_tasks t
        SET status = CASE WHEN t.attempts < t.max_attempts THEN 'pending' ELSE 'failed' END,
            run_at = CASE WHEN t.attempts < t.max_attempts
                          THEN now() + retry_backoff(t.attempts, p_backoff_base, p_backoff_cap)
                          ELSE t.run_at END,
            finished_at = CASE WHEN t.attempts < t.max_attempts THEN NULL ELSE now() END,
            last_error = e.reason,
            claimed_by = NULL,
            claimed_at = NULL,
            heartbeat_at = NULL,
            updated_at = now()
        FROM expired e
        WHERE t.id = e.id
        RETURNING t.id, t.job_id, t.status, e.reason
    )
    INSERT INTO swept_tasks SELECT * FROM swept;

    SELECT array_agg(s.task_id) FILTER (WHERE s.status = 'failed'), array_agg(DISTINCT s.job_id)
    INTO v_failed, v_jobs FROM swept_tasks s;
    IF v_failed IS NOT NULL THEN
        PERFORM cancel_dependents(v_failed);
    END IF;
    IF v_jobs IS NOT NULL THEN
        PERFORM refresh_job_status(v_jobs);
    END IF;
    RETURN QUERY SELECT * FROM swept_tasks;
END
$$;
