-- Two changes to the foreign keys around job_tasks.
--
-- Tasks no longer reference their job by foreign key. The key's check ran
-- once per inserted task and locked the job row (FOR KEY SHARE), a second
-- write to every job an enqueue had just written: about a fifth of an
-- enqueue's time (README, "make bench-queue"). A job and its tasks are
-- written in one statement by enqueue_batch and removed together by
-- retention (Queue::prune, which now deletes the tasks itself instead of
-- leaving that to the key's cascade); nothing else inserts or deletes
-- either.
ALTER TABLE job_tasks DROP CONSTRAINT job_tasks_job_id_fkey;

-- An artifact's key to its task cascades on the task's delete, and
-- without an index every deleted task scanned the whole artifacts table:
-- retention of n tasks read the table n times.
CREATE INDEX artifacts_task_id ON artifacts (task_id);
