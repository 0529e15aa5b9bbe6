//! HTTP plumbing shared by every adapter that calls a destination over HTTP: the
//! endpoint rule (https, or http on loopback only), one way to build a `reqwest` client,
//! a POST helper with a hard response-size cap that maps every failure to a
//! [`DestinationError::Upstream`], retries with backoff, and a [`CircuitBreaker`] so one
//! failing destination fails fast instead of slowing exchanges for the others.
//!
//! # Error mapping
//! | what happened                                   | `retryable` | message |
//! |-------------------------------------------------|-------------|---------|
//! | connect failure, reset, timeout                 | `true`      | `request to <host> timed out after Ns` / `could not reach <host>` |
//! | HTTP 408, 429, 5xx                              | `true`      | `<host> answered http 503[: <oauth error>[: <description>]]` |
//! | other HTTP 4xx                                  | `false`     | `<host> answered http 400: invalid_grant: <description>` |
//! | redirect (never followed), other non-2xx        | `false`     | `<host> answered http 302` |
//! | response larger than the cap                    | `false`     | `response from <host> exceeds N bytes` |
//! | circuit open                                    | `true`      | `<name> is failing (N consecutive failures); not calling it for Ns` |
//!
//! The OAuth `error` code (RFC 6749 §5.2) is passed through only if it is made of the
//! characters §5.2 allows; `error_description` is cut to [`MAX_DESCRIPTION_CHARS`],
//! stripped of control characters, and words that look like tokens (`eyJ...` JWTs,
//! `sk-ant-...` keys) are replaced by `[redacted]`. Request bodies, assertions and
//! tokens never appear in a message.
//!
//! ## Why no redirects
//! A token endpoint that redirects is misconfigured or hijacked; following it would send
//! the assertion to another host.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use lanyard_core::SharedClock;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap, HeaderValue};
use reqwest::{Client, StatusCode, Url, redirect};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::DestinationError;

/// Longest `error_description` passed through, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 200;
/// Longest OAuth `error` code passed through.
pub const MAX_ERROR_CODE_LEN: usize = 64;

// === endpoint rule ===

/// Parse `url` and accept it only if it is `https`, or `http` to a loopback host
/// (`127.0.0.0/8`, `[::1]`, `localhost`). The `Err` is a message for the operator, to
/// put in [`DestinationError::InvalidSettings`].
///
/// # Errors
/// Not a URL, no host, credentials in the URL, another scheme, or `http` elsewhere.
pub fn check_endpoint(url: &str) -> Result<Url, String> {
    let parsed = Url::parse(url).map_err(|e| format!("{url:?} is not a valid url: {e}"))?;
    if parsed.host().is_none() {
        return Err(format!("{url:?} has no host"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(format!(
            "{:?} must not carry credentials",
            parsed.host_str().unwrap_or_default()
        ));
    }
    match parsed.scheme() {
        "https" => Ok(parsed),
        "http" if is_loopback(&parsed) => Ok(parsed),
        "http" => Err(format!(
            "{url:?} is refused: https is required except for loopback hosts (127.0.0.1, [::1], localhost)"
        )),
        other => Err(format!(
            "{url:?} has scheme {other:?}; only https (or http on loopback) is allowed"
        )),
    }
}

/// Whether `url`'s host is a loopback address or `localhost`.
pub fn is_loopback(url: &Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost") || host.eq_ignore_ascii_case("localhost."),
    }
}

// === client ===

/// How an adapter's HTTP client behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSettings {
    /// Longest a whole request may take, connect to last body byte.
    pub timeout: Duration,
    /// Longest the TCP + TLS connect may take (at most `timeout`).
    pub connect_timeout: Duration,
    /// Outbound proxy. `None`: connect directly, ignoring `HTTPS_PROXY` and friends, so
    /// a process environment cannot silently route assertions through a proxy.
    pub proxy: Option<Url>,
    /// `User-Agent` header.
    pub user_agent: String,
}

impl ClientSettings {
    /// Direct connections, `timeout` total, connect bounded by `min(timeout, 10 s)`.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            connect_timeout: timeout.min(Duration::from_secs(10)),
            proxy: None,
            user_agent: concat!("lanyard/", env!("CARGO_PKG_VERSION")).to_owned(),
        }
    }
}

