//! `lanyard revoke`, `lanyard revoke status|list`, `lanyard issuer distrust`,
//! `lanyard deny ...` and `lanyard inventory`: revocation with live progress and a
//! per-destination table, and what a workload can reach and holds.

use std::io::IsTerminal;

use futures::StreamExt;
use lanyard_proto::v1 as pb;
use lanyard_proto::v1::admin_service_client::AdminServiceClient;
use pb::revoke_event::Event;
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::args::{
    DenyCommand, GlobalArgs, InventoryArgs, OutputFormat, RevokeArgs, RevokeCommand,
    RevokeSelectorArgs,
};
use crate::client::{RpcResultExt, admin_client, admin_target, rpc_error};
use crate::output::{
    self, emit, emit_json, human_duration, joined, kv_table, list_table, now, or_dash, rfc3339,
    ts_json, when,
};

async fn connect(g: &GlobalArgs) -> anyhow::Result<(AdminServiceClient<Channel>, String)> {
    let path = g.admin_socket_or_default();
    Ok((admin_client(&path).await?, admin_target(&path)))
}

fn selector(s: &RevokeSelectorArgs) -> anyhow::Result<pb::RevokeSelector> {
    use pb::revoke_selector::Selector as S;
    let one = match s {
        RevokeSelectorArgs { grant: Some(v), .. } => S::GrantId(v.clone()),
        RevokeSelectorArgs { task: Some(v), .. } => S::TaskId(v.clone()),
        RevokeSelectorArgs {
            workload: Some(v), ..
        } => S::WorkloadId(v.clone()),
        RevokeSelectorArgs {
            workload_prefix: Some(v),
            ..
        } => S::WorkloadPrefix(v.clone()),
        RevokeSelectorArgs {
            issuer: Some(v), ..
        } => S::Issuer(v.clone()),
        RevokeSelectorArgs {
            destination: Some(v),
            ..
        } => S::Destination(v.clone()),
        _ => anyhow::bail!(
            "say which grants: --grant, --task, --workload, --workload-prefix, --issuer or --destination"
        ),
    };
    Ok(pb::RevokeSelector {
        selector: Some(one),
    })
}

/// `lanyard revoke ...`
///
/// # Errors
/// When the admin socket cannot be reached or the server refuses.
pub async fn revoke(g: &GlobalArgs, a: &RevokeArgs) -> anyhow::Result<()> {
    let (mut client, target) = connect(g).await?;
    match &a.command {
        Some(RevokeCommand::Status {
            job,
            receipts,
            follow,
        }) => {
            if *follow {
                let stream = client
                    .watch_revocation(pb::GetRequest { name: job.clone() })
                    .await
                    .or_rpc_error(&target)?;
                return show_stream(g, stream, &target).await;
            }
            let r = client
                .get_revocation(pb::GetRevocationRequest {
                    job_id: job.clone(),
                    include_receipts: *receipts,
                })
                .await
                .or_rpc_error(&target)?;
            let job = r.job.unwrap_or_default();
            match g.output {
                OutputFormat::Json => emit_json(&json!({
                    "job": job_json(&job),
                    "receipts": r.receipts.iter().map(output::receipt_json).collect::<Vec<_>>(),
                }))?,
                OutputFormat::Table => {
                    emit(&kv_table(&job_rows(&job)))?;
                    emit("")?;
                    emit(&destinations_table(&job.destinations))?;
                    if *receipts {
                        emit("")?;
                        emit(&receipts_table(&r.receipts))?;
                    }
                }
            }
            Ok(())
        }
        Some(RevokeCommand::List { limit }) => {
            let r = client
                .list_revocations(pb::ListRevocationsRequest {
                    page_size: *limit,
                    page_token: String::new(),
                })
                .await
                .or_rpc_error(&target)?;
            match g.output {
                OutputFormat::Json => emit_json(&json!({
                    "jobs": r.jobs.iter().map(job_json).collect::<Vec<_>>(),
                    "next_page_token": r.next_page_token,
                }))?,
                OutputFormat::Table if r.jobs.is_empty() => emit("no revocation jobs")?,
                OutputFormat::Table => emit(&list_table(
                    &["job", "created", "selector", "matched", "state", "reason"],
                    r.jobs
                        .iter()
                        .map(|j| {
                            vec![
                                j.id.clone(),
                                rfc3339(j.created_at.as_ref()),
                                selector_str(j.selector.as_ref()),
                                j.matched.to_string(),
                                j.state.clone(),
                                j.reason.clone(),
                            ]
                        })
                        .collect(),
                ))?,
            }
            Ok(())
        }
        Some(RevokeCommand::Abandon {
            job,
            destination,
            reason,
        }) => {
            let j = client
                .abandon_revocation(pb::AbandonRevocationRequest {
                    job_id: job.clone(),
                    destination: destination.clone().unwrap_or_default(),
                    reason: reason.clone(),
                })
                .await
                .or_rpc_error(&target)?;
            match g.output {
                OutputFormat::Json => emit_json(&json!({"job": job_json(&j)}))?,
                OutputFormat::Table => {
                    emit(&kv_table(&job_rows(&j)))?;
                    emit("")?;
                    emit(&destinations_table(&j.destinations))?;
                }
            }
            Ok(())
        }
        None => {
            let Some(sel) = &a.selector else {
                anyhow::bail!("say which grants to revoke (see lanyard revoke --help)");
            };
            let req = pb::RevokeRequest {
                selector: Some(selector(sel)?),
                reason: a.reason.clone().unwrap_or_default(),
                deny_seconds: match a.deny_for {
                    None => 0,
                    Some(d) => u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX),
                },
            };
            let stream = client.revoke(req).await.or_rpc_error(&target)?;
            show_stream(g, stream, &target).await
        }
    }
}

