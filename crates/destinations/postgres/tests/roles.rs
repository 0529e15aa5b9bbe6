//! The `postgres` destination against a real PostgreSQL: issue, renew and revoke login
//! roles, and prove what each role can and cannot do by connecting as it.
//!
//! Needs `LANYARD_TEST_PG_URL`, a superuser URL (see `.ci/pg-start.sh`). Without it the
//! tests that need a database print "skipped: LANYARD_TEST_PG_URL not set" and pass,
//! unless `LANYARD_REQUIRE_PG=1`, when they fail. Each test creates its own database
//! `lanyard_dest_<random>` and its own group roles (roles are cluster-wide, so their
//! names carry the same random tag), and drops them when it passes.
//!
//! ## Passwords under trust authentication
//! `.ci/pg-start.sh` uses `trust` authentication on loopback, so PostgreSQL does not check
//! passwords here: a login proves the role exists and may log in (`LOGIN`, not dropped),
//! not that the password is right. The password is proved instead by recomputing the
//! SCRAM verifier PostgreSQL stored (`pg_authid.rolpassword`) from the returned password
//! and the stored salt; that verifier is what `scram-sha-256`/`md5` authentication checks.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use sqlx::postgres::PgConnectOptions;
use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection, Row};

use lanyard_core::{Clock, GrantId, Scope, SystemClock, Ttl, UnixTime, WorkloadId};
use lanyard_destination::{
    Credential, Destination, DestinationError, DestinationSpec, IssueRequest, Issued,
    RevokeOutcome, RevokeRequest,
};
use lanyard_destination_postgres::{PostgresDestination, scram_sha256_verifier};

const WORKLOAD: &str = "spiffe://example.org/ns/orders/sa/worker";

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

/// A random tag for names: the last 12 (random) hex digits of a UUIDv7.
fn tag() -> String {
    let g = GrantId::generate();
    g.as_str()[g.as_str().len() - 12..].to_owned()
}

fn now() -> UnixTime {
    SystemClock.now_unix()
}

fn spec(settings: Value) -> DestinationSpec {
    serde_json::from_value(json!({
        "name": "orders-db", "kind": "postgres", "scopes": ["db:read", "db:write"],
        "max_ttl_secs": 3600, "settings": settings
    }))
    .unwrap()
}

/// One test's database, group roles and admin URL file.
struct Fixture {
    admin: String,
    db: String,
    /// Extra databases to drop at the end.
    other_dbs: Vec<String>,
    /// `SELECT` on `items`.
    ro: String,
    /// `SELECT, INSERT` on `items`, `CREATE` on schema `public`.
    rw: String,
    prefix: String,
    _dir: tempfile::TempDir,
    url_file: PathBuf,
}

impl Fixture {
    async fn new(admin: &str) -> Self {
        let tag = tag();
        let db = format!("lanyard_dest_{tag}");
        let (ro, rw) = (format!("ro_{tag}"), format!("rw_{tag}"));
        let mut conn = PgConnection::connect(admin).await.unwrap();
        conn.execute(AssertSqlSafe(format!("CREATE DATABASE {db}")))
            .await
            .unwrap();
        conn.close().await.unwrap();
        let mut conn = PgConnection::connect(&with_database(admin, &db))
            .await
            .unwrap();
        conn.execute(AssertSqlSafe(format!(
            "CREATE TABLE items (id int); INSERT INTO items VALUES (1);
             CREATE ROLE {ro} NOLOGIN; CREATE ROLE {rw} NOLOGIN;
             GRANT SELECT ON items TO {ro}; GRANT SELECT, INSERT ON items TO {rw};
             GRANT CREATE ON SCHEMA public TO {rw};"
        )))
        .await
        .unwrap();
        conn.close().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let url_file = dir.path().join("admin-url");
        // The adapter replaces the URL's database with `database`.
        std::fs::write(&url_file, format!("{admin}\n")).unwrap();
        private(&url_file);
        Self {
            admin: admin.to_owned(),
            db,
            other_dbs: Vec::new(),
            ro,
            rw,
            prefix: format!("t{tag}_"),
            _dir: dir,
            url_file,
        }
    }

