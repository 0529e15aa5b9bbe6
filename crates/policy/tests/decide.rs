//! Decisions by real Cedar policy sets over lanyard's entity model.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers outside #[test] fns

use std::collections::BTreeMap;

use lanyard_policy::{
    Action, Authorizer, CedarAuthorizer, DEV_POLICY, Decision, DecisionRequest, PolicyError,
};
use serde_json::{Map, Value, json};

struct Input {
    workload_id: String,
    issuer: String,
    claims: Map<String, Value>,
    destination: String,
    kind: String,
    labels: BTreeMap<String, String>,
    action: Action,
    scopes: Vec<String>,
    ttl_secs: u64,
    task_id: Option<String>,
}

impl Input {
    fn k8s() -> Self {
        Input {
            workload_id: "spiffe://lanyard.local/k8s/prod/ns/payments/sa/api".into(),
            issuer: "k8s-prod".into(),
            claims: json!({
                "iss": "https://kubernetes.default.svc",
                "sub": "system:serviceaccount:payments:api",
                "aud": ["lanyard"],
                "exp": 1_750_000_600,
                "score": 0.5,
                "nothing": null,
                "kubernetes.io": {
                    "namespace": "payments",
                    "pod": {"name": "api-7d9", "uid": "c0ffee"},
                    "serviceaccount": {"name": "api"},
                    "warnafter": 1_750_000_300,
                },
            })
            .as_object()
            .unwrap()
            .clone(),
            destination: "orders-api".into(),
            kind: "jwt".into(),
            labels: BTreeMap::from([
                ("env".into(), "prod".into()),
                ("team".into(), "orders".into()),
            ]),
            action: Action::Exchange,
            scopes: vec!["orders:read".into()],
            ttl_secs: 300,
            task_id: Some("c0ffee".into()),
        }
    }

    fn decide(&self, authz: &dyn Authorizer) -> Decision {
        authz.decide(&DecisionRequest {
            workload_id: &self.workload_id,
            issuer: &self.issuer,
            claims: &self.claims,
            destination: &self.destination,
            destination_kind: &self.kind,
            destination_labels: &self.labels,
            action: self.action,
            scopes: &self.scopes,
            ttl_secs: self.ttl_secs,
            task_id: self.task_id.as_deref(),
            now: 1_750_000_000,
            delegation: &[],
            subject: &self.workload_id,
        })
    }
}

fn authz(text: &str) -> CedarAuthorizer {
    CedarAuthorizer::from_text(text, "test-v1").unwrap()
}

const K8S_PREFIX: &str = r#"
@id("k8s-allow")
permit (principal, action == Lanyard::Action::"exchange", resource)
when { principal.id like "spiffe://lanyard.local/k8s/*" };
"#;

#[test]
fn empty_policy_set_denies() {
    let a = authz("");
    assert!(a.is_empty());
    let d = Input::k8s().decide(&a);
    assert_eq!(
        d,
        Decision {
            allowed: false,
            policy_version: "test-v1".into(),
            determining_policies: vec![],
            errors: vec![],
            max_ttl_secs: None,
            max_active_grants: None,
        }
    );
    assert_eq!(a.version(), "test-v1");
}

#[test]
fn allow_by_workload_id_prefix() {
    let a = authz(K8S_PREFIX);
    let d = Input::k8s().decide(&a);
    assert!(d.allowed, "{d:?}");
    assert_eq!(d.determining_policies, vec!["k8s-allow".to_owned()]);
    assert!(d.errors.is_empty());

    let mut other = Input::k8s();
    other.workload_id = "spiffe://lanyard.local/gh/acme/api".into();
    let d = other.decide(&a);
    assert!(!d.allowed);
    assert!(
        d.determining_policies.is_empty(),
        "default deny names no policy"
    );

    // The policy permits exchange only, so renew falls to the default deny.
    let mut renew = Input::k8s();
    renew.action = Action::Renew;
    assert!(!renew.decide(&a).allowed);
}