/// Show a revocation stream: the job, progress on standard error as receipts arrive,
/// then the per-destination table (or one JSON document).
///
/// # Errors
/// When the stream fails or output cannot be written.
pub async fn show_stream(
    g: &GlobalArgs,
    mut stream: tonic::Streaming<pb::RevokeEvent>,
    target: &str,
) -> anyhow::Result<()> {
    let tty = std::io::stderr().is_terminal() && g.output == OutputFormat::Table;
    let mut job = pb::RevocationJob::default();
    let mut receipts: Vec<pb::RevocationReceipt> = Vec::new();
    let mut summary: Option<pb::RevokeSummary> = None;
    let mut kill_switch: Option<pb::KillSwitchResult> = None;
    let (mut handled, mut failed) = (0u64, 0u64);
    while let Some(ev) = stream.next().await {
        let ev = ev.map_err(|s| rpc_error(s, target))?;
        match ev.event {
            Some(Event::Job(j)) => {
                if g.output == OutputFormat::Table {
                    output::note(&format!(
                        "revocation {} started: {} matched {} active grant(s); reason: {}",
                        j.id,
                        selector_str(j.selector.as_ref()),
                        j.matched,
                        j.reason
                    ));
                    if !j.deny_entry.is_empty() {
                        output::note(&format!(
                            "new exchanges are refused by deny entry {}",
                            j.deny_entry
                        ));
                    }
                }
                job = j;
            }
            Some(Event::Receipt(r)) => {
                let n = u64::try_from(r.grant_ids.len().max(1)).unwrap_or(u64::MAX);
                handled += n;
                if r.outcome == "failed" {
                    failed += n;
                }
                if tty {
                    eprint!(
                        "\r{handled}/{} grants handled, {failed} failed (last: {} {})   ",
                        job.matched, r.destination, r.outcome
                    );
                } else if g.output == OutputFormat::Table {
                    output::note(&format!(
                        "receipt {}: {} {} for {} grant(s)",
                        r.seq, r.destination, r.outcome, n
                    ));
                }
                receipts.push(r);
            }
            Some(Event::KillSwitch(k)) => {
                if g.output == OutputFormat::Table {
                    output::note(&format!(
                        "kill switch at {}: {}: {}",
                        k.destination, k.outcome, k.detail
                    ));
                }
                kill_switch = Some(k);
            }
            Some(Event::Summary(s)) => summary = Some(s),
            None => {}
        }
    }
    if tty {
        eprintln!();
    }
    let Some(summary) = summary else {
        anyhow::bail!(
            "the server ended the stream before the summary; the job continues: lanyard revoke status {}",
            job.id
        );
    };
    match g.output {
        OutputFormat::Json => emit_json(&json!({
            "job": job_json(&job),
            "receipts": receipts.iter().map(output::receipt_json).collect::<Vec<_>>(),
            "summary": summary_json(&summary),
            "kill_switch": kill_switch.as_ref().map(|k| json!({
                "destination": k.destination,
                "outcome": k.outcome,
                "detail": k.detail,
            })),
        }))?,
        OutputFormat::Table => {
            emit(&kv_table(&[
                ("job", summary.job_id.clone()),
                ("matched", summary.matched.to_string()),
                ("revoked", summary.revoked.to_string()),
                ("blocked", summary.blocked.to_string()),
                ("expires at", summary.expires_at.to_string()),
                ("failed", summary.failed.to_string()),
                ("state", summary.state.clone()),
            ]))?;
            if !summary.destinations.is_empty() {
                emit("")?;
                emit(&destinations_table(&summary.destinations))?;
            }
        }
    }
    if let Some(k) = kill_switch.as_ref().filter(|k| k.outcome == "failed") {
        anyhow::bail!(
            "the kill switch at destination {} failed ({}); lanyard refuses its exchanges and revoked its grants regardless",
            k.destination,
            k.detail
        );
    }
    if summary.failed > 0 {
        anyhow::bail!(
            "{} grant(s) failed at their destination and are being retried; follow with: lanyard revoke status {} --follow",
            summary.failed,
            summary.job_id
        );
    }
    Ok(())
}

