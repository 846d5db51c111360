//! Reading artifact bytes from the store named by `ARTIFACT_STORE`.
//!
//! The API only reads, by the storage key the queue recorded. This small
//! trait keeps the HTTP layer independent of where bytes live; it is meant
//! to be backed by the workers' shared object store once that exists. For
//! now only `file://` stores are implemented.

use std::io;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};

use axum::body::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

pub type ByteStream = BoxStream<'static, io::Result<Bytes>>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no object stored under {0:?}")]
    NotFound(String),
    /// A key that would escape the store (absolute, `..`): never read.
    #[error("invalid storage key {0:?}")]
    InvalidKey(String),
    #[error("unsupported artifact store {0:?}: this build reads file:// stores")]
    UnsupportedStore(String),
    #[error("artifact store I/O: {0}")]
    Io(#[from] io::Error),
}

/// Read access to stored artifacts by storage key.
pub trait ArtifactReader: Send + Sync + 'static {
    /// Size of the object in bytes.
    fn size<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<u64, StoreError>>;
    /// The bytes in `range` (which lies within the object).
    fn read<'a>(&'a self, key: &'a str, range: Range<u64>) -> BoxFuture<'a, Result<ByteStream, StoreError>>;
}

/// Open the store an `ARTIFACT_STORE` URL names.
pub fn open(url: &str) -> Result<FileStore, StoreError> {
    match url.strip_prefix("file://") {
        Some(path) if !path.is_empty() => Ok(FileStore::new(path)),
        _ => Err(StoreError::UnsupportedStore(url.to_string())),
    }
}

/// Objects as files under a root folder; keys are relative paths.
#[derive(Debug, Clone)]
pub struct FileStore {
    root: PathBuf,
}

impl FileStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        FileStore { root: root.into() }
    }

    fn path_of(&self, key: &str) -> Result<PathBuf, StoreError> {
        let relative = Path::new(key);
        let plain = !key.is_empty() && relative.components().all(|c| matches!(c, Component::Normal(_)));
        if !plain {
            return Err(StoreError::InvalidKey(key.to_string()));
        }
        Ok(self.root.join(relative))
    }

    fn not_found_as(key: &str) -> impl Fn(io::Error) -> StoreError + '_ {
        move |e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::NotFound(key.to_string()),
            _ => StoreError::Io(e),
        }
    }
}

impl ArtifactReader for FileStore {
    fn size<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            let meta = tokio::fs::metadata(self.path_of(key)?)
                .await
                .map_err(Self::not_found_as(key))?;
            if !meta.is_file() {
                return Err(StoreError::NotFound(key.to_string()));
            }
            Ok(meta.len())
        })
    }

    fn read<'a>(&'a self, key: &'a str, range: Range<u64>) -> BoxFuture<'a, Result<ByteStream, StoreError>> {
        Box::pin(async move {
            let mut file = tokio::fs::File::open(self.path_of(key)?)
                .await
                .map_err(Self::not_found_as(key))?;
            file.seek(io::SeekFrom::Start(range.start)).await?;
            let limited = file.take(range.end.saturating_sub(range.start));
            Ok(ReaderStream::new(limited).boxed())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_must_stay_inside_the_root() {
        let store = FileStore::new("/srv/artifacts");
        assert_eq!(
            store.path_of("jobs/a/text.md").unwrap(),
            PathBuf::from("/srv/artifacts/jobs/a/text.md")
        );
        for bad in ["", "../etc/passwd", "a/../../b", "/etc/passwd", "./a", "a//../b"] {
            assert!(
                matches!(store.path_of(bad), Err(StoreError::InvalidKey(_))),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn only_file_urls_open() {
        assert!(open("file:///tmp/x").is_ok());
        assert!(matches!(
            open("s3://bucket"),
            Err(StoreError::UnsupportedStore(_))
        ));
        assert!(matches!(open("file://"), Err(StoreError::UnsupportedStore(_))));
    }
}
