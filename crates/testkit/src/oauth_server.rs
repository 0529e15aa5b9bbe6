//! A generic OAuth 2.0 authorization server on loopback for end-to-end tests of the
//! `oauth2` destination. Like a real one it:
//! - takes form bodies at its token endpoint and answers RFC 6749 §5.1 JSON or §5.2
//!   errors;
//! - authenticates the client (RFC 6749 §2.3.1 `client_secret_basic` /
//!   `client_secret_post`, or RFC 7523 §2.2 `private_key_jwt` checked against the
//!   client's JWKS over HTTP with `iss` = `sub` = the client ID and `aud` = the endpoint);
//! - verifies the grant's JWT (RFC 8693 `subject_token` or RFC 7523 `assertion`) against
//!   lanyard's JWKS fetched over HTTP: signature, `iss`, one `aud`, `exp`, `iat`, `sub`
//!   and a single-use `jti`;
//! - issues opaque access tokens it remembers, and revokes them at its RFC 7009
//!   endpoint (200 also for unknown tokens, §2.2), which needs the same client
//!   authentication.

// Handlers return the refusal itself as the error: a test server, not a hot path.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post;
use base64::Engine as _;
use serde_json::{Value, json};

use crate::token_endpoint::{Answer, json_response, now, verify_jwt};

/// How the client must authenticate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientCheck {
    /// A public client: no authentication; `client_id`, when given, must be sent.
    Public {
        /// The `client_id` the request must carry, if any.
        id: Option<String>,
    },
    /// `client_secret_basic` (`basic`) or `client_secret_post` with this ID and secret.
    Secret {
        /// Client ID.
        id: String,
        /// Client secret.
        secret: String,
        /// Whether the secret must come in `Authorization: Basic` (else in the body).
        basic: bool,
    },
    /// `private_key_jwt`: a client assertion signed by a key in the JWKS at `jwks_url`.
    PrivateKeyJwt {
        /// Client ID (`iss` and `sub` of the assertion).
        id: String,
    },
}

/// How the revocation endpoint answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeMode {
    /// Revoke and answer 200.
    Normal,
    /// 400 `unsupported_token_type`: this server does not revoke access tokens.
    Unsupported,
    /// 503: try again later (RFC 7009 §2.2.1).
    Unavailable,
}

/// What the server expects.
#[derive(Debug, Clone)]
pub struct Config {
    /// `token-exchange` (RFC 8693) or `jwt-bearer` (RFC 7523).
    pub grant_type: &'static str,
    /// The grant JWT's issuer (lanyard's issuer URL).
    pub issuer: String,
    /// lanyard's JWKS URL, fetched on every request.
    pub jwks_url: String,
    /// The grant JWT's one audience; empty means the token endpoint URL.
    pub audience: String,
    /// Client authentication.
    pub client: ClientCheck,
    /// Other body fields and their exact values (`scope`, `audience`, `resource`...).
    pub fields: BTreeMap<&'static str, String>,
    /// `expires_in` of issued tokens.
    pub token_lifetime: u64,
}

/// The running server.
pub struct OAuthServer {
    /// `http://127.0.0.1:<port>/token`.
    pub token_url: String,
    /// `http://127.0.0.1:<port>/revoke`.
    pub revocation_url: String,
    state: Arc<Inner>,
}

struct Inner {
    config: Mutex<Config>,
    token_url: Mutex<String>,
    revoke_mode: Mutex<RevokeMode>,
    answer: Mutex<Answer>,
    seen_jti: Mutex<HashSet<String>>,
    seen_client_jti: Mutex<HashSet<String>>,
    tokens: Mutex<HashMap<String, (bool, i64)>>,
    accepted: Mutex<Vec<Value>>,
    revocations: Mutex<Vec<String>>,
}

