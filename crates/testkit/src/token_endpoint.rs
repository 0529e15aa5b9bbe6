//! A federation token endpoint on loopback for end-to-end tests of the destinations that
//! exchange a lanyard-signed JWT for an access token (Claude's RFC 7523 jwt-bearer,
//! OpenAI's RFC 8693 exchange, Entra ID's client credentials with an RFC 7523 §2.2
//! client assertion). Like the real services it fetches the issuer's JWKS over HTTP
//! (lanyard's `/.well-known/jwks.json`), verifies the JWT's signature, `iss`, single
//! `aud`, `exp`, `sub` and single-use `jti`, checks the body fields and headers the
//! protocol requires, and answers RFC 6749 §5.1 JSON or an error in the service's shape:
//! RFC 6749 §5.2 (`{"error", "error_description"}`) by default, Entra ID's
//! (`{"error", "error_description": "AADSTS<n>: ...", "error_codes": [n], "trace_id",
//! "correlation_id", ...}`) when started with [`TokenEndpoint::start_entra`].
//!
//! A test can make it answer something else instead ([`Answer`]): a given error body,
//! a malformed or oversized answer, or no answer at all (the client times out; nothing
//! sleeps).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Map, Value, json};

/// What the endpoint expects.
#[derive(Debug, Clone)]
pub struct Expect {
    /// Where the JWT is in the body (`assertion`, `subject_token`, `client_assertion`).
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

/// What to answer instead of processing a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Process requests normally.
    Normal,
    /// This status and JSON body.
    Json(u16, Value),
    /// This status and body, as `application/json` whatever it holds.
    Raw(u16, String),
    /// Accept the request and never answer: the client's timeout fires.
    Hang,
}

impl Answer {
    /// A 200 whose body is `n` bytes of a JSON string: larger than any sane cap.
    pub fn oversized(n: usize) -> Answer {
        Answer::Raw(200, format!("\"{}\"", "x".repeat(n)))
    }

    /// The response, or `None` for [`Answer::Normal`]. [`Answer::Hang`] never resolves.
    pub(crate) async fn respond(&self) -> Option<Response> {
        match self {
            Answer::Normal => None,
            Answer::Json(status, body) => Some(json_response(*status, body)),
            Answer::Raw(status, body) => Some(
                (
                    StatusCode::from_u16(*status).unwrap(),
                    [("content-type", "application/json")],
                    body.clone(),
                )
                    .into_response(),
            ),
            Answer::Hang => {
                std::future::pending::<()>().await;
                None
            }
        }
    }
}

/// Which service's conventions the endpoint follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    /// JSON body, RFC 6749 §5.2 errors.
    OAuth,
    /// Form body, Entra ID errors with AADSTS codes.
    Entra,
}

/// The running endpoint.
pub struct TokenEndpoint {
    /// `http://127.0.0.1:<port>/oauth/token` (`.../<tenant>/oauth2/v2.0/token` for Entra).
    pub url: String,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    state: Arc<Inner>,
}

struct Inner {
    dialect: Dialect,
    expect: Mutex<Expect>,
    subject: Mutex<Option<String>>,
    refuse: Mutex<Option<(u16, String)>>,
    answer: Mutex<Answer>,
    seen_jti: Mutex<HashSet<String>>,
    accepted: Mutex<Vec<Value>>,
    received: Mutex<Vec<String>>,
}

/// The access token every success answers.
pub const ACCESS_TOKEN: &str = "test-access-token-from-the-fake-endpoint";

impl TokenEndpoint {
    /// Start it on a free loopback port: JSON bodies, OAuth errors.
    pub async fn start(expect: Expect) -> TokenEndpoint {
        Self::start_with(expect, Dialect::OAuth, "/oauth/token".into()).await
    }

    /// Start it as Entra ID's token endpoint for `tenant`
    /// (`/<tenant>/oauth2/v2.0/token`): form bodies, Entra errors. Put `client_id`,
    /// `scope`, `grant_type` and `client_assertion_type` in `expect.fields` and
    /// `client_assertion` in `expect.jwt_field`. [`TokenEndpoint::base`] is the
    /// `authority_host`.
    pub async fn start_entra(expect: Expect, tenant: &str) -> TokenEndpoint {
        Self::start_with(
            expect,
            Dialect::Entra,
            format!("/{tenant}/oauth2/v2.0/token"),
        )
        .await
    }

