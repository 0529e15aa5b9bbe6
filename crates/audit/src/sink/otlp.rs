//! The OpenTelemetry logs sink: copies audit events to an OTLP/gRPC collector, one log
//! record per event, and keeps its own cursor file (the last sequence number the
//! collector acknowledged).
//!
//! Each [`Sink::deliver`] call is one `ExportLogsServiceRequest`: one `ResourceLogs`
//! (`service.name`), one `ScopeLogs` (`lanyard.audit`), one `LogRecord` per event. The
//! record's body is the event's stored JSON text, unchanged, so a consumer can recompute
//! the chain hash; the fields a SIEM filters on are copied into attributes:
//!
//! | attribute | from |
//! |---|---|
//! | `lanyard.audit.seq` (int) | the chain sequence number |
//! | `lanyard.audit.kind` | the event kind (also the record's `event_name`) |
//! | `lanyard.audit.hash`, `lanyard.audit.prev_hash` | the chain hashes (hex) |
//! | `lanyard.workload_id`, `lanyard.destination`, `lanyard.decision`, `lanyard.reason` | the payload, when present |
//!
//! The payload's `trace_id` (32 hex digits) becomes the record's `trace_id`, so a log
//! record links to the trace of the RPC that wrote it.
//!
//! ## Delivery is at least once
//! The cursor is written (temp file, fsync, rename, fsync of the directory) only after
//! the collector has answered OK. A crash or a failed cursor write between the two sends
//! that batch again, and a collector that accepts part of a batch
//! (`partial_success.rejected_log_records > 0`) is answered by sending the whole batch
//! again. **Consumers dedupe on `lanyard.audit.seq`**: a given seq always carries the
//! same body and hash.
//!
//! ## Why a cursor file
//! A collector cannot be asked what it already holds, so the sink remembers it itself.
//! A missing file means nothing was delivered yet (start from the beginning); a file that
//! cannot be read or parsed is an error, never a silent restart from 0, which would
//! flood the collector with the whole history. Remove the file by hand to re-deliver
//! everything.
//!
//! ## Limits
//! Only `http://` endpoints (plaintext gRPC, e.g. a collector sidecar on loopback); TLS
//! is not configured here. One batch is one request, so a collector's request size
//! limit (commonly 4 MiB) bounds `BATCH` times the largest payload.

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber};
use opentelemetry_proto::tonic::resource::v1::Resource;
use tonic::transport::{Channel, Endpoint, Uri};

use lanyard_core::{SharedClock, SystemClock};
use lanyard_store::AuditRecord;

use super::{Sink, SinkError};

/// The sink's name: the metric label and what `require_audit_sink` names.
const NAME: &str = "otlp";
/// The instrumentation scope every record is sent under.
pub const SCOPE: &str = "lanyard.audit";

/// Copies audit events to an OTLP/gRPC logs collector. See the module docs.
pub struct OtlpSink {
    client: LogsServiceClient<Channel>,
    service_name: String,
    cursor_file: PathBuf,
    timeout: Duration,
    clock: SharedClock,
    /// Held for a whole delivery so cursor writes never interleave.
    delivering: tokio::sync::Mutex<()>,
}

// === impl OtlpSink ===

