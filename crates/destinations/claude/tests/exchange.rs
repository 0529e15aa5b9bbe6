//! The `claude` adapter against a local token endpoint on loopback that speaks the
//! protocol of PROTOCOLS.md §1 and validates like the real one: lanyard's assertion
//! signature against the key ring's JWKS, `iss`, `aud`, `iat`/`exp` spread, single-use
//! `jti`, the required body fields and headers; it answers in the documented success
//! shape and the RFC 6749 §5.2 error format. Nothing external is contacted.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers outside #[test] fns
#![allow(clippy::result_large_err)] // the fake server returns its refusal as an axum Response

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use jsonwebtoken::{DecodingKey, Validation, jwk::JwkSet};
use lanyard_core::{Clock, FakeClock, GrantId, Scope, SystemClock, Ttl, WorkloadId};
use lanyard_destination::http::BreakerState;
use lanyard_destination::{
    Credential, Destination, DestinationError, DestinationSpec, IssueRequest, Issued, Revocability,
    RevokeOutcome, RevokeRequest,
};
use lanyard_destination_claude::ClaudeDestination;
use lanyard_testkit::minter::{self, TestMinter};
use lanyard_testkit::token_endpoint::oauth_error;
use serde_json::{Value, json};

const ISSUER: &str = "https://lanyard.test";
const AUDIENCE: &str = "https://api.anthropic.com";
const RULE: &str = "fdrl_01testrule";
const ORG: &str = "0f8e4a1c-1234-4abc-8def-0123456789ab";
const SVAC: &str = "svac_01testaccount";
const WORKLOAD: &str = "spiffe://lanyard.local/gh/acme/api";

// === the fake token endpoint ===

