//! RFC 7662 introspection end to end: the real binary, a real local OIDC issuer over
//! HTTP, a resource server authenticating with its own platform token at
//! `POST /oauth2/introspect`, and revocation biting at once.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use lanyard_proto::v1 as pb;
use lanyard_testkit::{KeyAlg, Lanyard, LanyardOptions, TestIssuer, eventually};
use serde_json::{Value, json};

/// The resource server behind the `orders` destination, as the trust rule names it.
const RS: &str = "spiffe://lanyard.local/ci/orders-api";
const INACTIVE: &str = r#"{"active":false}"#;

/// lanyard with `issuer` registered with replay protection on (so a client token that
/// is reused proves client authentication does not consume it), the `orders`
/// destination listing [`RS`] as its introspection client, and that configuration in
/// force.
async fn start_with_rs(issuer: &TestIssuer) -> Lanyard {
    let l = Lanyard::start(LanyardOptions {
        policy: Some(POLICY.into()),
        ..Default::default()
    })
    .await;
    configure(&l, issuer, Keys::Inline, KeyAlg::Es256, true).await;
    set_introspection_clients(&l, &[RS]).await;
    // The change is in force at once on the server that took it; poll anyway.
    let (token, _) = exchange(&l, issuer, "run-probe").await;
    let rs = platform_token(issuer, "orders-api");
    eventually("introspection_clients in force", || {
        let (l, rs, token) = (&l, rs.clone(), token.clone());
        async move {
            introspect(l, Some(&rs), &token).await.body["active"]
                .as_bool()?
                .then_some(())
        }
    })
    .await;
    l
}

/// Set the `orders` destination's `introspection_clients` through the admin API, with
/// the CLI's `--introspection-client` flag.
async fn set_introspection_clients(l: &Lanyard, clients: &[&str]) {
    let mut args = vec![
        "destination",
        "put",
        "--name",
        "orders",
        "--kind",
        "jwt",
        "--scope",
        "read",
        "--scope",
        "write",
        "--scope",
        "admin",
        "--default-ttl",
        "300",
        "--max-ttl",
        "600",
        "--setting",
        "audience=https://orders.internal",
    ];
    for c in clients {
        args.extend(["--introspection-client", c]);
    }
    let out = admin_cli_json(l, &args).await;
    assert_eq!(out["introspection_clients"], json!(clients));
}

/// The platform token of workload `spiffe://lanyard.local/ci/{sub}` (fresh `jti`).
fn platform_token(issuer: &TestIssuer, sub: &str) -> String {
    issuer.mint(&claims(issuer, sub, &format!("{sub}-task")))
}

/// Exchange as `builder` in task `run` for `orders` with scope `read`.
async fn exchange(l: &Lanyard, issuer: &TestIssuer, run: &str) -> (String, pb::ExchangeResponse) {
    let resp = l
        .exchange()
        .await
        .exchange(exchange_req(
            issuer.mint(&claims(issuer, "builder", run)),
            &["read"],
        ))
        .await
        .unwrap()
        .into_inner();
    (bearer(&resp), resp)
}

/// What `POST /oauth2/introspect` answered.
struct Answer {
    status: reqwest::StatusCode,
    headers: reqwest::header::HeaderMap,
    /// The body as sent.
    text: String,
    /// The body parsed (`Null` if it is not JSON).
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", |v| v.to_str().unwrap())
    }
}

/// `POST /oauth2/introspect` with `Authorization: Bearer <client>` (if any) and form
/// body `token=<token>`.
async fn introspect(l: &Lanyard, client: Option<&str>, token: &str) -> Answer {
    introspect_form(l, client, &[("token", token)]).await
}

async fn introspect_form(l: &Lanyard, client: Option<&str>, form: &[(&str, &str)]) -> Answer {
    let mut req = reqwest::Client::new()
        .post(format!("{}/oauth2/introspect", l.http))
        .form(form);
    if let Some(c) = client {
        req = req.bearer_auth(c);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        text,
        body,
    }
}

