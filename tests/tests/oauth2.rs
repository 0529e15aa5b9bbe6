//! The generic `oauth2` destination through the real binary, against an authorization
//! server on loopback (`lanyard_testkit::oauth_server`) that authenticates the client,
//! verifies lanyard's JWT against lanyard's JWKS over HTTP, issues opaque tokens it
//! remembers, and revokes them at its RFC 7009 endpoint.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::PermissionsExt as _;

use common::*;
use lanyard_proto::v1 as pb;
use lanyard_testkit::oauth_server::{ClientCheck, Config, OAuthServer, RevokeMode};
use lanyard_testkit::token_endpoint::Answer;
use lanyard_testkit::{Lanyard, TestIssuer, eventually, reason};
use serde_json::{Value, json};

const NAME: &str = "as";

async fn start(config: Config) -> (Lanyard, TestIssuer, OAuthServer) {
    let (l, issuer) = start_for_destination(NAME).await;
    let server = OAuthServer::start(config).await;
    let http = l.http.clone();
    server.configure(|c| {
        c.issuer = http.clone();
        c.jwks_url = format!("{http}/.well-known/jwks.json");
    });
    (l, issuer, server)
}

fn config(grant_type: &'static str, client: ClientCheck) -> Config {
    Config {
        grant_type,
        issuer: String::new(),
        jwks_url: String::new(),
        audience: String::new(),
        client,
        fields: Default::default(),
        token_lifetime: 300,
    }
}

async fn put(l: &Lanyard, settings: Value, scopes: &[&str]) -> Value {
    let settings = settings.to_string();
    let mut args = vec![
        "destination",
        "put",
        "--name",
        NAME,
        "--kind",
        "oauth2",
        "--default-ttl",
        "300",
        "--max-ttl",
        "900",
        "--settings-json",
        &settings,
    ];
    for s in scopes {
        args.extend(["--scope", s]);
    }
    admin_cli_json(l, &args).await
}

