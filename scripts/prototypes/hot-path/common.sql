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
