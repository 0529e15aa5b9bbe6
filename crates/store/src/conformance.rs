//! The conformance suite every [`Store`] implementation must pass (feature `test-util`).
//!
//! [`run_all`] checks each behavior in turn; [`run_concurrent`] hammers the store from
//! many tasks at once. Both are backend-agnostic: an implementation's test opens a fresh
//! store and calls them.
//!
//! ## Why the suite can run twice on one database
//! Every name, workload, issuer and token ID carries a fresh random tag, and checks on
//! store-wide state (the audit chain, the active count, the sweeps) look at what
//! changed, not at absolute contents. The suite does assume nothing else writes to the
//! store while it runs.
//!
//! Test support: a failed expectation panics, which is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashSet};
use std::fmt::Debug;
use std::sync::Arc;

use lanyard_core::{GrantId, UnixTime};
use serde_json::json;

use crate::{
    AuditRecord, ConfigKind, ConfigObject, GENESIS_HASH, GrantFilter, GrantRecord, GrantStatus,
    JobState, NewAuditEvent, NewConfigObject, NewRevocationJob, PageRequest, Result,
    RevocationReceiptRecord, RevokeSelector, StepState, Store, StoreError, WorkloadSeen,
};

/// "Now" for most checks: late enough that the fixed past times below are all before it.
const NOW: UnixTime = 1_900_000_000;
/// Expiry times for the sweep check, long before anything else the suite leaves active.
const SWEEP_AT: UnixTime = 1_000_000;

/// Run every behavior check against `store`, one after the other.
pub async fn run_all(store: &dyn Store) {
    ping(store).await;
    config_put_get_list_delete(store).await;
    config_every_kind_round_trips(store).await;
    config_expected_revision(store).await;
    config_generation_moves(store).await;
    grant_insert_and_get(store).await;
    grant_insert_batch_is_atomic(store).await;
    grant_list_filters(store).await;
    grant_list_pagination(store).await;
    grant_renew(store).await;
    grant_finish(store).await;
    grant_expire_due_in_batches(store).await;
    grant_count_active(store).await;
    jti_replay(store).await;
    jti_purge(store).await;
    audit_events_of_every_change(store).await;
    audit_list_paging(store).await;
    audit_chain_is_valid(store).await;
    revocation_job_lifecycle(store).await;
    revocation_selectors(store).await;
    revocation_leases(store).await;
    revocation_of_expired_grants(store).await;
    revocation_sweep(store).await;
    revocation_abandon(store).await;
    workloads_seen(store).await;
}

/// Run writers and readers concurrently (20 writer tasks, plus races on one config
/// object, one grant and one token ID) and check that no update was lost and the audit
/// chain is still linear, gap-free and valid. Needs a multi-threaded runtime to race for
/// real.
pub async fn run_concurrent(store: Arc<dyn Store>) {
    concurrent_writers(store).await;
}

// === helpers ===

/// A fresh random tag for names, so reruns on one database do not collide.
fn tag() -> String {
    // A UUIDv7 ends in random bits.
    GrantId::generate().as_str()["grt_".len()..].to_owned()
}

fn event(kind: &str, marker: &str) -> NewAuditEvent {
    NewAuditEvent {
        time_ms: NOW * 1000 + 123,
        kind: kind.to_owned(),
        request_id: Some(marker.to_owned()),
        actor: Some("conformance".to_owned()),
        detail: json!({ "suite": "conformance", "marker": marker }),
        ..NewAuditEvent::default()
    }
}

fn config(kind: ConfigKind, name: &str, spec: serde_json::Value, now: UnixTime) -> NewConfigObject {
    NewConfigObject {
        kind,
        name: name.to_owned(),
        spec,
        updated_by: "cli:uid=0".to_owned(),
        now,
    }
}

fn grant(workload: &str, issuer: &str, destination: &str, task: Option<&str>) -> GrantRecord {
    let id = GrantId::generate();
    GrantRecord {
        revocation_handle: format!("jti-{}", id.as_str()),
        id,
        workload_id: workload.to_owned(),
        issuer: issuer.to_owned(),
        trust_rule: "rule-default".to_owned(),
        task_id: task.map(str::to_owned),
        destination: destination.to_owned(),
        scopes: vec!["repo:read".to_owned(), "issues/*".to_owned()],
        actor_chain: vec!["spiffe://conformance.test/agent".to_owned()],
        issued_at: NOW - 10,
        expires_at: NOW + 3600,
        status: GrantStatus::Active,
        finished_at: None,
        renew_count: 0,
    }
}

fn workload(t: &str, rest: &str) -> String {
    format!("spiffe://conformance.test/{t}/{rest}")
}

async fn insert(store: &dyn Store, grants: &[GrantRecord]) {
    let events: Vec<_> = grants
        .iter()
        .map(|g| event("exchange.granted", g.id.as_str()))
        .collect();
    let seqs = store.grant_insert_batch(grants, &events).await.unwrap();
    assert_eq!(seqs.len(), events.len());
}

#[track_caller]
fn assert_conflict<T: Debug>(r: Result<T>, what: &str) {
    assert!(
        matches!(r, Err(StoreError::Conflict(_))),
        "{what}: expected Conflict, got {r:?}"
    );
}

#[track_caller]
fn assert_not_found<T: Debug>(r: Result<T>, what: &str) {
    assert!(
        matches!(r, Err(StoreError::NotFound { .. })),
        "{what}: expected NotFound, got {r:?}"
    );
}

/// The whole audit chain, read in pages.
async fn read_chain(store: &dyn Store, after: i64) -> Vec<AuditRecord> {
    let mut out = Vec::new();
    let mut after = after;
    loop {
        let page = store.audit_list(after, 500).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.seq;
        out.extend(page);
    }
    out
}

/// The last `(seq, hash)` of the chain, `(0, GENESIS_HASH)` when empty.
async fn chain_tail(store: &dyn Store) -> (i64, String) {
    read_chain(store, 0)
        .await
        .pop()
        .map_or((0, GENESIS_HASH.to_owned()), |r| (r.seq, r.hash))
}

/// `records` continue the chain after `(seq, hash)` without gaps, each hash valid.
#[track_caller]
fn assert_linked(records: &[AuditRecord], mut seq: i64, hash: &str) {
    let mut prev = hash.to_owned();
    for r in records {
        assert_eq!(r.seq, seq + 1, "audit seq gap after {seq}");
        assert_eq!(
            r.prev_hash, prev,
            "audit event {} does not link to its predecessor",
            r.seq
        );
        assert!(r.hash_is_valid(), "audit event {} has a wrong hash", r.seq);
        seq = r.seq;
        prev.clone_from(&r.hash);
    }
}

#[track_caller]
fn assert_same_event(record: &AuditRecord, event: &NewAuditEvent) {
    assert_eq!(
        record.payload,
        event.payload(),
        "audit event {} payload",
        record.seq
    );
    assert_eq!(record.kind, event.kind, "audit event {} kind", record.seq);
    assert_eq!(
        record.time_ms, event.time_ms,
        "audit event {} time",
        record.seq
    );
}

/// Every grant matching `filter`, following cursors with pages of `limit`.
async fn list_all(store: &dyn Store, filter: &GrantFilter, limit: u32) -> Vec<GrantRecord> {
    let mut out = Vec::new();
    let mut cursor = None;
    for _ in 0..10_000 {
        let page = store
            .grant_list(filter, &PageRequest { limit, cursor })
            .await
            .unwrap();
        assert!(
            page.items.len()
                <= PageRequest {
                    limit,
                    cursor: None
                }
                .effective_limit() as usize,
            "page longer than its limit"
        );
        out.extend(page.items);
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => return out,
        }
    }
    panic!("grant_list never ended");
}

/// Grants in the order `grant_list` must return them: newest (largest ID) first.
fn newest_first(mut grants: Vec<GrantRecord>) -> Vec<GrantRecord> {
    grants.sort_by(|a, b| b.id.cmp(&a.id));
    grants
}

// === checks ===

async fn ping(store: &dyn Store) {
    assert!(!store.backend().is_empty());
    store.ping().await.unwrap();
}

