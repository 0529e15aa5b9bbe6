//! The `aws-sts` destination through the real binary: an exchange becomes an STS
//! `AssumeRoleWithWebIdentity` call (PROTOCOLS.md §3.1) and a revocation an IAM deny
//! policy on the role (§3.3), driven through gRPC and the `lanyard` CLI.
//!
//! Two AWS stand-ins run on loopback:
//! - **moto** (`lanyard_testkit::moto`, moto 5.2.1 in server mode) for the happy path:
//!   the role is created with IAM `CreateRole`, the credentials lanyard hands out are
//!   used for a signed `sts:GetCallerIdentity`, and the deny policy is read back with
//!   `GetRolePolicy`.
//! - a tiny axum STS in this file for what moto cannot produce: AWS's error shapes,
//!   oversized and malformed answers, and an answer that never comes.
//!
//! # What moto does not enforce (PROTOCOLS.md §3.4), and what is asserted instead
//! - It does not validate the web identity token (any string passes), the trust
//!   policy, or role existence for STS. So the token's claims (`iss`, one `aud`, `sub`,
//!   `exp` - `iat`, `jti`, the source identity and session tag claims) are checked by
//!   verifying the token the axum STS received with lanyard's JWKS fetched over HTTP.
//! - It does not parse session tags or report `SourceIdentity`: asserted on the token.
//! - It does not evaluate session policies or policy conditions (a `DateLessThan` or
//!   `aws:SourceIdentity` deny would block every session), so the tests do not use the
//!   credentials after revocation; they assert on the deny document written to the
//!   role (the grant ID under `aws:SourceIdentity`, statement bucketing) and on the
//!   session policy moto recorded for the session (`/moto-api/data.json`).
//! - It honours `DurationSeconds` without bounds checks, so the requested duration is
//!   observed through the `Expiration` it answers (the grant's expiry).
//! - It does not check SigV4 signatures; the signer is tested against AWS's published
//!   vector in the adapter's unit tests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use common::*;
use lanyard_proto::v1 as pb;
use lanyard_testkit::moto::{self, ACCOUNT, Keys as AwsKeys, Moto};
use lanyard_testkit::{KeyAlg, Lanyard, LanyardOptions, TestIssuer, reason};
use serde_json::{Value, json};

const ROLE: &str = "lanyard-e2e";
const CAVEAT: &str = "policy changes may take a few minutes to propagate";
const POLICY: &str = r#"
@id("ci-aws")
permit (principal, action, resource)
when { principal.id like "spiffe://lanyard.local/ci/*" };
"#;

fn role_arn() -> String {
    format!("arn:aws:iam::{ACCOUNT}:role/{ROLE}")
}

async fn start() -> (Lanyard, TestIssuer) {
    let issuer = TestIssuer::start(KeyAlg::Es256).await;
    let l = Lanyard::start(LanyardOptions {
        policy: Some(POLICY.into()),
        ..Default::default()
    })
    .await;
    configure(&l, &issuer, Keys::JwksUrl, KeyAlg::Es256, false).await;
    (l, issuer)
}

async fn put_destination(l: &Lanyard, name: &str, scopes: &[&str], settings: Value) {
    let mut args = vec![
        "destination",
        "put",
        "--name",
        name,
        "--kind",
        "aws-sts",
        "--default-ttl",
        "900",
        "--max-ttl",
        "7200",
    ];
    for s in scopes {
        args.extend(["--scope", s]);
    }
    let settings = settings.to_string();
    args.extend(["--settings-json", &settings]);
    let out = admin_cli_json(l, &args).await;
    assert_eq!(out["kind"], "aws-sts", "{out}");
}

