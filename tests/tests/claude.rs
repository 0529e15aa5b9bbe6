//! The `claude` destination through the real binary: a workload exchanges its platform
//! token at lanyard's gRPC Exchange, lanyard mints an assertion and performs the RFC 7523
//! jwt-bearer exchange (PROTOCOLS.md §1) at a token endpoint on loopback, which checks
//! the assertion against lanyard's JWKS fetched over HTTP, as Anthropic does with a
//! federation issuer's keys. Refusals and outages map to their reason codes, and a
//! revocation's receipt states the residual lifetime.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use lanyard_proto::v1 as pb;
use lanyard_testkit::reason;
use lanyard_testkit::token_endpoint::{ACCESS_TOKEN, Expect};
use serde_json::json;

const RULE: &str = "fdrl_01e2etestrule";
const ORG: &str = "0f8e4a1c-1234-4abc-8def-0123456789ab";
const SVAC: &str = "svac_01e2etestaccount";

fn claude_destination(token_url: &str) -> pb::Destination {
    pb::Destination {
        name: "claude".into(),
        kind: "claude".into(),
        default_ttl_seconds: 300,
        max_ttl_seconds: 900,
        settings: Some(json_struct(json!({
            "token_url": token_url,
            "federation_rule_id": RULE,
            "organization_id": ORG,
            "service_account_id": SVAC,
            "max_attempts": 1,
        }))),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_workload_gets_a_claude_token_through_lanyard() {
    let expect = Expect {
        jwt_field: "assertion",
        fields: [
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:jwt-bearer".to_owned(),
            ),
            ("federation_rule_id", RULE.to_owned()),
            ("organization_id", ORG.to_owned()),
            ("service_account_id", SVAC.to_owned()),
        ]
        .into(),
        header: Some(("anthropic-beta", "oidc-federation-2026-04-01")),
        audience: "https://api.anthropic.com".into(),
        issuer: String::new(),
        jwks_url: String::new(),
        token_lifetime: 3600,
        cap_by_jwt: true,
    };
    let (l, issuer, endpoint) = start_federated("claude", expect).await;
    let mut admin = l.admin().await;
    admin
        .put_destination(pb::PutDestinationRequest {
            destination: Some(claude_destination(&endpoint.url)),
            expected_revision: None,
        })
        .await
        .unwrap();
    let mut c = l.exchange().await;
    let ask = |ttl: u32| pb::ExchangeRequest {
        subject_token: issuer.mint(&claims(&issuer, "agent", "run-1")),
        destination: "claude".into(),
        requested_ttl_seconds: ttl,
        ..Default::default()
    };
    let resp = c.exchange(ask(120)).await.unwrap().into_inner();
    assert_eq!(bearer(&resp), ACCESS_TOKEN);
    assert_authorization_bearer(&resp);
    assert_eq!(resp.revocability, pb::Revocability::AtExpiry as i32);
    // The token lives no longer than the grant allows.
    let expires = resp.expires_at.unwrap().seconds;
    assert!(
        expires <= now() + 120 + 2,
        "expires in {} s",
        expires - now()
    );
    // The assertion was lanyard's, for this workload, with one audience.
    let seen = endpoint.accepted();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["sub"], resp.workload_id.as_str());
    // No token in the server log.
    assert!(!l.log().contains(ACCESS_TOKEN));

    // Revocation: Claude cannot revoke early; the receipt states until when.
    let out = admin_cli_json(
        &l,
        &["revoke", "--grant", &resp.grant_id, "--reason", "e2e"],
    )
    .await;
    assert_eq!(out["summary"]["expires_at"], 1);
    let r = &out["receipts"][0];
    assert_eq!(r["outcome"], "expires_at");
    assert!(r["expires_at"].is_string());

    // A refusal at the destination: DESTINATION_REJECTED with its code passed on.
    endpoint.refuse(400, "invalid_grant");
    let err = c.exchange(ask(120)).await.unwrap_err();
    assert_eq!(reason(&err), "DESTINATION_REJECTED");
    assert!(err.message().contains("invalid_grant"), "{}", err.message());
    // An outage: DESTINATION_UNAVAILABLE.
    admin
        .put_destination(pb::PutDestinationRequest {
            destination: Some(claude_destination("http://127.0.0.1:1/v1/oauth/token")),
            expected_revision: None,
        })
        .await
        .unwrap();
    let err = c.exchange(ask(120)).await.unwrap_err();
    assert_eq!(reason(&err), "DESTINATION_UNAVAILABLE");
    // Settings are checked when the destination is put: plain http off loopback.
    let err = admin
        .put_destination(pb::PutDestinationRequest {
            destination: Some(claude_destination("http://api.example.com/v1/oauth/token")),
            expected_revision: None,
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "CONFIG_INVALID");
}
