//! The `jwt` destination: lanyard itself mints an audience-scoped access token for an
//! internal API that trusts lanyard as an OIDC issuer (discovery + JWKS).
//!
//! # Token format
//! A JWS signed with lanyard's active key (ES256 or EdDSA), header
//! `{"alg", "kid", "typ": "at+jwt"}` as RFC 9068 (JWT access tokens) asks, and claims:
//!
//! | claim       | value                                                              |
//! |-------------|--------------------------------------------------------------------|
//! | `iss`       | lanyard's issuer URL                                               |
//! | `sub`       | the workload ID (a SPIFFE ID)                                      |
//! | `aud`       | the destination's one `audience`, a single string (never an array, so the token cannot be replayed to another audience; SPIFFE JWT-SVID §6.2) |
//! | `iat`, `nbf`| issue time                                                         |
//! | `exp`       | issue time + granted TTL                                           |
//! | `jti`       | a fresh UUIDv4 (simple form); also the grant's revocation handle   |
//! | `scope`     | granted scopes, space-separated; absent when none were granted     |
//! | `client_id` | the workload ID (RFC 9068 requires it)                             |
//! | `lanyard`   | `{grant_id, issuer, task?, destination}`: the grant, the name of the issuer that proved the workload, the task if bound, this destination's name |
//! | `act`       | RFC 8693 actor chain when delegated: `{"sub": current actor, "act": {"sub": previous, ...}}` |
//! | `src`       | the subject-token claims named in `extra_claims`, when any are present |
//!
//! # Settings
//! ```json
//! {"audience": "https://orders.internal", "extra_claims": ["repository", "run_id"]}
//! ```
//! `audience` is required and names exactly one audience; `extra_claims` is optional.
//! Unknown keys are refused.
//!
//! # Revocation
//! [`Revocability::Immediate`]: lanyard's introspection endpoint refuses a revoked `jti`
//! at once, so an API that introspects sees the revocation on its next call. An API that
//! only validates the signature offline accepts the token until its `exp`; keep TTLs
//! short for such APIs.

use std::sync::Arc;

use async_trait::async_trait;
use lanyard_core::UnixTime;
use lanyard_destination::{
    Credential, Destination, DestinationError, DestinationSpec, IssueRequest, Issued, Revocability,
    RevokeOutcome, RevokeRequest, TokenMinter,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// The adapter kind this crate implements.
pub const KIND: &str = "jwt";
/// JOSE `typ` of the tokens this adapter mints (RFC 9068).
pub const TOKEN_TYP: &str = "at+jwt";
/// RFC 8693 token type of the credential.
pub const ISSUED_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
/// What a revocation receipt says for a `jwt` credential.
pub const REVOKED_DETAIL: &str = "refused by lanyard introspection from now on; an API that only checks the signature offline accepts it until its exp";
/// At most this many `extra_claims`.
pub const MAX_EXTRA_CLAIMS: usize = 32;

/// Adapter errors are [`DestinationError`]s, so the server maps every adapter's errors to
/// wire statuses in one place.
pub type Result<T, E = DestinationError> = std::result::Result<T, E>;

/// The `settings` block of a `jwt` destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSettings {
    /// The one audience (`aud`) of every token, e.g. the API's base URL.
    pub audience: String,
    /// Names of verified subject-token claims copied under `src`.
    #[serde(default)]
    pub extra_claims: Vec<String>,
}

impl JwtSettings {
    /// Parse and validate a `settings` block.
    ///
    /// # Errors
    /// [`DestinationError::InvalidSettings`] naming the problem.
    pub fn from_value(settings: &Value) -> Result<Self> {
        let bad = |message: String| DestinationError::InvalidSettings {
            kind: KIND.to_owned(),
            message,
        };
        let value = match settings {
            Value::Null => Value::Object(Map::new()),
            other => other.clone(),
        };
        let parsed: JwtSettings =
            serde_json::from_value(value).map_err(|e| bad(format!("settings: {e}")))?;
        if parsed.audience.trim().is_empty() {
            return Err(bad("settings.audience must not be empty".into()));
        }
        if parsed.audience.chars().any(char::is_control) {
            return Err(bad(
                "settings.audience must not contain control characters".into()
            ));
        }
        if parsed.extra_claims.len() > MAX_EXTRA_CLAIMS {
            return Err(bad(format!(
                "settings.extra_claims lists more than {MAX_EXTRA_CLAIMS} claims"
            )));
        }
        for (i, name) in parsed.extra_claims.iter().enumerate() {
            if name.is_empty() {
                return Err(bad("settings.extra_claims has an empty name".into()));
            }
            if parsed.extra_claims[..i].contains(name) {
                return Err(bad(format!("settings.extra_claims lists {name:?} twice")));
            }
        }
        Ok(parsed)
    }
}

/// A `jwt` destination: mints lanyard-signed access tokens for one audience.
pub struct JwtDestination {
    name: String,
    settings: JwtSettings,
    minter: Arc<dyn TokenMinter>,
}

impl std::fmt::Debug for JwtDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtDestination")
            .field("name", &self.name)
            .field("settings", &self.settings)
            .field("issuer", &self.minter.issuer_url())
            .finish()
    }
}

impl JwtDestination {
    /// Build the adapter from its spec; validates the common settings and the `jwt`
    /// settings block.
    ///
    /// # Errors
    /// [`DestinationError::InvalidSettings`].
    pub fn new(spec: &DestinationSpec, minter: Arc<dyn TokenMinter>) -> Result<Self> {
        if spec.kind != KIND {
            return Err(DestinationError::InvalidSettings {
                kind: KIND.to_owned(),
                message: format!(
                    "destination {} has kind {:?}, not {KIND:?}",
                    spec.name, spec.kind
                ),
            });
        }
        spec.validate()?;
        Ok(Self {
            name: spec.name.clone(),
            settings: JwtSettings::from_value(&spec.settings)?,
            minter,
        })
    }

