-- A heartbeat locks the tasks it renews in id order, as a cancel now does
-- (`Queue::cancel_job`). Each took them in the order its plan met them:
-- the heartbeat the worker's list of leases (a hash map's, in the runtime)
-- or the table's, the cancel the order of the index it read. With two tasks
-- of one job in flight on one worker (a reading job's pdf and audio), each
-- could hold the task the other wanted next: deadlock detected, and one of
-- them aborted (reproduced with a trigger pausing the heartbeat between its
-- two rows; queue/tests/races.rs). A heartbeat takes no job lock, so the
-- job-first order every other task change follows does not cover it.
--
-- Otherwise as in the heartbeats-start-jobs migration.
CREATE OR REPLACE FUNCTION heartbeat_tasks(p_worker_id text, p_task_ids bigint[], p_claims int[])
RETURNS TABLE (task_id bigint)
LANGUAGE sql AS $$
    SELECT set_config('synchronous_commit', 'off', true);
    WITH held AS (
        -- Locked here, above the sort; the update below finds them locked.
        -- The conditions are checked again on the row each lock returns.
        SELECT t.id
        FROM job_tasks t
        JOIN unnest(p_task_ids, p_claims) AS i(id, claim) ON t.id = i.id
        WHERE t.claimed_by = p_worker_id
          AND t.claims = i.claim
          AND t.status IN ('claimed', 'processing')
        ORDER BY t.id
        FOR NO KEY UPDATE OF t
    ), renewed AS (
        UPDATE job_tasks t
        SET heartbeat_at = now(), status = 'processing', updated_at = now()
        FROM held h
        WHERE t.id = h.id
        RETURNING t.id, t.job_id, t.claimed_at
    ), behind AS (
        SELECT q.id FROM jobs q
        WHERE q.id IN (SELECT job_id FROM renewed) AND q.status = 'queued'
        ORDER BY q.id
        FOR NO KEY UPDATE SKIP LOCKED
    ), caught_up AS (
        UPDATE jobs j
        SET status = 'processing',
            started_at = coalesce(j.started_at, r.claimed_at),
            updated_at = now()
        FROM (SELECT job_id, min(claimed_at) AS claimed_at FROM renewed GROUP BY job_id) r
        WHERE j.id = r.job_id AND j.id IN (SELECT id FROM behind)
    )
    SELECT id FROM renewed;
$$;
