//! The artifact store on a real folder, through a `file://` URL.

use bytes::Bytes;
use futures::TryStreamExt;
use queue::{ArtifactKind, Lease};
use store::{artifact_key, ArtifactStore};
use uuid::Uuid;

#[tokio::test]
async fn put_get_range_and_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let store =
        ArtifactStore::from_url(&format!("file://{}/nested/artifacts", dir.path().display())).unwrap();
    let key = artifact_key(
        Uuid::now_v7(),
        ArtifactKind::Text,
        Lease {
            task_id: 1,
            job_id: Uuid::nil(),
            claim: 1,
        },
    );

    let stored = store
        .put(&key, Bytes::from_static(b"hello, world"), "text/markdown")
        .await
        .unwrap();
    assert_eq!(stored.bytes, 12);
    assert_eq!(
        stored.sha256,
        "09ca7e4eaa6e8ae9c7d261167129184883644d07dfba7cbfbc4c8a2e08360d5b"
    );
    assert_eq!(stored.content_type, "text/markdown");
    assert!(
        dir.path().join("nested/artifacts").join(&key).is_file(),
        "stored under the folder"
    );

    assert_eq!(store.get(&key).await.unwrap(), "hello, world");
    assert_eq!(store.get_range(&key, 7..12).await.unwrap(), "world");
    assert_eq!(store.size(&key).await.unwrap(), 12);
    let streamed: Vec<Bytes> = store
        .stream_range(&key, 0..5)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(streamed.concat(), b"hello");

    // A re-run writes the same key: the object is replaced, not duplicated.
    let again = store
        .put(&key, Bytes::from_static(b"second run"), "text/markdown")
        .await
        .unwrap();
    assert_eq!(store.get(&key).await.unwrap(), "second run");
    assert_ne!(again.sha256, stored.sha256);
    let job_dir = dir
        .path()
        .join("nested/artifacts")
        .join(key.rsplit_once('/').unwrap().0);
    assert_eq!(std::fs::read_dir(job_dir).unwrap().count(), 1);

    let record = again.to_new_artifact(Uuid::nil(), ArtifactKind::Text, serde_json::json!({}));
    assert_eq!((record.bytes, record.storage_key.as_str()), (10, key.as_str()));
}

#[tokio::test]
async fn a_folder_lists_the_keys_under_it_at_any_depth() {
    let dir = tempfile::tempdir().unwrap();
    let store = ArtifactStore::local(dir.path()).unwrap();
    let job = Uuid::now_v7();
    let lease = Lease {
        task_id: 1,
        job_id: Uuid::nil(),
        claim: 1,
    };
    let mut keys = vec![
        artifact_key(job, ArtifactKind::Text, lease),
        artifact_key(job, ArtifactKind::Pdf, lease),
    ];
    for key in &keys {
        store
            .put(key, Bytes::from_static(b"x"), "text/plain")
            .await
            .unwrap();
    }
    let prefix = queue::artifact_prefix(job);
    let day = prefix.strip_suffix(&format!("{job}/")).unwrap();
    let mut listed: Vec<String> = store.list(day).try_collect().await.unwrap();
    listed.sort();
    keys.sort();
    assert_eq!(listed, keys, "under {day}");
    let none: Vec<String> = store.list("jobs/19700101/").try_collect().await.unwrap();
    assert!(none.is_empty(), "a folder that is not there lists nothing");
    let error = store.list("jobs").try_collect::<Vec<String>>().await.unwrap_err();
    assert!(error.to_string().contains("ends in `/`"), "{error}");
}

#[tokio::test]
async fn missing_objects_and_bad_keys_are_permanent() {
    let dir = tempfile::tempdir().unwrap();
    let store = ArtifactStore::local(dir.path()).unwrap();

    let missing = store.get("jobs/none/text.md").await.unwrap_err();
    assert!(!missing.is_retryable(), "{missing}");
    for bad in ["../escape", "jobs//x", "jobs/./x"] {
        let error = store.put(bad, Bytes::new(), "text/plain").await.unwrap_err();
        assert!(!error.is_retryable(), "{bad}: {error}");
    }
}

#[tokio::test]
async fn delete_removes_the_object_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let store = ArtifactStore::local(dir.path()).unwrap();
    let key = artifact_key(
        Uuid::now_v7(),
        ArtifactKind::Audio,
        Lease {
            task_id: 1,
            job_id: Uuid::nil(),
            claim: 1,
        },
    );
    store
        .put(&key, Bytes::from_static(b"mp3"), "audio/mpeg")
        .await
        .unwrap();
    store.delete(&key).await.unwrap();
    assert!(!dir.path().join(&key).exists(), "the file is gone");
    store.delete(&key).await.expect("deleting twice succeeds");
}

/// The folder the halves of the tests below that run under strace use.
const TRACED_DIR_VAR: &str = "BACKLOG_STORE_TEST_DIR";

