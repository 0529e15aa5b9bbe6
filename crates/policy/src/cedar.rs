//! [`CedarAuthorizer`]: decisions by a Cedar policy set, validated against lanyard's
//! schema ([`SCHEMA`], `src/lanyard.cedarschema`; docs/policy.md explains it with examples).
//!
//! # Entity model
//! - principal `Lanyard::Workload::"<workload id>"` with
//!   - `id: String`, the workload ID (`principal.id like "spiffe://lanyard.local/k8s/*"`),
//!   - `issuer: String`, the name of the issuer that proved it,
//!   - `claims: Claims`, the verified subject-token claims the schema declares
//!     (registered JWT claims, the Kubernetes `kubernetes.io` record, GitHub Actions
//!     claims, common OIDC claims). All are optional, so policies guard them:
//!     `principal.claims has environment && principal.claims.environment == "production"`.
//!     A claim whose value does not have the declared type is left out (as if absent); a
//!     nested record missing a required field (e.g. `kubernetes.io` without `namespace`)
//!     is left out whole. `aud` is always a set, even when the token carries one string.
//!   - tags: every top-level claim whose value is a string, boolean or number, as a
//!     string (`"true"`, `"42"`), declared or not:
//!     `principal.hasTag("team") && principal.getTag("team") == "payments"`.
//! - action `Lanyard::Action::"exchange"`, `"renew"`, or `"act_for"` (delegation: the
//!   principal is the actor, asking to act for `context.subject`).
//! - resource `Lanyard::Destination::"<name>"` with `name: String`, `kind: String`; its
//!   labels are its tags (`resource.hasTag("env") && resource.getTag("env") == "prod"`).
//! - context `{scopes: Set<String>, ttl_secs: Long, task_id: String ("" if none),
//!   now: Long, now_hour_utc: Long (0-23), now_weekday_utc: Long (ISO, 1 = Monday to
//!   7 = Sunday), issuer: String, token_source: String (the issuer's name),
//!   delegation_depth: Long, delegation_chain: Set<String>, actor: String,
//!   subject: String}` (the delegation fields are empty/0 when not delegated).
//!
//! [`CedarAuthorizer::build`](CedarAuthorizer) produces exactly this shape; a test checks
//! it against the schema with Cedar's own entity and request validation.
//!
//! # Loading
//! A policy set is parsed, then validated against the schema in strict mode; any parse or
//! validation error refuses the whole set with Cedar's diagnostics (line, column,
//! problem). A permit may carry `@max_ttl_secs("600")`, a positive whole number of
//! seconds; any other value, or the annotation on a forbid, is refused.
//!
//! # Decisions
//! Default deny: allowed only if some `permit` is satisfied and no `forbid` is. An
//! evaluation error never allows anything: a `permit` that errors grants nothing (as in
//! Cedar), and a `forbid` that errors **denies**, as if it were satisfied, so a forbid
//! cannot be sidestepped by a token that lacks the claim it reads. Either way the error is
//! reported in [`Decision::errors`]. [`Decision::max_ttl_secs`] is the smallest
//! `@max_ttl_secs` among the permits that allowed the request.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use cedar_policy::{
    ActionConstraint, Decision as CedarDecision, Effect, EntityId, EntityTypeName, EntityUid,
    PolicyId, PolicySet, ResourceConstraint, Schema, SchemaFragment, ValidationMode,
    ValidationWarning, Validator,
};
// The public-API builder, kept as the reference the hot path is tested against.
#[cfg(test)]
use cedar_policy::{Context, Entities, Entity, Request, RestrictedExpression};
use cedar_policy_core::ast as core;
use cedar_policy_core::entities::{Entities as CoreEntities, NoEntitiesSchema, TCComputation};
use cedar_policy_core::extensions::Extensions;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use smol_str::SmolStr;

use crate::{Action, Authorizer, Decision, DecisionRequest, PolicyError, Result};

mod prefilter;

use prefilter::{Guard, GuardIndex};

/// Cedar namespace of lanyard's entity types.
pub const NAMESPACE: &str = "Lanyard";
/// The Cedar schema (human-readable syntax) every policy set is validated against.
pub const SCHEMA: &str = include_str!("lanyard.cedarschema");
/// The annotation that caps the TTL a permit grants, in seconds.
pub const MAX_TTL_ANNOTATION: &str = "max_ttl_secs";
/// The annotation that caps how many active grants a workload may hold when the permit
/// carrying it allowed the request.
pub const MAX_ACTIVE_GRANTS_ANNOTATION: &str = "max_active_grants";

/// The parsed [`SCHEMA`].
pub fn schema() -> &'static Schema {
    &model().schema
}

/// Check `text` as [`CedarAuthorizer::from_text`] would load it: parse, validate against
/// the schema (strict), check IDs and annotations.
///
/// # Errors
/// As [`CedarAuthorizer::from_text`].
pub fn validate(text: &str) -> Result<()> {
    load(text).map(|_| ())
}

// === the schema, parsed once ===

/// The schema, its validator, and the shape of `principal.claims` read from it, so that
/// `build` follows the schema file rather than a second copy of it.
struct Model {
    schema: Schema,
    validator: Validator,
    claims: RecordShape,
}

#[allow(
    clippy::expect_used,
    reason = "SCHEMA is a compile-time constant; schema_loads tests that it loads"
)]
fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| Model::load().expect("the embedded Cedar schema is valid"))
}

impl Model {
    fn load() -> std::result::Result<Self, String> {
        let (schema, _) = Schema::from_cedarschema_str(SCHEMA).map_err(|e| e.to_string())?;
        let (fragment, _) =
            SchemaFragment::from_cedarschema_str(SCHEMA).map_err(|e| e.to_string())?;
        let json = fragment.to_json_value().map_err(|e| e.to_string())?;
        let ns = &json[NAMESPACE];
        let common = ns["commonTypes"].as_object().cloned().unwrap_or_default();
        let claims = &ns["entityTypes"]["Workload"]["shape"]["attributes"]["claims"];
        let Shape::Record(claims) = Shape::from_json(claims, &common, 0)? else {
            return Err("Workload.claims is not a record".into());
        };
        Ok(Self {
            validator: Validator::new(schema.clone()),
            schema,
            claims,
        })
    }
}

/// A Cedar attribute type, as far as claims need one.
#[derive(Debug)]
enum Shape {
    String,
    Long,
    Bool,
    Set(Box<Shape>),
    Record(RecordShape),
}

#[derive(Debug)]
struct RecordShape {
    /// Attribute name to (type, required).
    fields: HashMap<String, (Shape, bool)>,
    required: usize,
}

