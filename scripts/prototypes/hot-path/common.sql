-- Shared by the prototype layouts: time-ordered ids like the queue's UUIDv7
-- (PostgreSQL 15 has no uuidv7()), so every layout's primary keys grow at
-- the right edge as they do in production.
CREATE FUNCTION proto_uuid() RETURNS uuid LANGUAGE sql VOLATILE AS $$
    SELECT (lpad(to_hex((extract(epoch FROM clock_timestamp()) * 1000)::bigint), 12, '0')
            || substr(md5(random()::text), 1, 20))::uuid
$$;
