-- complete_tasks rewritten in place for the oracle: a finished job of one
-- task writes no history at all (its task's history row, kept_folded_tasks,
-- cut). Fails if complete_tasks no longer has the statement parts it cuts.
DO $$
DECLARE
    v_src text := pg_get_functiondef('complete_tasks(text, bigint[], uuid[], integer[], jsonb[])'::regprocedure);
    v_tasks int := strpos(v_src, '    ), kept_folded_tasks AS (');
    v_valid int := strpos(v_src, '    ), valid AS (');
BEGIN
    IF v_tasks = 0 OR v_valid = 0 THEN
        RAISE EXCEPTION 'complete_tasks has no kept_folded_tasks and valid parts to rewrite';
    END IF;
    EXECUTE left(v_src, v_tasks - 1) || substr(v_src, v_valid);
END
$$;
