//! The command line: every command, flag and help text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use queue::{ArtifactKind, JobStatus, JobType};
use uuid::Uuid;

use crate::output::Format;

/// Exit codes, in `backlog --help` (the README lists the same).
macro_rules! exit_codes_help {
    () => {
        "Exit codes:
  0  done
  1  the job finished failed or cancelled (--wait, jobs wait)
  2  bad arguments or input (refused here, or by the API: 400, 422)
  3  no URL or key, the API unreachable or something else answering at
     its URL, the key refused (401, 403), rate-limited (429), or a server
     error (5xx)
  4  no such job or artifact (404)
  5  the job's state does not allow it (409): cancelling a finished job,
     retrying one that has not failed, an idempotency key reused
  6  a local file could not be read or written"
    };
}

const MAIN_HELP: &str = concat!(
    "Configuration:
  BACKLOG_URL and BACKLOG_KEY from the environment, else `url` and `key` in
  the config file: $BACKLOG_CONFIG, else $XDG_CONFIG_HOME/backlog/config.toml,
  else ~/.config/backlog/config.toml. The environment wins. The key is never
  printed.

Examples:
  backlog submit reading --prompt \"the life of tides\" --title Tides --lang el --wait
  backlog submit pdf --text-file chapter.md --title \"Chapter 1\"
  backlog submit --batch jobs.jsonl --idempotency-key import-2026-12-02
  backlog jobs list --status failed -o json | jq -r '.jobs[].id'
  backlog artifacts get 0193…e1 --kind pdf -o tides.pdf
  backlog queue
  backlog completions zsh > ~/.zfunc/_backlog

",
    exit_codes_help!()
);

#[derive(Debug, Parser)]
#[command(
    name = "backlog",
    version,
    about = "The command-line client of backlog's HTTP API",
    after_help = MAIN_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a job (or a batch of jobs); --wait follows it to the end.
    #[command(after_help = SUBMIT_HELP)]
    Submit(SubmitArgs),
    /// List, read, cancel, retry or wait for jobs.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Download a job's artifacts.
    #[command(subcommand)]
    Artifacts(ArtifactsCommand),
    /// Queue depth per task type (an admin key).
    #[command(after_help = "Example:\n  backlog queue -o yaml")]
    Queue(FormatArg),
    /// Worker pools as the controller last saw them, the columns of
    /// `kubectl get wp` (an admin key).
    #[command(after_help = "Example:\n  backlog pools")]
    Pools(FormatArg),
    /// Where the URL and key come from (the key itself is never shown).
    Config(FormatArg),
    /// Check an API key against the API and keep it, with the URL, in the
    /// config file. The key is read from stdin, never from the command
    /// line, so it stays out of shell history and `ps`.
    #[command(after_help = LOGIN_HELP)]
    Login {
        /// The API's base URL (default: the one configured).
        #[arg(long)]
        url: Option<String>,
    },
    /// Remove the key from the config file (the URL stays).
    Logout,
    /// A shell completion script, on stdout.
    #[command(after_help = COMPLETIONS_HELP)]
    Completions { shell: clap_complete::Shell },
}

const LOGIN_HELP: &str = "\
Examples:
  backlog login --url https://backlog.example.com < key.txt
  pass show backlog/key | backlog login
  backlog login --url http://127.0.0.1:8787      # then paste the key and press Enter";

const SUBMIT_HELP: &str = "\
Examples:
  backlog submit reading --prompt \"the life of tides\" --title Tides --lang el --wait
  backlog submit text --prompt \"a haiku about queues\" -o json
  backlog submit audiobook --text-file chapter.md --voice en-us
  backlog submit pdf --input input.json --idempotency-key chapter-1
  backlog submit --batch jobs.jsonl --idempotency-key import-7

