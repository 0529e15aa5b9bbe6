//! The broker for static-key destinations end to end: the real binary with its proxy
//! listener, a local upstream API on loopback that checks it receives the real key and
//! never the lanyard token, a workload calling through the proxy as an SDK would
//! (`x-api-key: <lanyard token>`, base URL `<proxy>/d/<name>`), streaming, revocation,
//! scope rules, hostile requests, rate limits and key rotation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use common::*;
use lanyard_proto::v1 as pb;
use lanyard_testkit::{KeyAlg, Lanyard, LanyardOptions, TestIssuer, eventually, patience};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, mpsc};

const KEY_1: &str = "sk-static-first-0123456789abcdef";
const KEY_2: &str = "sk-static-second-fedcba9876543210";

// === the upstream API ===

/// One request the upstream saw: method, path with query, headers.
type Seen = (String, String, Vec<(String, String)>);

/// What the upstream saw, and the key it accepts.
#[derive(Default)]
struct Upstream {
    /// The key it accepts in `x-api-key`.
    key: Mutex<String>,
    /// Every request: method, path with query, headers.
    seen: Mutex<Vec<Seen>>,
    /// Releases the second server-sent event.
    gate: Notify,
}

async fn upstream_handler(State(up): State<Arc<Upstream>>, req: Request) -> Response {
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("<bin>").to_string()))
        .collect();
    let key = req
        .headers()
        .get("x-api-key")
        .map(|v| v.to_str().unwrap().to_string());
    up.seen
        .lock()
        .unwrap()
        .push((method.clone(), path.clone(), headers));
    if key.as_deref() != Some(up.key.lock().unwrap().as_str()) {
        return (
            axum::http::StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": "invalid x-api-key"})),
        )
            .into_response();
    }
    let body = axum::body::to_bytes(req.into_body(), 1 << 20)
        .await
        .unwrap();
    if let Some(what) = path.strip_prefix("/v1/test/") {
        let key = up.key.lock().unwrap().clone();
        let json = |b: axum::http::response::Builder| b.body(Body::from("{}")).unwrap();
        return match what {
            // A debugging header that echoes the key.
            "leak-header" => json(Response::builder().header("x-debug", format!("key={key}"))),
            // The key in the body, split across two chunks sent apart.
            "leak-body" => {
                let (tx, rx) = mpsc::channel::<Result<String, std::io::Error>>(4);
                let up = up.clone();
                tokio::spawn(async move {
                    let (a, b) = key.split_at(8);
                    tx.send(Ok(format!("data: one\n\ndata: {a}")))
                        .await
                        .unwrap();
                    up.gate.notified().await;
                    let _ = tx.send(Ok(format!("{b}\n\ndata: after\n\n"))).await;
                });
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(Body::from_stream(
                        tokio_stream::wrappers::ReceiverStream::new(rx),
                    ))
                    .unwrap()
            }
            // Far more than socket buffers hold, for a client that stops reading.
            "firehose" => {
                let chunk = axum::body::Bytes::from(vec![b'x'; 64 * 1024]);
                let chunks = tokio_stream::iter(
                    (0..512).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
                );
                Response::builder().body(Body::from_stream(chunks)).unwrap()
            }
            "cookie" => json(
                Response::builder()
                    .header("set-cookie", "session=owner; Path=/")
                    .header("x-ok", "1"),
            ),
            "redirect-away" => json(
                Response::builder()
                    .status(302)
                    .header("location", "https://evil.example/collect"),
            ),
            "redirect-here" => json(
                Response::builder()
                    .status(302)
                    .header("location", "/v1/test/elsewhere"),
            ),
            _ => json(Response::builder().status(404)),
        };
    }
    if path.starts_with("/v1/stream") {
        let (tx, rx) = mpsc::channel::<Result<String, std::io::Error>>(4);
        let up = up.clone();
        tokio::spawn(async move {
            tx.send(Ok("event: message\ndata: first\n\n".into()))
                .await
                .unwrap();
            up.gate.notified().await;
            let _ = tx.send(Ok("event: message\ndata: second\n\n".into())).await;
        });
        return Response::builder()
            .header("content-type", "text/event-stream")
            .header("x-upstream", "yes")
            .body(Body::from_stream(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            ))
            .unwrap();
    }
    axum::Json(json!({"method": method, "path": path, "body_len": body.len()})).into_response()
}

async fn start_upstream() -> (String, Arc<Upstream>) {
    let up = Arc::new(Upstream::default());
    *up.key.lock().unwrap() = KEY_1.into();
    let app = axum::Router::new()
        .fallback(upstream_handler)
        .with_state(up.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), up)
}

// === lanyard ===

const POLICY: &str = r#"
@id("ci-llm")
permit (principal, action, resource)
when { principal.id like "spiffe://lanyard.local/ci/*" };
"#;

struct Env {
    l: Lanyard,
    issuer: TestIssuer,
    up: Arc<Upstream>,
    upstream: String,
    /// `http://127.0.0.1:PORT` of the proxy listener.
    proxy: String,
    _dir: tempfile::TempDir,
}

