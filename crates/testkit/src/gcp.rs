//! Google's Security Token Service and IAM Credentials API on loopback, for tests of the
//! `gcp-sts` destination (PROTOCOLS.md §4.1, §4.2).
//!
//! - `POST /v1/token` takes the JSON camelCase token exchange, refuses an
//!   `Authorization` header, checks `grantType`, `requestedTokenType`,
//!   `subjectTokenType`, `audience` (the pool provider) and `scope`, and verifies the
//!   subject token as a workload identity pool provider does: signature against the
//!   issuer's JWKS fetched over HTTP, `iss`, one `aud` (an allowed audience), `exp`,
//!   `iat`, `sub` (at most 127 bytes, the `google.subject` limit) and a single-use
//!   `jti`. It answers `{access_token, issued_token_type, token_type, expires_in}` with a
//!   federated token it remembers, or an OAuth error (`invalid_grant`, `invalid_target`,
//!   `invalid_request`, `unsupported_grant_type`).
//! - `POST /v1/projects/-/serviceAccounts/<email>:generateAccessToken` requires
//!   `Authorization: Bearer <a federated token it issued, unexpired>`, the one service
//!   account the workload may impersonate, `scope` (non-empty list), `lifetime`
//!   (`<N>s`, 1..=the maximum) and `delegates`; it answers `{accessToken, expireTime}`
//!   or Google's `{"error": {"code", "message", "status"}}` (`UNAUTHENTICATED`,
//!   `PERMISSION_DENIED`, `INVALID_ARGUMENT`, `NOT_FOUND`).
//!
//! Either endpoint can be told to answer something else ([`Answer`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

use crate::token_endpoint::{Answer, JwtProblem, json_response, now, unverified_jti, verify_jwt};

const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
const JWT_TYPES: &[&str] = &[
    "urn:ietf:params:oauth:token-type:jwt",
    "urn:ietf:params:oauth:token-type:id_token",
];

/// What the fake Google expects.
#[derive(Debug, Clone)]
pub struct GcpExpect {
    /// The pool provider's full resource name (`//iam.googleapis.com/projects/...`).
    pub audience: String,
    /// The subject token's one allowed `aud`.
    pub subject_audience: String,
    /// The provider's issuer (lanyard's issuer URL).
    pub issuer: String,
    /// The issuer's JWKS URL, fetched on every exchange.
    pub jwks_url: String,
    /// The only `sub` the attribute condition admits; `None`: any.
    pub subject: Option<String>,
    /// The service account the workload may impersonate.
    pub service_account: String,
    /// The federated token's `expires_in`.
    pub federated_lifetime: i64,
    /// The longest `lifetime` `generateAccessToken` accepts (3600, or up to 43200 with
    /// the org policy).
    pub max_lifetime: i64,
}

impl GcpExpect {
    /// Expectations for `audience` (subject audience `https:` + it) and service account
    /// `sa`; issuer and JWKS URL to be filled in once lanyard runs.
    pub fn new(audience: &str, sa: &str) -> GcpExpect {
        GcpExpect {
            audience: audience.to_owned(),
            subject_audience: format!("https:{audience}"),
            issuer: String::new(),
            jwks_url: String::new(),
            subject: None,
            service_account: sa.to_owned(),
            federated_lifetime: 3600,
            max_lifetime: 3600,
        }
    }
}

/// The running fake.
pub struct FakeGcp {
    /// `http://127.0.0.1:<port>/v1/token`.
    pub sts_url: String,
    /// `http://127.0.0.1:<port>`: the `iam_credentials_url`.
    pub iam_url: String,
    state: Arc<Inner>,
}

struct Inner {
    expect: Mutex<GcpExpect>,
    sts_answer: Mutex<Answer>,
    iam_answer: Mutex<Answer>,
    seen_jti: Mutex<HashSet<String>>,
    /// Federated token → expiry.
    federated: Mutex<HashMap<String, i64>>,
    accepted: Mutex<Vec<Value>>,
    sts_requests: Mutex<Vec<Value>>,
    generated: Mutex<Vec<Value>>,
}

/// The prefix of every federated token.
pub const FEDERATED_PREFIX: &str = "ya29.fed-";
/// The prefix of every service-account token.
pub const SA_TOKEN_PREFIX: &str = "ya29.sa-";