A batch file holds one job per line:
  {\"type\": \"text\", \"input\": {\"prompt\": \"…\"}, \"priority\": 5, \"idempotency_key\": \"k1\"}
`priority` and `idempotency_key` are optional; with --idempotency-key K, a
line without its own key is keyed K-<line number>, so running the file again
creates nothing twice. Every line is checked before any job is created.";

const COMPLETIONS_HELP: &str = "\
Examples:
  backlog completions bash > /etc/bash_completion.d/backlog
  backlog completions zsh > \"${fpath[1]}/_backlog\"
  backlog completions fish > ~/.config/fish/completions/backlog.fish";

#[derive(Debug, Args)]
pub struct FormatArg {
    /// Output format.
    #[arg(short, long = "output", value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The job type (reading, text, pdf, audiobook); not with --batch.
    #[arg(value_parser = parse_job_type, required_unless_present = "batch", conflicts_with = "batch")]
    pub job_type: Option<JobType>,
    /// What to write about (reading, text).
    #[arg(long, conflicts_with_all = ["text", "text_file", "input"])]
    pub prompt: Option<String>,
    /// The text to typeset or read aloud (pdf, audiobook).
    #[arg(long, conflicts_with_all = ["text_file", "input"])]
    pub text: Option<String>,
    /// Read the text from a file (`-` for stdin).
    #[arg(long, value_name = "FILE", conflicts_with = "input")]
    pub text_file: Option<PathBuf>,
    #[arg(long, conflicts_with = "input")]
    pub title: Option<String>,
    #[arg(long, conflicts_with = "input")]
    pub voice: Option<String>,
    /// The document's language: an ISO 639 code, optionally with a region
    /// (el, en-GB).
    #[arg(long, conflicts_with = "input")]
    pub lang: Option<String>,
    /// The job's whole input as a JSON object, from a file (`-` for stdin).
    #[arg(long, value_name = "FILE.json")]
    pub input: Option<PathBuf>,
    /// One job per line (JSON Lines), created one by one.
    #[arg(long, value_name = "FILE.jsonl", conflicts_with_all = ["prompt", "text", "text_file", "input", "title", "voice", "lang", "priority", "wait"])]
    pub batch: Option<PathBuf>,
    /// -100 to 100; higher runs first.
    #[arg(long, allow_negative_numbers = true)]
    pub priority: Option<i32>,
    /// Makes the request safe to repeat: the same key returns the job the
    /// first request created.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Follow the job until it finishes, drawing its tasks' progress.
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub format: FormatArg,
}

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Jobs, newest first.
    #[command(
        after_help = "Examples:\n  backlog jobs list --status failed --since 1h\n  backlog jobs list --type reading --limit 200 -o json"
    )]
    List {
        #[arg(long, value_parser = parse_job_status)]
        status: Option<JobStatus>,
        #[arg(long = "type", value_parser = parse_job_type)]
        job_type: Option<JobType>,
        /// Only jobs created within this long (`90s`, `15m`, `2h`, `7d`) or
        /// since this instant (RFC 3339, `2026-12-01T09:30:00Z`).
        #[arg(long, value_parser = parse_since)]
        since: Option<Since>,
        /// At most this many (1 to 200).
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Continue after a previous page (its `next_cursor`).
        #[arg(long)]
        cursor: Option<String>,
        #[command(flatten)]
        format: FormatArg,
    },
    /// A job with its tasks and artifacts.
    #[command(after_help = "Example:\n  backlog jobs get 0193…e1 -o yaml")]
    Get {
        id: Uuid,
        #[command(flatten)]
        format: FormatArg,
    },
    /// Cancel a job that has not finished.
    Cancel {
        id: Uuid,
        #[command(flatten)]
        format: FormatArg,
    },
    /// Queue a failed job again.
    Retry {
        id: Uuid,
        /// Follow the job until it finishes.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        format: FormatArg,
    },
    /// Follow a job until it finishes (exit 1 when it failed or was cancelled).
    #[command(after_help = "Example:\n  backlog jobs wait 0193…e1 && echo done")]
    Wait {
        id: Uuid,
        #[command(flatten)]
        format: FormatArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum ArtifactsCommand {
    /// Download a job's artifact of one kind; a partly downloaded file is
    /// resumed, and the whole file is checked against the artifact's sha256.
    #[command(
        after_help = "Examples:\n  backlog artifacts get 0193…e1 --kind pdf -o tides.pdf\n  backlog artifacts get 0193…e1 --kind audio -o - | mpv -"
    )]
    Get {
        job: Uuid,
        #[arg(long, value_parser = parse_artifact_kind)]
        kind: ArtifactKind,
        /// Where to write (`-` for stdout; default: document.pdf, audio.mp3
        /// or text.md). The bytes collect in FILE.partial (resumed from there)
        /// and replace FILE once their sha256 matches.
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        file: Option<PathBuf>,
    },
}

