//! The `claude` destination through the real binary: a workload exchanges its platform
//! token at lanyard's gRPC Exchange, lanyard mints an assertion and performs the RFC 7523
//! jwt-bearer exchange (PROTOCOLS.md §1) at a token endpoint on loopback, which checks
//! the assertion against lanyard's JWKS fetched over HTTP, as Anthropic does with a
//! federation issuer's keys. Refusals and outages map to their reason codes, and a
//! revocation's receipt states the residual lifetime.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use common::*;
use lanyard_proto::v1 as pb;
use lanyard_testkit::{KeyAlg, Lanyard, LanyardOptions, TestIssuer, reason};
use serde_json::{Value, json};

const RULE: &str = "fdrl_01e2etestrule";
const ORG: &str = "0f8e4a1c-1234-4abc-8def-0123456789ab";
const SVAC: &str = "svac_01e2etestaccount";

const CLAUDE_POLICY: &str = r#"
@id("ci-claude")
permit (principal, action, resource == Lanyard::Destination::"claude")
when { principal.id like "spiffe://lanyard.local/ci/*" };
"#;

/// The token endpoint: lanyard's JWKS URL, what it answers next, and what it saw.
struct Fake {
    jwks_url: Mutex<String>,
    refuse: Mutex<Option<&'static str>>,
    seen: Mutex<Vec<Value>>,
}

fn oauth_error(status: u16, error: &str) -> Response {
    (
        StatusCode::from_u16(status).unwrap(),
        [("content-type", "application/json")],
        json!({"error": error, "error_description": "refused by the test endpoint"}).to_string(),
    )
        .into_response()
}

async fn token(State(f): State<Arc<Fake>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(code) = *f.refuse.lock().unwrap() {
        return oauth_error(400, code);
    }
    let beta = headers
        .get("anthropic-beta")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !beta.contains("oidc-federation-2026-04-01") {
        return oauth_error(400, "invalid_request");
    }
    let body: Value = serde_json::from_slice(&body).unwrap();
    if body["grant_type"] != "urn:ietf:params:oauth:grant-type:jwt-bearer"
        || body["federation_rule_id"] != RULE
        || body["organization_id"] != ORG
        || body["service_account_id"] != SVAC
    {
        return oauth_error(400, "invalid_grant");
    }
    // Verify the assertion with the issuer's published keys, fetched over HTTP.
    let assertion = body["assertion"].as_str().unwrap();
    let url = f.jwks_url.lock().unwrap().clone();
    let jwks: jsonwebtoken::jwk::JwkSet = reqwest::get(url).await.unwrap().json().await.unwrap();
    let header = jsonwebtoken::decode_header(assertion).unwrap();
    let Some(jwk) = jwks.find(header.kid.as_deref().unwrap_or("")) else {
        return oauth_error(400, "invalid_grant");
    };
    let mut v = jsonwebtoken::Validation::new(header.alg);
    v.set_audience(&["https://api.anthropic.com"]);
    v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    let Ok(data) = jsonwebtoken::decode::<Value>(
        assertion,
        &jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap(),
        &v,
    ) else {
        return oauth_error(400, "invalid_grant");
    };
    let claims = data.claims;
    let remaining = claims["exp"].as_i64().unwrap() - now();
    f.seen.lock().unwrap().push(claims);
    // PROTOCOLS.md §1.3: max(60, min(rule lifetime, 2 x remaining assertion validity)).
    axum::Json(json!({
        "access_token": "sk-ant-oat01-e2e-test-token",
        "token_type": "Bearer",
        "expires_in": 60.max(3600.min(2 * remaining)),
        "scope": "workspace:inference",
    }))
    .into_response()
}

async fn start_fake() -> (Arc<Fake>, String) {
    let fake = Arc::new(Fake {
        jwks_url: Mutex::new(String::new()),
        refuse: Mutex::new(None),
        seen: Mutex::new(Vec::new()),
    });
    let app = Router::new()
        .route("/v1/oauth/token", post(token))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (fake, format!("http://{addr}/v1/oauth/token"))
}

