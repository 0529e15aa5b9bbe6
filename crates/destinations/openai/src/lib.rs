//! The `openai` destination: lanyard mints a short-lived subject token for the workload
//! and exchanges it at OpenAI's token endpoint (OpenAI workload identity federation, an
//! RFC 8693 token exchange with two extra parameters) for an OpenAI access token.
//! The protocol is the one written down in PROTOCOLS.md §2, from OpenAI's exchange
//! reference and the official Python SDK (`openai/auth/_workload.py`).
//!
//! # Exchange (PROTOCOLS.md §2.1)
//! ```text
//! POST <token_url>                       (default https://auth.openai.com/oauth/token)
//! Content-Type: application/json
//!
//! {"grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
//!  "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
//!  "subject_token": "<jwt>",
//!  "identity_provider_id": "...", "service_account_id": "..."}
//! ```
//! No `scope` is sent: "A scope value in the request body doesn't grant access"; the
//! permissions come from the provider's federation rule. The answer must carry
//! `access_token` (string) and `expires_in` (positive), as the SDK requires; a 400, 401
//! or 403 is an OAuth error. The credential is a [`Credential::Bearer`] sent as
//! `Authorization: Bearer <token>`.
//!
//! # Subject token
//! A JWS signed by lanyard's active key, header `{"alg", "kid", "typ": "JWT"}`, with the
//! claims §2.1 requires: `iss` (lanyard's issuer URL, which the workload identity
//! provider must name), `aud` (the provider's `audience`, one string), `sub` (the
//! workload ID), `iat`, `exp` (`iat` + the grant's TTL, at most
//! `max_subject_token_lifetime_secs`), a fresh `jti`, and `lanyard` =
//! `{grant_id, destination}`. The token is useless at any other audience.
//!
//! # Settings
//! | key | default | meaning |
//! |---|---|---|
//! | `token_url` | `https://auth.openai.com/oauth/token` | https, or http only on loopback |
//! | `identity_provider_id` | required | the workload identity provider registered for lanyard's issuer |
//! | `service_account_id` | required | the service account the federation rule maps to |
//! | `audience` | required | the provider's `audience`: the subject token's one `aud` |
//! | `max_subject_token_lifetime_secs` | 900 | longest subject token lanyard mints, 60..=3600 |
//! | `max_token_lifetime_secs` | unset | when set, an access token living longer is refused (`DESTINATION_REJECTED`) rather than handed out |
//! | `timeout_secs` | 10 | per request, 1..=120 |
//! | `max_response_bytes` | 1 MiB | 1024..=16 MiB |
//! | `max_attempts` | 2 | 1..=5; each attempt mints a fresh subject token |
//! | `breaker_threshold` / `breaker_cooldown_secs` | 5 / 30 | circuit breaker: fail fast after this many retryable failures in a row, for this long |
//!
//! Unknown keys are refused.
//!
//! # Lifetime and revocation (PROTOCOLS.md §2.3: UNCONFIRMED)
//! OpenAI documents neither the access token's lifetime nor a revocation endpoint; a
//! third-party tutorial reports that access tokens never outlive the subject token.
//! lanyard therefore mints the subject token to expire with the grant, reports the
//! expiry OpenAI states (`expires_in`), and answers a revocation with
//! [`RevokeOutcome::ExpiresAt`] at that time: [`Revocability::AtExpiry`]. Set
//! `max_token_lifetime_secs` to refuse tokens that would outlive what you accept.

use std::sync::Arc;

use async_trait::async_trait;
use lanyard_core::{SystemClock, UnixTime};
use lanyard_destination::http::{self, Body, CircuitBreaker, RetryPolicy};
use lanyard_destination::settings::{self, Plumbing};
use lanyard_destination::{
    Destination, DestinationError, DestinationSpec, IssueRequest, Issued, Revocability,
    RevokeOutcome, RevokeRequest, TokenMinter,
};
use reqwest::header::HeaderMap;
use reqwest::{Client, Url};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The adapter kind this crate implements.
pub const KIND: &str = "openai";
/// RFC 8693 grant type.
pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// The subject token's type.
pub const SUBJECT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
/// The documented token endpoint.
pub const DEFAULT_TOKEN_URL: &str = "https://auth.openai.com/oauth/token";

