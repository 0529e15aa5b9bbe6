//! The `claude` destination: lanyard mints a short-lived assertion for the workload and
//! exchanges it at the Claude API token endpoint (Anthropic Workload Identity
//! Federation, an RFC 7523 jwt-bearer grant) for a Claude access token.
//! The protocol is the one written down in PROTOCOLS.md §1, from Anthropic's WIF
//! reference and the official Python SDK (`_workload.py`, `_constants.py`).
//!
//! # Exchange (PROTOCOLS.md §1.1)
//! ```text
//! POST <token_url>                       (default https://api.anthropic.com/v1/oauth/token)
//! Content-Type: application/json
//! Accept: application/json
//! anthropic-beta: oauth-2025-04-20,oidc-federation-2026-04-01
//!
//! {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": "<jwt>",
//!  "federation_rule_id": "fdrl_...", "organization_id": "<uuid>",
//!  "service_account_id": "svac_...", "workspace_id": "wrkspc_..."  (only when configured)}
//! ```
//! `service_account_id` is always sent (the docs say required; the SDK treats it as
//! optional). No `scope` is sent: the server takes it from the federation rule.
//!
//! The answer (§1.2) is RFC 6749 §5.1 JSON: `access_token` (`sk-ant-oat01-...`),
//! `token_type` (must be `Bearer`, any case), `expires_in` (seconds, required) and
//! `scope`. The credential is a [`Credential::Bearer`] sent as
//! `Authorization: Bearer <token>` (not `x-api-key`); API calls with it also need
//! `anthropic-beta: oauth-2025-04-20` (the SDK adds it; the workload must too).
//!
//! # Assertion
//! A JWS signed by lanyard's active key, header `{"alg", "kid", "typ": "JWT"}`, claims:
//!
//! | claim     | value |
//! |-----------|-------|
//! | `iss`     | lanyard's issuer URL (the federation issuer's `issuer_url` must equal it) |
//! | `sub`     | the workload ID (a SPIFFE ID); match it with the rule's `subject_prefix` |
//! | `aud`     | `assertion_audience`, one string (never an array: an assertion is for one destination) |
//! | `iat`     | now (the server rejects an assertion without `iat`, §1.3) |
//! | `exp`     | `iat` + the assertion lifetime below |
//! | `jti`     | a fresh UUIDv4 (simple form) per attempt; single use (`check_jti`, on by default, §1.4) |
//! | `lanyard` | `{grant_id, destination}`, for rule `condition`s |
//!
//! # Lifetime (PROTOCOLS.md §1.3)
//! Claude caps a minted token at `max(60, min(rule lifetime, 2 x remaining assertion
//! validity))` seconds. So for a grant TTL `t` lanyard signs the assertion for
//! `min(max_assertion_lifetime_secs, (t - 10) / 2)` seconds (the 10 s absorb clock skew
//! with Anthropic), and the token lives at most `t`. A TTL under 60 s is refused
//! ([`DestinationError::BadRequest`]): Claude tokens live at least 60 s. An answer whose
//! `expires_in` exceeds the TTL (a server that does not apply the cap) is refused as
//! not retryable rather than handing out a token that outlives its grant. The reported
//! `expires_at` is the time the answer arrived plus `expires_in`: the real expiry.
//!
//! # Settings
//! ```json
//! {"federation_rule_id": "fdrl_01...", "organization_id": "0f8e...-...",
//!  "service_account_id": "svac_01...", "workspace_id": "wrkspc_01..."}
//! ```
//!
//! | key                           | default | meaning |
//! |-------------------------------|---------|---------|
//! | `token_url`                   | `https://api.anthropic.com/v1/oauth/token` | the token endpoint; https, or http only on loopback (`127.0.0.1`, `[::1]`, `localhost`) |
//! | `federation_rule_id`          | required | the rule (`fdrl_...`); rules are addressed by ID, there is no implicit search |
//! | `organization_id`             | required | the organization, an untagged UUID |
//! | `service_account_id`          | required | the target service account (`svac_...`) |
//! | `workspace_id`                | absent  | `wrkspc_...` or `default`; required by Claude when the rule is enabled for more than one workspace |
//! | `assertion_audience`          | `https://api.anthropic.com` | `aud` of the assertion: what the rule's `match.audience` names. The default when a rule names none is UNCONFIRMED (§1.4); the docs' examples use this value |
//! | `max_assertion_lifetime_secs` | `300`   | longest assertion, 30..=3600 (at most the issuer's `max_jwt_lifetime_seconds`); tokens live at most twice this |
//! | `anthropic_beta`              | `oauth-2025-04-20,oidc-federation-2026-04-01` | the `anthropic-beta` header of the exchange (the SDK's value; whether GA still needs it is UNCONFIRMED) |
//! | `timeout_secs`                | `10`    | total time of one attempt, 1..=120 |
//! | `max_response_bytes`          | `1048576` | largest answer read (the SDK's limit), 1024..=16777216 |
//! | `max_attempts`                | `2`     | attempts per exchange, 1..=5; see Retries |
//! | `breaker_threshold`           | `5`     | consecutive retryable failures that open the circuit, 1..=1000 |
//! | `breaker_cooldown_secs`       | `30`    | how long an open circuit fails fast, 1..=3600 |
//! | `proxy_url`                   | none    | outbound proxy (http or https); without it the environment's proxy variables are ignored |
//!
//! Unknown keys are refused; so are IDs with the wrong prefix (a swapped field),
//! whitespace or control characters. Settings hold no secret.
//!
//! # Retries
//! Only retryable failures are retried: no answer (connect error, timeout), HTTP 408,
//! 429 and 5xx. An assertion is single-use, so **each attempt mints a fresh assertion
//! with a new `jti`**; the same assertion is never sent twice. A timed-out attempt may
//! still have minted a token nobody received; it expires on its own within the TTL.
//! Backoff is 200 ms doubling to 2 s with jitter. A circuit breaker per destination
//! (`breaker_*`) makes a failing endpoint fail fast (`DESTINATION_UNAVAILABLE`) instead
//! of holding every exchange for `timeout_secs`.
//!
//! # Errors
//! As `lanyard_destination::http` maps them: 4xx answers are not retryable and carry
//! the OAuth `error` code (`invalid_grant`, `invalid_request`, `unauthorized_client`...)
//! and a sanitized description; never the assertion or a token.
//!
//! # Revocation (PROTOCOLS.md §1.5)
//! [`Revocability::AtExpiry`]: Claude has no revocation endpoint, and archiving a rule
//! leaves minted tokens valid until they expire. `revoke` stops nothing at Claude; it
//! returns [`RevokeOutcome::ExpiresAt`] with the token's expiry and the residual
//! lifetime. Keep it small with short TTLs (at least 60 s).
//!
//! # Kill switch (PROTOCOLS.md §1.4, §1.5)
//! `lanyard destination disable NAME --at-destination` archives the federation rule
//! through Anthropic's admin API: `POST <admin_url>/v1/organizations/federation_rules/
//! <federation_rule_id>/archive` with `Authorization: Bearer <token>` (an OAuth token
//! with the `org:admin` scope, read from `admin_token_file` when the switch is pulled;
//! admin API keys are not accepted), `anthropic-version: 2023-06-01` and the
//! `anthropic-beta` header. Token exchange through the rule stops at once; tokens
//! already minted stay valid until they expire. The answer must be the rule with
//! `archived_at` set. Without `admin_token_file` the switch fails with the manual step.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lanyard_core::{SharedClock, SystemClock, UnixTime};
use lanyard_destination::http::{self, Body, CircuitBreaker, RetryPolicy};
use lanyard_destination::settings;
use lanyard_destination::{
    Destination, DestinationError, DestinationSpec, IssueRequest, Issued, Revocability,
    RevokeOutcome, RevokeRequest, TokenMinter,
};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Client, Url};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The adapter kind this crate implements.
pub const KIND: &str = "claude";
/// RFC 7523 grant type.
pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// RFC 8693 token type of the credential.
pub const ISSUED_TOKEN_TYPE: &str = http::ACCESS_TOKEN_TYPE;
/// The default token endpoint.
pub const DEFAULT_TOKEN_URL: &str = "https://api.anthropic.com/v1/oauth/token";
/// Anthropic's admin API.
pub const DEFAULT_ADMIN_URL: &str = "https://api.anthropic.com";
/// `anthropic-version` of admin API calls.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";
/// The default assertion audience.
pub const DEFAULT_AUDIENCE: &str = "https://api.anthropic.com";
/// The `anthropic-beta` header the official SDK sends on jwt-bearer exchanges.
pub const DEFAULT_ANTHROPIC_BETA: &str = "oauth-2025-04-20,oidc-federation-2026-04-01";
/// Shortest token Claude mints, seconds; shorter TTLs are refused.
pub const MIN_TOKEN_LIFETIME_SECS: u64 = 60;
/// Seconds of the TTL set aside for clock skew with the destination.
pub const SKEW_MARGIN_SECS: u64 = 10;