/// Build a client: rustls, no redirects, the given timeouts and proxy.
///
/// # Errors
/// [`DestinationError::InvalidSettings`] (kind `kind`) if the client cannot be built.
pub fn build_client(kind: &str, s: &ClientSettings) -> Result<Client, DestinationError> {
    let bad = |message: String| DestinationError::InvalidSettings {
        kind: kind.to_owned(),
        message,
    };
    let mut b = Client::builder()
        .timeout(s.timeout)
        .connect_timeout(s.connect_timeout.min(s.timeout))
        .redirect(redirect::Policy::none())
        .user_agent(s.user_agent.clone());
    b = match &s.proxy {
        Some(p) => b.proxy(reqwest::Proxy::all(p.clone()).map_err(|e| bad(format!("proxy: {e}")))?),
        None => b.no_proxy(),
    };
    b.build()
        .map_err(|e| bad(format!("cannot build http client: {e}")))
}

// === POST ===

/// A request body.
#[derive(Debug, Clone, Copy)]
pub enum Body<'a> {
    /// `application/json`.
    Json(&'a Value),
    /// `application/x-www-form-urlencoded`.
    Form(&'a [(&'a str, &'a str)]),
}

/// POST `body` to `url` with `headers`, and return the body of a 2xx answer, at most
/// `max_response_bytes` long. Sends `Accept: application/json`. Not retried here: see
/// [`retry`].
///
/// # Errors
/// [`DestinationError::Upstream`] as the module's table says.
pub async fn post(
    client: &Client,
    url: &Url,
    headers: HeaderMap,
    body: Body<'_>,
    max_response_bytes: usize,
) -> Result<Vec<u8>, DestinationError> {
    let host = host_of(url);
    let mut req = client
        .post(url.clone())
        .headers(headers)
        .header(ACCEPT, HeaderValue::from_static("application/json"));
    req = match body {
        Body::Json(v) => req
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(serde_json::to_vec(v).unwrap_or_default()),
        Body::Form(pairs) => req.form(pairs),
    };
    let mut resp = req.send().await.map_err(|e| transport_error(&host, &e))?;
    let status = resp.status();
    match (
        status.is_success(),
        read_capped(&mut resp, &host, max_response_bytes).await?,
    ) {
        (true, Some(buf)) => Ok(buf),
        (true, None) => Err(too_large(&host, max_response_bytes)),
        (false, buf) => Err(status_error(&host, status, buf.as_deref().unwrap_or(&[]))),
    }
}

/// The body of `resp` (from `host`), or `None` if it is longer than `max` bytes (said
/// by `Content-Length`, or found while reading: then reading stops).
///
/// # Errors
/// [`transport_error`] if reading fails.
pub async fn read_capped(
    resp: &mut reqwest::Response,
    host: &str,
    max: usize,
) -> Result<Option<Vec<u8>>, DestinationError> {
    if resp
        .content_length()
        .is_some_and(|n| n > u64::try_from(max).unwrap_or(u64::MAX))
    {
        return Ok(None);
    }
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| transport_error(host, &e))? {
        if buf.len().saturating_add(chunk.len()) > max {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Some(buf))
}

/// A successful answer from `host` longer than `max` bytes (not retryable).
pub fn too_large(host: &str, max: usize) -> DestinationError {
    DestinationError::Upstream {
        message: format!("response from {host} exceeds {max} bytes"),
        retryable: false,
    }
}

/// Parse a successful body as `T`.
///
/// # Errors
/// [`DestinationError::Upstream`] (not retryable) naming `what`, never the body.
pub fn parse_json<T: DeserializeOwned>(
    body: &[u8],
    url: &Url,
    what: &str,
) -> Result<T, DestinationError> {
    serde_json::from_slice(body).map_err(|e| DestinationError::Upstream {
        message: format!(
            "{} answered with a malformed {what} ({})",
            host_of(url),
            json_error_kind(&e)
        ),
        retryable: false,
    })
}

/// What kind of JSON error `e` is, without quoting the input.
fn json_error_kind(e: &serde_json::Error) -> &'static str {
    match e.classify() {
        serde_json::error::Category::Io => "io error",
        serde_json::error::Category::Syntax => "not json",
        serde_json::error::Category::Data => "unexpected shape",
        serde_json::error::Category::Eof => "truncated json",
    }
}

