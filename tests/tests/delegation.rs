//! Delegation (RFC 8693 actor tokens) end to end against the real binary: an agent acts
//! for a workload only where policy says it may (`act_for`), never widens the scopes or
//! lifetime its own token allows, the chain is bounded, recorded in the grant and the
//! audit event, and carried as a nested `act` claim in the credential.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use lanyard_proto::v1 as pb;
use lanyard_testkit::{KeyAlg, Lanyard, LanyardOptions, TestIssuer, reason};

/// `builder` may use `orders` for itself or through at most one actor; `agent` may act
/// for `builder` on `orders` with read or write.
const DELEGATION_POLICY: &str = r#"
@id("builder-orders")
permit (
    principal == Lanyard::Workload::"spiffe://lanyard.local/ci/builder",
    action == Lanyard::Action::"exchange",
    resource == Lanyard::Destination::"orders"
)
when { context.delegation_depth <= 1 };

@id("agent-acts-for-builder")
permit (
    principal == Lanyard::Workload::"spiffe://lanyard.local/ci/agent",
    action == Lanyard::Action::"act_for",
    resource == Lanyard::Destination::"orders"
)
when {
    context.subject == "spiffe://lanyard.local/ci/builder" &&
    ["read", "write"].containsAll(context.scopes)
};
"#;

const JWT: &str = "urn:ietf:params:oauth:token-type:jwt";

async fn start_delegation() -> (Lanyard, TestIssuer) {
    let issuer = TestIssuer::start(KeyAlg::Es256).await;
    let l = Lanyard::start(LanyardOptions {
        policy: Some(DELEGATION_POLICY.into()),
        ..Default::default()
    })
    .await;
    configure(&l, &issuer, Keys::Inline, KeyAlg::Es256, false).await;
    (l, issuer)
}

fn delegated(subject: String, actor: String, scopes: &[&str]) -> pb::ExchangeRequest {
    let mut r = exchange_req(subject, scopes);
    r.actor_token = actor;
    r.actor_token_type = JWT.into();
    r
}