#[test]
fn forbid_overrides_permit() {
    let a = authz(&format!(
        r#"{K8S_PREFIX}
        @id("no-prod-orders")
        forbid (principal, action, resource == Lanyard::Destination::"orders-api")
        when {{ resource.hasTag("env") && resource.getTag("env") == "prod"
                && principal.claims has "kubernetes.io"
                && principal.claims["kubernetes.io"].namespace != "orders" }};
        "#
    ));
    let d = Input::k8s().decide(&a);
    assert!(!d.allowed);
    assert_eq!(d.determining_policies, vec!["no-prod-orders".to_owned()]);

    let mut elsewhere = Input::k8s();
    elsewhere.destination = "billing".into();
    let d = elsewhere.decide(&a);
    assert!(d.allowed, "{d:?}");
}

#[test]
fn context_scope_conditions() {
    // Only allow scopes from an allowlist, and require one scope.
    let a = authz(
        r#"
        @id("read-only")
        permit (principal, action, resource)
        when { ["orders:read", "orders:list"].containsAll(context.scopes)
               && context.scopes.containsAll(["orders:read"]) };
        "#,
    );
    let mut i = Input::k8s();
    assert!(i.decide(&a).allowed);
    i.scopes = vec!["orders:read".into(), "orders:list".into()];
    assert!(i.decide(&a).allowed);
    i.scopes = vec!["orders:read".into(), "orders:write".into()];
    assert!(!i.decide(&a).allowed);
    i.scopes = vec!["orders:list".into()];
    assert!(!i.decide(&a).allowed);
}

#[test]
fn ttl_cap_and_other_context() {
    let a = authz(
        r#"
        @id("short-lived")
        permit (principal, action, resource)
        when { context.ttl_secs <= 600 && context.task_id != "" && context.issuer == "k8s-prod"
               && context.now > 1700000000 };
        "#,
    );
    let mut i = Input::k8s();
    i.ttl_secs = 600;
    assert!(i.decide(&a).allowed);
    i.ttl_secs = 601;
    assert!(!i.decide(&a).allowed);
    i.ttl_secs = u64::MAX; // saturates, still denied
    assert!(!i.decide(&a).allowed);
    i.ttl_secs = 60;
    i.task_id = None;
    assert!(!i.decide(&a).allowed, "task_id is \"\" when unbound");
}

#[test]
fn nested_claim_conditions_with_non_identifier_keys() {
    let a = authz(
        r#"
        @id("payments-api")
        permit (principal, action, resource is Lanyard::Destination)
        when { principal.claims has "kubernetes.io"
               && principal.claims["kubernetes.io"].namespace == "payments"
               && principal.claims["kubernetes.io"].serviceaccount.name == "api"
               && principal.claims["kubernetes.io"] has warnafter
               && principal.claims["kubernetes.io"].warnafter == 1750000300
               && principal.claims has aud && principal.claims.aud.contains("lanyard")
               && principal.issuer == "k8s-prod"
               && resource.kind == "jwt" && resource.name == "orders-api"
               && resource.hasTag("team") && resource.getTag("team") == "orders" };
        "#,
    );
    let mut i = Input::k8s();
    assert!(i.decide(&a).allowed, "{:?}", i.decide(&a));
    i.claims["kubernetes.io"]["namespace"] = json!("billing");
    assert!(!i.decide(&a).allowed);
}

