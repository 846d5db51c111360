-- task_history_completed as a BRIN index, summarized as ranges fill: next
-- to no work per insert, lookups that read the recent ranges' rows.
DROP INDEX task_history_completed;
CREATE INDEX task_history_completed ON task_history USING brin (finished_at) WITH (autosummarize = on)
    WHERE status = 'complete';
