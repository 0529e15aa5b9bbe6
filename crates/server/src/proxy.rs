//! The broker for static-key destinations (`kind = "proxy"`): an HTTP listener
//! (`[proxy] listen`) that takes `/d/<destination>/<path>`, checks the lanyard token a
//! workload presents where its SDK puts the API key, swaps it for the destination's
//! real key and streams the upstream's answer back. Also the write-only store of those
//! keys ([`put_secret`]).
//!
//! # Per request
//! 1. Route: the destination must exist and be of kind `proxy`.
//! 2. Hostile input is refused before anything else: framing and `Connection` tricks
//!    ([`check_request_headers`]) and any path an upstream could read differently
//!    ([`normalize_path`]).
//! 3. The token is verified exactly as introspection does ([`verify_token`]: lanyard's
//!    own keys, retired ones included, `typ`, `iss`, `exp`, `nbf`) and `aud` must be
//!    this destination's proxy audience; then, before the store is read, the grant's
//!    token bucket ([`RateLimiter`]) must have a request left and the grant fewer than
//!    `max_in_flight_per_grant` requests in flight. Its grant must be active,
//!    unexpired, of this destination and workload, and not refused by a deny entry or
//!    the destination's kill switch.
//! 4. The method and normalized path must match a rule of a granted scope, and the
//!    destination's key must be bound to its current upstream origin, key header and
//!    prefix ([`KeyBinding`]): a key set for other settings is never sent.
//! 5. The body (at most `max_request_bytes`, within `client_timeout`) is forwarded with
//!    every header that could carry a key or override the method or path removed and
//!    the real key injected; the answer is streamed back chunk by chunk, never
//!    buffered, without `Set-Cookie` or a cross-origin `Location`, refused when a header
//!    carries the key and cut when the body does ([`KeyScanner`]), and cut when the
//!    grant stops being active ([`Runtime::revocation_watch`] wakes the stream; the
//!    store is polled every `recheck_interval` for changes made elsewhere) or the
//!    client stops reading for `client_timeout`.
//! 6. One `proxy.request` audit event per request, written through the committer after
//!    the answer ends, off the request's path: method, the matched rule's pattern
//!    (never the raw path or query), status, bytes in and out, grant, workload,
//!    destination, and the reason of a refusal or a cut. Never bodies, queries or keys.
//!    Refusals before a token is verified are summed up (`RefusalWindows`).
//!
//! The listener ([`serve`]) is hyper's HTTP/1.1 server with a header read timeout and
//! at most `max_connections` connections at once.
//!
//! Refusals are JSON, shaped like the errors LLM SDKs already print:
//! `{"type": "error", "error": {"type": "lanyard_proxy_error", "reason": "GRANT_REVOKED",
//! "message": "..."}}`, with the reason also in the `lanyard-reason` header.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use lanyard_core::{ReasonCode, Secret};
use lanyard_destination_proxy::{
    KIND, KeyBinding, KeyScanner, ProxyConfig, ROUTE_PREFIX, RateLimiter, audience,
    check_request_headers, forward_headers, normalize_path, response_headers, take_token,
};
use lanyard_store::{ConfigKind, GrantRecord, GrantStatus, NewConfigObject};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{mpsc, watch};

use crate::error::ApiError;
use crate::introspect::{Inactive, verify_token};
use crate::runtime::{RequestCtx, Runtime, truncate};

use lanyard_audit::kinds::{DESTINATION_SECRET_DELETE, DESTINATION_SECRET_PUT, PROXY_REQUEST};
/// Refusal reason for hostile input (path traversal, header smuggling).
const PROXY_DENIED: &str = lanyard_core::ReasonCode::ProxyDenied.as_str();
/// Refusal reason for a grant over its `requests_per_minute`.
const RATE_LIMITED: &str = lanyard_core::ReasonCode::RateLimited.as_str();
/// Longest static key accepted.
pub const MAX_SECRET_BYTES: usize = 8192;

/// `[proxy]` settings, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyListenSettings {
    /// Where to listen; `None`: no proxy listener.
    pub listen: Option<SocketAddr>,
    /// How often a streaming answer re-reads its grant from the store (changes made on
    /// this server wake it at once).
    pub recheck_interval: Duration,
    /// Longest wait for the upstream's next bytes.
    pub upstream_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// A connection whose request headers take longer is closed.
    pub header_read_timeout: Duration,
    /// Longest wait for a client to send its request body, or to take the next bytes
    /// of an answer.
    pub client_timeout: Duration,
    /// Requests in flight at once per grant; more get 429.
    pub max_in_flight_per_grant: u32,
}

impl Default for ProxyListenSettings {
    fn default() -> Self {
        Self {
            listen: None,
            recheck_interval: Duration::from_secs(1),
            upstream_timeout: Duration::from_secs(300),
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
            client_timeout: Duration::from_secs(60),
            max_in_flight_per_grant: 32,
        }
    }
}

// === secrets ===

/// A destination's static key as stored (`ConfigKind::DestinationSecret`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredSecret {
    /// The key, sealed with [`secret_aad`].
    pub sealed: String,
    /// `hmac-sha256:<hex>` of the key under the audit fingerprint key.
    pub fingerprint: String,
    /// When it was set, seconds.
    pub updated_at: i64,
    /// The destination's settings the key was set for (also in the sealing AAD). A key
    /// without one (set before keys were bound) is never sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binding: Option<KeyBinding>,
}

/// What binds a sealed key to its destination and to where and how it is sent: moved
/// to another record, or opened for changed settings, it does not open.
pub fn secret_aad(destination: &str, binding: &KeyBinding) -> Vec<u8> {
    binding.aad(destination)
}

