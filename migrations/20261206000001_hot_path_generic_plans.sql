-- The hot path's functions keep one plan per statement.
--
-- PL/pgSQL plans each statement with the call's values for its first five
-- calls on a connection, and from then on whenever the generic plan looks
-- dearer than the average of those, which for the claim and the completion
-- it does: they were planned again on every call, and planning cost more
-- than running. `pgbench -M prepared -r`, a claim of one task and its
-- completion per transaction from a 100,000-task queue (commit not waited
-- for, so the plans show): the claim took 0.88 ms planned every call and
-- 0.42 ms on a kept plan, the completion 1.27 and 0.43.
--
-- A generic plan is made once per connection, before the values are known,
-- and kept until the tables' statistics change. Migration 11 made the
-- plans of these functions safe to keep however the table looked when
-- they were made (queue/tests/depth.rs, *_when_the_queue_drained_empty),
-- so they are now always kept.
--
-- A migration that replaces one of these functions must restate them
-- (CREATE OR REPLACE drops a function's settings); queue/tests/depth.rs,
-- `the_hot_path_keeps_its_plan_settings`, fails when one is lost.

ALTER FUNCTION place_in_line(text[], text[], int[], float8) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION take_tasks(text, text[], int, text, uuid) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION complete_tasks(text, bigint[], int[], jsonb[]) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION complete_and_claim_tasks(text, bigint[], int[], jsonb[], text[], int, uuid)
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION lock_jobs_of_tasks(bigint[]) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION fail_task(text, bigint, int, text, boolean, float8, float8, float8)
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION release_tasks(text, bigint[], int[]) SET plan_cache_mode = force_generic_plan;
