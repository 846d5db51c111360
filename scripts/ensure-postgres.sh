#!/usr/bin/env bash
# Print a DATABASE_URL for a PostgreSQL server that answers, starting one if
# needed: $DATABASE_URL when set; else the server on 127.0.0.1:5432 when it
# answers; else a throwaway cluster under target/pg on a free port, created
# with the installed initdb/pg_ctl (PostgreSQL is installed when missing).
# Progress goes to stderr; stdout is only the URL.
set -euo pipefail
say() { echo "ensure-postgres: $*" >&2; }

if [ -n "${DATABASE_URL:-}" ]; then
  echo "$DATABASE_URL"
  exit 0
fi

install_postgres() {
  say "installing PostgreSQL from Debian's packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql postgresql-client >&2
}

command -v pg_isready >/dev/null 2>&1 || install_postgres

default_url="postgres://postgres@127.0.0.1:5432/postgres"
if pg_isready -q -h 127.0.0.1 -p 5432 -t 2 && psql "$default_url" -Atqc 'select 1' >/dev/null 2>&1; then
  echo "$default_url"
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
  echo "postgres://postgres@127.0.0.1:$(cat "$pgdir/port")/postgres"
  exit 0
fi
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
echo "$port" > "$pgdir/port"
say "starting it on 127.0.0.1:$port"
as_pg "$bindir/pg_ctl" -D "$pgdir/data" -l "$pgdir/log" -w \
  -o "-h 127.0.0.1 -p $port -k $pgdir/data -c max_connections=200 -c fsync=off" start >/dev/null
echo "postgres://postgres@127.0.0.1:$port/postgres"