impl OtlpSink {
    /// A sink exporting to `endpoint` (`http://host:port`) as `service_name`, keeping
    /// its cursor in `cursor_file`, giving each export (connecting included) `timeout`.
    ///
    /// Nothing is connected yet: the first delivery connects, so lanyard starts while
    /// the collector is down. Must be called inside a Tokio runtime.
    ///
    /// # Errors
    /// [`SinkError`] when the endpoint is not an `http://host[:port]` URI, the service
    /// name is empty, the timeout is zero, or there is no Tokio runtime.
    pub fn new(
        endpoint: &str,
        service_name: &str,
        cursor_file: PathBuf,
        timeout: Duration,
    ) -> Result<Self, SinkError> {
        let uri: Uri = endpoint.parse().map_err(|e| {
            sink_error(format!(
                "endpoint is not a valid URI ({e}); expected http://host:port"
            ))
        })?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(sink_error(
                    "https endpoints are not supported (no TLS for this sink); use http:// to a local collector".into(),
                ));
            }
            _ => {
                return Err(sink_error(
                    "endpoint must start with http://, e.g. http://127.0.0.1:4317".into(),
                ));
            }
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(sink_error(
                "endpoint has no host; expected http://host:port".into(),
            ));
        }
        if service_name.trim().is_empty() {
            return Err(sink_error("service name is empty".into()));
        }
        if timeout.is_zero() {
            return Err(sink_error("timeout must be greater than zero".into()));
        }
        if cursor_file.file_name().is_none() {
            return Err(sink_error(format!(
                "cursor file {} is not a file path",
                cursor_file.display()
            )));
        }
        // `connect_lazy` spawns the channel's worker; without a runtime it would panic.
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(sink_error("must be created inside a Tokio runtime".into()));
        }
        // The whole export, connecting included, is bounded by `timeout` in `export`;
        // tonic's own request timeout is left off so a timeout always reads as one.
        let channel = Endpoint::from(uri).connect_timeout(timeout).connect_lazy();
        Ok(Self {
            client: LogsServiceClient::new(channel),
            service_name: service_name.to_owned(),
            cursor_file,
            timeout,
            clock: SystemClock::shared(),
            delivering: tokio::sync::Mutex::new(()),
        })
    }

    /// Read "now" (the records' `observed_time_unix_nano`) from `clock` instead of the
    /// wall clock.
    #[must_use]
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// Where the cursor is kept.
    pub fn cursor_file(&self) -> &Path {
        &self.cursor_file
    }

    /// The export request for `events`, observed at `observed_ms`.
    fn request(&self, events: &[AuditRecord], observed_ms: i64) -> ExportLogsServiceRequest {
        let observed = millis_to_nanos(observed_ms);
        ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: Some(Resource {
                    attributes: vec![string_kv("service.name", &self.service_name)],
                    ..Default::default()
                }),
                scope_logs: vec![ScopeLogs {
                    scope: Some(InstrumentationScope {
                        name: SCOPE.to_owned(),
                        version: env!("CARGO_PKG_VERSION").to_owned(),
                        ..Default::default()
                    }),
                    log_records: events.iter().map(|e| log_record(e, observed)).collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    /// Send `events` and check the answer. Messages name the failure, never contents.
    async fn export(&self, events: &[AuditRecord]) -> Result<(), SinkError> {
        let req = self.request(events, self.clock.now_unix_millis());
        let mut client = self.client.clone();
        let answer = tokio::time::timeout(self.timeout, client.export(req)).await;
        let resp = match answer {
            Err(_) => {
                return Err(sink_error(format!(
                    "export of {} events timed out after {:?}",
                    events.len(),
                    self.timeout
                )));
            }
            Ok(Err(status)) => return Err(sink_error(status_message(&status))),
            Ok(Ok(resp)) => resp.into_inner(),
        };
        // The collector's `error_message` is not repeated: it may quote the records.
        match resp.partial_success {
            Some(p) if p.rejected_log_records > 0 => Err(sink_error(format!(
                "collector rejected {} of {} log records (partial success); the batch will be sent again",
                p.rejected_log_records,
                events.len()
            ))),
            _ => Ok(()),
        }
    }
}

#[async_trait::async_trait]
impl Sink for OtlpSink {
    fn name(&self) -> &str {
        NAME
    }

    async fn resume_after(&self) -> Result<i64, SinkError> {
        read_cursor(&self.cursor_file).await
    }

    async fn deliver(&self, events: &[AuditRecord]) -> Result<(), SinkError> {
        let Some(last) = events.last() else {
            return Ok(());
        };
        let _one_at_a_time = self.delivering.lock().await;
        self.export(events).await?;
        // Exported but not yet recorded: a crash or failure from here on sends this batch
        // again (at least once).
        let path = self.cursor_file.clone();
        let seq = last.seq;
        let written = tokio::task::spawn_blocking(move || write_cursor(&path, seq)).await;
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(sink_error(format!(
                "exported, but recording the cursor in {} failed: {e}; the batch will be sent again",
                self.cursor_file.display()
            ))),
            Err(e) => Err(sink_error(format!(
                "exported, but the cursor write to {} did not finish: {e}; the batch will be sent again",
                self.cursor_file.display()
            ))),
        }
    }
}

// === cursor file ===

/// The last delivered seq recorded in `path`; 0 when the file does not exist.
async fn read_cursor(path: &Path) -> Result<i64, SinkError> {
    let text = match tokio::fs::read(path).await {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => {
            return Err(sink_error(format!(
                "reading cursor file {} failed: {e}",
                path.display()
            )));
        }
    };
    parse_cursor(&text).ok_or_else(|| {
        // The contents are not repeated: whatever is there is not ours.
        sink_error(format!(
            "cursor file {} is corrupt (expected one non-negative sequence number); \
             fix it, or remove it to deliver every event again",
            path.display()
        ))
    })
}

fn parse_cursor(bytes: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(bytes).ok()?;
    let text = text.strip_suffix('\n').unwrap_or(text);
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Replace `path` with `seq` atomically and durably: temp file, fsync, rename, fsync of
/// the directory. The file is private to the owner (0600); a missing directory is
/// created (0700).
fn write_cursor(path: &Path, seq: i64) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "cursor path has no file name"))?
        .to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    if !dir.exists() {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt as _;
            builder.mode(0o700);
        }
        builder.create(&dir)?;
    }

    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    // A temp file left by an earlier crash keeps its old mode; set it again.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    f.write_all(format!("{seq}\n").as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    // Make the rename itself durable.
    #[cfg(unix)]
    std::fs::File::open(&dir)?.sync_all()?;
    Ok(())
}

