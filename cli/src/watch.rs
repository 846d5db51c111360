//! Following a job to its end: the event stream (`GET /v1/jobs/{id}/events`)
//! says when the job's status changes; the job's tasks are read on each
//! event and every second between them (a task finishing inside a job that
//! stays `processing` sends no event). On a terminal: one line per task and
//! a bar across the job, redrawn in place (indicatif); otherwise a plain
//! line per change.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::pin::pin;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use queue::TaskStatus;
use reqwest::StatusCode;
use uuid::Uuid;

use crate::client::Client;
use crate::error::{CliError, Result};
use crate::output::{self, or_dash, print, table, Format};
use crate::views::{Artifact, JobDetail, Task};

const REFRESH: Duration = Duration::from_secs(1);
/// How long a refused stream (429: the API's stream limits) is not asked
/// for again: the API's own `Retry-After` for it. The job is polled meanwhile.
const STREAM_REFUSED_PAUSE: Duration = Duration::from_secs(10);
/// How long the API may stay unreachable or failing before following gives up.
const MAX_OUTAGE: Duration = Duration::from_secs(300);

/// Follow job `id` until it finishes; print its artifacts (or, with `-o
/// json|yaml`, the finished job). A failed or cancelled job is an error.
/// The job is followed through what passes (the API busy, restarting, a
/// stream cut or refused) by polling it; what does not (a refused key, no
/// such job), or an outage over [`MAX_OUTAGE`], ends it.
pub async fn follow(client: &Client, id: Uuid, format: Format) -> Result<()> {
    let mut display = if std::io::stderr().is_terminal() {
        Display::live()
    } else {
        Display::plain()
    };
    let mut last_ok = Instant::now();
    let mut told = false;
    let detail = 'follow: loop {
        let error = match watch(client, id, &mut display, &mut last_ok).await {
            Ok(detail) => break detail,
            Err(error) if passes(&error) && last_ok.elapsed() < MAX_OUTAGE => error,
            Err(error) => return Err(error),
        };
        if !told {
            display.note(&format!("{error}; still following job {id}"));
            told = true;
        }
        let pause = match &error {
            CliError::Api { status, .. } if *status == StatusCode::TOO_MANY_REQUESTS => STREAM_REFUSED_PAUSE,
            _ => REFRESH,
        };
        let until = Instant::now() + pause;
        loop {
            tokio::time::sleep(REFRESH).await;
            match client.job(id).await {
                Ok(detail) => {
                    last_ok = Instant::now();
                    display.show(&detail);
                    if detail.job.status.is_finished() {
                        break 'follow detail;
                    }
                }
                Err(error) if passes(&error) && last_ok.elapsed() < MAX_OUTAGE => {}
                Err(error) => return Err(error),
            }
            if Instant::now() >= until {
                break;
            }
        }
    };
    display.finish();
    print(format, &detail, |detail| {
        if detail.artifacts.is_empty() {
            String::new()
        } else {
            artifacts_table(&detail.artifacts)
        }
    })?;
    match detail.job.status {
        queue::JobStatus::Complete => Ok(()),
        status => Err(CliError::JobFailed {
            id,
            status,
            error: detail.job.error.clone(),
        }),
    }
}

/// Read job `id`, then follow its event stream (reading the job on each
/// event and every [`REFRESH`]) until it finishes. The stream ends when the
/// job finishes, or at the server's limit on a stream's life: then another
/// is opened.
async fn watch(client: &Client, id: Uuid, display: &mut Display, last_ok: &mut Instant) -> Result<JobDetail> {
    loop {
        let detail = client.job(id).await?;
        *last_ok = Instant::now();
        display.show(&detail);
        if detail.job.status.is_finished() {
            return Ok(detail);
        }
        let opened = Instant::now();
        let events = client.job_events(id).await?;
        let mut events = pin!(events);
        let mut tick = tokio::time::interval(REFRESH);
        tick.tick().await;
        loop {
            tokio::select! {
                event = events.next() => match event {
                    Some(event) => { event?; }
                    None => break,
                },
                _ = tick.tick() => {}
            }
            let detail = client.job(id).await?;
            *last_ok = Instant::now();
            display.show(&detail);
            if detail.job.status.is_finished() {
                return Ok(detail);
            }
        }
        // A stream that ended at once (a proxy that cuts every stream):
        // the next is asked for a refresh later, not in a busy loop.
        if let Some(rest) = REFRESH.checked_sub(opened.elapsed()) {
            tokio::time::sleep(rest).await;
        }
    }
}

