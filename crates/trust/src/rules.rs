//! Trust rules: which verified tokens of an issuer count as which workload.
//!
//! A rule's conditions select tokens by claim; its template turns claims into the
//! canonical workload ID, a SPIFFE ID in lanyard's trust domain.
//!
//! ## Claim paths
//! A path names a claim with `/`-separated segments: `sub`, `repository`,
//! `kubernetes.io/namespace` (the `namespace` member of the `kubernetes.io` object).
//! At each level the longest run of segments that is a key wins, so a top-level claim
//! whose name itself contains `/` is still reachable.
//!
//! ## Why template values are so restricted
//! A claim value becomes part of an identity that policy, revocation and audit key on.
//! Only `[A-Za-z0-9._/-]` is accepted, with no empty, `.` or `..` segment, so a value can
//! never climb out of its place in the path or smuggle in URL syntax.

use globset::{GlobBuilder, GlobMatcher};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use lanyard_core::{TaskId, WorkloadId};

use crate::config::valid_name;
use crate::error::{Result, TrustError};
use crate::verifier::VerifiedToken;

/// Longest claim path accepted.
const MAX_CLAIM_PATH: usize = 256;
/// The placeholder for lanyard's trust domain.
const TRUST_DOMAIN: &str = "trust_domain";
/// The one template filter: a SPIFFE ID value rendered as `<trust-domain>/<path>`.
const SPIFFE_PATH_FILTER: &str = "spiffe_path";

/// How a claim value is compared.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ClaimMatcher {
    /// Equal to this string.
    Exact(String),
    /// Matches this glob: `*` and `?` stay within one `/`-separated segment, `**`
    /// crosses segments, `{a,b}` and `[...]` as usual. Case-sensitive.
    Glob(String),
    /// Equal to one of these strings.
    OneOf(Vec<String>),
}

/// One condition of a trust rule.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClaimCondition {
    /// Claim path, e.g. `kubernetes.io/namespace`.
    pub claim: String,
    /// How its value is compared. An array claim matches if any element matches;
    /// numbers and booleans compare as their JSON text; a missing claim never matches.
    pub matcher: ClaimMatcher,
}

/// Which tokens of one issuer count as which workload.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TrustRule {
    /// Rule name, `[a-z0-9-]{1,63}`.
    pub name: String,
    /// The `IssuerConfig::name` this rule applies to.
    pub issuer: String,
    /// Lower is tried first; ties are broken by name.
    #[serde(default)]
    pub priority: i32,
    /// All must match.
    #[serde(default)]
    pub conditions: Vec<ClaimCondition>,
    /// The workload ID template, e.g.
    /// `spiffe://{trust_domain}/k8s/ns/{kubernetes.io/namespace}/sa/{kubernetes.io/serviceaccount/name}`.
    /// Placeholders are claim paths and `{trust_domain}`; `{path|spiffe_path}` renders a
    /// claim holding a SPIFFE ID as `<its trust domain>/<its path>`.
    pub workload_template: String,
    /// Claim path naming the task (GitHub `run_id`, Kubernetes pod uid, agent session).
    #[serde(default)]
    pub task_claim: Option<String>,
}

