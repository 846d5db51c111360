-- A tenant with nothing waiting starts at the head of the line, as the
-- fairness migration meant: its clock was kept whenever anything at all
-- waited, so a tenant whose burst of N jobs had been served (faster than
-- its clock moved) still placed its next job N steps ahead, behind every
-- job other tenants queued meanwhile. Whether the tenant still waits is
-- read off its latest place: a runnable task still pending there, found
-- with one probe of the claim index. A place shared by chance with another
-- tenant's task only keeps the old behaviour for that call.
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
                  AND t.status = 'pending' AND t.waiting_on = 0
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
                WHEN c.fair_at > v_line.head AND NOT EXISTS (
                    SELECT 1 FROM job_tasks t
                    WHERE t.task_type = v_line.task_type AND t.priority = v_line.priority
                      AND t.status = 'pending' AND t.waiting_on = 0
                      AND t.fair_at = c.fair_at - v_step) THEN v_line.head
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
