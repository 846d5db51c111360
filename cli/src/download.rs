//! `backlog artifacts get`: download one artifact into `FILE.partial`,
//! resuming it with a Range request, and put it at FILE only once the whole
//! file matches the artifact's sha256 (a resumed file is only as good as
//! the part already on disk).

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
        return to_stdout(client, &artifact.download_path, &artifact.sha256).await;
    }
    let described = format!(
        "{} {} ({})",
        kind.as_str(),
        artifact.content_type,
        output::bytes(artifact.bytes)
    );
    if file_matches(&path, &artifact.sha256) {
        eprintln!("{}: {described}, already here, sha256 verified", path.display());
        return Ok(());
    }

    // The bytes go to FILE.partial, resumed from there, and FILE is replaced
    // only once they match the sha256: a file of the same name (another
    // job's document.pdf) is never appended to or cut short.
    let partial = partial_path(&path);
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&partial)
        .map_err(CliError::file("opening", &partial))?;
    let on_disk = out.metadata().map_err(CliError::file("reading", &partial))?.len();
    // Longer than the artifact: not a partial copy of it.
    let mut resume_at = if on_disk <= total { on_disk } else { 0 };
    let mut restarted = false;
    loop {
        let from = fetch_into(
            client,
            &artifact.download_path,
            &mut out,
            &partial,
            resume_at,
            total,
        )
        .await?;
        let sha256 = file_sha256(&mut out).map_err(CliError::file("reading back", &partial))?;
        if sha256 == artifact.sha256 {
            resume_at = from;
            break;
        }
        if from > 0 {
            // The part already on disk was not this artifact's: once more
            // from the start.
            resume_at = 0;
            restarted = true;
            continue;
        }
        drop(out);
        let _ = std::fs::remove_file(&partial);
        return Err(CliError::File {
            what: "checking",
            path,
            source: std::io::Error::other(format!(
                "the download's sha256 is {sha256}, the artifact's is {}; nothing was kept, run again",
                artifact.sha256
            )),
        });
    }
    drop(out);
    std::fs::rename(&partial, &path).map_err(CliError::file("renaming into place", &path))?;
    let how = if restarted {
        format!(
            ", {} held other bytes and was downloaded again",
            partial.display()
        )
    } else if resume_at > 0 {
        format!(", resumed at byte {resume_at}")
    } else {
        String::new()
    };
    eprintln!("{}: {described}{how}, sha256 verified", path.display());
    Ok(())
}

/// Fetch the artifact into `out` from byte `from` (0: all of it), and
/// return where the bytes written began (0 when the server sent the whole
/// body instead of the range).
async fn fetch_into(
    client: &Client,
    download_path: &str,
    out: &mut std::fs::File,
    path: &Path,
    from: u64,
    total: u64,
) -> Result<u64> {
    if from == total && total > 0 {
        return Ok(from);
    }
    let response = client.download(download_path, from).await?;
    let from = if response.status() == StatusCode::PARTIAL_CONTENT {
        from
    } else {
        0
    };
    out.set_len(from).map_err(CliError::file("truncating", path))?;
    out.seek(SeekFrom::Start(from))
        .map_err(CliError::file("writing", path))?;
    let bar = progress_bar(total, from);
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|source| CliError::Unreachable {
            url: download_path.to_string(),
            source,
        })?;
        out.write_all(&chunk).map_err(CliError::file("writing", path))?;
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    out.flush().map_err(CliError::file("writing", path))?;
    Ok(from)
}

/// Where a download to `path` collects its bytes until they are checked.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

/// Whether `path` already holds bytes with this sha256.
fn file_matches(path: &Path, sha256: &str) -> bool {
    std::fs::File::open(path)
        .and_then(|mut file| file_sha256(&mut file))
        .is_ok_and(|found| found == sha256)
}

fn default_name(kind: ArtifactKind) -> &'static str {
    match kind {
        ArtifactKind::Text => "text.md",
        ArtifactKind::Pdf => "document.pdf",
        ArtifactKind::Audio => "audio.mp3",
    }
}

/// Stream the artifact to stdout, checking its sha256 as it passes: the
/// bytes are out by then, so a mismatch is told by the exit code. A reader
/// that goes (`| head -c 100`) ends the download, quietly.
async fn to_stdout(client: &Client, download_path: &str, expected: &str) -> Result<()> {
    let response = client.download(download_path, 0).await?;
    let mut body = response.bytes_stream();
    let mut hasher = Sha256::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|source| CliError::Unreachable {
            url: download_path.to_string(),
            source,
        })?;
        hasher.update(&chunk);
        if output::write_stdout_for(&chunk)? == output::Reader::Gone {
            return Ok(());
        }
    }
    let sha256 = format!("{:x}", hasher.finalize());
    if sha256 != expected {
        return Err(CliError::File {
            what: "checking",
            path: PathBuf::from("-"),
            source: std::io::Error::other(format!(
                "the bytes written have sha256 {sha256}, the artifact's is {expected}"
            )),
        });
    }
    Ok(())
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