    /// The parsed settings.
    pub fn settings(&self) -> &JwtSettings {
        &self.settings
    }

    /// The claims of a token for `req` with ID `jti`.
    fn claims(&self, req: &IssueRequest<'_>, jti: &str, exp: UnixTime) -> Value {
        let workload = req.workload.as_str();
        let mut claims = Map::new();
        claims.insert("iss".into(), json!(self.minter.issuer_url()));
        claims.insert("sub".into(), json!(workload));
        claims.insert("aud".into(), json!(self.settings.audience));
        claims.insert("iat".into(), json!(req.now));
        claims.insert("nbf".into(), json!(req.now));
        claims.insert("exp".into(), json!(exp));
        claims.insert("jti".into(), json!(jti));
        if !req.scopes.is_empty() {
            let scope: Vec<&str> = req.scopes.iter().map(|s| s.as_str()).collect();
            claims.insert("scope".into(), json!(scope.join(" ")));
        }
        claims.insert("client_id".into(), json!(workload));
        let mut lanyard = Map::new();
        lanyard.insert("grant_id".into(), json!(req.grant_id.as_str()));
        lanyard.insert("issuer".into(), json!(req.issuer));
        if let Some(task) = req.task {
            lanyard.insert("task".into(), json!(task.as_str()));
        }
        lanyard.insert("destination".into(), json!(self.name));
        claims.insert("lanyard".into(), Value::Object(lanyard));
        if let Some(act) = actor_claim(req.actor_chain) {
            claims.insert("act".into(), act);
        }
        let src: Map<String, Value> = self
            .settings
            .extra_claims
            .iter()
            .filter_map(|name| req.claims.get(name).map(|v| (name.clone(), v.clone())))
            .collect();
        if !src.is_empty() {
            claims.insert("src".into(), Value::Object(src));
        }
        Value::Object(claims)
    }
}

/// RFC 8693 §4.1 `act`: the current actor outermost, each earlier actor nested inside.
/// `None` for an empty chain.
pub fn actor_claim(chain: &[String]) -> Option<Value> {
    chain.iter().rev().fold(None, |inner, sub| {
        let mut act = Map::new();
        act.insert("sub".into(), json!(sub));
        if let Some(inner) = inner {
            act.insert("act".into(), inner);
        }
        Some(Value::Object(act))
    })
}

#[async_trait]
impl Destination for JwtDestination {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn revocability(&self) -> Revocability {
        Revocability::Immediate
    }

    async fn issue(&self, req: IssueRequest<'_>) -> Result<Issued> {
        let expires_at = req.now.saturating_add(req.ttl.as_secs_i64());
        let jti = uuid::Uuid::new_v4().simple().to_string();
        let claims = self.claims(&req, &jti, expires_at);
        let token = self
            .minter
            .mint(&claims, TOKEN_TYP)
            .map_err(DestinationError::Mint)?;
        Ok(Issued {
            credential: Credential::Bearer {
                token,
                token_type: "Bearer".into(),
                issued_token_type: ISSUED_TOKEN_TYPE.into(),
                header: "authorization".into(),
            },
            expires_at,
            revocation_handle: jti,
        })
    }

    /// Nothing to call: the `jti` is refused by lanyard's introspection once the grant is
    /// marked revoked. Revoking twice gives the same answer.
    async fn revoke(&self, _req: RevokeRequest<'_>) -> Result<RevokeOutcome> {
        // The same words for every grant, so a job's receipts group them; each grant's
        // expiry is in its record.
        Ok(RevokeOutcome::Revoked {
            detail: REVOKED_DETAIL.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actor_chain_nests_current_actor_outermost() {
        assert_eq!(actor_claim(&[]), None);
        assert_eq!(actor_claim(&["a".into()]), Some(json!({"sub": "a"})));
        assert_eq!(
            actor_claim(&["a".into(), "b".into()]),
            Some(json!({"sub": "a", "act": {"sub": "b"}}))
        );
        assert_eq!(
            actor_claim(&["a".into(), "b".into(), "c".into()]),
            Some(json!({"sub": "a", "act": {"sub": "b", "act": {"sub": "c"}}}))
        );
    }

    #[test]
    fn settings_validation() {
        let ok = JwtSettings::from_value(&json!({"audience": "https://a", "extra_claims": ["x"]}))
            .unwrap();
        assert_eq!(ok.extra_claims, vec!["x".to_owned()]);
        let cases = [
            (json!(null), "missing field `audience`"),
            (json!({}), "missing field `audience`"),
            (json!({"audience": ""}), "must not be empty"),
            (json!({"audience": "  "}), "must not be empty"),
            (json!({"audience": ["a", "b"]}), "invalid type"),
            (
                json!({"audience": "a", "bogus": 1}),
                "unknown field `bogus`",
            ),
            (json!({"audience": "a", "extra_claims": [""]}), "empty name"),
            (
                json!({"audience": "a", "extra_claims": ["x", "x"]}),
                "twice",
            ),
            (json!("a"), "invalid type"),
        ];
        for (value, want) in cases {
            let err = JwtSettings::from_value(&value).unwrap_err();
            assert!(
                matches!(err, DestinationError::InvalidSettings { .. }),
                "{err:?}"
            );
            let msg = err.to_string();
            assert!(msg.contains(want), "{value}: {msg}");
            assert!(
                msg.starts_with("invalid settings for destination kind jwt"),
                "{msg}"
            );
        }
    }
}