impl OAuthServer {
    /// Start it on a free loopback port.
    pub async fn start(config: Config) -> OAuthServer {
        let state = Arc::new(Inner {
            config: Mutex::new(config),
            token_url: Mutex::new(String::new()),
            revoke_mode: Mutex::new(RevokeMode::Normal),
            answer: Mutex::new(Answer::Normal),
            seen_jti: Mutex::new(HashSet::new()),
            seen_client_jti: Mutex::new(HashSet::new()),
            tokens: Mutex::new(HashMap::new()),
            accepted: Mutex::new(Vec::new()),
            revocations: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/token", post(token))
            .route("/revoke", post(revoke))
            .with_state(state.clone());
        let addr = crate::serve(app).await;
        let token_url = format!("http://{addr}/token");
        token_url.clone_into(&mut state.token_url.lock().unwrap());
        OAuthServer {
            token_url,
            revocation_url: format!("http://{addr}/revoke"),
            state,
        }
    }

    /// Change what is expected.
    pub fn configure(&self, f: impl FnOnce(&mut Config)) {
        f(&mut self.state.config.lock().unwrap());
    }

    /// Change how revocation answers.
    pub fn revoke_mode(&self, mode: RevokeMode) {
        *self.state.revoke_mode.lock().unwrap() = mode;
    }

    /// Answer every token request this way until told otherwise ([`Answer::Normal`]).
    pub fn answer(&self, answer: Answer) {
        *self.state.answer.lock().unwrap() = answer;
    }

    /// Whether `token` was issued here, is unexpired and not revoked.
    pub fn is_active(&self, token: &str) -> bool {
        self.state
            .tokens
            .lock()
            .unwrap()
            .get(token)
            .is_some_and(|(active, exp)| *active && *exp > now())
    }

    /// Claims of every grant JWT accepted so far, in order.
    pub fn accepted(&self) -> Vec<Value> {
        self.state.accepted.lock().unwrap().clone()
    }

    /// Tokens revoked at the revocation endpoint (including unknown ones), in order.
    pub fn revocations(&self) -> Vec<String> {
        self.state.revocations.lock().unwrap().clone()
    }
}

fn error(status: u16, code: &str, description: &str) -> Response {
    json_response(
        status,
        &json!({"error": code, "error_description": description}),
    )
}

fn form(headers: &HeaderMap, body: &Bytes) -> Result<HashMap<String, String>, Response> {
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("application/x-www-form-urlencoded") {
        return Err(error(
            400,
            "invalid_request",
            "the body must be application/x-www-form-urlencoded",
        ));
    }
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body)
        .map_err(|_| error(400, "invalid_request", "malformed form body"))?;
    let mut out = HashMap::new();
    for (k, v) in pairs {
        // RFC 6749 §3.2: parameters must not be included more than once.
        if out.insert(k, v).is_some() {
            return Err(error(400, "invalid_request", "a parameter is repeated"));
        }
    }
    Ok(out)
}

/// RFC 6749 §2.3.1 / RFC 7523 §2.2 client authentication.
async fn authenticate(
    state: &Inner,
    headers: &HeaderMap,
    f: &HashMap<String, String>,
    endpoint: &str,
) -> Result<(), Response> {
    let (client, jwks_url) = {
        let c = state.config.lock().unwrap();
        (c.client.clone(), c.jwks_url.clone())
    };
    let invalid = |d: &str| error(401, "invalid_client", d);
    let basic = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|raw| String::from_utf8(raw).ok())
        .and_then(|s| {
            let (id, secret) = s.split_once(':')?;
            let dec = |x: &str| form_urlencoded_decode(x);
            Some((dec(id)?, dec(secret)?))
        });
    match client {
        ClientCheck::Public { id: None } => Ok(()),
        ClientCheck::Public { id: Some(id) } => {
            if f.get("client_id") == Some(&id) {
                Ok(())
            } else {
                Err(invalid("client_id is required"))
            }
        }
        ClientCheck::Secret {
            id,
            secret,
            basic: want_basic,
        } => {
            let presented = match (basic, f.get("client_id"), f.get("client_secret")) {
                (Some(pair), None, None) if want_basic => pair,
                (None, Some(i), Some(s)) if !want_basic => (i.clone(), s.clone()),
                (Some(_), _, Some(_)) => {
                    return Err(error(
                        400,
                        "invalid_request",
                        "more than one client authentication method",
                    ));
                }
                _ => return Err(invalid("client authentication required")),
            };
            if presented != (id, secret) {
                return Err(invalid("client authentication failed"));
            }
            Ok(())
        }
        ClientCheck::PrivateKeyJwt { id } => {
            if f.get("client_assertion_type").map(String::as_str)
                != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
            {
                return Err(invalid("client_assertion_type jwt-bearer required"));
            }
            let assertion = f
                .get("client_assertion")
                .ok_or_else(|| invalid("client_assertion required"))?;
            let claims = verify_jwt(assertion, &jwks_url, &id, endpoint, &state.seen_client_jti)
                .await
                .map_err(|p| invalid(&format!("client assertion: {}", p.describe())))?;
            if claims["sub"] != id.as_str() {
                return Err(invalid("client assertion: sub must be the client id"));
            }
            if f.get("client_id").is_some_and(|c| *c != id) {
                return Err(invalid("client_id does not match the assertion"));
            }
            Ok(())
        }
    }
}

