//! The `aws-sts` destination: lanyard mints a short-lived web identity token for the
//! workload and calls AWS STS `AssumeRoleWithWebIdentity` (PROTOCOLS.md §3.1) for
//! temporary AWS credentials of one role; revocation writes an inline deny policy on
//! that role (PROTOCOLS.md §3.3), because issued STS credentials cannot be revoked.
//!
//! # Exchange (PROTOCOLS.md §3.1, unsigned Query API)
//! ```text
//! POST <sts_endpoint>                    (default https://sts.amazonaws.com/)
//! Content-Type: application/x-www-form-urlencoded; charset=utf-8
//!
//! Action=AssumeRoleWithWebIdentity&Version=2011-06-15&RoleArn=<role_arn>
//! &RoleSessionName=lanyard-<grant id>&WebIdentityToken=<jwt>&DurationSeconds=<n>[&Policy=<json>]
//! ```
//! - `RoleSessionName` is `lanyard-` and the grant ID (`[\w+=,.@-]`, 40 characters), so
//!   the assumed-role ARN and CloudTrail name the grant.
//! - `DurationSeconds` is the grant's TTL clamped to `900..=max_session_duration_secs`
//!   (AWS's minimum is 900 s, so a shorter grant gets 900 s credentials). The grant's
//!   expiry is the `Expiration` AWS answers.
//! - `Policy` is the session policy: the statements `scope_policies` gives the granted
//!   scopes, in one document (checked at load to fit AWS's 2,048 characters even for a
//!   grant of every scope). Without `scope_policies` no policy is sent and the session
//!   has the role's permissions. With it, a grant whose scopes carry no statement is
//!   refused (such a session would have the whole role).
//!
//! The answer (XML) gives [`Credential::Aws`] (`AccessKeyId`, `SecretAccessKey`,
//! `SessionToken`, and `region` from the settings); the revocation handle is the role
//! ARN.
//!
//! # Web identity token (PROTOCOLS.md §3.2)
//! A JWS signed by lanyard's active key, `typ` `JWT`, with `iss` (lanyard's issuer URL,
//! registered in IAM as an OIDC provider), `sub` (the workload ID), one `aud`
//! (`audience`), `iat`, `exp` = `iat` + `web_identity_token_lifetime_secs` (it only has
//! to live for the call), a fresh `jti` (each attempt mints a new token), `lanyard` =
//! `{grant_id, destination}`, and:
//! - `"https://aws.amazon.com/source_identity": "<grant id>"`: the session's
//!   `aws:SourceIdentity`, which revocation denies on; it persists through role
//!   chaining. The role's trust policy must allow `sts:SetSourceIdentity`.
//! - `"https://aws.amazon.com/tags": {"principal_tags": {"<key>": ["<value>"]},
//!   "transitive_tag_keys": [...]}` when `session_tags` is set: each tag's value is a
//!   string claim of the verified subject token. AWS limits (at most 50 tags, key ≤ 128
//!   and value ≤ 256 characters of letters, digits, spaces and `_.:/=+-@`, keys not
//!   `aws:...`, unique ignoring case) are checked when the settings are loaded (keys) and
//!   at issue (values). A claim that is missing, not a string, or not a valid tag value
//!   refuses the exchange (`INVALID_ARGUMENT`) unless `missing_claim` is `omit`, which
//!   issues without that tag. Refusing is the default because a policy keyed on a tag
//!   (`aws:PrincipalTag/...`) would otherwise see a session without it. The trust
//!   policy must allow `sts:TagSession`.
//!
//! # Settings
//! | key | default | meaning |
//! |---|---|---|
//! | `role_arn` | required | the role assumed, `arn:aws:iam::<account>:role/<name>` |
//! | `region` | `us-east-1` | region handed to the workload with the credentials |
//! | `audience` | `sts.amazonaws.com` | the token's `aud`: a client ID of the IAM OIDC provider |
//! | `sts_endpoint` | `https://sts.amazonaws.com/` | https, or http only on loopback; a regional endpoint works too |
//! | `max_session_duration_secs` | 3600 | the role's `MaxSessionDuration`, 900..=43200: the longest session requested |
//! | `web_identity_token_lifetime_secs` | 300 | lifetime of each minted token, 60..=3600 |
//! | `session_tags` | `{}` | tag key -> claim name, at most 50 |
//! | `transitive_tag_keys` | `[]` | keys of `session_tags` that survive role chaining |
//! | `missing_claim` | `refuse` | `refuse` or `omit` a tag whose claim is missing or unusable |
//! | `scope_policies` | `{}` | scope -> statement or list of statements; when set, every offered scope needs an entry (`[]` adds nothing) and no other scope may appear |
//! | `credentials_file` | unset | absolute path of an AWS shared-credentials file, mode 0600 or stricter, for revocation; unset: revocation only reports the expiry |
//! | `credentials_profile` | `default` | its profile |
//! | `iam_endpoint` | `https://iam.amazonaws.com/` | https, or http only on loopback |
//! | `iam_signing_region` | `us-east-1` | region IAM requests are signed for (`cn-north-1` in China) |
//! | `deny_policy_name` | `lanyard-revoked` | the inline policy revocation writes |
//! | `timeout_secs` | 10 | per request, 1..=120 |
//! | `max_response_bytes` | 1 MiB | 1024..=16 MiB |
//! | `max_attempts` | 2 | 1..=5; each exchange attempt mints a fresh token |
//! | `breaker_threshold` / `breaker_cooldown_secs` | 5 / 30 | circuit breaker: fail fast after this many retryable failures in a row, for this long |
//!
//! Unknown keys are refused. The settings hold no secret: IAM credentials come from
//! `credentials_file`, read when the destination is built (to check it) and again on
//! each revocation (so rotated credentials are picked up); errors name the path,
//! never the contents.
//!
//! # Errors
//! AWS answers errors as `<ErrorResponse><Error><Type/><Code/><Message/></Error>`. The
//! code is passed through and the message sanitized (control characters removed,
//! token-like words redacted, cut to 200 characters):
//! `sts.amazonaws.com answered http 400: InvalidIdentityToken: ...`.
//! - Not retryable (`DESTINATION_REJECTED`): `InvalidIdentityToken`,
//!   `ExpiredTokenException`, `AccessDenied`, `MalformedPolicyDocument`,
//!   `PackedPolicyTooLarge`, `ValidationError`, IAM's `NoSuchEntity`, `LimitExceeded`,
//!   any other 4xx, a malformed or oversized 2xx answer.
//! - Retryable (`DESTINATION_UNAVAILABLE`): `IDPCommunicationError`, `Throttling`, other
//!   throttling and outage codes, any 5xx or 429, timeouts, connection failures.
//!
//! # Revocation (PROTOCOLS.md §3.3): [`Revocability::Eventual`]
//! Issued STS credentials cannot be revoked; every request is checked against the
//! role's policies, so a deny blocks them. Revoking a grant reads the role's inline
//! policy `deny_policy_name` (`GetRolePolicy`; none yet is an empty document), adds
//! the grant ID to a statement denying `*` on `*` when `aws:SourceIdentity` equals it,
//! and writes it back (`PutRolePolicy`), both SigV4-signed IAM Query API calls
//! (`Version=2010-05-08`). Statements are bucketed by the hour the credentials expire
//! and pruned once expired; when the document would exceed IAM's 10,240-character
//! limit, or IAM answers `LimitExceeded`, they are replaced by AWS's own "revoke older
//! sessions" statement, `DateLessThan aws:TokenIssueTime <now>`, which blocks **every**
//! session of the role issued before then (the receipt says so). See [`deny`].
//!
//! The answer is [`RevokeOutcome::Blocked`], whose detail names the role, the policy,
//! the condition, that policy changes may take a few minutes to propagate, and that the
//! credentials themselves stay valid until they expire. Revoking twice is harmless (the
//! document is unchanged and not written). Read-modify-write is serialized inside the
//! adapter, which also merges the document it last wrote for the role into what IAM
//! answers: IAM reads are eventually consistent, so a read just after a write may not
//! show it yet. Two destinations (or two lanyard servers) revoking on the same role at
//! the same moment could still overwrite each other's update, so give each role one
//! destination. Without `credentials_file`, the destination is
//! [`Revocability::AtExpiry`] and a revocation states the residual lifetime.
//!
//! IAM needs `iam:GetRolePolicy` and `iam:PutRolePolicy` on the role. `NoSuchEntity`
//! for the role, `AccessDenied`, `MalformedPolicyDocument` and `LimitExceeded` (after
//! the fallback) fail the step without retry; throttling, 5xx and timeouts are retried.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use lanyard_core::{SharedClock, SystemClock, UnixTime};
use lanyard_destination::http::{self, CircuitBreaker, RetryPolicy};
use lanyard_destination::settings::{self as common, Plumbing};
use lanyard_destination::{
    Credential, Destination, DestinationError, DestinationSpec, IssueRequest, Issued, MintError,
    Revocability, RevokeOutcome, RevokeRequest, TokenMinter,
};
use reqwest::header::HeaderMap;
use reqwest::{Client, Url};
use serde_json::{Value, json};

