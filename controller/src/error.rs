//! What the controller crate can fail at.

use std::fmt;
use std::path::PathBuf;

/// Where a manifest document came from: enough to open an editor at it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    /// First line of the document in its file, from 1.
    pub line: usize,
    /// Position of the document among the file's non-empty documents, from 1.
    pub document: usize,
    /// The document's `metadata.name`, when it has one.
    pub name: Option<String>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{} (document {}",
            self.file.display(),
            self.line,
            self.document
        )?;
        if let Some(name) = &self.name {
            write!(f, ", {name}")?;
        }
        f.write_str(")")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{}: no .yaml or .yml files", path.display())]
    NoManifests { path: PathBuf },

    #[error("{location}: not valid YAML: {source}")]
    Yaml {
        location: Location,
        #[source]
        source: serde_yaml_ng::Error,
    },

    /// A field that cannot be read, is unknown, or holds a value the spec rejects.
    #[error("{location}: {path}: {message}")]
    Field {
        location: Location,
        path: String,
        message: String,
    },

    #[error("{location}: apiVersion: must be {expected:?}, got {}", shown(.found))]
    ApiVersion {
        location: Location,
        expected: String,
        found: Option<String>,
    },

    #[error("{location}: kind: must be {expected:?}, got {}", shown(.found))]
    Kind {
        location: Location,
        expected: String,
        found: Option<String>,
    },

    #[error("{location}: a WorkerPool with this name is already defined at {first}")]
    DuplicateName {
        location: Location,
        first: Box<Location>,
    },

    /// Two pools scaling on the same queue would each add replicas for the whole of it.
    #[error("{location}: task type {task_type} is already served by the WorkerPool at {first}")]
    SharedTaskType {
        location: Location,
        task_type: queue::TaskType,
        first: Box<Location>,
    },

    #[error("cannot render the CRD: {0}")]
    RenderCrd(#[source] serde_yaml_ng::Error),
}

impl Error {
    /// The document the error is about, when it is about one.
    pub fn location(&self) -> Option<&Location> {
        match self {
            Error::Yaml { location, .. }
            | Error::Field { location, .. }
            | Error::ApiVersion { location, .. }
            | Error::Kind { location, .. }
            | Error::DuplicateName { location, .. }
            | Error::SharedTaskType { location, .. } => Some(location),
            Error::Read { .. } | Error::NoManifests { .. } | Error::RenderCrd(_) => None,
        }
    }
}

fn shown(found: &Option<String>) -> String {
    match found {
        Some(value) => format!("{value:?}"),
        None => "nothing".to_string(),
    }
}
