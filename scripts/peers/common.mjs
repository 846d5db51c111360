// Helpers both peer benchmarks (scripts/peers/*/bench.mjs) use; peer.sh
// copies this file next to the peer's bench.mjs.

import os from "node:os";

// The benchmark database from DATABASE_URL; exits 2 without one.
export function benchmarkDatabaseUrl() {
  const url = process.env.DATABASE_URL;
  if (!url) {
    console.error("bench.mjs: DATABASE_URL must name the benchmark database");
    process.exit(2);
  }
  return url;
}

// Prints the run's heading. The figures are only comparable on an otherwise
// idle machine; say so when it is not, rather than letting a busy run pass as
// a slow library.
export function announce(library, version) {
  const cores = os.availableParallelism();
  const [load1] = os.loadavg();
  console.log(
    `${library} ${version} benchmark (node ${process.version}, ${cores} cores, ` +
      `load average ${load1.toFixed(2)} at start)`,
  );
  if (load1 > cores / 2) {
    console.error(
      `bench.mjs: warning: load average ${load1.toFixed(2)} on ${cores} cores; ` +
        `other processes will lower these figures`,
    );
  }
}

// Whether `rows` (the answer to TLS_QUERY on the peer's own connection)
// says the connection is encrypted; the report compares it with backlog's.
export const TLS_QUERY = "select coalesce((select ssl from pg_stat_ssl where pid = pg_backend_pid()), false) as tls";
export const usesTls = (rows) => rows[0]?.tls === true;

// Resolved/rejected from outside; used to hand a value from a job handler
// back to the measuring loop.
export function deferred() {
  let resolve;
  let reject;
  const promise = new Promise((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

export function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: timed out after ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// Same nearest-rank rule as queue/benches/queue.rs, so p50/p99 compare.
function percentile(sorted, p) {
  return sorted[Math.round((sorted.length - 1) * p)];
}

const round2 = (x) => Math.round(x * 100) / 100;

// avg, p50 and p99 of latency samples in ms, and the same as words.
export function latencyFigures(samples) {
  const sorted = [...samples].sort((a, b) => a - b);
  const latency = {
    avg: round2(sorted.reduce((s, x) => s + x, 0) / sorted.length),
    p50: round2(percentile(sorted, 0.5)),
    p99: round2(percentile(sorted, 0.99)),
  };
  const words = `avg ${latency.avg.toFixed(2)} ms, p50 ${latency.p50.toFixed(2)} ms, p99 ${latency.p99.toFixed(2)} ms`;
  return { latency, words };
}

// CPU seconds this Node process used since `since` (a process.cpuUsage()).
// Printed beside each phase: wall time far above it, with PostgreSQL also
// short of CPU, usually means other processes were sharing the cores.
export const cpuSeconds = (since) => {
  const { user, system } = process.cpuUsage(since);
  return ((user + system) / 1e6).toFixed(1);
};

export const fmtInt = (x) => Math.round(x).toLocaleString("en-US");