fn parse_job_type(s: &str) -> Result<JobType, String> {
    s.parse().map_err(|e: queue::QueueError| e.to_string())
}

fn parse_job_status(s: &str) -> Result<JobStatus, String> {
    s.parse().map_err(|e: queue::QueueError| e.to_string())
}

/// Where `--since` starts: a span back from now, or an instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Since {
    Ago(chrono::Duration),
    At(chrono::DateTime<chrono::Utc>),
}

impl Since {
    pub fn instant(self, now: chrono::DateTime<chrono::Utc>) -> chrono::DateTime<chrono::Utc> {
        match self {
            Since::Ago(span) => now - span,
            Since::At(at) => at,
        }
    }
}

fn parse_since(s: &str) -> Result<Since, String> {
    if let Ok(at) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(Since::At(at.with_timezone(&chrono::Utc)));
    }
    let expected = || format!("{s:?} is neither a duration such as 90s, 15m, 2h, 7d nor an RFC 3339 instant");
    let unit_at = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(expected)?;
    let (count, unit) = s.split_at(unit_at);
    let count: i64 = count.parse().map_err(|_| expected())?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(expected()),
    };
    // A hundred years is further back than any job; the bound keeps `now -
    // span` inside what a date holds (past it, chrono panics).
    const MOST_SECONDS: i64 = 100 * 366 * 86_400;
    count
        .checked_mul(seconds)
        .filter(|total| *total <= MOST_SECONDS)
        .and_then(chrono::Duration::try_seconds)
        .map(Since::Ago)
        .ok_or_else(|| format!("{s:?} reaches too far back (at most 36600d)"))
}

fn parse_artifact_kind(s: &str) -> Result<ArtifactKind, String> {
    ArtifactKind::try_from(s.to_string()).map_err(|e| format!("{e}; expected one of: text, pdf, audio"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn since_takes_a_span_back_from_now_or_an_instant() {
        let now: chrono::DateTime<chrono::Utc> = "2026-12-03T10:00:00Z".parse().unwrap();
        let at = |s: &str| parse_since(s).map(|since| since.instant(now).to_rfc3339());
        assert_eq!(at("90s").unwrap(), "2026-12-03T09:58:30+00:00");
        assert_eq!(at("15m").unwrap(), "2026-12-03T09:45:00+00:00");
        assert_eq!(at("2h").unwrap(), "2026-12-03T08:00:00+00:00");
        assert_eq!(at("7d").unwrap(), "2026-11-26T10:00:00+00:00");
        assert_eq!(
            at("2026-12-01T09:30:00+01:00").unwrap(),
            "2026-12-01T08:30:00+00:00"
        );
        assert!(at("36600d").unwrap().starts_with("1926-"));
        // Past the bound; 100000000d parsed and then panicked in `instant`.
        for bad in [
            "",
            "h",
            "15",
            "15 m",
            "1w",
            "-5m",
            "36601d",
            "100000000d",
            "99999999999999999d",
        ] {
            let error = parse_since(bad).unwrap_err();
            assert!(error.contains(&format!("{bad:?}")), "{bad}: {error}");
        }
    }
}
