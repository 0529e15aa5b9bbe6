//! The `azure` destination: lanyard signs a client assertion for the workload and uses
//! it as the client credential of an Entra ID app registration or user-assigned managed
//! identity (workload identity federation: the OAuth client credentials grant with an
//! RFC 7523 §2.2 `client_assertion`), getting an Entra access token for one resource.
//! The protocol is the one written down in PROTOCOLS.md §4.3.
//!
//! # Exchange (PROTOCOLS.md §4.3)
//! ```text
//! POST <authority_host>/<tenant_id>/oauth2/v2.0/token   (default https://login.microsoftonline.com)
//! Content-Type: application/x-www-form-urlencoded
//!
//! client_id=<app or managed identity client id>&scope=<resource>/.default
//! &grant_type=client_credentials
//! &client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer
//! &client_assertion=<jwt>
//! ```
//! The answer is `access_token`, `token_type` (`Bearer`) and `expires_in` (seconds; a
//! number, or a string of digits as older endpoints send). An error is
//! `{"error": "invalid_client", "error_description": "AADSTS700213: ...",
//! "error_codes": [700213], "timestamp", "trace_id", "correlation_id"}`; the `error` and
//! the description, which begins with the `AADSTS` code, are passed on sanitized.
//!
//! # Client assertion
//! A JWS signed by lanyard's active key (`typ: JWT`): `iss` lanyard's issuer URL and
//! `sub` the workload ID, which must equal the federated identity credential's `issuer`
//! and `subject` exactly; one `aud`, `assertion_audience` (default
//! `api://AzureADTokenExchange`, one of the credential's `audiences`); `iat`; `exp` =
//! `iat` + `assertion_lifetime_secs`; a fresh `jti` per attempt; and `lanyard` =
//! `{grant_id, destination}`.
//!
//! # Settings
//! | key | default | meaning |
//! |---|---|---|
//! | `tenant_id` | required | the directory: its GUID or a verified domain (`contoso.onmicrosoft.com`) |
//! | `client_id` | required | the app registration's or managed identity's client (application) ID, a GUID |
//! | `resource` | required | the resource to get a token for; the scope sent is `<resource>/.default` (e.g. `https://management.azure.com`, `https://vault.azure.net`) |
//! | `resource_by_scope` | `{}` | lanyard scope → resource; when set, a request's lanyard scopes choose the resource (all of them must map to the same one), and each of the destination's `scopes` must be mapped |
//! | `authority_host` | `https://login.microsoftonline.com` | the Entra authority (sovereign clouds: `https://login.microsoftonline.us`, ...); https, or http only on loopback |
//! | `assertion_audience` | `api://AzureADTokenExchange` | the assertion's one `aud` |
//! | `assertion_lifetime_secs` | 300 | the assertion's lifetime, 60..=3600 |
//! | `max_token_lifetime_secs` | none | refuse (`DESTINATION_REJECTED`) an access token living longer, 60..=86400 |
//! | `timeout_secs` | 10 | per request, 1..=120 |
//! | `max_response_bytes` | 1 MiB | 1024..=16 MiB |
//! | `max_attempts` | 2 | 1..=5; each attempt signs a fresh assertion |
//! | `breaker_threshold` / `breaker_cooldown_secs` | 5 / 30 | circuit breaker |
//!
//! Unknown keys are refused.
//!
//! # Errors
//! As `lanyard_destination::http` maps them: a 4xx refusal is not retryable
//! (`DESTINATION_REJECTED`) and carries `invalid_client: AADSTS...: ...`; 408, 429, 5xx,
//! timeouts and connection failures are retryable (`DESTINATION_UNAVAILABLE`).
//!
//! # Lifetime and revocation
//! The client cannot choose or shorten an Entra access token's lifetime (by default 60
//! to 90 minutes) and cannot revoke it: [`Revocability::AtExpiry`]. The receipt states
//! the expiry Entra gave (`expires_in` from when the answer arrived), which may be
//! longer than the grant's TTL; use `max_token_lifetime_secs` to refuse tokens living
//! longer than you accept. Continuous access evaluation (CAE), with which some
//! resources reject tokens early, is out of scope: lanyard neither asks for CAE tokens
//! (`xms_cc`) nor emits the events that would trigger it.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use lanyard_core::{Scope, SystemClock, UnixTime};
use lanyard_destination::http::{self, Body, CircuitBreaker, RetryPolicy};
use lanyard_destination::settings::{self, Plumbing, short};
use lanyard_destination::{
    Destination, DestinationError, DestinationSpec, IssueRequest, Issued, Revocability,
    RevokeOutcome, RevokeRequest, TokenMinter,
};
use reqwest::header::HeaderMap;
use reqwest::{Client, Url};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The adapter kind this crate implements.
pub const KIND: &str = "azure";
/// The OAuth grant.
pub const GRANT_TYPE: &str = "client_credentials";
/// RFC 7523 §2.2 client assertion type.
pub const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// The public cloud's authority.
pub const DEFAULT_AUTHORITY_HOST: &str = "https://login.microsoftonline.com";
/// The audience Entra recommends for federated identity credentials.
pub const DEFAULT_ASSERTION_AUDIENCE: &str = "api://AzureADTokenExchange";