/// Adapter errors are [`DestinationError`]s.
pub type Result<T, E = DestinationError> = std::result::Result<T, E>;

/// The `settings` block of an `openai` destination (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiSettings {
    /// Token endpoint.
    #[serde(default = "default_token_url")]
    pub token_url: String,
    /// The workload identity provider for lanyard's issuer.
    pub identity_provider_id: String,
    /// The service account the federation rule maps to.
    pub service_account_id: String,
    /// The provider's audience.
    pub audience: String,
    /// Longest subject token lanyard mints, seconds.
    #[serde(default = "default_subject_lifetime")]
    pub max_subject_token_lifetime_secs: u64,
    /// Refuse access tokens living longer than this, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_token_lifetime_secs: Option<u64>,
    /// Per-request timeout, seconds.
    #[serde(default = "settings::default_timeout_secs")]
    pub timeout_secs: u64,
    /// Largest answer read, bytes.
    #[serde(default = "settings::default_max_response_bytes")]
    pub max_response_bytes: usize,
    /// Attempts per exchange.
    #[serde(default = "settings::default_max_attempts")]
    pub max_attempts: u32,
    /// Retryable failures in a row that open the breaker.
    #[serde(default = "settings::default_breaker_threshold")]
    pub breaker_threshold: u32,
    /// How long the breaker stays open, seconds.
    #[serde(default = "settings::default_breaker_cooldown_secs")]
    pub breaker_cooldown_secs: u64,
}

fn default_token_url() -> String {
    DEFAULT_TOKEN_URL.to_owned()
}
fn default_subject_lifetime() -> u64 {
    900
}

fn range(field: &str, v: u64, lo: u64, hi: u64) -> Result<()> {
    settings::check_range(KIND, field, v, lo, hi)
}

fn text(field: &str, v: &str) -> Result<()> {
    settings::check_text(KIND, field, v, 512)
}

impl OpenAiSettings {
    /// Parse and validate a `settings` block.
    ///
    /// # Errors
    /// [`DestinationError::InvalidSettings`] naming the problem.
    pub fn from_value(settings: &Value) -> Result<Self> {
        let s: OpenAiSettings = settings::parse(KIND, settings)?;
        settings::check_endpoint(KIND, "token_url", &s.token_url)?;
        text("identity_provider_id", &s.identity_provider_id)?;
        text("service_account_id", &s.service_account_id)?;
        text("audience", &s.audience)?;
        range(
            "max_subject_token_lifetime_secs",
            s.max_subject_token_lifetime_secs,
            60,
            3600,
        )?;
        if let Some(m) = s.max_token_lifetime_secs {
            range("max_token_lifetime_secs", m, 60, 86_400)?;
        }
        lanyard_destination::tuning!(s).check(KIND)?;
        Ok(s)
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: u64,
}

/// An `openai` destination.
pub struct OpenAiDestination {
    name: String,
    settings: OpenAiSettings,
    token_url: Url,
    client: Client,
    breaker: CircuitBreaker,
    retry: RetryPolicy,
    minter: Arc<dyn TokenMinter>,
}

impl std::fmt::Debug for OpenAiDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiDestination")
            .field("name", &self.name)
            .field("settings", &self.settings)
            .field("issuer", &self.minter.issuer_url())
            .finish_non_exhaustive()
    }
}

impl OpenAiDestination {
    /// Build the adapter from its spec.
    ///
    /// # Errors
    /// [`DestinationError::InvalidSettings`].
    pub fn new(spec: &DestinationSpec, minter: Arc<dyn TokenMinter>) -> Result<Self> {
        settings::check_spec(KIND, spec)?;
        let settings = OpenAiSettings::from_value(&spec.settings)?;
        let token_url = settings::check_endpoint(KIND, "token_url", &settings.token_url)?;
        let Plumbing {
            client,
            breaker,
            retry,
        } = lanyard_destination::tuning!(settings).plumbing(
            KIND,
            &format!("destination {}", spec.name),
            SystemClock::shared(),
            None,
        )?;
        Ok(Self {
            name: spec.name.clone(),
            settings,
            token_url,
            client,
            breaker,
            retry,
            minter,
        })
    }

