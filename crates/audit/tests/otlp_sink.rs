//! The OTLP logs sink against a real OTLP/gRPC logs receiver on loopback, fed by a real
//! SQLite audit chain through `SinkRunner`: every event arrives once and in order with
//! its fields, an unavailable collector loses nothing, a restarted sink resumes after its
//! cursor, and a corrupt cursor is an error rather than a silent restart.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{
    LogsService, LogsServiceServer,
};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::logs::v1::{LogRecord, SeverityNumber};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use lanyard_audit::sink::otlp::OtlpSink;
use lanyard_audit::sink::{Sink, SinkRunner, SinkStatus};
use lanyard_store::{AuditRecord, NewAuditEvent, Store};
use lanyard_store_sqlite::SqliteStore;

const SERVICE: &str = "lanyard-test";
const TIMEOUT: Duration = Duration::from_secs(5);

// === the receiver ===

/// One log record as received, with where it sat in its request.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    scope: String,
    record: LogRecord,
}

/// An OTLP logs receiver that records every accepted record. Switches make it answer
/// UNAVAILABLE, reject records (partial success), or not answer at all.
#[derive(Clone, Default)]
struct Receiver {
    records: Arc<Mutex<Vec<Received>>>,
    requests: Arc<AtomicUsize>,
    unavailable: Arc<AtomicBool>,
    reject: Arc<AtomicI64>,
    stall: Arc<AtomicBool>,
}

#[tonic::async_trait]
impl LogsService for Receiver {
    async fn export(
        &self,
        req: Request<ExportLogsServiceRequest>,
    ) -> Result<Response<ExportLogsServiceResponse>, Status> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        if self.stall.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if self.unavailable.load(Ordering::SeqCst) {
            // A collector's message may quote what it was sent; the sink must not repeat it.
            return Err(Status::unavailable(
                "collector overloaded: body=SECRET-BODY",
            ));
        }
        let reject = self.reject.load(Ordering::SeqCst);
        if reject > 0 {
            return Ok(Response::new(ExportLogsServiceResponse {
                partial_success: Some(ExportLogsPartialSuccess {
                    rejected_log_records: reject,
                    error_message: "record too large: SECRET-BODY".into(),
                }),
            }));
        }
        let mut records = self.records.lock().unwrap();
        for rl in req.into_inner().resource_logs {
            let service = rl
                .resource
                .as_ref()
                .and_then(|r| string_attr(&r.attributes, "service.name"))
                .unwrap_or_default();
            for sl in rl.scope_logs {
                let scope = sl.scope.map(|s| s.name).unwrap_or_default();
                for record in sl.log_records {
                    records.push(Received {
                        service: service.clone(),
                        scope: scope.clone(),
                        record,
                    });
                }
            }
        }
        Ok(Response::new(ExportLogsServiceResponse {
            partial_success: None,
        }))
    }
}

impl Receiver {
    /// Start on 127.0.0.1; returns the endpoint URL.
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

    fn received(&self) -> Vec<Received> {
        self.records.lock().unwrap().clone()
    }

