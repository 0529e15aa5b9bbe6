//! The `jwt` adapter end to end with a real key ring: minted tokens verify against
//! lanyard's JWKS, carry exactly the documented claims, and are bound to one audience.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers outside #[test] fns

use std::sync::Arc;

use jsonwebtoken::{DecodingKey, Validation, jwk::Jwk};
use lanyard_core::{Clock, GrantId, Scope, SystemClock, TaskId, Ttl, WorkloadId};
use lanyard_destination::{
    Credential, Destination, DestinationError, DestinationSpec, IssueRequest, Issued, Revocability,
    RevokeOutcome, RevokeRequest,
};
use lanyard_destination_jwt::JwtDestination;
use lanyard_keys::{KeyRing, KeyRingMinter, SigningAlgorithm};
use serde_json::{Value, json};

const ISSUER: &str = "https://lanyard.test";

struct Fixture {
    _dir: tempfile::TempDir,
    ring: Arc<KeyRing>,
    minter: Arc<KeyRingMinter>,
}

fn fixture(alg: SigningAlgorithm) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let ring =
        Arc::new(KeyRing::open(&dir.path().join("keys"), alg, SystemClock::shared()).unwrap());
    let minter = Arc::new(KeyRingMinter::new(ring.clone(), ISSUER));
    Fixture {
        _dir: dir,
        ring,
        minter,
    }
}

fn spec(name: &str, settings: Value) -> DestinationSpec {
    serde_json::from_value(json!({
        "name": name, "kind": "jwt", "scopes": ["orders:read", "orders:write"],
        "settings": settings,
    }))
    .unwrap()
}

fn validation(ring: &KeyRing, token: &str, audience: &str) -> (DecodingKey, Validation) {
    let header = jsonwebtoken::decode_header(token).unwrap();
    let kid = header.kid.unwrap();
    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_value(ring.jwks()).unwrap();
    let jwk: &Jwk = jwks.find(&kid).unwrap();
    let key = DecodingKey::from_jwk(jwk).unwrap();
    let mut v = Validation::new(header.alg);
    v.set_issuer(&[ISSUER]);
    v.set_audience(&[audience]);
    v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    v.validate_nbf = true;
    (key, v)
}

fn decode(ring: &KeyRing, token: &str, audience: &str) -> jsonwebtoken::errors::Result<Value> {
    let (key, v) = validation(ring, token, audience);
    jsonwebtoken::decode::<Value>(token, &key, &v).map(|d| d.claims)
}

struct Req {
    grant: GrantId,
    workload: WorkloadId,
    task: Option<TaskId>,
    scopes: Vec<Scope>,
    ttl: Ttl,
    now: i64,
    chain: Vec<String>,
    claims: serde_json::Map<String, Value>,
}

impl Req {
    fn new() -> Self {
        Req {
            grant: GrantId::generate(),
            workload: WorkloadId::parse("spiffe://lanyard.local/gh/acme/api").unwrap(),
            task: Some(TaskId::parse("run-42").unwrap()),
            scopes: vec![
                Scope::parse("orders:read").unwrap(),
                Scope::parse("orders:write").unwrap(),
            ],
            ttl: Ttl::from_secs(300).unwrap(),
            now: SystemClock.now_unix(),
            chain: Vec::new(),
            claims: json!({"repository": "acme/api", "run_id": "42", "ref": "main"})
                .as_object()
                .unwrap()
                .clone(),
        }
    }

    fn issue_request(&self) -> IssueRequest<'_> {
        IssueRequest {
            grant_id: &self.grant,
            workload: &self.workload,
            issuer: "github",
            task: self.task.as_ref(),
            scopes: &self.scopes,
            ttl: self.ttl,
            now: self.now,
            actor_chain: &self.chain,
            claims: &self.claims,
        }
    }
}

fn token_of(issued: &Issued) -> String {
    match &issued.credential {
        Credential::Bearer {
            token,
            token_type,
            issued_token_type,
            header,
        } => {
            assert_eq!(token_type, "Bearer");
            assert_eq!(issued_token_type, "urn:ietf:params:oauth:token-type:jwt");
            assert_eq!(header, "authorization");
            token.expose().to_owned()
        }
        other => panic!("a jwt destination issued {other:?}"),
    }
}

