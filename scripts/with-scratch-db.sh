#!/usr/bin/env bash
# with-scratch-db.sh NAME COMMAND...: run COMMAND with DATABASE_URL naming a
# fresh database NAME on the server in DATABASE_URL, dropped afterwards.
# The benchmarks use it so they never touch a database anyone keeps.
set -euo pipefail
: "${DATABASE_URL:?DATABASE_URL must name a PostgreSQL server}"
name=$1
shift
server=${DATABASE_URL%/*}
psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS $name" -c "CREATE DATABASE $name" >&2
trap 'psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS $name" >&2 || true' EXIT
DATABASE_URL="$server/$name" "$@"
