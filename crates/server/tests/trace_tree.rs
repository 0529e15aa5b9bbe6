//! The span tree of real exchanges, in process: a runtime on a SQLite store, the
//! workload gRPC service on loopback with lanyard's `trace_fn`, a real OIDC issuer over
//! HTTP, and OpenTelemetry's in-memory exporter behind lanyard's own layer.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use lanyard_audit::Fingerprinter;
use lanyard_core::{SharedClock, SystemClock};
use lanyard_keys::{KeyRing, KeyRingMinter, SigningAlgorithm};
use lanyard_policy::CedarAuthorizer;
use lanyard_proto::v1 as pb;
use lanyard_proto::v1::exchange_service_client::ExchangeServiceClient;
use lanyard_proto::v1::exchange_service_server::{ExchangeService, ExchangeServiceServer};
use lanyard_server::commit::Committer;
use lanyard_server::replay::StoreReplayGuard;
use lanyard_server::runtime::Runtime;
use lanyard_server::services::ExchangeSvc;
use lanyard_server::telemetry::{self, current_trace_id};
use lanyard_store::{ConfigKind, NewAuditEvent, NewConfigObject, Store};
use lanyard_testkit::{KeyAlg, TestIssuer, eventually};
use lanyard_trust::{Verifier, VerifierSettings};
use opentelemetry::trace::{SpanId, SpanKind, TraceId};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use serde_json::json;
use tonic::{Request, Response, Status};
use tracing_subscriber::layer::SubscriberExt;

const POLICY: &str = r#"
@id("ci-orders")
permit (principal, action, resource == Lanyard::Destination::"orders")
when { principal.id like "spiffe://lanyard.local/ci/*" && ["read"].containsAll(context.scopes) };
"#;

const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929e0e4736aa";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// The real exchange service, plus a note of `current_trace_id()` as seen inside each
/// RPC's handler.
struct Probe {
    inner: ExchangeSvc,
    seen: Arc<Mutex<Vec<Option<String>>>>,
}