#[tokio::test]
async fn claims_are_exact_and_complete() {
    for alg in SigningAlgorithm::ALL {
        let f = fixture(*alg);
        let dest = JwtDestination::new(
            &spec("orders-api", json!({"audience": "https://orders.internal", "extra_claims": ["repository", "missing"]})),
            f.minter.clone(),
        )
        .unwrap();
        assert_eq!(dest.kind(), "jwt");
        let r = Req::new();
        let issued = dest.issue(r.issue_request()).await.unwrap();
        let token = token_of(&issued);

        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.typ.as_deref(), Some("at+jwt"));
        assert_eq!(header.alg, alg.jwt_algorithm());
        assert!(header.kid.is_some());

        let claims = decode(&f.ring, &token, "https://orders.internal").unwrap();
        let jti = issued.revocation_handle.clone();
        assert_eq!(jti.len(), 32);
        assert_eq!(
            claims,
            json!({
                "iss": ISSUER,
                "sub": "spiffe://lanyard.local/gh/acme/api",
                "aud": "https://orders.internal",
                "iat": r.now, "nbf": r.now, "exp": r.now + 300,
                "jti": jti,
                "scope": "orders:read orders:write",
                "client_id": "spiffe://lanyard.local/gh/acme/api",
                "lanyard": {
                    "grant_id": r.grant.as_str(), "issuer": "github",
                    "task": "run-42", "destination": "orders-api",
                },
                "src": {"repository": "acme/api"},
            })
        );
        // TTL respected.
        assert_eq!(issued.expires_at, r.now + 300);
        // Single-valued audience: a string, never an array.
        assert!(claims["aud"].is_string());
    }
}

#[tokio::test]
async fn optional_claims_are_omitted_and_jtis_are_fresh() {
    let f = fixture(SigningAlgorithm::ES256);
    let dest = JwtDestination::new(
        &spec("orders-api", json!({"audience": "a"})),
        f.minter.clone(),
    )
    .unwrap();
    let mut r = Req::new();
    r.task = None;
    r.scopes.clear();
    r.ttl = Ttl::from_secs(60).unwrap();
    let first = dest.issue(r.issue_request()).await.unwrap();
    let claims = decode(&f.ring, &token_of(&first), "a").unwrap();
    let obj = claims.as_object().unwrap();
    for absent in ["scope", "act", "src"] {
        assert!(!obj.contains_key(absent), "{absent} in {claims}");
    }
    assert!(claims["lanyard"].get("task").is_none());
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        60
    );
    let second = dest.issue(r.issue_request()).await.unwrap();
    assert_ne!(first.revocation_handle, second.revocation_handle);
}

#[tokio::test]
async fn act_nesting_for_zero_one_two_actors() {
    let f = fixture(SigningAlgorithm::EdDSA);
    let dest = JwtDestination::new(
        &spec("orders-api", json!({"audience": "a"})),
        f.minter.clone(),
    )
    .unwrap();
    let agent = "spiffe://lanyard.local/agents/planner".to_owned();
    let tool = "spiffe://lanyard.local/agents/tool".to_owned();
    let cases = [
        (vec![], None),
        (vec![agent.clone()], Some(json!({"sub": agent}))),
        (
            vec![agent.clone(), tool.clone()],
            Some(json!({"sub": agent, "act": {"sub": tool}})),
        ),
    ];
    for (chain, want) in cases {
        let mut r = Req::new();
        r.chain = chain;
        let issued = dest.issue(r.issue_request()).await.unwrap();
        let claims = decode(&f.ring, &token_of(&issued), "a").unwrap();
        assert_eq!(claims.get("act").cloned(), want);
        assert_eq!(claims["sub"], "spiffe://lanyard.local/gh/acme/api");
    }
}