/// A verified token mapped to a workload by a trust rule.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    /// The canonical workload ID.
    pub id: WorkloadId,
    /// The issuer's configured name.
    pub issuer: String,
    /// The name of the rule that matched.
    pub rule: String,
    /// The task, if the rule names a task claim.
    pub task: Option<TaskId>,
    /// The verified claims.
    pub claims: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part<'a> {
    Literal(&'a str),
    TrustDomain,
    Claim(&'a str),
    SpiffePath(&'a str),
}

// === impl TrustRule ===

impl TrustRule {
    /// Check the rule: name, issuer name, claim paths, globs, and that the template
    /// renders a valid SPIFFE ID in `trust_domain`.
    ///
    /// # Errors
    /// [`TrustError::ConfigInvalid`] naming the first problem.
    pub fn validate(&self, trust_domain: &str) -> Result<()> {
        if !valid_name(&self.name) {
            return Err(TrustError::config(
                "trust rule name must be 1-63 characters of [a-z0-9-]",
            ));
        }
        let who = || format!("trust rule `{}`", self.name);
        if !valid_name(&self.issuer) {
            return Err(TrustError::config(format!(
                "{}: issuer must name an issuer ([a-z0-9-]{{1,63}})",
                who()
            )));
        }
        for c in &self.conditions {
            if !valid_claim_path(&c.claim) {
                return Err(TrustError::config(format!(
                    "{}: condition claim path `{}` is malformed",
                    who(),
                    c.claim
                )));
            }
            match &c.matcher {
                ClaimMatcher::Exact(_) => {}
                ClaimMatcher::Glob(g) => {
                    compile_glob(g).map_err(|e| TrustError::config(format!("{}: {e}", who())))?;
                }
                ClaimMatcher::OneOf(list) if list.is_empty() => {
                    return Err(TrustError::config(format!(
                        "{}: one_of needs at least one value",
                        who()
                    )));
                }
                ClaimMatcher::OneOf(_) => {}
            }
        }
        if let Some(t) = &self.task_claim
            && !valid_claim_path(t)
        {
            return Err(TrustError::config(format!(
                "{}: task_claim path is malformed",
                who()
            )));
        }
        let parts = parse_template(&self.workload_template)
            .map_err(|e| TrustError::config(format!("{}: workload_template {e}", who())))?;
        // Render with a harmless sample value per placeholder: the result must be a
        // SPIFFE ID in our trust domain, whatever the (valid) claim values are.
        let mut sample = String::new();
        for p in &parts {
            match p {
                Part::Literal(l) => sample.push_str(l),
                Part::TrustDomain => sample.push_str(trust_domain),
                Part::Claim(_) => sample.push('x'),
                Part::SpiffePath(_) => sample.push_str("example.org/x"),
            }
        }
        let id = WorkloadId::parse(&sample).map_err(|_| {
            TrustError::config(format!(
                "{}: workload_template does not render a valid spiffe id",
                who()
            ))
        })?;
        if id.trust_domain() != trust_domain {
            return Err(TrustError::config(format!(
                "{}: workload_template must render an id in trust domain `{trust_domain}`",
                who()
            )));
        }
        Ok(())
    }

    fn matches(&self, claims: &Map<String, Value>) -> Result<bool> {
        for c in &self.conditions {
            let Some(value) = lookup(claims, &c.claim) else {
                return Ok(false);
            };
            let matcher = Compiled::new(&c.matcher)?;
            let hit = match value {
                Value::Array(items) => items.iter().any(|v| matcher.matches_value(v)),
                v => matcher.matches_value(v),
            };
            if !hit {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn render(&self, claims: &Map<String, Value>, trust_domain: &str) -> Result<WorkloadId> {
        let parts = parse_template(&self.workload_template).map_err(|e| {
            TrustError::config(format!("trust rule `{}`: workload_template {e}", self.name))
        })?;
        let mut out = String::with_capacity(self.workload_template.len() + 64);
        for p in parts {
            match p {
                Part::Literal(l) => out.push_str(l),
                Part::TrustDomain => out.push_str(trust_domain),
                Part::Claim(path) => out.push_str(&path_value(claims, path)?),
                Part::SpiffePath(path) => {
                    let raw = scalar_claim(claims, path)?;
                    let id = WorkloadId::parse(&raw)
                        .map_err(|_| TrustError::claim_invalid(path, "is not a valid spiffe id"))?;
                    let rest = id.as_str().strip_prefix("spiffe://").ok_or_else(|| {
                        TrustError::claim_invalid(path, "is not a valid spiffe id")
                    })?;
                    out.push_str(rest);
                }
            }
        }
        let id = WorkloadId::parse(&out).map_err(|_| {
            TrustError::claim_invalid(&self.workload_template, "renders an invalid workload id")
        })?;
        if id.trust_domain() != trust_domain {
            return Err(TrustError::claim_invalid(
                &self.workload_template,
                "renders a workload id outside lanyard's trust domain",
            ));
        }
        Ok(id)
    }

    fn task(&self, claims: &Map<String, Value>) -> Result<Option<TaskId>> {
        let Some(path) = &self.task_claim else {
            return Ok(None);
        };
        let raw = scalar_claim(claims, path)?;
        TaskId::parse(&raw)
            .map(Some)
            .map_err(|_| TrustError::claim_invalid(path, "is not a valid task id"))
    }
}

/// Map a verified token to a workload with the first matching rule of its issuer
/// (by priority, then name).
///
/// ## Why no fall-through after a match
/// If the first matching rule cannot render its template (a claim is missing or
/// hostile), the token is refused rather than offered to a later rule, which might
/// give it a broader identity.
///
/// # Errors
/// [`TrustError::NoTrustRule`] when no rule matches; [`TrustError::ClaimMissing`] /
/// [`TrustError::ClaimInvalid`] when the matching rule cannot render the workload ID
/// or task; [`TrustError::ConfigInvalid`] for a rule that does not validate.
pub fn match_trust_rules(
    rules: &[TrustRule],
    token: &VerifiedToken,
    trust_domain: &str,
) -> Result<Workload> {
    let mut candidates: Vec<&TrustRule> =
        rules.iter().filter(|r| r.issuer == token.issuer).collect();
    candidates.sort_by(|a, b| {
        a.priority
            .cmp(&b.priority)
            .then_with(|| a.name.cmp(&b.name))
    });
    for rule in candidates {
        if !rule.matches(&token.claims)? {
            continue;
        }
        let id = rule.render(&token.claims, trust_domain)?;
        let task = rule.task(&token.claims)?;
        tracing::debug!(issuer = %token.issuer, rule = %rule.name, workload = %id, "trust rule matched");
        return Ok(Workload {
            id,
            issuer: token.issuer.clone(),
            rule: rule.name.clone(),
            task,
            claims: token.claims.clone(),
        });
    }
    Err(TrustError::NoTrustRule {
        issuer: token.issuer.clone(),
    })
}

// === matching ===

enum Compiled<'a> {
    Exact(&'a str),
    Glob(GlobMatcher),
    OneOf(&'a [String]),
}

impl<'a> Compiled<'a> {
    fn new(m: &'a ClaimMatcher) -> Result<Self> {
        Ok(match m {
            ClaimMatcher::Exact(s) => Compiled::Exact(s),
            ClaimMatcher::Glob(g) => Compiled::Glob(compile_glob(g).map_err(TrustError::config)?),
            ClaimMatcher::OneOf(list) => Compiled::OneOf(list),
        })
    }

    fn matches_value(&self, v: &Value) -> bool {
        let Some(text) = scalar_text(v) else {
            return false;
        };
        match self {
            Compiled::Exact(s) => *s == text,
            Compiled::Glob(g) => g.is_match(&text),
            Compiled::OneOf(list) => list.contains(&text),
        }
    }
}

fn compile_glob(pattern: &str) -> std::result::Result<GlobMatcher, String> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|_| format!("glob `{pattern}` does not compile"))
}

/// Strings as themselves, numbers and booleans as their JSON text; nothing else.
fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Null | Value::Array(_) | Value::Object(_) => None,
    }
}

/// Resolve a claim path, longest key first at each level.
fn lookup<'a>(claims: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    let segments: Vec<&str> = path.split('/').collect();
    lookup_segments(claims, &segments)
}

fn lookup_segments<'a>(obj: &'a Map<String, Value>, segments: &[&str]) -> Option<&'a Value> {
    for take in (1..=segments.len()).rev() {
        let (head, rest) = segments.split_at(take);
        let key = head.join("/");
        let Some(v) = obj.get(&key) else { continue };
        if rest.is_empty() {
            return Some(v);
        }
        if let Value::Object(inner) = v
            && let Some(found) = lookup_segments(inner, rest)
        {
            return Some(found);
        }
    }
    None
}

