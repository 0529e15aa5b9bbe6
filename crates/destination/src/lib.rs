//! The `Destination` trait every adapter implements (issue a credential, revoke it, say
//! how revocable it is), the settings common to every destination, the [`TokenMinter`]
//! adapters use to have lanyard sign assertions, and [`DestinationError`]; [`http`]
//! and [`settings`] hold the plumbing the HTTP adapters share (transport, retries,
//! circuit breaker; settings parsing, checks and the tuning settings). No adapter
//! lives here: adapters are crates under `crates/destinations/`, and the one registry
//! mapping a `kind` to a constructor lives in `lanyard-server`.

use std::collections::BTreeMap;

use async_trait::async_trait;
use lanyard_core::{GrantId, Scope, Secret, TaskId, Ttl, UnixTime, WorkloadId};
use serde::{Deserialize, Serialize};

pub mod http;
pub mod settings;

/// Errors from a destination adapter.
#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    /// The destination's settings are invalid (found when config is loaded).
    #[error("invalid settings for destination kind {kind}: {message}")]
    InvalidSettings {
        /// Adapter kind.
        kind: String,
        /// What is wrong, for the operator.
        message: String,
    },
    /// The request cannot be served by this destination (bad scope, TTL...).
    #[error("{0}")]
    BadRequest(String),
    /// lanyard could not sign the assertion.
    #[error("minting the assertion failed")]
    Mint(#[source] MintError),
    /// The destination refused or failed; `retryable` says whether trying again may help.
    #[error("destination call failed: {message}")]
    Upstream {
        /// What happened, without secrets.
        message: String,
        /// Whether a retry may succeed.
        retryable: bool,
    },
}

/// `Result` with [`DestinationError`].
pub type Result<T, E = DestinationError> = std::result::Result<T, E>;

/// Settings every destination has, whatever its kind. The adapter-specific block is
/// `settings`, parsed and validated by the adapter's constructor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationSpec {
    /// Unique name, `[a-z0-9-]{1,63}`; what workloads ask for.
    pub name: String,
    /// Adapter kind, e.g. `jwt`.
    pub kind: String,
    /// TTL when the request names none, seconds.
    #[serde(default = "default_ttl")]
    pub default_ttl_secs: u64,
    /// Longest TTL issued, seconds; longer requests are clamped to it.
    #[serde(default = "max_ttl")]
    pub max_ttl_secs: u64,
    /// Scopes this destination offers. A request for any other scope is refused.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Labels for policy (`resource.labels`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Adapter-specific settings.
    #[serde(default)]
    pub settings: serde_json::Value,
    /// Refuse exchanges while this audit sink (`file`, `otlp`) lags more than
    /// [`DestinationSpec::max_audit_lag`] events, or is not running (fail closed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_audit_sink: Option<String>,
    /// Events the required sink may lag behind the chain head.
    #[serde(default)]
    pub max_audit_lag: u64,
    /// Workload IDs (SPIFFE IDs) allowed to introspect this destination's tokens at
    /// lanyard's RFC 7662 endpoint, authenticated by their own platform token. An entry
    /// ending in `/*` matches every workload ID below that path
    /// (`spiffe://lanyard.local/api/*` matches `spiffe://lanyard.local/api/orders`, not
    /// `spiffe://lanyard.local/api`). Empty: nobody may; every answer is inactive.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub introspection_clients: Vec<String>,
}

/// Audit sinks a destination may require (`[audit.file]`, `[audit.otlp]`).
pub const AUDIT_SINKS: &[&str] = &["file", "otlp"];
/// At most this many [`DestinationSpec::introspection_clients`] entries.
pub const MAX_INTROSPECTION_CLIENTS: usize = 256;
/// The suffix that makes an [`DestinationSpec::introspection_clients`] entry a prefix.
const PREFIX_WILDCARD: &str = "/*";

fn default_ttl() -> u64 {
    900
}
fn max_ttl() -> u64 {
    3600
}

