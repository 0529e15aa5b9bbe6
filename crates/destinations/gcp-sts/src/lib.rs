//! The `gcp-sts` destination: lanyard mints a short-lived subject token for the workload,
//! exchanges it at Google's Security Token Service for a federated access token
//! (workload identity federation, an RFC 8693-style exchange), and optionally trades that
//! for a service account's access token (`generateAccessToken`, service-account
//! impersonation). The protocol is the one written down in PROTOCOLS.md §4.1 and §4.2.
//!
//! # Exchange (PROTOCOLS.md §4.1)
//! ```text
//! POST <sts_url>                               (default https://sts.googleapis.com/v1/token)
//! Content-Type: application/json               (no Authorization header)
//!
//! {"grantType": "urn:ietf:params:oauth:grant-type:token-exchange",
//!  "audience": "//iam.googleapis.com/projects/<NUM>/locations/global/workloadIdentityPools/<POOL>/providers/<PROV>",
//!  "scope": "https://www.googleapis.com/auth/cloud-platform",
//!  "requestedTokenType": "urn:ietf:params:oauth:token-type:access_token",
//!  "subjectTokenType": "urn:ietf:params:oauth:token-type:jwt",
//!  "subjectToken": "<jwt>"}
//! ```
//! The answer is `access_token`, `issued_token_type`, `token_type` (`Bearer`) and
//! `expires_in`. An error is OAuth-style: `{"error": "invalid_grant",
//! "error_description": "..."}`.
//!
//! # Impersonation (PROTOCOLS.md §4.2), when `service_account` is set
//! ```text
//! POST <iam_credentials_url>/v1/projects/-/serviceAccounts/<email>:generateAccessToken
//! Authorization: Bearer <federated token>
//!
//! {"scope": ["https://www.googleapis.com/auth/cloud-platform"], "lifetime": "300s",
//!  "delegates": ["projects/-/serviceAccounts/<email>", ...]}
//! ```
//! The answer is `{"accessToken", "expireTime"}` (RFC 3339). An error is Google's
//! `{"error": {"code": 403, "message": "...", "status": "PERMISSION_DENIED"}}`. The
//! federated token is then asked with the `cloud-platform` scope (what Google's client
//! libraries do), and the OAuth scopes below go to `generateAccessToken`. `lifetime` is
//! `min(grant TTL, max_lifetime_secs)`; more than 3600 s needs the organization policy
//! `constraints/iam.allowServiceAccountCredentialLifetimeExtension` to list the service
//! account. A smallest lifetime Google accepts is not documented in the sources read.
//!
//! # Subject token
//! A JWS signed by lanyard's active key (`typ: JWT`) with `iss` (lanyard's issuer URL,
//! the provider's issuer), `sub` (the workload ID; Google maps it with
//! `google.subject=assertion.sub`, and `google.subject` holds at most 127 bytes), one
//! `aud` (`subject_token_audience`, by default `https:` + `audience`, the provider's
//! default allowed audience), `iat`, `exp` (`iat` + `min(grant TTL,
//! max_subject_token_lifetime_secs)`), a fresh `jti`, and `lanyard` = `{grant_id,
//! destination}`. Each attempt mints a new one.
//!
//! # Settings
//! | key | default | meaning |
//! |---|---|---|
//! | `audience` | required | the provider's full resource name, `//iam.googleapis.com/projects/<number>/locations/global/workloadIdentityPools/<pool>/providers/<provider>` |
//! | `subject_token_audience` | `https:` + `audience` | the subject token's one `aud`; one of the provider's allowed audiences |
//! | `sts_url` | `https://sts.googleapis.com/v1/token` | https, or http only on loopback |
//! | `oauth_scopes` | `["https://www.googleapis.com/auth/cloud-platform"]` | OAuth scopes of the credential |
//! | `oauth_scopes_by_scope` | `{}` | lanyard scope → OAuth scopes; when set, a request's lanyard scopes choose the OAuth scopes (union), and each of the destination's `scopes` must be mapped |
//! | `service_account` | none | impersonate this service account (email or unique ID) |
//! | `delegates` | `[]` | delegation chain for impersonation (emails, IDs or `projects/-/serviceAccounts/...`) |
//! | `iam_credentials_url` | `https://iamcredentials.googleapis.com` | base URL of the IAM Credentials API |
//! | `max_lifetime_secs` | 3600 | longest impersonated token asked for, 1..=43200 |
//! | `max_subject_token_lifetime_secs` | 300 | longest subject token lanyard mints, 60..=3600 |
//! | `max_token_lifetime_secs` | none | refuse (`DESTINATION_REJECTED`) a credential living longer than this, 60..=86400 |
//! | `timeout_secs` | 10 | per request, 1..=120 |
//! | `max_response_bytes` | 1 MiB | 1024..=16 MiB |
//! | `max_attempts` | 2 | per call, 1..=5; each STS attempt mints a fresh subject token |
//! | `breaker_threshold` / `breaker_cooldown_secs` | 5 / 30 | circuit breakers, one for STS and one for the IAM Credentials API |
//!
//! Unknown keys are refused.
//!
//! # Errors
//! As `lanyard_destination::http` maps them: a 4xx refusal is not retryable
//! (`DESTINATION_REJECTED`) and carries the OAuth `error` (STS) or Google's `status`
//! (`PERMISSION_DENIED`...) with a sanitized description; 408, 429, 5xx, timeouts and
//! connection failures are retryable (`DESTINATION_UNAVAILABLE`). Tokens never appear
//! in messages.
//!
//! # Lifetime and revocation (PROTOCOLS.md §4.2: UNCONFIRMED)
//! Google documents no way to revoke a federated or an impersonated access token.
//! [`Revocability::AtExpiry`]: a revocation stops lanyard issuing and its receipt states
//! the residual lifetime. With impersonation the token lives `min(grant TTL,
//! max_lifetime_secs)` and its expiry is Google's `expireTime`. Without impersonation
//! the federated token lives as long as STS says (`expires_in`, one hour by default
//! [mem]), whatever the grant's TTL: lanyard reports that real expiry. Set
//! `service_account` to keep the residual to the grant, or `max_token_lifetime_secs`
//! to refuse longer tokens.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lanyard_core::{Scope, Secret, SystemClock, UnixTime};
use lanyard_destination::http::{self, Body, CircuitBreaker, RetryPolicy};
use lanyard_destination::settings::{self, Plumbing, short};
use lanyard_destination::{
    Destination, DestinationError, DestinationSpec, IssueRequest, Issued, Revocability,
    RevokeOutcome, RevokeRequest, TokenMinter,
};
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use reqwest::{Client, Url};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The adapter kind this crate implements.
pub const KIND: &str = "gcp-sts";
/// RFC 8693 grant type.
pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// The subject token's type.
pub const SUBJECT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
/// The token type STS must be asked for.
pub const REQUESTED_TOKEN_TYPE: &str = http::ACCESS_TOKEN_TYPE;
/// The documented STS endpoint.
pub const DEFAULT_STS_URL: &str = "https://sts.googleapis.com/v1/token";
/// The documented IAM Credentials API.
pub const DEFAULT_IAM_CREDENTIALS_URL: &str = "https://iamcredentials.googleapis.com";
/// The broad Google Cloud scope.
pub const CLOUD_PLATFORM_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
/// Longest impersonated token Google issues at all (12 h, with the org policy).
pub const MAX_IMPERSONATION_LIFETIME_SECS: u64 = 43_200;
/// Seconds an `expireTime` may exceed the asked lifetime (clock skew with Google).
pub const EXPIRY_SKEW_SECS: i64 = 60;

