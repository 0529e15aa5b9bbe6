//! The `settings` block of an `aws-sts` destination: parsed with `deny_unknown_fields`,
//! then validated (endpoints, ranges, the role ARN, session tags, and the session
//! policies' size) before the destination is built.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use lanyard_core::Scope;
use lanyard_destination::DestinationError;
use lanyard_destination::settings as common;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::{KIND, Result};

/// The documented STS endpoint.
pub const DEFAULT_STS_ENDPOINT: &str = "https://sts.amazonaws.com/";
/// The documented IAM endpoint (global, signed for `us-east-1`).
pub const DEFAULT_IAM_ENDPOINT: &str = "https://iam.amazonaws.com/";
/// The audience AWS documents for OIDC identity providers used by STS.
pub const DEFAULT_AUDIENCE: &str = "sts.amazonaws.com";
/// The shortest session `AssumeRoleWithWebIdentity` issues (PROTOCOLS.md §3.1).
pub const MIN_SESSION_SECS: u64 = 900;
/// The longest `MaxSessionDuration` a role can have (12 h).
pub const MAX_SESSION_SECS: u64 = 43_200;
/// Session policy plaintext limit (inline and managed together, PROTOCOLS.md §3.1).
pub const MAX_SESSION_POLICY_CHARS: usize = 2048;
/// At most this many session tags (PROTOCOLS.md §3.2).
pub const MAX_TAGS: usize = 50;
/// Longest tag key, characters.
pub const MAX_TAG_KEY_CHARS: usize = 128;
/// Longest tag value, characters.
pub const MAX_TAG_VALUE_CHARS: usize = 256;
/// The IAM policy language version.
pub const POLICY_VERSION: &str = "2012-10-17";

/// What to do when a claim named by `session_tags` is missing, not a string, or holds
/// a value AWS would refuse as a tag value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissingClaim {
    /// Refuse the exchange (`INVALID_ARGUMENT`): a policy keyed on the tag never sees a
    /// session without it.
    #[default]
    Refuse,
    /// Issue without that tag.
    Omit,
}

/// The `settings` block of an `aws-sts` destination (see the crate docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsStsSettings {
    /// The role assumed, `arn:<partition>:iam::<account>:role/<path/><name>`.
    pub role_arn: String,
    /// Region handed to the workload with the credentials.
    #[serde(default = "default_region")]
    pub region: String,
    /// The web identity token's one `aud` (the IAM OIDC provider's client ID).
    #[serde(default = "default_audience")]
    pub audience: String,
    /// STS endpoint.
    #[serde(default = "default_sts")]
    pub sts_endpoint: String,
    /// The role's `MaxSessionDuration`, seconds: the longest session requested.
    #[serde(default = "default_max_session")]
    pub max_session_duration_secs: u64,
    /// Lifetime of the web identity token lanyard mints for each call, seconds.
    #[serde(default = "default_token_lifetime")]
    pub web_identity_token_lifetime_secs: u64,
    /// Session tag key -> name of a (string) claim of the verified subject token.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub session_tags: BTreeMap<String, String>,
    /// Tag keys (of `session_tags`) that persist through role chaining.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub transitive_tag_keys: Vec<String>,
    /// What a missing or unusable tag claim does.
    #[serde(default)]
    pub missing_claim: MissingClaim,
    /// lanyard scope -> IAM policy statement (an object) or statements (an array): the
    /// granted scopes' statements form the session policy.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub scope_policies: BTreeMap<String, Value>,
    /// File with the IAM credentials revocation uses (AWS shared-credentials format).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<PathBuf>,
    /// Profile (section) of `credentials_file`.
    #[serde(default = "default_profile")]
    pub credentials_profile: String,
    /// IAM endpoint.
    #[serde(default = "default_iam")]
    pub iam_endpoint: String,
    /// Region IAM requests are signed for.
    #[serde(default = "default_region")]
    pub iam_signing_region: String,
    /// Name of the inline deny policy revocation writes on the role.
    #[serde(default = "default_deny_policy_name")]
    pub deny_policy_name: String,
    /// Per-request timeout, seconds.
    #[serde(default = "common::default_timeout_secs")]
    pub timeout_secs: u64,
    /// Largest answer read, bytes.
    #[serde(default = "common::default_max_response_bytes")]
    pub max_response_bytes: usize,
    /// Attempts per call.
    #[serde(default = "common::default_max_attempts")]
    pub max_attempts: u32,
    /// Retryable failures in a row that open the breaker.
    #[serde(default = "common::default_breaker_threshold")]
    pub breaker_threshold: u32,
    /// How long the breaker stays open, seconds.
    #[serde(default = "common::default_breaker_cooldown_secs")]
    pub breaker_cooldown_secs: u64,
}