/// Why the proxy refuses to send a key whose destination's settings moved.
pub const KEY_NOT_BOUND: &str = "the destination's upstream or key header changed since its key was set: set the key again with `lanyard destination secret set`";

/// A stored key's status, never the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretStatus {
    /// Its fingerprint.
    pub fingerprint: String,
    /// When it was set, seconds.
    pub updated_at: i64,
    /// Who set it.
    pub updated_by: String,
    /// Whether it is bound to the destination's current upstream origin, key header and
    /// key prefix; when not, the proxy refuses to send it.
    pub bound: bool,
}

/// The binding of `destination`'s current settings, read from the store.
///
/// # Errors
/// `NOT_FOUND` for an unknown destination, `INVALID_ARGUMENT` for one that is not of
/// kind `proxy` (or whose settings do not parse), `STORE_UNAVAILABLE`.
async fn current_binding(rt: &Runtime, destination: &str) -> Result<KeyBinding, ApiError> {
    let Some(obj) = rt
        .store
        .config_get(ConfigKind::Destination, destination)
        .await?
    else {
        return Err(ApiError::new(
            ReasonCode::NotFound,
            format!("no destination named {destination:?}; put it first"),
        ));
    };
    let spec: lanyard_destination::DestinationSpec =
        serde_json::from_value(obj.spec).map_err(|e| ApiError::internal(&e))?;
    if spec.kind != KIND {
        return Err(ApiError::invalid(format!(
            "destination {destination:?} has kind {:?}: only {KIND:?} destinations take a static key",
            spec.kind
        )));
    }
    let config = ProxyConfig::from_value(&spec.settings, &spec.scopes)
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    Ok(config.binding())
}

/// Set or rotate `destination`'s static key: sealed, stored as a configuration object,
/// audited as `destination_secret.put` with fingerprints only.
///
/// # Errors
/// `INVALID_ARGUMENT` for a bad name or key, `NOT_FOUND` for an unknown destination,
/// `STORE_UNAVAILABLE`.
pub async fn put_secret(
    rt: &Runtime,
    destination: &str,
    secret: &Secret,
    ctx: &RequestCtx,
) -> Result<SecretStatus, ApiError> {
    if !lanyard_destination::valid_name(destination) {
        return Err(ApiError::invalid(format!(
            "destination name {:?} must be 1-63 characters of [a-z0-9-]",
            truncate(destination)
        )));
    }
    let key = secret.expose();
    if key.is_empty() || key.len() > MAX_SECRET_BYTES {
        return Err(ApiError::invalid(format!(
            "the secret must be 1-{MAX_SECRET_BYTES} bytes"
        )));
    }
    if !key.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) || key.trim() != key {
        return Err(ApiError::invalid(
            "the secret must be printable ASCII without leading or trailing spaces or line breaks",
        ));
    }
    // Bound to where and how the key is sent now: if the destination's upstream origin,
    // key header or prefix change later, the proxy refuses to send it until it is set
    // again (and audited again).
    let binding = current_binding(rt, destination).await?;
    let before = rt
        .store
        .config_get(ConfigKind::DestinationSecret, destination)
        .await?
        .and_then(|o| serde_json::from_value::<StoredSecret>(o.spec).ok());
    let sealed = rt
        .sealer
        .seal(key.as_bytes(), &secret_aad(destination, &binding))
        .map_err(|e| ApiError::internal(&e))?;
    let fingerprint = rt.fingerprinter.fingerprint(key);
    let now = rt.clock.now_unix();
    let stored = StoredSecret {
        sealed,
        fingerprint: fingerprint.clone(),
        updated_at: now,
        binding: Some(binding.clone()),
    };
    let mut ev = rt.event_for(DESTINATION_SECRET_PUT, ctx);
    ev.destination = Some(destination.to_owned());
    ev.detail = json!({
        "name": destination,
        "fingerprint": fingerprint,
        "previous_fingerprint": before.map(|b| b.fingerprint),
        "upstream_origin": binding.upstream_origin,
        "key_header": binding.key_header,
        "key_prefix": binding.key_prefix,
    });
    let updated_by = ctx.operator.clone().unwrap_or_else(|| "unknown".into());
    rt.store
        .config_put(
            NewConfigObject {
                kind: ConfigKind::DestinationSecret,
                name: destination.to_owned(),
                spec: serde_json::to_value(&stored).map_err(|e| ApiError::internal(&e))?,
                updated_by: updated_by.clone(),
                now,
            },
            None,
            ev,
        )
        .await?;
    // The proxy's cache follows the snapshot's generation: in force here at once.
    rt.reload(false).await?;
    tracing::info!(request_id = %ctx.request_id, destination, "destination secret set");
    Ok(SecretStatus {
        fingerprint,
        updated_at: now,
        updated_by,
        bound: true,
    })
}

/// `destination`'s key status, `None` when none is set.
///
/// # Errors
/// `STORE_UNAVAILABLE`; `INTERNAL` for a stored value that does not parse.
pub async fn secret_status(
    rt: &Runtime,
    destination: &str,
) -> Result<Option<SecretStatus>, ApiError> {
    let Some(obj) = rt
        .store
        .config_get(ConfigKind::DestinationSecret, destination)
        .await?
    else {
        return Ok(None);
    };
    let stored: StoredSecret =
        serde_json::from_value(obj.spec).map_err(|e| ApiError::internal(&e))?;
    let bound = match current_binding(rt, destination).await {
        Ok(b) => stored.binding.as_ref() == Some(&b),
        Err(e) if e.reason == ReasonCode::StoreUnavailable => return Err(e),
        Err(_) => false,
    };
    Ok(Some(SecretStatus {
        fingerprint: stored.fingerprint,
        updated_at: stored.updated_at,
        updated_by: obj.updated_by,
        bound,
    }))
}

