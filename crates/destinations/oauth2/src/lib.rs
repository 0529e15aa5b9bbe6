//! The `oauth2` destination: a generic OAuth 2.0 authorization server that trusts
//! lanyard's issuer. lanyard mints a short-lived JWT for the workload and exchanges it at
//! the server's token endpoint, either as an RFC 8693 token exchange (`subject_token`) or
//! as an RFC 7523 §2.1 JWT-bearer grant (`assertion`), and hands out the access token it
//! gets. When the server offers RFC 7009 revocation, a revoked grant's token is revoked
//! there; otherwise the receipt states the residual lifetime (PROTOCOLS.md §6).
//!
//! # Exchange
//! ```text
//! POST <token_url>
//! Content-Type: application/x-www-form-urlencoded
//!
//! token-exchange (RFC 8693 §2.1):
//!   grant_type=urn:ietf:params:oauth:grant-type:token-exchange
//!   &subject_token=<jwt>&subject_token_type=urn:ietf:params:oauth:token-type:jwt
//!   [&audience=..][&resource=..][&requested_token_type=..][&scope=..]
//! jwt-bearer (RFC 7523 §2.1):
//!   grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=<jwt>[&scope=..]
//! ```
//! plus the client authentication configured (RFC 6749 §2.3.1 `client_secret_basic` or
//! `client_secret_post`, RFC 7523 §2.2 `private_key_jwt` with a second lanyard-minted
//! JWT whose `iss` and `sub` are the client ID and whose `aud` is the token endpoint, or
//! none: a public client sends only `client_id`). The answer is RFC 6749 §5.1 JSON:
//! `access_token`, `token_type` (`Bearer`, or RFC 8693's `N_A`), `expires_in`, and for
//! token exchange `issued_token_type`; errors are RFC 6749 §5.2 and their `error` code
//! is passed through.
//!
//! # The JWT lanyard signs
//! `iss` lanyard's issuer URL, `sub` the workload ID, one `aud` (`assertion_audience`,
//! by default the token endpoint URL as RFC 7523 §3 allows), `iat`, `exp` at most
//! `max_assertion_lifetime_secs` later and never after the grant, a fresh `jti` (the
//! server may refuse replays), and `lanyard` = `{grant_id, destination}`.
//!
//! # Scopes
//! The granted lanyard scopes are sent as `scope`, each replaced by its `scope_map`
//! entry when there is one (a lanyard scope may stand for several OAuth scopes).
//! `send_scope = false` sends none.
//!
//! # Revocation (RFC 7009)
//! With `revocation_url` set, lanyard keeps the issued access token sealed (AES-256-GCM
//! under the server's seal key, bound to the grant ID: see `lanyard_keys::SealKey`) as
//! the grant's revocation handle, because RFC 7009 revokes a token by value. `revoke`
//! POSTs `token=<token>&token_type_hint=access_token` with the same client
//! authentication: 200 is `revoked` (§2.2: also for a token the server no longer knows);
//! `unsupported_token_type` means the server will not revoke access tokens, so the
//! receipt is `expires_at`; 503 and other 5xx or 429 are retried by the revocation job.
//! Without `revocation_url` the handle is the JWT's `jti` and a revocation is
//! `expires_at` with the residual lifetime.
//!
//! # Settings
//! | key | default | meaning |
//! |---|---|---|
//! | `token_url` | required | https, or http only on loopback |
//! | `grant` | `token-exchange` | or `jwt-bearer` |
//! | `assertion_audience` | `token_url` | the JWT's one `aud` |
//! | `max_assertion_lifetime_secs` | 300 | 30..=3600 |
//! | `audience`, `resource`, `requested_token_type` | unset | RFC 8693 parameters (token-exchange only) |
//! | `scope_map` | empty | lanyard scope → space-separated OAuth scopes |
//! | `send_scope` | true | send `scope` at all |
//! | `client_id` | unset | required for every `client_auth` but `none` |
//! | `client_auth` | `none` | `none`, `client_secret_basic`, `client_secret_post`, `private_key_jwt` |
//! | `client_secret_file` | unset | file holding the client secret (not readable by group or others) |
//! | `revocation_url` | unset | RFC 7009 endpoint; https, or http only on loopback |
//! | `default_expires_in_secs` | unset | lifetime assumed when the answer has no `expires_in` (otherwise such an answer is refused) |
//! | `max_token_lifetime_secs` | unset | refuse tokens living longer |
//! | `timeout_secs` / `max_response_bytes` / `max_attempts` | 10 / 1 MiB / 2 | as every adapter |
//! | `breaker_threshold` / `breaker_cooldown_secs` | 5 / 30 | circuit breaker |
//!
//! Unknown keys are refused.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use base64::Engine as _;
use lanyard_core::{Secret, SystemClock, UnixTime};
use lanyard_destination::http::{self, Body, CircuitBreaker, RetryPolicy};
use lanyard_destination::settings::{self, Plumbing};
use lanyard_destination::{
    Credential, Destination, DestinationError, DestinationSpec, IssueRequest, Issued, Revocability,
    RevokeOutcome, RevokeRequest, Sealer, TokenMinter,
};
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use reqwest::{Client, StatusCode, Url};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The adapter kind this crate implements.
pub const KIND: &str = "oauth2";
/// RFC 8693 grant type.
pub const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// RFC 7523 §2.1 grant type.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// RFC 7523 §2.2 client assertion type.
pub const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// The subject token's type.
pub const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
/// How a sealed revocation handle starts (`lanyard_keys::SealKey`'s format).
const SEALED_PREFIX: &str = "v1.";
/// Seconds a token may outlive its grant (rounding between the server's clock and ours).
const TTL_SLACK_SECS: u64 = 5;
/// Largest revocation answer read (RFC 7009 answers carry no body on success).
const MAX_REVOKE_RESPONSE: usize = 64 << 10;

