//! The three pipelines. Each is a plain async call with typed input and
//! output; the runtime decides when to call it and what to do with the result.
//!
//! - [`text::LlmProvider::generate`]: prompt → Markdown.
//! - [`pdf::typeset`]: a [`document::Document`] → PDF.
//! - [`audio::Narrator::narrate`]: a [`document::Document`] → MP3.
//!
//! The pdf and audio tasks read the text task's Markdown through
//! [`document::Document::parse`].

pub mod audio;
pub mod document;
pub mod pdf;
pub mod text;

use serde::Deserialize;

/// The fields of a job's `input` the pipelines read. The API validates input
/// before a job exists; this is lenient and ignores fields it does not know.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct JobInput {
    /// What to write about (`reading` and `text` jobs).
    pub prompt: Option<String>,
    pub title: Option<String>,
    /// The text to typeset or speak (`pdf` and `audiobook` jobs).
    pub text: Option<String>,
    /// A TTS voice name (espeak-ng voice, or passed on to RunPod).
    pub voice: Option<String>,
    /// An ISO 639 language code for hyphenation; English when absent.
    pub lang: Option<String>,
}

impl JobInput {
    pub fn from_json(input: &serde_json::Value) -> crate::Result<Self> {
        JobInput::deserialize(input).map_err(|e| crate::Error::InvalidInput(format!("job input: {e}")))
    }
}
