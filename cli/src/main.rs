//! `backlog`: parse the command line, run it, exit with a code scripts can
//! test (see `backlog --help`).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("backlog: could not start: {e}");
            return ExitCode::from(cli::exit::API);
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::from(cli::exit::OK),
        Err(e) => {
            // An error quotes what the API sent (a job's error included):
            // its lines are kept, its other control characters written out.
            let message = e.to_string();
            let lines: Vec<_> = message.lines().map(cli::printable).collect();
            eprintln!("backlog: {}", lines.join("\n"));
            ExitCode::from(e.exit_code())
        }
    }
}
