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
//!    own keys, retired ones included, `typ`, `iss`, `exp`, `nbf`), then `aud` must be
//!    this destination's proxy audience and its grant active, unexpired, of this
//!    destination and workload, and not refused by a deny entry or the destination's
//!    kill switch.
//! 4. The method and normalized path must match a rule of a granted scope; then the
//!    grant's token bucket ([`RateLimiter`]) must have a request left.
//! 5. The body (at most `max_request_bytes`) is forwarded with the workload's token and
//!    every header that could carry a key removed and the real key injected; the
//!    answer is streamed back chunk by chunk, never buffered, and cut when the grant
//!    stops being active ([`Runtime::revocation_watch`] wakes the stream; the store is
//!    polled every `recheck_interval` for changes made elsewhere).
//! 6. One `proxy.request` audit event per request, written through the committer after
//!    the answer ends, off the request's path: method, the matched rule's pattern
//!    (never the raw path or query), status, bytes in and out, grant, workload,
//!    destination, and the reason of a refusal or a cut. Never bodies, queries or keys.
//!
//! Refusals are JSON, shaped like the errors LLM SDKs already print:
//! `{"type": "error", "error": {"type": "lanyard_proxy_error", "reason": "GRANT_REVOKED",
//! "message": "..."}}`, with the reason also in the `lanyard-reason` header.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use lanyard_core::{ReasonCode, Secret};
use lanyard_destination_proxy::{
    KIND, ProxyConfig, ROUTE_PREFIX, RateLimiter, audience, check_request_headers, forward_headers,
    normalize_path, response_headers, take_token,
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
}

impl Default for ProxyListenSettings {
    fn default() -> Self {
        Self {
            listen: None,
            recheck_interval: Duration::from_secs(1),
            upstream_timeout: Duration::from_secs(300),
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
}

/// What binds a sealed key to its destination: moved to another record, it does not
/// open.
pub fn secret_aad(destination: &str) -> Vec<u8> {
    format!("lanyard-destination-secret:{destination}").into_bytes()
}

/// A stored key's status, never the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretStatus {
    /// Its fingerprint.
    pub fingerprint: String,
    /// When it was set, seconds.
    pub updated_at: i64,
    /// Who set it.
    pub updated_by: String,
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
    if rt
        .store
        .config_get(ConfigKind::Destination, destination)
        .await?
        .is_none()
    {
        return Err(ApiError::new(
            ReasonCode::NotFound,
            format!("no destination named {destination:?}; put it first"),
        ));
    }
    let before = rt
        .store
        .config_get(ConfigKind::DestinationSecret, destination)
        .await?
        .and_then(|o| serde_json::from_value::<StoredSecret>(o.spec).ok());
    let sealed = rt
        .sealer
        .seal(key.as_bytes(), &secret_aad(destination))
        .map_err(|e| ApiError::internal(&e))?;
    let fingerprint = rt.fingerprinter.fingerprint(key);
    let now = rt.clock.now_unix();
    let stored = StoredSecret {
        sealed,
        fingerprint: fingerprint.clone(),
        updated_at: now,
    };
    let mut ev = rt.event_for(DESTINATION_SECRET_PUT, ctx);
    ev.destination = Some(destination.to_owned());
    ev.detail = json!({
        "name": destination,
        "fingerprint": fingerprint,
        "previous_fingerprint": before.map(|b| b.fingerprint),
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
    Ok(Some(SecretStatus {
        fingerprint: stored.fingerprint,
        updated_at: stored.updated_at,
        updated_by: obj.updated_by,
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

/// A proxy destination as the listener uses it, rebuilt when the configuration moves.
struct Compiled {
    generation: i64,
    config: ProxyConfig,
    audience: String,
    /// The real key, opened once per configuration generation; `None` when none is set
    /// (or it does not open: logged).
    key: Option<Arc<Secret>>,
}

struct Inner {
    rt: Arc<Runtime>,
    client: reqwest::Client,
    limiter: RateLimiter,
    cache: Mutex<HashMap<String, Arc<Compiled>>>,
    recheck: Duration,
}

/// The proxy listener's shared state.
#[derive(Clone)]
pub struct Proxy(Arc<Inner>);

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
            recheck: settings.recheck_interval,
        })))
    }

    /// The router: every path goes to [`handle`], which reads the raw path itself
    /// (a router would decode it first).
    pub fn router(self) -> Router {
        Router::new().fallback(handle).with_state(self)
    }

    /// The compiled destination `name` of kind `proxy`, from the cache while the
    /// configuration generation has not moved.
    async fn compiled(&self, name: &str) -> Result<Option<Arc<Compiled>>, Refusal> {
        let snap = self.0.rt.snapshot();
        let Some(entry) = snap.destinations.get(name).filter(|e| e.spec.kind == KIND) else {
            return Ok(None);
        };
        if let Some(c) = self.cached(name)
            && c.generation == snap.generation
        {
            return Ok(Some(c));
        }
        let config = ProxyConfig::from_value(&entry.spec.settings, &entry.spec.scopes)
            .map_err(|e| Refusal::internal(&e))?;
        let key = match self
            .0
            .rt
            .store
            .config_get(ConfigKind::DestinationSecret, name)
            .await
        {
            Ok(Some(obj)) => serde_json::from_value::<StoredSecret>(obj.spec)
                .map_err(|e| e.to_string())
                .and_then(|s| {
                    self.0
                        .rt
                        .sealer
                        .open(&s.sealed, &secret_aad(name))
                        .map_err(|e| e.to_string())
                })
                .map_err(|e| {
                    tracing::error!(destination = name, error = %e, "the destination's key does not open; set it again");
                })
                .ok()
                .map(Arc::new),
            Ok(None) => None,
            Err(e) => return Err(ApiError::from(e).into()),
        };
        let compiled = Arc::new(Compiled {
            generation: snap.generation,
            audience: audience(self.0.rt.minter.issuer_url(), name),
            config,
            key,
        });
        match self.0.cache.lock() {
            Ok(mut g) => g.insert(name.to_owned(), compiled.clone()),
            Err(p) => p.into_inner().insert(name.to_owned(), compiled.clone()),
        };
        Ok(Some(compiled))
    }

    fn cached(&self, name: &str) -> Option<Arc<Compiled>> {
        match self.0.cache.lock() {
            Ok(g) => g.get(name).cloned(),
            Err(p) => p.into_inner().get(name).cloned(),
        }
    }
}

/// Serve the proxy on `listener` until `shutdown` turns true.
pub async fn serve(
    proxy: Proxy,
    listener: tokio::net::TcpListener,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    axum::serve(listener, proxy.router())
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|v| *v).await;
        })
        .await
}