/// Adapter errors are [`DestinationError`]s.
pub type Result<T, E = DestinationError> = std::result::Result<T, E>;

/// The `settings` block of a `gcp-sts` destination (see the crate docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcpStsSettings {
    /// The workload identity pool provider's full resource name.
    pub audience: String,
    /// The subject token's `aud`; default `https:` + `audience`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_token_audience: Option<String>,
    /// STS token endpoint.
    #[serde(default = "default_sts_url")]
    pub sts_url: String,
    /// OAuth scopes of the credential.
    #[serde(default = "default_oauth_scopes")]
    pub oauth_scopes: Vec<String>,
    /// lanyard scope → OAuth scopes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub oauth_scopes_by_scope: BTreeMap<String, Vec<String>>,
    /// Service account to impersonate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// Delegation chain for impersonation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delegates: Vec<String>,
    /// Base URL of the IAM Credentials API.
    #[serde(default = "default_iam_credentials_url")]
    pub iam_credentials_url: String,
    /// Longest impersonated token asked for, seconds.
    #[serde(default = "default_max_lifetime")]
    pub max_lifetime_secs: u64,
    /// Longest subject token lanyard mints, seconds.
    #[serde(default = "default_subject_lifetime")]
    pub max_subject_token_lifetime_secs: u64,
    /// Refuse credentials living longer than this, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_token_lifetime_secs: Option<u64>,
    /// Per-request timeout, seconds.
    #[serde(default = "settings::default_timeout_secs")]
    pub timeout_secs: u64,
    /// Largest answer read, bytes.
    #[serde(default = "settings::default_max_response_bytes")]
    pub max_response_bytes: usize,
    /// Attempts per call.
    #[serde(default = "settings::default_max_attempts")]
    pub max_attempts: u32,
    /// Retryable failures in a row that open the breaker.
    #[serde(default = "settings::default_breaker_threshold")]
    pub breaker_threshold: u32,
    /// How long the breaker stays open, seconds.
    #[serde(default = "settings::default_breaker_cooldown_secs")]
    pub breaker_cooldown_secs: u64,
}

fn default_sts_url() -> String {
    DEFAULT_STS_URL.to_owned()
}
fn default_iam_credentials_url() -> String {
    DEFAULT_IAM_CREDENTIALS_URL.to_owned()
}
fn default_oauth_scopes() -> Vec<String> {
    vec![CLOUD_PLATFORM_SCOPE.to_owned()]
}
fn default_max_lifetime() -> u64 {
    3600
}
fn default_subject_lifetime() -> u64 {
    300
}

fn bad(message: String) -> DestinationError {
    settings::invalid(KIND, message)
}