    fn settings(&self) -> Value {
        let opts = PgConnectOptions::from_str(&self.admin).unwrap();
        json!({
            "host": opts.get_host(), "port": opts.get_port(), "database": self.db,
            "admin_url_file": self.url_file,
            "scope_roles": {"db:read": [self.ro], "db:write": [self.rw]},
            "role_prefix": self.prefix,
        })
    }

    fn destination(&self, settings: Value) -> PostgresDestination {
        PostgresDestination::new(&spec(settings)).unwrap()
    }

    async fn conn(&self) -> PgConnection {
        PgConnection::connect(&with_database(&self.admin, &self.db))
            .await
            .unwrap()
    }

    async fn create_db(&mut self, name: &str) -> PgConnection {
        let mut conn = PgConnection::connect(&self.admin).await.unwrap();
        conn.execute(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .unwrap();
        conn.close().await.unwrap();
        self.other_dbs.push(name.to_owned());
        PgConnection::connect(&with_database(&self.admin, name))
            .await
            .unwrap()
    }

    /// Roles whose names start with this test's prefix.
    async fn roles(&self) -> Vec<String> {
        let mut conn = self.conn().await;
        let roles = sqlx::query_scalar(
            "SELECT rolname::text FROM pg_roles WHERE starts_with(rolname, $1) ORDER BY 1",
        )
        .bind(&self.prefix)
        .fetch_all(&mut conn)
        .await
        .unwrap();
        conn.close().await.unwrap();
        roles
    }

    async fn teardown(self, extra_roles: &[&str]) {
        let leftover = self.roles().await;
        let mut conn = PgConnection::connect(&self.admin).await.unwrap();
        for db in std::iter::once(&self.db).chain(&self.other_dbs) {
            conn.execute(AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
            )))
            .await
            .unwrap();
        }
        let roles = leftover
            .iter()
            .map(String::as_str)
            .chain([self.ro.as_str(), self.rw.as_str()])
            .chain(extra_roles.iter().copied());
        for role in roles {
            conn.execute(AssertSqlSafe(format!("DROP ROLE IF EXISTS \"{role}\"")))
                .await
                .unwrap();
        }
        conn.close().await.unwrap();
    }
}

/// What `pg_roles`/`pg_authid` say about a role.
#[derive(Debug)]
struct RoleState {
    can_login: bool,
    conn_limit: i32,
    valid_until: Option<i64>,
    password: Option<String>,
    comment: Option<String>,
}

async fn role_state(conn: &mut PgConnection, role: &str) -> Option<RoleState> {
    let row = sqlx::query(
        "SELECT rolcanlogin, rolconnlimit, extract(epoch FROM rolvaliduntil)::bigint AS valid_until,
                rolpassword, shobj_description(oid, 'pg_authid') AS comment
         FROM pg_authid WHERE rolname = $1",
    )
    .bind(role)
    .fetch_optional(conn)
    .await
    .unwrap()?;
    Some(RoleState {
        can_login: row.get("rolcanlogin"),
        conn_limit: row.get("rolconnlimit"),
        valid_until: row.get("valid_until"),
        password: row.get("rolpassword"),
        comment: row.get("comment"),
    })
}

async fn is_member(conn: &mut PgConnection, role: &str, group: &str) -> bool {
    sqlx::query_scalar("SELECT pg_has_role($1, $2, 'MEMBER')")
        .bind(role)
        .bind(group)
        .fetch_one(conn)
        .await
        .unwrap()
}

/// Whether `stored` (a PostgreSQL SCRAM verifier) is the verifier of `password`.
fn verifier_matches(stored: &str, password: &str) -> bool {
    let rest = stored
        .strip_prefix("SCRAM-SHA-256$")
        .expect("a SCRAM verifier");
    let (params, _) = rest.split_once('$').unwrap();
    let (iterations, salt) = params.split_once(':').unwrap();
    let iterations = NonZeroU32::new(iterations.parse().unwrap()).unwrap();
    let salt = B64.decode(salt).unwrap();
    scram_sha256_verifier(password, &salt, iterations) == stored
}

fn parts(issued: &Issued) -> (&str, u16, &str, &str, &str) {
    match &issued.credential {
        Credential::Database {
            host,
            port,
            database,
            username,
            password,
        } => (host, *port, database, username, password.expose()),
        other => panic!("not a database credential: {other:?}"),
    }
}