/// A refusal: status, stable reason, message for the workload.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    reason: &'static str,
    message: String,
    retry_after: Option<u64>,
}

impl Refusal {
    fn new(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            reason,
            message: message.into(),
            retry_after: None,
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
    rt.deny_check(&grant.workload_id, &grant.issuer)
        .or_else(|| rt.destination_check(&grant.destination))
        .map(Refusal::from)
}

/// What one request did, for its audit event.
struct Record {
    request_id: String,
    destination: String,
    method: String,
    rule: Option<String>,
    grant: Option<GrantRecord>,
    bytes_in: u64,
    started: Instant,
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
        rt.metrics
            .proxy_request(&self.destination, refusal.or(cut).unwrap_or("ok"));
        let mut ev = rt.event_for(PROXY_REQUEST, &ctx);
        ev.destination = Some(self.destination);
        if let Some(g) = &self.grant {
            ev.actor = Some(g.workload_id.clone());
            ev.workload_id = Some(g.workload_id.clone());
            ev.issuer = Some(g.issuer.clone());
            ev.task_id = g.task_id.clone();
            ev.grant_id = Some(g.id.to_string());
            ev.scopes = g.scopes.clone();
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
        let rt = rt.clone();
        tokio::spawn(async move {
            if let Err(e) = rt.committer.commit(None, ev).await {
                tracing::warn!(error = %e.message, "proxy.request audit event not written");
            }
        });
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
        bytes_in: 0,
        started: Instant::now(),
    };
    let rt = proxy.0.rt.clone();
    match forward(&proxy, &compiled, &tail, req, &mut record).await {
        Ok(upstream) => stream_back(&proxy, &compiled, upstream, record),
        Err(refusal) => {
            tracing::debug!(
                destination = %record.destination,
                reason = refusal.reason,
                message = %refusal.message,
                "proxy request refused"
            );
            record.finish(&rt, refusal.status.as_u16(), Some(refusal.reason), None, 0);
            refusal.response()
        }
    }
}

/// Check the request and send it upstream; the upstream's answer (headers read).
async fn forward(
    proxy: &Proxy,
    compiled: &Compiled,
    tail: &str,
    req: Request,
    record: &mut Record,
) -> Result<reqwest::Response, Refusal> {
    let rt = &proxy.0.rt;
    let config = &compiled.config;
    let (parts, body) = req.into_parts();
    check_request_headers(&parts.headers, config).map_err(|e| Refusal::denied(e.to_string()))?;
    let path = normalize_path(tail).map_err(|e| Refusal::denied(e.to_string()))?;
    let token = take_token(&parts.headers, config).map_err(|e| {
        Refusal::new(
            StatusCode::UNAUTHORIZED,
            ReasonCode::TokenMalformed.as_str(),
            e.to_string(),
        )
    })?;
    let now = rt.clock.now_unix();
    let verified = verify_token(
        &rt.keys.all_public_jwks(),
        rt.minter.issuer_url(),
        token,
        now,
    )
    .map_err(token_refusal)?;
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
    if let Err(wait) = proxy.0.limiter.check(
        grant.id.as_str(),
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
    let Some(key) = compiled.key.clone() else {
        return Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ReasonCode::DestinationUnavailable.as_str(),
            "the destination has no key registered (lanyard destination secret set)",
        ));
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
    let bytes = axum::body::to_bytes(body, limit)
        .await
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
    Ok(upstream)
}

/// Why a stream was cut.
const CUT_REVOKED: &str = "GRANT_REVOKED";
const CUT_TOO_LARGE: &str = "RESPONSE_TOO_LARGE";
const CUT_UPSTREAM: &str = "UPSTREAM_FAILED";
const CUT_CLIENT_GONE: &str = "CLIENT_GONE";

/// Stream the upstream's answer back chunk by chunk from a task that also watches the
/// grant, and write the audit event when it ends.
fn stream_back(
    proxy: &Proxy,
    compiled: &Compiled,
    mut upstream: reqwest::Response,
    record: Record,
) -> Response {
    let status = upstream.status();
    let headers = response_headers(upstream.headers());
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let rt = proxy.0.rt.clone();
    let recheck = proxy.0.recheck;
    let max = compiled.config.settings.max_response_bytes;
    tokio::spawn(async move {
        let mut changed = rt.revocation_watch();
        let mut poll = tokio::time::interval(recheck);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.tick().await;
        let mut sent: u64 = 0;
        let cut = loop {
            tokio::select! {
                chunk = upstream.chunk() => match chunk {
                    Ok(Some(bytes)) => {
                        let n = bytes.len() as u64;
                        if sent.saturating_add(n) > max {
                            let _ = tx.send(Err(std::io::Error::other("response too large"))).await;
                            break Some(CUT_TOO_LARGE);
                        }
                        if tx.send(Ok(bytes)).await.is_err() {
                            break Some(CUT_CLIENT_GONE);
                        }
                        sent = sent.saturating_add(n);
                    }
                    Ok(None) => break None,
                    Err(_) => {
                        let _ = tx.send(Err(std::io::Error::other("upstream failed"))).await;
                        break Some(CUT_UPSTREAM);
                    }
                },
                _ = changed.changed() => {
                    if !still_active(&rt, record.grant.as_ref()).await {
                        let _ = tx.send(Err(std::io::Error::other("grant revoked"))).await;
                        break Some(CUT_REVOKED);
                    }
                }
                _ = poll.tick() => {
                    if !still_active(&rt, record.grant.as_ref()).await {
                        let _ = tx.send(Err(std::io::Error::other("grant revoked"))).await;
                        break Some(CUT_REVOKED);
                    }
                }
                () = tx.closed() => break Some(CUT_CLIENT_GONE),
            }
        };
        if let Some(c) = cut {
            tracing::info!(destination = %record.destination, cut = c, "proxied response cut");
        }
        record.finish(&rt, status.as_u16(), None, cut, sent);
    });
    let mut resp = Response::new(Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// Whether the grant of a stream in flight may still be used. A store that cannot be
/// read keeps the stream going (logged): the next check decides.
async fn still_active(rt: &Runtime, grant: Option<&GrantRecord>) -> bool {
    let Some(grant) = grant else {
        return false;
    };
    match rt.store.grant_get(&grant.id).await {
        Ok(Some(g)) => grant_refusal(rt, &g, rt.clock.now_unix()).is_none(),
        Ok(None) => false,
        Err(e) => {
            tracing::warn!(error = %e, "could not re-check a streaming grant; keeping the stream");
            true
        }
    }
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
}
