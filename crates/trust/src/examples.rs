//! The documented example configurations (Kubernetes, GitHub Actions, SPIFFE JWT-SVID),
//! kept honest: each must parse, validate, and map a realistic token to the workload ID
//! the documentation promises.

use serde_json::{Value, json};

use crate::config::{Algorithm, IssuerConfig};
use crate::rules::{TrustRule, match_trust_rules};
use crate::verifier::VerifiedToken;

const TRUST_DOMAIN: &str = "lanyard.local";

pub(crate) const KUBERNETES: &str = r#"{
  "issuer": {
    "name": "k8s-prod",
    "issuer_url": "https://oidc.eks.eu-west-1.amazonaws.com/id/EXAMPLE0123456789",
    "keys": { "type": "discovery", "url": "https://oidc.eks.eu-west-1.amazonaws.com/id/EXAMPLE0123456789" },
    "allowed_algorithms": ["RS256"],
    "audiences": ["lanyard"],
    "leeway_secs": 30,
    "max_token_age_secs": 86400,
    "replay_protection": false
  },
  "rule": {
    "name": "k8s-prod-service-accounts",
    "issuer": "k8s-prod",
    "priority": 100,
    "conditions": [
      { "claim": "kubernetes.io/namespace", "matcher": { "glob": "team-*" } }
    ],
    "workload_template": "spiffe://{trust_domain}/k8s/prod/ns/{kubernetes.io/namespace}/sa/{kubernetes.io/serviceaccount/name}",
    "task_claim": "kubernetes.io/pod/uid"
  }
}"#;

pub(crate) const GITHUB_ACTIONS: &str = r#"{
  "issuer": {
    "name": "github-actions",
    "issuer_url": "https://token.actions.githubusercontent.com",
    "keys": { "type": "discovery", "url": "https://token.actions.githubusercontent.com" },
    "allowed_algorithms": ["RS256"],
    "audiences": ["lanyard"],
    "leeway_secs": 60,
    "max_token_age_secs": 900,
    "replay_protection": true
  },
  "rule": {
    "name": "github-acme-deploy",
    "issuer": "github-actions",
    "priority": 10,
    "conditions": [
      { "claim": "repository_owner", "matcher": { "exact": "acme" } },
      { "claim": "ref", "matcher": { "one_of": ["refs/heads/main"] } },
      { "claim": "environment", "matcher": { "one_of": ["production", "staging"] } },
      { "claim": "job_workflow_ref", "matcher": { "glob": "acme/workflows/.github/workflows/deploy.yml@refs/heads/main" } }
    ],
    "workload_template": "spiffe://{trust_domain}/github/{repository}/env/{environment}",
    "task_claim": "run_id"
  }
}"#;

pub(crate) const SPIFFE_JWT_SVID: &str = r#"{
  "issuer": {
    "name": "spire-prod",
    "issuer_url": "https://oidc-discovery.example.org",
    "keys": { "type": "discovery", "url": "https://oidc-discovery.example.org" },
    "allowed_algorithms": ["RS256", "ES256", "ES384"],
    "audiences": ["lanyard"],
    "leeway_secs": 30,
    "replay_protection": false
  },
  "rule": {
    "name": "spire-prod-workloads",
    "issuer": "spire-prod",
    "priority": 100,
    "conditions": [
      { "claim": "sub", "matcher": { "glob": "spiffe://example.org/ns/*/sa/*" } }
    ],
    "workload_template": "spiffe://{trust_domain}/spiffe/{sub|spiffe_path}"
  }
}"#;

fn load(doc: &str) -> (IssuerConfig, TrustRule) {
    let v: Value = serde_json::from_str(doc).unwrap();
    let issuer: IssuerConfig = serde_json::from_value(v["issuer"].clone()).unwrap();
    let rule: TrustRule = serde_json::from_value(v["rule"].clone()).unwrap();
    issuer.validate().unwrap();
    rule.validate(TRUST_DOMAIN).unwrap();
    assert_eq!(rule.issuer, issuer.name);
    (issuer, rule)
}