fn default_region() -> String {
    "us-east-1".to_owned()
}
fn default_audience() -> String {
    DEFAULT_AUDIENCE.to_owned()
}
fn default_sts() -> String {
    DEFAULT_STS_ENDPOINT.to_owned()
}
fn default_iam() -> String {
    DEFAULT_IAM_ENDPOINT.to_owned()
}
fn default_max_session() -> u64 {
    3600
}
fn default_token_lifetime() -> u64 {
    300
}
fn default_profile() -> String {
    "default".to_owned()
}
fn default_deny_policy_name() -> String {
    "lanyard-revoked".to_owned()
}

pub(crate) fn bad(message: String) -> DestinationError {
    common::invalid(KIND, message)
}

fn range(field: &str, v: u64, lo: u64, hi: u64) -> Result<()> {
    common::check_range(KIND, field, v, lo, hi)
}

fn text(field: &str, v: &str) -> Result<()> {
    common::check_text(KIND, field, v, 512)
}

/// Characters IAM allows in role names, session names and source identities:
/// `[\w+=,.@-]`.
pub fn iam_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_+=,.@-".contains(c)
}

/// Characters AWS allows in tag keys and values: letters, digits, spaces and
/// `_.:/=+-@` (AWS also allows other Unicode space separators; lanyard only the space).
pub fn tag_char(c: char) -> bool {
    c.is_alphanumeric() || c == ' ' || "_.:/=+-@".contains(c)
}

/// A role ARN, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleArn {
    /// `aws`, `aws-cn`, `aws-us-gov`.
    pub partition: String,
    /// 12-digit account ID.
    pub account: String,
    /// The role's name (the last path segment), what IAM's `RoleName` takes.
    pub name: String,
}

impl RoleArn {
    /// Parse `arn:<partition>:iam::<account>:role/<path/><name>`.
    ///
    /// # Errors
    /// A message saying what is wrong.
    pub fn parse(arn: &str) -> std::result::Result<Self, String> {
        let shape = || {
            format!(
                "{:?} is not a role ARN (arn:aws:iam::<12-digit account>:role/<name>)",
                arn.chars().take(100).collect::<String>()
            )
        };
        if arn.len() > 2048 {
            return Err(shape());
        }
        let mut parts = arn.splitn(6, ':');
        let (Some("arn"), Some(partition), Some("iam"), Some(""), Some(account), Some(res)) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(shape());
        };
        if !matches!(partition, "aws" | "aws-cn" | "aws-us-gov") {
            return Err(shape());
        }
        if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
            return Err(shape());
        }
        let Some(path) = res.strip_prefix("role/") else {
            return Err(shape());
        };
        let segments: Vec<&str> = path.split('/').collect();
        if segments
            .iter()
            .any(|s| s.is_empty() || !s.chars().all(iam_name_char))
        {
            return Err(shape());
        }
        let name = segments.last().copied().unwrap_or_default();
        if name.len() > 64 {
            return Err(shape());
        }
        Ok(Self {
            partition: partition.to_owned(),
            account: account.to_owned(),
            name: name.to_owned(),
        })
    }
}

fn check_region(field: &str, r: &str) -> Result<()> {
    if r.is_empty()
        || r.len() > 32
        || !r
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(bad(format!(
            "settings.{field} {r:?} must be an AWS region name such as us-east-1"
        )));
    }
    Ok(())
}

/// Check a session tag key.
fn check_tag_key(key: &str) -> std::result::Result<(), String> {
    let n = key.chars().count();
    if n == 0 || n > MAX_TAG_KEY_CHARS || !key.chars().all(tag_char) {
        return Err(format!(
            "session tag key {:?} must be 1-{MAX_TAG_KEY_CHARS} characters of letters, digits, spaces and _.:/=+-@",
            key.chars().take(140).collect::<String>()
        ));
    }
    if key.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("aws:")) {
        return Err(format!("session tag key {key:?} must not start with aws:"));
    }
    Ok(())
}

/// Whether `v` is a tag value AWS accepts.
pub fn valid_tag_value(v: &str) -> bool {
    v.chars().count() <= MAX_TAG_VALUE_CHARS && v.chars().all(tag_char)
}

