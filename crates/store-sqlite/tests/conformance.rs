//! The store conformance suite on SQLite, and the checks only SQLite needs: migrations
//! on reopen, file permissions, and clean failures.

use std::sync::Arc;
use std::time::Instant;

use sqlx::{Connection, Row};

use lanyard_store::{ConfigKind, NewAuditEvent, NewConfigObject, Store, StoreError, conformance};
use lanyard_store_sqlite::SqliteStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_on_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("lanyard.db"))
        .await
        .unwrap();
    let started = Instant::now();
    conformance::run_all(&store).await;
    conformance::run_concurrent(Arc::new(store.clone())).await;
    // A second run on the same database must pass too.
    conformance::run_all(&store).await;
    println!("sqlite file suite: {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_in_memory() {
    let store = SqliteStore::open_memory().await.unwrap();
    let started = Instant::now();
    conformance::run_all(&store).await;
    conformance::run_concurrent(Arc::new(store)).await;
    println!("sqlite in-memory suite: {:?}", started.elapsed());
}

/// How many `.sql` files `migrations/<backend>` holds.
#[allow(clippy::unwrap_used)]
fn migration_files(backend: &str) -> i64 {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../../migrations/{backend}"));
    let n = std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "sql")
        })
        .count();
    i64::try_from(n).unwrap()
}

/// A database written by an earlier version (migrations 1 and 2) keeps its revocation
/// steps and receipts through 0003, which rebuilds both tables to allow `blocked`.
#[tokio::test]
async fn upgrading_from_migration_2_keeps_revocation_rows() {
    use sqlx::migrate::{Migration, MigrationType, Migrator};
    use std::borrow::Cow;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lanyard.db");
    let url = format!("sqlite://{}?mode=rwc", path.display());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let old = Migrator::with_migrations(vec![
        Migration::new(
            1,
            Cow::Borrowed("init"),
            MigrationType::Simple,
            sqlx::SqlSafeStr::into_sql_str(include_str!(
                "../../../migrations/sqlite/0001_init.sql"
            )),
            false,
        ),
        Migration::new(
            2,
            Cow::Borrowed("revocation"),
            MigrationType::Simple,
            sqlx::SqlSafeStr::into_sql_str(include_str!(
                "../../../migrations/sqlite/0002_revocation.sql"
            )),
            false,
        ),
    ]);
    old.run(&mut conn).await.unwrap();
    sqlx::query(
        "INSERT INTO revocation_steps (job_id, grant_id, destination, workload_id, \
         revocation_handle, expires_at, state, attempts, detail, receipt_seq) \
         VALUES ('job1', 'g1', 'aws', 'spiffe://lanyard.local/a', 'h', 10, 'revoked', 1, 'ok', 1)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO revocation_receipts (job_id, seq, destination, outcome, grant_ids, \
         detail, created_at, signature) VALUES ('job1', 1, 'aws', 'revoked', '[\"g1\"]', 'ok', 5, 's')",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    assert!(
        sqlx::query("UPDATE revocation_steps SET state = 'blocked'")
            .execute(&mut conn)
            .await
            .is_err(),
        "before 0003 the state is refused"
    );
    conn.close().await.unwrap();

    let store = SqliteStore::open(&path).await.unwrap();
    let receipts = store.revocation_receipts("job1", 0, 10).await.unwrap();
    assert_eq!(receipts.len(), 1);
    assert_eq!(receipts[0].grant_ids, vec!["g1".to_owned()]);
    let progress = store.revocation_progress("job1").await.unwrap();
    assert_eq!((progress[0].revoked, progress[0].total()), (1, 1));
    store.close().await;
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query("UPDATE revocation_steps SET state = 'blocked'")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("UPDATE revocation_receipts SET outcome = 'blocked'")
        .execute(&mut conn)
        .await
        .unwrap();
    let pk: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM pragma_table_info('revocation_steps') WHERE pk > 0",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(pk, 3, "the primary key survives the rebuild");
}

fn put(name: &str) -> NewConfigObject {
    NewConfigObject {
        kind: ConfigKind::Issuer,
        name: name.to_owned(),
        spec: serde_json::json!({ "url": "https://issuer.example" }),
        updated_by: "test".to_owned(),
        now: 1_700_000_000,
    }
}

fn audit(kind: &str) -> NewAuditEvent {
    NewAuditEvent {
        time_ms: 1_700_000_000_000,
        kind: kind.to_owned(),
        ..NewAuditEvent::default()
    }
}

#[tokio::test]
async fn reopening_reruns_migrations_harmlessly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lanyard.db");
    let store = SqliteStore::open(&path).await.unwrap();
    let obj = store
        .config_put(put("kept"), Some(0), audit("issuer.put"))
        .await
        .unwrap();
    let generation = store.config_generation().await.unwrap();
    store.close().await;
    drop(store);

    for _ in 0..2 {
        let store = SqliteStore::open(&path).await.unwrap();
        assert_eq!(
            store.config_get(ConfigKind::Issuer, "kept").await.unwrap(),
            Some(obj.clone())
        );
        assert_eq!(store.config_generation().await.unwrap(), generation);
        let chain = store.audit_list(0, 10).await.unwrap();
        assert_eq!(chain.len(), 1, "reopening must not re-seed the audit head");
        store.close().await;
    }

    // Each migration is recorded once, and the seeded singleton rows were not duplicated.
    let url = format!("sqlite://{}", path.display());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let applied = sqlx::query("SELECT COUNT(*) AS n FROM _sqlx_migrations WHERE success")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        applied.get::<i64, _>("n"),
        migration_files("sqlite"),
        "every migration applied once"
    );
    let heads = sqlx::query("SELECT COUNT(*) AS n FROM audit_head")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(heads.get::<i64, _>("n"), 1);
    let mode = sqlx::query("PRAGMA journal_mode")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(mode.get::<String, _>(0), "wal");
}

