#!/usr/bin/env bash
# fuzz-api.sh [--quick]: fuzz the API from its own OpenAPI document with
# schemathesis (property-based HTTP tests), on a scratch database.
#
# Starts `api serve` on a free loopback port against a fresh, migrated
# database with one tenant key, then runs schemathesis three times:
#   1. invalid requests only (negative mode) on the operations that write,
#      as the tenant: the rows in every table must be the same afterwards;
#   2. every operation, valid and invalid requests, as the tenant (its key
#      is an admin key, so the operator routes are reached too);
#   3. every operation without a key.
# Each run checks not_a_server_error, status_code_conformance,
# content_type_conformance and response_schema_conformance; any failure
# fails the script. `--quick` (what `make test` runs) bounds the examples
# and the time (under a minute in all); FUZZ_EXAMPLES and FUZZ_SECONDS
# override either mode's bounds. Reports go to target/fuzz-api.
set -euo pipefail
say() { echo "fuzz-api: $*" >&2; }

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if [ "${1:-}" = "--quick" ]; then
  examples=${FUZZ_EXAMPLES:-10}
  seconds=${FUZZ_SECONDS:-15}
else
  examples=${FUZZ_EXAMPLES:-100}
  seconds=${FUZZ_SECONDS:-240}
fi

command -v schemathesis >/dev/null 2>&1 || scripts/ensure-tools.sh
DATABASE_URL=$(scripts/ensure-postgres.sh)
export DATABASE_URL

cargo build --locked --quiet -p api --bin api
api="${CARGO_TARGET_DIR:-$root/target}/debug/api"

# A scratch database, dropped on exit (as scripts/with-scratch-db.sh does).
name="backlog_fuzz_api_$$"
base=${DATABASE_URL%%\?*}
query=""
[ "$base" != "$DATABASE_URL" ] && query="?${DATABASE_URL#*\?}"
admin_url=$DATABASE_URL
psql "$admin_url" -qc "CREATE DATABASE $name" >&2
export DATABASE_URL="${base%/*}/$name$query"

work=$(mktemp -d)
server_pid=""
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  psql "$admin_url" -qc "DROP DATABASE IF EXISTS $name WITH (FORCE)" >&2 || true
  rm -rf "$work"
}
trap cleanup EXIT

"$api" migrate 2>>"$work/api.log"
# The secret is all of stdout (logs go to stderr).
# An admin key: a tenant's key that also reaches the operator routes.
key=$("$api" keys create --tenant fuzz --admin 2>>"$work/api.log")

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# Short-lived event streams: a fuzzed request for one never holds a worker
# long. No sweeper: nothing here runs tasks.
"$api" serve --bind 127.0.0.1 --port "$port" --artifact-store "file://$work/artifacts" \
  --sweeper-interval-seconds 0 --sse-max-stream-seconds 2 >>"$work/api.log" 2>&1 &
server_pid=$!
url="http://127.0.0.1:$port"
for _ in $(seq 100); do
  python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' \
    "$url/readyz" >/dev/null 2>&1 && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/api.log" >&2; say "the API did not start"; exit 1; }
  sleep 0.1
done
say "API on $url, $examples examples per operation, ${seconds}s per run"

reports="$root/target/fuzz-api"
mkdir -p "$reports"
checks=not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance
# One worker: with several, schemathesis's threads hit a CPython 3.11 bug
# in concurrent ast.parse ("AST constructor recursion depth mismatch").
# FUZZ_CONFIG: a schemathesis.toml for one run.
fuzz() {
  local run=$1
  shift
  # From the scratch folder: schemathesis keeps state in ./.schemathesis.
  (cd "$work" && schemathesis ${FUZZ_CONFIG:+--config-file "$FUZZ_CONFIG"} run "$url/openapi.json" \
    --checks "$checks" \
    --max-examples "$examples" --max-time "$seconds" \
    --generation-allow-x00 true --generation-database none --request-timeout 10 \
    --workers 1 --no-color --suppress-health-check all \
    --report junit --report-junit-path "$reports/$run.xml" \
    "$@")
}

counts() {
  psql "$DATABASE_URL" -Atc "SELECT (SELECT count(*) FROM all_jobs), (SELECT count(*) FROM all_tasks),
                                    (SELECT count(*) FROM artifacts), (SELECT count(*) FROM api_keys)"
}

status=0
say "1/3: invalid requests to the operations that write, as a tenant"
before=$(counts)
# Only requests that are invalid for the server: not the stateful phase
# (its chains send valid requests between invalid ones), and no unknown
# headers or query parameters (schemathesis counts an unknown header as
# invalid, but HTTP has servers ignore those).
printf '[generation]\nallow-extra-parameters = false\n' >"$work/invalid-only.toml"
# Every exchange is recorded (HAR), so a write that got through can be
# shown with the request schemathesis made of it. The hooks drop cases
# whose only "invalid" part is a header value that is valid text on the
# wire (an Idempotency-Key of `null`).
PYTHONPATH="$root/scripts${PYTHONPATH:+:$PYTHONPATH}" SCHEMATHESIS_HOOKS=fuzz_api_hooks \
FUZZ_CONFIG="$work/invalid-only.toml" fuzz invalid-writes --mode negative --phases coverage,fuzzing \
  --include-method POST -H "Authorization: Bearer $key" \
  --report har --report-har-path "$reports/invalid-writes.har" || status=1
after=$(counts)
if [ "$before" != "$after" ]; then
  say "invalid requests wrote rows: jobs|tasks|artifacts|keys $before -> $after; the jobs:"
  psql "$DATABASE_URL" -Atc "SELECT job_type, priority, idempotency_key, input FROM all_jobs" >&2
  say "the requests answered 2xx (all exchanges: $reports/invalid-writes.har):"
  python3 - "$reports/invalid-writes.har" >&2 <<'PY' || true
import json, sys
for entry in json.load(open(sys.argv[1]))["log"]["entries"]:
    request, response = entry["request"], entry["response"]
    if 200 <= response["status"] < 300:
        headers = {h["name"]: h["value"] for h in request["headers"] if h["name"].lower() != "authorization"}
        body = request.get("postData", {}).get("text", "")
        print(response["status"], request["method"], request["url"], json.dumps(headers), repr(body))
PY
  status=1
fi

say "2/3: every operation, as a tenant"
fuzz tenant -H "Authorization: Bearer $key" || status=1

say "3/3: every operation, without a key"
fuzz anonymous || status=1

if grep -q '"level":"ERROR"' "$work/api.log"; then
  say "the API logged errors:"
  grep '"level":"ERROR"' "$work/api.log" | head -20 >&2
  status=1
fi
[ "$status" = 0 ] && say "no failures" || say "failures: see above and $reports"
exit "$status"
