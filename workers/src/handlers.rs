//! What each task type does, from claimed task to stored artifact: the glue
//! between the runtime, the pipelines and the artifact store.

use bytes::Bytes;
use queue::{ArtifactKind, Failure, Job, JobType, QueueError, TaskType};
use serde_json::json;

use crate::pipelines::audio::Narrator;
use crate::pipelines::document::Document;
use crate::pipelines::text::{LlmProvider, PromptKind, TextRequest};
use crate::pipelines::{self, pdf, JobInput};
use crate::runtime::{TaskContext, TaskHandler, TaskOutput};
use store::{artifact_key, ArtifactStore};

pub const MARKDOWN_CONTENT_TYPE: &str = "text/markdown; charset=utf-8";
pub const PDF_CONTENT_TYPE: &str = "application/pdf";

/// The three pipelines behind one handler; a replica may run any subset of
/// task types with it.
pub struct Pipelines {
    pub llm: LlmProvider,
    pub narrator: Narrator,
    pub store: ArtifactStore,
}

impl Pipelines {
    /// Providers and store from the environment (`LLM_PROVIDER`,
    /// `TTS_PROVIDER`, `ARTIFACT_STORE`, …).
    pub fn from_env() -> crate::Result<Self> {
        Ok(Pipelines {
            llm: LlmProvider::from_env()?,
            narrator: Narrator::from_env()?,
            store: ArtifactStore::from_env()?,
        })
    }
}

impl TaskHandler for Pipelines {
    async fn run(&self, ctx: TaskContext) -> Result<TaskOutput, Failure> {
        let job = ctx
            .queue
            .job_by_id(ctx.task.job_id)
            .await
            .map_err(storage_failure)?;
        let input = pipelines::job_input(&job)?;
        match ctx.task.task_type {
            TaskType::TextGeneration => self.write_text(&ctx, &job, &input).await,
            TaskType::PdfGeneration => self.typeset(&ctx, &job, &input).await,
            TaskType::AudioGeneration => self.narrate(&ctx, &job, &input).await,
        }
    }
}

impl Pipelines {
    async fn write_text(
        &self,
        ctx: &TaskContext,
        job: &Job,
        input: &JobInput,
    ) -> Result<TaskOutput, Failure> {
        let request = TextRequest::from_input(PromptKind::for_job(job.job_type), input)?;
        let generated = self.llm.generate(&request).await?;
        let words = generated.markdown.split_whitespace().count();
        let stored = self
            .save(
                ctx,
                job,
                ArtifactKind::Text,
                generated.markdown.into_bytes(),
                MARKDOWN_CONTENT_TYPE,
                json!({
                    "provider": generated.provider, "model": generated.model, "words": words,
                }),
            )
            .await?;
        Ok(json!({
            "artifact": stored,
            "provider": generated.provider,
            "model": generated.model,
            "usage": generated.usage,
            "words": words,
        }))
    }

    async fn typeset(&self, ctx: &TaskContext, job: &Job, input: &JobInput) -> Result<TaskOutput, Failure> {
        let document = self.source_document(ctx, job, input).await?;
        let pdf = pdf::typeset(document, input.lang().map(str::to_owned)).await?;
        // A character no installed font has still leaves a usable PDF, so the
        // task completes; the metadata and the log say which ones are boxes.
        let uncovered = pdf.uncovered_code_points();
        let mut metadata = json!({ "pages": pdf.pages });
        if !uncovered.is_empty() {
            tracing::warn!(
                job = %job.id,
                characters = pdf.uncovered.len(),
                first = ?uncovered,
                "no installed font has some of the text's characters; they print as empty boxes"
            );
            metadata["uncovered_characters"] = json!(uncovered);
        }
        let stored = self
            .save(ctx, job, ArtifactKind::Pdf, pdf.bytes, PDF_CONTENT_TYPE, metadata)
            .await?;
        Ok(json!({ "artifact": stored, "pages": pdf.pages }))
    }