/// Adapter errors are [`DestinationError`]s.
pub type Result<T, E = DestinationError> = std::result::Result<T, E>;

/// The `settings` block of a `claude` destination (see the crate docs' table).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaudeSettings {
    /// Token endpoint.
    #[serde(default = "default_token_url")]
    pub token_url: String,
    /// `fdrl_...`.
    pub federation_rule_id: String,
    /// Organization UUID.
    pub organization_id: String,
    /// `svac_...`.
    pub service_account_id: String,
    /// `wrkspc_...` or `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace_id: Option<String>,
    /// `aud` of the assertion.
    #[serde(default = "default_audience")]
    pub assertion_audience: String,
    /// Longest assertion, seconds.
    #[serde(default = "default_max_assertion")]
    pub max_assertion_lifetime_secs: u64,
    /// `anthropic-beta` header value.
    #[serde(default = "default_beta")]
    pub anthropic_beta: String,
    /// Total time of one attempt, seconds.
    #[serde(default = "settings::default_timeout_secs")]
    pub timeout_secs: u64,
    /// Largest answer read, bytes.
    #[serde(default = "settings::default_max_response_bytes")]
    pub max_response_bytes: usize,
    /// Attempts per exchange.
    #[serde(default = "settings::default_max_attempts")]
    pub max_attempts: u32,
    /// Consecutive retryable failures that open the circuit.
    #[serde(default = "settings::default_breaker_threshold")]
    pub breaker_threshold: u32,
    /// Seconds an open circuit fails fast.
    #[serde(default = "settings::default_breaker_cooldown_secs")]
    pub breaker_cooldown_secs: u64,
    /// Outbound proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_url: Option<String>,
    /// Anthropic's admin API, for the kill switch.
    #[serde(default = "default_admin_url")]
    pub admin_url: String,
    /// File holding an `org:admin` OAuth token, read when the kill switch is pulled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<String>,
}

