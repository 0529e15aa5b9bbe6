//! `lanyard policy put|get|history|diff|activate`: versioned Cedar policy, on the admin
//! socket.

use std::path::Path;

use anyhow::Context as _;
use lanyard_proto::v1 as pb;
use serde_json::{Value, json};

use crate::args::{GlobalArgs, OutputFormat, PolicyCommand};
use crate::client::{RpcResultExt, admin_client, admin_target};
use crate::output::{emit, emit_json, kv_table, list_table, note, rfc3339};

/// A version as JSON.
pub fn version_json(v: &pb::PolicyVersion) -> Value {
    json!({
        "version": v.version,
        "active": v.active,
        "created_at": rfc3339(v.created_at.as_ref()),
        "created_by": v.created_by,
        "sha256": v.sha256,
        "policy_ids": v.policy_ids,
        "comment": v.comment,
        "text": v.text,
    })
}

fn summary(v: &pb::PolicyVersion) -> String {
    kv_table(&[
        ("version", v.version.clone()),
        ("active", if v.active { "yes" } else { "no" }.into()),
        ("created", rfc3339(v.created_at.as_ref())),
        ("by", v.created_by.clone()),
        ("policies", v.policy_ids.join(", ")),
        ("sha256", v.sha256.clone()),
        ("comment", v.comment.clone()),
    ])
}

