//! Proving the chain intact, or saying where and how it breaks.
//!
//! [`verify_chain`] walks the events in order from genesis or from a signed checkpoint
//! and checks, for each event `n`:
//! - it exists (no gap in the sequence numbers);
//! - its hash matches its own content ([`lanyard_store::chain_hash`] of seq, previous
//!   hash and payload);
//! - its `prev_hash` is the hash of event `n - 1`;
//! - if it is a checkpoint (`audit.checkpoint`), its signature verifies with one of
//!   lanyard's keys and it names event `n - 1` with the hash the chain has.
//!
//! At the end the last event must be the head the store records beside the events, and
//! every checkpoint the auditor brought from outside must lie within the chain and
//! match it.
//!
//! The first failure is classified ([`BreakKind`]): an edited event, deleted events,
//! a reordered pair, a truncated tail, or a rewritten stretch (hashes recomputed after an
//! edit, caught by a signed checkpoint). Hashing runs on every core while the next page
//! is read from the store.

use std::sync::Arc;

use lanyard_store::{AuditRecord, GENESIS_HASH, Store, StoreError, hash_matches};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{CheckpointError, CheckpointVerifier};
use crate::kinds::AUDIT_CHECKPOINT;

/// Events read per page.
pub const DEFAULT_PAGE: u32 = 5000;
/// Pages read ahead while one is being checked.
const PREFETCH: usize = 3;
/// How far a renumbered event is looked for when classifying a hash mismatch.
const MAX_SHIFT: i64 = 64;

/// What to verify.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Start from this checkpoint (a compact JWS) instead of genesis. Its signature must
    /// verify and its event must still have the hash it names.
    pub from_checkpoint: Option<String>,
    /// Checkpoints kept outside lanyard: the chain must reach each one and match it.
    /// This is what proves a tail was not cut off together with its head record.
    pub known_checkpoints: Vec<String>,
    /// Events per page; [`DEFAULT_PAGE`] when 0.
    pub page_size: u32,
}

/// What kind of damage was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakKind {
    /// An event's content no longer matches its hash.
    Edited,
    /// One or more events are missing (a gap, or later events renumbered into it).
    Deleted,
    /// Two events changed places.
    Reordered,
    /// Events at the end are missing.
    Truncated,
    /// Hashes were recomputed after a change: the chain is self-consistent but an
    /// event does not link to its predecessor, or a signed checkpoint disagrees.
    Rewritten,
    /// A checkpoint event's signature does not verify (forged or edited).
    BadCheckpoint,
    /// Events exist beyond the head the store records (written around lanyard).
    Appended,
}

impl BreakKind {
    /// The stable name (`edited`, `deleted`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            BreakKind::Edited => "edited",
            BreakKind::Deleted => "deleted",
            BreakKind::Reordered => "reordered",
            BreakKind::Truncated => "truncated",
            BreakKind::Rewritten => "rewritten",
            BreakKind::BadCheckpoint => "bad_checkpoint",
            BreakKind::Appended => "appended",
        }
    }
}

/// The first failure found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Breakage {
    /// The first sequence number that cannot be trusted.
    pub seq: i64,
    /// What is wrong.
    pub kind: BreakKind,
    /// A sentence for the operator.
    pub detail: String,
}

/// The outcome of a verification.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    /// The sequence number verification started after (0 = genesis).
    pub start_seq: i64,
    /// Events checked.
    pub checked: u64,
    /// The last event proven intact.
    pub head_seq: i64,
    /// Its hash.
    pub head_hash: String,
    /// Signed checkpoints verified along the way (in the chain and from outside).
    pub checkpoints_verified: u64,
    /// The last in-chain checkpoint that matched, if any.
    pub last_checkpoint_seq: Option<i64>,
    /// The first failure; `None` when the chain is intact.
    pub breakage: Option<Breakage>,
}

impl VerifyReport {
    /// Whether the chain is intact.
    pub fn ok(&self) -> bool {
        self.breakage.is_none()
    }
}

/// Why verification could not run at all (as opposed to finding damage).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A checkpoint given by the caller is not valid.
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] CheckpointError),
}