/// Remove `destination`'s key, if any (when the destination is deleted).
///
/// # Errors
/// `STORE_UNAVAILABLE`.
pub async fn delete_secret(
    rt: &Runtime,
    destination: &str,
    ctx: &RequestCtx,
) -> Result<(), ApiError> {
    let Some(status) = secret_status(rt, destination).await? else {
        return Ok(());
    };
    let mut ev = rt.event_for(DESTINATION_SECRET_DELETE, ctx);
    ev.destination = Some(destination.to_owned());
    ev.detail = json!({"name": destination, "fingerprint": status.fingerprint});
    match rt
        .store
        .config_delete(ConfigKind::DestinationSecret, destination, ev)
        .await
    {
        Ok(()) | Err(lanyard_store::StoreError::NotFound { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

// === the listener ===

/// A destination's key as the listener holds it.
enum KeyState {
    /// None is set.
    Missing,
    /// Set for other settings than the destination's current ones: never sent.
    NotBound,
    /// Stored but it does not open (logged).
    Unopenable,
    /// Opened, for the current settings.
    Ready(Arc<Secret>),
}

/// A proxy destination as the listener uses it, rebuilt when the configuration moves.
struct Compiled {
    generation: i64,
    config: ProxyConfig,
    audience: String,
    /// The real key, opened once per configuration generation, and only when it is
    /// bound to the destination's current upstream origin, key header and prefix.
    key: KeyState,
}

struct Inner {
    rt: Arc<Runtime>,
    client: reqwest::Client,
    limiter: RateLimiter,
    cache: Mutex<HashMap<String, Arc<Compiled>>>,
    settings: ProxyListenSettings,
    /// Requests in flight per grant.
    in_flight: Mutex<HashMap<String, u32>>,
    /// Audit events of requests refused before a token was verified.
    unverified: RefusalWindows,
}

/// The proxy listener's shared state.
#[derive(Clone)]
pub struct Proxy(Arc<Inner>);

/// A request in flight for a grant; counted until dropped.
struct InFlight {
    inner: Arc<Inner>,
    grant: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut g = lock(&self.inner.in_flight);
        if let Some(n) = g.get_mut(&self.grant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                g.remove(&self.grant);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Proxy {
    /// The proxy for `rt`.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(rt: Arc<Runtime>, settings: &ProxyListenSettings) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(settings.upstream_timeout)
            .user_agent(concat!("lanyard-proxy/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self(Arc::new(Inner {
            rt,
            client,
            limiter: RateLimiter::default(),
            cache: Mutex::new(HashMap::new()),
            settings: settings.clone(),
            in_flight: Mutex::new(HashMap::new()),
            unverified: RefusalWindows::default(),
        })))
    }

    /// The router: every path goes to [`handle`], which reads the raw path itself
    /// (a router would decode it first).
    pub fn router(self) -> Router {
        Router::new().fallback(handle).with_state(self)
    }

    /// Count a request in flight for `grant`; `None` past `max_in_flight_per_grant`.
    fn enter(&self, grant: &str) -> Option<InFlight> {
        let mut g = lock(&self.0.in_flight);
        let n = g.entry(grant.to_owned()).or_insert(0);
        if *n >= self.0.settings.max_in_flight_per_grant {
            return None;
        }
        *n += 1;
        Some(InFlight {
            inner: self.0.clone(),
            grant: grant.to_owned(),
        })
    }

    /// The compiled destination `name` of kind `proxy`, from the cache while the
    /// configuration generation has not moved.
    async fn compiled(&self, name: &str) -> Result<Option<Arc<Compiled>>, Refusal> {
        let snap = self.0.rt.snapshot();
        let Some(entry) = snap.destinations.get(name).filter(|e| e.spec.kind == KIND) else {
            lock(&self.0.cache).remove(name);
            return Ok(None);
        };
        if let Some(c) = lock(&self.0.cache).get(name).cloned()
            && c.generation == snap.generation
        {
            return Ok(Some(c));
        }
        let config = ProxyConfig::from_value(&entry.spec.settings, &entry.spec.scopes)
            .map_err(|e| Refusal::internal(&e))?;
        let binding = config.binding();
        let key = match self
            .0
            .rt
            .store
            .config_get(ConfigKind::DestinationSecret, name)
            .await
        {
            Ok(Some(obj)) => match serde_json::from_value::<StoredSecret>(obj.spec) {
                Err(e) => {
                    tracing::error!(destination = name, error = %e, "the destination's stored key does not parse; set it again");
                    KeyState::Unopenable
                }
                Ok(s) if s.binding.as_ref() != Some(&binding) => {
                    tracing::warn!(
                        destination = name,
                        "the destination's key was set for another upstream, key header or prefix; it is not sent until it is set again"
                    );
                    KeyState::NotBound
                }
                Ok(s) => match self
                    .0
                    .rt
                    .sealer
                    .open(&s.sealed, &secret_aad(name, &binding))
                {
                    Ok(k) => KeyState::Ready(Arc::new(k)),
                    Err(e) => {
                        tracing::error!(destination = name, error = %e, "the destination's key does not open; set it again");
                        KeyState::Unopenable
                    }
                },
            },
            Ok(None) => KeyState::Missing,
            Err(e) => return Err(ApiError::from(e).into()),
        };
        let compiled = Arc::new(Compiled {
            generation: snap.generation,
            audience: audience(self.0.rt.minter.issuer_url(), name),
            config,
            key,
        });
        let mut cache = lock(&self.0.cache);
        // Deleted destinations (and keys) leave the cache.
        cache.retain(|n, _| {
            snap.destinations
                .get(n)
                .is_some_and(|e| e.spec.kind == KIND)
        });
        cache.insert(name.to_owned(), compiled.clone());
        Ok(Some(compiled))
    }
}

async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|v| *v).await;
}

/// Serve the proxy on `listener` until `shutdown` turns true: at most
/// `max_connections` connections at once (more wait in the listen backlog), each
/// closed when a request's headers take longer than `header_read_timeout`.
pub async fn serve(
    proxy: Proxy,
    listener: tokio::net::TcpListener,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let settings = proxy.0.settings.clone();
    let slots = Arc::new(tokio::sync::Semaphore::new(settings.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    // HTTP/1.1 only: what SDKs speak to a plain-HTTP base URL, and where the header
    // timeout applies to every request.
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout);
    let router = proxy.router();
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = stopped(&mut shutdown) => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of descriptors and the like: do not spin.
                    tracing::warn!(error = %e, "proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopped(&mut shutdown) => break,
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "proxy connection ended");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// A refusal: status, stable reason, message for the workload.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    reason: &'static str,
    message: String,
    retry_after: Option<u64>,
    /// Refused before a token was verified (audited summed up).
    unverified: bool,
}

impl Refusal {
    fn new(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            reason,
            message: message.into(),
            retry_after: None,
            unverified: false,
        }
    }

    fn denied(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, PROXY_DENIED, message)
    }

    fn internal(cause: &dyn std::fmt::Display) -> Self {
        ApiError::internal(cause).into()
    }

    fn response(&self) -> Response {
        let body = json!({
            "type": "error",
            "error": {
                "type": "lanyard_proxy_error",
                "reason": self.reason,
                "message": self.message,
            },
        });
        let mut resp = (self.status, axum::Json(body)).into_response();
        let h = resp.headers_mut();
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert("lanyard-reason", HeaderValue::from_static(self.reason));
        if let Some(secs) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

impl From<ApiError> for Refusal {
    fn from(e: ApiError) -> Self {
        let status = match crate::error::code_for(e.reason) {
            tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            tonic::Code::PermissionDenied | tonic::Code::FailedPrecondition => {
                StatusCode::FORBIDDEN
            }
            tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            tonic::Code::NotFound => StatusCode::NOT_FOUND,
            tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
            tonic::Code::ResourceExhausted => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, e.reason.as_str(), e.message)
    }
}

/// The refusal for a token that did not verify: 401 with the closest reason code.
fn token_refusal(why: Inactive) -> Refusal {
    let reason = match why {
        Inactive::TooLarge => ReasonCode::TokenTooLarge,
        Inactive::Malformed => ReasonCode::TokenMalformed,
        Inactive::HeaderRejected => ReasonCode::TokenHeaderRejected,
        Inactive::WrongType => ReasonCode::TokenTypeRejected,
        Inactive::AlgorithmNotAllowed => ReasonCode::AlgorithmNotAllowed,
        Inactive::KeyUnknown => ReasonCode::KeyUnknown,
        Inactive::SignatureInvalid => ReasonCode::SignatureInvalid,
        Inactive::Expired => ReasonCode::TokenExpired,
        Inactive::NotYetValid => ReasonCode::TokenNotYetValid,
        _ => ReasonCode::ClaimInvalid,
    };
    Refusal::new(
        StatusCode::UNAUTHORIZED,
        reason.as_str(),
        format!(
            "the lanyard token was refused ({}); exchange for a new one",
            why.as_str()
        ),
    )
}

/// Why `grant` may not be used now, if it may not.
fn grant_refusal(rt: &Runtime, grant: &GrantRecord, now: i64) -> Option<Refusal> {
    match grant.status {
        GrantStatus::Active if grant.expires_at > now => {}
        GrantStatus::Revoked => {
            return Some(Refusal::new(
                StatusCode::FORBIDDEN,
                ReasonCode::GrantRevoked.as_str(),
                "the grant was revoked",
            ));
        }
        _ => {
            return Some(Refusal::new(
                StatusCode::FORBIDDEN,
                ReasonCode::GrantNotActive.as_str(),
                "the grant is released or expired; exchange for a new one",
            ));
        }
    }
    rt.grant_deny_check(&grant.workload_id, &grant.issuer, &grant.destination)
        .map(Refusal::from)
}

/// What one request did, for its audit event.
struct Record {
    request_id: String,
    destination: String,
    method: String,
    rule: Option<String>,
    grant: Option<GrantRecord>,
    /// The verified token's grant and workload, before its grant is read.
    claimed: Option<(String, String)>,
    bytes_in: u64,
    started: Instant,
    /// More than one refusal summed up in this event.
    count: Option<u64>,
}

impl Record {
    /// Write the event through the committer, off the request's path.
    fn finish(
        self,
        rt: &Arc<Runtime>,
        status: u16,
        refusal: Option<&str>,
        cut: Option<&str>,
        bytes_out: u64,
    ) {
        let ctx = RequestCtx {
            request_id: self.request_id,
            operator: None,
        };
        if self.count.is_none() {
            // Summed-up refusals were counted one by one already.
            rt.metrics
                .proxy_request(&self.destination, refusal.or(cut).unwrap_or("ok"));
        }
        let mut ev = rt.event_for(PROXY_REQUEST, &ctx);
        ev.destination = Some(self.destination);
        if let Some(g) = &self.grant {
            ev.actor = Some(g.workload_id.clone());
            ev.workload_id = Some(g.workload_id.clone());
            ev.issuer = Some(g.issuer.clone());
            ev.task_id = g.task_id.clone();
            ev.grant_id = Some(g.id.to_string());
            ev.scopes = g.scopes.clone();
        } else if let Some((grant, workload)) = self.claimed {
            ev.actor = Some(workload.clone());
            ev.workload_id = Some(workload);
            ev.grant_id = Some(grant);
        }
        ev.decision = Some(if refusal.is_some() { "deny" } else { "allow" }.into());
        ev.reason = refusal.or(cut).map(str::to_owned);
        let millis = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        ev.detail = json!({
            "method": self.method,
            "rule": self.rule,
            "status": status,
            "bytes_in": self.bytes_in,
            "bytes_out": bytes_out,
            "duration_ms": millis,
        });
        if let Some(cut) = cut {
            ev.detail["cut"] = json!(cut);
        }
        if let Some(n) = self.count {
            ev.detail["count"] = json!(n);
        }
        let rt = rt.clone();
        tokio::spawn(async move {
            if let Err(e) = rt.committer.commit(None, ev).await {
                tracing::warn!(error = %e.message, "proxy.request audit event not written");
            }
        });
    }
}

/// Audit events for requests refused before their token was verified (hostile paths
/// and headers, missing or forged tokens) are summed up: at most one event per
/// destination and reason per [`UNVERIFIED_WINDOW`], with `detail.count`, so an
/// unauthenticated flood cannot swamp the audit chain.
#[derive(Default)]
struct RefusalWindows {
    windows: Mutex<HashMap<(String, &'static str), Window>>,
}

/// One destination and reason's window.
#[derive(Debug, Default)]
struct Window {
    /// When the last event was written.
    last: Option<Instant>,
    /// Refusals not yet in an event.
    pending: u64,
    /// Whether a task will write them when the window ends.
    flush_scheduled: bool,
}

/// At most one event per destination and reason this often.
const UNVERIFIED_WINDOW: Duration = Duration::from_secs(1);

/// What to do with one refusal.
#[derive(Debug, PartialEq, Eq)]
enum Note {
    /// Write an event now, summing up this many refusals.
    Write(u64),
    /// Write the pending refusals at this instant.
    Schedule(Instant),
    /// Counted; a scheduled write will include it.
    Counted,
}

impl RefusalWindows {
    fn note(&self, destination: &str, reason: &'static str, now: Instant) -> Note {
        let mut g = lock(&self.windows);
        let w = g.entry((destination.to_owned(), reason)).or_default();
        match w.last {
            Some(t) if now.saturating_duration_since(t) < UNVERIFIED_WINDOW => {
                w.pending += 1;
                if w.flush_scheduled {
                    Note::Counted
                } else {
                    w.flush_scheduled = true;
                    Note::Schedule(t + UNVERIFIED_WINDOW)
                }
            }
            _ => {
                w.last = Some(now);
                let n = w.pending + 1;
                w.pending = 0;
                Note::Write(n)
            }
        }
    }

    /// The refusals pending when a scheduled write runs.
    fn flush(&self, destination: &str, reason: &'static str, now: Instant) -> u64 {
        let mut g = lock(&self.windows);
        let Some(w) = g.get_mut(&(destination.to_owned(), reason)) else {
            return 0;
        };
        w.flush_scheduled = false;
        let n = std::mem::take(&mut w.pending);
        if n > 0 {
            w.last = Some(now);
        }
        n
    }
}

/// Audit a request refused before its token was verified, summed up per window.
fn finish_unverified(proxy: &Proxy, mut record: Record, refusal: &Refusal) {
    let rt = &proxy.0.rt;
    rt.metrics
        .proxy_request(&record.destination, refusal.reason);
    let status = refusal.status.as_u16();
    let reason = refusal.reason;
    match proxy
        .0
        .unverified
        .note(&record.destination, reason, Instant::now())
    {
        Note::Write(n) => {
            record.count = Some(n);
            record.finish(rt, status, Some(reason), None, 0);
        }
        Note::Schedule(at) => {
            let proxy = proxy.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(at.into()).await;
                let n = proxy
                    .0
                    .unverified
                    .flush(&record.destination, reason, Instant::now());
                if n > 0 {
                    record.request_id = uuid::Uuid::new_v4().simple().to_string();
                    record.count = Some(n);
                    record.finish(&proxy.0.rt, status, Some(reason), None, 0);
                }
            });
        }
        Note::Counted => {}
    }
}
/// Split `/d/<destination>[/<path>]` into the destination and the path.
fn route(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix('/')?.strip_prefix(ROUTE_PREFIX)?;
    let rest = rest.strip_prefix('/')?;
    let (name, tail) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    lanyard_destination::valid_name(name).then_some((name, tail))
}

fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| {
            !s.is_empty()
                && s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        .map_or_else(|| uuid::Uuid::new_v4().simple().to_string(), str::to_owned)
}

/// One proxied request.
async fn handle(State(proxy): State<Proxy>, req: Request) -> Response {
    let Some((name, tail)) = route(req.uri().path()) else {
        return Refusal::new(
            StatusCode::NOT_FOUND,
            ReasonCode::DestinationUnknown.as_str(),
            format!("use /{ROUTE_PREFIX}/<destination>/<path>"),
        )
        .response();
    };
    let (name, tail) = (name.to_owned(), tail.to_owned());
    let compiled = match proxy.compiled(&name).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            return Refusal::new(
                StatusCode::NOT_FOUND,
                ReasonCode::DestinationUnknown.as_str(),
                format!("no proxy destination named {name:?}"),
            )
            .response();
        }
        Err(r) => return r.response(),
    };
    let mut record = Record {
        request_id: request_id(req.headers()),
        destination: name,
        method: req.method().as_str().to_owned(),
        rule: None,
        grant: None,
        claimed: None,
        bytes_in: 0,
        started: Instant::now(),
        count: None,
    };
    let rt = proxy.0.rt.clone();
    match forward(&proxy, &compiled, &tail, req, &mut record).await {
        Ok(sent) => stream_back(&proxy, &compiled, sent, record),
        Err(refusal) => {
            tracing::debug!(
                destination = %record.destination,
                reason = refusal.reason,
                message = %refusal.message,
                "proxy request refused"
            );
            if refusal.unverified {
                finish_unverified(&proxy, record, &refusal);
            } else {
                record.finish(&rt, refusal.status.as_u16(), Some(refusal.reason), None, 0);
            }
            refusal.response()
        }
    }
}