/// Connect as the issued role.
async fn login(issued: &Issued) -> sqlx::Result<PgConnection> {
    let (host, port, database, username, password) = parts(issued);
    PgConnection::connect_with(
        &PgConnectOptions::new_without_pgpass()
            .host(host)
            .port(port)
            .database(database)
            .username(username)
            .password(password),
    )
    .await
}

async fn try_issue(
    d: &PostgresDestination,
    grant: &GrantId,
    scopes: &[&str],
    ttl: u64,
    now: UnixTime,
) -> Result<Issued, DestinationError> {
    let workload = WorkloadId::parse(WORKLOAD).unwrap();
    let scopes: Vec<Scope> = scopes.iter().map(|s| Scope::parse(s).unwrap()).collect();
    let claims = serde_json::Map::new();
    d.issue(IssueRequest {
        grant_id: grant,
        workload: &workload,
        issuer: "test-issuer",
        task: None,
        scopes: &scopes,
        ttl: Ttl::from_secs(ttl).unwrap(),
        now,
        actor_chain: &[],
        claims: &claims,
    })
    .await
}

async fn issue(d: &PostgresDestination, scopes: &[&str]) -> (GrantId, Issued) {
    let grant = GrantId::generate();
    let issued = try_issue(d, &grant, scopes, 600, now()).await.unwrap();
    (grant, issued)
}

async fn try_renew(
    d: &PostgresDestination,
    grant: &GrantId,
    handle: &str,
    ttl: u64,
    now: UnixTime,
) -> Result<Issued, DestinationError> {
    let workload = WorkloadId::parse(WORKLOAD).unwrap();
    let scopes = [Scope::parse("db:read").unwrap()];
    let claims = serde_json::Map::new();
    d.renew(
        IssueRequest {
            grant_id: grant,
            workload: &workload,
            issuer: "test-issuer",
            task: None,
            scopes: &scopes,
            ttl: Ttl::from_secs(ttl).unwrap(),
            now,
            actor_chain: &[],
            claims: &claims,
        },
        handle,
    )
    .await
}

async fn revoke(
    d: &PostgresDestination,
    grant: &GrantId,
    handle: &str,
) -> Result<RevokeOutcome, DestinationError> {
    d.revoke(RevokeRequest {
        grant_id: grant,
        revocation_handle: handle,
        workload_id: WORKLOAD,
        expires_at: now() + 600,
        now: now(),
    })
    .await
}

fn revoked_detail(outcome: RevokeOutcome) -> String {
    match outcome {
        RevokeOutcome::Revoked { detail } => detail,
        other => panic!("not revoked: {other:?}"),
    }
}

fn sqlstate(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

// === tests ===

#[tokio::test]
async fn issued_role_reads_or_writes_by_scope() {
    let Some(admin) = admin_url() else { return };
    let fx = Fixture::new(&admin).await;
    let d = fx.destination(fx.settings());
    let mut admin_conn = fx.conn().await;

    let before = now();
    let (grant, read) = issue(&d, &["db:read"]).await;
    let (host, port, database, username, password) = parts(&read);
    let admin_opts = PgConnectOptions::from_str(&admin).unwrap();
    assert_eq!(
        (host, port, database),
        (admin_opts.get_host(), admin_opts.get_port(), fx.db.as_str())
    );
    assert_eq!(username, read.revocation_handle);
    assert_eq!(
        username,
        format!("{}{}", fx.prefix, &grant.as_str()["grt_".len()..]),
        "the role name is the prefix and the grant's hex"
    );
    assert!(username.len() <= 63);
    assert!(password.len() >= 32 && password.bytes().all(|b| b.is_ascii_alphanumeric()));
    assert!(read.expires_at >= before + 600 && read.expires_at <= now() + 600);

    let state = role_state(&mut admin_conn, username).await.unwrap();
    assert!(state.can_login);
    assert_eq!(state.conn_limit, 10);
    assert_eq!(state.valid_until, Some(read.expires_at));
    assert_eq!(state.comment, Some(format!("lanyard grant {grant}")));
    let stored = state.password.unwrap();
    assert!(stored.starts_with("SCRAM-SHA-256$4096:"), "{stored}");
    assert!(
        verifier_matches(&stored, password),
        "stored verifier is not of the returned password"
    );
    assert!(is_member(&mut admin_conn, username, &fx.ro).await);
    assert!(!is_member(&mut admin_conn, username, &fx.rw).await);

    // Read: SELECT works, INSERT is refused.
    let mut conn = login(&read).await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM items")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, 1);
    let err = conn
        .execute("INSERT INTO items VALUES (2)")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{err}");
    assert!(err.to_string().contains("permission denied"), "{err}");
    conn.close().await.unwrap();

    // Issuing again for the same grant does not replace the role.
    let err = try_issue(&d, &grant, &["db:read"], 600, now())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, DestinationError::Upstream { retryable: false, message } if message.contains("already exists")),
        "{err:?}"
    );

    // Write, through a destination whose admin URL comes from an environment variable.
    let mut settings = fx.settings();
    settings.as_object_mut().unwrap().remove("admin_url_file");
    settings["admin_url_env"] = json!("LANYARD_TEST_PG_URL");
    let d_env = fx.destination(settings);
    let (write_grant, write) = issue(&d_env, &["db:read", "db:write"]).await;
    assert!(is_member(&mut admin_conn, &write.revocation_handle, &fx.rw).await);
    let mut conn = login(&write).await.unwrap();
    conn.execute("INSERT INTO items VALUES (2)").await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM items")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, 2);
    conn.close().await.unwrap();

    revoke(&d, &grant, &read.revocation_handle).await.unwrap();
    revoke(&d_env, &write_grant, &write.revocation_handle)
        .await
        .unwrap();
    assert!(fx.roles().await.is_empty());
    admin_conn.close().await.unwrap();
    d.close().await;
    d_env.close().await;
    fx.teardown(&[]).await;
}