impl Shape {
    /// The shape of a type in Cedar's JSON schema format.
    fn from_json(
        ty: &Value,
        common: &Map<String, Value>,
        depth: usize,
    ) -> std::result::Result<Self, String> {
        if depth > 32 {
            return Err("schema types nest too deeply".into());
        }
        let prim = |name: &str| match name.strip_prefix("__cedar::").unwrap_or(name) {
            "String" => Some(Shape::String),
            "Long" => Some(Shape::Long),
            "Bool" | "Boolean" => Some(Shape::Bool),
            _ => None,
        };
        match ty["type"].as_str().unwrap_or_default() {
            "Set" => Ok(Shape::Set(Box::new(Shape::from_json(
                &ty["element"],
                common,
                depth + 1,
            )?))),
            "Record" => {
                let mut fields = HashMap::new();
                let mut required = 0;
                for (name, attr) in ty["attributes"].as_object().into_iter().flatten() {
                    let req = attr["required"].as_bool().unwrap_or(true);
                    required += usize::from(req);
                    fields.insert(
                        name.clone(),
                        (Shape::from_json(attr, common, depth + 1)?, req),
                    );
                }
                Ok(Shape::Record(RecordShape { fields, required }))
            }
            "EntityOrCommon" | "CommonType" => {
                let name = ty["name"].as_str().unwrap_or_default();
                let local = name
                    .strip_prefix(NAMESPACE)
                    .and_then(|n| n.strip_prefix("::"))
                    .unwrap_or(name);
                match common.get(local) {
                    Some(def) => Shape::from_json(def, common, depth + 1),
                    None => prim(name).ok_or_else(|| format!("unsupported claim type {name}")),
                }
            }
            other => prim(other).ok_or_else(|| format!("unsupported claim type {other}")),
        }
    }

    /// `v` as a value of this shape, or `None` if it does not fit.
    #[cfg(test)]
    fn project(&self, v: &Value) -> Option<RestrictedExpression> {
        match (self, v) {
            (Shape::String, Value::String(s)) => Some(string(s)),
            (Shape::Long, Value::Number(n)) => n.as_i64().map(RestrictedExpression::new_long),
            (Shape::Bool, Value::Bool(b)) => Some(RestrictedExpression::new_bool(*b)),
            (Shape::Set(elem), Value::Array(items)) => Some(RestrictedExpression::new_set(
                items.iter().filter_map(|item| elem.project(item)),
            )),
            // A single value where a set is declared (`aud: "x"`) is a one-element set.
            (Shape::Set(elem), one) => elem
                .project(one)
                .map(|e| RestrictedExpression::new_set([e])),
            (Shape::Record(rec), Value::Object(map)) => rec.project(map),
            _ => None,
        }
    }
}

impl Shape {
    /// As [`Shape::project`], straight to the evaluated value the hot path hands Cedar.
    fn project_value(&self, v: &Value) -> Option<core::Value> {
        match (self, v) {
            (Shape::String, Value::String(s)) => Some(core::Value::from(s.as_str())),
            (Shape::Long, Value::Number(n)) => n.as_i64().map(core::Value::from),
            (Shape::Bool, Value::Bool(b)) => Some(core::Value::from(*b)),
            (Shape::Set(elem), Value::Array(items)) => Some(core::Value::set(
                items.iter().filter_map(|item| elem.project_value(item)),
                None,
            )),
            (Shape::Set(elem), one) => elem.project_value(one).map(|e| core::Value::set([e], None)),
            (Shape::Record(rec), Value::Object(map)) => rec.project_value(map),
            _ => None,
        }
    }
}

impl RecordShape {
    /// As [`RecordShape::project`], straight to the evaluated value.
    fn project_value(&self, map: &Map<String, Value>) -> Option<core::Value> {
        let mut out = BTreeMap::new();
        let mut required = 0;
        for (k, v) in map {
            let Some((shape, req)) = self.fields.get(k) else {
                continue;
            };
            if let Some(e) = shape.project_value(v) {
                required += usize::from(*req);
                out.insert(SmolStr::from(k.as_str()), e);
            }
        }
        if required < self.required {
            return None;
        }
        Some(core::Value::record_arc(Arc::new(out), None))
    }

    /// The declared fields of `map` that fit; `None` if a required field is missing or
    /// does not fit.
    #[cfg(test)]
    fn project(&self, map: &Map<String, Value>) -> Option<RestrictedExpression> {
        let mut out = Vec::with_capacity(map.len().min(self.fields.len()));
        let mut required = 0;
        for (k, v) in map {
            let Some((shape, req)) = self.fields.get(k) else {
                continue;
            };
            if let Some(e) = shape.project(v) {
                required += usize::from(*req);
                out.push((k.clone(), e));
            }
        }
        if required < self.required {
            return None;
        }
        RestrictedExpression::new_record(out).ok()
    }
}

// === impl CedarAuthorizer ===

/// A Cedar policy set of one version, validated against [`SCHEMA`].
#[derive(Debug, Clone)]
pub struct CedarAuthorizer {
    policies: PolicySet,
    /// The same policies, sliced so that a decision evaluates only those that can apply.
    slices: Slices,
    /// `@max_ttl_secs` of the permits that carry it, by policy ID.
    ttl_caps: HashMap<String, u64>,
    /// `@max_active_grants` of the permits that carry it, by policy ID.
    grant_caps: HashMap<String, u64>,
    version: String,
    cedar: cedar_policy::Authorizer,
    /// Some policy calls `hasTag` or `getTag`. When none does, the principal's tags
    /// (one per scalar claim) are not built.
    reads_tags: bool,
    workload_type: EntityTypeName,
    action_type: EntityTypeName,
    destination_type: EntityTypeName,
}

/// A parsed, validated policy set and its TTL caps.
type Caps = HashMap<String, u64>;

