-- A failed attempt may say how long to wait before the next one (a
-- provider's Retry-After that was longer than a worker waits in place).
-- The retry runs no earlier than that, even when the backoff is shorter:
-- with the backoff alone (2 s base), a task refused by a provider asking
-- for two minutes used up its attempts in about 30 s and failed for good.
-- NULL keeps the backoff alone, so callers of the old signature keep
-- working.
DROP FUNCTION fail_task(text, bigint, int, text, boolean, float8, float8);
CREATE FUNCTION fail_task(p_worker_id text, p_task_id bigint, p_claim int, p_error text,
                          p_retryable boolean, p_backoff_base float8, p_backoff_cap float8,
                          p_retry_after float8 DEFAULT NULL)
RETURNS TABLE (status text, run_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_job uuid;
    v_status text;
    v_run_at timestamptz;
    v_asked interval := make_interval(secs => greatest(coalesce(p_retry_after, 0), 0));
BEGIN
    PERFORM lock_jobs_of_tasks(ARRAY[p_task_id]);

    UPDATE job_tasks t
    SET status = CASE WHEN p_retryable AND t.attempts < t.max_attempts THEN 'pending' ELSE 'failed' END,
        run_at = CASE WHEN p_retryable AND t.attempts < t.max_attempts
                      THEN now() + greatest(retry_backoff(t.attempts, p_backoff_base, p_backoff_cap), v_asked)
                      ELSE t.run_at END,
        fair_at = CASE WHEN p_retryable AND t.attempts < t.max_attempts
                       THEN greatest(t.fair_at,
                                     now() + greatest(retry_backoff_floor(t.attempts, p_backoff_base, p_backoff_cap),
                                                      v_asked))
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
