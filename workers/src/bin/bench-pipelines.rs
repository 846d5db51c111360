//! Pipeline throughput on this machine (`make bench-workers`):
//!
//! - PDF: pages per second typesetting a 50-page document;
//! - audio: real-time factor of espeak-ng speech + MP3 encoding (seconds of
//!   audio per second of wall time, and per second of CPU time of this
//!   process and its espeak-ng children), with one and with all cores;
//! - runtime: no-op tasks per second through the worker runtime at
//!   concurrency 1, 8 and 32, beside the queue's own ceiling in the same run:
//!   one loop with no runtime around it, completing each batch of that many
//!   tasks in the call that claims the next (and, for comparison, the loop
//!   that claims and completes in two calls). Needs `DATABASE_URL` (a
//!   scratch database: `make bench-workers` creates one).
//!
//! The last line printed is one JSON object with every figure.

use std::time::{Duration, Instant};

use queue::{Failure, JobType, NewJob, Queue, Retention, RetentionMode, TaskType};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use workers::metrics::{Outcome, OutcomeLabels};
use workers::pipelines::audio::{Espeak, Narrator, TtsProvider};
use workers::pipelines::document::Document;
use workers::pipelines::pdf::typeset_blocking;
use workers::runtime::{self, RuntimeConfig, TaskContext, TaskHandler, TaskOutput};

const TARGET_PAGES: usize = 50;
const PDF_RUNS: usize = 3;

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "a",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "with",
    "was",
    "on",
    "be",
    "by",
    "river",
    "market",
    "committee",
    "winter",
    "harbour",
    "library",
    "engine",
    "garden",
    "letter",
    "window",
    "considerable",
    "internationalisation",
    "counterintuitively",
    "responsibility",
    "extraordinary",
    "neighbourhood",
    "approximately",
    "characteristic",
    "documentation",
    "infrastructure",
    "between",
    "although",
    "because",
    "however",
    "quietly",
    "carefully",
    "yesterday",
    "tomorrow",
    "morning",
    "silver",
];

/// Deterministic prose with no two paragraphs alike, so typst's memoisation
/// cannot lay out a repeated paragraph once and reuse it.
fn prose(seed: u64, sentences: usize) -> String {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move |bound: usize| {
        // xorshift64
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % bound as u64) as usize
    };
    let mut text = String::new();
    for _ in 0..sentences {
        let length = 8 + next(14);
        for i in 0..length {
            let word = WORDS[next(WORDS.len())];
            if i == 0 {
                let mut chars = word.chars();
                text.extend(chars.next().map(|c| c.to_ascii_uppercase()));
                text.push_str(chars.as_str());
            } else {
                text.push(' ');
                text.push_str(word);
            }
        }
        text.push_str(". ");
    }
    text
}

fn document(sections: usize) -> Document {
    let markdown: String = (1..=sections as u64)
        .map(|i| {
            format!(
                "## Section {i}\n\n{}\n\n{}\n\n",
                prose(2 * i, 5),
                prose(2 * i + 1, 7)
            )
        })
        .collect();
    Document::parse(&markdown, Some("Benchmark document"))
}

/// User + system CPU time of this process and its waited-for children.
fn cpu_time() -> Duration {
    let usage = |who| {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage fills the struct it is given; both `who`s are valid.
        let usage = unsafe {
            libc::getrusage(who, usage.as_mut_ptr());
            usage.assume_init()
        };
        let seconds = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
        seconds(usage.ru_utime) + seconds(usage.ru_stime)
    };
    usage(libc::RUSAGE_SELF) + usage(libc::RUSAGE_CHILDREN)
}

fn bench_pdf() -> serde_json::Value {
    // Size the document from one trial run, then grow it until it fills the target.
    let trial_sections = 40;
    let trial = typeset_blocking(&document(trial_sections), None).expect("typeset");
    let mut sections = (trial_sections * TARGET_PAGES).div_ceil(trial.pages.max(1));
    while typeset_blocking(&document(sections), None)
        .expect("typeset")
        .pages
        < TARGET_PAGES
    {
        sections += 2;
    }
    let document = document(sections);

    let mut timings = Vec::new();
    let mut pages = 0;
    let mut bytes = 0;
    for _ in 0..PDF_RUNS {
        // Start cold: a worker typesets a different document every time.
        typst::comemo::evict(0);
        let started = Instant::now();
        let pdf = typeset_blocking(&document, None).expect("typeset");
        timings.push(started.elapsed().as_secs_f64());
        (pages, bytes) = (pdf.pages, pdf.bytes.len());
    }
    timings.sort_by(f64::total_cmp);
    let median = timings[timings.len() / 2];
    println!(
        "pdf: {pages} pages, {:.1} KiB, median {median:.3}s of {PDF_RUNS} runs → {:.1} pages/s",
        bytes as f64 / 1024.0,
        pages as f64 / median
    );
    json!({
        "pdf_pages": pages,
        "pdf_bytes": bytes,
        "pdf_seconds_median": median,
        "pdf_pages_per_second": pages as f64 / median,
    })
}

