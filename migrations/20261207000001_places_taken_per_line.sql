-- An enqueue takes its places in line one row per line, not per job.
--
-- place_in_line took a batch's jobs one by one: it grouped them into lines
-- (tenant, first task type, priority) and, after moving each line's clock,
-- numbered every job of its line with a window over a thousand text keys
-- and sent a thousand places back. That was 3-5 ms of a 1,000-job batch
-- (auto_explain), for what the client can count itself: the caller now
-- groups its jobs into lines and gives each line's count, and
-- take_places_in_line moves each clock as before and returns the line's
-- first place. The k-th job of a line (from 0, in the batch's order) goes
-- at the first place plus k steps, as the window gave it.
--
-- The clocks are the same: same head-of-line probe, same restart rule,
-- same lock order (lines sorted), same skipped WAL flush, same plan
-- settings as place_in_line (20261205000011, 20261206000001).
-- queue/tests/fairness.rs checks a mixed batch takes the places
-- place_in_line gives.
--
-- place_in_line stays, unchanged, for the instances of the previous
-- version that still run while an upgrade rolls out; a later migration
-- drops it.

CREATE FUNCTION take_places_in_line(p_tenants text[], p_task_types text[], p_priorities int[],
                                    p_counts int[], p_interval_seconds float8)
RETURNS TABLE (line_ord bigint, first_place timestamptz)
LANGUAGE plpgsql
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_step interval := make_interval(secs => p_interval_seconds);
    v_line record;
BEGIN
    IF cardinality(p_task_types) IS DISTINCT FROM cardinality(p_tenants)
       OR cardinality(p_priorities) IS DISTINCT FROM cardinality(p_tenants)
       OR cardinality(p_counts) IS DISTINCT FROM cardinality(p_tenants) THEN
        RAISE EXCEPTION 'take_places_in_line: p_tenants, p_task_types, p_priorities and p_counts must be as long, got %, %, % and %',
            cardinality(p_tenants), cardinality(p_task_types), cardinality(p_priorities), cardinality(p_counts)
            USING ERRCODE = '22023';
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(p_counts) AS c(n) WHERE c.n IS NULL OR c.n < 1) THEN
        RAISE EXCEPTION 'take_places_in_line: every count in p_counts must be at least 1, got %', p_counts
            USING ERRCODE = '22023';
    END IF;
    -- A line named twice would have its clock moved twice from the same
    -- head, and the two runs of places could overlap.
    IF (SELECT count(*) FROM (SELECT DISTINCT i.tenant, i.task_type, i.priority
                              FROM unnest(p_tenants, p_task_types, p_priorities) AS i(tenant, task_type, priority)) d)
       < cardinality(p_tenants) THEN
        RAISE EXCEPTION 'take_places_in_line: a line (tenant, task type, priority) is named twice; give each line once with its count'
            USING ERRCODE = '22023';
    END IF;
    -- Losing a clock's advance in a crash only forgets a little history.
    PERFORM set_config('synchronous_commit', 'off', true);
    FOR v_line IN
        SELECT i.ord, i.tenant, i.task_type, i.priority, i.n,
               (SELECT t.fair_at FROM job_tasks t
                WHERE t.task_type = i.task_type AND t.priority = i.priority
                  AND task_phase(t.status, t.waiting_on) = 'runnable'
                ORDER BY t.fair_at LIMIT 1) AS head
        FROM unnest(p_tenants, p_task_types, p_priorities, p_counts)
             WITH ORDINALITY AS i(tenant, task_type, priority, n, ord)
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
        RETURNING c.fair_at - v_line.n * v_step INTO first_place;
        line_ord := v_line.ord;
        RETURN NEXT;
    END LOOP;
END
$$;
