//! The `azure` adapter against `lanyard_testkit::token_endpoint` started as Entra ID: a
//! loopback token endpoint that takes the client credentials form with a client
//! assertion, verifies the assertion with lanyard's JWKS fetched over HTTP, matches its
//! issuer, subject and audience like a federated identity credential, and answers in
//! Entra's shapes (PROTOCOLS.md §4.3). Nothing external is contacted.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;

use lanyard_core::{Clock, GrantId, SystemClock};
use lanyard_destination::http::is_retryable;
use lanyard_destination::{
    Credential, Destination, DestinationError, DestinationSpec, Issued, Revocability,
    RevokeOutcome, RevokeRequest,
};
use lanyard_destination_azure::AzureDestination;
use lanyard_testkit::minter::{self, TestMinter};
use lanyard_testkit::token_endpoint::{ACCESS_TOKEN, Answer, Expect, TokenEndpoint, serve_jwks};
use serde_json::{Value, json};

const ISSUER: &str = "https://lanyard.test";
const TENANT: &str = "contoso.onmicrosoft.com";
const CLIENT: &str = "0d0a2c1e-5d5b-4f3b-9e8c-1a2b3c4d5e6f";
const WORKLOAD: &str = "spiffe://lanyard.local/k8s/prod/agent";

struct Fixture {
    keys: TestMinter,
    entra: TokenEndpoint,
}

async fn fixture() -> Fixture {
    let keys = TestMinter::new(ISSUER);
    let expect = Expect {
        jwt_field: "client_assertion",
        fields: [
            ("client_id", CLIENT.to_owned()),
            ("scope", "https://vault.azure.net/.default".to_owned()),
            ("grant_type", "client_credentials".to_owned()),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".to_owned(),
            ),
        ]
        .into(),
        header: None,
        audience: "api://AzureADTokenExchange".into(),
        issuer: ISSUER.into(),
        jwks_url: serve_jwks(keys.jwks()).await,
        token_lifetime: 4000,
        cap_by_jwt: false,
    };
    let entra = TokenEndpoint::start_entra(expect, TENANT).await;
    entra.expect_subject(Some(WORKLOAD));
    Fixture { keys, entra }
}

impl Fixture {
    fn dest(&self, extra: Value) -> AzureDestination {
        let settings = minter::merged(
            json!({
                "tenant_id": TENANT,
                "client_id": CLIENT,
                "resource": "https://vault.azure.net",
                "authority_host": self.entra.base,
                "max_attempts": 1,
                "timeout_secs": 1,
            }),
            &extra,
        );
        let spec = minter::spec(
            json!({"name": "azure-prod", "kind": "azure", "max_ttl_secs": 3600}),
            settings,
        );
        AzureDestination::new(&spec, self.keys.minter.clone()).unwrap()
    }
}

async fn issue(d: &AzureDestination, scopes: &[&str]) -> Result<Issued, DestinationError> {
    minter::issue(d, WORKLOAD, 300, scopes).await
}

#[tokio::test]
async fn a_client_assertion_gets_an_entra_token() {
    let f = fixture().await;
    let d = f.dest(json!({"assertion_lifetime_secs": 120}));
    assert_eq!(d.revocability(), Revocability::AtExpiry);
    assert_eq!(
        d.token_url().as_str(),
        format!("{}/{TENANT}/oauth2/v2.0/token", f.entra.base)
    );
    let now = SystemClock.now_unix();
    let i = issue(&d, &[]).await.unwrap();
    match &i.credential {
        Credential::Bearer {
            token,
            token_type,
            header,
            ..
        } => {
            assert_eq!(token.expose(), ACCESS_TOKEN);
            assert_eq!(
                (token_type.as_str(), header.as_str()),
                ("Bearer", "authorization")
            );
        }
        other => panic!("{other:?}"),
    }
    // Entra's lifetime, from when the answer arrived.
    assert!((now + 4000..=now + 4002).contains(&i.expires_at));
    let c = &f.entra.accepted()[0];
    assert_eq!(c["iss"], ISSUER);
    assert_eq!(c["sub"], WORKLOAD);
    assert_eq!(c["aud"], "api://AzureADTokenExchange");
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 120);
    assert_eq!(i.revocation_handle, c["jti"].as_str().unwrap());
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
    assert!(
        matches!(&out, RevokeOutcome::ExpiresAt { at, detail } if *at == i.expires_at && detail.contains("Entra")),
        "{out:?}"
    );
}

#[tokio::test]
async fn each_attempt_signs_a_fresh_assertion_and_refusals_are_not_retried() {
    let f = fixture().await;
    let d = f.dest(json!({"max_attempts": 3, "breaker_threshold": 10}));
    f.entra.answer(Answer::Json(
        503,
        json!({"error": "temporarily_unavailable", "error_codes": [50000]}),
    ));
    let e = issue(&d, &[]).await.unwrap_err();
    assert!(is_retryable(&e), "{e}");
    let jtis = f.entra.received_jtis();
    assert_eq!(jtis.len(), 3);
    assert_eq!(jtis.iter().collect::<HashSet<_>>().len(), 3, "{jtis:?}");
    f.entra.accept();
    f.entra
        .expect_subject(Some("spiffe://lanyard.local/k8s/prod/other"));
    let e = issue(&d, &[]).await.unwrap_err();
    assert!(!is_retryable(&e));
    assert!(
        e.to_string().contains("invalid_client: AADSTS700213"),
        "{e}"
    );
    assert_eq!(f.entra.received_jtis().len(), 4, "a refusal is not retried");
}

#[tokio::test]
async fn the_breaker_fails_fast_after_repeated_timeouts() {
    let f = fixture().await;
    let d = f.dest(json!({"breaker_threshold": 2}));
    f.entra.answer(Answer::Hang);
    for _ in 0..2 {
        let e = issue(&d, &[]).await.unwrap_err();
        assert!(e.to_string().contains("timed out"), "{e}");
    }
    let e = issue(&d, &[]).await.unwrap_err();
    assert!(e.to_string().contains("is failing"), "{e}");
    assert_eq!(f.entra.received_jtis().len(), 2, "nothing was sent");
}

#[test]
fn offered_scopes_must_be_mapped_when_a_map_is_set() {
    let spec: DestinationSpec = serde_json::from_value(json!({
        "name": "azure-prod", "kind": "azure", "scopes": ["kv", "arm"],
        "settings": {"tenant_id": TENANT, "client_id": CLIENT, "resource": "https://vault.azure.net",
                     "resource_by_scope": {"kv": "https://vault.azure.net"}},
    }))
    .unwrap();
    let keys = TestMinter::new(ISSUER);
    let e = AzureDestination::new(&spec, keys.minter.clone()).unwrap_err();
    assert!(e.to_string().contains("\"arm\" is offered"), "{e}");
}
