//! The store conformance suite on PostgreSQL, and the checks only PostgreSQL needs:
//! concurrent migrations, losing the database, and secret-free errors.
//!
//! Needs `LANYARD_TEST_PG_URL` (a database this test may `CREATE DATABASE` from; see
//! `.ci/pg-start.sh`). Without it each test prints "skipped: LANYARD_TEST_PG_URL not set"
//! and passes, unless `LANYARD_REQUIRE_PG=1`, when it fails. Each test creates its own
//! `lanyard_test_<random>` database and drops it when it passes (a failing test leaves
//! it behind for inspection).

// Test helpers outside `#[test]` functions: failing loudly is their job.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection};

use lanyard_core::GrantId;
use lanyard_store::{ConfigKind, NewAuditEvent, NewConfigObject, Store, StoreError, conformance};
use lanyard_store_postgres::PgStore;

/// The admin URL, or `None` (after saying so) when the tests should be skipped.
fn admin_url() -> Option<String> {
    match std::env::var("LANYARD_TEST_PG_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("LANYARD_REQUIRE_PG").as_deref() != Ok("1"),
                "LANYARD_REQUIRE_PG=1 but LANYARD_TEST_PG_URL is not set"
            );
            println!("skipped: LANYARD_TEST_PG_URL not set");
            None
        }
    }
}

/// `url` pointing at database `name` instead.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let (scheme, rest) = base.split_once("://").expect("a postgres:// URL");
    let authority = rest.split('/').next().unwrap_or_default();
    let mut out = format!("{scheme}://{authority}/{name}");
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// A fresh database, dropped by [`TestDb::drop_db`].
struct TestDb {
    admin: String,
    name: String,
    url: String,
}

impl TestDb {
    async fn create(admin: &str) -> Self {
        let name = format!(
            "lanyard_test_{}",
            &GrantId::generate().as_str()["grt_".len()..]
        );
        let mut conn = PgConnection::connect(admin).await.unwrap();
        conn.execute(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .unwrap();
        conn.close().await.unwrap();
        Self {
            admin: admin.to_owned(),
            url: with_database(admin, &name),
            name,
        }
    }

    async fn drop_db(self) {
        let mut conn = PgConnection::connect(&self.admin).await.unwrap();
        conn.execute(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .await
        .unwrap();
        conn.close().await.unwrap();
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_on_postgres() {
    let Some(admin) = admin_url() else { return };
    let db = TestDb::create(&admin).await;
    let store = PgStore::connect(&db.url, 8).await.unwrap();
    let started = Instant::now();
    conformance::run_all(&store).await;
    // One pool of 8 connections: to the database, as many writers as 8 replicas.
    conformance::run_concurrent(Arc::new(store.clone())).await;
    // A second run on the same database must pass too.
    conformance::run_all(&store).await;
    println!("postgres suite: {:?}", started.elapsed());
    store.close().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_migrate_together_and_rerun_harmlessly() {
    let Some(admin) = admin_url() else { return };
    let db = TestDb::create(&admin).await;
    // Two replicas starting at once on an empty database: the migrator's advisory lock
    // lets one apply the schema and the other see it applied.
    let (a, b) = tokio::join!(PgStore::connect(&db.url, 2), PgStore::connect(&db.url, 2));
    let (a, b) = (a.unwrap(), b.unwrap());
    let obj = a
        .config_put(put("kept"), Some(0), audit("issuer.put"))
        .await
        .unwrap();
    assert_eq!(
        b.config_get(ConfigKind::Issuer, "kept").await.unwrap(),
        Some(obj.clone())
    );
    a.close().await;
    b.close().await;

    let again = PgStore::connect(&db.url, 2).await.unwrap();
    assert_eq!(
        again.config_get(ConfigKind::Issuer, "kept").await.unwrap(),
        Some(obj)
    );
    assert_eq!(
        again.audit_list(0, 10).await.unwrap().len(),
        1,
        "the audit head is seeded once"
    );
    again.close().await;

    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let files = std::fs::read_dir(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../migrations/postgres"),
    )
    .unwrap()
    .filter(|e| {
        e.as_ref()
            .unwrap()
            .path()
            .extension()
            .is_some_and(|x| x == "sql")
    })
    .count();
    assert_eq!(
        applied,
        i64::try_from(files).unwrap(),
        "every migration applied once"
    );
    conn.close().await.unwrap();
    db.drop_db().await;
}

#[tokio::test]
async fn losing_the_database_is_unavailable_not_a_panic() {
    let Some(admin) = admin_url() else { return };
    let db = TestDb::create(&admin).await;
    let store = PgStore::connect(&db.url, 2).await.unwrap();
    store.ping().await.unwrap();

    // Terminates every connection of the store, and makes reconnecting fail.
    let name = db.name.clone();
    db.drop_db().await;

    let started = Instant::now();
    let err = store.ping().await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "ping: {err:?}");
    let err = store
        .config_put(put("x"), None, audit("issuer.put"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Unavailable(_)),
        "config_put: {err:?}"
    );
    let err = store.audit_list(0, 10).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Unavailable(_)),
        "audit_list: {err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "failing took {:?}",
        started.elapsed()
    );

    // Connecting to it now fails the same way.
    let err = PgStore::connect(&with_database(&admin, &name), 1)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Unavailable(_)),
        "connect: {err:?}"
    );
}

#[tokio::test]
async fn connect_errors_hide_the_password() {
    let Some(admin) = admin_url() else { return };
    // Trust authentication ignores the password; the missing database makes it fail.
    let base = with_database(&admin, "lanyard_no_such_database");
    let url = base.replacen("://", "://lanyard:s3cret-pw-42@", 1);
    let url = if url.matches('@').count() > 1 {
        // The admin URL already had credentials; put ours in their place.
        let (scheme, rest) = base.split_once("://").unwrap();
        let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
        format!("{scheme}://lanyard:s3cret-pw-42@{host}")
    } else {
        url
    };
    let err = PgStore::connect(&url, 1).await.unwrap_err();
    let mut text = format!("{err} {err:?}");
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        text.push_str(&format!(" {cause} {cause:?}"));
        source = cause.source();
    }
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(!text.contains("s3cret-pw-42"), "{text}");
    assert!(
        text.contains("lanyard_no_such_database"),
        "the cause is kept: {text}"
    );
}
