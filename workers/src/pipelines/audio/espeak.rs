//! Speech from Debian's `espeak-ng`, run as a child process per chunk.

use std::path::PathBuf;
use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::pcm::Pcm;
use crate::{Error, Result};

const PROGRAM: &str = "espeak-ng";

#[derive(Debug, Clone)]
pub struct Espeak {
    /// The executable; `espeak-ng` from `PATH` by default.
    pub program: PathBuf,
    /// Used when a job names no voice (`ESPEAK_VOICE`, default `en-us`).
    pub default_voice: String,
}

impl Default for Espeak {
    fn default() -> Self {
        Espeak {
            program: PathBuf::from(PROGRAM),
            default_voice: "en-us".into(),
        }
    }
}

impl Espeak {
    /// Speaks `text` with `voice` (an espeak-ng voice such as `en-us`, `de`,
    /// `el` or `gmw/en-GB-x-rp`) or the default voice.
    pub async fn synthesize(&self, text: &str, voice: Option<&str>) -> Result<Pcm> {
        let voice = voice.unwrap_or(&self.default_voice);
        check_voice(voice)?;
        // Text goes through stdin (`--stdin`, UTF-8 with `-b 1`), never the
        // command line, so nothing in it can be read as an option.
        let mut child = Command::new(&self.program)
            .args(["-v", voice, "-b", "1", "--stdin", "--stdout"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                let missing = e.kind() == std::io::ErrorKind::NotFound;
                let message = if missing {
                    format!(
                        "{} not found; scripts/ensure-tools.sh installs espeak-ng",
                        self.program.display()
                    )
                } else {
                    format!("cannot start {}: {e}", self.program.display())
                };
                Error::Program {
                    program: PROGRAM,
                    message,
                    retryable: !missing,
                }
            })?;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let input = spoken_literally(text).into_bytes();
        // Written while the output is read: a long text would otherwise fill
        // both pipes and stall the two processes on each other.
        let writer = tokio::spawn(async move {
            stdin.write_all(&input).await?;
            stdin.shutdown().await
        });
        let output = child.wait_with_output().await?;
        let written = writer.await.map_err(|e| Error::Io(std::io::Error::other(e)))?;
        // The exit status first: a process that quit early (an unknown voice)
        // also breaks the pipe, and its own error is the one that explains.
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
            // A voice that does not exist stays missing; anything else (a
            // signal, a resource limit) may pass on another attempt.
            let unknown_voice = stderr.contains("voice does not exist");
            return Err(Error::Program {
                program: PROGRAM,
                message: format!("exited with {}: {stderr}", output.status),
                retryable: !unknown_voice,
            });
        }
        written?;
        Pcm::from_wav(&output.stdout).map_err(|e| Error::Audio(format!("{PROGRAM} output: {e}")))
    }
}

impl Espeak {
    /// The voice that speaks language `tag` (`el`, `en-GB`, `pt_BR`), when
    /// espeak-ng has one: the tag is a voice name to it (and a region it
    /// lacks falls back to the language: `fr-ca` speaks French).
    pub async fn voice_for_language(&self, tag: &str) -> Option<String> {
        let voice = tag.trim().to_ascii_lowercase().replace('_', "-");
        (check_voice(&voice).is_ok() && self.has_voice(&voice).await).then_some(voice)
    }

    /// Whether espeak-ng knows `voice`: it speaks nothing in it without error.
    async fn has_voice(&self, voice: &str) -> bool {
        Command::new(&self.program)
            .args(["-v", voice, "-q", "--stdin"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .status()
            .await
            .is_ok_and(|status| status.success())
    }
}

/// `text` with no `[[`: espeak-ng reads `[[...]]` as phoneme codes, so
/// `See [[Main Page]]` was spoken as "see" and noise, the link's words
/// lost. A single bracket is read as punctuation.
fn spoken_literally(text: &str) -> String {
    let mut text = text.to_owned();
    while text.contains("[[") {
        text = text.replace("[[", "[");
    }
    text
}

/// A voice name by the queue's rule, which keeps espeak-ng (it reads the
/// name as a path under its voices folder) inside that folder.
fn check_voice(voice: &str) -> Result<()> {
    queue::input::check_voice(voice).map_err(Error::InvalidInput)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn double_brackets_are_spoken_as_text_not_phonemes() {
        assert_eq!(spoken_literally("See [[Main Page]] now"), "See [Main Page]] now");
        assert_eq!(spoken_literally("a [[[[b]]"), "a [b]]");
        assert_eq!(spoken_literally("plain [text]"), "plain [text]");
    }

    #[test]
    fn voice_names() {
        for ok in ["en-us", "de", "gmw/en-GB-x-rp", "mb-en1", "en+f3"] {
            assert!(check_voice(ok).is_ok(), "{ok}");
        }
        let outside = [
            "gmw/../../../../etc/passwd",
            "../en",
            "en/..",
            "gmw//en",
            "en/",
            "/etc/passwd",
        ];
        for bad in ["", "-w", "--stdout", "en us", "en;rm", &"x".repeat(65)]
            .into_iter()
            .chain(outside)
        {
            assert!(check_voice(bad).is_err(), "{bad}");
        }
    }
}