fn settings(upstream: &str, rpm: u32) -> Value {
    json!({
        "upstream_url": upstream,
        "key_header": "x-api-key",
        "rules": {
            "llm:read": [{"methods": ["GET"], "path": "/v1/models/**"}],
            "llm:write": [{"methods": ["POST"], "path": "/v1/messages"},
                          {"methods": ["POST"], "path": "/v1/stream"},
                          {"methods": ["GET"], "path": "/v1/test/*"}],
            "llm:admin": [{"methods": ["POST", "DELETE"], "path": "/v1/organizations/**"}],
        },
        "max_request_bytes": 1024,
        "requests_per_minute": rpm,
        "strip_headers": ["x-admin-key"],
    })
}

async fn put_proxy_destination(l: &Lanyard, name: &str, upstream: &str, rpm: u32) {
    l.admin()
        .await
        .put_destination(pb::PutDestinationRequest {
            destination: Some(pb::Destination {
                name: name.into(),
                kind: "proxy".into(),
                default_ttl_seconds: 300,
                max_ttl_seconds: 600,
                scopes: vec!["llm:read".into(), "llm:write".into(), "llm:admin".into()],
                settings: Some(json_struct(settings(upstream, rpm))),
                ..Default::default()
            }),
            expected_revision: None,
        })
        .await
        .unwrap();
}

/// Set `name`'s key through the CLI, from a file.
async fn set_key(env: &Env, name: &str, key: &str) -> String {
    let file = env._dir.path().join(format!("{name}.key"));
    std::fs::write(&file, format!("{key}\n")).unwrap();
    let (ok, out, err) = admin_cli(
        &env.l,
        &[
            "destination",
            "secret",
            "set",
            name,
            "--from-file",
            file.to_str().unwrap(),
        ],
    )
    .await;
    assert!(ok, "{out}\n{err}");
    format!("{out}{err}")
}

async fn start() -> Env {
    start_with("recheck_interval = \"250ms\"\n").await
}

