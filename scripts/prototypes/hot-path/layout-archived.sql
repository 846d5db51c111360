-- Layout "archived": today's tables and functions, but a job that reaches a
-- finished status leaves jobs and job_tasks with its tasks, for history
-- tables partitioned by the job's id (UUIDv7, so by its creation day: a
-- job's tasks share its partition, and a lookup by id reads one). A
-- statement trigger on jobs does the move, so no function changes. The
-- question: how much of the narrow layouts' gain comes from keeping the
-- hot tables to open jobs alone, with the queue's SQL as it is.
-- Applied after the repository's migrations.

ALTER TABLE artifacts DROP CONSTRAINT artifacts_job_id_fkey, DROP CONSTRAINT artifacts_task_id_fkey;

CREATE TABLE job_history (LIKE jobs INCLUDING DEFAULTS) PARTITION BY RANGE (id);
CREATE INDEX job_history_id ON job_history (id);
CREATE INDEX job_history_tenant_id ON job_history (tenant, id DESC);
CREATE TABLE task_history (LIKE job_tasks INCLUDING DEFAULTS) PARTITION BY RANGE (job_id);
CREATE INDEX task_history_job ON task_history (job_id);

SELECT proto_day_partitions('job_history', true), proto_day_partitions('task_history', true);

CREATE FUNCTION archive_finished_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_ids uuid[];
BEGIN
    SELECT array_agg(c.id) INTO v_ids FROM changed c WHERE c.status IN ('complete', 'failed', 'cancelled');
    IF v_ids IS NULL THEN
        RETURN NULL;
    END IF;
    WITH gone AS (DELETE FROM jobs j WHERE j.id = ANY (v_ids) RETURNING j.*)
    INSERT INTO job_history SELECT * FROM gone;
    WITH gone AS (DELETE FROM job_tasks t WHERE t.job_id = ANY (v_ids) RETURNING t.*)
    INSERT INTO task_history SELECT * FROM gone;
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_archive_finished AFTER UPDATE ON jobs
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION archive_finished_jobs();

\ir layout-today.sql

DROP FUNCTION fill_history(int), proto_reset(boolean), proto_drop_oldest_day();
CREATE FUNCTION fill_history(p_rows int) RETURNS void LANGUAGE sql AS $$
    WITH j AS (
        INSERT INTO job_history (id, tenant, job_type, status, input, tasks_total, tasks_complete,
                                 created_at, started_at, finished_at)
        SELECT proto_uuid_at(d.at), 'tenant-' || (g % 10), 'text', 'complete', '{"prompt": "a short story"}', 1, 1,
               d.at, d.at, d.at
        FROM generate_series(1, p_rows) g
        CROSS JOIN LATERAL (SELECT current_date - (1 + g % 20) + interval '12 hours' AS at) d
        RETURNING id, finished_at
    )
    INSERT INTO task_history (id, job_id, task_type, status, attempts, claims, output, finished_at)
    SELECT -row_number() OVER (), id, 'text_generation', 'complete', 1, 1, '{"text": "done"}', finished_at FROM j;
$$;
CREATE FUNCTION proto_reset(p_keep_history boolean) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE jobs, job_tasks, workers CASCADE;
    IF p_keep_history THEN
        EXECUTE format('TRUNCATE job_history_%1$s, task_history_%1$s', to_char(current_date, 'YYYYMMDD'));
    ELSE
        TRUNCATE job_history, task_history;
    END IF;
END
$$;
CREATE FUNCTION proto_drop_oldest_day(OUT tasks bigint, OUT ms double precision) LANGUAGE sql AS $$
    SELECT * FROM proto_drop_day_partitions('task_history', 'job_history')
$$;