fn range(field: &str, v: u64, lo: u64, hi: u64) -> Result<()> {
    settings::check_range(KIND, field, v, lo, hi)
}

/// A token without whitespace or control characters, 1..=`max` bytes.
fn word(field: &str, v: &str, max: usize) -> Result<()> {
    settings::check_word(KIND, field, v, max)
}

/// Whether `s` is 4-32 characters of `[a-z0-9-]` (a pool or provider ID).
fn pool_id(s: &str) -> bool {
    (4..=32).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Check a provider's full resource name:
/// `//iam.googleapis.com/projects/<number>/locations/global/workloadIdentityPools/<pool>/providers/<provider>`.
///
/// # Errors
/// A message for the operator.
pub fn check_audience(audience: &str) -> std::result::Result<(), String> {
    let want = "//iam.googleapis.com/projects/<project number>/locations/global/workloadIdentityPools/<pool>/providers/<provider>";
    let fail = || format!("{:?} must be {want}", short(audience));
    let rest = audience
        .strip_prefix("//iam.googleapis.com/projects/")
        .ok_or_else(fail)?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        [
            number,
            "locations",
            "global",
            "workloadIdentityPools",
            pool,
            "providers",
            provider,
        ] if !number.is_empty()
            && number.len() <= 20
            && number.bytes().all(|b| b.is_ascii_digit())
            && pool_id(pool)
            && pool_id(provider) =>
        {
            Ok(())
        }
        [number, ..] if number.bytes().any(|b| !b.is_ascii_digit()) => Err(format!(
            "{} (the project number, not the project ID)",
            fail()
        )),
        _ => Err(fail()),
    }
}

/// Whether `s` names a service account: its email or its numeric unique ID.
fn service_account_name(s: &str) -> bool {
    if !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_digit()) {
        return true;
    }
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && local.len() <= 64
        && domain.contains('.')
        && s.len() <= 254
        && s.bytes().filter(|b| *b == b'@').count() == 1
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'@' | b'.' | b'-' | b'_'))
}

const DELEGATE_PREFIX: &str = "projects/-/serviceAccounts/";

fn check_oauth_scopes(field: &str, scopes: &[String]) -> Result<()> {
    if scopes.is_empty() || scopes.len() > 32 {
        return Err(bad(format!("settings.{field} must list 1-32 OAuth scopes")));
    }
    for s in scopes {
        word(field, s, 256)?;
    }
    Ok(())
}

impl GcpStsSettings {
    /// Parse and validate a `settings` block.
    ///
    /// # Errors
    /// [`DestinationError::InvalidSettings`] naming the problem.
    pub fn from_value(settings: &Value) -> Result<Self> {
        let s: GcpStsSettings = settings::parse(KIND, settings)?;
        s.validate()?;
        Ok(s)
    }

    fn validate(&self) -> Result<()> {
        check_audience(&self.audience).map_err(|m| bad(format!("settings.audience: {m}")))?;
        if let Some(a) = &self.subject_token_audience {
            word("subject_token_audience", a, 512)?;
        }
        settings::check_endpoint(KIND, "sts_url", &self.sts_url)?;
        settings::check_endpoint(KIND, "iam_credentials_url", &self.iam_credentials_url)?;
        check_oauth_scopes("oauth_scopes", &self.oauth_scopes)?;
        if self.oauth_scopes_by_scope.len() > 64 {
            return Err(bad(
                "settings.oauth_scopes_by_scope maps at most 64 scopes".into()
            ));
        }
        for (k, v) in &self.oauth_scopes_by_scope {
            Scope::parse(k).map_err(|e| {
                bad(format!(
                    "settings.oauth_scopes_by_scope key {:?}: {e}",
                    short(k)
                ))
            })?;
            check_oauth_scopes(&format!("oauth_scopes_by_scope.{k}"), v)?;
        }
        if let Some(sa) = &self.service_account
            && !service_account_name(sa)
        {
            return Err(bad(format!(
                "settings.service_account {:?} must be a service account email or unique ID",
                short(sa)
            )));
        }
        if !self.delegates.is_empty() && self.service_account.is_none() {
            return Err(bad(
                "settings.delegates needs settings.service_account".into()
            ));
        }
        if self.delegates.len() > 16 {
            return Err(bad("settings.delegates lists at most 16 accounts".into()));
        }
        for d in &self.delegates {
            if !service_account_name(d.strip_prefix(DELEGATE_PREFIX).unwrap_or(d)) {
                return Err(bad(format!(
                    "settings.delegates entry {:?} must be a service account email, unique ID or {DELEGATE_PREFIX}<email>",
                    short(d)
                )));
            }
        }
        range(
            "max_lifetime_secs",
            self.max_lifetime_secs,
            1,
            MAX_IMPERSONATION_LIFETIME_SECS,
        )?;
        range(
            "max_subject_token_lifetime_secs",
            self.max_subject_token_lifetime_secs,
            60,
            3600,
        )?;
        if let Some(m) = self.max_token_lifetime_secs {
            range("max_token_lifetime_secs", m, 60, 86_400)?;
        }
        lanyard_destination::tuning!(self).check(KIND)?;
        Ok(())
    }