/// Map a transport failure (no HTTP answer from `host`) to a retryable error.
pub fn transport_error(host: &str, e: &reqwest::Error) -> DestinationError {
    let what = if e.is_timeout() {
        format!("request to {host} timed out")
    } else if e.is_connect() {
        format!("could not connect to {host}")
    } else if e.is_body() || e.is_decode() {
        format!("reading the response from {host} failed")
    } else {
        format!("request to {host} failed")
    };
    DestinationError::Upstream {
        message: what,
        retryable: true,
    }
}

/// Map a non-2xx answer to an error, passing the OAuth error code through.
pub fn status_error(host: &str, status: StatusCode, body: &[u8]) -> DestinationError {
    let retryable = status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
        || status.is_server_error();
    let mut message = format!("{host} answered http {}", status.as_u16());
    if let Some((code, description)) = oauth_error(body) {
        message.push_str(": ");
        message.push_str(&code);
        if let Some(d) = description {
            message.push_str(": ");
            message.push_str(&d);
        }
    }
    DestinationError::Upstream { message, retryable }
}

/// The RFC 6749 §5.2 `error` code and sanitized `error_description` of an error body,
/// if it is one. The code is dropped unless it uses only the characters §5.2 allows.
pub fn oauth_error(body: &[u8]) -> Option<(String, Option<String>)> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let code = v.get("error")?;
    // Some APIs nest: {"error": {"type": "...", "message": "..."}}, and Google's APIs
    // {"error": {"code": 403, "message": "...", "status": "PERMISSION_DENIED"}}.
    let (code, desc) = match code {
        Value::String(s) => (
            s.as_str(),
            v.get("error_description").and_then(Value::as_str),
        ),
        Value::Object(o) => (
            o.get("type")
                .or_else(|| o.get("status"))
                .and_then(Value::as_str)?,
            o.get("message").and_then(Value::as_str),
        ),
        _ => return None,
    };
    let code_ok = !code.is_empty()
        && code.len() <= MAX_ERROR_CODE_LEN
        && code
            .bytes()
            .all(|b| matches!(b, 0x20..=0x21 | 0x23..=0x5B | 0x5D..=0x7E));
    if !code_ok {
        return None;
    }
    let desc = desc.map(sanitize_description).filter(|d| !d.is_empty());
    Some((code.to_owned(), desc))
}

/// Cut `s` to [`MAX_DESCRIPTION_CHARS`], replace control characters with spaces, and
/// redact words that look like tokens.
pub fn sanitize_description(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let words: Vec<String> = cleaned
        .split(' ')
        .filter(|w| !w.is_empty())
        .map(|w| {
            let bare = w.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '-');
            if bare.starts_with("eyJ") || bare.starts_with("sk-ant-") || bare.len() > 80 {
                "[redacted]".to_owned()
            } else {
                w.to_owned()
            }
        })
        .collect();
    let joined = words.join(" ");
    let mut out: String = joined.chars().take(MAX_DESCRIPTION_CHARS).collect();
    if joined.chars().count() > MAX_DESCRIPTION_CHARS {
        out.push('…');
    }
    out
}

/// The host (and port, if any) of `url`, for messages.
pub fn host_of(url: &Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_owned(),
        _ => "destination".to_owned(),
    }
}

// === retries ===

/// How an idempotent call is retried: only [`DestinationError::Upstream`] errors with
/// `retryable: true`, at most `max_attempts` attempts in all, waiting
/// `min(max_delay, base_delay * 2^(n-1))` with full jitter before attempt `n + 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, at least 1 (1 means no retry).
    pub max_attempts: u32,
    /// First backoff.
    pub base_delay: Duration,
    /// Longest backoff.
    pub max_delay: Duration,
}

impl RetryPolicy {
    /// No retries.
    pub const NONE: RetryPolicy = RetryPolicy {
        max_attempts: 1,
        base_delay: Duration::ZERO,
        max_delay: Duration::ZERO,
    };

    /// The wait before attempt `attempt + 1` (`attempt` counts from 1), before jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1).min(16))
            .unwrap_or(u32::MAX);
        self.base_delay.saturating_mul(factor).min(self.max_delay)
    }
}

