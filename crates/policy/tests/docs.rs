//! The policies the repository shows or uses are valid, and the examples in
//! docs/policy.md decide as the text says.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers outside #[test] fns

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lanyard_policy::{Action, Authorizer, CedarAuthorizer, DEV_POLICY, Decision, DecisionRequest};
use serde_json::{Map, Value, json};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The ```cedar blocks of a Markdown file, indentation removed, with their line numbers.
fn cedar_blocks(markdown: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, usize, String)> = None; // (line, indent, text)
    for (n, line) in markdown.lines().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        match &mut current {
            None if trimmed == "```cedar" => current = Some((n + 1, indent, String::new())),
            None => {}
            Some(_) if trimmed.starts_with("```") => {
                let (start, _, text) = current.take().unwrap();
                blocks.push((start, text));
            }
            Some((_, indent, text)) => {
                text.push_str(line.get(*indent..).unwrap_or(line.trim_start()));
                text.push('\n');
            }
        }
    }
    assert!(current.is_none(), "unterminated ```cedar block");
    blocks
}

#[test]
fn every_cedar_block_in_docs_validates() {
    let mut seen = 0;
    let mut files: Vec<_> = std::fs::read_dir(repo().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    files.sort();
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        for (line, block) in cedar_blocks(&text) {
            if let Err(e) = lanyard_policy::validate(&block) {
                panic!("{}:{line}: {e}", path.display());
            }
            seen += 1;
        }
    }
    // getting-started.md has one, policy.md three.
    assert!(seen >= 4, "found only {seen} ```cedar blocks");
}

/// The policies the end-to-end and server tests load: raw strings that look like Cedar.
#[test]
fn policies_in_repository_tests_validate() {
    let mut seen = 0;
    for dir in ["tests/tests", "tests/tests/common", "crates/server/tests"] {
        let Ok(entries) = std::fs::read_dir(repo().join(dir)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let source = std::fs::read_to_string(&path).unwrap();
            for raw in source.split("r#\"").skip(1) {
                let Some((text, _)) = raw.split_once("\"#") else {
                    continue;
                };
                if !(text.contains("permit") || text.contains("forbid")) || text.contains("{{") {
                    continue;
                }
                if let Err(e) = lanyard_policy::validate(text) {
                    panic!("{}: {e}\n{text}", path.display());
                }
                seen += 1;
            }
        }
    }
    assert!(seen >= 3, "found only {seen} policies");
    lanyard_policy::validate(DEV_POLICY).unwrap();
}

// === docs/policy.md examples ===

/// Monday 2025-06-16 00:00:00 UTC.
const MONDAY: i64 = 1_750_032_000;
const HOUR: i64 = 3_600;
const DAY: i64 = 86_400;

struct Req {
    workload_id: String,
    issuer: String,
    claims: Map<String, Value>,
    destination: String,
    labels: BTreeMap<String, String>,
    action: Action,
    scopes: Vec<String>,
    task_id: Option<String>,
    now: i64,
}

impl Req {
    fn new(workload_id: &str, issuer: &str, claims: Value, destination: &str) -> Self {
        Req {
            workload_id: workload_id.into(),
            issuer: issuer.into(),
            claims: claims.as_object().unwrap().clone(),
            destination: destination.into(),
            labels: BTreeMap::new(),
            action: Action::Exchange,
            scopes: vec![],
            task_id: None,
            // Tuesday 10:00 UTC.
            now: MONDAY + DAY + 10 * HOUR,
        }
    }

    fn scopes(mut self, scopes: &[&str]) -> Self {
        self.scopes = scopes.iter().map(|s| s.to_string()).collect();
        self
    }

    fn decide(&self, a: &CedarAuthorizer) -> Decision {
        a.decide(&DecisionRequest {
            workload_id: &self.workload_id,
            issuer: &self.issuer,
            claims: &self.claims,
            destination: &self.destination,
            destination_kind: "jwt",
            destination_labels: &self.labels,
            action: self.action,
            scopes: &self.scopes,
            ttl_secs: 3_600,
            task_id: self.task_id.as_deref(),
            now: self.now,
            delegation: &[],
            subject: &self.workload_id,
        })
    }
}

#[track_caller]
fn allowed(a: &CedarAuthorizer, r: &Req, by: &[&str], max_ttl: Option<u64>) {
    let d = r.decide(a);
    assert!(d.allowed, "{d:?}");
    assert_eq!(d.determining_policies, by);
    assert_eq!(d.max_ttl_secs, max_ttl);
    assert!(d.errors.is_empty(), "{d:?}");
}

#[track_caller]
fn denied(a: &CedarAuthorizer, r: &Req, by: &[&str]) {
    let d = r.decide(a);
    assert!(!d.allowed, "{d:?}");
    assert_eq!(d.determining_policies, by, "{d:?}");
    assert!(d.errors.is_empty(), "{d:?}");
}