    /// The subject token's `aud`.
    pub fn subject_audience(&self) -> String {
        self.subject_token_audience
            .clone()
            .unwrap_or_else(|| format!("https:{}", self.audience))
    }

    /// The OAuth scopes for a request with these lanyard scopes: the union of their
    /// mapped scopes when `oauth_scopes_by_scope` is set and scopes were asked,
    /// `oauth_scopes` otherwise.
    ///
    /// # Errors
    /// [`DestinationError::BadRequest`] for a lanyard scope that is not mapped.
    pub fn oauth_scopes_for(&self, requested: &[Scope]) -> Result<Vec<String>> {
        if self.oauth_scopes_by_scope.is_empty() || requested.is_empty() {
            return Ok(self.oauth_scopes.clone());
        }
        let mut out: Vec<String> = Vec::new();
        for s in requested {
            let mapped = self.oauth_scopes_by_scope.get(s.as_str()).ok_or_else(|| {
                DestinationError::BadRequest(format!(
                    "scope {:?} has no OAuth scopes in settings.oauth_scopes_by_scope",
                    s.as_str()
                ))
            })?;
            for m in mapped {
                if !out.contains(m) {
                    out.push(m.clone());
                }
            }
        }
        Ok(out)
    }

    /// The `delegates` as `generateAccessToken` wants them.
    pub fn delegate_names(&self) -> Vec<String> {
        self.delegates
            .iter()
            .map(|d| {
                if d.starts_with(DELEGATE_PREFIX) {
                    d.clone()
                } else {
                    format!("{DELEGATE_PREFIX}{d}")
                }
            })
            .collect()
    }
}

// === requests and answers ===

/// The STS request body (PROTOCOLS.md §4.1). `subject_token` is the only secret.
pub fn sts_body(audience: &str, scope: &str, subject_token: &str) -> Value {
    json!({
        "grantType": GRANT_TYPE,
        "audience": audience,
        "scope": scope,
        "requestedTokenType": REQUESTED_TOKEN_TYPE,
        "subjectTokenType": SUBJECT_TOKEN_TYPE,
        "subjectToken": subject_token,
    })
}

/// The `generateAccessToken` request body (PROTOCOLS.md §4.2).
pub fn generate_access_token_body(
    scopes: &[String],
    lifetime_secs: u64,
    delegates: &[String],
) -> Value {
    json!({
        "scope": scopes,
        "lifetime": format!("{lifetime_secs}s"),
        "delegates": delegates,
    })
}

/// STS's success answer.
#[derive(Debug, Deserialize)]
pub struct StsAnswer {
    /// The federated access token.
    pub access_token: String,
    /// RFC 8693 `issued_token_type`.
    #[serde(default)]
    pub issued_token_type: Option<String>,
    /// `Bearer`.
    pub token_type: String,
    /// Seconds.
    pub expires_in: u64,
}

/// `generateAccessToken`'s success answer.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GeneratedToken {
    /// The service account's access token.
    pub access_token: String,
    /// RFC 3339 expiry.
    pub expire_time: String,
}

/// Parse and check STS's answer.
///
/// # Errors
/// [`DestinationError::Upstream`] (not retryable) for a malformed or incomplete answer.
pub fn parse_sts_answer(body: &[u8], url: &Url) -> Result<StsAnswer> {
    let a: StsAnswer = http::parse_json(body, url, "token response")?;
    let host = http::host_of(url);
    if a.access_token.is_empty() || a.expires_in == 0 {
        return Err(http::refused(format!(
            "{host} answered without an access_token or a positive expires_in"
        )));
    }
    if !a.token_type.eq_ignore_ascii_case("bearer") {
        return Err(http::refused(format!(
            "{host} answered token_type {:?}, not Bearer",
            a.token_type.chars().take(32).collect::<String>()
        )));
    }
    if let Some(t) = &a.issued_token_type
        && t != REQUESTED_TOKEN_TYPE
    {
        return Err(http::refused(format!(
            "{host} issued a {:?}, not an access token",
            t.chars().take(64).collect::<String>()
        )));
    }
    Ok(a)
}

/// Parse `generateAccessToken`'s answer: the token and its expiry, Unix seconds.
///
/// # Errors
/// [`DestinationError::Upstream`] (not retryable) for a malformed answer or `expireTime`.
pub fn parse_generated_token(body: &[u8], url: &Url) -> Result<(String, UnixTime)> {
    let a: GeneratedToken = http::parse_json(body, url, "generateAccessToken response")?;
    let host = http::host_of(url);
    if a.access_token.is_empty() {
        return Err(http::refused(format!(
            "{host} answered an empty accessToken"
        )));
    }
    let at = chrono::DateTime::parse_from_rfc3339(&a.expire_time).map_err(|_| {
        http::refused(format!(
            "{host} answered an expireTime that is not an RFC 3339 time"
        ))
    })?;
    Ok((a.access_token, at.timestamp()))
}

// === the destination ===

/// A `gcp-sts` destination.
pub struct GcpStsDestination {
    name: String,
    settings: GcpStsSettings,
    subject_audience: String,
    sts_url: Url,
    generate_url: Option<Url>,
    delegates: Vec<String>,
    client: Client,
    /// One breaker per API: a healthy STS must not reset an IAM outage's count.
    sts_breaker: CircuitBreaker,
    iam_breaker: CircuitBreaker,
    retry: RetryPolicy,
    minter: Arc<dyn TokenMinter>,
}