/// Adapter errors are [`DestinationError`]s.
pub type Result<T, E = DestinationError> = std::result::Result<T, E>;

/// Which grant lanyard asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Grant {
    /// RFC 8693 token exchange.
    #[default]
    TokenExchange,
    /// RFC 7523 §2.1 JWT-bearer.
    JwtBearer,
}

/// How lanyard authenticates as an OAuth client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// A public client (sends `client_id` when one is set).
    #[default]
    None,
    /// RFC 6749 §2.3.1 HTTP Basic.
    ClientSecretBasic,
    /// RFC 6749 §2.3.1 in the body.
    ClientSecretPost,
    /// RFC 7523 §2.2 with a lanyard-signed client assertion.
    PrivateKeyJwt,
}

/// The `settings` block of an `oauth2` destination (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuth2Settings {
    /// Token endpoint.
    pub token_url: String,
    /// The grant asked for.
    #[serde(default)]
    pub grant: Grant,
    /// The JWT's audience (default: `token_url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assertion_audience: Option<String>,
    /// Longest JWT lanyard mints, seconds.
    #[serde(default = "default_assertion_lifetime")]
    pub max_assertion_lifetime_secs: u64,
    /// RFC 8693 `audience`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// RFC 8693 `resource`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// RFC 8693 `requested_token_type`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_token_type: Option<String>,
    /// lanyard scope → OAuth scopes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub scope_map: BTreeMap<String, String>,
    /// Send `scope`.
    #[serde(default = "yes")]
    pub send_scope: bool,
    /// OAuth client ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Client authentication.
    #[serde(default)]
    pub client_auth: ClientAuth,
    /// File holding the client secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_file: Option<String>,
    /// RFC 7009 revocation endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation_url: Option<String>,
    /// Lifetime assumed when the answer has no `expires_in`, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_expires_in_secs: Option<u64>,
    /// Refuse tokens living longer than this, seconds.
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

fn yes() -> bool {
    true
}
fn default_assertion_lifetime() -> u64 {
    300
}

fn bad(message: String) -> DestinationError {
    settings::invalid(KIND, message)
}

fn range(field: &str, v: u64, lo: u64, hi: u64) -> Result<()> {
    settings::check_range(KIND, field, v, lo, hi)
}

fn text(field: &str, v: &str) -> Result<()> {
    settings::check_text(KIND, field, v, 1024)
}

/// RFC 6749 §3.3 scope-token characters (and the space between tokens).
fn scope_text(field: &str, v: &str) -> Result<()> {
    text(field, v)?;
    if !v
        .bytes()
        .all(|b| b == b' ' || matches!(b, 0x21 | 0x23..=0x5B | 0x5D..=0x7E))
    {
        return Err(bad(format!(
            "settings.{field} holds a character RFC 6749 §3.3 does not allow in a scope"
        )));
    }
    Ok(())
}