async fn bench_audio(concurrency: usize) -> serde_json::Value {
    let markdown: String = (1..=6)
        .map(|i| format!("## Part {i}\n\n{}\n\n", prose(100 + i, 10)))
        .collect();
    let document = Document::parse(&markdown, Some("Benchmark narration"));
    let narrator = Narrator::new(TtsProvider::Espeak(Espeak::default()), concurrency);

    let cpu_before = cpu_time();
    let started = Instant::now();
    let narration = narrator.narrate(&document, None).await.expect("narrate");
    let wall = started.elapsed().as_secs_f64();
    let cpu = (cpu_time() - cpu_before).as_secs_f64();
    let audio = narration.duration_seconds;
    println!(
        "audio (espeak-ng, {concurrency} at once): {} words, {audio:.1}s of speech in {wall:.2}s wall / \
         {cpu:.2}s CPU → real-time factor {:.1}× wall, {:.1}× CPU",
        document.word_count(),
        audio / wall,
        audio / cpu
    );
    json!({
        "concurrency": concurrency,
        "words": document.word_count(),
        "audio_seconds": audio,
        "mp3_bytes": narration.bytes.len(),
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "realtime_factor_wall": audio / wall,
        "realtime_factor_cpu": audio / cpu,
    })
}

#[tokio::main]
async fn main() {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let pdf = bench_pdf();
    let audio_one = bench_audio(1).await;
    let audio_all = bench_audio(cores).await;
    let speedup = audio_all["realtime_factor_wall"].as_f64().unwrap_or(0.0)
        / audio_one["realtime_factor_wall"].as_f64().unwrap_or(f64::NAN);
    let runtime = match std::env::var("DATABASE_URL") {
        Ok(url) => bench_runtime(&url).await,
        Err(_) => {
            println!("runtime: skipped (DATABASE_URL is not set; make bench-workers sets it)");
            serde_json::Value::Null
        }
    };
    let summary = json!({
        "benchmark": "pipelines",
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        "cores": cores,
        "pdf": pdf,
        "audio_concurrency_1": audio_one,
        "audio_concurrency_all": audio_all,
        "audio_parallel_speedup": speedup,
        "runtime_noop": runtime,
    });
    println!("{summary}");
}

/// Tasks enqueued per concurrency level: a few seconds of work at each.
const RUNTIME_TASKS: [(usize, usize); 3] = [(1, 2_000), (8, 8_000), (32, 20_000)];

struct NoOp;

impl TaskHandler for NoOp {
    async fn run(&self, _ctx: TaskContext) -> Result<TaskOutput, Failure> {
        Ok(serde_json::Value::Null)
    }
}

async fn bench_runtime(url: &str) -> serde_json::Value {
    let queue = Queue::connect(url, 40).await.expect("connecting to DATABASE_URL");
    queue.migrate().await.expect("migrating the bench database");
    let mut figures = serde_json::Map::new();
    for (concurrency, tasks) in RUNTIME_TASKS {
        // The references first, then the runtime, each on a table whose
        // earlier phases' jobs were pruned.
        enqueue_noops(&queue, tasks).await;
        let two_calls = drain_claiming_then_completing(&queue, concurrency, tasks).await;
        enqueue_noops(&queue, tasks).await;
        let ceiling = drain_completing_and_claiming(&queue, concurrency, tasks).await;
        enqueue_noops(&queue, tasks).await;
        let (through_runtime, claims) = drain_through_runtime(&queue, concurrency, tasks).await;
        let ratio = through_runtime / ceiling;
        let per_claim = tasks as f64 / claims as f64;
        println!(
            "runtime: concurrency {concurrency:>2}: {through_runtime:>7.0} no-op tasks/s through the runtime \
             ({per_claim:.1} tasks per claim), queue ceiling {ceiling:>7.0}/s (complete {concurrency} + claim \
             {concurrency} in one call) → ratio {ratio:.2}; claim then complete in two calls {two_calls:>7.0}/s"
        );
        figures.insert(
            format!("concurrency_{concurrency}"),
            json!({
                "tasks": tasks,
                "runtime_tasks_per_second": through_runtime.round(),
                "queue_ceiling_tasks_per_second": ceiling.round(),
                "ratio_to_ceiling": (ratio * 100.0).round() / 100.0,
                "claim_then_complete_tasks_per_second": two_calls.round(),
                "runtime_tasks_per_claim": (per_claim * 10.0).round() / 10.0,
            }),
        );
    }
    serde_json::Value::Object(figures)
}