    async fn start_with(expect: Expect, dialect: Dialect, path: String) -> TokenEndpoint {
        let state = Arc::new(Inner {
            dialect,
            expect: Mutex::new(expect),
            subject: Mutex::new(None),
            refuse: Mutex::new(None),
            answer: Mutex::new(Answer::Normal),
            seen_jti: Mutex::new(HashSet::new()),
            accepted: Mutex::new(Vec::new()),
            received: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route(&path, post(token))
            .with_state(state.clone());
        let addr = crate::serve(app).await;
        TokenEndpoint {
            url: format!("http://{addr}{path}"),
            base: format!("http://{addr}"),
            state,
        }
    }

    /// Change what is expected (e.g. the JWKS URL once lanyard has started).
    pub fn expect(&self, f: impl FnOnce(&mut Expect)) {
        f(&mut self.state.expect.lock().unwrap());
    }

    /// Require the JWT's `sub` to be exactly this (a federated identity credential's
    /// `subject`); `None`: any.
    pub fn expect_subject(&self, subject: Option<&str>) {
        *self.state.subject.lock().unwrap() = subject.map(str::to_owned);
    }

    /// Answer every request with this OAuth error until [`TokenEndpoint::accept`].
    pub fn refuse(&self, status: u16, error: &str) {
        *self.state.refuse.lock().unwrap() = Some((status, error.to_owned()));
    }

    /// Answer every request this way until told otherwise ([`Answer::Normal`]).
    pub fn answer(&self, answer: Answer) {
        *self.state.answer.lock().unwrap() = answer;
    }

    /// Process requests normally again.
    pub fn accept(&self) {
        *self.state.refuse.lock().unwrap() = None;
        *self.state.answer.lock().unwrap() = Answer::Normal;
    }

    /// Claims of every JWT accepted so far, in order.
    pub fn accepted(&self) -> Vec<Value> {
        self.state.accepted.lock().unwrap().clone()
    }

    /// The `jti` of every JWT received, accepted or not (answers from [`Answer`]
    /// included), in order; `""` for a JWT without one.
    pub fn received_jtis(&self) -> Vec<String> {
        self.state.received.lock().unwrap().clone()
    }
}

/// The `jti` of a JWT, read without verifying it.
pub(crate) fn unverified_jti(jwt: &str) -> String {
    use base64::Engine;
    jwt.split('.')
        .nth(1)
        .and_then(|p| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p)
                .ok()
        })
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|c| c["jti"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

pub(crate) fn json_response(status: u16, body: &Value) -> Response {
    (
        StatusCode::from_u16(status).unwrap(),
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// An RFC 6749 §5.2 error answer: `{"error", "error_description"}`.
pub fn oauth_error(status: u16, error: &str, description: &str) -> Response {
    json_response(
        status,
        &json!({"error": error, "error_description": description}),
    )
}

/// Entra ID's error shape: the description starts with the AADSTS code and ends with
/// the trace and correlation IDs, which are repeated as fields.
pub fn entra_error(status: u16, error: &str, code: u32, description: &str) -> Response {
    json_response(status, &entra_error_body(error, code, description))
}

/// The body of [`entra_error`].
pub fn entra_error_body(error: &str, code: u32, description: &str) -> Value {
    let trace = uuid::Uuid::new_v4().to_string();
    let correlation = uuid::Uuid::new_v4().to_string();
    let timestamp = "2026-11-24 03:00:00Z";
    json!({
        "error": error,
        "error_description": format!(
            "AADSTS{code}: {description} Trace ID: {trace} Correlation ID: {correlation} Timestamp: {timestamp}"
        ),
        "error_codes": [code],
        "timestamp": timestamp,
        "trace_id": trace,
        "correlation_id": correlation,
        "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
    })
}

pub(crate) fn now() -> i64 {
    i64::try_from(std::time::UNIX_EPOCH.elapsed().unwrap().as_secs()).unwrap()
}

// === JWT checks shared by the fakes ===

/// Why a JWT was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JwtProblem {
    NotJwt,
    JwksUnreachable,
    UnknownKid,
    BadSignature,
    Expired,
    Issuer,
    Audience,
    NotOneAudience,
    NoIat,
    NoSub,
    NoJti,
    Replayed,
}

impl JwtProblem {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            JwtProblem::NotJwt => "not a JWT",
            JwtProblem::JwksUnreachable => "the JWKS is unreachable",
            JwtProblem::UnknownKid => "kid missing or unknown",
            JwtProblem::BadSignature => "the JWT's signature is invalid",
            JwtProblem::Expired => "the JWT has expired",
            JwtProblem::Issuer => "the JWT's issuer is not the expected one",
            JwtProblem::Audience => "the JWT's audience is not the expected one",
            JwtProblem::NotOneAudience => "one aud is required",
            JwtProblem::NoIat => "an iat is required",
            JwtProblem::NoSub => "a sub is required",
            JwtProblem::NoJti => "a jti is required",
            JwtProblem::Replayed => "jti already used",
        }
    }
}

/// Verify `jwt` with the JWKS at `jwks_url` (fetched now), then its `iss`, its one
/// `aud`, `exp` (no leeway), `iat`, `sub` and an unused `jti` (recorded in `seen`).
pub(crate) async fn verify_jwt(
    jwt: &str,
    jwks_url: &str,
    issuer: &str,
    audience: &str,
    seen: &Mutex<HashSet<String>>,
) -> Result<Value, JwtProblem> {
    let header = jsonwebtoken::decode_header(jwt).map_err(|_| JwtProblem::NotJwt)?;
    let jwks: jsonwebtoken::jwk::JwkSet = match reqwest::get(jwks_url).await {
        Ok(r) => r.json().await.map_err(|_| JwtProblem::JwksUnreachable)?,
        Err(_) => return Err(JwtProblem::JwksUnreachable),
    };
    let jwk = header
        .kid
        .as_deref()
        .and_then(|k| jwks.find(k))
        .ok_or(JwtProblem::UnknownKid)?;
    let mut v = jsonwebtoken::Validation::new(header.alg);
    v.validate_aud = false;
    v.leeway = 0;
    v.set_required_spec_claims(&["exp"]);
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).map_err(|_| JwtProblem::UnknownKid)?;
    let claims = match jsonwebtoken::decode::<Value>(jwt, &key, &v) {
        Ok(d) => d.claims,
        Err(e) if *e.kind() == jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
            return Err(JwtProblem::Expired);
        }
        Err(_) => return Err(JwtProblem::BadSignature),
    };
    if claims["iss"] != issuer {
        return Err(JwtProblem::Issuer);
    }
    match &claims["aud"] {
        Value::String(a) if a == audience => {}
        Value::String(_) => return Err(JwtProblem::Audience),
        _ => return Err(JwtProblem::NotOneAudience),
    }
    if !claims["iat"].is_i64() {
        return Err(JwtProblem::NoIat);
    }
    if claims["sub"].as_str().is_none_or(str::is_empty) {
        return Err(JwtProblem::NoSub);
    }
    let jti = claims["jti"].as_str().ok_or(JwtProblem::NoJti)?;
    if !seen.lock().unwrap().insert(jti.to_owned()) {
        return Err(JwtProblem::Replayed);
    }
    Ok(claims)
}

