//! The workload commands on the gRPC listener: `exchange`, `renew`, `release`, and
//! `dev token`. The subject token is read from a file and never printed; the credential
//! is printed by `exchange` and `renew` alone, because handing it over is their job.

use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::Context;
use lanyard_core::{Clock, Secret, SystemClock};
use lanyard_proto::v1 as pb;

use crate::args::{
    DevTokenArgs, ExchangeArgs, GlobalArgs, GrantRef, OutputFormat, ReleaseArgs, RenewArgs,
};
use crate::client::{RpcResultExt, exchange_client, grpc_url};
use crate::output::{self, emit, emit_json, kv_table};

/// Read a subject token from `path` (`-` = standard input), whitespace trimmed.
///
/// # Errors
/// When the file cannot be read or holds nothing.
pub fn read_token(path: &Path) -> anyhow::Result<Secret> {
    let mut text = String::new();
    if path == Path::new("-") {
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading the token from standard input")?;
    } else {
        text = std::fs::read_to_string(path)
            .with_context(|| format!("reading token file {}", path.display()))?;
    }
    let token = text.trim();
    if token.is_empty() {
        anyhow::bail!("token file {} is empty", path.display());
    }
    Ok(Secret::new(token))
}

/// The grant ID named by `--grant` or read from `--grant-file`.
///
/// # Errors
/// When the file cannot be read or is empty.
pub fn grant_id(g: &GrantRef) -> anyhow::Result<String> {
    let id = match (&g.grant, &g.grant_file) {
        (Some(id), _) => id.trim().to_string(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("reading grant file {}", f.display()))?
            .trim()
            .to_string(),
        (None, None) => anyhow::bail!("one of --grant or --grant-file is required"),
    };
    if id.is_empty() {
        anyhow::bail!("the grant ID is empty");
    }
    Ok(id)
}

/// Write `text` to `path` with owner-only permissions.
///
/// # Errors
/// When the file cannot be written.
pub fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    // An existing file keeps its mode on open; tighten it.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {} to its owner", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// `lanyard dev token`
///
/// # Errors
/// When the data directory has no dev issuer.
pub fn dev_token(a: &DevTokenArgs) -> anyhow::Result<()> {
    let token = lanyard_server::dev::mint_dev_token(
        &a.data_dir,
        &a.subject,
        a.task.as_deref(),
        a.ttl,
        SystemClock.now_unix(),
    )
    .with_context(|| {
        format!(
            "minting a dev token (is `lanyard serve --dev --data-dir {}` running?)",
            a.data_dir.display()
        )
    })?;
    emit(&token)?;
    Ok(())
}

fn print_exchange(g: &GlobalArgs, r: &pb::ExchangeResponse) -> anyhow::Result<()> {
    match g.output {
        OutputFormat::Json => emit_json(&output::exchange_json(r))?,
        OutputFormat::Table => {
            let mut rows = output::exchange_rows(r, output::now());
            rows.extend(output::credential_rows(r.credential.as_ref()));
            emit(&kv_table(&rows))?;
        }
    }
    Ok(())
}

/// `lanyard exchange`
///
/// # Errors
/// When the token cannot be read, lanyard cannot be reached, or refuses.
pub async fn exchange(g: &GlobalArgs, a: &ExchangeArgs) -> anyhow::Result<()> {
    let token = read_token(&a.token.token_file)?;
    let actor = a.actor_token_file.as_deref().map(read_token).transpose()?;
    let mut client = exchange_client(&g.grpc).await?;
    let r = client
        .exchange(pb::ExchangeRequest {
            subject_token: token.into_inner(),
            destination: a.destination.clone(),
            scopes: a.scopes.clone(),
            requested_ttl_seconds: a.ttl.unwrap_or(0),
            audience: a.audience.clone().unwrap_or_default(),
            actor_token_type: if actor.is_some() {
                "urn:ietf:params:oauth:token-type:jwt".into()
            } else {
                String::new()
            },
            actor_token: actor.map(Secret::into_inner).unwrap_or_default(),
            ..Default::default()
        })
        .await
        .or_rpc_error(&grpc_url(&g.grpc))?;
    if let Some(path) = &a.save_grant {
        write_private(path, &format!("{}\n", r.grant_id))?;
    }
    print_exchange(g, &r)
}

/// `lanyard renew`
///
/// # Errors
/// As [`exchange`].
pub async fn renew(g: &GlobalArgs, a: &RenewArgs) -> anyhow::Result<()> {
    let grant_id = grant_id(&a.grant)?;
    let token = read_token(&a.token.token_file)?;
    let mut client = exchange_client(&g.grpc).await?;
    let r = client
        .renew(pb::RenewRequest {
            grant_id,
            subject_token: token.into_inner(),
            requested_ttl_seconds: a.ttl.unwrap_or(0),
            ..Default::default()
        })
        .await
        .or_rpc_error(&grpc_url(&g.grpc))?;
    print_exchange(g, &r)
}

/// `lanyard release`
///
/// # Errors
/// As [`exchange`].
pub async fn release(g: &GlobalArgs, a: &ReleaseArgs) -> anyhow::Result<()> {
    let grant_id = grant_id(&a.grant)?;
    let token = read_token(&a.token.token_file)?;
    let mut client = exchange_client(&g.grpc).await?;
    let r = client
        .release(pb::ReleaseRequest {
            grant_id,
            subject_token: token.into_inner(),
            ..Default::default()
        })
        .await
        .or_rpc_error(&grpc_url(&g.grpc))?;
    match g.output {
        OutputFormat::Json => emit_json(&output::release_json(&r))?,
        OutputFormat::Table => emit(&kv_table(&output::release_rows(&r, output::now())))?,
    }
    Ok(())
}