#[test]
fn claims_outside_the_schema_are_tags_or_dropped() {
    // `score` (a float) and `nothing` (null) are not declared claims; the float is a tag
    // (as a string), null is nothing at all. Objects are never tags.
    let a = authz(
        r#"
        @id("tags")
        permit (principal, action, resource)
        when { principal.claims has sub
               && principal.hasTag("score") && principal.getTag("score") == "0.5"
               && principal.hasTag("exp") && principal.getTag("exp") == "1750000600"
               && !principal.hasTag("nothing") && !principal.hasTag("kubernetes.io") };
        "#,
    );
    assert!(
        Input::k8s().decide(&a).allowed,
        "{:?}",
        Input::k8s().decide(&a)
    );

    // A declared claim of the wrong type is left out of `claims`, but stays a tag.
    let a = authz(
        r#"
        @id("typed")
        permit (principal, action, resource)
        when { !(principal.claims has exp) && principal.hasTag("exp")
               && principal.getTag("exp") == "soon" };
        "#,
    );
    let mut i = Input::k8s();
    assert!(!i.decide(&a).allowed);
    i.claims.insert("exp".into(), json!("soon"));
    assert!(i.decide(&a).allowed, "{:?}", i.decide(&a));
}

#[test]
fn aud_is_always_a_set_and_incomplete_records_are_left_out() {
    let a = authz(
        r#"
        @id("aud")
        permit (principal, action, resource)
        when { principal.claims has aud && principal.claims.aud.contains("lanyard")
               && principal.claims has "kubernetes.io" };
        "#,
    );
    let mut i = Input::k8s();
    assert!(i.decide(&a).allowed);
    i.claims.insert("aud".into(), json!("lanyard"));
    assert!(i.decide(&a).allowed, "one string is a one-element set");
    i.claims.insert("aud".into(), json!(["other", 7]));
    assert!(!i.decide(&a).allowed);
    i.claims.insert("aud".into(), json!("lanyard"));
    // `kubernetes.io` without its required `namespace` is absent as a whole.
    i.claims["kubernetes.io"]
        .as_object_mut()
        .unwrap()
        .remove("namespace");
    assert!(!i.decide(&a).allowed);
}

#[test]
fn several_determining_policies_are_reported() {
    let a = authz(&format!(
        r#"{K8S_PREFIX}
        permit (principal, action, resource) when {{ principal.issuer == "k8s-prod" }};
        @id("unrelated")
        permit (principal, action, resource) when {{ principal.issuer == "github" }};
        "#
    ));
    let d = Input::k8s().decide(&a);
    assert!(d.allowed);
    // The unannotated policy keeps Cedar's positional ID.
    assert_eq!(
        d.determining_policies,
        vec!["k8s-allow".to_owned(), "policy1".to_owned()]
    );
}

#[test]
fn parse_errors_name_location_and_problem() {
    let text = "permit (principal, action, resource)\nwhen { principal.id == };\n";
    let err = CedarAuthorizer::from_text(text, "v").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, PolicyError::Parse { .. }));
    assert!(msg.contains("line 2"), "{msg}");
    assert!(msg.contains("unexpected token"), "{msg}");

    let err = CedarAuthorizer::from_text("permit (principal, action, resource) when { true }", "v")
        .unwrap_err()
        .to_string();
    assert!(err.contains("line 1"), "{err}");

    let err = CedarAuthorizer::from_text(
        "@id(\"a\") permit (principal, action, resource);\n@id(\"a\") forbid (principal, action, resource);",
        "v",
    )
    .unwrap_err();
    assert!(
        matches!(err, PolicyError::DuplicateId(ref id) if id == "a"),
        "{err:?}"
    );

    let err =
        CedarAuthorizer::from_text("permit (principal == ?principal, action, resource);", "v")
            .unwrap_err();
    assert!(err.to_string().contains("templates"), "{err}");
}