#[tokio::test]
async fn a_listed_resource_server_sees_the_token_active_until_it_is_released() {
    let issuer = TestIssuer::start(KeyAlg::Es256).await;
    let l = start_with_rs(&issuer).await;
    let (token, resp) = exchange(&l, &issuer, "run-1").await;
    let minted = verify_with_lanyard_jwks(&l, &token, ORDERS_AUD).await;
    // One platform token, reused for every call (its issuer has replay protection).
    let rs = platform_token(&issuer, "orders-api");

    let a = introspect(&l, Some(&rs), &token).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.header("content-type"), "application/json");
    assert_eq!(a.header("cache-control"), "no-store");
    assert_eq!(
        a.body,
        json!({
            "active": true,
            "scope": "read",
            "client_id": "spiffe://lanyard.local/ci/builder",
            "sub": "spiffe://lanyard.local/ci/builder",
            "aud": ORDERS_AUD,
            "iss": minted["iss"],
            "exp": minted["exp"],
            "iat": minted["iat"],
            "nbf": minted["nbf"],
            "jti": minted["jti"],
            "token_type": "Bearer",
            "grant_id": resp.grant_id,
            "destination": "orders",
        })
    );
    for _ in 0..3 {
        assert_eq!(introspect(&l, Some(&rs), &token).await.body["active"], true);
    }

    // A client the destination does not list learns nothing, not even "unknown";
    // neither does the workload holding the token.
    for client in ["billing-api", "builder"] {
        let a = introspect(&l, Some(&platform_token(&issuer, client)), &token).await;
        assert_eq!(
            (a.status.as_u16(), a.text.as_str()),
            (200, INACTIVE),
            "{client}"
        );
    }

    // Released: inactive on the very next call, long before the token's exp.
    l.exchange()
        .await
        .release(pb::ReleaseRequest {
            grant_id: resp.grant_id.clone(),
            subject_token: issuer.mint(&claims(&issuer, "builder", "run-1")),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(minted["exp"].as_i64().unwrap() > now() + 60);
    let a = introspect(&l, Some(&rs), &token).await;
    assert_eq!((a.status.as_u16(), a.text.as_str()), (200, INACTIVE));
    assert_eq!(a.header("cache-control"), "no-store");

    // Counted by result, never audited.
    let metrics = reqwest::get(format!("{}/metrics", l.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (result, at_least) in [("active", 5.0), ("inactive", 3.0)] {
        let prefix = format!("lanyard_introspections_total{{result=\"{result}\"}}");
        let n: f64 = metrics
            .lines()
            .find_map(|line| line.strip_prefix(&prefix)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {result} count in\n{metrics}"));
        assert!(n >= at_least, "{result}: {n}");
    }
    assert!(
        audit_events(&l)
            .await
            .iter()
            .all(|e| !e.kind.contains("introspect")),
        "introspection writes no audit event"
    );
}

#[tokio::test]
async fn clients_must_prove_themselves_and_foreign_or_garbage_tokens_are_inactive() {
    let issuer = TestIssuer::start(KeyAlg::Es256).await;
    let l = start_with_rs(&issuer).await;
    let (token, _) = exchange(&l, &issuer, "run-1").await;
    let rs = platform_token(&issuer, "orders-api");

    // Advertised in lanyard's discovery document.
    let disc: Value = reqwest::get(format!("{}/.well-known/openid-configuration", l.http))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        disc["introspection_endpoint"],
        format!("{}/oauth2/introspect", disc["issuer"].as_str().unwrap())
    );

    // No Authorization: 401 with a Bearer challenge, and no answer.
    let a = introspect(&l, None, &token).await;
    assert_eq!(a.status, 401);
    assert!(
        a.header("www-authenticate").starts_with("Bearer"),
        "{:?}",
        a.headers
    );
    assert_eq!(a.header("cache-control"), "no-store");
    assert!(a.body.get("active").is_none(), "{}", a.text);
    // A client token that is not a token, from an issuer lanyard does not trust, or
    // lanyard's own access token: 401 invalid_token with the reason.
    let unknown = TestIssuer::start(KeyAlg::Es256).await;
    for (client, reason) in [
        ("garbage".to_owned(), "TOKEN_MALFORMED"),
        (platform_token(&unknown, "orders-api"), "ISSUER_UNKNOWN"),
        (token.clone(), "TOKEN_TYPE_REJECTED"),
    ] {
        let a = introspect(&l, Some(&client), &token).await;
        assert_eq!(a.status, 401, "{reason}: {}", a.text);
        assert!(
            a.header("www-authenticate")
                .contains(r#"error="invalid_token""#),
            "{:?}",
            a.headers
        );
        assert_eq!(a.body["error"], "invalid_token");
        assert_eq!(a.body["reason"], reason);
        assert!(a.body.get("active").is_none(), "{}", a.text);
    }

    // Malformed requests: no token, a body over 64 KiB.
    let a = introspect_form(&l, Some(&rs), &[("token_type_hint", "access_token")]).await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert_eq!(a.body["error"], "invalid_request");
    let a = introspect(&l, Some(&rs), &"x".repeat(70 * 1024)).await;
    assert_eq!(a.status, 413);

    // Garbage, oversized, and a token of another lanyard (its own keys) are inactive;
    // this lanyard's own token stays active, whatever the hint says.
    let other = Lanyard::start(LanyardOptions {
        policy: Some(POLICY.into()),
        ..Default::default()
    })
    .await;
    configure(&other, &issuer, Keys::Inline, KeyAlg::Es256, false).await;
    let (foreign, _) = exchange(&other, &issuer, "run-2").await;
    for bad in [
        "garbage".to_owned(),
        "a.b.c".to_owned(),
        foreign,
        "e".repeat(17 * 1024),
    ] {
        let a = introspect(&l, Some(&rs), &bad).await;
        assert_eq!((a.status.as_u16(), a.text.as_str()), (200, INACTIVE));
    }
    let a = introspect_form(
        &l,
        Some(&rs),
        &[("token", &token), ("token_type_hint", "refresh_token")],
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["active"], true);
}

/// The gRPC form answers as the HTTP one: claims for a listed client, only
/// `active=false` for everyone else and after revocation, and the client token's reason
/// when it is refused; a distrusted issuer's tokens authenticate nobody.
#[tokio::test]
async fn the_grpc_introspect_call_answers_like_the_endpoint() {
    let issuer = TestIssuer::start(KeyAlg::Es256).await;
    let l = start_with_rs(&issuer).await;
    let (token, resp) = exchange(&l, &issuer, "run-grpc").await;
    let mut c = l.exchange().await;
    let ask = |client: String, token: String| pb::IntrospectRequest {
        token,
        client_token: client,
        client_token_type: String::new(),
    };
    let active = c
        .introspect(ask(platform_token(&issuer, "orders-api"), token.clone()))
        .await
        .unwrap()
        .into_inner();
    assert!(active.active);
    assert_eq!(active.grant_id, resp.grant_id);
    assert_eq!(active.destination, "orders");
    assert_eq!(active.sub, format!("spiffe://lanyard.local/ci/builder"));
    assert_eq!(active.token_type, "Bearer");
    // Not listed: nothing but active=false.
    let other = c
        .introspect(ask(platform_token(&issuer, "someone-else"), token.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(other, pb::IntrospectResponse::default());
    // A refused client token is an error with its reason.
    let err = c
        .introspect(ask("not.a.jwt".into(), token.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    // Revoked by an operator: inactive on the next call.
    admin_cli_json(
        &l,
        &[
            "revoke",
            "--grant",
            &resp.grant_id,
            "--reason",
            "introspection test",
        ],
    )
    .await;
    let revoked = c
        .introspect(ask(platform_token(&issuer, "orders-api"), token.clone()))
        .await
        .unwrap()
        .into_inner();
    assert!(!revoked.active);
    // After the issuer is distrusted, its tokens authenticate no client.
    admin_cli_json(&l, &["issuer", "distrust", "ci", "--reason", "test"]).await;
    let err = c
        .introspect(ask(platform_token(&issuer, "orders-api"), token))
        .await
        .unwrap_err();
    assert_eq!(lanyard_testkit::reason(&err), "ISSUER_DISTRUSTED");
}
