-- Layout "partitioned": today's tables and functions unchanged, but jobs and
-- job_tasks become tables partitioned by status: the open rows in one
-- partition, the finished ones in day partitions of finished_at that an
-- UPDATE to a finished status moves them into (PostgreSQL's row movement).
-- The question it answers: how much of the narrow-table layouts' gain (and
-- their flat-with-history and retention figures) comes without rewriting
-- the queue's SQL. Applied after the repository's migrations.
--
-- What a real migration would also need, and this one leaves out: the
-- idempotency key's uniqueness across partitions (a unique index must hold
-- the partition key, so it would move to a table of its own), foreign keys
-- to jobs and job_tasks (same reason), and callers ready for the
-- serialization failure a concurrent update meets when its row has moved
-- to another partition.

ALTER TABLE artifacts DROP CONSTRAINT artifacts_job_id_fkey, DROP CONSTRAINT artifacts_task_id_fkey;
-- The functions' SETOF job_tasks follows the old table's row type; the new
-- table has the same columns, so their rows still fit it.
ALTER TABLE job_tasks RENAME TO job_tasks_old;
ALTER TABLE jobs RENAME TO jobs_old;
DROP INDEX jobs_tenant_id, job_tasks_runnable, job_tasks_active, job_tasks_completed;

CREATE TABLE jobs (LIKE jobs_old INCLUDING DEFAULTS INCLUDING CONSTRAINTS) PARTITION BY LIST (status);
CREATE TABLE jobs_open PARTITION OF jobs FOR VALUES IN ('queued', 'processing') WITH (fillfactor = 50);
CREATE TABLE jobs_finished PARTITION OF jobs FOR VALUES IN ('complete', 'failed', 'cancelled')
    PARTITION BY RANGE (finished_at);
CREATE TABLE jobs_finished_other PARTITION OF jobs_finished DEFAULT;
CREATE INDEX jobs_id ON jobs (id);
CREATE INDEX jobs_tenant_id ON jobs (tenant, id DESC);

CREATE TABLE job_tasks (LIKE job_tasks_old INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING IDENTITY)
    PARTITION BY LIST (status);
CREATE TABLE job_tasks_open PARTITION OF job_tasks FOR VALUES IN ('pending', 'claimed', 'processing')
    WITH (fillfactor = 50);
CREATE TABLE job_tasks_finished PARTITION OF job_tasks FOR VALUES IN ('complete', 'failed', 'cancelled')
    PARTITION BY RANGE (finished_at);
CREATE TABLE job_tasks_finished_other PARTITION OF job_tasks_finished DEFAULT;
CREATE INDEX job_tasks_id ON job_tasks (id);
CREATE INDEX job_tasks_job ON job_tasks (job_id, task_type);
CREATE INDEX job_tasks_runnable ON job_tasks (task_type, priority DESC, fair_at, id)
    WHERE status = 'pending' AND waiting_on = 0;
CREATE INDEX job_tasks_active ON job_tasks (task_type, status, waiting_on, run_at)
    WHERE status IN ('pending', 'claimed', 'processing');
CREATE INDEX job_tasks_completed ON job_tasks (finished_at, task_type) WHERE status = 'complete';

-- Day partitions of both finished tables.
SELECT proto_day_partitions('jobs_finished', false), proto_day_partitions('job_tasks_finished', false);

CREATE TRIGGER jobs_status_changed AFTER UPDATE OF status ON jobs FOR EACH ROW
    WHEN (old.status IS DISTINCT FROM new.status) EXECUTE FUNCTION notify_job_status();
CREATE TRIGGER job_tasks_runnable_insert AFTER INSERT ON job_tasks
    REFERENCING NEW TABLE AS inserted_tasks FOR EACH STATEMENT EXECUTE FUNCTION notify_inserted_runnable();
CREATE TRIGGER job_tasks_runnable_update AFTER UPDATE OF status, waiting_on, run_at ON job_tasks FOR EACH ROW
    WHEN (new.status = 'pending' AND new.waiting_on = 0 AND new.run_at <= now()
          AND (old.status <> 'pending' OR old.waiting_on <> 0 OR old.run_at > now()))
    EXECUTE FUNCTION notify_task_runnable();

\ir layout-today.sql

-- Retention of the oldest day: detach and drop its partitions.
DROP FUNCTION proto_drop_oldest_day();
CREATE FUNCTION proto_drop_oldest_day(OUT tasks bigint, OUT ms double precision) LANGUAGE sql AS $$
    SELECT * FROM proto_drop_day_partitions('job_tasks_finished', 'jobs_finished')
$$;