/// A request sent upstream: its answer (headers read), the key it carried, and its
/// place among the grant's requests in flight.
struct Sent {
    upstream: reqwest::Response,
    key: Arc<Secret>,
    in_flight: InFlight,
}

/// Check the request and send it upstream.
async fn forward(
    proxy: &Proxy,
    compiled: &Compiled,
    tail: &str,
    req: Request,
    record: &mut Record,
) -> Result<Sent, Refusal> {
    let rt = &proxy.0.rt;
    let config = &compiled.config;
    let (parts, body) = req.into_parts();
    // Refused before a token is verified: summed up in the audit.
    let unverified = |mut r: Refusal| {
        r.unverified = true;
        r
    };
    check_request_headers(&parts.headers, config)
        .map_err(|e| unverified(Refusal::denied(e.to_string())))?;
    let path = normalize_path(tail).map_err(|e| unverified(Refusal::denied(e.to_string())))?;
    let token = take_token(&parts.headers, config).map_err(|e| {
        unverified(Refusal::new(
            StatusCode::UNAUTHORIZED,
            ReasonCode::TokenMalformed.as_str(),
            e.to_string(),
        ))
    })?;
    let now = rt.clock.now_unix();
    let verified = verify_token(
        &rt.keys.all_public_jwks(),
        rt.minter.issuer_url(),
        token,
        now,
    )
    .map_err(|why| unverified(token_refusal(why)))?;
    if verified.claims.aud != compiled.audience
        || verified.claims.lanyard.destination != record.destination
    {
        return Err(Refusal::new(
            StatusCode::UNAUTHORIZED,
            ReasonCode::AudienceMismatch.as_str(),
            format!(
                "the lanyard token is not for this destination; exchange for {:?}",
                record.destination
            ),
        ));
    }
    let grant_id = verified.grant_id.to_string();
    record.claimed = Some((grant_id.clone(), verified.claims.sub.clone()));
    // The rate limit and the in-flight cap come before the store is read.
    if let Err(wait) = proxy.0.limiter.check(
        &grant_id,
        config.settings.requests_per_minute,
        Instant::now(),
    ) {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let mut r = Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            RATE_LIMITED,
            format!(
                "more than {} requests a minute for this grant; retry in {secs} s",
                config.settings.requests_per_minute
            ),
        );
        r.retry_after = Some(secs.max(1));
        return Err(r);
    }
    let in_flight = proxy.enter(&grant_id).ok_or_else(|| {
        let mut r = Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            RATE_LIMITED,
            format!(
                "more than {} requests in flight for this grant",
                proxy.0.settings.max_in_flight_per_grant
            ),
        );
        r.retry_after = Some(1);
        r
    })?;
    let grant = rt
        .store
        .grant_get(&verified.grant_id)
        .await
        .map_err(|e| Refusal::from(ApiError::from(e)))?
        .ok_or_else(|| {
            Refusal::new(
                StatusCode::UNAUTHORIZED,
                ReasonCode::GrantNotFound.as_str(),
                "the token's grant is unknown",
            )
        })?;
    if grant.destination != record.destination || grant.workload_id != verified.claims.sub {
        return Err(Refusal::new(
            StatusCode::UNAUTHORIZED,
            ReasonCode::GrantMismatch.as_str(),
            "the token does not match its grant",
        ));
    }
    record.grant = Some(grant.clone());
    if let Some(r) = grant_refusal(rt, &grant, now) {
        return Err(r);
    }
    let method = parts.method.as_str();
    let (_, pattern) = config
        .allowed(&grant.scopes, method, &path)
        .ok_or_else(|| {
            Refusal::new(
                StatusCode::FORBIDDEN,
                ReasonCode::ScopeNotAllowed.as_str(),
                format!(
                    "{method} on this path is not allowed by the granted scopes ({})",
                    grant.scopes.join(" ")
                ),
            )
        })?;
    record.rule = Some(pattern.to_owned());
    let key = match &compiled.key {
        KeyState::Ready(k) => k.clone(),
        KeyState::Missing => {
            return Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ReasonCode::DestinationUnavailable.as_str(),
                "the destination has no key registered (lanyard destination secret set)",
            ));
        }
        KeyState::NotBound => {
            return Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ReasonCode::DestinationUnavailable.as_str(),
                KEY_NOT_BOUND,
            ));
        }
        KeyState::Unopenable => {
            return Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ReasonCode::DestinationUnavailable.as_str(),
                "the destination's key does not open with this server's seal key: set it again with `lanyard destination secret set`",
            ));
        }
    };
    let max = config.settings.max_request_bytes;
    let too_large = || {
        Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ReasonCode::RequestTooLarge.as_str(),
            format!("the request body is larger than {max} bytes"),
        )
    };
    if let Some(len) = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > max
    {
        return Err(too_large());
    }
    let limit = usize::try_from(max).unwrap_or(usize::MAX);
    let client_timeout = proxy.0.settings.client_timeout;
    let bytes = tokio::time::timeout(client_timeout, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| {
            Refusal::new(
                StatusCode::REQUEST_TIMEOUT,
                PROXY_DENIED,
                format!(
                    "the request body did not arrive within {}",
                    humantime_duration(client_timeout)
                ),
            )
        })?
        .map_err(|_| too_large())?;
    record.bytes_in = bytes.len() as u64;
    let mut headers = forward_headers(&parts.headers, config);
    let mut value = HeaderValue::from_str(&config.key_value(key.expose()))
        .map_err(|_| Refusal::internal(&"the destination's key is not a valid header value"))?;
    value.set_sensitive(true);
    headers.insert(config.key_header.clone(), value);
    let url = config.upstream_url(&path, parts.uri.query());
    let upstream = proxy
        .0
        .client
        .request(parts.method.clone(), url)
        .headers(headers)
        .body(bytes)
        .send()
        .await
        .map_err(|e| {
            // Without the URL: it may hold the query.
            tracing::warn!(destination = %record.destination, error = %e.without_url(), "upstream request failed");
            Refusal::new(
                StatusCode::BAD_GATEWAY,
                ReasonCode::DestinationUnavailable.as_str(),
                "the upstream could not be reached",
            )
        })?;
    Ok(Sent {
        upstream,
        key,
        in_flight,
    })
}

