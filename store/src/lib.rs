//! Where artifacts live: one [`ArtifactStore`] over `object_store`, chosen by
//! the `ARTIFACT_STORE` URL. Workers write through it, the API reads through
//! it, and retention deletes through it, so every part agrees on keys.
//!
//! - `file:///var/lib/backlog/artifacts`: a folder (created when missing).
//! - `s3://bucket/optional/prefix`: any S3-compatible service; region,
//!   endpoint and credentials come from the standard `AWS_*` variables
//!   (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
//!   `AWS_SECRET_ACCESS_KEY`, `AWS_ALLOW_HTTP`, …).
//!
//! Unset, it is the folder `artifacts` under the working directory.

use std::collections::BTreeSet;
use std::ops::Range;
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Once};

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{Attribute, Attributes, GetOptions, ObjectStore, ObjectStoreExt, PutOptions, PutPayload};
use queue::{ArtifactKind, Lease, NewArtifact};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Objects [`ArtifactStore::delete_objects`] deletes at once: on S3 each
/// is a round trip.
const DELETE_CONCURRENCY: usize = 8;

/// The variable naming the store.
pub const ARTIFACT_STORE_VAR: &str = "ARTIFACT_STORE";
/// The folder used when `ARTIFACT_STORE` is unset, relative to the working directory.
pub const DEFAULT_ARTIFACT_DIR: &str = "artifacts";

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `ARTIFACT_STORE` names no store this build can open.
    #[error("{ARTIFACT_STORE_VAR}: {0}")]
    Config(String),
    /// A key that is not a plain relative path (`..`, empty segments): never used.
    #[error("invalid artifact key {key:?}: {reason}")]
    InvalidKey { key: String, reason: String },
    #[error("no artifact stored under {key:?}")]
    NotFound { key: String },
    /// The store's own words with its request URLs left out: they name the
    /// endpoint, bucket and key, and the message reaches the job's
    /// `last_error`, which its tenant reads.
    #[error("artifact store: {}", without_urls(&.0.to_string()))]
    Backend(object_store::Error),
    #[error("artifact store: {0}")]
    Io(#[from] std::io::Error),
}

impl From<object_store::Error> for StoreError {
    fn from(e: object_store::Error) -> Self {
        StoreError::Backend(e)
    }
}

/// On a read, a missing object is `NotFound`; on a write the same backend
/// error means something else (a missing bucket) and keeps its own words.
fn read_error(key: &str) -> impl FnOnce(object_store::Error) -> StoreError + '_ {
    move |e| match e {
        object_store::Error::NotFound { .. } => StoreError::NotFound { key: key.to_owned() },
        e => StoreError::Backend(e),
    }
}

/// `text` with every `http://` or `https://` URL written `<url>`.
fn without_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = ["http://", "https://"]
        .iter()
        .filter_map(|scheme| rest.find(scheme))
        .min()
    {
        out.push_str(&rest[..at]);
        out.push_str("<url>");
        let end = rest[at..]
            .find(|c: char| c.is_whitespace() || "\"'<>()[]{},".contains(c))
            .map_or(rest.len(), |len| at + len);
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

impl StoreError {
    /// Whether another attempt may succeed. Missing objects, bad keys and
    /// refused credentials stay that way; timeouts, 5xx and dropped
    /// connections are hiccups.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Config(_) | StoreError::InvalidKey { .. } | StoreError::NotFound { .. } => false,
            StoreError::Backend(e) => !matches!(
                e,
                object_store::Error::NotFound { .. }
                    | object_store::Error::InvalidPath { .. }
                    | object_store::Error::NotSupported { .. }
                    | object_store::Error::NotImplemented { .. }
                    | object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }
                    | object_store::Error::UnknownConfigurationKey { .. }
            ),
            StoreError::Io(_) => true,
        }
    }
}