impl FakeGcp {
    /// Start both APIs on one free loopback port.
    pub async fn start(expect: GcpExpect) -> FakeGcp {
        let state = Arc::new(Inner {
            expect: Mutex::new(expect),
            sts_answer: Mutex::new(Answer::Normal),
            iam_answer: Mutex::new(Answer::Normal),
            seen_jti: Mutex::new(HashSet::new()),
            federated: Mutex::new(HashMap::new()),
            accepted: Mutex::new(Vec::new()),
            sts_requests: Mutex::new(Vec::new()),
            generated: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/v1/token", post(sts))
            .route("/v1/projects/-/serviceAccounts/{name}", post(generate))
            .with_state(state.clone());
        let addr = crate::serve(app).await;
        FakeGcp {
            sts_url: format!("http://{addr}/v1/token"),
            iam_url: format!("http://{addr}"),
            state,
        }
    }

    /// Change what is expected.
    pub fn expect(&self, f: impl FnOnce(&mut GcpExpect)) {
        f(&mut self.state.expect.lock().unwrap());
    }

    /// Make STS answer this way until [`Answer::Normal`].
    pub fn sts_answer(&self, a: Answer) {
        *self.state.sts_answer.lock().unwrap() = a;
    }

    /// Make `generateAccessToken` answer this way until [`Answer::Normal`].
    pub fn iam_answer(&self, a: Answer) {
        *self.state.iam_answer.lock().unwrap() = a;
    }

    /// Claims of every subject token STS accepted, in order.
    pub fn accepted(&self) -> Vec<Value> {
        self.state.accepted.lock().unwrap().clone()
    }

    /// Every JSON STS request body received (answers from [`Answer`] included), the
    /// subject token replaced by its `jti` (`subjectTokenJti`).
    pub fn sts_requests(&self) -> Vec<Value> {
        self.state.sts_requests.lock().unwrap().clone()
    }

    /// Every successful `generateAccessToken`: `{service_account, body}`.
    pub fn generated(&self) -> Vec<Value> {
        self.state.generated.lock().unwrap().clone()
    }
}

/// STS's OAuth-style error.
pub fn sts_error(status: u16, error: &str, description: &str) -> Response {
    crate::token_endpoint::oauth_error(status, error, description)
}

/// Google's API error body.
pub fn google_error_body(code: u16, status: &str, message: &str) -> Value {
    json!({"error": {"code": code, "message": message, "status": status}})
}

fn google_error(code: u16, status: &str, message: &str) -> Response {
    json_response(code, &google_error_body(code, status, message))
}

async fn sts(State(s): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Ok(mut logged) = serde_json::from_slice::<Value>(&body) {
        if let Some(o) = logged.as_object_mut()
            && let Some(Value::String(jwt)) = o.remove("subjectToken")
        {
            o.insert(
                "subjectTokenJti".into(),
                Value::String(unverified_jti(&jwt)),
            );
        }
        s.sts_requests.lock().unwrap().push(logged);
    }
    let answer = s.sts_answer.lock().unwrap().clone();
    if let Some(r) = answer.respond().await {
        return r;
    }
    if headers.contains_key("authorization") {
        return sts_error(
            400,
            "invalid_request",
            "the token exchange takes no Authorization header",
        );
    }
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return sts_error(400, "invalid_request", "Invalid JSON payload received.");
    };
    let expect = s.expect.lock().unwrap().clone();
    if body["grantType"] != TOKEN_EXCHANGE {
        return sts_error(
            400,
            "unsupported_grant_type",
            "Invalid value for grant_type.",
        );
    }
    if body["requestedTokenType"] != ACCESS_TOKEN_TYPE {
        return sts_error(
            400,
            "invalid_request",
            "Invalid value for requested_token_type.",
        );
    }
    if !body["subjectTokenType"]
        .as_str()
        .is_some_and(|t| JWT_TYPES.contains(&t))
    {
        return sts_error(
            400,
            "invalid_request",
            "Invalid value for subject_token_type.",
        );
    }
    if body["audience"] != expect.audience.as_str() {
        return sts_error(
            400,
            "invalid_target",
            "The target service indicated by the \"audience\" parameters is invalid.",
        );
    }
    if body["scope"].as_str().is_none_or(|s| s.trim().is_empty()) {
        return sts_error(400, "invalid_scope", "A scope is required.");
    }
    let Some(jwt) = body["subjectToken"].as_str() else {
        return sts_error(400, "invalid_request", "subject_token is required.");
    };
    let claims = match verify_jwt(
        jwt,
        &expect.jwks_url,
        &expect.issuer,
        &expect.subject_audience,
        &s.seen_jti,
    )
    .await
    {
        Ok(c) => c,
        Err(JwtProblem::JwksUnreachable) => {
            return sts_error(503, "temporarily_unavailable", "Unable to fetch the JWKS.");
        }
        Err(JwtProblem::Audience | JwtProblem::NotOneAudience) => {
            return sts_error(
                400,
                "invalid_grant",
                "The audience in ID Token does not match the expected audience.",
            );
        }
        Err(JwtProblem::Expired) => {
            return sts_error(400, "invalid_grant", "The ID Token has expired.");
        }
        Err(p) => return sts_error(400, "invalid_grant", p.describe()),
    };
    let sub = claims["sub"].as_str().unwrap_or_default();
    if sub.len() > 127 {
        return sts_error(
            400,
            "invalid_grant",
            "The mapped attribute 'google.subject' exceeds the 127 byte limit.",
        );
    }
    if let Some(want) = &expect.subject
        && sub != want
    {
        return sts_error(
            400,
            "unauthorized_client",
            "The given credential is rejected by the attribute condition.",
        );
    }
    s.accepted.lock().unwrap().push(claims);
    let token = format!("{FEDERATED_PREFIX}{}", uuid::Uuid::new_v4().simple());
    s.federated
        .lock()
        .unwrap()
        .insert(token.clone(), now() + expect.federated_lifetime);
    axum::Json(json!({
        "access_token": token,
        "issued_token_type": ACCESS_TOKEN_TYPE,
        "token_type": "Bearer",
        "expires_in": expect.federated_lifetime,
    }))
    .into_response()
}

async fn generate(
    State(s): State<Arc<Inner>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let answer = s.iam_answer.lock().unwrap().clone();
    if let Some(r) = answer.respond().await {
        return r;
    }
    let Some((account, "generateAccessToken")) = name.split_once(':') else {
        return google_error(404, "NOT_FOUND", "Method not found.");
    };
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let valid = s
        .federated
        .lock()
        .unwrap()
        .get(token)
        .is_some_and(|exp| *exp > now());
    if !valid {
        return google_error(
            401,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential.",
        );
    }
    let expect = s.expect.lock().unwrap().clone();
    if account != expect.service_account {
        return google_error(
            403,
            "PERMISSION_DENIED",
            "Permission 'iam.serviceAccounts.getAccessToken' denied on resource (or it may not exist).",
        );
    }
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return google_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.");
    };
    let scopes_ok = body["scope"].as_array().is_some_and(|a| {
        !a.is_empty() && a.iter().all(|s| s.as_str().is_some_and(|s| !s.is_empty()))
    });
    if !scopes_ok {
        return google_error(400, "INVALID_ARGUMENT", "Scope required.");
    }
    let lifetime = body["lifetime"]
        .as_str()
        .and_then(|l| l.strip_suffix('s'))
        .and_then(|n| n.parse::<i64>().ok());
    let Some(lifetime) = lifetime.filter(|l| (1..=expect.max_lifetime).contains(l)) else {
        return google_error(
            400,
            "INVALID_ARGUMENT",
            "The lifetime must be a number of seconds followed by 's', within the allowed maximum.",
        );
    };
    let delegates_ok = match &body["delegates"] {
        Value::Null => true,
        Value::Array(a) => a.iter().all(|d| {
            d.as_str()
                .is_some_and(|d| d.starts_with("projects/-/serviceAccounts/"))
        }),
        _ => false,
    };
    if !delegates_ok {
        return google_error(400, "INVALID_ARGUMENT", "Invalid delegates.");
    }
    s.generated
        .lock()
        .unwrap()
        .push(json!({"service_account": account, "body": body}));
    let expire = chrono::DateTime::from_timestamp(now() + lifetime, 0)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    axum::Json(json!({
        "accessToken": format!("{SA_TOKEN_PREFIX}{}", uuid::Uuid::new_v4().simple()),
        "expireTime": expire,
    }))
    .into_response()
}
