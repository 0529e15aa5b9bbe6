//! Telemetry end to end: the real binary exports traces over OTLP/gRPC to a receiver
//! this test runs on loopback, and serves Prometheus metrics that move with allowed and
//! denied exchanges.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use lanyard_testkit::{KeyAlg, Lanyard, LanyardOptions, TestIssuer, eventually, reason};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use tonic::{Request, Response, Status};

const EXCHANGE: &str = "lanyard.v1.ExchangeService/Exchange";

/// An OTLP trace receiver: keeps every span with its resource's `service.name`.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| string_attr(&r.attributes, "service.name"))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push((service.clone(), span));
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Receiver {
    /// Start on 127.0.0.1; returns the endpoint URL.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        format!("http://{addr}")
    }

    fn spans(&self) -> Vec<(String, Span)> {
        self.spans.lock().unwrap().clone()
    }
}

fn string_attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    attrs.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(s) => Some(s.clone()),
            AnyValue::IntValue(i) => Some(i.to_string()),
            _ => None,
        }
    })
}

async fn start_traced(endpoint: &str, schedule_delay_ms: u32) -> (Lanyard, TestIssuer) {
    // The batch delay is the SDK's standard variable, read by the child process.
    let issuer = TestIssuer::start(KeyAlg::Es256).await;
    let l = Lanyard::start(LanyardOptions {
        policy: Some(POLICY.into()),
        extra_config: "[telemetry]\nservice_name = \"lanyard-e2e\"\n".into(),
        env: vec![
            (
                "LANYARD_TELEMETRY__OTLP_ENDPOINT".into(),
                endpoint.to_string(),
            ),
            (
                "OTEL_BSP_SCHEDULE_DELAY".into(),
                schedule_delay_ms.to_string(),
            ),
        ],
        ..Default::default()
    })
    .await;
    configure(&l, &issuer, Keys::JwksUrl, KeyAlg::Es256, false).await;
    (l, issuer)
}

async fn scrape(l: &Lanyard) -> String {
    let resp = reqwest::get(format!("{}/metrics", l.http)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    resp.text().await.unwrap()
}

/// The value of the sample whose name and labels are exactly `series`, or 0 when the
/// series is absent (a counter never incremented has no sample yet).
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(series)?;
            rest.starts_with(' ').then(|| rest.trim().parse().unwrap())
        })
        .unwrap_or(0.0)
}

