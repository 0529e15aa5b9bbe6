//! `lanyard run -- CMD` through the real binary: credentials reach the command's
//! environment (or private files, renewed before expiry) and nowhere else, signals are
//! forwarded, the exit code is passed through, and every grant is released however the
//! command ends.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::*;
use lanyard_proto::v1 as pb;
use lanyard_testkit::{Lanyard, TestIssuer, eventually};
use serde_json::json;

struct Env {
    l: Lanyard,
    issuer: TestIssuer,
    dir: tempfile::TempDir,
}

async fn setup() -> Env {
    let (l, issuer) = start_for_destination("orders").await;
    let dir = tempfile::tempdir().unwrap();
    let env = Env { l, issuer, dir };
    env.write_token("run-1");
    env
}

impl Env {
    fn token_file(&self) -> PathBuf {
        self.dir.path().join("platform-token")
    }

    fn write_token(&self, run: &str) {
        std::fs::write(
            self.token_file(),
            self.issuer.mint(&claims(&self.issuer, "agent", run)),
        )
        .unwrap();
    }

    fn out(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `lanyard run` with `args` before `--`, then `sh -c script`.
    fn command(&self, args: &[&str], script: &str) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(lanyard_testkit::process::binary());
        c.arg("--grpc")
            .arg(&self.l.grpc)
            .arg("run")
            .arg("--token-file")
            .arg(self.token_file())
            .args(args)
            .arg("--")
            .arg("sh")
            .arg("-c")
            .arg(script)
            .current_dir(self.dir.path())
            .env_remove("ORDERS_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    async fn grant(&self, id: &str) -> pb::Grant {
        self.l
            .admin()
            .await
            .get_grant(pb::GetRequest { name: id.into() })
            .await
            .unwrap()
            .into_inner()
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

#[tokio::test]
async fn the_credential_is_in_the_commands_environment_only_and_released_on_exit() {
    let e = setup().await;
    let out = e
        .command(
            &["--dest", "orders,scope=read", "--verbose"],
            "printf %s \"$ORDERS_TOKEN\" > token; printf %s \"$ORDERS_GRANT_ID\" > grant; \
             printf %s \"$ORDERS_HEADER $ORDERS_TOKEN_TYPE\" > how; exit 7",
        )
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "the command's code is passed through"
    );
    let token = read(&e.out("token"));
    let grant_id = read(&e.out("grant"));
    assert!(token.split('.').count() == 3, "a JWT: {token:?}");
    assert_eq!(read(&e.out("how")), "authorization Bearer");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("orders granted"), "{stderr}");
    assert!(stderr.contains("released orders"), "{stderr}");
    assert!(!stderr.contains(&token), "the credential is never printed");
    assert!(out.stdout.is_empty());
    let g = e.grant(&grant_id).await;
    assert_eq!(g.status, "released");
    assert_eq!(g.scopes, vec!["read"]);
    assert!(!e.l.log().contains(&token));
}

#[tokio::test]
async fn files_are_private_renewed_before_expiry_and_removed() {
    let e = setup().await;
    // TTL 3 s: renewed about 2 s in. The command waits until its token file changes.
    let script = r#"
        first=$(cat "$ORDERS_TOKEN_FILE")
        stat -c %a "$LANYARD_CREDENTIALS_DIR" > dirmode
        stat -c %a "$ORDERS_TOKEN_FILE" > filemode
        echo "$LANYARD_CREDENTIALS_DIR" > dir
        printf %s "${ORDERS_TOKEN:-unset}" > envtoken
        cat "$ORDERS_GRANT_ID_FILE" > grant
        cat "$ORDERS_CREDENTIAL_FILE" > credential.json
        i=0
        while [ "$(cat "$ORDERS_TOKEN_FILE")" = "$first" ]; do
            i=$((i+1)); [ $i -gt 300 ] && exit 3
            sleep 0.05
        done
        cat "$ORDERS_TOKEN_FILE" > renewed
        exit 0
    "#;
    let child = e
        .command(&["--dest", "orders,ttl=3", "--files"], script)
        .spawn()
        .unwrap();
    // Once the command runs (the exchange is done), the platform token rotates, as a
    // projected token does: the renewal must present the new one.
    eventually("the command is running", || async {
        (!read(&e.out("dir")).is_empty()).then_some(())
    })
    .await;
    e.write_token("run-1");
    let rotated = std::fs::read_to_string(e.token_file()).unwrap();
    let out = child.wait_with_output().await.unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(read(&e.out("dirmode")).trim(), "700");
    assert_eq!(read(&e.out("filemode")).trim(), "600");
    assert_eq!(
        read(&e.out("envtoken")),
        "unset",
        "files mode keeps it out of env"
    );
    let cred: serde_json::Value = serde_json::from_str(&read(&e.out("credential.json"))).unwrap();
    assert_eq!(cred["token_type"], "Bearer");
    assert!(read(&e.out("renewed")).split('.').count() == 3);
    let dir = read(&e.out("dir"));
    assert!(
        !Path::new(dir.trim()).exists(),
        "the private directory is removed"
    );
    let g = e.grant(read(&e.out("grant")).trim()).await;
    assert_eq!(g.status, "released");
    assert!(g.renew_count >= 1, "renewed: {g:?}");
    let fp =
        e.l.audit()
            .await
            .fingerprint(pb::FingerprintRequest { token: rotated })
            .await
            .unwrap()
            .into_inner()
            .fingerprint;
    let renewed = payloads_of(&e.l, "grant.renewed").await;
    assert!(
        renewed
            .iter()
            .any(|r| r["subject_fingerprint"] == fp.as_str()),
        "the renewal presented the rotated token: {renewed:?}"
    );
}

#[tokio::test]
async fn sigterm_in_files_mode_removes_the_directory() {
    let e = setup().await;
    let mut child = e
        .command(
            &["--dest", "orders", "--files"],
            "echo \"$LANYARD_CREDENTIALS_DIR\" > dir; cat \"$ORDERS_GRANT_ID_FILE\" > grant; \
             trap 'exit 0' TERM; while :; do sleep 0.05; done",
        )
        .spawn()
        .unwrap();
    let dir = eventually("the command is running", || async {
        let d = read(&e.out("dir"));
        (!d.is_empty() && !read(&e.out("grant")).is_empty()).then_some(d)
    })
    .await;
    assert!(Path::new(dir.trim()).exists());
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert_eq!(child.wait().await.unwrap().code(), Some(0));
    assert!(!Path::new(dir.trim()).exists(), "removed on the way out");
    let g = e.grant(read(&e.out("grant")).trim()).await;
    assert_eq!(g.status, "released");
}

#[tokio::test]
async fn a_command_that_cannot_start_exits_127_and_releases() {
    let e = setup().await;
    let out = tokio::process::Command::new(lanyard_testkit::process::binary())
        .arg("--grpc")
        .arg(&e.l.grpc)
        .arg("run")
        .arg("--token-file")
        .arg(e.token_file())
        .args(["--dest", "orders", "--", "/nonexistent/command"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(127));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot start"));
    let grants = admin_cli_json(&e.l, &["grants", "list"]).await;
    assert_eq!(grants["grants"][0]["status"], "released", "{grants}");
    // `-` is refused: the token is read again for every renewal and release.
    let out = tokio::process::Command::new(lanyard_testkit::process::binary())
        .args(["run", "--token-file", "-", "--dest", "orders", "--", "true"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with run"));
}

#[tokio::test]
async fn sigterm_is_forwarded_and_grants_released() {
    let e = setup().await;
    let mut child = e
        .command(
            &["--dest", "orders"],
            "trap 'echo got-term > term; exit 143' TERM; printf %s \"$ORDERS_GRANT_ID\" > grant; \
             echo ready > ready; while :; do sleep 0.05; done",
        )
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    eventually("the command is running", || async {
        (read(&e.out("ready")).trim() == "ready").then_some(())
    })
    .await;
    // Nothing leaks into lanyard run's own environment or command line.
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    for bytes in [&environ, &cmdline] {
        let text = String::from_utf8_lossy(bytes);
        assert!(!text.contains("ORDERS_TOKEN"), "{text}");
        assert!(
            !text.contains("eyJ"),
            "no JWT in lanyard run's environment or argv"
        );
    }
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let status = child.wait().await.unwrap();
    assert_eq!(status.code(), Some(143));
    assert_eq!(read(&e.out("term")).trim(), "got-term");
    let g = e.grant(read(&e.out("grant")).trim()).await;
    assert_eq!(g.status, "released");
}

#[tokio::test]
async fn a_crashing_command_still_releases_its_grants() {
    let e = setup().await;
    let out = e
        .command(
            &["--dest", "orders"],
            "printf %s \"$ORDERS_GRANT_ID\" > grant; kill -SEGV $$",
        )
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(128 + 11), "128 + SIGSEGV");
    let g = e.grant(read(&e.out("grant")).trim()).await;
    assert_eq!(g.status, "released");
}

#[tokio::test]
async fn a_refused_exchange_starts_nothing_and_releases_what_was_granted() {
    let e = setup().await;
    let config = e.out("run.toml");
    std::fs::write(
        &config,
        "[[destination]]\nname = \"orders\"\nscopes = [\"read\"]\nenv = \"FIRST\"\n",
    )
    .unwrap();
    let out = e
        .command(
            &["--config", config.to_str().unwrap(), "--dest", "nope"],
            "echo started > started",
        )
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("DESTINATION_UNKNOWN"), "{stderr}");
    assert!(!e.out("started").exists(), "the command did not start");
    let grants = admin_cli_json(&e.l, &["grants", "list"]).await;
    let all = grants["grants"].as_array().unwrap();
    assert_eq!(all.len(), 1, "{grants}");
    assert_eq!(
        all[0]["status"], "released",
        "the first grant was given back"
    );

    // Bad specs are refused before anything is asked.
    let out = e
        .command(&["--dest", "orders,bogus=1"], "true")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown key"));
}

/// The GitHub Actions token source: a fresh OIDC token per call from the runner's token
/// service (here a local one that checks the bearer and the audience).
#[tokio::test]
async fn github_actions_tokens_are_requested_per_call() {
    use axum::extract::{Query, State};
    use axum::http::HeaderMap;
    let e = setup().await;
    #[derive(Clone)]
    struct Svc {
        token: String,
        calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }
    let svc = Svc {
        token: e.issuer.mint(&claims(&e.issuer, "agent", "gha-1")),
        calls: Default::default(),
    };
    let app = axum::Router::new()
        .route(
            "/token",
            axum::routing::get(
                |State(s): State<Svc>,
                 Query(q): Query<std::collections::HashMap<String, String>>,
                 h: HeaderMap| async move {
                    let ok = h.get("authorization").and_then(|v| v.to_str().ok())
                        == Some("Bearer runner-request-token")
                        && q.get("audience").map(String::as_str) == Some("lanyard")
                        && q.get("api-version").map(String::as_str) == Some("2.0");
                    if !ok {
                        return (axum::http::StatusCode::FORBIDDEN, axum::Json(json!({})));
                    }
                    s.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    (
                        axum::http::StatusCode::OK,
                        axum::Json(json!({"value": s.token})),
                    )
                },
            ),
        )
        .with_state(svc.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let out = tokio::process::Command::new(lanyard_testkit::process::binary())
        .arg("--grpc")
        .arg(&e.l.grpc)
        .args([
            "run",
            "--github-actions-audience",
            "lanyard",
            "--dest",
            "orders",
            "--",
            "sh",
            "-c",
            "test -n \"$ORDERS_TOKEN\"",
        ])
        .env(
            "ACTIONS_ID_TOKEN_REQUEST_URL",
            format!("http://{addr}/token?api-version=2.0"),
        )
        .env("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "runner-request-token")
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        svc.calls.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "one token for the exchange, one for the release"
    );
}
