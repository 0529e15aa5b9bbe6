//! The `openai` adapter against a token endpoint on loopback that follows PROTOCOLS.md
//! §2.1 and validates like the documented one: the RFC 8693 body with
//! `identity_provider_id` and `service_account_id`, a subject token with `kid`, a
//! supported `alg`, `iss`, `aud`, `sub`, `exp` and `iat`, signed by a key of the
//! provider's JWKS (lanyard's); it answers `access_token` + `expires_in`, or an OAuth
//! error. Nothing external is contacted.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use jsonwebtoken::{DecodingKey, Validation, jwk::JwkSet};
use lanyard_core::{Clock, GrantId, SystemClock};
use lanyard_destination::{
    Credential, Destination, DestinationError, DestinationSpec, Revocability, RevokeOutcome,
    RevokeRequest,
};
use lanyard_destination_openai::OpenAiDestination;
use lanyard_testkit::minter::{self, TestMinter};
use lanyard_testkit::token_endpoint::oauth_error;
use serde_json::{Value, json};

const ISSUER: &str = "https://lanyard.test";
const AUDIENCE: &str = "https://openai.example/provider/idp_1";
const IDP: &str = "idp_1";
const SA: &str = "sa_1";
const WORKLOAD: &str = "spiffe://lanyard.local/k8s/prod/agent";

struct Fake {
    jwks: JwkSet,
    /// Status and body to answer instead, once.
    next: Mutex<Option<(u16, &'static str)>>,
    expires_in: u64,
    seen: Mutex<Vec<Value>>,
}

async fn token(State(f): State<Arc<Fake>>, body: Bytes) -> Response {
    if let Some((status, body)) = f.next.lock().unwrap().take() {
        return (StatusCode::from_u16(status).unwrap(), body).into_response();
    }
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return oauth_error(400, "invalid_request", "malformed json");
    };
    if body["grant_type"] != "urn:ietf:params:oauth:grant-type:token-exchange"
        || body["subject_token_type"] != "urn:ietf:params:oauth:token-type:jwt"
    {
        return oauth_error(
            400,
            "unsupported_grant_type",
            "token-exchange of a jwt only",
        );
    }
    if body["identity_provider_id"] != IDP || body["service_account_id"] != SA {
        return oauth_error(400, "invalid_grant", "no such provider or service account");
    }
    let Some(subject) = body["subject_token"].as_str() else {
        return oauth_error(400, "invalid_request", "subject_token is required");
    };
    let reject = |d: &str| oauth_error(401, "invalid_grant", d);
    let Ok(header) = jsonwebtoken::decode_header(subject) else {
        return reject("not a jwt");
    };
    let Some(jwk) = header.kid.as_deref().and_then(|k| f.jwks.find(k)) else {
        return reject("kid missing or unknown");
    };
    let mut v = Validation::new(header.alg);
    v.set_issuer(&[ISSUER]);
    v.set_audience(&[AUDIENCE]);
    v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    let Ok(data) = jsonwebtoken::decode::<Value>(subject, &DecodingKey::from_jwk(jwk).unwrap(), &v)
    else {
        return reject("subject token rejected");
    };
    if !data.claims["iat"].is_i64() {
        return reject("iat is required");
    }
    f.seen.lock().unwrap().push(data.claims);
    axum::Json(json!({
        "access_token": "openai-access-token-for-test",
        "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "token_type": "Bearer",
        "expires_in": f.expires_in,
    }))
    .into_response()
}

struct Fixture {
    keys: TestMinter,
    fake: Arc<Fake>,
    addr: SocketAddr,
}

async fn fixture(expires_in: u64) -> Fixture {
    let keys = TestMinter::new(ISSUER);
    let fake = Arc::new(Fake {
        jwks: serde_json::from_value(keys.jwks()).unwrap(),
        next: Mutex::new(None),
        expires_in,
        seen: Mutex::new(Vec::new()),
    });
    let app = Router::new()
        .route("/oauth/token", post(token))
        .with_state(fake.clone());
    Fixture {
        keys,
        fake,
        addr: lanyard_testkit::serve(app).await,
    }
}

impl Fixture {
    fn dest(&self, extra: Value) -> OpenAiDestination {
        let settings = minter::merged(
            json!({
                "token_url": format!("http://{}/oauth/token", self.addr),
                "identity_provider_id": IDP,
                "service_account_id": SA,
                "audience": AUDIENCE,
                "max_attempts": 1,
            }),
            &extra,
        );
        let spec = minter::spec(
            json!({"name": "openai-prod", "kind": "openai", "max_ttl_secs": 3600}),
            settings,
        );
        OpenAiDestination::new(&spec, self.keys.minter.clone()).unwrap()
    }
}