fn selector_str(s: Option<&pb::RevokeSelector>) -> String {
    use pb::revoke_selector::Selector as S;
    match s.and_then(|s| s.selector.as_ref()) {
        Some(S::GrantId(v)) => format!("grant {v}"),
        Some(S::TaskId(v)) => format!("task {v}"),
        Some(S::WorkloadId(v)) => format!("workload {v}"),
        Some(S::WorkloadPrefix(v)) => format!("workload prefix {v}"),
        Some(S::Issuer(v)) => format!("issuer {v}"),
        Some(S::Destination(v)) => format!("destination {v}"),
        None => "-".into(),
    }
}

fn selector_json(s: Option<&pb::RevokeSelector>) -> Value {
    use pb::revoke_selector::Selector as S;
    let (k, v) = match s.and_then(|s| s.selector.as_ref()) {
        Some(S::GrantId(v)) => ("grant", v),
        Some(S::TaskId(v)) => ("task", v),
        Some(S::WorkloadId(v)) => ("workload", v),
        Some(S::WorkloadPrefix(v)) => ("workload_prefix", v),
        Some(S::Issuer(v)) => ("issuer", v),
        Some(S::Destination(v)) => ("destination", v),
        None => return Value::Null,
    };
    json!({"kind": k, "value": v})
}

fn destination_json(d: &pb::RevocationDestination) -> Value {
    json!({
        "destination": d.destination,
        "pending": d.pending,
        "revoked": d.revoked,
        "blocked": d.blocked,
        "expires_at": d.expires_at,
        "failed": d.failed,
        "abandoned": d.abandoned,
        "latest_expiry": ts_json(d.latest_expiry.as_ref()),
    })
}

fn job_json(j: &pb::RevocationJob) -> Value {
    json!({
        "id": j.id,
        "selector": selector_json(j.selector.as_ref()),
        "reason": j.reason,
        "requested_by": j.requested_by,
        "created_at": ts_json(j.created_at.as_ref()),
        "matched": j.matched,
        "state": j.state,
        "finished_at": ts_json(j.finished_at.as_ref()),
        "destinations": j.destinations.iter().map(destination_json).collect::<Vec<_>>(),
        "receipts": j.receipts,
        "deny_entry": j.deny_entry,
    })
}