#[tokio::test]
async fn revoke_ends_sessions_and_drops_the_role() {
    let Some(admin) = admin_url() else { return };
    let fx = Fixture::new(&admin).await;
    let d = fx.destination(fx.settings());
    let (grant, issued) = issue(&d, &["db:read"]).await;
    let role = issued.revocation_handle.clone();
    let mut open = login(&issued).await.unwrap();
    open.execute("SELECT 1").await.unwrap();

    // A handle for another grant is refused and the role is left alone.
    let err = revoke(&d, &GrantId::generate(), &role).await.unwrap_err();
    assert!(
        matches!(&err, DestinationError::Upstream { retryable: false, message } if message.contains("not created by lanyard for this grant")),
        "{err:?}"
    );
    open.execute("SELECT 1").await.unwrap();

    let detail = revoked_detail(revoke(&d, &grant, &role).await.unwrap());
    for step in [
        "login disabled (NOLOGIN)",
        "1 session terminated",
        &format!(
            "reassigned to {}",
            PgConnectOptions::from_str(&admin).unwrap().get_username()
        ),
        &format!("dropped in database {}", fx.db),
        "role dropped",
    ] {
        assert!(detail.contains(step), "{step:?} not in {detail:?}");
    }
    assert!(detail.starts_with(&format!("role {role}: ")), "{detail}");

    // The open session was terminated: its next query fails.
    let err = open.execute("SELECT 1").await.unwrap_err();
    assert!(
        sqlstate(&err).as_deref() == Some("57P01") || matches!(err, sqlx::Error::Io(_)),
        "{err:?}"
    );
    drop(open);
    // A new login fails: the role is gone.
    let err = login(&issued).await.unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    let mut admin_conn = fx.conn().await;
    assert!(role_state(&mut admin_conn, &role).await.is_none());
    admin_conn.close().await.unwrap();

    // Idempotent.
    let detail = revoked_detail(revoke(&d, &grant, &role).await.unwrap());
    assert_eq!(detail, format!("role {role} already gone"));
    d.close().await;
    fx.teardown(&[]).await;
}

