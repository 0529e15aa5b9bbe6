//! Prometheus metrics, served as text on the HTTP listener at `GET /metrics`.
//!
//! One [`Metrics`] per [`Runtime`](crate::runtime::Runtime), with its own
//! `prometheus::Registry` (no process-global recorder, so tests stay independent).
//! Request counters and the latency histogram are updated as requests finish; issuer key
//! state and JWKS fetch counts are read from the [`Verifier`] at scrape time; the count
//! of active grants is read from the store at most every [`ACTIVE_GRANTS_MAX_AGE`].
//!
//! ## Why labels are bounded
//! Label values come from configuration (destination and issuer names), from the fixed
//! [`ReasonCode`] list, or from the code (`decision`, `rpc`), never from request text: a
//! caller naming a destination that does not exist is counted as `(unknown)`, so no
//! request can create new time series.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use lanyard_core::{ReasonCode, SharedClock, UnixTime};
use lanyard_store::Store;
use lanyard_trust::Verifier;
use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::runtime::Snapshot;

/// The longest time a scrape serves a cached count of active grants before asking the
/// store again (a `COUNT` over the grants index is not free on a large PostgreSQL).
pub const ACTIVE_GRANTS_MAX_AGE: Duration = Duration::from_secs(5);

/// The `destination` label of requests naming a destination that is not configured.
pub const UNKNOWN_DESTINATION: &str = "(unknown)";

/// Exchange latency buckets, seconds: an exchange is ~0.2 ms of CPU plus a group
/// commit; a JWKS fetch or a slow destination pushes it toward the top.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Granted (exchange, renew) or done (release).
    Allowed,
    /// Refused, with the stable reason returned to the caller.
    Denied(ReasonCode),
}

impl Outcome {
    fn decision(self) -> &'static str {
        match self {
            Outcome::Allowed => "allow",
            Outcome::Denied(_) => "deny",
        }
    }
}

/// Which workload RPC a denial belongs to (the `rpc` label of `lanyard_denials_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    /// `ExchangeService.Exchange`.
    Exchange,
    /// `ExchangeService.Renew`.
    Renew,
    /// `ExchangeService.Release`.
    Release,
}

impl Rpc {
    fn as_str(self) -> &'static str {
        match self {
            Rpc::Exchange => "exchange",
            Rpc::Renew => "renew",
            Rpc::Release => "release",
        }
    }
}

/// How an introspection request ended (the `result` label of
/// `lanyard_introspections_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntrospectionResult {
    /// The token is active.
    Active,
    /// Answered `{"active": false}`, whatever the reason.
    Inactive,
    /// The caller's own token was refused (HTTP 401).
    Unauthorized,
    /// The answer could not be given (the store was unavailable).
    Error,
}

impl IntrospectionResult {
    fn as_str(self) -> &'static str {
        match self {
            IntrospectionResult::Active => "active",
            IntrospectionResult::Inactive => "inactive",
            IntrospectionResult::Unauthorized => "unauthorized",
            IntrospectionResult::Error => "error",
        }
    }
}

