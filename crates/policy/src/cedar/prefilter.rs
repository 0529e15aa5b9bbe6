//! [`Guard`]: the part of a policy's condition that can be decided exactly, in Rust,
//! before Cedar runs, so that a decision skips the policies that are certainly false.
//!
//! ## Why
//! Cedar evaluates every policy it is given and copies each one's condition first (about
//! 1.7 µs a policy), while most policies of a large set are ruled out by a comparison of
//! the workload ID, the issuer or a label. A guard mirrors the conditions that cannot fail
//! (`principal.id like "..."`, `principal.issuer == "..."`, `resource.hasTag("k")`, ...)
//! and treats everything else as unknown. A policy is skipped only when its guard is
//! `Some(false)`: Cedar would then find it false **without an error**, so leaving it out
//! changes neither the decision nor the errors (a forbid that would fail still runs, and
//! still denies).
//!
//! Cedar evaluates `&&` and `||` left to right and stops early, and an error anywhere it
//! looks is an error of the whole policy. So an unknown operand makes the whole operator
//! unknown when it is evaluated first, and is never looked at when the left operand
//! already decides: `unknown && false` is unknown, `false && unknown` is false.

use std::borrow::Cow;
use std::collections::HashMap;

use cedar_policy::{Policy, PrincipalConstraint};
use serde_json::Value;

use super::{NAMESPACE, Shape, model};
use crate::DecisionRequest;

/// A condition over a request, as far as it can be decided without Cedar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Guard {
    /// Not decided here: Cedar must evaluate it (it may also fail).
    Opaque,
    Const(bool),
    And(Box<Guard>, Box<Guard>),
    Or(Box<Guard>, Box<Guard>),
    Not(Box<Guard>),
    /// A string attribute that is always present equals a literal.
    Eq(Attr, String),
    /// A string attribute that is always present matches a `like` pattern.
    Like(Attr, Pattern),
    /// `principal == Lanyard::Workload::"<id>"`.
    PrincipalIs(String),
    /// `principal.hasTag("k")` / `resource.hasTag("k")`.
    HasTag(Side, String),
    /// `....getTag("k") == "v"`; fails (unknown here) when the tag is absent.
    TagEq(Side, String, String),
    /// `principal.claims has c`, for a claim the schema declares as a String, Long or Bool.
    ClaimHas(String, Scalar),
    /// `principal.claims.c == "v"`, for a String claim; fails (unknown here) when absent.
    ClaimEq(String, String),
}

/// The string attributes every request carries (see `CedarAuthorizer::build`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Attr {
    PrincipalId,
    PrincipalIssuer,
    ContextIssuer,
    ContextTokenSource,
    ContextTaskId,
    ContextActor,
    ContextSubject,
    ResourceName,
    ResourceKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    Principal,
    Resource,
}

/// A `like` pattern: the literal text between its wildcards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Pattern {
    /// Literal runs, split at each `*` (so `n` wildcards make `n + 1` runs, some empty).
    runs: Vec<String>,
}

// === impl Guard ===

impl Guard {
    /// The guard of `policy`: its principal scope, then its `when` and `unless` clauses in
    /// order, as Cedar evaluates them. The action and resource scopes are left to slicing.
    pub(super) fn of(policy: &Policy) -> Guard {
        let scope = match policy.principal_constraint() {
            PrincipalConstraint::Eq(uid) if is_workload_type(&uid.type_name().to_string()) => {
                Guard::PrincipalIs(uid.id().unescaped().to_owned())
            }
            PrincipalConstraint::Eq(_) => Guard::Opaque,
            // Cannot fail; whether true is left to Cedar.
            PrincipalConstraint::Any
            | PrincipalConstraint::In(_)
            | PrincipalConstraint::Is(_)
            | PrincipalConstraint::IsIn(_, _) => Guard::Const(true),
        };
        let Ok(json) = policy.to_json() else {
            return Guard::Opaque;
        };
        let Some(conditions) = json["conditions"].as_array() else {
            return Guard::Opaque;
        };
        let mut guard = scope;
        for condition in conditions {
            let body = expr(&condition["body"], 0);
            let clause = match condition["kind"].as_str() {
                Some("when") => body,
                Some("unless") => not(body),
                _ => Guard::Opaque,
            };
            guard = and(guard, clause);
        }
        guard
    }

