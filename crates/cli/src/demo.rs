//! `lanyard demo`: the newcomer's one-command tour. Starts this same binary as a
//! throwaway `serve --dev`, walks one grant through its life (mint a token, exchange,
//! inspect, list, release, a denial, the audit trail) and stops the server with SIGTERM.
//!
//! ## Why a child process
//! The tour runs the real server exactly as an operator would start it, over the real
//! listeners, so what the newcomer sees is what they get. SIGTERM is sent with the
//! system `kill -TERM <pid>` command: tokio can only SIGKILL a child, and the workspace
//! forbids the `unsafe` a direct `libc::kill` call would need.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use lanyard_core::{Clock, ReasonCode, SystemClock};
use lanyard_proto::v1 as pb;
use lanyard_proto::v1::admin_service_client::AdminServiceClient;
use lanyard_proto::v1::audit_service_client::AuditServiceClient;
use lanyard_proto::v1::exchange_service_client::ExchangeServiceClient;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

use crate::client::{RpcError, RpcResultExt, admin_channel, admin_target, exchange_client};
use crate::output::{self, emit, kv_table};
use crate::workload::write_private;

/// How long the server may take to print its ready line.
const READY_DEADLINE: Duration = Duration::from_secs(60);
/// How long the server may take to stop after SIGTERM.
const STOP_DEADLINE: Duration = Duration::from_secs(20);
/// How much of the server's stderr is kept for a failure report.
const STDERR_KEEP: usize = 64 * 1024;

/// The addresses the server announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    /// Workload gRPC address (host:port).
    pub grpc: String,
    /// HTTP address (host:port).
    pub http: String,
    /// Admin socket path.
    pub admin: PathBuf,
}

/// Parse `lanyard ready grpc=ADDR http=ADDR admin=PATH`.
pub fn parse_ready(line: &str) -> Option<Ready> {
    let rest = line.trim().strip_prefix("lanyard ready ")?;
    let (mut grpc, mut http, mut admin) = (None, None, None);
    // The admin path is last and may contain spaces.
    let (head, admin_path) = match rest.split_once(" admin=") {
        Some((h, a)) => (h, Some(a)),
        None => (rest, None),
    };
    if let Some(a) = admin_path {
        admin = Some(PathBuf::from(a));
    }
    for part in head.split_whitespace() {
        match part.split_once('=') {
            Some(("grpc", v)) => grpc = Some(v.to_string()),
            Some(("http", v)) => http = Some(v.to_string()),
            Some(("admin", v)) => admin = Some(PathBuf::from(v)),
            _ => {}
        }
    }
    Some(Ready {
        grpc: grpc?,
        http: http?,
        admin: admin?,
    })
}