/// lanyard's metrics and the registry that renders them.
pub struct Metrics {
    registry: Registry,
    exchanges: IntCounterVec,
    exchange_seconds: HistogramVec,
    renewals: IntCounterVec,
    releases: IntCounterVec,
    denials: IntCounterVec,
    active_grants: IntGauge,
    audit_sink_lag: IntGaugeVec,
    audit_head_seq: IntGauge,
    introspections: IntCounterVec,
    revocation_queue: IntGauge,
    revocation_receipts: IntCounterVec,
    proxy_requests: IntCounterVec,
    /// When the active-grant count was last read; the lock makes refreshes single-flight.
    active_refreshed: tokio::sync::Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// The metrics of one runtime, reading issuer key state from `verifier` at scrape
    /// time.
    ///
    /// # Errors
    /// Only if a metric definition in this file is invalid (a name or a duplicate);
    /// the `definitions_are_valid` test builds them all.
    pub fn new(verifier: Verifier, clock: SharedClock) -> prometheus::Result<Self> {
        let registry = Registry::new();
        let exchanges = IntCounterVec::new(
            Opts::new(
                "lanyard_exchanges_total",
                "Exchange requests answered, by destination and decision (allow/deny).",
            ),
            &["destination", "decision"],
        )?;
        let exchange_seconds = HistogramVec::new(
            HistogramOpts::new(
                "lanyard_exchange_duration_seconds",
                "Time to answer an Exchange request, by destination and decision.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["destination", "decision"],
        )?;
        let renewals = IntCounterVec::new(
            Opts::new(
                "lanyard_renewals_total",
                "Renew requests answered, by decision (allow/deny).",
            ),
            &["decision"],
        )?;
        let releases = IntCounterVec::new(
            Opts::new(
                "lanyard_releases_total",
                "Release requests answered, by decision (allow/deny).",
            ),
            &["decision"],
        )?;
        let denials = IntCounterVec::new(
            Opts::new(
                "lanyard_denials_total",
                "Refused workload requests, by rpc (exchange/renew/release) and stable reason code.",
            ),
            &["rpc", "reason"],
        )?;
        let active_grants = IntGauge::new(
            "lanyard_grants_active",
            "Active, unexpired grants in the store (refreshed at most every 5 s).",
        )?;
        let audit_sink_lag = IntGaugeVec::new(
            Opts::new(
                "lanyard_audit_sink_lag_events",
                "Audit events committed to the database but not yet delivered to a sink, by sink.",
            ),
            &["sink"],
        )?;
        let audit_head_seq = IntGauge::new(
            "lanyard_audit_head_seq",
            "Sequence number of the newest committed audit event.",
        )?;
        let revocation_queue = IntGauge::new(
            "lanyard_revocation_queue_depth",
            "Revocation steps (one per grant) not yet at a final outcome: pending, or failed and waiting for a retry (refreshed at most every 5 s).",
        )?;
        let revocation_receipts = IntCounterVec::new(
            Opts::new(
                "lanyard_revocation_grants_total",
                "Grants handled by revocation jobs, by destination and outcome (revoked/expires_at/failed).",
            ),
            &["destination", "outcome"],
        )?;
        registry.register(Box::new(revocation_queue.clone()))?;
        registry.register(Box::new(revocation_receipts.clone()))?;
        let introspections = IntCounterVec::new(
            Opts::new(
                "lanyard_introspections_total",
                "Introspection requests answered, by result (active/inactive/unauthorized/error).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(introspections.clone()))?;
        let proxy_requests = IntCounterVec::new(
            Opts::new(
                "lanyard_proxy_requests_total",
                "Requests to proxy destinations, by destination and result (ok, or the refusal's or the cut's reason code).",
            ),
            &["destination", "result"],
        )?;
        registry.register(Box::new(proxy_requests.clone()))?;
        registry.register(Box::new(exchanges.clone()))?;
        registry.register(Box::new(exchange_seconds.clone()))?;
        registry.register(Box::new(renewals.clone()))?;
        registry.register(Box::new(releases.clone()))?;
        registry.register(Box::new(denials.clone()))?;
        registry.register(Box::new(active_grants.clone()))?;
        registry.register(Box::new(audit_sink_lag.clone()))?;
        registry.register(Box::new(audit_head_seq.clone()))?;
        registry.register(Box::new(IssuerKeys::new(verifier, clock)?))?;
        Ok(Self {
            registry,
            exchanges,
            exchange_seconds,
            renewals,
            releases,
            denials,
            active_grants,
            audit_sink_lag,
            audit_head_seq,
            introspections,
            revocation_queue,
            revocation_receipts,
            proxy_requests,
            active_refreshed: tokio::sync::Mutex::new(None),
        })
    }

    /// [`Metrics::new`] for a runtime, which cannot fail: the definitions are constant
    /// and `definitions_are_valid_and_registries_are_independent` builds them.
    #[allow(clippy::expect_used)]
    pub(crate) fn for_runtime(verifier: Verifier, clock: SharedClock) -> Self {
        Self::new(verifier, clock).expect("constant metric definitions are valid (unit-tested)")
    }

    /// Count an answered Exchange. `destination` must be a configured name or
    /// [`UNKNOWN_DESTINATION`] (see [`destination_label`]).
    pub fn exchange(&self, destination: &str, outcome: Outcome, elapsed: Duration) {
        let labels = [destination, outcome.decision()];
        self.exchanges.with_label_values(&labels).inc();
        self.exchange_seconds
            .with_label_values(&labels)
            .observe(elapsed.as_secs_f64());
        self.denied(Rpc::Exchange, outcome);
    }

    /// Count an answered Renew.
    pub fn renew(&self, outcome: Outcome) {
        self.renewals.with_label_values(&[outcome.decision()]).inc();
        self.denied(Rpc::Renew, outcome);
    }

    /// Count an answered Release.
    pub fn release(&self, outcome: Outcome) {
        self.releases.with_label_values(&[outcome.decision()]).inc();
        self.denied(Rpc::Release, outcome);
    }

    /// Count a request to a configured proxy destination: `result` is `ok` or a
    /// reason code (a bounded set).
    pub fn proxy_request(&self, destination: &str, result: &str) {
        self.proxy_requests
            .with_label_values(&[destination, result])
            .inc();
    }

    /// Count an answered introspection request.
    pub fn introspection(&self, result: IntrospectionResult) {
        self.introspections
            .with_label_values(&[result.as_str()])
            .inc();
    }

    fn denied(&self, rpc: Rpc, outcome: Outcome) {
        if let Outcome::Denied(reason) = outcome {
            self.denials
                .with_label_values(&[rpc.as_str(), reason.as_str()])
                .inc();
        }
    }

    /// How many committed audit events `sink` has not delivered yet. Called by the sink
    /// that knows (the audit side); `sink` names a configured sink, never request text.
    pub fn set_audit_sink_lag(&self, sink: &str, events: i64) {
        self.audit_sink_lag.with_label_values(&[sink]).set(events);
    }

    /// The sequence number of the newest committed audit event.
    pub fn set_audit_head_seq(&self, seq: i64) {
        self.audit_head_seq.set(seq);
    }

    /// Count grants a revocation job handled at `destination` with `outcome`.
    pub fn revocation_grants(&self, destination: &str, outcome: &str, n: usize) {
        self.revocation_receipts
            .with_label_values(&[destination, outcome])
            .inc_by(u64::try_from(n).unwrap_or(u64::MAX));
    }

    /// Re-read the gauges counted in the store (active grants, revocation queue depth)
    /// if they are older than [`ACTIVE_GRANTS_MAX_AGE`]. A store error keeps the previous
    /// value and is logged.
    pub async fn refresh_store_gauges(&self, store: &dyn Store, now: UnixTime) {
        let mut last = self.active_refreshed.lock().await;
        if last.is_some_and(|t| t.elapsed() < ACTIVE_GRANTS_MAX_AGE) {
            return;
        }
        match store.grant_count_active(None, now).await {
            Ok(n) => {
                self.active_grants.set(i64::try_from(n).unwrap_or(i64::MAX));
                *last = Some(Instant::now());
            }
            Err(e) => tracing::warn!(error = %e, "counting active grants for /metrics failed"),
        }
        match store.revocation_queue_depth().await {
            Ok(n) => self
                .revocation_queue
                .set(i64::try_from(n).unwrap_or(i64::MAX)),
            Err(e) => tracing::warn!(error = %e, "reading the revocation queue depth failed"),
        }
    }

    /// Every metric in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }

    /// The content type of [`Metrics::render`]'s output.
    pub fn content_type() -> &'static str {
        prometheus::TEXT_FORMAT
    }
}

/// The `destination` label for a request naming `name`: the name if it is configured,
/// else [`UNKNOWN_DESTINATION`].
pub fn destination_label<'a>(snapshot: &'a Snapshot, name: &str) -> &'a str {
    snapshot
        .destinations
        .get_key_value(name)
        .map_or(UNKNOWN_DESTINATION, |(k, _)| k.as_str())
}