fn load(text: &str) -> Result<(PolicySet, Caps, Caps)> {
    let parsed = PolicySet::from_str(text).map_err(|errs| PolicyError::Parse {
        message: render_errors(text, errs.iter()),
    })?;
    if parsed.templates().next().is_some() {
        return Err(PolicyError::Parse {
            message: "templates (policies with ?principal or ?resource slots) are not supported"
                .into(),
        });
    }
    let mut policies = PolicySet::new();
    let mut seen = HashSet::new();
    let mut ttl_caps = HashMap::new();
    let mut grant_caps = HashMap::new();
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
        if let Some(value) = policy.annotation(MAX_TTL_ANNOTATION) {
            if policy.effect() == Effect::Forbid {
                return Err(PolicyError::Parse {
                    message: format!(
                        "policy {id}: @{MAX_TTL_ANNOTATION} applies to permit policies only"
                    ),
                });
            }
            ttl_caps.insert(
                id.clone(),
                parse_ttl_cap(value).ok_or_else(|| PolicyError::Parse {
                    message: format!(
                        "policy {id}: @{MAX_TTL_ANNOTATION}({value:?}) is not a positive whole \
                         number of seconds"
                    ),
                })?,
            );
        }
        if let Some(value) = policy.annotation(MAX_ACTIVE_GRANTS_ANNOTATION) {
            if policy.effect() == Effect::Forbid {
                return Err(PolicyError::Parse {
                    message: format!(
                        "policy {id}: @{MAX_ACTIVE_GRANTS_ANNOTATION} applies to permit policies only"
                    ),
                });
            }
            grant_caps.insert(
                id.clone(),
                parse_ttl_cap(value).ok_or_else(|| PolicyError::Parse {
                    message: format!(
                        "policy {id}: @{MAX_ACTIVE_GRANTS_ANNOTATION}({value:?}) is not a positive \
                         whole number"
                    ),
                })?,
            );
        }
        policies
            .add(policy)
            .map_err(|_| PolicyError::DuplicateId(id))?;
    }
    let result = model()
        .validator
        .validate(&policies, ValidationMode::Strict);
    // Some warnings are refused too: a policy that can never apply is a mistake (often a
    // claim the schema does not declare: `principal.claims has mfa` is always false), and
    // bidirectional-text characters can make a policy read other than it evaluates.
    let (refused, warnings): (Vec<_>, Vec<_>) = result.validation_warnings().partition(|w| {
        matches!(
            w,
            ValidationWarning::ImpossiblePolicy(_)
                | ValidationWarning::InvalidActionApplication(_)
                | ValidationWarning::BidiCharsInString(_)
                | ValidationWarning::BidiCharsInIdentifier(_)
        )
    });
    if !result.validation_passed() || !refused.is_empty() {
        let mut message = String::from("does not validate against the lanyard schema:");
        for part in [
            render_errors(text, result.validation_errors()),
            render_errors(text, refused.into_iter()),
        ] {
            if !part.is_empty() {
                message.push('\n');
                message.push_str(&part);
            }
        }
        return Err(PolicyError::Parse { message });
    }
    for warning in warnings {
        tracing::warn!(%warning, "policy validation warning");
    }
    Ok((policies, ttl_caps, grant_caps))
}

/// A `@max_ttl_secs` value: ASCII digits, at least 1.
fn parse_ttl_cap(value: &str) -> Option<u64> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok().filter(|secs| *secs > 0)
}

