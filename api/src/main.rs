#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli: api::config::Cli = telemetry::secrets::parse(api::config::SECRETS);
    telemetry::init_tracing(cli.log_format);
    api::commands::run(cli).await
}
