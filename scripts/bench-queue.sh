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