fn form_urlencoded_decode(s: &str) -> Option<String> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(&format!("x={s}")).ok()?;
    pairs.into_iter().next().map(|(_, v)| v)
}

async fn token(State(state): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> Response {
    let forced = state.answer.lock().unwrap().clone();
    if let Some(r) = forced.respond().await {
        return r;
    }
    let f = match form(&headers, &body) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let endpoint = state.token_url.lock().unwrap().clone();
    if let Err(r) = authenticate(&state, &headers, &f, &endpoint).await {
        return r;
    }
    let config = state.config.lock().unwrap().clone();
    let (grant, jwt_field) = match config.grant_type {
        "token-exchange" => (
            "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token",
        ),
        _ => ("urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion"),
    };
    match f.get("grant_type") {
        Some(g) if g == grant => {}
        Some(_) => return error(400, "unsupported_grant_type", "grant_type not supported"),
        None => return error(400, "invalid_request", "grant_type is required"),
    }
    if grant.ends_with("token-exchange")
        && f.get("subject_token_type").map(String::as_str)
            != Some("urn:ietf:params:oauth:token-type:jwt")
    {
        return error(400, "invalid_request", "subject_token_type must be jwt");
    }
    for (k, want) in &config.fields {
        match f.get(*k) {
            Some(v) if v == want => {}
            Some(_) if *k == "scope" => return error(400, "invalid_scope", "scope not allowed"),
            Some(_) => {
                return error(
                    400,
                    "invalid_request",
                    &format!("{k} is not the expected value"),
                );
            }
            None => return error(400, "invalid_request", &format!("{k} is required")),
        }
    }
    let Some(jwt) = f.get(jwt_field) else {
        return error(400, "invalid_request", &format!("{jwt_field} is required"));
    };
    let audience = if config.audience.is_empty() {
        endpoint
    } else {
        config.audience.clone()
    };
    let claims = match verify_jwt(
        jwt,
        &config.jwks_url,
        &config.issuer,
        &audience,
        &state.seen_jti,
    )
    .await
    {
        Ok(c) => c,
        Err(p) => return error(400, "invalid_grant", p.describe()),
    };
    state.accepted.lock().unwrap().push(claims);
    let access = format!("at-{}", uuid::Uuid::new_v4().simple());
    let lifetime = i64::try_from(config.token_lifetime).unwrap();
    state
        .tokens
        .lock()
        .unwrap()
        .insert(access.clone(), (true, now() + lifetime));
    let mut out = json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": config.token_lifetime,
    });
    if grant.ends_with("token-exchange") {
        out["issued_token_type"] = json!("urn:ietf:params:oauth:token-type:access_token");
    }
    json_response(200, &out)
}

async fn revoke(State(state): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> Response {
    let f = match form(&headers, &body) {
        Ok(f) => f,
        Err(r) => return r,
    };
    // A client assertion names the token endpoint as its audience (RFC 7523 §3), also
    // when it authenticates a revocation.
    let endpoint = state.token_url.lock().unwrap().clone();
    if let Err(r) = authenticate(&state, &headers, &f, &endpoint).await {
        return r;
    }
    let Some(token) = f.get("token") else {
        return error(400, "invalid_request", "token is required");
    };
    match *state.revoke_mode.lock().unwrap() {
        RevokeMode::Normal => {}
        RevokeMode::Unsupported => {
            return error(
                400,
                "unsupported_token_type",
                "this server does not revoke access tokens",
            );
        }
        RevokeMode::Unavailable => {
            return error(503, "temporarily_unavailable", "try again later");
        }
    }
    if let Some(entry) = state.tokens.lock().unwrap().get_mut(token) {
        entry.0 = false;
    }
    state.revocations.lock().unwrap().push(token.clone());
    json_response(200, &json!({}))
}
