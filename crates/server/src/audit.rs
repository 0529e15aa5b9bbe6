//! The audit stream's background work inside the server: periodic signed checkpoints,
//! and events for issuer key fetches that start or stop failing.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use lanyard_audit::checkpoint::{CHECKPOINT_TYP, Checkpoint};
use lanyard_audit::kinds;
use lanyard_audit::sink::file::FileSink;
use lanyard_audit::sink::otlp::OtlpSink;
use lanyard_audit::sink::{Sink, SinkRunner};
use lanyard_core::ReasonCode;
use lanyard_store::NewAuditEvent;
use serde_json::json;
use tokio::sync::watch;

use crate::config::Config;
use crate::error::ApiError;
use crate::runtime::Runtime;

/// A checkpoint just written.
#[derive(Debug, Clone)]
pub struct WrittenCheckpoint {
    /// What it asserts.
    pub checkpoint: Checkpoint,
    /// The compact JWS.
    pub jws: String,
    /// The sequence number of the `audit.checkpoint` event carrying it.
    pub event_seq: i64,
}

/// Sign the chain head as it is now and append the checkpoint to the chain.
///
/// # Errors
/// `FAILED_PRECONDITION`-class `INVALID_ARGUMENT` when the chain is empty;
/// `STORE_UNAVAILABLE`; `INTERNAL` when signing fails.
pub async fn checkpoint_now(rt: &Runtime, issuer_url: &str) -> Result<WrittenCheckpoint, ApiError> {
    let (seq, head_hash) = rt.store.audit_head().await?;
    if seq == 0 {
        return Err(ApiError::invalid(
            "the audit chain is empty: there is nothing to checkpoint yet",
        ));
    }
    let checkpoint = Checkpoint {
        iss: issuer_url.to_owned(),
        seq,
        head_hash,
        time_ms: rt.clock.now_unix_millis(),
    };
    let jws = rt
        .keys
        .sign(CHECKPOINT_TYP, &checkpoint.claims())
        .map_err(|e| ApiError::new(ReasonCode::Internal, format!("signing a checkpoint: {e}")))?;
    let jws = jws.expose().to_owned();
    let event_seq = rt.committer.commit(None, checkpoint.event(&jws)).await?;
    Ok(WrittenCheckpoint {
        checkpoint,
        jws,
        event_seq,
    })
}

/// Every `interval`, sign a checkpoint if events were written since the last one.
pub async fn checkpoints(
    rt: Arc<Runtime>,
    issuer_url: String,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    if interval.is_zero() {
        return;
    }
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    // The head right after our last checkpoint (its own event).
    let mut covered = -1;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
        }
        match rt.store.audit_head().await {
            Ok((seq, _)) if seq == covered || seq == 0 => continue,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "reading the audit head for a checkpoint failed");
                continue;
            }
        }
        match checkpoint_now(&rt, &issuer_url).await {
            Ok(w) => {
                covered = w.event_seq;
                tracing::debug!(
                    seq = w.checkpoint.seq,
                    event_seq = w.event_seq,
                    "audit checkpoint written"
                );
            }
            Err(e) => tracing::warn!(error = %e.message, "writing an audit checkpoint failed"),
        }
    }
}

/// Start a runner for every configured audit sink, register where each stands (for
/// destinations that require delivery) and keep the lag metric current.
///
/// # Errors
/// When a sink cannot be set up (a malformed OTLP endpoint).
pub fn start_sinks(
    rt: &Arc<Runtime>,
    cfg: &Config,
    shutdown: &watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut sinks: Vec<Arc<dyn Sink>> = Vec::new();
    if let Some(f) = &cfg.audit.file {
        sinks.push(Arc::new(FileSink::new(
            f.path.clone().into(),
            f.max_bytes,
            f.keep,
        )));
    }
    if let Some(o) = &cfg.audit.otlp {
        sinks.push(Arc::new(
            OtlpSink::new(
                &o.endpoint,
                &o.service_name,
                cfg.data_dir.join("audit-otlp.cursor"),
                o.timeout,
            )
            .map_err(|e| anyhow::anyhow!("[audit.otlp]: {e}"))?,
        ));
    }
    let mut statuses = BTreeMap::new();
    for sink in sinks {
        let name = sink.name().to_owned();
        let (runner, status) = SinkRunner::new(rt.store.clone(), sink, rt.committer.subscribe());
        statuses.insert(name, status);
        tokio::spawn(runner.run(shutdown.clone()));
    }
    if statuses.is_empty() {
        return Ok(());
    }
    match rt.audit_sinks.write() {
        Ok(mut g) => g.clone_from(&statuses),
        Err(p) => p.into_inner().clone_from(&statuses),
    }
    let rt = rt.clone();
    let mut shutdown = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
            }
            for (name, st) in &statuses {
                rt.metrics.set_audit_sink_lag(name, st.lag());
            }
        }
    });
    Ok(())
}

/// Keep the `lanyard_audit_head_seq` gauge at the last sequence number this process
/// committed.
pub async fn head_metric(rt: Arc<Runtime>, mut shutdown: watch::Receiver<bool>) {
    if let Ok((seq, _)) = rt.store.audit_head().await {
        rt.metrics.set_audit_head_seq(seq);
    }
    let mut committed = rt.committer.subscribe();
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            changed = committed.changed() => {
                if changed.is_err() {
                    return;
                }
                let seq = *committed.borrow_and_update();
                rt.metrics.set_audit_head_seq(seq);
            }
        }
    }
}

/// Watch every issuer's key set and write an audit event when fetching starts failing
/// (`issuer.keys_fetch_failed`) or works again (`issuer.keys_fetch_recovered`). One
/// event per change, not per failed attempt.
pub async fn issuer_key_events(
    rt: Arc<Runtime>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut failing: HashMap<String, bool> = HashMap::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
        }
        let statuses = rt.verifier.status();
        failing.retain(|name, _| statuses.iter().any(|s| &s.name == name));
        for st in statuses {
            let now_failing = st.last_error.is_some();
            let was_failing = failing
                .insert(st.name.clone(), now_failing)
                .unwrap_or(false);
            if now_failing == was_failing {
                continue;
            }
            let kind = if now_failing {
                kinds::ISSUER_KEYS_FETCH_FAILED
            } else {
                kinds::ISSUER_KEYS_FETCH_RECOVERED
            };
            let event = NewAuditEvent {
                time_ms: rt.clock.now_unix_millis(),
                kind: kind.into(),
                issuer: Some(st.name.clone()),
                reason: now_failing.then(|| ReasonCode::IssuerUnavailable.as_str().to_owned()),
                detail: json!({
                    "error": st.last_error,
                    "stale": st.stale,
                    "keys_held": st.key_count,
                    "fetched_at": st.fetched_at,
                }),
                ..NewAuditEvent::default()
            };
            if let Err(e) = rt.committer.commit(None, event).await {
                tracing::warn!(issuer = %st.name, error = %e.message, "auditing an issuer key fetch change failed");
                // Try again at the next tick.
                failing.insert(st.name.clone(), was_failing);
            }
        }
    }
}
