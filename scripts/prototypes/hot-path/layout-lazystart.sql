-- Layout "lazystart": today's (the repository's migrations and
-- layout-today.sql), but a claim leaves the job row as it is: it does not
-- set the job `processing`. Measures what that second row write costs a
-- claim (the job's status would then be read off its tasks). The live
-- take_tasks, its `started` step cut out.
\ir layout-today.sql

DO $$
DECLARE
    v_def text := pg_get_functiondef('take_tasks(text, text[], int, text, uuid)'::regprocedure);
    v_lazy text := regexp_replace(v_def, '\), started AS \(.*?SKIP LOCKED\)\s*\)', ')');
BEGIN
    IF v_lazy = v_def THEN
        RAISE EXCEPTION 'layout-lazystart: take_tasks has no started step to cut';
    END IF;
    EXECUTE v_lazy;
END
$$;