/// The statements of one `scope_policies` entry.
fn statements(scope: &str, v: &Value) -> std::result::Result<Vec<Value>, String> {
    let list = match v {
        Value::Object(_) => vec![v.clone()],
        Value::Array(a) => a.clone(),
        _ => {
            return Err(format!(
                "scope_policies.{scope} must be a policy statement (object) or a list of them"
            ));
        }
    };
    for (i, s) in list.iter().enumerate() {
        let Some(o) = s.as_object() else {
            return Err(format!(
                "scope_policies.{scope}[{i}] must be a policy statement (object)"
            ));
        };
        if !matches!(
            o.get("Effect").and_then(Value::as_str),
            Some("Allow" | "Deny")
        ) {
            return Err(format!(
                "scope_policies.{scope}[{i}] needs \"Effect\": \"Allow\" or \"Deny\""
            ));
        }
        if !(o.contains_key("Action") || o.contains_key("NotAction")) {
            return Err(format!(
                "scope_policies.{scope}[{i}] needs \"Action\" or \"NotAction\""
            ));
        }
    }
    Ok(list)
}

/// A policy document of `statements`, compact.
pub fn policy_document(statements: Vec<Value>) -> String {
    json!({"Version": POLICY_VERSION, "Statement": statements}).to_string()
}

impl AwsStsSettings {
    /// Parse and validate a `settings` block; `offered_scopes` are the destination's
    /// scopes, which `scope_policies` must cover exactly when it is set.
    ///
    /// # Errors
    /// [`DestinationError::InvalidSettings`] naming the problem.
    pub fn from_value(settings: &Value, offered_scopes: &[String]) -> Result<Self> {
        let s: AwsStsSettings = common::parse(KIND, settings)?;
        RoleArn::parse(&s.role_arn).map_err(|m| bad(format!("settings.role_arn: {m}")))?;
        check_region("region", &s.region)?;
        check_region("iam_signing_region", &s.iam_signing_region)?;
        text("audience", &s.audience)?;
        common::check_endpoint(KIND, "sts_endpoint", &s.sts_endpoint)?;
        common::check_endpoint(KIND, "iam_endpoint", &s.iam_endpoint)?;
        range(
            "max_session_duration_secs",
            s.max_session_duration_secs,
            MIN_SESSION_SECS,
            MAX_SESSION_SECS,
        )?;
        range(
            "web_identity_token_lifetime_secs",
            s.web_identity_token_lifetime_secs,
            60,
            3600,
        )?;
        s.check_tags()?;
        s.check_scope_policies(offered_scopes)?;
        if let Some(p) = &s.credentials_file
            && (!p.is_absolute() || p.as_os_str().len() > 4096)
        {
            return Err(bad(format!(
                "settings.credentials_file {:?} must be an absolute path",
                p.display()
            )));
        }
        text("credentials_profile", &s.credentials_profile)?;
        if s.deny_policy_name.is_empty()
            || s.deny_policy_name.len() > 128
            || !s.deny_policy_name.chars().all(iam_name_char)
        {
            return Err(bad(
                "settings.deny_policy_name must be 1-128 characters of [A-Za-z0-9_+=,.@-]".into(),
            ));
        }
        lanyard_destination::tuning!(s).check(KIND)?;
        Ok(s)
    }

    /// The role, parsed.
    pub fn role(&self) -> Result<RoleArn> {
        RoleArn::parse(&self.role_arn).map_err(|m| bad(format!("settings.role_arn: {m}")))
    }

    fn check_tags(&self) -> Result<()> {
        if self.session_tags.len() > MAX_TAGS {
            return Err(bad(format!(
                "settings.session_tags has {} entries; AWS allows at most {MAX_TAGS}",
                self.session_tags.len()
            )));
        }
        let mut seen = BTreeSet::new();
        for (key, claim) in &self.session_tags {
            check_tag_key(key).map_err(|m| bad(format!("settings.session_tags: {m}")))?;
            // AWS treats tag keys case-insensitively: two that differ only in case clash.
            if !seen.insert(key.to_lowercase()) {
                return Err(bad(format!(
                    "settings.session_tags: keys must differ by more than case ({key:?})"
                )));
            }
            if claim.is_empty() || claim.len() > 256 || claim.chars().any(char::is_control) {
                return Err(bad(format!(
                    "settings.session_tags.{key}: the claim name must be 1-256 characters without control characters"
                )));
            }
        }
        for key in &self.transitive_tag_keys {
            if !self.session_tags.contains_key(key) {
                return Err(bad(format!(
                    "settings.transitive_tag_keys: {key:?} is not a key of session_tags"
                )));
            }
        }
        Ok(())
    }