#[tokio::test]
async fn an_agent_acts_for_a_workload_where_policy_allows_it() {
    let (l, issuer) = start_delegation().await;
    let mut c = l.exchange().await;
    let subject = || issuer.mint(&claims(&issuer, "builder", "run-1"));
    let agent = || issuer.mint(&claims(&issuer, "agent", "session-1"));

    let r = c
        .exchange(delegated(subject(), agent(), &["read"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.workload_id, "spiffe://lanyard.local/ci/builder");
    let cred = verify_with_lanyard_jwks(&l, &bearer(&r), ORDERS_AUD).await;
    assert_eq!(cred["sub"], "spiffe://lanyard.local/ci/builder");
    assert_eq!(
        cred["act"],
        serde_json::json!({ "sub": "spiffe://lanyard.local/ci/agent" })
    );
    let grant = l
        .admin()
        .await
        .get_grant(pb::GetRequest {
            name: r.grant_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grant.actor_chain, ["spiffe://lanyard.local/ci/agent"]);
    let granted = payloads_of(&l, "exchange.granted").await;
    assert_eq!(
        granted[0]["detail"]["actor_chain"],
        serde_json::json!(["spiffe://lanyard.local/ci/agent"])
    );

    // Without delegation builder still works for itself.
    c.exchange(exchange_req(subject(), &["read"]))
        .await
        .unwrap();

    // An actor no policy lets act for builder is refused, and so is an agent acting for
    // someone it may not act for.
    let intruder = issuer.mint(&claims(&issuer, "intruder", "s"));
    let err = c
        .exchange(delegated(subject(), intruder, &["read"]))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "POLICY_DENIED");
    let err = c
        .exchange(delegated(
            issuer.mint(&claims(&issuer, "reader", "r")),
            agent(),
            &["read"],
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "POLICY_DENIED");

    // A delegated grant is not renewed with the subject token alone.
    let err = c
        .renew(pb::RenewRequest {
            grant_id: r.grant_id,
            subject_token: subject(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "DELEGATION_DENIED");
}

#[tokio::test]
async fn each_hop_only_narrows_and_the_chain_is_bounded() {
    let (l, issuer) = start_delegation().await;
    let mut c = l.exchange().await;
    let subject = || issuer.mint(&claims(&issuer, "builder", "run-1"));

    // The agent's own token allows read only: asking for write through it is refused,
    // even though policy would allow write.
    let mut narrow = claims(&issuer, "agent", "s");
    narrow["scope"] = "read".into();
    let err = c
        .exchange(delegated(subject(), issuer.mint(&narrow), &["write"]))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "DELEGATION_DENIED");
    assert!(err.message().contains("write"), "{}", err.message());
    c.exchange(delegated(subject(), issuer.mint(&narrow), &["read"]))
        .await
        .unwrap();

    // The credential never outlives the actor token.
    let mut short = claims(&issuer, "agent", "s");
    short["exp"] = (now() + 90).into();
    let mut req = delegated(subject(), issuer.mint(&short), &["read"]);
    req.requested_ttl_seconds = 600;
    let r = c.exchange(req).await.unwrap().into_inner();
    let cred = verify_with_lanyard_jwks(&l, &bearer(&r), ORDERS_AUD).await;
    assert!(cred["exp"].as_i64().unwrap() <= now() + 91, "{cred}");

    // A subject token that was itself delegated twice already: with this actor the chain
    // has three actors, which the server accepts (max 3) but the policy refuses
    // (delegation_depth <= 1)...
    let mut relayed = claims(&issuer, "builder", "run-1");
    relayed["act"] = serde_json::json!({"sub": "upstream-1", "act": {"sub": "upstream-2"}});
    let agent = issuer.mint(&claims(&issuer, "agent", "s"));
    let err = c
        .exchange(delegated(issuer.mint(&relayed), agent.clone(), &["read"]))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "POLICY_DENIED");
    // ...and one more hop is over the server's bound.
    relayed["act"] = serde_json::json!({"sub": "u1", "act": {"sub": "u2", "act": {"sub": "u3"}}});
    let err = c
        .exchange(delegated(issuer.mint(&relayed), agent, &["read"]))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "DELEGATION_DENIED");
    assert!(err.message().contains("4 actors"), "{}", err.message());

    // A bad actor token says which token was bad.
    let mut expired = claims(&issuer, "agent", "s");
    expired["exp"] = (now() - 3600).into();
    let err = c
        .exchange(delegated(subject(), issuer.mint(&expired), &["read"]))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "TOKEN_EXPIRED");
    assert!(
        err.message().starts_with("actor_token:"),
        "{}",
        err.message()
    );
    // Acting for oneself is not delegation.
    let err = c
        .exchange(delegated(subject(), subject(), &["read"]))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "DELEGATION_DENIED");
    // Every refusal is audited with the chain where one was built.
    let denied = payloads_of(&l, "exchange.denied").await;
    assert!(
        denied.iter().any(
            |p| p["reason"] == "DELEGATION_DENIED" && p["detail"]["claims"]["sub"] == "builder"
        )
    );
}

#[tokio::test]
async fn the_cli_exchanges_with_an_actor_token() {
    let (l, issuer) = start_delegation().await;
    let dir = l.data_dir().parent().unwrap().to_owned();
    let subject = dir.join("subject.jwt");
    let actor = dir.join("actor.jwt");
    std::fs::write(&subject, issuer.mint(&claims(&issuer, "builder", "r"))).unwrap();
    std::fs::write(&actor, issuer.mint(&claims(&issuer, "agent", "s"))).unwrap();
    let out = tokio::process::Command::new(lanyard_testkit::process::binary())
        .args([
            "--grpc",
            &l.grpc,
            "--output",
            "json",
            "exchange",
            "--token-file",
        ])
        .arg(&subject)
        .arg("--actor-token-file")
        .arg(&actor)
        .args(["--destination", "orders", "--scope", "read"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(r["workload_id"], "spiffe://lanyard.local/ci/builder", "{r}");
    let grants = l
        .admin()
        .await
        .list_grants(pb::ListGrantsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .grants;
    assert_eq!(grants[0].actor_chain, ["spiffe://lanyard.local/ci/agent"]);
}
