#!/usr/bin/env bash
# Measure graphile-worker 0.17.x (enqueue, drain, enqueue→start latency) on the
# PostgreSQL server in DATABASE_URL, for scripts/bench-queue.sh to print beside
# backlog's own figures.
#
# DATABASE_URL: any database on the server, by a role that may create and drop
# databases. The benchmark gets a fresh database of its own,
# backlog_bench_graphile, and graphile-worker is installed from
# package-lock.json into a temporary folder, so nothing lands in the repo; both
# are removed on exit (scripts/peers/peer.sh). Interrupted, graphile-worker
# shuts down on SIGTERM and releases its locked jobs first.
#
# stdout is bench.mjs's output only (its last line is one JSON object);
# progress, npm and psql go to stderr. Exits non-zero when any step fails.
set -euo pipefail

peer=graphile-worker
db=backlog_bench_graphile
here=$(cd "$(dirname "$0")" && pwd)
duration="about a minute"
# shellcheck source=../peer.sh
. "$here/../peer.sh"
run_peer
