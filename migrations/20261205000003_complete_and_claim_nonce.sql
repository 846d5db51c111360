-- The claim half of complete_and_claim_tasks takes the claim nonce too
-- (see the claims migration). The worker runtime makes this call after
-- every batch it finishes, so it is where an answer is most often lost: a
-- repeat completed again (completions are safe to repeat) and then claimed
-- the next tasks, while the batch the lost call took stayed `processing`
-- with a worker that never heard of it until the sweeper took it back. A
-- repeat with the nonce gets that batch instead.
--
-- Restated otherwise as in the history migration, less the saving and
-- restoring of synchronous_commit around the claim: claims commit durably
-- since the durable-claims migration, so there is nothing to restore.
DROP FUNCTION complete_and_claim_tasks(text, bigint[], int[], jsonb[], text[], int);
CREATE FUNCTION complete_and_claim_tasks(p_worker_id text, p_task_ids bigint[], p_claims int[],
                                         p_outputs jsonb[], p_task_types text[], p_limit int,
                                         p_nonce uuid DEFAULT NULL)
RETURNS SETOF job_tasks
LANGUAGE plpgsql AS $$
DECLARE
    v_held job_tasks[];
    v_completed bigint[];
    v_missing bigint[];
    v_task job_tasks;
BEGIN
    -- The rows are read while they are still open: a completion that
    -- finishes its job moves them to history, where finding one by task id
    -- alone would probe every partition.
    v_held := ARRAY(SELECT t FROM job_tasks t WHERE t.id = ANY (p_task_ids));
    -- Jobs are locked before tasks here as everywhere (complete_tasks);
    -- the claim that follows takes its tasks and jobs SKIP LOCKED, so it
    -- never waits while holding them.
    SELECT coalesce(array_agg(c.task_id), '{}') INTO v_completed
    FROM complete_tasks(p_worker_id, p_task_ids, p_claims, p_outputs) c;
    FOREACH v_task IN ARRAY v_held LOOP
        CONTINUE WHEN NOT (v_task.id = ANY (v_completed));
        v_task.status := 'complete';
        v_task.output := NULL;
        v_task.finished_at := now();
        RETURN NEXT v_task;
    END LOOP;
    -- Completed by an earlier call whose answer was lost, and moved since.
    v_missing := ARRAY(SELECT c.id FROM unnest(v_completed) c(id)
                       WHERE NOT (c.id = ANY (ARRAY(SELECT (h).id FROM unnest(v_held) h))));
    IF cardinality(v_missing) > 0 THEN
        FOR v_task IN SELECT * FROM all_tasks t WHERE t.id = ANY (v_missing) LOOP
            v_task.output := NULL;
            RETURN NEXT v_task;
        END LOOP;
    END IF;
    RETURN QUERY SELECT * FROM take_tasks(p_worker_id, p_task_types, p_limit, 'processing', p_nonce);
END
$$;