    /// Whether the guard can ever rule a policy out (so is worth checking).
    pub(super) fn is_useful(&self) -> bool {
        !matches!(self, Guard::Opaque | Guard::Const(true))
    }

    /// `Some(b)` if Cedar certainly evaluates the condition to `b` without an error;
    /// `None` if only Cedar can tell.
    pub(super) fn eval(&self, req: &DecisionRequest<'_>) -> Option<bool> {
        match self {
            Guard::Opaque => None,
            Guard::Const(b) => Some(*b),
            Guard::And(a, b) => match a.eval(req)? {
                false => Some(false),
                true => b.eval(req),
            },
            Guard::Or(a, b) => match a.eval(req)? {
                true => Some(true),
                false => b.eval(req),
            },
            Guard::Not(a) => a.eval(req).map(|b| !b),
            Guard::Eq(attr, lit) => Some(attr.of(req) == lit),
            Guard::Like(attr, pattern) => Some(pattern.matches(attr.of(req))),
            Guard::PrincipalIs(id) => Some(req.workload_id == id),
            Guard::HasTag(side, key) => Some(tag(req, *side, key).is_some()),
            Guard::TagEq(side, key, lit) => tag(req, *side, key).map(|v| v == lit.as_str()),
            Guard::ClaimHas(claim, scalar) => {
                Some(req.claims.get(claim).is_some_and(|v| scalar.fits(v)))
            }
            Guard::ClaimEq(claim, lit) => match req.claims.get(claim) {
                Some(Value::String(s)) => Some(s == lit),
                _ => None,
            },
        }
    }
}

fn and(a: Guard, b: Guard) -> Guard {
    match (a, b) {
        (Guard::Opaque, _) => Guard::Opaque,
        (Guard::Const(false), _) => Guard::Const(false),
        (Guard::Const(true), b) => b,
        (a, b) => Guard::And(Box::new(a), Box::new(b)),
    }
}

fn or(a: Guard, b: Guard) -> Guard {
    match (a, b) {
        (Guard::Opaque, _) => Guard::Opaque,
        (Guard::Const(true), _) => Guard::Const(true),
        (Guard::Const(false), b) => b,
        (a, b) => Guard::Or(Box::new(a), Box::new(b)),
    }
}

fn not(a: Guard) -> Guard {
    match a {
        Guard::Opaque => Guard::Opaque,
        Guard::Const(b) => Guard::Const(!b),
        a => Guard::Not(Box::new(a)),
    }
}

/// The value of tag `key`, as `build` sets it: labels on the resource, scalar claims as
/// strings on the principal.
fn tag<'r>(req: &DecisionRequest<'r>, side: Side, key: &str) -> Option<Cow<'r, str>> {
    match side {
        Side::Resource => req
            .destination_labels
            .get(key)
            .map(|v| Cow::Borrowed(v.as_str())),
        Side::Principal => match req.claims.get(key)? {
            Value::String(s) => Some(Cow::Borrowed(s.as_str())),
            Value::Bool(b) => Some(Cow::Owned(b.to_string())),
            Value::Number(n) => Some(Cow::Owned(n.to_string())),
            _ => None,
        },
    }
}

/// The type the schema declares for a top-level claim, when it is a scalar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Scalar {
    String,
    Long,
    Bool,
}

/// The schema's type of top-level claim `name`, if it is a String, Long or Bool.
fn scalar_claim(name: &str) -> Option<Scalar> {
    match model().claims.fields.get(name) {
        Some((Shape::String, _)) => Some(Scalar::String),
        Some((Shape::Long, _)) => Some(Scalar::Long),
        Some((Shape::Bool, _)) => Some(Scalar::Bool),
        _ => None,
    }
}