impl std::fmt::Debug for GcpStsDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcpStsDestination")
            .field("name", &self.name)
            .field("settings", &self.settings)
            .field("issuer", &self.minter.issuer_url())
            .finish_non_exhaustive()
    }
}

impl GcpStsDestination {
    /// Build the adapter from its spec.
    ///
    /// # Errors
    /// [`DestinationError::InvalidSettings`].
    pub fn new(spec: &DestinationSpec, minter: Arc<dyn TokenMinter>) -> Result<Self> {
        settings::check_spec(KIND, spec)?;
        let settings = GcpStsSettings::from_value(&spec.settings)?;
        if let Some(s) = settings::first_unmapped_scope(spec, &settings.oauth_scopes_by_scope) {
            return Err(bad(format!(
                "scope {:?} is offered but has no OAuth scopes in settings.oauth_scopes_by_scope",
                short(s)
            )));
        }
        let sts_url = settings::check_endpoint(KIND, "sts_url", &settings.sts_url)?;
        let generate_url = match &settings.service_account {
            None => None,
            Some(sa) => {
                let url = format!(
                    "{}/v1/projects/-/serviceAccounts/{sa}:generateAccessToken",
                    settings.iam_credentials_url.trim_end_matches('/')
                );
                Some(settings::check_endpoint(KIND, "iam_credentials_url", &url)?)
            }
        };
        let tuning = lanyard_destination::tuning!(settings);
        let Plumbing {
            client,
            breaker: sts_breaker,
            retry,
        } = tuning.plumbing(
            KIND,
            &format!("destination {} (sts)", spec.name),
            SystemClock::shared(),
            None,
        )?;
        let iam_breaker = tuning.breaker(
            &format!("destination {} (iamcredentials)", spec.name),
            SystemClock::shared(),
        );
        Ok(Self {
            name: spec.name.clone(),
            subject_audience: settings.subject_audience(),
            delegates: settings.delegate_names(),
            settings,
            sts_url,
            generate_url,
            client,
            sts_breaker,
            iam_breaker,
            retry,
            minter,
        })
    }

    /// The parsed settings.
    pub fn settings(&self) -> &GcpStsSettings {
        &self.settings
    }

    /// The lifetime asked of `generateAccessToken` for a grant TTL.
    pub fn impersonation_lifetime(&self, ttl_secs: u64) -> u64 {
        ttl_secs.min(self.settings.max_lifetime_secs).max(1)
    }

    /// One STS attempt with a fresh subject token.
    async fn exchange(
        &self,
        req: &IssueRequest<'_>,
        iat: UnixTime,
        life: u64,
        scope: &str,
    ) -> Result<(String, StsAnswer)> {
        let (jti, subject) = lanyard_destination::mint_workload_jwt(
            self.minter.as_ref(),
            req,
            &self.name,
            &self.subject_audience,
            iat,
            life,
        )?;
        let body = sts_body(&self.settings.audience, scope, subject.expose());
        let raw = http::post(
            &self.client,
            &self.sts_url,
            HeaderMap::new(),
            Body::Json(&body),
            self.settings.max_response_bytes,
        )
        .await?;
        Ok((jti, parse_sts_answer(&raw, &self.sts_url)?))
    }

    /// One `generateAccessToken` attempt.
    async fn impersonate(
        &self,
        url: &Url,
        federated: &str,
        scopes: &[String],
        lifetime: u64,
    ) -> Result<(String, UnixTime)> {
        let mut headers = HeaderMap::new();
        let mut auth = HeaderValue::from_str(&format!("Bearer {federated}")).map_err(|_| {
            http::refused(format!(
                "{} answered an access_token that is not a header value",
                http::host_of(&self.sts_url)
            ))
        })?;
        auth.set_sensitive(true);
        headers.insert(AUTHORIZATION, auth);
        let body = generate_access_token_body(scopes, lifetime, &self.delegates);
        let raw = http::post(
            &self.client,
            url,
            headers,
            Body::Json(&body),
            self.settings.max_response_bytes,
        )
        .await
        .map_err(|e| self.hint_denied(e))?;
        parse_generated_token(&raw, url)
    }

    /// On PERMISSION_DENIED, say which binding is usually missing.
    fn hint_denied(&self, e: DestinationError) -> DestinationError {
        match e {
            DestinationError::Upstream { message, retryable }
                if message.contains("PERMISSION_DENIED") =>
            {
                DestinationError::Upstream {
                    message: format!(
                        "{message} (the workload's principal://.../subject/<workload id> needs roles/iam.workloadIdentityUser on the service account)"
                    ),
                    retryable,
                }
            }
            other => other,
        }
    }

    fn check_max(&self, lives: i64) -> Result<()> {
        if let Some(max) = self.settings.max_token_lifetime_secs
            && lives > i64::try_from(max).unwrap_or(i64::MAX)
        {
            return Err(http::refused(format!(
                "destination {} would hand out a token living {lives}s, more than max_token_lifetime_secs {max}s",
                self.name
            )));
        }
        Ok(())
    }
}

