//! Exchange end to end: the real binary, a real local OIDC issuer over HTTP, every key
//! type, and every rejection reason with its stable code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use common::*;
use lanyard_proto::v1 as pb;
use lanyard_testkit::{KeyAlg, reason};
use serde_json::json;

async fn happy_path(alg: KeyAlg, keys: Keys) {
    let (l, issuer) = start(alg, keys).await;
    let token = issuer.mint(&claims(&issuer, "builder", "run-42"));
    let resp = l
        .exchange()
        .await
        .exchange(exchange_req(token, &["read"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.workload_id, "spiffe://lanyard.local/ci/builder");
    assert_eq!(resp.task_id, "run-42");
    assert_eq!(resp.scopes, vec!["read"]);
    assert_eq!(resp.revocability, pb::Revocability::Immediate as i32);
    let claims = verify_with_lanyard_jwks(&l, &bearer(&resp), ORDERS_AUD).await;
    assert_eq!(claims["sub"], "spiffe://lanyard.local/ci/builder");
    assert_eq!(claims["aud"], ORDERS_AUD);
    assert_eq!(claims["scope"], "read");
    assert_eq!(claims["lanyard"]["grant_id"], resp.grant_id.as_str());
    assert_eq!(claims["lanyard"]["task"], "run-42");
    let exp = claims["exp"].as_i64().unwrap();
    let iat = claims["iat"].as_i64().unwrap();
    assert_eq!(exp - iat, 300, "destination default TTL");
    // The grant is recorded, without the credential.
    let grants = l
        .admin()
        .await
        .list_grants(pb::ListGrantsRequest {
            workload_id: resp.workload_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .grants;
    assert_eq!(grants.len(), 1);
    assert_eq!(grants[0].status, "active");
    assert_eq!(grants[0].revocation_handle, claims["jti"].as_str().unwrap());
    // And audited.
    let events = audit_events(&l).await;
    assert!(events.iter().any(|e| e.kind == "exchange.granted"));
    let all =
        serde_json::to_string(&events.iter().map(|e| &e.payload_json).collect::<Vec<_>>()).unwrap();
    assert!(
        !all.contains(&bearer(&resp)),
        "credential leaked into audit"
    );
}

#[tokio::test]
async fn rs256_issuer_via_discovery() {
    happy_path(KeyAlg::Rs256, Keys::Discovery).await;
}

#[tokio::test]
async fn es256_issuer_via_jwks_url() {
    happy_path(KeyAlg::Es256, Keys::JwksUrl).await;
}

#[tokio::test]
async fn eddsa_issuer_via_inline_jwks() {
    happy_path(KeyAlg::EdDsa, Keys::Inline).await;
}

#[tokio::test]
async fn ttl_is_clamped_to_destination_max() {
    let (l, issuer) = start(KeyAlg::Es256, Keys::JwksUrl).await;
    let mut req = exchange_req(issuer.mint(&claims(&issuer, "builder", "r")), &["read"]);
    req.requested_ttl_seconds = 100_000;
    let resp = l.exchange().await.exchange(req).await.unwrap().into_inner();
    let c = verify_with_lanyard_jwks(&l, &bearer(&resp), ORDERS_AUD).await;
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 600);
}

fn hand_token(header: serde_json::Value, claims: serde_json::Value) -> String {
    format!(
        "{}.{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string()),
        B64.encode([0u8; 64])
    )
}

#[tokio::test]
async fn every_rejection_has_its_reason_and_is_audited() {
    let (l, issuer) = start(KeyAlg::Es256, Keys::JwksUrl).await;
    let key = issuer.key();
    let base = claims(&issuer, "builder", "r1");
    let with = |k: &str, v: serde_json::Value| {
        let mut c = base.clone();
        c[k] = v;
        c
    };
    let without = |k: &str| {
        let mut c = base.clone();
        c.as_object_mut().unwrap().remove(k);
        c
    };
    let hdr = |extra: serde_json::Value| {
        let mut h = json!({"alg": "ES256", "kid": key.kid, "typ": "JWT"});
        for (k, v) in extra.as_object().unwrap() {
            h[k] = v.clone();
        }
        h.to_string()
    };
    let n = now();
    let other = lanyard_testkit::TestIssuer::start(KeyAlg::Es256).await;
    let mut other_claims = other.claims("builder", AUDIENCE, n);
    other_claims["repository_owner"] = "acme".into();
    let cases: Vec<(&str, String, Vec<&str>, &str)> = vec![
        (
            "expired",
            key.sign(&with("exp", json!(n - 600))),
            vec!["read"],
            "TOKEN_EXPIRED",
        ),
        (
            "not yet valid",
            key.sign(&with("nbf", json!(n + 600))),
            vec!["read"],
            "TOKEN_NOT_YET_VALID",
        ),
        (
            "too old",
            key.sign(&with("iat", json!(n - 3600))),
            vec!["read"],
            "TOKEN_TOO_OLD",
        ),
        (
            "wrong audience",
            key.sign(&with("aud", json!("someone-else"))),
            vec!["read"],
            "AUDIENCE_MISMATCH",
        ),
        (
            "numeric audience",
            key.sign(&with("aud", json!(7))),
            vec!["read"],
            "CLAIM_INVALID",
        ),
        (
            "missing sub",
            key.sign(&without("sub")),
            vec!["read"],
            "CLAIM_MISSING",
        ),
        (
            "missing exp",
            key.sign(&without("exp")),
            vec!["read"],
            "CLAIM_MISSING",
        ),
        (
            "unknown issuer",
            other.mint(&other_claims),
            vec!["read"],
            "ISSUER_UNKNOWN",
        ),
        (
            "bad signature",
            hand_token(json!({"alg": "ES256", "kid": key.kid}), base.clone()),
            vec!["read"],
            "SIGNATURE_INVALID",
        ),
        (
            "alg none",
            hand_token(json!({"alg": "none"}), base.clone()),
            vec!["read"],
            "ALGORITHM_NOT_ALLOWED",
        ),
        (
            "HS256",
            hand_token(json!({"alg": "HS256", "kid": key.kid}), base.clone()),
            vec!["read"],
            "ALGORITHM_NOT_ALLOWED",
        ),
        (
            "jku header",
            key.sign_raw(
                &hdr(json!({"jku": "http://127.0.0.1:1/x"})),
                &base.to_string(),
            ),
            vec!["read"],
            "TOKEN_HEADER_REJECTED",
        ),
        (
            "embedded jwk",
            key.sign_raw(&hdr(json!({"jwk": key.jwk})), &base.to_string()),
            vec!["read"],
            "TOKEN_HEADER_REJECTED",
        ),
        (
            "crit header",
            key.sign_raw(&hdr(json!({"crit": ["exp"]})), &base.to_string()),
            vec!["read"],
            "TOKEN_HEADER_REJECTED",
        ),
        (
            "lanyard typ",
            key.sign_raw(&hdr(json!({"typ": "at+jwt"})), &base.to_string()),
            vec!["read"],
            "TOKEN_TYPE_REJECTED",
        ),
        (
            "unknown kid",
            key.sign_raw(&hdr(json!({"kid": "nope"})), &base.to_string()),
            vec!["read"],
            "KEY_UNKNOWN",
        ),
        (
            "duplicate sub",
            key.sign_raw(
                &hdr(json!({})),
                &base.to_string().replacen(
                    "\"sub\":\"builder\"",
                    "\"sub\":\"builder\",\"sub\":\"admin\"",
                    1,
                ),
            ),
            vec!["read"],
            "TOKEN_DUPLICATE_CLAIM",
        ),
        (
            "garbage",
            "not-a-jwt".to_string(),
            vec!["read"],
            "TOKEN_MALFORMED",
        ),
        (
            "oversized",
            "a".repeat(20_000),
            vec!["read"],
            "TOKEN_TOO_LARGE",
        ),
        (
            "no trust rule",
            key.sign(&with("repository_owner", json!("evil"))),
            vec!["read"],
            "NO_TRUST_RULE",
        ),
        (
            "scope not offered",
            key.sign(&base),
            vec!["delete"],
            "SCOPE_NOT_ALLOWED",
        ),
        (
            "policy denies scope",
            key.sign(&base),
            vec!["admin"],
            "POLICY_DENIED",
        ),
        (
            "policy forbid",
            key.sign(&with("sub", json!("untrusted"))),
            vec!["write"],
            "POLICY_DENIED",
        ),
    ];
    let mut client = l.exchange().await;
    for (name, token, scopes, want) in &cases {
        let err = client
            .exchange(exchange_req(token.clone(), scopes))
            .await
            .unwrap_err();
        assert_eq!(reason(&err), *want, "{name}: {}", err.message());
        // Messages never echo the token.
        assert!(
            !err.message().contains(token.as_str()) || token.len() < 12,
            "{name} echoed the token"
        );
    }
    let mut req = exchange_req(key.sign(&base), &["read"]);
    req.destination = "nowhere".into();
    let err = client.exchange(req).await.unwrap_err();
    assert_eq!(reason(&err), "DESTINATION_UNKNOWN");
    assert_eq!(err.code(), tonic::Code::NotFound);
    // A lanyard-issued token is never a subject token.
    let ok = client
        .exchange(exchange_req(key.sign(&base), &["read"]))
        .await
        .unwrap()
        .into_inner();
    let err = client
        .exchange(exchange_req(bearer(&ok), &["read"]))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "TOKEN_TYPE_REJECTED", "{}", err.message());
    // Every denial is in the audit stream with its reason.
    let events = audit_events(&l).await;
    let denied: Vec<serde_json::Value> = events
        .iter()
        .filter(|e| e.kind == "exchange.denied")
        .map(|e| serde_json::from_str(&e.payload_json).unwrap())
        .collect();
    assert_eq!(denied.len(), cases.len() + 2);
    for (_, _, _, want) in &cases {
        assert!(
            denied.iter().any(|d| d["reason"] == *want),
            "{want} not audited"
        );
    }
    // No token or credential ever reaches the log (lanyard runs at debug level here).
    let log = l.log();
    assert!(log.contains("exchange"), "the log is being written");
    for (name, token, _, _) in &cases {
        if let Some(sig) = token.rsplit('.').next().filter(|s| s.len() > 20) {
            assert!(!log.contains(sig), "{name}: token text in the log");
        }
    }
    assert!(
        !log.contains(bearer(&ok).rsplit('.').next().unwrap()),
        "credential in the log"
    );
    // The chain verifies.
    let v = l
        .audit()
        .await
        .verify(pb::VerifyRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(v.ok, "{v:?}");
    assert_eq!(v.checked as usize, events.len());
}

#[tokio::test]
async fn replayed_token_is_refused_when_protection_is_on() {
    let issuer = lanyard_testkit::TestIssuer::start(KeyAlg::Es256).await;
    let l = lanyard_testkit::Lanyard::start(lanyard_testkit::LanyardOptions {
        policy: Some(POLICY.into()),
        ..Default::default()
    })
    .await;
    configure(&l, &issuer, Keys::JwksUrl, KeyAlg::Es256, true).await;
    let token = issuer.mint(&claims(&issuer, "builder", "r1"));
    let mut c = l.exchange().await;
    c.exchange(exchange_req(token.clone(), &["read"]))
        .await
        .unwrap();
    let err = c
        .exchange(exchange_req(token, &["read"]))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "TOKEN_REPLAYED");
}

#[tokio::test]
async fn oversized_request_is_refused_without_harm() {
    let (l, issuer) = start(KeyAlg::Es256, Keys::JwksUrl).await;
    let mut c = l.exchange().await;
    let mut req = exchange_req(issuer.mint(&claims(&issuer, "builder", "r")), &["read"]);
    req.scopes = vec!["x".repeat(1000); 200];
    let err = c.exchange(req).await.unwrap_err();
    assert!(
        matches!(
            err.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{err:?}"
    );
    // The server is still fine.
    c.exchange(exchange_req(
        issuer.mint(&claims(&issuer, "builder", "r")),
        &["read"],
    ))
    .await
    .unwrap();
}
