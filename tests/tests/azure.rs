//! The `azure` destination through the real binary: a workload exchanges its platform
//! token at lanyard's gRPC Exchange; lanyard signs a client assertion and performs the
//! client credentials grant (PROTOCOLS.md §4.3, RFC 7523 §2.2) at a loopback Entra ID
//! token endpoint that verifies it against lanyard's JWKS fetched over HTTP and matches
//! it to a federated identity credential (issuer, subject, audience) as Entra does.
//! Entra's error shape (AADSTS codes), outages, timeouts, oversized and malformed
//! answers map to their reason codes, and a revocation's receipt states the residual.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use lanyard_proto::v1 as pb;
use lanyard_testkit::minter::merged;
use lanyard_testkit::reason;
use lanyard_testkit::token_endpoint::{
    ACCESS_TOKEN, Answer, Expect, TokenEndpoint, entra_error_body,
};
use lanyard_testkit::{Lanyard, TestIssuer};
use serde_json::{Value, json};

const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
const CLIENT: &str = "0d0a2c1e-5d5b-4f3b-9e8c-1a2b3c4d5e6f";
const ARM: &str = "https://management.azure.com";
const VAULT: &str = "https://vault.azure.net";
const FIC_AUDIENCE: &str = "api://AzureADTokenExchange";
const WORKLOAD: &str = "spiffe://lanyard.local/ci/agent";

async fn setup() -> (Lanyard, TestIssuer, TokenEndpoint) {
    let expect = Expect {
        jwt_field: "client_assertion",
        fields: [
            ("client_id", CLIENT.to_owned()),
            ("scope", format!("{ARM}/.default")),
            ("grant_type", "client_credentials".to_owned()),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".to_owned(),
            ),
        ]
        .into(),
        header: None,
        audience: FIC_AUDIENCE.into(),
        issuer: String::new(),
        jwks_url: String::new(),
        token_lifetime: 3599,
        cap_by_jwt: false,
    };
    let entra = TokenEndpoint::start_entra(expect, TENANT).await;
    let (l, issuer) = start_for_destination("azure").await;
    let http = l.http.clone();
    entra.expect(|e| {
        e.issuer = http.clone();
        e.jwks_url = format!("{http}/.well-known/jwks.json");
    });
    // The federated identity credential's subject: exactly the workload ID.
    entra.expect_subject(Some(WORKLOAD));
    (l, issuer, entra)
}

async fn put(l: &Lanyard, entra: &TokenEndpoint, extra: Value) -> Result<(), tonic::Status> {
    let settings = json!({
        "tenant_id": TENANT,
        "client_id": CLIENT,
        "resource": ARM,
        "resource_by_scope": {"arm": ARM, "kv": VAULT},
        "authority_host": entra.base,
        "max_attempts": 1,
        "timeout_secs": 2,
        "breaker_threshold": 100,
    });
    let settings = merged(settings, &extra);
    l.admin()
        .await
        .put_destination(pb::PutDestinationRequest {
            destination: Some(pb::Destination {
                name: "azure".into(),
                kind: "azure".into(),
                default_ttl_seconds: 300,
                max_ttl_seconds: 3600,
                scopes: vec!["arm".into(), "kv".into()],
                settings: Some(json_struct(settings)),
                ..Default::default()
            }),
            expected_revision: None,
        })
        .await
        .map(|_| ())
}

