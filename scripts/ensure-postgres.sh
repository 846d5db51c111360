#!/usr/bin/env bash
# Print a DATABASE_URL for a PostgreSQL server that answers, starting one if
# needed: $DATABASE_URL when set (its server, when a database is named); else the server on 127.0.0.1:5432 when it
# answers; else a throwaway cluster under target/pg on a free port, created
# with the installed initdb/pg_ctl (PostgreSQL is installed when missing).
# With an argument (`ensure-postgres.sh backlog`), the URL names that
# database, created when missing, instead of the server's `postgres`
# database (which tests only use to create their scratch databases).
# Progress goes to stderr; stdout is only the URL.
set -euo pipefail
say() { echo "ensure-postgres: $*" >&2; }

database="${1:-postgres}"
if ! [[ "$database" =~ ^[a-z_][a-z0-9_]*$ ]]; then
  say "database name must be lowercase letters, digits and _: $database"
  exit 2
fi
# Print the URL of $database on the server at $1 (postgres://user@host:port,
# with the query $2 if any), creating the database first when it is missing.
emit() {
  local server="$1" query="${2:-}"
  exists() { [ -n "$(psql "$server/postgres$query" -Atqc "SELECT 1 FROM pg_database WHERE datname = '$database'")" ]; }
  if [ "$database" != postgres ] && ! exists; then
    say "creating database $database"
    # Another run may create it at the same moment: exists is fine. Any
    # other failure (a role without CREATEDB, say) is the server's to tell.
    local why
    if ! why=$(psql "$server/postgres$query" -qc "CREATE DATABASE $database" 2>&1 >/dev/null) && ! exists; then
      say "cannot create database $database: $why"
      exit 1
    fi
  fi
  echo "$server/$database$query"
}

# DATABASE_URL overrides: as is, or its server when a database is named.
if [ -n "${DATABASE_URL:-}" ]; then
  if [ $# -eq 0 ]; then
    echo "$DATABASE_URL"
  else
    url="${DATABASE_URL%%\?*}"
    server="$url"
    # postgres://user@host:port/db: drop the database, if the URL names one.
    [[ "${url#*://}" == */* ]] && server="${url%/*}"
    emit "$server" "${DATABASE_URL#"$url"}"
  fi
  exit 0
fi

install_postgres() {
  say "installing PostgreSQL from Debian's packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql postgresql-client >&2
}

command -v pg_isready >/dev/null 2>&1 || install_postgres

default_server="postgres://postgres@127.0.0.1:5432"
if pg_isready -q -h 127.0.0.1 -p 5432 -t 2 && psql "$default_server/postgres" -Atqc 'select 1' >/dev/null 2>&1; then
  emit "$default_server"
  exit 0
fi

root=$(cd "$(dirname "$0")/.." && pwd)
pgdir="$root/target/pg"
bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
  install_postgres
  bindir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
fi

# initdb refuses to run as root: run the cluster as the postgres user.
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

mkdir -p "$pgdir"
[ "$(id -u)" = 0 ] && chown postgres: "$pgdir"
if [ ! -f "$pgdir/data/PG_VERSION" ]; then
  say "creating a throwaway cluster in $pgdir/data"
  as_pg "$bindir/initdb" -D "$pgdir/data" -U postgres --auth=trust -E UTF8 >/dev/null
fi
if [ -f "$pgdir/port" ] && pg_isready -q -h 127.0.0.1 -p "$(cat "$pgdir/port")"; then
  emit "postgres://postgres@127.0.0.1:$(cat "$pgdir/port")"
  exit 0
fi
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
echo "$port" > "$pgdir/port"
say "starting it on 127.0.0.1:$port"
as_pg "$bindir/pg_ctl" -D "$pgdir/data" -l "$pgdir/log" -w \
  -o "-h 127.0.0.1 -p $port -k $pgdir/data -c max_connections=200 -c fsync=off" start >/dev/null
emit "postgres://postgres@127.0.0.1:$port"