// === mapping ===

/// One event as an OTLP log record.
fn log_record(ev: &AuditRecord, observed_unix_nano: u64) -> LogRecord {
    let mut attributes = vec![
        kv("lanyard.audit.seq", Value::IntValue(ev.seq)),
        string_kv("lanyard.audit.kind", &ev.kind),
        string_kv("lanyard.audit.hash", &ev.hash),
        string_kv("lanyard.audit.prev_hash", &ev.prev_hash),
    ];
    let mut trace_id = Vec::new();
    // The body goes out as stored whether or not it parses; only the copies into
    // attributes need it parsed.
    if let Ok(serde_json::Value::Object(payload)) =
        serde_json::from_str::<serde_json::Value>(&ev.payload)
    {
        for (field, key) in [
            ("workload_id", "lanyard.workload_id"),
            ("destination", "lanyard.destination"),
            ("decision", "lanyard.decision"),
            ("reason", "lanyard.reason"),
        ] {
            if let Some(serde_json::Value::String(v)) = payload.get(field) {
                attributes.push(string_kv(key, v));
            }
        }
        if let Some(serde_json::Value::String(t)) = payload.get("trace_id") {
            trace_id = parse_trace_id(t).map(Vec::from).unwrap_or_default();
        }
    }
    LogRecord {
        time_unix_nano: millis_to_nanos(ev.time_ms),
        observed_time_unix_nano: observed_unix_nano,
        severity_number: SeverityNumber::Info as i32,
        severity_text: "INFO".into(),
        event_name: ev.kind.clone(),
        body: Some(AnyValue {
            value: Some(Value::StringValue(ev.payload.clone())),
        }),
        attributes,
        trace_id,
        ..Default::default()
    }
}

/// A W3C trace ID: 32 hex digits, not all zero.
fn parse_trace_id(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    hex::decode_to_slice(s, &mut id).ok()?;
    (id != [0u8; 16]).then_some(id)
}

fn string_kv(key: &str, value: &str) -> KeyValue {
    kv(key, Value::StringValue(value.to_owned()))
}