impl DestinationSpec {
    /// Check the common settings.
    ///
    /// # Errors
    /// [`DestinationError::InvalidSettings`] naming the first problem.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| DestinationError::InvalidSettings {
            kind: self.kind.clone(),
            message: m,
        };
        if !valid_name(&self.name) {
            return Err(bad(format!(
                "name {:?} must be 1-63 characters of [a-z0-9-]",
                self.name
            )));
        }
        let max = Ttl::from_secs(self.max_ttl_secs)
            .map_err(|_| bad("max_ttl_secs must be 1..=604800".into()))?;
        let def = Ttl::from_secs(self.default_ttl_secs)
            .map_err(|_| bad("default_ttl_secs must be 1..=604800".into()))?;
        if def > max {
            return Err(bad("default_ttl_secs exceeds max_ttl_secs".into()));
        }
        for s in &self.scopes {
            Scope::parse(s).map_err(|e| bad(e.to_string()))?;
        }
        if let Some(sink) = &self.require_audit_sink
            && !AUDIT_SINKS.contains(&sink.as_str())
        {
            return Err(bad(format!(
                "require_audit_sink {sink:?} is not an audit sink; use one of {AUDIT_SINKS:?}"
            )));
        }
        if self.introspection_clients.len() > MAX_INTROSPECTION_CLIENTS {
            return Err(bad(format!(
                "introspection_clients lists more than {MAX_INTROSPECTION_CLIENTS} entries"
            )));
        }
        for (i, entry) in self.introspection_clients.iter().enumerate() {
            valid_introspection_client(entry).map_err(|why| {
                bad(format!(
                    "introspection_clients[{i}] {:?}: {why}",
                    entry.chars().take(100).collect::<String>()
                ))
            })?;
        }
        Ok(())
    }

    /// Whether `workload_id` may introspect this destination's tokens: it equals an
    /// [`DestinationSpec::introspection_clients`] entry, or lies below one ending in
    /// `/*`.
    pub fn allows_introspection_by(&self, workload_id: &str) -> bool {
        self.introspection_clients.iter().any(|entry| {
            match entry.strip_suffix(PREFIX_WILDCARD) {
                // Keep the `/`: `.../api/*` must not match `.../apiary`.
                Some(base) => workload_id
                    .strip_prefix(base)
                    .and_then(|rest| rest.strip_prefix('/'))
                    .is_some_and(|rest| !rest.is_empty()),
                None => entry == workload_id,
            }
        })
    }

    /// The TTL to issue for a request: the default when none is asked, clamped to the
    /// maximum otherwise.
    pub fn effective_ttl(&self, requested: Option<Ttl>) -> Ttl {
        let max = Ttl::from_secs(self.max_ttl_secs).unwrap_or(Ttl::MAX);
        let def = Ttl::from_secs(self.default_ttl_secs).unwrap_or(max);
        requested.unwrap_or(def).min(max)
    }

    /// The requested scopes that this destination does not offer.
    pub fn unknown_scopes<'a>(&self, requested: &'a [Scope]) -> Vec<&'a Scope> {
        requested
            .iter()
            .filter(|s| !self.scopes.iter().any(|o| o == s.as_str()))
            .collect()
    }
}

/// Check one `introspection_clients` entry: a SPIFFE ID, optionally followed by `/*`;
/// `spiffe://<trust-domain>/*` names every workload of that trust domain.
fn valid_introspection_client(entry: &str) -> std::result::Result<(), &'static str> {
    if entry.is_empty() {
        return Err("must not be empty");
    }
    let parsed = match entry.strip_suffix(PREFIX_WILDCARD) {
        // Whatever may follow the prefix, one more segment must make a valid ID.
        Some(base) => WorkloadId::parse(&format!("{base}/x")),
        None => WorkloadId::parse(entry),
    };
    parsed.map(|_| ()).map_err(
        |_| "must be a workload id (spiffe://<trust-domain>/<path>), optionally ending in /*",
    )
}

