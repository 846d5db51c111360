#!/usr/bin/env bash
# Durable claims against claims that skip the WAL flush, in one run: a
# scratch database migrated by `api migrate`, 60,000 text tasks per round,
# 4 pgbench clients claiming 50 and completing them, the two scripts
# alternating. async.pgb turns synchronous_commit off for its claim's
# transaction alone, as take_tasks did before 2026-12-04.
#   DATABASE_URL=postgres://... ROUNDS=4 scripts/prototypes/durable-claims/run.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
: "${DATABASE_URL:?DATABASE_URL must name a PostgreSQL server}"
db=backlog_durable_claims
admin=${DATABASE_URL%/*}/postgres
url=${DATABASE_URL%/*}/$db
psql -q "$admin" -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
trap 'psql -q "$admin" -c "DROP DATABASE IF EXISTS $db"' EXIT
(cd "$root" && DATABASE_URL=$url cargo run -q --locked -p api -- migrate)
for round in $(seq "${ROUNDS:-4}"); do
  psql -q "$url" -f "$here/fill.sql" >/dev/null
  for script in durable async; do
    tps=$(pgbench -n -c 4 -j 2 -t 120 -f "$here/$script.pgb" "$url" | awk '/^tps/ {print $3}')
    echo "round $round $script: $tps batches of 50/s"
  done
done
