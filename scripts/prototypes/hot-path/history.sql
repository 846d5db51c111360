-- Shared by the layouts that keep history apart from open tasks (active,
-- runnable, folded, folded_runnable; included with \ir): finished tasks
-- and jobs, written once at completion into tables partitioned by day.

CREATE TABLE task_history (
    id          bigint      NOT NULL,
    job_id      uuid        NOT NULL,
    task_type   text        NOT NULL,
    status      text        NOT NULL,
    attempts    integer     NOT NULL,
    claimed_by  text,
    last_error  text,
    output      jsonb,
    created_at  timestamptz NOT NULL,
    claimed_at  timestamptz,
    finished_at timestamptz NOT NULL
) PARTITION BY RANGE (finished_at);
CREATE INDEX task_history_job ON task_history (job_id);

CREATE TABLE job_history (
    id          uuid        NOT NULL,
    tenant      text        NOT NULL,
    job_type    text        NOT NULL,
    status      text        NOT NULL,
    input       jsonb       NOT NULL,
    priority    integer     NOT NULL,
    error       text,
    created_at  timestamptz NOT NULL,
    started_at  timestamptz,
    finished_at timestamptz NOT NULL
) PARTITION BY RANGE (finished_at);
CREATE INDEX job_history_id ON job_history (id);
CREATE INDEX job_history_tenant_id ON job_history (tenant, id DESC);

-- Daily partitions around today; retention detaches or drops whole days.
SELECT proto_day_partitions('task_history', false), proto_day_partitions('job_history', false);

-- History as retention would find it after some days of traffic: p_rows
-- finished tasks and jobs spread over the 20 days before today, so today's
-- partitions hold only what the measured rounds finish.
CREATE FUNCTION fill_history(p_rows int) RETURNS void LANGUAGE sql AS $$
    WITH j AS (
        INSERT INTO job_history (id, tenant, job_type, status, input, priority, created_at, started_at, finished_at)
        SELECT proto_uuid_at(d.at), 'tenant-' || (g % 10), 'text', 'complete', '{"prompt": "a short story"}', 0,
               d.at, d.at, d.at
        FROM generate_series(1, p_rows) g
        CROSS JOIN LATERAL (SELECT current_date - (1 + g % 20) + interval '12 hours' AS at) d
        RETURNING id, finished_at
    )
    INSERT INTO task_history (id, job_id, task_type, status, attempts, output, created_at, finished_at)
    SELECT -row_number() OVER (), id, 'text_generation', 'complete', 1, '{"text": "done"}', finished_at, finished_at
    FROM j;
$$;

-- Between rounds with history: empty today's (and, past midnight,
-- tomorrow's) partitions, which hold only what the last round finished.
CREATE FUNCTION truncate_recent_history() RETURNS void LANGUAGE plpgsql AS $$
DECLARE d date;
BEGIN
    FOREACH d IN ARRAY ARRAY[current_date, current_date + 1] LOOP
        EXECUTE format('TRUNCATE task_history_%1$s, job_history_%1$s', to_char(d, 'YYYYMMDD'));
    END LOOP;
END
$$;

-- Retention of the oldest day: detach and drop its two partitions.
CREATE FUNCTION proto_drop_oldest_day(OUT tasks bigint, OUT ms double precision) LANGUAGE sql AS $$
    SELECT * FROM proto_drop_day_partitions('task_history', 'job_history')
$$;