async fn exchange(
    l: &Lanyard,
    issuer: &TestIssuer,
    run: &str,
    scopes: &[&str],
) -> Result<pb::ExchangeResponse, tonic::Status> {
    l.exchange()
        .await
        .exchange(pb::ExchangeRequest {
            subject_token: issuer.mint(&claims(issuer, "agent", run)),
            destination: NAME.into(),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            requested_ttl_seconds: 300,
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

fn secret_file(dir: &tempfile::TempDir, secret: &str) -> String {
    let p = dir.path().join("client-secret");
    std::fs::write(&p, format!("{secret}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p.to_str().unwrap().to_owned()
}

/// RFC 8693 with client_secret_basic and mapped scopes; the token is revoked at the
/// server's RFC 7009 endpoint, and lanyard keeps only a sealed copy of it.
#[tokio::test]
async fn token_exchange_with_a_client_secret_and_rfc7009_revocation() {
    let mut cfg = config(
        "token-exchange",
        ClientCheck::Secret {
            id: "lanyard client".into(),
            secret: "s3cret:with/odd chars".into(),
            basic: true,
        },
    );
    cfg.fields.insert("scope", "read:orders read:items".into());
    cfg.fields.insert("audience", "orders-api".into());
    let (l, issuer, server) = start(cfg).await;
    let dir = tempfile::tempdir().unwrap();
    let out = put(
        &l,
        json!({
            "token_url": server.token_url,
            "revocation_url": server.revocation_url,
            "audience": "orders-api",
            "client_id": "lanyard client",
            "client_auth": "client_secret_basic",
            "client_secret_file": secret_file(&dir, "s3cret:with/odd chars"),
            "scope_map": {"orders.read": "read:orders read:items"},
            "max_attempts": 1,
        }),
        &["orders.read"],
    )
    .await;
    assert_eq!(out["kind"], "oauth2");

    let resp = exchange(&l, &issuer, "run-1", &["orders.read"])
        .await
        .unwrap();
    let token = bearer(&resp);
    assert!(token.starts_with("at-"));
    assert!(server.is_active(&token));
    assert_eq!(resp.revocability, pb::Revocability::Immediate as i32);
    let Some(pb::credential::Kind::Bearer(b)) = resp.credential.as_ref().unwrap().kind.as_ref()
    else {
        panic!("bearer expected")
    };
    assert_eq!(
        b.issued_token_type,
        "urn:ietf:params:oauth:token-type:access_token"
    );
    let seen = server.accepted();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["sub"], resp.workload_id.as_str());
    assert_eq!(seen[0]["aud"], server.token_url.as_str());
    assert_eq!(seen[0]["lanyard"]["grant_id"], resp.grant_id.as_str());
    assert_eq!(
        seen[0]["exp"].as_i64().unwrap() - seen[0]["iat"].as_i64().unwrap(),
        300
    );
    let expires = resp.expires_at.unwrap().seconds;
    assert!((now() + 290..=now() + 305).contains(&expires));

    // The grant's handle is sealed: the token appears nowhere lanyard shows or logs.
    let grants = admin_cli(&l, &["grants", "list", "--output", "json"]).await;
    assert!(grants.0, "{}", grants.2);
    assert!(!grants.1.contains(&token));
    assert!(grants.1.contains("v1."), "the sealed handle is listed");

    let out = admin_cli_json(
        &l,
        &["revoke", "--grant", &resp.grant_id, "--reason", "e2e"],
    )
    .await;
    let receipt = &out["receipts"][0];
    assert_eq!(receipt["outcome"], "revoked", "{out}");
    assert!(
        receipt["detail"].as_str().unwrap().contains("RFC 7009"),
        "{receipt}"
    );
    assert!(!server.is_active(&token), "revoked at the server");
    assert_eq!(server.revocations(), vec![token.clone()]);
    let log = l.log();
    assert!(!log.contains(&token), "the token is never logged");
    assert!(!log.contains("s3cret"), "nor the client secret");
}

/// RFC 7523 jwt-bearer with private_key_jwt (lanyard signs the client assertion too),
/// no revocation endpoint: the receipt states the residual lifetime.
#[tokio::test]
async fn jwt_bearer_with_private_key_jwt_lapses_at_expiry() {
    let mut cfg = config(
        "jwt-bearer",
        ClientCheck::PrivateKeyJwt {
            id: "lanyard-as-client".into(),
        },
    );
    cfg.audience = "https://as.example/".into();
    cfg.fields.insert("scope", "inference".into());
    let (l, issuer, server) = start(cfg).await;
    let out = put(
        &l,
        json!({
            "token_url": server.token_url,
            "grant": "jwt-bearer",
            "assertion_audience": "https://as.example/",
            "client_id": "lanyard-as-client",
            "client_auth": "private_key_jwt",
            "max_attempts": 1,
        }),
        &["inference"],
    )
    .await;
    assert_eq!(out["settings"]["grant"], "jwt-bearer", "{out}");
    let resp = exchange(&l, &issuer, "run-1", &["inference"])
        .await
        .unwrap();
    assert!(server.is_active(&bearer(&resp)));
    assert_eq!(resp.revocability, pb::Revocability::AtExpiry as i32);
    let out = admin_cli_json(
        &l,
        &["revoke", "--grant", &resp.grant_id, "--reason", "e2e"],
    )
    .await;
    assert_eq!(out["receipts"][0]["outcome"], "expires_at", "{out}");
    assert!(
        out["receipts"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("no revocation_url"),
        "{out}"
    );
    assert!(server.revocations().is_empty());

    // The server's refusals keep their OAuth code; nothing about the token is echoed.
    server.configure(|c| c.audience = "https://someone-else.example/".into());
    let err = exchange(&l, &issuer, "run-2", &["inference"])
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "DESTINATION_REJECTED");
    assert!(err.message().contains("invalid_grant"), "{}", err.message());
    server.configure(|c| {
        c.audience = "https://as.example/".into();
        c.client = ClientCheck::PrivateKeyJwt {
            id: "another-client".into(),
        };
    });
    let err = exchange(&l, &issuer, "run-3", &["inference"])
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "DESTINATION_REJECTED");
    assert!(
        err.message().contains("invalid_client"),
        "{}",
        err.message()
    );
}

/// private_key_jwt on both calls (the client assertion names the token endpoint, also
/// at the revocation endpoint); renewing revokes the previous token at the server; a
/// token that would outlive its grant, or a token exchange answer without
/// issued_token_type, is refused.
#[tokio::test]
async fn renewal_revokes_the_previous_token_and_lifetimes_are_bounded() {
    let (l, issuer, server) = start(config(
        "token-exchange",
        ClientCheck::PrivateKeyJwt {
            id: "lanyard-client".into(),
        },
    ))
    .await;
    put(
        &l,
        json!({
            "token_url": server.token_url,
            "revocation_url": server.revocation_url,
            "client_id": "lanyard-client",
            "client_auth": "private_key_jwt",
            "send_scope": false,
            "max_attempts": 1,
        }),
        &[],
    )
    .await;
    let first = exchange(&l, &issuer, "run-1", &[]).await.unwrap();
    let renewed = l
        .exchange()
        .await
        .renew(pb::RenewRequest {
            grant_id: first.grant_id.clone(),
            subject_token: issuer.mint(&claims(&issuer, "agent", "run-1")),
            requested_ttl_seconds: 300,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(bearer(&renewed), bearer(&first));
    assert!(server.is_active(&bearer(&renewed)));
    assert!(
        !server.is_active(&bearer(&first)),
        "the previous token was revoked at the server"
    );
    let out = admin_cli_json(
        &l,
        &["revoke", "--grant", &first.grant_id, "--reason", "e2e"],
    )
    .await;
    assert_eq!(out["receipts"][0]["outcome"], "revoked", "{out}");
    assert!(
        !server.is_active(&bearer(&renewed)),
        "the renewed token too"
    );

    server.configure(|c| c.token_lifetime = 900);
    let err = exchange(&l, &issuer, "run-2", &[]).await.unwrap_err();
    assert_eq!(reason(&err), "DESTINATION_REJECTED");
    assert!(
        err.message().contains("longer than the grant"),
        "{}",
        err.message()
    );
}

/// A server that will not revoke access tokens gives an honest `expires_at`; one that
/// is unavailable gives a failed receipt that is retried until it succeeds. A public
/// client sends its client_id.
#[tokio::test]
async fn revocation_unsupported_or_unavailable() {
    let (l, issuer, server) = start(config(
        "token-exchange",
        ClientCheck::Public {
            id: Some("public-client".into()),
        },
    ))
    .await;
    put(
        &l,
        json!({
            "token_url": server.token_url,
            "revocation_url": server.revocation_url,
            "client_id": "public-client",
            "send_scope": false,
            "max_attempts": 1,
        }),
        &[],
    )
    .await;
    let first = exchange(&l, &issuer, "run-1", &[]).await.unwrap();
    server.revoke_mode(RevokeMode::Unsupported);
    let out = admin_cli_json(
        &l,
        &["revoke", "--grant", &first.grant_id, "--reason", "e2e"],
    )
    .await;
    assert_eq!(out["receipts"][0]["outcome"], "expires_at", "{out}");
    assert!(
        out["receipts"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("unsupported_token_type")
    );
    assert!(server.is_active(&bearer(&first)), "nothing was revoked");

    let second = exchange(&l, &issuer, "run-2", &[]).await.unwrap();
    server.revoke_mode(RevokeMode::Unavailable);
    let (ok, stdout, stderr) = admin_cli(
        &l,
        &[
            "revoke",
            "--grant",
            &second.grant_id,
            "--reason",
            "e2e",
            "--output",
            "json",
        ],
    )
    .await;
    assert!(!ok, "a failed step makes the command fail: {stdout}");
    assert!(stderr.contains("being retried"), "{stderr}");
    let out: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(out["receipts"][0]["outcome"], "failed", "{out}");
    assert!(
        out["receipts"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("503"),
        "{out}"
    );
    let job_id = out["job"]["id"].as_str().unwrap().to_owned();
    server.revoke_mode(RevokeMode::Normal);
    let done = eventually("the retried revocation succeeds", || async {
        let r = l
            .admin()
            .await
            .get_revocation(pb::GetRevocationRequest {
                job_id: job_id.clone(),
                include_receipts: true,
            })
            .await
            .unwrap()
            .into_inner();
        (r.job.as_ref().unwrap().state == "done").then_some(r)
    })
    .await;
    assert_eq!(done.receipts.last().unwrap().outcome, "revoked");
    assert!(!server.is_active(&bearer(&second)));
}

/// Transport failures are DESTINATION_UNAVAILABLE; bad settings are refused at put.
#[tokio::test]
async fn unreachable_servers_and_bad_settings() {
    let (l, issuer, server) =
        start(config("token-exchange", ClientCheck::Public { id: None })).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    put(
        &l,
        json!({"token_url": format!("http://127.0.0.1:{port}/token"), "max_attempts": 1}),
        &[],
    )
    .await;
    let err = exchange(&l, &issuer, "run-1", &[]).await.unwrap_err();
    assert_eq!(reason(&err), "DESTINATION_UNAVAILABLE");

    // Answers lanyard must not trust: a hang (timeout), too large, malformed, 5xx.
    put(
        &l,
        json!({"token_url": server.token_url, "max_attempts": 1, "timeout_secs": 1,
               "max_response_bytes": 4096, "send_scope": false}),
        &[],
    )
    .await;
    for (answer, want_reason, want_text) in [
        (Answer::Hang, "DESTINATION_UNAVAILABLE", "timed out"),
        (
            Answer::oversized(10_000),
            "DESTINATION_REJECTED",
            "exceeds 4096 bytes",
        ),
        (
            Answer::Raw(200, "{\"access_token\": 7".into()),
            "DESTINATION_REJECTED",
            "malformed token response",
        ),
        (
            Answer::Json(503, json!({"error": "temporarily_unavailable"})),
            "DESTINATION_UNAVAILABLE",
            "temporarily_unavailable",
        ),
        (
            Answer::Json(
                200,
                json!({"access_token": "t", "token_type": "Bearer", "expires_in": 60}),
            ),
            "DESTINATION_REJECTED",
            "without issued_token_type",
        ),
    ] {
        server.answer(answer);
        let err = exchange(&l, &issuer, "run-x", &[]).await.unwrap_err();
        assert_eq!(reason(&err), want_reason, "{}", err.message());
        assert!(err.message().contains(want_text), "{}", err.message());
    }

    for (settings, want) in [
        (json!({"token_url": "http://as.example/token"}), "https"),
        (
            json!({"token_url": "https://as.example/token", "bogus": 1}),
            "unknown field",
        ),
        (
            json!({"token_url": "https://as.example/token", "client_auth": "client_secret_post", "client_id": "c", "client_secret_file": "/nonexistent/secret"}),
            "cannot read client_secret_file",
        ),
    ] {
        let s = settings.to_string();
        let (ok, _, stderr) = admin_cli(
            &l,
            &[
                "destination",
                "put",
                "--name",
                "bad",
                "--kind",
                "oauth2",
                "--settings-json",
                &s,
            ],
        )
        .await;
        assert!(!ok);
        assert!(stderr.contains(want), "{settings}: {stderr}");
    }
}

/// client_secret_post: the secret goes in the body (and only there), read from a file
/// only lanyard's user can read.
#[tokio::test]
async fn client_secret_post_sends_the_secret_in_the_body() {
    let (l, issuer, server) = start(config(
        "jwt-bearer",
        ClientCheck::Secret {
            id: "poster".into(),
            secret: "p0st-secret".into(),
            basic: false,
        },
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    put(
        &l,
        json!({
            "token_url": server.token_url,
            "grant": "jwt-bearer",
            "client_id": "poster",
            "client_auth": "client_secret_post",
            "client_secret_file": secret_file(&dir, "p0st-secret"),
            "send_scope": false,
            "max_attempts": 1,
        }),
        &[],
    )
    .await;
    let resp = exchange(&l, &issuer, "run-1", &[]).await.unwrap();
    assert!(server.is_active(&bearer(&resp)));
    // Basic would be refused by this server: the same secret through the other method.
    let out = put(
        &l,
        json!({
            "token_url": server.token_url,
            "grant": "jwt-bearer",
            "client_id": "poster",
            "client_auth": "client_secret_basic",
            "client_secret_file": secret_file(&dir, "p0st-secret"),
            "send_scope": false,
            "max_attempts": 1,
        }),
        &[],
    )
    .await;
    assert_eq!(out["settings"]["client_auth"], "client_secret_basic");
    let err = exchange(&l, &issuer, "run-2", &[]).await.unwrap_err();
    assert_eq!(reason(&err), "DESTINATION_REJECTED");
    assert!(
        err.message().contains("invalid_client"),
        "{}",
        err.message()
    );
}
