#!/usr/bin/env bash
# make bench-queue: the queue benchmark and its references, in one run, on a
# fresh database of the server in DATABASE_URL.
#
# PEERS selects the peer queues measured before backlog (scripts/peers/NAME):
# unset, empty or 1 for all of them, 0 for none, or a comma-separated list
# such as PEERS=pg-boss. Each peer's output goes to a file of its own; the
# files of the peers that finished reach the Rust benchmark as PEER_RESULTS
# (colon-separated), the names of those that failed as PEERS_FAILED. A failed
# peer does not stop the others or backlog's own figures; it is named in the
# report and at the end, and the script then exits non-zero.
#
# ROUNDS=N (N ≥ 2) measures instead only what issue #16's targets compare
# (BENCH_SCOPE=targets on both sides: enqueue, the drain at 50, latency),
# in N rounds of graphile-worker and backlog, alternating which goes
# first, then prints every round, the medians and how many rounds met
# each target. One run's ratios move with the machine's other load as much
# as the targets' margins; rounds side by side show the spread.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
: "${DATABASE_URL:?DATABASE_URL must name a PostgreSQL server}"

# One transport for every client. node-postgres (both peers' client)
# connects without TLS unless the URL asks for it; libpq (pgbench) and sqlx
# (backlog) try TLS first, and on a server that offers it they encrypt
# every message, about 0.1 ms more per call on loopback. A URL that names
# no sslmode gets sslmode=disable, so every client goes plain, as the peers
# would anyway; one that names an sslmode keeps it (the report says what
# each client got).
case "$DATABASE_URL" in
  *sslmode=*) ;;
  *\?*) DATABASE_URL="$DATABASE_URL&sslmode=disable" ;;
  *) DATABASE_URL="$DATABASE_URL?sslmode=disable" ;;
esac

all_peers="graphile-worker,pg-boss"
case "${PEERS:-1}" in
  0) selected="" ;;
  1) selected=$all_peers ;;
  *) selected=$PEERS ;;
esac

results=()
failed=()
tmpfiles=()
trap 'rm -f "${tmpfiles[@]}"' EXIT

rounds=${ROUNDS:-1}
case "$rounds" in
  '' | *[!0-9]*) echo "bench-queue: ROUNDS must be a whole number, got '$rounds'" >&2; exit 2 ;;
esac
if [ "$rounds" -ge 2 ]; then
  case "${PEERS:-1}" in
    1 | graphile-worker) ;;
    *) echo "bench-queue: ROUNDS=$rounds compares against graphile-worker only (issue #16's targets); PEERS='${PEERS:-}' cannot be used with it" >&2; exit 2 ;;
  esac
  cd "$root"
  # Build once, before the first round, so no round pays the compile.
  cargo bench -p queue --bench queue --locked --no-run >&2
  ours_files=()
  peer_files=()
  for r in $(seq 1 "$rounds"); do
    peer_file=$(mktemp)
    ours_file=$(mktemp)
    tmpfiles+=("$peer_file" "$ours_file")
    # Odd rounds graphile-worker first, even rounds backlog first.
    if [ $((r % 2)) -eq 1 ]; then order="peer ours"; first=graphile-worker; else order="ours peer"; first=backlog; fi
    for side in $order; do
      if [ "$side" = peer ]; then
        echo "bench-queue: round $r of $rounds: graphile-worker" >&2
        BENCH_SCOPE=targets DATABASE_URL="$DATABASE_URL" scripts/peers/graphile-worker/run.sh | tee "$peer_file" >&2
      else
        echo "bench-queue: round $r of $rounds: backlog" >&2
        BENCH_SCOPE=targets ROUND="$r/$rounds" ROUND_ORDER="$first" \
          scripts/with-scratch-db.sh backlog_bench cargo bench -p queue --bench queue --locked | tee "$ours_file"
      fi
    done
    ours_files+=("$ours_file")
    peer_files+=("$peer_file")
  done
  ROUND_RESULTS=$(IFS=:; echo "${ours_files[*]}") ROUND_PEER_RESULTS=$(IFS=:; echo "${peer_files[*]}") \
    cargo bench -p queue --bench queue --locked
  exit 0
fi
IFS=, read -r -a names <<<"$selected"
for name in "${names[@]}"; do
  if [ ! -x "$root/scripts/peers/$name/run.sh" ]; then
    echo "bench-queue: no peer '$name' (known: $all_peers)" >&2
    exit 2
  fi
done
for name in "${names[@]}"; do
  file=$(mktemp)
  tmpfiles+=("$file")
  echo "bench-queue: measuring $name (PEERS=0 skips all peers, PEERS=$name only this one)" >&2
  if DATABASE_URL="$DATABASE_URL" "$root/scripts/peers/$name/run.sh" | tee "$file" >&2; then
    results+=("$file")
  else
    echo "bench-queue: peer $name FAILED; going on without its figures" >&2
    failed+=("$name")
  fi
done

cd "$root"
PEER_RESULTS=$(IFS=:; echo "${results[*]}")
PEERS_FAILED=$(IFS=,; echo "${failed[*]}")
export PEER_RESULTS PEERS_FAILED
"$root/scripts/with-scratch-db.sh" backlog_bench cargo bench -p queue --bench queue --locked
if [ "${#failed[@]}" -gt 0 ]; then
  echo "bench-queue: peer(s) failed, their figures are missing above: ${failed[*]}" >&2
  exit 1
fi
