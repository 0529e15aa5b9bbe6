//! Tamper with a real SQLite audit chain directly (as someone with write access to the
//! database file would) and check that `verify_chain` names the first broken event and
//! what was done to it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use lanyard_audit::checkpoint::{CHECKPOINT_TYP, Checkpoint};
use lanyard_audit::{BreakKind, CheckpointVerifier, VerifyOptions, verify_chain};
use lanyard_core::SystemClock;
use lanyard_keys::{KeyRing, SigningAlgorithm};
use lanyard_store::{NewAuditEvent, Store, chain_hash};
use lanyard_store_sqlite::SqliteStore;
use sqlx::{Connection as _, SqliteConnection};

/// Events in the test chain; a checkpoint is written after every 10th.
const EVENTS: i64 = 50;

struct Chain {
    _dir: tempfile::TempDir,
    store: SqliteStore,
    ring: KeyRing,
    raw: SqliteConnection,
}

impl Chain {
    /// 50 ordinary events with a signed checkpoint after every 10th (so the chain is
    /// 55 events long: checkpoints sit at 11, 22, 33, 44, 55).
    async fn new() -> Chain {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("lanyard.db"))
            .await
            .unwrap();
        let ring = KeyRing::open(
            &dir.path().join("keys"),
            SigningAlgorithm::ES256,
            Arc::new(SystemClock),
        )
        .unwrap();
        for i in 1..=EVENTS {
            let ev = NewAuditEvent {
                time_ms: 1_700_000_000_000 + i,
                kind: "exchange.granted".into(),
                workload_id: Some(format!("spiffe://lanyard.local/w/{i}")),
                detail: serde_json::json!({ "n": i }),
                ..NewAuditEvent::default()
            };
            store.audit_append(&[ev]).await.unwrap();
            if i % 10 == 0 {
                let (seq, head_hash) = store.audit_head().await.unwrap();
                let cp = Checkpoint {
                    iss: "http://127.0.0.1:1".into(),
                    seq,
                    head_hash,
                    time_ms: 1_700_000_000_000 + i,
                };
                let jws = ring.sign(CHECKPOINT_TYP, &cp.claims()).unwrap();
                store.audit_append(&[cp.event(jws.expose())]).await.unwrap();
            }
        }
        let url = format!("sqlite://{}", dir.path().join("lanyard.db").display());
        let raw = SqliteConnection::connect(&url).await.unwrap();
        Chain {
            _dir: dir,
            store,
            ring,
            raw,
        }
    }

    fn keys(&self) -> CheckpointVerifier {
        CheckpointVerifier::from_jwks(&self.ring.all_public_jwks())
    }

    async fn verify(&self, opts: &VerifyOptions) -> lanyard_audit::VerifyReport {
        verify_chain(Arc::new(self.store.clone()), &self.keys(), opts)
            .await
            .unwrap()
    }

    async fn exec(&mut self, sql: &str) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&mut self.raw)
            .await
            .unwrap();
    }

    /// A checkpoint signed now over event `seq`, as an auditor would keep it.
    async fn outside_checkpoint(&self, seq: i64) -> String {
        let e = self.store.audit_list(seq - 1, 1).await.unwrap().remove(0);
        let cp = Checkpoint {
            iss: "http://127.0.0.1:1".into(),
            seq,
            head_hash: e.hash,
            time_ms: 1,
        };
        self.ring
            .sign(CHECKPOINT_TYP, &cp.claims())
            .unwrap()
            .expose()
            .to_owned()
    }

    /// Recompute every hash from `from` on, and the head record, as a careful attacker
    /// would after changing something.
    async fn rehash_from(&mut self, from: i64) {
        let all = self.store.audit_list(0, 10_000).await.unwrap();
        let mut prev = all
            .iter()
            .find(|e| e.seq == from - 1)
            .map_or(lanyard_store::GENESIS_HASH.to_owned(), |e| e.hash.clone());
        for e in all.iter().filter(|e| e.seq >= from) {
            let hash = chain_hash(e.seq, &prev, &e.payload);
            sqlx::query("UPDATE audit_events SET prev_hash = ?1, hash = ?2 WHERE seq = ?3")
                .bind(&prev)
                .bind(&hash)
                .bind(e.seq)
                .execute(&mut self.raw)
                .await
                .unwrap();
            prev = hash;
        }
        let last = all.last().unwrap().seq;
        sqlx::query("UPDATE audit_head SET seq = ?1, hash = ?2 WHERE id = 1")
            .bind(last)
            .bind(&prev)
            .execute(&mut self.raw)
            .await
            .unwrap();
    }
}

