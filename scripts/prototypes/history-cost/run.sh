#!/usr/bin/env bash
# What history's writes cost a drain, part by part: the server's CPU time
# per drained task, each variant of history's writes in a database of its
# own made by the repository's migrations, rounds alternating the order,
# each variant compared with the first (`base`, the migrations as they are)
# within its round. Drain throughput on a shared machine moves ±10 % run to
# run, more than any one part costs; the server's CPU per task moves less,
# and the rounds' median of the paired ratios less again (the log's "Where
# history's writes cost the drain, measured as the server's CPU per task").
#
#   base        the migrations as they are: a finished job of one task
#               is its task's history row, the job's columns in it, and
#               a repeated completion finds its task by the job it names
#   oracle      such a job writes no history (an oracle, not a
#               candidate: the contract keeps it readable)
#   before      the completion before 20261213000001:
#               a job_history row and the task's row, and task_history_id
#   no_completed_index
#               task_history_completed (the depth query's) dropped
#   brin        that index as BRIN
#
# The server's CPU is read from a cgroup its processes are moved into, so
# this runs as root on the server's machine (cgroup v1's cpuacct or v2).
# Env: DATABASE_URL (a server; it creates its own databases), VARIANTS
# (space-separated, default "base oracle before no_completed_index"; the
# first is the reference), ROUNDS (default 15), TASKS (per measurement,
# default 100000), CLIENTS (default 4), BATCH (default 50).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
: "${DATABASE_URL:?DATABASE_URL must name a PostgreSQL server}"
read -r -a variants <<<"${VARIANTS:-base oracle before no_completed_index}"
rounds=${ROUNDS:-15}
tasks=${TASKS:-100000}
clients=${CLIENTS:-4}
batch=${BATCH:-50}
base=${DATABASE_URL%/*}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

db_url() { echo "$base/proto_hist_$1"; }
sql() { PGOPTIONS="-c client_min_messages=warning" psql -X -q -v ON_ERROR_STOP=1 "$(db_url "$1")" "${@:2}"; }
server_sql() { PGOPTIONS="-c client_min_messages=warning" psql -X -q -v ON_ERROR_STOP=1 "$DATABASE_URL" "$@"; }

# The server's processes into a cgroup of their own; backends forked later
# join it with the postmaster.
data_dir=$(server_sql -tAc "SHOW data_directory")
postmaster=$(head -1 "$data_dir/postmaster.pid" 2>/dev/null) || {
  echo "history-cost: cannot read $data_dir/postmaster.pid: run as root on the server's machine" >&2
  exit 1
}
if [ -d /sys/fs/cgroup/cpuacct ]; then
  group=/sys/fs/cgroup/cpuacct/backlog_history_cost
  mkdir -p "$group"
  server_cpu_us() { echo $(($(cat "$group/cpuacct.usage") / 1000)); }
elif [ -f /sys/fs/cgroup/cgroup.controllers ]; then
  group=/sys/fs/cgroup/backlog_history_cost
  mkdir -p "$group"
  server_cpu_us() { sed -n 's/^usage_usec //p' "$group/cpu.stat"; }
else
  echo "history-cost: no cgroup v1 cpuacct or cgroup v2 hierarchy under /sys/fs/cgroup" >&2
  exit 1
fi
move_server() {
  for pid in "$postmaster" $(pgrep -P "$postmaster"); do
    echo "$pid" >"$1/cgroup.procs" 2>/dev/null || true
  done
}
move_server "$group"
# Back where they were (the hierarchy's root) however the run ends.
trap 'move_server "$(dirname "$group")"; rm -rf "$work"' EXIT

for variant in "${variants[@]}"; do
  if [ "$variant" != base ] && [ ! -f "$here/variant-$variant.sql" ]; then
    echo "history-cost: no variant $variant (variant-$variant.sql)" >&2
    exit 1
  fi
  server_sql -c "DROP DATABASE IF EXISTS proto_hist_$variant" -c "CREATE DATABASE proto_hist_$variant"
  for m in "$root"/migrations/*.sql; do sql "$variant" -1 -f "$m" >/dev/null; done
  sql "$variant" -f "$here/drain.sql"
  if [ "$variant" != base ]; then sql "$variant" -f "$here/variant-$variant.sql" >/dev/null; fi
done

echo "SELECT proto_drain_step(:client_id, $batch);" >"$work/drain.pgb"
steps=$((tasks / batch / clients + 20))
results=$work/results
for round in $(seq "$rounds"); do
  for i in "${!variants[@]}"; do
    variant=${variants[$(((i + round) % ${#variants[@]}))]}
    sql "$variant" -c "TRUNCATE jobs, job_tasks, job_history, task_history" \
      -c "VACUUM ANALYZE jobs, job_tasks, job_history, task_history" -c "SELECT proto_fill($tasks)" \
      -c "VACUUM ANALYZE job_tasks" -c "CHECKPOINT" >/dev/null
    cpu0=$(server_cpu_us)
    t0=$(date +%s%N)
    pgbench -n -c "$clients" -j "$clients" -t "$steps" -f "$work/drain.pgb" "$(db_url "$variant")" >/dev/null 2>&1
    t1=$(date +%s%N)
    cpu1=$(server_cpu_us)
    left=$(sql "$variant" -tAc "SELECT count(*) FROM job_tasks")
    if [ "$left" -gt 0 ]; then
      echo "history-cost: $variant left $left of $tasks tasks undrained" >&2
      exit 1
    fi
    echo "$round $variant $(((cpu1 - cpu0) * 1000 / tasks)) $((tasks * 1000000000 / (t1 - t0)))" | tee -a "$results"
  done
done

echo "round variant server-CPU-ns-per-task tasks/s above; each variant against ${variants[0]} in its round, the rounds' median:"
python3 - "$results" "${variants[0]}" <<'PY'
import collections, statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
by_round = collections.defaultdict(dict)
for rnd, variant, cpu, rate in rows:
    by_round[rnd][variant] = (int(cpu), int(rate))
cpu, rate = collections.defaultdict(list), collections.defaultdict(list)
for r in by_round.values():
    ref = r[sys.argv[2]]
    for variant, (c, t) in r.items():
        cpu[variant].append(c / ref[0] - 1)
        rate[variant].append(t / ref[1] - 1)
for variant in cpu:
    below = sum(x < 0 for x in cpu[variant])
    print(f"{variant:12} CPU per task {100 * statistics.median(cpu[variant]):+6.1f} % "
          f"(below in {below} of {len(cpu[variant])}), tasks/s {100 * statistics.median(rate[variant]):+6.1f} %")
PY
for variant in "${variants[@]}"; do server_sql -c "DROP DATABASE proto_hist_$variant"; done
