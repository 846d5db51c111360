//! Pipeline throughput on this machine (`make bench-workers`):
//!
//! - PDF: pages per second typesetting a 50-page document;
//! - audio: real-time factor of espeak-ng speech + MP3 encoding (seconds of
//!   audio per second of wall time, and per second of CPU time of this
//!   process and its espeak-ng children), with one and with all cores;
//! - runtime: no-op tasks per second through the worker runtime at
//!   concurrency 1, 8 and 32, beside the queue's own ceiling in the same run
//!   (one loop claiming that many tasks and completing them in one call,
//!   with no runtime around it). Needs `DATABASE_URL` (a scratch database:
//!   `make bench-workers` creates one).
//!
//! The last line printed is one JSON object with every figure.

use std::time::{Duration, Instant};

use queue::{Failure, JobType, NewJob, Queue, TaskType};
use serde_json::json;
use tokio_util::sync::CancellationToken;
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
        // The reference first, then the runtime, on the same table.
        enqueue_noops(&queue, tasks).await;
        let ceiling = drain_without_runtime(&queue, concurrency, tasks).await;
        enqueue_noops(&queue, tasks).await;
        let through_runtime = drain_through_runtime(&queue, concurrency, tasks).await;
        let ratio = through_runtime / ceiling;
        println!(
            "runtime: concurrency {concurrency:>2}: {through_runtime:>7.0} no-op tasks/s through the runtime, \
             queue ceiling {ceiling:>7.0}/s (claim {concurrency} + complete in one call) → ratio {ratio:.2}"
        );
        figures.insert(
            format!("concurrency_{concurrency}"),
            json!({
                "tasks": tasks,
                "runtime_tasks_per_second": through_runtime.round(),
                "queue_ceiling_tasks_per_second": ceiling.round(),
                "ratio_to_ceiling": (ratio * 100.0).round() / 100.0,
            }),
        );
    }
    serde_json::Value::Object(figures)
}

async fn enqueue_noops(queue: &Queue, tasks: usize) {
    for chunk in (0..tasks).collect::<Vec<_>>().chunks(1_000) {
        let jobs = chunk
            .iter()
            .map(|i| NewJob::new("bench", JobType::Text, json!({ "prompt": format!("noop {i}") })))
            .collect();
        queue.enqueue_batch(jobs).await.expect("enqueue");
    }
}

/// One loop claiming `batch` tasks and completing them in one call.
async fn drain_without_runtime(queue: &Queue, batch: usize, tasks: usize) -> f64 {
    let started = Instant::now();
    let mut done = 0;
    while done < tasks {
        let claimed = queue
            .claim("bench-ceiling", &[TaskType::TextGeneration], batch as i32)
            .await
            .expect("claim");
        assert!(
            !claimed.is_empty(),
            "the queue ran dry after {done} of {tasks} tasks"
        );
        let results: Vec<_> = claimed
            .iter()
            .map(|t| (t.lease(), serde_json::Value::Null))
            .collect();
        done += queue
            .complete_batch("bench-ceiling", &results)
            .await
            .expect("complete")
            .len();
    }
    tasks as f64 / started.elapsed().as_secs_f64()
}

async fn drain_through_runtime(queue: &Queue, concurrency: usize, tasks: usize) -> f64 {
    let config = RuntimeConfig {
        worker_id: format!("bench-runtime-{concurrency}"),
        pool: None,
        task_types: vec![TaskType::TextGeneration],
        concurrency,
        heartbeat_interval: Duration::from_secs(5),
        poll_interval: Duration::from_secs(1),
        shutdown_grace: Duration::from_secs(5),
        metrics: Default::default(),
    };
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let worker = tokio::spawn(runtime::run(queue.clone(), config, NoOp, shutdown.clone()));
    // Done when nothing of the type is pending or held any more.
    loop {
        let depth = queue.depth().await.expect("depth");
        let text = depth
            .iter()
            .find(|d| d.task_type == TaskType::TextGeneration)
            .expect("every type is reported");
        if text.pending + text.in_flight == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    shutdown.cancel();
    let summary = worker.await.expect("runtime task").expect("runtime");
    assert_eq!(
        summary.completed as usize, tasks,
        "the runtime completed every task once"
    );
    tasks as f64 / elapsed
}
