//! The `gcp-sts` adapter against `lanyard_testkit::gcp`, a loopback Google STS and IAM
//! Credentials API that verify lanyard's subject token with its JWKS fetched over HTTP
//! and accept only the federated tokens they issued (PROTOCOLS.md §4.1, §4.2). Nothing
//! external is contacted.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;

use lanyard_core::{Clock, GrantId, SystemClock};
use lanyard_destination::http::is_retryable;
use lanyard_destination::{
    Credential, Destination, DestinationError, Issued, Revocability, RevokeOutcome, RevokeRequest,
};
use lanyard_destination_gcp_sts::GcpStsDestination;
use lanyard_testkit::gcp::{FEDERATED_PREFIX, FakeGcp, GcpExpect, SA_TOKEN_PREFIX};
use lanyard_testkit::minter::{self, TestMinter};
use lanyard_testkit::token_endpoint::{Answer, serve_jwks};
use serde_json::{Value, json};

const ISSUER: &str = "https://lanyard.test";
const AUD: &str = "//iam.googleapis.com/projects/42/locations/global/workloadIdentityPools/lanyard/providers/lanyard";
const SA: &str = "reader@acme.iam.gserviceaccount.com";
const WORKLOAD: &str = "spiffe://lanyard.local/k8s/prod/agent";

struct Fixture {
    keys: TestMinter,
    fake: FakeGcp,
}

async fn fixture() -> Fixture {
    let keys = TestMinter::new(ISSUER);
    let jwks_url = serve_jwks(keys.jwks()).await;
    let mut expect = GcpExpect::new(AUD, SA);
    expect.issuer = ISSUER.into();
    expect.jwks_url = jwks_url;
    expect.subject = Some(WORKLOAD.into());
    Fixture {
        keys,
        fake: FakeGcp::start(expect).await,
    }
}

impl Fixture {
    fn dest(&self, extra: Value) -> GcpStsDestination {
        let settings = minter::merged(
            json!({
                "audience": AUD,
                "sts_url": self.fake.sts_url,
                "iam_credentials_url": self.fake.iam_url,
                "max_attempts": 1,
                "timeout_secs": 1,
            }),
            &extra,
        );
        let spec = minter::spec(
            json!({
                "name": "gcp-prod", "kind": "gcp-sts", "max_ttl_secs": 7200,
                "scopes": ["storage", "bq"],
            }),
            settings,
        );
        GcpStsDestination::new(&spec, self.keys.minter.clone()).unwrap()
    }
}

async fn issue(
    d: &GcpStsDestination,
    ttl: u64,
    scopes: &[&str],
) -> Result<Issued, DestinationError> {
    minter::issue(d, WORKLOAD, ttl, scopes).await
}

