//! The `gcp-sts` destination through the real binary: a workload exchanges its platform
//! token at lanyard's gRPC Exchange; lanyard mints a subject token, exchanges it at a
//! loopback Google STS (PROTOCOLS.md §4.1) that verifies it against lanyard's JWKS
//! fetched over HTTP, and, with impersonation, calls `generateAccessToken` (§4.2) with
//! the federated token. Refusals in both documented error shapes, outages, timeouts,
//! oversized and malformed answers map to their reason codes, and a revocation's receipt
//! states the residual lifetime.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use lanyard_proto::v1 as pb;
use lanyard_testkit::gcp::{
    FEDERATED_PREFIX, FakeGcp, GcpExpect, SA_TOKEN_PREFIX, google_error_body,
};
use lanyard_testkit::minter::merged;
use lanyard_testkit::reason;
use lanyard_testkit::token_endpoint::Answer;
use lanyard_testkit::{Lanyard, TestIssuer};
use serde_json::{Value, json};

const AUD: &str = "//iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/lanyard-e2e/providers/lanyard";
const SA: &str = "orders-reader@acme-prod.iam.gserviceaccount.com";
const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";
const WORKLOAD: &str = "spiffe://lanyard.local/ci/agent";

async fn setup() -> (Lanyard, TestIssuer, FakeGcp) {
    let fake = FakeGcp::start(GcpExpect::new(AUD, SA)).await;
    let (l, issuer) = start_for_destination("gcp").await;
    let http = l.http.clone();
    fake.expect(|e| {
        e.issuer = http.clone();
        e.jwks_url = format!("{http}/.well-known/jwks.json");
        e.subject = Some(WORKLOAD.into());
    });
    (l, issuer, fake)
}

async fn put(l: &Lanyard, fake: &FakeGcp, extra: Value) {
    let settings = json!({
        "audience": AUD,
        "sts_url": fake.sts_url,
        "iam_credentials_url": fake.iam_url,
        "max_attempts": 1,
        "timeout_secs": 2,
        "breaker_threshold": 100,
    });
    let settings = merged(settings, &extra);
    l.admin()
        .await
        .put_destination(pb::PutDestinationRequest {
            destination: Some(pb::Destination {
                name: "gcp".into(),
                kind: "gcp-sts".into(),
                default_ttl_seconds: 300,
                max_ttl_seconds: 1800,
                settings: Some(json_struct(settings)),
                ..Default::default()
            }),
            expected_revision: None,
        })
        .await
        .unwrap();
}

