-- Reads of the tasks in flight skip the backlog.
--
-- The sweeper's first look, the registry's count of each replica's tasks,
-- the drain step's idle check and the cleanup of silent replicas named a
-- task's status (claimed or processing) but not its type. The index over
-- open tasks leads with the type, so each of those reads walked the whole
-- backlog's entries: with 300,000 pending tasks and 20 in flight, the
-- controller's read of busy replicas touched 493 pages and took 5 ms, the
-- drain step as much per replica. Naming every type lets each read go to
-- the in-flight entries of each type: 25 pages, 0.1 ms. PostgreSQL 15 has
-- no skip scan to do that on its own.
--
-- task_types() is the list the CHECK on job_tasks.task_type holds. It is
-- IMMUTABLE so the planner reads it as a constant and can use it as an
-- index condition; queue/tests/maintenance.rs checks it against the
-- task types the Rust side knows.

CREATE FUNCTION task_types() RETURNS text[]
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT ARRAY['text_generation', 'pdf_generation', 'audio_generation'] $$;

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
$function$;

