//! The audit stream end to end, against the real `lanyard` binary: what events carry,
//! watching with filters and resuming without gaps, signed checkpoints, verification
//! after the database was tampered with directly, and issuer key fetch failures.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use lanyard_proto::v1 as pb;
use lanyard_testkit::issuer::Mode;
use lanyard_testkit::{KeyAlg, Lanyard, LanyardOptions, eventually};
use serde_json::Value;
use sqlx::Connection as _;

fn payload(e: &pb::AuditEvent) -> Value {
    serde_json::from_str(&e.payload_json).unwrap()
}

/// Read a watch stream until it has `n` events.
async fn take(stream: &mut tonic::Streaming<pb::AuditEvent>, n: usize) -> Vec<pb::AuditEvent> {
    let mut out = Vec::new();
    while out.len() < n {
        let next = tokio::time::timeout(lanyard_testkit::patience(), stream.message())
            .await
            .expect("the watch stream stalled")
            .unwrap()
            .expect("the watch stream ended early");
        out.push(next);
    }
    out
}

#[tokio::test]
async fn events_carry_fingerprint_scopes_policy_version_and_request_id() {
    let (l, issuer) = start(KeyAlg::Es256, Keys::JwksUrl).await;
    let mut c = l.exchange().await;
    let token = issuer.mint(&claims(&issuer, "builder", "run-1"));
    let other = issuer.mint(&claims(&issuer, "builder", "run-2"));
    let mut req = tonic::Request::new(exchange_req(token.clone(), &["read"]));
    req.metadata_mut()
        .insert("x-request-id", "req-audit-1".parse().unwrap());
    c.exchange(req).await.unwrap();
    // Denied by policy: `admin` is a destination scope the policy never allows.
    c.exchange(exchange_req(token.clone(), &["admin"]))
        .await
        .unwrap_err();
    c.exchange(exchange_req(other.clone(), &["read"]))
        .await
        .unwrap();

    let mut audit = l.audit().await;
    let fp = audit
        .fingerprint(pb::FingerprintRequest {
            token: format!("{token}\n"),
        })
        .await
        .unwrap()
        .into_inner()
        .fingerprint;
    assert!(
        fp.starts_with("hmac-sha256:") && fp.len() == 12 + 64,
        "{fp}"
    );

    let events = audit_events(&l).await;
    let granted: Vec<Value> = events
        .iter()
        .filter(|e| e.kind == "exchange.granted")
        .map(payload)
        .collect();
    let g = granted
        .iter()
        .find(|p| p["request_id"] == "req-audit-1")
        .expect("the granted event carries the caller's request ID");
    assert_eq!(g["subject_fingerprint"], fp.as_str());
    assert_eq!(g["scopes"], serde_json::json!(["read"]));
    assert_eq!(g["decision"], "allow");
    assert_eq!(g["workload_id"], "spiffe://lanyard.local/ci/builder");
    assert_eq!(g["issuer"], "ci");
    assert_eq!(g["destination"], "orders");
    assert_eq!(g["task_id"], "run-1");
    assert!(
        g["policy_version"]
            .as_str()
            .unwrap()
            .starts_with("file:sha256:"),
        "{g}"
    );
    assert!(g["grant_id"].as_str().unwrap().starts_with("grt_"));
    let denied = events
        .iter()
        .filter(|e| e.kind == "exchange.denied")
        .map(payload)
        .find(|p| p["reason"] == "POLICY_DENIED")
        .expect("the policy denial is audited");
    assert_eq!(denied["subject_fingerprint"], fp.as_str());
    assert_eq!(denied["scopes"], serde_json::json!(["admin"]));
    assert_eq!(denied["decision"], "deny");
    assert!(denied["policy_version"].is_string(), "{denied}");
    // The other token has another fingerprint; no token text anywhere.
    let other_granted = granted.iter().find(|p| p["task_id"] == "run-2").unwrap();
    assert_ne!(other_granted["subject_fingerprint"], fp.as_str());
    for e in &events {
        assert!(
            !e.payload_json.contains(&token[..40]),
            "token in {}",
            e.payload_json
        );
    }

    // An auditor holding the token finds exactly its events.
    let mut stream = audit
        .watch(pb::WatchRequest {
            subject_fingerprint: fp.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut kinds = Vec::new();
    while let Some(e) = stream.message().await.unwrap() {
        kinds.push(e.kind);
    }
    assert_eq!(kinds, ["exchange.granted", "exchange.denied"]);
}

#[tokio::test]
async fn watch_follows_new_events_and_resumes_without_gaps_or_duplicates() {
    let (l, issuer) = start(KeyAlg::Es256, Keys::Inline).await;
    let mut c = l.exchange().await;
    let token = issuer.mint(&claims(&issuer, "builder", "run-1"));
    let mut audit = l.audit().await;
    let mut follow = audit
        .watch(pb::WatchRequest {
            follow: true,
            kind: "exchange.granted".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        c.exchange(exchange_req(token.clone(), &["read"]))
            .await
            .unwrap();
    }
    let first = take(&mut follow, 3).await;
    drop(follow);

    // One follower stays connected through the load below; the other reconnects later.
    let mut live = audit
        .watch(pb::WatchRequest {
            after_seq: first.last().unwrap().seq,
            follow: true,
            kind: "exchange.granted".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // More events are written, concurrently.
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let mut c = c.clone();
        let t = token.clone();
        tasks.push(tokio::spawn(async move {
            c.exchange(exchange_req(t, &["read"])).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Resume after the last event seen: exactly the 200 new grants, in order, once each.
    let resumed = take(
        &mut audit
            .watch(pb::WatchRequest {
                after_seq: first.last().unwrap().seq,
                follow: true,
                kind: "exchange.granted".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner(),
        200,
    )
    .await;
    let live = take(&mut live, 200).await;
    assert_eq!(
        live.iter().map(|e| e.seq).collect::<Vec<_>>(),
        resumed.iter().map(|e| e.seq).collect::<Vec<_>>(),
        "the follower that stayed connected kept up with the load"
    );
    let mut seqs: Vec<i64> = first.iter().chain(&resumed).map(|e| e.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
    seqs.dedup();
    assert_eq!(seqs.len(), 203, "no duplicates");
    // Unfiltered, the whole stream has no gaps.
    let all: Vec<i64> = audit_events(&l).await.iter().map(|e| e.seq).collect();
    assert_eq!(all, (1..=all.len() as i64).collect::<Vec<_>>());
    let grants: Vec<i64> = audit_events(&l)
        .await
        .iter()
        .filter(|e| e.kind == "exchange.granted")
        .map(|e| e.seq)
        .collect();
    assert_eq!(grants, seqs, "the resumed watch missed nothing");
}

/// Run `lanyard audit verify` against `l` with extra arguments: success, stdout and
/// stderr together, stdout alone.
async fn cli_verify(l: &Lanyard, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(lanyard_testkit::process::binary())
        .arg("--admin-socket")
        .arg(&l.admin_socket)
        .args(["audit", "verify"])
        .args(args)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    (
        out.status.success(),
        format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)),
        stdout,
    )
}

async fn restart(data: &std::path::Path) -> Lanyard {
    Lanyard::start(LanyardOptions {
        policy: Some(POLICY.into()),
        data_dir: Some(data.to_owned()),
        ..Default::default()
    })
    .await
}

async fn tamper(data: &std::path::Path, sql: &str) {
    let url = format!("sqlite://{}", data.join("lanyard.db").display());
    let mut db = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut db)
        .await
        .unwrap();
    db.close().await.unwrap();
}

#[tokio::test]
async fn verify_names_what_was_done_to_the_database() {
    let (mut l, issuer) = start(KeyAlg::Es256, Keys::Inline).await;
    let data = l.data_dir().to_owned();
    let _keep = l.keep_dir();
    let mut c = l.exchange().await;
    for i in 0..6 {
        c.exchange(exchange_req(
            issuer.mint(&claims(&issuer, "builder", &format!("r{i}"))),
            &["read"],
        ))
        .await
        .unwrap();
    }
    // A checkpoint the auditor keeps outside lanyard.
    let cp = l
        .audit()
        .await
        .checkpoint(pb::CheckpointRequest {})
        .await
        .unwrap()
        .into_inner();
    let kept = data.parent().unwrap().join("checkpoint.jws");
    std::fs::write(&kept, &cp.jws).unwrap();
    let kept = kept.to_str().unwrap().to_owned();
    let (ok, out, _) = cli_verify(&l, &["--checkpoint", &kept]).await;
    assert!(ok, "{out}");
    assert!(out.contains("intact"), "{out}");
    let head = cp.event_seq;
    assert_eq!(l.stop().await, Some(0));

    // 1. An event edited in place.
    tamper(
        &data,
        "UPDATE audit_events SET payload = replace(payload, 'builder', 'b4ilder') WHERE seq = 5",
    )
    .await;
    let l = restart(&data).await;
    let (ok, out, _) = cli_verify(&l, &[]).await;
    assert!(!ok, "{out}");
    assert!(out.contains("broken at seq 5 (edited)"), "{out}");
    let r = verify_chain(&l).await;
    assert_eq!(
        (r.ok, r.first_broken_seq, r.problem_kind.as_str()),
        (false, 5, "edited")
    );
    assert_eq!(r.head_seq, 4, "events before it are proven");
    assert_eq!(l.stop().await, Some(0));
    tamper(
        &data,
        "UPDATE audit_events SET payload = replace(payload, 'b4ilder', 'builder') WHERE seq = 5",
    )
    .await;

    // 2. The tail cut off together with the store's head record: the database alone
    // looks whole; the checkpoint kept outside proves the tail existed.
    let h = head - 3;
    tamper(
        &data,
        &format!(
            "DELETE FROM audit_events WHERE seq > {h};
             UPDATE audit_head SET seq = {h}, hash = (SELECT hash FROM audit_events WHERE seq = {h});"
        ),
    )
    .await;
    let l = restart(&data).await;
    let (ok, out, _) = cli_verify(&l, &[]).await;
    assert!(
        ok,
        "without the kept checkpoint the cut is invisible: {out}"
    );
    let (ok, out, stdout) = cli_verify(&l, &["--checkpoint", &kept, "--output", "json"]).await;
    assert!(!ok, "{out}");
    let json: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["problem_kind"], "truncated", "{json}");
    assert_eq!(json["first_broken_seq"], h + 1, "{json}");
    assert_eq!(l.stop().await, Some(0));
}

#[tokio::test]
async fn issuer_key_fetch_failures_are_audited_once_each_way() {
    let (l, issuer) = start(KeyAlg::Es256, Keys::JwksUrl).await;
    let mut admin = l.admin().await;
    let refresh = pb::GetRequest { name: "ci".into() };
    admin.refresh_issuer_keys(refresh.clone()).await.unwrap();
    issuer.set_mode(Mode::Down);
    for _ in 0..3 {
        let _ = admin.refresh_issuer_keys(refresh.clone()).await;
    }
    let failed = eventually("issuer.keys_fetch_failed in the audit stream", || async {
        audit_events(&l)
            .await
            .into_iter()
            .find(|e| e.kind == "issuer.keys_fetch_failed")
    })
    .await;
    let p = payload(&failed);
    assert_eq!(p["issuer"], "ci");
    assert_eq!(p["reason"], "ISSUER_UNAVAILABLE");
    assert!(p["detail"]["error"].is_string(), "{p}");
    issuer.set_mode(Mode::Up);
    admin.refresh_issuer_keys(refresh.clone()).await.unwrap();
    eventually(
        "issuer.keys_fetch_recovered in the audit stream",
        || async {
            audit_events(&l)
                .await
                .into_iter()
                .find(|e| e.kind == "issuer.keys_fetch_recovered")
        },
    )
    .await;
    let kinds: Vec<String> = audit_events(&l).await.into_iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds
            .iter()
            .filter(|k| *k == "issuer.keys_fetch_failed")
            .count(),
        1,
        "one event per change, not per failed attempt: {kinds:?}"
    );
}

#[tokio::test]
async fn lanyard_signs_periodic_checkpoints_into_the_chain() {
    let issuer = lanyard_testkit::TestIssuer::start(KeyAlg::Es256).await;
    let l = Lanyard::start(LanyardOptions {
        policy: Some(POLICY.into()),
        extra_config: "[audit]\ncheckpoint_interval = \"100ms\"\n".into(),
        ..Default::default()
    })
    .await;
    configure(&l, &issuer, Keys::Inline, KeyAlg::Es256, false).await;
    let mut c = l.exchange().await;
    c.exchange(exchange_req(
        issuer.mint(&claims(&issuer, "builder", "r1")),
        &["read"],
    ))
    .await
    .unwrap();
    let cp = eventually("an audit.checkpoint event", || async {
        audit_events(&l)
            .await
            .into_iter()
            .find(|e| e.kind == "audit.checkpoint")
    })
    .await;
    let p = payload(&cp);
    assert_eq!(
        p["detail"]["seq"],
        cp.seq - 1,
        "it covers the head before it: {p}"
    );
    assert!(p["detail"]["jws"].as_str().unwrap().split('.').count() == 3);
    // Nothing new, nothing signed: with no events since, no second checkpoint follows
    // right behind the first.
    let v = verify_chain(&l).await;
    assert!(v.ok, "{v:?}");
    assert!(v.checkpoints_verified >= 1, "{v:?}");
    let kinds: Vec<String> = audit_events(&l).await.into_iter().map(|e| e.kind).collect();
    assert!(
        !kinds
            .windows(2)
            .any(|w| w[0] == "audit.checkpoint" && w[1] == "audit.checkpoint"),
        "a checkpoint is written only when events were written since the last: {kinds:?}"
    );
}