fn k8s_example(a: &CedarAuthorizer) {
    let token = |ns: &str, sa: &str| {
        json!({
            "iss": "https://kubernetes.default.svc",
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "aud": ["lanyard"],
            "kubernetes.io": {
                "namespace": ns,
                "serviceaccount": {"name": sa, "uid": "5f0c"},
                "pod": {"name": "api-7d9", "uid": "c0ffee"},
            },
        })
    };
    let id = "spiffe://lanyard.local/k8s/prod/ns/payments/sa/api";
    let ok = Req::new(id, "k8s-prod", token("payments", "api"), "orders-api")
        .scopes(&["orders:read", "orders:write"]);
    allowed(a, &ok, &["k8s-payments-api"], Some(900));
    let mut renew = Req::new(id, "k8s-prod", token("payments", "api"), "orders-api");
    renew.action = Action::Renew;
    allowed(a, &renew, &["k8s-payments-api"], Some(900));

    let deny = [
        Req::new(id, "k8s-prod", token("payments", "worker"), "orders-api"),
        Req::new(id, "k8s-prod", token("billing", "api"), "orders-api"),
        Req::new(id, "k8s-staging", token("payments", "api"), "orders-api"),
        Req::new(id, "k8s-prod", token("payments", "api"), "billing-api"),
        Req::new(id, "k8s-prod", token("payments", "api"), "orders-api")
            .scopes(&["orders:read", "orders:admin"]),
        // No `kubernetes.io` claim at all (another issuer's token).
        Req::new(
            id,
            "k8s-prod",
            json!({"sub": "system:serviceaccount:payments:api"}),
            "orders-api",
        ),
    ];
    for r in &deny {
        denied(a, r, &[]);
    }
}

fn github_example(a: &CedarAuthorizer) {
    let token = |repo: &str, r#ref: &str, env: Option<&str>| {
        let mut c = json!({
            "iss": "https://token.actions.githubusercontent.com",
            "aud": "lanyard",
            "repository": repo,
            "repository_owner": "acme",
            "ref": r#ref,
            "run_id": "4242",
        });
        if let Some(env) = env {
            c["environment"] = env.into();
        }
        c
    };
    let id = "spiffe://lanyard.local/github/acme/api";
    let main = || {
        Req::new(
            id,
            "github",
            token("acme/api", "refs/heads/main", Some("production")),
            "deploy-api",
        )
        .scopes(&["deploy"])
    };
    allowed(a, &main(), &["gha-deploy-main"], Some(600));
    // Friday 17:59 is still inside the window.
    let mut r = main();
    r.now = MONDAY + 4 * DAY + 17 * HOUR + 59 * 60;
    allowed(a, &r, &["gha-deploy-main"], Some(600));

    for (repo, r#ref, env) in [
        ("acme/api", "refs/heads/feature", Some("production")),
        ("acme/api", "refs/heads/main", Some("staging")),
        ("acme/api", "refs/heads/main", None),
        ("acme/web", "refs/heads/main", Some("production")),
    ] {
        denied(
            a,
            &Req::new(id, "github", token(repo, r#ref, env), "deploy-api").scopes(&["deploy"]),
            &[],
        );
    }
    denied(a, &main().scopes(&["deploy", "admin"]), &[]);

    // Outside the window the forbid decides: Saturday, Tuesday 18:00, Tuesday 07:59.
    for now in [
        MONDAY + 5 * DAY + 10 * HOUR,
        MONDAY + DAY + 18 * HOUR,
        MONDAY + DAY + 8 * HOUR - 1,
    ] {
        let mut r = main();
        r.now = now;
        denied(a, &r, &["gha-deploy-window"]);
    }
}

fn agents_example(a: &CedarAuthorizer) {
    let agent = || {
        let mut r = Req::new(
            "spiffe://lanyard.local/agents/support-bot",
            "k8s-prod",
            json!({"sub": "support-bot", "model": "assistant-large"}),
            "tickets",
        )
        .scopes(&["tickets:read", "docs:read"]);
        r.labels.insert("class".into(), "tool-api".into());
        r.task_id = Some("ticket-1234".into());
        r
    };
    allowed(a, &agent(), &["agents-read-tools"], Some(300));

    denied(a, &agent().scopes(&["tickets:read", "tickets:write"]), &[]);
    let mut r = agent();
    r.task_id = None;
    denied(a, &r, &[]);
    let mut r = agent();
    r.labels.clear();
    denied(a, &r, &[]);
    let mut r = agent();
    r.labels.insert("class".into(), "database".into());
    denied(a, &r, &[]);
    let mut r = agent();
    r.workload_id = "spiffe://lanyard.local/k8s/prod/ns/support/sa/bot".into();
    denied(a, &r, &[]);
    for now in [
        MONDAY + 6 * DAY + 10 * HOUR, // Sunday
        MONDAY + DAY + 17 * HOUR,     // Tuesday 17:00
        MONDAY + DAY + 8 * HOUR,      // Tuesday 08:00
    ] {
        let mut r = agent();
        r.now = now;
        denied(a, &r, &[]);
    }
    // 16:59 is still business hours.
    let mut r = agent();
    r.now = MONDAY + DAY + 16 * HOUR + 59 * 60;
    allowed(a, &r, &["agents-read-tools"], Some(300));
}

type Check = fn(&CedarAuthorizer);

#[test]
fn policy_md_examples_decide_as_documented() {
    let text = std::fs::read_to_string(repo().join("docs/policy.md")).unwrap();
    let blocks = cedar_blocks(&text);
    let checks: [(&str, Check); 3] = [
        ("k8s-payments-api", k8s_example),
        ("gha-deploy-main", github_example),
        ("agents-read-tools", agents_example),
    ];
    assert_eq!(
        blocks.len(),
        checks.len(),
        "every ```cedar block in docs/policy.md needs a check here"
    );
    for (id, check) in checks {
        let marker = format!("@id(\"{id}\")");
        let (line, block) = blocks
            .iter()
            .find(|(_, b)| b.contains(&marker))
            .unwrap_or_else(|| panic!("no block with {marker}"));
        let a = CedarAuthorizer::from_text(block, &format!("docs/policy.md:{line}"))
            .unwrap_or_else(|e| panic!("docs/policy.md:{line}: {e}"));
        check(&a);
    }
}