async fn issue(
    d: &OpenAiDestination,
    ttl: u64,
) -> Result<lanyard_destination::Issued, DestinationError> {
    minter::issue(d, WORKLOAD, ttl, &[]).await
}

#[tokio::test]
async fn exchange_returns_a_bearer_token_for_a_subject_token_bound_to_the_grant() {
    let f = fixture(600).await;
    let d = f.dest(json!({}));
    assert_eq!(d.revocability(), Revocability::AtExpiry);
    let now = SystemClock.now_unix();
    let issued = issue(&d, 300).await.unwrap();
    match &issued.credential {
        Credential::Bearer {
            token,
            token_type,
            header,
            ..
        } => {
            assert_eq!(token.expose(), "openai-access-token-for-test");
            assert_eq!(
                (token_type.as_str(), header.as_str()),
                ("Bearer", "authorization")
            );
        }
        other => panic!("{other:?}"),
    }
    assert!((now + 600..=now + 602).contains(&issued.expires_at));
    let seen = f.fake.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    let c = &seen[0];
    assert_eq!(c["sub"], WORKLOAD);
    assert_eq!(c["aud"], AUDIENCE, "one audience, as a string");
    // The subject token expires with the grant.
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 300);
    assert!(c["jti"].is_string());
    assert_eq!(issued.revocation_handle, c["jti"].as_str().unwrap());
    // A long grant still gets a subject token of at most max_subject_token_lifetime_secs.
    issue(&d, 3600).await.unwrap();
    let c = f.fake.seen.lock().unwrap()[1].clone();
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 900);
}

#[tokio::test]
async fn refusals_and_outages_are_told_apart_and_nothing_leaks() {
    let f = fixture(600).await;
    let d = f.dest(json!({}));
    *f.fake.next.lock().unwrap() = Some((
        400,
        r#"{"error":"invalid_grant","error_description":"no mapping matched eyJhbGciOi.x.y"}"#,
    ));
    let err = issue(&d, 300).await.unwrap_err();
    match &err {
        DestinationError::Upstream { message, retryable } => {
            assert!(!retryable);
            assert!(message.contains("invalid_grant"), "{message}");
            assert!(!message.contains("eyJ"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    *f.fake.next.lock().unwrap() = Some((503, "busy"));
    match issue(&d, 300).await.unwrap_err() {
        DestinationError::Upstream { retryable, .. } => assert!(retryable),
        other => panic!("{other:?}"),
    }
    *f.fake.next.lock().unwrap() = Some((200, r#"{"access_token":""#));
    assert!(issue(&d, 300).await.is_err(), "malformed json");
    *f.fake.next.lock().unwrap() = Some((200, r#"{"access_token":"x","expires_in":0}"#));
    assert!(issue(&d, 300).await.is_err(), "no lifetime");
}

#[tokio::test]
async fn a_token_longer_than_allowed_is_refused_when_a_cap_is_set() {
    let f = fixture(7200).await;
    issue(&f.dest(json!({})), 300).await.unwrap();
    let err = issue(&f.dest(json!({"max_token_lifetime_secs": 3600})), 300)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("max_token_lifetime_secs"), "{err}");
}

#[tokio::test]
async fn revoke_states_the_residual_lifetime() {
    let f = fixture(600).await;
    let d = f.dest(json!({}));
    let grant = GrantId::generate();
    let req = RevokeRequest {
        grant_id: &grant,
        revocation_handle: "jti",
        workload_id: WORKLOAD,
        expires_at: 2_000_000_120,
        now: 2_000_000_000,
    };
    match d.revoke(req.clone()).await.unwrap() {
        RevokeOutcome::ExpiresAt { at, detail } => {
            assert_eq!(at, 2_000_000_120);
            assert!(detail.contains("120s"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        d.revoke(req.clone()).await.unwrap(),
        d.revoke(req).await.unwrap()
    );
}

#[tokio::test]
async fn settings_are_checked_when_the_destination_is_built() {
    let f = fixture(600).await;
    let minter = f.keys.minter.clone();
    for (settings, want) in [
        (
            json!({"identity_provider_id": IDP, "service_account_id": SA}),
            "audience",
        ),
        (
            json!({"identity_provider_id": IDP, "service_account_id": SA, "audience": AUDIENCE,
                   "token_url": "http://openai.example/oauth/token"}),
            "https",
        ),
    ] {
        let spec: DestinationSpec =
            serde_json::from_value(json!({"name": "o", "kind": "openai", "settings": settings}))
                .unwrap();
        let err = OpenAiDestination::new(&spec, minter.clone()).unwrap_err();
        assert!(err.to_string().contains(want), "{err}");
    }
}