/// Whether `s` is a valid object name: 1-63 characters of `[a-z0-9-]`, not starting
/// with `-`.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// What the adapter needs to issue one credential.
#[derive(Debug, Clone)]
pub struct IssueRequest<'a> {
    /// The grant the credential belongs to.
    pub grant_id: &'a GrantId,
    /// The workload.
    pub workload: &'a WorkloadId,
    /// Name of the issuer that proved the workload.
    pub issuer: &'a str,
    /// Task, if bound.
    pub task: Option<&'a TaskId>,
    /// Granted scopes (already checked against the destination and policy).
    pub scopes: &'a [Scope],
    /// Lifetime to issue (already clamped).
    pub ttl: Ttl,
    /// Now, from lanyard's clock.
    pub now: UnixTime,
    /// Delegation chain, current actor first (workload IDs).
    pub actor_chain: &'a [String],
    /// Verified claims of the subject token, for adapters that map some of them.
    pub claims: &'a serde_json::Map<String, serde_json::Value>,
}

/// A credential as handed to the workload.
pub enum Credential {
    /// A bearer token, sent as `Authorization: <token_type> <token>` unless `header`
    /// names another header.
    Bearer {
        /// The token.
        token: Secret,
        /// `Bearer` unless the destination says otherwise.
        token_type: String,
        /// RFC 8693 `issued_token_type`, e.g. `urn:ietf:params:oauth:token-type:jwt`.
        issued_token_type: String,
        /// The HTTP header to present it in.
        header: String,
    },
    /// A database login (`postgres` destinations).
    Database {
        /// Host to connect to.
        host: String,
        /// Port.
        port: u16,
        /// Database name.
        database: String,
        /// Login role name.
        username: String,
        /// Password.
        password: Secret,
    },
    /// Temporary AWS credentials (`aws-sts` destinations).
    Aws {
        /// Access key ID (not secret on its own).
        access_key_id: String,
        /// Secret access key.
        secret_access_key: Secret,
        /// Session token.
        session_token: Secret,
        /// Region the credentials are meant for (for the workload's SDK).
        region: String,
    },
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Bearer { token_type, .. } => f
                .debug_struct("Bearer")
                .field("token_type", token_type)
                .finish_non_exhaustive(),
            Credential::Database {
                host,
                port,
                database,
                username,
                ..
            } => f
                .debug_struct("Database")
                .field("host", host)
                .field("port", port)
                .field("database", database)
                .field("username", username)
                .finish_non_exhaustive(),
            Credential::Aws {
                access_key_id,
                region,
                ..
            } => f
                .debug_struct("Aws")
                .field("access_key_id", access_key_id)
                .field("region", region)
                .finish_non_exhaustive(),
        }
    }
}

/// An issued credential and what lanyard records about it.
#[derive(Debug)]
pub struct Issued {
    /// The credential.
    pub credential: Credential,
    /// When it stops working at the destination.
    pub expires_at: UnixTime,
    /// What revocation needs (a `jti`, a role name...). Never a secret.
    pub revocation_handle: String,
}

/// What revocation means at a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Revocability {
    /// The destination confirms revocation, or checks lanyard on every use.
    Immediate,
    /// The destination cannot revoke early; the credential lives until it expires.
    AtExpiry,
    /// Blocked by a deny rule at the destination, which takes time to propagate.
    Eventual,
}

/// What a revocation achieved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum RevokeOutcome {
    /// Revoked; `detail` says how.
    Revoked {
        /// How, for the receipt.
        detail: String,
    },
    /// Blocked by a deny rule written at the destination (an AWS role's inline deny
    /// policy): the credential still exists and the block takes time to propagate;
    /// `detail` says what was written and how long propagation may take.
    Blocked {
        /// What was written where, and the propagation caveat, for the receipt.
        detail: String,
    },
    /// Cannot be revoked early; it stops working at `at`.
    ExpiresAt {
        /// Expiry, seconds.
        at: UnixTime,
        /// Why, for the receipt.
        detail: String,
    },
}