fn default_admin_url() -> String {
    DEFAULT_ADMIN_URL.to_owned()
}

fn default_token_url() -> String {
    DEFAULT_TOKEN_URL.to_owned()
}
fn default_audience() -> String {
    DEFAULT_AUDIENCE.to_owned()
}
fn default_max_assertion() -> u64 {
    300
}
fn default_beta() -> String {
    DEFAULT_ANTHROPIC_BETA.to_owned()
}

impl ClaudeSettings {
    /// Parse and validate a `settings` block.
    ///
    /// # Errors
    /// [`DestinationError::InvalidSettings`] naming the problem.
    pub fn from_value(settings: &Value) -> Result<Self> {
        let s: ClaudeSettings = settings::parse(KIND, settings)?;
        s.validate()?;
        Ok(s)
    }

    fn validate(&self) -> Result<()> {
        settings::check_endpoint(KIND, "token_url", &self.token_url)?;
        settings::check_endpoint(KIND, "admin_url", &self.admin_url)?;
        if let Some(f) = &self.admin_token_file
            && (f.is_empty() || f.chars().any(char::is_control))
        {
            return Err(bad("settings.admin_token_file must be a file path".into()));
        }
        check_id("federation_rule_id", &self.federation_rule_id, &["fdrl_"])?;
        check_id("service_account_id", &self.service_account_id, &["svac_"])?;
        check_id("organization_id", &self.organization_id, &[])?;
        if uuid::Uuid::try_parse(&self.organization_id).is_err() {
            return Err(bad(format!(
                "settings.organization_id {:?} must be the organization's UUID",
                settings::short(&self.organization_id)
            )));
        }
        if let Some(w) = &self.workspace_id
            && w != "default"
        {
            check_id("workspace_id", w, &["wrkspc_"])?;
        }
        if self.assertion_audience.trim().is_empty()
            || self.assertion_audience.chars().any(char::is_control)
        {
            return Err(bad(
                "settings.assertion_audience must be a non-empty string without control characters"
                    .into(),
            ));
        }
        if HeaderValue::from_str(&self.anthropic_beta).is_err() || self.anthropic_beta.is_empty() {
            return Err(bad(
                "settings.anthropic_beta must be a non-empty, printable header value".into(),
            ));
        }
        range(
            "max_assertion_lifetime_secs",
            self.max_assertion_lifetime_secs,
            30,
            3600,
        )?;
        lanyard_destination::tuning!(self).check(KIND)?;
        if let Some(p) = &self.proxy_url {
            let u = Url::parse(p).map_err(|_| bad("settings.proxy_url is not a url".into()))?;
            if !matches!(u.scheme(), "http" | "https") || u.host().is_none() {
                return Err(bad(
                    "settings.proxy_url must be an http(s) url with a host".into()
                ));
            }
        }
        Ok(())
    }
}