pub mod deny;
pub mod settings;
pub mod wire;

pub use settings::{AwsStsSettings, MissingClaim, RoleArn};

use crate::deny::Block;
use crate::settings::{MIN_SESSION_SECS, bad};
use crate::wire::{AdminKeys, AwsError};

/// The adapter kind this crate implements.
pub const KIND: &str = "aws-sts";
/// STS Query API version.
pub const STS_VERSION: &str = "2011-06-15";
/// IAM Query API version.
pub const IAM_VERSION: &str = "2010-05-08";
/// The claim AWS reads the source identity from.
pub const SOURCE_IDENTITY_CLAIM: &str = "https://aws.amazon.com/source_identity";
/// The claim AWS reads session tags from.
pub const TAGS_CLAIM: &str = "https://aws.amazon.com/tags";
/// Start of every `RoleSessionName`.
pub const SESSION_NAME_PREFIX: &str = "lanyard-";
/// The propagation caveat every receipt carries.
pub const PROPAGATION_CAVEAT: &str = "policy changes may take a few minutes to propagate";

/// Adapter errors are [`DestinationError`]s.
pub type Result<T, E = DestinationError> = std::result::Result<T, E>;

/// The `RoleSessionName` for a grant: `lanyard-<grant id>`, within `[\w+=,.@-]{2,64}`.
pub fn role_session_name(grant: &lanyard_core::GrantId) -> String {
    let name: String = format!("{SESSION_NAME_PREFIX}{}", grant.as_str())
        .chars()
        .filter(|c| settings::iam_name_char(*c))
        .take(64)
        .collect();
    name
}

