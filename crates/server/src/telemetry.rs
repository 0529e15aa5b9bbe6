//! Logging and tracing. Logs: structured `tracing` output, text or JSON. Traces: when
//! `[telemetry] otlp_endpoint` is set, OpenTelemetry spans exported over OTLP/gRPC: one
//! root span per RPC on both gRPC listeners (continuing a caller's W3C `traceparent`),
//! with children for token verification, JWKS fetches, the policy decision, the
//! destination's issue and the store commit.
//!
//! Nothing logged or traced here or anywhere else carries a token, key or credential;
//! request IDs and trace IDs tie lines together.
//!
//! ## Why a separate span target
//! The spans made for tracing use the target [`SPAN_TARGET`]. The log output filters
//! that target out, so turning tracing on or off never changes the log lines, and with
//! tracing off no layer wants those spans: their callsites are disabled and cost a
//! branch. The OpenTelemetry layer sees every `lanyard*` span at INFO, so spans the
//! code already had (`exchange`, `renew`, ...) appear in the trace too.

use std::io::IsTerminal;
use std::sync::Mutex;

use anyhow::Context as _;
use lanyard_core::ReasonCode;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogConfig, TelemetrySettings};

/// The `tracing` target of spans made for tracing (see the module docs).
pub const SPAN_TARGET: &str = "lanyard::trace";

/// The tracer provider in use, kept for [`shutdown`].
static PROVIDER: Mutex<Option<SdkTracerProvider>> = Mutex::new(None);

/// Install the global subscriber: logs, plus OTLP trace export when `telemetry` is set.
/// `RUST_LOG` overrides `log.level` when set. Call inside the tokio runtime (the OTLP
/// channel is created on it).
///
/// # Errors
/// The OTLP exporter could not be built (an endpoint tonic does not accept).
pub fn init(log: &LogConfig, telemetry: Option<&TelemetrySettings>) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let filter = match format!("{SPAN_TARGET}=off").parse() {
        Ok(d) => filter.add_directive(d),
        Err(_) => filter,
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let fmt = if log.format == "json" {
        fmt.json().flatten_event(true).with_filter(filter).boxed()
    } else {
        fmt.with_filter(filter).boxed()
    };
    let otel = match telemetry {
        Some(t) => {
            let provider = otlp_provider(t)?;
            let layer = otel_layer(&provider);
            *PROVIDER.lock().unwrap_or_else(|e| e.into_inner()) = Some(provider);
            tracing::debug!(endpoint = %t.otlp_endpoint, "exporting traces over OTLP");
            Some(layer)
        }
        None => None,
    };
    // A subscriber may already be installed (tests running serve in-process); keep it.
    // Without export, no OpenTelemetry layer at all: an absent `Option` layer would
    // still enable every `lanyard::trace` span (`Interest::always`), and each request
    // would pay for spans nothing reads.
    let _ = match otel {
        Some(otel) => tracing_subscriber::registry()
            .with(fmt)
            .with(otel)
            .try_init(),
        None => tracing_subscriber::registry().with(fmt).try_init(),
    };
    if let Some(t) = telemetry {
        tracing::info!(
            endpoint = %t.otlp_endpoint,
            service_name = %t.service_name,
            sample_ratio = t.sample_ratio,
            "exporting traces over OTLP"
        );
    }
    Ok(())
}

/// A tracer provider exporting to `t.otlp_endpoint` over OTLP/gRPC in batches. The
/// channel connects lazily: a collector that is down costs dropped spans, never a
/// failed start or a slow request.
///
/// # Errors
/// The exporter could not be built.
pub fn otlp_provider(t: &TelemetrySettings) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(t.otlp_endpoint.clone())
        .build()
        .context("building the OTLP span exporter")?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(sampler(t.sample_ratio))
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(t.service_name.clone())
                .build(),
        )
        .build())
}

/// Follow a caller's sampling decision; sample `ratio` of new traces.
pub fn sampler(ratio: f64) -> Sampler {
    Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio)))
}

/// The OpenTelemetry layer, seeing `lanyard*` spans at INFO and above. Public so tests
/// can install it with their own (in-memory) provider.
pub fn otel_layer<S>(provider: &SdkTracerProvider) -> Box<dyn Layer<S> + Send + Sync + 'static>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("lanyard"))
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_filter(Targets::new().with_target("lanyard", tracing::Level::INFO))
        .boxed()
}