fn bad(message: String) -> DestinationError {
    settings::invalid(KIND, message)
}

fn check_id(field: &str, v: &str, prefixes: &[&str]) -> Result<()> {
    settings::check_word(KIND, field, v, 256)?;
    if !prefixes.is_empty() && !prefixes.iter().any(|p| v.starts_with(p)) {
        return Err(bad(format!(
            "settings.{field} {:?} must start with {}",
            settings::short(v),
            prefixes.join(" or ")
        )));
    }
    Ok(())
}

fn range(field: &str, v: u64, lo: u64, hi: u64) -> Result<()> {
    settings::check_range(KIND, field, v, lo, hi)
}

/// The success answer of the token endpoint (RFC 6749 §5.1).
#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    token_type: String,
    expires_in: u64,
}

/// A `claude` destination.
pub struct ClaudeDestination {
    name: String,
    settings: ClaudeSettings,
    token_url: Url,
    headers: HeaderMap,
    client: Client,
    breaker: CircuitBreaker,
    retry: RetryPolicy,
    minter: Arc<dyn TokenMinter>,
}

impl std::fmt::Debug for ClaudeDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaudeDestination")
            .field("name", &self.name)
            .field("settings", &self.settings)
            .field("issuer", &self.minter.issuer_url())
            .field("breaker", &self.breaker.state())
            .finish_non_exhaustive()
    }
}

impl ClaudeDestination {
    /// Build the adapter from its spec, validating the common and `claude` settings.
    /// The circuit breaker reads the wall clock.
    ///
    /// # Errors
    /// [`DestinationError::InvalidSettings`].
    pub fn new(spec: &DestinationSpec, minter: Arc<dyn TokenMinter>) -> Result<Self> {
        Self::with_clock(spec, minter, SystemClock::shared())
    }

