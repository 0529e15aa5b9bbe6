//! The destination kill switch through the real binary: `lanyard destination disable`
//! refuses new exchanges for the destination, revokes its grants with receipts, is
//! audited, and with `--at-destination` archives a Claude federation rule through an
//! admin API on loopback that checks what Anthropic's would (path, bearer token,
//! `anthropic-version`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use common::*;
use lanyard_proto::v1 as pb;
use lanyard_testkit::reason;
use serde_json::{Value, json};

const RULE: &str = "fdrl_01killswitchtest";
const ADMIN_TOKEN: &str = "sk-ant-oat01-admin-token-for-the-kill-switch-test";

/// Anthropic's admin API, as far as archiving a rule goes.
#[derive(Clone, Default)]
struct Admin {
    refuse: Arc<Mutex<bool>>,
    archived: Arc<Mutex<Vec<String>>>,
}

async fn archive(
    State(a): State<Admin>,
    Path(rule): Path<String>,
    headers: HeaderMap,
) -> axum::response::Response {
    let h = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or("");
    if h("authorization") != format!("Bearer {ADMIN_TOKEN}") {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"type": "error", "error": {"type": "authentication_error", "message": "invalid bearer token"}})),
        )
            .into_response();
    }
    if h("anthropic-version") != "2023-06-01" {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"type": "error", "error": {"type": "invalid_request_error", "message": "anthropic-version required"}})),
        )
            .into_response();
    }
    if *a.refuse.lock().unwrap() {
        return (
            StatusCode::FORBIDDEN,
            axum::Json(json!({"type": "error", "error": {"type": "permission_error", "message": "this token cannot archive rules"}})),
        )
            .into_response();
    }
    a.archived.lock().unwrap().push(rule.clone());
    axum::Json(json!({
        "id": rule,
        "type": "federation_rule",
        "name": "ci agents",
        "archived_at": "2026-11-24T03:00:00Z",
    }))
    .into_response()
}

async fn start_admin() -> (String, Admin) {
    let admin = Admin::default();
    let app = Router::new()
        .route(
            "/v1/organizations/federation_rules/{rule}/archive",
            post(archive),
        )
        .with_state(admin.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), admin)
}