fn scalar_claim(claims: &Map<String, Value>, path: &str) -> Result<String> {
    let v = lookup(claims, path).ok_or_else(|| TrustError::ClaimMissing(path.to_owned()))?;
    scalar_text(v).ok_or_else(|| TrustError::claim_invalid(path, "is not a string or number"))
}

/// A claim value for a template placeholder.
fn path_value(claims: &Map<String, Value>, path: &str) -> Result<String> {
    let value = scalar_claim(claims, path)?;
    if value.is_empty() {
        return Err(TrustError::claim_invalid(path, "is empty"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b))
    {
        return Err(TrustError::claim_invalid(
            path,
            "has characters outside [A-Za-z0-9._/-]",
        ));
    }
    if value
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err(TrustError::claim_invalid(
            path,
            "has an empty, '.' or '..' path segment",
        ));
    }
    Ok(value)
}

// === templates ===

fn valid_claim_path(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= MAX_CLAIM_PATH
        && p.split('/').all(|seg| {
            !seg.is_empty()
                && seg
                    .chars()
                    .all(|c| !c.is_whitespace() && !c.is_control() && !"{}|".contains(c))
        })
}

fn parse_template(t: &str) -> std::result::Result<Vec<Part<'_>>, String> {
    let mut parts = Vec::new();
    let mut rest = t;
    while !rest.is_empty() {
        match rest.find(['{', '}']) {
            None => {
                parts.push(Part::Literal(rest));
                break;
            }
            Some(i) => {
                let (lit, tail) = rest.split_at(i);
                if tail.starts_with('}') {
                    return Err("has an unmatched '}'".into());
                }
                if !lit.is_empty() {
                    parts.push(Part::Literal(lit));
                }
                let body_and_more = tail.get(1..).unwrap_or_default();
                let end = body_and_more
                    .find('}')
                    .ok_or_else(|| "has an unclosed '{'".to_owned())?;
                let (body, after) = body_and_more.split_at(end);
                if body.contains('{') {
                    return Err("has a nested '{'".into());
                }
                parts.push(parse_placeholder(body)?);
                rest = after.get(1..).unwrap_or_default();
            }
        }
    }
    Ok(parts)
}

