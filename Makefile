# backlog: `make run` starts the whole system, `make test` runs every test.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: test run build db tools fmt lint bench-queue

## Run every test against a real PostgreSQL (found or started).
test: tools
	DATABASE_URL="$$(scripts/ensure-postgres.sh)" $(CARGO) test --workspace --locked

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

## Queue throughput and latency against pgbench and graphile-worker (PEERS=0 skips the peer).
bench-queue:
	DATABASE_URL="$$(scripts/ensure-postgres.sh)" PEERS="$(PEERS)" scripts/bench-queue.sh