    fn seqs(&self) -> Vec<i64> {
        self.received().iter().map(|r| seq_of(&r.record)).collect()
    }
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn string_attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    match attr(attrs, key)? {
        Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn seq_of(r: &LogRecord) -> i64 {
    match attr(&r.attributes, "lanyard.audit.seq") {
        Some(Value::IntValue(i)) => *i,
        other => panic!("lanyard.audit.seq is {other:?}"),
    }
}

// === the chain ===

struct Chain {
    dir: tempfile::TempDir,
    store: SqliteStore,
    committed: watch::Sender<i64>,
}

impl Chain {
    async fn new() -> Chain {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("lanyard.db"))
            .await
            .unwrap();
        Chain {
            dir,
            store,
            committed: watch::channel(0).0,
        }
    }

    fn cursor(&self) -> PathBuf {
        self.dir.path().join("state").join("otlp.cursor")
    }

    /// Append `n` events, alternating granted (with a trace ID) and denied, and tell the
    /// runner as the server's committer does. Returns the new head.
    async fn append(&self, n: usize) -> i64 {
        let (head, _) = self.store.audit_head().await.unwrap();
        let mut last = head;
        for i in 0..n {
            let k = head + i as i64 + 1;
            let ev = if k % 2 == 1 {
                NewAuditEvent {
                    time_ms: 1_700_000_000_000 + k,
                    kind: "exchange.granted".into(),
                    trace_id: Some(format!("{:032x}", 0xabc0_0000 + k)),
                    workload_id: Some(format!("spiffe://lanyard.local/w/{k}")),
                    destination: Some("orders".into()),
                    decision: Some("allow".into()),
                    scopes: vec!["read".into()],
                    ..NewAuditEvent::default()
                }
            } else {
                NewAuditEvent {
                    time_ms: 1_700_000_000_000 + k,
                    kind: "exchange.denied".into(),
                    workload_id: Some(format!("spiffe://lanyard.local/w/{k}")),
                    destination: Some("orders".into()),
                    decision: Some("deny".into()),
                    reason: Some("POLICY_DENIED".into()),
                    ..NewAuditEvent::default()
                }
            };
            let seqs = self.store.audit_append(&[ev]).await.unwrap();
            last = *seqs.last().unwrap();
        }
        self.committed.send_replace(last);
        last
    }

    async fn records(&self) -> Vec<AuditRecord> {
        self.store.audit_list(0, 10_000).await.unwrap()
    }

    /// Run a runner for `sink` in a task; returns its status, the shutdown switch and
    /// the task.
    fn run(&self, sink: OtlpSink) -> Running {
        let (runner, status) = SinkRunner::new(
            Arc::new(self.store.clone()),
            Arc::new(sink),
            self.committed.subscribe(),
        );
        let (shutdown, shutdown_rx) = watch::channel(false);
        let task = tokio::spawn(runner.run(shutdown_rx));
        Running {
            status,
            shutdown,
            task,
        }
    }
}

struct Running {
    status: Arc<SinkStatus>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        self.shutdown.send_replace(true);
        tokio::time::timeout(TIMEOUT, self.task)
            .await
            .expect("the runner stops on shutdown")
            .unwrap();
    }

    /// Wait until the sink has delivered up to `head` with nothing left.
    async fn caught_up(&self, head: i64) {
        let s = &self.status;
        eventually(&format!("the sink delivers up to {head}"), || async {
            (s.delivered() == head && s.head() == head && s.lag() == 0).then_some(())
        })
        .await;
    }
}

fn sink(endpoint: &str, cursor: &Path) -> OtlpSink {
    OtlpSink::new(endpoint, SERVICE, cursor.to_path_buf(), TIMEOUT).unwrap()
}

/// Poll `check` until it returns `Some`, or panic after 20 s.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn range(from: i64, to: i64) -> Vec<i64> {
    (from..=to).collect()
}

// === tests ===

#[tokio::test]
async fn every_event_arrives_once_in_order_with_its_fields() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let chain = Chain::new().await;
    // Some events before the sink starts, some while it runs (woken by `committed`).
    chain.append(7).await;
    let running = chain.run(sink(&endpoint, &chain.cursor()));
    running.caught_up(7).await;
    let head = chain.append(14).await;
    assert_eq!(head, 21);
    running.caught_up(head).await;
    running.stop().await;

    let received = receiver.received();
    assert_eq!(receiver.seqs(), range(1, head), "once each, in order");
    let records = chain.records().await;
    for (got, ev) in received.iter().zip(&records) {
        let r = &got.record;
        assert_eq!(got.service, SERVICE);
        assert_eq!(got.scope, "lanyard.audit");
        assert_eq!(seq_of(r), ev.seq);
        assert_eq!(r.time_unix_nano, ev.time_ms as u64 * 1_000_000);
        assert!(r.observed_time_unix_nano > 1_700_000_000_000_000_000);
        assert_eq!(r.severity_number, SeverityNumber::Info as i32);
        assert_eq!(r.severity_text, "INFO");
        assert_eq!(r.event_name, ev.kind);
        assert_eq!(
            r.body.as_ref().and_then(|b| b.value.clone()),
            Some(Value::StringValue(ev.payload.clone())),
            "the body is the stored payload, byte for byte"
        );
        let a = |k| string_attr(&r.attributes, k);
        assert_eq!(a("lanyard.audit.kind"), Some(ev.kind.clone()));
        assert_eq!(a("lanyard.audit.hash"), Some(ev.hash.clone()));
        assert_eq!(a("lanyard.audit.prev_hash"), Some(ev.prev_hash.clone()));
        assert_eq!(
            a("lanyard.workload_id"),
            Some(format!("spiffe://lanyard.local/w/{}", ev.seq))
        );
        assert_eq!(a("lanyard.destination").as_deref(), Some("orders"));
        if ev.kind == "exchange.granted" {
            assert_eq!(a("lanyard.decision").as_deref(), Some("allow"));
            assert_eq!(a("lanyard.reason"), None);
            assert_eq!(
                hex(&r.trace_id),
                format!("{:032x}", 0xabc0_0000 + ev.seq),
                "the record links to the event's trace"
            );
        } else {
            assert_eq!(a("lanyard.decision").as_deref(), Some("deny"));
            assert_eq!(a("lanyard.reason").as_deref(), Some("POLICY_DENIED"));
            assert!(r.trace_id.is_empty(), "no trace ID in the event, none sent");
        }
    }

    // The cursor is durable, private, and what a new sink resumes after.
    assert_eq!(
        std::fs::read_to_string(chain.cursor()).unwrap(),
        format!("{head}\n")
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(chain.cursor())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let again = sink(&endpoint, &chain.cursor());
    assert_eq!(again.name(), "otlp");
    assert_eq!(again.resume_after().await.unwrap(), head);
}

