//! The web console at `/ui`: a few static files built into the binary
//! (no build step, nothing to deploy beside it). The page itself is
//! public; every data call it makes carries the API key the user typed,
//! as a bearer token, so these routes need no auth and set no cookie.
//!
//! The console only ever shows data as text (never as HTML), and the
//! Content-Security-Policy allows scripts and styles from these files
//! alone, so injected markup could not run even if it got in.

use std::sync::LazyLock;

use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::state::AppState;

/// What the console's pages may load: its own scripts, styles and images,
/// its own API, and the `blob:` URLs it makes from downloaded artifacts
/// (the PDF frame, the audio player). `object-src blob:` because the PDF's
/// `blob:` document inherits this policy and the browser's viewer is a
/// plugin there. Nothing inline, nothing remote, no framing of the console
/// by other sites.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data: blob:; media-src blob:; frame-src blob:; object-src blob:; connect-src 'self'; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Browsers check with the server before each use (a 304 when unchanged),
/// so a new binary's console is picked up at once.
pub const CACHE_CONTROL: &str = "no-cache";

struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset {
        path: "/ui/",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../ui/index.html"),
    },
    Asset {
        path: "/ui/app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../ui/app.js"),
    },
    Asset {
        path: "/ui/style.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../ui/style.css"),
    },
    Asset {
        path: "/ui/favicon.svg",
        content_type: "image/svg+xml",
        body: include_bytes!("../ui/favicon.svg"),
    },
];

/// A strong validator per asset, in [`ASSETS`] order: its content's hash.
static ETAGS: LazyLock<Vec<HeaderValue>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|asset| {
            let digest = Sha256::digest(asset.body);
            let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
            HeaderValue::from_str(&format!("\"{hex}\"")).expect("hex is a valid header value")
        })
        .collect()
});

/// The console's security headers, on every answer under `/ui`: the
/// redirect and the refusals (an unknown file, a method not served) as
/// well as the files, which the server sets around the whole router,
/// since a fallback answers the refusals outside these routes.
pub fn insert_security_headers(headers: &mut HeaderMap) {
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (
            HeaderName::from_static("cross-origin-opener-policy"),
            "same-origin",
        ),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
}

/// `/ui` (redirected to `/ui/`), the page, and its files.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(serve_asset))
        .route("/ui/{file}", get(serve_asset))
}

async fn serve_asset(uri: Uri, request_headers: HeaderMap) -> Response {
    let Some(index) = ASSETS.iter().position(|a| a.path == uri.path()) else {
        return ApiError::NotFound(format!("console file {}", uri.path())).into_response();
    };
    let asset = &ASSETS[index];
    let etag = ETAGS[index].clone();
    let mut headers = HeaderMap::new();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(CACHE_CONTROL));
    headers.insert(header::ETAG, etag.clone());
    let unchanged = request_headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| {
            let ours = etag.to_str().unwrap_or_default();
            tags.split(',').any(|t| {
                let t = t.trim();
                t == "*" || t.strip_prefix("W/").unwrap_or(t) == ours
            })
        });
    if unchanged {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    (headers, asset.body).into_response()
}