impl CedarAuthorizer {
    /// Parse `text` as a Cedar policy set labelled `version` and validate it against
    /// [`SCHEMA`] in strict mode. Policies take their ID from an `@id("...")` annotation
    /// when present.
    ///
    /// # Errors
    /// [`PolicyError::Parse`] with Cedar's diagnostics (line, column, problem) if the text
    /// does not parse, does not validate against the schema, contains templates, or has a
    /// malformed `@max_ttl_secs`; [`PolicyError::DuplicateId`].
    pub fn from_text(text: &str, version: &str) -> Result<Self> {
        let (policies, ttl_caps, grant_caps) = load(text)?;
        // Tags are read only through `hasTag`/`getTag`, which appear by name in a
        // policy's text; a set that names neither cannot read the principal's tags.
        let reads_tags = policies
            .policies()
            .map(ToString::to_string)
            .chain(policies.templates().map(ToString::to_string))
            .any(|p| p.contains("hasTag") || p.contains("getTag"));
        Ok(Self {
            slices: Slices::new(&policies)?,
            reads_tags,
            policies,
            ttl_caps,
            grant_caps,
            version: version.to_owned(),
            cedar: cedar_policy::Authorizer::new(),
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

    /// The Cedar request and entities for `req`, built as evaluated values (the hot
    /// path). Cedar's public constructors take expressions and evaluate them, then
    /// compute the transitive closure of the entity hierarchy; here the values are
    /// made directly and there is no hierarchy (neither entity has parents), so both
    /// steps are skipped. [`CedarAuthorizer::build`] is the same through the public
    /// API, with schema validation; the tests hold the two equal.
    fn build_core(
        &self,
        req: &DecisionRequest<'_>,
    ) -> std::result::Result<(core::Request, CoreEntities), String> {
        fn s(v: &str) -> core::PartialValue {
            core::PartialValue::from(v)
        }
        fn long(v: i64) -> core::Value {
            core::Value::from(v)
        }
        let principal: core::EntityUID = self.uid(&self.workload_type, req.workload_id).into();
        let action: core::EntityUID = self.uid(&self.action_type, req.action.as_str()).into();
        let resource: core::EntityUID = self.uid(&self.destination_type, req.destination).into();

        let claims = model()
            .claims
            .project_value(req.claims)
            .ok_or("building the principal's claims")?;
        let tags = req
            .claims
            .iter()
            .filter(|_| self.reads_tags)
            .filter_map(|(k, v)| {
                let tag = match v {
                    Value::String(s) => SmolStr::from(s.as_str()),
                    Value::Bool(b) => SmolStr::from(if *b { "true" } else { "false" }),
                    Value::Number(n) => SmolStr::from(n.to_string()),
                    _ => return None,
                };
                Some((SmolStr::from(k.as_str()), core::PartialValue::from(tag)))
            });
        let workload = core::Entity::new_with_attr_partial_value(
            principal.clone(),
            [
                (SmolStr::new_static("id"), s(req.workload_id)),
                (SmolStr::new_static("issuer"), s(req.issuer)),
                (SmolStr::new_static("claims"), claims.into()),
            ],
            HashSet::new(),
            HashSet::new(),
            tags,
        );
        let destination = core::Entity::new_with_attr_partial_value(
            resource.clone(),
            [
                (SmolStr::new_static("name"), s(req.destination)),
                (SmolStr::new_static("kind"), s(req.destination_kind)),
            ],
            HashSet::new(),
            HashSet::new(),
            req.destination_labels
                .iter()
                .map(|(k, v)| (SmolStr::from(k.as_str()), s(v))),
        );
        let strings = |items: &[String]| {
            core::Value::set(items.iter().map(|i| core::Value::from(i.as_str())), None)
        };
        let context = BTreeMap::from([
            (SmolStr::new_static("scopes"), strings(req.scopes)),
            (
                SmolStr::new_static("ttl_secs"),
                long(i64::try_from(req.ttl_secs).unwrap_or(i64::MAX)),
            ),
            (
                SmolStr::new_static("task_id"),
                core::Value::from(req.task_id.unwrap_or("")),
            ),
            (SmolStr::new_static("now"), long(req.now)),
            (SmolStr::new_static("now_hour_utc"), long(hour_utc(req.now))),
            (
                SmolStr::new_static("now_weekday_utc"),
                long(weekday_utc(req.now)),
            ),
            (SmolStr::new_static("issuer"), core::Value::from(req.issuer)),
            (
                SmolStr::new_static("token_source"),
                core::Value::from(req.issuer),
            ),
            (
                SmolStr::new_static("delegation_depth"),
                long(i64::try_from(req.delegation.len()).unwrap_or(i64::MAX)),
            ),
            (
                SmolStr::new_static("delegation_chain"),
                strings(req.delegation),
            ),
            (
                SmolStr::new_static("actor"),
                core::Value::from(req.delegation.first().map_or("", String::as_str)),
            ),
            (
                SmolStr::new_static("subject"),
                core::Value::from(req.subject),
            ),
        ]);
        let request = core::Request::new_unchecked(
            core::EntityUIDEntry::known(principal, None),
            core::EntityUIDEntry::known(action, None),
            core::EntityUIDEntry::known(resource, None),
            Some(core::Context::Value(Arc::new(context))),
        );
        let entities = CoreEntities::from_entities(
            [workload, destination],
            None::<&NoEntitiesSchema>,
            TCComputation::AssumeAlreadyComputed,
            Extensions::none(),
        )
        .map_err(|e| format!("building the entities: {e}"))?;
        Ok((request, entities))
    }

    /// The Cedar request and entities for `req` through Cedar's public API. With
    /// `schema`, Cedar checks both against it. The reference for
    /// [`CedarAuthorizer::build_core`].
    #[cfg(test)]
    fn build(
        &self,
        req: &DecisionRequest<'_>,
        schema: Option<&Schema>,
    ) -> std::result::Result<(Request, Entities), String> {
        let principal = self.uid(&self.workload_type, req.workload_id);
        let action = self.uid(&self.action_type, req.action.as_str());
        let resource = self.uid(&self.destination_type, req.destination);

        let claims = model()
            .claims
            .project(req.claims)
            .ok_or("building the principal's claims")?;
        let tags = req
            .claims
            .iter()
            .filter(|_| self.reads_tags)
            .filter_map(|(k, v)| {
                let s = match v {
                    Value::String(s) => s.clone(),
                    Value::Bool(b) => b.to_string(),
                    Value::Number(n) => n.to_string(),
                    _ => return None,
                };
                Some((k.clone(), RestrictedExpression::new_string(s)))
            });
        let workload = Entity::new_with_tags(
            principal.clone(),
            [
                ("id".to_owned(), string(req.workload_id)),
                ("issuer".to_owned(), string(req.issuer)),
                ("claims".to_owned(), claims),
            ],
            [],
            tags,
        )
        .map_err(|e| format!("building the principal: {e}"))?;
        let destination = Entity::new_with_tags(
            resource.clone(),
            [
                ("name".to_owned(), string(req.destination)),
                ("kind".to_owned(), string(req.destination_kind)),
            ],
            [],
            req.destination_labels
                .iter()
                .map(|(k, v)| (k.clone(), string(v))),
        )
        .map_err(|e| format!("building the resource: {e}"))?;
        let long = RestrictedExpression::new_long;
        let context = Context::from_pairs([
            (
                "scopes".to_owned(),
                RestrictedExpression::new_set(req.scopes.iter().map(|s| string(s))),
            ),
            (
                "ttl_secs".to_owned(),
                long(i64::try_from(req.ttl_secs).unwrap_or(i64::MAX)),
            ),
            ("task_id".to_owned(), string(req.task_id.unwrap_or(""))),
            ("now".to_owned(), long(req.now)),
            ("now_hour_utc".to_owned(), long(hour_utc(req.now))),
            ("now_weekday_utc".to_owned(), long(weekday_utc(req.now))),
            ("issuer".to_owned(), string(req.issuer)),
            ("token_source".to_owned(), string(req.issuer)),
            (
                "delegation_depth".to_owned(),
                long(i64::try_from(req.delegation.len()).unwrap_or(i64::MAX)),
            ),
            (
                "delegation_chain".to_owned(),
                RestrictedExpression::new_set(req.delegation.iter().map(|s| string(s))),
            ),
            (
                "actor".to_owned(),
                string(req.delegation.first().map_or("", String::as_str)),
            ),
            ("subject".to_owned(), string(req.subject)),
        ])
        .map_err(|e| format!("building the context: {e}"))?;
        let request = Request::new(principal, action, resource, context, schema)
            .map_err(|e| format!("building the request: {e}"))?;
        let entities = Entities::from_entities([workload, destination], schema)
            .map_err(|e| format!("building the entities: {e}"))?;
        Ok((request, entities))
    }

    fn deny(&self, determining: Vec<String>, errors: Vec<String>) -> Decision {
        Decision {
            allowed: false,
            policy_version: self.version.clone(),
            determining_policies: determining,
            errors,
            max_ttl_secs: None,
            max_active_grants: None,
        }
    }
}

impl Authorizer for CedarAuthorizer {
    fn decide(&self, req: &DecisionRequest<'_>) -> Decision {
        let (request, entities) = match self.build_core(req) {
            Ok(built) => built,
            Err(e) => {
                tracing::warn!(error = %e, "policy request could not be built; denying");
                return self.deny(Vec::new(), vec![e]);
            }
        };
        // Evaluate the slices that can apply and combine them as Cedar would one set:
        // any satisfied (or failed) forbid denies; otherwise any satisfied permit allows.
        let mut permits = Vec::new();
        let mut forbids = Vec::new();
        let mut errors = Vec::new();
        for set in self.slices.for_request(req) {
            let response: cedar_policy::Response = self
                .cedar
                .as_ref()
                .is_authorized(request.clone(), set.as_ref(), &entities)
                .into();
            let diagnostics = response.diagnostics();
            for err in diagnostics.errors() {
                let cedar_policy::AuthorizationError::PolicyEvaluationError(e) = err;
                let id = e.policy_id();
                if set.policy(id).map(|p| p.effect()) == Some(Effect::Forbid) {
                    forbids.push(id.to_string());
                }
                errors.push(err.to_string());
            }
            // Cedar's reason: the satisfied permits when it allows, the satisfied forbids
            // when it denies (none for a default deny).
            let reason = diagnostics.reason().map(ToString::to_string);
            match response.decision() {
                CedarDecision::Allow => permits.extend(reason),
                CedarDecision::Deny => forbids.extend(reason),
            }
        }
        if !forbids.is_empty() {
            forbids.sort();
            forbids.dedup();
            return self.deny(forbids, errors);
        }
        if permits.is_empty() {
            return self.deny(Vec::new(), errors);
        }
        permits.sort();
        Decision {
            allowed: true,
            policy_version: self.version.clone(),
            max_ttl_secs: permits
                .iter()
                .filter_map(|id| self.ttl_caps.get(id))
                .min()
                .copied(),
            max_active_grants: permits
                .iter()
                .filter_map(|id| self.grant_caps.get(id))
                .min()
                .copied(),
            determining_policies: permits,
            errors,
        }
    }

    fn version(&self) -> String {
        self.version.clone()
    }
}

// === impl Slices ===

/// The policy set split by action and by the destination a policy's scope names, each
/// policy with its [`Guard`].
///
/// ## Why
/// Cedar evaluates every policy of a set on every request, and each evaluation copies
/// the policy's condition, so the cost grows with the whole set. A policy whose scope
/// says `resource == Lanyard::Destination::"x"` (or `action == ...`) is false, without
/// error, for any other destination (or action), so leaving it out of those requests'
/// sets changes no decision: the slices evaluated for one request hold exactly the
/// policies whose scope can match it. Within a slice, a policy whose guard is certainly
/// false for the request (see [`prefilter`]) is skipped for the same reason.
#[derive(Debug, Clone, Default)]
struct Slices {
    /// Per action: policies whose resource scope names no single destination.
    any_destination: [Slice; ACTIONS.len()],
    /// Per destination named in a resource scope, per action: those policies.
    by_destination: HashMap<String, [Slice; ACTIONS.len()]>,
}

/// The policies of one action (and destination).
#[derive(Debug, Clone, Default)]
struct Slice {
    /// Those without a useful guard, evaluated together.
    unguarded: PolicySet,
    /// Those with one, each in a set of its own, evaluated unless its guard (same index)
    /// rules it out.
    guarded: Vec<PolicySet>,
    guards: Vec<Guard>,
    /// The guards by a comparison each requires, so a request checks only the guards
    /// the index does not rule out.
    index: GuardIndex,
}

const ACTIONS: [Action; 3] = [Action::Exchange, Action::Renew, Action::ActFor];

impl Slices {
    fn new(policies: &PolicySet) -> Result<Self> {
        let mut slices = Slices::default();
        for policy in policies.policies() {
            let applies = |action: Action| match policy.action_constraint() {
                ActionConstraint::Any => true,
                ActionConstraint::Eq(uid) => is_action(&uid, action),
                ActionConstraint::In(uids) => uids.iter().any(|uid| is_action(uid, action)),
            };
            let destination = match policy.resource_constraint() {
                ResourceConstraint::Eq(uid)
                | ResourceConstraint::In(uid)
                | ResourceConstraint::IsIn(_, uid) => Some(uid.id().unescaped().to_owned()),
                ResourceConstraint::Any | ResourceConstraint::Is(_) => None,
            };
            let guard = Guard::of(policy);
            let add = |set: &mut PolicySet| {
                set.add(policy.clone())
                    .map_err(|_| PolicyError::DuplicateId(policy.id().to_string()))
            };
            let sets = match destination {
                Some(name) => slices.by_destination.entry(name).or_default(),
                None => &mut slices.any_destination,
            };
            for (i, action) in ACTIONS.into_iter().enumerate() {
                if !applies(action) {
                    continue;
                }
                if guard.is_useful() {
                    let mut own = PolicySet::new();
                    add(&mut own)?;
                    sets[i].guarded.push(own);
                    sets[i].guards.push(guard.clone());
                } else {
                    add(&mut sets[i].unguarded)?;
                }
            }
        }
        for slice in slices
            .any_destination
            .iter_mut()
            .chain(slices.by_destination.values_mut().flatten())
        {
            slice.index = GuardIndex::new(&slice.guards);
        }
        Ok(slices)
    }

    /// The slices whose scope can match `req`.
    fn slices_for<'s>(&'s self, req: &DecisionRequest<'_>) -> impl Iterator<Item = &'s Slice> {
        let i = ACTIONS.iter().position(|a| *a == req.action).unwrap_or(0);
        std::iter::once(&self.any_destination[i]).chain(
            self.by_destination
                .get(req.destination)
                .map(|sets| &sets[i]),
        )
    }

    /// The sets to evaluate for `req`: the policies whose scope can match it, less those
    /// whose guard rules them out; none empty.
    fn for_request<'s>(&'s self, req: &DecisionRequest<'_>) -> Vec<&'s PolicySet> {
        let mut sets = Vec::new();
        for slice in self.slices_for(req) {
            if !slice.unguarded.is_empty() {
                sets.push(&slice.unguarded);
            }
            for g in slice.index.candidates(req) {
                if let (Some(guard), Some(set)) = (slice.guards.get(g), slice.guarded.get(g))
                    && guard.eval(req) != Some(false)
                {
                    sets.push(set);
                }
            }
        }
        sets
    }
}

/// Whether `uid` is `Lanyard::Action::"<action>"`.
fn is_action(uid: &EntityUid, action: Action) -> bool {
    uid.id().unescaped() == action.as_str()
        && uid.type_name().to_string() == format!("{NAMESPACE}::Action")
}

fn type_name(ty: &str) -> Result<EntityTypeName> {
    EntityTypeName::from_str(&format!("{NAMESPACE}::{ty}")).map_err(|errs| PolicyError::Parse {
        message: format!("entity type {NAMESPACE}::{ty}: {errs}"),
    })
}

#[cfg(test)]
fn string(s: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(s.to_owned())
}

/// Hour of the day (0-23, UTC) of Unix time `now`.
fn hour_utc(now: i64) -> i64 {
    now.rem_euclid(86_400) / 3_600
}

/// ISO weekday (1 = Monday to 7 = Sunday, UTC) of Unix time `now`. 1970-01-01 was a
/// Thursday.
fn weekday_utc(now: i64) -> i64 {
    (now.div_euclid(86_400) + 3).rem_euclid(7) + 1
}

/// Every error (parse or validation) with its line and column, one per line, in text
/// order.
fn render_errors<'e, E>(text: &str, errs: impl Iterator<Item = &'e E>) -> String
where
    E: miette::Diagnostic + 'e,
{
    let mut lines: Vec<(usize, String)> = errs
        .map(|err| {
            let offset = err
                .labels()
                .and_then(|mut labels| labels.next())
                .map(|label| label.offset());
            let mut line = String::new();
            if let Some(offset) = offset {
                let (l, c) = line_col(text, offset);
                let _ = write!(line, "line {l}, column {c}: ");
            }
            let _ = write!(line, "{err}");
            if let Some(help) = err.help() {
                let _ = write!(line, " ({help})");
            }
            (offset.unwrap_or(usize::MAX), line)
        })
        .collect();
    lines.sort_by_key(|(offset, _)| *offset);
    lines
        .into_iter()
        .map(|(_, line)| line)
        .collect::<Vec<_>>()
        .join("\n")
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

impl CedarAuthorizer {
    /// The IDs of the policies in the set, in a stable (sorted) order.
    pub fn policy_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .policies
            .policies()
            .map(|p| p.id().to_string())
            .collect();
        ids.sort();
        ids
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;

    #[test]
    fn schema_loads_and_claims_shape_follows_it() {
        let m = model();
        assert!(m.schema.principals().count() > 0);
        let k8s = &m.claims.fields["kubernetes.io"];
        assert!(!k8s.1, "every claim is optional");
        let Shape::Record(k8s) = &k8s.0 else {
            panic!("kubernetes.io is a record")
        };
        assert_eq!(k8s.required, 2, "namespace and serviceaccount");
        assert!(matches!(m.claims.fields["aud"].0, Shape::Set(_)));
        assert!(matches!(m.claims.fields["exp"].0, Shape::Long));
        assert!(matches!(m.claims.fields["email_verified"].0, Shape::Bool));
        assert!(matches!(m.claims.fields["ref"].0, Shape::String));
    }

    /// `build` produces what the schema says, for well-formed and odd claims alike:
    /// Cedar's own entity and request validation accepts it.
    #[test]
    fn built_entities_and_context_conform_to_the_schema() {
        let no_tags = CedarAuthorizer::from_text("", "v").unwrap();
        assert!(!no_tags.reads_tags);
        let tags = CedarAuthorizer::from_text(
            r#"permit (principal, action, resource) when { principal.hasTag("team") };"#,
            "v",
        )
        .unwrap();
        assert!(tags.reads_tags);
        let claim_sets = [
            json!({}),
            json!({
                "iss": "https://kubernetes.default.svc", "sub": "system:serviceaccount:a:b",
                "aud": ["lanyard", 5, null], "exp": 1, "iat": 2, "nbf": 3, "jti": "x",
                "kubernetes.io": {
                    "namespace": "a", "serviceaccount": {"name": "b", "uid": "u"},
                    "pod": {"name": "p"}, "node": {"name": "n", "uid": "v"},
                    "warnafter": 4, "extra": {"deep": [1, 2]},
                },
            }),
            json!({
                "repository": "acme/api", "ref": "refs/heads/main", "environment": "production",
                "run_id": "42", "aud": "https://github.com/acme", "email_verified": true,
                "groups": ["a", "b"], "custom": {"nested": true}, "score": 0.5, "big": u64::MAX,
            }),
            // Wrong types everywhere: each is dropped, nothing fails.
            json!({
                "iss": 1, "aud": {"x": 1}, "exp": "soon", "ref": ["refs/heads/main"],
                "email_verified": "true", "groups": "admins",
                "kubernetes.io": {"namespace": "a", "serviceaccount": "b"},
            }),
            json!({"kubernetes.io": {"namespace": 7, "serviceaccount": {"name": "b"}}}),
            json!({"kubernetes.io": "flat"}),
        ];
        let labels = BTreeMap::from([("env".to_owned(), "prod".to_owned())]);
        let scopes = vec!["read".to_owned()];
        for (a, claims) in [&no_tags, &tags]
            .into_iter()
            .flat_map(|a| claim_sets.iter().map(move |c| (a, c)))
        {
            for action in [Action::Exchange, Action::Renew, Action::ActFor] {
                let req = DecisionRequest {
                    workload_id: "spiffe://lanyard.local/x",
                    issuer: "ci",
                    claims: claims.as_object().unwrap(),
                    destination: "orders",
                    destination_kind: "jwt",
                    destination_labels: &labels,
                    action,
                    scopes: &scopes,
                    ttl_secs: u64::MAX,
                    task_id: None,
                    now: -1,
                    delegation: &[],
                    subject: "spiffe://lanyard.local/x",
                };
                if let Err(e) = a.build(&req, Some(schema())) {
                    panic!("{claims}: {e}");
                }
                let (request, entities) = a.build(&req, None).unwrap();
                // The hot path's builder makes exactly what Cedar's API does.
                let (fast_request, fast_entities) = a.build_core(&req).unwrap();
                let reference: &core::Request = request.as_ref();
                assert_eq!(reference.principal().uid(), fast_request.principal().uid());
                assert_eq!(reference.action().uid(), fast_request.action().uid());
                assert_eq!(reference.resource().uid(), fast_request.resource().uid());
                let context = |r: &core::Request| match r.context() {
                    Some(core::Context::Value(v)) => v.clone(),
                    other => panic!("context is not a value: {other:?}"),
                };
                assert_eq!(context(reference), context(&fast_request), "{claims}");
                let reference: &CoreEntities = entities.as_ref();
                assert_eq!(reference, &fast_entities, "{claims} {action}");
            }
        }
    }

    /// The decision over the whole set at once, as before slicing.
    fn unsliced(a: &CedarAuthorizer, req: &DecisionRequest<'_>) -> (bool, Vec<String>) {
        let (request, entities) = a.build(req, None).unwrap();
        let response = a.cedar.is_authorized(&request, &a.policies, &entities);
        let mut failed_forbids: Vec<String> = response
            .diagnostics()
            .errors()
            .map(|cedar_policy::AuthorizationError::PolicyEvaluationError(e)| e.policy_id())
            .filter(|id| a.policies.policy(id).unwrap().effect() == Effect::Forbid)
            .map(ToString::to_string)
            .collect();
        let mut reason: Vec<String> = response
            .diagnostics()
            .reason()
            .map(ToString::to_string)
            .collect();
        reason.sort();
        failed_forbids.sort();
        match response.decision() {
            CedarDecision::Allow if failed_forbids.is_empty() => (true, reason),
            CedarDecision::Allow => (false, failed_forbids),
            CedarDecision::Deny => {
                reason.extend(failed_forbids);
                reason.sort();
                reason.dedup();
                (false, reason)
            }
        }
    }

    #[test]
    fn slicing_changes_no_decision() {
        let a = CedarAuthorizer::from_text(
            r#"
            @id("p-a") permit (principal, action, resource == Lanyard::Destination::"a");
            @id("p-a-renew") permit (principal, action == Lanyard::Action::"renew",
                resource in Lanyard::Destination::"a") when { context.scopes.contains("r") };
            @id("p-any") permit (principal, action in [Lanyard::Action::"exchange"], resource)
                when { context.scopes.contains("x") };
            @id("p-is") permit (principal, action, resource is Lanyard::Destination)
                when { resource.hasTag("open") };
            @id("f-b") forbid (principal, action, resource == Lanyard::Destination::"b")
                when { context.scopes.contains("w") };
            @id("f-all") forbid (principal, action == Lanyard::Action::"act_for", resource);
            @id("f-err") forbid (principal, action, resource == Lanyard::Destination::"c")
                when { context.ttl_secs * 100000000000000000 > 0 };
            @id("p-c") permit (principal, action, resource == Lanyard::Destination::"c");
            "#,
            "v",
        )
        .unwrap();
        let claims = Map::new();
        let open = BTreeMap::from([("open".to_owned(), "1".to_owned())]);
        let closed = BTreeMap::new();
        let mut checked = 0;
        for action in ACTIONS {
            for destination in ["a", "b", "c", "d"] {
                for labels in [&open, &closed] {
                    for scopes in [vec![], vec!["r".to_owned()], vec!["x".into(), "w".into()]] {
                        for ttl_secs in [0, 60] {
                            let req = DecisionRequest {
                                workload_id: "w",
                                issuer: "i",
                                claims: &claims,
                                destination,
                                destination_kind: "jwt",
                                destination_labels: labels,
                                action,
                                scopes: &scopes,
                                ttl_secs,
                                task_id: None,
                                now: 0,
                                delegation: &[],
                                subject: "w",
                            };
                            let d = a.decide(&req);
                            assert_eq!(
                                (d.allowed, d.determining_policies.clone()),
                                unsliced(&a, &req),
                                "{req:?}"
                            );
                            checked += usize::from(d.allowed);
                        }
                    }
                }
            }
        }
        assert!(checked > 10, "the cases include allows ({checked})");
    }

    /// A small deterministic generator (xorshift), so failures reproduce.
    struct Rng(u64);

    impl Rng {
        fn pick<'t, T>(&mut self, items: &'t [T]) -> &'t T {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            &items[(self.0 % items.len() as u64) as usize]
        }
    }

    /// Condition atoms: the guard kinds (each literal sometimes true, sometimes not), ones
    /// only Cedar decides, and ones that fail (overflow) for some requests.
    const ATOMS: &[&str] = &[
        r#"principal.id like "spiffe://x/a*""#,
        r#"principal.id like "*b?*""#,
        r#"principal.id like "spiffe://x/*/1""#,
        r#"principal.id == "spiffe://x/b/1""#,
        r#"principal == Lanyard::Workload::"spiffe://x/a/1""#,
        r#"principal.issuer == "i1""#,
        r#"context.issuer == "i2""#,
        r#"context.token_source != "i1""#,
        r#"context.task_id != """#,
        r#"context.actor == "spiffe://x/a/1""#,
        r#"context.subject like "*/2""#,
        r#"resource.name == "a""#,
        r#"resource.kind == "jwt""#,
        r#"resource.hasTag("env")"#,
        r#"(resource.hasTag("env") && resource.getTag("env") == "prod")"#,
        r#"principal.hasTag("team")"#,
        r#"(principal.hasTag("team") && principal.getTag("team") == "t1")"#,
        r#"(principal.hasTag("n") && principal.getTag("n") == "42")"#,
        r#"(principal.hasTag("n") && principal.getTag("n") == "true")"#,
        r#"principal.claims has repository"#,
        r#"principal.claims has exp"#,
        r#"principal.claims has email_verified"#,
        r#"(principal.claims has repository && principal.claims.repository == "r1")"#,
        r#"context.scopes.contains("r")"#,
        r#"context.ttl_secs > 60"#,
        r#"context.ttl_secs * 100000000000000000 > 0"#,
        r#"context.now + 9223372036854775000 > 0"#,
        "true",
        "false",
    ];

    fn generated_expr(rng: &mut Rng, depth: usize) -> String {
        let atom = rng.pick(ATOMS).to_string();
        if depth == 0 {
            return atom;
        }
        match *rng.pick(&[0, 1, 2, 3, 4]) {
            0 => format!("({atom} && {})", generated_expr(rng, depth - 1)),
            1 => format!("({} && {atom})", generated_expr(rng, depth - 1)),
            2 => format!("({atom} || {})", generated_expr(rng, depth - 1)),
            3 => format!("!({})", generated_expr(rng, depth - 1)),
            _ => atom,
        }
    }

    /// `n` policies that each validate, of every effect, scope and condition shape.
    fn generated_policies(rng: &mut Rng, n: usize) -> String {
        let mut text = String::new();
        let mut i = 0;
        while i < n {
            let effect = rng.pick(&["permit", "forbid", "permit"]);
            let principal = rng.pick(&[
                "principal",
                "principal is Lanyard::Workload",
                r#"principal == Lanyard::Workload::"spiffe://x/a/1""#,
                r#"principal == Lanyard::Workload::"spiffe://x/b/2""#,
            ]);
            let action = rng.pick(&[
                "action",
                r#"action == Lanyard::Action::"exchange""#,
                r#"action in [Lanyard::Action::"renew", Lanyard::Action::"act_for"]"#,
            ]);
            let resource = rng.pick(&[
                "resource",
                "resource",
                r#"resource == Lanyard::Destination::"a""#,
                r#"resource == Lanyard::Destination::"b""#,
            ]);
            let mut policy = format!("@id(\"g{i}\") {effect} ({principal}, {action}, {resource})");
            for _ in 0..*rng.pick(&[0, 1, 1, 2]) {
                let kind = rng.pick(&["when", "when", "unless"]);
                let depth = *rng.pick(&[0, 1, 2, 3]);
                let _ = write!(policy, " {kind} {{ {} }}", generated_expr(rng, depth));
            }
            policy.push_str(";\n");
            // Some combinations are refused (e.g. a policy that can never apply); skip them.
            if validate(&policy).is_ok() {
                text.push_str(&policy);
                i += 1;
            }
        }
        text
    }

    /// Evaluating only the policies whose scope matches and whose guard does not rule
    /// them out gives the same decision, determining policies and errors as evaluating
    /// the whole set, including forbids that fail; and each guard that decides agrees
    /// with Cedar's evaluation of its policy alone.
    #[test]
    fn slicing_and_prefiltering_change_no_decision() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut decided = [0usize; 2];
        let mut allowed = 0;
        let mut failed = 0;
        let mut left_out = 0;
        let mut indexed = 0;
        for round in 0..10 {
            let a = CedarAuthorizer::from_text(&generated_policies(&mut rng, 60), "v").unwrap();
            indexed += a
                .slices
                .any_destination
                .iter()
                .chain(a.slices.by_destination.values().flatten())
                .map(|slice| slice.index.indexed())
                .sum::<usize>();
            let claim_sets = [
                json!({}),
                json!({"repository": "r1", "team": "t1", "n": 42, "exp": 1, "email_verified": true}),
                json!({"repository": "r2", "team": "t2", "n": "42", "exp": "soon"}),
                json!({"repository": 5, "team": true, "n": true, "email_verified": "yes"}),
                json!({"team": ["t1"], "n": 42.5, "exp": u64::MAX}),
            ];
            let labels = [
                BTreeMap::new(),
                BTreeMap::from([("env".to_owned(), "prod".to_owned())]),
                BTreeMap::from([("env".to_owned(), "dev".to_owned())]),
            ];
            for _ in 0..150 {
                let claims = rng.pick(&claim_sets).as_object().unwrap();
                let workload_id = *rng.pick(&[
                    "spiffe://x/a/1",
                    "spiffe://x/b/1",
                    "spiffe://x/b/2",
                    "spiffe://x/ab?/1",
                    "spiffe://x/é/1",
                    "",
                ]);
                let delegation = [rng.pick(&["spiffe://x/a/1", "spiffe://x/c/2"]).to_string()];
                let scopes = vec![rng.pick(&["r", "w"]).to_string()];
                let req = DecisionRequest {
                    workload_id,
                    issuer: rng.pick::<&str>(&["i1", "i2"]),
                    claims,
                    destination: rng.pick::<&str>(&["a", "b", "c"]),
                    destination_kind: rng.pick::<&str>(&["jwt", "aws"]),
                    destination_labels: rng.pick(&labels),
                    action: *rng.pick(&ACTIONS),
                    scopes: &scopes,
                    ttl_secs: *rng.pick(&[30, 600]),
                    task_id: *rng.pick(&[None, Some("t")]),
                    now: *rng.pick(&[0, 1_750_000_000]),
                    delegation: if round % 2 == 0 { &delegation } else { &[] },
                    subject: rng.pick::<&str>(&["spiffe://x/a/2", "spiffe://x/a/1"]),
                };
                let d = a.decide(&req);
                let mut errors = d.errors.clone();
                errors.sort();
                assert_eq!(
                    (d.allowed, d.determining_policies.clone(), errors),
                    unsliced_with_errors(&a, &req),
                    "{req:?}"
                );
                allowed += usize::from(d.allowed);
                failed += usize::from(!d.errors.is_empty());
                // The index leaves out only guards that are certainly false.
                for slice in a.slices.slices_for(&req) {
                    let candidates = slice.index.candidates(&req);
                    for (g, guard) in slice.guards.iter().enumerate() {
                        if guard.eval(&req) != Some(false) {
                            assert!(candidates.contains(&g), "{guard:?} {req:?}");
                        } else if !candidates.contains(&g) {
                            left_out += 1;
                        }
                    }
                }
                // A policy whose guard rules it out is false, without error, in Cedar
                // alone. (A guard that says true leaves out the action and resource
                // scopes, so Cedar may still find that policy false.)
                let (request, entities) = a.build(&req, None).unwrap();
                for policy in a.policies.policies() {
                    let Some(guarded) = Guard::of(policy).eval(&req) else {
                        continue;
                    };
                    decided[usize::from(guarded)] += 1;
                    if guarded {
                        continue;
                    }
                    let mut alone = PolicySet::new();
                    alone.add(policy.clone()).unwrap();
                    let response = a.cedar.is_authorized(&request, &alone, &entities);
                    let diagnostics = response.diagnostics();
                    assert_eq!(diagnostics.errors().count(), 0, "{policy} {req:?}");
                    assert_eq!(diagnostics.reason().count(), 0, "{policy} {req:?}");
                }
            }
        }
        assert!(allowed > 50, "the cases include allows ({allowed})");
        assert!(failed > 50, "the cases include failing policies ({failed})");
        assert!(
            decided[0] > 5_000 && decided[1] > 5_000,
            "guards decide often, both ways ({decided:?})"
        );
        assert!(
            indexed > 500 && left_out > 10_000,
            "the index files guards and rules some out ({indexed}, {left_out})"
        );
    }