    /// As [`ClaudeDestination::new`], with the circuit breaker reading `clock`.
    ///
    /// # Errors
    /// [`DestinationError::InvalidSettings`].
    pub fn with_clock(
        spec: &DestinationSpec,
        minter: Arc<dyn TokenMinter>,
        clock: SharedClock,
    ) -> Result<Self> {
        settings::check_spec(KIND, spec)?;
        let settings = ClaudeSettings::from_value(&spec.settings)?;
        let token_url = settings::check_endpoint(KIND, "token_url", &settings.token_url)?;
        let proxy = match &settings.proxy_url {
            Some(p) => {
                Some(Url::parse(p).map_err(|_| bad("settings.proxy_url is not a url".into()))?)
            }
            None => None,
        };
        let tuning = lanyard_destination::tuning!(settings);
        let client = tuning.client(KIND, proxy)?;
        let mut headers = HeaderMap::new();
        headers.insert(
            HeaderName::from_static("anthropic-beta"),
            HeaderValue::from_str(&settings.anthropic_beta)
                .map_err(|_| bad("settings.anthropic_beta is not a header value".into()))?,
        );
        let breaker = tuning.breaker(&format!("destination {}", spec.name), clock);
        let retry = tuning.retry();
        Ok(Self {
            name: spec.name.clone(),
            settings,
            token_url,
            headers,
            client,
            breaker,
            retry,
            minter,
        })
    }

    /// The parsed settings.
    pub fn settings(&self) -> &ClaudeSettings {
        &self.settings
    }

    /// The circuit breaker's state.
    pub fn breaker_state(&self) -> http::BreakerState {
        self.breaker.state()
    }

    /// Assertion lifetime for a grant TTL of `ttl_secs` (see the crate docs).
    ///
    /// # Errors
    /// [`DestinationError::BadRequest`] for a TTL under [`MIN_TOKEN_LIFETIME_SECS`].
    pub fn assertion_lifetime(&self, ttl_secs: u64) -> Result<u64> {
        if ttl_secs < MIN_TOKEN_LIFETIME_SECS {
            return Err(DestinationError::BadRequest(format!(
                "ttl {ttl_secs}s is too short for destination {}: Claude tokens live at least {MIN_TOKEN_LIFETIME_SECS}s",
                self.name
            )));
        }
        Ok(self
            .settings
            .max_assertion_lifetime_secs
            .min(ttl_secs.saturating_sub(SKEW_MARGIN_SECS) / 2))
    }

    /// One attempt: mint a fresh assertion, POST it, parse the answer.
    async fn attempt(
        &self,
        req: &IssueRequest<'_>,
        iat: UnixTime,
        life: u64,
    ) -> Result<(String, TokenResponse)> {
        let (jti, assertion) = lanyard_destination::mint_workload_jwt(
            self.minter.as_ref(),
            req,
            &self.name,
            &self.settings.assertion_audience,
            iat,
            life,
        )?;
        let mut body = json!({
            "grant_type": GRANT_TYPE,
            "assertion": assertion.expose(),
            "federation_rule_id": self.settings.federation_rule_id,
            "organization_id": self.settings.organization_id,
            "service_account_id": self.settings.service_account_id,
        });
        if let (Some(w), Some(obj)) = (&self.settings.workspace_id, body.as_object_mut()) {
            obj.insert("workspace_id".into(), json!(w));
        }
        let raw = http::post(
            &self.client,
            &self.token_url,
            self.headers.clone(),
            Body::Json(&body),
            self.settings.max_response_bytes,
        )
        .await
        .map_err(hint_401)?;
        let parsed: TokenResponse = http::parse_json(&raw, &self.token_url, "token response")?;
        Ok((jti, parsed))
    }
}

