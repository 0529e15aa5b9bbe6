//! Test support: start the real `lanyard` binary on loopback ports with its own data
//! directory, a real local OIDC issuer over HTTP (discovery + JWKS, rotatable keys, can
//! be taken down), gRPC clients for both listeners, and polling with a deadline.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod gcp;
pub mod issuer;
pub mod minter;
pub mod moto;
pub mod oauth_server;
pub mod process;
pub mod token_endpoint;

pub use issuer::{KeyAlg, TestIssuer};
pub use process::{Lanyard, LanyardOptions};

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

/// How long [`eventually`] waits by default; `LANYARD_TEST_PATIENCE_SECS` overrides it.
pub fn patience() -> Duration {
    let secs = std::env::var("LANYARD_TEST_PATIENCE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    Duration::from_secs(secs)
}

/// Poll `f` until it returns `Some`, or fail after [`patience`]. Never a fixed sleep:
/// the poll interval is short and the deadline is the only wait.
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + patience();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Serve `app` on a free loopback port, in the background; its address.
pub async fn serve(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// The reason code carried by a status (details or `lanyard-reason` metadata).
pub fn reason(status: &tonic::Status) -> String {
    status
        .metadata()
        .get("lanyard-reason")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}
