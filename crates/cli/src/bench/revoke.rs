//! `lanyard bench --revoke N`: revoke N active grants of one workload and time it.
//!
//! The grants are written straight into a fresh embedded store (as N exchanges would
//! have left them: `jwt` grants for the dev destination, one workload) before a
//! throwaway `lanyard serve --dev` starts on it; seeding is not timed. Then one
//! `AdminService.Revoke` for the workload is timed from the request to the job being
//! stored (everything revoked for lanyard's own tokens: introspection refuses them from
//! that commit on) and to the summary (the last signed receipt written and streamed).
//! The server's CPU time and peak resident memory come from `/proc/<pid>`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use lanyard_core::{Clock, GrantId, SystemClock};
use lanyard_proto::v1 as pb;
use lanyard_server::dev::DEV_DESTINATION;
use lanyard_store::{GrantRecord, GrantStatus, NewAuditEvent, Store};
use lanyard_store_sqlite::SqliteStore;
use serde_json::json;

use super::{Machine, command_line, cpu_ticks, round_to};
use crate::args::{GlobalArgs, OutputFormat};
use crate::dev_server::DevServer;
use crate::output::{emit, emit_json, kv_table, note};

/// The workload whose grants are revoked.
const WORKLOAD: &str = "spiffe://lanyard.local/dev/bench-revoke";
/// Grants per seeding transaction.
const SEED_BATCH: usize = 4096;
/// The goal for 100,000 grants.
const GOAL: Duration = Duration::from_secs(2);

/// Write `n` active grants of [`WORKLOAD`] into a fresh store at `path`.
async fn seed(path: &Path, n: u64) -> anyhow::Result<()> {
    seed_spread(path, n, 1).await
}

/// The workload of grant `i` when grants are spread over `workloads` workloads (the
/// first is [`WORKLOAD`]).
fn workload_of(i: u64, workloads: u64) -> String {
    match i % workloads {
        0 => WORKLOAD.to_owned(),
        k => format!("{WORKLOAD}-{k}"),
    }
}

/// Write `n` grants spread over `workloads` workloads; one in ten is active, the rest
/// released, as on a store that has been running a while.
async fn seed_spread(path: &Path, n: u64, workloads: u64) -> anyhow::Result<()> {
    let store = SqliteStore::open(path)
        .await
        .context("creating the store")?;
    let now = SystemClock.now_unix();
    let mut written = 0u64;
    while written < n {
        let take = (n - written).min(SEED_BATCH as u64);
        let grants: Vec<GrantRecord> = (0..take)
            .map(|i| {
                let id = GrantId::generate();
                GrantRecord {
                    revocation_handle: format!("{:032x}", written + i),
                    id,
                    workload_id: workload_of(written + i, workloads),
                    issuer: "dev".into(),
                    trust_rule: "dev".into(),
                    task_id: Some(format!("run-{}", (written + i) / 100)),
                    destination: DEV_DESTINATION.into(),
                    scopes: vec!["read".into()],
                    actor_chain: Vec::new(),
                    issued_at: now,
                    expires_at: now + 3600,
                    status: if workloads == 1 || (written + i).is_multiple_of(10) {
                        GrantStatus::Active
                    } else {
                        GrantStatus::Released
                    },
                    finished_at: None,
                    renew_count: 0,
                }
            })
            .collect();
        let event = NewAuditEvent {
            time_ms: now * 1000,
            kind: "bench.seeded".into(),
            detail: json!({"grants": take}),
            ..NewAuditEvent::default()
        };
        store
            .grant_insert_batch(&grants, std::slice::from_ref(&event))
            .await
            .context("seeding grants")?;
        written += take;
    }
    store.close().await;
    Ok(())
}

/// `VmHWM` (peak resident set) and `VmRSS` of a process, KiB.
fn memory_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .with_context(|| format!("{path} has no {name}"))
    };
    Ok((field("VmHWM:")?, field("VmRSS:")?))
}

