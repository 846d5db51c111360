//! `pdf-worker`: a backlog worker for `PdfGeneration` tasks (override with --task-types).
fn main() -> anyhow::Result<()> {
    workers::cli::main(&[queue::TaskType::PdfGeneration])
}