    /// [`unsliced`], with the evaluation errors (sorted).
    fn unsliced_with_errors(
        a: &CedarAuthorizer,
        req: &DecisionRequest<'_>,
    ) -> (bool, Vec<String>, Vec<String>) {
        let (request, entities) = a.build(req, None).unwrap();
        let response = a.cedar.is_authorized(&request, &a.policies, &entities);
        let mut errors: Vec<String> = response
            .diagnostics()
            .errors()
            .map(ToString::to_string)
            .collect();
        errors.sort();
        let (allowed, determining) = unsliced(a, req);
        (allowed, determining, errors)
    }

    /// Principal tags are built when a policy reads them, and then they decide.
    #[test]
    fn principal_tags_are_there_when_a_policy_reads_them() {
        let a = CedarAuthorizer::from_text(
            r#"permit (principal, action, resource)
               when { principal.hasTag("team") && principal.getTag("team") == "blue" };"#,
            "v",
        )
        .unwrap();
        let labels = BTreeMap::new();
        let scopes = vec!["read".to_owned()];
        let decide = |claims: serde_json::Value| {
            a.decide(&DecisionRequest {
                workload_id: "spiffe://lanyard.local/x",
                issuer: "ci",
                claims: claims.as_object().unwrap(),
                destination: "orders",
                destination_kind: "jwt",
                destination_labels: &labels,
                action: Action::Exchange,
                scopes: &scopes,
                ttl_secs: 60,
                task_id: None,
                now: 0,
                delegation: &[],
                subject: "spiffe://lanyard.local/x",
            })
            .allowed
        };
        assert!(decide(json!({"team": "blue"})));
        assert!(!decide(json!({"team": "red"})));
        assert!(!decide(json!({})));
    }

