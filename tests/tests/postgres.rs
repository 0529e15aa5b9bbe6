//! Two lanyard replicas sharing one PostgreSQL database: configuration made through one
//! is used by the other, grants issued by one are released through the other, and the
//! audit chain stays linear. Runs when `LANYARD_TEST_PG_URL` is set (`.ci/run` starts a
//! throwaway server); with `LANYARD_REQUIRE_PG=1` a missing URL is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use lanyard_proto::v1 as pb;
use lanyard_testkit::{KeyAlg, Lanyard, LanyardOptions, TestIssuer, eventually};

/// A fresh database on the test server, so runs never share state.
async fn fresh_database() -> Option<String> {
    let url = pg_url()?;
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let name = format!("lanyard_e2e_{}_{n}", std::process::id());
    for sql in [
        format!("DROP DATABASE IF EXISTS {name}"),
        format!("CREATE DATABASE {name}"),
    ] {
        let out = tokio::process::Command::new("psql")
            .arg(&url)
            .arg("-qc")
            .arg(sql)
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let base = url.rsplit_once('/').unwrap().0;
    Some(format!("{base}/{name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_postgres_database() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let issuer = TestIssuer::start(KeyAlg::Es256).await;
    let opts = LanyardOptions {
        policy: Some(POLICY.into()),
        postgres_url: Some(url),
        ..Default::default()
    };
    let a = Lanyard::start(opts.clone()).await;
    let b = Lanyard::start(opts).await;
    configure(&a, &issuer, Keys::JwksUrl, KeyAlg::Es256, true).await;
    // Replica B picks the configuration up from the shared store.
    let mut cb = b.exchange().await;
    let granted = eventually("replica B serves the destination configured on A", || {
        let mut cb = cb.clone();
        let token = issuer.mint(&claims(&issuer, "builder", "run-7"));
        async move { cb.exchange(exchange_req(token, &["read"])).await.ok() }
    })
    .await
    .into_inner();
    // The replay cache is shared: a token used at B is refused at A.
    let token = issuer.mint(&claims(&issuer, "builder", "run-7"));
    cb.exchange(exchange_req(token.clone(), &["read"]))
        .await
        .unwrap();
    let err = a
        .exchange()
        .await
        .exchange(exchange_req(token, &["read"]))
        .await
        .unwrap_err();
    assert_eq!(lanyard_testkit::reason(&err), "TOKEN_REPLAYED");
    // A grant issued by B is released through A.
    let rel = a
        .exchange()
        .await
        .release(pb::ReleaseRequest {
            grant_id: granted.grant_id.clone(),
            subject_token: issuer.mint(&claims(&issuer, "builder", "run-7")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rel.status, "released");
    let g = b
        .admin()
        .await
        .get_grant(pb::GetRequest {
            name: granted.grant_id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.status, "released");
    // Both replicas wrote to one linear chain.
    let v = b
        .audit()
        .await
        .verify(pb::VerifyRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(v.ok, "{v:?}");
    assert!(v.checked >= 6, "{v:?}");
}

/// A revocation with a deny entry made through one replica reaches grants the other
/// replica issued before it saw the entry: the job's sweep takes them in, and the
/// revoked workload's tokens are refused by both once they have reloaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_entry_sweeps_grants_another_replica_issued_meanwhile() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let issuer = TestIssuer::start(KeyAlg::Es256).await;
    let opts = LanyardOptions {
        policy: Some(POLICY.into()),
        postgres_url: Some(url),
        extra_config: "[revocation]\npoll_interval = \"100ms\"\n".into(),
        ..Default::default()
    };
    let a = Lanyard::start(opts.clone()).await;
    let b = Lanyard::start(opts).await;
    configure(&a, &issuer, Keys::JwksUrl, KeyAlg::Es256, false).await;
    let mut cb = b.exchange().await;
    eventually("replica B serves the destination configured on A", || {
        let mut cb = cb.clone();
        let token = issuer.mint(&claims(&issuer, "builder", "run-1"));
        async move { cb.exchange(exchange_req(token, &["read"])).await.ok() }
    })
    .await;
    let mut stream = a
        .admin()
        .await
        .revoke(pb::RevokeRequest {
            selector: Some(pb::RevokeSelector {
                selector: Some(pb::revoke_selector::Selector::WorkloadId(
                    "spiffe://lanyard.local/ci/builder".into(),
                )),
            }),
            reason: "replicas".into(),
            deny_seconds: 3600,
        })
        .await
        .unwrap()
        .into_inner();
    let job = match stream.message().await.unwrap().unwrap().event {
        Some(pb::revoke_event::Event::Job(j)) => j,
        other => panic!("expected the job, got {other:?}"),
    };
    // Right away, B has most likely not reloaded yet and still issues.
    let late = cb
        .exchange(exchange_req(
            issuer.mint(&claims(&issuer, "builder", "run-2")),
            &["read"],
        ))
        .await;
    match late {
        Ok(resp) => {
            let id = resp.into_inner().grant_id;
            eventually("the sweep revokes the grant B issued meanwhile", || {
                let (a, id) = (&a, id.clone());
                async move {
                    let g = a
                        .admin()
                        .await
                        .get_grant(pb::GetRequest { name: id })
                        .await
                        .unwrap()
                        .into_inner();
                    (g.status == "revoked").then_some(())
                }
            })
            .await;
        }
        Err(e) => assert_eq!(lanyard_testkit::reason(&e), "WORKLOAD_DENIED"),
    }
    let done = eventually("the job finishes after its sweep", || {
        let (a, id) = (&a, job.id.clone());
        async move {
            let r = a
                .admin()
                .await
                .get_revocation(pb::GetRevocationRequest {
                    job_id: id,
                    include_receipts: false,
                })
                .await
                .unwrap()
                .into_inner();
            let j = r.job.unwrap();
            (j.state == "done").then_some(j)
        }
    })
    .await;
    assert!(done.matched >= 1);
    let err = eventually("B refuses the workload too", || {
        let mut cb = cb.clone();
        let token = issuer.mint(&claims(&issuer, "builder", "run-3"));
        async move { cb.exchange(exchange_req(token, &["read"])).await.err() }
    })
    .await;
    assert_eq!(lanyard_testkit::reason(&err), "WORKLOAD_DENIED");
}

/// A PostgreSQL server of this test's own, so it can be stopped and started.
struct OwnPostgres {
    root: String,
    bin: String,
    port: String,
    url: String,
}

impl OwnPostgres {
    async fn start() -> OwnPostgres {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../.ci/pg-start.sh");
        let out = tokio::process::Command::new("bash")
            .arg(script)
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")).map(str::to_string))
                .unwrap()
        };
        let url = get("LANYARD_TEST_PG_URL");
        let port = url
            .rsplit(':')
            .next()
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .to_string();
        OwnPostgres {
            root: get("PGROOT"),
            bin: get("PGBIN"),
            port,
            url,
        }
    }

    async fn pg_ctl(&self, args: &[&str]) {
        let ctl = format!("{}/pg_ctl", self.bin);
        let out = tokio::process::Command::new("runuser")
            .args([
                "-u",
                "postgres",
                "--",
                &ctl,
                "-D",
                &format!("{}/data", self.root),
            ])
            .args(args)
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stop the server ("fast": connections are cut, committed data is kept, which
    /// matters because pg-start.sh runs with synchronous_commit=off).
    async fn stop(&self) {
        self.pg_ctl(&["-m", "fast", "-w", "stop"]).await;
    }

    async fn restart(&self) {
        let opts = format!(
            "-h 127.0.0.1 -p {} -k {} -c fsync=off",
            self.port, self.root
        );
        let log = format!("{}/server.log", self.root);
        self.pg_ctl(&["-l", &log, "-w", "-t", "30", "-o", &opts, "start"])
            .await;
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../.ci/pg-stop.sh");
        let _ = std::process::Command::new("bash")
            .arg(script)
            .arg(&self.root)
            .arg(&self.bin)
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_is_refused_cleanly_and_recovers() {
    if pg_url().is_none() {
        return;
    }
    let pg = OwnPostgres::start().await;
    let issuer = TestIssuer::start(KeyAlg::Es256).await;
    let l = Lanyard::start(LanyardOptions {
        policy: Some(POLICY.into()),
        postgres_url: Some(pg.url.clone()),
        ..Default::default()
    })
    .await;
    configure(&l, &issuer, Keys::JwksUrl, KeyAlg::Es256, false).await;
    let mut c = l.exchange().await;
    c.exchange(exchange_req(
        issuer.mint(&claims(&issuer, "builder", "r")),
        &["read"],
    ))
    .await
    .unwrap();

    pg.stop().await;
    let err = c
        .exchange(exchange_req(
            issuer.mint(&claims(&issuer, "builder", "r")),
            &["read"],
        ))
        .await
        .unwrap_err();
    assert_eq!(
        lanyard_testkit::reason(&err),
        "STORE_UNAVAILABLE",
        "{}",
        err.message()
    );
    assert_eq!(err.code(), tonic::Code::Unavailable);
    let err = l
        .admin()
        .await
        .list_grants(pb::ListGrantsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(lanyard_testkit::reason(&err), "STORE_UNAVAILABLE");

    pg.restart().await;
    eventually("exchanges work again once the database is back", || {
        let mut c = c.clone();
        let token = issuer.mint(&claims(&issuer, "builder", "r"));
        async move { c.exchange(exchange_req(token, &["read"])).await.ok() }
    })
    .await;
    // Nothing half-written: the chain is intact and holds both grants.
    let v = l
        .audit()
        .await
        .verify(pb::VerifyRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(v.ok, "{v:?}");
    let grants = l
        .admin()
        .await
        .list_grants(pb::ListGrantsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .grants;
    assert_eq!(grants.len(), 2);
}