/// Adapter errors are [`DestinationError`]s.
pub type Result<T, E = DestinationError> = std::result::Result<T, E>;

/// The `settings` block of an `azure` destination (see the crate docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureSettings {
    /// Directory GUID or domain.
    pub tenant_id: String,
    /// Client (application) ID.
    pub client_id: String,
    /// Resource; the scope is `<resource>/.default`.
    pub resource: String,
    /// lanyard scope → resource.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub resource_by_scope: BTreeMap<String, String>,
    /// Entra authority.
    #[serde(default = "default_authority")]
    pub authority_host: String,
    /// The assertion's `aud`.
    #[serde(default = "default_assertion_audience")]
    pub assertion_audience: String,
    /// The assertion's lifetime, seconds.
    #[serde(default = "default_assertion_lifetime")]
    pub assertion_lifetime_secs: u64,
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

fn default_authority() -> String {
    DEFAULT_AUTHORITY_HOST.to_owned()
}
fn default_assertion_audience() -> String {
    DEFAULT_ASSERTION_AUDIENCE.to_owned()
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

/// Whether `s` is a GUID in its 8-4-4-4-12 hex form.
pub fn is_guid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// Whether `s` is a DNS domain of at least two labels (a tenant's verified domain).
fn is_domain(s: &str) -> bool {
    let labels: Vec<&str> = s.split('.').collect();
    s.len() <= 253
        && labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Check a resource: no whitespace, not already a scope.
fn check_resource(field: &str, v: &str) -> Result<()> {
    settings::check_word(KIND, field, v, 256)?;
    if v.ends_with("/.default") {
        return Err(bad(format!(
            "settings.{field} {:?} names the resource; lanyard adds /.default itself",
            short(v)
        )));
    }
    Ok(())
}

impl AzureSettings {
    /// Parse and validate a `settings` block.
    ///
    /// # Errors
    /// [`DestinationError::InvalidSettings`] naming the problem.
    pub fn from_value(settings: &Value) -> Result<Self> {
        let s: AzureSettings = settings::parse(KIND, settings)?;
        s.validate()?;
        Ok(s)
    }

    fn validate(&self) -> Result<()> {
        if !is_guid(&self.tenant_id) && !is_domain(&self.tenant_id) {
            return Err(bad(format!(
                "settings.tenant_id {:?} must be the directory's GUID or one of its domains (not common, organizations or consumers)",
                short(&self.tenant_id)
            )));
        }
        if !is_guid(&self.client_id) {
            return Err(bad(format!(
                "settings.client_id {:?} must be the client (application) ID, a GUID",
                short(&self.client_id)
            )));
        }
        check_resource("resource", &self.resource)?;
        if self.resource_by_scope.len() > 64 {
            return Err(bad(
                "settings.resource_by_scope maps at most 64 scopes".into()
            ));
        }
        for (k, v) in &self.resource_by_scope {
            Scope::parse(k).map_err(|e| {
                bad(format!(
                    "settings.resource_by_scope key {:?}: {e}",
                    short(k)
                ))
            })?;
            check_resource(&format!("resource_by_scope.{k}"), v)?;
        }
        let authority = settings::check_endpoint(KIND, "authority_host", &self.authority_host)?;
        if authority.path() != "/" || authority.query().is_some() || authority.fragment().is_some()
        {
            return Err(bad(
                "settings.authority_host must be a scheme and host only, e.g. https://login.microsoftonline.com"
                    .into(),
            ));
        }
        settings::check_word(KIND, "assertion_audience", &self.assertion_audience, 512)?;
        range(
            "assertion_lifetime_secs",
            self.assertion_lifetime_secs,
            60,
            3600,
        )?;
        if let Some(m) = self.max_token_lifetime_secs {
            range("max_token_lifetime_secs", m, 60, 86_400)?;
        }
        lanyard_destination::tuning!(self).check(KIND)?;
        Ok(())
    }

    /// The token endpoint: `<authority_host>/<tenant_id>/oauth2/v2.0/token`.
    ///
    /// # Errors
    /// [`DestinationError::InvalidSettings`].
    pub fn token_url(&self) -> Result<Url> {
        let url = format!(
            "{}/{}/oauth2/v2.0/token",
            self.authority_host.trim_end_matches('/'),
            self.tenant_id
        );
        settings::check_endpoint(KIND, "authority_host", &url)
    }

    /// The `scope` for a request with these lanyard scopes: `<resource>/.default`, the
    /// resource chosen by `resource_by_scope` when it is set and scopes were asked.
    ///
    /// # Errors
    /// [`DestinationError::BadRequest`] for an unmapped scope, or scopes mapping to
    /// different resources (an Entra token is for one resource).
    pub fn scope_for(&self, requested: &[Scope]) -> Result<String> {
        if self.resource_by_scope.is_empty() || requested.is_empty() {
            return Ok(format!("{}/.default", self.resource));
        }
        let mut chosen: Option<&str> = None;
        for s in requested {
            let r = self.resource_by_scope.get(s.as_str()).ok_or_else(|| {
                DestinationError::BadRequest(format!(
                    "scope {:?} has no resource in settings.resource_by_scope",
                    s.as_str()
                ))
            })?;
            match chosen {
                Some(c) if c != r => {
                    return Err(DestinationError::BadRequest(
                        "the requested scopes name different Entra resources; an access token is for one resource, ask for them separately".into(),
                    ));
                }
                _ => chosen = Some(r),
            }
        }
        Ok(format!("{}/.default", chosen.unwrap_or(&self.resource)))
    }
}

// === requests and answers ===

/// The form body of the token request. `assertion` is the only secret.
pub fn token_form<'a>(
    client_id: &'a str,
    scope: &'a str,
    assertion: &'a str,
) -> [(&'a str, &'a str); 5] {
    [
        ("client_id", client_id),
        ("scope", scope),
        ("grant_type", GRANT_TYPE),
        ("client_assertion_type", CLIENT_ASSERTION_TYPE),
        ("client_assertion", assertion),
    ]
}

#[derive(Deserialize)]
struct RawAnswer {
    access_token: String,
    token_type: String,
    expires_in: Value,
}

/// Entra's success answer.
#[derive(Debug)]
pub struct TokenAnswer {
    /// The access token.
    pub access_token: String,
    /// Seconds.
    pub expires_in: u64,
}

/// Parse and check Entra's answer.
///
/// # Errors
/// [`DestinationError::Upstream`] (not retryable) for a malformed or incomplete answer.
pub fn parse_answer(body: &[u8], url: &Url) -> Result<TokenAnswer> {
    let a: RawAnswer = http::parse_json(body, url, "token response")?;
    let host = http::host_of(url);
    let expires_in = match &a.expires_in {
        Value::Number(n) => n.as_u64(),
        Value::String(s) if !s.is_empty() && s.len() <= 10 => s.parse::<u64>().ok(),
        _ => None,
    }
    .filter(|n| *n > 0);
    let Some(expires_in) = expires_in else {
        return Err(http::refused(format!(
            "{host} answered without a positive expires_in"
        )));
    };
    if a.access_token.is_empty() {
        return Err(http::refused(format!(
            "{host} answered an empty access_token"
        )));
    }
    if !a.token_type.eq_ignore_ascii_case("bearer") {
        return Err(http::refused(format!(
            "{host} answered token_type {:?}, not Bearer",
            a.token_type.chars().take(32).collect::<String>()
        )));
    }
    Ok(TokenAnswer {
        access_token: a.access_token,
        expires_in,
    })
}

/// AADSTS codes that mean the federated identity credential does not match the
/// assertion (issuer, subject, audience).
const FIC_MISMATCH: &[&str] = &["AADSTS700211", "AADSTS700212", "AADSTS700213"];

fn hint_mismatch(e: DestinationError) -> DestinationError {
    match e {
        DestinationError::Upstream { message, retryable }
            if FIC_MISMATCH.iter().any(|c| message.contains(c)) =>
        {
            DestinationError::Upstream {
                message: format!(
                    "{message} (the federated identity credential must name lanyard's issuer URL, subject = the workload ID, and the assertion audience exactly)"
                ),
                retryable,
            }
        }
        other => other,
    }
}

// === the destination ===

/// An `azure` destination.
pub struct AzureDestination {
    name: String,
    settings: AzureSettings,
    token_url: Url,
    client: Client,
    breaker: CircuitBreaker,
    retry: RetryPolicy,
    minter: Arc<dyn TokenMinter>,
}

impl std::fmt::Debug for AzureDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureDestination")
            .field("name", &self.name)
            .field("settings", &self.settings)
            .field("issuer", &self.minter.issuer_url())
            .finish_non_exhaustive()
    }
}

