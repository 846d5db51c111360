-- A tenant's jobs indexed in ascending id order.
--
-- Job ids are UUIDv7 and rise with time, so in (tenant, id DESC) every new
-- job of a tenant went to the left end of the tenant's range. B-tree page
-- splits keep a page full only for keys arriving in ascending order, so
-- these split in half each time: with one tenant enqueueing, jobs_tenant_id
-- stood at 50 % leaf density, 2.3 times the pages of jobs_pkey, and
-- job_history_tenant_id, written as completions move jobs to history, the
-- same. In ascending order new entries fill pages at the right end of the
-- range. The listing (newest first) reads the same index backward, at the
-- same cost. queue/tests/enqueue.rs checks the sizes.
--
-- On an existing database both indexes are rebuilt in the migration's one
-- transaction, and dropping an index locks its table against reads as
-- well as writes until the transaction ends: jobs and job_history are
-- both unreadable until history's index is built, a few seconds per
-- million finished jobs. Upgrade a large history in a quiet moment.

DROP INDEX jobs_tenant_id;
CREATE INDEX jobs_tenant_id ON jobs (tenant, id);

DROP INDEX job_history_tenant_id;
CREATE INDEX job_history_tenant_id ON job_history (tenant, id);
