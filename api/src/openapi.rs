//! The OpenAPI document. Paths come from the route table
//! ([`crate::routes`]); this module adds what applies to whole groups of
//! routes (bearer auth and its 401 and 429 on `/v1`, the 500/503 any route can
//! answer) and the schemas of the queue's enums, listed from the queue's
//! own variant lists.

use queue::{ArtifactKind, JobStatus, JobType, TaskStatus, TaskType};
use utoipa::openapi::path::Operation;
use utoipa::openapi::schema::{Object, ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, ResponseBuilder};
use utoipa::OpenApi as _;

use crate::error::ErrorBody;
use crate::routes;

const BEARER: &str = "bearer";

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "backlog",
        description = "Jobs in, status and artifacts out. Errors are JSON \
            `{\"error\": {\"code\", \"message\", \"field\"?}}`: 400 for requests that cannot be read \
            (malformed JSON, query parameters, ids, cursors, headers), 422 for readable requests with \
            invalid content (wrong types, unknown or missing fields, unknown job type, oversized input)."
    ),
    tags(
        (name = "jobs", description = "Create and follow jobs"),
        (name = "operations", description = "Queue depth, probes, metrics"),
    ),
    components(schemas(ErrorBody))
)]
struct ApiDoc;

/// The whole document, from the route table alone (no server needed).
pub fn document() -> OpenApi {
    let (_, authenticated) = routes::authenticated().split_for_parts();
    let (_, public) = routes::public().split_for_parts();
    assemble(authenticated, public)
}

/// Combine the documents of the authenticated and the public routes.
pub fn assemble(authenticated: OpenApi, public: OpenApi) -> OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.components
        .get_or_insert_with(Default::default)
        .add_security_scheme(
            BEARER,
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    let mut authenticated = authenticated;
    for operation in operations(&mut authenticated) {
        operation.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
        add_error(operation, 401, "Missing, unknown or revoked API key");
        add_error(
            operation,
            429,
            "Too many failed authentications on this server (`field`: AUTH_FAILED_LOOKUPS_PER_SECOND); \
             retry after `Retry-After` seconds",
        );
    }
    doc.merge(authenticated);
    doc.merge(public);
    for operation in operations(&mut doc) {
        add_error(
            operation,
            500,
            "Internal error (details are logged, not returned)",
        );
        add_error(operation, 503, "Database unavailable; retry");
    }
    doc
}

fn operations(doc: &mut OpenApi) -> impl Iterator<Item = &mut Operation> {
    doc.paths.paths.values_mut().flat_map(|item| {
        [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.options,
            &mut item.head,
            &mut item.patch,
            &mut item.trace,
        ]
        .into_iter()
        .flatten()
    })
}

fn add_error(operation: &mut Operation, status: u16, description: &str) {
    let response = ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build();
    operation
        .responses
        .responses
        .entry(status.to_string())
        .or_insert(response.into());
}

fn string_enum<'a>(values: impl IntoIterator<Item = &'a str>) -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(values))
        .build()
}

pub fn job_type_schema() -> Object {
    string_enum(JobType::ALL.iter().map(|t| t.as_str()))
}

pub fn job_status_schema() -> Object {
    string_enum(JobStatus::ALL.iter().map(|s| s.as_str()))
}

pub fn task_type_schema() -> Object {
    string_enum(TaskType::ALL.iter().map(|t| t.as_str()))
}

pub fn task_status_schema() -> Object {
    string_enum(TaskStatus::ALL.iter().map(|s| s.as_str()))
}

pub fn artifact_kind_schema() -> Object {
    string_enum([ArtifactKind::Text, ArtifactKind::Pdf, ArtifactKind::Audio].map(ArtifactKind::as_str))
}