/// Run the benchmark.
///
/// # Errors
/// When seeding, the server, or the revocation fails, or not every grant was revoked.
pub async fn run(g: &GlobalArgs, n: u64) -> anyhow::Result<()> {
    let machine = Machine::read();
    let dir = tempfile::Builder::new()
        .prefix("lanyard-bench-revoke-")
        .tempdir()
        .context("creating a throwaway directory")?;
    note(&format!("bench: seeding {n} active grants of {WORKLOAD}"));
    let seed_start = Instant::now();
    seed(&dir.path().join("lanyard.db"), n).await?;
    let seed_time = seed_start.elapsed();
    note("bench: starting lanyard serve --dev on the seeded store");
    let (mut server, ready) = DevServer::start(dir.path()).await?;
    let pid = server.pid().context("the server has no pid")?;
    let result = async {
        let mut admin = crate::client::admin_client(&ready.admin).await?;
        let (_, rss_before) = memory_kib(pid)?;
        let cpu0 = cpu_ticks(&pid.to_string())?;
        note(&format!("bench: revoking every grant of {WORKLOAD}"));
        let t0 = Instant::now();
        let mut stream = admin
            .revoke(pb::RevokeRequest {
                selector: Some(pb::RevokeSelector {
                    selector: Some(pb::revoke_selector::Selector::WorkloadId(WORKLOAD.into())),
                }),
                reason: "lanyard bench --revoke".into(),
                deny_seconds: 0,
            })
            .await
            .context("Revoke")?
            .into_inner();
        let (mut stored, mut first_receipt, mut receipts, mut grants) = (None, None, 0u64, 0u64);
        let summary = loop {
            let ev = stream
                .next()
                .await
                .context("the stream ended before the summary")?
                .context("Revoke stream")?;
            match ev.event {
                Some(pb::revoke_event::Event::Job(j)) => {
                    stored = Some(t0.elapsed());
                    anyhow::ensure!(j.matched as u64 == n, "matched {} of {n}", j.matched);
                }
                Some(pb::revoke_event::Event::Receipt(r)) => {
                    first_receipt.get_or_insert_with(|| t0.elapsed());
                    receipts += 1;
                    grants += r.grant_ids.len() as u64;
                }
                Some(pb::revoke_event::Event::Summary(s)) => break s,
                Some(pb::revoke_event::Event::KillSwitch(_)) | None => {}
            }
        };
        let last = t0.elapsed();
        let cpu = machine.ticks_to_us(cpu_ticks(&pid.to_string())?.saturating_sub(cpu0));
        let (peak, rss_after) = memory_kib(pid)?;
        anyhow::ensure!(
            u64::from(summary.revoked) == n && grants == n,
            "revoked {} (receipts covered {grants}) of {n}",
            summary.revoked
        );
        Ok::<_, anyhow::Error>((
            stored,
            first_receipt,
            last,
            receipts,
            cpu,
            rss_before,
            rss_after,
            peak,
        ))
    }
    .await;
    let stop = server.stop().await;
    let (stored, first, last, receipts, cpu, rss_before, rss_after, peak) = match result {
        Ok(v) => v,
        Err(e) => {
            server.report_stderr();
            return Err(e);
        }
    };
    stop.context("stopping the server")?;
    let secs = |d: Option<Duration>| d.map_or(0.0, |d| round_to(d.as_secs_f64(), 3));
    let goal_met = n != 100_000 || last < GOAL;
    match g.output {
        OutputFormat::Json => emit_json(&json!({
            "command": command_line(),
            "machine": {"nproc": machine.nproc, "cpu_model": machine.cpu_model, "kernel": machine.kernel},
            "grants": n,
            "seed_secs": round_to(seed_time.as_secs_f64(), 3),
            "job_stored_secs": secs(stored),
            "first_receipt_secs": secs(first),
            "last_receipt_secs": round_to(last.as_secs_f64(), 3),
            "receipts": receipts,
            "grants_per_sec": round_to(n as f64 / last.as_secs_f64(), 0),
            "server_cpu_secs": round_to(cpu / 1e6, 3),
            "server_rss_kib_before": rss_before,
            "server_rss_kib_after": rss_after,
            "server_peak_rss_kib": peak,
            "goal_secs": GOAL.as_secs_f64(),
            "goal_met": goal_met,
        }))?,
        OutputFormat::Table => emit(&kv_table(&[
            ("command", command_line()),
            (
                "machine",
                format!("{} CPUs, {}", machine.nproc, machine.cpu_model),
            ),
            ("grants revoked", n.to_string()),
            (
                "job stored (all refused by introspection)",
                format!("{:.3} s", secs(stored)),
            ),
            ("first receipt", format!("{:.3} s", secs(first))),
            (
                "last receipt (summary)",
                format!("{:.3} s", last.as_secs_f64()),
            ),
            ("receipts", receipts.to_string()),
            (
                "grants per second",
                format!("{:.0}", n as f64 / last.as_secs_f64()),
            ),
            ("server CPU", format!("{:.3} s", cpu / 1e6)),
            (
                "server memory",
                format!(
                    "{:.1} MiB before, {:.1} MiB after, peak {:.1} MiB",
                    rss_before as f64 / 1024.0,
                    rss_after as f64 / 1024.0,
                    peak as f64 / 1024.0
                ),
            ),
            (
                "goal (100,000 in < 2 s)",
                if n != 100_000 {
                    "n/a (run with --revoke 100000)".into()
                } else if goal_met {
                    "met".into()
                } else {
                    "NOT met".into()
                },
            ),
        ]))?,
    }
    Ok(())
}