impl AzureDestination {
    /// Build the adapter from its spec.
    ///
    /// # Errors
    /// [`DestinationError::InvalidSettings`].
    pub fn new(spec: &DestinationSpec, minter: Arc<dyn TokenMinter>) -> Result<Self> {
        settings::check_spec(KIND, spec)?;
        let settings = AzureSettings::from_value(&spec.settings)?;
        if let Some(s) = settings::first_unmapped_scope(spec, &settings.resource_by_scope) {
            return Err(bad(format!(
                "scope {:?} is offered but has no resource in settings.resource_by_scope",
                short(s)
            )));
        }
        let token_url = settings.token_url()?;
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
    pub fn settings(&self) -> &AzureSettings {
        &self.settings
    }

    /// The token endpoint.
    pub fn token_url(&self) -> &Url {
        &self.token_url
    }

    async fn attempt(
        &self,
        req: &IssueRequest<'_>,
        iat: UnixTime,
        scope: &str,
    ) -> Result<(String, TokenAnswer)> {
        let (jti, assertion) = lanyard_destination::mint_workload_jwt(
            self.minter.as_ref(),
            req,
            &self.name,
            &self.settings.assertion_audience,
            iat,
            self.settings.assertion_lifetime_secs,
        )?;
        let form = token_form(&self.settings.client_id, scope, assertion.expose());
        let raw = http::post(
            &self.client,
            &self.token_url,
            HeaderMap::new(),
            Body::Form(&form),
            self.settings.max_response_bytes,
        )
        .await
        .map_err(hint_mismatch)?;
        Ok((jti, parse_answer(&raw, &self.token_url)?))
    }
}

#[async_trait]
impl Destination for AzureDestination {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn revocability(&self) -> Revocability {
        Revocability::AtExpiry
    }