async fn config_put_get_list_delete(store: &dyn Store) {
    let t = tag();
    let (a, b) = (format!("a-{t}"), format!("b-{t}"));
    let spec = json!({
        "url": "https://issuer.example/ä",
        "n": 42, "f": 1.5, "neg": -7,
        "nested": { "list": [1, "two", null, true], "empty": {} },
    });
    let put = store
        .config_put(
            config(ConfigKind::Issuer, &a, spec.clone(), NOW),
            None,
            event("issuer.put", &a),
        )
        .await
        .unwrap();
    let want = ConfigObject {
        kind: ConfigKind::Issuer,
        name: a.clone(),
        spec: spec.clone(),
        revision: put.revision,
        created_at: NOW,
        updated_at: NOW,
        updated_by: "cli:uid=0".to_owned(),
    };
    assert_eq!(put, want);
    assert!(put.revision > 0, "revisions start above 0");
    assert_eq!(
        store.config_get(ConfigKind::Issuer, &a).await.unwrap(),
        Some(want)
    );
    // Kinds are separate namespaces.
    assert_eq!(
        store.config_get(ConfigKind::Policy, &a).await.unwrap(),
        None
    );

    store
        .config_put(
            config(ConfigKind::Issuer, &b, json!({}), NOW),
            None,
            event("issuer.put", &b),
        )
        .await
        .unwrap();
    store
        .config_put(
            config(ConfigKind::TrustRule, &b, json!({ "x": 1 }), NOW),
            None,
            event("trust_rule.put", &b),
        )
        .await
        .unwrap();
    let issuers = store.config_list(ConfigKind::Issuer).await.unwrap();
    assert!(issuers.iter().all(|o| o.kind == ConfigKind::Issuer));
    assert!(
        issuers.windows(2).all(|w| w[0].name < w[1].name),
        "config_list is ordered by name"
    );
    let ours: Vec<_> = issuers
        .iter()
        .filter(|o| o.name.ends_with(&t))
        .map(|o| o.name.as_str())
        .collect();
    assert_eq!(ours, [a.as_str(), b.as_str()]);

    // Replace: new revision and contents, created_at kept.
    let updated = store
        .config_put(
            NewConfigObject {
                updated_by: "operator:alice".to_owned(),
                ..config(ConfigKind::Issuer, &a, json!({ "v": 2 }), NOW + 5)
            },
            None,
            event("issuer.put", &a),
        )
        .await
        .unwrap();
    assert!(updated.revision > put.revision);
    assert_eq!((updated.created_at, updated.updated_at), (NOW, NOW + 5));
    assert_eq!(updated.updated_by, "operator:alice");
    assert_eq!(
        store.config_get(ConfigKind::Issuer, &a).await.unwrap(),
        Some(updated)
    );

    store
        .config_delete(ConfigKind::Issuer, &a, event("issuer.delete", &a))
        .await
        .unwrap();
    assert_eq!(
        store.config_get(ConfigKind::Issuer, &a).await.unwrap(),
        None
    );
    assert_not_found(
        store
            .config_delete(ConfigKind::Issuer, &a, event("issuer.delete", &a))
            .await,
        "deleting a deleted object",
    );
    let issuers = store.config_list(ConfigKind::Issuer).await.unwrap();
    assert!(!issuers.iter().any(|o| o.name == a));
    assert!(issuers.iter().any(|o| o.name == b));
}

/// Every kind is stored and read back under its own name space, and moves the
/// configuration generation (so replicas pick up a rotated destination secret).
async fn config_every_kind_round_trips(store: &dyn Store) {
    let name = format!("every-{}", tag());
    for kind in ConfigKind::ALL {
        assert_eq!(ConfigKind::parse(kind.as_str()), Some(kind));
        let before = store.config_generation().await.unwrap();
        let spec = json!({ "kind": kind.as_str() });
        store
            .config_put(
                config(kind, &name, spec.clone(), NOW),
                None,
                event(&format!("{}.put", kind.as_str()), &name),
            )
            .await
            .unwrap();
        assert!(
            store.config_generation().await.unwrap() > before,
            "{kind:?}"
        );
        let got = store.config_get(kind, &name).await.unwrap().unwrap();
        assert_eq!((got.kind, got.spec), (kind, spec), "{kind:?}");
        assert!(
            store
                .config_list(kind)
                .await
                .unwrap()
                .iter()
                .any(|o| o.name == name && o.kind == kind),
            "{kind:?}"
        );
    }
    for kind in ConfigKind::ALL {
        store
            .config_delete(
                kind,
                &name,
                event(&format!("{}.delete", kind.as_str()), &name),
            )
            .await
            .unwrap();
        assert_eq!(
            store.config_get(kind, &name).await.unwrap(),
            None,
            "{kind:?}"
        );
    }
}

async fn config_expected_revision(store: &dyn Store) {
    let name = format!("dst-{}", tag());
    let kind = ConfigKind::Destination;
    let ev = || event("destination.put", &name);
    let first = store
        .config_put(config(kind, &name, json!({ "v": 1 }), NOW), Some(0), ev())
        .await
        .unwrap();

    let tail = chain_tail(store).await;
    let generation = store.config_generation().await.unwrap();
    assert_conflict(
        store
            .config_put(config(kind, &name, json!({ "v": 9 }), NOW), Some(0), ev())
            .await,
        "must-not-exist put on an existing object",
    );
    assert_eq!(
        store.config_get(kind, &name).await.unwrap(),
        Some(first.clone())
    );
    assert_eq!(
        chain_tail(store).await,
        tail,
        "a refused put must not append audit events"
    );
    assert_eq!(
        store.config_generation().await.unwrap(),
        generation,
        "a refused put must not move the generation"
    );

    let second = store
        .config_put(
            config(kind, &name, json!({ "v": 2 }), NOW + 1),
            Some(first.revision),
            ev(),
        )
        .await
        .unwrap();
    assert!(second.revision > first.revision);
    assert_conflict(
        store
            .config_put(
                config(kind, &name, json!({ "v": 9 }), NOW),
                Some(first.revision),
                ev(),
            )
            .await,
        "put with a stale revision",
    );
    assert_conflict(
        store
            .config_put(
                config(kind, &name, json!({ "v": 9 }), NOW),
                Some(second.revision + 1000),
                ev(),
            )
            .await,
        "put with a future revision",
    );
    assert_eq!(store.config_get(kind, &name).await.unwrap(), Some(second));

    let missing = format!("missing-{name}");
    assert_conflict(
        store
            .config_put(config(kind, &missing, json!({}), NOW), Some(7), ev())
            .await,
        "put with a revision on a missing object",
    );
    assert_eq!(store.config_get(kind, &missing).await.unwrap(), None);

    // Once deleted, "must not exist" succeeds again and the object starts afresh.
    store.config_delete(kind, &name, ev()).await.unwrap();
    let again = store
        .config_put(
            config(kind, &name, json!({ "v": 3 }), NOW + 9),
            Some(0),
            ev(),
        )
        .await
        .unwrap();
    assert_eq!(again.created_at, NOW + 9);
}

async fn config_generation_moves(store: &dyn Store) {
    let name = format!("pol-{}", tag());
    let g0 = store.config_generation().await.unwrap();
    let obj = store
        .config_put(
            config(ConfigKind::Policy, &name, json!({ "rules": [] }), NOW),
            None,
            event("policy.put", &name),
        )
        .await
        .unwrap();
    let g1 = store.config_generation().await.unwrap();
    assert!(g1 > g0, "a put moves the generation");
    assert!(
        obj.revision > g0 && obj.revision <= g1,
        "revision comes from the generation"
    );
    store
        .config_delete(ConfigKind::Policy, &name, event("policy.delete", &name))
        .await
        .unwrap();
    let g2 = store.config_generation().await.unwrap();
    assert!(g2 > g1, "a delete moves the generation");
    assert_not_found(
        store
            .config_delete(ConfigKind::Policy, &name, event("policy.delete", &name))
            .await,
        "deleting a missing object",
    );
    assert_eq!(
        store.config_generation().await.unwrap(),
        g2,
        "a failed delete does not move it"
    );
}

async fn grant_insert_and_get(store: &dyn Store) {
    let t = tag();
    let full = grant(&workload(&t, "full"), "iss", "dst", Some("task-1"));
    let bare = GrantRecord {
        task_id: None,
        scopes: Vec::new(),
        actor_chain: Vec::new(),
        ..grant(&workload(&t, "bare"), "iss", "dst", None)
    };
    let events = [event("exchange.granted", &t), event("exchange.denied", &t)];
    let seqs = store
        .grant_insert_batch(&[full.clone(), bare.clone()], &events)
        .await
        .unwrap();
    assert_eq!(seqs.len(), 2);
    assert_eq!(seqs[1], seqs[0] + 1);
    assert_eq!(store.grant_get(&full.id).await.unwrap(), Some(full));
    assert_eq!(store.grant_get(&bare.id).await.unwrap(), Some(bare));
    assert_eq!(store.grant_get(&GrantId::generate()).await.unwrap(), None);

    // Degenerate batches.
    assert_eq!(
        store.grant_insert_batch(&[], &[]).await.unwrap(),
        Vec::<i64>::new()
    );
    let only_events = store
        .grant_insert_batch(&[], &[event("exchange.denied", &t)])
        .await
        .unwrap();
    assert_eq!(only_events, [seqs[1] + 1]);
    let only_grant = grant(&workload(&t, "lone"), "iss", "dst", None);
    assert!(
        store
            .grant_insert_batch(std::slice::from_ref(&only_grant), &[])
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.grant_get(&only_grant.id).await.unwrap(),
        Some(only_grant)
    );
}

