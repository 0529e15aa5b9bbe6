//! Revoke everywhere, end to end through the `lanyard` CLI and gRPC: every selector,
//! signed receipts, deny entries, the issuer kill switch, inventory, the audit trail,
//! and a revocation that survives `kill -9` in the middle of its fan-out (with the
//! PostgreSQL destination, against a real server).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use lanyard_proto::v1 as pb;
use lanyard_testkit::{KeyAlg, Lanyard, LanyardOptions, TestIssuer, eventually, reason};
use serde_json::{Value, json};

const W: &str = "spiffe://lanyard.local/ci/";

async fn grant(l: &Lanyard, issuer: &TestIssuer, sub: &str, run: &str) -> pb::ExchangeResponse {
    l.exchange()
        .await
        .exchange(exchange_req(
            issuer.mint(&claims(issuer, sub, run)),
            &["read"],
        ))
        .await
        .unwrap()
        .into_inner()
}

async fn status(l: &Lanyard, id: &str) -> String {
    l.admin()
        .await
        .get_grant(pb::GetRequest { name: id.into() })
        .await
        .unwrap()
        .into_inner()
        .status
}

/// Run `lanyard revoke ...` with JSON output and check the receipts it printed: each
/// is signed by lanyard and restates what the table says.
async fn revoke_cli(l: &Lanyard, args: &[&str]) -> Value {
    let mut all = vec!["revoke"];
    all.extend_from_slice(args);
    let out = admin_cli_json(l, &all).await;
    for r in out["receipts"].as_array().unwrap() {
        let claims = verify_receipt(l, r["signature"].as_str().unwrap()).await;
        assert_eq!(claims["job_id"], out["job"]["id"]);
        assert_eq!(claims["outcome"], r["outcome"]);
        assert_eq!(claims["destination"], r["destination"]);
        assert_eq!(claims["grant_ids"], r["grant_ids"]);
        assert_eq!(claims["seq"], r["seq"]);
    }
    out
}