    async fn issue(&self, req: IssueRequest<'_>) -> Result<Issued> {
        let scope = self.settings.scope_for(req.scopes)?;
        let started = tokio::time::Instant::now();
        let (jti, resp) = http::retry_minting(self.retry, &self.breaker, req.now, started, |iat| {
            self.attempt(&req, iat, &scope)
        })
        .await?;
        http::check_max_lifetime(
            &http::host_of(&self.token_url),
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

    /// Nothing to call: a client cannot revoke an Entra access token. States the
    /// residual lifetime. Revoking twice gives the same answer.
    async fn revoke(&self, req: RevokeRequest<'_>) -> Result<RevokeOutcome> {
        Ok(http::lapses_at_expiry(
            &req,
            "Entra ID access tokens cannot be revoked by the client (continuous access evaluation is out of scope)",
        ))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
    const CLIENT: &str = "0d0a2c1e-5d5b-4f3b-9e8c-1a2b3c4d5e6f";

    fn base() -> Value {
        json!({"tenant_id": TENANT, "client_id": CLIENT, "resource": "https://management.azure.com"})
    }

    fn with(k: &str, v: Value) -> Value {
        let mut b = base();
        b.as_object_mut().unwrap().insert(k.into(), v);
        b
    }

    fn url() -> Url {
        Url::parse("https://login.microsoftonline.com/t/oauth2/v2.0/token").unwrap()
    }

    #[test]
    fn settings_defaults_and_token_url() {
        let s = AzureSettings::from_value(&base()).unwrap();
        assert_eq!(s.authority_host, DEFAULT_AUTHORITY_HOST);
        assert_eq!(s.assertion_audience, DEFAULT_ASSERTION_AUDIENCE);
        assert_eq!(s.assertion_lifetime_secs, 300);
        assert_eq!(
            s.token_url().unwrap().as_str(),
            format!("https://login.microsoftonline.com/{TENANT}/oauth2/v2.0/token")
        );
        let mut v = with("tenant_id", json!("contoso.onmicrosoft.com"));
        v["authority_host"] = json!("http://127.0.0.1:8080/");
        let s = AzureSettings::from_value(&v).unwrap();
        assert_eq!(
            s.token_url().unwrap().as_str(),
            "http://127.0.0.1:8080/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
    }

    #[test]
    fn settings_errors() {
        for (v, want) in [
            (json!({}), "missing field"),
            (
                json!({"tenant_id": TENANT, "client_id": CLIENT}),
                "missing field `resource`",
            ),
            (with("bogus", json!(1)), "unknown field"),
            (with("tenant_id", json!("common")), "tenant_id"),
            (with("tenant_id", json!("organizations")), "tenant_id"),
            (with("tenant_id", json!("contoso .com")), "tenant_id"),
            (
                with("tenant_id", json!("72f988bf86f141af91ab2d7cd011db47")),
                "tenant_id",
            ),
            (with("client_id", json!("my-app")), "client_id"),
            (
                with("client_id", json!("0d0a2c1e-5d5b-4f3b-9e8c-1a2b3c4d5e6g")),
                "client_id",
            ),
            (with("resource", json!("")), "settings.resource"),
            (
                with("resource", json!("https://management.azure.com/.default")),
                "adds /.default",
            ),
            (
                with(
                    "resource_by_scope",
                    json!({"bad scope": "https://vault.azure.net"}),
                ),
                "resource_by_scope key",
            ),
            (
                with("resource_by_scope", json!({"kv": "a b"})),
                "resource_by_scope.kv",
            ),
            (
                with("authority_host", json!("http://login.microsoftonline.com")),
                "https is required",
            ),
            (
                with(
                    "authority_host",
                    json!("https://login.microsoftonline.com/tenant"),
                ),
                "scheme and host only",
            ),
            (with("assertion_audience", json!(" ")), "assertion_audience"),
            (with("assertion_lifetime_secs", json!(59)), "60..=3600"),
            (with("assertion_lifetime_secs", json!(3601)), "60..=3600"),
            (with("max_token_lifetime_secs", json!(1)), "60..=86400"),
            (with("timeout_secs", json!(121)), "1..=120"),
            (with("max_response_bytes", json!(1)), "1024..="),
            (with("max_attempts", json!(0)), "1..=5"),
            (with("breaker_cooldown_secs", json!(0)), "1..=3600"),
        ] {
            let msg = AzureSettings::from_value(&v).unwrap_err().to_string();
            assert!(msg.contains(want), "{v}: {msg}");
        }
    }

    #[test]
    fn scope_follows_lanyard_scopes() {
        let mut v = base();
        v["resource_by_scope"] = json!({
            "kv": "https://vault.azure.net",
            "kv-admin": "https://vault.azure.net",
            "arm": "https://management.azure.com",
        });
        let s = AzureSettings::from_value(&v).unwrap();
        let sc = |x: &str| Scope::parse(x).unwrap();
        assert_eq!(
            s.scope_for(&[]).unwrap(),
            "https://management.azure.com/.default"
        );
        assert_eq!(
            s.scope_for(&[sc("kv"), sc("kv-admin")]).unwrap(),
            "https://vault.azure.net/.default"
        );
        for bad in [vec![sc("kv"), sc("arm")], vec![sc("nope")]] {
            let e = s.scope_for(&bad).unwrap_err();
            assert!(matches!(e, DestinationError::BadRequest(_)), "{e}");
        }
    }

    #[test]
    fn request_form() {
        let f = token_form(CLIENT, "https://vault.azure.net/.default", "eyJ.a.b");
        assert_eq!(
            f,
            [
                ("client_id", CLIENT),
                ("scope", "https://vault.azure.net/.default"),
                ("grant_type", "client_credentials"),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
                ),
                ("client_assertion", "eyJ.a.b"),
            ]
        );
    }

    #[test]
    fn answers() {
        let a = parse_answer(
            br#"{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"access_token":"eyJ0eXAi.x.y"}"#,
            &url(),
        )
        .unwrap();
        assert_eq!(
            (a.access_token.as_str(), a.expires_in),
            ("eyJ0eXAi.x.y", 3599)
        );
        let a = parse_answer(
            br#"{"token_type":"Bearer","expires_in":"3599","access_token":"t"}"#,
            &url(),
        )
        .unwrap();
        assert_eq!(a.expires_in, 3599);
        for (body, want) in [
            (&b"<html>"[..], "not json"),
            (
                br#"{"token_type":"Bearer","expires_in":3599}"#,
                "unexpected shape",
            ),
            (
                br#"{"token_type":"Bearer","expires_in":0,"access_token":"t"}"#,
                "positive expires_in",
            ),
            (
                br#"{"token_type":"Bearer","expires_in":"soon","access_token":"t"}"#,
                "positive expires_in",
            ),
            (
                br#"{"token_type":"Bearer","expires_in":-1,"access_token":"t"}"#,
                "positive expires_in",
            ),
            (
                br#"{"token_type":"Bearer","expires_in":1.5,"access_token":"t"}"#,
                "positive expires_in",
            ),
            (
                br#"{"token_type":"pop","expires_in":60,"access_token":"t"}"#,
                "not Bearer",
            ),
            (
                br#"{"token_type":"Bearer","expires_in":60,"access_token":""}"#,
                "empty access_token",
            ),
            (br#"{"token_type":"Bearer","#, "truncated json"),
        ] {
            let e = parse_answer(body, &url()).unwrap_err();
            assert!(!http::is_retryable(&e), "{e}");
            assert!(
                e.to_string().contains(want),
                "{}: {e}",
                String::from_utf8_lossy(body)
            );
        }
    }

    /// Entra's documented error shape, as the shared HTTP mapping passes it on.
    #[test]
    fn error_shapes_map_to_rejected_or_unavailable() {
        use reqwest::StatusCode;
        let body = br#"{"error":"invalid_client","error_description":"AADSTS700213: No matching federated identity record found for presented assertion subject 'spiffe://lanyard.local/ci/x'. Trace ID: 1 Correlation ID: 2 Timestamp: 2026-11-24 03:00:00Z","error_codes":[700213],"timestamp":"2026-11-24 03:00:00Z","trace_id":"1","correlation_id":"2","error_uri":"https://login.microsoftonline.com/error?code=700213"}"#;
        let e = hint_mismatch(http::status_error(
            "login.microsoftonline.com",
            StatusCode::BAD_REQUEST,
            body,
        ));
        assert!(!http::is_retryable(&e));
        let m = e.to_string();
        assert!(
            m.contains("http 400: invalid_client: AADSTS700213: No matching"),
            "{m}"
        );
        assert!(m.contains("subject = the workload ID"), "{m}");
        let e = http::status_error(
            "login.microsoftonline.com",
            StatusCode::UNAUTHORIZED,
            br#"{"error":"invalid_client","error_description":"AADSTS700027: Client assertion failed signature validation. eyJhbGciOiJFUzI1NiJ9.e30.c2ln","error_codes":[700027]}"#,
        );
        assert!(!http::is_retryable(&e));
        assert!(!e.to_string().contains("eyJ"), "{e}");
        for s in [429u16, 500, 503, 504] {
            let e = http::status_error(
                "login.microsoftonline.com",
                StatusCode::from_u16(s).unwrap(),
                br#"{"error":"temporarily_unavailable","error_description":"AADSTS50196: loop","error_codes":[50196]}"#,
            );
            assert!(http::is_retryable(&e), "{s}");
        }
    }
}