async fn grant_insert_batch_is_atomic(store: &dyn Store) {
    let t = tag();
    let existing = grant(&workload(&t, "w"), "iss", "dst", None);
    insert(store, std::slice::from_ref(&existing)).await;
    let tail = chain_tail(store).await;

    let fresh = grant(&workload(&t, "w"), "iss", "dst", None);
    let dup = GrantRecord {
        workload_id: workload(&t, "other"),
        ..existing.clone()
    };
    assert_conflict(
        store
            .grant_insert_batch(&[fresh.clone(), dup], &[event("exchange.granted", &t)])
            .await,
        "batch with an existing grant ID",
    );
    assert_conflict(
        store
            .grant_insert_batch(
                &[fresh.clone(), fresh.clone()],
                &[event("exchange.granted", &t)],
            )
            .await,
        "batch with the same grant twice",
    );
    assert_eq!(
        store.grant_get(&fresh.id).await.unwrap(),
        None,
        "a failed batch inserts nothing"
    );
    assert_eq!(store.grant_get(&existing.id).await.unwrap(), Some(existing));
    assert_eq!(
        chain_tail(store).await,
        tail,
        "a failed batch appends no audit events"
    );
}

/// A local model of `GrantFilter`, to compute what `grant_list` must return.
fn filter_matches(f: &GrantFilter, g: &GrantRecord) -> bool {
    f.workload_id.as_ref().is_none_or(|w| &g.workload_id == w)
        && f.workload_prefix
            .as_ref()
            .is_none_or(|p| g.workload_id.starts_with(p.as_str()))
        && f.issuer.as_ref().is_none_or(|i| &g.issuer == i)
        && f.destination.as_ref().is_none_or(|d| &g.destination == d)
        && f.task_id
            .as_ref()
            .is_none_or(|t| g.task_id.as_ref() == Some(t))
        && f.status.is_none_or(|s| g.status == s)
}

async fn grant_list_filters(store: &dyn Store) {
    let t = tag();
    // `_` and `%` would be wildcards to LIKE; `a_b` must not match `aXb`.
    let (wa, wb) = (workload(&t, "a_b/one"), workload(&t, "aXb/two"));
    let (i1, i2) = (format!("iss-{t}-1"), format!("iss-{t}-2"));
    let (d1, d2) = (format!("dst-{t}-1"), format!("dst-{t}-2"));
    let task = format!("task-{t}");
    let mut grants = vec![
        grant(&wa, &i1, &d1, Some(&task)),
        grant(&wa, &i1, &d2, None),
        grant(&wa, &i2, &d1, Some(&task)),
        grant(&wb, &i1, &d1, None),
        grant(&wb, &i2, &d2, Some(&task)),
        grant(&wb, &i2, &d2, None),
    ];
    insert(store, &grants).await;
    grants[2] = store
        .grant_finish(
            &grants[2].id,
            GrantStatus::Released,
            NOW,
            event("grant.released", &t),
        )
        .await
        .unwrap();
    grants[5] = store
        .grant_finish(
            &grants[5].id,
            GrantStatus::Revoked,
            NOW,
            event("grant.revoked", &t),
        )
        .await
        .unwrap();

    let ours = workload(&t, "");
    let filters = [
        GrantFilter {
            workload_id: Some(wa.clone()),
            ..GrantFilter::default()
        },
        GrantFilter {
            workload_prefix: Some(ours.clone()),
            ..GrantFilter::default()
        },
        GrantFilter {
            workload_prefix: Some(workload(&t, "a_b/")),
            ..GrantFilter::default()
        },
        GrantFilter {
            workload_prefix: Some(workload(&t, "a%")),
            ..GrantFilter::default()
        },
        GrantFilter {
            issuer: Some(i1.clone()),
            ..GrantFilter::default()
        },
        GrantFilter {
            destination: Some(d2.clone()),
            ..GrantFilter::default()
        },
        GrantFilter {
            task_id: Some(task.clone()),
            ..GrantFilter::default()
        },
        GrantFilter {
            workload_prefix: Some(ours.clone()),
            status: Some(GrantStatus::Active),
            ..GrantFilter::default()
        },
        GrantFilter {
            workload_prefix: Some(ours.clone()),
            status: Some(GrantStatus::Released),
            ..GrantFilter::default()
        },
        GrantFilter {
            task_id: Some(task.clone()),
            status: Some(GrantStatus::Revoked),
            ..GrantFilter::default()
        },
        GrantFilter {
            workload_id: Some(wa.clone()),
            issuer: Some(i1.clone()),
            destination: Some(d1.clone()),
            task_id: Some(task.clone()),
            status: Some(GrantStatus::Active),
            workload_prefix: Some(ours.clone()),
        },
        GrantFilter {
            issuer: Some(format!("nobody-{t}")),
            ..GrantFilter::default()
        },
    ];
    for filter in &filters {
        let want = newest_first(
            grants
                .iter()
                .filter(|g| filter_matches(filter, g))
                .cloned()
                .collect(),
        );
        for limit in [0, 1, 2] {
            let got = list_all(store, filter, limit).await;
            assert_eq!(got, want, "grant_list({filter:?}) with page size {limit}");
        }
    }
    // Sanity of the model itself: the filters above are not all trivially empty.
    assert_eq!(
        grants
            .iter()
            .filter(|g| filter_matches(&filters[2], g))
            .count(),
        3
    );
    assert_eq!(
        grants
            .iter()
            .filter(|g| filter_matches(&filters[3], g))
            .count(),
        0
    );
}

