//! `backlog`, the command-line client of the HTTP API. It talks to the API
//! only: inputs are built with the queue crate's job-input contract
//! (`queue::input`), responses read into [`views`].

mod args;
mod client;
mod config;
mod download;
mod error;
mod output;
mod submit;
mod views;
mod watch;

pub use args::Cli;
pub use error::{exit, CliError};
pub use output::printable;

use args::{ArtifactsCommand, Command, JobsCommand};
use client::{Client, ListFilter};
use config::Settings;
use error::Result;
use std::io::IsTerminal;

use output::{age, or_dash, print, table, Format};
use views::{Job, JobDetail};

/// Run one command line.
pub async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, "backlog", &mut script);
            output::write_stdout(&script)
        }
        Command::Config(format) => show_config(&Settings::load()?, format.output),
        Command::Login { url } => login(url).await,
        Command::Logout => logout(),
        command => {
            let (url, key) = Settings::load()?.require()?;
            let client = Client::new(url, key)?;
            run_api_command(&client, command).await
        }
    }
}

async fn run_api_command(client: &Client, command: Command) -> Result<()> {
    match command {
        Command::Submit(args) => submit::run(client, args).await,
        Command::Jobs(JobsCommand::List {
            status,
            job_type,
            since,
            limit,
            cursor,
            format,
        }) => {
            let filter = ListFilter {
                status,
                job_type,
                created_after: since.map(|since| since.instant(chrono::Utc::now())),
                limit: Some(limit),
                cursor,
            };
            let list = client.list_jobs(&filter).await?;
            print(format.output, &list, |list| {
                let mut text = jobs_table(&list.jobs);
                if let Some(cursor) = &list.next_cursor {
                    text.push_str(&format!("(more: --cursor {cursor})\n"));
                }
                text
            })
        }
        Command::Jobs(JobsCommand::Get { id, format }) => {
            let detail = client.job(id).await?;
            print(format.output, &detail, job_detail_table)
        }
        Command::Jobs(JobsCommand::Cancel { id, format }) => {
            let job = client.cancel_job(id).await?;
            print(format.output, &job, |job| jobs_table(std::slice::from_ref(job)))
        }
        Command::Jobs(JobsCommand::Retry { id, wait, format }) => {
            let job = client.retry_job(id).await?;
            if wait {
                watch::follow(client, job.id, format.output).await
            } else {
                print(format.output, &job, |job| jobs_table(std::slice::from_ref(job)))
            }
        }
        Command::Jobs(JobsCommand::Wait { id, format }) => watch::follow(client, id, format.output).await,
        Command::Artifacts(ArtifactsCommand::Get { job, kind, file }) => {
            download::run(client, job, kind, file).await
        }
        Command::Queue(format) => {
            let depth = client.queue_depth().await?;
            print(format.output, &depth, |depth| {
                let rows: Vec<Vec<String>> = depth
                    .task_types
                    .iter()
                    .map(|d| {
                        let capped = if d.capped { "+" } else { "" };
                        vec![
                            d.task_type.to_string(),
                            format!("{}{capped}", d.pending),
                            d.scheduled.to_string(),
                            d.blocked.to_string(),
                            d.in_flight.to_string(),
                            output::duration(chrono::Duration::milliseconds(
                                (d.oldest_pending_seconds * 1000.0) as i64,
                            )),
                            d.completed_last_minute.to_string(),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "task type",
                        "pending",
                        "scheduled",
                        "blocked",
                        "in flight",
                        "oldest pending",
                        "done/min",
                    ],
                    &rows,
                )
            })
        }
        Command::Pools(format) => {
            let pools = client.pools().await?;
            print(format.output, &pools, |pools| {
                let rows: Vec<Vec<String>> = pools
                    .pools
                    .iter()
                    .map(|p| {
                        vec![
                            p.pool.clone(),
                            or_dash((!p.task_types.is_empty()).then(|| p.task_types.join(","))),
                            p.pending.to_string(),
                            p.in_flight.to_string(),
                            p.desired_replicas.to_string(),
                            p.current_replicas.to_string(),
                            p.ready_replicas.to_string(),
                            or_dash(p.condition("Active")),
                            p.busy_replicas.to_string(),
                            or_dash(p.decision_or_failure().as_deref()),
                            age(p.created_at),
                            p.backend.clone(),
                            age(p.updated_at),
                        ]
                    })
                    .collect();
                table(&POOL_COLUMNS, &rows)
            })
        }
        Command::Config(_) | Command::Login { .. } | Command::Logout | Command::Completions { .. } => {
            unreachable!("handled before a client is made")
        }
    }
}

/// `kubectl get wp -o wide`'s columns (the CRD's additionalPrinterColumns),
/// in its order, then the backend and how long ago the controller last
/// wrote the row.
pub const POOL_COLUMNS: [&str; 13] = [
    "name",
    "task types",
    "pending",
    "in-flight",
    "desired",
    "current",
    "ready",
    "active",
    "busy",
    "decision",
    "age",
    "backend",
    "updated",
];

/// `backlog login`: the key from stdin, checked with a request the API
/// answers for any valid key, then saved. A refused key changes nothing.
async fn login(url: Option<String>) -> Result<()> {
    let (settings, broken) = Settings::load_for_login();
    if let Some(why) = broken {
        eprintln!("backlog: {why}; this login replaces it");
    }
    let path = settings.file.clone().ok_or_else(|| {
        CliError::Config("no config file to write: set BACKLOG_CONFIG, XDG_CONFIG_HOME or HOME".into())
    })?;
    let url = url
        .or_else(|| settings.url.as_ref().map(|(u, _)| u.clone()))
        .ok_or_else(|| CliError::Usage("no API URL: pass --url https://…".into()))?;
    let mut line = String::new();
    if std::io::stdin().is_terminal() && std::io::stderr().is_terminal() {
        // Typed or pasted at a terminal: not echoed, so the key stays out of
        // the scrollback, a screen share and a recorded session.
        line = read_line_unechoed(&format!("API key for {url} (not shown): "))
            .map_err(CliError::file("reading the key from", "the terminal"))?;
    } else {
        std::io::stdin()
            .read_line(&mut line)
            .map_err(CliError::file("reading the key from", "stdin"))?;
    }
    let key = config::ApiKey::new(line.trim().to_string());
    if key.expose().is_empty() {
        return Err(CliError::Usage(
            "no key on stdin: pipe it in, e.g. `backlog login --url URL < key.txt`".into(),
        ));
    }
    let url = config::api_url(&url)?;
    let client = Client::new(url.clone(), key.clone())?;
    client
        .list_jobs(&ListFilter {
            limit: Some(1),
            ..ListFilter::default()
        })
        .await?;
    config::save(&path, config::Change::Login { url: &url, key: &key })?;
    output::write_stdout(
        format!(
            "Logged in to {url}; the key is kept in {} (mode 0600).\n",
            path.display()
        )
        .as_bytes(),
    )?;
    if let Some((_, source @ config::Source::Env(_))) = &settings.key {
        eprintln!("Note: {source} is set and wins over the config file while it is.");
    }
    Ok(())
}

/// One line from the terminal on stdin, its echo off from before `prompt`
/// shows until the line is read. The echo goes off without discarding
/// pending input (`TCSANOW`): turned off after the prompt and with
/// `TCSAFLUSH`, as `console`'s secure read did, a key pasted the moment the
/// prompt appeared was echoed, then discarded, and login waited for a line
/// that never came.
fn read_line_unechoed(prompt: &str) -> std::io::Result<String> {
    use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
    let stdin = std::io::stdin();
    let shown = tcgetattr(&stdin)?;
    let mut hidden = shown.clone();
    hidden.local_flags.remove(LocalFlags::ECHO);
    // The Enter that ends the key still moves to the next line.
    hidden.local_flags.insert(LocalFlags::ECHONL);
    tcsetattr(&stdin, SetArg::TCSANOW, &hidden)?;
    eprint!("{prompt}");
    let mut line = String::new();
    let read = stdin.read_line(&mut line);
    let restored = tcsetattr(&stdin, SetArg::TCSANOW, &shown);
    read?;
    restored?;
    Ok(line)
}

/// `backlog logout`: forget the stored key.
fn logout() -> Result<()> {
    let settings = Settings::load()?;
    let Some(path) = settings.file else {
        return Err(CliError::Config(
            "no config file: set BACKLOG_CONFIG, XDG_CONFIG_HOME or HOME".into(),
        ));
    };
    let said = if config::save(&path, config::Change::Logout)? {
        format!("The key is removed from {}.\n", path.display())
    } else {
        format!("{} holds no key.\n", path.display())
    };
    output::write_stdout(said.as_bytes())
}

fn show_config(settings: &Settings, format: Format) -> Result<()> {
    let value = serde_json::json!({
        "url": settings.url.as_ref().map(|(u, _)| u),
        "url_from": settings.url.as_ref().map(|(_, s)| s.to_string()),
        "key": settings.key.as_ref().map(|_| "(set)"),
        "key_from": settings.key.as_ref().map(|(_, s)| s.to_string()),
        "config_file": settings.file.as_ref().map(|p| p.display().to_string()),
    });
    print(format, &value, |_| {
        let from =
            |s: Option<&config::Source>| s.map_or_else(|| "not set".to_string(), |s| format!("from {s}"));
        format!(
            "url:   {} ({})\nkey:   {} ({})\nconfig file: {}\n",
            settings.url.as_ref().map_or("-", |(u, _)| u.as_str()),
            from(settings.url.as_ref().map(|(_, s)| s)),
            if settings.key.is_some() { "set" } else { "-" },
            from(settings.key.as_ref().map(|(_, s)| s)),
            or_dash(settings.file.as_ref().map(|p| p.display())),
        )
    })
}

fn jobs_table(jobs: &[Job]) -> String {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.id.to_string(),
                j.job_type.to_string(),
                j.status.to_string(),
                j.priority.to_string(),
                age(j.created_at),
                or_dash(j.error.as_deref()),
            ]
        })
        .collect();
    table(&["id", "type", "status", "priority", "age", "error"], &rows)
}

fn job_detail_table(detail: &JobDetail) -> String {
    let mut out = jobs_table(std::slice::from_ref(&detail.job));
    out.push('\n');
    out.push_str(&watch::tasks_table(&detail.tasks));
    if !detail.artifacts.is_empty() {
        out.push('\n');
        out.push_str(&watch::artifacts_table(&detail.artifacts));
    }
    out
}
