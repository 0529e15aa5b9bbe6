//! Shared setup for the end-to-end tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use lanyard_proto::v1 as pb;
use lanyard_proto::v1::exchange_service_client::ExchangeServiceClient;
use lanyard_testkit::{KeyAlg, Lanyard, LanyardOptions, TestIssuer};
use tonic::transport::Channel;

/// Policy used by most tests: workloads under /ci/ may use the `orders` destination
/// with scopes inside {read, write}; `write` is forbidden for the `untrusted` workload.
pub const POLICY: &str = r#"
@id("ci-orders")
permit (principal, action, resource == Lanyard::Destination::"orders")
when { principal.id like "spiffe://lanyard.local/ci/*" && ["read", "write"].containsAll(context.scopes) };

@id("no-write-for-untrusted")
forbid (principal == Lanyard::Workload::"spiffe://lanyard.local/ci/untrusted", action, resource)
when { context.scopes.contains("write") };
"#;

pub const AUDIENCE: &str = "lanyard";
pub const ORDERS_AUD: &str = "https://orders.internal";

pub fn now() -> i64 {
    std::time::UNIX_EPOCH.elapsed().unwrap().as_secs() as i64
}

/// How the issuer's keys are registered.
#[derive(Clone, Copy)]
pub enum Keys {
    Discovery,
    JwksUrl,
    Inline,
}

pub fn issuer_msg(issuer: &TestIssuer, name: &str, keys: Keys, alg: KeyAlg) -> pb::Issuer {
    pb::Issuer {
        name: name.into(),
        issuer_url: issuer.url().into(),
        keys: Some(match keys {
            Keys::Discovery => pb::issuer::Keys::DiscoveryUrl(issuer.discovery_url()),
            Keys::JwksUrl => pb::issuer::Keys::JwksUrl(issuer.jwks_url()),
            Keys::Inline => pb::issuer::Keys::InlineJwks(issuer.jwks_document().to_string()),
        }),
        allowed_algorithms: vec![alg.jose().into()],
        audiences: vec![AUDIENCE.into()],
        leeway_seconds: 5,
        max_token_age_seconds: 600,
        ..Default::default()
    }
}

/// Register an issuer, a trust rule mapping `sub` to `spiffe://lanyard.local/ci/{sub}`
/// with task claim `run_id`, and the `orders` jwt destination.
pub async fn configure(l: &Lanyard, issuer: &TestIssuer, keys: Keys, alg: KeyAlg, replay: bool) {
    let mut admin = l.admin().await;
    let mut msg = issuer_msg(issuer, "ci", keys, alg);
    msg.replay_protection = replay;
    admin
        .put_issuer(pb::PutIssuerRequest {
            issuer: Some(msg),
            expected_revision: None,
        })
        .await
        .unwrap();
    admin
        .put_trust_rule(pb::PutTrustRuleRequest {
            rule: Some(pb::TrustRule {
                name: "ci".into(),
                issuer: "ci".into(),
                priority: 10,
                conditions: vec![pb::ClaimCondition {
                    claim: "repository_owner".into(),
                    matcher: Some(pb::claim_condition::Matcher::Exact("acme".into())),
                }],
                workload_template: "spiffe://{trust_domain}/ci/{sub}".into(),
                task_claim: "run_id".into(),
                revision: 0,
            }),
            expected_revision: None,
        })
        .await
        .unwrap();
    admin
        .put_destination(pb::PutDestinationRequest {
            destination: Some(orders_destination()),
            expected_revision: None,
        })
        .await
        .unwrap();
}

pub fn orders_destination() -> pb::Destination {
    let mut settings = prost_types_struct();
    settings.fields.insert(
        "audience".into(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(ORDERS_AUD.into())),
        },
    );
    pb::Destination {
        name: "orders".into(),
        kind: "jwt".into(),
        default_ttl_seconds: 300,
        max_ttl_seconds: 600,
        scopes: vec!["read".into(), "write".into(), "admin".into()],
        settings: Some(settings),
        ..Default::default()
    }
}

fn prost_types_struct() -> prost_types::Struct {
    prost_types::Struct::default()
}

/// Claims for workload `sub` in task `run`.
pub fn claims(issuer: &TestIssuer, sub: &str, run: &str) -> serde_json::Value {
    let mut c = issuer.claims(sub, AUDIENCE, now());
    c["repository_owner"] = "acme".into();
    c["run_id"] = run.into();
    c
}

pub async fn start(alg: KeyAlg, keys: Keys) -> (Lanyard, TestIssuer) {
    let issuer = TestIssuer::start(alg).await;
    let l = Lanyard::start(LanyardOptions {
        policy: Some(POLICY.into()),
        ..Default::default()
    })
    .await;
    configure(&l, &issuer, keys, alg, false).await;
    (l, issuer)
}

