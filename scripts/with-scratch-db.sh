#!/usr/bin/env bash
# with-scratch-db.sh NAME COMMAND...: run COMMAND with DATABASE_URL naming a
# fresh database NAME on the server in DATABASE_URL, dropped afterwards.
# The benchmarks use it so they never touch a database anyone keeps.
set -euo pipefail
: "${DATABASE_URL:?DATABASE_URL must name a PostgreSQL server}"
name=$1
shift
# Keep the query (sslmode=require and the like) when swapping the database.
base=${DATABASE_URL%%\?*}
query=""
[ "$base" != "$DATABASE_URL" ] && query="?${DATABASE_URL#*\?}"
server=${base%/*}
psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS $name" -c "CREATE DATABASE $name" >&2
trap 'psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS $name" >&2 || true' EXIT
DATABASE_URL="$server/$name$query" "$@"
