//! Bearer API keys: generation, hashing, and the middleware that turns an
//! `Authorization` header into a [`Principal`].
//!
//! A key is `bk_` followed by 32 random bytes in URL-safe base64. Only its
//! SHA-256 is stored (see the `api_keys` migration); the secret is shown
//! once, when it is created, and never logged.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
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
/// A whole key: the scheme and 32 bytes in unpadded base64.
const KEY_LEN: usize = KEY_SCHEME.len() + 43;
/// Past this many cached keys the cache starts over rather than grow.
const MAX_CACHED_KEYS: usize = 10_000;
/// How often, at most, the prefixes of the active keys are read again
/// while the failed-lookup budget is used up: a key created meanwhile is
/// admitted within this long.
const PREFIXES_REFRESH: Duration = Duration::from_secs(10);

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
///
/// Failures are cheap too, so that a flood of bad tokens does not become a
/// flood of queries: a token that is not shaped like a key is refused
/// without a lookup; one the database did not know is remembered for
/// `failure_ttl`; and lookups that find nothing have a per-process budget,
/// past which unknown tokens get a 429 without a lookup. A flood of random
/// tokens must not lock real clients out with it: past the budget, a token
/// carrying the prefix of an active key (read from the database at most
/// every [`PREFIXES_REFRESH`]) is still looked up.
pub struct Authenticator {
    queue: Queue,
    ttl: Duration,
    failure_ttl: Duration,
    cache: Mutex<HashMap<[u8; 32], (Instant, Principal)>>,
    failures: Mutex<HashMap<[u8; 32], Instant>>,
    failure_budget: Mutex<TokenBucket>,
    failures_per_second: u32,
    known_prefixes: Mutex<KnownPrefixes>,
    /// Held while the prefixes are read: requests that need them meanwhile
    /// wait for that read instead of being refused (a burst of first
    /// requests with a real key past the budget) or reading again.
    refreshing: tokio::sync::Mutex<()>,
    lookups: AtomicU64,
}

/// The prefixes of the active keys, as last read.
#[derive(Default)]
struct KnownPrefixes {
    prefixes: HashSet<String>,
    read_at: Option<Instant>,
}

/// Settings of an [`Authenticator`].
#[derive(Debug, Clone, Copy)]
pub struct AuthSettings {
    /// How long a verified key is trusted.
    pub ttl: Duration,
    /// How long an unknown token is refused without a lookup.
    pub failure_ttl: Duration,
    /// Lookups that may find no key, per second and in a burst.
    pub failed_lookups_per_second: u32,
}

impl Authenticator {
    pub fn new(queue: Queue, settings: AuthSettings) -> Self {
        let rate = settings.failed_lookups_per_second.max(1);
        Authenticator {
            queue,
            ttl: settings.ttl,
            failure_ttl: settings.failure_ttl,
            cache: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            failure_budget: Mutex::new(TokenBucket::full(f64::from(rate))),
            failures_per_second: rate,
            known_prefixes: Mutex::default(),
            refreshing: tokio::sync::Mutex::new(()),
            lookups: AtomicU64::new(0),
        }
    }

    /// Database lookups made so far, of keys and of the active prefixes (for
    /// tests and the curious).
    pub fn lookups(&self) -> u64 {
        self.lookups.load(Ordering::Relaxed)
    }

    pub async fn authenticate(&self, headers: &HeaderMap) -> ApiResult<Principal> {
        let secret = bearer_token(headers)
            .filter(|token| is_key_shaped(token))
            .ok_or(ApiError::Unauthorized)?;
        let hash = hash_key(secret);
        if let Some(principal) = self.cached(&hash) {
            return Ok(principal);
        }
        if self.failed_recently(&hash) {
            return Err(ApiError::Unauthorized);
        }
        // Reserved before the lookup, not charged after it: requests in
        // flight together would each see the last unit left and all look up.
        let reserved = lock(&self.failure_budget).try_take(Instant::now());
        if !reserved && !self.is_active_prefix(&secret[..PREFIX_LEN]).await? {
            return Err(ApiError::TooManyRequests {
                what: "authentication attempts with unknown keys",
                limit: "AUTH_FAILED_LOOKUPS_PER_SECOND",
                max: self.failures_per_second as usize,
                retry_after: 1,
            });
        }
        self.lookups.fetch_add(1, Ordering::Relaxed);
        let found = self.queue.verify_api_key(&hash).await;
        // Only a failed lookup spends the budget.
        if reserved && !matches!(found, Ok(None)) {
            lock(&self.failure_budget).give_back();
        }
        let Some(key) = found? else {
            self.remember_failure(hash);
            return Err(ApiError::Unauthorized);
        };
        let principal = Principal {
            key_id: key.id,
            tenant: key.tenant,
            role: key.role,
        };
        lock(&self.known_prefixes)
            .prefixes
            .insert(secret[..PREFIX_LEN].to_owned());
        if !self.ttl.is_zero() {
            let mut cache = lock(&self.cache);
            if cache.len() >= MAX_CACHED_KEYS {
                cache.clear();
            }
            cache.insert(hash, (Instant::now() + self.ttl, principal.clone()));
        }
        Ok(principal)
    }

