//! Versioned policy end to end against the real binary: put (validated), history,
//! diff, activate, decisions naming the version, audit events, and persistence across a
//! restart.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use lanyard_proto::v1 as pb;
use lanyard_testkit::{KeyAlg, Lanyard, LanyardOptions, reason};

/// Only `reader` may use `orders`, read only.
const READER_ONLY: &str = r#"
@id("reader-reads-orders")
permit (principal, action, resource == Lanyard::Destination::"orders")
when { principal.id == "spiffe://lanyard.local/ci/reader" && ["read"].containsAll(context.scopes) };
"#;

/// Store `text` as a new version and activate it.
async fn put_and_activate(l: &Lanyard, text: &str) {
    l.admin()
        .await
        .put_policy(pb::PutPolicyRequest {
            text: text.into(),
            activate: true,
            comment: String::new(),
        })
        .await
        .unwrap();
}

/// `text` is refused at upload as invalid.
async fn assert_refused(l: &Lanyard, text: &str) {
    let err = l
        .admin()
        .await
        .put_policy(pb::PutPolicyRequest {
            text: text.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "CONFIG_INVALID", "{text}");
}

async fn cli(l: &Lanyard, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use tokio::io::AsyncWriteExt as _;
    let mut child = tokio::process::Command::new(lanyard_testkit::process::binary())
        .arg("--admin-socket")
        .arg(&l.admin_socket)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input
        .write_all(stdin.unwrap_or("").as_bytes())
        .await
        .unwrap();
    drop(input);
    let out = child.wait_with_output().await.unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test]
async fn policy_versions_are_validated_stored_activated_and_audited() {
    let (mut l, issuer) = start(KeyAlg::Es256, Keys::Inline).await;
    let data = l.data_dir().to_owned();
    let _keep = l.keep_dir();
    let mut admin = l.admin().await;
    let mut c = l.exchange().await;
    let builder = || exchange_req(issuer.mint(&claims(&issuer, "builder", "r")), &["read"]);
    let reader = || exchange_req(issuer.mint(&claims(&issuer, "reader", "r")), &["read"]);

    // Before any version: the bootstrap policy file decides.
    let boot = admin
        .get_policy(pb::GetPolicyRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(boot.version.starts_with("file:sha256:"), "{boot:?}");
    assert!(boot.active);
    c.exchange(builder()).await.unwrap();

    // A policy that does not parse, and one that does not fit the schema, are refused
    // with Cedar's diagnostics.
    for bad in [
        "permit (principal, action, resource) when { principal.id like };",
        "permit (principal, action, resource) when { principal.no_such_attribute == 1 };",
    ] {
        let err = admin
            .put_policy(pb::PutPolicyRequest {
                text: bad.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(reason(&err), "CONFIG_INVALID", "{bad}: {err:?}");
        assert!(!err.message().is_empty());
    }
    assert!(
        admin
            .list_policies(pb::ListRequest::default())
            .await
            .unwrap()
            .into_inner()
            .versions
            .is_empty(),
        "nothing stored"
    );

    // v1 is stored, not active: the bootstrap policy still decides.
    let v1 = admin
        .put_policy(pb::PutPolicyRequest {
            text: READER_ONLY.into(),
            activate: false,
            comment: "only the reader".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v1.version, "v1");
    assert!(!v1.active);
    assert_eq!(v1.policy_ids, ["reader-reads-orders"]);
    assert!(v1.created_by.starts_with("uid:"), "{v1:?}");
    c.exchange(builder()).await.unwrap();

    // Activated: builder loses orders, reader gains it, decisions name v1.
    let active = admin
        .activate_policy(pb::ActivatePolicyRequest {
            version: "v1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(active.active);
    let err = c.exchange(builder()).await.unwrap_err();
    assert_eq!(reason(&err), "POLICY_DENIED");
    c.exchange(reader()).await.unwrap();
    let events = audit_events(&l).await;
    let last_grant: serde_json::Value = serde_json::from_str(
        &events
            .iter()
            .rev()
            .find(|e| e.kind == "exchange.granted")
            .unwrap()
            .payload_json,
    )
    .unwrap();
    assert_eq!(last_grant["policy_version"], "v1");
    let activated: serde_json::Value = serde_json::from_str(
        &events
            .iter()
            .find(|e| e.kind == "policy.activated")
            .unwrap()
            .payload_json,
    )
    .unwrap();
    assert_eq!(activated["detail"]["before"], boot.version.as_str());
    assert_eq!(activated["detail"]["after"], "v1");
    assert!(activated["actor"].as_str().unwrap().starts_with("uid:"));
    let put: serde_json::Value = serde_json::from_str(
        &events
            .iter()
            .find(|e| e.kind == "policy.put")
            .unwrap()
            .payload_json,
    )
    .unwrap();
    assert_eq!(put["detail"]["after"], READER_ONLY);

    // The CLI: put v2 from stdin and activate it, history, diff, get.
    let v2_text = READER_ONLY.replace("[\"read\"]", "[\"read\", \"write\"]");
    let (ok, out, err) = cli(
        &l,
        &[
            "policy",
            "put",
            "-",
            "--activate",
            "--comment",
            "reader may write",
        ],
        Some(&v2_text),
    )
    .await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("v2"), "{out}");
    let mut w = reader();
    w.scopes = vec!["write".into()];
    c.exchange(w).await.unwrap();
    let (ok, out, err) = cli(&l, &["policy", "history"], None).await;
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[1].starts_with("v2") && lines[1].contains('*'),
        "{out}"
    );
    assert!(
        lines[2].starts_with("v1") && !lines[2].contains('*'),
        "{out}"
    );
    assert!(out.contains("reader may write"), "{out}");
    let (ok, out, err) = cli(&l, &["policy", "diff", "v1", "v2"], None).await;
    assert!(ok, "{err}");
    assert!(out.starts_with("--- v1\n+++ v2"), "{out}");
    assert!(out.contains("+when") && out.contains("-when"), "{out}");
    let (ok, out, _) = cli(&l, &["policy", "get", "v1"], None).await;
    assert!(ok);
    assert_eq!(out.trim(), READER_ONLY.trim());
    let (ok, _, err) = cli(&l, &["policy", "activate", "v9"], None).await;
    assert!(!ok && err.contains("v9"), "{err}");

    // A restart keeps v2 in force.
    assert_eq!(l.stop().await, Some(0));
    let l = Lanyard::start(LanyardOptions {
        policy: Some(POLICY.into()),
        data_dir: Some(data),
        ..Default::default()
    })
    .await;
    let v = l
        .admin()
        .await
        .get_policy(pb::GetPolicyRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!((v.version.as_str(), v.active), ("v2", true));
    let err = l.exchange().await.exchange(builder()).await.unwrap_err();
    assert_eq!(reason(&err), "POLICY_DENIED");
}

#[tokio::test]
async fn granted_scopes_are_the_requested_ones_policy_allows_never_more() {
    let (l, issuer) = start(KeyAlg::Es256, Keys::Inline).await;
    let mut c = l.exchange().await;
    // `untrusted` may read but a forbid takes write away: it gets read only.
    let r = c
        .exchange(exchange_req(
            issuer.mint(&claims(&issuer, "untrusted", "r")),
            &["read", "write"],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.scopes, ["read"]);
    let claims_of = |token: &str| {
        use base64::Engine as _;
        let part = token.split('.').nth(1).unwrap();
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()
    };
    let cred = claims_of(&bearer(&r));
    assert!(
        !cred.to_string().contains("write"),
        "the credential carries only the granted scopes: {cred}"
    );
    // `builder` asks for a scope the destination offers but no policy permits.
    let r = c
        .exchange(exchange_req(
            issuer.mint(&claims(&issuer, "builder", "r")),
            &["read", "admin", "write"],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.scopes, ["read", "write"]);
    // Nothing allowed at all: still a denial.
    let err = c
        .exchange(exchange_req(
            issuer.mint(&claims(&issuer, "untrusted", "r")),
            &["write", "admin"],
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "POLICY_DENIED");
    // Explain says the same as the exchange did.
    let e = l
        .admin()
        .await
        .explain(pb::ExplainRequest {
            subject_token: issuer.mint(&claims(&issuer, "untrusted", "r")),
            destination: "orders".into(),
            scopes: vec!["read".into(), "write".into()],
            requested_ttl_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(e.allowed, "{e:?}");
    assert_eq!(e.granted_scopes, ["read"]);
    assert!(e.message.contains("narrowed"), "{}", e.message);
    // The audit event records both what was asked and what was granted.
    let granted = payloads_of(&l, "exchange.granted").await;
    assert_eq!(granted[0]["scopes"], serde_json::json!(["read"]));
    assert_eq!(
        granted[0]["detail"]["requested_scopes"],
        serde_json::json!(["read", "write"])
    );
}

#[tokio::test]
async fn dry_run_reports_who_gains_and_who_loses() {
    let (l, issuer) = start(KeyAlg::Es256, Keys::Inline).await;
    let mut c = l.exchange().await;
    let ask =
        |sub: &str, scopes: &[&str]| exchange_req(issuer.mint(&claims(&issuer, sub, "r")), scopes);
    // Recorded under the bootstrap policy (ci/* may read and write orders; untrusted
    // may not write):
    c.exchange(ask("builder", &["read"])).await.unwrap();
    c.exchange(ask("builder", &["write"])).await.unwrap();
    c.exchange(ask("reader", &["read"])).await.unwrap();
    let r = c
        .exchange(ask("untrusted", &["read", "write"]))
        .await
        .unwrap();
    assert_eq!(r.into_inner().scopes, ["read"]);
    c.exchange(ask("untrusted", &["write"])).await.unwrap_err();
    // Refused before policy: not replayed.
    let mut expired = claims(&issuer, "builder", "r");
    expired["exp"] = (now() - 3600).into();
    c.exchange(exchange_req(issuer.mint(&expired), &["read"]))
        .await
        .unwrap_err();

    let mut admin = l.admin().await;
    let run = |text: &str| pb::DryRunPolicyRequest {
        text: text.into(),
        ..Default::default()
    };
    // Only the reader keeps orders.
    let r = admin
        .dry_run_policy(run(READER_ONLY))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.requests_replayed, 5, "{r:?}");
    assert_eq!(r.skipped, 1, "{r:?}");
    let got: Vec<(String, String, String, i64)> = r
        .changes
        .iter()
        .map(|c| {
            (
                c.change.clone(),
                c.workload_id.clone(),
                c.scope.clone(),
                c.requests,
            )
        })
        .collect();
    let w = |s: &str| format!("spiffe://lanyard.local/ci/{s}");
    assert_eq!(
        got,
        [
            ("lost".into(), w("builder"), "read".into(), 1),
            ("lost".into(), w("builder"), "write".into(), 1),
            ("lost".into(), w("untrusted"), "read".into(), 1),
        ]
    );
    assert!(
        r.changes
            .iter()
            .all(|c| c.destination == "orders" && c.example_seq > 0)
    );

    // Without the forbid, untrusted gains write, asked for twice.
    let open = POLICY
        .split("@id(\"no-write-for-untrusted\")")
        .next()
        .unwrap();
    let r = admin.dry_run_policy(run(open)).await.unwrap().into_inner();
    let got: Vec<(String, String, String, i64)> = r
        .changes
        .iter()
        .map(|c| {
            (
                c.change.clone(),
                c.workload_id.clone(),
                c.scope.clone(),
                c.requests,
            )
        })
        .collect();
    assert_eq!(got, [("gained".into(), w("untrusted"), "write".into(), 2)]);

    // The policy in force: no change. A proposal that does not validate is refused.
    let r = admin
        .dry_run_policy(run(POLICY))
        .await
        .unwrap()
        .into_inner();
    assert!(r.changes.is_empty(), "{r:?}");
    let err = admin
        .dry_run_policy(run("permit (principal, action, resource) when { 1 };"))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "CONFIG_INVALID");

    // The CLI prints the same as a table.
    let file = l.data_dir().parent().unwrap().join("proposed.cedar");
    std::fs::write(&file, READER_ONLY).unwrap();
    let (ok, out, err) = cli(
        &l,
        &["policy", "dry-run", file.to_str().unwrap(), "--since", "1h"],
        None,
    )
    .await;
    assert!(ok, "{out}{err}");
    assert!(out.lines().next().unwrap().starts_with("CHANGE"), "{out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("lost")).count(),
        3,
        "{out}"
    );
    assert!(err.contains("5 requests replayed"), "{err}");
    // Nothing changed.
    assert!(
        admin
            .list_policies(pb::ListRequest::default())
            .await
            .unwrap()
            .into_inner()
            .versions
            .is_empty()
    );
}

#[tokio::test]
async fn a_permit_can_cap_the_ttl() {
    let (l, issuer) = start(KeyAlg::Es256, Keys::Inline).await;
    let capped = r#"
@id("builder-short")
@max_ttl_secs("60")
permit (principal, action, resource == Lanyard::Destination::"orders")
when { principal.id == "spiffe://lanyard.local/ci/builder" };
"#;
    put_and_activate(&l, capped).await;
    let mut req = exchange_req(issuer.mint(&claims(&issuer, "builder", "r")), &["read"]);
    req.requested_ttl_seconds = 300;
    let r = l.exchange().await.exchange(req).await.unwrap().into_inner();
    let cred = verify_with_lanyard_jwks(&l, &bearer(&r), ORDERS_AUD).await;
    assert_eq!(
        cred["exp"].as_i64().unwrap() - cred["iat"].as_i64().unwrap(),
        60,
        "{cred}"
    );
    let granted = payloads_of(&l, "exchange.granted").await;
    assert_eq!(granted[0]["detail"]["ttl_capped_by_policy"], 60);
    assert_eq!(granted[0]["detail"]["ttl_secs"], 60);
    assert_eq!(granted[0]["policy_version"], "v1");
    // A malformed cap is refused at upload.
    assert_refused(&l, &capped.replace("\"60\"", "\"soon\"")).await;
}

#[tokio::test]
async fn a_permit_can_limit_active_grants_per_workload() {
    let (l, issuer) = start(KeyAlg::Es256, Keys::Inline).await;
    let limited = r#"
@id("builder-two-at-a-time")
@max_active_grants("2")
permit (principal, action, resource == Lanyard::Destination::"orders")
when { principal.id == "spiffe://lanyard.local/ci/builder" };
"#;
    put_and_activate(&l, limited).await;
    let mut c = l.exchange().await;
    let token = || issuer.mint(&claims(&issuer, "builder", "r"));
    let first = c
        .exchange(exchange_req(token(), &["read"]))
        .await
        .unwrap()
        .into_inner();
    c.exchange(exchange_req(token(), &["read"])).await.unwrap();
    let err = c
        .exchange(exchange_req(token(), &["read"]))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "POLICY_DENIED");
    assert!(
        err.message().contains("holds 2 active grants"),
        "{}",
        err.message()
    );
    // Releasing one makes room again.
    c.release(pb::ReleaseRequest {
        grant_id: first.grant_id,
        subject_token: token(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.exchange(exchange_req(token(), &["read"])).await.unwrap();
    // A malformed limit is refused at upload.
    assert_refused(&l, &limited.replace("\"2\"", "\"0\"")).await;
}
