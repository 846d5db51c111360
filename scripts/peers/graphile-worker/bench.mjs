// graphile-worker peer benchmark, run by run.sh next to backlog's own queue
// benchmark (queue/benches/queue.rs) so the two are measured on the same
// machine, server and day. It mirrors that benchmark's three phases, using
// graphile-worker's own public API the way its documentation intends:
//
//   1. enqueue: 200,000 no-op jobs through `workerUtils.addJobs`, 1,000 per
//      call, one connection at a time (backlog's enqueue_batch has the same
//      shape), then ANALYZE graphile-worker's tables;
//   2. drain: one `run()` worker pool with the batched settings graphile-worker
//      documents for throughput (concurrentJobs 24, localQueue 500, job
//      completion/failure batching with delay 0), timed from `run()` until
//      the job table is empty; then the table is vacuumed (backlog's are
//      truncated and vacuumed before each fill), filled again and drained
//      with a local queue of 50, so one fetch takes as many jobs as one of
//      backlog's batched claims (the matched setting);
//      BENCH_SCOPE=targets (a round of `make bench-queue ROUNDS=N`) skips the
//      documented-settings drain and drains the first fill at 50;
//   3. latency: 1,000 sequential jobs through `workerUtils.addJob` against a
//      default pool (concurrency 1, woken by LISTEN/NOTIFY); each is added
//      only after the previous one started, and a sample is "task began" minus
//      "just before addJob". Samples start once the pool is listening.
//
// Reads DATABASE_URL, a database it owns (run.sh creates a fresh one).
// Progress and human-readable figures go to stdout; the LAST line is one JSON
// object that scripts/bench-queue.sh hands to the Rust benchmark.

import { EventEmitter, once } from "node:events";
import { createRequire } from "node:module";
import { performance } from "node:perf_hooks";
import { setTimeout as sleep } from "node:timers/promises";

import {
  announce,
  benchmarkDatabaseUrl,
  cpuSeconds,
  deferred,
  fmtInt,
  latencyFigures,
  TLS_QUERY,
  usesTls,
  withTimeout,
} from "./common.mjs";

// graphile-worker logs one info line per successful job. At ~10^4 jobs/s that
// formatting and console I/O would be what we measure, and it would flood
// stdout. The library reads this variable when its modules load, so it has to
// be set before the dynamic import below (static imports are hoisted).
process.env.NO_LOG_SUCCESS = "1";
const { Logger, makeWorkerUtils, run } = await import("graphile-worker");

const JOBS = 200_000;
const ENQUEUE_BATCH = 1_000;
const LATENCY_SAMPLES = 1_000;
const LATENCY_WARMUP = 10;
const DRAIN_POLL_MS = 50;
// The drain settings graphile-worker's performance page uses for its own
// figures (worker.graphile.org/docs/performance): 24 concurrent jobs, a pool
// of 25 connections, a 500-job local queue, completions/failures batched.
const DRAIN_WORKER = {
  concurrentJobs: 24,
  maxPoolSize: 25,
  localQueue: { size: 500 },
  completeJobBatchDelay: 0,
  failJobBatchDelay: 0,
};
// The local queue's size is how many jobs one fetch takes; backlog's batched
// drain claims 50 at a time.
const MATCHED_LOCAL_QUEUE = 50;
// Generous ceilings so a wedged worker fails the run instead of hanging it.
const DRAIN_TIMEOUT_MS = 10 * 60_000;
const LATENCY_JOB_TIMEOUT_MS = 10_000;

const connectionString = benchmarkDatabaseUrl();
// "all", or "targets": only what issue #16's targets compare (enqueue, the
// drain at 50, latency), for the alternating rounds of scripts/bench-queue.sh.
const SCOPE = process.env.BENCH_SCOPE || "all";
if (SCOPE !== "all" && SCOPE !== "targets") {
  console.error(`bench.mjs: BENCH_SCOPE must be all or targets, got ${JSON.stringify(SCOPE)}`);
  process.exit(2);
}

const require = createRequire(import.meta.url);
const version = require("graphile-worker/package.json").version;

