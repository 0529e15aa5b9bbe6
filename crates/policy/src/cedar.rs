//! [`CedarAuthorizer`]: decisions by a Cedar policy set.
//!
//! # Entity model
//! - principal `Lanyard::Workload::"<workload id>"` with
//!   - `id: String`, the workload ID (`principal.id like "spiffe://lanyard.local/k8s/*"`),
//!   - `issuer: String`, the name of the issuer that proved it,
//!   - `claims: Record`, the verified subject-token claims. Strings, booleans and
//!     integers keep their type, arrays become sets, objects become records; floats,
//!     `null` and integers beyond `i64` are dropped. Any key is reachable with
//!     `principal.claims["kubernetes.io"]`; guard optional claims with
//!     `principal.claims has "x"`.
//! - action `Lanyard::Action::"exchange"` or `Lanyard::Action::"renew"`.
//! - resource `Lanyard::Destination::"<name>"` with `name: String`, `kind: String`,
//!   `labels: Record` (string values).
//! - context `{scopes: Set<String>, ttl_secs: Long, task_id: String ("" if none),
//!   now: Long, issuer: String}`.
//!
//! # Decisions
//! Default deny: allowed only if some `permit` is satisfied and no `forbid` is. An
//! evaluation error never allows anything: a `permit` that errors grants nothing (as in
//! Cedar), and a `forbid` that errors **denies**, as if it were satisfied, so a forbid
//! cannot be sidestepped by a token that lacks the claim it reads. Either way the error is
//! reported in [`Decision::errors`].

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;
use std::str::FromStr;

use cedar_policy::{
    Context, Decision as CedarDecision, Effect, Entities, Entity, EntityId, EntityTypeName,
    EntityUid, PolicyId, PolicySet, Request, RestrictedExpression,
};
use miette::Diagnostic as _;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::{Authorizer, Decision, DecisionRequest, PolicyError, Result};

/// Cedar namespace of lanyard's entity types.
pub const NAMESPACE: &str = "Lanyard";
/// Claims nested deeper than this are dropped.
pub const MAX_CLAIM_DEPTH: usize = 16;

/// A Cedar policy set of one version.
#[derive(Debug, Clone)]
pub struct CedarAuthorizer {
    policies: PolicySet,
    version: String,
    workload_type: EntityTypeName,
    action_type: EntityTypeName,
    destination_type: EntityTypeName,
}

impl CedarAuthorizer {
    /// Parse `text` as a Cedar policy set labelled `version`. Policies take their ID from
    /// an `@id("...")` annotation when present.
    ///
    /// # Errors
    /// [`PolicyError::Parse`] with Cedar's diagnostics (line, column, problem) if the text
    /// does not parse or contains templates; [`PolicyError::DuplicateId`].
    pub fn from_text(text: &str, version: &str) -> Result<Self> {
        let parsed = PolicySet::from_str(text).map_err(|errs| PolicyError::Parse {
            message: render_parse_errors(text, &errs),
        })?;
        if parsed.templates().next().is_some() {
            return Err(PolicyError::Parse {
                message:
                    "templates (policies with ?principal or ?resource slots) are not supported"
                        .into(),
            });
        }
        let mut policies = PolicySet::new();
        let mut seen = HashSet::new();
        for policy in parsed.policies() {
            let policy = match policy.annotation("id") {
                Some("") => {
                    return Err(PolicyError::Parse {
                        message: format!("policy {} has an empty @id", policy.id()),
                    });
                }
                Some(id) => policy.new_id(PolicyId::new(id)),
                None => policy.clone(),
            };
            let id = policy.id().to_string();
            if !seen.insert(id.clone()) {
                return Err(PolicyError::DuplicateId(id));
            }
            policies
                .add(policy)
                .map_err(|_| PolicyError::DuplicateId(id))?;
        }
        Ok(Self {
            policies,
            version: version.to_owned(),
            workload_type: type_name("Workload")?,
            action_type: type_name("Action")?,
            destination_type: type_name("Destination")?,
        })
    }