#[tokio::test]
async fn owned_objects_are_reassigned_and_revocation_resumes_after_a_failure() {
    let Some(admin) = admin_url() else { return };
    let mut fx = Fixture::new(&admin).await;
    let owner = format!("{}owner", fx.ro);
    let mut admin_conn = fx.conn().await;
    admin_conn
        .execute(AssertSqlSafe(format!(
            "CREATE ROLE {owner} NOLOGIN;
             CREATE TABLE extra (v text); INSERT INTO extra VALUES ('x');
             CREATE TABLE revoked_log (grant_id text, scopes text);"
        )))
        .await
        .unwrap();
    let mut settings = fx.settings();
    settings["owner_role"] = json!(owner);
    // A direct grant (which DROP OWNED removes), and a note of what was granted.
    settings["creation_statements"] = json!([
        "GRANT SELECT ON extra TO {{name}}",
        "INSERT INTO revoked_log VALUES ({{grant_id}}, {{scopes}})"
    ]);
    settings["revocation_statements"] = json!([
        "UPDATE revoked_log SET scopes = scopes || ' revoked' WHERE grant_id = {{grant_id}}"
    ]);
    let d = fx.destination(settings);

    let (grant, issued) = issue(&d, &["db:write"]).await;
    let role = issued.revocation_handle.clone();
    let table = format!("made_{}", &fx.prefix[1..fx.prefix.len() - 1]);
    let mut conn = login(&issued).await.unwrap();
    conn.execute(AssertSqlSafe(format!(
        "CREATE TABLE {table} (x int); INSERT INTO {table} VALUES (7)"
    )))
    .await
    .unwrap();
    let v: String = sqlx::query_scalar("SELECT v FROM extra")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(v, "x");
    conn.close().await.unwrap();
    let table_owner = |t: String| {
        sqlx::query_scalar::<_, String>(
            "SELECT tableowner::text FROM pg_tables WHERE tablename = $1",
        )
        .bind(t)
    };
    assert_eq!(
        table_owner(table.clone())
            .fetch_one(&mut admin_conn)
            .await
            .unwrap(),
        role
    );

    let detail = revoked_detail(revoke(&d, &grant, &role).await.unwrap());
    assert!(detail.contains("0 sessions terminated"), "{detail}");
    assert!(detail.contains("1 revocation statement run"), "{detail}");
    assert!(
        detail.contains(&format!("reassigned to {owner}")),
        "{detail}"
    );
    assert!(detail.contains("role dropped"), "{detail}");
    assert!(role_state(&mut admin_conn, &role).await.is_none());
    // The table survives, owned by owner_role; the direct grant is gone with the role.
    assert_eq!(
        table_owner(table.clone())
            .fetch_one(&mut admin_conn)
            .await
            .unwrap(),
        owner
    );
    let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
        .fetch_one(&mut admin_conn)
        .await
        .unwrap();
    assert_eq!(n, 1);
    let acl: String = sqlx::query_scalar(
        "SELECT coalesce(relacl::text, '') FROM pg_class WHERE relname = 'extra'",
    )
    .fetch_one(&mut admin_conn)
    .await
    .unwrap();
    assert!(!acl.contains(&fx.prefix), "{acl}");
    let logged: String = sqlx::query_scalar("SELECT scopes FROM revoked_log WHERE grant_id = $1")
        .bind(grant.as_str())
        .fetch_one(&mut admin_conn)
        .await
        .unwrap();
    assert_eq!(logged, "db:write revoked");

    // A role owning an object in another database cannot be dropped from this one: the
    // revocation stops at DROP ROLE with login already disabled, and resumes once the
    // object is gone.
    let (grant, issued) = issue(&d, &["db:read"]).await;
    let role = issued.revocation_handle.clone();
    let other = format!("{}_b", fx.db);
    let mut other_conn = fx.create_db(&other).await;
    other_conn
        .execute(AssertSqlSafe(format!(
            "CREATE TABLE elsewhere (x int); ALTER TABLE elsewhere OWNER TO {role}"
        )))
        .await
        .unwrap();
    let err = revoke(&d, &grant, &role).await.unwrap_err();
    let DestinationError::Upstream { message, retryable } = &err else {
        panic!("{err:?}")
    };
    assert!(retryable, "{err:?}");
    for want in ["DROP ROLE", "2BP01", &other, &role] {
        assert!(message.contains(want), "{want:?} not in {message:?}");
    }
    let state = role_state(&mut admin_conn, &role).await.unwrap();
    assert!(!state.can_login, "NOLOGIN holds though a later step failed");
    let err = login(&issued).await.unwrap_err();
    assert!(err.to_string().contains("not permitted to log in"), "{err}");
    let err = try_renew(&d, &grant, &role, 600, now()).await.unwrap_err();
    assert!(
        matches!(&err, DestinationError::Upstream { retryable: false, message } if message.contains("cannot log in")),
        "{err:?}"
    );

    other_conn.execute("DROP TABLE elsewhere").await.unwrap();
    other_conn.close().await.unwrap();
    let detail = revoked_detail(revoke(&d, &grant, &role).await.unwrap());
    assert!(detail.contains("role dropped"), "{detail}");
    assert!(role_state(&mut admin_conn, &role).await.is_none());

    admin_conn.close().await.unwrap();
    d.close().await;
    // Drop the database (and the objects owner_role owns there) before the role.
    let owner_role = owner.clone();
    fx.teardown(&[&owner_role]).await;
}

