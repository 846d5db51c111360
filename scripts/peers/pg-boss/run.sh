#!/usr/bin/env bash
# Measure pg-boss 10.x (enqueue, drain at 1/4/16 loops, enqueue→start latency)
# on the PostgreSQL server in DATABASE_URL, for scripts/bench-queue.sh to print
# beside backlog's and graphile-worker's figures. pg-boss 10 is the newest
# line that runs on Node 20 (11 and later need Node 22).
#
# DATABASE_URL: any database on the server, by a role that may create and drop
# databases. The benchmark gets a fresh database of its own,
# backlog_bench_pgboss, and pg-boss is installed from package-lock.json into a
# temporary folder, so nothing lands in the repo; both are removed on exit
# (scripts/peers/peer.sh). Interrupted, bench.mjs simply ends (pg-boss has no
# signal handling of its own); its jobs die with the dropped database.
#
# stdout is bench.mjs's output only (its last line is one JSON object);
# progress, npm and psql go to stderr. Exits non-zero when any step fails.
set -euo pipefail

peer=pg-boss
db=backlog_bench_pgboss
here=$(cd "$(dirname "$0")" && pwd)
# Four fills of 200,000 jobs, three timed drains of 10,000 (pg-boss's fetch
# sorts the whole queue each time), then 1,010 latency samples at a polling
# interval of 0.5 s.
duration="about 12 minutes, 8-9 of them latency samples"
# shellcheck source=../peer.sh
. "$here/../peer.sh"
run_peer