/// The key the artifact of `kind` written under one claim of a job's task is
/// stored under. Unique to the claim, so a worker that lost its lease and
/// writes late can never overwrite the bytes another attempt recorded; the
/// queue records which key is the job's artifact.
pub fn artifact_key(job_id: Uuid, kind: ArtifactKind, lease: Lease) -> String {
    let extension = match kind {
        ArtifactKind::Text => "md",
        ArtifactKind::Pdf => "pdf",
        ArtifactKind::Audio => "mp3",
    };
    format!(
        "{}{}-{}.{}.{extension}",
        queue::artifact_prefix(job_id),
        kind.as_str(),
        lease.task_id,
        lease.claim
    )
}

/// What [`ArtifactStore::put`] wrote: enough to record the artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredArtifact {
    pub key: String,
    pub content_type: String,
    pub bytes: u64,
    /// Lowercase hex SHA-256 of the content.
    pub sha256: String,
}

impl StoredArtifact {
    /// The queue record for this artifact.
    pub fn to_new_artifact(
        &self,
        job_id: Uuid,
        kind: ArtifactKind,
        metadata: serde_json::Value,
    ) -> NewArtifact {
        NewArtifact {
            job_id,
            kind,
            content_type: self.content_type.clone(),
            storage_key: self.key.clone(),
            bytes: i64::try_from(self.bytes).unwrap_or(i64::MAX),
            sha256: self.sha256.clone(),
            metadata,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ArtifactStore {
    inner: Arc<dyn ObjectStore>,
    /// The same store when it is a local folder, whose deletes need their
    /// folders flushed (S3 answers a DELETE once it is durable).
    local: Option<Arc<LocalFileSystem>>,
    /// The local backend refuses object attributes, so the content type is
    /// only sent where it can be kept (S3). The queue records it either way.
    keeps_content_type: bool,
    /// For logs: where the store is, without credentials.
    location: String,
}

impl ArtifactStore {
    /// The store `ARTIFACT_STORE` names, or the default folder.
    pub fn from_env() -> Result<Self> {
        Self::open(std::env::var(ARTIFACT_STORE_VAR).ok().as_deref())
    }

    /// The store a URL names; none (or blank) is the default folder.
    pub fn open(url: Option<&str>) -> Result<Self> {
        match url.map(str::trim) {
            Some(url) if !url.is_empty() => Self::from_url(url),
            _ => Self::local(&std::env::current_dir()?.join(DEFAULT_ARTIFACT_DIR)),
        }
    }

    /// A store from a `file://` or `s3://` URL.
    pub fn from_url(url: &str) -> Result<Self> {
        let parsed =
            url::Url::parse(url).map_err(|e| StoreError::Config(format!("{url:?} is not a URL: {e}")))?;
        match parsed.scheme() {
            "file" => {
                let dir = parsed
                    .to_file_path()
                    .map_err(|()| StoreError::Config(format!("{url:?} is not an absolute file path")))?;
                Self::local(&dir)
            }
            "s3" => {
                let bucket = parsed
                    .host_str()
                    .filter(|b| !b.is_empty())
                    .ok_or_else(|| StoreError::Config(format!("{url:?} names no bucket")))?;
                Self::s3(bucket, parsed.path().trim_matches('/'))
            }
            other => Err(StoreError::Config(format!(
                "scheme {other:?} is not supported (use file:// or s3://)"
            ))),
        }
    }

    /// A store in a local folder, created when missing.
    pub fn local(dir: &FsPath) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        // A put returns once the file and the folder entries naming it are
        // flushed, as S3 answers once the object is durable: the worker
        // records the artifact right after, and without the flush a crash
        // then left the record pointing at an empty file or none.
        let store = Arc::new(LocalFileSystem::new_with_prefix(dir)?.with_fsync(true));
        Ok(ArtifactStore {
            inner: store.clone(),
            local: Some(store),
            keeps_content_type: false,
            location: format!("file://{}", dir.display()),
        })
    }

    fn s3(bucket: &str, prefix: &str) -> Result<Self> {
        install_tls_provider();
        let s3 = AmazonS3Builder::from_env().with_bucket_name(bucket).build()?;
        let inner: Arc<dyn ObjectStore> = if prefix.is_empty() {
            Arc::new(s3)
        } else {
            Arc::new(PrefixStore::new(s3, prefix))
        };
        Ok(ArtifactStore {
            inner,
            local: None,
            keeps_content_type: true,
            location: format!("s3://{bucket}/{prefix}"),
        })
    }

    /// Where the store is, for logs (never holds credentials).
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Writes `content` under `key`, replacing what was there. Both backends
    /// replace atomically: a reader sees the old bytes or the new, never a mix.
    pub async fn put(&self, key: &str, content: Bytes, content_type: &str) -> Result<StoredArtifact> {
        let path = object_path(key)?;
        let stored = StoredArtifact {
            key: key.to_owned(),
            content_type: content_type.to_owned(),
            bytes: content.len() as u64,
            sha256: sha256_hex(&content),
        };
        let mut options = PutOptions::default();
        if self.keeps_content_type {
            let mut attributes = Attributes::new();
            attributes.insert(Attribute::ContentType, content_type.to_owned().into());
            options.attributes = attributes;
        }
        self.inner
            .put_opts(&path, PutPayload::from_bytes(content), options)
            .await?;
        Ok(stored)
    }

    pub async fn get(&self, key: &str) -> Result<Bytes> {
        let object = self
            .inner
            .get(&object_path(key)?)
            .await
            .map_err(read_error(key))?;
        object.bytes().await.map_err(read_error(key))
    }

    /// The bytes in `range` (end exclusive), for HTTP Range requests.
    pub async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        self.inner
            .get_range(&object_path(key)?, range)
            .await
            .map_err(read_error(key))
    }

    /// The bytes in `range` as a stream, so a large object (audio) can be
    /// sent over HTTP without holding it in memory.
    pub async fn stream_range(
        &self,
        key: &str,
        range: Range<u64>,
    ) -> Result<BoxStream<'static, Result<Bytes>>> {
        let options = GetOptions::default().with_range(Some(range));
        let result = self
            .inner
            .get_opts(&object_path(key)?, options)
            .await
            .map_err(read_error(key))?;
        Ok(result
            .into_stream()
            .map(|chunk| chunk.map_err(StoreError::from))
            .boxed())
    }