fn humantime_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// Why a stream was cut.
const CUT_REVOKED: &str = "GRANT_REVOKED";
const CUT_TOO_LARGE: &str = "RESPONSE_TOO_LARGE";
const CUT_UPSTREAM: &str = "UPSTREAM_FAILED";
const CUT_CLIENT_GONE: &str = "CLIENT_GONE";
/// The client stopped taking the answer for `client_timeout`.
const CUT_CLIENT_STALLED: &str = "CLIENT_STALLED";
/// The upstream's answer carried the destination's key: refused (in a header) or cut
/// (in the body) before the key's last byte is sent.
const KEY_IN_RESPONSE: &str = "KEY_IN_RESPONSE";

/// How long a stream keeps going while its grant cannot be re-read from the store;
/// past it the stream is cut (fail closed).
const STORE_GRACE: Duration = Duration::from_secs(10);

/// How a streamed body ended, as the body stream sees it.
const RUNNING: u8 = 0;
const ENDED: u8 = 1;
const CUT: u8 = 2;

/// A grant being watched by a stream in flight.
struct GrantWatch {
    rt: Arc<Runtime>,
    grant: Option<GrantRecord>,
    changed: watch::Receiver<u64>,
    poll: tokio::time::Interval,
    /// Since when the store could not be read.
    failing_since: Option<Instant>,
}

