-- complete_tasks rewritten in place by the variants below: :'variant' is
-- `oracle` (a finished job of one task writes no history at all) or
-- `one_row` (it writes its task's history row only, the job's columns in
-- it, no job_history row). Fails if complete_tasks no longer has the
-- statement parts it cuts.
SELECT set_config('proto.variant', :'variant', false);
DO $$
DECLARE
    v_src text := pg_get_functiondef('complete_tasks'::regproc);
    v_jobs int := strpos(v_src, '    ), kept_folded_jobs AS (');
    v_tasks int := strpos(v_src, '    ), kept_folded_tasks AS (');
    v_valid int := strpos(v_src, '    ), valid AS (');
    v_part text;
BEGIN
    IF v_jobs = 0 OR v_tasks = 0 OR v_valid = 0 THEN
        RAISE EXCEPTION 'complete_tasks has no kept_folded_jobs, kept_folded_tasks and valid parts to rewrite';
    END IF;
    IF current_setting('proto.variant') = 'oracle' THEN
        v_src := left(v_src, v_jobs - 1) || substr(v_src, v_valid);
    ELSE
        v_part := substr(v_src, v_tasks, v_valid - v_tasks);
        v_part := replace(v_part, 'claims, fair_at, first_claimed_at)',
                          'claims, fair_at, first_claimed_at, job_tenant, job_type, job_input)');
        v_part := replace(v_part, 'g.claims, g.fair_at, g.first_claimed_at' || chr(10),
                          'g.claims, g.fair_at, g.first_claimed_at, g.job_tenant, g.job_type, g.job_input' || chr(10));
        IF strpos(v_part, 'g.job_input') = 0 THEN
            RAISE EXCEPTION 'kept_folded_tasks no longer lists its columns as this rewrite expects';
        END IF;
        v_src := left(v_src, v_jobs - 1) || v_part || substr(v_src, v_valid);
    END IF;
    EXECUTE v_src;
END
$$;