fn token(i: &Issued) -> &str {
    match &i.credential {
        Credential::Bearer { token, .. } => token.expose(),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn impersonated_token_lives_as_long_as_the_grant_capped_by_max_lifetime() {
    let f = fixture().await;
    let d = f.dest(json!({
        "service_account": SA,
        "max_lifetime_secs": 900,
        "oauth_scopes_by_scope": {
            "storage": ["https://www.googleapis.com/auth/devstorage.read_only"],
            "bq": ["https://www.googleapis.com/auth/bigquery"],
        },
    }));
    assert_eq!(d.revocability(), Revocability::AtExpiry);
    let now = SystemClock.now_unix();
    let i = issue(&d, 600, &["storage"]).await.unwrap();
    assert!(token(&i).starts_with(SA_TOKEN_PREFIX));
    assert!(
        (now + 599..=now + 602).contains(&i.expires_at),
        "{}",
        i.expires_at - now
    );
    let i2 = issue(&d, 3600, &["storage", "bq"]).await.unwrap();
    assert!((now + 899..=now + 902).contains(&i2.expires_at));
    let g = f.fake.generated();
    assert_eq!(g[0]["body"]["lifetime"], "600s");
    assert_eq!(
        g[0]["body"]["scope"],
        json!(["https://www.googleapis.com/auth/devstorage.read_only"])
    );
    assert_eq!(g[1]["body"]["lifetime"], "900s");
    assert_eq!(
        g[1]["body"]["scope"],
        json!([
            "https://www.googleapis.com/auth/devstorage.read_only",
            "https://www.googleapis.com/auth/bigquery"
        ])
    );
    // The federated token was asked with cloud-platform, for the IAM call.
    let sts = f.fake.sts_requests();
    assert_eq!(
        sts[0]["scope"],
        "https://www.googleapis.com/auth/cloud-platform"
    );
    // The subject token: lanyard's, one audience, short, bound to the grant.
    let c = &f.fake.accepted()[0];
    assert_eq!(c["aud"], format!("https:{AUD}"));
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 300);
    assert_eq!(c["lanyard"]["destination"], "gcp-prod");
    assert_eq!(i.revocation_handle, c["jti"].as_str().unwrap());
    // An unmapped lanyard scope is a bad request, not a call.
    let e = issue(&d, 600, &["admin"]).await.unwrap_err();
    assert!(matches!(e, DestinationError::BadRequest(_)), "{e}");
}

#[tokio::test]
async fn without_impersonation_the_federated_token_is_returned_with_its_own_expiry() {
    let f = fixture().await;
    f.fake.expect(|e| e.federated_lifetime = 3600);
    let d = f.dest(json!({}));
    let now = SystemClock.now_unix();
    let i = issue(&d, 120, &[]).await.unwrap();
    assert!(token(&i).starts_with(FEDERATED_PREFIX));
    assert!((now + 3599..=now + 3602).contains(&i.expires_at));
    assert_eq!(
        f.fake.accepted()[0]["exp"].as_i64().unwrap()
            - f.fake.accepted()[0]["iat"].as_i64().unwrap(),
        120
    );
    // The receipt states the residual.
    let grant = GrantId::generate();
    let out = d
        .revoke(RevokeRequest {
            grant_id: &grant,
            revocation_handle: &i.revocation_handle,
            workload_id: WORKLOAD,
            expires_at: i.expires_at,
            now,
        })
        .await
        .unwrap();
    match out {
        RevokeOutcome::ExpiresAt { at, detail } => {
            assert_eq!(at, i.expires_at);
            assert!(detail.contains("Google"), "{detail}");
            assert!(
                detail.contains(&format!("({}s after revocation)", i.expires_at - now)),
                "{detail}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn each_attempt_signs_a_fresh_subject_token() {
    let f = fixture().await;
    let d = f.dest(json!({"max_attempts": 3, "breaker_threshold": 10}));
    f.fake.sts_answer(Answer::Json(
        503,
        json!({"error": "temporarily_unavailable", "error_description": "busy"}),
    ));
    let e = issue(&d, 300, &[]).await.unwrap_err();
    assert!(is_retryable(&e), "{e}");
    let jtis: Vec<String> = f
        .fake
        .sts_requests()
        .iter()
        .map(|r| r["subjectTokenJti"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(jtis.len(), 3);
    assert_eq!(jtis.iter().collect::<HashSet<_>>().len(), 3, "{jtis:?}");
    // Google comes back: the next exchange works.
    f.fake.sts_answer(Answer::Normal);
    issue(&d, 300, &[]).await.unwrap();
}

#[tokio::test]
async fn the_breaker_fails_fast_after_repeated_outages() {
    let f = fixture().await;
    let d = f.dest(json!({"service_account": SA, "breaker_threshold": 2}));
    f.fake.iam_answer(Answer::Hang);
    for _ in 0..2 {
        let e = issue(&d, 300, &[]).await.unwrap_err();
        assert!(e.to_string().contains("timed out"), "{e}");
    }
    let before = f.fake.sts_requests().len();
    let e = issue(&d, 300, &[]).await.unwrap_err();
    assert!(is_retryable(&e));
    assert!(e.to_string().contains("is failing"), "{e}");
    assert_eq!(f.fake.sts_requests().len(), before, "nothing was sent");
}

#[tokio::test]
async fn refusals_are_not_retried_and_keep_google_codes() {
    let f = fixture().await;
    let d = f.dest(json!({"service_account": SA, "max_attempts": 3}));
    f.fake
        .expect(|e| e.service_account = "other@acme.iam.gserviceaccount.com".into());
    let e = issue(&d, 300, &[]).await.unwrap_err();
    assert!(!is_retryable(&e));
    let m = e.to_string();
    assert!(m.contains("http 403: PERMISSION_DENIED"), "{m}");
    assert!(m.contains("roles/iam.workloadIdentityUser"), "{m}");
    assert_eq!(
        f.fake.sts_requests().len(),
        1,
        "STS asked once, the refusal not retried"
    );
    f.fake.expect(|e| e.service_account = SA.into());
    f.fake
        .expect(|e| e.subject_audience = "https://other".into());
    let e = issue(&d, 300, &[]).await.unwrap_err();
    assert!(!is_retryable(&e));
    assert!(e.to_string().contains("http 400: invalid_grant"), "{e}");
    assert_eq!(f.fake.sts_requests().len(), 2);
}