impl GrantWatch {
    /// Wait for a reason to re-check the grant: a revocation recorded here, or the poll.
    async fn wake(&mut self) {
        tokio::select! {
            r = self.changed.changed() => {
                if r.is_err() {
                    // No more wake-ups: the poll alone decides.
                    std::future::pending::<()>().await;
                }
            }
            _ = self.poll.tick() => {}
        }
    }

    /// Whether the grant may still be used. A store that cannot be read keeps the
    /// stream going for [`STORE_GRACE`], then cuts it.
    async fn active(&mut self) -> bool {
        let Some(grant) = &self.grant else {
            return false;
        };
        match self.rt.store.grant_get(&grant.id).await {
            Ok(Some(g)) => {
                self.failing_since = None;
                grant_refusal(&self.rt, &g, self.rt.clock.now_unix()).is_none()
            }
            Ok(None) => false,
            Err(e) => {
                let now = Instant::now();
                let since = *self.failing_since.get_or_insert(now);
                let keep = within_grace(since, now);
                tracing::warn!(error = %e, keep, "could not re-check a streaming grant");
                keep
            }
        }
    }
}

/// Whether a stream whose grant could not be read since `since` may go on at `now`.
fn within_grace(since: Instant, now: Instant) -> bool {
    now.saturating_duration_since(since) < STORE_GRACE
}

