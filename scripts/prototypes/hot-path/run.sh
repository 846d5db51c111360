#!/usr/bin/env bash
# Issue #16's prototype: the queue's hot path in several table layouts, each
# behind the same SQL functions (enqueue_text_jobs, enqueue_reading_jobs,
# claim, complete, fill_history, proto_reset, proto_open_tasks), driven by the same pgbench
# scripts in one run:
#   today     the repository's migrations (jobs + job_tasks, rows kept)
#   active    open tasks in a narrow table deleted at finish, history
#             written once into day partitions (layout-active.sql)
#   runnable  as active, plus a tiny runnable table so claims are heap-only
#             updates (layout-runnable.sql)
#   folded    as active, but a single-task job has no jobs row while open:
#             its task row carries the job (layout-folded.sql)
#   folded_runnable
#             folded, with runnable's claim table (layout-folded_runnable.sql)
#   bare      a ceiling, not a candidate: one row per job, updated at claim,
#             deleted at completion, nothing kept (layout-bare.sql)
# and two shortcuts that keep today's functions as they are (not in the
# default list; name them in LAYOUTS):
#   partitioned  jobs and job_tasks partitioned by status, finished rows
#             moved into day partitions by the UPDATE that finishes them
#             (layout-partitioned.sql)
#   archived  a finished job and its tasks moved into history tables,
#             partitioned by the job's creation day, by a statement trigger
#             on jobs (layout-archived.sql)
# and two variations of today's claim (also named in LAYOUTS):
#   lazystart    a claim leaves its jobs' rows alone, not setting them
#             processing (layout-lazystart.sql)
#   stmttrigger  a job's status change announced by one trigger call per
#             statement, not per row (layout-stmttrigger.sql)
# Two workloads: text jobs (one task each) and reading jobs (a text task,
# then a PDF and an audio task that wait on it); after the rounds with
# history, the time retention takes to remove its oldest day. Rounds
# alternate the layouts so a noisy machine hurts each alike. Prints a table
# (best of the rounds) and one JSON line. Env: DATABASE_URL (a server; it
# creates its own databases), TASKS (per measurement, default 100000), HISTORY
# (finished tasks for the flat-with-history rounds, default 1000000),
# ROUNDS (default 3), CLIENTS (default 4), BATCH (tasks per claim, default
# 50), LAYOUTS (space-separated, default all six; the first is the
# reference of the ratio column).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
: "${DATABASE_URL:?DATABASE_URL must name a PostgreSQL server}"
tasks=${TASKS:-100000}
history=${HISTORY:-1000000}
rounds=${ROUNDS:-3}
clients=${CLIENTS:-4}
batch=${BATCH:-50}
read -r -a layouts <<<"${LAYOUTS:-today active runnable folded folded_runnable bare}"
base=${DATABASE_URL%/*}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT


db_url() { echo "$base/proto_hot_$1"; }
sql() { PGOPTIONS="-c client_min_messages=warning" psql -X -q -v ON_ERROR_STOP=1 "$(db_url "$1")" "${@:2}"; }

for layout in "${layouts[@]}"; do
  psql -X -q "$DATABASE_URL" -c "DROP DATABASE IF EXISTS proto_hot_$layout" -c "CREATE DATABASE proto_hot_$layout"
  case $layout in
    today | lazystart | stmttrigger | partitioned | archived)
      for m in "$root"/migrations/*.sql; do sql "$layout" -1 -f "$m" >/dev/null; done ;;
  esac
  sql "$layout" -f "$here/common.sql"
  sql "$layout" -f "$here/layout-$layout.sql" >/dev/null
done

echo 'SELECT enqueue_text_jobs(1000);' >"$work/enqueue-text.sql"
echo 'SELECT enqueue_reading_jobs(1000);' >"$work/enqueue-reading.sql"
drain_script() {
  cat <<SQL
SELECT coalesce(quote_literal(array_agg(id)::text), '''{}''') AS ids,
       coalesce(quote_literal(array_agg(attempts)::text), '''{}''') AS att
FROM claim('w' || :client_id, '$1', $batch) \gset
SELECT complete('w' || :client_id, :ids::bigint[], :att::int[],
                array_fill('{"text": "done"}'::jsonb, ARRAY[cardinality(:ids::bigint[])]));
SQL
}
drain_script '{text_generation}' >"$work/drain-text.sql"
drain_script '{text_generation,pdf_generation,audio_generation}' >"$work/drain-reading.sql"

# pgbench's transactions per second, without connection time.
tps() { sed -n 's/^tps = \([0-9.]*\) (without initial connection time)$/\1/p'; }

reset() { sql "$1" -c "SELECT proto_reset($2)" >/dev/null; }

# One measurement: enqueue about $tasks tasks of a workload (text or
# reading), then drain them; sets enq and drain, in tasks/s. Run in this
# shell, not in a subshell, so that its guards end the run. A reading
# job's later tasks become claimable only as its text finishes, so some
# claims come back short: that drain gets a quarter more transactions than
# full batches would need, and every drain rate counts the tasks drained,
# not the transactions.
measure() {
  local layout=$1 workload=$2 per_job=1 slack=100 enq_txns drain_txns tps_enq tps_drain before left
  if [ "$workload" = reading ]; then per_job=3 slack=125; fi
  enq_txns=$((tasks / per_job / 1000 / clients))
  if [ "$enq_txns" -lt 1 ]; then
    echo "hot-path prototype: TASKS=$tasks is too few for $clients clients enqueueing $workload jobs 1,000 at a time" >&2
    exit 1
  fi
  tps_enq=$(pgbench -n -c "$clients" -j "$clients" -t "$enq_txns" -f "$work/enqueue-$workload.sql" "$(db_url "$layout")" 2>/dev/null | tps)
  sql "$layout" -c "VACUUM ANALYZE" 2>/dev/null
  before=$(sql "$layout" -tAc "SELECT proto_open_tasks()")
  drain_txns=$((before * slack / 100 / batch / clients))
  tps_drain=$(pgbench -n -c "$clients" -j "$clients" -t "$drain_txns" -f "$work/drain-$workload.sql" "$(db_url "$layout")" 2>/dev/null | tps)
  left=$(sql "$layout" -tAc "SELECT proto_open_tasks()")
  if [ "$left" -gt $((before / 100)) ]; then
    echo "hot-path prototype: $layout left $left of $before $workload tasks undrained" >&2
    exit 1
  fi
  enq=$(echo "$tps_enq * 1000 * $per_job" | bc)
  drain=$(echo "scale=1; $tps_drain * ($before - $left) / ($drain_txns * $clients)" | bc)
}

declare -A enq0 drain0 drain_h drain_r
best() { printf '%s\n' "$@" | sort -g | tail -1; }
for round in $(seq "$rounds"); do
  for layout in "${layouts[@]}"; do
    reset "$layout" false
    measure "$layout" text
    echo "round $round, $layout, text jobs: enqueue $enq tasks/s, drain $drain tasks/s" >&2
    enq0[$layout]="${enq0[$layout]:-} $enq"
    drain0[$layout]="${drain0[$layout]:-} $drain"
    reset "$layout" false
    measure "$layout" reading
    echo "round $round, $layout, reading jobs: enqueue $enq tasks/s, drain $drain tasks/s" >&2
    drain_r[$layout]="${drain_r[$layout]:-} $drain"
  done
done
for layout in "${layouts[@]}"; do
  reset "$layout" false
  sql "$layout" -c "SELECT fill_history($history)" >/dev/null
  sql "$layout" -c "VACUUM ANALYZE" 2>/dev/null
done
for round in $(seq "$rounds"); do
  for layout in "${layouts[@]}"; do
    reset "$layout" true
    measure "$layout" text
    echo "round $round, $layout, $history finished in history: drain $drain tasks/s" >&2
    drain_h[$layout]="${drain_h[$layout]:-} $drain"
  done
done
# Retention: remove the oldest day of history (HISTORY / 20 tasks).
declare -A retention
for layout in "${layouts[@]}"; do
  dropped=$(sql "$layout" -tA -F ' ' -c "SELECT tasks, coalesce(round(ms::numeric, 1)::text, 'null') FROM proto_drop_oldest_day()")
  read -r n ms <<<"$dropped"
  echo "$layout, retention of the oldest day: $n tasks in $ms ms" >&2
  retention[$layout]="$n $ms"
done

ref=${layouts[0]}
echo
echo "| layout | enqueue text jobs, batches of 1,000 | drain text jobs, batch $batch, $clients clients | the same with $history finished in history | drain reading jobs (3 tasks each) | text drain vs $ref | retention of the oldest day |"
echo "|---|---|---|---|---|---|---|"
ref_drain=$(best ${drain0[$ref]})
json="{"
for layout in "${layouts[@]}"; do
  e=$(best ${enq0[$layout]}); d=$(best ${drain0[$layout]}); h=$(best ${drain_h[$layout]}); r=$(best ${drain_r[$layout]})
  ratio=$(printf '%.2f' "$(echo "$d / $ref_drain" | bc -l)")
  read -r rn rms <<<"${retention[$layout]}"
  if [ "$rms" = null ]; then kept="nothing kept"; else kept="$rn tasks in $rms ms"; fi
  printf '| %s | %.0f tasks/s | %.0f tasks/s | %.0f tasks/s (%+.0f %%) | %.0f tasks/s | ×%s | %s |\n' \
    "$layout" "$e" "$d" "$h" "$(echo "($h - $d) * 100 / $d" | bc -l)" "$r" "$ratio" "$kept"
  json+="\"$layout\": {\"enqueue\": $e, \"drain\": $d, \"drain_with_history\": $h, \"drain_reading\": $r, \"drain_ratio_to_$ref\": $ratio, \"retention_tasks\": $rn, \"retention_ms\": $rms}, "
done
echo "${json%, }}"