/// What the next request gets instead of normal processing.
#[derive(Clone)]
enum Script {
    Status(u16, &'static str),
    Hang,
    Big,
    Body(&'static str),
    /// Validate normally but answer this `expires_in` (a server ignoring the cap).
    ExpiresIn(u64),
    /// Validate (consuming the `jti`), then fail with this status.
    AcceptThenFail(u16),
}

struct FakeClaude {
    jwks: JwkSet,
    workspace: Option<String>,
    rule_lifetime: i64,
    max_jwt_lifetime: i64,
    seen_jti: Mutex<HashSet<String>>,
    script: Mutex<VecDeque<Script>>,
    requests: AtomicU32,
    /// Claims of every accepted assertion, in order.
    accepted: Mutex<Vec<Value>>,
    /// Raw assertions received (to replay one by hand).
    assertions: Mutex<Vec<String>>,
}

impl FakeClaude {
    fn validate(&self, headers: &HeaderMap, body: &[u8]) -> Result<(Value, String), Response> {
        let ct = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !ct.starts_with("application/json") {
            return Err(oauth_error(400, "invalid_request", "body must be json"));
        }
        let beta = headers
            .get("anthropic-beta")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let betas: Vec<&str> = beta.split(',').map(str::trim).collect();
        if !betas.contains(&"oidc-federation-2026-04-01") || !betas.contains(&"oauth-2025-04-20") {
            return Err(oauth_error(
                400,
                "invalid_request",
                "missing anthropic-beta",
            ));
        }
        let body: Value = serde_json::from_slice(body)
            .map_err(|_| oauth_error(400, "invalid_request", "malformed json"))?;
        let field = |k: &str| body.get(k).and_then(Value::as_str);
        if field("grant_type") != Some("urn:ietf:params:oauth:grant-type:jwt-bearer") {
            return Err(oauth_error(
                400,
                "unsupported_grant_type",
                "jwt-bearer only",
            ));
        }
        let (Some(assertion), Some(rule), Some(org), Some(svac)) = (
            field("assertion"),
            field("federation_rule_id"),
            field("organization_id"),
            field("service_account_id"),
        ) else {
            return Err(oauth_error(400, "invalid_grant", "missing required field"));
        };
        if rule != RULE || org != ORG || svac != SVAC {
            return Err(oauth_error(400, "invalid_grant", "no such federation rule"));
        }
        if field("workspace_id") != self.workspace.as_deref() {
            return Err(oauth_error(400, "invalid_request", "workspace_id mismatch"));
        }
        self.assertions.lock().unwrap().push(assertion.to_owned());
        let claims = self.verify(assertion)?;
        Ok((claims, assertion.to_owned()))
    }

    fn verify(&self, assertion: &str) -> Result<Value, Response> {
        let reject = |d: &str| oauth_error(400, "invalid_grant", d);
        let header = jsonwebtoken::decode_header(assertion).map_err(|_| reject("not a jwt"))?;
        if header.typ.as_deref() != Some("JWT") {
            return Err(reject("typ must be JWT"));
        }
        let kid = header.kid.ok_or_else(|| reject("no kid"))?;
        let jwk = self.jwks.find(&kid).ok_or_else(|| reject("unknown kid"))?;
        let key = DecodingKey::from_jwk(jwk).map_err(|_| reject("bad jwk"))?;
        let mut v = Validation::new(header.alg);
        v.set_issuer(&[ISSUER]);
        v.set_audience(&[AUDIENCE]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.leeway = 5;
        let claims = jsonwebtoken::decode::<Value>(assertion, &key, &v)
            .map_err(|e| reject(&format!("assertion rejected: {e}")))?
            .claims;
        if !claims["aud"].is_string() {
            return Err(reject("aud must be one audience"));
        }
        let iat = claims["iat"]
            .as_i64()
            .ok_or_else(|| reject("missing iat"))?;
        let exp = claims["exp"]
            .as_i64()
            .ok_or_else(|| reject("missing exp"))?;
        if exp - iat > self.max_jwt_lifetime || exp <= iat {
            return Err(reject(
                "assertion lifetime exceeds max_jwt_lifetime_seconds",
            ));
        }
        let jti = claims["jti"]
            .as_str()
            .ok_or_else(|| reject("missing jti"))?;
        if !self.seen_jti.lock().unwrap().insert(jti.to_owned()) {
            return Err(reject("jti already used"));
        }
        Ok(claims)
    }
}

async fn token(State(s): State<Arc<FakeClaude>>, headers: HeaderMap, body: Bytes) -> Response {
    s.requests.fetch_add(1, Ordering::SeqCst);
    let scripted = s.script.lock().unwrap().pop_front();
    let expires_override = match scripted {
        Some(Script::Status(code, body)) => {
            return (
                StatusCode::from_u16(code).unwrap(),
                [("content-type", "application/json")],
                body,
            )
                .into_response();
        }
        Some(Script::Hang) => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            return "late".into_response();
        }
        Some(Script::Big) => return "x".repeat(64 * 1024).into_response(),
        Some(Script::Body(b)) => return b.into_response(),
        Some(Script::ExpiresIn(n)) => Some(n),
        Some(Script::AcceptThenFail(code)) => {
            if let Err(resp) = s.validate(&headers, &body) {
                return resp;
            }
            return oauth_error(code, "temporarily_unavailable", "try again");
        }
        None => None,
    };
    let (claims, _) = match s.validate(&headers, &body) {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let now = SystemClock.now_unix();
    let remaining = claims["exp"].as_i64().unwrap() - now;
    // PROTOCOLS.md §1.3: max(60, min(rule, 2 x remaining assertion validity)).
    let lifetime = expires_override
        .map(|n| i64::try_from(n).unwrap())
        .unwrap_or_else(|| 60.max(s.rule_lifetime.min(2 * remaining)));
    s.accepted.lock().unwrap().push(claims);
    axum::Json(json!({
        "access_token": format!("sk-ant-oat01-{}", uuid_like()),
        "token_type": "Bearer",
        "expires_in": lifetime,
        "scope": "workspace:inference",
    }))
    .into_response()
}

fn uuid_like() -> String {
    use std::hash::{BuildHasher, Hasher};
    format!(
        "{:016x}",
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
    )
}

struct Fixture {
    keys: TestMinter,
    fake: Arc<FakeClaude>,
    addr: SocketAddr,
}

async fn fixture(workspace: Option<&str>) -> Fixture {
    let keys = TestMinter::new(ISSUER);
    let fake = Arc::new(FakeClaude {
        jwks: serde_json::from_value(keys.jwks()).unwrap(),
        workspace: workspace.map(str::to_owned),
        rule_lifetime: 3600,
        max_jwt_lifetime: 3600,
        seen_jti: Mutex::default(),
        script: Mutex::default(),
        requests: AtomicU32::new(0),
        accepted: Mutex::default(),
        assertions: Mutex::default(),
    });
    let app = Router::new()
        .route("/v1/oauth/token", post(token))
        .with_state(fake.clone());
    Fixture {
        keys,
        fake,
        addr: lanyard_testkit::serve(app).await,
    }
}

impl Fixture {
    fn url(&self) -> String {
        format!("http://{}/v1/oauth/token", self.addr)
    }

    fn settings(&self, extra: Value) -> Value {
        let mut s = json!({
            "token_url": self.url(),
            "federation_rule_id": RULE,
            "organization_id": ORG,
            "service_account_id": SVAC,
            "max_attempts": 1,
        });
        if let Some(w) = &self.fake.workspace {
            s["workspace_id"] = json!(w);
        }
        minter::merged(s, &extra)
    }

    fn dest(&self, extra: Value) -> ClaudeDestination {
        ClaudeDestination::new(&spec(self.settings(extra)), self.keys.minter.clone()).unwrap()
    }

    fn script(&self, items: &[Script]) {
        self.fake
            .script
            .lock()
            .unwrap()
            .extend(items.iter().cloned());
    }

    fn requests(&self) -> u32 {
        self.fake.requests.load(Ordering::SeqCst)
    }
}

fn spec(settings: Value) -> DestinationSpec {
    serde_json::from_value(json!({
        "name": "claude-prod", "kind": "claude", "max_ttl_secs": 3600,
        "settings": settings,
    }))
    .unwrap()
}

struct Req {
    grant: GrantId,
    workload: WorkloadId,
    scopes: Vec<Scope>,
    ttl: Ttl,
    now: i64,
    claims: serde_json::Map<String, Value>,
}

impl Req {
    fn new(ttl: u64) -> Self {
        Req {
            grant: GrantId::generate(),
            workload: WorkloadId::parse(WORKLOAD).unwrap(),
            scopes: Vec::new(),
            ttl: Ttl::from_secs(ttl).unwrap(),
            now: SystemClock.now_unix(),
            claims: serde_json::Map::new(),
        }
    }

    fn issue_request(&self) -> IssueRequest<'_> {
        IssueRequest {
            grant_id: &self.grant,
            workload: &self.workload,
            issuer: "github",
            task: None,
            scopes: &self.scopes,
            ttl: self.ttl,
            now: self.now,
            actor_chain: &[],
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
            assert_eq!(
                issued_token_type,
                "urn:ietf:params:oauth:token-type:access_token"
            );
            assert_eq!(header, "authorization");
            token.expose().to_owned()
        }
        other => panic!("a claude destination issued {other:?}"),
    }
}

fn upstream(err: &DestinationError) -> (&str, bool) {
    match err {
        DestinationError::Upstream { message, retryable } => (message.as_str(), *retryable),
        other => panic!("expected Upstream, got {other:?}"),
    }
}

/// No token or assertion text in an error message.
fn assert_clean(msg: &str) {
    assert!(!msg.contains("eyJ"), "assertion leaked: {msg}");
    assert!(!msg.contains("sk-ant-"), "token leaked: {msg}");
}

// === tests ===

#[tokio::test]
async fn exchange_returns_bearer_token_capped_by_ttl() {
    let f = fixture(None).await;
    let dest = f.dest(json!({}));
    assert_eq!(dest.kind(), "claude");
    let r = Req::new(300);
    let issued = dest.issue(r.issue_request()).await.unwrap();
    let token = token_of(&issued);
    assert!(token.starts_with("sk-ant-oat01-"));
    // Assertion: (300 - 10) / 2 = 145 s, so the token lives <= 290 s <= the TTL.
    let accepted = f.fake.accepted.lock().unwrap().clone();
    assert_eq!(accepted.len(), 1);
    let c = &accepted[0];
    assert_eq!(c["iss"], ISSUER);
    assert_eq!(c["sub"], WORKLOAD);
    assert_eq!(c["aud"], AUDIENCE);
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 145);
    assert_eq!(c["jti"], issued.revocation_handle.as_str());
    assert_eq!(c["lanyard"]["grant_id"], r.grant.as_str());
    assert_eq!(c["lanyard"]["destination"], "claude-prod");
    let now = SystemClock.now_unix();
    assert!(issued.expires_at <= now + 290 + 1, "{}", issued.expires_at);
    assert!(issued.expires_at >= r.now + 280, "{}", issued.expires_at);
    assert!(issued.expires_at <= r.now + 300 + 2);
    // The Debug form of what was issued holds no token.
    assert!(!format!("{issued:?} {dest:?}").contains("sk-ant-"));
}

#[tokio::test]
async fn workspace_is_sent_when_configured() {
    let f = fixture(Some("wrkspc_01abc")).await;
    let dest = f.dest(json!({}));
    dest.issue(Req::new(120).issue_request()).await.unwrap();
    // Without it the fake (expecting one) refuses: the field is really sent.
    let dest = ClaudeDestination::new(
        &spec({
            let mut s = f.settings(json!({}));
            s.as_object_mut().unwrap().remove("workspace_id");
            s
        }),
        f.keys.minter.clone(),
    )
    .unwrap();
    let err = dest.issue(Req::new(120).issue_request()).await.unwrap_err();
    assert!(
        upstream(&err)
            .0
            .contains("invalid_request: workspace_id mismatch")
    );
}

#[tokio::test]
async fn short_ttls_get_the_60s_floor_or_are_refused() {
    let f = fixture(None).await;
    let dest = f.dest(json!({}));
    let r = Req::new(60);
    let issued = dest.issue(r.issue_request()).await.unwrap();
    let c = f.fake.accepted.lock().unwrap()[0].clone();
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 25);
    // The elapsed time is rounded up, so the recorded expiry is never early.
    assert!(issued.expires_at <= SystemClock.now_unix() + 60 + 1);
    assert!(issued.expires_at >= r.now + 60);
    let err = dest.issue(Req::new(30).issue_request()).await.unwrap_err();
    assert!(
        matches!(err, DestinationError::BadRequest(ref m) if m.contains("at least 60s")),
        "{err:?}"
    );
    assert_eq!(f.requests(), 1, "a refused ttl makes no call");
    // Long TTLs are bounded by max_assertion_lifetime_secs.
    let dest = f.dest(json!({"max_assertion_lifetime_secs": 60}));
    dest.issue(Req::new(3600).issue_request()).await.unwrap();
    let c = f.fake.accepted.lock().unwrap()[1].clone();
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 60);
}

