//! Audit sinks end to end against the real binary: the JSON-lines file copy, and an
//! OTLP logs sink that goes down. A dead sink never stops exchanges, except for a
//! destination that requires it (fail closed), which resumes by itself once the sink
//! catches up.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use lanyard_proto::v1 as pb;
use lanyard_testkit::{KeyAlg, Lanyard, LanyardOptions, TestIssuer, eventually, reason};
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{
    LogsService, LogsServiceServer,
};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use tonic::{Request, Response, Status};

/// An OTLP logs receiver that records `lanyard.audit.seq` of every record, and can be
/// switched to answer UNAVAILABLE.
#[derive(Clone, Default)]
struct Receiver {
    seqs: Arc<Mutex<Vec<i64>>>,
    down: Arc<AtomicBool>,
}

#[tonic::async_trait]
impl LogsService for Receiver {
    async fn export(
        &self,
        req: Request<ExportLogsServiceRequest>,
    ) -> Result<Response<ExportLogsServiceResponse>, Status> {
        if self.down.load(Ordering::SeqCst) {
            return Err(Status::unavailable("collector down for the test"));
        }
        let mut seqs = self.seqs.lock().unwrap();
        for rl in req.into_inner().resource_logs {
            for sl in rl.scope_logs {
                for r in sl.log_records {
                    let seq = r
                        .attributes
                        .iter()
                        .find(|kv| kv.key == "lanyard.audit.seq")
                        .and_then(|kv| kv.value.as_ref())
                        .and_then(|v| match &v.value {
                            Some(AnyValue::IntValue(i)) => Some(*i),
                            _ => None,
                        })
                        .expect("every record carries lanyard.audit.seq");
                    seqs.push(seq);
                }
            }
        }
        Ok(Response::new(ExportLogsServiceResponse {
            partial_success: None,
        }))
    }
}

impl Receiver {
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(LogsServiceServer::new(self.clone()))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        format!("http://{addr}")
    }
}

/// CI workloads may read any destination.
const ANY_DESTINATION: &str = r#"
@id("ci-any")
permit (principal, action, resource)
when { principal.id like "spiffe://lanyard.local/ci/*" && ["read"].containsAll(context.scopes) };
"#;

async fn head(l: &Lanyard) -> i64 {
    verify_chain(l).await.head_seq
}