    /// Whether `prefix` is an active key's. The set is read again when it is
    /// older than [`PREFIXES_REFRESH`], by one request at a time: a flood
    /// costs at most one query per interval.
    async fn is_active_prefix(&self, prefix: &str) -> ApiResult<bool> {
        let known_now = || {
            let known = lock(&self.known_prefixes);
            let fresh = known.read_at.is_some_and(|at| at.elapsed() < PREFIXES_REFRESH);
            (known.prefixes.contains(prefix) || fresh).then(|| known.prefixes.contains(prefix))
        };
        if let Some(active) = known_now() {
            return Ok(active);
        }
        let _refreshing = self.refreshing.lock().await;
        // Read by whoever held the lock before.
        if let Some(active) = known_now() {
            return Ok(active);
        }
        self.lookups.fetch_add(1, Ordering::Relaxed);
        let prefixes = self.queue.active_api_key_prefixes().await?;
        let active = prefixes.contains(prefix);
        let mut known = lock(&self.known_prefixes);
        known.prefixes = prefixes;
        known.read_at = Some(Instant::now());
        Ok(active)
    }

    fn cached(&self, hash: &[u8; 32]) -> Option<Principal> {
        lock(&self.cache)
            .get(hash)
            .filter(|(expires, _)| *expires > Instant::now())
            .map(|(_, principal)| principal.clone())
    }

    fn failed_recently(&self, hash: &[u8; 32]) -> bool {
        lock(&self.failures)
            .get(hash)
            .is_some_and(|expires| *expires > Instant::now())
    }

    fn remember_failure(&self, hash: [u8; 32]) {
        if self.failure_ttl.is_zero() {
            return;
        }
        let mut failures = lock(&self.failures);
        if failures.len() >= MAX_CACHED_KEYS {
            failures.clear();
        }
        failures.insert(hash, Instant::now() + self.failure_ttl);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether a token can be a key at all: the scheme and 43 URL-safe base64
/// characters, as [`generate_key`] makes them.
fn is_key_shaped(token: &str) -> bool {
    token.len() == KEY_LEN
        && token.starts_with(KEY_SCHEME)
        && token[KEY_SCHEME.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `rate` tokens a second, holding at most `rate`.
struct TokenBucket {
    rate: f64,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    fn full(rate: f64) -> Self {
        TokenBucket {
            rate,
            tokens: rate,
            updated: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.updated = now;
    }

    /// Take a token if there is one.
    fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        let taken = self.tokens >= 1.0;
        if taken {
            self.tokens -= 1.0;
        }
        taken
    }

    fn give_back(&mut self) {
        self.tokens = (self.tokens + 1.0).min(self.rate);
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
        assert_eq!(a.secret.len(), KEY_LEN);
        assert!(is_key_shaped(&a.secret));
        for not_a_key in [
            "bk_",
            "nope",
            &a.secret[1..],
            &format!("{}=", &a.secret[..KEY_LEN - 1]),
        ] {
            assert!(!is_key_shaped(not_a_key), "{not_a_key}");
        }
    }

    #[test]
    fn the_failure_budget_refills_at_its_rate_up_to_its_size() {
        let start = Instant::now();
        let mut bucket = TokenBucket::full(2.0);
        bucket.updated = start;
        assert!(bucket.try_take(start));
        assert!(bucket.try_take(start));
        assert!(!bucket.try_take(start));
        let later = start + Duration::from_millis(500);
        assert!(bucket.try_take(later), "one back after half a second");
        assert!(!bucket.try_take(later));
        bucket.give_back();
        assert!(bucket.try_take(later), "a unit given back is there again");
        let much_later = start + Duration::from_secs(60);
        assert!(bucket.try_take(much_later));
        assert!(bucket.try_take(much_later));
        assert!(!bucket.try_take(much_later), "refilled to its size, no more");
        bucket.give_back();
        bucket.give_back();
        bucket.give_back();
        assert_eq!(bucket.tokens, 2.0, "giving back stops at the size");
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