fn ask(issuer: &TestIssuer, scopes: &[&str]) -> pb::ExchangeRequest {
    pb::ExchangeRequest {
        subject_token: issuer.mint(&claims(issuer, "agent", "run-1")),
        destination: "azure".into(),
        requested_ttl_seconds: 300,
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_workload_gets_an_entra_token_with_a_lanyard_client_assertion() {
    let (l, issuer, entra) = setup().await;
    put(&l, &entra, json!({})).await.unwrap();
    let mut c = l.exchange().await;
    let resp = c.exchange(ask(&issuer, &[])).await.unwrap().into_inner();
    assert_eq!(bearer(&resp), ACCESS_TOKEN);
    assert_authorization_bearer(&resp);
    assert_eq!(resp.revocability, pb::Revocability::AtExpiry as i32);
    // Entra chooses the lifetime; lanyard reports the real expiry, not the grant's TTL.
    let expires = resp.expires_at.unwrap().seconds;
    assert!(
        (now() + 3594..=now() + 3602).contains(&expires),
        "expires in {}s",
        expires - now()
    );
    // The assertion: lanyard's, for this workload, one audience, short-lived.
    let seen = entra.accepted();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["iss"], l.http.as_str());
    assert_eq!(seen[0]["sub"], WORKLOAD);
    assert_eq!(seen[0]["aud"], FIC_AUDIENCE);
    assert_eq!(
        seen[0]["exp"].as_i64().unwrap() - seen[0]["iat"].as_i64().unwrap(),
        300
    );
    assert!(seen[0]["jti"].is_string());
    // A lanyard scope chooses the resource.
    entra.expect(|e| {
        e.fields.insert("scope", format!("{VAULT}/.default"));
    });
    c.exchange(ask(&issuer, &["kv"])).await.unwrap();
    // Scopes naming two resources cannot share one token.
    let err = c.exchange(ask(&issuer, &["kv", "arm"])).await.unwrap_err();
    assert_eq!(reason(&err), "INVALID_ARGUMENT", "{}", err.message());
    assert!(!l.log().contains(ACCESS_TOKEN));

    // Revocation via the CLI: Entra tokens cannot be revoked; the receipt says until when.
    revoke_states_residual(&l, &resp.grant_id, "Entra", expires).await;
}

#[tokio::test]
async fn entra_refusals_outages_and_bad_answers_map_to_reason_codes() {
    let (l, issuer, entra) = setup().await;
    put(&l, &entra, json!({"max_response_bytes": 4096}))
        .await
        .unwrap();
    let mut c = l.exchange().await;
    c.exchange(ask(&issuer, &[])).await.unwrap();
    let fails = |want, text| assert_refused(c.clone(), ask(&issuer, &[]), want, text, &[]);

    // The federated identity credential does not match: subject, audience, issuer.
    entra.expect_subject(Some("spiffe://lanyard.local/ci/someone-else"));
    fails("DESTINATION_REJECTED", "invalid_client: AADSTS700213").await;
    fails("DESTINATION_REJECTED", "subject = the workload ID").await;
    entra.expect_subject(Some(WORKLOAD));
    entra.expect(|e| e.audience = "api://SomethingElse".into());
    fails("DESTINATION_REJECTED", "AADSTS700212").await;
    entra.expect(|e| e.audience = FIC_AUDIENCE.into());
    let http = l.http.clone();
    entra.expect(|e| e.issuer = format!("{http}/"));
    fails("DESTINATION_REJECTED", "AADSTS700211").await;
    entra.expect(|e| e.issuer = http.clone());
    // An unknown application.
    entra.expect(|e| {
        e.fields
            .insert("client_id", "11111111-2222-3333-4444-555555555555".into());
    });
    fails("DESTINATION_REJECTED", "unauthorized_client: AADSTS700016").await;
    entra.expect(|e| {
        e.fields.insert("client_id", CLIENT.into());
    });
    // Entra's documented error body, passed through sanitized.
    entra.answer(Answer::Json(
        401,
        entra_error_body(
            "invalid_client",
            700027,
            "Client assertion failed signature validation. eyJhbGciOiJFUzI1NiJ9.e30.c2ln",
        ),
    ));
    fails("DESTINATION_REJECTED", "invalid_client: AADSTS700027").await;
    // Throttling, outages and timeouts: retryable.
    entra.answer(Answer::Json(
        429,
        entra_error_body("temporarily_unavailable", 50196, "Too many requests."),
    ));
    fails("DESTINATION_UNAVAILABLE", "http 429").await;
    entra.answer(Answer::Json(
        503,
        entra_error_body("temporarily_unavailable", 50000, "Service unavailable."),
    ));
    fails("DESTINATION_UNAVAILABLE", "http 503").await;
    entra.answer(Answer::Hang);
    fails("DESTINATION_UNAVAILABLE", "timed out").await;
    // Oversized and malformed answers: refused.
    entra.answer(Answer::oversized(10_000));
    fails("DESTINATION_REJECTED", "exceeds 4096 bytes").await;
    entra.answer(Answer::Raw(200, "<html>sign in</html>".into()));
    fails(
        "DESTINATION_REJECTED",
        "malformed token response (not json)",
    )
    .await;
    entra.answer(Answer::Json(
        200,
        json!({"token_type": "Bearer", "access_token": "t"}),
    ));
    fails("DESTINATION_REJECTED", "malformed token response").await;
    entra.answer(Answer::Json(
        200,
        json!({"token_type": "Bearer", "access_token": "t", "expires_in": 0}),
    ));
    fails("DESTINATION_REJECTED", "positive expires_in").await;
    entra.accept();
    c.clone().exchange(ask(&issuer, &[])).await.unwrap();
    // An operator who accepts no token living over 30 minutes gets a refusal instead.
    put(&l, &entra, json!({"max_token_lifetime_secs": 1800}))
        .await
        .unwrap();
    fails("DESTINATION_REJECTED", "max_token_lifetime_secs").await;

    // Settings are checked when the destination is put.
    for (bad, want) in [
        (json!({"tenant_id": "common"}), "settings.tenant_id"),
        (json!({"client_id": "my-app"}), "settings.client_id"),
        (
            json!({"resource": "https://vault.azure.net/.default"}),
            "adds /.default",
        ),
        (
            json!({"authority_host": "http://login.example.com"}),
            "https is required",
        ),
        (json!({"assertion_lifetime_secs": 7200}), "60..=3600"),
        (
            json!({"resource_by_scope": {"arm": ARM}}),
            "\"kv\" is offered",
        ),
        (json!({"client_secret": "x"}), "unknown field"),
    ] {
        let err = put(&l, &entra, bad.clone()).await.unwrap_err();
        assert_eq!(reason(&err), "CONFIG_INVALID", "{bad}");
        assert!(err.message().contains(want), "{bad}: {}", err.message());
    }
}

#[tokio::test]
async fn the_cli_puts_an_azure_destination() {
    let (l, issuer, entra) = setup().await;
    let out = admin_cli_json(
        &l,
        &[
            "destination",
            "put",
            "--name",
            "azure",
            "--kind",
            "azure",
            "--default-ttl",
            "300",
            "--max-ttl",
            "3600",
            "--settings-json",
            &json!({
                "tenant_id": TENANT,
                "client_id": CLIENT,
                "resource": ARM,
                "authority_host": entra.base,
            })
            .to_string(),
        ],
    )
    .await;
    assert_eq!(out["kind"], "azure");
    let resp = l
        .exchange()
        .await
        .exchange(ask(&issuer, &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bearer(&resp), ACCESS_TOKEN);
}