async fn metrics(l: &Lanyard) -> String {
    reqwest::get(format!("{}/metrics", l.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_file_sink_holds_every_event_once_in_order() {
    let issuer = TestIssuer::start(KeyAlg::Es256).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("audit.jsonl");
    let l = Lanyard::start(LanyardOptions {
        policy: Some(POLICY.into()),
        extra_config: format!("[audit.file]\npath = {:?}\n", file.display().to_string()),
        ..Default::default()
    })
    .await;
    configure(&l, &issuer, Keys::Inline, KeyAlg::Es256, false).await;
    let mut c = l.exchange().await;
    for i in 0..5 {
        c.exchange(exchange_req(
            issuer.mint(&claims(&issuer, "builder", &format!("r{i}"))),
            &["read"],
        ))
        .await
        .unwrap();
    }
    let head = head(&l).await;
    let lines = eventually("every event in the file", || {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        async move {
            let lines: Vec<serde_json::Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            (lines.last().map(|l| l["seq"].as_i64().unwrap()) == Some(head)).then_some(lines)
        }
    })
    .await;
    let seqs: Vec<i64> = lines.iter().map(|l| l["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, (1..=head).collect::<Vec<_>>(), "once each, in order");
    // The same events as the store's, hashes included.
    let events = audit_events(&l).await;
    for (line, e) in lines.iter().zip(&events) {
        assert_eq!(line["hash"], e.hash.as_str());
        assert_eq!(line["kind"], e.kind.as_str());
        let event: serde_json::Value = serde_json::from_str(&e.payload_json).unwrap();
        assert_eq!(line["event"], event);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let m = eventually("the sink's lag metric at 0", || {
        let l = &l;
        async move {
            let m = metrics(l).await;
            m.contains("lanyard_audit_sink_lag_events{sink=\"file\"} 0")
                .then_some(m)
        }
    })
    .await;
    assert!(m.contains("lanyard_audit_head_seq"), "{m}");
}

#[tokio::test]
async fn a_dead_sink_stops_only_destinations_that_require_it() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let issuer = TestIssuer::start(KeyAlg::Es256).await;
    let l = Lanyard::start(LanyardOptions {
        policy: Some(ANY_DESTINATION.into()),
        extra_config: format!("[audit.otlp]\nendpoint = {endpoint:?}\ntimeout = \"2s\"\n"),
        ..Default::default()
    })
    .await;
    configure(&l, &issuer, Keys::Inline, KeyAlg::Es256, false).await;
    // `orders` requires the OTLP sink to be at most 3 events behind.
    let mut strict = orders_destination();
    strict.require_audit_sink = "otlp".into();
    strict.max_audit_lag = 3;
    let mut admin = l.admin().await;
    admin
        .put_destination(pb::PutDestinationRequest {
            destination: Some(strict),
            expected_revision: None,
        })
        .await
        .unwrap();
    // `relaxed` does not.
    let mut relaxed = orders_destination();
    relaxed.name = "relaxed".into();
    admin
        .put_destination(pb::PutDestinationRequest {
            destination: Some(relaxed),
            expected_revision: None,
        })
        .await
        .unwrap();
    // A destination cannot require a sink that does not exist.
    let mut bad = orders_destination();
    bad.name = "bad".into();
    bad.require_audit_sink = "syslog".into();
    let err = admin
        .put_destination(pb::PutDestinationRequest {
            destination: Some(bad),
            expected_revision: None,
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "CONFIG_INVALID");

    let mut c = l.exchange().await;
    let req = |dest: &str, run: &str| {
        let mut r = exchange_req(issuer.mint(&claims(&issuer, "builder", run)), &["read"]);
        r.destination = dest.into();
        r
    };
    // Healthy: both work (once the sink has caught up with the configuration events).
    eventually("an exchange for the strict destination", || {
        let mut c = c.clone();
        let r = req("orders", "warm");
        async move { c.exchange(r).await.ok() }
    })
    .await;

    // The collector goes down. Exchanges for `relaxed` go on; `orders` is refused once
    // the sink is more than 3 events behind.
    receiver.down.store(true, Ordering::SeqCst);
    for i in 0..5 {
        c.exchange(req("relaxed", &format!("relaxed-{i}")))
            .await
            .unwrap();
    }
    let refused = eventually("the strict destination refusing", || {
        let mut c = c.clone();
        let r = req("orders", "strict");
        async move { c.exchange(r).await.err() }
    })
    .await;
    assert_eq!(reason(&refused), "AUDIT_DELIVERY_LAGGING");
    assert!(refused.message().contains("otlp"), "{}", refused.message());
    c.exchange(req("relaxed", "still")).await.unwrap();
    // The lag metric shows the backlog (it is refreshed every second).
    eventually("the lag metric above 3", || {
        let l = &l;
        async move {
            let m = metrics(l).await;
            let lag: f64 = m
                .lines()
                .find(|l| l.starts_with("lanyard_audit_sink_lag_events{sink=\"otlp\"}"))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            (lag > 3.0).then_some(())
        }
    })
    .await;

    // The collector comes back: the sink catches up and `orders` works again by itself.
    receiver.down.store(false, Ordering::SeqCst);
    eventually("the strict destination working again", || {
        let mut c = c.clone();
        let r = req("orders", "again");
        async move { c.exchange(r).await.ok() }
    })
    .await;
    // Nothing was lost: every event reached the collector (at least once).
    let head = head(&l).await;
    let got = eventually("every event at the collector", || {
        let seqs: BTreeSet<i64> = receiver.seqs.lock().unwrap().iter().copied().collect();
        async move { (seqs.len() as i64 == head).then_some(seqs) }
    })
    .await;
    assert_eq!(got, (1..=head).collect::<BTreeSet<_>>());
}
