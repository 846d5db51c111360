//! The HTTP server: the router with its layers (the console's `/ui` among
//! its routes), and the background tasks
//! that live as long as it does.

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::extract::Request as AxumRequest;
use axum::http::{header, HeaderName, HeaderValue, Method, Request, Uri};
use axum::middleware::{from_fn, from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router};
use queue::Queue;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;

use crate::auth::{require_api_key, AuthSettings, Authenticator};
use crate::depth_history::DepthHistory;
use crate::enqueuer::Enqueuer;
use crate::error::ApiError;
use crate::job_events::JobEvents;
use crate::metrics::{serve_metrics, track_requests, Metrics};
use crate::routes::operations::OpenApiJson;
use crate::state::{AppState, Settings};
use crate::streams::OpenStreams;
use crate::{openapi, routes, sweeper, ui};

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Serve on `listener` until `shutdown` is cancelled, then finish the
/// requests in flight and stop the background tasks. No metrics are served.
pub async fn run(
    listener: TcpListener,
    queue: Queue,
    artifacts: store::ArtifactStore,
    settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_with_metrics(listener, None, queue, artifacts, settings, shutdown).await
}

/// [`run`], with `/metrics` served on `metrics_listener` when given (and
/// only there: the API's port has none).
pub async fn run_with_metrics(
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    queue: Queue,
    artifacts: store::ArtifactStore,
    settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let metrics_server = match metrics_listener {
        Some(listener) => {
            tracing::info!(address = %listener.local_addr()?, "serving /metrics");
            Some(tokio::spawn(serve_metrics(
                listener,
                metrics.clone(),
                queue.clone(),
                shutdown.clone(),
            )))
        }
        None => None,
    };
    let job_events = JobEvents::start(queue.clone(), shutdown.clone()).await?;
    let sweeper = settings.sweeper.clone().map(|sweeper_settings| {
        tokio::spawn(sweeper::run(
            queue.clone(),
            artifacts.clone(),
            sweeper_settings,
            metrics.clone(),
            shutdown.clone(),
        ))
    });
    let depth_history = DepthHistory::new(settings.depth_history.unwrap_or_default());
    let sampler = settings.depth_history.map(|_| {
        tokio::spawn(
            depth_history
                .clone()
                .sample_until(queue.clone(), shutdown.clone()),
        )
    });
    let state = AppState {
        auth: Arc::new(Authenticator::new(
            queue.clone(),
            AuthSettings {
                ttl: settings.auth_cache_ttl,
                failure_ttl: settings.auth_failure_ttl,
                failed_lookups_per_second: settings.auth_failed_lookups_per_second,
            },
        )),
        open_streams: OpenStreams::new(settings.streams),
        depth_history,
        enqueuer: Enqueuer::start(queue.clone()),
        queue,
        settings: Arc::new(settings),
        job_events,
        artifacts,
        metrics,
        shutdown: shutdown.clone(),
    };
    tracing::info!(address = %listener.local_addr()?, "listening");
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    if let Some(sweeper) = sweeper {
        sweeper.await?;
    }
    if let Some(sampler) = sampler {
        sampler.await?;
    }
    if let Some(metrics_server) = metrics_server {
        metrics_server.await??;
    }
    tracing::info!("stopped");
    Ok(())
}

/// The whole application: routes, auth on `/v1`, fallbacks, and the
/// request id, tracing, metrics, body limit and panic layers.
pub fn app(state: AppState) -> Router {
    let (authenticated, authenticated_doc) = routes::authenticated().split_for_parts();
    let (public, public_doc) = routes::public().split_for_parts();
    let doc = openapi::assemble(authenticated_doc, public_doc);
    let doc = OpenApiJson(doc.to_json().expect("the OpenAPI document serializes").into());

    let http = ServiceBuilder::new()
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_response(DefaultOnResponse::new().level(Level::INFO)),
        )
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::internal(anyhow::anyhow!("handler panicked")).into_response()
        }));

    Router::new()
        .merge(authenticated.route_layer(from_fn_with_state(state.clone(), require_api_key)))
        .merge(public)
        .merge(ui::routes())
        .fallback(route_not_found)
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(from_fn(headers_by_area))
        .layer(Extension(doc))
        .layer(DefaultBodyLimit::max(state.settings.body_limit_bytes))
        .layer(from_fn_with_state(state.metrics.clone(), track_requests))
        .layer(http)
        .with_state(state)
}

/// An answer under `/v1` is its tenant's alone: no cache may keep it (a
/// proxy or CDN set to cache everything would hand prompts and artifacts
/// to whoever asks next), refusals included, those of paths and methods no
/// route serves too (a fallback answers them outside any route's layers,
/// so this wraps the whole router). A route that allows a private cache
/// (artifact downloads, revalidated by ETag) says so itself.
///
/// The console's answers under `/ui`, refusals included, carry its
/// security headers ([`ui::insert_security_headers`]).
async fn headers_by_area(request: AxumRequest, next: Next) -> Response {
    let path = request.uri().path();
    let under = |area: &str| path == area || path.starts_with(&format!("{area}/"));
    let (api, console) = (under("/v1"), under("/ui"));
    let mut response = next.run(request).await;
    if api {
        response
            .headers_mut()
            .entry(header::CACHE_CONTROL)
            .or_insert(HeaderValue::from_static("no-store"));
    }
    if console {
        ui::insert_security_headers(response.headers_mut());
    }
    response
}

/// Method, path and request id; never headers (they carry the API key)
/// nor the query.
fn request_span<B>(request: &Request<B>) -> tracing::Span {
    let request_id = request
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    tracing::info_span!(
        "request",
        method = %request.method(),
        path = request.uri().path(),
        request_id,
    )
}

async fn route_not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound(format!("route {method} {}", uri.path()))
}
