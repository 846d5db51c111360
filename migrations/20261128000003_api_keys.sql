-- API keys for the HTTP API, and a notification on every job status change
-- (the API's Server-Sent Events are driven by it).

-- Only a SHA-256 of each key is stored: keys are 256-bit random tokens, so a
-- fast hash is enough (there is nothing to brute-force), and a lookup is one
-- index probe. `prefix` is the key's first characters, kept in clear so an
-- operator can tell keys apart and revoke one without ever seeing it whole.
CREATE TABLE api_keys (
    id           uuid PRIMARY KEY,
    tenant       text        NOT NULL CHECK (tenant <> ''),
    role         text        NOT NULL CHECK (role IN ('client', 'admin')),
    prefix       text        NOT NULL,
    key_hash     bytea       NOT NULL UNIQUE CHECK (octet_length(key_hash) = 32),
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz,
    last_used_at timestamptz
);

CREATE INDEX api_keys_prefix ON api_keys (prefix);

-- The payload is the job id; listeners read the job itself, so a reader
-- never acts on a status older than the row it can see.
CREATE FUNCTION notify_job_status() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('backlog_job_status', NEW.id::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_status_changed
    AFTER UPDATE OF status ON jobs
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION notify_job_status();