impl OAuth2Settings {
    /// Parse and validate a `settings` block (the client secret file is read later, by
    /// [`OAuth2Destination::new`]).
    ///
    /// # Errors
    /// [`DestinationError::InvalidSettings`] naming the problem.
    pub fn from_value(settings: &Value) -> Result<Self> {
        let s: OAuth2Settings = settings::parse(KIND, settings)?;
        settings::check_endpoint(KIND, "token_url", &s.token_url)?;
        if let Some(u) = &s.revocation_url {
            settings::check_endpoint(KIND, "revocation_url", u)?;
        }
        for (field, v) in [
            ("assertion_audience", &s.assertion_audience),
            ("audience", &s.audience),
            ("requested_token_type", &s.requested_token_type),
            ("client_id", &s.client_id),
            ("client_secret_file", &s.client_secret_file),
        ] {
            if let Some(v) = v {
                text(field, v)?;
            }
        }
        if let Some(r) = &s.resource {
            let u = Url::parse(r)
                .map_err(|_| bad("settings.resource must be an absolute URI".into()))?;
            if u.fragment().is_some() {
                return Err(bad(
                    "settings.resource must not have a fragment (RFC 8707 §2)".into(),
                ));
            }
        }
        if s.grant == Grant::JwtBearer
            && (s.audience.is_some() || s.resource.is_some() || s.requested_token_type.is_some())
        {
            return Err(bad(
                "settings.audience, resource and requested_token_type are RFC 8693 parameters; set grant = \"token-exchange\" or remove them".into(),
            ));
        }
        for (scope, oauth) in &s.scope_map {
            scope_text(&format!("scope_map.{scope}"), oauth)?;
        }
        range(
            "max_assertion_lifetime_secs",
            s.max_assertion_lifetime_secs,
            30,
            3600,
        )?;
        if let Some(d) = s.default_expires_in_secs {
            range("default_expires_in_secs", d, 1, 86_400)?;
        }
        if let Some(m) = s.max_token_lifetime_secs {
            range("max_token_lifetime_secs", m, 30, 86_400)?;
        }
        lanyard_destination::tuning!(s).check(KIND)?;
        match (s.client_auth, &s.client_id, &s.client_secret_file) {
            (ClientAuth::None, _, Some(_)) => {
                return Err(bad(
                    "settings.client_secret_file needs client_auth client_secret_basic or client_secret_post".into(),
                ));
            }
            (ClientAuth::None, _, None) => {}
            (_, None, _) => {
                return Err(bad(format!(
                    "settings.client_auth {:?} needs settings.client_id",
                    s.client_auth
                )));
            }
            (ClientAuth::ClientSecretBasic | ClientAuth::ClientSecretPost, Some(_), None) => {
                return Err(bad(
                    "settings.client_auth client_secret_basic/client_secret_post needs settings.client_secret_file".into(),
                ));
            }
            (ClientAuth::PrivateKeyJwt, Some(_), Some(_)) => {
                return Err(bad(
                    "settings.client_secret_file is not used with client_auth private_key_jwt; remove it".into(),
                ));
            }
            _ => {}
        }
        Ok(s)
    }
}

/// Read the client secret file.
fn read_client_secret(path: &str) -> Result<Secret> {
    lanyard_destination::read_secret_file(KIND, "client_secret_file", path)
}

/// `application/x-www-form-urlencoded` of one value (RFC 6749 §2.3.1 encodes the client
/// ID and secret this way before Basic).
fn form_encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
    #[serde(default)]
    issued_token_type: Option<String>,
}

/// An `oauth2` destination.
pub struct OAuth2Destination {
    name: String,
    settings: OAuth2Settings,
    token_url: Url,
    revocation_url: Option<Url>,
    assertion_audience: String,
    client_secret: Option<Secret>,
    client: Client,
    breaker: CircuitBreaker,
    retry: RetryPolicy,
    minter: Arc<dyn TokenMinter>,
    sealer: Arc<dyn Sealer>,
}

impl std::fmt::Debug for OAuth2Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuth2Destination")
            .field("name", &self.name)
            .field("settings", &self.settings)
            .field("issuer", &self.minter.issuer_url())
            .finish_non_exhaustive()
    }
}

