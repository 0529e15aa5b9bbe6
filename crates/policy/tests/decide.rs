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
        when {{ resource.labels.env == "prod" && principal.claims["kubernetes.io"].namespace != "orders" }};
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
        when { principal.claims["kubernetes.io"].namespace == "payments"
               && principal.claims["kubernetes.io"].serviceaccount.name == "api"
               && principal.claims["kubernetes.io"].warnafter == 1750000300
               && principal.claims.aud.contains("lanyard")
               && principal.issuer == "k8s-prod"
               && resource.kind == "jwt" && resource.name == "orders-api"
               && resource.labels.team == "orders" };
        "#,
    );
    let mut i = Input::k8s();
    assert!(i.decide(&a).allowed, "{:?}", i.decide(&a));
    i.claims["kubernetes.io"]["namespace"] = json!("billing");
    assert!(!i.decide(&a).allowed);
}

#[test]
fn unsupported_claim_values_are_dropped() {
    let a = authz(
        r#"
        @id("no-floats")
        permit (principal, action, resource)
        when { !(principal.claims has score) && !(principal.claims has nothing)
               && principal.claims has sub };
        "#,
    );
    assert!(Input::k8s().decide(&a).allowed);
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
fn evaluation_errors_deny_and_are_recorded() {
    // A permit reading a claim the token lacks: the permit grants nothing.
    let a = authz(
        r#"
        @id("needs-repo")
        permit (principal, action, resource) when { principal.claims.repository == "acme/api" };
        "#,
    );
    let d = Input::k8s().decide(&a);
    assert!(!d.allowed);
    assert_eq!(d.errors.len(), 1, "{d:?}");
    assert!(d.errors[0].contains("needs-repo"), "{:?}", d.errors);
    assert!(d.errors[0].contains("repository"), "{:?}", d.errors);

    // A forbid that fails denies even though a permit is satisfied.
    let a = authz(&format!(
        r#"{K8S_PREFIX}
        @id("require-mfa")
        forbid (principal, action, resource) unless {{ principal.claims.mfa == true }};
        "#
    ));
    let d = Input::k8s().decide(&a);
    assert!(!d.allowed, "{d:?}");
    assert_eq!(d.determining_policies, vec!["require-mfa".to_owned()]);
    assert_eq!(d.errors.len(), 1);

    // With the claim present the forbid evaluates normally.
    let mut i = Input::k8s();
    i.claims.insert("mfa".into(), json!(true));
    let d = i.decide(&a);
    assert!(d.allowed, "{d:?}");
    assert!(d.errors.is_empty());
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