// Keep graphile-worker's warnings and errors (on stderr, so stdout stays ours)
// and drop its info/debug chatter ("Worker connected...", pool lifecycle).
const logger = new Logger((scope) => (level, message) => {
  if (level === "error" || level === "warning") {
    const where = scope.label ? `[${scope.label}] ` : "";
    console.error(`graphile-worker ${level}: ${where}${message}`);
  }
});

// graphile-worker's default schema, spelled out so the queries below match.
const schema = "graphile_worker";

// Rows still in graphile-worker's job table. Completed jobs are deleted, so
// zero means every job ran and its completion reached the database.
async function remainingJobs(utils) {
  return utils.withPgClient(async (client) => {
    const { rows } = await client.query(`select count(*)::int as n from ${schema}._private_jobs`);
    return rows[0].n;
  });
}

// Add JOBS no-op jobs, ENQUEUE_BATCH per addJobs call, one call at a time.
async function fill() {
  for (let b = 0; b < JOBS / ENQUEUE_BATCH; b++) {
    const specs = [];
    for (let i = 0; i < ENQUEUE_BATCH; i++) {
      specs.push({ identifier: "noop", payload: { n: b * ENQUEUE_BATCH + i } });
    }
    await utils.addJobs(specs);
  }
  if ((await remainingJobs(utils)) !== JOBS) throw new Error("enqueue: job table does not hold every job");
}

// Run `command` (ANALYZE, VACUUM ...) over every table of graphile-worker's
// schema, read from the catalogue so this does not depend on the private
// table names of a release.
async function everyTable(command) {
  await utils.withPgClient(async (client) => {
    const { rows } = await client.query(
      `select format('%I.%I', schemaname, tablename) as t from pg_tables where schemaname = $1`,
      [schema],
    );
    await client.query(`${command} ${rows.map((r) => r.t).join(", ")}`);
  });
}

// Run the JOBS queued jobs with a worker pool of these settings; jobs/s from
// run() until the job table is empty.
async function drain(worker) {
  // The handler counts runs: a run past JOBS would be a job executed twice.
  let ran = 0;
  const allRan = deferred();
  const cpu = process.cpuUsage();
  const started = performance.now();
  const drainer = await run({
    logger,
    preset: { worker: { connectionString, schema, ...worker } },
    taskList: {
      noop: async () => {
        if (++ran === JOBS) allRan.resolve();
      },
    },
  });
  let drainSeconds;
  let drainCpu;
  try {
    // A worker pool that dies mid-drain settles runner.promise; fail then.
    const died = drainer.promise.then(() => {
      throw new Error("drain: worker pool stopped before the queue was empty");
    });
    died.catch(() => {}); // handled by the race; stopping the pool later settles it too
    await withTimeout(Promise.race([allRan.promise, died]), DRAIN_TIMEOUT_MS, "drain");
    // Every job has run; it is done once the batched completion has deleted it.
    // Polling only now keeps count(*) scans off the CPU during the drain.
    while ((await remainingJobs(utils)) > 0) await sleep(DRAIN_POLL_MS);
    drainSeconds = (performance.now() - started) / 1000;
    drainCpu = cpuSeconds(cpu);
  } finally {
    await drainer.stop();
  }
  if (ran !== JOBS) throw new Error(`drain: ${ran} task runs for ${JOBS} jobs`);
  const drainRate = JOBS / drainSeconds;
  console.log(
    `drain (concurrentJobs ${worker.concurrentJobs}, localQueue ${worker.localQueue.size}, ` +
      `completeJobBatchDelay ${worker.completeJobBatchDelay}): ${fmtInt(drainRate)} jobs/s ` +
      `(${JOBS} jobs in ${drainSeconds.toFixed(2)} s from run() to an empty job table; node CPU ${drainCpu} s)`,
  );
  return drainRate;
}