fn verified(issuer: &IssuerConfig, claims: Value) -> VerifiedToken {
    let Value::Object(claims) = claims else {
        panic!("claims must be an object")
    };
    VerifiedToken {
        issuer: issuer.name.clone(),
        iss: issuer.issuer_url.clone(),
        sub: claims["sub"].as_str().unwrap().to_owned(),
        aud: vec!["lanyard".into()],
        exp: 1_700_000_600,
        iat: Some(1_700_000_000),
        nbf: None,
        jti: None,
        kid: None,
        alg: Algorithm::RS256,
        claims,
    }
}

#[test]
fn kubernetes_example() {
    let (issuer, rule) = load(KUBERNETES);
    let token = verified(
        &issuer,
        json!({
            "iss": issuer.issuer_url, "sub": "system:serviceaccount:team-payments:api",
            "aud": ["lanyard"], "exp": 1_700_000_600, "iat": 1_700_000_000,
            "kubernetes.io": {
                "namespace": "team-payments",
                "pod": {"name": "api-7d9f", "uid": "5a1c2b3d-0000-4000-8000-00000000abcd"},
                "serviceaccount": {"name": "api", "uid": "0f0e0d0c-0000-4000-8000-000000000001"}
            }
        }),
    );
    let w = match_trust_rules(&[rule], &token, TRUST_DOMAIN).unwrap();
    assert_eq!(
        w.id.as_str(),
        "spiffe://lanyard.local/k8s/prod/ns/team-payments/sa/api"
    );
    assert_eq!(
        w.task.unwrap().as_str(),
        "5a1c2b3d-0000-4000-8000-00000000abcd"
    );
}

#[test]
fn github_actions_example() {
    let (issuer, rule) = load(GITHUB_ACTIONS);
    assert!(issuer.replay_protection);
    let claims = json!({
        "iss": issuer.issuer_url, "sub": "repo:acme/api:environment:production",
        "aud": "lanyard", "exp": 1_700_000_600, "iat": 1_700_000_000,
        "jti": "6f1a2b3c-1111-4222-8333-944445555666",
        "repository": "acme/api", "repository_owner": "acme",
        "ref": "refs/heads/main", "environment": "production",
        "run_id": "9876543210",
        "job_workflow_ref": "acme/workflows/.github/workflows/deploy.yml@refs/heads/main"
    });
    let w = match_trust_rules(
        std::slice::from_ref(&rule),
        &verified(&issuer, claims.clone()),
        TRUST_DOMAIN,
    )
    .unwrap();
    assert_eq!(
        w.id.as_str(),
        "spiffe://lanyard.local/github/acme/api/env/production"
    );
    assert_eq!(w.task.unwrap().as_str(), "9876543210");
    // A fork's workflow or another branch does not match.
    let mut other = claims;
    other["ref"] = json!("refs/heads/feature");
    assert!(match_trust_rules(&[rule], &verified(&issuer, other), TRUST_DOMAIN).is_err());
}

#[test]
fn spiffe_jwt_svid_example() {
    let (issuer, rule) = load(SPIFFE_JWT_SVID);
    assert!(!issuer.allowed_algorithms.contains(&Algorithm::EdDSA));
    let token = verified(
        &issuer,
        json!({
            "iss": issuer.issuer_url, "sub": "spiffe://example.org/ns/payments/sa/api",
            "aud": ["lanyard"], "exp": 1_700_000_600, "iat": 1_700_000_000
        }),
    );
    let w = match_trust_rules(&[rule], &token, TRUST_DOMAIN).unwrap();
    assert_eq!(
        w.id.as_str(),
        "spiffe://lanyard.local/spiffe/example.org/ns/payments/sa/api"
    );
    assert_eq!(w.task, None);
}