/// Start with more `[proxy]` settings.
async fn start_with(proxy_settings: &str) -> Env {
    let (upstream, up) = start_upstream().await;
    let issuer = TestIssuer::start(KeyAlg::Es256).await;
    let l = Lanyard::start(LanyardOptions {
        policy: Some(POLICY.into()),
        extra_config: format!("[proxy]\nlisten = \"127.0.0.1:0\"\n{proxy_settings}"),
        ..Default::default()
    })
    .await;
    configure(&l, &issuer, Keys::Inline, KeyAlg::Es256, false).await;
    let log_addr = eventually("the proxy listener in the log", || {
        let log = l.log();
        async move {
            let at = log.find("proxy=127.0.0.1:")?;
            let rest = &log[at + "proxy=".len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'))
                .unwrap_or(rest.len());
            Some(rest[..end].to_string())
        }
    })
    .await;
    put_proxy_destination(&l, "llm", &upstream, 600).await;
    let env = Env {
        l,
        issuer,
        up,
        upstream,
        proxy: format!("http://{log_addr}"),
        _dir: tempfile::tempdir().unwrap(),
    };
    set_key(&env, "llm", KEY_1).await;
    env
}

impl Env {
    /// Exchange as workload `sub` for `destination` with `scopes`: the token and the
    /// answer.
    async fn exchange(
        &self,
        sub: &str,
        destination: &str,
        scopes: &[&str],
    ) -> (String, pb::ExchangeResponse) {
        let resp = self
            .l
            .exchange()
            .await
            .exchange(pb::ExchangeRequest {
                subject_token: self.issuer.mint(&claims(&self.issuer, sub, "run-1")),
                destination: destination.into(),
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        (bearer(&resp), resp)
    }

    fn url(&self, path: &str) -> String {
        format!("{}/d/llm{path}", self.proxy)
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: &str,
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let resp = reqwest::Client::new()
            .request(method.parse().unwrap(), self.url(path))
            .header("x-api-key", token)
            .header("anthropic-version", "2023-06-01")
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
            headers,
        )
    }

    fn upstream_hits(&self) -> usize {
        self.up.seen.lock().unwrap().len()
    }

    /// Every `proxy.request` audit event, once `n` are written.
    async fn proxy_events(&self, n: usize) -> Vec<Value> {
        eventually("proxy.request audit events", || async {
            let events = payloads_of(&self.l, "proxy.request").await;
            (events.len() >= n).then_some(events)
        })
        .await
    }
}

fn reason(body: &Value) -> &str {
    body["error"]["reason"].as_str().unwrap_or("")
}

/// Send `request` as raw bytes (paths a URL library would normalize) and read the
/// status code and the whole answer.
async fn raw(proxy: &str, request: String) -> (u16, String) {
    let addr = proxy.strip_prefix("http://").unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(patience(), s.read_to_end(&mut out))
        .await
        .expect("the proxy answered")
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

// === tests ===

#[tokio::test]
async fn a_workload_calls_the_upstream_through_the_proxy_with_the_real_key_injected() {
    let env = start().await;
    let (token, resp) = env.exchange("agent", "llm", &["llm:write"]).await;
    // The credential says where an SDK puts it.
    let pb::credential::Kind::Bearer(b) = resp.credential.unwrap().kind.unwrap() else {
        panic!("bearer expected");
    };
    assert_eq!(b.header, "x-api-key");
    assert_eq!(
        resp.revocability,
        pb::Revocability::Immediate as i32,
        "revocable at once"
    );
    let claims =
        verify_with_lanyard_jwks(&env.l, &token, &format!("{}/proxy/llm", env.l.http)).await;
    assert_eq!(claims["lanyard"]["grant_id"], resp.grant_id);

    let sent = r#"{"model":"m","messages":[]}"#;
    let (status, body, _) = env
        .call("POST", "/v1/messages?beta=true", &token, sent)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["path"], "/v1/messages?beta=true");
    assert_eq!(body["method"], "POST");
    {
        let seen = env.up.seen.lock().unwrap();
        let (_, _, headers) = seen.last().unwrap();
        let get = |n: &str| {
            headers
                .iter()
                .filter(|(k, _)| k == n)
                .map(|(_, v)| v.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(get("x-api-key"), [KEY_1], "the real key, once");
        assert_eq!(
            get("anthropic-version"),
            ["2023-06-01"],
            "the SDK's headers pass"
        );
        assert!(get("authorization").is_empty());
        assert!(
            headers.iter().all(|(_, v)| !v.contains(&token)),
            "the lanyard token never reaches the upstream: {headers:?}"
        );
    }

    // Audited with the rule's pattern, never the raw path, the query or a key.
    let events = env.proxy_events(1).await;
    let ev = events.last().unwrap();
    assert_eq!(ev["kind"], "proxy.request");
    assert_eq!(ev["destination"], "llm");
    assert_eq!(ev["grant_id"], resp.grant_id);
    assert_eq!(ev["workload_id"], "spiffe://lanyard.local/ci/agent");
    assert_eq!(ev["decision"], "allow");
    assert_eq!(ev["detail"]["rule"], "/v1/messages");
    assert_eq!(ev["detail"]["method"], "POST");
    assert_eq!(ev["detail"]["status"], 200);
    assert_eq!(ev["detail"]["bytes_in"], sent.len());
    assert!(ev["detail"]["bytes_out"].as_u64().unwrap() > 0);
    assert!(!ev.to_string().contains("beta=true"), "{ev}");

    // The key's status shows a fingerprint, never the key.
    let status = env
        .l
        .admin()
        .await
        .get_destination_secret(pb::GetRequest { name: "llm".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(status.secret_set);
    assert!(status.fingerprint.starts_with("hmac-sha256:"), "{status:?}");
    let first_fp = status.fingerprint.clone();
    let shown = admin_cli_json(&env.l, &["destination", "secret", "show", "llm"]).await;
    assert_eq!(shown["fingerprint"], first_fp);
    assert_eq!(shown["secret_set"], true);

    // Rotation takes effect for the next request.
    *env.up.key.lock().unwrap() = KEY_2.into();
    let (status, _, _) = env.call("POST", "/v1/messages", &token, "{}").await;
    assert_eq!(status, 401, "the upstream refuses the old key");
    let out = set_key(&env, "llm", KEY_2).await;
    let (status, body, _) = env.call("POST", "/v1/messages", &token, "{}").await;
    assert_eq!(status, 200, "{body}");
    let status = admin_cli_json(&env.l, &["destination", "secret", "show", "llm"]).await;
    assert_ne!(status["fingerprint"], first_fp);
    let puts = payloads_of(&env.l, "destination_secret.put").await;
    assert_eq!(puts.len(), 2);
    assert_eq!(puts[1]["detail"]["previous_fingerprint"], first_fp);

    // A key is never taken from the command line.
    let (ok, _, err) = admin_cli(&env.l, &["destination", "secret", "set", "llm", KEY_2]).await;
    assert!(!ok, "{err}");

    // Neither key appears in any answer, CLI output, log, audit event or the database.
    let listed = admin_cli_json(&env.l, &["destination", "list"])
        .await
        .to_string();
    let audit: String = audit_events(&env.l)
        .await
        .iter()
        .map(|e| e.payload_json.clone())
        .collect();
    let db = std::fs::read(env.l.data_dir().join("lanyard.db")).unwrap();
    let wal = std::fs::read(env.l.data_dir().join("lanyard.db-wal")).unwrap_or_default();
    for key in [KEY_1, KEY_2] {
        for (what, text) in [
            ("destination list", listed.as_str()),
            ("secret set output", out.as_str()),
            ("secret show", &status.to_string()),
            ("audit", audit.as_str()),
            ("log", &env.l.log()),
            ("database", &String::from_utf8_lossy(&db)),
            ("wal", &String::from_utf8_lossy(&wal)),
        ] {
            assert!(!text.contains(key), "{what} contains the key");
        }
    }
    assert!(!env.l.log().contains(&token), "the log contains the token");
    assert!(verify_chain(&env.l).await.ok);

    // A destination's key goes with it: put back under the same name, it has none.
    put_proxy_destination(&env.l, "gone", &env.upstream, 600).await;
    set_key(&env, "gone", KEY_1).await;
    admin_cli_json(&env.l, &["destination", "delete", "gone"]).await;
    let (ok, _, err) = admin_cli(&env.l, &["destination", "secret", "show", "gone"]).await;
    assert!(!ok && err.contains("NOT_FOUND"), "{err}");
    put_proxy_destination(&env.l, "gone", &env.upstream, 600).await;
    let shown = admin_cli_json(&env.l, &["destination", "secret", "show", "gone"]).await;
    assert_eq!(shown["secret_set"], false, "{shown}");
    assert_eq!(
        payloads_of(&env.l, "destination_secret.delete").await.len(),
        1
    );
}

#[tokio::test]
async fn server_sent_events_stream_through_chunk_by_chunk() {
    let env = start().await;
    let (token, _) = env.exchange("agent", "llm", &["llm:write"]).await;
    let mut resp = reqwest::Client::new()
        .post(env.url("/v1/stream"))
        .header("x-api-key", &token)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_eq!(resp.headers()["x-upstream"], "yes");
    // The first event arrives while the upstream still holds the second back.
    let first = tokio::time::timeout(patience(), resp.chunk())
        .await
        .expect("the first event is not held back")
        .unwrap()
        .unwrap();
    assert_eq!(&first[..], b"event: message\ndata: first\n\n");
    env.up.gate.notify_one();
    let mut rest = Vec::new();
    while let Some(c) = tokio::time::timeout(patience(), resp.chunk())
        .await
        .unwrap()
        .unwrap()
    {
        rest.extend_from_slice(&c);
    }
    assert_eq!(rest, b"event: message\ndata: second\n\n");
    let events = env.proxy_events(1).await;
    assert_eq!(events[0]["detail"]["bytes_out"], first.len() + rest.len());
    assert!(events[0]["detail"].get("cut").is_none());
}

#[tokio::test]
async fn revocation_cuts_a_stream_in_flight_and_refuses_new_requests() {
    // The store is polled only every minute: within patience, only the wake-up on the
    // revocation's commit can cut the stream.
    let env = start_with("recheck_interval = \"60s\"\n").await;
    let (token, grant) = env.exchange("agent", "llm", &["llm:write"]).await;
    let mut resp = reqwest::Client::new()
        .post(env.url("/v1/stream"))
        .header("x-api-key", &token)
        .body("{}")
        .send()
        .await
        .unwrap();
    let first = tokio::time::timeout(patience(), resp.chunk())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.starts_with(b"event: message"));

    let (ok, out, err) = admin_cli(
        &env.l,
        &[
            "revoke",
            "--grant",
            &grant.grant_id,
            "--reason",
            "agent misbehaves",
        ],
    )
    .await;
    assert!(ok, "{out}\n{err}");
    // The stream ends without the second event, though the upstream never closed it,
    // well before the first poll of the store (60 s).
    let end = tokio::time::timeout(Duration::from_secs(45), async {
        loop {
            match resp.chunk().await {
                Ok(Some(c)) => assert!(!c.windows(6).any(|w| w == b"second"), "no more events"),
                Ok(None) => return "end",
                Err(_) => return "error",
            }
        }
    })
    .await
    .expect("the stream is cut");
    assert_eq!(end, "error", "an aborted body, not a clean end");

    let (status, body, _) = env.call("POST", "/v1/messages", &token, "{}").await;
    assert_eq!((status, reason(&body)), (403, "GRANT_REVOKED"), "{body}");
    let events = env.proxy_events(2).await;
    let cut = events
        .iter()
        .find(|e| e["detail"]["cut"] == "GRANT_REVOKED")
        .expect("the cut stream is audited");
    assert_eq!(cut["grant_id"], grant.grant_id);
    assert!(
        events
            .iter()
            .any(|e| e["reason"] == "GRANT_REVOKED" && e["decision"] == "deny")
    );
}

#[tokio::test]
async fn scope_rules_separate_read_write_and_escalation() {
    let env = start().await;
    let (read, _) = env.exchange("reader", "llm", &["llm:read"]).await;
    let (write, _) = env.exchange("writer", "llm", &["llm:write"]).await;
    let (status, body, _) = env.call("GET", "/v1/models/claude", &read, "").await;
    assert_eq!(status, 200, "{body}");
    for (token, method, path) in [
        (&read, "POST", "/v1/messages"),
        (&read, "GET", "/v1/messages"),
        (&write, "POST", "/v1/organizations/keys"),
        (&write, "DELETE", "/v1/organizations/keys/1"),
        (&write, "GET", "/v1/models/claude"),
        (&write, "POST", "/v1/messages/"),
        // Case matters, and the path is matched decoded: `%6d` is `m`.
        (&write, "POST", "/V1/messages"),
        (&write, "POST", "/v1/Messages"),
        (&read, "POST", "/v1/%6dessages"),
        (&read, "GET", "/v1/%6dessages"),
    ] {
        let before = env.upstream_hits();
        let (status, body, headers) = env.call(method, path, token, "{}").await;
        assert_eq!(
            (status, reason(&body)),
            (403, "SCOPE_NOT_ALLOWED"),
            "{method} {path}: {body}"
        );
        assert_eq!(headers["lanyard-reason"], "SCOPE_NOT_ALLOWED");
        assert_eq!(
            env.upstream_hits(),
            before,
            "{method} {path} reached the upstream"
        );
    }
    let (status, body, _) = env.call("POST", "/v1/%6dessages", &write, "{}").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["path"], "/v1/%6dessages", "forwarded as received");
    let (status, body, _) = env.call("GET", "/v1/%6dodels/claude", &read, "").await;
    assert_eq!(status, 200, "{body}");

    // A released grant is refused at once, long before its token expires.
    let (released, grant) = env.exchange("writer", "llm", &["llm:write"]).await;
    env.l
        .exchange()
        .await
        .release(pb::ReleaseRequest {
            grant_id: grant.grant_id.clone(),
            subject_token: env.issuer.mint(&claims(&env.issuer, "writer", "run-1")),
            ..Default::default()
        })
        .await
        .unwrap();
    let before = env.upstream_hits();
    let (status, body, _) = env.call("POST", "/v1/messages", &released, "{}").await;
    assert_eq!((status, reason(&body)), (403, "GRANT_NOT_ACTIVE"), "{body}");
    assert_eq!(env.upstream_hits(), before);

    // A lanyard token for another destination (of kind proxy too), none, or garbage.
    put_proxy_destination(&env.l, "llm2", &env.upstream, 600).await;
    let (llm2, _) = env.exchange("writer", "llm2", &["llm:write"]).await;
    let (orders, _) = env.exchange("writer", "orders", &["read"]).await;
    for (token, want) in [
        (llm2.as_str(), "AUDIENCE_MISMATCH"),
        (orders.as_str(), "AUDIENCE_MISMATCH"),
        ("", "TOKEN_MALFORMED"),
        ("garbage", "TOKEN_MALFORMED"),
    ] {
        let (status, body, _) = env.call("POST", "/v1/messages", token, "{}").await;
        assert_eq!((status, reason(&body)), (401, want), "{body}");
    }
    let resp = reqwest::get(format!("{}/d/nope/v1/messages", env.proxy))
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["lanyard-reason"], "DESTINATION_UNKNOWN");
}

#[tokio::test]
async fn hostile_requests_are_refused_before_the_upstream() {
    let env = start().await;
    let (token, _) = env
        .exchange("agent", "llm", &["llm:write", "llm:read"])
        .await;
    let addr = env.proxy.strip_prefix("http://").unwrap().to_string();
    let request = |target: &str, extra: &str| {
        format!(
            "POST {target} HTTP/1.1\r\nhost: {addr}\r\nx-api-key: {token}\r\n{extra}connection: close\r\ncontent-length: 2\r\n\r\n{{}}"
        )
    };
    // The plain request works, so the refusals below are about what was changed.
    let (status, text) = raw(&env.proxy, request("/d/llm/v1/messages", "")).await;
    assert_eq!(status, 200, "{text}");
    let base = env.upstream_hits();

    for target in [
        "/d/llm/v1/models/../messages",
        "/d/llm/v1/models/%2e%2e/messages",
        "/d/llm/v1/models/%2E%2E/messages",
        "/d/llm/v1/models/.%2e/messages",
        "/d/llm/v1/./messages",
        "/d/llm/v1/models%2f..%2fmessages",
        "/d/llm/v1/models%2F..%2Fmessages",
        "/d/llm//v1/messages",
        "/d/llm/v1//messages",
        "/d/llm/v1/%252e%252e/messages",
        "/d/llm/v1/..;/messages",
        "/d/llm/v1/%5c../messages",
        "/d/llm/v1/messages.",
        "/d/llm/v1/messages%2e",
        "/d/llm/v1/messages%20",
        "/d/llm/v1/m%c3%a9ssages",
    ] {
        let (status, text) = raw(&env.proxy, request(target, "")).await;
        assert_eq!(status, 400, "{target}: {text}");
        assert!(text.contains("PROXY_DENIED"), "{target}: {text}");
    }
    // A raw backslash is not even valid HTTP.
    let (status, _) = raw(&env.proxy, request("/d/llm/v1\\..\\messages", "")).await;
    assert_eq!(status, 400);

    for (what, extra) in [
        ("two key headers", format!("x-api-key: {token}\r\n")),
        (
            "the key header in Connection",
            "connection: x-api-key\r\n".to_string(),
        ),
        (
            "authorization in Connection",
            "connection: keep-alive, Authorization\r\n".to_string(),
        ),
    ] {
        let (status, text) = raw(&env.proxy, request("/d/llm/v1/messages", &extra)).await;
        assert_eq!(status, 400, "{what}: {text}");
        assert!(text.contains("PROXY_DENIED"), "{what}: {text}");
    }
    assert_eq!(
        env.upstream_hits(),
        base,
        "no hostile request reached the upstream"
    );

    // Transfer-Encoding with Content-Length, and a second request hidden behind the
    // length: the HTTP layer frames by the chunked coding (RFC 9112 §6.1), drops the
    // length and closes the connection after the answer; the proxy forwards only the
    // decoded body, with its own length. Nothing is smuggled.
    let smuggle = format!(
        "POST /d/llm/v1/messages HTTP/1.1\r\nhost: {addr}\r\nx-api-key: {token}\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{{}}\r\n0\r\n\r\nGET /d/llm/v1/models/smuggled HTTP/1.1\r\nhost: {addr}\r\nx-api-key: {token}\r\n\r\n"
    );
    let (status, text) = raw(&env.proxy, smuggle).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "one answer: {text}");
    assert!(text.contains(r#""body_len":2"#), "{text}");
    {
        let seen = env.up.seen.lock().unwrap();
        assert_eq!(seen.len(), base + 1);
        assert!(seen.iter().all(|(_, path, _)| !path.contains("smuggled")));
        let (_, _, headers) = seen.last().unwrap();
        assert!(
            headers.iter().all(|(k, _)| k != "transfer-encoding"),
            "{headers:?}"
        );
    }
    let base = env.upstream_hits();

    // Oversized body: 413, whether announced or not.
    let big = "x".repeat(2000);
    let (status, body, _) = env.call("POST", "/v1/messages", &token, &big).await;
    assert_eq!(
        (status, reason(&body)),
        (413, "REQUEST_TOO_LARGE"),
        "{body}"
    );
    let chunked = format!(
        "POST /d/llm/v1/messages HTTP/1.1\r\nhost: {addr}\r\nx-api-key: {token}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n7d0\r\n{big}\r\n0\r\n\r\n"
    );
    let (status, text) = raw(&env.proxy, chunked).await;
    assert_eq!(status, 413, "{text}");
    assert_eq!(env.upstream_hits(), base);

    // Headers that could carry a key, or make the upstream (or a gateway in front of
    // it) read another method, path or client, are stripped; the real key replaces the
    // token.
    let overrides = [
        ("x-http-method-override", "DELETE"),
        ("x-http-method", "DELETE"),
        ("x-method-override", "DELETE"),
        ("x-original-url", "/v1/organizations/keys"),
        ("x-rewrite-url", "/v1/organizations/keys"),
        ("x-forwarded-for", "10.0.0.1"),
        ("x-forwarded-host", "admin.internal"),
        ("x-forwarded-prefix", "/v1/organizations"),
        ("X-Forwarded-Proto", "https"),
        ("x-envoy-original-path", "/v1/organizations/keys"),
        ("forwarded", "for=10.0.0.1;host=admin.internal"),
    ];
    let extra: String = overrides
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .chain(["authorization: Bearer sneaky\r\nx-admin-key: adm\r\ncookie: s=1\r\n".into()])
        .collect();
    let (status, text) = raw(&env.proxy, request("/d/llm/v1/messages", &extra)).await;
    assert_eq!(status, 200, "{text}");
    let seen = env.up.seen.lock().unwrap();
    let (method, path, headers) = seen.last().unwrap();
    assert_eq!((method.as_str(), path.as_str()), ("POST", "/v1/messages"));
    let names: Vec<&str> = headers.iter().map(|(k, _)| k.as_str()).collect();
    for n in ["authorization", "x-admin-key", "cookie"]
        .into_iter()
        .chain(overrides.iter().map(|(k, _)| *k))
    {
        assert!(
            !names.contains(&n.to_ascii_lowercase().as_str()),
            "{n} forwarded: {names:?}"
        );
    }
    assert!(
        headers.iter().all(|(_, v)| !v.contains("organizations")),
        "{headers:?}"
    );
}

#[tokio::test]
async fn a_grant_over_its_rate_gets_429_with_retry_after() {
    let env = start().await;
    put_proxy_destination(&env.l, "llm", &env.upstream, 2).await;
    let (token, _) = env.exchange("agent", "llm", &["llm:write"]).await;
    for _ in 0..2 {
        let (status, body, _) = env.call("POST", "/v1/messages", &token, "{}").await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, body, headers) = env.call("POST", "/v1/messages", &token, "{}").await;
    assert_eq!((status, reason(&body)), (429, "RATE_LIMITED"), "{body}");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry), "{retry}");
    // Another grant has its own bucket.
    let (other, _) = env.exchange("agent-2", "llm", &["llm:write"]).await;
    let (status, _, _) = env.call("POST", "/v1/messages", &other, "{}").await;
    assert_eq!(status, 200);
    // Counted once each request has ended (after its answer was sent).
    eventually("lanyard_proxy_requests_total", || async {
        let metrics = reqwest::get(format!("{}/metrics", env.l.http))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        [("ok", 3), ("RATE_LIMITED", 1)]
            .iter()
            .all(|(result, n)| {
                metrics.contains(&format!(
                    "lanyard_proxy_requests_total{{destination=\"llm\",result=\"{result}\"}} {n}"
                ))
            })
            .then_some(())
    })
    .await;
}

/// `lanyard destination put` for `llm` with `settings`, through the CLI.
async fn put_llm_via_cli(env: &Env, settings: &Value) {
    let (ok, out, err) = admin_cli(
        &env.l,
        &[
            "destination",
            "put",
            "--name",
            "llm",
            "--kind",
            "proxy",
            "--scope",
            "llm:read",
            "--scope",
            "llm:write",
            "--scope",
            "llm:admin",
            "--default-ttl",
            "300",
            "--max-ttl",
            "600",
            "--settings-json",
            &settings.to_string(),
        ],
    )
    .await;
    assert!(ok, "{out}\n{err}");
}

#[tokio::test]
async fn a_key_is_never_sent_where_it_was_not_set_for() {
    let env = start().await;
    let (token, _) = env.exchange("agent", "llm", &["llm:write"]).await;
    let (status, body, _) = env.call("POST", "/v1/messages", &token, "{}").await;
    assert_eq!(status, 200, "{body}");

    // An admin points the destination at a host they control, keeping the key.
    let (evil_url, evil) = start_upstream().await;
    put_llm_via_cli(&env, &settings(&evil_url, 600)).await;
    let before = env.upstream_hits();
    let (status, body, headers) = env.call("POST", "/v1/messages", &token, "{}").await;
    assert_eq!(
        (status, reason(&body)),
        (503, "DESTINATION_UNAVAILABLE"),
        "{body}"
    );
    assert_eq!(headers["lanyard-reason"], "DESTINATION_UNAVAILABLE");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("upstream or key header changed since its key was set")
            && message.contains("lanyard destination secret set"),
        "{message}"
    );
    assert!(evil.seen.lock().unwrap().is_empty(), "nothing sent");
    assert_eq!(env.upstream_hits(), before);

    // The key's status says so.
    let shown = admin_cli_json(&env.l, &["destination", "secret", "show", "llm"]).await;
    assert_eq!(
        (&shown["secret_set"], &shown["bound"]),
        (&json!(true), &json!(false)),
        "{shown}"
    );
    let (ok, text, _) = admin_cli(&env.l, &["destination", "secret", "show", "llm"]).await;
    assert!(
        ok && text.contains("NO: the destination's upstream"),
        "{text}"
    );

    // A changed key header or prefix on the old upstream is refused too.
    let mut changed = settings(&env.upstream, 600);
    changed["key_prefix"] = json!("Key ");
    put_llm_via_cli(&env, &changed).await;
    let (status, body, _) = env
        .call("POST", "/v1/messages", &format!("Key {token}"), "{}")
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(env.upstream_hits(), before);

    // Changes that keep where and how the key goes (rules, limits) keep it.
    let mut same = settings(&env.upstream, 600);
    same["rules"]["llm:write"][0]["methods"] = json!(["POST", "PUT"]);
    put_llm_via_cli(&env, &same).await;
    let (status, body, _) = env.call("POST", "/v1/messages", &token, "{}").await;
    assert_eq!(status, 200, "{body}");
    let shown = admin_cli_json(&env.l, &["destination", "secret", "show", "llm"]).await;
    assert_eq!(shown["bound"], true, "{shown}");

    // Moved again, the key must be set again, which is audited with where it goes.
    put_llm_via_cli(&env, &settings(&evil_url, 600)).await;
    let (status, _, _) = env.call("POST", "/v1/messages", &token, "{}").await;
    assert_eq!(status, 503);
    assert!(evil.seen.lock().unwrap().is_empty());
    set_key(&env, "llm", KEY_1).await;
    let (status, body, _) = env.call("POST", "/v1/messages", &token, "{}").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(evil.seen.lock().unwrap().len(), 1);
    let puts = payloads_of(&env.l, "destination_secret.put").await;
    let last = puts.last().unwrap();
    assert_eq!(last["detail"]["upstream_origin"], evil_url, "{last}");
    assert_eq!(last["detail"]["key_header"], "x-api-key");
    let shown = admin_cli_json(&env.l, &["destination", "secret", "show", "llm"]).await;
    assert_eq!(shown["bound"], true, "{shown}");

    // Refused attempts are audited as denied, with the refusal.
    let events = env.proxy_events(1).await;
    assert!(
        events
            .iter()
            .any(|e| e["reason"] == "DESTINATION_UNAVAILABLE" && e["decision"] == "deny"),
        "{events:?}"
    );
}

#[tokio::test]
async fn answers_never_carry_the_key_cookies_or_cross_origin_redirects() {
    let env = start().await;
    let (token, _) = env.exchange("agent", "llm", &["llm:write"]).await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let get = |path: &str| client.get(env.url(path)).header("x-api-key", &token).send();

    // The key in a response header: the whole answer is refused.
    let resp = get("/v1/test/leak-header").await.unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["lanyard-reason"], "KEY_IN_RESPONSE");
    assert!(resp.headers().get("x-debug").is_none());
    let text = resp.text().await.unwrap();
    assert!(!text.contains(KEY_1), "{text}");

    // The key in the body, split across chunks the upstream sends apart: cut before
    // its last byte, the client sees an aborted answer.
    let mut resp = get("/v1/test/leak-body").await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut got = Vec::new();
    let first = tokio::time::timeout(patience(), resp.chunk())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    got.extend_from_slice(&first);
    env.up.gate.notify_one();
    let end = tokio::time::timeout(patience(), async {
        loop {
            match resp.chunk().await {
                Ok(Some(c)) => got.extend_from_slice(&c),
                Ok(None) => return "end",
                Err(_) => return "error",
            }
        }
    })
    .await
    .expect("the answer ends");
    assert_eq!(end, "error", "an aborted body, not a clean end");
    let got = String::from_utf8_lossy(&got).to_string();
    assert!(got.starts_with("data: one"), "{got}");
    assert!(!got.contains(KEY_1) && !got.contains("after"), "{got}");

    // Cookies the upstream sets are not passed on; other headers are.
    let resp = get("/v1/test/cookie").await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("set-cookie").is_none());
    assert_eq!(resp.headers()["x-ok"], "1");

    // A redirect to another origin loses its Location; a relative one keeps it.
    let resp = get("/v1/test/redirect-away").await.unwrap();
    assert_eq!(resp.status(), 302);
    assert!(resp.headers().get("location").is_none());
    let resp = get("/v1/test/redirect-here").await.unwrap();
    assert_eq!(resp.headers()["location"], "/v1/test/elsewhere");

    // Both key refusals are audited.
    let events = eventually("the key refusals audited", || async {
        let events = payloads_of(&env.l, "proxy.request").await;
        let refused = events
            .iter()
            .any(|e| e["reason"] == "KEY_IN_RESPONSE" && e["decision"] == "deny");
        let cut = events
            .iter()
            .any(|e| e["detail"]["cut"] == "KEY_IN_RESPONSE");
        (refused && cut).then_some(events)
    })
    .await;
    assert!(!serde_json::to_string(&events).unwrap().contains(KEY_1));
    assert!(!env.l.log().contains(KEY_1), "the log holds the key");
}

