// pg-boss peer benchmark, run by run.sh next to backlog's own queue benchmark
// (queue/benches/queue.rs) and the graphile-worker peer, so all three are
// measured on the same machine, server and day. pg-boss keeps finished jobs
// (state 'completed', archived after 12 hours by default), as backlog keeps
// its history; graphile-worker deletes them. Phases, with pg-boss's public
// API as its documentation presents it:
//
//   1. enqueue: 200,000 no-op jobs through `boss.insert`, 1,000 per call, one
//      call at a time (backlog's enqueue_batch has the same shape);
//   2. drain: for 1, 4 and 16 concurrent loops, a fresh queue of 200,000
//      jobs (clearStorage, insert, VACUUM ANALYZE; not timed), then each loop
//      calls `boss.fetch(queue, { batchSize: 50 })` and `boss.complete(queue,
//      ids)`: backlog's claim 50 + complete_batch loop, call for call. The
//      best of the three is the figure.
//      Only the first 10,000 jobs of the 200,000 are timed. pg-boss's fetch
//      orders by (priority desc, created_on, id), which no index of pg-boss
//      10 provides, and locks FOR UPDATE under its LIMIT, so PostgreSQL
//      sorts every waiting job on every fetch (EXPLAIN ANALYZE here: an
//      external merge sort of 198,000 rows, ~0.3 s per fetch at the default
//      work_mem). A full 200,000-job drain would take over ten minutes per
//      loop count. The cost grows with the queue's depth, so a smaller queue
//      would flatter it; the first 10,000 of 200,000 measure it at the depth
//      backlog and graphile-worker drain from (pg-boss issues #228 and #418
//      report the same with large queues).
//      Why fetch/complete and not `work()`: a work() worker sleeps for the
//      rest of its polling interval after every fetch, even a full one, so
//      its throughput is capped at batchSize / interval per worker (16
//      workers x 50 jobs / 0.5 s = 1,600 jobs/s): a setting, not the queue.
//      fetch/complete is pg-boss's documented pull API and what a pg-boss
//      user who wants throughput writes;
//   3. latency: 1,000 sequential jobs through `boss.send` to one `work()`
//      worker (batchSize 1). pg-boss 10 has no LISTEN/NOTIFY wake-up (backlog
//      and graphile-worker have): its workers only poll, so this worker polls
//      at pg-boss's documented minimum, pollingIntervalSeconds 0.5.
//      `notifyWorker()` would skip the wait, but only for a sender in the same
//      process as the worker, which is not how a queue is deployed; not used.
//      A sample is "handler began" minus "just before send".
//
// Reads DATABASE_URL, a database it owns (run.sh creates a fresh one).
// Progress and human-readable figures go to stdout; the LAST line is one JSON
// object that scripts/bench-queue.sh hands to the Rust benchmark.

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

import PgBoss from "pg-boss";

const JOBS = 200_000;
const ENQUEUE_BATCH = 1_000;
const DRAIN_BATCH = 50;
const DRAIN_MEASURED = 10_000; // jobs timed out of each 200,000-job queue
const DRAIN_LOOPS = [1, 4, 16];
const LATENCY_SAMPLES = 1_000;
const LATENCY_WARMUP = 10;
// pg-boss's smallest allowed polling interval (its attorney rejects less).
const POLLING_INTERVAL_SECONDS = 0.5;
// Connections in pg-boss's pool: one per drain loop at 16 loops, plus room
// for its own maintenance and scheduling queries (the default is 10).
const POOL_MAX = 20;
const QUEUE = "noop";
const LATENCY_QUEUE = "latency";
// Generous ceilings so a wedged run fails instead of hanging.
const DRAIN_TIMEOUT_MS = 10 * 60_000;
const LATENCY_JOB_TIMEOUT_MS = 10_000;

const connectionString = benchmarkDatabaseUrl();

const require = createRequire(import.meta.url);
const version = require("pg-boss/package.json").version;

// pg-boss's default schema, spelled out so the queries below match.
const schema = "pgboss";