// === impl IssuerKeys ===

/// Issuer key metrics, computed at scrape time from the verifier's key-set status and
/// its fetch counts.
struct IssuerKeys {
    verifier: Verifier,
    clock: SharedClock,
    descs: Vec<Desc>,
}

const FETCHES: (&str, &str) = (
    "lanyard_jwks_fetches_total",
    "Fetches of an issuer's keys over HTTP (discovery plus JWKS is one), failed ones included.",
);
const FETCH_FAILURES: (&str, &str) = (
    "lanyard_jwks_fetch_failures_total",
    "Fetches of an issuer's keys that failed.",
);
const KEYS_AGE: (&str, &str) = (
    "lanyard_issuer_keys_age_seconds",
    "Seconds since the issuer's keys were last fetched successfully (fetched issuers only).",
);
const KEYS_STALE: (&str, &str) = (
    "lanyard_issuer_keys_stale",
    "1 while the issuer's keys are past their cache lifetime and served as last-known-good.",
);
const KEYS_HELD: (&str, &str) = (
    "lanyard_issuer_keys",
    "Number of keys held for the issuer (0: its tokens cannot be verified).",
);

impl IssuerKeys {
    fn new(verifier: Verifier, clock: SharedClock) -> prometheus::Result<Self> {
        let descs = [FETCHES, FETCH_FAILURES, KEYS_AGE, KEYS_STALE, KEYS_HELD]
            .into_iter()
            .map(|(name, help)| {
                Desc::new(
                    name.into(),
                    help.into(),
                    vec!["issuer".into()],
                    HashMap::new(),
                )
            })
            .collect::<prometheus::Result<Vec<_>>>()?;
        Ok(Self {
            verifier,
            clock,
            descs,
        })
    }
}