async fn exchange(
    l: &lanyard_testkit::Lanyard,
    issuer: &lanyard_testkit::TestIssuer,
    run: &str,
) -> Result<pb::ExchangeResponse, tonic::Status> {
    l.exchange()
        .await
        .exchange(pb::ExchangeRequest {
            subject_token: issuer.mint(&claims(issuer, "agent", run)),
            destination: "orders".into(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn disabling_a_destination_refuses_exchanges_and_revokes_its_grants() {
    let (l, issuer) = start_for_destination("orders").await;
    let a = exchange(&l, &issuer, "run-1").await.unwrap();
    let b = exchange(&l, &issuer, "run-2").await.unwrap();

    // A jwt destination has no switch at the destination: lanyard says so, and its own
    // side still holds.
    let out = admin_cli_json(
        &l,
        &[
            "destination",
            "disable",
            "orders",
            "--reason",
            "leaked signing policy",
            "--at-destination",
        ],
    )
    .await;
    assert_eq!(out["job"]["matched"], 2, "{out}");
    assert_eq!(out["job"]["deny_entry"], "destination:orders");
    assert_eq!(out["kill_switch"]["outcome"], "unsupported", "{out}");
    assert_eq!(out["summary"]["revoked"], 2, "{out}");
    let mut revoked: Vec<String> = out["receipts"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["grant_ids"].as_array().unwrap().clone())
        .map(|g| g.as_str().unwrap().to_owned())
        .collect();
    revoked.sort();
    let mut want = vec![a.grant_id.clone(), b.grant_id.clone()];
    want.sort();
    assert_eq!(revoked, want);

    let err = exchange(&l, &issuer, "run-3").await.unwrap_err();
    assert_eq!(reason(&err), "DESTINATION_DISABLED");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message().contains("destination:orders"),
        "{}",
        err.message()
    );
    let denied = payloads_of(&l, "exchange.denied").await;
    assert!(
        denied.iter().any(|e| e["reason"] == "DESTINATION_DISABLED"),
        "the refusal is audited"
    );
    let switched = payloads_of(&l, "destination.kill_switch").await;
    assert_eq!(switched.len(), 1);
    assert_eq!(switched[0]["decision"], "unsupported");

    let deny = admin_cli_json(&l, &["deny", "list"]).await;
    assert_eq!(deny["entries"][0]["name"], "destination:orders");
    assert_eq!(
        deny["entries"][0]["expires_at"],
        Value::Null,
        "until lifted"
    );
    let (ok, _, stderr) = admin_cli(&l, &["deny", "lift", "destination:orders"]).await;
    assert!(ok, "{stderr}");
    exchange(&l, &issuer, "run-4")
        .await
        .expect("exchanges work again once the entry is lifted");

    let (ok, _, stderr) = admin_cli(&l, &["destination", "disable", "nope", "--reason", "x"]).await;
    assert!(!ok);
    assert!(stderr.contains("no destination named"), "{stderr}");
    let (ok, _, stderr) =
        admin_cli(&l, &["destination", "disable", "orders", "--reason", " "]).await;
    assert!(!ok);
    assert!(stderr.contains("reason is required"), "{stderr}");
}

#[tokio::test]
async fn the_claude_kill_switch_archives_the_federation_rule() {
    let (l, _issuer) = start_for_destination("claude").await;
    let (admin_url, admin) = start_admin().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, format!("{ADMIN_TOKEN}\n")).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let put = |settings: Value| {
        let l = &l;
        async move {
            let s = settings.to_string();
            admin_cli_json(
                l,
                &[
                    "destination",
                    "put",
                    "--name",
                    "claude",
                    "--kind",
                    "claude",
                    "--settings-json",
                    &s,
                ],
            )
            .await
        }
    };
    let settings = json!({
        "token_url": "http://127.0.0.1:9/v1/oauth/token",
        "federation_rule_id": RULE,
        "organization_id": "0f8e1c52-1b1a-4c6e-9a4e-3f1f2a9b8c7d",
        "service_account_id": "svac_01killswitch",
        "admin_url": admin_url,
        "admin_token_file": token_file.to_str().unwrap(),
        "max_attempts": 1,
    });
    put(settings.clone()).await;

    *admin.refuse.lock().unwrap() = true;
    let (ok, stdout, stderr) = admin_cli(
        &l,
        &[
            "destination",
            "disable",
            "claude",
            "--reason",
            "incident 42",
            "--at-destination",
            "--output",
            "json",
        ],
    )
    .await;
    assert!(!ok, "a failed switch at the destination fails the command");
    assert!(
        stderr.contains("kill switch at destination claude failed"),
        "{stderr}"
    );
    let out: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(out["kill_switch"]["outcome"], "failed");
    assert!(
        out["kill_switch"]["detail"]
            .as_str()
            .unwrap()
            .contains("permission_error"),
        "{out}"
    );
    assert!(admin.archived.lock().unwrap().is_empty());

    *admin.refuse.lock().unwrap() = false;
    let out = admin_cli_json(
        &l,
        &[
            "destination",
            "disable",
            "claude",
            "--reason",
            "incident 42",
            "--at-destination",
        ],
    )
    .await;
    assert_eq!(out["kill_switch"]["outcome"], "done", "{out}");
    let detail = out["kill_switch"]["detail"].as_str().unwrap();
    assert!(
        detail.contains(RULE) && detail.contains("archived_at"),
        "{detail}"
    );
    assert!(detail.contains("stay valid until they expire"), "{detail}");
    assert_eq!(*admin.archived.lock().unwrap(), vec![RULE.to_owned()]);
    let switched = payloads_of(&l, "destination.kill_switch").await;
    assert_eq!(
        switched
            .iter()
            .map(|e| e["decision"].as_str().unwrap())
            .collect::<Vec<_>>(),
        vec!["failed", "done"]
    );
    assert!(
        !l.log().contains(ADMIN_TOKEN),
        "the admin token is never logged"
    );

    // Without an admin token the switch cannot be pulled, and says what to do instead.
    let mut no_token = settings;
    no_token.as_object_mut().unwrap().remove("admin_token_file");
    put(no_token).await;
    let (ok, stdout, _) = admin_cli(
        &l,
        &[
            "destination",
            "disable",
            "claude",
            "--reason",
            "incident 43",
            "--at-destination",
            "--output",
            "json",
        ],
    )
    .await;
    assert!(!ok);
    let out: Value = serde_json::from_str(&stdout).unwrap();
    assert!(
        out["kill_switch"]["detail"]
            .as_str()
            .unwrap()
            .contains("archive it in the Claude Console"),
        "{out}"
    );
}