impl OAuth2Destination {
    /// Build the adapter from its spec; reads the client secret file.
    ///
    /// # Errors
    /// [`DestinationError::InvalidSettings`].
    pub fn new(
        spec: &DestinationSpec,
        minter: Arc<dyn TokenMinter>,
        sealer: Arc<dyn Sealer>,
    ) -> Result<Self> {
        settings::check_spec(KIND, spec)?;
        let settings = OAuth2Settings::from_value(&spec.settings)?;
        for scope in spec
            .scopes
            .iter()
            .filter(|s| !settings.scope_map.contains_key(*s))
        {
            if settings.send_scope {
                scope_text(&format!("scopes ({scope})"), scope)?;
            }
        }
        for mapped in settings.scope_map.keys() {
            if !spec.scopes.contains(mapped) {
                return Err(bad(format!(
                    "settings.scope_map names {mapped:?}, which is not one of the destination's scopes"
                )));
            }
        }
        if let Some(id) = &settings.client_id
            && settings.client_auth == ClientAuth::PrivateKeyJwt
            && (id.trim_end_matches('/') == minter.issuer_url().trim_end_matches('/')
                || id.starts_with("spiffe://"))
        {
            // lanyard signs the client assertion with its issuer key: its `iss`/`sub` must
            // not pass for lanyard itself or for a workload.
            return Err(bad(
                "settings.client_id must not be lanyard's issuer URL or a workload ID with client_auth private_key_jwt".into(),
            ));
        }
        let token_url = settings::check_endpoint(KIND, "token_url", &settings.token_url)?;
        let revocation_url = settings
            .revocation_url
            .as_deref()
            .map(|u| settings::check_endpoint(KIND, "revocation_url", u))
            .transpose()?;
        let client_secret = settings
            .client_secret_file
            .as_deref()
            .map(read_client_secret)
            .transpose()?;
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
            assertion_audience: settings
                .assertion_audience
                .clone()
                .unwrap_or_else(|| settings.token_url.clone()),
            settings,
            token_url,
            revocation_url,
            client_secret,
            client,
            breaker,
            retry,
            minter,
            sealer,
        })
    }

    /// The parsed settings.
    pub fn settings(&self) -> &OAuth2Settings {
        &self.settings
    }

    /// The `scope` parameter for `req`, if any is sent.
    fn scope_param(&self, req: &IssueRequest<'_>) -> Option<String> {
        if !self.settings.send_scope || req.scopes.is_empty() {
            return None;
        }
        let mut out: Vec<&str> = Vec::new();
        for s in req.scopes {
            let mapped = self
                .settings
                .scope_map
                .get(s.as_str())
                .map_or(s.as_str(), String::as_str);
            for token in mapped.split(' ').filter(|t| !t.is_empty()) {
                if !out.contains(&token) {
                    out.push(token);
                }
            }
        }
        (!out.is_empty()).then(|| out.join(" "))
    }

    /// Client authentication: headers and body fields. A client assertion's `aud` is the
    /// token endpoint, also when it authenticates a revocation call (RFC 7523 §3 names the
    /// token endpoint; servers check their own URL, not the revocation endpoint's).
    fn client_auth(&self, now: UnixTime) -> Result<(HeaderMap, Vec<(&'static str, Secret)>)> {
        let at = &self.token_url;
        let mut headers = HeaderMap::new();
        let mut fields: Vec<(&'static str, Secret)> = Vec::new();
        let id = self.settings.client_id.as_deref();
        match (self.settings.client_auth, id, &self.client_secret) {
            (ClientAuth::None, Some(id), _) => fields.push(("client_id", Secret::new(id))),
            (ClientAuth::None, None, _) => {}
            (ClientAuth::ClientSecretBasic, Some(id), Some(secret)) => {
                let pair = format!("{}:{}", form_encode(id), form_encode(secret.expose()));
                let value = format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(pair)
                );
                let mut v = HeaderValue::from_str(&value)
                    .map_err(|_| bad("client credentials do not fit a header".into()))?;
                v.set_sensitive(true);
                headers.insert(AUTHORIZATION, v);
            }
            (ClientAuth::ClientSecretPost, Some(id), Some(secret)) => {
                fields.push(("client_id", Secret::new(id)));
                fields.push(("client_secret", secret.clone()));
            }
            (ClientAuth::PrivateKeyJwt, Some(id), _) => {
                let claims = serde_json::json!({
                    "iss": id,
                    "sub": id,
                    "aud": at.as_str(),
                    "iat": now,
                    "exp": now.saturating_add(60),
                    "jti": uuid::Uuid::new_v4().simple().to_string(),
                });
                let assertion = self
                    .minter
                    .mint(&claims, "JWT")
                    .map_err(DestinationError::Mint)?;
                fields.push(("client_id", Secret::new(id)));
                fields.push(("client_assertion_type", Secret::new(CLIENT_ASSERTION_TYPE)));
                fields.push(("client_assertion", assertion));
            }
            _ => return Err(bad("client authentication is not configured".into())),
        }
        Ok((headers, fields))
    }

    async fn attempt(
        &self,
        req: &IssueRequest<'_>,
        iat: UnixTime,
        life: u64,
    ) -> Result<(String, TokenResponse)> {
        let (jti, jwt) = lanyard_destination::mint_workload_jwt(
            self.minter.as_ref(),
            req,
            &self.name,
            &self.assertion_audience,
            iat,
            life,
        )?;
        let mut fields: Vec<(&'static str, Secret)> = Vec::new();
        match self.settings.grant {
            Grant::TokenExchange => {
                fields.push(("grant_type", Secret::new(TOKEN_EXCHANGE)));
                fields.push(("subject_token", jwt));
                fields.push(("subject_token_type", Secret::new(JWT_TOKEN_TYPE)));
                for (k, v) in [
                    ("audience", &self.settings.audience),
                    ("resource", &self.settings.resource),
                    ("requested_token_type", &self.settings.requested_token_type),
                ] {
                    if let Some(v) = v {
                        fields.push((k, Secret::new(v.as_str())));
                    }
                }
            }
            Grant::JwtBearer => {
                fields.push(("grant_type", Secret::new(JWT_BEARER)));
                fields.push(("assertion", jwt));
            }
        }
        if let Some(scope) = self.scope_param(req) {
            fields.push(("scope", Secret::new(scope)));
        }
        let (headers, auth) = self.client_auth(iat)?;
        fields.extend(auth);
        let pairs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.expose())).collect();
        let raw = http::post(
            &self.client,
            &self.token_url,
            headers,
            Body::Form(&pairs),
            self.settings.max_response_bytes,
        )
        .await?;
        let parsed: TokenResponse = http::parse_json(&raw, &self.token_url, "token response")?;
        Ok((jti, parsed))
    }

    /// RFC 7009: revoke `token` at `url`.
    async fn revoke_at(&self, url: &Url, token: &Secret, now: UnixTime) -> Result<RevokeCall> {
        let host = http::host_of(url);
        let (headers, auth) = self.client_auth(now)?;
        let mut pairs: Vec<(&str, &str)> = vec![
            ("token", token.expose()),
            ("token_type_hint", "access_token"),
        ];
        pairs.extend(auth.iter().map(|(k, v)| (*k, v.expose())));
        let mut resp = self
            .client
            .post(url.clone())
            .headers(headers)
            .form(&pairs)
            .send()
            .await
            .map_err(|e| http::transport_error(&host, &e))?;
        let status = resp.status();
        // An over-long answer is judged by its status alone.
        let body = http::read_capped(&mut resp, &host, MAX_REVOKE_RESPONSE)
            .await?
            .unwrap_or_default();
        if status == StatusCode::OK {
            return Ok(RevokeCall::Revoked(host));
        }
        if status == StatusCode::BAD_REQUEST
            && http::oauth_error(&body).is_some_and(|(code, _)| code == "unsupported_token_type")
        {
            return Ok(RevokeCall::Unsupported(host));
        }
        Err(http::status_error(&host, status, &body))
    }
}