/// Whether `e` may succeed if tried again.
pub fn is_retryable(e: &DestinationError) -> bool {
    matches!(
        e,
        DestinationError::Upstream {
            retryable: true,
            ..
        }
    )
}

/// Run `call(attempt)` (attempt counts from 1) through `breaker`, retrying per `policy`.
/// `call` must be safe to repeat: an adapter whose request is single-use (a `jti`
/// assertion) builds a fresh request inside `call` on every attempt. The breaker is
/// asked before each attempt, so an open circuit stops the retries at once.
///
/// # Errors
/// The last attempt's error, or the breaker's fail-fast error.
pub async fn retry<T, F, Fut>(
    policy: RetryPolicy,
    breaker: &CircuitBreaker,
    mut call: F,
) -> Result<T, DestinationError>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, DestinationError>>,
{
    let mut attempt = 1u32;
    loop {
        let permit = breaker.permit()?;
        let result = call(attempt).await;
        permit.record(&result);
        match result {
            Err(e) if is_retryable(&e) && attempt < policy.max_attempts.max(1) => {
                let cap = policy.backoff(attempt);
                let wait = jitter(cap);
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                attempt = attempt.saturating_add(1);
            }
            other => return other,
        }
    }
}

/// [`retry`] for a call that mints a fresh, single-use JWT on every attempt:
/// `call(iat)` gets the attempt's issue time, `now` (when the exchange began, from
/// lanyard's clock) plus the whole seconds elapsed since `started`.
///
/// # Errors
/// As [`retry`].
pub async fn retry_minting<T, F, Fut>(
    policy: RetryPolicy,
    breaker: &CircuitBreaker,
    now: lanyard_core::UnixTime,
    started: tokio::time::Instant,
    mut call: F,
) -> Result<T, DestinationError>
where
    F: FnMut(lanyard_core::UnixTime) -> Fut,
    Fut: Future<Output = Result<T, DestinationError>>,
{
    retry(policy, breaker, |_attempt| {
        // A fresh JWT (new jti, iat = now) per attempt: never replayed.
        let elapsed = i64::try_from(started.elapsed().as_secs()).unwrap_or(i64::MAX);
        call(now.saturating_add(elapsed))
    })
    .await
}

/// A uniformly random duration in `[cap/2, cap]`.
fn jitter(cap: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    if cap.is_zero() {
        return cap;
    }
    let half = cap / 2;
    let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
    // RandomState is seeded randomly per instance: enough randomness for jitter, no dep.
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    half + Duration::from_nanos(r % nanos.saturating_add(1))
}

// === circuit breaker ===

/// A circuit breaker for one destination: after `threshold` consecutive retryable
/// failures it opens for `cooldown` and refuses calls at once; then it lets exactly one
/// trial call through (half-open): success closes it, failure opens it again. Errors
/// that are not retryable (the destination answered, e.g. `invalid_grant`) count as
/// success: the destination is up.
#[derive(Debug)]
pub struct CircuitBreaker {
    name: String,
    threshold: u32,
    cooldown: Duration,
    clock: SharedClock,
    state: Mutex<BreakerState>,
}

/// Where a [`CircuitBreaker`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls flow; `failures` consecutive retryable failures so far.
    Closed {
        /// Consecutive retryable failures.
        failures: u32,
    },
    /// Calls are refused until `until_millis` (Unix milliseconds).
    Open {
        /// When the cool-down ends.
        until_millis: i64,
    },
    /// The cool-down ended; one trial call is (or may be) in flight.
    HalfOpen {
        /// Whether the trial call is out.
        trial_in_flight: bool,
    },
}

impl CircuitBreaker {
    /// A closed breaker named `name` (used in its fail-fast message). `threshold` is at
    /// least 1.
    pub fn new(name: &str, threshold: u32, cooldown: Duration, clock: SharedClock) -> Self {
        Self {
            name: name.to_owned(),
            threshold: threshold.max(1),
            cooldown,
            clock,
            state: Mutex::new(BreakerState::Closed { failures: 0 }),
        }
    }

    /// The current state (after moving an expired `Open` to `HalfOpen`).
    pub fn state(&self) -> BreakerState {
        let now = self.clock.now_unix_millis();
        let mut s = self.lock();
        if let BreakerState::Open { until_millis } = *s
            && now >= until_millis
        {
            *s = BreakerState::HalfOpen {
                trial_in_flight: false,
            };
        }
        *s
    }