#[cfg(unix)]
#[tokio::test]
async fn database_files_are_private() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lanyard.db");
    let store = SqliteStore::open(&path).await.unwrap();
    store
        .config_put(put("x"), None, audit("issuer.put"))
        .await
        .unwrap();
    let mut checked = 0;
    for suffix in ["", "-wal", "-shm"] {
        let file = dir.path().join(format!("lanyard.db{suffix}"));
        if let Ok(meta) = std::fs::metadata(&file) {
            assert_eq!(
                meta.permissions().mode() & 0o777,
                0o600,
                "{}",
                file.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 2, "the database and its WAL exist");
}

#[tokio::test]
async fn open_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let missing_dir = dir.path().join("no-such-dir").join("lanyard.db");
    let err = SqliteStore::open(&missing_dir).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");

    let garbage = dir.path().join("garbage.db");
    std::fs::write(&garbage, vec![0x5a; 8192]).unwrap();
    let err = SqliteStore::open(&garbage).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
}

#[tokio::test]
async fn closed_store_is_unavailable() {
    let store = SqliteStore::open_memory().await.unwrap();
    store.close().await;
    let err = store.ping().await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    let err = store.audit_append(&[audit("x")]).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
}

/// A batch whose caller goes away part-way (its future dropped after any number of
/// polls) leaves no transaction open on the writer: the next writes, through a batch and
/// through a `BEGIN IMMEDIATE` transaction, succeed, and the chain stays whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_dropped_part_way_leaves_the_writer_usable() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("lanyard.db"))
        .await
        .unwrap();
    let events = vec![audit("exchange.denied"), audit("exchange.denied")];
    for polls in 0..40 {
        {
            let mut batch = std::pin::pin!(store.grant_insert_batch(&[], &events));
            let waker = std::task::Waker::noop();
            let mut cx = std::task::Context::from_waker(waker);
            for _ in 0..polls {
                if batch.as_mut().poll(&mut cx).is_ready() {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
        store
            .grant_insert_batch(&[], &events)
            .await
            .unwrap_or_else(|e| panic!("after dropping at poll {polls}: {e}"));
        store
            .config_put(put(&format!("after-{polls}")), None, audit("issuer.put"))
            .await
            .unwrap_or_else(|e| panic!("after dropping at poll {polls}: {e}"));
    }
    let report = store.audit_list(0, 1_000).await.unwrap();
    assert!(report.len() >= 40 * 3, "every later write landed");
    for pair in report.windows(2) {
        assert_eq!(pair[1].prev_hash, pair[0].hash, "the chain is unbroken");
    }
}
