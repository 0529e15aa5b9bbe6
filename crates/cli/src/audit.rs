//! `lanyard audit tail` and `lanyard audit verify`, on the admin socket.

use futures::StreamExt;
use lanyard_proto::v1 as pb;
use serde_json::json;

use crate::args::{AuditCommand, AuditTailArgs, GlobalArgs, OutputFormat};
use crate::client::{RpcResultExt, admin_target, audit_client, rpc_error};
use crate::output::{self, emit, emit_json, kv_table};

/// The chain is broken.
#[derive(Debug, thiserror::Error)]
#[error(
    "the audit chain is broken at seq {seq}: {problem} ({checked} events before it are intact)"
)]
pub struct ChainBroken {
    /// First broken sequence number.
    pub seq: i64,
    /// What is wrong there.
    pub problem: String,
    /// Events checked and intact.
    pub checked: i64,
}

/// `lanyard audit ...`
///
/// # Errors
/// When the admin socket cannot be reached, the server refuses, or (verify) the chain is
/// broken.
pub async fn audit(g: &GlobalArgs, cmd: &AuditCommand) -> anyhow::Result<()> {
    match cmd {
        AuditCommand::Tail(t) => tail(g, t).await,
        AuditCommand::Verify { after } => {
            let r = verify(g, *after).await?;
            match g.output {
                OutputFormat::Json => emit_json(&verify_json(&r))?,
                OutputFormat::Table if r.ok => emit(&kv_table(&[
                    ("chain", "intact".into()),
                    ("events checked", r.checked.to_string()),
                    ("head seq", r.head_seq.to_string()),
                ]))?,
                OutputFormat::Table => {}
            }
            if r.ok {
                Ok(())
            } else {
                Err(ChainBroken {
                    seq: r.first_broken_seq,
                    problem: r.problem,
                    checked: r.checked,
                }
                .into())
            }
        }
    }
}

/// A verify response as JSON.
pub fn verify_json(r: &pb::VerifyResponse) -> serde_json::Value {
    json!({
        "ok": r.ok,
        "checked": r.checked,
        "head_seq": r.head_seq,
        "first_broken_seq": r.first_broken_seq,
        "problem": r.problem,
    })
}

/// Call Verify.
///
/// # Errors
/// When the admin socket cannot be reached or the server refuses.
pub async fn verify(g: &GlobalArgs, after: i64) -> anyhow::Result<pb::VerifyResponse> {
    let path = g.admin_socket_or_default();
    let mut c = audit_client(&path).await?;
    c.verify(pb::VerifyRequest { after_seq: after })
        .await
        .or_rpc_error(&admin_target(&path))
}

/// The watch request for `audit tail`.
pub fn watch_request(t: &AuditTailArgs) -> pb::WatchRequest {
    pb::WatchRequest {
        after_seq: t.after,
        follow: t.follow,
        workload_id: t.workload.clone().unwrap_or_default(),
        destination: t.destination.clone().unwrap_or_default(),
        kind: t.kind.clone().unwrap_or_default(),
    }
}

async fn tail(g: &GlobalArgs, t: &AuditTailArgs) -> anyhow::Result<()> {
    let path = g.admin_socket_or_default();
    let target = admin_target(&path);
    let mut c = audit_client(&path).await?;
    let mut stream = c.watch(watch_request(t)).await.or_rpc_error(&target)?;
    while let Some(item) = stream.next().await {
        let e = item.map_err(|s| rpc_error(s, &target))?;
        match g.output {
            OutputFormat::Json => emit(&output::audit_json(&e).to_string())?,
            OutputFormat::Table => emit(&output::audit_line(&e))?,
        }
    }
    Ok(())
}
