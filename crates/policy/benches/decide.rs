//! Per-decision cost of `CedarAuthorizer::decide` with 1,000 policies of realistic shapes.
//!
//! `cargo bench -p lanyard-policy --bench decide` (add `-- --quick` for a short run).
//! Single-threaded: it times each decision on its own and prints p50/p90/p99/max, which
//! criterion does not report (it reports means and medians of batches).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // benchmark binary

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::hint::black_box;
use std::time::{Duration, Instant};

use lanyard_policy::{Action, Authorizer, CedarAuthorizer, DecisionRequest};
use serde_json::{Map, Value, json};

const POLICIES: usize = 1_000;
const DESTINATIONS: usize = 100;

/// `n` policies cycling through ten shapes seen in real deployments: Kubernetes and
/// GitHub permits with claim comparisons, `like` on workload IDs, scope allowlists with
/// `containsAll`, label and tag checks, time windows, TTL caps, and forbids.
fn policy_set(n: usize) -> String {
    let mut out = String::new();
    for i in 0..n {
        let d = i % DESTINATIONS;
        let _ = match i % 10 {
            0 | 1 => writeln!(
                out,
                r#"@id("k8s-{i}") @max_ttl_secs("900")
permit (principal is Lanyard::Workload, action in [Lanyard::Action::"exchange", Lanyard::Action::"renew"], resource == Lanyard::Destination::"svc-{d}")
when {{ principal.issuer == "k8s-prod" && principal.claims has "kubernetes.io"
  && principal.claims["kubernetes.io"].namespace == "team-{i}"
  && principal.claims["kubernetes.io"].serviceaccount.name == "sa-{i}"
  && ["svc-{d}:read", "svc-{d}:write"].containsAll(context.scopes) }};"#
            ),
            2 | 3 => writeln!(
                out,
                r#"@id("gha-{i}") @max_ttl_secs("600")
permit (principal, action == Lanyard::Action::"exchange", resource == Lanyard::Destination::"svc-{d}")
when {{ principal.claims has repository && principal.claims.repository == "acme/repo-{i}"
  && principal.claims has ref && principal.claims.ref == "refs/heads/main"
  && principal.claims has environment && principal.claims.environment == "production" }};"#
            ),
            4 => writeln!(
                out,
                r#"@id("prefix-{i}")
permit (principal, action, resource == Lanyard::Destination::"svc-{d}")
when {{ principal.id like "spiffe://lanyard.local/k8s/prod/ns/team-{i}/*"
  && ["svc-{d}:read"].containsAll(context.scopes) && context.ttl_secs <= 3600 }};"#
            ),
            5 => writeln!(
                out,
                r#"@id("agent-{i}") @max_ttl_secs("300")
permit (principal, action == Lanyard::Action::"exchange", resource is Lanyard::Destination)
when {{ principal.id like "spiffe://lanyard.local/agents/bot-{i}/*"
  && resource.hasTag("class") && resource.getTag("class") == "tool-api"
  && ["tickets:read", "docs:read"].containsAll(context.scopes) && context.task_id != ""
  && context.now_weekday_utc <= 5 && context.now_hour_utc >= 9 && context.now_hour_utc < 17 }};"#
            ),
            6 => writeln!(
                out,
                r#"@id("labels-{i}")
permit (principal, action, resource)
when {{ resource.hasTag("team") && resource.getTag("team") == "team-{i}"
  && principal.hasTag("team") && principal.getTag("team") == "team-{i}" }};"#
            ),
            7 => writeln!(
                out,
                r#"@id("no-admin-{i}")
forbid (principal, action, resource == Lanyard::Destination::"svc-{d}")
when {{ context.scopes.contains("svc-{d}:admin") && !(principal.id like "spiffe://lanyard.local/k8s/prod/ns/ops-{i}/*") }};"#
            ),
            8 => writeln!(
                out,
                r#"@id("window-{i}")
forbid (principal, action, resource == Lanyard::Destination::"svc-{d}")
unless {{ context.now_hour_utc >= 6 && context.now_hour_utc < 22 }};"#
            ),
            _ => writeln!(
                out,
                r#"@id("untrusted-{i}")
forbid (principal, action, resource)
when {{ principal.issuer == "legacy-{i}" || (principal.claims has repository_owner && principal.claims.repository_owner == "evil-{i}") }};"#
            ),
        };
    }
    out
}

#[derive(Clone)]
struct Case {
    name: &'static str,
    workload_id: &'static str,
    issuer: &'static str,
    claims: Map<String, Value>,
    destination: String,
    labels: BTreeMap<String, String>,
    scopes: Vec<String>,
    expect_allowed: bool,
}

