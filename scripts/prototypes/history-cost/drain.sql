-- The drain the history-cost rounds measure: jobs of one task, kept in
-- their task's row as the queue keeps them (20261209000001), each pgbench
-- transaction claiming 50 through take_tasks and completing them through
-- complete_tasks, the two functions complete_and_claim_next runs.

CREATE OR REPLACE FUNCTION proto_fill(n int) RETURNS void LANGUAGE sql AS $$
    INSERT INTO job_tasks (job_id, task_type, job_tenant, job_type, job_input)
    -- Today's UUIDv7 prefix, so every row lands in today's history partition.
    SELECT (left(uuid_v7_floor(now())::text, 24) || lpad(to_hex(i), 12, '0'))::uuid,
           'text_generation', 'bench', 'text', jsonb_build_object('prompt', 'noop ' || i)
    FROM generate_series(1, n) AS i;
$$;

CREATE OR REPLACE FUNCTION proto_drain_step(p_client int, p_batch int) RETURNS int LANGUAGE plpgsql AS $$
DECLARE
    v_ids bigint[];
    v_job_ids uuid[];
    v_claims int[];
BEGIN
    SELECT array_agg(t.id), array_agg(t.job_id), array_agg(t.claims) INTO v_ids, v_job_ids, v_claims
    FROM take_tasks('w' || p_client, ARRAY['text_generation'], p_batch, 'processing', NULL) t;
    IF v_ids IS NULL THEN
        RETURN 0;
    END IF;
    -- A variant of the completion from before it took the tasks' jobs
    -- (variant-before.sql) is called as it was.
    IF current_setting('proto.completion_without_jobs', true) = 'on' THEN
        PERFORM complete_tasks('w' || p_client, v_ids, v_claims,
                               array_fill('{}'::jsonb, ARRAY[cardinality(v_ids)]));
    ELSE
        PERFORM complete_tasks('w' || p_client, v_ids, v_job_ids, v_claims,
                               array_fill('{}'::jsonb, ARRAY[cardinality(v_ids)]));
    END IF;
    RETURN cardinality(v_ids);
END
$$;