enum RevokeCall {
    Revoked(String),
    Unsupported(String),
}

#[async_trait]
impl Destination for OAuth2Destination {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn revocability(&self) -> Revocability {
        if self.revocation_url.is_some() {
            Revocability::Immediate
        } else {
            Revocability::AtExpiry
        }
    }

    async fn issue(&self, req: IssueRequest<'_>) -> Result<Issued> {
        let life = req
            .ttl
            .as_secs()
            .min(self.settings.max_assertion_lifetime_secs);
        let started = tokio::time::Instant::now();
        let (jti, resp) = http::retry_minting(self.retry, &self.breaker, req.now, started, |iat| {
            self.attempt(&req, iat, life)
        })
        .await?;
        let host = http::host_of(&self.token_url);
        let refuse = http::refused;
        if resp.access_token.is_empty() {
            return Err(refuse(format!("{host} answered without an access_token")));
        }
        let token_type = match resp.token_type.as_deref() {
            Some(t) if t.eq_ignore_ascii_case("bearer") => "Bearer",
            // RFC 8693 §2.2.1: the issued token is not an access token.
            Some("N_A") => "N_A",
            Some(_) => {
                return Err(refuse(format!(
                    "{host} issued a token_type lanyard cannot hand out (only Bearer and N_A)"
                )));
            }
            None => return Err(refuse(format!("{host} answered without a token_type"))),
        };
        let expires_in = match (resp.expires_in, self.settings.default_expires_in_secs) {
            (Some(0), _) => return Err(refuse(format!("{host} answered expires_in 0"))),
            (Some(n), _) => n,
            (None, Some(d)) => d,
            (None, None) => {
                return Err(refuse(format!(
                    "{host} answered without expires_in, so lanyard cannot say when the token expires; set settings.default_expires_in_secs if the server documents its lifetime"
                )));
            }
        };
        // A token must not outlive its grant: policy and max_ttl cap the grant's TTL.
        if expires_in > req.ttl.as_secs().saturating_add(TTL_SLACK_SECS) {
            return Err(refuse(format!(
                "{host} issued a token living {expires_in}s, longer than the grant's {}s; configure the server to issue this client tokens of at most the destination's max_ttl, or request a longer ttl",
                req.ttl.as_secs()
            )));
        }
        let issued_token_type = match (self.settings.grant, resp.issued_token_type) {
            (_, Some(t)) if t.is_empty() || t.len() > 256 || t.chars().any(char::is_control) => {
                return Err(refuse(format!(
                    "{host} answered with a malformed issued_token_type"
                )));
            }
            (_, Some(t)) => Some(t),
            // RFC 8693 §2.2.1: REQUIRED in a token exchange answer.
            (Grant::TokenExchange, None) => {
                return Err(refuse(format!(
                    "{host} answered a token exchange without issued_token_type (RFC 8693 §2.2.1)"
                )));
            }
            (Grant::JwtBearer, None) => None,
        };
        http::check_max_lifetime(&host, expires_in, self.settings.max_token_lifetime_secs)?;
        let handle = if self.revocation_url.is_some() {
            self.sealer
                .seal(
                    resp.access_token.as_bytes(),
                    req.grant_id.as_str().as_bytes(),
                )
                .map_err(|e| DestinationError::Mint(lanyard_destination::MintError(e.0)))?
        } else {
            jti
        };
        let mut issued = http::bearer_issued(
            resp.access_token,
            req.now,
            started.elapsed(),
            expires_in,
            handle,
        );
        if let Credential::Bearer {
            token_type: t,
            issued_token_type: it,
            ..
        } = &mut issued.credential
        {
            token_type.clone_into(t);
            if let Some(given) = issued_token_type {
                *it = given;
            }
        }
        Ok(issued)
    }