    /// The object's size in bytes.
    pub async fn size(&self, key: &str) -> Result<u64> {
        Ok(self
            .inner
            .head(&object_path(key)?)
            .await
            .map_err(read_error(key))?
            .size)
    }

    /// Remove the object, or with a key ending in `/` every object under
    /// that prefix; removing what is already gone succeeds, so retention
    /// can be re-run after a crash.
    ///
    /// Like a put, a delete returns once it is durable: on a local store the
    /// folders that named the files are flushed, or a crash could bring a
    /// file back after retention forgot it, never to be deleted again.
    pub async fn delete(&self, key: &str) -> Result<()> {
        let keys = if key.ends_with('/') {
            self.list(key).try_collect().await?
        } else {
            vec![key.to_owned()]
        };
        self.delete_objects(&keys).await
    }

    /// The keys of the objects under `folder` (a key ending in `/`), in no
    /// particular order. A folder that is not there lists nothing.
    pub fn list(&self, folder: &str) -> BoxStream<'_, Result<String>> {
        let prefix = folder
            .strip_suffix('/')
            .ok_or_else(|| StoreError::InvalidKey {
                key: folder.to_owned(),
                reason: "a folder ends in `/`".into(),
            })
            .and_then(object_path);
        let prefix = match prefix {
            Ok(prefix) => prefix,
            Err(e) => return futures::stream::once(futures::future::ready(Err(e))).boxed(),
        };
        self.inner
            .list(Some(&prefix))
            .filter_map(|object| async move {
                match object {
                    Ok(object) => Some(Ok(object.location.to_string())),
                    Err(object_store::Error::NotFound { .. }) => None,
                    Err(e) => Some(Err(e.into())),
                }
            })
            .boxed()
    }

    /// Remove these objects, a few at a time, as [`ArtifactStore::delete`]
    /// removes one: gone already is fine, and on a local store the folders
    /// that named them are flushed (each once) before this returns.
    pub async fn delete_objects(&self, keys: &[String]) -> Result<()> {
        let paths = keys
            .iter()
            .map(|key| object_path(key))
            .collect::<Result<Vec<_>>>()?;
        let deleted: Vec<Result<()>> = futures::stream::iter(paths.iter().cloned())
            .map(|path| async move { self.delete_object(&path).await })
            .buffer_unordered(DELETE_CONCURRENCY)
            .collect()
            .await;
        deleted.into_iter().collect::<Result<()>>()?;
        self.flush_folders_of(&paths).await
    }

    /// On a local store, flush the folders that held `paths`, each once.
    async fn flush_folders_of(&self, paths: &[Path]) -> Result<()> {
        let Some(local) = &self.local else {
            return Ok(());
        };
        let mut folders = BTreeSet::new();
        for path in paths {
            if let Some(folder) = local.path_to_filesystem(path)?.parent() {
                folders.insert(folder.to_path_buf());
            }
        }
        if folders.is_empty() {
            return Ok(());
        }
        tokio::task::spawn_blocking(move || flush_folders(folders))
            .await
            .map_err(std::io::Error::other)??;
        Ok(())
    }

    async fn delete_object(&self, path: &Path) -> Result<()> {
        match self.inner.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

fn flush_folders(folders: BTreeSet<PathBuf>) -> std::io::Result<()> {
    for folder in folders {
        match std::fs::File::open(&folder) {
            Ok(handle) => handle.sync_all()?,
            // Gone with what it held: nothing left to flush there.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Keys are relative paths of plain segments; `..`, empty segments and the
/// like are refused rather than normalised, so a key means one object only.
fn object_path(key: &str) -> Result<Path> {
    if key.is_empty() || key.starts_with('/') {
        return Err(StoreError::InvalidKey {
            key: key.to_owned(),
            reason: "must be a non-empty relative path".into(),
        });
    }
    Path::parse(key).map_err(|e| StoreError::InvalidKey {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

/// Lowercase hex SHA-256, as artifacts are recorded.
pub fn sha256_hex(content: &[u8]) -> String {
    format!("{:x}", Sha256::digest(content))
}

/// rustls needs one process-wide crypto provider; ring, as everywhere in backlog.
pub fn install_tls_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // Err means another part of the process installed one first: fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_error_names_no_url() {
        let failed = StoreError::Backend(object_store::Error::Generic {
            store: "S3",
            source: "Error performing PUT https://media.s3.eu-west-1.amazonaws.com/jobs/x/audio.mp3 in 1.2s \
                     - Server returned non-success status code 503 (\"http://10.0.0.7:9000/media\")"
                .into(),
        });
        let shown = failed.to_string();
        assert!(
            !shown.contains("amazonaws") && !shown.contains("10.0.0.7"),
            "{shown}"
        );
        assert!(
            shown.contains("PUT <url> in 1.2s") && shown.contains("503"),
            "{shown}"
        );
    }

    #[test]
    fn keys_are_unique_per_claim() {
        let job: Uuid = "019af0a0-0000-7000-8000-000000000000".parse().unwrap();
        let first = Lease {
            task_id: 7,
            job_id: job,
            claim: 1,
        };
        let second = Lease {
            task_id: 7,
            job_id: job,
            claim: 2,
        };
        assert_eq!(
            artifact_key(job, ArtifactKind::Pdf, first),
            "jobs/20251205/019af0a0-0000-7000-8000-000000000000/pdf-7.1.pdf",
            "in the folder of the job's day"
        );
        assert_ne!(
            artifact_key(job, ArtifactKind::Audio, first),
            artifact_key(job, ArtifactKind::Audio, second)
        );
        assert!(artifact_key(job, ArtifactKind::Text, first).ends_with(".md"));
    }

    #[test]
    fn urls_pick_the_backend() {
        for bad in ["ftp://x/y", "s3:///prefix", "not a url"] {
            assert!(
                matches!(ArtifactStore::from_url(bad), Err(StoreError::Config(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn keys_must_be_plain_relative_paths() {
        for bad in ["", "../etc/passwd", "a/../../b", "/etc/passwd", "./a", "a//b"] {
            assert!(
                matches!(object_path(bad), Err(StoreError::InvalidKey { .. })),
                "{bad:?} was accepted"
            );
        }
        assert!(object_path("jobs/a/text.md").is_ok());
    }

    #[test]
    fn sha256_is_lowercase_hex() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