#[tokio::test]
async fn a_token_outliving_the_ttl_is_refused() {
    let f = fixture(None).await;
    let dest = f.dest(json!({}));
    f.script(&[Script::ExpiresIn(3600)]);
    let err = dest.issue(Req::new(300).issue_request()).await.unwrap_err();
    let (msg, retryable) = upstream(&err);
    assert!(!retryable);
    assert!(msg.contains("living 3600s"), "{msg}");
    assert_clean(msg);
}

#[tokio::test]
async fn documented_errors_are_not_retryable_and_pass_the_code_through() {
    let f = fixture(None).await;
    let dest = f.dest(json!({"max_attempts": 3}));
    let cases = [
        (
            400,
            r#"{"error":"invalid_grant","error_description":"assertion eyJhbGciOiJFUzI1NiJ9.e30.sig rejected"}"#,
            "http 400: invalid_grant: assertion [redacted] rejected",
        ),
        (
            400,
            r#"{"error":"invalid_request","error_description":"missing organization_id"}"#,
            "http 400: invalid_request: missing organization_id",
        ),
        (
            401,
            r#"{"error":"unauthorized_client","error_description":"no matching rule"}"#,
            "http 401: unauthorized_client: no matching rule (usually a federation rule",
        ),
        (
            400,
            r#"{"error":"unsupported_grant_type"}"#,
            "http 400: unsupported_grant_type",
        ),
        (
            403,
            r#"{"error":"access_denied"}"#,
            "http 403: access_denied",
        ),
        (
            400,
            r#"{"error":{"type":"invalid_request_error","message":"bad"}}"#,
            "http 400: invalid_request_error: bad",
        ),
        (404, "<html>not found</html>", "http 404"),
    ];
    for (i, (status, body, want)) in cases.into_iter().enumerate() {
        f.script(&[Script::Status(status, body)]);
        let err = dest.issue(Req::new(300).issue_request()).await.unwrap_err();
        let (msg, retryable) = upstream(&err);
        assert!(!retryable, "{status}: {msg}");
        assert!(msg.contains(want), "{msg}");
        assert_clean(msg);
        assert_eq!(
            f.requests(),
            u32::try_from(i + 1).unwrap(),
            "no retry of {status}"
        );
    }
    // The destination answered each time: the circuit stays closed.
    assert_eq!(dest.breaker_state(), BreakerState::Closed { failures: 0 });
}