// === the handler ===

/// A refusal in the dialect's shape: OAuth status + code, and the Entra code for it.
fn fail(dialect: Dialect, status: u16, error: &str, aadsts: u32, description: &str) -> Response {
    match dialect {
        Dialect::OAuth => oauth_error(status, error, description),
        Dialect::Entra => entra_error(status, error, aadsts, description),
    }
}

/// The AADSTS code, OAuth code and status Entra uses for a JWT problem. Codes 700211,
/// 700212, 700213 (no matching federated identity record for the issuer, audience,
/// subject), 700024 (assertion not within its valid time range) and 700027 (signature
/// validation failed) are Entra's; Entra's code for a replayed `jti` was not found in
/// the sources read, so 50027 (invalid JWT) stands in.
fn entra_jwt_code(p: JwtProblem) -> (u16, &'static str, u32) {
    match p {
        JwtProblem::JwksUnreachable => (503, "temporarily_unavailable", 50166),
        JwtProblem::Issuer => (400, "invalid_client", 700211),
        JwtProblem::Audience | JwtProblem::NotOneAudience => (400, "invalid_client", 700212),
        JwtProblem::Expired => (400, "invalid_client", 700024),
        JwtProblem::BadSignature | JwtProblem::UnknownKid => (401, "invalid_client", 700027),
        JwtProblem::NotJwt
        | JwtProblem::NoIat
        | JwtProblem::NoSub
        | JwtProblem::NoJti
        | JwtProblem::Replayed => (400, "invalid_client", 50027),
    }
}