    /// Load a policy file. The version is `file:sha256:<first 12 hex digits of the
    /// file's SHA-256>`, so the same text always has the same version.
    ///
    /// # Errors
    /// [`PolicyError::Io`], then as [`CedarAuthorizer::from_text`].
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| PolicyError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let text = std::str::from_utf8(&bytes).map_err(|e| PolicyError::Parse {
            message: format!("{} is not UTF-8: {e}", path.display()),
        })?;
        let digest = hex::encode(Sha256::digest(&bytes));
        let version = format!("file:sha256:{}", &digest[..12]);
        Self::from_text(text, &version).map_err(|e| match e {
            PolicyError::Parse { message } => PolicyError::Parse {
                message: format!("{}: {message}", path.display()),
            },
            other => other,
        })
    }

    /// Number of policies in the set.
    pub fn len(&self) -> usize {
        self.policies.policies().count()
    }

    /// Whether the set is empty (and so denies everything).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn uid(&self, ty: &EntityTypeName, id: &str) -> EntityUid {
        EntityUid::from_type_name_and_id(ty.clone(), EntityId::new(id))
    }

    /// The Cedar request and entities for `req`.
    fn build(&self, req: &DecisionRequest<'_>) -> std::result::Result<(Request, Entities), String> {
        let principal = self.uid(&self.workload_type, req.workload_id);
        let action = self.uid(&self.action_type, req.action.as_str());
        let resource = self.uid(&self.destination_type, req.destination);

        let claims =
            record(req.claims, 0).map_err(|e| format!("building the principal's claims: {e}"))?;
        let workload = Entity::new(
            principal.clone(),
            HashMap::from([
                ("id".to_owned(), string(req.workload_id)),
                ("issuer".to_owned(), string(req.issuer)),
                ("claims".to_owned(), claims),
            ]),
            HashSet::new(),
        )
        .map_err(|e| format!("building the principal: {e}"))?;
        let labels = RestrictedExpression::new_record(
            req.destination_labels
                .iter()
                .map(|(k, v)| (k.clone(), string(v))),
        )
        .map_err(|e| format!("building the destination labels: {e}"))?;
        let destination = Entity::new(
            resource.clone(),
            HashMap::from([
                ("name".to_owned(), string(req.destination)),
                ("kind".to_owned(), string(req.destination_kind)),
                ("labels".to_owned(), labels),
            ]),
            HashSet::new(),
        )
        .map_err(|e| format!("building the resource: {e}"))?;
        let context = Context::from_pairs([
            (
                "scopes".to_owned(),
                RestrictedExpression::new_set(req.scopes.iter().map(|s| string(s))),
            ),
            (
                "ttl_secs".to_owned(),
                RestrictedExpression::new_long(i64::try_from(req.ttl_secs).unwrap_or(i64::MAX)),
            ),
            ("task_id".to_owned(), string(req.task_id.unwrap_or(""))),
            ("now".to_owned(), RestrictedExpression::new_long(req.now)),
            ("issuer".to_owned(), string(req.issuer)),
        ])
        .map_err(|e| format!("building the context: {e}"))?;
        let request = Request::new(principal, action, resource, context, None)
            .map_err(|e| format!("building the request: {e}"))?;
        let entities = Entities::from_entities([workload, destination], None)
            .map_err(|e| format!("building the entities: {e}"))?;
        Ok((request, entities))
    }

    fn deny(&self, determining: Vec<String>, errors: Vec<String>) -> Decision {
        Decision {
            allowed: false,
            policy_version: self.version.clone(),
            determining_policies: determining,
            errors,
        }
    }
}

impl Authorizer for CedarAuthorizer {
    fn decide(&self, req: &DecisionRequest<'_>) -> Decision {
        let (request, entities) = match self.build(req) {
            Ok(built) => built,
            Err(e) => {
                tracing::warn!(error = %e, "policy request could not be built; denying");
                return self.deny(Vec::new(), vec![e]);
            }
        };
        let response =
            cedar_policy::Authorizer::new().is_authorized(&request, &self.policies, &entities);
        let diagnostics = response.diagnostics();

        let mut errors = Vec::new();
        let mut failed_forbids = Vec::new();
        for err in diagnostics.errors() {
            let cedar_policy::AuthorizationError::PolicyEvaluationError(e) = err;
            let id = e.policy_id();
            if self.policies.policy(id).map(|p| p.effect()) == Some(Effect::Forbid) {
                failed_forbids.push(id.to_string());
            }
            errors.push(err.to_string());
        }
        let mut reason: Vec<String> = diagnostics.reason().map(ToString::to_string).collect();
        reason.sort();

        match response.decision() {
            CedarDecision::Allow if failed_forbids.is_empty() => Decision {
                allowed: true,
                policy_version: self.version.clone(),
                determining_policies: reason,
                errors,
            },
            CedarDecision::Allow => {
                failed_forbids.sort();
                self.deny(failed_forbids, errors)
            }
            CedarDecision::Deny => {
                // `reason` holds the satisfied forbids; add forbids that failed.
                reason.extend(failed_forbids);
                reason.sort();
                reason.dedup();
                self.deny(reason, errors)
            }
        }
    }

    fn version(&self) -> String {
        self.version.clone()
    }
}

fn type_name(ty: &str) -> Result<EntityTypeName> {
    EntityTypeName::from_str(&format!("{NAMESPACE}::{ty}")).map_err(|errs| PolicyError::Parse {
        message: format!("entity type {NAMESPACE}::{ty}: {errs}"),
    })
}

fn string(s: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(s.to_owned())
}

/// A JSON object as a Cedar record, dropping values Cedar cannot hold.
fn record(
    map: &serde_json::Map<String, Value>,
    depth: usize,
) -> std::result::Result<RestrictedExpression, String> {
    let fields = map
        .iter()
        .filter_map(|(k, v)| value(v, depth + 1).map(|e| (k.clone(), e)));
    RestrictedExpression::new_record(fields).map_err(|e| e.to_string())
}

fn value(v: &Value, depth: usize) -> Option<RestrictedExpression> {
    if depth > MAX_CLAIM_DEPTH {
        return None;
    }
    match v {
        Value::String(s) => Some(string(s)),
        Value::Bool(b) => Some(RestrictedExpression::new_bool(*b)),
        Value::Number(n) => n.as_i64().map(RestrictedExpression::new_long),
        Value::Array(items) => Some(RestrictedExpression::new_set(
            items.iter().filter_map(|item| value(item, depth + 1)),
        )),
        Value::Object(map) => record(map, depth).ok(),
        Value::Null => None,
    }
}

/// Every parse error with its line and column, one per line.
fn render_parse_errors(text: &str, errs: &cedar_policy::ParseErrors) -> String {
    let mut out = String::new();
    for (i, err) in errs.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let offset = err
            .labels()
            .and_then(|mut labels| labels.next())
            .map(|label| label.offset());
        if let Some(offset) = offset {
            let (line, col) = line_col(text, offset);
            let _ = write!(out, "line {line}, column {col}: ");
        }
        let _ = write!(out, "{err}");
        if let Some(help) = err.help() {
            let _ = write!(out, " ({help})");
        }
    }
    out
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        let text = "ab\ncdé\nf";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 3), (2, 1));
        assert_eq!(line_col(text, 7), (2, 4));
        assert_eq!(line_col(text, 999), (3, 2));
    }
}
