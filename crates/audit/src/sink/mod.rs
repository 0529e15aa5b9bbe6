//! Audit sinks: copies of the stream outside the database, fed from the durable copy.
//!
//! The store is the durable copy, written in the same transaction as the grant or
//! change an event records. Every other sink reads from it behind its own cursor
//! ([`SinkRunner`]) and catches up after an outage, so a slow or broken sink never
//! stalls an exchange. How far behind a sink is (its *lag*, in events) is reported
//! through [`SinkStatus`]; an operator may make a destination refuse exchanges while a
//! chosen sink lags too far (fail closed).

pub mod file;
pub mod otlp;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use lanyard_store::{AuditRecord, Store};
use tokio::sync::watch;

/// Events read from the store per delivery.
pub const BATCH: u32 = 500;
/// How often a caught-up sink looks for events this process did not commit itself.
const POLL: Duration = Duration::from_millis(500);
/// Longest wait between retries of a failing sink.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A sink failed to take a batch.
#[derive(Debug, thiserror::Error)]
#[error("audit sink {sink}: {message}")]
pub struct SinkError {
    /// The sink's name.
    pub sink: String,
    /// What went wrong (never event contents).
    pub message: String,
}

/// A place audit events are copied to.
#[async_trait::async_trait]
pub trait Sink: Send + Sync {
    /// Short stable name (`file`, `otlp`): the metric label, and what a destination's
    /// `require_audit_sink` names.
    fn name(&self) -> &str;

    /// The last sequence number this sink holds durably, read from the sink itself at
    /// start (0 if none). Delivery resumes after it.
    ///
    /// # Errors
    /// [`SinkError`] when the sink cannot be read; the runner retries.
    async fn resume_after(&self) -> Result<i64, SinkError>;

    /// Deliver `events` (in sequence order, contiguous, after the last delivered one)
    /// and return once they are durable at the sink. On error nothing is counted as
    /// delivered and the same events are offered again.
    ///
    /// # Errors
    /// [`SinkError`].
    async fn deliver(&self, events: &[AuditRecord]) -> Result<(), SinkError>;
}

/// Where one sink stands. Shared between its runner and whoever reports on it.
#[derive(Debug, Default)]
pub struct SinkStatus {
    delivered: AtomicI64,
    head: AtomicI64,
    failures: AtomicU64,
    started: std::sync::atomic::AtomicBool,
    last_error: std::sync::Mutex<Option<String>>,
}

impl SinkStatus {
    /// The last sequence number delivered.
    pub fn delivered(&self) -> i64 {
        self.delivered.load(Ordering::Acquire)
    }

    /// The chain head as last seen by the runner.
    pub fn head(&self) -> i64 {
        self.head.load(Ordering::Acquire)
    }

    /// Events written to the chain and not yet delivered. Before the runner has read
    /// where the sink stands, the sink counts as lagging by the whole head.
    pub fn lag(&self) -> i64 {
        if !self.started.load(Ordering::Acquire) {
            return self.head().max(1);
        }
        (self.head() - self.delivered()).max(0)
    }

    /// Failed deliveries so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// The last delivery error, cleared by a success.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .map(|g| g.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Record that the chain head is at least `seq`.
    pub fn observe_head(&self, seq: i64) {
        self.head.fetch_max(seq, Ordering::AcqRel);
    }

    fn set_error(&self, e: Option<String>) {
        match self.last_error.lock() {
            Ok(mut g) => *g = e,
            Err(p) => *p.into_inner() = e,
        }
    }
}

/// Feeds one sink from the store.
pub struct SinkRunner {
    store: Arc<dyn Store>,
    sink: Arc<dyn Sink>,
    status: Arc<SinkStatus>,
    committed: watch::Receiver<i64>,
}

impl SinkRunner {
    /// A runner for `sink`. `committed` moves when this process commits events (so a
    /// caught-up sink is woken at once); events committed elsewhere are found by a poll.
    pub fn new(
        store: Arc<dyn Store>,
        sink: Arc<dyn Sink>,
        committed: watch::Receiver<i64>,
    ) -> (Self, Arc<SinkStatus>) {
        let status = Arc::new(SinkStatus::default());
        (
            Self {
                store,
                sink,
                status: status.clone(),
                committed,
            },
            status,
        )
    }

    /// Deliver until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let name = self.sink.name().to_owned();
        let mut backoff = Duration::from_millis(200);
        // Where the sink stands, from the sink itself.
        let mut cursor = loop {
            match self.sink.resume_after().await {
                Ok(c) => break c,
                Err(e) => {
                    self.fail(&e, &name);
                    if wait(&mut shutdown, backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        };
        self.status.delivered.store(cursor, Ordering::Release);
        self.status.started.store(true, Ordering::Release);
        if let Ok((head, _)) = self.store.audit_head().await {
            self.status.observe_head(head);
        }
        tracing::info!(sink = %name, after = cursor, "audit sink delivering");
        loop {
            if *shutdown.borrow() {
                return;
            }
            let batch = match self.store.audit_list(cursor, BATCH).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(sink = %name, error = %e, "reading audit events for a sink failed");
                    if wait(&mut shutdown, backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            if batch.is_empty() {
                if let Ok((head, _)) = self.store.audit_head().await {
                    self.status.observe_head(head);
                }
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = self.committed.changed() => {
                        let seq = *self.committed.borrow_and_update();
                        self.status.observe_head(seq);
                    }
                    _ = tokio::time::sleep(POLL) => {}
                }
                continue;
            }
            if let Some(last) = batch.last() {
                self.status.observe_head(last.seq);
            }
            match self.sink.deliver(&batch).await {
                Ok(()) => {
                    cursor = batch.last().map_or(cursor, |r| r.seq);
                    self.status.delivered.store(cursor, Ordering::Release);
                    if self.status.last_error().is_some() {
                        tracing::info!(sink = %name, after = cursor, "audit sink delivering again");
                        self.status.set_error(None);
                    }
                    backoff = Duration::from_millis(200);
                }
                Err(e) => {
                    self.fail(&e, &name);
                    if wait(&mut shutdown, backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    fn fail(&self, e: &SinkError, name: &str) {
        self.status.failures.fetch_add(1, Ordering::Relaxed);
        if self.status.last_error().as_deref() != Some(e.message.as_str()) {
            tracing::warn!(sink = %name, error = %e.message, "audit sink delivery failed; retrying");
        }
        self.status.set_error(Some(e.message.clone()));
    }
}

/// Sleep `d` unless shutdown comes first; true when shutting down.
async fn wait(shutdown: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = shutdown.changed() => true,
        _ = tokio::time::sleep(d) => *shutdown.borrow(),
    }
}
