-- The hot path's functions keep one plan per statement.
--
-- PL/pgSQL plans each statement with the call's values for its first five
-- calls on a connection, and from then on whenever the generic plan looks
-- dearer than the average of those, which for these statements it often
-- does: a claim, a completion or a place in line was planned again on
-- every call. Planning cost more than running (`pgbench -M prepared -r`,
-- one statement per transaction on a 50,000-task queue: a claim 1.04 ms
-- planned every call against 0.63 ms on a kept plan, a completion 0.91
-- against 0.64, a place in line 0.46 against 0.24).
--
-- A generic plan is made once per connection, before the values are known,
-- and kept until the tables' statistics change. Migration 11 made the
-- plans of these functions safe to keep however the table looked when
-- they were made (queue/tests/depth.rs, *_when_the_queue_drained_empty),
-- so they are now always kept.
--
-- The settings are restated by every migration that replaces one of these
-- functions (CREATE OR REPLACE drops them); queue/tests/depth.rs,
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
