//! End to end through the queue: a `reading` job with the offline text
//! provider and espeak-ng ends with a text, a PDF and an audio artifact, all
//! readable.

use std::time::Duration;

use queue::{ArtifactKind, Job, JobStatus, JobType, NewJob, Queue, TaskType};
use serde_json::json;
use sqlx::PgPool;
use store::ArtifactStore;
use tokio_util::sync::CancellationToken;
use workers::handlers::Pipelines;
use workers::pipelines::audio::Narrator;
use workers::pipelines::text::LlmProvider;
use workers::runtime::{self, RuntimeConfig};

/// The offline text provider, espeak-ng, and artifacts in `dir`.
fn offline_pipelines(dir: &std::path::Path) -> Pipelines {
    let env = |name: &str| match name {
        "LLM_PROVIDER" => Some("offline".to_string()),
        "TTS_PROVIDER" => Some("espeak".to_string()),
        _ => None,
    };
    Pipelines {
        llm: LlmProvider::from_lookup(env).unwrap(),
        narrator: Narrator::from_lookup(env).unwrap(),
        store: ArtifactStore::local(dir).unwrap(),
    }
}

/// Runs a worker for every task type until acme's `job` has finished (at
/// most a minute), and returns how it finished.
async fn run_until_finished(q: &Queue, job: &Job, pipelines: Pipelines) -> JobStatus {
    let shutdown = CancellationToken::new();
    let config = RuntimeConfig {
        worker_id: "e2e".into(),
        pool: None,
        task_types: TaskType::ALL.to_vec(),
        concurrency: 2,
        heartbeat_interval: Duration::from_secs(1),
        poll_interval: Duration::from_millis(500),
        shutdown_grace: Duration::from_secs(5),
        metrics: Default::default(),
    };
    let worker = tokio::spawn(runtime::run(q.clone(), config, pipelines, shutdown.clone()));
    let mut status = JobStatus::Queued;
    for _ in 0..600 {
        status = q.job("acme", job.id).await.unwrap().status;
        if status.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();
    worker.await.unwrap().unwrap();
    status
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_reading_job_ends_with_text_pdf_and_audio(pool: PgPool) {
    let q = Queue::new(pool);
    let dir = tempfile::tempdir().unwrap();
    let job = q
        .enqueue(NewJob::new(
            "acme",
            JobType::Reading,
            json!({"prompt": "the life of tides", "title": "Tides"}),
        ))
        .await
        .unwrap()
        .job;

    let status = run_until_finished(&q, &job, offline_pipelines(dir.path())).await;
    assert_eq!(
        status,
        JobStatus::Complete,
        "tasks: {:?}",
        q.tasks_of(job.id).await.unwrap()
    );

    let artifacts = q.artifacts_of(job.id).await.unwrap();
    let kinds: Vec<ArtifactKind> = artifacts.iter().map(|a| a.kind).collect();
    assert_eq!(
        kinds,
        [ArtifactKind::Audio, ArtifactKind::Pdf, ArtifactKind::Text]
    );
    for artifact in &artifacts {
        let bytes = std::fs::read(dir.path().join(&artifact.storage_key)).unwrap();
        assert_eq!(
            bytes.len() as i64,
            artifact.bytes,
            "{:?} size recorded",
            artifact.kind
        );
        match artifact.kind {
            ArtifactKind::Text => {
                let text = String::from_utf8(bytes).unwrap();
                assert!(
                    text.contains("Tides") && text.to_lowercase().contains("offline"),
                    "{text}"
                );
            }
            ArtifactKind::Pdf => {
                assert!(bytes.starts_with(b"%PDF-"));
                let out = std::process::Command::new("pdftotext")
                    .arg(dir.path().join(&artifact.storage_key))
                    .arg("-")
                    .output()
                    .unwrap();
                assert!(String::from_utf8_lossy(&out.stdout).contains("Tides"));
                assert!(
                    artifact.metadata.get("uncovered_characters").is_none(),
                    "{}",
                    artifact.metadata
                );
            }
            ArtifactKind::Audio => {
                assert_eq!(artifact.content_type, "audio/mpeg");
                let seconds = artifact.metadata["duration_seconds"].as_f64().unwrap();
                assert!(seconds > 5.0, "spoken text lasts {seconds} s");
            }
        }
    }
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_pdf_with_characters_no_font_has_completes_and_names_them(pool: PgPool) {
    let q = Queue::new(pool);
    let dir = tempfile::tempdir().unwrap();
    // U+10FFFD is a private-use code point no font defines.
    let job = q
        .enqueue(NewJob::new(
            "acme",
            JobType::Pdf,
            json!({"text": "# Marks\n\nA mark \u{10FFFD} no font has.", "title": "Marks"}),
        ))
        .await
        .unwrap()
        .job;

    let status = run_until_finished(&q, &job, offline_pipelines(dir.path())).await;
    assert_eq!(status, JobStatus::Complete);
    let artifacts = q.artifacts_of(job.id).await.unwrap();
    assert_eq!(artifacts.len(), 1);
    assert_eq!(artifacts[0].kind, ArtifactKind::Pdf);
    assert_eq!(artifacts[0].metadata["uncovered_characters"], json!(["U+10FFFD"]));
    assert_eq!(artifacts[0].metadata["pages"], json!(1));
}