/// Enqueue `tasks` no-op jobs after pruning the finished ones, so every
/// phase starts from an empty history.
async fn enqueue_noops(queue: &Queue, tasks: usize) {
    queue
        .prune(Retention {
            older_than: Duration::ZERO,
            mode: RetentionMode::Delete,
            batch: 10_000,
        })
        .await
        .expect("pruning the finished jobs");
    for chunk in (0..tasks).collect::<Vec<_>>().chunks(1_000) {
        let jobs = chunk
            .iter()
            .map(|i| NewJob::new("bench", JobType::Text, json!({ "prompt": format!("noop {i}") })))
            .collect();
        queue.enqueue_batch(jobs).await.expect("enqueue");
    }
}

const CEILING_WORKER: &str = "bench-ceiling";
const NOOP_TYPES: [TaskType; 1] = [TaskType::TextGeneration];

/// One loop claiming `batch` tasks, then completing them in one call.
async fn drain_claiming_then_completing(queue: &Queue, batch: usize, tasks: usize) -> f64 {
    let started = Instant::now();
    let mut done = 0;
    while done < tasks {
        let claimed = queue
            .claim(CEILING_WORKER, &NOOP_TYPES, batch as i32)
            .await
            .expect("claim");
        assert!(
            !claimed.is_empty(),
            "the queue ran dry after {done} of {tasks} tasks"
        );
        done += queue
            .complete_batch(CEILING_WORKER, &noop_results(&claimed))
            .await
            .expect("complete")
            .len();
    }
    tasks as f64 / started.elapsed().as_secs_f64()
}

/// One loop completing each batch of `batch` tasks in the call that claims
/// the next: one round trip per batch.
async fn drain_completing_and_claiming(queue: &Queue, batch: usize, tasks: usize) -> f64 {
    let started = Instant::now();
    let mut held = queue
        .claim_and_start(CEILING_WORKER, &NOOP_TYPES, batch as i32)
        .await
        .expect("claim");
    let mut done = 0;
    while done < tasks {
        assert!(
            !held.is_empty(),
            "the queue ran dry after {done} of {tasks} tasks"
        );
        let next = queue
            .complete_and_claim(CEILING_WORKER, &noop_results(&held), &NOOP_TYPES, batch as i32)
            .await
            .expect("complete and claim");
        done += next.completed.len();
        held = next.claimed;
    }
    tasks as f64 / started.elapsed().as_secs_f64()
}

fn noop_results(tasks: &[queue::Task]) -> Vec<(queue::Lease, TaskOutput)> {
    tasks
        .iter()
        .map(|t| (t.lease(), serde_json::Value::Null))
        .collect()
}

/// Tasks per second through the runtime, and how many claims it made.
async fn drain_through_runtime(queue: &Queue, concurrency: usize, tasks: usize) -> (f64, u64) {
    let config = RuntimeConfig {
        worker_id: format!("bench-runtime-{concurrency}"),
        pool: None,
        task_types: NOOP_TYPES.to_vec(),
        concurrency,
        heartbeat_interval: Duration::from_secs(5),
        poll_interval: Duration::from_secs(1),
        shutdown_grace: Duration::from_secs(5),
        metrics: Default::default(),
    };
    let metrics = config.metrics.clone();
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let worker = tokio::spawn(runtime::run(queue.clone(), config, NoOp, shutdown.clone()));
    // Done when the runtime has stored every result: its own counter, read
    // in process, so the wait puts no load on the database it measures.
    let completed = metrics.tasks.get_or_create(&OutcomeLabels {
        task_type: TaskType::TextGeneration.as_str().into(),
        outcome: Outcome::completed,
    });
    while completed.get() < tasks as u64 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    shutdown.cancel();
    let summary = worker.await.expect("runtime task").expect("runtime");
    assert_eq!(
        summary.completed as usize, tasks,
        "the runtime completed every task once"
    );
    (tasks as f64 / elapsed, metrics.claim_batches.get())
}