    async fn narrate(&self, ctx: &TaskContext, job: &Job, input: &JobInput) -> Result<TaskOutput, Failure> {
        let document = self.source_document(ctx, job, input).await?;
        let voice = self.narrator.voice_for(input.voice(), input.lang()).await;
        let narration = self.narrator.narrate(&document, voice.as_deref()).await?;
        let metadata = json!({
            "duration_seconds": narration.duration_seconds,
            "sample_rate": narration.sample_rate,
            "chunks": narration.chunks,
            "provider": self.narrator.provider().name(),
        });
        let stored = self
            .save(
                ctx,
                job,
                ArtifactKind::Audio,
                narration.bytes,
                narration.content_type,
                metadata,
            )
            .await?;
        Ok(json!({ "artifact": stored, "duration_seconds": narration.duration_seconds }))
    }

    /// The text a pdf or audio task works from: the job's own `text`, or
    /// the Markdown its completed text task recorded (a `reading` job),
    /// checked against the recorded digest.
    async fn source_document(
        &self,
        ctx: &TaskContext,
        job: &Job,
        input: &JobInput,
    ) -> Result<Document, Failure> {
        let markdown = match job.job_type {
            JobType::Reading => {
                let text = ctx
                    .queue
                    .completed_artifact(job.id, ArtifactKind::Text)
                    .await
                    .map_err(storage_failure)?
                    .ok_or_else(|| Failure::retryable("the job's text task has recorded no text yet"))?;
                let bytes = self
                    .store
                    .get(&text.storage_key)
                    .await
                    .map_err(crate::Error::from)?;
                let digest = store::sha256_hex(&bytes);
                if digest != text.sha256 {
                    return Err(Failure::retryable(format!(
                        "text artifact {} does not match its recorded sha256",
                        text.storage_key
                    )));
                }
                String::from_utf8(bytes.to_vec()).map_err(|_| {
                    Failure::permanent(format!("text artifact {} is not UTF-8", text.storage_key))
                })?
            }
            _ => input
                .text()
                .map(str::to_owned)
                .ok_or_else(|| Failure::permanent("job input has no `text`"))?,
        };
        Ok(Document::parse(&markdown, input.title()))
    }

    /// Store the bytes under a key unique to this claim, then record the
    /// artifact under the task's lease. Bytes whose record was refused (the
    /// lease was lost meanwhile) are removed again.
    async fn save(
        &self,
        ctx: &TaskContext,
        job: &Job,
        kind: ArtifactKind,
        content: Vec<u8>,
        content_type: &str,
        metadata: serde_json::Value,
    ) -> Result<serde_json::Value, Failure> {
        let key = artifact_key(job.id, kind, ctx.lease());
        let stored = self
            .store
            .put(&key, Bytes::from(content), content_type)
            .await
            .map_err(crate::Error::from)?;
        let recorded = ctx
            .queue
            .record_artifact(
                &ctx.worker_id,
                ctx.lease(),
                &stored.to_new_artifact(job.id, kind, metadata),
            )
            .await;
        let artifact = match recorded {
            Ok(artifact) => artifact,
            Err(e) => {
                if matches!(e, QueueError::LeaseLost { .. }) {
                    if let Err(delete) = self.store.delete(&key).await {
                        tracing::warn!(key, error = %delete, "could not remove the bytes of a lost lease");
                    }
                }
                return Err(storage_failure(e));
            }
        };
        Ok(
            json!({ "id": artifact.id, "key": artifact.storage_key, "bytes": artifact.bytes, "sha256": artifact.sha256 }),
        )
    }
}

/// A queue error while running a task: a lost lease ends the attempt for
/// good; anything else is a database hiccup worth retrying.
fn storage_failure(e: QueueError) -> Failure {
    match e {
        QueueError::LeaseLost { .. } => Failure::permanent(e.to_string()),
        e => Failure::retryable(e.to_string()),
    }
}