#[tokio::test]
async fn an_unavailable_collector_loses_nothing() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let chain = Chain::new().await;
    chain.append(5).await;
    let running = chain.run(sink(&endpoint, &chain.cursor()));
    running.caught_up(5).await;
    assert_eq!(running.status.failures(), 0);

    receiver.unavailable.store(true, Ordering::SeqCst);
    assert_eq!(chain.append(10).await, 15);
    let s = &running.status;
    let error = eventually("the sink fails and lags", || async {
        let err = s.last_error()?;
        (s.failures() >= 2 && s.lag() == 10).then_some(err)
    })
    .await;
    assert!(error.contains("UNAVAILABLE"), "{error}");
    assert!(
        !error.contains("SECRET"),
        "the collector's text leaked: {error}"
    );
    assert!(
        !error.contains("spiffe://"),
        "event contents leaked: {error}"
    );
    assert_eq!(s.delivered(), 5);
    assert_eq!(
        std::fs::read_to_string(chain.cursor()).unwrap(),
        "5\n",
        "a refused batch does not move the cursor"
    );
    // More events while it is down: the lag grows with them.
    let head = chain.append(3).await;
    eventually("the lag grows", || async { (s.lag() == 13).then_some(()) }).await;

    receiver.unavailable.store(false, Ordering::SeqCst);
    running.caught_up(head).await;
    assert_eq!(running.status.last_error(), None);
    running.stop().await;

    // The receiver keeps only what it accepted, so every refused batch was offered again
    // and nothing was sent twice after being accepted (the sink never lost its cursor
    // here, so not even an at-least-once re-send may appear).
    let seqs = receiver.seqs();
    assert_eq!(
        seqs.iter().copied().collect::<BTreeSet<_>>(),
        range(1, head).into_iter().collect(),
        "nothing missing"
    );
    assert_eq!(seqs, range(1, head), "nothing duplicated, in order");
    assert_eq!(
        std::fs::read_to_string(chain.cursor()).unwrap(),
        format!("{head}\n")
    );
}

#[tokio::test]
async fn a_restarted_sink_resumes_after_its_cursor() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let chain = Chain::new().await;
    let first = chain.append(10).await;
    let running = chain.run(sink(&endpoint, &chain.cursor()));
    running.caught_up(first).await;
    running.stop().await;
    let requests_before = receiver.requests.load(Ordering::SeqCst);

    // Written while no sink runs.
    let head = chain.append(6).await;
    let running = chain.run(sink(&endpoint, &chain.cursor()));
    running.caught_up(head).await;
    running.stop().await;

    assert_eq!(receiver.seqs(), range(1, head), "no re-delivery");
    let resent: Vec<i64> = receiver.received()[first as usize..]
        .iter()
        .map(|r| seq_of(&r.record))
        .collect();
    assert_eq!(resent, range(first + 1, head));
    assert!(receiver.requests.load(Ordering::SeqCst) > requests_before);
}

