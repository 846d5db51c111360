#!/usr/bin/env bash
# make run: the whole system on this machine. PostgreSQL (found or started),
# migrations, a development API key, the API on :8787 and the controller
# with the local pools in manifests/local/, which start worker processes
# when work arrives, all in the database `backlog` (created when missing) of
# the PostgreSQL found. Ctrl-C stops everything this script started, each
# process signalled once: the workers drain before they exit.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
"$root/scripts/ensure-tools.sh" run
export DATABASE_URL="${DATABASE_URL:-$("$root/scripts/ensure-postgres.sh" backlog)}"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
cargo build --locked --bins
export PATH="$target_dir/debug:$PATH"

export PORT="${PORT:-8787}"
export ARTIFACT_STORE="${ARTIFACT_STORE:-file://$root/target/artifacts}"
export LLM_PROVIDER="${LLM_PROVIDER:-offline}"
export TTS_PROVIDER="${TTS_PROVIDER:-espeak}"
export LOG_FORMAT="${LOG_FORMAT:-text}"
mkdir -p "$root/target/artifacts"

api migrate
key=$(api keys create --tenant dev --admin)

pids=()
cleanup() {
  trap - INT TERM EXIT
  echo "make run: stopping" >&2
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup INT TERM EXIT

# Job control puts each background process in a process group of its own,
# so the terminal's Ctrl-C reaches this script alone and `cleanup` sends each
# one SIGTERM (a second signal would cut the drain short); the controller
# starts its workers in groups of their own for the same reason.
set -m
api serve --metrics-addr 127.0.0.1:9465 &
pids+=($!)
controller run --backend local -f "$root/manifests/local" --metrics-addr 127.0.0.1:9464 &
pids+=($!)

cat <<MSG

backlog is running.
  API           http://127.0.0.1:$PORT   (OpenAPI: /openapi.json)
  API metrics   http://127.0.0.1:9465/metrics
  controller    metrics on http://127.0.0.1:9464/metrics
  database      $DATABASE_URL
  artifacts     $ARTIFACT_STORE

A development API key (admin, tenant "dev"):
  export BACKLOG_KEY=$key

Submit a reading job (text, then a PDF and an audio file):
  curl -s -H "Authorization: Bearer \$BACKLOG_KEY" -H 'Content-Type: application/json' \\
       -d '{"type":"reading","input":{"prompt":"the life of tides","title":"Tides"}}' \\
       http://127.0.0.1:$PORT/v1/jobs
Follow it (Server-Sent Events until it finishes):
  curl -N -H "Authorization: Bearer \$BACKLOG_KEY" http://127.0.0.1:$PORT/v1/jobs/JOB_ID/events
Queue depth:
  curl -s -H "Authorization: Bearer \$BACKLOG_KEY" http://127.0.0.1:$PORT/v1/queue

The controller starts workers when the job arrives and stops them after the
cooldown. Ctrl-C stops everything.
MSG
wait -n "${pids[@]}"
