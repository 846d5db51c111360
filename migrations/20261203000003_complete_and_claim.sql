-- Complete and claim the next batch in one round trip. A worker runtime
-- that finishes tasks completes them and, with its slots free again,
-- claims at once: two calls, two commits' worth of round trips per batch.
-- complete_and_claim_tasks does both in one transaction, as
-- complete_tasks and claim_and_start_tasks would one after the other.
--
-- It returns job_tasks rows: the tasks it completed (status `complete`,
-- fenced exactly as complete_tasks fences them; the output is left out,
-- the caller sent it) and then the tasks it claimed (status `processing`).
-- A draining claimer completes and claims nothing, as with the claims.
CREATE FUNCTION complete_and_claim_tasks(p_worker_id text, p_task_ids bigint[], p_claims int[],
                                         p_outputs jsonb[], p_task_types text[], p_limit int)
RETURNS SETOF job_tasks
LANGUAGE plpgsql AS $$
DECLARE
    v_synchronous_commit text := current_setting('synchronous_commit');
    v_completed bigint[];
    v_task job_tasks;
BEGIN
    -- Jobs are locked before tasks here as everywhere (complete_tasks);
    -- the claim that follows takes its tasks and jobs SKIP LOCKED, so it
    -- never waits while holding them.
    SELECT array_agg(c.task_id) INTO v_completed
    FROM complete_tasks(p_worker_id, p_task_ids, p_claims, p_outputs) c;
    -- A statement of its own, so it sees the completions.
    FOR v_task IN SELECT * FROM job_tasks t WHERE t.id = ANY (v_completed) LOOP
        v_task.output := NULL;
        RETURN NEXT v_task;
    END LOOP;
    RETURN QUERY SELECT * FROM take_tasks(p_worker_id, p_task_types, p_limit, 'processing');
    -- take_tasks turns synchronous commit off for the transaction (a lost
    -- claim is harmless); this transaction also commits completions, which
    -- must be flushed before the worker is told they are stored.
    PERFORM set_config('synchronous_commit', v_synchronous_commit, true);
END
$$;
