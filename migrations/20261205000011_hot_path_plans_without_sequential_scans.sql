-- The hot path's functions plan without sequential scans.
--
-- PL/pgSQL keeps the plans of a function's statements for the life of the
-- connection, and from the sixth call on may keep one generic plan. A
-- queue that drained empty is vacuumed down to no pages (autovacuum
-- truncates a table's empty end), and a plan made then costs a sequential
-- scan at nothing. The worker's connection that polled the empty queue, or
-- the producer's that placed its first jobs, kept such plans, and the
-- burst that followed ran them against a growing table until the next
-- analyze invalidated them:
--
-- - place_in_line read every task twice per enqueue (the head of the line
--   and the fair-restart probe): 50 ms a call at 99,000 tasks, which
--   halved `make bench-queue`'s enqueue rate in the runs where it struck;
-- - a claim of 32 read 100,000 rows and entries at 50,000 tasks (63 ms);
-- - a completion of 32 (lock_jobs_of_tasks, a join of jobs and tasks
--   planned as loops over sequential scans) ran for more than ten minutes
--   at 50,000 jobs before it was cancelled.
--
-- Each statement of these functions has an index made for it, so none
-- needs a sequential scan: with them ruled out, the plans read the
-- indexes whatever the statistics said when they were made. An index can
-- still tie with another when the table has no pages: place_in_line's
-- fair-restart probe, an equality on the place, then walked the
-- job-and-type index (38 ms), so it now asks for the first runnable place
-- from there on in the claim index's order, which only that index gives
-- without a sort. Tests: queue/tests/depth.rs, *_when_the_queue_drained_empty.

-- As in the claims migration, with the probe asked in the claim index's order.
CREATE OR REPLACE FUNCTION place_in_line(p_tenants text[], p_task_types text[], p_priorities int[],
                                         p_interval_seconds float8)
RETURNS TABLE (job_ord bigint, place timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_step interval := make_interval(secs => p_interval_seconds);
    v_line record;
    v_start timestamptz;
    v_keys text[] := '{}';
    v_starts timestamptz[] := '{}';
BEGIN
    -- Losing a clock's advance in a crash only forgets a little history.
    PERFORM set_config('synchronous_commit', 'off', true);
    FOR v_line IN
        SELECT i.tenant, i.task_type, i.priority, count(*)::int AS n,
               (SELECT t.fair_at FROM job_tasks t
                WHERE t.task_type = i.task_type AND t.priority = i.priority
                  AND task_phase(t.status, t.waiting_on) = 'runnable'
                ORDER BY t.fair_at LIMIT 1) AS head
        FROM unnest(p_tenants, p_task_types, p_priorities) AS i(tenant, task_type, priority)
        GROUP BY i.tenant, i.task_type, i.priority
        ORDER BY i.tenant, i.task_type, i.priority
    LOOP
        INSERT INTO tenant_clocks AS c (tenant, task_type, priority, fair_at)
        VALUES (v_line.tenant, v_line.task_type, v_line.priority,
                coalesce(v_line.head, now()) + v_line.n * v_step)
        ON CONFLICT (tenant, task_type, priority) DO UPDATE
        SET fair_at = CASE
                WHEN v_line.head IS NULL THEN now()
                -- Is the tenant's latest place still waiting? Asked as the
                -- first runnable place from there on, in the claim index's
                -- order: an equality on fair_at would make any index of
                -- the type look as good.
                WHEN c.fair_at > v_line.head AND (
                    SELECT t.fair_at FROM job_tasks t
                    WHERE t.task_type = v_line.task_type AND t.priority = v_line.priority
                      AND task_phase(t.status, t.waiting_on) = 'runnable'
                      AND t.fair_at >= c.fair_at - v_step
                    ORDER BY t.fair_at
                    LIMIT 1) IS DISTINCT FROM c.fair_at - v_step THEN v_line.head
                ELSE greatest(c.fair_at, v_line.head)
            END + v_line.n * v_step
        RETURNING c.fair_at - v_line.n * v_step INTO v_start;
        v_keys := v_keys || (v_line.tenant || E'\x1f' || v_line.task_type || E'\x1f' || v_line.priority);
        v_starts := v_starts || v_start;
    END LOOP;

    RETURN QUERY
    SELECT j.ord,
           s.start + (row_number() OVER (PARTITION BY j.key ORDER BY j.ord) - 1) * v_step
    FROM (SELECT i.ord, i.tenant || E'\x1f' || i.task_type || E'\x1f' || i.priority AS key
          FROM unnest(p_tenants, p_task_types, p_priorities) WITH ORDINALITY AS i(tenant, task_type, priority, ord)) j
    JOIN unnest(v_keys, v_starts) AS s(key, start) ON s.key = j.key
    ORDER BY j.ord;
END
$$;

ALTER FUNCTION place_in_line(text[], text[], int[], float8) SET enable_seqscan = off;
-- Its earlier setting (enable_bitmapscan = off) stays.
ALTER FUNCTION take_tasks(text, text[], int, text, uuid) SET enable_seqscan = off;
ALTER FUNCTION complete_tasks(text, bigint[], int[], jsonb[]) SET enable_seqscan = off;
ALTER FUNCTION complete_and_claim_tasks(text, bigint[], int[], jsonb[], text[], int, uuid) SET enable_seqscan = off;
ALTER FUNCTION lock_jobs_of_tasks(bigint[]) SET enable_seqscan = off;
ALTER FUNCTION fail_task(text, bigint, int, text, boolean, float8, float8, float8) SET enable_seqscan = off;
ALTER FUNCTION release_tasks(text, bigint[], int[]) SET enable_seqscan = off;