#[tokio::test]
async fn renew_extends_valid_until_with_a_new_password() {
    let Some(admin) = admin_url() else { return };
    let fx = Fixture::new(&admin).await;
    let d = fx.destination(fx.settings());
    let mut admin_conn = fx.conn().await;
    let grant = GrantId::generate();
    let t0 = now();
    let first = try_issue(&d, &grant, &["db:read"], 60, t0).await.unwrap();
    let role = first.revocation_handle.clone();
    let before = role_state(&mut admin_conn, &role).await.unwrap();
    assert_eq!(before.valid_until, Some(t0 + 60));

    let renewed = try_renew(&d, &grant, &role, 1800, t0 + 30).await.unwrap();
    assert_eq!(renewed.revocation_handle, role, "the same role");
    assert_eq!(renewed.expires_at, t0 + 30 + 1800);
    let (_, _, _, username, password) = parts(&renewed);
    assert_eq!(username, role);
    assert_ne!(password, parts(&first).4, "a new password");
    let after = role_state(&mut admin_conn, &role).await.unwrap();
    assert_eq!(after.valid_until, Some(renewed.expires_at));
    assert!(after.can_login);
    let stored = after.password.unwrap();
    assert_ne!(Some(&stored), before.password.as_ref());
    assert!(verifier_matches(&stored, password));
    assert!(!verifier_matches(&stored, parts(&first).4));
    assert!(
        is_member(&mut admin_conn, &role, &fx.ro).await,
        "memberships kept"
    );
    let mut conn = login(&renewed).await.unwrap();
    conn.execute("SELECT count(*) FROM items").await.unwrap();
    conn.close().await.unwrap();

    // Only the grant that owns the role may renew it.
    let err = try_renew(&d, &GrantId::generate(), &role, 600, now())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            DestinationError::Upstream {
                retryable: false,
                ..
            }
        ),
        "{err:?}"
    );

    revoke(&d, &grant, &role).await.unwrap();
    let err = try_renew(&d, &grant, &role, 600, now()).await.unwrap_err();
    assert!(
        matches!(&err, DestinationError::Upstream { retryable: false, message } if message.contains("no longer exists")),
        "{err:?}"
    );
    admin_conn.close().await.unwrap();
    d.close().await;
    fx.teardown(&[]).await;
}

#[tokio::test]
async fn a_failing_grant_creates_nothing() {
    let Some(admin) = admin_url() else { return };
    let fx = Fixture::new(&admin).await;
    let mut settings = fx.settings();
    let missing = format!("{}_missing", fx.ro);
    settings["scope_roles"]["db:read"] = json!([fx.ro, missing]);
    let d = fx.destination(settings);
    let err = try_issue(&d, &GrantId::generate(), &["db:read"], 600, now())
        .await
        .unwrap_err();
    let DestinationError::Upstream { message, retryable } = &err else {
        panic!("{err:?}")
    };
    assert!(!retryable, "{err:?}");
    for want in ["GRANT", &missing, "does not exist", "SQLSTATE 42704"] {
        assert!(message.contains(want), "{want:?} not in {message:?}");
    }
    assert!(!message.contains("SCRAM"), "{message}");
    assert!(fx.roles().await.is_empty(), "CREATE ROLE was rolled back");
    d.close().await;
    fx.teardown(&[]).await;
}

