#!/usr/bin/env python3
"""make chaos: the real binaries under fire, then a check of every guarantee.

Starts a throwaway PostgreSQL cluster (its own port and temp dir: it is
restarted mid-run, so never the shared server), migrates it, creates a key,
runs `api serve` and `controller run --backend local` with generated
WorkerPools, and submits jobs over HTTP with idempotency keys. While they
run it SIGKILLs random workers, the API and the controller (preferably just
after a scale-down) and restarts PostgreSQL with `pg_ctl restart -m fast`.
Then it lets the system settle (bounded) and checks, from the database, the
store, the process table and the processes' logs:

  jobs        every submitted key has exactly one job, and it is complete
              (a doomed one, failed: no job stays open)
  tasks       every task complete; none completed twice (worker logs)
  artifacts   one row per (job, kind) the job type produces; recorded
              sha256 and byte count equal the bytes in the store
  drain       no replica got SIGTERM while it held a task (its own log)
  exits       no api/controller/worker exited unless this script killed it
  registry    no `workers` row left draining once the pools are at zero
  replicas    never more live replicas of a pool than maxReplicas
              (process table sampled every 200 ms)
  orphans     no worker process left after the controller's last shutdown

It prints its figures and ends with one JSON line; exit status 1 when any
violation was found. Python's standard library only; psql for the checks.

Settings (environment, or the flags of --help):
  CHAOS_JOBS (2000)          jobs to submit, `text` and `reading` mixed
  CHAOS_READING_SHARE (0.1)  share of `reading` jobs (text -> pdf + audio)
  CHAOS_DOOMED_SHARE (0.02)  share of `reading` jobs with a voice espeak-ng
                             lacks: audio fails for good, pdf completes, and
                             the job must end `failed`
  CHAOS_SECONDS (150)        length of the chaos window
  CHAOS_SETTLE_SECONDS (150) longest wait for every job to finish after it
  CHAOS_SEED                 random seed (default: time-based, printed)
  CHAOS_KEEP=1               keep the temp dir (cluster, store, logs)
  CHAOS_NO_BUILD=1           skip `cargo build --locked --bins`
The logs of the last run are copied to $CARGO_TARGET_DIR/chaos-logs.
"""

import argparse
import glob
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
TENANT = "chaos"
BINARIES = ["api", "controller", "text-worker", "pdf-worker", "audio-worker"]
# The pools the controller runs: one per worker binary, small maxReplicas and
# short cooldowns so they scale up and down (and drain) many times a run.
POOLS = {
    "text": {"task": "text_generation", "binary": "text-worker", "max": 3, "per_replica": 8},
    "pdf": {"task": "pdf_generation", "binary": "pdf-worker", "max": 3, "per_replica": 2},
    "audio": {"task": "audio_generation", "binary": "audio-worker", "max": 3, "per_replica": 2},
}
EXPECTED_KINDS = {"reading": {"text", "pdf", "audio"}, "text": {"text"}}
EXPECTED_TASKS = {
    "reading": {"text_generation", "pdf_generation", "audio_generation"},
    "text": {"text_generation"},
}
VIOLATION_KINDS = [
    "job_lost",  # the API answered with a job id the database does not have
    "submit_failed",  # a job could not be submitted within the bound
    "job_duplicated",  # more than one job for one idempotency key
    "job_not_complete",  # queued/processing after the settle bound, or failed/cancelled
    "doomed_job_not_failed",  # a job whose audio failed for good is not `failed` (still open)
    "task_not_complete",
    "task_completed_twice",  # two "task complete" log lines for one task id
    "artifact_missing",  # an expected (job, kind) has no row
    "artifact_unexpected",  # a row of a kind the job type does not produce
    "artifact_mismatch",  # recorded sha256/bytes differ from the stored bytes
    "artifact_file_missing",
    "stopped_busy_replica",  # SIGTERM from the controller while holding a task
    "worker_exited_unexpectedly",  # a started worker exited with an error
    "worker_crashed_on_start",  # a worker exited with an error before it started
    "api_exited_unexpectedly",
    "controller_exited_unexpectedly",
    "draining_left",  # a workers row still draining with the pools at zero
    "max_replicas_exceeded",  # episodes of more live replicas than maxReplicas
    "orphaned_workers",  # worker processes alive after the controller's last exit
]


