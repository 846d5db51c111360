//! `backlog submit`: one job from flags or an input file, or a batch from
//! a JSON Lines file. Inputs are built and checked with the queue crate's
//! job-input contract before anything is sent, so a mistake is named here,
//! with its line and field.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use queue::input::{InputKind, JobInput, PromptInput, TextInput};
use queue::JobType;
use serde::{Deserialize, Serialize};

use crate::args::SubmitArgs;
use crate::client::{Client, CreateJob};
use crate::error::{CliError, Result};
use crate::output::print;
use crate::views::Job;
use crate::{jobs_table, watch};

pub async fn run(client: &Client, args: SubmitArgs) -> Result<()> {
    if let Some(batch) = &args.batch {
        return submit_batch(client, batch, args.idempotency_key.as_deref(), &args).await;
    }
    let job_type = args
        .job_type
        .ok_or_else(|| CliError::Usage("a job type is required (reading, text, pdf, audiobook)".into()))?;
    let input = serde_json::to_value(input_from_args(job_type, &args)?)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let priority = args.priority.unwrap_or(0);
    if let Some(key) = &args.idempotency_key {
        check_idempotency_key(key).map_err(|e| CliError::Usage(format!("--idempotency-key: {e}")))?;
    }
    // The queue's own check, as the API makes it (the priority's range, a
    // blank prompt or text, one of only Markdown markers, NUL), named by
    // the flag that set it.
    let job = queue::NewJob::new("-", job_type, input).priority(priority);
    queue::validate_new_job(&job, usize::MAX).map_err(|e| match e {
        queue::QueueError::InvalidInput { field, message } => {
            let named = match (field.as_str(), &args.input) {
                ("priority", _) => "--priority".to_string(),
                (field, None) => field
                    .strip_prefix("input.")
                    .map_or(field.to_string(), |f| format!("--{f}")),
                (field, Some(path)) => format!("{}: {field}", path.display()),
            };
            CliError::Usage(format!("{named}: {message}"))
        }
        e => CliError::Usage(e.to_string()),
    })?;
    let request = CreateJob {
        job_type,
        input: job.input,
        priority,
    };
    let (job, _created) = client
        .create_job(&request, args.idempotency_key.as_deref())
        .await?;
    if args.wait {
        watch::follow(client, job.id, args.format.output).await
    } else {
        print(args.format.output, &job, |job| {
            jobs_table(std::slice::from_ref(job))
        })
    }
}

/// The input a job of `job_type` takes, from `--input FILE` or the flags.
fn input_from_args(job_type: JobType, args: &SubmitArgs) -> Result<JobInput> {
    if let Some(path) = &args.input {
        let text = read_source(path)?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| CliError::Usage(format!("{}: not JSON: {e}", path.display())))?;
        return JobInput::parse(job_type, &value)
            .map_err(|e| CliError::Usage(format!("{}: not a {job_type} job's input: {e}", path.display())));
    }
    let text = match &args.text_file {
        Some(path) => Some(read_source(path)?),
        None => args.text.clone(),
    };
    let input = match job_type.input_kind() {
        InputKind::Prompt => {
            if text.is_some() {
                return Err(CliError::Usage(format!(
                    "{job_type} jobs take --prompt, not --text or --text-file"
                )));
            }
            let prompt = args
                .prompt
                .clone()
                .ok_or_else(|| CliError::Usage(format!("{job_type} jobs need --prompt")))?;
            JobInput::Prompt(PromptInput {
                prompt,
                title: args.title.clone(),
                voice: args.voice.clone(),
                lang: args.lang.clone(),
            })
        }
        InputKind::Text => {
            if args.prompt.is_some() {
                return Err(CliError::Usage(format!(
                    "{job_type} jobs take --text or --text-file, not --prompt"
                )));
            }
            let text =
                text.ok_or_else(|| CliError::Usage(format!("{job_type} jobs need --text or --text-file")))?;
            JobInput::Text(TextInput {
                text,
                title: args.title.clone(),
                voice: args.voice.clone(),
                lang: args.lang.clone(),
            })
        }
    };
    // The flags built the input; the contract checks it as the API will
    // (the language tag, for one).
    let value = serde_json::to_value(&input).map_err(|e| CliError::Usage(e.to_string()))?;
    JobInput::parse(job_type, &value).map_err(|e| CliError::Usage(format!("{job_type} job input: {e}")))
}

/// One line of a batch file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchLine {
    #[serde(rename = "type")]
    job_type: JobType,
    input: serde_json::Value,
    #[serde(default)]
    priority: i32,
    #[serde(default)]
    idempotency_key: Option<String>,
}

/// What a batch created, job by job, in file order.
#[derive(Debug, Serialize)]
struct BatchResult {
    line: usize,
    created: bool,
    job: Job,
}