/// On a 401 the SDK says the cause is "almost always a federation-rule mismatch".
fn hint_401(e: DestinationError) -> DestinationError {
    match e {
        DestinationError::Upstream { message, retryable } if message.contains(" http 401") => {
            DestinationError::Upstream {
                message: format!(
                    "{message} (usually a federation rule that does not match lanyard's assertion: check iss, sub, aud and the rule's issuer)"
                ),
                retryable,
            }
        }
        other => other,
    }
}

#[async_trait]
impl Destination for ClaudeDestination {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn revocability(&self) -> Revocability {
        Revocability::AtExpiry
    }

    async fn issue(&self, req: IssueRequest<'_>) -> Result<Issued> {
        let ttl = req.ttl.as_secs();
        let life = self.assertion_lifetime(ttl)?;
        let started = tokio::time::Instant::now();
        // Each attempt has its own assertion (new jti, iat = now): never replayed.
        let (jti, resp) = http::retry_minting(self.retry, &self.breaker, req.now, started, |iat| {
            self.attempt(&req, iat, life)
        })
        .await?;
        let upstream = http::refused;
        if !resp.token_type.eq_ignore_ascii_case("bearer") {
            return Err(upstream(format!(
                "{} answered token_type {:?}, not Bearer",
                http::host_of(&self.token_url),
                resp.token_type.chars().take(32).collect::<String>()
            )));
        }
        if resp.access_token.is_empty() {
            return Err(upstream(format!(
                "{} answered an empty access_token",
                http::host_of(&self.token_url)
            )));
        }
        if resp.expires_in == 0 || resp.expires_in > ttl {
            return Err(upstream(format!(
                "{} issued a token living {}s, outside the grant's ttl of {ttl}s; check the federation rule's token_lifetime_seconds",
                http::host_of(&self.token_url),
                resp.expires_in
            )));
        }
        Ok(http::bearer_issued(
            resp.access_token,
            req.now,
            started.elapsed(),
            resp.expires_in,
            jti,
        ))
    }

