#!/usr/bin/env bash
# make bench-queue: the queue benchmark and its references, in one run, on a
# fresh database of the server in DATABASE_URL. PEERS=0 skips graphile-worker.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
: "${DATABASE_URL:?DATABASE_URL must name a PostgreSQL server}"

peer_file=""
if [ "${PEERS:-1}" != 0 ]; then
  peer_file=$(mktemp)
  echo "bench-queue: measuring graphile-worker (PEERS=0 skips)" >&2
  DATABASE_URL="$DATABASE_URL" "$root/scripts/peers/graphile-worker/run.sh" | tee "$peer_file" >&2
fi
cd "$root"
if [ -n "$peer_file" ]; then export PEER_RESULT="$peer_file"; fi
"$root/scripts/with-scratch-db.sh" backlog_bench cargo bench -p queue --bench queue --locked
