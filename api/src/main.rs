use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = api::config::Cli::parse();
    telemetry::init_tracing(cli.log_format);
    api::commands::run(cli).await
}