#[tokio::test]
async fn slow_clients_are_dropped_and_grants_have_few_requests_in_flight() {
    let env = start_with(
        "header_read_timeout = \"500ms\"\nclient_timeout = \"500ms\"\nmax_in_flight_per_grant = 1\n",
    )
    .await;
    let (token, _) = env.exchange("agent", "llm", &["llm:write"]).await;
    let addr = env.proxy.strip_prefix("http://").unwrap().to_string();

    // Headers that never end: the connection is closed after header_read_timeout.
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(format!("POST /d/llm/v1/messages HTTP/1.1\r\nhost: {addr}\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(patience(), s.read_to_end(&mut out))
        .await
        .expect("the connection is closed")
        .unwrap_or_default();
    assert!(started.elapsed() < patience());

    // A body that never arrives: 408 after client_timeout, nothing sent upstream.
    let before = env.upstream_hits();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(
        format!(
            "POST /d/llm/v1/messages HTTP/1.1\r\nhost: {addr}\r\nx-api-key: {token}\r\ncontent-length: 100\r\n\r\n{{}}"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(patience(), s.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert_eq!(env.upstream_hits(), before);

    // A client that stops reading the answer: cut after client_timeout, its place freed.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(
        format!(
            "GET /d/llm/v1/test/firehose HTTP/1.1\r\nhost: {addr}\r\nx-api-key: {token}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    eventually("the stalled answer cut", || async {
        payloads_of(&env.l, "proxy.request")
            .await
            .into_iter()
            .find(|e| e["detail"]["cut"] == "CLIENT_STALLED")
    })
    .await;
    drop(s);

    // One request in flight per grant: a second one waits for none, it gets 429.
    let mut stream = reqwest::Client::new()
        .post(env.url("/v1/stream"))
        .header("x-api-key", &token)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let _ = tokio::time::timeout(patience(), stream.chunk())
        .await
        .unwrap();
    let (status, body, _) = env.call("POST", "/v1/messages", &token, "{}").await;
    assert_eq!((status, reason(&body)), (429, "RATE_LIMITED"), "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("in flight"),
        "{body}"
    );
    let (other, _) = env.exchange("agent-2", "llm", &["llm:write"]).await;
    let (status, _, _) = env.call("POST", "/v1/messages", &other, "{}").await;
    assert_eq!(status, 200, "another grant is not held up");
    env.up.gate.notify_one();
    while let Ok(Some(_)) = stream.chunk().await {}
    eventually("the stream's place released", || async {
        let (status, _, _) = env.call("POST", "/v1/messages", &token, "{}").await;
        (status == 200).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_flood_of_unverified_tokens_writes_few_audit_events() {
    let env = start().await;
    let flood = 300;
    let started = Instant::now();
    let client = reqwest::Client::new();
    for i in 0..flood {
        let resp = client
            .post(env.url("/v1/messages"))
            .header("x-api-key", format!("garbage-{i}"))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
    }
    let seconds = started.elapsed().as_secs();
    // Every refusal is counted, in few events.
    let events = eventually("the flood summed up in the audit", || async {
        let events: Vec<Value> = payloads_of(&env.l, "proxy.request")
            .await
            .into_iter()
            .filter(|e| e["reason"] == "TOKEN_MALFORMED")
            .collect();
        let total: u64 = events
            .iter()
            .map(|e| e["detail"]["count"].as_u64().unwrap())
            .sum();
        (total == flood).then_some(events)
    })
    .await;
    let bound = 2 * (seconds as usize + 2);
    assert!(
        events.len() <= bound,
        "{} events for {flood} refusals in {seconds} s",
        events.len()
    );
    assert!(events.iter().all(|e| e["decision"] == "deny"));
    assert!(verify_chain(&env.l).await.ok);
}
