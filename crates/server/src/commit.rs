//! Group commit: many exchanges share one durable transaction.
//!
//! ## Why
//! A durable commit (fsync) costs more than the crypto of an exchange. Each exchange
//! hands its grant and audit event to the committer and waits; the committer drains
//! whatever has queued while the previous transaction was committing and writes it all
//! in one transaction. Every caller is answered only after its own data is durable, so
//! durability is not weakened, and under load the fsync cost is shared.

use std::sync::Arc;

use lanyard_core::ReasonCode;
use lanyard_store::{GrantRecord, NewAuditEvent, Store};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;

use crate::error::ApiError;

struct Job {
    grant: Option<GrantRecord>,
    event: NewAuditEvent,
    reply: oneshot::Sender<Result<i64, ApiError>>,
}

/// Handle to the group-commit task.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Job>,
    head: watch::Receiver<i64>,
}

impl Committer {
    /// Start the committer task on the current runtime.
    pub fn start(store: Arc<dyn Store>, max_batch: usize) -> Self {
        let (tx, rx) = mpsc::channel::<Job>(max_batch.saturating_mul(8).max(64));
        let (head_tx, head) = watch::channel(0);
        tokio::spawn(run(store, rx, max_batch.max(1), head_tx));
        Self { tx, head }
    }

    /// The highest audit sequence number this committer has made durable, updated after
    /// every batch. Watchers wait on it instead of polling (events written elsewhere,
    /// by another replica or a configuration change, still need a poll).
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.head.clone()
    }

    /// Durably write a grant (if any) and its audit event; returns the event's sequence
    /// number once committed.
    ///
    /// # Errors
    /// `STORE_UNAVAILABLE` when the transaction failed; nothing was written.
    pub async fn commit(
        &self,
        grant: Option<GrantRecord>,
        event: NewAuditEvent,
    ) -> Result<i64, ApiError> {
        let what = if grant.is_some() {
            "grant+audit"
        } else {
            "audit"
        };
        self.enqueue(grant, event)
            .instrument(crate::telemetry::store_commit_span(what))
            .await
    }

    async fn enqueue(
        &self,
        grant: Option<GrantRecord>,
        event: NewAuditEvent,
    ) -> Result<i64, ApiError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job {
                grant,
                event,
                reply,
            })
            .await
            .map_err(|_| ApiError::new(ReasonCode::StoreUnavailable, "the store writer stopped"))?;
        rx.await
            .map_err(|_| ApiError::new(ReasonCode::StoreUnavailable, "the store writer stopped"))?
    }
}

async fn run(
    store: Arc<dyn Store>,
    mut rx: mpsc::Receiver<Job>,
    max_batch: usize,
    head: watch::Sender<i64>,
) {
    let mut grants: Vec<GrantRecord> = Vec::with_capacity(max_batch);
    let mut events: Vec<NewAuditEvent> = Vec::with_capacity(max_batch);
    let mut replies: Vec<oneshot::Sender<Result<i64, ApiError>>> = Vec::with_capacity(max_batch);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(job) = next.take() {
            grants.extend(job.grant);
            events.push(job.event);
            replies.push(job.reply);
            if replies.len() < max_batch {
                next = rx.try_recv().ok();
            }
        }
        let result = store.grant_insert_batch(&grants, &events).await;
        grants.clear();
        events.clear();
        match result {
            Ok(seqs) => {
                if let Some(last) = seqs.iter().copied().max() {
                    head.send_if_modified(|h| {
                        let newer = last > *h;
                        if newer {
                            *h = last;
                        }
                        newer
                    });
                }
                for (reply, seq) in replies
                    .drain(..)
                    .zip(seqs.into_iter().chain(std::iter::repeat(0)))
                {
                    let _ = reply.send(Ok(seq));
                }
            }
            Err(e) => {
                let api: ApiError = e.into();
                for reply in replies.drain(..) {
                    let _ = reply.send(Err(ApiError::new(api.reason, api.message.clone())));
                }
            }
        }
    }
}