    /// Ask to make a call. Record its outcome on the permit.
    ///
    /// # Errors
    /// [`DestinationError::Upstream`] (retryable) while the breaker is open, or while a
    /// half-open trial is in flight.
    pub fn permit(&self) -> Result<Permit<'_>, DestinationError> {
        let now = self.clock.now_unix_millis();
        let mut s = self.lock();
        match *s {
            BreakerState::Closed { .. } => Ok(Permit {
                breaker: self,
                trial: false,
                done: false,
            }),
            BreakerState::Open { until_millis } if now < until_millis => {
                let secs = (until_millis - now + 999) / 1000;
                Err(DestinationError::Upstream {
                    message: format!(
                        "{} is failing ({} consecutive failures); not calling it for {secs}s",
                        self.name, self.threshold
                    ),
                    retryable: true,
                })
            }
            BreakerState::Open { .. }
            | BreakerState::HalfOpen {
                trial_in_flight: false,
            } => {
                *s = BreakerState::HalfOpen {
                    trial_in_flight: true,
                };
                Ok(Permit {
                    breaker: self,
                    trial: true,
                    done: false,
                })
            }
            BreakerState::HalfOpen {
                trial_in_flight: true,
            } => Err(DestinationError::Upstream {
                message: format!(
                    "{} is failing; a trial call is in flight, not calling it again yet",
                    self.name
                ),
                retryable: true,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        // A poisoned lock only means a panic elsewhere; the state is still a valid enum.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn on_success(&self) {
        let mut s = self.lock();
        if !matches!(*s, BreakerState::Closed { .. }) {
            tracing::info!(breaker = %self.name, "circuit closed: the trial call succeeded");
        }
        *s = BreakerState::Closed { failures: 0 };
    }

    fn on_failure(&self, trial: bool) {
        let now = self.clock.now_unix_millis();
        let open = BreakerState::Open {
            until_millis: now
                .saturating_add(i64::try_from(self.cooldown.as_millis()).unwrap_or(i64::MAX)),
        };
        let mut s = self.lock();
        let was_open = matches!(*s, BreakerState::Open { .. });
        *s = match *s {
            _ if trial => open,
            BreakerState::Closed { failures } => {
                let failures = failures.saturating_add(1);
                if failures >= self.threshold {
                    open
                } else {
                    BreakerState::Closed { failures }
                }
            }
            // A call admitted while closed failed after the breaker opened: keep it open.
            other => other,
        };
        if !was_open && matches!(*s, BreakerState::Open { .. }) {
            // Once per opening, not per refused call.
            tracing::warn!(
                breaker = %self.name,
                cooldown_secs = self.cooldown.as_secs(),
                trial,
                "circuit opened: failing fast until the cool-down ends"
            );
        }
    }

    fn on_abandoned(&self, trial: bool) {
        if trial {
            let mut s = self.lock();
            if *s
                == (BreakerState::HalfOpen {
                    trial_in_flight: true,
                })
            {
                *s = BreakerState::HalfOpen {
                    trial_in_flight: false,
                };
            }
        }
    }
}

/// Leave to make one call through a [`CircuitBreaker`]. Dropping it without
/// [`Permit::record`] (a cancelled call) frees a half-open trial slot and counts nothing.
#[derive(Debug)]
pub struct Permit<'a> {
    breaker: &'a CircuitBreaker,
    trial: bool,
    done: bool,
}

impl Permit<'_> {
    /// Record the call's outcome: a retryable error is a failure, anything else success.
    pub fn record<T>(mut self, result: &Result<T, DestinationError>) {
        self.done = true;
        match result {
            Err(e) if is_retryable(e) => self.breaker.on_failure(self.trial),
            _ => self.breaker.on_success(),
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.breaker.on_abandoned(self.trial);
        }
    }
}

/// RFC 8693 type of an OAuth access token.
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

