//! Inventory: what a workload can reach by policy and which grants it holds now.
//!
//! Policy needs the workload's claims, and an operator asking about a workload has no
//! token of it. lanyard records the claims each workload presented at its last exchange
//! (without per-token claims: `exp`, `iat`, `nbf`, `jti`, `auth_time`) and evaluates
//! policy with those. The recording is off the exchange's commit path: a workload's
//! claims are written only when they differ from what this server last wrote.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use lanyard_proto::v1 as pb;
use lanyard_store::{GrantFilter, GrantStatus, PageRequest, Store, WorkloadSeen};
use lanyard_trust::Workload;

use crate::convert;
use crate::error::ApiError;
use crate::runtime::{Runtime, narrow_scopes};

/// Claims that change with every token and say nothing about the workload.
const VOLATILE: &[&str] = &["exp", "iat", "nbf", "jti", "auth_time"];
/// Workloads whose last written claims this server remembers.
const MEMORY: usize = 100_000;
/// A workload's claims are written at most this often: a workload that alternates
/// between tokens with different claims (several tasks at once) must not cost a write
/// per exchange.
const REWRITE_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

/// The claims worth recording: all but the per-token ones.
pub fn stable_claims(
    claims: &serde_json::Map<String, serde_json::Value>,
) -> serde_json::Map<String, serde_json::Value> {
    claims
        .iter()
        .filter(|(k, _)| !VOLATILE.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// What this server last wrote per workload (a hash of issuer, rule and stable
/// claims, and when), so unchanged claims cost one hash per exchange and no write, and
/// changed ones at most one write per [`REWRITE_AFTER`].
#[derive(Default)]
pub struct SeenCache {
    last: Arc<Mutex<HashMap<String, (u64, std::time::Instant)>>>,
}

impl SeenCache {
    /// Record `workload`'s claims in the background if they changed since this server
    /// last wrote them. Failures are logged; inventory then shows older claims.
    pub fn note(&self, store: &Arc<dyn Store>, now: i64, workload: &Workload) {
        // The common case, a workload written less than REWRITE_AFTER ago, is decided
        // before the claims are copied, serialized and hashed (about 2 µs an exchange).
        {
            let last = match self.last.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            if let Some((_, at)) = last.get(workload.id.as_str())
                && at.elapsed() < REWRITE_AFTER
            {
                return;
            }
        }
        let claims = stable_claims(&workload.claims);
        let mut h = std::collections::hash_map::DefaultHasher::new();
        workload.issuer.hash(&mut h);
        workload.rule.hash(&mut h);
        serde_json::Value::Object(claims.clone())
            .to_string()
            .hash(&mut h);
        let digest = h.finish();
        {
            let mut last = match self.last.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            match last.get(workload.id.as_str()) {
                Some((d, _)) if *d == digest => return,
                Some((_, at)) if at.elapsed() < REWRITE_AFTER => return,
                _ => {}
            }
            if last.len() >= MEMORY {
                last.clear();
            }
            last.insert(workload.id.to_string(), (digest, std::time::Instant::now()));
        }
        let seen = WorkloadSeen {
            workload_id: workload.id.to_string(),
            issuer: workload.issuer.clone(),
            trust_rule: workload.rule.clone(),
            claims: serde_json::Value::Object(claims),
            first_seen: now,
            last_seen: now,
        };
        let store = store.clone();
        let last = self.last.clone();
        tokio::spawn(async move {
            if let Err(e) = store.workload_seen(std::slice::from_ref(&seen)).await {
                tracing::warn!(workload = %seen.workload_id, error = %e, "recording workload claims failed");
                if let Ok(mut last) = last.lock() {
                    last.remove(&seen.workload_id);
                }
            }
        });
    }
}

/// Answer an Inventory request.
///
/// # Errors
/// `INVALID_ARGUMENT` without a workload ID; `STORE_UNAVAILABLE`.
pub async fn inventory(
    rt: &Runtime,
    r: pb::InventoryRequest,
) -> Result<pb::InventoryResponse, ApiError> {
    if r.workload_id.is_empty() {
        return Err(ApiError::invalid("workload_id is required"));
    }
    let now = rt.clock.now_unix();
    let opt = |s: String| (!s.is_empty()).then_some(s);
    let filter = GrantFilter {
        workload_id: Some(r.workload_id.clone()),
        issuer: opt(r.issuer),
        destination: opt(r.destination),
        task_id: opt(r.task_id),
        status: Some(GrantStatus::Active),
        ..GrantFilter::default()
    };
    let page = rt
        .store
        .grant_list(
            &filter,
            &PageRequest {
                limit: r.page_size,
                cursor: opt(r.page_token),
            },
        )
        .await?;
    let seen = rt.store.workload_get(&r.workload_id).await?;
    let empty = serde_json::Map::new();
    let (claims, issuer) = match &seen {
        Some(s) => (s.claims.as_object().unwrap_or(&empty), s.issuer.as_str()),
        None => (&empty, ""),
    };
    let snap = rt.snapshot();
    let mut names: Vec<&String> = snap.destinations.keys().collect();
    names.sort();
    let authorizer = rt.authorizer();
    let mut destinations = Vec::with_capacity(names.len());
    for name in names {
        let Some(dest) = snap.destinations.get(name) else {
            continue;
        };
        let ttl = dest.spec.effective_ttl(None).as_secs();
        let (d, scopes) = narrow_scopes(&dest.spec.scopes, |s| {
            authorizer.decide(&lanyard_policy::DecisionRequest {
                workload_id: &r.workload_id,
                issuer,
                claims,
                destination: &dest.spec.name,
                destination_kind: &dest.spec.kind,
                destination_labels: &dest.spec.labels,
                action: lanyard_policy::Action::Exchange,
                scopes: s,
                ttl_secs: ttl,
                task_id: None,
                now,
                delegation: &[],
                subject: &r.workload_id,
            })
        });
        destinations.push(pb::ReachableDestination {
            destination: dest.spec.name.clone(),
            kind: dest.spec.kind.clone(),
            allowed: d.allowed,
            scopes: if d.allowed { scopes } else { Vec::new() },
            max_ttl_seconds: d
                .max_ttl_secs
                .map_or(0, |t| u32::try_from(t).unwrap_or(u32::MAX)),
            policy_version: d.policy_version,
            determining_policies: d.determining_policies,
        });
    }
    let denied_by = snap
        .deny
        .iter()
        .filter(|d| d.refuses(&r.workload_id, issuer, now).is_some())
        .map(convert::deny_to_pb)
        .collect();
    Ok(pb::InventoryResponse {
        workload_id: r.workload_id,
        destinations,
        grants: page
            .items
            .iter()
            .filter(|g| g.expires_at > now)
            .map(convert::grant_to_pb)
            .collect(),
        next_page_token: page.next_cursor.unwrap_or_default(),
        claims_seen_at: seen.as_ref().and_then(|s| convert::ts(s.last_seen)),
        denied_by,
        issuer: issuer.to_owned(),
    })
}