fn claude_destination(token_url: &str) -> pb::Destination {
    pb::Destination {
        name: "claude".into(),
        kind: "claude".into(),
        default_ttl_seconds: 300,
        max_ttl_seconds: 900,
        settings: Some(json_struct(json!({
            "token_url": token_url,
            "federation_rule_id": RULE,
            "organization_id": ORG,
            "service_account_id": SVAC,
            "max_attempts": 1,
        }))),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_workload_gets_a_claude_token_through_lanyard() {
    let (fake, token_url) = start_fake().await;
    let issuer = TestIssuer::start(KeyAlg::Es256).await;
    let l = Lanyard::start(LanyardOptions {
        policy: Some(CLAUDE_POLICY.into()),
        ..Default::default()
    })
    .await;
    *fake.jwks_url.lock().unwrap() = format!("{}/.well-known/jwks.json", l.http);
    configure(&l, &issuer, Keys::JwksUrl, KeyAlg::Es256, false).await;
    l.admin()
        .await
        .put_destination(pb::PutDestinationRequest {
            destination: Some(claude_destination(&token_url)),
            expected_revision: None,
        })
        .await
        .unwrap();
    let mut c = l.exchange().await;
    let ask = |ttl: u32| pb::ExchangeRequest {
        subject_token: issuer.mint(&claims(&issuer, "agent", "run-1")),
        destination: "claude".into(),
        requested_ttl_seconds: ttl,
        ..Default::default()
    };
    let resp = c.exchange(ask(120)).await.unwrap().into_inner();
    assert_eq!(bearer(&resp), "sk-ant-oat01-e2e-test-token");
    match resp.credential.as_ref().unwrap().kind.as_ref().unwrap() {
        pb::credential::Kind::Bearer(b) => {
            assert_eq!(
                (b.token_type.as_str(), b.header.as_str()),
                ("Bearer", "authorization")
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(resp.revocability, pb::Revocability::AtExpiry as i32);
    // The token lives no longer than the grant allows.
    let expires = resp.expires_at.unwrap().seconds;
    assert!(
        expires <= now() + 120 + 2,
        "expires in {} s",
        expires - now()
    );
    // The assertion was lanyard's, for this workload, with one audience.
    let seen = fake.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["sub"], resp.workload_id.as_str());
    assert_eq!(seen[0]["iss"], l.http.as_str());
    assert!(seen[0]["aud"].is_string());
    // No token or assertion in the server log.
    assert!(!l.log().contains("sk-ant-oat01"));

    // Revocation: Claude cannot revoke early; the receipt states until when.
    let out = admin_cli_json(
        &l,
        &["revoke", "--grant", &resp.grant_id, "--reason", "e2e"],
    )
    .await;
    assert_eq!(out["summary"]["expires_at"], 1);
    let r = &out["receipts"][0];
    assert_eq!(r["outcome"], "expires_at");
    assert!(r["expires_at"].is_string());

    // A refusal at the destination: DESTINATION_REJECTED with its code passed on.
    *fake.refuse.lock().unwrap() = Some("invalid_grant");
    let err = c.exchange(ask(120)).await.unwrap_err();
    assert_eq!(reason(&err), "DESTINATION_REJECTED");
    assert!(err.message().contains("invalid_grant"), "{}", err.message());
    // An outage: DESTINATION_UNAVAILABLE.
    let down = claude_destination("http://127.0.0.1:1/v1/oauth/token");
    l.admin()
        .await
        .put_destination(pb::PutDestinationRequest {
            destination: Some(down),
            expected_revision: None,
        })
        .await
        .unwrap();
    let err = c.exchange(ask(120)).await.unwrap_err();
    assert_eq!(reason(&err), "DESTINATION_UNAVAILABLE");
    // Settings are checked when the destination is put: plain http off loopback.
    let err = l
        .admin()
        .await
        .put_destination(pb::PutDestinationRequest {
            destination: Some(claude_destination("http://api.example.com/v1/oauth/token")),
            expected_revision: None,
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "CONFIG_INVALID");
}