/// Verify the chain in `store`. Damage is reported in the [`VerifyReport`]; an error
/// means verification could not be done.
///
/// # Errors
/// [`VerifyError::Store`] when reading fails; [`VerifyError::Checkpoint`] when a
/// checkpoint passed in `opts` does not verify.
pub async fn verify_chain(
    store: Arc<dyn Store>,
    keys: &CheckpointVerifier,
    opts: &VerifyOptions,
) -> Result<VerifyReport, VerifyError> {
    let page = if opts.page_size == 0 {
        DEFAULT_PAGE
    } else {
        opts.page_size
    };
    let mut known = Vec::new();
    for jws in &opts.known_checkpoints {
        known.push(keys.verify(jws)?);
    }
    let mut report = VerifyReport::default();
    let mut prev = GENESIS_HASH.to_owned();
    if let Some(jws) = &opts.from_checkpoint {
        let cp = keys.verify(jws)?;
        report.checkpoints_verified += 1;
        report.start_seq = cp.seq;
        let found = store.audit_list(cp.seq - 1, 1).await?;
        match found.first() {
            Some(r) if r.seq == cp.seq && r.hash == cp.head_hash && r.hash_is_valid() => {
                prev = r.hash.clone();
            }
            Some(r) if r.seq == cp.seq => {
                report.breakage = Some(Breakage {
                    seq: cp.seq,
                    kind: BreakKind::Rewritten,
                    detail: format!(
                        "the starting checkpoint says event {} has hash {}, the store has {}",
                        cp.seq, cp.head_hash, r.hash
                    ),
                });
                return Ok(report);
            }
            _ => {
                report.breakage = Some(Breakage {
                    seq: cp.seq,
                    kind: BreakKind::Deleted,
                    detail: format!("event {} named by the starting checkpoint is gone", cp.seq),
                });
                return Ok(report);
            }
        }
    }
    report.head_seq = report.start_seq;
    report.head_hash.clone_from(&prev);

    // Pages are read ahead (PREFETCH in flight, each on its own reader connection)
    // while the current page is hashed on every core. Read-ahead assumes no gaps; a page
    // that does not start right after the last event checked is read again.
    let mut expect = report.start_seq + 1;
    let fetch = |after: i64| {
        let store = store.clone();
        tokio::spawn(async move { (after, store.audit_list(after, page).await) })
    };
    let mut inflight = std::collections::VecDeque::new();
    let mut next_after = expect - 1;
    for _ in 0..PREFETCH {
        inflight.push_back(fetch(next_after));
        next_after += i64::from(page);
    }
    while let Some(task) = inflight.pop_front() {
        let (after, batch) = task
            .await
            .map_err(|e| StoreError::Unavailable(format!("audit read task failed: {e}").into()))?;
        let batch = batch?;
        if after != expect - 1 {
            // Read-ahead missed (a gap moved the pages): start over from here.
            for t in inflight.drain(..) {
                t.abort();
            }
            next_after = expect - 1;
            inflight.push_back(fetch(next_after));
            next_after += i64::from(page);
            continue;
        }
        if batch.len() == page as usize {
            inflight.push_back(fetch(next_after));
            next_after += i64::from(page);
        } else {
            for t in inflight.drain(..) {
                t.abort();
            }
        }
        let (records, valid) = tokio::task::spawn_blocking(move || {
            let valid = hashes_valid(&batch);
            (batch, valid)
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("audit hashing task failed: {e}").into()))?;
        for (r, ok) in records.iter().zip(valid) {
            if let Some(b) =
                check_one(store.as_ref(), keys, r, ok, expect, &prev, &mut report).await?
            {
                report.breakage = Some(b);
                return Ok(report);
            }
            for cp in &known {
                if cp.seq == r.seq && cp.head_hash != r.hash {
                    report.breakage = Some(Breakage {
                        seq: report
                            .last_checkpoint_seq
                            .map_or(report.start_seq + 1, |s| s + 1),
                        kind: BreakKind::Rewritten,
                        detail: format!(
                            "a checkpoint kept outside says event {} has hash {}, the chain has {}",
                            cp.seq, cp.head_hash, r.hash
                        ),
                    });
                    return Ok(report);
                }
            }
            prev.clone_from(&r.hash);
            report.head_hash.clone_from(&r.hash);
            report.checked += 1;
            report.head_seq = r.seq;
            expect = r.seq + 1;
        }
    }
    // The tail: the head record, then checkpoints from outside.
    let (head_seq, head_hash) = store.audit_head().await?;
    let end = report.head_seq;
    if head_seq > end {
        report.breakage = Some(Breakage {
            seq: end + 1,
            kind: BreakKind::Truncated,
            detail: format!(
                "the chain ends at event {end}, but the store's head record says it reaches {head_seq}: events {}..={head_seq} were cut off",
                end + 1
            ),
        });
    } else if head_seq < end && head_seq >= report.start_seq {
        report.breakage = Some(Breakage {
            seq: head_seq + 1,
            kind: BreakKind::Appended,
            detail: format!(
                "events {}..={end} lie beyond the store's head record ({head_seq}): they were written around lanyard",
                head_seq + 1
            ),
        });
    } else if head_seq == end && head_hash != report.head_hash {
        report.breakage = Some(Breakage {
            seq: end,
            kind: BreakKind::Rewritten,
            detail: format!(
                "the store's head record names hash {head_hash} for event {end}, the chain has {}",
                report.head_hash
            ),
        });
    } else if let Some(cp) = known
        .iter()
        .filter(|cp| cp.seq > end)
        .max_by_key(|cp| cp.seq)
    {
        report.breakage = Some(Breakage {
            seq: end + 1,
            kind: BreakKind::Truncated,
            detail: format!(
                "a checkpoint signed at {} ms says event {} existed; the chain ends at {end}",
                cp.time_ms, cp.seq
            ),
        });
    }
    Ok(report)
}