fn parse_placeholder(body: &str) -> std::result::Result<Part<'_>, String> {
    if body == TRUST_DOMAIN {
        return Ok(Part::TrustDomain);
    }
    let (path, filter) = match body.split_once('|') {
        Some((p, f)) => (p, Some(f)),
        None => (body, None),
    };
    if !valid_claim_path(path) {
        return Err(format!(
            "placeholder `{{{body}}}` is not a valid claim path"
        ));
    }
    match filter {
        None => Ok(Part::Claim(path)),
        Some(SPIFFE_PATH_FILTER) => Ok(Part::SpiffePath(path)),
        Some(_) => Err(format!(
            "placeholder `{{{body}}}` has an unknown filter (only `{SPIFFE_PATH_FILTER}`)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::Algorithm;

    const TD: &str = "lanyard.local";

    fn token(issuer: &str, claims: Value) -> VerifiedToken {
        let Value::Object(claims) = claims else {
            panic!("claims must be an object")
        };
        VerifiedToken {
            issuer: issuer.into(),
            iss: "https://issuer.example".into(),
            sub: claims
                .get("sub")
                .and_then(Value::as_str)
                .unwrap_or("s")
                .into(),
            aud: vec!["lanyard".into()],
            exp: 0,
            iat: None,
            nbf: None,
            jti: None,
            kid: None,
            alg: Algorithm::RS256,
            claims,
        }
    }

    fn rule(
        name: &str,
        priority: i32,
        conditions: Vec<ClaimCondition>,
        template: &str,
    ) -> TrustRule {
        TrustRule {
            name: name.into(),
            issuer: "k8s".into(),
            priority,
            conditions,
            workload_template: template.into(),
            task_claim: None,
        }
    }

    fn cond(claim: &str, matcher: ClaimMatcher) -> ClaimCondition {
        ClaimCondition {
            claim: claim.into(),
            matcher,
        }
    }

    fn k8s_claims(ns: &str) -> Value {
        json!({
            "sub": format!("system:serviceaccount:{ns}:api"),
            "kubernetes.io": {
                "namespace": ns,
                "serviceaccount": {"name": "api", "uid": "u-1"},
                "pod": {"name": "api-0", "uid": "8c2f9a4e-1b2c-4d5e-8f90-123456789abc"}
            },
            "groups": ["dev", "ops"],
            "level": 3,
            "admin": false,
        })
    }

    const K8S_TEMPLATE: &str = "spiffe://{trust_domain}/k8s/ns/{kubernetes.io/namespace}/sa/{kubernetes.io/serviceaccount/name}";

    #[test]
    fn serde_shapes() {
        let r: TrustRule = serde_json::from_value(json!({
            "name": "r1", "issuer": "k8s",
            "conditions": [
                {"claim": "a", "matcher": {"exact": "x"}},
                {"claim": "b", "matcher": {"glob": "x-*"}},
                {"claim": "c", "matcher": {"one_of": ["x", "y"]}}
            ],
            "workload_template": "spiffe://{trust_domain}/x"
        }))
        .unwrap();
        assert_eq!(r.priority, 0);
        assert_eq!(
            r.conditions[2].matcher,
            ClaimMatcher::OneOf(vec!["x".into(), "y".into()])
        );
        assert_eq!(r.task_claim, None);
        r.validate(TD).unwrap();
    }

    #[test]
    fn nested_kubernetes_paths_render() {
        let r = rule("k8s", 0, vec![], K8S_TEMPLATE);
        r.validate(TD).unwrap();
        let w = match_trust_rules(&[r], &token("k8s", k8s_claims("payments")), TD).unwrap();
        assert_eq!(
            w.id.as_str(),
            "spiffe://lanyard.local/k8s/ns/payments/sa/api"
        );
        assert_eq!(w.rule, "k8s");
        assert_eq!(w.issuer, "k8s");
        assert_eq!(w.task, None);
    }

    #[test]
    fn matchers_exact_glob_one_of_and_scalars() {
        let claims = k8s_claims("team-a");
        let check = |m: ClaimMatcher, claim: &str| {
            let r = rule("r", 0, vec![cond(claim, m)], K8S_TEMPLATE);
            match_trust_rules(&[r], &token("k8s", claims.clone()), TD).is_ok()
        };
        assert!(check(
            ClaimMatcher::Exact("team-a".into()),
            "kubernetes.io/namespace"
        ));
        assert!(!check(
            ClaimMatcher::Exact("team".into()),
            "kubernetes.io/namespace"
        ));
        assert!(check(
            ClaimMatcher::Glob("team-*".into()),
            "kubernetes.io/namespace"
        ));
        assert!(!check(
            ClaimMatcher::Glob("prod-*".into()),
            "kubernetes.io/namespace"
        ));
        assert!(check(
            ClaimMatcher::OneOf(vec!["x".into(), "team-a".into()]),
            "kubernetes.io/namespace"
        ));
        assert!(!check(
            ClaimMatcher::OneOf(vec!["x".into()]),
            "kubernetes.io/namespace"
        ));
        // Array claims match if any element matches.
        assert!(check(ClaimMatcher::Exact("ops".into()), "groups"));
        assert!(!check(ClaimMatcher::Exact("root".into()), "groups"));
        // Numbers and booleans compare as their JSON text.
        assert!(check(ClaimMatcher::Exact("3".into()), "level"));
        assert!(check(ClaimMatcher::OneOf(vec!["false".into()]), "admin"));
        // Objects and missing claims never match.
        assert!(!check(ClaimMatcher::Glob("*".into()), "kubernetes.io"));
        assert!(!check(ClaimMatcher::Glob("*".into()), "nope"));
    }

    #[test]
    fn glob_star_stays_in_one_segment() {
        let claims = json!({"ref": "refs/heads/feature/x", "sub": "s"});
        let t = "spiffe://{trust_domain}/x";
        let star = rule(
            "a",
            0,
            vec![cond("ref", ClaimMatcher::Glob("refs/heads/*".into()))],
            t,
        );
        assert!(match_trust_rules(&[star], &token("k8s", claims.clone()), TD).is_err());
        let double = rule(
            "a",
            0,
            vec![cond("ref", ClaimMatcher::Glob("refs/heads/**".into()))],
            t,
        );
        assert!(match_trust_rules(&[double], &token("k8s", claims), TD).is_ok());
    }

    #[test]
    fn priority_then_name_and_only_the_tokens_issuer() {
        let t = |p: &str| format!("spiffe://{{trust_domain}}/{p}");
        let mut other_issuer = rule("a-first", -10, vec![], &t("other"));
        other_issuer.issuer = "github".into();
        let rules = vec![
            rule("z-late", 5, vec![], &t("late")),
            rule("b-tie", 1, vec![], &t("b")),
            rule("a-tie", 1, vec![], &t("a")),
            rule(
                "no-match",
                0,
                vec![cond("sub", ClaimMatcher::Exact("nobody".into()))],
                &t("n"),
            ),
            other_issuer,
        ];
        let w = match_trust_rules(&rules, &token("k8s", k8s_claims("x")), TD).unwrap();
        assert_eq!(w.rule, "a-tie");
        assert_eq!(w.id.as_str(), "spiffe://lanyard.local/a");
        let e = match_trust_rules(&rules, &token("gitlab", k8s_claims("x")), TD).unwrap_err();
        assert_eq!(e.reason(), lanyard_core::ReasonCode::NoTrustRule);
        let e = match_trust_rules(&rules[3..4], &token("k8s", k8s_claims("x")), TD).unwrap_err();
        assert_eq!(e.reason(), lanyard_core::ReasonCode::NoTrustRule);
    }

    #[test]
    fn github_repository_with_slash() {
        let r = rule(
            "gh",
            0,
            vec![],
            "spiffe://{trust_domain}/gh/{repository}/{ref}",
        );
        r.validate(TD).unwrap();
        let claims = json!({"repository": "acme/api", "ref": "refs/heads/main"});
        let w = match_trust_rules(&[r], &token("k8s", claims), TD).unwrap();
        assert_eq!(
            w.id.as_str(),
            "spiffe://lanyard.local/gh/acme/api/refs/heads/main"
        );
    }

    #[test]
    fn hostile_values_are_claim_invalid() {
        let r = rule("gh", 0, vec![], "spiffe://{trust_domain}/gh/{repository}");
        for hostile in [
            json!(".."),
            json!("acme/../admin"),
            json!("acme/./x"),
            json!("a b"),
            json!("a?b"),
            json!("a#b"),
            json!("a%2f"),
            json!("/abs"),
            json!("trailing/"),
            json!("a//b"),
            json!(""),
            json!("ünï"),
            json!(["a"]),
            json!({"a": 1}),
            json!(null),
        ] {
            let e = match_trust_rules(
                std::slice::from_ref(&r),
                &token("k8s", json!({"repository": hostile.clone()})),
                TD,
            )
            .unwrap_err();
            assert_eq!(
                e.reason(),
                lanyard_core::ReasonCode::ClaimInvalid,
                "{hostile}"
            );
            let msg = e.to_string();
            if let Some(s) = hostile.as_str().filter(|s| s.len() > 2) {
                assert!(!msg.contains(s), "message must not echo the value: {msg}");
            }
        }
        let e = match_trust_rules(&[r], &token("k8s", json!({})), TD).unwrap_err();
        assert_eq!(e.reason(), lanyard_core::ReasonCode::ClaimMissing);
    }

    #[test]
    fn task_claim_present_missing_and_invalid() {
        let mut r = rule("k8s", 0, vec![], K8S_TEMPLATE);
        r.task_claim = Some("kubernetes.io/pod/uid".into());
        r.validate(TD).unwrap();
        let w = match_trust_rules(std::slice::from_ref(&r), &token("k8s", k8s_claims("a")), TD)
            .unwrap();
        assert_eq!(
            w.task.unwrap().as_str(),
            "8c2f9a4e-1b2c-4d5e-8f90-123456789abc"
        );
        r.task_claim = Some("run_id".into());
        let e = match_trust_rules(std::slice::from_ref(&r), &token("k8s", k8s_claims("a")), TD)
            .unwrap_err();
        assert_eq!(e.reason(), lanyard_core::ReasonCode::ClaimMissing);
        // Numeric run ids are used as their JSON text.
        let mut c = k8s_claims("a");
        c["run_id"] = json!(123456);
        let w = match_trust_rules(std::slice::from_ref(&r), &token("k8s", c.clone()), TD).unwrap();
        assert_eq!(w.task.unwrap().as_str(), "123456");
        c["run_id"] = json!("a\nb");
        let e = match_trust_rules(&[r], &token("k8s", c), TD).unwrap_err();
        assert_eq!(e.reason(), lanyard_core::ReasonCode::ClaimInvalid);
    }

    #[test]
    fn spiffe_path_filter() {
        let r = rule(
            "svid",
            0,
            vec![],
            "spiffe://{trust_domain}/spiffe/{sub|spiffe_path}",
        );
        r.validate(TD).unwrap();
        let w = match_trust_rules(
            std::slice::from_ref(&r),
            &token(
                "k8s",
                json!({"sub": "spiffe://example.org/ns/payments/sa/api"}),
            ),
            TD,
        )
        .unwrap();
        assert_eq!(
            w.id.as_str(),
            "spiffe://lanyard.local/spiffe/example.org/ns/payments/sa/api"
        );
        for bad in [
            "spiffe://example.org/a/../b",
            "https://example.org/x",
            "spiffe://Example.org/x",
        ] {
            let e = match_trust_rules(
                std::slice::from_ref(&r),
                &token("k8s", json!({"sub": bad})),
                TD,
            )
            .unwrap_err();
            assert_eq!(e.reason(), lanyard_core::ReasonCode::ClaimInvalid, "{bad}");
        }
    }

    #[test]
    fn key_with_slash_is_reachable() {
        let claims = json!({"a": {"b/c": "d", "b": {"c": "shadowed"}}});
        let m = claims.as_object().unwrap();
        assert_eq!(lookup(m, "a/b/c"), Some(&json!("d")), "longest key wins");
        assert_eq!(lookup(m, "a/x"), None);
        let claims = json!({"org/team": "blue"});
        assert_eq!(
            lookup(claims.as_object().unwrap(), "org/team"),
            Some(&json!("blue"))
        );
    }

    #[test]
    fn validate_refuses_bad_rules() {
        let good = rule("ok", 0, vec![], K8S_TEMPLATE);
        good.validate(TD).unwrap();
        let cases: Vec<(&str, TrustRule)> = vec![
            (
                "name",
                TrustRule {
                    name: "Bad Name".into(),
                    ..good.clone()
                },
            ),
            (
                "issuer",
                TrustRule {
                    issuer: String::new(),
                    ..good.clone()
                },
            ),
            (
                "trust domain",
                TrustRule {
                    workload_template: "spiffe://other.domain/x".into(),
                    ..good.clone()
                },
            ),
            (
                "trust domain",
                TrustRule {
                    workload_template: "spiffe://{trust_domain}x/y".into(),
                    ..good.clone()
                },
            ),
            (
                "trust domain",
                TrustRule {
                    workload_template: "spiffe://{ns}/x".into(),
                    ..good.clone()
                },
            ),
            (
                "valid spiffe id",
                TrustRule {
                    workload_template: "https://{trust_domain}/x".into(),
                    ..good.clone()
                },
            ),
            (
                "valid spiffe id",
                TrustRule {
                    workload_template: "spiffe://{trust_domain}".into(),
                    ..good.clone()
                },
            ),
            (
                "valid spiffe id",
                TrustRule {
                    workload_template: "spiffe://{trust_domain}/a?{x}".into(),
                    ..good.clone()
                },
            ),
            (
                "unclosed",
                TrustRule {
                    workload_template: "spiffe://{trust_domain}/{ns".into(),
                    ..good.clone()
                },
            ),
            (
                "unmatched",
                TrustRule {
                    workload_template: "spiffe://{trust_domain}/ns}".into(),
                    ..good.clone()
                },
            ),
            (
                "nested",
                TrustRule {
                    workload_template: "spiffe://{trust_domain}/{a{b}}".into(),
                    ..good.clone()
                },
            ),
            (
                "claim path",
                TrustRule {
                    workload_template: "spiffe://{trust_domain}/{a//b}".into(),
                    ..good.clone()
                },
            ),
            (
                "claim path",
                TrustRule {
                    workload_template: "spiffe://{trust_domain}/{}".into(),
                    ..good.clone()
                },
            ),
            (
                "filter",
                TrustRule {
                    workload_template: "spiffe://{trust_domain}/{sub|upper}".into(),
                    ..good.clone()
                },
            ),
            (
                "glob",
                TrustRule {
                    conditions: vec![cond("a", ClaimMatcher::Glob("[".into()))],
                    ..good.clone()
                },
            ),
            (
                "one_of",
                TrustRule {
                    conditions: vec![cond("a", ClaimMatcher::OneOf(vec![]))],
                    ..good.clone()
                },
            ),
            (
                "condition claim",
                TrustRule {
                    conditions: vec![cond("a b", ClaimMatcher::Exact("x".into()))],
                    ..good.clone()
                },
            ),
            (
                "task_claim",
                TrustRule {
                    task_claim: Some("/x".into()),
                    ..good.clone()
                },
            ),
        ];
        for (what, r) in cases {
            let e = r.validate(TD).unwrap_err();
            assert_eq!(e.reason(), lanyard_core::ReasonCode::ConfigInvalid);
            assert!(e.to_string().contains(what), "{what}: {e}");
        }
    }
}