#[tokio::test]
async fn exchanges_are_traced_over_otlp_and_counted_in_metrics() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let (l, issuer) = start_traced(&endpoint, 100).await;
    let mut client = l.exchange().await;

    let allow = r#"lanyard_exchanges_total{decision="allow",destination="orders"}"#;
    let deny = r#"lanyard_exchanges_total{decision="deny",destination="orders"}"#;
    let deny_unknown = r#"lanyard_exchanges_total{decision="deny",destination="(unknown)"}"#;
    let allow_count =
        r#"lanyard_exchange_duration_seconds_count{decision="allow",destination="orders"}"#;
    let deny_count =
        r#"lanyard_exchange_duration_seconds_count{decision="deny",destination="orders"}"#;
    let allow_slow_bucket = r#"lanyard_exchange_duration_seconds_bucket{decision="allow",destination="orders",le="+Inf"}"#;
    let policy_denied = r#"lanyard_denials_total{reason="POLICY_DENIED",rpc="exchange"}"#;
    let unknown_dest = r#"lanyard_denials_total{reason="DESTINATION_UNKNOWN",rpc="exchange"}"#;
    let fetches = r#"lanyard_jwks_fetches_total{issuer="ci"}"#;
    let fetch_failures = r#"lanyard_jwks_fetch_failures_total{issuer="ci"}"#;
    let releases = r#"lanyard_releases_total{decision="allow"}"#;

    let before = scrape(&l).await;
    for series in [allow, deny, allow_count, policy_denied, fetches, releases] {
        assert_eq!(value(&before, series), 0.0, "{series} before any exchange");
    }
    assert_eq!(value(&before, "lanyard_grants_active"), 0.0);

    // Allowed, as part of a caller's trace.
    let caller_trace = "0af7651916cd43dd8448eb211c80319c";
    let caller_span = "b7ad6b7169203331";
    let mut req = Request::new(exchange_req(
        issuer.mint(&claims(&issuer, "builder", "run-1")),
        &["read"],
    ));
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{caller_trace}-{caller_span}-01")
            .parse()
            .unwrap(),
    );
    let granted = client.exchange(req).await.unwrap().into_inner();
    // Denied by policy (`admin` is offered by the destination, not allowed by policy).
    let token = issuer.mint(&claims(&issuer, "builder", "run-2"));
    let e = client
        .exchange(exchange_req(token.clone(), &["admin"]))
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "POLICY_DENIED");
    // A destination that does not exist is counted without minting a label for it.
    let mut req = exchange_req(token, &["read"]);
    req.destination = "no-such-destination".into();
    let e = client.exchange(req).await.unwrap_err();
    assert_eq!(reason(&e), "DESTINATION_UNKNOWN");

    let after = scrape(&l).await;
    assert_eq!(value(&after, allow), 1.0, "{after}");
    assert_eq!(value(&after, deny), 1.0);
    assert_eq!(value(&after, deny_unknown), 1.0);
    assert_eq!(value(&after, allow_count), 1.0);
    assert_eq!(value(&after, deny_count), 1.0);
    assert_eq!(value(&after, allow_slow_bucket), 1.0);
    assert!(
        value(
            &after,
            r#"lanyard_exchange_duration_seconds_sum{decision="allow",destination="orders"}"#
        ) > 0.0
    );
    assert_eq!(value(&after, policy_denied), 1.0);
    assert_eq!(value(&after, unknown_dest), 1.0);
    assert!(
        !after.contains("no-such-destination"),
        "request text became a label"
    );
    assert_eq!(value(&after, fetches), 1.0);
    assert_eq!(value(&after, fetch_failures), 0.0);
    assert_eq!(
        value(&after, r#"lanyard_issuer_keys_stale{issuer="ci"}"#),
        0.0
    );
    assert_eq!(value(&after, r#"lanyard_issuer_keys{issuer="ci"}"#), 1.0);
    assert!(after.contains(r#"lanyard_issuer_keys_age_seconds{issuer="ci"}"#));
    // The active-grant count is cached for a few seconds; it catches up.
    eventually("lanyard_grants_active = 1", || {
        let l = &l;
        async move { (value(&scrape(l).await, "lanyard_grants_active") == 1.0).then_some(()) }
    })
    .await;

    // Release is counted too.
    client
        .release(lanyard_proto::v1::ReleaseRequest {
            grant_id: granted.grant_id.clone(),
            subject_token: issuer.mint(&claims(&issuer, "builder", "run-1")),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(value(&scrape(&l).await, releases), 1.0);

    // The allowed exchange's spans reach the receiver: one trace, the caller's, rooted
    // at the RPC span whose parent is the caller's span, with every step under it.
    let spans = eventually("the Exchange spans at the OTLP receiver", || {
        let spans = receiver.spans();
        async move {
            let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
            let mine: Vec<(String, Span)> = spans
                .into_iter()
                .filter(|(_, s)| hex(&s.trace_id) == caller_trace)
                .collect();
            let steps = [
                "exchange",
                "token.verify",
                "jwks.fetch",
                "policy.decide",
                "destination.issue",
                "store.commit",
            ];
            let complete = mine.iter().any(|(_, s)| s.name == EXCHANGE)
                && steps.iter().all(|w| mine.iter().any(|(_, s)| s.name == *w));
            complete.then_some(mine)
        }
    })
    .await;
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let (service, root) = spans.iter().find(|(_, s)| s.name == EXCHANGE).unwrap();
    assert_eq!(service, "lanyard-e2e");
    assert_eq!(hex(&root.parent_span_id), caller_span);
    assert_eq!(
        root.kind,
        opentelemetry_proto::tonic::trace::v1::span::SpanKind::Server as i32
    );
    assert_eq!(
        string_attr(&root.attributes, "rpc.service").as_deref(),
        Some("lanyard.v1.ExchangeService")
    );
    let by_id: std::collections::HashMap<Vec<u8>, &Span> =
        spans.iter().map(|(_, s)| (s.span_id.clone(), s)).collect();
    for (_, s) in &spans {
        if s.span_id == root.span_id {
            continue;
        }
        // Walk up to the root.
        let mut cur = s;
        let mut hops = 0;
        while cur.parent_span_id != root.span_id {
            cur = by_id
                .get(&cur.parent_span_id)
                .unwrap_or_else(|| panic!("span {} is not under the RPC span", s.name));
            hops += 1;
            assert!(hops < 16);
        }
    }
    // The audit event of that exchange carries the same trace ID: from an audit record
    // to its trace, and back.
    let events = audit_events(&l).await;
    let ev: serde_json::Value = events
        .iter()
        .filter(|e| e.kind == "exchange.granted")
        .map(|e| serde_json::from_str(&e.payload_json).unwrap())
        .find(|p: &serde_json::Value| p["grant_id"] == granted.grant_id.as_str())
        .expect("the granted event");
    assert_eq!(ev["trace_id"], caller_trace, "{ev}");
    let denied: serde_json::Value = events
        .iter()
        .filter(|e| e.kind == "exchange.denied")
        .map(|e| serde_json::from_str(&e.payload_json).unwrap())
        .find(|p: &serde_json::Value| p["reason"] == "POLICY_DENIED")
        .expect("the denied event");
    let denied_trace = denied["trace_id"]
        .as_str()
        .expect("denials carry a trace ID too");
    assert_eq!(denied_trace.len(), 32);
    assert_ne!(denied_trace, caller_trace);

    // The denied exchange and the release are traces of their own.
    let all = receiver.spans();
    let roots: Vec<&Span> = all
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.name == EXCHANGE && hex(&s.trace_id) != caller_trace)
        .collect();
    eventually("the denied Exchange spans", || {
        let n = receiver
            .spans()
            .iter()
            .filter(|(_, s)| s.name == EXCHANGE)
            .count();
        async move { (n == 3).then_some(()) }
    })
    .await;
    for r in roots {
        assert!(r.parent_span_id.is_empty(), "a new trace has no parent");
    }
    let denied_reasons: Vec<String> = receiver
        .spans()
        .iter()
        .filter(|(_, s)| s.name == EXCHANGE)
        .filter_map(|(_, s)| string_attr(&s.attributes, "lanyard.reason"))
        .collect();
    assert!(
        denied_reasons.contains(&"POLICY_DENIED".to_string()),
        "{denied_reasons:?}"
    );
    assert!(denied_reasons.contains(&"DESTINATION_UNKNOWN".to_string()));
    assert_eq!(l.stop().await, Some(0));
}

#[tokio::test]
async fn graceful_shutdown_flushes_the_last_spans() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    // A 10-minute batch delay: nothing is exported unless shutdown flushes it.
    let (l, issuer) = start_traced(&endpoint, 600_000).await;
    l.exchange()
        .await
        .exchange(exchange_req(
            issuer.mint(&claims(&issuer, "builder", "run-1")),
            &["read"],
        ))
        .await
        .unwrap();
    assert!(
        !receiver.spans().iter().any(|(_, s)| s.name == EXCHANGE),
        "exported before shutdown"
    );
    assert_eq!(l.stop().await, Some(0));
    assert!(
        receiver.spans().iter().any(|(_, s)| s.name == EXCHANGE),
        "the Exchange span was not flushed on shutdown"
    );
}

#[tokio::test]
async fn tracing_off_by_default_still_serves_metrics() {
    let (l, issuer) = start(KeyAlg::Es256, Keys::JwksUrl).await;
    l.exchange()
        .await
        .exchange(exchange_req(
            issuer.mint(&claims(&issuer, "builder", "run-1")),
            &["read"],
        ))
        .await
        .unwrap();
    let text = scrape(&l).await;
    assert_eq!(
        value(
            &text,
            r#"lanyard_exchanges_total{decision="allow",destination="orders"}"#
        ),
        1.0
    );
    assert!(!l.log().contains("exporting traces over OTLP"));
}
