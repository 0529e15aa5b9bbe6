//! `AuditService`: watch the stream from a cursor, verify the chain, write a checkpoint,
//! fingerprint a token. Served on the admin socket only.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use lanyard_audit::{CheckpointVerifier, VerifyOptions, verify_chain};
use lanyard_proto::v1 as pb;
use lanyard_proto::v1::audit_service_server::AuditService;
use lanyard_store::AuditRecord;
use tonic::{Request, Status};

use crate::audit::checkpoint_now;
use crate::error::ApiError;
use crate::runtime::Runtime;
use crate::services::{Rpc, ctx_of, fail, respond};

/// Events read per page while watching.
const WATCH_PAGE: u32 = 500;
/// How often a follower looks for events this process did not write (another replica,
/// a configuration change) when nothing wakes it sooner.
const WATCH_POLL: Duration = Duration::from_millis(500);

/// The audit service (admin socket only).
pub struct AuditSvc {
    /// The runtime.
    pub rt: Arc<Runtime>,
    /// lanyard's issuer URL (the `iss` of checkpoints).
    pub issuer_url: String,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::AuditEvent, Status>> + Send>>;

/// Milliseconds since the epoch as a protobuf timestamp.
fn timestamp_ms(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

fn audit_to_pb(r: &AuditRecord) -> pb::AuditEvent {
    pb::AuditEvent {
        seq: r.seq,
        time: Some(timestamp_ms(r.time_ms)),
        kind: r.kind.clone(),
        payload_json: r.payload.clone(),
        prev_hash: r.prev_hash.clone(),
        hash: r.hash.clone(),
    }
}

/// Whether `r` passes the watch filters. Filters on payload fields parse the payload
/// only when one is set.
fn matches_filter(r: &AuditRecord, w: &pb::WatchRequest) -> bool {
    if !w.kind.is_empty() && r.kind != w.kind {
        return false;
    }
    if w.workload_id.is_empty() && w.destination.is_empty() && w.subject_fingerprint.is_empty() {
        return true;
    }
    let v: serde_json::Value = serde_json::from_str(&r.payload).unwrap_or_default();
    let field = |name: &str, want: &str| want.is_empty() || v[name] == want;
    field("workload_id", &w.workload_id)
        && field("destination", &w.destination)
        && field("subject_fingerprint", &w.subject_fingerprint)
}

#[tonic::async_trait]
impl AuditService for AuditSvc {
    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Rpc<Self::WatchStream> {
        let ctx = ctx_of(&req);
        let w = req.into_inner();
        if w.after_seq < 0 {
            return Err(fail(&ctx, ApiError::invalid("after_seq must be 0 or more")));
        }
        let store = self.rt.store.clone();
        let mut committed = self.rt.committer.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            // The cursor: the last event looked at (sent or filtered out). Events come
            // out in sequence order, each once; a client resumes by passing the last
            // seq it received.
            let mut after = w.after_seq;
            loop {
                let batch = match store.audit_list(after, WATCH_PAGE).await {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(ApiError::from(e)))).await;
                        return;
                    }
                };
                let full = batch.len() == WATCH_PAGE as usize;
                for r in batch {
                    after = r.seq;
                    if matches_filter(&r, &w) && tx.send(Ok(audit_to_pb(&r))).await.is_err() {
                        return;
                    }
                }
                if full {
                    continue;
                }
                if !w.follow {
                    return;
                }
                tokio::select! {
                    _ = committed.changed() => {}
                    _ = tokio::time::sleep(WATCH_POLL) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(respond(&ctx, Box::pin(stream) as WatchStream))
    }

    async fn verify(&self, req: Request<pb::VerifyRequest>) -> Rpc<pb::VerifyResponse> {
        let ctx = ctx_of(&req);
        let r = req.into_inner();
        let opts = VerifyOptions {
            from_checkpoint: Some(r.from_checkpoint).filter(|s| !s.trim().is_empty()),
            known_checkpoints: r.known_checkpoints,
            page_size: 0,
        };
        let keys = CheckpointVerifier::from_jwks(&self.rt.keys.all_public_jwks());
        let report = verify_chain(self.rt.store.clone(), &keys, &opts)
            .await
            .map_err(|e| match e {
                lanyard_audit::VerifyError::Store(s) => fail(&ctx, s.into()),
                lanyard_audit::VerifyError::Checkpoint(c) => {
                    fail(&ctx, ApiError::invalid(c.to_string()))
                }
            })?;
        if let Some(b) = &report.breakage {
            tracing::warn!(request_id = %ctx.request_id, seq = b.seq, kind = b.kind.as_str(), "audit chain verification failed");
        }
        let out = pb::VerifyResponse {
            ok: report.ok(),
            checked: i64::try_from(report.checked).unwrap_or(i64::MAX),
            head_seq: report.head_seq,
            first_broken_seq: report.breakage.as_ref().map_or(0, |b| b.seq),
            problem: report
                .breakage
                .as_ref()
                .map(|b| b.detail.clone())
                .unwrap_or_default(),
            problem_kind: report
                .breakage
                .as_ref()
                .map(|b| b.kind.as_str().to_owned())
                .unwrap_or_default(),
            head_hash: report.head_hash.clone(),
            checkpoints_verified: i64::try_from(report.checkpoints_verified).unwrap_or(i64::MAX),
            last_checkpoint_seq: report.last_checkpoint_seq.unwrap_or(0),
            start_seq: report.start_seq,
        };
        Ok(respond(&ctx, out))
    }

    async fn checkpoint(&self, req: Request<pb::CheckpointRequest>) -> Rpc<pb::CheckpointResponse> {
        let ctx = ctx_of(&req);
        let w = checkpoint_now(&self.rt, &self.issuer_url)
            .await
            .map_err(|e| fail(&ctx, e))?;
        Ok(respond(
            &ctx,
            pb::CheckpointResponse {
                seq: w.checkpoint.seq,
                head_hash: w.checkpoint.head_hash,
                time: Some(timestamp_ms(w.checkpoint.time_ms)),
                jws: w.jws,
                event_seq: w.event_seq,
            },
        ))
    }

    async fn fingerprint(
        &self,
        req: Request<pb::FingerprintRequest>,
    ) -> Rpc<pb::FingerprintResponse> {
        let ctx = ctx_of(&req);
        let token = req.into_inner().token;
        let token = token.trim();
        if token.is_empty() {
            return Err(fail(&ctx, ApiError::invalid("token is required")));
        }
        Ok(respond(
            &ctx,
            pb::FingerprintResponse {
                fingerprint: self.rt.fingerprinter.fingerprint(token),
            },
        ))
    }
}