#[tokio::test]
async fn token_for_one_audience_fails_at_another() {
    let f = fixture(SigningAlgorithm::ES256);
    let a = JwtDestination::new(
        &spec("dest-a", json!({"audience": "https://a.internal"})),
        f.minter.clone(),
    )
    .unwrap();
    let b = JwtDestination::new(
        &spec("dest-b", json!({"audience": "https://b.internal"})),
        f.minter.clone(),
    )
    .unwrap();
    let r = Req::new();
    let token_a = token_of(&a.issue(r.issue_request()).await.unwrap());
    let token_b = token_of(&b.issue(r.issue_request()).await.unwrap());
    decode(&f.ring, &token_a, "https://a.internal").unwrap();
    decode(&f.ring, &token_b, "https://b.internal").unwrap();
    let err = decode(&f.ring, &token_a, "https://b.internal").unwrap_err();
    assert_eq!(
        *err.kind(),
        jsonwebtoken::errors::ErrorKind::InvalidAudience
    );
    let err = decode(&f.ring, &token_b, "https://a.internal").unwrap_err();
    assert_eq!(
        *err.kind(),
        jsonwebtoken::errors::ErrorKind::InvalidAudience
    );
}

#[tokio::test]
async fn expired_token_is_rejected() {
    let f = fixture(SigningAlgorithm::ES256);
    let dest = JwtDestination::new(
        &spec("orders-api", json!({"audience": "a"})),
        f.minter.clone(),
    )
    .unwrap();
    let mut r = Req::new();
    r.ttl = Ttl::from_secs(60).unwrap();
    r.now -= 3600; // issued an hour ago with a one-minute TTL
    let token = token_of(&dest.issue(r.issue_request()).await.unwrap());
    let err = decode(&f.ring, &token, "a").unwrap_err();
    assert_eq!(
        *err.kind(),
        jsonwebtoken::errors::ErrorKind::ExpiredSignature
    );
}

#[tokio::test]
async fn revocation_is_immediate_and_idempotent() {
    let f = fixture(SigningAlgorithm::ES256);
    let dest = JwtDestination::new(
        &spec("orders-api", json!({"audience": "a"})),
        f.minter.clone(),
    )
    .unwrap();
    assert_eq!(dest.revocability(), Revocability::Immediate);
    let grant = GrantId::generate();
    let req = RevokeRequest {
        grant_id: &grant,
        revocation_handle: "0123456789abcdef0123456789abcdef",
        workload_id: "spiffe://lanyard.local/gh/acme/api",
        expires_at: 1_767_225_600,
        now: 1_767_225_000,
    };
    let first = dest.revoke(req.clone()).await.unwrap();
    assert_eq!(
        first,
        RevokeOutcome::Revoked {
            detail: lanyard_destination_jwt::REVOKED_DETAIL.into()
        }
    );
    assert_eq!(dest.revoke(req).await.unwrap(), first);
}

#[test]
fn settings_errors() {
    let f = fixture(SigningAlgorithm::ES256);
    let cases = [
        (json!({}), "missing field `audience`"),
        (
            json!({"audience": "a", "audiences": ["b"]}),
            "unknown field `audiences`",
        ),
        (json!({"audience": ""}), "must not be empty"),
    ];
    for (settings, want) in cases {
        let err = JwtDestination::new(&spec("orders-api", settings), f.minter.clone()).unwrap_err();
        assert!(matches!(err, DestinationError::InvalidSettings { .. }));
        assert!(err.to_string().contains(want), "{err}");
    }
    // No settings block at all.
    let mut s = spec("orders-api", json!(null));
    s.settings = Value::Null;
    assert!(
        JwtDestination::new(&s, f.minter.clone())
            .unwrap_err()
            .to_string()
            .contains("audience")
    );
    // Wrong kind and invalid common settings are refused too.
    let mut s = spec("orders-api", json!({"audience": "a"}));
    s.kind = "claude".into();
    assert!(JwtDestination::new(&s, f.minter.clone()).is_err());
    let s = spec("Bad Name", json!({"audience": "a"}));
    assert!(JwtDestination::new(&s, f.minter.clone()).is_err());
}
