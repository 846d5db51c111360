//! `worker`: a backlog worker for the task types given with --task-types
//! (one supervised process for several types, as Fly's `worker` group runs).
fn main() -> anyhow::Result<()> {
    workers::cli::main(&[])
}
