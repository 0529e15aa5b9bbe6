//! `lanyard demo`: the newcomer's one-command tour. Starts this same binary as a
//! throwaway `serve --dev` (see [`crate::dev_server`] for why a child process), walks one
//! grant through its life (mint a token, exchange, inspect, list, release, a denial, the
//! audit trail) and stops the server with SIGTERM.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use lanyard_core::{Clock, ReasonCode, SystemClock};
use lanyard_proto::v1 as pb;
use lanyard_proto::v1::admin_service_client::AdminServiceClient;
use lanyard_proto::v1::audit_service_client::AuditServiceClient;
use lanyard_proto::v1::exchange_service_client::ExchangeServiceClient;
use serde_json::Value;
use tonic::transport::Channel;

use crate::client::{RpcError, RpcResultExt, admin_channel, admin_target, exchange_client};
use crate::dev_server::DevServer;
pub use crate::dev_server::{Ready, parse_ready};
use crate::output::{self, emit, kv_table};
use crate::workload::write_private;

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

    let (mut server, ready) = DevServer::start(dir.path()).await?;
    emit(&format!(
        "server ready: grpc={} http={} admin={}",
        ready.grpc,
        ready.http,
        ready.admin.display()
    ))?;
    let result = tour(&ready, dir.path()).await;
    let stopped = stop(&mut server).await;
    let result = result.and(stopped);
    match &result {
        Ok(()) => emit("\ndemo complete: every step did what it should.")?,
        Err(_) => server.report_stderr(),
    }
    result
}

/// SIGTERM the server, saying so, and wait for a clean exit.
async fn stop(server: &mut DevServer) -> anyhow::Result<()> {
    if let Some(pid) = server.pid() {
        emit(&format!(
            "\n== stopping the server (SIGTERM to pid {pid}) =="
        ))?;
    }
    match server.stop().await {
        Ok(()) => {
            emit("the server stopped cleanly")?;
            Ok(())
        }
        Err(e) => Err(e.into()),
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
        "Revoke everything the workload holds, everywhere, with a signed receipt per destination",
        &format!(
            "lanyard revoke --admin-socket {adm} --workload {} --reason \"demo: key rotation drill\"",
            granted.workload_id
        ),
    )?;
    for _ in 0..2 {
        c.exchange
            .exchange(pb::ExchangeRequest {
                subject_token: token.clone(),
                destination: "dev-api".into(),
                scopes: vec!["read".into()],
                ..Default::default()
            })
            .await
            .or_rpc_error(&c.grpc_target)
            .context("an exchange before the revocation was refused")?;
    }
    let mut events = c
        .admin
        .revoke(pb::RevokeRequest {
            selector: Some(pb::RevokeSelector {
                selector: Some(pb::revoke_selector::Selector::WorkloadId(
                    granted.workload_id.clone(),
                )),
            }),
            reason: "demo: key rotation drill".into(),
            deny_seconds: 0,
        })
        .await
        .or_rpc_error(&c.admin_target)?;
    let mut summary = None;
    while let Some(ev) = futures::StreamExt::next(&mut events).await {
        let ev = ev.map_err(|s| crate::client::rpc_error(s, &c.admin_target))?;
        match ev.event {
            Some(pb::revoke_event::Event::Job(j)) => emit(&format!(
                "job {} stored: {} active grant(s) matched",
                j.id, j.matched
            ))?,
            Some(pb::revoke_event::Event::Receipt(r)) => emit(&format!(
                "receipt {}: {} {} for {} grant(s), signed ({} bytes of JWS)",
                r.seq,
                r.destination,
                r.outcome,
                r.grant_ids.len(),
                r.signature.len()
            ))?,
            Some(pb::revoke_event::Event::Summary(sm)) => summary = Some(sm),
            Some(pb::revoke_event::Event::KillSwitch(_)) | None => {}
        }
    }
    let summary = summary.context("the revocation stream ended without a summary")?;
    emit(&format!(
        "summary: {} matched, {} revoked, {} failed ({})",
        summary.matched, summary.revoked, summary.failed, summary.state
    ))?;
    anyhow::ensure!(
        summary.matched == 2 && summary.revoked == 2,
        "expected the 2 active grants to be revoked"
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
        .verify(pb::VerifyRequest::default())
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