/// `lanyard demo`
///
/// # Errors
/// When any step does not do what it should; the message names the step.
pub async fn demo() -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("lanyard-demo-")
        .tempdir()
        .context("creating a throwaway data directory")?;
    let exe = std::env::current_exe().context("finding the lanyard binary")?;
    emit(&format!(
        "lanyard demo: starting a throwaway dev server ({} serve --dev) in {}",
        exe.display(),
        dir.path().display()
    ))?;

    let mut cmd = Command::new(&exe);
    cmd.arg("serve")
        .arg("--dev")
        .arg("--data-dir")
        .arg(dir.path())
        .args([
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .arg("--admin-socket")
        .arg(dir.path().join("admin.sock"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // The tour must not depend on the caller's configuration.
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| k.starts_with("LANYARD_")) {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    let stderr = Arc::new(Mutex::new(Vec::<u8>::new()));
    if let Some(e) = child.stderr.take() {
        tokio::spawn(keep_tail(e, stderr.clone()));
    }

    let result = match wait_ready(&mut child).await {
        Ok(ready) => {
            emit(&format!(
                "server ready: grpc={} http={} admin={}",
                ready.grpc,
                ready.http,
                ready.admin.display()
            ))?;
            tour(&ready, dir.path()).await
        }
        Err(e) => Err(e),
    };
    let stopped = stop(&mut child).await;
    let result = result.and(stopped);
    match &result {
        Ok(()) => emit("\ndemo complete: every step did what it should.")?,
        Err(_) => {
            let tail = stderr
                .lock()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            if !tail.trim().is_empty() {
                output::note(&format!(
                    "--- server stderr ---\n{}\n--- end of server stderr ---",
                    tail.trim_end()
                ));
            }
        }
    }
    result
}

/// Keep the last [`STDERR_KEEP`] bytes of a stream (draining it so the child never
/// blocks on a full pipe).
async fn keep_tail(mut r: impl AsyncRead + Unpin, buf: Arc<Mutex<Vec<u8>>>) {
    let mut chunk = [0u8; 8192];
    while let Ok(n) = r.read(&mut chunk).await {
        if n == 0 {
            break;
        }
        if let Ok(mut b) = buf.lock() {
            b.extend_from_slice(&chunk[..n]);
            if b.len() > STDERR_KEEP {
                let cut = b.len() - STDERR_KEEP;
                b.drain(..cut);
            }
        }
    }
}

/// Read the child's stdout until the ready line, then keep draining it in the background.
async fn wait_ready(child: &mut Child) -> anyhow::Result<Ready> {
    let stdout = child
        .stdout
        .take()
        .context("the server's stdout is not piped")?;
    let mut lines = BufReader::new(stdout).lines();
    let found = tokio::time::timeout(READY_DEADLINE, async {
        loop {
            match lines.next_line().await {
                Ok(Some(line)) => {
                    if let Some(r) = parse_ready(&line) {
                        return Ok(r);
                    }
                }
                Ok(None) | Err(_) => {
                    let status = child.wait().await.context("waiting for the server")?;
                    anyhow::bail!("the server exited before it was ready ({status})");
                }
            }
        }
    })
    .await
    .map_err(|_| {
        anyhow::anyhow!(
            "the server did not print its ready line within {}s",
            READY_DEADLINE.as_secs()
        )
    })??;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(found)
}

/// SIGTERM the child and wait for a clean exit.
async fn stop(child: &mut Child) -> anyhow::Result<()> {
    let Some(pid) = child.id() else {
        // Already reaped: it exited on its own, which the tour did not ask for.
        let status = child.wait().await?;
        anyhow::bail!("the server had already exited ({status})");
    };
    emit(&format!(
        "\n== stopping the server (SIGTERM to pid {pid}) =="
    ))?;
    let sent = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .stdin(Stdio::null())
        .status()
        .await;
    if !matches!(&sent, Ok(s) if s.success()) {
        let _ = child.start_kill();
        let _ = child.wait().await;
        anyhow::bail!(
            "could not send SIGTERM to the server (`kill -TERM {pid}` failed); killed it"
        );
    }
    match tokio::time::timeout(STOP_DEADLINE, child.wait()).await {
        Ok(Ok(status)) if status.success() => {
            emit("the server stopped cleanly")?;
            Ok(())
        }
        Ok(Ok(status)) => anyhow::bail!("the server exited with {status} after SIGTERM"),
        Ok(Err(e)) => Err(anyhow::Error::new(e).context("waiting for the server to stop")),
        Err(_) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            anyhow::bail!(
                "the server did not stop within {}s of SIGTERM; killed it",
                STOP_DEADLINE.as_secs()
            )
        }
    }
}

/// Numbered step headings.
struct Steps(u32);

impl Steps {
    fn step(&mut self, title: &str, command: &str) -> anyhow::Result<()> {
        self.0 += 1;
        emit(&format!("\n== {}. {title} ==", self.0))?;
        if !command.is_empty() {
            emit(&format!("$ {command}"))?;
        }
        Ok(())
    }
}

/// Clients of one running server.
struct Clients {
    exchange: ExchangeServiceClient<Channel>,
    admin: AdminServiceClient<Channel>,
    audit: AuditServiceClient<Channel>,
    grpc_target: String,
    admin_target: String,
}

async fn list_grants(c: &mut Clients) -> anyhow::Result<Vec<pb::Grant>> {
    Ok(c.admin
        .list_grants(pb::ListGrantsRequest::default())
        .await
        .or_rpc_error(&c.admin_target)?
        .grants)
}

fn grant_status<'a>(grants: &'a [pb::Grant], id: &str) -> anyhow::Result<&'a str> {
    grants
        .iter()
        .find(|g| g.id == id)
        .map(|g| g.status.as_str())
        .with_context(|| format!("grant {id} is missing from the list"))
}