/// Flush and stop the tracer provider, if one was installed. Called on graceful
/// shutdown; waits for the last batch (bounded by the exporter's timeout).
pub async fn shutdown() {
    let provider = PROVIDER.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(p) = provider {
        // `shutdown` blocks until the batch thread has exported; the export itself runs
        // on this runtime, so block a blocking-pool thread, never a worker.
        match tokio::task::spawn_blocking(move || p.shutdown()).await {
            Ok(Ok(())) => tracing::debug!("trace exporter flushed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "flushing the trace exporter failed"),
            Err(e) => tracing::warn!(error = %e, "flushing the trace exporter failed"),
        }
    }
}

/// The current OpenTelemetry trace ID as 32 lowercase hex digits, for audit events and
/// logs. `None` when tracing is off or no traced span is current.
pub fn current_trace_id() -> Option<String> {
    let cx = Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

// === spans ===

/// The root span of one gRPC request (for `Server::trace_fn`), continuing the trace of
/// an incoming W3C `traceparent`. Named after the RPC (`lanyard.v1.ExchangeService/
/// Exchange`); a path that names no lanyard or gRPC service is named `unknown`, so
/// callers cannot mint span names.
pub fn grpc_span(req: &http::Request<()>) -> Span {
    let path = req.uri().path().trim_start_matches('/');
    let known = path.len() <= 128
        && (path.starts_with("lanyard.v1.") || path.starts_with("grpc."))
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'/' | b'_'));
    let path = if known { path } else { "unknown" };
    let (service, method) = path.split_once('/').unwrap_or((path, ""));
    let span = tracing::info_span!(
        target: SPAN_TARGET,
        "grpc.request",
        otel.name = path,
        otel.kind = "server",
        otel.status_code = Empty,
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = Empty,
        lanyard.reason = Empty,
    );
    if !span.is_disabled() {
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(req.headers()));
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
    }
    span
}

/// Note a refused request on the current RPC span: its stable reason and gRPC code,
/// and error status for the codes that mean the server failed.
pub fn record_refusal(reason: ReasonCode) {
    let span = Span::current();
    if span.is_disabled() {
        return;
    }
    let code = crate::error::code_for(reason);
    span.record("rpc.grpc.status_code", code as i64);
    span.record("lanyard.reason", reason.as_str());
    if matches!(
        code,
        tonic::Code::Unknown
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Unimplemented
            | tonic::Code::Internal
            | tonic::Code::Unavailable
            | tonic::Code::DataLoss
    ) {
        span.record("otel.status_code", "ERROR");
    }
}

/// The span around the policy decision.
pub fn policy_span(action: &str, destination: &str) -> Span {
    tracing::info_span!(
        target: SPAN_TARGET,
        "policy.decide",
        lanyard.action = action,
        lanyard.destination = destination,
        lanyard.decision = Empty,
        lanyard.policy_version = Empty,
    )
}

/// The span around a destination adapter issuing a credential (an outbound call for
/// federating destinations).
pub fn issue_span(destination: &str, kind: &str) -> Span {
    tracing::info_span!(
        target: SPAN_TARGET,
        "destination.issue",
        lanyard.destination = destination,
        lanyard.destination_kind = kind,
    )
}

/// The span around a destination adapter revoking a credential.
pub fn revoke_span(destination: &str, kind: &str) -> Span {
    tracing::info_span!(
        target: SPAN_TARGET,
        "destination.revoke",
        lanyard.destination = destination,
        lanyard.destination_kind = kind,
    )
}

/// The span around a durable store write (the group commit, or a renew/release
/// transaction).
pub fn store_commit_span(what: &'static str) -> Span {
    tracing::info_span!(target: SPAN_TARGET, "store.commit", lanyard.write = what)
}

/// Reads W3C trace context from request headers.
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_trace_id_without_tracing() {
        let _span = tracing::info_span!("outside").entered();
        assert_eq!(current_trace_id(), None);
    }

    #[test]
    fn unknown_paths_do_not_name_spans() {
        use opentelemetry::trace::SpanKind;
        use opentelemetry_sdk::trace::InMemorySpanExporter;
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry().with(otel_layer(&provider));
        tracing::subscriber::with_default(subscriber, || {
            for path in [
                "/lanyard.v1.ExchangeService/Exchange",
                "/evil.Service%20x/Method",
                "/grpc.health.v1.Health/Check",
            ] {
                let req = http::Request::builder().uri(path).body(()).unwrap();
                let span = grpc_span(&req);
                let _e = span.enter();
                assert_eq!(current_trace_id().map(|t| t.len()), Some(32));
            }
        });
        let names: Vec<String> = exporter
            .get_finished_spans()
            .unwrap()
            .into_iter()
            .inspect(|s| assert_eq!(s.span_kind, SpanKind::Server))
            .map(|s| s.name.to_string())
            .collect();
        assert_eq!(
            names,
            [
                "lanyard.v1.ExchangeService/Exchange",
                "unknown",
                "grpc.health.v1.Health/Check"
            ]
        );
    }
}