impl Scalar {
    /// Whether a claim value survives `Shape::project`, so is in the principal's claims
    /// record.
    fn fits(self, v: &Value) -> bool {
        match (self, v) {
            (Scalar::String, Value::String(_)) | (Scalar::Bool, Value::Bool(_)) => true,
            (Scalar::Long, Value::Number(n)) => n.as_i64().is_some(),
            _ => false,
        }
    }
}

// === impl GuardIndex ===

/// Guards looked up by a comparison they require, so that a request checks only the
/// guards that this comparison does not already rule out.
///
/// ## Why
/// With hundreds of guards in a slice, testing each one costs more than Cedar on the few
/// policies that survive. Most guards start with a comparison of one request value with
/// a literal (`principal.id like "spiffe://.../team-7/*"`, `principal.issuer == "k8s"`,
/// `resource.hasTag("team") && resource.getTag("team") == "payments"`). A guard is a
/// left-to-right `&&` of conjuncts; if every conjunct before a comparison is decided
/// (never unknown), the comparison being false makes the whole guard certainly false.
/// So a guard is filed under the first such comparison, and a request looks up its own
/// value: an exact match in a map, a `like "prefix*"` by the prefixes of the value. The
/// guards without one stay in a list checked on every request.
#[derive(Debug, Clone, Default)]
pub(super) struct GuardIndex {
    /// Indexes of the guards with no indexable comparison.
    linear: Vec<usize>,
    /// `attr == "v"`, `attr like "v"` (no wildcard), `principal == Workload::"v"`.
    exact: Vec<(Attr, Postings)>,
    /// `attr like "v*..."`.
    prefix: Vec<(Attr, Prefixes)>,
    /// `x.hasTag("k") && x.getTag("k") == "v"`, by `(x, "k")`.
    tags: Vec<((Side, String), Postings)>,
}

/// Guard indexes by the literal value they compare with.
type Postings = HashMap<String, Vec<usize>>;

/// Guard indexes by the literal prefix of their `like` pattern.
#[derive(Debug, Clone, Default)]
struct Prefixes {
    /// The distinct prefix lengths, in bytes: a value is looked up by each.
    lens: Vec<usize>,
    by_prefix: Postings,
}

/// A comparison a guard requires: if it is false, the guard is certainly false.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    Exact(Attr, String),
    Prefix(Attr, String),
    Tag(Side, String, String),
}

impl GuardIndex {
    pub(super) fn new(guards: &[Guard]) -> Self {
        let mut index = GuardIndex::default();
        for (i, guard) in guards.iter().enumerate() {
            match guard.key() {
                None => index.linear.push(i),
                Some(Key::Exact(attr, v)) => {
                    entry(&mut index.exact, attr).entry(v).or_default().push(i);
                }
                Some(Key::Prefix(attr, v)) => {
                    let prefixes = entry(&mut index.prefix, attr);
                    if !prefixes.lens.contains(&v.len()) {
                        prefixes.lens.push(v.len());
                    }
                    prefixes.by_prefix.entry(v).or_default().push(i);
                }
                Some(Key::Tag(side, k, v)) => {
                    entry(&mut index.tags, (side, k))
                        .entry(v)
                        .or_default()
                        .push(i);
                }
            }
        }
        index
    }

    /// The indexes, ascending, of the guards that the index does not rule out for `req`:
    /// every guard left out is certainly false.
    pub(super) fn candidates(&self, req: &DecisionRequest<'_>) -> Vec<usize> {
        let mut out = self.linear.clone();
        for (attr, postings) in &self.exact {
            out.extend(postings.get(attr.of(req)).into_iter().flatten());
        }
        for (attr, prefixes) in &self.prefix {
            let text = attr.of(req);
            for len in &prefixes.lens {
                let found = text.get(..*len).and_then(|p| prefixes.by_prefix.get(p));
                out.extend(found.into_iter().flatten());
            }
        }
        for ((side, key), postings) in &self.tags {
            if let Some(v) = tag(req, *side, key) {
                out.extend(postings.get(v.as_ref()).into_iter().flatten());
            }
        }
        out.sort_unstable();
        out
    }
}