async fn exchange(
    l: &Lanyard,
    issuer: &TestIssuer,
    destination: &str,
    scopes: &[&str],
    ttl: u32,
) -> Result<pb::ExchangeResponse, tonic::Status> {
    l.exchange()
        .await
        .exchange(pb::ExchangeRequest {
            subject_token: issuer.mint(&claims(issuer, "deployer", "run-1")),
            destination: destination.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            requested_ttl_seconds: ttl,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

fn aws(resp: &pb::ExchangeResponse) -> pb::AwsCredentials {
    match resp.credential.as_ref().unwrap().kind.as_ref().unwrap() {
        pb::credential::Kind::Aws(a) => a.clone(),
        other => panic!("expected AWS credentials, got {other:?}"),
    }
}

fn expires(resp: &pb::ExchangeResponse) -> i64 {
    resp.expires_at.as_ref().unwrap().seconds
}

/// Every grant ID under `aws:SourceIdentity` in the role's deny policy.
async fn denied_ids(moto: &Moto) -> (Value, Vec<String>) {
    let body = moto
        .ok(
            "iam",
            &[
                ("Action", "GetRolePolicy"),
                ("Version", "2010-05-08"),
                ("RoleName", ROLE),
                ("PolicyName", "lanyard-revoked"),
            ],
            &AwsKeys::admin(),
        )
        .await;
    let doc: Value = serde_json::from_str(&moto::url_decode(
        &moto::xml_text(&body, "PolicyDocument").unwrap(),
    ))
    .unwrap();
    let mut ids = Vec::new();
    for s in doc["Statement"].as_array().unwrap() {
        assert_eq!(s["Effect"], "Deny");
        assert_eq!(s["Action"], "*");
        assert_eq!(s["Resource"], "*");
        assert!(
            s["Sid"]
                .as_str()
                .unwrap()
                .starts_with("LanyardRevokedUntil")
        );
        for id in s["Condition"]["StringEquals"]["aws:SourceIdentity"]
            .as_array()
            .unwrap()
        {
            ids.push(id.as_str().unwrap().to_owned());
        }
    }
    ids.sort();
    (doc, ids)
}

#[tokio::test]
async fn aws_credentials_from_moto_and_revocation_by_deny_policy() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let admin = AwsKeys::admin();
    let trust = json!({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow",
        "Principal": {"Federated": format!("arn:aws:iam::{ACCOUNT}:oidc-provider/lanyard.example")},
        "Action": ["sts:AssumeRoleWithWebIdentity", "sts:TagSession", "sts:SetSourceIdentity"],
    }]});
    moto.ok(
        "iam",
        &[
            ("Action", "CreateRole"),
            ("Version", "2010-05-08"),
            ("RoleName", ROLE),
            ("AssumeRolePolicyDocument", &trust.to_string()),
            ("MaxSessionDuration", "3600"),
        ],
        &admin,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("aws-credentials");
    std::fs::write(&creds, admin.credentials_file_text()).unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let (l, issuer) = start().await;
    let read =
        json!({"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::reports/*"});
    put_destination(
        &l,
        "aws",
        &["s3:read", "s3:write"],
        json!({
            "role_arn": role_arn(),
            "sts_endpoint": moto.url(),
            "iam_endpoint": moto.url(),
            "region": "eu-west-1",
            "max_session_duration_secs": 3600,
            "scope_policies": {
                "s3:read": read,
                "s3:write": [{"Effect": "Allow", "Action": "s3:PutObject", "Resource": "arn:aws:s3:::reports/*"}],
            },
            "credentials_file": creds.to_str().unwrap(),
            "max_attempts": 1,
        }),
    )
    .await;

    // An exchange gives credentials moto issued for this role and session.
    let r1 = exchange(&l, &issuer, "aws", &["s3:read"], 1800)
        .await
        .unwrap();
    assert_eq!(r1.revocability, pb::Revocability::Eventual as i32);
    let c1 = aws(&r1);
    assert_eq!(c1.region, "eu-west-1");
    let session = format!("lanyard-{}", r1.grant_id);
    let state = moto.state().await;
    let assumed = state["sts"]["AssumedRole"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["access_key_id"] == c1.access_key_id.as_str())
        .expect("moto issued the credentials lanyard handed out")
        .clone();
    assert_eq!(assumed["secret_access_key"], c1.secret_access_key.as_str());
    assert_eq!(assumed["session_token"], c1.session_token.as_str());
    assert_eq!(assumed["session_name"], session.as_str());
    assert_eq!(assumed["role_arn"], role_arn().as_str());
    // The session policy holds the granted scope's statement only.
    let policy: Value = serde_json::from_str(assumed["policy"].as_str().unwrap()).unwrap();
    assert_eq!(
        policy,
        json!({"Version": "2012-10-17", "Statement": [read]})
    );
    // The keys work: GetCallerIdentity signed with them names the assumed role session.
    let keys = AwsKeys {
        access_key_id: c1.access_key_id.clone(),
        secret_access_key: c1.secret_access_key.clone(),
        session_token: Some(c1.session_token.clone()),
    };
    let who = moto
        .ok(
            "sts",
            &[("Action", "GetCallerIdentity"), ("Version", "2011-06-15")],
            &keys,
        )
        .await;
    assert_eq!(
        moto::xml_text(&who, "Arn").unwrap(),
        format!("arn:aws:sts::{ACCOUNT}:assumed-role/{ROLE}/{session}")
    );
    // DurationSeconds: the grant's TTL, within 900..=max_session_duration_secs; the
    // grant expires when the credentials do.
    let t = now();
    assert!(
        (t + 1790..=t + 1805).contains(&expires(&r1)),
        "{}",
        expires(&r1) - t
    );
    let r2 = exchange(&l, &issuer, "aws", &["s3:read", "s3:write"], 300)
        .await
        .unwrap();
    assert!(
        (t + 890..=t + 905).contains(&expires(&r2)),
        "AWS's minimum is 900 s"
    );
    let r3 = exchange(&l, &issuer, "aws", &["s3:write"], 7200)
        .await
        .unwrap();
    assert!(
        (t + 3590..=t + 3605).contains(&expires(&r3)),
        "capped at the role's maximum"
    );
    // A grant without a scope that carries a statement would get the whole role.
    let err = exchange(&l, &issuer, "aws", &[], 900).await.unwrap_err();
    assert_eq!(reason(&err), "INVALID_ARGUMENT", "{err:?}");

    // Revoking writes the grant ID into the role's deny policy, honestly reported.
    let out = admin_cli_json(&l, &["revoke", "--grant", &r1.grant_id, "--reason", "e2e"]).await;
    let receipt = &out["receipts"][0];
    assert_eq!(receipt["outcome"], "blocked", "{out}");
    let detail = receipt["detail"].as_str().unwrap();
    for want in [
        CAVEAT,
        &role_arn(),
        "lanyard-revoked",
        "aws:SourceIdentity",
        &r1.grant_id,
        "stay valid until they expire",
    ] {
        assert!(detail.contains(want), "{want:?} not in {detail}");
    }
    let (_, ids) = denied_ids(&moto).await;
    assert_eq!(ids, vec![r1.grant_id.clone()]);
    // A second grant joins the same document.
    let out = admin_cli_json(&l, &["revoke", "--grant", &r2.grant_id, "--reason", "e2e"]).await;
    assert_eq!(out["receipts"][0]["outcome"], "blocked", "{out}");
    let (doc, ids) = denied_ids(&moto).await;
    let mut want = vec![r1.grant_id.clone(), r2.grant_id.clone()];
    want.sort();
    assert_eq!(ids, want, "{doc}");

    // An IAM failure (the role is gone) fails the step with IAM's reason.
    for (action, extra) in [
        ("DeleteRolePolicy", Some(("PolicyName", "lanyard-revoked"))),
        ("DeleteRole", None),
    ] {
        let mut params = vec![
            ("Action", action),
            ("Version", "2010-05-08"),
            ("RoleName", ROLE),
        ];
        params.extend(extra);
        moto.ok("iam", &params, &admin).await;
    }
    let (ok, stdout, stderr) = admin_cli(
        &l,
        &[
            "--output",
            "json",
            "revoke",
            "--grant",
            &r3.grant_id,
            "--reason",
            "role gone",
        ],
    )
    .await;
    assert!(!ok, "a failed revocation exits non-zero: {stdout} {stderr}");
    let out: Value = serde_json::from_str(&stdout).unwrap();
    let r = &out["receipts"][0];
    assert_eq!(r["outcome"], "failed", "{out}");
    let detail = r["detail"].as_str().unwrap();
    assert!(
        detail.contains("NoSuchEntity") && detail.contains("PutRolePolicy"),
        "{detail}"
    );
}

// === a local STS for error shapes ===

#[derive(Clone)]
enum Mode {
    Ok,
    Error(u16, &'static str, &'static str),
    Raw(u16, String),
    Hang,
}

struct Fake {
    mode: Mutex<Mode>,
    seen: Mutex<Vec<HashMap<String, String>>>,
}

async fn sts(State(f): State<Arc<Fake>>, body: String) -> Response {
    let form: HashMap<String, String> = reqwest::Url::parse(&format!("http://x/?{body}"))
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect();
    let duration: i64 = form
        .get("DurationSeconds")
        .and_then(|d| d.parse().ok())
        .unwrap_or(3600);
    let session = form.get("RoleSessionName").cloned().unwrap_or_default();
    f.seen.lock().unwrap().push(form);
    let mode = f.mode.lock().unwrap().clone();
    let xml = |status: u16, body: String| {
        (
            axum::http::StatusCode::from_u16(status).unwrap(),
            [("content-type", "text/xml")],
            body,
        )
            .into_response()
    };
    match mode {
        Mode::Ok => {
            let exp = iso(now() + duration);
            xml(
                200,
                format!(
                    r#"<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <Credentials>
      <AccessKeyId>ASIAFAKESTSEXAMPLE01</AccessKeyId>
      <SecretAccessKey>fake/secret/key</SecretAccessKey>
      <SessionToken>fake-session-token</SessionToken>
      <Expiration>{exp}</Expiration>
    </Credentials>
    <AssumedRoleUser><Arn>arn:aws:sts::{ACCOUNT}:assumed-role/{ROLE}/{session}</Arn><AssumedRoleId>AROAFAKE:{session}</AssumedRoleId></AssumedRoleUser>
  </AssumeRoleWithWebIdentityResult>
  <ResponseMetadata><RequestId>1</RequestId></ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>"#
                ),
            )
        }
        Mode::Error(status, code, message) => xml(
            status,
            format!(
                "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error><RequestId>2</RequestId></ErrorResponse>"
            ),
        ),
        Mode::Raw(status, body) => xml(status, body),
        Mode::Hang => {
            std::future::pending::<()>().await;
            unreachable!()
        }
    }
}

/// `t` as ISO 8601 UTC, e.g. `2026-11-24T05:00:00Z`.
fn iso(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .unwrap()
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

#[tokio::test]
async fn sts_answers_map_to_reasons_and_the_token_carries_aws_claims() {
    let fake = Arc::new(Fake {
        mode: Mutex::new(Mode::Ok),
        seen: Mutex::new(Vec::new()),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route("/", post(sts)).with_state(fake.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let (l, issuer) = start().await;
    let base = |endpoint: String| {
        json!({
            "role_arn": role_arn(),
            "sts_endpoint": endpoint,
            "session_tags": {"Owner": "repository_owner", "Run": "run_id"},
            "transitive_tag_keys": ["Owner"],
            "timeout_secs": 1,
            "max_attempts": 1,
            "max_response_bytes": 65_536,
            "breaker_threshold": 1000,
        })
    };
    put_destination(&l, "aws", &[], base(format!("http://{addr}/"))).await;

    // The call and its token.
    let resp = exchange(&l, &issuer, "aws", &[], 300).await.unwrap();
    assert_eq!(resp.revocability, pb::Revocability::AtExpiry as i32);
    let c = aws(&resp);
    assert_eq!(
        (
            c.access_key_id.as_str(),
            c.secret_access_key.as_str(),
            c.session_token.as_str(),
            c.region.as_str()
        ),
        (
            "ASIAFAKESTSEXAMPLE01",
            "fake/secret/key",
            "fake-session-token",
            "us-east-1"
        )
    );
    let t = now();
    assert!((t + 890..=t + 905).contains(&expires(&resp)));
    let form = fake.seen.lock().unwrap().pop().unwrap();
    assert_eq!(form["Action"], "AssumeRoleWithWebIdentity");
    assert_eq!(form["Version"], "2011-06-15");
    assert_eq!(form["RoleArn"], role_arn());
    assert_eq!(
        form["RoleSessionName"],
        format!("lanyard-{}", resp.grant_id)
    );
    assert_eq!(form["DurationSeconds"], "900");
    assert!(
        !form.contains_key("Policy"),
        "no scope_policies, no session policy"
    );
    let claims = verify_with_lanyard_jwks(&l, &form["WebIdentityToken"], "sts.amazonaws.com").await;
    assert_eq!(claims["sub"], resp.workload_id.as_str());
    assert_eq!(claims["iss"], l.http.as_str());
    assert_eq!(claims["aud"], "sts.amazonaws.com");
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        300
    );
    assert!(claims["jti"].is_string());
    assert_eq!(claims["lanyard"]["grant_id"], resp.grant_id.as_str());
    assert_eq!(claims["lanyard"]["destination"], "aws");
    assert_eq!(
        claims["https://aws.amazon.com/source_identity"],
        resp.grant_id.as_str()
    );
    assert_eq!(
        claims["https://aws.amazon.com/tags"],
        json!({"principal_tags": {"Owner": ["acme"], "Run": ["run-1"]}, "transitive_tag_keys": ["Owner"]})
    );
    // Without a credentials_file the receipt states the expiry.
    let out = admin_cli_json(
        &l,
        &["revoke", "--grant", &resp.grant_id, "--reason", "e2e"],
    )
    .await;
    assert_eq!(out["receipts"][0]["outcome"], "expires_at", "{out}");

    // AWS error answers keep their code; refusals are not retried, outages are.
    for (mode, want_reason, want_text) in [
        (
            Mode::Error(
                400,
                "InvalidIdentityToken",
                "Couldn't verify eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl",
            ),
            "DESTINATION_REJECTED",
            "InvalidIdentityToken: Couldn't verify [redacted]",
        ),
        (
            Mode::Error(
                403,
                "AccessDenied",
                "Not authorized to perform sts:AssumeRoleWithWebIdentity",
            ),
            "DESTINATION_REJECTED",
            "http 403: AccessDenied: Not authorized",
        ),
        (
            Mode::Error(
                400,
                "ValidationError",
                "DurationSeconds exceeds the MaxSessionDuration",
            ),
            "DESTINATION_REJECTED",
            "ValidationError",
        ),
        (
            Mode::Error(
                400,
                "IDPCommunicationError",
                "Couldn't reach the identity provider",
            ),
            "DESTINATION_UNAVAILABLE",
            "IDPCommunicationError",
        ),
        (
            Mode::Error(400, "Throttling", "Rate exceeded"),
            "DESTINATION_UNAVAILABLE",
            "Throttling",
        ),
        (
            Mode::Error(503, "ServiceUnavailable", "try later"),
            "DESTINATION_UNAVAILABLE",
            "http 503",
        ),
        (
            Mode::Raw(200, format!("<x>{}</x>", "a".repeat(100_000))),
            "DESTINATION_REJECTED",
            "exceeds 65536 bytes",
        ),
        (
            Mode::Raw(200, "<html>not sts</html>".into()),
            "DESTINATION_REJECTED",
            "malformed AssumeRoleWithWebIdentity response",
        ),
        (
            Mode::Raw(502, "<html>bad gateway</html>".into()),
            "DESTINATION_UNAVAILABLE",
            "http 502",
        ),
        (Mode::Hang, "DESTINATION_UNAVAILABLE", "timed out"),
    ] {
        *fake.mode.lock().unwrap() = mode;
        let err = exchange(&l, &issuer, "aws", &[], 300).await.unwrap_err();
        assert_eq!(reason(&err), want_reason, "{}", err.message());
        assert!(
            err.message().contains(want_text),
            "{want_text:?}: {}",
            err.message()
        );
        assert!(!err.message().contains("eyJ"), "{}", err.message());
    }

    // A tag claim the subject token lacks refuses the exchange before calling AWS.
    *fake.mode.lock().unwrap() = Mode::Ok;
    let mut settings = base(format!("http://{addr}/"));
    settings["session_tags"] = json!({"Team": "team"});
    settings["transitive_tag_keys"] = json!([]);
    put_destination(&l, "aws-team", &[], settings).await;
    let before = fake.seen.lock().unwrap().len();
    let err = exchange(&l, &issuer, "aws-team", &[], 300)
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "INVALID_ARGUMENT", "{}", err.message());
    assert!(err.message().contains("\"team\""), "{}", err.message());
    assert_eq!(fake.seen.lock().unwrap().len(), before);

    // STS unreachable (nothing listens).
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    put_destination(&l, "aws-dead", &[], base(format!("http://{closed}/"))).await;
    let err = exchange(&l, &issuer, "aws-dead", &[], 300)
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "DESTINATION_UNAVAILABLE", "{}", err.message());
}