/// Check event `r`, expected at `expect` after an event with hash `prev`.
async fn check_one(
    store: &dyn Store,
    keys: &CheckpointVerifier,
    r: &AuditRecord,
    hash_ok: bool,
    expect: i64,
    prev: &str,
    report: &mut VerifyReport,
) -> Result<Option<Breakage>, StoreError> {
    if r.seq > expect {
        let detail = if r.seq == expect + 1 {
            format!("event {expect} is missing")
        } else {
            format!("events {expect}..={} are missing", r.seq - 1)
        };
        return Ok(Some(Breakage {
            seq: expect,
            kind: BreakKind::Deleted,
            detail,
        }));
    }
    if !hash_ok {
        return classify_mismatch(store, r, expect).await.map(Some);
    }
    if r.prev_hash != prev {
        return Ok(Some(Breakage {
            seq: expect,
            kind: BreakKind::Rewritten,
            detail: format!(
                "event {expect} does not follow event {}: it names {} as its predecessor's hash, the chain has {prev}; events before it were removed or replaced and the hashes recomputed",
                expect - 1,
                r.prev_hash
            ),
        }));
    }
    if r.kind == AUDIT_CHECKPOINT {
        let jws = serde_json::from_str::<serde_json::Value>(&r.payload)
            .ok()
            .and_then(|v| v["detail"]["jws"].as_str().map(str::to_owned))
            .unwrap_or_default();
        match keys.verify(&jws) {
            Ok(cp) => {
                // A checkpoint names the head as it was when signed: usually the event
                // right before it, older if other writers appended in between.
                let chain_hash_at = if cp.seq == r.seq - 1 {
                    Some(prev.to_owned())
                } else if cp.seq >= 1 && cp.seq < r.seq {
                    store
                        .audit_list(cp.seq - 1, 1)
                        .await?
                        .into_iter()
                        .find(|e| e.seq == cp.seq)
                        .map(|e| e.hash)
                } else {
                    None
                };
                if chain_hash_at.as_deref() == Some(cp.head_hash.as_str()) {
                    report.checkpoints_verified += 1;
                    report.last_checkpoint_seq = Some(r.seq);
                } else {
                    let from = report.last_checkpoint_seq.unwrap_or(report.start_seq) + 1;
                    return Ok(Some(Breakage {
                        seq: from,
                        kind: BreakKind::Rewritten,
                        detail: format!(
                            "the checkpoint at event {} (signed) says event {} has hash {}, the chain has {}: events {from}..={} were rewritten",
                            r.seq,
                            cp.seq,
                            cp.head_hash,
                            chain_hash_at.as_deref().unwrap_or("no such event"),
                            r.seq - 1
                        ),
                    }));
                }
            }
            Err(e) => {
                return Ok(Some(Breakage {
                    seq: r.seq,
                    kind: BreakKind::BadCheckpoint,
                    detail: format!("the checkpoint at event {} is not valid: {e}", r.seq),
                }));
            }
        }
    }
    Ok(None)
}

/// Event `r` sits at `n` but its hash does not match: edited, or moved here?
async fn classify_mismatch(
    store: &dyn Store,
    r: &AuditRecord,
    n: i64,
) -> Result<Breakage, StoreError> {
    let written_at = (1..=MAX_SHIFT)
        .flat_map(|k| [n + k, n - k])
        .filter(|m| *m >= 1)
        .find(|m| hash_matches(*m, &r.prev_hash, &r.payload, &r.hash));
    let Some(m) = written_at else {
        return Ok(Breakage {
            seq: n,
            kind: BreakKind::Edited,
            detail: format!("event {n}'s content does not match its hash: it was edited"),
        });
    };
    if m == n + 1 {
        let next = store.audit_list(n, 1).await?;
        if let Some(o) = next.first().filter(|o| o.seq == n + 1)
            && hash_matches(n, &o.prev_hash, &o.payload, &o.hash)
        {
            return Ok(Breakage {
                seq: n,
                kind: BreakKind::Reordered,
                detail: format!("events {n} and {} changed places", n + 1),
            });
        }
    }
    if m > n {
        return Ok(Breakage {
            seq: n,
            kind: BreakKind::Deleted,
            detail: format!(
                "the event at {n} was written as event {m}: {} event(s) from {n} were deleted and later events renumbered",
                m - n
            ),
        });
    }
    Ok(Breakage {
        seq: m,
        kind: BreakKind::Reordered,
        detail: format!("the event at {n} was written as event {m}: events were moved"),
    })
}

/// Whether each record's hash matches its content, hashing on every core.
fn hashes_valid(records: &[AuditRecord]) -> Vec<bool> {
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    if threads < 2 || records.len() < 256 {
        return records.iter().map(AuditRecord::hash_is_valid).collect();
    }
    let chunk = records.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = records
            .chunks(chunk)
            .map(|c| {
                let h = s.spawn(move || c.iter().map(AuditRecord::hash_is_valid).collect());
                (c.len(), h)
            })
            .collect();
        handles
            .into_iter()
            // A hashing thread cannot panic on any input; if one did, its events count
            // as unproven rather than being skipped.
            .flat_map(|(len, h)| h.join().unwrap_or_else(|_| vec![false; len]))
            .collect()
    })
}
