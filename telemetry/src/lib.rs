//! Logging and metrics set-up shared by backlog's binaries, so the api, the
//! workers and the controller log the same shape and serve `/metrics` alike;
//! [`secrets`] keeps their secrets off the command line.

pub mod secrets;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object a line, with the current span's fields (request ids).
    Json,
    /// Human-readable lines, for a terminal.
    Text,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "json" => Ok(LogFormat::Json),
            "text" => Ok(LogFormat::Text),
            other => Err(format!("log format must be json or text, got {other:?}")),
        }
    }
}

/// Install the global subscriber: `RUST_LOG` filters (default `info`), lines
/// go to stderr so stdout stays free for a command's output.
pub fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

/// The OpenMetrics content type Prometheus negotiates for.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serve `GET /metrics` on `addr` in the background, answering with what
/// `render` returns at each scrape. Returns the bound address (useful with
/// port 0) once the socket listens, so a bad address fails at start-up.
pub async fn serve_metrics(
    addr: SocketAddr,
    render: impl Fn() -> String + Send + Sync + 'static,
) -> anyhow::Result<SocketAddr> {
    let render = Arc::new(render);
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
                    render(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics address {addr}"))?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "serving /metrics");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(bound)
}
