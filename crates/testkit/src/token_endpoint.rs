//! A federation token endpoint on loopback for end-to-end tests of the destinations that
//! exchange a lanyard-signed JWT for an access token (Claude's RFC 7523 jwt-bearer,
//! OpenAI's RFC 8693 exchange). Like the real services it fetches the issuer's JWKS
//! over HTTP (lanyard's `/.well-known/jwks.json`), verifies the JWT's signature, `iss`,
//! single `aud`, `exp`, `sub` and single-use `jti`, checks the body fields and headers
//! the protocol requires, and answers RFC 6749 §5.1 JSON or an RFC 6749 §5.2 error.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

/// What the endpoint expects.
#[derive(Debug, Clone)]
pub struct Expect {
    /// Where the JWT is in the body (`assertion` or `subject_token`).
    pub jwt_field: &'static str,
    /// Other body fields and their exact values.
    pub fields: BTreeMap<&'static str, String>,
    /// A header and a value it must contain.
    pub header: Option<(&'static str, &'static str)>,
    /// The JWT's one audience.
    pub audience: String,
    /// The JWT's issuer.
    pub issuer: String,
    /// The issuer's JWKS URL, fetched on every request.
    pub jwks_url: String,
    /// The most a token may live, seconds (its `expires_in` is this, capped at twice the
    /// JWT's remaining validity when `cap_by_jwt` is set, and at least 60).
    pub token_lifetime: i64,
    /// Cap the token's lifetime by the JWT as Claude does (PROTOCOLS.md §1.3).
    pub cap_by_jwt: bool,
}

/// The running endpoint.
pub struct TokenEndpoint {
    /// `http://127.0.0.1:<port>/oauth/token`.
    pub url: String,
    state: Arc<Inner>,
}

struct Inner {
    expect: Mutex<Expect>,
    refuse: Mutex<Option<(u16, String)>>,
    seen_jti: Mutex<HashSet<String>>,
    accepted: Mutex<Vec<Value>>,
}

/// The access token every success answers.
pub const ACCESS_TOKEN: &str = "test-access-token-from-the-fake-endpoint";

impl TokenEndpoint {
    /// Start it on a free loopback port.
    pub async fn start(expect: Expect) -> TokenEndpoint {
        let state = Arc::new(Inner {
            expect: Mutex::new(expect),
            refuse: Mutex::new(None),
            seen_jti: Mutex::new(HashSet::new()),
            accepted: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/oauth/token", post(token))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        TokenEndpoint {
            url: format!("http://{addr}/oauth/token"),
            state,
        }
    }

    /// Change what is expected (e.g. the JWKS URL once lanyard has started).
    pub fn expect(&self, f: impl FnOnce(&mut Expect)) {
        f(&mut self.state.expect.lock().unwrap());
    }

    /// Answer every request with this OAuth error until [`TokenEndpoint::accept`].
    pub fn refuse(&self, status: u16, error: &str) {
        *self.state.refuse.lock().unwrap() = Some((status, error.to_owned()));
    }

    /// Process requests normally again.
    pub fn accept(&self) {
        *self.state.refuse.lock().unwrap() = None;
    }

    /// Claims of every JWT accepted so far, in order.
    pub fn accepted(&self) -> Vec<Value> {
        self.state.accepted.lock().unwrap().clone()
    }
}

fn oauth_error(status: u16, error: &str, description: &str) -> Response {
    (
        StatusCode::from_u16(status).unwrap(),
        [("content-type", "application/json")],
        json!({"error": error, "error_description": description}).to_string(),
    )
        .into_response()
}

fn now() -> i64 {
    i64::try_from(std::time::UNIX_EPOCH.elapsed().unwrap().as_secs()).unwrap()
}

async fn token(State(s): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some((status, error)) = s.refuse.lock().unwrap().clone() {
        return oauth_error(status, &error, "refused by the test endpoint");
    }
    let expect = s.expect.lock().unwrap().clone();
    if let Some((name, want)) = expect.header {
        let got = headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !got.contains(want) {
            return oauth_error(400, "invalid_request", "a required header is missing");
        }
    }
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return oauth_error(400, "invalid_request", "the body must be JSON");
    };
    for (k, v) in &expect.fields {
        if body[*k] != v.as_str() {
            return oauth_error(400, "invalid_grant", "a required field is missing or wrong");
        }
    }
    let Some(jwt) = body[expect.jwt_field].as_str() else {
        return oauth_error(400, "invalid_request", "the JWT is missing");
    };
    let reject = |d: &str| oauth_error(400, "invalid_grant", d);
    let Ok(header) = jsonwebtoken::decode_header(jwt) else {
        return reject("not a JWT");
    };
    let jwks: jsonwebtoken::jwk::JwkSet = match reqwest::get(&expect.jwks_url).await {
        Ok(r) => r.json().await.unwrap(),
        Err(_) => return oauth_error(503, "temporarily_unavailable", "the JWKS is unreachable"),
    };
    let Some(jwk) = header.kid.as_deref().and_then(|k| jwks.find(k)) else {
        return reject("kid missing or unknown");
    };
    let mut v = jsonwebtoken::Validation::new(header.alg);
    v.set_issuer(&[expect.issuer.as_str()]);
    v.set_audience(&[expect.audience.as_str()]);
    v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    let Ok(data) =
        jsonwebtoken::decode::<Value>(jwt, &jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap(), &v)
    else {
        return reject("the JWT was rejected");
    };
    let claims = data.claims;
    if !claims["aud"].is_string() || !claims["iat"].is_i64() {
        return reject("one aud and an iat are required");
    }
    let Some(jti) = claims["jti"].as_str() else {
        return reject("a jti is required");
    };
    if !s.seen_jti.lock().unwrap().insert(jti.to_owned()) {
        return reject("jti already used");
    }
    let remaining = claims["exp"].as_i64().unwrap() - now();
    let lifetime = if expect.cap_by_jwt {
        60.max(expect.token_lifetime.min(2 * remaining))
    } else {
        expect.token_lifetime
    };
    s.accepted.lock().unwrap().push(claims);
    axum::Json(json!({
        "access_token": ACCESS_TOKEN,
        "token_type": "Bearer",
        "expires_in": lifetime,
    }))
    .into_response()
}
