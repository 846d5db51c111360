-- The one history index left that only the depth query reads
-- (task_history_completed, the last minute's completions), gone.
DROP INDEX task_history_completed;