#[async_trait]
impl Destination for GcpStsDestination {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn revocability(&self) -> Revocability {
        Revocability::AtExpiry
    }

    async fn issue(&self, req: IssueRequest<'_>) -> Result<Issued> {
        let ttl = req.ttl.as_secs();
        let oauth_scopes = self.settings.oauth_scopes_for(req.scopes)?;
        // Impersonation needs a federated token that may call the IAM Credentials API.
        let sts_scope = match self.generate_url {
            Some(_) => CLOUD_PLATFORM_SCOPE.to_owned(),
            None => oauth_scopes.join(" "),
        };
        if self.generate_url.is_some() {
            // While the IAM Credentials API is failing, fail fast before asking STS. A
            // permit dropped unused counts nothing.
            drop(self.iam_breaker.permit()?);
        }
        let life = ttl.min(self.settings.max_subject_token_lifetime_secs);
        let started = tokio::time::Instant::now();
        let (jti, fed) =
            http::retry_minting(self.retry, &self.sts_breaker, req.now, started, |iat| {
                self.exchange(&req, iat, life, &sts_scope)
            })
            .await?;
        let Some(url) = &self.generate_url else {
            self.check_max(i64::try_from(fed.expires_in).unwrap_or(i64::MAX))?;
            return Ok(http::bearer_issued(
                fed.access_token,
                req.now,
                started.elapsed(),
                fed.expires_in,
                jti,
            ));
        };
        let lifetime = self.impersonation_lifetime(ttl);
        // Held only for the IAM call; never logged.
        let federated = Secret::new(fed.access_token);
        let (token, expire_at) = http::retry(self.retry, &self.iam_breaker, |_attempt| {
            self.impersonate(url, federated.expose(), &oauth_scopes, lifetime)
        })
        .await?;
        let spent = started.elapsed();
        let answered = req
            .now
            .saturating_add(i64::try_from(spent.as_secs().saturating_add(1)).unwrap_or(i64::MAX));
        let lifetime_i = i64::try_from(lifetime).unwrap_or(i64::MAX);
        if expire_at <= req.now
            || expire_at
                > answered
                    .saturating_add(lifetime_i)
                    .saturating_add(EXPIRY_SKEW_SECS)
        {
            return Err(http::refused(format!(
                "{} answered an expireTime {}s from now, outside the {lifetime}s asked",
                http::host_of(url),
                expire_at.saturating_sub(req.now)
            )));
        }
        self.check_max(expire_at.saturating_sub(req.now))?;
        Ok(http::bearer_issued(
            token,
            req.now,
            Duration::ZERO,
            u64::try_from(expire_at.saturating_sub(req.now)).unwrap_or(0),
            jti,
        ))
    }

