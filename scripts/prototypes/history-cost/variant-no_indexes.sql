-- The two history indexes only the repeated completion (task_history_id)
-- and the depth query (task_history_completed) read, gone.
DROP INDEX task_history_id;
DROP INDEX task_history_completed;
