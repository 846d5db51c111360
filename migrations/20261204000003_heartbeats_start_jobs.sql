-- A claim updates its job to `processing` only if it can lock the job at
-- once (SKIP LOCKED: claims lock tasks before jobs, everything else jobs
-- before tasks). An event stream registering its watch holds the job FOR
-- SHARE for a moment, and `backlog submit --wait` and the console open one
-- right after submitting: a claim meeting that lock left the job `queued`
-- for its whole run, with no `processing` event and `started_at` set only
-- at the end. Heartbeats now catch such a job up (skipping it again while
-- it is locked, so they never wait), with `started_at` from the claim.
CREATE OR REPLACE FUNCTION heartbeat_tasks(p_worker_id text, p_task_ids bigint[], p_claims int[])
RETURNS TABLE (task_id bigint)
LANGUAGE sql AS $$
    SELECT set_config('synchronous_commit', 'off', true);
    WITH renewed AS (
        UPDATE job_tasks t
        SET heartbeat_at = now(), status = 'processing', updated_at = now()
        FROM unnest(p_task_ids, p_claims) AS i(id, claim)
        WHERE t.id = i.id
          AND t.claimed_by = p_worker_id
          AND t.claims = i.claim
          AND t.status IN ('claimed', 'processing')
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