fn family(
    (name, help): (&str, &str),
    kind: MetricType,
    rows: impl IntoIterator<Item = (String, f64)>,
) -> MetricFamily {
    let mut mf = MetricFamily::default();
    mf.set_name(name.into());
    mf.set_help(help.into());
    mf.set_field_type(kind);
    for (issuer, value) in rows {
        let mut label = proto::LabelPair::default();
        label.set_name("issuer".into());
        label.set_value(issuer);
        let mut m = proto::Metric::from_label(vec![label]);
        match kind {
            MetricType::COUNTER => {
                let mut c = proto::Counter::default();
                c.set_value(value);
                m.set_counter(c);
            }
            _ => {
                let mut g = proto::Gauge::default();
                g.set_value(value);
                m.set_gauge(g);
            }
        }
        mf.mut_metric().push(m);
    }
    mf
}

#[allow(clippy::cast_precision_loss)]
fn as_f64(n: u64) -> f64 {
    n as f64
}

impl Collector for IssuerKeys {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let now = self.clock.now_unix();
        let status = self.verifier.status();
        let counts = self.verifier.fetch_counts();
        vec![
            family(
                FETCHES,
                MetricType::COUNTER,
                counts
                    .iter()
                    .map(|(issuer, c)| (issuer.clone(), as_f64(c.attempts))),
            ),
            family(
                FETCH_FAILURES,
                MetricType::COUNTER,
                counts
                    .iter()
                    .map(|(issuer, c)| (issuer.clone(), as_f64(c.failures))),
            ),
            // Inline keys are never fetched (no cache lifetime): no age for them.
            family(
                KEYS_AGE,
                MetricType::GAUGE,
                status.iter().filter_map(|s| {
                    let fetched = s.fetched_at.filter(|_| s.expires_at.is_some())?;
                    let age = u64::try_from(now.saturating_sub(fetched)).unwrap_or(0);
                    Some((s.name.clone(), as_f64(age)))
                }),
            ),
            family(
                KEYS_STALE,
                MetricType::GAUGE,
                status
                    .iter()
                    .map(|s| (s.name.clone(), if s.stale { 1.0 } else { 0.0 })),
            ),
            family(
                KEYS_HELD,
                MetricType::GAUGE,
                status
                    .iter()
                    .map(|s| (s.name.clone(), as_f64(s.key_count as u64))),
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use lanyard_core::FakeClock;
    use lanyard_trust::{InMemoryReplayGuard, VerifierSettings};

    use super::*;

    fn metrics() -> Metrics {
        let clock: SharedClock = Arc::new(FakeClock::at(1_700_000_000));
        let verifier = Verifier::new(
            VerifierSettings::new("https://lanyard.test"),
            clock.clone(),
            Arc::new(InMemoryReplayGuard::new(clock.clone(), 1000)),
        )
        .unwrap();
        Metrics::new(verifier, clock).unwrap()
    }

    /// The value of the sample `line_prefix` (name plus labels) in `text`.
    fn sample(text: &str, line_prefix: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(line_prefix)?.trim().parse().ok())
    }

    #[test]
    fn definitions_are_valid_and_registries_are_independent() {
        let a = metrics();
        let b = metrics();
        a.exchange("orders", Outcome::Allowed, Duration::from_millis(3));
        a.exchange(
            UNKNOWN_DESTINATION,
            Outcome::Denied(ReasonCode::DestinationUnknown),
            Duration::from_millis(1),
        );
        a.renew(Outcome::Denied(ReasonCode::GrantNotActive));
        a.release(Outcome::Allowed);
        a.set_audit_sink_lag("jsonl", 7);
        a.introspection(IntrospectionResult::Active);
        a.introspection(IntrospectionResult::Inactive);
        a.introspection(IntrospectionResult::Inactive);
        a.set_audit_head_seq(42);
        let text = a.render();
        for (prefix, want) in [
            (
                r#"lanyard_exchanges_total{decision="allow",destination="orders"}"#,
                1.0,
            ),
            (
                r#"lanyard_exchanges_total{decision="deny",destination="(unknown)"}"#,
                1.0,
            ),
            (
                r#"lanyard_exchange_duration_seconds_count{decision="allow",destination="orders"}"#,
                1.0,
            ),
            (
                r#"lanyard_exchange_duration_seconds_bucket{decision="allow",destination="orders",le="0.005"}"#,
                1.0,
            ),
            (
                r#"lanyard_exchange_duration_seconds_bucket{decision="allow",destination="orders",le="0.0025"}"#,
                0.0,
            ),
            (
                r#"lanyard_denials_total{reason="DESTINATION_UNKNOWN",rpc="exchange"}"#,
                1.0,
            ),
            (
                r#"lanyard_denials_total{reason="GRANT_NOT_ACTIVE",rpc="renew"}"#,
                1.0,
            ),
            (r#"lanyard_renewals_total{decision="deny"}"#, 1.0),
            (r#"lanyard_releases_total{decision="allow"}"#, 1.0),
            (r#"lanyard_audit_sink_lag_events{sink="jsonl"}"#, 7.0),
            ("lanyard_audit_head_seq", 42.0),
            (r#"lanyard_introspections_total{result="active"}"#, 1.0),
            (r#"lanyard_introspections_total{result="inactive"}"#, 2.0),
            ("lanyard_grants_active", 0.0),
        ] {
            assert_eq!(sample(&text, prefix), Some(want), "{prefix} in\n{text}");
        }
        assert!(text.contains("# TYPE lanyard_exchange_duration_seconds histogram"));
        // A second runtime's registry saw none of it.
        assert_eq!(
            sample(
                &b.render(),
                r#"lanyard_exchanges_total{decision="allow",destination="orders"}"#
            ),
            None
        );
    }
}