/// An access token a destination issued, handed out as `Authorization: Bearer`. It
/// expires `expires_in` seconds after it was received: `now` (when the exchange began)
/// plus the time spent asking, rounded up so the recorded expiry is never early.
pub fn bearer_issued(
    token: String,
    now: lanyard_core::UnixTime,
    spent: Duration,
    expires_in: u64,
    revocation_handle: String,
) -> crate::Issued {
    let spent = spent
        .as_secs()
        .saturating_add(u64::from(spent.subsec_nanos() > 0));
    crate::Issued {
        credential: crate::Credential::Bearer {
            token: lanyard_core::Secret::new(token),
            token_type: "Bearer".into(),
            issued_token_type: ACCESS_TOKEN_TYPE.into(),
            header: "authorization".into(),
        },
        expires_at: now
            .saturating_add(i64::try_from(spent.saturating_add(expires_in)).unwrap_or(i64::MAX)),
        revocation_handle,
    }
}

/// An answer lanyard refuses to hand out (not retryable): incomplete, malformed, or a
/// token living too long.
pub fn refused(message: String) -> DestinationError {
    DestinationError::Upstream {
        message,
        retryable: false,
    }
}

/// Refuse a token from `host` living `expires_in` seconds when the destination's
/// `max_token_lifetime_secs` is set and lower.
///
/// # Errors
/// [`refused`]: `<host> issued a token living Ns, more than max_token_lifetime_secs Ms`.
pub fn check_max_lifetime(
    host: &str,
    expires_in: u64,
    max_token_lifetime_secs: Option<u64>,
) -> Result<(), DestinationError> {
    match max_token_lifetime_secs {
        Some(max) if expires_in > max => Err(refused(format!(
            "{host} issued a token living {expires_in}s, more than max_token_lifetime_secs {max}s"
        ))),
        _ => Ok(()),
    }
}

