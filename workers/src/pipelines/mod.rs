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

/// A job's input, as the API accepted it: the contract lives in
/// [`queue::input`], shared with the API.
pub use queue::input::JobInput;

/// The input of `job`, checked against its type's contract.
pub fn job_input(job: &queue::Job) -> crate::Result<JobInput> {
    JobInput::parse(job.job_type, &job.input)
        .map_err(|e| crate::Error::InvalidInput(format!("job input: {e}")))
}
