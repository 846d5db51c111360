//! Bearer API keys: generation, hashing, and the middleware that turns an
//! `Authorization` header into a [`Principal`].
//!
//! A key is `bk_` followed by 32 random bytes in URL-safe base64. Only its
//! SHA-256 is stored (see the `api_keys` migration); the secret is shown
//! once, when it is created, and never logged.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use queue::{ApiKeyRole, NewApiKey, Queue};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

const KEY_SCHEME: &str = "bk_";
/// How much of a key is kept in clear to tell keys apart: the scheme and
/// 8 characters (48 of its 256 random bits).
const PREFIX_LEN: usize = KEY_SCHEME.len() + 8;
/// Past this many cached keys the cache starts over rather than grow.
const MAX_CACHED_KEYS: usize = 10_000;

/// A freshly generated key. `secret` is what the client sends; it exists
/// only in memory until printed.
pub struct GeneratedKey {
    pub secret: String,
    pub record: NewApiKey,
}

pub fn generate_key(tenant: &str, role: ApiKeyRole) -> GeneratedKey {
    let secret = format!(
        "{KEY_SCHEME}{}",
        URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
    );
    let record = NewApiKey {
        tenant: tenant.to_string(),
        role,
        prefix: secret[..PREFIX_LEN].to_string(),
        key_hash: hash_key(&secret),
    };
    GeneratedKey { secret, record }
}

pub fn hash_key(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Who is calling: the key's tenant and role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub key_id: Uuid,
    pub tenant: String,
    pub role: ApiKeyRole,
}

impl Principal {
    pub fn require_admin(&self) -> ApiResult<()> {
        match self.role {
            ApiKeyRole::Admin => Ok(()),
            ApiKeyRole::Client => Err(ApiError::Forbidden),
        }
    }
}

/// Checks keys against the database, remembering valid ones for a short
/// while so that a busy client costs one lookup per `ttl`, not one per
/// request. A revoked key therefore stops working within `ttl`.
pub struct Authenticator {
    queue: Queue,
    ttl: Duration,
    cache: Mutex<HashMap<[u8; 32], (Instant, Principal)>>,
}

impl Authenticator {
    pub fn new(queue: Queue, ttl: Duration) -> Self {
        Authenticator {
            queue,
            ttl,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub async fn authenticate(&self, headers: &HeaderMap) -> ApiResult<Principal> {
        let secret = bearer_token(headers).ok_or(ApiError::Unauthorized)?;
        let hash = hash_key(secret);
        if let Some(principal) = self.cached(&hash) {
            return Ok(principal);
        }
        let key = self
            .queue
            .verify_api_key(&hash)
            .await?
            .ok_or(ApiError::Unauthorized)?;
        let principal = Principal {
            key_id: key.id,
            tenant: key.tenant,
            role: key.role,
        };
        if !self.ttl.is_zero() {
            let mut cache = self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if cache.len() >= MAX_CACHED_KEYS {
                cache.clear();
            }
            cache.insert(hash, (Instant::now() + self.ttl, principal.clone()));
        }
        Ok(principal)
    }

    fn cached(&self, hash: &[u8; 32]) -> Option<Principal> {
        let cache = self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        cache
            .get(hash)
            .filter(|(expires, _)| *expires > Instant::now())
            .map(|(_, principal)| principal.clone())
    }
}

/// The token of an `Authorization: Bearer <token>` header (the scheme is
/// case-insensitive, as HTTP says).
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Middleware for every `/v1` route: no valid key, no entry.
pub async fn require_api_key(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    match state.auth.authenticate(request.headers()).await {
        Ok(principal) => {
            request.extensions_mut().insert(principal);
            next.run(request).await
        }
        Err(error) => error.into_response(),
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        // Only present behind `require_api_key`; a handler mounted without
        // it fails closed.
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .ok_or(ApiError::Unauthorized)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_distinct_and_hash_to_their_record() {
        let a = generate_key("acme", ApiKeyRole::Client);
        let b = generate_key("acme", ApiKeyRole::Client);
        assert_ne!(a.secret, b.secret);
        assert_eq!(a.record.key_hash, hash_key(&a.secret));
        assert!(a.secret.starts_with(&a.record.prefix) && a.record.prefix.len() == PREFIX_LEN);
        assert_eq!(a.secret.len(), KEY_SCHEME.len() + 43);
    }

    #[test]
    fn bearer_tokens_are_read_case_insensitively_and_nothing_else_is() {
        let headers = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, value.parse().unwrap());
            h
        };
        assert_eq!(bearer_token(&headers("Bearer abc")), Some("abc"));
        assert_eq!(bearer_token(&headers("bearer  abc ")), Some("abc"));
        assert_eq!(bearer_token(&headers("Basic abc")), None);
        assert_eq!(bearer_token(&headers("Bearer ")), None);
        assert_eq!(bearer_token(&HeaderMap::new()), None);
    }
}