def log(msg):
    print(f"chaos [{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def env_or(name, default, cast=str):
    value = os.environ.get(name)
    return cast(value) if value not in (None, "") else default


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_postgres(cmd):
    # initdb and postgres refuse to run as root.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def read_json_lines(path):
    """The JSON log lines of a file, and its other lines (panics, `Error:`)."""
    events, other = [], []
    try:
        with open(path, errors="replace") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                if line.startswith("{"):
                    try:
                        event = json.loads(line)
                    except ValueError:
                        pass
                    else:
                        # The api nests its fields; the other binaries flatten them.
                        if isinstance(event.get("fields"), dict):
                            event = {**event, **event.pop("fields")}
                        events.append(event)
                        continue
                other.append(line)
    except FileNotFoundError:
        pass
    return events, other


def other_checkouts():
    """The repository's other worktrees: their builds may share a target dir."""
    try:
        out = subprocess.run(["git", "-C", ROOT, "worktree", "list", "--porcelain"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    paths = [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("worktree ")]
    return [p for p in paths if os.path.realpath(p) != os.path.realpath(ROOT)]


def checkouts_in(binary, checkouts):
    """Which of `checkouts` the binary's debug info names (as the DWARF
    comp_dir of a crate, or a path under it)."""
    needles = {c: (os.path.realpath(c).encode() + b"\0", os.path.realpath(c).encode() + b"/")
               for c in checkouts}
    overlap = max((len(n[0]) for n in needles.values()), default=0)
    found = set()
    with open(binary, "rb") as f:
        prev = b""
        while chunk := f.read(1 << 24):
            window = prev[-overlap:] + chunk
            found.update(c for c, ns in needles.items() if any(n in window for n in ns))
            prev = chunk
    return found


def log_stamp(t):
    """`t` (epoch seconds) as the services' JSON logs write time (UTC, µs),
    so the two compare as strings."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}"


def tail(path, n=5):
    try:
        with open(path, errors="replace") as f:
            return [line.rstrip() for line in f.readlines()[-n:]]
    except FileNotFoundError:
        return []


class Cluster:
    """A throwaway PostgreSQL cluster in the run's temp dir."""

    def __init__(self, run_dir):
        dirs = sorted(
            glob.glob("/usr/lib/postgresql/*/bin"),
            key=lambda d: [int(x) for x in re.findall(r"\d+", d)],
        )
        if not dirs:
            sys.exit("chaos: no /usr/lib/postgresql/*/bin (run scripts/ensure-postgres.sh once)")
        self.bin = dirs[-1]
        self.dir = os.path.join(run_dir, "pg")
        self.data = os.path.join(self.dir, "data")
        self.log = os.path.join(self.dir, "log")
        os.makedirs(self.dir)
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        self.port = free_port()
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/postgres"
        self.started = False

    def pg_ctl(self, *args):
        cmd = as_postgres([os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-l", self.log, *args])
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=120)

    def start(self):
        subprocess.run(
            as_postgres([os.path.join(self.bin, "initdb"), "-D", self.data, "-U", "postgres",
                         "--auth=trust", "-E", "UTF8"]),
            check=True, stdout=subprocess.DEVNULL, timeout=120,
        )
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.dir} -c max_connections=300 -c fsync=off"
        self.pg_ctl("-w", "-o", opts, "start")
        self.started = True

    def restart(self):
        self.pg_ctl("-w", "-m", "fast", "restart")

    def stop(self):
        if self.started:
            try:
                self.pg_ctl("-w", "-m", "immediate", "stop")
            except Exception as e:  # noqa: BLE001 - best effort at exit
                log(f"stopping PostgreSQL: {e}")
            self.started = False

    def query(self, sql):
        """Rows of a query as lists of strings (psql, unaligned, tab-separated)."""
        out = subprocess.run(
            [os.path.join(self.bin, "psql"), self.url, "-X", "-At", "-F", "\t",
             "-v", "ON_ERROR_STOP=1", "-c", sql],
            check=True, capture_output=True, text=True, timeout=120,
        ).stdout
        return [line.split("\t") for line in out.splitlines() if line]


class Supervised:
    """The api or the controller: started, SIGKILLed and restarted by the
    harness, which notices any exit it did not cause."""

    def __init__(self, name, cmd, env, logs):
        self.name, self.cmd, self.env, self.logs = name, cmd, env, logs
        self.proc = None
        self.generation = 0
        self.log_path = None
        self.unexpected = []  # (generation, exit code, last log lines)

    def start(self):
        self.generation += 1
        self.log_path = os.path.join(self.logs, f"{self.name}-{self.generation}.log")
        out = open(self.log_path, "ab")
        # Its own session: a kill of this process alone, as a crash would be.
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None

    def check_exit(self):
        """True when the process exited on its own (recorded as unexpected)."""
        if self.proc is None or self.proc.poll() is None:
            return False
        code = self.proc.returncode
        # Its last words: the `Error:` or panic line when there is one.
        _, other = read_json_lines(self.log_path)
        errors = [line for line in other if line.startswith("Error") or "panicked" in line]
        last = errors[-1:] or tail(self.log_path, 2)
        self.unexpected.append((self.generation, code, last))
        log(f"{self.name} (generation {self.generation}) exited by itself with {code}: {' | '.join(last)}")
        self.proc = None
        return True

    def stop(self, timeout):
        """SIGTERM and wait; SIGKILL after `timeout`. Returns the exit code."""
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log(f"{self.name} did not stop within {timeout} s; killing it")
            self.proc.kill()
            return self.proc.wait(timeout=30)
        finally:
            self.proc = None


class ProcessWatch(threading.Thread):
    """Samples the process table every 200 ms: which worker processes of this
    run are alive, in which pool, under which parent. Counts, per pool, the
    live replicas that are not stopping (no SIGTERM received yet, per their
    log), and every episode above maxReplicas."""

    def __init__(self, bin_dir, logs):
        super().__init__(daemon=True)
        self.exes = {os.path.join(bin_dir, p["binary"]): name for name, p in POOLS.items()}
        self.logs = logs
        self.lock = threading.Lock()
        self.live = {}  # pid -> {pool, id, ppid}
        self.seen = {}  # pid -> {pool, id, first, last}
        self.max_live = {name: 0 for name in POOLS}
        self.max_counted = {name: 0 for name in POOLS}
        self.over = {name: False for name in POOLS}
        self.episodes = []  # (time, pool, counted, pids)
        self.samples = 0
        self.halt = threading.Event()

    def worker_log(self, worker_id, pid):
        return os.path.join(self.logs, f"worker-{worker_id}-{pid}.log")

    def stopping(self, info, pid):
        try:
            with open(self.worker_log(info["id"], pid), errors="replace") as f:
                return "signal received" in f.read()
        except FileNotFoundError:
            return False

    def scan(self):
        live = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                pool = self.exes.get(os.readlink(f"/proc/{entry}/exe"))
                if pool is None:
                    continue
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if fields[0] in ("Z", "X"):  # dead, not yet reaped
                    continue
                with open(f"/proc/{entry}/environ", "rb") as f:
                    env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
                continue
            live[int(entry)] = {
                "pool": pool,
                "id": env.get(b"WORKER_ID", b"?").decode(),
                "ppid": int(fields[1]),
            }
        # Between fork and exec, a worker's child (an espeak-ng on its way)
        # still shows the worker's binary and environment: it is no replica.
        return {pid: i for pid, i in live.items() if i["ppid"] not in live}

    def run(self):
        while not self.halt.wait(0.2):
            self.sample()

    def sample(self):
        live = self.scan()
        now = time.monotonic()
        with self.lock:
            self.live = live
            self.samples += 1
            for pid, info in live.items():
                seen = self.seen.setdefault(pid, {**info, "first": now})
                seen["last"] = now
            for pool, spec in POOLS.items():
                pids = [pid for pid, i in live.items() if i["pool"] == pool]
                self.max_live[pool] = max(self.max_live[pool], len(pids))
                counted = pids
                if len(pids) > spec["max"]:
                    # A replica that got SIGTERM is on its way out (as a
                    # terminating pod is): only the others count.
                    counted = [pid for pid in pids if not self.stopping(live[pid], pid)]
                self.max_counted[pool] = max(self.max_counted[pool], len(counted))
                over = len(counted) > spec["max"]
                if over and not self.over[pool]:
                    self.episodes.append((time.time(), pool, len(counted),
                                          [(pid, live[pid]["id"], live[pid]["ppid"]) for pid in counted]))
                    log(f"pool {pool}: {len(counted)} live replicas > maxReplicas {spec['max']}: "
                        f"{[(pid, live[pid]['id']) for pid in counted]}")
                self.over[pool] = over

    def snapshot(self):
        with self.lock:
            return dict(self.live)


class Submitter:
    """Submits the jobs over HTTP in waves, each with its own idempotency key;
    a request that fails (API killed, connection refused, 5xx) is retried with
    the same key, so it can never create a second job."""

    def __init__(self, jobs, api_port, key, run_id, threads=4):
        self.jobs = jobs
        self.port, self.key, self.run_id, self.threads = api_port, key, run_id, threads
        self.next = 0
        self.limit = 0  # jobs[:limit] may be submitted now
        self.lock = threading.Lock()
        self.results = {}  # idempotency key -> job id
        self.created = self.replayed = self.retries = 0
        self.failed = {}  # idempotency key -> last error
        self.deadline = None
        self.pool = []

    def release(self, upto, deadline):
        with self.lock:
            self.limit = min(len(self.jobs), upto)
            self.deadline = deadline
        if not self.pool:
            self.pool = [threading.Thread(target=self.work, daemon=True) for _ in range(self.threads)]
            for t in self.pool:
                t.start()

    def done(self):
        with self.lock:
            return len(self.results) + len(self.failed) >= len(self.jobs)

    def take(self):
        while True:
            with self.lock:
                if self.next >= len(self.jobs):
                    return None
                if self.next < self.limit:
                    self.next += 1
                    return self.next - 1
            time.sleep(0.05)

    def work(self):
        conn = None
        while (i := self.take()) is not None:
            idem, body = self.jobs[i]
            delay, last = 0.1, None
            while True:
                if time.monotonic() > self.deadline:
                    with self.lock:
                        self.failed[idem] = last
                    break
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
                    conn.request("POST", "/v1/jobs", body=body, headers={
                        "Authorization": f"Bearer {self.key}",
                        "Content-Type": "application/json",
                        "Idempotency-Key": idem,
                    })
                    resp = conn.getresponse()
                    data = resp.read()
                    if resp.status in (200, 201):
                        with self.lock:
                            self.results[idem] = json.loads(data)["id"]
                            if resp.status == 201:
                                self.created += 1
                            else:
                                self.replayed += 1
                        break
                    last = f"HTTP {resp.status}: {data[:200]!r}"
                    if resp.status < 500:
                        # A 4xx will not change on retry: the harness or the API is wrong.
                        with self.lock:
                            self.failed[idem] = last
                        break
                except (OSError, http.client.HTTPException) as e:
                    last = f"{type(e).__name__}: {e}"
                    if conn is not None:
                        conn.close()
                    conn = None
                with self.lock:
                    self.retries += 1
                time.sleep(delay)
                delay = min(delay * 2, 2.0)


# A voice name espeak-ng accepts but does not have: the audio task of a
# doomed job fails for good (not retried) while its pdf task completes.
DOOMED_VOICE = "zz-chaos"


def build_jobs(count, reading_share, doomed_share, run_id, rng):
    """(idempotency key, body) per job. Doomed jobs are `reading` jobs whose
    audio cannot succeed: they must end `failed`, never stay open."""
    jobs = []
    for i in range(count):
        draw = rng.random()
        doomed = draw < doomed_share
        kind = "reading" if doomed or draw < doomed_share + reading_share else "text"
        data = {
            "prompt": f"chaos {run_id} job {i}: the tides of a {rng.choice(['cold', 'warm', 'grey'])} sea",
            "title": f"Chaos {i}",
        }
        if doomed:
            data["voice"] = DOOMED_VOICE
        body = json.dumps({"type": kind, "input": data})
        jobs.append((f"chaos-{run_id}-{'doomed-' if doomed else ''}{i}", body))
    return jobs


def write_pools(path, bin_dir):
    wrap = os.path.join(bin_dir, "worker-wrap")
    docs = []
    for name, p in POOLS.items():
        docs.append(f"""apiVersion: backlog.dev/v1alpha1
kind: WorkerPool
metadata:
  name: {name}
spec:
  taskTypes: [{p['task']}]
  target:
    local:
      command: [{wrap}, {os.path.join(bin_dir, p['binary'])}]
  minReplicas: 0
  maxReplicas: {p['max']}
  tasksPerReplica: {p['per_replica']}
  cooldownPeriod: 4
  scaleDown:
    stabilizationWindowSeconds: 3
    periodSeconds: 2
""")
    with open(path, "w") as f:
        f.write("---\n".join(docs))


class Harness:
    def __init__(self, args):
        self.args = args
        self.seed = args.seed if args.seed is not None else int(time.time())
        self.rng = random.Random(self.seed)
        self.run_id = uuid.uuid4().hex[:8]
        base = os.environ.get("CHAOS_TMPDIR") or ("/var/tmp" if os.path.isdir("/var/tmp") else None)
        self.dir = tempfile.mkdtemp(prefix="backlog-chaos-", dir=base)
        os.chmod(self.dir, 0o755)  # the postgres user must reach its data dir
        self.bin = os.path.join(self.dir, "bin")
        self.logs = os.path.join(self.dir, "logs")
        self.store = os.path.join(self.dir, "artifacts")
        for d in (self.bin, self.logs, self.store):
            os.makedirs(d)
        self.cluster = None
        self.api = self.controller = None
        self.watch = None
        self.kills = {"worker": 0, "api": 0, "controller": 0, "postgres_restart": 0}
        self.killed_workers = set()  # pids this harness SIGKILLed
        self.controller_kills_in_scale_down = 0
        self.final_shutdown_at = None
        self.figures = {}

    # ------------------------------------------------------------ set-up

    def prepare_binaries(self):
        """Private links to the binaries of this checkout: the process table
        then tells this run's workers from anyone else's, and a rebuild
        mid-run swaps nothing. Each binary must be built from this checkout
        alone: a target dir shared with other worktrees of the repository
        can hold crates compiled from their sources (cargo takes a crate as
        fresh when this checkout's files are older than its output), so a
        binary whose debug info names another worktree is refused."""
        if not os.environ.get("CHAOS_NO_BUILD"):
            log("cargo build --locked --bins")
            subprocess.run([os.environ.get("CARGO") or "cargo", "build", "--locked", "--bins"],
                           cwd=ROOT, check=True)
        others = other_checkouts()
        for name in BINARIES:
            src = os.path.join(TARGET, "debug", name)
            dst = os.path.join(self.bin, name)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
            found = checkouts_in(dst, [ROOT, *others])
            if ROOT not in found or found - {ROOT}:
                sys.exit(f"chaos: {src} holds code built from {sorted(found - {ROOT}) or 'elsewhere'}, "
                         f"not only from {ROOT}: give this checkout a target dir of its own "
                         f"(CARGO_TARGET_DIR) and run again")

        wrap = os.path.join(self.bin, "worker-wrap")
        with open(wrap, "w") as f:
            # exec keeps the pid: the controller's child is the worker itself,
            # with a log of its own (replicas otherwise share the controller's).
            f.write('#!/bin/sh\nexec "$@" >>"$CHAOS_LOGS/worker-$WORKER_ID-$$.log" 2>&1\n')
        os.chmod(wrap, 0o755)

    def start(self):
        # A missing tool would fail tasks for reasons that are not the system's.
        for tool in ("espeak-ng", "runuser" if os.geteuid() == 0 else "true"):
            if shutil.which(tool) is None:
                sys.exit(f"chaos: {tool} is not installed (scripts/ensure-tools.sh installs what the pipelines need)")
        self.prepare_binaries()
        self.cluster = Cluster(self.dir)
        log(f"PostgreSQL on 127.0.0.1:{self.cluster.port} in {self.cluster.dir}")
        self.cluster.start()
        self.api_port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "CONTROLLER_"))}
        self.env.update({
            "DATABASE_URL": self.cluster.url,
            "CHAOS_RUN": self.run_id,  # every process of the run carries it (cleanup)
            "CHAOS_LOGS": self.logs,
            "LLM_PROVIDER": "offline",
            "TTS_PROVIDER": "espeak",
            "ARTIFACT_STORE": f"file://{self.store}",
            "LOG_FORMAT": "json",
            "RUST_LOG": "info",
            "RUST_BACKTRACE": "0",  # an exit's `Error:` line, not a page of frames
            "BIND_ADDR": "127.0.0.1",
            "PORT": str(self.api_port),
            # Dead workers' tasks come back within seconds, not minutes.
            "SWEEPER_INTERVAL_SECONDS": "2",
            "SWEEPER_STALE_AFTER_SECONDS": "15",
            "WORKER_HEARTBEAT_SECONDS": "2",
            "WORKER_POLL_SECONDS": "2",
            "WORKER_SHUTDOWN_GRACE_SECONDS": "10",
            "CONTROLLER_TICK_SECONDS": "1",
            "CONTROLLER_STOP_GRACE_SECONDS": "15",
        })
        api = os.path.join(self.bin, "api")
        subprocess.run([api, "migrate"], env=self.env, check=True, stdout=subprocess.DEVNULL,
                       stderr=open(os.path.join(self.logs, "migrate.log"), "w"))
        self.key = subprocess.run([api, "keys", "create", "--tenant", TENANT], env=self.env, check=True,
                                  capture_output=True, text=True).stdout.strip()
        pools = os.path.join(self.dir, "pools")
        os.makedirs(pools)
        write_pools(os.path.join(pools, "pools.yaml"), self.bin)
        subprocess.run([os.path.join(self.bin, "controller"), "validate", "-f", pools], env=self.env,
                       check=True, stdout=subprocess.DEVNULL)
        self.api = Supervised("api", [api, "serve"], self.env, self.logs)
        self.controller = Supervised(
            "controller",
            [os.path.join(self.bin, "controller"), "run", "--backend", "local", "-f", pools],
            self.env, self.logs)
        self.api.start()
        self.wait_api()
        self.controller.start()
        self.watch = ProcessWatch(self.bin, self.logs)
        self.watch.start()

    def wait_api(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=2)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    return True
            except (OSError, http.client.HTTPException):
                pass
            if self.api.proc is not None and self.api.proc.poll() is not None:
                return False
            time.sleep(0.1)
        return False

    # ------------------------------------------------------------ chaos

    def controller_scaled_down_since(self, since):
        """True when the current controller logged a scale-down after `since`."""
        events, _ = read_json_lines(self.controller.log_path)
        for e in events:
            if isinstance(e.get("from"), int) and isinstance(e.get("to"), int) and e["to"] < e["from"]:
                stamp = e.get("timestamp", "")
                if stamp >= since:
                    return True
        return False

    def supervise(self):
        """Restart the api or controller when they exit on their own."""
        if self.api.check_exit():
            time.sleep(1)
            self.api.start()
            self.wait_api()
        if self.controller.check_exit():
            time.sleep(1)
            self.controller.start()

    def kill_worker(self):
        # The current controller's children only: orphans of an earlier
        # controller are left alone, so the final check can see them.
        live = self.watch.snapshot()
        candidates = [pid for pid, i in live.items() if i["ppid"] == self.controller.pid]
        if not candidates:
            return
        pid = self.rng.choice(candidates)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        self.killed_workers.add(pid)
        self.kills["worker"] += 1
        log(f"SIGKILL worker {live[pid]['id']} (pid {pid})")

    def chaos(self):
        a = self.args
        jobs = build_jobs(a.jobs, a.reading_share, a.doomed_share, self.run_id, self.rng)
        self.submitter = Submitter(jobs, self.api_port, self.key, self.run_id)
        window = a.seconds
        start = time.monotonic()
        # Submission in waves over the first 80 % of the window, so pools
        # scale up and down (and drain) several times.
        waves = 5
        wave_at = [start + window * 0.8 * w / waves for w in range(waves)]
        submit_deadline = start + window + a.settle
        # One-off faults; worker kills all along. The API is killed, and
        # PostgreSQL restarted once, 0.3 s into a wave, with requests in
        # flight (their retries must find the job the first attempt wrote).
        events = sorted(
            [(wave_at[1] + 0.3, "api"), (wave_at[3] + 0.3, "api"), (wave_at[4] + 0.3, "api"),
             (wave_at[2] + 0.3, "postgres"), (start + window * 0.56, "postgres"),
             (start + window * 0.22, "controller"), (start + window * 0.5, "controller"),
             (start + window * 0.85, "controller")])
        next_worker_kill = start + 5
        controller_due_since = None
        log(f"chaos: {a.jobs} jobs in {waves} waves, {window} s window, seed {self.seed}")
        while time.monotonic() < start + window:
            now = time.monotonic()
            while wave_at and wave_at[0] <= now:
                wave_at.pop(0)
                upto = len(jobs) * (waves - len(wave_at)) // waves
                self.submitter.release(upto, submit_deadline)
            self.supervise()
            if now >= next_worker_kill:
                self.kill_worker()
                next_worker_kill = now + self.rng.uniform(1.5, 4.0)
            if events and events[0][0] <= now:
                what = events[0][1]
                if what == "api":
                    events.pop(0)
                    if self.api.proc is None:
                        continue
                    log("SIGKILL api")
                    self.api.kill()
                    self.kills["api"] += 1
                    time.sleep(self.rng.uniform(0.3, 1.5))
                    self.api.start()
                    self.wait_api()
                elif what == "postgres":
                    events.pop(0)
                    log("pg_ctl restart -m fast")
                    t0 = time.monotonic()
                    self.cluster.restart()
                    self.kills["postgres_restart"] += 1
                    log(f"PostgreSQL back after {time.monotonic() - t0:.1f} s")
                elif what == "controller":
                    # Prefer the moment right after a scale-down (replicas
                    # draining and stopping); give up waiting after 10 s.
                    if controller_due_since is None:
                        controller_due_since = now
                        since_stamp = log_stamp(time.time() - 1)
                    scaling = self.controller.proc is not None and \
                        self.controller_scaled_down_since(since_stamp)
                    if scaling or now - controller_due_since > 10:
                        events.pop(0)
                        controller_due_since = None
                        if self.controller.proc is not None:
                            log(f"SIGKILL controller ({'just after a scale-down' if scaling else 'no scale-down seen in 10 s'})")
                            self.controller.kill()
                            self.kills["controller"] += 1
                            self.controller_kills_in_scale_down += int(scaling)
                            time.sleep(self.rng.uniform(0.5, 2.0))
                            self.controller.start()
            time.sleep(0.1)
        # Submission may still be under way (waves released late or retrying).
        self.submitter.release(len(jobs), submit_deadline)
        log(f"chaos window over: kills {self.kills}")

    # ------------------------------------------------------------ settle

    def unfinished(self):
        """Open jobs, all jobs, and tasks that can still move."""
        rows = self.cluster.query(
            f"SELECT (SELECT count(*) FILTER (WHERE status IN ('queued', 'processing')) FROM all_jobs "
            f"        WHERE tenant = '{TENANT}'), "
            f"       (SELECT count(*) FROM all_jobs WHERE tenant = '{TENANT}'), "
            f"       (SELECT count(*) FROM all_tasks WHERE status IN ('pending', 'claimed', 'processing'))")
        return int(rows[0][0]), int(rows[0][1]), int(rows[0][2])

    def settle(self):
        start = time.monotonic()
        deadline = start + self.args.settle
        settled = False
        last_note = 0
        still_since = None
        while time.monotonic() < deadline:
            self.supervise()
            try:
                open_jobs, total, active_tasks = self.unfinished()
            except subprocess.CalledProcessError:
                time.sleep(1)
                continue
            if self.submitter.done() and open_jobs == 0:
                settled = True
                break
            # Open jobs with no task left that could move them will never
            # finish: stop waiting 15 s after the last task went still.
            if self.submitter.done() and active_tasks == 0:
                still_since = still_since or time.monotonic()
                if time.monotonic() - still_since > 15:
                    log(f"{open_jobs} jobs open with every task final: stuck")
                    break
            else:
                still_since = None
            if time.monotonic() - last_note > 15:
                log(f"settling: {open_jobs} of {total} jobs unfinished")
                last_note = time.monotonic()
            time.sleep(1)
        self.figures["settle_seconds"] = round(time.monotonic() - start, 1)
        self.figures["settled"] = settled
        log(f"{'settled' if settled else 'NOT settled'} after {self.figures['settle_seconds']} s")
        # Then wait (bounded) for the controller to take every pool to zero,
        # so every drain has had its pass before the registry is checked.
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline:
            self.supervise()
            children = [p for p, i in self.watch.snapshot().items() if i["ppid"] == self.controller.pid]
            if not children:
                break
            time.sleep(0.5)
        self.figures["pools_at_zero"] = not children
        self.live_at_settle = self.watch.snapshot()
        self.draining_rows = self.cluster.query(
            "SELECT id, coalesce(pool, ''), cardinality(task_types), "
            "round(extract(epoch FROM now() - heartbeat_at))::int FROM workers WHERE state = 'draining'")

    def shutdown(self):
        """The controller's last shutdown (SIGTERM: it stops its replicas),
        then a look for worker processes that outlived it."""
        self.api.check_exit()
        self.controller.check_exit()
        self.final_shutdown_at = time.time()
        code = self.controller.stop(timeout=60)
        self.figures["controller_final_exit"] = code
        log(f"controller stopped (exit {code})")
        time.sleep(1)
        self.watch.sample()
        self.orphans = self.watch.snapshot()
        if self.orphans:
            log(f"{len(self.orphans)} worker processes alive after the controller exited: "
                f"{sorted((i['id'], pid) for pid, i in self.orphans.items())}")
        self.api.stop(timeout=40)

    # ------------------------------------------------------------ checks

    def check(self):
        v = {k: 0 for k in VIOLATION_KINDS}
        details = {k: [] for k in VIOLATION_KINDS}

        def bad(kind, detail, n=1):
            v[kind] += n
            if len(details[kind]) < 5:
                details[kind].append(detail)

        s = self.submitter
        for idem, err in s.failed.items():
            bad("submit_failed", f"{idem}: {err}")
        # Jobs: one per key, every one complete.
        jobs = self.cluster.query(
            f"SELECT id, idempotency_key, job_type, status FROM all_jobs WHERE tenant = '{TENANT}'")
        by_key = {}
        for job_id, idem, job_type, status in jobs:
            by_key.setdefault(idem, []).append((job_id, job_type, status))
        for idem, rows in by_key.items():
            if len(rows) > 1:
                bad("job_duplicated", f"{idem}: {len(rows)} jobs", len(rows) - 1)
        ids = {row[0] for row in jobs}
        for idem, job_id in s.results.items():
            if job_id not in ids:
                bad("job_lost", f"{idem}: {job_id}")
        status_counts = {}
        doomed = set()
        for job_id, idem, job_type, status in jobs:
            status_counts[status] = status_counts.get(status, 0) + 1
            if "-doomed-" in idem:
                doomed.add(job_id)
                if status != "failed":
                    bad("doomed_job_not_failed", f"{job_id} ({job_type}, audio doomed) {status}")
            elif status != "complete":
                bad("job_not_complete", f"{job_id} ({job_type}) {status}")
        self.figures["job_status"] = status_counts
        span = self.cluster.query(
            f"SELECT coalesce(round(extract(epoch FROM max(finished_at) - min(created_at)))::int, 0) "
            f"FROM all_jobs WHERE tenant = '{TENANT}'")
        self.figures["work_seconds"] = int(span[0][0])
        job_type = {row[0]: row[2] for row in jobs}

        def expected_kinds(job_id):
            kinds = EXPECTED_KINDS.get(job_type.get(job_id), set())
            return kinds - {"audio"} if job_id in doomed else kinds

        # Tasks: the expected ones, complete.
        tasks = self.cluster.query(
            f"SELECT t.id, t.job_id, t.task_type, t.status, t.attempts, coalesce(t.claimed_by, ''), "
            f"coalesce(t.last_error, '') FROM all_tasks t JOIN all_jobs j ON j.id = t.job_id "
            f"WHERE j.tenant = '{TENANT}'")
        per_job = {}
        attempts = []
        for task_id, job_id, task_type, status, tries, claimed_by, last_error in tasks:
            per_job.setdefault(job_id, set()).add(task_type)
            attempts.append(int(tries))
            expected = "failed" if job_id in doomed and task_type == "audio_generation" else "complete"
            if status != expected:
                bad("task_not_complete",
                    f"task {task_id} {task_type} of {job_id}: {status}, attempts {tries}, "
                    f"claimed_by {claimed_by or '-'}, last_error {last_error[:80] or '-'}")
        for job_id, kind in job_type.items():
            if per_job.get(job_id, set()) != EXPECTED_TASKS[kind]:
                bad("task_not_complete", f"{job_id} ({kind}) has tasks {sorted(per_job.get(job_id, []))}")
        self.figures["tasks"] = len(tasks)
        self.figures["tasks_retried"] = sum(1 for a in attempts if a > 1)
        self.figures["max_attempts"] = max(attempts, default=0)

        # Artifacts: one per expected (job, kind), matching the store's bytes.
        arts = self.cluster.query(
            f"SELECT a.job_id, a.kind, a.storage_key, a.bytes, a.sha256 FROM artifacts a "
            f"JOIN all_jobs j ON j.id = a.job_id WHERE j.tenant = '{TENANT}'")
        have = {}
        for job_id, kind, key, size, sha in arts:
            have.setdefault(job_id, []).append(kind)
            if kind not in expected_kinds(job_id):
                bad("artifact_unexpected", f"{job_id} {kind}")
            path = os.path.join(self.store, key)
            try:
                with open(path, "rb") as f:
                    content = f.read()
            except FileNotFoundError:
                bad("artifact_file_missing", f"{job_id} {kind} {key}")
                continue
            actual = hashlib.sha256(content).hexdigest()
            if len(content) != int(size) or actual != sha:
                bad("artifact_mismatch",
                    f"{key}: recorded {size} B {sha[:12]}, stored {len(content)} B {actual[:12]}")
        for job_id, kind in job_type.items():
            kinds = have.get(job_id, [])
            for expected in expected_kinds(job_id):
                if kinds.count(expected) == 0:
                    bad("artifact_missing", f"{job_id} ({kind}) has no {expected}")
                elif kinds.count(expected) > 1:
                    bad("artifact_unexpected", f"{job_id} has {kinds.count(expected)} {expected}")
        self.figures["artifacts"] = len(arts)

        # Worker logs: completions, stops while busy, exits on their own.
        completions = {}
        stops = {"graceful": 0, "busy": 0, "at_final_shutdown": 0}
        workers_logged = 0
        for path in sorted(glob.glob(os.path.join(self.logs, "worker-*.log"))):
            workers_logged += 1
            m = re.match(r"worker-(.+)-(\d+)\.log$", os.path.basename(path))
            worker_id, pid = m.group(1), int(m.group(2))
            events, other = read_json_lines(path)
            started = any(e.get("message") == "worker started" for e in events)
            signalled_at = None
            in_flight = 0
            lost_after = 0
            completed_after = released = 0
            for e in events:
                msg = e.get("message", "")
                if msg == "task complete":
                    completions.setdefault(e.get("task_id"), []).append(f"{worker_id}/{pid}")
                    if signalled_at is not None:
                        completed_after += 1
                elif msg.startswith("signal received"):
                    signalled_at = e.get("timestamp", "")
                elif msg.startswith("shutting down"):
                    in_flight = int(e.get("in_flight", 0))
                elif signalled_at is not None and msg.startswith("lease lost"):
                    lost_after += 1
                elif msg.startswith("released unfinished tasks"):
                    released = int(e.get("released", 0))
            errors = [line for line in other if line.startswith("Error") or "panicked" in line]
            if errors and pid not in self.killed_workers:
                kind = "worker_exited_unexpectedly" if started else "worker_crashed_on_start"
                bad(kind, f"{worker_id} pid {pid}: {errors[-1][:160]}")
            if signalled_at is None:
                continue
            final = self.final_shutdown_at is not None and signalled_at >= log_stamp(self.final_shutdown_at)
            # The worker's own count of held tasks at SIGTERM, less those it
            # then found it had lost (swept or cancelled before the signal).
            held = in_flight - lost_after
            if final:
                stops["at_final_shutdown"] += 1
            elif held > 0:
                stops["busy"] += 1
                bad("stopped_busy_replica",
                    f"{worker_id} pid {pid}: SIGTERM at {signalled_at} holding {held} task(s) "
                    f"({completed_after} completed in the grace, {released} released)")
            else:
                stops["graceful"] += 1
        for task_id, where in completions.items():
            if len(where) > 1:
                bad("task_completed_twice", f"task {task_id}: {where}")
        self.figures["worker_processes"] = workers_logged
        self.figures["controller_stops"] = stops

        # Unexpected exits of the api and the controller.
        for sup, kind in ((self.api, "api_exited_unexpectedly"),
                          (self.controller, "controller_exited_unexpectedly")):
            for gen, code, lines in sup.unexpected:
                bad(kind, f"generation {gen} exit {code}: {' | '.join(lines)[-300:]}")

        for worker_id, pool, types, age in self.draining_rows:
            placeholder = " (placeholder: never registered)" if types == "0" else ""
            holders = [f"pid {pid} parent {i['ppid']}" for pid, i in self.live_at_settle.items()
                       if i["id"] == worker_id]
            alive = f"alive: {', '.join(holders)}" if holders else "no live process"
            bad("draining_left", f"{worker_id} pool {pool or '-'}{placeholder}, heartbeat {age} s ago, {alive}")

        for t, pool, counted, pids in self.watch.episodes:
            bad("max_replicas_exceeded",
                f"{time.strftime('%H:%M:%S', time.localtime(t))} {pool}: {counted} > {POOLS[pool]['max']}: {pids}")
        for pid, info in sorted(self.orphans.items()):
            bad("orphaned_workers", f"{info['id']} pid {pid} (parent {info['ppid']})")

        # Figures from the other logs.
        swept = 0
        for path in glob.glob(os.path.join(self.logs, "api-*.log")):
            swept += sum(1 for e in read_json_lines(path)[0] if e.get("message") == "sweeper took a task back")
        replica_crashes = stop_kills = 0
        for path in glob.glob(os.path.join(self.logs, "controller-*.log")):
            for e in read_json_lines(path)[0]:
                msg = e.get("message", "")
                if msg.startswith("local replica exited unexpectedly"):
                    replica_crashes += 1
                elif msg.startswith("replica did not stop in time"):
                    stop_kills += 1
        self.figures.update({
            "tasks_swept": swept,
            "replica_exits_seen_by_controller": replica_crashes,
            "replicas_killed_after_stop_grace": stop_kills,
            "submit": {"created": s.created, "replayed": s.replayed, "retries": s.retries},
            "max_live_replicas": self.watch.max_live,
            "max_counted_replicas": self.watch.max_counted,
            "process_samples": self.watch.samples,
            "controller_kills_after_scale_down": self.controller_kills_in_scale_down,
        })
        return v, details

    # ------------------------------------------------------------ cleanup

    def cleanup(self):
        """Stop everything this run started: every process that carries the
        run's marker (api, controllers, workers, their espeak children), by
        pid; then the cluster; then the temp dir."""
        if self.watch:
            self.watch.halt.set()
        mark = f"CHAOS_RUN={self.run_id}".encode()
        for _ in range(3):
            found = False
            for entry in os.listdir("/proc"):
                if not entry.isdigit() or int(entry) == os.getpid():
                    continue
                try:
                    with open(f"/proc/{entry}/environ", "rb") as f:
                        if mark not in f.read().split(b"\0"):
                            continue
                    os.kill(int(entry), signal.SIGKILL)
                    found = True
                except (FileNotFoundError, ProcessLookupError, PermissionError):
                    continue
            for sup in (self.api, self.controller):
                if sup and sup.proc:
                    sup.proc.poll()
            if not found:
                break
            time.sleep(0.5)
        if self.cluster:
            self.cluster.stop()
        keep = os.path.join(TARGET, "chaos-logs")
        try:
            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(self.logs, keep)
        except OSError as e:
            log(f"could not keep the logs: {e}")
        if os.environ.get("CHAOS_KEEP"):
            log(f"kept {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=env_or("CHAOS_JOBS", 2000, int))
    p.add_argument("--reading-share", type=float, default=env_or("CHAOS_READING_SHARE", 0.1, float))
    p.add_argument("--doomed-share", type=float, default=env_or("CHAOS_DOOMED_SHARE", 0.02, float))
    p.add_argument("--seconds", type=float, default=env_or("CHAOS_SECONDS", 150.0, float))
    p.add_argument("--settle", type=float, default=env_or("CHAOS_SETTLE_SECONDS", 150.0, float))
    p.add_argument("--seed", type=int, default=env_or("CHAOS_SEED", None, int))
    args = p.parse_args()
    if args.jobs < 1 or args.seconds < 20:
        sys.exit("chaos: --jobs must be at least 1 and --seconds at least 20")

    h = Harness(args)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    started = time.monotonic()
    try:
        h.start()
        h.chaos()
        h.settle()
        h.shutdown()
        violations, details = h.check()
    finally:
        h.cleanup()
    f = h.figures
    print()
    print(f"chaos run {h.run_id} (seed {h.seed}), {time.monotonic() - started:.0f} s in all")
    print(f"  jobs            {args.jobs} submitted ({f['submit']}), status {f['job_status']}")
    print(f"  tasks           {f['tasks']}, retried {f['tasks_retried']}, max attempts {f['max_attempts']}, "
          f"taken back by the sweeper {f['tasks_swept']}")
    print(f"  artifacts       {f['artifacts']}")
    print(f"  kills           {h.kills}; controller kills just after a scale-down: "
          f"{f['controller_kills_after_scale_down']}")
    print(f"  replicas        {f['worker_processes']} worker processes; max live per pool {f['max_live_replicas']}, "
          f"not stopping {f['max_counted_replicas']} ({f['process_samples']} samples)")
    print(f"  controller      stops {f['controller_stops']}, replica exits it saw "
          f"{f['replica_exits_seen_by_controller']}, killed after the stop grace "
          f"{f['replicas_killed_after_stop_grace']}")
    print(f"  work            first job created to last job finished: {f['work_seconds']} s "
          f"(chaos window {args.seconds:.0f} s)")
    print(f"  settle          {f['settle_seconds']} s (settled: {f['settled']}, pools at zero: {f['pools_at_zero']})")
    clean = [k for k in VIOLATION_KINDS if not violations[k]]
    print(f"  checked, clean  {', '.join(clean) or '-'}")
    for kind in VIOLATION_KINDS:
        if violations[kind]:
            print(f"  VIOLATION {kind}: {violations[kind]}")
            for d in details[kind]:
                print(f"      {d}")
    print(json.dumps({
        "jobs": args.jobs,
        "kills": h.kills,
        "tasks_retried": f["tasks_retried"],
        "max_attempts": f["max_attempts"],
        "settle_seconds": f["settle_seconds"],
        "violations": {k: n for k, n in violations.items() if n},
    }, separators=(",", ":")))
    return 1 if any(violations.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