/// The `DurationSeconds` requested for a grant of `ttl_secs`.
pub fn session_duration(ttl_secs: u64, max_session_secs: u64) -> u64 {
    ttl_secs.clamp(MIN_SESSION_SECS, max_session_secs.max(MIN_SESSION_SECS))
}

/// An `aws-sts` destination.
pub struct AwsStsDestination {
    name: String,
    settings: AwsStsSettings,
    role: RoleArn,
    sts_url: Url,
    iam_url: Url,
    client: Client,
    breaker: CircuitBreaker,
    iam_breaker: CircuitBreaker,
    retry: RetryPolicy,
    minter: Arc<dyn TokenMinter>,
    clock: SharedClock,
    /// Serializes the deny policy's read-modify-write, and holds the document last
    /// written per role name (IAM reads are eventually consistent).
    revoke_lock: tokio::sync::Mutex<HashMap<String, String>>,
}

impl std::fmt::Debug for AwsStsDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsStsDestination")
            .field("name", &self.name)
            .field("settings", &self.settings)
            .field("issuer", &self.minter.issuer_url())
            .finish_non_exhaustive()
    }
}

impl AwsStsDestination {
    /// Build the adapter from its spec; reads `credentials_file` once to check it.
    ///
    /// # Errors
    /// [`DestinationError::InvalidSettings`].
    pub fn new(spec: &DestinationSpec, minter: Arc<dyn TokenMinter>) -> Result<Self> {
        lanyard_destination::settings::check_spec(KIND, spec)?;
        let settings = AwsStsSettings::from_value(&spec.settings, &spec.scopes)?;
        let role = settings.role()?;
        let sts_url = common::check_endpoint(KIND, "sts_endpoint", &settings.sts_endpoint)?;
        let iam_url = common::check_endpoint(KIND, "iam_endpoint", &settings.iam_endpoint)?;
        if let Some(path) = &settings.credentials_file {
            wire::read_credentials(path, &settings.credentials_profile)
                .map_err(|m| bad(format!("settings.{m}")))?;
        }
        let tuning = lanyard_destination::tuning!(settings);
        let Plumbing {
            client,
            breaker,
            retry,
        } = tuning.plumbing(
            KIND,
            &format!("destination {}", spec.name),
            SystemClock::shared(),
            None,
        )?;
        let iam_breaker = tuning.breaker(
            &format!("destination {} (IAM)", spec.name),
            SystemClock::shared(),
        );
        Ok(Self {
            name: spec.name.clone(),
            breaker,
            iam_breaker,
            settings,
            role,
            sts_url,
            iam_url,
            client,
            retry,
            minter,
            clock: SystemClock::shared(),
            revoke_lock: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    /// The parsed settings.
    pub fn settings(&self) -> &AwsStsSettings {
        &self.settings
    }

    /// The web identity token's claims for `req`, issued at `iat`.
    fn claims(&self, req: &IssueRequest<'_>, iat: UnixTime, tags: Option<&Value>) -> Value {
        let life =
            i64::try_from(self.settings.web_identity_token_lifetime_secs).unwrap_or(i64::MAX);
        let mut claims = json!({
            "iss": self.minter.issuer_url(),
            "sub": req.workload.as_str(),
            "aud": self.settings.audience,
            "iat": iat,
            "exp": iat.saturating_add(life),
            "jti": uuid::Uuid::new_v4().simple().to_string(),
            "lanyard": {"grant_id": req.grant_id.as_str(), "destination": self.name},
            SOURCE_IDENTITY_CLAIM: req.grant_id.as_str(),
        });
        if let (Some(tags), Some(obj)) = (tags, claims.as_object_mut()) {
            obj.insert(TAGS_CLAIM.to_owned(), tags.clone());
        }
        claims
    }

    /// One `AssumeRoleWithWebIdentity` call with a fresh token.
    async fn assume(
        &self,
        req: &IssueRequest<'_>,
        iat: UnixTime,
        tags: Option<&Value>,
        policy: Option<&str>,
        duration: u64,
    ) -> Result<std::result::Result<wire::StsCredentials, AwsError>> {
        let token = self
            .minter
            .mint(&self.claims(req, iat, tags), "JWT")
            .map_err(|e: MintError| DestinationError::Mint(e))?;
        let session = role_session_name(req.grant_id);
        let duration = duration.to_string();
        let mut pairs = vec![
            ("Action", "AssumeRoleWithWebIdentity"),
            ("Version", STS_VERSION),
            ("RoleArn", self.settings.role_arn.as_str()),
            ("RoleSessionName", session.as_str()),
            ("WebIdentityToken", token.expose()),
            ("DurationSeconds", duration.as_str()),
        ];
        if let Some(p) = policy {
            pairs.push(("Policy", p));
        }
        let (status, body) = wire::post_form(
            &self.client,
            &self.sts_url,
            HeaderMap::new(),
            wire::form(&pairs),
            self.settings.max_response_bytes,
        )
        .await?;
        if !status.is_success() {
            let e = wire::parse_error(status, &body);
            return if e.retryable() {
                Err(e.into_error(&http::host_of(&self.sts_url)))
            } else {
                Ok(Err(e))
            };
        }
        Ok(Ok(wire::parse_assume_role(&body, &self.sts_url)?))
    }

    /// One signed IAM call; retried per the settings. An AWS error that is not worth
    /// retrying comes back as `Ok(Err(..))` for the caller to judge.
    async fn iam(
        &self,
        keys: &AdminKeys,
        params: &[(&str, &str)],
    ) -> Result<std::result::Result<Vec<u8>, AwsError>> {
        let body = wire::form(params);
        let body = &body;
        http::retry(self.retry, &self.iam_breaker, |_attempt| async move {
            let headers = wire::sign_form(
                keys,
                &self.settings.iam_signing_region,
                "iam",
                &self.iam_url,
                body,
                self.clock.now_unix_millis(),
            )?;
            let (status, answer) = wire::post_form(
                &self.client,
                &self.iam_url,
                headers,
                body.clone(),
                self.settings.max_response_bytes,
            )
            .await?;
            if status.is_success() {
                return Ok(Ok(answer));
            }
            let e = wire::parse_error(status, &answer);
            if e.retryable() {
                Err(e.into_error(&http::host_of(&self.iam_url)))
            } else {
                Ok(Err(e))
            }
        })
        .await
    }

    /// The role revocation acts on: the one recorded at issue, if the handle is a role
    /// ARN, else the configured one.
    fn revoked_role(&self, handle: &str) -> (String, RoleArn) {
        match RoleArn::parse(handle) {
            Ok(r) => (handle.to_owned(), r),
            Err(_) => (self.settings.role_arn.clone(), self.role.clone()),
        }
    }

    /// Add the grant to the role's deny policy.
    async fn block(&self, req: &RevokeRequest<'_>) -> Result<RevokeOutcome> {
        let path = self
            .settings
            .credentials_file
            .as_ref()
            .ok_or_else(|| bad("no credentials_file".into()))?;
        let keys =
            wire::read_credentials(path, &self.settings.credentials_profile).map_err(|m| {
                DestinationError::Upstream {
                    message: format!("revoke: {m}"),
                    retryable: true,
                }
            })?;
        let (role_arn, role) = self.revoked_role(req.revocation_handle);
        let policy_name = self.settings.deny_policy_name.as_str();
        let iam_host = http::host_of(&self.iam_url);
        let context = |action: &str, e: DestinationError| match e {
            DestinationError::Upstream { message, retryable } => DestinationError::Upstream {
                message: format!("revoke: {action} on role {role_arn}: {message}"),
                retryable,
            },
            other => other,
        };
        let fail = |action: &str, e: AwsError| context(action, e.into_error(&iam_host));
        let mut written = self.revoke_lock.lock().await;
        let existing = match self
            .iam(
                &keys,
                &[
                    ("Action", "GetRolePolicy"),
                    ("Version", IAM_VERSION),
                    ("RoleName", role.name.as_str()),
                    ("PolicyName", policy_name),
                ],
            )
            .await
            .map_err(|e| context("GetRolePolicy", e))?
        {
            Ok(body) => Some(
                wire::parse_get_role_policy(&body, &self.iam_url)
                    .map_err(|e| context("GetRolePolicy", e))?,
            ),
            // No such policy yet (or no such role: PutRolePolicy then says which).
            Err(e) if e.is("NoSuchEntity") => None,
            Err(e) => return Err(fail("GetRolePolicy", e)),
        };
        let now = self.clock.now_unix().max(req.now);
        let merge = |force: bool| {
            deny::merge(
                existing.as_deref(),
                written.get(&role.name).map(String::as_str),
                req.grant_id.as_str(),
                req.expires_at,
                now,
                force,
            )
            .map_err(|m| DestinationError::Upstream {
                message: format!("revoke: {policy_name} on role {role_arn}: {m}"),
                retryable: false,
            })
        };
        let mut merged = merge(false)?;
        let mut forced = false;
        while merged.changed {
            let put = self
                .iam(
                    &keys,
                    &[
                        ("Action", "PutRolePolicy"),
                        ("Version", IAM_VERSION),
                        ("RoleName", role.name.as_str()),
                        ("PolicyName", policy_name),
                        ("PolicyDocument", merged.document.as_str()),
                    ],
                )
                .await
                .map_err(|e| context("PutRolePolicy", e))?;
            match put {
                Ok(_) => {
                    written.insert(role.name.clone(), merged.document.clone());
                    break;
                }
                // The role's inline policies together are too large: one statement.
                Err(e) if e.is("LimitExceeded") && !forced => {
                    forced = true;
                    merged = merge(true)?;
                }
                Err(e) => return Err(fail("PutRolePolicy", e)),
            }
        }
        tracing::info!(
            destination = %self.name,
            role = %role_arn,
            grant = %req.grant_id,
            written = merged.changed,
            "aws-sts grant blocked by deny policy"
        );
        let until = wire::iso(req.expires_at);
        let detail = match merged.block {
            Block::SourceIdentity { sid } => format!(
                "inline policy {policy_name} on role {role_arn} denies every action (Deny * on *) when aws:SourceIdentity is {grant} (statement {sid}); {PROPAGATION_CAVEAT}; the credentials themselves stay valid until they expire at {until}, denied by this policy meanwhile",
                grant = req.grant_id,
            ),
            Block::IssuedBefore { before } => format!(
                "inline policy {policy_name} on role {role_arn} denies every action (Deny * on *) when aws:TokenIssueTime is before {before}: the per-grant deny list would exceed IAM's inline policy limit, so this blocks ALL sessions of the role issued before then, not only this grant's; {PROPAGATION_CAVEAT}; the credentials themselves stay valid until they expire at {until}, denied by this policy meanwhile",
                before = wire::iso(before),
            ),
        };
        Ok(RevokeOutcome::Blocked { detail })
    }
}

#[async_trait]
impl Destination for AwsStsDestination {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn revocability(&self) -> Revocability {
        if self.settings.credentials_file.is_some() {
            Revocability::Eventual
        } else {
            Revocability::AtExpiry
        }
    }

    async fn issue(&self, req: IssueRequest<'_>) -> Result<Issued> {
        let tags = self.settings.tags_claim(req.claims)?;
        let policy = self.settings.session_policy(req.scopes)?;
        let duration = session_duration(req.ttl.as_secs(), self.settings.max_session_duration_secs);
        let started = tokio::time::Instant::now();
        let (tags, policy) = (tags.as_ref(), policy.as_deref());
        let answer = http::retry_minting(self.retry, &self.breaker, req.now, started, |iat| {
            self.assume(&req, iat, tags, policy, duration)
        })
        .await?;
        let host = http::host_of(&self.sts_url);
        let creds = answer.map_err(|e| e.into_error(&host))?;
        if creds.expiration <= self.clock.now_unix().max(req.now) {
            return Err(DestinationError::Upstream {
                message: format!("{host} answered with credentials that have already expired"),
                retryable: false,
            });
        }
        Ok(Issued {
            expires_at: creds.expiration,
            credential: Credential::Aws {
                access_key_id: creds.access_key_id,
                secret_access_key: creds.secret_access_key,
                session_token: creds.session_token,
                region: self.settings.region.clone(),
            },
            revocation_handle: self.settings.role_arn.clone(),
        })
    }

    /// Block the grant's sessions with the role's deny policy (see the module docs).
    async fn revoke(&self, req: RevokeRequest<'_>) -> Result<RevokeOutcome> {
        if self.settings.credentials_file.is_none() {
            return Ok(http::lapses_at_expiry(
                &req,
                "this aws-sts destination has no credentials_file, so lanyard cannot write a deny policy on the role",
            ));
        }
        if req.expires_at <= req.now {
            return Ok(RevokeOutcome::ExpiresAt {
                at: req.expires_at,
                detail: format!(
                    "the credentials already expired at {}; nothing to block",
                    wire::iso(req.expires_at)
                ),
            });
        }
        self.block(&req).await
    }
}

#[cfg(test)]
mod tests {
    use lanyard_core::GrantId;

    use super::*;

    #[test]
    fn session_names_and_durations() {
        let g = GrantId::generate();
        let n = role_session_name(&g);
        assert_eq!(n, format!("lanyard-{g}"));
        assert!((2..=64).contains(&n.len()));
        assert!(n.chars().all(settings::iam_name_char));
        assert_eq!(session_duration(60, 3600), 900);
        assert_eq!(session_duration(1800, 3600), 1800);
        assert_eq!(session_duration(7200, 3600), 3600);
        assert_eq!(session_duration(100_000, 43_200), 43_200);
    }
}
