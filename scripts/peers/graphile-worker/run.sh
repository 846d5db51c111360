#!/usr/bin/env bash
# Measure graphile-worker 0.17.x (enqueue, drain, enqueue→start latency) on the
# PostgreSQL server in DATABASE_URL, for scripts/bench-queue.sh to print beside
# backlog's own figures.
#
# DATABASE_URL: any database on the server, by a role that may create and drop
# databases. The benchmark gets a fresh database of its own,
# backlog_bench_graphile (dropped first if a previous run left it), and
# graphile-worker is installed from package-lock.json into a temporary folder,
# so nothing lands in the repo. Both are removed on exit, on success, failure,
# Ctrl-C or kill (anything but SIGKILL).
#
# stdout is bench.mjs's output only (its last line is one JSON object);
# progress, npm and psql go to stderr. Exits non-zero when any step fails.
set -euo pipefail

say() { echo "graphile-worker peer: $*" >&2; }

: "${DATABASE_URL:?DATABASE_URL must name a PostgreSQL server (superuser or CREATEDB)}"
here=$(cd "$(dirname "$0")" && pwd)
db=backlog_bench_graphile

for tool in node npm psql; do
  command -v "$tool" >/dev/null 2>&1 || { say "$tool is required but not installed"; exit 1; }
done

# Same server and credentials, other database; keeps any query parameters
# (sslmode, host=/socket/dir, ...). URL parsing is Node's, not a regex.
bench_url=$(DB="$db" node -e '
  const u = new URL(process.env.DATABASE_URL);
  u.pathname = "/" + process.env.DB;
  process.stdout.write(u.href);
')

admin() { psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -qX "$@" >&2; }

drop_db() {
  # FORCE (PostgreSQL 13+) ends connections a killed bench.mjs left behind;
  # older servers reject the option, so retry plainly.
  admin -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" 2>/dev/null \
    || admin -c "DROP DATABASE IF EXISTS $db"
}

workdir=""
bench_pid=""
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  say "cleaning up"
  # Interrupted mid-run: let graphile-worker shut down on SIGTERM (it releases
  # its locked jobs) before the database goes away under it.
  if [ -n "$bench_pid" ] && kill -0 "$bench_pid" 2>/dev/null; then
    kill -TERM "$bench_pid" 2>/dev/null || true
    wait "$bench_pid" 2>/dev/null || true
  fi
  drop_db || say "could not drop database $db"
  cd /
  if [ -n "$workdir" ]; then rm -rf "$workdir"; fi
  exit "$status"
}
trap cleanup EXIT
# Turn Ctrl-C / kill into a normal exit so the EXIT trap runs the cleanup.
trap 'exit 130' INT
trap 'exit 143' TERM

workdir=$(mktemp -d "${TMPDIR:-/tmp}/backlog-graphile-worker.XXXXXX")
cp "$here/package.json" "$here/bench.mjs" "$workdir/"
if [ -f "$here/package-lock.json" ]; then
  cp "$here/package-lock.json" "$workdir/"
  say "installing graphile-worker from package-lock.json into $workdir"
  (cd "$workdir" && npm ci --no-audit --no-fund --loglevel=error) >&2
else
  say "no package-lock.json: resolving graphile-worker from package.json into $workdir"
  (cd "$workdir" && npm install --no-audit --no-fund --loglevel=error) >&2
fi

say "creating database $db"
drop_db
admin -c "CREATE DATABASE $db"

say "running bench.mjs (200,000 jobs; about a minute)"
started=$SECONDS
# cwd = workdir: Node resolves graphile-worker from its node_modules there.
# In the background plus `wait`, because bash runs a trap only once the
# foreground command has finished; this way Ctrl-C or a kill cleans up at once.
cd "$workdir"
DATABASE_URL="$bench_url" node bench.mjs &
bench_pid=$!
wait "$bench_pid"
bench_pid=""
say "bench.mjs finished in $((SECONDS - started)) s"