fn kv(key: &str, value: Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn millis_to_nanos(ms: i64) -> u64 {
    u64::try_from(ms).unwrap_or(0).saturating_mul(1_000_000)
}

/// What a failed export says. A status made by the collector carries only its code
/// here (its message may quote records); one made by our own transport (connection
/// refused, reset) has a source error, which is ours to show.
fn status_message(status: &tonic::Status) -> String {
    let code = status.code();
    let mut msg = format!(
        "collector answered {} ({})",
        code_name(code),
        code.description()
    );
    let mut cause = std::error::Error::source(status);
    if cause.is_none() {
        return msg;
    }
    // Transport errors wrap each other and repeat themselves; say each thing once.
    let mut said: Vec<String> = vec![status.message().to_owned()];
    while let Some(c) = cause {
        let text = c.to_string();
        if !said.iter().any(|s| s.contains(&text)) {
            said.push(text);
        }
        cause = c.source();
    }
    for part in said.iter().filter(|s| !s.is_empty()) {
        msg.push_str(": ");
        msg.push_str(part);
    }
    msg
}

/// The gRPC spelling of a status code (`UNAVAILABLE`), as collectors log it.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn sink_error(message: String) -> SinkError {
    SinkError {
        sink: NAME.to_owned(),
        message,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn record(payload: serde_json::Value) -> AuditRecord {
        AuditRecord {
            seq: 7,
            time_ms: 1_700_000_000_123,
            kind: "exchange.granted".into(),
            payload: payload.to_string(),
            prev_hash: "aa".repeat(32),
            hash: "bb".repeat(32),
        }
    }

    fn attr<'a>(r: &'a LogRecord, key: &str) -> Option<&'a Value> {
        r.attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
    }

    fn s(v: &str) -> Option<Value> {
        Some(Value::StringValue(v.into()))
    }

    #[test]
    fn maps_an_event_to_a_log_record() {
        let ev = record(serde_json::json!({
            "time_ms": 1_700_000_000_123i64,
            "kind": "exchange.granted",
            "trace_id": "0af7651916cd43dd8448eb211c80319c",
            "workload_id": "spiffe://lanyard.local/ci",
            "destination": "orders",
            "decision": "allow",
            "reason": "OK",
            "scopes": ["read"],
        }));
        let r = log_record(&ev, 42);
        assert_eq!(r.time_unix_nano, 1_700_000_000_123_000_000);
        assert_eq!(r.observed_time_unix_nano, 42);
        assert_eq!(r.severity_number, SeverityNumber::Info as i32);
        assert_eq!(r.severity_text, "INFO");
        assert_eq!(r.event_name, "exchange.granted");
        assert_eq!(
            r.body.as_ref().and_then(|b| b.value.clone()),
            s(&ev.payload)
        );
        assert_eq!(hex::encode(&r.trace_id), "0af7651916cd43dd8448eb211c80319c");
        assert!(r.span_id.is_empty());
        assert_eq!(attr(&r, "lanyard.audit.seq"), Some(&Value::IntValue(7)));
        assert_eq!(
            attr(&r, "lanyard.audit.kind").cloned(),
            s("exchange.granted")
        );
        assert_eq!(attr(&r, "lanyard.audit.hash").cloned(), s(&"bb".repeat(32)));
        assert_eq!(
            attr(&r, "lanyard.audit.prev_hash").cloned(),
            s(&"aa".repeat(32))
        );
        assert_eq!(
            attr(&r, "lanyard.workload_id").cloned(),
            s("spiffe://lanyard.local/ci")
        );
        assert_eq!(attr(&r, "lanyard.destination").cloned(), s("orders"));
        assert_eq!(attr(&r, "lanyard.decision").cloned(), s("allow"));
        assert_eq!(attr(&r, "lanyard.reason").cloned(), s("OK"));
        // Nothing else from the payload becomes an attribute.
        assert_eq!(r.attributes.len(), 8);
    }

    #[test]
    fn absent_or_odd_payload_fields_add_nothing() {
        for payload in [
            serde_json::json!({ "kind": "issuer.put" }),
            serde_json::json!({ "workload_id": 3, "decision": null, "trace_id": 5 }),
            serde_json::json!(["not", "an", "object"]),
        ] {
            let r = log_record(&record(payload), 0);
            assert_eq!(r.attributes.len(), 4, "{:?}", r.attributes);
            assert!(r.trace_id.is_empty());
        }
        // A payload that is not JSON at all still goes out as the body.
        let mut ev = record(serde_json::json!({}));
        ev.payload = "{not json".into();
        let r = log_record(&ev, 0);
        assert_eq!(r.body.and_then(|b| b.value), s("{not json"));
        assert_eq!(r.attributes.len(), 4);
    }

    #[test]
    fn trace_ids_must_be_32_hex_digits_and_not_zero() {
        assert_eq!(
            parse_trace_id("0AF7651916CD43DD8448EB211C80319C").map(hex::encode),
            Some("0af7651916cd43dd8448eb211c80319c".into())
        );
        for bad in [
            "",
            "0af7651916cd43dd8448eb211c80319",
            "0af7651916cd43dd8448eb211c80319c0",
            "0af7651916cd43dd8448eb211c80319g",
            "00000000000000000000000000000000",
            "0af7651916cd43dd-448eb211c80319c",
            "é0af7651916cd43dd8448eb211c8031",
        ] {
            assert_eq!(parse_trace_id(bad), None, "{bad}");
        }
        let r = log_record(&record(serde_json::json!({ "trace_id": "xyz" })), 0);
        assert!(r.trace_id.is_empty());
    }

    #[test]
    fn times_before_the_epoch_are_zero() {
        assert_eq!(millis_to_nanos(-5), 0);
        assert_eq!(millis_to_nanos(i64::MAX), u64::MAX);
        assert_eq!(millis_to_nanos(1), 1_000_000);
    }

    #[test]
    fn cursor_text_is_one_sequence_number() {
        assert_eq!(parse_cursor(b"0\n"), Some(0));
        assert_eq!(parse_cursor(b"123\n"), Some(123));
        assert_eq!(parse_cursor(b"123"), Some(123));
        for bad in [
            &b""[..],
            b"\n",
            b"-1\n",
            b"+1\n",
            b" 1\n",
            b"1\n\n",
            b"12x\n",
            b"99999999999999999999\n",
            b"\xff\n",
        ] {
            assert_eq!(parse_cursor(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn cursor_round_trips_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("otlp.cursor");
        write_cursor(&path, 41).unwrap();
        write_cursor(&path, 42).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "42\n");
        assert!(!dir.path().join("otlp.cursor.tmp").exists());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn status_messages_keep_the_collectors_text_out() {
        let m = status_message(&tonic::Status::unavailable(
            "bad record {\"workload_id\":\"secret\"}",
        ));
        assert_eq!(
            m,
            "collector answered UNAVAILABLE (The service is currently unavailable)"
        );
    }
}