async fn grant_list_pagination(store: &dyn Store) {
    let t = tag();
    let w = workload(&t, "paged");
    let grants: Vec<_> = (0..25).map(|_| grant(&w, "iss", "dst", None)).collect();
    insert(store, &grants).await;
    let want: Vec<_> = newest_first(grants.clone())
        .into_iter()
        .map(|g| g.id)
        .collect();
    let filter = GrantFilter {
        workload_id: Some(w),
        ..GrantFilter::default()
    };

    for limit in [1, 4, 5, 24, 25, 26] {
        let mut seen = Vec::new();
        let mut cursor = None;
        let mut pages = 0;
        loop {
            let page = store
                .grant_list(&filter, &PageRequest { limit, cursor })
                .await
                .unwrap();
            pages += 1;
            assert!(pages <= 26, "paging with limit {limit} does not end");
            assert!(page.items.len() <= limit as usize);
            if page.next_cursor.is_some() {
                assert_eq!(
                    page.items.len(),
                    limit as usize,
                    "a page with a successor is full"
                );
            }
            seen.extend(page.items.into_iter().map(|g| g.id));
            match page.next_cursor {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        assert_eq!(
            seen, want,
            "pages of {limit}: newest first, no duplicates or gaps"
        );
    }
    // 0 means the default page size (100): everything in one page.
    let page = store
        .grant_list(
            &filter,
            &PageRequest {
                limit: 0,
                cursor: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(page.items.len(), 25);
    assert_eq!(page.next_cursor, None);
}

async fn grant_renew(store: &dyn Store) {
    let t = tag();
    let w = workload(&t, "renew");
    let live = GrantRecord {
        expires_at: NOW + 100,
        ..grant(&w, "iss", "dst", None)
    };
    let lapsed = GrantRecord {
        expires_at: NOW - 10,
        ..grant(&w, "iss", "dst", None)
    };
    let edge = GrantRecord {
        expires_at: NOW,
        ..grant(&w, "iss", "dst", None)
    };
    let released = grant(&w, "iss", "dst", None);
    insert(
        store,
        &[live.clone(), lapsed.clone(), edge.clone(), released.clone()],
    )
    .await;
    store
        .grant_finish(
            &released.id,
            GrantStatus::Released,
            NOW,
            event("grant.released", &t),
        )
        .await
        .unwrap();

    let renewed = store
        .grant_renew(
            &live.id,
            NOW,
            NOW + 500,
            "handle-2",
            event("grant.renewed", &t),
        )
        .await
        .unwrap();
    let want = GrantRecord {
        expires_at: NOW + 500,
        revocation_handle: "handle-2".to_owned(),
        renew_count: 1,
        ..live.clone()
    };
    assert_eq!(renewed, want);
    assert_eq!(store.grant_get(&live.id).await.unwrap(), Some(want));
    let twice = store
        .grant_renew(
            &live.id,
            NOW + 1,
            NOW + 900,
            "handle-3",
            event("grant.renewed", &t),
        )
        .await
        .unwrap();
    assert_eq!((twice.renew_count, twice.expires_at), (2, NOW + 900));

    let tail = chain_tail(store).await;
    assert_conflict(
        store
            .grant_renew(&lapsed.id, NOW, NOW + 500, "h", event("grant.renewed", &t))
            .await,
        "renewing an expired grant",
    );
    assert_conflict(
        store
            .grant_renew(&edge.id, NOW, NOW + 500, "h", event("grant.renewed", &t))
            .await,
        "renewing a grant at its expiry instant",
    );
    assert_conflict(
        store
            .grant_renew(
                &released.id,
                NOW,
                NOW + 500,
                "h",
                event("grant.renewed", &t),
            )
            .await,
        "renewing a released grant",
    );
    assert_not_found(
        store
            .grant_renew(
                &GrantId::generate(),
                NOW,
                NOW + 500,
                "h",
                event("grant.renewed", &t),
            )
            .await,
        "renewing a missing grant",
    );
    assert_eq!(store.grant_get(&lapsed.id).await.unwrap(), Some(lapsed));
    assert_eq!(store.grant_get(&edge.id).await.unwrap(), Some(edge));
    assert_eq!(
        chain_tail(store).await,
        tail,
        "refused renewals append no audit events"
    );
}

async fn grant_finish(store: &dyn Store) {
    let t = tag();
    let w = workload(&t, "finish");
    let a = grant(&w, "iss", "dst", None);
    let b = grant(&w, "iss", "dst", None);
    let c = grant(&w, "iss", "dst", None);
    // Past its expiry but not yet swept: still active, so it can be revoked.
    let lapsed = GrantRecord {
        expires_at: NOW - 5,
        ..grant(&w, "iss", "dst", None)
    };
    insert(store, &[a.clone(), b.clone(), c.clone(), lapsed.clone()]).await;

    let done = store
        .grant_finish(
            &a.id,
            GrantStatus::Released,
            NOW + 1,
            event("grant.released", &t),
        )
        .await
        .unwrap();
    let want = GrantRecord {
        status: GrantStatus::Released,
        finished_at: Some(NOW + 1),
        ..a.clone()
    };
    assert_eq!(done, want);
    assert_eq!(store.grant_get(&a.id).await.unwrap(), Some(want.clone()));

    let tail = chain_tail(store).await;
    assert_conflict(
        store
            .grant_finish(
                &a.id,
                GrantStatus::Revoked,
                NOW + 2,
                event("grant.revoked", &t),
            )
            .await,
        "finishing a finished grant",
    );
    assert_eq!(store.grant_get(&a.id).await.unwrap(), Some(want));
    assert_not_found(
        store
            .grant_finish(
                &GrantId::generate(),
                GrantStatus::Revoked,
                NOW,
                event("grant.revoked", &t),
            )
            .await,
        "finishing a missing grant",
    );
    let refused = store
        .grant_finish(&c.id, GrantStatus::Active, NOW, event("grant.active", &t))
        .await;
    assert!(
        refused.is_err(),
        "finishing as active must fail, got {refused:?}"
    );
    assert_eq!(store.grant_get(&c.id).await.unwrap(), Some(c));
    assert_eq!(
        chain_tail(store).await,
        tail,
        "refused finishes append no audit events"
    );

    let revoked = store
        .grant_finish(
            &b.id,
            GrantStatus::Revoked,
            NOW + 3,
            event("grant.revoked", &t),
        )
        .await
        .unwrap();
    assert_eq!(
        (revoked.status, revoked.finished_at),
        (GrantStatus::Revoked, Some(NOW + 3))
    );
    let revoked = store
        .grant_finish(
            &lapsed.id,
            GrantStatus::Revoked,
            NOW,
            event("grant.revoked", &t),
        )
        .await
        .unwrap();
    assert_eq!(revoked.status, GrantStatus::Revoked);
}

async fn grant_expire_due_in_batches(store: &dyn Store) {
    let t = tag();
    let w = workload(&t, "sweep");
    let due: Vec<_> = (0..5)
        .map(|i| GrantRecord {
            issued_at: SWEEP_AT - 100,
            expires_at: SWEEP_AT + i,
            ..grant(&w, "iss", "dst", None)
        })
        .collect();
    let later = GrantRecord {
        expires_at: SWEEP_AT + 1000,
        ..grant(&w, "iss", "dst", None)
    };
    let released = GrantRecord {
        expires_at: SWEEP_AT,
        ..grant(&w, "iss", "dst", None)
    };
    // A destination whose expired grants are left to its own clean-up.
    let kept_dest = format!("kept-{t}");
    let kept = GrantRecord {
        expires_at: SWEEP_AT,
        ..grant(&w, "iss", &kept_dest, None)
    };
    let mut all = due.clone();
    all.extend([later.clone(), released.clone(), kept.clone()]);
    insert(store, &all).await;
    let released = store
        .grant_finish(
            &released.id,
            GrantStatus::Released,
            SWEEP_AT - 1,
            event("grant.released", &t),
        )
        .await
        .unwrap();

    let now = SWEEP_AT + 100;
    let keep = [kept_dest.clone()];
    assert_eq!(
        store.grant_expire_due(now, 2, &keep).await.unwrap(),
        2,
        "a sweep marks up to its limit"
    );
    let mut total = 2;
    for round in 0.. {
        assert!(
            round < 1000,
            "the sweep never finishes: it keeps finding the same rows"
        );
        let n = store.grant_expire_due(now, 2, &keep).await.unwrap();
        assert!(n <= 2);
        total += n;
        if n < 2 {
            break;
        }
    }
    assert!(total >= 5, "the sweep found only {total} of 5 due grants");
    assert_eq!(
        store.grant_expire_due(now, 100, &keep).await.unwrap(),
        0,
        "nothing left to sweep"
    );
    assert_eq!(
        status_of(store, &kept.id).await,
        GrantStatus::Active,
        "kept"
    );

    for g in &due {
        let got = store.grant_get(&g.id).await.unwrap().unwrap();
        assert_eq!(got.status, GrantStatus::Expired);
        assert!(
            got.finished_at.is_some_and(|at| at <= now),
            "expired grant has finished_at {:?}",
            got.finished_at
        );
        assert_eq!(
            GrantRecord {
                status: g.status,
                finished_at: None,
                ..got
            },
            *g
        );
    }
    assert_eq!(store.grant_get(&later.id).await.unwrap(), Some(later));
    assert_eq!(store.grant_get(&released.id).await.unwrap(), Some(released));
}

async fn grant_count_active(store: &dyn Store) {
    let t = tag();
    let w = workload(&t, "count");
    let before = store.grant_count_active(None, NOW).await.unwrap();
    let live: Vec<_> = (0..3)
        .map(|_| GrantRecord {
            expires_at: NOW + 100,
            ..grant(&w, "iss", "dst", None)
        })
        .collect();
    let edge = GrantRecord {
        expires_at: NOW,
        ..grant(&w, "iss", "dst", None)
    };
    let lapsed = GrantRecord {
        expires_at: NOW - 1,
        ..grant(&w, "iss", "dst", None)
    };
    let released = grant(&w, "iss", "dst", None);
    let other = grant(&workload(&t, "other"), "iss", "dst", None);
    let mut all = live.clone();
    all.extend([edge, lapsed, released.clone(), other]);
    insert(store, &all).await;
    store
        .grant_finish(
            &released.id,
            GrantStatus::Released,
            NOW,
            event("grant.released", &t),
        )
        .await
        .unwrap();

    assert_eq!(store.grant_count_active(Some(&w), NOW).await.unwrap(), 3);
    assert_eq!(
        store.grant_count_active(None, NOW).await.unwrap(),
        before + 4
    );
    assert_eq!(
        store.grant_count_active(Some(&w), NOW - 1).await.unwrap(),
        4
    );
    assert_eq!(
        store.grant_count_active(Some(&w), NOW + 100).await.unwrap(),
        0
    );
    let nobody = workload(&t, "nobody");
    assert_eq!(
        store.grant_count_active(Some(&nobody), NOW).await.unwrap(),
        0
    );
}

async fn jti_replay(store: &dyn Store) {
    let t = tag();
    let (iss, other) = (format!("iss-{t}"), format!("iss-{t}-other"));
    assert!(
        store.jti_record(&iss, "a", 100, 50).await.unwrap(),
        "first use"
    );
    assert!(
        !store.jti_record(&iss, "a", 100, 60).await.unwrap(),
        "replay"
    );
    assert!(
        store.jti_record(&iss, "b", 100, 60).await.unwrap(),
        "another token"
    );
    assert!(
        store.jti_record(&other, "a", 100, 60).await.unwrap(),
        "same jti, other issuer"
    );
    assert!(
        store.jti_record(&iss, "a", 200, 100).await.unwrap(),
        "reuse once expired"
    );
    assert!(
        !store.jti_record(&iss, "a", 300, 150).await.unwrap(),
        "replay of the reuse"
    );
    // The refused replay did not extend the record.
    assert!(
        store.jti_record(&iss, "a", 300, 200).await.unwrap(),
        "reuse at the new expiry"
    );
}

async fn jti_purge(store: &dyn Store) {
    let iss = format!("iss-{}", tag());
    for jti in ["old-1", "old-2", "old-3"] {
        assert!(store.jti_record(&iss, jti, 10, 5).await.unwrap());
    }
    assert!(store.jti_record(&iss, "keep", NOW, 5).await.unwrap());

    assert_eq!(
        store.jti_purge(20, 2).await.unwrap(),
        2,
        "a purge deletes up to its limit"
    );
    let mut total = 2;
    for round in 0.. {
        assert!(
            round < 1000,
            "the purge never finishes: it keeps finding the same rows"
        );
        let n = store.jti_purge(20, 2).await.unwrap();
        assert!(n <= 2);
        total += n;
        if n < 2 {
            break;
        }
    }
    assert!(total >= 3, "the purge found only {total} of 3 expired IDs");
    assert_eq!(store.jti_purge(20, 100).await.unwrap(), 0);
    assert!(
        !store.jti_record(&iss, "keep", NOW, 20).await.unwrap(),
        "unexpired IDs survive a purge"
    );
}

async fn audit_events_of_every_change(store: &dyn Store) {
    let t = tag();
    let (tail_seq, tail_hash) = chain_tail(store).await;
    let ev = |kind: &str, n: u32| event(kind, &format!("{t}-{n}"));
    let mut sent = Vec::new();

    let name = format!("chain-{t}");
    sent.push(ev("issuer.put", 1));
    store
        .config_put(
            config(ConfigKind::Issuer, &name, json!({}), NOW),
            None,
            sent[0].clone(),
        )
        .await
        .unwrap();
    let g = grant(&workload(&t, "chain"), "iss", "dst", None);
    let g2 = grant(&workload(&t, "chain"), "iss", "dst", None);
    sent.extend([ev("exchange.granted", 2), ev("exchange.granted", 3)]);
    let batch = store
        .grant_insert_batch(&[g.clone(), g2.clone()], &sent[1..3])
        .await
        .unwrap();
    assert_eq!(batch, [tail_seq + 2, tail_seq + 3]);
    sent.push(ev("grant.renewed", 4));
    store
        .grant_renew(&g.id, NOW, NOW + 7200, "h2", sent[3].clone())
        .await
        .unwrap();
    sent.push(ev("grant.released", 5));
    store
        .grant_finish(&g.id, GrantStatus::Released, NOW, sent[4].clone())
        .await
        .unwrap();
    sent.push(ev("issuer.delete", 6));
    store
        .config_delete(ConfigKind::Issuer, &name, sent[5].clone())
        .await
        .unwrap();
    sent.extend([ev("exchange.denied", 7), ev("exchange.denied", 8)]);
    let appended = store.audit_append(&sent[6..8]).await.unwrap();
    assert_eq!(appended, [tail_seq + 7, tail_seq + 8]);
    assert!(store.audit_append(&[]).await.unwrap().is_empty());

    let new = read_chain(store, tail_seq).await;
    assert_eq!(
        new.len(),
        sent.len(),
        "one audit event per event sent, no more"
    );
    assert_linked(&new, tail_seq, &tail_hash);
    for (record, event) in new.iter().zip(&sent) {
        assert_same_event(record, event);
    }
}

async fn audit_list_paging(store: &dyn Store) {
    let t = tag();
    let events: Vec<_> = (0..10)
        .map(|i| event("exchange.denied", &format!("{t}-{i}")))
        .collect();
    store.audit_append(&events).await.unwrap();
    let all = read_chain(store, 0).await;
    assert!(all.len() >= 10);
    for limit in [1, 3, 7] {
        let mut got = Vec::new();
        let mut after = 0;
        loop {
            let page = store.audit_list(after, limit).await.unwrap();
            assert!(page.len() <= limit as usize);
            let Some(last) = page.last() else { break };
            after = last.seq;
            got.extend(page);
        }
        assert_eq!(got, all, "audit pages of {limit}");
    }
    let mid = all[all.len() / 2].seq;
    let two = store.audit_list(mid, 2).await.unwrap();
    let seqs: Vec<_> = two.iter().map(|r| r.seq).collect();
    assert_eq!(
        seqs,
        [mid + 1, mid + 2],
        "audit_list starts right after `after`"
    );
    assert!(
        store
            .audit_list(all.len() as i64, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store.audit_list(0, 0).await.unwrap().is_empty(),
        "at most 0 events"
    );
}

async fn audit_chain_is_valid(store: &dyn Store) {
    let all = read_chain(store, 0).await;
    assert!(!all.is_empty());
    assert_eq!(all[0].seq, 1, "the chain starts at 1");
    assert_linked(&all, 0, GENESIS_HASH);
    let last = all.last().unwrap();
    assert_eq!(
        store.audit_head().await.unwrap(),
        (last.seq, last.hash.clone()),
        "the head record matches the last event"
    );
}

// === concurrency ===

async fn concurrent_writers(store: Arc<dyn Store>) {
    const TASKS: usize = 20;
    const ROUNDS: usize = 5;
    const RACERS: usize = 10;
    let t = tag();
    let (tail_seq, tail_hash) = chain_tail(&*store).await;

    // Targets for the races.
    let contested = grant(&workload(&t, "contested"), "iss", "dst", None);
    let to_finish = grant(&workload(&t, "contested"), "iss", "dst", None);
    let setup_events = [event("exchange.granted", &format!("{t}-setup"))];
    store
        .grant_insert_batch(&[contested.clone(), to_finish.clone()], &setup_events)
        .await
        .unwrap();
    let mut sent: Vec<NewAuditEvent> = setup_events.to_vec();

    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        let store = Arc::clone(&store);
        let t = t.clone();
        tasks.spawn(async move {
            let mut sent = Vec::new();
            let mut grants = Vec::new();
            for round in 0..ROUNDS {
                let marker = format!("{t}-w{task}-r{round}");
                let batch: Vec<_> = (0..3)
                    .map(|_| grant(&workload(&t, &format!("w{task}")), "iss", "dst", None))
                    .collect();
                let events: Vec<_> = (0..3)
                    .map(|i| event("exchange.granted", &format!("{marker}-{i}")))
                    .collect();
                let seqs = store.grant_insert_batch(&batch, &events).await.unwrap();
                assert_eq!(seqs.len(), 3);
                assert!(
                    seqs.windows(2).all(|w| w[1] == w[0] + 1),
                    "one batch's events are consecutive"
                );
                sent.extend(events);
                grants.extend(batch);

                let name = format!("c-{marker}");
                let put = event("destination.put", &name);
                store
                    .config_put(
                        config(ConfigKind::Destination, &name, json!({ "task": task }), NOW),
                        Some(0),
                        put.clone(),
                    )
                    .await
                    .unwrap();
                sent.push(put);
                assert!(
                    store
                        .jti_record(&format!("iss-{t}"), &marker, NOW, NOW - 1)
                        .await
                        .unwrap()
                );
                // Readers run alongside the writers.
                store.audit_list(0, 50).await.unwrap();
                store
                    .grant_list(
                        &GrantFilter {
                            workload_prefix: Some(workload(&t, "")),
                            ..GrantFilter::default()
                        },
                        &PageRequest::default(),
                    )
                    .await
                    .unwrap();
            }
            (sent, grants)
        });
    }

    // Races: exactly one "must not exist" put wins, every renewal counts, one finish
    // wins, one first use of a token ID.
    let race_name = format!("race-{t}");
    let mut racers = tokio::task::JoinSet::new();
    for i in 0..RACERS {
        let store = Arc::clone(&store);
        let (race_name, t, contested, to_finish) = (
            race_name.clone(),
            t.clone(),
            contested.id.clone(),
            to_finish.id.clone(),
        );
        racers.spawn(async move {
            let put = event("policy.put", &format!("{race_name}-{i}"));
            let put_ok = store
                .config_put(
                    config(ConfigKind::Policy, &race_name, json!({ "by": i }), NOW),
                    Some(0),
                    put.clone(),
                )
                .await;
            let renew = event("grant.renewed", &format!("{t}-renew-{i}"));
            store
                .grant_renew(
                    &contested,
                    NOW,
                    NOW + 3600,
                    &format!("h-{i}"),
                    renew.clone(),
                )
                .await
                .unwrap();
            let finish = event("grant.revoked", &format!("{t}-finish-{i}"));
            let finish_ok = store
                .grant_finish(&to_finish, GrantStatus::Revoked, NOW, finish.clone())
                .await;
            let fresh = store
                .jti_record(&format!("iss-{t}"), "contested", NOW, NOW - 1)
                .await
                .unwrap();
            let mut sent = vec![renew];
            match put_ok {
                Ok(_) => sent.push(put),
                Err(e) => assert!(matches!(e, StoreError::Conflict(_)), "losing put: {e:?}"),
            }
            let finished = match finish_ok {
                Ok(_) => {
                    sent.push(finish);
                    true
                }
                Err(e) => {
                    assert!(matches!(e, StoreError::Conflict(_)), "losing finish: {e:?}");
                    false
                }
            };
            (sent, finished, fresh)
        });
    }

    let mut grants = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (events, batch) = done.unwrap();
        sent.extend(events);
        grants.extend(batch);
    }
    let (mut finishes, mut fresh_uses) = (0, 0);
    while let Some(done) = racers.join_next().await {
        let (events, finished, fresh) = done.unwrap();
        sent.extend(events);
        finishes += usize::from(finished);
        fresh_uses += usize::from(fresh);
    }

    assert_eq!(finishes, 1, "exactly one concurrent finish wins");
    assert_eq!(
        fresh_uses, 1,
        "exactly one concurrent first use of a token ID"
    );
    let puts = sent.iter().filter(|e| e.kind == "policy.put").count();
    assert_eq!(puts, 1, "exactly one concurrent must-not-exist put wins");
    let renewed = store.grant_get(&contested.id).await.unwrap().unwrap();
    assert_eq!(renewed.renew_count, RACERS as i64, "no renewal was lost");
    assert_eq!(grants.len(), TASKS * ROUNDS * 3);
    for g in &grants {
        assert_eq!(store.grant_get(&g.id).await.unwrap().as_ref(), Some(g));
    }

    // The chain: linear, gap-free, valid, and holding exactly the events sent.
    let new = read_chain(&*store, tail_seq).await;
    assert_linked(&new, tail_seq, &tail_hash);
    assert_eq!(new.len(), sent.len(), "one audit event per event sent");
    let mut by_payload: BTreeMap<String, usize> = BTreeMap::new();
    for e in &sent {
        *by_payload.entry(e.payload()).or_default() += 1;
    }
    let mut seen = HashSet::new();
    for r in &new {
        assert!(
            seen.insert(r.payload.clone()),
            "audit event {} stored twice",
            r.seq
        );
        assert_eq!(
            by_payload.get(&r.payload),
            Some(&1),
            "audit event {} was never sent",
            r.seq
        );
    }
    audit_chain_is_valid(&*store).await;
}

// === revocation ===

/// Claim jobs as `owner` at `at` (lease `lease_ms`) until `id` comes up: other suites'
/// jobs may be due too. `None` when it is not claimable.
async fn claim_job(
    store: &dyn Store,
    owner: &str,
    id: &str,
    at: i64,
    lease_ms: i64,
) -> Option<crate::RevocationJob> {
    for _ in 0..100 {
        match store
            .revocation_claim(owner, at, at + lease_ms)
            .await
            .unwrap()
        {
            Some(c) if c.id == id => return Some(c),
            Some(_) => continue,
            None => return None,
        }
    }
    None
}

fn job(selector: RevokeSelector) -> NewRevocationJob {
    NewRevocationJob {
        id: format!("rvk_{}", tag()),
        selector,
        reason: "conformance".to_owned(),
        requested_by: "uid:0".to_owned(),
        now: NOW,
        now_ms: NOW * 1000,
        expired_only: false,
        sweep_at_ms: None,
    }
}

fn receipt(
    job_id: &str,
    seq: i64,
    destination: &str,
    outcome: StepState,
    grant_ids: Vec<String>,
    retry_at_ms: Option<i64>,
) -> RevocationReceiptRecord {
    RevocationReceiptRecord {
        job_id: job_id.to_owned(),
        seq,
        destination: destination.to_owned(),
        outcome,
        grant_ids,
        expires_at: (outcome == StepState::ExpiresAt).then_some(NOW + 3600),
        detail: format!("{} at {destination}", outcome.as_str()),
        created_at_ms: NOW * 1000 + seq,
        signature: format!("sig-{seq}"),
        retry_at_ms,
    }
}

async fn status_of(store: &dyn Store, id: &GrantId) -> GrantStatus {
    store.grant_get(id).await.unwrap().unwrap().status
}

/// A job snapshots exactly the active, unexpired grants its selector matches, revokes
/// them, writes its deny entry and audit event in the same transaction, and walks its
/// steps through receipts to `done`.
async fn revocation_job_lifecycle(store: &dyn Store) {
    let t = tag();
    let (a, b) = (workload(&t, "a"), workload(&t, "b"));
    let (d1, d2) = (format!("d1-{t}"), format!("d2-{t}"));
    let a1 = grant(&a, "iss", &d1, None);
    let a2 = grant(&a, "iss", &d1, Some("task-1"));
    let a3 = grant(&a, "iss", &d2, None);
    let b1 = grant(&b, "iss", &d1, None);
    let mut expired = grant(&a, "iss", &d1, None);
    expired.expires_at = NOW - 1;
    let released = grant(&a, "iss", &d2, None);
    insert(
        store,
        &[
            a1.clone(),
            a2.clone(),
            a3.clone(),
            b1.clone(),
            expired.clone(),
            released.clone(),
        ],
    )
    .await;
    store
        .grant_finish(
            &released.id,
            GrantStatus::Released,
            NOW,
            event("grant.released", &t),
        )
        .await
        .unwrap();
    let generation = store.config_generation().await.unwrap();
    let (head, _) = chain_tail(store).await;

    let new = job(RevokeSelector::Workload(a.clone()));
    let deny = config(
        ConfigKind::DenyEntry,
        &format!("workload:{a}"),
        json!({"kind": "workload", "value": a}),
        NOW,
    );
    let created = store
        .revocation_create(&new, Some(deny), event("revocation.requested", &t))
        .await
        .unwrap();
    assert_eq!(created.id, new.id);
    assert_eq!(
        created.matched, 3,
        "active unexpired grants of the workload"
    );
    assert_eq!(created.state, JobState::Running);
    assert_eq!(created.selector, RevokeSelector::Workload(a.clone()));
    assert_eq!(created.receipts, 0);
    for g in [&a1, &a2, &a3] {
        assert_eq!(status_of(store, &g.id).await, GrantStatus::Revoked);
    }
    assert_eq!(status_of(store, &b1.id).await, GrantStatus::Active);
    assert_eq!(status_of(store, &expired.id).await, GrantStatus::Active);
    assert_eq!(status_of(store, &released.id).await, GrantStatus::Released);
    assert!(store.config_generation().await.unwrap() > generation);
    assert!(
        store
            .config_get(ConfigKind::DenyEntry, &format!("workload:{a}"))
            .await
            .unwrap()
            .is_some()
    );
    let events = read_chain(store, head).await;
    assert_eq!(events.len(), 1);
    let payload: serde_json::Value = serde_json::from_str(&events[0].payload).unwrap();
    assert_eq!(payload["detail"]["matched"], json!(3));
    assert_conflict(
        store
            .revocation_create(&new, None, event("revocation.requested", &t))
            .await,
        "a job ID used twice",
    );

    let progress = store.revocation_progress(&new.id).await.unwrap();
    assert_eq!(progress.len(), 2);
    assert_eq!(
        (progress[0].destination.as_str(), progress[0].pending),
        (d1.as_str(), 2)
    );
    assert_eq!(
        (progress[1].destination.as_str(), progress[1].pending),
        (d2.as_str(), 1)
    );
    assert_eq!(
        store.revocation_destinations(&new.id).await.unwrap(),
        vec![d1.clone(), d2.clone()]
    );
    assert!(
        store
            .revocation_destinations("rvk_none")
            .await
            .unwrap()
            .is_empty()
    );
    let depth = store.revocation_queue_depth().await.unwrap();
    assert!(depth >= 3);

    let owner = format!("w1-{t}");
    let claimed = claim_job(store, &owner, &new.id, NOW * 1000, 30_000).await;
    assert_eq!(claimed.map(|j| j.id), Some(new.id.clone()));

    let steps = store
        .revocation_steps_due(&new.id, &d1, NOW * 1000, "", 10)
        .await
        .unwrap();
    let mut want = vec![a1.id.to_string(), a2.id.to_string()];
    want.sort();
    assert_eq!(
        steps.iter().map(|s| s.grant_id.clone()).collect::<Vec<_>>(),
        want
    );
    let first = steps.iter().find(|s| s.grant_id == a1.id.as_str()).unwrap();
    assert_eq!(first.revocation_handle, a1.revocation_handle);
    assert_eq!(first.workload_id, a);
    assert_eq!(first.expires_at, a1.expires_at);
    assert_eq!(first.state, StepState::Pending);
    let paged = store
        .revocation_steps_due(&new.id, &d1, NOW * 1000, &want[0], 10)
        .await
        .unwrap();
    assert_eq!(paged.len(), 1, "steps after a cursor");

    let retry_at = NOW * 1000 + 5_000;
    let r1 = receipt(
        &new.id,
        1,
        &d1,
        StepState::Revoked,
        want[..1].to_vec(),
        None,
    );
    // A deny rule written at the destination (AWS): final, counted apart.
    let r1b = receipt(
        &new.id,
        2,
        &d1,
        StepState::Blocked,
        want[1..].to_vec(),
        None,
    );
    let r2 = receipt(
        &new.id,
        3,
        &d2,
        StepState::Failed,
        vec![a3.id.to_string()],
        Some(retry_at),
    );
    assert_conflict(
        store
            .revocation_record(
                "someone-else",
                &new.id,
                NOW * 1000 + 30_000,
                std::slice::from_ref(&r1),
                &[],
            )
            .await,
        "recording without the lease",
    );
    let seqs = store
        .revocation_record(
            &owner,
            &new.id,
            NOW * 1000 + 30_000,
            &[r1.clone(), r1b.clone(), r2.clone()],
            &[
                event("revocation.receipt", &t),
                event("revocation.receipt", &t),
                event("revocation.receipt", &t),
            ],
        )
        .await
        .unwrap();
    assert_eq!(seqs.len(), 3);
    let progress = store.revocation_progress(&new.id).await.unwrap();
    assert_eq!(
        (
            progress[0].revoked,
            progress[0].blocked,
            progress[0].pending
        ),
        (1, 1, 0)
    );
    assert_eq!(progress[0].total(), 2);
    assert_eq!((progress[1].failed, progress[1].pending), (1, 0));
    assert!(
        store
            .revocation_steps_due(&new.id, &d2, NOW * 1000, "", 10)
            .await
            .unwrap()
            .is_empty(),
        "a failed step is not due before its retry time"
    );
    let again = store
        .revocation_steps_due(&new.id, &d2, retry_at, "", 10)
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    // Deferring a failed step moves its retry time only.
    let a3_id = vec![a3.id.to_string()];
    store
        .revocation_defer(&owner, &new.id, &d2, &a3_id, retry_at + 99_000)
        .await
        .unwrap();
    assert!(
        store
            .revocation_steps_due(&new.id, &d2, retry_at, "", 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_conflict(
        store
            .revocation_defer("someone-else", &new.id, &d2, &a3_id, retry_at)
            .await,
        "deferring without the lease",
    );
    store
        .revocation_defer(&owner, &new.id, &d2, &a3_id, retry_at)
        .await
        .unwrap();
    assert_eq!(again[0].attempts, 1);
    assert_eq!(again[0].state, StepState::Failed);
    assert_eq!(again[0].detail, r2.detail);

    let released_job = store
        .revocation_release(
            &owner,
            &new.id,
            NOW * 1000,
            event("revocation.completed", &t),
        )
        .await
        .unwrap();
    assert_eq!(released_job.state, JobState::Running);
    assert_eq!(released_job.next_run_at_ms, retry_at);
    assert_eq!(released_job.receipts, 3);
    assert_conflict(
        store
            .revocation_record(&owner, &new.id, NOW * 1000 + 30_000, &[], &[])
            .await,
        "recording after releasing the lease",
    );

    let owner2 = format!("w2-{t}");
    let claimed = claim_job(store, &owner2, &new.id, retry_at, 30_000).await;
    assert!(claimed.is_some(), "the job is due again at its retry time");
    let r3 = receipt(
        &new.id,
        4,
        &d2,
        StepState::ExpiresAt,
        vec![a3.id.to_string()],
        None,
    );
    store
        .revocation_record(
            &owner2,
            &new.id,
            retry_at + 30_000,
            std::slice::from_ref(&r3),
            &[],
        )
        .await
        .unwrap();
    let (head, _) = chain_tail(store).await;
    let done = store
        .revocation_release(
            &owner2,
            &new.id,
            retry_at + 1,
            event("revocation.completed", &t),
        )
        .await
        .unwrap();
    assert_eq!(done.state, JobState::Done);
    assert_eq!(done.finished_at_ms, Some(retry_at + 1));
    assert_eq!(
        read_chain(store, head).await.len(),
        1,
        "the completion event"
    );
    let progress = store.revocation_progress(&new.id).await.unwrap();
    assert_eq!(progress[1].expires_at, 1);
    assert_eq!(progress[1].latest_expiry, Some(a3.expires_at));

    let receipts = store.revocation_receipts(&new.id, 0, 10).await.unwrap();
    assert_eq!(receipts, vec![r1, r1b, r2, r3.clone()]);
    assert_eq!(
        store.revocation_receipts(&new.id, 3, 10).await.unwrap(),
        vec![r3]
    );
    assert_eq!(
        store.revocation_get(&new.id).await.unwrap().unwrap().state,
        JobState::Done
    );
    assert!(store.revocation_get("rvk_missing").await.unwrap().is_none());

    // Listing: newest first, paged.
    let second = job(RevokeSelector::Workload(format!("{a}-none")));
    let created2 = store
        .revocation_create(&second, None, event("revocation.requested", &t))
        .await
        .unwrap();
    assert_eq!(created2.matched, 0);
    assert_eq!(
        created2.state,
        JobState::Done,
        "nothing to do is done at once"
    );
    let page = store
        .revocation_list(&PageRequest {
            limit: 1,
            cursor: None,
        })
        .await
        .unwrap();
    assert_eq!(page.items[0].id, second.id);
    let page = store
        .revocation_list(&PageRequest {
            limit: 1,
            cursor: page.next_cursor,
        })
        .await
        .unwrap();
    assert_eq!(page.items[0].id, new.id);
}

/// Every selector kind matches what it names and nothing else.
async fn revocation_selectors(store: &dyn Store) {
    let t = tag();
    let x = workload(&t, "ns/a/x");
    let y = workload(&t, "ns/a/y");
    let z = workload(&t, "ns/b/z");
    let (dest, issuer, task) = (format!("dest-{t}"), format!("iss-{t}"), format!("task-{t}"));
    let gx = grant(&x, "other", "other", Some(&task));
    let gy = grant(&y, &issuer, "other", None);
    let gz = grant(&z, "other", &dest, None);
    let gz2 = grant(&z, "other", "other", None);
    insert(store, &[gx.clone(), gy.clone(), gz.clone(), gz2.clone()]).await;
    let cases = [
        (
            RevokeSelector::WorkloadPrefix(workload(&t, "ns/a/")),
            vec![&gx, &gy],
        ),
        (RevokeSelector::Task(task.clone()), vec![]),
        (RevokeSelector::Issuer(issuer.clone()), vec![]),
        (RevokeSelector::Destination(dest.clone()), vec![&gz]),
        (RevokeSelector::Grant(gz2.id.to_string()), vec![&gz2]),
    ];
    for (selector, want) in cases {
        let j = job(selector.clone());
        let created = store
            .revocation_create(&j, None, event("revocation.requested", &t))
            .await
            .unwrap();
        assert_eq!(created.matched, want.len() as u64, "{selector}");
        for g in want {
            assert_eq!(
                status_of(store, &g.id).await,
                GrantStatus::Revoked,
                "{selector}"
            );
        }
    }
    // The prefix must not match by LIKE rules or by case.
    let odd = workload(&t, "ns/c_d/w");
    let g_odd = grant(&odd, "other", "other", None);
    insert(store, std::slice::from_ref(&g_odd)).await;
    for prefix in [
        workload(&t, "ns/c%"),
        workload(&t, "NS/c_d/"),
        workload(&t, "ns/cxd/"),
    ] {
        let created = store
            .revocation_create(
                &job(RevokeSelector::WorkloadPrefix(prefix.clone())),
                None,
                event("revocation.requested", &t),
            )
            .await
            .unwrap();
        assert_eq!(created.matched, 0, "prefix {prefix:?}");
    }
    assert_eq!(status_of(store, &g_odd.id).await, GrantStatus::Active);
}

/// A lease keeps a job from a second worker until it lapses; a lapsed lease can be taken
/// over, and the first worker's writes are then refused.
async fn revocation_leases(store: &dyn Store) {
    let t = tag();
    let w = workload(&t, "lease");
    insert(store, &[grant(&w, "iss", "d", None)]).await;
    let j = job(RevokeSelector::Workload(w));
    store
        .revocation_create(&j, None, event("revocation.requested", &t))
        .await
        .unwrap();
    // Drain other due jobs so ours is the one claimed; leave them leased briefly.
    let (first, second) = (format!("first-{t}"), format!("second-{t}"));
    let now = NOW * 1000 + 10_000_000;
    let ours = claim_job(store, &first, &j.id, now, 1_000).await.is_some();
    assert!(ours);
    let stolen = claim_job(store, &second, &j.id, now + 500, 1_000)
        .await
        .is_some();
    assert!(!stolen, "a held lease is not taken");
    let taken = claim_job(store, &second, &j.id, now + 1_000, 1_000)
        .await
        .is_some();
    assert!(taken, "a lapsed lease is taken over");
    assert_conflict(
        store
            .revocation_record(&first, &j.id, now + 5_000, &[], &[])
            .await,
        "the first worker after losing the lease",
    );
    store
        .revocation_record(&second, &j.id, now + 5_000, &[], &[])
        .await
        .unwrap();
}

/// The claims a workload last presented: inserted, then updated keeping `first_seen`.
async fn workloads_seen(store: &dyn Store) {
    let t = tag();
    let id = workload(&t, "seen");
    assert!(store.workload_get(&id).await.unwrap().is_none());
    let first = WorkloadSeen {
        workload_id: id.clone(),
        issuer: "iss-a".into(),
        trust_rule: "rule-a".into(),
        claims: json!({"sub": "x", "repository": "org/one", "nested": {"k": [1, 2]}}),
        first_seen: NOW - 100,
        last_seen: NOW - 100,
    };
    store
        .workload_seen(std::slice::from_ref(&first))
        .await
        .unwrap();
    assert_eq!(store.workload_get(&id).await.unwrap(), Some(first.clone()));
    let later = WorkloadSeen {
        issuer: "iss-b".into(),
        trust_rule: "rule-b".into(),
        claims: json!({"sub": "x", "repository": "org/two"}),
        first_seen: NOW,
        last_seen: NOW,
        ..first.clone()
    };
    store
        .workload_seen(std::slice::from_ref(&later))
        .await
        .unwrap();
    assert_eq!(
        store.workload_get(&id).await.unwrap(),
        Some(WorkloadSeen {
            first_seen: first.first_seen,
            ..later
        })
    );
    store.workload_seen(&[]).await.unwrap();
}

/// An `expired_only` job takes the active grants that have expired (for clean-up at the
/// destination) and marks them expired; with none, it writes nothing.
async fn revocation_of_expired_grants(store: &dyn Store) {
    let t = tag();
    let dest = format!("db-{t}");
    let w = workload(&t, "expiring");
    let mut gone = grant(&w, "iss", &dest, None);
    gone.expires_at = NOW - 5;
    let live = grant(&w, "iss", &dest, None);
    insert(store, &[gone.clone(), live.clone()]).await;
    let mut j = job(RevokeSelector::Destination(dest.clone()));
    j.expired_only = true;
    let created = store
        .revocation_create(&j, None, event("revocation.requested", &t))
        .await
        .unwrap();
    assert_eq!(created.matched, 1);
    let g = store.grant_get(&gone.id).await.unwrap().unwrap();
    assert_eq!(
        (g.status, g.finished_at),
        (GrantStatus::Expired, Some(gone.expires_at))
    );
    assert_eq!(status_of(store, &live.id).await, GrantStatus::Active);
    let steps = store
        .revocation_steps_due(&j.id, &dest, NOW * 1000, "", 10)
        .await
        .unwrap();
    assert_eq!(steps.len(), 1);
    assert_eq!(steps[0].grant_id, gone.id.as_str());
    // Nothing left: nothing written.
    let (head, _) = chain_tail(store).await;
    let mut again = job(RevokeSelector::Destination(dest));
    again.expired_only = true;
    assert_not_found(
        store
            .revocation_create(&again, None, event("revocation.requested", &t))
            .await,
        "no expired grants",
    );
    assert!(store.revocation_get(&again.id).await.unwrap().is_none());
    assert_eq!(chain_tail(store).await.0, head);
}

/// A job with a sweep stays running until the sweep has run; the sweep adds the grants
/// that match the selector by then and marks them revoked.
async fn revocation_sweep(store: &dyn Store) {
    let t = tag();
    let w = workload(&t, "swept");
    let dest = format!("sw-{t}");
    let first = grant(&w, "iss", &dest, None);
    insert(store, std::slice::from_ref(&first)).await;
    let sweep_at = NOW * 1000 + 20_000_000;
    let mut j = job(RevokeSelector::Workload(w.clone()));
    j.sweep_at_ms = Some(sweep_at);
    let created = store
        .revocation_create(&j, None, event("revocation.requested", &t))
        .await
        .unwrap();
    assert_eq!(created.sweep_at_ms, Some(sweep_at));
    let owner = format!("sweeper-{t}");
    let claim = |at: i64| claim_job(store, &owner, &j.id, at, 30_000);
    let now = NOW * 1000 + 19_000_000;
    assert!(claim(now).await.is_some());
    let r1 = receipt(
        &j.id,
        1,
        &dest,
        StepState::Revoked,
        vec![first.id.to_string()],
        None,
    );
    store
        .revocation_record(&owner, &j.id, now + 30_000, &[r1], &[])
        .await
        .unwrap();
    let after = store
        .revocation_release(&owner, &j.id, now, event("revocation.completed", &t))
        .await
        .unwrap();
    assert_eq!(after.state, JobState::Running, "the sweep is still to come");
    assert_eq!(after.next_run_at_ms, sweep_at);
    // A grant issued meanwhile (by a replica that had not seen the deny entry).
    let late = grant(&w, "iss", &dest, None);
    insert(store, std::slice::from_ref(&late)).await;
    assert!(claim(sweep_at).await.is_some());
    assert_eq!(store.revocation_sweep(&owner, &j.id, NOW).await.unwrap(), 1);
    assert_eq!(status_of(store, &late.id).await, GrantStatus::Revoked);
    let got = store.revocation_get(&j.id).await.unwrap().unwrap();
    assert_eq!((got.matched, got.sweep_at_ms), (2, None));
    let due = store
        .revocation_steps_due(&j.id, &dest, sweep_at, "", 10)
        .await
        .unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].grant_id, late.id.as_str());
    assert_conflict(
        store.revocation_sweep("not-the-owner", &j.id, NOW).await,
        "a sweep without the lease",
    );
    let r2 = receipt(
        &j.id,
        2,
        &dest,
        StepState::Revoked,
        vec![late.id.to_string()],
        None,
    );
    store
        .revocation_record(&owner, &j.id, sweep_at + 30_000, &[r2], &[])
        .await
        .unwrap();
    let done = store
        .revocation_release(&owner, &j.id, sweep_at, event("revocation.completed", &t))
        .await
        .unwrap();
    assert_eq!(done.state, JobState::Done);
}

/// An operator gives up on failed steps: they are final, the job finishes, and the
/// event records how many.
async fn revocation_abandon(store: &dyn Store) {
    let t = tag();
    let w = workload(&t, "abandon");
    let dest = format!("ab-{t}");
    let g = grant(&w, "iss", &dest, None);
    insert(store, std::slice::from_ref(&g)).await;
    let j = job(RevokeSelector::Workload(w));
    store
        .revocation_create(&j, None, event("revocation.requested", &t))
        .await
        .unwrap();
    let owner = format!("ab-owner-{t}");
    let at = NOW * 1000 + 30_000_000;
    let ours = claim_job(store, &owner, &j.id, at, 30_000).await.is_some();
    assert!(ours);
    let r = receipt(
        &j.id,
        1,
        &dest,
        StepState::Failed,
        vec![g.id.to_string()],
        Some(at + 1_000),
    );
    store
        .revocation_record(&owner, &j.id, at + 30_000, &[r], &[])
        .await
        .unwrap();
    let running = store
        .revocation_release(&owner, &j.id, at, event("revocation.completed", &t))
        .await
        .unwrap();
    assert_eq!(running.state, JobState::Running);
    let (head, _) = chain_tail(store).await;
    let n = store
        .revocation_abandon(&j.id, Some(&dest), at, event("revocation.abandoned", &t))
        .await
        .unwrap();
    assert_eq!(n, 1);
    let events = read_chain(store, head).await;
    let payload: serde_json::Value = serde_json::from_str(&events[0].payload).unwrap();
    assert_eq!(payload["detail"]["abandoned"], json!(1));
    let done = store.revocation_get(&j.id).await.unwrap().unwrap();
    assert_eq!(done.state, JobState::Done);
    let p = store.revocation_progress(&j.id).await.unwrap();
    assert_eq!((p[0].abandoned, p[0].failed), (1, 0));
    assert_conflict(
        store
            .revocation_abandon(&j.id, None, at, event("revocation.abandoned", &t))
            .await,
        "giving up on a done job",
    );
    assert_not_found(
        store
            .revocation_abandon("rvk_missing", None, at, event("revocation.abandoned", &t))
            .await,
        "an unknown job",
    );
}
