-- The same two indexes as BRIN, summarized as ranges fill: next to no
-- work per insert, lookups that read the recent ranges' rows.
DROP INDEX task_history_id;
DROP INDEX task_history_completed;
CREATE INDEX task_history_id ON task_history USING brin (id) WITH (autosummarize = on);
CREATE INDEX task_history_completed ON task_history USING brin (finished_at) WITH (autosummarize = on)
    WHERE status = 'complete';