fn summary_json(s: &pb::RevokeSummary) -> Value {
    json!({
        "job_id": s.job_id,
        "matched": s.matched,
        "revoked": s.revoked,
        "blocked": s.blocked,
        "expires_at": s.expires_at,
        "failed": s.failed,
        "state": s.state,
        "destinations": s.destinations.iter().map(destination_json).collect::<Vec<_>>(),
    })
}

fn job_rows(j: &pb::RevocationJob) -> Vec<(&'static str, String)> {
    let n = now();
    vec![
        ("job", j.id.clone()),
        ("selector", selector_str(j.selector.as_ref())),
        ("reason", j.reason.clone()),
        ("requested by", j.requested_by.clone()),
        ("created", when(j.created_at.as_ref(), n)),
        ("matched", j.matched.to_string()),
        ("state", j.state.clone()),
        ("finished", when(j.finished_at.as_ref(), n)),
        ("receipts", j.receipts.to_string()),
        ("deny entry", or_dash(&j.deny_entry)),
    ]
}

fn destinations_table(ds: &[pb::RevocationDestination]) -> String {
    if ds.is_empty() {
        return "no grants matched".into();
    }
    let n = now();
    list_table(
        &[
            "destination",
            "revoked",
            "blocked",
            "expires_at",
            "failed",
            "abandoned",
            "pending",
            "residual lifetime",
        ],
        ds.iter()
            .map(|d| {
                let residual = match &d.latest_expiry {
                    Some(t) if d.expires_at > 0 && t.seconds > n => format!(
                        "until {} ({})",
                        rfc3339(Some(t)),
                        human_duration(u64::try_from(t.seconds - n).unwrap_or(0))
                    ),
                    Some(_) if d.expires_at > 0 => "already expired".into(),
                    _ => "-".into(),
                };
                vec![
                    d.destination.clone(),
                    d.revoked.to_string(),
                    d.blocked.to_string(),
                    d.expires_at.to_string(),
                    d.failed.to_string(),
                    d.abandoned.to_string(),
                    d.pending.to_string(),
                    residual,
                ]
            })
            .collect(),
    )
}

fn receipts_table(rs: &[pb::RevocationReceipt]) -> String {
    if rs.is_empty() {
        return "no receipts yet".into();
    }
    list_table(
        &["seq", "destination", "outcome", "grants", "at", "detail"],
        rs.iter()
            .map(|r| {
                vec![
                    r.seq.to_string(),
                    r.destination.clone(),
                    r.outcome.clone(),
                    r.grant_ids.len().to_string(),
                    rfc3339(r.at.as_ref()),
                    r.detail.clone(),
                ]
            })
            .collect(),
    )
}

// === deny ===

fn deny_json(d: &pb::DenyEntry) -> Value {
    json!({
        "name": d.name,
        "kind": d.kind,
        "value": d.value,
        "reason": d.reason,
        "job_id": d.job_id,
        "created_at": ts_json(d.created_at.as_ref()),
        "expires_at": ts_json(d.expires_at.as_ref()),
        "created_by": d.created_by,
    })
}

/// `lanyard deny ...`
///
/// # Errors
/// When the admin socket cannot be reached or the server refuses.
pub async fn deny(g: &GlobalArgs, cmd: &DenyCommand) -> anyhow::Result<()> {
    let (mut client, target) = connect(g).await?;
    match cmd {
        DenyCommand::List => {
            let r = client
                .list_deny_entries(pb::ListRequest::default())
                .await
                .or_rpc_error(&target)?;
            let n = now();
            match g.output {
                OutputFormat::Json => emit_json(&json!({
                    "entries": r.entries.iter().map(deny_json).collect::<Vec<_>>(),
                }))?,
                OutputFormat::Table if r.entries.is_empty() => emit("no deny entries")?,
                OutputFormat::Table => emit(&list_table(
                    &["name", "expires", "job", "reason"],
                    r.entries
                        .iter()
                        .map(|d| {
                            vec![
                                d.name.clone(),
                                match &d.expires_at {
                                    None => "until lifted".into(),
                                    Some(t) if t.seconds <= n => "expired".into(),
                                    Some(t) => when(Some(t), n),
                                },
                                d.job_id.clone(),
                                d.reason.clone(),
                            ]
                        })
                        .collect(),
                ))?,
            }
            Ok(())
        }
        DenyCommand::Lift { name } => {
            let r = client
                .lift_deny_entry(pb::DeleteRequest { name: name.clone() })
                .await
                .or_rpc_error(&target)?;
            match g.output {
                OutputFormat::Json => emit_json(&json!({"lifted": r.name}))?,
                OutputFormat::Table => emit(&format!("lifted deny entry {}", r.name))?,
            }
            Ok(())
        }
    }
}