async fn submit_batch(client: &Client, path: &Path, key: Option<&str>, args: &SubmitArgs) -> Result<()> {
    let text = read_source(path)?;
    // Every line is read and checked first: a mistake on line 90 creates
    // none of the 89 before it.
    let mut requests = Vec::new();
    // Which line holds each key: a key twice in the file would make the
    // second line a replay of the first (or a conflict halfway through).
    let mut keyed_lines: HashMap<String, usize> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let number = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let at = |e: &dyn std::fmt::Display| CliError::Usage(format!("{}:{number}: {e}", path.display()));
        // Each line is parsed alone, so serde_json's own "line 1" is left
        // out; the path names the field.
        let parsed: BatchLine =
            serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(line)).map_err(|e| {
                let (path, inner) = (e.path().to_string(), e.into_inner());
                let what = format!("{inner}");
                let what = what.split(" at line ").next().unwrap_or(&what).to_string();
                match path.as_str() {
                    "." => at(&format!("{what} (column {})", inner.column())),
                    _ => at(&format!("{path}: {what}")),
                }
            })?;
        let input =
            JobInput::parse(parsed.job_type, &parsed.input).map_err(|e| at(&format!("input: {e}")))?;
        let idempotency_key = parsed
            .idempotency_key
            .or_else(|| key.map(|key| format!("{key}-{number}")));
        if let Some(key) = &idempotency_key {
            check_idempotency_key(key).map_err(|e| at(&format!("idempotency_key {key:?}: {e}")))?;
            if let Some(first) = keyed_lines.insert(key.clone(), number) {
                return Err(at(&format!(
                    "idempotency_key {key:?} is line {first}'s too: each job of a file needs its own"
                )));
            }
        }
        // The queue's own check (the priority's range, and what the API
        // would refuse only once the lines before were created: a blank
        // text, one of only Markdown markers, NUL). The input's size limit
        // is the server's, so it is left to the API.
        let mut job = queue::NewJob::new("-", parsed.job_type, parsed.input).priority(parsed.priority);
        job.idempotency_key = idempotency_key.clone();
        queue::validate_new_job(&job, usize::MAX).map_err(|e| match e {
            queue::QueueError::InvalidInput { field, message } => at(&format!("{field}: {message}")),
            e => at(&e),
        })?;
        let request = CreateJob {
            job_type: parsed.job_type,
            input: serde_json::to_value(input).map_err(|e| at(&e))?,
            priority: parsed.priority,
        };
        requests.push((number, request, idempotency_key));
    }
    if requests.is_empty() {
        return Err(CliError::Usage(format!(
            "{}: no jobs in the file",
            path.display()
        )));
    }
    let mut results = Vec::with_capacity(requests.len());
    for (line, request, idempotency_key) in requests {
        let outcome = client
            .create_job(&request, idempotency_key.as_deref())
            .await
            .map_err(|e| match e {
                CliError::Api {
                    status,
                    code,
                    message,
                    field,
                } => CliError::Api {
                    status,
                    code,
                    message: format!("{}:{line}: {message}", path.display()),
                    field,
                },
                e => e,
            });
        let (job, created) = match outcome {
            Ok(created) => created,
            Err(e) => {
                // What was created before the failure is printed, so that
                // whoever runs the rest knows where to start.
                if !results.is_empty() {
                    print_batch(args, &results)?;
                }
                return Err(e);
            }
        };
        results.push(BatchResult { line, created, job });
    }
    print_batch(args, &results)
}

/// What the API takes in an `Idempotency-Key` header: 1 to 200 visible
/// ASCII characters (spaces inside, none at either end: HTTP trims them).
fn check_idempotency_key(key: &str) -> std::result::Result<(), String> {
    const MAX: usize = 200;
    let visible = key.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
    if key.is_empty() || key.len() > MAX || !visible || key.trim() != key {
        return Err(format!(
            "must be 1 to {MAX} visible ASCII characters, with no space at either end"
        ));
    }
    Ok(())
}

fn print_batch(args: &SubmitArgs, results: &[BatchResult]) -> Result<()> {
    print(args.format.output, &results, |results| {
        let jobs: Vec<Job> = results.iter().map(|r| r.job.clone()).collect();
        let created = results.iter().filter(|r| r.created).count();
        format!(
            "{}{created} created, {} already existed\n",
            jobs_table(&jobs),
            results.len() - created
        )
    })
}

/// A file's text, or stdin's for `-`.
fn read_source(path: &Path) -> Result<String> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(CliError::file("reading", "stdin"))?;
        return Ok(text);
    }
    std::fs::read_to_string(path).map_err(CliError::file("reading", path))
}