fn broken(r: &lanyard_audit::VerifyReport) -> (i64, BreakKind) {
    let b = r.breakage.as_ref().expect("verification should fail");
    (b.seq, b.kind)
}

#[tokio::test]
async fn intact_chain_verifies_with_its_checkpoints() {
    let c = Chain::new().await;
    let r = c.verify(&VerifyOptions::default()).await;
    assert!(r.ok(), "{:?}", r.breakage);
    assert_eq!(r.checked, 55);
    assert_eq!(r.head_seq, 55);
    assert_eq!(r.checkpoints_verified, 5);
    assert_eq!(r.last_checkpoint_seq, Some(55));
    assert_eq!(
        (r.head_seq, r.head_hash.clone()),
        c.store.audit_head().await.unwrap()
    );

    // From a checkpoint: only what follows it is walked.
    let from = c.outside_checkpoint(30).await;
    let r = c
        .verify(&VerifyOptions {
            from_checkpoint: Some(from),
            page_size: 7,
            ..VerifyOptions::default()
        })
        .await;
    assert!(r.ok(), "{:?}", r.breakage);
    assert_eq!((r.start_seq, r.checked, r.head_seq), (30, 25, 55));
}

#[tokio::test]
async fn an_edited_event_is_named() {
    let mut c = Chain::new().await;
    c.exec("UPDATE audit_events SET payload = replace(payload, 'w/17', 'w/71') WHERE seq = 18")
        .await;
    let r = c.verify(&VerifyOptions::default()).await;
    assert_eq!(broken(&r), (18, BreakKind::Edited), "{:?}", r.breakage);
    assert_eq!(r.head_seq, 17, "everything before it was proven");
}

#[tokio::test]
async fn a_deleted_event_is_named() {
    let mut c = Chain::new().await;
    c.exec("DELETE FROM audit_events WHERE seq = 7").await;
    let r = c.verify(&VerifyOptions::default()).await;
    assert_eq!(broken(&r), (7, BreakKind::Deleted), "{:?}", r.breakage);
    // Small pages: the read-ahead pages shift at the gap and are read again.
    for page_size in [2, 3, 6] {
        let r = c
            .verify(&VerifyOptions {
                page_size,
                ..VerifyOptions::default()
            })
            .await;
        assert_eq!(
            broken(&r),
            (7, BreakKind::Deleted),
            "page {page_size}: {:?}",
            r.breakage
        );
        assert_eq!(r.checked, 6);
    }
    // A gap late in the chain, found through many read-ahead pages.
    let mut c = Chain::new().await;
    c.exec("DELETE FROM audit_events WHERE seq = 50").await;
    let r = c
        .verify(&VerifyOptions {
            page_size: 4,
            ..VerifyOptions::default()
        })
        .await;
    assert_eq!(broken(&r), (50, BreakKind::Deleted), "{:?}", r.breakage);
    assert_eq!((r.checked, r.head_seq), (49, 49));

    // Deleted and the later events renumbered to close the gap.
    let mut c = Chain::new().await;
    c.exec(
        "DELETE FROM audit_events WHERE seq IN (7, 8);
         UPDATE audit_events SET seq = -(seq - 2) WHERE seq > 8;
         UPDATE audit_events SET seq = -seq WHERE seq < 0;",
    )
    .await;
    let r = c.verify(&VerifyOptions::default()).await;
    let b = r.breakage.clone().unwrap();
    assert_eq!((b.seq, b.kind), (7, BreakKind::Deleted), "{b:?}");
    assert!(b.detail.contains("2 event(s)"), "{}", b.detail);
}