fn read_policy(path: &Path) -> anyhow::Result<String> {
    if path.as_os_str() == "-" {
        return std::io::read_to_string(std::io::stdin()).context("reading stdin");
    }
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// A unified diff of two texts, `---`/`+++` naming the versions.
pub fn unified_diff(a_name: &str, a: &str, b_name: &str, b: &str) -> String {
    similar::TextDiff::from_lines(a, b)
        .unified_diff()
        .context_radius(3)
        .header(a_name, b_name)
        .to_string()
}

/// `lanyard policy ...`
///
/// # Errors
/// When the admin socket cannot be reached, a file cannot be read, or the server
/// refuses (a policy that does not validate comes back with Cedar's diagnostics).
pub async fn policy(g: &GlobalArgs, cmd: &PolicyCommand) -> anyhow::Result<()> {
    let path = g.admin_socket_or_default();
    let target = admin_target(&path);
    let mut c = admin_client(&path).await?;
    match cmd {
        PolicyCommand::Put {
            file,
            activate,
            comment,
        } => {
            let text = read_policy(file)?;
            let v = c
                .put_policy(pb::PutPolicyRequest {
                    text,
                    activate: *activate,
                    comment: comment.clone().unwrap_or_default(),
                })
                .await
                .or_rpc_error(&target)?;
            match g.output {
                OutputFormat::Json => emit_json(&version_json(&v))?,
                OutputFormat::Table => {
                    emit(&summary(&v))?;
                    if !v.active {
                        note(&format!(
                            "stored, not active; activate with: lanyard policy activate {}",
                            v.version
                        ));
                    }
                }
            }
        }
        PolicyCommand::Get { name } => {
            let v = c
                .get_policy(pb::GetPolicyRequest {
                    version: name.clone().unwrap_or_default(),
                })
                .await
                .or_rpc_error(&target)?;
            match g.output {
                OutputFormat::Json => emit_json(&version_json(&v))?,
                // The text alone on stdout (so `> file` round-trips), the rest on stderr.
                OutputFormat::Table => {
                    note(&format!(
                        "policy {}{}{}",
                        v.version,
                        if v.active { " (active)" } else { "" },
                        if v.comment.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", v.comment)
                        }
                    ));
                    if !v.text.is_empty() {
                        emit(v.text.trim_end())?;
                    }
                }
            }
        }
        PolicyCommand::History => {
            let r = c
                .list_policies(pb::ListRequest::default())
                .await
                .or_rpc_error(&target)?;
            match g.output {
                OutputFormat::Json => emit_json(&json!({
                    "versions": r.versions.iter().map(version_json).collect::<Vec<_>>()
                }))?,
                OutputFormat::Table => emit(&list_table(
                    &["VERSION", "ACTIVE", "CREATED", "BY", "POLICIES", "COMMENT"],
                    r.versions
                        .iter()
                        .map(|v| {
                            vec![
                                v.version.clone(),
                                if v.active { "*".into() } else { String::new() },
                                rfc3339(v.created_at.as_ref()),
                                v.created_by.clone(),
                                v.policy_ids.len().to_string(),
                                v.comment.clone(),
                            ]
                        })
                        .collect(),
                ))?,
            }
        }
        PolicyCommand::Diff { from, to } => {
            let get = |v: &str| {
                let v = v.to_owned();
                let mut c = c.clone();
                let target = target.clone();
                async move {
                    c.get_policy(pb::GetPolicyRequest { version: v })
                        .await
                        .or_rpc_error(&target)
                }
            };
            let a = get(from).await?;
            let b = get(to).await?;
            let diff = unified_diff(&a.version, &a.text, &b.version, &b.text);
            match g.output {
                OutputFormat::Json => emit_json(&json!({
                    "from": a.version, "to": b.version, "identical": diff.is_empty(), "diff": diff
                }))?,
                OutputFormat::Table if diff.is_empty() => {
                    note(&format!("{} and {} are identical", a.version, b.version));
                }
                OutputFormat::Table => emit(diff.trim_end())?,
            }
        }
        PolicyCommand::DryRun { file, since } => {
            let text = read_policy(file)?;
            let now = lanyard_core::Clock::now_unix(&lanyard_core::SystemClock);
            let since_secs = now - i64::try_from(since.as_secs()).unwrap_or(i64::MAX / 2);
            let r = c
                .dry_run_policy(pb::DryRunPolicyRequest {
                    text,
                    since: Some(prost_types::Timestamp {
                        seconds: since_secs,
                        nanos: 0,
                    }),
                    until: None,
                })
                .await
                .or_rpc_error(&target)?;
            match g.output {
                OutputFormat::Json => emit_json(&json!({
                    "proposed_version": r.proposed_version,
                    "events_examined": r.events_examined,
                    "requests_replayed": r.requests_replayed,
                    "skipped": r.skipped,
                    "changes": r.changes.iter().map(|c| json!({
                        "change": c.change, "workload_id": c.workload_id,
                        "destination": c.destination, "scope": c.scope,
                        "requests": c.requests, "example_seq": c.example_seq,
                    })).collect::<Vec<_>>(),
                }))?,
                OutputFormat::Table => {
                    note(&format!(
                        "{}: {} requests replayed ({} events, {} refused before policy)",
                        r.proposed_version, r.requests_replayed, r.events_examined, r.skipped
                    ));
                    if r.changes.is_empty() {
                        emit("no change: every replayed request gets the same scopes")?;
                    } else {
                        emit(&list_table(
                            &[
                                "CHANGE",
                                "WORKLOAD",
                                "DESTINATION",
                                "SCOPE",
                                "REQUESTS",
                                "EXAMPLE EVENT",
                            ],
                            r.changes
                                .iter()
                                .map(|c| {
                                    vec![
                                        c.change.clone(),
                                        c.workload_id.clone(),
                                        c.destination.clone(),
                                        c.scope.clone(),
                                        c.requests.to_string(),
                                        c.example_seq.to_string(),
                                    ]
                                })
                                .collect(),
                        ))?;
                    }
                }
            }
        }
        PolicyCommand::Activate { name } => {
            let v = c
                .activate_policy(pb::ActivatePolicyRequest {
                    version: name.clone(),
                })
                .await
                .or_rpc_error(&target)?;
            match g.output {
                OutputFormat::Json => emit_json(&version_json(&v))?,
                OutputFormat::Table => emit(&summary(&v))?,
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_names_versions_and_shows_changed_lines() {
        let d = unified_diff("v1", "a\nb\nc\n", "v2", "a\nB\nc\n");
        assert!(d.starts_with("--- v1\n+++ v2\n"), "{d}");
        assert!(d.contains("-b\n") && d.contains("+B\n"), "{d}");
        assert!(unified_diff("v1", "same\n", "v2", "same\n").is_empty());
    }
}
