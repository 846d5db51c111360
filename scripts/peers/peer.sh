# Shared by scripts/peers/*/run.sh (sourced, not run): install one peer queue
# library from its package-lock.json into a temporary folder, give it a fresh
# database, run its bench.mjs there, and remove both again.
#
# The sourcing run.sh sets, before calling run_peer:
#   peer     the peer's name, for messages ("graphile-worker")
#   db       the database to create on the server of DATABASE_URL (dropped
#            first if a previous run left it)
#   here     the peer's folder (package.json, package-lock.json, bench.mjs)
#   duration what to announce before bench.mjs starts ("about a minute")
#
# Both the database and the folder are removed on exit, on success, failure,
# Ctrl-C or kill (anything but SIGKILL). An interrupted bench.mjs gets SIGTERM
# and is waited for before the database is dropped.
#
# stdout is bench.mjs's output only (its last line is one JSON object);
# progress, npm and psql go to stderr. Exits non-zero when any step fails.

say() { echo "$peer peer: $*" >&2; }

run_peer() {
  : "${DATABASE_URL:?DATABASE_URL must name a PostgreSQL server (superuser or CREATEDB)}"
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

  workdir=""
  bench_pid=""
  trap peer_cleanup EXIT
  # Turn Ctrl-C / kill into a normal exit so the EXIT trap runs the cleanup.
  trap 'exit 130' INT
  trap 'exit 143' TERM

  workdir=$(mktemp -d "${TMPDIR:-/tmp}/backlog-$peer.XXXXXX")
  cp "$here/package.json" "$here/bench.mjs" "$here/../common.mjs" "$workdir/"
  if [ -f "$here/package-lock.json" ]; then
    cp "$here/package-lock.json" "$workdir/"
    say "installing $peer from package-lock.json into $workdir"
    (cd "$workdir" && npm ci --no-audit --no-fund --loglevel=error) >&2
  else
    say "no package-lock.json: resolving $peer from package.json into $workdir"
    (cd "$workdir" && npm install --no-audit --no-fund --loglevel=error) >&2
  fi

  say "creating database $db"
  drop_db
  admin -c "CREATE DATABASE $db"

  say "running bench.mjs (200,000 jobs; $duration)"
  local started=$SECONDS
  # cwd = workdir: Node resolves the library from its node_modules there.
  # In the background plus `wait`, because bash runs a trap only once the
  # foreground command has finished; this way Ctrl-C or a kill cleans up at once.
  cd "$workdir"
  DATABASE_URL="$bench_url" node bench.mjs &
  bench_pid=$!
  wait "$bench_pid"
  bench_pid=""
  say "bench.mjs finished in $((SECONDS - started)) s"
}

admin() { psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -qX "$@" >&2; }

drop_db() {
  # FORCE (PostgreSQL 13+) ends connections a killed bench.mjs left behind;
  # older servers reject the option, so retry plainly.
  admin -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" 2>/dev/null \
    || admin -c "DROP DATABASE IF EXISTS $db"
}

peer_cleanup() {
  local status=$?
  trap - EXIT INT TERM
  say "cleaning up"
  # Interrupted mid-run: let bench.mjs shut down on SIGTERM before the
  # database goes away under it.
  if [ -n "$bench_pid" ] && kill -0 "$bench_pid" 2>/dev/null; then
    kill -TERM "$bench_pid" 2>/dev/null || true
    wait "$bench_pid" 2>/dev/null || true
  fi
  drop_db || say "could not drop database $db"
  cd /
  if [ -n "$workdir" ]; then rm -rf "$workdir"; fi
  exit "$status"
}
