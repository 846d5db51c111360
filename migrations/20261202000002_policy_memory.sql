-- The scaling policy's memory of each pool (stabilisation windows, recent
-- scale changes for the rate limits, the idle spell, failed reads), written
-- by the leading controller after every pass. A controller that restarts or
-- takes over, and `controller plan`, decide from it instead of from nothing.
-- Opaque to SQL: a versioned JSON document the controller owns.
ALTER TABLE pool_status ADD COLUMN policy_memory jsonb;
