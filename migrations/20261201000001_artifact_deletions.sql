-- Artifact bytes whose records retention deleted, waiting for the cleaner
-- to remove them from the store. Queued in the same transaction as the
-- delete, so a crash between the two never leaves bytes nobody knows about.
CREATE TABLE artifact_deletions (
    storage_key text PRIMARY KEY,
    queued_at   timestamptz NOT NULL DEFAULT now()
);