#[tokio::test]
async fn a_corrupt_cursor_file_is_an_error() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let chain = Chain::new().await;
    let cursor = chain.cursor();
    let s = sink(&endpoint, &cursor);

    // Missing: nothing delivered yet.
    assert_eq!(s.resume_after().await.unwrap(), 0);
    std::fs::create_dir_all(cursor.parent().unwrap()).unwrap();
    for bad in ["", "garbage\n", "-3\n", "12 13\n", "SECRET\n"] {
        std::fs::write(&cursor, bad).unwrap();
        let e = s.resume_after().await.unwrap_err();
        assert_eq!(e.sink, "otlp");
        assert!(
            e.message.contains(&cursor.display().to_string()),
            "the error names the file: {e}"
        );
        assert!(e.message.contains("corrupt"), "{e}");
        assert!(!e.message.contains("SECRET"), "{e}");
    }

    // A runner does not start over from 0: it reports the error and delivers nothing
    // until the file is fixed, then resumes after what it says.
    std::fs::write(&cursor, "garbage\n").unwrap();
    let head = chain.append(6).await;
    let running = chain.run(s);
    let st = &running.status;
    let error = eventually("the runner reports the corrupt cursor", || async {
        let err = st.last_error()?;
        (st.failures() >= 1).then_some(err)
    })
    .await;
    assert!(error.contains("corrupt"), "{error}");
    assert_eq!(st.delivered(), 0);
    assert!(st.lag() > 0, "not started: counted as lagging");
    assert!(receiver.received().is_empty());

    std::fs::write(&cursor, "4\n").unwrap();
    running.caught_up(head).await;
    running.stop().await;
    assert_eq!(receiver.seqs(), range(5, head));
}

#[tokio::test]
async fn partial_success_and_timeouts_are_errors() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let chain = Chain::new().await;
    chain.append(4).await;
    let events = chain.records().await;

    receiver.reject.store(2, Ordering::SeqCst);
    let s = sink(&endpoint, &chain.cursor());
    let e = s.deliver(&events).await.unwrap_err();
    assert!(e.message.contains("rejected 2 of 4"), "{e}");
    assert!(!e.message.contains("SECRET"), "{e}");
    assert!(!chain.cursor().exists(), "the cursor moves only on success");
    receiver.reject.store(0, Ordering::SeqCst);

    receiver.stall.store(true, Ordering::SeqCst);
    let s = OtlpSink::new(
        &endpoint,
        SERVICE,
        chain.cursor(),
        Duration::from_millis(200),
    )
    .unwrap();
    let e = s.deliver(&events).await.unwrap_err();
    assert!(e.message.contains("timed out"), "{e}");
    assert!(!chain.cursor().exists());
    receiver.stall.store(false, Ordering::SeqCst);

    s.deliver(&events).await.unwrap();
    assert_eq!(s.resume_after().await.unwrap(), 4);
    assert_eq!(receiver.seqs(), range(1, 4));
    // Nothing to send is not a request.
    let requests = receiver.requests.load(Ordering::SeqCst);
    s.deliver(&[]).await.unwrap();
    assert_eq!(receiver.requests.load(Ordering::SeqCst), requests);
}

#[tokio::test]
async fn a_down_collector_does_not_stop_construction() {
    // A port with nothing listening on it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let chain = Chain::new().await;
    chain.append(2).await;
    let s = sink(&endpoint, &chain.cursor());
    let e = s.deliver(&chain.records().await).await.unwrap_err();
    assert!(e.message.contains("UNAVAILABLE"), "{e}");
    // Our own transport's cause is shown (the collector's text never is).
    assert!(e.message.contains("connect"), "{e}");
    assert!(!e.message.contains("spiffe://"), "{e}");
    assert!(!chain.cursor().exists());
}

#[tokio::test]
async fn malformed_endpoints_are_refused() {
    let cursor = PathBuf::from("/nonexistent/otlp.cursor");
    for (endpoint, says) in [
        ("not a uri", "not a valid URI"),
        ("", "not a valid URI"),
        ("127.0.0.1:4317", "http://"),
        ("ftp://127.0.0.1:4317", "http://"),
        ("https://collector:4317", "https"),
        ("/just/a/path", "http://"),
    ] {
        let e = OtlpSink::new(endpoint, SERVICE, cursor.clone(), TIMEOUT)
            .err()
            .unwrap_or_else(|| panic!("{endpoint:?} was accepted"));
        assert_eq!(e.sink, "otlp");
        assert!(e.message.contains(says), "{endpoint:?}: {e}");
    }
    let ok = "http://127.0.0.1:4317";
    assert!(OtlpSink::new(ok, "", cursor.clone(), TIMEOUT).is_err());
    assert!(OtlpSink::new(ok, SERVICE, cursor.clone(), Duration::ZERO).is_err());
    assert!(OtlpSink::new(ok, SERVICE, cursor, TIMEOUT).is_ok());
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