fn cases() -> Vec<Case> {
    let k8s = json!({
        "iss": "https://kubernetes.default.svc",
        "sub": "system:serviceaccount:team-410:sa-410",
        "aud": ["lanyard"], "exp": 1_750_000_600, "iat": 1_750_000_000, "nbf": 1_750_000_000,
        "team": "team-410",
        "kubernetes.io": {
            "namespace": "team-410",
            "serviceaccount": {"name": "sa-410", "uid": "5f0c2a"},
            "pod": {"name": "api-7d9", "uid": "c0ffee"},
            "node": {"name": "node-1", "uid": "n0de"},
            "warnafter": 1_750_000_300,
        },
    });
    let gha = json!({
        "iss": "https://token.actions.githubusercontent.com",
        "sub": "repo:acme/repo-993:environment:production",
        "aud": "lanyard", "exp": 1_750_000_600, "iat": 1_750_000_000, "nbf": 1_750_000_000,
        "jti": "6f5a", "repository": "acme/repo-993", "repository_id": "123",
        "repository_owner": "acme", "repository_owner_id": "9", "repository_visibility": "private",
        "ref": "refs/heads/main", "ref_type": "branch", "ref_protected": "true", "sha": "abc123",
        "environment": "production", "workflow": "deploy", "job_workflow_ref": "acme/repo-993/.github/workflows/deploy.yml@refs/heads/main",
        "run_id": "4242", "run_number": "7", "run_attempt": "1", "actor": "octocat",
        "actor_id": "1", "event_name": "push", "runner_environment": "github-hosted",
    });
    let labels = BTreeMap::from([
        ("env".to_owned(), "prod".to_owned()),
        ("team".to_owned(), "team-x".to_owned()),
    ]);
    vec![
        Case {
            name: "k8s, allowed by one permit",
            workload_id: "spiffe://lanyard.local/k8s/prod/ns/team-410/sa/sa-410",
            issuer: "k8s-prod",
            claims: k8s.as_object().unwrap().clone(),
            destination: format!("svc-{}", 410 % DESTINATIONS),
            labels: labels.clone(),
            scopes: vec![format!("svc-{}:read", 410 % DESTINATIONS)],
            expect_allowed: true,
        },
        Case {
            name: "github, allowed by one permit",
            workload_id: "spiffe://lanyard.local/github/acme/repo-993",
            issuer: "github",
            claims: gha.as_object().unwrap().clone(),
            destination: format!("svc-{}", 993 % DESTINATIONS),
            labels: labels.clone(),
            scopes: vec!["deploy".to_owned()],
            expect_allowed: true,
        },
        Case {
            name: "github, default deny",
            workload_id: "spiffe://lanyard.local/github/acme/other",
            issuer: "github",
            claims: gha.as_object().unwrap().clone(),
            destination: "svc-5".to_owned(),
            labels,
            scopes: vec!["svc-5:read".to_owned()],
            expect_allowed: false,
        },
    ]
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn us(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1_000.0
}

fn measure(a: &CedarAuthorizer, c: &Case, iterations: usize) -> Vec<Duration> {
    let req = DecisionRequest {
        workload_id: c.workload_id,
        issuer: c.issuer,
        claims: &c.claims,
        destination: &c.destination,
        destination_kind: "jwt",
        destination_labels: &c.labels,
        action: Action::Exchange,
        scopes: &c.scopes,
        ttl_secs: 600,
        task_id: Some("4242"),
        // Tuesday 2025-06-17 10:00 UTC.
        now: 1_750_154_400,
        delegation: &[],
        subject: c.workload_id,
    };
    let d = a.decide(&req);
    assert_eq!(d.allowed, c.expect_allowed, "{}: {d:?}", c.name);
    assert!(d.errors.is_empty(), "{d:?}");
    for _ in 0..iterations / 10 {
        black_box(a.decide(black_box(&req)));
    }
    let mut times = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let start = Instant::now();
        black_box(a.decide(black_box(&req)));
        times.push(start.elapsed());
    }
    times.sort();
    times
}

fn main() {
    // `cargo bench` passes `--bench`; `-- --quick` shortens the run.
    let quick = std::env::args().any(|a| a == "--quick");
    let iterations = if quick { 2_000 } else { 20_000 };

    let text = policy_set(POLICIES);
    let start = Instant::now();
    let a = CedarAuthorizer::from_text(&text, "bench").unwrap();
    let load = start.elapsed();
    assert_eq!(a.len(), POLICIES);
    let empty = CedarAuthorizer::from_text("", "empty").unwrap();
    println!(
        "{POLICIES} policies ({} bytes), parsed and validated in {:.1} ms; {iterations} decisions per case",
        text.len(),
        load.as_secs_f64() * 1e3
    );
    println!(
        "{:<40} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "case (µs per decision)", "p50", "p90", "p99", "max", "mean"
    );
    let report = |name: &str, t: Vec<Duration>| {
        let mean = t.iter().sum::<Duration>() / t.len() as u32;
        println!(
            "{name:<40} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
            us(percentile(&t, 0.50)),
            us(percentile(&t, 0.90)),
            us(percentile(&t, 0.99)),
            us(*t.last().unwrap()),
            us(mean),
        );
    };
    for c in cases() {
        report(c.name, measure(&a, &c, iterations));
    }
    // The same k8s request against no policies: the cost of building the Cedar request
    // and entities, plus a default deny.
    let mut c = cases().swap_remove(0);
    c.expect_allowed = false;
    report(
        "k8s request, no policies (build only)",
        measure(&empty, &c, iterations),
    );
}