// === inventory ===

/// `lanyard inventory WORKLOAD`
///
/// # Errors
/// When the admin socket cannot be reached or the server refuses.
pub async fn inventory(g: &GlobalArgs, a: &InventoryArgs) -> anyhow::Result<()> {
    let (mut client, target) = connect(g).await?;
    let mut req = pb::InventoryRequest {
        workload_id: a.workload.clone(),
        issuer: a.issuer.clone().unwrap_or_default(),
        destination: a.destination.clone().unwrap_or_default(),
        task_id: a.task.clone().unwrap_or_default(),
        page_size: a.limit,
        page_token: String::new(),
    };
    let first = client.inventory(req.clone()).await.or_rpc_error(&target)?;
    let mut grants = first.grants.clone();
    let mut next = first.next_page_token.clone();
    while a.all && !next.is_empty() {
        req.page_token = next;
        let r = client.inventory(req.clone()).await.or_rpc_error(&target)?;
        grants.extend(r.grants);
        next = r.next_page_token;
    }
    let n = now();
    match g.output {
        OutputFormat::Json => emit_json(&json!({
            "workload_id": first.workload_id,
            "issuer": first.issuer,
            "claims_seen_at": ts_json(first.claims_seen_at.as_ref()),
            "destinations": first.destinations.iter().map(|d| json!({
                "destination": d.destination,
                "kind": d.kind,
                "allowed": d.allowed,
                "scopes": d.scopes,
                "max_ttl_seconds": d.max_ttl_seconds,
                "policy_version": d.policy_version,
                "determining_policies": d.determining_policies,
            })).collect::<Vec<_>>(),
            "grants": grants.iter().map(output::grant_json).collect::<Vec<_>>(),
            "next_page_token": next,
            "denied_by": first.denied_by.iter().map(deny_json).collect::<Vec<_>>(),
        }))?,
        OutputFormat::Table => {
            emit(&format!("workload {}", first.workload_id))?;
            match &first.claims_seen_at {
                Some(t) => emit(&format!(
                    "policy evaluated with the claims of its last exchange ({}, issuer {})",
                    when(Some(t), n),
                    first.issuer
                ))?,
                None => emit(
                    "no exchange on record: policy evaluated with the workload ID only (claims unknown)",
                )?,
            }
            for d in &first.denied_by {
                emit(&format!(
                    "DENIED: new exchanges refused by deny entry {} ({})",
                    d.name, d.reason
                ))?;
            }
            emit("")?;
            emit(&list_table(
                &[
                    "destination",
                    "kind",
                    "reachable",
                    "scopes",
                    "max ttl",
                    "policies",
                ],
                first
                    .destinations
                    .iter()
                    .map(|d| {
                        vec![
                            d.destination.clone(),
                            d.kind.clone(),
                            if d.allowed { "yes" } else { "no" }.into(),
                            joined(&d.scopes),
                            if d.max_ttl_seconds == 0 {
                                "-".into()
                            } else {
                                human_duration(u64::from(d.max_ttl_seconds))
                            },
                            joined(&d.determining_policies),
                        ]
                    })
                    .collect(),
            ))?;
            emit("")?;
            if grants.is_empty() {
                emit("holds no active grants")?;
            } else {
                emit(&format!("active grants ({}):", grants.len()))?;
                emit(&output::grants_table(&grants, n))?;
            }
            if !next.is_empty() {
                output::note("more grants: use --all, or a larger --limit");
            }
        }
    }
    Ok(())
}