#[tokio::test]
async fn a_reordered_pair_is_named() {
    let mut c = Chain::new().await;
    c.exec(
        "UPDATE audit_events SET seq = -1 WHERE seq = 25;
         UPDATE audit_events SET seq = 25 WHERE seq = 26;
         UPDATE audit_events SET seq = 26 WHERE seq = -1;",
    )
    .await;
    let r = c.verify(&VerifyOptions::default()).await;
    assert_eq!(broken(&r), (25, BreakKind::Reordered), "{:?}", r.breakage);
}

#[tokio::test]
async fn a_truncated_tail_is_named() {
    // The events cut off, the head record left alone.
    let mut c = Chain::new().await;
    c.exec("DELETE FROM audit_events WHERE seq > 40").await;
    let r = c.verify(&VerifyOptions::default()).await;
    assert_eq!(broken(&r), (41, BreakKind::Truncated), "{:?}", r.breakage);
    assert!(r.breakage.unwrap().detail.contains("55"));

    // The head record moved back too: the database alone looks whole, and a checkpoint
    // kept outside lanyard proves the tail existed.
    let mut c = Chain::new().await;
    let kept = c.outside_checkpoint(50).await;
    let h40 = c.store.audit_list(39, 1).await.unwrap().remove(0).hash;
    c.exec(&format!(
        "DELETE FROM audit_events WHERE seq > 40; UPDATE audit_head SET seq = 40, hash = '{h40}'"
    ))
    .await;
    assert!(c.verify(&VerifyOptions::default()).await.ok());
    let r = c
        .verify(&VerifyOptions {
            known_checkpoints: vec![kept],
            ..VerifyOptions::default()
        })
        .await;
    assert_eq!(broken(&r), (41, BreakKind::Truncated), "{:?}", r.breakage);
}

#[tokio::test]
async fn a_rewritten_stretch_is_caught_by_the_next_signed_checkpoint() {
    let mut c = Chain::new().await;
    c.exec("UPDATE audit_events SET payload = replace(payload, 'w/27', 'w/99') WHERE seq = 29")
        .await;
    c.rehash_from(29).await;
    let r = c.verify(&VerifyOptions::default()).await;
    // Checkpoint 22 still matched; checkpoint 33 does not.
    assert_eq!(broken(&r), (23, BreakKind::Rewritten), "{:?}", r.breakage);
    assert_eq!(r.last_checkpoint_seq, Some(22));
}

#[tokio::test]
async fn a_forged_checkpoint_is_caught() {
    let mut c = Chain::new().await;
    // Re-sign checkpoint 33 with a key lanyard never had, then re-hash.
    let dir = tempfile::tempdir().unwrap();
    let other = KeyRing::open(
        &dir.path().join("k"),
        SigningAlgorithm::ES256,
        Arc::new(SystemClock),
    )
    .unwrap();
    let e32 = c.store.audit_list(31, 1).await.unwrap().remove(0);
    let cp = Checkpoint {
        iss: "x".into(),
        seq: 32,
        head_hash: e32.hash,
        time_ms: 1,
    };
    let jws = other.sign(CHECKPOINT_TYP, &cp.claims()).unwrap();
    let payload = cp.event(jws.expose()).payload();
    sqlx::query("UPDATE audit_events SET payload = ?1 WHERE seq = 33")
        .bind(payload)
        .execute(&mut c.raw)
        .await
        .unwrap();
    c.rehash_from(33).await;
    let r = c.verify(&VerifyOptions::default()).await;
    assert_eq!(
        broken(&r),
        (33, BreakKind::BadCheckpoint),
        "{:?}",
        r.breakage
    );
}

#[tokio::test]
async fn a_bad_starting_checkpoint_is_an_error_not_a_verdict() {
    let c = Chain::new().await;
    let err = verify_chain(
        Arc::new(c.store.clone()),
        &c.keys(),
        &VerifyOptions {
            from_checkpoint: Some("a.b.c".into()),
            ..VerifyOptions::default()
        },
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("checkpoint"), "{err}");
}