    fn check_scope_policies(&self, offered: &[String]) -> Result<()> {
        if self.scope_policies.is_empty() {
            return Ok(());
        }
        for scope in self.scope_policies.keys() {
            if !offered.iter().any(|o| o == scope) {
                return Err(bad(format!(
                    "settings.scope_policies names {scope:?}, which the destination does not offer"
                )));
            }
        }
        for scope in offered {
            if !self.scope_policies.contains_key(scope) {
                return Err(bad(format!(
                    "settings.scope_policies has no entry for offered scope {scope:?} (every offered scope needs one; [] adds nothing)"
                )));
            }
        }
        let mut all = Vec::new();
        for (scope, v) in &self.scope_policies {
            all.extend(statements(scope, v).map_err(|m| bad(format!("settings.{m}")))?);
        }
        // The largest session policy is the one for a grant of every scope.
        let n = policy_document(all).chars().count();
        if n > MAX_SESSION_POLICY_CHARS {
            return Err(bad(format!(
                "settings.scope_policies: a grant of every scope would send a {n}-character session policy; AWS allows {MAX_SESSION_POLICY_CHARS}"
            )));
        }
        Ok(())
    }

    /// The session policy for a grant of `scopes`: `None` when `scope_policies` is unset
    /// (the session gets the role's permissions).
    ///
    /// # Errors
    /// [`DestinationError::BadRequest`] when `scope_policies` is set and the granted
    /// scopes carry no statement (such a session would get the whole role).
    pub fn session_policy(&self, scopes: &[Scope]) -> Result<Option<String>> {
        if self.scope_policies.is_empty() {
            return Ok(None);
        }
        let mut all = Vec::new();
        for (scope, v) in &self.scope_policies {
            if scopes.iter().any(|s| s.as_str() == scope) {
                all.extend(statements(scope, v).map_err(DestinationError::BadRequest)?);
            }
        }
        if all.is_empty() {
            return Err(DestinationError::BadRequest(
                "this aws-sts destination limits sessions by scope: request at least one scope that carries a policy statement".into(),
            ));
        }
        Ok(Some(policy_document(all)))
    }