/// Parse a form body into a JSON object of strings; a repeated field is an error.
fn form_body(body: &[u8]) -> Option<Map<String, Value>> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body).ok()?;
    let mut out = Map::new();
    for (k, v) in pairs {
        if out.insert(k, Value::String(v)).is_some() {
            return None;
        }
    }
    Some(out)
}

async fn token(State(s): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> Response {
    let d = s.dialect;
    let jwt_field = s.expect.lock().unwrap().jwt_field;
    let parsed = match d {
        Dialect::OAuth => serde_json::from_slice::<Value>(&body).ok(),
        Dialect::Entra => form_body(&body).map(Value::Object),
    };
    if let Some(jwt) = parsed.as_ref().and_then(|b| b[jwt_field].as_str()) {
        s.received.lock().unwrap().push(unverified_jti(jwt));
    }
    let answer = s.answer.lock().unwrap().clone();
    if let Some(r) = answer.respond().await {
        return r;
    }
    if let Some((status, error)) = s.refuse.lock().unwrap().clone() {
        return fail(d, status, &error, 50000, "refused by the test endpoint");
    }
    let expect = s.expect.lock().unwrap().clone();
    if let Some((name, want)) = expect.header {
        let got = headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !got.contains(want) {
            return fail(
                d,
                400,
                "invalid_request",
                900144,
                "a required header is missing",
            );
        }
    }
    let body = match d {
        Dialect::OAuth => serde_json::from_slice::<Value>(&body).ok(),
        Dialect::Entra => {
            let form = headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
            if form {
                form_body(&body).map(Value::Object)
            } else {
                None
            }
        }
    };
    let Some(body) = body else {
        return fail(
            d,
            400,
            "invalid_request",
            900144,
            "the body must be JSON (form-encoded for Entra)",
        );
    };
    for (k, v) in &expect.fields {
        if body[*k] != v.as_str() {
            let (error, code) = match (d, *k) {
                (Dialect::Entra, "client_id") => ("unauthorized_client", 700016),
                (Dialect::Entra, "scope") => ("invalid_scope", 70011),
                (Dialect::Entra, "grant_type") => ("unsupported_grant_type", 70003),
                _ => ("invalid_grant", 900144),
            };
            return fail(d, 400, error, code, "a required field is missing or wrong");
        }
    }
    let Some(jwt) = body[expect.jwt_field].as_str() else {
        return fail(d, 400, "invalid_request", 900144, "the JWT is missing");
    };
    let claims = match verify_jwt(
        jwt,
        &expect.jwks_url,
        &expect.issuer,
        &expect.audience,
        &s.seen_jti,
    )
    .await
    {
        Ok(c) => c,
        Err(p) => {
            return match (d, p) {
                (Dialect::OAuth, JwtProblem::JwksUnreachable) => {
                    oauth_error(503, "temporarily_unavailable", p.describe())
                }
                (Dialect::OAuth, _) => oauth_error(400, "invalid_grant", p.describe()),
                (Dialect::Entra, _) => {
                    let (status, error, code) = entra_jwt_code(p);
                    entra_error(status, error, code, p.describe())
                }
            };
        }
    };
    if let Some(want) = s.subject.lock().unwrap().clone()
        && claims["sub"] != want.as_str()
    {
        return fail(
            d,
            400,
            "invalid_client",
            700213,
            "No matching federated identity record found for presented assertion subject.",
        );
    }
    let remaining = claims["exp"].as_i64().unwrap() - now();
    let lifetime = if expect.cap_by_jwt {
        60.max(expect.token_lifetime.min(2 * remaining))
    } else {
        expect.token_lifetime
    };
    s.accepted.lock().unwrap().push(claims);
    let mut answer = json!({
        "access_token": ACCESS_TOKEN,
        "token_type": "Bearer",
        "expires_in": lifetime,
    });
    if d == Dialect::Entra {
        answer["ext_expires_in"] = json!(lifetime);
    }
    axum::Json(answer).into_response()
}

/// Serve `jwks` at `http://127.0.0.1:<port>/jwks.json` (for adapter tests that run
/// without a lanyard); the URL.
pub async fn serve_jwks(jwks: Value) -> String {
    let app = Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let jwks = jwks.clone();
            async move { axum::Json(jwks) }
        }),
    );
    let addr = crate::serve(app).await;
    format!("http://{addr}/jwks.json")
}
