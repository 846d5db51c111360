# backlog: `make run` starts the whole system, `make test` runs every test.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: test run build db tools fmt lint validate-manifests fuzz-api chaos bench-queue bench-api bench-autoscale bench-workers

## Run every test against a real PostgreSQL (found or started), the manifests' validation, then a short API fuzz.
test: tools
	DATABASE_URL="$$(scripts/ensure-postgres.sh)" $(CARGO) test --workspace --locked
	scripts/validate-manifests.sh
	scripts/fuzz-api.sh --quick

## The manifests and their kustomize output against the Kubernetes schemas (strict, offline), WorkerPools against the CRD.
validate-manifests: tools
	scripts/validate-manifests.sh

## Fuzz the API from its OpenAPI document (schemathesis) on a scratch database.
fuzz-api: tools
	scripts/fuzz-api.sh

## Start PostgreSQL, the API and the controller with local worker pools.
run:
	scripts/run.sh

build:
	$(CARGO) build --workspace --locked

## Print a DATABASE_URL, starting a throwaway PostgreSQL when none answers.
db:
	@scripts/ensure-postgres.sh

tools:
	@scripts/ensure-tools.sh

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

## Queue throughput and latency against pgbench, graphile-worker and pg-boss (PEERS=0 skips the peers, PEERS=pg-boss picks; ROUNDS=5 alternates issue #16's figures with graphile-worker's).
bench-queue:
	DATABASE_URL="$$(scripts/ensure-postgres.sh)" PEERS="$(PEERS)" scripts/bench-queue.sh

## API requests/s and p99 at 64 connections against pgbench's simple-update and select-only.
bench-api:
	DATABASE_URL="$$(scripts/ensure-postgres.sh)" $(CARGO) bench -p api --bench api --locked

## The scaling policy against KEDA+HPA (defaults and matched windows) and a fixed pool on five traces, then activation in the real loop.
bench-autoscale:
	DATABASE_URL="$$(scripts/ensure-postgres.sh)" scripts/with-scratch-db.sh backlog_bench_autoscale \
		$(CARGO) bench -p controller --bench autoscale --locked

## Pipeline throughput (PDF pages/s, audio real-time factor) and the runtime's no-op task rate.
bench-workers: tools
	DATABASE_URL="$$(scripts/ensure-postgres.sh)" scripts/with-scratch-db.sh backlog_bench_workers \
		$(CARGO) run --release --locked -p workers --bin bench-pipelines

## The real binaries under SIGKILLs and PostgreSQL restarts (a throwaway cluster of its own), then
## a check of every guarantee; CHAOS_JOBS=N resizes it. Ends with one JSON line, exits 1 on a violation.
chaos: tools
	CARGO="$(CARGO)" scripts/chaos.py