    /// The `https://aws.amazon.com/tags` claim for a subject token with `claims`, or
    /// `None` when no tag applies.
    ///
    /// # Errors
    /// [`DestinationError::BadRequest`] when a claim is missing, not a string, or not a
    /// valid tag value, and `missing_claim` is `refuse`.
    pub fn tags_claim(&self, claims: &Map<String, Value>) -> Result<Option<Value>> {
        let mut principal = Map::new();
        for (key, claim) in &self.session_tags {
            let value = claims.get(claim);
            let usable = value.and_then(Value::as_str).filter(|v| valid_tag_value(v));
            match (usable, self.missing_claim) {
                (Some(v), _) => {
                    principal.insert(key.clone(), json!([v]));
                }
                (None, MissingClaim::Omit) => {}
                (None, MissingClaim::Refuse) => {
                    let why = match value {
                        None => "is missing",
                        Some(Value::String(_)) => {
                            "holds a value AWS refuses as a tag value (more than 256 characters, or characters other than letters, digits, spaces and _.:/=+-@)"
                        }
                        Some(_) => "is not a string",
                    };
                    return Err(DestinationError::BadRequest(format!(
                        "session tag {key:?}: claim {claim:?} of the subject token {why}"
                    )));
                }
            }
        }
        if principal.is_empty() {
            return Ok(None);
        }
        let transitive: Vec<&String> = self
            .transitive_tag_keys
            .iter()
            .filter(|k| principal.contains_key(k.as_str()))
            .collect();
        Ok(Some(json!({
            "principal_tags": principal,
            "transitive_tag_keys": transitive,
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLE: &str = "arn:aws:iam::123456789012:role/ci/deployer";

    fn base() -> Value {
        json!({"role_arn": ROLE})
    }

    fn with(k: &str, v: Value) -> Value {
        let mut b = base();
        b.as_object_mut().unwrap().insert(k.into(), v);
        b
    }

    fn offered() -> Vec<String> {
        vec!["s3:read".into(), "s3:write".into()]
    }

    #[test]
    fn defaults() {
        let s = AwsStsSettings::from_value(&base(), &offered()).unwrap();
        assert_eq!(s.region, "us-east-1");
        assert_eq!(s.audience, DEFAULT_AUDIENCE);
        assert_eq!(s.sts_endpoint, DEFAULT_STS_ENDPOINT);
        assert_eq!(s.iam_endpoint, DEFAULT_IAM_ENDPOINT);
        assert_eq!(s.max_session_duration_secs, 3600);
        assert_eq!(s.web_identity_token_lifetime_secs, 300);
        assert_eq!(s.deny_policy_name, "lanyard-revoked");
        assert_eq!(s.missing_claim, MissingClaim::Refuse);
        assert!(s.credentials_file.is_none());
        assert_eq!(s.role().unwrap().name, "deployer");
        assert_eq!(s.session_policy(&[]).unwrap(), None);
        // A round trip keeps the settings (they are stored and listed).
        let back =
            AwsStsSettings::from_value(&serde_json::to_value(&s).unwrap(), &offered()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn role_arns() {
        let r = RoleArn::parse("arn:aws-cn:iam::000000000001:role/a+b=c,d.e@f-g_h").unwrap();
        assert_eq!(r.partition, "aws-cn");
        assert_eq!(r.account, "000000000001");
        assert_eq!(r.name, "a+b=c,d.e@f-g_h");
        for bad in [
            "",
            "arn:aws:iam::123456789012:user/x",
            "arn:aws:iam::12345678901:role/x",
            "arn:aws:iam:us-east-1:123456789012:role/x",
            "arn:aws:sts::123456789012:role/x",
            "arn:other:iam::123456789012:role/x",
            "arn:aws:iam::123456789012:role/",
            "arn:aws:iam::123456789012:role/a//b",
            "arn:aws:iam::123456789012:role/a b",
            &format!("arn:aws:iam::123456789012:role/{}", "x".repeat(65)),
        ] {
            assert!(RoleArn::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn validation_errors() {
        let policies = json!({"s3:read": {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}, "s3:write": []});
        for (v, want) in [
            (json!({}), "missing field `role_arn`"),
            (with("bogus", json!(1)), "unknown field `bogus`"),
            (with("role_arn", json!("arn:aws:iam::1:role/x")), "role ARN"),
            (
                with("sts_endpoint", json!("http://sts.amazonaws.com/")),
                "https is required",
            ),
            (
                with("iam_endpoint", json!("http://10.0.0.1/")),
                "https is required",
            ),
            (with("region", json!("US East")), "AWS region"),
            (with("max_session_duration_secs", json!(899)), "900..=43200"),
            (
                with("max_session_duration_secs", json!(43_201)),
                "900..=43200",
            ),
            (
                with("web_identity_token_lifetime_secs", json!(10)),
                "60..=3600",
            ),
            (with("timeout_secs", json!(0)), "1..=120"),
            (with("max_attempts", json!(6)), "1..=5"),
            (with("max_response_bytes", json!(10)), "1024..="),
            (with("deny_policy_name", json!("a b")), "deny_policy_name"),
            (
                with("credentials_file", json!("relative/creds")),
                "absolute path",
            ),
            (with("missing_claim", json!("ignore")), "unknown variant"),
            (
                with("session_tags", json!({"aws:foo": "sub"})),
                "must not start with aws:",
            ),
            (
                with("session_tags", json!({"a#b": "sub"})),
                "session tag key",
            ),
            (
                with("session_tags", json!({"x".repeat(129): "sub"})),
                "session tag key",
            ),
            (
                with("session_tags", json!({"Repo": "a", "repo": "b"})),
                "more than case",
            ),
            (with("session_tags", json!({"Repo": ""})), "claim name"),
            (
                with("transitive_tag_keys", json!(["Repo"])),
                "not a key of session_tags",
            ),
            (
                with("scope_policies", json!({"s3:read": policies["s3:read"]})),
                "no entry for offered scope \"s3:write\"",
            ),
            (
                with(
                    "scope_policies",
                    json!({"s3:read": [], "s3:write": [], "s3:admin": []}),
                ),
                "does not offer",
            ),
            (
                with(
                    "scope_policies",
                    json!({"s3:read": "s3:GetObject", "s3:write": []}),
                ),
                "must be a policy statement",
            ),
            (
                with(
                    "scope_policies",
                    json!({"s3:read": {"Action": "*"}, "s3:write": []}),
                ),
                "Effect",
            ),
            (
                with(
                    "scope_policies",
                    json!({"s3:read": {"Effect": "Allow"}, "s3:write": []}),
                ),
                "Action",
            ),
        ] {
            let msg = AwsStsSettings::from_value(&v, &offered())
                .unwrap_err()
                .to_string();
            assert!(msg.contains(want), "{v}: {msg}");
        }
        let many: BTreeMap<String, String> =
            (0..51).map(|i| (format!("t{i}"), "sub".into())).collect();
        let msg = AwsStsSettings::from_value(&with("session_tags", json!(many)), &offered())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("at most 50"), "{msg}");
        AwsStsSettings::from_value(&with("scope_policies", policies), &offered()).unwrap();
        AwsStsSettings::from_value(
            &with("sts_endpoint", json!("http://127.0.0.1:4566/")),
            &offered(),
        )
        .unwrap();
    }

    #[test]
    fn oversized_scope_policies_are_refused_at_load() {
        let stmt = |n: usize| json!({"Effect": "Allow", "Action": "s3:GetObject", "Resource": format!("arn:aws:s3:::{}", "b".repeat(n))});
        // Each fits on its own, together they do not.
        let v = with(
            "scope_policies",
            json!({"s3:read": stmt(1000), "s3:write": stmt(1000)}),
        );
        let msg = AwsStsSettings::from_value(&v, &offered())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("2048"), "{msg}");
        let v = with(
            "scope_policies",
            json!({"s3:read": stmt(800), "s3:write": [stmt(10)]}),
        );
        AwsStsSettings::from_value(&v, &offered()).unwrap();
    }

    #[test]
    fn session_policy_combines_the_granted_scopes() {
        let v = with(
            "scope_policies",
            json!({
                "s3:read": {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"},
                "s3:write": [{"Effect": "Allow", "Action": "s3:PutObject", "Resource": "*"}],
            }),
        );
        let s = AwsStsSettings::from_value(&v, &offered()).unwrap();
        let read = Scope::parse("s3:read").unwrap();
        let write = Scope::parse("s3:write").unwrap();
        let doc: Value = serde_json::from_str(
            &s.session_policy(std::slice::from_ref(&read))
                .unwrap()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(doc["Version"], POLICY_VERSION);
        assert_eq!(doc["Statement"].as_array().unwrap().len(), 1);
        assert_eq!(doc["Statement"][0]["Action"], "s3:GetObject");
        let doc: Value =
            serde_json::from_str(&s.session_policy(&[write, read]).unwrap().unwrap()).unwrap();
        assert_eq!(doc["Statement"].as_array().unwrap().len(), 2);
        let err = s.session_policy(&[]).unwrap_err();
        assert!(matches!(err, DestinationError::BadRequest(_)), "{err}");
    }

    #[test]
    fn tags_come_from_string_claims() {
        let v = json!({"role_arn": ROLE, "session_tags": {"Repo": "repository", "Env": "environment"}, "transitive_tag_keys": ["Repo", "Env"]});
        let s = AwsStsSettings::from_value(&v, &[]).unwrap();
        let claims = |v: Value| v.as_object().unwrap().clone();
        let t = s
            .tags_claim(&claims(
                json!({"repository": "acme/app", "environment": "prod"}),
            ))
            .unwrap()
            .unwrap();
        assert_eq!(
            t,
            json!({"principal_tags": {"Env": ["prod"], "Repo": ["acme/app"]}, "transitive_tag_keys": ["Repo", "Env"]})
        );
        for (c, want) in [
            (json!({"repository": "acme/app"}), "is missing"),
            (
                json!({"repository": "acme/app", "environment": 3}),
                "not a string",
            ),
            (
                json!({"repository": "acme/app", "environment": "a#b"}),
                "refuses as a tag value",
            ),
            (
                json!({"repository": "acme/app", "environment": "x".repeat(257)}),
                "refuses as a tag value",
            ),
        ] {
            let err = s.tags_claim(&claims(c.clone())).unwrap_err();
            assert!(
                matches!(&err, DestinationError::BadRequest(m) if m.contains(want)),
                "{c}: {err}"
            );
        }
        let v = json!({"role_arn": ROLE, "session_tags": {"Repo": "repository", "Env": "environment"}, "transitive_tag_keys": ["Env"], "missing_claim": "omit"});
        let s = AwsStsSettings::from_value(&v, &[]).unwrap();
        let t = s
            .tags_claim(&claims(json!({"repository": "acme/app"})))
            .unwrap()
            .unwrap();
        assert_eq!(
            t,
            json!({"principal_tags": {"Repo": ["acme/app"]}, "transitive_tag_keys": []})
        );
        assert_eq!(s.tags_claim(&claims(json!({}))).unwrap(), None);
    }
}