#[tonic::async_trait]
impl ExchangeService for Probe {
    async fn exchange(
        &self,
        req: Request<pb::ExchangeRequest>,
    ) -> Result<Response<pb::ExchangeResponse>, Status> {
        self.seen.lock().unwrap().push(current_trace_id());
        self.inner.exchange(req).await
    }
    async fn renew(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::ExchangeResponse>, Status> {
        self.inner.renew(req).await
    }
    async fn release(
        &self,
        req: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        self.inner.release(req).await
    }
    async fn introspect(
        &self,
        req: Request<pb::IntrospectRequest>,
    ) -> Result<Response<pb::IntrospectResponse>, Status> {
        self.inner.introspect(req).await
    }
}

async fn put(store: &dyn Store, kind: ConfigKind, name: &str, spec: serde_json::Value) {
    store
        .config_put(
            NewConfigObject {
                kind,
                name: name.into(),
                spec,
                updated_by: "test".into(),
                now: 0,
            },
            None,
            NewAuditEvent {
                kind: format!("{}.put", kind.as_str()),
                ..NewAuditEvent::default()
            },
        )
        .await
        .unwrap();
}

/// A runtime configured with `issuer` (keys by JWKS URL), a trust rule mapping `sub` to
/// `spiffe://lanyard.local/ci/{sub}`, and the `orders` jwt destination.
async fn runtime(dir: &std::path::Path, issuer: &TestIssuer) -> Arc<Runtime> {
    lanyard_keys::install_crypto_provider();
    let clock: SharedClock = SystemClock::shared();
    let store: Arc<dyn Store> = Arc::new(
        lanyard_store_sqlite::SqliteStore::open(&dir.join("lanyard.db"))
            .await
            .unwrap(),
    );
    put(
        store.as_ref(),
        ConfigKind::Issuer,
        "ci",
        json!({
            "name": "ci",
            "issuer_url": issuer.url(),
            "keys": {"type": "jwks_url", "url": issuer.jwks_url()},
            "allowed_algorithms": ["ES256"],
            "audiences": ["lanyard"],
            "leeway_secs": 5,
            "max_token_age_secs": 600,
            "replay_protection": false,
            "max_token_bytes": null,
        }),
    )
    .await;
    put(
        store.as_ref(),
        ConfigKind::TrustRule,
        "ci",
        json!({
            "name": "ci",
            "issuer": "ci",
            "priority": 10,
            "conditions": [],
            "workload_template": "spiffe://{trust_domain}/ci/{sub}",
            "task_claim": "run_id",
        }),
    )
    .await;
    put(
        store.as_ref(),
        ConfigKind::Destination,
        "orders",
        json!({
            "name": "orders",
            "kind": "jwt",
            "default_ttl_secs": 300,
            "max_ttl_secs": 600,
            "scopes": ["read", "write"],
            "labels": {},
            "settings": {"audience": "https://orders.internal"},
        }),
    )
    .await;
    let own_url = "http://127.0.0.1:9".to_string();
    let verifier = Verifier::new(
        VerifierSettings::new(own_url.clone()),
        clock.clone(),
        Arc::new(StoreReplayGuard::new(store.clone(), clock.clone())),
    )
    .unwrap();
    let keys =
        Arc::new(KeyRing::open(&dir.join("keys"), SigningAlgorithm::ES256, clock.clone()).unwrap());
    let minter = Arc::new(KeyRingMinter::new(keys.clone(), own_url));
    let rt = Arc::new(Runtime::new(
        store.clone(),
        verifier,
        Arc::new(CedarAuthorizer::from_text(POLICY, "test-1").unwrap()),
        keys,
        minter,
        clock,
        Committer::start(store, 16),
        "lanyard.local".into(),
        Arc::new(Fingerprinter::open_or_create(&dir.join("audit-hmac.key")).unwrap()),
        Arc::new(lanyard_keys::SealKey::from_bytes(&[1; 32]).unwrap()),
    ));
    rt.reload(true).await.unwrap();
    rt
}

fn exchange_req(issuer: &TestIssuer, sub: &str, scopes: &[&str]) -> pb::ExchangeRequest {
    let now = std::time::UNIX_EPOCH.elapsed().unwrap().as_secs() as i64;
    let mut claims = issuer.claims(sub, "lanyard", now);
    claims["run_id"] = "run-1".into();
    pb::ExchangeRequest {
        subject_token: issuer.mint(&claims),
        destination: "orders".into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// The spans of one trace, and its root (the one span whose parent is not in it).
fn trace_of(spans: &[SpanData], trace: TraceId) -> (Vec<SpanData>, SpanData) {
    let mine: Vec<SpanData> = spans
        .iter()
        .filter(|s| s.span_context.trace_id() == trace)
        .cloned()
        .collect();
    let ids: Vec<SpanId> = mine.iter().map(|s| s.span_context.span_id()).collect();
    let roots: Vec<&SpanData> = mine
        .iter()
        .filter(|s| !ids.contains(&s.parent_span_id))
        .collect();
    assert_eq!(
        roots.len(),
        1,
        "one root per RPC: {:?}",
        roots.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    let root = roots[0].clone();
    (mine, root)
}

/// Whether `span` descends from `root` within `spans`.
fn descends(spans: &[SpanData], span: &SpanData, root: &SpanData) -> bool {
    let by_id: HashMap<SpanId, &SpanData> = spans
        .iter()
        .map(|s| (s.span_context.span_id(), s))
        .collect();
    let mut cur = span;
    loop {
        if cur.parent_span_id == root.span_context.span_id() {
            return true;
        }
        match by_id.get(&cur.parent_span_id) {
            Some(p) => cur = p,
            None => return false,
        }
    }
}

fn attr(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

#[tokio::test]
async fn every_rpc_is_one_trace_with_verify_policy_issue_and_commit_children() {
    // Current-thread runtime: the thread-local subscriber sees every task's spans.
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let _subscriber = tracing::subscriber::set_default(
        tracing_subscriber::registry().with(telemetry::otel_layer(&provider)),
    );

    let dir = tempfile::tempdir().unwrap();
    let issuer = TestIssuer::start(KeyAlg::Es256).await;
    let rt = runtime(dir.path(), &issuer).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .trace_fn(telemetry::grpc_span)
            .add_service(ExchangeServiceServer::new(Probe {
                inner: ExchangeSvc { rt: rt.clone() },
                seen: seen.clone(),
            }))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let mut client = ExchangeServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();

    // 1. Allowed, continuing the caller's trace.
    let allowed_req = exchange_req(&issuer, "builder", &["read"]);
    let denied_req = exchange_req(&issuer, "builder", &["write"]);
    let tokens = [
        allowed_req.subject_token.clone(),
        denied_req.subject_token.clone(),
    ];
    let mut req = Request::new(allowed_req);
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01")
            .parse()
            .unwrap(),
    );
    client.exchange(req).await.unwrap();
    // 2. Denied by policy, a trace of its own.
    let status = client.exchange(denied_req).await.unwrap_err();
    assert_eq!(lanyard_testkit::reason(&status), "POLICY_DENIED");

    let rpc = "lanyard.v1.ExchangeService/Exchange";
    let spans = eventually("both RPC spans exported", || {
        let spans = exporter.get_finished_spans().unwrap();
        let n = spans.iter().filter(|s| s.name == rpc).count();
        async move { (n == 2).then_some(spans) }
    })
    .await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);

    // The allowed exchange: the caller's trace ID, the root's parent is the caller's
    // span, and every step is a descendant of the root.
    let caller = TraceId::from_hex(CALLER_TRACE).unwrap();
    let (allowed, root) = trace_of(&spans, caller);
    assert_eq!(root.name, rpc);
    assert_eq!(root.span_kind, SpanKind::Server);
    assert_eq!(root.parent_span_id, SpanId::from_hex(CALLER_SPAN).unwrap());
    assert!(root.parent_span_is_remote);
    assert_eq!(attr(&root, "rpc.system").as_deref(), Some("grpc"));
    assert_eq!(attr(&root, "rpc.method").as_deref(), Some("Exchange"));
    assert_eq!(attr(&root, "lanyard.reason"), None);
    for step in [
        "exchange",
        "token.verify",
        "jwks.fetch",
        "policy.decide",
        "destination.issue",
        "store.commit",
    ] {
        let s = allowed
            .iter()
            .find(|s| s.name == step)
            .unwrap_or_else(|| panic!("no {step} span in {:?}", names(&allowed)));
        assert!(
            descends(&allowed, s, &root),
            "{step} is not under the RPC span"
        );
    }
    let policy = allowed.iter().find(|s| s.name == "policy.decide").unwrap();
    assert_eq!(attr(policy, "lanyard.decision").as_deref(), Some("allow"));
    assert_eq!(
        attr(policy, "lanyard.policy_version").as_deref(),
        Some("test-1")
    );
    let fetch = allowed.iter().find(|s| s.name == "jwks.fetch").unwrap();
    assert_eq!(fetch.span_kind, SpanKind::Client);
    assert_eq!(attr(fetch, "issuer").as_deref(), Some("ci"));
    assert_eq!(
        seen[0].as_deref(),
        Some(CALLER_TRACE),
        "current_trace_id() in the handler"
    );

    // The denied exchange: a new trace, rooted at its RPC span, no issue step, the
    // reason on the root, and its denial committed to the audit stream.
    let denied_id = TraceId::from_hex(seen[1].as_deref().expect("a trace id")).unwrap();
    assert_ne!(denied_id, caller);
    let (denied, root) = trace_of(&spans, denied_id);
    assert_eq!(root.name, rpc);
    assert_eq!(root.parent_span_id, SpanId::INVALID);
    assert_eq!(
        attr(&root, "lanyard.reason").as_deref(),
        Some("POLICY_DENIED")
    );
    assert_eq!(attr(&root, "rpc.grpc.status_code").as_deref(), Some("7"));
    for step in ["exchange", "token.verify", "policy.decide", "store.commit"] {
        let s = denied
            .iter()
            .find(|s| s.name == step)
            .unwrap_or_else(|| panic!("no {step} span in {:?}", names(&denied)));
        assert!(
            descends(&denied, s, &root),
            "{step} is not under the RPC span"
        );
    }
    assert!(!denied.iter().any(|s| s.name == "destination.issue"));
    assert!(
        !denied.iter().any(|s| s.name == "jwks.fetch"),
        "keys were cached"
    );
    let policy = denied.iter().find(|s| s.name == "policy.decide").unwrap();
    assert_eq!(attr(policy, "lanyard.decision").as_deref(), Some("deny"));

    // No token text in any span attribute or span event.
    for s in &spans {
        let mut texts: Vec<String> = s.attributes.iter().map(|kv| kv.value.to_string()).collect();
        for ev in s.events.iter() {
            texts.push(ev.name.to_string());
            texts.extend(ev.attributes.iter().map(|kv| kv.value.to_string()));
        }
        for token in &tokens {
            let signature = token.rsplit('.').next().unwrap();
            assert!(
                !texts.iter().any(|t| t.contains(signature)),
                "token text in span {}",
                s.name
            );
        }
    }
}

fn names(spans: &[SpanData]) -> Vec<String> {
    spans.iter().map(|s| s.name.to_string()).collect()
}
