//! `audio-worker`: a backlog worker for `AudioGeneration` tasks (override with --task-types).
fn main() -> anyhow::Result<()> {
    workers::cli::main(&[queue::TaskType::AudioGeneration])
}
