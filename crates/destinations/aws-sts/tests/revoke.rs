//! Revocation against an IAM Query API on loopback that keeps inline role policies
//! like IAM does (`GetRolePolicy` answers the document URL-encoded, `NoSuchEntity` for
//! a missing policy or role) and can be told to refuse (`AccessDenied`,
//! `LimitExceeded` above a size, `Throttling` once). Checks the read-modify-write, that
//! revoking twice writes nothing, that 16 concurrent revocations all land, the
//! fallback, error mapping, and the SigV4 headers. Nothing external is contacted.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use lanyard_core::{GrantId, SystemClock};
use lanyard_destination::{
    Destination, DestinationError, DestinationSpec, Revocability, RevokeOutcome, RevokeRequest,
};
use lanyard_destination_aws_sts::AwsStsDestination;
use lanyard_keys::{KeyRing, KeyRingMinter, SigningAlgorithm};
use serde_json::{Value, json};

const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/ci/deployer";

#[derive(Default)]
struct Iam {
    policies: Mutex<HashMap<(String, String), String>>,
    roles: Mutex<Vec<String>>,
    puts: Mutex<u32>,
    /// Refuse every call with this code (status, code).
    refuse: Mutex<Option<(u16, &'static str)>>,
    /// Refuse the next call with Throttling.
    throttle_once: Mutex<bool>,
    /// Refuse documents longer than this with LimitExceeded.
    limit: Mutex<usize>,
    /// Every request's headers.
    headers: Mutex<Vec<HeaderMap>>,
    /// GetRolePolicy answers as if nothing had been written (IAM's eventual consistency).
    stale_reads: Mutex<bool>,
}

fn xml(status: u16, body: String) -> Response {
    (
        StatusCode::from_u16(status).unwrap(),
        [("content-type", "text/xml")],
        body,
    )
        .into_response()
}

fn error(status: u16, code: &str, message: &str) -> Response {
    xml(
        status,
        format!(
            "<ErrorResponse xmlns=\"https://iam.amazonaws.com/doc/2010-05-08/\"><Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error><RequestId>x</RequestId></ErrorResponse>"
        ),
    )
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn iam_api(State(s): State<Arc<Iam>>, headers: HeaderMap, body: String) -> Response {
    s.headers.lock().unwrap().push(headers.clone());
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIAEXAMPLE/")
        || !auth.contains("/us-east-1/iam/aws4_request")
        || headers.get("x-amz-date").is_none()
    {
        return error(403, "IncompleteSignature", "not signed");
    }
    if std::mem::take(&mut *s.throttle_once.lock().unwrap()) {
        return error(400, "Throttling", "Rate exceeded");
    }
    if let Some((status, code)) = *s.refuse.lock().unwrap() {
        return error(status, code, "refused");
    }
    let form: HashMap<String, String> = reqwest::Url::parse(&format!("http://x/?{body}"))
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect();
    assert_eq!(form["Version"], "2010-05-08");
    let role = form["RoleName"].clone();
    let name = form["PolicyName"].clone();
    let role_exists = s.roles.lock().unwrap().contains(&role);
    match form["Action"].as_str() {
        "GetRolePolicy" if *s.stale_reads.lock().unwrap() => {
            error(404, "NoSuchEntity", "The role policy cannot be found.")
        }
        "GetRolePolicy" => match s
            .policies
            .lock()
            .unwrap()
            .get(&(role.clone(), name.clone()))
        {
            Some(doc) => xml(
                200,
                format!(
                    "<GetRolePolicyResponse><GetRolePolicyResult><RoleName>{role}</RoleName><PolicyName>{name}</PolicyName><PolicyDocument>{}</PolicyDocument></GetRolePolicyResult></GetRolePolicyResponse>",
                    enc(doc)
                ),
            ),
            None => error(404, "NoSuchEntity", "The role policy cannot be found."),
        },
        "PutRolePolicy" => {
            if !role_exists {
                return error(404, "NoSuchEntity", "The role cannot be found.");
            }
            let doc = form["PolicyDocument"].clone();
            let limit = *s.limit.lock().unwrap();
            if limit > 0 && doc.len() > limit {
                return error(409, "LimitExceeded", "Maximum policy size exceeded");
            }
            serde_json::from_str::<Value>(&doc).unwrap();
            *s.puts.lock().unwrap() += 1;
            s.policies.lock().unwrap().insert((role, name), doc);
            xml(200, "<PutRolePolicyResponse><ResponseMetadata><RequestId>y</RequestId></ResponseMetadata></PutRolePolicyResponse>".into())
        }
        other => error(400, "InvalidAction", other),
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    iam: Arc<Iam>,
    url: String,
}

impl Fixture {
    async fn new() -> Fixture {
        let iam = Arc::new(Iam::default());
        iam.roles.lock().unwrap().push("deployer".into());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new()
            .route("/", post(iam_api))
            .with_state(iam.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let dir = tempfile::tempdir().unwrap();
        Fixture {
            dir,
            iam,
            url: format!("http://{addr}/"),
        }
    }

    fn credentials(&self, text: &str, mode: u32) -> String {
        use std::os::unix::fs::PermissionsExt as _;
        let p = self.dir.path().join(format!("creds-{mode:o}"));
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p.to_str().unwrap().to_owned()
    }

    fn destination(&self, extra: Value) -> Result<AwsStsDestination, DestinationError> {
        let creds = self.credentials(
            "[default]\naws_access_key_id = AKIAEXAMPLE\naws_secret_access_key = secret\naws_session_token = session\n",
            0o600,
        );
        let mut settings = json!({
            "role_arn": ROLE_ARN,
            "iam_endpoint": self.url,
            "credentials_file": creds,
            "max_attempts": 2,
        });
        for (k, v) in extra.as_object().unwrap() {
            settings[k] = v.clone();
        }
        let spec: DestinationSpec = serde_json::from_value(json!({
            "name": "aws", "kind": "aws-sts", "settings": settings,
        }))
        .unwrap();
        let ring = Arc::new(
            KeyRing::open(
                &self.dir.path().join("keys"),
                SigningAlgorithm::ES256,
                SystemClock::shared(),
            )
            .unwrap(),
        );
        AwsStsDestination::new(
            &spec,
            Arc::new(KeyRingMinter::new(ring, "https://lanyard.test")),
        )
    }

    fn document(&self) -> Value {
        let p = self.iam.policies.lock().unwrap();
        serde_json::from_str(&p[&("deployer".to_owned(), "lanyard-revoked".to_owned())]).unwrap()
    }

    fn puts(&self) -> u32 {
        *self.iam.puts.lock().unwrap()
    }
}

fn now() -> i64 {
    std::time::UNIX_EPOCH.elapsed().unwrap().as_secs() as i64
}

async fn revoke(
    d: &AwsStsDestination,
    grant: &GrantId,
    expires_in: i64,
) -> Result<RevokeOutcome, DestinationError> {
    let t = now();
    d.revoke(RevokeRequest {
        grant_id: grant,
        revocation_handle: ROLE_ARN,
        workload_id: "spiffe://lanyard.local/ci/deployer",
        expires_at: t + expires_in,
        now: t,
    })
    .await
}

fn ids(doc: &Value) -> Vec<String> {
    let mut out: Vec<String> = doc["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| {
            s["Condition"]["StringEquals"]["aws:SourceIdentity"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn revoking_writes_the_grant_into_the_deny_policy_once() {
    let fx = Fixture::new().await;
    let d = fx.destination(json!({})).unwrap();
    assert_eq!(d.revocability(), Revocability::Eventual);
    let g = GrantId::generate();
    let out = revoke(&d, &g, 600).await.unwrap();
    let RevokeOutcome::Blocked { detail } = out else {
        panic!("{out:?}")
    };
    for want in [
        "inline policy lanyard-revoked on role arn:aws:iam::123456789012:role/ci/deployer",
        "aws:SourceIdentity is grt_",
        "policy changes may take a few minutes to propagate",
        "the credentials themselves stay valid until they expire",
    ] {
        assert!(detail.contains(want), "{want:?}: {detail}");
    }
    assert_eq!(ids(&fx.document()), vec![g.to_string()]);
    assert_eq!(fx.puts(), 1);
    // Twice: same answer, nothing written.
    assert!(matches!(
        revoke(&d, &g, 600).await.unwrap(),
        RevokeOutcome::Blocked { .. }
    ));
    assert_eq!(fx.puts(), 1);
    // Signed with the file's temporary credentials.
    let h = fx.iam.headers.lock().unwrap();
    assert!(h.iter().all(|h| h["x-amz-security-token"] == "session"));
    assert!(
        h.iter()
            .all(|h| h["content-type"] == "application/x-www-form-urlencoded; charset=utf-8")
    );
}

#[tokio::test]
async fn concurrent_revocations_all_land() {
    let fx = Fixture::new().await;
    let d = Arc::new(fx.destination(json!({})).unwrap());
    let grants: Vec<GrantId> = (0..16).map(|_| GrantId::generate()).collect();
    let mut tasks = Vec::new();
    for g in grants.clone() {
        let d = d.clone();
        tasks.push(tokio::spawn(
            async move { revoke(&d, &g, 600).await.unwrap() },
        ));
    }
    for t in tasks {
        assert!(matches!(t.await.unwrap(), RevokeOutcome::Blocked { .. }));
    }
    let mut want: Vec<String> = grants.iter().map(ToString::to_string).collect();
    want.sort();
    assert_eq!(ids(&fx.document()), want);
}

#[tokio::test]
async fn a_stale_iam_read_does_not_drop_an_earlier_revocation() {
    let fx = Fixture::new().await;
    let d = fx.destination(json!({})).unwrap();
    *fx.iam.stale_reads.lock().unwrap() = true;
    let (g1, g2) = (GrantId::generate(), GrantId::generate());
    revoke(&d, &g1, 600).await.unwrap();
    revoke(&d, &g2, 600).await.unwrap();
    let mut want = vec![g1.to_string(), g2.to_string()];
    want.sort();
    assert_eq!(ids(&fx.document()), want);
}

#[tokio::test]
async fn limit_exceeded_falls_back_to_token_issue_time() {
    let fx = Fixture::new().await;
    let d = fx.destination(json!({})).unwrap();
    revoke(&d, &GrantId::generate(), 600).await.unwrap();
    // The role's inline policies together are full: IAM refuses a larger document.
    *fx.iam.limit.lock().unwrap() = fx.document().to_string().len() + 10;
    let out = revoke(&d, &GrantId::generate(), 600).await.unwrap();
    let RevokeOutcome::Blocked { detail } = out else {
        panic!("{out:?}")
    };
    assert!(detail.contains("aws:TokenIssueTime is before"), "{detail}");
    assert!(detail.contains("ALL sessions of the role"), "{detail}");
    let doc = fx.document();
    assert_eq!(doc["Statement"].as_array().unwrap().len(), 1);
    assert_eq!(doc["Statement"][0]["Sid"], "LanyardRevokedIssuedBefore");
    assert!(
        doc["Statement"][0]["Condition"]["DateLessThan"]["aws:TokenIssueTime"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
}

#[tokio::test]
async fn iam_errors_fail_the_step_with_their_code() {
    let fx = Fixture::new().await;
    let d = fx.destination(json!({})).unwrap();
    // Throttled once: retried.
    *fx.iam.throttle_once.lock().unwrap() = true;
    assert!(matches!(
        revoke(&d, &GrantId::generate(), 600).await.unwrap(),
        RevokeOutcome::Blocked { .. }
    ));
    for (status, code, retryable) in [
        (403, "AccessDenied", false),
        (400, "MalformedPolicyDocument", false),
        (500, "ServiceFailure", true),
    ] {
        *fx.iam.refuse.lock().unwrap() = Some((status, code));
        let e = revoke(&d, &GrantId::generate(), 600).await.unwrap_err();
        let DestinationError::Upstream {
            message,
            retryable: r,
        } = &e
        else {
            panic!("{e:?}")
        };
        assert_eq!(*r, retryable, "{message}");
        assert!(message.contains(code), "{message}");
        assert!(
            message.contains(
                "revoke: GetRolePolicy on role arn:aws:iam::123456789012:role/ci/deployer"
            ),
            "{message}"
        );
    }
    *fx.iam.refuse.lock().unwrap() = None;
    // The role is gone.
    fx.iam.roles.lock().unwrap().clear();
    let e = revoke(&d, &GrantId::generate(), 600).await.unwrap_err();
    assert!(
        matches!(&e, DestinationError::Upstream { message, retryable: false } if message.contains("PutRolePolicy") && message.contains("NoSuchEntity")),
        "{e:?}"
    );
    // IAM unreachable.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let fx2 = Fixture {
        dir: tempfile::tempdir().unwrap(),
        iam: fx.iam.clone(),
        url: format!("http://{closed}/"),
    };
    let d = fx2.destination(json!({"max_attempts": 1})).unwrap();
    let e = revoke(&d, &GrantId::generate(), 600).await.unwrap_err();
    assert!(
        matches!(
            &e,
            DestinationError::Upstream {
                retryable: true,
                message,
            } if message.starts_with("revoke: GetRolePolicy on role")
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn expired_grants_and_missing_credentials() {
    let fx = Fixture::new().await;
    let d = fx.destination(json!({})).unwrap();
    let out = revoke(&d, &GrantId::generate(), -5).await.unwrap();
    assert!(
        matches!(&out, RevokeOutcome::ExpiresAt { detail, .. } if detail.contains("already expired")),
        "{out:?}"
    );
    assert!(
        fx.iam.headers.lock().unwrap().is_empty(),
        "IAM was not called"
    );
    // Without a credentials file the receipt states the expiry.
    let d = fx.destination(json!({"credentials_file": null})).unwrap();
    assert_eq!(d.revocability(), Revocability::AtExpiry);
    let out = revoke(&d, &GrantId::generate(), 600).await.unwrap();
    assert!(
        matches!(&out, RevokeOutcome::ExpiresAt { detail, .. } if detail.contains("no credentials_file")),
        "{out:?}"
    );
    // A credentials file others can read is refused when the destination is built.
    let loose = fx.credentials(
        "[default]\naws_access_key_id = AKIAEXAMPLE\naws_secret_access_key = s3cr3t\n",
        0o644,
    );
    let e = fx
        .destination(json!({"credentials_file": loose}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("mode 0644") && !e.contains("s3cr3t"), "{e}");
}