#[test]
fn policies_that_do_not_validate_are_refused() {
    // Reading an optional claim without `has`, an undeclared claim, an unknown
    // attribute, an unknown action: all refused at load with Cedar's diagnostics.
    for (text, expect) in [
        (
            "permit (principal, action, resource)\nwhen { principal.claims.repository == \"acme/api\" };",
            "line 2, column 8: for policy `policy0`, unable to guarantee safety of access to optional attribute `claims.repository`",
        ),
        (
            "permit (principal, action, resource)\nwhen { principal.claims has mfa && principal.claims.mfa == true };",
            "policy is impossible",
        ),
        (
            "permit (principal, action, resource) when { resource.labels.env == \"prod\" };",
            "attribute `labels` on entity type `Lanyard::Destination` not found",
        ),
        (
            "permit (principal, action == Lanyard::Action::\"delete\", resource);",
            "Lanyard::Action::\"delete\"",
        ),
        (
            "permit (principal, action, resource) when { context.ttl_secs == \"600\" };",
            "type",
        ),
        (
            "permit (principal, action, resource) when { principal.getTag(\"team\") == \"x\" };",
            "hasTag",
        ),
    ] {
        let err = CedarAuthorizer::from_text(text, "v").unwrap_err();
        assert!(matches!(err, PolicyError::Parse { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("does not validate against the lanyard schema"),
            "{msg}"
        );
        assert!(msg.contains(expect), "{text}\n{msg}");
        assert_eq!(
            lanyard_policy::validate(text).unwrap_err().to_string(),
            msg,
            "validate() reports what from_text() does"
        );
    }
    lanyard_policy::validate(DEV_POLICY).unwrap();
}

#[test]
fn evaluation_errors_deny_and_are_recorded() {
    // Validated policies can still fail at run time, e.g. on overflow.
    // A permit that fails grants nothing.
    let a = authz(
        r#"
        @id("overflowing-permit")
        permit (principal, action, resource) when { context.now * 10000000000 > 0 };
        "#,
    );
    let d = Input::k8s().decide(&a);
    assert!(!d.allowed);
    assert_eq!(d.errors.len(), 1, "{d:?}");
    assert!(d.errors[0].contains("overflowing-permit"), "{:?}", d.errors);
    assert!(d.errors[0].contains("overflow"), "{:?}", d.errors);

    // A forbid that fails denies even though a permit is satisfied.
    let a = authz(&format!(
        r#"{K8S_PREFIX}
        @id("overflowing-forbid")
        forbid (principal, action, resource) when {{ context.ttl_secs * 100000000000000000 > 0 }};
        "#
    ));
    let d = Input::k8s().decide(&a);
    assert!(!d.allowed, "{d:?}");
    assert_eq!(
        d.determining_policies,
        vec!["overflowing-forbid".to_owned()]
    );
    assert_eq!(d.errors.len(), 1);

    // Where it evaluates normally, it does not deny.
    let mut i = Input::k8s();
    i.ttl_secs = 0;
    let d = i.decide(&a);
    assert!(d.allowed, "{d:?}");
    assert!(d.errors.is_empty());
}

#[test]
fn max_ttl_is_the_smallest_cap_among_determining_permits() {
    let a = authz(
        r#"
        @id("wide") @max_ttl_secs("3600")
        permit (principal, action, resource);
        @id("narrow") @max_ttl_secs("600")
        permit (principal, action, resource) when { context.scopes.contains("orders:read") };
        @id("uncapped")
        permit (principal, action, resource) when { context.issuer == "k8s-prod" };
        @id("unrelated") @max_ttl_secs("60")
        permit (principal, action, resource) when { context.issuer == "github" };
        "#,
    );
    let mut i = Input::k8s();
    let d = i.decide(&a);
    assert!(d.allowed);
    assert_eq!(d.determining_policies, ["narrow", "uncapped", "wide"]);
    assert_eq!(d.max_ttl_secs, Some(600));
    i.scopes = vec!["orders:list".into()];
    assert_eq!(i.decide(&a).max_ttl_secs, Some(3600));

    // No determining permit carries a cap.
    let d = Input::k8s().decide(&authz(K8S_PREFIX));
    assert_eq!(d.max_ttl_secs, None);

    // Denied: no cap.
    let a = authz(
        r#"
        @max_ttl_secs("600") permit (principal, action, resource);
        forbid (principal, action, resource) when { context.ttl_secs > 60 };
        "#,
    );
    let d = Input::k8s().decide(&a);
    assert!(!d.allowed);
    assert_eq!(d.max_ttl_secs, None);
}

#[test]
fn malformed_max_ttl_is_refused() {
    for value in [
        "",
        "0",
        "-5",
        "+600",
        "10m",
        "600 ",
        "1.5",
        "99999999999999999999999",
    ] {
        let text = format!("@max_ttl_secs({value:?}) permit (principal, action, resource);");
        let err = CedarAuthorizer::from_text(&text, "v")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("is not a positive whole number of seconds"),
            "{value:?}: {err}"
        );
    }
    let err = CedarAuthorizer::from_text(
        "@max_ttl_secs(\"600\") forbid (principal, action, resource);",
        "v",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("permit policies only"), "{err}");
    // Without a value the annotation is empty, which is malformed too.
    assert!(
        CedarAuthorizer::from_text("@max_ttl_secs permit (principal, action, resource);", "v")
            .is_err()
    );
}

#[test]
fn time_of_day_and_other_context_fields() {
    // 1_750_000_000 is Sunday 2025-06-15 15:06:40 UTC.
    let a = authz(
        r#"
        @id("window")
        permit (principal, action, resource)
        when { context.now_hour_utc == 15 && context.now_weekday_utc == 7
               && context.token_source == "k8s-prod" && context.delegation_depth == 0 };
        "#,
    );
    let d = Input::k8s().decide(&a);
    assert!(d.allowed, "{d:?}");
    let mut i = Input::k8s();
    i.issuer = "github".into();
    assert!(!i.decide(&a).allowed);
}

#[test]
fn act_for_is_a_declared_action() {
    let a = authz(
        r#"
        permit (principal, action == Lanyard::Action::"act_for", resource)
        when { context.delegation_depth < 2 };
        "#,
    );
    let mut i = Input::k8s();
    assert!(!i.decide(&a).allowed);
    i.action = Action::ActFor;
    assert!(i.decide(&a).allowed);
}

#[test]
fn dev_policy_allows_dev_workloads_only() {
    let a = authz(DEV_POLICY);
    let mut i = Input::k8s();
    i.workload_id = "spiffe://lanyard.local/dev/alice/app".into();
    for action in [Action::Exchange, Action::Renew] {
        i.action = action;
        let d = i.decide(&a);
        assert!(d.allowed, "{d:?}");
        assert_eq!(d.determining_policies, vec!["dev-allow".to_owned()]);
    }
    assert!(!Input::k8s().decide(&a).allowed);
    i.workload_id = "spiffe://other.domain/dev/alice".into();
    assert!(!i.decide(&a).allowed);
}

#[test]
fn from_file_versions_by_content() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.cedar");
    std::fs::write(&path, K8S_PREFIX).unwrap();
    let a = CedarAuthorizer::from_file(&path).unwrap();
    let v = a.version();
    assert!(v.starts_with("file:sha256:"), "{v}");
    assert_eq!(v.len(), "file:sha256:".len() + 12);
    assert_eq!(CedarAuthorizer::from_file(&path).unwrap().version(), v);
    assert_eq!(Input::k8s().decide(&a).policy_version, v);

    std::fs::write(&path, DEV_POLICY).unwrap();
    assert_ne!(CedarAuthorizer::from_file(&path).unwrap().version(), v);

    std::fs::write(&path, "permit (").unwrap();
    let err = CedarAuthorizer::from_file(&path).unwrap_err().to_string();
    assert!(err.contains(&path.display().to_string()), "{err}");

    let missing = CedarAuthorizer::from_file(&dir.path().join("nope")).unwrap_err();
    assert!(matches!(missing, PolicyError::Io { .. }));
}

#[test]
fn authorizer_is_object_safe_and_shareable() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<CedarAuthorizer>();
    let boxed: Box<dyn Authorizer> = Box::new(authz(K8S_PREFIX));
    assert!(Input::k8s().decide(boxed.as_ref()).allowed);
}
