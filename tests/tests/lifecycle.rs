//! Renew and release, issuer key rotation and outages, admin socket isolation,
//! `--dev` mode commands, graceful shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use lanyard_proto::v1 as pb;
use lanyard_testkit::issuer::Mode;
use lanyard_testkit::{KeyAlg, Lanyard, LanyardOptions, TestIssuer, eventually, reason};

#[tokio::test]
async fn renew_needs_fresh_proof_for_the_same_workload_and_task_and_release_revokes() {
    let (l, issuer) = start(KeyAlg::Es256, Keys::JwksUrl).await;
    let mut c = l.exchange().await;
    let first = c
        .exchange(exchange_req(
            issuer.mint(&claims(&issuer, "builder", "run-1")),
            &["read"],
        ))
        .await
        .unwrap()
        .into_inner();
    // Another task of the same workload cannot renew it.
    let err = c
        .renew(pb::RenewRequest {
            grant_id: first.grant_id.clone(),
            subject_token: issuer.mint(&claims(&issuer, "builder", "run-2")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "GRANT_MISMATCH");
    // Another workload cannot either.
    let err = c
        .renew(pb::RenewRequest {
            grant_id: first.grant_id.clone(),
            subject_token: issuer.mint(&claims(&issuer, "intruder", "run-1")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "GRANT_MISMATCH");
    // The same workload and task, with a fresh token, can.
    let renewed = c
        .renew(pb::RenewRequest {
            grant_id: first.grant_id.clone(),
            subject_token: issuer.mint(&claims(&issuer, "builder", "run-1")),
            requested_ttl_seconds: 120,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renewed.grant_id, first.grant_id);
    assert_ne!(bearer(&renewed), bearer(&first));
    let c2 = verify_with_lanyard_jwks(&l, &bearer(&renewed), ORDERS_AUD).await;
    assert_eq!(
        c2["exp"].as_i64().unwrap() - c2["iat"].as_i64().unwrap(),
        120
    );
    // Malformed and unknown grant IDs.
    let err = c
        .renew(pb::RenewRequest {
            grant_id: "grt_' OR 1=1".into(),
            subject_token: issuer.mint(&claims(&issuer, "builder", "run-1")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "GRANT_NOT_FOUND");
    // Release.
    let rel = c
        .release(pb::ReleaseRequest {
            grant_id: first.grant_id.clone(),
            subject_token: issuer.mint(&claims(&issuer, "builder", "run-1")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rel.status, "released");
    assert_eq!(rel.receipt.as_ref().unwrap().outcome, "revoked");
    let g = l
        .admin()
        .await
        .get_grant(pb::GetRequest {
            name: first.grant_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.status, "released");
    assert_eq!(g.renew_count, 1);
    // Released grants can be neither released again nor renewed.
    for _ in 0..2 {
        let err = c
            .release(pb::ReleaseRequest {
                grant_id: first.grant_id.clone(),
                subject_token: issuer.mint(&claims(&issuer, "builder", "run-1")),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(reason(&err), "GRANT_NOT_ACTIVE");
    }
    let err = c
        .renew(pb::RenewRequest {
            grant_id: first.grant_id.clone(),
            subject_token: issuer.mint(&claims(&issuer, "builder", "run-1")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "GRANT_NOT_ACTIVE");
    let kinds: Vec<String> = audit_events(&l).await.into_iter().map(|e| e.kind).collect();
    for k in [
        "exchange.granted",
        "grant.renewed",
        "grant.released",
        "grant.renew_denied",
        "grant.release_denied",
    ] {
        assert!(kinds.iter().any(|x| x == k), "{k} missing from {kinds:?}");
    }
}

#[tokio::test]
async fn issuer_key_rotation_is_picked_up_and_removed_keys_are_refused() {
    let issuer = TestIssuer::start(KeyAlg::Es256).await;
    let l = Lanyard::start(LanyardOptions {
        policy: Some(POLICY.into()),
        extra_config: "[trust]\nrefetch_cooldown = \"0s\"\n".into(),
        ..Default::default()
    })
    .await;
    configure(&l, &issuer, Keys::Discovery, KeyAlg::Es256, false).await;
    let mut c = l.exchange().await;
    let old_key = issuer.key();
    c.exchange(exchange_req(
        issuer.mint(&claims(&issuer, "builder", "r")),
        &["read"],
    ))
    .await
    .unwrap();
    let fetches = issuer.jwks_fetches();
    // The issuer rotates: a token with the new kid triggers a refetch and verifies.
    issuer.rotate(KeyAlg::Es256, "k2");
    c.exchange(exchange_req(
        issuer.mint(&claims(&issuer, "builder", "r")),
        &["read"],
    ))
    .await
    .unwrap();
    assert!(
        issuer.jwks_fetches() > fetches,
        "the new kid caused a refetch"
    );
    // The old key still works while published...
    c.exchange(exchange_req(
        old_key.sign(&claims(&issuer, "builder", "r")),
        &["read"],
    ))
    .await
    .unwrap();
    // ...and is refused once the issuer removed it and lanyard refetched.
    issuer.retire_all_but("k2");
    l.admin()
        .await
        .refresh_issuer_keys(pb::GetRequest { name: "ci".into() })
        .await
        .unwrap();
    let err = c
        .exchange(exchange_req(
            old_key.sign(&claims(&issuer, "builder", "r")),
            &["read"],
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "KEY_UNKNOWN");
}

#[tokio::test]
async fn issuer_down_keeps_last_known_good_keys() {
    let (l, issuer) = start(KeyAlg::Rs256, Keys::Discovery).await;
    let mut c = l.exchange().await;
    c.exchange(exchange_req(
        issuer.mint(&claims(&issuer, "builder", "r")),
        &["read"],
    ))
    .await
    .unwrap();
    issuer.set_mode(Mode::Down);
    let status = l
        .admin()
        .await
        .refresh_issuer_keys(pb::GetRequest { name: "ci".into() })
        .await
        .unwrap()
        .into_inner()
        .key_status
        .unwrap();
    assert!(
        !status.last_error.is_empty(),
        "the failed fetch is reported"
    );
    assert_eq!(status.kids, vec!["k1"]);
    c.exchange(exchange_req(
        issuer.mint(&claims(&issuer, "builder", "r")),
        &["read"],
    ))
    .await
    .expect("last-known-good keys still verify");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_issuer_does_not_block_another() {
    let slow = TestIssuer::start(KeyAlg::Es256).await;
    let fast = TestIssuer::start(KeyAlg::Es256).await;
    let l = Lanyard::start(LanyardOptions {
        policy: Some(POLICY.into()),
        extra_config: "[trust]\nhttp_timeout = \"20s\"\n".into(),
        ..Default::default()
    })
    .await;
    configure(&l, &fast, Keys::JwksUrl, KeyAlg::Es256, false).await;
    let mut admin = l.admin().await;
    admin
        .put_issuer(pb::PutIssuerRequest {
            issuer: Some(issuer_msg(&slow, "slow", Keys::JwksUrl, KeyAlg::Es256)),
            expected_revision: None,
        })
        .await
        .unwrap();
    slow.set_mode(Mode::Hang);
    let mut c_slow = l.exchange().await;
    let slow_token = slow.mint(&claims(&slow, "builder", "r"));
    let pending =
        tokio::spawn(async move { c_slow.exchange(exchange_req(slow_token, &["read"])).await });
    // Wait until lanyard is actually stuck on the slow issuer's JWKS.
    eventually("lanyard fetching the slow issuer", || {
        let log = l.log();
        async move { log.contains("slow").then_some(()) }
    })
    .await;
    let mut c = l.exchange().await;
    c.exchange(exchange_req(
        fast.mint(&claims(&fast, "builder", "r")),
        &["read"],
    ))
    .await
    .expect("the fast issuer's token verifies while the slow one hangs");
    assert!(
        !pending.is_finished(),
        "the slow exchange is still waiting on its issuer"
    );
    pending.abort();
}

#[tokio::test]
async fn admin_is_only_on_the_owner_only_socket() {
    let (l, _issuer) = start(KeyAlg::Es256, Keys::JwksUrl).await;
    let mode = std::fs::metadata(&l.admin_socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "admin socket mode");
    let data_mode = std::fs::metadata(l.data_dir())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(data_mode, 0o700, "data dir mode");
    // The workload port does not serve AdminService or AuditService.
    let ch = tonic::transport::Endpoint::try_from(l.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let err = pb::admin_service_client::AdminServiceClient::new(ch.clone())
        .list_grants(pb::ListGrantsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    let err = pb::audit_service_client::AuditServiceClient::new(ch.clone())
        .verify(pb::VerifyRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    // Health is served on both.
    for ch in [ch, l.admin_channel().await] {
        let resp = tonic_health::pb::health_client::HealthClient::new(ch)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            resp.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }
    // Bad configuration is refused with clear reasons.
    let mut admin = l.admin().await;
    let mut bad = issuer_msg(&_issuer, "hs", Keys::JwksUrl, KeyAlg::Es256);
    bad.allowed_algorithms = vec!["HS256".into()];
    let err = admin
        .put_issuer(pb::PutIssuerRequest {
            issuer: Some(bad),
            expected_revision: None,
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "INVALID_ARGUMENT", "{}", err.message());
    let mut own = issuer_msg(&_issuer, "own", Keys::JwksUrl, KeyAlg::Es256);
    own.issuer_url = l.http.clone();
    let err = admin
        .put_issuer(pb::PutIssuerRequest {
            issuer: Some(own),
            expected_revision: None,
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "INVALID_ARGUMENT", "{}", err.message());
    let mut d = orders_destination();
    d.name = "weird".into();
    d.kind = "carrier-pigeon".into();
    let err = admin
        .put_destination(pb::PutDestinationRequest {
            destination: Some(d),
            expected_revision: None,
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "CONFIG_INVALID", "{}", err.message());
    // One issuer per issuer_url.
    let dup = issuer_msg(&_issuer, "ci-again", Keys::JwksUrl, KeyAlg::Es256);
    let err = admin
        .put_issuer(pb::PutIssuerRequest {
            issuer: Some(dup),
            expected_revision: None,
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "CONFIG_INVALID", "{}", err.message());
    // Optimistic concurrency.
    let err = admin
        .put_destination(pb::PutDestinationRequest {
            destination: Some(orders_destination()),
            expected_revision: Some(0),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "CONFLICT", "{}", err.message());
    // Admin changes are audited with the operator's uid.
    let events = audit_events(&l).await;
    let put: serde_json::Value = serde_json::from_str(
        &events
            .iter()
            .find(|e| e.kind == "destination.put")
            .unwrap()
            .payload_json,
    )
    .unwrap();
    assert!(put["actor"].as_str().unwrap().starts_with("uid:"), "{put}");
}

#[tokio::test]
async fn dev_mode_commands_work_as_printed_and_sigterm_stops_cleanly() {
    let l = Lanyard::start(LanyardOptions {
        dev: true,
        ..Default::default()
    })
    .await;
    let commands: Vec<String> = l
        .banner
        .iter()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.contains(" dev token ")
                || line.contains(" exchange ")
                || line.contains(" grants list ")
                || line.contains(" release ")
        })
        .cloned()
        .collect();
    assert_eq!(commands.len(), 4, "banner: {:#?}", l.banner);
    let mut outputs = Vec::new();
    for cmd in &commands {
        let out = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{cmd}\nstdout: {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        outputs.push(stdout);
    }
    assert!(
        outputs[1].contains("spiffe://lanyard.local/dev/demo-agent"),
        "{}",
        outputs[1]
    );
    assert!(outputs[2].contains("active"), "{}", outputs[2]);
    assert!(outputs[3].contains("released"), "{}", outputs[3]);
    let socket = l.admin_socket.clone();
    assert_eq!(l.stop().await, Some(0));
    assert!(!socket.exists(), "the admin socket is removed on shutdown");
}

#[tokio::test]
async fn signing_key_rotation_publishes_first_then_signs() {
    let (l, issuer) = start(KeyAlg::Es256, Keys::JwksUrl).await;
    let mut admin = l.admin().await;
    let before = admin
        .list_signing_keys(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(before.len(), 1);
    assert_eq!(before[0].state, "active");
    let mut c = l.exchange().await;
    // Rotate with a delay: the new key is published but does not sign yet.
    let pending = admin
        .rotate_signing_key(pb::RotateSigningKeyRequest {
            activate_after_seconds: 3600,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pending.state, "pending");
    let jwks: serde_json::Value = reqwest::get(format!("{}/.well-known/jwks.json", l.http))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert!(
        kids.contains(&pending.kid.as_str()) && kids.contains(&before[0].kid.as_str()),
        "{kids:?}"
    );
    let resp = c
        .exchange(exchange_req(
            issuer.mint(&claims(&issuer, "builder", "r")),
            &["read"],
        ))
        .await
        .unwrap()
        .into_inner();
    let kid = jsonwebtoken::decode_header(bearer(&resp))
        .unwrap()
        .kid
        .unwrap();
    assert_eq!(kid, before[0].kid, "still signed by the old key");
    // Rotate now: the newest key signs at once; the old one stays published.
    let now_key = admin
        .rotate_signing_key(pb::RotateSigningKeyRequest {
            activate_after_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let resp = c
        .exchange(exchange_req(
            issuer.mint(&claims(&issuer, "builder", "r")),
            &["read"],
        ))
        .await
        .unwrap()
        .into_inner();
    let kid = jsonwebtoken::decode_header(bearer(&resp))
        .unwrap()
        .kid
        .unwrap();
    assert_eq!(kid, now_key.kid);
    verify_with_lanyard_jwks(&l, &bearer(&resp), ORDERS_AUD).await;
    let keys = admin
        .list_signing_keys(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert!(
        keys.iter()
            .any(|k| k.kid == before[0].kid && k.state == "retiring"),
        "{keys:?}"
    );
    let kinds: Vec<String> = audit_events(&l).await.into_iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds.iter().filter(|k| *k == "signing_key.rotated").count(),
        2
    );
}

#[tokio::test]
async fn keys_and_grants_survive_a_restart() {
    let (mut l, issuer) = start(KeyAlg::Es256, Keys::JwksUrl).await;
    let resp = l
        .exchange()
        .await
        .exchange(exchange_req(
            issuer.mint(&claims(&issuer, "builder", "r")),
            &["read"],
        ))
        .await
        .unwrap()
        .into_inner();
    let kid = jsonwebtoken::decode_header(bearer(&resp))
        .unwrap()
        .kid
        .unwrap();
    let work = l.keep_dir();
    let data = l.data_dir().to_path_buf();
    assert_eq!(l.stop().await, Some(0));
    let l = Lanyard::start(LanyardOptions {
        policy: Some(POLICY.into()),
        data_dir: Some(data),
        ..Default::default()
    })
    .await;
    // Same signing key, same grant, configuration reloaded from the store.
    let g = l
        .admin()
        .await
        .get_grant(pb::GetRequest {
            name: resp.grant_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.status, "active");
    let resp2 = l
        .exchange()
        .await
        .exchange(exchange_req(
            issuer.mint(&claims(&issuer, "builder", "r")),
            &["read"],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        jsonwebtoken::decode_header(bearer(&resp2))
            .unwrap()
            .kid
            .unwrap(),
        kid
    );
    let v = l
        .audit()
        .await
        .verify(pb::VerifyRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(v.ok, "{v:?}");
    drop(l);
    let _ = std::fs::remove_dir_all(work);
}

#[tokio::test]
async fn explain_shows_the_workload_and_the_decision_without_issuing() {
    let (l, issuer) = start(KeyAlg::Es256, Keys::JwksUrl).await;
    let mut admin = l.admin().await;
    let explain = |scopes: &[&str], sub: &str| pb::ExplainRequest {
        subject_token: issuer.mint(&claims(&issuer, sub, "r")),
        destination: "orders".into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        requested_ttl_seconds: 0,
    };
    let ok = admin
        .explain(explain(&["read"], "builder"))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.allowed, "{ok:?}");
    assert_eq!(ok.workload_id, "spiffe://lanyard.local/ci/builder");
    assert_eq!(ok.trust_rule, "ci");
    assert_eq!(ok.determining_policies, vec!["ci-orders"]);
    let denied = admin
        .explain(explain(&["write"], "untrusted"))
        .await
        .unwrap()
        .into_inner();
    assert!(!denied.allowed);
    assert_eq!(denied.reason, "POLICY_DENIED");
    assert_eq!(denied.determining_policies, vec!["no-write-for-untrusted"]);
    let bad_scope = admin
        .explain(explain(&["delete"], "builder"))
        .await
        .unwrap()
        .into_inner();
    assert!(!bad_scope.allowed);
    assert_eq!(bad_scope.reason, "SCOPE_NOT_ALLOWED");
    // Nothing was issued.
    let grants = admin
        .list_grants(pb::ListGrantsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .grants;
    assert!(grants.is_empty());
    // Verifying from a checkpoint that is not one is a usage error, not "tampering".
    let err = l
        .audit()
        .await
        .verify(pb::VerifyRequest {
            from_checkpoint: "not.a.checkpoint".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "INVALID_ARGUMENT");
}