#[tokio::test]
async fn the_fake_refuses_bad_requests_like_the_real_one() {
    let f = fixture(None).await;
    // Wrong rule ID.
    let dest = f.dest(json!({"federation_rule_id": "fdrl_other"}));
    let err = dest.issue(Req::new(300).issue_request()).await.unwrap_err();
    assert!(
        upstream(&err)
            .0
            .contains("invalid_grant: no such federation rule")
    );
    // Wrong audience: the signature is fine, the aud is not.
    let dest = f.dest(json!({"assertion_audience": "https://elsewhere"}));
    let err = dest.issue(Req::new(300).issue_request()).await.unwrap_err();
    assert!(
        upstream(&err)
            .0
            .contains("invalid_grant: assertion rejected"),
        "{err}"
    );
    // Missing beta header.
    let dest = f.dest(json!({"anthropic_beta": "oauth-2025-04-20"}));
    let err = dest.issue(Req::new(300).issue_request()).await.unwrap_err();
    assert!(upstream(&err).0.contains("missing anthropic-beta"), "{err}");
}

#[tokio::test]
async fn server_errors_are_retryable_and_retried_with_a_fresh_assertion() {
    let f = fixture(None).await;
    let dest = f.dest(json!({}));
    for status in [429u16, 500, 503] {
        f.script(&[Script::Status(status, r#"{"error":"overloaded"}"#)]);
        let err = dest.issue(Req::new(300).issue_request()).await.unwrap_err();
        let (msg, retryable) = upstream(&err);
        assert!(retryable, "{status}: {msg}");
        assert!(msg.contains(&format!("http {status}")), "{msg}");
    }
    // With two attempts a 503 is retried. The first attempt's jti was consumed by the
    // server before it failed, so the retry only succeeds with a fresh assertion (the
    // fake refuses a reused jti).
    let dest = f.dest(json!({"max_attempts": 2}));
    let before = f.requests();
    f.fake.assertions.lock().unwrap().clear();
    f.script(&[Script::AcceptThenFail(503)]);
    let issued = dest.issue(Req::new(300).issue_request()).await.unwrap();
    assert_eq!(f.requests() - before, 2);
    let sent = f.fake.assertions.lock().unwrap().clone();
    assert_eq!(sent.len(), 2);
    assert_ne!(sent[0], sent[1]);
    let accepted = f.fake.accepted.lock().unwrap().clone();
    assert_eq!(
        accepted.last().unwrap()["jti"],
        issued.revocation_handle.as_str()
    );
    // Retries stop at max_attempts.
    let before = f.requests();
    f.script(&[Script::AcceptThenFail(500), Script::AcceptThenFail(500)]);
    let err = dest.issue(Req::new(300).issue_request()).await.unwrap_err();
    assert!(upstream(&err).1);
    assert_eq!(f.requests() - before, 2);
}

#[tokio::test]
async fn every_issue_uses_a_new_jti() {
    let f = fixture(None).await;
    let dest = f.dest(json!({}));
    for _ in 0..5 {
        dest.issue(Req::new(300).issue_request()).await.unwrap();
    }
    let accepted = f.fake.accepted.lock().unwrap().clone();
    let jtis: HashSet<&str> = accepted
        .iter()
        .map(|c| c["jti"].as_str().unwrap())
        .collect();
    assert_eq!(jtis.len(), 5);
}

#[tokio::test]
async fn a_replayed_assertion_is_refused() {
    let f = fixture(None).await;
    let dest = f.dest(json!({}));
    dest.issue(Req::new(300).issue_request()).await.unwrap();
    let assertion = f.fake.assertions.lock().unwrap()[0].clone();
    let resp = reqwest::Client::new()
        .post(f.url())
        .header(
            "anthropic-beta",
            "oauth-2025-04-20,oidc-federation-2026-04-01",
        )
        .json(&json!({
            "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
            "assertion": assertion,
            "federation_rule_id": RULE, "organization_id": ORG, "service_account_id": SVAC,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "invalid_grant");
    assert_eq!(body["error_description"], "jti already used");
}

#[tokio::test]
async fn a_silent_server_times_out() {
    let f = fixture(None).await;
    let dest = f.dest(json!({"timeout_secs": 1}));
    f.script(&[Script::Hang]);
    let started = std::time::Instant::now();
    let err = dest.issue(Req::new(300).issue_request()).await.unwrap_err();
    let (msg, retryable) = upstream(&err);
    assert!(retryable);
    assert!(msg.contains("timed out"), "{msg}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn oversized_and_malformed_answers_are_refused() {
    let f = fixture(None).await;
    let dest = f.dest(json!({"max_response_bytes": 4096}));
    f.script(&[Script::Big]);
    let err = dest.issue(Req::new(300).issue_request()).await.unwrap_err();
    assert!(upstream(&err).0.contains("exceeds 4096 bytes"), "{err}");
    for (body, want) in [
        ("{not json", "malformed token response (not json)"),
        (
            r#"{"token_type":"Bearer","expires_in":60}"#,
            "malformed token response",
        ),
        (
            r#"{"access_token":"sk-ant-oat01-x","token_type":"Bearer","expires_in":"soon"}"#,
            "malformed",
        ),
        (
            r#"{"access_token":"sk-ant-oat01-x","token_type":"mac","expires_in":60}"#,
            "not Bearer",
        ),
        (
            r#"{"access_token":"","token_type":"Bearer","expires_in":60}"#,
            "empty access_token",
        ),
    ] {
        f.script(&[Script::Body(body)]);
        let err = dest.issue(Req::new(300).issue_request()).await.unwrap_err();
        let (msg, retryable) = upstream(&err);
        assert!(!retryable, "{body}");
        assert!(msg.contains(want), "{body}: {msg}");
        assert_clean(msg);
    }
}

#[tokio::test]
async fn circuit_opens_after_repeated_failures_and_fails_fast() {
    let f = fixture(None).await;
    let clock = FakeClock::at(SystemClock.now_unix());
    let dest = ClaudeDestination::with_clock(
        &spec(f.settings(json!({"breaker_threshold": 3, "breaker_cooldown_secs": 30}))),
        f.keys.minter.clone(),
        Arc::new(clock.clone()),
    )
    .unwrap();
    f.script(&vec![Script::Status(503, ""); 3]);
    for _ in 0..3 {
        let err = dest.issue(Req::new(300).issue_request()).await.unwrap_err();
        assert!(upstream(&err).0.contains("http 503"));
    }
    assert!(matches!(dest.breaker_state(), BreakerState::Open { .. }));
    // Open: fails fast without calling the destination.
    let started = std::time::Instant::now();
    for _ in 0..10 {
        let err = dest.issue(Req::new(300).issue_request()).await.unwrap_err();
        let (msg, retryable) = upstream(&err);
        assert!(retryable);
        assert!(msg.contains("destination claude-prod is failing"), "{msg}");
    }
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(f.requests(), 3);
    // The breaker is per destination: another destination is not affected.
    let other = f.dest(json!({}));
    other.issue(Req::new(300).issue_request()).await.unwrap();
    assert_eq!(f.requests(), 4);
    // After the cool-down one trial goes through; success closes the circuit.
    clock.advance(30);
    dest.issue(Req::new(300).issue_request()).await.unwrap();
    assert_eq!(f.requests(), 5);
    assert_eq!(dest.breaker_state(), BreakerState::Closed { failures: 0 });
}

#[tokio::test]
async fn revoke_states_the_residual_lifetime() {
    let f = fixture(None).await;
    let dest = f.dest(json!({}));
    assert_eq!(dest.revocability(), Revocability::AtExpiry);
    assert!(!dest.revoke_at_expiry());
    let grant = GrantId::generate();
    let req = RevokeRequest {
        grant_id: &grant,
        revocation_handle: "0123456789abcdef0123456789abcdef",
        workload_id: WORKLOAD,
        expires_at: 1_767_225_600,
        now: 1_767_225_480,
    };
    let out = dest.revoke(req.clone()).await.unwrap();
    match &out {
        RevokeOutcome::ExpiresAt { at, detail } => {
            assert_eq!(*at, 1_767_225_600);
            assert!(detail.contains("cannot be revoked"), "{detail}");
            assert!(detail.contains("120s"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(dest.revoke(req).await.unwrap(), out);
    assert_eq!(f.requests(), 0, "revocation calls nothing");
}

#[tokio::test]
async fn settings_are_validated_at_load() {
    let f = fixture(None).await;
    let mut no_rule = f.settings(json!({}));
    no_rule
        .as_object_mut()
        .unwrap()
        .remove("federation_rule_id");
    let cases = [
        (f.settings(json!({"bogus": true})), "unknown field `bogus`"),
        (no_rule, "missing field `federation_rule_id`"),
        (
            f.settings(json!({"token_url": "http://api.anthropic.com/v1/oauth/token"})),
            "https is required except for loopback",
        ),
        (
            f.settings(json!({"token_url": "http://10.1.2.3/v1/oauth/token"})),
            "https is required except for loopback",
        ),
    ];
    for (settings, want) in cases {
        let err = ClaudeDestination::new(&spec(settings), f.keys.minter.clone()).unwrap_err();
        assert!(
            matches!(err, DestinationError::InvalidSettings { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains(want), "{err}");
    }
    let mut wrong_kind = spec(f.settings(json!({})));
    wrong_kind.kind = "jwt".into();
    assert!(ClaudeDestination::new(&wrong_kind, f.keys.minter.clone()).is_err());
    // The default endpoint is accepted without contacting it.
    let mut s = f.settings(json!({}));
    s.as_object_mut().unwrap().remove("token_url");
    let dest = ClaudeDestination::new(&spec(s), f.keys.minter.clone()).unwrap();
    assert_eq!(
        dest.settings().token_url,
        "https://api.anthropic.com/v1/oauth/token"
    );
}