fn receipt_grants(out: &Value) -> Vec<String> {
    let mut ids: Vec<String> = out["receipts"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["grant_ids"].as_array().unwrap().clone())
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn every_selector_revokes_end_to_end_through_the_cli() {
    let (l, issuer) = start(KeyAlg::Es256, Keys::JwksUrl).await;
    let a1 = grant(&l, &issuer, "builder", "run-1").await;
    let a2 = grant(&l, &issuer, "builder", "run-1").await;
    let a3 = grant(&l, &issuer, "builder", "run-2").await;
    let t1 = grant(&l, &issuer, "tester", "run-3").await;
    let t2 = grant(&l, &issuer, "tess", "run-4").await;
    let b9 = grant(&l, &issuer, "bystander", "run-9").await;

    // One grant.
    let out = revoke_cli(&l, &["--grant", &a1.grant_id, "--reason", "one grant"]).await;
    assert_eq!(out["job"]["matched"], 1);
    assert_eq!(out["summary"]["revoked"], 1);
    assert_eq!(out["summary"]["state"], "done");
    assert_eq!(receipt_grants(&out), vec![a1.grant_id.clone()]);
    assert_eq!(status(&l, &a1.grant_id).await, "revoked");
    assert_eq!(status(&l, &a2.grant_id).await, "active");

    // The holder can no longer renew or release it.
    let mut c = l.exchange().await;
    let err = c
        .renew(pb::RenewRequest {
            grant_id: a1.grant_id.clone(),
            subject_token: issuer.mint(&claims(&issuer, "builder", "run-1")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "GRANT_REVOKED");
    let err = c
        .release(pb::ReleaseRequest {
            grant_id: a1.grant_id.clone(),
            subject_token: issuer.mint(&claims(&issuer, "builder", "run-1")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "GRANT_REVOKED");

    // A task.
    let out = revoke_cli(&l, &["--task", "run-1", "--reason", "task"]).await;
    assert_eq!(receipt_grants(&out), vec![a2.grant_id.clone()]);
    // A workload.
    let out = revoke_cli(
        &l,
        &["--workload", &format!("{W}builder"), "--reason", "wl"],
    )
    .await;
    assert_eq!(receipt_grants(&out), vec![a3.grant_id.clone()]);
    assert_eq!(out["summary"]["destinations"][0]["destination"], "orders");
    assert_eq!(out["summary"]["destinations"][0]["revoked"], 1);
    // A workload prefix: tester and tess, not bystander.
    let out = revoke_cli(
        &l,
        &[
            "--workload-prefix",
            &format!("{W}tes"),
            "--reason",
            "prefix",
        ],
    )
    .await;
    let mut want = vec![t1.grant_id.clone(), t2.grant_id.clone()];
    want.sort();
    assert_eq!(receipt_grants(&out), want);
    assert_eq!(status(&l, &b9.grant_id).await, "active");
    // A destination.
    let d1 = grant(&l, &issuer, "deployer", "run-5").await;
    let out = revoke_cli(&l, &["--destination", "orders", "--reason", "dest"]).await;
    let mut want = vec![b9.grant_id.clone(), d1.grant_id.clone()];
    want.sort();
    assert_eq!(receipt_grants(&out), want);
    // An issuer.
    let i1 = grant(&l, &issuer, "builder", "run-6").await;
    let out = revoke_cli(&l, &["--issuer", "ci", "--reason", "issuer"]).await;
    assert_eq!(receipt_grants(&out), vec![i1.grant_id.clone()]);
    // Nothing left to match: a job with no receipts, done at once.
    let out = revoke_cli(&l, &["--issuer", "ci", "--reason", "again"]).await;
    assert_eq!(out["job"]["matched"], 0);
    assert_eq!(out["summary"]["state"], "done");
    assert!(out["receipts"].as_array().unwrap().is_empty());

    // Bad requests are refused with their reason.
    let (ok, _, stderr) =
        admin_cli(&l, &["revoke", "--grant", "not-a-grant", "--reason", "x"]).await;
    assert!(!ok);
    assert!(stderr.contains("GRANT_NOT_FOUND"), "{stderr}");
    let (ok, _, stderr) = admin_cli(
        &l,
        &[
            "revoke",
            "--task",
            "run-1",
            "--reason",
            "x",
            "--deny-for",
            "1h",
        ],
    )
    .await;
    assert!(!ok);
    assert!(stderr.contains("deny entry needs a workload"), "{stderr}");
    let (ok, _, stderr) = admin_cli(&l, &["revoke", "--workload", "x"]).await;
    assert!(!ok, "a reason is required");
    assert!(stderr.contains("--reason"), "{stderr}");

    // Jobs are listed and readable later, receipts included.
    let list = admin_cli_json(&l, &["revoke", "list"]).await;
    let jobs = list["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 7);
    assert_eq!(jobs[0]["reason"], "again", "newest first");
    let id = jobs[1]["id"].as_str().unwrap();
    let shown = admin_cli_json(&l, &["revoke", "status", id, "--receipts"]).await;
    assert_eq!(shown["job"]["state"], "done");
    assert_eq!(shown["job"]["destinations"][0]["revoked"], 1);
    assert_eq!(shown["receipts"].as_array().unwrap().len(), 1);
    let (ok, table, _) = admin_cli(&l, &["revoke", "status", id]).await;
    assert!(ok);
    assert!(
        table.contains("DESTINATION") && table.contains("orders"),
        "{table}"
    );

    // The audit trail: a request, receipts and a completion per job, on a valid chain.
    let requested = payloads_of(&l, "revocation.requested").await;
    assert_eq!(requested.len(), 7);
    assert_eq!(requested[0]["detail"]["selector"]["kind"], "grant");
    assert_eq!(requested[0]["detail"]["matched"], 1);
    assert_eq!(requested[0]["detail"]["reason"], "one grant");
    assert!(requested[0]["actor"].as_str().unwrap().starts_with("uid:"));
    let receipts = payloads_of(&l, "revocation.receipt").await;
    let grants: i64 = receipts
        .iter()
        .map(|r| r["detail"]["grants"].as_i64().unwrap())
        .sum();
    assert_eq!(grants, 8, "one receipt entry per revoked grant");
    assert_eq!(receipts[0]["grant_id"], a1.grant_id.as_str());
    assert_eq!(receipts[0]["detail"]["outcome"], "revoked");
    assert_eq!(payloads_of(&l, "revocation.completed").await.len(), 6);
    assert!(verify_chain(&l).await.ok);

    // The queue is empty and the counters moved.
    let metrics = reqwest::get(format!("{}/metrics", l.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("lanyard_revocation_queue_depth 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "lanyard_revocation_grants_total{destination=\"orders\",outcome=\"revoked\"} 8"
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn deny_entries_and_the_issuer_kill_switch() {
    let (l, issuer) = start(KeyAlg::Es256, Keys::JwksUrl).await;
    let g1 = grant(&l, &issuer, "builder", "run-1").await;
    let other = grant(&l, &issuer, "bystander", "run-2").await;
    let out = revoke_cli(
        &l,
        &[
            "--workload",
            &format!("{W}builder"),
            "--reason",
            "stolen token",
            "--deny-for",
            "1h",
        ],
    )
    .await;
    assert_eq!(out["job"]["deny_entry"], format!("workload:{W}builder"));
    assert_eq!(receipt_grants(&out), vec![g1.grant_id.clone()]);
    let mut c = l.exchange().await;
    let err = c
        .exchange(exchange_req(
            issuer.mint(&claims(&issuer, "builder", "run-1")),
            &["read"],
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "WORKLOAD_DENIED");
    assert!(err.message().contains("stolen") || err.message().contains("deny entry"));
    let denied = payloads_of(&l, "exchange.denied").await;
    assert_eq!(denied.last().unwrap()["reason"], "WORKLOAD_DENIED");
    // The message names the entry, not why or until when.
    assert!(
        err.message().contains(&format!("workload:{W}builder")),
        "{}",
        err.message()
    );
    assert!(!err.message().contains("stolen"), "{}", err.message());
    // A denied workload cannot act for another either (RFC 8693 actor_token).
    let err = c
        .exchange(pb::ExchangeRequest {
            actor_token: issuer.mint(&claims(&issuer, "builder", "run-1")),
            actor_token_type: "urn:ietf:params:oauth:token-type:jwt".into(),
            ..exchange_req(
                issuer.mint(&claims(&issuer, "bystander", "run-2")),
                &["read"],
            )
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "WORKLOAD_DENIED");
    assert!(
        err.message().starts_with("actor_token:"),
        "{}",
        err.message()
    );
    // A destination with active grants cannot be deleted out from under them.
    let (ok, _, stderr) = admin_cli(&l, &["destination", "delete", "orders"]).await;
    assert!(!ok && stderr.contains("active grants"), "{stderr}");
    // Other workloads are unaffected.
    grant(&l, &issuer, "bystander", "run-3").await;
    // The entry is listed, then lifted.
    let list = admin_cli_json(&l, &["deny", "list"]).await;
    assert_eq!(list["entries"][0]["name"], format!("workload:{W}builder"));
    assert!(list["entries"][0]["expires_at"].is_string());
    admin_cli_json(&l, &["deny", "lift", &format!("workload:{W}builder")]).await;
    grant(&l, &issuer, "builder", "run-1").await;

    // The kill switch: every grant from the issuer is revoked and its tokens refused.
    let out = admin_cli_json(
        &l,
        &["issuer", "distrust", "ci", "--reason", "issuer key leaked"],
    )
    .await;
    assert_eq!(out["job"]["deny_entry"], "issuer:ci");
    assert_eq!(out["summary"]["matched"], 3);
    assert_eq!(status(&l, &other.grant_id).await, "revoked");
    let err = c
        .exchange(exchange_req(
            issuer.mint(&claims(&issuer, "bystander", "run-2")),
            &["read"],
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "ISSUER_DISTRUSTED");
    let list = admin_cli_json(&l, &["deny", "list"]).await;
    assert!(list["entries"][0]["expires_at"].is_null(), "until lifted");
    // A later, shorter deny for the same issuer does not shorten the kill switch.
    admin_cli_json(
        &l,
        &[
            "revoke",
            "--issuer",
            "ci",
            "--reason",
            "again",
            "--deny-for",
            "1m",
        ],
    )
    .await;
    let list = admin_cli_json(&l, &["deny", "list"]).await;
    assert!(
        list["entries"][0]["expires_at"].is_null(),
        "still until lifted"
    );
    let (ok, _, stderr) = admin_cli(&l, &["issuer", "distrust", "nope", "--reason", "x"]).await;
    assert!(!ok && stderr.contains("NOT_FOUND"), "{stderr}");
    admin_cli_json(&l, &["deny", "lift", "issuer:ci"]).await;
    grant(&l, &issuer, "bystander", "run-2").await;
    let lifted = payloads_of(&l, "deny_entry.delete").await;
    assert_eq!(lifted.len(), 2);
}

#[tokio::test]
async fn inventory_shows_what_a_workload_can_reach_and_holds() {
    let (l, issuer) = start(KeyAlg::Es256, Keys::JwksUrl).await;
    let g1 = grant(&l, &issuer, "builder", "run-1").await;
    let inv = eventually("the workload's claims are recorded", || async {
        let inv = admin_cli_json(&l, &["inventory", &format!("{W}builder")]).await;
        inv["claims_seen_at"].is_string().then_some(inv)
    })
    .await;
    assert_eq!(inv["issuer"], "ci");
    let orders = &inv["destinations"][0];
    assert_eq!(orders["destination"], "orders");
    assert_eq!(orders["allowed"], true);
    assert_eq!(
        orders["scopes"],
        json!(["read", "write"]),
        "admin is not allowed"
    );
    assert_eq!(orders["determining_policies"], json!(["ci-orders"]));
    let grants = inv["grants"].as_array().unwrap();
    assert_eq!(grants.len(), 1);
    assert_eq!(grants[0]["id"], g1.grant_id.as_str());
    // A workload outside the policy's reach, never seen.
    let inv = admin_cli_json(&l, &["inventory", "spiffe://lanyard.local/other/x"]).await;
    assert!(inv["claims_seen_at"].is_null());
    assert_eq!(inv["destinations"][0]["allowed"], false);
    assert!(inv["grants"].as_array().unwrap().is_empty());
    // The table names the grant and the reach.
    let (ok, table, _) = admin_cli(&l, &["inventory", &format!("{W}builder")]).await;
    assert!(ok);
    assert!(
        table.contains(&g1.grant_id) && table.contains("read,write"),
        "{table}"
    );
    let (ok, _, stderr) = admin_cli(&l, &["inventory", ""]).await;
    assert!(
        !ok && stderr.contains("workload_id is required"),
        "{stderr}"
    );
}

// === PostgreSQL destination and kill -9 ===

async fn pg(url: &str) -> sqlx::PgConnection {
    use sqlx::Connection;
    sqlx::PgConnection::connect(url).await.unwrap()
}

async fn exec(conn: &mut sqlx::PgConnection, sql: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

const PG_POLICY: &str = r#"
@id("ci-app-db")
permit (principal, action, resource == Lanyard::Destination::"app-db")
when { principal.id like "spiffe://lanyard.local/ci/*" };
@id("ci-orders")
permit (principal, action, resource == Lanyard::Destination::"orders")
when { principal.id like "spiffe://lanyard.local/ci/*" && ["read", "write"].containsAll(context.scopes) };
"#;

/// A database with a table and two NOLOGIN group roles (read: SELECT on `items`;
/// write: also INSERT, and CREATE in schema `work`) for a `postgres` destination named
/// `app-db`, and the admin URL in a file.
struct PgFixture {
    url: String,
    db: String,
    db_url: String,
    ro: String,
    rw: String,
    host: String,
    port: u16,
    url_file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl PgFixture {
    async fn new(url: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let tag = format!("{}_{}_{n}", std::process::id(), now() % 100_000);
        let (db, ro, rw) = (
            format!("app_{tag}"),
            format!("app_ro_{tag}"),
            format!("app_rw_{tag}"),
        );
        let mut admin = pg(url).await;
        exec(&mut admin, &format!("CREATE DATABASE {db}")).await;
        let db_url = format!("{}/{db}", url.rsplit_once('/').unwrap().0);
        let mut dba = pg(&db_url).await;
        exec(
            &mut dba,
            &format!(
                "CREATE TABLE items (id int); INSERT INTO items VALUES (1); \
                 CREATE ROLE {ro} NOLOGIN; GRANT SELECT ON items TO {ro}; \
                 CREATE ROLE {rw} NOLOGIN; GRANT SELECT, INSERT ON items TO {rw}; \
                 CREATE SCHEMA work; GRANT USAGE, CREATE ON SCHEMA work TO {rw};"
            ),
        )
        .await;
        let dir = tempfile::tempdir().unwrap();
        let url_file = dir.path().join("admin-url");
        std::fs::write(&url_file, &db_url).unwrap();
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&url_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let rest = url.split_once('@').unwrap().1;
        let hp = rest.split_once('/').unwrap().0;
        let (h, p) = hp.rsplit_once(':').unwrap();
        PgFixture {
            url: url.to_owned(),
            db,
            db_url,
            ro,
            rw,
            host: h.to_owned(),
            port: p.parse().unwrap(),
            url_file,
            _dir: dir,
        }
    }

    /// Register the test issuer (`configure`) and the `app-db` destination.
    async fn configure(&self, l: &Lanyard, issuer: &TestIssuer) {
        configure(l, issuer, Keys::JwksUrl, KeyAlg::Es256, false).await;
        l.admin()
            .await
            .put_destination(pb::PutDestinationRequest {
                destination: Some(pb::Destination {
                    name: "app-db".into(),
                    kind: "postgres".into(),
                    default_ttl_seconds: 300,
                    max_ttl_seconds: 600,
                    scopes: vec!["db:read".into(), "db:write".into()],
                    settings: Some(json_struct(json!({
                        "host": self.host, "port": self.port, "database": self.db,
                        "admin_url_file": self.url_file,
                        "scope_roles": {"db:read": [self.ro], "db:write": [self.rw]},
                    }))),
                    ..Default::default()
                }),
                expected_revision: None,
            })
            .await
            .unwrap();
    }

    /// Whether a role exists.
    async fn role_exists(&self, role: &str) -> bool {
        let mut c = pg(&self.url).await;
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_roles WHERE rolname = $1")
            .bind(role)
            .fetch_one(&mut c)
            .await
            .unwrap();
        n > 0
    }

    async fn drop_all(self) {
        let mut admin = pg(&self.url).await;
        exec(
            &mut admin,
            &format!("DROP DATABASE {} WITH (FORCE)", self.db),
        )
        .await;
        exec(
            &mut admin,
            &format!(
                "DROP ROLE IF EXISTS {}; DROP ROLE IF EXISTS {}",
                self.ro, self.rw
            ),
        )
        .await;
    }
}

fn db_login(resp: &pb::ExchangeResponse) -> (String, String) {
    let Some(pb::credential::Kind::Database(d)) = resp.credential.as_ref().unwrap().kind.as_ref()
    else {
        panic!("expected database credentials, got {:?}", resp.credential);
    };
    assert!(
        d.password.len() >= 32,
        "a random password of 32+ characters"
    );
    let url = format!(
        "postgres://{}:{}@{}:{}/{}",
        d.username, d.password, d.host, d.port, d.database
    );
    (url, d.username.clone())
}

/// A `postgres` grant that expires is revoked at the database by the expiry sweep: its
/// role is dropped and its open session ended, and the job is on record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_database_grants_are_revoked_at_the_database() {
    let Some(url) = pg_url() else {
        return;
    };
    let fx = PgFixture::new(&url).await;
    let issuer = TestIssuer::start(KeyAlg::Es256).await;
    let l = Lanyard::start(LanyardOptions {
        policy: Some(PG_POLICY.into()),
        extra_config: "[revocation]\nexpiry_sweep_interval = \"1s\"\npoll_interval = \"100ms\"\n"
            .into(),
        ..Default::default()
    })
    .await;
    fx.configure(&l, &issuer).await;
    let resp = l
        .exchange()
        .await
        .exchange(pb::ExchangeRequest {
            subject_token: issuer.mint(&claims(&issuer, "app", "run-1")),
            destination: "app-db".into(),
            scopes: vec!["db:read".into()],
            requested_ttl_seconds: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (login, role) = db_login(&resp);
    let mut session = pg(&login).await;
    assert!(fx.role_exists(&role).await);
    eventually("the expired grant's role is dropped", || async {
        (!fx.role_exists(&role).await).then_some(())
    })
    .await;
    assert!(sqlx::query("SELECT 1").execute(&mut session).await.is_err());
    assert_eq!(status(&l, &resp.grant_id).await, "expired");
    let jobs = admin_cli_json(&l, &["revoke", "list"]).await;
    let job = &jobs["jobs"][0];
    assert_eq!(job["requested_by"], "lanyard:expiry");
    assert_eq!(
        job["selector"],
        json!({"kind": "destination", "value": "app-db"})
    );
    eventually("the clean-up job finishes", || async {
        let j = admin_cli_json(&l, &["revoke", "status", job["id"].as_str().unwrap()]).await;
        (j["job"]["state"] == "done").then_some(())
    })
    .await;
    drop(session);
    fx.drop_all().await;
}

/// The credential logs in and can do only what its scope allows; a revocation job is
/// written, then lanyard is killed with SIGKILL while the database destination is still
/// working on it; after a restart the job resumes and finishes: every grant gets its
/// receipt, the database roles are gone and their open sessions ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_survives_kill_9_in_the_middle_of_fan_out() {
    let Some(url) = pg_url() else {
        return;
    };
    // A database and group roles for the destination, unique to this run.
    let fx = PgFixture::new(&url).await;
    let (host, port, db) = (fx.host.clone(), fx.port, fx.db.clone());
    let issuer = TestIssuer::start(KeyAlg::Es256).await;
    let opts = LanyardOptions {
        policy: Some(PG_POLICY.into()),
        extra_config: "[revocation]\nlease = \"2s\"\npoll_interval = \"100ms\"\n".into(),
        ..Default::default()
    };
    let mut l = Lanyard::start(opts.clone()).await;
    fx.configure(&l, &issuer).await;
    let db_url = fx.db_url.clone();
    let mut dba = pg(&db_url).await;
    let mut c = l.exchange().await;
    let db_grant = |scope: &'static str| {
        let token = issuer.mint(&claims(&issuer, "app", "run-1"));
        let mut c = c.clone();
        async move {
            c.exchange(pb::ExchangeRequest {
                subject_token: token,
                destination: "app-db".into(),
                scopes: vec![scope.into()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    let reader = db_grant("db:read").await;
    let writer = db_grant("db:write").await;
    let login = |resp: &pb::ExchangeResponse| {
        if let Some(pb::credential::Kind::Database(d)) =
            resp.credential.as_ref().unwrap().kind.as_ref()
        {
            assert_eq!(
                (d.host.as_str(), d.port, d.database.as_str()),
                (host.as_str(), u32::from(port), db.as_str())
            );
        }
        db_login(resp)
    };
    let (reader_url, reader_role) = login(&reader);
    let (writer_url, writer_role) = login(&writer);
    // The read credential reads and cannot write; the write one can.
    let mut reader_conn = pg(&reader_url).await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM items")
        .fetch_one(&mut reader_conn)
        .await
        .unwrap();
    assert_eq!(n, 1);
    let err = sqlx::query("INSERT INTO items VALUES (2)")
        .execute(&mut reader_conn)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("permission denied"), "{err}");
    let mut writer_conn = pg(&writer_url).await;
    exec(
        &mut writer_conn,
        "INSERT INTO items VALUES (2); CREATE TABLE work.scratch (x int)",
    )
    .await;
    drop(writer_conn);
    // Three jwt grants of the same workload too, revoked by the same job.
    for _ in 0..3 {
        c.exchange(exchange_req(
            issuer.mint(&claims(&issuer, "app", "run-1")),
            &["read"],
        ))
        .await
        .unwrap();
    }

    // Hold a lock on the table the write role owns: its revocation stops at
    // REASSIGN OWNED until the lock goes, so the job is mid-fan-out for certain.
    let mut locker = pg(&db_url).await;
    exec(
        &mut locker,
        "BEGIN; LOCK TABLE work.scratch IN ACCESS EXCLUSIVE MODE",
    )
    .await;

    let mut stream = l
        .admin()
        .await
        .revoke(pb::RevokeRequest {
            selector: Some(pb::RevokeSelector {
                selector: Some(pb::revoke_selector::Selector::WorkloadId(format!("{W}app"))),
            }),
            reason: "kill -9 test".into(),
            deny_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let job = match stream.message().await.unwrap().unwrap().event {
        Some(pb::revoke_event::Event::Job(j)) => j,
        other => panic!("expected the job first, got {other:?}"),
    };
    assert_eq!(job.matched, 5);
    // Wait for the receipts that can be written: the 3 jwt grants and the read role.
    let mut before = Vec::new();
    while before
        .iter()
        .map(|r: &pb::RevocationReceipt| r.grant_ids.len())
        .sum::<usize>()
        < 4
    {
        match stream.message().await.unwrap().unwrap().event {
            Some(pb::revoke_event::Event::Receipt(r)) => before.push(r),
            other => panic!("expected receipts, got {other:?}"),
        }
    }
    // The read role's open session was ended.
    assert!(
        sqlx::query("SELECT 1")
            .execute(&mut reader_conn)
            .await
            .is_err(),
        "a revoked role's session must not survive"
    );
    // The write role is blocked on the lock: kill lanyard now.
    let data = {
        l.keep_dir();
        l.data_dir().to_path_buf()
    };
    drop(stream);
    l.kill().await;

    // Restart on the same data; let the destination finish.
    let l = Lanyard::start(LanyardOptions {
        data_dir: Some(data),
        ..opts
    })
    .await;
    exec(&mut locker, "ROLLBACK").await;
    let mut watch = l
        .admin()
        .await
        .watch_revocation(pb::GetRequest {
            name: job.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut after = Vec::new();
    let summary = loop {
        match watch.message().await.unwrap().unwrap().event {
            Some(pb::revoke_event::Event::Job(_)) => {}
            Some(pb::revoke_event::Event::Receipt(r)) => after.push(r),
            Some(pb::revoke_event::Event::Summary(s)) => break s,
            Some(pb::revoke_event::Event::KillSwitch(k)) => panic!("unexpected {k:?}"),
            None => panic!("empty event"),
        }
    };
    assert_eq!(summary.matched, 5);
    // The killed server's database session may still be running the write role's
    // REASSIGN when the lock goes; the resumed attempt can then fail on the concurrent
    // change and is retried. Either way the job finishes by itself.
    for r in after.iter().filter(|r| r.outcome == "failed") {
        eprintln!("a failed attempt, retried: {}", r.detail);
        assert_eq!(r.grant_ids, vec![writer.grant_id.clone()]);
    }
    let done = eventually("the job finishes", || async {
        let r = l
            .admin()
            .await
            .get_revocation(pb::GetRevocationRequest {
                job_id: job.id.clone(),
                include_receipts: true,
            })
            .await
            .unwrap()
            .into_inner();
        (r.job.as_ref().unwrap().state == "done").then_some(r)
    })
    .await;
    let totals = &done.job.as_ref().unwrap().destinations;
    assert_eq!(
        totals.iter().map(|d| d.revoked).sum::<u32>(),
        5,
        "{totals:?}"
    );
    assert_eq!(totals.iter().map(|d| d.failed + d.pending).sum::<u32>(), 0);
    let after = done.receipts;
    // Every grant has exactly one final receipt, the earlier ones kept as they were.
    let mut revoked: Vec<String> = after
        .iter()
        .filter(|r| r.outcome == "revoked")
        .flat_map(|r| r.grant_ids.clone())
        .collect();
    revoked.sort();
    let mut all = vec![reader.grant_id.clone(), writer.grant_id.clone()];
    all.extend(
        before
            .iter()
            .filter(|r| r.destination == "orders")
            .flat_map(|r| r.grant_ids.clone()),
    );
    all.sort();
    assert_eq!(revoked, all);
    for r in &before {
        assert!(
            after
                .iter()
                .any(|a| a.seq == r.seq && a.signature == r.signature)
        );
    }
    let writer_receipt = after
        .iter()
        .find(|r| r.outcome == "revoked" && r.grant_ids == vec![writer.grant_id.clone()])
        .unwrap();
    assert!(
        writer_receipt.detail.contains("DROP ROLE") || writer_receipt.detail.contains("dropped"),
        "{}",
        writer_receipt.detail
    );
    // The roles are gone; the table the write role made now belongs to the admin.
    for role in [&reader_role, &writer_role] {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_roles WHERE rolname = $1")
            .bind(role)
            .fetch_one(&mut dba)
            .await
            .unwrap();
        assert_eq!(n, 0, "role {role} still exists");
    }
    use sqlx::Connection as _;
    for u in [&reader_url, &writer_url] {
        assert!(
            sqlx::PgConnection::connect(u).await.is_err(),
            "a revoked role logs in"
        );
    }
    assert!(verify_chain(&l).await.ok);
    drop(dba);
    drop(locker);
    fx.drop_all().await;
}

/// A destination that is configured but cannot be loaded on the server doing the work
/// (its admin URL file is gone) fails its steps, which keep being retried, instead of
/// signing them off; an operator can give up on them, and the job finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_steps_are_retried_until_an_operator_gives_up() {
    let Some(url) = pg_url() else {
        return;
    };
    let fx = PgFixture::new(&url).await;
    let issuer = TestIssuer::start(KeyAlg::Es256).await;
    let opts = LanyardOptions {
        policy: Some(PG_POLICY.into()),
        extra_config: "[revocation]\npoll_interval = \"100ms\"\n".into(),
        ..Default::default()
    };
    let mut l = Lanyard::start(opts.clone()).await;
    fx.configure(&l, &issuer).await;
    let resp = l
        .exchange()
        .await
        .exchange(pb::ExchangeRequest {
            subject_token: issuer.mint(&claims(&issuer, "app", "run-1")),
            destination: "app-db".into(),
            scopes: vec!["db:read".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (_, role) = db_login(&resp);
    // Restart without the admin URL: the destination is stored but cannot be built.
    let data = {
        l.keep_dir();
        l.data_dir().to_path_buf()
    };
    assert_eq!(l.stop().await, Some(0));
    std::fs::remove_file(&fx.url_file).unwrap();
    let l = Lanyard::start(LanyardOptions {
        data_dir: Some(data),
        ..opts
    })
    .await;
    let (ok, stdout, stderr) = admin_cli(
        &l,
        &[
            "--output",
            "json",
            "revoke",
            "--workload",
            &format!("{W}app"),
            "--reason",
            "admin url lost",
        ],
    )
    .await;
    assert!(!ok, "a revocation with failures exits non-zero");
    assert!(stderr.contains("being retried"), "{stderr}");
    let out: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(out["summary"]["failed"], 1);
    assert_eq!(out["summary"]["state"], "running");
    let r = &out["receipts"][0];
    assert_eq!(r["outcome"], "failed");
    assert!(r["detail"].as_str().unwrap().contains("not loaded"), "{r}");
    assert!(r["retry_at"].is_string());
    assert!(fx.role_exists(&role).await, "nothing was signed off");
    let job = out["job"]["id"].as_str().unwrap().to_owned();
    // Give up.
    let (ok, _, stderr) = admin_cli(&l, &["revoke", "abandon", &job]).await;
    assert!(!ok && stderr.contains("--reason"), "{stderr}");
    let j = admin_cli_json(
        &l,
        &[
            "revoke",
            "abandon",
            &job,
            "--reason",
            "the database was decommissioned",
        ],
    )
    .await;
    assert_eq!(j["job"]["state"], "done");
    assert_eq!(j["job"]["destinations"][0]["abandoned"], 1);
    let abandoned = payloads_of(&l, "revocation.abandoned").await;
    assert_eq!(abandoned[0]["detail"]["abandoned"], 1);
    assert_eq!(
        abandoned[0]["detail"]["reason"],
        "the database was decommissioned"
    );
    let (ok, _, stderr) = admin_cli(&l, &["revoke", "abandon", &job, "--reason", "again"]).await;
    assert!(!ok && stderr.contains("done"), "{stderr}");
    let mut admin = pg(&url).await;
    let role_name = role.clone();
    fx.drop_all().await;
    exec(&mut admin, &format!("DROP ROLE IF EXISTS \"{role_name}\"")).await;
}