/// Settings problems are found when the destination is built; needs no database.
#[test]
fn bad_settings_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let url_file = dir.path().join("admin-url");
    std::fs::write(&url_file, "postgres://admin:hunter2@127.0.0.1:5432/x").unwrap();
    private(&url_file);
    let good = json!({
        "host": "127.0.0.1", "database": "orders", "admin_url_file": url_file,
        "scope_roles": {"db:read": ["app_readonly"], "db:write": ["app_readwrite"]}
    });
    PostgresDestination::new(&spec(good.clone())).unwrap();

    let mut unknown = good.clone();
    unknown["admin_password"] = json!("hunter2");
    let mut missing_scope = good.clone();
    missing_scope["scope_roles"] = json!({"db:read": ["app_readonly"]});
    let mut bad_group = good.clone();
    bad_group["scope_roles"]["db:write"] = json!(["pg_execute_server_program"]);
    let mut long_group = good.clone();
    long_group["scope_roles"]["db:write"] = json!(["g".repeat(64)]);
    let gone = dir.path().join("no-such-file");
    let mut unreadable = good.clone();
    unreadable["admin_url_file"] = json!(gone);
    let mut directory = good.clone();
    directory["admin_url_file"] = json!(dir.path());
    let loose = dir.path().join("loose-url");
    std::fs::write(&loose, "postgres://admin:hunter2@127.0.0.1:5432/x").unwrap();
    let mut readable_by_others = good.clone();
    readable_by_others["admin_url_file"] = json!(loose);
    let mut unset_env = good.clone();
    unset_env.as_object_mut().unwrap().remove("admin_url_file");
    unset_env["admin_url_env"] = json!("LANYARD_TEST_SURELY_UNSET_VARIABLE");

    let cases = [
        (unknown, "unknown field `admin_password`".to_owned()),
        (
            missing_scope,
            "scope_roles has no entry for offered scope \"db:write\"".to_owned(),
        ),
        (bad_group, "is a built-in role".to_owned()),
        (long_group, "must be 1-63 bytes".to_owned()),
        (
            unreadable,
            format!(
                "cannot read admin_url_file {}: entity not found",
                gone.display()
            ),
        ),
        (
            directory,
            format!(
                "admin_url_file {} is not a regular file",
                dir.path().display()
            ),
        ),
        (readable_by_others, "chmod 600".to_owned()),
        (
            unset_env,
            "admin_url_env LANYARD_TEST_SURELY_UNSET_VARIABLE is not set".to_owned(),
        ),
    ];
    for (settings, want) in cases {
        let err = PostgresDestination::new(&spec(settings)).unwrap_err();
        assert!(
            matches!(err, DestinationError::InvalidSettings { .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains(&want), "{want:?} not in {msg:?}");
        assert!(!msg.contains("hunter2"), "{msg}");
    }
}

/// An unreachable admin database does not fail config load; calls fail fast and
/// retryably. Needs no database.
#[tokio::test]
async fn unreachable_database_is_a_quick_retryable_error() {
    // A port nothing listens on: bind, read the port, close.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let dir = tempfile::tempdir().unwrap();
    let url_file = dir.path().join("admin-url");
    std::fs::write(
        &url_file,
        format!("postgres://admin:hunter2@127.0.0.1:{port}/x"),
    )
    .unwrap();
    private(&url_file);
    let d = PostgresDestination::new(&spec(json!({
        "host": "127.0.0.1", "port": port, "database": "orders", "admin_url_file": url_file,
        "scope_roles": {"db:read": ["app_readonly"], "db:write": []},
        "connect_timeout_secs": 1
    })))
    .unwrap();

    let grant = GrantId::generate();
    let started = Instant::now();
    let err = try_issue(&d, &grant, &["db:read"], 600, now())
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let DestinationError::Upstream { message, retryable } = &err else {
        panic!("{err:?}")
    };
    assert!(retryable, "{err:?}");
    assert!(
        message.contains("no admin connection within 1s"),
        "{message}"
    );
    assert!(!message.contains("hunter2"), "{message}");

    let err = revoke(&d, &grant, "lanyard_abc").await.unwrap_err();
    assert!(
        matches!(
            err,
            DestinationError::Upstream {
                retryable: true,
                ..
            }
        ),
        "{err:?}"
    );
    let err = try_renew(&d, &grant, "lanyard_abc", 600, now())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            DestinationError::Upstream {
                retryable: true,
                ..
            }
        ),
        "{err:?}"
    );
}

/// Make `path` readable by its owner only, as an admin URL file must be.
fn private(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}
