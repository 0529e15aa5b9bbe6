//! Policy dry-run: replay the exchange requests recorded in the audit stream against a
//! proposed policy and report, per workload, destination and scope, who would gain and
//! who would lose access. Nothing is stored or changed.
//!
//! Each `exchange.granted` or `exchange.denied` (for `POLICY_DENIED`) event carries what
//! policy saw: the workload, issuer, verified claims, destination, requested scopes, TTL,
//! task and time. The recorded outcome is the event's (granted scopes, or none); the
//! proposal's is computed with the same scope narrowing the server applies. Requests
//! refused before policy (a bad token, an unknown destination...) are counted as skipped.

use lanyard_audit::kinds;
use std::collections::BTreeMap;

use lanyard_core::ReasonCode;
use lanyard_policy::{Action, Authorizer, CedarAuthorizer, DecisionRequest};
use lanyard_proto::v1 as pb;
use lanyard_store::NewAuditEvent;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::runtime::{Runtime, narrow_scopes};

/// Events read per page while replaying.
const PAGE: u32 = 1000;
/// The default window when the request names none.
const DEFAULT_WINDOW_MS: i64 = 24 * 3600 * 1000;

/// Replay `[since_ms, until_ms)` against `text`.
///
/// # Errors
/// `CONFIG_INVALID` for a proposal that does not validate; `INVALID_ARGUMENT` for an
/// empty window; `STORE_UNAVAILABLE`.
pub async fn dry_run(
    rt: &Runtime,
    text: &str,
    since_ms: Option<i64>,
    until_ms: Option<i64>,
) -> Result<pb::DryRunPolicyResponse, ApiError> {
    let digest = hex::encode(Sha256::digest(text.as_bytes()));
    let version = format!("proposed:sha256:{}", &digest[..12]);
    let proposed = CedarAuthorizer::from_text(text, &version)
        .map_err(|e| ApiError::new(ReasonCode::ConfigInvalid, e.to_string()))?;
    let until = until_ms.unwrap_or_else(|| rt.clock.now_unix_millis());
    let since = since_ms.unwrap_or(until - DEFAULT_WINDOW_MS);
    if since >= until {
        return Err(ApiError::invalid("since must be before until"));
    }
    let mut out = pb::DryRunPolicyResponse {
        proposed_version: version,
        ..Default::default()
    };
    let snap = rt.snapshot();
    // (change, workload, destination, scope) -> (requests, example seq)
    let mut changes: BTreeMap<(bool, String, String, String), (i64, i64)> = BTreeMap::new();
    let mut after = first_seq_at(rt, since).await? - 1;
    'pages: loop {
        let page = rt.store.audit_list(after, PAGE).await?;
        if page.is_empty() {
            break;
        }
        for r in &page {
            after = r.seq;
            if r.time_ms >= until {
                break 'pages;
            }
            if r.time_ms < since
                || !(r.kind == kinds::EXCHANGE_GRANTED || r.kind == kinds::EXCHANGE_DENIED)
            {
                continue;
            }
            out.events_examined += 1;
            let Some(replay) = Replay::of(&r.payload) else {
                out.skipped += 1;
                continue;
            };
            let Some(dest) = snap.destinations.get(&replay.destination) else {
                out.skipped += 1;
                continue;
            };
            out.requests_replayed += 1;
            let (decision, narrowed) = narrow_scopes(&replay.requested, |scopes| {
                proposed.decide(&DecisionRequest {
                    workload_id: &replay.workload_id,
                    issuer: &replay.issuer,
                    claims: &replay.claims,
                    destination: &dest.spec.name,
                    destination_kind: &dest.spec.kind,
                    destination_labels: &dest.spec.labels,
                    action: Action::Exchange,
                    scopes,
                    ttl_secs: replay.ttl_secs,
                    task_id: replay.task_id.as_deref(),
                    now: r.time_ms.div_euclid(1000),
                    delegation: &[],
                    subject: &replay.workload_id,
                })
            });
            let now_allowed: Vec<&String> = if decision.allowed {
                narrowed.iter().collect()
            } else {
                Vec::new()
            };
            for scope in &replay.requested {
                let was = replay.granted.contains(scope);
                let is = now_allowed.contains(&scope);
                if was == is {
                    continue;
                }
                let key = (
                    is,
                    replay.workload_id.clone(),
                    replay.destination.clone(),
                    scope.clone(),
                );
                let entry = changes.entry(key).or_insert((0, r.seq));
                entry.0 += 1;
            }
        }
    }
    // BTreeMap order puts `false` (lost) before `true` (gained).
    out.changes = changes
        .into_iter()
        .map(
            |((gained, workload_id, destination, scope), (requests, example_seq))| {
                pb::DryRunChange {
                    workload_id,
                    destination,
                    scope,
                    change: if gained { "gained" } else { "lost" }.into(),
                    requests,
                    example_seq,
                }
            },
        )
        .collect();
    Ok(out)
}

/// What one recorded exchange asked and got.
struct Replay {
    workload_id: String,
    issuer: String,
    claims: serde_json::Map<String, serde_json::Value>,
    destination: String,
    requested: Vec<String>,
    granted: Vec<String>,
    ttl_secs: u64,
    task_id: Option<String>,
}

impl Replay {
    /// `None` for a request that did not reach policy or lacks what a replay needs.
    fn of(payload: &str) -> Option<Replay> {
        let ev: NewAuditEvent = serde_json::from_str(payload).ok()?;
        let allowed = ev.decision.as_deref() == Some("allow");
        if !allowed && ev.reason.as_deref() != Some(ReasonCode::PolicyDenied.as_str()) {
            return None;
        }
        let requested: Vec<String> = match ev.detail.get("requested_scopes") {
            Some(v) => serde_json::from_value(v.clone()).ok()?,
            None => ev.scopes.clone(),
        };
        Some(Replay {
            workload_id: ev.workload_id?,
            issuer: ev.issuer?,
            claims: ev.detail.get("claims")?.as_object()?.clone(),
            destination: ev.destination?,
            granted: if allowed { ev.scopes } else { Vec::new() },
            requested,
            ttl_secs: ev.detail.get("ttl_secs")?.as_u64()?,
            task_id: ev.task_id,
        })
    }
}

/// The first sequence number whose event is at or after `time_ms` (events are written
/// in time order, give or take one group commit), by binary search over the chain.
async fn first_seq_at(rt: &Runtime, time_ms: i64) -> Result<i64, ApiError> {
    let (head, _) = rt.store.audit_head().await?;
    let (mut lo, mut hi) = (1i64, head + 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let t = rt
            .store
            .audit_list(mid - 1, 1)
            .await?
            .first()
            .map_or(i64::MAX, |e| e.time_ms);
        if t < time_ms {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    // Step back a little: group commits may interleave times by a few milliseconds.
    Ok((lo - PAGE as i64).max(1))
}