/// Hand `bytes` to the client, racing the revocation watch and the client's idle
/// timeout, so a client that stops reading pins nothing.
async fn deliver(
    tx: &mpsc::Sender<Bytes>,
    bytes: Bytes,
    watch: &mut GrantWatch,
    idle: Duration,
) -> Result<(), &'static str> {
    let deadline = tokio::time::sleep(idle);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            permit = tx.reserve() => {
                return match permit {
                    Ok(p) => {
                        p.send(bytes);
                        Ok(())
                    }
                    Err(_) => Err(CUT_CLIENT_GONE),
                };
            }
            () = watch.wake() => {
                if !watch.active().await {
                    return Err(CUT_REVOKED);
                }
            }
            () = &mut deadline => return Err(CUT_CLIENT_STALLED),
        }
    }
}

/// Stream the upstream's answer back chunk by chunk from a task that also watches the
/// grant and looks for the key, and write the audit event when it ends.
fn stream_back(proxy: &Proxy, compiled: &Compiled, sent: Sent, record: Record) -> Response {
    let Sent {
        mut upstream,
        key,
        in_flight,
    } = sent;
    let rt = proxy.0.rt.clone();
    let status = upstream.status();
    let headers = match response_headers(
        upstream.headers(),
        &compiled.config,
        key.expose().as_bytes(),
    ) {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(destination = %record.destination, "the upstream's answer carries the destination's key in a header; refused");
            let refusal = Refusal::new(StatusCode::BAD_GATEWAY, KEY_IN_RESPONSE, e.to_string());
            record.finish(&rt, refusal.status.as_u16(), Some(KEY_IN_RESPONSE), None, 0);
            return refusal.response();
        }
    };
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let outcome = Arc::new(AtomicU8::new(RUNNING));
    let settings = proxy.0.settings.clone();
    let max = compiled.config.settings.max_response_bytes;
    let ended = outcome.clone();
    tokio::spawn(async move {
        let mut scan = KeyScanner::new(key.expose().as_bytes());
        drop(key);
        let mut poll = tokio::time::interval(settings.recheck_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.tick().await;
        let mut watch = GrantWatch {
            changed: rt.revocation_watch(),
            rt: rt.clone(),
            grant: record.grant.clone(),
            poll,
            failing_since: None,
        };
        let mut sent: u64 = 0;
        let cut = loop {
            tokio::select! {
                chunk = upstream.chunk() => match chunk {
                    Ok(Some(bytes)) => {
                        let n = bytes.len() as u64;
                        if sent.saturating_add(n) > max {
                            break Some(CUT_TOO_LARGE);
                        }
                        if scan.found_in(&bytes) {
                            break Some(KEY_IN_RESPONSE);
                        }
                        if let Err(c) = deliver(&tx, bytes, &mut watch, settings.client_timeout).await {
                            break Some(c);
                        }
                        sent = sent.saturating_add(n);
                    }
                    Ok(None) => break None,
                    Err(_) => break Some(CUT_UPSTREAM),
                },
                () = watch.wake() => {
                    if !watch.active().await {
                        break Some(CUT_REVOKED);
                    }
                }
                () = tx.closed() => break Some(CUT_CLIENT_GONE),
            }
        };
        // Before the sender goes: the body stream ends cleanly only after ENDED.
        ended.store(if cut.is_some() { CUT } else { ENDED }, Ordering::SeqCst);
        drop(tx);
        drop(upstream);
        drop(in_flight);
        if let Some(c) = cut {
            if c == KEY_IN_RESPONSE {
                tracing::error!(destination = %record.destination, "the upstream's answer carries the destination's key; cut");
            } else {
                tracing::info!(destination = %record.destination, cut = c, "proxied response cut");
            }
        }
        record.finish(&rt, status.as_u16(), None, cut, sent);
    });
    let body =
        futures::stream::unfold((rx, outcome, false), |(mut rx, outcome, over)| async move {
            if over {
                return None;
            }
            let cut = || std::io::Error::other("the answer was cut");
            if outcome.load(Ordering::SeqCst) == CUT {
                return Some((Err(cut()), (rx, outcome, true)));
            }
            match rx.recv().await {
                Some(_) if outcome.load(Ordering::SeqCst) == CUT => {
                    Some((Err(cut()), (rx, outcome, true)))
                }
                Some(bytes) => Some((Ok(bytes), (rx, outcome, false))),
                None if outcome.load(Ordering::SeqCst) == ENDED => None,
                None => Some((Err(cut()), (rx, outcome, true))),
            }
        });
    let mut resp = Response::new(Body::from_stream(body));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_take_the_raw_destination_and_path() {
        assert_eq!(
            route("/d/claude/v1/messages"),
            Some(("claude", "/v1/messages"))
        );
        assert_eq!(route("/d/claude"), Some(("claude", "")));
        assert_eq!(route("/d/claude/"), Some(("claude", "/")));
        assert_eq!(
            route("/d/claude/a%2f..%2fb"),
            Some(("claude", "/a%2f..%2fb"))
        );
        for bad in [
            "/",
            "/d",
            "/d/",
            "/x/claude/v1",
            "/d/Claude/v1",
            "/d/%63laude/v1",
            "/dd/claude",
        ] {
            assert_eq!(route(bad), None, "{bad}");
        }
    }

    #[test]
    fn refusals_are_json_with_the_reason_in_a_header() {
        let mut r = Refusal::new(StatusCode::TOO_MANY_REQUESTS, RATE_LIMITED, "slow down");
        r.retry_after = Some(7);
        let resp = r.response();
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["retry-after"], "7");
        assert_eq!(resp.headers()["lanyard-reason"], "RATE_LIMITED");
    }

    #[test]
    fn refusals_before_a_token_is_verified_are_summed_up_per_second() {
        let w = RefusalWindows::default();
        let t0 = Instant::now();
        assert_eq!(w.note("llm", "TOKEN_MALFORMED", t0), Note::Write(1));
        let at = t0 + UNVERIFIED_WINDOW;
        assert_eq!(w.note("llm", "TOKEN_MALFORMED", t0), Note::Schedule(at));
        for _ in 0..1000 {
            assert_eq!(w.note("llm", "TOKEN_MALFORMED", t0), Note::Counted);
        }
        // Another reason or destination has its own window.
        assert_eq!(w.note("llm", "PROXY_DENIED", t0), Note::Write(1));
        assert_eq!(w.note("other", "TOKEN_MALFORMED", t0), Note::Write(1));
        assert_eq!(w.flush("llm", "TOKEN_MALFORMED", at), 1001);
        // The flush opened a new window: the next one within it is scheduled again.
        assert_eq!(
            w.note("llm", "TOKEN_MALFORMED", at),
            Note::Schedule(at + UNVERIFIED_WINDOW)
        );
        assert_eq!(w.flush("llm", "TOKEN_MALFORMED", at + UNVERIFIED_WINDOW), 1);
        // A quiet second later, written at once with nothing pending.
        let later = at + 3 * UNVERIFIED_WINDOW;
        assert_eq!(w.note("llm", "TOKEN_MALFORMED", later), Note::Write(1));
        assert_eq!(w.flush("llm", "TOKEN_MALFORMED", later), 0);
    }

    #[test]
    fn a_store_that_cannot_be_read_cuts_streams_after_the_grace() {
        let since = Instant::now();
        assert!(within_grace(since, since));
        assert!(within_grace(since, since + STORE_GRACE / 2));
        assert!(!within_grace(since, since + STORE_GRACE));
        assert!(!within_grace(since, since + STORE_GRACE * 10));
    }

    #[test]
    fn a_stored_key_without_a_binding_still_parses() {
        let old: StoredSecret = serde_json::from_value(json!({
            "sealed": "x", "fingerprint": "hmac-sha256:00", "updated_at": 1
        }))
        .unwrap();
        assert!(old.binding.is_none(), "never sent: not bound to anything");
    }
}