#[cfg(test)]
impl GuardIndex {
    /// How many guards are filed under a comparison (not checked on every request).
    pub(super) fn indexed(&self) -> usize {
        let count = |p: &Postings| p.values().map(Vec::len).sum::<usize>();
        self.exact.iter().map(|(_, p)| count(p)).sum::<usize>()
            + self
                .prefix
                .iter()
                .map(|(_, p)| count(&p.by_prefix))
                .sum::<usize>()
            + self.tags.iter().map(|(_, p)| count(p)).sum::<usize>()
    }
}

/// The value for `k` in `list`, added (empty) if missing. The lists are short: one entry
/// per attribute or tag that some guard compares.
fn entry<K: PartialEq, V: Default>(list: &mut Vec<(K, V)>, k: K) -> &mut V {
    let at = match list.iter().position(|(key, _)| *key == k) {
        Some(at) => at,
        None => {
            list.push((k, V::default()));
            list.len() - 1
        }
    };
    &mut list[at].1
}

impl Guard {
    /// The first comparison among the guard's leading conjuncts that the index can look
    /// up, provided every conjunct before it is decided on every request.
    fn key(&self) -> Option<Key> {
        let mut conjuncts = Vec::new();
        self.conjuncts(&mut conjuncts);
        for (n, c) in conjuncts.iter().enumerate() {
            let key = match c {
                Guard::Eq(attr, v) => Some(Key::Exact(*attr, v.clone())),
                Guard::PrincipalIs(id) => Some(Key::Exact(Attr::PrincipalId, id.clone())),
                Guard::Like(attr, pattern) => match pattern.runs.as_slice() {
                    [exact] => Some(Key::Exact(*attr, exact.clone())),
                    [first, ..] if !first.is_empty() => Some(Key::Prefix(*attr, first.clone())),
                    _ => None,
                },
                // `hasTag` then `getTag ==` on the same tag: true exactly when the tag is
                // that value, and never unknown.
                Guard::HasTag(side, k) => match conjuncts.get(n + 1) {
                    Some(Guard::TagEq(s, key, v)) if s == side && key == k => {
                        Some(Key::Tag(*side, k.clone(), v.clone()))
                    }
                    _ => None,
                },
                _ => None,
            };
            if key.is_some() {
                return key;
            }
            if !c.is_total() {
                return None;
            }
        }
        None
    }

    /// The operands of the guard's `&&`s, left to right.
    fn conjuncts<'g>(&'g self, out: &mut Vec<&'g Guard>) {
        match self {
            Guard::And(a, b) => {
                a.conjuncts(out);
                b.conjuncts(out);
            }
            g => out.push(g),
        }
    }

    /// Whether [`Guard::eval`] is `Some` on every request.
    fn is_total(&self) -> bool {
        match self {
            Guard::Opaque | Guard::TagEq(..) | Guard::ClaimEq(..) => false,
            Guard::Const(_)
            | Guard::Eq(..)
            | Guard::Like(..)
            | Guard::PrincipalIs(_)
            | Guard::HasTag(..)
            | Guard::ClaimHas(..) => true,
            Guard::And(a, b) | Guard::Or(a, b) => a.is_total() && b.is_total(),
            Guard::Not(a) => a.is_total(),
        }
    }
}

// === reading a policy's JSON form ===

/// Deeper conditions are left to Cedar; real ones are far shallower.
const MAX_DEPTH: usize = 64;

