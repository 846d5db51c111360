//! The crate's one error type, classified for the queue: retryable failures
//! go back to pending with backoff, permanent ones fail the task at once.

use std::time::Duration;

use queue::{Failure, FailureKind};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A missing or malformed setting; retrying with the same settings cannot help.
    #[error("configuration: {0}")]
    Config(String),

    /// The job's input cannot be processed as given.
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// A remote service (LLM, TTS) failed or could not be reached.
    #[error("{service}: {message}")]
    Remote {
        service: &'static str,
        message: String,
        retryable: bool,
        /// The wait the service asked for before trying again.
        retry_after: Option<Duration>,
    },

    /// A remote service answered, but not with what its contract promises.
    #[error("{service} returned an unusable response: {message}")]
    MalformedResponse { service: &'static str, message: String },

    /// A local program (espeak-ng) failed.
    #[error("{program}: {message}")]
    Program {
        program: &'static str,
        message: String,
        retryable: bool,
    },

    #[error(transparent)]
    Store(#[from] store::StoreError),

    /// typst rejected the document; deterministic, so never retried.
    #[error("typesetting: {0}")]
    Typeset(String),

    /// Audio that cannot be decoded, joined or encoded.
    #[error("audio: {0}")]
    Audio(String),

    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    pub(crate) fn remote(service: &'static str, message: impl Into<String>, retryable: bool) -> Self {
        Error::Remote {
            service,
            message: message.into(),
            retryable,
            retry_after: None,
        }
    }

    /// This error, carrying the wait the service asked for (if any).
    pub(crate) fn retry_after(self, wait: Option<Duration>) -> Self {
        match self {
            Error::Remote {
                service,
                message,
                retryable,
                ..
            } => Error::Remote {
                service,
                message,
                retryable,
                retry_after: wait,
            },
            other => other,
        }
    }

    pub(crate) fn malformed(service: &'static str, message: impl Into<String>) -> Self {
        Error::MalformedResponse {
            service,
            message: message.into(),
        }
    }

    /// Whether another attempt may succeed where this one failed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Remote { retryable, .. } | Error::Program { retryable, .. } => *retryable,
            Error::Store(e) => e.is_retryable(),
            Error::Io(_) => true,
            Error::Config(_)
            | Error::InvalidInput(_)
            | Error::MalformedResponse { .. }
            | Error::Typeset(_)
            | Error::Audio(_) => false,
        }
    }

    pub fn failure_kind(&self) -> FailureKind {
        if self.is_retryable() {
            FailureKind::Retryable
        } else {
            FailureKind::Permanent
        }
    }
}

impl From<&Error> for Failure {
    fn from(error: &Error) -> Self {
        Failure {
            kind: error.failure_kind(),
            message: error.to_string(),
            retry_after: match error {
                Error::Remote { retry_after, .. } => *retry_after,
                _ => None,
            },
        }
    }
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Failure::from(&error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_reaches_the_queue() {
        let busy = Error::remote("llm", "HTTP 503", true);
        assert_eq!(Failure::from(busy).kind, FailureKind::Retryable);

        let refused = Error::remote("llm", "HTTP 400: bad model", false);
        let failure = Failure::from(refused);
        assert_eq!(failure.kind, FailureKind::Permanent);
        assert_eq!(failure.message, "llm: HTTP 400: bad model");
        assert_eq!(failure.retry_after, None);

        let limited = Error::remote("llm", "HTTP 429", true).retry_after(Some(Duration::from_secs(120)));
        assert_eq!(
            Failure::from(limited).retry_after,
            Some(Duration::from_secs(120)),
            "the wait a provider asked for reaches the queue"
        );

        let missing = Error::Store(store::StoreError::NotFound {
            key: "jobs/x/text.md".into(),
        });
        assert!(!missing.is_retryable());
        let hiccup = Error::Store(store::StoreError::Io(std::io::ErrorKind::ConnectionReset.into()));
        assert!(hiccup.is_retryable());
    }
}
