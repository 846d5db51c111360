//! `backlog artifacts get`: download one artifact, resuming a partial file
//! with a Range request, and check the whole file against the artifact's
//! sha256 (a resumed file is only as good as the part already on disk).

use std::io::{IsTerminal, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use queue::ArtifactKind;
use reqwest::StatusCode;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::client::Client;
use crate::error::{CliError, Result};
use crate::output;

pub async fn run(client: &Client, job: Uuid, kind: ArtifactKind, file: Option<PathBuf>) -> Result<()> {
    let detail = client.job(job).await?;
    let artifact = detail.artifacts.iter().find(|a| a.kind == kind).ok_or_else(|| {
        CliError::NotFound(format!(
            "job {job} ({}) has no {} artifact{}",
            detail.job.status,
            kind.as_str(),
            if detail.job.status.is_finished() {
                ""
            } else {
                " yet"
            }
        ))
    })?;
    let total = u64::try_from(artifact.bytes).unwrap_or(0);
    let path = file.unwrap_or_else(|| PathBuf::from(default_name(kind)));
    if path == Path::new("-") {
        return to_stdout(client, &artifact.download_path).await;
    }

    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(CliError::file("opening", &path))?;
    let mut have = out.metadata().map_err(CliError::file("reading", &path))?.len();
    if have > total {
        // Longer than the artifact: not a partial copy of it.
        have = 0;
    }
    if have < total || total == 0 {
        let response = client.download(&artifact.download_path, have).await?;
        if response.status() != StatusCode::PARTIAL_CONTENT {
            // The whole body came: start over.
            have = 0;
        }
        out.set_len(have).map_err(CliError::file("truncating", &path))?;
        out.seek(SeekFrom::Start(have))
            .map_err(CliError::file("writing", &path))?;
        let bar = progress_bar(total, have);
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|source| CliError::Unreachable {
                url: artifact.download_path.clone(),
                source,
            })?;
            out.write_all(&chunk).map_err(CliError::file("writing", &path))?;
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
    }
    out.flush().map_err(CliError::file("writing", &path))?;

    let sha256 = file_sha256(&mut out).map_err(CliError::file("reading back", &path))?;
    if sha256 != artifact.sha256 {
        return Err(CliError::File {
            what: "checking",
            path,
            source: std::io::Error::other(format!(
                "its sha256 is {sha256}, the artifact's is {}; remove the file and download again",
                artifact.sha256
            )),
        });
    }
    let resumed = if have > 0 && have < total {
        format!(", resumed at byte {have}")
    } else {
        String::new()
    };
    eprintln!(
        "{}: {} {} ({}{resumed}), sha256 verified",
        path.display(),
        kind.as_str(),
        artifact.content_type,
        output::bytes(artifact.bytes),
    );
    Ok(())
}

fn default_name(kind: ArtifactKind) -> &'static str {
    match kind {
        ArtifactKind::Text => "text.md",
        ArtifactKind::Pdf => "document.pdf",
        ArtifactKind::Audio => "audio.mp3",
    }
}

async fn to_stdout(client: &Client, download_path: &str) -> Result<()> {
    let response = client.download(download_path, 0).await?;
    let mut body = response.bytes_stream();
    let mut stdout = std::io::stdout().lock();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|source| CliError::Unreachable {
            url: download_path.to_string(),
            source,
        })?;
        stdout
            .write_all(&chunk)
            .map_err(CliError::file("writing", "stdout"))?;
    }
    stdout.flush().map_err(CliError::file("writing", "stdout"))
}

fn progress_bar(total: u64, start: u64) -> ProgressBar {
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(total), target);
    bar.set_style(
        ProgressStyle::with_template("[{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_position(start);
    bar
}

fn file_sha256(file: &mut std::fs::File) -> std::io::Result<String> {
    file.seek(SeekFrom::Start(0))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}