/// Whether following can go on after `error`: the API unreachable (a
/// restart, a cut connection), busy (429) or failing (5xx).
fn passes(error: &CliError) -> bool {
    match error {
        CliError::Unreachable { .. } => true,
        CliError::Api { status, .. } => *status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error(),
        _ => false,
    }
}

enum Display {
    /// Bars on stderr, redrawn in place.
    Live {
        bars: MultiProgress,
        job: ProgressBar,
        tasks: HashMap<i64, ProgressBar>,
    },
    /// One line per change, on stderr.
    Plain { last: HashMap<String, String> },
}

impl Display {
    fn live() -> Display {
        let bars = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let job = bars.add(ProgressBar::new(0));
        job.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} tasks {percent:>3}% {msg}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        Display::Live {
            bars,
            job,
            tasks: HashMap::new(),
        }
    }

    fn plain() -> Display {
        Display::Plain { last: HashMap::new() }
    }

    fn show(&mut self, detail: &JobDetail) {
        let now = Utc::now();
        let done = detail.tasks.iter().filter(|t| t.is_finished()).count() as u64;
        match self {
            Display::Live { bars, job, tasks } => {
                job.set_prefix(format!("job {}", detail.job.id));
                job.set_length(detail.tasks.len() as u64);
                job.set_position(done);
                job.set_message(detail.job.status.to_string());
                for task in &detail.tasks {
                    let bar = tasks.entry(task.id).or_insert_with(|| {
                        let bar = bars.insert_before(job, ProgressBar::new_spinner());
                        bar.set_style(ProgressStyle::with_template("  {msg}").expect("a valid template"));
                        bar
                    });
                    bar.set_message(task_line(task, now));
                }
            }
            Display::Plain { last } => {
                // A line when the job's status or a task's state or attempt
                // changes (elapsed time changes on every read).
                let mut report = |key: String, state: String, line: String| {
                    if last.get(&key) != Some(&state) {
                        eprintln!("{line}");
                        last.insert(key, state);
                    }
                };
                let job_line = format!(
                    "job {} {} ({done}/{} tasks)",
                    detail.job.id,
                    detail.job.status,
                    detail.tasks.len()
                );
                report("job".into(), job_line.clone(), job_line);
                for task in &detail.tasks {
                    report(
                        format!("task {}", task.id),
                        format!("{} {}", task.status, task.attempts),
                        format!("  {}", task_line(task, now)),
                    );
                }
            }
        }
    }

    /// A line on stderr that is not the job's state, above the bars.
    fn note(&self, line: &str) {
        let line = output::printable(line);
        match self {
            Display::Live { bars, .. } => {
                let _ = bars.println(format!("backlog: {line}"));
            }
            Display::Plain { .. } => eprintln!("backlog: {line}"),
        }
    }

    fn finish(&mut self) {
        if let Display::Live { job, tasks, .. } = self {
            for bar in tasks.values() {
                bar.finish();
            }
            job.finish();
        }
    }
}

/// `text_generation   complete   attempt 1/3   2.4s   error`.
fn task_line(task: &Task, now: chrono::DateTime<Utc>) -> String {
    let mut line = format!(
        "{:<17} {:<10} attempt {}/{}   {}",
        task.task_type.as_str(),
        task.status.as_str(),
        task.attempts,
        task.max_attempts,
        or_dash(task.elapsed(now).map(output::elapsed)),
    );
    if let (Some(error), false) = (&task.last_error, task.status == TaskStatus::Complete) {
        line.push_str(&format!("   {}", output::printable(error)));
    }
    line
}

pub fn tasks_table(tasks: &[Task]) -> String {
    let now = Utc::now();
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            vec![
                t.id.to_string(),
                t.task_type.to_string(),
                t.status.to_string(),
                format!("{}/{}", t.attempts, t.max_attempts),
                or_dash(t.elapsed(now).map(output::elapsed)),
                or_dash(t.last_error.as_deref()),
            ]
        })
        .collect();
    table(
        &["task", "type", "status", "attempt", "elapsed", "last error"],
        &rows,
    )
}

pub fn artifacts_table(artifacts: &[Artifact]) -> String {
    let rows: Vec<Vec<String>> = artifacts
        .iter()
        .map(|a| {
            vec![
                a.kind.as_str().to_string(),
                a.content_type.clone(),
                output::bytes(a.bytes),
                a.download_path.clone(),
            ]
        })
        .collect();
    table(&["artifact", "type", "size", "path"], &rows)
}
