#!/usr/bin/env bash
# Issue #16's prototype: the queue's hot path in three table layouts, each
# behind the same four SQL functions (enqueue_text_jobs, claim, complete,
# fill_history), driven by the same pgbench scripts in one run:
#   today     the repository's migrations (jobs + job_tasks, rows kept)
#   active    open tasks in a narrow table deleted at finish, history
#             written once into day partitions (layout-active.sql)
#   runnable  as active, plus a tiny runnable table so claims are heap-only
#             updates (layout-runnable.sql)
# Rounds alternate the layouts so a noisy machine hurts each alike. Prints a
# table and one JSON line. Env: DATABASE_URL (a server; it creates its own
# databases), TASKS (default 100000), HISTORY (finished tasks for the
# flat-with-history round, default 1000000), ROUNDS (default 3), CLIENTS (4).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
: "${DATABASE_URL:?DATABASE_URL must name a PostgreSQL server}"
tasks=${TASKS:-100000}
history=${HISTORY:-1000000}
rounds=${ROUNDS:-3}
clients=${CLIENTS:-4}
batch=50
layouts=(today active runnable)
base=${DATABASE_URL%/*}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

db_url() { echo "$base/proto_hot_$1"; }
sql() { psql -X -q -v ON_ERROR_STOP=1 "$(db_url "$1")" "${@:2}"; }

for layout in "${layouts[@]}"; do
  psql -X -q "$DATABASE_URL" -c "DROP DATABASE IF EXISTS proto_hot_$layout" -c "CREATE DATABASE proto_hot_$layout"
  if [ "$layout" = today ]; then
    for m in "$root"/migrations/*.sql; do sql today -1 -f "$m" >/dev/null; done
  fi
  sql "$layout" -f "$here/common.sql"
  sql "$layout" -f "$here/layout-$layout.sql" >/dev/null
done

cat >"$work/enqueue.sql" <<SQL
SELECT enqueue_text_jobs(1000);
SQL
cat >"$work/drain.sql" <<SQL
SELECT coalesce(quote_literal(array_agg(id)::text), '''{}''') AS ids,
       coalesce(quote_literal(array_agg(attempts)::text), '''{}''') AS att
FROM claim('w' || :client_id, '{text_generation}', $batch) \gset
SELECT complete('w' || :client_id, :ids::bigint[], :att::int[],
                array_fill('{"text": "done"}'::jsonb, ARRAY[cardinality(:ids::bigint[])]));
SQL

# pgbench's transactions per second, without connection time.
tps() { sed -n 's/^tps = \([0-9.]*\) (without initial connection time)$/\1/p'; }

reset() {
  if [ "$1" = today ]; then
    sql today -c "TRUNCATE jobs, job_tasks, workers CASCADE"
  else
    sql "$1" -c "TRUNCATE jobs, active_tasks, task_history, job_history CASCADE"
    if [ "$1" = runnable ]; then sql runnable -c "TRUNCATE runnable"; fi
  fi
}

# One measurement: enqueue $tasks, then drain them; prints "enqueue drain".
measure() {
  local layout=$1 per_client
  per_client=$((tasks / 1000 / clients))
  local enq drain left
  enq=$(pgbench -n -c "$clients" -j "$clients" -t "$per_client" -f "$work/enqueue.sql" "$(db_url "$layout")" 2>/dev/null | tps)
  sql "$layout" -c "VACUUM ANALYZE" 2>/dev/null
  per_client=$((tasks / batch / clients))
  drain=$(pgbench -n -c "$clients" -j "$clients" -t "$per_client" -f "$work/drain.sql" "$(db_url "$layout")" 2>/dev/null | tps)
  if [ "$layout" = today ]; then
    left=$(sql today -tAc "SELECT count(*) FROM job_tasks WHERE status <> 'complete'")
  else
    left=$(sql "$layout" -tAc "SELECT count(*) FROM active_tasks")
  fi
  if [ "$left" -gt $((tasks / 100)) ]; then
    echo "hot-path prototype: $layout left $left of $tasks tasks undrained" >&2
    exit 1
  fi
  echo "$(echo "$enq * 1000" | bc) $(echo "$drain * $batch" | bc)"
}

declare -A enq0 drain0 drain_h
best() { printf '%s\n' "$@" | sort -g | tail -1; }
for round in $(seq "$rounds"); do
  for layout in "${layouts[@]}"; do
    reset "$layout"
    read -r e d < <(measure "$layout")
    echo "round $round, $layout, empty history: enqueue $e tasks/s, drain $d tasks/s" >&2
    enq0[$layout]="${enq0[$layout]:-} $e"
    drain0[$layout]="${drain0[$layout]:-} $d"
  done
done
for layout in "${layouts[@]}"; do
  reset "$layout"
  sql "$layout" -c "SELECT fill_history($history)" >/dev/null
  sql "$layout" -c "VACUUM ANALYZE" 2>/dev/null
done
for round in $(seq "$rounds"); do
  for layout in "${layouts[@]}"; do
    if [ "$layout" = today ]; then
      sql today -c "DELETE FROM job_tasks WHERE finished_at > now() - interval '1 hour'" \
                -c "DELETE FROM jobs WHERE finished_at > now() - interval '1 hour'" >/dev/null
    else
      sql "$layout" -c "TRUNCATE jobs, active_tasks CASCADE" >/dev/null
      if [ "$layout" = runnable ]; then sql runnable -c "TRUNCATE runnable"; fi
    fi
    read -r e d < <(measure "$layout")
    echo "round $round, $layout, $history finished in history: drain $d tasks/s" >&2
    drain_h[$layout]="${drain_h[$layout]:-} $d"
  done
done

echo
echo "| layout | enqueue, batches of 1,000 (best of $rounds) | drain, batch $batch, $clients clients (best of $rounds) | drain with $history finished | ratio drain to today |"
echo "|---|---|---|---|---|"
today_drain=$(best ${drain0[today]})
json="{"
for layout in "${layouts[@]}"; do
  e=$(best ${enq0[$layout]}); d=$(best ${drain0[$layout]}); h=$(best ${drain_h[$layout]})
  ratio=$(echo "scale=2; $d / $today_drain" | bc)
  printf '| %s | %.0f tasks/s | %.0f tasks/s | %.0f tasks/s (%+.0f %%) | ×%s |\n' \
    "$layout" "$e" "$d" "$h" "$(echo "($h - $d) * 100 / $d" | bc -l)" "$ratio"
  json+="\"$layout\": {\"enqueue\": $e, \"drain\": $d, \"drain_with_history\": $h, \"drain_ratio_to_today\": $ratio}, "
done
echo "${json%, }}"
