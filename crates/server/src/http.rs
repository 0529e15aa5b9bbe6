//! The HTTP side: lanyard's OIDC discovery document and JWKS (so destinations can trust
//! lanyard as an issuer), health, Prometheus metrics, and in `--dev` mode the
//! development issuer.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::dev::DevIssuer;
use crate::runtime::Runtime;

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

async fn ready(State(s): State<HttpState>) -> Response {
    match s.rt.store.ping().await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n").into_response(),
    }
}

async fn metrics(State(s): State<HttpState>) -> Response {
    s.rt.metrics
        .refresh_active_grants(s.rt.store.as_ref(), s.rt.clock.now_unix())
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