/// The guard of one expression in Cedar's JSON policy format.
fn expr(v: &Value, depth: usize) -> Guard {
    if depth > MAX_DEPTH {
        return Guard::Opaque;
    }
    let Some((op, arg)) = v
        .as_object()
        .filter(|o| o.len() == 1)
        .and_then(|o| o.iter().next())
    else {
        return Guard::Opaque;
    };
    let sub = |key: &str| expr(&arg[key], depth + 1);
    match op.as_str() {
        "&&" => and(sub("left"), sub("right")),
        "||" => or(sub("left"), sub("right")),
        "!" => not(sub("arg")),
        "==" => eq(&arg["left"], &arg["right"]),
        "!=" => not(eq(&arg["left"], &arg["right"])),
        "Value" => match arg {
            Value::Bool(b) => Guard::Const(*b),
            _ => Guard::Opaque,
        },
        "like" => match (attr(&arg["left"]), pattern(&arg["pattern"])) {
            (Some(a), Some(p)) => Guard::Like(a, p),
            _ => Guard::Opaque,
        },
        "hasTag" => match (side(&arg["left"]), string_lit(&arg["right"])) {
            (Some(s), Some(k)) => Guard::HasTag(s, k.to_owned()),
            _ => Guard::Opaque,
        },
        "has" => match (is_claims(&arg["left"]), arg["attr"].as_str()) {
            (true, Some(c)) => scalar_claim(c).map_or(Guard::Opaque, |scalar| {
                Guard::ClaimHas(c.to_owned(), scalar)
            }),
            _ => Guard::Opaque,
        },
        _ => Guard::Opaque,
    }
}

/// `left == right`, either way round.
fn eq(left: &Value, right: &Value) -> Guard {
    let one_way = |l: &Value, r: &Value| -> Option<Guard> {
        if is_var(l, "principal") {
            let entity = &r["Value"]["__entity"];
            let ty = entity["type"].as_str()?;
            let id = entity["id"].as_str()?;
            return is_workload_type(ty).then(|| Guard::PrincipalIs(id.to_owned()));
        }
        let lit = string_lit(r)?.to_owned();
        if let Some(a) = attr(l) {
            return Some(Guard::Eq(a, lit));
        }
        if let Some(get) = l.get("getTag") {
            let key = string_lit(&get["right"])?.to_owned();
            return Some(Guard::TagEq(side(&get["left"])?, key, lit));
        }
        let dot = l.get(".")?;
        let claim = dot["attr"].as_str()?;
        (is_claims(&dot["left"]) && scalar_claim(claim) == Some(Scalar::String))
            .then(|| Guard::ClaimEq(claim.to_owned(), lit))
    };
    one_way(left, right)
        .or_else(|| one_way(right, left))
        .unwrap_or(Guard::Opaque)
}

fn is_var(v: &Value, name: &str) -> bool {
    v.get("Var").and_then(Value::as_str) == Some(name)
}

fn is_workload_type(ty: &str) -> bool {
    ty.strip_prefix(NAMESPACE)
        .is_some_and(|rest| rest == "::Workload")
}

fn is_claims(v: &Value) -> bool {
    v.get(".")
        .is_some_and(|dot| is_var(&dot["left"], "principal") && dot["attr"] == "claims")
}

fn string_lit(v: &Value) -> Option<&str> {
    v.get("Value")?.as_str()
}

fn side(v: &Value) -> Option<Side> {
    if is_var(v, "principal") {
        Some(Side::Principal)
    } else if is_var(v, "resource") {
        Some(Side::Resource)
    } else {
        None
    }
}

/// `principal.id`, `context.issuer`, ...: the string attributes `build` always sets.
fn attr(v: &Value) -> Option<Attr> {
    let dot = v.get(".")?;
    let var = dot["left"].get("Var")?.as_str()?;
    Some(match (var, dot["attr"].as_str()?) {
        ("principal", "id") => Attr::PrincipalId,
        ("principal", "issuer") => Attr::PrincipalIssuer,
        ("context", "issuer") => Attr::ContextIssuer,
        ("context", "token_source") => Attr::ContextTokenSource,
        ("context", "task_id") => Attr::ContextTaskId,
        ("context", "actor") => Attr::ContextActor,
        ("context", "subject") => Attr::ContextSubject,
        ("resource", "name") => Attr::ResourceName,
        ("resource", "kind") => Attr::ResourceKind,
        _ => return None,
    })
}