/// What the adapter needs to revoke one grant.
#[derive(Debug, Clone)]
pub struct RevokeRequest<'a> {
    /// The grant.
    pub grant_id: &'a GrantId,
    /// The handle recorded at issue.
    pub revocation_handle: &'a str,
    /// The workload.
    pub workload_id: &'a str,
    /// When the credential expires.
    pub expires_at: UnixTime,
    /// Now.
    pub now: UnixTime,
}

/// A destination adapter instance, built from one [`DestinationSpec`].
#[async_trait]
pub trait Destination: Send + Sync {
    /// The adapter kind, e.g. `jwt`.
    fn kind(&self) -> &'static str;
    /// What revocation means here.
    fn revocability(&self) -> Revocability;
    /// Whether an expired credential leaves state at the destination that lanyard must
    /// remove (a database role): lanyard then revokes grants of this destination once
    /// they expire, through a revocation job. Default: no.
    fn revoke_at_expiry(&self) -> bool {
        false
    }
    /// Issue a credential.
    ///
    /// # Errors
    /// [`DestinationError::BadRequest`], [`DestinationError::Mint`],
    /// [`DestinationError::Upstream`].
    async fn issue(&self, req: IssueRequest<'_>) -> Result<Issued>;
    /// Extend a credential for the same grant, with fresh proof already checked.
    /// `previous_handle` is the handle recorded at issue (or the last renewal).
    ///
    /// The default issues a new credential; the previous one lapses at its own expiry.
    /// Adapters whose credentials live at the destination (database roles) override it
    /// to extend the existing one instead of leaving it behind.
    ///
    /// # Errors
    /// As [`Destination::issue`].
    async fn renew(&self, req: IssueRequest<'_>, previous_handle: &str) -> Result<Issued> {
        let _ = previous_handle;
        self.issue(req).await
    }
    /// Pull the destination's own kill switch, where it has one, so that nothing lanyard
    /// obtained there can be used or renewed there any more (Claude: archive the
    /// federation rule). An explicit operator action (`DisableDestination`), audited;
    /// `reason` is the operator's. Returns what was done, or `None` when this adapter
    /// has no switch at the destination (its docs name the manual step).
    ///
    /// # Errors
    /// [`DestinationError::Upstream`], or [`DestinationError::BadRequest`] when the
    /// adapter has a switch but is not configured for it.
    async fn kill_switch(&self, reason: &str) -> Result<Option<String>> {
        let _ = reason;
        Ok(None)
    }
    /// Revoke a credential (idempotent: revoking twice is harmless).
    ///
    /// # Errors
    /// [`DestinationError::Upstream`].
    async fn revoke(&self, req: RevokeRequest<'_>) -> Result<RevokeOutcome>;
}

/// Errors from minting.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MintError(pub String);

/// lanyard's own issuer, as adapters see it: signs claims with the active signing key.
pub trait TokenMinter: Send + Sync {
    /// lanyard's issuer URL (`iss` of minted tokens).
    fn issuer_url(&self) -> &str;
    /// Sign `claims` (a JSON object) with the active key; `typ` is the JOSE header type.
    ///
    /// # Errors
    /// [`MintError`] if there is no usable key or signing fails.
    fn mint(&self, claims: &serde_json::Value, typ: &str)
    -> std::result::Result<Secret, MintError>;
}

/// Read a one-line secret (a client secret, an admin token) from the file a
/// destination's `field` setting names: a regular file, not a symlink, that group and
/// others cannot access, holding the secret on one line (a final newline is dropped).
/// Errors name the file and the problem, never the contents.
///
/// # Errors
/// [`DestinationError::InvalidSettings`] for `kind`.
pub fn read_secret_file(kind: &str, field: &str, path: &str) -> Result<Secret> {
    use std::io::Read as _;
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    /// Longer than any token or secret these files hold.
    const MAX_SECRET_FILE: u64 = 64 << 10;
    let bad = |message: String| DestinationError::InvalidSettings {
        kind: kind.to_owned(),
        message,
    };
    let cannot = |e: std::io::Error| bad(format!("cannot read {field} {path}: {}", e.kind()));
    let named = std::fs::symlink_metadata(path).map_err(cannot)?;
    if !named.file_type().is_file() {
        return Err(bad(format!("{field} {path} is not a regular file")));
    }
    let mut file = std::fs::File::open(path).map_err(cannot)?;
    // Checked on the open file: the path may have been swapped after the check above.
    let meta = file.metadata().map_err(cannot)?;
    if (meta.dev(), meta.ino()) != (named.dev(), named.ino()) {
        return Err(bad(format!("{field} {path} changed while it was read")));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(bad(format!(
            "{field} {path} is accessible by group or others (mode {mode:04o}); fix it with `chmod 600 {path}`"
        )));
    }
    if meta.len() > MAX_SECRET_FILE {
        return Err(bad(format!(
            "{field} {path} is larger than {MAX_SECRET_FILE} bytes"
        )));
    }
    let mut raw = String::new();
    file.by_ref()
        .take(MAX_SECRET_FILE)
        .read_to_string(&mut raw)
        .map_err(cannot)?;
    let secret = raw.strip_suffix('\n').unwrap_or(&raw);
    let secret = secret.strip_suffix('\r').unwrap_or(secret);
    if secret.is_empty() || secret.contains(['\r', '\n']) {
        return Err(bad(format!(
            "{field} {path} must hold the secret on one line"
        )));
    }
    Ok(Secret::new(secret))
}

/// Errors from sealing or opening.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SealError(pub String);

/// Authenticated encryption with a key only lanyard holds, for the few secrets lanyard
/// must keep to act later (an access token an RFC 7009 server needs to revoke it; a
/// registered static API key). A sealed value is useless without the key, so it may be
/// stored and shown like any other handle; `aad` binds it to its owner (a grant ID), so
/// a sealed value moved to another record does not open.
pub trait Sealer: Send + Sync {
    /// Seal `plaintext`, bound to `aad`. The result is printable ASCII.
    ///
    /// # Errors
    /// [`SealError`] if no randomness or key is available.
    fn seal(&self, plaintext: &[u8], aad: &[u8]) -> std::result::Result<String, SealError>;
    /// Open a value [`Sealer::seal`] produced with the same `aad`.
    ///
    /// # Errors
    /// [`SealError`] if it was not sealed by this key, was altered, or `aad` differs.
    fn open(&self, sealed: &str, aad: &[u8]) -> std::result::Result<Secret, SealError>;
}

/// A JWT lanyard signs to prove `req`'s workload to a destination that federates with
/// lanyard's issuer: `iss` lanyard, `sub` the workload ID, exactly one `aud`, `iat`,
/// `exp` = `iat` + `life`, a fresh `jti`, and `lanyard` = `{grant_id, destination}`.
/// Returns the `jti` (a non-secret handle) and the token.
///
/// # Errors
/// [`DestinationError::Mint`].
pub fn mint_workload_jwt(
    minter: &dyn TokenMinter,
    req: &IssueRequest<'_>,
    destination: &str,
    audience: &str,
    iat: UnixTime,
    life: u64,
) -> Result<(String, Secret)> {
    let jti = uuid::Uuid::new_v4().simple().to_string();
    let claims = serde_json::json!({
        "iss": minter.issuer_url(),
        "sub": req.workload.as_str(),
        "aud": audience,
        "iat": iat,
        "exp": iat.saturating_add(i64::try_from(life).unwrap_or(i64::MAX)),
        "jti": jti,
        "lanyard": {"grant_id": req.grant_id.as_str(), "destination": destination},
    });
    let token = minter
        .mint(&claims, "JWT")
        .map_err(DestinationError::Mint)?;
    Ok((jti, token))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DestinationSpec {
        serde_json::from_value(serde_json::json!({
            "name": "orders-api", "kind": "jwt", "scopes": ["orders:read"],
            "max_ttl_secs": 600, "default_ttl_secs": 300,
            "settings": {"audience": "https://orders.internal"}
        }))
        .unwrap()
    }

    #[test]
    fn ttl_is_defaulted_and_clamped() {
        let s = spec();
        s.validate().unwrap();
        assert_eq!(s.effective_ttl(None).as_secs(), 300);
        assert_eq!(
            s.effective_ttl(Some(Ttl::from_secs(60).unwrap())).as_secs(),
            60
        );
        assert_eq!(
            s.effective_ttl(Some(Ttl::from_secs(9999).unwrap()))
                .as_secs(),
            600
        );
    }

    #[test]
    fn bad_specs_are_refused() {
        let mut s = spec();
        s.name = "Orders".into();
        assert!(s.validate().is_err());
        let mut s = spec();
        s.default_ttl_secs = 700;
        assert!(s.validate().is_err());
        let mut s = spec();
        s.scopes.push("bad scope".into());
        assert!(s.validate().is_err());
        assert!(
            serde_json::from_value::<DestinationSpec>(
                serde_json::json!({"name":"a","kind":"jwt","bogus":1})
            )
            .is_err()
        );
    }

    #[test]
    fn introspection_clients_default_empty_and_are_not_serialized_then() {
        let s = spec();
        assert!(s.introspection_clients.is_empty());
        assert!(!s.allows_introspection_by("spiffe://lanyard.local/api"));
        let json = serde_json::to_value(&s).unwrap();
        assert!(json.get("introspection_clients").is_none(), "{json}");
        let mut s = spec();
        s.introspection_clients = vec!["spiffe://lanyard.local/api".into()];
        let back: DestinationSpec =
            serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn introspection_clients_match_exactly_or_below_a_prefix() {
        let mut s = spec();
        s.introspection_clients = vec![
            "spiffe://lanyard.local/k8s/ns/orders/sa/api".into(),
            "spiffe://lanyard.local/gateways/*".into(),
            "spiffe://other.td/*".into(),
        ];
        s.validate().unwrap();
        for (id, want) in [
            ("spiffe://lanyard.local/k8s/ns/orders/sa/api", true),
            ("spiffe://lanyard.local/k8s/ns/orders/sa/api2", false),
            ("spiffe://lanyard.local/k8s/ns/orders/sa", false),
            ("spiffe://lanyard.local/gateways/eu", true),
            ("spiffe://lanyard.local/gateways/eu/1", true),
            ("spiffe://lanyard.local/gateways", false),
            ("spiffe://lanyard.local/gateways/", false),
            ("spiffe://lanyard.local/gatewaysx/eu", false),
            ("spiffe://other.td/anything", true),
            ("spiffe://other.tdx/anything", false),
            ("", false),
        ] {
            assert_eq!(s.allows_introspection_by(id), want, "{id}");
        }
    }

    #[test]
    fn bad_introspection_clients_are_refused() {
        for bad in [
            "",
            "*",
            "/*",
            "lanyard.local/api",
            "https://lanyard.local/api",
            "spiffe://lanyard.local",
            "spiffe://lanyard.local/",
            "spiffe://lanyard.local/api/",
            "spiffe://lanyard.local//*",
            "spiffe://lanyard.local/a*",
            "spiffe://lanyard.local/*/api",
            "spiffe://lanyard.local/api/**",
            "spiffe://Lanyard.local/api",
            "spiffe://lanyard.local/../api",
        ] {
            let mut s = spec();
            s.introspection_clients = vec![bad.into()];
            let err = s.validate().unwrap_err().to_string();
            assert!(err.contains("introspection_clients[0]"), "{bad:?}: {err}");
        }
        let mut s = spec();
        s.introspection_clients =
            vec!["spiffe://lanyard.local/a".into(); MAX_INTROSPECTION_CLIENTS + 1];
        assert!(s.validate().is_err());
    }

    #[test]
    fn unknown_scopes_are_listed() {
        let s = spec();
        let req = [
            Scope::parse("orders:read").unwrap(),
            Scope::parse("orders:write").unwrap(),
        ];
        let unknown = s.unknown_scopes(&req);
        assert_eq!(unknown.len(), 1);
        assert_eq!(unknown[0].as_str(), "orders:write");
    }
}
