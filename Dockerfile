# syntax=docker/dockerfile:1
# One image for every process group in fly.toml: api, worker, text-worker,
# pdf-worker, audio-worker and controller, with espeak-ng and fonts.

# --- build: compile the workspace once ---
FROM rust:1-slim-bookworm AS build
WORKDIR /src
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential pkg-config \
 && rm -rf /var/lib/apt/lists/*
COPY . .
# sqlx's migrate! macro embeds migrations/ at compile time; no database needed.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        -p api --bin api \
        -p workers --bin worker --bin text-worker --bin pdf-worker --bin audio-worker \
        -p controller --bin controller \
 && mkdir -p /out \
 && cp target/release/api target/release/worker target/release/text-worker \
       target/release/pdf-worker target/release/audio-worker target/release/controller /out/

# --- runtime: slim, no compiler ---
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates espeak-ng fonts-dejavu-core fonts-noto-core fonts-noto-cjk tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 backlog \
 && useradd --system --uid 10001 --gid 10001 --home /app backlog \
 && mkdir -p /app/artifacts && chown 10001:10001 /app /app/artifacts
WORKDIR /app
COPY --from=build /out/ /usr/local/bin/
COPY manifests/fly/pools.yaml /app/manifests/fly/pools.yaml
# Numeric, so the kubelet can check runAsNonRoot without reading /etc/passwd
# (a name fails with "image has non-numeric user"); the manifests set the same ids.
USER 10001:10001
EXPOSE 8787
# tini forwards SIGTERM so workers drain before the machine stops.
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["api"]
