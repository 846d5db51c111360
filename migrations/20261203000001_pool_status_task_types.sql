-- What `kubectl get wp` shows and GET /v1/pools lacked: the task types a
-- pool serves, and when the pool was created (the WorkerPool's
-- creationTimestamp, or when a controller first saw a pool from a file).
-- Rows written before this migration take its time as their creation.
ALTER TABLE pool_status
    ADD COLUMN task_types text[]      NOT NULL DEFAULT '{}',
    ADD COLUMN created_at timestamptz NOT NULL DEFAULT now();