/// Run the ignored test `name` of this binary again under strace, on the
/// store folder `root`, and return the calls traced (`-y`: each file
/// descriptor shown with its path), one a line.
fn traced_calls(name: &str, root: &std::path::Path, calls: &str) -> Vec<String> {
    let trace = root.with_extension("strace");
    let status = std::process::Command::new("strace")
        .args(["-f", "-qq", "-y", "-e", &format!("trace={calls}"), "-o"])
        .arg(&trace)
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", name, "--ignored", "--nocapture"])
        .env(TRACED_DIR_VAR, root)
        .status()
        .expect("strace runs (scripts/ensure-tools.sh test installs it)");
    assert!(status.success(), "the traced half failed: {status}");
    std::fs::read_to_string(&trace)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The store folder of a traced half and a store on it; `None` when run by
/// hand, with nothing to trace.
fn traced_store() -> Option<(std::path::PathBuf, ArtifactStore)> {
    let root = std::path::PathBuf::from(std::env::var_os(TRACED_DIR_VAR)?);
    let store = ArtifactStore::from_url(&format!("file://{}", root.display())).unwrap();
    Some((root, store))
}

/// A put returns only once its bytes and the folder entries that name them
/// are on disk, not just in the page cache: object_store's local backend
/// flushes neither unless asked, and a crash after the worker recorded the
/// artifact then left the record pointing at an empty file or none. Seen
/// from outside: the half below runs again under strace, which lists the
/// file and folders flushed.
#[test]
fn a_put_returns_only_once_the_file_and_its_folders_are_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("artifacts");
    let trace = traced_calls("put_for_the_strace_test", &root, "fsync,fdatasync");
    let flushed: Vec<&str> = trace
        .iter()
        .filter_map(|line| line.split_once('<')?.1.split_once('>').map(|(path, _)| path))
        .collect();
    // The key is jobs/{day}/{job}/{file}; every folder is new with the job.
    let key = std::fs::read_to_string(root.join("KEY")).unwrap();
    let file = root.join(&key);
    assert_eq!(key.split('/').count(), 4, "{key}");
    assert!(
        flushed.iter().any(|p| p.starts_with(file.to_str().unwrap())),
        "the file's bytes (written under a staging name): {flushed:?}"
    );
    // The job's folder (naming the file), the day's, `jobs`, the root.
    for folder in file.ancestors().skip(1).take(4) {
        assert!(
            flushed.contains(&folder.to_str().unwrap()),
            "the entry in {}: {flushed:?}",
            folder.display()
        );
    }
}

/// The half that runs under strace; skipped on its own.
#[tokio::test]
#[ignore = "run under strace by a_put_returns_only_once_the_file_and_its_folders_are_on_disk"]
async fn put_for_the_strace_test() {
    let Some((root, store)) = traced_store() else {
        return;
    };
    let key = artifact_key(
        Uuid::now_v7(),
        ArtifactKind::Text,
        Lease {
            task_id: 1,
            job_id: Uuid::nil(),
            claim: 1,
        },
    );
    std::fs::write(root.join("KEY"), &key).unwrap();
    store
        .put(&key, Bytes::from_static(b"bytes"), "text/markdown")
        .await
        .unwrap();
}

/// A delete returns only once the folder that named the file is flushed:
/// otherwise a crash right after retention deleted a job's artifacts (and
/// forgot them) could bring the files back, where nothing would delete
/// them again. Every way of deleting: one key, a job's prefix, and a list of
/// keys (the cleaner's, for a retired day's folder).
#[test]
fn a_delete_returns_only_once_the_folder_that_named_the_file_is_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("artifacts");
    let trace = traced_calls("delete_for_the_strace_test", &root, "fsync,unlink,unlinkat");
    let keys = std::fs::read_to_string(root.join("KEYS")).unwrap();
    let keys: Vec<&str> = keys.lines().collect();
    assert_eq!(keys.len(), 4, "{keys:?}");
    for key in keys {
        let file = root.join(key);
        let folder = format!("<{}>", file.parent().unwrap().display());
        let unlinked = trace
            .iter()
            .position(|line| {
                line.starts_with(|c: char| c.is_ascii_digit())
                    && line.contains("unlink")
                    && line.contains(key)
            })
            .unwrap_or_else(|| panic!("{key} was never unlinked: {trace:#?}"));
        assert!(
            trace[unlinked..]
                .iter()
                .any(|line| line.contains("fsync(") && line.contains(&folder)),
            "{} not flushed after {key} was deleted: {trace:#?}",
            file.parent().unwrap().display()
        );
    }
}

/// The half that runs under strace; skipped on its own.
#[tokio::test]
#[ignore = "run under strace by a_delete_returns_only_once_the_folder_that_named_the_file_is_on_disk"]
async fn delete_for_the_strace_test() {
    let Some((root, store)) = traced_store() else {
        return;
    };
    let (one, other, third) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let lease = Lease {
        task_id: 1,
        job_id: Uuid::nil(),
        claim: 1,
    };
    let keys = [
        artifact_key(one, ArtifactKind::Text, lease),
        artifact_key(other, ArtifactKind::Text, lease),
        artifact_key(other, ArtifactKind::Pdf, lease),
        artifact_key(third, ArtifactKind::Audio, lease),
    ];
    for key in &keys {
        store
            .put(key, Bytes::from_static(b"bytes"), "text/plain")
            .await
            .unwrap();
    }
    std::fs::write(root.join("KEYS"), keys.join("\n")).unwrap();
    store.delete(&keys[0]).await.unwrap();
    store.delete(&queue::artifact_prefix(other)).await.unwrap();
    store.delete_objects(&keys[3..]).await.unwrap();
}