pub fn exchange_req(token: String, scopes: &[&str]) -> pb::ExchangeRequest {
    pb::ExchangeRequest {
        subject_token: token,
        destination: "orders".into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Decode a lanyard-issued JWT with the JWKS lanyard serves over HTTP.
pub async fn verify_with_lanyard_jwks(l: &Lanyard, token: &str, aud: &str) -> serde_json::Value {
    let disc: serde_json::Value =
        reqwest::get(format!("{}/.well-known/openid-configuration", l.http))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    let jwks: jsonwebtoken::jwk::JwkSet = reqwest::get(disc["jwks_uri"].as_str().unwrap())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let header = jsonwebtoken::decode_header(token).unwrap();
    let jwk = jwks
        .find(header.kid.as_deref().unwrap())
        .expect("kid in JWKS");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
    let mut v = jsonwebtoken::Validation::new(header.alg);
    v.set_audience(&[aud]);
    v.set_issuer(&[disc["issuer"].as_str().unwrap()]);
    jsonwebtoken::decode::<serde_json::Value>(token, &key, &v)
        .unwrap()
        .claims
}

pub fn bearer(resp: &pb::ExchangeResponse) -> String {
    match resp.credential.as_ref().unwrap().kind.as_ref().unwrap() {
        pb::credential::Kind::Bearer(b) => b.token.clone(),
        other => panic!("expected a bearer token, got {other:?}"),
    }
}

/// Assert `resp` holds a bearer token to send as `Authorization: Bearer <token>`.
pub fn assert_authorization_bearer(resp: &pb::ExchangeResponse) {
    match resp.credential.as_ref().unwrap().kind.as_ref().unwrap() {
        pb::credential::Kind::Bearer(b) => assert_eq!(
            (b.token_type.as_str(), b.header.as_str()),
            ("Bearer", "authorization")
        ),
        other => panic!("{other:?}"),
    }
}

/// Exchange `req` and expect a refusal with reason code `want` whose message contains
/// `text` and neither a JWT (`eyJ...`) nor any of `secrets`.
pub async fn assert_refused(
    mut c: ExchangeServiceClient<Channel>,
    req: pb::ExchangeRequest,
    want: &str,
    text: &str,
    secrets: &[&str],
) {
    let err = c.exchange(req).await.unwrap_err();
    assert_eq!(lanyard_testkit::reason(&err), want, "{}", err.message());
    assert!(err.message().contains(text), "{}", err.message());
    for secret in ["eyJ"].iter().chain(secrets) {
        assert!(!err.message().contains(secret), "{}", err.message());
    }
}

/// Revoke `grant_id` through the CLI at a destination that cannot revoke: the one
/// receipt must be `expires_at`, its detail must name `who` and state the residual
/// lifetime of a credential expiring at `expires` (Unix seconds).
pub async fn revoke_states_residual(l: &Lanyard, grant_id: &str, who: &str, expires: i64) {
    let out = admin_cli_json(l, &["revoke", "--grant", grant_id, "--reason", "e2e"]).await;
    assert_eq!(out["summary"]["expires_at"], 1, "{out}");
    let r = &out["receipts"][0];
    assert_eq!(r["outcome"], "expires_at", "{out}");
    assert!(r["expires_at"].is_string(), "{out}");
    assert!(r["detail"].as_str().unwrap().contains(who), "{out}");
    // The residual it states is the credential's remaining life.
    let detail = r["detail"].as_str().unwrap();
    let residual: i64 = detail
        .rsplit_once('(')
        .and_then(|(_, t)| t.strip_suffix("s after revocation)"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no residual in {detail:?}"));
    assert!(
        (expires - now() - 5..=expires - now() + 1).contains(&residual),
        "residual {residual}s, expiry in {}s",
        expires - now()
    );
}

/// All audit events so far.
pub async fn audit_events(l: &Lanyard) -> Vec<pb::AuditEvent> {
    let mut audit = l.audit().await;
    let mut stream = audit
        .watch(pb::WatchRequest {
            after_seq: 0,
            follow: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(ev) = stream.message().await.unwrap() {
        out.push(ev);
    }
    out
}

/// Verify the audit chain from genesis.
pub async fn verify_chain(l: &Lanyard) -> pb::VerifyResponse {
    l.audit()
        .await
        .verify(pb::VerifyRequest::default())
        .await
        .unwrap()
        .into_inner()
}

/// The payloads of every audit event of `kind`, in order.
pub async fn payloads_of(l: &Lanyard, kind: &str) -> Vec<serde_json::Value> {
    audit_events(l)
        .await
        .iter()
        .filter(|e| e.kind == kind)
        .map(|e| serde_json::from_str(&e.payload_json).unwrap())
        .collect()
}

/// Run the `lanyard` CLI against `l`'s admin socket; returns (success, stdout, stderr).
pub async fn admin_cli(l: &Lanyard, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(lanyard_testkit::process::binary())
        .arg("--admin-socket")
        .arg(&l.admin_socket)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// [`admin_cli`] with `--output json`, which must succeed; the parsed document.
pub async fn admin_cli_json(l: &Lanyard, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(args);
    let (ok, stdout, stderr) = admin_cli(l, &all).await;
    assert!(ok, "lanyard {args:?} failed:\n{stdout}\n{stderr}");
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("lanyard {args:?} printed no JSON ({e}):\n{stdout}"))
}

/// A JSON object as a protobuf `Struct` (for destination settings).
pub fn json_struct(v: serde_json::Value) -> prost_types::Struct {
    fn value(v: serde_json::Value) -> prost_types::Value {
        use prost_types::value::Kind;
        let kind = match v {
            serde_json::Value::Null => Kind::NullValue(0),
            serde_json::Value::Bool(b) => Kind::BoolValue(b),
            serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap()),
            serde_json::Value::String(s) => Kind::StringValue(s),
            serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
                values: a.into_iter().map(value).collect(),
            }),
            serde_json::Value::Object(_) => Kind::StructValue(json_struct(v)),
        };
        prost_types::Value { kind: Some(kind) }
    }
    match v {
        serde_json::Value::Object(m) => prost_types::Struct {
            fields: m.into_iter().map(|(k, v)| (k, value(v))).collect(),
        },
        other => panic!("not an object: {other}"),
    }
}

/// Verify a signed revocation receipt with lanyard's JWKS; its claims.
pub async fn verify_receipt(l: &Lanyard, jws: &str) -> serde_json::Value {
    let jwks: jsonwebtoken::jwk::JwkSet = reqwest::get(format!("{}/.well-known/jwks.json", l.http))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let header = jsonwebtoken::decode_header(jws).unwrap();
    assert_eq!(
        header.typ.as_deref(),
        Some("lanyard-revocation-receipt+jwt")
    );
    let jwk = jwks
        .find(header.kid.as_deref().unwrap())
        .expect("kid in JWKS");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
    let mut v = jsonwebtoken::Validation::new(header.alg);
    v.validate_exp = false;
    v.validate_aud = false;
    v.required_spec_claims.clear();
    jsonwebtoken::decode::<serde_json::Value>(jws, &key, &v)
        .unwrap()
        .claims
}

/// The test PostgreSQL server's URL (`.ci/pg-start.sh`), or `None` (the test is
/// skipped) when there is none; with `LANYARD_REQUIRE_PG` set, a missing URL fails.
pub fn pg_url() -> Option<String> {
    let Ok(url) = std::env::var("LANYARD_TEST_PG_URL") else {
        assert!(
            std::env::var("LANYARD_REQUIRE_PG").is_err(),
            "LANYARD_REQUIRE_PG is set but LANYARD_TEST_PG_URL is not"
        );
        eprintln!("skipped: LANYARD_TEST_PG_URL not set");
        return None;
    };
    Some(url)
}

/// lanyard with the test issuer, a policy for `name`, and a token endpoint for it.
pub async fn start_federated(
    name: &str,
    expect: lanyard_testkit::token_endpoint::Expect,
) -> (
    Lanyard,
    TestIssuer,
    lanyard_testkit::token_endpoint::TokenEndpoint,
) {
    let endpoint = lanyard_testkit::token_endpoint::TokenEndpoint::start(expect).await;
    let issuer = TestIssuer::start(KeyAlg::Es256).await;
    let policy = format!(
        "@id(\"ci-{name}\")\npermit (principal, action, resource == Lanyard::Destination::\"{name}\")\nwhen {{ principal.id like \"spiffe://lanyard.local/ci/*\" }};\n"
    );
    let l = Lanyard::start(LanyardOptions {
        policy: Some(policy),
        ..Default::default()
    })
    .await;
    let http = l.http.clone();
    endpoint.expect(|e| {
        e.jwks_url = format!("{http}/.well-known/jwks.json");
        e.issuer = http.clone();
    });
    configure(&l, &issuer, Keys::JwksUrl, KeyAlg::Es256, false).await;
    (l, issuer, endpoint)
}

/// lanyard with the test issuer (`ci`, trust rule, `orders`) and a policy letting
/// `spiffe://lanyard.local/ci/*` use destination `name`, for destinations whose fake
/// service the test starts itself (`lanyard_testkit::gcp`). Point the fake at
/// `l.http` (issuer) and `{l.http}/.well-known/jwks.json`.
pub async fn start_for_destination(name: &str) -> (Lanyard, TestIssuer) {
    let issuer = TestIssuer::start(KeyAlg::Es256).await;
    let policy = format!(
        "@id(\"ci-{name}\")\npermit (principal, action, resource == Lanyard::Destination::\"{name}\")\nwhen {{ principal.id like \"spiffe://lanyard.local/ci/*\" }};\n"
    );
    let l = Lanyard::start(LanyardOptions {
        policy: Some(policy),
        ..Default::default()
    })
    .await;
    configure(&l, &issuer, Keys::JwksUrl, KeyAlg::Es256, false).await;
    (l, issuer)
}
