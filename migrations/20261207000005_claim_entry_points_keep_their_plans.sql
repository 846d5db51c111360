-- claim_tasks and claim_and_start_tasks keep their plan across calls.
--
-- Both were one-line SQL functions over take_tasks. PostgreSQL 15 does not
-- inline a VOLATILE set-returning SQL function, and runs one by parsing
-- and planning its body again on every call: the plan lives in the
-- calling statement's executor state, which each execution builds anew.
-- A PL/pgSQL function keeps its statements' plans for the session. With a
-- 200,000-task backlog, claims of one task through pgbench (`-M prepared`,
-- three seconds a run, four runs each, alternating, vacuumed between):
-- 0.527-0.547 ms a claim through the SQL wrapper, 0.464-0.477 through a
-- PL/pgSQL one, 0.452-0.475 calling take_tasks directly. The claim is on
-- the path every enqueue -> start wake-up waits for.
--
-- The same name, arguments, result and behaviour; only the language.
-- queue/tests/depth.rs checks the language stays.

CREATE OR REPLACE FUNCTION claim_tasks(p_worker_id text, p_task_types text[], p_limit int,
                                       p_nonce uuid DEFAULT NULL)
RETURNS SETOF job_tasks
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY SELECT * FROM take_tasks(p_worker_id, p_task_types, p_limit, 'claimed', p_nonce);
END
$$;

CREATE OR REPLACE FUNCTION claim_and_start_tasks(p_worker_id text, p_task_types text[], p_limit int,
                                                 p_nonce uuid DEFAULT NULL)
RETURNS SETOF job_tasks
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY SELECT * FROM take_tasks(p_worker_id, p_task_types, p_limit, 'processing', p_nonce);
END
$$;