// Defaults everywhere else: maintenance (expiry checks, archiving) runs every
// minute as in any pg-boss deployment, retention and archiving as shipped.
const boss = new PgBoss({ connectionString, schema, max: POOL_MAX });
// pg-boss raises maintenance and worker errors as events; unheard, Node would
// throw them. Count them: the run fails if any happened.
let errors = 0;
boss.on("error", (e) => {
  errors++;
  console.error(`pg-boss error: ${e?.stack ?? e?.message ?? e}`);
});
const sql = async (text, values) => (await boss.getDb().executeSql(text, values)).rows;

// Jobs of `name` by state, e.g. { created: 10, completed: 5 }.
async function states(name) {
  const rows = await sql(`select state, count(*)::int as n from ${schema}.job where name = $1 group by state`, [name]);
  return Object.fromEntries(rows.map((r) => [r.state, r.n]));
}

async function insertJobs(name, count) {
  for (let b = 0; b < count / ENQUEUE_BATCH; b++) {
    const jobs = [];
    for (let i = 0; i < ENQUEUE_BATCH; i++) jobs.push({ name, data: { n: b * ENQUEUE_BATCH + i } });
    await boss.insert(jobs);
  }
}

// Fresh statistics (and visibility map) for every table of pg-boss's schema,
// partitions included, so fetch is planned for the table as it now is. Read
// from the catalogue so this does not depend on a release's table names.
async function vacuumAnalyze() {
  const rows = await sql(
    `select format('%I.%I', schemaname, tablename) as t from pg_tables where schemaname = $1`,
    [schema],
  );
  await sql(`vacuum analyze ${rows.map((r) => r.t).join(", ")}`);
}

// `loops` concurrent fetch(50) + complete loops until DRAIN_MEASURED jobs
// have been fetched (a loop finishes its batch; the count may pass the mark
// by up to loops x 50). Returns jobs per second, from the first fetch to the
// last completion, and how many jobs that was.
async function drain(loops) {
  let fetched = 0;
  const started = performance.now();
  const runners = Array.from({ length: loops }, async () => {
    while (fetched < DRAIN_MEASURED) {
      const jobs = await boss.fetch(QUEUE, { batchSize: DRAIN_BATCH });
      if (jobs.length === 0) throw new Error("fetch found no job in a queue that has some");
      fetched += jobs.length;
      await boss.complete(
        QUEUE,
        jobs.map((j) => j.id),
      );
    }
  });
  await withTimeout(Promise.all(runners), DRAIN_TIMEOUT_MS, `drain with ${loops} loops`);
  const seconds = (performance.now() - started) / 1000;
  // fetch() answers [] on a query error too, and complete() does not say how
  // many jobs it completed, so the table has to show each fetched job
  // completed, once, and the rest still waiting.
  const left = await states(QUEUE);
  if (left.completed !== fetched || left.created !== JOBS - fetched) {
    throw new Error(`drain with ${loops} loops: ${fetched} jobs fetched, jobs by state ${JSON.stringify(left)}`);
  }
  return { rate: fetched / seconds, jobs: fetched, seconds };
}

