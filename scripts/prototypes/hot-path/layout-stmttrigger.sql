-- Layout "stmttrigger": today's (the repository's migrations and
-- layout-today.sql), but a job's status change is announced to its
-- watchers by one trigger call per statement instead of one per row: a
-- claim setting fifty jobs `processing` ran fifty PL/pgSQL calls, each
-- probing job_watches. Measures what those calls cost a claim.
\ir layout-today.sql

DROP TRIGGER jobs_status_changed ON jobs;
CREATE FUNCTION notify_job_statuses() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM job_watches) THEN
        RETURN NULL;
    END IF;
    PERFORM pg_notify('backlog_job_status', n.id::text)
    FROM new_jobs n JOIN old_jobs o ON o.id = n.id
    WHERE n.status IS DISTINCT FROM o.status
      AND EXISTS (SELECT 1 FROM job_watches w WHERE w.job_id = n.id);
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_status_changed
    AFTER UPDATE ON jobs
    REFERENCING OLD TABLE AS old_jobs NEW TABLE AS new_jobs
    FOR EACH STATEMENT
    EXECUTE FUNCTION notify_job_statuses();