fn pattern(v: &Value) -> Option<Pattern> {
    let mut runs = vec![String::new()];
    for e in v.as_array()? {
        match e {
            Value::String(s) if s == "Wildcard" => runs.push(String::new()),
            _ => runs.last_mut()?.push_str(e.get("Literal")?.as_str()?),
        }
    }
    Some(Pattern { runs })
}

// === impl Attr, Pattern ===

impl Attr {
    /// The attribute's value, exactly as `build` puts it in the request.
    fn of<'r>(self, req: &DecisionRequest<'r>) -> &'r str {
        match self {
            Attr::PrincipalId => req.workload_id,
            Attr::PrincipalIssuer | Attr::ContextIssuer | Attr::ContextTokenSource => req.issuer,
            Attr::ContextTaskId => req.task_id.unwrap_or(""),
            Attr::ContextActor => req.delegation.first().map_or("", String::as_str),
            Attr::ContextSubject => req.subject,
            Attr::ResourceName => req.destination,
            Attr::ResourceKind => req.destination_kind,
        }
    }
}

impl Pattern {
    /// Whether `text` matches, as Cedar's `like` decides: each `*` matches any run of
    /// characters, everything else itself. Literal runs are matched as UTF-8 substrings,
    /// which agrees with Cedar's character-by-character match because a UTF-8 match
    /// can only start and end on character boundaries.
    fn matches(&self, text: &str) -> bool {
        let (first, rest) = match self.runs.split_first() {
            Some(split) => split,
            None => return text.is_empty(),
        };
        let Some(mut text) = text.strip_prefix(first.as_str()) else {
            return false;
        };
        let Some((last, middle)) = rest.split_last() else {
            // No wildcard: the whole text is the literal.
            return text.is_empty();
        };
        for run in middle {
            match text.find(run.as_str()) {
                Some(at) => text = &text[at + run.len()..],
                None => return false,
            }
        }
        text.ends_with(last.as_str())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::str::FromStr;

    use cedar_policy::PolicySet;

    use super::*;

    fn key(conditions: &str) -> Option<Key> {
        let text = format!("permit (principal, action, resource) {conditions};");
        let set = PolicySet::from_str(&text).unwrap();
        Guard::of(set.policies().next().unwrap()).key()
    }

    /// Each kind of key, and the cases that must stay linear: a comparison behind a
    /// conjunct that may be unknown, an `||`, a pattern starting with a wildcard.
    #[test]
    fn guards_are_filed_under_their_first_required_comparison() {
        let exact = |a, v: &str| Some(Key::Exact(a, v.to_owned()));
        assert_eq!(
            key(r#"when { principal.issuer == "k" && context.ttl_secs > 1 }"#),
            exact(Attr::PrincipalIssuer, "k")
        );
        assert_eq!(
            key(r#"when { principal.id like "a/b" }"#),
            exact(Attr::PrincipalId, "a/b")
        );
        assert_eq!(
            key(r#"when { principal.claims has exp && principal.id like "a/*/c" }"#),
            Some(Key::Prefix(Attr::PrincipalId, "a/".to_owned()))
        );
        assert_eq!(
            key(r#"when { resource.hasTag("t") && resource.getTag("t") == "v" }"#),
            Some(Key::Tag(Side::Resource, "t".to_owned(), "v".to_owned()))
        );
        assert_eq!(
            key(r#"when { resource.hasTag("t") } when { resource.name == "n" }"#),
            exact(Attr::ResourceName, "n")
        );
        for linear in [
            r#"when { principal.id like "*a" }"#,
            r#"when { principal.issuer == "k" || context.issuer == "k" }"#,
            r#"when { context.ttl_secs > 1 && principal.issuer == "k" }"#,
            r#"when { principal.getTag("t") == "v" && principal.issuer == "k" }"#,
            r#"when { resource.hasTag("t") && resource.getTag("u") == "v" }"#,
            r#"unless { principal.issuer == "k" }"#,
        ] {
            assert_eq!(key(linear), None, "{linear}");
        }
    }
}