    /// Nothing to call: Google documents no revocation of federated or impersonated
    /// access tokens (PROTOCOLS.md §4.2). States the residual lifetime. Revoking twice
    /// gives the same answer.
    async fn revoke(&self, req: RevokeRequest<'_>) -> Result<RevokeOutcome> {
        Ok(http::lapses_at_expiry(
            &req,
            "Google documents no revocation of federated or service-account access tokens",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AUD: &str = "//iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/lanyard-pool/providers/lanyard-prov";

    fn base() -> Value {
        json!({"audience": AUD})
    }

    fn with(k: &str, v: Value) -> Value {
        let mut b = base();
        b.as_object_mut().unwrap().insert(k.into(), v);
        b
    }

    fn url() -> Url {
        Url::parse("https://sts.googleapis.com/v1/token").unwrap()
    }

    #[test]
    fn settings_defaults() {
        let s = GcpStsSettings::from_value(&base()).unwrap();
        assert_eq!(s.sts_url, DEFAULT_STS_URL);
        assert_eq!(s.iam_credentials_url, DEFAULT_IAM_CREDENTIALS_URL);
        assert_eq!(s.oauth_scopes, vec![CLOUD_PLATFORM_SCOPE.to_owned()]);
        assert_eq!(s.max_lifetime_secs, 3600);
        assert_eq!(s.max_subject_token_lifetime_secs, 300);
        assert_eq!(s.subject_audience(), format!("https:{AUD}"));
        assert!(s.service_account.is_none());
        let s = GcpStsSettings::from_value(&with(
            "subject_token_audience",
            json!("https://lanyard.example/gcp"),
        ))
        .unwrap();
        assert_eq!(s.subject_audience(), "https://lanyard.example/gcp");
    }

    #[test]
    fn settings_errors() {
        for (v, want) in [
            (json!({}), "missing field `audience`"),
            (Value::Null, "missing field"),
            (with("bogus", json!(1)), "unknown field"),
            (
                with("sts_url", json!("http://sts.googleapis.com/v1/token")),
                "https is required",
            ),
            (
                with("iam_credentials_url", json!("http://10.1.1.1")),
                "https is required",
            ),
            (
                json!({"audience": "https://iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/pool/providers/prov"}),
                "must be //iam.googleapis.com",
            ),
            (
                json!({"audience": "//iam.googleapis.com/projects/my-project/locations/global/workloadIdentityPools/pool/providers/prov"}),
                "project number",
            ),
            (
                json!({"audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/pool/providers"}),
                "must be",
            ),
            (
                json!({"audience": "//iam.googleapis.com/projects/1/locations/eu/workloadIdentityPools/pool/providers/prov"}),
                "must be",
            ),
            (
                json!({"audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/Pool_1/providers/prov"}),
                "must be",
            ),
            (with("oauth_scopes", json!([])), "1-32 OAuth scopes"),
            (with("oauth_scopes", json!(["a b"])), "without whitespace"),
            (
                with("oauth_scopes_by_scope", json!({"bad scope": ["x"]})),
                "oauth_scopes_by_scope key",
            ),
            (
                with("oauth_scopes_by_scope", json!({"read": []})),
                "oauth_scopes_by_scope.read",
            ),
            (
                with("service_account", json!("not-an-email")),
                "service account",
            ),
            (
                with("service_account", json!("a@b@c.iam.gserviceaccount.com")),
                "service account",
            ),
            (
                with("delegates", json!(["x@p.iam.gserviceaccount.com"])),
                "needs settings.service_account",
            ),
            (with("max_lifetime_secs", json!(0)), "1..=43200"),
            (with("max_lifetime_secs", json!(43_201)), "1..=43200"),
            (
                with("max_subject_token_lifetime_secs", json!(59)),
                "60..=3600",
            ),
            (with("max_token_lifetime_secs", json!(10)), "60..=86400"),
            (with("timeout_secs", json!(0)), "1..=120"),
            (with("max_response_bytes", json!(10)), "1024..="),
            (with("max_attempts", json!(6)), "1..=5"),
            (with("breaker_threshold", json!(0)), "1..=1000"),
            (with("max_lifetime_secs", json!(-1)), "settings:"),
        ] {
            let msg = GcpStsSettings::from_value(&v).unwrap_err().to_string();
            assert!(msg.contains(want), "{v}: {msg}");
        }
        let mut v = with("service_account", json!("sa@p.iam.gserviceaccount.com"));
        v["delegates"] = json!(["not an account"]);
        let msg = GcpStsSettings::from_value(&v).unwrap_err().to_string();
        assert!(msg.contains("delegates entry"), "{msg}");
        // Loopback may be plain http (tests).
        let mut v = with("sts_url", json!("http://127.0.0.1:9/v1/token"));
        v["iam_credentials_url"] = json!("http://[::1]:9");
        GcpStsSettings::from_value(&v).unwrap();
        // A numeric unique ID is a service account too.
        GcpStsSettings::from_value(&with("service_account", json!("123456789012345678901")))
            .unwrap();
    }

    #[test]
    fn oauth_scopes_follow_lanyard_scopes() {
        let mut v = base();
        v["oauth_scopes_by_scope"] = json!({
            "storage-read": ["https://www.googleapis.com/auth/devstorage.read_only"],
            "bq": ["https://www.googleapis.com/auth/bigquery", "https://www.googleapis.com/auth/devstorage.read_only"],
        });
        let s = GcpStsSettings::from_value(&v).unwrap();
        let sc = |x: &str| Scope::parse(x).unwrap();
        assert_eq!(s.oauth_scopes_for(&[]).unwrap(), vec![CLOUD_PLATFORM_SCOPE]);
        assert_eq!(
            s.oauth_scopes_for(&[sc("storage-read"), sc("bq")]).unwrap(),
            vec![
                "https://www.googleapis.com/auth/devstorage.read_only",
                "https://www.googleapis.com/auth/bigquery"
            ]
        );
        let e = s.oauth_scopes_for(&[sc("admin")]).unwrap_err();
        assert!(matches!(e, DestinationError::BadRequest(_)), "{e}");
        // Unmapped lanyard scopes are just labels when no map is set.
        let s = GcpStsSettings::from_value(&base()).unwrap();
        assert_eq!(
            s.oauth_scopes_for(&[sc("x")]).unwrap(),
            vec![CLOUD_PLATFORM_SCOPE]
        );
    }

    #[test]
    fn request_bodies() {
        let b = sts_body(AUD, "a b", "eyJ.x.y");
        assert_eq!(
            b,
            json!({
                "grantType": "urn:ietf:params:oauth:grant-type:token-exchange",
                "audience": AUD,
                "scope": "a b",
                "requestedTokenType": "urn:ietf:params:oauth:token-type:access_token",
                "subjectTokenType": "urn:ietf:params:oauth:token-type:jwt",
                "subjectToken": "eyJ.x.y",
            })
        );
        let b = generate_access_token_body(
            &[CLOUD_PLATFORM_SCOPE.to_owned()],
            300,
            &["projects/-/serviceAccounts/d@p.iam.gserviceaccount.com".to_owned()],
        );
        assert_eq!(
            b,
            json!({
                "scope": [CLOUD_PLATFORM_SCOPE],
                "lifetime": "300s",
                "delegates": ["projects/-/serviceAccounts/d@p.iam.gserviceaccount.com"],
            })
        );
        let mut v = with("service_account", json!("sa@p.iam.gserviceaccount.com"));
        v["delegates"] = json!([
            "d1@p.iam.gserviceaccount.com",
            "projects/-/serviceAccounts/d2@p.iam.gserviceaccount.com"
        ]);
        let s = GcpStsSettings::from_value(&v).unwrap();
        assert_eq!(
            s.delegate_names(),
            vec![
                "projects/-/serviceAccounts/d1@p.iam.gserviceaccount.com",
                "projects/-/serviceAccounts/d2@p.iam.gserviceaccount.com"
            ]
        );
    }

    #[test]
    fn sts_answers() {
        let a = parse_sts_answer(
            br#"{"access_token":"ya29.x","issued_token_type":"urn:ietf:params:oauth:token-type:access_token","token_type":"Bearer","expires_in":3599}"#,
            &url(),
        )
        .unwrap();
        assert_eq!((a.access_token.as_str(), a.expires_in), ("ya29.x", 3599));
        for (body, want) in [
            (&br#"not json"#[..], "malformed token response (not json)"),
            (br#"{"access_token":"x"}"#, "unexpected shape"),
            (br#"{"access_token":"x","token_type":"Bearer","expires_in":-5}"#, "unexpected shape"),
            (br#"{"access_token":"x","token_type":"Bearer","expires_in":"3600"}"#, "unexpected shape"),
            (br#"{"access_token":"","token_type":"Bearer","expires_in":3600}"#, "without an access_token"),
            (br#"{"access_token":"x","token_type":"Bearer","expires_in":0}"#, "positive expires_in"),
            (br#"{"access_token":"x","token_type":"MAC","expires_in":60}"#, "not Bearer"),
            (
                br#"{"access_token":"x","token_type":"Bearer","expires_in":60,"issued_token_type":"urn:ietf:params:oauth:token-type:jwt"}"#,
                "not an access token",
            ),
            (br#"{"access_token":"x","tok"#, "truncated json"),
        ] {
            let e = parse_sts_answer(body, &url()).unwrap_err();
            assert!(!http::is_retryable(&e), "{e}");
            assert!(e.to_string().contains(want), "{}: {e}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn generate_access_token_answers() {
        let (t, at) = parse_generated_token(
            br#"{"accessToken":"ya29.sa","expireTime":"2026-11-24T03:00:00Z"}"#,
            &url(),
        )
        .unwrap();
        assert_eq!((t.as_str(), at), ("ya29.sa", 1_795_489_200));
        let (_, at) = parse_generated_token(
            br#"{"accessToken":"ya29.sa","expireTime":"2026-11-24T03:00:00.123456789Z"}"#,
            &url(),
        )
        .unwrap();
        assert_eq!(at, 1_795_489_200);
        for (body, want) in [
            (&br#"{"accessToken":"ya29.sa"}"#[..], "unexpected shape"),
            (
                br#"{"accessToken":"","expireTime":"2026-11-24T03:00:00Z"}"#,
                "empty accessToken",
            ),
            (
                br#"{"accessToken":"x","expireTime":"tomorrow"}"#,
                "RFC 3339",
            ),
            (
                br#"{"access_token":"x","expires_in":3600}"#,
                "unexpected shape",
            ),
            (b"<html>", "not json"),
        ] {
            let e = parse_generated_token(body, &url()).unwrap_err();
            assert!(!http::is_retryable(&e), "{e}");
            assert!(e.to_string().contains(want), "{e}");
        }
    }

    /// The error shapes both Google APIs document, as the shared HTTP mapping passes
    /// them on.
    #[test]
    fn error_shapes_map_to_rejected_or_unavailable() {
        use reqwest::StatusCode;
        let sts = br#"{"error":"invalid_grant","error_description":"The audience in ID Token [https://x] does not match the expected audience. eyJhbGciOiJFUzI1NiJ9.e30.sig"}"#;
        let e = http::status_error("sts.googleapis.com", StatusCode::BAD_REQUEST, sts);
        assert!(!http::is_retryable(&e));
        let m = e.to_string();
        assert!(m.contains("http 400: invalid_grant: The audience"), "{m}");
        assert!(!m.contains("eyJ"), "{m}");
        let iam = br#"{"error":{"code":403,"message":"Permission 'iam.serviceAccounts.getAccessToken' denied on resource (or it may not exist).","status":"PERMISSION_DENIED","details":[]}}"#;
        let e = http::status_error("iamcredentials.googleapis.com", StatusCode::FORBIDDEN, iam);
        assert!(!http::is_retryable(&e));
        assert!(
            e.to_string()
                .contains("http 403: PERMISSION_DENIED: Permission"),
            "{e}"
        );
        let busy =
            br#"{"error":{"code":429,"message":"Quota exceeded","status":"RESOURCE_EXHAUSTED"}}"#;
        let e = http::status_error(
            "iamcredentials.googleapis.com",
            StatusCode::TOO_MANY_REQUESTS,
            busy,
        );
        assert!(http::is_retryable(&e));
        assert!(e.to_string().contains("RESOURCE_EXHAUSTED"), "{e}");
        let e = http::status_error(
            "sts.googleapis.com",
            StatusCode::SERVICE_UNAVAILABLE,
            b"<html>",
        );
        assert!(http::is_retryable(&e));
    }
}