    #[test]
    fn time_of_day_helpers() {
        assert_eq!(
            (hour_utc(0), weekday_utc(0)),
            (0, 4),
            "1970-01-01 was a Thursday"
        );
        // 2025-06-15 15:06:40 UTC, a Sunday; the next second past midnight is a Monday.
        assert_eq!(
            (hour_utc(1_750_000_000), weekday_utc(1_750_000_000)),
            (15, 7)
        );
        assert_eq!(
            (hour_utc(1_750_032_000), weekday_utc(1_750_032_000)),
            (0, 1)
        );
        // Before 1970 still in range.
        assert_eq!((hour_utc(-1), weekday_utc(-1)), (23, 3));
        assert_eq!(weekday_utc(i64::MIN).clamp(1, 7), weekday_utc(i64::MIN));
        assert!((0..24).contains(&hour_utc(i64::MAX)));
    }

    #[test]
    fn ttl_cap_values() {
        assert_eq!(parse_ttl_cap("600"), Some(600));
        assert_eq!(parse_ttl_cap("0600"), Some(600));
        for bad in ["", "0", "-1", "+1", " 1", "1s", "18446744073709551616"] {
            assert_eq!(parse_ttl_cap(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn line_col_counts_from_one() {
        let text = "ab\ncdé\nf";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 3), (2, 1));
        assert_eq!(line_col(text, 7), (2, 4));
        assert_eq!(line_col(text, 999), (3, 2));
    }
}
