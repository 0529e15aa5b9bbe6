//! `lanyard audit tail`, `verify`, `checkpoint` and `fingerprint`, on the admin socket.

use futures::StreamExt;
use lanyard_proto::v1 as pb;
use serde_json::json;

use crate::args::{AuditCommand, AuditTailArgs, GlobalArgs, OutputFormat};
use crate::client::{RpcResultExt, admin_target, audit_client, rpc_error};
use crate::output::{self, emit, emit_json, kv_table};

/// The chain is broken.
#[derive(Debug, thiserror::Error)]
#[error(
    "the audit chain is broken at seq {seq} ({kind}): {problem} ({checked} events before it are intact)"
)]
pub struct ChainBroken {
    /// First broken sequence number.
    pub seq: i64,
    /// What kind of damage: edited, deleted, reordered, truncated, rewritten...
    pub kind: String,
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
        AuditCommand::Verify(v) => {
            let req = pb::VerifyRequest {
                from_checkpoint: match &v.from_checkpoint {
                    Some(f) => read_text(f)?,
                    None => String::new(),
                },
                known_checkpoints: v
                    .checkpoints
                    .iter()
                    .map(|f| read_text(f))
                    .collect::<anyhow::Result<_>>()?,
            };
            let r = verify(g, req).await?;
            match g.output {
                OutputFormat::Json => emit_json(&verify_json(&r))?,
                OutputFormat::Table if r.ok => emit(&kv_table(&[
                    ("chain", "intact".into()),
                    (
                        "from",
                        if r.start_seq == 0 {
                            "genesis".into()
                        } else {
                            format!("checkpoint at seq {}", r.start_seq)
                        },
                    ),
                    ("events checked", r.checked.to_string()),
                    ("head seq", r.head_seq.to_string()),
                    ("head hash", r.head_hash.clone()),
                    ("checkpoints verified", r.checkpoints_verified.to_string()),
                    (
                        "last checkpoint",
                        if r.last_checkpoint_seq == 0 {
                            "-".into()
                        } else {
                            format!("seq {}", r.last_checkpoint_seq)
                        },
                    ),
                ]))?,
                OutputFormat::Table => {}
            }
            if r.ok {
                Ok(())
            } else {
                Err(ChainBroken {
                    seq: r.first_broken_seq,
                    kind: r.problem_kind,
                    problem: r.problem,
                    checked: r.checked,
                }
                .into())
            }
        }
        AuditCommand::Checkpoint => {
            let path = g.admin_socket_or_default();
            let mut c = audit_client(&path).await?;
            let r = c
                .checkpoint(pb::CheckpointRequest {})
                .await
                .or_rpc_error(&admin_target(&path))?;
            match g.output {
                OutputFormat::Json => emit_json(&json!({
                    "seq": r.seq,
                    "head_hash": r.head_hash,
                    "event_seq": r.event_seq,
                    "jws": r.jws,
                }))?,
                // The JWS alone on stdout, so `> checkpoint.jws` keeps exactly it.
                OutputFormat::Table => {
                    crate::output::note(&format!(
                        "checkpoint of seq {} (hash {}), recorded as event {}",
                        r.seq, r.head_hash, r.event_seq
                    ));
                    emit(&r.jws)?;
                }
            }
            Ok(())
        }
        AuditCommand::Fingerprint { token_file } => {
            let token = read_text(token_file)?;
            let path = g.admin_socket_or_default();
            let mut c = audit_client(&path).await?;
            let r = c
                .fingerprint(pb::FingerprintRequest { token })
                .await
                .or_rpc_error(&admin_target(&path))?;
            match g.output {
                OutputFormat::Json => emit_json(&json!({ "fingerprint": r.fingerprint }))?,
                OutputFormat::Table => emit(&r.fingerprint)?,
            }
            Ok(())
        }
    }
}

/// A file's text, trimmed ("-" reads stdin).
fn read_text(path: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context as _;
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading stdin")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    Ok(text.trim().to_owned())
}

/// A verify response as JSON.
pub fn verify_json(r: &pb::VerifyResponse) -> serde_json::Value {
    json!({
        "ok": r.ok,
        "start_seq": r.start_seq,
        "checked": r.checked,
        "head_seq": r.head_seq,
        "head_hash": r.head_hash,
        "checkpoints_verified": r.checkpoints_verified,
        "last_checkpoint_seq": r.last_checkpoint_seq,
        "first_broken_seq": r.first_broken_seq,
        "problem_kind": r.problem_kind,
        "problem": r.problem,
    })
}

/// Call Verify.
///
/// # Errors
/// When the admin socket cannot be reached or the server refuses.
pub async fn verify(g: &GlobalArgs, req: pb::VerifyRequest) -> anyhow::Result<pb::VerifyResponse> {
    let path = g.admin_socket_or_default();
    let mut c = audit_client(&path).await?;
    c.verify(req).await.or_rpc_error(&admin_target(&path))
}

/// The watch request for `audit tail`.
pub fn watch_request(t: &AuditTailArgs) -> pb::WatchRequest {
    pb::WatchRequest {
        after_seq: t.after,
        follow: t.follow,
        workload_id: t.workload.clone().unwrap_or_default(),
        destination: t.destination.clone().unwrap_or_default(),
        kind: t.kind.clone().unwrap_or_default(),
        subject_fingerprint: t.fingerprint.clone().unwrap_or_default(),
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