    /// A new token for the grant, then the previous one revoked at the server (RFC 7009)
    /// so that renewing never leaves a live token lanyard no longer holds. A failure to
    /// revoke the previous token is logged; it lapses at its own expiry.
    async fn renew(&self, req: IssueRequest<'_>, previous_handle: &str) -> Result<Issued> {
        let grant_id = req.grant_id.clone();
        let now = req.now;
        let issued = self.issue(req).await?;
        if let Some(url) = &self.revocation_url
            && previous_handle.starts_with(SEALED_PREFIX)
        {
            let outcome = match self
                .sealer
                .open(previous_handle, grant_id.as_str().as_bytes())
            {
                Ok(token) => self.revoke_at(url, &token, now).await.map(|_| ()),
                Err(e) => Err(DestinationError::Upstream {
                    message: format!("cannot open the sealed token: {e}"),
                    retryable: false,
                }),
            };
            if let Err(e) = outcome {
                tracing::warn!(destination = %self.name, grant = %grant_id, error = %e, "renewed, but the previous access token could not be revoked; it lapses at its own expiry");
            }
        }
        Ok(issued)
    }

    async fn revoke(&self, req: RevokeRequest<'_>) -> Result<RevokeOutcome> {
        let Some(url) = &self.revocation_url else {
            return Ok(http::lapses_at_expiry(
                &req,
                "the authorization server has no revocation_url (RFC 7009) configured",
            ));
        };
        if req.expires_at <= req.now {
            return Ok(RevokeOutcome::ExpiresAt {
                at: req.expires_at,
                detail: "already expired; nothing to revoke".into(),
            });
        }
        if !req.revocation_handle.starts_with(SEALED_PREFIX) {
            return Ok(http::lapses_at_expiry(
                &req,
                "issued before revocation_url was configured, so lanyard kept no token to revoke",
            ));
        }
        let token = self
            .sealer
            .open(req.revocation_handle, req.grant_id.as_str().as_bytes())
            .map_err(|e| DestinationError::Upstream {
                message: format!("cannot open the sealed token: {e}"),
                retryable: false,
            })?;
        match self.revoke_at(url, &token, req.now).await? {
            RevokeCall::Revoked(host) => Ok(RevokeOutcome::Revoked {
                detail: format!("access token revoked at {host} (RFC 7009)"),
            }),
            RevokeCall::Unsupported(host) => Ok(http::lapses_at_expiry(
                &req,
                &format!("{host} does not revoke access tokens (unsupported_token_type)"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"token_url": "https://as.example/token"})
    }

    fn with(k: &str, v: Value) -> Value {
        let mut b = base();
        b.as_object_mut().unwrap().insert(k.into(), v);
        b
    }

    #[test]
    fn settings_defaults() {
        let s = OAuth2Settings::from_value(&base()).unwrap();
        assert_eq!(s.grant, Grant::TokenExchange);
        assert_eq!(s.client_auth, ClientAuth::None);
        assert!(s.send_scope);
        assert_eq!(s.max_assertion_lifetime_secs, 300);
        OAuth2Settings::from_value(&with("token_url", json!("http://127.0.0.1:9/t"))).unwrap();
    }

    #[test]
    fn settings_errors_name_the_problem() {
        let mut two = base();
        two["client_auth"] = json!("client_secret_basic");
        let mut pkj = base();
        pkj["client_auth"] = json!("private_key_jwt");
        pkj["client_id"] = json!("c");
        pkj["client_secret_file"] = json!("/x");
        let mut jb = base();
        jb["grant"] = json!("jwt-bearer");
        jb["audience"] = json!("a");
        let mut sec = base();
        sec["client_auth"] = json!("client_secret_post");
        sec["client_id"] = json!("c");
        for (v, want) in [
            (json!({}), "missing field `token_url`"),
            (with("bogus", json!(1)), "unknown field"),
            (with("token_url", json!("http://as.example/token")), "https"),
            (
                with("revocation_url", json!("ftp://as.example/r")),
                "revocation_url",
            ),
            (with("grant", json!("password")), "unknown variant"),
            (with("resource", json!("not a uri")), "absolute URI"),
            (with("resource", json!("https://r.example/#f")), "fragment"),
            (with("scope_map", json!({"a": "bad\"scope"})), "RFC 6749"),
            (with("max_assertion_lifetime_secs", json!(5)), "30..=3600"),
            (with("max_attempts", json!(9)), "1..=5"),
            (
                with("client_secret_file", json!("/x")),
                "client_secret_file needs",
            ),
            (two, "needs settings.client_id"),
            (pkj, "not used with client_auth private_key_jwt"),
            (jb, "RFC 8693 parameters"),
            (sec, "needs settings.client_secret_file"),
        ] {
            let msg = OAuth2Settings::from_value(&v).unwrap_err().to_string();
            assert!(msg.contains(want), "{v}: {msg}");
        }
    }

    #[test]
    fn client_secret_file_must_be_private_and_one_line() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secret");
        std::fs::write(&p, "s3cret\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_client_secret(p.to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("chmod 600"), "{err}");
        assert!(!err.contains("s3cret"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            read_client_secret(p.to_str().unwrap()).unwrap().expose(),
            "s3cret"
        );
        std::fs::write(&p, "a\nb\n").unwrap();
        assert!(read_client_secret(p.to_str().unwrap()).is_err());
        assert!(read_client_secret("/nonexistent/secret").is_err());
    }

    #[test]
    fn form_encoding_for_basic_auth() {
        assert_eq!(form_encode("a b:c/é"), "a+b%3Ac%2F%C3%A9");
    }
}