    /// The parsed settings.
    pub fn settings(&self) -> &OpenAiSettings {
        &self.settings
    }

    async fn attempt(
        &self,
        req: &IssueRequest<'_>,
        iat: UnixTime,
        life: u64,
    ) -> Result<(String, TokenResponse)> {
        let (jti, subject) = lanyard_destination::mint_workload_jwt(
            self.minter.as_ref(),
            req,
            &self.name,
            &self.settings.audience,
            iat,
            life,
        )?;
        let body = json!({
            "grant_type": GRANT_TYPE,
            "subject_token_type": SUBJECT_TOKEN_TYPE,
            "subject_token": subject.expose(),
            "identity_provider_id": self.settings.identity_provider_id,
            "service_account_id": self.settings.service_account_id,
        });
        let raw = http::post(
            &self.client,
            &self.token_url,
            HeaderMap::new(),
            Body::Json(&body),
            self.settings.max_response_bytes,
        )
        .await?;
        let parsed: TokenResponse = http::parse_json(&raw, &self.token_url, "token response")?;
        Ok((jti, parsed))
    }
}

#[async_trait]
impl Destination for OpenAiDestination {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn revocability(&self) -> Revocability {
        Revocability::AtExpiry
    }

    async fn issue(&self, req: IssueRequest<'_>) -> Result<Issued> {
        let life = req
            .ttl
            .as_secs()
            .min(self.settings.max_subject_token_lifetime_secs);
        let started = tokio::time::Instant::now();
        let (jti, resp) = http::retry_minting(self.retry, &self.breaker, req.now, started, |iat| {
            self.attempt(&req, iat, life)
        })
        .await?;
        let host = http::host_of(&self.token_url);
        if resp.access_token.is_empty() || resp.expires_in == 0 {
            return Err(http::refused(format!(
                "{host} answered without an access_token or a positive expires_in"
            )));
        }
        http::check_max_lifetime(
            &host,
            resp.expires_in,
            self.settings.max_token_lifetime_secs,
        )?;
        Ok(http::bearer_issued(
            resp.access_token,
            req.now,
            started.elapsed(),
            resp.expires_in,
            jti,
        ))
    }

    /// Nothing to call: no revocation endpoint is documented (PROTOCOLS.md §2.3). States
    /// the residual lifetime. Revoking twice gives the same answer.
    async fn revoke(&self, req: RevokeRequest<'_>) -> Result<RevokeOutcome> {
        Ok(http::lapses_at_expiry(
            &req,
            "OpenAI documents no revocation",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        json!({"identity_provider_id": "idp_1", "service_account_id": "sa_1", "audience": "https://api.openai.com"})
    }

    #[test]
    fn settings_defaults_and_errors() {
        let s = OpenAiSettings::from_value(&base()).unwrap();
        assert_eq!(s.token_url, DEFAULT_TOKEN_URL);
        assert_eq!(s.max_subject_token_lifetime_secs, 900);
        let with = |k: &str, v: Value| {
            let mut b = base();
            b.as_object_mut().unwrap().insert(k.into(), v);
            b
        };
        for (v, want) in [
            (json!({}), "missing field"),
            (with("bogus", json!(1)), "unknown field"),
            (
                with("token_url", json!("http://auth.openai.com/oauth/token")),
                "https",
            ),
            (with("audience", json!(" ")), "settings.audience"),
            (
                with("max_subject_token_lifetime_secs", json!(10)),
                "60..=3600",
            ),
            (with("max_token_lifetime_secs", json!(10)), "60..=86400"),
            (with("max_attempts", json!(0)), "1..=5"),
        ] {
            let msg = OpenAiSettings::from_value(&v).unwrap_err().to_string();
            assert!(msg.contains(want), "{v}: {msg}");
        }
        OpenAiSettings::from_value(&with("token_url", json!("http://127.0.0.1:1/t"))).unwrap();
    }
}