/// `lanyard bench --inventory N`: N grants over N/1000 workloads (one in ten active),
/// then time `AdminService.Inventory` of one workload and a filtered grant listing.
///
/// # Errors
/// When seeding or the server fails.
pub async fn inventory(g: &GlobalArgs, n: u64) -> anyhow::Result<()> {
    let machine = Machine::read();
    let workloads = (n / 1000).max(1);
    let dir = tempfile::Builder::new()
        .prefix("lanyard-bench-inventory-")
        .tempdir()
        .context("creating a throwaway directory")?;
    note(&format!(
        "bench: seeding {n} grants over {workloads} workloads"
    ));
    seed_spread(&dir.path().join("lanyard.db"), n, workloads).await?;
    let (mut server, ready) = DevServer::start(dir.path()).await?;
    let result = async {
        let mut admin = crate::client::admin_client(&ready.admin).await?;
        let mut times = Vec::new();
        let mut grants = 0;
        for _ in 0..20 {
            let t0 = Instant::now();
            let r = admin
                .inventory(pb::InventoryRequest {
                    workload_id: WORKLOAD.into(),
                    page_size: 100,
                    ..Default::default()
                })
                .await
                .context("Inventory")?
                .into_inner();
            times.push(t0.elapsed());
            grants = r.grants.len();
        }
        times.sort();
        let t0 = Instant::now();
        let listed = admin
            .list_grants(pb::ListGrantsRequest {
                workload_prefix: format!("{WORKLOAD}-9"),
                status: "active".into(),
                page_size: 1000,
                ..Default::default()
            })
            .await
            .context("ListGrants")?
            .into_inner()
            .grants
            .len();
        let prefix = t0.elapsed();
        Ok::<_, anyhow::Error>((times, grants, listed, prefix))
    }
    .await;
    let stop = server.stop().await;
    let (times, grants, listed, prefix) = match result {
        Ok(v) => v,
        Err(e) => {
            server.report_stderr();
            return Err(e);
        }
    };
    stop.context("stopping the server")?;
    let ms = |d: Duration| round_to(d.as_secs_f64() * 1000.0, 2);
    let (p50, max) = (times[times.len() / 2], times[times.len() - 1]);
    match g.output {
        OutputFormat::Json => emit_json(&json!({
            "command": command_line(),
            "machine": {"nproc": machine.nproc, "cpu_model": machine.cpu_model, "kernel": machine.kernel},
            "grants": n, "workloads": workloads,
            "inventory_p50_ms": ms(p50), "inventory_max_ms": ms(max), "inventory_grants": grants,
            "list_by_prefix_ms": ms(prefix), "list_by_prefix_grants": listed,
        }))?,
        OutputFormat::Table => emit(&kv_table(&[
            ("command", command_line()),
            (
                "machine",
                format!("{} CPUs, {}", machine.nproc, machine.cpu_model),
            ),
            (
                "store",
                format!("{n} grants, {workloads} workloads, 1 in 10 active"),
            ),
            (
                "inventory (one workload, page of 100)",
                format!(
                    "p50 {:.2} ms, max {:.2} ms over 20 calls ({grants} active grants)",
                    ms(p50),
                    ms(max)
                ),
            ),
            (
                "grants list --workload-prefix --status active",
                format!("{:.2} ms ({listed} grants)", ms(prefix)),
            ),
        ]))?,
    }
    Ok(())
}
