//! The `openai` destination through the real binary: lanyard mints a subject token and
//! performs the RFC 8693 exchange with `identity_provider_id` and `service_account_id`
//! (PROTOCOLS.md §2.1) at a token endpoint on loopback that checks it against lanyard's
//! JWKS fetched over HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use lanyard_proto::v1 as pb;
use lanyard_testkit::reason;
use lanyard_testkit::token_endpoint::{ACCESS_TOKEN, Expect};
use serde_json::json;

const AUDIENCE: &str = "https://api.openai.com/lanyard-e2e";

#[tokio::test]
async fn a_workload_gets_an_openai_token_through_lanyard() {
    let expect = Expect {
        jwt_field: "subject_token",
        fields: [
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange".to_owned(),
            ),
            (
                "subject_token_type",
                "urn:ietf:params:oauth:token-type:jwt".to_owned(),
            ),
            ("identity_provider_id", "idp_e2e".to_owned()),
            ("service_account_id", "sa_e2e".to_owned()),
        ]
        .into(),
        header: None,
        audience: AUDIENCE.into(),
        issuer: String::new(),
        jwks_url: String::new(),
        token_lifetime: 600,
        cap_by_jwt: false,
    };
    let (l, issuer, endpoint) = start_federated("openai", expect).await;
    let out = admin_cli_json(
        &l,
        &[
            "destination",
            "put",
            "--name",
            "openai",
            "--kind",
            "openai",
            "--default-ttl",
            "300",
            "--max-ttl",
            "900",
            "--settings-json",
            &json!({
                "token_url": endpoint.url,
                "identity_provider_id": "idp_e2e",
                "service_account_id": "sa_e2e",
                "audience": AUDIENCE,
                "max_attempts": 1,
            })
            .to_string(),
        ],
    )
    .await;
    assert_eq!(out["kind"], "openai");
    let mut c = l.exchange().await;
    let resp = c
        .exchange(pb::ExchangeRequest {
            subject_token: issuer.mint(&claims(&issuer, "agent", "run-1")),
            destination: "openai".into(),
            requested_ttl_seconds: 300,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bearer(&resp), ACCESS_TOKEN);
    assert_eq!(resp.revocability, pb::Revocability::AtExpiry as i32);
    let seen = endpoint.accepted();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["sub"], resp.workload_id.as_str());
    assert_eq!(
        seen[0]["exp"].as_i64().unwrap() - seen[0]["iat"].as_i64().unwrap(),
        300,
        "the subject token expires with the grant"
    );
    let expires = resp.expires_at.unwrap().seconds;
    assert!((now() + 590..=now() + 605).contains(&expires));
    // The receipt says when the token stops working.
    let out = admin_cli_json(
        &l,
        &["revoke", "--grant", &resp.grant_id, "--reason", "e2e"],
    )
    .await;
    assert_eq!(out["receipts"][0]["outcome"], "expires_at");
    // A refusal keeps OpenAI's code.
    endpoint.refuse(401, "invalid_grant");
    let err = c
        .exchange(pb::ExchangeRequest {
            subject_token: issuer.mint(&claims(&issuer, "agent", "run-2")),
            destination: "openai".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "DESTINATION_REJECTED");
    assert!(err.message().contains("invalid_grant"), "{}", err.message());
}
