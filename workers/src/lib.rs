//! backlog's workers: the three pipelines a worker runs and the store their
//! artifacts go to.
//!
//! - [`pipelines::text`]: a prompt → Markdown, through an OpenAI-compatible
//!   chat completions endpoint or the offline composer.
//! - [`pipelines::pdf`]: Markdown → a typeset PDF (typst).
//! - [`pipelines::audio`]: Markdown → speech (espeak-ng or RunPod) → MP3.
//!
//! Outputs go to the `store` crate's artifact store (`ARTIFACT_STORE`:
//! `file://` or `s3://`).
//!
//! Every fallible call returns [`Error`], which knows whether retrying can
//! help and converts into the queue's [`queue::Failure`].

pub mod cli;
pub mod error;
pub mod handlers;
mod http;
pub mod metrics;
pub mod pipelines;
pub mod runtime;

pub use error::{Error, Result};
pub use http::{RetryPolicy, Secret};