    /// Archive the federation rule (see the crate docs' Kill switch).
    async fn kill_switch(&self, reason: &str) -> Result<Option<String>> {
        let _ = reason;
        let rule = &self.settings.federation_rule_id;
        let Some(file) = &self.settings.admin_token_file else {
            return Err(DestinationError::BadRequest(format!(
                "settings.admin_token_file is not set, so lanyard cannot archive federation rule {rule}; archive it in the Claude Console (or set admin_token_file to a file holding an org:admin OAuth token)"
            )));
        };
        let token = lanyard_destination::read_secret_file(KIND, "admin_token_file", file)?;
        let url = http::check_endpoint(&format!(
            "{}/v1/organizations/federation_rules/{rule}/archive",
            self.settings.admin_url.trim_end_matches('/')
        ))
        .map_err(|m| bad(format!("settings.admin_url: {m}")))?;
        let mut headers = self.headers.clone();
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
            .map_err(|_| bad("admin_token_file does not hold a header-safe token".into()))?;
        auth.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, auth);
        headers.insert(
            HeaderName::from_static("anthropic-version"),
            HeaderValue::from_static(ANTHROPIC_VERSION),
        );
        // Not through the exchange breaker: during an incident the token endpoint may be
        // failing, and the switch must still be tried (and must not count against it).
        let breaker = CircuitBreaker::new(
            &format!("destination {} admin API", self.name),
            u32::MAX,
            Duration::from_secs(1),
            SystemClock::shared(),
        );
        let raw = http::retry(self.retry, &breaker, |_| {
            let headers = headers.clone();
            let url = &url;
            async move {
                http::post(
                    &self.client,
                    url,
                    headers,
                    Body::Json(&json!({})),
                    self.settings.max_response_bytes,
                )
                .await
            }
        })
        .await?;
        #[derive(Deserialize)]
        struct Archived {
            id: String,
            archived_at: Option<String>,
        }
        let a: Archived = http::parse_json(&raw, &url, "federation rule")?;
        let host = http::host_of(&url);
        match a.archived_at {
            Some(at) if a.id == *rule => Ok(Some(format!(
                "archived federation rule {rule} at {host} (archived_at {}); token exchange through it stops at once, tokens already minted stay valid until they expire",
                at.chars().take(64).collect::<String>()
            ))),
            _ => Err(DestinationError::Upstream {
                message: format!(
                    "{host} answered without archiving federation rule {rule} (no archived_at for it)"
                ),
                retryable: false,
            }),
        }
    }

    /// Nothing to call: Claude cannot revoke a token (PROTOCOLS.md §1.5). States the
    /// residual lifetime. Revoking twice gives the same answer.
    async fn revoke(&self, req: RevokeRequest<'_>) -> Result<RevokeOutcome> {
        Ok(http::lapses_at_expiry(
            &req,
            "Claude access tokens cannot be revoked at the destination",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        json!({
            "federation_rule_id": "fdrl_01abc",
            "organization_id": "0f8e4a1c-1234-4abc-8def-0123456789ab",
            "service_account_id": "svac_01abc",
        })
    }

    #[test]
    fn defaults() {
        let s = ClaudeSettings::from_value(&base()).unwrap();
        assert_eq!(s.token_url, DEFAULT_TOKEN_URL);
        assert_eq!(s.assertion_audience, DEFAULT_AUDIENCE);
        assert_eq!(s.anthropic_beta, DEFAULT_ANTHROPIC_BETA);
        assert_eq!(s.workspace_id, None);
        assert_eq!(s.max_response_bytes, 1 << 20);
    }

    #[test]
    fn settings_errors() {
        let with = |k: &str, v: Value| {
            let mut b = base();
            b.as_object_mut().unwrap().insert(k.into(), v);
            b
        };
        let without = |k: &str| {
            let mut b = base();
            b.as_object_mut().unwrap().remove(k);
            b
        };
        let cases = [
            (json!(null), "missing field"),
            (
                without("federation_rule_id"),
                "missing field `federation_rule_id`",
            ),
            (
                without("organization_id"),
                "missing field `organization_id`",
            ),
            (
                without("service_account_id"),
                "missing field `service_account_id`",
            ),
            (with("bogus", json!(1)), "unknown field `bogus`"),
            (
                with(
                    "token_url",
                    json!("http://api.anthropic.com/v1/oauth/token"),
                ),
                "https is required",
            ),
            (with("token_url", json!("ftp://x/y")), "scheme"),
            (
                with("federation_rule_id", json!("svac_1")),
                "must start with fdrl_",
            ),
            (with("service_account_id", json!("")), "1-256 characters"),
            (with("organization_id", json!("org_1")), "UUID"),
            (with("workspace_id", json!("ws 1")), "whitespace"),
            (with("workspace_id", json!("x")), "wrkspc_"),
            (with("max_assertion_lifetime_secs", json!(5)), "30..=3600"),
            (with("timeout_secs", json!(0)), "1..=120"),
            (with("max_attempts", json!(9)), "1..=5"),
            (with("anthropic_beta", json!("a\nb")), "anthropic_beta"),
            (with("assertion_audience", json!(" ")), "assertion_audience"),
            (with("proxy_url", json!("socks9://x")), "proxy_url"),
        ];
        for (v, want) in cases {
            let err = ClaudeSettings::from_value(&v).unwrap_err();
            assert!(
                matches!(err, DestinationError::InvalidSettings { .. }),
                "{err:?}"
            );
            let msg = err.to_string();
            assert!(msg.contains(want), "{v}: {msg}");
            assert!(
                msg.starts_with("invalid settings for destination kind claude"),
                "{msg}"
            );
        }
        for ok in [
            with("workspace_id", json!("default")),
            with("workspace_id", json!("wrkspc_01")),
            with("token_url", json!("http://127.0.0.1:9/t")),
            with("token_url", json!("http://[::1]:9/t")),
            with("token_url", json!("http://localhost:9/t")),
        ] {
            ClaudeSettings::from_value(&ok).unwrap();
        }
    }
}
