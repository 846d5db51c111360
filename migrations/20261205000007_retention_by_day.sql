-- Retention of a day in constant time (issue #16). Dropping a day's history
-- partitions still left one row per job to delete or queue in the same
-- transaction: its artifact records, its idempotency key and its bytes'
-- prefix (5 s for a day of 500,000 jobs). Now:
--
-- * artifact records are partitioned like history, by the day of their
--   job's id, and go with the day's partitions;
-- * a job's bytes live in its day's folder (`jobs/YYYYMMDD/ID/`), so the
--   cleaner removes a day's bytes by listing one folder, skipping the jobs
--   of that day still kept (open, or finished late);
-- * the idempotency keys of a dropped day's jobs are forgotten by the
--   cleaner afterwards, in batches. Until then a key whose job is gone is
--   free: the enqueue that brings it takes it over.
--
-- `retired_days` is what the cleaner still has to do for each dropped day.

-- Jobs created before this migration keep their bytes under `jobs/ID/`;
-- days before `day_folders_from` are cleaned job by job, as before.
CREATE TABLE artifact_layout (
    one_row          boolean PRIMARY KEY DEFAULT true CHECK (one_row),
    day_folders_from date    NOT NULL
);
INSERT INTO artifact_layout (day_folders_from)
SELECT (now() AT TIME ZONE 'UTC')::date
       + CASE WHEN EXISTS (SELECT 1 FROM jobs) OR EXISTS (SELECT 1 FROM job_history) THEN 1 ELSE 0 END;

-- Where every object of a job's artifacts is stored: its day's folder,
-- the UTC day of its UUIDv7 id (as `artifact_prefix` in the queue
-- library says it; a test holds the two together). An id that is no
-- UUIDv7 has no day, and keeps the folder of its own.
CREATE FUNCTION artifact_prefix(p_job_id uuid) RETURNS text
LANGUAGE sql STABLE STRICT AS $$
    SELECT 'jobs/'
           || CASE WHEN substr(p_job_id::text, 15, 1) = '7' THEN
                  to_char(to_timestamp(('x' || substr(replace(p_job_id::text, '-', ''), 1, 12))::bit(48)::bigint
                                       / 1000.0) AT TIME ZONE 'UTC', 'YYYYMMDD') || '/'
              ELSE '' END
           || p_job_id::text || '/';
$$;

-- Artifact records by day. The table is rebuilt as a partitioned one with
-- the partitions history has (before, each day, DEFAULT), and its rows
-- copied over. The index on task_id served cascades from tasks, which went
-- with the foreign keys (20261205000001); every lookup names the job.
ALTER TABLE artifacts RENAME TO artifacts_unpartitioned;
ALTER TABLE artifacts_unpartitioned RENAME CONSTRAINT artifacts_pkey TO artifacts_unpartitioned_pkey;
ALTER TABLE artifacts_unpartitioned RENAME CONSTRAINT artifacts_one_per_kind TO artifacts_unpartitioned_one_per_kind;

CREATE TABLE artifacts (LIKE artifacts_unpartitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
    PRIMARY KEY (job_id, id),
    -- A re-run overwrites, so a job never has two artifacts of one kind.
    CONSTRAINT artifacts_one_per_kind UNIQUE (job_id, kind))
PARTITION BY RANGE (job_id);

DO $$
DECLARE
    p record;
BEGIN
    FOR p IN
        SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'job_history'::regclass
    LOOP
        EXECUTE format('CREATE TABLE %I PARTITION OF artifacts %s',
                       'artifacts' || substr(p.relname, length('job_history') + 1), p.bound);
    END LOOP;
END
$$;

INSERT INTO artifacts SELECT * FROM artifacts_unpartitioned;
DROP TABLE artifacts_unpartitioned;

-- The day partitions of history and artifact records from p_from for
-- p_days days, those not there yet. A day whose rows already went to a
-- DEFAULT partition (no partition existed when they were written) is
-- skipped: attaching it would have to move them; retention deletes them
-- from DEFAULT instead.
CREATE OR REPLACE FUNCTION create_history_partitions(p_from date, p_days int)
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
                   OR EXISTS (SELECT 1 FROM task_history_default WHERE job_id >= v_lo AND job_id < v_hi)
                   OR EXISTS (SELECT 1 FROM artifacts_default WHERE job_id >= v_lo AND job_id < v_hi);
        EXECUTE format('CREATE TABLE %I PARTITION OF job_history FOR VALUES FROM (%L) TO (%L)',
                       'job_history_' || v_suffix, v_lo, v_hi);
        EXECUTE format('CREATE TABLE %I PARTITION OF task_history FOR VALUES FROM (%L) TO (%L)',
                       'task_history_' || v_suffix, v_lo, v_hi);
        EXECUTE format('CREATE TABLE %I PARTITION OF artifacts FOR VALUES FROM (%L) TO (%L)',
                       'artifacts_' || v_suffix, v_lo, v_hi);
        RETURN NEXT v_suffix;
    END LOOP;
END
$$;

-- What the cleaner still has to do for a day whose partitions retention
-- dropped: forget the idempotency keys of its jobs that are gone and, when
-- retention deleted rather than archived, remove their bytes from the
-- day's folder.
CREATE TABLE retired_days (
    day          date        PRIMARY KEY,
    delete_bytes boolean     NOT NULL,
    queued_at    timestamptz NOT NULL DEFAULT now()
);