fn ask(issuer: &TestIssuer, ttl: u32) -> pb::ExchangeRequest {
    pb::ExchangeRequest {
        subject_token: issuer.mint(&claims(issuer, "agent", "run-1")),
        destination: "gcp".into(),
        requested_ttl_seconds: ttl,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_workload_gets_a_service_account_token_through_sts_and_impersonation() {
    let (l, issuer, fake) = setup().await;
    put(
        &l,
        &fake,
        json!({"service_account": SA, "max_lifetime_secs": 600,
               "delegates": ["hop@acme-prod.iam.gserviceaccount.com"]}),
    )
    .await;
    let mut c = l.exchange().await;
    let resp = c.exchange(ask(&issuer, 300)).await.unwrap().into_inner();
    let token = bearer(&resp);
    assert!(token.starts_with(SA_TOKEN_PREFIX), "{token}");
    assert_authorization_bearer(&resp);
    assert_eq!(resp.revocability, pb::Revocability::AtExpiry as i32);
    assert_eq!(resp.workload_id, WORKLOAD);
    // The token expires with the grant: Google's expireTime for the lifetime asked.
    let expires = resp.expires_at.unwrap().seconds;
    assert!(
        (now() + 295..=now() + 302).contains(&expires),
        "expires in {}s",
        expires - now()
    );
    // STS saw lanyard's subject token for this workload, one audience, short-lived.
    let seen = fake.accepted();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["sub"], WORKLOAD);
    assert_eq!(seen[0]["aud"], format!("https:{AUD}"));
    assert_eq!(seen[0]["iss"], l.http.as_str());
    assert_eq!(
        seen[0]["exp"].as_i64().unwrap() - seen[0]["iat"].as_i64().unwrap(),
        300
    );
    let sts = fake.sts_requests();
    assert_eq!(sts[0]["scope"], CLOUD_PLATFORM);
    assert_eq!(sts[0]["audience"], AUD);
    assert_eq!(
        sts[0]["subjectTokenType"],
        "urn:ietf:params:oauth:token-type:jwt"
    );
    let generated = fake.generated();
    assert_eq!(generated.len(), 1);
    assert_eq!(generated[0]["service_account"], SA);
    assert_eq!(
        generated[0]["body"],
        json!({"scope": [CLOUD_PLATFORM], "lifetime": "300s",
               "delegates": ["projects/-/serviceAccounts/hop@acme-prod.iam.gserviceaccount.com"]})
    );

    // A longer grant is capped at max_lifetime_secs.
    let resp2 = c.exchange(ask(&issuer, 1200)).await.unwrap().into_inner();
    assert_eq!(fake.generated()[1]["body"]["lifetime"], "600s");
    let expires2 = resp2.expires_at.unwrap().seconds;
    assert!(
        (now() + 595..=now() + 602).contains(&expires2),
        "expires in {}s",
        expires2 - now()
    );
    // No token in the server log.
    let log = l.log();
    assert!(!log.contains(&token));
    assert!(!log.contains(FEDERATED_PREFIX));

    // Revocation via the CLI: Google cannot revoke; the receipt states the residual.
    revoke_states_residual(&l, &resp.grant_id, "Google", expires).await;
    // Revocation calls nothing at Google.
    assert_eq!(fake.generated().len(), 2);
}

#[tokio::test]
async fn without_impersonation_the_federated_token_and_its_real_expiry_are_returned() {
    let (l, issuer, fake) = setup().await;
    fake.expect(|e| e.federated_lifetime = 3600);
    put(
        &l,
        &fake,
        json!({"oauth_scopes": ["https://www.googleapis.com/auth/devstorage.read_only"]}),
    )
    .await;
    let mut c = l.exchange().await;
    let resp = c.exchange(ask(&issuer, 300)).await.unwrap().into_inner();
    assert!(bearer(&resp).starts_with(FEDERATED_PREFIX));
    // The federated token lives as long as STS says, not as long as the grant: lanyard
    // reports the real expiry.
    let expires = resp.expires_at.unwrap().seconds;
    assert!(
        (now() + 3595..=now() + 3602).contains(&expires),
        "expires in {}s",
        expires - now()
    );
    assert_eq!(
        fake.sts_requests()[0]["scope"],
        "https://www.googleapis.com/auth/devstorage.read_only"
    );
    assert!(fake.generated().is_empty());
    // The receipt's residual is that expiry.
    let out = admin_cli_json(
        &l,
        &["revoke", "--grant", &resp.grant_id, "--reason", "e2e"],
    )
    .await;
    assert_eq!(out["receipts"][0]["outcome"], "expires_at", "{out}");
    // An operator who accepts no more than 30 minutes gets a refusal instead.
    put(&l, &fake, json!({"max_token_lifetime_secs": 1800})).await;
    let err = c.exchange(ask(&issuer, 300)).await.unwrap_err();
    assert_eq!(reason(&err), "DESTINATION_REJECTED");
    assert!(
        err.message().contains("max_token_lifetime_secs"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn google_refusals_outages_and_bad_answers_map_to_reason_codes() {
    let (l, issuer, fake) = setup().await;
    put(
        &l,
        &fake,
        json!({"service_account": SA, "max_response_bytes": 4096}),
    )
    .await;
    let mut c = l.exchange().await;
    c.exchange(ask(&issuer, 300)).await.unwrap();
    let fails = |want, text| assert_refused(c.clone(), ask(&issuer, 300), want, text, &["ya29."]);

    // STS refuses (OAuth shape), from its own checks: the attribute condition...
    fake.expect(|e| e.subject = Some("spiffe://lanyard.local/ci/someone-else".into()));
    fails("DESTINATION_REJECTED", "unauthorized_client").await;
    fake.expect(|e| e.subject = Some(WORKLOAD.into()));
    // ...the subject token's audience...
    fake.expect(|e| e.subject_audience = "https://elsewhere.example".into());
    fails("DESTINATION_REJECTED", "invalid_grant: The audience").await;
    fake.expect(|e| e.subject_audience = format!("https:{AUD}"));
    // ...and the pool provider.
    fake.expect(|e| e.audience = "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/other/providers/other".into());
    fails("DESTINATION_REJECTED", "invalid_target").await;
    fake.expect(|e| e.audience = AUD.into());
    // STS's documented error body, passed through sanitized.
    fake.sts_answer(Answer::Json(
        400,
        json!({"error": "invalid_grant", "error_description": "ID Token eyJhbGciOiJFUzI1NiJ9.e30.c2ln issued at 1 is stale"}),
    ));
    fails("DESTINATION_REJECTED", "invalid_grant: ID Token [redacted]").await;
    // STS outage and timeout: retryable.
    fake.sts_answer(Answer::Json(
        503,
        json!({"error": "temporarily_unavailable", "error_description": "backend"}),
    ));
    fails("DESTINATION_UNAVAILABLE", "http 503").await;
    fake.sts_answer(Answer::Hang);
    fails("DESTINATION_UNAVAILABLE", "timed out").await;
    // Oversized and malformed STS answers: refused, not retried.
    fake.sts_answer(Answer::oversized(10_000));
    fails("DESTINATION_REJECTED", "exceeds 4096 bytes").await;
    fake.sts_answer(Answer::Raw(200, "{\"access_token\": ".into()));
    fails("DESTINATION_REJECTED", "malformed token response").await;
    fake.sts_answer(Answer::Json(
        200,
        json!({"access_token": "x", "token_type": "Bearer"}),
    ));
    fails("DESTINATION_REJECTED", "malformed token response").await;
    fake.sts_answer(Answer::Normal);

    // iamcredentials refuses in Google's shape, from its own checks...
    fake.expect(|e| e.service_account = "other@acme-prod.iam.gserviceaccount.com".into());
    fails("DESTINATION_REJECTED", "http 403: PERMISSION_DENIED").await;
    fake.expect(|e| e.service_account = SA.into());
    fake.expect(|e| e.max_lifetime = 60);
    fails("DESTINATION_REJECTED", "INVALID_ARGUMENT").await;
    fake.expect(|e| e.max_lifetime = 3600);
    // ...or as told.
    fake.iam_answer(Answer::Json(
        401,
        google_error_body(
            401,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials.",
        ),
    ));
    fails("DESTINATION_REJECTED", "UNAUTHENTICATED").await;
    fake.iam_answer(Answer::Json(
        429,
        google_error_body(429, "RESOURCE_EXHAUSTED", "Quota exceeded"),
    ));
    fails("DESTINATION_UNAVAILABLE", "RESOURCE_EXHAUSTED").await;
    fake.iam_answer(Answer::Hang);
    fails("DESTINATION_UNAVAILABLE", "timed out").await;
    fake.iam_answer(Answer::oversized(10_000));
    fails("DESTINATION_REJECTED", "exceeds 4096 bytes").await;
    fake.iam_answer(Answer::Json(
        200,
        json!({"accessToken": "ya29.x", "expireTime": "in an hour"}),
    ));
    fails("DESTINATION_REJECTED", "RFC 3339").await;
    fake.iam_answer(Answer::Json(200, json!({"token": "ya29.x"})));
    fails(
        "DESTINATION_REJECTED",
        "malformed generateAccessToken response",
    )
    .await;
    // A token living longer than asked is refused rather than handed out.
    fake.iam_answer(Answer::Json(
        200,
        json!({"accessToken": "ya29.x", "expireTime": "2099-01-01T00:00:00Z"}),
    ));
    fails("DESTINATION_REJECTED", "outside the 300s asked").await;
    fake.iam_answer(Answer::Normal);
    c.exchange(ask(&issuer, 300)).await.unwrap();

    // Settings are checked when the destination is put.
    for (bad, want) in [
        (
            json!({"audience": "projects/1/pools/x"}),
            "settings.audience",
        ),
        (
            json!({"sts_url": "http://sts.example.com/v1/token"}),
            "https is required",
        ),
        (
            json!({"service_account": "nobody"}),
            "settings.service_account",
        ),
        (json!({"max_lifetime_secs": 50_000}), "1..=43200"),
        (json!({"surprise": true}), "unknown field"),
    ] {
        let mut settings = json!({"audience": AUD});
        for (k, v) in bad.as_object().unwrap() {
            settings[k] = v.clone();
        }
        let err = l
            .admin()
            .await
            .put_destination(pb::PutDestinationRequest {
                destination: Some(pb::Destination {
                    name: "gcp-bad".into(),
                    kind: "gcp-sts".into(),
                    default_ttl_seconds: 300,
                    max_ttl_seconds: 900,
                    settings: Some(json_struct(settings)),
                    ..Default::default()
                }),
                expected_revision: None,
            })
            .await
            .unwrap_err();
        assert_eq!(reason(&err), "CONFIG_INVALID", "{bad}");
        assert!(err.message().contains(want), "{bad}: {}", err.message());
    }
}

#[tokio::test]
async fn the_cli_puts_a_gcp_destination() {
    let (l, issuer, fake) = setup().await;
    let out = admin_cli_json(
        &l,
        &[
            "destination",
            "put",
            "--name",
            "gcp",
            "--kind",
            "gcp-sts",
            "--default-ttl",
            "300",
            "--max-ttl",
            "900",
            "--settings-json",
            &json!({
                "audience": AUD,
                "sts_url": fake.sts_url,
                "iam_credentials_url": fake.iam_url,
                "service_account": SA,
            })
            .to_string(),
        ],
    )
    .await;
    assert_eq!(out["kind"], "gcp-sts");
    let resp = l
        .exchange()
        .await
        .exchange(ask(&issuer, 120))
        .await
        .unwrap()
        .into_inner();
    assert!(bearer(&resp).starts_with(SA_TOKEN_PREFIX));
    assert_eq!(fake.generated()[0]["body"]["lifetime"], "120s");
}