/// The receipt of a destination that cannot revoke a token early: `why` (e.g. "Claude
/// access tokens cannot be revoked at the destination"), then the residual lifetime.
pub fn lapses_at_expiry(req: &crate::RevokeRequest<'_>, why: &str) -> crate::RevokeOutcome {
    let residual = req.expires_at.saturating_sub(req.now).max(0);
    crate::RevokeOutcome::ExpiresAt {
        at: req.expires_at,
        detail: format!(
            "{why}; lanyard issues no new token for this grant, and the issued one stays valid until it expires ({residual}s after revocation)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use axum::Router;
    use axum::http::StatusCode as AxStatus;
    use axum::response::IntoResponse;
    use axum::routing::post as axpost;
    use lanyard_core::FakeClock;

    use super::*;

    #[test]
    fn endpoint_rule() {
        for ok in [
            "https://api.anthropic.com/v1/oauth/token",
            "http://127.0.0.1:8080/t",
            "http://127.9.9.9/t",
            "http://[::1]:1/x",
            "http://localhost:1/x",
            "http://LOCALHOST/x",
        ] {
            assert!(check_endpoint(ok).is_ok(), "{ok}");
        }
        for (bad, want) in [
            ("http://api.anthropic.com/t", "https is required"),
            ("http://10.0.0.1/t", "https is required"),
            ("http://localhost.evil.example/x", "https is required"),
            ("http://[::2]/x", "https is required"),
            ("ftp://x/y", "scheme"),
            ("file:///etc/passwd", "no host"),
            ("nonsense", "not a valid url"),
            ("https://user:pw@x.example/t", "credentials"),
        ] {
            let err = check_endpoint(bad).unwrap_err();
            assert!(err.contains(want), "{bad}: {err}");
            assert!(!err.contains("pw@"), "{err}");
        }
    }

    #[test]
    fn oauth_errors_are_passed_through_sanitized() {
        let (c, d) = oauth_error(
            br#"{"error":"invalid_grant","error_description":"bad\nassertion eyJhbGciOi.x.y here"}"#,
        )
        .unwrap();
        assert_eq!(c, "invalid_grant");
        assert_eq!(d.unwrap(), "bad assertion [redacted] here");
        let (c, d) =
            oauth_error(br#"{"error":{"type":"rate_limit_error","message":"slow"}}"#).unwrap();
        assert_eq!(
            (c.as_str(), d.as_deref()),
            ("rate_limit_error", Some("slow"))
        );
        let (c, d) = oauth_error(
            br#"{"error":{"code":403,"message":"Permission denied","status":"PERMISSION_DENIED"}}"#,
        )
        .unwrap();
        assert_eq!(
            (c.as_str(), d.as_deref()),
            ("PERMISSION_DENIED", Some("Permission denied"))
        );
        assert!(oauth_error(br#"{"error":"bad\"code"}"#).is_none());
        assert!(oauth_error(br#"{"error":"a\u0001"}"#).is_none());
        assert!(oauth_error(b"<html>").is_none());
        let long = "x ".repeat(500);
        let d = sanitize_description(&long);
        assert!(d.chars().count() <= MAX_DESCRIPTION_CHARS + 1);
        assert_eq!(
            sanitize_description("key sk-ant-oat01-abc leaked"),
            "key [redacted] leaked"
        );
        let e = status_error(
            "h",
            StatusCode::BAD_REQUEST,
            br#"{"error":"invalid_request"}"#,
        );
        assert!(
            matches!(&e, DestinationError::Upstream { message, retryable: false } if message == "h answered http 400: invalid_request"),
            "{e:?}"
        );
        for s in [429u16, 500, 502, 503, 408] {
            let e = status_error("h", StatusCode::from_u16(s).unwrap(), b"");
            assert!(is_retryable(&e), "{s}");
        }
        for s in [400u16, 401, 403, 404, 302] {
            let e = status_error("h", StatusCode::from_u16(s).unwrap(), b"");
            assert!(!is_retryable(&e), "{s}");
        }
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let p = RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(350),
        };
        assert_eq!(p.backoff(1), Duration::from_millis(100));
        assert_eq!(p.backoff(2), Duration::from_millis(200));
        assert_eq!(p.backoff(3), Duration::from_millis(350));
        assert_eq!(p.backoff(40), Duration::from_millis(350));
        for _ in 0..100 {
            let j = jitter(Duration::from_millis(100));
            assert!(j >= Duration::from_millis(50) && j <= Duration::from_millis(100));
        }
    }

    fn upstream(retryable: bool) -> Result<(), DestinationError> {
        Err(DestinationError::Upstream {
            message: "x".into(),
            retryable,
        })
    }

    #[test]
    fn breaker_opens_fails_fast_and_half_opens_once() {
        let clock = FakeClock::at(1_000);
        let b = CircuitBreaker::new(
            "claude-prod",
            3,
            Duration::from_secs(30),
            Arc::new(clock.clone()),
        );
        // Non-retryable errors and successes keep it closed and reset the count.
        for _ in 0..5 {
            b.permit().unwrap().record(&upstream(false));
        }
        b.permit().unwrap().record(&upstream(true));
        b.permit().unwrap().record(&upstream(true));
        b.permit().unwrap().record(&Ok::<(), DestinationError>(()));
        assert_eq!(b.state(), BreakerState::Closed { failures: 0 });
        for _ in 0..3 {
            b.permit().unwrap().record(&upstream(true));
        }
        assert!(matches!(b.state(), BreakerState::Open { .. }));
        let err = b.permit().unwrap_err();
        assert!(is_retryable(&err));
        assert!(err.to_string().contains("claude-prod is failing"), "{err}");
        assert!(err.to_string().contains("30s"), "{err}");
        clock.advance(29);
        assert!(b.permit().is_err());
        clock.advance(1);
        // One trial only.
        let trial = b.permit().unwrap();
        assert!(b.permit().is_err());
        trial.record(&upstream(true));
        assert!(matches!(b.state(), BreakerState::Open { .. }));
        clock.advance(30);
        // An abandoned trial frees the slot.
        drop(b.permit().unwrap());
        let trial = b.permit().unwrap();
        trial.record(&Ok::<(), DestinationError>(()));
        assert_eq!(b.state(), BreakerState::Closed { failures: 0 });
    }

    #[tokio::test]
    async fn retry_stops_on_success_non_retryable_or_open_breaker() {
        let b = CircuitBreaker::new(
            "d",
            10,
            Duration::from_secs(30),
            lanyard_core::SystemClock::shared(),
        );
        let fast = RetryPolicy {
            max_attempts: 3,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
        };
        let n = AtomicU32::new(0);
        let r = retry(fast, &b, |a| {
            n.fetch_add(1, Ordering::SeqCst);
            async move { if a < 2 { upstream(true) } else { Ok(()) } }
        })
        .await;
        assert!(r.is_ok());
        assert_eq!(n.load(Ordering::SeqCst), 2);
        n.store(0, Ordering::SeqCst);
        let r = retry(fast, &b, |_| {
            n.fetch_add(1, Ordering::SeqCst);
            async { upstream(false) }
        })
        .await;
        assert!(r.is_err());
        assert_eq!(n.load(Ordering::SeqCst), 1);
        n.store(0, Ordering::SeqCst);
        let r = retry(fast, &b, |_| {
            n.fetch_add(1, Ordering::SeqCst);
            async { upstream(true) }
        })
        .await;
        assert!(r.is_err());
        assert_eq!(n.load(Ordering::SeqCst), 3);
        // A breaker that opens mid-way stops the retries.
        let b = CircuitBreaker::new(
            "d",
            2,
            Duration::from_secs(30),
            lanyard_core::SystemClock::shared(),
        );
        n.store(0, Ordering::SeqCst);
        let r = retry(
            RetryPolicy {
                max_attempts: 5,
                ..fast
            },
            &b,
            |_| {
                n.fetch_add(1, Ordering::SeqCst);
                async { upstream(true) }
            },
        )
        .await;
        assert!(r.unwrap_err().to_string().contains("is failing"));
        assert_eq!(n.load(Ordering::SeqCst), 2);
    }

    async fn serve(app: Router) -> Url {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Url::parse(&format!("http://{addr}/token")).unwrap()
    }

    fn client(timeout_ms: u64) -> Client {
        build_client(
            "test",
            &ClientSettings::new(Duration::from_millis(timeout_ms)),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn post_maps_answers() {
        let app = Router::new()
            .route("/token", axpost(|body: String| async move { body }))
            .route(
                "/bad",
                axpost(|| async {
                    (
                        AxStatus::BAD_REQUEST,
                        r#"{"error":"invalid_grant","error_description":"rule mismatch"}"#,
                    )
                }),
            )
            .route("/busy", axpost(|| async { AxStatus::SERVICE_UNAVAILABLE }))
            .route(
                "/big",
                axpost(|| async { "x".repeat(10_000).into_response() }),
            )
            .route(
                "/redirect",
                axpost(|| async {
                    (
                        AxStatus::FOUND,
                        [("location", "http://127.0.0.1:1/elsewhere")],
                    )
                }),
            )
            .route(
                "/slow",
                axpost(|| async {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    "late"
                }),
            );
        let url = serve(app).await;
        let at = |p: &str| url.join(p).unwrap();
        let c = client(500);
        let v = serde_json::json!({"a": 1});
        let body = post(&c, &url, HeaderMap::new(), Body::Json(&v), 1024)
            .await
            .unwrap();
        assert_eq!(body, br#"{"a":1}"#);
        let body = post(
            &c,
            &url,
            HeaderMap::new(),
            Body::Form(&[("a", "b c")]),
            1024,
        )
        .await
        .unwrap();
        assert_eq!(body, b"a=b+c");
        let e = post(&c, &at("bad"), HeaderMap::new(), Body::Json(&v), 1024)
            .await
            .unwrap_err();
        assert!(!is_retryable(&e));
        assert!(
            e.to_string()
                .ends_with("answered http 400: invalid_grant: rule mismatch"),
            "{e}"
        );
        let e = post(&c, &at("busy"), HeaderMap::new(), Body::Json(&v), 1024)
            .await
            .unwrap_err();
        assert!(is_retryable(&e), "{e}");
        let e = post(&c, &at("big"), HeaderMap::new(), Body::Json(&v), 1024)
            .await
            .unwrap_err();
        assert!(!is_retryable(&e));
        assert!(e.to_string().contains("exceeds 1024 bytes"), "{e}");
        let e = post(&c, &at("redirect"), HeaderMap::new(), Body::Json(&v), 1024)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("http 302"), "{e}");
        let e = post(&c, &at("slow"), HeaderMap::new(), Body::Json(&v), 1024)
            .await
            .unwrap_err();
        assert!(is_retryable(&e));
        assert!(e.to_string().contains("timed out"), "{e}");
        // Nobody listening.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let dead = Url::parse(&format!("http://{closed}/token")).unwrap();
        let e = post(&c, &dead, HeaderMap::new(), Body::Json(&v), 1024)
            .await
            .unwrap_err();
        assert!(is_retryable(&e), "{e}");
    }
}
