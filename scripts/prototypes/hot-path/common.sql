-- Shared by the prototype layouts: time-ordered ids like the queue's UUIDv7
-- (PostgreSQL 15 has no uuidv7()), so every layout's primary keys grow at
-- the right edge as they do in production.
CREATE FUNCTION proto_uuid_at(p_at timestamptz) RETURNS uuid LANGUAGE sql VOLATILE AS $$
    SELECT (lpad(to_hex((extract(epoch FROM p_at) * 1000)::bigint), 12, '0')
            || substr(md5(random()::text), 1, 20))::uuid
$$;
CREATE FUNCTION proto_uuid() RETURNS uuid LANGUAGE sql VOLATILE AS $$ SELECT proto_uuid_at(clock_timestamp()) $$;

-- A reading job's tasks, as the queue plans them: the text first, then the
-- PDF and the audio, both waiting on it.
CREATE FUNCTION reading_tasks() RETURNS TABLE (task_type text, dependencies text[], has_dependents boolean)
LANGUAGE sql IMMUTABLE AS $$
    VALUES ('text_generation', '{}'::text[], true),
           ('pdf_generation', '{text_generation}', false),
           ('audio_generation', '{text_generation}', false)
$$;

-- Retention of the oldest day (20 days ago) where history is partitioned
-- by day: detach and drop the day's partition (named parent_YYYYMMDD) of
-- the task and the job history tables. Returns the tasks it held and the
-- milliseconds it took.
CREATE FUNCTION proto_drop_day_partitions(p_task_parent text, p_job_parent text,
                                          OUT tasks bigint, OUT ms double precision) LANGUAGE plpgsql AS $$
DECLARE
    v_day text := to_char(current_date - 20, 'YYYYMMDD');
    v_started timestamptz;
BEGIN
    EXECUTE format('SELECT count(*) FROM %I', p_task_parent || '_' || v_day) INTO tasks;
    v_started := clock_timestamp();
    EXECUTE format('ALTER TABLE %I DETACH PARTITION %I', p_task_parent, p_task_parent || '_' || v_day);
    EXECUTE format('ALTER TABLE %I DETACH PARTITION %I', p_job_parent, p_job_parent || '_' || v_day);
    EXECUTE format('DROP TABLE %I, %I', p_task_parent || '_' || v_day, p_job_parent || '_' || v_day);
    ms := extract(epoch FROM clock_timestamp() - v_started) * 1000;
END
$$;

-- A partition of p_parent per day from 30 days before today to tomorrow,
-- named p_parent_YYYYMMDD: by the day's dates, or with p_by_id by the
-- UUIDv7 ids of the day (uuid_v7_floor, from the repository's migrations).
CREATE FUNCTION proto_day_partitions(p_parent text, p_by_id boolean) RETURNS void LANGUAGE plpgsql AS $$
DECLARE d date;
BEGIN
    FOR d IN SELECT generate_series(current_date - 30, current_date + 1, interval '1 day')::date LOOP
        IF p_by_id THEN
            EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                           p_parent || '_' || to_char(d, 'YYYYMMDD'), p_parent, uuid_v7_floor(d), uuid_v7_floor(d + 1));
        ELSE
            EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                           p_parent || '_' || to_char(d, 'YYYYMMDD'), p_parent, d, d + 1);
        END IF;
    END LOOP;
END
$$;
