//! What can go wrong, and the exit code each kind of failure ends with.

use std::path::PathBuf;

use reqwest::StatusCode;

/// Exit codes scripts can test; listed in `backlog --help` and the README.
pub mod exit {
    /// Done.
    pub const OK: u8 = 0;
    /// The job finished failed or cancelled.
    pub const JOB_FAILED: u8 = 1;
    /// Bad arguments or input (refused here, or by the API with 400/422).
    pub const USAGE: u8 = 2;
    /// No URL or key, the API unreachable, the key refused (401/403),
    /// rate-limited (429), or a server error.
    pub const API: u8 = 3;
    /// No such job or artifact (404).
    pub const NOT_FOUND: u8 = 4;
    /// The job's state does not allow it (409): cancelling a finished job,
    /// retrying one that has not failed, an idempotency key reused.
    pub const CONFLICT: u8 = 5;
    /// A local file could not be read or written.
    pub const FILE: u8 = 6;
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Config(String),
    #[error("the API answered {status}: {message}{}", field.as_ref().map(|f| format!(" (field {f})")).unwrap_or_default())]
    Api {
        status: StatusCode,
        code: String,
        message: String,
        field: Option<String>,
    },
    #[error("could not reach the API at {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered with something that is not the backlog API's JSON ({message}); does BACKLOG_URL name the API?")]
    NotTheApi { url: String, message: String },
    #[error("{what} {}: {source}", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    NotFound(String),
    #[error("job {id} {status}{}", error.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    JobFailed {
        id: uuid::Uuid,
        status: queue::JobStatus,
        error: Option<String>,
    },
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => exit::USAGE,
            CliError::Config(_) | CliError::Unreachable { .. } | CliError::NotTheApi { .. } => exit::API,
            CliError::File { .. } => exit::FILE,
            CliError::NotFound(_) => exit::NOT_FOUND,
            CliError::JobFailed { .. } => exit::JOB_FAILED,
            CliError::Api { status, .. } => match *status {
                StatusCode::NOT_FOUND => exit::NOT_FOUND,
                StatusCode::CONFLICT => exit::CONFLICT,
                StatusCode::BAD_REQUEST
                | StatusCode::UNPROCESSABLE_ENTITY
                | StatusCode::PAYLOAD_TOO_LARGE
                | StatusCode::UNSUPPORTED_MEDIA_TYPE => exit::USAGE,
                _ => exit::API,
            },
        }
    }

    pub fn file(what: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> CliError {
        let path = path.into();
        move |source| CliError::File { what, path, source }
    }
}

pub type Result<T, E = CliError> = std::result::Result<T, E>;
