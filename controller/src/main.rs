//! `controller`: scales backlog's worker pools from the depth of their queue.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use controller::{manifest, spec};

#[derive(Parser)]
#[command(
    name = "controller",
    version,
    about = "Scales backlog's worker pools from the depth of their queue"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the WorkerPool CustomResourceDefinition as YAML.
    Crd,
    /// Check WorkerPool manifests: print each pool that loads and every
    /// problem; exit 1 on any problem.
    Validate {
        /// A YAML file, or a folder of them.
        #[arg(short = 'f', long = "filename", value_name = "FILE_OR_DIR")]
        path: PathBuf,
    },
}

fn main() -> anyhow::Result<ExitCode> {
    match Cli::parse().command {
        Command::Crd => {
            print!("{}", spec::crd_yaml()?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { path } => Ok(validate(&path)),
    }
}

fn validate(path: &Path) -> ExitCode {
    let manifests = manifest::load(path);
    for loaded in &manifests.pools {
        let spec = &loaded.pool.spec;
        let task_types: Vec<&str> = spec.task_types.iter().map(|t| t.as_str()).collect();
        println!(
            "ok: {}: WorkerPool {} ({}; {}; {}..{} replicas)",
            loaded.location.file.display(),
            loaded.name(),
            spec.target.backend(),
            task_types.join(", "),
            spec.min_replicas,
            spec.max_replicas,
        );
    }
    for error in &manifests.errors {
        println!("error: {error}");
    }
    println!(
        "{} pool(s) valid, {} problem(s)",
        manifests.pools.len(),
        manifests.errors.len()
    );
    if manifests.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
