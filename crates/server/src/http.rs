//! The HTTP side: lanyard's OIDC discovery document and JWKS (so destinations can trust
//! lanyard as an issuer), RFC 7662 introspection of lanyard's own tokens, health,
//! Prometheus metrics, and in `--dev` mode the development issuer.

use std::sync::Arc;

use axum::extract::rejection::FormRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use lanyard_core::Secret;
use serde::Deserialize;
use serde_json::json;

use crate::dev::DevIssuer;
use crate::error::{ApiError, code_for};
use crate::metrics::IntrospectionResult;
use crate::runtime::Runtime;

/// Largest introspection request body; a larger one is answered 413.
pub const MAX_INTROSPECTION_BODY: usize = 64 * 1024;

/// State shared by the HTTP handlers.
#[derive(Clone)]
pub struct HttpState {
    /// The runtime.
    pub rt: Arc<Runtime>,
    /// lanyard's issuer URL.
    pub issuer_url: String,
    /// The development issuer, in `--dev` mode.
    pub dev: Option<Arc<DevIssuer>>,
}

/// The HTTP router.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/.well-known/jwks.json", get(jwks))
        .route(
            lanyard_keys::INTROSPECTION_PATH,
            post(introspect).layer(DefaultBodyLimit::max(MAX_INTROSPECTION_BODY)),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route(
            "/dev-issuer/.well-known/openid-configuration",
            get(dev_discovery),
        )
        .route("/dev-issuer/jwks.json", get(dev_jwks))
        .with_state(state)
}

fn cached_json(v: serde_json::Value, max_age: u32) -> Response {
    (
        [(header::CACHE_CONTROL, format!("public, max-age={max_age}"))],
        Json(v),
    )
        .into_response()
}

async fn discovery(State(s): State<HttpState>) -> Response {
    cached_json(
        lanyard_keys::discovery_document(&s.issuer_url, &s.rt.keys.published_algorithms()),
        300,
    )
}

async fn jwks(State(s): State<HttpState>) -> Response {
    // Short cache: a rotated key must reach relying parties before it signs.
    cached_json(s.rt.keys.jwks(), 60)
}

/// The RFC 7662 request body. Other parameters, `token_type_hint` among them, are
/// ignored: lanyard introspects only its own access tokens.
#[derive(Deserialize)]
struct IntrospectForm {
    token: Option<String>,
}

/// `POST /oauth2/introspect`: `Authorization: Bearer <the caller's platform token>`,
/// form body `token=<a lanyard access token>`. Answers the [`Introspection`] as JSON,
/// never cached.
///
/// [`Introspection`]: crate::introspect::Introspection
async fn introspect(
    State(s): State<HttpState>,
    headers: HeaderMap,
    form: Result<Form<IntrospectForm>, FormRejection>,
) -> Response {
    let Some(client_token) = bearer_token(&headers) else {
        s.rt.metrics
            .introspection(IntrospectionResult::Unauthorized);
        // RFC 6750 §3.1: no error code in the challenge when no credentials were sent.
        return no_store(
            StatusCode::UNAUTHORIZED,
            json!({
                "error": "invalid_token",
                "error_description": "client authentication is required: Authorization: Bearer <your own platform token>",
            }),
            Some(r#"Bearer realm="lanyard""#),
        );
    };
    let form = match form {
        Ok(Form(f)) => f,
        Err(rejection) => {
            let status = match rejection.status() {
                s @ (StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNSUPPORTED_MEDIA_TYPE) => s,
                _ => StatusCode::BAD_REQUEST,
            };
            return no_store(
                status,
                json!({"error": "invalid_request", "error_description": rejection.body_text()}),
                None,
            );
        }
    };
    let Some(token) = form.token.filter(|t| !t.is_empty()) else {
        return no_store(
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid_request", "error_description": "the token parameter is required"}),
            None,
        );
    };
    match crate::introspect::introspect(&s.rt, &client_token, &token).await {
        Ok(answer) => match serde_json::to_value(&answer) {
            Ok(v) => no_store(StatusCode::OK, v, None),
            Err(e) => api_error(ApiError::internal(&e)),
        },
        Err(e) => api_error(e),
    }
}

/// The credentials of `Authorization: Bearer <token>` (one header, scheme compared
/// case-insensitively, RFC 7235).
fn bearer_token(headers: &HeaderMap) -> Option<Secret> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return None;
    };
    let (scheme, token) = value.to_str().ok()?.split_once(' ')?;
    let token = token.trim_matches(' ');
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty())
        .then(|| Secret::new(token.to_owned()))
}

/// An introspection error: the caller's token refused (401, RFC 6750 `invalid_token`),
/// lanyard unable to answer (503), or an internal error (500).
fn api_error(e: ApiError) -> Response {
    use tonic::Code;
    let (status, error, challenge) = match code_for(e.reason) {
        Code::Unauthenticated | Code::PermissionDenied => (
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            Some(r#"Bearer realm="lanyard", error="invalid_token""#),
        ),
        Code::InvalidArgument => (StatusCode::BAD_REQUEST, "invalid_request", None),
        Code::Unavailable => (
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            None,
        ),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
    };
    no_store(
        status,
        json!({"error": error, "error_description": e.message, "reason": e.reason.as_str()}),
        challenge,
    )
}

/// JSON with `Cache-Control: no-store` (RFC 7662 answers and their errors are about one
/// moment), and a `WWW-Authenticate` challenge when given.
fn no_store(
    status: StatusCode,
    body: serde_json::Value,
    challenge: Option<&'static str>,
) -> Response {
    let mut resp = (status, Json(body)).into_response();
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    if let Some(c) = challenge {
        h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(c));
    }
    resp
}

async fn ready(State(s): State<HttpState>) -> Response {
    match s.rt.store.ping().await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n").into_response(),
    }
}

async fn metrics(State(s): State<HttpState>) -> Response {
    s.rt.metrics
        .refresh_store_gauges(s.rt.store.as_ref(), s.rt.clock.now_unix())
        .await;
    (
        [(
            header::CONTENT_TYPE,
            crate::metrics::Metrics::content_type(),
        )],
        s.rt.metrics.render(),
    )
        .into_response()
}

async fn dev_discovery(State(s): State<HttpState>) -> Response {
    match &s.dev {
        Some(d) => cached_json(d.discovery(), 60),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn dev_jwks(State(s): State<HttpState>) -> Response {
    match &s.dev {
        Some(d) => cached_json(d.jwks(), 60),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}