/// Every step of the tour, failing at the first that does not do what it should.
async fn tour(ready: &Ready, data_dir: &Path) -> anyhow::Result<()> {
    let grpc_url = format!("http://{}", ready.grpc);
    let channel = admin_channel(&ready.admin).await?;
    let mut c = Clients {
        exchange: exchange_client(&grpc_url).await?,
        admin: AdminServiceClient::new(channel.clone()),
        audit: AuditServiceClient::new(channel),
        grpc_target: grpc_url.clone(),
        admin_target: admin_target(&ready.admin),
    };
    let dd = data_dir.display();
    let adm = ready.admin.display();
    let token_file = data_dir.join("demo-token.jwt");
    let tf = token_file.display();
    let mut s = Steps(0);

    s.step(
        "Mint a workload token from the built-in dev issuer",
        &format!("lanyard dev token --data-dir {dd} --subject demo-agent --task run-1 > {tf}"),
    )?;
    let token = lanyard_server::dev::mint_dev_token(
        data_dir,
        "demo-agent",
        Some("run-1"),
        600,
        SystemClock.now_unix(),
    )
    .context("minting the dev token")?;
    write_private(&token_file, &format!("{token}\n"))?;
    emit(&format!(
        "a {}-byte token for subject demo-agent, task run-1, valid 10m0s \
         (subject tokens are proof of identity: the demo never prints one)",
        token.len()
    ))?;

    s.step(
        "Exchange it for a short-lived credential at destination dev-api, scope read",
        &format!("lanyard exchange --grpc {grpc_url} --token-file {tf} --destination dev-api --scope read"),
    )?;
    let granted = c
        .exchange
        .exchange(pb::ExchangeRequest {
            subject_token: token.clone(),
            destination: "dev-api".into(),
            scopes: vec!["read".into()],
            ..Default::default()
        })
        .await
        .or_rpc_error(&c.grpc_target)
        .context("the exchange was refused")?;
    emit(&kv_table(&output::exchange_rows(&granted, output::now())))?;
    anyhow::ensure!(
        granted.scopes == ["read"] && granted.destination == "dev-api",
        "the grant is not for dev-api with scope read"
    );
    anyhow::ensure!(
        !granted.workload_id.is_empty(),
        "the grant names no workload"
    );

    s.step(
        "Look inside the credential: a JWT lanyard signed for dev-api",
        "",
    )?;
    let Some(pb::credential::Kind::Bearer(bearer)) =
        granted.credential.as_ref().and_then(|c| c.kind.as_ref())
    else {
        anyhow::bail!("the credential is not a bearer token");
    };
    let (header, claims) = output::decode_jwt(&bearer.token)?;
    emit(&format!(
        "present it as `{}: {} <token>`\nheader: {}\nclaims: {}",
        bearer.header,
        bearer.token_type,
        serde_json::to_string_pretty(&header)?,
        serde_json::to_string_pretty(&claims)?
    ))?;
    anyhow::ensure!(
        claims.get("sub").and_then(Value::as_str) == Some(granted.workload_id.as_str()),
        "the credential's sub is not the workload ID"
    );
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .context("the credential's header has no kid")?
        .to_string();

    s.step(
        "List grants as an operator (admin socket)",
        &format!("lanyard grants list --admin-socket {adm}"),
    )?;
    let grants = list_grants(&mut c).await?;
    emit(&output::grants_table(&grants, output::now()))?;
    let status = grant_status(&grants, &granted.grant_id)?;
    anyhow::ensure!(status == "active", "the new grant is {status}, not active");

    let jwks_url = format!("http://{}/.well-known/jwks.json", ready.http);
    s.step(
        "Fetch lanyard's JWKS: how a destination verifies the credential",
        &format!("curl {jwks_url}"),
    )?;
    let kids = fetch_kids(&jwks_url).await?;
    emit(&format!("published key ids: {}", kids.join(", ")))?;
    anyhow::ensure!(
        kids.contains(&kid),
        "the credential's kid {kid} is not in lanyard's JWKS"
    );
    emit(&format!("the credential's kid {kid} is published"))?;

    s.step(
        "Release the grant: the task is done, revoke the credential now",
        &format!(
            "lanyard release --grpc {grpc_url} --token-file {tf} --grant {}",
            granted.grant_id
        ),
    )?;
    let released = c
        .exchange
        .release(pb::ReleaseRequest {
            grant_id: granted.grant_id.clone(),
            subject_token: token.clone(),
            ..Default::default()
        })
        .await
        .or_rpc_error(&c.grpc_target)
        .context("the release was refused")?;
    emit(&kv_table(&output::release_rows(&released, output::now())))?;
    anyhow::ensure!(
        released.status == "released",
        "the grant is {}, not released",
        released.status
    );

    s.step(
        "List grants again",
        &format!("lanyard grants list --admin-socket {adm}"),
    )?;
    let grants = list_grants(&mut c).await?;
    emit(&output::grants_table(&grants, output::now()))?;
    let status = grant_status(&grants, &granted.grant_id)?;
    anyhow::ensure!(
        status == "released",
        "the grant is listed as {status}, not released"
    );

    s.step(
        "Ask for a scope dev-api does not offer (admin): denied, with a stable reason",
        &format!("lanyard exchange --grpc {grpc_url} --token-file {tf} --destination dev-api --scope admin"),
    )?;
    let denied = c
        .exchange
        .exchange(pb::ExchangeRequest {
            subject_token: token,
            destination: "dev-api".into(),
            scopes: vec!["admin".into()],
            ..Default::default()
        })
        .await
        .or_rpc_error(&c.grpc_target);
    match denied {
        Ok(r) => anyhow::bail!(
            "scope admin was granted (grant {}), it should be denied",
            r.grant_id
        ),
        Err(e) => {
            let reason = e.downcast_ref::<RpcError>().and_then(|r| r.reason);
            emit(&format!(
                "denied: {e} (reason: {})",
                reason.map_or("none", ReasonCode::as_str)
            ))?;
            anyhow::ensure!(
                reason == Some(ReasonCode::ScopeNotAllowed),
                "expected reason SCOPE_NOT_ALLOWED"
            );
        }
    }

    s.step(
        "The audit trail: every decision, hash-chained",
        &format!("lanyard audit tail --admin-socket {adm}"),
    )?;
    let mut stream = c
        .audit
        .watch(pb::WatchRequest::default())
        .await
        .or_rpc_error(&c.admin_target)?;
    let mut n = 0;
    while let Some(e) = futures::StreamExt::next(&mut stream).await {
        let e = e.map_err(|s| crate::client::rpc_error(s, &c.admin_target))?;
        emit(&output::audit_line(&e))?;
        n += 1;
    }
    anyhow::ensure!(n > 0, "the audit stream is empty");

    s.step(
        "Verify the audit chain",
        &format!("lanyard audit verify --admin-socket {adm}"),
    )?;
    let v = c
        .audit
        .verify(pb::VerifyRequest { after_seq: 0 })
        .await
        .or_rpc_error(&c.admin_target)?;
    anyhow::ensure!(
        v.ok,
        "the audit chain is broken at seq {}: {}",
        v.first_broken_seq,
        v.problem
    );
    emit(&format!(
        "intact: {} events checked, head seq {}",
        v.checked, v.head_seq
    ))?;
    Ok(())
}

async fn fetch_kids(url: &str) -> anyhow::Result<Vec<String>> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .context("building an HTTP client")?;
    let resp = client
        .get(url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    anyhow::ensure!(
        resp.status().is_success(),
        "GET {url}: HTTP {}",
        resp.status()
    );
    let jwks: Value = resp
        .json()
        .await
        .with_context(|| format!("GET {url}: not JSON"))?;
    Ok(jwks
        .get("keys")
        .and_then(Value::as_array)
        .map(|keys| {
            keys.iter()
                .filter_map(|k| k.get("kid").and_then(Value::as_str).map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_parses() {
        let r = parse_ready(
            "lanyard ready grpc=127.0.0.1:1 http=127.0.0.1:2 admin=/tmp/a b/admin.sock",
        )
        .unwrap();
        assert_eq!(r.grpc, "127.0.0.1:1");
        assert_eq!(r.http, "127.0.0.1:2");
        assert_eq!(r.admin, PathBuf::from("/tmp/a b/admin.sock"));
        assert!(parse_ready("lanyard is running").is_none());
        assert!(parse_ready("lanyard ready grpc=x").is_none());
    }
}
