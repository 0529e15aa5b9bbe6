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
    let Ok(url) = std::env::var("LANYARD_TEST_PG_URL") else {
        assert!(
            std::env::var("LANYARD_REQUIRE_PG").is_err(),
            "LANYARD_REQUIRE_PG is set but LANYARD_TEST_PG_URL is not"
        );
        eprintln!("skipped: LANYARD_TEST_PG_URL not set");
        return None;
    };
    let name = format!("lanyard_e2e_{}", std::process::id());
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
        .verify(pb::VerifyRequest { after_seq: 0 })
        .await
        .unwrap()
        .into_inner();
    assert!(v.ok, "{v:?}");
    assert!(v.checked >= 6, "{v:?}");
}
