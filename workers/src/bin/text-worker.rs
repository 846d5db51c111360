//! `text-worker`: a backlog worker for `TextGeneration` tasks (override with --task-types).
fn main() -> anyhow::Result<()> {
    workers::cli::main(&[queue::TaskType::TextGeneration])
}