let exitCode = 0;
try {
  await boss.start(); // installs (migrates) pg-boss's schema on first use
  announce("pg-boss", version);
  // pg-boss 10 needs a queue before its first job; default (standard) policy.
  await boss.createQueue(QUEUE);
  await boss.createQueue(LATENCY_QUEUE);

  // 1. Enqueue ---------------------------------------------------------------
  let cpu = process.cpuUsage();
  let started = performance.now();
  await insertJobs(QUEUE, JOBS);
  const enqueueSeconds = (performance.now() - started) / 1000;
  const enqueueRate = JOBS / enqueueSeconds;
  console.log(
    `enqueue (insert, batch ${ENQUEUE_BATCH}): ${fmtInt(enqueueRate)} jobs/s ` +
      `(${JOBS} jobs in ${enqueueSeconds.toFixed(2)} s; node CPU ${cpuSeconds(cpu)} s)`,
  );
  if ((await states(QUEUE)).created !== JOBS) throw new Error("enqueue: job table does not hold every job");

  // 2. Drain -----------------------------------------------------------------
  const drains = {};
  let bestDrain = 0;
  for (const loops of DRAIN_LOOPS) {
    await boss.clearStorage(); // empties the job and archive tables
    await insertJobs(QUEUE, JOBS);
    await vacuumAnalyze();
    cpu = process.cpuUsage();
    const { rate, jobs, seconds } = await drain(loops);
    console.log(
      `drain (fetch batch ${DRAIN_BATCH} + complete, ${String(loops).padStart(2)} loops): ` +
        `${fmtInt(rate)} jobs/s (first ${jobs} of ${JOBS} jobs in ${seconds.toFixed(2)} s; ` +
        `node CPU ${cpuSeconds(cpu)} s)`,
    );
    drains[`w${loops}_b${DRAIN_BATCH}`] = Math.round(rate);
    bestDrain = Math.max(bestDrain, rate);
  }
  await boss.clearStorage();
  await vacuumAnalyze();

  // 3. Enqueue → start latency ----------------------------------------------
  // A job sent just after the previous one started would reach the worker
  // exactly one polling interval after that job's fetch, every time: the
  // worst case, not what a job sent at an arbitrary moment sees. So before
  // each send, pause for a time drawn uniformly from [0, interval); samples
  // then cover the polling cycle evenly. The pause is not part of a sample.
  // (For a LISTEN/NOTIFY queue the pause would change nothing.) About 0.5 s
  // per sample, so this phase takes some 8 to 9 minutes.
  const interval = POLLING_INTERVAL_SECONDS * 1000;
  let waiting = null; // the deferred of the job now in flight
  const worker = await boss.work(LATENCY_QUEUE, { pollingIntervalSeconds: POLLING_INTERVAL_SECONDS }, async () => {
    // First thing the handler does: take the time.
    const at = performance.now();
    if (waiting) waiting.resolve(at);
  });
  const samples = [];
  try {
    for (let i = -LATENCY_WARMUP; i < LATENCY_SAMPLES; i++) {
      await sleep(Math.random() * interval);
      // Set up before the send: the job may start before send returns.
      waiting = deferred();
      const sent = performance.now();
      await boss.send(LATENCY_QUEUE, { n: i });
      const began = await withTimeout(waiting.promise, LATENCY_JOB_TIMEOUT_MS, `latency job ${i}`);
      if (i >= 0) samples.push(began - sent);
    }
  } finally {
    waiting = null;
    await boss.offWork({ id: worker });
  }
  const { latency, words } = latencyFigures(samples);
  console.log(
    `enqueue→start over ${LATENCY_SAMPLES} sequential jobs after ${LATENCY_WARMUP} unmeasured ` +
      `(send, work() polling every ${POLLING_INTERVAL_SECONDS} s, batchSize 1, random send phase): ` +
      words,
  );
  if (errors > 0) throw new Error(`pg-boss raised ${errors} error event(s); figures not reported`);

  console.log(
    JSON.stringify({
      peer: "pg-boss",
      version,
      enqueue_jobs_per_s: Math.round(enqueueRate),
      drain_jobs_per_s: Math.round(bestDrain),
      drain_by_loops: drains,
      drain_note: `first ${DRAIN_MEASURED} jobs of a ${JOBS}-job queue`,
      latency_ms: latency,
      latency_wakeup: `polling every ${POLLING_INTERVAL_SECONDS} s`,
      tls: usesTls(await sql(TLS_QUERY)),
      jobs: JOBS,
    }),
  );
} catch (e) {
  console.error(`bench.mjs: ${e?.stack ?? e}`);
  exitCode = 1;
} finally {
  // Not graceful: nothing of this run is worth waiting for.
  await boss.stop({ graceful: false, wait: true, timeout: 1000 }).catch((e) => console.error(`bench.mjs: stop: ${e}`));
}
// Exit explicitly: a stray timer or socket must not keep a finished run alive.
process.exit(exitCode);