// makeWorkerUtils installs (migrates) graphile-worker's schema on first use.
const utils = await makeWorkerUtils({ connectionString, logger, schema });
let exitCode = 0;
try {
  announce("graphile-worker", version);

  // 1. Enqueue ---------------------------------------------------------------
  const cpu = process.cpuUsage();
  const started = performance.now();
  await fill();
  const enqueueSeconds = (performance.now() - started) / 1000;
  const enqueueRate = JOBS / enqueueSeconds;
  console.log(
    `enqueue (addJobs, batch ${ENQUEUE_BATCH}): ${fmtInt(enqueueRate)} jobs/s ` +
      `(${JOBS} jobs in ${enqueueSeconds.toFixed(2)} s; node CPU ${cpuSeconds(cpu)} s)`,
  );
  // Fresh statistics, so the drain's job-fetch query is planned for a table
  // of 200k rows, not from whatever (if any) statistics an empty table had.
  await everyTable("analyze");

  // 2. Drain, at the documented settings and at backlog's batch ------------
  let drainRate = null;
  if (SCOPE === "all") {
    drainRate = await drain(DRAIN_WORKER);
    // The first drain's 200,000 deleted rows cleared before the second fill,
    // as backlog's benchmark truncates and vacuums its tables before each
    // fill. Without it the matched drain ran over a table that still held
    // them or not, as autovacuum happened to reach it in time.
    await everyTable("vacuum");
    await fill();
    await everyTable("analyze");
  }
  const matchedDrainRate = await drain({ ...DRAIN_WORKER, localQueue: { size: MATCHED_LOCAL_QUEUE } });
  // And cleared again before the latency phase, as backlog's is.
  await everyTable("vacuum analyze");

  // 3. Enqueue → start latency ----------------------------------------------
  // Default pool: concurrency 1, no local queue, no completion batching; new
  // jobs reach it through graphile-worker's LISTEN/NOTIFY on 'jobs:insert'.
  //
  // run() resolves before the pool has issued its LISTEN; a job added in that
  // gap waits for the next poll (pollInterval, 2 s) and would be measured as
  // 2,000 ms. So wait for the pool's listen event, then run a few unmeasured
  // jobs: once one of them has started, the LISTEN (sent on the listening
  // connection before it) has completed, as it has in backlog's benchmark
  // before its first sample.
  let waiting = null; // the deferred of the job now in flight
  const events = new EventEmitter();
  const listening = once(events, "pool:listen:success");
  const listener = await run({
    logger,
    events,
    preset: { worker: { connectionString, schema } },
    taskList: {
      latency: async () => {
        // First thing the task does: take the time.
        const at = performance.now();
        if (waiting) waiting.resolve(at);
      },
    },
  });
  const samples = [];
  try {
    await withTimeout(listening, LATENCY_JOB_TIMEOUT_MS, "latency worker LISTEN");
    for (let i = -LATENCY_WARMUP; i < LATENCY_SAMPLES; i++) {
      // Set up before the add: the job may start before addJob returns.
      waiting = deferred();
      const sent = performance.now();
      await utils.addJob("latency", { n: i });
      const began = await withTimeout(waiting.promise, LATENCY_JOB_TIMEOUT_MS, `latency job ${i}`);
      if (i >= 0) samples.push(began - sent);
    }
  } finally {
    waiting = null;
    await listener.stop();
  }
  const { latency, words } = latencyFigures(samples);
  console.log(
    `enqueue→start over ${LATENCY_SAMPLES} sequential jobs after ${LATENCY_WARMUP} unmeasured ` +
      `(addJob, LISTEN/NOTIFY, concurrency 1): ` +
      words,
  );

  console.log(
    JSON.stringify({
      peer: "graphile-worker",
      version,
      scope: SCOPE,
      enqueue_jobs_per_s: Math.round(enqueueRate),
      // Not measured in the targets scope.
      ...(drainRate === null
        ? {}
        : { drain_jobs_per_s: Math.round(drainRate), drain_local_queue: DRAIN_WORKER.localQueue.size }),
      drain_matched_batch_jobs_per_s: Math.round(matchedDrainRate),
      drain_matched_local_queue: MATCHED_LOCAL_QUEUE,
      latency_ms: latency,
      latency_wakeup: "LISTEN/NOTIFY",
      tls: await utils.withPgClient(async (client) => usesTls((await client.query(TLS_QUERY)).rows)),
      jobs: JOBS,
    }),
  );
} catch (e) {
  console.error(`bench.mjs: ${e?.stack ?? e}`);
  exitCode = 1;
} finally {
  await utils.release();
}
// Exit explicitly: a stray timer or socket must not keep a finished run alive.
process.exit(exitCode);
