//! The route table: every route is registered here, through utoipa-axum,
//! so the router and the OpenAPI document come from the same list.

pub mod artifacts;
pub mod events;
pub mod jobs;
pub mod operations;

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::state::AppState;

/// Routes that need an API key (`/v1`).
pub fn authenticated() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(jobs::create_job))
        .routes(routes!(jobs::list_jobs))
        .routes(routes!(jobs::create_jobs_batch))
        .routes(routes!(jobs::get_job))
        .routes(routes!(jobs::cancel_job))
        .routes(routes!(jobs::retry_job))
        .routes(routes!(events::job_events))
        .routes(routes!(artifacts::list_artifacts))
        .routes(routes!(artifacts::download_artifact))
        .routes(routes!(operations::queue_depth))
        .routes(routes!(operations::queue_history))
        .routes(routes!(operations::pools))
}

/// Routes open to anyone: probes and the API description. Metrics are not
/// here: they are served on `METRICS_ADDR` only.
pub fn public() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(operations::healthz))
        .routes(routes!(operations::readyz))
        .routes(routes!(operations::openapi_json))
}
